//! The test bed's own promises, checked with the clients the agent uses (kube-rs, aws-sdk-sts):
//! the emulated API's field selectors, watch, TokenRequest validation and JWT claims; the STS
//! emulator's faults.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use base64::Engine as _;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::Api;
use kube::api::{ListParams, PostParams};
use testbed::kube_api::{KubeApi, pod};
use testbed::sts::{StsEmulator, StsFault};

fn token_request(name: &str, uid: &str, exp: i64) -> TokenRequest {
    TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec!["sts.amazonaws.com".into()],
            expiration_seconds: Some(exp),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(name.into()),
                uid: Some(uid.into()),
            }),
        },
        ..Default::default()
    }
}

#[tokio::test]
async fn field_selectors_scope_lists_to_a_node() {
    let kube = KubeApi::start().await.unwrap();
    kube.create_pod(pod("a", "p1", "n1", "sa", &["10.0.0.1"]));
    kube.create_pod(pod("a", "p2", "n2", "sa", &["10.0.0.2"]));
    kube.create_pod(pod("b", "p3", "n1", "sa", &["10.0.0.3"]));
    let api: Api<Pod> = Api::all(kube.client());
    let n1 = api
        .list(&ListParams::default().fields("spec.nodeName=n1"))
        .await
        .unwrap();
    let mut names: Vec<String> = n1
        .items
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    names.sort();
    assert_eq!(names, ["p1", "p3"]);
    assert_eq!(kube.counters().cluster_wide_pod_requests, 0);
    let not_n1 = api
        .list(&ListParams::default().fields("spec.nodeName!=n1"))
        .await
        .unwrap();
    assert_eq!(not_n1.items.len(), 1);
    assert!(
        api.list(&ListParams::default().fields("spec.bogus=x"))
            .await
            .is_err(),
        "unknown field: 400"
    );
    let paged = api.list(&ListParams::default().limit(1)).await.unwrap();
    assert_eq!(paged.items.len(), 1);
    assert!(paged.metadata.continue_.is_some());
}

#[tokio::test]
async fn token_requests_are_validated_and_carry_the_irsa_claims() {
    let kube = KubeApi::start().await.unwrap();
    kube.apply_service_account("ns", "app", &[]);
    let p = kube.create_pod(pod("ns", "web-0", "n1", "app", &["10.0.0.1"]));
    let uid = p.metadata.uid.clone().unwrap();
    let api: Api<ServiceAccount> = Api::namespaced(kube.client(), "ns");
    let pp = PostParams::default();
    // Wrong uid, unknown pod, unknown SA, too short: all refused.
    assert!(
        api.create_token_request("app", &pp, &token_request("web-0", "other-uid", 3600))
            .await
            .is_err()
    );
    assert!(
        api.create_token_request("app", &pp, &token_request("nope", &uid, 3600))
            .await
            .is_err()
    );
    assert!(
        api.create_token_request("missing", &pp, &token_request("web-0", &uid, 3600))
            .await
            .is_err()
    );
    assert!(
        api.create_token_request("app", &pp, &token_request("web-0", &uid, 60))
            .await
            .is_err()
    );
    let ok = api
        .create_token_request("app", &pp, &token_request("web-0", &uid, 3600))
        .await
        .unwrap();
    let jwt = ok.status.unwrap().token;
    let parts: Vec<&str> = jwt.split('.').collect();
    assert_eq!(parts.len(), 3, "header.payload.signature");
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[1])
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["sub"], "system:serviceaccount:ns:app");
    assert_eq!(claims["aud"], serde_json::json!(["sts.amazonaws.com"]));
    assert_eq!(claims["kubernetes.io"]["pod"]["uid"], uid.as_str());
    assert_eq!(claims["kubernetes.io"]["pod"]["name"], "web-0");
    assert!(claims["exp"].as_i64().unwrap() > claims["iat"].as_i64().unwrap());
    let recs = kube.token_requests();
    assert_eq!(recs.len(), 1, "only the accepted one is recorded");
    assert_eq!(recs[0].bound_pod_uid, uid);
}

#[tokio::test]
async fn sts_emulator_answers_and_fails_like_sts() {
    let sts = StsEmulator::start().await.unwrap();
    let conf = aws_sdk_sts::Config::builder()
        .behavior_version(aws_sdk_sts::config::BehaviorVersion::latest())
        .region(aws_sdk_sts::config::Region::new("us-east-1"))
        .endpoint_url(sts.endpoint())
        .retry_config(aws_sdk_sts::config::retry::RetryConfig::disabled())
        .build();
    let client = aws_sdk_sts::Client::from_conf(conf);
    let call = || {
        client
            .assume_role_with_web_identity()
            .role_arn("arn:aws:iam::123456789012:role/r")
            .role_session_name("ns.pod")
            .web_identity_token("jwt")
            .duration_seconds(3600)
            .send()
    };
    let ok = call().await.unwrap();
    let creds = ok.credentials.unwrap();
    assert!(creds.access_key_id.starts_with("ASIA"));
    assert_eq!(
        ok.assumed_role_user.unwrap().arn,
        "arn:aws:sts::123456789012:assumed-role/r/ns.pod"
    );
    for (fault, code) in [
        (StsFault::Throttling, "Throttling"),
        (StsFault::AccessDenied, "AccessDenied"),
        (StsFault::InvalidIdentityToken, "InvalidIdentityToken"),
        (StsFault::IdpCommunication, "IDPCommunicationError"),
        (StsFault::Internal, "InternalFailure"),
    ] {
        sts.fail_next(1, fault);
        let e = call().await.unwrap_err();
        assert_eq!(
            aws_sdk_sts::error::ProvideErrorMetadata::code(&e),
            Some(code)
        );
    }
    let second = call().await.unwrap().credentials.unwrap();
    assert_ne!(
        second.access_key_id, creds.access_key_id,
        "each call issues new keys"
    );
    assert_eq!(sts.call_count(), 7);
}
