//! Who is calling: validates the end user's IdP JWT and maps its claims to a Databricks user and
//! a calling agent.
//!
//! Checks, in order: size cap; compact JWS shape (three base64url parts, no padding); header
//! (no duplicate keys, `alg` in the issuer's allowlist, `typ` a JWT type, no `crit`, no
//! `jku`/`x5u`/`jwk`/`x5c`, since keys only ever come from the configured issuer's JWKS); `iss` an
//! exact match of a configured issuer; the signing key by (issuer, kid); signature, `aud`, `exp`,
//! `nbf` with the issuer's leeway; `iat` not in the future; NumericDates as integers; the
//! username claim a plain string.
//!
//! A verified token is cached by its SHA-256 until its `exp`, so a signature is checked once per
//! token, not once per request. A cached verdict is reused only while the issuer's current key
//! set is fresh and still holds the key (`kid`, `alg`) that verified it: a key removed from the
//! JWKS (rotated out after a compromise) stops its tokens at the next key reload.

pub mod jwks;

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::config::IssuerConfig;
use jwks::{JwksCache, KeyError};

/// Tokens longer than this are refused before any parsing (documented in SECURITY.md).
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// The validated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The configured issuer's `name`.
    pub issuer_name: Arc<str>,
    /// The token's `iss`.
    pub issuer: Arc<str>,
    pub subject: String,
    /// The Databricks user name (from `username_claim`).
    pub user_name: String,
    /// The calling agent application (from `agent_claim`).
    pub agent: Option<String>,
    /// The token's `exp`, seconds since the epoch.
    pub expires_at: i64,
    /// The RFC 8693 `act` chain: the current actor's `sub` first, then each prior actor's,
    /// joined by " > "; empty when the token has no `act` claim.
    pub actor_chain: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    #[error("token rejected: {0}")]
    Rejected(&'static str),
    #[error("token expired")]
    Expired,
    #[error("issuer is not trusted")]
    UntrustedIssuer,
    #[error("the username claim is missing or not a string")]
    NoUsername,
    #[error("the issuer's signing keys are unavailable")]
    KeysUnavailable,
}

struct IssuerState {
    cfg: IssuerConfig,
    name: Arc<str>,
    iss: Arc<str>,
    jwks: JwksCache,
    validation: HashMap<Algorithm, Validation>,
}

/// What the validator holds for one issuer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeysStatus {
    /// Keys in the current set (0: none loaded yet).
    pub keys: usize,
    /// How old the current set is.
    pub age: Option<Duration>,
    /// Younger than the issuer's `max_key_age`: tokens of this issuer verify.
    pub fresh: bool,
}

/// One issuer's validation settings and key cache.
fn issuer_state(cfg: &IssuerConfig, http: &reqwest::Client) -> IssuerState {
    let mut validation = HashMap::new();
    for alg in &cfg.algorithms {
        let mut v = Validation::new(*alg);
        v.leeway = cfg.leeway.as_secs();
        v.validate_exp = true;
        v.validate_nbf = true;
        v.validate_aud = true;
        v.set_audience(&cfg.audiences);
        v.set_issuer(&[&cfg.issuer]);
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.insert(*alg, v);
    }
    IssuerState {
        name: Arc::from(cfg.name.as_str()),
        iss: Arc::from(cfg.issuer.as_str()),
        jwks: JwksCache::new(
            cfg.issuer.clone(),
            cfg.jwks_uri.clone(),
            http.clone(),
            Duration::from_secs(10),
            cfg.max_key_age,
        ),
        cfg: cfg.clone(),
        validation,
    }
}

/// Validates tokens against the configured issuers.
pub struct Validator {
    /// Swapped whole by [`Validator::reconfigure`] (a config reload), read once per token.
    by_iss: arc_swap::ArcSwap<HashMap<String, Arc<IssuerState>>>,
    verified: moka::sync::Cache<[u8; 32], Verified>,
    http: reqwest::Client,
}

/// A cached verdict: the identity and the key that verified its signature.
#[derive(Clone)]
struct Verified {
    identity: Arc<Identity>,
    kid: Option<Arc<str>>,
    alg: Algorithm,
}

struct UntilExp;

impl moka::Expiry<[u8; 32], Verified> for UntilExp {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        value: &Verified,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        let now = unix_now();
        Some(Duration::from_secs(
            value
                .identity
                .expires_at
                .saturating_sub(now)
                .clamp(0, 86_400) as u64,
        ))
    }
}

/// The JOSE header. A member that is present counts as present even when it is `null`: `kid`
/// and `typ` must then be strings, and any value of `crit`, `jku`, ... refuses the token.
#[derive(Deserialize)]
struct RawHeader {
    alg: String,
    #[serde(default, deserialize_with = "present_string")]
    kid: Option<String>,
    #[serde(default, deserialize_with = "present_string")]
    typ: Option<String>,
    #[serde(default, deserialize_with = "present")]
    crit: Option<serde_json::Value>,
    #[serde(default, deserialize_with = "present")]
    jku: Option<serde_json::Value>,
    #[serde(default, deserialize_with = "present")]
    x5u: Option<serde_json::Value>,
    #[serde(default, deserialize_with = "present")]
    jwk: Option<serde_json::Value>,
    #[serde(default, deserialize_with = "present")]
    x5c: Option<serde_json::Value>,
    #[serde(default, deserialize_with = "present")]
    enc: Option<serde_json::Value>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<serde_json::Value>, D::Error> {
    serde_json::Value::deserialize(d).map(Some)
}

fn present_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    String::deserialize(d).map(Some)
}

impl Validator {
    pub fn new(issuers: &[IssuerConfig], http: reqwest::Client) -> Validator {
        let by_iss = issuers
            .iter()
            .map(|cfg| (cfg.issuer.clone(), Arc::new(issuer_state(cfg, &http))))
            .collect();
        Validator {
            by_iss: arc_swap::ArcSwap::from_pointee(by_iss),
            verified: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .expire_after(UntilExp)
                .build(),
            http,
        }
    }

    /// Takes a reloaded issuer list: an issuer whose settings are unchanged keeps its key cache;
    /// a new or changed one must load its keys first, or the reload is refused (the running
    /// issuers keep serving). Verified tokens are forgotten: a claim mapping or audience may
    /// have changed.
    pub async fn reconfigure(&self, issuers: &[IssuerConfig]) -> Result<(), String> {
        let old = self.by_iss.load_full();
        let mut next = HashMap::new();
        for cfg in issuers {
            let kept = old
                .get(&cfg.issuer)
                .filter(|st| format!("{:?}", st.cfg) == format!("{cfg:?}"));
            let state = match kept {
                Some(st) => st.clone(),
                None => {
                    let st = Arc::new(issuer_state(cfg, &self.http));
                    st.jwks.reload().await.map_err(|e| {
                        format!("issuer {}: its keys could not be loaded: {e}", cfg.name)
                    })?;
                    st
                }
            };
            next.insert(cfg.issuer.clone(), state);
        }
        self.by_iss.store(Arc::new(next));
        self.verified.invalidate_all();
        Ok(())
    }

    /// Loads every issuer's keys; returns the names of those that could not be loaded.
    pub async fn load_all(&self) -> Vec<(String, String)> {
        let mut failed = Vec::new();
        for st in self.by_iss.load_full().values() {
            if let Err(e) = st.jwks.reload().await {
                failed.push((st.cfg.name.clone(), e.to_string()));
            }
        }
        failed
    }

    /// True once every issuer has a key set.
    pub fn all_loaded(&self) -> bool {
        self.by_iss.load().values().all(|s| s.jwks.is_loaded())
    }

    /// One issuer's keys (by its configured `name`), for the operator console.
    pub fn keys_of(&self, issuer_name: &str) -> Option<KeysStatus> {
        let map = self.by_iss.load();
        let st = map.values().find(|s| s.cfg.name == issuer_name)?;
        let current = st.jwks.current();
        Some(KeysStatus {
            keys: current.as_ref().map_or(0, |s| s.len()),
            age: current.as_ref().map(|s| s.fetched_at.elapsed()),
            fresh: st.jwks.is_fresh(),
        })
    }

    /// How often to refresh every issuer's keys: a third of the shortest `max_key_age`, so
    /// a healthy IdP never lets a key set go stale; between 1 s and 5 min.
    pub fn refresh_interval(&self) -> Duration {
        self.by_iss
            .load()
            .values()
            .map(|s| s.cfg.max_key_age / 3)
            .min()
            .unwrap_or(Duration::from_secs(300))
            .clamp(Duration::from_secs(1), Duration::from_secs(300))
    }

    /// Validates a token (from the verified cache when possible).
    pub async fn validate(&self, token: &str) -> Result<Arc<Identity>, IdentityError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(IdentityError::Malformed("token over the size cap"));
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(hit) = self.verified.get(&digest) {
            // A cached verdict is only as good as the key behind it: past the issuer's
            // max_key_age, or once that key is gone from the issuer's key set (rotated out
            // after a compromise), the token is verified again, and so denied until the keys
            // are fetched again or for good.
            let key_held = self
                .by_iss
                .load()
                .get(hit.identity.issuer.as_ref())
                .is_some_and(|st| st.jwks.holds(hit.kid.as_deref(), hit.alg));
            if hit.identity.expires_at > unix_now() && key_held {
                metrics::counter!("aegis_jwt_cache_total", "result" => "hit").increment(1);
                return Ok(hit.identity);
            }
            self.verified.invalidate(&digest);
        }
        metrics::counter!("aegis_jwt_cache_total", "result" => "miss").increment(1);
        let verified = self.verify(token).await?;
        let id = verified.identity.clone();
        if id.expires_at > unix_now() {
            self.verified.insert(digest, verified);
        }
        Ok(id)
    }

    /// Validates an OIDC ID token for the operator console with the same checks as every
    /// other token (header, allowlisted `alg`, the issuer's keys, signature, `iss`, `exp`,
    /// `nbf`, `iat`, `sub`), except that `aud` must hold `client_id` (not the issuer's
    /// configured audiences), `azp`, when present or when `aud` names several parties, must be
    /// `client_id`, and the token must come from the issuer named `issuer_name`. Not cached:
    /// an ID token is used once. The nonce is the caller's to check.
    pub async fn validate_id_token(
        &self,
        token: &str,
        issuer_name: &str,
        client_id: &str,
    ) -> Result<IdToken, IdentityError> {
        use IdentityError::Rejected;
        if token.len() > MAX_TOKEN_LEN {
            return Err(IdentityError::Malformed("token over the size cap"));
        }
        let checked = self.verify_jws(token, Some(client_id)).await?;
        if &*checked.issuer.name != issuer_name {
            return Err(IdentityError::UntrustedIssuer);
        }
        let several =
            matches!(checked.claims.get("aud"), Some(serde_json::Value::Array(a)) if a.len() > 1);
        match checked.claims.get("azp") {
            Some(serde_json::Value::String(azp)) if azp == client_id => {}
            Some(_) => return Err(Rejected("azp is not this client")),
            None if several => return Err(Rejected("azp is missing with several audiences")),
            None => {}
        }
        Ok(IdToken {
            issuer_name: checked.issuer.name.clone(),
            issuer: checked.issuer.iss.clone(),
            subject: checked.subject,
            expires_at: checked.exp,
            claims: checked.claims,
        })
    }

    async fn verify(&self, token: &str) -> Result<Verified, IdentityError> {
        use IdentityError::Rejected;
        let Checked {
            issuer,
            claims,
            subject,
            exp,
            kid,
            alg,
        } = self.verify_jws(token, None).await?;
        let user_name = match claims.get(&issuer.cfg.username_claim) {
            Some(serde_json::Value::String(s)) if !s.trim().is_empty() => plain(s, "username")?,
            _ => return Err(IdentityError::NoUsername),
        };
        let agent = match claims.get(&issuer.cfg.agent_claim) {
            None => None,
            Some(serde_json::Value::String(s)) => Some(plain(s, "agent")?),
            Some(_) => return Err(Rejected("the agent claim is not a string")),
        };
        let actor_chain = actor_chain(claims.get("act"))?;
        Ok(Verified {
            identity: Arc::new(Identity {
                issuer_name: issuer.name.clone(),
                issuer: issuer.iss.clone(),
                subject,
                user_name,
                agent,
                expires_at: exp,
                actor_chain,
            }),
            kid,
            alg,
        })
    }

    /// The checks every token gets: shape, header, issuer, key, signature, `aud` (the issuer's
    /// audiences, or exactly `audience` when given), time claims and `sub`.
    async fn verify_jws(
        &self,
        token: &str,
        audience: Option<&str>,
    ) -> Result<Checked, IdentityError> {
        use IdentityError::{Malformed, Rejected};

        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Malformed("not a compact JWS (three dot-separated parts)"));
        };
        if h.is_empty() || p.is_empty() || s.is_empty() {
            return Err(Malformed("empty JWS part"));
        }
        let header_bytes = b64(h)?;
        let payload_bytes = b64(p)?;
        let sig = b64(s)?;
        if sig.iter().all(|b| *b == 0) {
            return Err(Rejected("all-zero signature"));
        }

        let header: RawHeader = serde_json::from_slice(&header_bytes)
            .map_err(|_| Malformed("header is not a JSON object with a string alg"))?;
        if header.crit.is_some() {
            return Err(Rejected("unsupported critical header"));
        }
        if header.jku.is_some()
            || header.x5u.is_some()
            || header.jwk.is_some()
            || header.x5c.is_some()
        {
            return Err(Rejected(
                "token names its own key; keys come only from the issuer",
            ));
        }
        if header.enc.is_some() {
            return Err(Rejected("encrypted tokens are not accepted"));
        }
        if let Some(typ) = &header.typ {
            let t = typ.to_ascii_lowercase();
            if !matches!(
                t.as_str(),
                "jwt" | "at+jwt" | "application/at+jwt" | "application/jwt"
            ) {
                return Err(Rejected("typ is not a JWT access token type"));
            }
        }
        if header
            .kid
            .as_ref()
            .is_some_and(|k| k.len() > 256 || k.chars().any(|c| c.is_control()))
        {
            return Err(Rejected("kid is malformed"));
        }

        let claims = strict_object(&payload_bytes)?;
        let iss = match claims.get("iss") {
            Some(serde_json::Value::String(s)) => s.as_str(),
            Some(_) => return Err(Rejected("iss is not a string")),
            None => return Err(Rejected("iss is missing")),
        };
        let Some(issuer) = self.by_iss.load().get(iss).cloned() else {
            return Err(IdentityError::UntrustedIssuer);
        };

        let alg = Algorithm::from_str(&header.alg).map_err(|_| Rejected("alg is not supported"))?;
        let Some(validation) = issuer.validation.get(&alg) else {
            return Err(Rejected("alg is not in the issuer's allowlist"));
        };

        // NumericDates must be integers (RFC 7519 allows fractions; no IdP we serve sends them,
        // and accepting them only widens the parser surface).
        let now = unix_now();
        let leeway = issuer.cfg.leeway.as_secs() as i64;
        let exp = match claims.get("exp") {
            Some(serde_json::Value::Number(n)) => {
                n.as_i64().ok_or(Rejected("exp is not an integer"))?
            }
            Some(_) => return Err(Rejected("exp is not an integer")),
            None => return Err(Rejected("exp is missing")),
        };
        if exp > MAX_NUMERIC_DATE {
            return Err(Rejected("exp is out of range"));
        }
        for name in ["nbf", "iat"] {
            match claims.get(name) {
                None => {}
                Some(serde_json::Value::Number(n)) if n.as_i64().is_some() => {}
                Some(_) => return Err(Rejected("nbf or iat is not an integer")),
            }
        }
        if let Some(iat) = claims.get("iat").and_then(|v| v.as_i64()) {
            if iat > now + leeway {
                return Err(Rejected("iat is in the future"));
            }
        }

        let key = match issuer.jwks.key_for(header.kid.as_deref(), alg).await {
            Ok(k) => k,
            Err(KeyError::Unknown) => return Err(Rejected("no matching signing key")),
            Err(KeyError::Unavailable) => return Err(IdentityError::KeysUnavailable),
        };

        let own;
        let validation = match audience {
            None => validation,
            Some(aud) => {
                let mut v = validation.clone();
                v.set_audience(&[aud]);
                own = v;
                &own
            }
        };
        match jsonwebtoken::decode::<serde_json::Value>(token, &key.key, validation) {
            Ok(_) => {}
            Err(e) => {
                use jsonwebtoken::errors::ErrorKind as K;
                return Err(match e.kind() {
                    K::ExpiredSignature => IdentityError::Expired,
                    K::InvalidSignature => Rejected("bad signature"),
                    K::InvalidAudience => Rejected("audience not accepted"),
                    K::InvalidIssuer => Rejected("issuer mismatch"),
                    K::ImmatureSignature => Rejected("token not yet valid"),
                    K::InvalidAlgorithm => Rejected("alg does not match the key"),
                    K::MissingRequiredClaim(_) => Rejected("a required claim is missing"),
                    K::InvalidClaimFormat(_) => Rejected("a claim has the wrong type"),
                    _ => Rejected("token could not be verified"),
                });
            }
        }
        if exp.saturating_add(leeway) <= now {
            return Err(IdentityError::Expired);
        }

        // The subject is half of the principal everything cached is keyed by: without one, two
        // people of one issuer could not be told apart, so a token without it is refused.
        let subject = match claims.get("sub") {
            Some(serde_json::Value::String(s)) if !s.trim().is_empty() => plain(s, "sub")?,
            Some(serde_json::Value::String(_)) | None => return Err(Rejected("sub is missing")),
            Some(_) => return Err(Rejected("sub is not a string")),
        };
        Ok(Checked {
            issuer,
            claims,
            subject,
            exp,
            kid: header.kid.as_deref().map(Arc::from),
            alg,
        })
    }
}

/// A token that passed [`Validator::verify_jws`].
struct Checked {
    issuer: Arc<IssuerState>,
    claims: serde_json::Map<String, serde_json::Value>,
    subject: String,
    exp: i64,
    kid: Option<Arc<str>>,
    alg: Algorithm,
}

/// A validated OIDC ID token (see [`Validator::validate_id_token`]).
#[derive(Debug, Clone)]
pub struct IdToken {
    /// The configured issuer's `name`.
    pub issuer_name: Arc<str>,
    /// The token's `iss`.
    pub issuer: Arc<str>,
    pub subject: String,
    pub expires_at: i64,
    /// Every claim, for the caller's own checks (`nonce`, the roles claim, names).
    pub claims: serde_json::Map<String, serde_json::Value>,
}

/// A claim value that will end up in an audit row or a header: bounded, no control characters.
/// Nested `act` claims deeper than this are refused rather than cut short: a chain we could
/// not record whole is not one we vouch for.
const MAX_ACTOR_DEPTH: usize = 8;

/// The RFC 8693 delegation chain, outermost (current) actor first. `act` must be an object
/// holding a string `sub` and optionally a nested `act`; anything else rejects the token.
fn actor_chain(act: Option<&serde_json::Value>) -> Result<String, IdentityError> {
    let mut chain = String::new();
    let mut next = act;
    let mut depth = 0;
    while let Some(value) = next {
        depth += 1;
        if depth > MAX_ACTOR_DEPTH {
            return Err(IdentityError::Rejected(
                "the act claim is nested too deeply",
            ));
        }
        let serde_json::Value::Object(actor) = value else {
            return Err(IdentityError::Rejected("the act claim is not an object"));
        };
        let sub = match actor.get("sub") {
            Some(serde_json::Value::String(s)) if !s.trim().is_empty() => plain(s, "act.sub")?,
            _ => return Err(IdentityError::Rejected("an act claim has no string sub")),
        };
        if !chain.is_empty() {
            chain.push_str(" > ");
        }
        chain.push_str(&sub);
        next = actor.get("act");
    }
    Ok(chain)
}

fn plain(s: &str, _what: &'static str) -> Result<String, IdentityError> {
    if s.len() > 256 || s.chars().any(|c| c.is_control()) {
        return Err(IdentityError::Rejected(
            "a claim holds control characters or is too long",
        ));
    }
    Ok(s.to_string())
}

fn b64(part: &str) -> Result<Vec<u8>, IdentityError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| IdentityError::Malformed("a part is not unpadded base64url"))
}

/// Parses a JSON object, refusing duplicate top-level keys (two parsers could read different
/// values from `{"email":"a","email":"b"}`).
fn strict_object(
    bytes: &[u8],
) -> Result<serde_json::Map<String, serde_json::Value>, IdentityError> {
    struct Strict(serde_json::Map<String, serde_json::Value>);
    impl<'de> Deserialize<'de> for Strict {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Strict;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut m: A,
                ) -> Result<Strict, A::Error> {
                    let mut out = serde_json::Map::new();
                    while let Some((k, v)) = m.next_entry::<String, serde_json::Value>()? {
                        if out.contains_key(&k) {
                            return Err(serde::de::Error::custom("duplicate key"));
                        }
                        out.insert(k, v);
                    }
                    Ok(Strict(out))
                }
            }
            d.deserialize_map(V)
        }
    }
    serde_json::from_slice::<Strict>(bytes)
        .map(|s| s.0)
        .map_err(|_| IdentityError::Malformed("payload is not a JSON object with unique keys"))
}

/// 9999-12-31T23:59:59Z: a later `exp` is nonsense and would overflow date arithmetic.
const MAX_NUMERIC_DATE: i64 = 253_402_300_799;

use crate::clock::unix_secs as unix_now;

#[cfg(test)]
mod tests {
    use super::*;

    /// `exp` near i64::MAX once overflowed `exp + leeway` (a panic in debug builds).
    #[tokio::test]
    async fn absurd_exp_is_refused_without_overflow() {
        let issuer = IssuerConfig {
            name: "t".into(),
            issuer: "x".into(),
            audiences: vec!["aegis".into()],
            jwks_uri: url::Url::parse("http://127.0.0.1:1/jwks").ok(),
            algorithms: vec![Algorithm::RS256],
            username_claim: "email".into(),
            agent_claim: "azp".into(),
            leeway: Duration::from_secs(30),
            max_key_age: Duration::from_secs(3600),
        };
        let v = Validator::new(&[issuer], reqwest::Client::new());
        let b = |v: &serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let token = |exp: serde_json::Value| {
            format!(
                "{}.{}.c2ln",
                b(&serde_json::json!({"alg": "RS256"})),
                b(&serde_json::json!({"iss": "x", "exp": exp}))
            )
        };
        for exp in [
            serde_json::json!(i64::MAX),
            serde_json::json!(MAX_NUMERIC_DATE + 1),
        ] {
            assert_eq!(
                v.validate(&token(exp)).await.err(),
                Some(IdentityError::Rejected("exp is out of range"))
            );
        }
    }

    /// The sandbox IdP as a configured issuer named `dev`.
    fn sandbox_issuer(idp_url: &str) -> IssuerConfig {
        IssuerConfig {
            name: "dev".into(),
            issuer: idp_url.to_string(),
            audiences: vec!["aegis".into()],
            jwks_uri: url::Url::parse(&format!("{idp_url}/jwks")).ok(),
            algorithms: vec![Algorithm::RS256, Algorithm::ES256],
            username_claim: "email".into(),
            agent_claim: "azp".into(),
            leeway: Duration::from_secs(30),
            max_key_age: Duration::from_secs(3600),
        }
    }

    /// ID tokens for the console: `aud` must be the client (not the issuer's audiences), `azp`
    /// must name it when present or when `aud` names several parties, and the issuer must be
    /// the one the console names; an agent's access token is not an ID token for the console.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn id_tokens_are_checked_for_the_console_client() {
        use sandbox::{Sandbox, SandboxOptions, TokenRequest};

        let sb = Sandbox::start(SandboxOptions::default()).await.unwrap();
        let issuer = sandbox_issuer(&sb.idp_url);
        let v = Validator::new(&[issuer], reqwest::Client::new());
        assert!(v.load_all().await.is_empty());
        let mint = |aud: serde_json::Value, azp: Option<&str>| {
            let mut req = TokenRequest::new("carol");
            req.extra_claims.insert("aud".into(), aud);
            match azp {
                Some(a) => req.agent = a.into(),
                None => {
                    req.extra_claims
                        .insert("azp".into(), serde_json::Value::Null);
                }
            }
            sb.mint_idp_token(&req)
        };
        let client = "aegis-console";
        // Positive control: aud and azp the client.
        let ok = v
            .validate_id_token(
                &mint(serde_json::json!(client), Some(client)),
                "dev",
                client,
            )
            .await
            .unwrap();
        assert_eq!(ok.subject, "u-carol");
        assert_eq!(ok.claims["preferred_username"], "carol");
        // Several audiences including the client, azp the client: fine.
        let both = serde_json::json!([client, "aegis"]);
        assert!(v
            .validate_id_token(&mint(both.clone(), Some(client)), "dev", client)
            .await
            .is_ok());
        let refused = [
            // An agent's access token: aud is the issuer's audience, not the client.
            (
                v.validate_id_token(
                    &sb.mint_idp_token(&TokenRequest::new("carol")),
                    "dev",
                    client,
                )
                .await,
                IdentityError::Rejected("audience not accepted"),
            ),
            (
                v.validate_id_token(
                    &mint(serde_json::json!(client), Some("other-app")),
                    "dev",
                    client,
                )
                .await,
                IdentityError::Rejected("azp is not this client"),
            ),
            (
                v.validate_id_token(&mint(both, None), "dev", client).await,
                IdentityError::Rejected("azp is not this client"),
            ),
            (
                v.validate_id_token(
                    &mint(serde_json::json!(client), Some(client)),
                    "corp",
                    client,
                )
                .await,
                IdentityError::UntrustedIssuer,
            ),
        ];
        for (got, want) in refused {
            assert_eq!(got.err(), Some(want));
        }
        // Several audiences and no azp at all.
        let (rsa_kid, _) = sb.idp_key_ids();
        let now = unix_now();
        let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": rsa_kid});
        let payload = serde_json::json!({"iss": sb.idp_url, "sub": "u-carol",
            "aud": [client, "aegis"], "iat": now, "exp": now + 300});
        let raw = sb.sign_idp_raw(
            "RS256",
            header.to_string().as_bytes(),
            payload.to_string().as_bytes(),
        );
        assert_eq!(
            v.validate_id_token(&raw, "dev", client).await.err(),
            Some(IdentityError::Rejected(
                "azp is missing with several audiences"
            ))
        );
        // The agents' validation is unchanged: the issuer's audiences, not the client.
        assert!(v
            .validate(&sb.mint_idp_token(&TokenRequest::new("carol")))
            .await
            .is_ok());
        assert!(v
            .validate(&mint(serde_json::json!(client), Some(client)))
            .await
            .is_err());
        sb.shutdown().await;
    }

    /// A verdict cached while the key set was fresh was once reused after the key that signed
    /// it had been removed from the JWKS (key rotation after a compromise). The sandbox IdP
    /// signs with an RSA and an EC key; the RSA key is rotated out and the keys reloaded.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cached_verdict_dies_with_its_rotated_out_key() {
        use sandbox::{JwksFault, Sandbox, SandboxOptions, TokenRequest};

        let sb = Sandbox::start(SandboxOptions::default()).await.unwrap();
        let issuer = sandbox_issuer(&sb.idp_url);
        let v = Validator::new(&[issuer], reqwest::Client::new());
        assert!(v.load_all().await.is_empty());
        let rsa = sb.mint_idp_token(&TokenRequest::new("alice"));
        let mut es = TokenRequest::new("bob");
        es.alg = Some("ES256".into());
        let ec = sb.mint_idp_token(&es);
        let user = |r: Result<Arc<Identity>, IdentityError>| r.map(|i| i.user_name.clone());
        // Both verified, then served from the cache.
        for _ in 0..2 {
            assert_eq!(user(v.validate(&rsa).await), Ok("alice@example.com".into()));
            assert_eq!(user(v.validate(&ec).await), Ok("bob@example.com".into()));
        }
        let fetches = sb.jwks_fetch_count();

        sb.set_jwks_fault(JwksFault::WithoutRsa);
        assert!(v.load_all().await.is_empty());
        assert_eq!(sb.jwks_fetch_count(), fetches + 1);
        for _ in 0..2 {
            assert_eq!(
                v.validate(&rsa).await.err(),
                Some(IdentityError::Rejected("no matching signing key"))
            );
        }
        // Control: a token signed by the key that remains is still served from the cache
        // (no further JWKS fetch).
        assert_eq!(user(v.validate(&ec).await), Ok("bob@example.com".into()));
        assert_eq!(sb.jwks_fetch_count(), fetches + 1);

        // The key back in the set: its tokens verify again.
        sb.set_jwks_fault(JwksFault::Ok);
        assert!(v.load_all().await.is_empty());
        assert_eq!(user(v.validate(&rsa).await), Ok("alice@example.com".into()));
        sb.shutdown().await;
    }

    /// `"kid": null` once read as "no kid" (and so matched the only RSA key); `"crit": null`
    /// as no crit.
    #[test]
    fn null_header_members_are_not_absent() {
        let h = |s: &str| serde_json::from_str::<RawHeader>(s);
        assert!(h(r#"{"alg":"RS256","kid":null}"#).is_err());
        assert!(h(r#"{"alg":"RS256","typ":null}"#).is_err());
        assert!(h(r#"{"alg":"RS256","crit":null}"#).is_ok_and(|x| x.crit.is_some()));
        assert!(h(r#"{"alg":"RS256","jku":null}"#).is_ok_and(|x| x.jku.is_some()));
        assert!(h(r#"{"alg":"RS256"}"#).is_ok_and(|x| x.kid.is_none() && x.crit.is_none()));
        assert!(h(r#"{"alg":"RS256","kid":"k"}"#).is_ok_and(|x| x.kid.as_deref() == Some("k")));
    }

    #[test]
    fn duplicate_claims_are_refused() {
        assert!(strict_object(br#"{"email":"a","email":"b"}"#).is_err());
        assert!(strict_object(br#"{"email":"a"}"#).is_ok());
        assert!(strict_object(br#"[1]"#).is_err());
    }

    #[test]
    fn actor_chains_are_read_outermost_first_and_bounded() {
        let v = serde_json::json!({"sub": "copilot", "act": {"sub": "orchestrator"}});
        assert_eq!(actor_chain(Some(&v)).unwrap(), "copilot > orchestrator");
        assert_eq!(actor_chain(None).unwrap(), "");
        for bad in [
            serde_json::json!("copilot"),
            serde_json::json!({"act": {"sub": "x"}}),
            serde_json::json!({"sub": 7}),
            serde_json::json!({"sub": "a\nb"}),
        ] {
            assert!(actor_chain(Some(&bad)).is_err(), "{bad}");
        }
        let mut deep = serde_json::json!({"sub": "last"});
        for i in 0..MAX_ACTOR_DEPTH {
            deep = serde_json::json!({"sub": format!("a{i}"), "act": deep});
        }
        assert!(actor_chain(Some(&deep)).is_err());
    }
}
