//! The CNI hook's registration socket: the agent's side of `irsa-imds-proto`.
//!
//! Unix stream socket, root only (mode 0600, and the peer's uid checked). One request per
//! connection, at most [`MAX_MESSAGE`] bytes, read within [`READ_TIMEOUT`]; the message, its
//! version and its validators are the proto crate's, shared with the plugin.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use irsa_imds_proto::{
    MAX_MESSAGE, ProtoError, Request, Response, check_container_id, check_namespace,
    check_pod_name, parse_ips,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use super::{PodIndex, Registration};

/// The plugin runs inside the runtime's sandbox setup; a slow or stuck client must not hold a task.
pub const READ_TIMEOUT: Duration = Duration::from_secs(2);

/// What a valid request asks the index to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Add(Registration),
    Del {
        container_id: String,
    },
    Check {
        container_id: String,
        ips: Vec<IpAddr>,
    },
    /// CNI GC: every registration whose sandbox is not in `valid` is dropped, as by a DEL.
    Gc {
        valid: Vec<String>,
    },
}

impl Op {
    pub(crate) fn metric_label(&self) -> &'static str {
        match self {
            Op::Add(_) => "add",
            Op::Del { .. } => "del",
            Op::Check { .. } => "check",
            Op::Gc { .. } => "gc",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegistrationError {
    #[error(transparent)]
    Proto(#[from] ProtoError),
    #[error("sandbox {0} is not registered with these IPs")]
    NotRegistered(String),
    #[error("peer uid {0} may not register pods (only root or the agent's own user)")]
    Forbidden(u32),
}

/// Decodes and validates one request line. Pure, so hostile input is unit-tested.
pub fn parse(line: &[u8]) -> Result<Op, RegistrationError> {
    let req = Request::decode(line)?;
    req.validate()?;
    Ok(match req {
        Request::Add(add) => Op::Add(Registration {
            ips: parse_ips(&add.ips)?,
            container_id: add.container_id,
            namespace: add.namespace,
            name: add.name,
        }),
        Request::Del { container_id } => Op::Del { container_id },
        Request::Check { container_id, ips } => Op::Check {
            ips: parse_ips(&ips)?,
            container_id,
        },
        Request::Gc { valid } => Op::Gc { valid },
    })
}

/// The checks an ADD passes, for registrations read back from the state file.
pub(crate) fn validate(
    container_id: Option<&str>,
    namespace: &str,
    name: &str,
    ips: &[IpAddr],
) -> Result<(), RegistrationError> {
    if let Some(id) = container_id {
        check_container_id(id)?;
    }
    check_namespace(namespace)?;
    check_pod_name(name)?;
    let raw: Vec<String> = ips.iter().map(IpAddr::to_string).collect();
    if parse_ips(&raw)?.is_empty() {
        return Err(ProtoError::Invalid {
            field: "ips",
            reason: "at least one IP is needed".into(),
        }
        .into());
    }
    Ok(())
}

/// Binds the socket, replacing a stale one from a previous run, readable by root only.
pub(crate) fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Applies a valid op to the index. `on_add` hears new registrations (the agent confirms the
/// pod with a direct read and prefetches its credentials).
pub(crate) fn apply(index: &PodIndex, op: &Op) -> Result<(), RegistrationError> {
    match op {
        Op::Add(reg) => {
            index.register(reg.clone());
            Ok(())
        }
        Op::Del { container_id } => {
            index.unregister(container_id);
            Ok(())
        }
        Op::Check { container_id, ips } => {
            if index.is_registered(container_id, ips) {
                Ok(())
            } else {
                Err(RegistrationError::NotRegistered(container_id.clone()))
            }
        }
        Op::Gc { valid } => {
            let valid: std::collections::HashSet<&str> = valid.iter().map(String::as_str).collect();
            let dropped = index.retain_registrations(|cid| valid.contains(cid));
            if dropped > 0 {
                tracing::info!(dropped, "cni gc dropped stale registrations");
            }
            Ok(())
        }
    }
}

/// Hears every op and whether it was applied (metrics, and the agent's confirm-and-prefetch).
pub(crate) type OpHook = Arc<dyn Fn(&Op, bool) + Send + Sync>;

/// Serves registrations until `shutdown`; removes the socket file on the way out.
pub(crate) async fn serve(
    listener: UnixListener,
    path: PathBuf,
    index: Arc<PodIndex>,
    on_op: OpHook,
    shutdown: CancellationToken,
) {
    loop {
        let conn = tokio::select! {
            _ = shutdown.cancelled() => break,
            c = listener.accept() => c,
        };
        match conn {
            Ok((stream, _)) => {
                let index = index.clone();
                let on_op = on_op.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, &index, &*on_op).await {
                        tracing::debug!(error = %e, "registration connection failed");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "registration socket accept failed");
                // Out of file descriptors and the like: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let _ = std::fs::remove_file(&path);
}

async fn handle(
    stream: UnixStream,
    index: &PodIndex,
    on_op: &(dyn Fn(&Op, bool) + Send + Sync),
) -> std::io::Result<()> {
    // Defence in depth beside the socket's 0600 mode.
    let peer = stream.peer_cred().map(|c| c.uid()).unwrap_or(u32::MAX);
    let own = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap_or(0);
    let allowed = peer_allowed(peer, own);
    let (r, mut w) = stream.into_split();
    let mut reader = BufReader::new(r);
    let mut line = Vec::new();
    let read = tokio::time::timeout(
        READ_TIMEOUT,
        (&mut reader)
            .take(MAX_MESSAGE + 1)
            .read_until(b'\n', &mut line),
    )
    .await;
    let unread_rest = matches!(read, Ok(Ok(_))) && !line.ends_with(b"\n") && !line.is_empty();
    let result = match read {
        Err(_) => Err(ProtoError::Malformed("timed out reading the request".into()).into()),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(_)) if line.len() as u64 > MAX_MESSAGE => {
            Err(ProtoError::Malformed(format!("request larger than {MAX_MESSAGE} bytes")).into())
        }
        Ok(Ok(_)) if !allowed => Err(RegistrationError::Forbidden(peer)),
        Ok(Ok(_)) => parse(line.strip_suffix(b"\n").unwrap_or(&line)).and_then(|op| {
            let r = apply(index, &op);
            on_op(&op, r.is_ok());
            r.map(|_| op)
        }),
    };
    // On disk before the runtime hears "done": once a DEL is answered the IP may be handed out
    // again, and the revocation must outlive an agent restart.
    if let Ok(op) = &result
        && !matches!(op, Op::Check { .. })
        && let Err(e) = index.persist().await
    {
        tracing::error!(error = %e, "cannot save registrations; they will not survive a restart");
    }
    let resp = match &result {
        Ok(op) => {
            tracing::debug!(op = op.metric_label(), "registration applied");
            Response::ok()
        }
        Err(e) => {
            tracing::warn!(error = %e, "registration refused");
            Response::refused(e.to_string())
        }
    };
    w.write_all(&resp.encode()).await?;
    if unread_rest {
        // An oversized request: the client is still writing it and reads the answer only after.
        // Closing now would fail its write (a reset instead of the error above); swallow the rest
        // of its line, bounded in bytes and time, so it gets to read why it was refused.
        let _ = tokio::time::timeout(READ_TIMEOUT, discard_line(&mut reader, MAX_DISCARD)).await;
    }
    w.shutdown().await
}

/// Whether a peer may speak: root (the runtime running the CNI hook) or the agent's own user.
fn peer_allowed(peer: u32, own: u32) -> bool {
    peer == 0 || peer == own
}

/// How much of an oversized request is read and dropped so its sender sees the answer.
const MAX_DISCARD: u64 = 16 << 20;

async fn discard_line(
    r: &mut (impl tokio::io::AsyncBufRead + Unpin),
    max: u64,
) -> std::io::Result<()> {
    let mut left = max;
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            return Ok(());
        }
        if let Some(i) = buf.iter().position(|b| *b == b'\n') {
            r.consume(i + 1);
            return Ok(());
        }
        let n = buf.len();
        r.consume(n);
        left = left.saturating_sub(n as u64);
        if left == 0 {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_parses_and_normalises_ips() {
        let op = parse(br#"{"v":1,"op":"add","containerId":"abc123","namespace":"ns","name":"p-1","ips":["10.0.0.1","::ffff:10.0.0.2","10.0.0.1"]}"#).unwrap();
        let Op::Add(r) = op else { panic!("not add") };
        assert_eq!(
            r.ips,
            vec![
                "10.0.0.1".parse::<IpAddr>().unwrap(),
                "10.0.0.2".parse().unwrap()
            ]
        );
    }

    #[test]
    fn hostile_requests_get_clear_errors() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "malformed"),
            (b"{", "malformed"),
            (b"[]", "malformed"),
            (br#"{"v":2,"op":"add","containerId":"a"}"#, "unsupported protocol version 2"),
            (br#"{"v":1,"op":"boom","containerId":"a"}"#, "unknown op"),
            (br#"{"v":1,"op":"del","containerId":""}"#, "invalid containerId"),
            (br#"{"v":1,"op":"del","containerId":"../../etc"}"#, "invalid containerId"),
            (br#"{"v":1,"op":"add","containerId":"a","namespace":"NS","name":"p","ips":["10.0.0.1"]}"#, "invalid namespace"),
            (br#"{"v":1,"op":"add","containerId":"a","namespace":"ns","name":"p","ips":[]}"#, "invalid ips"),
            (br#"{"v":1,"op":"add","containerId":"a","namespace":"ns","name":"p","ips":["0.0.0.0"]}"#, "invalid ips"),
            (br#"{"v":1,"op":"add","containerId":"a","namespace":"ns","name":"p","ips":["224.0.0.1"]}"#, "invalid ips"),
            (br#"{"v":1,"op":"add","containerId":"a","namespace":"ns","name":"p","ips":["999.1.1.1"]}"#, "invalid ips"),
            (br#"{"v":1,"op":"add","containerId":"a","namespace":"ns","ips":["10.0.0.1"]}"#, "invalid name"),
            (br#"{"v":1,"op":"del","containerId":"a","extra":1}"#, "malformed"),
        ];
        for (input, want) in cases {
            let err = parse(input).unwrap_err().to_string();
            assert!(
                err.contains(want),
                "{:?}: {err}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn gc_drops_registrations_of_sandboxes_no_longer_valid() {
        let index = PodIndex::new();
        for (cid, ip) in [("c1", "10.1.0.1"), ("c2", "10.1.0.2"), ("c3", "10.1.0.3")] {
            let line = format!(
                r#"{{"v":1,"op":"add","containerId":"{cid}","namespace":"ns","name":"p-{cid}","ips":["{ip}"]}}"#
            );
            apply(&index, &parse(line.as_bytes()).unwrap()).unwrap();
        }
        let gc = parse(br#"{"v":1,"op":"gc","valid":["c2"]}"#).unwrap();
        apply(&index, &gc).unwrap();
        assert!(index.is_registered("c2", &["10.1.0.2".parse().unwrap()]));
        for (cid, ip) in [("c1", "10.1.0.1"), ("c3", "10.1.0.3")] {
            assert!(!index.is_registered(cid, &[ip.parse().unwrap()]), "{cid}");
            assert_eq!(
                index.lookup(ip.parse().unwrap()),
                super::super::Lookup::Unknown
            );
        }
        assert!(parse(br#"{"v":1,"op":"gc"}"#).is_err(), "gc without a list");
        assert!(parse(br#"{"v":1,"op":"gc","valid":["../x"]}"#).is_err());
    }

    #[test]
    fn each_op_counts_under_its_protocol_name() {
        let lines: [&[u8]; 4] = [
            br#"{"v":1,"op":"add","containerId":"c1","namespace":"ns","name":"p","ips":["10.1.0.1"]}"#,
            br#"{"v":1,"op":"del","containerId":"c1"}"#,
            br#"{"v":1,"op":"check","containerId":"c1","ips":["10.1.0.1"]}"#,
            br#"{"v":1,"op":"gc","valid":[]}"#,
        ];
        for line in lines {
            let op = parse(line).unwrap();
            let sent: serde_json::Value = serde_json::from_slice(line).unwrap();
            assert_eq!(op.metric_label(), sent["op"], "{op:?}");
        }
    }

    #[test]
    fn only_root_or_the_agents_own_user_may_register() {
        // (peer, agent's own uid, allowed)
        let cases = [
            (0, 0, true),
            (0, 999, true),
            (999, 999, true),
            (65534, 0, false),
            (65534, 999, false),
        ];
        for (peer, own, want) in cases {
            assert_eq!(peer_allowed(peer, own), want, "peer {peer}, agent {own}");
        }
    }

    /// A stale path that cannot be removed is reported as what it is, not as "address in use".
    #[tokio::test]
    async fn bind_reports_a_socket_path_it_cannot_clear() {
        let dir = std::env::temp_dir().join(format!("irsa-bind-{}", std::process::id()));
        let path = dir.join("cni.sock");
        std::fs::create_dir_all(path.join("occupied")).unwrap();
        let err = bind(&path).unwrap_err();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(err.kind(), std::io::ErrorKind::IsADirectory, "{err}");
    }

    /// One connection straight through `handle`, on a socket pair (the peer is this process).
    /// The client keeps its end open while it reads, as the plugin does.
    async fn exchange(index: &PodIndex, request: &[u8]) -> String {
        let (server, mut client) = UnixStream::pair().unwrap();
        let (served, reply) = tokio::join!(handle(server, index, &|_: &Op, _| {}), async {
            client.write_all(request).await.unwrap();
            let mut out = String::new();
            client.read_to_string(&mut out).await.unwrap();
            out
        });
        served.unwrap();
        reply
    }

    const OK: &str = "{\"v\":1,\"ok\":true}\n";

    /// A whole line is answered and the connection closed at once: nothing waits for bytes the
    /// client will never send. (Paused clock: it only moves when every task waits on a timer.)
    #[tokio::test(start_paused = true)]
    async fn a_complete_request_is_answered_without_waiting_for_more() {
        let index = PodIndex::new();
        let started = tokio::time::Instant::now();
        let reply = exchange(&index, b"{\"v\":1,\"op\":\"del\",\"containerId\":\"c1\"}\n").await;
        assert_eq!(reply, OK);
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "the connection waited for more of the request"
        );
    }

    /// MAX_MESSAGE counts the newline: a line of exactly that many bytes is served, one more is
    /// refused.
    #[tokio::test]
    async fn a_request_of_exactly_the_limit_is_served_one_byte_more_is_refused() {
        let index = PodIndex::new();
        let padded = |len: usize| {
            let mut m = br#"{"v":1,"op":"del","containerId":"c1"}"#.to_vec();
            m.resize(len - 1, b' ');
            m.push(b'\n');
            m
        };
        let max = usize::try_from(MAX_MESSAGE).unwrap();
        assert_eq!(exchange(&index, &padded(max)).await, OK);
        let reply = exchange(&index, &padded(max + 1)).await;
        assert!(
            reply.contains("\"ok\":false") && reply.contains("larger than"),
            "{reply}"
        );
    }

    /// ADD, DEL and GC are in the state file before the runtime hears "done" (a DEL's revocation
    /// must outlive a restart once the IP may be handed out again); a CHECK writes nothing.
    #[tokio::test]
    async fn every_change_is_saved_before_it_is_answered() {
        let dir = std::env::temp_dir().join(format!("irsa-persist-{}", std::process::id()));
        let path = dir.join("state.json");
        let index = PodIndex::new();
        index.set_store(super::super::state::StateStore::new(&path));
        let saved = || {
            super::super::state::StateStore::new(&path)
                .load()
                .unwrap()
                .map(|s| {
                    s.registrations
                        .into_iter()
                        .map(|r| r.container_id)
                        .collect::<Vec<_>>()
                })
        };
        let add = |cid: &str, ip: &str| {
            format!(
                r#"{{"v":1,"op":"add","containerId":"{cid}","namespace":"ns","name":"p-{cid}","ips":["{ip}"]}}"#
            ) + "\n"
        };
        assert_eq!(exchange(&index, add("c1", "10.1.0.7").as_bytes()).await, OK);
        assert_eq!(exchange(&index, add("c2", "10.1.0.8").as_bytes()).await, OK);
        assert_eq!(saved(), Some(vec!["c1".to_string(), "c2".to_string()]));
        std::fs::remove_file(&path).unwrap();
        let check = "{\"v\":1,\"op\":\"check\",\"containerId\":\"c1\",\"ips\":[\"10.1.0.7\"]}\n";
        assert_eq!(exchange(&index, check.as_bytes()).await, OK);
        assert_eq!(saved(), None, "a CHECK wrote the state file");
        let del = "{\"v\":1,\"op\":\"del\",\"containerId\":\"c1\"}\n";
        assert_eq!(exchange(&index, del.as_bytes()).await, OK);
        assert_eq!(saved(), Some(vec!["c2".to_string()]));
        let gc = "{\"v\":1,\"op\":\"gc\",\"valid\":[]}\n";
        assert_eq!(exchange(&index, gc.as_bytes()).await, OK);
        assert_eq!(saved(), Some(vec![]));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A registration socket served from a directory of its own, as the agent serves it.
    struct Socket {
        dir: PathBuf,
        path: PathBuf,
        index: Arc<PodIndex>,
        stop: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    impl Socket {
        fn start(tag: &str) -> Socket {
            let dir = std::env::temp_dir().join(format!("irsa-{tag}-{}", std::process::id()));
            let path = dir.join("cni.sock");
            let listener = bind(&path).unwrap();
            let index = Arc::new(PodIndex::new());
            let stop = CancellationToken::new();
            let task = tokio::spawn(serve(
                listener,
                path.clone(),
                index.clone(),
                Arc::new(|_: &Op, _| {}),
                stop.clone(),
            ));
            Socket {
                dir,
                path,
                index,
                stop,
                task,
            }
        }

        /// Stops serving (the socket file goes) and removes the directory.
        async fn shut_down(self) {
            self.stop.cancel();
            self.task.await.unwrap();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[tokio::test]
    async fn socket_round_trip_registers_and_unregisters() {
        let sock = Socket::start("reg");
        let (path, index) = (sock.path.clone(), sock.index.clone());

        async fn send(path: &Path, msg: &str) -> String {
            let mut s = UnixStream::connect(path).await.unwrap();
            s.write_all(msg.as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        }
        let add = r#"{"v":1,"op":"add","containerId":"c1","namespace":"ns","name":"p","ips":["10.1.0.5"]}"#;
        assert_eq!(
            send(&path, &format!("{add}\n")).await,
            "{\"v\":1,\"ok\":true}\n"
        );
        assert_eq!(
            index.lookup("10.1.0.5".parse().unwrap()),
            super::super::Lookup::Pending
        );
        let check = r#"{"v":1,"op":"check","containerId":"c1","ips":["10.1.0.5"]}"#;
        assert!(
            send(&path, &format!("{check}\n"))
                .await
                .contains("\"ok\":true")
        );
        assert!(send(&path, "garbage\n").await.contains("\"ok\":false"));
        let del = r#"{"v":1,"op":"del","containerId":"c1"}"#;
        assert!(
            send(&path, &format!("{del}\n"))
                .await
                .contains("\"ok\":true")
        );
        assert!(
            send(&path, &format!("{del}\n"))
                .await
                .contains("\"ok\":true"),
            "DEL is idempotent"
        );
        assert_eq!(
            index.lookup("10.1.0.5".parse().unwrap()),
            super::super::Lookup::Unknown
        );
        let mode = std::fs::metadata(&path)
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()))
            .unwrap();
        assert_eq!(mode & 0o777, 0o600);
        sock.shut_down().await;
        assert!(!path.exists(), "socket removed on shutdown");
    }

    #[tokio::test]
    async fn an_oversized_request_gets_the_json_error_not_a_reset() {
        let sock = Socket::start("big");
        // What the plugin does: write the whole line, then read the answer.
        let p2 = sock.path.clone();
        let reply = tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut s = std::os::unix::net::UnixStream::connect(&p2).unwrap();
            let mut msg = br#"{"v":1,"op":"gc","valid":[""#.to_vec();
            msg.extend(std::iter::repeat_n(b'a', 4 * MAX_MESSAGE as usize));
            msg.extend_from_slice(b"\"]}\n");
            s.write_all(&msg).map_err(|e| e.to_string())?;
            let mut out = String::new();
            s.read_to_string(&mut out).map_err(|e| e.to_string())?;
            Ok::<_, String>(out)
        })
        .await
        .unwrap();
        let reply = reply.expect("answered, not reset");
        assert!(
            reply.contains("\"ok\":false") && reply.contains("larger than"),
            "{reply}"
        );
        sock.shut_down().await;
    }

    /// Defence in depth: even with the socket opened up, a non-root peer is refused.
    #[tokio::test]
    async fn non_root_peers_are_refused() {
        let root = std::fs::metadata("/proc/self")
            .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
            .unwrap_or(1)
            == 0;
        if !root
            || !Path::new("/usr/bin/setpriv").exists()
            || !Path::new("/usr/bin/python3").exists()
        {
            // Skipping is only for a developer's unprivileged run: CI must run it.
            let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false");
            assert!(
                !ci,
                "CI is set but this test cannot run: it needs root, /usr/bin/setpriv and /usr/bin/python3"
            );
            eprintln!("skipped: needs root, setpriv and /usr/bin/python3");
            return;
        }
        use std::os::unix::fs::PermissionsExt;
        let sock = Socket::start("peer");
        let (path, index) = (sock.path.clone(), sock.index.clone());
        std::fs::set_permissions(&sock.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let script = "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\ns.sendall(sys.argv[2].encode()+b'\\n')\nprint(s.recv(4096).decode())";
        let add = r#"{"v":1,"op":"add","containerId":"c1","namespace":"ns","name":"p","ips":["10.1.0.9"]}"#;
        let out = tokio::process::Command::new("/usr/bin/setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "/usr/bin/python3",
                "-c",
                script,
            ])
            .arg(&path)
            .arg(add)
            .output()
            .await
            .unwrap();
        let reply = String::from_utf8_lossy(&out.stdout);
        assert!(
            reply.contains("\"ok\":false") && reply.contains("peer uid 65534"),
            "{reply} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            index.lookup("10.1.0.9".parse().unwrap()),
            super::super::Lookup::Unknown,
            "nothing registered"
        );
        sock.shut_down().await;
    }
}
