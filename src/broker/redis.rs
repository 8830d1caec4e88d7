//! The Redis link: one multiplexed connection, a health monitor, and the encrypted L2 cache.
//!
//! Redis carries revocations between replicas, so when aegis cannot see Redis it cannot know
//! whether a cached token was revoked: the monitor PINGs every [`PING_EVERY`] and, on failure,
//! marks the link down, which makes every Check deny with `dependency_unavailable` (fail closed).
//! When Redis comes back, the L1 cache is flushed (revocations may have been missed) and
//! requests flow again with no restart.
//!
//! Tokens at rest in Redis are sealed with XChaCha20-Poly1305 under the cache key; the key id is
//! stored beside the ciphertext and the Redis key name is the AAD, so a value copied to another
//! user's key does not open.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;

use crate::secret::Key32;

pub const PING_EVERY: Duration = Duration::from_millis(250);
const OP_TIMEOUT: Duration = Duration::from_millis(300);

pub struct RedisLink {
    client: redis::Client,
    conn: RwLock<Option<MultiplexedConnection>>,
    healthy: AtomicBool,
    /// Bumped on every recovery; the broker flushes L1 when it changes.
    epoch: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("redis is unavailable")]
    Down,
    #[error("redis operation failed: {0}")]
    Op(String),
    #[error("redis operation timed out")]
    Timeout,
}

impl RedisLink {
    pub fn new(url: &str) -> Result<Arc<RedisLink>, redis::RedisError> {
        Ok(Arc::new(RedisLink {
            client: redis::Client::open(url)?,
            conn: RwLock::new(None),
            healthy: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
        }))
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    fn connection(&self) -> Option<MultiplexedConnection> {
        self.conn.read().ok().and_then(|g| g.clone())
    }

    fn set_connection(&self, c: Option<MultiplexedConnection>) {
        if let Ok(mut g) = self.conn.write() {
            *g = c;
        }
    }

    /// One health probe: (re)connect if needed, then PING.
    pub async fn probe(&self) -> bool {
        let conn = match self.connection() {
            Some(c) => Some(c),
            None => {
                let cfg = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(Duration::from_millis(500)))
                    .set_response_timeout(Some(OP_TIMEOUT));
                match self
                    .client
                    .get_multiplexed_async_connection_with_config(&cfg)
                    .await
                {
                    Ok(c) => {
                        self.set_connection(Some(c.clone()));
                        Some(c)
                    }
                    Err(_) => None,
                }
            }
        };
        let ok = match conn {
            Some(mut c) => {
                let pong: Result<Result<String, _>, _> = tokio::time::timeout(
                    OP_TIMEOUT,
                    redis::cmd("PING").query_async::<String>(&mut c),
                )
                .await;
                matches!(pong, Ok(Ok(ref p)) if p == "PONG")
            }
            None => false,
        };
        if !ok {
            self.set_connection(None);
        }
        let was = self.healthy.swap(ok, Ordering::AcqRel);
        if ok && !was {
            self.epoch.fetch_add(1, Ordering::AcqRel);
            tracing::info!("redis is reachable");
        } else if !ok && was {
            tracing::warn!("redis is unreachable; denying every request until it returns");
        }
        metrics::gauge!("aegis_dependency_up", "dependency" => "redis").set(if ok {
            1.0
        } else {
            0.0
        });
        ok
    }

    /// Probes forever.
    pub async fn monitor(self: Arc<Self>) {
        let mut tick = tokio::time::interval(PING_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.probe().await;
        }
    }

    fn live(&self) -> Result<MultiplexedConnection, RedisError> {
        if !self.healthy() {
            return Err(RedisError::Down);
        }
        self.connection().ok_or(RedisError::Down)
    }

    /// Runs one command on the live connection (fails fast while the link is down).
    pub async fn run<T: redis::FromRedisValue>(&self, cmd: redis::Cmd) -> Result<T, RedisError> {
        let mut c = self.live()?;
        match tokio::time::timeout(OP_TIMEOUT, cmd.query_async::<T>(&mut c)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(RedisError::Op(format!("{:?}", e.kind()))),
            Err(_) => Err(RedisError::Timeout),
        }
    }

    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, RedisError> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(key);
        self.run(cmd).await
    }

    pub async fn set_px(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), RedisError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key)
            .arg(value)
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64);
        self.run(cmd).await
    }

    pub async fn del(&self, keys: &[String]) -> Result<u64, RedisError> {
        let mut cmd = redis::cmd("DEL");
        cmd.arg(keys);
        self.run(cmd).await
    }
}

// === Sealing ===

/// AEAD for cache values.
pub struct Sealer {
    aead: XChaCha20Poly1305,
    key_id: String,
}

const SEAL_VERSION: u8 = 1;

impl Sealer {
    pub fn new(key: &Key32) -> Sealer {
        Sealer {
            aead: XChaCha20Poly1305::new(key.expose().into()),
            key_id: key.fingerprint(),
        }
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// `version || len(key_id) || key_id || nonce || ciphertext`, AAD = `aad`.
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
        use rand::RngCore;
        let mut nonce = [0u8; 24];
        rand::rng().fill_bytes(&mut nonce);
        let ct = self
            .aead
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .ok()?;
        let mut out = Vec::with_capacity(2 + self.key_id.len() + 24 + ct.len());
        out.push(SEAL_VERSION);
        out.push(self.key_id.len() as u8);
        out.extend_from_slice(self.key_id.as_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Some(out)
    }

    /// Opens a sealed value; `None` for another key id, another AAD, or any tampering.
    pub fn open(&self, sealed: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
        let (&version, rest) = sealed.split_first()?;
        if version != SEAL_VERSION {
            return None;
        }
        let (&kid_len, rest) = rest.split_first()?;
        let kid_len = kid_len as usize;
        if rest.len() < kid_len + 24 {
            return None;
        }
        let (kid, rest) = rest.split_at(kid_len);
        if kid != self.key_id.as_bytes() {
            return None;
        }
        let (nonce, ct) = rest.split_at(24);
        self.aead
            .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad })
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_are_bound_to_key_and_aad() {
        let s = Sealer::new(&Key32::generate());
        let sealed = s.seal(b"token", b"aegis:v1:tok:a:alice").unwrap();
        assert!(!sealed.windows(5).any(|w| w == b"token"));
        assert_eq!(s.open(&sealed, b"aegis:v1:tok:a:alice").unwrap(), b"token");
        assert!(s.open(&sealed, b"aegis:v1:tok:a:bob").is_none());
        let other = Sealer::new(&Key32::generate());
        assert!(other.open(&sealed, b"aegis:v1:tok:a:alice").is_none());
        let mut flipped = sealed.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(s.open(&flipped, b"aegis:v1:tok:a:alice").is_none());
    }
}
