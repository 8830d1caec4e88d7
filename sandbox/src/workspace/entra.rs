//! An Entra-shaped token endpoint for on-behalf-of (OBO): `POST /{tenant}/oauth2/v2.0/token`,
//! served on the dev IdP's listener (standing in for `login.microsoftonline.com`).
//!
//! One confidential app is registered ([`ENTRA_CLIENT_ID`] with [`ENTRA_CLIENT_SECRET`]) in one
//! tenant ([`ENTRA_TENANT_ID`]). A `jwt-bearer` grant with `requested_token_use=on_behalf_of`
//! and the Azure Databricks scope exchanges a dev IdP token whose audience is the app (the user's
//! token *to aegis*) for an access token this workspace accepts as that user, as Azure Databricks
//! accepts Entra tokens. Errors have Entra's shape (`error`, `error_description` with an
//! `AADSTS` code, `error_codes`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::rejection::FormRejection;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Form, Json, Router};
use serde_json::{json, Value};

use super::oauth::TokenFault;
use super::{lock, WorkspaceState};
use crate::util::uuid_v4;

/// The sandbox's Entra tenant id.
pub const ENTRA_TENANT_ID: &str = "5a4db0c0-0000-4000-8000-00000000e17a";
/// The registered app aegis uses; also the audience dev IdP tokens must carry for OBO.
pub const ENTRA_CLIENT_ID: &str = "aegis";
/// The app's client secret. A dev-only value of the dev-only sandbox, like its HS256 secret.
pub const ENTRA_CLIENT_SECRET: &str = "sandbox-entra-client-secret";
/// The Azure Databricks resource scope OBO asks for.
pub const AZURE_DATABRICKS_SCOPE: &str = "2ff814a6-3304-4ab8-85cb-cd0e6f879c1d/.default";
const GRANT_JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

pub(crate) struct EntraState {
    pub fault: Mutex<TokenFault>,
    issued: Mutex<HashMap<String, u64>>,
    requests: AtomicU64,
}

impl Default for EntraState {
    fn default() -> Self {
        EntraState {
            fault: Mutex::new(TokenFault::Ok),
            issued: Mutex::new(HashMap::new()),
            requests: AtomicU64::new(0),
        }
    }
}

impl EntraState {
    /// Successful OBO exchanges for that Databricks user.
    pub fn obo_count(&self, user_name: &str) -> u64 {
        lock(&self.issued)
            .get(&user_name.to_ascii_lowercase())
            .copied()
            .unwrap_or(0)
    }

    /// Requests the endpoint received (whatever their outcome).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

pub(crate) fn router(ws: Arc<WorkspaceState>) -> Router {
    Router::new()
        .route("/{tenant}/oauth2/v2.0/token", post(token))
        .with_state(ws)
}

fn entra_error(status: StatusCode, error: &str, code: u32, text: &str) -> Response {
    (
        status,
        [(header::CACHE_CONTROL, "no-store")],
        Json(json!({
            "error": error,
            "error_description": format!("AADSTS{code}: {text}"),
            "error_codes": [code],
            "trace_id": uuid_v4(),
            "correlation_id": uuid_v4(),
        })),
    )
        .into_response()
}

async fn token(
    State(ws): State<Arc<WorkspaceState>>,
    Path(tenant): Path<String>,
    form: Result<Form<HashMap<String, String>>, FormRejection>,
) -> Response {
    let entra = &ws.entra;
    entra.requests.fetch_add(1, Ordering::Relaxed);
    let fault = *lock(&entra.fault);
    match fault {
        TokenFault::Ok => {}
        TokenFault::Slow { millis } => {
            tokio::time::sleep(std::time::Duration::from_millis(millis)).await
        }
        TokenFault::RateLimited { retry_after_secs } => {
            let mut r = entra_error(
                StatusCode::TOO_MANY_REQUESTS,
                "temporarily_unavailable",
                50196,
                "The server terminated an operation because it encountered a client request loop.",
            );
            if let Ok(v) = header::HeaderValue::from_str(&retry_after_secs.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            return r;
        }
        TokenFault::ServerError | TokenFault::Hang => {
            if fault == TokenFault::Hang {
                tokio::time::sleep(super::oauth::TOKEN_HANG).await;
            }
            return entra_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                90033,
                "A transient error has occurred. Please try again.",
            );
        }
    }
    if tenant != ENTRA_TENANT_ID {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            90002,
            &format!("Tenant '{tenant}' not found."),
        );
    }
    let Ok(Form(form)) = form else {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            900144,
            "The request body must be application/x-www-form-urlencoded.",
        );
    };
    let get = |k: &str| form.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
    if get("grant_type") != Some(GRANT_JWT_BEARER) {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            70003,
            "The app requested an unsupported grant type.",
        );
    }
    if get("requested_token_use") != Some("on_behalf_of") {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            900144,
            "The request body must contain the following parameter: 'requested_token_use'.",
        );
    }
    if get("client_id") != Some(ENTRA_CLIENT_ID)
        || get("client_secret") != Some(ENTRA_CLIENT_SECRET)
    {
        return entra_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7000215,
            "Invalid client secret provided.",
        );
    }
    let scope = get("scope").unwrap_or_default();
    if !scope
        .split_whitespace()
        .any(|s| s == AZURE_DATABRICKS_SCOPE)
    {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            70011,
            "The provided value for the input parameter 'scope' is not valid.",
        );
    }
    let Some(assertion) = get("assertion") else {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            900144,
            "The request body must contain the following parameter: 'assertion'.",
        );
    };
    // The assertion is the user's token to the middle-tier app: its audience is the app.
    let claims = match ws.idp.verify(assertion, ENTRA_CLIENT_ID) {
        Ok(c) => c,
        Err(e) => {
            return entra_error(
                StatusCode::BAD_REQUEST,
                "invalid_grant",
                50013,
                &format!("Assertion failed signature validation. [{e}]"),
            )
        }
    };
    let Some(user) = claims
        .get("email")
        .and_then(Value::as_str)
        .and_then(|e| ws.fixture.user(e))
    else {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            50034,
            "The user account does not exist in the directory.",
        );
    };
    let access_token = ws.issue_token(&user.user_name);
    *lock(&entra.issued)
        .entry(user.user_name.to_ascii_lowercase())
        .or_insert(0) += 1;
    let ttl = ws.opts.token_ttl.as_secs();
    (
        StatusCode::OK,
        [(header::CACHE_CONTROL, "no-store")],
        Json(json!({
            "token_type": "Bearer",
            "scope": AZURE_DATABRICKS_SCOPE,
            "expires_in": ttl,
            "ext_expires_in": ttl,
            "access_token": access_token,
        })),
    )
        .into_response()
}
