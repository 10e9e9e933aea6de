//! One node for a simulated day on the injected clock: how many STS calls the credential cache
//! makes with the shipped defaults, per session scope, while SDK clients of each kind come back
//! for credentials when their sources say they do (docs/sts-economy.md).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use clap::Parser;
use futures::future::BoxFuture;
use irsa_imds_agent::Config;
use irsa_imds_agent::identity::{
    AssumeRequest, Clock, CredentialCache, Credentials, IdentityError, RoleExchange, RoleSource,
    RoleSpec, Secret, TokenMinter,
};
use irsa_imds_agent::pods::PodInfo;
use irsa_imds_agent::telemetry::Metrics;

const PODS: usize = 110;
const SERVICE_ACCOUNTS: usize = 30;
const DAY: Duration = Duration::from_secs(24 * 3600);
/// The background refresher's period (`REFRESH_SCAN`).
const STEP: Duration = Duration::from_secs(30);
/// Served sets keep at least this much (`MIN_SERVED_REMAINING`).
const MIN_SERVED: Duration = Duration::from_secs(30 * 60);

struct SimClock(Mutex<SystemTime>);
impl Clock for SimClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap()
    }
}

#[derive(Default)]
struct Minter(AtomicUsize);
impl TokenMinter for Minter {
    fn mint<'a>(
        &'a self,
        pod: &'a PodInfo,
        _: &'a str,
        _: i64,
    ) -> BoxFuture<'a, Result<Secret, IdentityError>> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move { Ok(Secret::new(format!("jwt-{}", pod.uid))) })
    }
}

struct Sts {
    clock: Arc<SimClock>,
    calls: AtomicUsize,
    sessions: Mutex<HashMap<String, usize>>,
}
impl RoleExchange for Sts {
    fn assume<'a>(
        &'a self,
        req: &'a AssumeRequest,
    ) -> BoxFuture<'a, Result<Credentials, IdentityError>> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        *self
            .sessions
            .lock()
            .unwrap()
            .entry(req.session_name.clone())
            .or_default() += 1;
        let now = self.clock.now();
        let d = Duration::from_secs(u64::try_from(req.duration_secs).unwrap());
        Box::pin(async move {
            Ok(Credentials {
                access_key_id: format!("ASIA{n:016}"),
                secret_access_key: Secret::new("s"),
                session_token: Secret::new("t"),
                expiration: now + d,
                issued_at: now,
            })
        })
    }
}

/// When an SDK that holds a set asks for credentials again, from its source (see the doc).
#[derive(Clone, Copy, Debug)]
enum Sdk {
    /// botocore: advisory refresh 15 minutes before expiry.
    Botocore,
    /// Java v1: 15 minutes before expiry, or an hour after the last fetch.
    JavaV1,
    /// JavaScript v2: 15 seconds before expiry.
    JsV2,
    /// Go v1: 5 minutes before expiry.
    GoV1,
}

impl Sdk {
    fn next_ask(self, fetched: SystemTime, expiration: SystemTime) -> SystemTime {
        let m = |s| Duration::from_secs(s);
        match self {
            Sdk::Botocore => expiration - m(15 * 60),
            Sdk::JavaV1 => (expiration - m(15 * 60)).min(fetched + m(3600)),
            Sdk::JsV2 => expiration - m(15),
            Sdk::GoV1 => expiration - m(5 * 60),
        }
    }
}

struct Client {
    pod: Arc<PodInfo>,
    sdk: Sdk,
    ask_at: SystemTime,
}

fn pod(i: usize, generation: usize) -> Arc<PodInfo> {
    Arc::new(PodInfo {
        uid: format!("uid-{i}-{generation}"),
        namespace: "team".into(),
        name: format!("app-{i}-{generation}"),
        service_account: format!("sa-{}", i % SERVICE_ACCOUNTS),
        node_name: Some("node-1".into()),
        ips: vec![format!("10.0.{}.{}", i / 250, 1 + i % 250).parse().unwrap()],
        host_network: false,
        terminal: false,
        kube2iam_role: None,
    })
}

fn role(pod: &PodInfo) -> Arc<RoleSpec> {
    Arc::new(RoleSpec {
        role_arn: format!("arn:aws:iam::123456789012:role/{}", pod.service_account),
        audience: "sts.amazonaws.com".into(),
        token_expiration_secs: 600,
        regional_sts: true,
        source: RoleSource::ServiceAccount,
    })
}

struct Day {
    calls: usize,
    token_requests: usize,
    sessions: usize,
    served_below_min: usize,
}

/// Runs the day: every `STEP` the refresher scans, clients whose time has come ask, and once an
/// hour a pod is replaced by a new one (a rollout's pace).
async fn simulate(scope: &str) -> Day {
    let cfg = Config::try_parse_from([
        "irsa-imds-agent",
        "--node-name",
        "node-1",
        "--session-scope",
        scope,
    ])
    .unwrap()
    .validate()
    .unwrap();
    let clock = Arc::new(SimClock(Mutex::new(
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
    )));
    let minter = Arc::new(Minter::default());
    let sts = Arc::new(Sts {
        clock: clock.clone(),
        calls: AtomicUsize::new(0),
        sessions: Mutex::new(HashMap::new()),
    });
    let cache = Arc::new(CredentialCache::new(
        minter.clone(),
        sts.clone(),
        clock.clone(),
        cfg.cache_settings(),
        Arc::new(Metrics::new()),
    ));
    let start = clock.now();
    let kinds = [Sdk::Botocore, Sdk::JavaV1, Sdk::JsV2, Sdk::GoV1];
    let mut clients: Vec<Client> = (0..PODS)
        .map(|i| Client {
            pod: pod(i, 0),
            sdk: kinds[i % kinds.len()],
            ask_at: start,
        })
        .collect();
    let mut served_below_min = 0;
    let mut step = 0u64;
    while clock.now() < start + DAY {
        step += 1;
        *clock.0.lock().unwrap() += STEP;
        let now = clock.now();
        if step.is_multiple_of(120) {
            // A rollout replaces one pod an hour: its successor's SDK asks at once.
            let i = (step / 120) as usize % PODS;
            cache.evict_pod(&clients[i].pod.uid);
            clients[i].pod = pod(i, step as usize);
            clients[i].ask_at = now;
        }
        cache.refresh_due().await;
        for c in clients.iter_mut().filter(|c| c.ask_at <= now) {
            let creds = cache.get(&c.pod, &role(&c.pod)).await.unwrap();
            let left = creds.expiration.duration_since(now).unwrap_or_default();
            if left < MIN_SERVED {
                served_below_min += 1;
            }
            c.ask_at = c.sdk.next_ask(now, creds.expiration);
        }
    }
    let sessions = sts.sessions.lock().unwrap().len();
    Day {
        calls: sts.calls.load(Ordering::SeqCst),
        token_requests: minter.0.load(Ordering::SeqCst),
        sessions,
        served_below_min,
    }
}

#[tokio::test(start_paused = true)]
async fn per_pod_scope_costs_at_most_one_and_a_half_calls_per_pod_hour() {
    let day = simulate("pod").await;
    let bound = PODS as f64 * 1.5 * 24.0;
    println!(
        "pod scope: {} STS calls, {} TokenRequests in a day for {PODS} pods ({:.2} per pod-hour; bound {bound})",
        day.calls,
        day.token_requests,
        day.calls as f64 / PODS as f64 / 24.0
    );
    assert!(day.calls as f64 <= bound, "{} calls > {bound}", day.calls);
    assert_eq!(
        day.token_requests, day.calls,
        "one bound token per exchange"
    );
    assert!(
        day.sessions >= PODS,
        "each pod has its own session: {}",
        day.sessions
    );
    assert_eq!(day.served_below_min, 0, "served sets keep 30 minutes");
}

#[tokio::test(start_paused = true)]
async fn service_account_scope_costs_at_most_one_and_a_half_calls_per_account_hour() {
    let day = simulate("service-account").await;
    let bound = SERVICE_ACCOUNTS as f64 * 1.5 * 24.0;
    println!(
        "service-account scope: {} STS calls in a day for {SERVICE_ACCOUNTS} ServiceAccounts ({:.2} per account-hour; bound {bound})",
        day.calls,
        day.calls as f64 / SERVICE_ACCOUNTS as f64 / 24.0
    );
    assert!(day.calls as f64 <= bound, "{} calls > {bound}", day.calls);
    assert_eq!(
        day.sessions, SERVICE_ACCOUNTS,
        "one session name per ServiceAccount on the node"
    );
    assert_eq!(day.served_below_min, 0, "served sets keep 30 minutes");
}
