//! Every IMDS decision in one place, in the order EC2 makes them: the request head, the caller's
//! address, three seams (who is calling, which role, which credentials) and the clock in; the
//! reply out. No sockets here: the HTTP plumbing lives in the server, the seams' real
//! implementations in `pods` and `identity`, so each rule of DESIGN §3 is unit-tested with fakes.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{HeaderMap, Method, StatusCode};
use tracing::field::Empty;

use super::{
    Policy, Reply, Route, TTL_HEADER, TokenAuthority, UpstreamPath, route, session_token, wire,
};
use crate::identity::{Clock, IdentityError, RoleGrant, RoleSpec, Served};
use crate::pods::{Lookup, PodInfo};

// Each seam has a synchronous `*_now` answer for what is at hand (the hot path: a cached GET
// then costs no boxed future and no wait) and the full asynchronous one; the protocol asks the
// first and falls back to the second, so both must agree.

/// Who is calling: the pod at a source address. May wait, bounded, for a pod not known yet.
pub trait Callers: Send + Sync {
    /// A decisive answer when one is at hand without waiting.
    fn identify_now(&self, _ip: IpAddr) -> Option<Lookup> {
        None
    }
    fn identify(&self, ip: IpAddr) -> BoxFuture<'_, Lookup>;
    /// Hears the lookup a decision was made on, once per decided request (a metric). Neither
    /// `identify` answers it: a decision tried without waiting and then made by waiting must
    /// count its lookup once.
    fn count_lookup(&self, _result: &'static str) {}
}

/// Which role a pod is granted (its ServiceAccount's, else in kube2iam mode its annotation's,
/// else the default role), or why none.
pub trait Roles: Send + Sync {
    /// The answer when it is at hand without reading the API.
    fn role_now(&self, _pod: &PodInfo) -> Option<RoleGrant> {
        None
    }
    fn role_of<'a>(&'a self, pod: &'a PodInfo) -> BoxFuture<'a, Result<RoleGrant, IdentityError>>;
}

/// Which credentials a pod is served for its role.
pub trait CredentialSource: Send + Sync {
    /// A servable set when one is cached, without fetching or waiting.
    fn credentials_now(&self, _pod: &Arc<PodInfo>, _role: &Arc<RoleSpec>) -> Option<Arc<Served>> {
        None
    }
    fn credentials<'a>(
        &'a self,
        pod: &'a Arc<PodInfo>,
        role: &'a Arc<RoleSpec>,
    ) -> BoxFuture<'a, Result<Arc<Served>, IdentityError>>;
}

/// What the protocol reads of a request: no body (metadata requests have none).
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub headers: &'a HeaderMap,
}

/// The seams a decision consults, borrowed for one request.
#[derive(Clone, Copy)]
pub struct Seams<'a> {
    pub callers: &'a dyn Callers,
    pub roles: &'a dyn Roles,
    pub credentials: &'a dyn CredentialSource,
    pub clock: &'a dyn Clock,
}

/// What to send back: a finished reply, or the allow-listed upstream document at `path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Reply(Reply),
    Upstream { path: UpstreamPath },
}

/// A decision and the route it was made on (a metric label).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub route: &'static str,
    pub answer: Answer,
    /// Why the caller was told 404 (or, for a session token, 403) when it was refused for who
    /// it is or what it may have, rather than for the path it asked: logged, and counted.
    pub refused: Option<Refusal>,
}

/// Why a caller gets no credentials: a fixed set, so each is a metric label and a log reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Refusal {
    /// No pod of this node holds the source address (or not yet, after the bounded wait).
    UnknownSource,
    /// Two live pods claim the source address: refused rather than guessed.
    Ambiguous,
    /// The source address is the node's own (hostNetwork pods share it).
    HostNetwork,
    /// The pod at the address has ended (or went away while it was answered).
    Terminal,
    /// Nothing names a role for the pod, and there is no default role.
    NoRole,
    /// kube2iam mode: the pod's annotation names a role its namespace does not allow.
    RoleNotAllowed,
    /// kube2iam mode: the pod's annotation cannot be made into a role ARN.
    InvalidRole,
    /// The pod asked for credentials of a role name that is not its role's.
    WrongRoleName,
}

impl Refusal {
    pub const ALL: [Refusal; 8] = [
        Refusal::UnknownSource,
        Refusal::Ambiguous,
        Refusal::HostNetwork,
        Refusal::Terminal,
        Refusal::NoRole,
        Refusal::RoleNotAllowed,
        Refusal::InvalidRole,
        Refusal::WrongRoleName,
    ];

    pub(crate) fn metric_label(self) -> &'static str {
        match self {
            Refusal::UnknownSource => "unknown_source",
            Refusal::Ambiguous => "ambiguous",
            Refusal::HostNetwork => "host_network",
            Refusal::Terminal => "terminal",
            Refusal::NoRole => "no_role",
            Refusal::RoleNotAllowed => "role_not_allowed",
            Refusal::InvalidRole => "invalid_role",
            Refusal::WrongRoleName => "wrong_role_name",
        }
    }

    /// The reason in words, for the log line.
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Refusal::UnknownSource => {
                "caller not identified: no pod of this node has the source address"
            }
            Refusal::Ambiguous => "two live pods claim the source address",
            Refusal::HostNetwork => "the source address is the node's (hostNetwork)",
            Refusal::Terminal => "the pod at the source address has ended",
            Refusal::NoRole => {
                "no role: the service account names none and there is no default role"
            }
            Refusal::RoleNotAllowed => {
                "the pod's role is not in its namespace's iam.amazonaws.com/allowed-roles"
            }
            Refusal::InvalidRole => "the pod's iam.amazonaws.com/role is not a valid role",
            Refusal::WrongRoleName => {
                "credentials asked for a role name that is not the pod's role"
            }
        }
    }

    /// The refusal for a caller that is not exactly one live pod.
    fn of_lookup(lookup: &Lookup) -> Option<Refusal> {
        match lookup {
            Lookup::Found(_) => None,
            Lookup::Unknown | Lookup::Pending => Some(Refusal::UnknownSource),
            Lookup::Ambiguous => Some(Refusal::Ambiguous),
            Lookup::HostNetwork => Some(Refusal::HostNetwork),
            Lookup::Terminal => Some(Refusal::Terminal),
        }
    }
}

/// What a pod is told when its role cannot be assumed. Fixed: the cause (which may name the
/// agent's own ServiceAccount or quote the API server) goes to the logs and the pod's Events.
pub(crate) const ASSUME_ROLE_FAILED: &str =
    "The role could not be assumed for this pod; see the pod's events for the cause.";

/// One refusal line per source address and reason per this long (except the routine "no role",
/// at debug): neither a stranger nor a pod in a retry loop can grow the log per request.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);
const REFUSAL_LOG_KEYS: u64 = 10_000;

/// The protocol's state: the session-token key, the operator's choices, and the callers whose
/// refusal was logged (so logs grow with credential sets and callers, not with requests; which
/// pods a credential set was audited for is kept on the set, [`Served::first_serve_to`]).
pub struct Protocol {
    tokens: TokenAuthority,
    policy: Policy,
    /// Source addresses and reasons whose refusal was logged recently.
    refused_logged: moka::sync::Cache<(IpAddr, Refusal), ()>,
}

impl std::fmt::Debug for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Protocol")
            .field("tokens", &self.tokens)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl Protocol {
    pub(crate) fn new(tokens: TokenAuthority, policy: Policy) -> Self {
        Protocol {
            tokens,
            policy,
            refused_logged: moka::sync::Cache::builder()
                .max_capacity(REFUSAL_LOG_KEYS)
                .time_to_live(REFUSAL_LOG_EVERY)
                .build(),
        }
    }

    /// Answers one request from `ip`. Each line logged here names the caller (source, and pod
    /// once known) in its own fields; the span carrying them too exists at `debug` only, so a
    /// request costs no span at the production level (a span per request cost more than the
    /// rest of a cached GET).
    pub(crate) async fn decide(
        &self,
        head: RequestHead<'_>,
        ip: IpAddr,
        seams: Seams<'_>,
    ) -> Decision {
        use tracing::Instrument;
        match self
            .decide_in(head, ip, seams, Wait::Yes)
            .instrument(request_span(ip))
            .await
        {
            Some(d) => d,
            // `Wait::Yes` always decides.
            None => Decision {
                route: "rejected",
                answer: Answer::Reply(Reply::status(StatusCode::INTERNAL_SERVER_ERROR)),
                refused: None,
            },
        }
    }

    /// The decision when every seam it needs has its answer at hand (a cached GET), made
    /// without a future or a wait; `None` when one would have to wait, and then nothing was
    /// counted or logged, so [`decide`](Self::decide) makes it in full. The same rules as
    /// `decide`: both run the one `serve`.
    pub(crate) fn decide_now(
        &self,
        head: RequestHead<'_>,
        ip: IpAddr,
        seams: Seams<'_>,
    ) -> Option<Decision> {
        // Without waiting, `decide_in` never awaits anything pending: its first poll decides
        // (polled where it was made, not moved into a combinator).
        let decide = || {
            let decided = std::pin::pin!(self.decide_in(head, ip, seams, Wait::No));
            match decided.poll(&mut std::task::Context::from_waker(std::task::Waker::noop())) {
                std::task::Poll::Ready(d) => d,
                std::task::Poll::Pending => None,
            }
        };
        if tracing::enabled!(tracing::Level::DEBUG) {
            request_span(ip).in_scope(decide)
        } else {
            decide()
        }
    }

    async fn decide_in(
        &self,
        head: RequestHead<'_>,
        ip: IpAddr,
        seams: Seams<'_>,
        wait: Wait,
    ) -> Option<Decision> {
        match route(head.method, head.path, head.headers, &self.policy) {
            Err(reply) => Some(Decision {
                route: "rejected",
                answer: Answer::Reply(reply),
                refused: None,
            }),
            Ok(route) => {
                let label = route.metric_label();
                if tracing::enabled!(tracing::Level::DEBUG) {
                    tracing::Span::current().record("route", label);
                }
                let mut lookup = "";
                let outcome = self
                    .serve(route, head, ip, seams, wait, &mut lookup)
                    .await?;
                seams.callers.count_lookup(lookup);
                let (answer, refused) = match outcome {
                    Outcome::Answer(a) => (a, None),
                    Outcome::Refused(why, detail, pod) => {
                        let who = Caller {
                            ip,
                            route: label,
                            pod: pod.as_deref(),
                        };
                        self.log_refusal(who, why, detail.as_deref());
                        (Answer::Reply(Reply::not_found()), Some(why))
                    }
                    Outcome::TokenRefused(why) => {
                        let who = Caller {
                            ip,
                            route: label,
                            pod: None,
                        };
                        self.log_refusal(who, why, None);
                        (
                            Answer::Reply(Reply::status(StatusCode::FORBIDDEN)),
                            Some(why),
                        )
                    }
                };
                Some(Decision {
                    route: label,
                    answer,
                    refused,
                })
            }
        }
    }

    /// Logs a refusal with its reason, naming the caller (source, route, and pod when it is known)
    /// in the line's own fields. The routine "no role" goes at debug; the rest at info, once a
    /// minute per source address and reason.
    fn log_refusal(&self, who: Caller<'_>, why: Refusal, detail: Option<&str>) {
        let ip = who.ip;
        let (pod, namespace, service_account) = match who.pod {
            Some(p) => (
                Some(p.name.as_str()),
                Some(p.namespace.as_str()),
                Some(p.service_account.as_str()),
            ),
            None => (None, None, None),
        };
        if why == Refusal::NoRole {
            tracing::debug!(
                source_ip = %ip, route = who.route, pod, namespace, service_account,
                reason = why.metric_label(),
                "not found: {}",
                why.describe()
            );
            return;
        }
        if self.refused_logged.contains_key(&(ip, why)) {
            return;
        }
        self.refused_logged.insert((ip, why), ());
        tracing::info!(
            source_ip = %ip, route = who.route, pod, namespace, service_account,
            reason = why.metric_label(),
            detail,
            "refused: {} (logged once a minute per source and reason)",
            why.describe()
        );
    }

    /// The answer to a routed request; `None` when a seam would have to wait and `wait` says
    /// not to. `looked_up` is set to the caller's lookup once it is known.
    async fn serve(
        &self,
        route: Route<'_>,
        head: RequestHead<'_>,
        ip: IpAddr,
        s: Seams<'_>,
        wait: Wait,
        looked_up: &mut &'static str,
    ) -> Option<Outcome> {
        // A caller that is not exactly one pod of this node gets nothing: no session token, no
        // passthrough, no credentials.
        let lookup = match s.callers.identify_now(ip) {
            Some(l) => l,
            None if wait == Wait::Yes => s.callers.identify(ip).await,
            None => return None,
        };
        *looked_up = lookup.metric_label();
        let pod = match (lookup, &route) {
            (Lookup::Found(pod), _) => pod,
            (other, Route::IssueToken { .. }) => {
                return Some(Outcome::TokenRefused(
                    Refusal::of_lookup(&other).unwrap_or(Refusal::UnknownSource),
                ));
            }
            (other, _) => {
                return Some(Outcome::Refused(
                    Refusal::of_lookup(&other).unwrap_or(Refusal::UnknownSource),
                    None,
                    None,
                ));
            }
        };
        if tracing::enabled!(tracing::Level::DEBUG) {
            let span = tracing::Span::current();
            span.record("pod", pod.name.as_str());
            span.record("namespace", pod.namespace.as_str());
            span.record("service_account", pod.service_account.as_str());
        }
        // Read where a time is needed (a session token, a body with a time), after the
        // (bounded) wait for the caller: a v1 credentials GET reads no clock here.
        let now = || s.clock.now();
        if let Route::IssueToken { ttl } = route {
            return Some(Outcome::Answer(Answer::Reply(
                match self.tokens.issue(&pod.uid, ttl, now()) {
                    Ok(t) => {
                        let mut r = Reply::ok(t);
                        r.headers.push((TTL_HEADER, ttl.to_string()));
                        r
                    }
                    Err(e) => {
                        tracing::error!(
                            source_ip = %ip, pod = %pod.name, namespace = %pod.namespace,
                            service_account = %pod.service_account, error = %e,
                            "cannot issue session token"
                        );
                        Reply::status(StatusCode::INTERNAL_SERVER_ERROR)
                    }
                },
            )));
        }
        match session_token(head.headers) {
            Some(t) if self.tokens.verify(t, &pod.uid, now()).is_err() => {
                return Some(Outcome::reply(Reply::status(StatusCode::UNAUTHORIZED)));
            }
            Some(_) => {}
            None if self.policy.v2_required => {
                return Some(Outcome::reply(Reply::status(StatusCode::UNAUTHORIZED)));
            }
            None => {}
        }
        if let Route::Upstream { path } = route {
            return Some(Outcome::Answer(Answer::Upstream { path }));
        }
        let grant = match s.roles.role_now(&pod) {
            Some(g) => Ok(g),
            None if wait == Wait::Yes => s.roles.role_of(&pod).await,
            None => return None,
        };
        let role = match grant {
            Ok(RoleGrant::Role(role)) => role,
            Ok(RoleGrant::NoRole) => {
                return Some(Outcome::Refused(Refusal::NoRole, None, Some(pod)));
            }
            Ok(RoleGrant::NotAllowed { role_arn }) => {
                return Some(Outcome::Refused(
                    Refusal::RoleNotAllowed,
                    Some(role_arn),
                    Some(pod),
                ));
            }
            Ok(RoleGrant::Invalid { reason }) => {
                return Some(Outcome::Refused(
                    Refusal::InvalidRole,
                    Some(reason),
                    Some(pod),
                ));
            }
            Err(e) => {
                tracing::warn!(
                    source_ip = %ip, pod = %pod.name, namespace = %pod.namespace,
                    service_account = %pod.service_account, error = %e,
                    "cannot read what names the pod's role"
                );
                return Some(Outcome::reply(Reply::status(
                    StatusCode::INTERNAL_SERVER_ERROR,
                )));
            }
        };
        Some(match route {
            Route::IamIndex => Outcome::reply(Reply::ok("info\nsecurity-credentials/")),
            Route::RoleList => Outcome::reply(Reply::ok(role.role_name().to_string())),
            Route::Info => Outcome::reply(Reply::ok(wire::info(&role.role_arn, now()))),
            Route::Credentials { name } if name == role.role_name() => {
                if *head.method == Method::HEAD {
                    return Some(Outcome::reply(Reply::ok(Bytes::new())));
                }
                let got = match s.credentials.credentials_now(&pod, &role) {
                    Some(served) => Ok(served),
                    None if wait == Wait::Yes => s.credentials.credentials(&pod, &role).await,
                    None => return None,
                };
                if let Ok(served) = &got
                    && served.first_serve_to(&pod.uid)
                {
                    let c = &served.creds;
                    tracing::info!(
                        target: "audit",
                        source_ip = %ip, route = "credentials", pod = %pod.name,
                        namespace = %pod.namespace, service_account = %pod.service_account,
                        role = %role.role_arn, role_source = role.source.label(),
                        access_key_id = %c.access_key_id,
                        expiration = %wire::timestamp(c.expiration), "credentials vended"
                    );
                }
                credentials_reply(got, s.clock, pod)
            }
            Route::Credentials { name } => Outcome::Refused(
                Refusal::WrongRoleName,
                Some(format!(
                    "asked for {name:?}, the pod's role is {:?}",
                    role.role_name()
                )),
                Some(pod),
            ),
            Route::IssueToken { .. } | Route::Upstream { .. } => Outcome::reply(Reply::not_found()),
        })
    }
}

/// The span a request's lines are logged in, at `debug` only: at the production level a request
/// costs no span (a span per request cost more than the rest of a cached GET). Each line logged
/// names the caller (source, and pod once known) in its own fields too.
fn request_span(ip: IpAddr) -> tracing::Span {
    tracing::debug_span!(
        "imds",
        source_ip = %ip,
        route = Empty,
        pod = Empty,
        namespace = Empty,
        service_account = Empty
    )
}

/// Whether a decision may wait for a seam that has no answer at hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    Yes,
    /// Give up instead (`None`), before anything was counted or logged.
    No,
}

/// What `serve` decided: an answer, or a refusal (404; 403 for a session token) with its reason,
/// its detail and the pod when the caller was identified.
enum Outcome {
    Answer(Answer),
    Refused(Refusal, Option<String>, Option<Arc<PodInfo>>),
    TokenRefused(Refusal),
}

/// Who a refusal line names: the source, the route asked, the pod when it is known.
#[derive(Clone, Copy)]
struct Caller<'a> {
    ip: IpAddr,
    route: &'static str,
    pod: Option<&'a PodInfo>,
}

impl Outcome {
    fn reply(r: Reply) -> Outcome {
        Outcome::Answer(Answer::Reply(r))
    }
}

/// The credentials reply; the audit line (once per credential set and pod) is written by the
/// caller, and every serve is counted in `irsa_imds_requests_total{route="credentials"}`.
fn credentials_reply(
    got: Result<Arc<Served>, IdentityError>,
    clock: &dyn Clock,
    pod: Arc<PodInfo>,
) -> Outcome {
    Outcome::reply(match got {
        // Rendered once per credential set, then shared by every request it answers.
        Ok(served) => Reply::ok(served.body(|c| {
            Bytes::from(wire::credentials(
                &c.access_key_id,
                c.secret_access_key.expose(),
                c.session_token.expose(),
                c.expiration,
                c.issued_at,
            ))
        })),
        // The pod went away while we asked: it has no credentials any more.
        Err(IdentityError::PodGone { .. }) => {
            return Outcome::Refused(Refusal::Terminal, None, Some(pod));
        }
        // What EC2 answers for a role it cannot assume: SDKs report it instead of retrying.
        Err(e) if !e.retryable() => {
            tracing::debug!(error = %e, "role cannot be assumed");
            Reply::ok(wire::assume_role_failure(ASSUME_ROLE_FAILED, clock.now()))
        }
        Err(_) => Reply::status(StatusCode::SERVICE_UNAVAILABLE),
    })
}

#[cfg(test)]
#[path = "respond_tests.rs"]
mod tests;
