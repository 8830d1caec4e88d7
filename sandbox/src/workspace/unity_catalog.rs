//! Unity Catalog REST API 2.1: catalogs, schemas, tables (list/get), `permissions` and
//! `effective-permissions`.
//!
//! Visibility follows the documented rules: a catalog is listed to its owner and to holders of
//! `USE CATALOG`; a schema to its owner and holders of `USE SCHEMA` (inside a catalog the caller
//! may use); a table or view to its owner and holders of `SELECT` (inside a schema the caller may
//! use). Grants are shown whole to the owner of the securable (or of a parent) and otherwise
//! only for the caller's own principals, as `SHOW GRANTS` does for a non-owner.

// Handlers return the finished error response; it is built once per request, so boxing it
// would only add an allocation.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::{api_error, Caller, WorkspaceState};
use crate::fixture::{Catalog, Fixture, Principal, Privilege, Schema, Securable, Table};

/// The metastore every object reports.
pub const METASTORE_ID: &str = "6f1c2d3e-4a5b-4c6d-8e9f-0a1b2c3d4e5f";
/// A fixed creation time (2025-01-01T00:00:00Z) so listings are stable.
const CREATED_AT: i64 = 1_735_689_600_000;

type Params = Query<HashMap<String, String>>;

fn not_found(code: &str, message: String) -> Response {
    api_error(StatusCode::NOT_FOUND, code, message)
}

fn permission_denied(privilege: Privilege, securable: &Securable) -> Response {
    api_error(
        StatusCode::FORBIDDEN,
        "PERMISSION_DENIED",
        format!(
            "User does not have {} on {} '{}'.",
            privilege.as_str(),
            securable.kind(),
            securable
        ),
    )
}

fn invalid(message: impl Into<String>) -> Response {
    api_error(StatusCode::BAD_REQUEST, "INVALID_PARAMETER_VALUE", message)
}

/// `max_results` must not be negative; the sandbox returns everything in one page.
fn check_paging(q: &HashMap<String, String>) -> Result<(), Response> {
    match q.get("max_results").map(|v| v.parse::<i64>()) {
        None | Some(Ok(0..)) => Ok(()),
        _ => Err(invalid("max_results must be greater than or equal to 0")),
    }
}

fn is_owner(f: &Fixture, who: &Principal, securable: &Securable) -> bool {
    securable.with_ancestors().iter().any(|s| {
        let owner = match s {
            Securable::Catalog(c) => f.catalog(c).map(|c| c.owner.as_str()),
            Securable::Schema(c, s) => f.schema(c, s).map(|s| s.owner.as_str()),
            Securable::Table(c, s, t) => f.table(c, s, t).map(|t| t.owner.as_str()),
            Securable::Function(c, s, n) => f.function(c, s, n).map(|x| x.owner.as_str()),
        };
        owner.is_some_and(|o| who.matches(o))
    })
}

// === JSON shapes ===

fn catalog_json(c: &Catalog) -> Value {
    let mut v = json!({
        "name": c.name,
        "full_name": c.name,
        "owner": c.owner,
        "comment": c.comment,
        "catalog_type": c.catalog_type(),
        "metastore_id": METASTORE_ID,
        "isolation_mode": "OPEN",
        "securable_type": "CATALOG",
        "securable_kind": if c.connection_name.is_some() { "CATALOG_FOREIGN_SNOWFLAKE" } else { "CATALOG_STANDARD" },
        "browse_only": false,
        "created_at": CREATED_AT,
        "created_by": "carol@example.com",
        "updated_at": CREATED_AT,
        "updated_by": "carol@example.com",
    });
    if let Some(conn) = &c.connection_name {
        v["connection_name"] = json!(conn);
        v["options"] = json!({ "database": "ANALYTICS" });
    }
    v
}

fn schema_json(f: &Fixture, s: &Schema) -> Value {
    json!({
        "name": s.name,
        "catalog_name": s.catalog,
        "full_name": format!("{}.{}", s.catalog, s.name),
        "owner": s.owner,
        "comment": s.comment,
        "catalog_type": f.catalog(&s.catalog).map(Catalog::catalog_type),
        "metastore_id": METASTORE_ID,
        "securable_type": "SCHEMA",
        "browse_only": false,
        "created_at": CREATED_AT,
        "created_by": "carol@example.com",
        "updated_at": CREATED_AT,
    })
}

fn table_json(f: &Fixture, t: &Table) -> Value {
    let foreign = f
        .catalog(&t.catalog)
        .is_some_and(|c| c.connection_name.is_some());
    let table_type = if t.view_definition.is_some() {
        "VIEW"
    } else if foreign {
        "FOREIGN"
    } else {
        "MANAGED"
    };
    let columns: Vec<Value> = t
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut col = json!({
                "name": c.name,
                "type_text": c.data_type.type_text().to_ascii_lowercase(),
                "type_name": c.data_type.type_name(),
                "type_json": json!({
                    "name": c.name,
                    "type": c.data_type.type_text().to_ascii_lowercase(),
                    "nullable": true,
                    "metadata": {},
                }).to_string(),
                "position": i,
                "nullable": true,
            });
            if let Some(mask) = t.mask_for(&c.name) {
                col["mask"] = json!({ "function_name": mask.function, "using_column_names": [] });
            }
            col
        })
        .collect();
    let mut v = json!({
        "name": t.name,
        "catalog_name": t.catalog,
        "schema_name": t.schema,
        "full_name": t.full_name(),
        "table_type": table_type,
        "owner": t.owner,
        "comment": t.comment,
        "columns": columns,
        "metastore_id": METASTORE_ID,
        "securable_type": "TABLE",
        "browse_only": false,
        "created_at": CREATED_AT,
        "created_by": "carol@example.com",
        "updated_at": CREATED_AT,
        "table_id": crate::util::uuid_from(&t.full_name()),
    });
    if let Some(def) = &t.view_definition {
        v["view_definition"] = json!(def);
    } else if !foreign {
        v["data_source_format"] = json!("DELTA");
        v["storage_location"] = json!(format!(
            "s3://sandbox-metastore/{}/tables/{}",
            METASTORE_ID,
            crate::util::uuid_from(&t.full_name())
        ));
    }
    if let Some(rf) = &t.row_filter {
        v["row_filter"] = json!({ "function_name": rf.function, "input_column_names": [] });
    }
    v
}

// === Catalogs ===

fn can_see_catalog(f: &Fixture, who: &Principal, c: &Catalog) -> bool {
    f.has_privilege(
        who,
        &Securable::Catalog(c.name.clone()),
        Privilege::UseCatalog,
    )
}

pub(super) async fn list_catalogs(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
    Query(q): Params,
) -> Response {
    if let Err(e) = check_paging(&q) {
        return e;
    }
    let list: Vec<Value> = visible_catalogs(&ws.fixture, &caller.principal)
        .map(catalog_json)
        .collect();
    Json(json!({ "catalogs": list })).into_response()
}

// === What a caller may list (shared with the SQL endpoint's metadata calls) ===

/// The catalogs `who` may see: owner or `USE CATALOG`.
pub(super) fn visible_catalogs<'f>(
    f: &'f Fixture,
    who: &'f Principal,
) -> impl Iterator<Item = &'f Catalog> + 'f {
    f.catalogs
        .iter()
        .filter(move |c| can_see_catalog(f, who, c))
}

/// The schemas of catalog `c` that `who` may see: owner or `USE SCHEMA`.
pub(super) fn visible_schemas<'f>(
    f: &'f Fixture,
    who: &'f Principal,
    c: &'f Catalog,
) -> impl Iterator<Item = &'f Schema> + 'f {
    f.schemas
        .iter()
        .filter(move |s| s.catalog == c.name)
        .filter(move |s| {
            f.has_privilege(
                who,
                &Securable::Schema(s.catalog.clone(), s.name.clone()),
                Privilege::UseSchema,
            )
        })
}

/// The tables and views of schema `s` that `who` may see: owner or `SELECT`.
pub(super) fn visible_tables<'f>(
    f: &'f Fixture,
    who: &'f Principal,
    s: &'f Schema,
) -> impl Iterator<Item = &'f Table> + 'f {
    f.tables
        .iter()
        .filter(move |t| t.catalog == s.catalog && t.schema == s.name)
        .filter(move |t| f.has_privilege(who, &table_securable(t), Privilege::Select))
}

fn find_catalog<'f>(f: &'f Fixture, who: &Principal, name: &str) -> Result<&'f Catalog, Response> {
    let Some(c) = f.catalog(name) else {
        return Err(not_found(
            "CATALOG_DOES_NOT_EXIST",
            format!("Catalog '{name}' does not exist."),
        ));
    };
    if !can_see_catalog(f, who, c) {
        return Err(permission_denied(
            Privilege::UseCatalog,
            &Securable::Catalog(c.name.clone()),
        ));
    }
    Ok(c)
}

pub(super) async fn get_catalog(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Response {
    match find_catalog(&ws.fixture, &caller.principal, &name) {
        Ok(c) => Json(catalog_json(c)).into_response(),
        Err(e) => e,
    }
}

// === Schemas ===

fn find_schema<'f>(
    f: &'f Fixture,
    who: &Principal,
    catalog: &str,
    name: &str,
) -> Result<&'f Schema, Response> {
    let c = find_catalog(f, who, catalog)?;
    let Some(s) = f.schema(&c.name, name) else {
        return Err(not_found(
            "SCHEMA_DOES_NOT_EXIST",
            format!("Schema '{catalog}.{name}' does not exist."),
        ));
    };
    let securable = Securable::Schema(s.catalog.clone(), s.name.clone());
    if !f.has_privilege(who, &securable, Privilege::UseSchema) {
        return Err(permission_denied(Privilege::UseSchema, &securable));
    }
    Ok(s)
}

pub(super) async fn list_schemas(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
    Query(q): Params,
) -> Response {
    if let Err(e) = check_paging(&q) {
        return e;
    }
    let Some(catalog) = q.get("catalog_name").filter(|c| !c.is_empty()) else {
        return invalid("Missing required field: catalog_name");
    };
    let f = &ws.fixture;
    let c = match find_catalog(f, &caller.principal, catalog) {
        Ok(c) => c,
        Err(e) => return e,
    };
    let list: Vec<Value> = visible_schemas(f, &caller.principal, c)
        .map(|s| schema_json(f, s))
        .collect();
    Json(json!({ "schemas": list })).into_response()
}

pub(super) async fn get_schema(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
    Path(full_name): Path<String>,
) -> Response {
    let Some((catalog, name)) = full_name.split_once('.') else {
        return invalid(format!("Invalid schema full name '{full_name}'."));
    };
    match find_schema(&ws.fixture, &caller.principal, catalog, name) {
        Ok(s) => Json(schema_json(&ws.fixture, s)).into_response(),
        Err(e) => e,
    }
}

// === Tables ===

fn table_securable(t: &Table) -> Securable {
    Securable::Table(t.catalog.clone(), t.schema.clone(), t.name.clone())
}

pub(super) async fn list_tables(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
    Query(q): Params,
) -> Response {
    if let Err(e) = check_paging(&q) {
        return e;
    }
    let (Some(catalog), Some(schema)) = (
        q.get("catalog_name").filter(|c| !c.is_empty()),
        q.get("schema_name").filter(|c| !c.is_empty()),
    ) else {
        return invalid("Missing required fields: catalog_name, schema_name");
    };
    let f = &ws.fixture;
    let s = match find_schema(f, &caller.principal, catalog, schema) {
        Ok(s) => s,
        Err(e) => return e,
    };
    let list: Vec<Value> = visible_tables(f, &caller.principal, s)
        .map(|t| table_json(f, t))
        .collect();
    Json(json!({ "tables": list })).into_response()
}

pub(super) async fn get_table(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
    Path(full_name): Path<String>,
) -> Response {
    let f = &ws.fixture;
    let parts: Vec<&str> = full_name.split('.').collect();
    let [catalog, schema, name] = parts.as_slice() else {
        return invalid(format!("Invalid table full name '{full_name}'."));
    };
    if let Err(e) = find_schema(f, &caller.principal, catalog, schema) {
        return e;
    }
    let Some(t) = f.table(catalog, schema, name) else {
        return not_found(
            "TABLE_DOES_NOT_EXIST",
            format!("Table '{full_name}' does not exist."),
        );
    };
    if !f.has_privilege(&caller.principal, &table_securable(t), Privilege::Select) {
        return permission_denied(Privilege::Select, &table_securable(t));
    }
    Json(table_json(f, t)).into_response()
}

// === Permissions ===

/// Resolves `{securable_type}/{full_name}` to an existing securable.
fn securable(f: &Fixture, kind: &str, full_name: &str) -> Result<Securable, Response> {
    let parts: Vec<String> = full_name.split('.').map(str::to_lowercase).collect();
    let missing = |what: &str| {
        not_found(
            &format!("{}_DOES_NOT_EXIST", what.to_ascii_uppercase()),
            format!("{what} '{full_name}' does not exist."),
        )
    };
    match (kind.to_ascii_lowercase().as_str(), parts.as_slice()) {
        ("catalog", [c]) => f
            .catalog(c)
            .map(|c| Securable::Catalog(c.name.clone()))
            .ok_or_else(|| missing("Catalog")),
        ("schema", [c, s]) => f
            .schema(c, s)
            .map(|s| Securable::Schema(s.catalog.clone(), s.name.clone()))
            .ok_or_else(|| missing("Schema")),
        ("table" | "view", [c, s, t]) => f
            .table(c, s, t)
            .map(table_securable)
            .ok_or_else(|| missing("Table")),
        ("function", [c, s, n]) => f
            .function(c, s, n)
            .map(|x| Securable::Function(x.catalog.clone(), x.schema.clone(), x.name.clone()))
            .ok_or_else(|| missing("Function")),
        ("catalog" | "schema" | "table" | "view" | "function", _) => Err(invalid(format!(
            "Invalid full name '{full_name}' for securable type {kind}."
        ))),
        _ => Err(invalid(format!("Unsupported securable type: {kind}"))),
    }
}

/// Which principals' grants the caller may see on `s`: all of them for an owner, otherwise the
/// caller's own user and groups.
fn visible_principal(f: &Fixture, who: &Principal, s: &Securable, principal: &str) -> bool {
    is_owner(f, who, s) || who.matches(principal)
}

fn principal_filter(q: &HashMap<String, String>) -> Option<&str> {
    q.get("principal")
        .map(String::as_str)
        .filter(|p| !p.is_empty())
}

pub(super) async fn get_permissions(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
    Path((kind, full_name)): Path<(String, String)>,
    Query(q): Params,
) -> Response {
    let f = &ws.fixture;
    let s = match securable(f, &kind, &full_name) {
        Ok(s) => s,
        Err(e) => return e,
    };
    // Assignments in grant order, one per principal.
    let mut order: Vec<String> = Vec::new();
    let mut by_principal: HashMap<String, Vec<&'static str>> = HashMap::new();
    for g in f.grants.iter().filter(|g| g.securable == s) {
        if !visible_principal(f, &caller.principal, &s, &g.principal) {
            continue;
        }
        if principal_filter(&q).is_some_and(|p| !p.eq_ignore_ascii_case(&g.principal)) {
            continue;
        }
        let entry = by_principal.entry(g.principal.clone()).or_insert_with(|| {
            order.push(g.principal.clone());
            Vec::new()
        });
        for p in &g.privileges {
            if !entry.contains(&p.api_name()) {
                entry.push(p.api_name());
            }
        }
    }
    let assignments: Vec<Value> = order
        .iter()
        .map(|p| json!({ "principal": p, "privileges": by_principal.get(p) }))
        .collect();
    Json(json!({ "privilege_assignments": assignments })).into_response()
}

pub(super) async fn get_effective_permissions(
    State(ws): State<Arc<WorkspaceState>>,
    Extension(caller): Extension<Caller>,
    Path((kind, full_name)): Path<(String, String)>,
    Query(q): Params,
) -> Response {
    let f = &ws.fixture;
    let s = match securable(f, &kind, &full_name) {
        Ok(s) => s,
        Err(e) => return e,
    };
    // Every principal with a grant on the securable or on a parent, plus the caller.
    let mut principals: Vec<String> = vec![caller.user.user_name.clone()];
    for g in &f.grants {
        if s.with_ancestors().contains(&g.securable)
            && !principals
                .iter()
                .any(|p| p.eq_ignore_ascii_case(&g.principal))
        {
            principals.push(g.principal.clone());
        }
    }
    let mut assignments = Vec::new();
    for principal in principals {
        if !visible_principal(f, &caller.principal, &s, &principal)
            || principal_filter(&q).is_some_and(|p| !p.eq_ignore_ascii_case(&principal))
        {
            continue;
        }
        let mut privileges = Vec::new();
        for g in &f.grants {
            if !g.principal.eq_ignore_ascii_case(&principal) {
                continue;
            }
            let Some(from) = s.with_ancestors().into_iter().find(|a| *a == g.securable) else {
                continue;
            };
            for p in &g.privileges {
                let mut e = json!({ "privilege": p.api_name() });
                if from != s {
                    e["inherited_from_type"] = json!(from.type_name());
                    e["inherited_from_name"] = json!(from.to_string());
                }
                privileges.push(e);
            }
        }
        // Grants through groups show under the group's own assignment; a principal with
        // nothing effective here is left out.
        if !privileges.is_empty() {
            assignments.push(json!({ "principal": principal, "privileges": privileges }));
        }
    }
    Json(json!({ "privilege_assignments": assignments })).into_response()
}
