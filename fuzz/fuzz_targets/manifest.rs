//! Fuzzes the manifest parser (`Manifest::from_canonical`) with the check the normal suite
//! runs on its seeds (`protocol/tests/fuzz_checks`).
#![no_main]

#[path = "../../protocol/tests/fuzz_checks/mod.rs"]
#[allow(dead_code)]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::manifest(data));
