//! Header lines → `bearer_token` and the upstream header cleaning (see checks.rs).
#![no_main]

include!("../checks.rs");

libfuzzer_sys::fuzz_target!(|data: &[u8]| check_headers(data));
