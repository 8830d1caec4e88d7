//! The SQL warehouse endpoint (TCLIService Thrift over HTTPS at `/sql/1.0/warehouses/<id>`)
//! through Envoy's TLS listener and aegis, driven by the official `databricks-sql-connector` and
//! the `databricks-sqlalchemy` dialect (tests/python/sql_connector.py, run from the repo's .venv).
//! Each user gets what the workspace's grants, row filters and column masks allow; a session
//! is bound to its user; what the connector does on its own (feature flags, telemetry) passes
//! aegis as the user; every call's workspace audit row joins its chain row.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use support::*;

const PYTHON_TIMEOUT: Duration = Duration::from_secs(240);
const HTTP_PATH: &str = "/sql/1.0/warehouses/abcdef0123456789";

fn python() -> PathBuf {
    let py = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        py.is_file(),
        "{} is missing: run scripts/bootstrap.sh (make setup)",
        py.display()
    );
    py
}

/// Runs `sql_connector.py <mode>` as `user` through the stack's TLS listener; its stdout is one
/// JSON document.
async fn connector(
    stack: &Stack,
    user: &str,
    mode: &str,
    extra: &[&str],
    env: &[(&str, String)],
    stdin: Option<String>,
) -> Value {
    let addr = stack
        .envoy
        .tls_listener_addr()
        .expect("envoy/dev.yaml has a TLS listener");
    let ca = stack.envoy.tls_ca_file().expect("the test CA");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/sql_connector.py");
    let mut cmd = tokio::process::Command::new(python());
    cmd.arg(script)
        .arg(mode)
        .arg(addr.to_string())
        .arg(HTTP_PATH)
        .arg(ca)
        .args(extra)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("SQL_TOKEN", token(stack, user))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("run sql_connector.py");
    let mut input = child.stdin.take().expect("stdin");
    let text = stdin.unwrap_or_default();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let _ = input.write_all(text.as_bytes()).await;
    });
    let out = tokio::time::timeout(PYTHON_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("sql_connector.py {mode} did not finish in {PYTHON_TIMEOUT:?}"))
        .expect("sql_connector.py output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "sql_connector.py {mode} as {user} failed ({}):\n{stderr}\n{stdout}",
        out.status
    );
    let v: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("no JSON from sql_connector.py ({e}):\n{stdout}\n{stderr}"));
    eprintln!("{user} {mode}: {v}");
    v
}

fn rows(v: &Value) -> Vec<Vec<String>> {
    support::python::rows_of(v)
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v:#}"))
        .iter()
        .map(|s| s.as_str().expect("string").to_string())
        .collect()
}

fn refused(v: &Value, needle: &str) {
    let msg = v["message"].as_str().unwrap_or_default();
    assert!(
        v["error"].is_string() && msg.contains(needle),
        "expected an error with {needle:?}, got {v:#}"
    );
}

/// Every workspace request that came through Envoy on the connector's paths has an ALLOW row
/// with its trace id and user, and every ALLOW row of those paths reached the workspace once.
async fn assert_joined(stack: &Stack) -> usize {
    let ours = |path: &str| {
        path.starts_with("/sql/")
            || path.starts_with("/telemetry-ext")
            || path.starts_with("/api/2.0/connector-service/")
    };
    assert_allows_joined(stack, ours, |_| true).await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sql_connector_sees_what_each_users_grants_allow() {
    let stack = start().await;
    let alice = connector(&stack, "alice", "surfaces", &[], &[], None).await;
    let bob = connector(&stack, "bob", "surfaces", &[], &[], None).await;
    let carol = connector(&stack, "carol", "surfaces", &[], &[], None).await;

    // alice: the EMEA rows, emails masked; no USE SCHEMA on main.hr; a named parameter.
    let a = rows(&alice["orders"]);
    assert_eq!(a.len(), 3, "{alice:#}");
    assert!(a.iter().all(|r| r[1] == "EMEA" && r[2] == "***"), "{a:?}");
    assert_eq!(
        strings(&alice["orders"]["types"]),
        ["int", "string", "string", "double"]
    );
    refused(
        &alice["salaries"],
        "[INSUFFICIENT_PERMISSIONS] Insufficient privileges:\nUser does not have USE SCHEMA on Schema 'main.hr'. SQLSTATE: 42501",
    );
    assert_eq!(rows(&alice["param"]), [["1"], ["2"], ["3"]]);
    assert_eq!(strings(&alice["catalogs"]), ["main", "snowflake_fed"]);
    assert_eq!(strings(&alice["schemas"]), ["main.sales"]);
    assert_eq!(
        strings(&alice["tables"]),
        [
            "main.sales.orders:TABLE",
            "snowflake_fed.analytics.web_events:TABLE"
        ]
    );
    assert_eq!(
        strings(&alice["columns"]),
        [
            "order_id:INT",
            "region:STRING",
            "customer_email:STRING",
            "amount:DOUBLE"
        ]
    );
    assert_eq!(rows(&alice["sqlalchemy"]), [["EMEA", "3"]]);
    assert_eq!(
        strings(&alice["sqlalchemy_columns"]),
        ["order_id", "region", "customer_email", "amount"]
    );

    // bob: refused by the workspace's grants (not by aegis), as the connector shows it; the
    // view he may read; listings of only what he may see.
    refused(
        &bob["orders"],
        "[INSUFFICIENT_PERMISSIONS] Insufficient privileges:\nUser does not have SELECT on Table 'main.sales.orders'. SQLSTATE: 42501",
    );
    assert_eq!(bob["orders"]["error"], "ServerOperationError");
    refused(&bob["sqlalchemy"], "INSUFFICIENT_PERMISSIONS");
    let totals = rows(&bob["region_totals"]);
    assert_eq!(totals, [["AMER", "3"]]);
    assert_eq!(strings(&bob["catalogs"]), ["main"]);
    assert_eq!(strings(&bob["tables"]), ["main.sales.region_totals:VIEW"]);
    assert!(strings(&bob["columns"]).is_empty(), "{bob:#}");

    // carol (admins, pii_readers): every row, clear emails, the HR schema.
    let c = rows(&carol["orders"]);
    assert_eq!(c.len(), 8);
    assert!(c.iter().any(|r| r[2].contains('@')), "{c:?}");
    assert_eq!(rows(&carol["salaries"]).len(), 3);
    assert!(strings(&carol["tables"]).contains(&"main.hr.salaries:TABLE".to_string()));
    assert_eq!(rows(&carol["sqlalchemy"]).len(), 3);

    // What the connector did on its own reached the workspace as the user, through aegis.
    let log = stack.sandbox.requests();
    for who in ["alice@example.com", "bob@example.com", "carol@example.com"] {
        for action in ["getFeatureFlags", "uploadLogs", "openSession", "getTables"] {
            assert!(
                log.iter()
                    .any(|r| r.action == action && r.user.as_deref() == Some(who)),
                "no {action} as {who}"
            );
        }
    }
    let joined = assert_joined(&stack).await;
    eprintln!("{joined} SQL-endpoint, feature-flag and telemetry requests joined their chain rows");

    // A session is bound to the user who opened it: bob's token on alice's session is refused
    // by the workspace, alice's own call on it works.
    let other = token(&stack, "bob");
    let cross = connector(
        &stack,
        "alice",
        "cross_user",
        &[],
        &[("OTHER_TOKEN", other)],
        None,
    )
    .await;
    assert_eq!(cross["opened"]["code"], "SUCCESS_STATUS");
    assert_eq!(cross["stolen_execute"]["code"], "INVALID_HANDLE_STATUS");
    assert_eq!(cross["stolen_get_info"]["code"], "INVALID_HANDLE_STATUS");
    assert_eq!(cross["own_get_info"]["code"], "SUCCESS_STATUS");
    assert_eq!(cross["own_value"], "Spark SQL");
    assert!(
        !stack
            .sandbox
            .requests()
            .iter()
            .any(|r| r.action == "executeStatement"
                && r.user.as_deref() == Some("bob@example.com")
                && r.status != 200),
        "a refused handle is a Thrift status, not an HTTP error"
    );
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_outlives_the_users_databricks_token() {
    // Databricks tokens live 6 s; the session spans 9 s of them.
    let stack = start_with(
        StackOptions::new(AEGIS_BIN).with_sandbox(sandbox::SandboxOptions {
            token_ttl: Duration::from_secs(6),
            ..Default::default()
        }),
    )
    .await;
    let out = connector(&stack, "alice", "long_session", &["9"], &[], None).await;
    assert_eq!(rows(&out["before"]), [["3"]], "{out:#}");
    assert_eq!(rows(&out["after"]), [["3"]], "{out:#}");
    assert_eq!(out["session_id"], out["session_id_after"]);

    // One session, served under more than one of alice's Databricks tokens, none expired.
    let calls: Vec<RequestRecord> = stack
        .sandbox
        .requests()
        .into_iter()
        .filter(|r| r.service == "databrickssql")
        .collect();
    assert!(calls.iter().all(|r| r.status == 200 && !r.token_expired));
    assert!(calls
        .iter()
        .all(|r| r.user.as_deref() == Some("alice@example.com")));
    let mut serials: Vec<u64> = calls.iter().filter_map(|r| r.token_serial).collect();
    serials.sort_unstable();
    serials.dedup();
    assert!(
        serials.len() >= 2,
        "the session never saw a refreshed token: {serials:?}"
    );
    assert!(stack.sandbox.exchange_count("alice@example.com") >= 2);
    assert_joined(&stack).await;
    stack.shutdown().await;
}

/// The trace id aegis put in a refusal's `x-databricks-reason-phrase`, as the connector shows it.
fn trace_in(message: &str) -> Option<String> {
    let at = message.find("(trace_id ")? + "(trace_id ".len();
    let id: String = message[at..]
        .chars()
        .take_while(char::is_ascii_hexdigit)
        .collect();
    (id.len() == 32).then_some(id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permission_changes_sent_through_the_connector_never_reach_the_workspace() {
    use support::sql_corpus::{ORDINARY_SQL, PERMISSION_CHANGES};
    assert!(PERMISSION_CHANGES.len() >= 40 && ORDINARY_SQL.len() >= 40);
    let stack = start().await;
    let executed = |stack: &Stack| {
        stack
            .sandbox
            .requests()
            .iter()
            .filter(|r| r.action == "executeStatement")
            .count()
    };

    // Every spelling, on one connection: the connector raises what aegis said, and nothing of
    // it runs in the workspace.
    let before = executed(&stack);
    let corpus = serde_json::to_string(PERMISSION_CHANGES).unwrap();
    let out = connector(&stack, "alice", "statements", &[], &[], Some(corpus)).await;
    let results = out["results"].as_array().expect("results");
    assert_eq!(results.len(), PERMISSION_CHANGES.len());
    let mut traces = Vec::new();
    for r in results {
        let msg = r["message"].as_str().unwrap_or_default();
        assert_eq!(r["error"], "RequestError", "{r:#}");
        assert!(
            msg.contains("statement_blocked: agents may not run SQL that changes permissions"),
            "the reason is not visible to the client: {r:#}"
        );
        traces.push(trace_in(msg).unwrap_or_else(|| panic!("no trace id in {msg:?}")));
    }
    assert_eq!(
        executed(&stack),
        before,
        "a permission change reached the workspace"
    );
    let log = stack.sandbox.requests();
    for t in &traces {
        assert!(!log
            .iter()
            .any(|r| r.trace_id.as_deref() == Some(t.as_str())));
        let rows = stack
            .postgres
            .query_json(&format!(
                "SELECT decision, reason, path, statement_kind, length(statement_fp) AS fp \
                 FROM aegis_audit WHERE trace_id = '{t}'"
            ))
            .await
            .expect("the deny row");
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0]["decision"], "DENY");
        assert_eq!(rows[0]["reason"], "statement_blocked");
        assert_eq!(rows[0]["path"], HTTP_PATH);
        assert_ne!(rows[0]["statement_kind"], "");
    }
    // Never the text, only its kind and fingerprint.
    let texts = stack
        .postgres
        .query_json("SELECT count(*)::bigint AS n FROM aegis_audit WHERE path LIKE '%GRANT%'")
        .await
        .expect("count");
    assert_eq!(texts[0]["n"], 0);

    // Positive control: ordinary SQL through the same connector reaches the workspace, which
    // answers it (the sandbox runs queries only; the rest it refuses itself).
    let before = executed(&stack);
    let ordinary = serde_json::to_string(ORDINARY_SQL).unwrap();
    let out = connector(&stack, "alice", "statements", &[], &[], Some(ordinary)).await;
    for r in out["results"].as_array().expect("results") {
        let msg = r["message"].as_str().unwrap_or_default();
        assert!(!msg.contains("statement_blocked"), "{r:#}");
        assert_ne!(r["error"], "RequestError", "{r:#}");
    }
    assert_eq!(executed(&stack) - before, ORDINARY_SQL.len());
    let allowed = stack
        .postgres
        .query_json(&format!(
            "SELECT count(*)::bigint AS n FROM aegis_audit WHERE decision = 'ALLOW' \
             AND path = '{HTTP_PATH}' AND statement_kind <> '' AND length(statement_fp) = 32"
        ))
        .await
        .expect("count");
    assert_eq!(allowed[0]["n"], ORDINARY_SQL.len());

    // A body that is not a TCLIService call is refused on the endpoint, with the reason in the
    // header the connector reads.
    let r = http()
        .post(format!("{}{HTTP_PATH}", stack.envoy.listener_url()))
        .bearer_auth(token(&stack, "alice"))
        .header("content-type", "application/x-thrift")
        .body("GRANT ALL PRIVILEGES ON CATALOG main TO `account users`")
        .send()
        .await
        .expect("request");
    let r = read(r).await;
    assert_eq!(r.status, 403, "{}", r.text);
    assert_eq!(r.body["error"], "statement_blocked");
    let phrase = r.header("x-databricks-reason-phrase").unwrap_or_default();
    assert!(
        phrase.starts_with("statement_blocked: ") && phrase.contains(&r.trace_id()),
        "{phrase:?}"
    );
    stack.shutdown().await;
}
