//! Per-user Databricks tokens: L1 (in-process) → L2 (Redis, encrypted) → mint.
//!
//! Concurrent misses for one (workspace, user) in one process make one mint (the L1 cache's
//! `try_get_with` coalesces them). A cached token is used only until
//! `min(Databricks expiry, subject token expiry) − margin`, so an expired token is never sent
//! upstream. If Redis is unreachable, every lookup fails closed (see [`redis`]).

pub mod entra;
pub mod federation;
pub mod redis;
pub mod stats;
pub mod u2m;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::authz::{Reason, Tokens};
use crate::config::{TokenSourceKind, WorkspaceConfig};
use crate::identity::Identity;
use crate::secret::SecretString;
use redis::{RedisLink, Sealer};

/// A user's Databricks token, as cached.
#[derive(Debug)]
pub struct DbToken {
    pub token: SecretString,
    /// Databricks' own expiry, unix milliseconds.
    pub expires_at_ms: i64,
    /// When we stop using it: min(Databricks expiry, subject expiry) − margin, unix ms.
    pub use_until_ms: i64,
    pub source: TokenSourceKind,
}

#[derive(Debug, thiserror::Error, Clone)]
pub enum BrokerError {
    #[error("dependency unavailable: {0}")]
    Unavailable(&'static str),
    #[error("rate limited by the token endpoint")]
    RateLimited { retry_after: u64 },
    #[error("token endpoint rejected the exchange ({0})")]
    Rejected(String),
    #[error("the user must consent first")]
    ConsentRequired,
}

impl BrokerError {
    pub fn reason(&self) -> Reason {
        match self {
            BrokerError::Unavailable(_) => Reason::DependencyUnavailable,
            BrokerError::RateLimited { .. } => Reason::RateLimited,
            BrokerError::Rejected(_) => Reason::TokenExchangeRejected,
            BrokerError::ConsentRequired => Reason::ConsentRequired,
        }
    }

    pub fn retry_after(&self) -> Option<u64> {
        match self {
            BrokerError::Unavailable(_) => Some(1),
            BrokerError::RateLimited { retry_after } => Some(*retry_after),
            _ => None,
        }
    }
}

/// What a token source returns.
#[derive(Debug)]
pub struct Minted {
    pub token: SecretString,
    /// Seconds until Databricks' expiry.
    pub expires_in: u64,
}

/// Upper bound on the safety margin before expiry.
const MAX_MARGIN_MS: i64 = 60_000;

#[derive(Serialize, Deserialize)]
struct Stored {
    t: String,
    e: i64,
    u: i64,
    s: String,
}

struct UntilUse;

impl moka::Expiry<[u8; 32], Arc<DbToken>> for UntilUse {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        value: &Arc<DbToken>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(Duration::from_millis(
            value.use_until_ms.saturating_sub(now_ms()).max(0) as u64,
        ))
    }
}

pub struct Broker {
    l1: moka::future::Cache<[u8; 32], Arc<DbToken>>,
    redis: Arc<RedisLink>,
    sealer: Sealer,
    http: reqwest::Client,
    seen_epoch: AtomicU64,
    mints: AtomicU64,
    stats: Arc<stats::CacheStats>,
}

impl Broker {
    pub fn new(redis: Arc<RedisLink>, sealer: Sealer, http: reqwest::Client) -> Broker {
        Broker {
            l1: moka::future::Cache::builder()
                .max_capacity(200_000)
                .expire_after(UntilUse)
                .build(),
            redis,
            sealer,
            http,
            seen_epoch: AtomicU64::new(0),
            mints: AtomicU64::new(0),
            stats: Arc::new(stats::CacheStats::default()),
        }
    }

    pub fn redis(&self) -> &Arc<RedisLink> {
        &self.redis
    }

    /// Cache statistics per workspace (counts only), for the console.
    pub fn stats(&self) -> &Arc<stats::CacheStats> {
        &self.stats
    }

    /// Cached tokens held in this process (all workspaces).
    pub fn l1_entries(&self) -> u64 {
        self.l1.entry_count()
    }

    /// Mints performed by this process (for tests and the console).
    pub fn mint_count(&self) -> u64 {
        self.mints.load(Ordering::Relaxed)
    }

    /// The Redis key for a (workspace, user): the user name is hashed so it never appears in
    /// Redis key names.
    pub fn l2_key(workspace: &str, user: &str) -> String {
        let h = Sha256::digest(user.as_bytes());
        format!("aegis:v1:tok:{workspace}:{}", hex::encode(&h[..16]))
    }

    fn l1_key(workspace: &str, user: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(workspace.as_bytes());
        h.update([0u8]);
        h.update(user.as_bytes());
        h.finalize().into()
    }

    /// Drops the cached tokens of one user in one workspace (this process and Redis).
    pub async fn revoke(&self, workspace: &str, user: &str) -> Result<(), BrokerError> {
        self.l1.invalidate(&Self::l1_key(workspace, user)).await;
        self.redis
            .del(&[Self::l2_key(workspace, user)])
            .await
            .map_err(|_| BrokerError::Unavailable("redis"))?;
        self.stats.record(workspace, stats::Event::Revoked);
        Ok(())
    }

    pub async fn get(
        &self,
        ws: &WorkspaceConfig,
        identity: &Identity,
        subject_token: &str,
    ) -> Result<Arc<DbToken>, BrokerError> {
        if !self.redis.healthy() {
            return Err(BrokerError::Unavailable("redis"));
        }
        let epoch = self.redis.epoch();
        if self.seen_epoch.swap(epoch, Ordering::AcqRel) != epoch {
            // Redis was away: revocations may have been missed, so trust nothing cached here.
            self.l1.invalidate_all();
        }
        let key = Self::l1_key(&ws.name, &identity.user_name);
        if let Some(t) = self.l1.get(&key).await {
            if t.use_until_ms > now_ms() {
                metrics::counter!("aegis_token_cache_total", "tier" => "l1", "result" => "hit")
                    .increment(1);
                self.stats.record(&ws.name, stats::Event::L1Hit);
                return Ok(t);
            }
            self.l1.invalidate(&key).await;
        }
        metrics::counter!("aegis_token_cache_total", "tier" => "l1", "result" => "miss")
            .increment(1);
        let result = self
            .l1
            .try_get_with(key, self.load_or_mint(ws, identity, subject_token))
            .await;
        match result {
            Ok(t) if t.use_until_ms > now_ms() => Ok(t),
            Ok(_) => {
                self.l1.invalidate(&key).await;
                Err(BrokerError::Unavailable("token expired while minting"))
            }
            Err(e) => Err((*e).clone()),
        }
    }

    async fn load_or_mint(
        &self,
        ws: &WorkspaceConfig,
        identity: &Identity,
        subject_token: &str,
    ) -> Result<Arc<DbToken>, BrokerError> {
        let l2_key = Self::l2_key(&ws.name, &identity.user_name);
        match self.redis.get(&l2_key).await {
            Ok(Some(sealed)) => {
                if let Some(t) = self.open(&sealed, &l2_key) {
                    if t.use_until_ms > now_ms() {
                        metrics::counter!("aegis_token_cache_total", "tier" => "l2", "result" => "hit")
                            .increment(1);
                        self.stats.record(&ws.name, stats::Event::L2Hit);
                        return Ok(Arc::new(t));
                    }
                }
            }
            Ok(None) => {}
            Err(_) => return Err(BrokerError::Unavailable("redis")),
        }
        metrics::counter!("aegis_token_cache_total", "tier" => "l2", "result" => "miss")
            .increment(1);
        self.stats.record(&ws.name, stats::Event::Miss);

        let minted = match ws.token_source {
            TokenSourceKind::Federation => {
                federation::exchange(&self.http, ws, subject_token).await
            }
            TokenSourceKind::U2m => u2m::mint(ws, &identity.user_name).await,
            TokenSourceKind::EntraObo => entra::exchange(&self.http, ws, subject_token).await,
        };
        let outcome = match &minted {
            Ok(_) => "ok",
            Err(BrokerError::RateLimited { .. }) => "rate_limited",
            Err(BrokerError::Rejected(_)) => "rejected",
            Err(_) => "error",
        };
        metrics::counter!("aegis_mints_total", "source" => ws.token_source.as_str(), "outcome" => outcome)
            .increment(1);
        self.stats.record(
            &ws.name,
            if minted.is_ok() {
                stats::Event::Minted
            } else {
                stats::Event::MintFailed
            },
        );
        let minted = minted?;
        self.mints.fetch_add(1, Ordering::Relaxed);

        let now = now_ms();
        let db_exp = now.saturating_add((minted.expires_in as i64).saturating_mul(1000));
        let subject_exp = identity.expires_at.saturating_mul(1000);
        let hard_end = db_exp.min(subject_exp);
        let lifetime = hard_end - now;
        let margin = (lifetime / 5).clamp(0, MAX_MARGIN_MS);
        let token = DbToken {
            token: minted.token,
            expires_at_ms: db_exp,
            use_until_ms: hard_end - margin,
            source: ws.token_source,
        };
        if token.use_until_ms <= now {
            return Err(BrokerError::Rejected("token lifetime too short".into()));
        }
        if let Some(sealed) = self.seal(&token, &l2_key) {
            let ttl = Duration::from_millis((token.use_until_ms - now) as u64);
            // A failed L2 write only costs another replica a mint; the token is still good here.
            if let Err(e) = self.redis.set_px(&l2_key, &sealed, ttl).await {
                tracing::warn!(error = %e, "could not store token in redis");
            }
        }
        Ok(Arc::new(token))
    }

    fn seal(&self, t: &DbToken, aad: &str) -> Option<Vec<u8>> {
        let stored = Stored {
            t: t.token.expose().to_string(),
            e: t.expires_at_ms,
            u: t.use_until_ms,
            s: t.source.as_str().to_string(),
        };
        let mut plain = serde_json::to_vec(&stored).ok()?;
        let sealed = self.sealer.seal(&plain, aad.as_bytes());
        zeroize::Zeroize::zeroize(&mut plain);
        sealed
    }

    fn open(&self, sealed: &[u8], aad: &str) -> Option<DbToken> {
        let mut plain = self.sealer.open(sealed, aad.as_bytes())?;
        let stored: Option<Stored> = serde_json::from_slice(&plain).ok();
        zeroize::Zeroize::zeroize(&mut plain);
        let stored = stored?;
        let source = match stored.s.as_str() {
            "federation" => TokenSourceKind::Federation,
            "u2m" => TokenSourceKind::U2m,
            "entra_obo" => TokenSourceKind::EntraObo,
            _ => return None,
        };
        Some(DbToken {
            token: SecretString::new(stored.t),
            expires_at_ms: stored.e,
            use_until_ms: stored.u,
            source,
        })
    }
}

impl Tokens for Arc<Broker> {
    async fn token(
        &self,
        workspace: &WorkspaceConfig,
        identity: &Identity,
        subject_token: &str,
    ) -> Result<Arc<DbToken>, BrokerError> {
        self.get(workspace, identity, subject_token).await
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
