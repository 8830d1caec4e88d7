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

/// Every request the workspace logged under `prefix` carries an aegis trace id whose chain row
/// is an ALLOW for the same user: the workspace's audit joins aegis' ledger.
async fn assert_joined(stack: &Stack, prefix: &str) {
    let chain = audit_rows(stack).await;
    let seen: Vec<RequestRecord> = stack
        .sandbox
        .requests()
        .into_iter()
        .filter(|r| r.path.starts_with(prefix))
        .collect();
    assert!(!seen.is_empty(), "no workspace request under {prefix}");
    for r in &seen {
        let trace = r.trace_id.as_deref().expect("an aegis trace id");
        assert!(
            chain.iter().any(|row| row["trace_id"] == trace
                && row["decision"] == "ALLOW"
                && row["user_name"].as_str() == r.user.as_deref()),
            "no ALLOW row for {r:?}"
        );
    }
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

async fn sdk_sharing(stack: &Stack, token: &str, changes: Value) -> Value {
    let out = run_python(
        "sdk_sharing.py",
        &[&stack.envoy_url(), "sharing", &changes.to_string()],
        &[("SDK_TOKEN", token)],
    )
    .await;
    eprintln!("sharing: {out:#}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shares_follow_ownership_and_metastore_privileges() {
    // Changing a share's grants is an agent-safe default deny; `sharing-admin` is allowed.
    let stack = start_with_policy(
        r#"allow = [ { methods = ["PATCH"], path = "/api/2.1/unity-catalog/shares/*", agents = ["sharing-admin"] } ]"#,
    )
    .await;
    let as_admin_agent = |user: &str| token_as(&stack, user, "sharing-admin");

    // alice owns sales_share and the recipient partner_acme; she holds CREATE_SHARE only.
    let a = sdk_sharing(
        &stack,
        &as_admin_agent("alice"),
        json!([
            ["sales_share", "partner_acme", "add"],
            ["sales_share", "auditor_co", "add"]
        ]),
    )
    .await;
    assert_eq!(strings(&a["shares"]), vec!["sales_share"]);
    assert_eq!(strings(&a["get"]["sales_share"]), vec!["main.sales.orders"]);
    sdk_error(&a["get"]["hr_share"], "PermissionDenied", "USE SHARE");
    assert_eq!(
        strings(&a["permissions"]["sales_share"]),
        Vec::<String>::new()
    );
    assert_eq!(strings(&a["recipients"]), vec!["partner_acme"]);
    assert_eq!(strings(&a["providers"]), Vec::<String>::new());
    // Granting her own recipient works; granting one she does not own does not.
    assert_eq!(strings(&a["changes"][0]), vec!["partner_acme:SELECT"]);
    sdk_error(
        &a["changes"][1],
        "PermissionDenied",
        "not an owner of Recipient 'auditor_co'",
    );

    // bob holds USE_SHARE and USE_RECIPIENT: he reads every share, but may not change one.
    let b = sdk_sharing(
        &stack,
        &as_admin_agent("bob"),
        json!([["sales_share", "partner_acme", "remove"]]),
    )
    .await;
    assert_eq!(strings(&b["shares"]), vec!["hr_share", "sales_share"]);
    assert_eq!(strings(&b["get"]["hr_share"]), vec!["main.hr.salaries"]);
    assert_eq!(
        strings(&b["permissions"]["sales_share"]),
        vec!["partner_acme:SELECT"]
    );
    assert_eq!(strings(&b["recipients"]), Vec::<String>::new());
    assert_eq!(b["recipient"], "alice@example.com");
    sdk_error(&b["changes"][0], "PermissionDenied", "SET SHARE PERMISSION");

    // carol is a metastore admin (admins): everything, and the admins' share is hers to change.
    let c = sdk_sharing(
        &stack,
        &as_admin_agent("carol"),
        json!([["hr_share", "auditor_co", "remove"]]),
    )
    .await;
    assert_eq!(
        strings(&c["recipients"]),
        vec!["auditor_co", "partner_acme"]
    );
    assert_eq!(strings(&c["providers"]), vec!["market_data_inc"]);
    assert_eq!(
        strings(&c["permissions"]["hr_share"]),
        vec!["auditor_co:SELECT"]
    );
    assert_eq!(strings(&c["changes"][0]), Vec::<String>::new());

    // The same change by alice's usual agent: refused by aegis before the workspace.
    let before = actions(&stack, "updateSharePermissions").len();
    let refused = sdk_sharing(
        &stack,
        &token(&stack, "alice"),
        json!([["sales_share", "partner_acme", "remove"]]),
    )
    .await;
    let e = &refused["changes"][0];
    assert_eq!(e["error"], "PermissionDenied", "{e:#}");
    assert!(e["message"]
        .as_str()
        .unwrap_or("")
        .starts_with("path_blocked"));
    assert_eq!(actions(&stack, "updateSharePermissions").len(), before);
    // ...while her reads went through as her.
    assert_eq!(strings(&refused["shares"]), vec!["sales_share"]);
    assert_joined(&stack, "/api/2.1/unity-catalog/").await;
    stack.shutdown().await;
}

/// Sends `method path` with a JSON body through Envoy as `token`.
async fn send(stack: &Stack, token: &str, method: &str, path: &str, body: Value) -> Resp {
    read(
        http()
            .request(
                method.parse().expect("method"),
                format!("{}{path}", stack.envoy_url()),
            )
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .expect("request through envoy"),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_cannot_change_acls_or_sharing_unless_an_allow_rule_lifts_it() {
    let stack = start_with_policy(
        r#"allow = [
  { methods = ["PUT", "PATCH"], path = "/api/2.0/permissions/*", agents = ["acl-admin"] },
  { methods = ["POST"], path = "/api/2.1/unity-catalog/recipients/*", agents = ["acl-admin"] },
]"#,
    )
    .await;
    let (copilot, admin_agent) = (
        token_as(&stack, "carol", "copilot"),
        token_as(&stack, "carol", "acl-admin"),
    );
    let alice = token(&stack, "alice");
    let cluster_acl = format!("/api/2.0/permissions/clusters/{CLUSTER_ADMIN}");
    let dashboard_acl = format!(
        "/api/2.0/permissions/dashboards/{}",
        sandbox::fixture::DASHBOARD_PAYROLL
    );
    let grant_alice = |level: &str| json!({"access_control_list": [{"user_name": "alice@example.com", "permission_level": level}]});
    let writes: Vec<(&str, String, Value)> = vec![
        ("PATCH", cluster_acl.clone(), grant_alice("CAN_ATTACH_TO")),
        ("PUT", dashboard_acl.clone(), grant_alice("CAN_READ")),
        (
            "POST",
            "/api/2.1/unity-catalog/recipients/partner_acme/rotate-token".to_string(),
            json!({"existing_token_expire_in_seconds": 0}),
        ),
        (
            "POST",
            "/api/2.1/unity-catalog/recipients".to_string(),
            json!({"name": "exfil", "authentication_type": "TOKEN"}),
        ),
    ];

    // carol may make each change in Databricks, but her everyday agent may not: aegis refuses
    // each with its own reason, and nothing reaches the workspace.
    let before = stack.sandbox.requests().len();
    for (method, path, body) in &writes {
        let r = send(&stack, &copilot, method, path, body.clone()).await;
        assert_eq!(r.status, 403, "{method} {path}: {}", r.text);
        assert_eq!(r.body["error"], "path_blocked", "{method} {path}");
        assert_eq!(r.body["trace_id"].as_str(), Some(r.trace_id().as_str()));
    }
    assert_eq!(
        stack.sandbox.requests().len(),
        before,
        "a refused write reached the workspace"
    );
    // Before any change alice cannot see the admins' cluster or carol's dashboard.
    let r = get(&stack, "/api/2.1/clusters/list", Some(&alice)).await;
    assert!(!r.text.contains(CLUSTER_ADMIN), "{}", r.text);
    let payroll = format!(
        "/api/2.0/lakeview/dashboards/{}",
        sandbox::fixture::DASHBOARD_PAYROLL
    );
    assert_eq!(get(&stack, &payroll, Some(&alice)).await.status, 403);

    // The positive control: the agent the operator allowed makes the same changes, and the
    // workspace applies them (or refuses what carol may not do: rotating alice's recipient).
    let want = [200, 200, 403, 200];
    for ((method, path, body), status) in writes.iter().zip(want) {
        let r = send(&stack, &admin_agent, method, path, body.clone()).await;
        assert_eq!(r.status, status, "{method} {path}: {}", r.text);
        assert!(
            r.body.get("trace_id").is_none(),
            "answered by the workspace: {}",
            r.text
        );
    }
    let r = get(&stack, "/api/2.1/clusters/list", Some(&alice)).await;
    assert!(r.text.contains(CLUSTER_ADMIN), "{}", r.text);
    assert_eq!(get(&stack, &payroll, Some(&alice)).await.status, 200);

    // Databricks, not aegis, still decides who may change an ACL: alice with the allowed
    // agent is refused by the workspace (she does not manage the cluster).
    let alice_admin_agent = token_as(&stack, "alice", "acl-admin");
    let r = send(
        &stack,
        &alice_admin_agent,
        "PATCH",
        &cluster_acl,
        grant_alice("CAN_MANAGE"),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text);
    assert_eq!(r.body["error_code"], "PERMISSION_DENIED");
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboards_run_each_viewers_queries_as_the_viewer() {
    let stack = start().await;
    let (sales, payroll) = (
        sandbox::fixture::DASHBOARD_SALES,
        sandbox::fixture::DASHBOARD_PAYROLL,
    );
    let view = |user: &'static str| {
        let token = token(&stack, user);
        let url = stack.envoy_url();
        async move {
            let out = run_python(
                "sdk_sharing.py",
                &[&url, "dashboards", sales, payroll],
                &[("SDK_TOKEN", &token)],
            )
            .await;
            eprintln!("dashboards {user}: {out:#}");
            out
        }
    };
    let rows = |v: &Value| -> Vec<Vec<String>> {
        assert_eq!(v["state"], "SUCCEEDED", "{v:#}");
        v["rows"]
            .as_array()
            .expect("rows")
            .iter()
            .map(strings)
            .collect()
    };

    let a = view("alice").await;
    assert_eq!(strings(&a["list"]), vec![sales.to_string()]);
    sdk_error(&a["get"][payroll], "PermissionDenied", payroll);
    let p = &a["published"][sales];
    assert_eq!(p["embed_credentials"], false);
    assert_eq!(p["warehouse_id"], sandbox::WAREHOUSE_ID);
    assert_eq!(
        rows(&p["datasets"]["Orders by region"]),
        vec![vec!["EMEA", "3", "505.75"]]
    );
    let customers = rows(&p["datasets"]["Customers"]);
    assert_eq!(customers.len(), 3);
    assert!(customers.iter().all(|r| r[1] == "***"), "{customers:?}");

    // bob may view the same dashboard, but its datasets run as him: no SELECT on orders.
    let b = view("bob").await;
    let p = &b["published"][sales];
    for ds in ["Orders by region", "Customers"] {
        let v = &p["datasets"][ds];
        assert_eq!(v["state"], "FAILED", "{v:#}");
        assert!(v["error"]
            .as_str()
            .unwrap_or("")
            .contains("User does not have SELECT on Table 'main.sales.orders'"));
    }

    // carol sees every row unmasked, and her own unpublished dashboard.
    let c = view("carol").await;
    assert_eq!(strings(&c["list"]).len(), 2);
    assert_eq!(c["get"][payroll], "Payroll");
    sdk_error(&c["published"][payroll], "ResourceDoesNotExist", payroll);
    let p = &c["published"][sales];
    assert_eq!(rows(&p["datasets"]["Orders by region"]).len(), 3);
    assert_eq!(rows(&p["datasets"]["Customers"])[0][1], "anna@example.org");

    // Every dataset query reached the warehouse as its viewer, with the viewer's own token.
    let runs: Vec<RequestRecord> = actions(&stack, "executeStatement");
    for user in ["alice", "bob", "carol"] {
        let mine = runs
            .iter()
            .filter(|r| r.user.as_deref() == Some(&format!("{user}@example.com")))
            .count();
        assert_eq!(mine, 2, "{user} ran {mine} dataset queries");
    }
    assert!(runs
        .iter()
        .all(|r| r.authorization_kind == "databricks_token"));
    assert_joined(&stack, "/api/2.0/lakeview/").await;
    assert_joined(&stack, "/api/2.0/sql/statements").await;
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn databricks_mcp_client_reaches_managed_servers_as_the_user() {
    let stack = start().await;
    let call = |user: &'static str, path: &'static str, tool: &'static str, args: Value| {
        let token = token(&stack, user);
        let url = stack.envoy_url();
        async move {
            let out = run_python(
                "databricks_mcp_client.py",
                &[&url, path, tool, &args.to_string()],
                &[("MCP_TOKEN", &token)],
            )
            .await;
            eprintln!("databricks-mcp {user} {path}: {out:#}");
            out
        }
    };
    let payload = |out: &Value| -> Value {
        let texts = strings(&out["texts"]);
        serde_json::from_str(texts.last().expect("a text result")).expect("json text")
    };
    let query = json!({"query": "SELECT region, COUNT(*) AS n FROM main.sales.orders GROUP BY region ORDER BY region"});

    // The DBSQL server: the same tool and query, each user's own rows.
    let alice = call("alice", "/api/2.0/mcp/sql", "execute_sql", query.clone()).await;
    assert_eq!(strings(&alice["tools"]), vec!["execute_sql"]);
    assert_eq!(alice["is_error"], false, "{alice:#}");
    assert_eq!(payload(&alice)["rows"], json!([["EMEA", "3"]]));
    let carol = call("carol", "/api/2.0/mcp/sql", "execute_sql", query.clone()).await;
    assert_eq!(payload(&carol)["rows"].as_array().map(Vec::len), Some(3));
    let bob = call("bob", "/api/2.0/mcp/sql", "execute_sql", query).await;
    assert_eq!(bob["is_error"], true, "{bob:#}");

    // Unity Catalog functions: the tools the caller may EXECUTE, masks applied.
    let tool = "main__sales__orders_in_region";
    let alice = call(
        "alice",
        "/api/2.0/mcp/functions/main/sales",
        tool,
        json!({"region_name": "EMEA"}),
    )
    .await;
    assert_eq!(strings(&alice["tools"]), vec![tool]);
    assert_eq!(payload(&alice)["rows"][0][2], "***");

    // A permission change through the same client and tool: refused by aegis with a JSON-RPC
    // error the library raises, and not run.
    let before = actions(&stack, "callTool").len();
    let refused = call(
        "alice",
        "/api/2.0/mcp/sql",
        "execute_sql",
        json!({"query": "GRANT ALL PRIVILEGES ON CATALOG main TO `account users`"}),
    )
    .await;
    assert_eq!(refused["error"], "McpError", "{refused:#}");
    assert_eq!(
        refused["data"]["reason"], "statement_blocked",
        "{refused:#}"
    );
    assert!(
        refused["message"]
            .as_str()
            .unwrap_or("")
            .contains("statement_blocked"),
        "{refused:#}"
    );
    assert_eq!(actions(&stack, "callTool").len(), before);

    // Every request the library made reached the workspace as the user, with their own token.
    let mcp: Vec<RequestRecord> = stack
        .sandbox
        .requests()
        .into_iter()
        .filter(|r| r.service == "mcp")
        .collect();
    assert!(!mcp.is_empty());
    assert!(mcp
        .iter()
        .all(|r| r.authorization_kind == "databricks_token"));
    for user in ["alice", "bob", "carol"] {
        let who = format!("{user}@example.com");
        assert!(mcp.iter().any(|r| r.user.as_deref() == Some(who.as_str())));
    }
    stack.shutdown().await;
}
