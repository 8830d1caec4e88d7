//! `aegis audit verify` and `aegis audit export`: re-walk the chain from Postgres.
//!
//! The walk streams rows in seq order (constant memory) and checks, for every row: the seq is
//! the next one (no gap, nothing inserted, nothing reordered), `prev_mac` is the previous row's
//! `mac`, and the MAC recomputed over the canonical record with the row's key matches. At the
//! end the head row must agree with the last row. Rows and head come from one snapshot, so a
//! walk under live appends is as consistent as one on a quiet chain.

use std::collections::{BTreeMap, HashMap};

use futures_util::{pin_mut, TryStreamExt};
use serde::Serialize;
use tokio_postgres::{Client, Row};

use super::checkpoint::Checkpoint;
use super::record::{AuditRecord, Decision, GENESIS_MAC};
use crate::secret::Key32;

/// What the verifier found.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct VerifyReport {
    pub chain_id: String,
    pub intact: bool,
    /// Rows walked.
    pub rows: u64,
    /// Checkpoints checked.
    pub checkpoints: u64,
    /// The first seq at which something is wrong.
    pub first_bad_seq: Option<u64>,
    /// What kind of tamper: `gap`, `broken_link`, `bad_mac`, `unknown_key`, `retired_key`, `bad_row`,
    /// `head_mismatch`, `truncated`, `checkpoint_mismatch`, `forged_checkpoint`,
    /// `conflicting_checkpoints`, `checkpoint_rollback`; for the transparency log:
    /// `tree_mismatch` (stored tiles are not the rows' tree), `inconsistent_checkpoints` (a
    /// note does not extend an earlier one).
    pub problem: Option<String>,
    pub detail: Option<String>,
    /// Hex of the last row's mac.
    pub head_mac: String,
    /// Signed checkpoint notes of the transparency log checked against the rows.
    pub notes: u64,
    /// The transparency log's size and root (hex) as recomputed from the rows.
    pub tree_size: u64,
    pub tree_root: String,
}

/// What the transparency log is checked against: the log's verifier key and every signed note
/// found (in the checkpoint directory and the database), each as (where, text).
pub struct TreeAnchors {
    pub vkey: super::tlog::Vkey,
    pub notes: Vec<Result<(String, String), String>>,
}

const SELECT: &str = "SELECT seq, ts, trace_id, request_id, decision, reason, issuer, subject, \
    user_name, agent, workspace, method, path, token_source, token_fp, key_id, instance_id, \
    version, prev_mac, mac, chain_id, actor_chain, statement_kind, statement_fp, mcp_tool, \
    statement_text \
    FROM aegis_audit WHERE chain_id = $1 AND seq > $2 ORDER BY seq";

/// How far apart (seconds, database clock) two checkpoints must be for the later one's smaller
/// size to count as a rollback.
pub const ROLLBACK_SLACK_SECS: i64 = 2;

/// Rows a walk checks between yields to the runtime (about a millisecond of HMACs).
pub const YIELD_EVERY: u64 = 256;

/// Rows `$2 < seq <= $3` of chain `$1`, in order.
pub const SELECT_RANGE: &str =
    "SELECT seq, ts, trace_id, request_id, decision, reason, issuer, subject, \
    user_name, agent, workspace, method, path, token_source, token_fp, key_id, instance_id, \
    version, prev_mac, mac, chain_id, actor_chain, statement_kind, statement_fp, mcp_tool, \
    statement_text \
    FROM aegis_audit WHERE chain_id = $1 AND seq > $2 AND seq <= $3 ORDER BY seq";

/// A problem found at one row.
#[derive(Debug, Clone)]
pub struct Bad {
    pub seq: u64,
    pub problem: &'static str,
    pub detail: String,
}

/// The reason of the `ADMIN` row that retires an HMAC key (`aegis audit retire-key`); its
/// `path` names the key. No row after it may be signed by that key.
pub const KEY_RETIRED: &str = "key_retired";

/// The row-by-row chain check shared by the verifier and the checkpointer.
pub struct Walk {
    expected: u64,
    prev: Vec<u8>,
    /// Retired key id → the seq of the row that retired it.
    retired: HashMap<String, u64>,
}

impl Walk {
    pub fn new() -> Walk {
        Walk::resume(1, GENESIS_MAC.to_vec())
    }

    /// Continues a walk at `next_seq`, whose `prev_mac` must be `prev`.
    pub fn resume(next_seq: u64, prev: Vec<u8>) -> Walk {
        Walk {
            expected: next_seq,
            prev,
            retired: HashMap::new(),
        }
    }

    pub fn next_seq(&self) -> u64 {
        self.expected
    }

    pub fn head(&self) -> &[u8] {
        &self.prev
    }

    /// Checks one row: the next seq, linked to the previous mac, with a MAC that verifies.
    pub fn step(
        &mut self,
        rec: &AuditRecord,
        mac: &[u8],
        keys: &HashMap<String, Key32>,
    ) -> Result<(), Bad> {
        if rec.seq != self.expected {
            let detail = if rec.seq > self.expected {
                format!(
                    "expected seq {}, found {} (rows missing)",
                    self.expected, rec.seq
                )
            } else {
                format!(
                    "expected seq {}, found {} (out of order)",
                    self.expected, rec.seq
                )
            };
            return Err(Bad {
                seq: self.expected.min(rec.seq),
                problem: "gap",
                detail,
            });
        }
        if rec.prev_mac != self.prev {
            return Err(Bad {
                seq: rec.seq,
                problem: "broken_link",
                detail: "prev_mac is not the previous row's mac (a row was removed, inserted or reordered)"
                    .to_string(),
            });
        }
        if let Some(&at) = self.retired.get(&rec.key_id) {
            return Err(Bad {
                seq: rec.seq,
                problem: "retired_key",
                detail: format!(
                    "signed by key {:?}, which was retired at seq {at}",
                    rec.key_id
                ),
            });
        }
        let Some(key) = keys.get(&rec.key_id) else {
            return Err(Bad {
                seq: rec.seq,
                problem: "unknown_key",
                detail: format!("no key with id {:?} is configured", rec.key_id),
            });
        };
        if !rec.verify_mac(key.expose(), mac) {
            return Err(Bad {
                seq: rec.seq,
                problem: "bad_mac",
                detail: "the row's contents do not match its mac (a field was modified, or the row was forged)"
                    .to_string(),
            });
        }
        if rec.decision == Decision::Admin as i32 && rec.reason == KEY_RETIRED {
            self.retired.insert(rec.path.clone(), rec.seq);
        }
        self.prev = mac.to_vec();
        self.expected += 1;
        Ok(())
    }
}

impl Default for Walk {
    fn default() -> Self {
        Walk::new()
    }
}

/// Rebuilds the canonical record of a row.
pub fn record_of(row: &Row) -> Result<(AuditRecord, Vec<u8>), String> {
    let ts: std::time::SystemTime = row.try_get(1).map_err(|e| e.to_string())?;
    let micros = crate::clock::unix_micros_of(ts);
    let decision: String = row.try_get(4).map_err(|e| e.to_string())?;
    let seq: i64 = row.try_get(0).map_err(|e| e.to_string())?;
    let version: i32 = row.try_get(17).map_err(|e| e.to_string())?;
    let s = |i: usize| -> Result<String, String> {
        row.try_get::<_, String>(i).map_err(|e| e.to_string())
    };
    let rec = AuditRecord {
        version: version as u32,
        chain_id: s(20)?,
        seq: seq as u64,
        ts_unix_micros: micros,
        trace_id: s(2)?,
        request_id: s(3)?,
        decision: match decision.as_str() {
            "ALLOW" => Decision::Allow as i32,
            "DENY" => Decision::Deny as i32,
            "ADMIN" => Decision::Admin as i32,
            _ => Decision::Unspecified as i32,
        },
        reason: s(5)?,
        issuer: s(6)?,
        subject: s(7)?,
        user_name: s(8)?,
        agent: s(9)?,
        workspace: s(10)?,
        method: s(11)?,
        path: s(12)?,
        token_source: s(13)?,
        token_fingerprint: row.try_get(14).map_err(|e| e.to_string())?,
        key_id: s(15)?,
        prev_mac: row.try_get(18).map_err(|e| e.to_string())?,
        instance_id: s(16)?,
        actor_chain: s(21)?,
        statement_kind: s(22)?,
        statement_fingerprint: row.try_get(23).map_err(|e| e.to_string())?,
        mcp_tool: s(24)?,
        statement_text: s(25)?,
    };
    let mac: Vec<u8> = row.try_get(19).map_err(|e| e.to_string())?;
    Ok((rec, mac))
}

/// Checks the checkpoints among themselves: signatures, one head per size, sizes that never
/// shrink over time. Returns the valid ones by size, or the first problem.
fn check_checkpoints(
    chain_id: &str,
    checkpoints: &[Result<Checkpoint, String>],
    public_key: &[u8; 32],
) -> Result<BTreeMap<u64, [u8; 32]>, Bad> {
    let mut mine = Vec::new();
    for c in checkpoints {
        match c {
            Err(why) => {
                return Err(Bad {
                    seq: 0,
                    problem: "forged_checkpoint",
                    detail: format!("unreadable checkpoint {why}"),
                })
            }
            Ok(c) if c.chain_id != chain_id => {}
            Ok(c) => {
                if !c.verify(public_key) {
                    return Err(Bad {
                        seq: c.size,
                        problem: "forged_checkpoint",
                        detail: format!(
                            "the checkpoint for size {} is not signed by the configured key",
                            c.size
                        ),
                    });
                }
                mine.push(c);
            }
        }
    }
    let mut by_size: BTreeMap<u64, [u8; 32]> = BTreeMap::new();
    for c in &mine {
        if let Some(other) = by_size.insert(c.size, c.head_mac) {
            if other != c.head_mac {
                return Err(Bad {
                    seq: c.size,
                    problem: "conflicting_checkpoints",
                    detail: format!(
                        "two signed checkpoints of size {} name different heads",
                        c.size
                    ),
                });
            }
        }
    }
    // A checkpoint smaller than one signed clearly before it means the chain went back (a
    // restore from backup). "Clearly": more than ROLLBACK_SLACK_SECS apart by the database's
    // clock (v2 checkpoints read it with the head), so replicas that read the head concurrently
    // and sign in either order never raise a false alarm.
    mine.sort_by_key(|c| (c.ts, c.size));
    let mut earlier = 0;
    let mut largest: Option<&Checkpoint> = None;
    for c in &mine {
        while earlier < mine.len() && mine[earlier].ts + ROLLBACK_SLACK_SECS < c.ts {
            if largest.is_none_or(|l| mine[earlier].size > l.size) {
                largest = Some(mine[earlier]);
            }
            earlier += 1;
        }
        if let Some(l) = largest.filter(|l| l.size > c.size) {
            return Err(Bad {
                seq: c.size,
                problem: "checkpoint_rollback",
                detail: format!(
                    "a checkpoint of size {} (ts {}) was signed after one of size {} (ts {})",
                    c.size, c.ts, l.size, l.ts
                ),
            });
        }
    }
    Ok(by_size)
}

/// Walks a chain. `keys` maps key ids to HMAC keys; `checkpoints` are every checkpoint found in
/// the sink and `public_key` the signing key they must verify under.
///
/// The rows and the head row are read in one snapshot (a read-only REPEATABLE READ
/// transaction), so replicas appending meanwhile never look like a cut tail: a batch commits its
/// rows and the head together, and the snapshot holds both or neither. `checkpoints` must have
/// been read before the call: each was signed over a head that had committed before it was
/// written, so none can be newer than the snapshot taken here.
pub async fn verify(
    client: &Client,
    chain_id: &str,
    keys: &HashMap<String, Key32>,
    checkpoints: &[Result<Checkpoint, String>],
    public_key: &[u8; 32],
    anchors: &TreeAnchors,
) -> Result<VerifyReport, tokio_postgres::Error> {
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await?;
    let report = verify_in_snapshot(client, chain_id, keys, checkpoints, public_key, anchors).await;
    // Read only: nothing to keep; end the transaction either way so the connection is reusable.
    let ended = client.batch_execute("ROLLBACK").await;
    let report = report?;
    ended?;
    Ok(report)
}

async fn verify_in_snapshot(
    client: &Client,
    chain_id: &str,
    keys: &HashMap<String, Key32>,
    checkpoints: &[Result<Checkpoint, String>],
    public_key: &[u8; 32],
    anchors: &TreeAnchors,
) -> Result<VerifyReport, tokio_postgres::Error> {
    let mut report = VerifyReport {
        notes: 0,
        tree_size: 0,
        tree_root: hex::encode(super::tlog::empty_root()),
        chain_id: chain_id.to_string(),
        intact: true,
        rows: 0,
        checkpoints: 0,
        first_bad_seq: None,
        problem: None,
        detail: None,
        head_mac: hex::encode(GENESIS_MAC),
    };
    let fail = |report: &mut VerifyReport, bad: Bad| {
        if report.intact {
            report.intact = false;
            report.first_bad_seq = Some(bad.seq);
            report.problem = Some(bad.problem.to_string());
            report.detail = Some(bad.detail);
        }
    };

    let pinned = match check_checkpoints(chain_id, checkpoints, public_key) {
        Ok(p) => p,
        Err(bad) => {
            fail(&mut report, bad);
            return Ok(report);
        }
    };
    report.checkpoints = pinned.len() as u64;
    let mut notes = anchors.notes.clone();
    for (size, note) in super::tiles::all_notes(client, chain_id).await? {
        notes.push(Ok((format!("aegis_tlog_checkpoints size {size}"), note)));
    }
    let roots = match check_notes(&notes, &anchors.vkey) {
        Ok(r) => r,
        Err(bad) => {
            fail(&mut report, bad);
            return Ok(report);
        }
    };
    report.notes = roots.len() as u64;
    let mut tree = TreeWalk::default();

    let stmt = client.prepare(SELECT).await?;
    let from: i64 = 0;
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&chain_id, &from];
    let rows = client.query_raw(&stmt, params).await?;
    pin_mut!(rows);
    let mut walk = Walk::new();
    while let Some(row) = rows.try_next().await? {
        report.rows += 1;
        // A long walk shares its thread with Checks (the console's verify-now): let them run.
        if report.rows % YIELD_EVERY == 0 {
            tokio::task::yield_now().await;
        }
        let (rec, mac) = match record_of(&row) {
            Ok(x) => x,
            Err(e) => {
                fail(
                    &mut report,
                    Bad {
                        seq: walk.next_seq(),
                        problem: "bad_row",
                        detail: e,
                    },
                );
                break;
            }
        };
        if let Err(bad) = walk.step(&rec, &mac, keys) {
            fail(&mut report, bad);
            break;
        }
        tree.pending.push(rec.leaf_hash());
        if let Some(root) = roots.get(&rec.seq) {
            if tree.root() != *root {
                fail(
                    &mut report,
                    Bad {
                        seq: rec.seq,
                        problem: "checkpoint_mismatch",
                        detail: format!(
                            "the rows' tree at size {} does not have the root of the signed note of that size (the chain was rewritten or restored)",
                            rec.seq
                        ),
                    },
                );
                break;
            }
        }
        if tree.pending.len() >= 4096 {
            tree.flush();
        }
        if let Some(pinned_head) = pinned.get(&rec.seq) {
            if pinned_head.as_slice() != mac.as_slice() {
                fail(
                    &mut report,
                    Bad {
                        seq: rec.seq,
                        problem: "checkpoint_mismatch",
                        detail: format!(
                            "row {} does not match the signed checkpoint of that size (the chain was rewritten or restored)",
                            rec.seq
                        ),
                    },
                );
                break;
            }
        }
    }
    report.head_mac = hex::encode(walk.head());
    let rows = report.rows;

    if report.intact {
        let max_note = roots.keys().next_back().copied().unwrap_or(0);
        let max_json = pinned.keys().next_back().copied().unwrap_or(0);
        if let Some(max) = Some(max_note.max(max_json)).filter(|m| *m > 0) {
            if rows < max {
                fail(
                    &mut report,
                    Bad {
                        seq: rows + 1,
                        problem: "truncated",
                        detail: format!(
                            "the table holds {rows} rows but a signed checkpoint says the chain had {max} (tail rows deleted or the table rolled back)"
                        ),
                    },
                );
            }
        }
    }
    if report.intact {
        let head = client
            .query_opt(
                "SELECT size, head_mac FROM aegis_chain_head WHERE chain_id = $1",
                &[&chain_id],
            )
            .await?;
        let (size, head_mac) = match head {
            Some(r) => (r.get::<_, i64>(0) as u64, r.get::<_, Vec<u8>>(1)),
            None => (0, GENESIS_MAC.to_vec()),
        };
        if size != rows || head_mac != walk.head() {
            fail(
                &mut report,
                Bad {
                    seq: size.min(rows) + 1,
                    problem: "head_mismatch",
                    detail: format!(
                        "the head row says size {size} but the table holds {rows} rows (tail rows deleted or a table restored)"
                    ),
                },
            );
        }
    }
    tree.flush();
    report.tree_size = tree.edge.size();
    report.tree_root = hex::encode(tree.edge.root());
    if report.intact {
        if let Err(bad) = check_stored_tree(client, chain_id, &tree, &roots).await? {
            fail(&mut report, bad);
        }
    }
    Ok(report)
}

/// The rows' tree, rebuilt during the walk.
#[derive(Default)]
struct TreeWalk {
    edge: super::tlog::Edge,
    tiles: super::tlog::TileMap,
    pending: Vec<super::tlog::Hash>,
}

impl TreeWalk {
    fn flush(&mut self) {
        if !self.pending.is_empty() {
            let leaves = std::mem::take(&mut self.pending);
            self.tiles.extend(self.edge.extend(leaves));
        }
    }

    fn root(&mut self) -> super::tlog::Hash {
        self.flush();
        self.edge.root()
    }
}

/// Checks the signed notes: each opens under the log key with the log's origin, one root per
/// size. Returns the roots by size.
fn check_notes(
    notes: &[Result<(String, String), String>],
    vkey: &super::tlog::Vkey,
) -> Result<BTreeMap<u64, super::tlog::Hash>, Bad> {
    let mut roots = BTreeMap::new();
    for n in notes {
        let (name, text) = n.as_ref().map_err(|why| Bad {
            seq: 0,
            problem: "forged_checkpoint",
            detail: format!("unreadable checkpoint note {why}"),
        })?;
        let opened = super::tlog::open_checkpoint(text, vkey, &[]).map_err(|e| Bad {
            seq: 0,
            problem: "forged_checkpoint",
            detail: format!("checkpoint note {name}: {e}"),
        })?;
        let b = opened.body;
        if let Some(other) = roots.insert(b.size, b.root) {
            if other != b.root {
                return Err(Bad {
                    seq: b.size,
                    problem: "conflicting_checkpoints",
                    detail: format!("two signed notes of size {} name different roots", b.size),
                });
            }
        }
    }
    Ok(roots)
}

/// The stored tiles (what outsiders fetch) must be exactly the rows' tree, the head's
/// `tree_size` its size, and every signed note must extend the one before (checked with a
/// consistency proof built from the stored tiles, the way an outsider would).
async fn check_stored_tree(
    client: &Client,
    chain_id: &str,
    tree: &TreeWalk,
    roots: &BTreeMap<u64, super::tlog::Hash>,
) -> Result<Result<(), Bad>, tokio_postgres::Error> {
    use super::tlog;
    let size = tree.edge.size();
    let tree_size: i64 = client
        .query_opt(
            "SELECT tree_size FROM aegis_chain_head WHERE chain_id = $1",
            &[&chain_id],
        )
        .await?
        .map(|r| r.get(0))
        .unwrap_or(0);
    if tree_size as u64 != size {
        return Ok(Err(Bad {
            seq: size.min(tree_size as u64) + 1,
            problem: "tree_mismatch",
            detail: format!(
                "the transparency log says {tree_size} leaves but the chain has {size} rows"
            ),
        }));
    }
    let stored = super::tiles::all_tiles(client, chain_id).await?;
    let first_leaf = |(level, idx): (u8, u64)| idx * 256u64.pow(level as u32 + 1) + 1;
    for (coord, want) in &tree.tiles {
        if stored.get(coord) != Some(want) {
            return Ok(Err(Bad {
                seq: first_leaf(*coord),
                problem: "tree_mismatch",
                detail: format!(
                    "stored tile {}/{} is not the tree of the rows (tiles rewritten, or rows changed under them)",
                    coord.0, coord.1
                ),
            }));
        }
    }
    if let Some(coord) = stored.keys().find(|c| !tree.tiles.contains_key(c)) {
        return Ok(Err(Bad {
            seq: first_leaf(*coord),
            problem: "tree_mismatch",
            detail: format!(
                "stored tile {}/{} covers rows the chain does not have",
                coord.0, coord.1
            ),
        }));
    }
    let mut prev: Option<(u64, tlog::Hash)> = None;
    for (&n, root) in roots {
        if let Some((m, old_root)) = prev {
            let mut get = |l: u8, j: u64| {
                stored
                    .get(&(l, j / 256))
                    .and_then(|t| t.get((j % 256) as usize))
                    .copied()
                    .unwrap_or([0u8; 32])
            };
            let proof = tlog::consistency_proof(m, n, &mut get);
            if !tlog::verify_consistency(m, n, &old_root, root, &proof) {
                return Ok(Err(Bad {
                    seq: m + 1,
                    problem: "inconsistent_checkpoints",
                    detail: format!(
                        "the signed note of size {n} does not extend the one of size {m}"
                    ),
                }));
            }
        }
        prev = Some((n, *root));
    }
    Ok(Ok(()))
}

/// One exported row.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ExportRow {
    pub chain_id: String,
    pub seq: u64,
    pub ts_unix_micros: i64,
    pub trace_id: String,
    pub request_id: String,
    pub decision: String,
    pub reason: String,
    pub issuer: String,
    pub subject: String,
    pub user_name: String,
    pub agent: String,
    pub workspace: String,
    pub method: String,
    pub path: String,
    pub token_source: String,
    pub token_fingerprint: String,
    pub key_id: String,
    pub instance_id: String,
    pub actor_chain: String,
    pub statement_kind: String,
    pub statement_fingerprint: String,
    pub mcp_tool: String,
    /// Present only on rows that recorded it (`audit.record_statement_text`).
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub statement_text: String,
    pub prev_mac: String,
    pub mac: String,
}

impl ExportRow {
    pub fn new(rec: AuditRecord, mac: &[u8]) -> ExportRow {
        ExportRow {
            chain_id: rec.chain_id,
            seq: rec.seq,
            ts_unix_micros: rec.ts_unix_micros,
            trace_id: rec.trace_id,
            request_id: rec.request_id,
            decision: match Decision::try_from(rec.decision) {
                Ok(Decision::Allow) => "ALLOW",
                Ok(Decision::Admin) => "ADMIN",
                _ => "DENY",
            }
            .to_string(),
            reason: rec.reason,
            issuer: rec.issuer,
            subject: rec.subject,
            user_name: rec.user_name,
            agent: rec.agent,
            workspace: rec.workspace,
            method: rec.method,
            path: rec.path,
            token_source: rec.token_source,
            token_fingerprint: hex::encode(&rec.token_fingerprint),
            key_id: rec.key_id,
            instance_id: rec.instance_id,
            actor_chain: rec.actor_chain,
            statement_kind: rec.statement_kind,
            statement_fingerprint: hex::encode(&rec.statement_fingerprint),
            mcp_tool: rec.mcp_tool,
            statement_text: rec.statement_text,
            prev_mac: hex::encode(&rec.prev_mac),
            mac: hex::encode(mac),
        }
    }
}

/// Streams rows after `since` as JSON lines into `out`.
pub async fn export(
    client: &Client,
    chain_id: &str,
    since: u64,
    out: &mut (dyn std::io::Write + Send),
) -> Result<u64, Box<dyn std::error::Error + Send + Sync>> {
    let stmt = client.prepare(SELECT).await?;
    let from = since as i64;
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&chain_id, &from];
    let rows = client.query_raw(&stmt, params).await?;
    pin_mut!(rows);
    let mut n = 0;
    while let Some(row) = rows.try_next().await? {
        let (rec, mac) = record_of(&row)?;
        let line = ExportRow::new(rec, &mac);
        serde_json::to_writer(&mut *out, &line)?;
        out.write_all(b"\n")?;
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cps(list: &[(u64, i64, &str)], seed: &Key32) -> Vec<Result<Checkpoint, String>> {
        list.iter()
            .map(|&(size, ts, signer)| {
                let mut head = [0u8; 32];
                head[..8].copy_from_slice(&size.to_be_bytes());
                Ok(Checkpoint::sign("main", size, head, ts, signer, seed))
            })
            .collect()
    }

    #[test]
    fn replicas_signing_out_of_order_are_not_a_rollback_but_a_later_smaller_head_is() {
        let seed = Key32::generate();
        let public = super::super::checkpoint::public_key(&seed);
        // Two replicas read the head concurrently and sign in either order, a second apart.
        let ok = cps(
            &[
                (90, 11, "b"),
                (100, 10, "a"),
                (120, 12, "a"),
                (110, 13, "b"),
            ],
            &seed,
        );
        assert!(check_checkpoints("main", &ok, &public).is_ok());
        // A head smaller than one signed more than the slack before it: the chain went back.
        let back = cps(&[(100, 10, "a"), (120, 20, "a"), (90, 23, "b")], &seed);
        let bad = check_checkpoints("main", &back, &public).unwrap_err();
        assert_eq!((bad.problem, bad.seq), ("checkpoint_rollback", 90));
        // Also when the smaller head is not next to the larger one in time.
        let slow = cps(
            &[(100, 10, "a"), (99, 11, "a"), (98, 12, "a"), (97, 13, "a")],
            &seed,
        );
        let bad = check_checkpoints("main", &slow, &public).unwrap_err();
        assert_eq!(bad.problem, "checkpoint_rollback");
    }
}
