//! The audit chain: one HMAC-chained row per decision in Postgres, appended with group commit.
//!
//! Requests enqueue a [`Draft`] and wait for their batch. The writer takes everything queued,
//! assigns gapless seqs on top of the head it expects, computes each MAC over the canonical
//! record ([`record`]) and sends the batch as one statement that moves the chain's head row from
//! that head to the batch's last row and inserts the rows, in one transaction (the row lock
//! serializes replicas sharing a chain: no fork, no gap). Only once that commit is durable are
//! the waiting requests answered. If the queue is full or the commit fails, every waiter gets an
//! error and the pipeline denies (503): never an allow without its row.
//!
//! Batches are pipelined on the writer's connection ([`PIPELINE_DEPTH`]): the next batch is sent,
//! built on the head the previous one will leave, while that one is still committing, so
//! PostgreSQL starts it as soon as the previous commit is flushed, with no round trip between.
//! When a batch finds the head moved (another replica appended), nothing of it is written, and
//! nothing of the batches sent after it either (they expect its head): the writer collects them
//! all and appends each again, in order, under the head row's lock (`SELECT ... FOR UPDATE`),
//! and sends one batch at a time for a while ([`CONTENDED_FOR`]).

pub mod checkpoint;
pub mod receipt;
pub mod record;
pub mod schema;
pub mod tiles;
pub use crate::tlog;
pub mod verify;
pub mod witness;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};
use tokio_postgres::{Client, Statement};

use crate::secret::Key32;
use record::{AuditRecord, Decision, RECORD_VERSION};

/// ALLOW or DENY.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Verdict {
    Allow,
    #[default]
    Deny,
    /// An operator action (revocation, agent block), recorded in the same chain.
    Admin,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "ALLOW",
            Verdict::Deny => "DENY",
            Verdict::Admin => "ADMIN",
        }
    }
}

/// A decision waiting for its place in the chain.
#[derive(Debug, Clone)]
pub struct Draft {
    pub ts: SystemTime,
    pub trace_id: String,
    pub request_id: String,
    pub verdict: Verdict,
    pub reason: String,
    pub issuer: String,
    pub subject: String,
    pub user_name: String,
    pub agent: String,
    pub workspace: String,
    pub method: String,
    pub path: String,
    pub token_source: String,
    pub token_fp: Vec<u8>,
    /// The RFC 8693 `act` chain, outermost actor first, joined by " > ".
    pub actor_chain: String,
    /// The kind of SQL an agent sent (`query`, `dml`, `ddl`, `dcl`, `unknown`), if any.
    pub statement_kind: String,
    /// SHA-256 of the normalized statement, if any.
    pub statement_fp: Vec<u8>,
    /// The MCP tool a `tools/call` named, if any.
    pub mcp_tool: String,
    /// The SQL text, only when `audit.record_statement_text` is on.
    pub statement_text: String,
}

impl Default for Draft {
    fn default() -> Self {
        Draft {
            ts: UNIX_EPOCH,
            trace_id: String::new(),
            request_id: String::new(),
            verdict: Verdict::Deny,
            reason: String::new(),
            issuer: String::new(),
            subject: String::new(),
            user_name: String::new(),
            agent: String::new(),
            workspace: String::new(),
            method: String::new(),
            path: String::new(),
            token_source: String::new(),
            token_fp: Vec::new(),
            actor_chain: String::new(),
            statement_kind: String::new(),
            statement_fp: Vec::new(),
            mcp_tool: String::new(),
            statement_text: String::new(),
        }
    }
}

#[derive(Debug, thiserror::Error, Clone)]
pub enum AuditError {
    #[error("audit queue is full")]
    QueueFull,
    #[error("audit writer is not running")]
    WriterGone,
    #[error("audit store unavailable: {0}")]
    Store(#[from] crate::pg::PgError),
    #[error("audit commit timed out")]
    Timeout,
    #[error("this host's clock is {0} ms away from the database's")]
    ClockSkew(i64),
    #[error("audit chain head is inconsistent: {0}")]
    Inconsistent(String),
    #[error("the audit store cannot commit durably: {0}")]
    NotDurable(String),
}

/// Tuning for the writer.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    pub queue: usize,
    pub max_batch: usize,
    pub commit_timeout: Duration,
    pub connect_timeout: Duration,
    /// Create or upgrade the schema when it is missing; otherwise refuse to serve until
    /// `aegis migrate` has run (so the serving role needs no DDL rights).
    pub migrate_on_start: bool,
    /// The weakest `synchronous_commit` accepted (and set on the writer's session).
    pub min_synchronous_commit: crate::config::SyncCommit,
    /// The most this host's clock may differ from PostgreSQL's before the writer refuses to
    /// serve (record timestamps and checkpoint times would lie).
    pub max_clock_skew: Duration,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            queue: 8192,
            max_batch: 512,
            commit_timeout: Duration::from_millis(1500),
            connect_timeout: Duration::from_secs(1),
            migrate_on_start: crate::config::DEFAULT_MIGRATE_ON_START,
            max_clock_skew: crate::config::DEFAULT_MAX_CLOCK_SKEW,
            min_synchronous_commit: crate::config::SyncCommit::default(),
        }
    }
}

/// A committed decision, as the operator console's live feed shows it. No token, no key.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Committed {
    pub seq: u64,
    pub ts_unix_micros: i64,
    pub trace_id: String,
    pub decision: &'static str,
    pub reason: String,
    pub user_name: String,
    pub agent: String,
    pub workspace: String,
    pub method: String,
    pub path: String,
    /// Who acted: the RFC 8693 chain of a request, or the console operator of an ADMIN row
    /// (`console:alice (operator)`).
    pub actor_chain: String,
}

struct Job {
    draft: Draft,
    done: oneshot::Sender<Result<u64, AuditError>>,
}

// The queue holds messages inline; boxing `Job` would cost an allocation per decision.
#[allow(clippy::large_enum_variant)]
enum Msg {
    Append(Job),
    /// Answered once everything queued before it has been committed (or failed).
    Flush(oneshot::Sender<()>),
}

/// An HMAC key and its id.
pub struct HmacKey {
    pub id: Arc<str>,
    pub key: Key32,
}

/// The handle requests append through.
pub struct AuditChain {
    tx: mpsc::Sender<Msg>,
    signing: Arc<arc_swap::ArcSwap<HmacKey>>,
    feed: tokio::sync::broadcast::Sender<Arc<Committed>>,
    head_loaded: Arc<AtomicBool>,
    size: Arc<AtomicU64>,
    head_moves: Arc<AtomicU64>,
}

impl AuditChain {
    /// Starts the writer task. The chain head is loaded (and the schema migrated) by the writer
    /// on its first successful connection; [`AuditChain::head_loaded`] tells when.
    pub fn start(
        target: crate::pg::PgTarget,
        chain_id: String,
        key_id: String,
        key: Key32,
        instance_id: String,
        opts: WriterOptions,
    ) -> Arc<AuditChain> {
        let (tx, rx) = mpsc::channel(opts.queue);
        let head_loaded = Arc::new(AtomicBool::new(false));
        let size = Arc::new(AtomicU64::new(0));
        let head_moves = Arc::new(AtomicU64::new(0));
        let (feed, _) = tokio::sync::broadcast::channel(1024);
        let signing = Arc::new(arc_swap::ArcSwap::from_pointee(HmacKey {
            id: key_id.into(),
            key,
        }));
        let writer = Writer {
            last_head_move: None,
            skew_checked: std::time::Instant::now(),
            feed: feed.clone(),
            target,
            chain_id: chain_id.into(),
            signing: signing.clone(),
            instance_id: instance_id.into(),
            opts,
            conn: None,
            head_loaded: head_loaded.clone(),
            size: size.clone(),
            head_moves: head_moves.clone(),
            requeue: tx.downgrade(),
            uncertain: std::collections::VecDeque::new(),
        };
        tokio::spawn(writer.run(rx));
        Arc::new(AuditChain {
            tx,
            signing,
            feed,
            head_loaded,
            size,
            head_moves,
        })
    }

    /// Seals batches dispatched from now on with `key` under `key_id` (a config reload rotating
    /// the HMAC key; batches already in flight keep the key they were sealed with, and each row
    /// names its key).
    pub fn rekey(&self, key_id: &str, key: Key32) {
        self.signing.store(Arc::new(HmacKey {
            id: key_id.into(),
            key,
        }));
    }

    /// Every committed decision, in seq order, as it commits (a slow subscriber may lag and
    /// miss rows; the chain itself never does).
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Arc<Committed>> {
        self.feed.subscribe()
    }

    pub fn head_loaded(&self) -> bool {
        self.head_loaded.load(Ordering::Acquire)
    }

    /// The chain size this process last committed or loaded.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// How many times a batch found the head moved by another writer and was appended again
    /// under the head row's lock (with the batches pipelined behind it).
    pub fn head_moves(&self) -> u64 {
        self.head_moves.load(Ordering::Relaxed)
    }

    /// Current queue depth.
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Waits until every decision queued so far is committed or failed (used on shutdown).
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Msg::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }

    pub async fn append(&self, draft: Draft) -> Result<u64, AuditError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .try_send(Msg::Append(Job { draft, done }))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => AuditError::QueueFull,
                mpsc::error::TrySendError::Closed(_) => AuditError::WriterGone,
            })?;
        wait.await.map_err(|_| AuditError::WriterGone)?
    }
}

/// Batches in flight on the writer's connection at most.
const PIPELINE_DEPTH: usize = 2;

/// After another writer moved the head, batches go one at a time for this long: while replicas
/// race for the head, a pipelined batch would only be taken back and appended again.
const CONTENDED_FOR: Duration = Duration::from_secs(1);

/// A sent batch, back from PostgreSQL.
struct Landed {
    jobs: Vec<Job>,
    /// The head size it was built on.
    size: i64,
    /// Some(new head) when it landed; None when the head was not the one expected.
    result: Result<Option<[u8; 32]>, AuditError>,
    started: std::time::Instant,
}

type InFlight =
    futures_util::stream::FuturesOrdered<futures_util::future::BoxFuture<'static, Landed>>;

struct Conn {
    /// Shared with the batches in flight; unique again when none is.
    client: Arc<Client>,
    lock_head: Statement,
    append: Statement,
    /// The head this writer last saw (size, mac); appends are conditioned on it.
    head: (i64, [u8; 32]),
    /// The transparency log's right edge at that head.
    edge: tlog::Edge,
}

/// The database's clock minus this host's, in ms (against the midpoint of the round trip).
async fn measure_skew(client: &Client) -> Result<i64, AuditError> {
    let before = now_ms();
    let row = client
        .query_one(
            "SELECT floor(extract(epoch from now()) * 1000)::bigint",
            &[],
        )
        .await
        .map_err(crate::pg::PgError::from)?;
    let after = now_ms();
    let db: i64 = row.get(0);
    Ok(db - (before + after) / 2)
}

/// Makes sure an acknowledged decision survives: the session commits at least at `min`
/// (`SET` here, then read back, so a role or database setting cannot weaken it), the server is
/// a writable primary (not in recovery, not read-only: after a failover to a standby that
/// has not been promoted, every write would fail anyway), and `remote_apply` has synchronous
/// standbys to wait for.
async fn ensure_durable(client: &Client, min: crate::config::SyncCommit) -> Result<(), AuditError> {
    let not = |why: String| AuditError::NotDurable(why);
    client
        .batch_execute(&format!("SET synchronous_commit TO {}", min.as_str()))
        .await
        .map_err(crate::pg::PgError::from)?;
    let row = client
        .query_one(
            "SELECT current_setting('synchronous_commit'), pg_is_in_recovery(), \
             current_setting('transaction_read_only'), \
             current_setting('synchronous_standby_names')",
            &[],
        )
        .await
        .map_err(crate::pg::PgError::from)?;
    let (level, recovery, read_only, standbys): (String, bool, String, String) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    if recovery {
        return Err(not("the server is a standby (in recovery)".into()));
    }
    if read_only == "on" {
        return Err(not("the session is read-only".into()));
    }
    if level != min.as_str() {
        return Err(not(format!(
            "synchronous_commit is {level}, not {}",
            min.as_str()
        )));
    }
    if min == crate::config::SyncCommit::RemoteApply && standbys.trim().is_empty() {
        return Err(not(
            "min_synchronous_commit is remote_apply but synchronous_standby_names is empty".into(),
        ));
    }
    Ok(())
}

/// How often a live connection's clock skew is checked again.
const SKEW_CHECK_EVERY: Duration = Duration::from_secs(30);

use crate::clock::unix_ms as now_ms;

struct Writer {
    /// When a batch last found the head moved by another writer.
    last_head_move: Option<std::time::Instant>,
    skew_checked: std::time::Instant,
    feed: tokio::sync::broadcast::Sender<Arc<Committed>>,
    target: crate::pg::PgTarget,
    // Shared with every batch in flight (a reference count, not a copy per batch).
    chain_id: Arc<str>,
    /// The HMAC key new batches are sealed with (a config reload may rotate it).
    signing: Arc<arc_swap::ArcSwap<HmacKey>>,
    instance_id: Arc<str>,
    opts: WriterOptions,
    conn: Option<Conn>,
    head_loaded: Arc<AtomicBool>,
    size: Arc<AtomicU64>,
    head_moves: Arc<AtomicU64>,
    /// The queue, for compensating rows (weak: it does not keep the queue open at shutdown).
    requeue: mpsc::WeakSender<Msg>,
    /// Compensating rows for ALLOW rows whose batch failed without a definite answer (a
    /// timeout, a lost connection): the rows may have committed all the same. Checked against
    /// the table once the writer is connected again.
    uncertain: std::collections::VecDeque<Draft>,
}

/// How often a writer with uncertain allows and nothing to do tries to settle them.
const UNCERTAIN_RETRY: Duration = Duration::from_secs(1);

/// Uncertain allows kept at most; past that the oldest are dropped (and logged).
const MAX_UNCERTAIN: usize = 20_000;

/// The reason of a compensating row: an ALLOW row committed, but its Check had already given
/// up (the deadline fired, or Envoy cancelled), so the agent saw no allow.
pub const ALLOW_NOT_DELIVERED: &str = "allow_not_delivered";

/// The DENY row that follows an ALLOW row whose Check was no longer waiting: same trace id and
/// request, so the chain says plainly that this allow never reached the agent.
fn compensation(allow: Draft) -> Draft {
    Draft {
        ts: SystemTime::now(),
        verdict: Verdict::Deny,
        reason: ALLOW_NOT_DELIVERED.to_string(),
        token_source: String::new(),
        token_fp: Vec::new(),
        ..allow
    }
}

/// One batch in one statement (one round trip, its own transaction): move the head row from
/// the head this writer expects ($26, $27) to the batch's last row ($28, $29) — the UPDATE takes
/// the head row's lock, as `SELECT ... FOR UPDATE` would, so replicas serialize on it — and
/// insert the rows and extend the transparency log's tiles ($30 to $33) only if the head moved:
/// a committed row is always in the tree. When another replica appended first, the UPDATE
/// matches nothing and nothing is inserted; the writer then appends under the head row's lock.
const APPEND_SQL: &str = "WITH moved AS ( \
    UPDATE aegis_chain_head SET size = $28, tree_size = $28, head_mac = $29, updated_at = now() \
    WHERE chain_id = $1 AND size = $26 AND tree_size = $26 AND head_mac = $27 RETURNING 1), \
  inserted AS ( \
    INSERT INTO aegis_audit (chain_id, seq, ts, trace_id, request_id, \
    decision, reason, issuer, subject, user_name, agent, workspace, method, path, token_source, \
    token_fp, key_id, instance_id, version, prev_mac, mac, actor_chain, statement_kind, \
    statement_fp, mcp_tool, statement_text) \
    SELECT $1, u.* FROM UNNEST($2::int8[], $3::timestamptz[], $4::text[], $5::text[], $6::text[], \
    $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[], \
    $14::text[], $15::text[], $16::bytea[], $17::text[], $18::text[], $19::int4[], $20::bytea[], \
    $21::bytea[], $22::text[], $23::text[], $24::bytea[], $25::text[], $34::text[]) AS u \
    WHERE EXISTS (SELECT 1 FROM moved) RETURNING 1), \
  tiles AS ( \
    INSERT INTO aegis_tlog_tiles (chain_id, level, idx, strip, hashes) \
    SELECT $1, t.* FROM UNNEST($30::int2[], $31::int8[], $32::int2[], $33::bytea[]) AS t \
    WHERE EXISTS (SELECT 1 FROM moved) \
    ON CONFLICT (chain_id, level, idx, strip) DO UPDATE SET hashes = EXCLUDED.hashes RETURNING 1) \
  SELECT (SELECT count(*) FROM moved), (SELECT count(*) FROM inserted), \
    (SELECT count(*) FROM tiles)";

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        // Load the head as soon as possible so readiness does not wait for the first request.
        loop {
            match self.ensure_conn().await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "audit store not ready; retrying");
                    metrics::gauge!("aegis_dependency_up", "dependency" => "postgres").set(0.0);
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        msg = rx.recv() => match msg {
                            // Requests that arrive before the store is reachable are refused.
                            Some(Msg::Append(job)) => { let _ = job.done.send(Err(AuditError::Store(crate::pg::PgError::NotConnected))); }
                            Some(Msg::Flush(done)) => { let _ = done.send(()); }
                            None => return,
                        }
                    }
                }
            }
        }
        use futures_util::StreamExt;
        let max_batch = self.opts.max_batch;
        let mut batch: Vec<Job> = Vec::with_capacity(max_batch);
        let mut inflight = InFlight::new();
        let mut open = true;
        while open || !inflight.is_empty() {
            tokio::select! {
                biased;
                Some(landed) = inflight.next(), if !inflight.is_empty() => {
                    self.settle(landed, &mut inflight).await;
                }
                // Allows whose batch failed without a definite answer are followed up even
                // when no new decision comes to bring the connection back.
                () = tokio::time::sleep(UNCERTAIN_RETRY), if !self.uncertain.is_empty() && inflight.is_empty() => {
                    if self.ensure_conn().await.is_ok() {
                        self.settle_uncertain().await;
                    }
                }
                msg = rx.recv(), if open && inflight.len() < self.depth() => {
                    let mut flush = None;
                    match msg {
                        None => {
                            open = false;
                            continue;
                        }
                        Some(Msg::Append(job)) => batch.push(job),
                        Some(Msg::Flush(done)) => flush = Some(done),
                    }
                    while flush.is_none() && batch.len() < max_batch {
                        match rx.try_recv() {
                            Ok(Msg::Append(job)) => batch.push(job),
                            Ok(Msg::Flush(done)) => flush = Some(done),
                            Err(_) => break,
                        }
                    }
                    metrics::gauge!("aegis_audit_queue_depth").set(rx.len() as f64);
                    if !batch.is_empty() {
                        let jobs = std::mem::replace(&mut batch, Vec::with_capacity(max_batch));
                        self.dispatch(jobs, &mut inflight).await;
                    }
                    if let Some(done) = flush {
                        // Everything queued before it has been sent: wait until it has landed.
                        while let Some(landed) = inflight.next().await {
                            self.settle(landed, &mut inflight).await;
                        }
                        let _ = done.send(());
                    }
                }
            }
        }
    }

    /// How many batches may be in flight now.
    fn depth(&self) -> usize {
        match self.last_head_move {
            Some(at) if at.elapsed() < CONTENDED_FOR => 1,
            _ => PIPELINE_DEPTH,
        }
    }

    /// Seals `jobs` on the head the last batch sent will leave and sends it, pipelined.
    async fn dispatch(&mut self, jobs: Vec<Job>, inflight: &mut InFlight) {
        metrics::histogram!("aegis_audit_batch_size").record(jobs.len() as f64);
        if let Err(e) = self.ensure_conn().await {
            self.fail(jobs, e);
            return;
        }
        let Some(conn) = self.conn.as_mut() else {
            self.fail(jobs, AuditError::Store(crate::pg::PgError::NotConnected));
            return;
        };
        let current = self.signing.load_full();
        let signer = Signer {
            chain_id: &self.chain_id,
            key_id: &current.id,
            key: &current.key,
            instance_id: &self.instance_id,
        };
        let (size, head) = conn.head;
        let sealed = match seal(&signer, &jobs, size, head, &mut conn.edge) {
            Ok(s) => s,
            Err(e) => {
                self.fail(jobs, e);
                return;
            }
        };
        conn.head = (size + jobs.len() as i64, sealed.new_head);
        let client = conn.client.clone();
        let append = conn.append.clone();
        let ids = [
            self.chain_id.clone(),
            current.id.clone(),
            self.instance_id.clone(),
        ];
        let timeout = self.opts.commit_timeout;
        inflight.push_back(Box::pin(async move {
            let started = std::time::Instant::now();
            let [chain_id, key_id, instance_id] = &ids;
            let sent = send(
                &*client,
                &append,
                (chain_id, key_id, instance_id),
                &jobs,
                &sealed,
            );
            let result = match tokio::time::timeout(timeout, sent).await {
                Ok(r) => r,
                Err(_) => Err(AuditError::Timeout),
            };
            Landed {
                jobs,
                size,
                result,
                started,
            }
        }));
    }

    /// Handles the oldest batch in flight coming back.
    async fn settle(&mut self, landed: Landed, inflight: &mut InFlight) {
        use futures_util::StreamExt;
        metrics::histogram!("aegis_audit_append_seconds")
            .record(landed.started.elapsed().as_secs_f64());
        match landed.result {
            Ok(Some(_)) => self.answer(landed.jobs, landed.size as u64 + 1),
            Ok(None) => {
                // Another replica appended first. Every batch still in flight expects this one's
                // head, so none of them lands either: take them back, then append each again,
                // in order, under the head row's lock.
                self.head_moves.fetch_add(1, Ordering::Relaxed);
                self.last_head_move = Some(std::time::Instant::now());
                metrics::counter!("aegis_audit_head_moved_total").increment(1);
                let mut again = vec![landed.jobs];
                while let Some(later) = inflight.next().await {
                    match later.result {
                        // Not expected, but committed: answer it.
                        Ok(Some(_)) => self.answer(later.jobs, later.size as u64 + 1),
                        Ok(None) => again.push(later.jobs),
                        Err(e) => self.fail(later.jobs, e),
                    }
                }
                let timeout = self.opts.commit_timeout;
                for jobs in again {
                    let locked = self.commit_locked(&jobs);
                    let result = match tokio::time::timeout(timeout, locked).await {
                        Ok(r) => r,
                        Err(_) => Err(AuditError::Timeout),
                    };
                    match result {
                        Ok(first_seq) => self.answer(jobs, first_seq),
                        Err(e) => self.fail(jobs, e),
                    }
                }
            }
            Err(e) => {
                // The batches after it expect its head; whatever they did, this connection
                // starts over.
                self.fail(landed.jobs, e.clone());
                while let Some(later) = inflight.next().await {
                    match later.result {
                        Ok(Some(_)) => self.answer(later.jobs, later.size as u64 + 1),
                        _ => self.fail(later.jobs, e.clone()),
                    }
                }
            }
        }
    }

    /// Answers a committed batch whose first row is `first_seq`.
    fn answer(&self, jobs: Vec<Job>, first_seq: u64) {
        metrics::gauge!("aegis_dependency_up", "dependency" => "postgres").set(1.0);
        self.size
            .fetch_max(first_seq + jobs.len() as u64 - 1, Ordering::AcqRel);
        let watched = self.feed.receiver_count() > 0;
        for (i, job) in jobs.into_iter().enumerate() {
            let seq = first_seq + i as u64;
            if watched {
                let d = &job.draft;
                let _ = self.feed.send(Arc::new(Committed {
                    seq,
                    ts_unix_micros: crate::clock::unix_micros_of(d.ts),
                    trace_id: d.trace_id.clone(),
                    decision: d.verdict.as_str(),
                    reason: d.reason.clone(),
                    user_name: d.user_name.clone(),
                    agent: d.agent.clone(),
                    workspace: d.workspace.clone(),
                    method: d.method.clone(),
                    path: d.path.clone(),
                    actor_chain: d.actor_chain.clone(),
                }));
            }
            let Job { draft, done } = job;
            if done.send(Ok(seq)).is_err() && draft.verdict == Verdict::Allow {
                // Nobody waits for this allow any more: record that it was not delivered.
                self.compensate(compensation(draft));
            }
        }
    }

    /// Queues the compensating row of an allow that committed but was not delivered.
    fn compensate(&self, row: Draft) {
        metrics::counter!("aegis_audit_allow_not_delivered_total").increment(1);
        let (done, _) = oneshot::channel();
        let job = Job { draft: row, done };
        let queued = self
            .requeue
            .upgrade()
            .map(|tx| tx.try_send(Msg::Append(job)).is_ok());
        if queued != Some(true) {
            tracing::error!("could not queue the compensating row of an undelivered allow");
        }
    }

    /// After a reconnect: which uncertain allows did commit? Each gets its compensating row.
    async fn settle_uncertain(&mut self) {
        if self.uncertain.is_empty() {
            return;
        }
        let Some(conn) = &self.conn else { return };
        let traces: Vec<&str> = self.uncertain.iter().map(|d| d.trace_id.as_str()).collect();
        let found = tokio::time::timeout(
            self.opts.commit_timeout,
            conn.client.query(
                "SELECT trace_id FROM aegis_audit WHERE chain_id = $1 AND decision = 'ALLOW' \
                 AND trace_id = ANY($2)",
                &[&&*self.chain_id, &traces],
            ),
        )
        .await;
        let Ok(Ok(rows)) = found else {
            // Try again at the next reconnect; nothing is lost.
            return;
        };
        let committed: std::collections::HashSet<String> =
            rows.iter().map(|r| r.get::<_, String>(0)).collect();
        for row in std::mem::take(&mut self.uncertain) {
            if committed.contains(&row.trace_id) {
                self.compensate(row);
            }
        }
    }

    /// Denies a batch that did not commit; the connection starts over (it may be dead or
    /// mid-transaction, and the head it expects is unknown).
    fn fail(&mut self, jobs: Vec<Job>, e: AuditError) {
        tracing::warn!(error = %e, batch = jobs.len(), "audit commit failed; denying the batch");
        metrics::gauge!("aegis_dependency_up", "dependency" => "postgres").set(0.0);
        metrics::counter!("aegis_audit_commit_failures_total").increment(1);
        self.conn = None;
        for job in jobs {
            // An allow whose batch may still have committed: checked once connected again.
            if job.draft.verdict == Verdict::Allow {
                if self.uncertain.len() >= MAX_UNCERTAIN {
                    tracing::error!("too many uncertain allows; the oldest is not followed up");
                    self.uncertain.pop_front();
                }
                self.uncertain.push_back(compensation(job.draft.clone()));
            }
            let _ = job.done.send(Err(e.clone()));
        }
    }

    async fn ensure_conn(&mut self) -> Result<(), AuditError> {
        if let Some(c) = &self.conn {
            if !c.client.is_closed() {
                if self.skew_checked.elapsed() < SKEW_CHECK_EVERY {
                    return Ok(());
                }
                let skew = measure_skew(&c.client).await;
                if let Err(e) = skew.and_then(|s| self.judge_skew(s)) {
                    self.conn = None;
                    self.head_loaded.store(false, Ordering::Release);
                    return Err(e);
                }
                return Ok(());
            }
        }
        self.conn = None;
        let client = self
            .target
            .connect(self.opts.connect_timeout, "aegis")
            .await?;
        if let Err(e) = measure_skew(&client).await.and_then(|s| self.judge_skew(s)) {
            self.head_loaded.store(false, Ordering::Release);
            return Err(e);
        }
        if let Err(e) = ensure_durable(&client, self.opts.min_synchronous_commit).await {
            tracing::error!(error = %e, "refusing the audit store");
            self.head_loaded.store(false, Ordering::Release);
            return Err(e);
        }
        let mut client = client;
        let migrate = self.opts.migrate_on_start;
        let prepared = async {
            schema::ensure(&client, migrate).await?;
            schema::load_head(&client, &self.chain_id).await?;
            // A chain from before the transparency log: build its tiles first.
            let added = tiles::catch_up(&mut client, &self.chain_id)
                .await
                .map_err(schema::SchemaError::Inconsistent)?;
            if added > 0 {
                tracing::info!(rows = added, "transparency log built for existing rows");
            }
            let lock_head = client
                .prepare(
                    "SELECT size, head_mac FROM aegis_chain_head WHERE chain_id = $1 FOR UPDATE",
                )
                .await?;
            let append = client.prepare(APPEND_SQL).await?;
            let row = client
                .query_one(
                    "SELECT size, head_mac FROM aegis_chain_head WHERE chain_id = $1",
                    &[&&*self.chain_id],
                )
                .await?;
            let size: i64 = row.get(0);
            let mac: Vec<u8> = row.get(1);
            let mac: [u8; 32] = mac.try_into().map_err(|_| {
                schema::SchemaError::Inconsistent("chain head mac is not 32 bytes".into())
            })?;
            let edge = tiles::load_edge(&client, &self.chain_id, size as u64)
                .await
                .map_err(schema::SchemaError::Inconsistent)?;
            Ok::<_, schema::SchemaError>(((size, mac), edge, lock_head, append))
        };
        let (head, edge, lock_head, append) =
            tokio::time::timeout(self.opts.commit_timeout * 4, prepared)
                .await
                .map_err(|_| AuditError::Timeout)?
                .map_err(|e| match e {
                    schema::SchemaError::Inconsistent(why) => AuditError::Inconsistent(why),
                    schema::SchemaError::Pg(e) => AuditError::Store(e.into()),
                })?;
        self.size.store(head.0 as u64, Ordering::Release);
        self.head_loaded.store(true, Ordering::Release);
        self.conn = Some(Conn {
            client: Arc::new(client),
            lock_head,
            append,
            head,
            edge,
        });
        self.settle_uncertain().await;
        Ok(())
    }

    fn judge_skew(&mut self, skew: i64) -> Result<(), AuditError> {
        self.skew_checked = std::time::Instant::now();
        metrics::gauge!("aegis_clock_skew_seconds").set(skew as f64 / 1000.0);
        if skew.unsigned_abs() as u128 > self.opts.max_clock_skew.as_millis() {
            tracing::error!(
                skew_ms = skew,
                "clock skew against postgres is over the limit; not serving"
            );
            return Err(AuditError::ClockSkew(skew));
        }
        Ok(())
    }

    /// Appends one batch inside a transaction that first locks the head row (`SELECT ... FOR
    /// UPDATE`), which cannot lose to another replica; returns the seq of its first record. Only
    /// called with nothing in flight.
    async fn commit_locked(&mut self, batch: &[Job]) -> Result<u64, AuditError> {
        self.ensure_conn().await?;
        let Some(conn) = self.conn.as_mut() else {
            return Err(AuditError::Store(crate::pg::PgError::NotConnected));
        };
        let pg = |e: tokio_postgres::Error| AuditError::Store(e.into());
        let current = self.signing.load_full();
        let signer = Signer {
            chain_id: &self.chain_id,
            key_id: &current.id,
            key: &current.key,
            instance_id: &self.instance_id,
        };
        let Some(client) = Arc::get_mut(&mut conn.client) else {
            return Err(AuditError::Store(crate::pg::PgError::State(
                "audit connection still has batches in flight",
            )));
        };
        // Another replica appended first: take the head row's lock, then append behind it.
        let tx = client.transaction().await.map_err(pg)?;
        let row = tx
            .query_opt(&conn.lock_head, &[&&*self.chain_id])
            .await
            .map_err(pg)?
            .ok_or_else(|| AuditError::Inconsistent("chain head row is missing".into()))?;
        let size: i64 = row.get(0);
        let mac: Vec<u8> = row.get(1);
        let head: [u8; 32] = mac
            .try_into()
            .map_err(|_| AuditError::Inconsistent("chain head mac is not 32 bytes".into()))?;
        let mut edge = tiles::load_edge(&tx, &self.chain_id, size as u64)
            .await
            .map_err(AuditError::Inconsistent)?;
        let Some(new_head) =
            append_once(&signer, &tx, &conn.append, batch, size, head, &mut edge).await?
        else {
            return Err(AuditError::Inconsistent(
                "the chain head moved while its row was locked".into(),
            ));
        };
        tx.commit().await.map_err(pg)?;
        conn.head = (size + batch.len() as i64, new_head);
        conn.edge = edge;
        Ok(size as u64 + 1)
    }
}

/// What a writer signs records with.
struct Signer<'a> {
    chain_id: &'a str,
    key_id: &'a str,
    key: &'a Key32,
    instance_id: &'a str,
}

/// A batch sealed on top of a head: its seqs, timestamps, links and MACs.
struct Sealed {
    seqs: Vec<i64>,
    tss: Vec<SystemTime>,
    versions: Vec<i32>,
    prevs: Vec<Vec<u8>>,
    macs: Vec<Vec<u8>>,
    /// The transparency-log tile strips the batch changes, as columns.
    tiles: tiles::Columns,
    /// The head it builds on, and the one it leaves.
    size: i64,
    head: [u8; 32],
    new_head: [u8; 32],
}

/// Computes `batch`'s rows on top of (`size`, `head`), and extends `edge` (the tree at `size`)
/// with their leaves.
fn seal(
    signer: &Signer<'_>,
    batch: &[Job],
    size: i64,
    head: [u8; 32],
    edge: &mut tlog::Edge,
) -> Result<Sealed, AuditError> {
    if size < 0 {
        return Err(AuditError::Inconsistent(
            "chain head size is negative".into(),
        ));
    }
    if edge.size() != size as u64 {
        return Err(AuditError::Inconsistent(format!(
            "the transparency log holds {} leaves but the chain {size} rows",
            edge.size()
        )));
    }
    let n = batch.len();
    let mut out = Sealed {
        seqs: Vec::with_capacity(n),
        tss: Vec::with_capacity(n),
        versions: Vec::with_capacity(n),
        prevs: Vec::with_capacity(n),
        macs: Vec::with_capacity(n),
        tiles: Default::default(),
        size,
        head,
        new_head: head,
    };
    let mut leaves = Vec::with_capacity(n);
    let mut buf = Vec::with_capacity(512);
    let mut prev = head;
    let first_seq = size as u64 + 1;
    // One record reused for the whole batch: `clone_from` keeps its buffers, so MACing a batch
    // does not allocate every field of every row again.
    let mut rec = AuditRecord {
        version: RECORD_VERSION,
        chain_id: signer.chain_id.to_string(),
        key_id: signer.key_id.to_string(),
        instance_id: signer.instance_id.to_string(),
        ..AuditRecord::default()
    };
    for (i, job) in batch.iter().enumerate() {
        let d = &job.draft;
        let seq = first_seq + i as u64;
        let micros = crate::clock::unix_micros_of(d.ts);
        rec.seq = seq;
        rec.ts_unix_micros = micros;
        rec.decision = match d.verdict {
            Verdict::Allow => Decision::Allow as i32,
            Verdict::Deny => Decision::Deny as i32,
            Verdict::Admin => Decision::Admin as i32,
        };
        rec.trace_id.clone_from(&d.trace_id);
        rec.request_id.clone_from(&d.request_id);
        rec.reason.clone_from(&d.reason);
        rec.issuer.clone_from(&d.issuer);
        rec.subject.clone_from(&d.subject);
        rec.user_name.clone_from(&d.user_name);
        rec.agent.clone_from(&d.agent);
        rec.workspace.clone_from(&d.workspace);
        rec.method.clone_from(&d.method);
        rec.path.clone_from(&d.path);
        rec.token_source.clone_from(&d.token_source);
        rec.token_fingerprint.clone_from(&d.token_fp);
        rec.actor_chain.clone_from(&d.actor_chain);
        rec.statement_kind.clone_from(&d.statement_kind);
        rec.statement_fingerprint.clone_from(&d.statement_fp);
        rec.mcp_tool.clone_from(&d.mcp_tool);
        rec.statement_text.clone_from(&d.statement_text);
        rec.prev_mac.clear();
        rec.prev_mac.extend_from_slice(&prev);
        let (mac, leaf) = rec.mac_and_leaf(signer.key.expose(), &mut buf);
        if buf.len() > u16::MAX as usize {
            // A transparency-log entry is at most 65,535 bytes; the drafts' fields are bounded
            // far below that, so this is a bug, refused rather than written.
            return Err(AuditError::Inconsistent(format!(
                "record {seq} is {} bytes, over the 65,535 an entry may have",
                buf.len()
            )));
        }
        leaves.push(leaf);
        out.seqs.push(seq as i64);
        out.tss
            .push(UNIX_EPOCH + Duration::from_micros(micros.max(0) as u64));
        out.versions.push(RECORD_VERSION as i32);
        out.prevs.push(prev.to_vec());
        out.macs.push(mac.to_vec());
        prev = mac;
    }
    out.new_head = prev;
    out.tiles = tiles::columns(&edge.extend_tracked(leaves));
    Ok(out)
}

/// Runs [`APPEND_SQL`] for a sealed batch: the new head mac when the head moved (the rows are
/// in), `None` when the head was not the expected one (nothing written).
async fn send<C: tokio_postgres::GenericClient>(
    client: &C,
    append: &Statement,
    (chain_id, key_id, instance_id): (&str, &str, &str),
    batch: &[Job],
    sealed: &Sealed,
) -> Result<Option<[u8; 32]>, AuditError> {
    let n = batch.len();
    let mut cols: [Vec<&str>; 17] = Default::default();
    let mut fps = Vec::with_capacity(n);
    let mut statement_fps = Vec::with_capacity(n);
    for job in batch {
        let d = &job.draft;
        cols[0].push(&d.trace_id);
        cols[1].push(&d.request_id);
        cols[2].push(d.verdict.as_str());
        cols[3].push(&d.reason);
        cols[4].push(&d.issuer);
        cols[5].push(&d.subject);
        cols[6].push(&d.user_name);
        cols[7].push(&d.agent);
        cols[8].push(&d.workspace);
        cols[9].push(&d.method);
        cols[10].push(&d.path);
        cols[11].push(&d.token_source);
        cols[12].push(key_id);
        cols[13].push(&d.actor_chain);
        cols[14].push(&d.statement_kind);
        cols[15].push(&d.mcp_tool);
        cols[16].push(&d.statement_text);
        fps.push(d.token_fp.as_slice());
        statement_fps.push(d.statement_fp.as_slice());
    }
    let instance: Vec<&str> = vec![instance_id; n];
    let new_size = sealed.size + n as i64;
    let [trace, request, decision, reason, issuer, subject, user, agent, workspace, method, path, source, key_ids, actors, kinds, tools, texts] =
        &cols;
    let row = client
        .query_one(
            append,
            &[
                &chain_id,
                &sealed.seqs,
                &sealed.tss,
                trace,
                request,
                decision,
                reason,
                issuer,
                subject,
                user,
                agent,
                workspace,
                method,
                path,
                source,
                &fps,
                key_ids,
                &instance,
                &sealed.versions,
                &sealed.prevs,
                &sealed.macs,
                actors,
                kinds,
                &statement_fps,
                tools,
                &sealed.size,
                &sealed.head.as_slice(),
                &new_size,
                &sealed.new_head.as_slice(),
                &sealed.tiles.0,
                &sealed.tiles.1,
                &sealed.tiles.2,
                &sealed.tiles.3,
                texts,
            ],
        )
        .await
        .map_err(crate::pg::PgError::from)?;
    let moved: i64 = row.get(0);
    let inserted: i64 = row.get(1);
    let tiles: i64 = row.get(2);
    let want_tiles = sealed.tiles.0.len() as i64;
    match (moved, inserted, tiles) {
        (1, k, t) if k == n as i64 && t == want_tiles => Ok(Some(sealed.new_head)),
        (0, 0, 0) => Ok(None),
        _ => Err(AuditError::Inconsistent(format!(
            "append moved {moved} head rows, inserted {inserted} of {n} rows and wrote \
             {tiles} of {want_tiles} tiles"
        ))),
    }
}

/// Seals and sends `batch` on top of (`size`, `head`) (see [`send`]).
async fn append_once<C: tokio_postgres::GenericClient>(
    signer: &Signer<'_>,
    client: &C,
    append: &Statement,
    batch: &[Job],
    size: i64,
    head: [u8; 32],
    edge: &mut tlog::Edge,
) -> Result<Option<[u8; 32]>, AuditError> {
    let sealed = seal(signer, batch, size, head, edge)?;
    let ids = (signer.chain_id, signer.key_id, signer.instance_id);
    send(client, append, ids, batch, &sealed).await
}
