//! The SQL warehouse endpoint: TCLIService (HiveServer2 as Databricks extends it) in Thrift's
//! binary protocol over HTTP at `POST /sql/1.0/warehouses/<id>`, what `databricks-sql-connector`,
//! the JDBC and the ODBC drivers speak.
//!
//! Every HTTP call is authenticated by the front door like any other request (so the bearer
//! token is checked on each one); a session belongs to the user whose token opened it, and a
//! call naming another user's session or operation is answered as if the handle did not exist.
//! Statements run through the same engine and grants as the Statement Execution API
//! ([`super::statements::submit`]); the metadata calls list what Unity Catalog lets the caller
//! see ([`super::unity_catalog`]). Results are column-based `TRowSet`s (`COLUMN_BASED_SET`),
//! which the connector reads with or without pyarrow.
//!
//! Field ids below are those of `TCLIService.thrift` as Databricks ships it with the connector.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Extension, Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::statements::{self, warehouse_refusal, Statement};
use super::thrift::{self, Struct, Value};
use super::unity_catalog::{visible_catalogs, visible_schemas, visible_tables};
use super::{lock, Caller, LogNote, WorkspaceState};
use crate::fixture::{DataType, Table};
use crate::sql::{self, OutColumn, ResultSet, SqlError};

/// Sessions kept at most (oldest dropped first), and operations.
const MAX_SESSIONS: usize = 1000;
const MAX_OPERATIONS: usize = 5000;
/// How long ExecuteStatement waits to answer with direct results, and GetOperationStatus for a
/// running statement to finish (the connector polls without pausing).
const DIRECT_RESULTS_WAIT: Duration = Duration::from_secs(10);
const STATUS_WAIT: Duration = Duration::from_secs(2);
/// Rows per fetch when the client names no limit.
const DEFAULT_FETCH_ROWS: usize = 10_000;

// `TProtocolVersion`: what the sandbox answers (the connector asks for V7).
const SPARK_CLI_SERVICE_PROTOCOL_V7: i32 = 0xa507;
// `TStatusCode`.
const SUCCESS_STATUS: i32 = 0;
const ERROR_STATUS: i32 = 3;
const INVALID_HANDLE_STATUS: i32 = 4;
// `TOperationState`.
const RUNNING_STATE: i32 = 1;
const FINISHED_STATE: i32 = 2;
const CANCELED_STATE: i32 = 3;
const ERROR_STATE: i32 = 5;
const PENDING_STATE: i32 = 7;
// `TOperationType`.
const EXECUTE_STATEMENT: i32 = 0;
const GET_CATALOGS: i32 = 2;
const GET_SCHEMAS: i32 = 3;
const GET_TABLES: i32 = 4;
const GET_COLUMNS: i32 = 6;
// `TSparkRowSetType`.
const COLUMN_BASED_SET: i32 = 1;
// `TTypeId`.
const BOOLEAN_TYPE: i32 = 0;
const INT_TYPE: i32 = 3;
const BIGINT_TYPE: i32 = 4;
const DOUBLE_TYPE: i32 = 6;
const STRING_TYPE: i32 = 7;
const TIMESTAMP_TYPE: i32 = 8;
const NULL_TYPE: i32 = 16;
const DATE_TYPE: i32 = 17;

type Guid = [u8; 16];

struct Session {
    owner: String,
    catalog: String,
    schema: String,
}

enum Work {
    Statement(Arc<Statement>),
    /// A metadata call's answer, computed when it was called.
    Listing(Arc<ResultSet>),
}

struct Operation {
    owner: String,
    session: Guid,
    work: Work,
    /// Rows already returned.
    offset: usize,
}

#[derive(Default)]
struct Inner {
    sessions: HashMap<Guid, Session>,
    session_order: VecDeque<Guid>,
    ops: HashMap<Guid, Operation>,
    op_order: VecDeque<Guid>,
}

/// Open sessions and operations, per workspace.
#[derive(Default)]
pub(super) struct Sessions {
    inner: Mutex<Inner>,
}

impl Sessions {
    pub fn clear(&self) {
        let mut inner = lock(&self.inner);
        for op in inner.ops.values() {
            if let Work::Statement(s) = &op.work {
                s.cancel();
            }
        }
        *inner = Inner::default();
    }

    fn open(&self, owner: &str, catalog: String, schema: String) -> Guid {
        let guid = new_guid();
        let mut inner = lock(&self.inner);
        while inner.session_order.len() >= MAX_SESSIONS {
            if let Some(old) = inner.session_order.pop_front() {
                inner.sessions.remove(&old);
            }
        }
        inner.session_order.push_back(guid);
        inner.sessions.insert(
            guid,
            Session {
                owner: owner.to_string(),
                catalog,
                schema,
            },
        );
        guid
    }

    /// The session's (catalog, schema) if `user` owns it.
    fn session(&self, guid: &Guid, user: &str) -> Option<(String, String)> {
        lock(&self.inner)
            .sessions
            .get(guid)
            .filter(|s| s.owner.eq_ignore_ascii_case(user))
            .map(|s| (s.catalog.clone(), s.schema.clone()))
    }

    fn close_session(&self, guid: &Guid, user: &str) -> bool {
        let mut inner = lock(&self.inner);
        if !inner
            .sessions
            .get(guid)
            .is_some_and(|s| s.owner.eq_ignore_ascii_case(user))
        {
            return false;
        }
        inner.sessions.remove(guid);
        inner.ops.retain(|_, op| {
            let keep = op.session != *guid;
            if !keep {
                if let Work::Statement(s) = &op.work {
                    s.cancel();
                }
            }
            keep
        });
        true
    }

    fn add_op(&self, owner: &str, session: Guid, work: Work) -> Guid {
        let guid = new_guid();
        let mut inner = lock(&self.inner);
        while inner.op_order.len() >= MAX_OPERATIONS {
            if let Some(old) = inner.op_order.pop_front() {
                inner.ops.remove(&old);
            }
        }
        inner.op_order.push_back(guid);
        inner.ops.insert(
            guid,
            Operation {
                owner: owner.to_string(),
                session,
                work,
                offset: 0,
            },
        );
        guid
    }

    /// Runs `f` on the operation if `user` owns it.
    fn with_op<R>(
        &self,
        guid: &Guid,
        user: &str,
        f: impl FnOnce(&mut Operation) -> R,
    ) -> Option<R> {
        let mut inner = lock(&self.inner);
        inner
            .ops
            .get_mut(guid)
            .filter(|op| op.owner.eq_ignore_ascii_case(user))
            .map(f)
    }

    fn statement(&self, guid: &Guid, user: &str) -> Option<Option<Arc<Statement>>> {
        self.with_op(guid, user, |op| match &op.work {
            Work::Statement(s) => Some(s.clone()),
            Work::Listing(_) => None,
        })
    }

    fn close_op(&self, guid: &Guid, user: &str) -> bool {
        let mut inner = lock(&self.inner);
        if !inner
            .ops
            .get(guid)
            .is_some_and(|op| op.owner.eq_ignore_ascii_case(user))
        {
            return false;
        }
        if let Some(op) = inner.ops.remove(guid) {
            if let Work::Statement(s) = op.work {
                s.cancel();
            }
        }
        true
    }
}

fn new_guid() -> Guid {
    rand::random()
}

fn hex(g: &[u8]) -> String {
    g.iter().map(|b| format!("{b:02x}")).collect()
}

// === The handler ===

/// `POST /sql/1.0/warehouses/{id}`: one Thrift call per request.
pub(super) async fn thrift_call(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
    Path(warehouse_id): Path<String>,
    body: Bytes,
) -> Response {
    if let Some(refused) = warehouse_refusal(&ws, &caller, &warehouse_id) {
        return refused;
    }
    let msg = match thrift::decode(&body) {
        Ok(m) if m.kind == thrift::CALL => m,
        Ok(m) => {
            let bytes = thrift::application_exception(
                &m.name,
                m.seqid,
                thrift::PROTOCOL_ERROR,
                "expected a CALL message",
            );
            return reply(bytes, "thriftProtocolError");
        }
        Err(e) => {
            let bytes = thrift::application_exception(
                "",
                0,
                thrift::PROTOCOL_ERROR,
                &format!("could not read the request: {e}"),
            );
            return reply(bytes, "thriftProtocolError");
        }
    };
    let args = msg.body.get_struct(1).cloned().unwrap_or_default();
    let user = caller.user.user_name.clone();
    let (action, result) = match msg.name.as_str() {
        "OpenSession" => ("openSession", open_session(&ws, &user, &args)),
        "CloseSession" => ("closeSession", close_session(&ws, &user, &args)),
        "GetInfo" => ("getInfo", get_info(&ws, &user, &args)),
        "ExecuteStatement" => (
            "executeStatement",
            execute_statement(&ws, &caller, &args).await,
        ),
        "GetOperationStatus" => (
            "getOperationStatus",
            operation_status(&ws, &user, &args).await,
        ),
        "GetResultSetMetadata" => (
            "getResultSetMetadata",
            result_set_metadata(&ws, &user, &args),
        ),
        "FetchResults" => ("fetchResults", fetch_results(&ws, &user, &args)),
        "CancelOperation" => ("cancelOperation", cancel_operation(&ws, &user, &args)),
        "CloseOperation" => ("closeOperation", close_operation(&ws, &user, &args)),
        "GetCatalogs" => ("getCatalogs", metadata(&ws, &caller, &args, GET_CATALOGS)),
        "GetSchemas" => ("getSchemas", metadata(&ws, &caller, &args, GET_SCHEMAS)),
        "GetTables" => ("getTables", metadata(&ws, &caller, &args, GET_TABLES)),
        "GetColumns" => ("getColumns", metadata(&ws, &caller, &args, GET_COLUMNS)),
        other => {
            let bytes = thrift::application_exception(
                other,
                msg.seqid,
                thrift::UNKNOWN_METHOD,
                &format!("Invalid method name: '{other}'"),
            );
            return reply(bytes, "thriftUnknownMethod");
        }
    };
    let result_struct = Struct::new().with(0, Value::Struct(result));
    let bytes = thrift::encode(&msg.name, thrift::REPLY, msg.seqid, &result_struct);
    reply(bytes, action)
}

fn reply(bytes: Vec<u8>, action: &'static str) -> Response {
    let mut resp = (StatusCode::OK, bytes).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-thrift"),
    );
    resp.extensions_mut().insert(LogNote {
        action: Some(action),
        user: None,
    });
    resp
}

// === Statuses and handles ===

fn ok_status() -> Value {
    Value::Struct(Struct::new().with(1, Value::I32(SUCCESS_STATUS)))
}

fn error_status(code: i32, message: &str, sql_state: Option<&str>) -> Value {
    Value::Struct(
        Struct::new()
            .with(1, Value::I32(code))
            .with_opt(3, sql_state.map(Value::str))
            .with(5, Value::str(message))
            .with(6, Value::str(message)),
    )
}

fn invalid_session(guid: &[u8]) -> Struct {
    Struct::new().with(
        1,
        error_status(
            INVALID_HANDLE_STATUS,
            &format!("Invalid SessionHandle: SessionHandle [{}]", hex(guid)),
            None,
        ),
    )
}

fn invalid_operation(guid: &[u8]) -> Struct {
    Struct::new().with(
        1,
        error_status(
            INVALID_HANDLE_STATUS,
            &format!("Invalid OperationHandle: OperationHandle [{}]", hex(guid)),
            None,
        ),
    )
}

fn handle_identifier(guid: &Guid) -> Value {
    // The secret is not checked: the owner check is what binds a handle to a user.
    Value::Struct(
        Struct::new()
            .with(1, Value::Bin(guid.to_vec()))
            .with(2, Value::Bin(guid.iter().rev().copied().collect())),
    )
}

fn operation_handle(guid: &Guid, op_type: i32) -> Value {
    Value::Struct(
        Struct::new()
            .with(1, handle_identifier(guid))
            .with(2, Value::I32(op_type))
            .with(3, Value::Bool(true)),
    )
}

/// The guid of the handle in field `field` of `args` (a session or operation handle), as raw
/// bytes; a guid of the wrong size names no handle.
fn guid_of(args: &Struct, field: i16) -> (Vec<u8>, Option<Guid>) {
    let raw = args
        .get_struct(field)
        .and_then(|h| h.get_struct(1))
        .and_then(|id| id.get_bytes(1))
        .unwrap_or_default()
        .to_vec();
    let guid = Guid::try_from(raw.as_slice()).ok();
    (raw, guid)
}

// === Sessions ===

fn open_session(ws: &WorkspaceState, user: &str, args: &Struct) -> Struct {
    let ns = args.get_struct(1284);
    let catalog = ns
        .and_then(|n| n.get_str(1))
        .filter(|c| !c.is_empty())
        .unwrap_or("main")
        .to_string();
    let schema = ns
        .and_then(|n| n.get_str(2))
        .filter(|s| !s.is_empty())
        .unwrap_or("default")
        .to_string();
    let guid = ws.sql_sessions.open(user, catalog.clone(), schema.clone());
    Struct::new()
        .with(1, ok_status())
        .with(2, Value::I32(SPARK_CLI_SERVICE_PROTOCOL_V7))
        .with(
            3,
            Value::Struct(
                Struct::new()
                    .with(1, handle_identifier(&guid))
                    .with(3329, Value::I32(SPARK_CLI_SERVICE_PROTOCOL_V7)),
            ),
        )
        .with(4, Value::string_map([]))
        .with(
            1284,
            Value::Struct(
                Struct::new()
                    .with(1, Value::str(catalog))
                    .with(2, Value::str(schema)),
            ),
        )
        .with(1285, Value::Bool(true))
}

fn close_session(ws: &WorkspaceState, user: &str, args: &Struct) -> Struct {
    let (raw, guid) = guid_of(args, 1);
    match guid {
        Some(g) if ws.sql_sessions.close_session(&g, user) => Struct::new().with(1, ok_status()),
        _ => invalid_session(&raw),
    }
}

fn get_info(ws: &WorkspaceState, user: &str, args: &Struct) -> Struct {
    let (raw, guid) = guid_of(args, 1);
    if guid
        .and_then(|g| ws.sql_sessions.session(&g, user))
        .is_none()
    {
        return invalid_session(&raw);
    }
    // TGetInfoType: CLI_SERVER_NAME, CLI_DBMS_NAME, CLI_DBMS_VER.
    let value = match args.get_i32(2) {
        Some(13) => "Databricks SQL",
        Some(17) => "Spark SQL",
        Some(18) => "3.5.0",
        other => {
            return Struct::new().with(
                1,
                error_status(
                    ERROR_STATUS,
                    &format!("Unrecognized GetInfoType value: {}", other.unwrap_or(-1)),
                    None,
                ),
            )
        }
    };
    Struct::new()
        .with(1, ok_status())
        .with(2, Value::Struct(Struct::new().with(1, Value::str(value))))
}

// === Statements ===

fn parameters(args: &Struct) -> Vec<sql::Param> {
    args.get_list(1288)
        .unwrap_or_default()
        .iter()
        .filter_map(|p| match p {
            Value::Struct(p) => Some(sql::Param {
                name: p.get_str(2).unwrap_or("").to_string(),
                type_: p.get_str(3).map(str::to_string),
                value: p.get_struct(4).and_then(|v| {
                    v.get_str(1).map(str::to_string).or_else(|| match v.get(2) {
                        Some(Value::Double(d)) => Some(d.to_string()),
                        _ => v.get_bool(3).map(|b| b.to_string()),
                    })
                }),
            }),
            _ => None,
        })
        .collect()
}

async fn execute_statement(ws: &Arc<WorkspaceState>, caller: &Caller, args: &Struct) -> Struct {
    let user = &caller.user.user_name;
    let (raw, guid) = guid_of(args, 1);
    let Some((guid, (catalog, schema))) =
        guid.and_then(|g| ws.sql_sessions.session(&g, user).map(|s| (g, s)))
    else {
        return invalid_session(&raw);
    };
    let Some(statement) = args.get_str(2).filter(|s| !s.trim().is_empty()) else {
        return Struct::new().with(
            1,
            error_status(ERROR_STATUS, "The statement is missing or empty.", None),
        );
    };
    let row_limit = args
        .get_i64(1287)
        .filter(|n| *n > 0)
        .map(|n| usize::try_from(n).unwrap_or(usize::MAX));
    let request = sql::Request {
        sql: statement.to_string(),
        catalog,
        schema,
        params: parameters(args),
        row_limit,
    };
    let stmt = statements::submit(ws, caller.clone(), request);
    let op = ws
        .sql_sessions
        .add_op(user, guid, Work::Statement(stmt.clone()));
    let direct = args.get_struct(1281).map(|d| max_rows(d.get_i64(1)));
    let mut resp = Struct::new()
        .with(1, ok_status())
        .with(2, operation_handle(&op, EXECUTE_STATEMENT));
    if let Some(rows) = direct {
        statements::wait_done(&stmt, DIRECT_RESULTS_WAIT).await;
        resp = resp.with(1281, Value::Struct(direct_results(ws, &op, user, rows)));
    }
    resp
}

fn max_rows(n: Option<i64>) -> usize {
    n.filter(|n| *n > 0)
        .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
        .unwrap_or(DEFAULT_FETCH_ROWS)
}

/// `TSparkDirectResults`: the status, and when it finished, the metadata and the first rows.
fn direct_results(ws: &WorkspaceState, op: &Guid, user: &str, rows: usize) -> Struct {
    let status = status_of(ws, op, user);
    let finished = status.get_i32(2) == Some(FINISHED_STATE);
    let mut direct = Struct::new().with(1, Value::Struct(status));
    if finished {
        direct = direct
            .with(
                2,
                Value::Struct(result_set_metadata(ws, user, &op_args(op))),
            )
            .with(3, Value::Struct(fetch(ws, op, user, rows, false)));
    }
    direct
}

/// Arguments naming operation `op` in field 1, as the calls that take one read them.
fn op_args(op: &Guid) -> Struct {
    Struct::new().with(1, operation_handle(op, EXECUTE_STATEMENT))
}

/// The result of a finished operation, or what stands in its way.
fn result_of(ws: &WorkspaceState, op: &Guid, user: &str) -> Option<Result<Arc<ResultSet>, Struct>> {
    ws.sql_sessions.with_op(op, user, |o| match &o.work {
        Work::Listing(rs) => Ok(rs.clone()),
        Work::Statement(s) => s.result().ok_or_else(|| {
            Struct::new().with(
                1,
                error_status(
                    ERROR_STATUS,
                    &format!(
                        "The operation is in state {} and has no result set.",
                        s.state()
                    ),
                    None,
                ),
            )
        }),
    })
}

fn status_of(ws: &WorkspaceState, op: &Guid, user: &str) -> Struct {
    let Some(stmt) = ws.sql_sessions.statement(op, user) else {
        return invalid_operation(op);
    };
    let Some(stmt) = stmt else {
        // A metadata call: finished when it answered.
        return Struct::new()
            .with(1, ok_status())
            .with(2, Value::I32(FINISHED_STATE))
            .with(9, Value::Bool(true));
    };
    let state = match stmt.state() {
        "PENDING" => PENDING_STATE,
        "RUNNING" => RUNNING_STATE,
        "SUCCEEDED" => FINISHED_STATE,
        "CANCELED" => CANCELED_STATE,
        _ => ERROR_STATE,
    };
    let mut status = Struct::new()
        .with(1, ok_status())
        .with(2, Value::I32(state))
        .with(9, Value::Bool(state == FINISHED_STATE));
    if state == ERROR_STATE {
        let e = stmt.error().unwrap_or_else(|| SqlError {
            error_code: "INTERNAL_ERROR",
            message: "[INTERNAL_ERROR] The statement failed. SQLSTATE: XX000".into(),
            sql_state: "XX000",
        });
        status = status
            .with(3, Value::str(e.sql_state))
            .with(5, Value::str(e.message.clone()))
            .with(1281, Value::str(e.message))
            .with(1282, Value::str(format!("error_code: {}", e.error_code)));
    }
    status
}

async fn operation_status(ws: &WorkspaceState, user: &str, args: &Struct) -> Struct {
    let (raw, guid) = guid_of(args, 1);
    let Some(guid) = guid else {
        return invalid_operation(&raw);
    };
    if let Some(Some(stmt)) = ws.sql_sessions.statement(&guid, user) {
        statements::wait_done(&stmt, STATUS_WAIT).await;
    }
    status_of(ws, &guid, user)
}

fn cancel_operation(ws: &WorkspaceState, user: &str, args: &Struct) -> Struct {
    let (raw, guid) = guid_of(args, 1);
    match guid.map(|g| ws.sql_sessions.statement(&g, user)) {
        Some(Some(stmt)) => {
            if let Some(s) = stmt {
                s.cancel();
            }
            Struct::new().with(1, ok_status())
        }
        _ => invalid_operation(&raw),
    }
}

fn close_operation(ws: &WorkspaceState, user: &str, args: &Struct) -> Struct {
    let (raw, guid) = guid_of(args, 1);
    match guid {
        Some(g) if ws.sql_sessions.close_op(&g, user) => Struct::new().with(1, ok_status()),
        _ => invalid_operation(&raw),
    }
}

// === Results ===

/// The Thrift type and the physical column kind of a result column.
fn type_id(c: &OutColumn) -> i32 {
    match c.type_name.as_str() {
        "BOOLEAN" => BOOLEAN_TYPE,
        "INT" => INT_TYPE,
        "LONG" => BIGINT_TYPE,
        "DOUBLE" => DOUBLE_TYPE,
        "DATE" => DATE_TYPE,
        "TIMESTAMP" => TIMESTAMP_TYPE,
        "NULL" => NULL_TYPE,
        _ => STRING_TYPE,
    }
}

fn table_schema(rs: &ResultSet) -> Value {
    let columns = rs.columns.iter().enumerate().map(|(i, c)| {
        let entry = Struct::new().with(
            1,
            Value::Struct(Struct::new().with(1, Value::I32(type_id(c)))),
        );
        Struct::new()
            .with(1, Value::str(c.name.clone()))
            .with(
                2,
                Value::Struct(Struct::new().with(1, Value::structs([entry]))),
            )
            .with(3, Value::I32(i32::try_from(i + 1).unwrap_or(i32::MAX)))
    });
    Value::Struct(Struct::new().with(1, Value::structs(columns)))
}

fn result_set_metadata(ws: &WorkspaceState, user: &str, args: &Struct) -> Struct {
    let (raw, guid) = guid_of(args, 1);
    let Some(guid) = guid else {
        return invalid_operation(&raw);
    };
    match result_of(ws, &guid, user) {
        None => invalid_operation(&raw),
        Some(Err(e)) => e,
        Some(Ok(rs)) => Struct::new()
            .with(1, ok_status())
            .with(2, table_schema(&rs))
            .with(1281, Value::I32(COLUMN_BASED_SET))
            .with(1282, Value::Bool(false))
            .with(1287, Value::Bool(false)),
    }
}

fn fetch_results(ws: &WorkspaceState, user: &str, args: &Struct) -> Struct {
    let (raw, guid) = guid_of(args, 1);
    let Some(guid) = guid else {
        return invalid_operation(&raw);
    };
    let rows = max_rows(args.get_i64(3));
    let with_metadata = args.get_bool(1283).unwrap_or(false);
    fetch(ws, &guid, user, rows, with_metadata)
}

/// `TFetchResultsResp` with the next `limit` rows of operation `op` (FETCH_NEXT).
fn fetch(ws: &WorkspaceState, op: &Guid, user: &str, limit: usize, with_metadata: bool) -> Struct {
    let rs = match result_of(ws, op, user) {
        None => return invalid_operation(op),
        Some(Err(e)) => return e,
        Some(Ok(rs)) => rs,
    };
    let Some(start) = ws.sql_sessions.with_op(op, user, |o| {
        let start = o.offset.min(rs.rows.len());
        o.offset = (start + limit).min(rs.rows.len());
        start
    }) else {
        return invalid_operation(op);
    };
    let end = (start + limit).min(rs.rows.len());
    let columns = (0..rs.columns.len()).map(|i| column(&rs, i, start, end));
    let row_set = Struct::new()
        .with(1, Value::I64(i64::try_from(start).unwrap_or(i64::MAX)))
        .with(2, Value::structs([]))
        .with(3, Value::structs(columns));
    let mut resp = Struct::new()
        .with(1, ok_status())
        .with(2, Value::Bool(end < rs.rows.len()))
        .with(3, Value::Struct(row_set));
    if with_metadata {
        resp = resp.with(
            1281,
            Value::Struct(result_set_metadata(ws, user, &op_args(op))),
        );
    }
    resp
}

/// One `TColumn` of rows `start..end`: typed values and the null bitmap (bit i set: row i is
/// null, least significant bit first).
fn column(rs: &ResultSet, i: usize, start: usize, end: usize) -> Struct {
    let cells: Vec<Option<&str>> = rs.rows[start..end]
        .iter()
        .map(|r| r.get(i).and_then(|c| c.as_deref()))
        .collect();
    let mut nulls = vec![0u8; cells.len().div_ceil(8)];
    for (n, c) in cells.iter().enumerate() {
        if c.is_none() {
            nulls[n / 8] |= 1 << (n % 8);
        }
    }
    let (field, values) = match type_id(&rs.columns[i]) {
        BOOLEAN_TYPE => (
            1,
            Value::bools(cells.iter().map(|c| c.is_some_and(|v| v == "true"))),
        ),
        INT_TYPE => (
            4,
            Value::i32s(
                cells
                    .iter()
                    .map(|c| c.and_then(|v| v.parse().ok()).unwrap_or(0)),
            ),
        ),
        BIGINT_TYPE => (
            5,
            Value::i64s(
                cells
                    .iter()
                    .map(|c| c.and_then(|v| v.parse().ok()).unwrap_or(0)),
            ),
        ),
        DOUBLE_TYPE => (
            6,
            Value::doubles(
                cells
                    .iter()
                    .map(|c| c.and_then(|v| v.parse().ok()).unwrap_or(0.0)),
            ),
        ),
        _ => (
            7,
            Value::strings(cells.iter().map(|c| c.unwrap_or("").to_string())),
        ),
    };
    let typed = Struct::new().with(1, values).with(2, Value::Bin(nulls));
    Struct::new().with(field, Value::Struct(typed))
}

// === Metadata calls ===

fn metadata(ws: &Arc<WorkspaceState>, caller: &Caller, args: &Struct, op_type: i32) -> Struct {
    let user = &caller.user.user_name;
    let (raw, guid) = guid_of(args, 1);
    let Some(session) = guid.filter(|g| ws.sql_sessions.session(g, user).is_some()) else {
        return invalid_session(&raw);
    };
    let rs = listing(ws, caller, args, op_type);
    let op = ws
        .sql_sessions
        .add_op(user, session, Work::Listing(Arc::new(rs)));
    let rows = args
        .get_struct(1281)
        .map(|d| max_rows(d.get_i64(1)))
        .unwrap_or(DEFAULT_FETCH_ROWS);
    Struct::new()
        .with(1, ok_status())
        .with(2, operation_handle(&op, op_type))
        .with(1281, Value::Struct(direct_results(ws, &op, user, rows)))
}

/// A JDBC-style search pattern (`%` any run, `_` one character; `*` is also accepted, as
/// Databricks does); an absent or empty pattern matches everything. Case-insensitive.
fn like(pattern: Option<&str>, name: &str) -> bool {
    fn go(p: &[char], s: &[char]) -> bool {
        match p.split_first() {
            None => s.is_empty(),
            Some(('%' | '*', rest)) => (0..=s.len()).any(|i| go(rest, &s[i..])),
            Some(('_', rest)) => !s.is_empty() && go(rest, &s[1..]),
            Some((c, rest)) => {
                s.first().is_some_and(|x| x.eq_ignore_ascii_case(c)) && go(rest, &s[1..])
            }
        }
    }
    match pattern.filter(|p| !p.is_empty()) {
        None => true,
        Some(p) => {
            let p: Vec<char> = p.chars().take(256).collect();
            let s: Vec<char> = name.chars().collect();
            go(&p, &s)
        }
    }
}

fn col(name: &str, ty: DataType) -> OutColumn {
    OutColumn {
        name: name.to_string(),
        type_text: ty.type_text().to_string(),
        type_name: ty.type_name().to_string(),
    }
}

/// `java.sql.Types` of a column type, as the JDBC metadata calls report it.
fn jdbc_type(ty: DataType) -> i32 {
    match ty {
        DataType::Boolean => 16,
        DataType::Int => 4,
        DataType::BigInt => -5,
        DataType::Double => 8,
        DataType::String => 12,
        DataType::Date => 91,
        DataType::Timestamp => 93,
    }
}

fn listing(ws: &WorkspaceState, caller: &Caller, args: &Struct, op_type: i32) -> ResultSet {
    let f = &ws.fixture;
    let who = &caller.principal;
    let catalog_p = args.get_str(2);
    let schema_p = args.get_str(3);
    let table_p = args.get_str(4);
    let s = |v: &str| Some(v.to_string());
    let tables = || {
        visible_catalogs(f, who)
            .filter(move |c| like(catalog_p, &c.name))
            .flat_map(move |c| visible_schemas(f, who, c))
            .filter(move |sc| like(schema_p, &sc.name))
            .flat_map(move |sc| visible_tables(f, who, sc))
            .filter(move |t| like(table_p, &t.name))
    };
    let table_type = |t: &Table| {
        if t.view_definition.is_some() {
            "VIEW"
        } else {
            "TABLE"
        }
    };
    let (columns, rows): (Vec<OutColumn>, Vec<Vec<Option<String>>>) = match op_type {
        GET_CATALOGS => (
            vec![col("TABLE_CAT", DataType::String)],
            visible_catalogs(f, who).map(|c| vec![s(&c.name)]).collect(),
        ),
        GET_SCHEMAS => (
            vec![
                col("TABLE_SCHEM", DataType::String),
                col("TABLE_CATALOG", DataType::String),
            ],
            visible_catalogs(f, who)
                .filter(|c| like(catalog_p, &c.name))
                .flat_map(|c| visible_schemas(f, who, c))
                .filter(|sc| like(schema_p, &sc.name))
                .map(|sc| vec![s(&sc.name), s(&sc.catalog)])
                .collect(),
        ),
        GET_TABLES => {
            let types: Vec<String> = args
                .get_list(5)
                .unwrap_or_default()
                .iter()
                .filter_map(|v| match v {
                    Value::Bin(b) => String::from_utf8(b.clone()).ok(),
                    _ => None,
                })
                .collect();
            let names = [
                "TABLE_CAT",
                "TABLE_SCHEM",
                "TABLE_NAME",
                "TABLE_TYPE",
                "REMARKS",
                "TYPE_CAT",
                "TYPE_SCHEM",
                "TYPE_NAME",
                "SELF_REFERENCING_COL_NAME",
                "REF_GENERATION",
            ];
            (
                names.iter().map(|n| col(n, DataType::String)).collect(),
                tables()
                    .filter(|t| {
                        types.is_empty()
                            || types.iter().any(|x| x.eq_ignore_ascii_case(table_type(t)))
                    })
                    .map(|t| {
                        vec![
                            s(&t.catalog),
                            s(&t.schema),
                            s(&t.name),
                            s(table_type(t)),
                            Some(t.comment.clone().unwrap_or_default()),
                            None,
                            None,
                            None,
                            None,
                            None,
                        ]
                    })
                    .collect(),
            )
        }
        _ => {
            let column_p = args.get_str(5);
            use DataType::{Int, String as Str};
            let spec: [(&str, DataType); 23] = [
                ("TABLE_CAT", Str),
                ("TABLE_SCHEM", Str),
                ("TABLE_NAME", Str),
                ("COLUMN_NAME", Str),
                ("DATA_TYPE", Int),
                ("TYPE_NAME", Str),
                ("COLUMN_SIZE", Int),
                ("BUFFER_LENGTH", Int),
                ("DECIMAL_DIGITS", Int),
                ("NUM_PREC_RADIX", Int),
                ("NULLABLE", Int),
                ("REMARKS", Str),
                ("COLUMN_DEF", Str),
                ("SQL_DATA_TYPE", Int),
                ("SQL_DATETIME_SUB", Int),
                ("CHAR_OCTET_LENGTH", Int),
                ("ORDINAL_POSITION", Int),
                ("IS_NULLABLE", Str),
                ("SCOPE_CATALOG", Str),
                ("SCOPE_SCHEMA", Str),
                ("SCOPE_TABLE", Str),
                ("SOURCE_DATA_TYPE", Int),
                ("IS_AUTO_INCREMENT", Str),
            ];
            let mut rows = Vec::new();
            for t in tables() {
                for (i, c) in t.columns.iter().enumerate() {
                    if !like(column_p, &c.name) {
                        continue;
                    }
                    let ty = c.data_type;
                    let numeric = matches!(ty, DataType::Int | DataType::BigInt | DataType::Double);
                    rows.push(vec![
                        s(&t.catalog),
                        s(&t.schema),
                        s(&t.name),
                        s(&c.name),
                        Some(jdbc_type(ty).to_string()),
                        s(ty.type_text()),
                        None,
                        None,
                        None,
                        numeric.then(|| "10".to_string()),
                        Some("1".into()),
                        Some(String::new()),
                        None,
                        None,
                        None,
                        None,
                        Some(i.to_string()),
                        s("YES"),
                        None,
                        None,
                        None,
                        None,
                        s("NO"),
                    ]);
                }
            }
            (spec.iter().map(|(n, t)| col(n, *t)).collect(), rows)
        }
    };
    ResultSet {
        columns,
        rows,
        truncated: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_patterns_match_like_jdbc() {
        assert!(like(None, "orders"));
        assert!(like(Some(""), "orders"));
        assert!(like(Some("%"), "orders"));
        assert!(like(Some("*"), "orders"));
        assert!(like(Some("ord%"), "orders"));
        assert!(like(Some("ORD_RS"), "orders"));
        assert!(!like(Some("ord"), "orders"));
        assert!(!like(Some("sal%"), "orders"));
    }

    #[test]
    fn columns_carry_typed_values_and_a_null_bitmap() {
        let rs = ResultSet {
            columns: vec![col("n", DataType::Int), col("s", DataType::String)],
            rows: (0..10)
                .map(|i| vec![(i % 3 != 0).then(|| i.to_string()), Some(format!("v{i}"))])
                .collect(),
            truncated: false,
        };
        let c = column(&rs, 0, 0, 10);
        let typed = c.get_struct(4).expect("i32Val");
        assert_eq!(typed.get_list(1).map(<[Value]>::len), Some(10));
        // Rows 0, 3, 6, 9 are null.
        assert_eq!(typed.get_bytes(2), Some(&[0b0100_1001u8, 0b0000_0010][..]));
        assert!(column(&rs, 1, 2, 5).get_struct(7).is_some());
    }
}
