//! `irsa-imds-agent explain`: the report an operator gets from the running agent through its
//! local root-only socket names the right cause for a served pod, a roleless pod, an unknown
//! address and a pod whose role STS refuses, and never an access key, secret or session token.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use testbed::fake_imds::FakeImds;
use testbed::harness::{Agent, NODE, sdk_sts};
use testbed::kube_api::{KubeApi, pod};
use testbed::sts::StsEmulator;

const ROLE_A: &str = "arn:aws:iam::123456789012:role/team-a/reader";
const ROLE_B: &str = "arn:aws:iam::123456789012:role/writer";
const ANN: &str = "eks.amazonaws.com/role-arn";
const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

async fn explain(socket: &Path, target: &str) -> String {
    irsa_imds_agent::explain::query(socket, target)
        .await
        .unwrap_or_else(|e| panic!("explain {target}: {e}"))
}

#[tokio::test]
async fn explain_names_the_cause_for_each_pod_and_never_a_secret() {
    let kube = KubeApi::start().await.unwrap();
    let sts = StsEmulator::start().await.unwrap();
    let upstream = FakeImds::start().await.unwrap();
    kube.apply_service_account("apps", "reader", &[(ANN, ROLE_A)]);
    kube.apply_service_account("apps", "writer", &[(ANN, ROLE_B)]);
    kube.apply_service_account("apps", "plain", &[]);
    sts.deny_role(ROLE_B);
    let dir = testbed::util::TempDir::new("explain").unwrap();
    let socket = dir.path().join("run/explain.sock");
    let agent = Agent::start(
        &kube,
        sdk_sts(sts.endpoint()).await,
        &upstream.url(),
        &[
            "--pod-wait",
            "100ms",
            "--explain-socket",
            socket.to_str().unwrap(),
        ],
    )
    .await
    .unwrap();
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "root only");

    kube.create_pod(pod("apps", "plain", NODE, "plain", &["127.0.0.93"]));
    for (name, sa, ip) in [
        ("served", "reader", "127.0.0.91"),
        ("refused", "writer", "127.0.0.92"),
    ] {
        kube.create_pod(pod("apps", name, NODE, sa, &[ip]));
        agent
            .wait_served(ip, CREDS, Duration::from_secs(10))
            .await
            .unwrap();
    }
    let served = agent
        .get("127.0.0.91", &format!("{CREDS}reader"))
        .await
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(served["Code"], "Success");
    let refused = agent
        .get("127.0.0.92", &format!("{CREDS}writer"))
        .await
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(refused["Code"], "AssumeRoleUnauthorizedAccess");

    // The served pod, by name and by address: the whole path.
    let r = explain(&socket, "apps/served").await;
    for want in [
        "pod apps/served",
        "found by the watch: yes (running)",
        "address 127.0.0.91: identified as apps/served",
        "service account: reader",
        &format!("role: {ROLE_A}"),
        "from: the ServiceAccount's role annotation",
        "credentials: cached, expire ",
        "last STS error: none",
        "answer: 200 with its credentials",
        "node: redirect rule not managed",
        "pod index synced",
    ] {
        assert!(r.contains(want), "{want:?} missing from:\n{r}");
    }
    let by_ip = explain(&socket, "127.0.0.91").await;
    assert!(
        by_ip.contains("pod apps/served") && by_ip.contains(ROLE_A),
        "{by_ip}"
    );

    // The roleless pod.
    let r = explain(&socket, "apps/plain").await;
    assert!(r.contains("role: none"), "{r}");
    assert!(r.contains("answer: 404 (reason no_role"), "{r}");

    // An address no pod of this node has.
    let r = explain(&socket, "127.0.0.99").await;
    assert!(
        r.contains("address 127.0.0.99: unknown source")
            && r.contains("answer: 404 for credentials (reason unknown_source"),
        "{r}"
    );
    // A pod this agent does not know.
    let r = explain(&socket, "apps/elsewhere").await;
    assert!(r.contains("not known to this agent"), "{r}");

    // The pod whose role STS refuses: the role, STS's code and what the pod is told.
    let r = explain(&socket, "apps/refused").await;
    eprintln!("{r}");
    for want in [
        &format!("role: {ROLE_B}"),
        "last STS error: sts refused: AccessDenied",
        "answer: 200 AssumeRoleUnauthorizedAccess (no keys): STS refuses the role",
    ] {
        assert!(r.contains(want), "{want:?} missing from:\n{r}");
    }

    // The operator's command line prints the same report.
    // (Off the runtime's thread: the agent answering it runs on this one.)
    let sock = socket.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(testbed::util::agent_bin())
            .args(["explain", "--socket", sock.to_str().unwrap(), "apps/served"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let cli = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(cli.contains(&format!("role: {ROLE_A}")), "{cli}");

    // No secret anywhere: not the key id, not the secret, not the session token STS issued.
    let issued = sts.issued();
    assert!(!issued.is_empty());
    let mut all = vec![cli];
    for t in [
        "apps/served",
        "127.0.0.91",
        "apps/refused",
        "apps/plain",
        "127.0.0.99",
    ] {
        all.push(explain(&socket, t).await);
    }
    for report in &all {
        for i in &issued {
            for secret in [&i.access_key_id, &i.secret_access_key, &i.session_token] {
                assert!(!report.contains(secret.as_str()), "a secret in:\n{report}");
            }
        }
        assert!(!report.contains("ASIA"), "{report}");
    }
    agent.stop().await.unwrap();
    assert!(!socket.exists(), "the socket goes with the agent");
}

#[tokio::test]
async fn bad_explain_requests_get_a_clear_error() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let kube = KubeApi::start().await.unwrap();
    let sts = StsEmulator::start().await.unwrap();
    let upstream = FakeImds::start().await.unwrap();
    let dir = testbed::util::TempDir::new("explain-bad").unwrap();
    let socket = dir.path().join("explain.sock");
    let agent = Agent::start(
        &kube,
        sdk_sts(sts.endpoint()).await,
        &upstream.url(),
        &["--explain-socket", socket.to_str().unwrap()],
    )
    .await
    .unwrap();
    // Refused before sending by the client...
    let e = irsa_imds_agent::explain::query(&socket, "not a target")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("expected <namespace>/<pod>"), "{e}");
    // ...and by the agent, whatever a raw client sends.
    let long = "a".repeat(2000);
    for (raw, want) in [
        (b"Bad/Name\n".to_vec(), "invalid target"),
        (b"\xff\xfe\n".to_vec(), "not UTF-8"),
        (format!("ns/{long}\n").into_bytes(), "longer than 512 bytes"),
        (b"10.0.0.1; rm -rf /\n".to_vec(), "invalid target"),
    ] {
        let mut s = tokio::net::UnixStream::connect(&socket).await.unwrap();
        s.write_all(&raw).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("error: ") && out.contains(want), "{out}");
    }
    // The agent is none the worse.
    let r = irsa_imds_agent::explain::query(&socket, "127.0.0.5")
        .await
        .unwrap();
    assert!(r.contains("unknown source"), "{r}");
    // No agent listening: a clear error naming the socket.
    let e = irsa_imds_agent::explain::query(&dir.path().join("none.sock"), "a/b")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("cannot reach the agent"), "{e}");
    agent.stop().await.unwrap();
}
