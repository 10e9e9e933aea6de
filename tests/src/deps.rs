//! Where `tests/setup.sh` put the test dependencies (Python venvs, npm packages).

use std::path::{Path, PathBuf};

/// `$IRSA_TESTBED_DEPS`, or `tests/.deps` in the source tree.
pub fn deps_dir() -> PathBuf {
    std::env::var_os("IRSA_TESTBED_DEPS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".deps"))
}

/// Python with `moto[server]` and current boto3.
pub fn moto_python() -> PathBuf {
    deps_dir().join("venv/bin/python")
}

/// Python with botocore 1.12.199 (no web identity; IMDSv1 only).
pub fn legacy_python() -> PathBuf {
    deps_dir().join("legacy-venv/bin/python")
}

/// `node_modules` holding aws-sdk 2.400.0 (for NODE_PATH).
pub fn node_path() -> PathBuf {
    deps_dir().join("node/node_modules")
}

/// The path, or a clear error saying how to get it.
pub fn require(p: &Path) -> anyhow::Result<PathBuf> {
    if p.exists() {
        Ok(p.to_path_buf())
    } else {
        anyhow::bail!(
            "{} is missing: run `bash tests/setup.sh` first",
            p.display()
        )
    }
}

/// `$IRSA_TESTBED_CACHE` (default `/var/cache/irsa-imds-testbed`): what the setup scripts build or
/// install outside the repository (promtool, the AWS CLI 1.16 venv, ...).
pub fn testbed_cache() -> PathBuf {
    std::env::var_os("IRSA_TESTBED_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/irsa-imds-testbed"))
}

/// The AWS CLI 1.16.209 (botocore 1.12.199) that `tests/setup-awscli.sh` installs.
pub fn awscli_116() -> PathBuf {
    testbed_cache().join("awscli-1.16/bin/aws")
}

/// promtool, built by `tests/setup-promtool.sh`.
pub fn promtool() -> PathBuf {
    testbed_cache().join("bin/promtool")
}
