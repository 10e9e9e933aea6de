//! The node-scoped pod watch: one watcher, `spec.nodeName=<node>`, so the API load is
//! O(pods on this node), never a cluster-wide list.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};

use super::{Change, PodIndex, PodInfo};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WatchError {
    /// The watch stream ended: serving on from a frozen view would be wrong, so the agent exits
    /// and the kubelet restarts it.
    #[error("pod watch for node {node} ended")]
    Ended { node: String },
    /// The API server refuses the list or watch (the agent's RBAC lacks the rule): retrying
    /// cannot help, and a frozen or empty view must not be served as ready. The message is the
    /// API server's, naming the verb and resource it refused.
    #[error("pod watch for node {node} forbidden: {message}")]
    Forbidden { node: String, message: String },
}

/// Feeds `index` from the API until the stream ends; `on_change` hears arrivals and departures.
pub async fn run(
    api: Api<Pod>,
    node: String,
    index: Arc<PodIndex>,
    on_change: impl Fn(Change),
) -> WatchError {
    let cfg = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut stream = watcher(api, cfg).default_backoff().boxed();
    let mut buffer: Vec<PodInfo> = Vec::new();
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(watcher::Event::Init) => buffer.clear(),
            Ok(watcher::Event::InitApply(p)) => buffer.extend(trim(&p, &node)),
            Ok(watcher::Event::InitDone) => {
                let n = buffer.len();
                for c in index.replace_all(std::mem::take(&mut buffer)) {
                    on_change(c);
                }
                tracing::info!(pods = n, node = %node, "pod index synced");
            }
            Ok(watcher::Event::Apply(p)) => match trim(&p, &node) {
                Some(info) => index.upsert(info).into_iter().for_each(&on_change),
                // Moved off this node (cannot happen for a scheduled pod) or malformed: forget it.
                None => {
                    if let Some(gone) = p.metadata.uid.as_deref().and_then(|u| index.remove(u)) {
                        on_change(Change::Gone(gone));
                    }
                }
            },
            Ok(watcher::Event::Delete(p)) => {
                if let Some(gone) = p.metadata.uid.as_deref().and_then(|u| index.remove(u)) {
                    on_change(Change::Gone(gone));
                }
            }
            Err(e) => {
                if let Some(message) = forbidden(&e) {
                    return WatchError::Forbidden { node, message };
                }
                tracing::warn!(error = %e, node = %node, "pod watch error; retrying with backoff")
            }
        }
    }
    WatchError::Ended { node }
}

/// The API server's message when it refused the list or watch with 403.
fn forbidden(e: &watcher::Error) -> Option<String> {
    let status = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s))
        | watcher::Error::WatchError(s) => s,
        _ => return None,
    };
    (status.code == 403).then(|| status.message.clone())
}

/// Only pods of this node enter the index, whatever the server sent.
fn trim(p: &Pod, node: &str) -> Option<PodInfo> {
    let info = PodInfo::from_pod(p);
    if info.is_none() {
        tracing::warn!(name = ?p.metadata.name, "ignoring pod without uid, name or namespace");
    }
    info.filter(|i| i.node_name.as_deref() == Some(node))
}
