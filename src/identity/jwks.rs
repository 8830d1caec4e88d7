//! Issuer signing keys: OIDC discovery, JWKS fetch, a cache keyed by (issuer, kid), and a
//! single-flight, rate-limited refresh when a token names a kid we have not seen.
//!
//! A JWKS answer that does not parse, or that yields no usable key (an HTML error page, `{}`,
//! `{"keys":[]}`), never replaces a good key set. A key set older than the issuer's
//! `max_key_age` (no successful fetch for that long) is no longer used: tokens of that issuer are
//! denied as `dependency_unavailable` until a fetch succeeds again.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey};

use crate::http::{fetch_json, FetchError};

/// One verification key.
pub struct Key {
    pub kid: Option<String>,
    pub key: DecodingKey,
    /// The JWK's own `alg`, when it states one.
    pub alg: Option<Algorithm>,
}

impl Key {
    fn accepts(&self, alg: Algorithm) -> bool {
        self.key.family() == alg.family() && self.alg.is_none_or(|a| a == alg)
    }
}

/// The keys of one issuer at one point in time.
pub struct KeySet {
    by_kid: HashMap<String, Arc<Key>>,
    all: Vec<Arc<Key>>,
    pub fetched_at: Instant,
}

impl KeySet {
    /// Parses a JWKS document, skipping keys we cannot use; errors when none is usable.
    pub fn parse(doc: &serde_json::Value) -> Result<KeySet, &'static str> {
        let keys = doc
            .get("keys")
            .and_then(|k| k.as_array())
            .ok_or("the document has no \"keys\" array")?;
        let mut by_kid = HashMap::new();
        let mut all = Vec::new();
        for raw in keys {
            let Ok(jwk) = serde_json::from_value::<Jwk>(raw.clone()) else {
                continue;
            };
            if matches!(
                jwk.common.public_key_use,
                Some(jsonwebtoken::jwk::PublicKeyUse::Encryption)
            ) {
                continue;
            }
            let Ok(key) = DecodingKey::from_jwk(&jwk) else {
                continue;
            };
            if key.family() == jsonwebtoken::AlgorithmFamily::Hmac {
                // A symmetric key in a public JWKS is never trusted.
                continue;
            }
            let alg = match jwk.common.key_algorithm {
                None => None,
                Some(ka) => match serde_json::to_value(ka)
                    .ok()
                    .and_then(|v| v.as_str().and_then(|s| Algorithm::from_str(s).ok()))
                {
                    Some(a) => Some(a),
                    // An encryption algorithm (RSA-OAEP...) marks a key we must not verify with.
                    None => continue,
                },
            };
            let kid = jwk.common.key_id.clone();
            let key = Arc::new(Key {
                kid: kid.clone(),
                key,
                alg,
            });
            if let Some(kid) = kid {
                by_kid.insert(kid, key.clone());
            }
            all.push(key);
        }
        if all.is_empty() {
            return Err("the document holds no usable signing key");
        }
        Ok(KeySet {
            by_kid,
            all,
            fetched_at: Instant::now(),
        })
    }

    /// The key for `kid` that may verify `alg`; without a kid, the only key that may.
    pub fn find(&self, kid: Option<&str>, alg: Algorithm) -> Option<Arc<Key>> {
        match kid {
            Some(kid) => self.by_kid.get(kid).filter(|k| k.accepts(alg)).cloned(),
            None => {
                let mut candidates = self.all.iter().filter(|k| k.accepts(alg));
                let first = candidates.next()?;
                // Without a kid we only guess when there is nothing to guess between.
                candidates.next().is_none().then(|| first.clone())
            }
        }
    }

    pub fn len(&self) -> usize {
        self.all.len()
    }

    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    /// No key with that kid (after at most one refresh).
    #[error("no signing key matches the token's kid and alg")]
    Unknown,
    /// The issuer's keys have never been loaded, or are older than `max_key_age`.
    #[error("the issuer's signing keys are unavailable")]
    Unavailable,
}

/// The cached key set of one issuer.
pub struct JwksCache {
    issuer: String,
    configured_uri: Option<url::Url>,
    http: reqwest::Client,
    current: RwLock<Option<Arc<KeySet>>>,
    discovered_uri: RwLock<Option<url::Url>>,
    /// Serializes fetches; holds the time of the last fetch attempt.
    refresh: tokio::sync::Mutex<Option<Instant>>,
    min_refresh_interval: Duration,
    max_key_age: Duration,
}

impl JwksCache {
    pub fn new(
        issuer: String,
        configured_uri: Option<url::Url>,
        http: reqwest::Client,
        min_refresh_interval: Duration,
        max_key_age: Duration,
    ) -> Self {
        JwksCache {
            issuer,
            configured_uri,
            http,
            current: RwLock::new(None),
            discovered_uri: RwLock::new(None),
            refresh: tokio::sync::Mutex::new(None),
            min_refresh_interval,
            max_key_age,
        }
    }

    pub fn current(&self) -> Option<Arc<KeySet>> {
        self.current.read().ok().and_then(|g| g.clone())
    }

    pub fn is_loaded(&self) -> bool {
        self.current().is_some()
    }

    /// True while the current set is younger than `max_key_age`.
    pub fn is_fresh(&self) -> bool {
        self.fresh(self.current().as_ref()).is_some()
    }

    /// True while the current set is fresh and still holds the key a token named (`kid`, or
    /// the only key for `alg` when it named none). Synchronous and network-free: the verified
    /// token cache asks this on every hit.
    pub fn holds(&self, kid: Option<&str>, alg: Algorithm) -> bool {
        self.fresh(self.current().as_ref())
            .is_some_and(|s| s.find(kid, alg).is_some())
    }

    /// The current set, unless it is older than `max_key_age`.
    fn fresh(&self, set: Option<&Arc<KeySet>>) -> Option<Arc<KeySet>> {
        set.filter(|s| s.fetched_at.elapsed() <= self.max_key_age)
            .cloned()
    }

    /// Unknown when a fresh set exists (the kid is simply not in it), else Unavailable.
    fn miss(&self, set: Option<&Arc<KeySet>>) -> KeyError {
        if self.fresh(set).is_some() {
            KeyError::Unknown
        } else {
            KeyError::Unavailable
        }
    }

    /// Finds a key, refreshing the set once (rate-limited, single-flight) on a miss or when the
    /// set is older than `max_key_age`.
    pub async fn key_for(&self, kid: Option<&str>, alg: Algorithm) -> Result<Arc<Key>, KeyError> {
        let before = self.current();
        if let Some(k) = self.fresh(before.as_ref()).and_then(|s| s.find(kid, alg)) {
            return Ok(k);
        }
        let mut last = self.refresh.lock().await;
        // Someone else may have refreshed while we waited for the lock.
        let now_set = self.current();
        let changed = match (&before, &now_set) {
            (Some(a), Some(b)) => !Arc::ptr_eq(a, b),
            (None, Some(_)) => true,
            _ => false,
        };
        if changed {
            if let Some(k) = self.fresh(now_set.as_ref()).and_then(|s| s.find(kid, alg)) {
                return Ok(k);
            }
        }
        let rate_limited = last.is_some_and(|t| t.elapsed() < self.min_refresh_interval);
        if rate_limited || changed {
            metrics::counter!("aegis_jwks_refresh_total", "outcome" => "rate_limited").increment(1);
            return Err(self.miss(now_set.as_ref()));
        }
        *last = Some(Instant::now());
        match self.fetch().await {
            Ok(set) => {
                let found = set.find(kid, alg);
                self.store(set);
                found.ok_or(KeyError::Unknown)
            }
            Err(e) => {
                tracing::warn!(issuer = %self.issuer, error = %e, "JWKS refresh failed");
                Err(self.miss(now_set.as_ref()))
            }
        }
    }

    /// Loads or reloads the set (startup and periodic refresh). Keeps the old set on failure.
    pub async fn reload(&self) -> Result<usize, FetchError> {
        let mut last = self.refresh.lock().await;
        *last = Some(Instant::now());
        let set = self.fetch().await?;
        let n = set.len();
        self.store(set);
        Ok(n)
    }

    fn store(&self, set: KeySet) {
        if let Ok(mut g) = self.current.write() {
            *g = Some(Arc::new(set));
        }
    }

    async fn jwks_uri(&self) -> Result<url::Url, FetchError> {
        if let Some(u) = &self.configured_uri {
            return Ok(u.clone());
        }
        if let Some(u) = self.discovered_uri.read().ok().and_then(|g| g.clone()) {
            return Ok(u);
        }
        let discovery = format!(
            "{}/.well-known/openid-configuration",
            self.issuer.trim_end_matches('/')
        );
        let doc = fetch_json(&self.http, &discovery).await?;
        let issuer = doc.get("issuer").and_then(|v| v.as_str());
        if issuer != Some(self.issuer.as_str()) {
            return Err(FetchError::Invalid(
                "the discovery document names a different issuer",
            ));
        }
        let uri = doc
            .get("jwks_uri")
            .and_then(|v| v.as_str())
            .ok_or(FetchError::Invalid(
                "the discovery document has no jwks_uri",
            ))?;
        let uri = url::Url::parse(uri).map_err(|_| FetchError::Invalid("jwks_uri is not a URL"))?;
        let loopback = matches!(uri.host(), Some(url::Host::Ipv4(ip)) if ip.is_loopback())
            || matches!(uri.host(), Some(url::Host::Ipv6(ip)) if ip.is_loopback())
            || matches!(uri.host(), Some(url::Host::Domain(d)) if d.eq_ignore_ascii_case("localhost"));
        if !(uri.scheme() == "https" || (uri.scheme() == "http" && loopback)) {
            return Err(FetchError::Invalid("jwks_uri must be https"));
        }
        if let Ok(mut g) = self.discovered_uri.write() {
            *g = Some(uri.clone());
        }
        Ok(uri)
    }

    async fn fetch(&self) -> Result<KeySet, FetchError> {
        let uri = self.jwks_uri().await?;
        let doc = fetch_json(&self.http, uri.as_str()).await;
        let outcome = match &doc {
            Ok(_) => "ok",
            Err(_) => "error",
        };
        metrics::counter!("aegis_jwks_refresh_total", "outcome" => outcome).increment(1);
        let set = KeySet::parse(&doc?).map_err(FetchError::Invalid)?;
        Ok(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_or_junk_documents_are_rejected() {
        for doc in [
            serde_json::json!({}),
            serde_json::json!({"keys": []}),
            serde_json::json!({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]}),
            serde_json::json!("<html>"),
        ] {
            assert!(KeySet::parse(&doc).is_err(), "{doc}");
        }
    }

    /// A key set older than `max_key_age` is not used while the JWKS cannot be fetched.
    #[tokio::test]
    async fn stale_keys_are_not_used() {
        // RFC 7515 A.3's P-256 public key.
        let doc = serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256",
            "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
            "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0",
        }]});
        let cache = JwksCache::new(
            "http://127.0.0.1:1".into(),
            url::Url::parse("http://127.0.0.1:1/jwks").ok(),
            reqwest::Client::new(),
            Duration::from_secs(3600),
            Duration::from_millis(200),
        );
        let set = KeySet::parse(&doc).map_err(|e| e.to_string());
        cache.store(set.unwrap_or_else(|e| panic!("{e}")));
        assert!(cache.key_for(Some("k1"), Algorithm::ES256).await.is_ok());
        assert_eq!(
            cache.key_for(Some("nope"), Algorithm::ES256).await.err(),
            Some(KeyError::Unknown)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            cache.key_for(Some("k1"), Algorithm::ES256).await.err(),
            Some(KeyError::Unavailable)
        );
    }
}
