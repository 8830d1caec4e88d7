//! Token sources other than federation, end to end through real Envoy, Redis and PostgreSQL:
//!
//! - **U2M**: a user without a stored grant is denied `consent_required` with a signed consent
//!   link; following it drives the sandbox's authorize endpoint over HTTP, the callback stores
//!   the refresh token (sealed, in PostgreSQL) only for the right Databricks user, and the next
//!   request is allowed as that user. Refresh tokens rotate (single use): 50 concurrent
//!   requests over two aegis replicas refresh without a single `invalid_grant` or replayed
//!   token. A Redis flush (and a restart) does not force a new consent; a revoked grant does.
//! - **Entra OBO** against the sandbox's Entra-shaped token endpoint: allowed as the user;
//!   429 with `Retry-After`, 5xx and `invalid_grant` map to their deny reasons.

mod support;

use std::time::{Duration, Instant};

use sandbox::stack::{
    dev_envoy_yaml, envoy_bin, free_addr, AegisProcess, EnvoyProcess, EnvoyUpstreams,
};
use sandbox::{SandboxOptions, TokenFault};
use support::*;

const ME: &str = "/api/2.0/preview/scim/v2/Me";
const U2M_CLIENT_ID: &str = "aegis-u2m-app";

fn table<'a>(t: &'a mut toml::Table, key: &str) -> &'a mut toml::Table {
    t.get_mut(key)
        .and_then(|v| v.as_table_mut())
        .unwrap_or_else(|| panic!("config has no [{key}]"))
}

fn workspace(t: &mut toml::Table) -> &mut toml::Table {
    t.get_mut("workspaces")
        .and_then(|v| v.as_array_mut())
        .and_then(|a| a.first_mut())
        .and_then(|w| w.as_table_mut())
        .expect("config has a workspace")
}

/// A stack whose workspace uses U2M, with Databricks tokens living `ttl`.
async fn u2m_stack(ttl: Duration) -> Stack {
    let public = free_addr().expect("a free port");
    let opts = StackOptions::new(AEGIS_BIN)
        .with_sandbox(SandboxOptions {
            token_ttl: ttl,
            ..SandboxOptions::default()
        })
        .with_config(move |c| {
            let server = table(c, "server");
            server.insert("public_listen".into(), public.to_string().into());
            server.insert("public_url".into(), format!("http://{public}").into());
            let ws = workspace(c);
            ws.insert("token_source".into(), "u2m".into());
            ws.insert("client_id".into(), U2M_CLIENT_ID.into());
        });
    start_with(opts).await
}

/// The deny body of a `consent_required` answer, checked for shape; returns the consent URL.
fn consent_url(r: &Resp) -> String {
    assert_eq!(r.status, 401, "{}", r.text);
    assert_eq!(r.body["error"], "consent_required", "{}", r.text);
    let keys: Vec<&str> = r
        .body
        .as_object()
        .expect("a JSON object")
        .keys()
        .map(String::as_str)
        .collect();
    let mut sorted = keys.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        ["consent_url", "error", "message", "trace_id"],
        "{}",
        r.text
    );
    let url = r.body["consent_url"].as_str().expect("a consent url");
    assert!(url.contains("/oauth/start?"), "{url}");
    url.to_string()
}

/// Follows a consent link as a browser would, signing in to the workspace as `login_as`.
/// Returns the callback's status and page.
async fn consent(link: &str, login_as: &str) -> (u16, String) {
    let http = http();
    // aegis: /oauth/start → the workspace's authorize endpoint, with a binding cookie.
    let start = http.get(link).send().await.expect("GET /oauth/start");
    assert_eq!(start.status().as_u16(), 302, "{:?}", start.text().await);
    let cookie = start
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .expect("a binding cookie")
        .to_string();
    assert!(cookie.starts_with("aegis_u2m="), "{cookie}");
    let authorize = start
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .expect("a redirect")
        .to_string();
    let mut authorize = reqwest::Url::parse(&authorize).expect("an authorize URL");
    assert_eq!(authorize.path(), "/oidc/v1/authorize");
    let q: std::collections::HashMap<String, String> =
        authorize.query_pairs().into_owned().collect();
    assert_eq!(q["client_id"], U2M_CLIENT_ID);
    assert_eq!(q["code_challenge_method"], "S256");
    assert_eq!(q["response_type"], "code");
    assert!(
        q["scope"].split(' ').any(|s| s == "offline_access"),
        "{q:?}"
    );
    assert!(q["redirect_uri"].ends_with("/oauth/callback"), "{q:?}");
    // The sandbox signs in whoever `login_hint` names (its stand-in for a login page).
    let pairs: Vec<(String, String)> = q
        .into_iter()
        .filter(|(k, _)| k != "login_hint")
        .chain([("login_hint".to_string(), login_as.to_string())])
        .collect();
    authorize.query_pairs_mut().clear().extend_pairs(pairs);

    // The workspace: authorize → back to aegis with a code.
    let back = http
        .get(authorize)
        .send()
        .await
        .expect("GET /oidc/v1/authorize");
    assert_eq!(back.status().as_u16(), 302, "{:?}", back.text().await);
    let callback = back
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .expect("a redirect to the callback")
        .to_string();
    assert!(callback.contains("code="), "{callback}");

    // aegis: /oauth/callback, from the same browser.
    let done = http
        .get(&callback)
        .header("cookie", &cookie)
        .send()
        .await
        .expect("GET /oauth/callback");
    let status = done.status().as_u16();
    assert_eq!(
        done.headers()
            .get("referrer-policy")
            .and_then(|v| v.to_str().ok()),
        Some("no-referrer")
    );
    (status, done.text().await.unwrap_or_default())
}

async fn u2m_rows(stack: &Stack) -> Vec<serde_json::Value> {
    stack
        .postgres
        .query_json(
            "SELECT workspace, issuer, subject, user_name, generation, key_id, \
             access_discarded, encode(sealed, 'escape') AS sealed \
             FROM aegis_u2m_grants ORDER BY user_name",
        )
        .await
        .expect("read aegis_u2m_grants")
}

/// No token the sandbox issues (access `dsbx…`, refresh `dsbr…`, code `dsbc…`) in the text.
fn assert_no_tokens(what: &str, text: &str) {
    for prefix in ["dsbx", "dsbr", "dsbc"] {
        assert!(!text.contains(prefix), "{what} contains a token: {text}");
    }
}

#[tokio::test]
async fn u2m_consent_flow_end_to_end() {
    let stack = u2m_stack(Duration::from_secs(3600)).await;
    let alice = token(&stack, "alice");

    // No grant yet: consent_required, with a link and nothing else.
    let r = get(&stack, ME, Some(&alice)).await;
    let link = consent_url(&r);
    assert!(link.contains("u=alice%40example.com"), "{link}");
    assert!(u2m_rows(&stack).await.is_empty());

    // A link changed to name someone else does not verify.
    let forged = link.replace("u=alice%40example.com", "u=carol%40example.com");
    let resp = http().get(&forged).send().await.expect("GET forged link");
    assert_eq!(resp.status().as_u16(), 400);

    // Consent as the right user.
    let (status, page) = consent(&link, "alice@example.com").await;
    assert_eq!(status, 200, "{page}");
    assert_no_tokens("the consent page", &page);
    assert_eq!(stack.sandbox.u2m_counts().codes_redeemed, 1);
    let rows = u2m_rows(&stack).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["user_name"], "alice@example.com");
    // The grant belongs to the verified principal, not to the user name.
    assert_eq!(rows[0]["issuer"], stack.sandbox.idp_url.as_str());
    assert_eq!(rows[0]["subject"], "u-alice");
    assert_no_tokens(
        "the sealed row",
        rows[0]["sealed"].as_str().unwrap_or_default(),
    );

    // The next request is allowed, and reaches Databricks as alice with a U2M token.
    let r = get(&stack, ME, Some(&alice)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["userName"], "alice@example.com");
    let audit = audit_rows(&stack).await;
    let last = audit.last().expect("audit rows");
    assert_eq!(last["decision"], "ALLOW");
    assert_eq!(last["token_source"], "u2m");
    // A callback is bound to its browser and single-use; a link keeps one pending sign-in.
    consent_callbacks_are_bound_single_use_and_one_per_link(&link).await;

    // Nothing aegis wrote holds a token.
    assert_no_tokens("the aegis log", &stack.aegis.log());
    stack.shutdown().await;
}

#[tokio::test]
async fn u2m_revoke_sends_a_different_token_and_consent_revoke_drops_the_grant_first() {
    let stack = u2m_stack(Duration::from_secs(3600)).await;
    let alice = token(&stack, "alice");
    let link = consent_url(&get(&stack, ME, Some(&alice)).await);
    let (status, page) = consent(&link, "alice@example.com").await;
    assert_eq!(status, 200, "{page}");
    let serial = |r: &Resp| {
        let trace = r.trace_id();
        stack
            .sandbox
            .requests()
            .into_iter()
            .find(|x| x.trace_id.as_deref() == Some(trace.as_str()))
            .and_then(|x| x.token_serial)
            .unwrap_or_else(|| panic!("the workspace saw no request for {trace}"))
    };
    let r = get(&stack, ME, Some(&alice)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let before = serial(&r);
    // Positive control: without a revocation the same token is used again.
    let r = get(&stack, ME, Some(&alice)).await;
    assert_eq!(serial(&r), before);

    let (code, out, err) = revoke(&stack, "alice@example.com", &[]);
    assert_eq!(code, 0, "{out}{err}");
    let rows = u2m_rows(&stack).await;
    assert_eq!(rows[0]["access_discarded"], true, "{rows:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = get(&stack, ME, Some(&alice)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let after = serial(&r);
    assert_ne!(
        after, before,
        "a revoked U2M access token was sent upstream again"
    );
    assert_eq!(stack.sandbox.u2m_counts().refreshes, 1);
    assert_eq!(u2m_rows(&stack).await[0]["access_discarded"], false);

    // --consent: the grant is gone, and the next request asks for consent again.
    let (code, out, err) = revoke(&stack, "alice@example.com", &["--consent"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("dropped 1 stored U2M grant(s)"), "{out}");
    assert!(u2m_rows(&stack).await.is_empty());
    tokio::time::sleep(Duration::from_millis(300)).await;
    consent_url(&get(&stack, ME, Some(&alice)).await);
    stack.shutdown().await;
}

/// Starts a sign-in from `link` as a browser would: the binding cookie and the callback URL
/// the workspace sends the browser back to.
async fn start_sign_in(link: &str) -> (String, String) {
    let http = http();
    let start = http.get(link).send().await.expect("GET /oauth/start");
    assert_eq!(start.status().as_u16(), 302, "{:?}", start.text().await);
    let cookie = start
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .expect("a binding cookie")
        .to_string();
    let authorize = start
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .expect("a redirect")
        .to_string();
    let back = http.get(&authorize).send().await.expect("authorize");
    let callback = back
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .expect("a callback")
        .to_string();
    (cookie, callback)
}

async fn call_back(callback: &str, cookie: Option<&str>) -> (u16, String) {
    let mut req = http().get(callback);
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    let resp = req.send().await.expect("callback");
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

/// The callback without the browser's cookie is refused and does not burn the sign-in; with
/// it, it succeeds once and never again; a second start of the same link voids the first
/// sign-in; and a link starts at most 5 sign-ins.
async fn consent_callbacks_are_bound_single_use_and_one_per_link(link: &str) {
    // (The link was used for one sign-in already.)
    let (cookie, callback) = start_sign_in(link).await;
    let (status, page) = call_back(&callback, None).await;
    assert_eq!(status, 400, "{page}");
    assert!(page.contains("another browser"), "{page}");
    let (status, page) = call_back(&callback, Some(&cookie)).await;
    assert_eq!(
        status, 200,
        "a cookieless callback burned the sign-in: {page}"
    );
    let (status, page) = call_back(&callback, Some(&cookie)).await;
    assert_eq!(status, 400, "a callback was accepted twice: {page}");

    // Two sign-ins from one link: only the newer one can finish.
    let (old_cookie, old_callback) = start_sign_in(link).await;
    let (new_cookie, new_callback) = start_sign_in(link).await;
    let (status, page) = call_back(&old_callback, Some(&old_cookie)).await;
    assert_eq!(status, 400, "a replaced sign-in finished: {page}");
    let (status, page) = call_back(&new_callback, Some(&new_cookie)).await;
    assert_eq!(status, 200, "{page}");

    // The link may start 5 sign-ins (that was the 4th): the 6th is refused.
    let resp = http().get(link).send().await.expect("GET /oauth/start");
    assert_eq!(resp.status().as_u16(), 302);
    let resp = http().get(link).send().await.expect("GET /oauth/start");
    assert_eq!(resp.status().as_u16(), 429);
    let page = resp.text().await.unwrap_or_default();
    assert!(page.contains("used too often"), "{page}");
}

#[tokio::test]
async fn u2m_consent_by_the_wrong_databricks_user_stores_nothing() {
    let stack = u2m_stack(Duration::from_secs(3600)).await;
    let alice = token(&stack, "alice");
    let link = consent_url(&get(&stack, ME, Some(&alice)).await);

    // alice's link, but bob signs in to the workspace.
    let (status, page) = consent(&link, "bob@example.com").await;
    assert_eq!(status, 403, "{page}");
    assert!(page.contains("different user"), "{page}");
    assert_no_tokens("the refusal page", &page);
    assert!(u2m_rows(&stack).await.is_empty());
    assert_eq!(stack.sandbox.u2m_counts().codes_redeemed, 1);

    // alice still has to consent; bob's tokens were not stored for anyone.
    let r = get(&stack, ME, Some(&alice)).await;
    consent_url(&r);
    let bob = token(&stack, "bob");
    consent_url(&get(&stack, ME, Some(&bob)).await);
    stack.shutdown().await;
}

#[tokio::test]
async fn u2m_refresh_rotation_under_concurrency_across_two_replicas() {
    // Tokens live 4 s: every round below needs a refresh.
    let ttl = Duration::from_secs(4);
    let mut stack = u2m_stack(ttl).await;
    let alice = token(&stack, "alice");
    let link = consent_url(&get(&stack, ME, Some(&alice)).await);
    let (status, page) = consent(&link, "alice@example.com").await;
    assert_eq!(status, 200, "{page}");

    // A second replica (same Redis and PostgreSQL) behind a second Envoy.
    let mut cfg_b = stack.config().clone();
    let server = table(&mut cfg_b, "server");
    for key in ["grpc_listen", "admin_listen", "public_listen"] {
        let addr = free_addr().expect("a free port");
        server.insert(key.into(), addr.to_string().into());
    }
    server.insert("instance_id".into(), "replica-b".into());
    let grpc_b: std::net::SocketAddr = server["grpc_listen"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("grpc_listen");
    let path_b = stack
        .write_config_as("aegis-b.toml", &cfg_b)
        .expect("write replica b's config");
    let _aegis_b = AegisProcess::start(stack.aegis_bin(), &path_b)
        .await
        .expect("replica b starts");
    let databricks_port = reqwest::Url::parse(&stack.sandbox.workspace_url)
        .ok()
        .and_then(|u| u.port())
        .expect("workspace port");
    let envoy_b = EnvoyProcess::start(
        &envoy_bin().expect("envoy"),
        &dev_envoy_yaml().expect("envoy template"),
        &stack.work_dir().join("envoy-b"),
        EnvoyUpstreams {
            databricks_port,
            aegis_port: grpc_b.port(),
        },
    )
    .await
    .expect("envoy b starts");
    let fronts = [stack.envoy_url(), envoy_b.listener_url()];

    let http = http();
    for round in 0..3 {
        // Let every cached and stored access token run out.
        tokio::time::sleep(ttl).await;
        let started = Instant::now();
        let requests = (0..50).map(|i| {
            let url = format!("{}{ME}", fronts[i % 2]);
            let req = http.get(url).bearer_auth(&alice).send();
            async move { read(req.await.expect("request through envoy")).await }
        });
        let answers = futures_util::future::join_all(requests).await;
        for r in &answers {
            assert_eq!(r.status, 200, "round {round}: {}", r.text);
            assert_eq!(r.body["userName"], "alice@example.com");
        }
        assert!(started.elapsed() < Duration::from_secs(10));
    }
    let counts = stack.sandbox.u2m_counts();
    assert_eq!(counts.replays, 0, "{counts:?}");
    assert_eq!(counts.invalid_grants, 0, "{counts:?}");
    assert!(counts.refreshes >= 3, "{counts:?}");
    // Each round refreshed once per replica at most: the row lock let the later replica use
    // the earlier one's token.
    assert!(counts.refreshes <= 6, "{counts:?}");
    let rows = u2m_rows(&stack).await;
    assert_eq!(
        rows[0]["generation"],
        serde_json::json!(1 + counts.refreshes)
    );

    // The row lock on its own, without aegis' caches and Redis lock in front: two U2M sources
    // (two "replicas") ask for 50 tokens at once after the stored one ran out. One refresh,
    // everyone else reuses its token; nothing is replayed.
    tokio::time::sleep(ttl).await;
    let before = stack.sandbox.u2m_counts();
    let cfg = aegis::config::Config::load(stack.config_path(), &aegis::config::ProcessEnv)
        .expect("the stack's config");
    let ws = cfg.workspaces[0].clone();
    let sources: Vec<std::sync::Arc<aegis::broker::u2m::U2m>> = (0..2)
        .map(|_| {
            std::sync::Arc::new(aegis::broker::u2m::U2m::new(
                aegis::pg::PgTarget::parse(&cfg.postgres.url).expect("pg url"),
                &cfg.redis.cache_key,
                cfg.server.public_url.clone().expect("public_url"),
                aegis::http::client(Duration::from_secs(2)).expect("http client"),
                aegis::redis::RedisLink::new(&stack.redis.url()).expect("redis url"),
            ))
        })
        .collect();
    let alice_identity = aegis::identity::Identity {
        issuer_name: "sandbox".into(),
        issuer: stack.sandbox.idp_url.as_str().into(),
        subject: "u-alice".into(),
        user_name: "alice@example.com".into(),
        agent: None,
        expires_at: i64::MAX / 2,
        actor_chain: String::new(),
    };
    let calls = (0..50).map(|i| {
        let source = sources[i % 2].clone();
        let ws = ws.clone();
        let who = alice_identity.clone();
        tokio::spawn(async move { source.access_token(&ws, &who).await })
    });
    for r in futures_util::future::join_all(calls).await {
        let minted = r.expect("task").expect("a token");
        assert!(minted.expires_in > 0);
    }
    let after = stack.sandbox.u2m_counts();
    assert_eq!(after.refreshes, before.refreshes + 1, "{after:?}");
    assert_eq!(after.replays, 0, "{after:?}");
    assert_eq!(after.invalid_grants, 0, "{after:?}");

    // A Redis flush and a restart (nothing cached anywhere) cost a refresh, not a consent.
    flushall(&stack).await;
    stack.aegis.restart().await.expect("aegis restarts");
    let r = get(&stack, ME, Some(&alice)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(stack.sandbox.u2m_counts().codes_redeemed, 1);

    // The workspace revokes the grant: the next refresh is invalid_grant → consent_required,
    // and the stored grant is dropped.
    stack.sandbox.revoke_u2m_user("alice@example.com");
    tokio::time::sleep(ttl).await;
    let r = get(&stack, ME, Some(&alice)).await;
    consent_url(&r);
    assert!(u2m_rows(&stack).await.is_empty());
    assert_eq!(stack.sandbox.u2m_counts().replays, 0);

    drop(envoy_b);
    stack.shutdown().await;
}

/// A stack whose workspace uses Entra OBO against the sandbox's Entra-shaped endpoint.
async fn entra_stack() -> Stack {
    let opts = StackOptions::new(AEGIS_BIN).with_config(|c| {
        let idp = c["issuers"][0]["issuer"]
            .as_str()
            .expect("issuer")
            .to_string();
        let keys = std::path::Path::new(
            c["redis"]["cache_key_file"]
                .as_str()
                .expect("cache_key_file"),
        )
        .parent()
        .expect("keys dir")
        .to_path_buf();
        let secret = keys.join("entra.secret");
        std::fs::write(&secret, sandbox::ENTRA_CLIENT_SECRET).expect("write the client secret");
        let ws = workspace(c);
        ws.insert("token_source".into(), "entra_obo".into());
        ws.insert("client_id".into(), sandbox::ENTRA_CLIENT_ID.into());
        ws.insert("tenant_id".into(), sandbox::ENTRA_TENANT_ID.into());
        ws.insert(
            "entra_token_url".into(),
            format!("{idp}/{}/oauth2/v2.0/token", sandbox::ENTRA_TENANT_ID).into(),
        );
        ws.insert(
            "client_secret_file".into(),
            secret.to_string_lossy().into_owned().into(),
        );
    });
    start_with(opts).await
}

#[tokio::test]
async fn entra_obo_mints_the_users_token_and_maps_errors() {
    let stack = entra_stack().await;

    let alice = token(&stack, "alice");
    for _ in 0..3 {
        let r = get(&stack, ME, Some(&alice)).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.body["userName"], "alice@example.com");
    }
    assert_eq!(stack.sandbox.entra_obo_count("alice@example.com"), 1);
    // No federation exchange happened, and the IdP JWT never reached the workspace.
    for rec in stack.sandbox.requests() {
        assert_ne!(rec.action, "tokenExchange", "{rec:?}");
        assert_ne!(rec.authorization_kind, "idp_jwt", "{rec:?}");
    }
    let audit = audit_rows(&stack).await;
    assert_eq!(audit.last().expect("rows")["token_source"], "entra_obo");

    // 429 with Retry-After: denied rate_limited, the hint passed on.
    stack.sandbox.set_entra_fault(TokenFault::RateLimited {
        retry_after_secs: 7,
    });
    let r = get(&stack, ME, Some(&token(&stack, "bob"))).await;
    assert_eq!(r.status, 429, "{}", r.text);
    assert_eq!(r.body["error"], "rate_limited");
    let retry: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("retry-after");
    assert!((1..=7).contains(&retry), "{retry}");

    // 5xx: dependency_unavailable.
    stack.sandbox.set_entra_fault(TokenFault::ServerError);
    let r = get(&stack, ME, Some(&token(&stack, "carol"))).await;
    assert_eq!(r.status, 503, "{}", r.text);
    assert_eq!(r.body["error"], "dependency_unavailable");

    // invalid_grant (a user the directory does not know): token_exchange_rejected.
    stack.sandbox.set_entra_fault(TokenFault::Ok);
    let r = get(&stack, ME, Some(&token(&stack, "mallory"))).await;
    assert_eq!(r.status, 401, "{}", r.text);
    assert_eq!(r.body["error"], "token_exchange_rejected");
    assert_no_tokens("a deny body", &r.text);
    assert!(!r.text.contains(sandbox::ENTRA_CLIENT_SECRET));

    // Once the endpoint answers again (and any Retry-After has passed), bob gets his token.
    let bob = token(&stack, "bob");
    eventually(
        Duration::from_secs(15),
        "bob allowed after the faults",
        || async { get(&stack, ME, Some(&bob)).await.status == 200 },
    )
    .await;
    assert_eq!(stack.sandbox.entra_obo_count("bob@example.com"), 1);

    let log = stack.aegis.log();
    assert!(!log.contains(sandbox::ENTRA_CLIENT_SECRET));
    assert_no_tokens("the aegis log", &log);
    stack.shutdown().await;
}

#[tokio::test]
async fn u2m_a_second_issuers_user_with_the_same_name_gets_no_grant_of_alice() {
    let public = free_addr().expect("a free port");
    let opts = StackOptions::new(AEGIS_BIN).with_config(move |c| {
        let server = table(c, "server");
        server.insert("public_listen".into(), public.to_string().into());
        server.insert("public_url".into(), format!("http://{public}").into());
        let ws = workspace(c);
        ws.insert("token_source".into(), "u2m".into());
        ws.insert("client_id".into(), U2M_CLIENT_ID.into());
        // A second trusted issuer (same keys as the dev IdP) whose e-mails collide.
        add_tenant_b(c);
    });
    let stack = start_with(opts).await;
    let alice = token(&stack, "alice");
    let link = consent_url(&get(&stack, ME, Some(&alice)).await);
    let (status, page) = consent(&link, "alice@example.com").await;
    assert_eq!(status, 200, "{page}");
    // Positive control: alice is served with her grant.
    let r = get(&stack, ME, Some(&alice)).await;
    assert_eq!(r.status, 200, "{}", r.text);

    // mallory of tenant-b says she is alice@example.com: her own principal has no grant.
    let mallory = tenant_b_token(&stack, "mallory", "alice@example.com");
    let r = get(&stack, ME, Some(&mallory)).await;
    let her_link = consent_url(&r);
    // Her consent link is bound to her principal, not alice's.
    let q: std::collections::HashMap<String, String> = reqwest::Url::parse(&her_link)
        .expect("url")
        .query_pairs()
        .into_owned()
        .collect();
    assert_eq!(q["p"], "mallory");
    assert!(q["i"].ends_with(sandbox::SECOND_ISSUER_PATH), "{q:?}");
    assert!(
        !stack
            .sandbox
            .requests()
            .iter()
            .any(|x| x.trace_id.as_deref() == Some(r.trace_id().as_str())),
        "mallory's request reached the workspace"
    );
    // Still exactly one grant: alice's.
    let rows = u2m_rows(&stack).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["subject"], "u-alice");
    stack.shutdown().await;
}
