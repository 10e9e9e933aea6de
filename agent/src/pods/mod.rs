//! Who is calling: the node-scoped pod index, merged from the watch and from CNI registrations.
//!
//! Rules (DESIGN §4):
//! - a CNI registration is authoritative for its IPs from ADD to DEL;
//! - otherwise the watch decides: a live (not Succeeded/Failed), non-hostNetwork pod holding the IP;
//! - a pod whose CNI DEL arrived never matches that IP again, even while the watch lags (the
//!   revocation names the pod by uid when known, so a same-name successor does not lift it);
//! - a pod being deleted whose containers have all terminated is gone: its IP may be reused;
//! - registrations and revocations survive an agent restart ([`state`]);
//! - two live pods claiming one IP: refused, never guessed; hostNetwork IPs: refused;
//! - not known yet: the caller waits, bounded, for the registration or the watch event.

pub mod confirm;
pub mod registration;
pub mod state;
pub mod watch;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;

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
    /// Phase Succeeded or Failed, or being deleted with every container terminated: its IP may
    /// already belong to someone else.
    pub terminal: bool,
    /// kube2iam's pod annotation (`iam.amazonaws.com/role`): a role name or ARN, used only in
    /// kube2iam migration mode and only when the ServiceAccount names no role.
    pub kube2iam_role: Option<String>,
}

/// kube2iam's pod annotation naming the pod's role (kube2iam's `--iam-role-key` default).
pub(crate) const KUBE2IAM_ROLE_ANNOTATION: &str = "iam.amazonaws.com/role";
/// Longer annotation values are not a role (an ARN is at most 2048 characters).
const MAX_ROLE_ANNOTATION: usize = 2048;

impl PodInfo {
    /// Trims an API object down to a `PodInfo`; `None` when it lacks what identifies it.
    pub(crate) fn from_pod(pod: &Pod) -> Option<PodInfo> {
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
        // Deleted and every container stopped: the kubelet tears the sandbox down next, and the
        // API may show the object (and its IP) a while longer.
        let containers = status
            .and_then(|s| s.container_statuses.as_deref())
            .unwrap_or(&[]);
        let wound_down = md.deletion_timestamp.is_some()
            && !containers.is_empty()
            && containers
                .iter()
                .all(|c| c.state.as_ref().is_some_and(|st| st.terminated.is_some()));
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
            terminal: phase == "Succeeded" || phase == "Failed" || wound_down,
            kube2iam_role: md
                .annotations
                .as_ref()
                .and_then(|a| a.get(KUBE2IAM_ROLE_ANNOTATION))
                .map(|v| v.trim())
                .filter(|v| !v.is_empty())
                .map(|v| v.chars().take(MAX_ROLE_ANNOTATION + 1).collect()),
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
    /// The only pod known at the IP has ended (Succeeded, Failed, or deleted with its containers
    /// stopped): its IP may already be someone else's. Not decisive: a new pod may take it.
    Terminal,
}

impl Lookup {
    pub(crate) fn metric_label(&self) -> &'static str {
        match self {
            Lookup::Found(_) => "found",
            Lookup::Unknown => "unknown",
            Lookup::Pending => "pending",
            Lookup::Ambiguous => "ambiguous",
            Lookup::HostNetwork => "host_network",
            Lookup::Terminal => "terminal",
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

/// A sandbox's registration as the index holds it.
#[derive(Debug, Clone)]
struct RegEntry {
    reg: Registration,
    /// The pod as read from the API right after ADD.
    confirmed: Option<Arc<PodInfo>>,
    /// The pod uid this sandbox belongs to, once known (confirmed, or restored from the state
    /// file): a pod of the same name with another uid is a different pod.
    uid: Option<String>,
}

/// What the index knows of one pod, for `explain`.
#[derive(Debug, Clone, Default)]
pub struct PodTrace {
    /// The pod as the watch shows it.
    pub watched: Option<Arc<PodInfo>>,
    /// Its sandboxes registered by the CNI hook.
    pub registrations: Vec<RegTrace>,
}

/// One CNI registration of a pod.
#[derive(Debug, Clone)]
pub struct RegTrace {
    pub container_id: String,
    pub ips: Vec<IpAddr>,
    /// The pod as read from the API right after ADD, once it was.
    pub confirmed: Option<Arc<PodInfo>>,
}

/// A pod that must never match an IP again: its CNI DEL arrived, or a newer ADD took the IP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Revocation {
    pub namespace: String,
    pub name: String,
    /// The revoked pod's uid when it was known (confirmed registration, or the watch showed the
    /// pod at the IP); without it the name alone identifies it.
    pub uid: Option<String>,
    /// Unix seconds.
    pub since: u64,
}

impl Revocation {
    fn matches(&self, p: &PodInfo) -> bool {
        match &self.uid {
            Some(uid) => *uid == p.uid,
            None => self.namespace == p.namespace && self.name == p.name,
        }
    }
}

/// A revocation whose pod the watch no longer shows is dropped after this long: the watch may
/// lag by seconds, an API object being deleted may linger for its grace period, never this long
/// without the watch showing it.
const REVOCATION_TTL: Duration = Duration::from_secs(3600);

/// Revocations kept per IP. Each is a pod that held the IP and whose deletion the watch has not
/// shown yet; a handful is normal even under heavy churn.
const MAX_REVOCATIONS_PER_IP: usize = 64;

#[derive(Default)]
struct State {
    pods: HashMap<String, Arc<PodInfo>>,
    by_ip: HashMap<IpAddr, Vec<String>>,
    by_name: HashMap<PodKey, String>,
    regs: HashMap<String, RegEntry>,
    reg_by_ip: HashMap<IpAddr, Vec<String>>,
    /// Pods whose CNI DEL arrived for the IP (or whose IP a newer ADD took), until the watch shows
    /// that pod gone.
    revoked: HashMap<IpAddr, Vec<Revocation>>,
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

    /// The watch saw `p` go: its revocations have done their job. A name-only revocation goes
    /// only on the IPs `p` held (all of them if the watch never saw it with one), so a same-name
    /// successor's revocation elsewhere stays.
    fn clear_revocations(&mut self, p: &PodInfo) {
        self.revoked.retain(|ip, list| {
            list.retain(|r| match &r.uid {
                Some(uid) => *uid != p.uid,
                None => {
                    !(r.namespace == p.namespace
                        && r.name == p.name
                        && (p.ips.is_empty() || p.ips.contains(ip)))
                }
            });
            !list.is_empty()
        });
    }

    /// Drops revocations older than [`REVOCATION_TTL`] that match no pod the watch shows.
    fn expire_revocations(&mut self, now: u64) {
        let pods = &self.pods;
        self.revoked.retain(|_, list| {
            list.retain(|r| {
                now.saturating_sub(r.since) < REVOCATION_TTL.as_secs()
                    || pods.values().any(|p| r.matches(p))
            });
            !list.is_empty()
        });
    }

    fn is_revoked(&self, ip: IpAddr, p: &PodInfo) -> bool {
        self.revoked
            .get(&ip)
            .is_some_and(|list| list.iter().any(|r| r.matches(p)))
    }

    /// Revokes `entry`'s pod on `ip`, by uid when the registration or the watch knows it.
    fn revoke(&mut self, ip: IpAddr, entry: &RegEntry, now: u64) {
        let uid = entry.uid.clone().or_else(|| {
            self.by_name
                .get(&(entry.reg.namespace.clone(), entry.reg.name.clone()))
                .and_then(|u| self.pods.get(u))
                .filter(|p| p.ips.contains(&ip))
                .map(|p| p.uid.clone())
        });
        let r = Revocation {
            namespace: entry.reg.namespace.clone(),
            name: entry.reg.name.clone(),
            uid,
            since: now,
        };
        let list = self.revoked.entry(ip).or_default();
        if !list
            .iter()
            .any(|x| x.uid == r.uid && x.namespace == r.namespace && x.name == r.name)
        {
            // Bounded: the oldest goes first (its pod is the likeliest to be long gone).
            if list.len() >= MAX_REVOCATIONS_PER_IP {
                list.remove(0);
            }
            list.push(r);
        }
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
            let mut owners: Vec<&RegEntry> = cids.iter().filter_map(|c| self.regs.get(c)).collect();
            owners.dedup_by(|a, b| a.reg.namespace == b.reg.namespace && a.reg.name == b.reg.name);
            if owners.len() > 1 {
                return Lookup::Ambiguous;
            }
            if let Some(entry) = owners.first() {
                let (reg, confirmed) = (&entry.reg, &entry.confirmed);
                // The watched pod of that name counts only if it is this sandbox's pod (uid,
                // when known) and not one revoked on this IP (an older pod of the same name).
                let watched = self
                    .by_name
                    .get(&(reg.namespace.clone(), reg.name.clone()))
                    .and_then(|u| self.pods.get(u))
                    .filter(|w| entry.uid.as_ref().is_none_or(|u| *u == w.uid))
                    .filter(|w| !self.is_revoked(ip, w));
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
        let mut live = uids
            .iter()
            .filter_map(|u| self.pods.get(u))
            .filter(|p| p.live())
            .filter(|p| !self.is_revoked(ip, p));
        match (live.next(), live.next()) {
            (Some(p), None) => Lookup::Found(p.clone()),
            (Some(_), Some(_)) => Lookup::Ambiguous,
            _ if uids
                .iter()
                .filter_map(|u| self.pods.get(u))
                .any(|p| p.terminal && !self.is_revoked(ip, p)) =>
            {
                Lookup::Terminal
            }
            _ => Lookup::Unknown,
        }
    }
}

fn found_if_live(p: &Arc<PodInfo>) -> Lookup {
    if p.host_network {
        Lookup::HostNetwork
    } else if p.terminal {
        Lookup::Terminal
    } else {
        Lookup::Found(p.clone())
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Every decisive answer of one version of the index, for lookups that take no lock.
#[derive(Default)]
struct Snapshot {
    generation: u64,
    /// Hashed with foldhash (seeded per process): read by every request.
    by_ip: HashMap<IpAddr, Lookup, foldhash::fast::RandomState>,
}

/// The node's pods by IP. Cheap to share (`Arc`). Changes take a short lock; requests read an
/// immutable snapshot of the answers, rebuilt after a change by the first request that needs it,
/// so requests from different pods never wait for one another.
pub struct PodIndex {
    state: Mutex<State>,
    changed: tokio::sync::watch::Sender<u64>,
    /// Bumped after every change; a snapshot of an older generation is not used.
    generation: AtomicU64,
    snapshot: ArcSwap<Snapshot>,
    store: OnceLock<state::StateStore>,
}

impl Default for PodIndex {
    fn default() -> Self {
        Self::new()
    }
}

impl PodIndex {
    pub(crate) fn new() -> Self {
        PodIndex {
            state: Mutex::new(State::default()),
            changed: tokio::sync::watch::channel(0).0,
            store: OnceLock::new(),
            generation: AtomicU64::new(1),
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock would be a bug in this module; the state is still
        // consistent per operation, so keep serving rather than poison every request.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn notify(&self) {
        // After the change, so a snapshot built from the state before it is never current.
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// The decisive answer for `ip` from a current snapshot, without a lock.
    fn snapshot_lookup(&self, ip: IpAddr) -> Option<Lookup> {
        self.resolve_now_at(ip).map(|(found, _)| found)
    }

    /// [`resolve_now`](Self::resolve_now) with the generation of the index it was read from:
    /// while [`is_current`](Self::is_current) holds for that generation, nothing changed and the
    /// answer is still the index's (what a kept-alive connection remembers of its caller).
    pub(crate) fn resolve_now_at(&self, ip: IpAddr) -> Option<(Lookup, u64)> {
        let snap = self.snapshot.load();
        if snap.generation != self.generation.load(Ordering::Acquire) {
            return None;
        }
        snap.by_ip
            .get(&ip)
            .map(|found| (found.clone(), snap.generation))
    }

    /// Whether the index is still at `generation`: every change (a pod, a registration, a
    /// revocation) moves it on. One atomic load.
    pub(crate) fn is_current(&self, generation: u64) -> bool {
        self.generation.load(Ordering::Acquire) == generation
    }

    /// Rebuilds the snapshot if a change made it stale. The generation is read before the state,
    /// so a change racing with the rebuild leaves the result stale rather than wrong.
    fn refresh_snapshot(&self) {
        let generation = self.generation.load(Ordering::Acquire);
        if self.snapshot.load().generation == generation {
            return;
        }
        let by_ip = {
            let st = self.lock();
            st.by_ip
                .keys()
                .chain(st.reg_by_ip.keys())
                .filter_map(|ip| {
                    let l = st.lookup(*ip);
                    l.decisive().then_some((*ip, l))
                })
                .collect()
        };
        self.snapshot
            .store(Arc::new(Snapshot { generation, by_ip }));
    }

    /// Adds or updates a pod from the watch.
    pub(crate) fn upsert(&self, info: PodInfo) -> Vec<Change> {
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
    pub(crate) fn remove(&self, uid: &str) -> Option<Arc<PodInfo>> {
        let removed = {
            let mut st = self.lock();
            let p = st.pods.remove(uid)?;
            st.unindex_pod(&p);
            st.clear_revocations(&p);
            st.expire_revocations(unix_now());
            // A DEL that never came (runtime crash, node reboot): the registration of a pod the
            // API has deleted goes with it. Only one confirmed as this very pod: a new pod of
            // the same name may already have registered while the watch lagged.
            let stale: Vec<String> = st
                .regs
                .iter()
                .filter(|(_, e)| e.confirmed.as_ref().is_some_and(|c| c.uid == p.uid))
                .map(|(cid, _)| cid.clone())
                .collect();
            for cid in stale {
                if let Some(e) = st.regs.remove(&cid) {
                    unindex_reg(&mut st, &e.reg);
                }
            }
            Some(p)
        };
        self.notify();
        removed
    }

    /// Replaces the watch's view after a (re)list; returns what appeared and what vanished.
    pub(crate) fn replace_all(&self, pods: Vec<PodInfo>) -> Vec<Change> {
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
        {
            let mut st = self.lock();
            st.expire_revocations(unix_now());
            st.synced = true;
        }
        self.notify();
        changes
    }

    pub(crate) fn is_synced(&self) -> bool {
        self.lock().synced
    }

    pub(crate) fn pod_count(&self) -> usize {
        self.lock().pods.len()
    }

    /// A CNI ADD: the IPs belong to this pod until its DEL. IPAM hands out an address only once
    /// its previous holder is gone, so an ADD supersedes an older registration of the same IP
    /// whose DEL was lost; that older pod is revoked on the IP, exactly as if its DEL had come.
    ///
    /// An ADD never lifts a revocation: a same-name pod (StatefulSet) is a new pod, and the old
    /// one stays refused on its old IP until the watch shows it gone.
    pub(crate) fn register(&self, reg: Registration) {
        self.insert_registration(reg, None);
        self.notify();
    }

    fn insert_registration(&self, reg: Registration, uid: Option<String>) {
        let now = unix_now();
        let mut st = self.lock();
        let key = (reg.namespace.clone(), reg.name.clone());
        if let Some(old) = st.regs.remove(&reg.container_id) {
            unindex_reg(&mut st, &old.reg);
        }
        for ip in &reg.ips {
            let holders: Vec<String> = st.reg_by_ip.get(ip).cloned().unwrap_or_default();
            for cid in holders {
                let Some(old) = st.regs.get_mut(&cid) else {
                    continue;
                };
                old.reg.ips.retain(|i| i != ip);
                let (old_key, empty) = (
                    (old.reg.namespace.clone(), old.reg.name.clone()),
                    old.reg.ips.is_empty(),
                );
                let snapshot = old.clone();
                if empty {
                    st.regs.remove(&cid);
                }
                st.reg_by_ip.remove(ip);
                if old_key != key {
                    st.revoke(*ip, &snapshot, now);
                }
            }
        }
        for ip in &reg.ips {
            st.reg_by_ip
                .entry(*ip)
                .or_default()
                .push(reg.container_id.clone());
        }
        st.regs.insert(
            reg.container_id.clone(),
            RegEntry {
                reg,
                confirmed: None,
                uid,
            },
        );
    }

    /// Records the pod a registration belongs to, as read from the API right after ADD (or
    /// after a restart). Refused when the names differ, or when the sandbox is known to belong
    /// to another uid (a same-name pod created since).
    pub(crate) fn confirm(&self, container_id: &str, info: PodInfo) -> bool {
        let ok = {
            let mut st = self.lock();
            match st.regs.get_mut(container_id) {
                Some(e)
                    if e.reg.namespace == info.namespace
                        && e.reg.name == info.name
                        && e.uid.as_ref().is_none_or(|u| *u == info.uid) =>
                {
                    e.uid = Some(info.uid.clone());
                    e.confirmed = Some(Arc::new(info));
                    true
                }
                _ => false,
            }
        };
        self.notify();
        ok
    }

    /// A CNI DEL: the IPs stop matching this pod at once. Idempotent.
    pub(crate) fn unregister(&self, container_id: &str) -> Option<Registration> {
        let now = unix_now();
        let reg = {
            let mut st = self.lock();
            let entry = st.regs.remove(container_id)?;
            unindex_reg(&mut st, &entry.reg);
            for ip in &entry.reg.ips {
                st.revoke(*ip, &entry, now);
            }
            Some(entry.reg)
        };
        self.notify();
        reg
    }

    /// Drops every registration whose sandbox `keep` rejects (CNI GC), each as by its DEL;
    /// returns how many went.
    pub(crate) fn retain_registrations(&self, keep: impl Fn(&str) -> bool) -> usize {
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

    /// Keeps registrations and revocations in `store` from now on ([`persist`](Self::persist)).
    /// Set once, at start; later calls are ignored.
    pub(crate) fn set_store(&self, store: state::StateStore) {
        let _ = self.store.set(store);
    }

    /// Writes registrations and revocations to the state file, if there is one. Writes are
    /// serialised and each writes the state as it is when its turn comes, so the last write
    /// always holds the latest state.
    pub(crate) async fn persist(&self) -> Result<(), state::StateError> {
        let Some(store) = self.store.get() else {
            return Ok(());
        };
        store.save_with(|| self.snapshot()).await
    }

    /// What the state file keeps: every registration (with its pod uid when known) and every
    /// revocation.
    pub(crate) fn snapshot(&self) -> state::Snapshot {
        let st = self.lock();
        let mut registrations: Vec<state::SavedRegistration> = st
            .regs
            .values()
            .map(|e| state::SavedRegistration {
                container_id: e.reg.container_id.clone(),
                namespace: e.reg.namespace.clone(),
                name: e.reg.name.clone(),
                ips: e.reg.ips.clone(),
                uid: e.uid.clone(),
            })
            .collect();
        registrations.sort_by(|a, b| a.container_id.cmp(&b.container_id));
        let mut revocations: Vec<state::SavedRevocation> = st
            .revoked
            .iter()
            .flat_map(|(ip, list)| {
                list.iter().map(|r| state::SavedRevocation {
                    ip: *ip,
                    namespace: r.namespace.clone(),
                    name: r.name.clone(),
                    uid: r.uid.clone(),
                    since: r.since,
                })
            })
            .collect();
        revocations.sort_by(|a, b| (a.ip, &a.name).cmp(&(b.ip, &b.name)));
        state::Snapshot {
            v: state::STATE_VERSION,
            registrations,
            revocations,
        }
    }

    /// Loads a saved state into an index that has not served yet; returns the registrations,
    /// to be confirmed again against the API.
    pub(crate) fn restore(&self, snap: state::Snapshot) -> Vec<Registration> {
        let mut regs = Vec::with_capacity(snap.registrations.len());
        for r in snap.registrations {
            let reg = Registration {
                container_id: r.container_id,
                namespace: r.namespace,
                name: r.name,
                ips: r.ips,
            };
            self.insert_registration(reg.clone(), r.uid);
            regs.push(reg);
        }
        {
            let mut st = self.lock();
            for r in snap.revocations {
                let list = st.revoked.entry(r.ip).or_default();
                list.push(Revocation {
                    namespace: r.namespace,
                    name: r.name,
                    uid: r.uid,
                    since: r.since,
                });
            }
        }
        self.notify();
        regs
    }

    /// Whether `container_id` is registered with exactly these IPs (CNI CHECK).
    pub(crate) fn is_registered(&self, container_id: &str, ips: &[IpAddr]) -> bool {
        let st = self.lock();
        st.regs.get(container_id).is_some_and(|e| {
            let mut a = e.reg.ips.clone();
            let mut b = ips.to_vec();
            a.sort();
            b.sort();
            a == b
        })
    }

    /// Where the index knows pod `namespace/name` from (the watch, CNI registrations), for an
    /// operator (`explain`); not for requests.
    pub fn trace(&self, namespace: &str, name: &str) -> PodTrace {
        let st = self.lock();
        let watched = st
            .by_name
            .get(&(namespace.to_string(), name.to_string()))
            .and_then(|u| st.pods.get(u))
            .cloned();
        let mut registrations: Vec<RegTrace> = st
            .regs
            .values()
            .filter(|e| e.reg.namespace == namespace && e.reg.name == name)
            .map(|e| RegTrace {
                container_id: e.reg.container_id.clone(),
                ips: e.reg.ips.clone(),
                confirmed: e.confirmed.clone(),
            })
            .collect();
        registrations.sort_by(|a, b| a.container_id.cmp(&b.container_id));
        PodTrace {
            watched,
            registrations,
        }
    }

    /// The pods (namespace, name) the watch or a registration places at `ip`, live or not.
    pub fn holders(&self, ip: IpAddr) -> Vec<(String, String)> {
        let st = self.lock();
        let mut out: Vec<(String, String)> = st
            .by_ip
            .get(&ip)
            .into_iter()
            .flatten()
            .filter_map(|u| st.pods.get(u))
            .map(|p| (p.namespace.clone(), p.name.clone()))
            .chain(
                st.reg_by_ip
                    .get(&ip)
                    .into_iter()
                    .flatten()
                    .filter_map(|c| st.regs.get(c))
                    .map(|e| (e.reg.namespace.clone(), e.reg.name.clone())),
            )
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// The pod currently registered or watched under (namespace, name), if live.
    pub(crate) fn lookup(&self, ip: IpAddr) -> Lookup {
        self.lock().lookup(ip)
    }

    /// The decisive answer for `ip` when the current snapshot has one: no lock, no wait (the
    /// hot path); `None` when [`resolve`](Self::resolve) must look further or wait.
    pub fn resolve_now(&self, ip: IpAddr) -> Option<Lookup> {
        self.snapshot_lookup(ip)
    }

    /// Like [`lookup`](Self::lookup), but waits up to `wait` for an unknown or pending IP to be
    /// resolved by a registration or a watch event.
    pub(crate) async fn resolve(&self, ip: IpAddr, wait: Duration) -> Lookup {
        if let Some(found) = self.snapshot_lookup(ip) {
            return found;
        }
        self.refresh_snapshot();
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

    pub(super) fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    pub(super) fn pod(uid: &str, name: &str, sa: &str, ips: &[&str]) -> PodInfo {
        PodInfo {
            uid: uid.into(),
            namespace: "ns".into(),
            name: name.into(),
            service_account: sa.into(),
            node_name: Some("n1".into()),
            ips: ips.iter().map(|s| ip(s)).collect(),
            host_network: false,
            terminal: false,
            kube2iam_role: None,
        }
    }

    pub(super) fn reg(cid: &str, name: &str, ips: &[&str]) -> Registration {
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
        assert_eq!(idx.lookup(ip("10.0.0.1")), Lookup::Terminal);
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
    fn a_same_name_add_does_not_revive_the_old_pods_ip() {
        let idx = PodIndex::new();
        idx.upsert(pod("u1", "web-0", "sa", &["10.0.0.1"]));
        idx.register(reg("c1", "web-0", &["10.0.0.1"]));
        idx.unregister("c1");
        assert_eq!(idx.lookup(ip("10.0.0.1")), Lookup::Unknown);
        // The StatefulSet's replacement gets a new sandbox and IP while the watch lags.
        idx.register(reg("c2", "web-0", &["10.0.0.2"]));
        assert_eq!(idx.lookup(ip("10.0.0.1")), Lookup::Unknown);
        // Even if the lagging watch shows the old pod again.
        idx.upsert(pod("u1", "web-0", "sa", &["10.0.0.1"]));
        assert_eq!(idx.lookup(ip("10.0.0.1")), Lookup::Unknown);
        // The new pod is not blocked on its own IP, and the old one's removal lifts the old IP's
        // revocation only.
        idx.confirm("c2", pod("u2", "web-0", "sa", &[]));
        assert_eq!(uid_at(&idx, "10.0.0.2").as_deref(), Some("u2"));
        idx.remove("u1");
        assert_eq!(uid_at(&idx, "10.0.0.2").as_deref(), Some("u2"));
    }

    #[test]
    fn an_unconfirmed_del_keeps_the_name_revoked_on_that_ip_only() {
        let idx = PodIndex::new();
        idx.register(reg("c1", "web-0", &["10.0.0.1"]));
        idx.unregister("c1");
        // The watch delivers the older pod object late, with the revoked IP.
        idx.upsert(pod("u1", "web-0", "sa", &["10.0.0.1"]));
        assert_eq!(idx.lookup(ip("10.0.0.1")), Lookup::Unknown);
        // A pod of that name removed elsewhere does not lift it.
        idx.upsert(pod("u0", "web-0", "sa", &["10.0.0.7"]));
        idx.remove("u0");
        assert_eq!(idx.lookup(ip("10.0.0.1")), Lookup::Unknown);
    }

    #[test]
    fn a_deleted_pod_whose_containers_all_stopped_is_terminal() {
        use k8s_openapi::api::core::v1::{
            ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStatus,
            PodSpec, PodStatus,
        };
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
        let make = |deleting: bool, states: &[bool]| Pod {
            metadata: ObjectMeta {
                uid: Some("u1".into()),
                namespace: Some("ns".into()),
                name: Some("p".into()),
                deletion_timestamp: deleting
                    .then_some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some("n1".into()),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                pod_ip: Some("10.0.0.1".into()),
                container_statuses: Some(
                    states
                        .iter()
                        .map(|done| ContainerStatus {
                            name: "c".into(),
                            state: Some(if *done {
                                ContainerState {
                                    terminated: Some(ContainerStateTerminated::default()),
                                    ..Default::default()
                                }
                            } else {
                                ContainerState {
                                    running: Some(ContainerStateRunning::default()),
                                    ..Default::default()
                                }
                            }),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
        };
        let terminal = |deleting, states: &[bool]| {
            PodInfo::from_pod(&make(deleting, states)).unwrap().terminal
        };
        assert!(terminal(true, &[true, true]));
        assert!(
            !terminal(true, &[true, false]),
            "one container still running"
        );
        assert!(
            !terminal(false, &[true, true]),
            "not being deleted (restart policy)"
        );
        assert!(!terminal(true, &[]), "no container status yet");
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

    #[tokio::test]
    async fn requests_see_every_change_at_once() {
        let idx = PodIndex::new();
        let wait = Duration::ZERO;
        let at = |l: Lookup| match l {
            Lookup::Found(p) => Some(p.uid.clone()),
            _ => None,
        };
        idx.upsert(pod("u1", "a", "sa", &["10.0.0.1"]));
        assert_eq!(
            at(idx.resolve(ip("10.0.0.1"), wait).await),
            Some("u1".into())
        );
        // Served from the snapshot now; each change below must still be seen by the next request.
        assert_eq!(
            at(idx.resolve(ip("10.0.0.1"), wait).await),
            Some("u1".into())
        );
        idx.register(reg("c1", "a", &["10.0.0.1"]));
        idx.unregister("c1");
        assert_eq!(
            at(idx.resolve(ip("10.0.0.1"), wait).await),
            None,
            "DEL revokes"
        );
        idx.remove("u1");
        idx.upsert(pod("u2", "b", "sa", &["10.0.0.1"]));
        assert_eq!(
            at(idx.resolve(ip("10.0.0.1"), wait).await),
            Some("u2".into())
        );
        idx.upsert(pod("u3", "c", "sa", &["10.0.0.1"]));
        assert_eq!(
            idx.resolve(ip("10.0.0.1"), wait).await,
            Lookup::Ambiguous,
            "two live pods on one IP"
        );
    }

    #[tokio::test]
    async fn an_answer_is_current_until_the_next_change_of_any_kind() {
        let idx = PodIndex::new();
        let a = ip("10.0.0.1");
        idx.upsert(pod("u1", "a", "sa", &["10.0.0.1"]));
        assert!(idx.resolve_now_at(a).is_none(), "the snapshot is stale");
        idx.resolve(a, Duration::ZERO).await;
        let (found, g) = idx.resolve_now_at(a).unwrap();
        assert!(matches!(found, Lookup::Found(p) if p.uid == "u1"));
        assert!(idx.is_current(g));
        assert!(idx.resolve_now_at(ip("10.0.0.2")).is_none());
        assert!(idx.is_current(g), "a read changes nothing");
        // Every kind of change, even to another pod or address, moves the generation on; an
        // answer remembered at an older one is not used.
        type Step<'a> = (&'a str, &'a dyn Fn(&PodIndex));
        let changes: [Step; 7] = [
            ("another pod", &|i| {
                i.upsert(pod("u9", "z", "sa", &["10.0.0.9"]));
            }),
            ("ADD", &|i| i.register(reg("c1", "a", &["10.0.0.1"]))),
            ("confirm", &|i| {
                i.confirm("c1", pod("u1", "a", "sa", &["10.0.0.1"]));
            }),
            ("DEL", &|i| {
                i.unregister("c1");
            }),
            ("pod gone", &|i| {
                i.remove("u1");
            }),
            ("relist", &|i| {
                i.replace_all(vec![pod("u2", "b", "sa", &["10.0.0.1"])]);
            }),
            ("restore", &|i| {
                i.restore(i.snapshot());
            }),
        ];
        let mut g = g;
        for (what, change) in changes {
            change(&idx);
            assert!(!idx.is_current(g), "{what}");
            idx.resolve(a, Duration::ZERO).await;
            g = match idx.resolve_now_at(a) {
                Some((_, now)) => now,
                None => idx.generation.load(Ordering::Acquire),
            };
            assert!(idx.is_current(g), "{what}");
        }
    }
}

#[cfg(test)]
mod index_tests;
