//! Registrations and revocations kept across agent restarts.
//!
//! The agent's memory is the only place a CNI DEL is remembered while the API still shows the
//! pod; losing it on restart would hand a deleted pod's role to the next holder of its IP. So the
//! index is written to a small JSON file (by default under `/run/irsa-imds`, which survives
//! container restarts but not a node reboot, when every sandbox is gone anyway) after every
//! registration change, atomically: a temporary file beside it, fsync, rename, fsync of the
//! directory. It is read back before the pod watch starts, so before the agent can report ready.
//!
//! A file that cannot be read or does not validate is never applied in part: the agent logs the
//! error, moves the file aside (`<file>.bad`, for inspection) and starts with no saved state,
//! exactly as after a reboot. Readiness still waits for the first pod list, so what the agent
//! then serves is the API's current view; what is lost is only the memory of DELs whose pods the
//! API still shows (seconds, normally).

use std::io::{Read, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::registration;

pub const STATE_VERSION: u32 = 1;
/// A node runs a few hundred sandboxes; a file beyond this is not one the agent wrote.
const MAX_STATE_BYTES: u64 = 16 << 20;
const MAX_ENTRIES: usize = 65_536;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    pub v: u32,
    pub registrations: Vec<SavedRegistration>,
    pub revocations: Vec<SavedRevocation>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SavedRegistration {
    pub container_id: String,
    pub namespace: String,
    pub name: String,
    pub ips: Vec<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SavedRevocation {
    pub ip: IpAddr,
    pub namespace: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    pub since: u64,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum StateError {
    #[error("state file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("state file {path} is not valid: {reason}")]
    Invalid { path: String, reason: String },
}

impl Snapshot {
    /// Parses and checks a state file's bytes; all or nothing.
    pub fn parse(bytes: &[u8]) -> Result<Snapshot, String> {
        let snap: Snapshot = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if snap.v != STATE_VERSION {
            return Err(format!(
                "version {} (this agent reads {STATE_VERSION})",
                snap.v
            ));
        }
        if snap.registrations.len() > MAX_ENTRIES || snap.revocations.len() > MAX_ENTRIES {
            return Err(format!("more than {MAX_ENTRIES} entries"));
        }
        for r in &snap.registrations {
            registration::validate(Some(&r.container_id), &r.namespace, &r.name, &r.ips)
                .map_err(|e| e.to_string())?;
            check_uid(r.uid.as_deref())?;
        }
        for r in &snap.revocations {
            registration::validate(None, &r.namespace, &r.name, &[r.ip])
                .map_err(|e| e.to_string())?;
            check_uid(r.uid.as_deref())?;
        }
        Ok(snap)
    }
}

/// Pod uids are UUIDs; anything else did not come from the API.
fn check_uid(uid: Option<&str>) -> Result<(), String> {
    match uid {
        Some(u)
            if u.is_empty()
                || u.len() > 128
                || !u.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') =>
        {
            Err(format!(
                "{:?} is not a pod uid",
                u.chars().take(40).collect::<String>()
            ))
        }
        _ => Ok(()),
    }
}

/// The state file and the lock that orders writes to it.
pub struct StateStore {
    path: PathBuf,
    write: tokio::sync::Mutex<()>,
}

impl StateStore {
    pub(crate) fn new(path: impl Into<PathBuf>) -> Self {
        StateStore {
            path: path.into(),
            write: tokio::sync::Mutex::new(()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, source: std::io::Error) -> StateError {
        StateError::Io {
            path: self.path.display().to_string(),
            source,
        }
    }

    /// The saved state; `None` when there is no file (first start, or after a reboot).
    pub(crate) fn load(&self) -> Result<Option<Snapshot>, StateError> {
        let f = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.err(e)),
        };
        let mut bytes = Vec::new();
        f.take(MAX_STATE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| self.err(e))?;
        if bytes.len() as u64 > MAX_STATE_BYTES {
            return Err(StateError::Invalid {
                path: self.path.display().to_string(),
                reason: format!("larger than {MAX_STATE_BYTES} bytes"),
            });
        }
        Snapshot::parse(&bytes)
            .map(Some)
            .map_err(|reason| StateError::Invalid {
                path: self.path.display().to_string(),
                reason,
            })
    }

    /// Moves an unusable file out of the way (`<file>.bad`), so the next write starts clean and
    /// the bad one stays for inspection. Returns where it went.
    pub(crate) fn set_aside(&self) -> Option<PathBuf> {
        let mut bad = self.path.clone().into_os_string();
        bad.push(".bad");
        let bad = PathBuf::from(bad);
        std::fs::rename(&self.path, &bad).ok().map(|_| bad)
    }

    /// Writes what `snapshot` returns once this write's turn comes.
    pub(crate) async fn save_with(
        &self,
        snapshot: impl FnOnce() -> Snapshot,
    ) -> Result<(), StateError> {
        let _turn = self.write.lock().await;
        let bytes = serde_json::to_vec(&snapshot()).map_err(|e| StateError::Invalid {
            path: self.path.display().to_string(),
            reason: e.to_string(),
        })?;
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || write_atomic(&path, &bytes))
            .await
            .map_err(|e| self.err(std::io::Error::other(e.to_string())))?
            .map_err(|e| self.err(e))
    }
}

/// Temporary file beside the target, fsync, rename over it, fsync the directory: a reader (the
/// next agent) sees the old file or the new one, never a torn one.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mut tmp = path.to_path_buf().into_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pods::{Lookup, PodIndex, PodInfo, Registration};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn pod(uid: &str, name: &str, ips: &[&str]) -> PodInfo {
        PodInfo {
            uid: uid.into(),
            namespace: "ns".into(),
            name: name.into(),
            service_account: "sa".into(),
            node_name: Some("n1".into()),
            ips: ips.iter().map(|s| ip(s)).collect(),
            host_network: false,
            terminal: false,
            kube2iam_role: None,
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

    fn temp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("irsa-state-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[tokio::test]
    async fn revocations_and_registrations_survive_a_restart() {
        let dir = temp("restart");
        let file = dir.join("state.json");
        let idx = PodIndex::new();
        idx.set_store(StateStore::new(&file));
        idx.upsert(pod("u1", "web-0", &["10.0.0.1"]));
        idx.register(reg("c1", "web-0", &["10.0.0.1"]));
        idx.confirm("c1", pod("u1", "web-0", &[]));
        idx.register(reg("c2", "other", &["10.0.0.2"]));
        idx.unregister("c1");
        idx.persist().await.unwrap();

        // A new agent: the watch still shows web-0 running at 10.0.0.1.
        let again = PodIndex::new();
        let store = StateStore::new(&file);
        let restored = again.restore(store.load().unwrap().unwrap());
        assert_eq!(restored.len(), 1);
        again.upsert(pod("u1", "web-0", &["10.0.0.1"]));
        assert_eq!(again.lookup(ip("10.0.0.1")), Lookup::Unknown);
        assert!(again.is_registered("c2", &[ip("10.0.0.2")]));
        // Its same-name successor registers elsewhere: the old IP stays revoked.
        again.register(reg("c3", "web-0", &["10.0.0.3"]));
        assert_eq!(again.lookup(ip("10.0.0.1")), Lookup::Unknown);
        // Control: without the saved state the old pod would match again.
        let fresh = PodIndex::new();
        fresh.upsert(pod("u1", "web-0", &["10.0.0.1"]));
        assert!(matches!(fresh.lookup(ip("10.0.0.1")), Lookup::Found(_)));
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&file).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_restored_registration_only_confirms_its_own_pod() {
        let idx = PodIndex::new();
        let snap = Snapshot {
            v: STATE_VERSION,
            registrations: vec![SavedRegistration {
                container_id: "c1".into(),
                namespace: "ns".into(),
                name: "web-0".into(),
                ips: vec![ip("10.0.0.1")],
                uid: Some("u1".into()),
            }],
            revocations: vec![],
        };
        idx.restore(snap);
        // The API now has another pod of that name: it is not this sandbox's.
        idx.upsert(pod("u2", "web-0", &["10.0.0.1"]));
        assert_eq!(idx.lookup(ip("10.0.0.1")), Lookup::Pending);
        assert!(!idx.confirm("c1", pod("u2", "web-0", &[])));
        assert!(idx.confirm("c1", pod("u1", "web-0", &[])));
        assert!(matches!(idx.lookup(ip("10.0.0.1")), Lookup::Found(p) if p.uid == "u1"));
    }

    #[test]
    fn bad_files_are_refused_whole_with_a_reason() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "EOF"),
            (b"{", "EOF"),
            (br#"{"v":2,"registrations":[],"revocations":[]}"#, "version 2"),
            (br#"{"v":1,"registrations":[],"revocations":[],"x":1}"#, "unknown field"),
            (
                br#"{"v":1,"registrations":[{"containerId":"../x","namespace":"ns","name":"a","ips":["10.0.0.1"]}],"revocations":[]}"#,
                "containerId",
            ),
            (
                br#"{"v":1,"registrations":[{"containerId":"c","namespace":"NS","name":"a","ips":["10.0.0.1"]}],"revocations":[]}"#,
                "namespace",
            ),
            (
                br#"{"v":1,"registrations":[],"revocations":[{"ip":"0.0.0.0","namespace":"ns","name":"a","since":1}]}"#,
                "ips",
            ),
            (
                br#"{"v":1,"registrations":[],"revocations":[{"ip":"10.0.0.1","namespace":"ns","name":"a","uid":"x\ny","since":1}]}"#,
                "pod uid",
            ),
        ];
        for (bytes, want) in cases {
            let err = Snapshot::parse(bytes).unwrap_err();
            assert!(
                err.contains(want),
                "{:?}: {err}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn an_unreadable_file_is_an_error_and_can_be_set_aside() {
        let dir = temp("bad");
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("state.json");
        std::fs::write(&file, b"{\"v\":1,\"registrations\":[").unwrap();
        let store = StateStore::new(&file);
        let err = store.load().unwrap_err().to_string();
        assert!(
            err.contains("state.json") && err.contains("not valid"),
            "{err}"
        );
        let bad = store.set_aside().unwrap();
        assert!(bad.ends_with("state.json.bad") && bad.exists());
        assert!(store.load().unwrap().is_none(), "nothing left to load");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_file_that_cannot_be_opened_is_an_error_not_a_fresh_start() {
        // Only a missing file means "nothing saved"; any other failure to open it would, taken as
        // a fresh start, forget the DELs it holds.
        let dir = temp("unopenable");
        std::fs::create_dir_all(&dir).unwrap();
        let not_a_dir = dir.join("file");
        std::fs::write(&not_a_dir, b"").unwrap();
        let store = StateStore::new(not_a_dir.join("state.json"));
        let err = store.load().unwrap_err();
        assert!(matches!(err, StateError::Io { .. }), "{err}");
        assert!(err.to_string().contains("file/state.json"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_file_at_the_size_limit_is_read_and_one_byte_more_is_refused() {
        let dir = temp("size");
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("state.json");
        let store = StateStore::new(&file);
        // A valid snapshot padded with trailing whitespace (still valid JSON) to the exact size.
        let padded = |len: u64| {
            let mut b = br#"{"v":1,"registrations":[],"revocations":[]}"#.to_vec();
            b.resize(usize::try_from(len).unwrap(), b' ');
            b
        };
        std::fs::write(&file, padded(MAX_STATE_BYTES)).unwrap();
        let snap = store
            .load()
            .unwrap()
            .expect("a file of exactly the limit loads");
        assert_eq!(snap.v, STATE_VERSION);
        std::fs::write(&file, padded(MAX_STATE_BYTES + 1)).unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(err.contains("larger than 16777216 bytes"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn entry_counts_up_to_the_limit_are_read_and_one_more_is_refused() {
        let registration = SavedRegistration {
            container_id: "c1".into(),
            namespace: "ns".into(),
            name: "web-0".into(),
            ips: vec![ip("10.0.0.1")],
            uid: None,
        };
        let revocation = SavedRevocation {
            ip: ip("10.0.0.1"),
            namespace: "ns".into(),
            name: "web-0".into(),
            uid: None,
            since: 1,
        };
        let parse = |registrations: usize, revocations: usize| {
            let snap = Snapshot {
                v: STATE_VERSION,
                registrations: vec![registration.clone(); registrations],
                revocations: vec![revocation.clone(); revocations],
            };
            Snapshot::parse(&serde_json::to_vec(&snap).unwrap())
        };
        // Each list is bounded on its own.
        for (registrations, revocations) in [(MAX_ENTRIES, 0), (0, MAX_ENTRIES)] {
            let snap = parse(registrations, revocations).unwrap();
            assert_eq!(
                (snap.registrations.len(), snap.revocations.len()),
                (registrations, revocations)
            );
        }
        for (registrations, revocations) in [(MAX_ENTRIES + 1, 0), (0, MAX_ENTRIES + 1)] {
            let err = parse(registrations, revocations).unwrap_err();
            assert!(err.contains("more than 65536 entries"), "{err}");
        }
    }

    #[test]
    fn uids_are_checked_at_their_bounds() {
        assert_eq!(check_uid(None), Ok(()));
        assert_eq!(
            check_uid(Some("3f2c0e4a-9b1d-4c7e-8a55-0d6b2f9e1c37")),
            Ok(())
        );
        assert_eq!(check_uid(Some(&"a".repeat(128))), Ok(()));
        for bad in [String::new(), "a".repeat(129), "a_b".into(), "a b".into()] {
            let err = check_uid(Some(&bad)).unwrap_err();
            assert!(err.contains("is not a pod uid"), "{bad:?}: {err}");
        }
    }
}
