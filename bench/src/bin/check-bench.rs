//! The Check benchmark suite (issue 8), floors in the same run.
//!
//! Starts the real stack (Redis, a durable PostgreSQL with fsync on, the sandbox IdP and
//! workspace, release aegis), the do-nothing gRPC floor (`null-authz`), the durable floor
//! (`null-authz` with aegis' audit writer: it allows each Check once its row is committed), the
//! commit floor (the same PostgreSQL committing one audit-shaped row per operation) and one
//! benchmark Envoy (concurrency 2) with a listener per variant, then measures:
//!
//! 1. cold path: 1,000 distinct users' first Checks (two simultaneous per user) -> exactly one
//!    token exchange each at the sandbox, none failed;
//! 2. Check latency, open loop at 2,000 Checks/s: the gRPC floor, the commit floor, the durable
//!    floor and aegis, repeated;
//! 3. saturated Check throughput (closed loop), the same four, with process CPU per Check and a
//!    `perf` profile of aegis in an extra run;
//! 4. through Envoy with wrk: direct response with no auth, `jwt_authn`, ext_authz to the gRPC
//!    floor, to the durable floor and to aegis; and to the sandbox without ext_authz, with the
//!    durable floor and with aegis;
//! 5. memory: aegis RSS with 10,000 users cached.
//!
//! Every run stops by itself. Environment: `BENCH_SECS` (per run, default 10), `BENCH_RATE`
//! (default 2000), `BENCH_USERS` (default 10000), `BENCH_PROFILE=0` to skip perf,
//! `BENCH_OPEN_REPEAT` (open-loop runs per side, default 3), `BENCH_ENVOY=0` to skip the Envoy
//! variants, `BENCH_COMMIT_CONNS` (the commit floor's connections, default 4), `AEGIS_BIN`
//! (default `target/release/aegis`). Writes `bench-results/check.json`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bench::envoy::{self as env, Auth, Listener, Route, Upstreams};
use bench::loadgen::{self, RunResult};
use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use sandbox::stack::{free_port, Stack, StackOptions};
use sandbox::{SandboxOptions, TokenRequest};
use serde_json::json;
use tokio::io::AsyncBufReadExt;

const COLD_USERS: usize = 1_000;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// user + system CPU time of a process so far, in clock ticks (1/100 s here).
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// CPU microseconds a process spent per Check during `run`.
async fn with_cpu<F: std::future::Future<Output = RunResult>>(
    pid: Option<u32>,
    run: F,
) -> (RunResult, Option<f64>) {
    let before = pid.and_then(cpu_ticks);
    let r = run.await;
    let after = pid.and_then(cpu_ticks);
    let per = match (before, after) {
        (Some(b), Some(a)) if r.latency.count > 0 => {
            Some(((a - b) as f64 * 10_000.0 / r.latency.count as f64 * 10.0).round() / 10.0)
        }
        _ => None,
    };
    (r, per)
}

fn line(label: &str, r: &RunResult) {
    println!(
        "  {label:<26} {:>8.0}/s  p50 {:>6.3}  p99 {:>6.3}  p99.9 {:>6.3}  max {:>7.3} ms  (allow {} deny {} err {})",
        r.achieved_per_s,
        r.latency.p50_ms,
        r.latency.p99_ms,
        r.latency.p999_ms,
        r.latency.max_ms,
        r.allowed,
        r.denied,
        r.errors
    );
}

fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 {
        0.0
    } else {
        (a / b * 1000.0).round() / 1000.0
    }
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("check-bench: {e}");
        std::process::exit(1);
    }
}

async fn run() -> Result<(), String> {
    let secs = env_num("BENCH_SECS", 10);
    let rate = env_num("BENCH_RATE", 2_000) as f64;
    let users = env_num("BENCH_USERS", 10_000).max(COLD_USERS as u64) as usize;
    let profile = env_num("BENCH_PROFILE", 1) != 0;
    let run_for = Duration::from_secs(secs);
    let root = sandbox::stack::workspace_root();
    let aegis_bin = std::env::var("AEGIS_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| root.join("target/release/aegis"));
    println!("check-bench: load average at start {}", load());

    // The gRPC floor, in its own process like aegis.
    let lifetime = (secs * 50 + 900).to_string();
    let (mut null, null_pid, null_addr) = spawn_floor(&["127.0.0.1:0", &lifetime]).await?;

    // The real stack, with a durable PostgreSQL and a workspace that knows every bench user.
    let mut opts = StackOptions::new(&aegis_bin).with_sandbox(SandboxOptions {
        auto_provision_users: true,
        ..SandboxOptions::default()
    });
    let durable = env_num("BENCH_DURABLE", 1) != 0;
    opts.durable_postgres = durable;
    let stack = Stack::start(opts)
        .await
        .map_err(|e| format!("starting the stack: {e}"))?;
    let aegis_pid = stack.aegis.pid();
    let aegis_addr = stack.aegis.grpc_listen().to_string();
    let admin_url = stack.aegis.admin_url();
    println!(
        "  stack up: aegis {aegis_addr} (pid {aegis_pid:?}), floor {null_addr}, postgres fsync {}",
        if durable { "on" } else { "off (diagnostic)" }
    );
    // The disk floor: what one fdatasync costs on this filesystem, which every durable audit
    // commit (and so every ALLOW) waits for at least once.
    let fsync_us = fdatasync_floor(stack.work_dir())
        .await
        .map_err(|e| eprintln!("  disk floor: {e}"))
        .ok();
    println!("  disk floor: fdatasync of one 8 KiB write {fsync_us:?} µs (pg_test_fsync)");

    // IdP tokens for every user (RS256, an hour), signed on the blocking pool.
    let t = Instant::now();
    let work_dir = stack.work_dir().to_path_buf();
    let sandbox = Arc::new(stack.sandbox);
    let tokens = {
        let mut parts = Vec::new();
        let chunk = users.div_ceil(2);
        for part in 0..2 {
            let sb = sandbox.clone();
            parts.push(tokio::task::spawn_blocking(move || {
                (part * chunk..((part + 1) * chunk).min(users))
                    .map(|i| {
                        let mut req = TokenRequest::new(&format!("bench-u{i:05}"));
                        req.ttl_secs = 3600;
                        sb.mint_idp_token(&req)
                    })
                    .collect::<Vec<_>>()
            }));
        }
        let mut all = Vec::with_capacity(users);
        for p in parts {
            all.extend(p.await.map_err(|e| format!("minting: {e}"))?);
        }
        all
    };
    println!(
        "  minted {} IdP tokens in {:.1}s",
        tokens.len(),
        t.elapsed().as_secs_f64()
    );
    let requests: Vec<CheckRequest> = tokens
        .iter()
        .enumerate()
        .map(|(i, tok)| loadgen::check_request(i, tok, "sandbox"))
        .collect();
    let warm_set = Arc::new(requests[..COLD_USERS].to_vec());

    let aegis_ch = loadgen::connect(&format!("http://{aegis_addr}"), 2)
        .await
        .map_err(|e| format!("connecting to aegis: {e}"))?;
    let null_ch = loadgen::connect(&format!("http://{null_addr}"), 2)
        .await
        .map_err(|e| format!("connecting to the floor: {e}"))?;

    // The commit floor: the same PostgreSQL committing one audit-shaped row per operation over
    // several connections, with nothing of aegis in the way.
    let commit_conns = env_num("BENCH_COMMIT_CONNS", 4).max(1) as usize;
    let commit_floor =
        bench::commit_floor::CommitFloor::start(&stack.postgres, commit_conns).await?;
    // The durable floor: the do-nothing server that allows each Check once aegis' audit writer
    // has committed its row, on the same PostgreSQL (its own chain).
    let (mut durable_null, durable_pid, durable_addr) =
        spawn_floor(&["127.0.0.1:0", &lifetime, &stack.postgres.url()]).await?;
    let durable_ch = loadgen::connect(&format!("http://{durable_addr}"), 2)
        .await
        .map_err(|e| format!("connecting to the durable floor: {e}"))?;

    // 1. Cold path.
    println!("cold path: {COLD_USERS} distinct users, two simultaneous first Checks each");
    let cold = loadgen::each_once(&aegis_ch, &warm_set, 32, 2).await;
    line("aegis cold (per user)", &cold);
    let mut mint_counts = std::collections::BTreeMap::<u64, u64>::new();
    for i in 0..COLD_USERS {
        let n = sandbox.exchange_count(&format!("bench-u{i:05}@example.com"));
        *mint_counts.entry(n).or_insert(0) += 1;
    }
    let exact_one = mint_counts.get(&1).copied().unwrap_or(0);
    println!("  sandbox exchanges per user: {mint_counts:?} (want {{1: {COLD_USERS}}})");

    // Warm-up of both servers and connections.
    let warm = Duration::from_secs(2);
    loadgen::closed_loop(&null_ch, warm_set.clone(), 16, warm).await;
    loadgen::closed_loop(&durable_ch, warm_set.clone(), 16, warm).await;
    loadgen::closed_loop(&aegis_ch, warm_set.clone(), 16, warm).await;

    // 2. Open loop at the target rate.
    println!("open loop at {rate}/s for {secs}s (latency from scheduled send time)");
    // Repeated, floor and aegis alternating, because one disk stall in a 10 s run decides its
    // p99 on this kind of machine; the headline is the run with the median p99 of each side,
    // and every run is in the record.
    let repeats = env_num("BENCH_OPEN_REPEAT", 3).max(1) as usize;
    let mut floor_runs = Vec::with_capacity(repeats);
    let mut commit_runs = Vec::with_capacity(repeats);
    let mut durable_runs = Vec::with_capacity(repeats);
    let mut aegis_runs = Vec::with_capacity(repeats);
    let mut inside_runs = Vec::with_capacity(repeats);
    let mut m1 = aegis_metrics(&admin_url).await;
    for rep in 0..repeats {
        let (f, f_cpu) = with_cpu(
            null_pid,
            loadgen::open_loop(&null_ch, warm_set.clone(), rate, run_for),
        )
        .await;
        line(&format!("floor (null-authz) #{}", rep + 1), &f);
        let c = commit_floor.open_loop(rate, run_for).await;
        line(&format!("commit floor #{}", rep + 1), &c);
        commit_runs.push(c);
        let d = with_cpu(
            durable_pid,
            loadgen::open_loop(&durable_ch, warm_set.clone(), rate, run_for),
        )
        .await;
        line(&format!("durable floor #{}", rep + 1), &d.0);
        durable_runs.push(d);
        let m0 = aegis_metrics(&admin_url).await;
        let (a, a_cpu) = with_cpu(
            aegis_pid,
            loadgen::open_loop(&aegis_ch, warm_set.clone(), rate, run_for),
        )
        .await;
        line(&format!("aegis #{}", rep + 1), &a);
        m1 = aegis_metrics(&admin_url).await;
        inside_runs.push(print_inside("open loop", &m0, &m1));
        floor_runs.push((f, f_cpu));
        aegis_runs.push((a, a_cpu));
    }
    let (fi, ci, di, ai) = (
        median_by_p99(floor_runs.iter().map(|(r, _)| r)),
        median_by_p99(commit_runs.iter()),
        median_by_p99(durable_runs.iter().map(|(r, _)| r)),
        median_by_p99(aegis_runs.iter().map(|(r, _)| r)),
    );
    let commit_open = commit_runs[ci].clone();
    let (durable_open, durable_open_cpu) = durable_runs[di].clone();
    let (floor_open, floor_open_cpu) = floor_runs[fi].clone();
    let (aegis_open, aegis_open_cpu) = aegis_runs[ai].clone();
    let inside_open = inside_runs[ai].clone();
    println!(
        "  median-p99 runs: floor #{} commit floor #{} durable floor #{} aegis #{} (of {repeats})",
        fi + 1,
        ci + 1,
        di + 1,
        ai + 1
    );
    // What a Check that waits for its durable row cannot beat here: the gRPC hop plus the
    // commit, per repetition (ms, rounded to µs).
    let floors_sum: Vec<f64> = floor_runs
        .iter()
        .zip(&commit_runs)
        .map(|((g, _), c)| ((g.latency.p50_ms + c.latency.p50_ms) * 1000.0).round() / 1000.0)
        .collect();
    let aegis_p50s: Vec<f64> = aegis_runs.iter().map(|(r, _)| r.latency.p50_ms).collect();
    println!(
        "  gRPC floor p50 + commit floor p50, run by run: {floors_sum:?} ms; aegis p50: {aegis_p50s:?} ms"
    );
    let open_runs = json!({
        "floor": floor_runs.iter().map(|(r, c)| json!({ "result": r, "cpu_us_per_check": c })).collect::<Vec<_>>(),
        "commit_floor": commit_runs,
        "durable_floor": durable_runs.iter().map(|(r, c)| json!({ "result": r, "cpu_us_per_check": c })).collect::<Vec<_>>(),
        "grpc_plus_commit_floor_p50_ms": floors_sum,
        "aegis": aegis_runs.iter().zip(&inside_runs).map(|((r, c), i)| json!({ "result": r, "cpu_us_per_check": c, "inside_aegis": i })).collect::<Vec<_>>(),
    });

    // 3. Saturation.
    let in_flight = env_num("BENCH_IN_FLIGHT", 64) as usize;
    println!("saturation: closed loop, {in_flight} in flight over 2 connections, {secs}s");
    let (floor_sat, floor_sat_cpu) = with_cpu(
        null_pid,
        loadgen::closed_loop(&null_ch, warm_set.clone(), in_flight, run_for),
    )
    .await;
    line("floor (null-authz)", &floor_sat);
    let commit_sat = commit_floor.closed_loop(in_flight, run_for).await;
    line("commit floor (1 row/commit)", &commit_sat);
    let (durable_sat, durable_sat_cpu) = with_cpu(
        durable_pid,
        loadgen::closed_loop(&durable_ch, warm_set.clone(), in_flight, run_for),
    )
    .await;
    line("durable floor", &durable_sat);
    let (aegis_sat, aegis_sat_cpu) = with_cpu(
        aegis_pid,
        loadgen::closed_loop(&aegis_ch, warm_set.clone(), in_flight, run_for),
    )
    .await;
    line("aegis", &aegis_sat);
    let metrics_sat = aegis_metrics(&admin_url).await;
    let inside_sat = print_inside("saturated", &m1, &metrics_sat);
    for l in metrics_sat.iter().filter(|l| !l.contains("_bucket{")) {
        println!("    {l}");
    }
    println!(
        "  CPU per Check: aegis {aegis_sat_cpu:?} µs, durable floor {durable_sat_cpu:?} µs, floor {floor_sat_cpu:?} µs (saturated); at {rate}/s: aegis {aegis_open_cpu:?} µs, durable floor {durable_open_cpu:?} µs, floor {floor_open_cpu:?} µs"
    );

    let profile_out = if profile {
        match aegis_pid {
            Some(pid) => perf_profile(pid, &aegis_ch, warm_set.clone(), in_flight).await,
            None => None,
        }
    } else {
        None
    };

    // 4. Through Envoy (BENCH_ENVOY=0 skips it, for quick iterations on the gRPC figures).
    let with_envoy = env_num("BENCH_ENVOY", 1) != 0;
    let jwks_json = reqwest::get(format!("{}/jwks", sandbox.idp_url))
        .await
        .map_err(|e| format!("fetching the jwks: {e}"))?
        .text()
        .await
        .map_err(|e| format!("reading the jwks: {e}"))?;
    let sandbox_port = reqwest::Url::parse(&sandbox.workspace_url)
        .ok()
        .and_then(|u| u.port())
        .ok_or("sandbox port")?;
    let port = || free_port().map_err(|e| e.to_string());
    let listeners = [
        Listener {
            name: "direct_noauth",
            port: port()?,
            auth: Auth::None,
            route: Route::Direct,
        },
        Listener {
            name: "direct_jwt_authn",
            port: port()?,
            auth: Auth::JwtAuthn,
            route: Route::Direct,
        },
        Listener {
            name: "direct_extauthz_floor",
            port: port()?,
            auth: Auth::ExtAuthz("floor"),
            route: Route::Direct,
        },
        Listener {
            name: "direct_extauthz_durable_floor",
            port: port()?,
            auth: Auth::ExtAuthz("durable"),
            route: Route::Direct,
        },
        Listener {
            name: "direct_extauthz_aegis",
            port: port()?,
            auth: Auth::ExtAuthz("aegis"),
            route: Route::Direct,
        },
        Listener {
            name: "sandbox_noauth",
            port: port()?,
            auth: Auth::None,
            route: Route::Sandbox,
        },
        Listener {
            name: "sandbox_extauthz_durable_floor",
            port: port()?,
            auth: Auth::ExtAuthz("durable"),
            route: Route::Sandbox,
        },
        Listener {
            name: "sandbox_extauthz_aegis",
            port: port()?,
            auth: Auth::ExtAuthz("aegis"),
            route: Route::Sandbox,
        },
    ];
    let up = Upstreams {
        null_port: port_of(&null_addr)?,
        durable_port: port_of(&durable_addr)?,
        aegis_port: port_of(&aegis_addr)?,
        sandbox_port,
        issuer: sandbox.idp_url.clone(),
        jwks_json,
    };
    let mut wrk_results = Vec::new();
    if with_envoy {
        let envoy_bin = sandbox::stack::envoy_bin().map_err(|e| e.to_string())?;
        let envoy =
            env::BenchEnvoy::start(&envoy_bin, &env::config(&listeners, &up), &work_dir).await?;
        let alice_jwt = {
            let mut req = TokenRequest::new("alice");
            req.ttl_secs = 3600;
            sandbox.mint_idp_token(&req)
        };
        let alice_dbx = exchange(&sandbox.workspace_url, &alice_jwt).await?;
        // The warm users' IdP tokens, one per request in turn (aegis has seen them all).
        let user_bearers: Vec<String> = tokens[..COLD_USERS]
            .iter()
            .map(|t| format!("Bearer {t}"))
            .collect();
        // The workspace's own APIs know only its fixture users (the bench users can exchange a
        // token but nothing more), so the sandbox route sends alice: her IdP token to aegis, her
        // Databricks token to the listeners that rewrite nothing.
        let alice_bearer = vec![format!("Bearer {alice_jwt}")];
        let dbx_bearer = vec![format!("Bearer {alice_dbx}")];
        let wrk_secs = secs as u32;
        println!("through Envoy (concurrency 2): wrk -t2 -c32 -d{wrk_secs}s, GET /api/2.0/preview/scim/v2/Me");
        for l in &listeners {
            let bearers = match (l.auth, l.route) {
                (Auth::ExtAuthz("aegis"), Route::Sandbox) => &alice_bearer,
                (_, Route::Sandbox) => &dbx_bearer,
                _ => &user_bearers,
            };
            let url = format!("http://127.0.0.1:{}/api/2.0/preview/scim/v2/Me", l.port);
            // A short warm-up, then the measured run.
            let _ = env::wrk(l.name, &url, bearers, &work_dir, 32, 2).await;
            let r = env::wrk(l.name, &url, bearers, &work_dir, 32, wrk_secs).await?;
            println!(
                "  {:<26} {:>8.0} req/s  p50 {:>6.3}  p99 {:>6.3} ms  non-2xx {}",
                r.listener, r.requests_per_s, r.p50_ms, r.p99_ms, r.non_2xx
            );
            wrk_results.push(r);
        }
        envoy.stop().await;
    }
    let by = |name: &str| wrk_results.iter().find(|r| r.listener == name).cloned();

    // 5. Memory with `users` cached.
    let rss_before = aegis_pid.and_then(env::rss_kib);
    println!("memory: caching {} more users", users - COLD_USERS);
    let rest = loadgen::each_once(&aegis_ch, &requests[COLD_USERS..], 64, 1).await;
    line("aegis cold (rest)", &rest);
    let again = loadgen::each_once(&aegis_ch, &requests, 64, 1).await;
    line("aegis warm (all users)", &again);
    let rss_after = aegis_pid.and_then(env::rss_kib);
    println!(
        "  aegis RSS: {:?} KiB after 1,000 users, {:?} KiB with {users} users cached",
        rss_before, rss_after
    );
    let minted_total: u64 = (0..users)
        .map(|i| sandbox.exchange_count(&format!("bench-u{i:05}@example.com")))
        .sum();

    // Ratios and the record.
    let direct_floor = by("direct_extauthz_floor");
    let direct_aegis = by("direct_extauthz_aegis");
    let direct_durable = by("direct_extauthz_durable_floor");
    let envoy_ratio_durable = wrk_ratio(&direct_aegis, &direct_durable);
    let sb_no = by("sandbox_noauth");
    let sb_aegis = by("sandbox_extauthz_aegis");
    let sb_durable = by("sandbox_extauthz_durable_floor");
    let sandbox_ratio_durable = wrk_ratio(&sb_aegis, &sb_durable);
    let envoy_ratio = wrk_ratio(&direct_aegis, &direct_floor);
    let sandbox_ratio = wrk_ratio(&sb_aegis, &sb_no);
    let sat_ratio = ratio(aegis_sat.achieved_per_s, floor_sat.achieved_per_s);
    let p99_over = match (&direct_aegis, &direct_floor) {
        (Some(a), Some(f)) => ((a.p99_ms - f.p99_ms) * 1000.0).round() / 1000.0,
        _ => f64::NAN,
    };
    let rss_mib = rss_after.map(|k| (k as f64 / 1024.0 * 10.0).round() / 10.0);
    println!("summary (load average now {}):", load());
    println!(
        "  open loop {rate}/s: aegis p50 {:.3} p99 {:.3} p99.9 {:.3} ms (targets 1 / 2 / 5); floor p50 {:.3} p99 {:.3} p99.9 {:.3}",
        aegis_open.latency.p50_ms, aegis_open.latency.p99_ms, aegis_open.latency.p999_ms,
        floor_open.latency.p50_ms, floor_open.latency.p99_ms, floor_open.latency.p999_ms
    );
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let (floors_p50, aegis_p50) = (median(floors_sum.clone()), median(aegis_p50s));
    println!(
        "  open loop {rate}/s, medians of the runs: aegis p50 {aegis_p50:.3} ms; gRPC floor + commit floor p50 {floors_p50:.3} ms; aegis beyond them {:.3} ms; commit floor alone p50 {:.3} p99 {:.3} ms",
        aegis_p50 - floors_p50,
        commit_open.latency.p50_ms,
        commit_open.latency.p99_ms
    );
    println!(
        "  saturated: aegis {:.0}/s = {:.1}% of the floor's {:.0}/s (target 60%) and {:.1}% of the durable floor's {:.0}/s; single-row commits ({in_flight} in flight over {commit_conns} connections) {:.0}/s",
        aegis_sat.achieved_per_s,
        sat_ratio * 100.0,
        floor_sat.achieved_per_s,
        ratio(aegis_sat.achieved_per_s, durable_sat.achieved_per_s) * 100.0,
        durable_sat.achieved_per_s,
        commit_sat.achieved_per_s
    );
    println!(
        "  envoy direct: aegis {:.1}% of ext_authz floor req/s (target 70%), p99 floor + {p99_over:.3} ms (target + 2); {:.1}% of the durable floor's",
        envoy_ratio * 100.0,
        envoy_ratio_durable * 100.0
    );
    println!(
        "  envoy to sandbox: aegis {:.1}% of no ext_authz (target 90%); {:.1}% of the durable floor's",
        sandbox_ratio * 100.0,
        sandbox_ratio_durable * 100.0
    );
    let refused: Vec<String> = wrk_results
        .iter()
        .filter(|r| r.non_2xx > 0)
        .map(|r| format!("{} ({} of {})", r.listener, r.non_2xx, r.requests))
        .collect();
    if !refused.is_empty() {
        println!(
            "  WARNING: Envoy answered non-2xx in {}: those variants measured refusals, not the route",
            refused.join(", ")
        );
    }
    println!("  RSS with {users} users: {rss_mib:?} MiB (target 64)");
    println!(
        "  cold path: {exact_one}/{COLD_USERS} users minted exactly once, {} Checks failed (target {COLD_USERS}, 0); {minted_total} exchanges for {users} users",
        cold.denied + cold.errors
    );

    let result = json!({
        "benchmark": "check",
        "date_unix": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "machine": bench::machine(),
        "load_average_end": load(),
        "disk_floor_fdatasync_us": fsync_us,
        "settings": { "postgres_fsync": durable, "secs": secs, "rate": rate, "users": users, "in_flight": in_flight, "grpc_connections": 2,
                      "postgres": "local, fsync=on, synchronous_commit=on", "wrk": "-t2 -c32" },
        "cold": { "result": cold, "users": COLD_USERS, "exchanges_per_user_histogram": mint_counts, "exactly_one": exact_one },
        "open_loop": { "floor": floor_open, "commit_floor": commit_open, "commit_floor_connections": commit_conns,
                       "aegis": aegis_open, "inside_aegis": inside_open, "runs": open_runs,
                       "median_p50_ms": { "aegis": aegis_p50, "grpc_plus_commit_floor": floors_p50, "aegis_beyond_them": aegis_p50 - floors_p50 },
                       "durable_floor": durable_open,
                       "cpu_us_per_check": { "floor": floor_open_cpu, "durable_floor": durable_open_cpu, "aegis": aegis_open_cpu } },
        "saturation": { "floor": floor_sat, "commit_floor_one_row_per_commit": commit_sat, "durable_floor": durable_sat,
                        "aegis": aegis_sat, "ratio": sat_ratio,
                        "ratio_to_durable_floor": ratio(aegis_sat.achieved_per_s, durable_sat.achieved_per_s),
                        "durable_floor_ratio_to_floor": ratio(durable_sat.achieved_per_s, floor_sat.achieved_per_s),
                        "cpu_us_per_check": { "floor": floor_sat_cpu, "durable_floor": durable_sat_cpu, "aegis": aegis_sat_cpu },
                        "inside_aegis": inside_sat, "aegis_metrics": metrics_sat },
        "envoy": { "runs": wrk_results, "direct_ratio_to_extauthz_floor": envoy_ratio,
                   "direct_p99_over_floor_ms": p99_over, "direct_ratio_to_durable_floor": envoy_ratio_durable, "sandbox_ratio_to_noauth": sandbox_ratio,
                   "sandbox_ratio_to_durable_floor": sandbox_ratio_durable },
        "memory": { "rss_kib_1000_users": rss_before, "rss_kib_all_users": rss_after, "users": users,
                    "cold_rest": rest, "warm_all": again, "exchanges_total": minted_total },
        "profile": profile_out,
        "targets": { "p50_ms": 1.0, "p99_ms": 2.0, "p999_ms": 5.0, "saturation_ratio": 0.6,
                     "envoy_direct_ratio": 0.7, "envoy_p99_over_floor_ms": 2.0, "sandbox_ratio": 0.9,
                     "rss_mib": 64, "cold_users": COLD_USERS }
    });
    match bench::write_result(if durable { "check" } else { "check-fsync-off" }, &result) {
        Ok(p) => println!("results: {}", p.display()),
        Err(e) => eprintln!("cannot write results: {e}"),
    }
    drop(aegis_ch);
    drop(null_ch);
    drop(durable_ch);
    let _ = null.kill().await;
    let _ = durable_null.kill().await;
    if let Ok(sb) = Arc::try_unwrap(sandbox) {
        sb.shutdown().await;
    }
    let mut postgres = stack.postgres;
    let mut redis = stack.redis;
    let mut aegis = stack.aegis;
    let mut envoy = stack.envoy;
    envoy.stop();
    aegis.kill();
    postgres.stop().await;
    redis.stop();
    Ok(())
}

/// Starts `null-authz` with `args`; its child, pid and the address it listens on.
async fn spawn_floor(
    args: &[&str],
) -> Result<(tokio::process::Child, Option<u32>, String), String> {
    let mut child = tokio::process::Command::new(env::sibling_bin("null-authz"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            format!("starting null-authz (build it with cargo build --release -p bench): {e}")
        })?;
    let pid = child.id();
    let mut lines =
        tokio::io::BufReader::new(child.stdout.take().ok_or("null-authz stdout")?).lines();
    match tokio::time::timeout(Duration::from_secs(40), lines.next_line()).await {
        Ok(Ok(Some(l))) => Ok((child, pid, l.trim_start_matches("listening ").to_string())),
        _ => Err("null-authz did not say where it listens".into()),
    }
}

/// The index of the run with the median p99.
fn median_by_p99<'a>(runs: impl Iterator<Item = &'a RunResult>) -> usize {
    let p99s: Vec<f64> = runs.map(|r| r.latency.p99_ms).collect();
    let mut order: Vec<usize> = (0..p99s.len()).collect();
    order.sort_by(|&x, &y| p99s[x].total_cmp(&p99s[y]));
    order[order.len() / 2]
}

/// The port of a `host:port` address.
fn port_of(addr: &str) -> Result<u16, String> {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("no port in {addr}"))
}

/// `a`'s req/s as a share of `b`'s (0 when either variant did not run).
fn wrk_ratio(a: &Option<env::WrkResult>, b: &Option<env::WrkResult>) -> f64 {
    match (a, b) {
        (Some(a), Some(b)) => ratio(a.requests_per_s, b.requests_per_s),
        _ => 0.0,
    }
}

/// `pg_test_fsync`'s fdatasync figure (µs per op) for a file in `dir`.
async fn fdatasync_floor(dir: &std::path::Path) -> Result<f64, String> {
    // Next to the server binaries, else in Debian's versioned directory.
    let mut candidates: Vec<std::path::PathBuf> = sandbox::stack::postgres_bin_dir()
        .map(|d| vec![d.join("pg_test_fsync")])
        .unwrap_or_default();
    if let Ok(dirs) = std::fs::read_dir("/usr/lib/postgresql") {
        candidates.extend(dirs.flatten().map(|d| d.path().join("bin/pg_test_fsync")));
    }
    let bin = candidates
        .into_iter()
        .find(|p| p.is_file())
        .ok_or("no pg_test_fsync found")?;
    let file = dir.join("fsync-floor.test");
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(&bin)
            .args(["-s", "1", "-f"])
            .arg(&file)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| "pg_test_fsync took over 120s".to_string())?
    .map_err(|e| format!("running {}: {e}", bin.display()))?;
    let _ = std::fs::remove_file(&file);
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.trim_start().starts_with("fdatasync"))
        .and_then(|l| {
            l.split_whitespace()
                .rev()
                .nth(1)
                .and_then(|v| v.parse().ok())
        })
        .ok_or_else(|| {
            format!(
                "no fdatasync figure in: {}",
                text.lines().take(8).collect::<Vec<_>>().join(" | ")
            )
        })
}

/// aegis' own view of the last runs: audit batch sizes and commit times, Check durations.
async fn aegis_metrics(admin_url: &str) -> Vec<String> {
    let Ok(resp) = reqwest::get(format!("{admin_url}/metrics")).await else {
        return Vec::new();
    };
    let text = resp.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| {
            !l.starts_with('#')
                && (l.starts_with("aegis_audit_batch_size")
                    || l.starts_with("aegis_audit_append_seconds")
                    || l.starts_with("aegis_check_duration_seconds")
                    || l.starts_with("aegis_token_cache_total"))
        })
        .map(str::to_string)
        .collect()
}

/// One of aegis' latency histograms over a run (the difference of two `/metrics` snapshots):
/// count, mean and bucket-bound percentiles, in ms.
fn histogram_between(before: &[String], after: &[String], name: &str) -> serde_json::Value {
    let parse = |lines: &[String]| {
        let mut buckets: Vec<(f64, f64)> = Vec::new();
        let (mut sum, mut count) = (0.0, 0.0);
        for l in lines {
            let Some((key, value)) = l.rsplit_once(' ') else {
                continue;
            };
            let Ok(v) = value.parse::<f64>() else {
                continue;
            };
            if let Some(rest) = key.strip_prefix(&format!("{name}_bucket{{le=\"")) {
                let le = rest.trim_end_matches("\"}");
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap_or(f64::NAN)
                };
                buckets.push((le, v));
            } else if key == format!("{name}_sum") {
                sum = v;
            } else if key == format!("{name}_count") {
                count = v;
            }
        }
        (buckets, sum, count)
    };
    let (b0, s0, c0) = parse(before);
    let (b1, s1, c1) = parse(after);
    let n = c1 - c0;
    if n <= 0.0 {
        return serde_json::Value::Null;
    }
    let at = |q: f64| {
        for (le, v) in &b1 {
            let prev = b0
                .iter()
                .find(|(l, _)| l == le)
                .map(|(_, v)| *v)
                .unwrap_or(0.0);
            if v - prev >= q * n {
                return *le * 1000.0;
            }
        }
        f64::INFINITY
    };
    json!({ "count": n, "mean_ms": ((s1 - s0) / n * 1e6).round() / 1e3,
            "p50_le_ms": at(0.5), "p99_le_ms": at(0.99) })
}

fn print_inside(label: &str, before: &[String], after: &[String]) -> serde_json::Value {
    let out = json!({
        "check": histogram_between(before, after, "aegis_check_duration_seconds"),
        "audit_apply": histogram_between(before, after, "aegis_audit_append_seconds"),
    });
    println!("    inside aegis ({label}): {out}");
    out
}

/// A Databricks token for the holder of `jwt`, by token exchange at the sandbox.
async fn exchange(workspace_url: &str, jwt: &str) -> Result<String, String> {
    let resp = reqwest::Client::new()
        .post(format!("{workspace_url}/oidc/v1/token"))
        .form(&[
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            ),
            ("subject_token", jwt),
            ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
            ("scope", "all-apis"),
        ])
        .send()
        .await
        .map_err(|e| format!("token exchange: {e}"))?;
    let body: serde_json::Value = resp
        .json()
        .await
        .map_err(|e| format!("token exchange: {e}"))?;
    body.get("access_token")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .ok_or_else(|| "token exchange returned no access_token".to_string())
}

/// `perf record -e cpu-clock` on aegis during an extra saturated run (not the measured one):
/// the top symbols and the split by shared object.
async fn perf_profile(
    pid: u32,
    channels: &[tonic::transport::Channel],
    requests: Arc<Vec<CheckRequest>>,
    in_flight: usize,
) -> Option<serde_json::Value> {
    let data = std::env::temp_dir().join(format!("aegis-bench-perf-{}.data", std::process::id()));
    let mut rec = tokio::process::Command::new("perf")
        .args([
            "record",
            "-q",
            "-e",
            "cpu-clock",
            "-F",
            "2000",
            "-p",
            &pid.to_string(),
            "-o",
        ])
        .arg(&data)
        .args(["--", "sleep", "6"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .ok()?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = loadgen::closed_loop(channels, requests, in_flight, Duration::from_secs(7)).await;
    line("aegis under perf", &r);
    let _ = tokio::time::timeout(Duration::from_secs(30), rec.wait()).await;
    let report = |sort: &str| {
        let data = data.clone();
        let sort = sort.to_string();
        async move {
            let out = tokio::process::Command::new("perf")
                .args([
                    "report",
                    "--stdio",
                    "--no-children",
                    "--percent-limit",
                    "0.7",
                    "--sort",
                    &sort,
                    "-i",
                ])
                .arg(&data)
                .output()
                .await
                .ok()?;
            Some(
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
                    .take(60)
                    .map(|l| l.trim_end().to_string())
                    .collect::<Vec<_>>(),
            )
        }
    };
    let by_dso = report("dso").await;
    let by_symbol = report("dso,symbol").await;
    let _ = std::fs::remove_file(&data);
    println!("  perf (cpu-clock) by shared object:");
    for l in by_dso.iter().flatten().take(8) {
        println!("    {l}");
    }
    println!("  perf top symbols:");
    for l in by_symbol.iter().flatten().take(25) {
        println!("    {l}");
    }
    Some(json!({ "run": r, "by_dso": by_dso, "by_symbol": by_symbol }))
}
