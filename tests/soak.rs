//! A bounded soak: a steady request rate through Envoy for `AEGIS_SOAK_SECS` (default 60; `make
//! soak` runs 600) while Redis and PostgreSQL are restarted at random. It checks:
//!
//! - zero requests allowed without a committed audit row (every request the workspace saw has a
//!   trace id with an ALLOW row, and there are at least as many ALLOW rows as 200s);
//! - zero 5xx other than the fail-closed 503s, and no request that got no answer;
//! - aegis' resident memory stays flat (read from /proc).

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use support::*;

const ME: &str = "/api/2.0/preview/scim/v2/Me";
/// Requests per second, spread over a few users.
const RATE: u64 = 20;
/// At most this many requests in flight; past that the tick is skipped and counted.
const MAX_IN_FLIGHT: usize = 32;

fn soak_secs() -> u64 {
    std::env::var("AEGIS_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|s| (10..=3600).contains(s))
        .unwrap_or(60)
}

/// Resident set size of `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[derive(Default, Debug)]
struct Tally {
    ok: u64,
    fail_closed: u64,
    other: Vec<(u16, String)>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_with_random_store_restarts() {
    let secs = soak_secs();
    let mut stack = start().await;
    let users: Vec<String> = ["alice", "bob", "carol"]
        .iter()
        .map(|u| {
            stack.sandbox.mint_idp_token(&TokenRequest {
                ttl_secs: secs as i64 + 600,
                ..TokenRequest::new(u)
            })
        })
        .collect();
    let pid = stack.aegis.pid().expect("aegis pid");
    let url = format!("{}{ME}", stack.envoy_url());
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let tally = Arc::new(std::sync::Mutex::new(Tally::default()));
    let gate = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));

    // The load: one request every 1/RATE s, round-robin over the users.
    let stop = Instant::now() + Duration::from_secs(secs);
    let load = {
        let (tally, gate, client, url, users) = (
            tally.clone(),
            gate.clone(),
            client.clone(),
            url.clone(),
            users.clone(),
        );
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1000 / RATE));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut sent = 0u64;
            let mut skipped = 0u64;
            let mut tasks = tokio::task::JoinSet::new();
            while Instant::now() < stop {
                tick.tick().await;
                let Ok(permit) = gate.clone().try_acquire_owned() else {
                    skipped += 1;
                    continue;
                };
                let bearer = users[(sent % users.len() as u64) as usize].clone();
                sent += 1;
                let (tally, client, url) = (tally.clone(), client.clone(), url.clone());
                tasks.spawn(async move {
                    let _permit = permit;
                    let outcome = match client.get(&url).bearer_auth(bearer).send().await {
                        Ok(r) => {
                            let status = r.status().as_u16();
                            let text = r.text().await.unwrap_or_default();
                            (status, text)
                        }
                        Err(e) => (0, format!("no answer: {e}")),
                    };
                    let mut t = tally.lock().unwrap();
                    match outcome.0 {
                        200 => t.ok += 1,
                        503 => t.fail_closed += 1,
                        _ => t.other.push(outcome),
                    }
                });
                while tasks.try_join_next().is_some() {}
            }
            while tasks.join_next().await.is_some() {}
            (sent, skipped)
        })
    };

    // Chaos: every 6-14 s, restart Redis or PostgreSQL (stopped, or killed, for 1-3 s).
    let warm_at = Instant::now() + Duration::from_secs(secs / 4);
    let mut rss_warm = 0;
    let mut restarts = Vec::new();
    let mut rng = rand::rng();
    loop {
        let pause = Duration::from_millis(rng.random_range(6_000..14_000));
        if Instant::now() + pause + Duration::from_secs(4) >= stop {
            break;
        }
        tokio::time::sleep(pause).await;
        if rss_warm == 0 && Instant::now() >= warm_at {
            rss_warm = rss_kib(pid);
        }
        let down = Duration::from_millis(rng.random_range(1_000..3_000));
        match rng.random_range(0..3) {
            0 => {
                stack.redis.stop();
                tokio::time::sleep(down).await;
                stack.redis.start_again().await.expect("redis restarts");
                restarts.push("redis");
            }
            1 => {
                stack.postgres.stop().await;
                tokio::time::sleep(down).await;
                stack
                    .postgres
                    .start_again()
                    .await
                    .expect("postgres restarts");
                restarts.push("postgres stop");
            }
            _ => {
                stack.postgres.kill();
                tokio::time::sleep(down).await;
                stack
                    .postgres
                    .start_again()
                    .await
                    .expect("postgres restarts");
                restarts.push("postgres kill");
            }
        }
    }
    if rss_warm == 0 {
        rss_warm = rss_kib(pid);
    }
    let (sent, skipped) = load.await.unwrap();
    let rss_end = rss_kib(pid);

    // Back to normal afterwards.
    eventually(
        Duration::from_secs(20),
        "requests flow after the soak",
        || async { get(&stack, ME, Some(&users[0])).await.status == 200 },
    )
    .await;

    let t = std::mem::take(&mut *tally.lock().unwrap());
    assert!(
        t.other.is_empty(),
        "answers other than 200 or a fail-closed 503: {:?}",
        t.other
    );
    assert!(
        t.ok > sent / 4,
        "too few requests succeeded: {t:?} of {sent}"
    );

    let rows = audit_rows(&stack).await;
    let allow: HashSet<&str> = rows
        .iter()
        .filter(|r| r["decision"] == "ALLOW")
        .filter_map(|r| r["trace_id"].as_str())
        .collect();
    let upstream: Vec<RequestRecord> = stack
        .sandbox
        .requests()
        .into_iter()
        .filter(|r| r.service != "oauth2")
        .collect();
    let without_audit: Vec<_> = upstream
        .iter()
        .filter(|r| !r.trace_id.as_deref().is_some_and(|id| allow.contains(id)))
        .collect();
    assert!(
        without_audit.is_empty(),
        "{} requests allowed without a committed audit row: {:#?}",
        without_audit.len(),
        without_audit.iter().take(5).collect::<Vec<_>>()
    );
    assert!(
        allow.len() as u64 >= t.ok,
        "{} ALLOW rows < {} 200s",
        allow.len(),
        t.ok
    );

    // Flat memory: well under 64 MiB of growth after warm-up (the caches are bounded).
    let growth = rss_end.saturating_sub(rss_warm);
    eprintln!(
        "soak {secs}s: sent {sent} (skipped {skipped}), 200: {}, 503: {}, upstream checked: {}, \
         allowed without audit: {}, restarts: {restarts:?}, aegis RSS {rss_warm} -> {rss_end} KiB",
        t.ok,
        t.fail_closed,
        upstream.len(),
        without_audit.len()
    );
    assert!(
        growth < 64 * 1024,
        "aegis RSS grew {growth} KiB ({rss_warm} -> {rss_end})"
    );
    stack.shutdown().await;
}
