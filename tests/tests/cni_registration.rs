//! CNI registrations against the real agent: the race at pod start and IP reuse (issue #4).
//! The registration socket is driven exactly as the CNI hook drives it (one JSON line per
//! connection); the hook binary itself is exercised in cni-hook's own tests and the netns suite.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use testbed::fake_imds::FakeImds;
use testbed::harness::{Agent, NODE};
use testbed::kube_api::{KubeApi, pod};
use testbed::sts::StsEmulator;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ANN: &str = "eks.amazonaws.com/role-arn";
const CREDS: &str = "/latest/meta-data/iam/security-credentials/";
const ROLES: [(&str, &str); 2] = [
    ("alpha", "arn:aws:iam::123456789012:role/alpha-role"),
    ("beta", "arn:aws:iam::123456789012:role/beta-role"),
];

async fn cni(sock: &std::path::Path, msg: serde_json::Value) -> serde_json::Value {
    let mut s = tokio::net::UnixStream::connect(sock).await.unwrap();
    let mut line = serde_json::to_vec(&msg).unwrap();
    line.push(b'\n');
    s.write_all(&line).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    serde_json::from_slice(&out).unwrap()
}

async fn add(sock: &std::path::Path, cid: &str, name: &str, ip: &str) {
    let r = cni(sock, serde_json::json!({"v":1,"op":"add","containerId":cid,"namespace":"apps","name":name,"ips":[ip]})).await;
    assert_eq!(r["ok"], true, "{r}");
}

async fn del(sock: &std::path::Path, cid: &str) {
    let r = cni(
        sock,
        serde_json::json!({"v":1,"op":"del","containerId":cid}),
    )
    .await;
    assert_eq!(r["ok"], true, "{r}");
}

struct Bed {
    kube: KubeApi,
    _sts: StsEmulator,
    _up: FakeImds,
    agent: Agent,
    sock: std::path::PathBuf,
    _dir: tempdir::Dir,
}

mod tempdir {
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

async fn bed(tag: &str) -> Bed {
    let kube = KubeApi::start().await.unwrap();
    let sts = StsEmulator::start().await.unwrap();
    let up = FakeImds::start().await.unwrap();
    for (sa, arn) in ROLES {
        kube.apply_service_account("apps", sa, &[(ANN, arn)]);
    }
    let dir = std::env::temp_dir().join(format!("irsa-cni-{tag}-{}", std::process::id()));
    let sock = dir.join("cni.sock");
    let exchange = Arc::new(
        irsa_imds_agent::identity::sts::SdkSts::with_endpoint("us-east-1".into(), sts.endpoint())
            .await,
    );
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
        _sts: sts,
        _up: up,
        agent,
        sock,
        _dir: tempdir::Dir(dir),
    }
}

/// With watch events 2 s late, every pod that registers through CNI ADD and asks at once gets its
/// own role: no 404, no other role.
#[tokio::test]
async fn pod_start_race_is_closed_by_registration() {
    let b = bed("race").await;
    b.kube.set_watch_delay(Duration::from_secs(2));
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
        add(&b.sock, &format!("sandbox{i}"), &name, &ip).await;
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

/// 10,000 DEL+ADD cycles of one IP between pods of different roles, with requests interleaved:
/// never an answer carrying the other pod's role.
#[tokio::test]
async fn ip_reuse_never_leaks_the_previous_pods_role() {
    let b = bed("reuse").await;
    let ip = "127.0.0.201";
    let mut wrong = 0;
    let mut served = 0;
    let cycles = 10_000;
    for i in 0..cycles {
        let (sa, _) = ROLES[i % 2];
        let name = format!("r{i}");
        b.kube.create_pod(pod("apps", &name, NODE, sa, &[]));
        add(&b.sock, &format!("sb{i}"), &name, ip).await;
        let r = b.agent.get(ip, CREDS).await.unwrap();
        if r.status == StatusCode::OK {
            served += 1;
            if r.text() != format!("{sa}-role") {
                wrong += 1;
            }
        }
        del(&b.sock, &format!("sb{i}")).await;
        // Between DEL and the next ADD the address belongs to nobody.
        if i % 100 == 0 {
            let gap = b.agent.get(ip, CREDS).await.unwrap();
            if gap.status == StatusCode::OK {
                wrong += 1;
            }
        }
        b.kube.delete_pod("apps", &name);
    }
    println!("reuse: {cycles} cycles, {served} served, {wrong} wrong");
    assert_eq!(wrong, 0);
    assert_eq!(served, cycles, "every pod got its own role");
}
