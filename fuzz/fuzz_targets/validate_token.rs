//! Bearer tokens → identity validation up to and including the signature check, against an
//! issuer whose keys cannot be fetched: any `Ok` is a bug (see checks.rs).
#![no_main]

use std::sync::OnceLock;

include!("../checks.rs");

fn setup() -> &'static (tokio::runtime::Runtime, Validator) {
    static V: OnceLock<(tokio::runtime::Runtime, Validator)> = OnceLock::new();
    V.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let v = fuzz_validator(&rt);
        (rt, v)
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (rt, validator) = setup();
    check_token(rt, validator, data);
});
