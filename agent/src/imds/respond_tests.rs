//! The wire contract (DESIGN §3) from raw inputs: method, path, headers, the caller's address,
//! fake seams and a clock that only moves when told.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::*;
use crate::identity::{Credentials, RoleSource, Secret};
use crate::imds::{DEFAULT_UPSTREAM_ALLOW, TOKEN_HEADER};

const ROLE_A: &str = "arn:aws:iam::123456789012:role/team-a/reader";
const ROLE_B: &str = "arn:aws:iam::123456789012:role/writer";
const CREDS: &str = "/latest/meta-data/iam/security-credentials/";
const POD_A: &str = "10.0.0.41";
const POD_B: &str = "10.0.0.42";
const NO_ROLE: &str = "10.0.0.43";
const HOST_NET: &str = "10.0.0.44";
const STRANGER: &str = "10.0.0.99";

struct FakeCallers(HashMap<IpAddr, Lookup>);

impl Callers for FakeCallers {
    fn identify(&self, ip: IpAddr) -> BoxFuture<'_, Lookup> {
        let l = self.0.get(&ip).cloned().unwrap_or(Lookup::Unknown);
        Box::pin(async move { l })
    }
}

type RoleAnswer = Result<RoleGrant, IdentityError>;

struct FakeRoles(Mutex<HashMap<String, RoleAnswer>>);

impl Roles for FakeRoles {
    fn role_of<'a>(&'a self, pod: &'a PodInfo) -> BoxFuture<'a, RoleAnswer> {
        let r = self.0.lock().unwrap().get(&pod.service_account).cloned();
        Box::pin(async move { r.unwrap_or(Ok(RoleGrant::NoRole)) })
    }
}

/// Credentials by role ARN; counts how often it was asked.
struct FakeCreds {
    answers: Mutex<HashMap<String, Result<Credentials, IdentityError>>>,
    asked: AtomicUsize,
}

impl CredentialSource for FakeCreds {
    fn credentials<'a>(
        &'a self,
        _pod: &'a Arc<PodInfo>,
        role: &'a Arc<RoleSpec>,
    ) -> BoxFuture<'a, Result<Arc<Served>, IdentityError>> {
        self.asked.fetch_add(1, Ordering::SeqCst);
        let r = self.answers.lock().unwrap().get(&role.role_arn).cloned();
        Box::pin(async move {
            r.expect("no credentials scripted for this role")
                .map(|c| Arc::new(Served::new(c)))
        })
    }
}

struct FakeClock(Mutex<SystemTime>);

impl Clock for FakeClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap()
    }
}

fn t0() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_795_000_000)
}

fn pod(uid: &str, name: &str, sa: &str, ip: &str) -> Arc<PodInfo> {
    Arc::new(PodInfo {
        uid: uid.into(),
        namespace: "apps".into(),
        name: name.into(),
        service_account: sa.into(),
        node_name: Some("node-1".into()),
        ips: vec![ip.parse().unwrap()],
        host_network: false,
        terminal: false,
        kube2iam_role: None,
    })
}

fn role(arn: &str) -> Arc<RoleSpec> {
    Arc::new(RoleSpec {
        role_arn: arn.into(),
        audience: "sts.amazonaws.com".into(),
        token_expiration_secs: 3600,
        regional_sts: true,
        source: RoleSource::ServiceAccount,
    })
}

fn creds(key: &str) -> Credentials {
    Credentials {
        access_key_id: key.into(),
        secret_access_key: Secret::new("secret"),
        session_token: Secret::new("session"),
        expiration: t0() + Duration::from_secs(3600),
        issued_at: t0(),
    }
}

struct Bed {
    callers: FakeCallers,
    roles: FakeRoles,
    creds: FakeCreds,
    clock: FakeClock,
    protocol: Protocol,
}

fn bed() -> Bed {
    bed_with(false)
}

/// Pod a (role reader), pod b (role writer), a pod without a role, a hostNetwork address.
fn bed_with(v2_required: bool) -> Bed {
    let callers = FakeCallers(HashMap::from([
        (
            POD_A.parse().unwrap(),
            Lookup::Found(pod("uid-a", "a", "reader", POD_A)),
        ),
        (
            POD_B.parse().unwrap(),
            Lookup::Found(pod("uid-b", "b", "writer", POD_B)),
        ),
        (
            NO_ROLE.parse().unwrap(),
            Lookup::Found(pod("uid-c", "c", "plain", NO_ROLE)),
        ),
        (HOST_NET.parse().unwrap(), Lookup::HostNetwork),
    ]));
    let roles = FakeRoles(Mutex::new(HashMap::from([
        ("reader".to_string(), Ok(RoleGrant::Role(role(ROLE_A)))),
        ("writer".to_string(), Ok(RoleGrant::Role(role(ROLE_B)))),
    ])));
    let creds = FakeCreds {
        answers: Mutex::new(HashMap::from([
            (ROLE_A.to_string(), Ok(creds("ASIAREADER"))),
            (ROLE_B.to_string(), Ok(creds("ASIAWRITER"))),
        ])),
        asked: AtomicUsize::new(0),
    };
    let policy = Policy {
        upstream_allow: DEFAULT_UPSTREAM_ALLOW
            .iter()
            .map(|s| s.to_string())
            .collect(),
        v2_required,
    };
    Bed {
        callers,
        roles,
        creds,
        clock: FakeClock(Mutex::new(t0())),
        protocol: Protocol::new(TokenAuthority::new().unwrap(), policy),
    }
}

impl Bed {
    async fn answer(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        ip: &str,
    ) -> Answer {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let head = RequestHead {
            method: &method,
            path,
            headers: &h,
        };
        let seams = Seams {
            callers: &self.callers,
            roles: &self.roles,
            credentials: &self.creds,
            clock: &self.clock,
        };
        self.protocol
            .decide(head, ip.parse().unwrap(), seams)
            .await
            .answer
    }

    async fn reply(&self, method: Method, path: &str, headers: &[(&str, &str)], ip: &str) -> Reply {
        match self.answer(method, path, headers, ip).await {
            Answer::Reply(r) => r,
            Answer::Upstream { path } => panic!("sent upstream to {path}"),
        }
    }

    async fn get(&self, ip: &str, path: &str) -> Reply {
        self.reply(Method::GET, path, &[], ip).await
    }

    async fn get_with_token(&self, ip: &str, path: &str, token: &str) -> Reply {
        self.reply(Method::GET, path, &[(TOKEN_HEADER, token)], ip)
            .await
    }

    async fn put_token(&self, ip: &str, headers: &[(&str, &str)]) -> Reply {
        self.reply(Method::PUT, "/latest/api/token", headers, ip)
            .await
    }

    async fn token(&self, ip: &str, ttl: &str) -> String {
        let r = self.put_token(ip, &[(TTL_HEADER, ttl)]).await;
        assert_eq!(r.status, StatusCode::OK);
        text(&r)
    }

    fn advance(&self, d: Duration) {
        *self.clock.0.lock().unwrap() += d;
    }
}

fn text(r: &Reply) -> String {
    String::from_utf8(r.body.to_vec()).unwrap()
}

fn json(r: &Reply) -> serde_json::Value {
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{e}: {}", text(r)))
}

#[tokio::test]
async fn listing_is_the_role_name_without_trailing_newline() {
    let b = bed();
    for path in [CREDS, "/latest/meta-data/iam/security-credentials"] {
        let r = b.get(POD_A, path).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(text(&r), "reader", "exactly the name, no newline");
    }
}

#[tokio::test]
async fn credentials_have_exactly_the_ec2_fields_and_formats() {
    let b = bed();
    let r = b.get(POD_A, &format!("{CREDS}reader")).await;
    assert_eq!(r.status, StatusCode::OK);
    let v = json(&r);
    let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(|s| s.as_str()).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "AccessKeyId",
            "Code",
            "Expiration",
            "LastUpdated",
            "SecretAccessKey",
            "Token",
            "Type"
        ]
    );
    assert_eq!(v["Code"], "Success");
    assert_eq!(v["Type"], "AWS-HMAC");
    assert_eq!(v["AccessKeyId"], "ASIAREADER");
    assert_eq!(v["LastUpdated"], "2026-11-18T11:06:40Z");
    assert_eq!(v["Expiration"], "2026-11-18T12:06:40Z");
}

#[tokio::test]
async fn each_pod_sees_only_its_own_role() {
    let b = bed();
    assert_eq!(
        json(&b.get(POD_B, &format!("{CREDS}writer")).await)["AccessKeyId"],
        "ASIAWRITER"
    );
    for (ip, other) in [(POD_A, "writer"), (POD_B, "reader"), (POD_A, "node-role")] {
        let r = b.get(ip, &format!("{CREDS}{other}")).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{ip} asks for {other}");
    }
}

#[tokio::test]
async fn callers_without_a_role_get_nothing_and_never_the_nodes() {
    let b = bed();
    for ip in [NO_ROLE, HOST_NET, STRANGER] {
        for path in [
            CREDS.to_string(),
            format!("{CREDS}node-role"),
            format!("{CREDS}reader"),
            "/latest/meta-data/iam/info".to_string(),
            "/latest/meta-data/iam/".to_string(),
        ] {
            let r = b.get(ip, &path).await;
            assert_eq!(r.status, StatusCode::NOT_FOUND, "{ip} {path}");
            assert!(!text(&r).contains("node-role"), "{ip} {path}");
        }
    }
    assert_eq!(b.creds.asked.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn iam_index_and_info_describe_the_pods_role() {
    let b = bed();
    let idx = b.get(POD_A, "/latest/meta-data/iam/").await;
    assert_eq!(
        (idx.status, text(&idx).as_str()),
        (StatusCode::OK, "info\nsecurity-credentials/")
    );
    let info = json(&b.get(POD_A, "/latest/meta-data/iam/info").await);
    assert_eq!(
        info["InstanceProfileArn"],
        "arn:aws:iam::123456789012:instance-profile/team-a/reader"
    );
    assert_eq!(info["Code"], "Success");
}

#[tokio::test]
async fn token_put_answers_with_the_ttl_header() {
    let b = bed();
    let ok = b.put_token(POD_A, &[(TTL_HEADER, "300")]).await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(ok.headers, vec![(TTL_HEADER, "300".to_string())]);
    assert!(!ok.body.is_empty());
}

#[tokio::test]
async fn token_put_with_a_bad_or_missing_ttl_is_400() {
    let b = bed();
    for bad in ["0", "21601", "abc", ""] {
        let r = b.put_token(POD_A, &[(TTL_HEADER, bad)]).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "ttl {bad:?}");
    }
    assert_eq!(
        b.put_token(POD_A, &[]).await.status,
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn token_put_through_a_proxy_is_403() {
    let b = bed();
    let xff = b
        .put_token(
            POD_A,
            &[(TTL_HEADER, "300"), ("x-forwarded-for", "1.2.3.4")],
        )
        .await;
    assert_eq!(xff.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn tokens_are_bound_to_the_pod() {
    let b = bed();
    let token = b.token(POD_A, "300").await;
    let mine = b.get_with_token(POD_A, CREDS, &token).await;
    assert_eq!(
        (mine.status, text(&mine).as_str()),
        (StatusCode::OK, "reader")
    );
    // Pod b presents pod a's token: 401.
    assert_eq!(
        b.get_with_token(POD_B, CREDS, &token).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        b.get_with_token(POD_A, CREDS, "garbage").await.status,
        StatusCode::UNAUTHORIZED
    );
    let longer = format!("{token}x");
    assert_eq!(
        b.get_with_token(POD_A, CREDS, &longer).await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn tokens_expire_at_their_ttl() {
    let b = bed();
    let token = b.token(POD_A, "60").await;
    b.advance(Duration::from_secs(59));
    assert_eq!(
        b.get_with_token(POD_A, CREDS, &token).await.status,
        StatusCode::OK
    );
    b.advance(Duration::from_secs(1));
    assert_eq!(
        b.get_with_token(POD_A, CREDS, &token).await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn callers_that_are_not_a_pod_of_this_node_get_no_token_and_no_passthrough() {
    let b = bed();
    for ip in [STRANGER, HOST_NET] {
        let put = b.put_token(ip, &[(TTL_HEADER, "60")]).await;
        assert_eq!(put.status, StatusCode::FORBIDDEN, "{ip}");
        let region = b.get(ip, "/latest/meta-data/placement/region").await;
        assert_eq!(region.status, StatusCode::NOT_FOUND, "{ip}");
    }
}

#[tokio::test]
async fn tokenless_gets_are_served_unless_v2_is_required() {
    let optional = bed();
    assert_eq!(optional.get(POD_A, CREDS).await.status, StatusCode::OK);
    let required = bed_with(true);
    assert_eq!(
        required.get(POD_A, CREDS).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        required
            .get(POD_A, "/latest/meta-data/placement/region")
            .await
            .status,
        StatusCode::UNAUTHORIZED,
        "no passthrough without a token either"
    );
    let token = required.token(POD_A, "60").await;
    let r = required
        .get_with_token(POD_A, &format!("{CREDS}reader"), &token)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(json(&r)["Code"], "Success");
}

#[tokio::test]
async fn methods_other_than_get_head_put_are_405() {
    let b = bed();
    for m in [Method::POST, Method::DELETE, Method::PATCH] {
        let d = b.answer(m, CREDS, &[], POD_A).await;
        assert_eq!(
            d,
            Answer::Reply(Reply::status(StatusCode::METHOD_NOT_ALLOWED))
        );
    }
}

#[tokio::test]
async fn head_answers_without_fetching_credentials() {
    let b = bed();
    assert_eq!(
        b.reply(Method::HEAD, CREDS, &[], POD_A).await.status,
        StatusCode::OK
    );
    let head = b
        .reply(Method::HEAD, &format!("{CREDS}reader"), &[], POD_A)
        .await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
    assert_eq!(b.creds.asked.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn node_secrets_are_404_and_never_go_upstream() {
    let b = bed();
    for p in [
        "/latest/user-data",
        "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
        "/latest/meta-data/iam/security-credentials-extended/reader",
        "/latest/meta-data/local-ipv4",
        "/latest/dynamic/instance-identity/pkcs7",
        "/latest/dynamic/instance-identity/signature",
    ] {
        assert_eq!(b.get(POD_A, p).await.status, StatusCode::NOT_FOUND, "{p}");
    }
}

#[tokio::test]
async fn allow_listed_metadata_goes_upstream() {
    let b = bed();
    let d = b
        .answer(
            Method::GET,
            "/latest/meta-data/placement/region",
            &[],
            POD_A,
        )
        .await;
    assert_eq!(
        d,
        Answer::Upstream {
            path: UpstreamPath::region()
        }
    );
}

#[tokio::test]
async fn a_role_that_cannot_be_assumed_answers_like_ec2() {
    let b = bed();
    b.creds.answers.lock().unwrap().insert(
        ROLE_B.into(),
        Err(IdentityError::StsRejected {
            code: "AccessDenied".into(),
            message: "not authorized".into(),
        }),
    );
    let r = b.get(POD_B, &format!("{CREDS}writer")).await;
    assert_eq!(r.status, StatusCode::OK);
    let v = json(&r);
    assert_eq!(v["Code"], "AssumeRoleUnauthorizedAccess");
    assert_eq!(v["LastUpdated"], "2026-11-18T11:06:40Z");
    // A fixed message: nothing of the cause (which may quote the API server) reaches the pod.
    assert_eq!(v["Message"], super::ASSUME_ROLE_FAILED);
    assert!(!String::from_utf8_lossy(&r.body).contains("not authorized"));
    assert!(
        v.get("AccessKeyId").is_none()
            && v.get("Token").is_none()
            && v.get("SecretAccessKey").is_none()
    );
}

#[tokio::test]
async fn sts_down_is_503_and_a_pod_gone_meanwhile_is_404() {
    let b = bed();
    let unavailable = IdentityError::StsUnavailable {
        code: "Throttling".into(),
        message: "slow down".into(),
    };
    b.creds
        .answers
        .lock()
        .unwrap()
        .insert(ROLE_A.into(), Err(unavailable));
    let gone = IdentityError::PodGone {
        namespace: "apps".into(),
        name: "b".into(),
    };
    b.creds
        .answers
        .lock()
        .unwrap()
        .insert(ROLE_B.into(), Err(gone));
    let r = b.get(POD_A, &format!("{CREDS}reader")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        b.get(POD_B, &format!("{CREDS}writer")).await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn an_unreadable_service_account_is_500_not_a_guess() {
    let b = bed();
    let err = IdentityError::Kube {
        status: Some(500),
        message: "etcd".into(),
    };
    b.roles.0.lock().unwrap().insert("reader".into(), Err(err));
    assert_eq!(
        b.get(POD_A, CREDS).await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
}

#[tokio::test]
async fn decisions_carry_their_route_label() {
    let b = bed();
    let seams = Seams {
        callers: &b.callers,
        roles: &b.roles,
        credentials: &b.creds,
        clock: &b.clock,
    };
    let h = HeaderMap::new();
    let ip = POD_A.parse().unwrap();
    let head = |method, path| RequestHead {
        method,
        path,
        headers: &h,
    };
    let d = b
        .protocol
        .decide(head(&Method::POST, CREDS), ip, seams)
        .await;
    assert_eq!(d.route, "rejected");
    let d = b
        .protocol
        .decide(head(&Method::GET, CREDS), ip, seams)
        .await;
    assert_eq!(d.route, "role_list");
}

/// Captures what the protocol logs, as the agent's JSON lines.
#[derive(Clone, Default)]
struct LogBuf(Arc<Mutex<Vec<u8>>>);

thread_local! {
    /// Where this thread's log lines go, if a test captures them.
    static CAPTURE: std::cell::RefCell<Option<LogBuf>> = const { std::cell::RefCell::new(None) };
}

/// Writes to the capture of the thread the event happens on, else nowhere.
#[derive(Clone, Copy)]
struct ThreadCapture;

impl std::io::Write for ThreadCapture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        CAPTURE.with(|c| {
            if let Some(buf) = &*c.borrow() {
                buf.0.lock().unwrap().extend_from_slice(b);
            }
        });
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogBuf {
    /// Captures this thread's log lines, in the agent's JSON format, from now on. The subscriber
    /// is the process's global one (installed once), not a scoped one: tracing caches each
    /// callsite's interest process-wide, and a scoped subscriber set while other test threads
    /// register the same callsites can find a span disabled (seen: the `imds` span's fields
    /// missing under load). A global subscriber interested in everything has no such race.
    fn capture() -> LogBuf {
        static INSTALLED: std::sync::Once = std::sync::Once::new();
        INSTALLED.call_once(|| {
            use tracing_subscriber::Layer;
            use tracing_subscriber::layer::SubscriberExt;
            // Without the `imds` span (it is at debug, off at the production level): each line
            // must name the caller in its own fields.
            let layer = tracing_subscriber::fmt::layer()
                .with_writer(|| ThreadCapture)
                .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
                .event_format(crate::telemetry::json::JsonLine::new("node-1"))
                .with_filter(tracing_subscriber::filter::filter_fn(|m| {
                    *m.level() <= tracing::Level::DEBUG && !(m.is_span() && m.name() == "imds")
                }));
            let subscriber = tracing_subscriber::registry().with(layer);
            tracing::subscriber::set_global_default(subscriber)
                .expect("no other global subscriber in the agent's unit tests");
        });
        let buf = LogBuf::default();
        CAPTURE.with(|c| *c.borrow_mut() = Some(buf.clone()));
        buf
    }

    fn lines(&self) -> Vec<serde_json::Value> {
        String::from_utf8(self.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).expect("log line parses"))
            .collect()
    }
}

impl Bed {
    async fn refusal(&self, method: Method, path: &str, ip: &str) -> (StatusCode, Option<Refusal>) {
        let h = HeaderMap::new();
        let head = RequestHead {
            method: &method,
            path,
            headers: &h,
        };
        let seams = Seams {
            callers: &self.callers,
            roles: &self.roles,
            credentials: &self.creds,
            clock: &self.clock,
        };
        let d = self.protocol.decide(head, ip.parse().unwrap(), seams).await;
        match d.answer {
            Answer::Reply(r) => (r.status, d.refused),
            Answer::Upstream { .. } => (StatusCode::OK, d.refused),
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn every_refusal_has_its_reason_in_the_decision_and_the_log() {
    let buf = LogBuf::capture();

    let mut b = bed();
    const TERMINAL: &str = "10.0.0.45";
    const OUTSIDER: &str = "10.0.0.46";
    const BADNAME: &str = "10.0.0.47";
    b.callers
        .0
        .insert(TERMINAL.parse().unwrap(), Lookup::Terminal);
    b.callers.0.insert(
        OUTSIDER.parse().unwrap(),
        Lookup::Found(pod("uid-o", "outsider", "kube2iam", OUTSIDER)),
    );
    b.callers.0.insert(
        BADNAME.parse().unwrap(),
        Lookup::Found(pod("uid-x", "badname", "bad", BADNAME)),
    );
    b.roles.0.lock().unwrap().insert(
        "kube2iam".into(),
        Ok(RoleGrant::NotAllowed {
            role_arn: "arn:aws:iam::123456789012:role/admin".into(),
        }),
    );
    b.roles.0.lock().unwrap().insert(
        "bad".into(),
        Ok(RoleGrant::Invalid {
            reason: "a bare role name needs --base-role-arn".into(),
        }),
    );
    let creds_of = |name: &str| format!("{CREDS}{name}");
    let cases: [(&str, String, Refusal, Option<&str>); 7] = [
        (STRANGER, creds_of("reader"), Refusal::UnknownSource, None),
        (HOST_NET, CREDS.to_string(), Refusal::HostNetwork, None),
        (TERMINAL, creds_of("reader"), Refusal::Terminal, None),
        (NO_ROLE, CREDS.to_string(), Refusal::NoRole, Some("c")),
        (POD_A, creds_of("writer"), Refusal::WrongRoleName, Some("a")),
        (
            OUTSIDER,
            CREDS.to_string(),
            Refusal::RoleNotAllowed,
            Some("outsider"),
        ),
        (
            BADNAME,
            CREDS.to_string(),
            Refusal::InvalidRole,
            Some("badname"),
        ),
    ];
    for (ip, path, why, pod_name) in &cases {
        let (status, refused) = b.refusal(Method::GET, path, ip).await;
        assert_eq!(
            (status, refused),
            (StatusCode::NOT_FOUND, Some(*why)),
            "{ip} {path}"
        );
        let lines = buf.lines();
        let line = lines
            .iter()
            .rev()
            .find(|l| l["reason"] == why.metric_label())
            .unwrap_or_else(|| panic!("no log line with reason {why:?}: {lines:?}"));
        assert_eq!(line["source_ip"], *ip, "{line}");
        assert!(
            line["message"].as_str().unwrap().contains(why.describe()),
            "{line}"
        );
        let route = if path.ends_with('/') {
            "role_list"
        } else {
            "credentials"
        };
        assert_eq!(line["route"], route, "{line}");
        match pod_name {
            Some(name) => {
                assert_eq!(line["pod"], *name, "{line}");
                assert_eq!(line["namespace"], "apps", "{line}");
                assert!(line["service_account"].is_string(), "{line}");
            }
            None => assert!(line.get("pod").is_none(), "{line}"),
        }
        let level = if *why == Refusal::NoRole {
            "DEBUG"
        } else {
            "INFO"
        };
        assert_eq!(line["level"], level, "{line}");
    }
    let not_allowed = buf
        .lines()
        .into_iter()
        .find(|l| l["reason"] == "role_not_allowed")
        .unwrap();
    assert_eq!(
        not_allowed["detail"],
        "arn:aws:iam::123456789012:role/admin"
    );

    // A stranger's session token request is 403, with the same reason.
    let (status, refused) = b.refusal(Method::PUT, "/latest/api/token", STRANGER).await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "no TTL header: rejected before identity"
    );
    assert_eq!(refused, None);

    // Served requests carry no refusal.
    assert_eq!(
        b.refusal(Method::GET, CREDS, POD_A).await,
        (StatusCode::OK, None)
    );

    // A stranger retrying is logged once a minute, not per request.
    let before = buf.lines().len();
    for _ in 0..5 {
        b.refusal(Method::GET, CREDS, STRANGER).await;
    }
    assert_eq!(buf.lines().len(), before);
}

#[tokio::test]
async fn a_strangers_token_request_is_403_with_its_reason() {
    let b = bed();
    let mut h = HeaderMap::new();
    h.insert(TTL_HEADER, "60".parse().unwrap());
    let seams = Seams {
        callers: &b.callers,
        roles: &b.roles,
        credentials: &b.creds,
        clock: &b.clock,
    };
    let head = RequestHead {
        method: &Method::PUT,
        path: "/latest/api/token",
        headers: &h,
    };
    let d = b
        .protocol
        .decide(head, STRANGER.parse().unwrap(), seams)
        .await;
    assert_eq!(
        d.answer,
        Answer::Reply(Reply::status(StatusCode::FORBIDDEN))
    );
    assert_eq!(d.refused, Some(Refusal::UnknownSource));
    let head = RequestHead {
        method: &Method::PUT,
        path: "/latest/api/token",
        headers: &h,
    };
    let d = b.protocol.decide(head, POD_A.parse().unwrap(), seams).await;
    assert_eq!(d.refused, None);
}

#[test]
fn each_refusal_is_logged_in_its_own_words() {
    // The log line's message is the reason in words: one per refusal, none empty, so an operator
    // reading `refused: ...` can tell a stranger from a pod asking for another role.
    let mut seen = std::collections::HashSet::new();
    for why in Refusal::ALL {
        let words = why.describe();
        assert!(words.len() > 10, "{why:?}: {words:?}");
        assert!(seen.insert(words), "{why:?} shares its words: {words:?}");
    }
    assert_eq!(
        Refusal::UnknownSource.describe(),
        "caller not identified: no pod of this node has the source address"
    );
}

#[test]
fn the_protocols_debug_shows_the_policy_and_never_the_token_key() {
    let b = bed_with(true);
    let shown = format!("{:?}", b.protocol);
    assert!(shown.starts_with("Protocol {"), "{shown}");
    assert!(shown.contains("v2_required: true"), "{shown}");
    assert!(shown.contains("key: <redacted>"), "{shown}");
}

/// The bed's seams with answers at hand (each seam's `*_now`) as told, counting the lookups the
/// protocol reports.
struct AtHand<'a> {
    bed: &'a Bed,
    caller: bool,
    role: bool,
    creds: bool,
    served: HashMap<String, Arc<Served>>,
    counted: Mutex<Vec<&'static str>>,
}

impl<'a> AtHand<'a> {
    fn new(bed: &'a Bed, caller: bool, role: bool, creds_: bool) -> Self {
        let served = [(ROLE_A, "ASIAREADER"), (ROLE_B, "ASIAWRITER")]
            .into_iter()
            .map(|(arn, key)| (arn.to_string(), Arc::new(Served::new(creds(key)))))
            .collect();
        AtHand {
            bed,
            caller,
            role,
            creds: creds_,
            served,
            counted: Mutex::new(Vec::new()),
        }
    }

    fn seams(&self) -> Seams<'_> {
        Seams {
            callers: self,
            roles: self,
            credentials: self,
            clock: &self.bed.clock,
        }
    }
}

impl Callers for AtHand<'_> {
    fn identify_now(&self, ip: IpAddr) -> Option<Lookup> {
        self.caller.then(|| {
            self.bed
                .callers
                .0
                .get(&ip)
                .cloned()
                .unwrap_or(Lookup::Unknown)
        })
    }
    fn identify(&self, ip: IpAddr) -> BoxFuture<'_, Lookup> {
        self.bed.callers.identify(ip)
    }
    fn count_lookup(&self, result: &'static str) {
        self.counted.lock().unwrap().push(result);
    }
}

impl Roles for AtHand<'_> {
    fn role_now(&self, pod: &PodInfo) -> Option<RoleGrant> {
        let scripted = self
            .bed
            .roles
            .0
            .lock()
            .unwrap()
            .get(&pod.service_account)
            .cloned();
        self.role
            .then(|| scripted.map_or(RoleGrant::NoRole, |r| r.unwrap()))
    }
    fn role_of<'a>(&'a self, pod: &'a PodInfo) -> BoxFuture<'a, RoleAnswer> {
        self.bed.roles.role_of(pod)
    }
}

impl CredentialSource for AtHand<'_> {
    fn credentials_now(&self, _pod: &Arc<PodInfo>, role: &Arc<RoleSpec>) -> Option<Arc<Served>> {
        self.creds.then(|| self.served[&role.role_arn].clone())
    }
    fn credentials<'a>(
        &'a self,
        _pod: &'a Arc<PodInfo>,
        role: &'a Arc<RoleSpec>,
    ) -> BoxFuture<'a, Result<Arc<Served>, IdentityError>> {
        let s = self.served[&role.role_arn].clone();
        Box::pin(async move { Ok(s) })
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_decision_without_waiting_is_the_waiting_one_and_counts_its_lookup_once() {
    let b = bed();
    let h = HeaderMap::new();
    let get = |path| RequestHead {
        method: &Method::GET,
        path,
        headers: &h,
    };
    let creds_path = format!("{CREDS}reader");
    for (path, ip) in [
        (creds_path.as_str(), POD_A),
        (CREDS, POD_A),
        (creds_path.as_str(), STRANGER),
        (creds_path.as_str(), NO_ROLE),
        ("/latest/meta-data/instance-id", POD_A),
        ("/nope", POD_A),
    ] {
        let ip: IpAddr = ip.parse().unwrap();
        let now = AtHand::new(&b, true, true, true);
        let fast = b.protocol.decide_now(get(path), ip, now.seams());
        let waiting = AtHand::new(&b, false, false, false);
        let slow = b.protocol.decide(get(path), ip, waiting.seams()).await;
        assert_eq!(fast.as_ref(), Some(&slow), "{path} from {ip}");
        assert_eq!(
            *now.counted.lock().unwrap(),
            *waiting.counted.lock().unwrap()
        );
        let expected = usize::from(path != "/nope");
        assert_eq!(now.counted.lock().unwrap().len(), expected, "{path}");
    }

    // A seam without its answer at hand: no decision and nothing counted; the waiting one
    // counts the lookup once.
    let ip: IpAddr = POD_A.parse().unwrap();
    for (caller, role, creds_) in [
        (false, true, true),
        (true, false, true),
        (true, true, false),
    ] {
        let seams = AtHand::new(&b, caller, role, creds_);
        assert_eq!(
            b.protocol.decide_now(get(&creds_path), ip, seams.seams()),
            None
        );
        assert!(seams.counted.lock().unwrap().is_empty());
        let d = b.protocol.decide(get(&creds_path), ip, seams.seams()).await;
        assert!(matches!(d.answer, Answer::Reply(ref r) if r.status == StatusCode::OK));
        assert_eq!(*seams.counted.lock().unwrap(), ["found"]);
    }
}
