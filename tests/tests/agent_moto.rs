//! The agent against the real third-party STS emulator (moto): what a pod is served is exactly
//! what STS issued for that pod's role, and the session names the pod.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use http::StatusCode;
use testbed::fake_imds::FakeImds;
use testbed::harness::{Agent, NODE, wait_for};
use testbed::kube_api::{KubeApi, pod};
use testbed::moto::Moto;

const ANN: &str = "eks.amazonaws.com/role-arn";
const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

async fn caller_arn(moto: &Moto, v: &serde_json::Value) -> String {
    let creds = aws_credential_types::Credentials::new(
        v["AccessKeyId"].as_str().unwrap(),
        v["SecretAccessKey"].as_str().unwrap(),
        v["Token"].as_str().map(String::from),
        None,
        "irsa-imds-test",
    );
    let conf = aws_sdk_sts::Config::builder()
        .behavior_version(aws_sdk_sts::config::BehaviorVersion::latest())
        .region(aws_sdk_sts::config::Region::new("us-east-1"))
        .endpoint_url(moto.endpoint())
        .credentials_provider(creds)
        .build();
    let out = aws_sdk_sts::Client::from_conf(conf)
        .get_caller_identity()
        .send()
        .await
        .unwrap();
    out.arn.unwrap()
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
    assert_eq!(
        caller_arn(&moto, &cart).await,
        "arn:aws:sts::123456789012:assumed-role/cart-role/shop.cart-5d8f"
    );
    assert_eq!(
        caller_arn(&moto, &pay).await,
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
