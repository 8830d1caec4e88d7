//! Clusters API 2.1 (`list`, `get`, `start`) and the Command Execution API 1.2 (execution
//! contexts and commands), enforcing cluster ACLs ([`super::permissions`]) the way Databricks
//! does: a cluster is listed to and described for principals with some permission on it,
//! starting it needs `CAN_RESTART`, creating a context and running a command need
//! `CAN_ATTACH_TO` (checked on every call, so a revoked permission takes effect at once).
//!
//! Commands: `sql` runs through the sandbox SQL engine as the caller (grants, row filters and
//! masks apply); `python`, `scala` and `r` evaluate a tiny honest subset (arithmetic, and
//! Python's `print("...")` and `display(spark.sql("..."))`), and answer anything else with an
//! error result. The 1.2 API reports request errors as `{"error": "..."}`.

// Handlers return the finished error response; it is built once per request, so boxing it
// would only add an allocation.
#![allow(clippy::result_large_err)]

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Extension, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::permissions::CLUSTERS;
use super::{api_error, lock, Caller, WorkspaceState, STATEMENT_HARD_TIMEOUT};
use crate::fixture::{Cluster, Fixture};
use crate::sql::{self, ExecError, ResultSet};

/// How long a started cluster stays PENDING before it is RUNNING.
const STARTUP: Duration = Duration::from_millis(1000);
/// Contexts and commands kept, oldest dropped first.
const MAX_CONTEXTS: usize = 1000;
const MAX_COMMANDS: usize = 1000;
/// How many 10 ms waits `execute` spends for a command to finish before answering.
const QUICK_POLLS: usize = 30;
/// A fixed creation time for the fixture's clusters (2025-06-01T10:10:10Z).
const CREATED_AT: i64 = 1_748_772_610_000;

const ATTACH: usize = 0;
const RESTART: usize = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Power {
    Running,
    Terminated,
    Pending(Instant),
}

/// The clusters' run state, contexts and commands.
pub(crate) struct Compute {
    power: Mutex<HashMap<String, Power>>,
    contexts: Mutex<VecDeque<Context>>,
    commands: Mutex<VecDeque<Arc<Command>>>,
}

#[derive(Clone)]
struct Context {
    id: String,
    cluster_id: String,
    owner: String,
    language: String,
}

struct Command {
    id: String,
    context_id: String,
    owner: String,
    state: Mutex<(&'static str, Option<Value>)>,
    stop: Arc<AtomicBool>,
}

impl Compute {
    pub fn new(f: &Fixture) -> Compute {
        let c = Compute {
            power: Mutex::new(HashMap::new()),
            contexts: Mutex::new(VecDeque::new()),
            commands: Mutex::new(VecDeque::new()),
        };
        c.reset(f);
        c
    }

    /// Back to the fixture: clusters in their initial state, no contexts, no commands.
    pub fn reset(&self, f: &Fixture) {
        let mut power = lock(&self.power);
        power.clear();
        for c in &f.clusters {
            let p = if c.running {
                Power::Running
            } else {
                Power::Terminated
            };
            power.insert(c.id.clone(), p);
        }
        lock(&self.contexts).clear();
        for c in lock(&self.commands).drain(..) {
            c.stop.store(true, Ordering::Relaxed);
        }
    }

    fn state(&self, id: &str) -> &'static str {
        let mut power = lock(&self.power);
        match power.get(id).copied() {
            Some(Power::Running) => "RUNNING",
            Some(Power::Pending(until)) if Instant::now() >= until => {
                power.insert(id.to_string(), Power::Running);
                "RUNNING"
            }
            Some(Power::Pending(_)) => "PENDING",
            Some(Power::Terminated) | None => "TERMINATED",
        }
    }
}

fn cluster_json(ws: &WorkspaceState, c: &Cluster) -> Value {
    let state = ws.compute.state(&c.id);
    let mut v = json!({
        "cluster_id": c.id,
        "cluster_name": c.name,
        "spark_version": "15.4.x-scala2.12",
        "node_type_id": "i3.xlarge",
        "driver_node_type_id": "i3.xlarge",
        "num_workers": 2,
        "autotermination_minutes": 60,
        "creator_user_name": c.creator,
        "cluster_source": "UI",
        "data_security_mode": "USER_ISOLATION",
        "runtime_engine": "PHOTON",
        "state": state,
        "start_time": CREATED_AT,
        "default_tags": {
            "Vendor": "Databricks",
            "Creator": c.creator,
            "ClusterName": c.name,
            "ClusterId": c.id,
        },
    });
    match state {
        "TERMINATED" => {
            v["state_message"] = json!("Inactive cluster terminated (inactive for 60 minutes).");
            v["termination_reason"] = json!({"code": "INACTIVITY", "type": "SUCCESS"});
        }
        "PENDING" => {
            v["state_message"] =
                json!("Finding instances for new nodes, acquiring more instances if necessary")
        }
        _ => v["state_message"] = json!(""),
    }
    v
}

/// The cluster, if it exists and the caller holds at least `min` on it; the REST error otherwise.
fn cluster_for<'w>(
    ws: &'w WorkspaceState,
    caller: &Caller,
    id: Option<&str>,
    min: usize,
    action: &str,
) -> Result<&'w Cluster, Response> {
    let Some(id) = id.filter(|i| !i.is_empty()) else {
        return Err(api_error(
            StatusCode::BAD_REQUEST,
            "INVALID_PARAMETER_VALUE",
            "Missing required field: cluster_id",
        ));
    };
    let Some(cluster) = ws.fixture.cluster(id) else {
        return Err(api_error(
            StatusCode::BAD_REQUEST,
            "INVALID_PARAMETER_VALUE",
            format!("Cluster {id} does not exist"),
        ));
    };
    match ws.acls.level(&CLUSTERS, id, &caller.principal) {
        Some(rank) if rank >= min => Ok(cluster),
        _ => Err(api_error(
            StatusCode::FORBIDDEN,
            "PERMISSION_DENIED",
            format!(
                "{} does not have {action} permissions on cluster {id}.",
                caller.user.user_name
            ),
        )),
    }
}

// === Clusters API 2.1 ===

pub(super) async fn list(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
) -> Response {
    let clusters: Vec<Value> = ws
        .fixture
        .clusters
        .iter()
        .filter(|c| ws.acls.level(&CLUSTERS, &c.id, &caller.principal).is_some())
        .map(|c| cluster_json(&ws, c))
        .collect();
    Json(json!({ "clusters": clusters })).into_response()
}

pub(super) async fn get(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    match cluster_for(
        &ws,
        &caller,
        q.get("cluster_id").map(String::as_str),
        ATTACH,
        "Attach",
    ) {
        Ok(c) => Json(cluster_json(&ws, c)).into_response(),
        Err(e) => e,
    }
}

#[derive(Deserialize)]
pub(super) struct StartBody {
    cluster_id: Option<String>,
}

pub(super) async fn start(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<StartBody>, JsonRejection>,
) -> Response {
    let body = match body {
        Ok(Json(b)) => b,
        Err(e) => {
            return api_error(
                StatusCode::BAD_REQUEST,
                "MALFORMED_REQUEST",
                format!("Could not parse request object: {}", e.body_text()),
            )
        }
    };
    let cluster = match cluster_for(&ws, &caller, body.cluster_id.as_deref(), RESTART, "Restart") {
        Ok(c) => c,
        Err(e) => return e,
    };
    let state = ws.compute.state(&cluster.id);
    if state != "TERMINATED" {
        let shown = match state {
            "RUNNING" => "Running",
            _ => "Pending",
        };
        return api_error(
            StatusCode::BAD_REQUEST,
            "INVALID_STATE",
            format!("Cluster {} is in unexpected state {shown}.", cluster.id),
        );
    }
    lock(&ws.compute.power).insert(cluster.id.clone(), Power::Pending(Instant::now() + STARTUP));
    Json(json!({})).into_response()
}

// === Command Execution API 1.2 ===

/// A 1.2-style error: `{"error": "..."}`.
fn error12(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

#[derive(Deserialize)]
pub(super) struct ContextBody {
    #[serde(rename = "clusterId")]
    cluster_id: Option<String>,
    #[serde(rename = "contextId")]
    context_id: Option<String>,
    #[serde(rename = "commandId")]
    command_id: Option<String>,
    language: Option<String>,
    command: Option<String>,
}

fn parse_body(body: &Bytes) -> Result<ContextBody, Response> {
    serde_json::from_slice(body).map_err(|e| {
        error12(
            StatusCode::BAD_REQUEST,
            format!("MALFORMED_REQUEST: could not parse the request body as JSON: {e}"),
        )
    })
}

/// The running cluster the caller may attach to, or the 1.2 error.
fn attachable<'w>(
    ws: &'w WorkspaceState,
    caller: &Caller,
    cluster_id: Option<&str>,
) -> Result<&'w Cluster, Response> {
    let Some(id) = cluster_id.filter(|i| !i.is_empty()) else {
        return Err(error12(
            StatusCode::BAD_REQUEST,
            "Missing required field: clusterId",
        ));
    };
    let Some(cluster) = ws.fixture.cluster(id) else {
        return Err(error12(
            StatusCode::BAD_REQUEST,
            format!("Cluster {id} does not exist"),
        ));
    };
    if ws.acls.level(&CLUSTERS, id, &caller.principal).is_none() {
        return Err(error12(
            StatusCode::FORBIDDEN,
            format!("PERMISSION_DENIED: You do not have permission to attach to cluster {id}"),
        ));
    }
    let state = ws.compute.state(id);
    if state != "RUNNING" {
        return Err(error12(
            StatusCode::BAD_REQUEST,
            format!("Cluster {id} is in state {state}; it must be RUNNING to run commands."),
        ));
    }
    Ok(cluster)
}

fn valid_language(l: Option<&str>) -> Result<String, Response> {
    match l.map(str::to_ascii_lowercase) {
        Some(l) if matches!(l.as_str(), "python" | "scala" | "sql" | "r") => Ok(l),
        Some(l) => Err(error12(
            StatusCode::BAD_REQUEST,
            format!("Unsupported language: {l}. Use python, scala, sql or r."),
        )),
        None => Err(error12(
            StatusCode::BAD_REQUEST,
            "Missing required field: language",
        )),
    }
}

/// The caller's context `id` on `cluster`, or the 1.2 error.
fn context_of(
    ws: &WorkspaceState,
    caller: &Caller,
    cluster: &Cluster,
    id: Option<&str>,
) -> Result<Context, Response> {
    let id = id.unwrap_or_default();
    lock(&ws.compute.contexts)
        .iter()
        .find(|c| {
            c.id == id
                && c.cluster_id == cluster.id
                && c.owner.eq_ignore_ascii_case(&caller.user.user_name)
        })
        .cloned()
        .ok_or_else(|| {
            error12(
                StatusCode::NOT_FOUND,
                format!(
                    "ContextNotFound: execution context {id} does not exist on cluster {}",
                    cluster.id
                ),
            )
        })
}

pub(super) async fn create_context(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Response {
    let body = match parse_body(&body) {
        Ok(b) => b,
        Err(e) => return e,
    };
    let cluster = match attachable(&ws, &caller, body.cluster_id.as_deref()) {
        Ok(c) => c,
        Err(e) => return e,
    };
    let language = match valid_language(body.language.as_deref()) {
        Ok(l) => l,
        Err(e) => return e,
    };
    let id = format!("{}", rand_u63());
    let mut contexts = lock(&ws.compute.contexts);
    if contexts.len() >= MAX_CONTEXTS {
        contexts.pop_front();
    }
    contexts.push_back(Context {
        id: id.clone(),
        cluster_id: cluster.id.clone(),
        owner: caller.user.user_name.clone(),
        language,
    });
    Json(json!({ "id": id })).into_response()
}

pub(super) async fn context_status(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let cluster = match attachable(&ws, &caller, q.get("clusterId").map(String::as_str)) {
        Ok(c) => c,
        Err(e) => return e,
    };
    match context_of(
        &ws,
        &caller,
        cluster,
        q.get("contextId").map(String::as_str),
    ) {
        Ok(c) => Json(json!({ "id": c.id, "status": "Running" })).into_response(),
        Err(e) => e,
    }
}

pub(super) async fn destroy_context(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Response {
    let body = match parse_body(&body) {
        Ok(b) => b,
        Err(e) => return e,
    };
    let cluster = match attachable(&ws, &caller, body.cluster_id.as_deref()) {
        Ok(c) => c,
        Err(e) => return e,
    };
    let ctx = match context_of(&ws, &caller, cluster, body.context_id.as_deref()) {
        Ok(c) => c,
        Err(e) => return e,
    };
    lock(&ws.compute.contexts).retain(|c| c.id != ctx.id);
    for cmd in lock(&ws.compute.commands)
        .iter()
        .filter(|c| c.context_id == ctx.id)
    {
        cmd.stop.store(true, Ordering::Relaxed);
    }
    Json(json!({ "id": ctx.id })).into_response()
}

pub(super) async fn execute(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Response {
    let body = match parse_body(&body) {
        Ok(b) => b,
        Err(e) => return e,
    };
    let cluster = match attachable(&ws, &caller, body.cluster_id.as_deref()) {
        Ok(c) => c,
        Err(e) => return e,
    };
    let ctx = match context_of(&ws, &caller, cluster, body.context_id.as_deref()) {
        Ok(c) => c,
        Err(e) => return e,
    };
    let language = match body.language.as_deref() {
        None => ctx.language.clone(),
        some => match valid_language(some) {
            Ok(l) => l,
            Err(e) => return e,
        },
    };
    let Some(text) = body.command else {
        return error12(StatusCode::BAD_REQUEST, "Missing required field: command");
    };
    let cmd = Arc::new(Command {
        id: crate::util::random_hex(16),
        context_id: ctx.id.clone(),
        owner: caller.user.user_name.clone(),
        state: Mutex::new(("Queued", None)),
        stop: Arc::new(AtomicBool::new(false)),
    });
    {
        let mut commands = lock(&ws.compute.commands);
        if commands.len() >= MAX_COMMANDS {
            if let Some(old) = commands.pop_front() {
                old.stop.store(true, Ordering::Relaxed);
            }
        }
        commands.push_back(cmd.clone());
    }
    spawn_command(ws.clone(), caller, cmd.clone(), language, text);
    // A quick command is done before its first status poll, as on a warm cluster.
    for _ in 0..QUICK_POLLS {
        if !matches!(lock(&cmd.state).0, "Queued" | "Running") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Json(json!({ "id": cmd.id })).into_response()
}

fn find_command(
    ws: &WorkspaceState,
    caller: &Caller,
    ctx: &Context,
    id: Option<&str>,
) -> Result<Arc<Command>, Response> {
    let id = id.unwrap_or_default();
    lock(&ws.compute.commands)
        .iter()
        .find(|c| {
            c.id == id
                && c.context_id == ctx.id
                && c.owner.eq_ignore_ascii_case(&caller.user.user_name)
        })
        .cloned()
        .ok_or_else(|| {
            error12(
                StatusCode::NOT_FOUND,
                format!(
                    "CommandNotFound: command {id} does not exist in context {}",
                    ctx.id
                ),
            )
        })
}

fn command_json(cmd: &Command) -> Value {
    let (status, results) = lock(&cmd.state).clone();
    let mut v = json!({ "id": cmd.id, "status": status });
    if let Some(r) = results {
        v["results"] = r;
    }
    v
}

pub(super) async fn command_status(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let cluster = match attachable(&ws, &caller, q.get("clusterId").map(String::as_str)) {
        Ok(c) => c,
        Err(e) => return e,
    };
    let found = context_of(
        &ws,
        &caller,
        cluster,
        q.get("contextId").map(String::as_str),
    )
    .and_then(|ctx| find_command(&ws, &caller, &ctx, q.get("commandId").map(String::as_str)));
    match found {
        Ok(cmd) => Json(command_json(&cmd)).into_response(),
        Err(e) => e,
    }
}

pub(super) async fn cancel(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Response {
    let body = match parse_body(&body) {
        Ok(b) => b,
        Err(e) => return e,
    };
    let cluster = match attachable(&ws, &caller, body.cluster_id.as_deref()) {
        Ok(c) => c,
        Err(e) => return e,
    };
    let found = context_of(&ws, &caller, cluster, body.context_id.as_deref())
        .and_then(|ctx| find_command(&ws, &caller, &ctx, body.command_id.as_deref()));
    match found {
        Ok(cmd) => {
            cmd.stop.store(true, Ordering::Relaxed);
            let mut st = lock(&cmd.state);
            if matches!(st.0, "Queued" | "Running") {
                *st = ("Cancelled", None);
            }
            drop(st);
            Json(json!({ "id": cmd.id })).into_response()
        }
        Err(e) => e,
    }
}

// === Running a command ===

fn spawn_command(
    ws: Arc<WorkspaceState>,
    caller: Caller,
    cmd: Arc<Command>,
    language: String,
    text: String,
) {
    tokio::spawn(async move {
        {
            let mut st = lock(&cmd.state);
            if st.0 != "Queued" {
                return;
            }
            *st = ("Running", None);
        }
        let sql_text = match language.as_str() {
            "sql" => Some(text.clone()),
            "python" => python_display_sql(&text),
            _ => None,
        };
        let results = match sql_text {
            Some(sql_text) => {
                let stop = cmd.stop.clone();
                let deadline = std::time::Instant::now() + STATEMENT_HARD_TIMEOUT;
                let request = sql::Request {
                    sql: sql_text,
                    catalog: "main".into(),
                    schema: "default".into(),
                    params: vec![],
                    row_limit: Some(1000),
                };
                let ws2 = ws.clone();
                let job = tokio::task::spawn_blocking(move || {
                    sql::execute(&ws2.fixture, &caller.principal, &request, stop, deadline)
                });
                match tokio::time::timeout(STATEMENT_HARD_TIMEOUT + Duration::from_secs(5), job)
                    .await
                {
                    Ok(Ok(Ok(rs))) => table_results(&rs),
                    Ok(Ok(Err(ExecError::Sql(e)))) => {
                        error_results("AnalysisException", &e.message)
                    }
                    Ok(Ok(Err(ExecError::Interrupted))) if cmd.stop.load(Ordering::Relaxed) => {
                        return;
                    }
                    _ => error_results(
                        "TimeoutException",
                        "the command exceeded the sandbox's execution limit",
                    ),
                }
            }
            None => evaluate(&language, &text),
        };
        let mut st = lock(&cmd.state);
        if st.0 == "Running" {
            *st = ("Finished", Some(results));
        }
    });
}

/// Spark's JSON type name for a column, as `schema[].type` carries it (a JSON string literal).
fn spark_type(type_name: &str) -> &'static str {
    match type_name {
        "INT" => "\"integer\"",
        "LONG" => "\"long\"",
        "DOUBLE" => "\"double\"",
        "BOOLEAN" => "\"boolean\"",
        "DATE" => "\"date\"",
        "TIMESTAMP" => "\"timestamp\"",
        "NULL" => "\"void\"",
        _ => "\"string\"",
    }
}

fn table_results(rs: &ResultSet) -> Value {
    let data: Vec<Value> = rs
        .rows
        .iter()
        .map(|row| {
            Value::Array(
                row.iter()
                    .zip(&rs.columns)
                    .map(|(cell, col)| match (cell, col.type_name.as_str()) {
                        (None, _) => Value::Null,
                        (Some(v), "INT" | "LONG") => v
                            .parse::<i64>()
                            .map(Value::from)
                            .unwrap_or_else(|_| json!(v)),
                        (Some(v), "DOUBLE") => v
                            .parse::<f64>()
                            .map(Value::from)
                            .unwrap_or_else(|_| json!(v)),
                        (Some(v), "BOOLEAN") => json!(v == "true"),
                        (Some(v), _) => json!(v),
                    })
                    .collect(),
            )
        })
        .collect();
    let schema: Vec<Value> = rs
        .columns
        .iter()
        .map(|c| json!({ "name": c.name, "type": spark_type(&c.type_name), "metadata": "{}" }))
        .collect();
    json!({
        "resultType": "table",
        "data": data,
        "schema": schema,
        "truncated": rs.truncated,
        "isJsonSchema": true,
    })
}

fn error_results(class: &str, message: &str) -> Value {
    json!({
        "resultType": "error",
        "summary": format!("{class}: {}", message.lines().next().unwrap_or("")),
        "cause": format!("{class}: {message}"),
    })
}

fn text_results(text: String) -> Value {
    json!({ "resultType": "text", "data": text })
}

/// `display(spark.sql("..."))` in Python: the SQL it runs, if the command is exactly that.
fn python_display_sql(text: &str) -> Option<String> {
    let inner = text
        .trim()
        .strip_prefix("display(spark.sql(")?
        .strip_suffix("))")?;
    string_literal(inner.trim())
}

/// A single- or double-quoted string literal without escapes or embedded quotes.
fn string_literal(s: &str) -> Option<String> {
    let q = s.chars().next()?;
    if !(q == '"' || q == '\'') || s.len() < 2 || !s.ends_with(q) {
        return None;
    }
    let body = &s[1..s.len() - 1];
    (!body.contains(q) && !body.contains('\\')).then(|| body.to_string())
}

/// The tiny subset of Python, Scala and R the sandbox evaluates.
fn evaluate(language: &str, text: &str) -> Value {
    let text = text.trim();
    if language == "python" {
        if let Some(arg) = text
            .strip_prefix("print(")
            .and_then(|r| r.strip_suffix(')'))
        {
            if let Some(s) = string_literal(arg.trim()) {
                return text_results(s);
            }
        }
    }
    match arith::eval(text, language == "python") {
        Some(n) => text_results(match (language, n) {
            ("scala", arith::Num::Int(i)) => format!("res0: Int = {i}"),
            ("scala", arith::Num::Float(f)) => format!("res0: Double = {}", sql::java_double(f)),
            ("r", n) => format!("[1] {}", n.r_text()),
            (_, n) => n.python_text(),
        }),
        None => error_results(
            "NotImplementedError",
            &format!(
                "the sandbox cluster evaluates arithmetic{} only; it does not run this {language} command",
                if language == "python" {
                    ", print(\"...\") and display(spark.sql(\"...\"))"
                } else {
                    ""
                }
            ),
        ),
    }
}

fn rand_u63() -> u64 {
    use rand::RngCore;
    rand::rng().next_u64() >> 1
}

/// Arithmetic over integer and decimal literals: `+ - * /`, parentheses, unary minus.
mod arith {
    #[derive(Clone, Copy, Debug, PartialEq)]
    pub enum Num {
        Int(i64),
        Float(f64),
    }

    impl Num {
        fn f(self) -> f64 {
            match self {
                Num::Int(i) => i as f64,
                Num::Float(f) => f,
            }
        }

        pub fn python_text(self) -> String {
            match self {
                Num::Int(i) => i.to_string(),
                Num::Float(f) if f.fract() == 0.0 && f.abs() < 1e16 => format!("{f:.1}"),
                Num::Float(f) => f.to_string(),
            }
        }

        pub fn r_text(self) -> String {
            let f = self.f();
            if f.fract() == 0.0 && f.abs() < 1e15 {
                format!("{}", f as i64)
            } else {
                f.to_string()
            }
        }
    }

    /// `true_div`: `/` of two integers gives a float (Python 3); otherwise it truncates.
    pub fn eval(text: &str, true_div: bool) -> Option<Num> {
        let tokens: Vec<char> = text.chars().filter(|c| !c.is_whitespace()).collect();
        if tokens.is_empty() || tokens.len() > 256 {
            return None;
        }
        let mut p = Parser {
            t: &tokens,
            i: 0,
            true_div,
            depth: 0,
        };
        let v = p.expr()?;
        (p.i == tokens.len()).then_some(v)
    }

    struct Parser<'a> {
        t: &'a [char],
        i: usize,
        true_div: bool,
        depth: usize,
    }

    impl Parser<'_> {
        fn peek(&self) -> Option<char> {
            self.t.get(self.i).copied()
        }

        fn expr(&mut self) -> Option<Num> {
            let mut v = self.term()?;
            while let Some(op @ ('+' | '-')) = self.peek() {
                self.i += 1;
                let r = self.term()?;
                v = match (v, r) {
                    (Num::Int(a), Num::Int(b)) => Num::Int(if op == '+' {
                        a.checked_add(b)?
                    } else {
                        a.checked_sub(b)?
                    }),
                    (a, b) => Num::Float(if op == '+' {
                        a.f() + b.f()
                    } else {
                        a.f() - b.f()
                    }),
                };
            }
            Some(v)
        }

        fn term(&mut self) -> Option<Num> {
            let mut v = self.factor()?;
            while let Some(op @ ('*' | '/')) = self.peek() {
                self.i += 1;
                let r = self.factor()?;
                v = match (op, v, r) {
                    ('*', Num::Int(a), Num::Int(b)) => Num::Int(a.checked_mul(b)?),
                    ('*', a, b) => Num::Float(a.f() * b.f()),
                    (_, Num::Int(_), Num::Int(0)) => return None,
                    (_, Num::Int(a), Num::Int(b)) if !self.true_div => Num::Int(a.checked_div(b)?),
                    (_, a, b) if b.f() != 0.0 => Num::Float(a.f() / b.f()),
                    _ => return None,
                };
            }
            Some(v)
        }

        fn factor(&mut self) -> Option<Num> {
            self.depth += 1;
            if self.depth > 64 {
                return None;
            }
            let v = match self.peek()? {
                '-' => {
                    self.i += 1;
                    match self.factor()? {
                        Num::Int(i) => Num::Int(i.checked_neg()?),
                        Num::Float(f) => Num::Float(-f),
                    }
                }
                '(' => {
                    self.i += 1;
                    let v = self.expr()?;
                    if self.peek()? != ')' {
                        return None;
                    }
                    self.i += 1;
                    v
                }
                c if c.is_ascii_digit() => {
                    let start = self.i;
                    while self.peek().is_some_and(|c| c.is_ascii_digit() || c == '.') {
                        self.i += 1;
                    }
                    let s: String = self.t[start..self.i].iter().collect();
                    if s.contains('.') {
                        Num::Float(s.parse().ok()?)
                    } else {
                        Num::Int(s.parse().ok()?)
                    }
                }
                _ => return None,
            };
            self.depth -= 1;
            Some(v)
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn arithmetic_follows_each_language() {
            assert_eq!(eval("1 + 1", true), Some(Num::Int(2)));
            assert_eq!(eval("7 / 2", true), Some(Num::Float(3.5)));
            assert_eq!(eval("7 / 2", false), Some(Num::Int(3)));
            assert_eq!(eval("-(2 + 3) * 4", true), Some(Num::Int(-20)));
            assert_eq!(eval("1 / 0", true), None);
            assert_eq!(eval("spark.table('x')", true), None);
            assert_eq!(eval("1 +", true), None);
        }
    }
}
