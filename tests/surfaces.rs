//! Every Databricks surface an agent uses, through the real Envoy and aegis (with real Redis and
//! PostgreSQL), driven by the clients agents really use: the official Python `databricks-sdk`
//! and the official `mcp` SDK (scripts in tests/python/, run from the repo's .venv, which
//! `scripts/bootstrap.sh` creates). Each user sees exactly what the workspace's grants allow;
//! the denials come from the workspace, and the agent-safe policy stops what must never reach
//! it.

mod support;

use serde_json::{json, Value};
use support::python::run_python;
use support::sql_corpus::{ORDINARY_SQL, PERMISSION_CHANGES};
use support::*;

async fn sdk_as(stack: &Stack, user: &str) -> Value {
    let token = token(stack, user);
    let out = run_python(
        "sdk_surfaces.py",
        &[
            &stack.envoy_url(),
            sandbox::WAREHOUSE_ID,
            sandbox::fixture::GENIE_SALES_SPACE,
            sandbox::fixture::GENIE_HR_SPACE,
        ],
        &[("SDK_TOKEN", &token)],
    )
    .await;
    eprintln!("{user}: {out:#}");
    out
}

fn rows(v: &Value) -> Vec<Vec<String>> {
    assert_eq!(v["state"], "SUCCEEDED", "{v:#}");
    support::python::rows_of(v)
}

fn failed_with(v: &Value, needle: &str) {
    assert_eq!(v["state"], "FAILED", "{v:#}");
    let msg = v["error"].as_str().unwrap_or("");
    assert!(msg.contains(needle), "expected {needle:?} in {msg:?}");
}

fn sdk_error(v: &Value, kind: &str) {
    assert_eq!(v["error"], kind, "{v:#}");
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v:#}"))
        .iter()
        .map(|s| s.as_str().expect("string").to_string())
        .collect()
}

fn s(list: &[&str]) -> Vec<String> {
    list.iter().map(|x| x.to_string()).collect()
}

/// Audit rows with the columns the correlation checks need.
async fn chain_rows(stack: &Stack) -> Vec<Value> {
    stack
        .postgres
        .query_json(
            "SELECT seq, decision, reason, user_name, method, path, trace_id, actor_chain \
             FROM aegis_audit ORDER BY seq",
        )
        .await
        .expect("read audit rows")
}

/// Whether the workspace got this request from an agent through Envoy, rather than from aegis
/// itself (token exchanges, reachability probes: user agent `aegis/<version>`, no trace id).
fn through_envoy(r: &RequestRecord) -> bool {
    let own = r.trace_id.is_none() && r.user_agent.as_deref().unwrap_or("").starts_with("aegis/");
    r.service != "oauth2" && !own
}

/// For every ALLOW in the chain the workspace logged a request with the same trace id and
/// user, and every request the workspace logged (other than aegis' own token exchanges) has
/// its ALLOW row.
async fn assert_correlated(stack: &Stack) -> usize {
    let (allows, _) = assert_allows_joined(stack, |_| true, through_envoy).await;
    assert!(allows > 0);
    allows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_databricks_sdk_sees_what_each_users_grants_allow() {
    let stack = start().await;
    let alice = sdk_as(&stack, "alice").await;
    let bob = sdk_as(&stack, "bob").await;
    let carol = sdk_as(&stack, "carol").await;

    // Who Databricks thinks is calling.
    for (who, out) in [("alice", &alice), ("bob", &bob), ("carol", &carol)] {
        assert_eq!(out["me"]["user_name"], format!("{who}@example.com"));
    }

    // SQL on a table: row filter (per group) and column mask.
    let a = rows(&alice["orders"]);
    assert_eq!(a.len(), 3);
    assert!(a.iter().all(|r| r[1] == "EMEA" && r[2] == "***"), "{a:?}");
    let c = rows(&carol["orders"]);
    assert_eq!(c.len(), 8);
    assert_eq!(c[0][2], "anna@example.org");
    failed_with(
        &bob["orders"],
        "User does not have SELECT on Table 'main.sales.orders'",
    );

    // A view: bob may read it without SELECT on its table, and still only his region's rows.
    assert_eq!(rows(&bob["view"]), vec![s(&["AMER", "3"])]);
    assert_eq!(rows(&carol["view"]).len(), 3);
    failed_with(
        &alice["view"],
        "User does not have SELECT on Table 'main.sales.region_totals'",
    );

    // The federated catalog: per-group grant, per-user row filter.
    let fed = rows(&alice["federated"]);
    assert_eq!(fed.len(), 3, "{fed:?}");
    assert!(fed.iter().all(|r| r[1] == "alice@example.com"), "{fed:?}");
    assert_eq!(rows(&carol["federated"]).len(), 5);
    failed_with(
        &bob["federated"],
        "User does not have USE CATALOG on Catalog 'snowflake_fed'",
    );
    failed_with(
        &alice["hr"],
        "User does not have USE SCHEMA on Schema 'main.hr'",
    );
    assert_eq!(rows(&carol["hr"]).len(), 3);

    // Submit, poll, fetch a chunk, cancel.
    for out in [&alice, &carol] {
        let poll = &out["poll"];
        assert_eq!(poll["final"]["state"], "SUCCEEDED", "{poll:#}");
        let n = rows(&poll["final"]).len();
        assert_eq!(poll["chunk_rows"].as_array().map(Vec::len), Some(n));
        assert_eq!(out["cancel"], "CANCELED");
    }
    assert_eq!(alice["poll"]["chunk_rows"][0][0], "1");
    assert_eq!(bob["cancel"], "CANCELED");

    // Unity Catalog listings.
    assert_eq!(
        strings(&alice["uc"]["catalogs"]),
        s(&["main", "snowflake_fed"])
    );
    assert_eq!(strings(&alice["uc"]["schemas"]["main"]), s(&["main.sales"]));
    assert_eq!(
        strings(&alice["uc"]["tables"]["main.sales"]),
        s(&["main.sales.orders:MANAGED"])
    );
    assert_eq!(
        strings(&alice["uc"]["tables"]["snowflake_fed.analytics"]),
        s(&["snowflake_fed.analytics.web_events:FOREIGN"])
    );
    assert_eq!(strings(&bob["uc"]["catalogs"]), s(&["main"]));
    assert_eq!(
        strings(&bob["uc"]["tables"]["main.sales"]),
        s(&["main.sales.region_totals:VIEW"])
    );
    assert_eq!(
        strings(&carol["uc"]["schemas"]["main"]),
        s(&["main.default", "main.hr", "main.sales"])
    );
    assert_eq!(
        strings(&carol["uc"]["tables"]["main.sales"]),
        s(&["main.sales.orders:MANAGED", "main.sales.region_totals:VIEW"])
    );
    // Effective permissions: a non-owner sees only what reaches them.
    assert_eq!(
        strings(&alice["effective"]),
        s(&[
            "alice@example.com:SELECT:",
            "alice@example.com:USE_CATALOG:main",
            "alice@example.com:USE_SCHEMA:main.sales",
        ])
    );
    assert!(strings(&carol["effective"]).contains(&"admins:ALL_PRIVILEGES:main".to_string()));

    // Genie answers with the asking user's data.
    let g = &alice["genie"];
    assert_eq!(g["status"], "COMPLETED", "{g:#}");
    assert_eq!(
        rows(&g["queries"][0]["result"]),
        vec![s(&["EMEA", "3", "505.75"])]
    );
    let g = &carol["genie"];
    assert_eq!(rows(&g["queries"][0]["result"]).len(), 3);
    let g = &bob["genie"];
    assert_eq!(g["status"], "FAILED", "{g:#}");
    assert!(
        g["error"]
            .as_str()
            .unwrap_or("")
            .contains("INSUFFICIENT_PERMISSIONS"),
        "{g:#}"
    );
    failed_with(&g["queries"][0]["result"], "INSUFFICIENT_PERMISSIONS");
    sdk_error(&alice["genie_other"], "PermissionDenied");
    assert_eq!(carol["genie_other"]["status"], "COMPLETED");

    // Workspace objects and notebook ACLs.
    let ws = &alice["workspace"];
    assert_eq!(strings(&ws["users_dir"]), s(&["/Users/alice@example.com"]));
    assert_eq!(
        strings(&ws["alice_home"]),
        s(&[
            "/Users/alice@example.com/churn_analysis",
            "/Users/alice@example.com/private_notes"
        ])
    );
    assert_eq!(strings(&ws["shared"]), s(&["/Shared/team_queries"]));
    assert_eq!(ws["alice_private"], "NOTEBOOK");
    let ws = &bob["workspace"];
    assert_eq!(strings(&ws["users_dir"]), s(&["/Users/bob@example.com"]));
    sdk_error(&ws["alice_home"], "PermissionDenied");
    sdk_error(&ws["alice_private"], "PermissionDenied");
    assert_eq!(ws["alice_shared"], "NOTEBOOK", "shared with bob");
    let ws = &carol["workspace"];
    assert_eq!(strings(&ws["users_dir"]).len(), 3);
    assert_eq!(
        ws["alice_private"], "NOTEBOOK",
        "workspace admins see everything"
    );
    assert_eq!(
        strings(&ws["shared"]),
        s(&["/Shared/finance", "/Shared/team_queries"])
    );

    // Every call reached Databricks as the user with their own token, and joins its chain row.
    let requests = stack.sandbox.requests();
    for r in requests.iter().filter(|r| through_envoy(r)) {
        assert_eq!(r.authorization_kind, "databricks_token", "{r:?}");
        let ua = r.user_agent.as_deref().unwrap_or("");
        assert!(ua.contains("databricks-sdk-py/"), "{ua}");
    }
    for service in ["accounts", "sql", "unityCatalog", "aibiGenie", "workspace"] {
        assert!(
            requests
                .iter()
                .any(|r| r.service == service && r.status == 200),
            "no successful {service} request in the workspace audit log"
        );
    }
    let allows = assert_correlated(&stack).await;
    assert!(allows >= 60, "only {allows} allowed requests");
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_clients_get_per_user_answers_and_discover_the_idp() {
    let stack = start().await;
    let base = stack.envoy_url();
    let sql_url = format!("{base}/api/2.0/mcp/sql");
    let query = json!({"query": "SELECT region, COUNT(*) AS n FROM main.sales.orders GROUP BY region ORDER BY region"}).to_string();

    let mcp = |user: &'static str, url: String, tool: String, args: String| {
        let token = token(&stack, user);
        async move {
            let out = run_python(
                "mcp_client.py",
                &["call", &url, &tool, &args],
                &[("MCP_TOKEN", &token)],
            )
            .await;
            eprintln!("mcp {user} {url}: {out:#}");
            out
        }
    };
    let payload = |out: &Value| -> Value {
        let texts = strings(&out["texts"]);
        serde_json::from_str(texts.last().expect("a text result")).expect("json text")
    };

    // The DBSQL server: same tool, same query, each user's own rows.
    let alice = mcp(
        "alice",
        sql_url.clone(),
        "execute_sql".into(),
        query.clone(),
    )
    .await;
    assert_eq!(strings(&alice["tools"]), s(&["execute_sql"]));
    assert_eq!(alice["is_error"], false, "{alice:#}");
    assert_eq!(payload(&alice)["rows"], json!([["EMEA", "3"]]));
    let carol = mcp(
        "carol",
        sql_url.clone(),
        "execute_sql".into(),
        query.clone(),
    )
    .await;
    assert_eq!(
        payload(&carol)["rows"],
        json!([["AMER", "3"], ["APAC", "2"], ["EMEA", "3"]])
    );
    let bob = mcp("bob", sql_url.clone(), "execute_sql".into(), query.clone()).await;
    assert_eq!(bob["is_error"], true);
    assert!(payload(&bob)["error"]["message"]
        .as_str()
        .unwrap_or("")
        .contains("INSUFFICIENT_PERMISSIONS"));

    // Unity Catalog functions: the tool list is what the caller may EXECUTE; masks still apply.
    let fn_url = format!("{base}/api/2.0/mcp/functions/main/sales");
    let tool = "main__sales__orders_in_region".to_string();
    let args = json!({"region_name": "EMEA"}).to_string();
    let alice = mcp("alice", fn_url.clone(), tool.clone(), args.clone()).await;
    assert_eq!(strings(&alice["tools"]), vec![tool.clone()]);
    let got = payload(&alice);
    assert_eq!(got["rows"].as_array().map(Vec::len), Some(3), "{got:#}");
    assert_eq!(got["rows"][0][2], "***");
    let carol = mcp("carol", fn_url, tool, args).await;
    assert_eq!(payload(&carol)["rows"][0][2], "anna@example.org");

    // Genie through MCP.
    let genie_url = format!(
        "{base}/api/2.0/mcp/genie/{}",
        sandbox::fixture::GENIE_SALES_SPACE
    );
    let genie_tool = format!("query_space_{}", sandbox::fixture::GENIE_SALES_SPACE);
    let q = json!({"query": "orders by region"}).to_string();
    let alice = mcp("alice", genie_url, genie_tool, q).await;
    assert_eq!(payload(&alice)["rows"], json!([["EMEA", "3", "505.75"]]));

    // No token: aegis refuses with a challenge naming its RFC 9728 metadata, and the MCP SDK's
    // discovery finds the IdP there.
    let found = run_python("mcp_client.py", &["discover", &sql_url], &[]).await;
    assert_eq!(found["status"], 401, "{found:#}");
    assert_eq!(found["error"], "missing_credentials");
    let metadata_url = format!("{base}/.well-known/oauth-protected-resource/api/2.0/mcp/sql");
    assert_eq!(found["resource_metadata"], metadata_url.as_str());
    assert_eq!(found["resource"], sql_url.as_str());
    assert_eq!(
        strings(&found["authorization_servers"])
            .iter()
            .map(|s| s.trim_end_matches('/'))
            .collect::<Vec<_>>(),
        vec![stack.sandbox.idp_url.as_str()]
    );
    // The root document too; and a 401 elsewhere carries no resource_metadata.
    let root = get(&stack, "/.well-known/oauth-protected-resource", None).await;
    assert_eq!(root.status, 200, "{}", root.text);
    assert_eq!(root.body["resource"], base.as_str());
    let plain = get(&stack, "/api/2.0/sql/warehouses", None).await;
    assert_eq!(plain.status, 401);
    assert!(!plain
        .header("www-authenticate")
        .unwrap_or("")
        .contains("resource_metadata"));

    // MCP traffic is in the workspace's audit log under Databricks-like action names.
    let actions: Vec<String> = stack
        .sandbox
        .requests()
        .into_iter()
        .filter(|r| r.service == "mcp")
        .map(|r| r.action)
        .collect();
    for a in ["initialize", "listTools", "callTool"] {
        assert!(
            actions.iter().any(|x| x == a),
            "{a} missing from {actions:?}"
        );
    }
    assert_correlated(&stack).await;
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_safe_policy_stops_dangerous_calls_before_databricks() {
    let stack = start().await;
    let alice = token(&stack, "alice");
    let client = http();
    let base = stack.envoy_url();

    let blocked: &[(&str, &str)] = &[
        ("POST", "/api/2.0/token/create"),
        ("GET", "/api/2.0/token-management/tokens"),
        (
            "PATCH",
            "/api/2.1/unity-catalog/permissions/table/main.sales.orders",
        ),
        ("PATCH", "/api/2.0/permissions/notebooks/1000000000001"),
        ("GET", "/api/2.0/secrets/get?scope=prod&key=db-password"),
        ("POST", "/api/2.0/preview/scim/v2/Users"),
        // Re-spellings that Databricks would route to the same handler.
        ("POST", "//api/2.0/token/create"),
        ("POST", "/api/2.0/./token/create"),
        ("POST", "/api/2.0/jobs/../token/create"),
        ("POST", "/api/2.0/%74oken/create"),
        ("POST", "/API/2.0/TOKEN/CREATE"),
        ("POST", "/api/2.0/token/create/"),
        ("POST", "/api/2.0/token/create;x=1"),
        ("POST", "/api/2.0/%252e/token/create"),
        ("GET", "/api/2.0/secrets%2Fget?scope=prod&key=db-password"),
        (
            "PATCH",
            "/api/2.1/unity-catalog/Permissions/table/main.sales.orders",
        ),
    ];
    let before = stack.sandbox.requests().len();
    for (method, path) in blocked {
        let resp = read(
            client
                .request(method.parse().expect("method"), format!("{base}{path}"))
                .bearer_auth(&alice)
                .json(&json!({"lifetime_seconds": 7776000, "changes": []}))
                .send()
                .await
                .expect("request through envoy"),
        )
        .await;
        assert_eq!(resp.status, 403, "{method} {path}: {}", resp.text);
        assert_eq!(resp.body["error"], "path_blocked", "{method} {path}");
        assert_eq!(
            resp.body.as_object().map(|o| o.len()),
            Some(3),
            "deny bodies carry only the reason, a message and the trace id"
        );
    }
    let leaked: Vec<RequestRecord> = stack.sandbox.requests().into_iter().skip(before).collect();
    assert!(
        leaked.is_empty(),
        "the workspace saw blocked calls: {leaked:#?}"
    );
    let chain = chain_rows(&stack).await;
    let denied = chain
        .iter()
        .filter(|r| r["reason"] == "path_blocked" && r["user_name"] == "alice@example.com")
        .count();
    assert_eq!(denied, blocked.len());

    // Reading grants is fine; the sandbox answers (and shows alice only her own).
    let resp = get(
        &stack,
        "/api/2.1/unity-catalog/permissions/table/main.sales.orders",
        Some(&alice),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text);
    assert_eq!(
        resp.body["privilege_assignments"],
        json!([{"principal": "alice@example.com", "privileges": ["SELECT"]}])
    );

    // An RFC 8693 delegation chain is recorded with the decision.
    let mut req = TokenRequest::new("alice");
    req.extra_claims.insert(
        "act".into(),
        json!({"sub": "copilot-studio", "act": {"sub": "contoso-orchestrator"}}),
    );
    let delegated = stack.sandbox.mint_idp_token(&req);
    let resp = get(&stack, "/api/2.0/preview/scim/v2/Me", Some(&delegated)).await;
    assert_eq!(resp.status, 200, "{}", resp.text);
    let trace = resp.trace_id();
    let chain = chain_rows(&stack).await;
    let row = chain
        .iter()
        .find(|r| r["trace_id"] == trace.as_str())
        .expect("the chain row");
    assert_eq!(row["actor_chain"], "copilot-studio > contoso-orchestrator");
    assert_eq!(row["user_name"], "alice@example.com");
    // A malformed act claim is refused outright.
    let mut req = TokenRequest::new("alice");
    req.extra_claims.insert("act".into(), json!("copilot"));
    let bad = stack.sandbox.mint_idp_token(&req);
    let resp = get(&stack, "/api/2.0/preview/scim/v2/Me", Some(&bad)).await;
    assert_eq!(resp.status, 401, "{}", resp.text);
    assert_eq!(resp.body["error"], "invalid_token");

    assert_correlated(&stack).await;
    stack.shutdown().await;
}

// === The statement guardrail: SQL that changes permissions ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_cannot_change_permissions_through_sql() {
    let stack = start().await;
    let alice = token(&stack, "alice");
    assert!(PERMISSION_CHANGES.len() >= 40 && ORDINARY_SQL.len() >= 40);
    let reached = |trace: &str| {
        stack
            .sandbox
            .requests()
            .iter()
            .any(|r| r.trace_id.as_deref() == Some(trace))
    };

    for sql_text in PERMISSION_CHANGES {
        let r = sql(&stack, &alice, sql_text).await;
        assert_eq!(r.status, 403, "{sql_text:?}: {}", r.text);
        assert_eq!(
            r.body["error"], "statement_blocked",
            "{sql_text:?}: {}",
            r.text
        );
        assert_eq!(r.body["trace_id"].as_str(), Some(r.trace_id().as_str()));
        assert!(
            !reached(&r.trace_id()),
            "{sql_text:?} reached the workspace"
        );
    }
    let mut reached_count = 0;
    for sql_text in ORDINARY_SQL {
        let r = sql(&stack, &alice, sql_text).await;
        assert_ne!(
            r.body["error"], "statement_blocked",
            "{sql_text:?}: {}",
            r.text
        );
        assert!(
            reached(&r.trace_id()),
            "{sql_text:?} did not reach the workspace: {}",
            r.text
        );
        reached_count += 1;
    }
    // The refusals are in the chain with their reason.
    let rows = stack
        .postgres
        .query_json(
            "SELECT count(*)::bigint AS n FROM aegis_audit WHERE reason = 'statement_blocked'",
        )
        .await
        .expect("count");
    assert_eq!(rows[0]["n"], PERMISSION_CHANGES.len());
    // Each row says what kind of SQL it was and its fingerprint (never the text).
    let kinds = stack
        .postgres
        .query_json(
            "SELECT decision, statement_kind, length(statement_fp) AS fp_len, \
             position('GRANT' in path) AS in_path FROM aegis_audit \
             WHERE path = '/api/2.0/sql/statements'",
        )
        .await
        .expect("kinds");
    assert!(kinds.iter().all(|r| r["statement_kind"] != ""), "{kinds:?}");
    assert!(kinds
        .iter()
        .filter(|r| r["decision"] == "ALLOW")
        .all(|r| r["fp_len"] == 32 && r["statement_kind"] != "dcl"));
    assert!(kinds
        .iter()
        .any(|r| r["decision"] == "DENY" && r["statement_kind"] == "dcl"));
    let texts = stack
        .postgres
        .query_json("SELECT count(*)::bigint AS n FROM aegis_audit WHERE path LIKE '%GRANT%' OR reason LIKE '%GRANT%'")
        .await
        .expect("no text");
    assert_eq!(texts[0]["n"], 0);
    // Nor in its own column: the text is kept only when the operator turns it on.
    let kept = stack
        .postgres
        .query_json("SELECT count(*)::bigint AS n FROM aegis_audit WHERE statement_text <> ''")
        .await
        .expect("no statement text");
    assert_eq!(kept[0]["n"], 0);

    // A body over Envoy's bound is refused there, never passed on unread.
    let huge = format!("SELECT '{}'", "x".repeat(300 * 1024));
    let r = sql(&stack, &alice, &huge).await;
    assert_eq!(r.status, 413, "{}", r.text);
    eprintln!(
        "statement guardrail: {} permission changes refused, {reached_count} ordinary statements passed",
        PERMISSION_CHANGES.len()
    );
    stack.shutdown().await;
}

/// With `audit.record_statement_text` on, the row keeps what the agent sent, refused or not,
/// under the MAC like every other field: the binary's verify, and an edit of the text, say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_statement_text_is_kept_when_the_operator_asks_and_is_chained() {
    let stack = start_with(StackOptions::new(AEGIS_BIN).with_config(|c| {
        let audit = c
            .get_mut("audit")
            .and_then(|v| v.as_table_mut())
            .expect("[audit]");
        audit.insert("record_statement_text".into(), true.into());
    }))
    .await;
    let alice = token(&stack, "alice");
    let grant = "GRANT SELECT ON TABLE main.sales.orders TO `mallory`";
    let select = "SELECT order_id -- a comment is kept too\nFROM main.sales.orders LIMIT 1";
    let long = format!("SELECT '{}' AS padding", "é".repeat(10_000));
    let refused = sql(&stack, &alice, grant).await;
    assert_eq!(
        refused.body["error"], "statement_blocked",
        "{}",
        refused.text
    );
    let allowed = sql(&stack, &alice, select).await;
    assert_eq!(allowed.status, 200, "{}", allowed.text);
    let padded = sql(&stack, &alice, &long).await;
    assert_ne!(padded.body["error"], "statement_blocked", "{}", padded.text);

    let text_of = |trace: String| {
        let pg = &stack.postgres;
        async move {
            let rows = pg
                .query_json(&format!(
                    "SELECT decision, statement_kind, statement_text FROM aegis_audit \
                     WHERE trace_id = '{trace}'"
                ))
                .await
                .expect("row");
            assert_eq!(rows.len(), 1, "{rows:?}");
            rows[0].clone()
        }
    };
    let row = text_of(refused.trace_id()).await;
    assert_eq!(row["decision"], "DENY");
    assert_eq!(row["statement_kind"], "dcl");
    assert_eq!(row["statement_text"], grant);
    let row = text_of(allowed.trace_id()).await;
    assert_eq!(row["decision"], "ALLOW");
    assert_eq!(row["statement_text"], select);
    // Cut at 16 KiB, on a character boundary (é is two bytes).
    let row = text_of(padded.trace_id()).await;
    let kept = row["statement_text"].as_str().expect("text");
    assert!(long.starts_with(kept) && kept.len() <= 16 * 1024 && kept.len() > 16 * 1024 - 4);

    // The text is under the MAC: intact as written, tamper once edited.
    let config = stack.config_path().display().to_string();
    let (code, out, err) = aegis(&["audit", "verify", "--config", &config]);
    assert_eq!(code, 0, "{out}{err}");
    let su = stack.postgres.connect_superuser().await.expect("superuser");
    su.batch_execute(&format!(
        "SET session_replication_role = replica; \
         UPDATE aegis_audit SET statement_text = 'SELECT 1' WHERE trace_id = '{}'",
        refused.trace_id()
    ))
    .await
    .expect("edit the text");
    let (code, out, err) = aegis(&["audit", "verify", "--config", &config]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("TAMPERED"), "{out}");
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mcp_sql_tool_refuses_permission_changes_with_a_jsonrpc_error() {
    let stack = start().await;
    let url = format!("{}/api/2.0/mcp/sql", stack.envoy_url());
    let token = token(&stack, "alice");
    let call = |query: &str| {
        let args = json!({ "query": query }).to_string();
        let (url, token) = (url.clone(), token.clone());
        async move {
            run_python(
                "mcp_client.py",
                &["call", &url, "execute_sql", &args],
                &[("MCP_TOKEN", &token)],
            )
            .await
        }
    };
    // Positive control: a query through the same client and tool.
    let ok = call("SELECT region FROM main.sales.orders").await;
    assert_eq!(ok["is_error"], false, "{ok:#}");
    let before = stack.sandbox.requests().len();
    let refused = call("GRANT ALL PRIVILEGES ON CATALOG main TO `account users`").await;
    let err = &refused["jsonrpc_error"];
    assert_eq!(err["data"]["reason"], "statement_blocked", "{refused:#}");
    assert!(err["message"]
        .as_str()
        .unwrap_or("")
        .contains("statement_blocked"));
    let trace = err["data"]["trace_id"]
        .as_str()
        .expect("a trace id")
        .to_string();
    // Nothing of the call reached the workspace; the chain has its DENY row.
    assert!(!stack
        .sandbox
        .requests()
        .iter()
        .skip(before)
        .any(|r| r.trace_id.as_deref() == Some(trace.as_str())));
    let rows = stack
        .postgres
        .query_json(&format!(
            "SELECT decision, reason, path FROM aegis_audit WHERE trace_id = '{trace}'"
        ))
        .await
        .expect("row");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["reason"], "statement_blocked");
    assert_eq!(rows[0]["path"], "/api/2.0/mcp/sql");
    let seen = stack
        .postgres
        .query_json(&format!(
            "SELECT statement_kind, mcp_tool FROM aegis_audit WHERE trace_id = '{trace}'"
        ))
        .await
        .expect("row");
    assert_eq!(seen[0]["statement_kind"], "dcl");
    assert_eq!(seen[0]["mcp_tool"], "execute_sql");
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_tools_are_allowed_or_refused_per_agent() {
    let stack = start_with(StackOptions::new(AEGIS_BIN).with_config(|c| {
        let policy = c
            .entry("policy")
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .expect("policy");
        let rule: toml::Table = toml::from_str(
            r#"server = "/api/2.0/mcp/sql"
tools = ["execute_sql"]
agents = ["joule"]"#,
        )
        .expect("rule");
        policy.insert("tool_deny".into(), vec![toml::Value::Table(rule)].into());
    }))
    .await;
    let url = format!("{}/api/2.0/mcp/sql", stack.envoy_url());
    let args = json!({ "query": "SELECT region FROM main.sales.orders" }).to_string();
    let as_agent = |agent: &str| {
        let mut req = TokenRequest::new("alice");
        req.agent = agent.to_string();
        stack.sandbox.mint_idp_token(&req)
    };
    let call = |token: String| {
        let (url, args) = (url.clone(), args.clone());
        async move {
            run_python(
                "mcp_client.py",
                &["call", &url, "execute_sql", &args],
                &[("MCP_TOKEN", &token)],
            )
            .await
        }
    };
    // The same user, the same tool: copilot may call it (the control), joule may not.
    let copilot = call(as_agent("copilot")).await;
    assert_eq!(copilot["is_error"], false, "{copilot:#}");
    let joule = call(as_agent("joule")).await;
    // joule still initializes and lists the tools; only the call is refused.
    assert_eq!(strings(&joule["tools"]), s(&["execute_sql"]), "{joule:#}");
    let err = &joule["jsonrpc_error"];
    assert_eq!(err["data"]["reason"], "tool_blocked", "{joule:#}");
    let trace = err["data"]["trace_id"]
        .as_str()
        .expect("a trace id")
        .to_string();
    assert!(!stack
        .sandbox
        .requests()
        .iter()
        .any(|r| r.trace_id.as_deref() == Some(trace.as_str())));
    let rows = stack
        .postgres
        .query_json(&format!(
            "SELECT reason, agent FROM aegis_audit WHERE trace_id = '{trace}'"
        ))
        .await
        .expect("row");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["reason"], "tool_blocked");
    assert_eq!(rows[0]["agent"], "joule");
    stack.shutdown().await;
}
