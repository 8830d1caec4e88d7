//! Console sessions: a random id in an HttpOnly, SameSite=Strict cookie, and a server-side
//! table (keyed by the id's SHA-256, so the table never holds a usable cookie) with an absolute
//! and an idle expiry and a per-session CSRF token.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::time::Instant;

/// The session cookie's name.
pub const COOKIE: &str = "aegis_console";
/// Sessions live at most this long.
pub const MAX_AGE: Duration = Duration::from_secs(8 * 3600);
/// ... and end after this long without a request.
pub const IDLE: Duration = Duration::from_secs(30 * 60);
/// Bound on live sessions; the oldest goes when a new one would exceed it.
pub const MAX_SESSIONS: usize = 256;

struct Session {
    csrf: String,
    created: Instant,
    last_seen: Instant,
}

pub struct Sessions {
    table: Mutex<HashMap<[u8; 32], Session>>,
    max_age: Duration,
    idle: Duration,
}

/// A new session: the cookie value and the CSRF token.
pub struct NewSession {
    pub id: String,
    pub csrf: String,
}

fn random_hex() -> String {
    let mut raw = [0u8; 32];
    rand::rng().fill_bytes(&mut raw);
    hex::encode(raw)
}

fn key(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

// === impl Sessions ===

impl Default for Sessions {
    fn default() -> Self {
        Sessions::new(MAX_AGE, IDLE)
    }
}

impl Sessions {
    pub fn new(max_age: Duration, idle: Duration) -> Sessions {
        Sessions {
            table: Mutex::new(HashMap::new()),
            max_age,
            idle,
        }
    }

    pub fn create(&self) -> Option<NewSession> {
        let id = random_hex();
        let csrf = random_hex();
        let now = Instant::now();
        let mut t = self.table.lock().ok()?;
        t.retain(|_, s| self.alive(s, now));
        while t.len() >= MAX_SESSIONS {
            let oldest = t.iter().min_by_key(|(_, s)| s.created).map(|(k, _)| *k)?;
            t.remove(&oldest);
        }
        t.insert(
            key(&id),
            Session {
                csrf: csrf.clone(),
                created: now,
                last_seen: now,
            },
        );
        Some(NewSession { id, csrf })
    }

    fn alive(&self, s: &Session, now: Instant) -> bool {
        now.duration_since(s.created) < self.max_age && now.duration_since(s.last_seen) < self.idle
    }

    /// The CSRF token of a live session (and marks it used), or None.
    pub fn touch(&self, id: &str) -> Option<String> {
        let now = Instant::now();
        let mut t = self.table.lock().ok()?;
        let k = key(id);
        let alive = t.get(&k).is_some_and(|s| self.alive(s, now));
        if !alive {
            t.remove(&k);
            return None;
        }
        let s = t.get_mut(&k)?;
        s.last_seen = now;
        Some(s.csrf.clone())
    }

    /// True while the session exists and has not expired (does not count as use).
    pub fn is_live(&self, id: &str) -> bool {
        let now = Instant::now();
        self.table
            .lock()
            .ok()
            .and_then(|t| t.get(&key(id)).map(|s| self.alive(s, now)))
            .unwrap_or(false)
    }

    pub fn remove(&self, id: &str) {
        if let Ok(mut t) = self.table.lock() {
            t.remove(&key(id));
        }
    }
}

/// Constant-time equality of two secrets of any length (compares their SHA-256 digests, so
/// neither the content nor the length leaks through timing).
pub fn secret_eq(a: &str, b: &str) -> bool {
    let da = Sha256::digest(a.as_bytes());
    let db = Sha256::digest(b.as_bytes());
    da.ct_eq(&db).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn sessions_expire_when_idle_and_when_old() {
        let s = Sessions::new(Duration::from_secs(100), Duration::from_secs(30));
        let a = s.create().unwrap();
        assert_eq!(s.touch(&a.id).as_deref(), Some(a.csrf.as_str()));
        assert!(s.touch("not-a-session").is_none());
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(s.touch(&a.id).is_some());
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(s.touch(&a.id).is_none(), "idle session must expire");

        let b = s.create().unwrap();
        for _ in 0..5 {
            tokio::time::advance(Duration::from_secs(20)).await;
            let _ = s.touch(&b.id);
        }
        assert!(!s.is_live(&b.id), "old session must expire");

        let c = s.create().unwrap();
        s.remove(&c.id);
        assert!(s.touch(&c.id).is_none());
    }

    #[test]
    fn secret_eq_compares_whole_values() {
        assert!(secret_eq("0123456789abcdef", "0123456789abcdef"));
        assert!(!secret_eq("0123456789abcdef", "0123456789abcdeX"));
        assert!(!secret_eq("0123456789abcdef", "0123456789abcdef0"));
        assert!(!secret_eq("", "x"));
    }
}
