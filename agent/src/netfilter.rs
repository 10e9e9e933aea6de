//! Host mode: the DNAT rule that sends pods' metadata traffic to the agent.
//!
//! The agent owns one `nat` chain (`IRSA-IMDS`) holding a single rule,
//! `-d 169.254.169.254/32 -i <pod interfaces> -p tcp --dport 80 -j DNAT --to <host ip>:<port>`,
//! and exactly one jump to it from `PREROUTING`. `ensure` is idempotent and restores a deleted or
//! altered rule; `remove` runs on clean shutdown only: after a crash the rule stays, so pods get
//! connection refused (fail closed), never the node's role.

use std::net::{SocketAddrV4, SocketAddrV6};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// iptables holds the xtables lock while it works; one stuck call must not wedge the agent.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// Seconds iptables may wait for the xtables lock (`-w`), below the command timeout.
const XTABLES_WAIT: &str = "5";
const IMDS_V4: &str = "169.254.169.254/32";
const IMDS_V6: &str = "fd00:ec2::254/128";
const COMMENT: &str = "irsa-imds";

#[derive(Debug, Clone)]
pub struct RedirectRule {
    pub chain: String,
    /// iptables `-i` pattern for pod-facing interfaces (`eni+`, `cali+`, `lxc+`, `veth+`).
    pub interface: String,
    pub target_v4: SocketAddrV4,
    /// When set, the same redirect for `[fd00:ec2::254]:80` with ip6tables.
    pub target_v6: Option<SocketAddrV6>,
    pub iptables: PathBuf,
    pub ip6tables: PathBuf,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetfilterError {
    #[error("{0} not found: install iptables or run without --iptables")]
    Missing(String),
    #[error("{0} is not permitted: the agent needs CAP_NET_ADMIN in the host network namespace")]
    NotPermitted(String),
    #[error("`{command}` timed out after {COMMAND_TIMEOUT:?}")]
    Timeout { command: String },
    #[error("`{command}` failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error("cannot run {0}: {1}")]
    Spawn(String, String),
}

#[derive(Clone, Copy)]
enum Family {
    V4,
    V6,
}

struct Outcome {
    ok: bool,
    stdout: String,
}

impl RedirectRule {
    /// The standard rule: chain `IRSA-IMDS`, `iptables`/`ip6tables` from `PATH`.
    pub fn new(interface: &str, target_v4: SocketAddrV4, target_v6: Option<SocketAddrV6>) -> Self {
        RedirectRule {
            chain: "IRSA-IMDS".into(),
            interface: interface.into(),
            target_v4,
            target_v6,
            iptables: "iptables".into(),
            ip6tables: "ip6tables".into(),
        }
    }

    fn families(&self) -> Vec<Family> {
        let mut f = vec![Family::V4];
        if self.target_v6.is_some() {
            f.push(Family::V6);
        }
        f
    }

    /// The rule inside the chain, as arguments after `-A/-C <chain>`.
    fn rule_args(&self, family: Family) -> Vec<String> {
        let (dst, to) = match family {
            Family::V4 => (IMDS_V4, self.target_v4.to_string()),
            Family::V6 => (
                IMDS_V6,
                self.target_v6.map(|t| t.to_string()).unwrap_or_default(),
            ),
        };
        [
            "-d",
            dst,
            "-i",
            &self.interface,
            "-p",
            "tcp",
            "-m",
            "tcp",
            "--dport",
            "80",
            "-m",
            "comment",
            "--comment",
            COMMENT,
            "-j",
            "DNAT",
            "--to-destination",
            &to,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    fn run(&self, family: Family, args: &[&str]) -> Result<Outcome, NetfilterError> {
        let bin = match family {
            Family::V4 => &self.iptables,
            Family::V6 => &self.ip6tables,
        };
        let mut full: Vec<&str> = vec!["-w", XTABLES_WAIT, "-t", "nat"];
        full.extend_from_slice(args);
        let command = format!("{} {}", bin.display(), full.join(" "));
        let mut child = Command::new(bin)
            .args(&full)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => NetfilterError::Missing(bin.display().to_string()),
                std::io::ErrorKind::PermissionDenied => {
                    NetfilterError::NotPermitted(bin.display().to_string())
                }
                _ => NetfilterError::Spawn(bin.display().to_string(), e.to_string()),
            })?;
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(NetfilterError::Timeout { command });
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => return Err(NetfilterError::Spawn(command, e.to_string())),
            }
        }
        let out = child
            .wait_with_output()
            .map_err(|e| NetfilterError::Spawn(command.clone(), e.to_string()))?;
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if !out.status.success()
            && (stderr.contains("Permission denied") || stderr.contains("Operation not permitted"))
        {
            return Err(NetfilterError::NotPermitted(bin.display().to_string()));
        }
        // Exit 1 is iptables' "no such rule/chain" answer to -C/-S; anything else is a failure.
        if !out.status.success() && out.status.code() != Some(1) {
            return Err(NetfilterError::Failed { command, stderr });
        }
        Ok(Outcome {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        })
    }

    fn must(&self, family: Family, args: &[&str]) -> Result<(), NetfilterError> {
        let o = self.run(family, args)?;
        if o.ok {
            Ok(())
        } else {
            Err(NetfilterError::Failed {
                command: args.join(" "),
                stderr: "exit status 1".into(),
            })
        }
    }

    /// Installs what is missing and repairs what was altered; true when anything changed.
    pub fn ensure(&self) -> Result<bool, NetfilterError> {
        let mut changed = false;
        for f in self.families() {
            changed |= self.ensure_family(f)?;
        }
        Ok(changed)
    }

    fn ensure_family(&self, f: Family) -> Result<bool, NetfilterError> {
        let chain = self.chain.as_str();
        let rule = self.rule_args(f);
        let rule: Vec<&str> = rule.iter().map(String::as_str).collect();
        let mut changed = false;

        let listing = self.run(f, &["-S", chain])?;
        if !listing.ok {
            self.must(f, &["-N", chain])?;
            changed = true;
        }
        let rules_in_chain = if listing.ok {
            listing
                .stdout
                .lines()
                .filter(|l| l.starts_with("-A "))
                .count()
        } else {
            0
        };
        let mut check = vec!["-C", chain];
        check.extend_from_slice(&rule);
        if rules_in_chain != 1 || !self.run(f, &check)?.ok {
            self.must(f, &["-F", chain])?;
            let mut add = vec!["-A", chain];
            add.extend_from_slice(&rule);
            self.must(f, &add)?;
            changed = true;
        }

        let jump = format!("-A PREROUTING -j {chain}");
        let jumps = self
            .run(f, &["-S", "PREROUTING"])?
            .stdout
            .lines()
            .filter(|l| l.trim() == jump)
            .count();
        if jumps == 0 {
            self.must(f, &["-I", "PREROUTING", "1", "-j", chain])?;
            changed = true;
        }
        for _ in 1..jumps {
            self.must(f, &["-D", "PREROUTING", "-j", chain])?;
            changed = true;
        }
        Ok(changed)
    }

    /// True when the chain holds exactly the wanted rule and PREROUTING jumps to it once.
    pub fn is_installed(&self) -> Result<bool, NetfilterError> {
        for f in self.families() {
            let rule = self.rule_args(f);
            let mut check = vec!["-C", self.chain.as_str()];
            check.extend(rule.iter().map(String::as_str));
            let jump = format!("-A PREROUTING -j {}", self.chain);
            let jumps = self
                .run(f, &["-S", "PREROUTING"])?
                .stdout
                .lines()
                .filter(|l| l.trim() == jump)
                .count();
            if !self.run(f, &check)?.ok || jumps != 1 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Removes the jump and the chain. Idempotent.
    pub fn remove(&self) -> Result<(), NetfilterError> {
        for f in self.families() {
            let chain = self.chain.as_str();
            // Bounded: someone may have added the jump several times.
            for _ in 0..16 {
                if !self.run(f, &["-D", "PREROUTING", "-j", chain])?.ok {
                    break;
                }
            }
            if self.run(f, &["-S", chain])?.ok {
                self.must(f, &["-F", chain])?;
                self.must(f, &["-X", chain])?;
            }
        }
        Ok(())
    }
}

/// Re-runs [`RedirectRule::ensure`] every `every` until `shutdown`; `on_restore` hears each repair.
pub async fn reconcile(
    rule: Arc<RedirectRule>,
    every: Duration,
    shutdown: CancellationToken,
    on_restore: impl Fn() + Send + 'static,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let r = rule.clone();
        match tokio::task::spawn_blocking(move || r.ensure()).await {
            Ok(Ok(true)) => {
                tracing::warn!(chain = %rule.chain, "redirect rule was missing or altered; restored");
                on_restore();
            }
            Ok(Ok(false)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "cannot reconcile redirect rule"),
            Err(e) => tracing::error!(error = %e, "redirect rule reconcile task failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_names_the_pod_interfaces_and_the_agent() {
        let r = RedirectRule::new(
            "eni+",
            "10.0.0.5:8181".parse().unwrap(),
            Some("[2600::5]:8181".parse().unwrap()),
        );
        let v4 = r.rule_args(Family::V4).join(" ");
        assert_eq!(
            v4,
            "-d 169.254.169.254/32 -i eni+ -p tcp -m tcp --dport 80 -m comment --comment irsa-imds -j DNAT --to-destination 10.0.0.5:8181"
        );
        let v6 = r.rule_args(Family::V6).join(" ");
        assert!(
            v6.starts_with("-d fd00:ec2::254/128 -i eni+")
                && v6.ends_with("--to-destination [2600::5]:8181"),
            "{v6}"
        );
    }

    #[test]
    fn missing_binary_is_a_clear_error() {
        let mut r = RedirectRule::new("eni+", "10.0.0.5:8181".parse().unwrap(), None);
        r.iptables = "/nonexistent/iptables".into();
        let e = r.ensure().unwrap_err().to_string();
        assert!(e.contains("not found") && e.contains("--iptables"), "{e}");
    }
}
