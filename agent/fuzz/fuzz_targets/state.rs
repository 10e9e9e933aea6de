//! The state file parser: any bytes are a valid snapshot or a clear error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = irsa_imds_agent::pods::state::Snapshot::parse(data);
});
