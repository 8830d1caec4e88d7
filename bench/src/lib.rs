//! Shared helpers for the benchmark binaries: latency summaries, result files, the Check load
//! generator ([`loadgen`]), the durable-commit floor ([`commit_floor`]) and the Envoy/wrk harness
//! ([`envoy`]).

pub mod commit_floor;
pub mod envoy;
pub mod loadgen;

use std::path::PathBuf;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

/// A histogram of microseconds, 1 µs to 60 s, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).unwrap_or_else(|_| unreachable!("static bounds"))
}

pub fn summarize(h: &Histogram<u64>) -> Latency {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Latency {
        count: h.len(),
        p50_ms: ms(0.5),
        p90_ms: ms(0.9),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: h.max() as f64 / 1000.0,
    }
}

/// Decision `n` as aegis would audit an agent's SQL call by one of 1,000 bench users: the row
/// audit-bench appends and the durable floor commits for every Check.
pub fn sample_draft(n: u64) -> aegis::audit::Draft {
    aegis::audit::Draft {
        ts: std::time::SystemTime::now(),
        trace_id: format!("{n:032x}"),
        request_id: format!("bench-{n}"),
        verdict: aegis::audit::Verdict::Allow,
        reason: String::new(),
        issuer: "http://127.0.0.1/idp".into(),
        subject: format!("bench-u{:05}", n % 1000),
        user_name: format!("bench-u{:05}@example.com", n % 1000),
        agent: "claude-code/1.0".into(),
        workspace: "sandbox".into(),
        method: "POST".into(),
        path: "/api/2.0/sql/statements".into(),
        token_source: "federation".into(),
        token_fp: vec![7; 32],
        actor_chain: String::new(),
        statement_kind: "query".into(),
        statement_fp: vec![9; 32],
        mcp_tool: String::new(),
        statement_text: String::new(),
    }
}

/// `<repo>/bench-results/<name>.json`.
pub fn write_result(name: &str, value: &serde_json::Value) -> std::io::Result<PathBuf> {
    let dir = sandbox::stack::workspace_root().join("bench-results");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(value)?)?;
    Ok(path)
}

/// What this machine is, for the record.
pub fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    serde_json::json!({ "cpu": cpu, "cores": cores })
}
