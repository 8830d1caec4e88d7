//! `make demo`: the whole path, for real, in one screen of output.
//!
//! Starts the [`Stack`] (Redis, PostgreSQL, the sandbox, aegis and Envoy) in `.demo/`, sends
//! alice's and bob's requests through Envoy with their own IdP tokens, shows that the sandbox
//! workspace (standing in for Databricks) decides what each sees, shows a request without a
//! token refused, prints the audit chain and runs `aegis audit verify` on it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::stack::{workspace_root, ErrorKind, Stack, StackError, StackOptions};
use crate::{TokenRequest, WAREHOUSE_ID};

const SCIM_ME: &str = "/api/2.0/preview/scim/v2/Me";
const STATEMENTS: &str = "/api/2.0/sql/statements";
const SQL_ENDPOINT: &str = "/sql/1.0/warehouses/";
const QUERY: &str = "SELECT * FROM main.sales.orders";
const AUDIT_QUERY: &str =
    "SELECT seq, ts, decision, reason, user_name, agent, method, path, trace_id FROM aegis_audit ORDER BY seq";
const AUDIT_WAIT: Duration = Duration::from_secs(10);
const VERIFY_TIMEOUT: Duration = Duration::from_secs(60);
/// Cells wider than this are cut, so that tables stay readable in a terminal.
const MAX_CELL: usize = 48;

/// What `sandbox demo` was asked to do.
pub struct DemoOptions {
    pub aegis_bin: PathBuf,
    /// Emptied at start; `.demo/` in the repo by default.
    pub work_dir: PathBuf,
    /// Print the URLs and wait for Ctrl-C instead of stopping at the end.
    pub keep_running: bool,
}

impl DemoOptions {
    pub fn new(aegis_bin: impl Into<PathBuf>) -> Self {
        Self {
            aegis_bin: aegis_bin.into(),
            work_dir: workspace_root().join(".demo"),
            keep_running: false,
        }
    }
}

/// Runs the demo. An error when a step could not run or the outcome was not the expected one
/// (alice served, bob refused by the workspace, no token refused by aegis, the chain intact).
pub async fn run(opts: DemoOptions) -> Result<(), StackError> {
    if opts.work_dir.exists() {
        std::fs::remove_dir_all(&opts.work_dir)
            .map_err(|e| StackError::io(format!("cleaning {}", opts.work_dir.display()), e))?;
    }
    heading("starting Redis, PostgreSQL, the sandbox (IdP + workspace), aegis and Envoy");
    println!("work dir: {}", opts.work_dir.display());
    let stack =
        Stack::start(StackOptions::new(&opts.aegis_bin).with_work_dir(&opts.work_dir)).await?;
    print_table(
        &["component", "where"],
        &[
            vec!["envoy (agents connect here)".into(), stack.envoy_url()],
            vec!["aegis admin".into(), stack.aegis_admin_url()],
            vec![
                "aegis ext_authz grpc".into(),
                stack.aegis.grpc_listen().to_owned(),
            ],
            vec!["sandbox idp".into(), stack.sandbox.idp_url.clone()],
            vec![
                "sandbox workspace".into(),
                stack.sandbox.workspace_url.clone(),
            ],
            vec!["redis".into(), stack.redis.url()],
            vec!["postgres".into(), stack.postgres.url()],
        ],
    );

    let outcome = walk_through(&stack).await;
    let outcome = match outcome {
        Ok(problems) if problems.is_empty() => Ok(()),
        Ok(problems) => Err(StackError::new(
            ErrorKind::Unexpected,
            "the demo did not go as expected",
            problems.join("; "),
        )),
        Err(err) => Err(err),
    };

    if opts.keep_running {
        keep_running(&stack);
        if let Err(err) = wait_for_shutdown_signal().await {
            eprintln!("waiting for ctrl-c failed: {err}");
        }
    }
    heading("stopping everything");
    stack.shutdown().await;
    println!("done");
    outcome
}

/// The requests and checks; returns what did not go as expected.
async fn walk_through(stack: &Stack) -> Result<Vec<String>, StackError> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .user_agent("copilot-demo/1.0")
        .build()
        .map_err(|e| StackError::new(ErrorKind::Http, "building an http client", e))?;
    let base = stack.envoy_url();
    let mut problems = Vec::new();
    let mut sent = 0usize;

    for user in ["alice", "bob"] {
        let token = stack.sandbox.mint_idp_token(&TokenRequest::new(user));

        heading(&format!(
            "{user} (agent copilot): GET {SCIM_ME} through envoy"
        ));
        let me = send(client.get(format!("{base}{SCIM_ME}")).bearer_auth(&token)).await?;
        sent += 1;
        me.print_status();
        if me.status == 200 {
            print_scim(&me.body);
        } else {
            print_json(&me.body);
            problems.push(format!(
                "{user}'s SCIM Me answered {} instead of 200",
                me.status
            ));
        }

        heading(&format!("{user} (agent copilot): {QUERY}"));
        let body = serde_json::json!({ "statement": QUERY, "warehouse_id": WAREHOUSE_ID, "wait_timeout": "30s" });
        let sql = send(
            client
                .post(format!("{base}{STATEMENTS}"))
                .bearer_auth(&token)
                .json(&body),
        )
        .await?;
        sent += 1;
        sql.print_status();
        let state = sql.body["status"]["state"]
            .as_str()
            .unwrap_or("(none)")
            .to_owned();
        println!("statement state: {state}");
        print_statement(&sql.body);
        match (user, sql.status, state.as_str()) {
            ("alice", 200, "SUCCEEDED") | ("bob", 200, "FAILED") => {}
            _ => problems.push(format!(
                "{user}'s query answered {} with state {state}",
                sql.status
            )),
        }

        if user == "alice" {
            heading(&format!(
                "alice (agent copilot): {QUERY}, on the SQL warehouse endpoint \
                 (TCLIService Thrift over HTTPS, {SQL_ENDPOINT}{WAREHOUSE_ID}, as JDBC, ODBC and \
                 databricks-sql-connector send it)"
            ));
            match thrift_query(stack, &token).await {
                Ok((calls, columns, rows)) => {
                    sent += calls;
                    let headers: Vec<&str> = columns.iter().map(String::as_str).collect();
                    print_table(&headers, &rows);
                    println!("({} rows, the same as over REST)", rows.len());
                    if rows.len() != 3 {
                        problems.push(format!(
                            "alice's SQL-endpoint query returned {} rows instead of 3",
                            rows.len()
                        ));
                    }
                }
                Err(e) => problems.push(format!("alice's SQL-endpoint query failed: {e}")),
            }
        }
    }

    heading(&format!("no token: GET {SCIM_ME} through envoy"));
    let anonymous = send(client.get(format!("{base}{SCIM_ME}"))).await?;
    sent += 1;
    anonymous.print_status();
    if let Some(challenge) = &anonymous.www_authenticate {
        println!("www-authenticate: {challenge}");
    }
    print_json(&anonymous.body);
    if anonymous.status != 401 {
        problems.push(format!(
            "a request without a token answered {} instead of 401",
            anonymous.status
        ));
    }

    heading("what the workspace saw (its request log, standing in for system.access.audit)");
    let seen: Vec<Vec<String>> = stack
        .sandbox
        .requests()
        .iter()
        .map(|r| {
            vec![
                r.method.clone(),
                r.path.clone(),
                format!("{}.{}", r.service, r.action),
                r.user.clone().unwrap_or_else(|| "-".into()),
                r.authorization_kind.clone(),
                r.trace_id.clone().unwrap_or_else(|| "-".into()),
                r.status.to_string(),
            ]
        })
        .collect();
    print_table(
        &[
            "method",
            "path",
            "action",
            "user",
            "credential",
            "aegis trace id",
            "status",
        ],
        &seen,
    );

    heading("the audit chain (postgres, table aegis_audit)");
    let rows = audit_rows(stack, sent).await?;
    let columns = [
        "seq",
        "ts",
        "decision",
        "reason",
        "user_name",
        "agent",
        "method",
        "path",
        "trace_id",
    ];
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|row| columns.iter().map(|c| cell(&row[*c])).collect())
        .collect();
    print_table(&columns, &cells);
    if rows.len() < sent {
        problems.push(format!("{} audit rows for {sent} requests", rows.len()));
    }

    heading(&format!(
        "aegis audit verify --config {}",
        stack.config_path().display()
    ));
    let verified = audit_verify(stack.aegis_bin(), stack.config_path()).await?;
    if !verified {
        problems.push("aegis audit verify did not exit 0".to_owned());
    }
    Ok(problems)
}

/// Runs [`QUERY`] as the owner of `token` on the SQL warehouse endpoint through Envoy's TLS
/// listener: OpenSession, ExecuteStatement (with direct results), CloseSession. Returns how many
/// HTTP calls it made, the column names and the rows.
async fn thrift_query(
    stack: &Stack,
    token: &str,
) -> Result<(usize, Vec<String>, Vec<Vec<String>>), String> {
    use crate::workspace::thrift::{self, Struct, Value as T};
    let (Some(url), Some(ca)) = (stack.envoy.tls_listener_url(), stack.envoy.tls_ca_file()) else {
        return Err("envoy has no TLS listener".into());
    };
    let pem = std::fs::read(ca).map_err(|e| format!("reading the test CA: {e}"))?;
    let ca = reqwest::Certificate::from_pem(&pem).map_err(|e| e.to_string())?;
    let client = reqwest::Client::builder()
        .no_proxy()
        .add_root_certificate(ca)
        .timeout(Duration::from_secs(30))
        .user_agent("copilot-demo/1.0")
        .build()
        .map_err(|e| e.to_string())?;
    let endpoint = format!("{url}{SQL_ENDPOINT}{WAREHOUSE_ID}");
    let call = |name: &'static str, seqid: i32, req: Struct| {
        let body = thrift::encode(
            name,
            thrift::CALL,
            seqid,
            &Struct::new().with(1, T::Struct(req)),
        );
        let request = client
            .post(&endpoint)
            .bearer_auth(token)
            .header("content-type", "application/x-thrift")
            .body(body);
        async move {
            let resp = request.send().await.map_err(|e| e.to_string())?;
            let status = resp.status();
            let reason = resp
                .headers()
                .get("x-databricks-reason-phrase")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let bytes = resp.bytes().await.map_err(|e| e.to_string())?;
            if !status.is_success() {
                return Err(format!("{name}: HTTP {status} {reason}"));
            }
            let reply = thrift::decode(&bytes).map_err(|e| format!("{name}: {e}"))?;
            reply
                .body
                .get_struct(0)
                .cloned()
                .ok_or_else(|| format!("{name}: no result"))
        }
    };
    let opened = call(
        "OpenSession",
        1,
        Struct::new()
            .with(1282, T::I64(0xa507))
            .with(1285, T::Bool(true)),
    )
    .await?;
    let session = opened
        .get_struct(3)
        .cloned()
        .ok_or("OpenSession: no session handle")?;
    let executed = call(
        "ExecuteStatement",
        2,
        Struct::new()
            .with(1, T::Struct(session.clone()))
            .with(2, T::str(QUERY))
            .with(4, T::Bool(true))
            .with(1281, T::Struct(Struct::new().with(1, T::I64(1000)))),
    )
    .await?;
    call("CloseSession", 3, Struct::new().with(1, T::Struct(session))).await?;
    let direct = executed
        .get_struct(1281)
        .ok_or("ExecuteStatement: no direct results")?;
    if let Some(message) = direct.get_struct(1).and_then(|s| s.get_str(1281)) {
        return Err(message.to_string());
    }
    let columns: Vec<String> = direct
        .get_struct(2)
        .and_then(|m| m.get_struct(2))
        .and_then(|s| s.get_list(1))
        .unwrap_or_default()
        .iter()
        .filter_map(|c| match c {
            T::Struct(c) => c.get_str(1).map(str::to_string),
            _ => None,
        })
        .collect();
    let mut rows: Vec<Vec<String>> = Vec::new();
    let cols = direct
        .get_struct(3)
        .and_then(|r| r.get_struct(3))
        .and_then(|r| r.get_list(3))
        .unwrap_or_default();
    for (i, col) in cols.iter().enumerate() {
        let T::Struct(col) = col else { continue };
        let Some((_, T::Struct(typed))) = col.0.first() else {
            continue;
        };
        let nulls = typed.get_bytes(2).unwrap_or_default();
        for (n, v) in typed.get_list(1).unwrap_or_default().iter().enumerate() {
            if rows.len() <= n {
                rows.push(vec![String::new(); cols.len()]);
            }
            let null = nulls.get(n / 8).is_some_and(|b| b & (1 << (n % 8)) != 0);
            rows[n][i] = match v {
                _ if null => "NULL".into(),
                T::I32(x) => x.to_string(),
                T::I64(x) => x.to_string(),
                T::Double(x) => crate::sql::java_double(*x),
                T::Bool(x) => x.to_string(),
                T::Bin(b) => String::from_utf8_lossy(b).into_owned(),
                other => format!("{other:?}"),
            };
        }
    }
    Ok((3, columns, rows))
}

/// What came back through Envoy.
struct Answer {
    status: u16,
    trace_id: Option<String>,
    www_authenticate: Option<String>,
    body: Value,
}

impl Answer {
    fn print_status(&self) {
        println!(
            "HTTP {}   x-aegis-trace-id: {}",
            self.status,
            self.trace_id.as_deref().unwrap_or("(none)")
        );
    }
}

async fn send(request: reqwest::RequestBuilder) -> Result<Answer, StackError> {
    let context = "sending a request through envoy";
    let resp = request
        .send()
        .await
        .map_err(|e| StackError::new(ErrorKind::Http, context, e))?;
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let status = resp.status().as_u16();
    let trace_id = header("x-aegis-trace-id");
    let www_authenticate = header("www-authenticate");
    let text = resp
        .text()
        .await
        .map_err(|e| StackError::new(ErrorKind::Http, context, e))?;
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok(Answer {
        status,
        trace_id,
        www_authenticate,
        body,
    })
}

/// The scalar fields of a SCIM user, plus its emails and groups.
fn print_scim(user: &Value) {
    let mut rows = Vec::new();
    if let Some(fields) = user.as_object() {
        for (key, value) in fields {
            match value {
                Value::Array(items) if key == "emails" || key == "groups" => {
                    let list: Vec<String> = items
                        .iter()
                        .map(|i| cell(i.get("display").or_else(|| i.get("value")).unwrap_or(i)))
                        .collect();
                    rows.push(vec![key.clone(), list.join(", ")]);
                }
                Value::Array(_) | Value::Object(_) => {}
                scalar => rows.push(vec![key.clone(), cell(scalar)]),
            }
        }
    }
    print_table(&["field", "value"], &rows);
}

/// A Statement Execution answer: the result table, or the error the workspace returned.
fn print_statement(answer: &Value) {
    let status = &answer["status"];
    if let Some(error) = status.get("error") {
        println!(
            "error from the workspace: {}: {}",
            error["error_code"].as_str().unwrap_or("(no code)"),
            error["message"].as_str().unwrap_or("(no message)")
        );
        return;
    }
    let columns: Vec<String> = answer["manifest"]["schema"]["columns"]
        .as_array()
        .map(|cols| cols.iter().map(|c| cell(&c["name"])).collect())
        .unwrap_or_default();
    let rows: Vec<Vec<String>> = answer["result"]["data_array"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .map(|row| {
                    row.as_array()
                        .map(|r| r.iter().map(cell).collect())
                        .unwrap_or_default()
                })
                .collect()
        })
        .unwrap_or_default();
    if columns.is_empty() {
        print_json(answer);
        return;
    }
    let headers: Vec<&str> = columns.iter().map(String::as_str).collect();
    print_table(&headers, &rows);
    println!("({} rows)", rows.len());
}

/// The audit rows, waiting (bounded) until there is one per request sent: denials are written
/// by the batch writer shortly after the answer.
async fn audit_rows(stack: &Stack, expected: usize) -> Result<Vec<Value>, StackError> {
    let deadline = Instant::now() + AUDIT_WAIT;
    loop {
        let rows = stack.postgres.query_json(AUDIT_QUERY).await?;
        if rows.len() >= expected || Instant::now() >= deadline {
            return Ok(rows);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs `aegis audit verify`, prints its output and exit status; true when it exited 0.
async fn audit_verify(bin: &Path, config: &Path) -> Result<bool, StackError> {
    let context = "running aegis audit verify";
    let child = tokio::process::Command::new(bin)
        .args(["audit", "verify", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| StackError::io(context, e))?;
    let output = tokio::time::timeout(VERIFY_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| {
            StackError::new(
                ErrorKind::Timeout,
                context,
                format!("no answer within {VERIFY_TIMEOUT:?}"),
            )
        })?
        .map_err(|e| StackError::io(context, e))?;
    for text in [&output.stdout, &output.stderr] {
        let text = String::from_utf8_lossy(text);
        if !text.trim().is_empty() {
            println!("{}", text.trim_end());
        }
    }
    println!(
        "exit status: {}",
        output
            .status
            .code()
            .map_or("killed".into(), |c| c.to_string())
    );
    Ok(output.status.success())
}

fn keep_running(stack: &Stack) {
    heading("running; press Ctrl-C to stop");
    println!("envoy listener : {}", stack.envoy_url());
    println!("envoy admin    : {}", stack.envoy.admin_url());
    println!(
        "aegis admin    : {}  (console token: {})",
        stack.aegis_admin_url(),
        stack.console_token()
    );
    println!("sandbox idp    : {}", stack.sandbox.idp_url);
    println!("sandbox ws     : {}", stack.sandbox.workspace_url);
    println!("aegis config   : {}", stack.config_path().display());
    let token = stack.sandbox.mint_idp_token(&TokenRequest::new("alice"));
    println!("\ntry (alice's IdP token, valid for 5 minutes):");
    println!(
        "  curl -s -H 'authorization: Bearer {token}' {}{SCIM_ME}",
        stack.envoy_url()
    );
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn wait_for_shutdown_signal() -> std::io::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        res = tokio::signal::ctrl_c() => res,
        _ = term.recv() => Ok(()),
    }
}

// === output ===

fn heading(text: &str) {
    println!("\n== {text} ==");
}

fn print_json(value: &Value) {
    match value {
        Value::String(text) if text.is_empty() => println!("(empty body)"),
        Value::String(text) => println!("{text}"),
        other => println!(
            "{}",
            serde_json::to_string_pretty(other).unwrap_or_default()
        ),
    }
}

/// A JSON value as a table cell: strings bare, null as NULL, cut to [`MAX_CELL`] characters.
fn cell(value: &Value) -> String {
    let text = match value {
        Value::String(s) => s.clone(),
        Value::Null => "NULL".to_owned(),
        other => other.to_string(),
    };
    if text.chars().count() > MAX_CELL {
        let cut: String = text.chars().take(MAX_CELL - 1).collect();
        format!("{cut}…")
    } else {
        text
    }
}

fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, value) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(value.chars().count());
            }
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let padded: Vec<String> = cells
            .zip(&widths)
            .map(|(c, w)| format!("{c}{}", " ".repeat(w.saturating_sub(c.chars().count()))))
            .collect();
        println!("  {}", padded.join(" | ").trim_end());
    };
    line(&mut headers.iter().copied());
    println!(
        "  {}",
        widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .join("-+-")
    );
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    if rows.is_empty() {
        println!("  (no rows)");
    }
}
