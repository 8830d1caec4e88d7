//! The ledger as an auditor meets it in production: `aegis audit verify` (the binary) run while
//! two replicas append to one chain and both sign checkpoints into one directory every second
//! must say intact, every time; so must the console's "Verify now".

mod support;

use std::time::{Duration, Instant};

use support::*;

const ME: &str = "/api/2.0/preview/scim/v2/Me";

/// Requests through both replicas until `until`; returns how many were allowed.
fn spawn_load(
    urls: [String; 2],
    bearers: Vec<String>,
    until: Instant,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let client = http();
        let workers = (0..4).map(|w| {
            let (client, urls, bearers) = (client.clone(), urls.clone(), bearers.clone());
            async move {
                let mut ok = 0;
                for i in 0..100_000usize {
                    if Instant::now() >= until {
                        break;
                    }
                    let url = format!("{}{ME}", urls[(i + w) % 2]);
                    let bearer = &bearers[(i + w) % bearers.len()];
                    if let Ok(r) = client.get(url).bearer_auth(bearer).send().await {
                        ok += usize::from(r.status().as_u16() == 200);
                    }
                }
                ok
            }
        });
        futures_util::future::join_all(workers)
            .await
            .into_iter()
            .sum()
    })
}

async fn verify_cli(config: &str) -> (i32, String, String) {
    let config = config.to_string();
    tokio::task::spawn_blocking(move || aegis(&["audit", "verify", "--config", &config, "--json"]))
        .await
        .expect("verify task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn verify_says_intact_while_two_replicas_append_and_sign() {
    let stack = start_with(StackOptions::new(AEGIS_BIN).with_config(|c| {
        c.get_mut("audit")
            .and_then(|v| v.as_table_mut())
            .expect("audit")
            .insert("checkpoint_interval".into(), "1s".into());
    }))
    .await;
    let b = second_replica(&stack).await;
    let bearers: Vec<String> = ["alice", "bob", "carol"]
        .iter()
        .map(|u| token(&stack, u))
        .collect();
    for t in &bearers {
        assert_eq!(get(&stack, ME, Some(t)).await.status, 200);
    }
    let config = stack.config_path().to_str().expect("path").to_string();

    let until = Instant::now() + Duration::from_secs(8);
    let load = spawn_load(
        [stack.envoy_url(), b.envoy.listener_url()],
        bearers.clone(),
        until,
    );
    // The auditor runs verify, again and again, while both replicas append and checkpoint.
    let mut runs = 0;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    while Instant::now() + Duration::from_millis(500) < until {
        let (code, out, err) = verify_cli(&config).await;
        assert_eq!(code, 0, "verify under load, run {runs}: {out}{err}");
        let report: serde_json::Value = serde_json::from_str(&out).expect("verify --json");
        assert_eq!(report["intact"], true, "{out}");
        runs += 1;
    }
    let allowed = load.await.expect("load");
    assert!(runs >= 3, "only {runs} verify runs under load");
    assert!(allowed > 100, "only {allowed} requests allowed under load");

    // Both replicas signed checkpoints into the one directory, each naming itself.
    let dir = stack.work_dir().join("checkpoints");
    let mut signers = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(&dir).expect("checkpoint dir") {
        let path = entry.expect("entry").path();
        // The transparency log's notes (note-*.txt) sit beside the JSON checkpoints.
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("checkpoint");
        let cp: serde_json::Value = serde_json::from_str(&text).expect("checkpoint json");
        assert_eq!(cp["version"], 2, "{text}");
        signers.insert(cp["signer"].as_str().unwrap_or_default().to_string());
    }
    assert!(signers.len() >= 2, "signers: {signers:?}");

    // Quiet again: still intact, and the report covers every row the load wrote.
    let (code, out, err) = verify_cli(&config).await;
    assert_eq!(code, 0, "{out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("verify --json");
    let rows = stack
        .postgres
        .query_json("SELECT count(*)::bigint AS n FROM aegis_audit")
        .await
        .expect("count");
    assert_eq!(report["rows"], rows[0]["n"], "{out}");
    eprintln!(
        "{runs} verify runs under load, all intact; {allowed} requests allowed; {} rows; checkpoints by {signers:?}",
        rows[0]["n"]
    );
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allow_that_commits_after_the_deadline_is_compensated() {
    use sandbox::stack::{FaultMode, FaultProxy};
    let proxy = std::sync::Arc::new(FaultProxy::start().await.expect("postgres proxy"));
    let p = proxy.clone();
    let stack = start_with(StackOptions::new(AEGIS_BIN).with_config(move |c| {
        let t = c
            .get_mut("postgres")
            .and_then(|v| v.as_table_mut())
            .unwrap();
        let url = t["url"].as_str().unwrap().to_string();
        t.insert("url".into(), p.reroute(&url).expect("loopback url").into());
    }))
    .await;
    let alice = token(&stack, "alice");
    // Positive control: a normal allow has its ALLOW row and nothing else.
    let ok = get(&stack, ME, Some(&alice)).await;
    assert_eq!(ok.status, 200, "{}", ok.text);

    // PostgreSQL answers, but only after the Check's deadline (1.8 s): the row commits late.
    proxy.set_mode(FaultMode::Slow(Duration::from_millis(2500)));
    let late = get(&stack, ME, Some(&alice)).await;
    assert_eq!(late.status, 503, "{}", late.text);
    assert_eq!(
        late.body["error"], "dependency_unavailable",
        "{}",
        late.text
    );
    assert!(late.header("retry-after").is_some());
    let trace = late.trace_id();
    proxy.set_mode(FaultMode::Pass);

    let rows_of = |trace: String| {
        let stack = &stack;
        async move {
            stack
                .postgres
                .query_json(&format!(
                    "SELECT decision, reason, user_name, path FROM aegis_audit \
                     WHERE trace_id = '{trace}' ORDER BY seq"
                ))
                .await
                .expect("rows")
        }
    };
    let waited = Instant::now();
    let mut rows = rows_of(trace.clone()).await;
    while rows.len() < 2 && waited.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        rows = rows_of(trace.clone()).await;
    }
    assert_eq!(
        rows.len(),
        2,
        "rows for {trace}: {rows:?}\n{}",
        stack.aegis.log()
    );
    assert_eq!(rows[0]["decision"], "ALLOW", "{rows:?}");
    assert_eq!(rows[1]["decision"], "DENY", "{rows:?}");
    assert_eq!(rows[1]["reason"], "allow_not_delivered", "{rows:?}");
    assert_eq!(rows[1]["user_name"], "alice@example.com");
    assert_eq!(rows[1]["path"], ME);
    // The request never reached the workspace, and the control has no compensation.
    assert!(!stack
        .sandbox
        .requests()
        .iter()
        .any(|r| r.trace_id.as_deref() == Some(trace.as_str())));
    assert_eq!(rows_of(ok.trace_id()).await.len(), 1);
    let config = stack.config_path().to_str().expect("path").to_string();
    let (code, out, err) = verify_cli(&config).await;
    assert_eq!(code, 0, "{out}{err}");
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_check_in_flight_and_checkpoints_it() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

    let mut stack = start().await;
    let alice = token(&stack, "alice");
    // Envoy keeps watching health on its own connection; so does this test.
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{}", stack.aegis.grpc_listen()))
            .expect("uri")
            .connect()
            .await
            .expect("grpc connection to aegis");
    let mut watch = HealthClient::new(channel)
        .watch(HealthCheckRequest {
            service: "envoy.service.auth.v3.Authorization".into(),
        })
        .await
        .expect("health watch")
        .into_inner();
    let first = watch.message().await.expect("a status").expect("a status");
    assert_eq!(first.status, ServingStatus::Serving as i32);

    // A Check waits on a slow token endpoint when SIGTERM arrives.
    stack
        .sandbox
        .set_token_fault(sandbox::TokenFault::Slow { millis: 1200 });
    let base = stack.envoy_url();
    let bearer = alice.clone();
    let in_flight = tokio::spawn(async move {
        read(
            http()
                .get(format!("{base}{ME}"))
                .bearer_auth(&bearer)
                .send()
                .await
                .expect("request"),
        )
        .await
    });
    eventually(Duration::from_secs(5), "the mint to start", || async {
        stack.sandbox.token_requests() > 0
    })
    .await;
    let pid = stack.aegis.pid().expect("aegis pid");
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());

    // NOT_SERVING comes first, while the Check is still running.
    let next = tokio::time::timeout(Duration::from_secs(3), watch.message())
        .await
        .expect("a health change within 3 s")
        .expect("a status")
        .expect("a status");
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    assert!(
        !in_flight.is_finished(),
        "the check finished before NOT_SERVING"
    );
    assert!(stack.aegis.is_running(), "aegis exited before NOT_SERVING");
    drop(watch);

    // The Check completes, as an allow with its row committed.
    let r = in_flight.await.expect("request task");
    assert_eq!(r.status, 200, "{}", r.text);
    let exit = stack.aegis.terminate(Duration::from_secs(20)).await;
    assert!(
        exit.is_some_and(|e| e.success()),
        "aegis exit: {exit:?}\n{}",
        stack.aegis.log()
    );
    let row = stack
        .postgres
        .query_json(&format!(
            "SELECT seq, decision FROM aegis_audit WHERE trace_id = '{}'",
            r.trace_id()
        ))
        .await
        .expect("row");
    assert_eq!(row.len(), 1, "{row:?}");
    assert_eq!(row[0]["decision"], "ALLOW");
    let seq = row[0]["seq"].as_u64().expect("seq");
    // The final checkpoint, written on the way out, covers it.
    let newest = std::fs::read_dir(stack.work_dir().join("checkpoints"))
        .expect("checkpoints")
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .filter_map(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .filter_map(|v| v["size"].as_u64())
        .max()
        .unwrap_or(0);
    assert!(
        newest >= seq,
        "the final checkpoint ({newest}) does not cover seq {seq}"
    );
}
