//! The mission, end to end: unmodified SDKs that hard-code 169.254.169.254, in pod network
//! namespaces, reach the real agent binary through a real iptables DNAT in a node namespace, and
//! each gets its own pod's role from STS (moto). Also the redirect rule's life cycle.
//! Everything runs inside namespaces these tests create and remove (root required).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use testbed::fake_imds::{FakeImds, NODE_ROLE_KEY_ID};
use testbed::harness::{NODE, wait_for};
use testbed::kube_api::{KubeApi, pod};
use testbed::moto::Moto;
use testbed::netns::Topology;

const ANN: &str = "eks.amazonaws.com/role-arn";
const READER: &str = "arn:aws:iam::123456789012:role/legacy-reader";
const WRITER: &str = "arn:aws:iam::123456789012:role/legacy-writer";
const AGENT_PORT: u16 = 8181;
const OPS_PORT: u16 = 8182;

fn agent_bin() -> anyhow::Result<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let bin = target.join("debug/irsa-imds-agent");
    anyhow::ensure!(
        bin.exists(),
        "{} missing: run `cargo build -p irsa-imds-agent` first (tests/run.sh does)",
        bin.display()
    );
    Ok(bin)
}

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
    let upstream = FakeImds::start_on(topo.bind_in_node("127.0.0.1:0".parse().unwrap()).unwrap())
        .await
        .unwrap();
    let moto = Moto::start_with(&["ip", "netns", "exec", topo.node_ns()], "0.0.0.0")
        .await
        .unwrap();
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
        let bin = agent_bin().unwrap();
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
            .args(["--log-format", "text"])
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

#[tokio::test]
async fn old_and_current_sdks_get_their_own_pods_role_through_the_redirect() {
    let b = bed(4, "sdks").await;
    let mut agent = b.start_agent();
    b.wait_ready().await;

    for kind in ["legacy-boto", "legacy-js", "current-boto"] {
        // Two pods with different roles at the same time.
        let (r, w) = tokio::join!(b.client(0, kind), b.client(1, kind));
        assert_eq!(
            r["ok"],
            true,
            "{kind} pod 0: {r}\nagent log:\n{}",
            b.agent_log()
        );
        assert_eq!(r["arn"], assumed(READER, 0), "{kind}");
        assert_eq!(w["ok"], true, "{kind} pod 1: {w}");
        assert_eq!(w["arn"], assumed(WRITER, 1), "{kind}");
        // The pod without a role: the SDK finds no credentials at all.
        let none = b.client(2, kind).await;
        assert_eq!(none["ok"], false, "{kind} pod 2: {none}");
    }
    let old = b.client(3, "legacy-boto").await;
    assert_eq!(
        old["method"], "iam-role",
        "botocore got them from instance metadata: {old}"
    );
    assert_eq!(old["arn"], assumed(READER, 3));
    // The node's credentials were never even asked for upstream.
    assert!(
        b.upstream
            .requests()
            .iter()
            .all(|(_, p)| !p.contains("/iam/")),
        "{:?}",
        b.upstream.requests()
    );
    assert!(!b.agent_log().contains(NODE_ROLE_KEY_ID));
    let tr = b.kube.token_requests();
    assert!(tr.iter().all(|t| t.bound_pod_name.starts_with("app-")));

    let status = testbed::util::sigterm(&mut agent, Duration::from_secs(20))
        .await
        .unwrap();
    assert!(
        status.success(),
        "clean exit after SIGTERM: {status}\n{}",
        b.agent_log()
    );
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

    // SIGTERM: the rule and the jump go, exit 0.
    let status = testbed::util::sigterm(&mut agent, Duration::from_secs(20))
        .await
        .unwrap();
    assert!(status.success(), "{status}\n{}", b.agent_log());
    let rules = b.topo.node_nat_rules().unwrap();
    assert_eq!(
        (count(&rules, jump), count(&rules, "IRSA-IMDS")),
        (0, 0),
        "removed on SIGTERM:\n{rules}"
    );
}

fn cni_bin() -> PathBuf {
    agent_bin().unwrap().with_file_name("irsa-imds-cni")
}

/// Per-pod mode: no host rule at all; the CNI hook's ADD installs the DNAT inside the pod's own
/// namespace and registers the pod, and the old SDK gets its role through that.
#[tokio::test]
async fn cni_hook_per_pod_redirect_and_registration_end_to_end() {
    let b = bed(1, "podmode").await;
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
    let out = cni("ADD").await;
    assert!(
        out.status.success(),
        "ADD: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let pod_rules = testbed::netns::sh(&[
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
    .unwrap();
    assert_eq!(count(&pod_rules, "169.254.169.254"), 1, "{pod_rules}");
    // A second ADD (runtime retry) does not stack rules.
    assert!(cni("ADD").await.status.success());
    let pod_rules = testbed::netns::sh(&[
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
    .unwrap();
    assert_eq!(count(&pod_rules, "169.254.169.254"), 1, "{pod_rules}");

    let r = b.client(0, "legacy-boto").await;
    assert_eq!(r["arn"], assumed(READER, 0), "{r}\n{}", b.agent_log());
    assert!(cni("DEL").await.status.success());

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
        count(&rules6, "IRSA-IMDS"),
        0,
        "removed on SIGTERM:\n{rules6}"
    );
}
