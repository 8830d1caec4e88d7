//! Workspace API 2.0 over the fixture's file tree: `GET /api/2.0/workspace/list` and
//! `GET /api/2.0/workspace/get-status`, with notebook and folder ACLs
//! ([`crate::fixture::Fixture::can_read_object`]): a listing shows only what the caller may
//! read, and a private notebook of another user is refused.

// Handlers return the finished error response; it is built once per request, so boxing it
// would only add an allocation.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Extension, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::{api_error, Caller, WorkspaceState};
use crate::fixture::{ObjectType, WorkspaceObject};

/// A fixed modification time (2025-01-01T00:00:00Z) so listings are stable.
const MODIFIED_AT: i64 = 1_735_689_600_000;

fn object_json(o: &WorkspaceObject) -> Value {
    let mut v = json!({
        "object_type": o.object_type.as_str(),
        "path": o.path,
        "object_id": o.object_id,
        "resource_id": o.object_id.to_string(),
    });
    if o.object_type == ObjectType::Notebook {
        v["language"] = json!(o.language);
        v["created_at"] = json!(MODIFIED_AT);
        v["modified_at"] = json!(MODIFIED_AT);
    }
    v
}

/// The readable object at `?path=`, or the Databricks error for it.
fn resolve<'f>(
    ws: &'f WorkspaceState,
    caller: &Caller,
    q: &HashMap<String, String>,
) -> Result<&'f WorkspaceObject, Response> {
    let Some(raw) = q.get("path").filter(|p| !p.is_empty()) else {
        return Err(api_error(
            StatusCode::BAD_REQUEST,
            "INVALID_PARAMETER_VALUE",
            "Missing required field: path",
        ));
    };
    let path = if raw.len() > 1 {
        raw.trim_end_matches('/')
    } else {
        raw.as_str()
    };
    let Some(o) = ws.fixture.object(path) else {
        return Err(api_error(
            StatusCode::NOT_FOUND,
            "RESOURCE_DOES_NOT_EXIST",
            format!("Path ({path}) doesn't exist."),
        ));
    };
    if !ws.fixture.can_read_object(&caller.principal, &o.path) {
        return Err(api_error(
            StatusCode::FORBIDDEN,
            "PERMISSION_DENIED",
            format!(
                "{} does not have Can Read permissions on {}. Please contact the owner or an \
                 administrator for access.",
                caller.user.user_name, o.path
            ),
        ));
    }
    Ok(o)
}

pub(super) async fn list(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let dir = match resolve(&ws, &caller, &q) {
        Ok(o) => o,
        Err(e) => return e,
    };
    if dir.object_type != ObjectType::Directory {
        return Json(json!({ "objects": [object_json(dir)] })).into_response();
    }
    let prefix = if dir.path == "/" {
        "/".to_string()
    } else {
        format!("{}/", dir.path)
    };
    let objects: Vec<Value> = ws
        .fixture
        .objects
        .iter()
        .filter(|o| {
            o.path
                .strip_prefix(&prefix)
                .is_some_and(|rest| !rest.is_empty() && !rest.contains('/'))
        })
        .filter(|o| ws.fixture.can_read_object(&caller.principal, &o.path))
        .map(object_json)
        .collect();
    // An empty directory answers `{}`, as Databricks does.
    if objects.is_empty() {
        return Json(json!({})).into_response();
    }
    Json(json!({ "objects": objects })).into_response()
}

pub(super) async fn get_status(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    match resolve(&ws, &caller, &q) {
        Ok(o) => Json(object_json(o)).into_response(),
        Err(e) => e,
    }
}
