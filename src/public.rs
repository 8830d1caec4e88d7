//! The public listener (`[server] public_listen`): where users' browsers consent to U2M.
//!
//! - `GET /oauth/start?w&u&i&e&s`: checks the signed consent link (see
//!   [`crate::broker::u2m::ConsentLinks`]), starts an authorization code + PKCE (S256) flow and
//!   redirects to the workspace's `/oidc/v1/authorize`; a cookie binds the flow to this browser.
//! - `GET /oauth/callback?code&state`: exchanges the code, checks with SCIM `Me` that the
//!   Databricks user who consented is the user the IdP identity maps to, and only then stores
//!   the refresh token.
//!
//! Pages are plain text-only HTML that never contain a token, code, state or internal error;
//! every answer is `no-store` and `no-referrer` (the callback URL carries the code).

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::broker::now_ms;
use crate::broker::u2m::{CallbackError, LinkError, U2m, CONSENT_TTL};
use crate::config::{Config, ConfigError, TokenSourceKind, WorkspaceConfig};
use crate::http::escape_html as escape;
use crate::pg::PgTarget;
use crate::redis::RedisLink;

pub struct PublicState {
    pub u2m: Arc<U2m>,
    pub workspaces: Vec<WorkspaceConfig>,
    /// Whether `public_url` is https: the binding cookie is then `Secure` and `__Host-`.
    pub secure: bool,
}

impl PublicState {
    fn cookie_name(&self) -> &'static str {
        if self.secure {
            "__Host-aegis_u2m"
        } else {
            "aegis_u2m"
        }
    }
}

/// Whether the consent listener runs: it is configured and a workspace uses U2M.
pub fn wanted(cfg: &Config) -> bool {
    cfg.server.public_listen.is_some()
        && cfg
            .workspaces
            .iter()
            .any(|w| w.token_source == TokenSourceKind::U2m)
}

/// Builds the U2M token source when a workspace uses it.
pub fn u2m_source(
    cfg: &Config,
    http: &reqwest::Client,
    redis: &Arc<RedisLink>,
) -> Result<Option<Arc<U2m>>, ConfigError> {
    if !cfg
        .workspaces
        .iter()
        .any(|w| w.token_source == TokenSourceKind::U2m)
    {
        return Ok(None);
    }
    // Config validation requires public_url for u2m workspaces.
    let public_url = cfg.server.public_url.clone().ok_or_else(|| ConfigError {
        path: "server.public_url".into(),
        message: "is required for u2m".into(),
    })?;
    let target = PgTarget::parse(&cfg.postgres.url).map_err(|message| ConfigError {
        path: "postgres.url".into(),
        message,
    })?;
    let u2m = Arc::new(U2m::new(
        target,
        &cfg.redis.cache_key,
        public_url,
        http.clone(),
        redis.clone(),
    ));
    Ok(Some(u2m))
}

/// Serves the consent pages on `listener` until `stop` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    cfg: &Config,
    u2m: Arc<U2m>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    let secure = cfg
        .server
        .public_url
        .as_ref()
        .is_some_and(|u| u.scheme() == "https");
    let router = app(Arc::new(PublicState {
        u2m,
        workspaces: cfg.workspaces.clone(),
        secure,
    }));
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await
}

pub fn app(state: Arc<PublicState>) -> Router {
    Router::new()
        .route("/oauth/start", get(start))
        .route("/oauth/callback", get(callback))
        .fallback(|| async { page(StatusCode::NOT_FOUND, "Not found", "There is nothing here.") })
        .with_state(state)
}

async fn start(
    State(state): State<Arc<PublicState>>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let claims = match state.u2m.links().verify(&params, now_ms()) {
        Ok(c) => c,
        Err(e) => {
            consent_metric("bad_link");
            let text = match e {
                LinkError::Expired => {
                    "This consent link has expired. Retry your request to get a new one."
                }
                LinkError::Malformed | LinkError::BadSignature => "This consent link is not valid.",
            };
            return page(StatusCode::BAD_REQUEST, "Consent link not valid", text);
        }
    };
    let Some(ws) = state
        .workspaces
        .iter()
        .find(|w| w.name == claims.workspace && w.token_source == TokenSourceKind::U2m)
    else {
        consent_metric("bad_link");
        return page(
            StatusCode::BAD_REQUEST,
            "Consent link not valid",
            "This consent link names no workspace that aegis serves.",
        );
    };
    let Some(link_id) = crate::broker::u2m::ConsentLinks::link_id(&params) else {
        consent_metric("bad_link");
        return page(
            StatusCode::BAD_REQUEST,
            "Consent link not valid",
            "This consent link is not valid.",
        );
    };
    match state.u2m.start(ws, &claims, &link_id).await {
        Ok(started) => {
            let mut resp = StatusCode::FOUND.into_response();
            let cookie = format!(
                "{}={}; Path=/; Max-Age={}; HttpOnly; SameSite=Lax{}",
                state.cookie_name(),
                started.binding.expose(),
                CONSENT_TTL.as_secs(),
                if state.secure { "; Secure" } else { "" }
            );
            match (
                HeaderValue::from_str(&started.authorize_url),
                HeaderValue::from_str(&cookie),
            ) {
                (Ok(location), Ok(cookie)) => {
                    let h = resp.headers_mut();
                    h.insert(header::LOCATION, location);
                    h.insert(header::SET_COOKIE, cookie);
                    harden(h);
                    resp
                }
                _ => page(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "Consent could not start",
                    "aegis could not build the sign-in address.",
                ),
            }
        }
        Err(e) => failure(e),
    }
}

async fn callback(
    State(state): State<Arc<PublicState>>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    if params.contains_key("error") {
        consent_metric("declined");
        return page(
            StatusCode::BAD_REQUEST,
            "Consent not given",
            "The workspace did not grant access. Retry your request to get a new consent link.",
        );
    }
    let (Some(code), Some(st)) = (
        params.get("code").filter(|c| !c.is_empty()),
        params.get("state").filter(|s| !s.is_empty()),
    ) else {
        consent_metric("bad_callback");
        return page(
            StatusCode::BAD_REQUEST,
            "Consent not finished",
            "The sign-in answer is incomplete.",
        );
    };
    let binding = crate::http::cookie(&headers, state.cookie_name());
    match state.u2m.finish(&state.workspaces, code, st, binding).await {
        Ok(claims) => {
            consent_metric("stored");
            page(
                StatusCode::OK,
                "Consent recorded",
                &format!(
                    "aegis can now act as {} in workspace {}. You can close this window and retry your request.",
                    claims.user_name, claims.workspace
                ),
            )
        }
        Err(e) => failure(e),
    }
}

fn failure(e: CallbackError) -> Response {
    let (status, kind) = match &e {
        CallbackError::UnknownState | CallbackError::WrongBrowser => {
            (StatusCode::BAD_REQUEST, "bad_callback")
        }
        CallbackError::Refused | CallbackError::NoRefreshToken => {
            (StatusCode::BAD_GATEWAY, "refused")
        }
        CallbackError::WrongUser { .. } => (StatusCode::FORBIDDEN, "wrong_user"),
        CallbackError::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        CallbackError::TooManyStarts => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
    };
    consent_metric(kind);
    page(status, "Consent not recorded", &e.to_string())
}

fn consent_metric(result: &'static str) {
    metrics::counter!("aegis_u2m_consents_total", "result" => result).increment(1);
}

fn harden(h: &mut HeaderMap) {
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'"),
    );
}

fn page(status: StatusCode, title: &str, text: &str) -> Response {
    let body = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>aegis: {t}</title></head>\
         <body><h1>{t}</h1><p>{x}</p></body></html>",
        t = escape(title),
        x = escape(text)
    );
    let mut resp = (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response();
    harden(resp.headers_mut());
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_binding_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; aegis_u2m=xyz"),
        );
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        assert_eq!(crate::http::cookie(&h, "aegis_u2m"), Some("xyz"));
        assert_eq!(crate::http::cookie(&h, "__Host-aegis_u2m"), None);
    }

    #[test]
    fn pages_escape_what_they_show() {
        assert_eq!(
            escape("<a href='x'>&\""),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;"
        );
    }
}
