//! The IMDS wire protocol, pure: a request's method, path and headers become a [`Route`] or a
//! ready [`Reply`]; [`respond`] makes every decision from there, over three seams and a clock;
//! response bodies are built from plain values. No I/O here, so every rule of DESIGN §3 is
//! unit-tested from raw inputs.

pub mod respond;
pub mod token;
pub mod wire;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};

pub use respond::{
    Answer, Callers, CredentialSource, Decision, Protocol, Refusal, RequestHead, Roles, Seams,
};
pub use token::{TokenAuthority, TokenError};

pub(crate) const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
pub(crate) const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
/// Paths longer than this are refused before any matching: real metadata paths are short.
const MAX_PATH_LEN: usize = 512;

/// What a request asks for, once it passed the protocol checks. Borrows the request's path, so
/// routing allocates nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route<'a> {
    /// `PUT /latest/api/token`.
    IssueToken { ttl: u64 },
    /// `GET .../iam/security-credentials/`: the role name.
    RoleList,
    /// `GET .../iam/security-credentials/<name>`.
    Credentials { name: &'a str },
    /// `GET .../iam/info`.
    Info,
    /// `GET .../iam/`.
    IamIndex,
    /// Allow-listed passthrough of a path rebuilt from the allow-list entry.
    Upstream { path: UpstreamPath },
}

impl Route<'_> {
    /// Low-cardinality name for metrics and logs.
    pub(crate) fn metric_label(&self) -> &'static str {
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
    pub(crate) fn new(status: StatusCode, body: impl Into<Bytes>) -> Self {
        Reply {
            status,
            body: body.into(),
            headers: Vec::new(),
        }
    }
    pub(crate) fn ok(body: impl Into<Bytes>) -> Self {
        Self::new(StatusCode::OK, body)
    }
    pub(crate) fn not_found() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            wire::error_page(StatusCode::NOT_FOUND),
        )
    }
    pub(crate) fn status(status: StatusCode) -> Self {
        Self::new(status, wire::error_page(status))
    }
}

/// Default upstream allow-list: what SDKs read for region and identity. Never the node's
/// credentials, which are refused whatever this list says.
pub(crate) const DEFAULT_UPSTREAM_ALLOW: &[&str] = &[
    "meta-data/placement/*",
    "meta-data/instance-id",
    "meta-data/instance-type",
    "meta-data/services/*",
    "dynamic/instance-identity/document",
];

/// The operator's choices that shape the protocol.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Metadata paths (below the version) passed through; `*` at the end matches a subtree.
    pub upstream_allow: Vec<String>,
    /// GETs without a session token get 401, as with `HttpTokens=required`.
    pub v2_required: bool,
}

/// Routes a request, or answers it outright when the protocol already decides (405, 403, 400, 404).
///
/// Paths are not decoded: a metadata path is plain `[A-Za-z0-9._/-]`, so any other byte (a `%`
/// escape, `\`, `;`, controls, non-ASCII) is refused before routing, whatever an upstream might
/// make of it. Only the last segment of a credentials path may also carry the other characters
/// IAM allows in role names (`+=,@`); that route is answered here and never goes upstream.
pub fn route<'a>(
    method: &Method,
    path: &'a str,
    headers: &HeaderMap,
    policy: &Policy,
) -> Result<Route<'a>, Reply> {
    // What SDKs ask most, matched whole: the general checks below route it the same way (a
    // dated version aside, `latest` and the prefix pass them, and the name is one IAM segment).
    if *method == Method::GET
        && let Some(name) = path.strip_prefix(LATEST_CREDENTIALS)
        && is_role_name(name)
    {
        return Ok(Route::Credentials { name });
    }
    if *method != Method::GET && *method != Method::HEAD && *method != Method::PUT {
        return Err(Reply::status(StatusCode::METHOD_NOT_ALLOWED));
    }
    if path.len() > MAX_PATH_LEN {
        return Err(Reply::status(StatusCode::URI_TOO_LONG));
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err(Reply::status(StatusCode::BAD_REQUEST));
    };
    let (version, rest) = match rest.bytes().position(|b| b == b'/') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, ""),
    };
    if !version.bytes().all(is_path_byte) {
        return Err(Reply::not_found());
    }
    let role_name = rest
        .strip_prefix(CREDENTIALS_PREFIX)
        .filter(|n| !n.is_empty());
    let checked = match role_name {
        // The role name is checked as a single segment with IAM's character set: no `/`, not
        // `.` or `..`, so after the fixed prefix there is no bad segment to look for.
        Some(name) => is_role_name(name),
        None => rest.bytes().all(is_path_byte) && !has_bad_segment(rest),
    };
    if !checked {
        return Err(Reply::not_found());
    }
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
    if let Some(name) = role_name {
        return Ok(Route::Credentials { name });
    }
    if never_proxied(rest) {
        return Err(Reply::not_found());
    }
    match policy
        .upstream_allow
        .iter()
        .find_map(|p| allow_match(p, rest))
    {
        Some(canonical) => Ok(Route::Upstream {
            path: UpstreamPath(format!("/{version}/{canonical}")),
        }),
        None => Err(Reply::not_found()),
    }
}

const CREDENTIALS_PREFIX: &str = "meta-data/iam/security-credentials/";
const LATEST_CREDENTIALS: &str = "/latest/meta-data/iam/security-credentials/";

/// A path the agent may send upstream: built only by [`route`], from a version it validated and
/// the allow-list entry that matched (plus, under a `/*` entry, segments of `[A-Za-z0-9._-]`),
/// never from the caller's string as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamPath(String);

impl UpstreamPath {
    /// The node's region, which the agent itself reads at start when no AWS setting names it.
    pub(crate) fn region() -> Self {
        UpstreamPath("/latest/meta-data/placement/region".into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for UpstreamPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The bytes a metadata path may contain. Everything else, `%` first, is refused: an upstream
/// that decodes escapes or treats `\` or `;` as separators would otherwise see a different path
/// than the one checked here.
pub fn is_path_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'/' | b'-')
}

/// True when `rest` has an empty segment between two slashes, or a `.` or `..` segment. One pass
/// over the bytes (this runs for every request).
fn has_bad_segment(rest: &str) -> bool {
    let dots = |seg: &[u8]| seg == b"." || seg == b"..";
    let b = rest.as_bytes();
    let mut start = 0;
    for (i, c) in b.iter().enumerate() {
        if *c == b'/' {
            if i > 0 && b[i - 1] == b'/' || dots(&b[start..i]) {
                return true;
            }
            start = i + 1;
        }
    }
    dots(&b[start..])
}

/// IAM role names: `[\w+=,.@-]{1,64}`.
fn is_role_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_+=,.@-".contains(&b))
}

/// The node's credentials and signed identity, refused whatever the allow-list says. Compared
/// without regard to case, in case an upstream folds it.
fn never_proxied(rest: &str) -> bool {
    const SEGMENTS: &[&str] = &[
        "iam",
        "identity-credentials",
        "security-credentials",
        "user-data",
        "pkcs7",
        "signature",
        "rsa2048",
        "api",
    ];
    rest.split('/')
        .any(|seg| SEGMENTS.iter().any(|s| seg.eq_ignore_ascii_case(s)))
}

/// The canonical form of `path` when `pattern` allows it: the pattern itself for an exact entry;
/// for `prefix/*`, the prefix followed by the caller's remaining segments, each non-empty (a
/// trailing slash, a directory listing, is kept).
fn allow_match(pattern: &str, path: &str) -> Option<String> {
    let Some(prefix) = pattern.strip_suffix("/*") else {
        return (pattern == path).then(|| pattern.to_string());
    };
    if path == prefix {
        return Some(prefix.to_string());
    }
    let tail = path.strip_prefix(prefix)?.strip_prefix('/')?;
    let (body, slash) = match tail.strip_suffix('/') {
        Some(b) => (b, "/"),
        None => (tail, ""),
    };
    if body.is_empty() {
        return Some(format!("{prefix}/"));
    }
    let mut out = String::with_capacity(path.len());
    out.push_str(prefix);
    for seg in body.split('/') {
        if seg.is_empty() || seg == "." || seg == ".." || !seg.bytes().all(is_path_byte) {
            return None;
        }
        out.push('/');
        out.push_str(seg);
    }
    out.push_str(slash);
    Some(out)
}

/// The session token a GET carries, if any. Looked up by a ready header name: no parsing of
/// `TOKEN_HEADER` per request.
pub(crate) fn session_token(headers: &HeaderMap) -> Option<&[u8]> {
    const NAME: http::HeaderName = http::HeaderName::from_static(TOKEN_HEADER);
    // A metadata request carries a handful of headers: comparing names costs less than hashing
    // one. The first value, as `get` returns it.
    if headers.keys_len() <= 8 {
        return headers
            .iter()
            .find(|(k, _)| **k == NAME)
            .map(|(_, v)| v.as_bytes());
    }
    headers.get(&NAME).map(|v| v.as_bytes())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            upstream_allow: DEFAULT_UPSTREAM_ALLOW
                .iter()
                .map(|s| s.to_string())
                .collect(),
            v2_required: false,
        }
    }

    fn hdrs(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    fn r<'a>(
        method: Method,
        path: &'a str,
        h: &[(&'static str, &str)],
    ) -> Result<Route<'a>, StatusCode> {
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
            Ok(Route::Credentials { name: "app-role" })
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
    fn credentials_paths_route_alike_by_get_head_and_version() {
        let name = "a+b=c,d.e@f-g_h";
        for version in ["latest", "2016-09-02"] {
            let p = format!("/{version}/meta-data/iam/security-credentials/{name}");
            for m in [Method::GET, Method::HEAD] {
                assert_eq!(r(m, &p, &[]), Ok(Route::Credentials { name }), "{p}");
            }
        }
        for bad in ["..", ".", "a%2Fb", "a b", "a/", &"r".repeat(65)] {
            let p = format!("/latest/meta-data/iam/security-credentials/{bad}");
            for m in [Method::GET, Method::HEAD] {
                assert_eq!(r(m, &p, &[]), Err(StatusCode::NOT_FOUND), "{p}");
            }
        }
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
            v2_required: false,
        };
        assert!(route(&Method::GET, "/latest/user-data", &HeaderMap::new(), &p).is_err());
    }

    #[test]
    fn only_allow_listed_paths_go_upstream() {
        assert_eq!(
            r(Method::GET, "/latest/meta-data/placement/region", &[]),
            Ok(Route::Upstream {
                path: UpstreamPath::region()
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

    fn upstream_path(p: &str) -> Option<String> {
        match r(Method::GET, p, &[]) {
            Ok(Route::Upstream { path }) => Some(path.as_str().to_string()),
            _ => None,
        }
    }

    #[test]
    fn encoded_traversal_never_routes_upstream() {
        for p in [
            "/latest/meta-data/placement/%2e%2e/iam/security-credentials/",
            "/latest/meta-data/placement/%2E%2E/%2E%2E/user-data",
            "/latest/meta-data/placement/..%2f..%2fuser-data",
            "/latest/meta-data/placement/..%2F..%2Fuser-data",
            "/latest/meta-data/placement/..\\..\\user-data",
            "/latest/meta-data/placement/..;/..;/user-data",
            "/latest/meta-data/placement/%252e%252e/%252e%252e/user-data",
            "/latest/meta-data/placement/%5c..%5c..%5cuser-data",
            "/latest/meta-data/placement/region%00",
            "/latest/meta-data/placement/regi\u{f6}n",
            "/latest%2fmeta-data/placement/region",
            "/latest/meta-data/placement/./region",
        ] {
            assert_eq!(r(Method::GET, p, &[]), Err(StatusCode::NOT_FOUND), "{p}");
        }
        for b in 0u8..=255 {
            if is_path_byte(b) {
                continue;
            }
            let mut p = b"/latest/meta-data/placement/reg".to_vec();
            p.push(b);
            p.extend_from_slice(b"ion");
            let p = String::from_utf8_lossy(&p).into_owned();
            assert!(upstream_path(&p).is_none(), "byte {b:#04x}");
        }
    }

    #[test]
    fn upstream_path_is_rebuilt_from_the_allow_list() {
        assert_eq!(
            upstream_path("/latest/meta-data/placement/region").as_deref(),
            Some("/latest/meta-data/placement/region")
        );
        assert_eq!(
            upstream_path("/2021-01-03/meta-data/placement/").as_deref(),
            Some("/2021-01-03/meta-data/placement/")
        );
        assert_eq!(
            upstream_path("/latest/meta-data/placement").as_deref(),
            Some("/latest/meta-data/placement")
        );
        assert_eq!(
            upstream_path("/latest/dynamic/instance-identity/document").as_deref(),
            Some("/latest/dynamic/instance-identity/document")
        );
        // A wide allow-list still never reaches the node's secrets or signed identity.
        let wide = Policy {
            upstream_allow: vec!["meta-data/*".into(), "dynamic/*".into()],
            v2_required: false,
        };
        for p in [
            "/latest/dynamic/instance-identity/pkcs7",
            "/latest/dynamic/instance-identity/signature",
            "/latest/dynamic/instance-identity/rsa2048",
            "/latest/dynamic/instance-identity/PKCS7",
            "/latest/meta-data/identity-credentials/ec2/info",
            "/latest/meta-data/IAM/security-credentials/x",
            "/latest/meta-data/placement/user-data",
        ] {
            assert!(
                route(&Method::GET, p, &HeaderMap::new(), &wide).is_err(),
                "{p}"
            );
        }
        assert!(
            route(
                &Method::GET,
                "/latest/dynamic/instance-identity/document",
                &HeaderMap::new(),
                &wide
            )
            .is_ok()
        );
    }

    #[test]
    fn role_names_may_use_iams_characters_but_nothing_else() {
        assert_eq!(
            r(
                Method::GET,
                &format!("/latest/{CREDENTIALS_PREFIX}svc+a=b,c@d_e.f-g"),
                &[]
            ),
            Ok(Route::Credentials {
                name: "svc+a=b,c@d_e.f-g"
            })
        );
        for name in ["a%2fb", "a;b", "..", "a\\b", "a b"] {
            assert_eq!(
                r(
                    Method::GET,
                    &format!("/latest/{CREDENTIALS_PREFIX}{name}"),
                    &[]
                ),
                Err(StatusCode::NOT_FOUND),
                "{name}"
            );
        }
    }
}
