//! Role resolution: a pod's ServiceAccount annotations, read the way the IRSA webhook reads them.
//!
//! Only the ServiceAccounts of this node's pods are read, each by a direct GET and cached for
//! `ttl` (the documented bound on how late a role change is seen): O(pods on the node) API load.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use super::kube2iam::{self, BaseArn, NamespaceRestriction};
use super::{IdentityError, ServiceAccounts, validate_role_arn};
use crate::pods::PodInfo;

pub(crate) const AUDIENCE_ANNOTATION: &str = "eks.amazonaws.com/audience";
pub(crate) const TOKEN_EXPIRATION_ANNOTATION: &str = "eks.amazonaws.com/token-expiration";
pub(crate) const REGIONAL_STS_ANNOTATION: &str = "eks.amazonaws.com/sts-regional-endpoints";
/// The TokenRequest API's minimum; the token is used once, right away, and never leaves the agent.
pub(crate) const MIN_TOKEN_EXPIRATION: i64 = 600;

/// The role a pod is granted and how to ask for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleSpec {
    pub role_arn: String,
    pub audience: String,
    pub token_expiration_secs: i64,
    pub regional_sts: bool,
    /// Where the role came from (logs, `explain`).
    pub source: RoleSource,
}

/// Which of the operator's sources named a pod's role; the first that names one wins, in this
/// order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RoleSource {
    /// The ServiceAccount's `eks.amazonaws.com/role-arn` (the IRSA way).
    ServiceAccount,
    /// kube2iam migration mode: the pod's `iam.amazonaws.com/role`.
    PodAnnotation,
    /// `--default-role`, for pods that name none.
    Default,
}

impl RoleSource {
    pub(crate) fn label(self) -> &'static str {
        match self {
            RoleSource::ServiceAccount => "service_account",
            RoleSource::PodAnnotation => "pod_annotation",
            RoleSource::Default => "default_role",
        }
    }
}

/// What a pod is granted: a role, or why none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoleGrant {
    Role(Arc<RoleSpec>),
    /// Nothing names a role for this pod (and there is no default role).
    NoRole,
    /// kube2iam mode with namespace restrictions: the pod's annotation names a role its
    /// namespace does not allow.
    NotAllowed {
        role_arn: String,
    },
    /// kube2iam mode: the pod's annotation cannot be made into a role ARN.
    Invalid {
        reason: String,
    },
}

impl RoleSpec {
    /// The last segment of the ARN: what `security-credentials/` lists.
    pub(crate) fn role_name(&self) -> &str {
        // A byte search from the end: this runs for every credentials request.
        match self.role_arn.bytes().rposition(|b| b == b'/') {
            Some(i) => &self.role_arn[i + 1..],
            None => &self.role_arn,
        }
    }
}

/// Roles read from the API, by namespace then ServiceAccount, with when they were read.
/// Read by every request: foldhash (seeded per process) instead of SipHash.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
/// Each with the instant its read goes stale (`None`: a TTL too long to add, never).
type Recent = FastMap<String, FastMap<String, (Option<Arc<RoleSpec>>, Option<Instant>)>>;

pub struct RoleResolver {
    accounts: Arc<dyn ServiceAccounts>,
    annotation: String,
    default_audience: String,
    ttl: Duration,
    cache: moka::future::Cache<(String, String), Option<Arc<RoleSpec>>>,
    /// What the last reads found, for requests: looked up by `&str` without a lock or an
    /// allocation; an entry is used for `ttl` after its read, like the cache's.
    recent: ArcSwap<Recent>,
    /// Moved on after every change to `recent` (a read stored, a ServiceAccount forgotten).
    generation: AtomicU64,
    /// kube2iam migration mode, when on.
    kube2iam: Option<Kube2iamMode>,
    /// `--default-role`: for pods that name none.
    default_role: Option<Arc<RoleSpec>>,
    /// kube2iam mode's grants by pod uid, with the annotation value they were made for, so a
    /// request does not rebuild its pod's role; kept for `ttl`, like a ServiceAccount's.
    pod_grants: moka::sync::Cache<String, Arc<(String, RoleGrant)>>,
}

/// When a grant from [`RoleResolver::grant_now_stamped`] stops holding: at the next change of
/// what the resolver read, or when the read behind it goes stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GrantStamp {
    generation: u64,
    stale_at: Option<Instant>,
}

/// kube2iam migration mode: the base ARN for bare names, and the namespace restriction if on.
pub struct Kube2iamMode {
    pub base: Option<BaseArn>,
    pub restriction: Option<NamespaceRestriction>,
}

impl RoleResolver {
    pub(crate) fn new(
        accounts: Arc<dyn ServiceAccounts>,
        annotation: String,
        default_audience: String,
        ttl: Duration,
    ) -> Self {
        let cache = moka::future::Cache::builder()
            .max_capacity(10_000)
            .time_to_live(ttl)
            .build();
        RoleResolver {
            accounts,
            annotation,
            default_audience,
            ttl,
            cache,
            recent: ArcSwap::from_pointee(Recent::default()),
            generation: AtomicU64::new(0),
            kube2iam: None,
            default_role: None,
            pod_grants: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(ttl)
                .build(),
        }
    }

    /// Reads kube2iam's pod annotation for pods whose ServiceAccount names no role.
    pub(crate) fn with_kube2iam(mut self, mode: Kube2iamMode) -> Self {
        self.kube2iam = Some(mode);
        self
    }

    /// Grants `role_arn` to pods that name none (assumed with the pod's own token, like any).
    pub(crate) fn with_default_role(mut self, role_arn: String) -> Self {
        self.default_role = Some(Arc::new(self.fallback_spec(role_arn, RoleSource::Default)));
        self
    }

    /// A role named outside the ServiceAccount: asked for the way an annotated ServiceAccount
    /// without other annotations would be.
    fn fallback_spec(&self, role_arn: String, source: RoleSource) -> RoleSpec {
        RoleSpec {
            role_arn,
            audience: self.default_audience.clone(),
            token_expiration_secs: MIN_TOKEN_EXPIRATION,
            regional_sts: true,
            source,
        }
    }

    /// The role when a read younger than the TTL knows it: no lock, no allocation, no wait (the
    /// hot path); `None` when [`resolve`](Self::resolve) must read the ServiceAccount.
    pub(crate) fn resolve_now(
        &self,
        namespace: &str,
        service_account: &str,
    ) -> Option<Option<Arc<RoleSpec>>> {
        self.recent
            .load()
            .get(namespace)
            .and_then(|m| m.get(service_account))
            // One clock read, no subtraction: the hot path asks this for every request.
            .filter(|(_, stale_at)| stale_at.is_none_or(|at| Instant::now() < at))
            .map(|(role, _)| role.clone())
    }

    /// The role for `namespace/service_account`, or `None` when it names none. Concurrent misses
    /// share one read; errors are not cached.
    pub(crate) async fn resolve(
        &self,
        namespace: &str,
        service_account: &str,
    ) -> Result<Option<Arc<RoleSpec>>, IdentityError> {
        if let Some(role) = self.resolve_now(namespace, service_account) {
            return Ok(role);
        }
        let key = (namespace.to_string(), service_account.to_string());
        self.cache
            .try_get_with(key, async {
                let read = Instant::now();
                let ann = self
                    .accounts
                    .annotations(namespace, service_account)
                    .await?;
                let role = ann
                    .and_then(|a| self.spec_from(namespace, service_account, &a))
                    .map(Arc::new);
                self.recent.rcu(|m| {
                    let mut m = Recent::clone(m);
                    m.entry(namespace.to_string()).or_default().insert(
                        service_account.to_string(),
                        (role.clone(), read.checked_add(self.ttl)),
                    );
                    m
                });
                self.changed();
                Ok(role)
            })
            .await
            .map_err(|e: Arc<IdentityError>| (*e).clone())
    }

    fn spec_from(
        &self,
        ns: &str,
        sa: &str,
        a: &std::collections::BTreeMap<String, String>,
    ) -> Option<RoleSpec> {
        let arn = a.get(&self.annotation)?.trim();
        if let Err(reason) = validate_role_arn(arn) {
            tracing::warn!(
                namespace = ns,
                service_account = sa,
                reason,
                "ignoring invalid role annotation"
            );
            return None;
        }
        let token_expiration_secs = a
            .get(TOKEN_EXPIRATION_ANNOTATION)
            .and_then(|v| v.trim().parse::<i64>().ok())
            .unwrap_or(MIN_TOKEN_EXPIRATION)
            .clamp(MIN_TOKEN_EXPIRATION, 86_400);
        Some(RoleSpec {
            role_arn: arn.to_string(),
            audience: a
                .get(AUDIENCE_ANNOTATION)
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| self.default_audience.clone()),
            token_expiration_secs,
            regional_sts: a
                .get(REGIONAL_STS_ANNOTATION)
                .is_none_or(|v| v.trim() != "false"),
            source: RoleSource::ServiceAccount,
        })
    }

    /// What [`grant`](Self::grant) answers when it is at hand without reading the API (the hot
    /// path: the ServiceAccount's role read less than the TTL ago, or else the pod's kube2iam
    /// grant still kept, or the default role); `None` when `grant` must read.
    pub(crate) fn grant_now(&self, pod: &PodInfo) -> Option<RoleGrant> {
        self.grant_now_stamped(pod).map(|(grant, _)| grant)
    }

    /// [`grant_now`](Self::grant_now), and how long the answer holds when only the
    /// ServiceAccount's read decides it (its role, or the default role when it names none):
    /// while [`still_granted`](Self::still_granted) says so, `grant_now` gives the same answer
    /// for the pod (what a kept-alive connection remembers of its caller). No stamp for a
    /// kube2iam grant, which has a cache of its own.
    pub(crate) fn grant_now_stamped(
        &self,
        pod: &PodInfo,
    ) -> Option<(RoleGrant, Option<GrantStamp>)> {
        // Read before `recent`, and moved on after it changes: a stamp is never newer than what
        // it vouches for.
        let generation = self.generation.load(Ordering::Acquire);
        let recent = self.recent.load();
        let (role, stale_at) = recent
            .get(pod.namespace.as_str())
            .and_then(|m| m.get(pod.service_account.as_str()))
            .filter(|(_, stale_at)| stale_at.is_none_or(|at| Instant::now() < at))?;
        let stamp = GrantStamp {
            generation,
            stale_at: *stale_at,
        };
        if let Some(role) = role {
            return Some((RoleGrant::Role(role.clone()), Some(stamp)));
        }
        if let (Some(_), Some(value)) = (&self.kube2iam, &pod.kube2iam_role) {
            let hit = self.pod_grants.get(pod.uid.as_str())?;
            return (hit.0 == *value).then(|| (hit.1.clone(), None));
        }
        let grant = match &self.default_role {
            Some(role) => RoleGrant::Role(role.clone()),
            None => RoleGrant::NoRole,
        };
        Some((grant, Some(stamp)))
    }

    /// Whether a grant stamped by [`grant_now_stamped`](Self::grant_now_stamped) still holds
    /// at `now`: nothing was read or forgotten since, and its read is not stale. An atomic
    /// load and a comparison, no clock read (the caller has one).
    pub(crate) fn still_granted(&self, stamp: &GrantStamp, now: Instant) -> bool {
        self.generation.load(Ordering::Acquire) == stamp.generation
            && stamp.stale_at.is_none_or(|at| now < at)
    }

    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// What `pod` is granted: its ServiceAccount's role (always first); else, in kube2iam mode,
    /// the role its annotation names if its namespace allows it; else the default role; else
    /// none. A refused annotation does not fall back to the default role (kube2iam does not).
    pub(crate) async fn grant(&self, pod: &PodInfo) -> Result<RoleGrant, IdentityError> {
        if let Some(role) = self.resolve(&pod.namespace, &pod.service_account).await? {
            return Ok(RoleGrant::Role(role));
        }
        if let (Some(mode), Some(value)) = (&self.kube2iam, &pod.kube2iam_role) {
            if let Some(hit) = self.pod_grants.get(pod.uid.as_str())
                && hit.0 == *value
            {
                return Ok(hit.1.clone());
            }
            let grant = self.kube2iam_grant(mode, pod, value).await?;
            self.pod_grants
                .insert(pod.uid.clone(), Arc::new((value.clone(), grant.clone())));
            return Ok(grant);
        }
        Ok(match &self.default_role {
            Some(role) => RoleGrant::Role(role.clone()),
            None => RoleGrant::NoRole,
        })
    }

    async fn kube2iam_grant(
        &self,
        mode: &Kube2iamMode,
        pod: &PodInfo,
        value: &str,
    ) -> Result<RoleGrant, IdentityError> {
        let arn = match kube2iam::role_arn(value, mode.base.as_ref()) {
            Ok(arn) => arn,
            Err(reason) => return Ok(RoleGrant::Invalid { reason }),
        };
        if let Some(r) = &mode.restriction
            && !r.allows(&pod.namespace, &arn).await?
        {
            return Ok(RoleGrant::NotAllowed { role_arn: arn });
        }
        let spec = self.fallback_spec(arn, RoleSource::PodAnnotation);
        Ok(RoleGrant::Role(Arc::new(spec)))
    }

    /// Forgets a ServiceAccount so its next read goes to the API.
    pub async fn forget(&self, namespace: &str, service_account: &str) {
        self.recent.rcu(|m| {
            let mut m = Recent::clone(m);
            if let Some(sas) = m.get_mut(namespace) {
                sas.remove(service_account);
            }
            m
        });
        self.changed();
        self.cache
            .invalidate(&(namespace.to_string(), service_account.to_string()))
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::future::BoxFuture;
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Fake {
        ann: BTreeMap<String, String>,
        reads: AtomicUsize,
    }
    impl ServiceAccounts for Fake {
        fn annotations<'a>(
            &'a self,
            _: &'a str,
            name: &'a str,
        ) -> BoxFuture<'a, Result<Option<BTreeMap<String, String>>, IdentityError>> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            let r = if name == "missing" {
                None
            } else {
                Some(self.ann.clone())
            };
            Box::pin(async move { Ok(r) })
        }
    }

    fn resolver(pairs: &[(&str, &str)]) -> (RoleResolver, Arc<Fake>) {
        let fake = Arc::new(Fake {
            ann: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            reads: AtomicUsize::new(0),
        });
        let r = RoleResolver::new(
            fake.clone(),
            "eks.amazonaws.com/role-arn".into(),
            "sts.amazonaws.com".into(),
            Duration::from_secs(60),
        );
        (r, fake)
    }

    #[tokio::test]
    async fn annotations_shape_the_role_spec() {
        let (r, _) = resolver(&[
            (
                "eks.amazonaws.com/role-arn",
                "arn:aws:iam::123456789012:role/team/app",
            ),
            (AUDIENCE_ANNOTATION, "custom-aud"),
            (TOKEN_EXPIRATION_ANNOTATION, "7200"),
            (REGIONAL_STS_ANNOTATION, "false"),
        ]);
        let s = r.resolve("ns", "sa").await.unwrap().unwrap();
        assert_eq!(s.role_name(), "app");
        assert_eq!(s.audience, "custom-aud");
        assert_eq!(s.token_expiration_secs, 7200);
        assert!(!s.regional_sts);
    }

    #[tokio::test]
    async fn no_annotation_or_no_account_means_no_role() {
        let (r, _) = resolver(&[("other", "x")]);
        assert_eq!(r.resolve("ns", "sa").await.unwrap(), None);
        assert_eq!(r.resolve("ns", "missing").await.unwrap(), None);
    }

    #[tokio::test]
    async fn invalid_arns_grant_nothing() {
        for bad in [
            "",
            "role/x",
            "arn:aws:iam::12345:role/x",
            "arn:aws:s3:::bucket",
            "arn:aws:iam::123456789012:user/x",
            "arn:aws:iam::123456789012:role/",
        ] {
            let (r, _) = resolver(&[("eks.amazonaws.com/role-arn", bad)]);
            assert_eq!(r.resolve("ns", "sa").await.unwrap(), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn service_accounts_are_read_once_per_ttl() {
        let (r, fake) = resolver(&[(
            "eks.amazonaws.com/role-arn",
            "arn:aws:iam::123456789012:role/app",
        )]);
        for _ in 0..10 {
            r.resolve("ns", "sa").await.unwrap();
        }
        assert_eq!(fake.reads.load(Ordering::SeqCst), 1);
        r.forget("ns", "sa").await;
        r.resolve("ns", "sa").await.unwrap();
        assert_eq!(fake.reads.load(Ordering::SeqCst), 2);
    }

    fn pod_with(sa: &str, annotation: Option<&str>) -> PodInfo {
        PodInfo {
            uid: "uid-1".into(),
            namespace: "apps".into(),
            name: "web-0".into(),
            service_account: sa.into(),
            node_name: None,
            ips: vec![],
            host_network: false,
            terminal: false,
            kube2iam_role: annotation.map(String::from),
        }
    }

    struct Ns(BTreeMap<String, String>);
    impl kube2iam::Namespaces for Ns {
        fn annotations<'a>(
            &'a self,
            _: &'a str,
        ) -> BoxFuture<'a, Result<Option<BTreeMap<String, String>>, IdentityError>> {
            let r = Some(self.0.clone());
            Box::pin(async move { Ok(r) })
        }
    }

    /// A resolver whose ServiceAccount "irsa" names `irsa-role`, in kube2iam mode with base ARN,
    /// namespace "apps" allowing `reader`, and a default role.
    fn kube2iam_resolver(default_role: bool) -> RoleResolver {
        let fake = Arc::new(Fake {
            ann: BTreeMap::from([(
                "eks.amazonaws.com/role-arn".to_string(),
                "arn:aws:iam::123456789012:role/irsa-role".to_string(),
            )]),
            reads: AtomicUsize::new(0),
        });
        struct BySa(Arc<Fake>);
        impl ServiceAccounts for BySa {
            fn annotations<'a>(
                &'a self,
                ns: &'a str,
                name: &'a str,
            ) -> BoxFuture<'a, Result<Option<BTreeMap<String, String>>, IdentityError>>
            {
                if name == "irsa" {
                    self.0.annotations(ns, name)
                } else {
                    Box::pin(async { Ok(Some(BTreeMap::new())) })
                }
            }
        }
        let base = kube2iam::BaseArn::parse("arn:aws:iam::123456789012:role/").unwrap();
        let ns = Ns(BTreeMap::from([(
            kube2iam::ALLOWED_ROLES_ANNOTATION.to_string(),
            r#"["reader"]"#.to_string(),
        )]));
        let r = RoleResolver::new(
            Arc::new(BySa(fake)),
            "eks.amazonaws.com/role-arn".into(),
            "sts.amazonaws.com".into(),
            Duration::from_secs(60),
        )
        .with_kube2iam(Kube2iamMode {
            base: Some(base.clone()),
            restriction: Some(kube2iam::NamespaceRestriction::new(
                Arc::new(ns),
                kube2iam::RestrictionFormat::Glob,
                Some(base),
                Duration::from_secs(60),
            )),
        });
        if default_role {
            r.with_default_role("arn:aws:iam::123456789012:role/fallback".into())
        } else {
            r
        }
    }

    fn granted(g: RoleGrant) -> (String, RoleSource) {
        match g {
            RoleGrant::Role(r) => (r.role_name().to_string(), r.source),
            other => panic!("no role: {other:?}"),
        }
    }

    #[tokio::test]
    async fn the_service_account_wins_then_the_pod_annotation_then_the_default() {
        let r = kube2iam_resolver(true);
        let g = r.grant(&pod_with("irsa", Some("reader"))).await.unwrap();
        assert_eq!(granted(g), ("irsa-role".into(), RoleSource::ServiceAccount));
        let g = r.grant(&pod_with("plain", Some("reader"))).await.unwrap();
        assert_eq!(granted(g), ("reader".into(), RoleSource::PodAnnotation));
        let g = r.grant(&pod_with("plain", None)).await.unwrap();
        assert_eq!(granted(g), ("fallback".into(), RoleSource::Default));
        let no_default = kube2iam_resolver(false);
        let g = no_default.grant(&pod_with("plain", None)).await.unwrap();
        assert_eq!(g, RoleGrant::NoRole);
    }

    #[tokio::test]
    async fn a_role_the_namespace_does_not_allow_is_refused_not_defaulted() {
        let r = kube2iam_resolver(true);
        let g = r.grant(&pod_with("plain", Some("admin"))).await.unwrap();
        assert_eq!(
            g,
            RoleGrant::NotAllowed {
                role_arn: "arn:aws:iam::123456789012:role/admin".into()
            }
        );
        // The pod's annotation changes: the remembered grant is not reused.
        let g = r.grant(&pod_with("plain", Some("reader"))).await.unwrap();
        assert_eq!(granted(g).0, "reader");
        let g = r.grant(&pod_with("plain", Some("no such!"))).await.unwrap();
        assert!(matches!(g, RoleGrant::Invalid { .. }), "{g:?}");
    }

    #[tokio::test]
    async fn without_kube2iam_mode_the_pod_annotation_is_ignored() {
        let (r, _) = resolver(&[]);
        let g = r
            .grant(&pod_with("sa", Some("arn:aws:iam::123456789012:role/x")))
            .await;
        assert_eq!(g.unwrap(), RoleGrant::NoRole);
    }

    #[tokio::test]
    async fn a_stamped_grant_holds_until_the_next_change_or_its_ttl() {
        let (r, _) = resolver(&[(
            "eks.amazonaws.com/role-arn",
            "arn:aws:iam::123456789012:role/app",
        )]);
        let pod = pod_with("sa", None);
        assert!(r.grant_now_stamped(&pod).is_none(), "not read yet");
        r.grant(&pod).await.unwrap();
        let (g, stamp) = r.grant_now_stamped(&pod).unwrap();
        assert_eq!(granted(g).0, "app");
        let stamp = stamp.unwrap();
        let now = Instant::now();
        assert!(r.still_granted(&stamp, now));
        assert!(
            !r.still_granted(&stamp, now + Duration::from_secs(61)),
            "stale with its read"
        );
        // Another ServiceAccount read, or a forget, moves it on.
        r.resolve("apps", "other").await.unwrap();
        assert!(!r.still_granted(&stamp, now));
        let (_, stamp) = r.grant_now_stamped(&pod).unwrap();
        let stamp = stamp.unwrap();
        assert!(r.still_granted(&stamp, now));
        r.forget("apps", "sa").await;
        assert!(!r.still_granted(&stamp, now));
        assert!(r.grant_now_stamped(&pod).is_none(), "forgotten: read again");
    }

    #[tokio::test]
    async fn only_grants_the_service_account_read_decides_are_stamped() {
        let r = kube2iam_resolver(true);
        for (sa, annotation, stamped) in [
            ("irsa", Some("reader"), true),
            ("plain", Some("reader"), false),
            ("plain", None, true),
        ] {
            let pod = pod_with(sa, annotation);
            let slow = r.grant(&pod).await.unwrap();
            let (now, stamp) = r.grant_now_stamped(&pod).unwrap();
            assert_eq!(now, slow, "{sa} {annotation:?}");
            assert_eq!(stamp.is_some(), stamped, "{sa} {annotation:?}");
        }
    }
}
