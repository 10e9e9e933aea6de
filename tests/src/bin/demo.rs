//! The demo: the real agent, in-process, against the emulated Kubernetes API, STS (moto when
//! `tests/setup.sh` installed it, the in-process emulator otherwise) and a fake upstream IMDS,
//! all on loopback. Pods are told apart by source address (127.0.0.x), so `curl --interface`
//! plays each pod. Nothing here ever contacts 169.254.169.254.
//!
//! `cargo run -p irsa-imds-testbed --bin demo` serves until Ctrl-C; `-- --check` queries the
//! agent itself, prints what it got and exits (non-zero if anything is off).

use std::time::Duration;

use http::StatusCode;
use testbed::fake_imds::FakeImds;
use testbed::harness::{Agent, NODE, wait_for};
use testbed::kube_api::{KubeApi, pod};

const ANN: &str = "eks.amazonaws.com/role-arn";
const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

struct DemoPod {
    name: &'static str,
    sa: &'static str,
    ip: &'static str,
    role: Option<&'static str>,
}

const PODS: &[DemoPod] = &[
    DemoPod {
        name: "billing-api",
        sa: "billing",
        ip: "127.0.0.11",
        role: Some("arn:aws:iam::123456789012:role/billing-reader"),
    },
    DemoPod {
        name: "report-job",
        sa: "reports",
        ip: "127.0.0.12",
        role: Some("arn:aws:iam::123456789012:role/reports-writer"),
    },
    DemoPod {
        name: "frontend",
        sa: "frontend",
        ip: "127.0.0.13",
        role: None,
    },
];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let check = std::env::args().any(|a| a == "--check");
    let kube = KubeApi::start().await?;
    let upstream = FakeImds::start().await?;
    let (sts_endpoint, sts_name, _moto, _emu) = match testbed::moto::Moto::start().await {
        Ok(m) => (m.endpoint(), "moto (real STS emulator)", Some(m), None),
        Err(e) => {
            eprintln!(
                "note: moto unavailable ({e:#}); using the in-process STS emulator. Run tests/setup.sh for moto."
            );
            let s = testbed::sts::StsEmulator::start().await?;
            (s.endpoint(), "in-process STS emulator", None, Some(s))
        }
    };
    for p in PODS {
        let ann: Vec<(&str, &str)> = p.role.map(|r| vec![(ANN, r)]).unwrap_or_default();
        kube.apply_service_account("demo", p.sa, &ann);
    }
    testbed::harness::install_crypto();
    let sts = testbed::harness::sdk_sts(sts_endpoint.clone()).await;
    let agent = Agent::start(&kube, sts, &upstream.url(), &[]).await?;
    for p in PODS {
        kube.create_pod(pod("demo", p.name, NODE, p.sa, &[p.ip]));
    }
    let last = PODS
        .iter()
        .rev()
        .find(|p| p.role.is_some())
        .map(|p| p.ip)
        .unwrap_or("127.0.0.11");
    wait_for(Duration::from_secs(15), || async {
        matches!(agent.get(last, CREDS).await, Ok(r) if r.status == StatusCode::OK)
    })
    .await?;

    let url = agent.url();
    println!(
        "\nirsa-imds demo: agent on {url} (ops on http://{}), Kubernetes API emulator on {}, STS: {sts_name} at {sts_endpoint}",
        agent.ops,
        kube.url()
    );
    println!("Each pod is a source address; curl --interface <addr> plays that pod.\n");
    for p in PODS {
        println!(
            "pod demo/{} (serviceAccount {}, IP {}): role {}",
            p.name,
            p.sa,
            p.ip,
            p.role.unwrap_or("none")
        );
    }
    println!("\nTry:");
    println!("  curl --interface 127.0.0.11 {url}{CREDS}");
    println!("      -> 'billing-reader' (the role name, no newline): what an SDK lists first");
    println!("  curl --interface 127.0.0.11 {url}{CREDS}billing-reader");
    println!("      -> JSON credentials for billing-reader, session 'demo.billing-api'");
    println!("  curl --interface 127.0.0.12 {url}{CREDS}billing-reader");
    println!("      -> 404: report-job's role is reports-writer, it never sees billing-reader");
    println!("  curl -i --interface 127.0.0.13 {url}{CREDS}");
    println!("      -> 404: frontend has no role; it gets nothing (and never the node's role)");
    println!("  curl -i --interface 127.0.0.99 {url}{CREDS}");
    println!("      -> 404 after a short wait: no pod has that address");
    println!(
        "  TOKEN=$(curl -s --interface 127.0.0.11 -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' {url}/latest/api/token)"
    );
    println!("  curl --interface 127.0.0.11 -H \"X-aws-ec2-metadata-token: $TOKEN\" {url}{CREDS}");
    println!(
        "      -> IMDSv2: 'billing-reader'; the same token from 127.0.0.12 gets 401 (tokens are bound to the pod)"
    );
    println!("  curl --interface 127.0.0.11 {url}/latest/meta-data/placement/region");
    println!(
        "      -> 'us-east-1', proxied (allow-listed) from the fake upstream IMDS; /latest/user-data is 404"
    );
    println!("  curl http://{}/metrics", agent.ops);

    if check {
        let mut ok = true;
        for p in PODS {
            let r = agent.get(p.ip, CREDS).await?;
            let want = p
                .role
                .map(|r| r.rsplit('/').next().unwrap_or(r).to_string());
            let got = (r.status == StatusCode::OK).then(|| r.text());
            println!("check {}: listing {:?} (want {:?})", p.name, got, want);
            ok &= got == want;
            if let Some(role) = &want {
                let c = agent.get(p.ip, &format!("{CREDS}{role}")).await?.json()?;
                let good = c["Code"] == "Success"
                    && c["AccessKeyId"].as_str().is_some_and(|k| !k.is_empty());
                println!(
                    "check {}: credentials Code={} Expiration={}",
                    p.name, c["Code"], c["Expiration"]
                );
                ok &= good;
            }
        }
        agent.stop().await?;
        anyhow::ensure!(ok, "demo check failed");
        println!("demo check passed");
        return Ok(());
    }
    println!("\nCtrl-C to stop.");
    tokio::signal::ctrl_c().await?;
    agent.stop().await
}
