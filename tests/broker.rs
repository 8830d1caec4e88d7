//! The token broker across replicas: one mint per user however many replicas and concurrent
//! requests, revocation reaching every replica within a second, and no expired token ever sent
//! upstream while tokens live only seconds.

mod support;

use std::time::{Duration, Instant};

use sandbox::SandboxOptions;
use support::*;

async fn get_at(base: &str, bearer: &str) -> u16 {
    http()
        .get(format!("{base}/api/2.0/preview/scim/v2/Me"))
        .bearer_auth(bearer)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_200_concurrent_first_requests_make_one_mint() {
    let stack = start().await;
    let b = second_replica(&stack).await;
    let alice = token(&stack, "alice");
    let urls = [stack.envoy_url(), b.envoy.listener_url()];

    let client = http();
    let futs = (0..200).map(|i| {
        let url = format!("{}/api/2.0/preview/scim/v2/Me", urls[i % 2]);
        let req = client.get(url).bearer_auth(&alice);
        async move { req.send().await.map(|r| r.status().as_u16()).unwrap_or(0) }
    });
    let statuses = futures_util::future::join_all(futs).await;
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(ok, 200, "statuses: {statuses:?}");
    assert_eq!(
        stack.sandbox.exchange_count("alice@example.com"),
        1,
        "more than one token exchange for one user"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_reaches_the_other_replica_within_a_second() {
    let stack = start().await;
    let b = second_replica(&stack).await;
    let alice = token(&stack, "alice");
    // Both replicas hold alice's token in L1.
    assert_eq!(get_at(&stack.envoy_url(), &alice).await, 200);
    assert_eq!(get_at(&b.envoy.listener_url(), &alice).await, 200);
    assert_eq!(get_at(&b.envoy.listener_url(), &alice).await, 200);
    assert_eq!(stack.sandbox.exchange_count("alice@example.com"), 1);

    let config = stack.config_path().to_str().unwrap().to_string();
    let (code, out, err) = revoke(&stack, "alice@example.com", &[]);
    assert_eq!(code, 0, "{out}{err}");
    let revoked_at = Instant::now();

    // Replica B must drop its copy: its next request mints a fresh token.
    loop {
        assert_eq!(get_at(&b.envoy.listener_url(), &alice).await, 200);
        if stack.sandbox.exchange_count("alice@example.com") == 2 {
            break;
        }
        assert!(
            revoked_at.elapsed() < Duration::from_secs(1),
            "replica B still served the revoked token after 1s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The revocation is in the chain.
    let rows = stack
        .postgres
        .query_json("SELECT decision, reason, user_name FROM aegis_audit WHERE decision = 'ADMIN'")
        .await
        .unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["reason"], "token_revoked");
    assert_eq!(rows[0]["user_name"], "alice@example.com");
    let (code, out, err) = aegis(&["audit", "verify", "--config", &config]);
    assert_eq!(code, 0, "{out}{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_tokens_are_never_sent_expired() {
    let stack = start_with(StackOptions::new(AEGIS_BIN).with_sandbox(SandboxOptions {
        token_ttl: Duration::from_secs(3),
        ..SandboxOptions::default()
    }))
    .await;
    let users = ["alice", "bob", "carol"];
    let tokens: Vec<String> = users.iter().map(|u| token(&stack, u)).collect();
    let started = Instant::now();
    let mut sent = 0;
    while started.elapsed() < Duration::from_secs(60) {
        for t in &tokens {
            let status = get_at(&stack.envoy_url(), t).await;
            assert_eq!(status, 200, "request {sent} refused");
            sent += 1;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let seen = stack.sandbox.requests();
    let expired: Vec<_> = seen.iter().filter(|r| r.token_expired).collect();
    assert!(
        expired.is_empty(),
        "expired tokens reached Databricks: {expired:#?}"
    );
    let api: Vec<_> = seen.iter().filter(|r| r.service != "oauth2").collect();
    assert_eq!(api.len(), sent);
    assert!(api.iter().all(|r| r.status == 200));
    // Tokens were renewed (3 s lifetime over 60 s), mostly ahead of time.
    let mints = stack.sandbox.exchange_count("alice@example.com");
    assert!(
        mints >= 20,
        "only {mints} mints for alice in 60 s of 3 s tokens"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_per_user_rate_limit_holds_over_two_replicas() {
    let stack = start_with(StackOptions::new(AEGIS_BIN).with_config(|c| {
        let ws = c
            .get_mut("workspaces")
            .and_then(|v| v.as_array_mut())
            .and_then(|a| a.first_mut())
            .and_then(|w| w.as_table_mut())
            .expect("a workspace");
        let limits: toml::Table = toml::from_str(r#"user = "20/s""#).expect("limits");
        ws.insert("rate_limits".into(), limits.into());
    }))
    .await;
    let b = second_replica(&stack).await;
    let alice = token(&stack, "alice");
    let urls = [stack.envoy_url(), b.envoy.listener_url()];
    let window = Duration::from_secs(3);
    let started = Instant::now();
    let workers = (0..4).map(|w| {
        let (urls, alice) = (urls.clone(), alice.clone());
        async move {
            let client = http();
            let mut out = Vec::new();
            for i in 0..10_000usize {
                if started.elapsed() >= window {
                    break;
                }
                let url = format!("{}/api/2.0/preview/scim/v2/Me", urls[(i + w) % 2]);
                let r = read(
                    client
                        .get(url)
                        .bearer_auth(&alice)
                        .send()
                        .await
                        .expect("request"),
                )
                .await;
                out.push((
                    r.status,
                    r.body["error"].clone(),
                    r.header("retry-after").map(str::to_string),
                ));
            }
            out
        }
    });
    let results: Vec<_> = futures_util::future::join_all(workers)
        .await
        .into_iter()
        .flatten()
        .collect();
    let allowed = results.iter().filter(|r| r.0 == 200).count();
    let rate = allowed as f64 / window.as_secs_f64();
    for (status, error, retry_after) in results.iter().filter(|r| r.0 != 200) {
        assert_eq!(*status, 429, "{error}");
        assert_eq!(error, "rate_limited");
        let secs: u64 = retry_after
            .as_deref()
            .expect("retry-after")
            .parse()
            .expect("seconds");
        assert!((1..=2).contains(&secs), "retry-after {secs}");
    }
    assert!(
        results.len() > 3 * allowed,
        "the load did not exceed the limit: {}",
        results.len()
    );
    // 20/s with a burst of 2: within 10 % over the window.
    assert!(
        (18.0..=22.0).contains(&rate),
        "{allowed} allowed in {window:?}: {rate:.1}/s"
    );
    // Another user is not limited by alice's traffic (the control).
    assert_eq!(get_at(&stack.envoy_url(), &token(&stack, "bob")).await, 200);
    eprintln!(
        "rate limit 20/s over two replicas: {allowed} allowed of {} in {window:?} ({rate:.1}/s)",
        results.len()
    );
}
