//! The agent against a real `kube-apiserver` + `etcd` (tests/src/controlplane.rs): the shipped
//! RBAC and admission policy applied with `kubectl apply --server-side`, the agent binary running
//! with a token of its own ServiceAccount, the test playing the kubelet. One control plane per
//! test binary; each test has its own namespace, node name and pod addresses.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::Value;
use testbed::controlplane::{API_AUDIENCE, ControlPlane};
use testbed::fake_imds::FakeImds;
use testbed::harness::{Reply, request, wait_for};
use testbed::jwt::KeySource;
use testbed::moto::Moto;
use testbed::sts::{RoleTrust, StsEmulator, Trust};
use testbed::util::TempDir;

const ANN: &str = "eks.amazonaws.com/role-arn";
const CREDS: &str = "/latest/meta-data/iam/security-credentials/";
const AGENT_NS: &str = "kube-system";
const AGENT_SA: &str = "irsa-imds";

fn manifest() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/irsa-imds.yaml"))
        .unwrap()
}

/// The shared control plane with deploy/irsa-imds.yaml applied (server-side), or `None` when the
/// binaries are missing outside CI (under CI=true that is a failure).
async fn plane() -> Option<Arc<ControlPlane>> {
    static APPLIED: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    let cp = ControlPlane::shared().await.unwrap()?;
    APPLIED
        .get_or_try_init(|| async { cp.apply(&manifest()).await.map(|_| ()) })
        .await
        .unwrap();
    Some(cp)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The agent binary, as the DaemonSet runs it, with a kubeconfig holding a TokenRequest token of
/// ServiceAccount `kube-system/<sa>` (so the ClusterRole bound to it is all it may do).
struct AgentProc {
    child: tokio::process::Child,
    imds: SocketAddr,
    ops: SocketAddr,
    dir: TempDir,
    _upstream: FakeImds,
}

impl AgentProc {
    async fn start(cp: &ControlPlane, sa: &str, node: &str, sts: &str) -> AgentProc {
        Self::start_via(cp, sa, node, sts, &cp.url).await
    }

    /// Like `start`, talking to the apiserver through `server` (e.g. a cuttable proxy).
    async fn start_via(
        cp: &ControlPlane,
        sa: &str,
        node: &str,
        sts: &str,
        server: &str,
    ) -> AgentProc {
        Self::start_with(cp, sa, node, sts, server, &[]).await
    }

    /// Like `start_via`, with `extra` flags appended.
    async fn start_with(
        cp: &ControlPlane,
        sa: &str,
        node: &str,
        sts: &str,
        server: &str,
        extra: &[&str],
    ) -> AgentProc {
        let dir = TempDir::new(&format!("agent-{node}")).unwrap();
        let token = cp
            .mint_token(AGENT_NS, sa, &[API_AUDIENCE], 3600, None)
            .await
            .unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        cp.write_kubeconfig(&kubeconfig, &token, server).unwrap();
        let upstream = FakeImds::start().await.unwrap();
        let imds: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let ops: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
        let child = tokio::process::Command::new(testbed::util::agent_bin())
            .args(["--node-name", node, "--log-format", "text"])
            .args([
                "--listen",
                &imds.to_string(),
                "--ops-listen",
                &ops.to_string(),
            ])
            .args(["--upstream-imds", &upstream.url()])
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .arg("--cni-socket")
            .arg(dir.path().join("cni.sock"))
            .args(extra)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .env("POD_NAME", format!("irsa-imds-{node}"))
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ENDPOINT_URL_STS", sts)
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        AgentProc {
            child,
            imds,
            ops,
            dir,
            _upstream: upstream,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// The CNI plugin's ADD for pod `ns/name` at `ip`, on the agent's registration socket.
    async fn register(&self, ns: &str, name: &str, ip: &str) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let sock = self.dir.path().join("cni.sock");
        wait_for(Duration::from_secs(30), || async { sock.exists() })
            .await
            .unwrap_or_else(|e| panic!("no CNI socket: {e}; agent log:\n{}", self.log()));
        let add = irsa_imds_proto::Request::Add(irsa_imds_proto::Add {
            container_id: format!("sandbox-{ns}-{name}"),
            namespace: ns.into(),
            name: name.into(),
            ips: vec![ip.into()],
        });
        let mut s = tokio::net::UnixStream::connect(&sock).await.unwrap();
        s.write_all(&add.encode()).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        let r = irsa_imds_proto::Response::decode(&out).unwrap();
        assert!(r.ok, "registration refused: {r:?}");
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    async fn readyz(&self) -> Option<StatusCode> {
        request(
            self.ops,
            "127.0.0.1".parse().unwrap(),
            Method::GET,
            "/readyz",
            &[],
        )
        .await
        .ok()
        .map(|r| r.status)
    }

    async fn wait_ready(&self) {
        wait_for(Duration::from_secs(30), || async {
            self.readyz().await == Some(StatusCode::OK)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}; agent log:\n{}", self.log()));
    }

    async fn get(&self, src: &str, path: &str) -> Reply {
        request(self.imds, src.parse().unwrap(), Method::GET, path, &[])
            .await
            .unwrap()
    }

    /// The credentials document `src` is served for `role` (200 and JSON, or a panic with the log).
    async fn creds(&self, src: &str, role: &str) -> Value {
        let r = self.get(src, &format!("{CREDS}{role}")).await;
        match (r.status, r.json()) {
            (StatusCode::OK, Ok(v)) => v,
            (status, _) => panic!("{src}: {status} {}; agent log:\n{}", r.text(), self.log()),
        }
    }

    /// Waits until `src` is served `role` as its role name.
    async fn wait_role(&self, src: &str, role: &str) {
        wait_for(Duration::from_secs(20), || async {
            matches!(request(self.imds, src.parse().unwrap(), Method::GET, CREDS, &[]).await,
                Ok(r) if r.status == StatusCode::OK && r.text() == role)
        })
        .await
        .unwrap_or_else(|e| panic!("{src} never served {role}: {e}; agent log:\n{}", self.log()));
    }
}

/// Audit events of requests `user` made.
fn audit_of(cp: &ControlPlane, user: &str) -> Vec<Value> {
    cp.audit_events()
        .into_iter()
        .filter(|e| e["user"]["username"] == user)
        .collect()
}

fn sa_user(sa: &str) -> String {
    format!("system:serviceaccount:{AGENT_NS}:{sa}")
}

#[tokio::test]
async fn control_plane_plays_kubelet_and_leaves_nothing_running() {
    if !testbed::controlplane::binaries_present().unwrap() {
        return;
    }
    let cp = ControlPlane::start().await.unwrap();
    let dir = cp.dir().to_path_buf();
    cp.create_namespace("kubelet").await.unwrap();
    cp.apply_service_account("kubelet", "app", &[])
        .await
        .unwrap();
    let pod = cp
        .run_pod("kubelet", "app-0", "node-k", "app", &["127.0.70.1"])
        .await
        .unwrap();
    assert_eq!(pod.status.unwrap().pod_ip.as_deref(), Some("127.0.70.1"));
    let got = cp
        .kubectl(
            &[
                "get",
                "pods",
                "-n",
                "kubelet",
                "--field-selector=spec.nodeName=node-k",
                "-o",
                "json",
            ],
            None,
        )
        .await
        .unwrap();
    let got: Value = serde_json::from_str(&got).unwrap();
    assert_eq!(got["items"][0]["status"]["phase"], "Running");
    cp.delete_pod("kubelet", "app-0").await.unwrap();
    let left = cp
        .kubectl(&["get", "pods", "-n", "kubelet", "-o", "name"], None)
        .await
        .unwrap();
    assert_eq!(left.trim(), "", "a grace-0 delete removes the pod at once");

    let pids = children_with_dir(&dir);
    assert_eq!(pids.len(), 2, "etcd and kube-apiserver run from {dir:?}");
    drop(cp);
    assert!(children_with_dir(&dir).is_empty(), "processes left running");
    assert!(!dir.exists(), "{dir:?} left behind");
}

/// The control plane the netns suites use: etcd and kube-apiserver run inside the node network
/// namespace, answer there on its loopback (the agent's view), answer the test at the same URL
/// through the bridge, and leave nothing behind: processes, folder and bridge ports all go.
#[tokio::test]
async fn control_plane_in_a_node_namespace_serves_both_sides_and_leaves_nothing_running() {
    if !testbed::controlplane::binaries_present().unwrap() {
        return;
    }
    if let Err(e) = testbed::netns::require_root() {
        assert!(!std::env::var("CI").is_ok_and(|v| v == "true"), "{e}");
        eprintln!("SKIPPED: {e}");
        return;
    }
    let topo = testbed::netns::Topology::new(0).unwrap();
    let cp = ControlPlane::start_in_netns(topo.node_ns()).await.unwrap();
    let dir = cp.dir().to_path_buf();
    let port: u16 = cp.url.rsplit(':').next().unwrap().parse().unwrap();

    // Both servers run in the node's namespace, not the machine's.
    use std::os::unix::fs::MetadataExt as _;
    let node_net = std::fs::metadata(format!("/var/run/netns/{}", topo.node_ns()))
        .unwrap()
        .ino();
    let pids = children_with_dir(&dir);
    assert_eq!(pids.len(), 2, "etcd and kube-apiserver run from {dir:?}");
    for pid in &pids {
        let net = std::fs::metadata(format!("/proc/{pid}/ns/net"))
            .unwrap()
            .ino();
        assert_eq!(net, node_net, "process {pid} runs in the node namespace");
    }
    // The agent's side: the real kubectl inside the namespace, at the apiserver's URL.
    let kubectl = testbed::controlplane::bin_dir().join("kubectl");
    let kubeconfig = cp.admin_kubeconfig();
    let inside = testbed::netns::sh(&[
        "ip",
        "netns",
        "exec",
        topo.node_ns(),
        kubectl.to_str().unwrap(),
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "get",
        "--raw",
        "/readyz",
    ])
    .unwrap();
    assert_eq!(inside.trim(), "ok");
    // The test's side, through the bridge: the same URL.
    cp.create_namespace("bridged").await.unwrap();
    assert!(
        cp.kubectl(&["get", "namespace", "bridged", "-o", "name"], None)
            .await
            .unwrap()
            .contains("bridged")
    );
    cp.etcd_revision().await.unwrap();

    drop(cp);
    assert!(children_with_dir(&dir).is_empty(), "processes left running");
    assert!(!dir.exists(), "{dir:?} left behind");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the bridge still listens on {port}"
    );
}

/// Processes whose command line names `dir` (the control plane's own folder).
fn children_with_dir(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // A zombie is not running; only live processes count.
            String::from_utf8_lossy(&cmd).contains(&needle) && !state.contains(") Z ")
        })
        .collect()
}

#[tokio::test]
async fn agent_under_shipped_rbac_serves_each_pods_own_role() {
    let Some(cp) = plane().await else { return };
    let moto = Moto::start().await.unwrap();
    let (ns, node) = ("rbac-full", "node-rbac-full");
    cp.create_namespace(ns).await.unwrap();
    cp.apply_service_account(
        ns,
        "cart",
        &[(ANN, "arn:aws:iam::123456789012:role/cart-role")],
    )
    .await
    .unwrap();
    cp.apply_service_account(ns, "plain", &[]).await.unwrap();
    let agent = AgentProc::start(&cp, AGENT_SA, node, &moto.endpoint()).await;
    agent.wait_ready().await;
    cp.run_pod(ns, "cart-0", node, "cart", &["127.0.61.1"])
        .await
        .unwrap();
    cp.run_pod(ns, "plain-0", node, "plain", &["127.0.61.2"])
        .await
        .unwrap();
    // The same role on another node: this agent must not serve it.
    cp.run_pod(ns, "cart-1", "node-elsewhere", "cart", &["127.0.61.3"])
        .await
        .unwrap();

    // The CNI plugin's ADD for cart-0: the agent confirms it with a direct read of that one pod
    // (the shipped `get pods`), rather than waiting for the watch.
    agent.register(ns, "cart-0", "127.0.61.1").await;
    agent.wait_role("127.0.61.1", "cart-role").await;
    let creds = agent.creds("127.0.61.1", "cart-role").await;
    assert_eq!(
        moto.caller_arn(&creds).await.unwrap(),
        "arn:aws:sts::123456789012:assumed-role/cart-role/rbac-full.cart-0"
    );
    assert_eq!(
        agent.get("127.0.61.2", CREDS).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        agent.get("127.0.61.3", CREDS).await.status,
        StatusCode::NOT_FOUND
    );

    // Everything it did was allowed by the shipped ClusterRole, and it never read pods beyond
    // its node.
    let audit: Vec<Value> = audit_of(&cp, &sa_user(AGENT_SA))
        .into_iter()
        .filter(|e| e["requestURI"].as_str().unwrap_or("").contains("rbac-full"))
        .collect();
    assert!(!audit.is_empty(), "no audit events for the agent");
    for e in &audit {
        let code = e["responseStatus"]["code"].as_i64().unwrap_or(0);
        assert!(code < 400, "agent request refused: {e}");
    }
    wait_for(Duration::from_secs(20), || async {
        audit_of(&cp, &sa_user(AGENT_SA)).iter().any(|e| {
            e["verb"] == "get"
                && e["objectRef"]["resource"] == "pods"
                && e["objectRef"]["namespace"] == ns
                && e["objectRef"]["name"] == "cart-0"
                && e["responseStatus"]["code"] == 200
        })
    })
    .await
    .expect("the CNI registration was confirmed by a `get` of its pod");
}

/// Applies `kube-system/<name>`: a ServiceAccount, a ClusterRole with `rules` and the binding.
async fn apply_agent_identity(cp: &ControlPlane, name: &str, rules: &Value) {
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": name, "namespace": AGENT_NS}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": name}, "rules": rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": name},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": AGENT_NS}]},
    ]});
    cp.apply(&list.to_string()).await.unwrap();
}

/// Each verb of each rule of the shipped ClusterRole, removed on its own: the agent either exits
/// or logs the API server's refusal naming that verb and resource, and never serves credentials
/// it should not. Every verb is used: the pod is also registered through the CNI socket, whose
/// confirmation is the `get pods`; the STS is dead, so an Event is due (`create events`).
#[tokio::test]
async fn agent_missing_any_one_permission_names_it_and_serves_nothing_wrong() {
    let Some(cp) = plane().await else { return };
    let moto = Moto::start().await.unwrap();
    // An STS that never answers: credentials fail, which is what makes the agent record an Event.
    let dead_sts = format!("http://127.0.0.1:{}", free_port());
    let shipped: Value = serde_json::from_str(
        &cp.kubectl(&["get", "clusterrole", AGENT_SA, "-o", "json"], None)
            .await
            .unwrap(),
    )
    .unwrap();
    let rules = shipped["rules"].as_array().unwrap().clone();
    let mut cases = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        for verb in rule["verbs"].as_array().unwrap() {
            cases.push((i, verb.as_str().unwrap().to_string()));
        }
    }
    assert!(cases.len() >= 6, "shipped rules: {rules:?}");

    for (n, (i, verb)) in cases.iter().enumerate() {
        let resource = rules[*i]["resources"][0].as_str().unwrap().to_string();
        let mut reduced = rules.clone();
        let verbs = reduced[*i]["verbs"].as_array_mut().unwrap();
        verbs.retain(|v| v != verb.as_str());
        if verbs.is_empty() {
            reduced.remove(*i);
        }
        let name = format!("irsa-imds-without-{n}");
        apply_agent_identity(&cp, &name, &Value::Array(reduced)).await;
        let (ns, node, ip) = (
            format!("without-{n}"),
            format!("node-without-{n}"),
            format!("127.0.62.{}", n + 1),
        );
        cp.create_namespace(&ns).await.unwrap();
        cp.apply_service_account(&ns, "app", &[(ANN, "arn:aws:iam::123456789012:role/app")])
            .await
            .unwrap();
        cp.run_pod(&ns, "app-0", &node, "app", &[&ip])
            .await
            .unwrap();
        let sts = if resource == "events" {
            dead_sts.clone()
        } else {
            moto.endpoint()
        };
        let mut agent = AgentProc::start(&cp, &name, &node, &sts).await;
        let needle = format!("cannot {verb} resource \"{resource}\"");
        // Without `get pods` the registration stays unconfirmed: the agent says why, and serves
        // the pod once the watch shows it (the right pod, only later).
        let confirm_only = verb == "get" && resource == "pods";
        // (Without list or watch the agent exits before it opens its socket.)
        if resource != "pods" || confirm_only {
            agent.register(&ns, "app-0", &ip).await;
        }
        let mut served = None;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let creds = format!("{CREDS}app");
            if let Ok(r) = request(agent.imds, ip.parse().unwrap(), Method::GET, &creds, &[]).await
                && r.status == StatusCode::OK
                && r.json().is_ok_and(|v| v.get("AccessKeyId").is_some())
            {
                served = Some(r.text());
            }
            let named = agent.log().replace('\\', "").contains(&needle);
            if named && (!confirm_only || served.is_some()) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "without {verb} {resource}: {}; agent log:\n{}",
                if named {
                    "the watch never served the pod"
                } else {
                    "no log line names it"
                },
                agent.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let log = agent.log();
        if confirm_only {
            assert!(
                agent.exited().is_none(),
                "the watch still works; log:\n{log}"
            );
            continue;
        }
        // Without what it needs to read roles or mint tokens, nothing is served.
        if resource.starts_with("serviceaccounts") {
            assert!(
                served.is_none(),
                "without {verb} {resource} the agent served credentials; log:\n{log}"
            );
        }
        if resource == "pods" {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            let status = loop {
                if let Some(s) = agent.exited() {
                    break s;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "agent still running without {verb} pods; log:\n{log}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            assert!(!status.success());
            assert_ne!(agent.readyz().await, Some(StatusCode::OK));
        }
    }
}

/// Whether `kubectl get events` shows an `AssumeRoleFailed` Event on pod `ns/pod`.
async fn event_recorded(cp: &ControlPlane, ns: &str, pod: &str) -> bool {
    let out = cp
        .kubectl(&["get", "events", "-n", ns, "-o", "json"], None)
        .await
        .unwrap_or_default();
    serde_json::from_str::<Value>(&out).is_ok_and(|v| {
        v["items"].as_array().is_some_and(|items| {
            items
                .iter()
                .any(|e| e["reason"] == "AssumeRoleFailed" && e["involvedObject"]["name"] == pod)
        })
    })
}

/// Pod list/watch requests of the agents (every `kube-system/irsa-imds*` ServiceAccount).
fn agent_pod_reads(cp: &ControlPlane) -> Vec<Value> {
    cp.audit_events()
        .into_iter()
        .filter(|e| {
            e["user"]["username"]
                .as_str()
                .is_some_and(|u| u.starts_with(&sa_user(AGENT_SA)))
                && e["objectRef"]["resource"] == "pods"
                && e["objectRef"]["subresource"].is_null()
                && (e["verb"] == "list" || e["verb"] == "watch")
        })
        .collect()
}

/// The pod watch against the real apiserver: only this node's pods (audit log), IP changes and
/// deletions followed within bounds, and a resume after etcd compacted the agent's last
/// resourceVersion (410 Gone) relists instead of serving a frozen view.
#[tokio::test]
async fn pod_watch_is_node_scoped_follows_changes_and_relists_after_compaction() {
    let Some(cp) = plane().await else { return };
    let moto = Moto::start().await.unwrap();
    let (ns, node) = ("watch", "node-watch");
    let bound = Duration::from_secs(10);
    cp.create_namespace(ns).await.unwrap();
    for sa in ["alpha", "beta"] {
        let arn = format!("arn:aws:iam::123456789012:role/{sa}");
        cp.apply_service_account(ns, sa, &[(ANN, &arn)])
            .await
            .unwrap();
    }
    cp.run_pod(ns, "alpha-0", node, "alpha", &["127.0.63.1"])
        .await
        .unwrap();
    cp.run_pod(ns, "noise-0", "node-noise", "alpha", &["127.0.63.9"])
        .await
        .unwrap();
    let api: SocketAddr = cp.url.trim_start_matches("https://").parse().unwrap();
    let proxy = testbed::util::TcpProxy::start(api).await.unwrap();
    let via = format!("https://{}", proxy.addr);
    let agent = AgentProc::start_via(&cp, AGENT_SA, node, &moto.endpoint(), &via).await;
    agent.wait_ready().await;
    agent.wait_role("127.0.63.1", "alpha").await;

    // The kubelet reports a new IP: the old one stops matching, the new one is served.
    cp.set_pod_ips(ns, "alpha-0", &["127.0.63.2"])
        .await
        .unwrap();
    wait_for(bound, || async {
        agent.get("127.0.63.2", CREDS).await.text() == "alpha"
            && agent.get("127.0.63.1", CREDS).await.status == StatusCode::NOT_FOUND
    })
    .await
    .unwrap_or_else(|e| panic!("IP change not followed: {e}; log:\n{}", agent.log()));

    // Deleted: nothing for its address.
    cp.delete_pod(ns, "alpha-0").await.unwrap();
    wait_for(bound, || async {
        agent.get("127.0.63.2", CREDS).await.status == StatusCode::NOT_FOUND
    })
    .await
    .unwrap_or_else(|e| panic!("deletion not followed: {e}; log:\n{}", agent.log()));

    // Partition the agent from the apiserver, change the world, and compact etcd past the
    // agent's last resourceVersion: resuming its watch gets 410 Gone and must relist.
    let lists = |cp: &ControlPlane| {
        agent_pod_reads(cp)
            .iter()
            .filter(|e| e["verb"] == "list" && e["requestURI"].as_str().unwrap().contains(node))
            .count()
    };
    let lists_before = lists(&cp);
    proxy.cut();
    cp.run_pod(ns, "beta-0", node, "beta", &["127.0.63.3"])
        .await
        .unwrap();
    cp.set_pod_ips(ns, "noise-0", &["127.0.63.10"])
        .await
        .unwrap();
    cp.compact_etcd().await.unwrap();
    proxy.resume();
    wait_for(Duration::from_secs(60), || async {
        agent.get("127.0.63.3", CREDS).await.text() == "beta"
    })
    .await
    .unwrap_or_else(|e| panic!("no resume after compaction: {e}; log:\n{}", agent.log()));
    assert!(
        lists(&cp) > lists_before,
        "the agent did not relist after its resourceVersion was compacted"
    );
    assert!(
        agent.log().contains("410") || agent.log().contains("too old"),
        "no 410 seen; log:\n{}",
        agent.log()
    );

    // Never a cluster-wide pod list or watch, from any agent in this binary.
    let reads = agent_pod_reads(&cp);
    assert!(
        reads.iter().any(|e| e["verb"] == "watch"),
        "no watch audited"
    );
    for e in &reads {
        let uri = e["requestURI"].as_str().unwrap();
        assert!(
            uri.contains("fieldSelector=spec.nodeName%3Dnode-"),
            "cluster-wide pod read: {uri}"
        );
    }
}

/// The shipped ValidatingAdmissionPolicy against the real apiserver: with the agent's own
/// credentials, a token for sts.amazonaws.com bound to a Pod is minted; one for the apiserver's
/// audience, with no audience (which means the apiserver's), or unbound is denied. The policy
/// does not touch anyone else's TokenRequests.
#[tokio::test]
async fn token_request_policy_limits_agent_tokens_to_sts_audience_bound_to_a_pod() {
    let Some(cp) = plane().await else { return };
    let ns = "vap";
    cp.create_namespace(ns).await.unwrap();
    cp.apply_service_account(ns, "app", &[]).await.unwrap();
    let pod = cp
        .run_pod(ns, "app-0", "node-vap", "app", &["127.0.64.1"])
        .await
        .unwrap();
    let uid = pod.metadata.uid.clone().unwrap();
    let agent_token = cp
        .mint_token(AGENT_NS, AGENT_SA, &[API_AUDIENCE], 600, None)
        .await
        .unwrap();
    let agent = cp.client_with_token(&agent_token, &cp.url).await.unwrap();
    // A TokenRequest for vap/app with the agent's credentials, bound to app-0 or unbound.
    let mint = |auds: Vec<&'static str>, bound: bool| {
        let (agent, uid) = (agent.clone(), uid.clone());
        async move {
            let to = bound.then_some(("app-0", uid.as_str()));
            testbed::controlplane::mint_token_with(agent, ns, "app", &auds, 3600, to).await
        }
    };

    // The policy becomes effective a moment after it is created: wait until it denies.
    wait_for(Duration::from_secs(30), || async {
        mint(vec![API_AUDIENCE], true).await.is_err()
    })
    .await
    .expect("the policy never denied an apiserver-audience token");

    let ok = mint(vec!["sts.amazonaws.com"], true).await.unwrap();
    assert!(!ok.is_empty());
    assert_eq!(
        cp.token_review(&ok, &["sts.amazonaws.com"]).await.unwrap(),
        Some("system:serviceaccount:vap:app".to_string())
    );

    for (what, auds, b) in [
        ("apiserver audience", vec![API_AUDIENCE], true),
        ("no audience (= the apiserver's)", vec![], true),
        (
            "mixed audiences",
            vec!["sts.amazonaws.com", API_AUDIENCE],
            true,
        ),
        ("unbound", vec!["sts.amazonaws.com"], false),
    ] {
        match mint(auds, b).await {
            Err(kube::Error::Api(s)) => {
                assert_eq!(s.code, 403, "{what}: {s:?}");
                assert!(
                    s.message.contains("irsa-imds may request"),
                    "{what}: {}",
                    s.message
                );
            }
            other => panic!("{what}: not denied: {:?}", other.map(|_| "a token")),
        }
    }

    // Scoped to the agent: an admin's TokenRequest for the apiserver audience still works.
    let admin = cp
        .mint_token(ns, "app", &[API_AUDIENCE], 600, None)
        .await
        .unwrap();
    assert!(
        cp.token_review(&admin, &[API_AUDIENCE])
            .await
            .unwrap()
            .is_some()
    );
}

/// Real tokens, real trust policy: the STS emulator verifies the agent's tokens against the
/// apiserver's own OIDC discovery and JWKS. A role that trusts another ServiceAccount gets the EC2
/// answer for an unassumable role and an `AssumeRoleFailed` Event; the token minted for a pod is
/// accepted by TokenReview while the pod lives and rejected once it is deleted.
#[tokio::test]
async fn real_tokens_meet_the_trust_policy_and_die_with_their_pod() {
    let Some(cp) = plane().await else { return };
    let (ns, node) = ("trust", "node-trust");
    let good = "arn:aws:iam::123456789012:role/good";
    let other = "arn:aws:iam::123456789012:role/trusts-someone-else";
    cp.create_namespace(ns).await.unwrap();
    cp.apply_service_account(ns, "good", &[(ANN, good)])
        .await
        .unwrap();
    cp.apply_service_account(ns, "app", &[(ANN, other)])
        .await
        .unwrap();
    let keys = KeySource::Oidc {
        issuer_url: cp.issuer.clone(),
        ca_pem: Some(cp.ca_pem.clone()),
        bearer_token: Some(cp.admin_token().to_string()),
    };
    let trust = Trust::Roles(
        [
            (
                good.to_string(),
                RoleTrust::service_accounts(&[(ns, "good")]),
            ),
            (
                other.to_string(),
                RoleTrust::service_accounts(&[(ns, "someone-else")]),
            ),
        ]
        .into_iter()
        .collect(),
    );
    keys.fetch()
        .await
        .expect("the apiserver's OIDC discovery and JWKS");
    let sts = StsEmulator::start_with(keys, trust).await.unwrap();
    let agent = AgentProc::start(&cp, AGENT_SA, node, &sts.endpoint()).await;
    agent.wait_ready().await;
    let good_pod = cp
        .run_pod(ns, "good-0", node, "good", &["127.0.65.1"])
        .await
        .unwrap();
    cp.run_pod(ns, "app-0", node, "app", &["127.0.65.2"])
        .await
        .unwrap();

    agent.wait_role("127.0.65.1", "good").await;
    let creds = agent.creds("127.0.65.1", "good").await;
    let issued = sts
        .issued_for_key(creds["AccessKeyId"].as_str().unwrap())
        .expect("served keys were issued by STS");
    assert_eq!(issued.subject, "system:serviceaccount:trust:good");
    assert_eq!(issued.role_session_name, "trust.good-0");

    agent.wait_role("127.0.65.2", "trusts-someone-else").await;
    let refused = agent
        .get("127.0.65.2", &format!("{CREDS}trusts-someone-else"))
        .await;
    assert_eq!(refused.status, StatusCode::OK);
    let body = refused.json().unwrap();
    assert_eq!(body["Code"], "AssumeRoleUnauthorizedAccess", "{body}");
    assert!(body.get("AccessKeyId").is_none(), "{body}");
    wait_for(Duration::from_secs(20), || event_recorded(&cp, ns, "app-0"))
        .await
        .unwrap_or_else(|e| panic!("no AssumeRoleFailed event: {e}; log:\n{}", agent.log()));

    // The token the agent minted for good-0 is a real, pod-bound apiserver token.
    let token = sts
        .calls()
        .into_iter()
        .find(|c| c.role_arn == good && c.error.is_none())
        .unwrap()
        .web_identity_token;
    assert_eq!(
        cp.token_review(&token, &["sts.amazonaws.com"])
            .await
            .unwrap(),
        Some("system:serviceaccount:trust:good".to_string())
    );
    let (_, claims) = testbed::jwt::decode_unverified(&token).unwrap();
    assert_eq!(
        claims["kubernetes.io"]["pod"]["uid"],
        good_pod.metadata.uid.clone().unwrap()
    );
    cp.delete_pod(ns, "good-0").await.unwrap();
    wait_for(Duration::from_secs(20), || async {
        cp.token_review(&token, &["sts.amazonaws.com"])
            .await
            .is_ok_and(|u| u.is_none())
    })
    .await
    .expect("TokenReview still accepts the deleted pod's token");
}

/// `helm` from `$IRSA_TESTBED_CACHE/bin` (tests/setup-helm.sh builds it), if there.
fn helm() -> Option<PathBuf> {
    let bin = testbed::controlplane::bin_dir().join("helm");
    if bin.exists() {
        return Some(bin);
    }
    let expected = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("setup-helm.sh")
        .exists();
    assert!(
        !(expected && std::env::var("CI").is_ok_and(|v| v == "true")),
        "{} missing under CI=true: run `bash tests/setup.sh`",
        bin.display()
    );
    eprintln!("SKIPPED: {} missing", bin.display());
    None
}

/// The chart, rendered by the real `helm template` and applied server-side: its RBAC lets the agent
/// serve a pod, and its TokenRequest policy denies the agent's ServiceAccount an apiserver token.
#[tokio::test]
async fn chart_rbac_and_token_policy_work_on_the_real_apiserver() {
    let Some(cp) = plane().await else { return };
    let Some(helm) = helm() else { return };
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/chart/irsa-imds");
    let out = tokio::process::Command::new(helm)
        .args(["template", "irsa-chart"])
        .arg(&chart)
        .args(["--namespace", AGENT_NS])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    cp.apply(&String::from_utf8(out.stdout).unwrap())
        .await
        .unwrap();

    let moto = Moto::start().await.unwrap();
    let (ns, node) = ("chart", "node-chart");
    cp.create_namespace(ns).await.unwrap();
    cp.apply_service_account(
        ns,
        "app",
        &[(ANN, "arn:aws:iam::123456789012:role/chart-app")],
    )
    .await
    .unwrap();
    let pod = cp
        .run_pod(ns, "app-0", node, "app", &["127.0.66.1"])
        .await
        .unwrap();
    let agent = AgentProc::start(&cp, "irsa-chart", node, &moto.endpoint()).await;
    agent.wait_ready().await;
    agent.wait_role("127.0.66.1", "chart-app").await;
    let creds = agent.creds("127.0.66.1", "chart-app").await;
    assert_eq!(
        moto.caller_arn(&creds).await.unwrap(),
        "arn:aws:sts::123456789012:assumed-role/chart-app/chart.app-0"
    );

    let token = cp
        .mint_token(AGENT_NS, "irsa-chart", &[API_AUDIENCE], 600, None)
        .await
        .unwrap();
    let client = cp.client_with_token(&token, &cp.url).await.unwrap();
    let uid = pod.metadata.uid.unwrap();
    wait_for(Duration::from_secs(30), || async {
        let r = testbed::controlplane::mint_token_with(
            client.clone(),
            ns,
            "app",
            &[API_AUDIENCE],
            600,
            Some(("app-0", &uid)),
        )
        .await;
        matches!(r, Err(kube::Error::Api(s)) if s.code == 403 && s.message.contains("irsa-chart may request"))
    })
    .await
    .expect("the chart's policy never denied an apiserver-audience token");
}

/// `helm template <release>` of the chart with `sets`, applied server-side.
async fn apply_chart(cp: &ControlPlane, helm: &Path, release: &str, sets: &[&str]) {
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/chart/irsa-imds");
    let mut cmd = tokio::process::Command::new(helm);
    cmd.args(["template", release])
        .arg(&chart)
        .args(["--namespace", AGENT_NS]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    cp.apply(&String::from_utf8(out.stdout).unwrap())
        .await
        .unwrap();
}

/// kube2iam mode with namespace restrictions, under the chart's RBAC for it (`get namespaces`,
/// added only then): a pod's `iam.amazonaws.com/role: reader`, allowed by its Namespace, is
/// assumed with the pod's own token; `admin`, not allowed, is 404 with the reason logged. Under
/// the default chart's RBAC the same flags get the apiserver's refusal naming `get namespaces`,
/// and nothing is served.
#[tokio::test]
async fn kube2iam_namespace_restrictions_work_under_the_charts_rbac_for_them() {
    let Some(cp) = plane().await else { return };
    let Some(helm) = helm() else { return };
    let k2i = [
        "kube2iam.enabled=true",
        "kube2iam.namespaceRestrictions=true",
        "kube2iam.baseRoleArn=arn:aws:iam::123456789012:role/",
    ];
    apply_chart(&cp, &helm, "irsa-k2i", &k2i).await;
    apply_chart(&cp, &helm, "irsa-k2i-plain", &[]).await;
    let moto = Moto::start().await.unwrap();
    let flags = [
        "--kube2iam-annotations",
        "--namespace-restrictions",
        "--base-role-arn",
        "arn:aws:iam::123456789012:role/",
    ];
    for (release, ns, node, net) in [
        ("irsa-k2i", "k2i", "node-k2i", "127.0.67"),
        ("irsa-k2i-plain", "k2i-plain", "node-k2i-plain", "127.0.68"),
    ] {
        let namespace = serde_json::json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": ns, "annotations": {"iam.amazonaws.com/allowed-roles": "[\"reader\"]"}}});
        cp.apply(&namespace.to_string()).await.unwrap();
        cp.apply_service_account(ns, "plain", &[]).await.unwrap();
        let (reader_ip, admin_ip) = (format!("{net}.1"), format!("{net}.2"));
        for (pod, ip, role) in [
            ("reader-0", &reader_ip, "reader"),
            ("admin-0", &admin_ip, "admin"),
        ] {
            cp.run_pod(ns, pod, node, "plain", &[ip.as_str()])
                .await
                .unwrap();
            cp.kubectl(
                &[
                    "-n",
                    ns,
                    "annotate",
                    "pod",
                    pod,
                    &format!("iam.amazonaws.com/role={role}"),
                ],
                None,
            )
            .await
            .unwrap();
        }
        let agent =
            AgentProc::start_with(&cp, release, node, &moto.endpoint(), &cp.url, &flags).await;
        agent.wait_ready().await;
        if release == "irsa-k2i" {
            agent.wait_role(&reader_ip, "reader").await;
            let creds = agent.creds(&reader_ip, "reader").await;
            assert_eq!(
                moto.caller_arn(&creds).await.unwrap(),
                "arn:aws:sts::123456789012:assumed-role/reader/k2i.reader-0"
            );
            wait_for(Duration::from_secs(20), || async {
                agent.get(&admin_ip, CREDS).await.status == StatusCode::NOT_FOUND
                    && agent.log().contains("reason=\"role_not_allowed\"")
            })
            .await
            .unwrap_or_else(|e| panic!("{e}; agent log:\n{}", agent.log()));
            assert!(agent.log().contains("pod=\"admin-0\""), "{}", agent.log());
        } else {
            let needle = "cannot get resource \"namespaces\"";
            wait_for(Duration::from_secs(20), || async {
                agent.get(&reader_ip, CREDS).await;
                agent.log().replace('\\', "").contains(needle)
            })
            .await
            .unwrap_or_else(|e| panic!("{e}; agent log:\n{}", agent.log()));
            let r = agent.get(&reader_ip, &format!("{CREDS}reader")).await;
            assert_ne!(r.status, StatusCode::OK, "{}", r.text());
        }
    }
}
