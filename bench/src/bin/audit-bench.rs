//! Audit chain benchmark against a durable PostgreSQL (fsync on): append throughput with one and
//! two writers sharing a chain, the wait for a committed append under an open-loop 2,000
//! decisions/s (latency measured from the scheduled send time, so coordinated omission is
//! corrected), and verify speed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aegis::audit::checkpoint;
use aegis::audit::{verify, AuditChain, WriterOptions};
use aegis::pg::PgTarget;
use aegis::secret::Key32;
use bench::loadgen::Outcome;
use sandbox::stack::PostgresServer;

fn writer(target: &PgTarget, chain: &str, key: &Key32, instance: &str) -> Arc<AuditChain> {
    AuditChain::start(
        target.clone(),
        chain.to_string(),
        "k1".into(),
        key.clone(),
        instance.into(),
        WriterOptions::default(),
    )
}

async fn loaded(w: &AuditChain) {
    let start = Instant::now();
    while !w.head_loaded() {
        if start.elapsed() > Duration::from_secs(30) {
            panic!("audit chain head never loaded");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Appends `n` records keeping `window` in flight; returns records/s.
async fn closed_loop(writers: &[Arc<AuditChain>], n: u64, window: usize) -> f64 {
    let sem = Arc::new(tokio::sync::Semaphore::new(window));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(n as usize);
    for i in 0..n {
        let permit = sem.clone().acquire_owned().await.expect("semaphore");
        let w = writers[(i as usize) % writers.len()].clone();
        tasks.push(tokio::spawn(async move {
            let r = w.append(bench::sample_draft(i)).await;
            drop(permit);
            r
        }));
    }
    for t in tasks {
        t.await.expect("task").expect("append");
    }
    n as f64 / start.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let dir = tempfile::Builder::new()
        .prefix("aegis-audit-bench-")
        .tempdir_in("/tmp")
        .expect("temp dir");
    let pg = PostgresServer::start_durable(dir.path())
        .await
        .expect("durable postgres starts");
    let target = PgTarget::parse(&pg.url()).expect("url");
    let key = Key32::generate();
    let n: u64 = std::env::var("AUDIT_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40_000);

    // 1 writer.
    let w1 = writer(&target, "bench", &key, "a");
    loaded(&w1).await;
    closed_loop(std::slice::from_ref(&w1), 2_000, 256).await; // warm-up
    let one = closed_loop(std::slice::from_ref(&w1), n, 1024).await;
    println!("append, 1 writer:  {one:>9.0} records/s (durable commits)");

    // 2 writers sharing the chain.
    let w2 = writer(&target, "bench", &key, "b");
    loaded(&w2).await;
    let two = closed_loop(&[w1.clone(), w2.clone()], n, 1024).await;
    println!("append, 2 writers: {two:>9.0} records/s (one chain, no fork, no gap)");

    // One at a time: what one durable append costs with nothing else queued.
    let mut serial = bench::histogram();
    for i in 0..2_000u64 {
        let t = Instant::now();
        w1.append(bench::sample_draft(500_000 + i))
            .await
            .expect("append");
        let _ = serial.record((t.elapsed().as_micros() as u64).max(1));
    }
    let serial = bench::summarize(&serial);
    println!(
        "append, 1 in flight:   p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms",
        serial.p50_ms, serial.p99_ms, serial.p999_ms
    );

    // Open loop at 2,000/s for 10 s: wait for the committed append (the load generator's pacer:
    // an OS thread on the high-resolution timer, latency from the scheduled time).
    let rate = 2_000u64;
    let w = w1.clone();
    let run = bench::loadgen::paced(
        "append_wait",
        rate as f64,
        Duration::from_secs(10),
        move |i| {
            let w = w.clone();
            async move {
                match w.append(bench::sample_draft(1_000_000 + i)).await {
                    Ok(_) => Outcome::Allowed,
                    Err(_) => Outcome::Error,
                }
            }
        },
    )
    .await;
    assert_eq!(run.errors, 0, "appends failed in the open loop");
    let wait = run.latency;
    println!(
        "append wait at {rate}/s: p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms",
        wait.p50_ms, wait.p99_ms, wait.p999_ms, wait.max_ms
    );

    // Verify speed over everything written.
    let client = pg.connect_superuser().await.expect("connect");
    let mut keys = std::collections::HashMap::new();
    keys.insert("k1".to_string(), key.clone());
    let signing = Key32::generate();
    let public = checkpoint::public_key(&signing);
    // The stored tree is checked against the rows too (no signed note in this run).
    let anchors = verify::TreeAnchors {
        vkey: aegis::audit::tlog::NoteSigner::new("aegis/bench", &signing).vkey(),
        notes: Vec::new(),
    };
    let started = Instant::now();
    let report = verify::verify(&client, "bench", &keys, &[], &public, &anchors)
        .await
        .expect("verify");
    let verify_rate = report.rows as f64 / started.elapsed().as_secs_f64();
    assert!(report.intact, "benchmark chain does not verify: {report:?}");
    println!(
        "verify:            {verify_rate:>9.0} records/s ({} rows, intact)",
        report.rows
    );

    let result = serde_json::json!({
        "benchmark": "audit",
        "machine": bench::machine(),
        "postgres": "local, fsync=on, synchronous_commit=on",
        "append_records_per_s_1_writer": one.round(),
        "append_records_per_s_2_writers": two.round(),
        "append_wait_at_2000_per_s": wait,
        "append_latency_1_in_flight": serial,
        "verify_records_per_s": verify_rate.round(),
        "verified_rows": report.rows,
        "targets": {
            "append_records_per_s": 10_000,
            "append_wait_p99_ms": 2.0,
            "verify_records_per_s": 100_000
        }
    });
    match bench::write_result("audit", &result) {
        Ok(p) => println!("results: {}", p.display()),
        Err(e) => eprintln!("cannot write results: {e}"),
    }
}
