//! Benchmarks that print numbers, each measured side by side with a ceiling in the same run
//! (these machines are shared and noisy: read the ratios, not the absolute times).
//!
//! `cargo run --release -p irsa-imds-testbed --bin bench`
//!
//! 1. Cached credential GETs through the agent vs. the same number of GETs of a static page from
//!    a bare hyper server (the fake upstream IMDS): the agent's per-request overhead.
//! 2. Mass pod start: N pods appear at once; time until every one is served, and how many
//!    TokenRequests and STS calls that cost (the ceiling is N of each).

use std::time::{Duration, Instant};

use http::StatusCode;
use testbed::fake_imds::FakeImds;
use testbed::harness::{Agent, NODE, wait_for};
use testbed::kube_api::{KubeApi, pod};
use testbed::sts::StsEmulator;

const ANN: &str = "eks.amazonaws.com/role-arn";
const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p) as usize]
}

/// `n` GETs over `conc` kept-alive connections from source address `src` (as SDKs reuse theirs).
async fn timed_gets(
    to: std::net::SocketAddr,
    src: &str,
    path: &str,
    n: usize,
    conc: usize,
) -> (Duration, Vec<Duration>) {
    use http_body_util::BodyExt;
    let t0 = Instant::now();
    let per = n / conc;
    let src: std::net::IpAddr = src
        .parse()
        .unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]));
    let tasks = (0..conc).map(|_| {
        let path = path.to_string();
        tokio::spawn(async move {
            let sock = tokio::net::TcpSocket::new_v4().ok()?;
            sock.bind(std::net::SocketAddr::new(src, 0)).ok()?;
            let stream = sock.connect(to).await.ok()?;
            let (mut tx, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .ok()?;
            tokio::spawn(conn);
            let mut lat = Vec::with_capacity(per);
            for _ in 0..per {
                let t = Instant::now();
                let req = http::Request::get(path.as_str())
                    .header("host", "169.254.169.254")
                    .body(http_body_util::Empty::<bytes::Bytes>::new())
                    .ok()?;
                let resp = tx.send_request(req).await.ok()?;
                let ok = resp.status() == StatusCode::OK;
                resp.into_body().collect().await.ok()?;
                if !ok {
                    return None;
                }
                lat.push(t.elapsed());
            }
            Some(lat)
        })
    });
    let mut all = Vec::new();
    for t in futures::future::join_all(tasks).await {
        all.extend(t.ok().flatten().expect("a bench connection failed"));
    }
    (t0.elapsed(), all)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let kube = KubeApi::start().await?;
    let sts = StsEmulator::start().await?;
    let upstream = FakeImds::start().await?;
    kube.apply_service_account(
        "bench",
        "app",
        &[(ANN, "arn:aws:iam::123456789012:role/bench")],
    );
    testbed::harness::install_crypto();
    let exchange = testbed::harness::sdk_sts(sts.endpoint()).await;
    let agent = Agent::start(
        &kube,
        exchange,
        &upstream.url(),
        &["--fetch-rate", "1000", "--max-concurrent-fetches", "32"],
    )
    .await?;

    // 1. Per-request overhead on the hot path (cache hit), vs. a static page from bare hyper.
    kube.create_pod(pod("bench", "hot", NODE, "app", &["127.0.0.2"]));
    wait_for(Duration::from_secs(10), || async {
        matches!(agent.get("127.0.0.2", &format!("{CREDS}bench")).await, Ok(r) if r.status == StatusCode::OK)
    })
    .await?;
    let n = 8000;
    let conc = 8;
    let up_addr: std::net::SocketAddr = upstream.url().trim_start_matches("http://").parse()?;
    // Interleave A/B twice to even out drift.
    let mut rows = Vec::new();
    for _ in 0..3 {
        let (ta, mut la) =
            timed_gets(agent.imds, "127.0.0.2", &format!("{CREDS}bench"), n, conc).await;
        let (tb, mut lb) = timed_gets(
            up_addr,
            "127.0.0.2",
            "/latest/meta-data/instance-id",
            n,
            conc,
        )
        .await;
        rows.push((
            ta,
            pct(&mut la, 0.5),
            pct(&mut la, 0.99),
            tb,
            pct(&mut lb, 0.5),
            pct(&mut lb, 0.99),
        ));
    }
    println!("== cached credential GET ({conc} kept-alive connections, {n} requests per round)");
    for (ta, a50, a99, tb, b50, b99) in &rows {
        println!(
            "agent:   {:>8.0} req/s  p50 {:>6.0} us  p99 {:>6.0} us | bare hyper ceiling: {:>8.0} req/s  p50 {:>6.0} us  p99 {:>6.0} us | throughput ratio agent/ceiling {:.2}",
            n as f64 / ta.as_secs_f64(),
            a50.as_secs_f64() * 1e6,
            a99.as_secs_f64() * 1e6,
            n as f64 / tb.as_secs_f64(),
            b50.as_secs_f64() * 1e6,
            b99.as_secs_f64() * 1e6,
            tb.as_secs_f64() / ta.as_secs_f64(),
        );
    }

    // 2. Mass pod start.
    let pods = 300;
    let before_sts = sts.call_count();
    let before_tr = kube.counters().token_requests;
    let t0 = Instant::now();
    for i in 0..pods {
        kube.create_pod(pod(
            "bench",
            &format!("m{i}"),
            NODE,
            "app",
            &[&format!("127.3.{}.{}", i / 250, 1 + i % 250)],
        ));
    }
    wait_for(Duration::from_secs(120), || async {
        sts.call_count() - before_sts >= pods
    })
    .await?;
    let prefetched = t0.elapsed();
    let mut first = Vec::new();
    for i in 0..pods {
        let t = Instant::now();
        let r = agent
            .get(
                &format!("127.3.{}.{}", i / 250, 1 + i % 250),
                &format!("{CREDS}bench"),
            )
            .await?;
        anyhow::ensure!(r.status == StatusCode::OK, "pod {i}: {}", r.status);
        first.push(t.elapsed());
    }
    println!("== mass pod start ({pods} pods at once, fetch rate 1000/s, 32 in flight)");
    println!(
        "all prefetched in {:.2} s; first request p50 {:.0} us p99 {:.0} us; TokenRequests {} (ceiling {pods}), STS calls {} (ceiling {pods})",
        prefetched.as_secs_f64(),
        pct(&mut first, 0.5).as_secs_f64() * 1e6,
        pct(&mut first, 0.99).as_secs_f64() * 1e6,
        kube.counters().token_requests - before_tr,
        sts.call_count() - before_sts,
    );
    agent.stop().await
}
