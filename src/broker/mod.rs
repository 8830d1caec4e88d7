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
use std::time::Duration;

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
    /// After this, a request that uses the token also starts a background refresh, so active
    /// users rarely wait for a mint.
    pub refresh_at_ms: i64,
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

/// Prefix of a revocation event: `revoke:<hex of the L1 key>`.
pub const REVOKE_PREFIX: &str = "revoke:";

/// Deletes a user's cached token in Redis and tells every replica to drop its L1 copy.
pub async fn revoke_everywhere(
    redis: &RedisLink,
    workspace: &str,
    user: &str,
) -> Result<(), redis::RedisError> {
    redis.del(&[Broker::l2_key(workspace, user)]).await?;
    let key = Broker::l1_key(workspace, user);
    redis
        .publish(&format!("{REVOKE_PREFIX}{}", hex::encode(key)))
        .await?;
    Ok(())
}

/// Upper bound on the safety margin before expiry.
const MAX_MARGIN_MS: i64 = 60_000;
/// How long a mint lock lives if its holder dies (mints time out well before this).
const LOCK_LEASE: Duration = Duration::from_secs(3);
/// How long a request waits for another replica's mint before giving up (503).
const LOCK_WAIT: Duration = Duration::from_millis(2500);
const LOCK_POLL: Duration = Duration::from_millis(20);

/// [`Stored`], borrowed, for sealing.
#[derive(Serialize)]
struct StoredRef<'a> {
    t: &'a str,
    e: i64,
    u: i64,
    r: i64,
    s: &'a str,
}

/// A cached token as sealed into Redis.
#[derive(Deserialize)]
struct Stored {
    t: String,
    e: i64,
    u: i64,
    r: i64,
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
    /// The U2M grant store, when a workspace uses `u2m`.
    u2m: std::sync::OnceLock<Arc<u2m::U2m>>,
    /// L1 keys with a refresh-ahead in flight.
    refreshing: std::sync::Mutex<std::collections::HashSet<[u8; 32]>>,
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
            refreshing: std::sync::Mutex::new(std::collections::HashSet::new()),
            u2m: std::sync::OnceLock::new(),
            stats: Arc::new(stats::CacheStats::default()),
        }
    }

    /// Gives the broker the U2M grant store (once, at start).
    pub fn set_u2m(&self, u2m: Arc<u2m::U2m>) -> bool {
        self.u2m.set(u2m).is_ok()
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

    /// Drops the cached tokens of one user in one workspace, here, in Redis and (through the
    /// events channel) on every other replica.
    pub async fn revoke(&self, workspace: &str, user: &str) -> Result<(), BrokerError> {
        let key = Self::l1_key(workspace, user);
        self.l1.invalidate(&key).await;
        revoke_everywhere(&self.redis, workspace, user)
            .await
            .map_err(|_| BrokerError::Unavailable("redis"))?;
        self.stats.record(workspace, stats::Event::Revoked);
        Ok(())
    }

    /// Applies revocations published by any replica (or `aegis token revoke`) to this L1.
    pub async fn follow_revocations(self: Arc<Self>) {
        let mut events = self.redis.events();
        loop {
            match events.recv().await {
                Ok(msg) => {
                    if let Some(key) = msg
                        .strip_prefix(REVOKE_PREFIX)
                        .and_then(|h| hex::decode(h).ok())
                        .and_then(|k| <[u8; 32]>::try_from(k).ok())
                    {
                        self.l1.invalidate(&key).await;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    // Some revocations were dropped locally: trust nothing cached.
                    self.l1.invalidate_all();
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    pub async fn get(
        self: &Arc<Self>,
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
            let now = now_ms();
            if t.use_until_ms > now {
                metrics::counter!("aegis_token_cache_total", "tier" => "l1", "result" => "hit")
                    .increment(1);
                self.stats.record(&ws.name, stats::Event::L1Hit);
                if now >= t.refresh_at_ms {
                    self.refresh_ahead(key, ws, identity, subject_token, t.use_until_ms);
                }
                return Ok(t);
            }
            self.l1.invalidate(&key).await;
        }
        metrics::counter!("aegis_token_cache_total", "tier" => "l1", "result" => "miss")
            .increment(1);
        let result = self
            .l1
            .try_get_with(key, self.load_or_mint(ws, identity, subject_token, None))
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

    /// Mints a successor in the background while the current token is still good.
    fn refresh_ahead(
        self: &Arc<Self>,
        key: [u8; 32],
        ws: &WorkspaceConfig,
        identity: &Identity,
        subject_token: &str,
        current_until: i64,
    ) {
        match self.refreshing.lock() {
            Ok(mut set) => {
                if !set.insert(key) {
                    return;
                }
            }
            Err(_) => return,
        }
        let this = self.clone();
        let ws = ws.clone();
        let identity = identity.clone();
        let subject = SecretString::new(subject_token.to_string());
        tokio::spawn(async move {
            let fresh = this
                .load_or_mint(&ws, &identity, subject.expose(), Some(current_until))
                .await;
            let outcome = match fresh {
                Ok(t) if t.use_until_ms > current_until => {
                    this.l1.insert(key, t).await;
                    "ok"
                }
                Ok(_) => "unchanged",
                Err(_) => "error",
            };
            metrics::counter!("aegis_token_refresh_ahead_total", "outcome" => outcome).increment(1);
            if let Ok(mut set) = this.refreshing.lock() {
                set.remove(&key);
            }
        });
    }

    /// A token from L2 that is usable now and, when `newer_than` is set, outlives it.
    async fn l2_fresh(
        &self,
        l2_key: &str,
        newer_than: Option<i64>,
    ) -> Result<Option<DbToken>, BrokerError> {
        match self.redis.get(l2_key).await {
            Ok(Some(sealed)) => Ok(self
                .open(&sealed, l2_key)
                .filter(|t| t.use_until_ms > newer_than.unwrap_or(0).max(now_ms()))),
            Ok(None) => Ok(None),
            Err(_) => Err(BrokerError::Unavailable("redis")),
        }
    }

    /// L2, else mint under a cross-replica lock (reload after taking it), so N replicas with M
    /// concurrent requests each make exactly one mint per user.
    async fn load_or_mint(
        &self,
        ws: &WorkspaceConfig,
        identity: &Identity,
        subject_token: &str,
        newer_than: Option<i64>,
    ) -> Result<Arc<DbToken>, BrokerError> {
        let l2_key = Self::l2_key(&ws.name, &identity.user_name);
        if let Some(t) = self.l2_fresh(&l2_key, newer_than).await? {
            metrics::counter!("aegis_token_cache_total", "tier" => "l2", "result" => "hit")
                .increment(1);
            self.stats.record(&ws.name, stats::Event::L2Hit);
            return Ok(Arc::new(t));
        }
        metrics::counter!("aegis_token_cache_total", "tier" => "l2", "result" => "miss")
            .increment(1);

        let lock_key = l2_key.replacen(":tok:", ":lock:", 1);
        let nonce = {
            use rand::RngCore;
            let mut raw = [0u8; 16];
            rand::rng().fill_bytes(&mut raw);
            hex::encode(raw)
        };
        let started = std::time::Instant::now();
        loop {
            match self.redis.set_nx_px(&lock_key, &nonce, LOCK_LEASE).await {
                Ok(true) => break,
                Ok(false) => {
                    if started.elapsed() > LOCK_WAIT {
                        return Err(BrokerError::Unavailable("another replica is minting"));
                    }
                    tokio::time::sleep(LOCK_POLL).await;
                    if let Some(t) = self.l2_fresh(&l2_key, newer_than).await? {
                        self.stats.record(&ws.name, stats::Event::L2Hit);
                        return Ok(Arc::new(t));
                    }
                }
                Err(_) => return Err(BrokerError::Unavailable("redis")),
            }
        }
        // Reload after lock: the previous holder may have stored a token since our first read.
        let result = match self.l2_fresh(&l2_key, newer_than).await {
            Ok(Some(t)) => {
                self.stats.record(&ws.name, stats::Event::L2Hit);
                Ok(Arc::new(t))
            }
            Ok(None) => {
                self.mint_and_store(ws, identity, subject_token, &l2_key)
                    .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = self.redis.release(&lock_key, &nonce).await {
            // The lease frees it anyway.
            tracing::debug!(error = %e, "could not release the mint lock");
        }
        result
    }

    async fn mint_and_store(
        &self,
        ws: &WorkspaceConfig,
        identity: &Identity,
        subject_token: &str,
        l2_key: &str,
    ) -> Result<Arc<DbToken>, BrokerError> {
        self.stats.record(&ws.name, stats::Event::Miss);
        let minted = match ws.token_source {
            TokenSourceKind::Federation => {
                federation::exchange(&self.http, ws, subject_token).await
            }
            TokenSourceKind::U2m => match self.u2m.get() {
                Some(u) => u.access_token(ws, &identity.user_name).await,
                // A process without the U2M store denies U2M workspaces.
                None => Err(BrokerError::Unavailable("u2m store")),
            },
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
        let use_until_ms = hard_end - margin;
        let token = DbToken {
            token: minted.token,
            expires_at_ms: db_exp,
            use_until_ms,
            refresh_at_ms: now + (use_until_ms - now) * 3 / 4,
            source: ws.token_source,
        };
        if token.use_until_ms <= now {
            return Err(BrokerError::Rejected("token lifetime too short".into()));
        }
        if let Some(sealed) = self.seal(&token, l2_key) {
            let ttl = Duration::from_millis((token.use_until_ms - now) as u64);
            // A failed L2 write only costs another replica a mint; the token is still good here.
            if let Err(e) = self.redis.set_px(l2_key, &sealed, ttl).await {
                tracing::warn!(error = %e, "could not store token in redis");
            }
        }
        Ok(Arc::new(token))
    }

    fn seal(&self, t: &DbToken, aad: &str) -> Option<Vec<u8>> {
        // Borrowed, so no unwiped copy of the token is left behind; only `plain` holds one.
        let stored = StoredRef {
            t: t.token.expose(),
            e: t.expires_at_ms,
            u: t.use_until_ms,
            r: t.refresh_at_ms,
            s: t.source.as_str(),
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
            refresh_at_ms: stored.r,
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

pub use crate::clock::unix_ms as now_ms;
