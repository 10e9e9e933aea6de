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

/// Handles to the series requests update, each taken from its family on first use.
struct Hot {
    requests: [[OnceLock<Counter>; CODES.len()]; ROUTES.len()],
    seconds: [OnceLock<LatencyHistogram>; ROUTES.len()],
    lookups: [OnceLock<Counter>; LOOKUPS.len()],
}

impl Hot {
    fn new() -> Self {
        Hot {
            requests: std::array::from_fn(|_| std::array::from_fn(|_| OnceLock::new())),
            seconds: std::array::from_fn(|_| OnceLock::new()),
            lookups: std::array::from_fn(|_| OnceLock::new()),
        }
    }
}

fn position(list: &[&str], s: &str) -> Option<usize> {
    list.iter().position(|x| *x == s)
}

/// A latency histogram whose observations are relaxed atomic adds: requests of different pods
/// never wait for one another to record their time (prometheus-client's own takes a mutex).
#[derive(Debug, Clone)]
pub struct LatencyHistogram(std::sync::Arc<HistogramInner>);

#[derive(Debug)]
struct HistogramInner {
    bounds: Vec<f64>,
    /// One per bound, then +Inf.
    counts: Vec<AtomicU64>,
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl LatencyHistogram {
    fn new(bounds: impl IntoIterator<Item = f64>) -> Self {
        let bounds: Vec<f64> = bounds.into_iter().collect();
        let counts = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        LatencyHistogram(std::sync::Arc::new(HistogramInner {
            bounds,
            counts,
            count: AtomicU64::new(0),
            sum_nanos: AtomicU64::new(0),
        }))
    }

    pub fn observe(&self, seconds: f64) {
        let h = &self.0;
        let i = h
            .bounds
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(h.bounds.len());
        h.counts[i].fetch_add(1, Ordering::Relaxed);
        h.count.fetch_add(1, Ordering::Relaxed);
        // Saturating float-to-int cast: a negative or NaN value adds nothing.
        h.sum_nanos
            .fetch_add((seconds * 1e9) as u64, Ordering::Relaxed);
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
            h.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
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
            hot: Hot::new(),
            token_requests,
            sts_calls,
            refreshes,
            registrations,
            rule_restorations,
            cni_rechains,
            pods,
            connections_refused,
        }
    }

    pub fn request(&self, route: &'static str, status: u16, seconds: f64) {
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

    pub fn lookup(&self, result: &'static str) {
        let series = || self.lookups.get_or_create(&[("result", result)]).clone();
        match position(&LOOKUPS, result) {
            Some(i) => self.hot.lookups[i].get_or_init(series).inc(),
            None => series().inc(),
        };
    }

    /// A TokenRequest call: `success` or the error's metric label.
    pub fn count_token_request(&self, outcome: &'static str) {
        self.token_requests
            .get_or_create(&vec![("outcome", outcome)])
            .inc();
    }

    /// An `AssumeRoleWithWebIdentity` call: `success` or the error's metric label.
    pub fn count_sts_call(&self, outcome: &'static str) {
        self.sts_calls
            .get_or_create(&vec![("outcome", outcome)])
            .inc();
    }

    pub fn refreshes(&self, outcome: &'static str) {
        self.refreshes
            .get_or_create(&vec![("outcome", outcome)])
            .inc();
    }

    pub fn registration(&self, op: &'static str, ok: bool) {
        self.registrations
            .get_or_create(&vec![
                ("op", op),
                ("result", if ok { "ok" } else { "refused" }),
            ])
            .inc();
    }

    pub fn rule_restored(&self) {
        self.rule_restorations.inc();
    }

    pub fn cni_rechained(&self) {
        self.cni_rechains.inc();
    }

    pub fn set_pods(&self, n: usize) {
        self.pods.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// A connection closed at accept: `listener` is `imds` or `ops`, `reason` the refusal's label.
    pub fn connection_refused(&self, listener: &'static str, reason: &'static str) {
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
}
