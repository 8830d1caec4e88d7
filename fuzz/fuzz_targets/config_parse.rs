//! Config text → `Config::parse` (see checks.rs).
#![no_main]

include!("../checks.rs");

libfuzzer_sys::fuzz_target!(|data: &[u8]| check_config(data));
