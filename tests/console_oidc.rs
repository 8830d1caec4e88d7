//! Console sign-in through the IdP (OIDC authorization code + PKCE against the sandbox IdP),
//! driven over HTTP the way a browser does it (the headless-browser run is tests/console.rs):
//! roles from the `aegis_roles` claim, a refused action that writes nothing, each action an
//! ADMIN row naming its operator (read from PostgreSQL directly), every way a sign-in must fail
//! (state, replayed code, PKCE verifier, nonce, expired code and ID token, another audience,
//! no role), each next to a sign-in that works, and the static token as break-glass.

mod support;

use std::time::Duration;

use sandbox::{IdTokenFault, OidcClient};
use serde_json::{json, Value};
use support::*;

/// How the browser-less flow ended at aegis' callback.
struct Callback {
    status: u16,
    set_cookies: Vec<String>,
    text: String,
}

impl Callback {
    /// The console session cookie (`aegis_console=...`), if the callback set one.
    fn session(&self) -> Option<String> {
        self.set_cookies
            .iter()
            .filter_map(|c| c.split(';').next())
            .find(|c| c.starts_with("aegis_console=") && c.len() > "aegis_console=".len())
            .map(str::to_string)
    }
}

/// A started sign-in: aegis' pre-session cookie and the IdP URL it sent the browser to.
struct Started {
    pre_cookie: String,
    authorize: url::Url,
}

fn set_cookies(h: &reqwest::header::HeaderMap) -> Vec<String> {
    h.get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::to_string)
        .collect()
}

async fn start(admin: &str) -> Started {
    let resp = http()
        .get(format!("{admin}/console/oidc/start"))
        .send()
        .await
        .expect("start");
    assert_eq!(resp.status().as_u16(), 303, "start redirects to the IdP");
    let cookies = set_cookies(resp.headers());
    let pre = cookies
        .iter()
        .find(|c| c.starts_with("aegis_console_login="))
        .expect("a pre-session cookie");
    assert!(
        pre.contains("HttpOnly") && pre.contains("SameSite=Lax"),
        "{pre}"
    );
    assert!(pre.contains("Path=/console/oidc"), "{pre}");
    let location = resp.headers()["location"].to_str().unwrap().to_string();
    Started {
        pre_cookie: pre.split(';').next().unwrap().to_string(),
        authorize: url::Url::parse(&location).expect("an absolute IdP URL"),
    }
}

fn param(u: &url::Url, name: &str) -> String {
    u.query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

fn with_param(u: &url::Url, name: &str, value: &str) -> url::Url {
    let pairs: Vec<(String, String)> = u
        .query_pairs()
        .map(|(k, v)| {
            let v = if k == name {
                value.to_string()
            } else {
                v.into_owned()
            };
            (k.into_owned(), v)
        })
        .collect();
    let mut out = u.clone();
    out.query_pairs_mut().clear().extend_pairs(pairs);
    out
}

/// Signs `user` in at the IdP's page for `authorize`; returns the callback URL it redirects to.
async fn idp_sign_in(authorize: &url::Url, user: &str) -> url::Url {
    let page = http()
        .get(authorize.clone())
        .send()
        .await
        .expect("IdP page");
    assert_eq!(
        page.status().as_u16(),
        200,
        "the IdP shows its sign-in page"
    );
    let mut form: Vec<(String, String)> = authorize.query_pairs().into_owned().collect();
    form.push(("username".into(), user.into()));
    let mut post_url = authorize.clone();
    post_url.set_query(None);
    let resp = http()
        .post(post_url)
        .form(&form)
        .send()
        .await
        .expect("IdP sign-in");
    assert_eq!(resp.status().as_u16(), 303, "the IdP redirects back");
    url::Url::parse(resp.headers()["location"].to_str().unwrap()).expect("callback URL")
}

async fn callback(pre_cookie: &str, cb: &url::Url) -> Callback {
    let resp = http()
        .get(cb.clone())
        .header("cookie", pre_cookie)
        .send()
        .await
        .expect("callback");
    let status = resp.status().as_u16();
    let set_cookies = set_cookies(resp.headers());
    let text = resp.text().await.unwrap_or_default();
    Callback {
        status,
        set_cookies,
        text,
    }
}

/// The whole flow for `user`.
async fn sign_in_as(admin: &str, user: &str) -> Callback {
    let s = start(admin).await;
    let cb = idp_sign_in(&s.authorize, user).await;
    callback(&s.pre_cookie, &cb).await
}

/// A console session from a successful callback.
async fn session(admin: &str, cb: &Callback) -> Console {
    assert_eq!(cb.status, 200, "sign-in should succeed: {}", cb.text);
    let cookie = cb.session().expect("a session cookie");
    assert!(cb
        .set_cookies
        .iter()
        .any(|c| c.starts_with("aegis_console=")
            && c.contains("SameSite=Strict")
            && c.contains("HttpOnly")));
    let page = http()
        .get(format!("{admin}/console"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let meta = |name: &str| {
        page.split(&format!("name=\"{name}\" content=\""))
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap_or_else(|| panic!("no {name} in the page"))
            .to_string()
    };
    Console {
        base: admin.to_string(),
        host: admin.trim_start_matches("http://").to_string(),
        cookie,
        csrf: meta("aegis-csrf"),
    }
}

/// aegis refused the callback with `message` and opened no session.
fn refused(cb: &Callback, status: u16, message: &str) {
    assert_eq!(cb.status, status, "{}", cb.text);
    assert!(
        cb.text.contains(message),
        "want {message:?} in: {}",
        cb.text
    );
    assert!(cb.session().is_none(), "no session: {:?}", cb.set_cookies);
}

async fn admin_rows(stack: &Stack) -> Vec<Value> {
    stack
        .postgres
        .query_json(
            "SELECT seq, method, reason, user_name, agent, issuer, subject, actor_chain \
             FROM aegis_audit WHERE decision = 'ADMIN' ORDER BY seq",
        )
        .await
        .expect("admin rows")
}

const CLIENT_ID: &str = "aegis-console";
const CLIENT_SECRET: &str = "sandbox-console-secret-0123456789";

/// `[admin.oidc]` for the stack's dev issuer, its redirect on the stack's admin listener.
fn oidc_config(t: &mut toml::Table, break_glass: bool, secret_file: &str) {
    let admin_listen = t["server"]["admin_listen"].as_str().unwrap().to_string();
    let admin = t["admin"].as_table_mut().unwrap();
    admin.insert("allow_break_glass".into(), break_glass.into());
    let oidc: toml::Table = toml::from_str(&format!(
        r#"
issuer = "dev"
client_id = "{CLIENT_ID}"
client_secret_file = "{secret_file}"
redirect_uri = "http://{admin_listen}/console/oidc/callback"
roles_claim = "aegis_roles"
viewer_values = ["aegis-viewers"]
operator_values = ["aegis-operators"]
auditor_values = ["aegis-auditors"]
"#
    ))
    .unwrap();
    admin.insert("oidc".into(), oidc.into());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_sign_in_through_the_idp_with_roles() {
    let secret_dir = tempfile::tempdir().unwrap();
    let secret_file = secret_dir.path().join("console-client.secret");
    std::fs::write(&secret_file, CLIENT_SECRET).unwrap();
    let secret_path = secret_file.to_string_lossy().into_owned();
    let mut stack = start_with(
        StackOptions::new(AEGIS_BIN).with_config(move |t| oidc_config(t, false, &secret_path)),
    )
    .await;
    let admin = stack.aegis_admin_url();
    let redirect = format!("{admin}/console/oidc/callback");
    assert_eq!(
        stack.config()["admin"]["oidc"]["redirect_uri"].as_str(),
        Some(redirect.as_str())
    );
    stack.sandbox.register_oidc_client(OidcClient {
        client_id: CLIENT_ID.into(),
        client_secret: Some(CLIENT_SECRET.into()),
        redirect_uris: vec![redirect.clone()],
    });
    // Another client at the same IdP, for a code issued to someone else.
    stack.sandbox.register_oidc_client(OidcClient {
        client_id: "other-app".into(),
        client_secret: None,
        redirect_uris: vec![redirect.clone()],
    });
    let alice_token = token(&stack, "alice");

    // --- the authorization request aegis sends ---
    let s = start(&admin).await;
    let a = &s.authorize;
    assert_eq!(
        a.as_str().split('?').next().unwrap(),
        format!("{}/authorize", stack.sandbox.idp_url)
    );
    assert_eq!(param(a, "response_type"), "code");
    assert_eq!(param(a, "client_id"), CLIENT_ID);
    assert_eq!(param(a, "redirect_uri"), redirect);
    assert_eq!(param(a, "code_challenge_method"), "S256");
    assert_eq!(param(a, "code_challenge").len(), 43);
    assert!(param(a, "scope").split(' ').any(|x| x == "openid"));
    assert!(param(a, "state").len() >= 40 && param(a, "nonce").len() >= 40);
    // The verifier never leaves aegis.
    assert!(!a.as_str().contains("code_verifier"));
    let s2 = start(&admin).await;
    assert_ne!(param(&s2.authorize, "state"), param(a, "state"));
    assert_ne!(param(&s2.authorize, "nonce"), param(a, "nonce"));

    // --- break-glass is off: the static token is refused (positive control at the end) ---
    let host = admin.trim_start_matches("http://").to_string();
    let r = read(
        http()
            .post(format!("{admin}/console/login"))
            .header("origin", format!("http://{host}"))
            .form(&[("token", stack.console_token())])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text);
    assert!(r.text.contains("switched off"), "{}", r.text);
    assert!(r.header("set-cookie").is_none());

    // --- a viewer: reads, and is refused an action that then writes nothing ---
    let bob = session(&admin, &sign_in_as(&admin, "bob").await).await;
    let page = read(
        http()
            .get(format!("{admin}/console"))
            .header("cookie", &bob.cookie)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(page
        .text
        .contains("name=\"aegis-operator\" content=\"bob\""));
    assert!(page
        .text
        .contains("name=\"aegis-roles\" content=\"viewer\""));
    let status = read(
        http()
            .get(format!("{admin}/console/api/status"))
            .header("cookie", &bob.cookie)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status.status, 200, "a viewer reads the status");
    let before = admin_rows(&stack).await;
    for (path, body) in [
        ("/console/api/revoke", json!({"user": "alice@example.com"})),
        ("/console/api/block", json!({"agent": "joule"})),
        ("/console/api/verify", Value::Null),
        ("/console/api/export", Value::Null),
    ] {
        let r = bob.act(path, body).await;
        assert_eq!(r.status, 403, "viewer {path}: {}", r.text);
        assert_eq!(r.body["error"], "your console role does not allow this");
    }
    assert_eq!(
        admin_rows(&stack).await,
        before,
        "a refused action writes no row"
    );

    // --- an operator: revoke recorded with their name ---
    let alice = session(&admin, &sign_in_as(&admin, "alice").await).await;
    let first = get(&stack, "/api/2.0/preview/scim/v2/Me", Some(&alice_token)).await;
    assert_eq!(first.status, 200, "{}", first.text);
    assert_eq!(stack.sandbox.exchange_count("alice@example.com"), 1);
    let r = alice
        .act("/console/api/revoke", json!({"user": "alice@example.com"}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    // It took effect: her next request exchanges again.
    let again = get(&stack, "/api/2.0/preview/scim/v2/Me", Some(&alice_token)).await;
    assert_eq!(again.status, 200);
    assert_eq!(stack.sandbox.exchange_count("alice@example.com"), 2);
    let rows = admin_rows(&stack).await;
    let revoke = rows.last().expect("an ADMIN row");
    assert_eq!(revoke["method"], "REVOKE");
    assert_eq!(revoke["reason"], "token_revoked");
    assert_eq!(revoke["user_name"], "alice@example.com");
    assert_eq!(revoke["issuer"], stack.sandbox.idp_url);
    assert_eq!(revoke["subject"], "u-alice");
    assert_eq!(revoke["actor_chain"], "console:alice (operator)");
    // Operators do not verify or export.
    for path in ["/console/api/verify", "/console/api/export"] {
        let r = alice.act(path, Value::Null).await;
        assert_eq!(r.status, 403, "operator {path}");
    }
    let r = alice
        .act("/console/api/block", json!({"agent": "joule"}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = alice
        .act("/console/api/unblock", json!({"agent": "joule"}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);

    // --- an auditor: verify and export, each an ADMIN row naming them ---
    let carol = session(&admin, &sign_in_as(&admin, "carol").await).await;
    let r = carol.act("/console/api/verify", Value::Null).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["intact"], true, "{}", r.text);
    let r = carol.act("/console/api/export", json!({"limit": 50})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let exported = r.body["rows"].as_array().expect("rows").clone();
    assert!(exported.iter().any(|row| row["decision"] == "ADMIN"
        && row["method"] == "REVOKE"
        && row["actor_chain"] == "console:alice (operator)"));
    assert!(exported.iter().any(|row| row["decision"] == "ALLOW"));
    for secret in [alice_token.as_str(), stack.console_token(), CLIENT_SECRET] {
        assert!(
            !r.text.contains(secret),
            "the export holds no token or secret"
        );
    }
    assert!(!r.text.contains("token_fp") && !r.text.contains("mac"));
    let r = carol
        .act("/console/api/revoke", json!({"user": "bob@example.com"}))
        .await;
    assert_eq!(r.status, 403, "auditors do not revoke");
    let rows = admin_rows(&stack).await;
    let tail: Vec<(String, String, String)> = rows
        .iter()
        .rev()
        .take(4)
        .rev()
        .map(|r| {
            let f = |k: &str| r[k].as_str().unwrap_or_default().to_string();
            (f("method"), f("subject"), f("actor_chain"))
        })
        .collect();
    let t = |m: &str, s: &str, a: &str| (m.to_string(), s.to_string(), a.to_string());
    assert_eq!(
        tail,
        vec![
            t("BLOCK", "u-alice", "console:alice (operator)"),
            t("UNBLOCK", "u-alice", "console:alice (operator)"),
            t("VERIFY", "u-carol", "console:carol (auditor)"),
            t("EXPORT", "u-carol", "console:carol (auditor)"),
        ]
    );
    assert_eq!(rows[rows.len() - 2]["reason"], "chain_verified_intact");

    // --- a person with no console role gets no session ---
    refused(&sign_in_as(&admin, "dave").await, 403, "no console role");

    // --- state mismatch (and the same flow unmodified works) ---
    let s = start(&admin).await;
    let cb = idp_sign_in(&s.authorize, "bob").await;
    let forged = with_param(&cb, "state", "forged-state-value");
    refused(
        &callback(&s.pre_cookie, &forged).await,
        401,
        "state mismatch",
    );
    // The pending sign-in is used up by the forged try; a fresh one works.
    refused(
        &callback(&s.pre_cookie, &cb).await,
        401,
        "expired or was already used",
    );
    session(&admin, &sign_in_as(&admin, "bob").await).await;
    // No pre-session cookie at all (a callback opened in another browser).
    let s = start(&admin).await;
    let cb = idp_sign_in(&s.authorize, "bob").await;
    refused(
        &callback("other=1", &cb).await,
        401,
        "expired or was already used",
    );

    // --- code replay: the callback again, and the code under a new sign-in ---
    let s = start(&admin).await;
    let cb = idp_sign_in(&s.authorize, "bob").await;
    session(&admin, &callback(&s.pre_cookie, &cb).await).await;
    refused(
        &callback(&s.pre_cookie, &cb).await,
        401,
        "expired or was already used",
    );
    let s2 = start(&admin).await;
    let replayed = with_param(&cb, "state", &param(&s2.authorize, "state"));
    refused(
        &callback(&s2.pre_cookie, &replayed).await,
        401,
        "did not accept the authorization code",
    );

    // --- wrong PKCE verifier: the IdP holds another challenge than aegis' verifier's ---
    let s = start(&admin).await;
    let other_challenge = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGF3jMeRkM";
    let tampered = with_param(&s.authorize, "code_challenge", other_challenge);
    let cb = idp_sign_in(&tampered, "alice").await;
    refused(
        &callback(&s.pre_cookie, &cb).await,
        401,
        "did not accept the authorization code",
    );

    // --- a code issued to another client ---
    let s = start(&admin).await;
    let cb = idp_sign_in(&with_param(&s.authorize, "client_id", "other-app"), "alice").await;
    refused(
        &callback(&s.pre_cookie, &cb).await,
        401,
        "did not accept the authorization code",
    );

    // --- expired code ---
    stack.sandbox.set_oidc_code_ttl(Duration::ZERO);
    refused(
        &sign_in_as(&admin, "alice").await,
        401,
        "did not accept the authorization code",
    );
    stack.sandbox.set_oidc_code_ttl(Duration::from_secs(60));
    session(&admin, &sign_in_as(&admin, "alice").await).await;

    // --- ID tokens that must not be accepted, each followed by one that is ---
    for (fault, message) in [
        (IdTokenFault::WrongNonce, "nonce mismatch"),
        (IdTokenFault::WrongAudience, "audience not accepted"),
        (IdTokenFault::Expired, "not accepted: expired"),
    ] {
        stack.sandbox.set_id_token_fault(fault);
        refused(&sign_in_as(&admin, "alice").await, 401, message);
        stack.sandbox.set_id_token_fault(IdTokenFault::None);
        session(&admin, &sign_in_as(&admin, "alice").await).await;
    }

    // --- the IdP refusing (an error redirect) ---
    let s = start(&admin).await;
    let mut err_cb = url::Url::parse(&redirect).unwrap();
    err_cb
        .query_pairs_mut()
        .append_pair("error", "access_denied")
        .append_pair("state", &param(&s.authorize, "state"));
    refused(
        &callback(&s.pre_cookie, &err_cb).await,
        401,
        "refused the sign-in",
    );

    // --- break-glass on: the static token signs in, recorded as break-glass ---
    stack
        .update_config(|t| {
            t["admin"]
                .as_table_mut()
                .unwrap()
                .insert("allow_break_glass".into(), true.into());
        })
        .unwrap();
    stack.aegis.restart().await.expect("aegis restarts");
    let glass = console_sign_in(&stack).await;
    let r = glass
        .act("/console/api/revoke", json!({"user": "bob@example.com"}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let rows = admin_rows(&stack).await;
    let last = rows.last().unwrap();
    assert_eq!(last["method"], "REVOKE");
    assert_eq!(last["user_name"], "bob@example.com");
    assert_eq!(last["actor_chain"], "console:break-glass");
    assert_eq!(last["subject"], "");
    // IdP sign-in still works next to it.
    session(&admin, &sign_in_as(&admin, "carol").await).await;

    // No log line holds a secret, a code or a token.
    let log = std::fs::read_to_string(stack.work_dir().join("aegis.log")).unwrap_or_default();
    for secret in [CLIENT_SECRET, stack.console_token(), "sbxcode_", "sbxat_"] {
        assert!(!log.contains(secret), "the log holds {secret}");
    }
    stack.shutdown().await;
}

/// The sandbox IdP's own checks, with nothing of aegis in between.
#[tokio::test]
async fn the_sandbox_idp_checks_codes_pkce_and_clients() {
    let sb = sandbox::Sandbox::start(sandbox::SandboxOptions::default())
        .await
        .expect("sandbox");
    let redirect = "http://127.0.0.1:1/console/oidc/callback";
    sb.register_oidc_client(OidcClient {
        client_id: "c1".into(),
        client_secret: Some("s1".into()),
        redirect_uris: vec![redirect.into()],
    });
    let verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWxOEjXk";
    // base64url(SHA-256(verifier)), computed with Python's hashlib.
    let challenge = "O_uB6U03gRg--6ORZ0ZVqgZbsQmdYdFwf4Y3sAFCu7I";
    let mut authorize = url::Url::parse(&format!("{}/authorize", sb.idp_url)).unwrap();
    authorize
        .query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", "c1")
        .append_pair("redirect_uri", redirect)
        .append_pair("scope", "openid profile")
        .append_pair("state", "st-1")
        .append_pair("nonce", "n-1")
        .append_pair("code_challenge", challenge)
        .append_pair("code_challenge_method", "S256");

    // Wrong redirect URI or client: an error page, no redirect.
    for (k, v) in [
        ("redirect_uri", "http://127.0.0.1:1/evil"),
        ("client_id", "nobody"),
    ] {
        let r = http()
            .get(with_param(&authorize, k, v))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 400, "{k}");
        assert!(r.headers().get("location").is_none());
    }
    // No PKCE, or plain: back to the client with invalid_request and the state.
    for (k, v) in [("code_challenge_method", "plain"), ("code_challenge", "")] {
        let r = http()
            .get(with_param(&authorize, k, v))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 303, "{k}");
        let loc = r.headers()["location"].to_str().unwrap();
        assert!(
            loc.starts_with(redirect)
                && loc.contains("error=invalid_request")
                && loc.contains("state=st-1"),
            "{loc}"
        );
    }

    let code = |cb: &url::Url| param(cb, "code");
    let token = |code: String, verifier: &str, auth: Option<(&str, &str)>| {
        let mut req = http().post(format!("{}/token", sb.idp_url)).form(&[
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("redirect_uri", redirect),
            ("code_verifier", verifier),
        ]);
        if let Some((id, secret)) = auth {
            req = req.basic_auth(id, Some(secret));
        }
        async move { read(req.send().await.unwrap()).await }
    };

    // A good exchange, then the same code again.
    let cb = idp_sign_in(&authorize, "alice").await;
    assert_eq!(param(&cb, "state"), "st-1");
    let c = code(&cb);
    let ok = token(c.clone(), verifier, Some(("c1", "s1"))).await;
    assert_eq!(ok.status, 200, "{}", ok.text);
    let id_token = ok.body["id_token"].as_str().unwrap();
    // Independent check of the ID token: the JWKS key, aud, nonce, roles.
    let jwks: Value = http()
        .get(format!("{}/jwks", sb.idp_url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let header = jsonwebtoken::decode_header(id_token).unwrap();
    let jwk = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"].as_str() == header.kid.as_deref())
        .unwrap();
    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(jwk.clone()).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    v.set_audience(&["c1"]);
    v.set_issuer(&[&sb.idp_url]);
    let claims = jsonwebtoken::decode::<Value>(
        id_token,
        &jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap(),
        &v,
    )
    .unwrap()
    .claims;
    assert_eq!(claims["nonce"], "n-1");
    assert_eq!(claims["sub"], "u-alice");
    assert_eq!(claims["aegis_roles"], json!(["aegis-operators"]));
    let again = token(c, verifier, Some(("c1", "s1"))).await;
    assert_eq!(again.status, 400);
    assert_eq!(again.body["error"], "invalid_grant");

    // Wrong verifier; wrong secret; no client authentication at all.
    let cb = idp_sign_in(&authorize, "alice").await;
    let r = token(code(&cb), &"x".repeat(43), Some(("c1", "s1"))).await;
    assert_eq!(
        (r.status, r.body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    let cb = idp_sign_in(&authorize, "alice").await;
    let r = token(code(&cb), verifier, Some(("c1", "wrong"))).await;
    assert_eq!(
        (r.status, r.body["error"].as_str()),
        (401, Some("invalid_client"))
    );
    let r = token(code(&cb), verifier, None).await;
    assert_eq!(
        (r.status, r.body["error"].as_str()),
        (401, Some("invalid_client"))
    );
    // An expired code.
    sb.set_oidc_code_ttl(Duration::ZERO);
    let cb = idp_sign_in(&authorize, "alice").await;
    let r = token(code(&cb), verifier, Some(("c1", "s1"))).await;
    assert_eq!(
        (r.status, r.body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    sb.set_oidc_code_ttl(Duration::from_secs(60));
    let cb = idp_sign_in(&authorize, "alice").await;
    let r = token(code(&cb), verifier, Some(("c1", "s1"))).await;
    assert_eq!(r.status, 200, "{}", r.text);
    // A stranger is not signed in.
    let mut form: Vec<(String, String)> = authorize.query_pairs().into_owned().collect();
    form.push(("username".into(), "mallory".into()));
    let mut post = authorize.clone();
    post.set_query(None);
    let r = http().post(post).form(&form).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.text().await.unwrap().contains("No such user"));
    sb.shutdown().await;
}
