//! The credential cache: keyed by (pod uid, role ARN), single-flight, refreshed ahead of expiry.
//!
//! - One slot per key (moka, idle slots dropped after one credential lifetime). A slot's fetch
//!   lock makes N concurrent misses cost one TokenRequest and one STS call.
//! - Served credentials keep at least [`MIN_SERVED_REMAINING`]; slots are refreshed in the
//!   background once they have `refresh_at_remaining` left, with jittered backoff on failure.
//! - While STS is down, unexpired credentials are served down to [`EXPIRY_SKEW`]; never expired ones.
//! - Refusals (AccessDenied, a bad trust policy) are remembered for `negative_ttl`, not hammered.
//!
//! The numbers are in [`super::freshness`].

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use super::freshness::{
    EXPIRY_SKEW, MIN_SERVED_REMAINING, REFRESH_BACKOFF_BASE, REFRESH_BACKOFF_MAX,
    SHORT_SESSION_GRACE,
};
use super::{
    AssumeRequest, Clock, Credentials, IdentityError, RoleExchange, RoleSpec, TokenMinter,
    outcome_label, session_name,
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
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    uid: String,
    role_arn: String,
}

struct Slot {
    pod: Arc<PodInfo>,
    role: Arc<RoleSpec>,
    current: Mutex<Option<Credentials>>,
    /// A recent refusal, served until the instant given.
    refused: Mutex<Option<(IdentityError, SystemTime)>>,
    next_refresh_try: Mutex<Option<SystemTime>>,
    refresh_failures: AtomicU32,
    fetch: tokio::sync::Mutex<()>,
}

impl Slot {
    fn current(&self) -> Option<Credentials> {
        lock(&self.current).clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn remaining(c: &Credentials, now: SystemTime) -> Duration {
    c.expiration.duration_since(now).unwrap_or(Duration::ZERO)
}

/// Called when a role cannot be assumed (for Kubernetes Events).
pub type FailureHook = Arc<dyn Fn(&PodInfo, &RoleSpec, &IdentityError) + Send + Sync>;

pub struct CredentialCache {
    slots: moka::future::Cache<Key, Arc<Slot>>,
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
        let slots = moka::future::Cache::builder()
            .max_capacity(100_000)
            .time_to_idle(settings.duration)
            .support_invalidation_closures()
            .build();
        let limiter = Limiter::new(settings.max_concurrent, settings.rate_per_sec);
        CredentialCache {
            slots,
            minter,
            sts,
            clock,
            limiter,
            settings,
            metrics,
            on_failure: None,
        }
    }

    pub fn with_failure_hook(mut self, hook: FailureHook) -> Self {
        self.on_failure = Some(hook);
        self
    }

    /// Credentials for `pod` in `role`, with at least 30 minutes left whenever STS answers.
    pub async fn get(
        self: &Arc<Self>,
        pod: &Arc<PodInfo>,
        role: &Arc<RoleSpec>,
    ) -> Result<Credentials, IdentityError> {
        let key = Key {
            uid: pod.uid.clone(),
            role_arn: role.role_arn.clone(),
        };
        let slot = self
            .slots
            .get_with(key, async {
                Arc::new(Slot {
                    pod: pod.clone(),
                    role: role.clone(),
                    current: Mutex::new(None),
                    refused: Mutex::new(None),
                    next_refresh_try: Mutex::new(None),
                    refresh_failures: AtomicU32::new(0),
                    fetch: tokio::sync::Mutex::new(()),
                })
            })
            .await;

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
        // Whoever held the lock before may have fetched already.
        if let Some(c) = self.servable(&slot) {
            return Ok(c);
        }
        match self.fetch(&slot).await {
            Ok(c) => Ok(c),
            Err(e) => {
                let now = self.clock.now();
                match slot.current() {
                    // STS is down: what is still valid is better than nothing.
                    Some(old) if remaining(&old, now) > EXPIRY_SKEW => Ok(old),
                    _ => Err(e),
                }
            }
        }
    }

    /// The slot's credentials if they may be served as they are; starts a background refresh
    /// when they are due for one.
    fn servable(self: &Arc<Self>, slot: &Arc<Slot>) -> Option<Credentials> {
        let c = slot.current()?;
        let now = self.clock.now();
        let left = remaining(&c, now);
        if left <= MIN_SERVED_REMAINING {
            let young = now
                .duration_since(c.issued_at)
                .is_ok_and(|age| age < SHORT_SESSION_GRACE);
            return (young && left > EXPIRY_SKEW).then_some(c);
        }
        if left <= self.settings.refresh_at_remaining {
            let this = self.clone();
            let slot = slot.clone();
            tokio::spawn(async move { this.refresh_slot(&slot).await });
        }
        Some(c)
    }

    /// Mints, exchanges (with retries) and stores; the caller holds the slot's fetch lock.
    async fn fetch(&self, slot: &Slot) -> Result<Credentials, IdentityError> {
        let _permit = self.limiter.acquire().await;
        let result = self.exchange(slot).await;
        let now = self.clock.now();
        match &result {
            Ok(c) => {
                *lock(&slot.current) = Some(c.clone());
                *lock(&slot.refused) = None;
                *lock(&slot.next_refresh_try) = None;
                slot.refresh_failures.store(0, Ordering::Relaxed);
            }
            Err(e) => {
                if !e.retryable() {
                    *lock(&slot.refused) = Some((e.clone(), now + self.settings.negative_ttl));
                }
                tracing::warn!(
                    pod = %slot.pod.name, namespace = %slot.pod.namespace, role = %slot.role.role_arn,
                    error = %e, "cannot obtain credentials"
                );
                if let Some(hook) = &self.on_failure {
                    hook(&slot.pod, &slot.role, e);
                }
            }
        }
        result
    }

    async fn exchange(&self, slot: &Slot) -> Result<Credentials, IdentityError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let r = self.exchange_once(slot).await;
            match r {
                Err(e) if e.retryable() && attempt < MAX_ATTEMPTS => {
                    tokio::time::sleep(jittered(RETRY_BASE * 2u32.pow(attempt - 1))).await;
                }
                other => return other,
            }
        }
    }

    async fn exchange_once(&self, slot: &Slot) -> Result<Credentials, IdentityError> {
        let (pod, role) = (&slot.pod, &slot.role);
        let token = self
            .minter
            .mint(pod, &role.audience, role.token_expiration_secs)
            .await;
        self.metrics.count_token_request(outcome_label(&token));
        let req = AssumeRequest {
            role_arn: role.role_arn.clone(),
            session_name: session_name(&pod.namespace, &pod.name),
            web_identity_token: token?,
            duration_secs: i32::try_from(self.settings.duration.as_secs()).unwrap_or(3600),
            regional: role.regional_sts,
        };
        let r = self.sts.assume(&req).await;
        self.metrics.count_sts_call(outcome_label(&r));
        r
    }

    async fn refresh_slot(&self, slot: &Slot) {
        let now = self.clock.now();
        if lock(&slot.next_refresh_try).is_some_and(|t| now < t) {
            return;
        }
        // Someone is fetching this slot already.
        let Ok(_guard) = slot.fetch.try_lock() else {
            return;
        };
        if slot.current().is_some_and(|c| {
            remaining(&c, now) > self.settings.refresh_at_remaining
                || now
                    .duration_since(c.issued_at)
                    .is_ok_and(|age| age < SHORT_SESSION_GRACE)
        }) {
            return;
        }
        if self.fetch(slot).await.is_err() {
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
                    .is_some_and(|c| remaining(&c, now) <= self.settings.refresh_at_remaining)
            })
            .collect();
        let n = due.len();
        futures::future::join_all(due.iter().map(|s| self.refresh_slot(s))).await;
        n
    }

    /// Runs [`refresh_due`](Self::refresh_due) every `every` until `shutdown`.
    pub async fn refresher(
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

    /// Drops every credential of a pod at once (it was deleted or terminated).
    pub fn evict_pod(&self, uid: &str) {
        let uid = uid.to_string();
        if let Err(e) = self.slots.invalidate_entries_if(move |k, _| k.uid == uid) {
            tracing::error!(error = %e, "cannot evict pod credentials");
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
            .any(|(k, s)| k.uid == uid && s.current().is_some())
    }
}

/// A jitter of ±50% keeps a crowd of refreshes from retrying in step.
fn jittered(d: Duration) -> Duration {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 2];
    let r = ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map(|_| u16::from_le_bytes(b))
        .unwrap_or(32768);
    d.mul_f64(0.5 + f64::from(r) / f64::from(u16::MAX))
}

/// Bounds exchanges in flight and their start rate (a GCRA bucket allowing one second's worth
/// as a burst), so hundreds of pods starting at once do not flood STS or the API server.
struct Limiter {
    sem: tokio::sync::Semaphore,
    interval: Duration,
    burst: Duration,
    next: tokio::sync::Mutex<tokio::time::Instant>,
}

impl Limiter {
    fn new(max_concurrent: usize, rate_per_sec: u32) -> Self {
        Limiter {
            sem: tokio::sync::Semaphore::new(max_concurrent.max(1)),
            interval: Duration::from_secs(1) / rate_per_sec.max(1),
            burst: Duration::from_secs(1),
            next: tokio::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }

    async fn acquire(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        let permit = self.sem.acquire().await.ok();
        let at = {
            let mut next = self.next.lock().await;
            let now = tokio::time::Instant::now();
            let floor = now.checked_sub(self.burst).unwrap_or(now);
            let at = (*next).max(floor);
            *next = at + self.interval;
            at
        };
        tokio::time::sleep_until(at).await;
        permit
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
        lifetime: Mutex<Duration>,
    }
    impl RoleExchange for FakeSts {
        fn assume<'a>(
            &'a self,
            req: &'a AssumeRequest,
        ) -> BoxFuture<'a, Result<Credentials, IdentityError>> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            lock(&self.sessions).push(req.session_name.clone());
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

    fn bed() -> Bed {
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
            lifetime: Mutex::new(Duration::from_secs(3600)),
        });
        let settings = CacheSettings {
            duration: Duration::from_secs(3600),
            refresh_at_remaining: Duration::from_secs(45 * 60),
            max_concurrent: 16,
            rate_per_sec: 1000,
            negative_ttl: Duration::from_secs(30),
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
        });
        let role = Arc::new(RoleSpec {
            role_arn: "arn:aws:iam::123456789012:role/app".into(),
            audience: "sts.amazonaws.com".into(),
            token_expiration_secs: 600,
            regional_sts: true,
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
    }

    use std::collections::HashSet;

    #[tokio::test(start_paused = true)]
    async fn credentials_are_refreshed_before_thirty_minutes_are_left() {
        let b = bed();
        let first = b.cache.get(&b.pod, &b.role).await.unwrap();
        // 14 minutes in: 46 left, not yet due.
        b.clock.advance(Duration::from_secs(14 * 60));
        assert_eq!(b.cache.refresh_due().await, 0);
        // 16 minutes in: 44 left, due; the background refresher replaces them.
        b.clock.advance(Duration::from_secs(2 * 60));
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
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_inside_the_last_thirty_minutes_fetches_fresh_ones() {
        let b = bed();
        let first = b.cache.get(&b.pod, &b.role).await.unwrap();
        b.clock.advance(Duration::from_secs(31 * 60));
        let c = b.cache.get(&b.pod, &b.role).await.unwrap();
        assert_ne!(c.access_key_id, first.access_key_id);
        assert!(remaining(&c, b.clock.now()) >= MIN_SERVED_REMAINING);
    }

    #[tokio::test(start_paused = true)]
    async fn sts_down_serves_unexpired_but_never_expired_credentials() {
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
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_is_retried_and_access_denied_is_not() {
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
    }

    #[tokio::test(start_paused = true)]
    async fn evicted_pod_credentials_are_gone_at_once() {
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
    }

    #[tokio::test(start_paused = true)]
    async fn limiter_spreads_a_crowd_over_time() {
        let l = Limiter::new(100, 10);
        let t0 = tokio::time::Instant::now();
        for _ in 0..30 {
            drop(l.acquire().await);
        }
        // 10 in the burst, then 10 per second.
        assert!(
            t0.elapsed() >= Duration::from_millis(1900),
            "{:?}",
            t0.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn short_sessions_are_not_refetched_on_every_request() {
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
    }
}
