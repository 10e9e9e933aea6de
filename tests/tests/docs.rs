//! The docs' examples that can run here do run: the install guide's trust policy
//! (`docs/examples/trust-policy.json`, shown verbatim in `docs/install.md`) is the policy the STS
//! emulator evaluates, and it admits exactly the ServiceAccount it names; the trust statement the
//! kube2iam migration guide adds admits the annotated pod's ServiceAccount and no other.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use testbed::fake_imds::FakeImds;
use testbed::harness::{Agent, NODE, wait_for};
use testbed::kube_api::{KubeApi, pod};
use testbed::sts::{RoleTrust, StsEmulator};

/// The example cluster's OIDC provider in the docs, and the role they create.
const DOCS_PROVIDER: &str = "oidc.eks.us-west-2.amazonaws.com/id/EXAMPLED539D4633E53DE1B71EXAMPLE";
const DOCS_ROLE: &str = "arn:aws:iam::111122223333:role/billing-legacy";
const CREDS: &str = "/latest/meta-data/iam/security-credentials/billing-legacy";

fn doc(path: &str) -> String {
    std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(path),
    )
    .unwrap()
}

/// The test bed's provider (its issuer URL without the scheme).
fn testbed_provider() -> &'static str {
    testbed::jwt::TESTBED_ISSUER
        .strip_prefix("https://")
        .unwrap()
}

/// The docs' policy for the test bed's provider: only the provider's name changes.
fn docs_policy_here() -> serde_json::Value {
    let text = doc("docs/examples/trust-policy.json");
    assert_eq!(text.matches(DOCS_PROVIDER).count(), 3, "{text}");
    serde_json::from_str(&text.replace(DOCS_PROVIDER, testbed_provider())).unwrap()
}

#[test]
fn install_guide_shows_the_trust_policy_file_verbatim() {
    let file = doc("docs/examples/trust-policy.json");
    let guide = doc("docs/install.md");
    let start = guide.find("```json\n{\n  \"Version\"").unwrap() + "```json\n".len();
    let end = start + guide[start..].find("```").unwrap();
    assert_eq!(guide[start..end].trim(), file.trim());
}

#[test]
fn trust_policy_conditions_are_the_ones_the_guide_explains() {
    let t = RoleTrust::from_policy(&docs_policy_here(), testbed_provider()).unwrap();
    assert_eq!(
        t.subjects.iter().collect::<Vec<_>>(),
        ["system:serviceaccount:legacy:billing"]
    );
    assert_eq!(t.audience, "sts.amazonaws.com");
    // Without the `sub` pin the policy would trust every ServiceAccount: refused, not guessed.
    let mut loose = docs_policy_here();
    let eq = loose["Statement"][0]["Condition"]["StringEquals"]
        .as_object_mut()
        .unwrap();
    eq.retain(|k, _| k.ends_with(":aud"));
    let e = RoleTrust::from_policy(&loose, testbed_provider()).unwrap_err();
    assert!(e.to_string().contains(":sub condition missing"), "{e}");
    // Another cluster's provider is not this one.
    let e = RoleTrust::from_policy(&docs_policy_here(), DOCS_PROVIDER).unwrap_err();
    assert!(e.to_string().contains("Principal.Federated"), "{e}");
}

/// The agent's token for a pod of `legacy/billing` satisfies the docs' policy; the same role named
/// by another ServiceAccount's annotation is refused by STS, and that pod gets the EC2 answer for
/// an unassumable role.
#[tokio::test]
async fn install_guide_trust_policy_admits_exactly_its_service_account() {
    let kube = KubeApi::start().await.unwrap();
    let sts = StsEmulator::start().await.unwrap();
    let upstream = FakeImds::start().await.unwrap();
    sts.trust_role(
        DOCS_ROLE,
        RoleTrust::from_policy(&docs_policy_here(), testbed_provider()).unwrap(),
    );
    let ann = "eks.amazonaws.com/role-arn";
    kube.apply_service_account("legacy", "billing", &[(ann, DOCS_ROLE)]);
    kube.apply_service_account("legacy", "intruder", &[(ann, DOCS_ROLE)]);
    let exchange = Arc::new(
        irsa_imds_agent::identity::sts::SdkSts::with_endpoint("us-east-1".into(), sts.endpoint())
            .await,
    );
    let agent = Agent::start(&kube, exchange, &upstream.url(), &[])
        .await
        .unwrap();
    kube.create_pod(pod("legacy", "billing-0", NODE, "billing", &["127.0.0.31"]));
    kube.create_pod(pod(
        "legacy",
        "intruder-0",
        NODE,
        "intruder",
        &["127.0.0.32"],
    ));

    let code = |ip: &'static str| {
        let agent = &agent;
        async move {
            let r = agent.get(ip, CREDS).await.ok()?;
            if r.status != http::StatusCode::OK {
                return None;
            }
            r.json().ok()?["Code"].as_str().map(str::to_string)
        }
    };
    wait_for(Duration::from_secs(15), || async {
        code("127.0.0.31").await.is_some() && code("127.0.0.32").await.is_some()
    })
    .await
    .unwrap();
    assert_eq!(code("127.0.0.31").await.as_deref(), Some("Success"));
    assert_eq!(
        code("127.0.0.32").await.as_deref(),
        Some("AssumeRoleUnauthorizedAccess")
    );
    let issued = sts.issued();
    assert_eq!(issued.len(), 1, "{issued:?}");
    assert_eq!(issued[0].subject, "system:serviceaccount:legacy:billing");
    agent.stop().await.unwrap();
}

/// The statement the kube2iam migration guide tells operators to add, for the test bed's provider.
fn migration_statement_here() -> serde_json::Value {
    let guide = doc("docs/kube2iam-migration.md");
    let start = guide.find("```json\n{\n  \"Effect\"").unwrap() + "```json\n".len();
    let end = start + guide[start..].find("```").unwrap();
    let text = &guide[start..end];
    assert_eq!(text.matches(DOCS_PROVIDER).count(), 3, "{text}");
    let statement: serde_json::Value =
        serde_json::from_str(&text.replace(DOCS_PROVIDER, testbed_provider())).unwrap();
    serde_json::json!({"Version": "2012-10-17", "Statement": [statement]})
}

/// kube2iam mode: the role a pod's `iam.amazonaws.com/role` names (a bare name under the base
/// ARN) is assumed with the pod's own token, so the guide's statement is what lets a pod of
/// `legacy` running as `default` have it; a pod of another namespace naming the same role gets the
/// EC2 answer for an unassumable role, never the role.
#[tokio::test]
async fn migration_guide_trust_statement_admits_the_annotated_pods_service_account_only() {
    let kube = KubeApi::start().await.unwrap();
    let sts = StsEmulator::start().await.unwrap();
    let upstream = FakeImds::start().await.unwrap();
    let role = "arn:aws:iam::111122223333:role/reader";
    sts.trust_role(
        role,
        RoleTrust::from_policy(&migration_statement_here(), testbed_provider()).unwrap(),
    );
    kube.apply_service_account("legacy", "default", &[]);
    kube.apply_service_account("other", "default", &[]);
    let exchange = Arc::new(
        irsa_imds_agent::identity::sts::SdkSts::with_endpoint("us-east-1".into(), sts.endpoint())
            .await,
    );
    let agent = Agent::start(
        &kube,
        exchange,
        &upstream.url(),
        &[
            "--kube2iam-annotations",
            "--base-role-arn",
            "arn:aws:iam::111122223333:role/",
        ],
    )
    .await
    .unwrap();
    for (ns, name, ip) in [
        ("legacy", "report-0", "127.0.0.33"),
        ("other", "report-0", "127.0.0.34"),
    ] {
        let mut p = pod(ns, name, NODE, "default", &[ip]);
        p.metadata.annotations = Some([("iam.amazonaws.com/role".into(), "reader".into())].into());
        kube.create_pod(p);
    }
    let code = |ip: &'static str| {
        let agent = &agent;
        async move {
            let r = agent
                .get(ip, "/latest/meta-data/iam/security-credentials/reader")
                .await
                .ok()?;
            if r.status != http::StatusCode::OK {
                return None;
            }
            r.json().ok()?["Code"].as_str().map(str::to_string)
        }
    };
    wait_for(Duration::from_secs(15), || async {
        code("127.0.0.33").await.is_some() && code("127.0.0.34").await.is_some()
    })
    .await
    .unwrap();
    assert_eq!(code("127.0.0.33").await.as_deref(), Some("Success"));
    assert_eq!(
        code("127.0.0.34").await.as_deref(),
        Some("AssumeRoleUnauthorizedAccess")
    );
    let issued = sts.issued();
    assert_eq!(issued.len(), 1, "{issued:?}");
    assert_eq!(issued[0].subject, "system:serviceaccount:legacy:default");
    agent.stop().await.unwrap();
}
