//! An in-process STS emulator for fault injection: `AssumeRoleWithWebIdentity` in the STS Query
//! protocol as aws-sdk-sts sends it, with the real XML shapes and error codes.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use tokio_util::sync::CancellationToken;

use crate::util::StopOnDrop;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssumeCall {
    pub role_arn: String,
    pub role_session_name: String,
    pub web_identity_token: String,
    pub duration_seconds: Option<u32>,
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
    latency: Duration,
    fail_next: Vec<StsFault>,
    denied: HashSet<String>,
    lifetime: Option<Duration>,
}

#[derive(Clone)]
pub struct StsEmulator {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    _stop: Arc<StopOnDrop>,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl StsEmulator {
    pub async fn start() -> anyhow::Result<StsEmulator> {
        Self::start_on(std::net::TcpListener::bind("127.0.0.1:0")?).await
    }

    pub async fn start_on(listener: std::net::TcpListener) -> anyhow::Result<StsEmulator> {
        let listener = crate::util::tokio_listener(listener)?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let stop = CancellationToken::new();
        let st = state.clone();
        crate::util::serve(listener, stop.clone(), move |req| handle(st.clone(), req));
        Ok(StsEmulator {
            addr,
            state,
            _stop: Arc::new(StopOnDrop(stop)),
        })
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn calls(&self) -> Vec<AssumeCall> {
        lock(&self.state).calls.clone()
    }

    pub fn call_count(&self) -> usize {
        lock(&self.state).calls.len()
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
    xml(
        status,
        format!(
            "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><Error><Type>{kind}</Type><Code>{code}</Code><Message>{message}</Message></Error><RequestId>c6104cbe-af31-11e0-8154-cbc7ccf896c7</RequestId></ErrorResponse>"
        ),
    )
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

fn alnum(n: u64, len: usize) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut x = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            A[(x % 32) as usize] as char
        })
        .collect()
}

async fn handle(state: Arc<Mutex<State>>, req: Request<Incoming>) -> Response<Full<Bytes>> {
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
    let duration = params
        .get("DurationSeconds")
        .and_then(|d| d.parse::<u32>().ok());
    let (latency, fault, denied, lifetime, n) = {
        let mut s = lock(&state);
        s.calls.push(AssumeCall {
            role_arn: role_arn.clone(),
            role_session_name: session.clone(),
            web_identity_token: token.clone(),
            duration_seconds: duration,
        });
        let fault = s.fail_next.pop();
        (
            s.latency,
            fault,
            s.denied.contains(role_arn),
            s.lifetime,
            s.calls.len() as u64,
        )
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if let Some(f) = fault {
        let (status, kind, code, msg) = f.wire();
        return error(status, kind, code, msg);
    }
    if denied {
        let (status, kind, code, msg) = StsFault::AccessDenied.wire();
        return error(status, kind, code, msg);
    }
    let want = Duration::from_secs(u64::from(duration.unwrap_or(3600)));
    let life = lifetime.map_or(want, |l| l.min(want));
    let exp = SystemTime::now() + life;
    let exp = aws_smithy_types_fmt(exp);
    let role_name = role_arn.rsplit('/').next().unwrap_or(role_arn);
    let account = role_arn.split(':').nth(4).unwrap_or("123456789012");
    let key_id = format!("ASIA{:04}{}", n % 10_000, alnum(n, 12));
    let body = format!(
        "<AssumeRoleWithWebIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\
<AssumeRoleWithWebIdentityResult>\
<SubjectFromWebIdentityToken>system:serviceaccount:testbed</SubjectFromWebIdentityToken>\
<Audience>sts.amazonaws.com</Audience>\
<AssumedRoleUser><Arn>arn:aws:sts::{account}:assumed-role/{role}/{sess}</Arn><AssumedRoleId>AROA{rid}:{sess}</AssumedRoleId></AssumedRoleUser>\
<Credentials><SessionToken>FwoGZXIvYXdzE{tok}</SessionToken><SecretAccessKey>{secret}</SecretAccessKey><Expiration>{exp}</Expiration><AccessKeyId>{key_id}</AccessKeyId></Credentials>\
<Provider>oidc.eks.us-east-1.amazonaws.com/id/TESTBED</Provider>\
</AssumeRoleWithWebIdentityResult>\
<ResponseMetadata><RequestId>ad4156e9-bce1-11e2-82e6-6b6efEXAMPLE</RequestId></ResponseMetadata>\
</AssumeRoleWithWebIdentityResponse>",
        role = escape(role_name),
        sess = escape(session),
        rid = alnum(n + 7, 17),
        tok = alnum(n + 11, 40),
        secret = alnum(n + 13, 40),
    );
    xml(200, body)
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
