//! Host mode: the rules that send pods' metadata traffic to the agent, and nowhere else.
//!
//! The agent owns one chain called `IRSA-IMDS` per table it uses, and exactly one jump to it from
//! each hook:
//! - IPv4, `nat` from `PREROUTING`: per pod-interface pattern,
//!   `-d 169.254.169.254/32 -i <pattern> -p tcp --dport 80 -j DNAT --to <host ip>:<port>`;
//! - IPv6 with `--host-ipv6`, `nat` from `PREROUTING`: the same DNAT for `[fd00:ec2::254]:80`;
//! - IPv6 without it, `filter` from `INPUT` and `FORWARD`: the same match `-j REJECT
//!   --reject-with tcp-reset`, so on instances with the IPv6 IMDS endpoint a pod is refused, never
//!   served the node's role.
//!
//! [`RedirectRule::ensure`] is idempotent and restores a deleted or altered rule. Nothing removes the
//! rules when the agent stops, crashes or is upgraded: pods then get connection refused (fail
//! closed), never the node's role. Only [`uninstall`] (`irsa-imds-agent uninstall`) removes them.
//!
//! The rules go into the iptables backend the node already uses ([`detect_backend`], as
//! kube-proxy's iptables-wrapper decides), so the kernel path the node's traffic takes sees them.

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
pub(crate) const CHAIN: &str = "IRSA-IMDS";
/// kube-proxy and the kubelet create these in the backend they use (iptables-wrapper reads them).
const BACKEND_HINTS: &[&str] = &[":KUBE-IPTABLES-HINT", ":KUBE-KUBELET-CANARY"];

/// Which iptables binaries program the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `iptables-legacy` / `ip6tables-legacy` (x_tables; Amazon Linux 2, older distributions).
    Legacy,
    /// `iptables-nft` / `ip6tables-nft` (nf_tables; Amazon Linux 2023, Bottlerocket, Ubuntu 22.04+).
    Nft,
    /// Plain `iptables` / `ip6tables`, whichever backend they are built for.
    Plain,
}

impl Backend {
    pub(crate) fn binaries(self) -> (PathBuf, PathBuf) {
        let (v4, v6) = match self {
            Backend::Legacy => ("iptables-legacy", "ip6tables-legacy"),
            Backend::Nft => ("iptables-nft", "ip6tables-nft"),
            Backend::Plain => ("iptables", "ip6tables"),
        };
        (v4.into(), v6.into())
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Legacy => "legacy",
            Backend::Nft => "nft",
            Backend::Plain => "plain",
        }
    }
}

#[derive(Debug, Clone)]
pub struct RedirectRule {
    pub chain: String,
    /// iptables `-i` patterns for pod-facing interfaces (`eni+`, `vlan+`, `cali+`, `lxc+`); each
    /// gets its own rule.
    pub interfaces: Vec<String>,
    pub target_v4: SocketAddrV4,
    /// When set, `[fd00:ec2::254]:80` is redirected there; when not, it is refused.
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

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

/// One table's share of the rules: the chain in `table`, jumped to from each of `hooks`.
struct Placement {
    family: Family,
    table: &'static str,
    hooks: &'static [&'static str],
    rules: Vec<Vec<String>>,
}

/// Every place any version of the agent may have put a chain, for removal.
const ALL_PLACES: &[(Family, &str, &[&str])] = &[
    (Family::V4, "nat", &["PREROUTING"]),
    (Family::V6, "nat", &["PREROUTING"]),
    (Family::V6, "filter", &["INPUT", "FORWARD"]),
];

struct Outcome {
    ok: bool,
    stdout: String,
}

/// Runs one command under [`COMMAND_TIMEOUT`]. Exit 1 is iptables' "no such rule/chain" answer
/// to -C/-S and comes back as `ok: false`; any other failure is an error.
fn exec(bin: &std::path::Path, args: &[&str]) -> Result<Outcome, NetfilterError> {
    let command = format!("{} {}", bin.display(), args.join(" "));
    let mut child = Command::new(bin)
        .args(args)
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
    if !out.status.success() && out.status.code() != Some(1) {
        return Err(NetfilterError::Failed { command, stderr });
    }
    Ok(Outcome {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
    })
}

/// What one backend's `*-save` shows: rule lines and whether kube's hint chains are there.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BackendUsage {
    pub rules: usize,
    pub hinted: bool,
}

impl BackendUsage {
    /// Reads `iptables-save` output (v4 and v6 concatenated).
    pub(crate) fn from_save(text: &str) -> Self {
        BackendUsage {
            rules: text.lines().filter(|l| l.starts_with('-')).count(),
            hinted: text
                .lines()
                .any(|l| BACKEND_HINTS.iter().any(|h| l.starts_with(h))),
        }
    }
}

/// The iptables-wrapper decision: the backend kube's hint chains are in; else the one holding
/// more rules; nft on a tie (a new node with nothing yet, where nft is the present default).
pub(crate) fn choose_backend(legacy: BackendUsage, nft: BackendUsage) -> Backend {
    match (legacy.hinted, nft.hinted) {
        (true, false) => Backend::Legacy,
        (false, true) => Backend::Nft,
        _ if legacy.rules > nft.rules => Backend::Legacy,
        _ => Backend::Nft,
    }
}

/// Detects the backend the node uses from `iptables-{legacy,nft}-save` (and the ip6tables ones).
/// Without the split binaries (an image that ships only one `iptables`), [`Backend::Plain`].
pub(crate) fn detect_backend() -> Backend {
    let usage = |b: Backend| -> Option<BackendUsage> {
        let (v4, v6) = b.binaries();
        let mut text = String::new();
        let mut found = false;
        for bin in [v4, v6] {
            let save = PathBuf::from(format!("{}-save", bin.display()));
            match exec(&save, &[]) {
                Ok(o) => {
                    found = true;
                    text.push_str(&o.stdout);
                }
                Err(NetfilterError::Missing(_)) => {}
                Err(e) => tracing::debug!(error = %e, "backend probe failed"),
            }
        }
        found.then(|| BackendUsage::from_save(&text))
    };
    match (usage(Backend::Legacy), usage(Backend::Nft)) {
        (Some(l), Some(n)) => {
            let b = choose_backend(l, n);
            tracing::info!(
                backend = b.name(),
                legacy_rules = l.rules,
                nft_rules = n.rules,
                "iptables backend detected"
            );
            b
        }
        (Some(_), None) => Backend::Legacy,
        (None, Some(_)) => Backend::Nft,
        (None, None) => Backend::Plain,
    }
}

impl RedirectRule {
    /// The standard rules: chain `IRSA-IMDS`, plain `iptables`/`ip6tables` from `PATH`.
    pub(crate) fn new(
        interfaces: &[String],
        target_v4: SocketAddrV4,
        target_v6: Option<SocketAddrV6>,
    ) -> Self {
        let (iptables, ip6tables) = Backend::Plain.binaries();
        RedirectRule {
            chain: CHAIN.into(),
            interfaces: interfaces.to_vec(),
            target_v4,
            target_v6,
            iptables,
            ip6tables,
        }
    }

    pub(crate) fn with_backend(mut self, backend: Backend) -> Self {
        (self.iptables, self.ip6tables) = backend.binaries();
        self
    }

    fn placements(&self) -> Vec<Placement> {
        let mut v4 = Placement {
            family: Family::V4,
            table: "nat",
            hooks: &["PREROUTING"],
            rules: Vec::new(),
        };
        let mut v6 = match self.target_v6 {
            Some(_) => Placement {
                family: Family::V6,
                table: "nat",
                hooks: &["PREROUTING"],
                rules: Vec::new(),
            },
            None => Placement {
                family: Family::V6,
                table: "filter",
                hooks: &["INPUT", "FORWARD"],
                rules: Vec::new(),
            },
        };
        for i in &self.interfaces {
            v4.rules.push(self.rule_args(Family::V4, i));
            v6.rules.push(self.rule_args(Family::V6, i));
        }
        vec![v4, v6]
    }

    /// One rule inside the chain, as arguments after `-A/-C <chain>`.
    fn rule_args(&self, family: Family, interface: &str) -> Vec<String> {
        let dst = match family {
            Family::V4 => IMDS_V4,
            Family::V6 => IMDS_V6,
        };
        let mut a: Vec<String> = [
            "-d",
            dst,
            "-i",
            interface,
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
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let target = match family {
            Family::V4 => Some(self.target_v4.to_string()),
            Family::V6 => self.target_v6.map(|t| t.to_string()),
        };
        match target {
            Some(to) => a.extend(["-j".into(), "DNAT".into(), "--to-destination".into(), to]),
            None => a.extend([
                "-j".into(),
                "REJECT".into(),
                "--reject-with".into(),
                "tcp-reset".into(),
            ]),
        }
        a
    }

    fn bin(&self, family: Family) -> &std::path::Path {
        match family {
            Family::V4 => &self.iptables,
            Family::V6 => &self.ip6tables,
        }
    }

    fn run(&self, family: Family, table: &str, args: &[&str]) -> Result<Outcome, NetfilterError> {
        let mut full: Vec<&str> = vec!["-w", XTABLES_WAIT, "-t", table];
        full.extend_from_slice(args);
        exec(self.bin(family), &full)
    }

    fn must(&self, family: Family, table: &str, args: &[&str]) -> Result<(), NetfilterError> {
        let o = self.run(family, table, args)?;
        if o.ok {
            Ok(())
        } else {
            Err(NetfilterError::Failed {
                command: format!(
                    "{} -t {table} {}",
                    self.bin(family).display(),
                    args.join(" ")
                ),
                stderr: "exit status 1".into(),
            })
        }
    }

    /// Installs what is missing and repairs what was altered; true when anything changed.
    pub(crate) fn ensure(&self) -> Result<bool, NetfilterError> {
        let mut changed = false;
        for p in self.placements() {
            changed |= self.ensure_placement(&p)?;
        }
        // The other IPv6 table's chain of an earlier configuration (REJECT before --host-ipv6 was
        // set, or the reverse) would shadow or duplicate this one.
        for (family, table, hooks) in ALL_PLACES {
            let used = self
                .placements()
                .iter()
                .any(|p| p.family == *family && p.table == *table);
            if !used && self.run(*family, table, &["-S", &self.chain])?.ok {
                remove_place(self, *family, table, hooks)?;
                changed = true;
            }
        }
        Ok(changed)
    }

    fn ensure_placement(&self, p: &Placement) -> Result<bool, NetfilterError> {
        let (f, table, chain) = (p.family, p.table, self.chain.as_str());
        let mut changed = false;
        let listing = self.run(f, table, &["-S", chain])?;
        if !listing.ok {
            self.must(f, table, &["-N", chain])?;
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
        let mut intact = rules_in_chain == p.rules.len();
        for rule in &p.rules {
            if !intact {
                break;
            }
            let mut check = vec!["-C", chain];
            check.extend(rule.iter().map(String::as_str));
            intact = self.run(f, table, &check)?.ok;
        }
        if !intact {
            self.must(f, table, &["-F", chain])?;
            for rule in &p.rules {
                let mut add = vec!["-A", chain];
                add.extend(rule.iter().map(String::as_str));
                self.must(f, table, &add)?;
            }
            changed = true;
        }
        for hook in p.hooks {
            let jumps = self.jumps(f, table, hook)?;
            if jumps == 0 {
                self.must(f, table, &["-I", hook, "1", "-j", chain])?;
                changed = true;
            }
            for _ in 1..jumps {
                self.must(f, table, &["-D", hook, "-j", chain])?;
                changed = true;
            }
        }
        Ok(changed)
    }

    fn jumps(&self, f: Family, table: &str, hook: &str) -> Result<usize, NetfilterError> {
        let jump = format!("-A {hook} -j {}", self.chain);
        Ok(self
            .run(f, table, &["-S", hook])?
            .stdout
            .lines()
            .filter(|l| l.trim() == jump)
            .count())
    }

    /// True when each chain holds exactly the wanted rules and each hook jumps to it once.
    pub fn is_installed(&self) -> Result<bool, NetfilterError> {
        for p in self.placements() {
            let listing = self.run(p.family, p.table, &["-S", &self.chain])?;
            let n = listing
                .stdout
                .lines()
                .filter(|l| l.starts_with("-A "))
                .count();
            if !listing.ok || n != p.rules.len() {
                return Ok(false);
            }
            for rule in &p.rules {
                let mut check = vec!["-C", self.chain.as_str()];
                check.extend(rule.iter().map(String::as_str));
                if !self.run(p.family, p.table, &check)?.ok {
                    return Ok(false);
                }
            }
            for hook in p.hooks {
                if self.jumps(p.family, p.table, hook)? != 1 {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// Removes every jump and chain this agent may have made with these binaries. Idempotent.
    pub fn remove(&self) -> Result<(), NetfilterError> {
        for (family, table, hooks) in ALL_PLACES {
            remove_place(self, *family, table, hooks)?;
        }
        Ok(())
    }
}

fn remove_place(
    r: &RedirectRule,
    family: Family,
    table: &str,
    hooks: &[&str],
) -> Result<(), NetfilterError> {
    let chain = r.chain.as_str();
    // A jump cannot exist without its chain.
    if !r.run(family, table, &["-S", chain])?.ok {
        return Ok(());
    }
    for hook in hooks {
        // Bounded: someone may have added the jump several times.
        for _ in 0..16 {
            if r.jumps(family, table, hook)? == 0 {
                break;
            }
            r.must(family, table, &["-D", hook, "-j", chain])?;
        }
    }
    r.must(family, table, &["-F", chain])?;
    r.must(family, table, &["-X", chain])?;
    Ok(())
}

/// The documented uninstall: removes the agent's chains and jumps from every backend present
/// (the node may have switched backends since they were made). Returns the backends that had any.
pub fn uninstall() -> Result<Vec<Backend>, NetfilterError> {
    let any = SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, 0);
    let mut cleaned = Vec::new();
    for backend in [Backend::Legacy, Backend::Nft, Backend::Plain] {
        let r = RedirectRule::new(&[], any, None).with_backend(backend);
        let mut present = false;
        for (family, table, hooks) in ALL_PLACES {
            match r.run(*family, table, &["-S", CHAIN]) {
                Ok(o) => present |= o.ok,
                // This backend (or its IPv6 half) is not installed: nothing of ours is in it.
                Err(NetfilterError::Missing(_)) => continue,
                Err(e) => return Err(e),
            }
            remove_place(&r, *family, table, hooks)?;
        }
        if present {
            cleaned.push(backend);
        }
    }
    Ok(cleaned)
}

/// Re-runs [`RedirectRule::ensure`] every `every` until `shutdown`; `on_restore` hears each repair.
/// What one reconcile pass found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reconciled {
    /// The rules were in place.
    Intact,
    /// They were missing or altered, and are back.
    Restored,
    /// They could not be checked or restored (iptables failed): they may be missing.
    Failed,
}

pub(crate) async fn reconcile(
    rule: Arc<RedirectRule>,
    every: Duration,
    shutdown: CancellationToken,
    on_pass: impl Fn(Reconciled) + Send + 'static,
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
                on_pass(Reconciled::Restored);
            }
            Ok(Ok(false)) => on_pass(Reconciled::Intact),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot reconcile redirect rule");
                on_pass(Reconciled::Failed);
            }
            Err(e) => {
                tracing::error!(error = %e, "redirect rule reconcile task failed");
                on_pass(Reconciled::Failed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(v6: Option<&str>) -> RedirectRule {
        RedirectRule::new(
            &["eni+".to_string(), "vlan+".to_string()],
            "10.0.0.5:8181".parse().unwrap(),
            v6.map(|a| a.parse().unwrap()),
        )
    }

    #[test]
    fn each_interface_pattern_gets_its_rule() {
        let p = rule(Some("[2600::5]:8181")).placements();
        let v4: Vec<String> = p[0].rules.iter().map(|r| r.join(" ")).collect();
        assert_eq!(
            v4,
            [
                "-d 169.254.169.254/32 -i eni+ -p tcp -m tcp --dport 80 -m comment --comment irsa-imds -j DNAT --to-destination 10.0.0.5:8181",
                "-d 169.254.169.254/32 -i vlan+ -p tcp -m tcp --dport 80 -m comment --comment irsa-imds -j DNAT --to-destination 10.0.0.5:8181",
            ]
        );
        assert_eq!((p[1].table, p[1].hooks), ("nat", &["PREROUTING"][..]));
        let v6 = p[1].rules[1].join(" ");
        assert!(
            v6.starts_with("-d fd00:ec2::254/128 -i vlan+")
                && v6.ends_with("--to-destination [2600::5]:8181"),
            "{v6}"
        );
    }

    #[test]
    fn ipv6_imds_is_refused_without_an_ipv6_agent_address() {
        let p = rule(None).placements();
        assert_eq!(p.len(), 2, "IPv6 is always covered");
        assert_eq!(p[1].table, "filter");
        assert_eq!(p[1].hooks, &["INPUT", "FORWARD"]);
        for r in &p[1].rules {
            let r = r.join(" ");
            assert!(
                r.starts_with("-d fd00:ec2::254/128")
                    && r.ends_with("-j REJECT --reject-with tcp-reset"),
                "{r}"
            );
        }
    }

    #[test]
    fn backend_follows_kube_hints_then_rule_counts() {
        let u = |rules, hinted| BackendUsage { rules, hinted };
        assert_eq!(choose_backend(u(0, false), u(0, false)), Backend::Nft);
        assert_eq!(choose_backend(u(40, false), u(3, false)), Backend::Legacy);
        assert_eq!(choose_backend(u(2, false), u(40, false)), Backend::Nft);
        assert_eq!(choose_backend(u(0, true), u(40, false)), Backend::Legacy);
        assert_eq!(choose_backend(u(40, false), u(0, true)), Backend::Nft);
        let save = "*mangle\n:PREROUTING ACCEPT [0:0]\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n*nat\n-A PREROUTING -j X\n-A X -j RETURN\n";
        assert_eq!(BackendUsage::from_save(save), u(2, true));
    }

    #[test]
    fn missing_binary_is_a_clear_error() {
        let mut r = rule(None);
        r.iptables = "/nonexistent/iptables".into();
        let e = r.ensure().unwrap_err().to_string();
        assert!(e.contains("not found") && e.contains("--iptables"), "{e}");
    }
}
