//! The plugin as it ships to nodes (`tests/build-static-cni.sh`, the image's build): a static
//! executable, so the host's container runtime can run it whatever the host's libc, and it works
//! with an empty environment (no PATH, no HOME) from a directory holding nothing but itself.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Value, json};

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

fn static_bin() -> PathBuf {
    let p = target_dir().join("static/irsa-imds-cni");
    assert!(
        p.exists(),
        "{} missing: run tests/build-static-cni.sh first (tests/run.sh does)",
        p.display()
    );
    p
}

#[derive(Debug, PartialEq)]
enum Linking {
    Static,
    /// The interpreter (`PT_INTERP`) and the libraries (`DT_NEEDED` count).
    Dynamic {
        interp: bool,
        needed: usize,
    },
}

/// Reads the ELF64 program headers: static means no interpreter and no needed libraries
/// (a static-pie keeps a `PT_DYNAMIC` for its own relocations, with no `DT_NEEDED`).
fn linking(path: &Path) -> Linking {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..4], b"\x7fELF", "not ELF");
    assert_eq!(b[4], 2, "not ELF64");
    let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap()) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap()) as usize;
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    let (mut interp, mut needed) = (false, 0);
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        match u32_at(ph) {
            3 => interp = true, // PT_INTERP
            2 => {
                // PT_DYNAMIC: (d_tag, d_val) pairs up to DT_NULL.
                let (off, size) = (u64_at(ph + 8), u64_at(ph + 32));
                for e in (off..off + size).step_by(16) {
                    match u64_at(e) {
                        0 => break,
                        1 => needed += 1, // DT_NEEDED
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    if interp || needed > 0 {
        Linking::Dynamic { interp, needed }
    } else {
        Linking::Static
    }
}

#[test]
fn shipped_plugin_is_statically_linked() {
    let how = std::fs::read_to_string(target_dir().join("static/irsa-imds-cni.how")).unwrap();
    assert_eq!(linking(&static_bin()), Linking::Static, "built with {how}");
    // The check can fail: the ordinary debug build links the build machine's libc.
    let dynamic = linking(Path::new(env!("CARGO_BIN_EXE_irsa-imds-cni")));
    assert!(
        matches!(dynamic, Linking::Dynamic { interp: true, needed } if needed > 0),
        "{dynamic:?}"
    );
}

#[test]
fn add_and_del_work_with_an_empty_environment_from_an_empty_directory() {
    let dir = std::env::temp_dir().join(format!("irsa-cni-static-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (bin_dir, sock_dir) = (dir.join("bin"), dir.join("sock"));
    std::fs::create_dir_all(&bin_dir).unwrap();
    std::fs::create_dir_all(&sock_dir).unwrap();
    let plugin = bin_dir.join("irsa-imds-cni");
    std::fs::copy(static_bin(), &plugin).unwrap();
    assert_eq!(std::fs::read_dir(&bin_dir).unwrap().count(), 1);

    let sock = sock_dir.join("cni.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Value>::new()));
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
            let _ = conn.write_all(b"{\"v\":1,\"ok\":true}\n");
        }
    });
    let prev = json!({"cniVersion": "0.4.0", "interfaces": [{"name": "eth0"}],
                      "ips": [{"version": "4", "address": "10.0.12.47/32", "interface": 0}], "dns": {}});
    let conf = json!({"cniVersion": "0.4.0", "name": "aws-cni", "type": "irsa-imds-cni",
                      "agentSocket": sock, "failClosed": true, "prevResult": prev});
    let run = |command: &str| {
        let mut child = Command::new(&plugin)
            .current_dir(&bin_dir)
            .env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", "3a52ce78095f")
            .env("CNI_NETNS", "/var/run/netns/cni-1")
            .env("CNI_IFNAME", "eth0")
            .env("CNI_ARGS", "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(conf.to_string().as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let add = run("ADD");
    assert!(
        add.status.success(),
        "{} {}",
        String::from_utf8_lossy(&add.stdout),
        String::from_utf8_lossy(&add.stderr)
    );
    let out: Value = serde_json::from_slice(&add.stdout).unwrap();
    assert_eq!(out, prev, "prevResult passed through");
    let del = run("DEL");
    assert!(
        del.status.success(),
        "{}",
        String::from_utf8_lossy(&del.stderr)
    );
    let ops: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|v| format!("{} {}", v["op"], v["containerId"]))
        .collect();
    assert_eq!(
        ops,
        ["\"add\" \"3a52ce78095f\"", "\"del\" \"3a52ce78095f\""]
    );
    let _ = std::fs::remove_dir_all(&dir);
}
