//! The explain socket's serving side: a root-only unix socket (mode 0600, peer uid checked like
//! the registration socket) where `irsa-imds-agent explain` asks what the agent knows of a pod.
//! The report follows a request's path: identification by address (watch and CNI
//! registrations), the ServiceAccount, the role and where it came from, the cached credentials'
//! times, the last STS error, what the pod is answered, and the node's rule and chain. It names
//! no access key, secret or token.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use super::agent::Agent;
use crate::explain::{ERROR_PREFIX, MAX_REQUEST, TIMEOUT, Target};
use crate::identity::roles::{RoleGrant, RoleSource};
use crate::imds::respond::Refusal;
use crate::imds::wire::timestamp;
use crate::pods::{Lookup, PodInfo};

/// Only root, or the agent's own user, may ask: the report names pods and roles.
fn peer_allowed(peer: u32, own: u32) -> bool {
    peer == 0 || peer == own
}

/// Serves explain requests until `stop`; removes the socket file on the way out.
pub(super) async fn serve(
    listener: UnixListener,
    path: PathBuf,
    agent: Arc<Agent>,
    stop: CancellationToken,
) {
    loop {
        let conn = tokio::select! {
            _ = stop.cancelled() => break,
            c = listener.accept() => c,
        };
        match conn {
            Ok((stream, _)) => {
                let agent = agent.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, &agent).await {
                        tracing::debug!(error = %e, "explain connection failed");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "explain socket accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let _ = std::fs::remove_file(&path);
}

async fn handle(stream: UnixStream, agent: &Agent) -> std::io::Result<()> {
    let peer = stream.peer_cred().map(|c| c.uid()).unwrap_or(u32::MAX);
    let own = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap_or(0);
    let (r, mut w) = stream.into_split();
    let mut line = Vec::new();
    let read = tokio::time::timeout(
        TIMEOUT,
        BufReader::new(r)
            .take(MAX_REQUEST as u64 + 1)
            .read_until(b'\n', &mut line),
    )
    .await;
    let answer = match read {
        Err(_) => Err("timed out reading the request".to_string()),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(_)) if !peer_allowed(peer, own) => Err(format!(
            "peer uid {peer} may not ask (only root or the agent's own user)"
        )),
        Ok(Ok(_)) if line.len() > MAX_REQUEST => {
            Err(format!("request longer than {MAX_REQUEST} bytes"))
        }
        Ok(Ok(_)) => match std::str::from_utf8(line.strip_suffix(b"\n").unwrap_or(&line)) {
            Err(_) => Err("request is not UTF-8".to_string()),
            Ok(text) => match Target::parse(text) {
                Ok(target) => Ok(report(agent, &target).await),
                Err(e) => Err(e.to_string()),
            },
        },
    };
    let out = match answer {
        Ok(report) => report,
        Err(why) => {
            tracing::info!(reason = %why, "explain request refused");
            format!("{ERROR_PREFIX}{why}\n")
        }
    };
    w.write_all(out.as_bytes()).await?;
    w.shutdown().await
}

/// The report for `target`. Every line is built from what the agent holds; the only API call is
/// the role resolution the IMDS path would make (a cached ServiceAccount read).
async fn report(agent: &Agent, target: &Target) -> String {
    let mut out = String::new();
    let now = agent.clock.now();
    let _ = writeln!(out, "irsa-imds explain {target} (node {})", agent.node());
    let pod: Option<Arc<PodInfo>> = match target {
        Target::Ip(ip) => explain_ip(agent, *ip, &mut out),
        Target::Pod { namespace, name } => explain_pod(agent, namespace, name, &mut out),
    };
    if let Some(pod) = pod {
        explain_role(agent, &pod, now, &mut out).await;
    }
    node_state(agent, &mut out);
    out
}

fn lookup_words(l: &Lookup) -> String {
    match l {
        Lookup::Found(p) => format!("identified as {}/{}", p.namespace, p.name),
        Lookup::Unknown => "unknown source: no pod of this node has this address".into(),
        Lookup::Pending => {
            "registered by the CNI hook, not yet confirmed by the API (requests wait, then 404)"
                .into()
        }
        Lookup::Ambiguous => "refused: two live pods claim this address".into(),
        Lookup::HostNetwork => "refused: the node's own address (hostNetwork pods)".into(),
        Lookup::Terminal => "refused: the pod at this address has ended".into(),
    }
}

fn explain_ip(agent: &Agent, ip: IpAddr, out: &mut String) -> Option<Arc<PodInfo>> {
    let lookup = agent.index.lookup(ip);
    let _ = writeln!(out, "address {ip}: {}", lookup_words(&lookup));
    let holders = agent.index.holders(ip);
    if !holders.is_empty() {
        let names: Vec<String> = holders.iter().map(|(n, p)| format!("{n}/{p}")).collect();
        let _ = writeln!(
            out,
            "  pods the watch or the CNI hook place here: {}",
            names.join(", ")
        );
    }
    if let Some(reason) = lookup_refusal(&lookup) {
        let _ = writeln!(
            out,
            "answer: 404 for credentials (reason {}: {})",
            reason.metric_label(),
            reason.describe()
        );
    }
    match lookup {
        Lookup::Found(p) => {
            describe_pod(agent, &p.namespace, &p.name, out);
            Some(p)
        }
        _ => None,
    }
}

fn lookup_refusal(l: &Lookup) -> Option<Refusal> {
    match l {
        Lookup::Found(_) => None,
        Lookup::Unknown | Lookup::Pending => Some(Refusal::UnknownSource),
        Lookup::Ambiguous => Some(Refusal::Ambiguous),
        Lookup::HostNetwork => Some(Refusal::HostNetwork),
        Lookup::Terminal => Some(Refusal::Terminal),
    }
}

fn explain_pod(
    agent: &Agent,
    namespace: &str,
    name: &str,
    out: &mut String,
) -> Option<Arc<PodInfo>> {
    let pod = describe_pod(agent, namespace, name, out);
    let Some(pod) = pod else {
        let _ = writeln!(
            out,
            "pod {namespace}/{name}: not known to this agent (not scheduled on this node, not \
             started yet, or gone); it would get 404 (reason unknown_source)"
        );
        return None;
    };
    // What a request from each of its addresses finds.
    for ip in &pod.ips {
        let lookup = agent.index.lookup(*ip);
        let _ = writeln!(out, "  address {ip}: {}", lookup_words(&lookup));
        if let Some(reason) = lookup_refusal(&lookup).or_else(|| {
            matches!(&lookup, Lookup::Found(p) if p.uid != pod.uid)
                .then_some(Refusal::UnknownSource)
        }) {
            let _ = writeln!(
                out,
                "answer: 404 from {ip} (reason {}: {})",
                reason.metric_label(),
                reason.describe()
            );
        }
    }
    if pod.ips.is_empty() {
        let _ = writeln!(out, "  no address yet: it cannot be identified");
    }
    Some(pod)
}

/// Prints where the index knows the pod from; the pod as the agent would serve it.
fn describe_pod(
    agent: &Agent,
    namespace: &str,
    name: &str,
    out: &mut String,
) -> Option<Arc<PodInfo>> {
    let trace = agent.index.trace(namespace, name);
    let confirmed = trace.registrations.iter().find_map(|r| r.confirmed.clone());
    let pod = confirmed.clone().or_else(|| trace.watched.clone())?;
    let _ = writeln!(out, "pod {}/{} (uid {})", pod.namespace, pod.name, pod.uid);
    match &trace.watched {
        Some(w) => {
            let state = if w.host_network {
                "hostNetwork (never identified by address)"
            } else if w.terminal {
                "ended"
            } else {
                "running"
            };
            let _ = writeln!(out, "  found by the watch: yes ({state})");
        }
        None => {
            let _ = writeln!(
                out,
                "  found by the watch: no (not yet, or not on this node)"
            );
        }
    }
    if trace.registrations.is_empty() {
        let _ = writeln!(out, "  CNI registration: none");
    }
    for r in &trace.registrations {
        let ips: Vec<String> = r.ips.iter().map(IpAddr::to_string).collect();
        let id: String = r.container_id.chars().take(12).collect();
        let _ = writeln!(
            out,
            "  CNI registration: sandbox {id}, addresses {}, {}",
            ips.join(", "),
            if r.confirmed.is_some() {
                "confirmed by the API"
            } else {
                "not confirmed yet"
            }
        );
    }
    let _ = writeln!(out, "  service account: {}", pod.service_account);
    Some(pod)
}

fn source_words(s: RoleSource) -> &'static str {
    match s {
        RoleSource::ServiceAccount => "the ServiceAccount's role annotation (IRSA)",
        RoleSource::PodAnnotation => {
            "the pod's kube2iam annotation iam.amazonaws.com/role (kube2iam mode)"
        }
        RoleSource::Default => "--default-role (nothing else names one)",
    }
}

fn when(t: SystemTime, now: SystemTime) -> String {
    let rel = match t.duration_since(now) {
        Ok(d) => format!("in {}", human(d)),
        Err(e) => format!("{} ago", human(e.duration())),
    };
    format!("{} ({rel})", timestamp(t))
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

async fn explain_role(agent: &Agent, pod: &Arc<PodInfo>, now: SystemTime, out: &mut String) {
    let grant = agent.roles.grant(pod).await;
    let role = match grant {
        Err(e) => {
            let _ = writeln!(out, "role: cannot be resolved: {e}");
            let _ = writeln!(
                out,
                "answer: 500 for credentials (the ServiceAccount cannot be read)"
            );
            return;
        }
        Ok(RoleGrant::Role(role)) => role,
        Ok(RoleGrant::NoRole) => {
            let _ = writeln!(out, "role: none");
            let _ = writeln!(
                out,
                "answer: 404 (reason no_role: {})",
                Refusal::NoRole.describe()
            );
            return;
        }
        Ok(RoleGrant::NotAllowed { role_arn }) => {
            let _ = writeln!(out, "role: {role_arn} (pod annotation), not allowed");
            let _ = writeln!(
                out,
                "answer: 404 (reason role_not_allowed: {})",
                Refusal::RoleNotAllowed.describe()
            );
            return;
        }
        Ok(RoleGrant::Invalid { reason }) => {
            let _ = writeln!(out, "role: invalid: {reason}");
            let _ = writeln!(
                out,
                "answer: 404 (reason invalid_role: {})",
                Refusal::InvalidRole.describe()
            );
            return;
        }
    };
    let _ = writeln!(out, "role: {}", role.role_arn);
    let _ = writeln!(out, "  from: {}", source_words(role.source));
    let _ = writeln!(
        out,
        "  role name the pod asks for: {} (any other name: 404 wrong_role_name)",
        role.role_name()
    );
    let view = agent.creds.describe(pod, &role.role_arn);
    match (view.expiration, view.issued_at) {
        (Some(exp), issued) => {
            let _ = writeln!(out, "credentials: cached, expire {}", when(exp, now));
            if let Some(issued) = issued {
                let _ = writeln!(out, "  issued {}", when(issued, now));
            }
            if view.sharing_pods > 1 {
                let _ = writeln!(
                    out,
                    "  one session shared by {} pods of this ServiceAccount on this node",
                    view.sharing_pods
                );
            }
        }
        (None, _) if view.cached => {
            let _ = writeln!(out, "credentials: none (no exchange has succeeded yet)");
        }
        (None, _) => {
            let _ = writeln!(
                out,
                "credentials: none cached yet (the pod's first request fetches them)"
            );
        }
    }
    match &view.last_error {
        Some((e, at)) => {
            let _ = writeln!(out, "last STS error: {e} ({})", when(*at, now));
        }
        None => {
            let _ = writeln!(out, "last STS error: none");
        }
    }
    let refused_now = view.refused_until.as_ref();
    let has_creds = view.expiration.is_some_and(|e| e > now);
    let answer = match (has_creds, refused_now) {
        (true, _) => "200 with its credentials".to_string(),
        (false, Some((e, until))) => format!(
            "200 AssumeRoleUnauthorizedAccess (no keys): STS refuses the role ({e}); asked again after {}",
            timestamp(*until)
        ),
        (false, None) if view.last_error.is_some() => {
            "503 until STS answers (the last exchange failed; it is retried)".to_string()
        }
        (false, None) => "200 once the first exchange succeeds".to_string(),
    };
    let _ = writeln!(out, "answer: {answer}");
}

fn node_state(agent: &Agent, out: &mut String) {
    let rule = match agent.metrics.redirect_rule() {
        None => "not managed by this agent (host mode off)",
        Some(true) => "installed",
        Some(false) => "MISSING or not checkable (see the agent's log)",
    };
    let chain = match agent.metrics.cni_chain() {
        None => "not managed by this agent (no --cni-chain-state)",
        Some(true) => "present in the active conflist",
        Some(false) => "MISSING from the active conflist",
    };
    let _ = writeln!(out, "node: redirect rule {rule}; CNI chain {chain}");
    let _ = writeln!(
        out,
        "node: pod index {}",
        if agent.index.is_synced() {
            "synced (ready)"
        } else {
            "NOT synced yet (not ready: every pod gets 404)"
        }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_root_or_the_agent_itself_may_ask() {
        assert!(peer_allowed(0, 1000));
        assert!(peer_allowed(1000, 1000));
        assert!(!peer_allowed(1001, 1000));
        assert!(!peer_allowed(u32::MAX, 0));
    }

    #[test]
    fn durations_read_like_a_person_writes_them() {
        assert_eq!(human(Duration::from_secs(59)), "59s");
        assert_eq!(human(Duration::from_secs(3599)), "59m59s");
        assert_eq!(human(Duration::from_secs(3 * 3600 + 120)), "3h02m");
    }
}
