//! The agent against the real third-party STS emulator (moto): what a pod is served is exactly
//! what STS issued for that pod's role, and the session names the pod. Moto's IAM authentication is
//! on when the served credentials are used, so a wrong secret or session token fails.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use http::StatusCode;
use testbed::fake_imds::FakeImds;
use testbed::harness::{Agent, NODE, wait_for};
use testbed::kube_api::{KubeApi, pod};
use testbed::moto::Moto;

const ANN: &str = "eks.amazonaws.com/role-arn";
const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

/// GetCallerIdentity signed with the served credentials: the caller's ARN, or the error code.
/// Waits until `src` is offered exactly `role`, fetches its credentials and returns the ARN moto
/// (IAM auth on) sees for them.
async fn served_as(agent: &Agent, moto: &Moto, src: &str, role: &str) -> String {
    wait_for(Duration::from_secs(15), || async {
        matches!(agent.get(src, CREDS).await, Ok(r) if r.status == StatusCode::OK && r.text() == role)
    })
    .await
    .unwrap();
    let creds = agent
        .get(src, &format!("{CREDS}{role}"))
        .await
        .unwrap()
        .json()
        .unwrap();
    moto.caller_arn(&creds).await.unwrap()
}

#[tokio::test]
async fn served_credentials_are_the_ones_sts_issued_for_each_pods_role() {
    testbed::harness::install_crypto();
    let moto = Moto::start().await.unwrap();
    let kube = KubeApi::start().await.unwrap();
    let upstream = FakeImds::start().await.unwrap();
    kube.apply_service_account(
        "shop",
        "cart",
        &[(ANN, "arn:aws:iam::123456789012:role/cart-role")],
    );
    kube.apply_service_account(
        "shop",
        "pay",
        &[(ANN, "arn:aws:iam::123456789012:role/payments/pay-role")],
    );
    kube.apply_service_account("shop", "none", &[]);
    let sts = testbed::harness::sdk_sts(moto.endpoint()).await;
    let agent = Agent::start(&kube, sts, &upstream.url(), &[])
        .await
        .unwrap();

    kube.create_pod(pod("shop", "nobody-7", NODE, "none", &["127.0.0.43"]));
    kube.create_pod(pod("shop", "cart-5d8f", NODE, "cart", &["127.0.0.41"]));
    kube.create_pod(pod("shop", "pay-0", NODE, "pay", &["127.0.0.42"]));
    for (ip, role) in [("127.0.0.41", "cart-role"), ("127.0.0.42", "pay-role")] {
        wait_for(Duration::from_secs(15), || async {
            matches!(agent.get(ip, CREDS).await, Ok(r) if r.status == StatusCode::OK && r.text() == role)
        })
        .await
        .unwrap();
    }
    let cart = agent
        .get("127.0.0.41", &format!("{CREDS}cart-role"))
        .await
        .unwrap()
        .json()
        .unwrap();
    let pay = agent
        .get("127.0.0.42", &format!("{CREDS}pay-role"))
        .await
        .unwrap()
        .json()
        .unwrap();
    moto.require_auth().await.unwrap();
    // Control: with authentication on, the key id alone is not enough.
    for (what, field, garbage) in [
        (
            "wrong secret",
            "SecretAccessKey",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        ),
        ("wrong session token", "Token", "IQoJb3JpZ2luX2VjEXAMPLE"),
    ] {
        let mut forged = cart.clone();
        forged[field] = garbage.into();
        assert!(
            moto.caller_arn(&forged).await.is_err(),
            "{what} must be refused"
        );
    }
    assert_eq!(
        moto.caller_arn(&cart).await.unwrap(),
        "arn:aws:sts::123456789012:assumed-role/cart-role/shop.cart-5d8f"
    );
    assert_eq!(
        moto.caller_arn(&pay).await.unwrap(),
        "arn:aws:sts::123456789012:assumed-role/pay-role/shop.pay-0"
    );
    assert_eq!(
        agent.get("127.0.0.43", CREDS).await.unwrap().status,
        StatusCode::NOT_FOUND
    );
    let tr = kube.token_requests();
    assert!(
        tr.iter()
            .all(|t| t.audiences == vec!["sts.amazonaws.com".to_string()])
    );
    assert!(tr.iter().any(|t| t.bound_pod_name == "cart-5d8f"));
    agent.stop().await.unwrap();
}

const K2I: &str = "iam.amazonaws.com/role";
const ALLOWED: &str = "iam.amazonaws.com/allowed-roles";

/// Captures the agent's log lines (it runs on this test's thread: `current_thread` runtime) as
/// the agent writes them in a cluster, one JSON object per line.
#[derive(Clone, Default)]
struct Logs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

thread_local! {
    static CAPTURE: std::cell::RefCell<Option<Logs>> = const { std::cell::RefCell::new(None) };
}

/// Writes to the capture of the thread the event happens on, else nowhere.
struct ThreadCapture;

impl std::io::Write for ThreadCapture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        CAPTURE.with(|c| {
            if let Some(logs) = &*c.borrow() {
                logs.0.lock().unwrap().extend_from_slice(b);
            }
        });
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    /// Captures this thread's lines from now on. One global subscriber for the process, not a
    /// scoped one per test: tracing caches callsite interest process-wide, and a scoped
    /// subscriber racing other test threads can find a span disabled (its pod fields missing).
    fn install() -> Logs {
        static INSTALLED: std::sync::Once = std::sync::Once::new();
        INSTALLED.call_once(|| {
            use tracing_subscriber::Layer;
            use tracing_subscriber::layer::SubscriberExt;
            // Without the agent's `imds` span (it is at debug, off at the production level):
            // each line must name the pod in its own fields.
            let layer = tracing_subscriber::fmt::layer()
                .with_writer(|| ThreadCapture)
                .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
                .event_format(irsa_imds_agent::telemetry::json::JsonLine::new(NODE))
                .with_filter(tracing_subscriber::filter::filter_fn(|m| {
                    *m.level() <= tracing::Level::DEBUG && !(m.is_span() && m.name() == "imds")
                }));
            tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))
                .unwrap();
        });
        let logs = Logs::default();
        CAPTURE.with(|c| *c.borrow_mut() = Some(logs.clone()));
        logs
    }

    /// The line refusing `pod` for `reason`.
    fn refusal(&self, pod: &str, reason: &str) -> Option<serde_json::Value> {
        String::from_utf8(self.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("log line parses"))
            .find(|l| l["pod"] == pod && l["reason"] == reason)
    }
}

fn annotated(
    mut p: k8s_openapi::api::core::v1::Pod,
    k: &str,
    v: &str,
) -> k8s_openapi::api::core::v1::Pod {
    p.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(k.into(), v.into());
    p
}

#[tokio::test(flavor = "current_thread")]
async fn kube2iam_annotation_gets_its_role_with_the_pods_own_token_within_namespace_rules() {
    let logs = Logs::install();
    testbed::harness::install_crypto();
    let moto = Moto::start().await.unwrap();
    let kube = KubeApi::start().await.unwrap();
    let upstream = FakeImds::start().await.unwrap();
    kube.apply_namespace("legacy", &[(ALLOWED, r#"["reader", "team/*"]"#)]);
    kube.apply_namespace("locked", &[(ALLOWED, r#"["writer"]"#)]);
    kube.apply_service_account("legacy", "plain", &[]);
    kube.apply_service_account("locked", "plain", &[]);
    kube.apply_service_account(
        "legacy",
        "irsa",
        &[(ANN, "arn:aws:iam::123456789012:role/irsa-role")],
    );
    let sts = testbed::harness::sdk_sts(moto.endpoint()).await;
    let agent = Agent::start(
        &kube,
        sts,
        &upstream.url(),
        &[
            "--kube2iam-annotations",
            "--namespace-restrictions",
            "--base-role-arn",
            "arn:aws:iam::123456789012:role/",
        ],
    )
    .await
    .unwrap();

    let reader = pod("legacy", "app-0", NODE, "plain", &["127.0.0.51"]);
    kube.create_pod(annotated(reader, K2I, "reader"));
    let outsider = pod("locked", "app-1", NODE, "plain", &["127.0.0.52"]);
    kube.create_pod(annotated(outsider, K2I, "reader"));
    let both = pod("legacy", "both-2", NODE, "irsa", &["127.0.0.53"]);
    kube.create_pod(annotated(both, K2I, "reader"));

    // A bare name under the base ARN, assumed with app-0's own ServiceAccount token.
    assert_eq!(
        served_as(&agent, &moto, "127.0.0.51", "reader").await,
        "arn:aws:sts::123456789012:assumed-role/reader/legacy.app-0"
    );
    assert!(
        kube.token_requests()
            .iter()
            .any(|t| t.bound_pod_name == "app-0"
                && t.namespace == "legacy"
                && t.service_account == "plain"
                && t.audiences == vec!["sts.amazonaws.com".to_string()]),
        "{:?}",
        kube.token_requests()
    );

    // The ServiceAccount's role wins over the pod's annotation.
    assert_eq!(
        served_as(&agent, &moto, "127.0.0.53", "irsa-role").await,
        "arn:aws:sts::123456789012:assumed-role/irsa-role/legacy.both-2"
    );
    let r = agent
        .get("127.0.0.53", &format!("{CREDS}reader"))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    // Namespace "locked" allows only "writer": 404, and the log says why, naming the pod.
    wait_for(Duration::from_secs(15), || async {
        logs.refusal("app-1", "role_not_allowed").is_some()
            || matches!(agent.get("127.0.0.52", CREDS).await, Ok(r) if r.status == StatusCode::OK)
    })
    .await
    .unwrap();
    let r = agent.get("127.0.0.52", CREDS).await.unwrap();
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let line = logs.refusal("app-1", "role_not_allowed").unwrap();
    assert_eq!(line["namespace"], "locked");
    assert_eq!(line["detail"], "arn:aws:iam::123456789012:role/reader");
    assert_eq!(line["level"], "INFO");
    assert!(
        !kube
            .token_requests()
            .iter()
            .any(|t| t.bound_pod_name == "app-1"),
        "a refused pod costs no token"
    );
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn a_roleless_pod_gets_the_default_role_only_when_one_is_set() {
    let logs = Logs::install();
    testbed::harness::install_crypto();
    let moto = Moto::start().await.unwrap();
    let kube = KubeApi::start().await.unwrap();
    let upstream = FakeImds::start().await.unwrap();
    kube.apply_service_account("addons", "plain", &[]);
    kube.create_pod(pod("addons", "dns-0", NODE, "plain", &["127.0.0.61"]));

    // Without --default-role: 404, and the routine reason at debug, naming the pod.
    let sts = testbed::harness::sdk_sts(moto.endpoint()).await;
    let agent = Agent::start(&kube, sts, &upstream.url(), &[])
        .await
        .unwrap();
    wait_for(Duration::from_secs(15), || async {
        logs.refusal("dns-0", "no_role").is_some()
            || matches!(agent.get("127.0.0.61", CREDS).await, Ok(r) if r.status == StatusCode::OK)
    })
    .await
    .unwrap();
    let r = agent.get("127.0.0.61", CREDS).await.unwrap();
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let line = logs.refusal("dns-0", "no_role").unwrap();
    assert_eq!(line["level"], "DEBUG");
    assert_eq!(line["namespace"], "addons");
    agent.stop().await.unwrap();

    // With it: the default role, assumed with the pod's own token.
    let sts = testbed::harness::sdk_sts(moto.endpoint()).await;
    let agent = Agent::start(
        &kube,
        sts,
        &upstream.url(),
        &[
            "--default-role",
            "arn:aws:iam::123456789012:role/node-addons",
        ],
    )
    .await
    .unwrap();
    assert_eq!(
        served_as(&agent, &moto, "127.0.0.61", "node-addons").await,
        "arn:aws:sts::123456789012:assumed-role/node-addons/addons.dns-0"
    );
    assert!(
        kube.token_requests()
            .iter()
            .any(|t| t.bound_pod_name == "dns-0" && t.service_account == "plain")
    );
    agent.stop().await.unwrap();
}
