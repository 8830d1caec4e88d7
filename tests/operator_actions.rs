//! Operator actions hold everywhere and are on the record: an agent block lives in PostgreSQL,
//! so losing Redis' data (FLUSHALL, a restart without persistence) never unblocks anyone; a
//! replica that cannot read the durable list denies; console block, unblock and revoke are
//! `ADMIN` rows in the chain, which `aegis audit verify` then finds intact.

mod support;

use std::time::Duration;

use support::*;

const ME: &str = "/api/2.0/preview/scim/v2/Me";

fn agent_token(stack: &Stack, user: &str, agent: &str) -> String {
    let mut req = TokenRequest::new(user);
    req.agent = agent.to_string();
    stack.sandbox.mint_idp_token(&req)
}

/// Status and aegis' deny reason for one request.
async fn decision(stack: &Stack, bearer: &str) -> (u16, String) {
    let r = get(stack, ME, Some(bearer)).await;
    if r.status != 200 {
        // Always aegis' own body, with the trace id it put in the header.
        assert_eq!(
            r.body["trace_id"].as_str(),
            Some(r.trace_id().as_str()),
            "{}",
            r.text
        );
    }
    (
        r.status,
        r.body["error"].as_str().unwrap_or_default().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_block_survives_redis_data_loss_and_every_action_is_audited() {
    let mut stack = start().await;
    let joule = agent_token(&stack, "alice", "joule");
    let copilot = agent_token(&stack, "alice", "copilot");
    assert_eq!(decision(&stack, &joule).await.0, 200);
    let console = console_sign_in(&stack).await;

    let r = console
        .act("/console/api/block", serde_json::json!({"agent": "joule"}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let blocked = (403, "agent_not_allowed".to_string());
    assert_eq!(decision(&stack, &joule).await, blocked);
    // Positive control: the same user through another agent is let through.
    assert_eq!(decision(&stack, &copilot).await.0, 200);

    // Redis loses everything: FLUSHALL, then a restart without persistence.
    flushall(&stack).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(decision(&stack, &joule).await, blocked, "after FLUSHALL");
    stack.redis.start_again().await.expect("redis restarts");
    eventually(
        Duration::from_secs(15),
        "recovery after the redis restart",
        || async { decision(&stack, &copilot).await.0 == 200 },
    )
    .await;
    for _ in 0..3 {
        assert_eq!(
            decision(&stack, &joule).await,
            blocked,
            "after a redis restart"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // And a replica that starts after all that reads the block before it serves.
    stack.aegis.restart().await.expect("aegis restarts");
    assert_eq!(
        decision(&stack, &joule).await,
        blocked,
        "after an aegis restart"
    );

    // A replica that cannot read the durable list denies everyone until it can.
    stack
        .postgres
        .execute("ALTER TABLE aegis_agent_blocks RENAME TO aegis_agent_blocks_away")
        .await
        .expect("rename");
    eventually(
        Duration::from_secs(5),
        "deny without the durable list",
        || async {
            decision(&stack, &copilot).await == (503, "dependency_unavailable".to_string())
        },
    )
    .await;
    stack
        .postgres
        .execute("ALTER TABLE aegis_agent_blocks_away RENAME TO aegis_agent_blocks")
        .await
        .expect("rename back");
    eventually(
        Duration::from_secs(5),
        "recovery with the durable list",
        || async { decision(&stack, &copilot).await.0 == 200 },
    )
    .await;
    assert_eq!(decision(&stack, &joule).await, blocked);

    // Unblock (a new session: aegis restarted), and revoke alice, from the console.
    let console = console_sign_in(&stack).await;
    let r = console
        .act(
            "/console/api/unblock",
            serde_json::json!({"agent": "joule"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(decision(&stack, &joule).await.0, 200);
    let r = console
        .act(
            "/console/api/revoke",
            serde_json::json!({"user": "alice@example.com"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);

    let rows = stack
        .postgres
        .query_json(
            "SELECT method, reason, agent, user_name FROM aegis_audit \
             WHERE decision = 'ADMIN' ORDER BY seq",
        )
        .await
        .expect("admin rows");
    let got: Vec<(String, String, String, String)> = rows
        .iter()
        .map(|r| {
            let f = |k: &str| r[k].as_str().unwrap_or_default().to_string();
            (f("method"), f("reason"), f("agent"), f("user_name"))
        })
        .collect();
    let want = |m: &str, r: &str, a: &str, u: &str| {
        (m.to_string(), r.to_string(), a.to_string(), u.to_string())
    };
    assert_eq!(
        got,
        vec![
            want("BLOCK", "agent_blocked", "joule", ""),
            want("UNBLOCK", "agent_unblocked", "joule", ""),
            want("REVOKE", "token_revoked", "", "alice@example.com"),
        ]
    );
    let config = stack.config_path().to_str().expect("path").to_string();
    let (code, out, err) = aegis(&["audit", "verify", "--config", &config]);
    assert_eq!(code, 0, "{out}{err}");
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_made_before_the_upgrade_is_kept() {
    // A block stored the old way (only in Redis) is copied into PostgreSQL at start.
    let mut stack = start().await;
    let client = redis::Client::open(stack.redis.url()).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection");
    redis::cmd("SADD")
        .arg("aegis:v1:blocked_agents")
        .arg("joule")
        .query_async::<()>(&mut conn)
        .await
        .expect("SADD");
    stack.aegis.restart().await.expect("aegis restarts");
    let joule = agent_token(&stack, "alice", "joule");
    eventually(
        Duration::from_secs(5),
        "the legacy block applies",
        || async { decision(&stack, &joule).await == (403, "agent_not_allowed".to_string()) },
    )
    .await;
    let rows = stack
        .postgres
        .query_json("SELECT agent FROM aegis_agent_blocks")
        .await
        .expect("blocks");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["agent"], "joule");
    assert_eq!(
        decision(&stack, &agent_token(&stack, "alice", "copilot"))
            .await
            .0,
        200
    );
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_reports_each_issuers_own_keys() {
    // A second issuer whose keys cannot be fetched must not make the first look down: the
    // first one's keys are loaded and verify its users' tokens.
    let mut stack = start().await;
    let closed = free_port().expect("a free port");
    stack
        .update_config(|c| {
            let issuers = c
                .get_mut("issuers")
                .and_then(|v| v.as_array_mut())
                .expect("issuers");
            let mut offline = issuers[0].as_table().expect("issuer").clone();
            offline.insert("name".into(), "offline".into());
            offline.insert(
                "issuer".into(),
                format!("http://127.0.0.1:{closed}/offline").into(),
            );
            offline.insert(
                "jwks_uri".into(),
                format!("http://127.0.0.1:{closed}/jwks").into(),
            );
            issuers.push(offline.into());
        })
        .expect("config");
    stack.aegis.terminate(Duration::from_secs(10)).await;
    stack.aegis =
        sandbox::stack::AegisProcess::spawn(stack.aegis_bin(), stack.config_path()).expect("spawn");
    // The admin listener serves the console even while aegis is not ready.
    let mut console = None;
    for _ in 0..100 {
        let up = http()
            .get(format!("{}/healthz", stack.aegis_admin_url()))
            .send()
            .await
            .is_ok();
        if up {
            console = Some(console_sign_in(&stack).await);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let console = console.expect("the admin listener");
    let deps = |status: &serde_json::Value, name: &str| -> Option<serde_json::Value> {
        status["dependencies"]
            .as_array()?
            .iter()
            .find(|d| d["name"] == name)
            .cloned()
    };
    // Remote endpoints are probed every few seconds: wait for a round after the keys loaded.
    let mut last = serde_json::Value::Null;
    for _ in 0..200 {
        last = http()
            .get(format!("{}/console/api/status", console.base))
            .header("cookie", &console.cookie)
            .send()
            .await
            .expect("status")
            .json()
            .await
            .expect("status json");
        let dev_up = deps(&last, "idp:dev").is_some_and(|d| d["up"] == true);
        if dev_up && deps(&last, "idp:offline").is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let dev = deps(&last, "idp:dev").unwrap_or_else(|| panic!("no idp:dev in {last}"));
    let offline = deps(&last, "idp:offline").unwrap_or_else(|| panic!("no idp:offline in {last}"));
    assert_eq!(dev["up"], true, "{dev}");
    assert!(
        dev["detail"].as_str().unwrap_or("").contains("key(s)"),
        "{dev}"
    );
    assert_eq!(offline["up"], false, "{offline}");
    assert!(
        offline["detail"]
            .as_str()
            .unwrap_or("")
            .contains("no keys loaded"),
        "{offline}"
    );
    // And aegis is, rightly, not ready: an issuer it was told to trust has no keys.
    assert_eq!(last["ready"], false, "{last}");
}
