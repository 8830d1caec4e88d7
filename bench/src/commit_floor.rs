//! The commit floor: what PostgreSQL itself needs to make one audit-shaped row durable per
//! decision at the offered rate, with nothing of aegis in the way: no hash chain, no batching
//! of ours, just independent single-row `INSERT`s committed synchronously over several
//! connections (PostgreSQL's group commit lets concurrent commits share a WAL flush). Any
//! authorizer that answers only after its decision is on disk — aegis' contract — waits at least
//! this long on top of the gRPC floor.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sandbox::stack::PostgresServer;
use tokio_postgres::{Client, Statement};

use crate::loadgen::{paced, saturate, Outcome, RunResult, CALLS};

/// A scratch table shaped like the audit table (same columns, primary key and trace-id index),
/// so a floor row costs PostgreSQL what an audit row does.
const TABLE: &str =
    "CREATE TABLE IF NOT EXISTS bench_commit_floor (LIKE aegis_audit INCLUDING ALL)";

const INSERT: &str = "INSERT INTO bench_commit_floor (chain_id, seq, ts, trace_id, request_id, \
    decision, reason, issuer, subject, user_name, agent, workspace, method, path, token_source, \
    token_fp, key_id, instance_id, version, prev_mac, mac, actor_chain) VALUES ('floor', $1, \
    now(), $2, $3, 'ALLOW', '', 'http://127.0.0.1/idp', $4, $5, 'claude-code/1.0', 'sandbox', $6, \
    $7, 'federation', $8, 'k1', 'bench', 1, $9, $10, '')";

/// Connections to the stack's PostgreSQL that each commit one row per operation.
pub struct CommitFloor {
    /// Each connection with the insert prepared on it (a statement belongs to its connection).
    conns: Arc<Vec<(Client, Statement)>>,
    next_seq: Arc<AtomicI64>,
}

impl CommitFloor {
    /// Creates the scratch table (aegis must have migrated its schema) and opens `connections`
    /// superuser connections; each runs with the server's durability settings
    /// (`synchronous_commit` on).
    pub async fn start(pg: &PostgresServer, connections: usize) -> Result<Self, String> {
        let mut clients = Vec::with_capacity(connections.max(1));
        for _ in 0..connections.max(1) {
            clients.push(
                pg.connect_superuser()
                    .await
                    .map_err(|e| format!("commit floor: connecting: {e}"))?,
            );
        }
        clients[0]
            .batch_execute(TABLE)
            .await
            .map_err(|e| format!("commit floor: creating its table: {e}"))?;
        let mut conns = Vec::with_capacity(clients.len());
        for c in clients {
            let insert = c
                .prepare(INSERT)
                .await
                .map_err(|e| format!("commit floor: preparing its insert: {e}"))?;
            conns.push((c, insert));
        }
        Ok(Self {
            conns: Arc::new(conns),
            next_seq: Arc::new(AtomicI64::new(1)),
        })
    }

    /// Open loop: one durable single-row commit per operation at `rate`/s for `duration`,
    /// round-robin over the connections; latency from the scheduled time.
    pub async fn open_loop(&self, rate: f64, duration: Duration) -> RunResult {
        let conns = self.conns.clone();
        let next_seq = self.next_seq.clone();
        paced("commit_floor", rate, duration, move |i| {
            commit_one(conns.clone(), i as usize, &next_seq)
        })
        .await
    }

    /// Closed loop: `in_flight` single-row commits always outstanding for `duration`, worker w
    /// on connection w mod the number of connections (each connection pipelines its share).
    pub async fn closed_loop(&self, in_flight: usize, duration: Duration) -> RunResult {
        let conns = self.conns.clone();
        let next_seq = self.next_seq.clone();
        saturate("commit_floor_closed", in_flight, duration, move |w, _| {
            commit_one(conns.clone(), w, &next_seq)
        })
        .await
    }
}

/// One audit-shaped row committed on connection `pick` mod the number of connections.
fn commit_one(
    conns: Arc<Vec<(Client, Statement)>>,
    pick: usize,
    next_seq: &AtomicI64,
) -> impl std::future::Future<Output = Outcome> + Send + 'static {
    let seq = next_seq.fetch_add(1, Ordering::Relaxed);
    async move {
        let (method, path) = CALLS[(seq as usize) % CALLS.len()];
        let (client, insert) = &conns[pick % conns.len()];
        let trace = format!("{seq:032x}");
        let request = format!("bench-floor-{seq}");
        let user = format!("bench-u{:05}@example.com", seq % 1000);
        let subject = format!("bench-u{:05}", seq % 1000);
        let fp = [7u8; 32];
        let prev = (seq as u64).to_be_bytes().repeat(4);
        let mac = (seq as u64 + 1).to_be_bytes().repeat(4);
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 10] = [
            &seq,
            &trace,
            &request,
            &subject,
            &user,
            &method,
            &path,
            &fp.as_slice(),
            &prev,
            &mac,
        ];
        match client.execute(insert, &params).await {
            Ok(1) => Outcome::Allowed,
            _ => Outcome::Error,
        }
    }
}
