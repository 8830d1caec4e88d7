//! The dev IdP's OpenID Connect provider for browser sign-in: the authorization code flow with
//! PKCE (RFC 6749 §4.1, RFC 7636, OIDC Core §3.1), for registered clients only.
//!
//! - `GET /authorize`: checks `client_id` and `redirect_uri` (exactly one of the client's
//!   registered URIs; if either is wrong the browser gets an error page and is *not*
//!   redirected), then `response_type=code`, `scope` with `openid`, `state`, `nonce`, and a
//!   `code_challenge` with `code_challenge_method=S256` (errors go back to the client as
//!   `?error=...&state=...`). Shows a sign-in page with a user-name field.
//! - `POST /authorize`: the page's form; a known person gets a one-time code (60 s by default)
//!   sent to the redirect URI with the `state`.
//! - `POST /token`: `grant_type=authorization_code`; client authentication (HTTP Basic or
//!   `client_secret` in the body) for clients with a secret, `client_id` for public ones; the
//!   code must be unused, unexpired, issued to this client for this `redirect_uri`, and the
//!   `code_verifier` must hash to its challenge. Any presentation uses the code up. Returns an
//!   `id_token` (RS256, `aud` = the client, `nonce`, names, and the person's console groups in
//!   `aegis_roles`) and an opaque access token. Errors are `{"error": ...}` with 400 (401 for
//!   `invalid_client`).
//!
//! The people and their groups are [`crate::fixture::IDP_PEOPLE`]. Tests can make the next ID
//! tokens wrong on purpose ([`IdTokenFault`]) and shorten the code lifetime.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::FormRejection;
use axum::extract::{Form, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::{lock, IdpState};
use crate::util::{now_secs, random_hex, random_token};

/// A client registered with the dev IdP.
#[derive(Clone, Debug)]
pub struct OidcClient {
    pub client_id: String,
    /// `None`: a public client (PKCE only).
    pub client_secret: Option<String>,
    /// Exact matches only.
    pub redirect_uris: Vec<String>,
}

/// What the next ID tokens get wrong, for tests of the relying party.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum IdTokenFault {
    #[default]
    None,
    /// `aud` (and `azp`) name another client.
    WrongAudience,
    /// A `nonce` other than the one the authorization request sent.
    WrongNonce,
    /// Expired two minutes ago.
    Expired,
}

/// How long a code is good for, unless a test changes it.
pub const DEFAULT_CODE_TTL: Duration = Duration::from_secs(60);
/// Lifetime of the ID tokens.
const ID_TOKEN_TTL: i64 = 300;

pub(crate) struct Grant {
    client_id: String,
    redirect_uri: String,
    challenge: String,
    nonce: String,
    user: String,
    issued: Instant,
    used: bool,
}

#[derive(Default)]
pub(crate) struct OidcProvider {
    clients: std::sync::Mutex<HashMap<String, OidcClient>>,
    codes: std::sync::Mutex<HashMap<String, Grant>>,
    code_ttl: std::sync::Mutex<Option<Duration>>,
    fault: std::sync::Mutex<IdTokenFault>,
}

impl OidcProvider {
    pub fn register(&self, client: OidcClient) {
        lock(&self.clients).insert(client.client_id.clone(), client);
    }

    pub fn set_code_ttl(&self, ttl: Duration) {
        *lock(&self.code_ttl) = Some(ttl);
    }

    pub fn set_fault(&self, fault: IdTokenFault) {
        *lock(&self.fault) = fault;
    }

    fn code_ttl(&self) -> Duration {
        lock(&self.code_ttl).unwrap_or(DEFAULT_CODE_TTL)
    }
}

pub(crate) fn routes() -> Router<Arc<IdpState>> {
    Router::new()
        .route("/authorize", get(authorize_page).post(authorize_submit))
        .route("/token", axum::routing::post(token))
}

// === /authorize ===

#[derive(Debug, Default, Deserialize)]
struct AuthorizeParams {
    response_type: Option<String>,
    client_id: Option<String>,
    redirect_uri: Option<String>,
    scope: Option<String>,
    state: Option<String>,
    nonce: Option<String>,
    code_challenge: Option<String>,
    code_challenge_method: Option<String>,
    /// The sign-in form's field (POST only).
    username: Option<String>,
}

/// RFC 3986 unreserved characters pass; everything else is percent-encoded.
fn pct(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn with_query(uri: &str, pairs: &[(&str, &str)]) -> String {
    let q: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", pct(v)))
        .collect();
    let sep = if uri.contains('?') { '&' } else { '?' };
    format!("{uri}{sep}{}", q.join("&"))
}

fn error_page(status: StatusCode, msg: &str) -> Response {
    (
        status,
        Html(format!(
            "<!doctype html><html><head><title>Sign-in error</title></head><body>\
             <h1>Sign-in error</h1><p id=\"idp-error\">{}</p></body></html>",
            esc(msg)
        )),
    )
        .into_response()
}

fn redirect(location: String) -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, location)]).into_response()
}

/// A PKCE value (challenge or verifier): 43 to 128 unreserved characters.
fn pkce_shaped(s: &str) -> bool {
    (43..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

/// The checks of an authorization request: Ok(client's redirect URI), or the response to
/// give (an error page, or a redirect carrying the error).
fn check_authorize(idp: &IdpState, p: &AuthorizeParams) -> Result<String, Box<Response>> {
    let client = p
        .client_id
        .as_deref()
        .and_then(|id| lock(&idp.oidc.clients).get(id).cloned());
    let Some(client) = client else {
        return Err(Box::new(error_page(
            StatusCode::BAD_REQUEST,
            "unknown client_id",
        )));
    };
    let redirect_uri = match p.redirect_uri.as_deref() {
        Some(r) if client.redirect_uris.iter().any(|u| u == r) => r.to_string(),
        _ => {
            return Err(Box::new(error_page(
                StatusCode::BAD_REQUEST,
                "redirect_uri is not registered for this client",
            )))
        }
    };
    // From here on errors go back to the client.
    let back = |error: &str, why: &str| {
        let mut pairs = vec![("error", error), ("error_description", why)];
        if let Some(s) = p.state.as_deref() {
            pairs.push(("state", s));
        }
        Err(Box::new(redirect(with_query(&redirect_uri, &pairs))))
    };
    if p.response_type.as_deref() != Some("code") {
        return back("unsupported_response_type", "only response_type=code");
    }
    if !p
        .scope
        .as_deref()
        .is_some_and(|s| s.split(' ').any(|x| x == "openid"))
    {
        return back("invalid_scope", "scope must include openid");
    }
    if p.state.as_deref().is_none_or(str::is_empty) {
        return back("invalid_request", "state is required");
    }
    if p.nonce.as_deref().is_none_or(str::is_empty) {
        return back("invalid_request", "nonce is required");
    }
    if p.code_challenge_method.as_deref() != Some("S256")
        || !p.code_challenge.as_deref().is_some_and(pkce_shaped)
    {
        return back(
            "invalid_request",
            "PKCE is required: code_challenge with code_challenge_method=S256",
        );
    }
    Ok(redirect_uri)
}

fn sign_in_page(p: &AuthorizeParams, message: &str) -> Response {
    let hidden: String = [
        ("response_type", &p.response_type),
        ("client_id", &p.client_id),
        ("redirect_uri", &p.redirect_uri),
        ("scope", &p.scope),
        ("state", &p.state),
        ("nonce", &p.nonce),
        ("code_challenge", &p.code_challenge),
        ("code_challenge_method", &p.code_challenge_method),
    ]
    .iter()
    .map(|(k, v)| {
        format!(
            "<input type=\"hidden\" name=\"{k}\" value=\"{}\">",
            esc(v.as_deref().unwrap_or(""))
        )
    })
    .collect();
    Html(format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Sandbox IdP · sign in</title></head>\
         <body><h1>Sandbox IdP</h1><p>Sign in to <b>{}</b></p><p id=\"idp-message\">{}</p>\
         <form method=\"post\" action=\"/authorize\">{hidden}\
         <label for=\"username\">User name</label> <input id=\"username\" name=\"username\" autocomplete=\"username\" required>\
         <button type=\"submit\" id=\"idp-sign-in\">Sign in</button></form></body></html>",
        esc(p.client_id.as_deref().unwrap_or("")),
        esc(message),
    ))
    .into_response()
}

async fn authorize_page(
    State(idp): State<Arc<IdpState>>,
    query: Result<Query<AuthorizeParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(p)) = query else {
        return error_page(StatusCode::BAD_REQUEST, "malformed authorization request");
    };
    if let Err(resp) = check_authorize(&idp, &p) {
        return *resp;
    }
    sign_in_page(&p, "")
}

async fn authorize_submit(
    State(idp): State<Arc<IdpState>>,
    form: Result<Form<AuthorizeParams>, FormRejection>,
) -> Response {
    let Ok(Form(p)) = form else {
        return error_page(StatusCode::BAD_REQUEST, "malformed sign-in form");
    };
    let redirect_uri = match check_authorize(&idp, &p) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    let user = p
        .username
        .as_deref()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if crate::fixture::idp_person(&user).is_none() {
        return sign_in_page(&p, "No such user at this IdP.");
    }
    let code = random_token("sbxcode_");
    let mut codes = lock(&idp.oidc.codes);
    codes.retain(|_, g| g.issued.elapsed() < Duration::from_secs(600));
    codes.insert(
        code.clone(),
        Grant {
            client_id: p.client_id.clone().unwrap_or_default(),
            redirect_uri: redirect_uri.clone(),
            challenge: p.code_challenge.clone().unwrap_or_default(),
            nonce: p.nonce.clone().unwrap_or_default(),
            user,
            issued: Instant::now(),
            used: false,
        },
    );
    let state = p.state.clone().unwrap_or_default();
    redirect(with_query(
        &redirect_uri,
        &[("code", &code), ("state", &state)],
    ))
}

// === /token ===

#[derive(Debug, Default, Deserialize)]
struct TokenForm {
    grant_type: Option<String>,
    code: Option<String>,
    redirect_uri: Option<String>,
    code_verifier: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
}

fn oauth_error(status: StatusCode, error: &str, why: &str) -> Response {
    (
        status,
        [(header::CACHE_CONTROL, "no-store")],
        Json(json!({ "error": error, "error_description": why })),
    )
        .into_response()
}

fn form_decode(s: &str) -> Option<String> {
    let s = s.replace('+', " ");
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// (client_id, secret) from `Authorization: Basic` (each form-urlencoded, RFC 6749 §2.3.1).
fn basic_auth(headers: &HeaderMap) -> Option<(String, String)> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let b64 = v.strip_prefix("Basic ")?;
    let raw = String::from_utf8(STANDARD.decode(b64.trim()).ok()?).ok()?;
    let (id, secret) = raw.split_once(':')?;
    Some((form_decode(id)?, form_decode(secret)?))
}

async fn token(
    State(idp): State<Arc<IdpState>>,
    headers: HeaderMap,
    form: Result<Form<TokenForm>, FormRejection>,
) -> Response {
    use StatusCode as S;
    let Ok(Form(f)) = form else {
        return oauth_error(S::BAD_REQUEST, "invalid_request", "the body must be a form");
    };
    if f.grant_type.as_deref() != Some("authorization_code") {
        return oauth_error(
            S::BAD_REQUEST,
            "unsupported_grant_type",
            "only authorization_code",
        );
    }
    // Client authentication.
    let basic = basic_auth(&headers);
    let client_id = match (&basic, &f.client_id) {
        (Some((id, _)), Some(body_id)) if id != body_id => {
            return oauth_error(
                S::BAD_REQUEST,
                "invalid_request",
                "two different client ids",
            )
        }
        (Some((id, _)), _) => id.clone(),
        (None, Some(id)) => id.clone(),
        (None, None) => {
            return oauth_error(
                S::UNAUTHORIZED,
                "invalid_client",
                "no client authentication",
            )
        }
    };
    let Some(client) = lock(&idp.oidc.clients).get(&client_id).cloned() else {
        return oauth_error(S::UNAUTHORIZED, "invalid_client", "unknown client");
    };
    if let Some(secret) = &client.client_secret {
        let given = basic
            .as_ref()
            .map(|(_, s)| s.as_str())
            .or(f.client_secret.as_deref());
        if given != Some(secret.as_str()) {
            return oauth_error(
                S::UNAUTHORIZED,
                "invalid_client",
                "client authentication failed",
            );
        }
    }
    // The code: used up by this presentation whatever happens next.
    let grant = {
        let mut codes = lock(&idp.oidc.codes);
        let Some(g) = f.code.as_deref().and_then(|c| codes.get_mut(c)) else {
            return oauth_error(S::BAD_REQUEST, "invalid_grant", "unknown code");
        };
        if g.used {
            return oauth_error(S::BAD_REQUEST, "invalid_grant", "the code was already used");
        }
        g.used = true;
        Grant {
            client_id: g.client_id.clone(),
            redirect_uri: g.redirect_uri.clone(),
            challenge: g.challenge.clone(),
            nonce: g.nonce.clone(),
            user: g.user.clone(),
            issued: g.issued,
            used: true,
        }
    };
    if grant.issued.elapsed() > idp.oidc.code_ttl() {
        return oauth_error(S::BAD_REQUEST, "invalid_grant", "the code expired");
    }
    if grant.client_id != client_id {
        return oauth_error(
            S::BAD_REQUEST,
            "invalid_grant",
            "the code was issued to another client",
        );
    }
    if f.redirect_uri.as_deref() != Some(grant.redirect_uri.as_str()) {
        return oauth_error(
            S::BAD_REQUEST,
            "invalid_grant",
            "redirect_uri does not match",
        );
    }
    let verifier_ok = f.code_verifier.as_deref().is_some_and(|v| {
        pkce_shaped(v) && URL_SAFE_NO_PAD.encode(Sha256::digest(v.as_bytes())) == grant.challenge
    });
    if !verifier_ok {
        return oauth_error(S::BAD_REQUEST, "invalid_grant", "PKCE verification failed");
    }
    match id_token(&idp, &client_id, &grant) {
        Ok(id_token) => (
            [(header::CACHE_CONTROL, "no-store")],
            Json(json!({
                "access_token": random_token("sbxat_"),
                "token_type": "Bearer",
                "expires_in": ID_TOKEN_TTL,
                "scope": "openid profile email",
                "id_token": id_token,
            })),
        )
            .into_response(),
        Err(e) => oauth_error(S::INTERNAL_SERVER_ERROR, "server_error", &e),
    }
}

fn id_token(idp: &IdpState, client_id: &str, g: &Grant) -> Result<String, String> {
    let fault = *lock(&idp.oidc.fault);
    let now = now_secs();
    let (given, family) = crate::fixture::known_person(&g.user).unwrap_or(("", ""));
    let name = if given.is_empty() {
        g.user.clone()
    } else {
        format!("{given} {family}")
    };
    let roles = crate::fixture::idp_person(&g.user).unwrap_or(&[]);
    let aud = if fault == IdTokenFault::WrongAudience {
        "another-client".to_string()
    } else {
        client_id.to_string()
    };
    let nonce = if fault == IdTokenFault::WrongNonce {
        random_hex(16)
    } else {
        g.nonce.clone()
    };
    let (iat, exp) = if fault == IdTokenFault::Expired {
        (now - 600, now - 120)
    } else {
        (now, now + ID_TOKEN_TTL)
    };
    let mut claims = Map::new();
    claims.insert("iss".into(), json!(idp.issuer));
    claims.insert("sub".into(), json!(format!("u-{}", g.user)));
    claims.insert("aud".into(), json!(aud));
    claims.insert("azp".into(), json!(aud));
    claims.insert("iat".into(), json!(iat));
    claims.insert("auth_time".into(), json!(iat));
    claims.insert("exp".into(), json!(exp));
    claims.insert("nonce".into(), json!(nonce));
    claims.insert("name".into(), json!(name));
    claims.insert("preferred_username".into(), json!(g.user));
    claims.insert("email".into(), json!(format!("{}@example.com", g.user)));
    claims.insert("email_verified".into(), json!(true));
    claims.insert("aegis_roles".into(), json!(roles));
    idp.sign_claims(Value::Object(claims))
}
