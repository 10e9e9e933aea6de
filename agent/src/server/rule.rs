//! Host mode's redirect rules over the agent's life: installed (in the iptables backend the node
//! uses) before serving and reconciled while serving. Never removed when the agent stops, cleanly
//! or not: through a restart or a rolling update pods are refused, never sent to the real IMDS
//! (fail closed). Only `irsa-imds-agent uninstall` removes them.

use std::net::{IpAddr, SocketAddrV4, SocketAddrV6};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::RunError;
use crate::config::ValidConfig;
use crate::netfilter::{NetfilterError, Reconciled, RedirectRule};
use crate::telemetry::Metrics;

/// Host mode: installs the redirect rules and keeps them reconciled until `stop`.
pub(super) async fn install_rule(
    cfg: &ValidConfig,
    metrics: &Arc<Metrics>,
    stop: &CancellationToken,
) -> Result<(), RunError> {
    let (true, Some(IpAddr::V4(ip))) = (cfg.iptables, cfg.host_ip) else {
        return Ok(());
    };
    let port = cfg.listen.port();
    let interfaces = cfg.host_interface.clone();
    let v6 = cfg.host_ipv6.map(|ip6| SocketAddrV6::new(ip6, port, 0, 0));
    let choice = cfg.iptables_backend;
    let (rule, backend) = tokio::task::spawn_blocking(move || {
        let backend = choice.resolve();
        let rule =
            RedirectRule::new(&interfaces, SocketAddrV4::new(ip, port), v6).with_backend(backend);
        rule.ensure().map(|_| (rule, backend))
    })
    .await
    .unwrap_or_else(|e| Err(NetfilterError::Spawn("ensure".into(), e.to_string())))
    .map_err(RunError::Netfilter)?;
    tracing::info!(
        interfaces = %cfg.host_interface.join(","),
        redirect_to = %rule.target_v4,
        ipv6 = if rule.target_v6.is_some() { "dnat" } else { "reject" },
        backend = backend.name(),
        "host redirect rules installed"
    );
    metrics.set_redirect_rule(true);
    let metrics = metrics.clone();
    tokio::spawn(crate::netfilter::reconcile(
        Arc::new(rule),
        cfg.iptables_resync,
        stop.clone(),
        move |pass| {
            if pass == Reconciled::Restored {
                metrics.rule_restored();
            }
            metrics.set_redirect_rule(pass != Reconciled::Failed);
        },
    ));
    Ok(())
}
