//! The network path, end to end: unmodified SDKs that hard-code 169.254.169.254, in pod network
//! namespaces, reach the real agent binary through a real iptables DNAT in a node namespace, and
//! each gets its own pod's role from STS (moto): the redirect rule's life cycle, IPv6, agent
//! restarts, host-interface patterns, iptables backends, the CNI hook. The Kubernetes API here is
//! the emulated one (these tests inject faults and restarts around it); the same clients against
//! a real kube-apiserver run in `e2e_sdks.rs`.
//! Everything runs inside namespaces these tests create and remove (root required).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use testbed::fake_imds::FakeImds;
use testbed::harness::{NODE, wait_for};
use testbed::kube_api::{KubeApi, pod};
use testbed::moto::Moto;
use testbed::netns::Topology;

const ANN: &str = "eks.amazonaws.com/role-arn";
const READER: &str = "arn:aws:iam::123456789012:role/legacy-reader";
const WRITER: &str = "arn:aws:iam::123456789012:role/legacy-writer";
const AGENT_PORT: u16 = 8181;
const OPS_PORT: u16 = 8182;

struct Bed {
    topo: Topology,
    kube: KubeApi,
    upstream: FakeImds,
    moto: Moto,
    dir: testbed::util::TempDir,
}

/// Pods: 0 = reader role, 1 = writer role, 2 = no role, 3.. = reader role.
async fn bed(pods: usize, tag: &str) -> Bed {
    testbed::netns::require_root().expect("root");
    let topo = Topology::new(pods).unwrap();
    let kube = KubeApi::start_on(topo.bind_in_node("127.0.0.1:0".parse().unwrap()).unwrap())
        .await
        .unwrap();
    let upstream = FakeImds::start_in_node(&topo).await.unwrap();
    let moto = Moto::start_in_netns(topo.node_ns()).await.unwrap();
    kube.apply_service_account("legacy", "reader", &[(ANN, READER)]);
    kube.apply_service_account("legacy", "writer", &[(ANN, WRITER)]);
    kube.apply_service_account("legacy", "plain", &[]);
    for i in 0..pods {
        let sa = match i {
            1 => "writer",
            2 => "plain",
            _ => "reader",
        };
        let ip = topo.pod_ip(i).to_string();
        kube.create_pod(pod("legacy", &format!("app-{i}"), NODE, sa, &[&ip]));
    }
    let dir = testbed::util::TempDir::new(&format!("e2e-{tag}")).unwrap();
    std::fs::create_dir_all(dir.path().join("home")).unwrap();
    kube.write_kubeconfig(&dir.path().join("kubeconfig"))
        .unwrap();
    Bed {
        topo,
        kube,
        upstream,
        moto,
        dir,
    }
}

impl Bed {
    fn start_agent(&self) -> tokio::process::Child {
        let host_mode = [
            "--iptables",
            "--host-interface",
            "vethirsa+",
            "--host-ip",
            "10.77.255.1",
            "--iptables-resync",
            "1s",
        ];
        self.start_agent_with(&host_mode)
    }

    fn start_agent_with(&self, args: &[&str]) -> tokio::process::Child {
        let bin = testbed::util::agent_bin();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.0.join("agent.log"))
            .unwrap();
        self.topo
            .exec_in(self.topo.node_ns(), bin.to_str().unwrap())
            .args(["--node-name", NODE])
            // The caller's --listen (e.g. dual stack) replaces the default.
            .args(if args.contains(&"--listen") {
                vec![]
            } else {
                vec!["--listen".to_string(), format!("0.0.0.0:{AGENT_PORT}")]
            })
            .args([
                "--ops-listen",
                &format!("127.0.0.1:{OPS_PORT}"),
                "--upstream-imds",
                &self.upstream.url(),
            ])
            .args([
                "--kubeconfig",
                self.dir.0.join("kubeconfig").to_str().unwrap(),
            ])
            .args(if args.contains(&"--log-format") {
                vec![]
            } else {
                vec!["--log-format", "text"]
            })
            .args(args)
            .env("AWS_REGION", "us-east-1")
            .env(
                "AWS_ENDPOINT_URL_STS",
                format!("http://127.0.0.1:{}", self.moto.port()),
            )
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    /// GET on the agent's ops port, from inside the node namespace.
    fn ops_status(&self, path: &str) -> Option<u16> {
        let addr: SocketAddr = format!("127.0.0.1:{OPS_PORT}").parse().ok()?;
        let mut s = self.topo.connect_in(self.topo.node_ns(), addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: agent\r\n\r\n").as_bytes())
            .ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).ok()?;
        buf.split_whitespace().nth(1)?.parse().ok()
    }

    /// The body of a GET on the agent's ops port, from inside the node namespace.
    fn ops_body(&self, path: &str) -> Option<String> {
        let addr: SocketAddr = format!("127.0.0.1:{OPS_PORT}").parse().ok()?;
        let mut s = self.topo.connect_in(self.topo.node_ns(), addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: agent\r\n\r\n").as_bytes())
            .ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).ok()?;
        Some(buf.split("\r\n\r\n").nth(1)?.to_string())
    }

    async fn wait_ready(&self) {
        wait_for(Duration::from_secs(30), || async {
            self.ops_status("/readyz") == Some(200)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}; agent log:\n{}", self.agent_log()));
    }

    fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("agent.log")).unwrap_or_default()
    }

    /// Runs a client script in pod `i` with a clean environment: no AWS settings, an empty home,
    /// no endpoint override for IMDS. Returns its JSON line.
    async fn client(&self, i: usize, kind: &str) -> Value {
        self.client_with(i, kind, &[]).await
    }

    async fn client_with(&self, i: usize, kind: &str, env: &[(&str, &str)]) -> Value {
        let deps = testbed::deps::deps_dir();
        let scripts = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("clients");
        let sts = format!("http://{}:{}", self.topo.node_ip(), self.moto.port());
        let (program, script, extra): (PathBuf, &str, Vec<(&str, String)>) = match kind {
            "legacy-boto" => (testbed::deps::legacy_python(), "boto_client.py", vec![]),
            "current-boto" => (
                testbed::deps::moto_python(),
                "boto_client.py",
                vec![("AWS_EC2_METADATA_V1_DISABLED", "true".into())],
            ),
            "legacy-js" => (
                PathBuf::from("node"),
                "legacy_js.js",
                vec![(
                    "NODE_PATH",
                    testbed::deps::node_path().display().to_string(),
                )],
            ),
            other => panic!("unknown client {other}"),
        };
        if kind != "legacy-js" {
            testbed::deps::require(&program).unwrap();
        }
        let _ = deps;
        let mut cmd = self.topo.exec_in(self.topo.pod_ns(i), "env");
        cmd.arg("-i")
            .arg("PATH=/usr/local/bin:/usr/bin:/bin")
            .arg(format!("HOME={}", self.dir.0.join("home").display()))
            .arg("AWS_CONFIG_FILE=/nonexistent/config")
            .arg("AWS_SHARED_CREDENTIALS_FILE=/nonexistent/credentials");
        for (k, v) in &extra {
            cmd.arg(format!("{k}={v}"));
        }
        for (k, v) in env {
            cmd.arg(format!("{k}={v}"));
        }
        cmd.arg(&program).arg(scripts.join(script)).arg(&sts);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let out = tokio::time::timeout(Duration::from_secs(90), cmd.output())
            .await
            .expect("client timed out")
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .unwrap_or_else(|| {
                panic!(
                    "{kind} in pod {i} printed no result; stderr: {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            });
        serde_json::from_str(line).unwrap()
    }
}

fn assumed(role: &str, pod: usize) -> String {
    let name = role.rsplit('/').next().unwrap();
    format!("arn:aws:sts::123456789012:assumed-role/{name}/legacy.app-{pod}")
}

/// docs/install.md, "Verify with an old SDK": the guide's `aws sts get-caller-identity` from the
/// AWS CLI 1.16.209 it names, run in a pod, gets the pod's own role; the agent's audit line for it
/// is the JSON line the guide shows (every field, no secret).
#[tokio::test]
async fn install_guide_verify_step_with_awscli_116_and_its_audit_line() {
    let guide = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/install.md"),
    )
    .unwrap();
    assert!(
        guide.contains("pip install -q awscli==1.16.209"),
        "the guide installs the CLI this test runs"
    );
    // The guide's own command line, pointed at the test bed's STS.
    let line = guide
        .lines()
        .find(|l| l.contains("aws sts get-caller-identity"))
        .unwrap();
    let cmd = &line[line.find("aws sts get-caller-identity").unwrap()..];
    let cmd = cmd.trim_end_matches(['\'', ' ', '\\']);
    let args: Vec<&str> = cmd.split_whitespace().skip(1).collect();
    assert_eq!(args[..2], ["sts", "get-caller-identity"], "{cmd}");

    let aws = testbed::deps::require(&testbed::deps::awscli_116()).unwrap();
    let b = bed(3, "awscli").await;
    let mut agent = b.start_agent_with(&[
        "--iptables",
        "--host-interface",
        "vethirsa+",
        "--host-ip",
        "10.77.255.1",
        "--log-format",
        "json",
    ]);
    b.wait_ready().await;

    let sts = format!("http://{}:{}", b.topo.node_ip(), b.moto.port());
    let mut run = b.topo.exec_in(b.topo.pod_ns(0), "env");
    run.arg("-i")
        .arg("PATH=/usr/local/bin:/usr/bin:/bin")
        .arg(format!("HOME={}", b.dir.0.join("home").display()))
        .arg("AWS_CONFIG_FILE=/nonexistent/config")
        .arg("AWS_SHARED_CREDENTIALS_FILE=/nonexistent/credentials")
        .arg(&aws)
        .args(&args[..])
        .args(["--endpoint-url", &sts, "--output", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = tokio::time::timeout(Duration::from_secs(90), run.output())
        .await
        .expect("aws timed out")
        .unwrap();
    assert!(
        out.status.success(),
        "aws: {}\nagent log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        b.agent_log()
    );
    let who: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(who["Arn"], assumed(READER, 0), "{who}");
    assert_eq!(who["Account"], "123456789012");

    let log = b.agent_log();
    for l in log.lines() {
        let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert_eq!(v["node"], NODE, "every line names the node: {l}");
    }
    let audit: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "audit")
        .collect();
    assert_eq!(audit.len(), 1, "one audit line per credential set:\n{log}");
    let a = &audit[0];
    assert_eq!(a["message"], "credentials vended");
    assert_eq!(a["pod"], "app-0");
    assert_eq!(a["namespace"], "legacy");
    assert_eq!(a["service_account"], "reader");
    assert_eq!(a["role"], READER);
    assert_eq!(a["source_ip"], b.topo.pod_ip(0).to_string());
    assert!(
        a["access_key_id"].as_str().unwrap().starts_with("ASIA"),
        "{a}"
    );
    let exp = a["expiration"].as_str().unwrap();
    assert!(exp.len() == 20 && exp.ends_with('Z'), "{exp}");
    // The guide shows exactly these keys (its example line parses and names the same fields).
    let shown = guide
        .lines()
        .find(|l| l.starts_with('{') && l.contains("\"target\":\"audit\""))
        .unwrap();
    let shown: Value = serde_json::from_str(shown).unwrap();
    let keys = |v: &Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(
        keys(&shown),
        keys(a),
        "the guide's audit line has the real fields"
    );
    for secret in ["SecretAccessKey", "secret_access_key", "session_token"] {
        assert!(!log.contains(secret), "{secret} in the agent log");
    }

    let status = testbed::util::sigterm(&mut agent, Duration::from_secs(20))
        .await
        .unwrap();
    assert!(status.success(), "{status}");
}

/// `iptables -t nat <args>` in the node namespace (someone tampering with the agent's rule).
fn node_nat(b: &Bed, args: &[&str]) {
    let mut v = vec![
        "ip",
        "netns",
        "exec",
        b.topo.node_ns(),
        "iptables",
        "-w",
        "5",
        "-t",
        "nat",
    ];
    v.extend_from_slice(args);
    testbed::netns::sh(&v).unwrap();
}

fn count(rules: &str, needle: &str) -> usize {
    rules.lines().filter(|l| l.contains(needle)).count()
}

#[tokio::test]
async fn redirect_rule_life_cycle_fails_closed() {
    let b = bed(1, "rule").await;
    let jump = "-A PREROUTING -j IRSA-IMDS";
    let dnat = "-A IRSA-IMDS -d 169.254.169.254/32 -i vethirsa+";

    // Start, then crash (SIGKILL), then start again: one rule, one jump.
    let mut first = b.start_agent();
    b.wait_ready().await;
    first.kill().await.unwrap();
    let rules = b.topo.node_nat_rules().unwrap();
    assert_eq!(
        (count(&rules, jump), count(&rules, dnat)),
        (1, 1),
        "rule stays after SIGKILL:\n{rules}"
    );
    // Fail closed: with the rule in place and no agent, a pod's connection is refused.
    let refused = b.client(0, "legacy-boto").await;
    assert_eq!(refused["ok"], false, "no agent, no credentials: {refused}");
    let probe = b
        .topo
        .exec_in(b.topo.pod_ns(0), "bash")
        .args(["-c", "exec 3<>/dev/tcp/169.254.169.254/80"])
        .output()
        .await
        .unwrap();
    assert!(!probe.status.success());
    assert!(
        String::from_utf8_lossy(&probe.stderr).contains("refused"),
        "{}",
        String::from_utf8_lossy(&probe.stderr)
    );

    let mut agent = b.start_agent();
    b.wait_ready().await;
    let rules = b.topo.node_nat_rules().unwrap();
    assert_eq!(
        (count(&rules, jump), count(&rules, dnat)),
        (1, 1),
        "installed once after a restart:\n{rules}"
    );
    let ok = b.client(0, "legacy-boto").await;
    assert_eq!(ok["arn"], assumed(READER, 0));

    // Someone deletes the rule, then the jump: the agent restores them.
    node_nat(&b, &["-F", "IRSA-IMDS"]);
    wait_for(Duration::from_secs(15), || async {
        count(&b.topo.node_nat_rules().unwrap(), dnat) == 1
    })
    .await
    .unwrap();
    node_nat(&b, &["-D", "PREROUTING", "-j", "IRSA-IMDS"]);
    wait_for(Duration::from_secs(15), || async {
        count(&b.topo.node_nat_rules().unwrap(), jump) == 1
    })
    .await
    .unwrap();
    // Altered (pointing elsewhere): rewritten.
    node_nat(
        &b,
        &[
            "-R",
            "IRSA-IMDS",
            "1",
            "-d",
            "169.254.169.254/32",
            "-p",
            "tcp",
            "--dport",
            "80",
            "-j",
            "DNAT",
            "--to-destination",
            "10.77.255.1:9999",
        ],
    );
    wait_for(Duration::from_secs(15), || async {
        let r = b.topo.node_nat_rules().unwrap();
        count(&r, dnat) == 1 && !r.contains(":9999")
    })
    .await
    .unwrap();
    let after = b.client(0, "legacy-boto").await;
    assert_eq!(
        after["arn"],
        assumed(READER, 0),
        "works again after the repair: {after}"
    );

    // SIGTERM (a rolling update, a restart): exit 0, and the rule and the jump stay, so pods
    // are refused until the next agent is up, never sent to the real IMDS.
    let status = testbed::util::sigterm(&mut agent, Duration::from_secs(20))
        .await
        .unwrap();
    assert!(status.success(), "{status}\n{}", b.agent_log());
    let rules = b.topo.node_nat_rules().unwrap();
    assert_eq!(
        (count(&rules, jump), count(&rules, dnat)),
        (1, 1),
        "kept on SIGTERM:\n{rules}"
    );
    // Only the documented uninstall removes them.
    uninstall_agent(&b);
    let rules = b.topo.node_nat_rules().unwrap();
    assert_eq!(
        count(&rules, "IRSA-IMDS"),
        0,
        "removed by uninstall:\n{rules}"
    );
}

/// `irsa-imds-agent uninstall` in the node namespace.
fn uninstall_agent(b: &Bed) {
    let bin = testbed::util::agent_bin();
    let out = testbed::netns::sh(&[
        "ip",
        "netns",
        "exec",
        b.topo.node_ns(),
        bin.to_str().unwrap(),
        "uninstall",
    ]);
    out.unwrap();
}

fn cni_bin() -> PathBuf {
    testbed::util::workspace_bin("irsa-imds-cni").unwrap()
}

/// What the agent answers pod `i` for `path`, asked directly at the agent's address (no DNAT).
async fn direct_status(b: &Bed, i: usize, path: &str) -> String {
    let script = format!(
        "exec 3<>/dev/tcp/{}/{AGENT_PORT} && printf 'GET {path} HTTP/1.0\\r\\nHost: 169.254.169.254\\r\\n\\r\\n' >&3 && head -1 <&3",
        b.topo.node_ip()
    );
    let out = b
        .topo
        .exec_in(b.topo.pod_ns(i), "bash")
        .args(["-c", &script])
        .output()
        .await
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Per-pod mode: no host rule at all; the CNI hook's ADD installs the DNAT inside the pod's own
/// namespace and registers the pod, and the old SDK gets its role through that. The pod has no IP
/// in the API (its sandbox is just being created), so only the registration can identify it; after
/// the DEL, the agent answers the address nothing.
#[tokio::test]
async fn cni_hook_per_pod_redirect_and_registration_end_to_end() {
    let b = bed(1, "podmode").await;
    b.kube.update_pod("legacy", "app-0", |p| {
        let st = p.status.as_mut().unwrap();
        st.phase = Some("Pending".into());
        st.pod_ip = None;
        st.pod_ips = None;
    });
    let sock = b.dir.0.join("cni.sock");
    let mut agent = b.start_agent_with(&["--cni-socket", sock.to_str().unwrap()]);
    b.wait_ready().await;
    assert_eq!(
        count(&b.topo.node_nat_rules().unwrap(), "IRSA-IMDS"),
        0,
        "no host rule in per-pod mode"
    );

    let netns = format!("/var/run/netns/{}", b.topo.pod_ns(0));
    let ip = b.topo.pod_ip(0).to_string();
    let conf = serde_json::json!({
        "cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "irsa-imds-cni",
        "agentSocket": sock, "podRedirect": true, "agentAddress": format!("{}:{AGENT_PORT}", b.topo.node_ip()),
        "failClosed": true,
        "prevResult": {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": netns}],
                       "ips": [{"interface": 0, "address": format!("{ip}/32")}], "dns": {}}
    });
    let cni = |command: &'static str| {
        let conf = conf.to_string();
        let netns = netns.clone();
        async move {
            let mut child = tokio::process::Command::new(cni_bin())
                .env_clear()
                .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
                .env("CNI_COMMAND", command)
                .env("CNI_CONTAINERID", "e2esandbox0")
                .env("CNI_NETNS", &netns)
                .env("CNI_IFNAME", "eth0")
                .env("CNI_PATH", "/opt/cni/bin")
                .env("CNI_ARGS", "K8S_POD_NAMESPACE=legacy;K8S_POD_NAME=app-0")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            use tokio::io::AsyncWriteExt;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(conf.as_bytes())
                .await
                .unwrap();
            child.wait_with_output().await.unwrap()
        }
    };
    // The pod namespace's nat OUTPUT chain, where the plugin puts the redirect.
    let pod_nat_output = || {
        testbed::netns::sh(&[
            "ip",
            "netns",
            "exec",
            b.topo.pod_ns(0),
            "iptables",
            "-t",
            "nat",
            "-S",
            "OUTPUT",
        ])
        .unwrap()
    };
    let out = cni("ADD").await;
    assert!(
        out.status.success(),
        "ADD: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let pod_rules = pod_nat_output();
    assert_eq!(count(&pod_rules, "169.254.169.254"), 1, "{pod_rules}");
    // A second ADD (runtime retry) does not stack rules.
    assert!(cni("ADD").await.status.success());
    let pod_rules = pod_nat_output();
    assert_eq!(count(&pod_rules, "169.254.169.254"), 1, "{pod_rules}");

    let r = b.client(0, "legacy-boto").await;
    assert_eq!(r["arn"], assumed(READER, 0), "{r}\n{}", b.agent_log());
    let creds = "/latest/meta-data/iam/security-credentials/";
    assert!(
        direct_status(&b, 0, creds).await.contains(" 200 "),
        "registered: the agent names the pod"
    );
    assert!(cni("DEL").await.status.success());
    let after = direct_status(&b, 0, creds).await;
    assert!(after.contains(" 404 "), "after DEL: {after:?}");
    let pod_rules = pod_nat_output();
    let r = b.client(0, "legacy-boto").await;
    assert_eq!(r["ok"], false, "after DEL: {r}; pod rules: {pod_rules}");

    let status = testbed::util::sigterm(&mut agent, Duration::from_secs(20))
        .await
        .unwrap();
    assert!(status.success());
    assert!(!sock.exists(), "socket removed on shutdown");
}

/// IPv6: `[fd00:ec2::254]:80` is redirected by ip6tables (`--host-ipv6`), the pod is identified
/// by its IPv6 address, and current boto3 in IPv6 endpoint mode gets the pod's role.
#[tokio::test]
async fn ipv6_pod_gets_its_role_through_the_ip6tables_redirect() {
    let b = bed(1, "v6").await;
    let v4 = b.topo.pod_ip(0).to_string();
    let v6 = b.topo.pod_ip6(0).to_string();
    // Dual-stack pod: the API lists both addresses.
    b.kube.delete_pod("legacy", "app-0");
    b.kube
        .create_pod(pod("legacy", "app-0", NODE, "reader", &[&v4, &v6]));
    let pattern = b.topo.host_interface_pattern();
    let (ip4, ip6) = (b.topo.node_ip().to_string(), b.topo.node_ip6().to_string());
    let mut agent = b.start_agent_with(&[
        "--listen",
        &format!("[::]:{AGENT_PORT}"),
        "--iptables",
        "--host-interface",
        &pattern,
        "--host-ip",
        &ip4,
        "--host-ipv6",
        &ip6,
    ]);
    b.wait_ready().await;
    let rules6 = testbed::netns::sh(&[
        "ip",
        "netns",
        "exec",
        b.topo.node_ns(),
        "ip6tables",
        "-t",
        "nat",
        "-S",
    ])
    .unwrap();
    assert_eq!(
        count(&rules6, "-A IRSA-IMDS -d fd00:ec2::254/128"),
        1,
        "{rules6}"
    );
    let r = b
        .client_with(
            0,
            "current-boto",
            &[("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE", "IPv6")],
        )
        .await;
    assert_eq!(r["ok"], true, "{r}\n{}", b.agent_log());
    assert_eq!(r["arn"], assumed(READER, 0));
    assert!(
        b.agent_log().contains(&format!("source_ip={v6}")),
        "identified by its IPv6 address:\n{}",
        b.agent_log()
    );
    // Old SDKs on the same pod still come in over IPv4.
    assert_eq!(b.client(0, "legacy-boto").await["arn"], assumed(READER, 0));
    let status = testbed::util::sigterm(&mut agent, Duration::from_secs(20))
        .await
        .unwrap();
    assert!(status.success());
    let rules6 = testbed::netns::sh(&[
        "ip",
        "netns",
        "exec",
        b.topo.node_ns(),
        "ip6tables",
        "-t",
        "nat",
        "-S",
    ])
    .unwrap();
    assert_eq!(
        count(&rules6, "-A IRSA-IMDS -d fd00:ec2::254/128"),
        1,
        "kept on SIGTERM:\n{rules6}"
    );
}

/// `cmd` run in the node namespace; its stdout.
fn in_node(b: &Bed, cmd: &[&str]) -> String {
    let mut v = vec!["ip", "netns", "exec", b.topo.node_ns()];
    v.extend_from_slice(cmd);
    testbed::netns::sh(&v).unwrap()
}

/// A stand-in for the real IMDS where the node reaches it: `169.254.169.254:80` and
/// `[fd00:ec2::254]:80` owned by the node namespace, serving the node's role. A pod that gets
/// past the redirect reaches this, and a test sees `node-role`.
async fn real_imds_in_node(b: &Bed) -> (FakeImds, FakeImds) {
    in_node(b, &["ip", "addr", "add", "169.254.169.254/32", "dev", "lo"]);
    in_node(
        b,
        &[
            "ip",
            "addr",
            "add",
            "fd00:ec2::254/128",
            "dev",
            "lo",
            "nodad",
        ],
    );
    let v4 = FakeImds::start_on(
        b.topo
            .bind_in_node("169.254.169.254:80".parse().unwrap())
            .unwrap(),
    )
    .await
    .unwrap();
    let v6 = FakeImds::start_on(
        b.topo
            .bind_in_node("[fd00:ec2::254]:80".parse().unwrap())
            .unwrap(),
    )
    .await
    .unwrap();
    (v4, v6)
}

#[derive(Debug, Clone, PartialEq)]
enum Answer {
    /// The role name the metadata service listed.
    Role(String),
    Refused,
    /// Accepted, then closed without an answer (an agent going away mid-request).
    Closed,
}

/// One IMDSv1 listing of the credential roles, from inside pod `i`.
fn pod_role_listing(pod_ns: &str, imds: SocketAddr) -> Answer {
    let mut s = match testbed::netns::connect_in(pod_ns, imds) {
        Ok(s) => s,
        Err(e) => {
            let kind = e.downcast_ref::<std::io::Error>().map(std::io::Error::kind);
            // A reset while connecting is the agent's listener going away under the SYN: the pod
            // still gets nothing, the same fail-closed outcome as a close mid-request.
            if kind == Some(std::io::ErrorKind::ConnectionReset) {
                return Answer::Closed;
            }
            assert!(
                kind == Some(std::io::ErrorKind::ConnectionRefused),
                "{pod_ns} -> {imds}: {e:#}"
            );
            return Answer::Refused;
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let req =
        "GET /latest/meta-data/iam/security-credentials/ HTTP/1.0\r\nHost: 169.254.169.254\r\n\r\n";
    if s.write_all(req.as_bytes()).is_err() {
        return Answer::Closed;
    }
    let mut buf = String::new();
    if s.read_to_string(&mut buf).is_err() || buf.is_empty() {
        return Answer::Closed;
    }
    let body = buf
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or("")
        .trim()
        .to_string();
    Answer::Role(body)
}

/// [`pod_role_listing`] off the runtime's thread, so the in-process servers keep serving.
async fn pod_listing(pod_ns: &str, imds: SocketAddr) -> Answer {
    let ns = pod_ns.to_string();
    tokio::task::spawn_blocking(move || pod_role_listing(&ns, imds))
        .await
        .unwrap()
}

const IMDS4: &str = "169.254.169.254:80";
const IMDS6: &str = "[fd00:ec2::254]:80";

/// The kiam #202 incident: during a rolling update the agent is stopped and started again. A pod
/// calling all the while gets its own role or a refused connection, never the node's role.
#[tokio::test]
async fn agent_restart_never_exposes_the_node_role() {
    let b = bed(1, "restart").await;
    let (real4, real6) = real_imds_in_node(&b).await;
    let imds: SocketAddr = IMDS4.parse().unwrap();
    // Control: with no rule the pod reaches the node's IMDS, so the test can see a leak.
    assert_eq!(
        pod_listing(b.topo.pod_ns(0), imds).await,
        Answer::Role("node-role".into())
    );
    let mut agent = b.start_agent();
    b.wait_ready().await;
    assert_eq!(
        pod_listing(b.topo.pod_ns(0), imds).await,
        Answer::Role("legacy-reader".into())
    );

    let answers = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Answer>::new()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let caller = {
        let (answers, stop) = (answers.clone(), stop.clone());
        let pod = b.topo.pod_ns(0).to_string();
        std::thread::spawn(move || {
            // Bounded: at most 20 000 calls, paced so the loop never spins.
            for _ in 0..20_000 {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                let a = pod_role_listing(&pod, imds);
                answers.lock().unwrap().push(a);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let leak = |a: &Answer| matches!(a, Answer::Role(r) if r != "legacy-reader");
    let seen =
        |pred: &dyn Fn(&Answer) -> bool| answers.lock().unwrap().iter().filter(|a| pred(a)).count();

    for round in 0..2 {
        let status = testbed::util::sigterm(&mut agent, Duration::from_secs(20))
            .await
            .unwrap();
        assert!(status.success(), "round {round}: {status}");
        let refused_before = seen(&|a| *a == Answer::Refused);
        // The pod keeps calling while no agent runs.
        wait_for(Duration::from_secs(20), || async {
            seen(&|a| *a == Answer::Refused) >= refused_before + 20 || seen(&leak) > 0
        })
        .await
        .unwrap();
        assert_eq!(
            seen(&leak),
            0,
            "round {round}: the node's role leaked while no agent ran"
        );
        agent = b.start_agent();
        b.wait_ready().await;
        let served_before = seen(&|a| *a == Answer::Role("legacy-reader".into()));
        wait_for(Duration::from_secs(20), || async {
            seen(&|a| *a == Answer::Role("legacy-reader".into())) >= served_before + 20
        })
        .await
        .unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    caller.join().unwrap();

    let all = answers.lock().unwrap().clone();
    let leaked: Vec<&Answer> = all
        .iter()
        .filter(|a| matches!(a, Answer::Role(r) if r != "legacy-reader"))
        .collect();
    assert!(
        leaked.is_empty(),
        "{} of {} answers were not the pod's role: {:?}",
        leaked.len(),
        all.len(),
        &leaked[..leaked.len().min(5)]
    );
    assert_eq!(
        real4.requests().len(),
        1,
        "only the control call reached the node's IMDS: {:?}",
        real4.requests()
    );
    assert!(real6.requests().is_empty());
    let status = testbed::util::sigterm(&mut agent, Duration::from_secs(20))
        .await
        .unwrap();
    assert!(status.success());
}

/// A dual-stack pod on an instance with the IPv6 IMDS endpoint, host mode without `--host-ipv6`:
/// `[fd00:ec2::254]:80` is refused, never answered by the real IMDS; IPv4 still gets the role.
#[tokio::test]
async fn ipv6_imds_is_refused_without_host_ipv6() {
    let b = bed(1, "v6refuse").await;
    let (_real4, real6) = real_imds_in_node(&b).await;
    let (v4, v6): (SocketAddr, SocketAddr) = (IMDS4.parse().unwrap(), IMDS6.parse().unwrap());
    // Control: with no rule the pod reaches the node's IPv6 IMDS.
    assert_eq!(
        pod_listing(b.topo.pod_ns(0), v6).await,
        Answer::Role("node-role".into())
    );
    let mut agent = b.start_agent();
    b.wait_ready().await;
    assert_eq!(pod_listing(b.topo.pod_ns(0), v6).await, Answer::Refused);
    assert_eq!(
        pod_listing(b.topo.pod_ns(0), v4).await,
        Answer::Role("legacy-reader".into())
    );
    assert_eq!(real6.requests().len(), 1, "only the control call");
    let status = testbed::util::sigterm(&mut agent, Duration::from_secs(20))
        .await
        .unwrap();
    assert!(status.success());
    // Still refused with the agent gone.
    assert_eq!(pod_listing(b.topo.pod_ns(0), v6).await, Answer::Refused);
}

/// Security groups for pods put branch-ENI pods on `vlan*` interfaces: with `eni+,vlan+`-style
/// patterns each pattern gets its rule, and a pod behind a `vlan` interface gets its role.
#[tokio::test]
async fn every_host_interface_pattern_gets_its_rule() {
    let b = bed(2, "vlan").await;
    let (real4, _real6) = real_imds_in_node(&b).await;
    // Pod 1's host side becomes `vlan7` (a veth named like a branch-ENI vlan link: this kernel
    // has no vlan parent to hang a real one on).
    in_node(&b, &["ip", "link", "set", "vethirsa1", "down"]);
    in_node(&b, &["ip", "link", "set", "vethirsa1", "name", "vlan7"]);
    in_node(&b, &["ip", "link", "set", "vlan7", "up"]);
    // Taking the link down dropped its routes.
    let pod1 = format!("{}/32", b.topo.pod_ip(1));
    in_node(&b, &["ip", "route", "replace", &pod1, "dev", "vlan7"]);
    let imds: SocketAddr = IMDS4.parse().unwrap();
    assert_eq!(
        pod_listing(b.topo.pod_ns(1), imds).await,
        Answer::Role("node-role".into()),
        "control: reachable without a rule"
    );
    let mut agent = b.start_agent_with(&[
        "--iptables",
        "--host-interface",
        "vethirsa+,vlan+",
        "--host-ip",
        "10.77.255.1",
    ]);
    b.wait_ready().await;
    let rules = b.topo.node_nat_rules().unwrap();
    assert_eq!(
        count(&rules, "-A IRSA-IMDS -d 169.254.169.254/32 -i vethirsa+"),
        1,
        "{rules}"
    );
    assert_eq!(
        count(&rules, "-A IRSA-IMDS -d 169.254.169.254/32 -i vlan+"),
        1,
        "{rules}"
    );
    assert_eq!(
        pod_listing(b.topo.pod_ns(1), imds).await,
        Answer::Role("legacy-writer".into())
    );
    let r = b.client(1, "legacy-boto").await;
    assert_eq!(r["arn"], assumed(WRITER, 1), "{r}");
    assert_eq!(
        pod_listing(b.topo.pod_ns(0), imds).await,
        Answer::Role("legacy-reader".into())
    );
    assert_eq!(real4.requests().len(), 1, "only the control call");
    let status = testbed::util::sigterm(&mut agent, Duration::from_secs(20))
        .await
        .unwrap();
    assert!(status.success());
}

/// The agent puts its rules into the backend the node already uses (kube-proxy's hint chain, or
/// more rules), the rule takes effect there, and uninstall finds it whichever backend it is in.
#[tokio::test]
async fn agent_follows_the_nodes_iptables_backend() {
    for (node_uses, other) in [("legacy", "nft"), ("nft", "legacy")] {
        let b = bed(1, &format!("backend-{node_uses}")).await;
        // What kube-proxy leaves on a node of that backend.
        let ipt = format!("iptables-{node_uses}");
        in_node(
            &b,
            &[&ipt, "-w", "5", "-t", "mangle", "-N", "KUBE-IPTABLES-HINT"],
        );
        in_node(
            &b,
            &[&ipt, "-w", "5", "-t", "filter", "-N", "KUBE-FIREWALL"],
        );
        in_node(
            &b,
            &[
                &ipt,
                "-w",
                "5",
                "-t",
                "filter",
                "-A",
                "INPUT",
                "-j",
                "KUBE-FIREWALL",
            ],
        );
        let mut agent = b.start_agent();
        b.wait_ready().await;
        let save = |backend: &str| in_node(&b, &[&format!("iptables-{backend}-save"), "-t", "nat"]);
        assert_eq!(
            count(&save(node_uses), "-A IRSA-IMDS -d 169.254.169.254/32"),
            1,
            "{node_uses}: {}",
            save(node_uses)
        );
        assert_eq!(
            count(&save(other), "IRSA-IMDS"),
            0,
            "{node_uses}: {}",
            save(other)
        );
        let r = b.client(0, "legacy-boto").await;
        assert_eq!(
            r["arn"],
            assumed(READER, 0),
            "{node_uses}: {r}\n{}",
            b.agent_log()
        );
        assert!(
            b.agent_log().contains(&format!("backend=\"{node_uses}\""))
                || b.agent_log().contains(&format!("backend={node_uses}")),
            "{}",
            b.agent_log()
        );
        let status = testbed::util::sigterm(&mut agent, Duration::from_secs(20))
            .await
            .unwrap();
        assert!(status.success());
        uninstall_agent(&b);
        for backend in ["legacy", "nft"] {
            for tool in ["iptables", "ip6tables"] {
                let all = in_node(&b, &[&format!("{tool}-{backend}-save")]);
                assert_eq!(count(&all, "IRSA-IMDS"), 0, "{tool}-{backend}:\n{all}");
            }
        }
        // The node's own rules are untouched.
        assert_eq!(
            count(
                &in_node(&b, &[&format!("iptables-{node_uses}-save")]),
                "KUBE-FIREWALL"
            ),
            2
        );
    }
}

/// A minimal container runtime: runs every plugin of the active conflist in order, as libcni
/// does for ADD, each getting the previous one's result. The node's main plugins are stubs that
/// hand out the pod's address; ours is the real binary.
fn runtime_add(
    conf_dir: &std::path::Path,
    bin_dir: &std::path::Path,
    netns: &str,
    pod: &str,
    ip: std::net::Ipv4Addr,
) -> Result<Value, String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(conf_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "conflist"))
        .collect();
    files.sort();
    let conf: Value = serde_json::from_str(&std::fs::read_to_string(&files[0]).unwrap()).unwrap();
    let mut prev: Option<Value> = None;
    for plugin in conf["plugins"].as_array().unwrap() {
        let ty = plugin["type"].as_str().unwrap();
        let exe = bin_dir.join(ty);
        if !exe.exists() {
            return Err(format!(
                "failed to find plugin {ty:?} in path [{}]",
                bin_dir.display()
            ));
        }
        let mut net = plugin.clone();
        net["cniVersion"] = conf["cniVersion"].clone();
        net["name"] = conf["name"].clone();
        if let Some(p) = &prev {
            net["prevResult"] = p.clone();
        }
        let mut child = std::process::Command::new(&exe)
            .env_clear()
            .env("CNI_COMMAND", "ADD")
            .env("STUB_IP", ip.to_string())
            .env("CNI_CONTAINERID", format!("sandbox-{pod}"))
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", bin_dir)
            .env(
                "CNI_ARGS",
                format!("K8S_POD_NAMESPACE=legacy;K8S_POD_NAME={pod}"),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(net.to_string().as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        if !out.status.success() {
            return Err(format!("{ty}: {}", String::from_utf8_lossy(&out.stdout)));
        }
        prev = Some(serde_json::from_slice(&out.stdout).map_err(|e| format!("{ty}: {e}"))?);
    }
    prev.ok_or_else(|| "empty chain".into())
}

/// A stub main plugin: passes `prevResult` on, or (first in the chain) hands out `$STUB_IP`.
fn stub_plugin(bin_dir: &std::path::Path, name: &str) {
    let script = "#!/usr/bin/python3\nimport json, os, sys\nc = json.load(sys.stdin)\nip = os.environ['STUB_IP'] + '/32'\nprint(json.dumps(c.get('prevResult') or {'cniVersion': c['cniVersion'], 'interfaces': [{'name': 'eth0'}], 'ips': [{'version': '4', 'address': ip, 'interface': 0}], 'dns': {}}))\n";
    let p = bin_dir.join(name);
    std::fs::write(&p, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// The chain stays chained while the agent runs: aws-node rewriting its conflist (an add-on
/// upgrade) and a new conflist sorting first both get the hook back within the resync bound,
/// counted in `irsa_imds_cni_rechained_total`. Then the documented uninstall: no rule, no entry,
/// no binary, and the next pod's ADD still succeeds.
#[tokio::test]
async fn cni_chain_is_kept_then_uninstalled_cleanly() {
    let b = bed(2, "chain").await;
    let d = b.dir.path();
    let (bin_dir, conf_dir) = (d.join("opt-cni-bin"), d.join("etc-cni-net.d"));
    std::fs::create_dir_all(&bin_dir).unwrap();
    std::fs::create_dir_all(&conf_dir).unwrap();
    let samples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../cni-hook/tests/samples");
    for stub in ["aws-cni", "egress-cni", "portmap", "calico", "bandwidth"] {
        stub_plugin(&bin_dir, stub);
    }
    std::fs::copy(
        samples.join("eks-vpc-cni.conflist"),
        conf_dir.join("10-aws.conflist"),
    )
    .unwrap();
    let (sock, state) = (d.join("cni.sock"), d.join("run/cni-chain.json"));
    let out = std::process::Command::new(cni_bin())
        .arg("install")
        .arg(format!("--bin-dir={}", bin_dir.display()))
        .arg(format!("--conf-dir={}", conf_dir.display()))
        .arg(format!("--socket={}", sock.display()))
        .arg(format!("--chain-state={}", state.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut agent = b.start_agent_with(&[
        "--iptables",
        "--host-interface",
        "vethirsa+",
        "--host-ip",
        "10.77.255.1",
        "--cni-socket",
        sock.to_str().unwrap(),
        "--cni-chain-state",
        state.to_str().unwrap(),
        "--cni-chain-resync",
        "1s",
    ]);
    b.wait_ready().await;
    let netns0 = format!("/var/run/netns/{}", b.topo.pod_ns(0));
    runtime_add(&conf_dir, &bin_dir, &netns0, "app-0", b.topo.pod_ip(0)).unwrap();
    let metrics = b.ops_body("/metrics").unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("irsa_imds_cni_registrations_total{")
                && l.contains("op=\"add\"")
                && l.contains("result=\"ok\"")),
        "the chained hook registered the pod:\n{metrics}"
    );

    let chained = |f: &str| -> bool {
        std::fs::read_to_string(conf_dir.join(f)).is_ok_and(|t| t.contains("\"irsa-imds-cni\""))
    };
    // aws-node restarts and writes its conflist back without us, atomically.
    std::fs::copy(
        samples.join("eks-vpc-cni.conflist"),
        conf_dir.join(".10-aws.tmp"),
    )
    .unwrap();
    std::fs::rename(
        conf_dir.join(".10-aws.tmp"),
        conf_dir.join("10-aws.conflist"),
    )
    .unwrap();
    assert!(!chained("10-aws.conflist"));
    // The stated bound: one --cni-chain-resync (1s here); the deadline leaves room for a slow box.
    wait_for(Duration::from_secs(10), || async {
        chained("10-aws.conflist")
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", b.agent_log()));
    // Another CNI's conflist now sorts first and becomes the active one.
    std::fs::copy(
        samples.join("calico.conflist"),
        conf_dir.join("05-calico.conflist"),
    )
    .unwrap();
    wait_for(Duration::from_secs(10), || async {
        chained("05-calico.conflist")
    })
    .await
    .unwrap();
    let metrics = b.ops_body("/metrics").unwrap();
    let rechained: u64 = metrics
        .lines()
        .find(|l| l.starts_with("irsa_imds_cni_rechained_total "))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(rechained >= 2, "{metrics}");
    // Host mode and a chain state: both states are exported, and both are in place.
    for line in [
        "irsa_imds_redirect_rule_installed 1",
        "irsa_imds_cni_chain_present 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line}:\n{metrics}");
    }

    // Uninstall, in the documented order: stop the agent (rules and chain stay: pods keep
    // failing closed and keep starting), remove the hook, then the rules.
    let status = testbed::util::sigterm(&mut agent, Duration::from_secs(20))
        .await
        .unwrap();
    assert!(status.success());
    assert!(chained("05-calico.conflist"));
    assert_eq!(count(&b.topo.node_nat_rules().unwrap(), "-A IRSA-IMDS"), 1);
    let netns1 = format!("/var/run/netns/{}", b.topo.pod_ns(1));
    runtime_add(&conf_dir, &bin_dir, &netns1, "app-1", b.topo.pod_ip(1))
        .expect("pods start with the agent away (fail open)");
    let out = std::process::Command::new(cni_bin())
        .arg("uninstall")
        .arg(format!("--bin-dir={}", bin_dir.display()))
        .arg(format!("--conf-dir={}", conf_dir.display()))
        .arg(format!("--chain-state={}", state.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    uninstall_agent(&b);
    for f in ["05-calico.conflist", "10-aws.conflist"] {
        assert!(!chained(f), "{f}");
    }
    assert!(!bin_dir.join("irsa-imds-cni").exists());
    assert!(!state.exists());
    for tool in [
        "iptables-legacy-save",
        "iptables-nft-save",
        "ip6tables-legacy-save",
        "ip6tables-nft-save",
    ] {
        let all = in_node(&b, &[tool]);
        assert_eq!(count(&all, "IRSA-IMDS"), 0, "{tool}:\n{all}");
    }
    let r = runtime_add(&conf_dir, &bin_dir, &netns1, "app-1", b.topo.pod_ip(1))
        .expect("a new pod's ADD after uninstall");
    assert_eq!(r["ips"][0]["address"], format!("{}/32", b.topo.pod_ip(1)));
}

/// `--require-redirect`: through the DNAT of 169.254.169.254:80 the pod is served; the same pod
/// connecting straight to the agent's address and port (its original destination is the agent
/// itself, not the metadata address) is refused at accept and counted.
#[tokio::test]
async fn only_connections_through_the_redirect_are_served() {
    let b = bed(1, "origdst").await;
    let mut agent = b.start_agent_with(&[
        "--iptables",
        "--host-interface",
        "vethirsa+",
        "--host-ip",
        "10.77.255.1",
        "--require-redirect",
    ]);
    b.wait_ready().await;
    let imds: SocketAddr = IMDS4.parse().unwrap();
    assert_eq!(
        pod_listing(b.topo.pod_ns(0), imds).await,
        Answer::Role("legacy-reader".into()),
        "{}",
        b.agent_log()
    );
    let direct = SocketAddr::new(b.topo.node_ip().into(), AGENT_PORT);
    for _ in 0..3 {
        let a = pod_listing(b.topo.pod_ns(0), direct).await;
        assert_eq!(a, Answer::Closed, "{direct}: {a:?}");
    }
    let metrics = b.ops_body("/metrics").unwrap_or_default();
    let refused = metrics
        .lines()
        .find(|l| {
            l.starts_with("irsa_imds_connections_refused_total{")
                && l.contains("listener=\"imds\"")
                && l.contains("reason=\"not_redirected\"")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok());
    assert_eq!(refused, Some(3), "{metrics}");
    assert!(
        b.agent_log().contains("not_redirected"),
        "the refusal is logged: {}",
        b.agent_log()
    );
    // Through the redirect it still serves, after the refusals.
    assert_eq!(
        pod_listing(b.topo.pod_ns(0), imds).await,
        Answer::Role("legacy-reader".into())
    );
    let status = testbed::util::sigterm(&mut agent, Duration::from_secs(20))
        .await
        .unwrap();
    assert!(status.success());
}
