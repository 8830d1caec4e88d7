//! Databricks managed MCP servers, speaking MCP streamable HTTP (JSON responses, no SSE):
//!
//! - `/api/2.0/mcp/sql`: tool `execute_sql` runs a query as the caller;
//! - `/api/2.0/mcp/genie/{space_id}`: tool `query_space_<space_id>` asks the Genie space;
//! - `/api/2.0/mcp/functions/{catalog}/{schema}`: one tool per Unity Catalog function the caller
//!   may execute, named `<catalog>__<schema>__<function>`.
//!
//! Every tool runs as the caller, through the same SQL engine as the Statement Execution API, so
//! Unity Catalog grants, row filters and masks decide each answer. The server is stateless: it
//! hands out an `Mcp-Session-Id` on `initialize` and does not require it back. `GET` (a
//! server-to-client stream) answers 405, which clients treat as "no stream".

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Extension, Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use super::statements;
use super::{api_error, Caller, LogNote, WorkspaceState};
use crate::fixture::{DataType, Function, Privilege, Securable};
use crate::sql::{self, Param};

/// Protocol versions this server speaks, newest first.
const PROTOCOL_VERSIONS: &[&str] = &["2025-06-18", "2025-03-26", "2024-11-05"];
/// How long a tool call waits for its statement.
const TOOL_WAIT: Duration = Duration::from_secs(30);
/// Rows a tool returns at most.
const MAX_TOOL_ROWS: usize = 1000;
/// Largest JSON-RPC request accepted.
const MAX_BODY: usize = 1024 * 1024;

/// Which managed server a request addressed.
enum Server {
    Sql,
    Genie(String),
    Functions(String, String),
}

impl Server {
    fn name(&self) -> String {
        match self {
            Server::Sql => "databricks-sql".into(),
            Server::Genie(id) => format!("genie-{id}"),
            Server::Functions(c, s) => format!("uc-functions-{c}.{s}"),
        }
    }
}

pub(super) async fn sql_server(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Response {
    serve(ws, caller, Server::Sql, body).await
}

pub(super) async fn genie_server(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
    Path(space_id): Path<String>,
    body: Bytes,
) -> Response {
    let Some(space) = ws.fixture.genie_space(&space_id) else {
        return api_error(
            StatusCode::NOT_FOUND,
            "RESOURCE_DOES_NOT_EXIST",
            format!("Genie space {space_id} does not exist."),
        );
    };
    if !space.can_run.iter().any(|p| caller.principal.matches(p)) {
        return api_error(
            StatusCode::FORBIDDEN,
            "PERMISSION_DENIED",
            format!(
                "User {} does not have CAN_RUN permission on Genie space {space_id}.",
                caller.user.user_name
            ),
        );
    }
    serve(ws, caller, Server::Genie(space_id), body).await
}

pub(super) async fn functions_server(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
    Path((catalog, schema)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    if ws.fixture.schema(&catalog, &schema).is_none() {
        return api_error(
            StatusCode::NOT_FOUND,
            "SCHEMA_DOES_NOT_EXIST",
            format!("Schema '{catalog}.{schema}' does not exist."),
        );
    }
    serve(ws, caller, Server::Functions(catalog, schema), body).await
}

/// `GET` and `DELETE` on an MCP endpoint: no server-initiated stream, no sessions to end.
pub(super) async fn method_not_allowed() -> Response {
    let mut resp = api_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "METHOD_NOT_ALLOWED",
        "This MCP server accepts POST only.",
    );
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("POST"));
    resp
}

fn rpc_result(id: &Value, result: Value) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "result": result })
}

fn rpc_error(id: &Value, code: i64, message: impl Into<String>) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "error": { "code": code, "message": message.into() } })
}

fn with_action(mut resp: Response, action: &'static str) -> Response {
    resp.extensions_mut().insert(LogNote {
        action: Some(action),
        user: None,
    });
    resp
}

async fn serve(ws: Arc<WorkspaceState>, caller: Caller, server: Server, body: Bytes) -> Response {
    if body.len() > MAX_BODY {
        return api_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "INVALID_PARAMETER_VALUE",
            "The MCP request is too large.",
        );
    }
    let msg: Value = match serde_json::from_slice(&body) {
        Ok(Value::Object(m)) => Value::Object(m),
        Ok(_) => {
            return with_action(
                (
                    StatusCode::BAD_REQUEST,
                    Json(rpc_error(&Value::Null, -32600, "batches are not supported")),
                )
                    .into_response(),
                "invalidRequest",
            )
        }
        Err(e) => {
            return with_action(
                (
                    StatusCode::BAD_REQUEST,
                    Json(rpc_error(&Value::Null, -32700, format!("parse error: {e}"))),
                )
                    .into_response(),
                "invalidRequest",
            )
        }
    };
    let method = msg.get("method").and_then(Value::as_str).unwrap_or("");
    let Some(id) = msg.get("id").cloned() else {
        // A notification (or a response to a request we never sent): accepted, no body.
        return with_action(StatusCode::ACCEPTED.into_response(), "notification");
    };
    let params = msg.get("params").cloned().unwrap_or(Value::Null);
    let (reply, action) = match method {
        "initialize" => {
            let asked = params
                .get("protocolVersion")
                .and_then(Value::as_str)
                .unwrap_or("");
            let version = PROTOCOL_VERSIONS
                .iter()
                .find(|v| **v == asked)
                .unwrap_or(&PROTOCOL_VERSIONS[0]);
            let result = json!({
                "protocolVersion": version,
                "capabilities": { "tools": { "listChanged": false } },
                "serverInfo": { "name": server.name(), "version": "1.0.0" },
            });
            let mut resp = Json(rpc_result(&id, result)).into_response();
            if let Ok(v) = HeaderValue::from_str(&crate::util::uuid_v4()) {
                resp.headers_mut().insert("mcp-session-id", v);
            }
            return with_action(resp, "initialize");
        }
        "ping" => (rpc_result(&id, json!({})), "ping"),
        "tools/list" => (
            rpc_result(&id, json!({ "tools": tools(&ws, &caller, &server) })),
            "listTools",
        ),
        "tools/call" => {
            let name = params.get("name").and_then(Value::as_str).unwrap_or("");
            let args = params
                .get("arguments")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            let reply = match call(&ws, &caller, &server, name, &args).await {
                Ok(result) => rpc_result(&id, result),
                Err(message) => rpc_error(&id, -32602, message),
            };
            (reply, "callTool")
        }
        other => (
            rpc_error(&id, -32601, format!("method not found: {other}")),
            "unknownMethod",
        ),
    };
    with_action(Json(reply).into_response(), action)
}

// === Tools ===

fn query_schema(description: &str) -> Value {
    json!({
        "type": "object",
        "properties": { "query": { "type": "string", "description": description } },
        "required": ["query"],
    })
}

fn function_tool_name(f: &Function) -> String {
    format!("{}__{}__{}", f.catalog, f.schema, f.name)
}

/// The functions of the addressed schema the caller may execute.
fn executable<'f>(ws: &'f WorkspaceState, caller: &Caller, c: &str, s: &str) -> Vec<&'f Function> {
    let fx = &ws.fixture;
    let who = &caller.principal;
    fx.functions
        .iter()
        .filter(|f| f.catalog.eq_ignore_ascii_case(c) && f.schema.eq_ignore_ascii_case(s))
        .filter(|f| {
            fx.has_privilege(
                who,
                &Securable::Catalog(f.catalog.clone()),
                Privilege::UseCatalog,
            ) && fx.has_privilege(
                who,
                &Securable::Schema(f.catalog.clone(), f.schema.clone()),
                Privilege::UseSchema,
            ) && fx.has_privilege(
                who,
                &Securable::Function(f.catalog.clone(), f.schema.clone(), f.name.clone()),
                Privilege::Execute,
            )
        })
        .collect()
}

fn json_type(t: DataType) -> &'static str {
    match t {
        DataType::Boolean => "boolean",
        DataType::Int | DataType::BigInt => "integer",
        DataType::Double => "number",
        _ => "string",
    }
}

fn tools(ws: &WorkspaceState, caller: &Caller, server: &Server) -> Vec<Value> {
    match server {
        Server::Sql => vec![json!({
            "name": "execute_sql",
            "description": "Run a SQL query on the workspace's SQL warehouse as the calling user \
                            and return the result rows.",
            "inputSchema": query_schema("The SQL query to run"),
        })],
        Server::Genie(id) => {
            let title = ws
                .fixture
                .genie_space(id)
                .map(|s| s.title.clone())
                .unwrap_or_default();
            vec![json!({
                "name": format!("query_space_{id}"),
                "description": format!("Ask the Genie space '{title}' a question in natural language."),
                "inputSchema": query_schema("The question to ask"),
            })]
        }
        Server::Functions(c, s) => executable(ws, caller, c, s)
            .into_iter()
            .map(|f| {
                let mut props = Map::new();
                for (name, ty, comment) in &f.params {
                    props.insert(
                        name.clone(),
                        json!({ "type": json_type(*ty), "description": comment }),
                    );
                }
                let required: Vec<&String> = f.params.iter().map(|(n, _, _)| n).collect();
                json!({
                    "name": function_tool_name(f),
                    "description": f.comment,
                    "inputSchema": { "type": "object", "properties": props, "required": required },
                })
            })
            .collect(),
    }
}

fn text_result(text: String, is_error: bool) -> Value {
    json!({ "content": [{ "type": "text", "text": text }], "isError": is_error })
}

/// Runs SQL as the caller and renders the outcome as a tool result.
async fn run_sql(
    ws: &Arc<WorkspaceState>,
    caller: &Caller,
    sql_text: String,
    params: Vec<Param>,
) -> Value {
    let stmt = statements::submit(
        ws,
        caller.clone(),
        sql::Request {
            sql: sql_text,
            catalog: "main".into(),
            schema: "default".into(),
            params,
            row_limit: Some(MAX_TOOL_ROWS),
        },
    );
    if !statements::wait_done(&stmt, TOOL_WAIT).await {
        return text_result(
            json!({ "statement_id": stmt.id, "state": "RUNNING" }).to_string(),
            true,
        );
    }
    if let Some(rs) = stmt.result() {
        let columns: Vec<&str> = rs.columns.iter().map(|c| c.name.as_str()).collect();
        return text_result(
            json!({
                "statement_id": stmt.id,
                "state": "SUCCEEDED",
                "columns": columns,
                "rows": rs.rows,
                "truncated": rs.truncated,
            })
            .to_string(),
            false,
        );
    }
    let error = stmt
        .error()
        .map(|e| json!({ "error_code": e.error_code, "message": e.message }))
        .unwrap_or_else(|| json!({ "message": "the statement was canceled" }));
    text_result(
        json!({ "statement_id": stmt.id, "state": "FAILED", "error": error }).to_string(),
        true,
    )
}

fn string_arg(args: &Map<String, Value>, name: &str) -> Result<String, String> {
    match args.get(name) {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
        _ => Err(format!("missing required string argument: {name}")),
    }
}

async fn call(
    ws: &Arc<WorkspaceState>,
    caller: &Caller,
    server: &Server,
    name: &str,
    args: &Map<String, Value>,
) -> Result<Value, String> {
    match server {
        Server::Sql if name == "execute_sql" => {
            Ok(run_sql(ws, caller, string_arg(args, "query")?, vec![]).await)
        }
        Server::Genie(id) if name == format!("query_space_{id}") => {
            let question = string_arg(args, "query")?;
            let Some(space) = ws.fixture.genie_space(id) else {
                return Err(format!("unknown tool: {name}"));
            };
            match space.answer(&question) {
                Some(q) => {
                    let mut result = run_sql(ws, caller, q.sql.clone(), vec![]).await;
                    if let Some(Value::Array(content)) = result.get_mut("content") {
                        content.insert(
                            0,
                            json!({ "type": "text", "text": format!("{}: {}", q.title, q.sql) }),
                        );
                    }
                    Ok(result)
                }
                None => Ok(text_result(
                    "I can only answer the questions this space was set up for.".into(),
                    false,
                )),
            }
        }
        Server::Functions(c, s) => {
            let Some(f) = executable(ws, caller, c, s)
                .into_iter()
                .find(|f| function_tool_name(f) == name)
            else {
                return Err(format!("unknown tool: {name}"));
            };
            let mut params = Vec::new();
            for (pname, ty, _) in &f.params {
                let value = match args.get(pname) {
                    Some(Value::String(v)) => v.clone(),
                    Some(Value::Number(n)) => n.to_string(),
                    Some(Value::Bool(b)) => b.to_string(),
                    _ => return Err(format!("missing required argument: {pname}")),
                };
                params.push(Param {
                    name: pname.clone(),
                    type_: Some(ty.type_text().to_string()),
                    value: Some(value),
                });
            }
            Ok(run_sql(ws, caller, f.sql.clone(), params).await)
        }
        _ => Err(format!("unknown tool: {name}")),
    }
}
