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

/// A binary of this workspace (`irsa-imds-agent`, `irsa-imds-cni`), built now: the first call in
/// a test process runs `cargo build --workspace --all-targets --locked`, the build tests/run.sh
/// makes (a no-op when everything is fresh; the same selection, so no second feature set)
/// so an end-to-end suite never runs a stale binary, whoever started it. Honours
/// `CARGO_TARGET_DIR`; `cargo` is the one running the tests (`$CARGO`). The child build gets the
/// environment without the `CARGO_*` variables cargo set for this test process (package name,
/// manifest dir, ...): build scripts that watch them (ring's) would otherwise rerun and rebuild
/// everything; `CARGO_TARGET_DIR` and `CARGO_HOME` (the caller's own settings) are kept.
pub fn workspace_bin(name: &str) -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context as _;
    static BUILT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    BUILT
        .get_or_init(|| {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let mut cmd = std::process::Command::new(cargo);
            for (key, _) in std::env::vars_os() {
                let k = key.to_string_lossy();
                if k.starts_with("CARGO") && k != "CARGO_TARGET_DIR" && k != "CARGO_HOME" {
                    cmd.env_remove(&key);
                }
            }
            let out = cmd
                .args([
                    "build",
                    "--workspace",
                    "--all-targets",
                    "--locked",
                    "--quiet",
                ])
                .current_dir(&root)
                .output()
                .map_err(|e| format!("running cargo: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "cargo build --workspace --all-targets failed:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                ))
            }
        })
        .clone()
        .map_err(anyhow::Error::msg)?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let bin = target.join("debug").join(name);
    anyhow::ensure!(bin.exists(), "{} missing after the build", bin.display());
    bin.canonicalize().context("binary path")
}

/// The agent binary, built now if the sources changed (never a stale one: see [`workspace_bin`]).
/// A test helper: a failed build panics with cargo's output.
pub fn agent_bin() -> std::path::PathBuf {
    workspace_bin("irsa-imds-agent").unwrap_or_else(|e| panic!("{e:#}"))
}
