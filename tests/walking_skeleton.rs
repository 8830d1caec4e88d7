//! The whole path, for real: agent → Envoy → aegis (Check) → Envoy → sandbox Databricks, with a
//! real Redis and PostgreSQL behind aegis. Each test starts its own stack on free loopback ports.

mod support;

use std::time::Duration;

use support::*;

/// The SQL result rows as (order_id, region, customer_email).
fn order_rows(resp: &Resp) -> Vec<(String, String, String)> {
    assert_eq!(
        resp.body["status"]["state"], "SUCCEEDED",
        "statement did not succeed: {}",
        resp.text
    );
    resp.body["result"]["data_array"]
        .as_array()
        .expect("data_array")
        .iter()
        .map(|r| {
            (
                r[0].as_str().unwrap().to_string(),
                r[1].as_str().unwrap().to_string(),
                r[2].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_user_reaches_databricks_as_themselves() {
    let stack = start().await;
    let alice = token(&stack, "alice");
    let bob = token(&stack, "bob");
    let carol = token(&stack, "carol");

    // SCIM Me answers as alice, and the agent's forged x-aegis-* headers never arrive.
    let resp = read(
        http()
            .get(format!("{}/api/2.0/preview/scim/v2/Me", stack.envoy_url()))
            .bearer_auth(&alice)
            .header("user-agent", "copilot-agent/1.0 aegis-trace/forged")
            .header("x-aegis-user", "carol@example.com")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text);
    assert_eq!(resp.body["userName"], "alice@example.com");
    let me_trace = resp.trace_id();

    // alice: the row filter keeps EMEA, the mask hides emails.
    let resp = sql(
        &stack,
        &alice,
        "SELECT order_id, region, customer_email FROM main.sales.orders ORDER BY order_id",
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text);
    let rows = order_rows(&resp);
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert!(
        rows.iter()
            .all(|(_, region, email)| region == "EMEA" && email == "***"),
        "{rows:?}"
    );
    let alice_sql_trace = resp.trace_id();

    // carol (admins, pii_readers) sees every row, unmasked: the difference is Databricks', not ours.
    let resp = sql(
        &stack,
        &carol,
        "SELECT order_id, region, customer_email FROM main.sales.orders ORDER BY order_id",
    )
    .await;
    let rows = order_rows(&resp);
    assert_eq!(rows.len(), 8);
    assert_eq!(rows[0].2, "anna@example.org");

    // bob is allowed by aegis and refused by the workspace's grants.
    let resp = sql(&stack, &bob, "SELECT * FROM main.sales.orders").await;
    assert_eq!(resp.status, 200, "{}", resp.text);
    assert_eq!(resp.body["status"]["state"], "FAILED", "{}", resp.text);
    let msg = resp.body["status"]["error"]["message"]
        .as_str()
        .unwrap_or("");
    assert!(msg.contains("INSUFFICIENT_PERMISSIONS"), "{msg}");
    let bob_trace = resp.trace_id();

    // What Databricks saw: one authorization per request, always the user's own Databricks
    // token (never the IdP JWT), the user agent carrying the aegis trace id, no x-aegis-*.
    let seen: Vec<RequestRecord> = stack
        .sandbox
        .requests()
        .into_iter()
        .filter(|r| r.service != "oauth2")
        .collect();
    assert_eq!(seen.len(), 4, "{seen:#?}");
    for r in &seen {
        assert_eq!(r.authorization_count, 1, "{r:?}");
        assert_eq!(r.authorization_kind, "databricks_token", "{r:?}");
        assert!(!r.token_expired, "{r:?}");
        // Only aegis' own trace id header; the agent's x-aegis-user was stripped.
        assert_eq!(
            r.x_aegis_headers,
            vec!["x-aegis-trace-id".to_string()],
            "{r:?}"
        );
        let ua = r.user_agent.as_deref().unwrap_or("");
        assert!(
            ua.contains(" aegis/") && ua.contains("aegis-trace/"),
            "{ua}"
        );
        assert!(!ua.contains("forged"), "{ua}");
    }
    let by_trace = |t: &str| {
        seen.iter()
            .find(|r| r.trace_id.as_deref() == Some(t))
            .unwrap_or_else(|| panic!("no sandbox row for trace {t}: {seen:#?}"))
    };
    assert_eq!(
        by_trace(&me_trace).user.as_deref(),
        Some("alice@example.com")
    );
    assert_eq!(
        by_trace(&alice_sql_trace).user.as_deref(),
        Some("alice@example.com")
    );
    assert_eq!(
        by_trace(&bob_trace).user.as_deref(),
        Some("bob@example.com")
    );

    // One exchange per user: alice's second request used the cached token.
    assert_eq!(stack.sandbox.exchange_count("alice@example.com"), 1);
    assert_eq!(stack.sandbox.exchange_count("bob@example.com"), 1);

    // Every decision has its chain row, joined to Databricks' by trace id.
    let rows = audit_rows(&stack).await;
    assert_eq!(rows.len(), 4, "{rows:#?}");
    for (row, (trace, user)) in rows.iter().zip([
        (&me_trace, "alice@example.com"),
        (&alice_sql_trace, "alice@example.com"),
        (
            &rows[2]["trace_id"].as_str().unwrap().to_string(),
            "carol@example.com",
        ),
        (&bob_trace, "bob@example.com"),
    ]) {
        assert_eq!(row["decision"], "ALLOW");
        assert_eq!(row["trace_id"].as_str().unwrap(), trace.as_str());
        assert_eq!(row["user_name"], user);
        assert_eq!(row["agent"], "copilot");
        assert_eq!(row["workspace"], "sandbox");
        assert_eq!(row["token_source"], "federation");
        assert_eq!(row["token_fp"].as_str().unwrap().len(), 16);
    }
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_never_reach_databricks() {
    // The other tests run aegis on one thread (the default); this one on a 4-worker runtime.
    let stack = start_with(StackOptions::new(AEGIS_BIN).with_config(|c| {
        if let Some(server) = c.get_mut("server").and_then(|s| s.as_table_mut()) {
            server.insert("worker_threads".into(), toml::Value::Integer(4));
        }
    }))
    .await;
    let good = token(&stack, "alice");
    let expired = stack.sandbox.mint_idp_token(&TokenRequest {
        ttl_secs: -3600,
        ..TokenRequest::new("alice")
    });
    let mut wrong_issuer = TokenRequest::new("alice");
    wrong_issuer
        .extra_claims
        .insert("iss".into(), "https://idp.attacker.example".into());
    let wrong_issuer = stack.sandbox.mint_idp_token(&wrong_issuer);
    let wrong_audience = stack.sandbox.mint_idp_token(&TokenRequest {
        audience: "someone-else".into(),
        ..TokenRequest::new("alice")
    });
    let bad_signature = {
        let (head, sig) = good.rsplit_once('.').unwrap();
        let mut sig: Vec<u8> = sig.bytes().collect();
        sig[10] = if sig[10] == b'A' { b'B' } else { b'A' };
        format!("{head}.{}", String::from_utf8(sig).unwrap())
    };
    stack.sandbox.clear_requests();

    let cases: [(&str, Option<&str>, &str); 5] = [
        ("no token", None, "missing_credentials"),
        ("expired", Some(&expired), "token_expired"),
        ("wrong issuer", Some(&wrong_issuer), "untrusted_issuer"),
        ("wrong audience", Some(&wrong_audience), "invalid_token"),
        ("bad signature", Some(&bad_signature), "invalid_token"),
    ];
    let mut traces = Vec::new();
    for (what, bearer, reason) in cases {
        let resp = get(&stack, "/api/2.0/preview/scim/v2/Me", bearer).await;
        assert_eq!(resp.status, 401, "{what}: {}", resp.text);
        assert_eq!(resp.body["error"], reason, "{what}: {}", resp.text);
        assert_eq!(
            resp.body["trace_id"].as_str().unwrap(),
            resp.trace_id(),
            "{what}"
        );
        assert!(
            resp.header("www-authenticate")
                .unwrap()
                .starts_with("Bearer"),
            "{what}"
        );
        // The body is exactly the contract: no internal error text.
        let keys: Vec<_> = resp.body.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, vec!["error", "message", "trace_id"], "{what}");
        traces.push((resp.trace_id(), reason));
    }
    assert!(
        stack.sandbox.requests().is_empty(),
        "the sandbox saw a request: {:#?}",
        stack.sandbox.requests()
    );

    let rows = audit_rows(&stack).await;
    assert_eq!(rows.len(), traces.len());
    for (row, (trace, reason)) in rows.iter().zip(&traces) {
        assert_eq!(row["decision"], "DENY");
        assert_eq!(row["reason"], *reason);
        assert_eq!(row["trace_id"].as_str().unwrap(), trace);
    }
    stack.shutdown().await;
}

/// Sends `n` requests as alice and asserts each is a 503 `dependency_unavailable` deny that the
/// sandbox never saw.
async fn assert_fails_closed(stack: &Stack, alice: &str, n: usize) {
    stack.sandbox.clear_requests();
    for _ in 0..n {
        let resp = get(stack, "/api/2.0/preview/scim/v2/Me", Some(alice)).await;
        assert_eq!(resp.status, 503, "{}", resp.text);
        assert_eq!(resp.body["error"], "dependency_unavailable");
        assert!(resp.header("retry-after").is_some());
    }
    assert!(
        stack.sandbox.requests().is_empty(),
        "{:#?}",
        stack.sandbox.requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fails_closed_and_recovers_without_restart() {
    let mut stack = start().await;
    let alice = token(&stack, "alice");
    assert_eq!(
        get(&stack, "/api/2.0/preview/scim/v2/Me", Some(&alice))
            .await
            .status,
        200
    );

    stack.redis.stop();
    eventually(
        Duration::from_secs(10),
        "aegis to notice redis is down",
        || async {
            get(&stack, "/api/2.0/preview/scim/v2/Me", Some(&alice))
                .await
                .status
                == 503
        },
    )
    .await;
    assert_fails_closed(&stack, &alice, 5).await;

    stack.redis.start_again().await.expect("redis restarts");
    eventually(
        Duration::from_secs(10),
        "requests to flow again",
        || async {
            get(&stack, "/api/2.0/preview/scim/v2/Me", Some(&alice))
                .await
                .status
                == 200
        },
    )
    .await;
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_fails_closed_and_recovers_without_restart() {
    let mut stack = start().await;
    let alice = token(&stack, "alice");
    assert_eq!(
        get(&stack, "/api/2.0/preview/scim/v2/Me", Some(&alice))
            .await
            .status,
        200
    );

    stack.postgres.stop().await;
    // The very next request cannot commit its row, so it must not be allowed.
    assert_fails_closed(&stack, &alice, 5).await;

    stack
        .postgres
        .start_again()
        .await
        .expect("postgres restarts");
    eventually(
        Duration::from_secs(15),
        "requests to flow again",
        || async {
            get(&stack, "/api/2.0/preview/scim/v2/Me", Some(&alice))
                .await
                .status
                == 200
        },
    )
    .await;

    // Every allow the sandbox saw has its row; the chain still verifies.
    let allowed: Vec<_> = audit_rows(&stack)
        .await
        .into_iter()
        .filter(|r| r["decision"] == "ALLOW")
        .collect();
    assert!(allowed.len() >= 2);
    let config = stack.config_path().to_str().unwrap().to_string();
    let (code, out, err) = aegis(&["audit", "verify", "--config", &config]);
    assert_eq!(code, 0, "{out}{err}");
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_chain_verifies_and_catches_a_direct_edit() {
    let stack = start().await;
    let alice = token(&stack, "alice");
    for _ in 0..3 {
        assert_eq!(
            get(&stack, "/api/2.0/preview/scim/v2/Me", Some(&alice))
                .await
                .status,
            200
        );
    }
    assert_eq!(
        get(&stack, "/api/2.0/preview/scim/v2/Me", None)
            .await
            .status,
        401
    );
    let config = stack.config_path().to_str().unwrap().to_string();

    let (code, out, err) = aegis(&["audit", "verify", "--config", &config, "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(report["intact"], true);
    assert_eq!(report["rows"], 4);

    // The table is append-only, even for a superuser going through the normal path.
    let refused = stack
        .postgres
        .execute("UPDATE aegis_audit SET user_name = 'mallory' WHERE seq = 2")
        .await;
    assert!(refused.is_err(), "an UPDATE of aegis_audit was accepted");
    let refused = stack
        .postgres
        .execute("DELETE FROM aegis_audit WHERE seq = 4")
        .await;
    assert!(refused.is_err(), "a DELETE from aegis_audit was accepted");

    // A DBA who switches the triggers off can edit a row; verify names the row.
    stack
        .postgres
        .batch_execute(
            "SET session_replication_role = replica; \
             UPDATE aegis_audit SET user_name = 'mallory@example.com' WHERE seq = 2; \
             SET session_replication_role = origin;",
        )
        .await
        .expect("tamper as superuser");
    let (code, out, err) = aegis(&["audit", "verify", "--config", &config, "--json"]);
    assert_eq!(code, 1, "{out}{err}");
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(report["intact"], false);
    assert_eq!(report["first_bad_seq"], 2);
    assert_eq!(report["problem"], "bad_mac");

    // Export streams every row as one JSON line, macs in hex, no token anywhere.
    let (code, out, _) = aegis(&["audit", "export", "--config", &config]);
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 4);
    assert!(!out.contains(&alice));
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_and_metrics_are_served_on_the_admin_listener() {
    let stack = start().await;
    let admin = stack.aegis_admin_url();
    let ready = read(http().get(format!("{admin}/readyz")).send().await.unwrap()).await;
    assert_eq!(ready.status, 200);
    assert_eq!(ready.body["jwks"], true);
    assert_eq!(ready.body["audit_chain_head"], true);
    let alice = token(&stack, "alice");
    assert_eq!(
        get(&stack, "/api/2.0/preview/scim/v2/Me", Some(&alice))
            .await
            .status,
        200
    );
    let metrics = http()
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("aegis_checks_total{decision=\"allow\",reason=\"\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("aegis_check_duration_seconds_bucket"),
        "{metrics}"
    );
    stack.shutdown().await;
}
