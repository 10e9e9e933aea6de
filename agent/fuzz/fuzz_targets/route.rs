//! Request head -> route: any method, path and header bytes; never a panic, and an upstream
//! route only ever carries a path of [A-Za-z0-9._/-] without dot segments.
#![no_main]

use irsa_imds_agent::imds::{Policy, Route, route};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |b| *b == b'\n');
    let (m, p, h) = (parts.next(), parts.next(), parts.next());
    let Ok(method) = http::Method::from_bytes(m.unwrap_or(b"GET")) else {
        return;
    };
    let path = String::from_utf8_lossy(p.unwrap_or(b"/"));
    let mut headers = http::HeaderMap::new();
    if let Some(v) = h.and_then(|v| http::HeaderValue::from_bytes(v).ok()) {
        headers.insert("x-aws-ec2-metadata-token-ttl-seconds", v.clone());
        headers.insert("x-aws-ec2-metadata-token", v);
    }
    let policy = Policy {
        upstream_allow: vec![
            "meta-data/placement/*".into(),
            "meta-data/instance-id".into(),
            "dynamic/instance-identity/document".into(),
        ],
        v2_required: false,
    };
    if let Ok(Route::Upstream { path }) = route(&method, &path, &headers, &policy) {
        let p = path.as_str();
        assert!(p.bytes().all(irsa_imds_agent::imds::is_path_byte), "{p:?}");
        assert!(!p.split('/').any(|s| s == ".." || s == "."), "{p:?}");
        assert!(!p.contains("//"), "{p:?}");
    }
});
