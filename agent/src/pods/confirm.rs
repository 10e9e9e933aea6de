//! Confirming a CNI registration: the pod behind a fresh ADD is read straight from the API (the
//! watch may lag by seconds), so the first request of a new pod is answered from the
//! registration alone.

use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;

use super::{PodIndex, PodInfo, Registration};

/// Reads before giving up: a registration arrives during sandbox setup, when the API server
/// already knows the pod, so a miss is a transient error.
const ATTEMPTS: u32 = 3;
const RETRY_BASE: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PodSourceError {
    #[error("cannot read pod {namespace}/{name}")]
    Read {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

impl PodSourceError {
    /// The API server's refusal (403: the agent's RBAC lacks `get pods`), naming what it refused.
    pub fn forbidden(&self) -> Option<&str> {
        match self {
            PodSourceError::Read {
                source: kube::Error::Api(s),
                ..
            } if s.code == 403 => Some(&s.message),
            PodSourceError::Read { .. } => None,
        }
    }
}

/// One pod by name, as the API server has it now (`None`: it does not exist).
pub trait PodSource: Send + Sync {
    fn pod<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<PodInfo>, PodSourceError>>;
}

/// Direct reads through a kube client.
#[derive(Clone)]
pub(crate) struct KubePods {
    client: kube::Client,
}

impl KubePods {
    pub(crate) fn new(client: kube::Client) -> Self {
        KubePods { client }
    }
}

impl PodSource for KubePods {
    fn pod<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<PodInfo>, PodSourceError>> {
        Box::pin(async move {
            let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
            let pod = api
                .get_opt(name)
                .await
                .map_err(|source| PodSourceError::Read {
                    namespace: namespace.into(),
                    name: name.into(),
                    source,
                })?;
            Ok(pod.as_ref().and_then(PodInfo::from_pod))
        })
    }
}

/// Confirms `reg` in `index` with what `source` says of its pod; returns the pod when it was
/// confirmed (a pod of `node`, not hostNetwork, not terminated), for a prefetch.
pub(crate) async fn confirm(
    index: &PodIndex,
    source: &dyn PodSource,
    node: &str,
    reg: &Registration,
) -> Option<PodInfo> {
    for attempt in 0..ATTEMPTS {
        match source.pod(&reg.namespace, &reg.name).await {
            Ok(Some(info)) => {
                if info.node_name.as_deref() != Some(node) {
                    tracing::warn!(pod = %reg.name, namespace = %reg.namespace, "registered pod is not on this node; ignored");
                    return None;
                }
                if info.host_network || info.terminal {
                    return None;
                }
                // The sandbox's addresses are the registration's; the API may not show them yet.
                let info = PodInfo {
                    ips: reg.ips.clone(),
                    ..info
                };
                if !index.confirm(&reg.container_id, info.clone()) {
                    return None;
                }
                // The uid binds the sandbox to this pod across a restart.
                if let Err(e) = index.persist().await {
                    tracing::error!(error = %e, "cannot save registrations");
                }
                return Some(info);
            }
            Ok(None) => {
                tracing::warn!(pod = %reg.name, namespace = %reg.namespace, "registered pod not found in the API");
                return None;
            }
            Err(e) => {
                if let Some(refusal) = e.forbidden() {
                    // Retrying cannot help; the watch still identifies the pod, only later.
                    tracing::warn!(pod = %reg.name, namespace = %reg.namespace, error = %refusal,
                        "cannot confirm the CNI registration: the API server refuses to read the pod");
                    return None;
                }
                tracing::debug!(error = %e, attempt, "cannot read registered pod; retrying");
                tokio::time::sleep(RETRY_BASE * 2u32.pow(attempt)).await;
            }
        }
    }
    tracing::warn!(pod = %reg.name, namespace = %reg.namespace,
        "cannot confirm the CNI registration; the watch will identify the pod");
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct Scripted(Mutex<Vec<Option<PodInfo>>>);

    impl PodSource for Scripted {
        fn pod<'a>(
            &'a self,
            _: &'a str,
            _: &'a str,
        ) -> BoxFuture<'a, Result<Option<PodInfo>, PodSourceError>> {
            let next = self.0.lock().unwrap().remove(0);
            Box::pin(async move { Ok(next) })
        }
    }

    fn reg() -> Registration {
        Registration {
            container_id: "c1".into(),
            namespace: "apps".into(),
            name: "p".into(),
            ips: vec!["10.1.0.7".parse().unwrap()],
        }
    }

    fn api_pod(node: &str) -> PodInfo {
        PodInfo {
            uid: "uid-p".into(),
            namespace: "apps".into(),
            name: "p".into(),
            service_account: "reader".into(),
            node_name: Some(node.into()),
            ips: vec![],
            host_network: false,
            terminal: false,
            kube2iam_role: None,
        }
    }

    #[tokio::test]
    async fn a_registered_pod_of_this_node_is_found_by_its_registered_ip() {
        let index = PodIndex::new();
        index.register(reg());
        let src = Scripted(Mutex::new(vec![Some(api_pod("node-1"))]));
        let got = confirm(&index, &src, "node-1", &reg()).await.unwrap();
        assert_eq!(got.ips, reg().ips);
        assert!(
            matches!(index.lookup(reg().ips[0]), super::super::Lookup::Found(p) if p.uid == "uid-p")
        );
    }

    #[tokio::test]
    async fn a_pod_of_another_node_or_a_missing_one_stays_pending() {
        let index = PodIndex::new();
        index.register(reg());
        for answer in [Some(api_pod("node-2")), None] {
            let src = Scripted(Mutex::new(vec![answer]));
            assert!(confirm(&index, &src, "node-1", &reg()).await.is_none());
            assert_eq!(index.lookup(reg().ips[0]), super::super::Lookup::Pending);
        }
    }
}
