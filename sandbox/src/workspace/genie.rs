//! Genie (AI/BI) conversations: `/api/2.0/genie/spaces/...`.
//!
//! A space answers the questions its fixture lists ([`crate::fixture::GenieSpace::answer`]; no
//! language model here) by generating SQL and running it **as the asking user** on the space's
//! warehouse, through the same engine as the Statement Execution API, so the user's grants, row
//! filters and masks decide the result. A message is `EXECUTING_QUERY` while its statement runs,
//! then `COMPLETED`, or `FAILED` with `SQL_EXECUTION_EXCEPTION` when the statement failed (for
//! instance on `INSUFFICIENT_PERMISSIONS`). Running a space needs CAN_RUN on it; only the user
//! who started a conversation can read it.

// Handlers return the finished error response; it is built once per request, so boxing it
// would only add an allocation.
#![allow(clippy::result_large_err)]

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use axum::extract::rejection::JsonRejection;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::statements::{self, Statement};
use super::{api_error, lock, Caller, WorkspaceState};
use crate::fixture::{GenieQuestion, GenieSpace};
use crate::sql;
use crate::util::{now_ms, random_hex};

/// Conversations kept, oldest dropped first.
const MAX_CONVERSATIONS: usize = 1000;
/// Messages per conversation.
const MAX_MESSAGES: usize = 100;
/// Longest question accepted.
const MAX_CONTENT: usize = 10_000;

pub(super) struct Message {
    id: String,
    content: String,
    created_ms: i64,
    question: Option<GenieQuestion>,
    attachment_id: String,
    statement: Option<Arc<Statement>>,
}

pub(super) struct Conversation {
    id: String,
    space_id: String,
    owner: String,
    user_id: i64,
    title: String,
    created_ms: i64,
    messages: Vec<Arc<Message>>,
}

#[derive(Default)]
pub(super) struct Conversations {
    inner: Mutex<(HashMap<String, Conversation>, VecDeque<String>)>,
}

impl Conversations {
    pub fn clear(&self) {
        let mut inner = lock(&self.inner);
        inner.0.clear();
        inner.1.clear();
    }
}

/// Genie ids are 32 hex characters.
fn genie_id() -> String {
    random_hex(16)
}

#[derive(Deserialize)]
pub(super) struct MessageBody {
    content: Option<String>,
}

fn space_for<'f>(
    ws: &'f WorkspaceState,
    caller: &Caller,
    id: &str,
) -> Result<&'f GenieSpace, Response> {
    let Some(space) = ws.fixture.genie_space(id) else {
        return Err(api_error(
            StatusCode::NOT_FOUND,
            "RESOURCE_DOES_NOT_EXIST",
            format!("Genie space {id} does not exist."),
        ));
    };
    if !space.can_run.iter().any(|p| caller.principal.matches(p)) {
        return Err(api_error(
            StatusCode::FORBIDDEN,
            "PERMISSION_DENIED",
            format!(
                "User {} does not have CAN_RUN permission on Genie space {id}.",
                caller.user.user_name
            ),
        ));
    }
    Ok(space)
}

fn content_of(body: Result<Json<MessageBody>, JsonRejection>) -> Result<String, Response> {
    let body = match body {
        Ok(Json(b)) => b,
        Err(e) => {
            return Err(api_error(
                StatusCode::BAD_REQUEST,
                "MALFORMED_REQUEST",
                format!("Could not parse request object: {}", e.body_text()),
            ))
        }
    };
    match body.content {
        Some(c) if !c.trim().is_empty() && c.len() <= MAX_CONTENT => Ok(c),
        Some(c) if c.len() > MAX_CONTENT => Err(api_error(
            StatusCode::BAD_REQUEST,
            "INVALID_PARAMETER_VALUE",
            format!("content must be at most {MAX_CONTENT} characters"),
        )),
        _ => Err(api_error(
            StatusCode::BAD_REQUEST,
            "INVALID_PARAMETER_VALUE",
            "Missing required field: content",
        )),
    }
}

/// Generates the SQL for the question (if the space knows one) and starts it as the caller.
fn ask(
    ws: &Arc<WorkspaceState>,
    caller: &Caller,
    space: &GenieSpace,
    content: String,
) -> Arc<Message> {
    let question = space.answer(&content).cloned();
    let statement = question.as_ref().map(|q| {
        statements::submit(
            ws,
            caller.clone(),
            sql::Request {
                sql: q.sql.clone(),
                catalog: "main".into(),
                schema: "default".into(),
                params: vec![],
                row_limit: None,
            },
        )
    });
    Arc::new(Message {
        id: genie_id(),
        content,
        created_ms: now_ms(),
        question,
        attachment_id: genie_id(),
        statement,
    })
}

fn message_json(c: &Conversation, m: &Message) -> Value {
    let mut attachments = Vec::new();
    let mut status = "COMPLETED";
    let mut error = Value::Null;
    match (&m.question, &m.statement) {
        (Some(q), Some(stmt)) => {
            let rows = stmt.result().map(|rs| rs.rows.len());
            attachments.push(json!({
                "attachment_id": m.attachment_id,
                "query": {
                    "id": m.attachment_id,
                    "title": q.title,
                    "description": q.description,
                    "query": q.sql,
                    "statement_id": stmt.id,
                    "query_result_metadata": { "row_count": rows, "is_truncated": false },
                    "last_updated_timestamp": m.created_ms,
                },
            }));
            if !stmt.is_done() {
                status = "EXECUTING_QUERY";
            } else if let Some(e) = stmt.error() {
                status = "FAILED";
                error = json!({ "error": e.message, "type": "SQL_EXECUTION_EXCEPTION" });
            }
        }
        _ => attachments.push(json!({
            "attachment_id": m.attachment_id,
            "text": {
                "id": m.attachment_id,
                "content": "I can only answer the questions this space was set up for. \
                            Try asking about orders by region or largest customers.",
            },
        })),
    }
    let mut v = json!({
        "id": m.id,
        "message_id": m.id,
        "space_id": c.space_id,
        "conversation_id": c.id,
        "user_id": c.user_id,
        "content": m.content,
        "status": status,
        "attachments": attachments,
        "created_timestamp": m.created_ms,
        "last_updated_timestamp": m.created_ms,
    });
    if !error.is_null() {
        v["error"] = error;
    }
    v
}

fn conversation_json(c: &Conversation) -> Value {
    json!({
        "id": c.id,
        "conversation_id": c.id,
        "space_id": c.space_id,
        "user_id": c.user_id,
        "title": c.title,
        "created_timestamp": c.created_ms,
        "last_updated_timestamp": c.created_ms,
    })
}

fn space_json(s: &GenieSpace) -> Value {
    json!({
        "space_id": s.id,
        "title": s.title,
        "description": s.description,
        "warehouse_id": s.warehouse_id,
    })
}

// === Handlers ===

pub(super) async fn list_spaces(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
) -> Response {
    let spaces: Vec<Value> = ws
        .fixture
        .genie_spaces
        .iter()
        .filter(|s| s.can_run.iter().any(|p| caller.principal.matches(p)))
        .map(space_json)
        .collect();
    Json(json!({ "spaces": spaces })).into_response()
}

pub(super) async fn get_space(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
    Path(space_id): Path<String>,
) -> Response {
    match space_for(&ws, &caller, &space_id) {
        Ok(s) => Json(space_json(s)).into_response(),
        Err(e) => e,
    }
}

pub(super) async fn start_conversation(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
    Path(space_id): Path<String>,
    body: Result<Json<MessageBody>, JsonRejection>,
) -> Response {
    let space = match space_for(&ws, &caller, &space_id) {
        Ok(s) => s,
        Err(e) => return e,
    };
    let content = match content_of(body) {
        Ok(c) => c,
        Err(e) => return e,
    };
    let message = ask(&ws, &caller, space, content.clone());
    let conversation = Conversation {
        id: genie_id(),
        space_id: space.id.clone(),
        owner: caller.user.user_name.clone(),
        user_id: caller.user.id.parse().unwrap_or(0),
        title: content.chars().take(80).collect(),
        created_ms: now_ms(),
        messages: vec![message.clone()],
    };
    let body = json!({
        "conversation_id": conversation.id,
        "message_id": message.id,
        "conversation": conversation_json(&conversation),
        "message": message_json(&conversation, &message),
    });
    let mut inner = lock(&ws.genie.inner);
    while inner.1.len() >= MAX_CONVERSATIONS {
        if let Some(old) = inner.1.pop_front() {
            inner.0.remove(&old);
        }
    }
    inner.1.push_back(conversation.id.clone());
    inner.0.insert(conversation.id.clone(), conversation);
    drop(inner);
    Json(body).into_response()
}

/// The conversation if it exists in that space and the caller started it (404 otherwise, so
/// nobody learns of another user's conversations).
fn with_conversation<R>(
    ws: &WorkspaceState,
    caller: &Caller,
    space_id: &str,
    conversation_id: &str,
    f: impl FnOnce(&mut Conversation) -> Result<R, Response>,
) -> Result<R, Response> {
    let mut inner = lock(&ws.genie.inner);
    match inner.0.get_mut(conversation_id) {
        Some(c)
            if c.space_id == space_id && c.owner.eq_ignore_ascii_case(&caller.user.user_name) =>
        {
            f(c)
        }
        _ => Err(api_error(
            StatusCode::NOT_FOUND,
            "RESOURCE_DOES_NOT_EXIST",
            format!("Conversation {conversation_id} does not exist."),
        )),
    }
}

fn find_message(c: &Conversation, message_id: &str) -> Result<Arc<Message>, Response> {
    c.messages
        .iter()
        .find(|m| m.id == message_id)
        .cloned()
        .ok_or_else(|| {
            api_error(
                StatusCode::NOT_FOUND,
                "RESOURCE_DOES_NOT_EXIST",
                format!("Message {message_id} does not exist."),
            )
        })
}

pub(super) async fn create_message(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
    Path((space_id, conversation_id)): Path<(String, String)>,
    body: Result<Json<MessageBody>, JsonRejection>,
) -> Response {
    let space = match space_for(&ws, &caller, &space_id) {
        Ok(s) => s,
        Err(e) => return e,
    };
    let content = match content_of(body) {
        Ok(c) => c,
        Err(e) => return e,
    };
    let result = with_conversation(&ws, &caller, &space_id, &conversation_id, |c| {
        if c.messages.len() >= MAX_MESSAGES {
            return Err(api_error(
                StatusCode::BAD_REQUEST,
                "INVALID_PARAMETER_VALUE",
                format!("A conversation holds at most {MAX_MESSAGES} messages."),
            ));
        }
        Ok(())
    });
    if let Err(e) = result {
        return e;
    }
    let message = ask(&ws, &caller, space, content);
    match with_conversation(&ws, &caller, &space_id, &conversation_id, |c| {
        c.messages.push(message.clone());
        Ok(message_json(c, &message))
    }) {
        Ok(v) => Json(v).into_response(),
        Err(e) => e,
    }
}

pub(super) async fn get_message(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
    Path((space_id, conversation_id, message_id)): Path<(String, String, String)>,
) -> Response {
    if let Err(e) = space_for(&ws, &caller, &space_id) {
        return e;
    }
    match with_conversation(&ws, &caller, &space_id, &conversation_id, |c| {
        let m = find_message(c, &message_id)?;
        Ok(message_json(c, &m))
    }) {
        Ok(v) => Json(v).into_response(),
        Err(e) => e,
    }
}

fn query_result(
    ws: &WorkspaceState,
    caller: &Caller,
    space_id: &str,
    conversation_id: &str,
    message_id: &str,
    attachment_id: Option<&str>,
) -> Response {
    if let Err(e) = space_for(ws, caller, space_id) {
        return e;
    }
    let found = with_conversation(ws, caller, space_id, conversation_id, |c| {
        find_message(c, message_id)
    });
    let m = match found {
        Ok(m) => m,
        Err(e) => return e,
    };
    match (&m.statement, attachment_id) {
        (Some(stmt), None) => Json(json!({ "statement_response": stmt.to_json() })).into_response(),
        (Some(stmt), Some(a)) if a == m.attachment_id => {
            Json(json!({ "statement_response": stmt.to_json() })).into_response()
        }
        _ => api_error(
            StatusCode::NOT_FOUND,
            "RESOURCE_DOES_NOT_EXIST",
            format!(
                "Message {message_id} has no query attachment {}.",
                attachment_id.unwrap_or("")
            ),
        ),
    }
}

pub(super) async fn attachment_query_result(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
    Path((space_id, conversation_id, message_id, attachment_id)): Path<(
        String,
        String,
        String,
        String,
    )>,
) -> Response {
    query_result(
        &ws,
        &caller,
        &space_id,
        &conversation_id,
        &message_id,
        Some(&attachment_id),
    )
}

pub(super) async fn message_query_result(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
    Path((space_id, conversation_id, message_id)): Path<(String, String, String)>,
) -> Response {
    query_result(&ws, &caller, &space_id, &conversation_id, &message_id, None)
}
