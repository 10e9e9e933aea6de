//! `install` / `uninstall`: put the plugin binary in the CNI bin dir and chain the plugin into the
//! node's active conflist (see [`irsa_imds_cni::chain`]), or take both away again.

use std::net::SocketAddrV4;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use irsa_imds_cni::chain::{self, ChainState, PLUGIN_TYPE};
use serde_json::json;

#[derive(Debug, Parser)]
#[command(
    name = "irsa-imds-cni",
    version,
    about = "Chained CNI plugin registering pod IPs with the irsa-imds agent",
    after_help = "As a CNI plugin it is run by the container runtime with CNI_COMMAND set and no arguments."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Copy this binary into the CNI bin dir and chain it into the node's active conflist.
    Install(InstallArgs),
    /// Remove the entry from every conflist, then the binary (and the chain state).
    Uninstall(UninstallArgs),
}

#[derive(Debug, Args)]
pub struct InstallArgs {
    /// Where the node's CNI plugins live (host path as mounted).
    #[arg(long, default_value = "/host/opt/cni/bin")]
    pub bin_dir: PathBuf,
    /// The node's CNI config dir (host path as mounted).
    #[arg(long, default_value = "/host/etc/cni/net.d")]
    pub conf_dir: PathBuf,
    /// The agent's registration socket.
    #[arg(long, default_value = irsa_imds_cni::DEFAULT_SOCKET)]
    pub socket: String,
    /// How long ADD/DEL wait for the agent, in milliseconds (1..=10000).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub timeout_ms: Option<u64>,
    /// Fail ADD when the agent cannot register the pod (default: fail open).
    #[arg(long)]
    pub fail_closed: bool,
    /// Install the metadata DNAT inside each pod's network namespace at ADD (needs --agent-address).
    #[arg(long, requires = "agent_address")]
    pub pod_redirect: bool,
    /// The agent's IPv4 address and port, the per-pod DNAT's target.
    #[arg(long)]
    pub agent_address: Option<SocketAddrV4>,
    /// Plugin log file on the host (default: the runtime's stderr).
    #[arg(long)]
    pub log_file: Option<String>,
    /// Where to record what was chained, so the agent keeps it chained (`--cni-chain-state`).
    #[arg(long)]
    pub chain_state: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct UninstallArgs {
    #[arg(long, default_value = "/host/opt/cni/bin")]
    pub bin_dir: PathBuf,
    #[arg(long, default_value = "/host/etc/cni/net.d")]
    pub conf_dir: PathBuf,
    /// The chain state file to remove too.
    #[arg(long)]
    pub chain_state: Option<PathBuf>,
}

pub fn install(o: InstallArgs) -> Result<String, String> {
    let me = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    std::fs::create_dir_all(&o.bin_dir)
        .map_err(|e| format!("cannot create {}: {e}", o.bin_dir.display()))?;
    let bin = std::fs::read(&me).map_err(|e| format!("cannot read {}: {e}", me.display()))?;
    let dest = o.bin_dir.join(PLUGIN_TYPE);
    // Binary first: the conflist never names a plugin that is not there.
    if std::fs::read(&dest).ok().as_deref() != Some(&bin[..]) {
        chain::write_atomic(&dest, &bin, Some(0o755)).map_err(|e| e.to_string())?;
    }

    let mut entry = json!({"type": PLUGIN_TYPE, "name": "irsa-imds", "agentSocket": o.socket});
    if let Some(t) = o.timeout_ms {
        entry["timeoutMs"] = json!(t);
    }
    if o.fail_closed {
        entry["failClosed"] = json!(true);
    }
    if o.pod_redirect
        && let Some(a) = o.agent_address
    {
        entry["podRedirect"] = json!(true);
        entry["agentAddress"] = json!(a.to_string());
    }
    if let Some(l) = o.log_file {
        entry["logFile"] = json!(l);
    }
    let state = ChainState {
        conf_dir: o.conf_dir,
        bin_dir: o.bin_dir,
        entry,
    };
    let changed = state.ensure().map_err(|e| e.to_string())?;
    if let Some(path) = &o.chain_state {
        state.save(path).map_err(|e| e.to_string())?;
    }
    let active = chain::active_conflist(&state.conf_dir).map_err(|e| e.to_string())?;
    Ok(match changed {
        Some(path) => format!(
            "installed {} and chained it into {}",
            dest.display(),
            path.display()
        ),
        None => format!("already installed in {}", active.display()),
    })
}

pub fn uninstall(o: UninstallArgs) -> Result<String, String> {
    // The state first, so an agent still running cannot chain it back; then every conflist
    // entry; the binary last, once no conflist names it.
    let mut touched = Vec::new();
    if let Some(path) = &o.chain_state {
        match std::fs::remove_file(path) {
            Ok(()) => touched.push(path.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot remove {}: {e}", path.display())),
        }
    }
    for p in chain::unchain_all(&o.conf_dir).map_err(|e| e.to_string())? {
        touched.push(p.display().to_string());
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
