//! Config reload without a restart: on SIGHUP, and when the config file changes (polled), the
//! file is read and checked again; if it is good it replaces the running config between Checks:
//!
//! - issuers (an issuer whose settings changed, or a new one, must load its keys first);
//! - workspaces, path rules, allowed agents, guardrail scopes, MCP tool rules, rate limits,
//!   `audit.record_statement_text` (one new [`Policy`], swapped whole; each Check reads one
//!   version);
//! - the audit HMAC key (a new `key_id`: the old key must stay in `audit.previous_keys`).
//!
//! A config with errors, or one that changes what only a restart can change (listeners, Redis,
//! PostgreSQL, the chain, checkpoint signing, the transparency log, a first U2M workspace), is
//! refused whole: the running config keeps serving, and a log line and
//! `aegis_config_reloads_total{result="error"}` say why.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::audit::checkpoint::Checkpointer;
use crate::audit::AuditChain;
use crate::config::{Config, ProcessEnv, TokenSourceKind};
use crate::identity::Validator;
use crate::policy::Policy;
use crate::secret::Key32;

/// How often the config file is looked at for a change (a change is applied after two polls
/// that read the same content).
pub const POLL_EVERY: Duration = Duration::from_millis(500);

/// What a reload swaps.
pub struct Reloader {
    pub path: PathBuf,
    pub policy: Arc<arc_swap::ArcSwap<Policy>>,
    pub validator: Arc<Validator>,
    pub audit: Arc<AuditChain>,
    pub checkpointer: Arc<Checkpointer>,
    /// The console's copy of the HMAC keys (for "verify now").
    pub console_keys: Arc<RwLock<HashMap<String, Key32>>>,
    current: Mutex<Config>,
    /// Only one reload at a time.
    running: tokio::sync::Mutex<()>,
}

impl Reloader {
    pub fn new(
        path: PathBuf,
        running_config: Config,
        policy: Arc<arc_swap::ArcSwap<Policy>>,
        validator: Arc<Validator>,
        audit: Arc<AuditChain>,
        checkpointer: Arc<Checkpointer>,
        console_keys: Arc<RwLock<HashMap<String, Key32>>>,
    ) -> Reloader {
        Reloader {
            path,
            policy,
            validator,
            audit,
            checkpointer,
            console_keys,
            current: Mutex::new(running_config),
            running: tokio::sync::Mutex::new(()),
        }
    }

    /// Reads the file and, if it is good, swaps it in. `Err`: every reason it was refused.
    pub async fn reload(&self) -> Result<(), Vec<String>> {
        let _one = self.running.lock().await;
        let result = self.try_reload().await;
        match &result {
            Ok(()) => {
                metrics::counter!("aegis_config_reloads_total", "result" => "ok").increment(1);
                metrics::gauge!("aegis_config_last_reload_ok").set(1.0);
                tracing::info!(config = %self.path.display(), "config reloaded");
            }
            Err(problems) => {
                metrics::counter!("aegis_config_reloads_total", "result" => "error").increment(1);
                metrics::gauge!("aegis_config_last_reload_ok").set(0.0);
                tracing::error!(
                    config = %self.path.display(),
                    problems = %problems.join("; "),
                    "config reload refused; the running config keeps serving"
                );
            }
        }
        result
    }

    async fn try_reload(&self) -> Result<(), Vec<String>> {
        let next = Config::load(&self.path, &ProcessEnv)
            .map_err(|errs| errs.0.iter().map(|e| e.to_string()).collect::<Vec<_>>())?;
        let old = self
            .current
            .lock()
            .map_err(|_| vec!["internal: config lock poisoned".to_string()])?
            .clone();
        let problems = needs_restart(&old, &next);
        if !problems.is_empty() {
            return Err(problems);
        }
        // Issuers first: the only step that can still fail (a new issuer's keys).
        self.validator
            .reconfigure(&next.issuers)
            .await
            .map_err(|e| vec![e])?;
        self.policy.store(Arc::new(Policy::new(&next)));
        if next.audit.key_id != old.audit.key_id {
            self.audit
                .rekey(&next.audit.key_id, next.audit.hmac_key.clone());
            tracing::info!(key_id = %next.audit.key_id, "audit rows are now signed with a new key");
        }
        self.checkpointer.set_keys(next.audit.keys());
        if let Ok(mut k) = self.console_keys.write() {
            *k = next.audit.keys();
        }
        for w in next.warnings() {
            tracing::warn!("config: {w}");
        }
        if let Ok(mut cur) = self.current.lock() {
            *cur = next;
        }
        Ok(())
    }

    /// Reloads on SIGHUP and when the file's content changes, until `stop` turns true.
    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "no SIGHUP handler; the config file is still watched");
                None
            }
        };
        let mut seen = fingerprint(&self.path);
        // A changed file is reloaded once it reads the same on two polls in a row, so an editor
        // writing it in place is not caught half-way.
        let mut pending: Option<[u8; 32]> = None;
        loop {
            let hup_recv = async {
                match hup.as_mut() {
                    Some(h) => {
                        h.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let stopped = async {
                let _ = stop.wait_for(|s| *s).await;
            };
            tokio::select! {
                _ = stopped => return,
                _ = hup_recv => {
                    seen = fingerprint(&self.path);
                    let _ = self.reload().await;
                }
                _ = tokio::time::sleep(POLL_EVERY) => {
                    let now = fingerprint(&self.path);
                    if now.is_none() || now == seen {
                        pending = None;
                    } else if now == pending {
                        seen = now;
                        pending = None;
                        let _ = self.reload().await;
                    } else {
                        pending = now;
                    }
                }
            }
        }
    }
}

/// The file's content hash (None when it cannot be read: a rename in progress is not a change).
fn fingerprint(path: &std::path::Path) -> Option<[u8; 32]> {
    std::fs::read(path).ok().map(|b| Sha256::digest(&b).into())
}

/// What in `next` only a restart can apply, each named.
pub fn needs_restart(old: &Config, next: &Config) -> Vec<String> {
    let (a, b) = (&old.audit, &next.audit);
    // Each part only a restart applies, as the text compared (secrets print redacted; the
    // checkpoint key is compared by its bytes).
    let parts: [(&str, String, String); 12] = [
        (
            "[server]",
            format!("{:?}", old.server),
            format!("{:?}", next.server),
        ),
        (
            "[admin]",
            format!("{:?}", old.admin),
            format!("{:?}", next.admin),
        ),
        (
            "[redis]",
            format!("{:?}", old.redis),
            format!("{:?}", next.redis),
        ),
        (
            "[tracing]",
            format!("{:?}", old.tracing),
            format!("{:?}", next.tracing),
        ),
        (
            "[postgres]",
            format!("{:?}", old.postgres),
            format!("{:?}", next.postgres),
        ),
        ("audit.chain_id", a.chain_id.clone(), b.chain_id.clone()),
        (
            "audit.checkpoint_dir",
            a.checkpoint_dir.display().to_string(),
            b.checkpoint_dir.display().to_string(),
        ),
        (
            "audit.checkpoint_interval",
            format!("{:?}", a.checkpoint_interval),
            format!("{:?}", b.checkpoint_interval),
        ),
        (
            "audit.checkpoint_signing_key_file",
            hex::encode(a.checkpoint_signing_key.expose()),
            hex::encode(b.checkpoint_signing_key.expose()),
        ),
        (
            "audit.max_clock_skew",
            format!("{:?}", a.max_clock_skew),
            format!("{:?}", b.max_clock_skew),
        ),
        (
            "audit.tlog_origin / tlog_listen",
            format!("{} {:?}", a.tlog_origin, a.tlog_listen),
            format!("{} {:?}", b.tlog_origin, b.tlog_listen),
        ),
        (
            "audit.witnesses",
            format!(
                "{:?} {} {:?}",
                a.witnesses, a.witness_quorum, a.witness_timeout
            ),
            format!(
                "{:?} {} {:?}",
                b.witnesses, b.witness_quorum, b.witness_timeout
            ),
        ),
    ];
    let mut out: Vec<String> = parts
        .iter()
        .filter(|(_, was, is)| was != is)
        .map(|(what, _, _)| format!("{what} changed: it takes effect on a restart"))
        .collect();
    // The HMAC key rotates only to a new key id, with the old one kept for the rows it signed.
    if b.key_id == a.key_id && b.hmac_key.expose() != a.hmac_key.expose() {
        out.push(
            "audit.hmac_key_file changed under the same key_id: give a new key a new key_id".into(),
        );
    }
    if b.key_id != a.key_id && !b.previous_keys.iter().any(|(id, _)| *id == a.key_id) {
        out.push(format!(
            "audit.key_id changed but the key being rotated out ({}) is not in audit.previous_keys: the rows it signed would no longer verify",
            a.key_id
        ));
    }
    // U2M consent (its store and public listener) starts with the process.
    let u2m = |c: &Config| {
        c.workspaces
            .iter()
            .any(|w| w.token_source == TokenSourceKind::U2m)
    };
    if u2m(next) && !u2m(old) {
        out.push("a u2m workspace where none ran before: U2M consent starts on a restart".into());
    }
    out
}
