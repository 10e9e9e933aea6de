//! irsa-imds agent: per-pod IAM credentials over the EC2 instance metadata protocol.
//!
//! Where each concern lives:
//! - [`config`]: flags, env fallbacks, validation.
//! - [`imds`]: the IMDS wire protocol (routing, session tokens, response bodies); pure.
//! - [`pods`]: who is calling: node-scoped pod index, CNI registrations, IP-reuse rules.
//! - [`identity`]: role resolution, token minting, STS exchange, the credential cache.
//! - [`upstream`]: allow-listed passthrough to the real IMDS.
//! - [`netfilter`]: the host-mode redirect rule.
//! - [`telemetry`]: logs, metrics, events.
//! - [`explain`]: `irsa-imds-agent explain`'s request, and its client side of the local socket.
//! - [`server`]: the listeners and the process life cycle that ties the rest together.
//!
//! Imports run downwards only: `server` > `config` > `explain`, `upstream`, `netfilter`, `imds` >
//! `identity` > `pods` > `telemetry`.

pub mod config;
pub mod explain;
pub mod identity;
pub mod imds;
pub mod netfilter;
pub mod pods;
pub mod server;
pub mod telemetry;
pub mod upstream;

pub use config::Config;
pub use server::{Deps, Listeners, RunError, run, run_with};
