//! What the agent shares with the plugin binary: chaining the plugin into the node's CNI config.

pub mod chain;

/// The agent's registration socket, as the DaemonSet mounts it.
pub const DEFAULT_SOCKET: &str = "/run/irsa-imds/cni.sock";
