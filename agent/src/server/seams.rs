//! The agent's parts as the protocol's seams: the pod index answers who is calling, the role
//! resolver which role, the credential cache which credentials.
//!
//! A kept-alive connection also remembers what its last request was answered from (the pod,
//! its role, the credential slot), each with the generation of the part it came from; the next
//! request uses it only while that part is unchanged, which costs an atomic load instead of a
//! lookup. Any change (a pod, a registration or revocation, a ServiceAccount read, a slot made
//! or dropped) moves its part's generation on, so the next request looks up again, exactly as
//! one without a memory would; credentials are read from the slot on every request.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::future::BoxFuture;

use super::agent::Agent;
use crate::identity::cache::SlotRef;
use crate::identity::roles::GrantStamp;
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

/// What one connection remembers of its caller between requests.
#[derive(Default)]
pub(super) struct Remembered {
    caller: Option<Caller>,
}

/// The pod at a source address as the index answered at `generation`, and what its role and
/// credential slot were found to be since.
struct Caller {
    ip: IpAddr,
    pod: Arc<PodInfo>,
    generation: u64,
    /// Found for `pod`.
    role: Option<(Arc<RoleSpec>, GrantStamp)>,
    /// Found for `pod` and the role given.
    slot: Option<(Arc<RoleSpec>, SlotRef)>,
}

/// The agent's seams for one request on a connection with a memory: each `*_now` answer is the
/// remembered one while its part is unchanged, else the agent's (then remembered). The waiting
/// answers are the agent's.
pub(super) struct Remembering<'a> {
    pub(super) agent: &'a Agent,
    pub(super) memory: &'a Mutex<Remembered>,
    /// When the request arrived: a remembered role holds while its ServiceAccount read is not
    /// stale at this instant.
    pub(super) arrived: Instant,
}

impl Remembering<'_> {
    pub(super) fn seams(&self) -> Seams<'_> {
        Seams {
            callers: self,
            roles: self,
            credentials: self,
            clock: &*self.agent.clock,
        }
    }
}

impl Callers for Remembering<'_> {
    fn identify_now(&self, ip: IpAddr) -> Option<Lookup> {
        let Ok(mut memory) = self.memory.try_lock() else {
            return self.agent.identify_now(ip);
        };
        if let Some(c) = &memory.caller
            && c.ip == ip
            && self.agent.index.is_current(c.generation)
        {
            return Some(Lookup::Found(c.pod.clone()));
        }
        let Some((found, generation)) = self.agent.index.resolve_now_at(ip) else {
            memory.caller = None;
            return None;
        };
        memory.caller = match (&found, memory.caller.take()) {
            // Another change to the index, not to this pod: what was found for it still holds
            // while its own parts say so.
            (Lookup::Found(pod), Some(old)) if old.ip == ip && Arc::ptr_eq(pod, &old.pod) => {
                Some(Caller { generation, ..old })
            }
            (Lookup::Found(pod), _) => Some(Caller {
                ip,
                pod: pod.clone(),
                generation,
                role: None,
                slot: None,
            }),
            _ => None,
        };
        Some(found)
    }

    fn identify(&self, ip: IpAddr) -> BoxFuture<'_, Lookup> {
        self.agent.identify(ip)
    }

    fn count_lookup(&self, result: &'static str) {
        self.agent.count_lookup(result);
    }
}

impl Roles for Remembering<'_> {
    fn role_now(&self, pod: &PodInfo) -> Option<RoleGrant> {
        let Ok(mut memory) = self.memory.try_lock() else {
            return self.agent.role_now(pod);
        };
        let Some(c) = memory
            .caller
            .as_mut()
            .filter(|c| std::ptr::eq(&*c.pod, pod))
        else {
            return self.agent.role_now(pod);
        };
        if let Some((role, stamp)) = &c.role
            && self.agent.roles.still_granted(stamp, self.arrived)
        {
            return Some(RoleGrant::Role(role.clone()));
        }
        let found = self.agent.roles.grant_now_stamped(pod);
        c.role = match &found {
            Some((RoleGrant::Role(role), Some(stamp))) => Some((role.clone(), *stamp)),
            _ => None,
        };
        found.map(|(grant, _)| grant)
    }

    fn role_of<'a>(&'a self, pod: &'a PodInfo) -> BoxFuture<'a, Result<RoleGrant, IdentityError>> {
        self.agent.role_of(pod)
    }
}

impl CredentialSource for Remembering<'_> {
    fn credentials_now(&self, pod: &Arc<PodInfo>, role: &Arc<RoleSpec>) -> Option<Arc<Served>> {
        let Ok(mut memory) = self.memory.try_lock() else {
            return self.agent.credentials_now(pod, role);
        };
        let Some(c) = memory.caller.as_mut().filter(|c| Arc::ptr_eq(&c.pod, pod)) else {
            return self.agent.credentials_now(pod, role);
        };
        if let Some((_, slot)) = c
            .slot
            .as_ref()
            .filter(|(r, slot)| Arc::ptr_eq(r, role) && self.agent.creds.still_indexed(slot))
        {
            return self.agent.creds.servable_at(slot);
        }
        let found = self.agent.creds.get_now_ref(pod, role);
        c.slot = found.as_ref().map(|(_, slot)| (role.clone(), slot.clone()));
        found.map(|(served, _)| served)
    }

    fn credentials<'a>(
        &'a self,
        pod: &'a Arc<PodInfo>,
        role: &'a Arc<RoleSpec>,
    ) -> BoxFuture<'a, Result<Arc<Served>, IdentityError>> {
        self.agent.credentials(pod, role)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, SystemTime};

    use clap::Parser;
    use http::{HeaderMap, Method};

    use crate::config::Config;
    use crate::identity::kube2iam::Namespaces;
    use crate::identity::{
        AssumeRequest, Clock, Credentials, RoleExchange, Secret, ServiceAccounts, TokenMinter,
    };
    use crate::imds::{Decision, RequestHead};
    use crate::pods::Registration;
    use crate::pods::confirm::{PodSource, PodSourceError};
    use crate::server::Deps;
    use crate::telemetry::Metrics;

    const ANN: &str = "eks.amazonaws.com/role-arn";
    const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

    /// The API server's ServiceAccounts, STS and the clock, as far as these tests need them.
    struct World {
        /// Role ARN by ServiceAccount name.
        roles: Mutex<BTreeMap<String, String>>,
        now: Mutex<SystemTime>,
        sts_calls: AtomicUsize,
    }

    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    impl ServiceAccounts for World {
        fn annotations<'a>(
            &'a self,
            _: &'a str,
            name: &'a str,
        ) -> BoxFuture<'a, Result<Option<BTreeMap<String, String>>, IdentityError>> {
            let ann = lock(&self.roles)
                .get(name)
                .map(|arn| BTreeMap::from([(ANN.to_string(), arn.clone())]));
            Box::pin(async move { Ok(Some(ann.unwrap_or_default())) })
        }
    }

    impl Namespaces for World {
        fn annotations<'a>(
            &'a self,
            _: &'a str,
        ) -> BoxFuture<'a, Result<Option<BTreeMap<String, String>>, IdentityError>> {
            Box::pin(async { Ok(None) })
        }
    }

    impl TokenMinter for World {
        fn mint<'a>(
            &'a self,
            pod: &'a PodInfo,
            _: &'a str,
            _: i64,
        ) -> BoxFuture<'a, Result<Secret, IdentityError>> {
            let token = Secret::new(format!("jwt-for-{}", pod.uid));
            Box::pin(async move { Ok(token) })
        }
    }

    impl RoleExchange for World {
        fn assume<'a>(
            &'a self,
            _: &'a AssumeRequest,
        ) -> BoxFuture<'a, Result<Credentials, IdentityError>> {
            let n = self.sts_calls.fetch_add(1, Ordering::SeqCst);
            let now = self.now();
            Box::pin(async move {
                Ok(Credentials {
                    access_key_id: format!("ASIA{n}"),
                    secret_access_key: Secret::new("secret"),
                    session_token: Secret::new("token"),
                    expiration: now + Duration::from_secs(3600),
                    issued_at: now,
                })
            })
        }
    }

    impl PodSource for World {
        fn pod<'a>(
            &'a self,
            _: &'a str,
            _: &'a str,
        ) -> BoxFuture<'a, Result<Option<PodInfo>, PodSourceError>> {
            Box::pin(async { Ok(None) })
        }
    }

    impl Clock for World {
        fn now(&self) -> SystemTime {
            *lock(&self.now)
        }
    }

    fn agent() -> (Agent, Arc<World>) {
        let world = Arc::new(World {
            roles: Mutex::new(BTreeMap::from([
                (
                    "reader".to_string(),
                    "arn:aws:iam::123456789012:role/reader".to_string(),
                ),
                (
                    "writer".to_string(),
                    "arn:aws:iam::123456789012:role/writer".to_string(),
                ),
            ])),
            now: Mutex::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)),
            sts_calls: AtomicUsize::new(0),
        });
        let cfg = Config::try_parse_from(["irsa-imds-agent", "--node-name", "n1"])
            .unwrap()
            .validate()
            .unwrap();
        // Never asked: the index is fed directly.
        let kube = kube::Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap()))
            .unwrap();
        let deps = Deps {
            kube,
            pods: world.clone(),
            service_accounts: world.clone(),
            namespaces: world.clone(),
            tokens: world.clone(),
            sts: world.clone(),
            on_role_failure: None,
            clock: world.clone(),
            metrics: Arc::new(Metrics::new()),
        };
        (Agent::assemble(&cfg, &deps).unwrap(), world)
    }

    fn pod(uid: &str, name: &str, sa: &str, ip: IpAddr) -> PodInfo {
        PodInfo {
            uid: uid.into(),
            namespace: "apps".into(),
            name: name.into(),
            service_account: sa.into(),
            node_name: Some("n1".into()),
            ips: vec![ip],
            host_network: false,
            terminal: false,
            kube2iam_role: None,
        }
    }

    /// One connection's requests, each decided from its memory where that holds, beside the
    /// same request decided with no memory at all.
    struct Connection<'a> {
        agent: &'a Agent,
        ip: IpAddr,
        memory: Mutex<Remembered>,
    }

    impl Connection<'_> {
        /// The decision now with the connection's memory, after checking that a request without
        /// one gets the same.
        fn now(&self, path: &str) -> Option<Decision> {
            let headers = HeaderMap::new();
            let head = RequestHead {
                method: &Method::GET,
                path,
                headers: &headers,
            };
            let bare = self
                .agent
                .protocol
                .decide_now(head, self.ip, self.agent.seams());
            let remembering = Remembering {
                agent: self.agent,
                memory: &self.memory,
                arrived: Instant::now(),
            };
            let with_memory = self
                .agent
                .protocol
                .decide_now(head, self.ip, remembering.seams());
            assert_eq!(with_memory, bare, "{path}: the memory changed the answer");
            with_memory
        }

        /// The full decision, waiting where it must (fills the parts' caches, not the memory).
        async fn waited(&self, path: &str) -> Decision {
            let headers = HeaderMap::new();
            let head = RequestHead {
                method: &Method::GET,
                path,
                headers: &headers,
            };
            self.agent
                .protocol
                .decide(head, self.ip, self.agent.seams())
                .await
        }

        /// The credentials body answered now from memory (`None`: not at hand, or refused).
        fn body(&self, role: &str) -> Option<String> {
            let d = self.now(&format!("{CREDS}{role}"))?;
            match d.answer {
                crate::imds::Answer::Reply(r) if r.status.is_success() => {
                    Some(String::from_utf8_lossy(&r.body).into_owned())
                }
                _ => None,
            }
        }

        fn remembers_everything(&self) -> bool {
            self.memory
                .lock()
                .unwrap()
                .caller
                .as_ref()
                .is_some_and(|c| c.role.is_some() && c.slot.is_some())
        }
    }

    fn key_id(body: &str) -> String {
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        v["AccessKeyId"].as_str().unwrap().to_string()
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_answers_from_memory_exactly_as_without_one() {
        let (agent, world) = agent();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let conn = Connection {
            agent: &agent,
            ip,
            memory: Mutex::new(Remembered::default()),
        };
        agent.index.upsert(pod("u1", "old", "reader", ip));
        assert_eq!(conn.now(&format!("{CREDS}reader")), None, "nothing at hand");
        conn.waited(&format!("{CREDS}reader")).await;
        let first = conn.body("reader").unwrap();
        assert!(conn.remembers_everything());
        assert_eq!(conn.body("reader").unwrap(), first, "from memory");
        assert!(
            conn.now(&format!("{CREDS}writer")).is_some(),
            "wrong role name"
        );

        // A change to another pod: this one's answer stands.
        agent
            .index
            .upsert(pod("u9", "other", "writer", "10.0.0.9".parse().unwrap()));
        conn.waited(CREDS).await;
        assert_eq!(conn.body("reader").unwrap(), first);

        // Too little left to serve: not at hand; then renewed in the same slot.
        *lock(&world.now) += Duration::from_secs(40 * 60);
        assert_eq!(conn.body("reader"), None);
        conn.waited(&format!("{CREDS}reader")).await;
        let renewed = conn.body("reader").unwrap();
        assert_ne!(key_id(&renewed), key_id(&first));

        // The ServiceAccount names another role: seen once it is read again.
        lock(&world.roles).insert(
            "reader".into(),
            "arn:aws:iam::123456789012:role/auditor".into(),
        );
        agent.roles.forget("apps", "reader").await;
        assert_eq!(conn.body("reader"), None);
        conn.waited(CREDS).await;
        assert_eq!(
            conn.now(&format!("{CREDS}reader"))
                .map(|d| d.refused.is_some()),
            Some(true)
        );
        conn.waited(&format!("{CREDS}auditor")).await;
        let auditor = conn.body("auditor").unwrap();
        assert!(conn.remembers_everything());
        // And back: the role's slot is still there, and no slot was made or dropped since the
        // connection last found one (another role's).
        lock(&world.roles).insert(
            "reader".into(),
            "arn:aws:iam::123456789012:role/reader".into(),
        );
        agent.roles.forget("apps", "reader").await;
        conn.waited(CREDS).await;
        assert_eq!(key_id(&conn.body("reader").unwrap()), key_id(&renewed));
        assert_eq!(conn.body("auditor"), None, "refused: not the pod's role");
        lock(&world.roles).insert(
            "reader".into(),
            "arn:aws:iam::123456789012:role/auditor".into(),
        );
        agent.roles.forget("apps", "reader").await;
        conn.waited(CREDS).await;
        assert_eq!(conn.body("auditor").unwrap(), auditor);

        // The pod's CNI DEL: its address is revoked on the next request.
        agent.index.register(Registration {
            container_id: "c1".into(),
            namespace: "apps".into(),
            name: "old".into(),
            ips: vec![ip],
        });
        agent.index.confirm("c1", pod("u1", "old", "reader", ip));
        conn.waited(CREDS).await;
        assert!(conn.body("auditor").is_some());
        agent.index.unregister("c1");
        assert_eq!(conn.body("auditor"), None);
        let refused = conn.waited(&format!("{CREDS}auditor")).await;
        assert!(refused.refused.is_some(), "{refused:?}");

        // Deleted, and its address taken by a pod of another ServiceAccount.
        agent.index.remove("u1");
        agent.creds.evict_pod("u1");
        agent.index.upsert(pod("u2", "new", "writer", ip));
        assert_eq!(conn.body("auditor"), None);
        conn.waited(&format!("{CREDS}writer")).await;
        let writer = conn.body("writer").unwrap();
        assert_ne!(key_id(&writer), key_id(&renewed));
        let wrong = conn.now(&format!("{CREDS}auditor")).unwrap();
        assert!(wrong.refused.is_some(), "{wrong:?}");
        assert!(conn.remembers_everything());

        // Its credentials dropped (the pod's slot evicted): fetched again, never the old set.
        agent.creds.evict_pod("u2");
        assert_eq!(conn.body("writer"), None);
        conn.waited(&format!("{CREDS}writer")).await;
        assert_ne!(key_id(&conn.body("writer").unwrap()), key_id(&writer));
    }
}
