//! Did a connection come through the host redirect? With `--require-redirect` the IMDS listener
//! serves only connections whose original destination, as netfilter's DNAT recorded it
//! (`SO_ORIGINAL_DST`), was the metadata address: a caller that connects straight to the agent's
//! own address and port (a pod that learned it, another host of the VPC) is refused, so every
//! caller the agent serves passed the rule that only matches pod interfaces.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use nix::sys::socket::{SockaddrIn, SockaddrIn6, getsockopt, sockopt};
use tokio::net::TcpStream;

/// Where SDKs send metadata requests: `169.254.169.254:80` and, on IPv6, `[fd00:ec2::254]:80`.
pub(crate) const IMDS_V4: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(169, 254, 169, 254), 80));
pub(crate) const IMDS_V6: SocketAddr = SocketAddr::V6(SocketAddrV6::new(
    Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254),
    80,
    0,
    0,
));

/// The destination the client asked for before any DNAT; `None` when netfilter has no record of
/// the connection (no conntrack entry: it cannot have been redirected).
pub(super) fn original_destination(stream: &TcpStream) -> Option<SocketAddr> {
    let peer = stream.peer_addr().ok()?;
    match peer.ip().to_canonical() {
        IpAddr::V4(_) => getsockopt(stream, sockopt::OriginalDst)
            .ok()
            .map(|sin| SocketAddr::from(SockaddrIn::from(sin))),
        IpAddr::V6(_) => getsockopt(stream, sockopt::Ip6tOriginalDst)
            .ok()
            .map(|sin6| SocketAddr::V6(SocketAddrV6::from(SockaddrIn6::from(sin6)))),
    }
}

pub(super) fn came_through_redirect(stream: &TcpStream) -> bool {
    is_metadata_address(original_destination(stream))
}

fn is_metadata_address(dst: Option<SocketAddr>) -> bool {
    matches!(dst, Some(d) if d == IMDS_V4 || d == IMDS_V6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_metadata_address_counts_as_redirected() {
        assert!(is_metadata_address(Some(IMDS_V4)));
        assert!(is_metadata_address(Some(
            "[fd00:ec2::254]:80".parse().unwrap()
        )));
        for other in [
            "169.254.169.254:8181",
            "10.0.0.1:8181",
            "169.254.169.253:80",
            "[fd00:ec2::253]:80",
        ] {
            assert!(
                !is_metadata_address(Some(other.parse().unwrap())),
                "{other}"
            );
        }
        assert!(!is_metadata_address(None));
    }

    #[tokio::test]
    async fn a_direct_loopback_connection_is_not_redirected() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let _c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        // Either no conntrack record, or one saying the agent's own address: never the IMDS one.
        let dst = original_destination(&s);
        assert!(dst.is_none() || dst == Some(addr), "{dst:?}");
        assert!(!came_through_redirect(&s));
    }
}
