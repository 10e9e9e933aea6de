//! The CNI plugin protocol (spec 0.3.x–1.1.0) for a chained plugin that only observes.
//!
//! [`parse`] turns the runtime's input (stdin and the `CNI_*` environment) into an
//! [`Invocation`] or the CNI error to print, touching nothing (it is what the fuzz target
//! drives); [`run`] then carries it out: the agent's socket, the per-pod redirect, the log.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};

use crate::agent;

/// A runtime's network config is a few KiB; anything past this is refused.
pub const MAX_CONFIG: u64 = 1 << 20;
pub const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
pub const DEFAULT_SOCKET: &str = crate::DEFAULT_SOCKET;
const DEFAULT_TIMEOUT_MS: u64 = 250;

/// Error codes from the CNI spec.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    /// Plugin-specific (100+): CHECK found the sandbox unregistered.
    pub const NOT_REGISTERED: u32 = 100;
    /// Plugin-specific: the per-pod metadata redirect could not be installed.
    pub const POD_REDIRECT: u32 = 101;
}

#[derive(Debug)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: &str, details: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.to_string(),
            details: details.into(),
        }
    }

    pub fn to_json(&self, version: Option<String>) -> String {
        json!({
            "cniVersion": version.unwrap_or_else(|| "1.1.0".into()),
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
        .to_string()
    }
}

/// The `cniVersion` the caller asked for, if readable (errors answer in it).
pub fn requested_version(stdin: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(stdin).ok()?;
    v.get("cniVersion")?
        .as_str()
        .filter(|s| SUPPORTED.contains(s))
        .map(String::from)
}

/// The `CNI_*` environment, captured once so tests can drive `run` directly too.
#[derive(Debug, Default, Clone)]
pub struct Env {
    pub command: Option<String>,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: Option<String>,
}

impl Env {
    pub fn from_process() -> Self {
        let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Env {
            command: get("CNI_COMMAND"),
            container_id: get("CNI_CONTAINERID"),
            netns: get("CNI_NETNS"),
            ifname: get("CNI_IFNAME"),
            args: get("CNI_ARGS"),
        }
    }
}

/// This plugin's keys in its conflist entry.
#[derive(Debug)]
pub struct PluginConf {
    socket: PathBuf,
    timeout: Duration,
    fail_closed: bool,
    pod_redirect: bool,
    agent_address: Option<String>,
    log_file: Option<PathBuf>,
}

impl PluginConf {
    fn from(conf: &Value) -> Result<Self, CniError> {
        let s = |k: &str| conf.get(k).and_then(Value::as_str).map(String::from);
        let b = |k: &str| -> Result<bool, CniError> {
            match conf.get(k) {
                None | Some(Value::Null) => Ok(false),
                Some(Value::Bool(v)) => Ok(*v),
                Some(_) => Err(CniError::new(
                    code::INVALID_CONFIG,
                    "invalid plugin config",
                    format!("{k} must be a boolean"),
                )),
            }
        };
        let timeout_ms = match conf.get("timeoutMs") {
            None | Some(Value::Null) => DEFAULT_TIMEOUT_MS,
            Some(v) => v
                .as_u64()
                .filter(|t| (1..=10_000).contains(t))
                .ok_or_else(|| {
                    CniError::new(
                        code::INVALID_CONFIG,
                        "invalid plugin config",
                        "timeoutMs must be 1..=10000",
                    )
                })?,
        };
        let pc = PluginConf {
            socket: PathBuf::from(s("agentSocket").unwrap_or_else(|| DEFAULT_SOCKET.into())),
            timeout: Duration::from_millis(timeout_ms),
            fail_closed: b("failClosed")?,
            pod_redirect: b("podRedirect")?,
            agent_address: s("agentAddress"),
            log_file: s("logFile").map(PathBuf::from),
        };
        if pc.pod_redirect && pc.agent_address.is_none() {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "invalid plugin config",
                "podRedirect needs agentAddress",
            ));
        }
        Ok(pc)
    }

    fn log(&self, msg: &str) {
        // One event, one line: control characters from anything the runtime passed are escaped.
        let line = format!("irsa-imds-cni: {}\n", escape_controls(msg));
        if let Some(path) = &self.log_file
            && let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
        {
            let _ = f.write_all(line.as_bytes());
            return;
        }
        let _ = std::io::stderr().write_all(line.as_bytes());
    }
}

/// `K8S_POD_NAMESPACE=..;K8S_POD_NAME=..` into a map; malformed pairs are ignored, as runtimes do.
fn cni_args(raw: Option<&str>) -> HashMap<String, String> {
    raw.unwrap_or("")
        .split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// The bare addresses of `prevResult.ips[].address` (prefix length stripped).
fn result_ips(prev: &Value) -> Result<Vec<String>, CniError> {
    let mut out = Vec::new();
    for ip in prev
        .get("ips")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
    {
        let addr = ip.get("address").and_then(Value::as_str).ok_or_else(|| {
            CniError::new(
                code::INVALID_CONFIG,
                "invalid prevResult",
                "an ips entry has no address",
            )
        })?;
        let bare = addr.split('/').next().unwrap_or(addr);
        let parsed: std::net::IpAddr = bare.parse().map_err(|_| {
            CniError::new(
                code::INVALID_CONFIG,
                "invalid prevResult",
                format!("{addr:?} is not an address"),
            )
        })?;
        out.push(parsed.to_string());
    }
    Ok(out)
}

/// A pod to register: `CNI_ARGS` named it, `prevResult` gave it addresses, and the agent's own
/// validators accept it.
#[derive(Debug)]
pub struct PodAdd {
    pub namespace: String,
    pub name: String,
    pub ips: Vec<String>,
}

/// One validated CNI command, ready to carry out.
#[derive(Debug)]
pub enum Invocation {
    Version {
        version: String,
    },
    Add {
        conf: PluginConf,
        container_id: String,
        /// Passed on unchanged.
        prev: Value,
        /// `None`: not a Kubernetes pod, or no addresses: nothing to register.
        pod: Option<PodAdd>,
        netns: Option<String>,
    },
    Del {
        conf: PluginConf,
        container_id: String,
    },
    Check {
        conf: PluginConf,
        container_id: String,
        /// `None`: not a Kubernetes pod, or no addresses: nothing to check.
        ips: Option<Vec<String>>,
    },
    Status {
        conf: PluginConf,
    },
    Gc {
        conf: PluginConf,
        /// The runtime's `cni.dev/valid-attachments`, if it sent them.
        valid: Option<Vec<String>>,
    },
}

/// Decodes and validates one invocation; no side effect, whatever the input.
pub fn parse(env: &Env, stdin: &[u8]) -> Result<Invocation, CniError> {
    let command = env.command.as_deref().unwrap_or("");
    let conf: Value = if stdin.iter().all(u8::is_ascii_whitespace) && command == "VERSION" {
        json!({})
    } else {
        serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(code::DECODE, "cannot decode network config", e.to_string())
        })?
    };
    if !conf.is_object() {
        return Err(CniError::new(
            code::DECODE,
            "cannot decode network config",
            "not a JSON object",
        ));
    }
    let version = match conf.get("cniVersion") {
        None if command == "VERSION" => "1.1.0".to_string(),
        None => {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "network config has no cniVersion",
                "",
            ));
        }
        Some(v) => v.as_str().unwrap_or("").to_string(),
    };
    if !SUPPORTED.contains(&version.as_str()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            "incompatible CNI version",
            format!("{version:?} is not one of {}", SUPPORTED.join(", ")),
        ));
    }
    if command == "VERSION" {
        return Ok(Invocation::Version { version });
    }
    let pc = PluginConf::from(&conf)?;
    // Runtimes use hex ids; the agent accepts [A-Za-z0-9._-]{1,128}. Refused before anything is
    // logged or sent, and never echoed (it may carry newlines meant to forge log lines).
    let container_id = || -> Result<String, CniError> {
        let id = env.container_id.clone().ok_or_else(|| {
            CniError::new(
                code::INVALID_ENV,
                "missing environment variable",
                "CNI_CONTAINERID",
            )
        })?;
        if valid_container_id(&id) {
            Ok(id)
        } else {
            Err(CniError::new(
                code::INVALID_ENV,
                "invalid CNI_CONTAINERID",
                "expected 1-128 characters of [A-Za-z0-9._-]",
            ))
        }
    };
    let need = |v: &Option<String>, name: &str| {
        v.clone().ok_or_else(|| {
            CniError::new(
                code::INVALID_ENV,
                "missing environment variable",
                name.to_string(),
            )
        })
    };
    match command {
        "ADD" => {
            let container_id = container_id()?;
            need(&env.ifname, "CNI_IFNAME")?;
            let prev = conf.get("prevResult").cloned().ok_or_else(|| {
                CniError::new(
                    code::INVALID_CONFIG,
                    "no prevResult",
                    "irsa-imds-cni is a chained plugin: list it after the main plugin",
                )
            })?;
            let ips = result_ips(&prev)?;
            let args = cni_args(env.args.as_deref());
            let pod = match (args.get("K8S_POD_NAMESPACE"), args.get("K8S_POD_NAME")) {
                (Some(ns), Some(name)) if !ips.is_empty() => {
                    // The agent's own rules (one crate for both): what it would refuse is the
                    // runtime's error here, never an "agent unavailable".
                    if let Err(e) = agent::add_request(&container_id, ns, name, &ips).validate() {
                        return Err(CniError::new(
                            code::INVALID_ENV,
                            "invalid CNI_ARGS",
                            e.to_string(),
                        ));
                    }
                    Some(PodAdd {
                        namespace: ns.clone(),
                        name: name.clone(),
                        ips,
                    })
                }
                _ => None,
            };
            Ok(Invocation::Add {
                conf: pc,
                container_id,
                prev,
                pod,
                netns: env.netns.clone(),
            })
        }
        "DEL" => Ok(Invocation::Del {
            conf: pc,
            container_id: container_id()?,
        }),
        "CHECK" => {
            if version.starts_with("0.3") {
                return Err(CniError::new(
                    code::INCOMPATIBLE_VERSION,
                    "CHECK needs cniVersion 0.4.0 or later",
                    version,
                ));
            }
            let container_id = container_id()?;
            let prev = conf.get("prevResult").cloned().ok_or_else(|| {
                CniError::new(
                    code::INVALID_CONFIG,
                    "no prevResult",
                    "CHECK needs the chain's prevResult",
                )
            })?;
            let ips = result_ips(&prev)?;
            let args = cni_args(env.args.as_deref());
            let ips = (args.contains_key("K8S_POD_NAME") && !ips.is_empty()).then_some(ips);
            Ok(Invocation::Check {
                conf: pc,
                container_id,
                ips,
            })
        }
        "STATUS" => Ok(Invocation::Status { conf: pc }),
        "GC" => {
            // Without the runtime's list there is nothing safe to collect.
            let valid = match conf
                .get("cni.dev/valid-attachments")
                .and_then(Value::as_array)
            {
                None => None,
                Some(list) => {
                    let mut valid = Vec::with_capacity(list.len());
                    for a in list {
                        let id = a
                            .get("containerID")
                            .and_then(Value::as_str)
                            .ok_or_else(|| {
                                CniError::new(
                                    code::INVALID_CONFIG,
                                    "invalid cni.dev/valid-attachments",
                                    "an entry has no containerID",
                                )
                            })?;
                        valid.push(id.to_string());
                    }
                    Some(valid)
                }
            };
            Ok(Invocation::Gc { conf: pc, valid })
        }
        "" => Err(CniError::new(
            code::INVALID_ENV,
            "missing environment variable",
            "CNI_COMMAND",
        )),
        other => Err(CniError::new(
            code::INVALID_ENV,
            "unknown CNI_COMMAND",
            other.chars().take(32).collect::<String>(),
        )),
    }
}

/// Runs one CNI command; `Ok(Some(json))` is printed on stdout, `Ok(None)` prints nothing.
pub fn run(env: &Env, stdin: &[u8]) -> Result<Option<String>, CniError> {
    match parse(env, stdin)? {
        Invocation::Version { version } => Ok(Some(
            json!({"cniVersion": version, "supportedVersions": SUPPORTED}).to_string(),
        )),
        Invocation::Add {
            conf: pc,
            container_id,
            prev,
            pod,
            netns,
        } => {
            match pod {
                Some(PodAdd {
                    namespace: ns,
                    name,
                    ips,
                }) => {
                    if let Err(e) =
                        agent::add(&pc.socket, pc.timeout, &container_id, &ns, &name, &ips)
                    {
                        if pc.fail_closed {
                            return Err(CniError::new(
                                code::TRY_AGAIN_LATER,
                                "irsa-imds agent unavailable",
                                e.to_string(),
                            ));
                        }
                        pc.log(&format!("ADD {ns}/{name} ({container_id}): not registered, continuing (fail-open): {e}"));
                    }
                    // The redirect is the security control, so it fails the ADD whatever
                    // failClosed says: a pod without it would reach the real IMDS.
                    if pc.pod_redirect {
                        let netns = netns.ok_or_else(|| {
                            CniError::new(
                                code::INVALID_ENV,
                                "missing environment variable",
                                "CNI_NETNS",
                            )
                        })?;
                        let addr = pc.agent_address.as_deref().unwrap_or_default();
                        crate::redirect::install(&netns, addr).map_err(|e| {
                            CniError::new(code::POD_REDIRECT, "cannot install pod redirect", e)
                        })?;
                    }
                }
                None => pc.log(&format!(
                    "ADD {container_id}: not a Kubernetes pod or no IPs; nothing to register"
                )),
            }
            // The chain's result goes on exactly as it came, in its own version.
            Ok(Some(prev.to_string()))
        }
        Invocation::Del {
            conf: pc,
            container_id,
        } => {
            // Idempotent, and a missing agent is not an error: the sandbox is going away anyway.
            if let Err(e) = agent::del(&pc.socket, pc.timeout, &container_id) {
                pc.log(&format!("DEL {container_id}: {e} (ignored)"));
            }
            Ok(None)
        }
        Invocation::Check {
            conf: pc,
            container_id,
            ips,
        } => {
            let Some(ips) = ips else {
                return Ok(None);
            };
            match agent::check(&pc.socket, pc.timeout, &container_id, &ips) {
                Ok(()) => Ok(None),
                Err(e) if e.is_unavailable() && !pc.fail_closed => {
                    pc.log(&format!(
                        "CHECK {container_id}: agent unavailable (fail-open): {e}"
                    ));
                    Ok(None)
                }
                Err(e) if e.is_unavailable() => Err(CniError::new(
                    code::TRY_AGAIN_LATER,
                    "irsa-imds agent unavailable",
                    e.to_string(),
                )),
                Err(e) => Err(CniError::new(
                    code::NOT_REGISTERED,
                    "sandbox not registered with the irsa-imds agent",
                    e.to_string(),
                )),
            }
        }
        Invocation::Status { conf: pc } => {
            if !pc.fail_closed {
                return Ok(None);
            }
            match std::os::unix::net::UnixStream::connect(&pc.socket) {
                Ok(_) => Ok(None),
                Err(e) => Err(CniError::new(
                    code::NOT_AVAILABLE,
                    "irsa-imds agent unavailable",
                    e.to_string(),
                )),
            }
        }
        // Registrations die with their sandboxes' DELs; GC only drops what the runtime no longer
        // knows, and without its list there is nothing safe to collect.
        Invocation::Gc { valid: None, .. } => Ok(None),
        Invocation::Gc {
            conf: pc,
            valid: Some(valid),
        } => {
            // Registrations are the agent's state; with the agent down there is nothing to collect.
            if let Err(e) = agent::gc(&pc.socket, pc.timeout, &valid) {
                pc.log(&format!("GC: {e} (ignored)"));
            }
            Ok(None)
        }
    }
}

fn valid_container_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn escape_controls(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_container_id_with_a_newline_is_refused_before_any_log() {
        for bad in ["abc\ninjected line", "", "a b", "../x", &"a".repeat(129)] {
            let env = Env {
                command: Some("DEL".into()),
                container_id: Some(bad.to_string()),
                ..Default::default()
            };
            let conf = br#"{"cniVersion":"1.0.0","name":"n","type":"irsa-imds-cni","agentSocket":"/nonexistent/x.sock"}"#;
            let err = run(&env, conf).unwrap_err();
            assert_eq!(err.code, code::INVALID_ENV, "{bad:?}");
            assert!(!err.to_json(None).contains("injected"), "not echoed");
        }
        assert_eq!(escape_controls("a\nb\r\u{1b}c"), "a\\nb\\r\\u{1b}c");
    }

    #[test]
    fn cni_args_parse_like_runtimes_send_them() {
        let a = cni_args(Some(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=team;K8S_POD_NAME=api-0;K8S_POD_INFRA_CONTAINER_ID=abc;junk",
        ));
        assert_eq!(a.get("K8S_POD_NAMESPACE").map(String::as_str), Some("team"));
        assert_eq!(a.get("K8S_POD_NAME").map(String::as_str), Some("api-0"));
        assert!(cni_args(None).is_empty());
    }

    #[test]
    fn ips_lose_their_prefix_length() {
        let prev = json!({"ips": [{"version": "4", "address": "10.0.12.47/32"}, {"address": "fd00::9/128"}]});
        assert_eq!(result_ips(&prev).unwrap(), vec!["10.0.12.47", "fd00::9"]);
        assert!(result_ips(&json!({"ips": [{"address": "nope/32"}]})).is_err());
        assert!(result_ips(&json!({})).unwrap().is_empty());
    }
}
