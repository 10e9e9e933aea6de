//! The pod index's rules one at a time, at their edges: what a pod object is trimmed to, which
//! answers are decisive, how revocations are bounded, cleared and expired, what a restart keeps,
//! and what the lock-free snapshot may answer. (The IP-reuse stories are in `tests`.)

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{PodIP, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::tests::{ip, pod, reg};
use super::*;

fn found_uid(l: Lookup) -> Option<String> {
    match l {
        Lookup::Found(p) => Some(p.uid.clone()),
        _ => None,
    }
}

/// A pod object as the API serves it, with every field `from_pod` reads set to something
/// ordinary; each case changes one.
fn api_pod() -> Pod {
    Pod {
        metadata: ObjectMeta {
            uid: Some("u1".into()),
            namespace: Some("ns".into()),
            name: Some("web-0".into()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some("n1".into()),
            service_account_name: Some("reader".into()),
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some("10.0.0.1".into()),
            pod_ips: Some(vec![
                PodIP {
                    ip: "10.0.0.1".into(),
                },
                PodIP {
                    ip: "2600::1".into(),
                },
            ]),
            ..Default::default()
        }),
    }
}

fn trimmed(edit: impl FnOnce(&mut Pod)) -> Option<PodInfo> {
    let mut p = api_pod();
    edit(&mut p);
    PodInfo::from_pod(&p)
}

#[test]
fn a_pod_object_is_trimmed_to_what_identifies_it() {
    let p = trimmed(|_| {}).unwrap();
    assert_eq!(
        p,
        PodInfo {
            uid: "u1".into(),
            namespace: "ns".into(),
            name: "web-0".into(),
            service_account: "reader".into(),
            node_name: Some("n1".into()),
            // `podIP` repeats the first of `podIPs`: each address once, in order.
            ips: vec![ip("10.0.0.1"), ip("2600::1")],
            host_network: false,
            terminal: false,
            kube2iam_role: None,
        }
    );
    let ips = trimmed(|p| {
        let st = p.status.as_mut().unwrap();
        st.pod_ips = Some(vec![PodIP { ip: "x".into() }]);
        st.pod_ip = Some("10.0.0.2".into());
    })
    .unwrap()
    .ips;
    assert_eq!(
        ips,
        vec![ip("10.0.0.2")],
        "an unparsable address is skipped"
    );
    let hn = trimmed(|p| p.spec.as_mut().unwrap().host_network = Some(true)).unwrap();
    assert!(hn.host_network);
}

#[test]
fn a_pod_without_uid_namespace_or_name_is_not_indexed() {
    type Edit = fn(&mut ObjectMeta);
    let cases: &[(&str, Edit)] = &[
        ("no uid", |m| m.uid = None),
        ("empty uid", |m| m.uid = Some(String::new())),
        ("no namespace", |m| m.namespace = None),
        ("empty namespace", |m| m.namespace = Some(String::new())),
        ("no name", |m| m.name = None),
        ("empty name", |m| m.name = Some(String::new())),
    ];
    for (what, edit) in cases {
        assert_eq!(trimmed(|p| edit(&mut p.metadata)), None, "{what}");
    }
}

#[test]
fn the_service_account_falls_back_to_the_deprecated_field_then_default() {
    let sa = |name: Option<&str>, deprecated: Option<&str>| {
        trimmed(|p| {
            let s = p.spec.as_mut().unwrap();
            s.service_account_name = name.map(str::to_string);
            s.service_account = deprecated.map(str::to_string);
        })
        .unwrap()
        .service_account
    };
    assert_eq!(sa(Some("a"), Some("b")), "a");
    assert_eq!(sa(None, Some("b")), "b");
    assert_eq!(sa(None, None), "default");
    assert_eq!(sa(Some(""), None), "default");
}

#[test]
fn succeeded_and_failed_pods_are_terminal_running_and_pending_are_not() {
    for (phase, terminal) in [
        ("Succeeded", true),
        ("Failed", true),
        ("Running", false),
        ("Pending", false),
        ("Unknown", false),
    ] {
        let p = trimmed(|p| p.status.as_mut().unwrap().phase = Some(phase.into())).unwrap();
        assert_eq!(p.terminal, terminal, "{phase}");
    }
}

#[test]
fn the_kube2iam_annotation_is_trimmed_and_bounded() {
    let role = |value: &str| {
        trimmed(|p| {
            p.metadata.annotations = Some(BTreeMap::from([(
                KUBE2IAM_ROLE_ANNOTATION.to_string(),
                value.to_string(),
            )]))
        })
        .unwrap()
        .kube2iam_role
    };
    assert_eq!(role("  reader \n").as_deref(), Some("reader"));
    assert_eq!(role("   "), None, "blank is no role");
    // One character over the limit is kept, so the role check sees it is too long, and no more.
    let long = "r".repeat(5000);
    assert_eq!(
        role(&long).map(|r| r.chars().count()),
        Some(MAX_ROLE_ANNOTATION + 1)
    );
    let other = trimmed(|p| {
        p.metadata.annotations = Some(BTreeMap::from([("other".into(), "reader".into())]))
    })
    .unwrap();
    assert_eq!(other.kube2iam_role, None);
}

#[test]
fn only_a_pod_that_neither_ended_nor_shares_the_node_network_is_live() {
    for (terminal, host_network, live) in [
        (false, false, true),
        (true, false, false),
        (false, true, false),
        (true, true, false),
    ] {
        let mut p = pod("u1", "a", "sa", &["10.0.0.1"]);
        p.terminal = terminal;
        p.host_network = host_network;
        assert_eq!(
            p.live(),
            live,
            "terminal {terminal}, hostNetwork {host_network}"
        );
    }
}

#[test]
fn each_answer_has_its_own_metric_label_and_only_three_are_decisive() {
    let found = Lookup::Found(Arc::new(pod("u1", "a", "sa", &[])));
    let all = [
        (found, "found", true),
        (Lookup::Unknown, "unknown", false),
        (Lookup::Pending, "pending", false),
        (Lookup::Ambiguous, "ambiguous", true),
        (Lookup::HostNetwork, "host_network", true),
        (Lookup::Terminal, "terminal", false),
    ];
    for (l, label, decisive) in &all {
        assert_eq!(l.metric_label(), *label, "{l:?}");
        assert_eq!(l.decisive(), *decisive, "{l:?}");
    }
}

#[test]
fn a_revocation_names_its_pod_by_uid_when_known_else_by_name() {
    let by_uid = Revocation {
        namespace: "ns".into(),
        name: "web-0".into(),
        uid: Some("u1".into()),
        since: 0,
    };
    assert!(by_uid.matches(&pod("u1", "web-0", "sa", &[])));
    assert!(
        !by_uid.matches(&pod("u2", "web-0", "sa", &[])),
        "same name, new pod"
    );
    let by_name = Revocation {
        uid: None,
        ..by_uid
    };
    assert!(by_name.matches(&pod("u2", "web-0", "sa", &[])));
    assert!(!by_name.matches(&pod("u2", "web-1", "sa", &[])));
    let mut elsewhere = pod("u2", "web-0", "sa", &[]);
    elsewhere.namespace = "other".into();
    assert!(!by_name.matches(&elsewhere), "same name, other namespace");
}

/// The revocations of `ip` in the saved state, as (name, uid).
fn revoked_on(idx: &PodIndex, addr: &str) -> Vec<(String, Option<String>)> {
    idx.snapshot()
        .revocations
        .into_iter()
        .filter(|r| r.ip == ip(addr))
        .map(|r| (r.name, r.uid))
        .collect()
}

#[test]
fn revocations_per_ip_are_bounded_oldest_first_and_never_doubled() {
    let idx = PodIndex::new();
    // Two sandboxes of one pod on the IP, each DELed: one revocation.
    idx.register(reg("c0", "p0", &["10.0.0.1"]));
    idx.unregister("c0");
    idx.register(reg("c0b", "p0", &["10.0.0.1"]));
    idx.unregister("c0b");
    assert_eq!(revoked_on(&idx, "10.0.0.1"), vec![("p0".into(), None)]);
    // A pod the watch shows at the IP is revoked by uid: a different revocation from its name's.
    idx.upsert(pod("u0", "p0", "sa", &["10.0.0.1"]));
    idx.register(reg("c0c", "p0", &["10.0.0.1"]));
    idx.unregister("c0c");
    assert_eq!(
        revoked_on(&idx, "10.0.0.1"),
        vec![("p0".into(), None), ("p0".into(), Some("u0".into()))]
    );
    idx.remove("u0");
    assert_eq!(revoked_on(&idx, "10.0.0.1"), Vec::new());
    for i in 0..=MAX_REVOCATIONS_PER_IP {
        idx.register(reg(&format!("c{i}"), &format!("p{i:02}"), &["10.0.0.1"]));
        idx.unregister(&format!("c{i}"));
    }
    let names: Vec<String> = revoked_on(&idx, "10.0.0.1")
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let want: Vec<String> = (1..=MAX_REVOCATIONS_PER_IP)
        .map(|i| format!("p{i:02}"))
        .collect();
    assert_eq!(names, want, "the oldest (p00) went, the other 64 stay");
    // The dropped one may match again; the others may not.
    idx.upsert(pod("u00", "p00", "sa", &["10.0.0.1"]));
    assert_eq!(
        found_uid(idx.lookup(ip("10.0.0.1"))).as_deref(),
        Some("u00")
    );
    idx.remove("u00");
    idx.upsert(pod("u01", "p01", "sa", &["10.0.0.1"]));
    assert_eq!(idx.lookup(ip("10.0.0.1")), Lookup::Unknown);
}

fn revocation(name: &str, uid: Option<&str>, since: u64) -> Revocation {
    Revocation {
        namespace: "ns".into(),
        name: name.into(),
        uid: uid.map(str::to_string),
        since,
    }
}

fn names(st: &State) -> Vec<(IpAddr, String)> {
    let mut v: Vec<(IpAddr, String)> = st
        .revoked
        .iter()
        .flat_map(|(ip, l)| l.iter().map(|r| (*ip, r.name.clone())))
        .collect();
    v.sort();
    v
}

#[test]
fn a_revocation_expires_at_its_ttl_unless_the_watch_still_shows_its_pod() {
    let ttl = REVOCATION_TTL.as_secs();
    let mut st = State::default();
    let shown = Arc::new(pod("u9", "shown", "sa", &["10.0.0.9"]));
    st.pods.insert("u9".into(), shown);
    st.revoked.insert(
        ip("10.0.0.1"),
        vec![
            revocation("young", None, 1001),
            revocation("old", None, 1000),
            revocation("shown", None, 0),
            revocation("future", None, u64::MAX),
        ],
    );
    st.revoked
        .insert(ip("10.0.0.2"), vec![revocation("gone", Some("u8"), 0)]);
    st.expire_revocations(1000 + ttl);
    assert_eq!(
        names(&st),
        vec![
            (ip("10.0.0.1"), "future".into()),
            (ip("10.0.0.1"), "shown".into()),
            (ip("10.0.0.1"), "young".into()),
        ],
        "exactly TTL old is expired, a second younger is not; an IP left with none is dropped"
    );
    assert!(!st.revoked.contains_key(&ip("10.0.0.2")));
}

#[test]
fn the_watch_seeing_a_pod_go_clears_its_revocations_and_only_theirs() {
    let mut st = State::default();
    st.revoked.insert(
        ip("10.0.0.1"),
        vec![
            revocation("web-0", Some("u1"), 1),
            revocation("web-0", Some("u2"), 1),
            revocation("web-0", None, 1),
            revocation("web-1", None, 1),
        ],
    );
    st.revoked
        .insert(ip("10.0.0.2"), vec![revocation("web-0", None, 1)]);
    st.revoked
        .insert(ip("10.0.0.3"), vec![revocation("web-0", Some("u1"), 1)]);
    // Seen at 10.0.0.1: its uid's revocations go everywhere, its name's on that IP only.
    st.clear_revocations(&pod("u1", "web-0", "sa", &["10.0.0.1"]));
    let mut want = vec![
        (ip("10.0.0.1"), "web-0".to_string()),
        (ip("10.0.0.1"), "web-1".to_string()),
        (ip("10.0.0.2"), "web-0".to_string()),
    ];
    assert_eq!(names(&st), want);
    assert!(
        !st.revoked.contains_key(&ip("10.0.0.3")),
        "left empty: dropped"
    );
    assert_eq!(st.revoked[&ip("10.0.0.1")][0].uid.as_deref(), Some("u2"));
    // Never seen with an IP: its name's revocations go on every IP (not u2's, by uid).
    st.clear_revocations(&pod("u7", "web-0", "sa", &[]));
    want = vec![
        (ip("10.0.0.1"), "web-0".to_string()),
        (ip("10.0.0.1"), "web-1".to_string()),
    ];
    assert_eq!(names(&st), want);
    assert_eq!(st.revoked[&ip("10.0.0.1")][0].uid.as_deref(), Some("u2"));
    // A pod of another namespace clears nothing.
    let mut elsewhere = pod("u8", "web-1", "sa", &[]);
    elsewhere.namespace = "other".into();
    st.clear_revocations(&elsewhere);
    assert_eq!(names(&st), want);
}

#[test]
fn a_del_records_when_it_came() {
    let now = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    let idx = PodIndex::new();
    let before = now();
    idx.register(reg("c1", "a", &["10.0.0.1"]));
    idx.unregister("c1");
    let after = now();
    let since = idx.snapshot().revocations[0].since;
    assert!(
        (before..=after).contains(&since),
        "{since} not in {before}..={after}"
    );
}

#[test]
fn a_revocation_restored_from_long_ago_expires_at_the_next_relist() {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let idx = PodIndex::new();
    let saved = |name: &str, since: u64| state::SavedRevocation {
        ip: ip("10.0.0.1"),
        namespace: "ns".into(),
        name: name.into(),
        uid: None,
        since,
    };
    idx.restore(state::Snapshot {
        v: state::STATE_VERSION,
        registrations: vec![],
        revocations: vec![
            saved("old", now - 2 * REVOCATION_TTL.as_secs()),
            saved("new", now),
        ],
    });
    assert_eq!(revoked_on(&idx, "10.0.0.1").len(), 2);
    idx.replace_all(vec![]);
    assert_eq!(revoked_on(&idx, "10.0.0.1"), vec![("new".into(), None)]);
}

#[test]
fn a_watch_update_reports_arrivals_departures_and_service_account_changes() {
    let idx = PodIndex::new();
    let said = |c: &[Change]| {
        c.iter()
            .map(|c| match c {
                Change::Live(p) => format!("live {}", p.service_account),
                Change::Gone(p) => format!("gone {}", p.service_account),
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        said(&idx.upsert(pod("u1", "a", "sa", &[]))),
        Vec::<String>::new(),
        "no IP yet"
    );
    assert_eq!(
        said(&idx.upsert(pod("u1", "a", "sa", &["10.0.0.1"]))),
        ["live sa"]
    );
    assert_eq!(
        said(&idx.upsert(pod("u1", "a", "sa", &["10.0.0.1"]))),
        Vec::<String>::new(),
        "nothing changed"
    );
    assert_eq!(
        said(&idx.upsert(pod("u1", "a", "sb", &["10.0.0.1"]))),
        ["live sb"]
    );
    let mut hn = pod("u1", "a", "sb", &["10.0.0.1"]);
    hn.host_network = true;
    assert_eq!(said(&idx.upsert(hn.clone())), ["gone sb"]);
    assert_eq!(said(&idx.upsert(hn)), Vec::<String>::new());
    assert_eq!(idx.pod_count(), 1);
}

#[test]
fn a_pod_that_moved_is_no_longer_found_at_its_old_ip() {
    let idx = PodIndex::new();
    idx.upsert(pod("u1", "a", "sa", &["10.0.0.1"]));
    idx.upsert(pod("u2", "b", "sa", &["10.0.0.1"]));
    assert_eq!(idx.lookup(ip("10.0.0.1")), Lookup::Ambiguous);
    idx.upsert(pod("u1", "a", "sa", &["10.0.0.2"]));
    assert_eq!(found_uid(idx.lookup(ip("10.0.0.1"))).as_deref(), Some("u2"));
    idx.remove("u2");
    assert_eq!(idx.lookup(ip("10.0.0.1")), Lookup::Unknown);
    assert_eq!(found_uid(idx.lookup(ip("10.0.0.2"))).as_deref(), Some("u1"));
    assert_eq!(idx.holders(ip("10.0.0.1")), Vec::new());
}

#[test]
fn removing_an_older_same_name_pod_keeps_the_newer_one_named() {
    let idx = PodIndex::new();
    idx.upsert(pod("u1", "web-0", "sa", &[]));
    idx.upsert(pod("u2", "web-0", "sa", &[]));
    idx.register(reg("c2", "web-0", &["10.0.0.2"]));
    idx.remove("u1");
    // The registration is not confirmed: the watch's pod of that name is the only evidence.
    assert_eq!(found_uid(idx.lookup(ip("10.0.0.2"))).as_deref(), Some("u2"));
    assert_eq!(
        idx.trace("ns", "web-0").watched.map(|p| p.uid.clone()),
        Some("u2".into())
    );
    idx.remove("u2");
    assert!(idx.trace("ns", "web-0").watched.is_none());
    assert_eq!(idx.lookup(ip("10.0.0.2")), Lookup::Pending);
    assert_eq!(idx.remove("u2"), None, "already gone");
}

#[test]
fn a_pod_that_ended_is_terminal_even_where_its_sandbox_is_registered() {
    let idx = PodIndex::new();
    idx.register(reg("c1", "a", &["10.0.0.1"]));
    assert!(idx.confirm("c1", pod("u1", "a", "sa", &[])));
    let mut done = pod("u1", "a", "sa", &["10.0.0.1"]);
    done.terminal = true;
    idx.upsert(done);
    // The watch's copy is newer than the read after ADD.
    assert_eq!(idx.lookup(ip("10.0.0.1")), Lookup::Terminal);
    // Shown on the node's network (no pod IP of its own): refused as the node.
    let mut hn = pod("u1", "a", "sa", &[]);
    hn.host_network = true;
    idx.upsert(hn);
    assert_eq!(idx.lookup(ip("10.0.0.1")), Lookup::HostNetwork);
}

#[test]
fn a_host_network_pod_that_ended_does_not_refuse_its_ip() {
    let idx = PodIndex::new();
    let mut h = pod("u1", "h", "sa", &["10.0.0.9"]);
    h.host_network = true;
    h.terminal = true;
    idx.upsert(h);
    assert_eq!(idx.lookup(ip("10.0.0.9")), Lookup::Terminal);
    idx.upsert(pod("u2", "b", "sa", &["10.0.0.9"]));
    assert_eq!(found_uid(idx.lookup(ip("10.0.0.9"))).as_deref(), Some("u2"));
}

#[test]
fn an_ended_pod_revoked_on_its_ip_is_unknown_not_terminal() {
    let idx = PodIndex::new();
    let mut done = pod("u1", "a", "sa", &["10.0.0.1"]);
    done.terminal = true;
    idx.upsert(done);
    assert_eq!(idx.lookup(ip("10.0.0.1")), Lookup::Terminal);
    idx.register(reg("c1", "a", &["10.0.0.1"]));
    idx.unregister("c1");
    assert_eq!(idx.lookup(ip("10.0.0.1")), Lookup::Unknown);
}

#[test]
fn a_saved_registration_listing_an_ip_twice_still_names_one_pod() {
    let idx = PodIndex::new();
    idx.restore(state::Snapshot {
        v: state::STATE_VERSION,
        registrations: vec![state::SavedRegistration {
            container_id: "c1".into(),
            namespace: "ns".into(),
            name: "a".into(),
            ips: vec![ip("10.0.0.1"), ip("10.0.0.1")],
            uid: Some("u1".into()),
        }],
        revocations: vec![],
    });
    assert_eq!(idx.lookup(ip("10.0.0.1")), Lookup::Pending);
    assert!(idx.confirm("c1", pod("u1", "a", "sa", &[])));
    assert_eq!(found_uid(idx.lookup(ip("10.0.0.1"))).as_deref(), Some("u1"));
}

#[test]
fn confirm_checks_namespace_name_and_known_uid() {
    let idx = PodIndex::new();
    assert!(
        !idx.confirm("nope", pod("u1", "a", "sa", &[])),
        "no such sandbox"
    );
    idx.register(reg("c1", "a", &["10.0.0.1"]));
    let mut elsewhere = pod("u1", "a", "sa", &[]);
    elsewhere.namespace = "other".into();
    assert!(!idx.confirm("c1", elsewhere));
    assert_eq!(idx.lookup(ip("10.0.0.1")), Lookup::Pending);
    assert!(idx.confirm("c1", pod("u1", "a", "sa", &[])));
    assert!(
        idx.confirm("c1", pod("u1", "a", "sb", &[])),
        "the same pod again"
    );
    assert!(!idx.confirm("c1", pod("u2", "a", "sa", &[])), "another uid");
    assert!(matches!(idx.lookup(ip("10.0.0.1")),
        Lookup::Found(p) if p.uid == "u1" && p.service_account == "sb"));
}

#[test]
fn check_compares_the_registered_ips_as_a_set() {
    let idx = PodIndex::new();
    idx.register(reg("c1", "a", &["10.0.0.1", "2600::1"]));
    assert!(idx.is_registered("c1", &[ip("2600::1"), ip("10.0.0.1")]));
    assert!(!idx.is_registered("c1", &[ip("10.0.0.1")]));
    assert!(!idx.is_registered("c1", &[ip("10.0.0.1"), ip("2600::2")]));
    assert!(!idx.is_registered("c2", &[ip("10.0.0.1"), ip("2600::1")]));
}

#[test]
fn gc_drops_exactly_the_sandboxes_it_does_not_keep_each_as_by_its_del() {
    let idx = PodIndex::new();
    idx.upsert(pod("u1", "a", "sa", &["10.0.0.1"]));
    idx.register(reg("c1", "a", &["10.0.0.1"]));
    idx.register(reg("c2", "b", &["10.0.0.2"]));
    idx.register(reg("c3", "c", &["10.0.0.3"]));
    assert_eq!(idx.retain_registrations(|c| c == "c2"), 2);
    assert!(idx.is_registered("c2", &[ip("10.0.0.2")]));
    assert!(!idx.is_registered("c1", &[ip("10.0.0.1")]));
    assert!(!idx.is_registered("c3", &[ip("10.0.0.3")]));
    assert_eq!(
        idx.lookup(ip("10.0.0.1")),
        Lookup::Unknown,
        "revoked as by its DEL"
    );
    assert_eq!(idx.retain_registrations(|_| true), 0);
    assert_eq!(idx.retain_registrations(|_| false), 1);
}

#[test]
fn trace_and_holders_show_where_the_index_knows_a_pod_from() {
    let idx = PodIndex::new();
    assert!(idx.trace("ns", "a").watched.is_none());
    idx.upsert(pod("u1", "a", "sa", &["10.0.0.1"]));
    idx.upsert(pod("u2", "b", "sa", &["10.0.0.1"]));
    idx.register(reg("c2", "a", &["10.0.0.2", "10.0.0.3"]));
    idx.register(reg("c1", "a", &["10.0.0.1"]));
    idx.register(reg("c9", "z", &["10.0.0.9"]));
    let mut other = reg("c8", "a", &["10.0.0.8"]);
    other.namespace = "other".into();
    idx.register(other);
    assert!(idx.confirm("c1", pod("u1", "a", "sa", &[])));
    let t = idx.trace("ns", "a");
    assert_eq!(t.watched.map(|p| p.uid.clone()), Some("u1".into()));
    let regs: Vec<(String, Vec<IpAddr>, Option<String>)> = t
        .registrations
        .iter()
        .map(|r| {
            (
                r.container_id.clone(),
                r.ips.clone(),
                r.confirmed.as_ref().map(|p| p.uid.clone()),
            )
        })
        .collect();
    assert_eq!(
        regs,
        vec![
            ("c1".into(), vec![ip("10.0.0.1")], Some("u1".into())),
            ("c2".into(), vec![ip("10.0.0.2"), ip("10.0.0.3")], None),
        ]
    );
    let names = |a: &str| {
        idx.holders(ip(a))
            .into_iter()
            .map(|(ns, n)| format!("{ns}/{n}"))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names("10.0.0.1"),
        ["ns/a", "ns/b"],
        "watch and registration, once each"
    );
    assert_eq!(names("10.0.0.3"), ["ns/a"]);
    assert_eq!(names("10.0.0.8"), ["other/a"]);
    assert_eq!(names("10.0.0.7"), Vec::<String>::new());
}

#[tokio::test]
async fn the_lock_free_answer_is_only_a_current_decisive_one() {
    let idx = PodIndex::new();
    let wait = Duration::ZERO;
    idx.upsert(pod("u1", "a", "sa", &["10.0.0.1"]));
    idx.register(reg("c2", "b", &["10.0.0.2"]));
    assert_eq!(idx.resolve_now(ip("10.0.0.1")), None, "no snapshot yet");
    assert_eq!(idx.resolve(ip("10.0.0.2"), wait).await, Lookup::Pending);
    // The slow path built the snapshot: the found pod is in it, the pending one is not.
    assert_eq!(
        idx.resolve_now(ip("10.0.0.1"))
            .and_then(found_uid)
            .as_deref(),
        Some("u1")
    );
    assert_eq!(idx.resolve_now(ip("10.0.0.2")), None);
    assert_eq!(idx.resolve_now(ip("10.0.0.3")), None);
    // A change makes it stale: nothing is answered from it until it is rebuilt.
    idx.remove("u1");
    assert_eq!(idx.resolve_now(ip("10.0.0.1")), None);
    assert_eq!(idx.resolve(ip("10.0.0.1"), wait).await, Lookup::Unknown);
    idx.upsert(pod("u3", "c", "sa", &["10.0.0.3"]));
    assert_eq!(idx.resolve_now(ip("10.0.0.3")), None);
    assert!(matches!(
        idx.resolve(ip("10.0.0.3"), wait).await,
        Lookup::Found(_)
    ));
    assert!(matches!(
        idx.resolve_now(ip("10.0.0.3")),
        Some(Lookup::Found(_))
    ));
}

#[test]
fn the_index_is_synced_after_its_first_list() {
    let idx = PodIndex::default();
    assert!(!idx.is_synced());
    assert_eq!(idx.pod_count(), 0);
    idx.replace_all(vec![pod("u1", "a", "sa", &[]), pod("u2", "b", "sa", &[])]);
    assert!(idx.is_synced());
    assert_eq!(idx.pod_count(), 2);
}

#[test]
fn a_superseded_pod_stays_revoked_after_its_successors_del() {
    let idx = PodIndex::new();
    idx.upsert(pod("u1", "a", "sa", &["10.0.0.1"]));
    idx.register(reg("c1", "a", &["10.0.0.1"]));
    // The pod's sandbox is recreated on the same IP (same pod name): nothing is revoked.
    idx.register(reg("c1b", "a", &["10.0.0.1"]));
    assert_eq!(found_uid(idx.lookup(ip("10.0.0.1"))).as_deref(), Some("u1"));
    assert_eq!(revoked_on(&idx, "10.0.0.1"), Vec::new());
    // Another pod's ADD takes the IP (c1b's DEL was lost), then its own DEL comes while the
    // watch still shows the first pod there: that pod must not match again.
    idx.register(reg("c2", "b", &["10.0.0.1"]));
    assert_eq!(
        revoked_on(&idx, "10.0.0.1"),
        vec![("a".into(), Some("u1".into()))]
    );
    idx.unregister("c2");
    assert_eq!(idx.lookup(ip("10.0.0.1")), Lookup::Unknown);
}

/// A state with the given sandboxes all registered on `addr`, built directly: the index's own
/// paths let the newest ADD of an IP supersede the others, so this is the lookup's rule alone.
fn sandboxes_on(addr: &str, entries: Vec<(&str, &str, Option<PodInfo>)>) -> State {
    let mut st = State::default();
    for (cid, name, confirmed) in entries {
        st.reg_by_ip
            .entry(ip(addr))
            .or_default()
            .push(cid.to_string());
        st.regs.insert(
            cid.to_string(),
            RegEntry {
                reg: reg(cid, name, &[addr]),
                uid: None,
                confirmed: confirmed.map(Arc::new),
            },
        );
    }
    st
}

#[test]
fn two_pods_registered_on_one_ip_are_refused_two_sandboxes_of_one_pod_are_not() {
    let two_pods = sandboxes_on(
        "10.0.0.1",
        vec![
            ("c1", "a", Some(pod("u1", "a", "sa", &[]))),
            ("c2", "b", Some(pod("u2", "b", "sa", &[]))),
        ],
    );
    assert_eq!(two_pods.lookup(ip("10.0.0.1")), Lookup::Ambiguous);
    let one_pod = sandboxes_on(
        "10.0.0.1",
        vec![
            ("c1", "a", Some(pod("u1", "a", "sa", &[]))),
            ("c1b", "a", Some(pod("u1", "a", "sa", &[]))),
        ],
    );
    assert_eq!(
        found_uid(one_pod.lookup(ip("10.0.0.1"))).as_deref(),
        Some("u1")
    );
}

#[test]
fn the_read_after_add_beats_an_older_same_name_pod_in_the_watch() {
    // The sandbox's uid left unset, so only the lookup's own preference decides.
    let mut st = sandboxes_on(
        "10.0.0.1",
        vec![("c2", "web-0", Some(pod("u2", "web-0", "sa", &[])))],
    );
    let old = Arc::new(pod("u1", "web-0", "sa", &["10.0.0.1"]));
    st.pods.insert("u1".into(), old.clone());
    st.index_pod(&old);
    assert_eq!(found_uid(st.lookup(ip("10.0.0.1"))).as_deref(), Some("u2"));
}

#[test]
fn a_sandbox_added_again_with_another_ip_no_longer_holds_the_old_one() {
    let idx = PodIndex::new();
    idx.register(reg("c1", "a", &["10.0.0.1"]));
    assert!(idx.confirm("c1", pod("u1", "a", "sa", &[])));
    idx.register(reg("c2", "b", &["10.0.0.3"]));
    assert_eq!(found_uid(idx.lookup(ip("10.0.0.1"))).as_deref(), Some("u1"));
    // The runtime retries the ADD of the same sandbox and IPAM hands out another address.
    idx.register(reg("c1", "a", &["10.0.0.2"]));
    assert_eq!(idx.lookup(ip("10.0.0.1")), Lookup::Unknown);
    assert_eq!(idx.holders(ip("10.0.0.1")), Vec::new());
    assert_eq!(idx.lookup(ip("10.0.0.2")), Lookup::Pending);
    // Its DEL frees the new address; the other sandbox keeps its own.
    idx.unregister("c1");
    assert_eq!(idx.holders(ip("10.0.0.2")), Vec::new());
    assert_eq!(idx.lookup(ip("10.0.0.3")), Lookup::Pending);
}
