//! The credential cache: keyed by (session owner, role ARN), single-flight, refreshed ahead of
//! expiry. The owner is the pod (`--session-scope pod`) or its ServiceAccount on this node
//! (`service-account`: one session shared by that account's pods here).
//!
//! - One slot per key (moka), dropped with its pod; requests find it through a lock-free index.
//!   A slot's fetch lock makes N concurrent misses cost one TokenRequest and one STS call.
//! - Served credentials keep at least [`MIN_SERVED_REMAINING`]; a set is renewed in the
//!   background once it has less than its refresh point left: `refresh_at_remaining` minus a
//!   random part of [`REFRESH_SPREAD`], drawn per set so renewals do not align. Failures back off
//!   with jitter. Why these numbers: docs/sts-economy.md.
//! - Exchanges start at a bounded rate; a request waiting for its pod's first credentials goes
//!   ahead of queued prefetches and background renewals, which never hold a slot while queued.
//! - While STS is down, unexpired credentials are served down to [`EXPIRY_SKEW`]; never expired ones.
//! - Refusals (AccessDenied, a bad trust policy) are remembered for `negative_ttl`, not hammered.
//!
//! The numbers are in [`super::freshness`].

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;

use super::freshness::{
    EXPIRY_SKEW, MIN_SERVED_REMAINING, REFRESH_BACKOFF_BASE, REFRESH_BACKOFF_MAX, REFRESH_SPREAD,
    SHORT_SESSION_GRACE,
};
use super::{
    AssumeRequest, Clock, Credentials, IdentityError, RoleExchange, RoleSpec, TokenMinter,
    outcome_label, session_name, sts_code_label,
};
use crate::pods::PodInfo;
use crate::telemetry::Metrics;

/// Retries of one exchange before the error is reported (the request is waiting).
const MAX_ATTEMPTS: u32 = 3;
const RETRY_BASE: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct CacheSettings {
    pub duration: Duration,
    pub refresh_at_remaining: Duration,
    pub max_concurrent: usize,
    pub rate_per_sec: u32,
    pub negative_ttl: Duration,
    pub scope: SessionScope,
    /// This node's name: part of the session name in `service-account` scope.
    pub node: String,
}

/// Whose STS session a pod's credentials come from (docs/sts-economy.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SessionScope {
    /// One session per pod: CloudTrail names the pod.
    Pod,
    /// One session per ServiceAccount on this node, shared by its pods here: CloudTrail names the
    /// ServiceAccount and the node; STS calls stay flat in the number of pods.
    ServiceAccount,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    /// The pod's uid, or `namespace/serviceaccount`.
    owner: String,
    role_arn: String,
}

struct Slot {
    /// The pods this session serves (one in `pod` scope); the newest one's token is exchanged.
    members: ArcSwap<Vec<Arc<PodInfo>>>,
    role: Arc<RoleSpec>,
    /// The current set's refresh point, in milliseconds: renewed once less than this is left.
    /// Read by every request: an atomic, never a lock.
    refresh_below_ms: AtomicU64,
    /// Read by every request: swapped, never locked.
    current: arc_swap::ArcSwapOption<Served>,
    /// A recent refusal, served until the instant given.
    refused: Mutex<Option<(IdentityError, SystemTime)>>,
    next_refresh_try: Mutex<Option<SystemTime>>,
    refresh_failures: AtomicU32,
    /// The last failed exchange and when, kept after a success too (for `explain`).
    last_error: Mutex<Option<(IdentityError, SystemTime)>>,
    fetch: tokio::sync::Mutex<()>,
}

impl Slot {
    fn current(&self) -> Option<Arc<Served>> {
        self.current.load_full()
    }
    fn pod(&self) -> Option<Arc<PodInfo>> {
        self.members.load().last().cloned()
    }
    fn refresh_below(&self) -> Duration {
        Duration::from_millis(self.refresh_below_ms.load(Ordering::Relaxed))
    }
    fn set_refresh_below(&self, d: Duration) {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.refresh_below_ms.store(ms, Ordering::Relaxed);
    }
}

/// A credential set as served: what STS issued, the response body rendered from it once, on
/// first use, then shared by every request that set answers, and the pods it was served to.
#[derive(Debug)]
pub struct Served {
    pub creds: Credentials,
    body: std::sync::OnceLock<bytes::Bytes>,
    /// Uids of the pods this set was served to (one in `pod` scope; the ServiceAccount's pods on
    /// this node in `service-account` scope): read without a lock, written once per pod.
    served_to: ArcSwap<Vec<Box<str>>>,
    /// One of `served_to`, set once: the pod a set usually serves is found without loading the
    /// list.
    first: std::sync::OnceLock<Box<str>>,
}

impl Served {
    pub(crate) fn new(creds: Credentials) -> Self {
        Served {
            creds,
            body: std::sync::OnceLock::new(),
            served_to: ArcSwap::from_pointee(Vec::new()),
            first: std::sync::OnceLock::new(),
        }
    }

    /// True the first time this set is served to the pod `uid` (its audit line is written then);
    /// forgotten with the set. Two racing first requests of one pod: one of them gets true.
    pub fn first_serve_to(&self, uid: &str) -> bool {
        if self.first.get().is_some_and(|u| **u == *uid) {
            return false;
        }
        if self.served_to.load().iter().any(|u| **u == *uid) {
            return false;
        }
        let mut first = false;
        self.served_to.rcu(|pods| {
            first = !pods.iter().any(|u| **u == *uid);
            let mut pods = Vec::clone(pods);
            if first {
                pods.push(uid.into());
            }
            pods
        });
        // In `served_to` now, whoever put it there.
        if self.first.get().is_none() {
            let _ = self.first.set(uid.into());
        }
        first
    }

    /// The body `render` makes of these credentials, rendered the first time only.
    pub(crate) fn body(&self, render: impl FnOnce(&Credentials) -> bytes::Bytes) -> bytes::Bytes {
        self.body.get_or_init(|| render(&self.creds)).clone()
    }
}

/// A pod's slot for its role as [`CredentialCache::get_now_ref`] found it in the index.
#[derive(Clone)]
pub(crate) struct SlotRef {
    slot: Arc<Slot>,
    generation: u64,
}

/// The cache's view of one pod's role, for `explain`: times and errors, never credentials.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotView {
    /// Whether the cache has a slot for the pod and role at all.
    pub cached: bool,
    pub expiration: Option<SystemTime>,
    pub issued_at: Option<SystemTime>,
    /// A refusal being remembered (not retried) until the instant given.
    pub refused_until: Option<(IdentityError, SystemTime)>,
    pub last_error: Option<(IdentityError, SystemTime)>,
    /// Pods sharing the session (1 in `pod` scope).
    pub sharing_pods: usize,
}

/// Whether the background work or a waiting request asks for an exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Priority {
    /// A request is waiting for it.
    Urgent,
    /// Prefetch and renewal: nobody waits.
    Background,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn remaining(c: &Credentials, now: SystemTime) -> Duration {
    c.expiration.duration_since(now).unwrap_or(Duration::ZERO)
}

/// Called when a role cannot be assumed (for Kubernetes Events).
pub(crate) type FailureHook = Arc<dyn Fn(&PodInfo, &RoleSpec, &IdentityError) + Send + Sync>;

/// Slots by owner, for requests: a read takes no lock and builds no key. Pod scope: pod uid, then
/// `""`; service-account scope: namespace, then ServiceAccount. Kept equal to the cache's
/// slots: filled when a slot is made, emptied when the cache drops one.
type Index = FastMap<String, FastMap<String, Vec<Arc<Slot>>>>;
/// Read by every request: foldhash (seeded per process) instead of SipHash.
type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

fn index_key(scope: SessionScope, pod: &PodInfo) -> (&str, &str) {
    match scope {
        SessionScope::Pod => (&pod.uid, ""),
        SessionScope::ServiceAccount => (&pod.namespace, &pod.service_account),
    }
}

pub struct CredentialCache {
    slots: moka::future::Cache<Key, Arc<Slot>>,
    index: Arc<ArcSwap<Index>>,
    /// Moved on after every change to `index` (a slot made, a pod's slots dropped).
    index_generation: Arc<AtomicU64>,
    minter: Arc<dyn TokenMinter>,
    sts: Arc<dyn RoleExchange>,
    clock: Arc<dyn Clock>,
    limiter: Limiter,
    settings: CacheSettings,
    metrics: Arc<Metrics>,
    on_failure: Option<FailureHook>,
}

impl CredentialCache {
    pub fn new(
        minter: Arc<dyn TokenMinter>,
        sts: Arc<dyn RoleExchange>,
        clock: Arc<dyn Clock>,
        settings: CacheSettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        let index = Arc::new(ArcSwap::from_pointee(Index::default()));
        let index_generation = Arc::new(AtomicU64::new(0));
        let (dropped, dropped_generation) = (index.clone(), index_generation.clone());
        let slots = moka::future::Cache::builder()
            .max_capacity(100_000)
            // No idle expiry: requests read slots through the index, unseen by the cache, and a
            // slot goes with its pod (`evict_pod`, also on a relist).
            .support_invalidation_closures()
            .eviction_listener(move |_key, slot: Arc<Slot>, _cause| {
                dropped.rcu(|index| {
                    let mut index = Index::clone(index);
                    for sas in index.values_mut() {
                        for slots in sas.values_mut() {
                            slots.retain(|s| !Arc::ptr_eq(s, &slot));
                        }
                        sas.retain(|_, slots| !slots.is_empty());
                    }
                    index.retain(|_, sas| !sas.is_empty());
                    index
                });
                dropped_generation.fetch_add(1, Ordering::AcqRel);
            })
            .build();
        let limiter = Limiter::new(settings.max_concurrent, settings.rate_per_sec);
        CredentialCache {
            slots,
            index,
            index_generation,
            minter,
            sts,
            clock,
            limiter,
            settings,
            metrics,
            on_failure: None,
        }
    }

    pub(crate) fn with_failure_hook(mut self, hook: FailureHook) -> Self {
        self.on_failure = Some(hook);
        self
    }

    /// Credentials for `pod` in `role`, with at least 30 minutes left whenever STS answers.
    pub async fn get(
        self: &Arc<Self>,
        pod: &Arc<PodInfo>,
        role: &Arc<RoleSpec>,
    ) -> Result<Credentials, IdentityError> {
        self.get_served(pod, role).await.map(|s| s.creds.clone())
    }

    /// Like [`get`](Self::get), without copying: the set as shared by every request it answers.
    pub(crate) async fn get_served(
        self: &Arc<Self>,
        pod: &Arc<PodInfo>,
        role: &Arc<RoleSpec>,
    ) -> Result<Arc<Served>, IdentityError> {
        let slot = self.slot(pod, role).await;
        if let Some(c) = self.servable(&slot) {
            return Ok(c);
        }
        let now = self.clock.now();
        if let Some((err, until)) = lock(&slot.refused).clone()
            && now < until
        {
            return Err(err);
        }
        let _guard = slot.fetch.lock().await;
        // Whoever held the lock before may have fetched already, or been refused: one STS call
        // answers every request that waited for it, refusals included.
        if let Some(c) = self.servable(&slot) {
            return Ok(c);
        }
        if let Some((err, until)) = lock(&slot.refused).clone()
            && self.clock.now() < until
        {
            return Err(err);
        }
        let permit = self.limiter.acquire(Priority::Urgent).await;
        match self.fetch(&slot, permit).await {
            Ok(c) => Ok(c),
            Err(e) => {
                let now = self.clock.now();
                match slot.current() {
                    // STS is down: what is still valid is better than nothing.
                    Some(old) if remaining(&old.creds, now) > EXPIRY_SKEW => Ok(old),
                    _ => Err(e),
                }
            }
        }
    }

    /// The credentials to serve when the pod's slot has a servable set: no lock, no allocation,
    /// no wait (the hot path); `None` when [`get_served`](Self::get_served) must make the slot,
    /// fetch or wait.
    pub fn get_now(self: &Arc<Self>, pod: &Arc<PodInfo>, role: &RoleSpec) -> Option<Arc<Served>> {
        self.get_now_ref(pod, role).map(|(served, _)| served)
    }

    /// [`get_now`](Self::get_now), and the slot it came from: while
    /// [`still_indexed`](Self::still_indexed) holds for it, `get_now` for the same pod and
    /// role finds that slot, and [`servable_at`](Self::servable_at) answers what it would
    /// (what a kept-alive connection remembers of its caller).
    pub(crate) fn get_now_ref(
        self: &Arc<Self>,
        pod: &Arc<PodInfo>,
        role: &RoleSpec,
    ) -> Option<(Arc<Served>, SlotRef)> {
        // Read before the index, and moved on after it changes: a reference is never newer than
        // the index it was found in.
        let generation = self.index_generation.load(Ordering::Acquire);
        let slot = self.indexed(pod, role)?;
        self.join(&slot, pod);
        let served = self.servable(&slot)?;
        Some((served, SlotRef { slot, generation }))
    }

    /// Whether the index is unchanged since `slot` was found in it: its pod is still one the
    /// slot serves (a pod leaves a slot only with a change of the index), and no slot replaced
    /// it. One atomic load.
    pub(crate) fn still_indexed(&self, slot: &SlotRef) -> bool {
        self.index_generation.load(Ordering::Acquire) == slot.generation
    }

    /// What [`get_now`](Self::get_now) answers from a slot [`still_indexed`](Self::still_indexed).
    pub(crate) fn servable_at(self: &Arc<Self>, slot: &SlotRef) -> Option<Arc<Served>> {
        self.servable(&slot.slot)
    }

    /// Warms the cache for a pod that just appeared, behind any request that is waiting. The slot
    /// is not held while queued, so the pod's own first request goes ahead of its prefetch.
    pub(crate) async fn prefetch(self: &Arc<Self>, pod: &Arc<PodInfo>, role: &Arc<RoleSpec>) {
        let slot = self.slot(pod, role).await;
        if self.servable(&slot).is_some() {
            return;
        }
        let permit = self.limiter.acquire(Priority::Background).await;
        // A request holding the slot is fetching it now.
        let Ok(_guard) = slot.fetch.try_lock() else {
            return;
        };
        let now = self.clock.now();
        let refused = lock(&slot.refused)
            .as_ref()
            .is_some_and(|(_, until)| now < *until);
        if refused || self.servable(&slot).is_some() {
            return;
        }
        let _ = self.fetch(&slot, permit).await;
    }

    /// The slot for `pod` and `role`, made on first use; records the pod as one it serves.
    async fn slot(&self, pod: &Arc<PodInfo>, role: &Arc<RoleSpec>) -> Arc<Slot> {
        if let Some(slot) = self.indexed(pod, role) {
            self.join(&slot, pod);
            return slot;
        }
        let owner = match self.settings.scope {
            SessionScope::Pod => pod.uid.clone(),
            SessionScope::ServiceAccount => format!("{}/{}", pod.namespace, pod.service_account),
        };
        let key = Key {
            owner,
            role_arn: role.role_arn.clone(),
        };
        let slot = self
            .slots
            .get_with(key, async {
                Arc::new(Slot {
                    members: ArcSwap::from_pointee(vec![pod.clone()]),
                    role: role.clone(),
                    refresh_below_ms: AtomicU64::new(
                        u64::try_from(self.settings.refresh_at_remaining.as_millis())
                            .unwrap_or(u64::MAX),
                    ),
                    current: arc_swap::ArcSwapOption::empty(),
                    refused: Mutex::new(None),
                    next_refresh_try: Mutex::new(None),
                    refresh_failures: AtomicU32::new(0),
                    last_error: Mutex::new(None),
                    fetch: tokio::sync::Mutex::new(()),
                })
            })
            .await;
        self.index.rcu(|index| {
            let mut index = Index::clone(index);
            let (a, b) = index_key(self.settings.scope, pod);
            let slots = index
                .entry(a.to_string())
                .or_default()
                .entry(b.to_string())
                .or_default();
            if !slots.iter().any(|s| Arc::ptr_eq(s, &slot)) {
                slots.push(slot.clone());
            }
            index
        });
        self.index_changed();
        self.join(&slot, pod);
        slot
    }

    fn index_changed(&self) {
        self.index_generation.fetch_add(1, Ordering::AcqRel);
    }

    /// The slot for `pod` and `role` if it exists, from the index: no lock, no key built.
    fn indexed(&self, pod: &PodInfo, role: &RoleSpec) -> Option<Arc<Slot>> {
        let (a, b) = index_key(self.settings.scope, pod);
        self.index
            .load()
            .get(a)
            .and_then(|m| m.get(b))
            .and_then(|slots| {
                slots
                    .iter()
                    .find(|s| s.role.role_arn == role.role_arn)
                    .cloned()
            })
    }

    /// In `service-account` scope, records `pod` as one the session serves (once).
    fn join(&self, slot: &Slot, pod: &Arc<PodInfo>) {
        if self.settings.scope == SessionScope::ServiceAccount
            && !slot.members.load().iter().any(|m| m.uid == pod.uid)
        {
            slot.members.rcu(|members| {
                let mut members = Vec::clone(members);
                if !members.iter().any(|m| m.uid == pod.uid) {
                    members.push(pod.clone());
                }
                members
            });
        }
    }

    /// The slot's credentials if they may be served as they are; starts a background refresh
    /// when they are due for one.
    fn servable(self: &Arc<Self>, slot: &Arc<Slot>) -> Option<Arc<Served>> {
        let c = slot.current()?;
        let now = self.clock.now();
        let left = remaining(&c.creds, now);
        if left <= MIN_SERVED_REMAINING {
            let young = now
                .duration_since(c.creds.issued_at)
                .is_ok_and(|age| age < SHORT_SESSION_GRACE);
            return (young && left > EXPIRY_SKEW).then_some(c);
        }
        if left <= slot.refresh_below() {
            let this = self.clone();
            let slot = slot.clone();
            tokio::spawn(async move { this.refresh_slot(&slot).await });
        }
        Some(c)
    }

    /// Mints, exchanges (with retries) and stores; the caller holds the slot's fetch lock and a
    /// limiter permit.
    async fn fetch(
        &self,
        slot: &Slot,
        _permit: Option<tokio::sync::SemaphorePermit<'_>>,
    ) -> Result<Arc<Served>, IdentityError> {
        let Some(pod) = slot.pod() else {
            return Err(IdentityError::PodGone {
                namespace: String::new(),
                name: String::new(),
            });
        };
        let result = self
            .exchange(slot, &pod)
            .await
            .map(|c| Arc::new(Served::new(c)));
        let now = self.clock.now();
        match &result {
            Ok(c) => {
                slot.set_refresh_below(
                    self.settings
                        .refresh_at_remaining
                        .saturating_sub(REFRESH_SPREAD.mul_f64(unit_random())),
                );
                slot.current.store(Some(c.clone()));
                *lock(&slot.refused) = None;
                *lock(&slot.next_refresh_try) = None;
                slot.refresh_failures.store(0, Ordering::Relaxed);
            }
            Err(e) => {
                if !e.retryable() {
                    *lock(&slot.refused) = Some((e.clone(), now + self.settings.negative_ttl));
                }
                *lock(&slot.last_error) = Some((e.clone(), now));
                tracing::warn!(
                    pod = %pod.name, namespace = %pod.namespace, role = %slot.role.role_arn,
                    error = %e, "cannot obtain credentials"
                );
                if let Some(hook) = &self.on_failure {
                    hook(&pod, &slot.role, e);
                }
            }
        }
        result
    }

    async fn exchange(&self, slot: &Slot, pod: &PodInfo) -> Result<Credentials, IdentityError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let r = self.exchange_once(slot, pod).await;
            match r {
                Err(e) if e.retryable() && attempt < MAX_ATTEMPTS => {
                    tokio::time::sleep(jittered(RETRY_BASE * 2u32.pow(attempt - 1))).await;
                }
                other => return other,
            }
        }
    }

    async fn exchange_once(
        &self,
        slot: &Slot,
        pod: &PodInfo,
    ) -> Result<Credentials, IdentityError> {
        let role = &slot.role;
        let session_name = match self.settings.scope {
            SessionScope::Pod => session_name(&pod.namespace, &pod.name),
            // CloudTrail names the workload and the node.
            SessionScope::ServiceAccount => session_name(
                &pod.namespace,
                &format!("{}@{}", pod.service_account, self.settings.node),
            ),
        };
        let started = std::time::Instant::now();
        let token = self
            .minter
            .mint(pod, &role.audience, role.token_expiration_secs)
            .await;
        self.metrics
            .token_request_seconds(started.elapsed().as_secs_f64());
        self.metrics.count_token_request(outcome_label(&token));
        let req = AssumeRequest {
            role_arn: role.role_arn.clone(),
            session_name,
            web_identity_token: token?,
            duration_secs: i32::try_from(self.settings.duration.as_secs()).unwrap_or(3600),
            regional: role.regional_sts,
        };
        let started = std::time::Instant::now();
        let r = self.sts.assume(&req).await;
        self.metrics
            .sts_result(sts_code_label(&r), started.elapsed().as_secs_f64());
        self.metrics.count_sts_call(outcome_label(&r));
        r
    }

    async fn refresh_slot(&self, slot: &Slot) {
        let not_due = |now: SystemTime| {
            lock(&slot.next_refresh_try).is_some_and(|t| now < t)
                || slot.current().is_some_and(|c| {
                    remaining(&c.creds, now) > slot.refresh_below()
                        || now
                            .duration_since(c.creds.issued_at)
                            .is_ok_and(|age| age < SHORT_SESSION_GRACE)
                })
        };
        if not_due(self.clock.now()) || slot.fetch.try_lock().is_err() {
            return;
        }
        // Queued without holding the slot, so a request for it is not held up by this renewal.
        let permit = self.limiter.acquire(Priority::Background).await;
        // Someone is fetching this slot already, or did while this one queued.
        let Ok(_guard) = slot.fetch.try_lock() else {
            return;
        };
        if not_due(self.clock.now()) {
            return;
        }
        if self.fetch(slot, permit).await.is_err() {
            let n = slot.refresh_failures.fetch_add(1, Ordering::Relaxed);
            let backoff =
                (REFRESH_BACKOFF_BASE * 2u32.saturating_pow(n.min(10))).min(REFRESH_BACKOFF_MAX);
            *lock(&slot.next_refresh_try) = Some(self.clock.now() + jittered(backoff));
            self.metrics.refreshes("failure");
        } else {
            self.metrics.refreshes("success");
        }
    }

    /// Refreshes every slot that is due; the background refresher calls this periodically.
    pub async fn refresh_due(&self) -> usize {
        let now = self.clock.now();
        let due: Vec<Arc<Slot>> = self
            .slots
            .iter()
            .map(|(_, s)| s)
            .filter(|s| {
                s.current()
                    .is_some_and(|c| remaining(&c.creds, now) <= s.refresh_below())
            })
            .collect();
        let n = due.len();
        futures::future::join_all(due.iter().map(|s| self.refresh_slot(s))).await;
        n
    }

    /// Runs [`refresh_due`](Self::refresh_due) every `every` until `shutdown`.
    pub(crate) async fn refresher(
        self: Arc<Self>,
        every: Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => { self.refresh_due().await; }
            }
        }
    }

    /// A pod went (deleted or terminated): its own sessions go at once; a session it shared
    /// with other pods of its ServiceAccount stays theirs, and goes with the last of them.
    pub fn evict_pod(&self, uid: &str) {
        for (_, slot) in self.slots.iter() {
            if slot.members.load().iter().any(|m| m.uid == uid) {
                slot.members.rcu(|members| {
                    let mut members = Vec::clone(members);
                    members.retain(|m| m.uid != uid);
                    members
                });
            }
        }
        // Gone from the index at once; the cache's own removal follows.
        self.index.rcu(|index| {
            let mut index = Index::clone(index);
            for sas in index.values_mut() {
                for slots in sas.values_mut() {
                    slots.retain(|s| !s.members.load().is_empty());
                }
                sas.retain(|_, slots| !slots.is_empty());
            }
            index.retain(|_, sas| !sas.is_empty());
            index
        });
        self.index_changed();
        if let Err(e) = self
            .slots
            .invalidate_entries_if(|_, s| s.members.load().is_empty())
        {
            tracing::error!(error = %e, "cannot evict pod credentials");
        }
    }

    /// Credential sets held now (unexpired) and the least lifetime left among them (zero when
    /// none): read at each scrape, never on a request.
    pub(crate) fn stats(&self) -> (usize, Duration) {
        let now = self.clock.now();
        let mut n = 0;
        let mut least: Option<Duration> = None;
        for (_, slot) in self.slots.iter() {
            let Some(c) = slot.current() else { continue };
            let left = remaining(&c.creds, now);
            if left.is_zero() {
                continue;
            }
            n += 1;
            least = Some(least.map_or(left, |l| l.min(left)));
        }
        (n, least.unwrap_or(Duration::ZERO))
    }

    /// What the cache holds for `pod` in `role`, for an operator (`explain`): never a key,
    /// secret or token.
    pub fn describe(&self, pod: &PodInfo, role_arn: &str) -> SlotView {
        let (a, b) = index_key(self.settings.scope, pod);
        let index = self.index.load();
        let Some(slot) = index
            .get(a)
            .and_then(|m| m.get(b))
            .and_then(|slots| slots.iter().find(|s| s.role.role_arn == role_arn))
        else {
            return SlotView::default();
        };
        let now = self.clock.now();
        SlotView {
            cached: true,
            expiration: slot.current().map(|c| c.creds.expiration),
            issued_at: slot.current().map(|c| c.creds.issued_at),
            refused_until: lock(&slot.refused)
                .as_ref()
                .filter(|(_, until)| now < *until)
                .map(|(e, until)| (e.clone(), *until)),
            last_error: lock(&slot.last_error).clone(),
            sharing_pods: slot.members.load().len(),
        }
    }

    /// Number of slots (for metrics and tests); not exact until pending maintenance ran.
    pub async fn len(&self) -> u64 {
        self.slots.run_pending_tasks().await;
        self.slots.entry_count()
    }

    pub async fn is_empty(&self) -> bool {
        self.len().await == 0
    }

    /// Whether credentials of `uid` are cached.
    pub fn has_pod(&self, uid: &str) -> bool {
        self.slots
            .iter()
            .any(|(_, s)| s.members.load().iter().any(|m| m.uid == uid) && s.current().is_some())
    }
}

/// A jitter of ±50% keeps a crowd of refreshes from retrying in step.
fn jittered(d: Duration) -> Duration {
    d.mul_f64(0.5 + unit_random())
}

/// Uniform in [0, 1].
fn unit_random() -> f64 {
    use aws_lc_rs::rand::SecureRandom;
    let mut b = [0u8; 2];
    let r = aws_lc_rs::rand::SystemRandom::new()
        .fill(&mut b)
        .map(|_| u16::from_le_bytes(b))
        .unwrap_or(32768);
    f64::from(r) / f64::from(u16::MAX)
}

/// Bounds exchanges in flight and their start rate (evenly spaced starts, no burst: STS never
/// sees more than the configured rate in any second), so hundreds of pods starting at once do
/// not flood STS or the API server. Urgent
/// callers (a request is waiting) take the next start before any background one; within a
/// priority, first come first served. A start is taken before the in-flight permit, so nobody
/// holds a permit while queued for a start.
struct Limiter {
    sem: tokio::sync::Semaphore,
    interval: Duration,
    burst: Duration,
    state: Mutex<Gcra>,
    urgent: tokio::sync::Mutex<()>,
    background: tokio::sync::Mutex<()>,
}

struct Gcra {
    next: tokio::time::Instant,
    /// Urgent callers not yet started: background ones wait while there are any.
    urgent_waiting: usize,
}

/// Counts an urgent caller as waiting until it starts or gives up (its request went away).
struct UrgentWaiting<'a> {
    state: &'a Mutex<Gcra>,
    done: bool,
}

impl Drop for UrgentWaiting<'_> {
    fn drop(&mut self) {
        if !self.done {
            lock(self.state).urgent_waiting -= 1;
        }
    }
}

impl Limiter {
    fn new(max_concurrent: usize, rate_per_sec: u32) -> Self {
        Limiter {
            sem: tokio::sync::Semaphore::new(max_concurrent.max(1)),
            interval: Duration::from_secs(1) / rate_per_sec.max(1),
            burst: Duration::ZERO,
            state: Mutex::new(Gcra {
                next: tokio::time::Instant::now(),
                urgent_waiting: 0,
            }),
            urgent: tokio::sync::Mutex::new(()),
            background: tokio::sync::Mutex::new(()),
        }
    }

    async fn acquire(&self, priority: Priority) -> Option<tokio::sync::SemaphorePermit<'_>> {
        match priority {
            Priority::Urgent => {
                lock(&self.state).urgent_waiting += 1;
                let mut waiting = UrgentWaiting {
                    state: &self.state,
                    done: false,
                };
                let _turn = self.urgent.lock().await;
                self.start(&mut waiting).await;
            }
            Priority::Background => {
                let _turn = self.background.lock().await;
                loop {
                    let at = {
                        let mut st = lock(&self.state);
                        let now = tokio::time::Instant::now();
                        let at = st.next.max(now.checked_sub(self.burst).unwrap_or(now));
                        if at <= now && st.urgent_waiting == 0 {
                            st.next = at + self.interval;
                            break;
                        }
                        // Behind an urgent caller: look again one start later.
                        at.max(now + self.interval)
                    };
                    tokio::time::sleep_until(at).await;
                }
            }
        }
        self.sem.acquire().await.ok()
    }

    async fn start(&self, waiting: &mut UrgentWaiting<'_>) {
        loop {
            let at = {
                let mut st = lock(&self.state);
                let now = tokio::time::Instant::now();
                let at = st.next.max(now.checked_sub(self.burst).unwrap_or(now));
                if at <= now {
                    st.next = at + self.interval;
                    st.urgent_waiting -= 1;
                    waiting.done = true;
                    return;
                }
                at
            };
            tokio::time::sleep_until(at).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Secret;
    use futures::future::BoxFuture;
    use std::sync::atomic::AtomicUsize;

    struct FakeClock(Mutex<SystemTime>);
    impl Clock for FakeClock {
        fn now(&self) -> SystemTime {
            *lock(&self.0)
        }
    }
    impl FakeClock {
        fn advance(&self, d: Duration) {
            *lock(&self.0) += d;
        }
    }

    #[derive(Default)]
    struct FakeMinter {
        calls: AtomicUsize,
    }
    impl TokenMinter for FakeMinter {
        fn mint<'a>(
            &'a self,
            pod: &'a PodInfo,
            _: &'a str,
            _: i64,
        ) -> BoxFuture<'a, Result<Secret, IdentityError>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                // Give concurrent callers time to pile up behind the first.
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok(Secret::new(format!("jwt-for-{}", pod.uid)))
            })
        }
    }

    struct FakeSts {
        calls: AtomicUsize,
        clock: Arc<FakeClock>,
        /// Errors to return before succeeding again.
        failures: Mutex<Vec<IdentityError>>,
        down: std::sync::atomic::AtomicBool,
        sessions: Mutex<Vec<String>>,
        tokens: Mutex<Vec<String>>,
        lifetime: Mutex<Duration>,
        /// When each call came (tokio's clock).
        at: Mutex<Vec<tokio::time::Instant>>,
    }
    impl RoleExchange for FakeSts {
        fn assume<'a>(
            &'a self,
            req: &'a AssumeRequest,
        ) -> BoxFuture<'a, Result<Credentials, IdentityError>> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            lock(&self.sessions).push(req.session_name.clone());
            lock(&self.tokens).push(req.web_identity_token.expose().to_string());
            lock(&self.at).push(tokio::time::Instant::now());
            let fail = lock(&self.failures).pop();
            let down = self.down.load(Ordering::SeqCst);
            let now = self.clock.now();
            let lifetime = *lock(&self.lifetime);
            Box::pin(async move {
                if down {
                    return Err(IdentityError::StsUnavailable {
                        code: "InternalFailure".into(),
                        message: "down".into(),
                    });
                }
                if let Some(e) = fail {
                    return Err(e);
                }
                Ok(Credentials {
                    access_key_id: format!("ASIA{n}"),
                    secret_access_key: Secret::new("s"),
                    session_token: Secret::new("t"),
                    expiration: now + lifetime,
                    issued_at: now,
                })
            })
        }
    }

    struct Bed {
        cache: Arc<CredentialCache>,
        minter: Arc<FakeMinter>,
        sts: Arc<FakeSts>,
        clock: Arc<FakeClock>,
        pod: Arc<PodInfo>,
        role: Arc<RoleSpec>,
    }

    /// Every async test runs on tokio's paused clock within this much virtual time: a test that
    /// would wait forever (a limiter that never lets a caller start) fails at once instead of
    /// hanging, since an idle runtime jumps its clock to the next timer.
    const TEST_DEADLINE: Duration = Duration::from_secs(120);

    async fn bounded<T>(test: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(TEST_DEADLINE, test)
            .await
            .expect("the test outlived its deadline (virtual time): something waits forever")
    }

    /// Waits (virtual time) until `done` holds; fails after `within`.
    async fn wait_for(what: &str, within: Duration, done: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + within;
        while !done() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: not within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn refusal() -> IdentityError {
        IdentityError::StsRejected {
            code: "AccessDenied".into(),
            message: "not trusted".into(),
        }
    }

    fn throttled() -> IdentityError {
        IdentityError::StsUnavailable {
            code: "Throttling".into(),
            message: "slow down".into(),
        }
    }

    fn calls(b: &Bed) -> usize {
        b.sts.calls.load(Ordering::SeqCst)
    }

    fn key(c: &Result<Credentials, IdentityError>) -> &str {
        &c.as_ref().expect("credentials").access_key_id
    }

    const MS: Duration = Duration::from_millis(1);
    const MINUTE: Duration = Duration::from_secs(60);

    fn bed() -> Bed {
        bed_with(SessionScope::Pod, 1000)
    }

    fn bed_with(scope: SessionScope, rate_per_sec: u32) -> Bed {
        let clock = Arc::new(FakeClock(Mutex::new(
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        )));
        let minter = Arc::new(FakeMinter::default());
        let sts = Arc::new(FakeSts {
            calls: AtomicUsize::new(0),
            clock: clock.clone(),
            failures: Mutex::new(vec![]),
            down: false.into(),
            sessions: Mutex::new(vec![]),
            tokens: Mutex::new(vec![]),
            lifetime: Mutex::new(Duration::from_secs(3600)),
            at: Mutex::new(vec![]),
        });
        let settings = CacheSettings {
            duration: Duration::from_secs(3600),
            refresh_at_remaining: Duration::from_secs(45 * 60),
            max_concurrent: 16,
            rate_per_sec,
            negative_ttl: Duration::from_secs(30),
            scope,
            node: "n1".into(),
        };
        let cache = Arc::new(CredentialCache::new(
            minter.clone(),
            sts.clone(),
            clock.clone(),
            settings,
            Arc::new(Metrics::new()),
        ));
        let pod = Arc::new(PodInfo {
            uid: "uid-1".into(),
            namespace: "team".into(),
            name: "api-0".into(),
            service_account: "sa".into(),
            node_name: Some("n1".into()),
            ips: vec!["10.0.0.1".parse().unwrap()],
            host_network: false,
            terminal: false,
            kube2iam_role: None,
        });
        let role = Arc::new(RoleSpec {
            role_arn: "arn:aws:iam::123456789012:role/app".into(),
            audience: "sts.amazonaws.com".into(),
            token_expiration_secs: 600,
            regional_sts: true,
            source: crate::identity::RoleSource::ServiceAccount,
        });
        Bed {
            cache,
            minter,
            sts,
            clock,
            pod,
            role,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_first_requests_cost_one_token_request_and_one_sts_call() {
        bounded(async {
            let b = bed();
            let gets = (0..200).map(|_| {
                let (c, p, r) = (b.cache.clone(), b.pod.clone(), b.role.clone());
                tokio::spawn(async move { c.get(&p, &r).await })
            });
            let results = futures::future::join_all(gets).await;
            let keys: HashSet<String> = results
                .into_iter()
                .map(|r| r.unwrap().unwrap().access_key_id)
                .collect();
            assert_eq!(keys.len(), 1, "everyone got the same credentials");
            assert_eq!(b.minter.calls.load(Ordering::SeqCst), 1);
            assert_eq!(b.sts.calls.load(Ordering::SeqCst), 1);
            assert_eq!(lock(&b.sts.sessions)[0], "team.api-0");
        })
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_requests_for_a_refused_role_cost_one_sts_call() {
        bounded(async {
            let b = bed();
            *lock(&b.sts.failures) = (0..50)
                .map(|_| IdentityError::StsRejected {
                    code: "AccessDenied".into(),
                    message: "not trusted".into(),
                })
                .collect();
            let gets = (0..50).map(|_| {
                let (c, p, r) = (b.cache.clone(), b.pod.clone(), b.role.clone());
                tokio::spawn(async move { c.get(&p, &r).await })
            });
            for r in futures::future::join_all(gets).await {
                assert!(matches!(r.unwrap(), Err(IdentityError::StsRejected { .. })));
            }
            assert_eq!(b.sts.calls.load(Ordering::SeqCst), 1);
            let view = b.cache.describe(&b.pod, &b.role.role_arn);
            assert!(view.cached && view.expiration.is_none());
            assert!(view.refused_until.is_some() && view.last_error.is_some());
            assert_eq!(b.cache.stats(), (0, Duration::ZERO));
        })
        .await
    }

    use std::collections::HashSet;

    #[tokio::test(start_paused = true)]
    async fn credentials_are_refreshed_before_thirty_minutes_are_left() {
        bounded(async {
            let b = bed();
            let first = b.cache.get(&b.pod, &b.role).await.unwrap();
            // 14 minutes in: 46 left, not yet due.
            b.clock.advance(Duration::from_secs(14 * 60));
            assert_eq!(b.cache.refresh_due().await, 0);
            // 18 minutes in: 42 left, past the refresh point (45 minutes less up to 3 of spread); the
            // background refresher replaces them.
            b.clock.advance(Duration::from_secs(4 * 60));
            assert_eq!(b.cache.refresh_due().await, 1);
            assert_eq!(b.sts.calls.load(Ordering::SeqCst), 2);
            let second = b.cache.get(&b.pod, &b.role).await.unwrap();
            assert_ne!(first.access_key_id, second.access_key_id);
            // Walk an hour in 5-minute steps, refreshing as the refresher would: every answer keeps 30 minutes.
            for _ in 0..24 {
                b.clock.advance(Duration::from_secs(5 * 60));
                b.cache.refresh_due().await;
                let c = b.cache.get(&b.pod, &b.role).await.unwrap();
                assert!(remaining(&c, b.clock.now()) >= MIN_SERVED_REMAINING);
            }
        })
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_inside_the_last_thirty_minutes_fetches_fresh_ones() {
        bounded(async {
            let b = bed();
            let first = b.cache.get(&b.pod, &b.role).await.unwrap();
            b.clock.advance(Duration::from_secs(31 * 60));
            let c = b.cache.get(&b.pod, &b.role).await.unwrap();
            assert_ne!(c.access_key_id, first.access_key_id);
            assert!(remaining(&c, b.clock.now()) >= MIN_SERVED_REMAINING);
        })
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn sts_down_serves_unexpired_but_never_expired_credentials() {
        bounded(async {
            let b = bed();
            let first = b.cache.get(&b.pod, &b.role).await.unwrap();
            b.sts.down.store(true, Ordering::SeqCst);
            b.clock.advance(Duration::from_secs(50 * 60));
            let c = b.cache.get(&b.pod, &b.role).await.unwrap();
            assert_eq!(
                c.access_key_id, first.access_key_id,
                "still valid: served while STS is down"
            );
            b.clock.advance(Duration::from_secs(10 * 60));
            assert!(
                b.cache.get(&b.pod, &b.role).await.is_err(),
                "expired: never served"
            );
        })
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_is_retried_and_access_denied_is_not() {
        bounded(async {
            let b = bed();
            lock(&b.sts.failures).push(IdentityError::StsUnavailable {
                code: "Throttling".into(),
                message: "slow down".into(),
            });
            assert!(b.cache.get(&b.pod, &b.role).await.is_ok());
            assert_eq!(b.sts.calls.load(Ordering::SeqCst), 2);

            let b = bed();
            lock(&b.sts.failures).push(IdentityError::StsRejected {
                code: "AccessDenied".into(),
                message: "no".into(),
            });
            assert!(matches!(
                b.cache.get(&b.pod, &b.role).await,
                Err(IdentityError::StsRejected { .. })
            ));
            assert_eq!(b.sts.calls.load(Ordering::SeqCst), 1);
            // Remembered: a second request does not hammer STS...
            assert!(b.cache.get(&b.pod, &b.role).await.is_err());
            assert_eq!(b.sts.calls.load(Ordering::SeqCst), 1);
            // ...until the refusal ages out.
            b.clock.advance(Duration::from_secs(31));
            assert!(b.cache.get(&b.pod, &b.role).await.is_ok());
            assert_eq!(b.sts.calls.load(Ordering::SeqCst), 2);
        })
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn evicted_pod_credentials_are_gone_at_once() {
        bounded(async {
            let b = bed();
            b.cache.get(&b.pod, &b.role).await.unwrap();
            assert!(b.cache.has_pod("uid-1"));
            b.cache.evict_pod("uid-1");
            assert!(!b.cache.has_pod("uid-1"));
            b.cache.get(&b.pod, &b.role).await.unwrap();
            assert_eq!(
                b.sts.calls.load(Ordering::SeqCst),
                2,
                "a new fetch after eviction"
            );
        })
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn a_remembered_slot_answers_as_get_now_until_the_index_changes() {
        bounded(async {
            let b = bed_with(SessionScope::ServiceAccount, 1000);
            assert!(
                b.cache.get_now_ref(&b.pod, &b.role).is_none(),
                "nothing yet"
            );
            let first = b.cache.get(&b.pod, &b.role).await.unwrap();
            let (served, at) = b.cache.get_now_ref(&b.pod, &b.role).unwrap();
            assert_eq!(served.creds.access_key_id, first.access_key_id);
            assert!(b.cache.still_indexed(&at));
            // A renewal is the slot's: served from the remembered slot at once.
            b.clock.advance(Duration::from_secs(20 * 60));
            assert_eq!(b.cache.refresh_due().await, 1);
            let renewed = b.cache.servable_at(&at).unwrap();
            assert_ne!(renewed.creds.access_key_id, first.access_key_id);
            assert_eq!(
                renewed.creds.access_key_id,
                b.cache
                    .get_now(&b.pod, &b.role)
                    .unwrap()
                    .creds
                    .access_key_id
            );
            assert!(b.cache.still_indexed(&at));
            // Another pod joining the session changes no slot; one leaving it does.
            let second = other_pod(&b, 2);
            b.cache.get(&second, &b.role).await.unwrap();
            assert!(b.cache.still_indexed(&at));
            b.cache.evict_pod(&second.uid);
            assert!(!b.cache.still_indexed(&at), "a pod left");
            // A new slot, then the pod's own eviction.
            let (_, at) = b.cache.get_now_ref(&b.pod, &b.role).unwrap();
            let other_role = Arc::new(RoleSpec {
                role_arn: "arn:aws:iam::123456789012:role/other".into(),
                ..(*b.role).clone()
            });
            b.cache.get(&b.pod, &other_role).await.unwrap();
            assert!(!b.cache.still_indexed(&at), "a slot was made");
            let (_, at) = b.cache.get_now_ref(&b.pod, &b.role).unwrap();
            b.cache.evict_pod(&b.pod.uid);
            assert!(!b.cache.still_indexed(&at), "its pod went");
            assert!(b.cache.get_now_ref(&b.pod, &b.role).is_none());
        })
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn limiter_spreads_a_crowd_over_time() {
        bounded(async {
            let l = Limiter::new(100, 10);
            let t0 = tokio::time::Instant::now();
            for _ in 0..30 {
                drop(l.acquire(Priority::Background).await);
            }
            // 10 per second, evenly.
            assert!(
                t0.elapsed() >= Duration::from_millis(2900),
                "{:?}",
                t0.elapsed()
            );
        })
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn short_sessions_are_not_refetched_on_every_request() {
        bounded(async {
            let b = bed();
            *lock(&b.sts.lifetime) = Duration::from_secs(20 * 60);
            for _ in 0..50 {
                b.cache.get(&b.pod, &b.role).await.unwrap();
            }
            assert_eq!(
                b.cache.refresh_due().await,
                1,
                "due, but too young to refresh"
            );
            assert_eq!(b.sts.calls.load(Ordering::SeqCst), 1);
            b.clock.advance(Duration::from_secs(6 * 60));
            let c = b.cache.get(&b.pod, &b.role).await.unwrap();
            assert_eq!(
                b.sts.calls.load(Ordering::SeqCst),
                2,
                "refetched once the grace passed"
            );
            assert!(remaining(&c, b.clock.now()) > Duration::from_secs(19 * 60));
        })
        .await
    }

    fn other_pod(b: &Bed, i: usize) -> Arc<PodInfo> {
        Arc::new(PodInfo {
            uid: format!("uid-x{i}"),
            name: format!("api-x{i}"),
            ..(*b.pod).clone()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn an_urgent_exchange_goes_ahead_of_queued_background_ones() {
        bounded(async {
            let l = Arc::new(Limiter::new(100, 10));
            let t0 = tokio::time::Instant::now();
            let queued: Vec<_> = (0..50)
                .map(|_| {
                    let l = l.clone();
                    tokio::spawn(async move {
                        drop(l.acquire(Priority::Background).await);
                        t0.elapsed()
                    })
                })
                .collect();
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(l.acquire(Priority::Urgent).await);
            // One start every 100 ms: the urgent caller takes the next one, not the 51st.
            assert!(
                t0.elapsed() <= Duration::from_millis(150),
                "{:?}",
                t0.elapsed()
            );
            let mut last = Duration::ZERO;
            for q in queued {
                last = last.max(q.await.unwrap());
            }
            // ...and STS still sees the configured rate: 51 starts take 5 s.
            assert!(last >= Duration::from_millis(4900), "{last:?}");
        })
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_goes_ahead_of_queued_prefetches() {
        bounded(async {
            let b = bed_with(SessionScope::Pod, 10);
            let pods: Vec<_> = (0..40).map(|i| other_pod(&b, i)).collect();
            let t0 = tokio::time::Instant::now();
            let prefetches: Vec<_> = pods
                .iter()
                .map(|p| {
                    let (c, p, r) = (b.cache.clone(), p.clone(), b.role.clone());
                    tokio::spawn(async move { c.prefetch(&p, &r).await })
                })
                .collect();
            tokio::time::sleep(Duration::from_millis(50)).await;
            // The last pod in the queue asks: it does not wait four seconds for its turn.
            let c = b.cache.get(&pods[39], &b.role).await.unwrap();
            assert!(
                t0.elapsed() < Duration::from_millis(500),
                "{:?}",
                t0.elapsed()
            );
            futures::future::join_all(prefetches).await;
            // Its queued prefetch found the slot filled and cost nothing more.
            assert_eq!(b.sts.calls.load(Ordering::SeqCst), 40);
            assert_eq!(
                b.cache.get(&pods[39], &b.role).await.unwrap().access_key_id,
                c.access_key_id
            );
        })
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn service_account_scope_shares_one_session_until_its_last_pod_goes() {
        bounded(async {
            let b = bed_with(SessionScope::ServiceAccount, 1000);
            let second = other_pod(&b, 2);
            let a = b.cache.get(&b.pod, &b.role).await.unwrap();
            let c = b.cache.get(&second, &b.role).await.unwrap();
            assert_eq!(
                a.access_key_id, c.access_key_id,
                "one session for both pods"
            );
            assert_eq!(b.sts.calls.load(Ordering::SeqCst), 1);
            assert_eq!(lock(&b.sts.sessions)[0], "team.sa@n1");
            b.cache.evict_pod(&b.pod.uid);
            assert!(
                b.cache.has_pod(&second.uid),
                "the other pod keeps the session"
            );
            assert_eq!(
                b.cache.get(&second, &b.role).await.unwrap().access_key_id,
                a.access_key_id
            );
            b.cache.evict_pod(&second.uid);
            assert!(b.cache.is_empty().await, "gone with the last pod");
            b.cache.get(&second, &b.role).await.unwrap();
            assert_eq!(b.sts.calls.load(Ordering::SeqCst), 2);
        })
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn service_account_scope_renews_with_a_pod_still_there() {
        bounded(async {
            let b = bed_with(SessionScope::ServiceAccount, 1000);
            let second = other_pod(&b, 2);
            b.cache.get(&b.pod, &b.role).await.unwrap();
            b.cache.get(&second, &b.role).await.unwrap();
            b.cache.evict_pod(&second.uid);
            b.clock.advance(Duration::from_secs(20 * 60));
            assert_eq!(b.cache.refresh_due().await, 1);
            assert_eq!(b.sts.calls.load(Ordering::SeqCst), 2);
            assert_eq!(
                lock(&b.sts.tokens)[1],
                "jwt-for-uid-1",
                "a token of the pod still there was exchanged"
            );
        })
        .await
    }

    #[test]
    fn a_set_is_first_served_once_to_each_pod() {
        let s = Served::new(Credentials {
            access_key_id: "ASIA1".into(),
            secret_access_key: Secret::new("s"),
            session_token: Secret::new("t"),
            expiration: SystemTime::UNIX_EPOCH,
            issued_at: SystemTime::UNIX_EPOCH,
        });
        assert!(s.first_serve_to("uid-1"));
        assert!(!s.first_serve_to("uid-1"));
        assert!(s.first_serve_to("uid-2"), "another pod sharing the set");
        assert!(!s.first_serve_to("uid-2"));
        assert!(!s.first_serve_to("uid-1"));
    }

    // Tests for the mutants cargo-mutants left alive (docs/mutants.md, "agent/src/identity/cache.rs").

    #[tokio::test(start_paused = true)]
    async fn refresh_points_are_spread_over_the_three_minutes_before_refresh_at() {
        bounded(async {
            let b = bed();
            let pods: Vec<_> = (0..64).map(|i| other_pod(&b, i)).collect();
            for p in &pods {
                b.cache.get(p, &b.role).await.unwrap();
            }
            // Hour-long sets, all issued now; refresh_at is 45 minutes, less a draw from 3.
            // 45 min + 1 s left: none is due.
            b.clock.advance(15 * MINUTE - Duration::from_secs(1));
            assert_eq!(b.cache.refresh_due().await, 0);
            // 43.5 min left: the sets whose draw fell in the first half of the spread, and
            // only those (all 64 or none: no spread; 2^-63 by chance).
            b.clock.advance(Duration::from_secs(91));
            let early = b.cache.refresh_due().await;
            assert!(0 < early && early < 64, "{early} of 64 due halfway");
            // 42 min - 1 s left: past every refresh point, the rest are due.
            b.clock.advance(Duration::from_secs(91));
            assert_eq!(b.cache.refresh_due().await, 64 - early);
            assert_eq!(calls(&b), 64 + 64);
        })
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn a_set_is_renewed_from_the_instant_it_reaches_its_refresh_point() {
        bounded(async {
            let b = bed();
            b.cache.get(&b.pod, &b.role).await.unwrap();
            let point = b.cache.indexed(&b.pod, &b.role).unwrap().refresh_below();
            assert!(42 * MINUTE <= point && point <= 45 * MINUTE, "{point:?}");
            b.clock.advance(60 * MINUTE - point - MS);
            assert_eq!(b.cache.refresh_due().await, 0);
            assert_eq!(calls(&b), 1);
            b.clock.advance(MS);
            assert_eq!(b.cache.refresh_due().await, 1);
            assert_eq!(calls(&b), 2, "renewed with exactly its refresh point left");
        })
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_past_the_refresh_point_is_answered_at_once_and_renews_in_the_background() {
        bounded(async {
            let b = bed();
            let first = b.cache.get(&b.pod, &b.role).await;
            // 42 min - 1 s left: past every refresh point, far from the 30 minutes served.
            b.clock.advance(18 * MINUTE + Duration::from_secs(1));
            let c = b.cache.get(&b.pod, &b.role).await;
            assert_eq!(key(&c), key(&first), "answered with the set it has");
            wait_for("a renewal started by the request", MINUTE, || {
                b.cache
                    .get_now(&b.pod, &b.role)
                    .is_some_and(|s| s.creds.access_key_id != key(&first))
            })
            .await;
            assert_eq!(calls(&b), 2);
        })
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn the_refresher_renews_due_sets_until_shut_down() {
        bounded(async {
            let b = bed();
            b.cache.get(&b.pod, &b.role).await.unwrap();
            let stop = tokio_util::sync::CancellationToken::new();
            let refresher = tokio::spawn(
                b.cache
                    .clone()
                    .refresher(Duration::from_secs(30), stop.clone()),
            );
            b.clock.advance(19 * MINUTE);
            wait_for("the refresher's renewal", MINUTE, || calls(&b) == 2).await;
            stop.cancel();
            tokio::time::timeout(Duration::from_secs(1), refresher)
                .await
                .expect("the refresher ends at shutdown")
                .unwrap();
        })
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn a_retryable_error_is_tried_three_times_100_then_200_ms_apart_with_jitter() {
        bounded(async {
            let b = bed();
            b.sts.down.store(true, Ordering::SeqCst);
            assert!(matches!(
                b.cache.get(&b.pod, &b.role).await,
                Err(IdentityError::StsUnavailable { .. })
            ));
            assert_eq!(calls(&b), 3, "three attempts, then the error");
            b.sts.down.store(false, Ordering::SeqCst);
            // Twice throttled, then credentials, for 40 pods.
            let (mut first, mut second) = (vec![], vec![]);
            for i in 0..40 {
                lock(&b.sts.failures).extend([throttled(), throttled()]);
                b.cache.get(&other_pod(&b, i), &b.role).await.unwrap();
                let at = lock(&b.sts.at);
                let n = at.len();
                // Each attempt mints a token first: the fake minter takes 20 ms.
                let mint = 20 * MS;
                first.push(at[n - 2] - at[n - 3] - mint);
                second.push(at[n - 1] - at[n - 2] - mint);
            }
            assert_eq!(calls(&b), 3 + 40 * 3);
            // 100 ms, then 200 ms, each ±50% (and up to a millisecond of timer rounding per sleep).
            for (one, two) in first.iter().zip(&second) {
                assert!(
                    50 * MS <= *one && *one <= 152 * MS,
                    "first retry after {one:?}"
                );
                assert!(
                    100 * MS <= *two && *two <= 302 * MS,
                    "second retry after {two:?}"
                );
            }
            // Jittered: 40 waits are not all alike.
            let (lo, hi) = (first.iter().min().unwrap(), first.iter().max().unwrap());
            assert!(
                *hi - *lo > 20 * MS,
                "first retries all within {lo:?}..{hi:?}"
            );
        })
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn failed_renewals_back_off_from_5_s_doubling_to_5_min_with_jitter() {
        bounded(async {
            let b = bed();
            b.cache.get(&b.pod, &b.role).await.unwrap();
            let slot = b.cache.indexed(&b.pod, &b.role).unwrap();
            b.sts.down.store(true, Ordering::SeqCst);
            // Past every refresh point.
            b.clock.advance(19 * MINUTE);
            let mut expected_calls = 1;
            for (n, base_secs) in [5u64, 10, 20, 40, 80, 160, 300, 300]
                .into_iter()
                .enumerate()
            {
                assert_eq!(b.cache.refresh_due().await, 1);
                expected_calls += 3; // one renewal, three attempts
                assert_eq!(calls(&b), expected_calls, "renewal {n} is tried");
                let next =
                    lock(&slot.next_refresh_try).expect("a failed renewal sets its next try");
                let wait = next
                    .duration_since(b.clock.now())
                    .expect("the next try is ahead");
                let base = Duration::from_secs(base_secs);
                assert!(
                    base / 2 <= wait && wait <= base * 3 / 2,
                    "after failure {n}: next try in {wait:?}"
                );
                // Not tried again before then (the set is due all along)...
                b.clock.advance(wait - MS);
                assert_eq!(b.cache.refresh_due().await, 1);
                assert_eq!(calls(&b), expected_calls, "after failure {n}: backing off");
                // ...and tried at that instant (the next round).
                b.clock.advance(MS);
            }
        })
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_that_is_not_due_takes_no_start_from_the_rate_limit() {
        bounded(async {
            // One start a second; 20-minute sessions are past the refresh point at once but
            // too young to renew.
            let b = bed_with(SessionScope::Pod, 1);
            *lock(&b.sts.lifetime) = 20 * MINUTE;
            b.cache.get(&b.pod, &b.role).await.unwrap();
            // The limiter's next start is free from now on.
            tokio::time::sleep(Duration::from_secs(2)).await;
            assert_eq!(b.cache.refresh_due().await, 1);
            assert_eq!(calls(&b), 1);
            let t0 = tokio::time::Instant::now();
            b.cache.get(&other_pod(&b, 1), &b.role).await.unwrap();
            assert!(
                t0.elapsed() < Duration::from_millis(500),
                "a request waited {:?} for a start the renewal took",
                t0.elapsed()
            );
        })
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_is_remembered_for_exactly_the_negative_ttl() {
        bounded(async {
            let b = bed();
            lock(&b.sts.failures).push(refusal());
            let until = b.clock.now() + Duration::from_secs(30);
            assert!(matches!(
                b.cache.get(&b.pod, &b.role).await,
                Err(IdentityError::StsRejected { .. })
            ));
            let view = b.cache.describe(&b.pod, &b.role.role_arn);
            assert_eq!(view.refused_until.map(|(_, t)| t), Some(until));
            b.clock.advance(Duration::from_secs(30) - MS);
            assert!(matches!(
                b.cache.get(&b.pod, &b.role).await,
                Err(IdentityError::StsRejected { .. })
            ));
            assert_eq!(calls(&b), 1, "remembered, not asked again");
            assert!(
                b.cache
                    .describe(&b.pod, &b.role.role_arn)
                    .refused_until
                    .is_some()
            );
            b.clock.advance(MS);
            let view = b.cache.describe(&b.pod, &b.role.role_arn);
            assert_eq!(view.refused_until, None, "over at the instant it ends");
            assert!(view.last_error.is_some(), "the error itself is still shown");
            b.cache.get(&b.pod, &b.role).await.unwrap();
            assert_eq!(calls(&b), 2);
        })
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn a_prefetch_does_not_ask_again_while_a_refusal_is_remembered() {
        bounded(async {
            let b = bed();
            lock(&b.sts.failures).push(refusal());
            assert!(b.cache.get(&b.pod, &b.role).await.is_err());
            b.clock.advance(Duration::from_secs(30) - MS);
            b.cache.prefetch(&b.pod, &b.role).await;
            assert_eq!(calls(&b), 1);
            b.clock.advance(MS);
            b.cache.prefetch(&b.pod, &b.role).await;
            assert_eq!(calls(&b), 2, "asked again once the refusal is over");
            assert!(b.cache.get_now(&b.pod, &b.role).is_some());
        })
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn while_sts_is_down_a_set_is_served_until_a_minute_before_it_expires() {
        bounded(async {
            let b = bed();
            let first = b.cache.get(&b.pod, &b.role).await;
            b.sts.down.store(true, Ordering::SeqCst);
            b.clock.advance(59 * MINUTE - MS);
            let c = b.cache.get(&b.pod, &b.role).await;
            assert_eq!(key(&c), key(&first), "60.001 s left: served");
            b.clock.advance(MS);
            assert!(
                b.cache.get(&b.pod, &b.role).await.is_err(),
                "60 s left: not served"
            );
        })
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_session_is_served_while_young_and_more_than_a_minute_from_expiry() {
        bounded(async {
            // 20-minute sessions: served as they are for five minutes, then fetched anew.
            let b = bed();
            *lock(&b.sts.lifetime) = 20 * MINUTE;
            let first = b.cache.get(&b.pod, &b.role).await;
            b.clock.advance(5 * MINUTE - MS);
            assert_eq!(key(&b.cache.get(&b.pod, &b.role).await), key(&first));
            assert_eq!(calls(&b), 1);
            b.clock.advance(MS);
            assert_ne!(key(&b.cache.get(&b.pod, &b.role).await), key(&first));
            assert_eq!(calls(&b), 2);
            // 2-minute sessions: young all their life, but not served with a minute left.
            let b = bed();
            *lock(&b.sts.lifetime) = 2 * MINUTE;
            let first = b.cache.get(&b.pod, &b.role).await;
            b.clock.advance(MINUTE - MS);
            assert_eq!(key(&b.cache.get(&b.pod, &b.role).await), key(&first));
            b.clock.advance(MS);
            assert_ne!(key(&b.cache.get(&b.pod, &b.role).await), key(&first));
            assert_eq!(calls(&b), 2);
        })
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_session_is_renewed_in_the_background_once_its_grace_has_passed() {
        bounded(async {
            let b = bed();
            *lock(&b.sts.lifetime) = 20 * MINUTE;
            b.cache.get(&b.pod, &b.role).await.unwrap();
            b.clock.advance(5 * MINUTE - MS);
            assert_eq!(b.cache.refresh_due().await, 1);
            assert_eq!(calls(&b), 1, "too young to renew");
            b.clock.advance(MS);
            assert_eq!(b.cache.refresh_due().await, 1);
            assert_eq!(calls(&b), 2, "renewed once five minutes old");
        })
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn a_cached_set_is_served_without_waiting_and_each_role_has_its_own() {
        bounded(async {
            let b = bed();
            assert!(b.cache.get_now(&b.pod, &b.role).is_none(), "nothing yet");
            let a = b.cache.get(&b.pod, &b.role).await;
            let now = b
                .cache
                .get_now(&b.pod, &b.role)
                .expect("served from the cache");
            assert_eq!(now.creds.access_key_id, key(&a));
            // The same pod in another role (its annotation changed): another session.
            let other = Arc::new(RoleSpec {
                role_arn: "arn:aws:iam::123456789012:role/other".into(),
                ..(*b.role).clone()
            });
            assert!(b.cache.get_now(&b.pod, &other).is_none());
            let o = b.cache.get(&b.pod, &other).await;
            assert_ne!(key(&o), key(&a));
            assert_eq!(calls(&b), 2);
            let now = b.cache.get_now(&b.pod, &other).unwrap();
            assert_eq!(now.creds.access_key_id, key(&o));
            let now = b.cache.get_now(&b.pod, &b.role).unwrap();
            assert_eq!(now.creds.access_key_id, key(&a));
        })
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn evicting_a_pod_leaves_the_other_pods_sets_where_requests_find_them() {
        bounded(async {
            let b = bed();
            let second = other_pod(&b, 2);
            b.cache.get(&b.pod, &b.role).await.unwrap();
            b.cache.get(&second, &b.role).await.unwrap();
            b.cache.evict_pod(&b.pod.uid);
            assert!(b.cache.get_now(&second, &b.role).is_some());
            assert!(b.cache.describe(&second, &b.role.role_arn).cached);
            assert!(b.cache.get_now(&b.pod, &b.role).is_none());
            assert!(!b.cache.describe(&b.pod, &b.role.role_arn).cached);
            assert_eq!(calls(&b), 2);
        })
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_racing_its_pods_eviction_does_not_bring_the_session_back() {
        bounded(async {
            let b = bed();
            b.cache.get(&b.pod, &b.role).await.unwrap();
            // A request found the slot in the index; the pod is evicted before the request
            // records it as a member (`slot` and `get_now` do that after the lookup).
            let slot = b.cache.indexed(&b.pod, &b.role).unwrap();
            b.cache.evict_pod(&b.pod.uid);
            b.cache.join(&slot, &b.pod);
            // In pod scope a slot's only member is its pod: once gone, it stays gone, so the
            // cache's invalidation (a predicate on empty members) still drops the slot.
            assert!(slot.members.load().is_empty());
            assert!(!b.cache.has_pod(&b.pod.uid));
            assert!(b.cache.is_empty().await);
        })
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn stats_count_the_unexpired_sets_and_the_least_time_left() {
        bounded(async {
            let b = bed();
            assert_eq!(b.cache.stats(), (0, Duration::ZERO));
            b.cache.get(&b.pod, &b.role).await.unwrap();
            b.clock.advance(10 * MINUTE);
            b.cache.get(&other_pod(&b, 2), &b.role).await.unwrap();
            assert_eq!(b.cache.stats(), (2, 50 * MINUTE));
            // The first set expires; the second has 9 minutes left.
            b.clock.advance(51 * MINUTE);
            assert_eq!(b.cache.stats(), (1, 9 * MINUTE));
        })
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn len_and_has_pod_count_what_the_cache_holds() {
        bounded(async {
            let b = bed();
            let second = other_pod(&b, 2);
            assert!(b.cache.is_empty().await);
            b.cache.get(&b.pod, &b.role).await.unwrap();
            assert_eq!(b.cache.len().await, 1);
            assert!(!b.cache.is_empty().await);
            assert!(b.cache.has_pod(&b.pod.uid));
            assert!(
                !b.cache.has_pod(&second.uid),
                "another pod's set is not its"
            );
            // A refused pod has a slot but no credentials.
            lock(&b.sts.failures).push(refusal());
            assert!(b.cache.get(&second, &b.role).await.is_err());
            assert_eq!(b.cache.len().await, 2);
            assert!(!b.cache.has_pod(&second.uid), "refused: nothing cached");
            b.cache.evict_pod(&b.pod.uid);
            b.cache.evict_pod(&second.uid);
            assert_eq!(b.cache.len().await, 0);
            assert!(b.cache.is_empty().await);
        })
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn an_urgent_caller_that_gives_up_does_not_hold_back_background_work() {
        bounded(async {
            let l = Limiter::new(100, 1);
            drop(l.acquire(Priority::Urgent).await);
            // The next start is a second away: this request goes away while it waits.
            let gave_up =
                tokio::time::timeout(Duration::from_millis(100), l.acquire(Priority::Urgent)).await;
            assert!(gave_up.is_err(), "it was still waiting");
            let t0 = tokio::time::Instant::now();
            let background =
                tokio::time::timeout(Duration::from_secs(10), l.acquire(Priority::Background))
                    .await;
            assert!(background.is_ok(), "background work waits for nobody now");
            // It takes the next start (a second after the last), not a later one.
            assert!(
                t0.elapsed() < Duration::from_millis(1200),
                "{:?}",
                t0.elapsed()
            );
        })
        .await
    }
}
