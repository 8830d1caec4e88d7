//! SQL texts → `classify` against the sqlparser-based reference (see sql_check.rs).
#![no_main]

include!("../sql_check.rs");

libfuzzer_sys::fuzz_target!(|data: &[u8]| check_sql(data));
