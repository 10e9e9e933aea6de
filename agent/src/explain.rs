//! `irsa-imds-agent explain`: an operator on the node asks the running agent, through a local
//! root-only unix socket, what it knows of a pod and why the pod gets what it gets.
//!
//! The exchange: one request line, the target (`<namespace>/<pod>` or an IP address); the agent
//! answers with the report as text and closes, or with one line `error: <why>`. The report names
//! times, roles and errors, never an access key, secret or token. The socket is never on the
//! network (see `server::explain` for the serving side).

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Where the shipped manifests put the socket (`/run/irsa-imds` is the agent's hostPath).
pub const DEFAULT_SOCKET: &str = "/run/irsa-imds/explain.sock";
/// A request is one short line: a namespace and a pod name, or an address.
pub const MAX_REQUEST: usize = 512;
/// Reports are a few dozen lines; anything longer is not an agent speaking.
const MAX_REPORT: u64 = 64 * 1024;
/// The agent answers from memory (plus at most one ServiceAccount read).
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// An error answer starts with this.
pub const ERROR_PREFIX: &str = "error: ";

/// What to explain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Pod { namespace: String, name: String },
    Ip(IpAddr),
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExplainError {
    #[error("invalid target {0:?}: expected <namespace>/<pod> or an IP address")]
    BadTarget(String),
    #[error(
        "cannot reach the agent at {path}: {source} (is --explain-socket set, and are you root?)"
    )]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the agent: {0}")]
    Io(#[from] std::io::Error),
    #[error("the agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the agent refused: {0}")]
    Refused(String),
}

impl Target {
    /// Parses `<namespace>/<pod>` (Kubernetes name rules) or an IPv4/IPv6 address.
    pub fn parse(s: &str) -> Result<Target, ExplainError> {
        let s = s.trim();
        let bad = || ExplainError::BadTarget(s.chars().take(100).collect());
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Target::Ip(ip.to_canonical()));
        }
        let (namespace, name) = s.split_once('/').ok_or_else(bad)?;
        irsa_imds_proto::check_namespace(namespace).map_err(|_| bad())?;
        irsa_imds_proto::check_pod_name(name).map_err(|_| bad())?;
        Ok(Target::Pod {
            namespace: namespace.to_string(),
            name: name.to_string(),
        })
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Pod { namespace, name } => write!(f, "{namespace}/{name}"),
            Target::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// Asks the agent at `socket` to explain `target`; the report, or why there is none.
pub async fn query(socket: &Path, target: &str) -> Result<String, ExplainError> {
    let target = Target::parse(target)?;
    tokio::time::timeout(TIMEOUT, async {
        let mut stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|source| ExplainError::Connect {
                path: socket.display().to_string(),
                source,
            })?;
        stream.write_all(format!("{target}\n").as_bytes()).await?;
        let mut out = Vec::new();
        (&mut stream).take(MAX_REPORT).read_to_end(&mut out).await?;
        let text = String::from_utf8_lossy(&out).into_owned();
        match text.strip_prefix(ERROR_PREFIX) {
            Some(why) => Err(ExplainError::Refused(why.trim_end().to_string())),
            None => Ok(text),
        }
    })
    .await
    .map_err(|_| ExplainError::Timeout(TIMEOUT))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_a_pod_or_an_address() {
        assert_eq!(
            Target::parse("apps/api-0").unwrap(),
            Target::Pod {
                namespace: "apps".into(),
                name: "api-0".into()
            }
        );
        assert_eq!(
            Target::parse("10.0.0.7").unwrap(),
            Target::Ip("10.0.0.7".parse().unwrap())
        );
        assert_eq!(
            Target::parse("::ffff:10.0.0.7").unwrap(),
            Target::Ip("10.0.0.7".parse().unwrap())
        );
        assert!(Target::parse("fd00::5").is_ok());
        for bad in [
            "",
            "apps",
            "apps/",
            "/pod",
            "Apps/pod",
            "apps/pod/x",
            "apps/../x",
            "apps/pod\nother",
            "10.0.0.300",
            &format!("apps/{}", "p".repeat(300)),
        ] {
            assert!(
                matches!(Target::parse(bad), Err(ExplainError::BadTarget(_))),
                "{bad:?}"
            );
        }
    }
}
