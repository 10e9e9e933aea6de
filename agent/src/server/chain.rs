//! The CNI hook's entry in the node's active conflist, kept there while the agent runs: the
//! node's CNI rewrites its conflist when it restarts (aws-node on every add-on upgrade) and a new
//! conflist may become the active one. Like the host rule, the entry stays when the agent stops
//! (the plugin fails open while the agent is away); only the documented uninstall removes it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use irsa_imds_cni::chain::{ChainError, ChainState};
use tokio_util::sync::CancellationToken;

use crate::telemetry::Metrics;

/// Every `every`, re-reads the chain state `install` wrote and puts the hook back into the active
/// conflist if the node's CNI rewrote it or a new conflist became active. A missing state file
/// means uninstall is under way (or install never ran): nothing is chained then.
pub(super) async fn keep_chained(
    state_file: PathBuf,
    every: Duration,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Errors are logged when they change, not every tick.
    let mut last_error: Option<String> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let f = state_file.clone();
        // Ok(None): no state file (nothing to keep chained); Ok(Some(None)): chained already;
        // Ok(Some(Some(path))): chained again into `path`.
        let outcome = tokio::task::spawn_blocking(move || match ChainState::load(&f) {
            Err(ChainError::Read { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
            Ok(s) => s.ensure().map(Some),
        })
        .await;
        match outcome {
            Ok(Ok(Some(Some(path)))) => {
                tracing::warn!(conflist = %path.display(), "CNI hook was missing from the active conflist; chained it again");
                metrics.cni_rechained();
                metrics.set_cni_chain(true);
                last_error = None;
            }
            Ok(Ok(Some(None))) => {
                metrics.set_cni_chain(true);
                last_error = None;
            }
            Ok(Ok(None)) => {
                metrics.set_cni_chain(false);
                last_error = None;
            }
            Ok(Err(e)) => {
                metrics.set_cni_chain(false);
                let msg = e.to_string();
                if last_error.as_deref() != Some(msg.as_str()) {
                    tracing::error!(error = %msg, "cannot keep the CNI hook chained");
                    last_error = Some(msg);
                }
            }
            Err(e) => {
                metrics.set_cni_chain(false);
                tracing::error!(error = %e, "CNI chain task failed");
            }
        }
    }
}
