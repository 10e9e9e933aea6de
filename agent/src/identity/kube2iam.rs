//! kube2iam migration mode: kube2iam's pod annotation (`iam.amazonaws.com/role`) names the role of
//! a pod whose ServiceAccount names none, with kube2iam's own rules, so a cluster can move from
//! kube2iam without re-annotating every workload first:
//!
//! - a value starting with `arn:` (any case) is the role ARN; anything else is a role name (or
//!   `path/name`) appended to the base ARN (`--base-role-arn`, `arn:aws:iam::<account>:role/`
//!   with an optional path; a missing trailing `/` is added);
//! - with namespace restrictions on, the namespace's `iam.amazonaws.com/allowed-roles` (a JSON
//!   list) must match the role: each entry is made an ARN the same way, then matched as a glob
//!   (`*` matches any run of characters, `/` included; the whole ARN must match) or, with the
//!   `regexp` format, as an unanchored regular expression. A namespace that is missing, has no
//!   such annotation, or has one that is not a JSON list of strings allows nothing.
//!
//! The role is still assumed with the pod's own ServiceAccount token, so its trust policy must
//! trust that ServiceAccount: the annotation alone grants nothing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use super::{IdentityError, validate_role_arn};

/// kube2iam's namespace annotation listing the roles its pods may name.
pub(crate) const ALLOWED_ROLES_ANNOTATION: &str = "iam.amazonaws.com/allowed-roles";
/// Namespaces whose allowed roles are remembered at once.
const NAMESPACE_CACHE: u64 = 10_000;

/// Reads a Namespace's annotations (`None` when it does not exist).
pub trait Namespaces: Send + Sync {
    fn annotations<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<BTreeMap<String, String>>, IdentityError>>;
}

/// How `iam.amazonaws.com/allowed-roles` entries match (kube2iam's
/// `--namespace-restriction-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum RestrictionFormat {
    /// `*` matches any run of characters; the whole ARN must match.
    #[default]
    Glob,
    /// An unanchored regular expression, as kube2iam's `regexp` format.
    Regexp,
}

/// The base ARN a bare role name is appended to: checked, with its trailing `/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseArn(String);

impl BaseArn {
    /// `arn:<partition>:iam::<12 digits>:role/` with an optional `path/`; the `/` at the end is
    /// added when missing, as kube2iam does.
    pub fn parse(s: &str) -> Result<BaseArn, String> {
        let s = s.trim();
        let mut base = s.to_string();
        if !base.ends_with('/') {
            base.push('/');
        }
        // A base ARN plus a name is a role ARN: check it with a stand-in name.
        validate_role_arn(&format!("{base}x"))
            .map_err(|e| format!("{s:?} is not a role ARN prefix ({e}); expected arn:aws:iam::<account>:role/ with an optional path"))?;
        Ok(BaseArn(base))
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

/// kube2iam's rule: a value starting with `arn:` is an ARN, anything else a name under `base`.
pub(crate) fn role_arn(value: &str, base: Option<&BaseArn>) -> Result<String, String> {
    let value = value.trim();
    let arn = if value
        .get(..4)
        .is_some_and(|p| p.eq_ignore_ascii_case("arn:"))
    {
        value.to_string()
    } else {
        let Some(base) = base else {
            return Err(format!(
                "{value:?} is a role name, not an ARN, and --base-role-arn is not set"
            ));
        };
        format!("{}{}", base.0, value.trim_start_matches('/'))
    };
    validate_role_arn(&arn).map_err(|e| format!("{arn:?}: {e}"))?;
    Ok(arn)
}

/// One `allowed-roles` entry, made an ARN the kube2iam way and ready to match.
#[derive(Debug, Clone)]
enum Pattern {
    Glob(String),
    Regexp(regex::Regex),
}

impl Pattern {
    fn matches(&self, arn: &str) -> bool {
        match self {
            Pattern::Glob(g) => glob_match(g, arn),
            Pattern::Regexp(r) => r.is_match(arn),
        }
    }
}

/// `*` matches any run of characters (`/` included); everything else is literal; the whole
/// text must match.
fn glob_match(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let Some(first) = parts.next() else {
        return text.is_empty();
    };
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        // No `*`: the pattern is the text.
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// What a namespace allows: its patterns (empty: nothing).
#[derive(Debug, Default)]
struct Allowed(Vec<Pattern>);

/// The namespace restriction: each namespace's allowed roles, read by a direct GET and
/// remembered for `ttl` (the bound on how late a change of the annotation is seen).
pub struct NamespaceRestriction {
    namespaces: Arc<dyn Namespaces>,
    format: RestrictionFormat,
    base: Option<BaseArn>,
    cache: moka::future::Cache<String, Arc<Allowed>>,
}

impl NamespaceRestriction {
    pub(crate) fn new(
        namespaces: Arc<dyn Namespaces>,
        format: RestrictionFormat,
        base: Option<BaseArn>,
        ttl: Duration,
    ) -> Self {
        NamespaceRestriction {
            namespaces,
            format,
            base,
            cache: moka::future::Cache::builder()
                .max_capacity(NAMESPACE_CACHE)
                .time_to_live(ttl)
                .build(),
        }
    }

    /// Whether `namespace` allows `arn`. Concurrent misses share one read; errors are not
    /// remembered.
    pub(crate) async fn allows(&self, namespace: &str, arn: &str) -> Result<bool, IdentityError> {
        let allowed = match self.cache.get(namespace).await {
            Some(a) => a,
            None => self
                .cache
                .try_get_with(namespace.to_string(), async {
                    let ann = self.namespaces.annotations(namespace).await?;
                    Ok(Arc::new(self.parse(namespace, ann.as_ref())))
                })
                .await
                .map_err(|e: Arc<IdentityError>| (*e).clone())?,
        };
        Ok(allowed.0.iter().any(|p| p.matches(arn)))
    }

    fn parse(&self, namespace: &str, ann: Option<&BTreeMap<String, String>>) -> Allowed {
        let Some(raw) = ann.and_then(|a| a.get(ALLOWED_ROLES_ANNOTATION)) else {
            return Allowed::default();
        };
        let entries: Vec<String> = match serde_json::from_str(raw) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(
                    namespace,
                    error = %e,
                    "{ALLOWED_ROLES_ANNOTATION} is not a JSON list of strings; the namespace allows no role"
                );
                return Allowed::default();
            }
        };
        let mut patterns = Vec::with_capacity(entries.len());
        for entry in entries {
            // kube2iam makes each entry an ARN like a pod's annotation, without checking it.
            let entry = entry.trim();
            let full = if entry
                .get(..4)
                .is_some_and(|p| p.eq_ignore_ascii_case("arn:"))
            {
                entry.to_string()
            } else {
                format!(
                    "{}{entry}",
                    self.base.as_ref().map(BaseArn::as_str).unwrap_or("")
                )
            };
            match self.format {
                RestrictionFormat::Glob => patterns.push(Pattern::Glob(full)),
                RestrictionFormat::Regexp => match regex::Regex::new(&full) {
                    Ok(r) => patterns.push(Pattern::Regexp(r)),
                    Err(e) => tracing::warn!(
                        namespace,
                        entry = %full,
                        error = %e,
                        "ignoring an {ALLOWED_ROLES_ANNOTATION} entry that is not a regular expression"
                    ),
                },
            }
        }
        Allowed(patterns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    const BASE: &str = "arn:aws:iam::123456789012:role/";

    fn base() -> BaseArn {
        BaseArn::parse(BASE).unwrap()
    }

    #[test]
    fn a_base_arn_gets_its_slash_and_may_carry_a_path() {
        assert_eq!(
            BaseArn::parse("arn:aws:iam::123456789012:role")
                .unwrap()
                .as_str(),
            BASE
        );
        assert_eq!(
            BaseArn::parse("arn:aws:iam::123456789012:role/k8s/")
                .unwrap()
                .as_str(),
            "arn:aws:iam::123456789012:role/k8s/"
        );
        for bad in [
            "",
            "reader",
            "arn:aws:iam::1234:role/",
            "arn:aws:iam::123456789012:user/",
            "arn:aws:s3:::bucket/",
        ] {
            assert!(BaseArn::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_go_under_the_base_and_arns_stay_as_they_are() {
        let b = base();
        assert_eq!(
            role_arn("reader", Some(&b)).unwrap(),
            "arn:aws:iam::123456789012:role/reader"
        );
        assert_eq!(
            role_arn("team/reader", Some(&b)).unwrap(),
            "arn:aws:iam::123456789012:role/team/reader"
        );
        assert_eq!(
            role_arn("arn:aws:iam::210987654321:role/x", Some(&b)).unwrap(),
            "arn:aws:iam::210987654321:role/x"
        );
        // kube2iam compares the prefix without case; the ARN check then wants `arn:`.
        assert!(role_arn("ARN:aws:iam::210987654321:role/x", None).is_err());
    }

    #[test]
    fn names_without_a_base_and_bad_values_are_refused_with_a_reason() {
        let err = role_arn("reader", None).unwrap_err();
        assert!(err.contains("--base-role-arn"), "{err}");
        assert!(role_arn("bad name!", Some(&base())).is_err());
        assert!(role_arn("arn:aws:iam::123456789012:user/u", Some(&base())).is_err());
        assert!(role_arn(&"x".repeat(100), Some(&base())).is_err());
    }

    #[test]
    fn globs_match_the_whole_arn_with_star_spanning_slashes() {
        let arn = "arn:aws:iam::123456789012:role/team/reader";
        for (p, want) in [
            ("arn:aws:iam::123456789012:role/team/reader", true),
            ("arn:aws:iam::123456789012:role/*", true),
            ("arn:aws:iam::123456789012:role/team/*", true),
            ("*reader", true),
            ("*", true),
            ("arn:aws:iam::123456789012:role/*/reader", true),
            ("arn:aws:iam::123456789012:role/read*", false),
            ("arn:aws:iam::123456789012:role/team/reader-*", false),
            ("arn:aws:iam::123456789012:role/team", false),
            ("*writer*", false),
        ] {
            assert_eq!(glob_match(p, arn), want, "{p}");
        }
        assert!(glob_match("a*a", "aa"));
        assert!(!glob_match("a*a", "a"));
    }

    struct Fake(
        Mutex<BTreeMap<String, BTreeMap<String, String>>>,
        Mutex<usize>,
    );

    impl Namespaces for Fake {
        fn annotations<'a>(
            &'a self,
            name: &'a str,
        ) -> BoxFuture<'a, Result<Option<BTreeMap<String, String>>, IdentityError>> {
            *self.1.lock().unwrap() += 1;
            let r = self.0.lock().unwrap().get(name).cloned();
            Box::pin(async move { Ok(r) })
        }
    }

    fn restriction(format: RestrictionFormat, allowed: &[(&str, &str)]) -> NamespaceRestriction {
        let fake = Fake(
            Mutex::new(
                allowed
                    .iter()
                    .map(|(ns, v)| {
                        (
                            ns.to_string(),
                            BTreeMap::from([(ALLOWED_ROLES_ANNOTATION.to_string(), v.to_string())]),
                        )
                    })
                    .collect(),
            ),
            Mutex::new(0),
        );
        NamespaceRestriction::new(
            Arc::new(fake),
            format,
            Some(base()),
            Duration::from_secs(60),
        )
    }

    #[tokio::test]
    async fn namespace_entries_are_names_or_arns_matched_as_globs() {
        let r = restriction(
            RestrictionFormat::Glob,
            &[
                ("apps", r#"["reader", "team/*"]"#),
                ("other", r#"["arn:aws:iam::123456789012:role/writer"]"#),
                ("broken", "reader"),
            ],
        );
        let arn = |n: &str| format!("{BASE}{n}");
        assert!(r.allows("apps", &arn("reader")).await.unwrap());
        assert!(r.allows("apps", &arn("team/x")).await.unwrap());
        assert!(!r.allows("apps", &arn("writer")).await.unwrap());
        assert!(!r.allows("apps", &arn("reader2")).await.unwrap());
        assert!(r.allows("other", &arn("writer")).await.unwrap());
        assert!(!r.allows("other", &arn("reader")).await.unwrap());
        assert!(
            !r.allows("broken", &arn("reader")).await.unwrap(),
            "not JSON: nothing"
        );
        assert!(
            !r.allows("missing", &arn("reader")).await.unwrap(),
            "no namespace: nothing"
        );
    }

    #[tokio::test]
    async fn regexp_entries_match_unanchored_as_kube2iams() {
        let r = restriction(
            RestrictionFormat::Regexp,
            &[(
                "apps",
                r#"["read.*", "(", "arn:aws:iam::123456789012:role/w[a-z]+$", "^arn:.*admin"]"#,
            )],
        );
        let arn = |n: &str| format!("{BASE}{n}");
        assert!(r.allows("apps", &arn("reader")).await.unwrap());
        assert!(r.allows("apps", &arn("writer")).await.unwrap());
        // An entry not starting with `arn:` gets the base ARN in front, `^` included (kube2iam
        // does the same), so "^arn:.*admin" matches nothing.
        assert!(!r.allows("apps", &arn("admin")).await.unwrap());
        // Unanchored: a prefixed name matches "read.*" too, as in kube2iam.
        assert!(r.allows("apps", &arn("reader/x")).await.unwrap());
    }
}
