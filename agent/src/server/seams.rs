//! The agent's parts as the protocol's seams: the pod index answers who is calling, the role
//! resolver which role, the credential cache which credentials.

use std::net::IpAddr;
use std::sync::Arc;

use futures::future::BoxFuture;

use super::agent::Agent;
use crate::identity::{IdentityError, RoleGrant, RoleSpec, Served};
use crate::imds::{Callers, CredentialSource, Roles, Seams};
use crate::pods::{Lookup, PodInfo};

impl Agent {
    pub(super) fn seams(&self) -> Seams<'_> {
        Seams {
            callers: self,
            roles: self,
            credentials: self,
            clock: &*self.clock,
        }
    }
}

impl Callers for Agent {
    fn identify_now(&self, ip: IpAddr) -> Option<Lookup> {
        self.index.resolve_now(ip)
    }

    fn identify(&self, ip: IpAddr) -> BoxFuture<'_, Lookup> {
        Box::pin(self.index.resolve(ip, self.pod_wait))
    }

    fn count_lookup(&self, result: &'static str) {
        self.metrics.lookup(result);
    }
}

impl Roles for Agent {
    fn role_now(&self, pod: &PodInfo) -> Option<RoleGrant> {
        self.roles.grant_now(pod)
    }

    fn role_of<'a>(&'a self, pod: &'a PodInfo) -> BoxFuture<'a, Result<RoleGrant, IdentityError>> {
        Box::pin(self.roles.grant(pod))
    }
}

impl CredentialSource for Agent {
    fn credentials_now(&self, pod: &Arc<PodInfo>, role: &Arc<RoleSpec>) -> Option<Arc<Served>> {
        self.creds.get_now(pod, role)
    }

    fn credentials<'a>(
        &'a self,
        pod: &'a Arc<PodInfo>,
        role: &'a Arc<RoleSpec>,
    ) -> BoxFuture<'a, Result<Arc<Served>, IdentityError>> {
        Box::pin(self.creds.get_served(pod, role))
    }
}
