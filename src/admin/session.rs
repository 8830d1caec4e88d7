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

/// What a signed-in person may do. `viewer` (status and feed) comes with every session;
/// `operator` adds revoke/block/unblock; `auditor` adds verify and export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Roles {
    pub viewer: bool,
    pub operator: bool,
    pub auditor: bool,
}

impl Roles {
    /// Every role: the break-glass sign-in.
    pub const ALL: Roles = Roles {
        viewer: true,
        operator: true,
        auditor: true,
    };

    pub fn any(&self) -> bool {
        self.viewer || self.operator || self.auditor
    }

    /// The role names, most powerful first, joined by "+" (`operator+auditor`).
    pub fn label(&self) -> String {
        let mut out = Vec::new();
        if self.operator {
            out.push("operator");
        }
        if self.auditor {
            out.push("auditor");
        }
        if out.is_empty() && self.viewer {
            out.push("viewer");
        }
        out.join("+")
    }
}

/// Who is behind a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// Signed in through the IdP.
    Oidc {
        /// The token's `iss`.
        issuer: String,
        subject: String,
        /// `preferred_username`, else `name`, else `email`, else the subject.
        name: String,
    },
    /// Signed in with the static console token: the person is not known.
    BreakGlass,
}

/// A session's principal and roles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operator {
    pub principal: Principal,
    pub roles: Roles,
}

impl Operator {
    pub fn break_glass() -> Operator {
        Operator {
            principal: Principal::BreakGlass,
            roles: Roles::ALL,
        }
    }

    /// How ADMIN rows name this operator (`actor_chain`): `console:alice (operator)`, or
    /// `console:break-glass`.
    pub fn actor(&self) -> String {
        match &self.principal {
            Principal::BreakGlass => "console:break-glass".to_string(),
            Principal::Oidc { name, .. } => {
                // ">" separates actors in the chain; a name must not forge a second one.
                let clean: String = name
                    .chars()
                    .map(|c| if c == '>' || c.is_control() { '_' } else { c })
                    .collect();
                format!("console:{clean} ({})", self.roles.label())
            }
        }
    }

    /// (issuer, subject) for the ADMIN row; empty for break-glass.
    pub fn issuer_subject(&self) -> (&str, &str) {
        match &self.principal {
            Principal::Oidc {
                issuer, subject, ..
            } => (issuer, subject),
            Principal::BreakGlass => ("", ""),
        }
    }

    /// The name the page shows.
    pub fn display(&self) -> &str {
        match &self.principal {
            Principal::Oidc { name, .. } => name,
            Principal::BreakGlass => "break-glass",
        }
    }
}

struct Session {
    csrf: String,
    operator: Operator,
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

    pub fn create(&self, operator: Operator) -> Option<NewSession> {
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
                operator,
                created: now,
                last_seen: now,
            },
        );
        Some(NewSession { id, csrf })
    }

    fn alive(&self, s: &Session, now: Instant) -> bool {
        now.duration_since(s.created) < self.max_age && now.duration_since(s.last_seen) < self.idle
    }

    /// The CSRF token and operator of a live session (and marks it used), or None.
    pub fn touch(&self, id: &str) -> Option<(String, Operator)> {
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
        Some((s.csrf.clone(), s.operator.clone()))
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
        let a = s.create(Operator::break_glass()).unwrap();
        assert_eq!(
            s.touch(&a.id),
            Some((a.csrf.clone(), Operator::break_glass()))
        );
        assert!(s.touch("not-a-session").is_none());
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(s.touch(&a.id).is_some());
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(s.touch(&a.id).is_none(), "idle session must expire");

        let b = s.create(Operator::break_glass()).unwrap();
        for _ in 0..5 {
            tokio::time::advance(Duration::from_secs(20)).await;
            let _ = s.touch(&b.id);
        }
        assert!(!s.is_live(&b.id), "old session must expire");

        let c = s.create(Operator::break_glass()).unwrap();
        s.remove(&c.id);
        assert!(s.touch(&c.id).is_none());
    }

    #[test]
    fn actors_name_the_person_and_cannot_forge_a_chain() {
        let op = |name: &str, roles: Roles| Operator {
            principal: Principal::Oidc {
                issuer: "https://idp".into(),
                subject: "u-1".into(),
                name: name.into(),
            },
            roles,
        };
        let operator = Roles {
            viewer: true,
            operator: true,
            auditor: false,
        };
        assert_eq!(op("alice", operator).actor(), "console:alice (operator)");
        assert_eq!(
            op("eve > root", Roles::ALL).actor(),
            "console:eve _ root (operator+auditor)"
        );
        let viewer = Roles {
            viewer: true,
            ..Roles::default()
        };
        assert_eq!(op("bob", viewer).actor(), "console:bob (viewer)");
        assert_eq!(Operator::break_glass().actor(), "console:break-glass");
        assert_eq!(Operator::break_glass().issuer_subject(), ("", ""));
        assert!(!Roles::default().any());
    }

    #[test]
    fn secret_eq_compares_whole_values() {
        assert!(secret_eq("0123456789abcdef", "0123456789abcdef"));
        assert!(!secret_eq("0123456789abcdef", "0123456789abcdeX"));
        assert!(!secret_eq("0123456789abcdef", "0123456789abcdef0"));
        assert!(!secret_eq("", "x"));
    }
}
