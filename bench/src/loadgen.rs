//! The Check load generator: realistic `CheckRequest`s as Envoy sends them, driven over gRPC
//! open-loop at a fixed offered rate (latency measured from each request's *scheduled* send
//! time, so a stalled server is charged for the requests it delayed: coordinated omission
//! corrected) or closed-loop with a fixed number of requests in flight (saturation).
//!
//! The open-loop pacer is a plain OS thread that sleeps with the kernel's high-resolution timer
//! and hands each request to the runtime at its scheduled time; tokio's own timer has 1 ms
//! granularity, which would add up to a millisecond of generator error to every sample.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::{address, Address, SocketAddress};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use hdrhistogram::Histogram;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

use crate::{histogram, summarize, Latency};

/// Paths an agent calls on a Databricks workspace, with their methods; none is blocked by the
/// agent-safe defaults, so every warm Check is an ALLOW with an audit row.
pub const CALLS: &[(&str, &str)] = &[
    ("GET", "/api/2.0/preview/scim/v2/Me"),
    ("POST", "/api/2.0/sql/statements"),
    (
        "GET",
        "/api/2.1/unity-catalog/tables?catalog_name=main&schema_name=sales",
    ),
    (
        "GET",
        "/api/2.0/sql/statements/01ef-7c3a-bench/result/chunks/0",
    ),
    ("POST", "/api/2.0/mcp/sql"),
    ("GET", "/api/2.0/workspace/list?path=/Users"),
];

/// The bodies Envoy sends with the calls on the routes aegis reads (issue 17's guardrails):
/// without one, those routes are refused for agents.
pub fn body_of(path: &str) -> Option<&'static str> {
    match path {
        "/api/2.0/sql/statements" => Some(
            r#"{"warehouse_id":"bench","statement":"SELECT * FROM main.sales.orders LIMIT 10","wait_timeout":"30s"}"#,
        ),
        "/api/2.0/mcp/sql" => Some(
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"execute_sql","arguments":{"query":"SELECT region, sum(amount) FROM main.sales.orders GROUP BY region"}}}"#,
        ),
        _ => None,
    }
}

/// One CheckRequest per user, as Envoy's ext_authz filter builds it for an agent request.
pub fn check_request(i: usize, token: &str, workspace: &str) -> CheckRequest {
    let (method, path) = CALLS[i % CALLS.len()];
    request(i, token, workspace, method, path, body_of(path))
}

/// A CheckRequest for `method path` (with the request body Envoy buffered, if any).
pub fn request(
    i: usize,
    token: &str,
    workspace: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> CheckRequest {
    let host = "dbc-bench.cloud.databricks.com";
    let mut headers = HashMap::with_capacity(10);
    headers.insert(":authority".to_string(), host.to_string());
    headers.insert(":method".to_string(), method.to_string());
    headers.insert(":path".to_string(), path.to_string());
    headers.insert(":scheme".to_string(), "http".to_string());
    headers.insert("authorization".to_string(), format!("Bearer {token}"));
    headers.insert(
        "user-agent".to_string(),
        "copilot-agent/1.4.2 (databricks-sdk-py/0.40.0)".to_string(),
    );
    headers.insert("accept".to_string(), "application/json".to_string());
    headers.insert("x-forwarded-proto".to_string(), "http".to_string());
    headers.insert("x-request-id".to_string(), String::new());
    let size = body
        .map(str::len)
        .unwrap_or(if method == "POST" { 96 } else { 0 });
    if method == "POST" {
        headers.insert("content-type".to_string(), "application/json".to_string());
        headers.insert("content-length".to_string(), size.to_string());
    }
    let peer = |port: u32| {
        Peer {
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: "127.0.0.1".to_string(),
                port_specifier: Some(
                    envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(port),
                ),
                ..Default::default()
            })),
        }),
        ..Default::default()
    }
    };
    // Envoy puts the path with its query in `path`, and the query alone in `query`.
    let query = path.split_once('?').map(|(_, q)| q).unwrap_or("");
    let mut context_extensions = HashMap::new();
    context_extensions.insert("workspace".to_string(), workspace.to_string());
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(peer(40_000 + (i % 20_000) as u32)),
            destination: Some(peer(10_000)),
            request: Some(Request {
                time: None,
                http: Some(HttpRequest {
                    id: String::new(),
                    method: method.to_string(),
                    headers,
                    path: path.to_string(),
                    host: host.to_string(),
                    scheme: "http".to_string(),
                    query: query.to_string(),
                    protocol: "HTTP/1.1".to_string(),
                    size: size as i64,
                    raw_body: body.map(|b| b.as_bytes().to_vec()).unwrap_or_default(),
                    ..Default::default()
                }),
            }),
            context_extensions,
            ..Default::default()
        }),
    }
}

/// A request ready to send: a per-request `x-request-id` and stream id, like Envoy's.
fn stamped(base: &CheckRequest, n: u64) -> CheckRequest {
    let mut req = base.clone();
    if let Some(http) = req
        .attributes
        .as_mut()
        .and_then(|a| a.request.as_mut())
        .and_then(|r| r.http.as_mut())
    {
        let id = format!("{n:016x}-bench");
        http.id = format!("{n}");
        if let Some(v) = http.headers.get_mut("x-request-id") {
            *v = id;
        }
    }
    req
}

/// `conns` HTTP/2 connections to `addr` (`http://127.0.0.1:port`).
pub async fn connect(addr: &str, conns: usize) -> Result<Vec<Channel>, tonic::transport::Error> {
    let mut out = Vec::with_capacity(conns);
    for _ in 0..conns {
        let ch = Endpoint::from_shared(addr.to_string())?
            .tcp_nodelay(true)
            .connect()
            .await?;
        out.push(ch);
    }
    Ok(out)
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub mode: String,
    pub offered_per_s: Option<f64>,
    pub achieved_per_s: f64,
    pub duration_s: f64,
    pub allowed: u64,
    pub denied: u64,
    pub errors: u64,
    pub latency: Latency,
}

#[derive(Default)]
struct Counts {
    allowed: AtomicU64,
    denied: AtomicU64,
    errors: AtomicU64,
}

impl Counts {
    fn add(&self, o: Outcome) {
        let c = match o {
            Outcome::Allowed => &self.allowed,
            Outcome::Denied => &self.denied,
            Outcome::Error => &self.errors,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn record(
        &self,
        r: &Result<tonic::Response<envoy_types::ext_authz::v3::pb::CheckResponse>, tonic::Status>,
    ) {
        self.add(outcome(r));
    }
}

/// How one operation of a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    Denied,
    Error,
}

fn outcome(
    r: &Result<tonic::Response<envoy_types::ext_authz::v3::pb::CheckResponse>, tonic::Status>,
) -> Outcome {
    match r {
        Ok(resp) if resp.get_ref().status.as_ref().map(|s| s.code).unwrap_or(0) == 0 => {
            Outcome::Allowed
        }
        Ok(_) => Outcome::Denied,
        Err(_) => Outcome::Error,
    }
}

/// Open loop: `op(i)` for i = 0, 1, ... started at `rate`/s for `duration`. The pacer is an OS
/// thread on the kernel's high-resolution timer; `op` runs there and its future on the current
/// runtime. Each latency counts from the operation's *scheduled* time (coordinated omission
/// corrected).
pub async fn paced<F, Fut>(mode: &str, rate: f64, duration: Duration, op: F) -> RunResult
where
    F: Fn(u64) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Outcome> + Send + 'static,
{
    let total = (rate * duration.as_secs_f64()) as u64;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let hist = Arc::new(Mutex::new(histogram()));
    let counts = Arc::new(Counts::default());
    let handle = tokio::runtime::Handle::current();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let started = Instant::now() + Duration::from_millis(20);
    let pacer = {
        let hist = hist.clone();
        let counts = counts.clone();
        std::thread::spawn(move || {
            for i in 0..total {
                let at = started + interval.mul_f64(i as f64);
                let now = Instant::now();
                if at > now {
                    std::thread::sleep(at - now);
                }
                let run = op(i);
                let hist = hist.clone();
                let counts = counts.clone();
                let done = done_tx.clone();
                handle.spawn(async move {
                    let o = run.await;
                    let us = at.elapsed().as_micros() as u64;
                    counts.add(o);
                    if let Ok(mut h) = hist.lock() {
                        let _ = h.record(us.max(1));
                    }
                    drop(done);
                });
            }
        })
    };
    // Every spawned operation holds a sender; the channel closes when the last one finishes.
    let _ = tokio::task::spawn_blocking(move || pacer.join()).await;
    while done_rx.recv().await.is_some() {}
    let elapsed = started.elapsed().as_secs_f64();
    let h = hist
        .lock()
        .map(|h| h.clone())
        .unwrap_or_else(|_| histogram());
    finish(mode, Some(rate), elapsed, &counts, &h)
}

/// Open loop: `rate` Checks/s for `duration`, round-robin over `requests` and `channels`.
pub async fn open_loop(
    channels: &[Channel],
    requests: Arc<Vec<CheckRequest>>,
    rate: f64,
    duration: Duration,
) -> RunResult {
    let clients: Vec<AuthorizationClient<Channel>> = channels
        .iter()
        .cloned()
        .map(AuthorizationClient::new)
        .collect();
    paced("open_loop", rate, duration, move |i| {
        let mut client = clients[(i as usize) % clients.len()].clone();
        let req = stamped(&requests[(i as usize) % requests.len()], i);
        async move { outcome(&client.check(req).await) }
    })
    .await
}

/// Closed loop: `in_flight` workers, each running `op(worker, n)` back to back for `duration`
/// (n counts operations across all workers).
pub async fn saturate<F, Fut>(mode: &str, in_flight: usize, duration: Duration, op: F) -> RunResult
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Outcome> + Send,
{
    let op = Arc::new(op);
    let counts = Arc::new(Counts::default());
    let seq = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::with_capacity(in_flight);
    for w in 0..in_flight {
        let op = op.clone();
        let counts = counts.clone();
        let seq = seq.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = histogram();
            while Instant::now() < deadline {
                let n = seq.fetch_add(1, Ordering::Relaxed);
                let t = Instant::now();
                let o = op(w, n).await;
                let _ = h.record((t.elapsed().as_micros() as u64).max(1));
                counts.add(o);
            }
            h
        }));
    }
    let mut all = histogram();
    for t in tasks {
        if let Ok(h) = t.await {
            let _ = all.add(&h);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    finish(mode, None, elapsed, &counts, &all)
}

/// Closed loop: `in_flight` Checks always outstanding for `duration`, over `channels`.
pub async fn closed_loop(
    channels: &[Channel],
    requests: Arc<Vec<CheckRequest>>,
    in_flight: usize,
    duration: Duration,
) -> RunResult {
    let clients: Vec<AuthorizationClient<Channel>> = (0..in_flight)
        .map(|w| AuthorizationClient::new(channels[w % channels.len()].clone()))
        .collect();
    saturate("closed_loop", in_flight, duration, move |w, n| {
        let mut client = clients[w].clone();
        let req = stamped(&requests[(n as usize) % requests.len()], n);
        async move { outcome(&client.check(req).await) }
    })
    .await
}

fn finish(
    mode: &str,
    offered: Option<f64>,
    elapsed: f64,
    counts: &Counts,
    h: &Histogram<u64>,
) -> RunResult {
    RunResult {
        mode: mode.to_string(),
        offered_per_s: offered,
        achieved_per_s: (h.len() as f64 / elapsed).round(),
        duration_s: (elapsed * 100.0).round() / 100.0,
        allowed: counts.allowed.load(Ordering::Relaxed),
        denied: counts.denied.load(Ordering::Relaxed),
        errors: counts.errors.load(Ordering::Relaxed),
        latency: summarize(h),
    }
}

/// Sends each request once with at most `concurrency` outstanding, `copies` simultaneous
/// copies per request (a user's first requests arriving together); returns the latency
/// histogram summary and counts.
pub async fn each_once(
    channels: &[Channel],
    requests: &[CheckRequest],
    concurrency: usize,
    copies: usize,
) -> RunResult {
    use futures_util::stream::{self, StreamExt};
    let counts = Arc::new(Counts::default());
    let started = Instant::now();
    let hists: Vec<Histogram<u64>> = stream::iter(requests.iter().enumerate())
        .map(|(i, base)| {
            let counts = counts.clone();
            let ch = channels[i % channels.len()].clone();
            async move {
                let mut h = histogram();
                let t = Instant::now();
                let sends = (0..copies).map(|c| {
                    let mut client = AuthorizationClient::new(ch.clone());
                    let req = stamped(base, (i * copies + c) as u64);
                    async move { client.check(req).await }
                });
                for r in futures_util::future::join_all(sends).await {
                    counts.record(&r);
                }
                let _ = h.record((t.elapsed().as_micros() as u64).max(1));
                h
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let mut all = histogram();
    for h in &hists {
        let _ = all.add(h);
    }
    finish(
        "each_once",
        None,
        started.elapsed().as_secs_f64(),
        &counts,
        &all,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn paced_runs_every_operation_once_and_counts_outcomes() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let r = paced("t", 1000.0, Duration::from_millis(200), move |i| {
            if let Ok(mut v) = log.lock() {
                v.push(i);
            }
            async move {
                tokio::time::sleep(Duration::from_millis(2)).await;
                match i % 10 {
                    0 => Outcome::Denied,
                    1 => Outcome::Error,
                    _ => Outcome::Allowed,
                }
            }
        })
        .await;
        let mut ops = seen.lock().map(|v| v.clone()).unwrap_or_default();
        ops.sort_unstable();
        assert_eq!(ops, (0..200).collect::<Vec<u64>>());
        assert_eq!(
            (r.allowed, r.denied, r.errors, r.latency.count),
            (160, 20, 20, 200)
        );
        assert_eq!(r.offered_per_s, Some(1000.0));
        assert!(r.latency.p50_ms >= 2.0, "{:?}", r.latency);
    }

    /// A server that stalls is charged for every request it delayed, from each one's scheduled
    /// time: the generator keeps sending on schedule instead of waiting for answers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn paced_latency_counts_from_the_schedule_through_a_stall() {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let handle = tokio::runtime::Handle::current();
        let r = paced("t", 1000.0, Duration::from_millis(100), move |i| {
            let gate = gate.clone();
            if i == 0 {
                // The server stalls for 150 ms from the first request's scheduled time.
                let opener = gate.clone();
                handle.spawn(async move {
                    tokio::time::sleep(Duration::from_millis(150)).await;
                    opener.add_permits(1_000);
                });
            }
            async move {
                let _ = gate.acquire().await;
                Outcome::Allowed
            }
        })
        .await;
        assert_eq!(r.latency.count, 100);
        // Scheduled over the first 100 ms, all answered after ~150 ms: the first waited ~150 ms,
        // the last ~50 ms, the median ~100 ms.
        assert!(r.latency.max_ms >= 140.0, "{:?}", r.latency);
        assert!(r.latency.p50_ms >= 90.0, "{:?}", r.latency);
    }

    /// When the generator itself falls behind, the requests it sent late are charged from their
    /// scheduled time too (a send-time clock would report them as instant).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn paced_latency_includes_the_generators_own_lag() {
        let r = paced("t", 1000.0, Duration::from_millis(100), |i| {
            if i == 0 {
                std::thread::sleep(Duration::from_millis(80)); // the pacer thread stalls
            }
            async { Outcome::Allowed }
        })
        .await;
        assert_eq!(r.latency.count, 100);
        // Requests 1..80 went out at ~80 ms instead of at 1..79 ms.
        assert!(r.latency.max_ms >= 75.0, "{:?}", r.latency);
        assert!(r.latency.p50_ms >= 20.0, "{:?}", r.latency);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn saturate_keeps_each_worker_busy_until_the_deadline() {
        let busy = Arc::new(AtomicU64::new(0));
        let most = Arc::new(AtomicU64::new(0));
        let (b, m) = (busy.clone(), most.clone());
        let r = saturate("t", 4, Duration::from_millis(200), move |w, _| {
            let (b, m) = (b.clone(), m.clone());
            async move {
                let now = b.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(2)).await;
                b.fetch_sub(1, Ordering::SeqCst);
                if w < 4 {
                    Outcome::Allowed
                } else {
                    Outcome::Error
                }
            }
        })
        .await;
        assert_eq!(
            most.load(Ordering::SeqCst),
            4,
            "never more than in_flight at once"
        );
        assert_eq!(r.errors, 0);
        assert_eq!(r.allowed, r.latency.count);
        // 4 workers, 2 ms (or a timer tick more) each, for 200 ms.
        assert!(
            (100..=400).contains(&r.latency.count),
            "{} operations",
            r.latency.count
        );
        assert!(r.offered_per_s.is_none());
    }
}
