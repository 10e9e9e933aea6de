//! The process: listeners, the wiring of pods, identity and the IMDS protocol, the life cycle.
//!
//! - this file: what a caller hands in ([`Listeners`], [`Deps`]) and what can go wrong ([`RunError`]);
//! - `agent`: the assembled parts and the reactions between them;
//! - `clients`: the real Kubernetes and STS clients [`run`] builds;
//! - `wiring`: [`run_with`], which assembles the parts, serves until shutdown and drains;
//! - `seams`: the pod index, role resolver and credential cache as the protocol's seams;
//! - `http`: accept loops, requests in and replies out;
//! - `gate`: connection admission (per-source and listener caps, the health reserve);
//! - `redirect`: whether a connection came through the host redirect (`SO_ORIGINAL_DST`);
//! - `limits`: the process's descriptor limit;
//! - `ops`: `/healthz`, `/readyz`, `/metrics`;
//! - `rule`: the host-mode redirect rule's life cycle (it outlives the agent);
//! - `chain`: keeping the CNI hook in the node's active conflist.

mod agent;
mod chain;
mod clients;
mod explain;
mod gate;
mod http;
pub mod limits;
mod ops;
mod redirect;
mod rule;
mod seams;
mod wiring;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::config::ValidConfig;
use crate::identity::apiserver::ApiServer;
use crate::identity::cache::FailureHook;
use crate::identity::kube2iam::Namespaces;
use crate::identity::{Clock, RoleExchange, ServiceAccounts, SystemClock, TokenMinter};
use crate::pods::confirm::{KubePods, PodSource};
use crate::telemetry::{EventSink, Metrics, PodRef};

pub use wiring::run_with;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    #[error("cannot bind {what} on {addr}")]
    Bind {
        what: &'static str,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("kubernetes client")]
    Kube(#[source] kube::Error),
    #[error("no kubeconfig and not in a cluster: set --kubeconfig")]
    KubeInfer(#[source] kube::config::InferConfigError),
    #[error("kubeconfig {path}")]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("cannot determine the AWS region: set --region (AWS_REGION)")]
    Region(#[source] crate::upstream::UpstreamError),
    #[error("host redirect rule")]
    Netfilter(#[source] crate::netfilter::NetfilterError),
    #[error(transparent)]
    Watch(#[from] crate::pods::watch::WatchError),
    #[error("session token key")]
    Crypto(#[source] crate::imds::TokenError),
}

/// The sockets the agent serves on, bound by the caller (tests bind port 0).
pub struct Listeners {
    pub imds: TcpListener,
    pub ops: TcpListener,
}

/// Connections the kernel completes before the agent accepts them. A connection flood from one
/// source fills this queue before the agent sees the source (and the kernel then drops every
/// source's SYNs alike), so it is as deep as the kernel allows by default (`somaxconn`, 4096).
pub const LISTEN_BACKLOG: u32 = 4096;

impl Listeners {
    pub async fn bind(cfg: &ValidConfig) -> Result<Self, RunError> {
        let bind = |what: &'static str, addr: std::net::SocketAddr| async move {
            listen(addr).map_err(|source| RunError::Bind {
                what,
                addr: addr.to_string(),
                source,
            })
        };
        Ok(Listeners {
            imds: bind("--listen", cfg.listen).await?,
            ops: bind("--ops-listen", cfg.ops_listen).await?,
        })
    }
}

/// A listening socket on `addr` with [`LISTEN_BACKLOG`].
pub fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(LISTEN_BACKLOG)
}

/// The seams `run_with` is built from; tests swap any of them for a fake or an emulator.
pub struct Deps {
    /// The node-scoped pod watch reads through this client.
    pub kube: kube::Client,
    /// Direct pod reads that confirm a CNI registration.
    pub pods: Arc<dyn PodSource>,
    pub service_accounts: Arc<dyn ServiceAccounts>,
    /// Namespace reads, for kube2iam's namespace restrictions (only when they are on).
    pub namespaces: Arc<dyn Namespaces>,
    pub tokens: Arc<dyn TokenMinter>,
    pub sts: Arc<dyn RoleExchange>,
    /// Hears every role that cannot be assumed (Kubernetes Events in production).
    pub on_role_failure: Option<FailureHook>,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<Metrics>,
}

impl Deps {
    /// Every Kubernetes seam through `kube`, Events reported as `instance` (this agent's pod).
    pub fn from_kube(
        kube: kube::Client,
        sts: Arc<dyn RoleExchange>,
        metrics: Arc<Metrics>,
        instance: Option<String>,
    ) -> Self {
        let api = Arc::new(ApiServer::new(kube.clone()));
        let events = EventSink::new(kube.clone(), instance);
        let on_role_failure: FailureHook = Arc::new(move |pod, role, e| {
            let pod = PodRef {
                namespace: &pod.namespace,
                name: &pod.name,
                uid: &pod.uid,
            };
            let note = format!("cannot assume {}: {e}", role.role_arn);
            events.role_failed(pod, e.metric_label(), &note);
        });
        Deps {
            pods: Arc::new(KubePods::new(kube.clone())),
            kube,
            service_accounts: api.clone(),
            namespaces: api.clone(),
            tokens: api,
            sts,
            on_role_failure: Some(on_role_failure),
            clock: Arc::new(SystemClock),
            metrics,
        }
    }
}

/// Builds the real clients (kubeconfig inference, STS from the standard AWS settings) and runs.
pub async fn run(
    cfg: ValidConfig,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let kube = clients::kube(&cfg).await?;
    let sts = clients::sts(&cfg).await?;
    let deps = Deps::from_kube(kube, sts, Arc::new(Metrics::new()), cfg.pod_name.clone());
    run_with(cfg, deps, listeners, shutdown).await
}
