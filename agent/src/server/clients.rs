//! The real clients: Kubernetes from a kubeconfig or the in-cluster settings, STS in the node's
//! region.

use std::sync::Arc;

use super::RunError;
use crate::config::ValidConfig;
use crate::identity::RoleExchange;
use crate::identity::sts::SdkSts;
use crate::upstream::Upstream;

pub(super) async fn kube(cfg: &ValidConfig) -> Result<kube::Client, RunError> {
    let config = match &cfg.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|source| {
                RunError::Kubeconfig {
                    path: path.display().to_string(),
                    source,
                }
            })?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|source| RunError::Kubeconfig {
                    path: path.display().to_string(),
                    source,
                })?
        }
        None => kube::Config::infer().await.map_err(RunError::KubeInfer)?,
    };
    kube::Client::try_from(config).map_err(RunError::Kube)
}

/// STS in the region the standard settings name, else the node's own (from the real IMDS).
pub(super) async fn sts(cfg: &ValidConfig) -> Result<Arc<dyn RoleExchange>, RunError> {
    let named = [&cfg.region, &cfg.default_region]
        .into_iter()
        .flatten()
        .find(|r| !r.is_empty());
    let region = match named {
        Some(r) => r.clone(),
        None => Upstream::new(&cfg.upstream_imds)
            .region()
            .await
            .map_err(RunError::Region)?,
    };
    Ok(Arc::new(
        SdkSts::new(region, cfg.sts_endpoint.clone()).await,
    ))
}
