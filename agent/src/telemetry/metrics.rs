//! Prometheus metrics, `irsa_imds_*`.
//!
//! Each `Metrics` owns its registry, so each test owns its own. Labels are `&'static str` that
//! the callers take from their `metric_label()` methods, never from `Debug`: nothing secret is
//! ever a label, and this module needs none of the callers' types.

use std::sync::Mutex;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, &'static str)>;

pub struct Metrics {
    registry: Mutex<Registry>,
    requests: Family<Labels, Counter>,
    request_seconds: Family<Labels, Histogram>,
    lookups: Family<Labels, Counter>,
    token_requests: Family<Labels, Counter>,
    sts_calls: Family<Labels, Counter>,
    refreshes: Family<Labels, Counter>,
    registrations: Family<Labels, Counter>,
    rule_restorations: Counter,
    cni_rechains: Counter,
    pods: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::default();
        let requests = Family::<Labels, Counter>::default();
        let request_seconds = Family::<Labels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.5, 12))
        });
        let lookups = Family::<Labels, Counter>::default();
        let token_requests = Family::<Labels, Counter>::default();
        let sts_calls = Family::<Labels, Counter>::default();
        let refreshes = Family::<Labels, Counter>::default();
        let registrations = Family::<Labels, Counter>::default();
        let rule_restorations = Counter::default();
        let cni_rechains = Counter::default();
        let pods = Gauge::default();
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
        Metrics {
            registry: Mutex::new(r),
            requests,
            request_seconds,
            lookups,
            token_requests,
            sts_calls,
            refreshes,
            registrations,
            rule_restorations,
            cni_rechains,
            pods,
        }
    }

    pub fn request(&self, route: &'static str, status: u16, seconds: f64) {
        self.requests
            .get_or_create(&vec![("route", route), ("code", status_label(status))])
            .inc();
        self.request_seconds
            .get_or_create(&vec![("route", route)])
            .observe(seconds);
    }

    pub fn lookup(&self, result: &'static str) {
        self.lookups.get_or_create(&vec![("result", result)]).inc();
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
