//! The client side of the agent's registration socket: one JSON line out, one JSON line back.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

pub const PROTOCOL_VERSION: u32 = 1;
const MAX_REPLY: u64 = 64 * 1024;

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

pub fn add(
    sock: &Path,
    timeout: Duration,
    container_id: &str,
    ns: &str,
    name: &str,
    ips: &[String],
) -> Result<(), AgentError> {
    call(
        sock,
        timeout,
        json!({"v": PROTOCOL_VERSION, "op": "add", "containerId": container_id, "namespace": ns, "name": name, "ips": ips}),
    )
}

pub fn del(sock: &Path, timeout: Duration, container_id: &str) -> Result<(), AgentError> {
    call(
        sock,
        timeout,
        json!({"v": PROTOCOL_VERSION, "op": "del", "containerId": container_id}),
    )
}

/// CNI GC: the agent drops every registration whose sandbox is not in `valid`.
pub fn gc(sock: &Path, timeout: Duration, valid: &[String]) -> Result<(), AgentError> {
    call(
        sock,
        timeout,
        json!({"v": PROTOCOL_VERSION, "op": "gc", "valid": valid}),
    )
}

pub fn check(
    sock: &Path,
    timeout: Duration,
    container_id: &str,
    ips: &[String],
) -> Result<(), AgentError> {
    call(
        sock,
        timeout,
        json!({"v": PROTOCOL_VERSION, "op": "check", "containerId": container_id, "ips": ips}),
    )
}

fn call(sock: &Path, timeout: Duration, msg: Value) -> Result<(), AgentError> {
    let mut s = UnixStream::connect(sock).map_err(|source| AgentError::Unreachable {
        path: sock.display().to_string(),
        source,
    })?;
    s.set_read_timeout(Some(timeout)).map_err(AgentError::Io)?;
    s.set_write_timeout(Some(timeout)).map_err(AgentError::Io)?;
    let mut line = msg.to_string().into_bytes();
    line.push(b'\n');
    s.write_all(&line).map_err(AgentError::Io)?;
    let mut reply = String::new();
    std::io::Read::take(BufReader::new(s), MAX_REPLY)
        .read_line(&mut reply)
        .map_err(AgentError::Io)?;
    let v: Value = serde_json::from_str(reply.trim()).map_err(|_| AgentError::BadReply)?;
    match v.get("ok").and_then(Value::as_bool) {
        Some(true) => Ok(()),
        Some(false) => Err(AgentError::Refused(
            v.get("error")
                .and_then(Value::as_str)
                .unwrap_or("no reason")
                .to_string(),
        )),
        None => Err(AgentError::BadReply),
    }
}
