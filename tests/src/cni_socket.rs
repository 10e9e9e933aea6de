//! The agent's CNI registration socket, spoken as the plugin speaks it: one JSON line each way.

use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends one request line and returns the agent's answer.
pub async fn request(sock: &Path, msg: serde_json::Value) -> anyhow::Result<serde_json::Value> {
    let mut s = tokio::net::UnixStream::connect(sock).await?;
    let mut line = serde_json::to_vec(&msg)?;
    line.push(b'\n');
    s.write_all(&line).await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    Ok(serde_json::from_slice(&out)?)
}

/// A CNI ADD of sandbox `cid` for pod `namespace/name` at `ip`; the agent must accept it.
pub async fn add(sock: &Path, cid: &str, namespace: &str, name: &str, ip: &str) {
    let r = request(
        sock,
        serde_json::json!({"v":1,"op":"add","containerId":cid,"namespace":namespace,"name":name,"ips":[ip]}),
    )
    .await;
    assert!(matches!(&r, Ok(v) if v["ok"] == true), "{r:?}");
}

/// A CNI DEL of sandbox `cid`; the agent must accept it.
pub async fn del(sock: &Path, cid: &str) {
    let r = request(
        sock,
        serde_json::json!({"v":1,"op":"del","containerId":cid}),
    )
    .await;
    assert!(matches!(&r, Ok(v) if v["ok"] == true), "{r:?}");
}
