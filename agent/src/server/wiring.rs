//! `run_with`: the agent's life: assemble, start the watch, the registration socket, the
//! refresher and the listeners, serve until shutdown or a fatal error, then drain.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use tokio_util::sync::CancellationToken;

use super::agent::Agent;
use super::gate::{Caps, Gate};
use super::rule::install_rule;
use super::seams::Remembered;
use super::{Deps, Listeners, RunError, http, ops};
use crate::config::ValidConfig;
use crate::identity::freshness::REFRESH_SCAN;
use crate::pods::registration::{self, Op};
use crate::pods::state::StateStore;
use crate::pods::{PodIndex, Registration};

/// In-flight requests get this long to finish after shutdown starts.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// A metadata client that has not sent its request head by then is cut off (slowloris; idle
/// connections give their place back).
const IMDS_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Probes and scrapes send their request at once; a connection that does not is someone holding
/// places, and the kubelet's probe (1 s timeout by default) needs them back soon.
const OPS_HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// The ops listener: a few callers (the kubelet's probes, a Prometheus scrape), each needing one
/// or two connections, so one source holds at most 8; and 32 more places only the node itself
/// (the kubelet probing this host-network pod connects from the address it connects to) may
/// take, each for one `/healthz` or `/readyz`, so the probe gets through whatever else floods.
const OPS_CAPS: Caps = Caps {
    max: 256,
    per_source: 8,
    reserved: 32,
};

/// Loads the state file into `index` (see [`crate::pods::state`] for what a bad file does) and
/// keeps it there from now on; returns the restored registrations, to be confirmed again.
fn restore_state(index: &PodIndex, path: &std::path::Path) -> Vec<Registration> {
    let store = StateStore::new(path);
    let restored = match store.load() {
        Ok(Some(snap)) => {
            let (regs, revs) = (snap.registrations.len(), snap.revocations.len());
            let restored = index.restore(snap);
            tracing::info!(path = %path.display(), registrations = regs, revocations = revs, "state restored");
            restored
        }
        Ok(None) => {
            tracing::info!(path = %path.display(), "no saved state; starting empty");
            Vec::new()
        }
        Err(e) => {
            let moved = store.set_aside();
            tracing::error!(
                error = %e, moved_to = ?moved,
                "saved registrations unusable; starting without them (revocations of pods the API still shows are lost)"
            );
            Vec::new()
        }
    };
    index.set_store(store);
    restored
}

/// Serves until `shutdown` resolves (then drains and returns `Ok`) or until something fatal
/// happens (the pod watch ending), which returns the error. Either way the host rule and the CNI
/// chain stay, so pods fail closed until an agent is back (only the documented uninstall removes
/// them).
pub async fn run_with(
    cfg: ValidConfig,
    deps: Deps,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let agent = Arc::new(Agent::assemble(&cfg, &deps)?);
    // Saved registrations and revocations go back in before anything is served or watched.
    if let Some(path) = &cfg.state_file {
        for reg in restore_state(&agent.index, path) {
            agent.confirm_in_background(reg);
        }
    }
    let stop = CancellationToken::new();
    install_rule(&cfg, &deps.metrics, &stop).await?;
    if let Some(state) = cfg.cni_chain_state.clone() {
        tokio::spawn(super::chain::keep_chained(
            state,
            cfg.cni_chain_resync,
            deps.metrics.clone(),
            stop.clone(),
        ));
    }

    let (fatal_tx, mut fatal_rx) = tokio::sync::mpsc::channel::<RunError>(1);
    {
        let agent = agent.clone();
        let api: Api<Pod> = Api::all(deps.kube.clone());
        let node = cfg.node_name.clone();
        tokio::spawn(async move {
            let a2 = agent.clone();
            let err =
                crate::pods::watch::run(api, node, agent.index.clone(), move |c| a2.on_change(c))
                    .await;
            let _ = fatal_tx.send(err.into()).await;
        });
    }
    if let Some(path) = cfg.cni_socket.clone() {
        let listener = registration::bind(&path).map_err(|source| RunError::Bind {
            what: "--cni-socket",
            addr: path.display().to_string(),
            source,
        })?;
        let a2 = agent.clone();
        let on_op = Arc::new(move |op: &Op, ok: bool| a2.on_registration(op, ok));
        tokio::spawn(registration::serve(
            listener,
            path,
            agent.index.clone(),
            on_op,
            stop.clone(),
        ));
    }
    if let Some(path) = cfg.explain_socket.clone() {
        // The same root-only socket setup as the registration socket (0600, stale one replaced).
        let listener = registration::bind(&path).map_err(|source| RunError::Bind {
            what: "--explain-socket",
            addr: path.display().to_string(),
            source,
        })?;
        tokio::spawn(super::explain::serve(
            listener,
            path,
            agent.clone(),
            stop.clone(),
        ));
    }
    tokio::spawn(agent.creds.clone().refresher(REFRESH_SCAN, stop.clone()));

    let drain = http::Drain::new();
    let imds = http::Listener {
        socket: listeners.imds,
        gate: Gate::new(
            "imds",
            Caps {
                max: cfg.max_connections,
                per_source: cfg.max_connections_per_source,
                reserved: 0,
            },
            deps.metrics.clone(),
        ),
        header_timeout: IMDS_HEADER_TIMEOUT,
        require_redirect: cfg.require_redirect,
    };
    let ops = http::Listener {
        socket: listeners.ops,
        gate: Gate::new("ops", OPS_CAPS, deps.metrics.clone()),
        header_timeout: OPS_HEADER_TIMEOUT,
        require_redirect: false,
    };
    let imds_task = {
        let agent = agent.clone();
        http::serve(
            imds,
            stop.clone(),
            &drain,
            move |req, peer, memory: &Mutex<Remembered>| agent.answer(req, peer, memory),
        )
    };
    let ops_task = {
        let agent = agent.clone();
        http::serve(ops, stop.clone(), &drain, move |req, _, _: &()| {
            std::future::ready(ops::respond(
                &req,
                &agent.index,
                || agent.creds.stats(),
                &agent.metrics,
            ))
        })
    };
    tracing::info!(node = %cfg.node_name, listen = %cfg.listen, ops = %cfg.ops_listen, "agent started");

    let outcome = tokio::select! {
        _ = shutdown => Ok(()),
        Some(e) = fatal_rx.recv() => Err(e),
    };
    stop.cancel();
    let _ = tokio::join!(imds_task, ops_task);
    if tokio::time::timeout(DRAIN_TIMEOUT, drain.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("drain timed out; closing remaining connections");
    }
    match &outcome {
        Ok(()) => tracing::info!("agent stopped"),
        Err(e) => tracing::error!(error = %e, "agent failed"),
    }
    outcome
}
