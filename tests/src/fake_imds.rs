//! A fake *upstream* EC2 IMDS (the real one is never contacted). It speaks IMDSv2 like EC2 and
//! serves a node role whose key id (`ASIANODEROLEDONOTUSE`) lets tests prove it never reaches a pod.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio_util::sync::CancellationToken;

pub const NODE_ROLE_KEY_ID: &str = "ASIANODEROLEDONOTUSE";
const TOKEN: &str = "fake-upstream-session-token";

#[derive(Clone)]
pub struct FakeImds {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<(Method, String)>>>,
    _stop: Arc<crate::util::StopOnDrop>,
}

impl FakeImds {
    pub async fn start() -> anyhow::Result<FakeImds> {
        Self::start_on(std::net::TcpListener::bind("127.0.0.1:0")?).await
    }

    /// An upstream at its most dangerous: before answering it percent-decodes the path (repeatedly,
    /// so double encoding works too), treats `\` as `/`, drops `;params` and resolves `.` and `..`.
    /// The request log keeps the path as it arrived.
    pub async fn start_normalising() -> anyhow::Result<FakeImds> {
        Self::start_with(std::net::TcpListener::bind("127.0.0.1:0")?, true).await
    }

    /// The upstream on the loopback of `topo`'s node namespace, where the agent runs.
    pub async fn start_in_node(topo: &crate::netns::Topology) -> anyhow::Result<FakeImds> {
        Self::start_on(topo.bind_in_node("127.0.0.1:0".parse()?)?).await
    }

    pub async fn start_on(listener: std::net::TcpListener) -> anyhow::Result<FakeImds> {
        Self::start_with(listener, false).await
    }

    async fn start_with(
        listener: std::net::TcpListener,
        normalise: bool,
    ) -> anyhow::Result<FakeImds> {
        let listener = crate::util::tokio_listener(listener)?;
        let addr = listener.local_addr()?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let seen2 = seen.clone();
        crate::util::serve(listener, stop.clone(), move |req| {
            let seen = seen2.clone();
            async move { answer(&seen, req, normalise) }
        });
        Ok(FakeImds {
            addr,
            seen,
            _stop: Arc::new(crate::util::StopOnDrop(stop)),
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request seen: method and path.
    pub fn requests(&self) -> Vec<(Method, String)> {
        self.seen.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

fn answer(
    seen: &Mutex<Vec<(Method, String)>>,
    req: Request<Incoming>,
    normalise: bool,
) -> Response<Full<Bytes>> {
    let raw = req.uri().path().to_string();
    if let Ok(mut v) = seen.lock() {
        v.push((req.method().clone(), raw.clone()));
    }
    let path = if normalise { normalised(&raw) } else { raw };
    let reply = |s: StatusCode, b: String| {
        Response::builder()
            .status(s)
            .header("content-type", "text/plain")
            .body(Full::new(Bytes::from(b)))
            .unwrap_or_default()
    };
    if req.method() == Method::PUT {
        return match (
            path.as_str(),
            req.headers().get("x-aws-ec2-metadata-token-ttl-seconds"),
        ) {
            ("/latest/api/token", Some(ttl)) => {
                let mut r = reply(StatusCode::OK, TOKEN.into());
                r.headers_mut()
                    .insert("x-aws-ec2-metadata-token-ttl-seconds", ttl.clone());
                r
            }
            ("/latest/api/token", None) => reply(StatusCode::BAD_REQUEST, String::new()),
            _ => reply(StatusCode::FORBIDDEN, String::new()),
        };
    }
    if let Some(t) = req.headers().get("x-aws-ec2-metadata-token")
        && t.as_bytes() != TOKEN.as_bytes()
    {
        return reply(StatusCode::UNAUTHORIZED, String::new());
    }
    let body = match path.as_str() {
        "/latest/meta-data/placement/region" => "us-east-1".to_string(),
        "/latest/meta-data/placement/availability-zone" => "us-east-1a".to_string(),
        "/latest/meta-data/instance-id" => "i-0fake".to_string(),
        "/latest/meta-data/instance-type" => "m5.large".to_string(),
        "/latest/dynamic/instance-identity/document" => serde_json::json!({
            "accountId": "123456789012", "region": "us-east-1", "availabilityZone": "us-east-1a",
            "instanceId": "i-0fake", "instanceType": "m5.large", "privateIp": "10.0.0.10"
        })
        .to_string(),
        "/latest/meta-data/iam/security-credentials/" => "node-role".to_string(),
        "/latest/meta-data/iam/security-credentials/node-role" => serde_json::json!({
            "Code": "Success", "LastUpdated": "2026-01-01T00:00:00Z", "Type": "AWS-HMAC",
            "AccessKeyId": NODE_ROLE_KEY_ID, "SecretAccessKey": "node-secret", "Token": "node-token",
            "Expiration": "2099-01-01T00:00:00Z"
        })
        .to_string(),
        "/latest/user-data" => "secret-user-data".to_string(),
        _ => return reply(StatusCode::NOT_FOUND, String::new()),
    };
    reply(StatusCode::OK, body)
}

/// What a lenient server makes of a path: decoded until stable, `\` as `/`, `;params` dropped,
/// dot segments resolved.
pub fn normalised(raw: &str) -> String {
    let mut p = raw.as_bytes().to_vec();
    for _ in 0..4 {
        let d = percent_decode(&p);
        if d == p {
            break;
        }
        p = d;
    }
    let s = String::from_utf8_lossy(&p).replace('\\', "/");
    let mut out: Vec<&str> = Vec::new();
    for seg in s.split('/') {
        let seg = seg.split(';').next().unwrap_or("");
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let trailing = if s.ends_with('/') && !out.is_empty() {
        "/"
    } else {
        ""
    };
    format!("/{}{trailing}", out.join("/"))
}

fn percent_decode(p: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(p.len());
    let mut i = 0;
    while i < p.len() {
        if p[i] == b'%'
            && let (Some(h), Some(l)) = (
                p.get(i + 1).copied().and_then(hex),
                p.get(i + 2).copied().and_then(hex),
            )
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(p[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn normalising_resolves_every_trick() {
        for (raw, want) in [
            (
                "/latest/meta-data/placement/%2e%2e/iam/x",
                "/latest/meta-data/iam/x",
            ),
            (
                "/latest/meta-data/placement/..%2f..%2fuser-data",
                "/latest/user-data",
            ),
            (
                "/latest/meta-data/placement/..\\..\\user-data",
                "/latest/user-data",
            ),
            (
                "/latest/meta-data/placement/..;/..;/user-data",
                "/latest/user-data",
            ),
            (
                "/latest/meta-data/placement/%252E%252E/%252e%252e/user-data",
                "/latest/user-data",
            ),
            (
                "/latest/meta-data/iam/security-credentials/",
                "/latest/meta-data/iam/security-credentials/",
            ),
        ] {
            assert_eq!(super::normalised(raw), want, "{raw}");
        }
    }
}
