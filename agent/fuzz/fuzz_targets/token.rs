//! IMDSv2 session token verification: arbitrary bytes never verify and never panic; a token
//! issued here verifies only for its own pod, and no single-byte change of it verifies.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use irsa_imds_agent::imds::TokenAuthority;
use libfuzzer_sys::fuzz_target;

fn authority() -> &'static TokenAuthority {
    static A: OnceLock<TokenAuthority> = OnceLock::new();
    A.get_or_init(|| TokenAuthority::new().expect("key"))
}

fuzz_target!(|data: &[u8]| {
    let now = UNIX_EPOCH + Duration::from_secs(1_795_000_000);
    let a = authority();
    assert!(a.verify(data, "pod-uid", now).is_err());
    if let Ok(t) = a.issue("pod-uid", 60, now) {
        assert!(a.verify(t.as_bytes(), "pod-uid", now).is_ok());
        assert!(a.verify(t.as_bytes(), "other-pod-uid", now).is_err());
        let mut forged = t.into_bytes();
        if !data.is_empty() && !forged.is_empty() {
            let i = data[0] as usize % forged.len();
            let before = forged[i];
            forged[i] ^= data.get(1).copied().unwrap_or(1).max(1);
            if forged[i] != before {
                // Canonical base64 and a MAC over the whole body: no other string verifies.
                assert!(a.verify(&forged, "pod-uid", now).is_err());
            }
        }
    }
    let _ = SystemTime::now();
});
