//! The dev IdP: OIDC discovery, a JWKS with an RSA and an EC P-256 key, and token minting for
//! named users. Keys are generated at start, so every run has fresh `kid`s.
//!
//! Endpoints: `GET /.well-known/openid-configuration`, `GET /jwks`, `GET`/`POST /authorize` and
//! `POST /token` (browser sign-in with the authorization code flow and PKCE, see [`oidc`]),
//! `POST /dev/token`, `POST /dev/faults`. The workspace emulator verifies exchanged tokens against
//! [`IdpState::verify`], i.e. a federation policy configured with this IdP's keys.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::sync::Arc;

use crate::util::{now_secs, random_hex};
use crate::TokenRequest;

pub(crate) mod oidc;
pub use oidc::{IdTokenFault, OidcClient};

/// The shared secret behind `alg: "HS256"` tokens. Such tokens exist only so tests can check that
/// a validator refuses symmetric algorithms; no JWKS advertises this key.
const HS256_SECRET: &[u8] = b"sandbox-hs256-secret-for-negative-tests";

/// What `GET /jwks` does, for tests of JWKS outages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JwksFault {
    /// Serve the key set.
    Ok,
    /// 503 Service Unavailable.
    Down,
    /// 200 with an HTML page instead of JSON.
    Html,
    /// 200 with `{"keys": []}`.
    Empty,
    /// 200 with the EC key only: the RSA key rotated out (say, after a compromise), so tokens
    /// it signed must stop being accepted.
    WithoutRsa,
}

struct SigningKey {
    kid: String,
    alg: Algorithm,
    encoding: EncodingKey,
    decoding: DecodingKey,
    jwk: Value,
}

pub(crate) struct IdpState {
    pub issuer: String,
    rsa: SigningKey,
    ec: SigningKey,
    jwks_fault: Mutex<JwksFault>,
    /// `GET /jwks` requests served (whatever the fault), so tests can count key refreshes.
    jwks_fetches: AtomicU64,
    /// Browser sign-in: registered clients, codes, test faults.
    pub(crate) oidc: oidc::OidcProvider,
}

/// Why a JWT failed federation-policy validation.
#[derive(Debug, thiserror::Error)]
pub(crate) enum VerifyError {
    #[error("the subject token is not a well-formed JWT")]
    Malformed,
    #[error("the subject token's signing algorithm is not accepted")]
    Algorithm,
    #[error("the subject token's signing key is not known to the federation policy")]
    UnknownKey,
    #[error("the subject token's signature is invalid")]
    Signature,
    #[error("the subject token's issuer is not trusted by any federation policy")]
    Issuer,
    #[error("the subject token's audience is not accepted by the federation policy")]
    Audience,
    #[error("the subject token is expired")]
    Expired,
    #[error("the subject token is not yet valid")]
    NotYetValid,
    #[error("the subject token is missing a required claim")]
    MissingClaim,
}

impl IdpState {
    /// Generates the keys. RSA key generation takes a noticeable fraction of a second, so call
    /// this off the async runtime's worker threads.
    pub fn generate(issuer: String) -> Result<IdpState, String> {
        let rsa = generate_rsa().map_err(|e| format!("rsa key generation failed: {e}"))?;
        let ec = generate_ec().map_err(|e| format!("ec key generation failed: {e}"))?;
        Ok(IdpState {
            issuer,
            rsa,
            ec,
            jwks_fault: Mutex::new(JwksFault::Ok),
            jwks_fetches: AtomicU64::new(0),
            oidc: oidc::OidcProvider::default(),
        })
    }

    pub fn jwks(&self) -> Value {
        json!({ "keys": [self.rsa.jwk.clone(), self.ec.jwk.clone()] })
    }

    pub fn set_jwks_fault(&self, fault: JwksFault) {
        *lock(&self.jwks_fault) = fault;
    }

    fn jwks_fault(&self) -> JwksFault {
        *lock(&self.jwks_fault)
    }

    pub fn jwks_fetches(&self) -> u64 {
        self.jwks_fetches.load(Ordering::Relaxed)
    }

    /// The `kid`s of the RSA and the EC key.
    pub fn key_ids(&self) -> (String, String) {
        (self.rsa.kid.clone(), self.ec.kid.clone())
    }

    /// For attack tests: a compact JWS over exactly these header and payload bytes (any JSON or
    /// none at all), signed with the IdP's own RSA key (`RS256`) or EC key (`ES256`), so that a
    /// validator can only refuse it for what it says, not for its signature.
    pub fn sign_raw(&self, alg: &str, header: &[u8], payload: &[u8]) -> Result<String, String> {
        let (algorithm, key) = match alg {
            "RS256" => (Algorithm::RS256, &self.rsa.encoding),
            "ES256" => (Algorithm::ES256, &self.ec.encoding),
            other => return Err(format!("sign_raw signs RS256 or ES256, not {other}")),
        };
        let input = format!("{}.{}", b64(header), b64(payload));
        let sig = jsonwebtoken::crypto::sign(input.as_bytes(), key, algorithm)
            .map_err(|e| format!("signing failed: {e}"))?;
        Ok(format!("{input}.{sig}"))
    }

    /// Signs `claims` with the RSA key (RS256, its `kid`, `typ: JWT`).
    pub fn sign_claims(&self, claims: Value) -> Result<String, String> {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(self.rsa.kid.clone());
        header.typ = Some("JWT".into());
        jsonwebtoken::encode(&header, &claims, &self.rsa.encoding)
            .map_err(|e| format!("signing failed: {e}"))
    }

    /// The claims a token for `req` carries, before `extra_claims` are merged.
    fn claims(&self, req: &TokenRequest) -> Map<String, Value> {
        let now = now_secs();
        let exp = now + req.ttl_secs;
        // An already-expired token must still have iat <= exp to look like a real, old token.
        let iat = now.min(exp - 60);
        let (email, short) = match req.user.split_once('@') {
            Some((local, _)) => (req.user.clone(), local.to_string()),
            None => (format!("{}@example.com", req.user), req.user.clone()),
        };
        let name = match crate::fixture::known_person(&short) {
            Some((given, family)) => format!("{given} {family}"),
            None => capitalize(&short),
        };
        let mut claims = Map::new();
        claims.insert("iss".into(), json!(self.issuer));
        claims.insert("sub".into(), json!(format!("u-{short}")));
        claims.insert("aud".into(), json!(req.audience));
        claims.insert("azp".into(), json!(req.agent));
        claims.insert("email".into(), json!(email));
        claims.insert("email_verified".into(), json!(true));
        claims.insert("name".into(), json!(name));
        claims.insert("preferred_username".into(), json!(short));
        claims.insert("iat".into(), json!(iat));
        claims.insert("nbf".into(), json!(iat));
        claims.insert("exp".into(), json!(exp));
        claims.insert("jti".into(), json!(random_hex(16)));
        claims
    }

    /// Signs a token for `req`. `alg`: `None`/"RS256" (also "RS384", "RS512", "PS256" with the
    /// RSA key), "ES256", and for negative tests "HS256" (a secret no JWKS publishes), "none"
    /// (unsigned) and any other name (that name in the header, a random signature). Fails only
    /// if signing with the IdP's own keys fails, which does not happen.
    pub fn mint(&self, req: &TokenRequest) -> Result<String, String> {
        let mut claims = self.claims(req);
        for (k, v) in &req.extra_claims {
            claims.insert(k.clone(), v.clone());
        }
        let alg = req.alg.as_deref().unwrap_or("RS256").to_ascii_uppercase();
        let (algorithm, key, kid) = match alg.as_str() {
            "RS256" => (Algorithm::RS256, &self.rsa.encoding, Some(&self.rsa.kid)),
            "RS384" => (Algorithm::RS384, &self.rsa.encoding, Some(&self.rsa.kid)),
            "RS512" => (Algorithm::RS512, &self.rsa.encoding, Some(&self.rsa.kid)),
            "PS256" => (Algorithm::PS256, &self.rsa.encoding, Some(&self.rsa.kid)),
            "ES256" => (Algorithm::ES256, &self.ec.encoding, Some(&self.ec.kid)),
            "HS256" => {
                let mut header = Header::new(Algorithm::HS256);
                header.kid = Some("sandbox-hs256".into());
                return jsonwebtoken::encode(
                    &header,
                    &claims,
                    &EncodingKey::from_secret(HS256_SECRET),
                )
                .map_err(|e| format!("signing failed: {e}"));
            }
            "NONE" => {
                let header = json!({ "alg": "none", "typ": "JWT" });
                return Ok(format!(
                    "{}.{}.",
                    URL_SAFE_NO_PAD.encode(header.to_string()),
                    URL_SAFE_NO_PAD.encode(Value::Object(claims).to_string())
                ));
            }
            _ => {
                // An algorithm the IdP has no key for: a token whose header names it, under the
                // RSA key's kid, with a random signature. Only a validator that skips its
                // algorithm allowlist would even look at the signature.
                let raw_alg = req.alg.as_deref().unwrap_or_default();
                let header = json!({ "alg": raw_alg, "kid": self.rsa.kid, "typ": "JWT" });
                return Ok(format!(
                    "{}.{}.{}",
                    URL_SAFE_NO_PAD.encode(header.to_string()),
                    URL_SAFE_NO_PAD.encode(Value::Object(claims).to_string()),
                    URL_SAFE_NO_PAD.encode(random_hex(32))
                ));
            }
        };
        let mut header = Header::new(algorithm);
        header.kid = kid.cloned();
        header.typ = Some("JWT".into());
        jsonwebtoken::encode(&header, &claims, key).map_err(|e| format!("signing failed: {e}"))
    }

    /// Validates `token` the way a Databricks federation policy for this issuer does: signature
    /// with the IdP's published keys (RS256 or ES256), `iss`, `aud` containing `audience`, `exp`
    /// and `nbf` with no leeway. Returns the claims.
    pub fn verify(&self, token: &str, audience: &str) -> Result<Map<String, Value>, VerifyError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| VerifyError::Malformed)?;
        let key = [&self.rsa, &self.ec]
            .into_iter()
            .find(|k| match &header.kid {
                Some(kid) => *kid == k.kid,
                None => k.alg == header.alg,
            })
            .ok_or(VerifyError::UnknownKey)?;
        if header.alg != key.alg {
            return Err(VerifyError::Algorithm);
        }
        let mut validation = Validation::new(key.alg);
        validation.leeway = 0;
        validation.validate_nbf = true;
        // Two federation policies: the dev IdP's own issuer, and a second tenant that shares
        // its keys (`{issuer}/tenant-b`), so tests can run two issuers whose users collide.
        let second = format!("{}{}", self.issuer, crate::SECOND_ISSUER_PATH);
        validation.set_issuer(&[self.issuer.as_str(), second.as_str()]);
        validation.set_audience(&[audience]);
        validation.required_spec_claims = ["exp", "iss", "aud"]
            .iter()
            .map(|c| c.to_string())
            .collect::<HashSet<_>>();
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key.decoding, &validation)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind as K;
                match e.kind() {
                    K::InvalidSignature => VerifyError::Signature,
                    K::InvalidIssuer => VerifyError::Issuer,
                    K::InvalidAudience => VerifyError::Audience,
                    K::ExpiredSignature => VerifyError::Expired,
                    K::ImmatureSignature => VerifyError::NotYetValid,
                    K::MissingRequiredClaim(_) => VerifyError::MissingClaim,
                    K::InvalidAlgorithm => VerifyError::Algorithm,
                    _ => VerifyError::Malformed,
                }
            })?;
        Ok(data.claims)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means another request panicked mid-update of plain data.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(first) => first.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn generate_rsa() -> Result<SigningKey, Box<dyn std::error::Error>> {
    use rsa::pkcs1::EncodeRsaPrivateKey;
    use rsa::traits::PublicKeyParts;
    let private = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048)?;
    let der = private.to_pkcs1_der()?;
    let n = b64(&private.n().to_bytes_be());
    let e = b64(&private.e().to_bytes_be());
    let kid = format!("sandbox-rs256-{}", random_hex(4));
    Ok(SigningKey {
        jwk: json!({ "kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256", "n": n, "e": e }),
        decoding: DecodingKey::from_rsa_components(&n, &e)?,
        encoding: EncodingKey::from_rsa_der(der.as_bytes()),
        alg: Algorithm::RS256,
        kid,
    })
}

fn generate_ec() -> Result<SigningKey, Box<dyn std::error::Error>> {
    use p256::pkcs8::EncodePrivateKey;
    let private = p256::ecdsa::SigningKey::random(&mut rsa::rand_core::OsRng);
    let der = private.to_pkcs8_der()?;
    let point = private.verifying_key().to_encoded_point(false);
    let (Some(x), Some(y)) = (point.x(), point.y()) else {
        return Err("uncompressed point without coordinates".into());
    };
    let (x, y) = (b64(x), b64(y));
    let kid = format!("sandbox-es256-{}", random_hex(4));
    Ok(SigningKey {
        jwk: json!({ "kty": "EC", "kid": kid, "use": "sig", "alg": "ES256", "crv": "P-256", "x": x, "y": y }),
        decoding: DecodingKey::from_ec_components(&x, &y)?,
        encoding: EncodingKey::from_ec_der(der.as_bytes()),
        alg: Algorithm::ES256,
        kid,
    })
}

// === HTTP ===

pub(crate) fn router(state: Arc<IdpState>) -> Router {
    Router::new()
        .route("/.well-known/openid-configuration", get(discovery))
        .route("/jwks", get(jwks))
        .route("/dev/token", post(dev_token))
        .route("/dev/faults", post(dev_faults))
        .merge(oidc::routes())
        .fallback(|| async { (StatusCode::NOT_FOUND, Json(json!({ "error": "not_found" }))) })
        .with_state(state)
}

async fn discovery(State(idp): State<Arc<IdpState>>) -> Json<Value> {
    let iss = &idp.issuer;
    Json(json!({
        "issuer": iss,
        "jwks_uri": format!("{iss}/jwks"),
        "authorization_endpoint": format!("{iss}/authorize"),
        "token_endpoint": format!("{iss}/token"),
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": ["authorization_code"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
        "subject_types_supported": ["public"],
        // ID tokens from /token are RS256; ES256 is for the access tokens /dev/token mints.
        "id_token_signing_alg_values_supported": ["RS256"],
        "scopes_supported": ["openid", "email", "profile"],
        "claims_supported": ["iss", "sub", "aud", "azp", "exp", "iat", "nbf", "jti", "nonce",
            "auth_time", "email", "email_verified", "name", "preferred_username", "aegis_roles"],
    }))
}

async fn jwks(State(idp): State<Arc<IdpState>>) -> Response {
    idp.jwks_fetches.fetch_add(1, Ordering::Relaxed);
    match idp.jwks_fault() {
        JwksFault::Ok => Json(idp.jwks()).into_response(),
        JwksFault::Empty => Json(json!({ "keys": [] })).into_response(),
        JwksFault::WithoutRsa => Json(json!({ "keys": [idp.ec.jwk.clone()] })).into_response(),
        JwksFault::Down => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            "jwks temporarily unavailable",
        )
            .into_response(),
        JwksFault::Html => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            "<!doctype html><html><head><title>Sign in</title></head><body>maintenance</body></html>",
        )
            .into_response(),
    }
}

#[derive(Deserialize)]
struct DevTokenBody {
    user: String,
    agent: Option<String>,
    audience: Option<String>,
    ttl_secs: Option<i64>,
    alg: Option<String>,
    #[serde(default)]
    extra_claims: Map<String, Value>,
}

async fn dev_token(
    State(idp): State<Arc<IdpState>>,
    body: Result<Json<DevTokenBody>, JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(b) => b,
        Err(e) => return bad_request(&e.body_text()),
    };
    let mut req = TokenRequest::new(&body.user);
    if let Some(agent) = body.agent {
        req.agent = agent;
    }
    if let Some(audience) = body.audience {
        req.audience = audience;
    }
    if let Some(ttl) = body.ttl_secs {
        req.ttl_secs = ttl;
    }
    req.alg = body.alg;
    req.extra_claims = body.extra_claims;
    match idp.mint(&req) {
        Ok(token) => Json(json!({
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": req.ttl_secs.max(0),
        }))
        .into_response(),
        Err(e) => bad_request(&e),
    }
}

#[derive(Deserialize)]
struct FaultsBody {
    jwks: Option<JwksFault>,
}

async fn dev_faults(
    State(idp): State<Arc<IdpState>>,
    body: Result<Json<FaultsBody>, JsonRejection>,
) -> Response {
    match body {
        Ok(Json(FaultsBody { jwks })) => {
            if let Some(f) = jwks {
                idp.set_jwks_fault(f);
            }
            Json(json!({ "jwks": format!("{:?}", idp.jwks_fault()).to_lowercase() }))
                .into_response()
        }
        Err(e) => bad_request(&e.body_text()),
    }
}

fn bad_request(msg: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({ "error": "invalid_request", "error_description": msg })),
    )
        .into_response()
}
