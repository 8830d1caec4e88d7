//! The agent blocklist: agents an operator blocked from the console.
//!
//! The set lives in Redis (one Redis set, shared by every replica) and in memory here; the
//! pipeline only ever reads the in-memory copy (a read lock and a hash lookup, no allocation, no
//! I/O). [`AgentBlocklist::keep_fresh`] re-reads Redis every [`REFRESH_EVERY`], so a block made
//! on one replica reaches every other within about a second. A blocklist backed by Redis
//! reports [`AgentBlocklist::loaded`] false until its first successful read, and the pipeline
//! denies (`dependency_unavailable`) until then: an agent blocked before a restart is never let
//! through by a replica that has not read the list yet.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::broker::redis::{RedisError, RedisLink};

/// The Redis set holding blocked agent names.
pub const REDIS_KEY: &str = "aegis:v1:blocked_agents";

/// How often each replica re-reads the set.
pub const REFRESH_EVERY: Duration = Duration::from_millis(500);

/// Longest agent name the console accepts.
pub const MAX_AGENT_LEN: usize = 256;

pub struct AgentBlocklist {
    agents: RwLock<Arc<HashSet<String>>>,
    loaded: AtomicBool,
}

// === impl AgentBlocklist ===

impl AgentBlocklist {
    /// An empty list that needs no loading (for a pipeline without Redis, e.g. unit tests).
    pub fn empty() -> AgentBlocklist {
        AgentBlocklist {
            agents: RwLock::new(Arc::new(HashSet::new())),
            loaded: AtomicBool::new(true),
        }
    }

    /// A list that is not usable until its first read from Redis.
    pub fn unloaded() -> AgentBlocklist {
        AgentBlocklist {
            agents: RwLock::new(Arc::new(HashSet::new())),
            loaded: AtomicBool::new(false),
        }
    }

    pub fn loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
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
    }

    fn edit(&self, f: impl FnOnce(&mut HashSet<String>)) {
        if let Ok(mut g) = self.agents.write() {
            let mut set = HashSet::clone(&g);
            f(&mut set);
            *g = Arc::new(set);
        }
    }

    /// Re-reads the set from Redis.
    pub async fn refresh(&self, redis: &RedisLink) -> Result<usize, RedisError> {
        let mut cmd = redis::cmd("SMEMBERS");
        cmd.arg(REDIS_KEY);
        let members: Vec<String> = redis.run(cmd).await?;
        let n = members.len();
        self.replace(members.into_iter().collect());
        Ok(n)
    }

    /// Blocks an agent on every replica (Redis first, then here at once).
    pub async fn block(&self, redis: &RedisLink, agent: &str) -> Result<(), RedisError> {
        let mut cmd = redis::cmd("SADD");
        cmd.arg(REDIS_KEY).arg(agent);
        let _: i64 = redis.run(cmd).await?;
        self.edit(|s| {
            s.insert(agent.to_string());
        });
        Ok(())
    }

    /// Lifts a block on every replica.
    pub async fn unblock(&self, redis: &RedisLink, agent: &str) -> Result<(), RedisError> {
        let mut cmd = redis::cmd("SREM");
        cmd.arg(REDIS_KEY).arg(agent);
        let _: i64 = redis.run(cmd).await?;
        self.edit(|s| {
            s.remove(agent);
        });
        Ok(())
    }

    /// Re-reads the set every [`REFRESH_EVERY`], forever. A failed read keeps the last list;
    /// while Redis is unreachable every Check is denied anyway.
    pub async fn keep_fresh(self: Arc<Self>, redis: Arc<RedisLink>) {
        let mut tick = tokio::time::interval(REFRESH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tick.tick().await;
            match self.refresh(&redis).await {
                Ok(_) => failing = false,
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "could not re-read the agent blocklist");
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
