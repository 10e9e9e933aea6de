//! STS `AssumeRoleWithWebIdentity` through aws-sdk-sts. The call is unsigned: the agent holds
//! no AWS credentials, and the node role needs no `sts:*` permission.

use std::time::{Duration, SystemTime};

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_sts::error::{ProvideErrorMetadata, SdkError};
use futures::future::BoxFuture;

use super::{AssumeRequest, Credentials, IdentityError, RoleExchange, Secret};

/// STS answers in well under a second; a stuck connection must not hold a pod's first request.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// What `sts-regional-endpoints: "false"` asks for.
const GLOBAL_ENDPOINT: &str = "https://sts.amazonaws.com";

/// Error codes that say "try again"; everything else STS says is a refusal to report.
const RETRYABLE_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "IDPCommunicationError",
    "ExpiredTokenException",
    "InternalFailure",
    "InternalError",
    "ServiceUnavailable",
];

pub struct SdkSts {
    regional: aws_sdk_sts::Client,
    global: aws_sdk_sts::Client,
}

impl SdkSts {
    /// Clients for `region` (given explicitly, so the SDK never looks for one in the real IMDS),
    /// at `endpoint` when one is given, else where the SDK's own settings (`AWS_ENDPOINT_URL`)
    /// or the region say.
    pub(crate) async fn new(region: String, endpoint: Option<String>) -> Self {
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(e) = &endpoint {
            loader = loader.endpoint_url(e);
        }
        let base = loader
            .region(aws_config::Region::new(region))
            .no_credentials()
            // Retries are ours (the cache's policy), so each attempt is counted and classified.
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .operation_timeout(CALL_TIMEOUT)
                    .build(),
            )
            .load()
            .await;
        let regional = aws_sdk_sts::Client::new(&base);
        // An endpoint named by the operator serves every ServiceAccount, global ones included.
        let global = if base.endpoint_url().is_some() {
            regional.clone()
        } else {
            let conf = aws_sdk_sts::config::Builder::from(&base)
                .endpoint_url(GLOBAL_ENDPOINT)
                .region(aws_config::Region::new("us-east-1"))
                .build();
            aws_sdk_sts::Client::from_conf(conf)
        };
        SdkSts { regional, global }
    }

    /// Like [`new`](Self::new) at an explicit endpoint (tests, the demo).
    pub async fn with_endpoint(region: String, endpoint: String) -> Self {
        Self::new(region, Some(endpoint)).await
    }
}

impl RoleExchange for SdkSts {
    fn assume<'a>(
        &'a self,
        req: &'a AssumeRequest,
    ) -> BoxFuture<'a, Result<Credentials, IdentityError>> {
        Box::pin(async move {
            let client = if req.regional {
                &self.regional
            } else {
                &self.global
            };
            let out = client
                .assume_role_with_web_identity()
                .role_arn(&req.role_arn)
                .role_session_name(&req.session_name)
                .web_identity_token(req.web_identity_token.expose())
                .duration_seconds(req.duration_secs)
                .send()
                .await
                .map_err(classify)?;
            let c = out
                .credentials
                .ok_or_else(|| IdentityError::StsUnavailable {
                    code: "NoCredentials".into(),
                    message: "response carried no credentials".into(),
                })?;
            let expiration =
                SystemTime::try_from(c.expiration).map_err(|_| IdentityError::StsUnavailable {
                    code: "BadExpiration".into(),
                    message: "expiration out of range".into(),
                })?;
            Ok(Credentials {
                access_key_id: c.access_key_id,
                secret_access_key: Secret::new(c.secret_access_key),
                session_token: Secret::new(c.session_token),
                expiration,
                issued_at: SystemTime::now(),
            })
        })
    }
}

type AssumeError =
    aws_sdk_sts::operation::assume_role_with_web_identity::AssumeRoleWithWebIdentityError;

fn classify(e: SdkError<AssumeError, aws_sdk_sts::config::http::HttpResponse>) -> IdentityError {
    match &e {
        SdkError::ServiceError(se) => {
            let code = se.err().code().unwrap_or("Unknown").to_string();
            let message = se.err().message().unwrap_or("").chars().take(300).collect();
            let server_side =
                se.raw().status().as_u16() >= 500 || RETRYABLE_CODES.contains(&code.as_str());
            if server_side {
                IdentityError::StsUnavailable { code, message }
            } else {
                IdentityError::StsRejected { code, message }
            }
        }
        SdkError::TimeoutError(_) => IdentityError::StsUnavailable {
            code: "Timeout".into(),
            message: "sts call timed out".into(),
        },
        SdkError::DispatchFailure(d) => IdentityError::StsUnavailable {
            code: "Dispatch".into(),
            message: format!("{:?}", d.as_connector_error())
                .chars()
                .take(300)
                .collect(),
        },
        _ => IdentityError::StsUnavailable {
            code: "Response".into(),
            message: e.to_string(),
        },
    }
}
