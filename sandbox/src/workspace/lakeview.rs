//! AI/BI (Lakeview) dashboards: `GET /api/2.0/lakeview/dashboards` (list), `.../{id}` (the draft,
//! with its `serialized_dashboard`) and `.../{id}/published`, with dashboard ACLs
//! ([`super::permissions`]): a dashboard is listed to and readable by principals holding any
//! level on it (`CAN_READ` and up); others get 403, a missing one 404.
//!
//! No published dashboard embeds its publisher's credentials (`embed_credentials: false`), so
//! each dataset query runs as the viewer on the dashboard's warehouse: a client reads the
//! dataset's query from `serialized_dashboard` and runs it through the Statement Execution API
//! with the viewer's own token, and the viewer's grants, row filters and masks apply.

// Handlers return the finished error response; it is built once per request, so boxing it
// would only add an allocation.
#![allow(clippy::result_large_err)]

use std::sync::Arc;

use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::permissions::DASHBOARDS;
use super::{api_error, Caller, WorkspaceState};
use crate::fixture::Dashboard;

/// Fixed times so responses are stable.
const CREATED: &str = "2025-05-01T09:00:00.000Z";
const UPDATED: &str = "2025-05-02T09:00:00.000Z";
const PUBLISHED: &str = "2025-05-02T09:30:00.000Z";

fn path(d: &Dashboard) -> String {
    format!("{}/{}.lvdash.json", d.parent_path, d.display_name)
}

/// The dashboard definition: one dataset per query, one table widget per dataset.
fn serialized(d: &Dashboard) -> String {
    let datasets: Vec<Value> = d
        .datasets
        .iter()
        .map(|ds| json!({ "name": ds.name, "displayName": ds.display_name, "queryLines": [ds.query] }))
        .collect();
    let layout: Vec<Value> = d
        .datasets
        .iter()
        .enumerate()
        .map(|(i, ds)| {
            json!({
                "widget": {
                    "name": format!("w{}", ds.name),
                    "queries": [{
                        "name": "main_query",
                        "query": { "datasetName": ds.name, "disaggregated": true },
                    }],
                    "spec": { "version": 1, "widgetType": "table", "frame": { "title": ds.display_name, "showTitle": true } },
                },
                "position": { "x": 0, "y": i * 6, "width": 6, "height": 6 },
            })
        })
        .collect();
    json!({
        "datasets": datasets,
        "pages": [{ "name": "p1", "displayName": "Overview", "layout": layout }],
    })
    .to_string()
}

fn summary(d: &Dashboard) -> Value {
    json!({
        "dashboard_id": d.id,
        "display_name": d.display_name,
        "path": path(d),
        "parent_path": d.parent_path,
        "create_time": CREATED,
        "update_time": UPDATED,
        "lifecycle_state": "ACTIVE",
        "warehouse_id": d.warehouse_id,
    })
}

fn readable<'w>(
    ws: &'w WorkspaceState,
    caller: &Caller,
    id: &str,
) -> Result<&'w Dashboard, Response> {
    let Some(d) = ws.fixture.dashboard(id) else {
        return Err(api_error(
            StatusCode::NOT_FOUND,
            "RESOURCE_DOES_NOT_EXIST",
            format!("Unable to find dashboard [dashboardId={id}]"),
        ));
    };
    if ws.acls.level(&DASHBOARDS, id, &caller.principal).is_none() {
        return Err(api_error(
            StatusCode::FORBIDDEN,
            "PERMISSION_DENIED",
            format!(
                "{} does not have permission to view dashboard {id}.",
                caller.user.user_name
            ),
        ));
    }
    Ok(d)
}

pub(super) async fn list(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
) -> Response {
    let list: Vec<Value> = ws
        .fixture
        .dashboards
        .iter()
        .filter(|d| {
            ws.acls
                .level(&DASHBOARDS, &d.id, &caller.principal)
                .is_some()
        })
        .map(summary)
        .collect();
    Json(json!({ "dashboards": list })).into_response()
}

pub(super) async fn get(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    match readable(&ws, &caller, &id) {
        Ok(d) => {
            let mut v = summary(d);
            v["serialized_dashboard"] = json!(serialized(d));
            v["etag"] = json!("1");
            Json(v).into_response()
        }
        Err(e) => e,
    }
}

pub(super) async fn published(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    match readable(&ws, &caller, &id) {
        Ok(d) if d.published => Json(json!({
            "display_name": d.display_name,
            "embed_credentials": false,
            "revision_create_time": PUBLISHED,
            "warehouse_id": d.warehouse_id,
        }))
        .into_response(),
        Ok(_) => api_error(
            StatusCode::NOT_FOUND,
            "RESOURCE_DOES_NOT_EXIST",
            format!("Unable to find published dashboard [dashboardId={id}]"),
        ),
        Err(e) => e,
    }
}
