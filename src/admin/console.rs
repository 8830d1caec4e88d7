//! The operator console at `/console`: a live decision feed (server-sent events), chain status
//! and "verify now", dependency health, token cache statistics, revoke a user, block an agent.
//!
//! Sign-in is through the organization's IdP ([`super::oidc`], `[admin.oidc]`) and/or a form
//! with a password field `token`, compared in constant time with `[admin] console_token_file`
//! (with `[admin.oidc]` configured, only when `allow_break_glass = true`: the break-glass
//! sign-in). Success sets an HttpOnly, SameSite=Strict session cookie. Every state-changing
//! request needs the session's CSRF token in `x-aegis-csrf` *and* an `Origin` that is this
//! listener's own. Without any sign-in configured the console answers that it is disabled; it
//! is never open.
//!
//! Roles: every session may read (status, feed); `operator` may revoke, block and unblock;
//! `auditor` may verify and export. A break-glass session has every role. The server checks
//! the role of each request (the page only hides what a role cannot use); a refused action
//! answers 403 with fixed text and does nothing. Each action, verify and export included, is
//! an `ADMIN` chain row naming the operator; when that row does not commit, the action fails.
//!
//! Nothing here can read a token or a key: the [`Operations`] a handler can reach return
//! counts, names, health and verify results only.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Form, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::future::BoxFuture;
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::oidc::{self, OidcSignIn};
use super::session::{self, Operator, Sessions};
use crate::audit::Committed;
use crate::broker::stats::WorkspaceCacheStats;
use crate::secret::SecretString;

const LOGIN_HTML: &str = include_str!("assets/login.html");
const CONSOLE_HTML: &str = include_str!("assets/console.html");
const CONSOLE_JS: &str = include_str!("assets/console.js");
const CONSOLE_CSS: &str = include_str!("assets/console.css");

/// The header carrying the CSRF token on state-changing requests.
pub const CSRF_HEADER: &str = "x-aegis-csrf";
/// Rows sent to a feed when it connects, before live ones.
pub const BACKFILL: usize = 100;
/// Longest user or agent name an action accepts.
const MAX_NAME: usize = 320;
/// A failed sign-in is answered this late, to slow down guessing.
const FAILED_LOGIN_DELAY: Duration = Duration::from_millis(300);
/// How often an open feed re-checks that its session is still live.
const SESSION_RECHECK: Duration = Duration::from_secs(5);

// === What the console shows and does ===

/// The chain as this replica sees it.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ChainStatus {
    pub chain_id: String,
    /// Rows this process last committed or loaded.
    pub size: u64,
    /// The head row in Postgres (all replicas), when it could be read.
    pub head_size: Option<u64>,
    /// First 16 hex characters of the head MAC (a MAC, not a key).
    pub head_mac_prefix: Option<String>,
    pub queue_depth: u64,
    pub last_checkpoint: Option<CheckpointStatus>,
    /// The newest signed checkpoint of each replica (by the signer in the checkpoint; `""`
    /// for version-1 checkpoints, which name none), newest first.
    pub replica_checkpoints: Vec<ReplicaCheckpoint>,
    pub last_verify: Option<VerifyOutcome>,
    pub verify_running: bool,
    /// The newest signed tree head of the transparency log (this replica's).
    pub tree: Option<TreeStatus>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TreeStatus {
    pub size: u64,
    /// Hex of the root hash.
    pub root: String,
    pub cosigners: usize,
    pub witnessed: bool,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReplicaCheckpoint {
    pub signer: String,
    pub size: u64,
    /// Seconds since the epoch (the database's clock for version-2 checkpoints).
    pub ts: i64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CheckpointStatus {
    pub size: u64,
    /// Seconds since the epoch.
    pub ts: i64,
}

/// The result of one "verify now".
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct VerifyOutcome {
    pub at_unix_ms: i64,
    pub intact: bool,
    pub rows: u64,
    pub first_bad_seq: Option<u64>,
    pub problem: Option<String>,
    pub detail: Option<String>,
    pub duration_ms: u64,
}

/// One dependency's last probe.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DependencyHealth {
    /// `redis`, `postgres`, `idp:<issuer>`, `workspace:<name>`.
    pub name: String,
    pub up: bool,
    pub latency_ms: Option<f64>,
    /// Short fixed text ("ok", "unreachable", "keys not loaded", "HTTP 503"), never an error
    /// message from the dependency.
    pub detail: String,
    pub checked_unix_ms: i64,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct ConsoleStatus {
    pub instance_id: String,
    pub version: &'static str,
    pub ready: bool,
    pub chain: ChainStatus,
    pub dependencies: Vec<DependencyHealth>,
    pub cache: Vec<WorkspaceCacheStats>,
    /// Tokens cached in this process, all workspaces.
    pub l1_entries: u64,
    pub blocked_agents: Vec<String>,
    pub workspaces: Vec<String>,
}

/// Why an action failed, as the operator sees it (fixed text only).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    #[error("{0} is unavailable")]
    Unavailable(&'static str),
    #[error("a verify is already running")]
    Busy,
    #[error("{0}")]
    Invalid(&'static str),
}

/// What the console can do. The live implementation is [`super::live::LiveOps`]; handler
/// tests use a fake.
pub trait Operations: Send + Sync + 'static {
    fn status(&self) -> BoxFuture<'_, ConsoleStatus>;
    /// Live committed decisions.
    fn subscribe(&self) -> broadcast::Receiver<Arc<Committed>>;
    /// The newest `limit` rows of the chain, oldest first.
    fn recent(&self, limit: usize) -> BoxFuture<'_, Result<Vec<Committed>, OpError>>;
    /// Verifies the chain; the outcome is recorded as an ADMIN row naming `by`.
    fn verify(&self, by: Operator) -> BoxFuture<'_, Result<VerifyOutcome, OpError>>;
    /// Drops the user's cached tokens in one workspace, or all when `None`; returns the
    /// workspaces done.
    fn revoke(
        &self,
        by: Operator,
        user: String,
        workspace: Option<String>,
    ) -> BoxFuture<'_, Result<Vec<String>, OpError>>;
    fn set_agent_blocked(
        &self,
        by: Operator,
        agent: String,
        blocked: bool,
    ) -> BoxFuture<'_, Result<(), OpError>>;
    /// The newest `limit` committed rows (oldest first) for an auditor, after an ADMIN row
    /// naming `by` has committed.
    fn export(&self, by: Operator, limit: usize) -> BoxFuture<'_, Result<Vec<Committed>, OpError>>;
}

/// The console: its sign-in methods, sessions, and what it operates on.
pub struct Console {
    /// The static token, when static sign-in is allowed (break-glass with `oidc`).
    token: Option<SecretString>,
    oidc: Option<OidcSignIn>,
    sessions: Sessions,
    ops: Arc<dyn Operations>,
}

impl Console {
    /// `None` when neither sign-in is configured (the console is then disabled).
    pub fn new(
        token: Option<SecretString>,
        oidc: Option<OidcSignIn>,
        ops: Arc<dyn Operations>,
    ) -> Option<Console> {
        Console::with_sessions(token, oidc, ops, Sessions::default())
    }

    pub fn with_sessions(
        token: Option<SecretString>,
        oidc: Option<OidcSignIn>,
        ops: Arc<dyn Operations>,
        sessions: Sessions,
    ) -> Option<Console> {
        if token.is_none() && oidc.is_none() {
            return None;
        }
        Some(Console {
            token,
            oidc,
            sessions,
            ops,
        })
    }
}

/// `None` means no sign-in is configured: the console is disabled.
pub type ConsoleState = Option<Arc<Console>>;

/// Most rows one export returns.
pub const MAX_EXPORT: usize = 1000;

pub fn routes() -> Router<ConsoleState> {
    Router::new()
        .route("/console", get(page))
        .route("/console/", get(page))
        .route("/console/login", post(login))
        .route("/console/oidc/start", get(oidc_start))
        .route("/console/oidc/callback", get(oidc_callback))
        .route("/console/logout", post(logout))
        .route("/console/events", get(events))
        .route("/console/api/status", get(status))
        .route("/console/api/verify", post(verify))
        .route("/console/api/revoke", post(revoke))
        .route("/console/api/block", post(block))
        .route("/console/api/unblock", post(unblock))
        .route("/console/api/export", post(export))
        .route("/console/assets/console.js", get(js))
        .route("/console/assets/console.css", get(css))
}

// === Responses ===

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
    img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Security headers every console response carries.
fn harden(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // Not `no-referrer`: under it browsers send `Origin: null` on POSTs, and the Origin check
    // needs the real one. `same-origin` still tells no other site anything.
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn html(code: StatusCode, body: String) -> Response {
    harden((code, Html(body)).into_response())
}

fn json_error(code: StatusCode, error: &str) -> Response {
    harden((code, Json(serde_json::json!({ "error": error }))).into_response())
}

fn disabled() -> Response {
    html(
        StatusCode::NOT_FOUND,
        LOGIN_HTML
            .replace(
                "{{message}}",
                "The operator console is disabled: neither <code>[admin.oidc]</code> nor \
                 <code>[admin] console_token_file</code> is configured.",
            )
            .replace("{{form_class}}", "hidden")
            .replace("{{oidc_class}}", "hidden")
            .replace("{{idp}}", "")
            .replace("{{token_label}}", ""),
    )
}

pub(crate) use crate::http::escape_html;

/// The sign-in page; `message` is trusted markup (fixed text only).
fn login_page(c: &Console, code: StatusCode, message: &str) -> Response {
    let (form_class, token_label) = match (&c.token, &c.oidc) {
        (None, _) => ("hidden", ""),
        (Some(_), Some(_)) => (
            "break-glass",
            "Break-glass token (emergency only; recorded)",
        ),
        (Some(_), None) => ("", "Console token"),
    };
    html(
        code,
        LOGIN_HTML
            .replace("{{message}}", message)
            .replace("{{form_class}}", form_class)
            .replace("{{token_label}}", token_label)
            .replace(
                "{{oidc_class}}",
                if c.oidc.is_some() { "" } else { "hidden" },
            )
            .replace(
                "{{idp}}",
                &escape_html(c.oidc.as_ref().map_or("", |o| o.issuer_name())),
            ),
    )
}

fn op_error(e: OpError) -> Response {
    let code = match e {
        OpError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        OpError::Busy => StatusCode::CONFLICT,
        OpError::Invalid(_) => StatusCode::BAD_REQUEST,
    };
    json_error(code, &e.to_string())
}

// === Session and CSRF checks ===

fn cookie_session(headers: &HeaderMap) -> Option<&str> {
    crate::http::cookie(headers, session::COOKIE)
}

/// True when the request comes from a page of this same listener: its `Origin` is
/// `http(s)://<Host>`. Without an `Origin`, only `Sec-Fetch-Site: same-origin` passes.
fn same_origin(headers: &HeaderMap) -> bool {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    match headers.get(header::ORIGIN).map(|o| o.to_str()) {
        Some(Ok(origin)) => {
            let Some(host) = host else { return false };
            origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"))
                .is_some_and(|o| o.eq_ignore_ascii_case(host))
        }
        Some(Err(_)) => false,
        None => headers
            .get("sec-fetch-site")
            .is_some_and(|v| v.as_bytes() == b"same-origin"),
    }
}

/// Why a console request was refused before it reached an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    Disabled,
    SignedOut,
    CrossSite,
    /// The session's roles do not include the one the request needs.
    Role,
}

/// The fixed text of a request refused for its role.
pub const ROLE_REFUSED: &str = "your console role does not allow this";

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        match self {
            Refused::Disabled => json_error(StatusCode::NOT_FOUND, "the console is disabled"),
            Refused::SignedOut => json_error(StatusCode::UNAUTHORIZED, "sign in first"),
            Refused::CrossSite => json_error(StatusCode::FORBIDDEN, "cross-site request refused"),
            Refused::Role => json_error(StatusCode::FORBIDDEN, ROLE_REFUSED),
        }
    }
}

/// What a request needs the session's roles to include.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    /// Status and the feed: any role.
    View,
    /// Revoke, block, unblock.
    Operate,
    /// Verify, export.
    Audit,
}

fn allowed(op: &Operator, need: Need) -> bool {
    match need {
        Need::View => op.roles.any(),
        Need::Operate => op.roles.operator,
        Need::Audit => op.roles.auditor,
    }
}

/// A signed-in operator, the session's CSRF token, checked for the role `need`.
fn signed_in(
    console: &ConsoleState,
    headers: &HeaderMap,
    need: Need,
) -> Result<(Arc<Console>, String, Operator), Refused> {
    let Some(console) = console else {
        return Err(Refused::Disabled);
    };
    let session = cookie_session(headers).and_then(|id| console.sessions.touch(id));
    match session {
        Some((csrf, op)) if allowed(&op, need) => Ok((console.clone(), csrf, op)),
        Some(_) => Err(Refused::Role),
        None => Err(Refused::SignedOut),
    }
}

/// A signed-in operator making a state-changing request from the console page itself, with
/// the role `need`. The CSRF and Origin checks come first; a refusal for the role is logged.
fn checked_action(
    console: &ConsoleState,
    headers: &HeaderMap,
    need: Need,
    action: &'static str,
) -> Result<(Arc<Console>, Operator), Refused> {
    let Some(c) = console else {
        return Err(Refused::Disabled);
    };
    let Some((csrf, op)) = cookie_session(headers).and_then(|id| c.sessions.touch(id)) else {
        return Err(Refused::SignedOut);
    };
    let sent = headers
        .get(CSRF_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !same_origin(headers) || !session::secret_eq(sent, &csrf) {
        return Err(Refused::CrossSite);
    }
    if !allowed(&op, need) {
        tracing::warn!(operator = %op.actor(), action, "console: action refused for the operator's role");
        metrics::counter!("aegis_console_refused_total", "action" => action).increment(1);
        return Err(Refused::Role);
    }
    Ok((c.clone(), op))
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_NAME && !s.chars().any(char::is_control)
}

// === Handlers ===

async fn page(State(console): State<ConsoleState>, headers: HeaderMap) -> Response {
    let Some(c) = &console else {
        return disabled();
    };
    match cookie_session(&headers).and_then(|id| c.sessions.touch(id)) {
        Some((csrf, op)) => {
            let roles = [
                ("viewer", op.roles.any()),
                ("operator", op.roles.operator),
                ("auditor", op.roles.auditor),
            ]
            .iter()
            .filter(|(_, on)| *on)
            .map(|(r, _)| *r)
            .collect::<Vec<_>>()
            .join(" ");
            html(
                StatusCode::OK,
                CONSOLE_HTML
                    .replace("{{csrf}}", &csrf)
                    .replace("{{roles}}", &roles)
                    .replace("{{operator}}", &escape_html(op.display())),
            )
        }
        None => login_page(c, StatusCode::OK, ""),
    }
}

fn session_cookie(id: &str) -> String {
    format!(
        "{}={}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={}",
        session::COOKIE,
        id,
        session::MAX_AGE.as_secs()
    )
}

fn clear_pre_cookie() -> String {
    format!(
        "{}=; Path=/console/oidc; HttpOnly; SameSite=Lax; Max-Age=0",
        oidc::PRE_COOKIE
    )
}

/// The cookies of an IdP sign-in are `Secure` when the console is reached over https.
fn with_flags(cookie: String, o: &OidcSignIn) -> String {
    cookie + o.cookie_flags()
}

/// `GET /console/oidc/start`: to the IdP, with a fresh pre-session cookie.
async fn oidc_start(State(console): State<ConsoleState>) -> Response {
    let Some(c) = &console else {
        return disabled();
    };
    let Some(o) = &c.oidc else {
        return login_page(
            c,
            StatusCode::NOT_FOUND,
            "Sign-in through an IdP is not configured.",
        );
    };
    let started = match o.start().await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = e.label(), "console sign-in could not start");
            metrics::counter!("aegis_console_logins_total", "result" => e.label()).increment(1);
            return login_page(
                c,
                StatusCode::SERVICE_UNAVAILABLE,
                &escape_html(&format!("Could not start the sign-in: {e}.")),
            );
        }
    };
    // Lax, not Strict: it must come back on the IdP's cross-site redirect to the callback.
    let cookie = with_flags(
        format!(
            "{}={}; Path=/console/oidc; HttpOnly; SameSite=Lax; Max-Age={}",
            oidc::PRE_COOKIE,
            started.cookie,
            oidc::PENDING_TTL.as_secs()
        ),
        o,
    );
    let mut resp = (
        StatusCode::SEE_OTHER,
        [(header::LOCATION, started.location.as_str())],
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    harden(resp)
}

/// `GET /console/oidc/callback`: the IdP's redirect back.
async fn oidc_callback(
    State(console): State<ConsoleState>,
    headers: HeaderMap,
    query: Result<axum::extract::Query<oidc::Callback>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Some(c) = &console else {
        return disabled();
    };
    let Some(o) = &c.oidc else {
        return login_page(
            c,
            StatusCode::NOT_FOUND,
            "Sign-in through an IdP is not configured.",
        );
    };
    let cb = query.map(|q| q.0).unwrap_or_default();
    let pre = crate::http::cookie(&headers, oidc::PRE_COOKIE);
    let outcome = o.finish(pre, cb).await;
    let op = match outcome {
        Ok(op) => op,
        Err(e) => {
            tracing::warn!(error = e.label(), "console sign-in through the IdP refused");
            metrics::counter!("aegis_console_logins_total", "result" => e.label()).increment(1);
            let code = match e {
                oidc::SignInError::IdpUnavailable => StatusCode::BAD_GATEWAY,
                oidc::SignInError::NoRole => StatusCode::FORBIDDEN,
                _ => StatusCode::UNAUTHORIZED,
            };
            let mut resp = login_page(c, code, &escape_html(&format!("Sign-in failed: {e}.")));
            if let Ok(v) = HeaderValue::from_str(&clear_pre_cookie()) {
                resp.headers_mut().append(header::SET_COOKIE, v);
            }
            return resp;
        }
    };
    let Some(s) = c.sessions.create(op.clone()) else {
        return login_page(
            c,
            StatusCode::SERVICE_UNAVAILABLE,
            "Could not start a session.",
        );
    };
    tracing::info!(operator = %op.actor(), "console sign-in through the IdP");
    metrics::counter!("aegis_console_logins_total", "result" => "ok").increment(1);
    // A page, not a redirect: a SameSite=Strict cookie set on a navigation that started at
    // the IdP is not sent on a redirect in that same navigation, but it is on one this page
    // starts.
    let mut resp = html(
        StatusCode::OK,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"0;url=/console\"><title>aegis · signed in</title>\
         </head><body><p>Signed in. <a id=\"continue\" href=\"/console\">Continue to the console</a>.</p>\
         </body></html>"
            .to_string(),
    );
    for v in [with_flags(session_cookie(&s.id), o), clear_pre_cookie()] {
        if let Ok(v) = HeaderValue::from_str(&v) {
            resp.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    resp
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(
    State(console): State<ConsoleState>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    let Some(c) = &console else {
        return disabled();
    };
    // Login CSRF: a sign-in only from this listener's own form.
    if !same_origin(&headers) {
        return login_page(c, StatusCode::FORBIDDEN, "Cross-site sign-in refused.");
    }
    let submitted = SecretString::new(form.token);
    let Some(token) = &c.token else {
        tracing::warn!("console sign-in with the static token refused: break-glass is off");
        metrics::counter!("aegis_console_logins_total", "result" => "break_glass_off").increment(1);
        tokio::time::sleep(FAILED_LOGIN_DELAY).await;
        return login_page(
            c,
            StatusCode::FORBIDDEN,
            "Sign-in with a console token is switched off; sign in through your identity provider.",
        );
    };
    if !session::secret_eq(submitted.expose().trim(), token.expose()) {
        tracing::warn!("console sign-in with a wrong token");
        metrics::counter!("aegis_console_logins_total", "result" => "denied").increment(1);
        tokio::time::sleep(FAILED_LOGIN_DELAY).await;
        return login_page(c, StatusCode::UNAUTHORIZED, "That token is not right.");
    }
    let Some(s) = c.sessions.create(Operator::break_glass()) else {
        return login_page(
            c,
            StatusCode::SERVICE_UNAVAILABLE,
            "Could not start a session.",
        );
    };
    if c.oidc.is_some() {
        tracing::warn!("console break-glass sign-in with the static token");
    } else {
        tracing::info!("console sign-in with the static token");
    }
    metrics::counter!("aegis_console_logins_total", "result" => "ok").increment(1);
    let cookie = session_cookie(&s.id);
    let mut resp = (StatusCode::SEE_OTHER, [(header::LOCATION, "/console")]).into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    harden(resp)
}

async fn logout(State(console): State<ConsoleState>, headers: HeaderMap) -> Response {
    let c = match checked_action(&console, &headers, Need::View, "logout") {
        Ok((c, _)) => c,
        Err(r) => return r.into_response(),
    };
    if let Some(id) = cookie_session(&headers) {
        c.sessions.remove(id);
    }
    let clear = format!(
        "{}=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0",
        session::COOKIE
    );
    let mut resp = Json(serde_json::json!({ "signed_out": true })).into_response();
    if let Ok(v) = HeaderValue::from_str(&clear) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    harden(resp)
}

async fn status(State(console): State<ConsoleState>, headers: HeaderMap) -> Response {
    match signed_in(&console, &headers, Need::View) {
        Ok((c, _, _)) => harden(Json(c.ops.status().await).into_response()),
        Err(r) => r.into_response(),
    }
}

async fn verify(State(console): State<ConsoleState>, headers: HeaderMap) -> Response {
    let (c, op) = match checked_action(&console, &headers, Need::Audit, "verify") {
        Ok(x) => x,
        Err(r) => return r.into_response(),
    };
    match c.ops.verify(op).await {
        Ok(outcome) => harden(Json(outcome).into_response()),
        Err(e) => op_error(e),
    }
}

#[derive(Deserialize)]
struct RevokeBody {
    user: String,
    #[serde(default)]
    workspace: Option<String>,
}

async fn revoke(
    State(console): State<ConsoleState>,
    headers: HeaderMap,
    Json(body): Json<RevokeBody>,
) -> Response {
    let (c, op) = match checked_action(&console, &headers, Need::Operate, "revoke") {
        Ok(x) => x,
        Err(r) => return r.into_response(),
    };
    let user = body.user.trim().to_string();
    let workspace = body
        .workspace
        .map(|w| w.trim().to_string())
        .filter(|w| !w.is_empty());
    if !valid_name(&user) || workspace.as_deref().is_some_and(|w| !valid_name(w)) {
        return op_error(OpError::Invalid(
            "a user name (and optionally a workspace) is required",
        ));
    }
    let by = op.actor();
    match c.ops.revoke(op, user.clone(), workspace).await {
        Ok(done) => {
            tracing::info!(operator = %by, user = %user, workspaces = ?done, "console: revoked the user's cached tokens");
            harden(Json(serde_json::json!({ "revoked": user, "workspaces": done })).into_response())
        }
        Err(e) => op_error(e),
    }
}

#[derive(Deserialize)]
struct AgentBody {
    agent: String,
}

async fn set_blocked(
    console: ConsoleState,
    headers: HeaderMap,
    body: AgentBody,
    blocked: bool,
) -> Response {
    let action = if blocked { "block" } else { "unblock" };
    let (c, op) = match checked_action(&console, &headers, Need::Operate, action) {
        Ok(x) => x,
        Err(r) => return r.into_response(),
    };
    let agent = body.agent.trim().to_string();
    if !crate::policy::blocklist::valid_agent_name(&agent) {
        return op_error(OpError::Invalid("an agent name is required"));
    }
    let by = op.actor();
    match c.ops.set_agent_blocked(op, agent.clone(), blocked).await {
        Ok(()) => {
            tracing::info!(operator = %by, agent = %agent, blocked, "console: agent blocklist changed");
            harden(Json(serde_json::json!({ "agent": agent, "blocked": blocked })).into_response())
        }
        Err(e) => op_error(e),
    }
}

async fn block(
    State(console): State<ConsoleState>,
    headers: HeaderMap,
    Json(body): Json<AgentBody>,
) -> Response {
    set_blocked(console, headers, body, true).await
}

async fn unblock(
    State(console): State<ConsoleState>,
    headers: HeaderMap,
    Json(body): Json<AgentBody>,
) -> Response {
    set_blocked(console, headers, body, false).await
}

#[derive(Deserialize, Default)]
struct ExportBody {
    #[serde(default)]
    limit: Option<usize>,
}

/// `POST /console/api/export` (auditor): the newest committed rows as JSON, after an ADMIN
/// row naming the auditor has committed. Rows hold names, reasons and trace ids; never a
/// token, a fingerprint or a key.
async fn export(
    State(console): State<ConsoleState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let (c, op) = match checked_action(&console, &headers, Need::Audit, "export") {
        Ok(x) => x,
        Err(r) => return r.into_response(),
    };
    let body: ExportBody = if body.is_empty() {
        ExportBody::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(b) => b,
            Err(_) => return op_error(OpError::Invalid("the body must be {\"limit\": <rows>}")),
        }
    };
    let limit = body.limit.unwrap_or(MAX_EXPORT).clamp(1, MAX_EXPORT);
    let by = op.actor();
    match c.ops.export(op, limit).await {
        Ok(rows) => {
            tracing::info!(operator = %by, rows = rows.len(), "console: rows exported");
            harden(Json(serde_json::json!({ "rows": rows })).into_response())
        }
        Err(e) => op_error(e),
    }
}

async fn js() -> Response {
    harden(
        (
            [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
            CONSOLE_JS,
        )
            .into_response(),
    )
}

async fn css() -> Response {
    harden(
        (
            [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
            CONSOLE_CSS,
        )
            .into_response(),
    )
}

// === The live feed ===

fn decision_event(row: &Committed) -> Event {
    let data = serde_json::to_string(row).unwrap_or_else(|_| "{}".to_string());
    Event::default()
        .event("decision")
        .id(row.seq.to_string())
        .data(data)
}

struct Feed {
    console: Arc<Console>,
    session: String,
    backlog: std::collections::VecDeque<Arc<Committed>>,
    live: broadcast::Receiver<Arc<Committed>>,
    /// Rows at or below this seq were already sent.
    sent_up_to: u64,
    recheck: tokio::time::Interval,
    done: bool,
}

async fn events(State(console): State<ConsoleState>, headers: HeaderMap) -> Response {
    let (c, _, _) = match signed_in(&console, &headers, Need::View) {
        Ok(x) => x,
        Err(r) => return r.into_response(),
    };
    let session = cookie_session(&headers).unwrap_or("").to_string();
    // Subscribe before reading the backlog so no row falls between the two.
    let live = c.ops.subscribe();
    let backlog = match c.ops.recent(BACKFILL).await {
        Ok(rows) => rows.into_iter().map(Arc::new).collect(),
        // The feed still works without history.
        Err(_) => std::collections::VecDeque::new(),
    };
    let mut recheck = tokio::time::interval(SESSION_RECHECK);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let feed = Feed {
        console: c,
        session,
        backlog,
        live,
        sent_up_to: 0,
        recheck,
        done: false,
    };
    harden(
        Sse::new(feed_stream(feed))
            .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
            .into_response(),
    )
}

fn feed_stream(feed: Feed) -> impl Stream<Item = Result<Event, Infallible>> {
    futures_util::stream::unfold(feed, |mut f| async move {
        if f.done {
            return None;
        }
        if let Some(row) = f.backlog.pop_front() {
            f.sent_up_to = f.sent_up_to.max(row.seq);
            let ev = decision_event(&row);
            return Some((Ok(ev), f));
        }
        loop {
            tokio::select! {
                msg = f.live.recv() => match msg {
                    Ok(row) if row.seq <= f.sent_up_to => continue,
                    Ok(row) => {
                        f.sent_up_to = row.seq;
                        let ev = decision_event(&row);
                        return Some((Ok(ev), f));
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let ev = Event::default().event("lagged").data(n.to_string());
                        return Some((Ok(ev), f));
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                _ = f.recheck.tick() => {
                    if !f.console.sessions.is_live(&f.session) {
                        // Signed out or expired: tell the page, then end the stream.
                        f.done = true;
                        let ev = Event::default().event("signed_out").data("");
                        return Some((Ok(ev), f));
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests;
