//! Per-pod redirect (`podRedirect`): the DNAT of 169.254.169.254:80 to the agent, inside the
//! pod's own network namespace. `nsenter` runs iptables there, so this process never changes
//! namespace itself; every command runs under a timeout.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(5);

pub fn install(netns: &str, agent: &str) -> Result<(), String> {
    if agent.parse::<std::net::SocketAddrV4>().is_err() {
        return Err(format!("agentAddress {agent:?} must be IPv4 ip:port"));
    }
    let rule = [
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
    let mut check = vec!["-C", "OUTPUT"];
    check.extend_from_slice(&rule);
    if run(netns, &check).is_ok() {
        return Ok(());
    }
    let mut add = vec!["-A", "OUTPUT"];
    add.extend_from_slice(&rule);
    run(netns, &add)
}

fn run(netns: &str, args: &[&str]) -> Result<(), String> {
    let mut child = Command::new("nsenter")
        .arg(format!("--net={netns}"))
        .args(["--", "iptables", "-w", "5", "-t", "nat"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run nsenter/iptables: {e}"))?;
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
                    "iptables {} failed ({status}): {}",
                    args.join(" "),
                    err.trim()
                ));
            }
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err("iptables timed out".into());
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(e.to_string()),
        }
    }
}
