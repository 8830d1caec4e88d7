//! `aegis audit verify` and `aegis audit export`: re-walk the chain from Postgres.
//!
//! The walk streams rows in seq order (constant memory) and checks, for every row: the seq is
//! the next one (no gap, nothing inserted, nothing reordered), `prev_mac` is the previous row's
//! `mac`, and the MAC recomputed over the canonical record with the row's key matches. At the
//! end the head row must agree with the last row.

use std::collections::HashMap;

use futures_util::{pin_mut, TryStreamExt};
use serde::Serialize;
use tokio_postgres::{Client, Row};

use super::record::{AuditRecord, Decision, GENESIS_MAC};
use crate::secret::Key32;

/// What the verifier found.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct VerifyReport {
    pub chain_id: String,
    pub intact: bool,
    /// Rows walked.
    pub rows: u64,
    /// The first seq at which something is wrong.
    pub first_bad_seq: Option<u64>,
    /// What kind of tamper: `gap`, `broken_link`, `bad_mac`, `unknown_key`, `bad_row`,
    /// `head_mismatch`.
    pub problem: Option<String>,
    pub detail: Option<String>,
    /// Hex of the last row's mac.
    pub head_mac: String,
}

const SELECT: &str = "SELECT seq, ts, trace_id, request_id, decision, reason, issuer, subject, \
    user_name, agent, workspace, method, path, token_source, token_fp, key_id, instance_id, \
    version, prev_mac, mac, chain_id, actor_chain FROM aegis_audit WHERE chain_id = $1 AND seq > $2 ORDER BY seq";

/// Rebuilds the canonical record of a row.
pub fn record_of(row: &Row) -> Result<(AuditRecord, Vec<u8>), String> {
    let ts: std::time::SystemTime = row.try_get(1).map_err(|e| e.to_string())?;
    let micros = ts
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
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
    };
    let mac: Vec<u8> = row.try_get(19).map_err(|e| e.to_string())?;
    Ok((rec, mac))
}

/// Walks a chain. `keys` maps key ids to HMAC keys.
pub async fn verify(
    client: &Client,
    chain_id: &str,
    keys: &HashMap<String, Key32>,
) -> Result<VerifyReport, tokio_postgres::Error> {
    let mut report = VerifyReport {
        chain_id: chain_id.to_string(),
        intact: true,
        rows: 0,
        first_bad_seq: None,
        problem: None,
        detail: None,
        head_mac: hex::encode(GENESIS_MAC),
    };
    let fail = |report: &mut VerifyReport, seq: u64, problem: &str, detail: String| {
        if report.intact {
            report.intact = false;
            report.first_bad_seq = Some(seq);
            report.problem = Some(problem.to_string());
            report.detail = Some(detail);
        }
    };

    let stmt = client.prepare(SELECT).await?;
    let from: i64 = 0;
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&chain_id, &from];
    let rows = client.query_raw(&stmt, params).await?;
    pin_mut!(rows);
    let mut expected: u64 = 1;
    let mut prev = GENESIS_MAC.to_vec();
    while let Some(row) = rows.try_next().await? {
        report.rows += 1;
        let (rec, mac) = match record_of(&row) {
            Ok(x) => x,
            Err(e) => {
                fail(&mut report, expected, "bad_row", e);
                break;
            }
        };
        if rec.seq != expected {
            let detail = if rec.seq > expected {
                format!("expected seq {expected}, found {} (rows missing)", rec.seq)
            } else {
                format!("expected seq {expected}, found {} (out of order)", rec.seq)
            };
            fail(&mut report, expected.min(rec.seq), "gap", detail);
            break;
        }
        if rec.prev_mac != prev {
            fail(
                &mut report,
                rec.seq,
                "broken_link",
                "prev_mac is not the previous row's mac (a row was removed, inserted or reordered)"
                    .to_string(),
            );
            break;
        }
        let Some(key) = keys.get(&rec.key_id) else {
            fail(
                &mut report,
                rec.seq,
                "unknown_key",
                format!("no key with id {:?} is configured", rec.key_id),
            );
            break;
        };
        if !rec.verify_mac(key.expose(), &mac) {
            fail(
                &mut report,
                rec.seq,
                "bad_mac",
                "the row's contents do not match its mac (a field was modified, or the row was forged)"
                    .to_string(),
            );
            break;
        }
        prev = mac;
        expected += 1;
    }
    report.head_mac = hex::encode(&prev);

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
        let rows = report.rows;
        if size != rows || head_mac != prev {
            fail(
                &mut report,
                size.min(rows) + 1,
                "head_mismatch",
                format!(
                    "the head row says size {size} but the table holds {rows} rows (tail rows deleted or a table restored)"
                ),
            );
        }
    }
    Ok(report)
}

/// One exported row.
#[derive(Debug, Serialize)]
pub struct ExportRow {
    pub chain_id: String,
    pub seq: u64,
    pub ts_unix_micros: i64,
    pub trace_id: String,
    pub request_id: String,
    pub decision: &'static str,
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
    pub prev_mac: String,
    pub mac: String,
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
        let line = ExportRow {
            chain_id: rec.chain_id,
            seq: rec.seq,
            ts_unix_micros: rec.ts_unix_micros,
            trace_id: rec.trace_id,
            request_id: rec.request_id,
            decision: if rec.decision == Decision::Allow as i32 {
                "ALLOW"
            } else {
                "DENY"
            },
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
            prev_mac: hex::encode(&rec.prev_mac),
            mac: hex::encode(&mac),
        };
        serde_json::to_writer(&mut *out, &line)?;
        out.write_all(b"\n")?;
        n += 1;
    }
    Ok(n)
}
