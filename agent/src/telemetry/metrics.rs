//! Prometheus metrics, `irsa_imds_*`.
//!
//! Each `Metrics` owns its registry, so each test owns its own. Labels are `&'static str` that
//! the callers take from their `metric_label()` methods, never from `Debug`: nothing secret is
//! ever a label, and this module needs none of the callers' types.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::exponential_buckets;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, &'static str)>;
/// Fixed-size label sets for the families every request touches: no allocation to look one up.
type Label1 = [(&'static str, &'static str); 1];
type Label2 = [(&'static str, &'static str); 2];

/// The label values requests use, so their series are resolved once and then updated without
/// a lookup or a lock (`Hot`).
const ROUTES: [&str; 7] = [
    "rejected",
    "token",
    "role_list",
    "credentials",
    "info",
    "iam_index",
    "upstream",
];
const CODES: [&str; 9] = [
    "200", "400", "401", "403", "404", "405", "414", "5xx", "other",
];
const LOOKUPS: [&str; 5] = ["found", "unknown", "pending", "ambiguous", "host_network"];

/// Every value `irsa_imds_sts_results_total{code}` takes: STS's own error codes that tell an
/// operator what to fix, and a few classes for the rest. Fixed, so the series count is too.
pub const STS_CODES: [&str; 10] = [
    "ok",
    "Throttling",
    "AccessDenied",
    "InvalidIdentityToken",
    "ExpiredToken",
    "IDPCommunicationError",
    "timeout",
    "network",
    "5xx",
    "other",
];

/// Every value `irsa_imds_not_found_total{reason}` takes (the protocol's refusal reasons); a
/// reason outside it counts as `other`.
pub const NOT_FOUND_REASONS: [&str; 9] = [
    "unknown_source",
    "ambiguous",
    "host_network",
    "terminal",
    "no_role",
    "role_not_allowed",
    "invalid_role",
    "wrong_role_name",
    "other",
];

/// STS and TokenRequest round trips: from a few milliseconds to the 5 s call timeout and beyond.
fn exchange_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.005, 2.0, 12)
}

/// Handles to the series requests update, each taken from its family on first use.
struct Hot {
    requests: [[OnceLock<Counter>; CODES.len()]; ROUTES.len()],
    seconds: [OnceLock<LatencyHistogram>; ROUTES.len()],
    lookups: [OnceLock<Counter>; LOOKUPS.len()],
    /// Registered with the rest, so every reason is exported (as 0) from the start.
    not_found: [Counter; NOT_FOUND_REASONS.len()],
}

impl Hot {
    fn new(not_found: &Family<Label1, Counter>) -> Self {
        Hot {
            requests: std::array::from_fn(|_| std::array::from_fn(|_| OnceLock::new())),
            seconds: std::array::from_fn(|_| OnceLock::new()),
            lookups: std::array::from_fn(|_| OnceLock::new()),
            not_found: std::array::from_fn(|i| {
                not_found
                    .get_or_create(&[("reason", NOT_FOUND_REASONS[i])])
                    .clone()
            }),
        }
    }
}

fn position(list: &[&str], s: &str) -> Option<usize> {
    list.iter().position(|x| *x == s)
}

/// A latency histogram whose observations are relaxed atomic updates: requests of different
/// pods never wait for one another to record their time (prometheus-client's own `Histogram`
/// takes a mutex on every `observe`). It exports exactly what that one would for the same
/// observations: the same buckets (finite bounds, then +Inf), and the sum kept as an `f64`
/// (its bits in an `AtomicU64`, added with a compare-exchange loop), so the text is the same
/// byte for byte (the unit tests compare the two).
#[derive(Debug, Clone)]
pub(crate) struct LatencyHistogram(std::sync::Arc<HistogramInner>);

#[derive(Debug)]
struct HistogramInner {
    /// The finite upper bounds, ascending; +Inf is implicit (the last count).
    bounds: Vec<f64>,
    /// One per bound, then +Inf.
    counts: Vec<AtomicU64>,
    count: AtomicU64,
    /// `f64::to_bits` of the sum of every observed value.
    sum_bits: AtomicU64,
}

impl LatencyHistogram {
    fn new(bounds: impl IntoIterator<Item = f64>) -> Self {
        let bounds: Vec<f64> = bounds.into_iter().filter(|b| b.is_finite()).collect();
        let counts = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        LatencyHistogram(std::sync::Arc::new(HistogramInner {
            bounds,
            counts,
            count: AtomicU64::new(0),
            sum_bits: AtomicU64::new(0.0_f64.to_bits()),
        }))
    }

    pub(crate) fn observe(&self, seconds: f64) {
        let h = &self.0;
        // The first bound at or above the value; NaN and values above every bound go to +Inf.
        let i = h
            .bounds
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(h.bounds.len());
        if let Some(c) = h.counts.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        h.count.fetch_add(1, Ordering::Relaxed);
        // Lock-free: a writer that loses the race retries with the sum the winner stored.
        // The closure always returns `Some`, so this never fails; the result is ignored.
        let _ = h
            .sum_bits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + seconds).to_bits())
            });
    }
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let h = &self.0;
        let buckets: Vec<(f64, u64)> = h
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(h.counts.iter().map(|c| c.load(Ordering::Relaxed)))
            .collect();
        encoder.encode_histogram::<NoLabelSet>(
            f64::from_bits(h.sum_bits.load(Ordering::Relaxed)),
            h.count.load(Ordering::Relaxed),
            &buckets,
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

pub struct Metrics {
    registry: Mutex<Registry>,
    requests: Family<Label2, Counter>,
    request_seconds: Family<Label1, LatencyHistogram>,
    lookups: Family<Label1, Counter>,
    hot: Hot,
    token_requests: Family<Labels, Counter>,
    sts_calls: Family<Labels, Counter>,
    refreshes: Family<Labels, Counter>,
    registrations: Family<Labels, Counter>,
    rule_restorations: Counter,
    cni_rechains: Counter,
    pods: Gauge,
    connections_refused: Family<Label2, Counter>,
    sts_seconds: LatencyHistogram,
    token_request_seconds: LatencyHistogram,
    /// One per [`STS_CODES`] entry, registered up front.
    sts_results: [Counter; STS_CODES.len()],
    cached_credentials: Gauge,
    min_remaining: Gauge,
    ready: Gauge,
    /// Registered only in host mode / with a chain state: absent where the agent does not manage
    /// them, so an alert on `== 0` never fires for a setup that has none.
    redirect_rule: OnceLock<Gauge>,
    cni_chain: OnceLock<Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::default();
        let requests = Family::<Label2, Counter>::default();
        let request_seconds = Family::<Label1, LatencyHistogram>::new_with_constructor(|| {
            LatencyHistogram::new(exponential_buckets(0.0005, 2.5, 12))
        });
        let lookups = Family::<Label1, Counter>::default();
        let token_requests = Family::<Labels, Counter>::default();
        let sts_calls = Family::<Labels, Counter>::default();
        let refreshes = Family::<Labels, Counter>::default();
        let registrations = Family::<Labels, Counter>::default();
        let rule_restorations = Counter::default();
        let cni_rechains = Counter::default();
        let pods = Gauge::default();
        let connections_refused = Family::<Label2, Counter>::default();
        let not_found = Family::<Label1, Counter>::default();
        let sts_seconds = LatencyHistogram::new(exchange_buckets());
        let token_request_seconds = LatencyHistogram::new(exchange_buckets());
        let sts_result_family = Family::<Label1, Counter>::default();
        let sts_results = std::array::from_fn(|i| {
            sts_result_family
                .get_or_create(&[("code", STS_CODES[i])])
                .clone()
        });
        let cached_credentials = Gauge::default();
        let min_remaining = Gauge::default();
        let ready = Gauge::default();
        let build_info = Family::<Label2, Gauge>::default();
        build_info
            .get_or_create(&[
                ("version", env!("CARGO_PKG_VERSION")),
                ("arch", std::env::consts::ARCH),
            ])
            .set(1);
        r.register(
            "irsa_imds_build_info",
            "The agent's version and CPU architecture (always 1)",
            build_info,
        );
        r.register(
            "irsa_imds_ready",
            "Whether the agent is ready (1: its node's pods are listed and watched), as /readyz",
            ready.clone(),
        );
        r.register(
            "irsa_imds_not_found",
            "IMDS 404 answers by reason",
            not_found.clone(),
        );
        r.register(
            "irsa_imds_sts_duration_seconds",
            "AssumeRoleWithWebIdentity round trips (each attempt)",
            sts_seconds.clone(),
        );
        r.register(
            "irsa_imds_token_request_duration_seconds",
            "TokenRequest round trips to the API server",
            token_request_seconds.clone(),
        );
        r.register(
            "irsa_imds_sts_results",
            "AssumeRoleWithWebIdentity results by STS error code (a fixed set; ok = credentials)",
            sts_result_family,
        );
        r.register(
            "irsa_imds_cached_credentials",
            "Credential sets held for pods of this node",
            cached_credentials.clone(),
        );
        r.register(
            "irsa_imds_credentials_min_remaining_seconds",
            "Least lifetime left among the cached credential sets (0 when none)",
            min_remaining.clone(),
        );
        r.register(
            "irsa_imds_requests",
            "IMDS requests by route and status",
            requests.clone(),
        );
        r.register(
            "irsa_imds_request_duration_seconds",
            "IMDS request latency by route",
            request_seconds.clone(),
        );
        r.register(
            "irsa_imds_pod_lookups",
            "Caller identification results (ambiguous = refused IP conflicts)",
            lookups.clone(),
        );
        r.register(
            "irsa_imds_token_requests",
            "TokenRequest calls by outcome",
            token_requests.clone(),
        );
        r.register(
            "irsa_imds_sts_calls",
            "AssumeRoleWithWebIdentity calls by outcome",
            sts_calls.clone(),
        );
        r.register(
            "irsa_imds_credential_refreshes",
            "Background credential refreshes by outcome",
            refreshes.clone(),
        );
        r.register(
            "irsa_imds_cni_registrations",
            "CNI registrations by op and result",
            registrations.clone(),
        );
        r.register(
            "irsa_imds_redirect_rule_restorations",
            "Times the redirect rule had to be restored",
            rule_restorations.clone(),
        );
        r.register(
            "irsa_imds_cni_rechained",
            "Times the CNI hook had to be chained again into the node's active conflist",
            cni_rechains.clone(),
        );
        r.register(
            "irsa_imds_pods",
            "Pods of this node in the index",
            pods.clone(),
        );
        r.register(
            "irsa_imds_connections_refused",
            "Connections closed at accept, by listener and reason",
            connections_refused.clone(),
        );
        Metrics {
            registry: Mutex::new(r),
            requests,
            request_seconds,
            lookups,
            hot: Hot::new(&not_found),
            token_requests,
            sts_calls,
            refreshes,
            registrations,
            rule_restorations,
            cni_rechains,
            pods,
            connections_refused,
            sts_seconds,
            token_request_seconds,
            sts_results,
            cached_credentials,
            min_remaining,
            ready,
            redirect_rule: OnceLock::new(),
            cni_chain: OnceLock::new(),
        }
    }

    /// A 404 answered to a caller, by the reason's metric label: one relaxed add on a handle
    /// resolved at start (no lookup in a family, no lock, no allocation).
    pub(crate) fn not_found(&self, reason: &'static str) {
        let i = position(&NOT_FOUND_REASONS, reason).unwrap_or(NOT_FOUND_REASONS.len() - 1);
        self.hot.not_found[i].inc();
    }

    /// One `AssumeRoleWithWebIdentity` attempt: its STS code (one of [`STS_CODES`]; anything
    /// else counts as `other`) and how long it took.
    pub(crate) fn sts_result(&self, code: &'static str, seconds: f64) {
        let i = position(&STS_CODES, code).unwrap_or(STS_CODES.len() - 1);
        self.sts_results[i].inc();
        self.sts_seconds.observe(seconds);
    }

    /// How long one TokenRequest took.
    pub(crate) fn token_request_seconds(&self, seconds: f64) {
        self.token_request_seconds.observe(seconds);
    }

    /// The credential sets cached now and the least lifetime left among them.
    pub(crate) fn set_cached_credentials(&self, sets: usize, min_remaining_secs: u64) {
        self.cached_credentials
            .set(i64::try_from(sets).unwrap_or(i64::MAX));
        self.min_remaining
            .set(i64::try_from(min_remaining_secs).unwrap_or(i64::MAX));
    }

    /// Whether `/readyz` says ready (set at each scrape).
    pub(crate) fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    /// Host mode: whether the redirect rules are in place (after install and every reconcile).
    pub fn set_redirect_rule(&self, installed: bool) {
        self.flag(&self.redirect_rule, "irsa_imds_redirect_rule_installed",
            "Whether the host redirect rules are in place (1) or missing and not restorable (0); host mode only")
            .set(i64::from(installed));
    }

    /// With a chain state: whether the CNI hook is in the node's active conflist.
    pub fn set_cni_chain(&self, present: bool) {
        self.flag(&self.cni_chain, "irsa_imds_cni_chain_present",
            "Whether the CNI hook is chained in the node's active conflist (1) or not (0); with --cni-chain-state only")
            .set(i64::from(present));
    }

    /// The gauge in `slot`, registered on first use (rare: once per process).
    fn flag<'a>(&self, slot: &'a OnceLock<Gauge>, name: &str, help: &str) -> &'a Gauge {
        slot.get_or_init(|| {
            let g = Gauge::default();
            self.registry
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .register(name, help, g.clone());
            g
        })
    }

    /// `irsa_imds_redirect_rule_installed` as last set; `None` when not in host mode.
    pub fn redirect_rule(&self) -> Option<bool> {
        self.redirect_rule.get().map(|g| g.get() == 1)
    }

    /// `irsa_imds_cni_chain_present` as last set; `None` without a chain state.
    pub fn cni_chain(&self) -> Option<bool> {
        self.cni_chain.get().map(|g| g.get() == 1)
    }

    /// `irsa_imds_sts_results_total{code}` (tests and the benchmark).
    pub fn sts_results(&self, code: &str) -> u64 {
        position(&STS_CODES, code).map_or(0, |i| self.sts_results[i].get())
    }

    /// `irsa_imds_not_found_total{reason}` (tests).
    pub fn not_found_count(&self, reason: &str) -> u64 {
        position(&NOT_FOUND_REASONS, reason).map_or(0, |i| self.hot.not_found[i].get())
    }

    pub(crate) fn request(&self, route: &'static str, status: u16, seconds: f64) {
        let code = status_label(status);
        let series = || {
            self.requests
                .get_or_create(&[("route", route), ("code", code)])
                .clone()
        };
        let latency = || {
            self.request_seconds
                .get_or_create(&[("route", route)])
                .clone()
        };
        match (position(&ROUTES, route), position(&CODES, code)) {
            (Some(r), Some(c)) => {
                self.hot.requests[r][c].get_or_init(series).inc();
                self.hot.seconds[r].get_or_init(latency).observe(seconds);
            }
            _ => {
                series().inc();
                latency().observe(seconds);
            }
        }
    }

    pub(crate) fn lookup(&self, result: &'static str) {
        let series = || self.lookups.get_or_create(&[("result", result)]).clone();
        match position(&LOOKUPS, result) {
            Some(i) => self.hot.lookups[i].get_or_init(series).inc(),
            None => series().inc(),
        };
    }

    /// A TokenRequest call: `success` or the error's metric label.
    pub(crate) fn count_token_request(&self, outcome: &'static str) {
        self.token_requests
            .get_or_create(&vec![("outcome", outcome)])
            .inc();
    }

    /// An `AssumeRoleWithWebIdentity` call: `success` or the error's metric label.
    pub(crate) fn count_sts_call(&self, outcome: &'static str) {
        self.sts_calls
            .get_or_create(&vec![("outcome", outcome)])
            .inc();
    }

    pub fn refreshes(&self, outcome: &'static str) {
        self.refreshes
            .get_or_create(&vec![("outcome", outcome)])
            .inc();
    }

    pub(crate) fn registration(&self, op: &'static str, ok: bool) {
        self.registrations
            .get_or_create(&vec![
                ("op", op),
                ("result", if ok { "ok" } else { "refused" }),
            ])
            .inc();
    }

    pub(crate) fn rule_restored(&self) {
        self.rule_restorations.inc();
    }

    pub(crate) fn cni_rechained(&self) {
        self.cni_rechains.inc();
    }

    pub(crate) fn set_pods(&self, n: usize) {
        self.pods.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// A connection closed at accept: `listener` is `imds` or `ops`, `reason` the refusal's label.
    pub(crate) fn connection_refused(&self, listener: &'static str, reason: &'static str) {
        self.connections_refused
            .get_or_create(&[("listener", listener), ("reason", reason)])
            .inc();
    }

    /// Counter value for tests: `irsa_imds_connections_refused_total{listener,reason}`.
    pub fn connections_refused(&self, listener: &'static str, reason: &'static str) -> u64 {
        self.connections_refused
            .get_or_create(&[("listener", listener), ("reason", reason)])
            .get()
    }

    /// Counter value for tests and the benchmark: `irsa_imds_sts_calls_total{outcome}`.
    pub fn sts_calls(&self, outcome: &'static str) -> u64 {
        self.sts_calls
            .get_or_create(&vec![("outcome", outcome)])
            .get()
    }

    pub fn token_requests(&self, outcome: &'static str) -> u64 {
        self.token_requests
            .get_or_create(&vec![("outcome", outcome)])
            .get()
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let reg = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &reg);
        out
    }
}

fn status_label(s: u16) -> &'static str {
    match s {
        200 => "200",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        414 => "414",
        500..=599 => "5xx",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_uses_project_names_and_suffixes() {
        let m = Metrics::new();
        m.request("credentials", 200, 0.001);
        m.count_sts_call("sts_rejected");
        let text = m.encode();
        assert!(
            text.contains("irsa_imds_requests_total{route=\"credentials\",code=\"200\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("irsa_imds_sts_calls_total{outcome=\"sts_rejected\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("irsa_imds_request_duration_seconds_bucket"),
            "{text}"
        );
        assert_eq!(m.sts_calls("sts_rejected"), 1);
    }

    use prometheus_client::metrics::histogram::Histogram;

    /// The request histograms' buckets, as in `Metrics::new`.
    fn request_buckets() -> impl Iterator<Item = f64> {
        exponential_buckets(0.0005, 2.5, 12)
    }

    /// Ours and prometheus-client's (same buckets), each in a family under one route label as the
    /// agent exports them, fed the same values: the text is the same byte for byte. (One series
    /// per family: a family's series come out in its hash map's order, which differs between two.)
    fn assert_same_exposition(values: &[f64]) {
        let ours = Family::<Label1, LatencyHistogram>::new_with_constructor(|| {
            LatencyHistogram::new(request_buckets())
        });
        let theirs =
            Family::<Label1, Histogram>::new_with_constructor(|| Histogram::new(request_buckets()));
        let label = [("route", "credentials")];
        // Created even with no values: an empty histogram exports its zeros.
        let (a, b) = (ours.get_or_create(&label), theirs.get_or_create(&label));
        for v in values {
            a.observe(*v);
            b.observe(*v);
        }
        drop((a, b));
        let ours = text(ours);
        assert!(
            ours.contains("h_seconds_bucket{le=\"0.0005\",route=\"credentials\"}"),
            "{ours}"
        );
        assert_eq!(ours, text(theirs));
    }

    fn text(m: impl prometheus_client::registry::Metric) -> String {
        let mut r = Registry::default();
        r.register("h_seconds", "latency", m);
        let mut out = String::new();
        encode(&mut out, &r).unwrap();
        out
    }

    #[test]
    fn lock_free_histogram_exports_what_prometheus_clients_does() {
        // Every bound exactly (le is inclusive), just above each, below the first, above the
        // last, zero, sums inexact in binary (0.1 + 0.2), a sub-nanosecond value.
        let mut values: Vec<f64> = request_buckets().flat_map(|b| [b, b * 1.000_001]).collect();
        values.extend([
            0.0,
            0.1,
            0.2,
            0.3,
            1e-10,
            3e-4,
            42.0,
            1e9,
            0.000_123_456_789,
        ]);
        values.extend((1..200).map(|i| f64::from(i) / 7_000.0));
        assert_same_exposition(&values);
        // NaN and negative values as prometheus-client takes them (NaN counted in +Inf).
        assert_same_exposition(&[-1.5, 0.002, 0.25]);
        assert_same_exposition(&[0.002, f64::NAN, 0.25]);
        // Nothing observed: the same zeros.
        assert_same_exposition(&[]);
    }

    #[test]
    fn lock_free_histogram_counts_exactly_under_concurrent_observers() {
        const THREADS: usize = 4;
        const EACH: usize = 20_000;
        // Sums of these are exact in f64 in any order, so the totals are known exactly.
        const VALUES: [f64; 5] = [0.0, 0.25, 1.0, 8.0, 100.0];
        let h = LatencyHistogram::new(request_buckets());
        let start = std::sync::Barrier::new(THREADS);
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let (h, start) = (h.clone(), &start);
                s.spawn(move || {
                    start.wait();
                    for i in 0..EACH {
                        h.observe(VALUES[(i + t) % VALUES.len()]);
                    }
                });
            }
        });
        let total = (THREADS * EACH) as u64;
        let per_value = total / VALUES.len() as u64;
        assert_eq!(h.0.count.load(Ordering::Relaxed), total);
        let sum = f64::from_bits(h.0.sum_bits.load(Ordering::Relaxed));
        assert_eq!(sum, per_value as f64 * VALUES.iter().sum::<f64>());
        let counts: Vec<u64> =
            h.0.counts
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect();
        // 0 -> le 0.0005, 0.25 -> le 0.305..., 1 -> le 1.907..., 8 -> le 11.92..., 100 -> +Inf.
        let mut expected = vec![0; 13];
        for i in [0, 7, 9, 11, 12] {
            expected[i] = per_value;
        }
        assert_eq!(counts, expected);
        // And the same text as prometheus-client's, fed the same values one by one.
        let theirs = Histogram::new(request_buckets());
        for _ in 0..per_value {
            for v in VALUES {
                theirs.observe(v);
            }
        }
        assert_eq!(text(h.clone()), text(theirs));
    }
}
