//! An in-process STS emulator: `AssumeRoleWithWebIdentity` in the STS Query protocol as
//! aws-sdk-sts sends it, with the real XML shapes and error codes, that checks what real STS
//! checks: the parameters (RoleArn format, RoleSessionName pattern, DurationSeconds range and the
//! role's maximum), the web identity token (an RS256/ES256 JWT signed by the identity provider's
//! key, with the provider's `iss`, an accepted `aud`, `exp`/`nbf` in range) and the role's trust
//! policy (IRSA style: `StringEquals` on `<provider>:sub` and `<provider>:aud`). Credentials are
//! random (never counters) and every issue is recorded ([`Issued`]) so tests can assert that the
//! agent served exactly what STS issued. Fault injection: throttling, latency, errors.
//!
//! [`StsEmulator::start_forwarding`] checks the same and then has another STS (moto) issue the
//! credentials: the answer on the wire, and the keys that STS then recognises, are moto's.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use aws_lc_rs::rand::SecureRandom as _;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

pub use crate::jwt::KeySource;
use crate::jwt::{Issuer, Jwks};
use crate::util::StopOnDrop;

/// The audience EKS registers for its OIDC providers (the client ID STS accepts).
pub const STS_AUDIENCE: &str = "sts.amazonaws.com";

/// One `AssumeRoleWithWebIdentity` request as received (refused ones included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssumeCall {
    pub role_arn: String,
    pub role_session_name: String,
    pub web_identity_token: String,
    pub duration_seconds: Option<u32>,
    /// The error code answered, `None` if credentials were issued.
    pub error: Option<String>,
}

/// Credentials this emulator issued, with what they were issued for.
#[derive(Clone, PartialEq, Eq)]
pub struct Issued {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    pub role_arn: String,
    pub role_session_name: String,
    /// The token's `sub` (`system:serviceaccount:<ns>:<sa>`).
    pub subject: String,
    pub expiration: String,
}

impl std::fmt::Debug for Issued {
    // Secrets stay out of test output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("access_key_id", &self.access_key_id)
            .field("role_arn", &self.role_arn)
            .field("role_session_name", &self.role_session_name)
            .field("subject", &self.subject)
            .field("expiration", &self.expiration)
            .finish_non_exhaustive()
    }
}

/// A role's trust policy and session limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleTrust {
    /// `StringEquals <provider>:sub`: the subjects allowed to assume the role.
    pub subjects: BTreeSet<String>,
    /// `StringEquals <provider>:aud`.
    pub audience: String,
    /// The role's MaxSessionDuration (IAM default: one hour).
    pub max_session: Duration,
}

impl RoleTrust {
    /// Trusts `system:serviceaccount:<ns>:<sa>` for each `(ns, sa)`, audience sts.amazonaws.com,
    /// one-hour maximum session.
    pub fn service_accounts(sas: &[(&str, &str)]) -> RoleTrust {
        RoleTrust {
            subjects: sas
                .iter()
                .map(|(ns, sa)| format!("system:serviceaccount:{ns}:{sa}"))
                .collect(),
            audience: STS_AUDIENCE.into(),
            max_session: Duration::from_secs(3600),
        }
    }
}

impl RoleTrust {
    /// Reads an IAM trust policy document the way STS applies it to web identity tokens from
    /// `provider` (the issuer URL without `https://`): the statement that allows
    /// `sts:AssumeRoleWithWebIdentity` to `arn:<partition>:iam::<account>:oidc-provider/<provider>`,
    /// with `StringEquals` on `<provider>:sub` (one subject or a list) and `<provider>:aud`.
    /// Anything else in the policy is refused rather than ignored, so a test cannot pass on a
    /// policy this emulator does not understand.
    pub fn from_policy(policy: &Value, provider: &str) -> anyhow::Result<RoleTrust> {
        use anyhow::{Context, bail, ensure};
        ensure!(
            policy["Version"] == "2012-10-17",
            "policy Version must be 2012-10-17"
        );
        let statements = match &policy["Statement"] {
            Value::Array(a) => a.clone(),
            s @ Value::Object(_) => vec![s.clone()],
            _ => bail!("policy has no Statement"),
        };
        ensure!(
            statements.len() == 1,
            "one statement expected, got {}",
            statements.len()
        );
        let st = &statements[0];
        ensure!(st["Effect"] == "Allow", "Effect must be Allow");
        ensure!(
            st["Action"] == "sts:AssumeRoleWithWebIdentity",
            "Action must be sts:AssumeRoleWithWebIdentity"
        );
        let federated = st["Principal"]["Federated"]
            .as_str()
            .context("Principal.Federated missing")?;
        ensure!(
            federated.starts_with("arn:aws")
                && federated.ends_with(&format!(":oidc-provider/{provider}")),
            "Principal.Federated {federated} is not the provider {provider}"
        );
        let cond = st["Condition"].as_object().context("Condition missing")?;
        ensure!(
            cond.keys().all(|k| k == "StringEquals"),
            "only StringEquals conditions are understood: {cond:?}"
        );
        let eq = cond
            .get("StringEquals")
            .and_then(|v| v.as_object())
            .context("StringEquals missing")?;
        let (sub_key, aud_key) = (format!("{provider}:sub"), format!("{provider}:aud"));
        ensure!(
            eq.keys().all(|k| *k == sub_key || *k == aud_key),
            "unexpected condition keys: {:?}",
            eq.keys().collect::<Vec<_>>()
        );
        let subjects = match eq.get(&sub_key) {
            Some(Value::String(s)) => BTreeSet::from([s.clone()]),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .context("sub must be strings")
                })
                .collect::<anyhow::Result<_>>()?,
            _ => bail!("{sub_key} condition missing: every ServiceAccount would be trusted"),
        };
        let audience = eq
            .get(&aud_key)
            .and_then(|v| v.as_str())
            .with_context(|| format!("{aud_key} condition missing"))?
            .to_string();
        Ok(RoleTrust {
            subjects,
            audience,
            max_session: Duration::from_secs(3600),
        })
    }
}

/// Which roles exist and whom they trust.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Every well-formed role ARN exists and trusts every ServiceAccount of the provider
    /// (`StringLike <provider>:sub = system:serviceaccount:*`), audience sts.amazonaws.com, one-hour
    /// maximum session. Tokens are still fully verified.
    AnyServiceAccount,
    /// Only these roles exist (others: AccessDenied), each with its own trust policy.
    Roles(BTreeMap<String, RoleTrust>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StsFault {
    Throttling,
    AccessDenied,
    InvalidIdentityToken,
    IdpCommunication,
    Internal,
}

impl StsFault {
    fn wire(self) -> (u16, &'static str, &'static str, &'static str) {
        match self {
            StsFault::Throttling => (400, "Sender", "Throttling", "Rate exceeded"),
            StsFault::AccessDenied => (
                403,
                "Sender",
                "AccessDenied",
                "Not authorized to perform sts:AssumeRoleWithWebIdentity",
            ),
            StsFault::InvalidIdentityToken => (
                400,
                "Sender",
                "InvalidIdentityToken",
                "No OpenIDConnect provider found in your account",
            ),
            StsFault::IdpCommunication => (
                400,
                "Sender",
                "IDPCommunicationError",
                "Couldn't retrieve verification key from your identity provider",
            ),
            StsFault::Internal => (
                500,
                "Receiver",
                "InternalFailure",
                "An internal error occurred",
            ),
        }
    }
}

#[derive(Default)]
struct State {
    calls: Vec<AssumeCall>,
    issued: Vec<Issued>,
    latency: Duration,
    fail_next: Vec<StsFault>,
    denied: HashSet<String>,
    lifetime: Option<Duration>,
    /// The provider's keys as last fetched.
    jwks: Option<Jwks>,
}

/// Where a verified request is answered (see [`StsEmulator::start_forwarding`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// The network namespace to connect from (`None`: this process's).
    pub netns: Option<String>,
    pub addr: SocketAddr,
}

struct Config {
    keys: KeySource,
    /// Set: verified requests are forwarded there and its answer is returned as it is.
    forward: Option<Forward>,
    /// The provider's client IDs (audiences STS accepts in tokens).
    client_ids: Vec<String>,
    trust: Mutex<Trust>,
    /// Serialises key fetches.
    fetch: tokio::sync::Mutex<()>,
}

#[derive(Clone)]
pub struct StsEmulator {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    config: Arc<Config>,
    _stop: Arc<StopOnDrop>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl StsEmulator {
    /// An STS whose account has one OIDC provider, the process-wide emulated issuer every
    /// [`KubeApi::start`](crate::kube_api::KubeApi::start) signs with, and [`Trust::AnyServiceAccount`].
    pub async fn start() -> anyhow::Result<StsEmulator> {
        Self::start_with(
            KeySource::Emulated(Issuer::testbed()),
            Trust::AnyServiceAccount,
        )
        .await
    }

    /// An STS whose account has the OIDC provider `keys` (client ID sts.amazonaws.com) and the
    /// roles `trust`.
    pub async fn start_with(keys: KeySource, trust: Trust) -> anyhow::Result<StsEmulator> {
        Self::start_on(std::net::TcpListener::bind("127.0.0.1:0")?, keys, trust).await
    }

    pub async fn start_on(
        listener: std::net::TcpListener,
        keys: KeySource,
        trust: Trust,
    ) -> anyhow::Result<StsEmulator> {
        Self::serve(listener, keys, trust, None).await
    }

    /// Verifies every request as [`start_on`](Self::start_on) does (parameters, token against
    /// `keys`, the role's `trust`), answers a refusal itself, and forwards an accepted request,
    /// unchanged, to the STS at `forward` (moto), whose answer it returns as it is. Accepted calls
    /// are recorded in [`calls`](Self::calls); [`issued`](Self::issued) stays empty.
    pub async fn start_forwarding(
        listener: std::net::TcpListener,
        keys: KeySource,
        trust: Trust,
        forward: Forward,
    ) -> anyhow::Result<StsEmulator> {
        Self::serve(listener, keys, trust, Some(forward)).await
    }

    async fn serve(
        listener: std::net::TcpListener,
        keys: KeySource,
        trust: Trust,
        forward: Option<Forward>,
    ) -> anyhow::Result<StsEmulator> {
        let listener = crate::util::tokio_listener(listener)?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let config = Arc::new(Config {
            keys,
            forward,
            client_ids: vec![STS_AUDIENCE.into()],
            trust: Mutex::new(trust),
            fetch: tokio::sync::Mutex::new(()),
        });
        let stop = CancellationToken::new();
        let (st, cfg) = (state.clone(), config.clone());
        crate::util::serve(listener, stop.clone(), move |req| {
            handle(st.clone(), cfg.clone(), req)
        });
        Ok(StsEmulator {
            addr,
            state,
            config,
            _stop: Arc::new(StopOnDrop(stop)),
        })
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received, refused ones included.
    pub fn calls(&self) -> Vec<AssumeCall> {
        lock(&self.state).calls.clone()
    }

    pub fn call_count(&self) -> usize {
        lock(&self.state).calls.len()
    }

    /// Every set of credentials issued, in order.
    pub fn issued(&self) -> Vec<Issued> {
        lock(&self.state).issued.clone()
    }

    /// The issue with this access key id.
    pub fn issued_for_key(&self, access_key_id: &str) -> Option<Issued> {
        lock(&self.state)
            .issued
            .iter()
            .find(|i| i.access_key_id == access_key_id)
            .cloned()
    }

    /// Adds (or replaces) a role; switches [`Trust::AnyServiceAccount`] to explicit roles.
    pub fn trust_role(&self, role_arn: &str, trust: RoleTrust) {
        let mut t = lock(&self.config.trust);
        if let Trust::AnyServiceAccount = *t {
            *t = Trust::Roles(BTreeMap::new());
        }
        if let Trust::Roles(roles) = &mut *t {
            roles.insert(role_arn.into(), trust);
        }
    }

    pub fn set_latency(&self, d: Duration) {
        lock(&self.state).latency = d;
    }

    /// The next `n` calls fail with `err` (after that, normal service).
    pub fn fail_next(&self, n: u32, err: StsFault) {
        let mut s = lock(&self.state);
        for _ in 0..n {
            s.fail_next.push(err);
        }
    }

    pub fn deny_role(&self, role_arn: &str) {
        lock(&self.state).denied.insert(role_arn.to_string());
    }

    pub fn set_credential_lifetime(&self, d: Duration) {
        lock(&self.state).lifetime = Some(d);
    }
}

fn xml(status: u16, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "text/xml")
        .header("x-amzn-requestid", "c6104cbe-af31-11e0-8154-cbc7ccf896c7")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

fn error(status: u16, kind: &str, code: &str, message: &str) -> Response<Full<Bytes>> {
    let mut r = xml(
        status,
        format!(
            "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><Error><Type>{kind}</Type><Code>{code}</Code><Message>{message}</Message></Error><RequestId>c6104cbe-af31-11e0-8154-cbc7ccf896c7</RequestId></ErrorResponse>"
        ),
    );
    if let Ok(v) = http::HeaderValue::from_str(code) {
        r.headers_mut().insert("x-testbed-error-code", v);
    }
    r
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn form(s: &str) -> BTreeMap<String, String> {
    let decode = |v: &str| {
        let v = v.replace('+', " ");
        let b = v.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            match (
                b[i],
                b.get(i + 1).and_then(|c| hex(*c)),
                b.get(i + 2).and_then(|c| hex(*c)),
            ) {
                (b'%', Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                }
                (c, _, _) => {
                    out.push(c);
                    i += 1;
                }
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn sts_error(status: u16, code: &str, message: &str) -> Response<Full<Bytes>> {
    error(status, "Sender", code, &escape(message))
}

fn validation(message: &str) -> Response<Full<Bytes>> {
    sts_error(400, "ValidationError", message)
}

fn random_chars(alphabet: &[u8], len: usize) -> String {
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let mut buf = vec![0u8; len];
    // SystemRandom only fails if the OS has no randomness; then the emulator cannot work at all.
    rng.fill(&mut buf).expect("system randomness");
    buf.iter()
        .map(|b| alphabet[usize::from(*b) % alphabet.len()] as char)
        .collect()
}

const UPPER32: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// `arn:aws:iam::<12 digits>:role/<path/>name`, 20..=2048 characters, as STS accepts.
fn role_arn_ok(arn: &str) -> bool {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    (20..=2048).contains(&arn.len())
        && parts.len() == 6
        && parts[0] == "arn"
        && ["aws", "aws-cn", "aws-us-gov"].contains(&parts[1])
        && parts[2] == "iam"
        && parts[3].is_empty()
        && parts[4].len() == 12
        && parts[4].bytes().all(|b| b.is_ascii_digit())
        && parts[5].strip_prefix("role/").is_some_and(|name| {
            let name = name.rsplit('/').next().unwrap_or_default();
            !name.is_empty()
                && name.len() <= 64
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+=,.@_-".contains(c))
        })
}

/// `[\w+=,.@-]{2,64}`.
fn session_name_ok(s: &str) -> bool {
    (2..=64).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c))
}

/// STS's own parameter checks, before any token is looked at.
fn validate_params(
    role_arn: &str,
    session: &str,
    duration: Option<&str>,
) -> Result<Option<u32>, Box<Response<Full<Bytes>>>> {
    if role_arn.len() < 20 {
        return Err(Box::new(validation(&format!(
            "1 validation error detected: Value '{role_arn}' at 'roleArn' failed to satisfy constraint: Member must have length greater than or equal to 20"
        ))));
    }
    if !role_arn_ok(role_arn) {
        return Err(Box::new(validation(&format!("{role_arn} is invalid"))));
    }
    if !session_name_ok(session) {
        let constraint = if session.len() < 2 || session.len() > 64 {
            format!(
                "Member must have length {} 2",
                if session.len() < 2 {
                    "greater than or equal to"
                } else {
                    "less than or equal to 64, and greater than or equal to"
                }
            )
        } else {
            "Member must satisfy regular expression pattern: [\\w+=,.@-]*".to_string()
        };
        return Err(Box::new(validation(&format!(
            "1 validation error detected: Value '{session}' at 'roleSessionName' failed to satisfy constraint: {constraint}"
        ))));
    }
    let Some(d) = duration else {
        return Ok(None);
    };
    let secs: i64 = d.parse().map_err(|_| {
        Box::new(sts_error(
            400,
            "MalformedInput",
            &format!("Invalid value '{d}' for DurationSeconds"),
        ))
    })?;
    if secs < 900 {
        return Err(Box::new(validation(&format!(
            "1 validation error detected: Value '{secs}' at 'durationSeconds' failed to satisfy constraint: Member must have value greater than or equal to 900"
        ))));
    }
    if secs > 43200 {
        return Err(Box::new(validation(&format!(
            "1 validation error detected: Value '{secs}' at 'durationSeconds' failed to satisfy constraint: Member must have value less than or equal to 43200"
        ))));
    }
    Ok(Some(secs as u32))
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A verified token's claims that matter to the trust policy.
struct Verified {
    sub: String,
    aud: String,
}

/// Verifies the web identity token as STS does; `Err` is the error response.
async fn verify_token(
    state: &Mutex<State>,
    config: &Config,
    token: &str,
) -> Result<Verified, Box<Response<Full<Bytes>>>> {
    let invalid = |m: &str| sts_error(400, "InvalidIdentityToken", m);
    if token.len() < 4 || token.len() > 20_000 {
        return Err(Box::new(validation(
            "1 validation error detected: Value at 'webIdentityToken' failed to satisfy constraint: Member must have length less than or equal to 20000",
        )));
    }
    let (header, claims) = crate::jwt::decode_unverified(token)
        .map_err(|_| Box::new(invalid("The ID Token provided is not a valid JWT. (You may see this error if you sent an Access Token)")))?;
    let iss = claims["iss"].as_str().unwrap_or_default();
    let provider = config.keys.issuer();
    if iss != provider {
        return Err(Box::new(invalid(&format!(
            "No OpenIDConnect provider found in your account for {iss}"
        ))));
    }
    // Keys: the cached set, refetched when the token names a key not in it (as STS does).
    let kid = header["kid"].as_str().unwrap_or_default().to_string();
    let cached = lock(state).jwks.clone();
    let keys = match cached {
        Some(k) if k.contains(&kid) => k,
        _ => {
            let _one = config.fetch.lock().await;
            match config.keys.fetch().await {
                Ok(k) => {
                    lock(state).jwks = Some(k.clone());
                    k
                }
                Err(_) => {
                    return Err(Box::new(sts_error(
                        400,
                        "IDPCommunicationError",
                        "Couldn't retrieve verification key from your identity provider,  please reference AssumeRoleWithWebIdentity documentation for requirements",
                    )));
                }
            }
        }
    };
    let claims = keys.verify(token).map_err(|_| {
        Box::new(invalid(
            "Couldn't verify the signature of the web identity token",
        ))
    })?;
    let now = now_secs();
    let num = |v: &Value| v.as_i64().or_else(|| v.as_f64().map(|f| f as i64));
    let Some(exp) = num(&claims["exp"]) else {
        return Err(Box::new(invalid(
            "The web identity token has no expiration (exp)",
        )));
    };
    if exp <= now {
        return Err(Box::new(sts_error(
            400,
            "ExpiredTokenException",
            &format!(
                "Token expired: current date/time {now} must be before the expiration date/time {exp}"
            ),
        )));
    }
    if num(&claims["nbf"]).is_some_and(|nbf| nbf > now + 60) {
        return Err(Box::new(invalid(
            "The web identity token is not yet valid (nbf)",
        )));
    }
    let auds: Vec<String> = match &claims["aud"] {
        Value::String(a) => vec![a.clone()],
        Value::Array(a) => a
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
        _ => Vec::new(),
    };
    let Some(aud) = auds.iter().find(|a| config.client_ids.contains(a)).cloned() else {
        return Err(Box::new(invalid("Incorrect token audience")));
    };
    let sub = claims["sub"].as_str().unwrap_or_default().to_string();
    if sub.is_empty() {
        return Err(Box::new(invalid(
            "The web identity token has no subject (sub)",
        )));
    }
    Ok(Verified { sub, aud })
}

/// The role's trust policy applied to a verified token; `Ok` is the role's maximum session.
fn authorize(
    config: &Config,
    role_arn: &str,
    v: &Verified,
) -> Result<Duration, Box<Response<Full<Bytes>>>> {
    let denied = || {
        let (status, kind, code, msg) = StsFault::AccessDenied.wire();
        error(status, kind, code, msg)
    };
    match &*lock(&config.trust) {
        Trust::AnyServiceAccount => {
            if v.sub.starts_with("system:serviceaccount:") && v.aud == STS_AUDIENCE {
                Ok(Duration::from_secs(3600))
            } else {
                Err(Box::new(denied()))
            }
        }
        Trust::Roles(roles) => match roles.get(role_arn) {
            Some(t) if t.subjects.contains(&v.sub) && t.audience == v.aud => Ok(t.max_session),
            _ => Err(Box::new(denied())),
        },
    }
}

async fn handle(
    state: Arc<Mutex<State>>,
    config: Arc<Config>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let query = req.uri().query().unwrap_or("").to_string();
    let body = match Limited::new(req.into_body(), 64 * 1024).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return error(400, "Sender", "MalformedInput", "body too large"),
    };
    let mut params = form(&query);
    params.extend(form(&String::from_utf8_lossy(&body)));
    if params.get("Action").map(String::as_str) != Some("AssumeRoleWithWebIdentity") {
        return error(400, "Sender", "InvalidAction", "Could not find operation");
    }
    let (Some(role_arn), Some(session), Some(token)) = (
        params.get("RoleArn"),
        params.get("RoleSessionName"),
        params.get("WebIdentityToken"),
    ) else {
        return error(
            400,
            "Sender",
            "MissingParameter",
            "RoleArn, RoleSessionName and WebIdentityToken are required",
        );
    };
    let duration_param = params.get("DurationSeconds");
    let index = {
        let mut s = lock(&state);
        s.calls.push(AssumeCall {
            role_arn: role_arn.clone(),
            role_session_name: session.clone(),
            web_identity_token: token.clone(),
            duration_seconds: duration_param.and_then(|d| d.parse().ok()),
            error: None,
        });
        s.calls.len() - 1
    };
    let resp = answer(
        &state,
        &config,
        role_arn,
        session,
        token,
        duration_param,
        &body,
    )
    .await;
    if resp.status() != StatusCode::OK {
        let code = error_code(&resp);
        if let Some(c) = lock(&state).calls.get_mut(index) {
            c.error = Some(code);
        }
    }
    resp
}

fn error_code(resp: &Response<Full<Bytes>>) -> String {
    resp.headers()
        .get("x-testbed-error-code")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("Unknown")
        .to_string()
}

async fn answer(
    state: &Mutex<State>,
    config: &Config,
    role_arn: &str,
    session: &str,
    token: &str,
    duration_param: Option<&String>,
    body: &Bytes,
) -> Response<Full<Bytes>> {
    let (latency, fault, denied, lifetime) = {
        let mut s = lock(state);
        let fault = s.fail_next.pop();
        (s.latency, fault, s.denied.contains(role_arn), s.lifetime)
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if let Some(f) = fault {
        let (status, kind, code, msg) = f.wire();
        return error(status, kind, code, msg);
    }
    let duration = match validate_params(role_arn, session, duration_param.map(String::as_str)) {
        Ok(d) => d,
        Err(r) => return *r,
    };
    let verified = match verify_token(state, config, token).await {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let max_session = match authorize(config, role_arn, &verified) {
        Ok(m) => m,
        Err(r) => return *r,
    };
    if denied {
        let (status, kind, code, msg) = StsFault::AccessDenied.wire();
        return error(status, kind, code, msg);
    }
    let want = Duration::from_secs(u64::from(duration.unwrap_or(3600)));
    if want > max_session {
        return validation(
            "The requested DurationSeconds exceeds the MaxSessionDuration set for this role.",
        );
    }
    if let Some(f) = &config.forward {
        return forward(f, body.clone())
            .await
            .unwrap_or_else(|e| error(500, "Receiver", "InternalFailure", &e.to_string()));
    }
    let life = lifetime.map_or(want, |l| l.min(want));
    let exp = aws_smithy_types_fmt(SystemTime::now() + life);
    let role_name = role_arn.rsplit('/').next().unwrap_or(role_arn);
    let account = role_arn.split(':').nth(4).unwrap_or("123456789012");
    // A role's id is stable; keys, secrets and session tokens are random.
    let role_id: String =
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, role_arn.as_bytes())
            .as_ref()
            .iter()
            .take(17)
            .map(|b| UPPER32[usize::from(*b) % 32] as char)
            .collect();
    let issued = Issued {
        access_key_id: format!("ASIA{}", random_chars(UPPER32, 16)),
        secret_access_key: random_chars(B64, 40),
        session_token: format!("IQoJb3JpZ2luX2Vj{}", random_chars(B64, 356)),
        role_arn: role_arn.into(),
        role_session_name: session.into(),
        subject: verified.sub.clone(),
        expiration: exp.clone(),
    };
    let body = format!(
        "<AssumeRoleWithWebIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\
<AssumeRoleWithWebIdentityResult>\
<SubjectFromWebIdentityToken>{sub}</SubjectFromWebIdentityToken>\
<Audience>{aud}</Audience>\
<AssumedRoleUser><Arn>arn:aws:sts::{account}:assumed-role/{role}/{sess}</Arn><AssumedRoleId>AROA{role_id}:{sess}</AssumedRoleId></AssumedRoleUser>\
<Credentials><SessionToken>{tok}</SessionToken><SecretAccessKey>{secret}</SecretAccessKey><Expiration>{exp}</Expiration><AccessKeyId>{key_id}</AccessKeyId></Credentials>\
<Provider>{provider}</Provider>\
</AssumeRoleWithWebIdentityResult>\
<ResponseMetadata><RequestId>ad4156e9-bce1-11e2-82e6-6b6efEXAMPLE</RequestId></ResponseMetadata>\
</AssumeRoleWithWebIdentityResponse>",
        sub = escape(&verified.sub),
        aud = escape(&verified.aud),
        account = escape(account),
        role = escape(role_name),
        sess = escape(session),
        tok = escape(&issued.session_token),
        secret = escape(&issued.secret_access_key),
        key_id = issued.access_key_id,
        provider = escape(config.keys.issuer().trim_start_matches("https://")),
    );
    lock(state).issued.push(issued);
    xml(200, body)
}

/// The request, as a form POST to `f`; its answer (status, content type, body) as it is.
async fn forward(f: &Forward, body: Bytes) -> anyhow::Result<Response<Full<Bytes>>> {
    let addr = f.addr;
    let stream = match f.netns.clone() {
        None => tokio::net::TcpStream::connect(addr).await?,
        Some(ns) => {
            let s =
                tokio::task::spawn_blocking(move || crate::netns::connect_in(&ns, addr)).await??;
            s.set_nonblocking(true)?;
            tokio::net::TcpStream::from_std(s)?
        }
    };
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::post("/")
        .header("host", addr.to_string())
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(body))?;
    let resp = tokio::time::timeout(Duration::from_secs(30), sender.send_request(req)).await??;
    let status = resp.status();
    let content_type = resp.headers().get("content-type").cloned();
    let bytes = resp.into_body().collect().await?.to_bytes();
    let mut out = Response::builder().status(status);
    if let Some(ct) = content_type {
        out = out.header("content-type", ct);
    }
    Ok(out.body(Full::new(bytes))?)
}

/// `YYYY-MM-DDTHH:MM:SSZ`, as STS writes it.
fn aws_smithy_types_fmt(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let dt =
        time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let f = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    dt.format(&f).unwrap_or_default()
}
