//! IMDSv2 session tokens, bound to the pod that asked for them.
//!
//! A token carries its expiry and a nonce, MAC'd together with the pod's uid under a key that lives
//! only in this process's memory. Nothing is stored per token; a token presented by another pod, or
//! after a restart, fails the MAC. The uid is in the MAC but not in the token, so a token reveals
//! nothing about its pod.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::hmac;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// EC2 accepts TTLs of 1..=21600 seconds.
pub(crate) const MAX_TTL_SECS: u64 = 21_600;
const VERSION: u8 = 1;
const BODY_LEN: usize = 1 + 8 + 16;
/// Longer tokens are rejected before any decoding: a real one is 77 characters.
const MAX_TOKEN_LEN: usize = 96;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    #[error("token ttl must be an integer between 1 and 21600")]
    InvalidTtl,
    #[error("token is malformed")]
    Malformed,
    #[error("token has expired")]
    Expired,
    #[error("token was not issued to this caller")]
    WrongCaller,
    #[error("system random source failed")]
    Random,
}

pub struct TokenAuthority {
    key: hmac::Key,
    rng: SystemRandom,
}

impl fmt::Debug for TokenAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenAuthority { key: <redacted> }")
    }
}

/// Parses the `X-aws-ec2-metadata-token-ttl-seconds` header value as EC2 does.
pub(crate) fn parse_ttl(value: &[u8]) -> Result<u64, TokenError> {
    let s = std::str::from_utf8(value).map_err(|_| TokenError::InvalidTtl)?;
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TokenError::InvalidTtl);
    }
    let n: u64 = s.parse().map_err(|_| TokenError::InvalidTtl)?;
    if (1..=MAX_TTL_SECS).contains(&n) {
        Ok(n)
    } else {
        Err(TokenError::InvalidTtl)
    }
}

impl TokenAuthority {
    pub fn new() -> Result<Self, TokenError> {
        let rng = SystemRandom::new();
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng).map_err(|_| TokenError::Random)?;
        Ok(Self { key, rng })
    }

    /// Issues a token for `pod_uid` valid for `ttl` seconds from `now`.
    pub fn issue(&self, pod_uid: &str, ttl: u64, now: SystemTime) -> Result<String, TokenError> {
        if !(1..=MAX_TTL_SECS).contains(&ttl) {
            return Err(TokenError::InvalidTtl);
        }
        let expiry = unix_secs(now).saturating_add(ttl);
        let mut body = [0u8; BODY_LEN];
        body[0] = VERSION;
        body[1..9].copy_from_slice(&expiry.to_be_bytes());
        self.rng
            .fill(&mut body[9..])
            .map_err(|_| TokenError::Random)?;
        let tag = hmac::sign(&self.key, &mac_input(&body, pod_uid));
        Ok(format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(body),
            URL_SAFE_NO_PAD.encode(tag.as_ref())
        ))
    }

    /// Checks that `token` was issued to `pod_uid` and has not expired at `now`.
    pub fn verify(&self, token: &[u8], pod_uid: &str, now: SystemTime) -> Result<(), TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let token = std::str::from_utf8(token).map_err(|_| TokenError::Malformed)?;
        let (b, t) = token.split_once('.').ok_or(TokenError::Malformed)?;
        let body = URL_SAFE_NO_PAD
            .decode(b)
            .map_err(|_| TokenError::Malformed)?;
        let tag = URL_SAFE_NO_PAD
            .decode(t)
            .map_err(|_| TokenError::Malformed)?;
        if body.len() != BODY_LEN || body[0] != VERSION {
            return Err(TokenError::Malformed);
        }
        hmac::verify(&self.key, &mac_input(&body, pod_uid), &tag)
            .map_err(|_| TokenError::WrongCaller)?;
        let mut exp = [0u8; 8];
        exp.copy_from_slice(&body[1..9]);
        if unix_secs(now) >= u64::from_be_bytes(exp) {
            return Err(TokenError::Expired);
        }
        Ok(())
    }
}

fn mac_input(body: &[u8], pod_uid: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(body.len() + pod_uid.len());
    v.extend_from_slice(body);
    v.extend_from_slice(pod_uid.as_bytes());
    v
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    #[test]
    fn token_round_trips_for_its_pod() {
        let a = TokenAuthority::new().unwrap();
        let tok = a.issue("uid-a", 60, t0()).unwrap();
        assert!(tok.len() <= MAX_TOKEN_LEN);
        assert_eq!(
            a.verify(tok.as_bytes(), "uid-a", t0() + Duration::from_secs(59)),
            Ok(())
        );
    }

    #[test]
    fn token_for_other_pod_is_rejected() {
        let a = TokenAuthority::new().unwrap();
        let tok = a.issue("uid-a", 60, t0()).unwrap();
        assert_eq!(
            a.verify(tok.as_bytes(), "uid-b", t0()),
            Err(TokenError::WrongCaller)
        );
    }

    #[test]
    fn token_expires_at_ttl() {
        let a = TokenAuthority::new().unwrap();
        let tok = a.issue("uid-a", 60, t0()).unwrap();
        assert_eq!(
            a.verify(tok.as_bytes(), "uid-a", t0() + Duration::from_secs(60)),
            Err(TokenError::Expired)
        );
    }

    #[test]
    fn token_from_another_agent_instance_is_rejected() {
        let tok = TokenAuthority::new()
            .unwrap()
            .issue("uid-a", 60, t0())
            .unwrap();
        let other = TokenAuthority::new().unwrap();
        assert_eq!(
            other.verify(tok.as_bytes(), "uid-a", t0()),
            Err(TokenError::WrongCaller)
        );
    }

    #[test]
    fn tampered_expiry_is_rejected() {
        let a = TokenAuthority::new().unwrap();
        let tok = a.issue("uid-a", 1, t0()).unwrap();
        let (b, t) = tok.split_once('.').unwrap();
        let mut body = URL_SAFE_NO_PAD.decode(b).unwrap();
        body[1..9].copy_from_slice(&u64::MAX.to_be_bytes());
        let forged = format!("{}.{}", URL_SAFE_NO_PAD.encode(body), t);
        assert_eq!(
            a.verify(forged.as_bytes(), "uid-a", t0()),
            Err(TokenError::WrongCaller)
        );
    }

    #[test]
    fn garbage_tokens_are_malformed() {
        let a = TokenAuthority::new().unwrap();
        for bad in [
            &b""[..],
            b"abc",
            b"a.b",
            &[0xff; 10],
            &[b'a'; 4096],
            b"....",
            "é.é".as_bytes(),
        ] {
            assert_eq!(
                a.verify(bad, "uid-a", t0()),
                Err(TokenError::Malformed),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn ttl_bounds_follow_ec2() {
        assert_eq!(parse_ttl(b"1"), Ok(1));
        assert_eq!(parse_ttl(b"21600"), Ok(21600));
        for bad in [
            &b"0"[..],
            b"21601",
            b"-1",
            b"",
            b" 5",
            b"5.0",
            b"99999999999999999999",
            b"abc",
        ] {
            assert_eq!(parse_ttl(bad), Err(TokenError::InvalidTtl), "{bad:?}");
        }
    }

    #[test]
    fn debug_never_prints_the_key() {
        let a = TokenAuthority::new().unwrap();
        assert_eq!(format!("{a:?}"), "TokenAuthority { key: <redacted> }");
    }
}
