//! Per-user Databricks tokens: L1 (in-process) → L2 (Redis, encrypted) → mint.
//!
//! Everything is keyed by the verified principal (workspace, issuer, subject; see
//! [`principal`]), never by the user name alone, so a token minted for one principal is never
//! served to another that presents the same user name. Concurrent misses for one principal in
//! one process make one mint (the L1 cache's `try_get_with` coalesces them), and one mint
//! across replicas (a Redis lock). A revocation gives the principal a new generation: a mint
//! in flight meanwhile is discarded, never cached or served. A cached token is used only until
//! `min(Databricks expiry, subject token expiry) − margin`, so an expired token is never sent
//! upstream. If Redis is unreachable, every lookup fails closed (see [`redis`]).

pub mod entra;
pub mod federation;
pub mod principal;
pub mod seal;
pub mod stats;
pub mod u2m;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{TokenSourceKind, WorkspaceConfig};
use crate::identity::Identity;
use crate::redis::RedisLink;
use crate::secret::SecretString;
use seal::Sealer;

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
    /// The broker's revocation count when the lookup that found or minted this token began;
    /// a revocation of the principal after that means it is never served again.
    pub seq: u64,
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

pub use principal::REVOKE_PREFIX;

/// What one revocation reached.
#[derive(Debug, Default)]
pub struct Revoked {
    /// Principals (ids) whose cached tokens were dropped.
    pub principals: Vec<String>,
}

/// Revokes the cached tokens of principals that map to `user` in `workspace`: every such
/// principal, or only `narrow` = (issuer, subject). In one atomic step in Redis each gets a
/// fresh revocation generation (so a mint in flight anywhere is discarded, not cached) and loses
/// its L2 token; then every replica is told to drop its L1 copy.
pub async fn revoke_everywhere(
    redis: &RedisLink,
    workspace: &str,
    user: &str,
    narrow: Option<(&str, &str)>,
) -> Result<Revoked, crate::redis::RedisError> {
    let prefix = principal::name_prefix(workspace, user);
    let generation = {
        use rand::RngCore;
        let mut raw = [0u8; 16];
        rand::rng().fill_bytes(&mut raw);
        hex::encode(raw)
    };
    let ttl = principal::INDEX_TTL_MS.to_string();
    let narrowed = narrow.map(|(iss, sub)| principal::principal_id(iss, sub));
    let mut args: Vec<&[u8]> = vec![prefix.as_bytes(), ttl.as_bytes(), generation.as_bytes()];
    if let Some(pid) = &narrowed {
        args.push(pid.as_bytes());
    }
    let pids: Vec<String> = redis
        .script(&scripts().revoke, &[&principal::index_key(&prefix)], &args)
        .await?;
    for pid in &pids {
        let key = principal::l1_key(workspace, user, pid.as_bytes());
        redis
            .publish(&format!("{REVOKE_PREFIX}{}", hex::encode(key)))
            .await?;
    }
    Ok(Revoked { principals: pids })
}

struct Scripts {
    lookup: redis::Script,
    store: redis::Script,
    revoke: redis::Script,
    limit: redis::Script,
}

fn scripts() -> &'static Scripts {
    static SCRIPTS: std::sync::OnceLock<Scripts> = std::sync::OnceLock::new();
    SCRIPTS.get_or_init(|| Scripts {
        lookup: redis::Script::new(principal::LOOKUP_SCRIPT),
        store: redis::Script::new(principal::STORE_SCRIPT),
        revoke: redis::Script::new(principal::REVOKE_SCRIPT),
        limit: redis::Script::new(principal::LIMIT_SCRIPT),
    })
}

/// Upper bound on the safety margin before expiry.
const MAX_MARGIN_MS: i64 = 60_000;
/// How long a mint lock lives if its holder dies, beyond the token endpoint's own timeout.
const LOCK_LEASE_SLACK: Duration = Duration::from_secs(1);
/// How long a request waits for another replica's mint before giving up (503).
const LOCK_WAIT: Duration = Duration::from_millis(2500);
const LOCK_POLL: Duration = Duration::from_millis(20);
/// How long this process remembers that a principal was revoked: far longer than any lookup
/// (a Check's deadline, a refresh-ahead's token call), so a lookup that began before the
/// revocation can never outlive the mark.
const REVOKED_MEMORY: Duration = Duration::from_secs(600);

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

/// Why a lookup produced no token.
enum LookupError {
    Broker(BrokerError),
    /// A revocation came in while the lookup ran; its token was discarded.
    Revoked,
}

impl From<BrokerError> for LookupError {
    fn from(e: BrokerError) -> Self {
        LookupError::Broker(e)
    }
}

/// One principal's lookup: its keys and where it started in this process' revocation order.
struct Lookup<'a> {
    ws: &'a WorkspaceConfig,
    identity: &'a Identity,
    subject_token: &'a str,
    keys: principal::Keys,
    /// [`Broker::revocations`] when the lookup began.
    seq: u64,
}

/// The mint lock, released when dropped (also when a Check gives up mid-mint).
struct LockGuard {
    redis: Arc<RedisLink>,
    key: String,
    nonce: String,
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        let redis = self.redis.clone();
        let key = std::mem::take(&mut self.key);
        let nonce = std::mem::take(&mut self.nonce);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = redis.release(&key, &nonce).await {
                    // The lease frees it anyway.
                    tracing::debug!(error = %e, "could not release the mint lock");
                }
            });
        }
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
    u2m: Option<Arc<u2m::U2m>>,
    /// L1 keys with a refresh-ahead in flight.
    refreshing: std::sync::Mutex<std::collections::HashSet<[u8; 32]>>,
    stats: Arc<stats::CacheStats>,
    /// Revocations seen by this process, in order: each revocation event (and each loss of
    /// Redis) takes the next number. A token carries the number current when its lookup
    /// began, and is served only while no revocation of its key (nor a flush) came later.
    revocations: AtomicU64,
    /// L1 key → the number of its latest revocation.
    revoked: moka::sync::Cache<[u8; 32], u64>,
    /// The number of the latest flush of everything (Redis was away: events may be lost).
    flushed: AtomicU64,
    lock_lease: Duration,
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
            u2m: None,
            stats: Arc::new(stats::CacheStats::default()),
            revocations: AtomicU64::new(0),
            revoked: moka::sync::Cache::builder()
                .max_capacity(1_000_000)
                .time_to_live(REVOKED_MEMORY)
                .build(),
            flushed: AtomicU64::new(0),
            lock_lease: Duration::from_secs(3),
        }
    }

    /// Sizes the mint lock's lease to the token endpoint's timeout: a holder that dies frees
    /// the lock soon after its mint would have timed out, and a live mint never outlives it.
    pub fn with_mint_timeout(mut self, timeout: Duration) -> Broker {
        self.lock_lease = timeout + LOCK_LEASE_SLACK;
        self
    }

    /// The U2M grant store, when a workspace uses U2M.
    pub fn with_u2m(mut self, u2m: Option<Arc<u2m::U2m>>) -> Broker {
        self.u2m = u2m;
        self
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

    /// Drops the cached tokens of every principal that maps to `user` in one workspace (or
    /// only `narrow` = (issuer, subject)), here, in Redis and (through the events channel) on
    /// every other replica. A U2M workspace also discards the stored access token, so the next
    /// request refreshes and sends a different token upstream.
    pub async fn revoke(
        &self,
        workspace: &str,
        user: &str,
        narrow: Option<(&str, &str)>,
    ) -> Result<Revoked, BrokerError> {
        if let Some(u) = self.u2m.as_ref() {
            u.discard_access(workspace, user, narrow).await?;
        }
        let revoked = revoke_everywhere(&self.redis, workspace, user, narrow)
            .await
            .map_err(|_| BrokerError::Unavailable("redis"))?;
        for pid in &revoked.principals {
            self.mark_revoked(principal::l1_key(workspace, user, pid.as_bytes()));
        }
        self.stats.record(workspace, stats::Event::Revoked);
        Ok(revoked)
    }

    fn mark_revoked(&self, key: [u8; 32]) {
        let n = self.revocations.fetch_add(1, Ordering::AcqRel) + 1;
        self.revoked.insert(key, n);
        // The L1 copy goes too (memory); serving is guarded by the mark either way.
        let l1 = self.l1.clone();
        tokio::spawn(async move { l1.invalidate(&key).await });
    }

    fn flush_all(&self) {
        let n = self.revocations.fetch_add(1, Ordering::AcqRel) + 1;
        self.flushed.fetch_max(n, Ordering::AcqRel);
        self.l1.invalidate_all();
    }

    /// Whether a token found under `key` may be served: no revocation of the key, and no
    /// flush, since its lookup began.
    fn current(&self, key: &[u8; 32], t: &DbToken) -> bool {
        t.seq >= self.flushed.load(Ordering::Acquire)
            && self.revoked.get(key).is_none_or(|n| t.seq >= n)
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
                        self.mark_revoked(key);
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    // Some revocations were dropped locally: trust nothing cached.
                    self.flush_all();
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
            // Redis (or the events subscription) was away: revocations may have been missed,
            // so trust nothing cached here, nor any lookup that began before.
            self.flush_all();
        }
        if ws.rate_limits.any() {
            self.limit(ws, identity).await?;
        }
        let pid = principal::principal_hex(&identity.issuer, &identity.subject);
        let key = principal::l1_key(&ws.name, &identity.user_name, &pid);
        if let Some(t) = self.l1.get(&key).await {
            let now = now_ms();
            if t.use_until_ms > now && self.current(&key, &t) {
                metrics::counter!("aegis_token_cache_total", "tier" => "l1", "result" => "hit")
                    .increment(1);
                tracing::Span::current().record("cache", "l1");
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
        // A lookup that a revocation overtook is discarded and run once more: the second one
        // starts after the revocation, so what it finds or mints is the user's fresh token.
        for _ in 0..2 {
            let lookup = self.lookup(
                ws,
                identity,
                subject_token,
                String::from_utf8_lossy(&pid).into_owned(),
            );
            let result = self
                .l1
                .try_get_with(key, async {
                    match self.load_or_mint(&lookup, None).await {
                        Ok(t) => Ok(t),
                        Err(LookupError::Revoked) => Err(None),
                        Err(LookupError::Broker(e)) => Err(Some(e)),
                    }
                })
                .await;
            match result {
                Ok(t) if !self.current(&key, &t) => {
                    self.l1.invalidate(&key).await;
                    metrics::counter!("aegis_token_discarded_total", "why" => "revoked")
                        .increment(1);
                }
                Ok(t) if t.use_until_ms > now_ms() => return Ok(t),
                Ok(_) => {
                    self.l1.invalidate(&key).await;
                    return Err(BrokerError::Unavailable("token expired while minting"));
                }
                Err(e) => match (*e).clone() {
                    Some(e) => return Err(e),
                    None => metrics::counter!("aegis_token_discarded_total", "why" => "revoked")
                        .increment(1),
                },
            }
        }
        Err(BrokerError::Unavailable("revoked while minting"))
    }

    /// The workspace's request limits (GCRA in Redis, one round trip, shared by all replicas):
    /// per user name, per agent and per (user, agent). Over a limit: `RateLimited` with the
    /// seconds until the next request would conform. Lives here because the broker owns the
    /// Redis link every Check already depends on; a Redis failure denies, as for tokens.
    async fn limit(&self, ws: &WorkspaceConfig, identity: &Identity) -> Result<(), BrokerError> {
        let limits = &ws.rate_limits;
        let agent = identity.agent.as_deref().unwrap_or("");
        let tag = principal::name_prefix(&ws.name, "rate-limits");
        let mut keys: Vec<String> = Vec::with_capacity(3);
        let mut args: Vec<String> = Vec::with_capacity(6);
        for (rate, kind, id) in [
            (
                limits.user,
                "u",
                principal::limit_id(&[&identity.user_name]),
            ),
            (limits.agent, "a", principal::limit_id(&[agent])),
            (
                limits.user_agent,
                "ua",
                principal::limit_id(&[&identity.user_name, agent]),
            ),
        ] {
            let Some(rate) = rate else { continue };
            let interval = (rate.per.as_micros() as u64 / rate.requests).max(1);
            // A burst of a tenth of the limit (at least one request) on top of the rate.
            let burst = (rate.requests / 10).max(1);
            keys.push(format!("{tag}rl:{kind}:{id}"));
            args.push(interval.to_string());
            args.push((interval * (burst - 1)).to_string());
        }
        let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let arg_refs: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        let wait_us: i64 = self
            .redis
            .script(&scripts().limit, &key_refs, &arg_refs)
            .await
            .map_err(|_| BrokerError::Unavailable("redis"))?;
        if wait_us > 0 {
            metrics::counter!("aegis_rate_limited_total", "workspace" => ws.name.clone())
                .increment(1);
            return Err(BrokerError::RateLimited {
                retry_after: (wait_us as u64).div_ceil(1_000_000).max(1),
            });
        }
        Ok(())
    }

    fn lookup<'a>(
        &self,
        ws: &'a WorkspaceConfig,
        identity: &'a Identity,
        subject_token: &'a str,
        pid: String,
    ) -> Lookup<'a> {
        Lookup {
            ws,
            identity,
            subject_token,
            keys: principal::Keys {
                prefix: principal::name_prefix(&ws.name, &identity.user_name),
                pid,
            },
            seq: self.revocations.load(Ordering::Acquire),
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
            let pid = principal::principal_id(&identity.issuer, &identity.subject);
            let lookup = this.lookup(&ws, &identity, subject.expose(), pid);
            let fresh = this.load_or_mint(&lookup, Some(current_until)).await;
            let outcome = match fresh {
                // Inserted only while no revocation overtook it; `get` re-checks on every use.
                Ok(t) if t.use_until_ms > current_until && this.current(&key, &t) => {
                    this.l1.insert(key, t).await;
                    "ok"
                }
                Ok(_) => "unchanged",
                Err(LookupError::Revoked) => "revoked",
                Err(LookupError::Broker(_)) => "error",
            };
            metrics::counter!("aegis_token_refresh_ahead_total", "outcome" => outcome).increment(1);
            if let Ok(mut set) = this.refreshing.lock() {
                set.remove(&key);
            }
        });
    }

    /// Registers the principal under its user name and reads its L2 token and revocation
    /// generation (one round trip). The token is returned when usable now and, when
    /// `newer_than` is set, outliving it.
    async fn l2_read(
        &self,
        lookup: &Lookup<'_>,
        newer_than: Option<i64>,
    ) -> Result<(Option<DbToken>, String), BrokerError> {
        let ttl = principal::INDEX_TTL_MS.to_string();
        let (tok, gen): (Option<Vec<u8>>, Option<String>) = self
            .redis
            .script(
                &scripts().lookup,
                &[&lookup.keys.tok(), &lookup.keys.gen(), &lookup.keys.index()],
                &[lookup.keys.pid.as_bytes(), ttl.as_bytes()],
            )
            .await
            .map_err(|_| BrokerError::Unavailable("redis"))?;
        let token = tok.and_then(|sealed| {
            self.open(&sealed, &lookup.keys.tok(), lookup.seq)
                .filter(|t| t.use_until_ms > newer_than.unwrap_or(0).max(now_ms()))
        });
        Ok((token, gen.unwrap_or_default()))
    }

    /// L2, else mint under a cross-replica lock (reload after taking it), so N replicas with M
    /// concurrent requests each make exactly one mint per principal.
    async fn load_or_mint(
        &self,
        lookup: &Lookup<'_>,
        newer_than: Option<i64>,
    ) -> Result<Arc<DbToken>, LookupError> {
        let ws = lookup.ws;
        if let (Some(t), _) = self.l2_read(lookup, newer_than).await? {
            metrics::counter!("aegis_token_cache_total", "tier" => "l2", "result" => "hit")
                .increment(1);
            tracing::Span::current().record("cache", "l2");
            self.stats.record(&ws.name, stats::Event::L2Hit);
            return Ok(Arc::new(t));
        }
        metrics::counter!("aegis_token_cache_total", "tier" => "l2", "result" => "miss")
            .increment(1);

        let lock_key = lookup.keys.lock();
        let nonce = {
            use rand::RngCore;
            let mut raw = [0u8; 16];
            rand::rng().fill_bytes(&mut raw);
            hex::encode(raw)
        };
        let started = std::time::Instant::now();
        loop {
            match self
                .redis
                .set_nx_px(&lock_key, &nonce, self.lock_lease)
                .await
            {
                Ok(true) => break,
                Ok(false) => {
                    if started.elapsed() > LOCK_WAIT {
                        return Err(BrokerError::Unavailable("another replica is minting").into());
                    }
                    tokio::time::sleep(LOCK_POLL).await;
                    if let (Some(t), _) = self.l2_read(lookup, newer_than).await? {
                        self.stats.record(&ws.name, stats::Event::L2Hit);
                        return Ok(Arc::new(t));
                    }
                }
                Err(_) => return Err(BrokerError::Unavailable("redis").into()),
            }
        }
        let _lock = LockGuard {
            redis: self.redis.clone(),
            key: lock_key,
            nonce,
        };
        // Reload after lock: the previous holder may have stored a token since our first read.
        // The generation read here is the one the minted token must still find when stored.
        match self.l2_read(lookup, newer_than).await? {
            (Some(t), _) => {
                self.stats.record(&ws.name, stats::Event::L2Hit);
                Ok(Arc::new(t))
            }
            (None, generation) => self.mint_and_store(lookup, &generation).await,
        }
    }

    async fn mint_and_store(
        &self,
        lookup: &Lookup<'_>,
        generation: &str,
    ) -> Result<Arc<DbToken>, LookupError> {
        let (ws, identity) = (lookup.ws, lookup.identity);
        self.stats.record(&ws.name, stats::Event::Miss);
        let minted = match ws.token_source {
            TokenSourceKind::Federation => {
                federation::exchange(&self.http, ws, lookup.subject_token).await
            }
            TokenSourceKind::U2m => match self.u2m.as_ref() {
                Some(u) => u.access_token(ws, identity).await,
                // A process without the U2M store denies U2M workspaces.
                None => Err(BrokerError::Unavailable("u2m store")),
            },
            TokenSourceKind::EntraObo => {
                entra::exchange(&self.http, ws, lookup.subject_token).await
            }
        };
        let outcome = match &minted {
            Ok(_) => "ok",
            Err(BrokerError::RateLimited { .. }) => "rate_limited",
            Err(BrokerError::Rejected(_)) => "rejected",
            Err(_) => "error",
        };
        tracing::Span::current().record("cache", "mint");
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
            seq: lookup.seq,
        };
        if token.use_until_ms <= now {
            return Err(BrokerError::Rejected("token lifetime too short".into()).into());
        }
        // Stored only if no revocation came in since the generation was read (before the
        // mint). A token that cannot be proven unrevoked is not used, here or anywhere.
        let tok_key = lookup.keys.tok();
        let sealed = self
            .seal(&token, &tok_key)
            .ok_or(BrokerError::Unavailable("seal"))?;
        let ttl = ((token.use_until_ms - now) as u64).max(1).to_string();
        let stored: i64 = self
            .redis
            .script(
                &scripts().store,
                &[&tok_key, &lookup.keys.gen()],
                &[generation.as_bytes(), &sealed, ttl.as_bytes()],
            )
            .await
            .map_err(|_| BrokerError::Unavailable("redis"))?;
        if stored != 1 {
            tracing::info!(workspace = %ws.name, "a revocation overtook a mint; its token is discarded");
            return Err(LookupError::Revoked);
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

    /// Opens an L2 value sealed under `aad` (its key name, so a value copied to another
    /// principal's key does not open); `seq` is the lookup's place in the revocation order.
    fn open(&self, sealed: &[u8], aad: &str, seq: u64) -> Option<DbToken> {
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
            seq,
        })
    }
}

pub use crate::clock::unix_ms as now_ms;
