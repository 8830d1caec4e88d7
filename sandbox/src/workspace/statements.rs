//! SQL Statement Execution API 2.0 (`/api/2.0/sql/statements`) and the warehouse listing.
//!
//! A statement runs on a tokio task (the SQL engine on a blocking thread, interruptible). The
//! execute call waits up to `wait_timeout` for it, then answers with the final result or with the
//! current state for the client to poll, as Databricks does. Results are served INLINE as
//! JSON_ARRAY in chunks of [`ROWS_PER_CHUNK`] rows. Only the user who submitted a statement can
//! see or cancel it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::watch;

use super::{api_error, lock, Caller, WorkspaceState, STATEMENT_HARD_TIMEOUT};
use crate::fixture::Warehouse;
use crate::sql::{self, ExecError, Param, ResultSet, SqlError};

/// Rows per result chunk. Databricks cuts INLINE chunks by size; a row count keeps the sandbox's
/// chunking predictable for tests.
pub const ROWS_PER_CHUNK: usize = 1000;
/// Statements kept for polling, oldest dropped first.
const MAX_STATEMENTS: usize = 1000;
const DEFAULT_WAIT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
enum Phase {
    Pending,
    Running,
    Succeeded(Arc<ResultSet>),
    Failed(SqlError),
    Canceled,
}

impl Phase {
    fn is_terminal(&self) -> bool {
        matches!(
            self,
            Phase::Succeeded(_) | Phase::Failed(_) | Phase::Canceled
        )
    }

    fn state(&self) -> &'static str {
        match self {
            Phase::Pending => "PENDING",
            Phase::Running => "RUNNING",
            Phase::Succeeded(_) => "SUCCEEDED",
            Phase::Failed(_) => "FAILED",
            Phase::Canceled => "CANCELED",
        }
    }
}

pub(super) struct Statement {
    pub id: String,
    owner: String,
    phase: watch::Sender<Phase>,
    /// Tells the engine to stop; it checks between batches of SQLite VM steps.
    stop: Arc<AtomicBool>,
}

impl Statement {
    /// The statement as the Statement Execution API returns it.
    pub(super) fn to_json(&self) -> Value {
        statement_json(&self.id, &self.phase.borrow().clone())
    }

    pub(super) fn is_done(&self) -> bool {
        self.phase.borrow().is_terminal()
    }

    /// The result, once the statement succeeded.
    pub(super) fn result(&self) -> Option<Arc<ResultSet>> {
        match &*self.phase.borrow() {
            Phase::Succeeded(rs) => Some(rs.clone()),
            _ => None,
        }
    }

    /// The failure, once the statement failed.
    pub(super) fn error(&self) -> Option<SqlError> {
        match &*self.phase.borrow() {
            Phase::Failed(e) => Some(e.clone()),
            _ => None,
        }
    }

    /// Moves to `next` unless the statement already reached a terminal phase (a cancel wins
    /// over a result that arrives after it).
    fn advance(&self, next: Phase) {
        self.phase.send_if_modified(|p| {
            if p.is_terminal() {
                false
            } else {
                *p = next;
                true
            }
        });
    }

    /// The Statement Execution API's name of the current state.
    pub(super) fn state(&self) -> &'static str {
        self.phase.borrow().state()
    }

    pub(super) fn cancel(&self) {
        self.advance(Phase::Canceled);
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct StatementsInner {
    by_id: HashMap<String, Arc<Statement>>,
    /// Ids in submission order, for eviction.
    order: VecDeque<String>,
}

#[derive(Default)]
pub(super) struct Statements {
    inner: Mutex<StatementsInner>,
}

impl Statements {
    fn insert(&self, s: Arc<Statement>) {
        let mut inner = lock(&self.inner);
        while inner.order.len() >= MAX_STATEMENTS {
            if let Some(old) = inner.order.pop_front() {
                if let Some(old) = inner.by_id.remove(&old) {
                    old.cancel();
                }
            }
        }
        inner.order.push_back(s.id.clone());
        inner.by_id.insert(s.id.clone(), s);
    }

    /// The statement `id` if `user_name` submitted it.
    pub(super) fn get(&self, id: &str, user_name: &str) -> Option<Arc<Statement>> {
        lock(&self.inner)
            .by_id
            .get(id)
            .filter(|s| s.owner.eq_ignore_ascii_case(user_name))
            .cloned()
    }

    pub fn clear(&self) {
        let mut inner = lock(&self.inner);
        for s in inner.by_id.values() {
            s.cancel();
        }
        inner.by_id.clear();
        inner.order.clear();
    }
}

// === Request validation ===

#[derive(Deserialize)]
pub(super) struct ExecuteBody {
    statement: Option<String>,
    warehouse_id: Option<String>,
    catalog: Option<String>,
    schema: Option<String>,
    #[serde(default)]
    parameters: Vec<Param>,
    row_limit: Option<i64>,
    byte_limit: Option<i64>,
    disposition: Option<String>,
    format: Option<String>,
    wait_timeout: Option<String>,
    on_wait_timeout: Option<String>,
}

fn invalid(message: impl Into<String>) -> Response {
    api_error(StatusCode::BAD_REQUEST, "INVALID_PARAMETER_VALUE", message)
}

fn parse_wait_timeout(raw: Option<&str>) -> Result<Duration, String> {
    let Some(raw) = raw else {
        return Ok(DEFAULT_WAIT);
    };
    let secs = raw
        .trim()
        .strip_suffix('s')
        .and_then(|n| n.parse::<u64>().ok())
        .filter(|n| *n == 0 || (5..=50).contains(n));
    match secs {
        Some(n) => Ok(Duration::from_secs(n)),
        None => Err(format!(
            "wait_timeout must be 0 seconds (disables wait), or between 5 seconds and 50 seconds, \
             but got '{raw}'"
        )),
    }
}

fn statement_not_found(id: &str) -> Response {
    api_error(
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
        format!("The statement {id} was not found."),
    )
}

/// The workspace's answer when warehouse `warehouse_id` does not exist (404
/// `RESOURCE_DOES_NOT_EXIST`) or `caller` may not use it (403 `PERMISSION_DENIED`); None when it
/// may be used. Shared by the Statement Execution API and the SQL warehouse endpoint.
pub(super) fn warehouse_refusal(
    ws: &WorkspaceState,
    caller: &Caller,
    warehouse_id: &str,
) -> Option<Response> {
    let Some(warehouse) = ws.fixture.warehouse(warehouse_id) else {
        return Some(api_error(
            StatusCode::NOT_FOUND,
            "RESOURCE_DOES_NOT_EXIST",
            format!("SQL warehouse {warehouse_id} does not exist."),
        ));
    };
    if !warehouse
        .can_use
        .iter()
        .any(|p| caller.principal.matches(p))
    {
        return Some(api_error(
            StatusCode::FORBIDDEN,
            "PERMISSION_DENIED",
            format!(
                "User {} does not have permission to use SQL warehouse {}.",
                caller.user.user_name, warehouse.id
            ),
        ));
    }
    None
}

// === Handlers ===

pub(super) async fn execute(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<ExecuteBody>, JsonRejection>,
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
    let Some(statement) = body.statement.filter(|s| !s.trim().is_empty()) else {
        return invalid("Missing required field: statement");
    };
    let Some(warehouse_id) = body.warehouse_id.filter(|w| !w.trim().is_empty()) else {
        return invalid("Missing required field: warehouse_id");
    };
    if let Some(refused) = warehouse_refusal(&ws, &caller, &warehouse_id) {
        return refused;
    }
    let wait = match parse_wait_timeout(body.wait_timeout.as_deref()) {
        Ok(w) => w,
        Err(message) => return invalid(message),
    };
    let cancel_on_timeout = match body.on_wait_timeout.as_deref().map(str::to_ascii_uppercase) {
        None => false,
        Some(v) if v == "CONTINUE" => false,
        Some(v) if v == "CANCEL" => true,
        Some(v) => {
            return invalid(format!(
                "on_wait_timeout must be CONTINUE or CANCEL, but got '{v}'"
            ))
        }
    };
    match body
        .disposition
        .as_deref()
        .map(str::to_ascii_uppercase)
        .as_deref()
    {
        None | Some("INLINE") => {}
        Some("EXTERNAL_LINKS") => {
            return api_error(
                StatusCode::NOT_IMPLEMENTED,
                "NOT_IMPLEMENTED",
                "The sandbox workspace serves results with disposition INLINE only.",
            )
        }
        Some(other) => return invalid(format!("Invalid disposition: {other}")),
    }
    match body
        .format
        .as_deref()
        .map(str::to_ascii_uppercase)
        .as_deref()
    {
        None | Some("JSON_ARRAY") => {}
        Some(f @ ("ARROW_STREAM" | "CSV")) => {
            return invalid(format!(
                "{f} format is not supported with INLINE disposition; use JSON_ARRAY"
            ))
        }
        Some(other) => return invalid(format!("Invalid format: {other}")),
    }
    let row_limit = match body.row_limit {
        None => None,
        Some(n) if n >= 0 => Some(usize::try_from(n).unwrap_or(usize::MAX)),
        Some(n) => return invalid(format!("row_limit must be non-negative, but got {n}")),
    };
    if body.byte_limit.is_some_and(|b| b < 0) {
        return invalid("byte_limit must be non-negative");
    }

    let request = sql::Request {
        sql: statement,
        catalog: body.catalog.unwrap_or_else(|| "main".into()),
        schema: body.schema.unwrap_or_else(|| "default".into()),
        params: body.parameters,
        row_limit,
    };
    let stmt = submit(&ws, caller, request);
    if !wait.is_zero() {
        let mut rx = stmt.phase.subscribe();
        let done = tokio::time::timeout(wait, rx.wait_for(Phase::is_terminal)).await;
        if done.is_err() && cancel_on_timeout {
            stmt.cancel();
        }
    }
    let phase = stmt.phase.borrow().clone();
    Json(statement_json(&stmt.id, &phase)).into_response()
}

/// Starts `request` as `caller` and returns the statement, for the Statement Execution API and
/// for the surfaces that run SQL on the user's behalf (Genie, MCP).
pub(super) fn submit(
    ws: &Arc<WorkspaceState>,
    caller: Caller,
    request: sql::Request,
) -> Arc<Statement> {
    let stmt = Arc::new(Statement {
        id: crate::util::uuid_v4(),
        owner: caller.user.user_name.clone(),
        phase: watch::Sender::new(Phase::Pending),
        stop: Arc::new(AtomicBool::new(false)),
    });
    ws.statements.insert(stmt.clone());
    spawn_execution(ws.clone(), caller, stmt.clone(), request);
    stmt
}

/// Waits at most `limit` for the statement to finish; true if it did.
pub(super) async fn wait_done(stmt: &Statement, limit: Duration) -> bool {
    let mut rx = stmt.phase.subscribe();
    let done = tokio::time::timeout(limit, rx.wait_for(Phase::is_terminal)).await;
    done.is_ok()
}

fn spawn_execution(
    ws: Arc<WorkspaceState>,
    caller: Caller,
    stmt: Arc<Statement>,
    request: sql::Request,
) {
    tokio::spawn(async move {
        stmt.advance(Phase::Running);
        let stop = stmt.stop.clone();
        let deadline = std::time::Instant::now() + STATEMENT_HARD_TIMEOUT;
        let job = tokio::task::spawn_blocking(move || {
            sql::execute(&ws.fixture, &caller.principal, &request, stop, deadline)
        });
        let timed_out = || {
            Phase::Failed(SqlError {
                error_code: "DEADLINE_EXCEEDED",
                message: format!(
                    "The statement exceeded the sandbox's execution limit of {} seconds and was \
                     canceled.",
                    STATEMENT_HARD_TIMEOUT.as_secs()
                ),
                sql_state: "57014",
            })
        };
        // The engine stops itself at the deadline; the outer timeout is a second line.
        let next = match tokio::time::timeout(STATEMENT_HARD_TIMEOUT + Duration::from_secs(5), job)
            .await
        {
            Ok(Ok(Ok(rs))) => Phase::Succeeded(Arc::new(rs)),
            Ok(Ok(Err(ExecError::Sql(e)))) => Phase::Failed(e),
            Ok(Ok(Err(ExecError::Interrupted))) if stmt.stop.load(Ordering::Relaxed) => {
                Phase::Canceled
            }
            Ok(Ok(Err(ExecError::Interrupted))) | Err(_) => timed_out(),
            Ok(Err(join_error)) => Phase::Failed(SqlError {
                error_code: "INTERNAL_ERROR",
                message: format!(
                    "[INTERNAL_ERROR] The sandbox SQL engine failed: {join_error}. SQLSTATE: XX000"
                ),
                sql_state: "XX000",
            }),
        };
        stmt.stop.store(true, Ordering::Relaxed);
        stmt.advance(next);
    });
}

pub(super) async fn get(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    match ws.statements.get(&id, &caller.user.user_name) {
        Some(stmt) => {
            let phase = stmt.phase.borrow().clone();
            Json(statement_json(&stmt.id, &phase)).into_response()
        }
        None => statement_not_found(&id),
    }
}

pub(super) async fn chunk(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
    Path((id, chunk)): Path<(String, String)>,
) -> Response {
    let Some(stmt) = ws.statements.get(&id, &caller.user.user_name) else {
        return statement_not_found(&id);
    };
    let phase = stmt.phase.borrow().clone();
    let Phase::Succeeded(rs) = phase else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "BAD_REQUEST",
            format!(
                "The statement {id} is in state {} and has no result to fetch.",
                phase.state()
            ),
        );
    };
    match chunk.parse::<usize>() {
        Ok(index) if index < chunk_count(&rs) => {
            Json(chunk_json(&stmt.id, &rs, index)).into_response()
        }
        _ => invalid(format!(
            "chunk_index {chunk} is out of range: the result has {} chunk(s)",
            chunk_count(&rs)
        )),
    }
}

pub(super) async fn cancel(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    match ws.statements.get(&id, &caller.user.user_name) {
        Some(stmt) => {
            stmt.cancel();
            Json(json!({})).into_response()
        }
        None => statement_not_found(&id),
    }
}

fn warehouse_json(ws: &WorkspaceState, w: &Warehouse) -> Value {
    let host = ws
        .url
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    json!({
        "id": w.id,
        "name": w.name,
        "state": "RUNNING",
        "cluster_size": "2X-Small",
        "min_num_clusters": 1,
        "max_num_clusters": 1,
        "num_clusters": 1,
        "auto_stop_mins": 10,
        "creator_name": "carol@example.com",
        "enable_serverless_compute": true,
        "warehouse_type": "PRO",
        "spot_instance_policy": "COST_OPTIMIZED",
        "odbc_params": {
            "hostname": host,
            "path": format!("/sql/1.0/warehouses/{}", w.id),
            "port": 443,
            "protocol": "https",
        },
        "health": { "status": "HEALTHY" },
    })
}

pub(super) async fn list_warehouses(State(ws): State<Arc<WorkspaceState>>) -> Json<Value> {
    let list: Vec<Value> = ws
        .fixture
        .warehouses
        .iter()
        .map(|w| warehouse_json(&ws, w))
        .collect();
    Json(json!({ "warehouses": list }))
}

pub(super) async fn get_warehouse(
    State(ws): State<Arc<WorkspaceState>>,
    Path(id): Path<String>,
) -> Response {
    match ws.fixture.warehouse(&id) {
        Some(w) => Json(warehouse_json(&ws, w)).into_response(),
        None => api_error(
            StatusCode::NOT_FOUND,
            "RESOURCE_DOES_NOT_EXIST",
            format!("SQL warehouse {id} does not exist."),
        ),
    }
}

// === Response shapes ===

fn chunk_count(rs: &ResultSet) -> usize {
    rs.rows.len().div_ceil(ROWS_PER_CHUNK).max(1)
}

fn chunk_bounds(rs: &ResultSet, index: usize) -> (usize, usize) {
    let start = (index * ROWS_PER_CHUNK).min(rs.rows.len());
    let end = (start + ROWS_PER_CHUNK).min(rs.rows.len());
    (start, end)
}

fn manifest_json(rs: &ResultSet) -> Value {
    let columns: Vec<Value> = rs
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            json!({
                "name": c.name,
                "type_text": c.type_text,
                "type_name": c.type_name,
                "position": i,
            })
        })
        .collect();
    let chunks: Vec<Value> = (0..chunk_count(rs))
        .map(|i| {
            let (start, end) = chunk_bounds(rs, i);
            json!({ "chunk_index": i, "row_offset": start, "row_count": end - start })
        })
        .collect();
    json!({
        "format": "JSON_ARRAY",
        "schema": { "column_count": rs.columns.len(), "columns": columns },
        "total_chunk_count": chunks.len(),
        "chunks": chunks,
        "total_row_count": rs.rows.len(),
        "truncated": rs.truncated,
    })
}

fn chunk_json(id: &str, rs: &ResultSet, index: usize) -> Value {
    let (start, end) = chunk_bounds(rs, index);
    let mut chunk = json!({
        "chunk_index": index,
        "row_offset": start,
        "row_count": end - start,
        "data_array": &rs.rows[start..end],
    });
    if index + 1 < chunk_count(rs) {
        chunk["next_chunk_index"] = json!(index + 1);
        chunk["next_chunk_internal_link"] = json!(format!(
            "/api/2.0/sql/statements/{id}/result/chunks/{}",
            index + 1
        ));
    }
    chunk
}

fn statement_json(id: &str, phase: &Phase) -> Value {
    match phase {
        Phase::Succeeded(rs) => json!({
            "statement_id": id,
            "status": { "state": "SUCCEEDED" },
            "manifest": manifest_json(rs),
            "result": chunk_json(id, rs, 0),
        }),
        Phase::Failed(e) => json!({
            "statement_id": id,
            "status": {
                "state": "FAILED",
                "error": { "error_code": e.error_code, "message": e.message },
                "sql_state": e.sql_state,
            },
        }),
        other => json!({ "statement_id": id, "status": { "state": other.state() } }),
    }
}
