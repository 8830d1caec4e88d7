//! `/oidc/v1/token` (RFC 8693 token exchange under a federation policy) and the discovery
//! documents Databricks clients read: `/oidc/.well-known/oauth-authorization-server` and
//! `/.well-known/databricks-config`.
//!
//! The federation policy trusts the dev IdP's issuer and keys, accepts the audience
//! `SandboxOptions::federation_audience`, and maps the subject token's `email` claim to a
//! workspace user.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::rejection::FormRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Form, Json};
use serde_json::{json, Value};

use super::{LogNote, WorkspaceState};
use crate::fixture::{ACCOUNT_ID, WORKSPACE_ID};

pub const GRANT_TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
pub const TOKEN_TYPE_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";

fn oauth_error(status: StatusCode, error: &str, description: impl Into<String>) -> Response {
    (
        status,
        [(header::CACHE_CONTROL, "no-store")],
        Json(json!({ "error": error, "error_description": description.into() })),
    )
        .into_response()
}

/// How `/oidc/v1/token` misbehaves, for tests of a failing token endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenFault {
    /// Answer normally.
    Ok,
    /// 503 with a JSON error body.
    ServerError,
    /// 429 with `Retry-After: <secs>`.
    RateLimited { retry_after_secs: u64 },
    /// Answer nothing for [`TOKEN_HANG`], then 503: a token endpoint that times out.
    Hang,
    /// Answer normally, after `millis` (the token is issued at the end): a slow token endpoint.
    Slow { millis: u64 },
}

/// How long a [`TokenFault::Hang`] holds the request.
pub const TOKEN_HANG: std::time::Duration = std::time::Duration::from_secs(20);

pub(super) async fn token(
    State(ws): State<Arc<WorkspaceState>>,
    headers: HeaderMap,
    form: Result<Form<HashMap<String, String>>, FormRejection>,
) -> Response {
    ws.token_requests
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let fault = *ws.token_fault.lock().unwrap_or_else(|p| p.into_inner());
    match fault {
        TokenFault::Ok => token_inner(&ws, &headers, form),
        TokenFault::Slow { millis } => {
            tokio::time::sleep(std::time::Duration::from_millis(millis)).await;
            token_inner(&ws, &headers, form)
        }
        TokenFault::ServerError => oauth_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            "the token service is unavailable",
        ),
        TokenFault::RateLimited { retry_after_secs } => {
            let mut r = oauth_error(
                StatusCode::TOO_MANY_REQUESTS,
                "slow_down",
                "too many token requests",
            );
            if let Ok(v) = header::HeaderValue::from_str(&retry_after_secs.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            r
        }
        TokenFault::Hang => {
            tokio::time::sleep(TOKEN_HANG).await;
            oauth_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                "the token service timed out",
            )
        }
    }
}

fn token_inner(
    ws: &WorkspaceState,
    headers: &HeaderMap,
    form: Result<Form<HashMap<String, String>>, FormRejection>,
) -> Response {
    let Ok(Form(form)) = form else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "the request body must be application/x-www-form-urlencoded",
        );
    };
    // Client authentication: this workspace has no confidential OAuth apps, so a client that
    // authenticates with a secret is unknown.
    if headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().starts_with("basic "))
        || form.contains_key("client_secret")
    {
        return oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "Client authentication failed",
        );
    }
    let field = |k: &str| form.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
    let Some(grant_type) = field("grant_type") else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Missing required parameter: grant_type",
        );
    };
    match grant_type {
        "authorization_code" => return super::u2m::authorization_code(ws, &form),
        "refresh_token" => return super::u2m::refresh_token(ws, &form),
        _ => {}
    }
    if grant_type != GRANT_TOKEN_EXCHANGE {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            format!("Unsupported grant_type: {grant_type}"),
        );
    }
    let with_action = |mut r: Response| {
        r.extensions_mut().insert(LogNote {
            action: Some("tokenExchange"),
            user: None,
        });
        r
    };
    let Some(subject_token) = field("subject_token") else {
        return with_action(oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Missing required parameter: subject_token",
        ));
    };
    match field("subject_token_type") {
        Some(TOKEN_TYPE_JWT) => {}
        Some(other) => {
            return with_action(oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("Unsupported subject_token_type: {other}"),
            ))
        }
        None => {
            return with_action(oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Missing required parameter: subject_token_type",
            ))
        }
    }
    let claims = match ws.idp.verify(subject_token, &ws.opts.federation_audience) {
        Ok(c) => c,
        Err(e) => {
            return with_action(oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_grant",
                format!("Token exchange failed: {e}"),
            ))
        }
    };
    let Some(email) = claims.get("email").and_then(Value::as_str) else {
        return with_action(oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "Token exchange failed: the subject token has no email claim",
        ));
    };
    let user_name = match ws.fixture.user(email) {
        Some(user) => user.user_name.clone(),
        None if ws.opts.auto_provision_users => email.to_ascii_lowercase(),
        None => {
            return with_action(oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_grant",
                "Token exchange failed: the subject does not match any user in this workspace",
            ))
        }
    };
    let scope = field("scope").unwrap_or("all-apis").to_string();
    let principal = format!(
        "{}#{}",
        claims
            .get("iss")
            .and_then(Value::as_str)
            .unwrap_or_default(),
        claims
            .get("sub")
            .and_then(Value::as_str)
            .unwrap_or_default()
    );
    let access_token = ws.issue_token_for(&user_name, Some(principal));
    let mut resp = (
        StatusCode::OK,
        [(header::CACHE_CONTROL, "no-store")],
        Json(json!({
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": ws.opts.token_ttl.as_secs(),
            "scope": scope,
        })),
    )
        .into_response();
    resp.extensions_mut().insert(LogNote {
        action: Some("tokenExchange"),
        user: Some(user_name),
    });
    resp
}

pub(super) async fn authorization_server(State(ws): State<Arc<WorkspaceState>>) -> Json<Value> {
    let base = &ws.url;
    Json(json!({
        "authorization_endpoint": format!("{base}/oidc/v1/authorize"),
        "token_endpoint": format!("{base}/oidc/v1/token"),
        "issuer": format!("{base}/oidc"),
        "jwks_uri": format!("{base}/oidc/jwks.json"),
        "scopes_supported": ["all-apis", "email", "offline_access", "openid", "profile", "sql"],
        "response_types_supported": ["code", "id_token"],
        "response_modes_supported": ["query", "fragment", "form_post"],
        "grant_types_supported": [
            "client_credentials",
            "authorization_code",
            "refresh_token",
            GRANT_TOKEN_EXCHANGE
        ],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "claims_supported": ["iss", "sub", "aud", "iat", "exp", "jti", "name", "upn", "groups", "scp"],
        "request_uri_parameter_supported": false,
    }))
}

/// The workspace issues opaque access tokens, so its own key set is empty.
pub(super) async fn jwks() -> Json<Value> {
    Json(json!({ "keys": [] }))
}

pub(super) async fn databricks_config(State(ws): State<Arc<WorkspaceState>>) -> Json<Value> {
    Json(json!({
        "oidc_endpoint": format!("{}/oidc", ws.url),
        "account_id": ACCOUNT_ID,
        "workspace_id": WORKSPACE_ID,
        "cloud": "aws",
        "token_federation_default_oidc_audiences": [ws.opts.federation_audience],
    }))
}
