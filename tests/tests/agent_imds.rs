//! The agent end to end on loopback: the emulated Kubernetes API, the in-process STS emulator, a
//! fake upstream IMDS, and HTTP from per-pod source addresses (127.0.0.x). What needs the real
//! parts together or a real socket: identification through the watch, the cache against STS,
//! events, passthrough, HTTP limits, hostile bytes, drain. The protocol's decisions (DESIGN §3)
//! are unit-tested from raw inputs in the agent's `imds::respond`.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use http::{Method, StatusCode};
use testbed::fake_imds::FakeImds;
use testbed::harness::{Agent, NODE, request, sdk_sts, wait_for};
use testbed::kube_api::{KubeApi, pod};
use testbed::sts::{RoleTrust, StsEmulator};

const ROLE_A: &str = "arn:aws:iam::123456789012:role/team-a/reader";
const ROLE_B: &str = "arn:aws:iam::123456789012:role/writer";
const ANN: &str = "eks.amazonaws.com/role-arn";
const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

struct Bed {
    kube: KubeApi,
    sts: StsEmulator,
    upstream: FakeImds,
    agent: Agent,
}

async fn bed(args: &[&str]) -> Bed {
    let kube = KubeApi::start().await.unwrap();
    let sts = StsEmulator::start().await.unwrap();
    // Each role trusts only its own ServiceAccount (IRSA trust policy on <issuer>:sub and :aud).
    sts.trust_role(ROLE_A, RoleTrust::service_accounts(&[("apps", "reader")]));
    sts.trust_role(ROLE_B, RoleTrust::service_accounts(&[("apps", "writer")]));
    let upstream = FakeImds::start().await.unwrap();
    kube.apply_service_account("apps", "reader", &[(ANN, ROLE_A)]);
    kube.apply_service_account("apps", "writer", &[(ANN, ROLE_B)]);
    kube.apply_service_account("apps", "plain", &[]);
    let agent = Agent::start(&kube, sdk_sts(sts.endpoint()).await, &upstream.url(), args)
        .await
        .unwrap();
    Bed {
        kube,
        sts,
        upstream,
        agent,
    }
}

/// The credential JSON pod `ip` is served for `role`.
async fn creds_json(b: &Bed, ip: &str, role: &str) -> serde_json::Value {
    b.agent
        .get(ip, &format!("{CREDS}{role}"))
        .await
        .unwrap()
        .json()
        .unwrap()
}

/// The status pod `ip` gets for `path`.
async fn status_of(b: &Bed, ip: &str, path: &str) -> StatusCode {
    b.agent.get(ip, path).await.unwrap().status
}

/// Creates a running pod of this node with a role and waits until the agent identifies it.
/// (A pod without a role cannot be waited on this way: create it before one that has a role;
/// the watch delivers in order.)
async fn add_pod(b: &Bed, name: &str, sa: &str, ip: &str) {
    b.kube.create_pod(pod("apps", name, NODE, sa, &[ip]));
    b.agent
        .wait_served(ip, CREDS, Duration::from_secs(10))
        .await
        .unwrap();
}

#[tokio::test]
async fn credentials_have_exactly_the_ec2_fields_and_formats() {
    let b = bed(&[]).await;
    add_pod(&b, "a", "reader", "127.0.0.12").await;
    let r = b
        .agent
        .get("127.0.0.12", &format!("{CREDS}reader"))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["content-type"], "text/plain");
    let v = r.json().unwrap();
    let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(|s| s.as_str()).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "AccessKeyId",
            "Code",
            "Expiration",
            "LastUpdated",
            "SecretAccessKey",
            "Token",
            "Type"
        ]
    );
    assert_eq!(v["Code"], "Success");
    assert_eq!(v["Type"], "AWS-HMAC");
    for f in ["Expiration", "LastUpdated"] {
        let s = v[f].as_str().unwrap();
        assert_eq!(s.len(), 20, "{f}={s}");
        assert!(
            s.ends_with('Z') && s.as_bytes()[10] == b'T' && !s.contains('.'),
            "{f}={s}"
        );
    }
    // What STS issued for this pod's role, nothing else: the served key, secret and session token
    // are the ones STS issued to the pod's session, for the pod's ServiceAccount token.
    let calls = b.sts.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].role_arn, ROLE_A);
    assert_eq!(calls[0].role_session_name, "apps.a");
    let issued = b.sts.issued();
    assert_eq!(issued.len(), 1);
    assert_eq!(v["AccessKeyId"], issued[0].access_key_id.as_str());
    assert!(
        v["SecretAccessKey"] == issued[0].secret_access_key.as_str(),
        "served secret is not the issued one"
    );
    assert!(
        v["Token"] == issued[0].session_token.as_str(),
        "served token is not the issued one"
    );
    assert_eq!(
        (
            issued[0].role_arn.as_str(),
            issued[0].role_session_name.as_str(),
            issued[0].subject.as_str()
        ),
        (ROLE_A, "apps.a", "system:serviceaccount:apps:reader")
    );
    // The token STS was given is the one the API server issued for this pod (bound to it).
    let (_, claims) = testbed::jwt::decode_unverified(&calls[0].web_identity_token).unwrap();
    assert_eq!(claims["kubernetes.io"]["pod"]["name"], "a");
    // Another name under the listing: 404.
    let r = b
        .agent
        .get("127.0.0.12", &format!("{CREDS}writer"))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn two_pods_two_roles_and_a_pod_without_role_gets_none() {
    let b = bed(&[]).await;
    b.kube
        .create_pod(pod("apps", "c", NODE, "plain", &["127.0.0.23"]));
    add_pod(&b, "a", "reader", "127.0.0.21").await;
    add_pod(&b, "b", "writer", "127.0.0.22").await;
    let a = creds_json(&b, "127.0.0.21", "reader").await;
    let w = creds_json(&b, "127.0.0.22", "writer").await;
    assert_ne!(a["AccessKeyId"], w["AccessKeyId"]);
    // Each pod sees only its own role.
    assert_eq!(
        status_of(&b, "127.0.0.21", &format!("{CREDS}writer")).await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        status_of(&b, "127.0.0.22", &format!("{CREDS}reader")).await,
        StatusCode::NOT_FOUND
    );
    // The pod without a role: nothing, and never the node's role.
    let none = b.agent.get("127.0.0.23", CREDS).await.unwrap();
    assert_eq!(none.status, StatusCode::NOT_FOUND);
    assert!(!none.text().contains("node-role"));
    let none = b
        .agent
        .get("127.0.0.23", &format!("{CREDS}node-role"))
        .await
        .unwrap();
    assert_eq!(none.status, StatusCode::NOT_FOUND);
    assert!(!none.text().contains("ASIANODEROLEDONOTUSE"));
    assert!(
        b.upstream
            .requests()
            .iter()
            .all(|(_, p)| !p.contains("/iam/")),
        "node iam never asked upstream"
    );
    let roles: Vec<String> = b.sts.calls().into_iter().map(|c| c.role_arn).collect();
    assert!(roles.contains(&ROLE_A.to_string()) && roles.contains(&ROLE_B.to_string()));
}

#[tokio::test]
async fn unknown_caller_gets_404_after_a_bounded_wait() {
    let b = bed(&["--pod-wait", "200ms"]).await;
    let t0 = std::time::Instant::now();
    let r = b.agent.get("127.0.0.99", CREDS).await.unwrap();
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(
        t0.elapsed() >= Duration::from_millis(200),
        "waited for a registration first"
    );
    // Bounded: the wait ends at --pod-wait (generous margin for a loaded machine; an unbounded
    // wait would hang until the client gives up).
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "bounded by --pod-wait: {:?}",
        t0.elapsed()
    );
}

#[tokio::test]
async fn host_network_pod_is_never_identified() {
    let b = bed(&[]).await;
    let mut p = pod("apps", "h", NODE, "reader", &["127.0.0.31"]);
    p.spec.as_mut().unwrap().host_network = Some(true);
    b.kube.create_pod(p);
    add_pod(&b, "marker", "reader", "127.0.0.32").await; // the watch has passed the hostNetwork pod
    assert_eq!(
        status_of(&b, "127.0.0.31", CREDS).await,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn head_has_no_body_and_allow_listed_metadata_is_passed_through_with_imdsv2() {
    let b = bed(&[]).await;
    add_pod(&b, "a", "reader", "127.0.0.61").await;
    let src = "127.0.0.61".parse().unwrap();
    let head = request(b.agent.imds, src, Method::HEAD, CREDS, &[])
        .await
        .unwrap();
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
    for p in ["/latest/user-data", "/latest/meta-data/local-ipv4"] {
        assert_eq!(
            status_of(&b, "127.0.0.61", p).await,
            StatusCode::NOT_FOUND,
            "{p}"
        );
    }
    let region = b
        .agent
        .get("127.0.0.61", "/latest/meta-data/placement/region")
        .await
        .unwrap();
    assert_eq!(
        (region.status, region.text().as_str()),
        (StatusCode::OK, "us-east-1")
    );
    let seen: Vec<String> = b.upstream.requests().into_iter().map(|(_, p)| p).collect();
    assert!(
        seen.iter().any(|p| p == "/latest/api/token"),
        "upstream spoken to with IMDSv2: {seen:?}"
    );
    assert!(
        seen.iter()
            .all(|p| !p.contains("user-data") && !p.contains("local-ipv4"))
    );
}

#[tokio::test]
async fn role_that_cannot_be_assumed_answers_like_ec2_and_raises_an_event() {
    let b = bed(&[]).await;
    b.sts.deny_role(ROLE_B);
    add_pod(&b, "b", "writer", "127.0.0.71").await;
    let r = b
        .agent
        .get("127.0.0.71", &format!("{CREDS}writer"))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json().unwrap();
    assert_eq!(v["Code"], "AssumeRoleUnauthorizedAccess");
    assert!(
        v.get("AccessKeyId").is_none()
            && v.get("Token").is_none()
            && v.get("SecretAccessKey").is_none()
    );
    wait_for(Duration::from_secs(10), || async {
        b.kube.counters().events_created >= 1
    })
    .await
    .unwrap();
    // Refusals are not hammered: more requests, no more STS calls for a while.
    let before = b.sts.call_count();
    for _ in 0..5 {
        b.agent
            .get("127.0.0.71", &format!("{CREDS}writer"))
            .await
            .unwrap();
    }
    assert_eq!(b.sts.call_count(), before);
}

#[tokio::test]
async fn concurrent_first_requests_cost_one_token_request_and_one_sts_call() {
    let b = bed(&[]).await;
    b.kube
        .create_pod(pod("apps", "burst", NODE, "reader", &["127.0.0.81"]));
    let to = b.agent.imds;
    let path = format!("{CREDS}reader");
    let reqs = (0..200).map(|_| {
        let path = path.clone();
        tokio::spawn(async move {
            request(to, "127.0.0.81".parse().unwrap(), Method::GET, &path, &[]).await
        })
    });
    let mut keys = std::collections::HashSet::new();
    for r in futures::future::join_all(reqs).await {
        let r = r.unwrap().unwrap();
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        keys.insert(
            r.json().unwrap()["AccessKeyId"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(keys.len(), 1);
    assert_eq!(b.kube.counters().token_requests, 1);
    assert_eq!(b.sts.call_count(), 1);
}

#[tokio::test]
async fn pod_is_prefetched_before_its_first_request() {
    let b = bed(&[]).await;
    b.kube
        .create_pod(pod("apps", "early", NODE, "reader", &["127.0.0.91"]));
    wait_for(Duration::from_secs(10), || async {
        b.sts.call_count() == 1
    })
    .await
    .unwrap();
    let r = b
        .agent
        .get("127.0.0.91", &format!("{CREDS}reader"))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(b.sts.call_count(), 1, "the first request was a cache hit");
}

#[tokio::test]
async fn deleted_pod_is_forgotten_and_its_ip_reused_by_another_role_gets_only_that_role() {
    let b = bed(&[]).await;
    add_pod(&b, "old", "reader", "127.0.0.101").await;
    let old = creds_json(&b, "127.0.0.101", "reader").await;
    b.kube.delete_pod("apps", "old");
    wait_for(Duration::from_secs(10), || async {
        matches!(b.agent.get("127.0.0.101", CREDS).await, Ok(r) if r.status == StatusCode::NOT_FOUND)
    })
    .await
    .unwrap();
    add_pod(&b, "new", "writer", "127.0.0.101").await;
    let listing = b.agent.get("127.0.0.101", CREDS).await.unwrap();
    assert_eq!(listing.text(), "writer");
    let new = creds_json(&b, "127.0.0.101", "writer").await;
    assert_ne!(new["AccessKeyId"], old["AccessKeyId"]);
    assert_eq!(
        status_of(&b, "127.0.0.101", &format!("{CREDS}reader")).await,
        StatusCode::NOT_FOUND
    );
    let last = b.sts.calls().pop().unwrap();
    assert_eq!(
        (last.role_arn.as_str(), last.role_session_name.as_str()),
        (ROLE_B, "apps.new")
    );
}

/// An SDK's pooled client keeps its connection: what the agent remembers on it between requests
/// never outlives a change. The pod's deletion, its address's reuse by a pod of another role,
/// and a role change are each seen over the same connection as over new ones.
#[tokio::test]
async fn a_kept_alive_connection_sees_each_change_like_a_new_one() {
    let b = bed(&["--sa-cache-ttl", "1s"]).await;
    let ip = "127.0.0.116";
    add_pod(&b, "kept", "reader", ip).await;
    let conn = b.agent.kept_alive(ip).await.unwrap();
    let key = |r: &testbed::harness::Reply| r.json().unwrap()["AccessKeyId"].clone();
    let first = conn.get(&format!("{CREDS}reader")).await.unwrap();
    assert_eq!(first.status, StatusCode::OK);
    let again = conn.get(&format!("{CREDS}reader")).await.unwrap();
    assert_eq!(key(&again), key(&first));
    assert_eq!(
        key(&again),
        creds_json(&b, ip, "reader").await["AccessKeyId"]
    );

    b.kube.delete_pod("apps", "kept");
    wait_for(Duration::from_secs(10), || async {
        matches!(conn.get(CREDS).await, Ok(r) if r.status == StatusCode::NOT_FOUND)
    })
    .await
    .unwrap();
    assert_eq!(status_of(&b, ip, CREDS).await, StatusCode::NOT_FOUND);

    add_pod(&b, "next", "writer", ip).await;
    assert_eq!(conn.get(CREDS).await.unwrap().text(), "writer");
    let writer = conn.get(&format!("{CREDS}writer")).await.unwrap();
    assert_eq!(writer.status, StatusCode::OK);
    assert_ne!(key(&writer), key(&first));
    assert_eq!(
        key(&writer),
        creds_json(&b, ip, "writer").await["AccessKeyId"]
    );
    let old_role = conn.get(&format!("{CREDS}reader")).await.unwrap();
    assert_eq!(old_role.status, StatusCode::NOT_FOUND);
    let last = b.sts.calls().pop().unwrap();
    assert_eq!(
        (last.role_arn.as_str(), last.role_session_name.as_str()),
        (ROLE_B, "apps.next")
    );

    // The reader role is made to trust the writer ServiceAccount too, as the annotation's owner
    // would do in IAM.
    b.sts.trust_role(
        ROLE_A,
        RoleTrust::service_accounts(&[("apps", "reader"), ("apps", "writer")]),
    );
    b.kube
        .apply_service_account("apps", "writer", &[(ANN, ROLE_A)]);
    wait_for(Duration::from_secs(10), || async {
        matches!(conn.get(CREDS).await, Ok(r) if r.text() == "reader")
    })
    .await
    .unwrap();
    let reader = conn.get(&format!("{CREDS}reader")).await.unwrap();
    assert_eq!(reader.status, StatusCode::OK);
    assert_ne!(key(&reader), key(&first));
    assert_eq!(
        key(&reader),
        creds_json(&b, ip, "reader").await["AccessKeyId"]
    );
    let last = b.sts.calls().pop().unwrap();
    assert_eq!(
        (last.role_arn.as_str(), last.role_session_name.as_str()),
        (ROLE_A, "apps.next")
    );
    let old_role = conn.get(&format!("{CREDS}writer")).await.unwrap();
    assert_eq!(old_role.status, StatusCode::NOT_FOUND);
    println!("reconnects: {}", conn.reconnects().await);
}

#[tokio::test]
async fn terminated_pod_ip_never_matches() {
    let b = bed(&[]).await;
    add_pod(&b, "job", "reader", "127.0.0.111").await;
    b.kube.update_pod("apps", "job", |p| {
        p.status.as_mut().unwrap().phase = Some("Succeeded".into())
    });
    wait_for(Duration::from_secs(10), || async {
        matches!(b.agent.get("127.0.0.111", CREDS).await, Ok(r) if r.status == StatusCode::NOT_FOUND)
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn only_this_nodes_pods_are_watched_and_ops_endpoints_answer() {
    let b = bed(&[]).await;
    b.kube.create_pod(pod(
        "apps",
        "elsewhere",
        "node-2",
        "reader",
        &["127.0.0.121"],
    ));
    add_pod(&b, "here", "reader", "127.0.0.122").await;
    assert_eq!(
        status_of(&b, "127.0.0.121", CREDS).await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        b.kube.counters().cluster_wide_pod_requests,
        0,
        "no cluster-wide pod list or watch"
    );
    let src = "127.0.0.1".parse().unwrap();
    assert_eq!(
        request(b.agent.ops, src, Method::GET, "/healthz", &[])
            .await
            .unwrap()
            .status,
        StatusCode::OK
    );
    assert_eq!(
        request(b.agent.ops, src, Method::GET, "/readyz", &[])
            .await
            .unwrap()
            .status,
        StatusCode::OK
    );
    let m = request(b.agent.ops, src, Method::GET, "/metrics", &[])
        .await
        .unwrap()
        .text();
    assert!(m.contains("irsa_imds_requests_total"), "{m}");
    assert!(m.contains("irsa_imds_sts_calls_total"), "{m}");
    assert!(!m.contains("ASIA"), "no secrets in metrics");
}

#[tokio::test]
async fn shutdown_drains_and_returns_cleanly() {
    let b = bed(&[]).await;
    add_pod(&b, "a", "reader", "127.0.0.131").await;
    let imds = b.agent.imds;
    b.agent.stop().await.unwrap();
    assert!(
        tokio::net::TcpStream::connect(imds).await.is_err(),
        "listener closed after shutdown"
    );
}

#[tokio::test]
async fn rust_sdk_imds_provider_gets_the_pods_credentials() {
    use aws_credential_types::provider::ProvideCredentials;
    for mode in ["optional", "required"] {
        let b = bed(&["--imds-v2", mode]).await;
        // The Rust SDK connects from 127.0.0.1: that address is this pod's.
        add_pod(&b, "rusty", "reader", "127.0.0.1").await;
        let client = aws_config::imds::client::Client::builder()
            .endpoint(b.agent.url())
            .unwrap()
            .build();
        let provider = aws_config::imds::credentials::ImdsCredentialsProvider::builder()
            .imds_client(client)
            .build();
        let creds = provider.provide_credentials().await.unwrap();
        let issued = b.sts.calls();
        assert_eq!(issued.len(), 1, "{mode}");
        assert!(creds.access_key_id().starts_with("ASIA"), "{mode}");
        assert!(creds.session_token().is_some());
        assert!(creds.expiry().is_some());
    }
}

#[tokio::test]
async fn role_annotation_change_is_seen_within_the_cache_ttl() {
    let b = bed(&["--sa-cache-ttl", "1s"]).await;
    add_pod(&b, "a", "reader", "127.0.0.141").await;
    // The writer role is made to trust the reader ServiceAccount too, as the annotation's owner
    // would do in IAM.
    b.sts.trust_role(
        ROLE_B,
        RoleTrust::service_accounts(&[("apps", "writer"), ("apps", "reader")]),
    );
    b.kube
        .apply_service_account("apps", "reader", &[(ANN, ROLE_B)]);
    wait_for(Duration::from_secs(10), || async {
        matches!(b.agent.get("127.0.0.141", CREDS).await, Ok(r) if r.text() == "writer")
    })
    .await
    .unwrap();
    let c = creds_json(&b, "127.0.0.141", "writer").await;
    assert_eq!(c["Code"], "Success");
    assert_eq!(b.sts.calls().last().unwrap().role_arn, ROLE_B);
}

#[tokio::test]
async fn agent_recovers_from_an_expired_watch() {
    let b = bed(&[]).await;
    add_pod(&b, "before", "reader", "127.0.0.151").await;
    let lists = b.kube.counters().pod_lists;
    b.kube.expire_watches();
    b.kube
        .create_pod(pod("apps", "after", NODE, "writer", &["127.0.0.152"]));
    wait_for(Duration::from_secs(20), || async {
        matches!(b.agent.get("127.0.0.152", CREDS).await, Ok(r) if r.text() == "writer")
    })
    .await
    .unwrap();
    // The 410 makes the agent relist (after its backoff); it keeps serving meanwhile.
    wait_for(Duration::from_secs(20), || async {
        b.kube.counters().pod_lists > lists
    })
    .await
    .unwrap();
    assert_eq!(
        b.agent.get("127.0.0.151", CREDS).await.unwrap().text(),
        "reader"
    );
}

/// One pod, one request: a failing TokenRequest (500) and a throttled STS call are both retried
/// inside that one fetch (3 attempts), so the single GET succeeds; the counts show exactly the
/// retries, nothing polled.
#[tokio::test]
async fn throttling_and_api_errors_are_retried() {
    let b = bed(&[]).await;
    b.sts.fail_next(1, testbed::sts::StsFault::Throttling);
    b.kube.set_token_fault(Some(testbed::kube_api::Fault {
        status: 500,
        remaining: Some(1),
    }));
    b.kube
        .create_pod(pod("apps", "flaky", NODE, "reader", &["127.0.0.161"]));
    // Exactly one request (it waits for the pod and for the fetch the pod's arrival started).
    let r = b
        .agent
        .get("127.0.0.161", &format!("{CREDS}reader"))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json().unwrap()["Code"], "Success");
    let calls = b.sts.calls();
    let errors: Vec<Option<&str>> = calls.iter().map(|c| c.error.as_deref()).collect();
    assert_eq!(
        errors,
        [Some("Throttling"), None],
        "one throttled call, then success"
    );
    assert_eq!(
        b.kube.counters().token_requests,
        3,
        "one failed TokenRequest, one per STS attempt after it"
    );
    assert_eq!(b.sts.issued().len(), 1);
}

#[tokio::test]
async fn hostile_http_gets_errors_and_the_agent_keeps_serving() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let b = bed(&[]).await;
    add_pod(&b, "a", "reader", "127.0.0.171").await;
    let raw = |bytes: Vec<u8>| {
        let to = b.agent.imds;
        async move {
            let mut s = tokio::net::TcpStream::connect(to).await.unwrap();
            let _ = s.write_all(&bytes).await;
            let mut out = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
            String::from_utf8_lossy(&out).into_owned()
        }
    };
    let huge = format!(
        "GET {CREDS} HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    assert!(
        raw(huge.into_bytes()).await.starts_with("HTTP/1.1 431"),
        "oversized head refused"
    );
    let garbage = raw(b"\x16\x03\x01\x00\xa5garbage\r\n\r\n".to_vec()).await;
    assert!(
        garbage.is_empty() || garbage.starts_with("HTTP/1.1 400"),
        "{garbage:?}"
    );
    let bad_path = raw(
        b"GET /latest/meta-data/iam/security-credentials/%00 HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
    )
    .await;
    assert!(bad_path.starts_with("HTTP/1.1 404"), "{bad_path:?}");
    let long = raw(format!(
        "GET /latest/{} HTTP/1.1\r\nHost: x\r\n\r\n",
        "x".repeat(2000)
    )
    .into_bytes())
    .await;
    assert!(long.starts_with("HTTP/1.1 414"), "{long:?}");
    let r = b.agent.get("127.0.0.171", CREDS).await.unwrap();
    assert_eq!(
        (r.status, r.text().as_str()),
        (StatusCode::OK, "reader"),
        "still serving"
    );
}

#[tokio::test]
async fn not_ready_until_the_pod_list_succeeds() {
    let kube = KubeApi::start().await.unwrap();
    let sts = StsEmulator::start().await.unwrap();
    let upstream = FakeImds::start().await.unwrap();
    kube.apply_service_account("apps", "reader", &[(ANN, ROLE_A)]);
    kube.create_pod(pod("apps", "a", NODE, "reader", &["127.0.0.181"]));
    kube.set_list_fault(Some(testbed::kube_api::Fault {
        status: 500,
        remaining: None,
    }));
    let agent = Agent::spawn(&kube, sdk_sts(sts.endpoint()).await, &upstream.url(), &[])
        .await
        .unwrap();
    // The agent has tried (and failed) to list at least twice: still not ready, serves nothing.
    wait_for(Duration::from_secs(20), || async {
        kube.counters().cluster_wide_pod_requests == 0 && kube_list_attempts(&kube) >= 2
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}", kube.counters()));
    assert_eq!(agent.ready().await, Some(StatusCode::SERVICE_UNAVAILABLE));
    assert_eq!(
        agent.get("127.0.0.181", CREDS).await.unwrap().status,
        StatusCode::NOT_FOUND
    );
    kube.set_list_fault(None);
    let r = agent.wait_ready(Duration::from_secs(30)).await;
    assert!(r.is_ok(), "{:?} {:?}", kube.counters(), agent.ready().await);
    wait_for(Duration::from_secs(10), || async {
        matches!(agent.get("127.0.0.181", CREDS).await, Ok(r) if r.status == StatusCode::OK)
    })
    .await
    .unwrap();
}

/// Pod list requests the emulator answered (failed ones included).
fn kube_list_attempts(kube: &KubeApi) -> u64 {
    kube.counters().pod_list_attempts
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish() {
    let b = bed(&[]).await;
    b.sts.set_latency(Duration::from_millis(1500));
    b.kube
        .create_pod(pod("apps", "slow", NODE, "reader", &["127.0.0.191"]));
    // Known to the agent (token issued to the pod) before the slow credential request starts.
    b.agent
        .wait_served(
            "127.0.0.191",
            "/latest/meta-data/iam/info",
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let found = |m: &irsa_imds_agent::telemetry::Metrics| {
        m.encode()
            .lines()
            .find(|l| l.starts_with("irsa_imds_pod_lookups_total{result=\"found\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = found(&b.agent.metrics);
    let to = b.agent.imds;
    let in_flight = tokio::spawn(async move {
        request(
            to,
            "127.0.0.191".parse().unwrap(),
            Method::GET,
            &format!("{CREDS}reader"),
            &[],
        )
        .await
    });
    // The request has been identified and waits on the slow STS call when shutdown starts.
    wait_for(Duration::from_secs(10), || async {
        found(&b.agent.metrics) > before
    })
    .await
    .unwrap();
    assert!(b.sts.call_count() >= 1);
    b.agent.stop().await.unwrap();
    let r = in_flight.await.unwrap().unwrap();
    assert_eq!(r.status, StatusCode::OK, "drained, not cut: {}", r.text());
    assert!(
        tokio::net::TcpStream::connect(to).await.is_err(),
        "no new connections"
    );
}
