//! Per-pod redirect (`podRedirect`): inside the pod's own network namespace, the DNAT of
//! `169.254.169.254:80` to the agent and a refusal of `[fd00:ec2::254]:80` (the agent's address is
//! IPv4 here, so the IPv6 metadata endpoint is closed rather than left to answer with the node's
//! role). `nsenter` runs iptables there, so this process never changes namespace itself; every
//! command runs under a timeout. Any failure fails the ADD: this is the security control.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(5);
/// The runtime may run plugins with no `PATH` at all; these are where nsenter/iptables live.
const FALLBACK_PATH: &[&str] = &[
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

pub fn install(netns: &str, agent: &str) -> Result<(), String> {
    if agent.parse::<std::net::SocketAddrV4>().is_err() {
        return Err(format!("agentAddress {agent:?} must be IPv4 ip:port"));
    }
    let v4 = [
        "-d",
        "169.254.169.254/32",
        "-p",
        "tcp",
        "--dport",
        "80",
        "-j",
        "DNAT",
        "--to-destination",
        agent,
    ];
    ensure(netns, "iptables", "nat", &v4)?;
    let v6 = [
        "-d",
        "fd00:ec2::254/128",
        "-p",
        "tcp",
        "--dport",
        "80",
        "-j",
        "REJECT",
        "--reject-with",
        "tcp-reset",
    ];
    ensure(netns, "ip6tables", "filter", &v6)
}

/// Appends `rule` to `OUTPUT` unless it is there already (a runtime's ADD retry).
fn ensure(netns: &str, tool: &str, table: &str, rule: &[&str]) -> Result<(), String> {
    let mut check = vec!["-C", "OUTPUT"];
    check.extend_from_slice(rule);
    if run(netns, tool, table, &check).is_ok() {
        return Ok(());
    }
    let mut add = vec!["-A", "OUTPUT"];
    add.extend_from_slice(rule);
    run(netns, tool, table, &add)
}

/// `name` on `PATH`, or in the usual system directories when the runtime gave no `PATH`.
fn find_program(name: &str) -> Result<PathBuf, String> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .filter(|d| !d.is_empty())
        .chain(FALLBACK_PATH.iter().copied())
        .map(|d| PathBuf::from(d).join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("{name} not found (PATH and {})", FALLBACK_PATH.join(":")))
}

fn run(netns: &str, tool: &str, table: &str, args: &[&str]) -> Result<(), String> {
    let nsenter = find_program("nsenter")?;
    let iptables = find_program(tool)?;
    let mut child = Command::new(&nsenter)
        .arg(format!("--net={netns}"))
        .arg("--")
        .arg(&iptables)
        .args(["-w", "5", "-t", table])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", nsenter.display()))?;
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                return Err(format!(
                    "{tool} -t {table} {} failed ({status}): {}",
                    args.join(" "),
                    err.trim()
                ));
            }
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{tool} timed out"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(e.to_string()),
        }
    }
}
