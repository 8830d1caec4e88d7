//! Delta Sharing in Unity Catalog: shares, their recipient grants, recipients and providers
//! (`/api/2.1/unity-catalog/{shares,recipients,providers}`), with the ownership and metastore
//! privilege rules of the Databricks API reference:
//!
//! - shares: listed whole to holders of `USE_SHARE`, otherwise only the caller's own; get and
//!   permissions need `USE_SHARE` or ownership; create needs `CREATE_SHARE`; changing a share's
//!   grants needs ownership or both `USE_SHARE` and `SET_SHARE_PERMISSION`, and granting a
//!   recipient also needs ownership of that recipient (revoking does not);
//! - recipients: listed to metastore admins whole, otherwise only the caller's own; get and
//!   share-permissions need `USE_RECIPIENT` or ownership; create needs `CREATE_RECIPIENT`;
//!   rotating a token needs ownership;
//! - providers: listed and read by metastore admins and owners.
//!
//! Metastore admins hold every metastore privilege. Owners may be groups.

// Handlers return the finished error response; it is built once per request, so boxing it
// would only add an allocation.
#![allow(clippy::result_large_err)]

use std::sync::{Arc, Mutex};

use axum::extract::rejection::JsonRejection;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{api_error, lock, Caller, WorkspaceState};
use crate::fixture::{Fixture, Principal, Recipient, Share, METASTORE_ID};

/// The metastore's name in permission errors.
const METASTORE_NAME: &str = "sandbox_metastore";
/// A fixed creation time for the fixture's objects (2025-03-01T00:00:00Z).
const CREATED_AT: i64 = 1_740_787_200_000;

/// Shares and recipients as they are now (grants change, recipients are created).
pub(crate) struct Sharing {
    shares: Mutex<Vec<Share>>,
    recipients: Mutex<Vec<Recipient>>,
}

impl Sharing {
    pub fn new(f: &Fixture) -> Sharing {
        let s = Sharing {
            shares: Mutex::new(Vec::new()),
            recipients: Mutex::new(Vec::new()),
        };
        s.reset(f);
        s
    }

    pub fn reset(&self, f: &Fixture) {
        *lock(&self.shares) = f.shares.clone();
        *lock(&self.recipients) = f.recipients.clone();
    }
}

fn denied(privilege: &str) -> Response {
    api_error(
        StatusCode::FORBIDDEN,
        "PERMISSION_DENIED",
        format!("User does not have {privilege} on Metastore '{METASTORE_NAME}'."),
    )
}

fn not_owner(kind: &str, name: &str) -> Response {
    api_error(
        StatusCode::FORBIDDEN,
        "PERMISSION_DENIED",
        format!("User is not an owner of {kind} '{name}'."),
    )
}

fn privilege(f: &Fixture, who: &Principal, p: &str) -> bool {
    f.has_metastore_privilege(who, p)
}

fn malformed(e: JsonRejection) -> Response {
    api_error(
        StatusCode::BAD_REQUEST,
        "MALFORMED_REQUEST",
        format!("Could not parse request object: {}", e.body_text()),
    )
}

// === Shares ===

fn share_json(s: &Share) -> Value {
    let objects: Vec<Value> = s
        .tables
        .iter()
        .map(|t| {
            json!({
                "name": t,
                "data_object_type": "TABLE",
                "added_at": CREATED_AT,
                "added_by": s.owner,
                "status": "ACTIVE",
                "history_data_sharing_status": "DISABLED",
            })
        })
        .collect();
    json!({
        "name": s.name,
        "owner": s.owner,
        "comment": s.comment,
        "created_at": CREATED_AT,
        "created_by": s.owner,
        "updated_at": CREATED_AT,
        "updated_by": s.owner,
        "objects": objects,
    })
}

fn grants_json(s: &Share) -> Value {
    let assignments: Vec<Value> = s
        .recipients
        .iter()
        .map(|r| json!({ "principal": r, "privileges": ["SELECT"] }))
        .collect();
    json!({ "privilege_assignments": assignments })
}

/// The share `name`, if the caller may read it (`USE_SHARE` or owner).
fn readable_share(ws: &WorkspaceState, caller: &Caller, name: &str) -> Result<Share, Response> {
    let Some(share) = lock(&ws.sharing.shares)
        .iter()
        .find(|s| s.name.eq_ignore_ascii_case(name))
        .cloned()
    else {
        return Err(api_error(
            StatusCode::NOT_FOUND,
            "SHARE_DOES_NOT_EXIST",
            format!("Share '{name}' does not exist."),
        ));
    };
    if privilege(&ws.fixture, &caller.principal, "USE_SHARE")
        || caller.principal.matches(&share.owner)
    {
        Ok(share)
    } else {
        Err(denied("USE SHARE"))
    }
}

pub(super) async fn list_shares(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
) -> Response {
    let all = privilege(&ws.fixture, &caller.principal, "USE_SHARE");
    let shares: Vec<Value> = lock(&ws.sharing.shares)
        .iter()
        .filter(|s| all || caller.principal.matches(&s.owner))
        .map(share_json)
        .collect();
    Json(json!({ "shares": shares })).into_response()
}

pub(super) async fn get_share(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Response {
    match readable_share(&ws, &caller, &name) {
        Ok(s) => Json(share_json(&s)).into_response(),
        Err(e) => e,
    }
}

pub(super) async fn share_permissions(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Response {
    match readable_share(&ws, &caller, &name) {
        Ok(s) => Json(grants_json(&s)).into_response(),
        Err(e) => e,
    }
}

#[derive(Deserialize)]
pub(super) struct PermissionsUpdate {
    #[serde(default)]
    changes: Vec<PermissionsChange>,
}

#[derive(Deserialize)]
struct PermissionsChange {
    principal: String,
    #[serde(default)]
    add: Vec<String>,
    #[serde(default)]
    remove: Vec<String>,
}

pub(super) async fn update_share_permissions(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    body: Result<Json<PermissionsUpdate>, JsonRejection>,
) -> Response {
    let share = match readable_share(&ws, &caller, &name) {
        Ok(s) => s,
        Err(e) => return e,
    };
    let who = &caller.principal;
    let owner = who.matches(&share.owner);
    if !owner && !privilege(&ws.fixture, who, "SET_SHARE_PERMISSION") {
        return denied("SET SHARE PERMISSION");
    }
    let body = match body {
        Ok(Json(b)) => b,
        Err(e) => return malformed(e),
    };
    let recipients = lock(&ws.sharing.recipients).clone();
    for c in &body.changes {
        for p in c.add.iter().chain(&c.remove) {
            if !p.eq_ignore_ascii_case("SELECT") {
                return api_error(
                    StatusCode::BAD_REQUEST,
                    "INVALID_PARAMETER_VALUE",
                    format!("Privilege {p} is not applicable to a share; use SELECT."),
                );
            }
        }
        let Some(r) = recipients
            .iter()
            .find(|r| r.name.eq_ignore_ascii_case(&c.principal))
        else {
            return api_error(
                StatusCode::NOT_FOUND,
                "RECIPIENT_DOES_NOT_EXIST",
                format!("Recipient '{}' does not exist.", c.principal),
            );
        };
        // Granting a recipient needs its ownership too; revoking does not.
        if !c.add.is_empty() && !who.matches(&r.owner) {
            return not_owner("Recipient", &r.name);
        }
    }
    let mut shares = lock(&ws.sharing.shares);
    let Some(s) = shares
        .iter_mut()
        .find(|s| s.name.eq_ignore_ascii_case(&share.name))
    else {
        return api_error(
            StatusCode::NOT_FOUND,
            "SHARE_DOES_NOT_EXIST",
            format!("Share '{name}' does not exist."),
        );
    };
    for c in &body.changes {
        let r = recipients
            .iter()
            .find(|r| r.name.eq_ignore_ascii_case(&c.principal))
            .map(|r| r.name.clone())
            .unwrap_or_default();
        if !c.remove.is_empty() {
            s.recipients.retain(|x| !x.eq_ignore_ascii_case(&r));
        }
        if !c.add.is_empty() && !s.recipients.iter().any(|x| x.eq_ignore_ascii_case(&r)) {
            s.recipients.push(r);
        }
    }
    Json(grants_json(s)).into_response()
}

#[derive(Deserialize)]
pub(super) struct CreateShare {
    name: Option<String>,
    comment: Option<String>,
}

pub(super) async fn create_share(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<CreateShare>, JsonRejection>,
) -> Response {
    if !privilege(&ws.fixture, &caller.principal, "CREATE_SHARE") {
        return denied("CREATE SHARE");
    }
    let body = match body {
        Ok(Json(b)) => b,
        Err(e) => return malformed(e),
    };
    let Some(name) = body.name.filter(|n| !n.is_empty()) else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "INVALID_PARAMETER_VALUE",
            "Missing required field: name",
        );
    };
    let mut shares = lock(&ws.sharing.shares);
    if shares.iter().any(|s| s.name.eq_ignore_ascii_case(&name)) {
        return api_error(
            StatusCode::CONFLICT,
            "SHARE_ALREADY_EXISTS",
            format!("Share '{name}' already exists."),
        );
    }
    let share = Share {
        name: name.to_lowercase(),
        owner: caller.user.user_name.clone(),
        comment: body.comment.unwrap_or_default(),
        tables: vec![],
        recipients: vec![],
    };
    let out = share_json(&share);
    shares.push(share);
    Json(out).into_response()
}

// === Recipients ===

fn recipient_json(r: &Recipient) -> Value {
    let mut v = json!({
        "name": r.name,
        "owner": r.owner,
        "comment": r.comment,
        "authentication_type": r.authentication_type,
        "created_at": CREATED_AT,
        "created_by": r.owner,
        "updated_at": CREATED_AT,
        "updated_by": r.owner,
        "metastore_id": METASTORE_ID,
        "cloud": "aws",
        "region": "us-west-2",
        "activated": r.authentication_type == "DATABRICKS",
    });
    if let Some(g) = &r.global_metastore_id {
        v["data_recipient_global_metastore_id"] = json!(g);
    }
    v
}

fn readable_recipient(
    ws: &WorkspaceState,
    caller: &Caller,
    name: &str,
) -> Result<Recipient, Response> {
    let Some(r) = lock(&ws.sharing.recipients)
        .iter()
        .find(|r| r.name.eq_ignore_ascii_case(name))
        .cloned()
    else {
        return Err(api_error(
            StatusCode::NOT_FOUND,
            "RECIPIENT_DOES_NOT_EXIST",
            format!("Recipient '{name}' does not exist."),
        ));
    };
    if privilege(&ws.fixture, &caller.principal, "USE_RECIPIENT")
        || caller.principal.matches(&r.owner)
    {
        Ok(r)
    } else {
        Err(denied("USE RECIPIENT"))
    }
}

pub(super) async fn list_recipients(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
) -> Response {
    let admin = ws.fixture.is_metastore_admin(&caller.principal);
    let list: Vec<Value> = lock(&ws.sharing.recipients)
        .iter()
        .filter(|r| admin || caller.principal.matches(&r.owner))
        .map(recipient_json)
        .collect();
    Json(json!({ "recipients": list })).into_response()
}

pub(super) async fn get_recipient(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Response {
    match readable_recipient(&ws, &caller, &name) {
        Ok(r) => Json(recipient_json(&r)).into_response(),
        Err(e) => e,
    }
}

pub(super) async fn recipient_share_permissions(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Response {
    let r = match readable_recipient(&ws, &caller, &name) {
        Ok(r) => r,
        Err(e) => return e,
    };
    let out: Vec<Value> = lock(&ws.sharing.shares)
        .iter()
        .filter(|s| s.recipients.iter().any(|x| x.eq_ignore_ascii_case(&r.name)))
        .map(|s| {
            json!({
                "share_name": s.name,
                "privilege_assignments": [{ "principal": r.name, "privileges": ["SELECT"] }],
            })
        })
        .collect();
    Json(json!({ "permissions_out": out })).into_response()
}

#[derive(Deserialize)]
pub(super) struct CreateRecipient {
    name: Option<String>,
    authentication_type: Option<String>,
    comment: Option<String>,
    data_recipient_global_metastore_id: Option<String>,
}

pub(super) async fn create_recipient(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<CreateRecipient>, JsonRejection>,
) -> Response {
    if !privilege(&ws.fixture, &caller.principal, "CREATE_RECIPIENT") {
        return denied("CREATE RECIPIENT");
    }
    let body = match body {
        Ok(Json(b)) => b,
        Err(e) => return malformed(e),
    };
    let invalid = |m: &str| api_error(StatusCode::BAD_REQUEST, "INVALID_PARAMETER_VALUE", m);
    let Some(name) = body.name.filter(|n| !n.is_empty()) else {
        return invalid("Missing required field: name");
    };
    let authentication_type = match body.authentication_type.as_deref() {
        Some("TOKEN") => "TOKEN",
        Some("DATABRICKS") if body.data_recipient_global_metastore_id.is_some() => "DATABRICKS",
        Some("DATABRICKS") => {
            return invalid(
                "data_recipient_global_metastore_id is required for DATABRICKS recipients",
            )
        }
        _ => return invalid("authentication_type must be TOKEN or DATABRICKS"),
    };
    let mut recipients = lock(&ws.sharing.recipients);
    if recipients
        .iter()
        .any(|r| r.name.eq_ignore_ascii_case(&name))
    {
        return api_error(
            StatusCode::CONFLICT,
            "RECIPIENT_ALREADY_EXISTS",
            format!("Recipient '{name}' already exists."),
        );
    }
    let r = Recipient {
        name: name.to_lowercase(),
        owner: caller.user.user_name.clone(),
        comment: body.comment.unwrap_or_default(),
        authentication_type,
        global_metastore_id: body.data_recipient_global_metastore_id,
    };
    let out = recipient_json(&r);
    recipients.push(r);
    Json(out).into_response()
}

pub(super) async fn rotate_recipient_token(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Response {
    let r = match readable_recipient(&ws, &caller, &name) {
        Ok(r) => r,
        Err(e) => return e,
    };
    if !caller.principal.matches(&r.owner) {
        return not_owner("Recipient", &r.name);
    }
    if r.authentication_type != "TOKEN" {
        return api_error(
            StatusCode::BAD_REQUEST,
            "INVALID_PARAMETER_VALUE",
            format!("Recipient '{}' does not use token authentication.", r.name),
        );
    }
    let mut v = recipient_json(&r);
    // A fresh activation link; the bearer token itself is only ever handed out through it.
    v["tokens"] = json!([{
        "id": crate::util::uuid_v4(),
        "activation_url": format!("https://sandbox.invalid/delta_sharing/retrieve_config.html?{}", crate::util::random_hex(16)),
        "created_at": crate::util::now_ms(),
        "created_by": caller.user.user_name,
    }]);
    Json(v).into_response()
}

// === Providers ===

fn provider_json(p: &crate::fixture::Provider) -> Value {
    json!({
        "name": p.name,
        "owner": p.owner,
        "comment": p.comment,
        "authentication_type": "DATABRICKS",
        "data_provider_global_metastore_id": p.global_metastore_id,
        "metastore_id": METASTORE_ID,
        "recipient_profile_str": Value::Null,
        "created_at": CREATED_AT,
        "created_by": p.owner,
        "cloud": "aws",
        "region": "us-east-1",
    })
}

pub(super) async fn list_providers(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
) -> Response {
    let who = &caller.principal;
    let all = ws.fixture.is_metastore_admin(who);
    let list: Vec<Value> = ws
        .fixture
        .providers
        .iter()
        .filter(|p| all || who.matches(&p.owner))
        .map(provider_json)
        .collect();
    Json(json!({ "providers": list })).into_response()
}

pub(super) async fn get_provider(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Response {
    let Some(p) = ws
        .fixture
        .providers
        .iter()
        .find(|p| p.name.eq_ignore_ascii_case(&name))
    else {
        return api_error(
            StatusCode::NOT_FOUND,
            "PROVIDER_DOES_NOT_EXIST",
            format!("Provider '{name}' does not exist."),
        );
    };
    let who = &caller.principal;
    if ws.fixture.is_metastore_admin(who) || who.matches(&p.owner) {
        Json(provider_json(p)).into_response()
    } else {
        not_owner("Provider", &p.name)
    }
}
