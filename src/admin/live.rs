//! The console's [`Operations`] over the running components, and the dependency monitor.
//!
//! [`LiveOps::monitor`] probes every dependency every [`PROBE_EVERY`] (Redis PING, a Postgres
//! query on the console's own connection, each issuer's keys endpoint, each workspace's token
//! endpoint), keeps the results for the console, and exports `aegis_dependency_up`,
//! `aegis_dependency_latency_seconds`, `aegis_audit_queue_depth`, `aegis_audit_chain_size`
//! and `aegis_checkpoint_age_seconds`. It runs whether or not the console is enabled, so the
//! metrics are always there.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use tokio::sync::broadcast;
use tokio_postgres::Client;

use super::console::{
    ChainStatus, CheckpointStatus, ConsoleStatus, DependencyHealth, OpError, Operations,
    ReplicaCheckpoint, TreeStatus, VerifyOutcome,
};
use super::session::Operator;
use super::Readiness;
use crate::audit::checkpoint::{CheckpointSink, DirSink};
use crate::audit::{AuditChain, Committed};
use crate::broker::Broker;
use crate::config::{Config, IssuerConfig, WorkspaceConfig};
use crate::identity::Validator;
use crate::policy::AgentBlocklist;
use crate::redis::RedisLink;
use crate::secret::Key32;

/// How often Redis and Postgres are probed.
pub const PROBE_EVERY: Duration = Duration::from_secs(2);
/// Remote HTTP endpoints (IdP keys, workspace OAuth metadata) are probed every this many
/// rounds (10 s), so aegis adds little traffic to services it does not own.
const REMOTE_EVERY_ROUNDS: u64 = 5;
/// Each probe's own deadline.
const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);
/// Upper bound on one "verify now".
const VERIFY_TIMEOUT: Duration = Duration::from_secs(120);

/// Opens a Postgres connection for the console (the server decides how: URL, TLS).
pub type PgConnect =
    Arc<dyn Fn() -> BoxFuture<'static, Result<Client, crate::pg::PgError>> + Send + Sync>;
/// The newest signed checkpoint (size, unix seconds), if any.
pub type LastCheckpoint = Arc<dyn Fn() -> Option<(u64, i64)> + Send + Sync>;

/// The components the console reads and acts on.
pub struct Parts {
    pub audit: Arc<AuditChain>,
    pub broker: Arc<Broker>,
    pub validator: Arc<Validator>,
    pub redis: Arc<RedisLink>,
    pub blocklist: Arc<AgentBlocklist>,
    /// The durable agent blocks.
    pub blocks: Arc<crate::policy::blocklist::BlockStore>,
    pub readiness: Arc<dyn Readiness>,
    pub http: reqwest::Client,
    /// Audit HMAC keys by key id, for "verify now" (a config reload may add one).
    pub keys: Arc<std::sync::RwLock<HashMap<String, Key32>>>,
    /// Where signed checkpoints are, and the key they must verify under (for "verify now").
    pub checkpoint_dir: std::path::PathBuf,
    pub checkpoint_public_key: [u8; 32],
    pub pg_connect: PgConnect,
    pub last_checkpoint: LastCheckpoint,
    /// The newest signed tree head of the transparency log.
    pub last_tree: Arc<dyn Fn() -> Option<crate::audit::checkpoint::TreeHead> + Send + Sync>,
    /// The transparency log's verifier key (for "verify now").
    pub tlog_vkey: crate::audit::tlog::Vkey,
}

struct DbHead {
    size: u64,
    mac_prefix: String,
}

pub struct LiveOps {
    parts: Parts,
    instance_id: String,
    chain_id: String,
    workspaces: Vec<WorkspaceConfig>,
    issuers: Vec<IssuerConfig>,
    health: RwLock<Vec<DependencyHealth>>,
    db_head: RwLock<Option<DbHead>>,
    last_verify: Mutex<Option<VerifyOutcome>>,
    /// The newest checkpoint of every signer in the checkpoint directory (all replicas).
    replica_checkpoints: RwLock<Vec<ReplicaCheckpoint>>,
    verifying: tokio::sync::Mutex<()>,
    /// The console's own connection (monitor probes, feed backfill); never the writer's.
    pg: tokio::sync::Mutex<Option<Client>>,
}

use crate::clock::unix_ms;

fn set_up(name: &str, up: bool, latency: Option<Duration>) {
    metrics::gauge!("aegis_dependency_up", "dependency" => name.to_string()).set(if up {
        1.0
    } else {
        0.0
    });
    if let Some(l) = latency {
        metrics::gauge!("aegis_dependency_latency_seconds", "dependency" => name.to_string())
            .set(l.as_secs_f64());
    }
}

// === impl LiveOps ===

impl LiveOps {
    /// Records an operator action from the console as an `ADMIN` row naming the operator
    /// (their IdP issuer and subject in `issuer`/`subject`, `console:<name> (<roles>)` or
    /// `console:break-glass` in `actor_chain`); fails when the row does not commit, so the
    /// console never reports an action the chain does not hold.
    async fn admin_row(
        &self,
        by: &Operator,
        method: &str,
        reason: &str,
        user: &str,
        agent: &str,
        workspace: &str,
    ) -> Result<u64, OpError> {
        let (issuer, subject) = by.issuer_subject();
        let draft = crate::audit::Draft {
            ts: std::time::SystemTime::now(),
            trace_id: crate::authz::TraceId::random().as_str().to_string(),
            verdict: crate::audit::Verdict::Admin,
            reason: reason.to_string(),
            issuer: issuer.to_string(),
            subject: subject.to_string(),
            user_name: user.to_string(),
            agent: agent.to_string(),
            workspace: workspace.to_string(),
            method: method.to_string(),
            path: "aegis console".to_string(),
            actor_chain: by.actor(),
            ..Default::default()
        };
        match tokio::time::timeout(Duration::from_secs(5), self.parts.audit.append(draft)).await {
            Ok(Ok(seq)) => Ok(seq),
            _ => Err(OpError::Unavailable("audit")),
        }
    }

    pub fn new(cfg: &Config, parts: Parts) -> Arc<LiveOps> {
        Arc::new(LiveOps {
            parts,
            instance_id: cfg.server.instance_id.clone(),
            chain_id: cfg.audit.chain_id.clone(),
            workspaces: cfg.workspaces.clone(),
            issuers: cfg.issuers.clone(),
            health: RwLock::new(Vec::new()),
            db_head: RwLock::new(None),
            last_verify: Mutex::new(None),
            replica_checkpoints: RwLock::new(Vec::new()),
            verifying: tokio::sync::Mutex::new(()),
            pg: tokio::sync::Mutex::new(None),
        })
    }

    /// Probes every dependency every [`PROBE_EVERY`] until `stop` turns true.
    pub async fn monitor(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut round: u64 = 0;
        loop {
            let probes = self.probe_all(round % REMOTE_EVERY_ROUNDS == 0);
            round = round.wrapping_add(1);
            let health = tokio::select! {
                h = probes => h,
                _ = stop.wait_for(|s| *s) => return,
            };
            if let Ok(mut g) = self.health.write() {
                *g = health;
            }
            metrics::gauge!("aegis_audit_queue_depth").set(self.parts.audit.queued() as f64);
            metrics::gauge!("aegis_audit_chain_size").set(self.parts.audit.size() as f64);
            if let Some((_, ts)) = (self.parts.last_checkpoint)() {
                let age = (unix_ms() / 1000 - ts).max(0);
                metrics::gauge!("aegis_checkpoint_age_seconds").set(age as f64);
            }
            let replicas = self.read_replica_checkpoints().await;
            if let Ok(mut g) = self.replica_checkpoints.write() {
                *g = replicas;
            }
            tokio::select! {
                _ = tokio::time::sleep(PROBE_EVERY) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// The replicas' newest checkpoints as last read, with this process' own newest one (it
    /// may be newer than the last read of the directory).
    fn replicas_now(&self) -> Vec<ReplicaCheckpoint> {
        let mut out = self
            .replica_checkpoints
            .read()
            .map(|g| g.clone())
            .unwrap_or_default();
        if let Some((size, ts)) = (self.parts.last_checkpoint)() {
            match out.iter_mut().find(|r| r.signer == self.instance_id) {
                Some(r) if (size, ts) > (r.size, r.ts) => {
                    r.size = size;
                    r.ts = ts;
                }
                Some(_) => {}
                None => out.push(ReplicaCheckpoint {
                    signer: self.instance_id.clone(),
                    size,
                    ts,
                }),
            }
        }
        out.sort_by(|a, b| (b.size, b.ts, &a.signer).cmp(&(a.size, a.ts, &b.signer)));
        out
    }

    /// The newest valid checkpoint of this chain per signer, read on the blocking pool.
    async fn read_replica_checkpoints(&self) -> Vec<ReplicaCheckpoint> {
        let dir = self.parts.checkpoint_dir.clone();
        let listed = tokio::task::spawn_blocking(move || DirSink::new(dir, "console").list())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let mut newest: HashMap<String, ReplicaCheckpoint> = HashMap::new();
        for cp in listed.into_iter().filter_map(Result::ok) {
            if cp.chain_id != self.chain_id || !cp.verify(&self.parts.checkpoint_public_key) {
                continue;
            }
            let entry = newest
                .entry(cp.signer.clone())
                .or_insert(ReplicaCheckpoint {
                    signer: cp.signer.clone(),
                    size: 0,
                    ts: 0,
                });
            if (cp.size, cp.ts) > (entry.size, entry.ts) {
                entry.size = cp.size;
                entry.ts = cp.ts;
            }
        }
        let mut out: Vec<ReplicaCheckpoint> = newest.into_values().collect();
        out.sort_by(|a, b| (b.size, b.ts, &a.signer).cmp(&(a.size, a.ts, &b.signer)));
        out
    }

    /// Probes Redis and Postgres, and the remote endpoints when `remote` (else keeps their
    /// last results).
    async fn probe_all(&self, remote: bool) -> Vec<DependencyHealth> {
        let mut probes: Vec<BoxFuture<'_, DependencyHealth>> =
            vec![self.probe_redis().boxed(), self.probe_postgres().boxed()];
        let previous: Vec<DependencyHealth> =
            self.health.read().map(|g| g.clone()).unwrap_or_default();
        let mut remote_names = Vec::new();
        for iss in &self.issuers {
            remote_names.push(format!("idp:{}", iss.name));
        }
        for ws in &self.workspaces {
            remote_names.push(format!("workspace:{}", ws.name));
        }
        let kept: Vec<DependencyHealth> = previous
            .into_iter()
            .filter(|h| remote_names.contains(&h.name))
            .collect();
        if remote || kept.len() != remote_names.len() {
            for iss in &self.issuers {
                probes.push(self.probe_issuer(iss).boxed());
            }
            for ws in &self.workspaces {
                probes.push(self.probe_workspace(ws).boxed());
            }
        } else {
            for h in kept {
                probes.push(async move { h }.boxed());
            }
        }
        let out = futures_util::future::join_all(probes).await;
        for h in &out {
            set_up(
                &h.name,
                h.up,
                h.latency_ms.map(|ms| Duration::from_secs_f64(ms / 1000.0)),
            );
        }
        out
    }

    async fn probe_redis(&self) -> DependencyHealth {
        let started = Instant::now();
        let pong: Result<String, _> = self.parts.redis.run(redis::cmd("PING")).await;
        let latency = started.elapsed();
        let up = matches!(pong.as_deref(), Ok("PONG")) && self.parts.redis.healthy();
        DependencyHealth {
            name: "redis".into(),
            up,
            latency_ms: up.then_some(latency.as_secs_f64() * 1000.0),
            detail: if up { "ok" } else { "unreachable" }.into(),
            checked_unix_ms: unix_ms(),
        }
    }

    /// Runs `f` on the console's connection, (re)connecting first when needed.
    async fn with_pg<T>(
        &self,
        f: impl for<'c> FnOnce(&'c Client) -> BoxFuture<'c, Result<T, tokio_postgres::Error>>,
    ) -> Result<T, OpError> {
        let mut guard = self.pg.lock().await;
        if guard.as_ref().is_none_or(|c| c.is_closed()) {
            let connect = (self.parts.pg_connect)();
            let client = tokio::time::timeout(PROBE_TIMEOUT, connect)
                .await
                .map_err(|_| OpError::Unavailable("postgres"))?
                .map_err(|_| OpError::Unavailable("postgres"))?;
            *guard = Some(client);
        }
        let Some(client) = guard.as_ref() else {
            return Err(OpError::Unavailable("postgres"));
        };
        match tokio::time::timeout(PROBE_TIMEOUT, f(client)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) | Err(_) => {
                // A failed or stuck connection is not reused.
                *guard = None;
                Err(OpError::Unavailable("postgres"))
            }
        }
    }

    async fn probe_postgres(&self) -> DependencyHealth {
        let started = Instant::now();
        let ping = self
            .with_pg(|c| async move { c.query_one("SELECT 1", &[]).await.map(|_| ()) }.boxed())
            .await;
        let latency = started.elapsed();
        let up = ping.is_ok();
        if up {
            self.read_db_head().await;
        }
        DependencyHealth {
            name: "postgres".into(),
            up,
            latency_ms: up.then_some(latency.as_secs_f64() * 1000.0),
            detail: if up { "ok" } else { "unreachable" }.into(),
            checked_unix_ms: unix_ms(),
        }
    }

    /// Reads the chain's head row (all replicas' appends) into `db_head`.
    async fn read_db_head(&self) {
        let chain_id = self.chain_id.clone();
        let head = self
            .with_pg(move |c| {
                async move {
                    c.query_opt(
                        "SELECT size, head_mac FROM aegis_chain_head WHERE chain_id = $1",
                        &[&chain_id],
                    )
                    .await
                }
                .boxed()
            })
            .await;
        if let Ok(Some(row)) = head {
            let size: i64 = row.try_get(0).unwrap_or(0);
            let mac: Vec<u8> = row.try_get(1).unwrap_or_default();
            let mut prefix = hex::encode(&mac);
            prefix.truncate(16);
            if let Ok(mut g) = self.db_head.write() {
                *g = Some(DbHead {
                    size: size.max(0) as u64,
                    mac_prefix: prefix,
                });
            }
        }
    }

    /// GETs `url`; any answer below 500 counts as reachable.
    async fn probe_http(&self, url: String) -> (Option<u16>, Duration) {
        let started = Instant::now();
        let resp = tokio::time::timeout(PROBE_TIMEOUT, self.parts.http.get(url).send()).await;
        let status = match resp {
            Ok(Ok(r)) => Some(r.status().as_u16()),
            _ => None,
        };
        (status, started.elapsed())
    }

    async fn probe_issuer(&self, iss: &IssuerConfig) -> DependencyHealth {
        let url = match &iss.jwks_uri {
            Some(u) => u.to_string(),
            None => format!(
                "{}/.well-known/openid-configuration",
                iss.issuer.trim_end_matches('/')
            ),
        };
        let (status, latency) = self.probe_http(url).await;
        let reachable = status.is_some_and(|s| (200..300).contains(&s));
        // This issuer's own keys (not every issuer's): what its tokens verify against.
        let keys = self.parts.validator.keys_of(&iss.name);
        let usable = keys.is_some_and(|k| k.fresh && k.keys > 0);
        let held = match keys {
            Some(k) if k.keys > 0 => format!(
                "{} key(s), fetched {}s ago{}",
                k.keys,
                k.age.map_or(0, |a| a.as_secs()),
                if k.fresh { "" } else { ", too old to use" }
            ),
            _ => "no keys loaded".to_string(),
        };
        let detail = match (reachable, status) {
            (true, _) => held,
            (false, Some(s)) => format!("HTTP {s}; {held}"),
            (false, None) => format!("unreachable; {held}"),
        };
        DependencyHealth {
            name: format!("idp:{}", iss.name),
            // Tokens verify while the keys are fresh, even if the IdP is briefly unreachable.
            up: usable,
            latency_ms: status.map(|_| latency.as_secs_f64() * 1000.0),
            detail,
            checked_unix_ms: unix_ms(),
        }
    }

    async fn probe_workspace(&self, ws: &WorkspaceConfig) -> DependencyHealth {
        // The workspace's public OAuth metadata: reachable without credentials, and unlike a GET
        // on the token endpoint it leaves no failed request in the workspace's audit log.
        let url = format!(
            "{}/oidc/.well-known/oauth-authorization-server",
            ws.url.as_str().trim_end_matches('/')
        );
        let (status, latency) = self.probe_http(url).await;
        let up = status.is_some_and(|s| (200..300).contains(&s));
        DependencyHealth {
            name: format!("workspace:{}", ws.name),
            up,
            latency_ms: status.map(|_| latency.as_secs_f64() * 1000.0),
            detail: match status {
                Some(_) if up => "ok".to_string(),
                Some(s) => format!("HTTP {s}"),
                None => "unreachable".to_string(),
            },
            checked_unix_ms: unix_ms(),
        }
    }

    async fn run_verify(&self) -> Result<VerifyOutcome, OpError> {
        let Ok(_running) = self.verifying.try_lock() else {
            return Err(OpError::Busy);
        };
        let started = Instant::now();
        // Its own connection: a long walk must not hold up the monitor.
        let client = tokio::time::timeout(PROBE_TIMEOUT * 2, (self.parts.pg_connect)())
            .await
            .map_err(|_| OpError::Unavailable("postgres"))?
            .map_err(|_| OpError::Unavailable("postgres"))?;
        let dir = self.parts.checkpoint_dir.clone();
        let chain = self.chain_id.clone();
        let (checkpoints, notes) = tokio::task::spawn_blocking(move || {
            let sink = DirSink::new(dir, "console");
            let notes = crate::audit::checkpoint::notes_of(sink.list_notes()?, &chain);
            Ok::<_, std::io::Error>((sink.list()?, notes))
        })
        .await
        .map_err(|_| OpError::Unavailable("checkpoint directory"))?
        .map_err(|_| OpError::Unavailable("checkpoint directory"))?;
        let keys = self
            .parts
            .keys
            .read()
            .map(|k| k.clone())
            .unwrap_or_default();
        let anchors = crate::audit::verify::TreeAnchors {
            vkey: self.parts.tlog_vkey.clone(),
            notes,
        };
        let report = tokio::time::timeout(
            VERIFY_TIMEOUT,
            crate::audit::verify::verify(
                &client,
                &self.chain_id,
                &keys,
                &checkpoints,
                &self.parts.checkpoint_public_key,
                &anchors,
            ),
        )
        .await
        .map_err(|_| OpError::Unavailable("postgres (verify timed out)"))?
        .map_err(|_| OpError::Unavailable("postgres"))?;
        let outcome = VerifyOutcome {
            at_unix_ms: unix_ms(),
            intact: report.intact,
            rows: report.rows,
            first_bad_seq: report.first_bad_seq,
            problem: report.problem,
            detail: report.detail,
            duration_ms: started.elapsed().as_millis() as u64,
        };
        metrics::counter!("aegis_console_verify_total", "result" => if outcome.intact { "intact" } else { "tampered" })
            .increment(1);
        // The latest result stands until the next verify: an alert on it fires until then.
        metrics::gauge!("aegis_audit_verify_intact").set(if outcome.intact { 1.0 } else { 0.0 });
        if !outcome.intact {
            tracing::error!(
                first_bad_seq = ?outcome.first_bad_seq,
                problem = ?outcome.problem,
                "console verify: the audit chain is NOT intact"
            );
        }
        if let Ok(mut g) = self.last_verify.lock() {
            *g = Some(outcome.clone());
        }
        Ok(outcome)
    }

    async fn recent_rows(&self, limit: usize) -> Result<Vec<Committed>, OpError> {
        let chain_id = self.chain_id.clone();
        let limit = limit.min(1000) as i64;
        let rows = self
            .with_pg(move |c| {
                async move {
                    c.query(
                        "SELECT seq, ts, trace_id, decision, reason, user_name, agent, workspace, \
                         method, path, actor_chain FROM aegis_audit WHERE chain_id = $1 \
                         ORDER BY seq DESC LIMIT $2",
                        &[&chain_id, &limit],
                    )
                    .await
                }
                .boxed()
            })
            .await?;
        let mut out: Vec<Committed> = rows
            .iter()
            .filter_map(|r| {
                let ts: SystemTime = r.try_get(1).ok()?;
                let s = |i: usize| r.try_get::<_, String>(i).ok();
                Some(Committed {
                    seq: r.try_get::<_, i64>(0).ok()?.max(0) as u64,
                    ts_unix_micros: crate::clock::unix_micros_of(ts),
                    trace_id: s(2)?,
                    decision: match s(3)?.as_str() {
                        "ALLOW" => "ALLOW",
                        "ADMIN" => "ADMIN",
                        _ => "DENY",
                    },
                    reason: s(4)?,
                    user_name: s(5)?,
                    agent: s(6)?,
                    workspace: s(7)?,
                    method: s(8)?,
                    path: s(9)?,
                    actor_chain: s(10)?,
                })
            })
            .collect();
        out.reverse();
        Ok(out)
    }
}

impl Operations for LiveOps {
    fn status(&self) -> BoxFuture<'_, ConsoleStatus> {
        async move {
            // The head row now (a one-row read), else the monitor's last look.
            self.read_db_head().await;
            let (head_size, head_mac_prefix) = match self.db_head.read() {
                Ok(g) => match g.as_ref() {
                    Some(h) => (Some(h.size), Some(h.mac_prefix.clone())),
                    None => (None, None),
                },
                Err(_) => (None, None),
            };
            let names: Vec<&str> = self.workspaces.iter().map(|w| w.name.as_str()).collect();
            ConsoleStatus {
                instance_id: self.instance_id.clone(),
                version: env!("CARGO_PKG_VERSION"),
                ready: self.parts.readiness.status().ready,
                chain: ChainStatus {
                    chain_id: self.chain_id.clone(),
                    size: self.parts.audit.size(),
                    head_size,
                    head_mac_prefix,
                    queue_depth: self.parts.audit.queued() as u64,
                    last_checkpoint: (self.parts.last_checkpoint)()
                        .map(|(size, ts)| CheckpointStatus { size, ts }),
                    replica_checkpoints: self.replicas_now(),
                    last_verify: self.last_verify.lock().ok().and_then(|g| g.clone()),
                    verify_running: self.verifying.try_lock().is_err(),
                    tree: (self.parts.last_tree)().map(|t| TreeStatus {
                        size: t.size,
                        root: hex::encode(t.root),
                        cosigners: t.cosigners,
                        witnessed: t.witnessed,
                    }),
                },
                dependencies: self.health.read().map(|g| g.clone()).unwrap_or_default(),
                cache: self.parts.broker.stats().snapshot(&names),
                l1_entries: self.parts.broker.l1_entries(),
                blocked_agents: self.parts.blocklist.snapshot(),
                workspaces: names.iter().map(|s| s.to_string()).collect(),
            }
        }
        .boxed()
    }

    fn subscribe(&self) -> broadcast::Receiver<Arc<Committed>> {
        self.parts.audit.subscribe()
    }

    fn recent(&self, limit: usize) -> BoxFuture<'_, Result<Vec<Committed>, OpError>> {
        self.recent_rows(limit).boxed()
    }

    fn verify(&self, by: Operator) -> BoxFuture<'_, Result<VerifyOutcome, OpError>> {
        async move {
            let outcome = self.run_verify().await?;
            // The outcome is returned only once the chain holds who asked and what they saw.
            let reason = if outcome.intact {
                "chain_verified_intact"
            } else {
                "chain_verified_not_intact"
            };
            self.admin_row(&by, "VERIFY", reason, "", "", "").await?;
            Ok(outcome)
        }
        .boxed()
    }

    fn export(&self, by: Operator, limit: usize) -> BoxFuture<'_, Result<Vec<Committed>, OpError>> {
        async move {
            // Recorded first: an export the chain does not hold does not happen.
            self.admin_row(&by, "EXPORT", "rows_exported", "", "", "")
                .await?;
            self.recent_rows(limit).await
        }
        .boxed()
    }

    fn revoke(
        &self,
        by: Operator,
        user: String,
        workspace: Option<String>,
    ) -> BoxFuture<'_, Result<Vec<String>, OpError>> {
        async move {
            let targets: Vec<String> = match workspace {
                Some(w) => {
                    if !self.workspaces.iter().any(|ws| ws.name == w) {
                        return Err(OpError::Invalid("no such workspace"));
                    }
                    vec![w]
                }
                None => self.workspaces.iter().map(|w| w.name.clone()).collect(),
            };
            for w in &targets {
                self.parts
                    .broker
                    .revoke(w, &user, None)
                    .await
                    .map_err(|_| OpError::Unavailable("redis"))?;
                self.admin_row(&by, "REVOKE", "token_revoked", &user, "", w)
                    .await?;
            }
            Ok(targets)
        }
        .boxed()
    }

    fn set_agent_blocked(
        &self,
        by: Operator,
        agent: String,
        blocked: bool,
    ) -> BoxFuture<'_, Result<(), OpError>> {
        async move {
            let (bl, store, redis) = (&self.parts.blocklist, &self.parts.blocks, &self.parts.redis);
            let blocked_by = format!("{}@{}", by.actor(), self.instance_id);
            if blocked {
                // Blocked first (fail closed), then recorded; a block whose row does not commit
                // stays in force and the operator is told it was not recorded.
                use crate::policy::blocklist::BlockError;
                match bl.block(store, redis, &agent, &blocked_by).await {
                    Err(BlockError::Postgres(_)) => Err(OpError::Unavailable("postgres")),
                    fanned_out => {
                        self.admin_row(&by, "BLOCK", "agent_blocked", "", &agent, "")
                            .await?;
                        fanned_out.map_err(|_| OpError::Unavailable("redis"))
                    }
                }
            } else {
                // Recorded first: an unblock the chain does not hold does not happen.
                self.admin_row(&by, "UNBLOCK", "agent_unblocked", "", &agent, "")
                    .await?;
                bl.unblock(store, redis, &agent)
                    .await
                    .map_err(|_| OpError::Unavailable("postgres"))
            }
        }
        .boxed()
    }
}
