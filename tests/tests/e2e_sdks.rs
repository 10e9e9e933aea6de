//! The SDKs the agent exists for, end to end through the real redirect and a real Kubernetes
//! control plane: the AWS SDK for Java 1.11.600 and for Go v1.23.0, botocore 1.12.199 and
//! aws-sdk for JavaScript 2.400.0 (all from before web identity; IMDSv1 only), and a current SDK
//! for Go v2, for Java 2.x and botocore (IMDSv2 session tokens). Each runs unmodified in a pod network namespace with a clean environment and its
//! SDK's default credential chain (no IMDS endpoint override: it dials 169.254.169.254, which the
//! agent's DNAT in the node namespace sends to the agent); only its STS call is pointed at moto.
//! Two pods with different roles at once each get their own; the pod without a role gets no
//! credentials; the node's role (served by the fake upstream IMDS) never appears.
//!
//! The Kubernetes side is real: `etcd` and `kube-apiserver` run inside the node namespace
//! (tests/src/controlplane.rs), `deploy/irsa-imds.yaml` is applied to them, the agent runs with a
//! TokenRequest token of its own ServiceAccount (so the shipped ClusterRole is all it may do), and
//! the test plays the kubelet. STS verifies every token the agent sends against the apiserver's
//! OIDC discovery and JWKS and each role's IRSA trust policy, then moto issues the credentials.
//! One bed (namespaces, control plane, agent) serves the seven clients in turn.
//!
//! The clients are built by `tests/setup-sdk-clients.sh` into the test-bed cache, the control
//! plane by `tests/setup-controlplane.sh`. One that is missing fails the test under CI
//! (`CI=true`) and is skipped with a loud message elsewhere. Everything runs inside namespaces
//! this test creates and removes (root required).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use testbed::controlplane::{API_AUDIENCE, ControlPlane};
use testbed::fake_imds::{FakeImds, NODE_ROLE_KEY_ID};
use testbed::harness::{NODE, wait_for};
use testbed::jwt::KeySource;
use testbed::moto::Moto;
use testbed::netns::Topology;
use testbed::sts::{Forward, RoleTrust, StsEmulator, Trust};

const ANN: &str = "eks.amazonaws.com/role-arn";
const READER: &str = "arn:aws:iam::123456789012:role/sdk-reader";
const WRITER: &str = "arn:aws:iam::123456789012:role/sdk-writer";
const NS: &str = "sdks";
const AGENT_NS: &str = "kube-system";
const AGENT_SA: &str = "irsa-imds";
const AGENT_PORT: u16 = 8181;
const OPS_PORT: u16 = 8182;

/// The test-bed cache `tests/setup-sdk-clients.sh` builds into.
fn cache_dir() -> PathBuf {
    std::env::var_os("IRSA_TESTBED_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/irsa-imds-testbed"))
}

#[derive(Clone, Copy, Debug)]
enum Sdk {
    /// AWS SDK for Java 1.11.600: DefaultAWSCredentialsProviderChain, IMDSv1.
    JavaLegacy,
    /// AWS SDK for Go v1.23.0: default session, EC2 role provider, IMDSv1.
    GoLegacy,
    /// Current AWS SDK for Go v2: default config, IMDSv2.
    GoCurrent,
    /// Current AWS SDK for Java 2.x: DefaultCredentialsProvider, IMDSv2.
    JavaCurrent,
    /// botocore 1.12.199 (the last before web identity), IMDSv1.
    BotoLegacy,
    /// aws-sdk for JavaScript 2.400.0 (before web identity), IMDSv1.
    JsLegacy,
    /// Current botocore (boto3), IMDSv2 only.
    BotoCurrent,
}

impl Sdk {
    fn name(self) -> &'static str {
        match self {
            Sdk::JavaLegacy => "java-legacy",
            Sdk::GoLegacy => "go-legacy",
            Sdk::GoCurrent => "go-current",
            Sdk::JavaCurrent => "java-current",
            Sdk::BotoLegacy => "legacy-boto",
            Sdk::JsLegacy => "legacy-js",
            Sdk::BotoCurrent => "current-boto",
        }
    }

    /// What the client reports as its SDK, and the credential provider of its chain that must
    /// answer (the instance-metadata one).
    fn expect(self) -> (&'static str, &'static str) {
        match self {
            // Without ECS variables the container provider wraps the instance-profile one.
            Sdk::JavaLegacy => (
                "aws-java-sdk 1.11.600",
                "EC2ContainerCredentialsProviderWrapper",
            ),
            Sdk::GoLegacy => ("aws-sdk-go 1.23.0", "EC2RoleProvider"),
            Sdk::GoCurrent => ("aws-sdk-go-v2 ", "EC2RoleProvider"),
            Sdk::JavaCurrent => ("aws-sdk-java-v2 2.", "InstanceProfileCredentialsProvider"),
            Sdk::BotoLegacy => ("1.12.199", "iam-role"),
            Sdk::JsLegacy => ("2.400.0", "EC2MetadataCredentials"),
            Sdk::BotoCurrent => ("1.", "iam-role"),
        }
    }

    /// Whether the client reports a missing chain as "no credentials ..." (the Java and Go
    /// clients of tests/clients/, and botocore's `None`), rather than in the SDK's own words.
    fn says_no_credentials(self) -> bool {
        !matches!(self, Sdk::JsLegacy)
    }

    /// Whether the SDK speaks IMDSv2 (the test then forbids IMDSv1 fallback).
    fn imds_v2(self) -> bool {
        matches!(self, Sdk::GoCurrent | Sdk::JavaCurrent | Sdk::BotoCurrent)
    }

    /// The command line (program and arguments, STS endpoint to follow), or what is missing.
    fn argv(self) -> Result<Vec<String>, String> {
        let cache = cache_dir();
        let scripts = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("clients");
        let script = |python: PathBuf| {
            testbed::deps::require(&python)
                .map(|p| {
                    vec![
                        p.display().to_string(),
                        scripts.join("boto_client.py").display().to_string(),
                    ]
                })
                .map_err(|e| e.to_string())
        };
        let (main_class, built) = match self {
            Sdk::BotoLegacy => return script(testbed::deps::legacy_python()),
            Sdk::BotoCurrent => return script(testbed::deps::moto_python()),
            Sdk::JsLegacy => {
                let modules = testbed::deps::require(&testbed::deps::node_path())
                    .map_err(|e| e.to_string())?;
                return Ok(vec![
                    format!("NODE_PATH={}", modules.display()),
                    "node".into(),
                    scripts.join("legacy_js.js").display().to_string(),
                ]);
            }
            Sdk::GoLegacy | Sdk::GoCurrent => {
                let bin = cache.join("bin").join(format!("{}-client", self.name()));
                return if bin.is_file() {
                    Ok(vec![bin.display().to_string()])
                } else {
                    Err(format!("{} is missing", bin.display()))
                };
            }
            Sdk::JavaLegacy => ("LegacyJavaClient", cache.join("sdk-clients/java-legacy")),
            Sdk::JavaCurrent => ("CurrentJavaClient", cache.join("sdk-clients/java-current")),
        };
        let (classes, lib) = (built.join("classes"), built.join("lib"));
        if !classes.join(format!("{main_class}.class")).is_file() || !lib.is_dir() {
            return Err(format!("{} is missing or incomplete", built.display()));
        }
        Ok(vec![
            "java".into(),
            // One short-lived JVM per run: the quick JIT tier and the small collector start fastest.
            "-XX:TieredStopAtLevel=1".into(),
            "-XX:+UseSerialGC".into(),
            "-Xshare:auto".into(),
            "-XX:-UsePerfData".into(),
            "-cp".into(),
            format!("{}:{}/*", classes.display(), lib.display()),
            main_class.into(),
        ])
    }

    /// The command line, or `None` (skip) when the client is missing outside CI; under CI a
    /// missing client fails the test.
    fn argv_or_skip(self) -> Option<Vec<String>> {
        match self.argv() {
            Ok(v) => Some(v),
            Err(why) => {
                let msg = format!(
                    "{} client not available: {why}; run `bash tests/setup.sh` (it calls \
                     tests/setup-sdk-clients.sh; build log in {}/sdk-clients/logs/{}.log)",
                    self.name(),
                    cache_dir().display(),
                    self.name()
                );
                if std::env::var("CI").is_ok_and(|v| v == "true") {
                    panic!("{msg}");
                }
                eprintln!("SKIPPED (not CI): {msg}");
                None
            }
        }
    }
}

/// Pods: 0 = reader role, 1 = writer role, 2 = no role.
struct Bed {
    // Dropped in this order: the control plane before the namespace it runs in.
    cp: ControlPlane,
    upstream: FakeImds,
    moto: Moto,
    sts: StsEmulator,
    dir: testbed::util::TempDir,
    topo: Topology,
}

/// The bed, or `None` (skip) when the control plane is not built outside CI.
async fn bed() -> Option<Bed> {
    testbed::netns::require_root().expect("root");
    if !testbed::controlplane::binaries_present().unwrap() {
        return None;
    }
    let topo = Topology::new(3).unwrap();
    let cp = ControlPlane::start_in_netns(topo.node_ns()).await.unwrap();
    let manifest = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/irsa-imds.yaml"),
    )
    .unwrap();
    cp.apply(&manifest).await.unwrap();
    cp.create_namespace(NS).await.unwrap();
    cp.apply_service_account(NS, "reader", &[(ANN, READER)])
        .await
        .unwrap();
    cp.apply_service_account(NS, "writer", &[(ANN, WRITER)])
        .await
        .unwrap();
    cp.apply_service_account(NS, "plain", &[]).await.unwrap();
    for (i, sa) in ["reader", "writer", "plain"].iter().enumerate() {
        let ip = topo.pod_ip(i).to_string();
        cp.run_pod(NS, &format!("app-{i}"), NODE, sa, &[&ip])
            .await
            .unwrap();
    }
    let upstream = FakeImds::start_in_node(&topo).await.unwrap();
    let moto = Moto::start_in_netns(topo.node_ns()).await.unwrap();
    // STS as AWS runs it for IRSA: the cluster's OIDC provider (the apiserver's own discovery
    // and JWKS) and one trust policy per role naming its ServiceAccount; moto then issues.
    let keys = KeySource::Oidc {
        issuer_url: cp.issuer.clone(),
        ca_pem: Some(cp.ca_pem.clone()),
        bearer_token: Some(cp.admin_token().to_string()),
    };
    let trust = Trust::Roles(
        [(READER, "reader"), (WRITER, "writer")]
            .into_iter()
            .map(|(role, sa)| (role.to_string(), RoleTrust::service_accounts(&[(NS, sa)])))
            .collect(),
    );
    let sts = StsEmulator::start_forwarding(
        topo.bind_in_node("127.0.0.1:0".parse().unwrap()).unwrap(),
        keys,
        trust,
        Forward {
            netns: Some(topo.node_ns().to_string()),
            addr: format!("127.0.0.1:{}", moto.port()).parse().unwrap(),
        },
    )
    .await
    .unwrap();
    let dir = testbed::util::TempDir::new("e2e-sdks").unwrap();
    std::fs::create_dir_all(dir.path().join("home")).unwrap();
    // The agent's own ServiceAccount token, as the kubelet would project it into its pod.
    let token = cp
        .mint_token(AGENT_NS, AGENT_SA, &[API_AUDIENCE], 3600, None)
        .await
        .unwrap();
    cp.write_kubeconfig(&dir.path().join("kubeconfig"), &token, &cp.url)
        .unwrap();
    Some(Bed {
        cp,
        upstream,
        moto,
        sts,
        dir,
        topo,
    })
}

impl Bed {
    /// The agent binary in the node namespace, host mode: its own DNAT for 169.254.169.254 on
    /// the pods' veths, the real apiserver on the namespace's loopback, the fake upstream IMDS,
    /// the verifying STS.
    fn start_agent(&self) -> tokio::process::Child {
        let log = std::fs::File::create(self.dir.path().join("agent.log")).unwrap();
        self.topo
            .exec_in(
                self.topo.node_ns(),
                testbed::util::agent_bin().to_str().unwrap(),
            )
            .args(["--node-name", NODE])
            .args(["--listen", &format!("0.0.0.0:{AGENT_PORT}")])
            .args(["--ops-listen", &format!("127.0.0.1:{OPS_PORT}")])
            .args(["--upstream-imds", &self.upstream.url()])
            .args([
                "--kubeconfig",
                self.dir.path().join("kubeconfig").to_str().unwrap(),
            ])
            .args(["--log-format", "text", "--iptables"])
            .args(["--host-interface", &self.topo.host_interface_pattern()])
            .args(["--host-ip", &self.topo.node_ip().to_string()])
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ENDPOINT_URL_STS", self.sts.endpoint())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    /// GET on the agent's ops port from inside the node namespace: status and body.
    fn ops_get(&self, path: &str) -> Option<(u16, String)> {
        let addr: SocketAddr = format!("127.0.0.1:{OPS_PORT}").parse().ok()?;
        let mut s = self.topo.connect_in(self.topo.node_ns(), addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: agent\r\n\r\n").as_bytes())
            .ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).ok()?;
        let status = buf.split_whitespace().nth(1)?.parse().ok()?;
        let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
        Some((status, body))
    }

    async fn wait_ready(&self) {
        wait_for(Duration::from_secs(30), || async {
            self.ops_get("/readyz").map(|(s, _)| s) == Some(200)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}; agent log:\n{}", self.agent_log()));
    }

    /// How many IMDS requests on `route` the agent answered with `code` (its /metrics).
    fn served(&self, route: &str, code: &str) -> u64 {
        let (_, body) = self.ops_get("/metrics").expect("metrics");
        let (r, c) = (format!("route=\"{route}\""), format!("code=\"{code}\""));
        body.lines()
            .filter(|l| l.starts_with("irsa_imds_requests_total{") && l.contains(&r))
            .filter(|l| l.contains(&c))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// Runs the SDK client in pod `i` with a clean environment: no AWS settings but the one
    /// that forbids IMDSv1 to a current SDK, an empty home, no IMDS endpoint override. Returns
    /// its JSON line.
    async fn client(&self, i: usize, sdk: Sdk, argv: &[String]) -> Value {
        let sts = format!("http://{}:{}", self.topo.node_ip(), self.moto.port());
        let mut cmd = self.topo.exec_in(self.topo.pod_ns(i), "env");
        cmd.arg("-i")
            .arg("PATH=/usr/local/bin:/usr/bin:/bin")
            .arg(format!("HOME={}", self.dir.path().join("home").display()))
            .arg("AWS_CONFIG_FILE=/nonexistent/config")
            .arg("AWS_SHARED_CREDENTIALS_FILE=/nonexistent/credentials");
        if sdk.imds_v2() {
            cmd.arg("AWS_EC2_METADATA_V1_DISABLED=true");
        }
        cmd.args(argv).arg(&sts);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let started = std::time::Instant::now();
        let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
            .await
            .unwrap_or_else(|_| panic!("{} in pod {i} timed out", sdk.name()))
            .unwrap();
        // For the record (no assertion on speed): one process start to exit, SDK chain and STS.
        eprintln!(
            "{} in pod {i}: {} ms",
            sdk.name(),
            started.elapsed().as_millis()
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .unwrap_or_else(|| {
                panic!(
                    "{} in pod {i} printed no result ({}); stdout: {stdout}\nstderr: {}",
                    sdk.name(),
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                )
            });
        serde_json::from_str(line).unwrap()
    }
}

fn assumed(role: &str, pod: usize) -> String {
    let name = role.rsplit('/').next().unwrap();
    format!("arn:aws:sts::123456789012:assumed-role/{name}/{NS}.app-{pod}")
}

/// One SDK against the running agent: two pods with different roles at once, then the roleless
/// pod.
async fn sdk_gets_its_own_pods_role(b: &Bed, sdk: Sdk, argv: &[String]) {
    let name = sdk.name();
    let log = || b.agent_log();
    let tokens_before = b.served("token", "200");
    let (r, w) = tokio::join!(b.client(0, sdk, argv), b.client(1, sdk, argv));
    assert_eq!(r["ok"], true, "{name} pod 0: {r}\nagent log:\n{}", log());
    assert_eq!(r["arn"], assumed(READER, 0), "{name} pod 0: {r}");
    assert_eq!(w["ok"], true, "{name} pod 1: {w}\nagent log:\n{}", log());
    assert_eq!(w["arn"], assumed(WRITER, 1), "{name} pod 1: {w}");
    let (version, provider) = sdk.expect();
    for v in [&r, &w] {
        assert!(
            v["sdk"].as_str().is_some_and(|s| s.starts_with(version)),
            "{name} is {version}: {v}"
        );
        assert_eq!(
            v["method"], provider,
            "{name} got them from instance metadata: {v}"
        );
        assert_eq!(v["access_key_prefix"], "ASIA", "temporary credentials: {v}");
        eprintln!("{name}: {v}");
    }

    // The pod without a role: the agent tells its SDK there is no role (404 on the role list),
    // and the SDK's chain ends with no credentials at all.
    let no_role_before = b.served("role_list", "404");
    let none = b.client(2, sdk, argv).await;
    assert_eq!(none["ok"], false, "{name} pod 2: {none}");
    assert!(
        !sdk.says_no_credentials()
            || none["error"]
                .as_str()
                .is_some_and(|e| e.starts_with("no credentials")),
        "{name} pod 2 fails in its credential chain, not later: {none}"
    );
    assert!(
        b.served("role_list", "404") > no_role_before,
        "{name} pod 2 asked the agent and was told it has no role\n{}",
        log()
    );

    // IMDSv1 from the old SDKs; IMDSv2 session tokens from the current ones (which were
    // forbidden to fall back to IMDSv1).
    let tokens = b.served("token", "200") - tokens_before;
    if sdk.imds_v2() {
        assert!(tokens >= 2, "{name}: {tokens} IMDSv2 tokens issued");
    } else {
        assert_eq!(tokens, 0, "{name} knows nothing of IMDSv2 tokens");
    }
}

#[tokio::test]
async fn old_and_current_sdks_get_their_own_pods_role_through_the_redirect_and_a_real_apiserver() {
    let sdks: Vec<(Sdk, Vec<String>)> = [
        Sdk::JavaLegacy,
        Sdk::GoLegacy,
        Sdk::GoCurrent,
        Sdk::JavaCurrent,
        Sdk::BotoLegacy,
        Sdk::JsLegacy,
        Sdk::BotoCurrent,
    ]
    .into_iter()
    .filter_map(|sdk| Some((sdk, sdk.argv_or_skip()?)))
    .collect();
    if sdks.is_empty() {
        return;
    }
    let started = std::time::Instant::now();
    let Some(b) = bed().await else { return };
    let mut agent = b.start_agent();
    b.wait_ready().await;
    eprintln!(
        "bed and agent ready in {} ms",
        started.elapsed().as_millis()
    );
    let log = || b.agent_log();

    for (sdk, argv) in &sdks {
        sdk_gets_its_own_pods_role(&b, *sdk, argv).await;
    }

    // Every credential came from a real token of the pod's own ServiceAccount that STS verified
    // against the apiserver's keys and the role's trust policy; nothing was refused.
    let calls = b.sts.calls();
    for (role, sa) in [(READER, "reader"), (WRITER, "writer")] {
        let mine: Vec<_> = calls.iter().filter(|c| c.role_arn == role).collect();
        assert!(!mine.is_empty(), "no STS call for {role}");
        for c in mine {
            assert_eq!(c.error, None, "STS refused the agent's token for {role}");
            let (_, claims) = testbed::jwt::decode_unverified(&c.web_identity_token).unwrap();
            assert_eq!(claims["sub"], format!("system:serviceaccount:{NS}:{sa}"));
            assert_eq!(claims["iss"], b.cp.issuer);
            let bound = &claims["kubernetes.io"]["pod"]["name"];
            assert!(
                bound.as_str().is_some_and(|p| p.starts_with("app-")),
                "bound to its pod: {bound}"
            );
        }
    }
    // The agent did all of it under the shipped ClusterRole: every request it made as its
    // ServiceAccount was allowed.
    let agent_user = format!("system:serviceaccount:{AGENT_NS}:{AGENT_SA}");
    let audit: Vec<Value> =
        b.cp.audit_events()
            .into_iter()
            .filter(|e| e["user"]["username"] == agent_user.as_str())
            .collect();
    assert!(
        audit.iter().any(|e| e["verb"] == "watch"),
        "no watch audited"
    );
    for e in &audit {
        let code = e["responseStatus"]["code"].as_i64().unwrap_or(0);
        assert!(code < 400, "agent request refused: {e}");
    }

    // The node's role: never asked for upstream, never handed out.
    let upstream = b.upstream.requests();
    assert!(
        upstream.iter().all(|(_, p)| !p.contains("/iam/")),
        "{upstream:?}"
    );
    assert!(!log().contains(NODE_ROLE_KEY_ID));
    assert!(log().contains("credentials vended"), "{}", log());

    let status = testbed::util::sigterm(&mut agent, Duration::from_secs(20))
        .await
        .unwrap();
    assert!(
        status.success(),
        "clean exit after SIGTERM: {status}\n{}",
        log()
    );
    eprintln!("e2e_sdks: {} ms in all", started.elapsed().as_millis());
}
