//! Fault injection: Redis, PostgreSQL, the IdP's JWKS, the Databricks token endpoint and aegis
//! itself fail in the ways they fail in production, and every request in the meantime must be
//! refused (503/429 with `retry-after`), never allowed. Redis and PostgreSQL sit behind a TCP
//! fault proxy (`sandbox::stack::FaultProxy`) for "slow" and "blackhole". The fail-closed outcome
//! of each fault is written down in SECURITY.md.
//!
//! After every test: each request the workspace saw carries an aegis trace id that has a
//! committed ALLOW row (nothing allowed without audit).

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use sandbox::stack::{AegisProcess, FaultMode, FaultProxy};
use sandbox::{JwksFault, TokenFault};
use support::*;

const ME: &str = "/api/2.0/preview/scim/v2/Me";

/// Status and deny reason of one request through Envoy; a 503 must be aegis' own.
async fn probe(stack: &Stack, bearer: &str) -> (u16, String) {
    let r = get(stack, ME, Some(bearer)).await;
    let reason = r.body["error"].as_str().unwrap_or_default().to_string();
    if r.status == 503 {
        // Always aegis' own deny: Envoy's bare 503 never counts as aegis failing closed.
        assert_eq!(reason, "dependency_unavailable", "{}", r.text);
        assert!(r.header("retry-after").is_some(), "{}", r.text);
        assert_eq!(
            r.body["trace_id"].as_str(),
            Some(r.trace_id().as_str()),
            "{}",
            r.text
        );
    }
    (r.status, reason)
}

/// Waits until requests are refused with 503, then checks that `n` more are refused and the
/// workspace saw none of them.
async fn assert_fails_closed(stack: &Stack, bearer: &str, what: &str) {
    eventually(Duration::from_secs(15), what, || async {
        probe(stack, bearer).await.0 == 503
    })
    .await;
    let before = workspace_requests(stack).len();
    for _ in 0..3 {
        // aegis' own deny, never a bare 503 Envoy could have produced by itself.
        let r = get(stack, ME, Some(bearer)).await;
        assert_eq!(r.status, 503, "{what}: {}", r.text);
        assert_eq!(
            r.body["error"], "dependency_unavailable",
            "{what}: {}",
            r.text
        );
        assert_eq!(
            r.body["trace_id"].as_str(),
            Some(r.trace_id().as_str()),
            "{what}: {}",
            r.text
        );
        assert!(r.header("retry-after").is_some(), "{what}: {}", r.text);
    }
    assert_eq!(
        workspace_requests(stack).len(),
        before,
        "{what}: the workspace saw a request"
    );
}

async fn assert_recovers(stack: &Stack, bearer: &str, what: &str) {
    eventually(Duration::from_secs(20), what, || async {
        probe(stack, bearer).await.0 == 200
    })
    .await;
}

/// Requests that reached the workspace API (not token exchanges, not aegis' own probes).
fn workspace_requests(stack: &Stack) -> Vec<RequestRecord> {
    stack
        .sandbox
        .requests()
        .into_iter()
        .filter(|r| r.service != "oauth2")
        .collect()
}

/// Every request the workspace saw came through aegis with a trace id that has a committed
/// ALLOW row. Returns how many were checked.
async fn assert_nothing_allowed_without_audit(stack: &Stack) -> usize {
    let rows = audit_rows(stack).await;
    let allowed: std::collections::HashSet<&str> = rows
        .iter()
        .filter(|r| r["decision"] == "ALLOW")
        .filter_map(|r| r["trace_id"].as_str())
        .collect();
    let seen = workspace_requests(stack);
    for r in &seen {
        let trace = r
            .trace_id
            .as_deref()
            .unwrap_or_else(|| panic!("a request reached the workspace without aegis: {r:?}"));
        assert!(
            allowed.contains(trace),
            "allowed without a committed audit row: {r:?}"
        );
    }
    seen.len()
}

/// Sets `default_transaction_read_only` for the cluster and drops aegis' sessions, so its
/// reconnects see it.
async fn set_read_only(stack: &Stack, on: bool) {
    let set = if on {
        "ALTER SYSTEM SET default_transaction_read_only = on"
    } else {
        "ALTER SYSTEM RESET default_transaction_read_only"
    };
    for sql in [
        set,
        "SELECT pg_reload_conf()",
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE usename = 'aegis' AND pid <> pg_backend_pid()",
    ] {
        stack.postgres.execute(sql).await.expect(sql);
    }
}

/// Routes aegis' Redis and PostgreSQL connections through two fault proxies.
async fn start_behind_proxies() -> (Stack, Arc<FaultProxy>, Arc<FaultProxy>) {
    let redis_proxy = Arc::new(FaultProxy::start().await.expect("redis proxy"));
    let pg_proxy = Arc::new(FaultProxy::start().await.expect("postgres proxy"));
    let (rp, pp) = (redis_proxy.clone(), pg_proxy.clone());
    let stack = start_with(StackOptions::new(AEGIS_BIN).with_config(move |cfg| {
        for (section, proxy) in [("redis", &rp), ("postgres", &pp)] {
            let t = cfg.get_mut(section).and_then(|v| v.as_table_mut()).unwrap();
            let url = t["url"].as_str().unwrap().to_string();
            let via = proxy.reroute(&url).expect("a loopback host:port url");
            t.insert("url".into(), via.into());
        }
    }))
    .await;
    (stack, redis_proxy, pg_proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_and_postgres_faults_fail_closed() {
    let (stack, redis, pg) = start_behind_proxies().await;
    let alice = token(&stack, "alice");
    assert_eq!(probe(&stack, &alice).await.0, 200);

    let mut survived = 0;
    for (name, proxy) in [("redis", &redis), ("postgres", &pg)] {
        for mode in [
            FaultMode::Blackhole,
            FaultMode::Slow(Duration::from_millis(2500)),
            FaultMode::Refuse,
        ] {
            let what = format!("{name} {mode:?}");
            proxy.set_mode(mode);
            assert_fails_closed(&stack, &alice, &what).await;
            proxy.set_mode(FaultMode::Pass);
            assert_recovers(&stack, &alice, &format!("recovery after {what}")).await;
            survived += 1;
        }
    }

    // PostgreSQL turns read-only (a failover to a replica, a full disk): commits fail.
    set_read_only(&stack, true).await;
    assert_fails_closed(&stack, &alice, "postgres read-only").await;
    set_read_only(&stack, false).await;
    assert_recovers(&stack, &alice, "recovery after read-only").await;
    survived += 1;

    let checked = assert_nothing_allowed_without_audit(&stack).await;
    eprintln!("store faults: {survived} survived, {checked} upstream requests checked");
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_outages_never_let_a_bad_key_set_in() {
    let mut stack = start_with(StackOptions::new(AEGIS_BIN).with_config(|cfg| {
        let issuers = cfg
            .get_mut("issuers")
            .and_then(|v| v.as_array_mut())
            .unwrap();
        let t = issuers[0].as_table_mut().unwrap();
        // Refreshed every 2 s; unusable 6 s after the last good fetch.
        t.insert("max_key_age".into(), "6s".into());
    }))
    .await;
    let first = token(&stack, "alice");
    assert_eq!(probe(&stack, &first).await.0, 200);

    // An HTML page or an empty set in place of the JWKS never replaces the good keys.
    for fault in [JwksFault::Html, JwksFault::Empty] {
        let f0 = stack.sandbox.jwks_fetch_count();
        stack.sandbox.set_jwks_fault(fault);
        eventually(
            Duration::from_secs(10),
            "a refresh during the fault",
            || async { stack.sandbox.jwks_fetch_count() > f0 },
        )
        .await;
        let fresh = token(&stack, "alice");
        assert_eq!(
            probe(&stack, &fresh).await,
            (200, String::new()),
            "{fault:?}"
        );
        stack.sandbox.set_jwks_fault(JwksFault::Ok);
        let f1 = stack.sandbox.jwks_fetch_count();
        eventually(Duration::from_secs(10), "a good refresh", || async {
            stack.sandbox.jwks_fetch_count() > f1
        })
        .await;
    }

    // The IdP goes down: cached keys keep working for a while, then everything is refused,
    // also tokens verified before the outage.
    stack.sandbox.set_jwks_fault(JwksFault::Down);
    let down_at = Instant::now();
    let during = token(&stack, "alice");
    assert_eq!(
        probe(&stack, &during).await.0,
        200,
        "cached keys still work"
    );
    assert_fails_closed(&stack, &during, "keys past max_key_age").await;
    assert!(
        down_at.elapsed() >= Duration::from_secs(3),
        "{:?}",
        down_at.elapsed()
    );
    assert_eq!(probe(&stack, &first).await.0, 503, "a cached verdict");
    stack.sandbox.set_jwks_fault(JwksFault::Ok);
    assert_recovers(&stack, &during, "keys fetched again").await;

    // Key rotation after a compromise: the RSA key leaves the JWKS. Its tokens are refused
    // from the next refresh on, also one verified (and cached) before; a token signed by the
    // EC key that remains keeps working.
    let mut req = TokenRequest::new("alice");
    req.alg = Some("ES256".into());
    let ec = stack.sandbox.mint_idp_token(&req);
    assert_eq!(probe(&stack, &ec).await, (200, String::new()));
    assert_eq!(probe(&stack, &during).await, (200, String::new()));
    stack.sandbox.set_jwks_fault(JwksFault::WithoutRsa);
    eventually(
        Duration::from_secs(10),
        "the rotated-out key's cached token refused",
        || async { probe(&stack, &during).await == (401, "invalid_token".to_string()) },
    )
    .await;
    assert_eq!(probe(&stack, &during).await.0, 401);
    assert_eq!(probe(&stack, &ec).await, (200, String::new()));
    stack.sandbox.set_jwks_fault(JwksFault::Ok);
    assert_recovers(&stack, &during, "the RSA key back in the set").await;

    // Down at start: aegis is not ready and refuses everything until the keys load.
    stack.aegis.kill();
    stack.sandbox.set_jwks_fault(JwksFault::Down);
    stack.aegis = AegisProcess::spawn(stack.aegis_bin(), stack.config_path()).expect("spawn");
    // Until aegis listens, Envoy answers its own bare 503; from then on every refusal must be
    // aegis' own.
    eventually(
        Duration::from_secs(15),
        "aegis answering Checks",
        || async {
            let r = get(&stack, ME, Some(&during)).await;
            r.status == 503 && r.body["error"] == "dependency_unavailable"
        },
    )
    .await;
    let client = http();
    let readyz = format!("{}/readyz", stack.aegis_admin_url());
    let until = Instant::now() + Duration::from_secs(4);
    let mut refused = 0;
    while Instant::now() < until {
        let ready = client
            .get(&readyz)
            .send()
            .await
            .map(|r| r.status().as_u16());
        assert!(!matches!(ready, Ok(200)), "ready without keys");
        assert_eq!(probe(&stack, &during).await.0, 503);
        refused += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stack.sandbox.set_jwks_fault(JwksFault::Ok);
    stack
        .aegis
        .wait_ready(Duration::from_secs(20))
        .await
        .expect("ready once the JWKS answers");
    assert_recovers(&stack, &during, "after start").await;

    let checked = assert_nothing_allowed_without_audit(&stack).await;
    eprintln!("jwks faults: 4 survived, {refused} refused while not ready, {checked} checked");
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_faults_fail_closed() {
    let stack = start().await;
    stack.sandbox.clear_requests();
    let cases = [
        (
            TokenFault::ServerError,
            "bob",
            503,
            "dependency_unavailable",
            None,
        ),
        (
            TokenFault::RateLimited {
                retry_after_secs: 7,
            },
            "carol",
            429,
            "rate_limited",
            Some("7"),
        ),
        (
            TokenFault::Hang,
            "alice",
            503,
            "dependency_unavailable",
            None,
        ),
    ];
    for (fault, user, status, reason, retry_after) in cases {
        stack.sandbox.set_token_fault(fault);
        let t = token(&stack, user);
        let started = Instant::now();
        let r = get(&stack, ME, Some(&t)).await;
        assert_eq!(r.status, status, "{fault:?}: {}", r.text);
        assert_eq!(r.body["error"], reason, "{fault:?}");
        let ra = r.header("retry-after");
        assert!(ra.is_some(), "{fault:?}: no retry-after");
        if let Some(want) = retry_after {
            assert_eq!(
                ra,
                Some(want),
                "{fault:?}: the endpoint's Retry-After is honoured"
            );
        }
        // The deadline holds even when the token endpoint never answers.
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{fault:?}: {:?}",
            started.elapsed()
        );
        assert!(workspace_requests(&stack).is_empty(), "{fault:?}");
    }
    stack.sandbox.set_token_fault(TokenFault::Ok);
    let t = token(&stack, "alice");
    assert_eq!(get(&stack, ME, Some(&t)).await.status, 200);
    let rows = audit_rows(&stack).await;
    let denies: Vec<_> = rows.iter().filter(|r| r["decision"] == "DENY").collect();
    assert_eq!(denies.len(), 3, "{rows:#?}");
    assert_nothing_allowed_without_audit(&stack).await;
    stack.shutdown().await;
}

/// Steady load from `workers` tasks until `stop`; each result is (sent at, status).
fn spawn_load(
    stack: &Stack,
    bearer: String,
    workers: usize,
    stop: Instant,
) -> Vec<tokio::task::JoinHandle<Vec<(Instant, u16)>>> {
    let url = format!("{}{ME}", stack.envoy_url());
    (0..workers)
        .map(|_| {
            let (url, bearer) = (url.clone(), bearer.clone());
            tokio::spawn(async move {
                let client = reqwest::Client::builder()
                    .timeout(Duration::from_secs(10))
                    .build()
                    .unwrap();
                let mut out = Vec::new();
                while Instant::now() < stop {
                    let at = Instant::now();
                    let status = match client.get(&url).bearer_auth(&bearer).send().await {
                        Ok(r) => r.status().as_u16(),
                        Err(_) => 0,
                    };
                    out.push((at, status));
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                out
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aegis_or_postgres_killed_under_load_never_allows() {
    let mut stack = start().await;
    let alice = token(&stack, "alice");
    assert_eq!(probe(&stack, &alice).await.0, 200);

    // aegis SIGKILLed under load: Envoy refuses (failure_mode_allow: false) until it is back.
    let stop = Instant::now() + Duration::from_secs(9);
    let load = spawn_load(&stack, alice.clone(), 3, stop);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stack.aegis.kill();
    let killed_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let restart_at = Instant::now();
    stack.aegis.restart().await.expect("aegis restarts");
    let mut results = Vec::new();
    for h in load {
        results.extend(h.await.unwrap());
    }
    let while_dead: Vec<u16> = results
        .iter()
        .filter(|(at, _)| *at > killed_at + Duration::from_millis(50) && *at < restart_at)
        .map(|(_, s)| *s)
        .collect();
    assert!(!while_dead.is_empty());
    assert!(
        while_dead.iter().all(|s| *s == 503 || *s == 403),
        "{while_dead:?}"
    );
    assert!(results.iter().any(|(_, s)| *s == 200));
    assert!(
        results.iter().all(|(_, s)| matches!(*s, 200 | 403 | 503)),
        "{results:?}"
    );

    // PostgreSQL SIGKILLed under load, mid-commit: in-flight allows either committed or were
    // refused.
    let stop = Instant::now() + Duration::from_secs(8);
    let load = spawn_load(&stack, alice.clone(), 3, stop);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stack.postgres.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stack
        .postgres
        .start_again()
        .await
        .expect("postgres restarts");
    let mut pg_results = Vec::new();
    for h in load {
        pg_results.extend(h.await.unwrap());
    }
    assert!(
        pg_results.iter().any(|(_, s)| *s == 503),
        "postgres' death went unnoticed"
    );
    assert!(
        pg_results.iter().all(|(_, s)| matches!(*s, 200 | 503)),
        "{pg_results:?}"
    );
    assert_recovers(&stack, &alice, "after postgres restart").await;

    let checked = assert_nothing_allowed_without_audit(&stack).await;
    eprintln!(
        "kills under load: {} requests while aegis was dead (all refused), {} upstream requests \
         checked against the chain",
        while_dead.len(),
        checked
    );
    stack.shutdown().await;
}
