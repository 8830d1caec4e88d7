//! The Databricks workspace emulator.
//!
//! Every request passes one middleware, [`audit_and_authenticate`], that does what the Databricks
//! front door does: it authenticates the bearer token (exactly one `Authorization: Bearer` holding
//! an unexpired access token this workspace issued), answers with the real 401/403 bodies
//! otherwise, and writes one [`RequestRecord`] per request, the stand-in for
//! `system.access.audit`. Handlers then enforce permissions themselves.
//!
//! Code map: `oauth` (token endpoint and discovery documents), `scim` (`Me`), `statements` (SQL
//! Statement Execution API and warehouses), `unity_catalog` (UC listings and permissions),
//! `genie` (conversations), `objects` (Workspace API with notebook ACLs), `mcp` (managed MCP
//! servers), `sql_endpoint` (the SQL warehouse endpoint: TCLIService over HTTP, with `thrift`
//! its binary-protocol codec), `telemetry` (what the SQL connector fetches and posts on its
//! own: feature flags, client telemetry). The data and the grants live in [`crate::fixture`],
//! the SQL engine in [`crate::sql`].

mod clusters;
pub(crate) mod entra;
mod genie;
mod lakeview;
mod mcp;
pub(crate) mod oauth;
mod objects;
mod permissions;
mod scim;
mod sharing;
mod sql_endpoint;
mod statements;
mod telemetry;
pub(crate) mod thrift;
mod u2m;
mod unity_catalog;

pub use u2m::U2mCounts;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tokio::time::Instant;

use crate::fixture::{Fixture, Principal, User};
use crate::idp::IdpState;
use crate::util::{now_ms, uuid_v4};
use crate::{RequestRecord, SandboxOptions};

/// The request log keeps at most this many records, dropping the oldest.
const MAX_LOG_RECORDS: usize = 100_000;
/// Issued tokens kept at most; expired ones are purged first when the store is full.
const MAX_TOKENS: usize = 100_000;

struct IssuedToken {
    user_name: String,
    expires_at: Instant,
    /// For a token exchange: the IdP principal (`iss#sub`) whose subject token it came from.
    subject: Option<String>,
    /// 1 for the first token this workspace issued, and so on.
    serial: u64,
}

pub(crate) struct WorkspaceState {
    pub url: String,
    pub opts: SandboxOptions,
    pub fixture: Fixture,
    pub idp: Arc<IdpState>,
    tokens: Mutex<HashMap<String, IssuedToken>>,
    exchanges: Mutex<HashMap<String, u64>>,
    log: Mutex<VecDeque<RequestRecord>>,
    statements: statements::Statements,
    /// Sessions and operations of the SQL warehouse endpoint (Thrift).
    sql_sessions: sql_endpoint::Sessions,
    genie: genie::Conversations,
    /// How `/oidc/v1/token` misbehaves, for fault tests.
    pub token_fault: Mutex<oauth::TokenFault>,
    /// `/oidc/v1/token` requests received (counted on arrival, before any fault or delay).
    pub token_requests: std::sync::atomic::AtomicU64,
    /// Client telemetry logs received on `/telemetry-ext`.
    pub telemetry_logs: std::sync::atomic::AtomicU64,
    /// Access tokens issued so far; each token's serial is its place in that order.
    issued: std::sync::atomic::AtomicU64,
    /// Authorization codes and rotating refresh tokens (U2M).
    pub u2m: u2m::U2mState,
    /// The Entra-shaped OBO endpoint's state (served on the IdP's listener).
    pub entra: entra::EntraState,
    /// Cluster and dashboard ACLs as they are now (PUT/PATCH change them).
    acls: permissions::Acls,
    /// Clusters' run state, execution contexts and commands.
    compute: clusters::Compute,
    /// Delta Sharing shares and recipients as they are now.
    sharing: sharing::Sharing,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means another request panicked mid-update of plain data.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// === impl WorkspaceState ===

impl WorkspaceState {
    pub fn new(url: String, opts: SandboxOptions, idp: Arc<IdpState>) -> WorkspaceState {
        let fixture = Fixture::standard();
        WorkspaceState {
            url,
            opts,
            acls: permissions::Acls::new(&fixture),
            compute: clusters::Compute::new(&fixture),
            sharing: sharing::Sharing::new(&fixture),
            fixture,
            idp,
            tokens: Mutex::new(HashMap::new()),
            exchanges: Mutex::new(HashMap::new()),
            log: Mutex::new(VecDeque::new()),
            statements: statements::Statements::default(),
            sql_sessions: sql_endpoint::Sessions::default(),
            genie: genie::Conversations::default(),
            token_fault: Mutex::new(oauth::TokenFault::Ok),
            token_requests: std::sync::atomic::AtomicU64::new(0),
            issued: std::sync::atomic::AtomicU64::new(0),
            telemetry_logs: std::sync::atomic::AtomicU64::new(0),
            u2m: u2m::U2mState::default(),
            entra: entra::EntraState::default(),
        }
    }

    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.log).iter().cloned().collect()
    }

    pub fn clear_requests(&self) {
        lock(&self.log).clear();
    }

    pub fn exchange_count(&self, user_name: &str) -> u64 {
        lock(&self.exchanges)
            .get(&user_name.to_ascii_lowercase())
            .copied()
            .unwrap_or(0)
    }

    /// `POST /_sandbox/reset`: forgets the request log, the exchange counts, the statements,
    /// conversations, execution contexts and commands, and puts clusters, ACLs and shares back
    /// as the fixture has them. Issued tokens stay valid, as they would in Databricks.
    pub fn reset(&self) {
        self.clear_requests();
        lock(&self.exchanges).clear();
        self.statements.clear();
        self.sql_sessions.clear();
        self.genie.clear();
        self.acls.reset(&self.fixture);
        self.compute.reset(&self.fixture);
        self.sharing.reset(&self.fixture);
    }

    fn record(&self, rec: RequestRecord) {
        let mut log = lock(&self.log);
        if log.len() >= MAX_LOG_RECORDS {
            log.pop_front();
        }
        log.push_back(rec);
    }

    /// Issues an opaque access token for `user_name` valid for `token_ttl`.
    pub(crate) fn issue_token(&self, user_name: &str) -> String {
        self.issue_token_for(user_name, None)
    }

    /// Issues a token and remembers the IdP principal it was exchanged for (if any), so the
    /// request log can say whose subject token stands behind every request.
    pub(crate) fn issue_token_for(&self, user_name: &str, subject: Option<String>) -> String {
        let token = crate::util::random_token("dsbx");
        let now = Instant::now();
        let mut tokens = lock(&self.tokens);
        if tokens.len() >= MAX_TOKENS {
            tokens.retain(|_, t| t.expires_at > now);
        }
        if tokens.len() >= MAX_TOKENS {
            // Still full of live tokens: drop the ones closest to expiry.
            let mut by_expiry: Vec<(String, Instant)> = tokens
                .iter()
                .map(|(k, t)| (k.clone(), t.expires_at))
                .collect();
            by_expiry.sort_by_key(|(_, e)| *e);
            for (k, _) in by_expiry.into_iter().take(MAX_TOKENS / 10) {
                tokens.remove(&k);
            }
        }
        tokens.insert(
            token.clone(),
            IssuedToken {
                user_name: user_name.to_string(),
                expires_at: now + self.opts.token_ttl,
                subject,
                serial: self
                    .issued
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                    + 1,
            },
        );
        drop(tokens);
        *lock(&self.exchanges)
            .entry(user_name.to_ascii_lowercase())
            .or_insert(0) += 1;
        token
    }

    fn lookup_token(&self, token: &str) -> Option<(String, bool, Option<String>, u64)> {
        let tokens = lock(&self.tokens);
        tokens.get(token).map(|t| {
            (
                t.user_name.clone(),
                t.expires_at <= Instant::now(),
                t.subject.clone(),
                t.serial,
            )
        })
    }

    /// Whether `token` is a JWT issued by the dev IdP (looked at, not verified).
    fn is_idp_jwt(&self, token: &str) -> bool {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use base64::Engine as _;
        let mut parts = token.split('.');
        let (Some(_), Some(payload), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return false;
        };
        URL_SAFE_NO_PAD
            .decode(payload.trim_end_matches('='))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| {
                v.get("iss")
                    .and_then(|i| i.as_str())
                    .map(|i| i == self.idp.issuer)
            })
            .unwrap_or(false)
    }
}

/// The authenticated caller, put in the request extensions by the middleware.
#[derive(Clone, Debug)]
pub(crate) struct Caller {
    pub user: User,
    pub principal: Principal,
}

/// Set by a handler on its response to log a different action than the route's default, or a
/// user for an unauthenticated endpoint (the token exchange).
#[derive(Clone, Debug, Default)]
pub(crate) struct LogNote {
    pub action: Option<&'static str>,
    pub user: Option<String>,
}

// === Routing ===

pub(crate) fn router(state: Arc<WorkspaceState>) -> Router {
    Router::new()
        .route("/oidc/v1/token", post(oauth::token))
        .route("/oidc/v1/authorize", get(u2m::authorize))
        .route(
            "/oidc/.well-known/oauth-authorization-server",
            get(oauth::authorization_server),
        )
        .route(
            "/oidc/.well-known/openid-configuration",
            get(oauth::authorization_server),
        )
        .route("/oidc/jwks.json", get(oauth::jwks))
        .route(
            "/.well-known/databricks-config",
            get(oauth::databricks_config),
        )
        .route("/api/2.0/preview/scim/v2/Me", get(scim::me))
        .route("/api/2.0/sql/statements", post(statements::execute))
        .route("/api/2.0/sql/statements/", post(statements::execute))
        .route("/api/2.0/sql/statements/{id}", get(statements::get))
        .route(
            "/api/2.0/sql/statements/{id}/result/chunks/{chunk}",
            get(statements::chunk),
        )
        .route(
            "/api/2.0/sql/statements/{id}/cancel",
            post(statements::cancel),
        )
        .route("/api/2.0/sql/warehouses", get(statements::list_warehouses))
        .route(
            "/api/2.0/sql/warehouses/{id}",
            get(statements::get_warehouse),
        )
        .route(
            "/sql/1.0/warehouses/{id}",
            post(sql_endpoint::thrift_call),
        )
        .route(
            "/api/2.0/connector-service/feature-flags/{driver}/{version}",
            get(telemetry::feature_flags),
        )
        .route("/telemetry-ext", post(telemetry::upload))
        .route("/api/2.1/unity-catalog/catalogs", get(unity_catalog::list_catalogs))
        .route(
            "/api/2.1/unity-catalog/catalogs/{name}",
            get(unity_catalog::get_catalog),
        )
        .route("/api/2.1/unity-catalog/schemas", get(unity_catalog::list_schemas))
        .route(
            "/api/2.1/unity-catalog/schemas/{full_name}",
            get(unity_catalog::get_schema),
        )
        .route("/api/2.1/unity-catalog/tables", get(unity_catalog::list_tables))
        .route(
            "/api/2.1/unity-catalog/tables/{full_name}",
            get(unity_catalog::get_table),
        )
        .route(
            "/api/2.1/unity-catalog/permissions/{securable_type}/{full_name}",
            get(unity_catalog::get_permissions),
        )
        .route(
            "/api/2.1/unity-catalog/effective-permissions/{securable_type}/{full_name}",
            get(unity_catalog::get_effective_permissions),
        )
        .route("/api/2.0/genie/spaces", get(genie::list_spaces))
        .route("/api/2.0/genie/spaces/{space_id}", get(genie::get_space))
        .route(
            "/api/2.0/genie/spaces/{space_id}/start-conversation",
            post(genie::start_conversation),
        )
        .route(
            "/api/2.0/genie/spaces/{space_id}/conversations/{conversation_id}/messages",
            post(genie::create_message),
        )
        .route(
            "/api/2.0/genie/spaces/{space_id}/conversations/{conversation_id}/messages/{message_id}",
            get(genie::get_message),
        )
        .route(
            "/api/2.0/genie/spaces/{space_id}/conversations/{conversation_id}/messages/{message_id}/query-result",
            get(genie::message_query_result),
        )
        .route(
            "/api/2.0/genie/spaces/{space_id}/conversations/{conversation_id}/messages/{message_id}/attachments/{attachment_id}/query-result",
            get(genie::attachment_query_result),
        )
        .route("/api/2.1/clusters/list", get(clusters::list))
        .route("/api/2.0/clusters/list", get(clusters::list))
        .route("/api/2.1/clusters/get", get(clusters::get))
        .route("/api/2.0/clusters/get", get(clusters::get))
        .route("/api/2.1/clusters/start", post(clusters::start))
        .route("/api/2.0/clusters/start", post(clusters::start))
        .route(
            "/api/2.0/permissions/{object_type}/{object_id}",
            get(permissions::get)
                .put(permissions::put)
                .patch(permissions::patch),
        )
        .route(
            "/api/2.0/permissions/{object_type}/{object_id}/permissionLevels",
            get(permissions::levels),
        )
        .route("/api/1.2/contexts/create", post(clusters::create_context))
        .route("/api/1.2/contexts/status", get(clusters::context_status))
        .route("/api/1.2/contexts/destroy", post(clusters::destroy_context))
        .route("/api/1.2/commands/execute", post(clusters::execute))
        .route("/api/1.2/commands/status", get(clusters::command_status))
        .route("/api/1.2/commands/cancel", post(clusters::cancel))
        .route("/api/2.0/lakeview/dashboards", get(lakeview::list))
        .route("/api/2.0/lakeview/dashboards/{id}", get(lakeview::get))
        .route(
            "/api/2.0/lakeview/dashboards/{id}/published",
            get(lakeview::published),
        )
        .route(
            "/api/2.1/unity-catalog/shares",
            get(sharing::list_shares).post(sharing::create_share),
        )
        .route("/api/2.1/unity-catalog/shares/{name}", get(sharing::get_share))
        .route(
            "/api/2.1/unity-catalog/shares/{name}/permissions",
            get(sharing::share_permissions).patch(sharing::update_share_permissions),
        )
        .route(
            "/api/2.1/unity-catalog/recipients",
            get(sharing::list_recipients).post(sharing::create_recipient),
        )
        .route(
            "/api/2.1/unity-catalog/recipients/{name}",
            get(sharing::get_recipient),
        )
        .route(
            "/api/2.1/unity-catalog/recipients/{name}/share-permissions",
            get(sharing::recipient_share_permissions),
        )
        .route(
            "/api/2.1/unity-catalog/recipients/{name}/rotate-token",
            post(sharing::rotate_recipient_token),
        )
        .route("/api/2.1/unity-catalog/providers", get(sharing::list_providers))
        .route(
            "/api/2.1/unity-catalog/providers/{name}",
            get(sharing::get_provider),
        )
        .route("/api/2.0/workspace/list", get(objects::list))
        .route("/api/2.0/workspace/get-status", get(objects::get_status))
        .route(
            "/api/2.0/mcp/sql",
            post(mcp::sql_server)
                .get(mcp::method_not_allowed)
                .delete(mcp::method_not_allowed),
        )
        .route(
            "/api/2.0/mcp/genie/{space_id}",
            post(mcp::genie_server)
                .get(mcp::method_not_allowed)
                .delete(mcp::method_not_allowed),
        )
        .route(
            "/api/2.0/mcp/functions/{catalog}/{schema}",
            post(mcp::functions_server)
                .get(mcp::method_not_allowed)
                .delete(mcp::method_not_allowed),
        )
        .route("/_sandbox/requests", get(sandbox_requests))
        .route("/_sandbox/reset", post(sandbox_reset))
        .fallback(endpoint_not_found)
        .method_not_allowed_fallback(endpoint_not_found)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            audit_and_authenticate,
        ))
        .with_state(state)
}

/// How the request log names a route, and whether it needs a token.
struct Route {
    service: &'static str,
    action: &'static str,
    authenticated: bool,
    logged: bool,
}

fn classify(method: &Method, path: &str) -> Route {
    let route = |service, action, authenticated| Route {
        service,
        action,
        authenticated,
        logged: true,
    };
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    match (method, segments.as_slice()) {
        (_, ["_sandbox", ..]) => Route {
            service: "sandbox",
            action: "control",
            authenticated: false,
            logged: false,
        },
        (&Method::POST, ["oidc", "v1", "token"]) => route("oauth2", "token", false),
        (&Method::GET, ["oidc", "v1", "authorize"]) => route("oauth2", "authorize", false),
        (&Method::GET, ["oidc", ".well-known", _]) => route("oauth2", "oidcDiscovery", false),
        (&Method::GET, ["oidc", "jwks.json"]) => route("oauth2", "jwks", false),
        // Anything else under the OIDC prefix (e.g. a reachability probe of the token endpoint)
        // is the OAuth service's, as in Databricks' audit log.
        (_, ["oidc", ..]) => route("oauth2", "endpointNotFound", false),
        (&Method::GET, [".well-known", "databricks-config"]) => {
            route("oauth2", "hostMetadata", false)
        }
        (&Method::GET, ["api", "2.0", "preview", "scim", "v2", "Me"]) => {
            route("accounts", "me", true)
        }
        (&Method::POST, ["api", "2.0", "sql", "statements"]) => {
            route("sql", "executeStatement", true)
        }
        (&Method::GET, ["api", "2.0", "sql", "statements", _]) => {
            route("sql", "getStatement", true)
        }
        (&Method::GET, ["api", "2.0", "sql", "statements", _, "result", "chunks", _]) => {
            route("sql", "getStatementResultChunkN", true)
        }
        (&Method::POST, ["api", "2.0", "sql", "statements", _, "cancel"]) => {
            route("sql", "cancelStatement", true)
        }
        (&Method::GET, ["api", "2.0", "sql", "warehouses"]) => route("sql", "listWarehouses", true),
        (&Method::GET, ["api", "2.0", "sql", "warehouses", _]) => {
            route("sql", "getWarehouse", true)
        }
        // One Thrift call per request; the handler names the call (openSession, ...).
        (&Method::POST, ["sql", "1.0", "warehouses", _]) => {
            route("databrickssql", "thriftCall", true)
        }
        (&Method::GET, ["api", "2.0", "connector-service", "feature-flags", _, _]) => {
            route("connectorService", "getFeatureFlags", true)
        }
        (&Method::POST, ["telemetry-ext"]) => route("clientTelemetry", "uploadLogs", true),
        (&Method::GET, ["api", "2.1", "unity-catalog", "catalogs"]) => {
            route("unityCatalog", "listCatalogs", true)
        }
        (&Method::GET, ["api", "2.1", "unity-catalog", "catalogs", _]) => {
            route("unityCatalog", "getCatalog", true)
        }
        (&Method::GET, ["api", "2.1", "unity-catalog", "schemas"]) => {
            route("unityCatalog", "listSchemas", true)
        }
        (&Method::GET, ["api", "2.1", "unity-catalog", "schemas", _]) => {
            route("unityCatalog", "getSchema", true)
        }
        (&Method::GET, ["api", "2.1", "unity-catalog", "tables"]) => {
            route("unityCatalog", "listTables", true)
        }
        (&Method::GET, ["api", "2.1", "unity-catalog", "tables", _]) => {
            route("unityCatalog", "getTable", true)
        }
        (&Method::GET, ["api", "2.1", "unity-catalog", "permissions", _, _]) => {
            route("unityCatalog", "getPermissions", true)
        }
        (&Method::GET, ["api", "2.1", "unity-catalog", "effective-permissions", _, _]) => {
            route("unityCatalog", "getEffectivePermissions", true)
        }
        (&Method::GET, ["api", "2.0", "genie", "spaces"]) => route("aibiGenie", "listSpaces", true),
        (&Method::GET, ["api", "2.0", "genie", "spaces", _]) => {
            route("aibiGenie", "getSpace", true)
        }
        (&Method::POST, ["api", "2.0", "genie", "spaces", _, "start-conversation"]) => {
            route("aibiGenie", "genieStartConversationMessage", true)
        }
        (&Method::POST, ["api", "2.0", "genie", "spaces", _, "conversations", _, "messages"]) => {
            route("aibiGenie", "genieCreateConversationMessage", true)
        }
        (&Method::GET, ["api", "2.0", "genie", "spaces", _, "conversations", _, "messages", _]) => {
            route("aibiGenie", "genieGetConversationMessage", true)
        }
        (
            &Method::GET,
            ["api", "2.0", "genie", "spaces", _, "conversations", _, "messages", _, ..],
        ) => route("aibiGenie", "genieGetMessageQueryResult", true),
        (&Method::GET, ["api", "2.0", "workspace", "list"]) => route("workspace", "list", true),
        (&Method::GET, ["api", "2.0", "workspace", "get-status"]) => {
            route("workspace", "getStatus", true)
        }
        (&Method::GET, ["api", "2.0" | "2.1", "clusters", "list"]) => {
            route("clusters", "list", true)
        }
        (&Method::GET, ["api", "2.0" | "2.1", "clusters", "get"]) => route("clusters", "get", true),
        (&Method::POST, ["api", "2.0" | "2.1", "clusters", "start"]) => {
            route("clusters", "start", true)
        }
        (&Method::GET, ["api", "2.0", "permissions", "clusters", _]) => {
            route("clusters", "getClusterPermissions", true)
        }
        (&Method::GET, ["api", "2.0", "permissions", "clusters", _, "permissionLevels"]) => {
            route("clusters", "getClusterPermissionLevels", true)
        }
        (_, ["api", "2.0", "permissions", "clusters", ..]) => {
            route("clusters", "changeClusterAcl", true)
        }
        (&Method::GET, ["api", "2.0", "permissions", "dashboards", _]) => {
            route("dashboards", "getDashboardPermissions", true)
        }
        (&Method::GET, ["api", "2.0", "permissions", "dashboards", _, "permissionLevels"]) => {
            route("dashboards", "getDashboardPermissionLevels", true)
        }
        (_, ["api", "2.0", "permissions", "dashboards", ..]) => {
            route("dashboards", "changeDashboardAcl", true)
        }
        (&Method::POST, ["api", "1.2", "contexts", "create"]) => {
            route("commandExecution", "createContext", true)
        }
        (&Method::GET, ["api", "1.2", "contexts", "status"]) => {
            route("commandExecution", "getContextStatus", true)
        }
        (&Method::POST, ["api", "1.2", "contexts", "destroy"]) => {
            route("commandExecution", "destroyContext", true)
        }
        (&Method::POST, ["api", "1.2", "commands", "execute"]) => {
            route("commandExecution", "executeCommand", true)
        }
        (&Method::GET, ["api", "1.2", "commands", "status"]) => {
            route("commandExecution", "getCommandStatus", true)
        }
        (&Method::POST, ["api", "1.2", "commands", "cancel"]) => {
            route("commandExecution", "cancelCommand", true)
        }
        (&Method::GET, ["api", "2.0", "lakeview", "dashboards"]) => {
            route("dashboards", "listDashboards", true)
        }
        (&Method::GET, ["api", "2.0", "lakeview", "dashboards", _]) => {
            route("dashboards", "getDashboard", true)
        }
        (&Method::GET, ["api", "2.0", "lakeview", "dashboards", _, "published"]) => {
            route("dashboards", "getPublishedDashboard", true)
        }
        (&Method::GET, ["api", "2.1", "unity-catalog", "shares"]) => {
            route("unityCatalog", "listShares", true)
        }
        (&Method::POST, ["api", "2.1", "unity-catalog", "shares"]) => {
            route("unityCatalog", "createShare", true)
        }
        (&Method::GET, ["api", "2.1", "unity-catalog", "shares", _]) => {
            route("unityCatalog", "getShare", true)
        }
        (&Method::GET, ["api", "2.1", "unity-catalog", "shares", _, "permissions"]) => {
            route("unityCatalog", "getSharePermissions", true)
        }
        (&Method::PATCH, ["api", "2.1", "unity-catalog", "shares", _, "permissions"]) => {
            route("unityCatalog", "updateSharePermissions", true)
        }
        (&Method::GET, ["api", "2.1", "unity-catalog", "recipients"]) => {
            route("unityCatalog", "listRecipients", true)
        }
        (&Method::POST, ["api", "2.1", "unity-catalog", "recipients"]) => {
            route("unityCatalog", "createRecipient", true)
        }
        (&Method::GET, ["api", "2.1", "unity-catalog", "recipients", _]) => {
            route("unityCatalog", "getRecipient", true)
        }
        (&Method::GET, ["api", "2.1", "unity-catalog", "recipients", _, "share-permissions"]) => {
            route("unityCatalog", "getRecipientSharePermissions", true)
        }
        (&Method::POST, ["api", "2.1", "unity-catalog", "recipients", _, "rotate-token"]) => {
            route("unityCatalog", "rotateRecipientToken", true)
        }
        (&Method::GET, ["api", "2.1", "unity-catalog", "providers"]) => {
            route("unityCatalog", "listProviders", true)
        }
        (&Method::GET, ["api", "2.1", "unity-catalog", "providers", _]) => {
            route("unityCatalog", "getProvider", true)
        }
        (_, ["api", "2.0", "mcp", ..]) => route("mcp", "request", true),
        (_, ["api", ..]) => route("workspace", "endpointNotFound", true),
        _ => route("workspace", "endpointNotFound", false),
    }
}

/// The kinds of credential the request log tells apart.
fn authorization_kind(ws: &WorkspaceState, value: Option<&HeaderValue>) -> &'static str {
    let Some(value) = value else {
        return "none";
    };
    let Some(token) = bearer(value) else {
        return "other";
    };
    if lock(&ws.tokens).contains_key(token) {
        "databricks_token"
    } else if ws.is_idp_jwt(token) {
        "idp_jwt"
    } else {
        "other"
    }
}

fn bearer(value: &HeaderValue) -> Option<&str> {
    let v = value.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

fn trace_id(user_agent: Option<&str>) -> Option<String> {
    user_agent?
        .split_whitespace()
        .find_map(|t| t.strip_prefix("aegis-trace/"))
        .filter(|id| !id.is_empty())
        .map(str::to_string)
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

async fn audit_and_authenticate(
    State(ws): State<Arc<WorkspaceState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let route = classify(req.method(), req.uri().path());
    if !route.logged {
        return next.run(req).await;
    }
    let headers = req.headers();
    let authorizations: Vec<&HeaderValue> = headers.get_all(header::AUTHORIZATION).iter().collect();
    let user_agent = header_str(headers, header::USER_AGENT);
    let mut rec = RequestRecord {
        ts_ms: now_ms(),
        method: req.method().to_string(),
        path: req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| req.uri().path().to_string()),
        authorization_count: authorizations.len(),
        authorization_kind: authorization_kind(&ws, authorizations.first().copied()).to_string(),
        token_expired: false,
        user: None,
        subject: None,
        token_serial: None,
        trace_id: trace_id(user_agent.as_deref()),
        user_agent,
        x_aegis_headers: headers
            .keys()
            .map(|k| k.as_str())
            .filter(|k| k.starts_with("x-aegis-"))
            .map(str::to_string)
            .collect(),
        service: route.service.to_string(),
        action: route.action.to_string(),
        status: 0,
    };

    let response = if route.authenticated {
        let token = match authorizations.as_slice() {
            [only] => bearer(only).map(str::to_string),
            _ => None,
        };
        match token {
            None => unauthenticated(),
            Some(token) => match ws.lookup_token(&token) {
                None => invalid_token(),
                Some((user_name, expired, subject, serial)) => {
                    rec.user = Some(user_name.clone());
                    rec.subject = subject;
                    rec.token_serial = Some(serial);
                    rec.token_expired = expired;
                    match (expired, ws.fixture.user(&user_name)) {
                        (false, Some(user)) => {
                            let caller = Caller {
                                principal: ws.fixture.principal(user),
                                user: user.clone(),
                            };
                            req.extensions_mut().insert(caller);
                            next.run(req).await
                        }
                        _ => invalid_token(),
                    }
                }
            },
        }
    } else {
        next.run(req).await
    };

    if let Some(note) = response.extensions().get::<LogNote>() {
        if let Some(action) = note.action {
            rec.action = action.to_string();
        }
        if let Some(user) = &note.user {
            rec.user = Some(user.clone());
        }
    }
    rec.status = response.status().as_u16();
    ws.record(rec);
    response
}

// === Errors ===

/// The standard Databricks REST error body.
pub(crate) fn api_error(
    status: StatusCode,
    error_code: &str,
    message: impl Into<String>,
) -> Response {
    (
        status,
        Json(json!({ "error_code": error_code, "message": message.into() })),
    )
        .into_response()
}

/// What Databricks answers when no usable credential was sent. Note the numeric `error_code`,
/// as the real front door sends it.
fn unauthenticated() -> Response {
    let req_id = uuid_v4();
    let mut resp = (
        StatusCode::UNAUTHORIZED,
        Json(json!({
            "error_code": 401,
            "message": format!(
                "Credential was not sent or was of an unsupported type for this API. [ReqId: {req_id}]"
            ),
        })),
    )
        .into_response();
    set_request_headers(
        &mut resp,
        &req_id,
        "Credential was not sent or was of an unsupported type for this API.",
    );
    resp
}

/// What Databricks answers for a token it did not issue, or one that expired.
fn invalid_token() -> Response {
    let req_id = uuid_v4();
    let mut resp = (
        StatusCode::FORBIDDEN,
        Json(json!({
            "error_code": 403,
            "message": format!("Invalid access token. [ReqId: {req_id}]"),
        })),
    )
        .into_response();
    set_request_headers(&mut resp, &req_id, "Invalid access token.");
    resp
}

fn set_request_headers(resp: &mut Response, req_id: &str, reason: &'static str) {
    if let Ok(v) = HeaderValue::from_str(req_id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp.headers_mut().insert(
        "x-databricks-reason-phrase",
        HeaderValue::from_static(reason),
    );
}

async fn endpoint_not_found(method: Method, uri: axum::http::Uri) -> Response {
    let path = uri.path();
    // Databricks names the endpoint without the `/api/<version>` prefix.
    let mut segments = path.trim_start_matches('/').splitn(3, '/');
    let shown = match (segments.next(), segments.next(), segments.next()) {
        (Some("api"), Some(_), Some(rest)) => format!("/{rest}"),
        _ => path.to_string(),
    };
    api_error(
        StatusCode::NOT_FOUND,
        "ENDPOINT_NOT_FOUND",
        format!("No API found for '{method} {shown}'"),
    )
}

// === Sandbox control (not part of the Databricks surface, not logged) ===

async fn sandbox_requests(State(ws): State<Arc<WorkspaceState>>) -> Json<Vec<RequestRecord>> {
    Json(ws.requests())
}

async fn sandbox_reset(State(ws): State<Arc<WorkspaceState>>) -> StatusCode {
    ws.reset();
    StatusCode::NO_CONTENT
}

/// Bounded wait used by statement execution; kept here so all timeouts are in one place.
pub(crate) const STATEMENT_HARD_TIMEOUT: Duration = Duration::from_secs(30);
