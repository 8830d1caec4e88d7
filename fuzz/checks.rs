// The invariants the fuzz targets check, shared by the cargo-fuzz targets (fuzz_targets/*.rs)
// and the stable in-process smoke run in `make test` (tests/fuzz_smoke.rs), both via include!.
// Each function takes arbitrary bytes and panics when an invariant breaks.

use std::collections::HashMap;
use std::time::Duration;

use aegis::authz::headers::{bearer_token, clean_user_agent, client_aegis_headers, MAX_TOKEN_LEN};
use aegis::config::{Config, IssuerConfig};
use aegis::identity::Validator;
use aegis::policy::normalize_path;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::Algorithm;

/// Header lines → `bearer_token`, `clean_user_agent`, `client_aegis_headers`: an accepted token
/// is non-empty, within the cap, printable and comma-free; no forged aegis product (anywhere)
/// or control character survives in a user agent.
pub fn check_headers(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    // "name: value" lines, as Envoy hands them over (lower-case names, repeats comma-joined).
    let mut headers: HashMap<String, String> = HashMap::new();
    for line in text.split('\n') {
        let (k, v) = line.split_once(':').unwrap_or(("authorization", line));
        headers
            .entry(k.trim().to_ascii_lowercase())
            .and_modify(|old| {
                old.push(',');
                old.push_str(v);
            })
            .or_insert_with(|| v.to_string());
    }
    if let Ok(token) = bearer_token(&headers) {
        assert!(!token.is_empty() && token.len() <= MAX_TOKEN_LEN);
        assert!(token.bytes().all(|b| b > b' ' && b < 0x7f && b != b','));
    }
    let ua = clean_user_agent(&text);
    assert!(ua.len() <= 512);
    assert!(!ua.chars().any(|c| c.is_control()));
    // Nowhere, not only at the start of a part: `x(aegis-trace/<id>` forges the join as well.
    let lower = ua.to_ascii_lowercase();
    assert!(!lower.contains("aegis/") && !lower.contains("aegis-trace/"));
    for h in client_aegis_headers(&headers) {
        assert!(h.starts_with("x-aegis-") && h != "x-aegis-trace-id");
    }
}

/// Raw paths → `normalize_path`: absolute, no empty/`.`/`..` segment, no `\`, and stable when
/// normalized again (unless an escape or a decoded `?`/`#` is left, which the policy handles).
pub fn check_path(data: &[u8]) {
    let raw = String::from_utf8_lossy(data);
    let once = normalize_path(&raw);
    assert!(once.starts_with('/'));
    assert!(!once.contains('\\'));
    if once != "/" {
        for seg in once[1..].split('/') {
            assert!(
                !seg.is_empty() && seg != "." && seg != "..",
                "{raw:?} -> {once:?}"
            );
        }
    }
    if !once.contains(['%', '?', '#']) {
        assert_eq!(once, normalize_path(&once), "{raw:?}");
    }
}

/// TOML text → `Config::parse`: no panic; a refusal names at least one error.
pub fn check_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let env: HashMap<String, String> = HashMap::from([("HOME".into(), "/home/x".into())]);
    if let Err(errors) = Config::parse(text, std::path::Path::new("/nonexistent"), &env) {
        assert!(!errors.to_string().is_empty());
    }
}

/// A validator whose only issuer's JWKS is unreachable (127.0.0.1:1): nothing can verify.
pub fn fuzz_validator(rt: &tokio::runtime::Runtime) -> Validator {
    let issuer = IssuerConfig {
        name: "fuzz".into(),
        issuer: "https://idp.example".into(),
        audiences: vec!["aegis".into()],
        jwks_uri: "http://127.0.0.1:1/jwks".parse().ok(),
        algorithms: vec![Algorithm::RS256, Algorithm::ES256],
        username_claim: "email".into(),
        agent_claim: "azp".into(),
        leeway: Duration::from_secs(30),
        max_key_age: Duration::from_secs(3600),
    };
    let http = rt.block_on(async {
        reqwest::Client::builder()
            .timeout(Duration::from_millis(200))
            .build()
            .expect("http client")
    });
    Validator::new(&[issuer], http)
}

/// Half the inputs are tokens as is; the other half are split on 0xFF into header, payload and
/// signature and base64url-encoded, so the JSON parsers behind the encoding are reached.
pub fn token_from(data: &[u8]) -> String {
    match data.split_first() {
        Some((b, rest)) if b % 2 == 1 => {
            let mut parts = rest.splitn(3, |b| *b == 0xff);
            let enc = |p: Option<&[u8]>| URL_SAFE_NO_PAD.encode(p.unwrap_or_default());
            format!(
                "{}.{}.{}",
                enc(parts.next()),
                enc(parts.next()),
                enc(parts.next())
            )
        }
        _ => String::from_utf8_lossy(data).into_owned(),
    }
}

/// Token bytes → `Validator::validate`: no panic, and nothing verifies without a key.
pub fn check_token(rt: &tokio::runtime::Runtime, validator: &Validator, data: &[u8]) {
    let token = token_from(data);
    let verdict = rt.block_on(validator.validate(&token));
    assert!(
        verdict.is_err(),
        "a token verified without any key: {token:?}"
    );
}
