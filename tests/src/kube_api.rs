//! An HTTP-level emulator of the parts of the Kubernetes API the agent uses, for kube-rs to talk
//! to over real HTTP: pod list/watch (resourceVersion, bookmarks, 410 Gone, field selectors,
//! pagination), pod and ServiceAccount reads, graceful pod deletion (a Terminating window in which
//! the old pod keeps its IP), TokenRequest returning RS256 JWTs with the IRSA claims (audience
//! defaulting, expiration validation and clamp as the API server does), the issuer's OIDC discovery
//! document and JWKS, Events; plus fault injection (watch delay, watch expiry, failing or slow
//! TokenRequests, failing lists) and counters for assertions.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use bytes::Bytes;
use futures::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestStatus};
use k8s_openapi::api::core::v1::{
    Container, Namespace, Pod, PodIP, PodSpec, PodStatus, ServiceAccount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::jwt::Issuer;
use crate::util::StopOnDrop;

/// Watch events kept for resuming watches; an older resourceVersion gets 410 Gone.
const HISTORY: usize = 20_000;
const BOOKMARK_EVERY: Duration = Duration::from_secs(1);
const MAX_BODY: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub status: u16,
    /// How many requests fail; `None` = until cleared.
    pub remaining: Option<u32>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Pod list requests, injected failures included.
    pub pod_list_attempts: u64,
    pub pod_lists: u64,
    pub pod_watches: u64,
    pub pod_gets: u64,
    /// Pod lists/watches without a `spec.nodeName=` field selector.
    pub cluster_wide_pod_requests: u64,
    pub sa_gets: u64,
    pub token_requests: u64,
    pub events_created: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequestRecord {
    pub namespace: String,
    pub service_account: String,
    pub audiences: Vec<String>,
    pub expiration_seconds: i64,
    pub bound_pod_name: String,
    pub bound_pod_uid: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord {
    pub namespace: String,
    pub reason: String,
    pub message: String,
    pub involved_name: String,
    pub type_: String,
}

#[derive(Clone)]
struct WatchEvent {
    rv: u64,
    kind: &'static str,
    pod: Arc<Pod>,
    /// When watchers may see it: the event's time plus the injected watch delay.
    deliver_at: tokio::time::Instant,
}

#[derive(Default)]
struct World {
    rv: u64,
    uid_seq: u64,
    pods: BTreeMap<(String, String), Pod>,
    sas: BTreeMap<(String, String), ServiceAccount>,
    /// Namespaces the test declared (only their annotations matter to the agent).
    namespaces: BTreeMap<String, Namespace>,
    history: VecDeque<WatchEvent>,
    /// Watches starting from a resourceVersion below this get 410.
    expired_below: u64,
    token_requests: Vec<TokenRequestRecord>,
    events: Vec<EventRecord>,
    token_fault: Option<Fault>,
    list_fault: Option<Fault>,
    token_latency: Duration,
    watch_delay: Duration,
    /// `--service-account-max-token-expiration`: longer requests are clamped to it.
    max_token_expiration: Option<Duration>,
}

struct Inner {
    world: Mutex<World>,
    events: broadcast::Sender<WatchEvent>,
    expiry: tokio::sync::watch::Sender<u64>,
    issuer: Arc<Issuer>,
    counters: [AtomicU64; 8],
    /// The highest resourceVersion any watch stream has sent.
    delivered: AtomicU64,
    addr: SocketAddr,
    stop: CancellationToken,
}

/// The emulated API server. Clones share one server; it stops when the last clone drops.
#[derive(Clone)]
pub struct KubeApi {
    inner: Arc<Inner>,
    _guard: Arc<StopOnDrop>,
}

fn lock(m: &Mutex<World>) -> MutexGuard<'_, World> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

enum C {
    PodListAttempts,
    PodLists,
    PodWatches,
    PodGets,
    ClusterWide,
    SaGets,
    TokenRequests,
    Events,
}

impl KubeApi {
    pub async fn start() -> anyhow::Result<KubeApi> {
        Self::start_on(std::net::TcpListener::bind("127.0.0.1:0")?).await
    }

    /// Signs with the process-wide test-bed issuer ([`Issuer::testbed`]).
    pub async fn start_on(listener: std::net::TcpListener) -> anyhow::Result<KubeApi> {
        Self::start_with_issuer(listener, Issuer::testbed()).await
    }

    /// Signs ServiceAccount tokens with `issuer`'s key and serves its discovery document and JWKS
    /// at `/.well-known/openid-configuration` and `/openid/v1/jwks`.
    pub async fn start_with_issuer(
        listener: std::net::TcpListener,
        issuer: Arc<Issuer>,
    ) -> anyhow::Result<KubeApi> {
        let listener = crate::util::tokio_listener(listener)?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let inner = Arc::new(Inner {
            world: Mutex::new(World {
                rv: 1000,
                ..Default::default()
            }),
            events: broadcast::channel(65_536).0,
            expiry: tokio::sync::watch::channel(0).0,
            issuer,
            counters: Default::default(),
            delivered: AtomicU64::new(0),
            addr,
            stop: stop.clone(),
        });
        let srv = inner.clone();
        crate::util::serve(listener, stop.clone(), move |req| srv.clone().route(req));
        Ok(KubeApi {
            inner,
            _guard: Arc::new(StopOnDrop(stop)),
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    /// The issuer whose key signs this server's ServiceAccount tokens.
    pub fn issuer(&self) -> Arc<Issuer> {
        self.inner.issuer.clone()
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    pub fn client(&self) -> kube::Client {
        // Building a kube client needs the process-wide rustls provider, even for plain http.
        crate::harness::install_crypto();
        let uri: http::Uri = self.url().parse().expect("emulator url is a valid URI");
        let mut cfg = kube::Config::new(uri);
        cfg.default_namespace = "default".into();
        kube::Client::try_from(cfg).expect("kube client for the emulator")
    }

    pub fn write_kubeconfig(&self, path: &std::path::Path) -> anyhow::Result<()> {
        let kc = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: testbed\n  cluster:\n    server: {}\ncontexts:\n- name: testbed\n  context:\n    cluster: testbed\n    user: testbed\n    namespace: default\ncurrent-context: testbed\nusers:\n- name: testbed\n  user: {{}}\n",
            self.url()
        );
        std::fs::write(path, kc).with_context(|| format!("writing {}", path.display()))
    }

    pub fn apply_service_account(&self, ns: &str, name: &str, annotations: &[(&str, &str)]) {
        let mut w = lock(&self.inner.world);
        w.rv += 1;
        w.uid_seq += 1;
        let rv = w.rv;
        let uid = format!("sa-uid-{}", w.uid_seq);
        let sa = ServiceAccount {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                uid: Some(uid),
                resource_version: Some(rv.to_string()),
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            ..Default::default()
        };
        w.sas.insert((ns.into(), name.into()), sa);
    }

    /// Creates or replaces Namespace `name` with `annotations` (kube2iam's allowed-roles).
    pub fn apply_namespace(&self, name: &str, annotations: &[(&str, &str)]) {
        let mut w = lock(&self.inner.world);
        w.rv += 1;
        let rv = w.rv;
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                uid: Some(format!("ns-uid-{name}")),
                resource_version: Some(rv.to_string()),
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            ..Default::default()
        };
        w.namespaces.insert(name.into(), ns);
    }

    pub fn delete_service_account(&self, ns: &str, name: &str) {
        lock(&self.inner.world)
            .sas
            .remove(&(ns.to_string(), name.to_string()));
    }

    pub fn create_pod(&self, mut pod: Pod) -> Pod {
        let mut w = lock(&self.inner.world);
        w.rv += 1;
        w.uid_seq += 1;
        let rv = w.rv;
        let md = &mut pod.metadata;
        if md.uid.is_none() {
            md.uid = Some(format!("pod-uid-{:08}", w.uid_seq));
        }
        md.namespace.get_or_insert_with(|| "default".into());
        md.resource_version = Some(rv.to_string());
        md.creation_timestamp = Some(now_time());
        let key = (
            md.namespace.clone().unwrap_or_default(),
            md.name.clone().unwrap_or_default(),
        );
        w.pods.insert(key, pod.clone());
        self.inner.emit(&mut w, "ADDED", pod.clone());
        pod
    }

    pub fn update_pod(&self, ns: &str, name: &str, f: impl FnOnce(&mut Pod)) {
        let mut w = lock(&self.inner.world);
        w.rv += 1;
        let rv = w.rv;
        let Some(p) = w.pods.get_mut(&(ns.to_string(), name.to_string())) else {
            return;
        };
        f(p);
        p.metadata.resource_version = Some(rv.to_string());
        let p = p.clone();
        self.inner.emit(&mut w, "MODIFIED", p);
    }

    /// Graceful deletion as the API server does it for `kubectl delete pod`: the pod gets a
    /// `deletionTimestamp` (now + `grace`) and `deletionGracePeriodSeconds` and stays, Terminating
    /// and still showing its IPs, until the kubelet confirms ([`delete_pod`](Self::delete_pod)) or
    /// the grace period runs out (then it is removed). Returns false if there is no such pod.
    pub fn terminate_pod(&self, ns: &str, name: &str, grace: Duration) -> bool {
        let key = (ns.to_string(), name.to_string());
        let uid = {
            let mut w = lock(&self.inner.world);
            w.rv += 1;
            let rv = w.rv;
            let Some(p) = w.pods.get_mut(&key) else {
                return false;
            };
            if p.metadata.deletion_timestamp.is_none() {
                let at = SystemTime::now() + grace;
                p.metadata.deletion_timestamp = Some(time_at(at));
                p.metadata.deletion_grace_period_seconds = Some(grace.as_secs() as i64);
            }
            p.metadata.resource_version = Some(rv.to_string());
            let p = p.clone();
            let uid = p.metadata.uid.clone();
            self.inner.emit(&mut w, "MODIFIED", p);
            uid
        };
        let api = self.clone();
        let stop = self.inner.stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(grace) => {
                    // Only the pod this call terminated (a new pod may have the name by now).
                    if api.get_pod(&key.0, &key.1).is_some_and(|p| p.metadata.uid == uid) {
                        api.delete_pod(&key.0, &key.1);
                    }
                }
            }
        });
        true
    }

    /// Removes the pod at once (grace period 0: the kubelet confirmed the containers are gone).
    pub fn delete_pod(&self, ns: &str, name: &str) -> Option<Pod> {
        let mut w = lock(&self.inner.world);
        let mut p = w.pods.remove(&(ns.to_string(), name.to_string()))?;
        w.rv += 1;
        p.metadata.resource_version = Some(w.rv.to_string());
        self.inner.emit(&mut w, "DELETED", p.clone());
        Some(p)
    }

    pub fn get_pod(&self, ns: &str, name: &str) -> Option<Pod> {
        lock(&self.inner.world)
            .pods
            .get(&(ns.to_string(), name.to_string()))
            .cloned()
    }

    pub fn set_watch_delay(&self, d: Duration) {
        lock(&self.inner.world).watch_delay = d;
    }

    /// Every open watch gets a 410 ERROR event and closes; resuming from any resourceVersion seen
    /// so far gets 410 too, so clients relist.
    pub fn expire_watches(&self) {
        let mut w = lock(&self.inner.world);
        w.rv += 1;
        w.expired_below = w.rv;
        w.history.clear();
        self.inner.expiry.send_modify(|g| *g += 1);
    }

    pub fn set_token_fault(&self, f: Option<Fault>) {
        lock(&self.inner.world).token_fault = f;
    }

    pub fn set_token_latency(&self, d: Duration) {
        lock(&self.inner.world).token_latency = d;
    }

    /// `--service-account-max-token-expiration`: TokenRequests asking for longer get this.
    pub fn set_max_token_expiration(&self, d: Option<Duration>) {
        lock(&self.inner.world).max_token_expiration = d;
    }

    pub fn set_list_fault(&self, f: Option<Fault>) {
        lock(&self.inner.world).list_fault = f;
    }

    /// The current resourceVersion (that of the last change).
    pub fn resource_version(&self) -> u64 {
        lock(&self.inner.world).rv
    }

    /// The highest resourceVersion a watch stream has written to a client (events of every
    /// watch, after the injected watch delay): tells a test that the watcher has been sent a change.
    pub fn watch_delivered(&self) -> u64 {
        self.inner.delivered.load(Ordering::SeqCst)
    }

    pub fn counters(&self) -> Counters {
        let c = |i: C| self.inner.counters[i as usize].load(Ordering::SeqCst);
        Counters {
            pod_list_attempts: c(C::PodListAttempts),
            pod_lists: c(C::PodLists),
            pod_watches: c(C::PodWatches),
            pod_gets: c(C::PodGets),
            cluster_wide_pod_requests: c(C::ClusterWide),
            sa_gets: c(C::SaGets),
            token_requests: c(C::TokenRequests),
            events_created: c(C::Events),
        }
    }

    pub fn token_requests(&self) -> Vec<TokenRequestRecord> {
        lock(&self.inner.world).token_requests.clone()
    }

    pub fn events(&self) -> Vec<EventRecord> {
        lock(&self.inner.world).events.clone()
    }
}

/// A Running pod on `node` with the given IPs (none: the sandbox has no IP yet).
pub fn pod(ns: &str, name: &str, node: &str, sa: &str, ips: &[&str]) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            service_account_name: Some(sa.into()),
            containers: vec![Container {
                name: "app".into(),
                image: Some("app:1".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some(if ips.is_empty() { "Pending" } else { "Running" }.into()),
            pod_ip: ips.first().map(|s| s.to_string()),
            pod_ips: if ips.is_empty() {
                None
            } else {
                Some(ips.iter().map(|ip| PodIP { ip: ip.to_string() }).collect())
            },
            ..Default::default()
        }),
    }
}

fn now_time() -> Time {
    time_at(SystemTime::now())
}

fn time_at(t: SystemTime) -> Time {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Time(
        k8s_openapi::jiff::Timestamp::from_second(secs)
            .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    )
}

type Body = BoxBody<Bytes, Infallible>;

fn full(status: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

fn status(code: u16, reason: &str, message: &str) -> Response<Body> {
    let v = json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":message,"reason":reason,"code":code});
    full(
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &v,
    )
}

fn take_fault(f: &mut Option<Fault>) -> Option<u16> {
    let fault = (*f)?;
    match fault.remaining {
        Some(0) => {
            *f = None;
            None
        }
        Some(n) => {
            *f = (n > 1).then_some(Fault {
                remaining: Some(n - 1),
                ..fault
            });
            Some(fault.status)
        }
        None => Some(fault.status),
    }
}

/// One `k=v` / `k==v` / `k!=v` term of a field selector.
struct Term {
    field: String,
    value: String,
    equal: bool,
}

fn parse_selector(s: &str) -> Result<Vec<Term>, String> {
    let mut out = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (field, value, equal) = if let Some((k, v)) = part.split_once("!=") {
            (k, v, false)
        } else if let Some((k, v)) = part.split_once("==") {
            (k, v, true)
        } else if let Some((k, v)) = part.split_once('=') {
            (k, v, true)
        } else {
            return Err(format!("invalid field selector term {part:?}"));
        };
        if ![
            "spec.nodeName",
            "metadata.name",
            "metadata.namespace",
            "status.phase",
        ]
        .contains(&field)
        {
            return Err(format!("field label not supported: {field}"));
        }
        out.push(Term {
            field: field.into(),
            value: value.into(),
            equal,
        });
    }
    Ok(out)
}

fn matches(p: &Pod, ns: Option<&str>, terms: &[Term]) -> bool {
    if ns.is_some_and(|ns| p.metadata.namespace.as_deref() != Some(ns)) {
        return false;
    }
    terms.iter().all(|t| {
        let v = match t.field.as_str() {
            "spec.nodeName" => p.spec.as_ref().and_then(|s| s.node_name.clone()),
            "metadata.name" => p.metadata.name.clone(),
            "metadata.namespace" => p.metadata.namespace.clone(),
            _ => p.status.as_ref().and_then(|s| s.phase.clone()),
        }
        .unwrap_or_default();
        (v == t.value) == t.equal
    })
}

impl Inner {
    fn count(&self, c: C) {
        self.counters[c as usize].fetch_add(1, Ordering::SeqCst);
    }

    fn emit(&self, w: &mut World, kind: &'static str, pod: Pod) {
        let ev = WatchEvent {
            rv: w.rv,
            kind,
            pod: Arc::new(pod),
            deliver_at: tokio::time::Instant::now() + w.watch_delay,
        };
        w.history.push_back(ev.clone());
        while w.history.len() > HISTORY {
            w.history.pop_front();
        }
        let _ = self.events.send(ev);
    }

    async fn route(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let query: BTreeMap<String, String> =
            form_urlencoded_pairs(req.uri().query().unwrap_or(""))
                .into_iter()
                .collect();
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (&method, segs.as_slice()) {
            (&Method::GET, ["version"]) => full(
                StatusCode::OK,
                &json!({"major":"1","minor":"33","gitVersion":"v1.33.0-testbed"}),
            ),
            (&Method::GET, [".well-known", "openid-configuration"]) => full(
                StatusCode::OK,
                &self
                    .issuer
                    .discovery_json(&format!("http://{}/openid/v1/jwks", self.addr)),
            ),
            (&Method::GET, ["openid", "v1", "jwks"]) => {
                full(StatusCode::OK, &self.issuer.jwks_json())
            }
            (&Method::GET, ["api", "v1", "pods"]) => self.pods(None, &query).await,
            (&Method::GET, ["api", "v1", "namespaces", ns, "pods"]) => {
                self.pods(Some(ns), &query).await
            }
            (&Method::GET, ["api", "v1", "namespaces", ns, "pods", name]) => {
                self.count(C::PodGets);
                match lock(&self.world)
                    .pods
                    .get(&(ns.to_string(), name.to_string()))
                {
                    Some(p) => full(StatusCode::OK, &serde_json::to_value(p).unwrap_or_default()),
                    None => status(404, "NotFound", &format!("pods \"{name}\" not found")),
                }
            }
            (&Method::GET, ["api", "v1", "namespaces", name]) => {
                match lock(&self.world).namespaces.get(*name) {
                    Some(ns) => full(
                        StatusCode::OK,
                        &serde_json::to_value(ns).unwrap_or_default(),
                    ),
                    None => status(404, "NotFound", &format!("namespaces \"{name}\" not found")),
                }
            }
            (&Method::GET, ["api", "v1", "namespaces", ns, "serviceaccounts", name]) => {
                self.count(C::SaGets);
                match lock(&self.world)
                    .sas
                    .get(&(ns.to_string(), name.to_string()))
                {
                    Some(sa) => full(
                        StatusCode::OK,
                        &serde_json::to_value(sa).unwrap_or_default(),
                    ),
                    None => status(
                        404,
                        "NotFound",
                        &format!("serviceaccounts \"{name}\" not found"),
                    ),
                }
            }
            (
                &Method::POST,
                [
                    "api",
                    "v1",
                    "namespaces",
                    ns,
                    "serviceaccounts",
                    name,
                    "token",
                ],
            ) => {
                let (ns, name) = (ns.to_string(), name.to_string());
                match read_json(req).await {
                    Ok(body) => self.token(&ns, &name, body).await,
                    Err(r) => r,
                }
            }
            (&Method::POST, ["api", "v1", "namespaces", ns, "events"])
            | (&Method::POST, ["apis", "events.k8s.io", "v1", "namespaces", ns, "events"]) => {
                let ns = ns.to_string();
                match read_json(req).await {
                    Ok(body) => {
                        self.count(C::Events);
                        let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
                        let involved = if body["regarding"].is_object() {
                            &body["regarding"]
                        } else {
                            &body["involvedObject"]
                        };
                        let message = if body["note"].is_string() {
                            &body["note"]
                        } else {
                            &body["message"]
                        };
                        lock(&self.world).events.push(EventRecord {
                            namespace: ns,
                            reason: s(&body["reason"]),
                            message: s(message),
                            involved_name: s(&involved["name"]),
                            type_: s(&body["type"]),
                        });
                        full(StatusCode::CREATED, &body)
                    }
                    Err(r) => r,
                }
            }
            (_, ["api", ..]) | (_, ["apis", ..]) => status(
                404,
                "NotFound",
                &format!("the server could not find {method} {path}"),
            ),
            _ => status(404, "NotFound", "not found"),
        }
    }

    async fn pods(
        self: Arc<Self>,
        ns: Option<&str>,
        q: &BTreeMap<String, String>,
    ) -> Response<Body> {
        let fs = q.get("fieldSelector").map(String::as_str).unwrap_or("");
        let terms = match parse_selector(fs) {
            Ok(t) => t,
            Err(e) => return status(400, "BadRequest", &e),
        };
        if !terms.iter().any(|t| t.field == "spec.nodeName" && t.equal) {
            self.count(C::ClusterWide);
        }
        let watch = matches!(q.get("watch").map(String::as_str), Some("true" | "1"));
        if !watch {
            self.count(C::PodListAttempts);
        }
        if let Some(code) = take_fault(&mut lock(&self.world).list_fault) {
            return status(code, "InternalError", "injected list fault");
        }
        if watch {
            self.count(C::PodWatches);
            return self.watch(ns.map(String::from), terms, q);
        }
        self.count(C::PodLists);
        let limit: usize = q
            .get("limit")
            .and_then(|l| l.parse().ok())
            .filter(|l| *l > 0)
            .unwrap_or(usize::MAX);
        let w = lock(&self.world);
        let (list_rv, offset) = match q.get("continue").and_then(|c| c.split_once(':')) {
            Some((rv, off)) => (rv.parse().unwrap_or(w.rv), off.parse().unwrap_or(0)),
            None => (w.rv, 0usize),
        };
        let all: Vec<&Pod> = w.pods.values().filter(|p| matches(p, ns, &terms)).collect();
        let page: Vec<Value> = all
            .iter()
            .skip(offset)
            .take(limit)
            .map(|p| serde_json::to_value(p).unwrap_or_default())
            .collect();
        let next = offset + page.len();
        let mut meta = json!({"resourceVersion": list_rv.to_string()});
        if next < all.len() {
            meta["continue"] = json!(format!("{list_rv}:{next}"));
        }
        full(
            StatusCode::OK,
            &json!({"kind":"PodList","apiVersion":"v1","metadata":meta,"items":page}),
        )
    }

    fn watch(
        self: Arc<Self>,
        ns: Option<String>,
        terms: Vec<Term>,
        q: &BTreeMap<String, String>,
    ) -> Response<Body> {
        let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
        let timeout = Duration::from_secs(
            q.get("timeoutSeconds")
                .and_then(|t| t.parse().ok())
                .unwrap_or(290)
                .min(3600),
        );
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1024);
        let (replay, mut live, from, gone) = {
            let w = lock(&self.world);
            let from: u64 = q
                .get("resourceVersion")
                .and_then(|r| r.parse().ok())
                .unwrap_or(w.rv);
            let oldest = w.history.front().map(|e| e.rv).unwrap_or(w.rv + 1);
            let gone = from < w.expired_below || (from + 1 < oldest && from < w.rv);
            let live = self.events.subscribe();
            let replay: Vec<WatchEvent> =
                w.history.iter().filter(|e| e.rv > from).cloned().collect();
            (replay, live, from, gone)
        };
        let mut expiry = self.expiry.subscribe();
        expiry.borrow_and_update();
        let stop = self.stop.clone();
        let inner = self.clone();
        tokio::spawn(async move {
            let line = |v: Value| {
                let mut b = v.to_string().into_bytes();
                b.push(b'\n');
                Bytes::from(b)
            };
            let gone_event = line(
                json!({"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"too old resource version","reason":"Expired","code":410}}),
            );
            if gone {
                let _ = tx.send(gone_event).await;
                return;
            }
            let deadline = tokio::time::Instant::now() + timeout;
            let mut last = from;
            let send = |ev: &WatchEvent, last: &mut u64| {
                *last = ev.rv;
                matches(&ev.pod, ns.as_deref(), &terms)
                    .then(|| line(json!({"type": ev.kind, "object": serde_json::to_value(&*ev.pod).unwrap_or_default()})))
            };
            for ev in replay {
                if let Some(b) = send(&ev, &mut last)
                    && tx.send(b).await.is_err()
                {
                    return;
                }
            }
            let mut bookmark = tokio::time::interval(BOOKMARK_EVERY);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep_until(deadline) => return,
                    _ = expiry.changed() => { let _ = tx.send(gone_event).await; return; }
                    _ = bookmark.tick(), if bookmarks => {
                        let b = line(json!({"type":"BOOKMARK","object":{"kind":"Pod","apiVersion":"v1","metadata":{"resourceVersion": last.to_string()}}}));
                        if tx.send(b).await.is_err() { return; }
                    }
                    ev = live.recv() => match ev {
                        Ok(ev) if ev.rv <= last => {}
                        Ok(ev) => {
                            // Injected lag: each event reaches watchers the watch delay after it happened.
                            tokio::time::sleep_until(ev.deliver_at).await;
                            if let Some(b) = send(&ev, &mut last) && tx.send(b).await.is_err() { return; }
                            inner.delivered.fetch_max(ev.rv, Ordering::SeqCst);
                        }
                        // Fell behind the broadcast: end the stream so the client resumes or relists.
                        Err(_) => return,
                    }
                }
            }
        });
        let stream = tokio_stream_from(rx).map(|b| Ok::<_, Infallible>(Frame::data(b)));
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(BodyExt::boxed(StreamBody::new(stream)))
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
    }

    async fn token(&self, ns: &str, sa_name: &str, body: Value) -> Response<Body> {
        self.count(C::TokenRequests);
        let (fault, latency) = {
            let mut w = lock(&self.world);
            (take_fault(&mut w.token_fault), w.token_latency)
        };
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        if let Some(code) = fault {
            return status(code, "InternalError", "injected token fault");
        }
        let mut tr: TokenRequest = match serde_json::from_value(body) {
            Ok(t) => t,
            Err(e) => return status(400, "BadRequest", &format!("invalid TokenRequest: {e}")),
        };
        // Defaulting, validation and clamping as the API server does them: no expiration means
        // one hour; under 10 minutes or over 2^32 s is invalid (422); over the server's
        // --service-account-max-token-expiration is cut down to it; no audiences means the API
        // server's own (--api-audiences, which default to the issuer).
        let requested = tr.spec.expiration_seconds.unwrap_or(3600);
        if requested < 600 {
            return status(
                422,
                "Invalid",
                "spec.expirationSeconds: Invalid value: may not specify a duration less than 10 minutes",
            );
        }
        if requested > 1 << 32 {
            return status(
                422,
                "Invalid",
                "spec.expirationSeconds: Invalid value: may not specify a duration larger than 2^32 seconds",
            );
        }
        let w = lock(&self.world);
        let exp = match w.max_token_expiration {
            Some(max) => requested.min(max.as_secs() as i64),
            None => requested,
        };
        tr.spec.expiration_seconds = Some(exp);
        if tr.spec.audiences.is_empty() {
            tr.spec.audiences = vec![self.issuer.url().to_string()];
        }
        let Some(sa) = w.sas.get(&(ns.to_string(), sa_name.to_string())) else {
            return status(
                404,
                "NotFound",
                &format!("serviceaccounts \"{sa_name}\" not found"),
            );
        };
        let Some(bound) = tr.spec.bound_object_ref.as_ref() else {
            return status(400, "BadRequest", "this test bed requires boundObjectRef");
        };
        if bound.kind.as_deref() != Some("Pod") {
            return status(400, "BadRequest", "boundObjectRef.kind must be Pod");
        }
        let pod_name = bound.name.clone().unwrap_or_default();
        let Some(pod) = w.pods.get(&(ns.to_string(), pod_name.clone())) else {
            return status(404, "NotFound", &format!("pods \"{pod_name}\" not found"));
        };
        let pod_uid = pod.metadata.uid.clone().unwrap_or_default();
        if bound.uid.as_deref() != Some(pod_uid.as_str()) {
            return status(
                409,
                "Conflict",
                &format!(
                    "the UID in the bound object reference ({}) does not match the UID in record",
                    bound.uid.clone().unwrap_or_default()
                ),
            );
        }
        let pod_sa = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into());
        if pod_sa != sa_name {
            return status(
                400,
                "BadRequest",
                &format!(
                    "cannot bind token for serviceaccount \"{sa_name}\" to pod running with different serviceaccount name."
                ),
            );
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let claims = json!({
            "iss": self.issuer.url(),
            "sub": format!("system:serviceaccount:{ns}:{sa_name}"),
            "aud": tr.spec.audiences,
            "exp": now + exp, "iat": now, "nbf": now,
            "kubernetes.io": {
                "namespace": ns,
                "pod": {"name": pod_name, "uid": pod_uid},
                "serviceaccount": {"name": sa_name, "uid": sa.metadata.uid.clone().unwrap_or_default()},
            },
        });
        drop(w);
        let token = match self.issuer.sign(&claims) {
            Ok(t) => t,
            Err(e) => return status(500, "InternalError", &format!("signing: {e}")),
        };
        lock(&self.world).token_requests.push(TokenRequestRecord {
            namespace: ns.into(),
            service_account: sa_name.into(),
            audiences: tr.spec.audiences.clone(),
            expiration_seconds: exp,
            bound_pod_name: pod_name,
            bound_pod_uid: pod_uid,
        });
        let exp_time = Time(
            k8s_openapi::jiff::Timestamp::from_second(now + exp)
                .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        );
        let out = TokenRequest {
            metadata: ObjectMeta {
                name: Some(sa_name.into()),
                namespace: Some(ns.into()),
                ..Default::default()
            },
            spec: tr.spec,
            status: Some(TokenRequestStatus {
                token,
                expiration_timestamp: exp_time,
            }),
        };
        full(
            StatusCode::CREATED,
            &serde_json::to_value(&out).unwrap_or_default(),
        )
    }
}

async fn read_json(req: Request<Incoming>) -> Result<Value, Response<Body>> {
    let bytes = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|_| status(413, "RequestEntityTooLarge", "body too large or unreadable"))?
        .to_bytes();
    serde_json::from_slice(&bytes)
        .map_err(|e| status(400, "BadRequest", &format!("invalid JSON: {e}")))
}

fn form_urlencoded_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push(h * 16 + l);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Bytes>,
) -> impl futures::Stream<Item = Bytes> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
