//! The IMDS wire protocol, pure: a request's method, path and headers become a [`Route`] or a
//! ready [`Reply`]; response bodies are built from plain values. No I/O here, so every rule of
//! DESIGN §3 is unit-tested from raw inputs.

pub mod token;
pub mod wire;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};

pub use token::{TokenAuthority, TokenError};

pub const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
pub const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
/// Paths longer than this are refused before any matching: real metadata paths are short.
const MAX_PATH_LEN: usize = 512;

/// What a request asks for, once it passed the protocol checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `PUT /latest/api/token`.
    IssueToken { ttl: u64 },
    /// `GET .../iam/security-credentials/`: the role name.
    RoleList,
    /// `GET .../iam/security-credentials/<name>`.
    Credentials { name: String },
    /// `GET .../iam/info`.
    Info,
    /// `GET .../iam/`.
    IamIndex,
    /// Allow-listed passthrough; `path` is the full upstream path.
    Upstream { path: String },
}

impl Route {
    /// Low-cardinality name for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Route::IssueToken { .. } => "token",
            Route::RoleList => "role_list",
            Route::Credentials { .. } => "credentials",
            Route::Info => "info",
            Route::IamIndex => "iam_index",
            Route::Upstream { .. } => "upstream",
        }
    }
}

/// A finished response: status, body and extra headers. `Content-Type` is always `text/plain`,
/// as EC2 sends it, JSON bodies included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: StatusCode,
    pub body: Bytes,
    pub headers: Vec<(&'static str, String)>,
}

impl Reply {
    pub fn new(status: StatusCode, body: impl Into<Bytes>) -> Self {
        Reply {
            status,
            body: body.into(),
            headers: Vec::new(),
        }
    }
    pub fn ok(body: impl Into<Bytes>) -> Self {
        Self::new(StatusCode::OK, body)
    }
    pub fn not_found() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            wire::error_page(StatusCode::NOT_FOUND),
        )
    }
    pub fn status(status: StatusCode) -> Self {
        Self::new(status, wire::error_page(status))
    }
}

/// The operator's choices that shape routing.
#[derive(Debug, Clone)]
pub struct Policy {
    pub upstream_allow: Vec<String>,
}

/// Routes a request, or answers it outright when the protocol already decides (405, 403, 400, 404).
pub fn route(
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    policy: &Policy,
) -> Result<Route, Reply> {
    if *method != Method::GET && *method != Method::HEAD && *method != Method::PUT {
        return Err(Reply::status(StatusCode::METHOD_NOT_ALLOWED));
    }
    if path.len() > MAX_PATH_LEN {
        return Err(Reply::status(StatusCode::URI_TOO_LONG));
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err(Reply::status(StatusCode::BAD_REQUEST));
    };
    if rest.contains("//") || rest.split('/').any(|s| s == ".." || s == ".") || !rest.is_ascii() {
        return Err(Reply::not_found());
    }
    let (version, rest) = rest.split_once('/').unwrap_or((rest, ""));
    let latest = version == "latest";
    if !latest && !is_dated_version(version) {
        return Err(if *method == Method::PUT {
            Reply::status(StatusCode::METHOD_NOT_ALLOWED)
        } else {
            Reply::not_found()
        });
    }

    if *method == Method::PUT {
        if rest != "api/token" {
            return Err(Reply::status(StatusCode::METHOD_NOT_ALLOWED));
        }
        // EC2 only issues tokens on /latest/; a versioned token path is forbidden.
        if !latest {
            return Err(Reply::status(StatusCode::FORBIDDEN));
        }
        // A PUT that went through a proxy is refused, so an SSRF'd proxy cannot obtain a token.
        if headers.contains_key("x-forwarded-for") {
            return Err(Reply::status(StatusCode::FORBIDDEN));
        }
        let ttl = headers
            .get(TTL_HEADER)
            .ok_or_else(|| Reply::status(StatusCode::BAD_REQUEST))
            .and_then(|v| {
                token::parse_ttl(v.as_bytes()).map_err(|_| Reply::status(StatusCode::BAD_REQUEST))
            })?;
        return Ok(Route::IssueToken { ttl });
    }

    if rest == "api/token" {
        return Err(Reply::status(StatusCode::METHOD_NOT_ALLOWED));
    }
    match rest {
        "meta-data/iam" | "meta-data/iam/" => return Ok(Route::IamIndex),
        "meta-data/iam/info" => return Ok(Route::Info),
        "meta-data/iam/security-credentials" | "meta-data/iam/security-credentials/" => {
            return Ok(Route::RoleList);
        }
        _ => {}
    }
    if let Some(name) = rest.strip_prefix("meta-data/iam/security-credentials/") {
        if !name.is_empty() && !name.contains('/') {
            return Ok(Route::Credentials {
                name: name.to_string(),
            });
        }
        return Err(Reply::not_found());
    }
    // The node's own credentials and secrets are never passed through, whatever the allow-list says.
    if rest.starts_with("meta-data/iam/")
        || rest.starts_with("meta-data/identity-credentials")
        || rest.starts_with("user-data")
    {
        return Err(Reply::not_found());
    }
    if policy.upstream_allow.iter().any(|p| allow_matches(p, rest)) {
        return Ok(Route::Upstream {
            path: path.to_string(),
        });
    }
    Err(Reply::not_found())
}

/// The session token a GET carries, if any.
pub fn session_token(headers: &HeaderMap) -> Option<&[u8]> {
    headers.get(TOKEN_HEADER).map(|v| v.as_bytes())
}

fn is_dated_version(v: &str) -> bool {
    let b = v.as_bytes();
    b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
}

fn allow_matches(pattern: &str, path: &str) -> bool {
    match pattern.strip_suffix("/*") {
        Some(prefix) => {
            path == prefix
                || path
                    .strip_prefix(prefix)
                    .is_some_and(|r| r.starts_with('/'))
        }
        None => pattern == path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_UPSTREAM_ALLOW;

    fn policy() -> Policy {
        Policy {
            upstream_allow: DEFAULT_UPSTREAM_ALLOW
                .iter()
                .map(|s| s.to_string())
                .collect(),
        }
    }

    fn hdrs(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    fn r(method: Method, path: &str, h: &[(&'static str, &str)]) -> Result<Route, StatusCode> {
        route(&method, path, &hdrs(h), &policy()).map_err(|e| e.status)
    }

    #[test]
    fn token_put_needs_a_valid_ttl() {
        assert_eq!(
            r(Method::PUT, "/latest/api/token", &[(TTL_HEADER, "21600")]),
            Ok(Route::IssueToken { ttl: 21600 })
        );
        assert_eq!(
            r(Method::PUT, "/latest/api/token", &[]),
            Err(StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            r(Method::PUT, "/latest/api/token", &[(TTL_HEADER, "0")]),
            Err(StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            r(Method::PUT, "/latest/api/token", &[(TTL_HEADER, "21601")]),
            Err(StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            r(Method::PUT, "/latest/api/token", &[(TTL_HEADER, "ten")]),
            Err(StatusCode::BAD_REQUEST)
        );
    }

    #[test]
    fn token_put_through_a_proxy_is_forbidden() {
        let h = [(TTL_HEADER, "60"), ("x-forwarded-for", "10.0.0.1")];
        assert_eq!(
            r(Method::PUT, "/latest/api/token", &h),
            Err(StatusCode::FORBIDDEN)
        );
    }

    #[test]
    fn put_elsewhere_is_refused() {
        let h = [(TTL_HEADER, "60")];
        assert_eq!(
            r(Method::PUT, "/2019-10-01/api/token", &h),
            Err(StatusCode::FORBIDDEN)
        );
        assert_eq!(
            r(Method::PUT, "/latest/meta-data/", &h),
            Err(StatusCode::METHOD_NOT_ALLOWED)
        );
        assert_eq!(
            r(Method::GET, "/latest/api/token", &[]),
            Err(StatusCode::METHOD_NOT_ALLOWED)
        );
    }

    #[test]
    fn other_methods_are_not_allowed() {
        for m in [Method::POST, Method::DELETE, Method::PATCH, Method::OPTIONS] {
            assert_eq!(
                r(m, "/latest/meta-data/iam/security-credentials/", &[]),
                Err(StatusCode::METHOD_NOT_ALLOWED)
            );
        }
    }

    #[test]
    fn credential_paths_route_with_or_without_slash() {
        assert_eq!(
            r(
                Method::GET,
                "/latest/meta-data/iam/security-credentials",
                &[]
            ),
            Ok(Route::RoleList)
        );
        assert_eq!(
            r(
                Method::GET,
                "/latest/meta-data/iam/security-credentials/",
                &[]
            ),
            Ok(Route::RoleList)
        );
        assert_eq!(
            r(
                Method::HEAD,
                "/latest/meta-data/iam/security-credentials/",
                &[]
            ),
            Ok(Route::RoleList)
        );
        assert_eq!(
            r(
                Method::GET,
                "/latest/meta-data/iam/security-credentials/app-role",
                &[]
            ),
            Ok(Route::Credentials {
                name: "app-role".into()
            })
        );
        assert_eq!(
            r(Method::GET, "/2016-09-02/meta-data/iam/info", &[]),
            Ok(Route::Info)
        );
        assert_eq!(
            r(Method::GET, "/latest/meta-data/iam/", &[]),
            Ok(Route::IamIndex)
        );
    }

    #[test]
    fn node_secrets_are_never_proxied() {
        for p in [
            "/latest/meta-data/iam/security-credentials-extended/app-role",
            "/latest/meta-data/iam/security-credentials/a/b",
            "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
            "/latest/user-data",
            "/latest/meta-data/../user-data",
            "/latest//user-data",
        ] {
            assert_eq!(r(Method::GET, p, &[]), Err(StatusCode::NOT_FOUND), "{p}");
        }
        let p = Policy {
            upstream_allow: vec!["*".into(), "user-data".into(), "meta-data/iam/*".into()],
        };
        assert!(route(&Method::GET, "/latest/user-data", &HeaderMap::new(), &p).is_err());
    }

    #[test]
    fn only_allow_listed_paths_go_upstream() {
        assert_eq!(
            r(Method::GET, "/latest/meta-data/placement/region", &[]),
            Ok(Route::Upstream {
                path: "/latest/meta-data/placement/region".into()
            })
        );
        assert!(
            r(
                Method::GET,
                "/latest/dynamic/instance-identity/document",
                &[]
            )
            .is_ok()
        );
        assert_eq!(
            r(Method::GET, "/latest/meta-data/local-ipv4", &[]),
            Err(StatusCode::NOT_FOUND)
        );
        assert_eq!(
            r(Method::GET, "/latest/meta-data/placementx", &[]),
            Err(StatusCode::NOT_FOUND)
        );
        assert_eq!(
            r(Method::GET, "/nonsense/meta-data/instance-id", &[]),
            Err(StatusCode::NOT_FOUND)
        );
        assert_eq!(
            r(Method::GET, "relative", &[]),
            Err(StatusCode::BAD_REQUEST)
        );
        let long = format!("/latest/{}", "a".repeat(600));
        assert_eq!(r(Method::GET, &long, &[]), Err(StatusCode::URI_TOO_LONG));
    }
}
