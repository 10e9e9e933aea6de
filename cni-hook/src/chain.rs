//! Chaining the plugin into the node's CNI config, shared by `irsa-imds-cni install|uninstall`
//! and by the agent, which keeps the chain in place while it runs.
//!
//! The runtime uses the first config file of its conf dir in lexical order; this module only
//! ever adds the plugin to that one (a `.conflist`). Every write is atomic (temp file + rename in
//! the same directory), idempotent, and leaves every other plugin exactly as it was. The plugin is
//! never chained unless its binary is in the bin dir, and uninstall removes the entry from every
//! conflist before the binary, so no step leaves a conflist naming a missing plugin.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub const PLUGIN_TYPE: &str = "irsa-imds-cni";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChainError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("no CNI config in {0}")]
    NoConfig(String),
    #[error("{0} is a single-plugin config; chaining needs a .conflist")]
    SinglePlugin(String),
    #[error("{path} is not a CNI conflist: {reason}")]
    Invalid { path: String, reason: String },
    #[error("plugin binary {0} is missing: not chaining a plugin the runtime cannot run")]
    BinaryMissing(String),
}

/// What `install` chained, for the agent to keep chained: written by `install --chain-state`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChainState {
    pub conf_dir: PathBuf,
    pub bin_dir: PathBuf,
    /// This plugin's conflist entry, exactly as installed.
    pub entry: Value,
}

impl ChainState {
    pub fn load(path: &Path) -> Result<Self, ChainError> {
        let text = std::fs::read_to_string(path).map_err(|source| ChainError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let s: ChainState = serde_json::from_str(&text).map_err(|e| ChainError::Invalid {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        if !is_ours(&s.entry) {
            return Err(ChainError::Invalid {
                path: path.display().to_string(),
                reason: format!("entry is not of type {PLUGIN_TYPE}"),
            });
        }
        Ok(s)
    }

    pub fn save(&self, path: &Path) -> Result<(), ChainError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| ChainError::Write {
                path: dir.display().to_string(),
                source,
            })?;
        }
        let mut text = serde_json::to_string_pretty(self).map_err(|e| ChainError::Invalid {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        text.push('\n');
        write_atomic(path, text.as_bytes(), Some(0o600))
    }

    pub fn binary(&self) -> PathBuf {
        self.bin_dir.join(PLUGIN_TYPE)
    }

    /// Chains [`Self::entry`] into the active conflist unless it is already there exactly;
    /// `Some(path)` when the file was rewritten.
    pub fn ensure(&self) -> Result<Option<PathBuf>, ChainError> {
        let bin = self.binary();
        if !bin.is_file() {
            return Err(ChainError::BinaryMissing(bin.display().to_string()));
        }
        let path = active_conflist(&self.conf_dir)?;
        let mut conf = read_conflist(&path)?;
        let plugins = plugins_mut(&mut conf, &path)?;
        let before = plugins.clone();
        plugins.retain(|p| !is_ours(p));
        plugins.push(self.entry.clone());
        if *plugins == before {
            return Ok(None);
        }
        write_conflist(&path, &conf)?;
        Ok(Some(path))
    }
}

pub fn is_ours(p: &Value) -> bool {
    p.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

fn config_files(dir: &Path) -> Result<Vec<PathBuf>, ChainError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| ChainError::Read {
            path: dir.display().to_string(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .is_some_and(|x| x == "conflist" || x == "conf" || x == "json")
                && !p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with('.'))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// The node's active config: the first in lexical order, which must be a `.conflist`.
pub fn active_conflist(dir: &Path) -> Result<PathBuf, ChainError> {
    let files = config_files(dir)?;
    let first = files
        .first()
        .ok_or_else(|| ChainError::NoConfig(dir.display().to_string()))?;
    if first.extension().is_some_and(|x| x != "conflist") {
        return Err(ChainError::SinglePlugin(first.display().to_string()));
    }
    Ok(first.clone())
}

fn read_conflist(path: &Path) -> Result<Value, ChainError> {
    let text = std::fs::read_to_string(path).map_err(|source| ChainError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let v: Value = serde_json::from_str(&text).map_err(|e| ChainError::Invalid {
        path: path.display().to_string(),
        reason: format!("not valid JSON: {e}"),
    })?;
    Ok(v)
}

fn plugins_mut<'a>(conf: &'a mut Value, path: &Path) -> Result<&'a mut Vec<Value>, ChainError> {
    conf.get_mut("plugins")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| ChainError::Invalid {
            path: path.display().to_string(),
            reason: "no plugins array".into(),
        })
}

fn write_conflist(path: &Path, conf: &Value) -> Result<(), ChainError> {
    let mut text = serde_json::to_string_pretty(conf).map_err(|e| ChainError::Invalid {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    text.push('\n');
    write_atomic(path, text.as_bytes(), None)
}

/// Removes this plugin's entry from every conflist in `dir`; returns the files rewritten.
/// Files that are not valid conflists are left alone.
pub fn unchain_all(dir: &Path) -> Result<Vec<PathBuf>, ChainError> {
    let mut touched = Vec::new();
    let files = match config_files(dir) {
        Ok(f) => f,
        Err(ChainError::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Ok(touched);
        }
        Err(e) => return Err(e),
    };
    for path in files
        .into_iter()
        .filter(|p| p.extension().is_some_and(|x| x == "conflist"))
    {
        let Ok(mut conf) = read_conflist(&path) else {
            continue;
        };
        let Ok(plugins) = plugins_mut(&mut conf, &path) else {
            continue;
        };
        let n = plugins.len();
        plugins.retain(|p| !is_ours(p));
        if plugins.len() != n {
            write_conflist(&path, &conf)?;
            touched.push(path);
        }
    }
    Ok(touched)
}

/// Writes next to the target and renames over it, so the runtime never reads half a file.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: Option<u32>) -> Result<(), ChainError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |source| ChainError::Write {
        path: path.display().to_string(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    // A leading dot and no config extension: the runtime never reads the temp file as config.
    let tmp = dir.join(format!(
        ".{}.irsa-imds.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    std::fs::write(&tmp, bytes).map_err(err)?;
    if let Some(m) = mode {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(m)).map_err(err)?;
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(e)
    })
}
