//! Redis carries revocations, so a replica that has lost it must deny at once, through Envoy:
//! when the Redis process exits, when the network to it goes silent (no FIN, no RST), and when
//! its events subscription stops delivering while commands still work. Each test measures the
//! window in which requests were still allowed and holds it to a bound; every deny after that
//! is aegis' own (`dependency_unavailable` with `retry-after`), and the same requests succeed
//! before the fault and after it heals.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use sandbox::stack::{FaultMode, FaultProxy};
use support::*;

const ME: &str = "/api/2.0/preview/scim/v2/Me";

/// Checks the samples around a fault at `fault_at`: some allowed before it, none sent more
/// than `bound` after it, and every deny after the bound is aegis' own. Returns the window:
/// how long after the fault the last allowed request was sent (zero if none was).
fn window(samples: &[Sample], fault_at: Instant, bound: Duration, what: &str) -> Duration {
    let before = samples
        .iter()
        .filter(|s| s.sent < fault_at && s.status == 200)
        .count();
    assert!(before > 0, "{what}: nothing was allowed before the fault");
    let mut window = Duration::ZERO;
    let mut denied = 0;
    for s in samples.iter().filter(|s| s.sent >= fault_at) {
        let after = s.sent - fault_at;
        if s.status == 200 {
            window = window.max(after);
        } else if after > bound {
            assert_eq!(
                (s.status, s.reason.as_str(), s.retry_after),
                (503, "dependency_unavailable", true),
                "{what}: a deny that is not aegis' own: {s:?}"
            );
            denied += 1;
        }
    }
    assert!(denied > 0, "{what}: no request was denied after the fault");
    assert!(
        window <= bound,
        "{what}: a request sent {window:?} after the fault was allowed (bound {bound:?})"
    );
    eprintln!(
        "{what}: {before} allowed before, last allowed {window:?} after the fault, {denied} denied"
    );
    window
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nothing_is_allowed_50ms_after_the_redis_process_exits() {
    let mut stack = start().await;
    let alice = token(&stack, "alice");
    assert_eq!(get(&stack, ME, Some(&alice)).await.status, 200);

    let until = Instant::now() + Duration::from_millis(2500);
    let load = spawn_load(stack.envoy_url(), ME, alice.clone(), 4, until);
    tokio::time::sleep(Duration::from_millis(800)).await;
    stack.redis.stop(); // SIGKILL, and waits until the process has exited
    let exited = Instant::now();
    let samples = load.await.expect("load");
    window(
        &samples,
        exited,
        Duration::from_millis(50),
        "redis process exit",
    );

    stack.redis.start_again().await.expect("redis restarts");
    eventually(
        Duration::from_secs(15),
        "recovery after redis restart",
        || async { get(&stack, ME, Some(&alice)).await.status == 200 },
    )
    .await;
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_partition_from_redis_is_denied_within_a_second() {
    let proxy = Arc::new(FaultProxy::start().await.expect("redis proxy"));
    let p = proxy.clone();
    let stack = start_with(StackOptions::new(AEGIS_BIN).with_config(move |cfg| {
        let t = cfg.get_mut("redis").and_then(|v| v.as_table_mut()).unwrap();
        let url = t["url"].as_str().unwrap().to_string();
        t.insert(
            "url".into(),
            p.reroute(&url).expect("a loopback url").into(),
        );
    }))
    .await;
    let alice = token(&stack, "alice");
    assert_eq!(get(&stack, ME, Some(&alice)).await.status, 200);

    let until = Instant::now() + Duration::from_millis(3000);
    let load = spawn_load(stack.envoy_url(), ME, alice.clone(), 4, until);
    tokio::time::sleep(Duration::from_millis(800)).await;
    proxy.set_mode(FaultMode::Blackhole);
    let cut = Instant::now();
    let samples = load.await.expect("load");
    window(
        &samples,
        cut,
        Duration::from_secs(1),
        "silent redis partition",
    );

    proxy.set_mode(FaultMode::Pass);
    eventually(
        Duration::from_secs(15),
        "recovery after the partition",
        || async { get(&stack, ME, Some(&alice)).await.status == 200 },
    )
    .await;
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_events_subscription_that_delivers_nothing_is_denied() {
    // CLIENT PAUSE ... WRITE holds every PUBLISH (so nothing reaches the subscription) while
    // PING and reads still answer: the heartbeat is all that can tell.
    let stack = start().await;
    let alice = token(&stack, "alice");
    assert_eq!(get(&stack, ME, Some(&alice)).await.status, 200);
    let redis = redis::Client::open(stack.redis.url()).expect("redis url");
    let mut admin = redis
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection");

    let until = Instant::now() + Duration::from_millis(3500);
    let load = spawn_load(stack.envoy_url(), ME, alice.clone(), 2, until);
    tokio::time::sleep(Duration::from_millis(800)).await;
    redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(4000)
        .arg("WRITE")
        .query_async::<()>(&mut admin)
        .await
        .expect("CLIENT PAUSE");
    let paused = Instant::now();
    let samples = load.await.expect("load");
    // Heartbeats every 250 ms, a 1 s deadline: denied within 1.5 s.
    window(
        &samples,
        paused,
        Duration::from_millis(1500),
        "events subscription silent",
    );
    eventually(
        Duration::from_secs(15),
        "recovery after the pause",
        || async { get(&stack, ME, Some(&alice)).await.status == 200 },
    )
    .await;
    stack.shutdown().await;
}
