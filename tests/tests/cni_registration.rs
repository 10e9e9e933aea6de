//! CNI registrations against the real agent: the race at pod start and IP reuse (issue #4).
//! The race test runs the real `irsa-imds-cni` binary exactly as a container runtime does; the
//! 2,000-cycle reuse test speaks the same socket protocol directly (one JSON line per
//! connection) so it stays fast. Served credentials are compared with what the STS emulator
//! issued (role, session name, key, secret, token).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use http::StatusCode;
use testbed::cni_socket;
use testbed::fake_imds::FakeImds;
use testbed::harness::{Agent, NODE};
use testbed::kube_api::{KubeApi, pod};
use testbed::sts::StsEmulator;
use tokio::io::AsyncWriteExt;

const ANN: &str = "eks.amazonaws.com/role-arn";
const CREDS: &str = "/latest/meta-data/iam/security-credentials/";
const ROLES: [(&str, &str); 2] = [
    ("alpha", "arn:aws:iam::123456789012:role/alpha-role"),
    ("beta", "arn:aws:iam::123456789012:role/beta-role"),
];

struct Bed {
    kube: KubeApi,
    sts: StsEmulator,
    _up: FakeImds,
    agent: Agent,
    sock: std::path::PathBuf,
    _dir: testbed::util::TempDir,
}

async fn bed(tag: &str) -> Bed {
    let kube = KubeApi::start().await.unwrap();
    let sts = StsEmulator::start().await.unwrap();
    let up = FakeImds::start().await.unwrap();
    for (sa, arn) in ROLES {
        kube.apply_service_account("apps", sa, &[(ANN, arn)]);
    }
    let dir = testbed::util::TempDir::new(&format!("cni-{tag}")).unwrap();
    let sock = dir.path().join("cni.sock");
    let exchange = testbed::harness::sdk_sts(sts.endpoint()).await;
    let sock_s = sock.display().to_string();
    let agent = Agent::start(
        &kube,
        exchange,
        &up.url(),
        &[
            "--cni-socket",
            &sock_s,
            "--fetch-rate",
            "100000",
            "--max-concurrent-fetches",
            "64",
        ],
    )
    .await
    .unwrap();
    Bed {
        kube,
        sts,
        _up: up,
        agent,
        sock,
        _dir: dir,
    }
}

/// The plugin binary, built now if the sources changed (never a stale one).
fn cni_bin() -> std::path::PathBuf {
    testbed::util::workspace_bin("irsa-imds-cni").unwrap()
}

/// The credentials served to `ip` for `role` are exactly what STS issued for the pod's role to the
/// session of pod `apps/<name>`, for its ServiceAccount `sa`; a description of the mismatch if not.
async fn check_served(b: &Bed, ip: &str, sa: &str, name: &str) -> Result<(), String> {
    let r = b.agent.get(ip, &format!("{CREDS}{sa}-role")).await;
    check_reply(b, r, sa, name)
}

/// [`check_served`] for a reply already received.
fn check_reply(
    b: &Bed,
    r: anyhow::Result<testbed::harness::Reply>,
    sa: &str,
    name: &str,
) -> Result<(), String> {
    let r = r.map_err(|e| e.to_string())?;
    if r.status != StatusCode::OK {
        return Err(format!("{} {}", r.status, r.text()));
    }
    let v = r.json().map_err(|e| e.to_string())?;
    let key = v["AccessKeyId"].as_str().unwrap_or_default();
    let issued = b
        .sts
        .issued_for_key(key)
        .ok_or_else(|| format!("key {key} was never issued"))?;
    let arn = ROLES.iter().find(|(s, _)| *s == sa).map(|(_, a)| *a);
    let want = (
        arn,
        format!("apps.{name}"),
        format!("system:serviceaccount:apps:{sa}"),
    );
    let secret_ok = v["SecretAccessKey"] == issued.secret_access_key.as_str();
    let token_ok = v["Token"] == issued.session_token.as_str();
    if Some(issued.role_arn.as_str()) == want.0
        && issued.role_session_name == want.1
        && issued.subject == want.2
        && secret_ok
        && token_ok
    {
        Ok(())
    } else {
        Err(format!(
            "served {issued:?} (secret matches: {secret_ok}, token matches: {token_ok}), wanted {want:?}"
        ))
    }
}

/// What the plugin binary did with one ADD: whether it succeeded, and its stdout as JSON.
struct PluginRun {
    ok: bool,
    out: serde_json::Value,
}

/// CNI ADD through the real plugin binary (fail-closed), as the runtime runs it after the main
/// plugin, for pod `ns/name` at prevResult address `address`.
async fn plugin_run(
    sock: &std::path::Path,
    cid: &str,
    ns: &str,
    name: &str,
    address: &str,
) -> (PluginRun, serde_json::Value) {
    let conf = serde_json::json!({
        "cniVersion": "0.4.0", "name": "aws-cni", "type": "irsa-imds-cni",
        "agentSocket": sock, "timeoutMs": 2000, "failClosed": true,
        "prevResult": {"cniVersion": "0.4.0", "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/x"}],
                       "ips": [{"version": "4", "interface": 0, "address": address}], "dns": {}}
    });
    let mut child = tokio::process::Command::new(cni_bin())
        .env_clear()
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", cid)
        .env("CNI_NETNS", "/var/run/netns/x")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env("CNI_ARGS", format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID={cid}"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .await
        .unwrap();
    let out = child.wait_with_output().await.unwrap();
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}", String::from_utf8_lossy(&out.stdout));
    });
    let run = PluginRun {
        ok: out.status.success(),
        out: json,
    };
    (run, conf)
}

/// CNI ADD through the real plugin binary; it must succeed and pass prevResult through.
async fn plugin_add(sock: &std::path::Path, cid: &str, name: &str, ip: &str) {
    let (run, conf) = plugin_run(sock, cid, "apps", name, &format!("{ip}/32")).await;
    assert!(run.ok, "ADD failed: {}", run.out);
    assert_eq!(run.out, conf["prevResult"], "prevResult passed through");
}

/// The plugin and the agent share one set of validators: every edge case goes through the real
/// plugin binary (fail-closed) to the real agent socket, and the same request straight to the
/// socket. Valid: the plugin registers it and the agent holds it. Invalid: the plugin refuses it
/// as the runtime's bad input (never "agent unavailable") and the agent refuses it too.
#[tokio::test]
async fn plugin_and_agent_agree_on_every_validator_edge_case() {
    use irsa_imds_proto::edge_cases::{CONTAINER_IDS, IPS, NAMESPACES, POD_NAMES};
    let b = bed("edges").await;
    let long_id = "c".repeat(irsa_imds_proto::MAX_CONTAINER_ID);
    let too_long_id = format!("{long_id}c");
    let mut cases: Vec<(String, String, String, String, bool)> = Vec::new();
    let mut n = 0;
    let mut next = |cid: Option<&str>, ns: &str, name: &str, ip: Option<&str>, ok: bool| {
        n += 1;
        let cid = cid.map_or_else(|| format!("edge{n}"), str::to_string);
        let ip = ip.map_or_else(
            || format!("10.9.{}.{}", n / 250, 1 + n % 250),
            str::to_string,
        );
        cases.push((cid, ns.to_string(), name.to_string(), ip, ok));
    };
    for (ns, ok) in NAMESPACES {
        next(None, ns, "p", None, *ok);
    }
    for (name, ok) in POD_NAMES {
        next(None, "apps", name, None, *ok);
    }
    for (cid, ok) in CONTAINER_IDS {
        next(Some(cid), "apps", "p", None, *ok);
    }
    next(Some(&long_id), "apps", "p", None, true);
    next(Some(&too_long_id), "apps", "p", None, false);
    for (ip, ok) in IPS {
        // A prevResult address carries a prefix length; the plugin strips it.
        if !ip.contains('/') {
            next(None, "apps", "p", Some(ip), *ok);
        }
    }
    for (cid, ns, name, ip, ok) in &cases {
        let what = format!("containerId={cid:?} namespace={ns:?} name={name:?} ip={ip:?}");
        let (run, _) = plugin_run(&b.sock, cid, ns, name, &format!("{ip}/32")).await;
        assert_eq!(run.ok, *ok, "plugin: {what}: {}", run.out);
        // Straight to the socket, the same request: the agent's own verdict.
        let direct = irsa_imds_proto::Request::Add(irsa_imds_proto::Add {
            container_id: cid.clone(),
            namespace: ns.clone(),
            name: name.clone(),
            ips: vec![ip.clone()],
        });
        let msg: serde_json::Value = serde_json::from_slice(&direct.encode()).unwrap();
        let reply = cni_socket::request(&b.sock, msg).await.unwrap();
        assert_eq!(reply["ok"], *ok, "agent: {what}: {reply}");
        if *ok {
            let check = serde_json::json!({"v":1,"op":"check","containerId":cid,"ips":[ip]});
            assert_eq!(
                cni_socket::request(&b.sock, check).await.unwrap()["ok"],
                true,
                "registered: {what}"
            );
            cni_socket::del(&b.sock, cid).await;
        } else {
            // The runtime's bad input (4: CNI_ARGS/env, 7: prevResult), never 11 "try again".
            let code = run.out["code"].as_u64();
            assert!(matches!(code, Some(4 | 7)), "plugin: {what}: {}", run.out);
            assert!(
                reply["error"].as_str().unwrap_or("").contains("invalid"),
                "agent: {what}: {reply}"
            );
        }
    }
    println!("{} edge cases: plugin and agent agree", cases.len());
}

/// With watch events 2 s late, every pod that registers through CNI ADD and asks at once gets its
/// own role: no 404, no other role.
#[tokio::test]
async fn pod_start_race_is_closed_by_registration() {
    let b = bed("race").await;
    b.kube.set_watch_delay(Duration::from_secs(2));
    // Control: without a registration the 2 s watch lag does bite (404 after the bounded wait,
    // --pod-wait 750 ms by default: well before the watch event).
    b.kube
        .create_pod(pod("apps", "unregistered", NODE, "alpha", &["127.2.0.1"]));
    let t0 = std::time::Instant::now();
    assert_eq!(
        b.agent.get("127.2.0.1", CREDS).await.unwrap().status,
        StatusCode::NOT_FOUND
    );
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "the wait is bounded by --pod-wait, not by the watch: {:?}",
        t0.elapsed()
    );
    let n = 1000;
    let mut wrong = 0;
    let mut missing = 0;
    for i in 0..n {
        let (sa, _) = ROLES[i % 2];
        let name = format!("p{i}");
        // Any 127/8 address can be a source on loopback: each pod gets its own.
        let ip = format!("127.1.{}.{}", i / 250, 1 + i % 250);
        // The pod exists in the API before its sandbox (as with a real kubelet), with no IP yet.
        b.kube.create_pod(pod("apps", &name, NODE, sa, &[]));
        plugin_add(&b.sock, &format!("sandbox{i}"), &name, &ip).await;
        let r = b.agent.get(&ip, CREDS).await.unwrap();
        match (r.status == StatusCode::OK).then(|| r.text()) {
            Some(role) if role == format!("{sa}-role") => {}
            Some(_) => wrong += 1,
            None => missing += 1,
        }
    }
    println!("race: {n} pod starts, {wrong} wrong-role answers, {missing} 404s");
    assert_eq!((wrong, missing), (0, 0));
}

/// 2,000 DEL+ADD cycles of one IP between pods of different roles. Each pod carries the IP in
/// the API (as a running pod does) and is deleted gracefully (Terminating, still showing the IP,
/// until the next pod is up), and the watch lags 20 ms, so the agent's watched view keeps holding
/// older pods with this IP: only the CNI DEL's revocation (and, when a DEL is lost, the next ADD's
/// supersession) keeps the answer right. Every cycle the served credentials are checked against
/// what STS issued for that pod's session; every 10th cycle, once the watch has sent the agent the
/// old pod Terminating with the IP, the gap between DEL and the next ADD must answer nobody.
#[tokio::test]
async fn ip_reuse_never_leaks_the_previous_pods_role() {
    let b = bed("reuse").await;
    b.kube.set_watch_delay(Duration::from_millis(20));
    let ip = "127.0.0.201";
    let mut wrong = Vec::new();
    let mut gap_checks = 0;
    let mut lost_dels = 0;
    let cycles = 2_000;
    let mut previous: Option<String> = None;
    // An SDK's pooled client: one connection from the address across every cycle, asked first,
    // while it still remembers the previous pod.
    let kept = b.agent.kept_alive(ip).await.unwrap();
    let mut kept_gap_checks = 0;
    for i in 0..cycles {
        let (sa, _) = ROLES[i % 2];
        let name = format!("r{i}");
        b.kube.create_pod(pod("apps", &name, NODE, sa, &[ip]));
        cni_socket::add(&b.sock, &format!("sb{i}"), "apps", &name, ip).await;
        if let Some(prev) = previous.take() {
            // The kubelet confirms the old pod's deletion only now: its Terminating window
            // overlapped this pod's start.
            b.kube.delete_pod("apps", &prev);
        }
        let r = kept.get(&format!("{CREDS}{sa}-role")).await;
        if let Err(e) = check_reply(&b, r, sa, &name) {
            wrong.push(format!("cycle {i}, kept-alive connection: {e}"));
        }
        if let Err(e) = check_served(&b, ip, sa, &name).await {
            wrong.push(format!("cycle {i}: {e}"));
        }
        b.kube.terminate_pod("apps", &name, Duration::from_secs(30));
        // Every 7th DEL is lost (runtime crash): the next ADD must supersede the registration.
        let lost = i % 7 == 3;
        if lost {
            lost_dels += 1;
        } else {
            cni_socket::del(&b.sock, &format!("sb{i}")).await;
        }
        if i % 10 == 0 && !lost {
            // Once the watch has sent the agent this pod Terminating with the IP, the index
            // alone would name it.
            let rv = b.kube.resource_version();
            testbed::harness::wait_for(Duration::from_secs(10), || async {
                b.kube.watch_delivered() >= rv
            })
            .await
            .unwrap();
            gap_checks += 1;
            let gap = b.agent.get(ip, CREDS).await.unwrap();
            if gap.status != StatusCode::NOT_FOUND {
                wrong.push(format!(
                    "cycle {i}: gap answered {} {}",
                    gap.status,
                    gap.text()
                ));
            }
            // Over the kept connection too (less often: each waits the bounded pod wait).
            if i % 100 == 0 {
                kept_gap_checks += 1;
                let gap = kept.get(CREDS).await.unwrap();
                if gap.status != StatusCode::NOT_FOUND {
                    wrong.push(format!(
                        "cycle {i}: gap answered over the kept-alive connection {} {}",
                        gap.status,
                        gap.text()
                    ));
                }
            }
        }
        previous = Some(name);
    }
    println!(
        "reuse: {cycles} cycles, {gap_checks} gap checks ({kept_gap_checks} over the kept-alive connection, reopened {} times after idling), {lost_dels} lost DELs, {} wrong",
        kept.reconnects().await,
        wrong.len()
    );
    assert!(
        wrong.is_empty(),
        "{} wrong, first: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    assert_eq!(b.sts.issued().len(), cycles, "one STS session per pod");
}

/// CNI 1.1 GC through the real plugin: sandboxes missing from the runtime's list lose their IPs.
#[tokio::test]
async fn gc_through_the_plugin_drops_stale_sandboxes() {
    let b = bed("gc").await;
    for (name, ip, cid) in [
        ("keep", "127.4.0.1", "sb-keep"),
        ("stale", "127.4.0.2", "sb-stale"),
    ] {
        b.kube.create_pod(pod("apps", name, NODE, "alpha", &[]));
        cni_socket::add(&b.sock, cid, "apps", name, ip).await;
        assert_eq!(
            b.agent.get(ip, CREDS).await.unwrap().status,
            StatusCode::OK,
            "{name}"
        );
    }
    let conf = serde_json::json!({
        "cniVersion": "1.1.0", "name": "k8s-pod-network", "type": "irsa-imds-cni", "agentSocket": b.sock,
        "cni.dev/valid-attachments": [{"containerID": "sb-keep", "ifname": "eth0"}]
    });
    let mut child = tokio::process::Command::new(cni_bin())
        .env_clear()
        .env("CNI_COMMAND", "GC")
        .env("CNI_PATH", "/opt/cni/bin")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .await
        .unwrap();
    assert!(child.wait_with_output().await.unwrap().status.success());
    // The stale sandbox's address no longer names its pod (the pod has no IP in the API).
    assert_eq!(
        b.agent.get("127.4.0.2", CREDS).await.unwrap().status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        b.agent.get("127.4.0.1", CREDS).await.unwrap().status,
        StatusCode::OK
    );
}
