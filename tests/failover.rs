//! PostgreSQL fails over under load: a synchronous streaming standby (pg_basebackup), the
//! primary SIGKILLed mid-traffic, the standby promoted. aegis, on a multi-host URL with
//! `target_session_attrs=read-write`, denies (its own 503) while there is no writable primary
//! and recovers by itself; no allow a client saw is missing from the promoted database, and the
//! chain there verifies intact (no fork, no gap).

mod support;

use std::time::{Duration, Instant};

use support::*;

const ME: &str = "/api/2.0/preview/scim/v2/Me";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_postgres_failover_under_load_loses_no_acknowledged_allow() {
    let mut stack = start().await;
    let standby = stack
        .postgres
        .start_standby(stack.work_dir().join("standby"))
        .await
        .expect("a streaming standby");
    // Synchronous replication: a commit returns once the standby has flushed it.
    stack
        .postgres
        .batch_execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
        .await
        .expect("synchronous_standby_names");
    stack
        .postgres
        .execute("SELECT pg_reload_conf()")
        .await
        .expect("reload");
    eventually(Duration::from_secs(15), "a synchronous standby", || async {
        stack
            .postgres
            .query_json("SELECT sync_state FROM pg_stat_replication")
            .await
            .map(|rows| rows.iter().any(|r| r["sync_state"] == "sync"))
            .unwrap_or(false)
    })
    .await;

    // aegis follows whichever host is the writable primary.
    let (p1, p2) = (stack.postgres.port(), standby.port());
    stack
        .update_config(|c| {
            c.get_mut("postgres")
                .and_then(|v| v.as_table_mut())
                .expect("postgres")
                .insert(
                    "url".into(),
                    format!(
                        "postgres://aegis@127.0.0.1:{p1},127.0.0.1:{p2}/aegis?target_session_attrs=read-write"
                    )
                    .into(),
                );
        })
        .expect("config");
    stack.aegis.restart().await.expect("aegis restarts");
    let alice = token(&stack, "alice");
    assert_eq!(get(&stack, ME, Some(&alice)).await.status, 200);

    let until = Instant::now() + Duration::from_secs(14);
    let load = spawn_load(stack.envoy_url(), ME, alice.clone(), 4, until);
    tokio::time::sleep(Duration::from_secs(3)).await;
    stack.postgres.kill();
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    standby.promote().await.expect("promote the standby");
    let promoted = Instant::now();
    let samples = load.await.expect("load");

    let allowed: Vec<&Sample> = samples.iter().filter(|s| s.status == 200).collect();
    let before = allowed.iter().filter(|s| s.sent < killed).count();
    let after = allowed.iter().filter(|s| s.sent > promoted).count();
    assert!(before > 0, "nothing allowed before the failover");
    assert!(after > 0, "aegis did not recover after the promotion");
    let denied: Vec<&Sample> = samples.iter().filter(|s| s.status != 200).collect();
    assert!(!denied.is_empty(), "nothing was denied without a primary");
    for s in &denied {
        assert_eq!(
            (s.status, s.reason.as_str(), s.retry_after),
            (503, "dependency_unavailable", true),
            "a deny that is not aegis' own: {s:?}"
        );
    }

    // Every allow a client saw is in the promoted database.
    let rows = standby
        .query_json("SELECT trace_id FROM aegis_audit WHERE decision = 'ALLOW'")
        .await
        .expect("rows on the promoted standby");
    let committed: std::collections::HashSet<&str> =
        rows.iter().filter_map(|r| r["trace_id"].as_str()).collect();
    let lost: Vec<&&Sample> = allowed
        .iter()
        .filter(|s| !s.trace.as_deref().is_some_and(|t| committed.contains(t)))
        .collect();
    assert!(
        lost.is_empty(),
        "allowed, but not in the promoted database: {lost:?}"
    );
    // The workspace saw only requests with a committed ALLOW row.
    for r in stack
        .sandbox
        .requests()
        .iter()
        .filter(|r| r.service != "oauth2")
    {
        let t = r.trace_id.as_deref().expect("a trace id");
        assert!(
            committed.contains(t),
            "upstream without a committed row: {r:?}"
        );
    }

    // No fork, no gap: the chain on the new primary verifies (the binary, the same config).
    let config = stack.config_path().to_str().expect("path").to_string();
    let (code, out, err) = aegis(&["audit", "verify", "--config", &config]);
    assert_eq!(code, 0, "{out}{err}");
    eprintln!(
        "failover: {before} allowed before the kill, {} denied (aegis 503), {after} allowed after \
         the promotion, {} ALLOW rows on the promoted standby, 0 lost",
        denied.len(),
        committed.len()
    );
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_commit_durably_is_refused() {
    let mut stack = start().await;
    let alice = token(&stack, "alice");
    assert_eq!(get(&stack, ME, Some(&alice)).await.status, 200);

    // remote_apply with no synchronous standby would acknowledge what one crash can lose.
    stack
        .update_config(|c| {
            c.get_mut("postgres")
                .and_then(|v| v.as_table_mut())
                .expect("postgres")
                .insert("min_synchronous_commit".into(), "remote_apply".into());
        })
        .expect("config");
    stack.aegis.terminate(Duration::from_secs(10)).await;
    stack.aegis =
        sandbox::stack::AegisProcess::spawn(stack.aegis_bin(), stack.config_path()).expect("spawn");
    eventually(
        Duration::from_secs(10),
        "the refusal in the log",
        || async {
            stack
                .aegis
                .log()
                .contains("synchronous_standby_names is empty")
        },
    )
    .await;
    for _ in 0..3 {
        let r = get(&stack, ME, Some(&alice)).await;
        assert_eq!(r.status, 503, "{}", r.text);
        assert_eq!(r.body["error"], "dependency_unavailable", "{}", r.text);
        assert!(r.header("retry-after").is_some());
    }

    // A name that is not a level is a config error.
    stack
        .update_config(|c| {
            c.get_mut("postgres")
                .and_then(|v| v.as_table_mut())
                .expect("postgres")
                .insert("min_synchronous_commit".into(), "off".into());
        })
        .expect("config");
    let config = stack.config_path().to_str().expect("path").to_string();
    let (code, _, err) = aegis(&["config", "check", "--config", &config]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("postgres.min_synchronous_commit"), "{err}");

    // Back to the default: served again, with no restart of PostgreSQL.
    stack
        .update_config(|c| {
            c.get_mut("postgres")
                .and_then(|v| v.as_table_mut())
                .expect("postgres")
                .remove("min_synchronous_commit");
        })
        .expect("config");
    stack.aegis.restart().await.expect("aegis restarts");
    assert_eq!(get(&stack, ME, Some(&alice)).await.status, 200);
    stack.shutdown().await;
}
