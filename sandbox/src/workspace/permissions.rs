//! Workspace object permissions (`/api/2.0/permissions/{type}/{id}`) for clusters and AI/BI
//! dashboards, and the ACL store the cluster and dashboard handlers consult.
//!
//! As in Databricks: reading an object's permissions needs some permission on it; setting (`PUT`,
//! replaces the direct grants) or updating (`PATCH`, adds or changes grants) needs `CAN_MANAGE`.
//! Workspace admins hold `CAN_MANAGE` on every object, shown as inherited from the root object
//! (`/clusters/`, `/dashboards/`). A principal's level is the highest one granted to it or to a
//! group it is in.

// Handlers return the finished error response; it is built once per request, so boxing it
// would only add an allocation.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::rejection::JsonRejection;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{api_error, lock, Caller, LogNote, WorkspaceState};
use crate::fixture::{AclEntry, Fixture, Principal};

/// The workspace admins group, which holds `CAN_MANAGE` on every object.
const ADMINS: &str = "admins";

/// An object type of the Permissions API and its permission levels, lowest first.
pub(crate) struct Kind {
    /// The path segment (`clusters`, `dashboards`).
    pub api: &'static str,
    /// `object_type` in responses.
    pub object_type: &'static str,
    /// Shown in errors ("Cluster", "Dashboard").
    pub noun: &'static str,
    pub levels: &'static [(&'static str, &'static str)],
}

pub(crate) const CLUSTERS: Kind = Kind {
    api: "clusters",
    object_type: "cluster",
    noun: "Cluster",
    levels: &[
        ("CAN_ATTACH_TO", "Can attach notebooks and run commands"),
        (
            "CAN_RESTART",
            "Can start, restart and terminate the cluster",
        ),
        ("CAN_MANAGE", "Can manage the cluster and its permissions"),
    ],
};

pub(crate) const DASHBOARDS: Kind = Kind {
    api: "dashboards",
    object_type: "dashboard",
    noun: "Dashboard",
    levels: &[
        ("CAN_READ", "Can view the dashboard"),
        ("CAN_RUN", "Can view and refresh the dashboard"),
        ("CAN_EDIT", "Can edit the dashboard"),
        ("CAN_MANAGE", "Can manage the dashboard and its permissions"),
    ],
};

impl Kind {
    /// The rank of `level` (0 = lowest), if this kind has it.
    pub fn rank(&self, level: &str) -> Option<usize> {
        self.levels.iter().position(|(l, _)| *l == level)
    }

    fn top(&self) -> usize {
        self.levels.len() - 1
    }

    fn by_api(api: &str) -> Option<&'static Kind> {
        [&CLUSTERS, &DASHBOARDS].into_iter().find(|k| k.api == api)
    }
}

/// The current ACLs of clusters and dashboards (they change through PUT/PATCH).
#[derive(Default)]
pub(crate) struct Acls {
    inner: Mutex<HashMap<(&'static str, String), Vec<AclEntry>>>,
}

impl Acls {
    pub fn new(f: &Fixture) -> Acls {
        let acls = Acls::default();
        acls.reset(f);
        acls
    }

    /// Back to the fixture's ACLs.
    pub fn reset(&self, f: &Fixture) {
        let mut inner = lock(&self.inner);
        inner.clear();
        for c in &f.clusters {
            inner.insert((CLUSTERS.api, c.id.clone()), c.acl.clone());
        }
        for d in &f.dashboards {
            inner.insert((DASHBOARDS.api, d.id.clone()), d.acl.clone());
        }
    }

    /// The rank of `who`'s permission level on the object, or None without any.
    pub fn level(&self, kind: &Kind, id: &str, who: &Principal) -> Option<usize> {
        if who.is_member(ADMINS) {
            return Some(kind.top());
        }
        lock(&self.inner)
            .get(&(kind.api, id.to_string()))?
            .iter()
            .filter(|e| who.matches(&e.principal))
            .filter_map(|e| kind.rank(&e.level))
            .max()
    }

    fn entries(&self, kind: &Kind, id: &str) -> Option<Vec<AclEntry>> {
        lock(&self.inner).get(&(kind.api, id.to_string())).cloned()
    }

    fn exists(&self, kind: &Kind, id: &str) -> bool {
        lock(&self.inner).contains_key(&(kind.api, id.to_string()))
    }

    fn store(&self, kind: &Kind, id: &str, entries: Vec<AclEntry>) {
        lock(&self.inner).insert((kind.api, id.to_string()), entries);
    }
}

fn permissions_json(ws: &WorkspaceState, kind: &Kind, id: &str) -> Value {
    let mut list: Vec<Value> = ws
        .acls
        .entries(kind, id)
        .unwrap_or_default()
        .iter()
        .map(|e| {
            let mut v = match ws.fixture.user(&e.principal) {
                Some(u) => json!({ "user_name": u.user_name, "display_name": u.display_name() }),
                None => json!({ "group_name": e.principal }),
            };
            v["all_permissions"] = json!([{ "permission_level": e.level, "inherited": false }]);
            v
        })
        .collect();
    list.push(json!({
        "group_name": ADMINS,
        "all_permissions": [{
            "permission_level": "CAN_MANAGE",
            "inherited": true,
            "inherited_from_object": [format!("/{}/", kind.api)],
        }],
    }));
    json!({
        "object_id": format!("/{}/{id}", kind.api),
        "object_type": kind.object_type,
        "access_control_list": list,
    })
}

/// The object, visible to the caller, or the error Databricks gives.
fn visible(
    ws: &WorkspaceState,
    caller: &Caller,
    api: &str,
    id: &str,
) -> Result<(&'static Kind, usize), Response> {
    let Some(kind) = Kind::by_api(api) else {
        return Err(api_error(
            StatusCode::BAD_REQUEST,
            "INVALID_PARAMETER_VALUE",
            format!("Invalid object type: {api}. The sandbox workspace manages permissions of clusters and dashboards only."),
        ));
    };
    if !ws.acls.exists(kind, id) {
        return Err(api_error(
            StatusCode::NOT_FOUND,
            "RESOURCE_DOES_NOT_EXIST",
            format!("{} {id} does not exist.", kind.noun),
        ));
    }
    match ws.acls.level(kind, id, &caller.principal) {
        Some(rank) => Ok((kind, rank)),
        None => Err(api_error(
            StatusCode::FORBIDDEN,
            "PERMISSION_DENIED",
            format!(
                "{} does not have any permission on {} {id}.",
                caller.user.user_name,
                kind.noun.to_lowercase()
            ),
        )),
    }
}

pub(super) async fn get(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
    Path((api, id)): Path<(String, String)>,
) -> Response {
    match visible(&ws, &caller, &api, &id) {
        Ok((kind, _)) => Json(permissions_json(&ws, kind, &id)).into_response(),
        Err(e) => e,
    }
}

pub(super) async fn levels(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
    Path((api, id)): Path<(String, String)>,
) -> Response {
    match visible(&ws, &caller, &api, &id) {
        Ok((kind, _)) => {
            let levels: Vec<Value> = kind
                .levels
                .iter()
                .map(|(l, d)| json!({ "permission_level": l, "description": d }))
                .collect();
            Json(json!({ "permission_levels": levels })).into_response()
        }
        Err(e) => e,
    }
}

#[derive(Deserialize)]
pub(super) struct AclRequest {
    #[serde(default)]
    access_control_list: Vec<AclItem>,
}

#[derive(Deserialize)]
struct AclItem {
    user_name: Option<String>,
    group_name: Option<String>,
    service_principal_name: Option<String>,
    permission_level: Option<String>,
}

/// `PUT` (replace the direct grants) and `PATCH` (add or change grants).
async fn change(
    ws: Arc<WorkspaceState>,
    caller: Caller,
    api: String,
    id: String,
    body: Result<Json<AclRequest>, JsonRejection>,
    replace: bool,
) -> Response {
    let (kind, rank) = match visible(&ws, &caller, &api, &id) {
        Ok(v) => v,
        Err(e) => return e,
    };
    if rank < kind.top() {
        return api_error(
            StatusCode::FORBIDDEN,
            "PERMISSION_DENIED",
            format!(
                "{} does not have Manage permissions on {} {id}.",
                caller.user.user_name,
                kind.noun.to_lowercase()
            ),
        );
    }
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
    let mut changes = Vec::new();
    for item in body.access_control_list {
        let principal =
            match (
                &item.user_name,
                &item.group_name,
                &item.service_principal_name,
            ) {
                (Some(u), None, None) if ws.fixture.user(u).is_some() => u.clone(),
                (None, Some(g), None) if ws.fixture.group(g).is_some() => g.clone(),
                (Some(u), None, None) => {
                    return invalid(format!("Principal: UserName({u}) does not exist"))
                }
                (None, Some(g), None) => {
                    return invalid(format!("Principal: GroupName({g}) does not exist"))
                }
                (None, None, Some(sp)) => {
                    return invalid(format!(
                        "Principal: ServicePrincipalName({sp}) does not exist"
                    ))
                }
                _ => return invalid(
                    "Exactly one of user_name, group_name or service_principal_name must be set",
                ),
            };
        let level = item.permission_level.unwrap_or_default();
        if kind.rank(&level).is_none() {
            return invalid(format!(
                "Permission level {level} is not supported for {}",
                kind.object_type
            ));
        }
        changes.push(AclEntry { principal, level });
    }
    let mut entries = if replace {
        Vec::new()
    } else {
        ws.acls.entries(kind, &id).unwrap_or_default()
    };
    for c in changes {
        match entries
            .iter_mut()
            .find(|e| e.principal.eq_ignore_ascii_case(&c.principal))
        {
            Some(e) => e.level = c.level,
            None => entries.push(c),
        }
    }
    ws.acls.store(kind, &id, entries);
    let action = if kind.api == CLUSTERS.api {
        "changeClusterAcl"
    } else {
        "changeDashboardAcl"
    };
    let mut resp = Json(permissions_json(&ws, kind, &id)).into_response();
    resp.extensions_mut().insert(LogNote {
        action: Some(action),
        user: None,
    });
    resp
}

fn invalid(message: impl Into<String>) -> Response {
    api_error(StatusCode::BAD_REQUEST, "INVALID_PARAMETER_VALUE", message)
}

pub(super) async fn put(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
    Path((api, id)): Path<(String, String)>,
    body: Result<Json<AclRequest>, JsonRejection>,
) -> Response {
    change(ws, caller, api, id, body, true).await
}

pub(super) async fn patch(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
    Path((api, id)): Path<(String, String)>,
    body: Result<Json<AclRequest>, JsonRejection>,
) -> Response {
    change(ws, caller, api, id, body, false).await
}
