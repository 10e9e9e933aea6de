//! Allow-listed passthrough to the real IMDS. The agent speaks IMDSv2 upstream (a session token
//! cached until shortly before it expires), whatever the pod spoke.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::imds::{TOKEN_HEADER, TTL_HEADER, UpstreamPath};

/// Lifetime asked for upstream session tokens; renewed a minute early.
const TOKEN_TTL: Duration = Duration::from_secs(21_600);
const TOKEN_RENEW_EARLY: Duration = Duration::from_secs(60);
/// The pod's SDK gives up after about a second; so does the passthrough.
const CALL_TIMEOUT: Duration = Duration::from_millis(900);
/// Metadata documents are small; anything bigger is not something to relay.
const MAX_BODY: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamError {
    #[error("upstream imds timed out")]
    Timeout,
    #[error("upstream imds unreachable: {0}")]
    Unreachable(String),
    #[error("upstream imds refused a session token: status {0}")]
    Token(u16),
    #[error("upstream imds response too large or unreadable")]
    Body,
    #[error("invalid upstream request: {0}")]
    Request(String),
}

pub(crate) struct Upstream {
    base: String,
    client: Client<HttpConnector, Empty<Bytes>>,
    token: Mutex<Option<(String, Instant)>>,
}

impl Upstream {
    pub(crate) fn new(base: &str) -> Self {
        let client = Client::builder(TokioExecutor::new()).build_http();
        Upstream {
            base: base.trim_end_matches('/').to_string(),
            client,
            token: Mutex::new(None),
        }
    }

    async fn session_token(&self) -> Result<String, UpstreamError> {
        let mut slot = self.token.lock().await;
        if let Some((t, exp)) = slot.as_ref()
            && Instant::now() < *exp
        {
            return Ok(t.clone());
        }
        let req = Request::builder()
            .method(Method::PUT)
            .uri(format!("{}/latest/api/token", self.base))
            .header(TTL_HEADER, TOKEN_TTL.as_secs().to_string())
            .body(Empty::new())
            .map_err(|e| UpstreamError::Request(e.to_string()))?;
        let (status, body) = self.send(req).await?;
        if status != StatusCode::OK {
            return Err(UpstreamError::Token(status.as_u16()));
        }
        let t = String::from_utf8(body.to_vec()).map_err(|_| UpstreamError::Body)?;
        *slot = Some((t.clone(), Instant::now() + TOKEN_TTL - TOKEN_RENEW_EARLY));
        Ok(t)
    }

    async fn send(&self, req: Request<Empty<Bytes>>) -> Result<(StatusCode, Bytes), UpstreamError> {
        let fut = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| UpstreamError::Unreachable(e.to_string()))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|_| UpstreamError::Body)?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(CALL_TIMEOUT, fut)
            .await
            .map_err(|_| UpstreamError::Timeout)?
    }

    async fn get_once(&self, path: &UpstreamPath) -> Result<(StatusCode, Bytes), UpstreamError> {
        let token = self.session_token().await?;
        let req = Request::builder()
            .uri(format!("{}{}", self.base, path.as_str()))
            .header(TOKEN_HEADER, token)
            .body(Empty::new())
            .map_err(|e| UpstreamError::Request(e.to_string()))?;
        self.send(req).await
    }

    /// GETs `path` and returns the upstream status and body. Only [`crate::imds::route`] makes an
    /// [`UpstreamPath`], so nothing but a canonical, allow-listed path can get here.
    pub(crate) async fn get(
        &self,
        path: &UpstreamPath,
    ) -> Result<(StatusCode, Bytes), UpstreamError> {
        let (status, body) = self.get_once(path).await?;
        if status == StatusCode::UNAUTHORIZED {
            // The token went stale (the instance's IMDS restarted): one fresh try.
            *self.token.lock().await = None;
            return self.get_once(path).await;
        }
        Ok((status, body))
    }

    /// The node's region, when the standard AWS settings do not name one.
    pub(crate) async fn region(&self) -> Result<String, UpstreamError> {
        let (status, body) = self.get(&UpstreamPath::region()).await?;
        if status != StatusCode::OK {
            return Err(UpstreamError::Token(status.as_u16()));
        }
        String::from_utf8(body.to_vec())
            .map(|s| s.trim().to_string())
            .map_err(|_| UpstreamError::Body)
    }
}
