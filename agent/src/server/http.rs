//! HTTP plumbing: accept loops with connection and head limits, and the IMDS listener's
//! request-to-reply path around the protocol's decision.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::agent::Agent;
use super::gate::{Gate, Lane, Refusal};
use super::redirect;
use crate::imds::{Answer, Reply, RequestHead, UpstreamPath};

/// How often a connection's watchdog looks at its progress: twice per header timeout, so a
/// connection without a request head is cut after 1 to 1.5 times the timeout.
const WATCHDOG_TICKS_PER_TIMEOUT: u32 = 2;
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
            let progress = Arc::new(Progress::default());
            let svc = {
                let progress = progress.clone();
                service_fn(move |req: Request<Incoming>| {
                    let handler = handler.clone();
                    let answering = Answering::start(&progress);
                    async move {
                        if health_only && !HEALTH_PATHS.contains(&req.uri().path()) {
                            return Ok::<_, Infallible>(busy());
                        }
                        let reply = handler(req, peer).await;
                        drop(answering);
                        Ok::<_, Infallible>(reply)
                    }
                })
            };
            // No hyper timer: its header read timeout arms (allocates and registers) a timer
            // for every request; the watchdog below is one timer per connection.
            let mut http = hyper::server::conn::http1::Builder::new();
            http.max_buf_size(MAX_HEAD_BYTES).keep_alive(!health_only);
            let conn = http.serve_connection(TokioIo::new(stream), svc);
            let fut = graceful.watch(conn);
            tokio::spawn(async move {
                match watched(fut, &progress, header_timeout).await {
                    Some(Err(e)) => tracing::debug!(error = %e, peer = %peer, "connection error"),
                    Some(Ok(())) => {}
                    None => tracing::debug!(peer = %peer, "no request head in time; closed"),
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

/// What a connection's watchdog sees: request heads completed, requests being answered.
#[derive(Default)]
struct Progress {
    heads: AtomicU64,
    answering: AtomicU32,
}

/// A request being answered (a head completed); counted until dropped.
struct Answering(Arc<Progress>);

impl Answering {
    fn start(p: &Arc<Progress>) -> Self {
        p.heads.fetch_add(1, Ordering::Relaxed);
        p.answering.fetch_add(1, Ordering::Relaxed);
        Answering(p.clone())
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        self.0.answering.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Runs `conn` until it ends, or until watchdog ticks covering `header_timeout` in a row saw no
/// new request head and none being answered (`None`: dropped, which closes the connection).
async fn watched<F: Future>(
    conn: F,
    progress: &Progress,
    header_timeout: Duration,
) -> Option<F::Output> {
    let mut conn = std::pin::pin!(conn);
    let every = watchdog_tick(header_timeout);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let (mut seen, mut stalled) = (0, 0);
    loop {
        tokio::select! {
            biased;
            out = &mut conn => return Some(out),
            _ = tick.tick() => {
                let heads = progress.heads.load(Ordering::Relaxed);
                if heads != seen || progress.answering.load(Ordering::Relaxed) > 0 {
                    (seen, stalled) = (heads, 0);
                } else {
                    stalled += 1;
                    if every * stalled >= header_timeout {
                        return None;
                    }
                }
            }
        }
    }
}

/// The watchdog's period for a listener's header timeout (never zero).
fn watchdog_tick(header_timeout: Duration) -> Duration {
    (header_timeout / WATCHDOG_TICKS_PER_TIMEOUT).max(Duration::from_millis(1))
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// One response on `s`, read until its body ("ok") arrived.
    async fn answer(s: &mut TcpStream, path: &str) -> String {
        s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 512];
        while !got.ends_with(b"ok") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "closed while answering: {}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&got).into_owned()
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_a_request_head_is_cut_off_and_a_busy_one_is_not() {
        const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
        let tick = watchdog_tick(HEADER_TIMEOUT);
        let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let caps = super::super::gate::Caps {
            max: 16,
            per_source: 16,
            reserved: 0,
        };
        let metrics = Arc::new(crate::telemetry::metrics::Metrics::new());
        let listener = Listener {
            socket,
            gate: Gate::new("imds", caps, metrics),
            header_timeout: HEADER_TIMEOUT,
            require_redirect: false,
        };
        let stop = CancellationToken::new();
        let graceful = Arc::new(GracefulShutdown::new());
        let server = serve(listener, stop.clone(), &graceful, |req, _| async move {
            if req.uri().path() == "/slow" {
                tokio::time::sleep(Duration::from_secs(20)).await;
            }
            Response::new(Full::new(Bytes::from_static(b"ok")))
        });

        // Slowloris: half a head, then nothing.
        let mut slow = TcpStream::connect(addr).await.unwrap();
        let t0 = tokio::time::Instant::now();
        slow.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(
            slow.read(&mut buf).await.unwrap(),
            0,
            "closed, nothing sent"
        );
        let waited = t0.elapsed();
        assert!(
            waited >= HEADER_TIMEOUT && waited <= HEADER_TIMEOUT + tick,
            "{waited:?}"
        );

        // A kept-alive connection asking every second, then a request answered for 20 s: open.
        let mut busy = TcpStream::connect(addr).await.unwrap();
        for _ in 0..20 {
            assert!(answer(&mut busy, "/").await.starts_with("HTTP/1.1 200"));
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        assert!(answer(&mut busy, "/slow").await.starts_with("HTTP/1.1 200"));
        // Then idle: cut off like any connection without a head.
        let t1 = tokio::time::Instant::now();
        assert_eq!(busy.read(&mut buf).await.unwrap(), 0);
        assert!(t1.elapsed() <= HEADER_TIMEOUT + tick);

        stop.cancel();
        server.await.unwrap();
    }

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
