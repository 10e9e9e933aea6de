//! Host mode's redirect rule over the agent's life: installed before serving, reconciled while
//! serving, removed only on a clean shutdown (after a failure, pods must fail closed).

use std::net::{IpAddr, SocketAddrV4, SocketAddrV6};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::RunError;
use crate::config::Config;
use crate::netfilter::{NetfilterError, RedirectRule};
use crate::telemetry::Metrics;

/// Host mode: installs the redirect rule and keeps it reconciled until `stop`.
pub(super) async fn install_rule(
    cfg: &Config,
    metrics: &Arc<Metrics>,
    stop: &CancellationToken,
) -> Result<Option<Arc<RedirectRule>>, RunError> {
    let (true, Some(IpAddr::V4(ip))) = (cfg.iptables, cfg.host_ip) else {
        return Ok(None);
    };
    let port = cfg.listen.port();
    let rule = Arc::new(RedirectRule::new(
        &cfg.host_interface,
        SocketAddrV4::new(ip, port),
        cfg.host_ipv6.map(|ip6| SocketAddrV6::new(ip6, port, 0, 0)),
    ));
    let r = rule.clone();
    tokio::task::spawn_blocking(move || r.ensure())
        .await
        .unwrap_or_else(|e| Err(NetfilterError::Spawn("ensure".into(), e.to_string())))
        .map_err(RunError::Netfilter)?;
    tracing::info!(interface = %cfg.host_interface, target = %rule.target_v4, "host redirect rule installed");
    let metrics = metrics.clone();
    tokio::spawn(crate::netfilter::reconcile(
        rule.clone(),
        cfg.iptables_resync,
        stop.clone(),
        move || metrics.rule_restored(),
    ));
    Ok(Some(rule))
}

pub(super) async fn remove_rule(rule: Arc<RedirectRule>) {
    match tokio::task::spawn_blocking(move || rule.remove())
        .await
        .unwrap_or_else(|e| Err(NetfilterError::Spawn("remove".into(), e.to_string())))
    {
        Ok(()) => tracing::info!("host redirect rule removed"),
        Err(e) => tracing::error!(error = %e, "cannot remove host redirect rule"),
    }
}
