//! The plugin's input: `CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_ARGS` and the network config on
//! stdin, as the runtime hands them over. Any input gets an invocation or a CNI error, never a
//! panic; an error prints as JSON; what parses passes the agent's own validators.
//!
//! Input: the four parts separated by NUL bytes (`command\0container id\0CNI_ARGS\0stdin`); a
//! missing part is an unset variable.
#![no_main]

use irsa_imds_cni::cni::{self, Env, Invocation};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(4, |b| *b == 0);
    let mut text = || {
        parts
            .next()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .filter(|s| !s.is_empty())
    };
    let env = Env {
        command: text(),
        container_id: text(),
        args: text(),
        ifname: Some("eth0".into()),
        netns: Some("/var/run/netns/fuzz".into()),
    };
    let stdin = parts.next().unwrap_or_default();
    match cni::parse(&env, stdin) {
        Ok(Invocation::Add {
            container_id,
            pod: Some(pod),
            ..
        }) => {
            let req = irsa_imds_cni::agent::add_request(
                &container_id,
                &pod.namespace,
                &pod.name,
                &pod.ips,
            );
            assert!(
                req.validate().is_ok(),
                "a parsed ADD is one the agent accepts"
            );
        }
        Ok(_) => {}
        Err(e) => {
            let out = e.to_json(cni::requested_version(stdin));
            let v: serde_json::Value = serde_json::from_str(&out).expect("error JSON");
            assert!(v["code"].is_u64());
        }
    }
});
