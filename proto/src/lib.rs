//! The registration message the CNI hook sends the agent, defined once for both sides.
//!
//! Unix stream socket, one request per connection: one JSON object and a newline in, one JSON
//! line out, then close; at most [`MAX_MESSAGE`] bytes each way. Requests:
//! `{"v":1,"op":"add","containerId":..,"namespace":..,"name":..,"ips":[..]}`,
//! `{"v":1,"op":"del","containerId":..}`, `{"v":1,"op":"check","containerId":..,"ips":[..]}`,
//! `{"v":1,"op":"gc","valid":[containerId, ..]}` (CNI 1.1 GC: drop every other registration).
//! Answers: `{"v":1,"ok":true}` or `{"v":1,"ok":false,"error":".."}`.
//!
//! The validators are what both sides check: the plugin refuses what the agent would refuse
//! before it ever connects, so a bad name is a bad name on both sides, never "agent unavailable".

#![forbid(unsafe_code)]

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

pub const PROTOCOL_VERSION: u32 = 1;
/// Largest request or answer, newline included.
pub const MAX_MESSAGE: u64 = 64 * 1024;
/// A pod has one address per family; a few more for multi-network setups, never dozens.
pub const MAX_IPS: usize = 16;
/// A node runs a few hundred sandboxes at most; a GC list beyond this is not a real one.
pub const MAX_VALID: usize = 4096;
/// Runtimes use 64 hex digits; some test tools use names.
pub const MAX_CONTAINER_ID: usize = 128;
/// A namespace is a DNS-1123 label.
pub const MAX_NAMESPACE: usize = 63;
/// A pod name is a DNS-1123 subdomain.
pub const MAX_POD_NAME: usize = 253;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("unsupported protocol version {0} (this agent speaks {PROTOCOL_VERSION})")]
    Version(u64),
    #[error("unknown op {0:?}")]
    UnknownOp(String),
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// A CNI ADD: the sandbox's pod and addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Add {
    pub container_id: String,
    // Missing names decode as empty and fail validation with the field's name.
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub ips: Vec<String>,
}

/// One request, tagged by `op`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    Add(Add),
    #[serde(rename_all = "camelCase")]
    Del {
        container_id: String,
    },
    #[serde(rename_all = "camelCase")]
    Check {
        container_id: String,
        #[serde(default)]
        ips: Vec<String>,
    },
    /// Every registration whose sandbox is not in `valid` is dropped, as by a DEL.
    Gc {
        valid: Vec<String>,
    },
}

const OPS: &[&str] = &["add", "del", "check", "gc"];

#[derive(Serialize)]
struct Envelope<'a> {
    v: u32,
    #[serde(flatten)]
    request: &'a Request,
}

impl Request {
    /// The request line as sent: JSON with the version, and a newline.
    pub fn encode(&self) -> Vec<u8> {
        let env = Envelope {
            v: PROTOCOL_VERSION,
            request: self,
        };
        // A struct of strings always serialises.
        let mut line = serde_json::to_vec(&env).unwrap_or_default();
        line.push(b'\n');
        line
    }

    /// Decodes one request line (without its newline) and checks its version and op; the
    /// fields are checked by [`validate`](Self::validate).
    pub fn decode(line: &[u8]) -> Result<Request, ProtoError> {
        let mut obj: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(line).map_err(|e| ProtoError::Malformed(e.to_string()))?;
        let v = obj
            .remove("v")
            .ok_or_else(|| ProtoError::Malformed("missing field `v`".into()))?;
        let v = v
            .as_u64()
            .ok_or_else(|| ProtoError::Malformed("`v` is not a version number".into()))?;
        if v != u64::from(PROTOCOL_VERSION) {
            return Err(ProtoError::Version(v));
        }
        match obj.get("op").and_then(|op| op.as_str()) {
            Some(op) if OPS.contains(&op) => {}
            Some(op) => return Err(ProtoError::UnknownOp(op.chars().take(32).collect())),
            None => return Err(ProtoError::Malformed("missing field `op`".into())),
        }
        serde_json::from_value(serde_json::Value::Object(obj))
            .map_err(|e| ProtoError::Malformed(e.to_string()))
    }

    /// Checks every field; the answer both sides act on.
    pub fn validate(&self) -> Result<(), ProtoError> {
        match self {
            Request::Add(add) => {
                check_container_id(&add.container_id)?;
                check_namespace(&add.namespace)?;
                check_pod_name(&add.name)?;
                if parse_ips(&add.ips)?.is_empty() {
                    return Err(invalid("ips", "at least one IP is needed".into()));
                }
                Ok(())
            }
            Request::Del { container_id } => check_container_id(container_id),
            Request::Check { container_id, ips } => {
                check_container_id(container_id)?;
                parse_ips(ips).map(drop)
            }
            Request::Gc { valid } => {
                if valid.len() > MAX_VALID {
                    return Err(invalid("valid", format!("more than {MAX_VALID}")));
                }
                valid.iter().try_for_each(|id| check_container_id(id))
            }
        }
    }
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub v: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    pub fn ok() -> Self {
        Response {
            v: PROTOCOL_VERSION,
            ok: true,
            error: None,
        }
    }

    pub fn refused(error: impl Into<String>) -> Self {
        Response {
            v: PROTOCOL_VERSION,
            ok: false,
            error: Some(error.into()),
        }
    }

    /// The answer line as sent: JSON and a newline.
    pub fn encode(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).unwrap_or_default();
        line.push(b'\n');
        line
    }

    pub fn decode(line: &[u8]) -> Result<Response, ProtoError> {
        serde_json::from_slice(line).map_err(|e| ProtoError::Malformed(e.to_string()))
    }
}

fn invalid(field: &'static str, reason: String) -> ProtoError {
    ProtoError::Invalid { field, reason }
}

/// 1-128 of `[A-Za-z0-9._-]`: it names files under `/run` on the agent's side.
pub fn check_container_id(id: &str) -> Result<(), ProtoError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_CONTAINER_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(invalid("containerId", "1-128 of [A-Za-z0-9._-]".into()))
    }
}

/// A Kubernetes namespace: a DNS-1123 label (`[a-z0-9-]`, at most 63, alphanumeric at both ends).
pub fn check_namespace(ns: &str) -> Result<(), ProtoError> {
    if dns_name(ns, MAX_NAMESPACE, false) {
        Ok(())
    } else {
        Err(invalid(
            "namespace",
            format!("{ns:?} is not a DNS-1123 label"),
        ))
    }
}

/// A pod name: a DNS-1123 subdomain (`[a-z0-9.-]`, at most 253, alphanumeric at both ends and
/// around each dot).
pub fn check_pod_name(name: &str) -> Result<(), ProtoError> {
    let labels_ok = name
        .split('.')
        .all(|l| !l.is_empty() && !l.starts_with('-') && !l.ends_with('-'));
    if dns_name(name, MAX_POD_NAME, true) && labels_ok {
        Ok(())
    } else {
        Err(invalid(
            "name",
            format!("{name:?} is not a DNS-1123 subdomain"),
        ))
    }
}

fn dns_name(s: &str, max: usize, dots: bool) -> bool {
    let b = s.as_bytes();
    let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !b.is_empty()
        && b.len() <= max
        && b.first().is_some_and(alnum)
        && b.last().is_some_and(alnum)
        && b.iter()
            .all(|c| alnum(c) || *c == b'-' || (dots && *c == b'.'))
}

/// Parses the addresses of a registration: at most [`MAX_IPS`], each a unicast address
/// (IPv4-mapped IPv6 folded to IPv4), duplicates dropped, order kept.
pub fn parse_ips(raw: &[String]) -> Result<Vec<IpAddr>, ProtoError> {
    if raw.len() > MAX_IPS {
        return Err(invalid("ips", format!("more than {MAX_IPS}")));
    }
    let mut out = Vec::with_capacity(raw.len());
    for s in raw {
        let ip: IpAddr = s
            .parse()
            .map_err(|_| invalid("ips", format!("{s:?} is not an IP address")))?;
        let ip = ip.to_canonical();
        // Loopback is accepted: the socket is root-only, and the test bed plays pods on 127/8.
        if ip.is_unspecified() || ip.is_multicast() {
            return Err(invalid("ips", format!("{ip} cannot be a pod address")));
        }
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    Ok(out)
}

/// Edge cases of every validator, each with whether it is valid: the plugin and the agent are
/// both tested against this one list.
pub mod edge_cases {
    pub const NAMESPACES: &[(&str, bool)] = &[
        ("a", true),
        ("kube-system", true),
        ("0ns", true),
        ("ns-0", true),
        // 63 characters: the longest label.
        (
            "n23456789012345678901234567890123456789012345678901234567890123",
            true,
        ),
        // 64 characters.
        (
            "n234567890123456789012345678901234567890123456789012345678901234",
            false,
        ),
        ("", false),
        ("NS", false),
        ("-ns", false),
        ("ns-", false),
        ("team.a", false),
        ("ns_a", false),
        ("ns a", false),
        ("nś", false),
    ];
    pub const POD_NAMES: &[(&str, bool)] = &[
        ("p", true),
        ("api-7d9f-x2z", true),
        ("web.v1", true),
        ("0", true),
        ("", false),
        ("P", false),
        ("-p", false),
        ("p-", false),
        (".p", false),
        ("p.", false),
        ("p..q", false),
        ("p.-q", false),
        ("p_q", false),
    ];
    pub const CONTAINER_IDS: &[(&str, bool)] = &[
        ("c", true),
        (
            "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            true,
        ),
        ("cri-o_1.x", true),
        ("", false),
        ("../etc", false),
        ("a/b", false),
        ("a b", false),
    ];
    pub const IPS: &[(&str, bool)] = &[
        ("10.0.0.1", true),
        ("fd00::1", true),
        ("::ffff:10.0.0.2", true),
        ("0.0.0.0", false),
        ("::", false),
        ("224.0.0.1", false),
        ("ff02::1", false),
        ("999.1.1.1", false),
        ("10.0.0.1/32", false),
    ];
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(ns: &str, name: &str, ips: &[&str]) -> Request {
        Request::Add(Add {
            container_id: "c1".into(),
            namespace: ns.into(),
            name: name.into(),
            ips: ips.iter().map(|s| s.to_string()).collect(),
        })
    }

    #[test]
    fn requests_round_trip_with_their_version() {
        for r in [
            add("ns", "p-1", &["10.0.0.1"]),
            Request::Del {
                container_id: "c1".into(),
            },
            Request::Check {
                container_id: "c1".into(),
                ips: vec!["10.0.0.1".into()],
            },
            Request::Gc {
                valid: vec!["c1".into()],
            },
        ] {
            let line = r.encode();
            assert!(line.starts_with(b"{\"v\":1,\"op\":"), "{line:?}");
            assert_eq!(line.last(), Some(&b'\n'));
            assert_eq!(Request::decode(&line[..line.len() - 1]), Ok(r));
        }
    }

    #[test]
    fn the_wire_format_is_the_documented_one() {
        let line = br#"{"v":1,"op":"add","containerId":"abc","namespace":"ns","name":"p","ips":["10.0.0.1"]}"#;
        assert_eq!(Request::decode(line), Ok(add_with("abc")));
        assert_eq!(Response::ok().encode(), b"{\"v\":1,\"ok\":true}\n");
        assert_eq!(
            Response::refused("no").encode(),
            b"{\"v\":1,\"ok\":false,\"error\":\"no\"}\n"
        );
    }

    fn add_with(cid: &str) -> Request {
        Request::Add(Add {
            container_id: cid.into(),
            namespace: "ns".into(),
            name: "p".into(),
            ips: vec!["10.0.0.1".into()],
        })
    }

    #[test]
    fn versions_ops_and_unknown_fields_are_checked_first() {
        let err = |l: &[u8]| Request::decode(l).unwrap_err();
        assert_eq!(
            err(br#"{"v":2,"op":"del","containerId":"a"}"#),
            ProtoError::Version(2)
        );
        assert!(
            matches!(err(br#"{"v":1,"op":"boom"}"#), ProtoError::UnknownOp(op) if op == "boom")
        );
        assert!(matches!(
            err(br#"{"op":"del","containerId":"a"}"#),
            ProtoError::Malformed(_)
        ));
        assert!(matches!(
            err(br#"{"v":1,"op":"del","containerId":"a","extra":1}"#),
            ProtoError::Malformed(_)
        ));
        assert!(matches!(
            err(br#"{"v":1,"op":"add","containerId":"a","namespace":"ns","name":"p","ips":[],"x":1}"#),
            ProtoError::Malformed(_)
        ));
        assert!(matches!(err(b"[]"), ProtoError::Malformed(_)));
    }

    #[test]
    fn every_edge_case_has_the_verdict_the_list_gives() {
        use edge_cases::*;
        for (ns, ok) in NAMESPACES {
            assert_eq!(check_namespace(ns).is_ok(), *ok, "namespace {ns:?}");
        }
        for (name, ok) in POD_NAMES {
            assert_eq!(check_pod_name(name).is_ok(), *ok, "name {name:?}");
        }
        for (id, ok) in CONTAINER_IDS {
            assert_eq!(check_container_id(id).is_ok(), *ok, "containerId {id:?}");
        }
        for (ip, ok) in IPS {
            assert_eq!(parse_ips(&[ip.to_string()]).is_ok(), *ok, "ip {ip:?}");
        }
        let long_name = format!("{}.{}", "a".repeat(126), "b".repeat(126));
        assert_eq!(long_name.len(), 253);
        assert!(check_pod_name(&long_name).is_ok());
        assert!(check_pod_name(&format!("{long_name}c")).is_err());
    }

    #[test]
    fn ips_are_canonical_deduplicated_and_bounded() {
        let raw: Vec<String> = ["10.0.0.1", "::ffff:10.0.0.2", "10.0.0.1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let ips = parse_ips(&raw).unwrap();
        assert_eq!(
            ips,
            vec![IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2])]
        );
        let many: Vec<String> = (1..=17).map(|i| format!("10.0.0.{i}")).collect();
        assert!(parse_ips(&many).is_err());
        assert!(
            add("ns", "p", &[]).validate().is_err(),
            "an ADD needs an address"
        );
    }
}
