//! The real `irsa-imds-cni` binary, driven exactly as a container runtime drives it: `CNI_*`
//! environment, network config on stdin, result or error JSON on stdout. A fake agent on a unix
//! socket records what the plugin sends.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_irsa-imds-cni");

fn samples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/samples")
}

fn sample(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(samples().join(name)).unwrap()).unwrap()
}

struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("irsa-cni-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fake agent: answers every request with `reply` and records it.
struct FakeAgent {
    dir: TempDir,
    seen: Arc<Mutex<Vec<Value>>>,
}

impl FakeAgent {
    fn start(reply: &'static str) -> FakeAgent {
        let dir = TempDir::new("agent");
        let listener = UnixListener::bind(dir.0.join("cni.sock")).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let mut line = String::new();
                if BufReader::new(&conn).read_line(&mut line).is_ok()
                    && let Ok(v) = serde_json::from_str::<Value>(&line)
                {
                    s2.lock().unwrap().push(v);
                }
                let _ = conn.write_all(format!("{reply}\n").as_bytes());
            }
        });
        FakeAgent { dir, seen }
    }
    fn socket(&self) -> String {
        self.dir.0.join("cni.sock").display().to_string()
    }
    fn seen(&self) -> Vec<Value> {
        self.seen.lock().unwrap().clone()
    }
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?}", self.stdout))
    }
}

fn cni(command: &str, env: &[(&str, &str)], stdin: &[u8]) -> Run {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_PATH", "/opt/cni/bin");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The plugin may stop reading early (oversized input): a broken pipe is its answer, not ours.
    let _ = child.stdin.take().unwrap().write_all(stdin);
    let out = child.wait_with_output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

const POD_ENV: &[(&str, &str)] = &[
    ("CNI_CONTAINERID", "3a52ce78095f"),
    ("CNI_NETNS", "/var/run/netns/cni-2c6a1b4e"),
    ("CNI_IFNAME", "eth0"),
    (
        "CNI_ARGS",
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-0;K8S_POD_INFRA_CONTAINER_ID=3a52ce78095f",
    ),
];

fn config(version: &str, socket: &str, prev: Option<Value>, extra: Value) -> Vec<u8> {
    let mut c = json!({"cniVersion": version, "name": "aws-cni", "type": "irsa-imds-cni", "agentSocket": socket, "timeoutMs": 500});
    if let Some(p) = prev {
        c["prevResult"] = p;
    }
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    serde_json::to_vec(&c).unwrap()
}

#[test]
fn add_registers_every_ip_and_passes_prev_result_through_in_each_version() {
    let agent = FakeAgent::start(r#"{"v":1,"ok":true}"#);
    let v04 = sample("prevResult-0.4.0.json");
    let v10 = sample("prevResult-1.0.0.json");
    let mut v031 = v04.clone();
    v031["cniVersion"] = json!("0.3.1");
    let mut v11 = v10.clone();
    v11["cniVersion"] = json!("1.1.0");
    let cases = [
        ("0.3.1", v031, vec!["10.0.12.47"]),
        ("0.4.0", v04, vec!["10.0.12.47"]),
        ("1.0.0", v10, vec!["192.168.104.9", "fd00:10:244::9"]),
        ("1.1.0", v11, vec!["192.168.104.9", "fd00:10:244::9"]),
    ];
    for (i, (version, prev, ips)) in cases.into_iter().enumerate() {
        let r = cni(
            "ADD",
            POD_ENV,
            &config(version, &agent.socket(), Some(prev.clone()), json!({})),
        );
        assert_eq!(r.code, 0, "{version}: {}", r.stderr);
        assert_eq!(
            r.json(),
            prev,
            "{version}: prevResult unchanged, in its own version"
        );
        let sent = agent.seen()[i].clone();
        assert_eq!(
            sent,
            json!({"v":1,"op":"add","containerId":"3a52ce78095f","namespace":"shop","name":"cart-0","ips":ips}),
            "{version}"
        );
    }
}

#[test]
fn version_lists_what_real_nodes_use() {
    for v in ["0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        let r = cni(
            "VERSION",
            &[],
            format!(r#"{{"cniVersion":"{v}"}}"#).as_bytes(),
        );
        assert_eq!(r.code, 0);
        let j = r.json();
        assert_eq!(j["cniVersion"], v);
        let sup: Vec<&str> = j["supportedVersions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap())
            .collect();
        for want in ["0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
            assert!(sup.contains(&want));
        }
    }
}

#[test]
fn bad_input_gets_cni_errors_never_a_panic() {
    let agent = FakeAgent::start(r#"{"v":1,"ok":true}"#);
    let prev = sample("prevResult-0.4.0.json");
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, Vec<u8>, u32);
    let cases: Vec<Case> = vec![
        ("malformed json", POD_ENV.to_vec(), b"{not json".to_vec(), 6),
        ("not an object", POD_ENV.to_vec(), b"[1,2]".to_vec(), 6),
        ("empty stdin", POD_ENV.to_vec(), b"".to_vec(), 6),
        (
            "unknown version",
            POD_ENV.to_vec(),
            config("9.9.9", &agent.socket(), Some(prev.clone()), json!({})),
            1,
        ),
        (
            "no prevResult",
            POD_ENV.to_vec(),
            config("0.4.0", &agent.socket(), None, json!({})),
            7,
        ),
        (
            "no container id",
            POD_ENV[1..].to_vec(),
            config("0.4.0", &agent.socket(), Some(prev.clone()), json!({})),
            4,
        ),
        (
            "bad timeout",
            POD_ENV.to_vec(),
            config(
                "0.4.0",
                &agent.socket(),
                Some(prev.clone()),
                json!({"timeoutMs": "x"}),
            ),
            7,
        ),
        (
            "bad prevResult ip",
            POD_ENV.to_vec(),
            config(
                "1.0.0",
                &agent.socket(),
                Some(json!({"cniVersion":"1.0.0","ips":[{"address":"zzz/32"}]})),
                json!({}),
            ),
            7,
        ),
        (
            "hostile pod name",
            vec![
                ("CNI_CONTAINERID", "x"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_ARGS", "K8S_POD_NAMESPACE=../..;K8S_POD_NAME=a b"),
            ],
            config("0.4.0", &agent.socket(), Some(prev.clone()), json!({})),
            4,
        ),
    ];
    for (what, env, stdin, code) in cases {
        let r = cni("ADD", &env, &stdin);
        assert_eq!(r.code, 1, "{what}: exit code; stderr {}", r.stderr);
        assert!(!r.stderr.contains("panicked"), "{what}: {}", r.stderr);
        let j = r.json();
        assert_eq!(j["code"], code, "{what}: {j}");
        assert!(j["msg"].as_str().is_some_and(|m| !m.is_empty()), "{what}");
    }
    let r = cni(
        "BOGUS",
        POD_ENV,
        &config("1.0.0", &agent.socket(), Some(prev), json!({})),
    );
    assert_eq!((r.code, r.json()["code"].as_u64()), (1, Some(4)));
    assert!(agent.seen().is_empty(), "nothing registered from bad input");
    let huge = vec![b' '; 2 << 20];
    let r = cni("ADD", POD_ENV, &huge);
    assert_eq!(
        (r.code, r.json()["code"].as_u64()),
        (1, Some(6)),
        "oversized config"
    );
}

#[test]
fn missing_cni_args_passes_through_without_registering() {
    let agent = FakeAgent::start(r#"{"v":1,"ok":true}"#);
    let prev = sample("prevResult-0.4.0.json");
    let env = [
        ("CNI_CONTAINERID", "abc"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_NETNS", "/x"),
    ];
    let r = cni(
        "ADD",
        &env,
        &config("0.4.0", &agent.socket(), Some(prev.clone()), json!({})),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json(), prev);
    assert!(agent.seen().is_empty());
}

#[test]
fn agent_down_never_breaks_pod_networking_unless_fail_closed() {
    let dir = TempDir::new("down");
    let sock = dir.0.join("absent.sock").display().to_string();
    let prev = sample("prevResult-1.0.0.json");
    let r = cni(
        "ADD",
        POD_ENV,
        &config("1.0.0", &sock, Some(prev.clone()), json!({})),
    );
    assert_eq!(r.code, 0, "fail-open: {}", r.stderr);
    assert_eq!(r.json(), prev);
    assert!(
        r.stderr.contains("fail-open"),
        "logged to stderr: {}",
        r.stderr
    );
    let r = cni(
        "ADD",
        POD_ENV,
        &config(
            "1.0.0",
            &sock,
            Some(prev.clone()),
            json!({"failClosed": true}),
        ),
    );
    assert_eq!(r.code, 1);
    assert_eq!(r.json()["code"], 11);
    let r = cni(
        "DEL",
        POD_ENV,
        &config("1.0.0", &sock, Some(prev), json!({"failClosed": true})),
    );
    assert_eq!(
        (r.code, r.stdout.trim()),
        (0, ""),
        "DEL with the agent down succeeds"
    );
}

#[test]
fn del_unregisters_idempotently_and_check_asks_the_agent() {
    let agent = FakeAgent::start(r#"{"v":1,"ok":true}"#);
    let prev = sample("prevResult-0.4.0.json");
    for _ in 0..2 {
        let r = cni(
            "DEL",
            POD_ENV,
            &config("0.4.0", &agent.socket(), Some(prev.clone()), json!({})),
        );
        assert_eq!((r.code, r.stdout.trim()), (0, ""));
    }
    let r = cni(
        "CHECK",
        POD_ENV,
        &config("0.4.0", &agent.socket(), Some(prev.clone()), json!({})),
    );
    assert_eq!(r.code, 0, "{}", r.stdout);
    let seen = agent.seen();
    assert_eq!(
        seen[0],
        json!({"v":1,"op":"del","containerId":"3a52ce78095f"})
    );
    assert_eq!(seen[1], seen[0]);
    assert_eq!(
        seen[2],
        json!({"v":1,"op":"check","containerId":"3a52ce78095f","ips":["10.0.12.47"]})
    );

    let refusing = FakeAgent::start(r#"{"v":1,"ok":false,"error":"not registered"}"#);
    let r = cni(
        "CHECK",
        POD_ENV,
        &config(
            "1.0.0",
            &refusing.socket(),
            Some(sample("prevResult-1.0.0.json")),
            json!({}),
        ),
    );
    assert_eq!(r.code, 1);
    assert_eq!(r.json()["code"], 100);
    let r = cni(
        "CHECK",
        POD_ENV,
        &config("0.3.1", &agent.socket(), Some(prev), json!({})),
    );
    assert_eq!(r.json()["code"], 1, "CHECK does not exist before 0.4.0");
    let gc = cni(
        "GC",
        &[],
        &config(
            "1.1.0",
            &agent.socket(),
            None,
            json!({"cni.dev/valid-attachments": [{"containerID": "keep1", "ifname": "eth0"}, {"containerID": "keep2", "ifname": "eth0"}]}),
        ),
    );
    assert_eq!(gc.code, 0, "{}", gc.stdout);
    assert_eq!(
        agent.seen().last().unwrap(),
        &json!({"v":1,"op":"gc","valid":["keep1","keep2"]})
    );
    let before = agent.seen().len();
    for cmd in ["STATUS", "GC"] {
        let r = cni(cmd, &[], &config("1.1.0", &agent.socket(), None, json!({})));
        assert_eq!(r.code, 0, "{cmd}: {}", r.stdout);
    }
    assert_eq!(
        agent.seen().len(),
        before,
        "GC without the runtime's list collects nothing"
    );
}

fn install(dir: &TempDir, extra: &[&str]) -> Run {
    let bin = dir.0.join("bin");
    let conf = dir.0.join("net.d");
    let mut cmd = Command::new(BIN);
    cmd.arg("install")
        .arg("--bin-dir")
        .arg(&bin)
        .arg("--conf-dir")
        .arg(&conf)
        .args(extra);
    let out = cmd.output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    }
}

fn uninstall(dir: &TempDir) -> Run {
    let out = Command::new(BIN)
        .arg("uninstall")
        .arg("--bin-dir")
        .arg(dir.0.join("bin"))
        .arg("--conf-dir")
        .arg(dir.0.join("net.d"))
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    }
}

#[test]
fn install_and_uninstall_on_real_node_conflists() {
    for name in [
        "eks-vpc-cni.conflist",
        "calico.conflist",
        "cilium.conflist",
        "eks-cilium-chaining.conflist",
    ] {
        let dir = TempDir::new("install");
        std::fs::create_dir_all(dir.0.join("net.d")).unwrap();
        let target = dir.0.join("net.d").join(format!("10-{name}"));
        std::fs::copy(samples().join(name), &target).unwrap();
        // A later file the runtime ignores: must stay untouched.
        std::fs::write(dir.0.join("net.d/99-other.conflist"), "{\"plugins\":[]}").unwrap();
        let original = sample(name);

        let r = install(&dir, &["--socket", "/run/irsa-imds/cni.sock"]);
        assert_eq!(r.code, 0, "{name}: {}", r.stderr);
        let installed: Value =
            serde_json::from_str(&std::fs::read_to_string(&target).unwrap()).unwrap();
        let plugins = installed["plugins"].as_array().unwrap();
        let orig_plugins = original["plugins"].as_array().unwrap();
        assert_eq!(
            &plugins[..plugins.len() - 1],
            &orig_plugins[..],
            "{name}: other plugins kept, in order"
        );
        assert_eq!(plugins.last().unwrap()["type"], "irsa-imds-cni");
        assert_eq!(
            plugins.last().unwrap()["agentSocket"],
            "/run/irsa-imds/cni.sock"
        );
        for key in ["cniVersion", "name"] {
            assert_eq!(installed[key], original[key], "{name}: {key}");
        }
        assert!(dir.0.join("bin/irsa-imds-cni").exists());
        assert_eq!(
            std::fs::read_to_string(dir.0.join("net.d/99-other.conflist")).unwrap(),
            "{\"plugins\":[]}"
        );

        // Idempotent: a second install changes nothing, byte for byte.
        let bytes = std::fs::read(&target).unwrap();
        assert_eq!(
            install(&dir, &["--socket", "/run/irsa-imds/cni.sock"]).code,
            0
        );
        assert_eq!(
            std::fs::read(&target).unwrap(),
            bytes,
            "{name}: second install is a no-op"
        );
        assert!(
            !std::fs::read_dir(dir.0.join("net.d")).unwrap().any(|e| e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains(".tmp"))
        );

        let r = uninstall(&dir);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let back: Value = serde_json::from_str(&std::fs::read_to_string(&target).unwrap()).unwrap();
        assert_eq!(back, original, "{name}: uninstall restores the original");
        assert!(!dir.0.join("bin/irsa-imds-cni").exists());
        assert_eq!(uninstall(&dir).code, 0, "uninstall twice is fine");
    }
}

#[test]
fn install_refuses_bad_flags_and_missing_configs() {
    let dir = TempDir::new("bad");
    let r = install(&dir, &[]);
    assert_eq!(r.code, 1, "no conf dir");
    assert!(r.stderr.contains("cannot read"), "{}", r.stderr);
    std::fs::create_dir_all(dir.0.join("net.d")).unwrap();
    std::fs::write(dir.0.join("net.d/10-broken.conflist"), "{oops").unwrap();
    let r = install(&dir, &[]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("not valid JSON"), "{}", r.stderr);
    assert_eq!(
        std::fs::read_to_string(dir.0.join("net.d/10-broken.conflist")).unwrap(),
        "{oops",
        "left alone"
    );
    let r = install(&dir, &["--pod-redirect"]);
    assert!(
        r.code != 0 && r.stderr.contains("--agent-address"),
        "{}",
        r.stderr
    );
    let r = install(&dir, &["--nope"]);
    assert!(
        r.code != 0 && r.stderr.contains("unexpected argument '--nope'"),
        "{}",
        r.stderr
    );
    let r = install(&dir, &["--timeout-ms=0"]);
    assert!(
        r.code != 0 && r.stderr.contains("--timeout-ms"),
        "{}",
        r.stderr
    );
    let r = install(&dir, &["--pod-redirect", "--agent-address=10.0.0.1"]);
    assert!(
        r.code != 0 && r.stderr.contains("--agent-address"),
        "IPv4 ip:port: {}",
        r.stderr
    );
    let out = Command::new(BIN).env_clear().output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "no CNI_COMMAND and no subcommand"
    );
}

/// The chart passes `--flag=value`, the manifest `--flag value`: both chain the same entry.
#[test]
fn install_accepts_both_flag_forms() {
    let mut written = Vec::new();
    for args in [
        &[
            "--socket",
            "/run/irsa-imds/cni.sock",
            "--timeout-ms",
            "400",
            "--fail-closed",
            "--pod-redirect",
            "--agent-address",
            "10.0.1.23:8181",
            "--log-file",
            "/var/log/irsa-imds-cni.log",
        ][..],
        &[
            "--socket=/run/irsa-imds/cni.sock",
            "--timeout-ms=400",
            "--fail-closed",
            "--pod-redirect",
            "--agent-address=10.0.1.23:8181",
            "--log-file=/var/log/irsa-imds-cni.log",
        ][..],
    ] {
        let dir = TempDir::new("forms");
        std::fs::create_dir_all(dir.0.join("net.d")).unwrap();
        std::fs::copy(
            samples().join("eks-vpc-cni.conflist"),
            dir.0.join("net.d/10-aws.conflist"),
        )
        .unwrap();
        let bin = format!("--bin-dir={}", dir.0.join("bin").display());
        let conf = format!("--conf-dir={}", dir.0.join("net.d").display());
        let out = Command::new(BIN)
            .arg("install")
            .args([&bin, &conf])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.0.join("net.d/10-aws.conflist")).unwrap(),
        )
        .unwrap();
        written.push(v["plugins"].as_array().unwrap().last().unwrap().clone());
    }
    assert_eq!(written[0], written[1]);
    assert_eq!(
        written[0],
        json!({"type": "irsa-imds-cni", "name": "irsa-imds", "agentSocket": "/run/irsa-imds/cni.sock",
               "timeoutMs": 400, "failClosed": true, "podRedirect": true,
               "agentAddress": "10.0.1.23:8181", "logFile": "/var/log/irsa-imds-cni.log"})
    );
}

/// aws-node rewrites its conflist on every restart (add-on upgrades), dropping our entry; a new
/// CNI may drop a conflist that sorts first. The recorded chain state puts the entry back in
/// whichever conflist is active, and changes nothing when it is there.
#[test]
fn chain_state_rechains_a_rewritten_or_newly_active_conflist() {
    use irsa_imds_cni::chain::ChainState;
    let dir = TempDir::new("rechain");
    let net = dir.0.join("net.d");
    std::fs::create_dir_all(&net).unwrap();
    std::fs::copy(
        samples().join("eks-vpc-cni.conflist"),
        net.join("10-aws.conflist"),
    )
    .unwrap();
    let state_file = dir.0.join("run/cni-chain.json");
    let r = install(
        &dir,
        &[
            "--chain-state",
            state_file.to_str().unwrap(),
            "--fail-closed",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let state = ChainState::load(&state_file).unwrap();
    assert_eq!(state.entry["failClosed"], true);
    assert_eq!(state.ensure().unwrap(), None, "already chained: no write");

    // aws-node writes its own conflist back, atomically, without us.
    std::fs::copy(samples().join("eks-vpc-cni.conflist"), net.join(".aws.tmp")).unwrap();
    std::fs::rename(net.join(".aws.tmp"), net.join("10-aws.conflist")).unwrap();
    assert_eq!(
        state.ensure().unwrap(),
        Some(net.join("10-aws.conflist")),
        "rechained"
    );
    let plugins = |f: &str| -> Vec<Value> {
        let v: Value =
            serde_json::from_str(&std::fs::read_to_string(net.join(f)).unwrap()).unwrap();
        v["plugins"].as_array().unwrap().clone()
    };
    assert_eq!(plugins("10-aws.conflist").last().unwrap(), &state.entry);
    assert_eq!(
        plugins("10-aws.conflist").len(),
        sample("eks-vpc-cni.conflist")["plugins"]
            .as_array()
            .unwrap()
            .len()
            + 1
    );

    // A conflist that sorts first becomes the active one: it gets chained too.
    std::fs::copy(
        samples().join("calico.conflist"),
        net.join("05-calico.conflist"),
    )
    .unwrap();
    assert_eq!(
        state.ensure().unwrap(),
        Some(net.join("05-calico.conflist"))
    );
    assert_eq!(plugins("05-calico.conflist").last().unwrap(), &state.entry);

    // Never chained while the binary is gone: the runtime could not run it.
    std::fs::remove_file(dir.0.join("bin/irsa-imds-cni")).unwrap();
    std::fs::copy(
        samples().join("calico.conflist"),
        net.join("05-calico.conflist"),
    )
    .unwrap();
    let e = state.ensure().unwrap_err().to_string();
    assert!(e.contains("missing"), "{e}");
    assert_eq!(
        plugins("05-calico.conflist"),
        sample("calico.conflist")["plugins"]
            .as_array()
            .unwrap()
            .clone()
    );
}

/// Uninstall takes the entry out of every conflist (active or not), then the binary, and the
/// chain state so a still-running agent has nothing to chain back.
#[test]
fn uninstall_leaves_no_entry_no_binary_and_no_state() {
    let dir = TempDir::new("uninstall");
    let net = dir.0.join("net.d");
    std::fs::create_dir_all(&net).unwrap();
    std::fs::copy(
        samples().join("calico.conflist"),
        net.join("10-calico.conflist"),
    )
    .unwrap();
    let state_file = dir.0.join("run/cni-chain.json");
    assert_eq!(
        install(&dir, &["--chain-state", state_file.to_str().unwrap()]).code,
        0
    );
    // A formerly active conflist still carrying the entry.
    std::fs::copy(net.join("10-calico.conflist"), net.join("20-old.conflist")).unwrap();
    let out = Command::new(BIN)
        .arg("uninstall")
        .arg(format!("--bin-dir={}", dir.0.join("bin").display()))
        .arg(format!("--conf-dir={}", net.display()))
        .arg(format!("--chain-state={}", state_file.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in ["10-calico.conflist", "20-old.conflist"] {
        let text = std::fs::read_to_string(net.join(f)).unwrap();
        assert!(!text.contains("irsa-imds-cni"), "{f}: {text}");
    }
    assert!(!dir.0.join("bin/irsa-imds-cni").exists());
    assert!(!state_file.exists());
}

/// Per-pod mode: the in-pod DNAT is the security control. When it cannot be installed the ADD
/// fails with a CNI error, even with the agent registering fine and failClosed off.
#[test]
fn per_pod_redirect_failure_fails_add_whatever_fail_open_says() {
    let agent = FakeAgent::start(r#"{"v":1,"ok":true}"#);
    let prev = sample("prevResult-1.0.0.json");
    for fail_closed in [false, true] {
        let r = cni(
            "ADD",
            &[
                ("CNI_CONTAINERID", "3a52ce78095f"),
                // No such namespace: nsenter fails.
                ("CNI_NETNS", "/var/run/netns/irsa-imds-no-such-netns"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_ARGS", "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-0"),
            ],
            &config(
                "1.0.0",
                &agent.socket(),
                Some(prev.clone()),
                json!({"podRedirect": true, "agentAddress": "10.0.1.23:8181", "failClosed": fail_closed}),
            ),
        );
        assert_eq!(r.code, 1, "failClosed={fail_closed}: {}", r.stdout);
        let e = r.json();
        assert_eq!(e["code"], 101, "{e}");
        assert_eq!(e["msg"], "cannot install pod redirect");
        assert_eq!(e["cniVersion"], "1.0.0");
    }
}
