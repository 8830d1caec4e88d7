//! What `databricks-sql-connector` asks of a workspace on its own, besides SQL: its feature
//! flags (`GET /api/2.0/connector-service/feature-flags/<driver>/<version>`) and, when the flag
//! turns it on, client telemetry (`POST /telemetry-ext`). Shapes as the connector reads them
//! (`FeatureFlagsResponse`, `TelemetryResponse`); the telemetry itself is counted and dropped.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::{api_error, WorkspaceState};

/// The flag that turns the Python connector's telemetry on.
pub const PYTHON_TELEMETRY_FLAG: &str =
    "databricks.partnerplatform.clientConfigsFeatureFlags.enableTelemetryForPythonDriver";

pub(super) async fn feature_flags(Path((driver, _version)): Path<(String, String)>) -> Response {
    let flags = if driver.eq_ignore_ascii_case("PYTHON") {
        json!([{ "name": PYTHON_TELEMETRY_FLAG, "value": "true" }])
    } else {
        json!([])
    };
    Json(json!({ "flags": flags, "ttl_seconds": 900 })).into_response()
}

pub(super) async fn upload(
    State(ws): State<Arc<WorkspaceState>>,
    body: Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Ok(Json(body)) = body else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "MALFORMED_REQUEST",
            "Could not parse request object.",
        );
    };
    let logs = body["protoLogs"].as_array().map_or(0, Vec::len);
    let items = body["items"].as_array().map_or(0, Vec::len);
    ws.telemetry_logs
        .fetch_add(logs as u64, std::sync::atomic::Ordering::Relaxed);
    Json(json!({
        "errors": [],
        "numSuccess": items,
        "numProtoSuccess": logs,
        "numRealtimeSuccess": 0,
    }))
    .into_response()
}
