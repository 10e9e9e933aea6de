//! `deploy/prometheus-rules.yaml` passes `promtool check rules`, and its alerts fire (and stay
//! quiet) as `tests/promtool/irsa-imds-rules.test.yaml` says, under `promtool test rules`.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::PathBuf;
use std::process::Command;

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

/// The PrometheusRule's `spec:` block, which is a plain Prometheus rule file.
fn rule_file() -> String {
    let text = std::fs::read_to_string(repo("deploy/prometheus-rules.yaml")).unwrap();
    let start = text.find("\nspec:\n").unwrap() + "\nspec:\n".len();
    text[start..]
        .lines()
        .map(|l| l.strip_prefix("  ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

fn promtool(dir: &std::path::Path, args: &[&str]) -> (bool, String) {
    let bin = testbed::deps::require(&testbed::deps::promtool()).unwrap();
    let out = Command::new(bin)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn workdir(tag: &str, rules: &str) -> testbed::util::TempDir {
    let dir = testbed::util::TempDir::new(tag).unwrap();
    std::fs::write(dir.path().join("irsa-imds.rules.yaml"), rules).unwrap();
    std::fs::copy(
        repo("tests/promtool/irsa-imds-rules.test.yaml"),
        dir.path().join("irsa-imds-rules.test.yaml"),
    )
    .unwrap();
    dir
}

#[test]
fn prometheus_rules_check_and_unit_tests_pass() {
    let dir = workdir("promrules", &rule_file());
    let (ok, out) = promtool(dir.path(), &["check", "rules", "irsa-imds.rules.yaml"]);
    assert!(ok, "{out}");
    assert!(out.contains("SUCCESS: 8 rules found"), "{out}");
    let (ok, out) = promtool(dir.path(), &["test", "rules", "irsa-imds-rules.test.yaml"]);
    assert!(ok, "{out}");
}

/// The unit tests have teeth: a rule that never fires fails them.
#[test]
fn prometheus_rule_unit_tests_catch_a_broken_alert() {
    let broken = rule_file().replace(
        "expr: irsa_imds_redirect_rule_installed == 0",
        "expr: irsa_imds_redirect_rule_installed == 2",
    );
    assert_ne!(broken, rule_file());
    let dir = workdir("promrules-broken", &broken);
    let (ok, out) = promtool(dir.path(), &["test", "rules", "irsa-imds-rules.test.yaml"]);
    assert!(!ok, "{out}");
    assert!(out.contains("IrsaImdsRedirectRuleMissing"), "{out}");
}

/// Every `irsa_imds_*` series the rules and their unit tests name is one the agent exports, and
/// every label value they match on is one it uses: the rules cannot drift from the agent.
#[test]
fn prometheus_rules_name_only_what_the_agent_exports() {
    use irsa_imds_agent::telemetry::metrics::{NOT_FOUND_REASONS, STS_CODES};
    let m = irsa_imds_agent::telemetry::Metrics::new();
    // Registered only where the agent manages them (host mode, a CNI chain state).
    m.set_redirect_rule(true);
    m.set_cni_chain(true);
    // Labelled families appear with their first series.
    m.refreshes("failure");
    let exported = m.encode();
    let tests = std::fs::read_to_string(repo("tests/promtool/irsa-imds-rules.test.yaml")).unwrap();
    let rules = rule_file();
    let mut names = std::collections::BTreeSet::new();
    for text in [&rules, &tests] {
        let mut rest = text.as_str();
        while let Some(i) = rest.find("irsa_imds_") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            names.insert(tail[..end].to_string());
            rest = &tail[end..];
        }
    }
    assert!(names.len() >= 7, "{names:?}");
    for name in &names {
        let sample = format!("\n{name}{{");
        let bare = format!("\n{name} ");
        assert!(
            exported.contains(&sample) || exported.contains(&bare),
            "{name} is not exported by the agent:\n{exported}"
        );
    }
    // Label values the rules match on.
    for (label, allowed) in [("code", &STS_CODES[..]), ("reason", &NOT_FOUND_REASONS[..])] {
        for text in [&rules, &tests] {
            for part in text.split(&format!("{label}=")).skip(1) {
                // Only label matchers (`code="x"`, `code=~"x|y"`), not prose.
                let Some(quoted) = part.trim_start_matches('~').strip_prefix('"') else {
                    continue;
                };
                let value = quoted.split('"').next().unwrap();
                for v in value.split('|') {
                    assert!(
                        allowed.contains(&v),
                        "{label}={v:?} is not one the agent uses"
                    );
                }
            }
        }
    }
}
