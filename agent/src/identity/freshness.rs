//! How fresh served credentials are, in one place: what SDKs need (DESIGN §5) and what the
//! cache, the refresher and the configuration's checks derive from it.

use std::time::Duration;

/// Served credentials keep at least this long before `Expiration` while STS answers: SDKs refresh
/// 5–15 minutes before expiry and some refetch on every call inside that window; botocore takes a
/// set with less than 15 + 2..10 minutes left for an IMDS outage (docs/sts-economy.md).
pub(crate) const MIN_SERVED_REMAINING: Duration = Duration::from_secs(30 * 60);

/// Session length asked of STS unless the operator says otherwise (`--credential-duration`).
pub(crate) const DEFAULT_CREDENTIAL_DURATION: &str = "1h";
/// STS's bounds on `DurationSeconds`.
pub const CREDENTIAL_DURATION_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(15 * 60)..=Duration::from_secs(12 * 3600);

/// The refresh point (`--refresh-at`): a cached set is renewed in the background once it has
/// this little left (less [`REFRESH_SPREAD`]): just before the SDKs holding it come back, 15
/// minutes before expiry, and no earlier, so an hour's session costs one STS call per 40-43
/// minutes (docs/sts-economy.md). A request finding less than [`MIN_SERVED_REMAINING`] left
/// before that gets a freshly fetched set.
pub(crate) const DEFAULT_REFRESH_AT: &str = "20m";

/// The earliest any SDK the agent serves comes back for a set it holds (botocore and Java v1:
/// 15 minutes before `Expiration`), plus [`REFRESH_SPREAD`]: `--refresh-at` may not be lower.
pub const MIN_REFRESH_AT: Duration = Duration::from_secs(18 * 60);

/// A set's refresh point is `--refresh-at` minus a uniform draw from this, so the sets of a node,
/// and the nodes of a fleet started together, renew at different moments.
pub(crate) const REFRESH_SPREAD: Duration = Duration::from_secs(3 * 60);

/// How often the background refresher looks for credentials past their refresh point.
pub(crate) const REFRESH_SCAN: Duration = Duration::from_secs(30);

/// A background refresh that failed is retried after this, doubling up to [`REFRESH_BACKOFF_MAX`]
/// (jittered), so a down STS is not hammered by every slot at once.
pub(crate) const REFRESH_BACKOFF_BASE: Duration = Duration::from_secs(5);
pub(crate) const REFRESH_BACKOFF_MAX: Duration = Duration::from_secs(300);

/// Refusals (AccessDenied, a bad trust policy) are remembered this long instead of retried on
/// every request; a fixed trust policy is seen within it.
pub(crate) const NEGATIVE_TTL: Duration = Duration::from_secs(30);

/// Credentials this close to expiry are never served: clocks differ and a request takes time.
/// While STS is down, what is left above this is served.
pub(crate) const EXPIRY_SKEW: Duration = Duration::from_secs(60);

/// When STS hands out sessions shorter than 30 minutes (a role's limit, role chaining), a set
/// this young is served as it is instead of refetched on every request.
pub(crate) const SHORT_SESSION_GRACE: Duration = Duration::from_secs(5 * 60);
