//! Who is calling: the node-scoped pod index, merged from the watch and from CNI registrations.
//!
//! Rules (DESIGN §4):
//! - a CNI registration is authoritative for its IPs from ADD to DEL;
//! - otherwise the watch decides: a live (not Succeeded/Failed), non-hostNetwork pod holding the IP;
//! - a pod whose CNI DEL arrived never matches that IP again, even while the watch lags;
//! - two live pods claiming one IP: refused, never guessed; hostNetwork IPs: refused;
//! - not known yet: the caller waits, bounded, for the registration or the watch event.

pub mod confirm;
pub mod registration;
pub mod watch;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;

/// What the agent keeps of a pod: only what identification and token binding need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub node_name: Option<String>,
    pub ips: Vec<IpAddr>,
    pub host_network: bool,
    /// Phase Succeeded or Failed: its IP may already belong to someone else.
    pub terminal: bool,
}

impl PodInfo {
    /// Trims an API object down to a `PodInfo`; `None` when it lacks what identifies it.
    pub fn from_pod(pod: &Pod) -> Option<PodInfo> {
        let md = &pod.metadata;
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let mut ips: Vec<IpAddr> = Vec::new();
        if let Some(st) = status {
            for s in st
                .pod_ips
                .iter()
                .flatten()
                .map(|p| p.ip.as_str())
                .chain(st.pod_ip.as_deref())
            {
                if let Ok(ip) = s.parse::<IpAddr>()
                    && !ips.contains(&ip)
                {
                    ips.push(ip);
                }
            }
        }
        let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("");
        Some(PodInfo {
            uid: md.uid.clone().filter(|s| !s.is_empty())?,
            namespace: md.namespace.clone().filter(|s| !s.is_empty())?,
            name: md.name.clone().filter(|s| !s.is_empty())?,
            service_account: spec
                .and_then(|s| {
                    s.service_account_name
                        .clone()
                        .or_else(|| s.service_account.clone())
                })
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".to_string()),
            node_name: spec.and_then(|s| s.node_name.clone()),
            ips,
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            terminal: phase == "Succeeded" || phase == "Failed",
        })
    }

    fn live(&self) -> bool {
        !self.terminal && !self.host_network
    }
}

/// The answer to "which pod is at this IP?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Found(Arc<PodInfo>),
    /// No pod holds the IP (or not yet).
    Unknown,
    /// A registration exists but the pod behind it is not confirmed yet.
    Pending,
    /// Two or more live pods claim the IP: refused.
    Ambiguous,
    /// The IP belongs to hostNetwork pods, i.e. the node itself: refused.
    HostNetwork,
}

impl Lookup {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Lookup::Found(_) => "found",
            Lookup::Unknown => "unknown",
            Lookup::Pending => "pending",
            Lookup::Ambiguous => "ambiguous",
            Lookup::HostNetwork => "host_network",
        }
    }
    fn decisive(&self) -> bool {
        matches!(
            self,
            Lookup::Found(_) | Lookup::Ambiguous | Lookup::HostNetwork
        )
    }
}

/// A CNI ADD, as the registration socket received it (already validated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub container_id: String,
    pub namespace: String,
    pub name: String,
    pub ips: Vec<IpAddr>,
}

/// How the index changed, for the credential cache (prefetch on arrival, evict on departure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Live(Arc<PodInfo>),
    Gone(Arc<PodInfo>),
}

type PodKey = (String, String);

#[derive(Default)]
struct State {
    pods: HashMap<String, Arc<PodInfo>>,
    by_ip: HashMap<IpAddr, Vec<String>>,
    by_name: HashMap<PodKey, String>,
    regs: HashMap<String, (Registration, Option<Arc<PodInfo>>)>,
    reg_by_ip: HashMap<IpAddr, Vec<String>>,
    /// (namespace, name) whose CNI DEL arrived for the IP, until the watch shows that pod gone
    /// or a new ADD registers the name again.
    revoked: HashMap<IpAddr, HashSet<PodKey>>,
    synced: bool,
}

impl State {
    fn index_pod(&mut self, p: &Arc<PodInfo>) {
        for ip in &p.ips {
            self.by_ip.entry(*ip).or_default().push(p.uid.clone());
        }
        self.by_name
            .insert((p.namespace.clone(), p.name.clone()), p.uid.clone());
    }

    fn unindex_pod(&mut self, p: &PodInfo) {
        for ip in &p.ips {
            if let Some(v) = self.by_ip.get_mut(ip) {
                v.retain(|u| *u != p.uid);
                if v.is_empty() {
                    self.by_ip.remove(ip);
                }
            }
        }
        let key = (p.namespace.clone(), p.name.clone());
        if self.by_name.get(&key) == Some(&p.uid) {
            self.by_name.remove(&key);
        }
    }

    fn clear_revocations(&mut self, key: &PodKey) {
        self.revoked.retain(|_, set| {
            set.remove(key);
            !set.is_empty()
        });
    }

    fn lookup(&self, ip: IpAddr) -> Lookup {
        let uids = self.by_ip.get(&ip).map(Vec::as_slice).unwrap_or(&[]);
        if uids
            .iter()
            .filter_map(|u| self.pods.get(u))
            .any(|p| p.host_network && !p.terminal)
        {
            return Lookup::HostNetwork;
        }
        if let Some(cids) = self.reg_by_ip.get(&ip) {
            let mut owners: Vec<&(Registration, Option<Arc<PodInfo>>)> =
                cids.iter().filter_map(|c| self.regs.get(c)).collect();
            owners.dedup_by(|a, b| a.0.namespace == b.0.namespace && a.0.name == b.0.name);
            if owners.len() > 1 {
                return Lookup::Ambiguous;
            }
            if let Some((reg, confirmed)) = owners.first() {
                let watched = self
                    .by_name
                    .get(&(reg.namespace.clone(), reg.name.clone()))
                    .and_then(|u| self.pods.get(u));
                return match (watched, confirmed) {
                    // A direct read after ADD names the sandbox's pod; a lagging watch may still
                    // hold an older pod of the same name.
                    (Some(w), Some(c)) if w.uid != c.uid => found_if_live(c),
                    (Some(w), _) => found_if_live(w),
                    (None, Some(c)) => found_if_live(c),
                    (None, None) => Lookup::Pending,
                };
            }
        }
        let revoked = self.revoked.get(&ip);
        let mut live = uids
            .iter()
            .filter_map(|u| self.pods.get(u))
            .filter(|p| p.live())
            .filter(|p| {
                !revoked.is_some_and(|r| r.contains(&(p.namespace.clone(), p.name.clone())))
            });
        match (live.next(), live.next()) {
            (Some(p), None) => Lookup::Found(p.clone()),
            (Some(_), Some(_)) => Lookup::Ambiguous,
            _ => Lookup::Unknown,
        }
    }
}

fn found_if_live(p: &Arc<PodInfo>) -> Lookup {
    if p.host_network {
        Lookup::HostNetwork
    } else if p.terminal {
        Lookup::Unknown
    } else {
        Lookup::Found(p.clone())
    }
}

/// The node's pods by IP. Cheap to share (`Arc`); every method takes a short lock.
pub struct PodIndex {
    state: Mutex<State>,
    changed: tokio::sync::watch::Sender<u64>,
}

impl Default for PodIndex {
    fn default() -> Self {
        Self::new()
    }
}

impl PodIndex {
    pub fn new() -> Self {
        PodIndex {
            state: Mutex::new(State::default()),
            changed: tokio::sync::watch::channel(0).0,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock would be a bug in this module; the state is still
        // consistent per operation, so keep serving rather than poison every request.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Adds or updates a pod from the watch.
    pub fn upsert(&self, info: PodInfo) -> Vec<Change> {
        let info = Arc::new(info);
        let mut changes = Vec::new();
        {
            let mut st = self.lock();
            let old = st.pods.insert(info.uid.clone(), info.clone());
            if let Some(old) = &old {
                st.unindex_pod(old);
            }
            st.index_pod(&info);
            let was_live = old.as_ref().is_some_and(|o| o.live() && !o.ips.is_empty());
            let is_live = info.live() && !info.ips.is_empty();
            let sa_changed = old
                .as_ref()
                .is_some_and(|o| o.service_account != info.service_account);
            if is_live && (!was_live || sa_changed) {
                changes.push(Change::Live(info.clone()));
            }
            if was_live && !is_live {
                changes.push(Change::Gone(info.clone()));
            }
        }
        self.notify();
        changes
    }

    /// Removes a pod the watch saw deleted.
    pub fn remove(&self, uid: &str) -> Option<Arc<PodInfo>> {
        let removed = {
            let mut st = self.lock();
            let p = st.pods.remove(uid)?;
            st.unindex_pod(&p);
            st.clear_revocations(&(p.namespace.clone(), p.name.clone()));
            // A DEL that never came (runtime crash, node reboot): the registration of a pod the
            // API has deleted goes with it. Only one confirmed as this very pod: a new pod of
            // the same name may already have registered while the watch lagged.
            let stale: Vec<String> = st
                .regs
                .iter()
                .filter(|(_, (_, c))| c.as_ref().is_some_and(|c| c.uid == p.uid))
                .map(|(cid, _)| cid.clone())
                .collect();
            for cid in stale {
                if let Some((reg, _)) = st.regs.remove(&cid) {
                    unindex_reg(&mut st, &reg);
                }
            }
            Some(p)
        };
        self.notify();
        removed
    }

    /// Replaces the watch's view after a (re)list; returns what appeared and what vanished.
    pub fn replace_all(&self, pods: Vec<PodInfo>) -> Vec<Change> {
        let fresh: HashSet<String> = pods.iter().map(|p| p.uid.clone()).collect();
        let gone: Vec<String> = self
            .lock()
            .pods
            .keys()
            .filter(|u| !fresh.contains(*u))
            .cloned()
            .collect();
        let mut changes = Vec::new();
        for uid in gone {
            if let Some(p) = self.remove(&uid) {
                changes.push(Change::Gone(p));
            }
        }
        for p in pods {
            changes.extend(self.upsert(p));
        }
        self.lock().synced = true;
        self.notify();
        changes
    }

    pub fn is_synced(&self) -> bool {
        self.lock().synced
    }

    pub fn pod_count(&self) -> usize {
        self.lock().pods.len()
    }

    /// A CNI ADD: the IPs belong to this pod until its DEL. IPAM hands out an address only once
    /// its previous holder is gone, so an ADD supersedes an older registration of the same IP
    /// whose DEL was lost; that older pod is revoked on the IP, exactly as if its DEL had come.
    pub fn register(&self, reg: Registration) {
        {
            let mut st = self.lock();
            let key = (reg.namespace.clone(), reg.name.clone());
            st.clear_revocations(&key);
            if let Some((old, _)) = st.regs.remove(&reg.container_id) {
                unindex_reg(&mut st, &old);
            }
            for ip in &reg.ips {
                let holders: Vec<String> = st.reg_by_ip.get(ip).cloned().unwrap_or_default();
                for cid in holders {
                    let Some((old, _)) = st.regs.get_mut(&cid) else {
                        continue;
                    };
                    old.ips.retain(|i| i != ip);
                    let (old_key, empty) = (
                        (old.namespace.clone(), old.name.clone()),
                        old.ips.is_empty(),
                    );
                    if empty {
                        st.regs.remove(&cid);
                    }
                    st.reg_by_ip.remove(ip);
                    if old_key != key {
                        st.revoked.entry(*ip).or_default().insert(old_key);
                    }
                }
            }
            for ip in &reg.ips {
                st.reg_by_ip
                    .entry(*ip)
                    .or_default()
                    .push(reg.container_id.clone());
            }
            st.regs.insert(reg.container_id.clone(), (reg, None));
        }
        self.notify();
    }

    /// Records the pod a registration belongs to, as read from the API right after ADD.
    pub fn confirm(&self, container_id: &str, info: PodInfo) -> bool {
        let ok = {
            let mut st = self.lock();
            match st.regs.get_mut(container_id) {
                Some((reg, slot)) if reg.namespace == info.namespace && reg.name == info.name => {
                    *slot = Some(Arc::new(info));
                    true
                }
                _ => false,
            }
        };
        self.notify();
        ok
    }

    /// A CNI DEL: the IPs stop matching this pod at once. Idempotent.
    pub fn unregister(&self, container_id: &str) -> Option<Registration> {
        let reg = {
            let mut st = self.lock();
            let (reg, _) = st.regs.remove(container_id)?;
            unindex_reg(&mut st, &reg);
            for ip in &reg.ips {
                st.revoked
                    .entry(*ip)
                    .or_default()
                    .insert((reg.namespace.clone(), reg.name.clone()));
            }
            Some(reg)
        };
        self.notify();
        reg
    }

    /// Drops every registration whose sandbox `keep` rejects (CNI GC), each as by its DEL;
    /// returns how many went.
    pub fn retain_registrations(&self, keep: impl Fn(&str) -> bool) -> usize {
        let stale: Vec<String> = self
            .lock()
            .regs
            .keys()
            .filter(|c| !keep(c))
            .cloned()
            .collect();
        stale
            .iter()
            .filter(|c| self.unregister(c).is_some())
            .count()
    }

    /// Whether `container_id` is registered with exactly these IPs (CNI CHECK).
    pub fn is_registered(&self, container_id: &str, ips: &[IpAddr]) -> bool {
        let st = self.lock();
        st.regs.get(container_id).is_some_and(|(r, _)| {
            let mut a = r.ips.clone();
            let mut b = ips.to_vec();
            a.sort();
            b.sort();
            a == b
        })
    }

    /// The pod currently registered or watched under (namespace, name), if live.
    pub fn lookup(&self, ip: IpAddr) -> Lookup {
        self.lock().lookup(ip)
    }

    /// Like [`lookup`](Self::lookup), but waits up to `wait` for an unknown or pending IP to be
    /// resolved by a registration or a watch event.
    pub async fn resolve(&self, ip: IpAddr, wait: Duration) -> Lookup {
        let deadline = tokio::time::Instant::now() + wait;
        let mut rx = self.changed.subscribe();
        loop {
            rx.borrow_and_update();
            let found = self.lookup(ip);
            if found.decisive() {
                return found;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => return found,
            }
        }
    }
}

fn unindex_reg(st: &mut State, reg: &Registration) {
    for ip in &reg.ips {
        if let Some(v) = st.reg_by_ip.get_mut(ip) {
            v.retain(|c| *c != reg.container_id);
            if v.is_empty() {
                st.reg_by_ip.remove(ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn pod(uid: &str, name: &str, sa: &str, ips: &[&str]) -> PodInfo {
        PodInfo {
            uid: uid.into(),
            namespace: "ns".into(),
            name: name.into(),
            service_account: sa.into(),
            node_name: Some("n1".into()),
            ips: ips.iter().map(|s| ip(s)).collect(),
            host_network: false,
            terminal: false,
        }
    }

    fn reg(cid: &str, name: &str, ips: &[&str]) -> Registration {
        Registration {
            container_id: cid.into(),
            namespace: "ns".into(),
            name: name.into(),
            ips: ips.iter().map(|s| ip(s)).collect(),
        }
    }

    fn uid_at(idx: &PodIndex, addr: &str) -> Option<String> {
        match idx.lookup(ip(addr)) {
            Lookup::Found(p) => Some(p.uid.clone()),
            _ => None,
        }
    }

    #[test]
    fn every_pod_ip_is_indexed() {
        let idx = PodIndex::new();
        idx.upsert(pod("u1", "a", "sa", &["10.0.0.1", "2600::1"]));
        assert_eq!(uid_at(&idx, "10.0.0.1").as_deref(), Some("u1"));
        assert_eq!(uid_at(&idx, "2600::1").as_deref(), Some("u1"));
        assert_eq!(idx.lookup(ip("10.0.0.2")), Lookup::Unknown);
    }

    #[test]
    fn terminated_pod_never_matches() {
        let idx = PodIndex::new();
        idx.upsert(pod("u1", "a", "sa", &["10.0.0.1"]));
        let mut done = pod("u1", "a", "sa", &["10.0.0.1"]);
        done.terminal = true;
        let changes = idx.upsert(done);
        assert!(matches!(changes.as_slice(), [Change::Gone(_)]));
        assert_eq!(idx.lookup(ip("10.0.0.1")), Lookup::Unknown);
    }

    #[test]
    fn two_live_pods_with_one_ip_are_refused() {
        let idx = PodIndex::new();
        idx.upsert(pod("u1", "a", "sa", &["10.0.0.1"]));
        idx.upsert(pod("u2", "b", "sa", &["10.0.0.1"]));
        assert_eq!(idx.lookup(ip("10.0.0.1")), Lookup::Ambiguous);
    }

    #[test]
    fn host_network_ip_is_refused_even_if_a_pod_claims_it() {
        let idx = PodIndex::new();
        let mut h = pod("u1", "h", "sa", &["10.0.0.9"]);
        h.host_network = true;
        idx.upsert(h);
        idx.upsert(pod("u2", "b", "sa", &["10.0.0.9"]));
        assert_eq!(idx.lookup(ip("10.0.0.9")), Lookup::HostNetwork);
    }

    #[test]
    fn ip_reused_after_delete_matches_only_the_new_pod() {
        let idx = PodIndex::new();
        idx.upsert(pod("u1", "old", "sa-a", &["10.0.0.1"]));
        idx.remove("u1");
        idx.upsert(pod("u2", "new", "sa-b", &["10.0.0.1"]));
        assert_eq!(uid_at(&idx, "10.0.0.1").as_deref(), Some("u2"));
    }

    #[test]
    fn cni_del_revokes_the_ip_while_the_watch_lags() {
        let idx = PodIndex::new();
        idx.upsert(pod("u1", "old", "sa", &["10.0.0.1"]));
        idx.register(reg("c1", "old", &["10.0.0.1"]));
        assert_eq!(uid_at(&idx, "10.0.0.1").as_deref(), Some("u1"));
        idx.unregister("c1");
        // The watch still shows the old pod running with that IP: it must not match.
        assert_eq!(idx.lookup(ip("10.0.0.1")), Lookup::Unknown);
        // A new pod's ADD takes the IP over before the watch knows about it.
        idx.register(reg("c2", "new", &["10.0.0.1"]));
        assert_eq!(idx.lookup(ip("10.0.0.1")), Lookup::Pending);
        idx.confirm("c2", pod("u2", "new", "sa-b", &[]));
        assert_eq!(uid_at(&idx, "10.0.0.1").as_deref(), Some("u2"));
        // The watch catches up: the old pod goes, the new one appears.
        idx.remove("u1");
        idx.upsert(pod("u2", "new", "sa-b", &["10.0.0.1"]));
        assert_eq!(uid_at(&idx, "10.0.0.1").as_deref(), Some("u2"));
    }

    #[test]
    fn registration_beats_a_stale_watch_entry_for_the_same_ip() {
        let idx = PodIndex::new();
        idx.upsert(pod("u1", "old", "sa", &["10.0.0.1"]));
        idx.register(reg("c2", "new", &["10.0.0.1"]));
        assert_eq!(idx.lookup(ip("10.0.0.1")), Lookup::Pending);
        idx.upsert(pod("u2", "new", "sa", &[]));
        assert_eq!(uid_at(&idx, "10.0.0.1").as_deref(), Some("u2"));
    }

    #[test]
    fn a_new_add_supersedes_a_registration_whose_del_was_lost() {
        let idx = PodIndex::new();
        idx.upsert(pod("u1", "a", "sa", &["10.0.0.1"]));
        idx.register(reg("c1", "a", &["10.0.0.1", "10.0.0.9"]));
        idx.register(reg("c2", "b", &["10.0.0.1"]));
        // The new sandbox owns the IP; the old pod never matches it again, even from the watch.
        assert_eq!(idx.lookup(ip("10.0.0.1")), Lookup::Pending);
        idx.confirm("c2", pod("u2", "b", "sa", &[]));
        assert_eq!(uid_at(&idx, "10.0.0.1").as_deref(), Some("u2"));
        assert!(
            idx.is_registered("c1", &[ip("10.0.0.9")]),
            "its other IP is untouched"
        );
        assert!(idx.unregister("c1").is_some());
        assert!(idx.unregister("c1").is_none(), "DEL is idempotent");
        assert_eq!(uid_at(&idx, "10.0.0.1").as_deref(), Some("u2"));
    }

    #[test]
    fn a_deleted_pods_registration_goes_with_it() {
        let idx = PodIndex::new();
        idx.register(reg("c1", "a", &["10.0.0.1"]));
        idx.confirm("c1", pod("u1", "a", "sa", &[]));
        idx.upsert(pod("u1", "a", "sa", &["10.0.0.1"]));
        idx.remove("u1");
        assert!(!idx.is_registered("c1", &[ip("10.0.0.1")]));
        assert_eq!(idx.lookup(ip("10.0.0.1")), Lookup::Unknown);
    }

    #[test]
    fn confirm_for_another_pod_name_is_ignored() {
        let idx = PodIndex::new();
        idx.register(reg("c1", "a", &["10.0.0.1"]));
        assert!(!idx.confirm("c1", pod("u9", "someone-else", "sa", &[])));
        assert_eq!(idx.lookup(ip("10.0.0.1")), Lookup::Pending);
    }

    #[test]
    fn relist_drops_pods_that_vanished() {
        let idx = PodIndex::new();
        idx.upsert(pod("u1", "a", "sa", &["10.0.0.1"]));
        let ch = idx.replace_all(vec![pod("u2", "b", "sa", &["10.0.0.2"])]);
        assert!(
            ch.iter()
                .any(|c| matches!(c, Change::Gone(p) if p.uid == "u1"))
        );
        assert!(
            ch.iter()
                .any(|c| matches!(c, Change::Live(p) if p.uid == "u2"))
        );
        assert!(idx.is_synced());
        assert_eq!(idx.lookup(ip("10.0.0.1")), Lookup::Unknown);
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_caller_waits_for_the_watch_event() {
        let idx = Arc::new(PodIndex::new());
        let i2 = idx.clone();
        let h =
            tokio::spawn(
                async move { i2.resolve(ip("10.0.0.1"), Duration::from_millis(500)).await },
            );
        tokio::task::yield_now().await;
        idx.upsert(pod("u1", "a", "sa", &["10.0.0.1"]));
        assert!(matches!(h.await.unwrap(), Lookup::Found(p) if p.uid == "u1"));
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_caller_gives_up_at_the_deadline() {
        let idx = PodIndex::new();
        let t0 = tokio::time::Instant::now();
        assert_eq!(
            idx.resolve(ip("10.0.0.1"), Duration::from_millis(300))
                .await,
            Lookup::Unknown
        );
        assert_eq!(t0.elapsed(), Duration::from_millis(300));
    }
}
