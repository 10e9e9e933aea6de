//! The metrics that answer an operator's questions (docs/metrics.md), after a scripted run against
//! the real agent: pods served, a role STS refuses, an unknown caller, a pod without a role, a
//! wrong role name, STS throttling, a CNI chain that comes and goes. Each new series has the value
//! the script implies, and the exposition parses (strictly here, and by `promtool check metrics`).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use http::{Method, StatusCode};
use testbed::fake_imds::FakeImds;
use testbed::harness::{Agent, NODE, request, sdk_sts, wait_for};
use testbed::kube_api::{KubeApi, pod};
use testbed::sts::{StsEmulator, StsFault};

const ROLE_A: &str = "arn:aws:iam::123456789012:role/team-a/reader";
const ROLE_B: &str = "arn:aws:iam::123456789012:role/writer";
const ANN: &str = "eks.amazonaws.com/role-arn";
const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

/// One parsed exposition: `name{label="v",...}` (labels in exposition order) -> value.
type Samples = BTreeMap<String, f64>;

/// Parses the OpenMetrics text the agent serves, refusing anything malformed: every line is a
/// `# HELP`/`# TYPE`/`# UNIT` comment or a `name{labels} value` sample, and `# EOF` ends it.
fn parse(text: &str) -> Samples {
    let mut out = Samples::new();
    let mut eof = false;
    for line in text.lines() {
        assert!(!eof, "text after # EOF: {line:?}");
        if line == "# EOF" {
            eof = true;
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut it = rest.splitn(3, ' ');
            let kind = it.next().unwrap();
            assert!(
                ["HELP", "TYPE", "UNIT"].contains(&kind),
                "unknown comment {line:?}"
            );
            let name = it.next().unwrap_or("");
            assert!(valid_name(name), "bad metric name in {line:?}");
            if kind == "TYPE" {
                let t = it.next().unwrap_or("");
                assert!(
                    ["counter", "gauge", "histogram", "info", "unknown"].contains(&t),
                    "bad type in {line:?}"
                );
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let name = series.split('{').next().unwrap();
        assert!(valid_name(name), "bad series name in {line:?}");
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            let inner = labels
                .strip_prefix('{')
                .and_then(|l| l.strip_suffix('}'))
                .unwrap_or_else(|| panic!("bad labels in {line:?}"));
            for pair in inner.split("\",") {
                let (k, v) = pair.split_once("=\"").unwrap_or_else(|| panic!("{line:?}"));
                assert!(valid_name(k), "bad label name in {line:?}");
                assert!(!v.trim_end_matches('"').contains('"'), "{line:?}");
            }
        }
        assert!(
            out.insert(series.to_string(), value).is_none(),
            "duplicate series {series}"
        );
    }
    assert!(eof, "no # EOF");
    out
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && !n.starts_with(|c: char| c.is_ascii_digit())
        && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

async fn scrape(agent: &Agent) -> (String, Samples) {
    let src: IpAddr = "127.0.0.1".parse().unwrap();
    let r = request(agent.ops, src, Method::GET, "/metrics", &[])
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK);
    let text = r.text();
    let samples = parse(&text);
    (text, samples)
}

fn value(s: &Samples, series: &str) -> f64 {
    *s.get(series)
        .unwrap_or_else(|| panic!("{series} not exported: {:#?}", s.keys()))
}

/// A node CNI setup the agent can keep chained: a conflist, the plugin binary, the state file
/// `irsa-imds-cni install --chain-state` would write.
struct Chain {
    dir: testbed::util::TempDir,
}

impl Chain {
    fn new() -> Chain {
        let dir = testbed::util::TempDir::new("metrics-chain").unwrap();
        let (conf, bin) = (dir.path().join("net.d"), dir.path().join("bin"));
        std::fs::create_dir_all(&conf).unwrap();
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(
            conf.join("10-aws.conflist"),
            r#"{"cniVersion":"0.4.0","name":"aws-cni","plugins":[{"type":"aws-cni"}]}"#,
        )
        .unwrap();
        std::fs::write(bin.join("irsa-imds-cni"), "#!/bin/sh\n").unwrap();
        let state = serde_json::json!({
            "confDir": conf, "binDir": bin,
            "entry": {"type": "irsa-imds-cni", "socket": "/run/irsa-imds/cni.sock"},
        });
        std::fs::write(dir.path().join("state.json"), state.to_string()).unwrap();
        Chain { dir }
    }
    fn state(&self) -> String {
        self.dir.path().join("state.json").display().to_string()
    }
    fn remove_binary(&self) {
        std::fs::remove_file(self.dir.path().join("bin/irsa-imds-cni")).unwrap();
    }
}

#[tokio::test]
async fn scripted_run_leaves_each_metric_at_its_expected_value() {
    let kube = KubeApi::start().await.unwrap();
    let sts = StsEmulator::start().await.unwrap();
    let upstream = FakeImds::start().await.unwrap();
    kube.apply_service_account("apps", "reader", &[(ANN, ROLE_A)]);
    kube.apply_service_account("apps", "writer", &[(ANN, ROLE_B)]);
    kube.apply_service_account("apps", "plain", &[]);
    sts.deny_role(ROLE_B);
    let chain = Chain::new();
    let state = chain.state();
    let agent = Agent::start(
        &kube,
        sdk_sts(sts.endpoint()).await,
        &upstream.url(),
        &[
            "--pod-wait",
            "100ms",
            "--cni-chain-state",
            &state,
            "--cni-chain-resync",
            "50ms",
        ],
    )
    .await
    .unwrap();

    // Before anything: built, ready, nothing cached, every fixed series already at 0.
    let (_, s) = scrape(&agent).await;
    let build = s
        .keys()
        .find(|k| k.starts_with("irsa_imds_build_info{"))
        .unwrap();
    assert!(
        build.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))),
        "{build}"
    );
    assert_eq!(value(&s, build), 1.0);
    assert_eq!(value(&s, "irsa_imds_ready"), 1.0);
    assert_eq!(value(&s, "irsa_imds_cached_credentials"), 0.0);
    assert_eq!(
        value(&s, "irsa_imds_credentials_min_remaining_seconds"),
        0.0
    );
    assert_eq!(
        value(&s, "irsa_imds_sts_results_total{code=\"Throttling\"}"),
        0.0
    );
    assert_eq!(
        value(&s, "irsa_imds_not_found_total{reason=\"unknown_source\"}"),
        0.0
    );
    // Not in host mode: the rule gauge is absent rather than a false 0.
    assert!(
        !s.keys()
            .any(|k| k.starts_with("irsa_imds_redirect_rule_installed"))
    );

    // A pod without a role (created first: the watch delivers in order), then two served pods.
    kube.create_pod(pod("apps", "plain", NODE, "plain", &["127.0.0.83"]));
    kube.create_pod(pod("apps", "a", NODE, "reader", &["127.0.0.81"]));
    agent
        .wait_served("127.0.0.81", CREDS, Duration::from_secs(10))
        .await
        .unwrap();
    wait_for(Duration::from_secs(10), || async {
        agent
            .get("127.0.0.81", &format!("{CREDS}reader"))
            .await
            .unwrap()
            .status
            == StatusCode::OK
    })
    .await
    .unwrap();
    // The next exchange is throttled once, then retried.
    sts.fail_next(1, StsFault::Throttling);
    kube.create_pod(pod("apps", "c", NODE, "reader", &["127.0.0.84"]));
    agent
        .wait_served("127.0.0.84", CREDS, Duration::from_secs(10))
        .await
        .unwrap();
    let c = agent
        .get("127.0.0.84", &format!("{CREDS}reader"))
        .await
        .unwrap();
    assert_eq!(c.json().unwrap()["Code"], "Success");
    // A role STS refuses.
    kube.create_pod(pod("apps", "b", NODE, "writer", &["127.0.0.82"]));
    agent
        .wait_served("127.0.0.82", CREDS, Duration::from_secs(10))
        .await
        .unwrap();
    let b = agent
        .get("127.0.0.82", &format!("{CREDS}writer"))
        .await
        .unwrap();
    assert_eq!(b.json().unwrap()["Code"], "AssumeRoleUnauthorizedAccess");
    // 404s: an unknown source (twice), the roleless pod, a role name that is not the pod's.
    for _ in 0..2 {
        assert_eq!(
            agent.get("127.0.0.99", CREDS).await.unwrap().status,
            StatusCode::NOT_FOUND
        );
    }
    assert_eq!(
        agent.get("127.0.0.83", CREDS).await.unwrap().status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        agent
            .get("127.0.0.81", &format!("{CREDS}writer"))
            .await
            .unwrap()
            .status,
        StatusCode::NOT_FOUND
    );
    wait_for(Duration::from_secs(10), || async {
        scrape(&agent).await.1.get("irsa_imds_cni_chain_present") == Some(&1.0)
    })
    .await
    .unwrap();

    let (text, s) = scrape(&agent).await;
    // STS: what the emulator saw, code by code; each attempt timed.
    let calls = sts.call_count() as f64;
    let seen: Vec<(String, String)> = sts
        .calls()
        .into_iter()
        .map(|c| (c.role_session_name, c.role_arn))
        .collect();
    assert_eq!(calls, 4.0, "a, c throttled, c, b refused: {seen:?}");
    let code = |c: &str| value(&s, &format!("irsa_imds_sts_results_total{{code=\"{c}\"}}"));
    assert_eq!(code("ok"), 2.0);
    assert_eq!(code("Throttling"), 1.0);
    assert_eq!(code("AccessDenied"), 1.0);
    for quiet in [
        "InvalidIdentityToken",
        "ExpiredToken",
        "IDPCommunicationError",
        "timeout",
        "network",
        "5xx",
        "other",
    ] {
        assert_eq!(code(quiet), 0.0, "{quiet}");
    }
    assert_eq!(value(&s, "irsa_imds_sts_duration_seconds_count"), calls);
    assert!(value(&s, "irsa_imds_sts_duration_seconds_sum") > 0.0);
    assert_eq!(
        value(&s, "irsa_imds_sts_duration_seconds_bucket{le=\"+Inf\"}"),
        calls
    );
    // One TokenRequest per exchange.
    assert_eq!(
        value(&s, "irsa_imds_token_request_duration_seconds_count"),
        calls
    );
    // Two sets cached (a, c), about an hour left on the older one.
    assert_eq!(value(&s, "irsa_imds_cached_credentials"), 2.0);
    let least = value(&s, "irsa_imds_credentials_min_remaining_seconds");
    assert!((3000.0..=3600.0).contains(&least), "{least}");
    // 404s by reason.
    let nf = |r: &str| value(&s, &format!("irsa_imds_not_found_total{{reason=\"{r}\"}}"));
    assert_eq!(nf("unknown_source"), 2.0);
    assert_eq!(nf("no_role"), 1.0);
    assert_eq!(nf("wrong_role_name"), 1.0);
    assert_eq!(nf("host_network"), 0.0);
    assert_eq!(value(&s, "irsa_imds_cni_chain_present"), 1.0);
    assert!(!text.contains("ASIA"), "no access key id in metrics");
    promtool_check(&text);

    // The chain cannot be kept (the plugin binary went): 0.
    chain.remove_binary();
    wait_for(Duration::from_secs(10), || async {
        scrape(&agent).await.1.get("irsa_imds_cni_chain_present") == Some(&0.0)
    })
    .await
    .unwrap();
    agent.stop().await.unwrap();
}

/// `promtool check metrics` parses the exposition (lint findings are printed, not failures: it
/// reads the classic text format, and the OpenMetrics `_total` naming draws remarks).
fn promtool_check(text: &str) {
    use std::io::Write;
    let bin = testbed::deps::require(&testbed::deps::promtool()).unwrap();
    let mut child = std::process::Command::new(bin)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !said.contains("error while linting") && !said.contains("parse error"),
        "promtool cannot parse the exposition: {said}"
    );
    eprintln!("promtool check metrics: {said}");
}
