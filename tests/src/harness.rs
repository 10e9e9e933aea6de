//! Runs the real agent in-process against the test bed, and speaks HTTP to it from chosen source
//! addresses (127.x.y.z on loopback), so per-pod identity is tested without network namespaces.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use bytes::Bytes;
use clap::Parser;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use irsa_imds_agent::identity::RoleExchange;
use irsa_imds_agent::telemetry::Metrics;
use irsa_imds_agent::{Config, Deps, Listeners, RunError, run_with};
use tokio::net::TcpSocket;
use tokio::task::JoinHandle;

use crate::kube_api::KubeApi;

pub const NODE: &str = "node-1";

/// Installs the process-wide rustls provider once (kube and the AWS SDK both use rustls).
pub fn install_crypto() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// An agent running in this process.
pub struct Agent {
    pub imds: SocketAddr,
    pub ops: SocketAddr,
    pub metrics: Arc<Metrics>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), RunError>>>,
}

impl Agent {
    /// Starts the agent with `--node-name node-1`, listeners on 127.0.0.1:0, the given STS, and
    /// `args` appended to the command line (e.g. `["--imds-v2", "required"]`); returns once it
    /// is ready.
    pub async fn start(
        kube: &KubeApi,
        sts: Arc<dyn RoleExchange>,
        upstream: &str,
        args: &[&str],
    ) -> anyhow::Result<Agent> {
        let agent = Self::spawn(kube, sts, upstream, args).await?;
        agent.wait_ready(Duration::from_secs(20)).await?;
        Ok(agent)
    }

    /// Like [`start`](Self::start) without waiting for readiness.
    pub async fn spawn(
        kube: &KubeApi,
        sts: Arc<dyn RoleExchange>,
        upstream: &str,
        args: &[&str],
    ) -> anyhow::Result<Agent> {
        install_crypto();
        let mut argv = vec![
            "irsa-imds-agent",
            "--node-name",
            NODE,
            "--listen",
            "127.0.0.1:0",
            "--ops-listen",
            "127.0.0.1:0",
            "--upstream-imds",
            upstream,
            "--log-format",
            "text",
        ];
        argv.extend_from_slice(args);
        let cfg = Config::try_parse_from(argv)
            .context("agent flags")?
            .validate()
            .context("agent flags")?;
        let any: SocketAddr = "127.0.0.1:0".parse()?;
        let (imds, ops) = (
            irsa_imds_agent::server::listen(any)?,
            irsa_imds_agent::server::listen(any)?,
        );
        let (imds_addr, ops_addr) = (imds.local_addr()?, ops.local_addr()?);
        let metrics = Arc::new(Metrics::new());
        let deps = Deps::from_kube(kube.client(), sts, metrics.clone(), None);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(run_with(cfg, deps, Listeners { imds, ops }, async move {
            let _ = rx.await;
        }));
        let agent = Agent {
            imds: imds_addr,
            ops: ops_addr,
            metrics,
            stop: Some(tx),
            task: Some(task),
        };
        Ok(agent)
    }

    /// Waits until `/readyz` says 200 (the pod index synced).
    pub async fn wait_ready(&self, within: Duration) -> anyhow::Result<()> {
        wait_for(within, || async {
            self.ready().await == Some(StatusCode::OK)
        })
        .await
        .context("agent never became ready")
    }

    /// What `/readyz` answers now.
    pub async fn ready(&self) -> Option<StatusCode> {
        let src: IpAddr = "127.0.0.1".parse().ok()?;
        request(self.ops, src, Method::GET, "/readyz", &[])
            .await
            .ok()
            .map(|r| r.status)
    }

    /// Sends SIGTERM's equivalent and waits for a clean exit.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match self.task.take() {
            Some(t) => t
                .await?
                .map_err(|e| anyhow!("agent exited with error: {e}")),
            None => Ok(()),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.imds)
    }

    /// GET from `src` (a pod's address).
    pub async fn get(&self, src: &str, path: &str) -> anyhow::Result<Reply> {
        request(self.imds, src.parse()?, Method::GET, path, &[]).await
    }

    /// A kept-alive connection from `src`, as an SDK's pooled HTTP client holds one.
    pub async fn kept_alive(&self, src: &str) -> anyhow::Result<KeptAlive> {
        KeptAlive::connect(self.imds, src.parse()?).await
    }

    /// GET from `src` with a fresh IMDSv2 session token, so it works whether or not v2 is
    /// required.
    pub async fn get_with_token(&self, src: &str, path: &str) -> anyhow::Result<Reply> {
        let tok = self.token(src, 60).await?;
        request(
            self.imds,
            src.parse()?,
            Method::GET,
            path,
            &[("x-aws-ec2-metadata-token", &tok)],
        )
        .await
    }

    /// Waits until `src` is served `path` with 200 through a session token issued to it: the
    /// agent knows the pod at `src` (a token issued before that is bound to the address only).
    pub async fn wait_served(&self, src: &str, path: &str, within: Duration) -> anyhow::Result<()> {
        wait_for(within, || async {
            matches!(self.get_with_token(src, path).await, Ok(r) if r.status == StatusCode::OK)
        })
        .await
        .with_context(|| format!("{src} never served {path}"))
    }

    /// IMDSv2: a session token from `src`.
    pub async fn token(&self, src: &str, ttl: u32) -> anyhow::Result<String> {
        let r = request(
            self.imds,
            src.parse()?,
            Method::PUT,
            "/latest/api/token",
            &[("x-aws-ec2-metadata-token-ttl-seconds", &ttl.to_string())],
        )
        .await?;
        anyhow::ensure!(r.status == StatusCode::OK, "token PUT: {}", r.status);
        Ok(r.text())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_slice(&self.body).with_context(|| format!("not JSON: {}", self.text()))
    }
}

/// The agent's STS client, pointed at an emulator's `endpoint` in us-east-1.
pub async fn sdk_sts(endpoint: String) -> Arc<irsa_imds_agent::identity::sts::SdkSts> {
    Arc::new(
        irsa_imds_agent::identity::sts::SdkSts::with_endpoint("us-east-1".into(), endpoint).await,
    )
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// An HTTP/1.1 connection to `to` from source address `src`.
async fn connect(to: SocketAddr, src: IpAddr) -> anyhow::Result<Sender> {
    let sock = if src.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    sock.bind(SocketAddr::new(src, 0))?;
    let stream = sock.connect(to).await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// One HTTP/1.1 request to `to`, sent from source address `src`.
pub async fn request(
    to: SocketAddr,
    src: IpAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<Reply> {
    let mut sender = connect(to, src).await?;
    send(&mut sender, method, path, headers).await
}

/// One kept-alive HTTP/1.1 connection from a source address: every request goes over it. Only
/// when the agent closed it while idle (its header timeout) is a new one opened, and counted.
pub struct KeptAlive {
    to: SocketAddr,
    src: IpAddr,
    conn: tokio::sync::Mutex<(Sender, usize)>,
}

impl KeptAlive {
    pub async fn connect(to: SocketAddr, src: IpAddr) -> anyhow::Result<KeptAlive> {
        let sender = connect(to, src).await?;
        Ok(KeptAlive {
            to,
            src,
            conn: tokio::sync::Mutex::new((sender, 0)),
        })
    }

    /// GET over the connection.
    pub async fn get(&self, path: &str) -> anyhow::Result<Reply> {
        let mut conn = self.conn.lock().await;
        if conn.0.ready().await.is_err() {
            conn.0 = connect(self.to, self.src).await?;
            conn.1 += 1;
        }
        send(&mut conn.0, Method::GET, path, &[]).await
    }

    /// How many times the agent had closed the idle connection and a new one was opened.
    pub async fn reconnects(&self) -> usize {
        self.conn.lock().await.1
    }
}

async fn send(
    sender: &mut Sender,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<Reply> {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "169.254.169.254");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = sender
        .send_request(req.body(Full::new(Bytes::new()))?)
        .await?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(Reply {
        status,
        headers,
        body,
    })
}

/// Polls `cond` until it holds or `within` passes (a condition with a deadline, never a bare sleep).
pub async fn wait_for<F, Fut>(within: Duration, mut cond: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if cond().await {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(anyhow!("condition not met within {within:?}"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
