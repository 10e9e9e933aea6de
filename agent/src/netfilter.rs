//! PLACEHOLDER written by the lead so the crate compiles; the netfilter engineer replaces this file.
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct RedirectRule {
    pub chain: String,
    pub interface: String,
    pub target_v4: std::net::SocketAddrV4,
    pub target_v6: Option<std::net::SocketAddrV6>,
    pub iptables: std::path::PathBuf,
    pub ip6tables: std::path::PathBuf,
}
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetfilterError {
    #[error("not implemented")]
    NotImplemented,
}
impl RedirectRule {
    pub fn ensure(&self) -> Result<bool, NetfilterError> {
        Err(NetfilterError::NotImplemented)
    }
    pub fn remove(&self) -> Result<(), NetfilterError> {
        Err(NetfilterError::NotImplemented)
    }
}
pub async fn reconcile(
    _rule: Arc<RedirectRule>,
    _every: Duration,
    _shutdown: tokio_util::sync::CancellationToken,
) {
}
