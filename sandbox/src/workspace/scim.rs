//! `GET /api/2.0/preview/scim/v2/Me`: the caller as a SCIM 2.0 user, in Databricks' shape.

use axum::extract::Extension;
use axum::Json;
use serde_json::{json, Value};
use std::sync::Arc;

use axum::extract::State;

use super::{Caller, WorkspaceState};

pub(super) async fn me(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
) -> Json<Value> {
    let user = &caller.user;
    let groups: Vec<Value> = user
        .groups
        .iter()
        .filter_map(|name| ws.fixture.group(name))
        .map(|g| {
            json!({
                "display": g.name,
                "type": "direct",
                "value": g.id,
                "$ref": format!("Groups/{}", g.id),
            })
        })
        .collect();
    Json(json!({
        "emails": [{ "type": "work", "value": user.user_name, "primary": true }],
        "displayName": user.display_name(),
        "schemas": [
            "urn:ietf:params:scim:schemas:core:2.0:User",
            "urn:ietf:params:scim:schemas:extension:workspace:2.0:User"
        ],
        "name": { "familyName": user.family_name, "givenName": user.given_name },
        "active": true,
        "groups": groups,
        "id": user.id,
        "userName": user.user_name,
    }))
}
