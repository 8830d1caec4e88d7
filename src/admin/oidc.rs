//! Console sign-in through the organization's IdP: the OIDC authorization code flow with PKCE
//! (S256), as a confidential client when `client_secret_file` is set, else a public one.
//!
//! `GET /console/oidc/start` makes a `state`, a `nonce` and a PKCE verifier, keeps them here
//! (never in the browser) keyed by the SHA-256 of a random pre-session cookie
//! ([`PRE_COOKIE`], HttpOnly, SameSite=Lax so that it comes back on the IdP's redirect, scoped
//! to `/console/oidc`, 10 minutes), and redirects to the IdP's `authorization_endpoint`.
//! `GET /console/oidc/callback` takes the pending sign-in of that cookie out (once: a replayed
//! callback finds nothing), compares `state`, exchanges the code at the `token_endpoint` with
//! the verifier and the exact `redirect_uri`, and validates the `id_token` with the identity
//! module's validator (signature with the issuer's JWKS, `iss`, `aud` = `client_id`, `azp`,
//! `exp`, `nbf`, `iat`, `sub`), then its `nonce`. The roles claim maps to console roles; a
//! person with none gets no session.
//!
//! Endpoints come from the issuer's discovery document, whose `issuer` must be the configured
//! one exactly; they must be https (plain http for loopback hosts only). Nothing the IdP
//! returns (codes, tokens) is logged or kept; the IdP's access token is dropped unread.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rand::RngCore;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::session::{secret_eq, Operator, Principal, Roles};
use crate::config::ConsoleOidcConfig;
use crate::identity::Validator;

/// The pre-session cookie that binds a callback to the browser that started the sign-in.
pub const PRE_COOKIE: &str = "aegis_console_login";
/// How long a started sign-in may take.
pub const PENDING_TTL: Duration = Duration::from_secs(600);
/// Bound on sign-ins in progress; the oldest goes first.
const MAX_PENDING: usize = 1024;
/// How long the discovery document is reused.
const DISCOVERY_TTL: Duration = Duration::from_secs(600);
/// Deadline of each call to the IdP.
const IDP_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest discovery or token response read.
const MAX_IDP_BODY: usize = 256 * 1024;
/// Longest name kept for a person.
const MAX_NAME: usize = 128;

/// Why a sign-in failed. The text is fixed; what the IdP sent is never echoed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignInError {
    #[error("the identity provider could not be reached or answered something unusable")]
    IdpUnavailable,
    #[error("this sign-in expired or was already used; start again")]
    NoPendingSignIn,
    #[error("the sign-in response does not belong to this sign-in (state mismatch)")]
    StateMismatch,
    #[error("the identity provider refused the sign-in")]
    IdpRefused,
    #[error("the identity provider did not accept the authorization code")]
    CodeRejected,
    #[error("the identity provider's ID token was not accepted: {0}")]
    BadIdToken(&'static str),
    #[error("the ID token was not issued for this sign-in (nonce mismatch)")]
    NonceMismatch,
    #[error("your account has no console role; ask for one of the console groups")]
    NoRole,
}

impl SignInError {
    /// A short label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            SignInError::IdpUnavailable => "idp_unavailable",
            SignInError::NoPendingSignIn => "no_pending_sign_in",
            SignInError::StateMismatch => "state_mismatch",
            SignInError::IdpRefused => "idp_refused",
            SignInError::CodeRejected => "code_rejected",
            SignInError::BadIdToken(_) => "bad_id_token",
            SignInError::NonceMismatch => "nonce_mismatch",
            SignInError::NoRole => "no_role",
        }
    }
}

#[derive(Clone)]
struct Endpoints {
    authorization: url::Url,
    token: url::Url,
}

struct Pending {
    state: String,
    nonce: String,
    verifier: String,
    created: Instant,
}

/// What the IdP's redirect carried.
#[derive(Debug, Default, Deserialize)]
pub struct Callback {
    pub code: Option<String>,
    pub state: Option<String>,
    pub error: Option<String>,
}

/// A started sign-in: the pre-session cookie value and where to send the browser.
pub struct Started {
    pub cookie: String,
    pub location: url::Url,
}

pub struct OidcSignIn {
    cfg: ConsoleOidcConfig,
    validator: Arc<Validator>,
    http: reqwest::Client,
    endpoints: tokio::sync::Mutex<Option<(Instant, Endpoints)>>,
    pending: Mutex<HashMap<[u8; 32], Pending>>,
}

fn random_b64(n: usize) -> String {
    let mut raw = vec![0u8; n];
    rand::rng().fill_bytes(&mut raw);
    URL_SAFE_NO_PAD.encode(raw)
}

fn key(cookie: &str) -> [u8; 32] {
    Sha256::digest(cookie.as_bytes()).into()
}

/// The PKCE S256 challenge of a verifier (RFC 7636 §4.2).
pub fn s256(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// https, or http to a loopback host (the same rule as every other URL in the config).
fn usable_endpoint(raw: &str) -> Option<url::Url> {
    let u = url::Url::parse(raw).ok()?;
    let loopback = match u.host()? {
        url::Host::Domain(d) => d.eq_ignore_ascii_case("localhost"),
        url::Host::Ipv4(ip) => ip.is_loopback(),
        url::Host::Ipv6(ip) => ip.is_loopback(),
    };
    let ok = match u.scheme() {
        "https" => true,
        "http" => loopback,
        _ => false,
    };
    (ok && u.username().is_empty() && u.password().is_none() && u.fragment().is_none()).then_some(u)
}

/// A claim value fit to show and record: bounded, no control characters.
fn clean_name(v: Option<&serde_json::Value>) -> Option<String> {
    let s = v?.as_str()?.trim();
    if s.is_empty() || s.chars().any(char::is_control) {
        return None;
    }
    Some(s.chars().take(MAX_NAME).collect())
}

// === impl OidcSignIn ===

impl OidcSignIn {
    pub fn new(cfg: ConsoleOidcConfig, validator: Arc<Validator>, http: reqwest::Client) -> Self {
        OidcSignIn {
            cfg,
            validator,
            http,
            endpoints: tokio::sync::Mutex::new(None),
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// `; Secure` when the console is reached over https (its redirect URI says so), for the
    /// cookies of an IdP sign-in; empty for a loopback http console.
    pub fn cookie_flags(&self) -> &'static str {
        if self.cfg.redirect_uri.scheme() == "https" {
            "; Secure"
        } else {
            ""
        }
    }

    /// The configured issuer's name (for the sign-in button).
    pub fn issuer_name(&self) -> &str {
        &self.cfg.issuer_name
    }

    async fn get_json(&self, url: String) -> Result<serde_json::Value, SignInError> {
        let resp = tokio::time::timeout(IDP_TIMEOUT, self.http.get(url).send())
            .await
            .map_err(|_| SignInError::IdpUnavailable)?
            .map_err(|_| SignInError::IdpUnavailable)?;
        if !resp.status().is_success() {
            return Err(SignInError::IdpUnavailable);
        }
        let body = read_bounded(resp)
            .await
            .ok_or(SignInError::IdpUnavailable)?;
        serde_json::from_slice(&body).map_err(|_| SignInError::IdpUnavailable)
    }

    /// The authorization and token endpoints from the issuer's discovery document.
    async fn endpoints(&self) -> Result<Endpoints, SignInError> {
        let mut cached = self.endpoints.lock().await;
        if let Some((at, e)) = cached.as_ref() {
            if at.elapsed() < DISCOVERY_TTL {
                return Ok(e.clone());
            }
        }
        let url = format!(
            "{}/.well-known/openid-configuration",
            self.cfg.issuer.trim_end_matches('/')
        );
        let doc = self.get_json(url).await?;
        let field = |k: &str| doc.get(k).and_then(|v| v.as_str());
        if field("issuer") != Some(self.cfg.issuer.as_str()) {
            tracing::warn!(issuer = %self.cfg.issuer, "console sign-in: the discovery document names another issuer");
            return Err(SignInError::IdpUnavailable);
        }
        // An IdP that lists its PKCE methods must list S256.
        if let Some(methods) = doc.get("code_challenge_methods_supported") {
            let s256 = methods
                .as_array()
                .is_some_and(|m| m.iter().any(|v| v.as_str() == Some("S256")));
            if !s256 {
                tracing::warn!(issuer = %self.cfg.issuer, "console sign-in: the IdP does not support PKCE S256");
                return Err(SignInError::IdpUnavailable);
            }
        }
        let (Some(authorization), Some(token)) = (
            field("authorization_endpoint").and_then(usable_endpoint),
            field("token_endpoint").and_then(usable_endpoint),
        ) else {
            tracing::warn!(issuer = %self.cfg.issuer, "console sign-in: discovery lacks usable https authorization/token endpoints");
            return Err(SignInError::IdpUnavailable);
        };
        let e = Endpoints {
            authorization,
            token,
        };
        *cached = Some((Instant::now(), e.clone()));
        Ok(e)
    }

    /// Starts a sign-in: a pending entry under a fresh pre-session cookie, and the IdP URL.
    pub async fn start(&self) -> Result<Started, SignInError> {
        let endpoints = self.endpoints().await?;
        let cookie = random_b64(32);
        let pending = Pending {
            state: random_b64(32),
            nonce: random_b64(32),
            verifier: random_b64(48),
            created: Instant::now(),
        };
        let mut location = endpoints.authorization;
        location
            .query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", &self.cfg.client_id)
            .append_pair("redirect_uri", self.cfg.redirect_uri.as_str())
            .append_pair("scope", &self.cfg.scopes.join(" "))
            .append_pair("state", &pending.state)
            .append_pair("nonce", &pending.nonce)
            .append_pair("code_challenge", &s256(&pending.verifier))
            .append_pair("code_challenge_method", "S256");
        {
            let mut t = self
                .pending
                .lock()
                .map_err(|_| SignInError::IdpUnavailable)?;
            t.retain(|_, p| p.created.elapsed() < PENDING_TTL);
            while t.len() >= MAX_PENDING {
                let Some(oldest) = t.iter().min_by_key(|(_, p)| p.created).map(|(k, _)| *k) else {
                    break;
                };
                t.remove(&oldest);
            }
            t.insert(key(&cookie), pending);
        }
        Ok(Started { cookie, location })
    }

    /// Finishes a sign-in: the operator to open a session for.
    pub async fn finish(
        &self,
        cookie: Option<&str>,
        cb: Callback,
    ) -> Result<Operator, SignInError> {
        // Taken out whatever happens next: a callback is good for one try.
        let pending = cookie
            .and_then(|c| self.pending.lock().ok()?.remove(&key(c)))
            .filter(|p| p.created.elapsed() < PENDING_TTL)
            .ok_or(SignInError::NoPendingSignIn)?;
        let state_ok = cb
            .state
            .as_deref()
            .is_some_and(|s| secret_eq(s, &pending.state));
        if !state_ok {
            return Err(SignInError::StateMismatch);
        }
        if cb.error.is_some() {
            return Err(SignInError::IdpRefused);
        }
        let code = cb
            .code
            .filter(|c| !c.is_empty() && c.len() <= 4096)
            .ok_or(SignInError::IdpRefused)?;
        let id_token = self.exchange(&code, &pending.verifier).await?;
        let token = self
            .validator
            .validate_id_token(&id_token, &self.cfg.issuer_name, &self.cfg.client_id)
            .await
            .map_err(|e| {
                use crate::identity::IdentityError as E;
                SignInError::BadIdToken(match e {
                    E::Expired => "expired",
                    E::UntrustedIssuer => "issuer is not the configured one",
                    E::KeysUnavailable => "the issuer's keys are unavailable",
                    E::Malformed(why) | E::Rejected(why) => why,
                    E::NoUsername => "no user name",
                })
            })?;
        let nonce_ok = token
            .claims
            .get("nonce")
            .and_then(|n| n.as_str())
            .is_some_and(|n| secret_eq(n, &pending.nonce));
        if !nonce_ok {
            return Err(SignInError::NonceMismatch);
        }
        let roles = self.roles(token.claims.get(&self.cfg.roles_claim));
        if !roles.any() {
            return Err(SignInError::NoRole);
        }
        let name = ["preferred_username", "name", "email"]
            .iter()
            .find_map(|k| clean_name(token.claims.get(*k)))
            .unwrap_or_else(|| token.subject.clone());
        Ok(Operator {
            principal: Principal::Oidc {
                issuer: token.issuer.to_string(),
                subject: token.subject,
                name,
            },
            roles,
        })
    }

    /// Maps the roles claim (a string or an array of strings; anything else grants nothing).
    fn roles(&self, claim: Option<&serde_json::Value>) -> Roles {
        let values: Vec<&str> = match claim {
            Some(serde_json::Value::String(s)) => vec![s.as_str()],
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_str()).collect(),
            _ => Vec::new(),
        };
        let has = |list: &[String]| values.iter().any(|v| list.iter().any(|l| l == v));
        let operator = has(&self.cfg.operator_values);
        let auditor = has(&self.cfg.auditor_values);
        Roles {
            viewer: operator || auditor || has(&self.cfg.viewer_values),
            operator,
            auditor,
        }
    }

    /// The code for an ID token at the token endpoint.
    async fn exchange(&self, code: &str, verifier: &str) -> Result<String, SignInError> {
        let endpoints = self.endpoints().await?;
        let mut form = vec![
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", self.cfg.redirect_uri.as_str()),
            ("code_verifier", verifier),
        ];
        let mut req = self
            .http
            .post(endpoints.token)
            .header("accept", "application/json");
        match &self.cfg.client_secret {
            // client_secret_basic: id and secret form-urlencoded, then Basic (RFC 6749 §2.3.1).
            Some(secret) => {
                let enc = |s: &str| {
                    url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>()
                };
                req = req.basic_auth(enc(&self.cfg.client_id), Some(enc(secret.expose())));
            }
            None => form.push(("client_id", self.cfg.client_id.as_str())),
        }
        let resp = tokio::time::timeout(IDP_TIMEOUT, req.form(&form).send())
            .await
            .map_err(|_| SignInError::IdpUnavailable)?
            .map_err(|_| SignInError::IdpUnavailable)?;
        let status = resp.status();
        let body = read_bounded(resp)
            .await
            .ok_or(SignInError::IdpUnavailable)?;
        let doc: serde_json::Value = match serde_json::from_slice(&body) {
            Ok(doc) => doc,
            Err(_) if !status.is_success() => serde_json::Value::Null,
            Err(_) => return Err(SignInError::IdpUnavailable),
        };
        if !status.is_success() {
            // Only the OAuth error code, and only if it looks like one.
            let error = doc
                .get("error")
                .and_then(|e| e.as_str())
                .filter(|e| e.len() <= 40 && e.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
                .unwrap_or("unknown");
            tracing::warn!(
                status = status.as_u16(),
                error,
                "console sign-in: the token endpoint refused the code"
            );
            return Err(match status.as_u16() {
                400 | 401 => SignInError::CodeRejected,
                _ => SignInError::IdpUnavailable,
            });
        }
        doc.get("id_token")
            .and_then(|t| t.as_str())
            .map(str::to_string)
            .ok_or(SignInError::BadIdToken(
                "the token response has no id_token",
            ))
    }
}

async fn read_bounded(resp: reqwest::Response) -> Option<Vec<u8>> {
    if resp
        .content_length()
        .is_some_and(|l| l as usize > MAX_IDP_BODY)
    {
        return None;
    }
    let mut out = Vec::new();
    let mut resp = resp;
    while let Some(chunk) = tokio::time::timeout(IDP_TIMEOUT, resp.chunk())
        .await
        .ok()?
        .ok()?
    {
        out.extend_from_slice(&chunk);
        if out.len() > MAX_IDP_BODY {
            return None;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s256_is_base64url_of_sha256() {
        // Computed independently: base64.urlsafe_b64encode(hashlib.sha256(v).digest()) in Python.
        assert_eq!(
            s256("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWxOEjXk"),
            "O_uB6U03gRg--6ORZ0ZVqgZbsQmdYdFwf4Y3sAFCu7I"
        );
    }

    #[test]
    fn cookies_are_secure_when_the_console_is_https() {
        let sign_in = |redirect: &str| {
            OidcSignIn::new(
                ConsoleOidcConfig {
                    issuer_name: "corp".into(),
                    issuer: "https://idp.example.com".into(),
                    client_id: "aegis-console".into(),
                    client_secret: None,
                    redirect_uri: url::Url::parse(redirect).unwrap(),
                    scopes: vec!["openid".into()],
                    roles_claim: "groups".into(),
                    viewer_values: vec!["v".into()],
                    operator_values: vec!["o".into()],
                    auditor_values: vec!["a".into()],
                },
                Arc::new(Validator::new(&[], reqwest::Client::new())),
                reqwest::Client::new(),
            )
        };
        let https = sign_in("https://aegis.example.com/console/oidc/callback");
        assert_eq!(https.cookie_flags(), "; Secure");
        let local = sign_in("http://127.0.0.1:9192/console/oidc/callback");
        assert_eq!(local.cookie_flags(), "");
        // Roles: values map exactly; operator and auditor imply viewer; junk grants nothing.
        let r = https.roles(Some(&serde_json::json!(["x", "o"])));
        assert!(r.viewer && r.operator && !r.auditor);
        let r = https.roles(Some(&serde_json::json!("a")));
        assert!(r.viewer && !r.operator && r.auditor);
        let r = https.roles(Some(&serde_json::json!(["V", "o "])));
        assert!(!r.any());
        assert!(!https.roles(Some(&serde_json::json!({"o": true}))).any());
        assert!(!https.roles(None).any());
    }

    #[test]
    fn endpoints_must_be_https_or_loopback_http() {
        assert!(usable_endpoint("https://idp.example.com/authorize").is_some());
        assert!(usable_endpoint("http://127.0.0.1:8080/authorize").is_some());
        assert!(usable_endpoint("http://idp.example.com/authorize").is_none());
        assert!(usable_endpoint("https://u:p@idp.example.com/token").is_none());
        assert!(usable_endpoint("javascript:alert(1)").is_none());
    }
}
