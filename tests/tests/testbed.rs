//! The test bed's own promises, checked with the clients the agent uses (kube-rs, aws-sdk-sts):
//! the emulated API's field selectors, watch, TokenRequest validation, defaults and JWT claims,
//! graceful deletion; the STS emulator's token and parameter checks, OIDC key fetching and faults.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use base64::Engine as _;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::Api;
use kube::api::{ListParams, PostParams};
use testbed::kube_api::{KubeApi, pod};
use testbed::sts::{KeySource, RoleTrust, StsEmulator, StsFault, Trust};

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

fn sts_client(sts: &StsEmulator) -> aws_sdk_sts::Client {
    let conf = aws_sdk_sts::Config::builder()
        .behavior_version(aws_sdk_sts::config::BehaviorVersion::latest())
        .region(aws_sdk_sts::config::Region::new("us-east-1"))
        .endpoint_url(sts.endpoint())
        .retry_config(aws_sdk_sts::config::retry::RetryConfig::disabled())
        .build();
    aws_sdk_sts::Client::from_conf(conf)
}

const ROLE: &str = "arn:aws:iam::123456789012:role/r";

/// A ServiceAccount token for `ns/app` bound to pod web-0, from the emulated API server.
async fn sa_token(kube: &KubeApi, audiences: &[&str]) -> String {
    if kube.get_pod("ns", "web-0").is_none() {
        kube.apply_service_account("ns", "app", &[]);
        kube.create_pod(pod("ns", "web-0", "n1", "app", &["10.0.0.1"]));
    }
    let uid = kube.get_pod("ns", "web-0").unwrap().metadata.uid.unwrap();
    let mut tr = token_request("web-0", &uid, 3600);
    tr.spec.audiences = audiences.iter().map(|a| a.to_string()).collect();
    let api: Api<ServiceAccount> = Api::namespaced(kube.client(), "ns");
    api.create_token_request("app", &PostParams::default(), &tr)
        .await
        .unwrap()
        .status
        .unwrap()
        .token
}

async fn assume(
    client: &aws_sdk_sts::Client,
    role: &str,
    session: &str,
    token: &str,
    duration: i32,
) -> Result<aws_sdk_sts::types::Credentials, String> {
    client
        .assume_role_with_web_identity()
        .role_arn(role)
        .role_session_name(session)
        .web_identity_token(token)
        .duration_seconds(duration)
        .send()
        .await
        .map(|o| o.credentials.unwrap())
        .map_err(|e| {
            aws_sdk_sts::error::ProvideErrorMetadata::code(&e)
                .unwrap_or("none")
                .to_string()
        })
}

#[tokio::test]
async fn sts_emulator_answers_and_fails_like_sts() {
    let kube = KubeApi::start().await.unwrap();
    let sts = StsEmulator::start().await.unwrap();
    let client = sts_client(&sts);
    let jwt = sa_token(&kube, &["sts.amazonaws.com"]).await;
    let call = || {
        client
            .assume_role_with_web_identity()
            .role_arn(ROLE)
            .role_session_name("ns.pod")
            .web_identity_token(&jwt)
            .duration_seconds(3600)
            .send()
    };
    let ok = call().await.unwrap();
    assert_eq!(
        ok.assumed_role_user.unwrap().arn,
        "arn:aws:sts::123456789012:assumed-role/r/ns.pod"
    );
    assert_eq!(
        ok.subject_from_web_identity_token.as_deref(),
        Some("system:serviceaccount:ns:app")
    );
    let creds = ok.credentials.unwrap();
    let issued = sts.issued();
    assert_eq!(issued.len(), 1);
    assert_eq!(issued[0].access_key_id, creds.access_key_id);
    assert_eq!(issued[0].secret_access_key, creds.secret_access_key);
    assert_eq!(issued[0].session_token, creds.session_token);
    assert_eq!(
        (
            issued[0].role_arn.as_str(),
            issued[0].role_session_name.as_str()
        ),
        (ROLE, "ns.pod")
    );
    assert_eq!(issued[0].subject, "system:serviceaccount:ns:app");
    assert_eq!(creds.access_key_id.len(), 20);
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
    // Random, not counted: no shared prefix beyond "ASIA" worth speaking of, different secrets.
    assert_ne!(second.access_key_id, creds.access_key_id);
    assert_ne!(second.secret_access_key, creds.secret_access_key);
    assert_ne!(second.session_token, creds.session_token);
    assert_eq!(sts.call_count(), 7);
    assert_eq!(sts.issued().len(), 2, "refused calls issue nothing");
    let errors: Vec<Option<String>> = sts.calls().into_iter().map(|c| c.error).collect();
    assert_eq!(errors[0], None);
    assert_eq!(errors[1].as_deref(), Some("Throttling"));
}

/// The token is verified as STS does: signature by the provider's key, issuer, audience, expiry,
/// and the role's trust policy on `sub`; parameters are validated first.
#[tokio::test]
async fn sts_emulator_verifies_tokens_and_parameters() {
    let kube = KubeApi::start().await.unwrap();
    let sts = StsEmulator::start().await.unwrap();
    sts.trust_role(ROLE, RoleTrust::service_accounts(&[("ns", "app")]));
    let client = sts_client(&sts);
    let good = sa_token(&kube, &["sts.amazonaws.com"]).await;
    assert!(assume(&client, ROLE, "ns.web-0", &good, 3600).await.is_ok());

    let issuer = kube.issuer();
    let (_, claims) = testbed::jwt::decode_unverified(&good).unwrap();
    let resign = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut c = claims.clone();
        f(&mut c);
        issuer.sign(&c).unwrap()
    };
    let now = claims["iat"].as_i64().unwrap();
    // Tampered claims with the original signature.
    let (input, sig) = good.rsplit_once('.').unwrap();
    let (h, _) = input.split_once('.').unwrap();
    let mut evil = claims.clone();
    evil["sub"] = "system:serviceaccount:kube-system:admin".into();
    let tampered = format!(
        "{h}.{}.{sig}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(evil.to_string())
    );
    // Signed by a key that is not the provider's.
    let stranger = testbed::jwt::Issuer::generate(issuer.url()).unwrap();
    let foreign = stranger.sign(&claims).unwrap();
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "constant string",
            "not-a-jwt".into(),
            "InvalidIdentityToken",
        ),
        ("tampered claims", tampered, "InvalidIdentityToken"),
        ("foreign key", foreign, "InvalidIdentityToken"),
        (
            "other issuer",
            resign(&|c| c["iss"] = "https://elsewhere.example".into()),
            "InvalidIdentityToken",
        ),
        (
            "wrong audience",
            sa_token(&kube, &["vault"]).await,
            "InvalidIdentityToken",
        ),
        (
            "defaulted audience (the issuer)",
            sa_token(&kube, &[]).await,
            "InvalidIdentityToken",
        ),
        (
            "expired",
            resign(&|c| c["exp"] = (now - 10).into()),
            "ExpiredTokenException",
        ),
        (
            "not yet valid",
            resign(&|c| c["nbf"] = (now + 3600).into()),
            "InvalidIdentityToken",
        ),
        (
            "subject the role does not trust",
            resign(&|c| c["sub"] = "system:serviceaccount:ns:other".into()),
            "AccessDenied",
        ),
    ];
    for (what, token, code) in cases {
        assert_eq!(
            assume(&client, ROLE, "ns.web-0", &token, 3600)
                .await
                .err()
                .as_deref(),
            Some(code),
            "{what}"
        );
    }
    // Roles that do not exist, and parameters STS refuses before reading the token.
    for (what, role, session, duration, code) in [
        (
            "unknown role",
            "arn:aws:iam::123456789012:role/other",
            "ns.web-0",
            3600,
            "AccessDenied",
        ),
        (
            "role ARN not an ARN",
            "role/r-but-long-enough",
            "ns.web-0",
            3600,
            "ValidationError",
        ),
        (
            "role ARN too short",
            "arn:aws:iam::1:role",
            "ns.web-0",
            3600,
            "ValidationError",
        ),
        (
            "session name with a space",
            ROLE,
            "ns web-0",
            3600,
            "ValidationError",
        ),
        (
            "session name of one character",
            ROLE,
            "n",
            3600,
            "ValidationError",
        ),
        (
            "session name of 65 characters",
            ROLE,
            &"n".repeat(65),
            3600,
            "ValidationError",
        ),
        (
            "duration under 900 s",
            ROLE,
            "ns.web-0",
            899,
            "ValidationError",
        ),
        (
            "duration over 12 h",
            ROLE,
            "ns.web-0",
            43201,
            "ValidationError",
        ),
        (
            "duration over the role's maximum",
            ROLE,
            "ns.web-0",
            7200,
            "ValidationError",
        ),
    ] {
        assert_eq!(
            assume(&client, role, session, &good, duration)
                .await
                .err()
                .as_deref(),
            Some(code),
            "{what}"
        );
    }
    assert_eq!(
        sts.issued().len(),
        1,
        "only the first call issued credentials"
    );
    // Limits are inclusive.
    let sixty_four = "n".repeat(64);
    assert!(assume(&client, ROLE, &sixty_four, &good, 900).await.is_ok());
}

/// The OIDC key source: discovery document and JWKS fetched over HTTP from the issuer (here the
/// emulated API server serving its own issuer, as a kube-apiserver does).
#[tokio::test]
async fn sts_emulator_fetches_keys_from_an_oidc_issuer() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let issuer = std::sync::Arc::new(testbed::jwt::Issuer::generate(&url).unwrap());
    let kube = KubeApi::start_with_issuer(listener, issuer).await.unwrap();
    let sts = StsEmulator::start_with(KeySource::oidc(&url, None), Trust::AnyServiceAccount)
        .await
        .unwrap();
    let client = sts_client(&sts);
    let token = sa_token(&kube, &["sts.amazonaws.com"]).await;
    assert!(
        assume(&client, ROLE, "ns.web-0", &token, 3600)
            .await
            .is_ok()
    );
    // The process-wide test-bed issuer's tokens name another issuer: no provider for them.
    let other = KubeApi::start().await.unwrap();
    let token = sa_token(&other, &["sts.amazonaws.com"]).await;
    assert_eq!(
        assume(&client, ROLE, "ns.web-0", &token, 3600)
            .await
            .err()
            .as_deref(),
        Some("InvalidIdentityToken")
    );
    // An unreachable issuer: STS cannot get the keys.
    let dead = format!("http://{}", {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    });
    let sts2 = StsEmulator::start_with(KeySource::oidc(&dead, None), Trust::AnyServiceAccount)
        .await
        .unwrap();
    let forged = testbed::jwt::Issuer::generate(&dead)
        .unwrap()
        .sign(&serde_json::json!({"iss": dead, "sub": "system:serviceaccount:ns:app", "aud": "sts.amazonaws.com", "exp": 4_000_000_000i64}))
        .unwrap();
    assert_eq!(
        assume(&sts_client(&sts2), ROLE, "ns.web-0", &forged, 3600)
            .await
            .err()
            .as_deref(),
        Some("IDPCommunicationError")
    );
}

/// TokenRequest defaults and limits as the API server applies them.
#[tokio::test]
async fn token_requests_default_audience_and_clamp_expiration() {
    let kube = KubeApi::start().await.unwrap();
    kube.apply_service_account("ns", "app", &[]);
    let p = kube.create_pod(pod("ns", "web-0", "n1", "app", &["10.0.0.1"]));
    let uid = p.metadata.uid.clone().unwrap();
    let api: Api<ServiceAccount> = Api::namespaced(kube.client(), "ns");
    let pp = PostParams::default();
    let mut tr = token_request("web-0", &uid, 3600);
    tr.spec.audiences.clear();
    tr.spec.expiration_seconds = None;
    let out = api.create_token_request("app", &pp, &tr).await.unwrap();
    assert_eq!(out.spec.audiences, [testbed::jwt::TESTBED_ISSUER]);
    assert_eq!(out.spec.expiration_seconds, Some(3600), "default one hour");
    kube.set_max_token_expiration(Some(std::time::Duration::from_secs(7200)));
    let out = api
        .create_token_request("app", &pp, &token_request("web-0", &uid, 86400))
        .await
        .unwrap();
    assert_eq!(
        out.spec.expiration_seconds,
        Some(7200),
        "clamped to the max"
    );
    let (_, claims) = testbed::jwt::decode_unverified(&out.status.unwrap().token).unwrap();
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        7200
    );
    let e = api
        .create_token_request("app", &pp, &token_request("web-0", &uid, 599))
        .await
        .unwrap_err();
    assert!(matches!(e, kube::Error::Api(ref s) if s.code == 422), "{e}");
    assert!(
        api.create_token_request("app", &pp, &token_request("web-0", &uid, 600))
            .await
            .is_ok(),
        "ten minutes is the minimum, inclusive"
    );
}

/// Graceful deletion: Terminating (deletionTimestamp set, IP still shown) until the kubelet
/// confirms or the grace period ends.
#[tokio::test]
async fn deleted_pods_terminate_gracefully() {
    let kube = KubeApi::start().await.unwrap();
    kube.create_pod(pod("a", "p", "n1", "sa", &["10.0.0.7"]));
    assert!(kube.terminate_pod("a", "p", std::time::Duration::from_secs(3600)));
    let api: Api<Pod> = Api::namespaced(kube.client(), "a");
    let p = api.get("p").await.unwrap();
    assert!(p.metadata.deletion_timestamp.is_some());
    assert_eq!(p.metadata.deletion_grace_period_seconds, Some(3600));
    assert_eq!(p.status.unwrap().pod_ip.as_deref(), Some("10.0.0.7"));
    kube.delete_pod("a", "p");
    assert!(
        api.get_opt("p").await.unwrap().is_none(),
        "kubelet confirmed"
    );
    // Grace period over: gone without a confirmation.
    kube.create_pod(pod("a", "q", "n1", "sa", &["10.0.0.8"]));
    assert!(kube.terminate_pod("a", "q", std::time::Duration::from_millis(200)));
    assert!(api.get_opt("q").await.unwrap().is_some());
    testbed::harness::wait_for(std::time::Duration::from_secs(10), || async {
        api.get_opt("q").await.unwrap().is_none()
    })
    .await
    .unwrap();
    assert!(!kube.terminate_pod("a", "q", std::time::Duration::ZERO));
}
