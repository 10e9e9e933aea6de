//! Every IMDS decision in one place, in the order EC2 makes them: the request head, the caller's
//! address, three seams (who is calling, which role, which credentials) and the clock in; the
//! reply out. No sockets here: the HTTP plumbing lives in the server, the seams' real
//! implementations in `pods` and `identity`, so each rule of DESIGN §3 is unit-tested with fakes.

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{HeaderMap, Method, StatusCode};
use tracing::field::Empty;

use super::{
    Policy, Reply, Route, TTL_HEADER, TokenAuthority, UpstreamPath, route, session_token, wire,
};
use crate::identity::{Clock, Credentials, IdentityError, RoleSpec};
use crate::pods::{Lookup, PodInfo};

/// Who is calling: the pod at a source address. May wait, bounded, for a pod not known yet.
pub trait Callers: Send + Sync {
    fn identify(&self, ip: IpAddr) -> BoxFuture<'_, Lookup>;
}

/// Which role a pod's ServiceAccount grants; `None` when it names none.
pub trait Roles: Send + Sync {
    fn role_of<'a>(
        &'a self,
        pod: &'a PodInfo,
    ) -> BoxFuture<'a, Result<Option<Arc<RoleSpec>>, IdentityError>>;
}

/// Which credentials a pod is served for its role.
pub trait CredentialSource: Send + Sync {
    fn credentials<'a>(
        &'a self,
        pod: &'a Arc<PodInfo>,
        role: &'a Arc<RoleSpec>,
    ) -> BoxFuture<'a, Result<Credentials, IdentityError>>;
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
}

/// The protocol's state: the session-token key and the operator's choices.
#[derive(Debug)]
pub struct Protocol {
    tokens: TokenAuthority,
    policy: Policy,
}

impl Protocol {
    pub fn new(tokens: TokenAuthority, policy: Policy) -> Self {
        Protocol { tokens, policy }
    }

    /// Answers one request from `ip`. The span carries the caller's pod once it is known, so
    /// every line logged while answering names it.
    #[tracing::instrument(
        name = "imds",
        skip_all,
        fields(source_ip = %ip, route = Empty, pod = Empty, namespace = Empty, service_account = Empty)
    )]
    pub async fn decide(&self, head: RequestHead<'_>, ip: IpAddr, seams: Seams<'_>) -> Decision {
        match route(head.method, head.path, head.headers, &self.policy) {
            Err(reply) => Decision {
                route: "rejected",
                answer: Answer::Reply(reply),
            },
            Ok(route) => {
                let label = route.metric_label();
                tracing::Span::current().record("route", label);
                Decision {
                    route: label,
                    answer: self.serve(route, head, ip, seams).await,
                }
            }
        }
    }

    async fn serve(&self, route: Route, head: RequestHead<'_>, ip: IpAddr, s: Seams<'_>) -> Answer {
        // A caller that is not exactly one pod of this node gets nothing: no session token, no
        // passthrough, no credentials.
        let pod = match s.callers.identify(ip).await {
            Lookup::Found(pod) => pod,
            other => {
                tracing::info!(
                    result = other.metric_label(),
                    "caller not identified; refused"
                );
                return Answer::Reply(match route {
                    Route::IssueToken { .. } => Reply::status(StatusCode::FORBIDDEN),
                    _ => Reply::not_found(),
                });
            }
        };
        let span = tracing::Span::current();
        span.record("pod", pod.name.as_str());
        span.record("namespace", pod.namespace.as_str());
        span.record("service_account", pod.service_account.as_str());
        // Read after the (bounded) wait for the caller, so a token's expiry is checked now.
        let now = s.clock.now();
        if let Route::IssueToken { ttl } = route {
            return Answer::Reply(match self.tokens.issue(&pod.uid, ttl, now) {
                Ok(t) => {
                    let mut r = Reply::ok(t);
                    r.headers.push((TTL_HEADER, ttl.to_string()));
                    r
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot issue session token");
                    Reply::status(StatusCode::INTERNAL_SERVER_ERROR)
                }
            });
        }
        match session_token(head.headers) {
            Some(t) if self.tokens.verify(t, &pod.uid, now).is_err() => {
                return Answer::Reply(Reply::status(StatusCode::UNAUTHORIZED));
            }
            Some(_) => {}
            None if self.policy.v2_required => {
                return Answer::Reply(Reply::status(StatusCode::UNAUTHORIZED));
            }
            None => {}
        }
        if let Route::Upstream { path } = route {
            return Answer::Upstream { path };
        }
        let role = match s.roles.role_of(&pod).await {
            Ok(Some(role)) => role,
            Ok(None) => return Answer::Reply(Reply::not_found()),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read service account");
                return Answer::Reply(Reply::status(StatusCode::INTERNAL_SERVER_ERROR));
            }
        };
        Answer::Reply(match route {
            Route::IamIndex => Reply::ok("info\nsecurity-credentials/"),
            Route::RoleList => Reply::ok(role.role_name().to_string()),
            Route::Info => Reply::ok(wire::info(&role.role_arn, now)),
            Route::Credentials { name } if name == role.role_name() => {
                if *head.method == Method::HEAD {
                    return Answer::Reply(Reply::ok(Bytes::new()));
                }
                credentials_reply(s.credentials.credentials(&pod, &role).await, &role, ip, now)
            }
            _ => Reply::not_found(),
        })
    }
}

fn credentials_reply(
    got: Result<Credentials, IdentityError>,
    role: &RoleSpec,
    ip: IpAddr,
    now: std::time::SystemTime,
) -> Reply {
    match got {
        Ok(c) => {
            tracing::info!(
                target: "audit",
                role = %role.role_arn, source_ip = %ip, access_key_id = %c.access_key_id,
                expiration = %wire::timestamp(c.expiration), "credentials vended"
            );
            Reply::ok(wire::credentials(
                &c.access_key_id,
                c.secret_access_key.expose(),
                c.session_token.expose(),
                c.expiration,
                c.issued_at,
            ))
        }
        // The pod went away while we asked: it has no credentials any more.
        Err(IdentityError::PodGone { .. }) => Reply::not_found(),
        // What EC2 answers for a role it cannot assume: SDKs report it instead of retrying.
        Err(e) if !e.retryable() => Reply::ok(wire::assume_role_failure(&e.to_string(), now)),
        Err(_) => Reply::status(StatusCode::SERVICE_UNAVAILABLE),
    }
}

#[cfg(test)]
#[path = "respond_tests.rs"]
mod tests;
