//! What reading the request body costs (issue 17's target: a body-inspected Check with a 4 KB
//! statement adds at most 0.2 ms at p50). Same stack, users and agent, same rate: a header-only
//! Check (a statement status poll, not a guarded route) against a body-inspected one (a 4 KB SQL
//! statement on `/api/2.0/sql/statements`, parsed and classified), alternating, repeated; plus
//! the classifier alone, in process, next to the sqlparser-based one it replaced. Writes
//! `bench-results/guard.json`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bench::loadgen::{self, RunResult};
use sandbox::stack::{Stack, StackOptions};
use sandbox::{SandboxOptions, TokenRequest};
use serde_json::json;

/// The sqlparser-based classifier aegis used before its own lexer (the differential tests'
/// reference), timed next to the lexer on the same statement.
mod reference {
    #![allow(dead_code)]
    use aegis::policy::sql::*;
    include!("../../../src/policy/sql/reference.rs");
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A realistic analytic query of about 4 KB: a CTE, joins, a window, many columns, comments.
fn statement_4k() -> String {
    let mut cols = Vec::new();
    for i in 0..60 {
        cols.push(format!(
            "  coalesce(o.attr_{i:02}, c.attr_{i:02}) AS attribute_number_{i:02}"
        ));
    }
    let sql = format!(
        "-- weekly revenue by region, with customer attributes\n\
         WITH recent AS (\n  SELECT order_id, customer_id, region, amount, ordered_at\n  \
         FROM main.sales.orders\n  WHERE ordered_at >= date_sub(current_date(), :days)\n)\n\
         SELECT r.region,\n  date_trunc('week', r.ordered_at) AS week,\n  \
         sum(r.amount) OVER (PARTITION BY r.region ORDER BY r.ordered_at) AS running,\n{}\n\
         FROM recent r\nJOIN main.sales.customers c ON c.customer_id = r.customer_id\n\
         LEFT JOIN main.sales.order_attributes o ON o.order_id = r.order_id\n\
         WHERE r.amount > 0 /* refunds excluded */\nQUALIFY row_number() OVER (PARTITION BY \
         r.customer_id ORDER BY r.ordered_at DESC) <= 5\nORDER BY week DESC, running DESC\n\
         LIMIT 1000",
        cols.join(",\n")
    );
    sql
}

fn line(label: &str, r: &RunResult) {
    println!(
        "  {label:<22} {:>7.0}/s  p50 {:>6.3}  p99 {:>6.3}  max {:>7.3} ms  (allow {} deny {} err {})",
        r.achieved_per_s,
        r.latency.p50_ms,
        r.latency.p99_ms,
        r.latency.max_ms,
        r.allowed,
        r.denied,
        r.errors
    );
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("guard-bench: {e}");
        std::process::exit(1);
    }
}

async fn run() -> Result<(), String> {
    let secs = env_num("BENCH_SECS", 10);
    let rate = env_num("BENCH_RATE", 2_000) as f64;
    let repeats = env_num("BENCH_OPEN_REPEAT", 3).max(1) as usize;
    let users = 200usize;
    let run_for = Duration::from_secs(secs);
    let root = sandbox::stack::workspace_root();
    let aegis_bin = std::env::var("AEGIS_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| root.join("target/release/aegis"));

    // The classifier alone, in process, on the same statement.
    let sql = statement_4k();
    let body =
        json!({ "warehouse_id": "bench", "statement": sql, "wait_timeout": "30s" }).to_string();
    let n = 5_000u32;
    let started = Instant::now();
    for _ in 0..n {
        let c = aegis::policy::sql::classify(std::hint::black_box(&sql));
        assert!(c.blocked.is_none(), "the bench statement must be allowed");
    }
    let classify_us = started.elapsed().as_secs_f64() * 1e6 / n as f64;
    // The same on the classifier aegis ran before its own lexer (sqlparser's tokenizer), and
    // that tokenizer alone.
    let reference = reference::classify_reference(&sql);
    assert_eq!(
        reference,
        aegis::policy::sql::classify(&sql),
        "the lexer and the reference disagree on the bench statement"
    );
    let started = Instant::now();
    for _ in 0..n {
        let c = reference::classify_reference(std::hint::black_box(&sql));
        assert!(c.blocked.is_none());
    }
    let reference_us = started.elapsed().as_secs_f64() * 1e6 / n as f64;
    let dialect = sqlparser::dialect::DatabricksDialect {};
    let started = Instant::now();
    for _ in 0..n {
        let tokens = sqlparser::tokenizer::Tokenizer::new(&dialect, std::hint::black_box(&sql))
            .tokenize()
            .expect("tokenizes");
        std::hint::black_box(tokens);
    }
    let tokenize_us = started.elapsed().as_secs_f64() * 1e6 / n as f64;
    println!(
        "classifier: {classify_us:.1} µs per {}-byte statement (lex + classify + fingerprint); \
         the sqlparser-based one it replaced {reference_us:.1} µs, of which sqlparser's \
         tokenizer {tokenize_us:.1} µs",
        sql.len()
    );

    if env_num("BENCH_CLASSIFY_ONLY", 0) != 0 {
        // The in-process figures only (no stack).
        return Ok(());
    }

    let mut opts = StackOptions::new(&aegis_bin).with_sandbox(SandboxOptions {
        auto_provision_users: true,
        ..SandboxOptions::default()
    });
    opts.durable_postgres = env_num("BENCH_DURABLE", 1) != 0;
    let stack = Stack::start(opts)
        .await
        .map_err(|e| format!("starting the stack: {e}"))?;
    let addr = stack.aegis.grpc_listen().to_string();
    let tokens: Vec<String> = (0..users)
        .map(|i| {
            let mut req = TokenRequest::new(&format!("bench-u{i:05}"));
            req.ttl_secs = 3600;
            stack.sandbox.mint_idp_token(&req)
        })
        .collect();
    let plain: Vec<_> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| {
            loadgen::request(
                i,
                t,
                "sandbox",
                "GET",
                "/api/2.0/sql/statements/01ef-7c3a-bench",
                None,
            )
        })
        .collect();
    let inspected: Vec<_> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| {
            loadgen::request(
                i,
                t,
                "sandbox",
                "POST",
                "/api/2.0/sql/statements",
                Some(&body),
            )
        })
        .collect();
    let (plain, inspected) = (Arc::new(plain), Arc::new(inspected));
    let ch = loadgen::connect(&format!("http://{addr}"), 2)
        .await
        .map_err(|e| format!("connecting to aegis: {e}"))?;

    // Every user once on each route (tokens minted), then a warm-up; both must be allowed.
    for set in [&plain, &inspected] {
        let r = loadgen::each_once(&ch, set, 16, 1).await;
        if r.allowed != users as u64 {
            return Err(format!(
                "expected {users} allows on the warm-up, got {} allowed {} denied {} errors",
                r.allowed, r.denied, r.errors
            ));
        }
        loadgen::closed_loop(&ch, set.clone(), 16, Duration::from_secs(2)).await;
    }

    println!("open loop at {rate}/s for {secs}s, header-only and body-inspected alternating");
    let (mut plain_runs, mut body_runs) = (Vec::new(), Vec::new());
    for rep in 0..repeats {
        let p = loadgen::open_loop(&ch, plain.clone(), rate, run_for).await;
        line(&format!("header-only #{}", rep + 1), &p);
        let b = loadgen::open_loop(&ch, inspected.clone(), rate, run_for).await;
        line(&format!("4 KB body #{}", rep + 1), &b);
        if b.denied > 0 || b.errors > 0 {
            return Err("body-inspected Checks were denied: the bench measures allows".into());
        }
        plain_runs.push(p);
        body_runs.push(b);
    }
    let diffs: Vec<f64> = plain_runs
        .iter()
        .zip(&body_runs)
        .map(|(p, b)| b.latency.p50_ms - p.latency.p50_ms)
        .collect();
    let added = median(diffs.clone());
    println!(
        "added p50 per repetition: {:?} ms; median {added:.3} ms (target ≤ 0.200 ms: {})",
        diffs
            .iter()
            .map(|d| (d * 1000.0).round() / 1000.0)
            .collect::<Vec<_>>(),
        if added <= 0.2 { "met" } else { "NOT met" }
    );
    let result = json!({
        "machine": bench::machine(),
        "rate_per_s": rate,
        "secs": secs,
        "statement_bytes": sql.len(),
        "body_bytes": body.len(),
        "classifier_us": classify_us,
        "reference_classifier_us": reference_us,
        "tokenizer_us": tokenize_us,
        "header_only": plain_runs,
        "body_inspected": body_runs,
        "added_p50_ms": diffs,
        "added_p50_ms_median": added,
        "target_ms": 0.2,
        "met": added <= 0.2,
    });
    let path = bench::write_result("guard", &result).map_err(|e| e.to_string())?;
    println!("wrote {}", path.display());
    stack.shutdown().await;
    Ok(())
}
