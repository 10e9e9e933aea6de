//! `install` / `uninstall`: put the plugin binary in the CNI bin dir and chain the plugin into the
//! node's conflist (the first `*.conflist` in lexical order, the one the runtime uses). Both are
//! atomic (temp file + rename in the same directory) and idempotent, and leave every other
//! plugin exactly as it was.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

pub const PLUGIN_TYPE: &str = "irsa-imds-cni";
pub const USAGE: &str = "usage:
  irsa-imds-cni install [--bin-dir DIR] [--conf-dir DIR] [--socket PATH] [--timeout-ms N]
                        [--fail-closed] [--pod-redirect --agent-address IP:PORT] [--log-file PATH]
  irsa-imds-cni uninstall [--bin-dir DIR] [--conf-dir DIR]
  (as a CNI plugin it is run by the container runtime with CNI_COMMAND set)
defaults: --bin-dir /host/opt/cni/bin --conf-dir /host/etc/cni/net.d --socket /run/irsa-imds/cni.sock";

struct Opts {
    bin_dir: PathBuf,
    conf_dir: PathBuf,
    socket: String,
    timeout_ms: Option<u64>,
    fail_closed: bool,
    pod_redirect: bool,
    agent_address: Option<String>,
    log_file: Option<String>,
}

fn parse(args: &[String], install: bool) -> Result<Opts, String> {
    let mut o = Opts {
        bin_dir: "/host/opt/cni/bin".into(),
        conf_dir: "/host/etc/cni/net.d".into(),
        socket: crate::cni::DEFAULT_SOCKET.into(),
        timeout_ms: None,
        fail_closed: false,
        pod_redirect: false,
        agent_address: None,
        log_file: None,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value\n\n{USAGE}"))
        };
        match (flag.as_str(), install) {
            ("--bin-dir", _) => o.bin_dir = value()?.into(),
            ("--conf-dir", _) => o.conf_dir = value()?.into(),
            ("--socket", true) => o.socket = value()?,
            ("--timeout-ms", true) => {
                let v = value()?;
                o.timeout_ms = Some(
                    v.parse()
                        .ok()
                        .filter(|t| (1..=10_000).contains(t))
                        .ok_or(format!("--timeout-ms {v:?}: 1..=10000"))?,
                );
            }
            ("--fail-closed", true) => o.fail_closed = true,
            ("--pod-redirect", true) => o.pod_redirect = true,
            ("--agent-address", true) => o.agent_address = Some(value()?),
            ("--log-file", true) => o.log_file = Some(value()?),
            _ => return Err(format!("unknown flag {flag:?}\n\n{USAGE}")),
        }
    }
    if o.pod_redirect
        && o.agent_address
            .as_deref()
            .and_then(|a| a.parse::<std::net::SocketAddrV4>().ok())
            .is_none()
    {
        return Err("--pod-redirect needs --agent-address IP:PORT".into());
    }
    Ok(o)
}

/// The node's active conflist: the first `*.conflist` in lexical order.
fn conflist(dir: &Path) -> Result<PathBuf, String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .is_some_and(|x| x == "conflist" || x == "conf" || x == "json")
        })
        .collect();
    files.sort();
    let first = files
        .first()
        .ok_or_else(|| format!("no CNI config in {}", dir.display()))?;
    if first.extension().is_some_and(|x| x != "conflist") {
        return Err(format!(
            "{} is a single-plugin config; chaining needs a .conflist",
            first.display()
        ));
    }
    Ok(first.clone())
}

fn read(path: &Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| format!("{} is not valid JSON: {e}", path.display()))?;
    if !v.get("plugins").is_some_and(Value::is_array) {
        return Err(format!("{} has no plugins array", path.display()));
    }
    Ok(v)
}

/// Writes next to the target and renames over it, so the runtime never reads half a file.
fn write_atomic(path: &Path, bytes: &[u8], mode: Option<u32>) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().ok_or("no parent directory")?;
    let tmp = dir.join(format!(
        ".{}.irsa-imds.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    std::fs::write(&tmp, bytes).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    if let Some(m) = mode {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(m))
            .map_err(|e| e.to_string())?;
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot replace {}: {e}", path.display())
    })
}

fn is_ours(p: &Value) -> bool {
    p.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

pub fn install(args: &[String]) -> Result<String, String> {
    let o = parse(args, true)?;
    let me = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    std::fs::create_dir_all(&o.bin_dir)
        .map_err(|e| format!("cannot create {}: {e}", o.bin_dir.display()))?;
    let bin = std::fs::read(&me).map_err(|e| format!("cannot read {}: {e}", me.display()))?;
    let dest = o.bin_dir.join(PLUGIN_TYPE);
    if std::fs::read(&dest).ok().as_deref() != Some(&bin[..]) {
        write_atomic(&dest, &bin, Some(0o755))?;
    }

    let path = conflist(&o.conf_dir)?;
    let mut conf = read(&path)?;
    let mut entry = json!({"type": PLUGIN_TYPE, "name": "irsa-imds", "agentSocket": o.socket});
    if let Some(t) = o.timeout_ms {
        entry["timeoutMs"] = json!(t);
    }
    if o.fail_closed {
        entry["failClosed"] = json!(true);
    }
    if o.pod_redirect {
        entry["podRedirect"] = json!(true);
        entry["agentAddress"] = json!(o.agent_address);
    }
    if let Some(l) = o.log_file {
        entry["logFile"] = json!(l);
    }
    let plugins = conf["plugins"]
        .as_array_mut()
        .ok_or("plugins is not an array")?;
    let before: Vec<Value> = plugins.clone();
    plugins.retain(|p| !is_ours(p));
    plugins.push(entry);
    if *plugins == before {
        return Ok(format!("already installed in {}", path.display()));
    }
    let mut text = serde_json::to_string_pretty(&conf).map_err(|e| e.to_string())?;
    text.push('\n');
    write_atomic(&path, text.as_bytes(), None)?;
    Ok(format!(
        "installed {} and chained it into {}",
        dest.display(),
        path.display()
    ))
}

pub fn uninstall(args: &[String]) -> Result<String, String> {
    let o = parse(args, false)?;
    let mut touched = Vec::new();
    if let Ok(path) = conflist(&o.conf_dir) {
        let mut conf = read(&path)?;
        let plugins = conf["plugins"]
            .as_array_mut()
            .ok_or("plugins is not an array")?;
        let n = plugins.len();
        plugins.retain(|p| !is_ours(p));
        if plugins.len() != n {
            let mut text = serde_json::to_string_pretty(&conf).map_err(|e| e.to_string())?;
            text.push('\n');
            write_atomic(&path, text.as_bytes(), None)?;
            touched.push(path.display().to_string());
        }
    }
    let bin = o.bin_dir.join(PLUGIN_TYPE);
    match std::fs::remove_file(&bin) {
        Ok(()) => touched.push(bin.display().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot remove {}: {e}", bin.display())),
    }
    Ok(if touched.is_empty() {
        "nothing to uninstall".into()
    } else {
        format!("removed from {}", touched.join(", "))
    })
}
