//! The attack corpus: hostile tokens, headers and paths sent through the real Envoy to aegis.
//!
//! Every attack must end in a 401/403 from aegis (or a 400 from Envoy itself for bytes HTTP does
//! not allow), the sandbox workspace must see nothing, and the audit chain must hold a DENY row
//! with the expected reason under the trace id the agent got back. Tokens are crafted here where
//! the dev IdP would not make them; most are signed with the IdP's own keys
//! (`Sandbox::sign_idp_raw`), so a refusal can only come from what the token says, not from its
//! signature. One stack serves all cases of a test.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use support::*;

const ME: &str = "/api/2.0/preview/scim/v2/Me";

/// One hostile request and what aegis must answer.
struct Attack {
    name: String,
    method: &'static str,
    path: String,
    /// Raw header lines (name, value bytes); sent byte for byte over HTTP/1.1.
    headers: Vec<(String, Vec<u8>)>,
    status: u16,
    reason: &'static str,
}

impl Attack {
    fn bearer(name: impl Into<String>, token: &str, status: u16, reason: &'static str) -> Self {
        Attack {
            name: name.into(),
            method: "GET",
            path: ME.to_string(),
            headers: vec![(
                "authorization".into(),
                format!("Bearer {token}").into_bytes(),
            )],
            status,
            reason,
        }
    }

    fn invalid(name: impl Into<String>, token: &str) -> Self {
        Attack::bearer(name, token, 401, "invalid_token")
    }
}

/// A response read off a raw HTTP/1.1 connection.
#[derive(Debug)]
struct RawResp {
    status: u16,
    headers: HashMap<String, String>,
    body: Value,
    text: String,
}

/// Sends one request byte for byte (no client-side normalization of the path or the header
/// values) and reads the response until the server closes the connection.
async fn raw_send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(String, Vec<u8>)],
) -> RawResp {
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n").into_bytes();
    for (name, value) in headers {
        req.extend_from_slice(name.as_bytes());
        req.extend_from_slice(b": ");
        req.extend_from_slice(value);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"\r\n");
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connect to envoy");
        s.write_all(&req).await.expect("write request");
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.expect("read response");
        buf
    };
    let buf = tokio::time::timeout(Duration::from_secs(15), exchange)
        .await
        .expect("envoy answered within 15s");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    // Bodies may come chunked; the JSON object is the part between the outer braces.
    let json = match (body.find('{'), body.rfind('}')) {
        (Some(a), Some(b)) if a < b => serde_json::from_str(&body[a..=b]).unwrap_or(Value::Null),
        _ => Value::Null,
    };
    RawResp {
        status,
        headers,
        body: json,
        text,
    }
}

/// What the workspace saw, less aegis' own dependency probe (an unauthenticated GET of the
/// workspace's OAuth metadata from the operator console's health check): the traffic an attack
/// could have caused.
fn upstream(stack: &Stack) -> Vec<RequestRecord> {
    stack
        .sandbox
        .requests()
        .into_iter()
        .filter(|r| {
            !(r.method == "GET"
                && r.path == "/oidc/.well-known/oauth-authorization-server"
                && r.authorization_count == 0)
        })
        .collect()
}

fn envoy_addr(stack: &Stack) -> SocketAddr {
    stack.envoy.listener_addrs()[0]
}

/// Runs the attacks one by one; returns (trace id, expected reason) of each aegis deny.
async fn run_attacks(stack: &Stack, attacks: &[Attack]) -> Vec<(String, String, &'static str)> {
    let addr = envoy_addr(stack);
    let mut denies = Vec::new();
    for a in attacks {
        let before = upstream(stack).len();
        let r = raw_send(addr, a.method, &a.path, &a.headers).await;
        let after = upstream(stack);
        assert_eq!(
            after.len(),
            before,
            "{}: the sandbox saw the request: {:#?}",
            a.name,
            &after[before..]
        );
        if a.status == 400 && r.status == 400 && !r.headers.contains_key("x-aegis-trace-id") {
            // Envoy itself refused bytes HTTP does not allow: aegis never saw it.
            continue;
        }
        assert_eq!(r.status, a.status, "{}: {}", a.name, r.text);
        assert_eq!(r.body["error"], a.reason, "{}: {}", a.name, r.text);
        let trace = r
            .headers
            .get("x-aegis-trace-id")
            .unwrap_or_else(|| panic!("{}: no trace id: {}", a.name, r.text))
            .clone();
        assert_eq!(
            r.body["trace_id"].as_str(),
            Some(trace.as_str()),
            "{}",
            a.name
        );
        if a.status == 401 {
            assert!(
                r.headers
                    .get("www-authenticate")
                    .is_some_and(|v| v.starts_with("Bearer")),
                "{}: {}",
                a.name,
                r.text
            );
        }
        denies.push((a.name.clone(), trace, a.reason));
    }
    denies
}

/// Every deny has exactly one DENY row with its reason, under its trace id.
async fn assert_denies_audited(stack: &Stack, denies: &[(String, String, &'static str)]) {
    let rows = audit_rows(stack).await;
    let by_trace: HashMap<&str, &Value> = rows
        .iter()
        .filter_map(|r| Some((r["trace_id"].as_str()?, r)))
        .collect();
    for (name, trace, reason) in denies {
        let row = by_trace
            .get(trace.as_str())
            .unwrap_or_else(|| panic!("{name}: no audit row for trace {trace}"));
        assert_eq!(row["decision"], "DENY", "{name}: {row}");
        assert_eq!(row["reason"], *reason, "{name}: {row}");
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The claims the dev IdP would put in alice's token.
fn claims(stack: &Stack) -> serde_json::Map<String, Value> {
    let t = now();
    let v = json!({
        "iss": stack.sandbox.idp_url, "sub": "u-alice", "aud": "aegis", "azp": "copilot",
        "email": "alice@example.com", "iat": t - 5, "nbf": t - 5, "exp": t + 300,
    });
    v.as_object().cloned().unwrap()
}

fn rsa_header(stack: &Stack) -> serde_json::Map<String, Value> {
    let (rsa_kid, _) = stack.sandbox.idp_key_ids();
    json!({"alg": "RS256", "typ": "JWT", "kid": rsa_kid})
        .as_object()
        .cloned()
        .unwrap()
}

/// Signs (with the IdP's RSA key) alice's claims after `edit`, under the RS256 header after
/// `edit_header`.
fn signed(
    stack: &Stack,
    edit_header: impl FnOnce(&mut serde_json::Map<String, Value>),
    edit: impl FnOnce(&mut serde_json::Map<String, Value>),
) -> String {
    let mut h = rsa_header(stack);
    edit_header(&mut h);
    let mut c = claims(stack);
    edit(&mut c);
    stack.sandbox.sign_idp_raw(
        "RS256",
        Value::Object(h).to_string().as_bytes(),
        Value::Object(c).to_string().as_bytes(),
    )
}

fn with_claim(stack: &Stack, name: &str, value: Value) -> String {
    signed(
        stack,
        |_| {},
        |c| {
            c.insert(name.to_string(), value);
        },
    )
}

fn without_claim(stack: &Stack, name: &str) -> String {
    signed(
        stack,
        |_| {},
        |c| {
            c.remove(name);
        },
    )
}

fn with_header(stack: &Stack, name: &str, value: Value) -> String {
    signed(
        stack,
        |h| {
            h.insert(name.to_string(), value);
        },
        |_| {},
    )
}

/// `header.payload.signature` from raw parts (each base64url-encoded here).
fn compact(header: &[u8], payload: &[u8], sig: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        B64.encode(header),
        B64.encode(payload),
        B64.encode(sig)
    )
}

fn hs256(secret: &[u8], header: &Value, claims: &Value) -> String {
    use hmac::{Hmac, Mac};
    let input = format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    );
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
    mac.update(input.as_bytes());
    format!("{input}.{}", B64.encode(mac.finalize().into_bytes()))
}

/// The IdP's RSA public key as published, and as the PEM an HS256 confusion attack would use.
async fn rsa_public_forms(stack: &Stack) -> Vec<Vec<u8>> {
    use rsa::pkcs1::EncodeRsaPublicKey;
    use rsa::pkcs8::EncodePublicKey;
    let jwks: Value = http()
        .get(format!("{}/jwks", stack.sandbox.idp_url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let jwk = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kty"] == "RSA")
        .unwrap()
        .clone();
    let n = B64.decode(jwk["n"].as_str().unwrap()).unwrap();
    let e = B64.decode(jwk["e"].as_str().unwrap()).unwrap();
    let key = rsa::RsaPublicKey::new(
        rsa::BigUint::from_bytes_be(&n),
        rsa::BigUint::from_bytes_be(&e),
    )
    .unwrap();
    let spki = key.to_public_key_pem(rsa::pkcs8::LineEnding::LF).unwrap();
    let pkcs1 = key.to_pkcs1_pem(rsa::pkcs8::LineEnding::LF).unwrap();
    vec![
        spki.into_bytes(),
        pkcs1.into_bytes(),
        n,
        jwk.to_string().into_bytes(),
    ]
}

/// A TCP listener that counts connections: where a `jku`/`x5u` header points.
async fn connection_counter() -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        while let Ok((_s, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
        }
    });
    (url, count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_tokens_are_refused() {
    // A second trusted issuer, to check that keys are looked up by (issuer, kid).
    let other = sandbox::Sandbox::start(sandbox::SandboxOptions::default())
        .await
        .expect("second idp");
    let other_iss = other.idp_url.clone();
    let stack = start_with(StackOptions::new(AEGIS_BIN).with_config(move |cfg| {
        let issuers = cfg
            .get_mut("issuers")
            .and_then(|v| v.as_array_mut())
            .unwrap();
        let mut second = issuers[0].as_table().unwrap().clone();
        second.insert("name".into(), "other".into());
        second.insert("issuer".into(), other_iss.into());
        issuers.push(second.into());
    }))
    .await;
    let started = Instant::now();
    let (rsa_kid, ec_kid) = stack.sandbox.idp_key_ids();
    let good = token(&stack, "alice");
    stack.sandbox.clear_requests();

    // --- Unknown kid: one JWKS refresh, then deny; a flood stays within the rate limit. ---
    // aegis fetched the keys at start; its refresh limit is one per 10 s.
    tokio::time::sleep(Duration::from_secs(11).saturating_sub(started.elapsed())).await;
    let f0 = stack.sandbox.jwks_fetch_count();
    let unknown = with_header(&stack, "kid", json!("rotated-away-kid"));
    let denies = run_attacks(&stack, &[Attack::invalid("unknown kid", &unknown)]).await;
    assert_denies_audited(&stack, &denies).await;
    assert_eq!(
        stack.sandbox.jwks_fetch_count(),
        f0 + 1,
        "one refresh for an unknown kid"
    );
    let again = with_header(&stack, "kid", json!("another-unknown-kid"));
    run_attacks(&stack, &[Attack::invalid("unknown kid again", &again)]).await;
    assert_eq!(
        stack.sandbox.jwks_fetch_count(),
        f0 + 1,
        "the refresh is rate limited"
    );

    let flood_started = Instant::now();
    let f1 = stack.sandbox.jwks_fetch_count();
    let tokens: Vec<String> = (0..1000)
        .map(|i| {
            with_header(
                &stack,
                "kid",
                json!(format!("flood-{i}-{}", rand::random::<u64>())),
            )
        })
        .collect();
    let client = http();
    let url = format!("{}{ME}", stack.envoy_url());
    let statuses: Vec<(u16, String)> = futures_util::stream::iter(tokens)
        .map(|t| {
            let (client, url) = (client.clone(), url.clone());
            async move {
                let r = read(client.get(&url).bearer_auth(t).send().await.unwrap()).await;
                (
                    r.status,
                    r.body["error"].as_str().unwrap_or_default().to_string(),
                )
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let flood_secs = flood_started.elapsed().as_secs_f64();
    assert!(
        statuses
            .iter()
            .all(|(s, e)| *s == 401 && e == "invalid_token"),
        "{:?}",
        statuses.iter().find(|(s, _)| *s != 401)
    );
    let flood_fetches = stack.sandbox.jwks_fetch_count() - f1;
    let allowed = (flood_secs / 10.0).ceil() as u64 + 1;
    assert!(
        flood_fetches <= allowed,
        "{flood_fetches} JWKS fetches in {flood_secs:.1}s of kid flood (limit {allowed})"
    );
    eprintln!("kid flood: 1000 requests in {flood_secs:.1}s, {flood_fetches} JWKS fetches");
    let flood_rows = stack
        .postgres
        .query_json(
            "SELECT count(*) AS n FROM aegis_audit WHERE decision = 'DENY' AND reason = 'invalid_token'",
        )
        .await
        .unwrap();
    assert!(
        flood_rows[0]["n"].as_i64().unwrap() >= 1002,
        "{flood_rows:?}"
    );

    // --- Everything else. ---
    let (jku_url, jku_hits) = connection_counter().await;
    let c = claims(&stack);
    let cv = Value::Object(c.clone());
    let h = rsa_header(&stack);
    let (hp, _) = good.rsplit_once('.').unwrap();
    let mut attacks = Vec::new();

    // alg none and friends.
    for alg in ["none", "None", "nOnE", "NONE"] {
        let header = json!({"alg": alg, "typ": "JWT"}).to_string();
        let unsigned = format!("{}.{}.", B64.encode(&header), B64.encode(cv.to_string()));
        attacks.push(Attack::invalid(
            format!("alg {alg}, empty signature"),
            &unsigned,
        ));
        let with_sig = compact(header.as_bytes(), cv.to_string().as_bytes(), b"x");
        attacks.push(Attack::invalid(
            format!("alg {alg}, junk signature"),
            &with_sig,
        ));
        let with_kid = json!({"alg": alg, "kid": rsa_kid}).to_string();
        attacks.push(Attack::invalid(
            format!("alg {alg} with the RSA kid"),
            &format!("{}.{}.", B64.encode(&with_kid), B64.encode(cv.to_string())),
        ));
    }
    // HS256 with the RSA public key as the secret, in every form a confused verifier might use.
    for (i, secret) in rsa_public_forms(&stack).await.iter().enumerate() {
        for kid in [Some(rsa_kid.as_str()), None] {
            let mut header = json!({"alg": "HS256", "typ": "JWT"});
            if let Some(k) = kid {
                header["kid"] = json!(k);
            }
            attacks.push(Attack::invalid(
                format!("HS256 keyed with RSA public key form {i} (kid {kid:?})"),
                &hs256(secret, &header, &cv),
            ));
        }
    }
    attacks.push(Attack::invalid(
        "HS256 from the IdP's test secret",
        &stack.sandbox.mint_idp_token(&TokenRequest {
            alg: Some("HS256".into()),
            ..TokenRequest::new("alice")
        }),
    ));
    // Algorithms outside the allowlist, validly signed with the RSA key.
    for alg in ["RS384", "RS512", "PS256"] {
        attacks.push(Attack::invalid(
            format!("{alg} (not in the allowlist)"),
            &stack.sandbox.mint_idp_token(&TokenRequest {
                alg: Some(alg.into()),
                ..TokenRequest::new("alice")
            }),
        ));
    }
    for alg in ["ES384", "EdDSA", "HS512", "RS1", "", "RS256 "] {
        attacks.push(Attack::invalid(
            format!("alg {alg:?}"),
            &stack.sandbox.mint_idp_token(&TokenRequest {
                alg: Some(alg.into()),
                ..TokenRequest::new("alice")
            }),
        ));
    }
    // Key type / alg mismatch: ES256 under the RSA kid, RS256 under the EC kid.
    let es_under_rsa = stack.sandbox.sign_idp_raw(
        "ES256",
        json!({"alg": "ES256", "kid": rsa_kid})
            .to_string()
            .as_bytes(),
        cv.to_string().as_bytes(),
    );
    attacks.push(Attack::invalid(
        "ES256 signature under the RSA kid",
        &es_under_rsa,
    ));
    let rs_under_ec = with_header(&stack, "kid", json!(ec_kid));
    attacks.push(Attack::invalid(
        "RS256 signature under the EC kid",
        &rs_under_ec,
    ));
    let rs_header_ec_sig = stack.sandbox.sign_idp_raw(
        "ES256",
        json!({"alg": "RS256", "kid": ec_kid})
            .to_string()
            .as_bytes(),
        cv.to_string().as_bytes(),
    );
    attacks.push(Attack::invalid(
        "alg RS256 with an EC signature",
        &rs_header_ec_sig,
    ));
    // Empty, all-zero and degenerate ECDSA signatures.
    attacks.push(Attack::invalid("empty signature", &format!("{hp}.")));
    attacks.push(Attack::invalid(
        "all-zero RSA signature",
        &format!("{hp}.{}", B64.encode([0u8; 256])),
    ));
    let ec_hp = format!(
        "{}.{}",
        B64.encode(json!({"alg": "ES256", "kid": ec_kid}).to_string()),
        B64.encode(cv.to_string())
    );
    attacks.push(Attack::invalid(
        "ECDSA r=s=0",
        &format!("{ec_hp}.{}", B64.encode([0u8; 64])),
    ));
    let mut r0s1 = [0u8; 64];
    r0s1[63] = 1;
    attacks.push(Attack::invalid(
        "ECDSA r=0 s=1",
        &format!("{ec_hp}.{}", B64.encode(r0s1)),
    ));
    let mut ones = [0u8; 64];
    ones[31] = 1;
    ones[63] = 1;
    attacks.push(Attack::invalid(
        "ECDSA r=s=1",
        &format!("{ec_hp}.{}", B64.encode(ones)),
    ));
    attacks.push(Attack::invalid(
        "ECDSA with a DER signature",
        &format!(
            "{ec_hp}.{}",
            B64.encode([0x30, 0x06, 0x02, 0x01, 0x00, 0x02, 0x01, 0x00])
        ),
    ));
    // Hostile kids, validly signed.
    for (what, kid) in [
        (
            "kid ../",
            json!(format!("../../../../etc/passwd/{rsa_kid}")),
        ),
        ("kid SQL", json!(format!("{rsa_kid}' OR '1'='1"))),
        ("kid 10 KB", json!("k".repeat(10 * 1024))),
        ("kid NUL", json!(format!("{rsa_kid}\u{0}"))),
        (
            "kid CRLF",
            json!(format!("{rsa_kid}\r\nx-aegis-user: carol")),
        ),
        ("kid number", json!(1)),
        ("kid object", json!({"kid": rsa_kid})),
        ("kid null", Value::Null),
    ] {
        attacks.push(Attack::invalid(what, &with_header(&stack, "kid", kid)));
    }
    // Key-carrying headers: no fetch, no trust.
    let mut published = Value::Null;
    if let Ok(r) = http()
        .get(format!("{}/jwks", stack.sandbox.idp_url))
        .send()
        .await
    {
        published = r.json::<Value>().await.unwrap_or_default()["keys"][0].clone();
    }
    for (name, value) in [
        ("jku", json!(format!("{jku_url}/jwks"))),
        ("x5u", json!(format!("{jku_url}/cert.pem"))),
        ("jwk", published.clone()),
        (
            "x5c",
            json!(["MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA"]),
        ),
    ] {
        attacks.push(Attack::invalid(
            format!("{name} header"),
            &with_header(&stack, name, value),
        ));
    }
    // crit, typ, and an ID token.
    attacks.push(Attack::invalid(
        "unknown crit",
        &signed(
            &stack,
            |h| {
                h.insert("crit".into(), json!(["urn:example:must-understand"]));
                h.insert("urn:example:must-understand".into(), json!(true));
            },
            |_| {},
        ),
    ));
    attacks.push(Attack::invalid(
        "empty crit",
        &with_header(&stack, "crit", json!([])),
    ));
    for typ in [
        "JWE",
        "dpop+jwt",
        "id_token+jwt",
        "logout+jwt",
        "secevent+jwt",
    ] {
        attacks.push(Attack::invalid(
            format!("typ {typ}"),
            &with_header(&stack, "typ", json!(typ)),
        ));
    }
    attacks.push(Attack::invalid(
        "typ number",
        &with_header(&stack, "typ", json!(1)),
    ));
    attacks.push(Attack::invalid(
        "an ID token (aud = the agent's client id)",
        &signed(
            &stack,
            |_| {},
            |c| {
                c.insert("aud".into(), json!("copilot"));
                c.insert("nonce".into(), json!("n-0S6_WzA2Mj"));
                c.insert("at_hash".into(), json!("77QmUPtjPfzWtF2AnpK9RQ"));
            },
        ),
    ));
    attacks.push(Attack::invalid(
        "enc header",
        &with_header(&stack, "enc", json!("A256GCM")),
    ));
    // iss variants.
    let iss = stack.sandbox.idp_url.clone();
    for (what, v, reason) in [
        (
            "iss trailing slash",
            json!(format!("{iss}/")),
            "untrusted_issuer",
        ),
        (
            "iss upper case",
            json!(iss.to_uppercase()),
            "untrusted_issuer",
        ),
        (
            "iss with a space",
            json!(format!(" {iss}")),
            "untrusted_issuer",
        ),
        ("iss array", json!([iss]), "invalid_token"),
        ("iss number", json!(1), "invalid_token"),
        ("iss null", Value::Null, "invalid_token"),
    ] {
        attacks.push(Attack::bearer(
            what,
            &with_claim(&stack, "iss", v),
            401,
            reason,
        ));
    }
    attacks.push(Attack::invalid(
        "iss missing",
        &without_claim(&stack, "iss"),
    ));
    // aud variants.
    attacks.push(Attack::invalid(
        "aud missing",
        &without_claim(&stack, "aud"),
    ));
    for (what, v) in [
        ("aud wrong", json!("someone-else")),
        ("aud []", json!([])),
        ("aud number", json!(7)),
        ("aud null", Value::Null),
        ("aud object", json!({"aud": "aegis"})),
        ("aud prefix", json!("aegis-admin")),
        ("aud case", json!("AEGIS")),
    ] {
        attacks.push(Attack::invalid(what, &with_claim(&stack, "aud", v)));
    }
    // sub and identity claims.
    attacks.push(Attack::invalid(
        "sub object",
        &with_claim(&stack, "sub", json!({"id": "u-carol"})),
    ));
    attacks.push(Attack::invalid(
        "sub array",
        &with_claim(&stack, "sub", json!(["u-carol"])),
    ));
    attacks.push(Attack::bearer(
        "email missing",
        &without_claim(&stack, "email"),
        403,
        "no_databricks_identity",
    ));
    attacks.push(Attack::bearer(
        "email as array",
        &with_claim(&stack, "email", json!(["carol@example.com"])),
        403,
        "no_databricks_identity",
    ));
    // exp, nbf, iat.
    let t = now();
    attacks.push(Attack::invalid(
        "exp missing",
        &without_claim(&stack, "exp"),
    ));
    for (what, v) in [
        ("exp string", json!((t + 300).to_string())),
        ("exp float", json!(t as f64 + 300.5)),
        ("exp overflowing u64", json!(u64::MAX)),
        ("exp 1e30", json!(1e30)),
        ("exp negative huge", json!(i64::MIN)),
        ("exp null", Value::Null),
        ("exp bool", json!(true)),
    ] {
        let reason = "invalid_token";
        attacks.push(Attack::bearer(
            what,
            &with_claim(&stack, "exp", v),
            401,
            reason,
        ));
    }
    attacks.push(Attack::invalid(
        "exp i64::MAX",
        &with_claim(&stack, "exp", json!(i64::MAX)),
    ));
    attacks.push(Attack::bearer(
        "expired just outside the leeway",
        &with_claim(&stack, "exp", json!(t - 45)),
        401,
        "token_expired",
    ));
    attacks.push(Attack::invalid(
        "nbf in the future",
        &with_claim(&stack, "nbf", json!(t + 120)),
    ));
    attacks.push(Attack::invalid(
        "nbf string",
        &with_claim(&stack, "nbf", json!("0")),
    ));
    attacks.push(Attack::invalid(
        "iat in the future",
        &with_claim(&stack, "iat", json!(t + 120)),
    ));
    attacks.push(Attack::invalid(
        "iat float",
        &with_claim(&stack, "iat", json!(t as f64 - 0.5)),
    ));
    // Shapes.
    let parts: Vec<&str> = good.split('.').collect();
    attacks.push(Attack::invalid(
        "JWE (five parts)",
        &format!(
            "{}.{}.{}.{}.{}",
            B64.encode(r#"{"alg":"RSA-OAEP","enc":"A256GCM"}"#),
            "x",
            parts[1],
            "y",
            "z"
        ),
    ));
    attacks.push(Attack::invalid(
        "JWS JSON serialization",
        &json!({"payload": parts[1], "protected": parts[0], "signature": parts[2]}).to_string(),
    ));
    attacks.push(Attack::invalid(
        "flattened JSON without commas",
        &format!("{{\"payload\":\"{}\"}}", parts[1]),
    ));
    attacks.push(Attack::invalid("trailing dot", &format!("{good}.")));
    attacks.push(Attack::invalid("leading dot", &format!(".{good}")));
    attacks.push(Attack::invalid("double dot", &good.replacen('.', "..", 1)));
    attacks.push(Attack::invalid(
        "two parts",
        &format!("{}.{}", parts[0], parts[1]),
    ));
    attacks.push(Attack::invalid("one part", parts[1]));
    attacks.push(Attack::invalid(
        "standard base64 (+/)",
        &format!("{}.{}.{}+/", parts[0], parts[1], parts[2]),
    ));
    attacks.push(Attack::invalid(
        "padded base64",
        &format!("{}.{}=.{}", parts[0], parts[1], parts[2]),
    ));
    attacks.push(Attack::invalid(
        "non-base64 bytes",
        &format!("{}.{}.{}*", parts[0], parts[1], parts[2]),
    ));
    attacks.push(Attack::invalid(
        "duplicate claims",
        &stack.sandbox.sign_idp_raw(
            "RS256",
            Value::Object(h.clone()).to_string().as_bytes(),
            cv.to_string()
                .replacen('{', "{\"email\":\"carol@example.com\",", 1)
                .as_bytes(),
        ),
    ));
    attacks.push(Attack::invalid(
        "duplicate alg in the header",
        &stack.sandbox.sign_idp_raw(
            "RS256",
            format!("{{\"alg\":\"RS256\",\"kid\":\"{rsa_kid}\",\"alg\":\"none\"}}").as_bytes(),
            cv.to_string().as_bytes(),
        ),
    ));
    attacks.push(Attack::invalid(
        "non-UTF-8 payload",
        &stack.sandbox.sign_idp_raw(
            "RS256",
            Value::Object(h.clone()).to_string().as_bytes(),
            &[b"{\"email\":\"".as_slice(), &[0xff, 0xfe, 0xc3], b"\"}"].concat(),
        ),
    ));
    attacks.push(Attack::invalid(
        "payload not an object",
        &stack.sandbox.sign_idp_raw(
            "RS256",
            Value::Object(h.clone()).to_string().as_bytes(),
            b"[1,2]",
        ),
    ));
    attacks.push(Attack::invalid(
        "payload with trailing data",
        &stack.sandbox.sign_idp_raw(
            "RS256",
            Value::Object(h.clone()).to_string().as_bytes(),
            format!("{cv}{{}}").as_bytes(),
        ),
    ));
    let nested = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    attacks.push(Attack::invalid(
        "deeply nested claim",
        &stack.sandbox.sign_idp_raw(
            "RS256",
            Value::Object(h.clone()).to_string().as_bytes(),
            cv.to_string()
                .replacen('{', &format!("{{\"deep\":{nested},"), 1)
                .as_bytes(),
        ),
    ));
    attacks.push(Attack::invalid(
        "deeply nested header",
        &stack.sandbox.sign_idp_raw(
            "RS256",
            format!("{{\"alg\":\"RS256\",\"x\":{nested}}}").as_bytes(),
            cv.to_string().as_bytes(),
        ),
    ));
    attacks.push(Attack::invalid(
        "token over the 16 KB cap",
        &signed(
            &stack,
            |_| {},
            |c| {
                c.insert("pad".into(), json!("p".repeat(16 * 1024)));
            },
        ),
    ));
    // The same kid under two issuers: issuer B's key never verifies issuer A's tokens.
    let (other_rsa, _) = other.idp_key_ids();
    let forged_a = other.sign_idp_raw(
        "RS256",
        json!({"alg": "RS256", "kid": rsa_kid})
            .to_string()
            .as_bytes(),
        cv.to_string().as_bytes(),
    );
    attacks.push(Attack::invalid(
        "issuer B's key under issuer A's iss and kid",
        &forged_a,
    ));
    let a_kid_b_iss = {
        let mut c = c.clone();
        c.insert("iss".into(), json!(other.idp_url));
        stack.sandbox.sign_idp_raw(
            "RS256",
            json!({"alg": "RS256", "kid": rsa_kid})
                .to_string()
                .as_bytes(),
            Value::Object(c).to_string().as_bytes(),
        )
    };
    attacks.push(Attack::invalid(
        "issuer A's key and kid under issuer B's iss",
        &a_kid_b_iss,
    ));
    let b_kid_a_iss = stack.sandbox.sign_idp_raw(
        "RS256",
        json!({"alg": "RS256", "kid": other_rsa})
            .to_string()
            .as_bytes(),
        cv.to_string().as_bytes(),
    );
    attacks.push(Attack::invalid(
        "issuer B's kid under issuer A's iss",
        &b_kid_a_iss,
    ));
    // Claims that would become header values or audit fields.
    for (claim, v) in [
        (
            "email",
            "alice@example.com\r\nx-aegis-user: carol@example.com",
        ),
        ("email", "alice@example.com\u{0}carol"),
        ("azp", "copilot\r\nauthorization: Bearer stolen"),
        ("sub", "u-alice\ninjected"),
    ] {
        attacks.push(Attack::invalid(
            format!("control characters in {claim}"),
            &with_claim(&stack, claim, json!(v)),
        ));
    }

    // Credentials in the wrong place or shape.
    let auth = |v: &str| ("authorization".to_string(), v.as_bytes().to_vec());
    let plain =
        |name: &str, headers: Vec<(String, Vec<u8>)>, status: u16, reason: &'static str| Attack {
            name: name.to_string(),
            method: "GET",
            path: ME.to_string(),
            headers,
            status,
            reason,
        };
    attacks.push(plain(
        "two authorization headers",
        vec![
            auth(&format!("Bearer {good}")),
            auth(&format!("Bearer {unknown}")),
        ],
        401,
        "invalid_token",
    ));
    attacks.push(plain(
        "the same token twice",
        vec![
            auth(&format!("Bearer {good}")),
            auth(&format!("Bearer {good}")),
        ],
        401,
        "invalid_token",
    ));
    attacks.push(plain(
        "empty bearer",
        vec![auth("Bearer ")],
        401,
        "missing_credentials",
    ));
    attacks.push(plain(
        "bare Bearer",
        vec![auth("Bearer")],
        401,
        "missing_credentials",
    ));
    attacks.push(plain(
        "empty authorization",
        vec![auth("")],
        401,
        "missing_credentials",
    ));
    attacks.push(plain(
        "Basic",
        vec![auth("Basic YWxpY2U6cGFzc3dvcmQ=")],
        401,
        "missing_credentials",
    ));
    attacks.push(plain(
        "Basic carrying the JWT",
        vec![auth(&format!("Basic {good}"))],
        401,
        "missing_credentials",
    ));
    attacks.push(plain(
        "token without scheme",
        vec![auth(&good)],
        401,
        "invalid_token",
    ));
    attacks.push(plain(
        "bearer with an inner space",
        vec![auth(&format!("Bearer {} {}", parts[0], parts[1]))],
        401,
        "invalid_token",
    ));
    attacks.push(plain(
        "bearer with a tab",
        vec![auth(&format!("Bearer\t{good}"))],
        401,
        "invalid_token",
    ));
    attacks.push(plain(
        "bearer with a NUL byte",
        vec![(
            "authorization".into(),
            [format!("Bearer {good}").as_bytes(), b"\0"].concat(),
        )],
        400,
        "invalid_token",
    ));
    attacks.push(Attack {
        name: "token in the query string".into(),
        method: "GET",
        path: format!("{ME}?access_token={good}"),
        headers: vec![],
        status: 401,
        reason: "missing_credentials",
    });
    attacks.push(plain(
        "token in a cookie",
        vec![("cookie".into(), format!("access_token={good}").into_bytes())],
        401,
        "missing_credentials",
    ));
    attacks.push(plain(
        "token in x-forwarded-access-token",
        vec![("x-forwarded-access-token".into(), good.clone().into_bytes())],
        401,
        "missing_credentials",
    ));

    let tried = attacks.len();
    let denies = run_attacks(&stack, &attacks).await;
    assert_denies_audited(&stack, &denies).await;
    assert_eq!(
        jku_hits.load(Ordering::SeqCst),
        0,
        "aegis fetched a jku/x5u"
    );
    assert!(upstream(&stack).is_empty(), "{:#?}", upstream(&stack));
    assert_eq!(stack.sandbox.exchange_count("alice@example.com"), 0);
    eprintln!(
        "attack corpus: {} token/header cases + 1002 unknown kids, {} denied by aegis and audited",
        tried,
        denies.len()
    );

    // The control: the same machinery lets a good token through, also one that expired but is
    // still inside the 30 s leeway.
    let inside = with_claim(&stack, "exp", json!(now() - 10));
    for (what, t) in [
        ("good token", &good),
        ("expired inside the leeway", &inside),
    ] {
        let r = get(&stack, ME, Some(t)).await;
        assert_eq!(r.status, 200, "{what}: {}", r.text);
        assert_eq!(r.body["userName"], "alice@example.com", "{what}");
    }
    stack.shutdown().await;
    other.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggled_headers_and_path_tricks_do_not_get_through() {
    let stack = start().await;
    let alice = token(&stack, "alice");
    let addr = envoy_addr(&stack);

    // Header smuggling on an allowed request: forged x-aegis-*, a forged trace suffix, a second
    // credential header; upstream sees exactly one authorization, the service's.
    let headers: Vec<(String, Vec<u8>)> = vec![
        (
            "authorization".into(),
            format!("Bearer {alice}").into_bytes(),
        ),
        ("x-aegis-user".into(), b"carol@example.com".to_vec()),
        ("X-Aegis-Decision".into(), b"allow".to_vec()),
        (
            "x-aegis-trace-id".into(),
            b"00000000000000000000000000000000".to_vec(),
        ),
        (
            "user-agent".into(),
            // Forged products at the start of a part, and inside one (after `(` or `;`), where
            // a join on the user-agent string would find them just as well.
            b"copilot/1.0 aegis/9.9.9 aegis-trace/deadbeefdeadbeefdeadbeefdeadbeef \
              x(aegis-trace/deadbeefdeadbeefdeadbeefdeadbeef) foo;AEGIS/9.9.9 \
              python/3.11Aegis-Trace/deadbeefdeadbeefdeadbeefdeadbeef"
                .to_vec(),
        ),
        ("x-databricks-org-id".into(), b"1".to_vec()),
    ];
    let r = raw_send(addr, "GET", ME, &headers).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["userName"], "alice@example.com");
    let trace = r.headers["x-aegis-trace-id"].clone();
    assert_ne!(trace, "00000000000000000000000000000000");
    let seen = upstream(&stack);
    let seen: Vec<_> = seen.iter().filter(|r| r.service != "oauth2").collect();
    assert_eq!(seen.len(), 1, "{seen:#?}");
    let up = seen[0];
    assert_eq!(up.authorization_count, 1, "{up:?}");
    assert_eq!(up.authorization_kind, "databricks_token", "{up:?}");
    assert_eq!(up.user.as_deref(), Some("alice@example.com"));
    assert_eq!(
        up.x_aegis_headers,
        vec!["x-aegis-trace-id".to_string()],
        "{up:?}"
    );
    assert_eq!(up.trace_id.as_deref(), Some(trace.as_str()), "{up:?}");
    let ua = up.user_agent.clone().unwrap_or_default();
    assert!(!ua.contains("deadbeef") && !ua.contains("9.9.9"), "{ua}");
    let lower = ua.to_ascii_lowercase();
    assert_eq!(lower.matches("aegis-trace/").count(), 1, "{ua}");
    assert_eq!(lower.matches("aegis/").count(), 1, "{ua}");
    assert!(ua.ends_with(&format!("aegis-trace/{trace}")), "{ua}");
    // What is not forged is passed on.
    assert!(
        ua.starts_with("copilot/1.0 x() foo; python/3.11 aegis/"),
        "{ua}"
    );
    // A user agent with control characters is not passed on raw.
    let r = raw_send(
        addr,
        "GET",
        ME,
        &[
            (
                "authorization".into(),
                format!("Bearer {alice}").into_bytes(),
            ),
            (
                "user-agent".into(),
                b"copilot/1.0 \x01evil aegis-trace/x".to_vec(),
            ),
        ],
    )
    .await;
    assert!(r.status == 200 || r.status == 400, "{}", r.text);
    let expected_allows = if r.status == 200 { 2 } else { 1 };
    if r.status == 200 {
        let last = upstream(&stack).pop().unwrap();
        let ua = last.user_agent.unwrap_or_default();
        assert!(
            !ua.contains('\u{1}') && !ua.contains("aegis-trace/x "),
            "{ua}"
        );
    }
    stack.sandbox.clear_requests();

    // Path tricks against the agent-safe defaults (PAT creation, secrets, token management,
    // SCIM writes, account APIs).
    let auth = vec![(
        "authorization".to_string(),
        format!("Bearer {alice}").into_bytes(),
    )];
    let mut attacks = Vec::new();
    let spellings = [
        ("POST", "/api/2.0/token/create"),
        ("POST", "/API/2.0/TOKEN/CREATE"),
        ("POST", "//api//2.0//token//create"),
        ("POST", "/api/2.0/./token/create"),
        ("POST", "/api/2.0/sql/../token/create"),
        ("POST", "/api/2.0/sql/statements/../../token/create"),
        ("POST", "/api/2.0/%74oken/create"),
        ("POST", "/api/2.0/token%2fcreate"),
        ("POST", "/api/2.0/token%2Fcreate"),
        ("POST", "/api/2.0/token%252fcreate"),
        ("POST", "/api/2.0/%2e/token/create"),
        ("POST", "/api/2.0/sql/%2e%2e/token/create"),
        ("POST", "/api/2.0/sql/%252e%252e/token/create"),
        ("POST", "/api/2.0/token/create;x=1"),
        ("POST", "/api/2.0/token/create/"),
        ("POST", "/api/2.0/token/create?next=/api/2.0/sql"),
        ("POST", "/api/2.0/token/create#frag"),
        ("POST", "/api/2.0\\token\\create"),
        ("POST", "/api/2.0/token/create%3Bx"),
        ("POST", "/api/2.0/token/create%3Fx=1"),
        ("POST", "/api/2.0/token/create%253F"),
        ("GET", "/api/2.0/secrets%3F/get"),
        ("post", "/api/2.0/token/create"),
        ("GET", "/api/2.0/secrets/list?scope=prod"),
        ("GET", "/api/2.0/SeCrEtS/get"),
        ("GET", "/api/2.0/secrets"),
        ("GET", "/api/2.0/workspace/../secrets/get"),
        ("GET", "/api/2.0/%73ecrets/get"),
        ("DELETE", "/api/2.0/token-management/tokens/1"),
        ("GET", "/api/2.0/token-management"),
        ("PATCH", "/api/2.0/preview/scim/v2/Users/1"),
        ("POST", "/api/2.0/preview/scim/v2/Me/../Users"),
        ("GET", "/api/2.0/accounts/1/users"),
        (
            "PATCH",
            "/api/2.1/unity-catalog/permissions/table/main.sales.orders",
        ),
        ("PUT", "/api/2.0/permissions/clusters/1"),
    ];
    for (method, path) in spellings {
        attacks.push(Attack {
            name: format!("{method} {path}"),
            method,
            path: path.to_string(),
            headers: auth.clone(),
            status: 403,
            reason: "path_blocked",
        });
    }
    // Envoy may itself refuse some spellings with 400 (an absolute-form target, a fragment);
    // either way nothing reaches the workspace (run_attacks checks) and no allow is recorded.
    for a in attacks.iter_mut() {
        if a.path.contains('#') || a.method == "post" {
            a.status = 400;
        }
    }
    let denies = run_attacks(&stack, &attacks).await;
    assert_denies_audited(&stack, &denies).await;
    assert!(denies.len() >= spellings.len() - 2, "{denies:?}");
    let allows = stack
        .postgres
        .query_json("SELECT path FROM aegis_audit WHERE decision = 'ALLOW'")
        .await
        .unwrap();
    assert_eq!(
        allows.len(),
        expected_allows,
        "only the smuggling requests were allowed: {allows:?}"
    );
    assert!(upstream(&stack).is_empty(), "{:#?}", upstream(&stack));
    eprintln!(
        "path tricks: {} spellings, {} denied by aegis, the rest refused by envoy",
        spellings.len(),
        denies.len()
    );
    stack.shutdown().await;
}

/// An agent cannot turn its IdP JWT into a raw Databricks token at the workspace's (or the
/// account's) OAuth endpoints: the token-exchange POST that `databricks-sql-connector` sends on
/// its own is refused at once with aegis' OAuth-shaped error, nothing reaches the workspace, and
/// the chain records `path_blocked`. The metadata documents stay reachable (positive control).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cannot_exchange_its_jwt_for_a_databricks_token() {
    let stack = start().await;
    let alice = token(&stack, "alice");
    let client = http();
    let base = stack.envoy_url();
    let form = [
        (
            "grant_type",
            "urn:ietf:params:oauth:grant-type:token-exchange",
        ),
        ("subject_token", alice.as_str()),
        ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
        ("scope", "all-apis"),
    ];
    let mut denies = Vec::new();
    for path in [
        "/oidc/v1/token",
        "/OIDC/V1/Token/",
        "//oidc/v1/./token",
        "/oidc/v1/%74oken",
        "/oidc/accounts/7f3e2c1a/v1/token",
    ] {
        let before = upstream(&stack).len();
        let r = read(
            client
                .post(format!("{base}{path}"))
                .bearer_auth(&alice)
                .form(&form)
                .send()
                .await
                .expect("request through envoy"),
        )
        .await;
        assert_eq!(
            upstream(&stack).len(),
            before,
            "{path}: reached the workspace"
        );
        // RFC 6749 section 5.2: unauthorized_client is a 400.
        assert_eq!(r.status, 400, "{path}: {}", r.text);
        assert_eq!(r.body["error"], "unauthorized_client", "{path}: {}", r.text);
        assert!(
            r.body["error_description"].is_string(),
            "{path}: {}",
            r.text
        );
        let trace = r.trace_id();
        assert_eq!(r.body["trace_id"], trace.as_str(), "{path}");
        assert_eq!(
            r.body.as_object().map(|o| o.len()),
            Some(3),
            "{path}: only error, error_description and trace_id: {}",
            r.text
        );
        assert!(!r.text.contains("access_token"), "{path}: {}", r.text);
        assert!(
            r.header("content-type")
                .is_some_and(|v| v.starts_with("application/json")),
            "{path}"
        );
        denies.push((format!("POST {path}"), trace, "path_blocked"));
    }
    // The authorize endpoints are blocked too, with the ordinary policy deny.
    for path in [
        "/oidc/v1/authorize?client_id=databricks-cli&response_type=code",
        "/oidc/accounts/7f3e2c1a/v1/authorize?client_id=x&response_type=code",
    ] {
        let before = upstream(&stack).len();
        let r = get(&stack, path, Some(&alice)).await;
        assert_eq!(
            upstream(&stack).len(),
            before,
            "{path}: reached the workspace"
        );
        assert_eq!(r.status, 403, "{path}: {}", r.text);
        assert_eq!(r.body["error"], "path_blocked", "{path}: {}", r.text);
        let trace = r.trace_id();
        assert_eq!(r.body["trace_id"], trace.as_str(), "{path}");
        denies.push((format!("GET {path}"), trace, "path_blocked"));
    }
    assert_denies_audited(&stack, &denies).await;

    // Positive control: the public metadata documents are still served through Envoy.
    for path in [
        "/oidc/.well-known/oauth-authorization-server",
        "/oidc/.well-known/openid-configuration",
        "/.well-known/databricks-config",
    ] {
        let r = get(&stack, path, Some(&alice)).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text);
        assert!(r.body.is_object(), "{path}: {}", r.text);
    }
    let rows = audit_rows(&stack).await;
    assert_eq!(
        rows.iter().filter(|r| r["decision"] == "ALLOW").count(),
        3,
        "{rows:#?}"
    );
    stack.shutdown().await;
}
