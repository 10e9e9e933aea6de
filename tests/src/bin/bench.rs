//! Benchmarks that print numbers, each measured side by side with a ceiling in the same run
//! (these machines are shared and noisy: read the ratios, not the absolute times).
//!
//! `cargo run --release -p irsa-imds-testbed --bin bench [-- --quick] [-- --no-callgrind]
//! [-- --agent-exe PATH] [-- --callgrind-out DIR] [-- --callgrind-only]` (PATH: another build of
//! this binary, whose agent is then measured: old against new with the same load generator and
//! ceiling; DIR keeps the callgrind dumps, `agent.cg` and `ceiling.cg`, for `callgrind_annotate`;
//! `--callgrind-only` measures instructions only, which do not move with machine load)
//!
//! The agent runs as it does in production: its own process (this binary re-executed as
//! `bench agent <flags>`, which does exactly what the agent's `main` does), JSON logs at `info`
//! written to a sink (`/dev/null`), default fetch rate and concurrency. The ceiling is a bare hyper
//! server in its own process (`bench ceiling <file>`) with the same runtime, answering the agent's
//! exact response bytes (status, headers, body; checked byte for byte before measuring) and doing
//! nothing else. One load generator (this process, one thread, like `wrk -t1`) drives both.
//!
//! 1. Cached credential GET, 64 kept-alive connections: throughput and p99, agent/ceiling.
//! 2. The full IMDSv2 fetch an SDK makes (PUT token, GET role name, GET credentials), each
//!    request on a new connection: fetches per second, agent/ceiling.
//!    1 and 2: a warm-up, then 3 rounds in A/B/B/A order; each round's ratio, the median and
//!    the best are printed.
//! 3. Instructions per cached GET under `valgrind --tool=callgrind` (counters zeroed after a
//!    warm-up, dumped after N requests): a number that does not move with machine load.
//! 4. Cold start: 737 pods (the largest EKS max-pods) appear at once and are prefetched at the
//!    configured rate; 20 of those last in the queue ask at once. Their first-request latency,
//!    the STS call rate STS actually saw, the time until every pod is served from cache (checked:
//!    a GET to each costs no further STS call), and the agent's RSS.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, ensure};
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use testbed::fake_imds::FakeImds;
use testbed::harness::{NODE, wait_for};
use testbed::kube_api::{KubeApi, pod};
use testbed::sts::StsEmulator;

const ANN: &str = "eks.amazonaws.com/role-arn";
const ROLE: &str = "bench";
const CREDS: &str = "/latest/meta-data/iam/security-credentials/bench";
const ROLES: &str = "/latest/meta-data/iam/security-credentials/";
const TOKEN_PATH: &str = "/latest/api/token";
const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
/// The hot pod's address: the load generator's source address for both servers.
const HOT_IP: &str = "127.0.0.2";
const COLD_PODS: usize = 737;
const COLD_ASKERS: usize = 20;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("agent") => agent_main(&args[1..]),
        Some("ceiling") => {
            let file = args.get(1).ok_or_else(|| anyhow!("ceiling <file>"))?;
            tokio::runtime::Runtime::new()?.block_on(ceiling_main(Path::new(file)))
        }
        Some("-h" | "--help") => {
            println!("{USAGE}");
            Ok(())
        }
        _ => {
            let opts = parse_opts(&args)?;
            // One load generator thread for both servers (the emulators share it; they are idle
            // while the hot path is measured).
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(orchestrate(opts))
        }
    }
}

struct Opts {
    quick: bool,
    callgrind: bool,
    callgrind_only: bool,
    agent_exe: Option<PathBuf>,
    callgrind_out: Option<PathBuf>,
}

const USAGE: &str = "usage: bench [--quick] [--no-callgrind] [--callgrind-only] \
[--agent-exe PATH] [--callgrind-out DIR]";

/// Every argument is known or the run does not start (a typo must not measure the wrong thing).
fn parse_opts(args: &[String]) -> anyhow::Result<Opts> {
    let mut opts = Opts {
        quick: false,
        callgrind: true,
        callgrind_only: false,
        agent_exe: None,
        callgrind_out: None,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || {
            it.next()
                .map(PathBuf::from)
                .ok_or_else(|| anyhow!("{arg} needs a value; {USAGE}"))
        };
        match arg.as_str() {
            "--quick" => opts.quick = true,
            "--no-callgrind" => opts.callgrind = false,
            "--callgrind-only" => opts.callgrind_only = true,
            "--agent-exe" => opts.agent_exe = Some(value()?),
            "--callgrind-out" => opts.callgrind_out = Some(value()?),
            other => return Err(anyhow!("unknown argument {other:?}; {USAGE}")),
        }
    }
    Ok(opts)
}

// ---------------------------------------------------------------------------------------------
// The two servers.

/// What the agent's `main` does, flag for flag: JSON logs to stderr (the caller points stderr at
/// a sink), the rustls provider, bind, run until stdin closes.
fn agent_main(flags: &[String]) -> anyhow::Result<()> {
    use clap::Parser;
    use irsa_imds_agent::{Config, Listeners, run, telemetry};
    let cfg = Config::try_parse_from(
        std::iter::once("irsa-imds-agent".to_string()).chain(flags.iter().cloned()),
    )?;
    tokio::runtime::Runtime::new()?.block_on(async move {
        telemetry::init_logging(cfg.log_format, &cfg.node_name);
        let cfg = cfg.validate()?;
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let listeners = Listeners::bind(&cfg).await?;
        run(cfg, listeners, stdin_closed()).await?;
        Ok(())
    })
}

async fn stdin_closed() {
    let mut buf = [0u8; 64];
    let mut stdin = tokio::io::stdin();
    while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
}

/// A recorded response: what the ceiling replays.
#[derive(serde::Serialize, serde::Deserialize, Clone)]
struct Canned {
    status: u16,
    /// Every header but `date` and `content-length`, which hyper writes itself for both servers.
    headers: Vec<(String, String)>,
    body: String,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct CeilingSpec {
    token: Canned,
    roles: Canned,
    creds: Canned,
}

struct Prepared {
    status: StatusCode,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Bytes,
}

impl Prepared {
    fn new(c: &Canned) -> anyhow::Result<Prepared> {
        Ok(Prepared {
            status: StatusCode::from_u16(c.status)?,
            headers: c
                .headers
                .iter()
                .map(|(k, v)| Ok((HeaderName::try_from(k)?, HeaderValue::try_from(v)?)))
                .collect::<anyhow::Result<_>>()?,
            body: Bytes::from(c.body.clone()),
        })
    }
    fn response(&self) -> Response<Full<Bytes>> {
        let mut r = Response::new(Full::new(self.body.clone()));
        *r.status_mut() = self.status;
        let h = r.headers_mut();
        for (k, v) in &self.headers {
            h.append(k.clone(), v.clone());
        }
        r
    }
}

/// The ceiling: a bare hyper server answering the agent's bytes; no state, no checks, no logs.
async fn ceiling_main(file: &Path) -> anyhow::Result<()> {
    let spec: CeilingSpec = serde_json::from_slice(&std::fs::read(file)?)?;
    let answers = Arc::new([
        Prepared::new(&spec.token)?,
        Prepared::new(&spec.roles)?,
        Prepared::new(&spec.creds)?,
    ]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("{}", listener.local_addr()?);
    let serve = async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let answers = answers.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let i = if req.method() == Method::PUT {
                        0
                    } else if req.uri().path().ends_with('/') {
                        1
                    } else {
                        2
                    };
                    std::future::ready(Ok::<_, std::convert::Infallible>(answers[i].response()))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    };
    tokio::select! {
        _ = serve => {}
        _ = stdin_closed() => {}
    }
    Ok(())
}

/// A server process this benchmark started (killed when dropped; it also exits when our end of
/// its stdin closes).
struct Server {
    child: tokio::process::Child,
    addr: SocketAddr,
}

impl Server {
    fn pid(&self) -> anyhow::Result<u32> {
        self.child.id().ok_or_else(|| anyhow!("server exited"))
    }
}

fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

struct Bed {
    kube: KubeApi,
    sts: StsEmulator,
    _upstream: FakeImds,
    upstream_url: String,
    dir: testbed::util::TempDir,
    exe: PathBuf,
    agent_exe: PathBuf,
}

impl Bed {
    fn command(&self, valgrind: Option<&str>) -> tokio::process::Command {
        self.command_of(&self.exe, valgrind)
    }

    fn command_of(&self, exe: &Path, valgrind: Option<&str>) -> tokio::process::Command {
        let mut c = match valgrind {
            Some(tag) => {
                let mut c = tokio::process::Command::new("valgrind");
                c.args([
                    "--tool=callgrind",
                    "--vgdb=yes",
                    &format!(
                        "--callgrind-out-file={}",
                        self.dir.path().join(format!("{tag}.%p.cg")).display()
                    ),
                ])
                .arg(exe);
                c
            }
            None => tokio::process::Command::new(exe),
        };
        c.stdin(Stdio::piped()).kill_on_drop(true);
        c
    }

    async fn agent(&self, valgrind: bool) -> anyhow::Result<Server> {
        let (imds, ops) = (free_port()?, free_port()?);
        let kubeconfig = self.dir.path().join("kubeconfig");
        let mut cmd = self.command_of(&self.agent_exe, valgrind.then_some("agent"));
        cmd.arg("agent")
            .args(["--node-name", NODE, "--log-format", "json"])
            .args([
                "--listen",
                &imds.to_string(),
                "--ops-listen",
                &ops.to_string(),
            ])
            .args(["--upstream-imds", &self.upstream_url])
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ENDPOINT_URL_STS", self.sts.endpoint())
            // Production's level: the audit line of every vended credential is formatted and written.
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().context("starting the agent")?;
        let server = Server { child, addr: imds };
        let within = if valgrind { 300 } else { 30 };
        wait_for(Duration::from_secs(within), || async {
            raw_get(ops, "/readyz", &[])
                .await
                .is_ok_and(|r| r.status == 200)
        })
        .await
        .context("agent never became ready")?;
        wait_for(Duration::from_secs(within), || async {
            raw_get(server.addr, CREDS, &[])
                .await
                .is_ok_and(|r| r.status == 200)
        })
        .await
        .context("the hot pod never got credentials")?;
        Ok(server)
    }

    async fn ceiling(&self, spec: &Path, valgrind: bool) -> anyhow::Result<Server> {
        let mut cmd = self.command(valgrind.then_some("ceiling"));
        cmd.arg("ceiling")
            .arg(spec)
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().context("starting the ceiling")?;
        let out = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let mut line = String::new();
        tokio::time::timeout(
            Duration::from_secs(120),
            tokio::io::BufReader::new(out).read_line(&mut line),
        )
        .await
        .context("ceiling did not start")??;
        let addr = line.trim().parse().context("ceiling address")?;
        Ok(Server { child, addr })
    }
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP, to record and compare the exact bytes.

struct RawReply {
    status: u16,
    head: String,
    body: Bytes,
}

impl RawReply {
    /// Headers other than `date` and `content-length`, in wire order.
    fn canned(&self) -> Canned {
        Canned {
            status: self.status,
            headers: self
                .head
                .lines()
                .skip(1)
                .filter_map(|l| l.split_once(": "))
                .filter(|(k, _)| {
                    !k.eq_ignore_ascii_case("date") && !k.eq_ignore_ascii_case("content-length")
                })
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: String::from_utf8_lossy(&self.body).into_owned(),
        }
    }
    /// The response with the date's value blanked: what must be equal between the two servers.
    fn comparable(&self) -> String {
        let head: Vec<String> = self
            .head
            .lines()
            .map(|l| match l.split_once(": ") {
                Some((k, _)) if k.eq_ignore_ascii_case("date") => "date: <now>".to_string(),
                _ => l.to_string(),
            })
            .collect();
        format!(
            "{}\n\n{}",
            head.join("\n"),
            String::from_utf8_lossy(&self.body)
        )
    }
}

async fn connect(to: SocketAddr) -> anyhow::Result<TcpStream> {
    let src: IpAddr = HOT_IP.parse()?;
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(src, 0))?;
    // Close with RST: tens of thousands of short connections must not exhaust ports in TIME_WAIT.
    // (Deprecated because a non-zero linger blocks the thread on drop; a zero one does not.)
    #[allow(deprecated)]
    sock.set_linger(Some(Duration::ZERO))?;
    Ok(sock.connect(to).await?)
}

async fn raw_request(
    to: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<RawReply> {
    let mut s = connect(to).await?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nhost: 169.254.169.254\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut chunk)).await??;
        ensure!(n > 0, "connection closed mid-response");
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let len: usize = head
            .lines()
            .filter_map(|l| l.split_once(": "))
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0);
        if buf.len() >= end + 4 + len {
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            return Ok(RawReply {
                status,
                body: Bytes::copy_from_slice(&buf[end + 4..end + 4 + len]),
                head,
            });
        }
    }
}

async fn raw_get(to: SocketAddr, path: &str, headers: &[(&str, &str)]) -> anyhow::Result<RawReply> {
    raw_request(to, "GET", path, headers).await
}

/// Records the agent's three answers of an IMDSv2 fetch, writes the ceiling's spec, and checks
/// that the ceiling answers the same bytes (the token's value aside).
async fn record(agent: &Server, dir: &Path) -> anyhow::Result<(PathBuf, [RawReply; 3])> {
    let token = raw_request(agent.addr, "PUT", TOKEN_PATH, &[(TTL_HEADER, "21600")]).await?;
    ensure!(token.status == 200, "token PUT: {}", token.status);
    let t = String::from_utf8_lossy(&token.body).into_owned();
    let roles = raw_get(agent.addr, ROLES, &[(TOKEN_HEADER, &t)]).await?;
    let creds = raw_get(agent.addr, CREDS, &[(TOKEN_HEADER, &t)]).await?;
    ensure!(
        roles.status == 200 && creds.status == 200,
        "agent GETs failed"
    );
    ensure!(
        raw_get(agent.addr, CREDS, &[]).await?.body == creds.body,
        "IMDSv1 and IMDSv2 GETs differ"
    );
    let spec = CeilingSpec {
        token: token.canned(),
        roles: roles.canned(),
        creds: creds.canned(),
    };
    let path = dir.join("ceiling.json");
    std::fs::write(&path, serde_json::to_vec(&spec)?)?;
    Ok((path, [token, roles, creds]))
}

async fn check_same_bytes(ceiling: &Server, agent: &[RawReply; 3]) -> anyhow::Result<()> {
    let token = raw_request(ceiling.addr, "PUT", TOKEN_PATH, &[(TTL_HEADER, "21600")]).await?;
    let roles = raw_get(ceiling.addr, ROLES, &[(TOKEN_HEADER, "x")]).await?;
    let creds = raw_get(ceiling.addr, CREDS, &[]).await?;
    for (what, a, c) in [
        ("token", &agent[0], &token),
        ("role list", &agent[1], &roles),
        ("credentials", &agent[2], &creds),
    ] {
        ensure!(
            a.comparable() == c.comparable(),
            "{what}: the ceiling's bytes differ from the agent's:\n{}\n---\n{}",
            a.comparable(),
            c.comparable()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The load generator.

struct Run {
    requests: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Run {
    fn rate(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
    fn pct(&mut self, p: f64) -> Duration {
        pct(&mut self.latencies, p)
    }
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// `per` GETs of `path` on each of `conns` kept-alive connections, all at once.
async fn keepalive(to: SocketAddr, path: &str, conns: usize, per: usize) -> anyhow::Result<Run> {
    let t0 = Instant::now();
    let tasks = (0..conns).map(|_| {
        let path = path.to_string();
        tokio::spawn(async move {
            let stream = connect(to).await?;
            let (mut tx, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            let mut lat = Vec::with_capacity(per);
            for _ in 0..per {
                let t = Instant::now();
                let req = Request::get(path.as_str())
                    .header("host", "169.254.169.254")
                    .body(Empty::<Bytes>::new())?;
                let resp = tx.send_request(req).await?;
                ensure!(resp.status() == StatusCode::OK, "status {}", resp.status());
                resp.into_body().collect().await?;
                lat.push(t.elapsed());
            }
            anyhow::Ok(lat)
        })
    });
    let mut latencies = Vec::with_capacity(conns * per);
    for r in futures::future::join_all(tasks).await {
        latencies.extend(r??);
    }
    Ok(Run {
        requests: conns * per,
        elapsed: t0.elapsed(),
        latencies,
    })
}

/// One request on a new connection, as SDKs without a pooled client make them.
async fn once(
    to: SocketAddr,
    method: Method,
    path: &str,
    header: Option<(&'static str, String)>,
) -> anyhow::Result<Bytes> {
    let stream = connect(to).await?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "169.254.169.254");
    if let Some((k, v)) = header {
        req = req.header(k, v);
    }
    let resp = tx.send_request(req.body(Empty::<Bytes>::new())?).await?;
    ensure!(resp.status() == StatusCode::OK, "status {}", resp.status());
    Ok(resp.into_body().collect().await?.to_bytes())
}

/// `per` full IMDSv2 fetches by each of `clients` concurrent clients, each request on a new
/// connection; latency is per fetch.
async fn imdsv2(to: SocketAddr, clients: usize, per: usize) -> anyhow::Result<Run> {
    let t0 = Instant::now();
    let tasks = (0..clients).map(|_| {
        tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per);
            for _ in 0..per {
                let t = Instant::now();
                let token = once(
                    to,
                    Method::PUT,
                    TOKEN_PATH,
                    Some((TTL_HEADER, "21600".into())),
                )
                .await?;
                let token = String::from_utf8(token.to_vec())?;
                let name =
                    once(to, Method::GET, ROLES, Some((TOKEN_HEADER, token.clone()))).await?;
                ensure!(name.as_ref() == ROLE.as_bytes(), "role list {name:?}");
                once(to, Method::GET, CREDS, Some((TOKEN_HEADER, token))).await?;
                lat.push(t.elapsed());
            }
            anyhow::Ok(lat)
        })
    });
    let mut latencies = Vec::with_capacity(clients * per);
    for r in futures::future::join_all(tasks).await {
        latencies.extend(r??);
    }
    Ok(Run {
        requests: clients * per,
        elapsed: t0.elapsed(),
        latencies,
    })
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn best(v: &[f64], higher_is_better: bool) -> f64 {
    v.iter()
        .copied()
        .reduce(|a, b| if (a > b) == higher_is_better { a } else { b })
        .unwrap_or(f64::NAN)
}

/// A warm-up of each, then `rounds` rounds of A/B/B/A; per round, A's two runs and B's two runs
/// are pooled. Returns (agent runs, ceiling runs) per round.
async fn abba<F, Fut>(
    agent: SocketAddr,
    ceiling: SocketAddr,
    rounds: usize,
    run: F,
) -> anyhow::Result<Vec<(Run, Run)>>
where
    F: Fn(SocketAddr) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Run>>,
{
    run(agent).await?;
    run(ceiling).await?;
    let mut out = Vec::new();
    for _ in 0..rounds {
        let a1 = run(agent).await?;
        let b1 = run(ceiling).await?;
        let b2 = run(ceiling).await?;
        let a2 = run(agent).await?;
        out.push((pool(a1, a2), pool(b1, b2)));
    }
    Ok(out)
}

fn pool(mut a: Run, b: Run) -> Run {
    a.requests += b.requests;
    a.elapsed += b.elapsed;
    a.latencies.extend(b.latencies);
    a
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

// ---------------------------------------------------------------------------------------------
// Callgrind.

/// Instructions the server executes per cached GET: warm up, zero the counters, send `n` GETs
/// on one kept-alive connection, dump, divide.
async fn instructions_per_get(
    server: &Server,
    dir: &Path,
    tag: &str,
    n: usize,
    keep: Option<&Path>,
) -> anyhow::Result<f64> {
    let pid = server.pid()?;
    keepalive(server.addr, CREDS, 1, 200).await?;
    callgrind_control(&["-z", &pid.to_string()]).await?;
    keepalive(server.addr, CREDS, 1, n).await?;
    callgrind_control(&["-d", &pid.to_string()]).await?;
    // The dump is written by the server process: wait for its file.
    let prefix = format!("{tag}.{pid}.cg.");
    let mut total = None;
    wait_for(Duration::from_secs(60), || {
        let found = std::fs::read_dir(dir)
            .ok()
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .find_map(|e| Some((cg_total(&e.path())?, e.path())));
        let done = found.is_some();
        total = found;
        std::future::ready(done)
    })
    .await
    .with_context(|| format!("no callgrind dump {prefix}*"))?;
    let (total, dump) = total.ok_or_else(|| anyhow!("no callgrind dump {prefix}*"))?;
    if let Some(keep) = keep {
        std::fs::create_dir_all(keep)?;
        std::fs::copy(&dump, keep.join(format!("{tag}.cg")))?;
    }
    Ok(total as f64 / n as f64)
}

async fn callgrind_control(args: &[&str]) -> anyhow::Result<()> {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("callgrind_control")
            .args(args)
            .output(),
    )
    .await
    .context("callgrind_control timed out")??;
    ensure!(
        out.status.success(),
        "callgrind_control {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The `summary:`/`totals:` instruction count of a complete callgrind dump.
fn cg_total(path: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .rev()
        .find_map(|l| {
            l.strip_prefix("totals: ")
                .or_else(|| l.strip_prefix("summary: "))
        })
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

// ---------------------------------------------------------------------------------------------
// Cold start.

fn cold_ip(i: usize) -> String {
    format!("127.3.{}.{}", i / 250, 1 + i % 250)
}

fn rss_kib(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

async fn cold_start(bed: &Bed, agent: &Server) -> anyhow::Result<()> {
    let pid = agent.pid()?;
    let (kube, sts) = (&bed.kube, &bed.sts);
    let sts0 = sts.call_count();
    let tr0 = kube.counters().token_requests;
    // STS calls as STS sees them, sampled every 10 ms.
    let samples = Arc::new(std::sync::Mutex::new(Vec::<(Instant, usize)>::new()));
    let sampling = {
        let samples = samples.clone();
        let sts = sts.clone();
        tokio::spawn(async move {
            loop {
                let n = sts.call_count() - sts0;
                if let Ok(mut s) = samples.lock() {
                    s.push((Instant::now(), n));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let t0 = Instant::now();
    for i in 0..COLD_PODS {
        kube.create_pod(pod("bench", &format!("m{i}"), NODE, "app", &[&cold_ip(i)]));
    }
    // Once the burst is spent the queue is real; then the last 20 pods in it ask at once.
    wait_for(Duration::from_secs(30), || {
        std::future::ready(sts.call_count() - sts0 >= 60)
    })
    .await?;
    let asked_at = t0.elapsed();
    let askers = (COLD_PODS - COLD_ASKERS..COLD_PODS).map(|i| {
        let to = agent.addr;
        tokio::spawn(async move {
            let t = Instant::now();
            let src: IpAddr = cold_ip(i).parse()?;
            let r = testbed::harness::request(to, src, Method::GET, CREDS, &[]).await?;
            ensure!(r.status == StatusCode::OK, "pod m{i}: {}", r.status);
            anyhow::Ok(t.elapsed())
        })
    });
    let mut first = Vec::new();
    for r in futures::future::join_all(askers).await {
        first.push(r??);
    }
    let answered_at = t0.elapsed();
    let done_after_asks = sts.call_count() - sts0;
    wait_for(Duration::from_secs(120), || {
        std::future::ready(sts.call_count() - sts0 >= COLD_PODS)
    })
    .await?;
    let prefetched = t0.elapsed();
    sampling.abort();
    // Every pod is now served from cache: a GET to each costs no STS call and no TokenRequest.
    let (sts1, tr1) = (sts.call_count(), kube.counters().token_requests);
    for i in 0..COLD_PODS {
        let src: IpAddr = cold_ip(i).parse()?;
        let r = testbed::harness::request(agent.addr, src, Method::GET, CREDS, &[]).await?;
        ensure!(r.status == StatusCode::OK, "pod m{i}: {}", r.status);
    }
    let extra = (
        sts.call_count() - sts1,
        kube.counters().token_requests - tr1,
    );
    let samples = samples.lock().map(|s| s.clone()).unwrap_or_default();
    let mut max_window = 0;
    for (i, (t, n)) in samples.iter().enumerate() {
        let before = samples[..=i]
            .iter()
            .rev()
            .find(|(u, _)| t.duration_since(*u) >= Duration::from_secs(1))
            .map(|(_, m)| *m)
            .unwrap_or(0);
        max_window = max_window.max(n - before);
    }
    let steady = match (samples.iter().find(|(_, n)| *n >= 100), samples.last()) {
        (Some((ta, na)), Some((tb, nb))) if tb > ta => {
            (nb - na) as f64 / tb.duration_since(*ta).as_secs_f64()
        }
        _ => f64::NAN,
    };
    println!(
        "== cold start: {COLD_PODS} pods at once, default --fetch-rate 50/s (no burst) and 16 in flight; {COLD_ASKERS} of the last in the queue ask at once"
    );
    println!(
        "asked at {:.2} s with {done_after_asks} of {COLD_PODS} fetched by their answer at {:.2} s; first requests p50 {:.0} ms p99 {:.0} ms max {:.0} ms",
        asked_at.as_secs_f64(),
        answered_at.as_secs_f64(),
        pct(&mut first, 0.5).as_secs_f64() * 1e3,
        pct(&mut first, 0.99).as_secs_f64() * 1e3,
        first
            .iter()
            .max()
            .copied()
            .unwrap_or_default()
            .as_secs_f64()
            * 1e3,
    );
    println!(
        "every pod served from cache after {:.2} s (a GET to each then cost {} STS calls, {} TokenRequests); STS calls {} (max {max_window} in any 1 s, {steady:.1}/s after the burst), TokenRequests {}",
        prefetched.as_secs_f64(),
        extra.0,
        extra.1,
        sts.call_count() - sts0,
        kube.counters().token_requests - tr0,
    );
    println!(
        "agent RSS {:.1} MiB now, {:.1} MiB peak",
        rss_kib(pid, "VmRSS:").unwrap_or(0) as f64 / 1024.0,
        rss_kib(pid, "VmHWM:").unwrap_or(0) as f64 / 1024.0,
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------

async fn orchestrate(opts: Opts) -> anyhow::Result<()> {
    testbed::harness::install_crypto();
    let kube = KubeApi::start().await?;
    let sts = StsEmulator::start().await?;
    let upstream = FakeImds::start().await?;
    kube.apply_service_account(
        "bench",
        "app",
        &[(ANN, "arn:aws:iam::123456789012:role/bench")],
    );
    kube.create_pod(pod("bench", "hot", NODE, "app", &[HOT_IP]));
    let dir = testbed::util::TempDir::new("bench")?;
    kube.write_kubeconfig(&dir.path().join("kubeconfig"))?;
    let bed = Bed {
        upstream_url: upstream.url(),
        kube,
        sts,
        _upstream: upstream,
        dir,
        exe: std::env::current_exe()?,
        agent_exe: match opts.agent_exe.clone() {
            Some(p) => p,
            None => std::env::current_exe()?,
        },
    };
    println!("agent: {}", bed.agent_exe.display());
    println!(
        "machine: {} cores, {}; {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        cpu_model(),
        time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
    );

    let agent = bed.agent(false).await?;
    let (spec, recorded) = record(&agent, bed.dir.path()).await?;
    let ceiling = bed.ceiling(&spec, false).await?;
    check_same_bytes(&ceiling, &recorded).await?;
    println!(
        "both servers answer the same bytes: credentials {} B body, token {} B, role list {} B",
        recorded[2].body.len(),
        recorded[0].body.len(),
        recorded[1].body.len()
    );

    if !opts.callgrind_only {
        ratios(&opts, agent.addr, ceiling.addr).await?;
    }
    drop(ceiling);
    drop(agent);

    // Before the cold start, so no prefetch runs while instructions are counted.
    if opts.callgrind {
        let n = if opts.quick { 500 } else { 2000 };
        let agent = bed.agent(true).await?;
        let keep = opts.callgrind_out.as_deref();
        let a = instructions_per_get(&agent, bed.dir.path(), "agent", n, keep).await?;
        drop(agent);
        let ceiling = bed.ceiling(&spec, true).await?;
        let c = instructions_per_get(&ceiling, bed.dir.path(), "ceiling", n, keep).await?;
        drop(ceiling);
        println!(
            "== instructions per cached GET (callgrind, {n} GETs on one kept-alive connection after 200 to warm up)"
        );
        println!(
            "agent {a:.0}, ceiling {c:.0}: {:.2}x (target <= 1.30)",
            a / c
        );
    }

    if opts.callgrind_only {
        return Ok(());
    }
    // A fresh agent, so its RSS is the cold start's.
    let agent = bed.agent(false).await?;
    cold_start(&bed, &agent).await?;
    drop(agent);
    Ok(())
}

/// Cached GETs on kept-alive connections and full IMDSv2 fetches on new ones, agent against
/// ceiling in A/B/B/A rounds.
async fn ratios(opts: &Opts, agent: SocketAddr, ceiling: SocketAddr) -> anyhow::Result<()> {
    let (per, fetches, rounds) = if opts.quick {
        (100, 20, 1)
    } else {
        (500, 60, 3)
    };
    let conns = 64;
    let rows = abba(agent, ceiling, rounds, |to| {
        keepalive(to, CREDS, conns, per)
    })
    .await?;
    println!(
        "== cached credential GET, {conns} kept-alive connections, {} requests per run; rounds of A/B/B/A after a warm-up",
        conns * per
    );
    let (mut tput, mut p99) = (Vec::new(), Vec::new());
    for (mut a, mut b) in rows {
        let (a99, b99) = (a.pct(0.99), b.pct(0.99));
        println!(
            "agent {:>7.0} req/s p50 {:>5.0} us p99 {:>5.0} us | ceiling {:>7.0} req/s p50 {:>5.0} us p99 {:>5.0} us | throughput {:.2}x, p99 {:.2}x",
            a.rate(),
            us(a.pct(0.5)),
            us(a99),
            b.rate(),
            us(b.pct(0.5)),
            us(b99),
            a.rate() / b.rate(),
            a99.as_secs_f64() / b99.as_secs_f64(),
        );
        tput.push(a.rate() / b.rate());
        p99.push(a99.as_secs_f64() / b99.as_secs_f64());
    }
    println!(
        "agent/ceiling throughput: median {:.2}, best {:.2} (target >= 0.90); p99: median {:.2}, best {:.2} (target <= 1.20)",
        median(&tput),
        best(&tput, true),
        median(&p99),
        best(&p99, false)
    );

    let clients = 16;
    let rows = abba(agent, ceiling, rounds, |to| imdsv2(to, clients, fetches)).await?;
    println!(
        "== full IMDSv2 fetch (PUT token, GET role, GET credentials; each on a new connection), {clients} clients, {} fetches per run",
        clients * fetches
    );
    let mut ratios = Vec::new();
    for (mut a, mut b) in rows {
        println!(
            "agent {:>6.0} fetches/s p99 {:>6.0} us | ceiling {:>6.0} fetches/s p99 {:>6.0} us | {:.2}x",
            a.rate(),
            us(a.pct(0.99)),
            b.rate(),
            us(b.pct(0.99)),
            a.rate() / b.rate()
        );
        ratios.push(a.rate() / b.rate());
    }
    println!(
        "agent/ceiling fetch rate: median {:.2}, best {:.2} (target >= 0.90)",
        median(&ratios),
        best(&ratios, true)
    );
    Ok(())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown cpu".into())
}
