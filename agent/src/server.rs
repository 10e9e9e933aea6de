//! The listeners and the process life cycle: wires the pod index, identity and the IMDS protocol
//! together, serves until shutdown, then drains and removes the host rule.

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ImdsV2};
use crate::identity::kube::KubeIdentity;
use crate::identity::{
    CacheSettings, Clock, CredentialCache, IdentityError, RoleExchange, RoleResolver, SystemClock,
};
use crate::imds::{self, Policy, Reply, Route, TokenAuthority, wire};
use crate::netfilter::RedirectRule;
use crate::pods::registration::{self, Op};
use crate::pods::{Change, Lookup, PodIndex, PodInfo};
use crate::telemetry::Metrics;
use crate::upstream::Upstream;

/// In-flight requests get this long to finish after shutdown starts.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// A client that has not sent its headers by then is cut off (slowloris).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Request heads above this size get 431: real metadata requests are a few hundred bytes.
const MAX_HEAD_BYTES: usize = 16 * 1024;
const MAX_CONNECTIONS: usize = 4096;
/// How often the cache looks for credentials due for a refresh.
const REFRESH_SCAN: Duration = Duration::from_secs(30);
/// Refusals (AccessDenied, bad trust policy) are not retried for this long.
const NEGATIVE_TTL: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: String,
        source: std::io::Error,
    },
    #[error("kubernetes client: {0}")]
    Kube(String),
    #[error("cannot determine the AWS region: set AWS_REGION ({0})")]
    Region(String),
    #[error("host redirect rule: {0}")]
    Netfilter(String),
    #[error("{0}")]
    Watch(#[from] crate::pods::watch::WatchError),
    #[error("crypto: {0}")]
    Crypto(String),
}

/// The sockets the agent serves on, bound by the caller (tests bind port 0).
pub struct Listeners {
    pub imds: TcpListener,
    pub ops: TcpListener,
}

impl Listeners {
    pub async fn bind(cfg: &Config) -> Result<Self, RunError> {
        let imds = TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| RunError::Bind {
                what: "--listen",
                addr: cfg.listen.to_string(),
                source,
            })?;
        let ops = TcpListener::bind(cfg.ops_listen)
            .await
            .map_err(|source| RunError::Bind {
                what: "--ops-listen",
                addr: cfg.ops_listen.to_string(),
                source,
            })?;
        Ok(Listeners { imds, ops })
    }
}

/// What `run_with` needs from outside, so tests inject the emulators and a clock.
pub struct Deps {
    pub kube: kube::Client,
    pub sts: Arc<dyn RoleExchange>,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<Metrics>,
}

/// Builds the real clients (kubeconfig inference, STS from the standard AWS settings) and runs.
pub async fn run(
    cfg: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    cfg.validate().map_err(RunError::Config)?;
    let kube = kube_client(&cfg).await?;
    let region = match std::env::var("AWS_REGION").or_else(|_| std::env::var("AWS_DEFAULT_REGION"))
    {
        Ok(r) if !r.is_empty() => r,
        _ => Upstream::new(&cfg.upstream_imds)
            .region()
            .await
            .map_err(|e| RunError::Region(e.to_string()))?,
    };
    let sts = Arc::new(crate::identity::sts::SdkSts::from_env(region).await);
    let deps = Deps {
        kube,
        sts,
        clock: Arc::new(SystemClock),
        metrics: Arc::new(Metrics::new()),
    };
    run_with(cfg, deps, listeners, shutdown).await
}

async fn kube_client(cfg: &Config) -> Result<kube::Client, RunError> {
    let config = match &cfg.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| RunError::Kube(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| RunError::Kube(e.to_string()))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| RunError::Kube(e.to_string()))?,
    };
    kube::Client::try_from(config).map_err(|e| RunError::Kube(e.to_string()))
}

struct Agent {
    index: Arc<PodIndex>,
    roles: RoleResolver,
    creds: Arc<CredentialCache>,
    tokens: TokenAuthority,
    upstream: Upstream,
    policy: Policy,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    v2_required: bool,
    pod_wait: Duration,
    kube: kube::Client,
    node: String,
}

/// Serves until `shutdown` resolves (then drains, removes the host rule and returns `Ok`) or
/// until something fatal happens (the pod watch ending), which returns the error and leaves the
/// host rule in place so pods fail closed.
pub async fn run_with(
    cfg: Config,
    deps: Deps,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    cfg.validate().map_err(RunError::Config)?;
    let identity = Arc::new(KubeIdentity::new(deps.kube.clone()));
    let settings = CacheSettings {
        duration: cfg.credential_duration,
        refresh_at_remaining: cfg.refresh_at_remaining,
        max_concurrent: cfg.max_concurrent_fetches,
        rate_per_sec: cfg.fetch_rate,
        negative_ttl: NEGATIVE_TTL,
    };
    let events = EventSink::new(deps.kube.clone());
    let creds = CredentialCache::new(
        identity.clone(),
        deps.sts.clone(),
        deps.clock.clone(),
        settings,
        deps.metrics.clone(),
    )
    .with_failure_hook(Arc::new(
        move |pod: &PodInfo, role: &crate::identity::RoleSpec, e: &IdentityError| {
            events.role_failed(pod, &role.role_arn, e)
        },
    ));
    let agent = Arc::new(Agent {
        index: Arc::new(PodIndex::new()),
        roles: RoleResolver::new(
            identity,
            cfg.role_annotation.clone(),
            cfg.audience.clone(),
            cfg.sa_cache_ttl,
        ),
        creds: Arc::new(creds),
        tokens: TokenAuthority::new().map_err(|e| RunError::Crypto(e.to_string()))?,
        upstream: Upstream::new(&cfg.upstream_imds),
        policy: Policy {
            upstream_allow: cfg.upstream_allow.clone(),
        },
        metrics: deps.metrics.clone(),
        clock: deps.clock.clone(),
        v2_required: cfg.imds_v2 == ImdsV2::Required,
        pod_wait: cfg.pod_wait,
        kube: deps.kube.clone(),
        node: cfg.node_name.clone(),
    });

    let stop = CancellationToken::new();
    let rule = match (cfg.iptables, cfg.host_ip) {
        (true, Some(IpAddr::V4(ip))) => {
            let rule = Arc::new(RedirectRule::new(
                &cfg.host_interface,
                std::net::SocketAddrV4::new(ip, cfg.listen.port()),
                cfg.host_ipv6
                    .map(|ip6| std::net::SocketAddrV6::new(ip6, cfg.listen.port(), 0, 0)),
            ));
            let r = rule.clone();
            tokio::task::spawn_blocking(move || r.ensure())
                .await
                .map_err(|e| RunError::Netfilter(e.to_string()))?
                .map_err(|e| RunError::Netfilter(e.to_string()))?;
            tracing::info!(interface = %cfg.host_interface, target = %rule.target_v4, "host redirect rule installed");
            let metrics = deps.metrics.clone();
            tokio::spawn(crate::netfilter::reconcile(
                rule.clone(),
                cfg.iptables_resync,
                stop.clone(),
                move || metrics.rule_restored(),
            ));
            Some(rule)
        }
        _ => None,
    };

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
    tokio::spawn(agent.creds.clone().refresher(REFRESH_SCAN, stop.clone()));

    let graceful = Arc::new(GracefulShutdown::new());
    let imds_task = {
        let agent = agent.clone();
        serve(listeners.imds, stop.clone(), &graceful, move |req, peer| {
            let agent = agent.clone();
            async move { agent.handle(req, peer).await }
        })
    };
    let ops_task = {
        let agent = agent.clone();
        serve(listeners.ops, stop.clone(), &graceful, move |req, _| {
            let agent = agent.clone();
            async move { agent.ops(req) }
        })
    };
    tracing::info!(node = %cfg.node_name, listen = %cfg.listen, ops = %cfg.ops_listen, "agent started");

    let outcome = tokio::select! {
        _ = shutdown => Ok(()),
        Some(e) = fatal_rx.recv() => Err(e),
    };
    stop.cancel();
    let _ = tokio::join!(imds_task, ops_task);
    // The accept loops have returned, so this is the last reference.
    if let Ok(graceful) = Arc::try_unwrap(graceful)
        && tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
            .await
            .is_err()
    {
        tracing::warn!("drain timed out; closing remaining connections");
    }
    if outcome.is_ok()
        && let Some(rule) = rule
    {
        match tokio::task::spawn_blocking(move || rule.remove())
            .await
            .unwrap_or_else(|e| {
                Err(crate::netfilter::NetfilterError::Spawn(
                    "remove".into(),
                    e.to_string(),
                ))
            }) {
            Ok(()) => tracing::info!("host redirect rule removed"),
            Err(e) => tracing::error!(error = %e, "cannot remove host redirect rule"),
        }
    }
    match &outcome {
        Ok(()) => tracing::info!("agent stopped"),
        Err(e) => tracing::error!(error = %e, "agent failed"),
    }
    outcome
}

/// Accepts connections until `stop`, each served by hyper with head-size and head-time limits.
fn serve<F, Fut>(
    listener: TcpListener,
    stop: CancellationToken,
    graceful: &Arc<GracefulShutdown>,
    handler: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn(Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let graceful = graceful.clone();
    let conns = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => return,
                a = listener.accept() => a,
            };
            let (stream, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            let Ok(permit) = conns.clone().try_acquire_owned() else {
                // Over the connection limit: refuse this one rather than queue without bound.
                drop(stream);
                continue;
            };
            let handler = handler.clone();
            let svc = service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler(req, peer).await) }
            });
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(MAX_HEAD_BYTES);
            let conn = http.serve_connection(TokioIo::new(stream), svc);
            let fut = graceful.watch(conn);
            tokio::spawn(async move {
                if let Err(e) = fut.await {
                    tracing::debug!(error = %e, peer = %peer, "connection error");
                }
                drop(permit);
            });
        }
    })
}

fn to_response(reply: Reply) -> Response<Full<Bytes>> {
    let mut b = Response::builder()
        .status(reply.status)
        .header("content-type", "text/plain")
        .header("server", "EC2ws");
    for (k, v) in reply.headers {
        b = b.header(k, v);
    }
    b.body(Full::new(reply.body))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

impl Agent {
    async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        let started = Instant::now();
        let (label, reply) =
            match imds::route(req.method(), req.uri().path(), req.headers(), &self.policy) {
                Err(reply) => ("rejected", reply),
                Ok(route) => {
                    let label = route.metric_label();
                    (
                        label,
                        self.serve_route(
                            route,
                            req.method(),
                            req.headers(),
                            peer.ip().to_canonical(),
                        )
                        .await,
                    )
                }
            };
        self.metrics.request(
            label,
            reply.status.as_u16(),
            started.elapsed().as_secs_f64(),
        );
        to_response(reply)
    }

    async fn serve_route(
        &self,
        route: Route,
        method: &Method,
        headers: &http::HeaderMap,
        ip: IpAddr,
    ) -> Reply {
        let lookup = self.index.resolve(ip, self.pod_wait).await;
        self.metrics.lookup(lookup.metric_label());
        // A caller that is not exactly one pod of this node gets nothing: no session token, no
        // passthrough, no credentials.
        let Lookup::Found(pod) = lookup else {
            tracing::info!(source_ip = %ip, result = lookup.metric_label(), "caller not identified; refused");
            return match route {
                Route::IssueToken { .. } => Reply::status(StatusCode::FORBIDDEN),
                _ => Reply::not_found(),
            };
        };
        let now = self.clock.now();
        if let Route::IssueToken { ttl } = route {
            return match self.tokens.issue(&pod.uid, ttl, now) {
                Ok(t) => {
                    let mut r = Reply::ok(t);
                    r.headers.push((imds::TTL_HEADER, ttl.to_string()));
                    r
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot issue session token");
                    Reply::status(StatusCode::INTERNAL_SERVER_ERROR)
                }
            };
        }
        match imds::session_token(headers) {
            Some(t) if self.tokens.verify(t, &pod.uid, now).is_err() => {
                return Reply::status(StatusCode::UNAUTHORIZED);
            }
            Some(_) => {}
            None if self.v2_required => return Reply::status(StatusCode::UNAUTHORIZED),
            None => {}
        }
        if let Route::Upstream { path } = &route {
            return match self.upstream.get(path).await {
                Ok((status, body)) if status == StatusCode::OK => Reply::ok(body),
                Ok((status, _)) => Reply::status(status),
                Err(e) => {
                    tracing::warn!(error = %e, path = %path, "upstream imds failed");
                    Reply::status(StatusCode::BAD_GATEWAY)
                }
            };
        }
        let role = match self
            .roles
            .resolve(&pod.namespace, &pod.service_account)
            .await
        {
            Ok(Some(role)) => role,
            Ok(None) => return Reply::not_found(),
            Err(e) => {
                tracing::warn!(pod = %pod.name, namespace = %pod.namespace, error = %e, "cannot read service account");
                return Reply::status(StatusCode::INTERNAL_SERVER_ERROR);
            }
        };
        match route {
            Route::IamIndex => Reply::ok("info\nsecurity-credentials/"),
            Route::RoleList => Reply::ok(role.role_name().to_string()),
            Route::Info => Reply::ok(wire::info(&role.role_arn, now)),
            Route::Credentials { name } if name == role.role_name() => {
                if *method == Method::HEAD {
                    return Reply::ok(Bytes::new());
                }
                match self.creds.get(&pod, &role).await {
                    Ok(c) => {
                        tracing::info!(
                            target: "audit",
                            pod = %pod.name, namespace = %pod.namespace, service_account = %pod.service_account,
                            role = %role.role_arn, source_ip = %ip, access_key_id = %c.access_key_id,
                            expiration = %wire::timestamp(c.expiration), "credentials vended"
                        );
                        Reply::ok(wire::credentials(
                            &c.access_key_id,
                            c.secret_access_key.expose(),
                            c.session_token.expose(),
                            c.expiration,
                            c.issued_at,
                        ))
                    }
                    Err(IdentityError::PodGone { .. }) => Reply::not_found(),
                    Err(e) if !e.retryable() => {
                        Reply::ok(wire::assume_role_failure(&e.to_string(), now))
                    }
                    Err(_) => Reply::status(StatusCode::SERVICE_UNAVAILABLE),
                }
            }
            _ => Reply::not_found(),
        }
    }

    fn ops(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let (status, ctype, body) = match (req.method(), req.uri().path()) {
            (&Method::GET, "/healthz") => (StatusCode::OK, "text/plain", "ok\n".to_string()),
            (&Method::GET, "/readyz") if self.index.is_synced() => {
                (StatusCode::OK, "text/plain", "ready\n".to_string())
            }
            (&Method::GET, "/readyz") => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "pod index not synced\n".to_string(),
            ),
            (&Method::GET, "/metrics") => {
                self.metrics.set_pods(self.index.pod_count());
                (
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    self.metrics.encode(),
                )
            }
            _ => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found\n".to_string(),
            ),
        };
        Response::builder()
            .status(status)
            .header("content-type", ctype)
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
    }

    fn on_change(self: &Arc<Self>, change: Change) {
        match change {
            Change::Live(pod) => {
                let this = self.clone();
                tokio::spawn(async move { this.prefetch(pod).await });
            }
            Change::Gone(pod) => self.creds.evict_pod(&pod.uid),
        }
    }

    /// Warms the cache for a pod that just appeared, so its first request is a cache hit.
    async fn prefetch(&self, pod: Arc<PodInfo>) {
        match self
            .roles
            .resolve(&pod.namespace, &pod.service_account)
            .await
        {
            Ok(Some(role)) => {
                let _ = self.creds.get(&pod, &role).await;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(pod = %pod.name, error = %e, "prefetch: cannot read service account")
            }
        }
    }

    fn on_registration(self: &Arc<Self>, op: &Op, ok: bool) {
        self.metrics.registration(op.metric_label(), ok);
        if let (Op::Add(reg), true) = (op, ok) {
            let this = self.clone();
            let reg = reg.clone();
            tokio::spawn(async move { this.confirm(reg).await });
        }
    }

    /// Reads the registered pod straight from the API (the watch may lag by seconds), so the first
    /// request of a new pod is answered from the registration alone.
    async fn confirm(self: Arc<Self>, reg: crate::pods::Registration) {
        let api: Api<Pod> = Api::namespaced(self.kube.clone(), &reg.namespace);
        for attempt in 0..3u32 {
            match api.get_opt(&reg.name).await {
                Ok(Some(pod)) => {
                    let Some(info) = PodInfo::from_pod(&pod) else {
                        return;
                    };
                    if info.node_name.as_deref() != Some(self.node.as_str()) {
                        tracing::warn!(pod = %reg.name, namespace = %reg.namespace, "registered pod is not on this node; ignored");
                        return;
                    }
                    if info.host_network || info.terminal {
                        return;
                    }
                    let info = PodInfo {
                        ips: reg.ips.clone(),
                        ..info
                    };
                    if self.index.confirm(&reg.container_id, info.clone()) {
                        self.prefetch(Arc::new(info)).await;
                    }
                    return;
                }
                Ok(None) => {
                    tracing::warn!(pod = %reg.name, namespace = %reg.namespace, "registered pod not found in the API");
                    return;
                }
                Err(e) => {
                    tracing::debug!(error = %e, attempt, "cannot read registered pod; retrying");
                    tokio::time::sleep(Duration::from_millis(100 * 2u64.pow(attempt))).await;
                }
            }
        }
    }
}

/// Kubernetes Events on a pod whose role cannot be assumed, at most one per pod and reason
/// every few minutes.
struct EventSink {
    recorder: kube::runtime::events::Recorder,
    recent: moka::sync::Cache<(String, &'static str), ()>,
}

impl EventSink {
    fn new(client: kube::Client) -> Arc<Self> {
        let reporter = kube::runtime::events::Reporter {
            controller: "irsa-imds".into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Arc::new(EventSink {
            recorder: kube::runtime::events::Recorder::new(client, reporter),
            recent: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(300))
                .build(),
        })
    }

    fn role_failed(self: &Arc<Self>, pod: &PodInfo, role_arn: &str, e: &IdentityError) {
        let key = (pod.uid.clone(), e.metric_label());
        if self.recent.contains_key(&key) {
            return;
        }
        self.recent.insert(key, ());
        let reference = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(pod.name.clone()),
            namespace: Some(pod.namespace.clone()),
            uid: Some(pod.uid.clone()),
            ..Default::default()
        };
        let event = kube::runtime::events::Event {
            type_: kube::runtime::events::EventType::Warning,
            reason: "AssumeRoleFailed".into(),
            note: Some(
                format!("cannot assume {role_arn}: {e}")
                    .chars()
                    .take(1000)
                    .collect(),
            ),
            action: "AssumeRoleWithWebIdentity".into(),
            secondary: None,
        };
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(err) = this.recorder.publish(&event, &reference).await {
                tracing::debug!(error = %err, "cannot publish event");
            }
        });
    }
}
