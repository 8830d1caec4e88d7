// The SQL classifier's differential check, shared by the cargo-fuzz target
// (fuzz_targets/sql_classify.rs) and the stable in-process smoke run (tests/fuzz_smoke.rs), both
// via include!: `classify` against the sqlparser-based classifier it replaced
// (src/policy/sql/reference.rs). Same fingerprint always; same verdict unless `classify` is
// stricter for a documented lexical hazard the text shows.

mod sql_reference {
    #![allow(dead_code)]
    use aegis::policy::sql::*;
    include!("../src/policy/sql/reference.rs");
}

/// Arbitrary bytes (as lossy UTF-8) → `classify` agrees with the reference.
pub fn check_sql(data: &[u8]) {
    let sql = String::from_utf8_lossy(data);
    sql_reference::check_against_reference(&sql);
}
