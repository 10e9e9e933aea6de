//! The manifests stay true to the binaries. The chart is rendered by the real `helm` (built by
//! tests/setup-helm.sh) for its default values and each documented mode (ci/*-values.yaml):
//! `helm lint --strict` is clean, every object passes `kubernetes-validate --strict`, and the
//! init container's and the agent's exact argument lists and environment, as rendered, run
//! against the real binaries. The plain manifest is the chart's default render, and RBAC grants
//! exactly the least privilege of DESIGN §9.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Parser;
use irsa_imds_agent::config::UninstallConfig;
use serde_json::Value;

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/chart/irsa-imds");
/// The documented modes: defaults (host mode + CNI hook), then each values file.
const MODES: &[Option<&str>] = &[
    None,
    Some("ci/per-pod-values.yaml"),
    Some("ci/uninstall-values.yaml"),
    Some("ci/everything-values.yaml"),
];
/// What the downward API would give the pod.
const HOST_IP: &str = "192.0.2.10";

fn manifest() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/irsa-imds.yaml"
    ))
    .unwrap()
}

fn cache_bin(name: &str) -> PathBuf {
    let cache = std::env::var_os("IRSA_TESTBED_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/irsa-imds-testbed"));
    let p = cache.join("bin").join(name);
    assert!(
        p.exists(),
        "{} missing: run `bash tests/setup.sh` (tests/setup-helm.sh builds it)",
        p.display()
    );
    p
}

/// A binary of the workspace, built now if the sources changed (never a stale one).
fn target_bin(name: &str) -> PathBuf {
    testbed::util::workspace_bin(name).unwrap()
}

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn helm(args: &[&str], values: Option<&str>) -> Command {
    let mut c = Command::new(cache_bin("helm"));
    c.args(args);
    if let Some(v) = values {
        c.arg("-f").arg(Path::new(CHART).join(v));
    }
    // helm keeps its own state out of the repository and the user's home.
    let home = std::env::temp_dir().join(format!("irsa-helm-home-{}", std::process::id()));
    c.env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"));
    c
}

fn render(values: Option<&str>) -> String {
    let out = run(&mut helm(
        &["template", "irsa-imds", CHART, "--namespace", "kube-system"],
        values,
    ));
    String::from_utf8(out.stdout).unwrap()
}

/// Every YAML document as JSON, parsed by PyYAML (in kubernetes-validate's venv).
fn yaml_docs(text: &str) -> Vec<Value> {
    let python = std::fs::canonicalize(cache_bin("kubernetes-validate"))
        .unwrap()
        .with_file_name("python");
    let mut child = Command::new(python)
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d]))",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    serde_json::from_slice(&out.stdout).unwrap()
}

fn daemonset(docs: &[Value]) -> Value {
    docs.iter()
        .find(|d| d["kind"] == "DaemonSet")
        .unwrap()
        .clone()
}

#[test]
fn chart_lints_clean_and_renders_valid_objects_in_every_mode() {
    let dir = testbed::util::TempDir::new("deploy-validate").unwrap();
    for (i, mode) in MODES.iter().enumerate() {
        let out = run(&mut helm(&["lint", "--strict", CHART], *mode));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("0 chart(s) failed"), "{mode:?}: {text}");
        let rendered = render(*mode);
        let file = dir.path().join(format!("mode-{i}.yaml"));
        std::fs::write(&file, &rendered).unwrap();
        let out = run(Command::new(cache_bin("kubernetes-validate"))
            .arg("--strict")
            .arg(&file));
        let report = String::from_utf8_lossy(&out.stdout);
        let kinds: Vec<String> = yaml_docs(&rendered)
            .iter()
            .map(|d| d["kind"].as_str().unwrap().to_lowercase())
            .collect();
        for k in &kinds {
            assert!(
                report.contains(&format!("passed for resource {k}/")),
                "{mode:?} {k}: {report}"
            );
        }
        // Standard labels on every object.
        for d in yaml_docs(&rendered) {
            let labels = &d["metadata"]["labels"];
            for l in [
                "app.kubernetes.io/name",
                "app.kubernetes.io/instance",
                "app.kubernetes.io/version",
                "app.kubernetes.io/managed-by",
                "helm.sh/chart",
            ] {
                assert!(
                    labels.get(l).is_some(),
                    "{mode:?}: {} has no {l}",
                    d["kind"]
                );
            }
        }
    }
}

#[test]
fn chart_refuses_iptables_off_without_the_per_pod_redirect() {
    let out = helm(
        &["template", "irsa-imds", CHART, "--set", "iptables=false"],
        None,
    )
    .output()
    .unwrap();
    assert!(!out.status.success());
    let restrictions_alone = helm(
        &[
            "template",
            "irsa-imds",
            CHART,
            "--set",
            "kube2iam.namespaceRestrictions=true",
        ],
        None,
    )
    .output()
    .unwrap();
    assert!(!restrictions_alone.status.success());
    assert!(
        String::from_utf8_lossy(&restrictions_alone.stderr).contains("kube2iam.enabled"),
        "{}",
        String::from_utf8_lossy(&restrictions_alone.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cniHook.podRedirect"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // With the per-pod redirect it renders, and passes the node IP as the agent's address.
    let ds = daemonset(&yaml_docs(&render(Some("ci/per-pod-values.yaml"))));
    let init = &ds["spec"]["template"]["spec"]["initContainers"][0];
    assert!(
        init["command"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a == "--agent-address=$(HOST_IP):8181")
    );
    assert_eq!(
        init["env"][0]["valueFrom"]["fieldRef"]["fieldPath"],
        "status.hostIP"
    );
}

#[test]
fn chart_values_reach_the_daemonset() {
    let ds = daemonset(&yaml_docs(&render(Some("ci/everything-values.yaml"))));
    let pod = &ds["spec"]["template"];
    let spec = &pod["spec"];
    let agent = &spec["containers"][0];
    assert_eq!(
        agent["image"],
        "registry.example.com/platform/irsa-imds:0.1.0-rc1"
    );
    assert_eq!(agent["imagePullPolicy"], "Always");
    assert_eq!(spec["imagePullSecrets"][0]["name"], "regcred");
    assert_eq!(
        spec["nodeSelector"]["node.kubernetes.io/instance-type"],
        "m7i.large"
    );
    assert_eq!(spec["tolerations"][0]["key"], "dedicated");
    assert_eq!(
        spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
            [0]["matchExpressions"][1]["key"],
        "karpenter.sh/nodepool"
    );
    assert_eq!(spec["priorityClassName"], "system-cluster-critical");
    assert_eq!(spec["terminationGracePeriodSeconds"], 45);
    assert_eq!(
        ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
        1
    );
    assert_eq!(
        pod["metadata"]["annotations"]["prometheus.io/scrape"],
        "true"
    );
    assert_eq!(pod["metadata"]["labels"]["team"], "platform");
    assert_eq!(agent["resources"]["limits"]["cpu"], "500m");
    let args = agent["args"].to_string();
    assert!(
        args.contains("--session-scope=service-account") && args.contains("--refresh-at=90m"),
        "{args}"
    );
    let env: Vec<&str> = agent["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    for e in [
        "AWS_REGION",
        "AWS_ENDPOINT_URL_STS",
        "HTTPS_PROXY",
        "NO_PROXY",
    ] {
        assert!(env.contains(&e), "{env:?}");
    }
    let ports: Vec<i64> = agent["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["containerPort"].as_i64().unwrap())
        .collect();
    assert_eq!(ports, [18181, 18182]);
    let vols = spec["volumes"].to_string();
    assert!(
        vols.contains("/opt/cni/bin-alt") && vols.contains("/etc/cni/net.d-alt"),
        "{vols}"
    );
    let args: Vec<&str> = agent["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    for want in [
        "--kube2iam-annotations",
        "--namespace-restrictions",
        "--namespace-restriction-format=regexp",
        "--base-role-arn=arn:aws:iam::123456789012:role/k8s/",
        "--default-role=node-addons",
    ] {
        assert!(args.contains(&want), "{want}: {args:?}");
    }
    // The per-pod redirect cannot be checked by original destination.
    assert!(!args.contains(&"--require-redirect"), "{args:?}");
    // Namespace restrictions read Namespaces: only then does the ClusterRole grant it.
    let everything = render(Some("ci/everything-values.yaml"));
    assert!(
        cluster_role_rules(&everything)
            .contains("resources: [\"namespaces\"]\n    verbs: [\"get\"]"),
        "{everything}"
    );
    let defaults = render(None);
    assert!(!cluster_role_rules(&defaults).contains("namespaces"));
    let ds = daemonset(&yaml_docs(&defaults));
    let args = ds["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    for never in [
        "kube2iam",
        "namespace-restriction",
        "base-role-arn",
        "default-role",
    ] {
        assert!(!args.contains(never), "{never}: {args}");
    }
    // Defaults: the image tag is the chart's appVersion; affinity keeps Fargate/hybrid out; host
    // mode serves only what came through its redirect.
    let ds = daemonset(&yaml_docs(&render(None)));
    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(spec["containers"][0]["image"], "irsa-imds:0.1.0");
    let args = spec["containers"][0]["args"].to_string();
    assert!(args.contains("\"--require-redirect\""), "{args}");
    assert!(args.contains("--session-scope=pod"), "{args}");
    let terms = spec["affinity"]["nodeAffinity"].to_string();
    for want in [
        "kubernetes.io/os",
        "linux",
        "amd64",
        "arm64",
        "eks.amazonaws.com/compute-type",
        "NotIn",
        "fargate",
        "hybrid",
    ] {
        assert!(terms.contains(want), "{want}: {terms}");
    }
}

#[test]
fn plain_manifest_is_the_charts_default_daemonset() {
    let chart = daemonset(&yaml_docs(&render(None)));
    let plain = daemonset(&yaml_docs(&manifest()));
    assert_eq!(plain["spec"], chart["spec"]);
    assert_eq!(plain["metadata"]["name"], chart["metadata"]["name"]);
    assert_eq!(
        plain["metadata"]["namespace"],
        chart["metadata"]["namespace"]
    );
}

/// A container's environment as the kubelet would set it (downward API values made up).
fn container_env(c: &Value) -> Vec<(String, String)> {
    c["env"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
        .iter()
        .map(|e| {
            let name = e["name"].as_str().unwrap().to_string();
            let value = match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some("spec.nodeName") => "node-1".to_string(),
                Some("status.hostIP") => HOST_IP.to_string(),
                Some("metadata.name") => "irsa-imds-x7k2p".to_string(),
                Some(other) => panic!("unexpected fieldRef {other}"),
                None => e["value"].as_str().unwrap().to_string(),
            };
            (name, value)
        })
        .collect()
}

/// `command` + `args` with `$(VAR)` expanded from the container's env, as the kubelet does, and
/// the host paths pointed into `root`.
fn argv(c: &Value, root: &Path) -> Vec<String> {
    let env = container_env(c);
    let mut out = Vec::new();
    for key in ["command", "args"] {
        for a in c[key].as_array().map(Vec::as_slice).unwrap_or(&[]) {
            let mut a = a.as_str().unwrap().to_string();
            for (k, v) in &env {
                a = a.replace(&format!("$({k})"), v);
            }
            // The socket path is only written into the conflist; the chain state is a file.
            for host in [
                "/host/opt/cni/bin",
                "/host/etc/cni/net.d",
                "/run/irsa-imds/cni-chain.json",
            ] {
                a = a.replace(host, &format!("{}{host}", root.display()));
            }
            out.push(a);
        }
    }
    out
}

/// The init container's and the agent's exact argv and env, from each render and from the
/// plain manifest, run against the real binaries.
#[test]
fn rendered_commands_run_against_the_real_binaries() {
    let mut sources: Vec<(String, Value)> = MODES
        .iter()
        .map(|m| (format!("chart {m:?}"), daemonset(&yaml_docs(&render(*m)))))
        .collect();
    sources.push(("manifest".into(), daemonset(&yaml_docs(&manifest()))));
    for (what, ds) in sources {
        let dir = testbed::util::TempDir::new("deploy-argv").unwrap();
        let root = dir.path();
        let (bin, conf) = (
            root.join("host/opt/cni/bin"),
            root.join("host/etc/cni/net.d"),
        );
        std::fs::create_dir_all(&conf).unwrap();
        let conflist = conf.join("10-aws.conflist");
        std::fs::copy(
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../cni-hook/tests/samples/eks-vpc-cni.conflist"
            ),
            &conflist,
        )
        .unwrap();
        let spec = &ds["spec"]["template"]["spec"];
        let init = &spec["initContainers"][0];
        let init_argv = argv(init, root);
        assert_eq!(init_argv[0], "/irsa-imds-cni", "{what}");
        let cni = |args: &[String], env: &[(String, String)]| {
            run(Command::new(target_bin("irsa-imds-cni"))
                .env_clear()
                .envs(env.iter().cloned())
                .args(args))
        };
        let entry = || -> Option<Value> {
            let v: Value =
                serde_json::from_str(&std::fs::read_to_string(&conflist).unwrap()).unwrap();
            v["plugins"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["type"] == "irsa-imds-cni")
                .cloned()
        };
        match init_argv[1].as_str() {
            "install" => {
                cni(&init_argv[1..], &container_env(init));
                let e = entry().unwrap_or_else(|| panic!("{what}: not chained"));
                assert_eq!(e["agentSocket"], "/run/irsa-imds/cni.sock", "{what}");
                let pod_redirect = init_argv.iter().any(|a| a == "--pod-redirect");
                assert_eq!(e["podRedirect"] == true, pod_redirect, "{what}: {e}");
                if pod_redirect {
                    assert!(
                        e["agentAddress"]
                            .as_str()
                            .unwrap()
                            .starts_with(&format!("{HOST_IP}:")),
                        "{what}: {e}"
                    );
                }
                assert!(bin.join("irsa-imds-cni").exists());
                assert!(root.join("run/irsa-imds/cni-chain.json").exists(), "{what}");
            }
            "uninstall" => {
                // Installed first (as the previous release did), then the rendered uninstall.
                let install: Vec<String> = [
                    "install",
                    &format!("--bin-dir={}", bin.display()),
                    &format!("--conf-dir={}", conf.display()),
                    &format!(
                        "--chain-state={}/run/irsa-imds/cni-chain.json",
                        root.display()
                    ),
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                cni(&install, &[]);
                assert!(entry().is_some());
                cni(&init_argv[1..], &container_env(init));
                assert!(entry().is_none(), "{what}");
                assert!(!bin.join("irsa-imds-cni").exists(), "{what}");
                assert!(
                    !root.join("run/irsa-imds/cni-chain.json").exists(),
                    "{what}"
                );
            }
            other => panic!("{what}: init container runs {other:?}"),
        }

        let agent = &spec["containers"][0];
        let args = argv(agent, root);
        if args.first().map(String::as_str) == Some("uninstall") {
            // Never run here: it would change this machine's netfilter. Its flags parse.
            // As main does: `uninstall` stands in for the program name.
            UninstallConfig::try_parse_from(&args).unwrap_or_else(|e| panic!("{what}: {e}"));
            continue;
        }
        // The real agent with exactly these flags and env: it parses and validates them, then
        // fails only where this machine is not the node (the node IP cannot be bound here).
        let out = Command::new(target_bin("irsa-imds-agent"))
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .envs(container_env(agent))
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {args:?}: {stderr}");
        assert!(
            !stderr.contains("invalid configuration")
                && stderr.contains("cannot bind")
                && stderr.contains(HOST_IP),
            "{what}: {args:?}: {stderr}"
        );
    }
}

/// The ClusterRole's text, up to its binding.
fn cluster_role_rules(text: &str) -> &str {
    &text[text.find("kind: ClusterRole\n").unwrap()..text.find("kind: ClusterRoleBinding").unwrap()]
}

#[test]
fn rbac_is_least_privilege() {
    let text = manifest();
    let rules = cluster_role_rules(&text);
    for want in [
        "resources: [\"pods\"]\n    verbs: [\"get\", \"list\", \"watch\"]",
        "resources: [\"serviceaccounts\"]\n    verbs: [\"get\"]",
        "resources: [\"serviceaccounts/token\"]\n    verbs: [\"create\"]",
        // events.k8s.io only (what the agent writes) and never `patch`: a new Event each time.
        "apiGroups: [\"events.k8s.io\"]\n    resources: [\"events\"]\n    verbs: [\"create\"]",
    ] {
        assert!(rules.contains(want), "missing {want:?} in\n{rules}");
    }
    // Namespaces only with kube2iam's namespace restrictions (chart_values_reach_the_daemonset).
    for never in [
        "secrets",
        "\"*\"",
        "update",
        "patch",
        "delete",
        "nodes",
        "namespaces",
    ] {
        assert!(
            !rules.contains(never),
            "{never} must not be granted:\n{rules}"
        );
    }
}

/// No container engine runs here, so the image is not built in the tests; what can drift is
/// checked: the dependency layer copies every workspace member's manifest (a new crate would
/// break the stub build), the plugin is the static musl build, both binaries and iptables ship.
#[test]
fn dockerfile_covers_the_workspace_and_ships_the_static_plugin() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let docker = std::fs::read_to_string(format!("{root}/Dockerfile")).unwrap();
    let cargo = std::fs::read_to_string(format!("{root}/Cargo.toml")).unwrap();
    let members = cargo
        .lines()
        .find(|l| l.starts_with("members"))
        .unwrap()
        .split('"')
        .skip(1)
        .step_by(2)
        .map(String::from)
        .collect::<Vec<_>>();
    assert!(members.len() >= 3, "{members:?}");
    for m in &members {
        assert!(
            docker.contains(&format!("COPY {m}/Cargo.toml {m}/")),
            "dependency layer misses {m}/Cargo.toml"
        );
    }
    for want in [
        "-unknown-linux-musl/release/irsa-imds-cni\" /irsa-imds-cni",
        "COPY --from=build /irsa-imds-agent /irsa-imds-agent",
        "COPY --from=build /irsa-imds-cni /irsa-imds-cni",
        "install -y --no-install-recommends iptables",
        "TARGETARCH",
    ] {
        assert!(docker.contains(want), "Dockerfile lacks {want:?}");
    }
    let ignore = std::fs::read_to_string(format!("{root}/.dockerignore")).unwrap();
    for want in ["target", ".git", "tests/.deps"] {
        assert!(
            ignore.lines().any(|l| l == want),
            ".dockerignore lacks {want}"
        );
    }
}
