//! The operations listener: liveness, readiness (the pod index has synced) and metrics.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;

use crate::pods::PodIndex;
use crate::telemetry::Metrics;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `credential_stats` (sets cached, least lifetime left) is read only when metrics are scraped.
pub(super) fn respond<B>(
    req: &Request<B>,
    index: &PodIndex,
    credential_stats: impl FnOnce() -> (usize, Duration),
    metrics: &Metrics,
) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        (&Method::GET, "/readyz") if index.is_synced() => {
            (StatusCode::OK, "text/plain", "ready\n".to_string())
        }
        (&Method::GET, "/readyz") => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "pod index not synced\n".to_string(),
        ),
        (&Method::GET, "/metrics") => {
            metrics.set_pods(index.pod_count());
            metrics.set_ready(index.is_synced());
            let (sets, least) = credential_stats();
            metrics.set_cached_credentials(sets, least.as_secs());
            (StatusCode::OK, OPENMETRICS, metrics.encode())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str, index: &PodIndex) -> StatusCode {
        let req = Request::get(path).body(()).unwrap();
        respond(&req, index, || (0, Duration::ZERO), &Metrics::new()).status()
    }

    #[test]
    fn ready_only_after_the_first_sync() {
        let index = PodIndex::new();
        assert_eq!(get("/healthz", &index), StatusCode::OK);
        assert_eq!(get("/readyz", &index), StatusCode::SERVICE_UNAVAILABLE);
        index.replace_all(Vec::new());
        assert_eq!(get("/readyz", &index), StatusCode::OK);
        assert_eq!(get("/metrics", &index), StatusCode::OK);
        assert_eq!(get("/other", &index), StatusCode::NOT_FOUND);
    }
}
