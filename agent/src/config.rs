//! Command-line flags with environment fallbacks, validated once at start.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::identity::CacheSettings;
pub use crate::identity::SessionScope;
use crate::identity::freshness::{
    CREDENTIAL_DURATION_RANGE, DEFAULT_CREDENTIAL_DURATION, DEFAULT_REFRESH_AT, MIN_REFRESH_AT,
    NEGATIVE_TTL,
};
use crate::imds::DEFAULT_UPSTREAM_ALLOW;
pub(crate) use crate::telemetry::LogFormat;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ImdsV2 {
    /// GETs without a session token are served (IMDSv1 and IMDSv2 clients both work).
    Optional,
    /// GETs without a session token get 401, as on an instance with `HttpTokens=required`.
    Required,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IptablesBackend {
    Auto,
    Legacy,
    Nft,
    Plain,
}

impl IptablesBackend {
    /// The backend to program; `Auto` probes the node (runs iptables-*-save).
    pub(crate) fn resolve(self) -> crate::netfilter::Backend {
        use crate::netfilter::{Backend, detect_backend};
        match self {
            IptablesBackend::Auto => detect_backend(),
            IptablesBackend::Legacy => Backend::Legacy,
            IptablesBackend::Nft => Backend::Nft,
            IptablesBackend::Plain => Backend::Plain,
        }
    }
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "irsa-imds-agent",
    version,
    about = "Per-pod IRSA credentials for old AWS SDKs, served over IMDS"
)]
pub struct Config {
    /// Name of the node this agent serves; only pods scheduled here are ever identified.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,

    /// Address the IMDS endpoint listens on (the redirect's target).
    #[arg(long, env = "IRSA_IMDS_LISTEN", default_value = "0.0.0.0:8181")]
    pub listen: SocketAddr,

    /// Address for /healthz, /readyz and /metrics.
    #[arg(long, env = "IRSA_IMDS_OPS_LISTEN", default_value = "0.0.0.0:8182")]
    pub ops_listen: SocketAddr,

    /// The real instance metadata service, for allow-listed passthrough.
    #[arg(
        long,
        env = "IRSA_IMDS_UPSTREAM",
        default_value = "http://169.254.169.254"
    )]
    pub upstream_imds: String,

    /// Metadata paths (below /latest/) proxied upstream; `*` at the end matches a subtree.
    /// Repeat the flag to replace the default list.
    #[arg(long = "upstream-allow", env = "IRSA_IMDS_UPSTREAM_ALLOW", value_delimiter = ',',
          default_values_t = DEFAULT_UPSTREAM_ALLOW.iter().map(|s| s.to_string()).collect::<Vec<_>>())]
    pub upstream_allow: Vec<String>,

    /// ServiceAccount annotation that names the role.
    #[arg(
        long,
        env = "IRSA_IMDS_ROLE_ANNOTATION",
        default_value = "eks.amazonaws.com/role-arn"
    )]
    pub role_annotation: String,

    /// kube2iam migration mode: a pod whose ServiceAccount names no role gets the role its
    /// kube2iam annotation `iam.amazonaws.com/role` names (an ARN, or a name under
    /// --base-role-arn), assumed with the pod's own ServiceAccount token (the role's trust policy
    /// must trust that ServiceAccount). The ServiceAccount's role always wins.
    #[arg(long, env = "IRSA_IMDS_KUBE2IAM_ANNOTATIONS")]
    pub kube2iam_annotations: bool,

    /// kube2iam's --base-role-arn: `arn:aws:iam::<account>:role/` (an optional path may follow),
    /// prefixed to role names that are not ARNs (in `iam.amazonaws.com/role`,
    /// `iam.amazonaws.com/allowed-roles` and --default-role).
    #[arg(long, env = "IRSA_IMDS_BASE_ROLE_ARN")]
    pub base_role_arn: Option<String>,

    /// kube2iam's --namespace-restrictions (needs --kube2iam-annotations): a pod's annotated role
    /// must match its namespace's `iam.amazonaws.com/allowed-roles` (a JSON list), else 404.
    /// Reads namespaces: the ClusterRole needs `get namespaces`.
    #[arg(long, env = "IRSA_IMDS_NAMESPACE_RESTRICTIONS")]
    pub namespace_restrictions: bool,

    /// How allowed-roles entries match, as kube2iam's --namespace-restriction-format: `glob`
    /// (`*` matches anything) or `regexp` (unanchored).
    #[arg(
        long,
        env = "IRSA_IMDS_NAMESPACE_RESTRICTION_FORMAT",
        value_enum,
        default_value = "glob"
    )]
    pub namespace_restriction_format: crate::identity::kube2iam::RestrictionFormat,

    /// The role of pods that name none (an ARN, or a name under --base-role-arn), assumed with
    /// the pod's own ServiceAccount token like any other: its trust policy decides which
    /// ServiceAccounts may have it. Never the node's credentials. Without it such pods get 404.
    #[arg(long, env = "IRSA_IMDS_DEFAULT_ROLE")]
    pub default_role: Option<String>,

    /// Whether GETs need an IMDSv2 session token.
    #[arg(long, env = "IRSA_IMDS_V2", value_enum, default_value = "optional")]
    pub imds_v2: ImdsV2,

    /// Session duration asked of STS (the role's MaxSessionDuration must allow it).
    #[arg(long, env = "IRSA_IMDS_CREDENTIAL_DURATION", value_parser = parse_duration, default_value = DEFAULT_CREDENTIAL_DURATION)]
    pub credential_duration: Duration,

    /// Renew a cached set once it has this little left (less up to 3m of jitter): just before SDKs
    /// come back for it (15m before expiry), never earlier than needed. At least 18m.
    #[arg(long = "refresh-at", env = "IRSA_IMDS_REFRESH_AT", value_parser = parse_duration, default_value = DEFAULT_REFRESH_AT)]
    pub refresh_at_remaining: Duration,

    /// One STS session per pod, or per ServiceAccount on this node shared by its pods.
    #[arg(
        long,
        env = "IRSA_IMDS_SESSION_SCOPE",
        value_enum,
        default_value = "pod"
    )]
    pub session_scope: SessionScope,

    /// How long a request from a not-yet-known pod waits for its registration or watch event.
    #[arg(long, env = "IRSA_IMDS_POD_WAIT", value_parser = parse_duration, default_value = "750ms")]
    pub pod_wait: Duration,

    /// How long a ServiceAccount's annotations are trusted before being read again: the bound on how
    /// late a role change is seen.
    #[arg(long, env = "IRSA_IMDS_SA_CACHE_TTL", value_parser = parse_duration, default_value = "60s")]
    pub sa_cache_ttl: Duration,

    /// Audience of the minted ServiceAccount token (the annotation eks.amazonaws.com/audience overrides).
    #[arg(long, env = "IRSA_IMDS_AUDIENCE", default_value = "sts.amazonaws.com")]
    pub audience: String,

    /// Most STS/TokenRequest exchanges in flight at once.
    #[arg(long, env = "IRSA_IMDS_MAX_CONCURRENT_FETCHES", default_value_t = 16)]
    pub max_concurrent_fetches: usize,

    /// Most new exchanges started per second (protects STS and the API server at mass pod start).
    #[arg(long, env = "IRSA_IMDS_FETCH_RATE", default_value_t = 50)]
    pub fetch_rate: u32,

    /// Most connections the IMDS listener holds at once; more are refused at accept (reset).
    #[arg(long, env = "IRSA_IMDS_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,

    /// Most IMDS connections one source address holds at once, so no caller can take the places
    /// of the others: room for a pod with a few hundred SDK clients starting together, while 16
    /// such sources would be needed to fill --max-connections.
    #[arg(
        long,
        env = "IRSA_IMDS_MAX_CONNECTIONS_PER_SOURCE",
        default_value_t = 256
    )]
    pub max_connections_per_source: usize,

    /// Serve only connections that came through the host redirect (their original destination,
    /// as the DNAT recorded it, is 169.254.169.254:80 or [fd00:ec2::254]:80); connections made
    /// straight to --listen are refused. Needs --iptables.
    #[arg(long, env = "IRSA_IMDS_REQUIRE_REDIRECT")]
    pub require_redirect: bool,

    /// The region whose STS endpoint is used; without it (and without --default-region), the
    /// region the upstream IMDS reports.
    #[arg(long, env = "AWS_REGION")]
    pub region: Option<String>,

    /// The region used when --region is not given (the variable the AWS CLI reads).
    #[arg(long, env = "AWS_DEFAULT_REGION")]
    pub default_region: Option<String>,

    /// STS endpoint instead of the region's (a VPC endpoint, say); the SDK's own
    /// `AWS_ENDPOINT_URL` is honoured too. Either one also serves the ServiceAccounts that ask
    /// for the global endpoint.
    #[arg(long, env = "AWS_ENDPOINT_URL_STS")]
    pub sts_endpoint: Option<String>,

    /// This agent's own pod: named as the reporting instance of the Kubernetes Events it
    /// publishes (the manifests set it from the downward API).
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,

    /// Kubeconfig file; without it, the usual inference (KUBECONFIG, ~/.kube/config, in-cluster).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Unix socket where the CNI hook registers pod IPs (root only).
    #[arg(long, env = "IRSA_IMDS_CNI_SOCKET")]
    pub cni_socket: Option<PathBuf>,

    /// Unix socket (mode 0600, root only) where `irsa-imds-agent explain` asks the running agent
    /// why a pod gets what it gets. Local only: never on the network, never reachable by pods.
    #[arg(long, env = "IRSA_IMDS_EXPLAIN_SOCKET")]
    pub explain_socket: Option<PathBuf>,

    /// File keeping CNI registrations and revocations across agent restarts (the shipped
    /// manifests use /run/irsa-imds/state.json: it survives container restarts, not reboots).
    /// Without it they live in memory only.
    #[arg(long, env = "IRSA_IMDS_STATE_FILE")]
    pub state_file: Option<PathBuf>,

    /// Install and keep the host-mode DNAT rule for 169.254.169.254:80.
    #[arg(long, env = "IRSA_IMDS_IPTABLES")]
    pub iptables: bool,

    /// Pod-facing interfaces the rule matches (iptables -i patterns, comma-separated, each gets
    /// its rule): `eni+,vlan+` (EKS VPC CNI, with security groups for pods), `cali+` (Calico),
    /// `lxc+` (Cilium), `veth+`.
    #[arg(
        long,
        env = "IRSA_IMDS_HOST_INTERFACE",
        value_delimiter = ',',
        default_value = "eni+,vlan+"
    )]
    pub host_interface: Vec<String>,

    /// iptables backend for the rule: `auto` uses the one the node already uses (as kube-proxy's
    /// iptables-wrapper decides), or force `legacy`, `nft`, or `plain` (the `iptables` on PATH).
    #[arg(
        long,
        env = "IRSA_IMDS_IPTABLES_BACKEND",
        value_enum,
        default_value = "auto"
    )]
    pub iptables_backend: IptablesBackend,

    /// Node IP the rule redirects to (with the --listen port).
    #[arg(long, env = "HOST_IP")]
    pub host_ip: Option<IpAddr>,

    /// Also redirect [fd00:ec2::254]:80 with ip6tables, to this node IPv6 address.
    #[arg(long, env = "HOST_IPV6")]
    pub host_ipv6: Option<std::net::Ipv6Addr>,

    /// The chain state `irsa-imds-cni install --chain-state` wrote: with it, the agent keeps the
    /// CNI hook chained into the node's active conflist (re-adds it when the node's CNI rewrites
    /// the file or a new conflist becomes active).
    #[arg(long, env = "IRSA_IMDS_CNI_CHAIN_STATE")]
    pub cni_chain_state: Option<PathBuf>,

    /// How often the CNI chain is checked: the bound on how long a rewritten conflist goes
    /// without the hook.
    #[arg(long, env = "IRSA_IMDS_CNI_CHAIN_RESYNC", value_parser = parse_duration, default_value = "5s")]
    pub cni_chain_resync: Duration,

    /// How often the rule is checked and restored.
    #[arg(long, env = "IRSA_IMDS_IPTABLES_RESYNC", value_parser = parse_duration, default_value = "60s")]
    pub iptables_resync: Duration,

    /// Log format.
    #[arg(long, env = "IRSA_IMDS_LOG_FORMAT", value_enum, default_value = "json")]
    pub log_format: LogFormat,
}

/// `irsa-imds-agent uninstall`: the documented removal of the host rules (DESIGN §6). The agent
/// must no longer run on the node (it would put them back).
#[derive(Debug, Clone, Parser)]
#[command(
    name = "irsa-imds-agent uninstall",
    about = "Remove the host redirect rules from every iptables backend"
)]
pub struct UninstallConfig {
    /// After removing, keep running (idle) so an uninstall DaemonSet's pod stays up and Ready
    /// instead of restarting.
    #[arg(long)]
    pub hold: bool,
}

/// `irsa-imds-agent explain`: asks the agent running on this node, through its explain socket,
/// what it knows of a pod and why that pod gets what it gets.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "irsa-imds-agent explain",
    about = "Explain what the agent on this node serves a pod, and why (run as root on the node, or kubectl exec into the agent)"
)]
pub struct ExplainConfig {
    /// The agent's --explain-socket.
    #[arg(long, env = "IRSA_IMDS_EXPLAIN_SOCKET", default_value = crate::explain::DEFAULT_SOCKET)]
    pub socket: PathBuf,

    /// `<namespace>/<pod>`, or a pod's IP address.
    pub target: String,
}

/// A configuration [`Config::validate`] accepted: the only form the agent runs with, so nothing
/// unchecked reaches the wiring. Reads like the [`Config`] it holds.
#[derive(Debug, Clone)]
pub struct ValidConfig(Config, RolesSetup);

/// The role sources beyond the ServiceAccount, checked: what the role resolver is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RolesSetup {
    pub base: Option<crate::identity::kube2iam::BaseArn>,
    /// `--default-role` as an ARN (a bare name made one under the base ARN).
    pub default_role: Option<String>,
}

impl std::ops::Deref for ValidConfig {
    type Target = Config;
    fn deref(&self) -> &Config {
        &self.0
    }
}

impl ValidConfig {
    /// The base ARN and the default role, checked.
    pub(crate) fn roles(&self) -> &RolesSetup {
        &self.1
    }

    /// The credential cache's settings.
    pub fn cache_settings(&self) -> CacheSettings {
        CacheSettings {
            duration: self.credential_duration,
            refresh_at_remaining: self.refresh_at_remaining,
            max_concurrent: self.max_concurrent_fetches,
            rate_per_sec: self.fetch_rate,
            negative_ttl: NEGATIVE_TTL,
            scope: self.session_scope,
            node: self.node_name.clone(),
        }
    }
}

/// What [`Config::validate`] refuses; each message names the flag.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("--node-name (NODE_NAME) must not be empty")]
    EmptyNodeName,
    #[error("--credential-duration must be between 15m and 12h (STS limits), got {}s", .0.as_secs())]
    CredentialDuration(Duration),
    #[error(
        "--refresh-at must be at least 18m: sets are renewed before SDKs come back for them, 15 minutes before expiry"
    )]
    RefreshTooLate,
    #[error("--refresh-at must be less than --credential-duration")]
    RefreshBeyondSession,
    #[error("--pod-wait must stay under the SDKs' 1s metadata timeout (at most 950ms)")]
    PodWaitTooLong,
    #[error("{0} must be positive")]
    NotPositive(&'static str),
    #[error("--max-connections-per-source must not exceed --max-connections")]
    PerSourceAboveTotal,
    #[error(
        "--require-redirect needs --iptables: only the host redirect can be checked here (the per-pod redirect happens inside each pod's namespace)"
    )]
    RedirectCheckWithoutIptables,
    #[error("--upstream-imds must be an http:// URL with a host and no query, got {0:?}")]
    UpstreamScheme(String),
    #[error("--upstream-imds {url:?} is not a URL")]
    UpstreamUrl {
        url: String,
        #[source]
        source: http::uri::InvalidUri,
    },
    #[error(
        "--upstream-allow entry {0:?} must be a relative path below /latest/ of [A-Za-z0-9._-] segments, optionally ending in /*"
    )]
    UpstreamAllow(String),
    #[error("{flag} {value:?} is not an AWS region name (e.g. eu-west-1)")]
    Region { flag: &'static str, value: String },
    #[error("--sts-endpoint (AWS_ENDPOINT_URL_STS) must be an http:// or https:// URL, got {0:?}")]
    StsEndpointScheme(String),
    #[error("--sts-endpoint (AWS_ENDPOINT_URL_STS) {url:?} is not a URL")]
    StsEndpointUrl {
        url: String,
        #[source]
        source: http::uri::InvalidUri,
    },
    #[error("--role-annotation must not be empty")]
    EmptyRoleAnnotation,
    #[error("--base-role-arn: {0}")]
    BaseRoleArn(String),
    #[error("--default-role: {0}")]
    DefaultRole(String),
    #[error("--namespace-restrictions needs --kube2iam-annotations")]
    RestrictionsWithoutKube2iam,
    #[error("--iptables needs --host-ip (HOST_IP), the node address to redirect to")]
    MissingHostIp,
    #[error("--host-ip must be an IPv4 address (use --host-ipv6 for IPv6), got {0}")]
    HostIpNotV4(IpAddr),
    #[error("--host-interface needs at least one pattern")]
    NoHostInterface,
    #[error("--host-interface {0:?} is not an interface name pattern")]
    HostInterface(String),
}

impl Config {
    /// Checks what clap cannot and returns the configuration the agent runs with.
    pub fn validate(self) -> Result<ValidConfig, ConfigError> {
        use ConfigError as E;
        if self.node_name.trim().is_empty() {
            return Err(E::EmptyNodeName);
        }
        if !CREDENTIAL_DURATION_RANGE.contains(&self.credential_duration) {
            return Err(E::CredentialDuration(self.credential_duration));
        }
        if self.refresh_at_remaining < MIN_REFRESH_AT {
            return Err(E::RefreshTooLate);
        }
        if self.refresh_at_remaining >= self.credential_duration {
            return Err(E::RefreshBeyondSession);
        }
        if self.pod_wait > MAX_POD_WAIT {
            return Err(E::PodWaitTooLong);
        }
        for (flag, zero) in [
            ("--sa-cache-ttl", self.sa_cache_ttl.is_zero()),
            ("--max-concurrent-fetches", self.max_concurrent_fetches == 0),
            ("--fetch-rate", self.fetch_rate == 0),
            ("--max-connections", self.max_connections == 0),
            (
                "--max-connections-per-source",
                self.max_connections_per_source == 0,
            ),
            (
                "--cni-chain-resync",
                self.cni_chain_state.is_some() && self.cni_chain_resync.is_zero(),
            ),
            (
                "--iptables-resync",
                self.iptables && self.iptables_resync.is_zero(),
            ),
        ] {
            if zero {
                return Err(E::NotPositive(flag));
            }
        }
        if self.max_connections_per_source > self.max_connections {
            return Err(E::PerSourceAboveTotal);
        }
        if self.require_redirect && !self.iptables {
            return Err(E::RedirectCheckWithoutIptables);
        }
        check_upstream_url(&self.upstream_imds)?;
        for p in &self.upstream_allow {
            let body = p.strip_suffix("/*").unwrap_or(p);
            if body.is_empty()
                || !body.bytes().all(crate::imds::is_path_byte)
                || body
                    .split('/')
                    .any(|s| s.is_empty() || s == "." || s == "..")
            {
                return Err(E::UpstreamAllow(p.clone()));
            }
        }
        for (flag, region) in [
            ("--region (AWS_REGION)", &self.region),
            (
                "--default-region (AWS_DEFAULT_REGION)",
                &self.default_region,
            ),
        ] {
            if let Some(r) = region.as_deref().filter(|r| !is_region_name(r)) {
                return Err(E::Region {
                    flag,
                    value: r.to_string(),
                });
            }
        }
        if let Some(url) = &self.sts_endpoint {
            let uri: http::Uri = url.parse().map_err(|source| E::StsEndpointUrl {
                url: url.clone(),
                source,
            })?;
            if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                return Err(E::StsEndpointScheme(url.clone()));
            }
        }
        if self.role_annotation.is_empty() {
            return Err(E::EmptyRoleAnnotation);
        }
        self.roles_setup()?;
        if self.iptables {
            match self.host_ip {
                Some(IpAddr::V4(_)) => {}
                Some(ip) => return Err(E::HostIpNotV4(ip)),
                None => return Err(E::MissingHostIp),
            }
            if self.host_interface.is_empty() {
                return Err(E::NoHostInterface);
            }
            for p in &self.host_interface {
                // IFNAMSIZ: 15 characters; `+` is iptables' wildcard suffix.
                if p.is_empty()
                    || p.len() > 15
                    || !p
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "+-_.".contains(c))
                {
                    return Err(E::HostInterface(p.clone()));
                }
            }
        }
        let roles = self.roles_setup()?;
        Ok(ValidConfig(self, roles))
    }

    /// The base ARN and the default role's ARN, checked.
    fn roles_setup(&self) -> Result<RolesSetup, ConfigError> {
        use crate::identity::kube2iam::{BaseArn, role_arn};
        let base = match &self.base_role_arn {
            Some(b) => Some(BaseArn::parse(b).map_err(ConfigError::BaseRoleArn)?),
            None => None,
        };
        if self.namespace_restrictions && !self.kube2iam_annotations {
            return Err(ConfigError::RestrictionsWithoutKube2iam);
        }
        let default_role = match &self.default_role {
            Some(r) => Some(role_arn(r, base.as_ref()).map_err(ConfigError::DefaultRole)?),
            None => None,
        };
        Ok(RolesSetup { base, default_role })
    }
}

/// The SDKs give up on the metadata service after 1 s; a held request must be answered before.
const MAX_POD_WAIT: Duration = Duration::from_millis(950);

/// `us-east-1`, `cn-north-1`, `us-gov-west-1`: lowercase words and digits joined by dashes. An
/// empty value counts as not given (an unset variable in a manifest).
fn is_region_name(r: &str) -> bool {
    r.is_empty()
        || (r.len() <= 64
            && r.split('-').count() >= 3
            && r.split('-').all(|w| {
                !w.is_empty()
                    && w.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            }))
}

/// The passthrough appends `/latest/...` to this base: it must parse as an `http://` URL with a
/// host and nothing after the path.
fn check_upstream_url(url: &str) -> Result<(), ConfigError> {
    let uri: http::Uri = url.parse().map_err(|source| ConfigError::UpstreamUrl {
        url: url.to_string(),
        source,
    })?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() || uri.query().is_some() {
        return Err(ConfigError::UpstreamScheme(url.to_string()));
    }
    Ok(())
}

/// Parses `90s`, `15m`, `1h`, `750ms` or a bare number of seconds.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 30s, 15m, 1h"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => return Err(format!("invalid duration unit in {s:?}: use ms, s, m or h")),
    };
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Vec<&'static str> {
        vec!["irsa-imds-agent", "--node-name", "n1"]
    }

    fn check(extra: &[&'static str]) -> Result<ValidConfig, ConfigError> {
        let mut a = base();
        a.extend_from_slice(extra);
        Config::try_parse_from(a).expect("parse").validate()
    }

    #[test]
    fn defaults_validate() {
        let c = check(&[]).expect("valid");
        assert_eq!(c.listen.port(), 8181);
        assert_eq!(c.upstream_allow.len(), DEFAULT_UPSTREAM_ALLOW.len());
    }

    #[test]
    fn kube2iam_flags_are_checked_and_name_the_flag() {
        let err = |extra: &[&'static str]| check(extra).unwrap_err().to_string();
        assert!(err(&["--namespace-restrictions"]).contains("--kube2iam-annotations"));
        assert!(err(&["--base-role-arn", "arn:aws:iam::1:role/"]).contains("--base-role-arn"));
        assert!(err(&["--default-role", "reader"]).contains("--default-role"));
        assert!(err(&["--default-role", "arn:aws:s3:::b"]).contains("--default-role"));
        let ok = check(&[
            "--kube2iam-annotations",
            "--namespace-restrictions",
            "--base-role-arn",
            "arn:aws:iam::123456789012:role",
            "--default-role",
            "fallback",
        ])
        .unwrap();
        assert_eq!(
            ok.roles().default_role.as_deref(),
            Some("arn:aws:iam::123456789012:role/fallback")
        );
        assert_eq!(
            ok.roles().base.as_ref().map(|b| b.as_str()),
            Some("arn:aws:iam::123456789012:role/")
        );
    }

    #[test]
    fn refresh_point_defaults() {
        let c = check(&[]).expect("valid");
        assert_eq!(c.refresh_at_remaining, Duration::from_secs(20 * 60));
        assert_eq!(c.session_scope, SessionScope::Pod);
    }

    type IsVariant = fn(&ConfigError) -> bool;

    /// Every refusal, each from the smallest bad input, names the flag at fault.
    #[test]
    fn each_bad_setting_is_refused_naming_its_flag() {
        let ipt: &[&str] = &["--iptables", "--host-ip", "10.0.0.1"];
        let cases: Vec<(Vec<&'static str>, &str, IsVariant)> = vec![
            (
                vec!["--credential-duration", "10m"],
                "--credential-duration",
                |e| matches!(e, ConfigError::CredentialDuration(d) if d.as_secs() == 600),
            ),
            (
                vec!["--credential-duration", "13h"],
                "--credential-duration",
                |e| matches!(e, ConfigError::CredentialDuration(_)),
            ),
            (vec!["--refresh-at", "15m"], "--refresh-at", |e| {
                matches!(e, ConfigError::RefreshTooLate)
            }),
            (
                vec!["--credential-duration", "20m", "--refresh-at", "20m"],
                "--credential-duration",
                |e| matches!(e, ConfigError::RefreshBeyondSession),
            ),
            (vec!["--pod-wait", "951ms"], "--pod-wait", |e| {
                matches!(e, ConfigError::PodWaitTooLong)
            }),
            (vec!["--sa-cache-ttl", "0s"], "--sa-cache-ttl", |e| {
                matches!(e, ConfigError::NotPositive("--sa-cache-ttl"))
            }),
            (
                vec!["--max-concurrent-fetches", "0"],
                "--max-concurrent-fetches",
                |e| matches!(e, ConfigError::NotPositive("--max-concurrent-fetches")),
            ),
            (vec!["--fetch-rate", "0"], "--fetch-rate", |e| {
                matches!(e, ConfigError::NotPositive("--fetch-rate"))
            }),
            (
                vec!["--cni-chain-state", "/x", "--cni-chain-resync", "0s"],
                "--cni-chain-resync",
                |e| matches!(e, ConfigError::NotPositive("--cni-chain-resync")),
            ),
            (
                [ipt, &["--iptables-resync", "0s"]].concat(),
                "--iptables-resync",
                |e| matches!(e, ConfigError::NotPositive("--iptables-resync")),
            ),
            (
                vec!["--upstream-imds", "https://imds"],
                "--upstream-imds",
                |e| matches!(e, ConfigError::UpstreamScheme(_)),
            ),
            (
                vec!["--upstream-imds", "http://imds/?a=b"],
                "--upstream-imds",
                |e| matches!(e, ConfigError::UpstreamScheme(_)),
            ),
            (
                vec!["--upstream-imds", "http://im ds"],
                "--upstream-imds",
                |e| matches!(e, ConfigError::UpstreamUrl { .. }),
            ),
            (
                vec!["--upstream-allow", "a/../b"],
                "--upstream-allow",
                |e| matches!(e, ConfigError::UpstreamAllow(_)),
            ),
            (
                vec!["--region", "eu west 1"],
                "--region",
                |e| matches!(e, ConfigError::Region { value, .. } if value == "eu west 1"),
            ),
            (
                vec!["--default-region", "EU-WEST-1"],
                "--default-region",
                |e| matches!(e, ConfigError::Region { .. }),
            ),
            (vec!["--sts-endpoint", "ftp://sts"], "--sts-endpoint", |e| {
                matches!(e, ConfigError::StsEndpointScheme(_))
            }),
            (
                vec!["--sts-endpoint", "https://st s"],
                "--sts-endpoint",
                |e| matches!(e, ConfigError::StsEndpointUrl { .. }),
            ),
            (vec!["--role-annotation", ""], "--role-annotation", |e| {
                matches!(e, ConfigError::EmptyRoleAnnotation)
            }),
            (vec!["--iptables"], "--host-ip", |e| {
                matches!(e, ConfigError::MissingHostIp)
            }),
            (
                vec!["--iptables", "--host-ip", "fd00::1"],
                "--host-ip",
                |e| matches!(e, ConfigError::HostIpNotV4(_)),
            ),
            (
                [ipt, &["--host-interface", ""]].concat(),
                "--host-interface",
                |e| {
                    matches!(
                        e,
                        ConfigError::NoHostInterface | ConfigError::HostInterface(_)
                    )
                },
            ),
            (
                [ipt, &["--host-interface", "eth0;reboot"]].concat(),
                "--host-interface",
                |e| matches!(e, ConfigError::HostInterface(p) if p == "eth0;reboot"),
            ),
            (
                [ipt, &["--host-interface", "sixteen-chars-xx"]].concat(),
                "--host-interface",
                |e| matches!(e, ConfigError::HostInterface(_)),
            ),
        ];
        for (flags, names, is) in cases {
            let e = check(&flags).expect_err(&format!("{flags:?} must be refused"));
            assert!(is(&e), "{flags:?}: wrong variant {e:?}");
            assert!(e.to_string().contains(names), "{flags:?}: {e}");
        }
    }

    #[test]
    fn a_malformed_upstream_url_keeps_its_cause() {
        let e = check(&["--upstream-imds", "http://im ds"]).expect_err("refused");
        assert!(std::error::Error::source(&e).is_some(), "{e:?}");
    }

    #[test]
    fn blank_node_name_is_refused() {
        let e = Config::try_parse_from(["irsa-imds-agent", "--node-name", " "])
            .expect("parse")
            .validate()
            .expect_err("refused");
        assert!(matches!(e, ConfigError::EmptyNodeName), "{e:?}");
        assert!(e.to_string().contains("--node-name"), "{e}");
    }

    #[test]
    fn iptables_without_interfaces_is_refused() {
        let mut c = Config::try_parse_from(base()).expect("parse");
        c.iptables = true;
        c.host_ip = Some(IpAddr::from([10, 0, 0, 1]));
        c.host_interface.clear();
        assert!(matches!(c.validate(), Err(ConfigError::NoHostInterface)));
    }

    #[test]
    fn upstream_allow_entries_are_plain_paths() {
        for bad in [
            "/meta-data/x",
            "meta-data/../user-data",
            "meta-data//x",
            "a%2fb",
            "*",
            "",
        ] {
            let e = check(&["--upstream-allow", bad]).expect_err(bad);
            assert!(e.to_string().contains("--upstream-allow"), "{bad:?}");
        }
        check(&["--upstream-allow", "meta-data/placement/*,meta-data/mac"]).expect("valid");
        check(&["--upstream-imds", "http://[fd00:ec2::254]:80/"]).expect("valid");
    }

    #[test]
    fn aws_settings_are_flags() {
        let c = check(&[
            "--region",
            "us-gov-west-1",
            "--default-region",
            "",
            "--sts-endpoint",
            "https://vpce-1.sts.eu-west-1.vpce.amazonaws.com",
            "--pod-name",
            "irsa-imds-x1",
        ])
        .expect("valid");
        assert_eq!(c.region.as_deref(), Some("us-gov-west-1"));
        assert_eq!(c.pod_name.as_deref(), Some("irsa-imds-x1"));
    }

    #[test]
    fn durations_parse_and_reject_garbage() {
        assert_eq!(parse_duration("750ms"), Ok(Duration::from_millis(750)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("15"), Ok(Duration::from_secs(15)));
        assert!(parse_duration("x1").is_err());
        assert!(parse_duration("1d").is_err());
        assert!(parse_duration("").is_err());
    }
}
