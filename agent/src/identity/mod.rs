//! From a pod to its credentials: the role its ServiceAccount names, a ServiceAccount token bound
//! to the pod, STS `AssumeRoleWithWebIdentity`, and the cache in front of it all.
//!
//! The seams ([`ServiceAccounts`], [`TokenMinter`], [`RoleExchange`], [`Clock`]) are traits so unit
//! tests use fakes and the end-to-end tests use the real API server and STS.

pub mod apiserver;
pub mod cache;
pub mod freshness;
pub mod kube2iam;
pub mod roles;
pub mod sts;

use std::collections::BTreeMap;
use std::fmt;
use std::time::SystemTime;

use futures::future::BoxFuture;

use crate::pods::PodInfo;

pub use cache::{CacheSettings, CredentialCache, Served, SessionScope};
pub use roles::{RoleGrant, RoleResolver, RoleSource, RoleSpec};

/// A string that never shows itself in `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Temporary credentials for one pod's role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: Secret,
    pub session_token: Secret,
    pub expiration: SystemTime,
    /// When STS issued them (the `LastUpdated` SDKs see).
    pub issued_at: SystemTime,
}

/// What `AssumeRoleWithWebIdentity` needs.
#[derive(Debug, Clone)]
pub struct AssumeRequest {
    pub role_arn: String,
    pub session_name: String,
    pub web_identity_token: Secret,
    pub duration_secs: i32,
    /// `eks.amazonaws.com/sts-regional-endpoints: "false"` asks for the global endpoint.
    pub regional: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    #[error("kubernetes api: {message}")]
    Kube {
        status: Option<u16>,
        message: String,
    },
    #[error("sts refused: {code}: {message}")]
    StsRejected { code: String, message: String },
    #[error("sts unavailable: {code}: {message}")]
    StsUnavailable { code: String, message: String },
    #[error("invalid role annotation on serviceaccount {namespace}/{name}: {reason}")]
    InvalidRole {
        namespace: String,
        name: String,
        reason: String,
    },
    #[error("pod {namespace}/{name} is gone")]
    PodGone { namespace: String, name: String },
}

impl IdentityError {
    /// Throttling, IdP trouble, 5xx and timeouts are retried; refusals are reported, not hammered.
    pub(crate) fn retryable(&self) -> bool {
        match self {
            IdentityError::Kube { status, .. } => match status {
                None => true,
                Some(s) => *s == 429 || *s >= 500,
            },
            IdentityError::StsUnavailable { .. } => true,
            IdentityError::StsRejected { .. }
            | IdentityError::InvalidRole { .. }
            | IdentityError::PodGone { .. } => false,
        }
    }

    pub(crate) fn metric_label(&self) -> &'static str {
        match self {
            IdentityError::Kube { .. } => "kube",
            IdentityError::StsRejected { .. } => "sts_rejected",
            IdentityError::StsUnavailable { .. } => "sts_unavailable",
            IdentityError::InvalidRole { .. } => "invalid_role",
            IdentityError::PodGone { .. } => "pod_gone",
        }
    }
}

/// The STS result of one `AssumeRoleWithWebIdentity` attempt as the fixed code set of
/// `irsa_imds_sts_results_total{code}` (telemetry's `STS_CODES`): STS's own code where it says
/// what to fix, a class otherwise. Never the message, never an unbounded string.
pub(crate) fn sts_code_label<T>(r: &Result<T, IdentityError>) -> &'static str {
    let (code, refused) = match r {
        Ok(_) => return "ok",
        Err(IdentityError::StsRejected { code, .. }) => (code.as_str(), true),
        Err(IdentityError::StsUnavailable { code, .. }) => (code.as_str(), false),
        Err(_) => return "other",
    };
    match code {
        "Throttling" | "ThrottlingException" | "RequestLimitExceeded" => "Throttling",
        "AccessDenied" | "AccessDeniedException" | "AssumeRoleUnauthorizedAccess" => "AccessDenied",
        "InvalidIdentityToken" => "InvalidIdentityToken",
        "ExpiredToken" | "ExpiredTokenException" => "ExpiredToken",
        "IDPCommunicationError" => "IDPCommunicationError",
        // The classes `sts::classify` gives what carries no STS code.
        "Timeout" => "timeout",
        "Dispatch" => "network",
        "Response" | "NoCredentials" | "BadExpiration" => "other",
        // Unavailable with any other code: STS's internal errors, or an HTTP status >= 500.
        _ if !refused => "5xx",
        _ => "other",
    }
}

/// `success`, or the error's metric label: the outcome of one call, for counting.
pub(crate) fn outcome_label<T>(r: &Result<T, IdentityError>) -> &'static str {
    match r {
        Ok(_) => "success",
        Err(e) => e.metric_label(),
    }
}

/// Reads a ServiceAccount's annotations (`None` when it does not exist).
pub trait ServiceAccounts: Send + Sync {
    fn annotations<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<BTreeMap<String, String>>, IdentityError>>;
}

/// Mints a ServiceAccount token bound to the pod (TokenRequest API).
pub trait TokenMinter: Send + Sync {
    fn mint<'a>(
        &'a self,
        pod: &'a PodInfo,
        audience: &'a str,
        expiration_secs: i64,
    ) -> BoxFuture<'a, Result<Secret, IdentityError>>;
}

/// Exchanges a web identity token for role credentials (STS).
pub trait RoleExchange: Send + Sync {
    fn assume<'a>(
        &'a self,
        req: &'a AssumeRequest,
    ) -> BoxFuture<'a, Result<Credentials, IdentityError>>;
}

/// Wall-clock time, injectable so expiry is tested without waiting.
pub trait Clock: Send + Sync {
    fn now(&self) -> SystemTime;
}

#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// `RoleSessionName` for CloudTrail: `<namespace>.<pod>`, within STS's `[\w+=,.@-]{2,64}`;
/// longer names keep their start and end in a hash so two pods never share one.
pub(crate) fn session_name(namespace: &str, pod: &str) -> String {
    let raw: String = format!("{namespace}.{pod}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_+=,.@-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    if raw.len() <= 64 {
        return if raw.len() < 2 {
            format!("{raw}--")
        } else {
            raw
        };
    }
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, raw.as_bytes());
    let hash: String = digest
        .as_ref()
        .iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{}-{hash}", &raw[..55])
}

/// Checks `arn:<partition>:iam::<12 digits>:role/<path/>name`.
pub(crate) fn validate_role_arn(arn: &str) -> Result<(), String> {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    let [scheme, partition, service, region, account, resource] = parts.as_slice() else {
        return Err("not an ARN".into());
    };
    if *scheme != "arn" || !partition.starts_with("aws") || *service != "iam" || !region.is_empty()
    {
        return Err("not an IAM ARN".into());
    }
    if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
        return Err("account must be 12 digits".into());
    }
    let Some(path) = resource.strip_prefix("role/") else {
        return Err("not a role ARN".into());
    };
    let name = path.rsplit('/').next().unwrap_or("");
    if name.is_empty()
        || name.len() > 64
        || arn.len() > 2048
        || !path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-/".contains(&b))
    {
        return Err("invalid role name".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_name_names_the_pod() {
        assert_eq!(session_name("team-a", "api-7d9f"), "team-a.api-7d9f");
    }

    #[test]
    fn long_session_names_are_shortened_with_a_hash() {
        let long = "p".repeat(120);
        let a = session_name("ns", &long);
        let b = session_name("ns", &format!("{long}x"));
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert!(a.starts_with("ns.ppp"));
        assert!(
            a.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c))
        );
    }

    #[test]
    fn sts_codes_map_to_a_fixed_set() {
        let rejected = |c: &str| -> Result<(), IdentityError> {
            Err(IdentityError::StsRejected {
                code: c.into(),
                message: "m".into(),
            })
        };
        let unavailable = |c: &str| -> Result<(), IdentityError> {
            Err(IdentityError::StsUnavailable {
                code: c.into(),
                message: "m".into(),
            })
        };
        assert_eq!(sts_code_label(&Ok::<(), IdentityError>(())), "ok");
        assert_eq!(sts_code_label(&unavailable("Throttling")), "Throttling");
        assert_eq!(sts_code_label(&rejected("AccessDenied")), "AccessDenied");
        assert_eq!(
            sts_code_label(&rejected("AssumeRoleUnauthorizedAccess")),
            "AccessDenied"
        );
        assert_eq!(
            sts_code_label(&rejected("InvalidIdentityToken")),
            "InvalidIdentityToken"
        );
        assert_eq!(
            sts_code_label(&unavailable("ExpiredTokenException")),
            "ExpiredToken"
        );
        assert_eq!(
            sts_code_label(&unavailable("IDPCommunicationError")),
            "IDPCommunicationError"
        );
        assert_eq!(sts_code_label(&unavailable("Timeout")), "timeout");
        assert_eq!(sts_code_label(&unavailable("Dispatch")), "network");
        assert_eq!(sts_code_label(&unavailable("InternalFailure")), "5xx");
        assert_eq!(sts_code_label(&unavailable("SomethingNew")), "5xx");
        // A code STS may invent tomorrow is never a label of its own.
        assert_eq!(sts_code_label(&rejected("IDPRejectedClaim")), "other");
        assert_eq!(sts_code_label(&rejected("x".repeat(500).as_str())), "other");
    }

    #[test]
    fn secrets_do_not_debug_print() {
        let c = Credentials {
            access_key_id: "ASIA".into(),
            secret_access_key: Secret::new("s3cr3t"),
            session_token: Secret::new("t0k3n"),
            expiration: SystemTime::UNIX_EPOCH,
            issued_at: SystemTime::UNIX_EPOCH,
        };
        let s = format!("{c:?}");
        assert!(!s.contains("s3cr3t") && !s.contains("t0k3n"), "{s}");
    }
}
