//! Clusters and command execution, AI/BI dashboards and Delta Sharing through the real Envoy and
//! aegis, driven by the official `databricks-sdk` (tests/python/sdk_compute.py,
//! sdk_sharing.py) as users with and without permission. Databricks (the sandbox) decides who
//! may see, start, attach and change what; aegis refuses what an agent must not do before it
//! reaches the workspace: permission changes (the agent-safe defaults), SQL that changes
//! permissions sent as a command, and Python, Scala or R unless an operator allows them.

mod support;

use serde_json::{json, Value};
use support::python::run_python;
use support::sql_corpus::{ORDINARY_SQL, PERMISSION_CHANGES};
use support::*;

use sandbox::fixture::{CLUSTER_ADMIN, CLUSTER_ETL, CLUSTER_SHARED};

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v:#}"))
        .iter()
        .map(|s| s.as_str().expect("string").to_string())
        .collect()
}

fn sorted(list: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = list.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

/// A stack whose policy has `extra` (TOML) added to `[policy]`.
async fn start_with_policy(extra: &'static str) -> Stack {
    start_with(StackOptions::new(AEGIS_BIN).with_config(move |c| {
        let policy = c
            .entry("policy")
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .expect("policy");
        let add: toml::Table = toml::from_str(extra).expect("policy toml");
        for (k, v) in add {
            policy.insert(k, v);
        }
    }))
    .await
}

fn token_as(stack: &Stack, user: &str, agent: &str) -> String {
    let mut req = TokenRequest::new(user);
    req.agent = agent.to_string();
    stack.sandbox.mint_idp_token(&req)
}

async fn sdk_clusters(stack: &Stack, token: &str) -> Value {
    let mut args = vec![stack.envoy_url(), "clusters".to_string()];
    args.extend([CLUSTER_SHARED, CLUSTER_ETL, CLUSTER_ADMIN].map(str::to_string));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_python("sdk_compute.py", &args, &[("SDK_TOKEN", token)]).await;
    eprintln!("clusters: {out:#}");
    out
}

/// Runs `commands` in one execution context on `cluster` in `language`.
async fn sdk_commands(
    stack: &Stack,
    token: &str,
    cluster: &str,
    language: &str,
    commands: &[&str],
) -> Value {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("commands.json");
    std::fs::write(&file, serde_json::to_vec(commands).expect("json")).expect("write");
    let out = run_python(
        "sdk_compute.py",
        &[
            &stack.envoy_url(),
            "commands",
            cluster,
            language,
            file.to_str().expect("path"),
        ],
        &[("SDK_TOKEN", token)],
    )
    .await;
    eprintln!("commands {language} on {cluster}: {out:#}");
    out
}

fn table(v: &Value) -> Vec<Vec<Value>> {
    assert_eq!(v["status"], "Finished", "{v:#}");
    assert_eq!(v["result_type"], "table", "{v:#}");
    v["data"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| r.as_array().expect("row").clone())
        .collect()
}

fn error_result(v: &Value, needle: &str) {
    assert_eq!(v["status"], "Finished", "{v:#}");
    assert_eq!(v["result_type"], "error", "{v:#}");
    let cause = v["cause"].as_str().unwrap_or("");
    assert!(cause.contains(needle), "expected {needle:?} in {cause:?}");
}

fn sdk_error(v: &Value, kind: &str, needle: &str) {
    assert_eq!(v["error"], kind, "{v:#}");
    let msg = v["message"].as_str().unwrap_or("");
    assert!(msg.contains(needle), "expected {needle:?} in {msg:?}");
}

/// The SDK's error for an aegis `statement_blocked` deny (the 1.2-style `error` field is what
/// the SDK shows; it appends its own config summary).
fn statement_blocked(v: &Value) {
    assert_eq!(v["error"], "PermissionDenied", "{v:#}");
    let msg = v["message"].as_str().unwrap_or("");
    assert!(msg.starts_with("statement_blocked"), "{v:#}");
}

/// Workspace requests with this action, in order.
fn actions(stack: &Stack, action: &str) -> Vec<RequestRecord> {
    stack
        .sandbox
        .requests()
        .into_iter()
        .filter(|r| r.action == action)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusters_and_commands_follow_the_cluster_acls() {
    let stack = start().await;
    let (alice, bob, carol) = (
        token(&stack, "alice"),
        token(&stack, "bob"),
        token(&stack, "carol"),
    );
    let queries = [
        "SELECT region, COUNT(*) AS n FROM main.sales.orders GROUP BY region ORDER BY region",
        "SELECT order_id, customer_email FROM main.sales.orders ORDER BY order_id LIMIT 1",
        "SELECT employee FROM main.hr.salaries",
    ];

    // alice (analysts) may attach to the shared cluster and the ETL one, but start neither.
    let a = sdk_clusters(&stack, &alice).await;
    assert_eq!(strings(&a["list"]), sorted(&[CLUSTER_SHARED, CLUSTER_ETL]));
    assert_eq!(a["get"][CLUSTER_SHARED]["state"], "RUNNING");
    sdk_error(&a["get"][CLUSTER_ADMIN], "PermissionDenied", CLUSTER_ADMIN);
    sdk_error(&a["start"][CLUSTER_ETL], "PermissionDenied", "Restart");
    // Her commands run as her: her region only, masked e-mails, no HR.
    let cmds = sdk_commands(&stack, &alice, CLUSTER_SHARED, "sql", &queries).await;
    let r = &cmds["results"];
    assert_eq!(table(&r[0]), vec![vec![json!("EMEA"), json!(3)]]);
    assert_eq!(table(&r[1]), vec![vec![json!(1), json!("***")]]);
    error_result(&r[2], "INSUFFICIENT_PERMISSIONS");

    // bob holds nothing on the shared cluster: not listed, and refused attaching with the
    // 1.2 API's error; he may restart the ETL cluster, and then attach to it.
    let b = sdk_clusters(&stack, &bob).await;
    assert_eq!(strings(&b["list"]), sorted(&[CLUSTER_ETL]));
    sdk_error(
        &b["get"][CLUSTER_SHARED],
        "PermissionDenied",
        CLUSTER_SHARED,
    );
    assert_eq!(b["start"][CLUSTER_ETL], "RUNNING", "{b:#}");
    let refused = sdk_commands(&stack, &bob, CLUSTER_SHARED, "sql", &queries).await;
    sdk_error(
        &refused["context"],
        "PermissionDenied",
        &format!("You do not have permission to attach to cluster {CLUSTER_SHARED}"),
    );
    let bobs = [
        "SELECT region, orders FROM main.sales.region_totals ORDER BY region",
        queries[0],
    ];
    let cmds = sdk_commands(&stack, &bob, CLUSTER_ETL, "sql", &bobs).await;
    let r = &cmds["results"];
    assert_eq!(table(&r[0]), vec![vec![json!("AMER"), json!(3)]]);
    error_result(
        &r[1],
        "User does not have SELECT on Table 'main.sales.orders'",
    );

    // carol (admins) sees and may do everything; her rows are unmasked.
    let c = sdk_clusters(&stack, &carol).await;
    assert_eq!(
        strings(&c["list"]),
        sorted(&[CLUSTER_SHARED, CLUSTER_ETL, CLUSTER_ADMIN])
    );
    let cmds = sdk_commands(&stack, &carol, CLUSTER_ADMIN, "sql", &queries).await;
    let r = &cmds["results"];
    assert_eq!(table(&r[0]).len(), 3);
    assert_eq!(
        table(&r[1]),
        vec![vec![json!(1), json!("anna@example.org")]]
    );
    assert_eq!(table(&r[2]).len(), 3);

    // Every call reached the workspace as its user, with the user's own token, and the
    // workspace's refusals came from the workspace (aegis allowed them).
    let seen: Vec<RequestRecord> = stack
        .sandbox
        .requests()
        .into_iter()
        .filter(|r| r.service == "clusters" || r.service == "commandExecution")
        .collect();
    assert!(seen
        .iter()
        .all(|r| r.authorization_kind == "databricks_token"));
    for (action, status) in [
        ("createContext", 403),
        ("createContext", 200),
        ("executeCommand", 200),
        ("start", 403),
        ("start", 200),
        ("getCommandStatus", 200),
    ] {
        assert!(
            seen.iter()
                .any(|r| r.action == action && r.status == status),
            "no {action} answered {status}"
        );
    }
    let chain = audit_rows(&stack).await;
    for r in &seen {
        let trace = r.trace_id.as_deref().expect("trace id");
        assert!(
            chain.iter().any(|row| row["trace_id"] == trace
                && row["decision"] == "ALLOW"
                && row["user_name"].as_str() == r.user.as_deref()),
            "no ALLOW row for {r:?}"
        );
    }
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_execution_refuses_permission_changes_and_code_unless_allowed() {
    let stack = start_with_policy(
        r#"allow_commands = [ { agents = ["notebook-bot"], workspaces = ["sandbox"] } ]"#,
    )
    .await;
    assert!(PERMISSION_CHANGES.len() >= 40 && ORDINARY_SQL.len() >= 40);
    let copilot = token_as(&stack, "alice", "copilot");

    // Every spelling of a permission change, as a SQL command: refused by aegis, none reaches
    // the workspace.
    let before = actions(&stack, "executeCommand").len();
    let out = sdk_commands(&stack, &copilot, CLUSTER_SHARED, "sql", PERMISSION_CHANGES).await;
    assert_eq!(out["context"]["status"], "Running", "{out:#}");
    let results = out["results"].as_array().expect("results");
    assert_eq!(results.len(), PERMISSION_CHANGES.len());
    for (sql, r) in PERMISSION_CHANGES.iter().zip(results) {
        eprintln!("refused: {sql:?}");
        statement_blocked(r);
    }
    assert_eq!(
        actions(&stack, "executeCommand").len(),
        before,
        "a refused command reached the workspace"
    );
    let blocked = stack
        .postgres
        .query_json(
            "SELECT statement_kind, length(statement_fp) AS fp_len FROM aegis_audit \
             WHERE reason = 'statement_blocked' AND path = '/api/1.2/commands/execute'",
        )
        .await
        .expect("rows");
    assert_eq!(blocked.len(), PERMISSION_CHANGES.len());
    assert!(blocked
        .iter()
        .all(|r| r["statement_kind"] != "" && r["fp_len"] == 32));
    assert!(blocked.iter().any(|r| r["statement_kind"] == "dcl"));

    // The control: ordinary SQL through the same client, cluster and context kind passes and
    // is answered by the workspace (which runs queries and refuses the rest itself).
    let out = sdk_commands(&stack, &copilot, CLUSTER_SHARED, "sql", ORDINARY_SQL).await;
    let results = out["results"].as_array().expect("results");
    for (sql, r) in ORDINARY_SQL.iter().zip(results) {
        assert_eq!(r["status"], "Finished", "{sql:?}: {r:#}");
    }
    assert_eq!(
        actions(&stack, "executeCommand").len(),
        before + ORDINARY_SQL.len()
    );
    let first = &results[0];
    assert_eq!(table(first).len(), 3, "alice's rows only");

    // Python is code that can issue any SQL: refused for copilot, allowed for the agent the
    // operator named (same user, same cluster), and then it runs.
    let python = [
        "1 + 1",
        "display(spark.sql('SELECT COUNT(*) AS n FROM main.sales.orders'))",
    ];
    let refused = sdk_commands(&stack, &copilot, CLUSTER_SHARED, "python", &python).await;
    for r in refused["results"].as_array().expect("results") {
        statement_blocked(r);
    }
    let bot = token_as(&stack, "alice", "notebook-bot");
    let allowed = sdk_commands(&stack, &bot, CLUSTER_SHARED, "python", &python).await;
    let r = &allowed["results"];
    assert_eq!(r[0]["status"], "Finished", "{allowed:#}");
    assert_eq!(r[0]["result_type"], "text");
    assert_eq!(r[0]["data"], "2");
    assert_eq!(
        table(&r[1]),
        vec![vec![json!(3)]],
        "still only alice's rows"
    );
    // Scala for copilot: refused too.
    let scala = sdk_commands(&stack, &copilot, CLUSTER_SHARED, "scala", &["1 + 1"]).await;
    statement_blocked(&scala["results"][0]);

    // The ledger: allowed commands carry their kind and fingerprint, never the text.
    let rows = stack
        .postgres
        .query_json(
            "SELECT decision, agent, statement_kind, length(statement_fp) AS fp_len \
             FROM aegis_audit WHERE path = '/api/1.2/commands/execute' ORDER BY seq",
        )
        .await
        .expect("rows");
    assert!(rows
        .iter()
        .all(|r| r["statement_kind"] != "" && r["fp_len"] == 32));
    assert!(rows.iter().any(|r| r["decision"] == "ALLOW"
        && r["agent"] == "notebook-bot"
        && r["statement_kind"] == "unknown"));
    assert!(rows.iter().any(|r| r["decision"] == "DENY"
        && r["agent"] == "copilot"
        && r["statement_kind"] == "unknown"));

    // A command sent some other way than JSON with one language is refused unread.
    let resp = read(
        http()
            .post(format!("{}/api/1.2/commands/execute", stack.envoy_url()))
            .bearer_auth(&copilot)
            .header("content-type", "application/json")
            .body(format!(
                r#"{{"clusterId": "{CLUSTER_SHARED}", "contextId": "1", "language": "sql", "command": "SELECT 1", "language": "python"}}"#
            ))
            .send()
            .await
            .expect("request"),
    )
    .await;
    assert_eq!(resp.status, 403, "{}", resp.text);
    assert_eq!(resp.body["error"], "statement_blocked");
    stack.shutdown().await;
}
