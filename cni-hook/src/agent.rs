//! The client side of the agent's registration socket: one request line out, one answer line
//! back. The message, its version, limits and validators are `irsa-imds-proto`'s, shared with
//! the agent.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use irsa_imds_proto::{Add, MAX_MESSAGE, Request, Response};

// Causes are part of the message: it ends up whole in a CNI error's `details` or the log.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("agent socket {path}: {source}")]
    Unreachable {
        path: String,
        source: std::io::Error,
    },
    #[error("agent did not answer: {0}")]
    Io(std::io::Error),
    #[error("agent sent an unreadable answer")]
    BadReply,
    #[error("agent refused: {0}")]
    Refused(String),
}

impl AgentError {
    /// The agent is not there (or not answering): fail-open territory.
    pub fn is_unavailable(&self) -> bool {
        !matches!(self, AgentError::Refused(_))
    }
}

/// Registers a sandbox's pod and addresses (the caller validated them with the same rules).
pub fn add(
    sock: &Path,
    timeout: Duration,
    container_id: &str,
    ns: &str,
    name: &str,
    ips: &[String],
) -> Result<(), AgentError> {
    send(sock, timeout, &add_request(container_id, ns, name, ips))
}

/// The ADD request, for validation before it is sent.
pub fn add_request(container_id: &str, ns: &str, name: &str, ips: &[String]) -> Request {
    Request::Add(Add {
        container_id: container_id.into(),
        namespace: ns.into(),
        name: name.into(),
        ips: ips.to_vec(),
    })
}

pub fn del(sock: &Path, timeout: Duration, container_id: &str) -> Result<(), AgentError> {
    let req = Request::Del {
        container_id: container_id.into(),
    };
    send(sock, timeout, &req)
}

/// CNI GC: the agent drops every registration whose sandbox is not in `valid`.
pub fn gc(sock: &Path, timeout: Duration, valid: &[String]) -> Result<(), AgentError> {
    let req = Request::Gc {
        valid: valid.to_vec(),
    };
    send(sock, timeout, &req)
}

pub fn check(
    sock: &Path,
    timeout: Duration,
    container_id: &str,
    ips: &[String],
) -> Result<(), AgentError> {
    let req = Request::Check {
        container_id: container_id.into(),
        ips: ips.to_vec(),
    };
    send(sock, timeout, &req)
}

/// Sends `req` and waits, at most `timeout` per read and write, for the agent's answer.
fn send(sock: &Path, timeout: Duration, req: &Request) -> Result<(), AgentError> {
    let mut s = UnixStream::connect(sock).map_err(|source| AgentError::Unreachable {
        path: sock.display().to_string(),
        source,
    })?;
    s.set_read_timeout(Some(timeout)).map_err(AgentError::Io)?;
    s.set_write_timeout(Some(timeout)).map_err(AgentError::Io)?;
    s.write_all(&req.encode()).map_err(AgentError::Io)?;
    let mut reply = String::new();
    std::io::Read::take(BufReader::new(s), MAX_MESSAGE)
        .read_line(&mut reply)
        .map_err(AgentError::Io)?;
    match Response::decode(reply.trim().as_bytes()) {
        Ok(Response { ok: true, .. }) => Ok(()),
        Ok(Response { error, .. }) => Err(AgentError::Refused(
            error.unwrap_or_else(|| "no reason".into()),
        )),
        Err(_) => Err(AgentError::BadReply),
    }
}
