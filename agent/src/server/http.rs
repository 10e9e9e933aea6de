//! HTTP plumbing: accept loops with connection and head limits, and the IMDS listener's
//! request-to-reply path around the protocol's decision.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::{BoxFuture, Either};
use futures::task::AtomicWaker;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulConnection;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::agent::Agent;
use super::gate::{Gate, Lane, Refusal};
use super::redirect;
use super::seams::{Remembered, Remembering};
use crate::imds::{Answer, Decision, Refusal as Refused, Reply, RequestHead, UpstreamPath};

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
/// once with a reset and counted) and served by hyper with head-size and head-time limits. Each
/// connection has a `C` of its own, made when it is accepted, that the handler is given with
/// each of its requests (what the connection remembers between them).
pub(super) fn serve<F, Fut, C>(
    listener: Listener,
    stop: CancellationToken,
    drain: &Drain,
    handler: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn(Request<Incoming>, SocketAddr, &C) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + Unpin + 'static,
    C: Default + Send + 'static,
{
    let drain = drain.clone();
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
                let memory = C::default();
                // The handler is called here, not in a future: a reply it has at hand (a cached
                // GET) is made without one, and hyper holds only the small future it returns.
                service_fn(move |req: Request<Incoming>| {
                    let answering = Answering::start(&progress);
                    let reply = if health_only && !HEALTH_PATHS.contains(&req.uri().path()) {
                        Either::Left(std::future::ready(busy()))
                    } else {
                        Either::Right(handler(req, peer, &memory))
                    };
                    Answered {
                        reply,
                        _answering: answering,
                    }
                })
            };
            // No hyper timer: its header read timeout arms (allocates and registers) a timer
            // for every request; the watchdog below is one timer per connection.
            let mut http = hyper::server::conn::http1::Builder::new();
            http.max_buf_size(MAX_HEAD_BYTES).keep_alive(!health_only);
            let conn = http.serve_connection(TokioIo::new(stream), svc);
            let drain = drain.watch();
            tokio::spawn(async move {
                match watched(conn, &progress, header_timeout, drain).await {
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

/// The reply to one request, counted as being answered until hyper drops it (once it is ready,
/// or when the connection goes).
struct Answered<F> {
    reply: F,
    _answering: Answering,
}

impl<F: Future + Unpin> Future for Answered<F> {
    type Output = Result<F::Output, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.reply).poll(cx).map(Ok)
    }
}

/// Connections to drain at shutdown: each holds a watcher until it ends; [`Drain::shutdown`]
/// tells them all to finish their request in flight and close, and waits until they have.
#[derive(Clone)]
pub(super) struct Drain(Arc<tokio::sync::watch::Sender<()>>);

impl Drain {
    pub(super) fn new() -> Self {
        Drain(Arc::new(tokio::sync::watch::channel(()).0))
    }

    fn watch(&self) -> tokio::sync::watch::Receiver<()> {
        self.0.subscribe()
    }

    /// Tells every connection to close after its request in flight; done when all have.
    pub(super) async fn shutdown(&self) {
        let _ = self.0.send(());
        self.0.closed().await;
    }
}

/// Whether a connection's watchdog or drain signal woke its task. Both are polled only then:
/// polling them on every wake of the connection cost more than a tenth of a cached GET.
#[derive(Default)]
struct SideWake {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for SideWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// Runs `conn` until it ends, or until watchdog ticks covering `header_timeout` in a row saw no
/// new request head and none being answered (`None`: dropped, which closes the connection).
/// When `drain` says so, the connection finishes its request in flight and closes; `drain` is
/// held until it has.
async fn watched<F: GracefulConnection>(
    conn: F,
    progress: &Progress,
    header_timeout: Duration,
    mut drain: tokio::sync::watch::Receiver<()>,
) -> Option<F::Output> {
    let mut conn = std::pin::pin!(conn);
    let every = watchdog_tick(header_timeout);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let (mut seen, mut stalled) = (0, 0);
    let mut draining = false;
    let mut drain_signal = std::pin::pin!(drain.changed());
    // Polled at first, then when they woke the task.
    let side = Arc::new(SideWake {
        woken: AtomicBool::new(true),
        task: AtomicWaker::new(),
    });
    let side_waker = Waker::from(side.clone());
    std::future::poll_fn(|cx| {
        side.task.register(cx.waker());
        let due = side.woken.swap(false, Ordering::AcqRel);
        let mut side_cx = Context::from_waker(&side_waker);
        if due && !draining && drain_signal.as_mut().poll(&mut side_cx).is_ready() {
            draining = true;
            conn.as_mut().graceful_shutdown();
        }
        if let Poll::Ready(out) = conn.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        if due {
            while tick.poll_tick(&mut side_cx).is_ready() {
                let heads = progress.heads.load(Ordering::Relaxed);
                if heads != seen || progress.answering.load(Ordering::Relaxed) > 0 {
                    (seen, stalled) = (heads, 0);
                } else {
                    stalled += 1;
                    if every * stalled >= header_timeout {
                        return Poll::Ready(None);
                    }
                }
            }
        }
        Poll::Pending
    })
    .await
}

/// The watchdog's period for a listener's header timeout (never zero).
fn watchdog_tick(header_timeout: Duration) -> Duration {
    (header_timeout / WATCHDOG_TICKS_PER_TIMEOUT).max(Duration::from_millis(1))
}

/// An IMDS reply: made at once when the decision had everything at hand (a cached GET), else
/// a future that waits for what it needs.
pub(super) type Replying =
    Either<std::future::Ready<Response<Full<Bytes>>>, BoxFuture<'static, Response<Full<Bytes>>>>;

impl Agent {
    /// One IMDS request: the protocol decides, the passthrough (if any) is fetched, it is counted.
    /// A decision with every answer at hand is made here, without a future, from what the
    /// connection remembers while it holds (`seams`); the rest wait.
    pub(super) fn answer(
        self: &Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
        memory: &Mutex<Remembered>,
    ) -> Replying {
        let started = Instant::now();
        let head = RequestHead {
            method: req.method(),
            path: req.uri().path(),
            headers: req.headers(),
        };
        let seams = Remembering {
            agent: self,
            memory,
            arrived: started,
        };
        let decision = self
            .protocol
            .decide_now(head, peer.ip().to_canonical(), seams.seams());
        let this = self.clone();
        match decision {
            Some(Decision {
                route,
                answer: Answer::Reply(reply),
                refused,
            }) => Either::Left(std::future::ready(
                this.counted(route, refused, reply, started),
            )),
            Some(Decision {
                route,
                answer: Answer::Upstream { path },
                refused,
            }) => Either::Right(Box::pin(async move {
                let reply = this.passthrough(&path).await;
                this.counted(route, refused, reply, started)
            })),
            None => Either::Right(Box::pin(
                async move { this.handle(req, peer, started).await },
            )),
        }
    }

    /// [`answer`](Self::answer) for a request whose decision waits.
    async fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        started: Instant,
    ) -> Response<Full<Bytes>> {
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
        self.counted(decision.route, decision.refused, reply, started)
    }

    /// Counts a reply (and its refusal, if it is one) and makes it the response.
    fn counted(
        &self,
        route: &'static str,
        refused: Option<Refused>,
        reply: Reply,
        started: Instant,
    ) -> Response<Full<Bytes>> {
        self.metrics.request(
            route,
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
    // Built once; a copy costs less than hashing the two names into a new map per reply.
    static EC2_HEADERS: LazyLock<http::HeaderMap> = LazyLock::new(|| {
        let mut h = http::HeaderMap::with_capacity(4);
        h.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        h.insert(SERVER, HeaderValue::from_static("EC2ws"));
        h
    });
    let mut r = Response::new(Full::new(reply.body));
    *r.status_mut() = reply.status;
    let h = r.headers_mut();
    h.clone_from(&EC2_HEADERS);
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
        let drain = Drain::new();
        let server = serve(listener, stop.clone(), &drain, |req, _, _: &()| {
            Box::pin(async move {
                if req.uri().path() == "/slow" {
                    tokio::time::sleep(Duration::from_secs(20)).await;
                }
                Response::new(Full::new(Bytes::from_static(b"ok")))
            })
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
