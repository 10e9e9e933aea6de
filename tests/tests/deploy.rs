//! The manifests stay true to the binaries: every flag the DaemonSet passes exists and validates,
//! the CNI install step names real flags, and RBAC grants exactly the least privilege of DESIGN §9.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use clap::Parser;
use irsa_imds_agent::Config;

fn manifest() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/irsa-imds.yaml"
    ))
    .unwrap()
}

/// The `- --flag` lines of the container called `name` (up to the next key at its level).
fn container_args(yaml: &str, name: &str) -> Vec<String> {
    let start = yaml.find(&format!("- name: {name}")).unwrap();
    let rest = &yaml[start..];
    let mut out = Vec::new();
    let mut in_args = false;
    for line in rest.lines().skip(1) {
        let t = line.trim();
        if t.starts_with("- name:") && !in_args {
            break;
        }
        if t.starts_with("args:") || t.starts_with("command:") {
            in_args = true;
            continue;
        }
        if in_args {
            if let Some(a) = t.strip_prefix("- ") {
                out.push(
                    a.split('#')
                        .next()
                        .unwrap()
                        .trim()
                        .trim_matches('"')
                        .to_string(),
                );
            } else {
                break;
            }
        }
    }
    out
}

#[test]
fn daemonset_agent_flags_parse_and_validate() {
    let args = container_args(&manifest(), "agent");
    assert!(args.iter().any(|a| a == "--iptables"), "{args:?}");
    let mut argv = vec![
        "irsa-imds-agent".to_string(),
        "--node-name".into(),
        "node-1".into(),
    ];
    // The kubelet expands $(HOST_IP); the agent reads HOST_IP for --host-ip.
    argv.extend(args.iter().map(|a| a.replace("$(HOST_IP)", "10.0.1.23")));
    argv.extend(["--host-ip".to_string(), "10.0.1.23".to_string()]);
    let cfg = Config::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    cfg.validate().unwrap();
    assert_eq!(cfg.listen.to_string(), "10.0.1.23:8181");
    assert!(cfg.cni_socket.is_some());
}

#[test]
fn daemonset_cni_install_step_runs_with_its_flags() {
    let text = manifest();
    let start = text.find("command: [").unwrap() + "command: ".len();
    let end = start + text[start..].find(']').unwrap() + 1;
    let cmd: Vec<String> = serde_json::from_str(&text[start..end]).unwrap();
    assert_eq!(
        cmd[..2],
        ["/irsa-imds-cni".to_string(), "install".to_string()]
    );
    let dir = testbed::util::TempDir::new("deploy-cni").unwrap();
    let (bin, conf) = (dir.path().join("bin"), dir.path().join("net.d"));
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../cni-hook/tests/samples/eks-vpc-cni.conflist"
        ),
        conf.join("10-aws.conflist"),
    )
    .unwrap();
    // The manifest's flags, with the host paths pointed at a temp dir.
    let mut args: Vec<String> = cmd[1..].to_vec();
    for (flag, path) in [("--bin-dir", &bin), ("--conf-dir", &conf)] {
        let i = args.iter().position(|a| a == flag).unwrap();
        args[i + 1] = path.display().to_string();
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target"))
        });
    let out = std::process::Command::new(target.join("debug/irsa-imds-cni"))
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let installed = std::fs::read_to_string(conf.join("10-aws.conflist")).unwrap();
    assert!(
        installed.contains("\"/run/irsa-imds/cni.sock\""),
        "{installed}"
    );
    let agent = container_args(&text, "agent");
    assert!(
        agent
            .iter()
            .any(|a| a == "--cni-socket=/run/irsa-imds/cni.sock"),
        "agent and hook agree on the socket"
    );
}

#[test]
fn rbac_is_least_privilege() {
    let text = manifest();
    let rules = &text
        [text.find("kind: ClusterRole\n").unwrap()..text.find("kind: ClusterRoleBinding").unwrap()];
    for want in [
        "resources: [\"pods\"]\n    verbs: [\"get\", \"list\", \"watch\"]",
        "resources: [\"serviceaccounts\"]\n    verbs: [\"get\"]",
        "resources: [\"serviceaccounts/token\"]\n    verbs: [\"create\"]",
    ] {
        assert!(rules.contains(want), "missing {want:?} in\n{rules}");
    }
    for never in ["secrets", "\"*\"", "update", "delete", "nodes"] {
        assert!(
            !rules.contains(never),
            "{never} must not be granted:\n{rules}"
        );
    }
}
