//! The audit chain: one HMAC-chained row per decision in Postgres, appended with group commit.
//!
//! Requests enqueue a [`Draft`] and wait for their batch. The writer takes everything queued,
//! opens one transaction, locks the chain's head row (`SELECT ... FOR UPDATE`, so replicas
//! sharing a chain serialize and never fork or leave a gap), assigns gapless seqs, computes each
//! MAC over the canonical record ([`record`]), inserts the batch, moves the head and commits.
//! Only then are the waiting requests answered. If the queue is full or the commit fails, every
//! waiter gets an error and the pipeline denies (503): never an allow without its row.

pub mod checkpoint;
pub mod pg;
pub mod record;
pub mod schema;
pub mod verify;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};
use tokio_postgres::{Client, Statement};

use crate::authz::Audit;
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
    Store(String),
    #[error("audit commit timed out")]
    Timeout,
    #[error("this host's clock is {0} ms away from the database's")]
    ClockSkew(i64),
    #[error("audit chain head is inconsistent: {0}")]
    Inconsistent(String),
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
            migrate_on_start: true,
            max_clock_skew: Duration::from_secs(5),
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

/// The handle requests append through.
pub struct AuditChain {
    tx: mpsc::Sender<Msg>,
    feed: tokio::sync::broadcast::Sender<Arc<Committed>>,
    head_loaded: Arc<AtomicBool>,
    size: Arc<AtomicU64>,
}

impl AuditChain {
    /// Starts the writer task. The chain head is loaded (and the schema migrated) by the writer
    /// on its first successful connection; [`AuditChain::head_loaded`] tells when.
    pub fn start(
        target: pg::PgTarget,
        chain_id: String,
        key_id: String,
        key: Key32,
        instance_id: String,
        opts: WriterOptions,
    ) -> Arc<AuditChain> {
        let (tx, rx) = mpsc::channel(opts.queue);
        let head_loaded = Arc::new(AtomicBool::new(false));
        let size = Arc::new(AtomicU64::new(0));
        let (feed, _) = tokio::sync::broadcast::channel(1024);
        let writer = Writer {
            skew_checked: std::time::Instant::now(),
            feed: feed.clone(),
            target,
            chain_id,
            key_id,
            key,
            instance_id,
            opts,
            conn: None,
            head_loaded: head_loaded.clone(),
            size: size.clone(),
        };
        tokio::spawn(writer.run(rx));
        Arc::new(AuditChain {
            tx,
            feed,
            head_loaded,
            size,
        })
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

impl Audit for Arc<AuditChain> {
    async fn append(&self, draft: Draft) -> Result<u64, AuditError> {
        AuditChain::append(self, draft).await
    }
}

struct Conn {
    client: Client,
    lock_head: Statement,
    append: Statement,
    /// The head this writer last saw (size, mac); appends are conditioned on it.
    head: (i64, [u8; 32]),
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
        .map_err(|e| AuditError::Store(pg_error_text(&e)))?;
    let after = now_ms();
    let db: i64 = row.get(0);
    Ok(db - (before + after) / 2)
}

/// How often a live connection's clock skew is checked again.
const SKEW_CHECK_EVERY: Duration = Duration::from_secs(30);

use crate::clock::unix_ms as now_ms;

struct Writer {
    skew_checked: std::time::Instant,
    feed: tokio::sync::broadcast::Sender<Arc<Committed>>,
    target: pg::PgTarget,
    chain_id: String,
    key_id: String,
    key: Key32,
    instance_id: String,
    opts: WriterOptions,
    conn: Option<Conn>,
    head_loaded: Arc<AtomicBool>,
    size: Arc<AtomicU64>,
}

/// One batch in one statement (one round trip, its own transaction): move the head row from
/// the head this writer expects ($23, $24) to the batch's last row ($25, $26) — the UPDATE takes
/// the head row's lock, as `SELECT ... FOR UPDATE` would, so replicas serialize on it — and
/// insert the rows only if the head moved. When another replica appended first, the UPDATE
/// matches nothing and nothing is inserted; the writer then appends under the head row's lock.
const APPEND_SQL: &str = "WITH moved AS ( \
    UPDATE aegis_chain_head SET size = $25, head_mac = $26, updated_at = now() \
    WHERE chain_id = $1 AND size = $23 AND head_mac = $24 RETURNING 1), \
  inserted AS ( \
    INSERT INTO aegis_audit (chain_id, seq, ts, trace_id, request_id, \
    decision, reason, issuer, subject, user_name, agent, workspace, method, path, token_source, \
    token_fp, key_id, instance_id, version, prev_mac, mac, actor_chain) \
    SELECT $1, u.* FROM UNNEST($2::int8[], $3::timestamptz[], $4::text[], $5::text[], $6::text[], \
    $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[], \
    $14::text[], $15::text[], $16::bytea[], $17::text[], $18::text[], $19::int4[], $20::bytea[], \
    $21::bytea[], $22::text[]) AS u WHERE EXISTS (SELECT 1 FROM moved) RETURNING 1) \
  SELECT (SELECT count(*) FROM moved), (SELECT count(*) FROM inserted)";

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
                            Some(Msg::Append(job)) => { let _ = job.done.send(Err(AuditError::Store("not connected".into()))); }
                            Some(Msg::Flush(done)) => { let _ = done.send(()); }
                            None => return,
                        }
                    }
                }
            }
        }
        let mut batch: Vec<Job> = Vec::with_capacity(self.opts.max_batch);
        while let Some(msg) = rx.recv().await {
            let mut flush = None;
            match msg {
                Msg::Append(job) => batch.push(job),
                Msg::Flush(done) => {
                    let _ = done.send(());
                    continue;
                }
            }
            while batch.len() < self.opts.max_batch {
                match rx.try_recv() {
                    Ok(Msg::Append(job)) => batch.push(job),
                    Ok(Msg::Flush(done)) => {
                        flush = Some(done);
                        break;
                    }
                    Err(_) => break,
                }
            }
            metrics::histogram!("aegis_audit_batch_size").record(batch.len() as f64);
            metrics::gauge!("aegis_audit_queue_depth").set(rx.len() as f64);
            let started = std::time::Instant::now();
            let result =
                match tokio::time::timeout(self.opts.commit_timeout, self.commit(&batch)).await {
                    Ok(r) => r,
                    Err(_) => Err(AuditError::Timeout),
                };
            metrics::histogram!("aegis_audit_append_seconds")
                .record(started.elapsed().as_secs_f64());
            match result {
                Ok(first_seq) => {
                    metrics::gauge!("aegis_dependency_up", "dependency" => "postgres").set(1.0);
                    let watched = self.feed.receiver_count() > 0;
                    for (i, job) in batch.drain(..).enumerate() {
                        let seq = first_seq + i as u64;
                        if watched {
                            let d = &job.draft;
                            let _ = self.feed.send(Arc::new(Committed {
                                seq,
                                ts_unix_micros: d
                                    .ts
                                    .duration_since(UNIX_EPOCH)
                                    .map(|t| t.as_micros() as i64)
                                    .unwrap_or(0),
                                trace_id: d.trace_id.clone(),
                                decision: d.verdict.as_str(),
                                reason: d.reason.clone(),
                                user_name: d.user_name.clone(),
                                agent: d.agent.clone(),
                                workspace: d.workspace.clone(),
                                method: d.method.clone(),
                                path: d.path.clone(),
                            }));
                        }
                        let _ = job.done.send(Ok(seq));
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, batch = batch.len(), "audit commit failed; denying the batch");
                    metrics::gauge!("aegis_dependency_up", "dependency" => "postgres").set(0.0);
                    metrics::counter!("aegis_audit_commit_failures_total").increment(1);
                    // The connection may be mid-transaction or dead: start over.
                    self.conn = None;
                    for job in batch.drain(..) {
                        let _ = job.done.send(Err(e.clone()));
                    }
                }
            }
            if let Some(done) = flush {
                let _ = done.send(());
            }
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
            .await
            .map_err(AuditError::Store)?;
        if let Err(e) = measure_skew(&client).await.and_then(|s| self.judge_skew(s)) {
            self.head_loaded.store(false, Ordering::Release);
            return Err(e);
        }
        let migrate = self.opts.migrate_on_start;
        let prepared = async {
            schema::ensure(&client, migrate).await?;
            schema::load_head(&client, &self.chain_id).await?;
            let lock_head = client
                .prepare(
                    "SELECT size, head_mac FROM aegis_chain_head WHERE chain_id = $1 FOR UPDATE",
                )
                .await?;
            let append = client.prepare(APPEND_SQL).await?;
            let row = client
                .query_one(
                    "SELECT size, head_mac FROM aegis_chain_head WHERE chain_id = $1",
                    &[&self.chain_id],
                )
                .await?;
            let size: i64 = row.get(0);
            let mac: Vec<u8> = row.get(1);
            let mac: [u8; 32] = mac.try_into().map_err(|_| {
                schema::SchemaError::Inconsistent("chain head mac is not 32 bytes".into())
            })?;
            Ok::<_, schema::SchemaError>(((size, mac), lock_head, append))
        };
        let (head, lock_head, append) =
            tokio::time::timeout(self.opts.commit_timeout * 4, prepared)
                .await
                .map_err(|_| AuditError::Timeout)?
                .map_err(|e| match e {
                    schema::SchemaError::Inconsistent(why) => AuditError::Inconsistent(why),
                    schema::SchemaError::Pg(e) => AuditError::Store(pg_error_text(&e)),
                })?;
        self.size.store(head.0 as u64, Ordering::Release);
        self.head_loaded.store(true, Ordering::Release);
        self.conn = Some(Conn {
            client,
            lock_head,
            append,
            head,
        });
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

    /// Appends one batch; returns the seq of its first record.
    ///
    /// First optimistically, in one statement conditioned on the head this writer last saw (one
    /// round trip). If another replica moved the head, the batch is appended again inside a
    /// transaction that first locks the head row (`SELECT ... FOR UPDATE`), which cannot lose.
    async fn commit(&mut self, batch: &[Job]) -> Result<u64, AuditError> {
        self.ensure_conn().await?;
        let Some(conn) = self.conn.as_mut() else {
            return Err(AuditError::Store("not connected".into()));
        };
        let pg = |e: tokio_postgres::Error| AuditError::Store(pg_error_text(&e));
        let signer = Signer {
            chain_id: &self.chain_id,
            key_id: &self.key_id,
            key: &self.key,
            instance_id: &self.instance_id,
        };
        let (size, head) = conn.head;
        if let Some(new_head) =
            append_once(&signer, &conn.client, &conn.append, batch, size, head).await?
        {
            let new_size = size + batch.len() as i64;
            conn.head = (new_size, new_head);
            self.size.store(new_size as u64, Ordering::Release);
            return Ok(size as u64 + 1);
        }
        // Another replica appended first: take the head row's lock, then append behind it.
        let tx = conn.client.transaction().await.map_err(pg)?;
        let row = tx
            .query_opt(&conn.lock_head, &[&self.chain_id])
            .await
            .map_err(pg)?
            .ok_or_else(|| AuditError::Inconsistent("chain head row is missing".into()))?;
        let size: i64 = row.get(0);
        let mac: Vec<u8> = row.get(1);
        let head: [u8; 32] = mac
            .try_into()
            .map_err(|_| AuditError::Inconsistent("chain head mac is not 32 bytes".into()))?;
        let Some(new_head) = append_once(&signer, &tx, &conn.append, batch, size, head).await?
        else {
            return Err(AuditError::Inconsistent(
                "the chain head moved while its row was locked".into(),
            ));
        };
        tx.commit().await.map_err(pg)?;
        let new_size = size + batch.len() as i64;
        conn.head = (new_size, new_head);
        self.size.store(new_size as u64, Ordering::Release);
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

/// Runs [`APPEND_SQL`] for `batch` on top of (`size`, `head`): the new head mac when the head
/// moved (the rows are in), `None` when the head was not the expected one (nothing written).
async fn append_once<C: tokio_postgres::GenericClient>(
    signer: &Signer<'_>,
    client: &C,
    append: &Statement,
    batch: &[Job],
    size: i64,
    head: [u8; 32],
) -> Result<Option<[u8; 32]>, AuditError> {
    if size < 0 {
        return Err(AuditError::Inconsistent(
            "chain head size is negative".into(),
        ));
    }
    let mut prev = head;
    let n = batch.len();
    let mut seqs = Vec::with_capacity(n);
    let mut tss = Vec::with_capacity(n);
    let mut cols: [Vec<&str>; 14] = Default::default();
    let mut fps = Vec::with_capacity(n);
    let mut versions = Vec::with_capacity(n);
    let mut prevs = Vec::with_capacity(n);
    let mut macs = Vec::with_capacity(n);
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
        let micros =
            d.ts.duration_since(UNIX_EPOCH)
                .map(|t| t.as_micros() as i64)
                .unwrap_or(0);
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
        rec.prev_mac.clear();
        rec.prev_mac.extend_from_slice(&prev);
        let mac = rec.mac(signer.key.expose());
        seqs.push(seq as i64);
        tss.push(UNIX_EPOCH + Duration::from_micros(micros.max(0) as u64));
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
        cols[12].push(signer.key_id);
        cols[13].push(&d.actor_chain);
        fps.push(d.token_fp.as_slice());
        versions.push(RECORD_VERSION as i32);
        prevs.push(prev.to_vec());
        macs.push(mac.to_vec());
        prev = mac;
    }
    let instance: Vec<&str> = vec![signer.instance_id; n];
    let new_size = size + n as i64;
    let [trace, request, decision, reason, issuer, subject, user, agent, workspace, method, path, source, key_ids, actors] =
        &cols;
    let row = client
        .query_one(
            append,
            &[
                &signer.chain_id,
                &seqs,
                &tss,
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
                &versions,
                &prevs,
                &macs,
                actors,
                &size,
                &head.as_slice(),
                &new_size,
                &prev.as_slice(),
            ],
        )
        .await
        .map_err(|e| AuditError::Store(pg_error_text(&e)))?;
    let moved: i64 = row.get(0);
    let inserted: i64 = row.get(1);
    match (moved, inserted) {
        (1, k) if k == n as i64 => Ok(Some(prev)),
        (0, 0) => Ok(None),
        _ => Err(AuditError::Inconsistent(format!(
            "append moved {moved} head rows and inserted {inserted} of {n} rows"
        ))),
    }
}

/// A Postgres error as text safe for logs (never the connection string or a parameter value).
pub fn pg_error_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => {
            if e.is_closed() {
                "connection closed".to_string()
            } else {
                "connection error".to_string()
            }
        }
    }
}
