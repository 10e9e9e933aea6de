//! The CNI plugin as a library: the CNI protocol (`cni`: parsing the runtime's input, carrying
//! out a command), the agent's registration socket (`agent`), the per-pod redirect (`redirect`),
//! and what the agent shares with the plugin: chaining it into the node's CNI config (`chain`).
//! The binary (`main.rs`) only reads stdin and the environment and prints the outcome.

pub mod agent;
pub mod chain;
pub mod cni;
mod redirect;

/// The agent's registration socket, as the DaemonSet mounts it.
pub const DEFAULT_SOCKET: &str = "/run/irsa-imds/cni.sock";
