//! User-to-machine OAuth: `GET /oidc/v1/authorize` and the `authorization_code` and
//! `refresh_token` grants of `/oidc/v1/token`, for a public client with PKCE (S256 only, as
//! Databricks requires).
//!
//! There is no login page: the authorize endpoint "signs in" the workspace user named by
//! `login_hint` (a dev convenience; any fixture user) and redirects to `redirect_uri` with a
//! single-use code. Refresh tokens **rotate**: each is single-use, a refresh returns a new one
//! in the same family, and presenting a spent one (a replay) revokes the whole family, per the
//! OAuth 2.0 Security BCP. Counts of redeemed codes, refreshes and replays are kept for tests.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::{lock, LogNote, WorkspaceState};
use crate::util::{random_hex, random_token};

/// How long an authorization code may be redeemed.
const CODE_TTL: Duration = Duration::from_secs(60);
/// Codes and refresh tokens kept at most (oldest dropped first when full).
const MAX_ENTRIES: usize = 100_000;

struct Code {
    user_name: String,
    client_id: String,
    redirect_uri: String,
    challenge: String,
    scope: String,
    expires_at: Instant,
}

struct Refresh {
    user_name: String,
    client_id: String,
    family: String,
    scope: String,
    used: bool,
}

/// What the U2M grants have done, for tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct U2mCounts {
    /// Authorization codes exchanged for tokens.
    pub codes_redeemed: u64,
    /// Successful refreshes (each spent one refresh token and issued the next).
    pub refreshes: u64,
    /// Spent refresh tokens presented again (each revoked its family).
    pub replays: u64,
    /// Refreshes refused with `invalid_grant` for any reason (replays included).
    pub invalid_grants: u64,
}

#[derive(Default)]
pub(crate) struct U2mState {
    codes: Mutex<HashMap<String, Code>>,
    refresh: Mutex<HashMap<String, Refresh>>,
    revoked_families: Mutex<HashSet<String>>,
    codes_redeemed: AtomicU64,
    refreshes: AtomicU64,
    replays: AtomicU64,
    invalid_grants: AtomicU64,
}

impl U2mState {
    pub fn counts(&self) -> U2mCounts {
        U2mCounts {
            codes_redeemed: self.codes_redeemed.load(Ordering::Relaxed),
            refreshes: self.refreshes.load(Ordering::Relaxed),
            replays: self.replays.load(Ordering::Relaxed),
            invalid_grants: self.invalid_grants.load(Ordering::Relaxed),
        }
    }

    /// Revokes every refresh token of `user_name` (as an admin revoking the app's consent).
    pub fn revoke_user(&self, user_name: &str) {
        let families: Vec<String> = lock(&self.refresh)
            .values()
            .filter(|r| r.user_name.eq_ignore_ascii_case(user_name))
            .map(|r| r.family.clone())
            .collect();
        lock(&self.revoked_families).extend(families);
    }

    fn new_refresh(&self, user_name: &str, client_id: &str, family: &str, scope: &str) -> String {
        let token = random_token("dsbr");
        let mut map = lock(&self.refresh);
        if map.len() >= MAX_ENTRIES {
            // Spent tokens go first; they only serve to detect replays.
            map.retain(|_, r| !r.used);
        }
        map.insert(
            token.clone(),
            Refresh {
                user_name: user_name.to_string(),
                client_id: client_id.to_string(),
                family: family.to_string(),
                scope: scope.to_string(),
                used: false,
            },
        );
        token
    }
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    (
        status,
        [(header::CACHE_CONTROL, "no-store")],
        Json(json!({ "error": error, "error_description": description })),
    )
        .into_response()
}

fn s256(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

// === Authorize ===

pub(super) async fn authorize(
    State(ws): State<Arc<WorkspaceState>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let get = |k: &str| q.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
    // Without a usable redirect_uri the error is shown here, never redirected.
    let Some(redirect_uri) = get("redirect_uri") else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "redirect_uri is required",
        );
    };
    let Ok(mut target) = reqwest::Url::parse(redirect_uri) else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "redirect_uri is not a URL",
        );
    };
    if !matches!(target.scheme(), "http" | "https") {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "redirect_uri must be http(s)",
        );
    }
    let Some(client_id) = get("client_id") else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_client",
            "client_id is required",
        );
    };
    let state = get("state");
    let fail = |mut target: reqwest::Url, error: &str, description: &str| -> Response {
        {
            let mut pairs = target.query_pairs_mut();
            pairs.append_pair("error", error);
            pairs.append_pair("error_description", description);
            if let Some(s) = state {
                pairs.append_pair("state", s);
            }
        }
        redirect(&target)
    };
    if get("response_type") != Some("code") {
        return fail(
            target,
            "unsupported_response_type",
            "response_type must be code",
        );
    }
    let Some(challenge) = get("code_challenge") else {
        return fail(target, "invalid_request", "code_challenge is required");
    };
    if get("code_challenge_method") != Some("S256") {
        return fail(
            target,
            "invalid_request",
            "code_challenge_method must be S256",
        );
    }
    let Some(user) = get("login_hint").and_then(|u| ws.fixture.user(u)) else {
        return fail(
            target,
            "access_denied",
            "no workspace user signed in (login_hint)",
        );
    };
    let code = random_token("dsbc");
    {
        let mut codes = lock(&ws.u2m.codes);
        let now = Instant::now();
        if codes.len() >= MAX_ENTRIES {
            codes.retain(|_, c| c.expires_at > now);
        }
        codes.insert(
            code.clone(),
            Code {
                user_name: user.user_name.clone(),
                client_id: client_id.to_string(),
                redirect_uri: redirect_uri.to_string(),
                challenge: challenge.to_string(),
                scope: get("scope").unwrap_or("all-apis").to_string(),
                expires_at: now + CODE_TTL,
            },
        );
    }
    {
        let mut pairs = target.query_pairs_mut();
        pairs.append_pair("code", &code);
        if let Some(s) = state {
            pairs.append_pair("state", s);
        }
    }
    let mut resp = redirect(&target);
    resp.extensions_mut().insert(LogNote {
        action: Some("authorize"),
        user: Some(user.user_name.clone()),
    });
    resp
}

fn redirect(target: &reqwest::Url) -> Response {
    (
        StatusCode::FOUND,
        [
            (header::LOCATION, target.to_string()),
            (header::CACHE_CONTROL, "no-store".to_string()),
        ],
    )
        .into_response()
}

// === Token grants ===

fn tokens(ws: &WorkspaceState, user_name: &str, refresh: Option<String>, scope: &str) -> Response {
    let access_token = ws.issue_token(user_name);
    let mut body = json!({
        "access_token": access_token,
        "token_type": "Bearer",
        "expires_in": ws.opts.token_ttl.as_secs(),
        "scope": scope,
    });
    if let Some(r) = refresh {
        body["refresh_token"] = json!(r);
    }
    (
        StatusCode::OK,
        [(header::CACHE_CONTROL, "no-store")],
        Json(body),
    )
        .into_response()
}

fn noted(mut resp: Response, action: &'static str, user: Option<String>) -> Response {
    resp.extensions_mut().insert(LogNote {
        action: Some(action),
        user,
    });
    resp
}

/// `grant_type=authorization_code`: a single-use code, its client and redirect URI, and the
/// PKCE verifier whose S256 is the code's challenge.
pub(super) fn authorization_code(ws: &WorkspaceState, form: &HashMap<String, String>) -> Response {
    let get = |k: &str| form.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
    let action = "authorizationCode";
    let (Some(code), Some(verifier), Some(client_id), Some(redirect_uri)) = (
        get("code"),
        get("code_verifier"),
        get("client_id"),
        get("redirect_uri"),
    ) else {
        return noted(
            oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "code, code_verifier, client_id and redirect_uri are required",
            ),
            action,
            None,
        );
    };
    // Removed whatever happens next: a code is good for one attempt.
    let Some(c) = lock(&ws.u2m.codes).remove(code) else {
        return noted(
            oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_grant",
                "the code is invalid or was used",
            ),
            action,
            None,
        );
    };
    let why = if c.expires_at <= Instant::now() {
        Some("the code expired")
    } else if c.client_id != client_id {
        Some("the code was issued to another client")
    } else if c.redirect_uri != redirect_uri {
        Some("redirect_uri does not match the authorization request")
    } else if s256(verifier) != c.challenge {
        Some("PKCE verification failed")
    } else {
        None
    };
    if let Some(why) = why {
        return noted(
            oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", why),
            action,
            Some(c.user_name),
        );
    }
    ws.u2m.codes_redeemed.fetch_add(1, Ordering::Relaxed);
    let refresh = c
        .scope
        .split_whitespace()
        .any(|s| s == "offline_access")
        .then(|| {
            ws.u2m
                .new_refresh(&c.user_name, client_id, &random_hex(16), &c.scope)
        });
    noted(
        tokens(ws, &c.user_name, refresh, &c.scope),
        action,
        Some(c.user_name.clone()),
    )
}

/// `grant_type=refresh_token` with rotation: the presented token is spent, a new one in the
/// same family is returned; a spent or revoked token is `invalid_grant`, and a replayed one
/// revokes its family.
pub(super) fn refresh_token(ws: &WorkspaceState, form: &HashMap<String, String>) -> Response {
    let get = |k: &str| form.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
    let action = "refreshToken";
    let (Some(token), Some(client_id)) = (get("refresh_token"), get("client_id")) else {
        return noted(
            oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "refresh_token and client_id are required",
            ),
            action,
            None,
        );
    };
    let u2m = &ws.u2m;
    let invalid = |why: &str, user: Option<String>| {
        u2m.invalid_grants.fetch_add(1, Ordering::Relaxed);
        noted(
            oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", why),
            action,
            user,
        )
    };
    // Check and spend under one lock, so two concurrent uses cannot both succeed.
    let spent = {
        let mut map = lock(&u2m.refresh);
        match map.get_mut(token) {
            None => Err(("the refresh token is invalid", None, None)),
            Some(r) if r.used => Err((
                "the refresh token was already used",
                Some(r.user_name.clone()),
                Some(r.family.clone()),
            )),
            Some(r) if r.client_id != client_id => Err((
                "the refresh token was issued to another client",
                Some(r.user_name.clone()),
                None,
            )),
            Some(r) => {
                r.used = true;
                Ok((r.user_name.clone(), r.family.clone(), r.scope.clone()))
            }
        }
    };
    match spent {
        Err((why, user, replayed_family)) => {
            if let Some(family) = replayed_family {
                u2m.replays.fetch_add(1, Ordering::Relaxed);
                lock(&u2m.revoked_families).insert(family);
            }
            invalid(why, user)
        }
        Ok((user, family, _)) if lock(&u2m.revoked_families).contains(&family) => {
            invalid("the refresh token was revoked", Some(user))
        }
        Ok((user, family, scope)) => {
            u2m.refreshes.fetch_add(1, Ordering::Relaxed);
            let next = u2m.new_refresh(&user, client_id, &family, &scope);
            noted(tokens(ws, &user, Some(next), &scope), action, Some(user))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s256_matches_rfc_7636_appendix_b() {
        assert_eq!(
            s256("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }
}
