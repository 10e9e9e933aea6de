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
use crate::imds::{Answer, Reply, RequestHead, UpstreamPath};

/// A client that has not sent its headers by then is cut off (slowloris).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Request heads above this size get 431: real metadata requests are a few hundred bytes.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Connections beyond this are refused at accept rather than queued without bound.
const MAX_CONNECTIONS: usize = 4096;
/// An accept error (out of descriptors, say) is retried after this instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(20);

/// Accepts connections until `stop`, each served by hyper with head-size and head-time limits.
pub(super) fn serve<F, Fut>(
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
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let Ok(permit) = conns.clone().try_acquire_owned() else {
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
        let reply = match decision.answer {
            Answer::Reply(reply) => reply,
            Answer::Upstream { path } => self.passthrough(&path).await,
        };
        self.metrics.request(
            decision.route,
            reply.status.as_u16(),
            started.elapsed().as_secs_f64(),
        );
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
