//! Small pieces the emulators share.

use tokio_util::sync::CancellationToken;

/// Stops a server's accept loop when the last handle to it drops.
pub struct StopOnDrop(pub CancellationToken);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// Serves `listener` with `handler` until `stop`; one hyper http1 connection per accept.
pub fn serve<F, Fut, B>(listener: tokio::net::TcpListener, stop: CancellationToken, handler: F)
where
    F: Fn(http::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = http::Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                _ = stop.cancelled() => return,
                a = listener.accept() => match a { Ok(x) => x, Err(_) => continue },
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, std::convert::Infallible>(handler(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
}

/// Turns a std listener (possibly bound inside a network namespace) into a tokio one.
pub fn tokio_listener(l: std::net::TcpListener) -> std::io::Result<tokio::net::TcpListener> {
    l.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(l)
}

/// A directory under the system temp dir, removed on drop; unique per process and call.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> std::io::Result<TempDir> {
        static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("irsa-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Sends SIGTERM to a child and waits (bounded) for it to exit.
pub async fn sigterm(
    child: &mut tokio::process::Child,
    within: std::time::Duration,
) -> anyhow::Result<std::process::ExitStatus> {
    let pid = child
        .id()
        .ok_or_else(|| anyhow::anyhow!("child already exited"))?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    Ok(tokio::time::timeout(within, child.wait()).await??)
}

/// A loopback TCP proxy whose connections the test can cut: `cut` closes every open connection
/// and refuses new ones until `resume` (a network partition between a client and its server).
pub struct TcpProxy {
    pub addr: std::net::SocketAddr,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    generation: tokio::sync::watch::Sender<u64>,
    _stop: StopOnDrop,
}

impl TcpProxy {
    pub async fn start(target: std::net::SocketAddr) -> std::io::Result<TcpProxy> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (generation, _) = tokio::sync::watch::channel(0u64);
        let stop = CancellationToken::new();
        let (open2, gen2, stop2) = (open.clone(), generation.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (mut inbound, _) = tokio::select! {
                    _ = stop2.cancelled() => return,
                    a = listener.accept() => match a { Ok(x) => x, Err(_) => continue },
                };
                if !open2.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: the client sees the connection closed
                }
                let mut cut = gen2.subscribe();
                let stop = stop2.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                        _ = stop.cancelled() => {}
                    }
                });
            }
        });
        Ok(TcpProxy {
            addr,
            open,
            generation,
            _stop: StopOnDrop(stop),
        })
    }

    /// Closes every open connection and refuses new ones.
    pub fn cut(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Accepts connections again.
    pub fn resume(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}
