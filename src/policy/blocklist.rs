//! The agent blocklist: agents an operator blocked from the console.
//!
//! The list lives durably in PostgreSQL (`aegis_agent_blocks`; every change is also an `ADMIN`
//! row in the audit chain, written by the console) and in memory here; the pipeline only ever
//! reads the in-memory copy (a read lock and a hash lookup, no allocation, no I/O). Redis only
//! fans changes out: a `block:`/`unblock:` event makes every replica apply a block at once and
//! re-read the durable list. [`AgentBlocklist::keep_fresh`] also re-reads it every
//! [`REFRESH_EVERY`]. A missing or flushed Redis therefore never unblocks anyone.
//!
//! A blocklist that could not read the durable list reports [`AgentBlocklist::loaded`] false,
//! at start and after any failed read, and the pipeline denies (`dependency_unavailable`) until
//! a read succeeds: an agent blocked before a restart is never let through by a replica that
//! cannot tell.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio_postgres::Client;

use crate::pg::PgTarget;
use crate::redis::RedisLink;

/// The Redis set where blocks lived before they were durable (read once at start and copied
/// into PostgreSQL, so an upgrade loses no block).
pub const LEGACY_REDIS_KEY: &str = "aegis:v1:blocked_agents";

/// Prefixes of the events that fan a change out to every replica.
pub const BLOCK_EVENT: &str = "block:";
pub const UNBLOCK_EVENT: &str = "unblock:";

/// How often each replica re-reads the durable list.
pub const REFRESH_EVERY: Duration = Duration::from_millis(500);

/// Longest agent name the console accepts.
pub const MAX_AGENT_LEN: usize = 256;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the durable list could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("postgres is unavailable: {0}")]
    Postgres(#[from] crate::pg::PgError),
    #[error("the change was stored but could not be fanned out through redis")]
    Redis,
}

/// The durable list in PostgreSQL, on a connection of its own.
pub struct BlockStore {
    target: PgTarget,
    conn: tokio::sync::Mutex<Option<Client>>,
}

// === impl BlockStore ===

impl BlockStore {
    pub fn new(target: PgTarget) -> BlockStore {
        BlockStore {
            target,
            conn: tokio::sync::Mutex::new(None),
        }
    }

    /// Runs `f` on the store's connection, (re)connecting first if needed; a failed statement
    /// drops the connection so the next call starts afresh.
    async fn with<T>(
        &self,
        f: impl for<'c> FnOnce(
            &'c Client,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<T, tokio_postgres::Error>> + Send + 'c>,
        >,
    ) -> Result<T, BlockError> {
        let mut guard = self.conn.lock().await;
        if guard.as_ref().is_none_or(|c| c.is_closed()) {
            let c = self
                .target
                .connect(CONNECT_TIMEOUT, "aegis-blocklist")
                .await?;
            *guard = Some(c);
        }
        let Some(client) = guard.as_ref() else {
            return Err(BlockError::Postgres(crate::pg::PgError::NotConnected));
        };
        match tokio::time::timeout(STATEMENT_TIMEOUT, f(client)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                *guard = None;
                Err(BlockError::Postgres(e.into()))
            }
            Err(_) => {
                *guard = None;
                Err(BlockError::Postgres(crate::pg::PgError::State("timed out")))
            }
        }
    }

    /// Every blocked agent.
    pub async fn read_all(&self) -> Result<HashSet<String>, BlockError> {
        self.with(|c| {
            Box::pin(async move {
                let rows = c.query("SELECT agent FROM aegis_agent_blocks", &[]).await?;
                Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
            })
        })
        .await
    }

    /// Blocks `agent` (idempotent).
    pub async fn block(&self, agent: &str, by: &str) -> Result<(), BlockError> {
        let (agent, by) = (agent.to_string(), by.to_string());
        self.with(move |c| {
            Box::pin(async move {
                c.execute(
                    "INSERT INTO aegis_agent_blocks (agent, blocked_by) VALUES ($1, $2) \
                     ON CONFLICT (agent) DO NOTHING",
                    &[&agent, &by],
                )
                .await
                .map(|_| ())
            })
        })
        .await
    }

    /// Lifts a block (idempotent).
    pub async fn unblock(&self, agent: &str) -> Result<(), BlockError> {
        let agent = agent.to_string();
        self.with(move |c| {
            Box::pin(async move {
                c.execute("DELETE FROM aegis_agent_blocks WHERE agent = $1", &[&agent])
                    .await
                    .map(|_| ())
            })
        })
        .await
    }
}

pub struct AgentBlocklist {
    agents: RwLock<Arc<HashSet<String>>>,
    /// The last read of the durable list succeeded (the pipeline denies otherwise).
    loaded: AtomicBool,
    /// Some read ever succeeded (readiness: a replica starts serving only once it could tell).
    ever_loaded: AtomicBool,
}

// === impl AgentBlocklist ===

impl AgentBlocklist {
    /// An empty list that needs no loading (for a pipeline without stores, e.g. unit tests).
    pub fn empty() -> AgentBlocklist {
        AgentBlocklist {
            agents: RwLock::new(Arc::new(HashSet::new())),
            loaded: AtomicBool::new(true),
            ever_loaded: AtomicBool::new(true),
        }
    }

    /// A list that is not usable until its first read of the durable list.
    pub fn unloaded() -> AgentBlocklist {
        AgentBlocklist {
            agents: RwLock::new(Arc::new(HashSet::new())),
            loaded: AtomicBool::new(false),
            ever_loaded: AtomicBool::new(false),
        }
    }

    /// The list is current: its last read succeeded.
    pub fn loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// Some read of the list ever succeeded.
    pub fn ever_loaded(&self) -> bool {
        self.ever_loaded.load(Ordering::Acquire)
    }

    /// True when `agent` is blocked. A poisoned lock counts as blocked (fail closed).
    pub fn contains(&self, agent: &str) -> bool {
        match self.agents.read() {
            Ok(set) => set.contains(agent),
            Err(_) => true,
        }
    }

    /// The blocked agents, sorted.
    pub fn snapshot(&self) -> Vec<String> {
        let mut out: Vec<String> = match self.agents.read() {
            Ok(set) => set.iter().cloned().collect(),
            Err(_) => Vec::new(),
        };
        out.sort();
        out
    }

    fn replace(&self, set: HashSet<String>) {
        if let Ok(mut g) = self.agents.write() {
            *g = Arc::new(set);
        }
        self.loaded.store(true, Ordering::Release);
        self.ever_loaded.store(true, Ordering::Release);
    }

    fn edit(&self, f: impl FnOnce(&mut HashSet<String>)) {
        if let Ok(mut g) = self.agents.write() {
            let mut set = HashSet::clone(&g);
            f(&mut set);
            *g = Arc::new(set);
        }
    }

    /// Re-reads the durable list; a failed read makes the list unusable until the next good
    /// one (the pipeline denies meanwhile).
    pub async fn refresh(&self, store: &BlockStore) -> Result<usize, BlockError> {
        match store.read_all().await {
            Ok(set) => {
                let n = set.len();
                self.replace(set);
                Ok(n)
            }
            Err(e) => {
                self.loaded.store(false, Ordering::Release);
                Err(e)
            }
        }
    }

    /// Blocks an agent: durably first, here at once, then on every replica through Redis.
    pub async fn block(
        &self,
        store: &BlockStore,
        redis: &RedisLink,
        agent: &str,
        by: &str,
    ) -> Result<(), BlockError> {
        store.block(agent, by).await?;
        self.edit(|s| {
            s.insert(agent.to_string());
        });
        // Replicas that miss the event still see the block at their next read.
        redis
            .publish(&format!("{BLOCK_EVENT}{agent}"))
            .await
            .map_err(|_| BlockError::Redis)?;
        Ok(())
    }

    /// Lifts a block durably, here, and on every replica.
    pub async fn unblock(
        &self,
        store: &BlockStore,
        redis: &RedisLink,
        agent: &str,
    ) -> Result<(), BlockError> {
        store.unblock(agent).await?;
        self.edit(|s| {
            s.remove(agent);
        });
        redis
            .publish(&format!("{UNBLOCK_EVENT}{agent}"))
            .await
            .map_err(|_| BlockError::Redis)?;
        Ok(())
    }

    /// Copies blocks from the pre-durable Redis set into PostgreSQL (once, at start), so an
    /// upgrade loses none. Redis being unreachable only delays it to the next start.
    async fn import_legacy(store: &BlockStore, redis: &RedisLink) {
        let mut cmd = redis::cmd("SMEMBERS");
        cmd.arg(LEGACY_REDIS_KEY);
        let Ok(members) = redis.run::<Vec<String>>(cmd).await else {
            return;
        };
        for agent in members.iter().filter(|a| valid_agent_name(a)) {
            if let Err(e) = store.block(agent, "imported from redis").await {
                tracing::warn!(error = %e, "could not import a legacy agent block");
                return;
            }
        }
        if !members.is_empty() {
            tracing::info!(n = members.len(), "imported legacy agent blocks from redis");
        }
    }

    /// Re-reads the durable list every [`REFRESH_EVERY`] and whenever a change event arrives,
    /// forever; a block event is applied at once.
    pub async fn keep_fresh(self: Arc<Self>, store: Arc<BlockStore>, redis: Arc<RedisLink>) {
        let mut events = redis.events();
        let mut tick = tokio::time::interval(REFRESH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        let mut imported = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                ev = events.recv() => match ev {
                    Ok(msg) => {
                        if let Some(agent) = msg.strip_prefix(BLOCK_EVENT) {
                            self.edit(|s| {
                                s.insert(agent.to_string());
                            });
                        } else if !msg.starts_with(UNBLOCK_EVENT) {
                            continue;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        events = redis.events();
                    }
                }
            }
            if !imported && redis.healthy() {
                Self::import_legacy(&store, &redis).await;
                imported = true;
            }
            match self.refresh(&store).await {
                Ok(_) => failing = false,
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "could not read the agent blocklist; denying until it can");
                    }
                    failing = true;
                }
            }
        }
    }
}

/// Checks an agent name an operator typed: 1 to [`MAX_AGENT_LEN`] bytes, no control characters.
pub fn valid_agent_name(agent: &str) -> bool {
    !agent.is_empty() && agent.len() <= MAX_AGENT_LEN && !agent.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contains_follows_edits() {
        let list = AgentBlocklist::unloaded();
        assert!(!list.loaded());
        list.replace(["joule".to_string()].into_iter().collect());
        assert!(list.loaded());
        assert!(list.contains("joule"));
        assert!(!list.contains("copilot"));
        list.edit(|s| {
            s.insert("copilot".into());
        });
        assert_eq!(list.snapshot(), vec!["copilot", "joule"]);
        list.edit(|s| {
            s.remove("joule");
        });
        assert!(!list.contains("joule"));
    }

    #[test]
    fn agent_names_are_bounded() {
        assert!(valid_agent_name("copilot"));
        assert!(!valid_agent_name(""));
        assert!(!valid_agent_name("a\nb"));
        assert!(!valid_agent_name(&"x".repeat(MAX_AGENT_LEN + 1)));
    }
}
