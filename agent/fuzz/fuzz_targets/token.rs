//! IMDSv2 session token verification: arbitrary bytes never verify and never panic; a token
//! issued here verifies only for its own pod.
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
        let mut forged = t.into_bytes();
        if !data.is_empty() && !forged.is_empty() {
            let i = data[0] as usize % forged.len();
            let before = forged[i];
            forged[i] ^= data.get(1).copied().unwrap_or(1).max(1);
            if forged[i] != before {
                let _ = a.verify(&forged, "pod-uid", now);
            }
        }
    }
    let _ = SystemTime::now();
});
