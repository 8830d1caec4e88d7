//! Token cache statistics per workspace, for the operator console: counts only, never a token.
//!
//! Recording is a read lock, a map lookup by `&str` and a relaxed atomic add; the map only
//! takes its write lock the first time a workspace is seen.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;

/// Mints older than this no longer count towards the rate.
const RATE_WINDOW: Duration = Duration::from_secs(60);
/// Bound on remembered mint times per workspace.
const MAX_RECENT_MINTS: usize = 10_000;

#[derive(Default)]
struct Counters {
    l1_hits: AtomicU64,
    l2_hits: AtomicU64,
    misses: AtomicU64,
    mints: AtomicU64,
    mint_failures: AtomicU64,
    revocations: AtomicU64,
    recent_mints: Mutex<VecDeque<Instant>>,
}

/// One workspace's numbers, as of now.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct WorkspaceCacheStats {
    pub workspace: String,
    pub l1_hits: u64,
    pub l2_hits: u64,
    /// Lookups that found nothing cached and went to the token endpoint.
    pub misses: u64,
    pub mints: u64,
    pub mint_failures: u64,
    pub revocations: u64,
    /// (L1 + L2 hits) / lookups, or `None` before the first lookup.
    pub hit_ratio: Option<f64>,
    /// Successful mints in the last minute.
    pub mints_last_minute: u64,
}

#[derive(Default)]
pub struct CacheStats {
    by_workspace: RwLock<HashMap<String, Arc<Counters>>>,
}

/// What happened to one lookup or mint.
#[derive(Debug, Clone, Copy)]
pub enum Event {
    L1Hit,
    L2Hit,
    Miss,
    Minted,
    MintFailed,
    Revoked,
}

// === impl CacheStats ===

impl CacheStats {
    fn counters(&self, workspace: &str) -> Option<Arc<Counters>> {
        if let Ok(map) = self.by_workspace.read() {
            if let Some(c) = map.get(workspace) {
                return Some(c.clone());
            }
        }
        let mut map = self.by_workspace.write().ok()?;
        Some(map.entry(workspace.to_string()).or_default().clone())
    }

    pub fn record(&self, workspace: &str, event: Event) {
        let Some(c) = self.counters(workspace) else {
            return;
        };
        let counter = match event {
            Event::L1Hit => &c.l1_hits,
            Event::L2Hit => &c.l2_hits,
            Event::Miss => &c.misses,
            Event::Minted => &c.mints,
            Event::MintFailed => &c.mint_failures,
            Event::Revoked => &c.revocations,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if matches!(event, Event::Minted) {
            if let Ok(mut recent) = c.recent_mints.lock() {
                let now = Instant::now();
                prune(&mut recent, now);
                if recent.len() >= MAX_RECENT_MINTS {
                    recent.pop_front();
                }
                recent.push_back(now);
            }
        }
    }

    /// Every workspace seen so far plus `known` (so configured but idle ones show too), sorted.
    pub fn snapshot(&self, known: &[&str]) -> Vec<WorkspaceCacheStats> {
        let now = Instant::now();
        let mut out: Vec<WorkspaceCacheStats> = Vec::new();
        let map = match self.by_workspace.read() {
            Ok(m) => m,
            Err(_) => return out,
        };
        let mut names: Vec<&str> = map.keys().map(String::as_str).collect();
        for k in known {
            if !names.contains(k) {
                names.push(k);
            }
        }
        names.sort_unstable();
        for name in names {
            let empty = Counters::default();
            let c = map.get(name).map(Arc::as_ref).unwrap_or(&empty);
            let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
            let (l1, l2, miss) = (get(&c.l1_hits), get(&c.l2_hits), get(&c.misses));
            let lookups = l1 + l2 + miss;
            let recent = match c.recent_mints.lock() {
                Ok(mut r) => {
                    prune(&mut r, now);
                    r.len() as u64
                }
                Err(_) => 0,
            };
            out.push(WorkspaceCacheStats {
                workspace: name.to_string(),
                l1_hits: l1,
                l2_hits: l2,
                misses: miss,
                mints: get(&c.mints),
                mint_failures: get(&c.mint_failures),
                revocations: get(&c.revocations),
                hit_ratio: (lookups > 0).then(|| (l1 + l2) as f64 / lookups as f64),
                mints_last_minute: recent,
            });
        }
        out
    }
}

fn prune(recent: &mut VecDeque<Instant>, now: Instant) {
    while let Some(&t) = recent.front() {
        if now.duration_since(t) > RATE_WINDOW {
            recent.pop_front();
        } else {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_ratio_and_rate() {
        let s = CacheStats::default();
        assert_eq!(s.snapshot(&["idle"])[0].hit_ratio, None);
        s.record("prod", Event::Miss);
        s.record("prod", Event::Minted);
        s.record("prod", Event::L1Hit);
        s.record("prod", Event::L1Hit);
        s.record("prod", Event::L2Hit);
        let snap = s.snapshot(&["idle", "prod"]);
        assert_eq!(snap.len(), 2);
        let prod = snap.iter().find(|w| w.workspace == "prod").unwrap();
        assert_eq!((prod.l1_hits, prod.l2_hits, prod.misses), (2, 1, 1));
        assert_eq!(prod.hit_ratio, Some(0.75));
        assert_eq!(prod.mints_last_minute, 1);
        assert_eq!(snap[0].workspace, "idle");
    }
}
