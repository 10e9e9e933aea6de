//! `irsa-imds-agent`: parse flags, install the TLS provider, run until SIGTERM/SIGINT.

use clap::Parser;
use irsa_imds_agent::config::{ExplainConfig, UninstallConfig};
use irsa_imds_agent::{Config, Listeners, netfilter, run, telemetry};

/// Kubernetes shows this file's content as the container's termination message.
const TERMINATION_LOG: &str = "/dev/termination-log";

#[tokio::main]
async fn main() {
    // `irsa-imds-agent uninstall`: the one path that removes the host rules (DESIGN §6).
    if std::env::args().nth(1).as_deref() == Some("uninstall") {
        let u = UninstallConfig::parse_from(std::env::args().skip(1));
        uninstall(u).await;
        return;
    }
    // `irsa-imds-agent explain <namespace>/<pod>|<ip>`: asks the agent running on this node.
    if std::env::args().nth(1).as_deref() == Some("explain") {
        let e = ExplainConfig::parse_from(std::env::args().skip(1));
        match irsa_imds_agent::explain::query(&e.socket, &e.target).await {
            Ok(report) => print!("{report}"),
            Err(err) => {
                eprintln!("irsa-imds-agent explain: {err}");
                std::process::exit(1);
            }
        }
        return;
    }
    let cfg = Config::parse();
    telemetry::init_logging(cfg.log_format, &cfg.node_name);
    let cfg = match cfg.validate() {
        Ok(cfg) => cfg,
        Err(e) => fail(&format!("invalid configuration: {}", chain(&e))),
    };
    raise_nofile_limit(&cfg);
    // kube and the AWS SDK both pull in rustls; exactly one process-wide provider must be chosen
    // before the first TLS client is built: aws-lc-rs, the one the AWS SDK is built on (and the
    // session-token HMAC uses), so the agent links a single crypto library.
    if rustls::crypto::aws_lc_rs::default_provider()
        .install_default()
        .is_err()
    {
        tracing::debug!("a rustls crypto provider was already installed");
    }
    let listeners = match Listeners::bind(&cfg).await {
        Ok(l) => l,
        Err(e) => fail(&chain(&e)),
    };
    if let Err(e) = run(cfg, listeners, shutdown_signal()).await {
        fail(&chain(&e));
    }
}

/// Descriptors beyond the listeners' caps: the registration socket, API and STS clients, logs.
const SPARE_DESCRIPTORS: u64 = 256;

/// A flood must hit the listeners' caps (refused, counted), not `EMFILE` at accept.
fn raise_nofile_limit(cfg: &Config) {
    let needed = (cfg.max_connections as u64).saturating_add(SPARE_DESCRIPTORS + 256); // + the ops listener's cap
    match irsa_imds_agent::server::limits::raise_nofile_limit() {
        Ok(n) if n < needed => tracing::warn!(
            limit = n,
            needed,
            "RLIMIT_NOFILE is below --max-connections plus the ops listener; raise the hard limit"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot raise RLIMIT_NOFILE"),
    }
}

async fn uninstall(u: UninstallConfig) {
    match tokio::task::spawn_blocking(netfilter::uninstall).await {
        Ok(Ok(cleaned)) => {
            let names: Vec<&str> = cleaned.iter().map(|b| b.name()).collect();
            eprintln!(
                "irsa-imds-agent: host redirect rules removed (backends that had them: {})",
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            );
        }
        Ok(Err(e)) => fail(&format!("uninstall: {e}")),
        Err(e) => fail(&format!("uninstall: {e}")),
    }
    if u.hold {
        shutdown_signal().await;
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process can still be killed; serve on.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = int.recv() => tracing::info!("SIGINT: draining"),
    }
}

/// The error and every cause under it, `outer: inner: root`.
fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        msg.push_str(": ");
        msg.push_str(&c.to_string());
        cause = c.source();
    }
    msg
}

fn fail(msg: &str) -> ! {
    eprintln!("irsa-imds-agent: {msg}");
    let _ = std::fs::write(TERMINATION_LOG, msg);
    std::process::exit(1);
}
