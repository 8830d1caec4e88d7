//! Token broker microbenchmark: the cost of a warm L1 lookup (`Broker::get` for a user whose
//! Databricks token is cached in-process), against a real Redis (health-gated) and the sandbox's
//! token federation endpoint for the first mint.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aegis::broker::seal::Sealer;
use aegis::broker::Broker;
use aegis::config::{TokenSourceKind, WorkspaceConfig};
use aegis::identity::Identity;
use aegis::redis::RedisLink;
use aegis::secret::Key32;
use sandbox::stack::RedisServer;
use sandbox::{Sandbox, SandboxOptions, TokenRequest};

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let redis = RedisServer::start(dir.path()).await.expect("redis starts");
    let sandbox = Sandbox::start(SandboxOptions::default())
        .await
        .expect("sandbox starts");
    let link = RedisLink::new(&redis.url()).expect("redis url");
    tokio::spawn(link.clone().monitor());
    let started = Instant::now();
    while !link.healthy() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "redis never healthy"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let http = aegis::http::client(Duration::from_secs(2)).expect("http client");
    let broker = Arc::new(Broker::new(link, Sealer::new(&Key32::generate()), http));
    let ws = WorkspaceConfig {
        name: "sandbox".into(),
        url: sandbox.workspace_url.parse().expect("workspace url"),
        hosts: vec![],
        token_source: TokenSourceKind::Federation,
        client_id: None,
        scopes: vec!["all-apis".into()],
        allowed_agents: None,
        issuers: None,
        rate_limits: Default::default(),
        tenant_id: None,
        entra_token_url: None,
        client_secret: None,
    };
    let subject = sandbox.mint_idp_token(&TokenRequest {
        ttl_secs: 3600,
        ..TokenRequest::new("alice")
    });
    let identity = Identity {
        issuer_name: Arc::from("dev"),
        issuer: Arc::from(sandbox.idp_url.as_str()),
        subject: "u-alice".into(),
        user_name: "alice@example.com".into(),
        agent: Some("copilot".into()),
        actor_chain: String::new(),
        expires_at: i64::MAX / 4,
    };
    broker
        .get(&ws, &identity, &subject)
        .await
        .expect("first mint");

    let n = 200_000u32;
    // Warm-up, then the measured loop.
    for _ in 0..10_000 {
        broker.get(&ws, &identity, &subject).await.expect("hit");
    }
    let t = Instant::now();
    for _ in 0..n {
        broker.get(&ws, &identity, &subject).await.expect("hit");
    }
    let per_op_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    println!("broker L1 hit: {per_op_us:.3} µs/lookup over {n} lookups (target ≤ 5 µs)");
    let result = serde_json::json!({
        "benchmark": "broker",
        "machine": bench::machine(),
        "l1_hit_us_per_lookup": per_op_us,
        "lookups": n,
        "target_us": 5.0,
    });
    match bench::write_result("broker", &result) {
        Ok(p) => println!("results: {}", p.display()),
        Err(e) => eprintln!("cannot write results: {e}"),
    }
}
