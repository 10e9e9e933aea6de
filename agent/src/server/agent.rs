//! The assembled agent: the pod index, the role resolver, the credential cache, the protocol
//! and the passthrough, shared by every request; and the reactions that tie them together
//! (prefetch on a pod's arrival, eviction on its departure, confirmation of a CNI ADD).

use std::sync::Arc;
use std::time::Duration;

use super::{Deps, RunError};
use crate::config::{ImdsV2, ValidConfig};
use crate::identity::kube2iam::NamespaceRestriction;
use crate::identity::roles::Kube2iamMode;
use crate::identity::{Clock, CredentialCache, RoleGrant, RoleResolver};
use crate::imds::{Policy, Protocol, TokenAuthority};
use crate::pods::confirm::{PodSource, confirm};
use crate::pods::registration::Op;
use crate::pods::{Change, PodIndex, PodInfo, Registration};
use crate::telemetry::Metrics;
use crate::upstream::Upstream;

/// The assembled agent, shared by every request.
pub(super) struct Agent {
    pub(super) index: Arc<PodIndex>,
    pub(super) roles: RoleResolver,
    pub(super) creds: Arc<CredentialCache>,
    pub(super) protocol: Protocol,
    pub(super) upstream: Upstream,
    pub(super) metrics: Arc<Metrics>,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) pod_wait: Duration,
    pods: Arc<dyn PodSource>,
    node: String,
}

/// The ServiceAccount's role, then (by the operator's flags) kube2iam's pod annotation and the
/// default role.
fn role_resolver(cfg: &ValidConfig, deps: &Deps) -> RoleResolver {
    let setup = cfg.roles();
    let mut roles = RoleResolver::new(
        deps.service_accounts.clone(),
        cfg.role_annotation.clone(),
        cfg.audience.clone(),
        cfg.sa_cache_ttl,
    );
    if cfg.kube2iam_annotations {
        let restriction = cfg.namespace_restrictions.then(|| {
            NamespaceRestriction::new(
                deps.namespaces.clone(),
                cfg.namespace_restriction_format,
                setup.base.clone(),
                cfg.sa_cache_ttl,
            )
        });
        roles = roles.with_kube2iam(Kube2iamMode {
            base: setup.base.clone(),
            restriction,
        });
    }
    if let Some(arn) = &setup.default_role {
        roles = roles.with_default_role(arn.clone());
    }
    roles
}

impl Agent {
    /// The node this agent serves.
    pub(super) fn node(&self) -> &str {
        &self.node
    }

    pub(super) fn assemble(cfg: &ValidConfig, deps: &Deps) -> Result<Agent, RunError> {
        let settings = cfg.cache_settings();
        let mut creds = CredentialCache::new(
            deps.tokens.clone(),
            deps.sts.clone(),
            deps.clock.clone(),
            settings,
            deps.metrics.clone(),
        );
        if let Some(hook) = &deps.on_role_failure {
            creds = creds.with_failure_hook(hook.clone());
        }
        let policy = Policy {
            upstream_allow: cfg.upstream_allow.clone(),
            v2_required: cfg.imds_v2 == ImdsV2::Required,
        };
        Ok(Agent {
            index: Arc::new(PodIndex::new()),
            roles: role_resolver(cfg, deps),
            creds: Arc::new(creds),
            protocol: Protocol::new(TokenAuthority::new().map_err(RunError::Crypto)?, policy),
            upstream: Upstream::new(&cfg.upstream_imds),
            metrics: deps.metrics.clone(),
            clock: deps.clock.clone(),
            pod_wait: cfg.pod_wait,
            pods: deps.pods.clone(),
            node: cfg.node_name.clone(),
        })
    }

    pub(super) fn on_change(self: &Arc<Self>, change: Change) {
        match change {
            Change::Live(pod) => {
                let this = self.clone();
                tokio::spawn(async move { this.prefetch(pod).await });
            }
            Change::Gone(pod) => self.creds.evict_pod(&pod.uid),
        }
    }

    /// Warms the cache for a pod that just appeared, so its first request is a cache hit.
    async fn prefetch(&self, pod: Arc<PodInfo>) {
        match self.roles.grant(&pod).await {
            Ok(RoleGrant::Role(role)) => self.creds.prefetch(&pod, &role).await,
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(pod = %pod.name, error = %e, "prefetch: cannot read what names the pod's role")
            }
        }
    }

    pub(super) fn on_registration(self: &Arc<Self>, op: &Op, ok: bool) {
        self.metrics.registration(op.metric_label(), ok);
        if let (Op::Add(reg), true) = (op, ok) {
            self.confirm_in_background(reg.clone());
        }
    }

    /// Reads the registered pod from the API, confirms the registration, prefetches.
    pub(super) fn confirm_in_background(self: &Arc<Self>, reg: Registration) {
        let this = self.clone();
        tokio::spawn(async move {
            if let Some(pod) = confirm(&this.index, &*this.pods, &this.node, &reg).await {
                this.prefetch(Arc::new(pod)).await;
            }
        });
    }
}
