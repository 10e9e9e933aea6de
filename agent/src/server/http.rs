//! HTTP plumbing: accept loops with connection and head limits, and the IMDS listener's
//! request-to-reply path around the protocol's decision.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::agent::Agent;
use super::gate::{Gate, Lane, Refusal};
use super::redirect;
use crate::imds::{Answer, Reply, RequestHead, UpstreamPath};

/// Request heads above this size get 431: real metadata requests are a few hundred bytes.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// An accept error (out of descriptors, say) is retried after this instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(20);
/// Paths a connection in the ops listener's reserved places may ask for.
const HEALTH_PATHS: [&str; 2] = ["/healthz", "/readyz"];

/// A listening socket with the limits its connections are served under.
pub(super) struct Listener {
    pub(super) socket: TcpListener,
    pub(super) gate: Arc<Gate>,
    /// A client that has not sent a full request head by then is cut off (slowloris, idle
    /// connections holding places).
    pub(super) header_timeout: Duration,
    /// Refuse connections that did not come through the host redirect (IMDS listener only).
    pub(super) require_redirect: bool,
}

/// Accepts connections until `stop`. Each one is admitted by the listener's gate (or closed at
/// once with a reset and counted) and served by hyper with head-size and head-time limits.
pub(super) fn serve<F, Fut>(
    listener: Listener,
    stop: CancellationToken,
    graceful: &Arc<GracefulShutdown>,
    handler: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn(Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let graceful = graceful.clone();
    let Listener {
        socket,
        gate,
        header_timeout,
        require_redirect,
    } = listener;
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => return,
                a = socket.accept() => a,
            };
            let (stream, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let source = peer.ip().to_canonical();
            let admitted = if require_redirect && !redirect::came_through_redirect(&stream) {
                Err(Refusal::NotRedirected)
            } else {
                let from_node = stream
                    .local_addr()
                    .is_ok_and(|l| l.ip().to_canonical() == source);
                gate.admit(source, from_node)
            };
            let pass = match admitted {
                Ok(pass) => pass,
                Err(why) => {
                    // A reset, not a FIN: the place and the descriptor are free at once, and the
                    // client learns at once that it was refused.
                    let _ = stream.set_zero_linger();
                    drop(stream);
                    gate.refused(source, why);
                    continue;
                }
            };
            let health_only = pass.lane == Lane::Health;
            let handler = handler.clone();
            let svc = service_fn(move |req: Request<Incoming>| {
                let handler = handler.clone();
                async move {
                    if health_only && !HEALTH_PATHS.contains(&req.uri().path()) {
                        return Ok::<_, Infallible>(busy());
                    }
                    Ok::<_, Infallible>(handler(req, peer).await)
                }
            });
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .max_buf_size(MAX_HEAD_BYTES)
                .keep_alive(!health_only);
            let conn = http.serve_connection(TokioIo::new(stream), svc);
            let fut = graceful.watch(conn);
            tokio::spawn(async move {
                if let Err(e) = fut.await {
                    tracing::debug!(error = %e, peer = %peer, "connection error");
                }
                drop(pass);
            });
        }
    })
}

/// The answer in a reserved place to anything but a health check.
fn busy() -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(b"busy\n")));
    *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    r
}

impl Agent {
    /// One IMDS request: the protocol decides, the passthrough (if any) is fetched, it is counted.
    pub(super) async fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<Full<Bytes>> {
        let started = Instant::now();
        let head = RequestHead {
            method: req.method(),
            path: req.uri().path(),
            headers: req.headers(),
        };
        let decision = self
            .protocol
            .decide(head, peer.ip().to_canonical(), self.seams())
            .await;
        let refused = decision.refused;
        let reply = match decision.answer {
            Answer::Reply(reply) => reply,
            Answer::Upstream { path } => self.passthrough(&path).await,
        };
        self.metrics.request(
            decision.route,
            reply.status.as_u16(),
            started.elapsed().as_secs_f64(),
        );
        if let Some(why) = refused
            && reply.status == StatusCode::NOT_FOUND
        {
            self.metrics.not_found(why.metric_label());
        }
        to_response(reply)
    }

    async fn passthrough(&self, path: &UpstreamPath) -> Reply {
        match self.upstream.get(path).await {
            Ok((StatusCode::OK, body)) => Reply::ok(body),
            Ok((status, _)) => Reply::status(status),
            Err(e) => {
                tracing::warn!(error = %e, path = %path, "upstream imds failed");
                Reply::status(StatusCode::BAD_GATEWAY)
            }
        }
    }
}

/// EC2 sends `text/plain` for everything, JSON bodies included, from a server named `EC2ws`.
fn to_response(reply: Reply) -> Response<Full<Bytes>> {
    use http::header::{CONTENT_TYPE, SERVER};
    use http::{HeaderName, HeaderValue};
    let mut r = Response::new(Full::new(reply.body));
    *r.status_mut() = reply.status;
    let h = r.headers_mut();
    // Static values: nothing parsed or allocated per request.
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    h.insert(SERVER, HeaderValue::from_static("EC2ws"));
    // The names are the protocol's lowercase constants (`TTL_HEADER`), valid for `from_static`.
    for (k, v) in reply.headers {
        if let Ok(v) = HeaderValue::try_from(v) {
            h.append(HeaderName::from_static(k), v);
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_has_its_own_not_found_series() {
        use crate::telemetry::metrics::NOT_FOUND_REASONS;
        for why in crate::imds::respond::Refusal::ALL {
            assert!(
                NOT_FOUND_REASONS.contains(&why.metric_label()),
                "{why:?} would be counted as `other`"
            );
        }
    }

    #[test]
    fn replies_are_text_plain_from_ec2ws_with_their_headers() {
        let mut reply = Reply::ok("reader");
        reply
            .headers
            .push(("x-aws-ec2-metadata-token-ttl-seconds", "300".into()));
        let r = to_response(reply);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["content-type"], "text/plain");
        assert_eq!(r.headers()["server"], "EC2ws");
        assert_eq!(r.headers()["x-aws-ec2-metadata-token-ttl-seconds"], "300");
    }
}
