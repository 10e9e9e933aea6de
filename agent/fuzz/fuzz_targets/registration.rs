//! The CNI registration socket's message parser: any line gets a clear error or a valid op.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = irsa_imds_agent::pods::registration::parse(data);
});
