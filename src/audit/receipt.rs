//! Receipts: a decision's canonical record, its leaf index, an inclusion proof and a signed
//! checkpoint, in one JSON file (`aegis audit prove`) that anyone holding the log's public key
//! checks offline (`aegis audit check-receipt`): no database, no HMAC key.

use base64::Engine;
use prost::Message;
use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use super::record::AuditRecord;
use super::tiles;
use super::tlog::{self, Vkey};
use super::verify::{record_of, ExportRow};

pub const FORMAT: &str = "aegis-receipt/v1";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Receipt {
    pub format: String,
    /// The signed checkpoint note (C2SP tlog-checkpoint + signed-note), with cosignatures.
    pub checkpoint: String,
    pub entries: Vec<Entry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Leaf index in the tree (the record's seq minus one).
    pub leaf_index: u64,
    /// Base64 of the canonical record (the leaf's bytes).
    pub entry: String,
    /// Base64 hashes, RFC 6962 inclusion proof at the checkpoint's size.
    pub inclusion_proof: Vec<String>,
    /// The record decoded, for people: `check-receipt` refuses a receipt where it differs from
    /// `entry` (the MAC is not part of the leaf and is left empty).
    pub record: ExportRow,
}

/// What a receipt proves, once checked.
#[derive(Debug, Clone)]
pub struct Checked {
    pub origin: String,
    pub tree_size: u64,
    pub cosigned_by: Vec<(String, u64)>,
    pub records: Vec<ExportRow>,
}

/// Builds the receipt of every row with `trace_id`, against the newest checkpoint that holds
/// them all.
pub async fn prove(client: &Client, chain_id: &str, trace_id: &str) -> Result<Receipt, String> {
    let pg = |e: tokio_postgres::Error| crate::pg::error_text(&e);
    let stmt = format!(
        "{} AND trace_id = $4",
        super::verify::SELECT_RANGE.replace(" ORDER BY seq", "")
    ) + " ORDER BY seq";
    let rows = client
        .query(&stmt, &[&chain_id, &0i64, &i64::MAX, &trace_id])
        .await
        .map_err(pg)?;
    if rows.is_empty() {
        return Err(format!(
            "no decision with trace id {trace_id:?} in chain {chain_id}"
        ));
    }
    let mut records = Vec::new();
    for row in &rows {
        let (rec, _) = record_of(row)?;
        records.push(rec);
    }
    let last = records.last().map(|r| r.seq).unwrap_or(0);
    let (size, note) = tiles::latest_note(client, chain_id)
        .await
        .map_err(pg)?
        .filter(|(size, _)| *size >= last)
        .ok_or_else(|| {
            format!(
                "seq {last} is not in a signed checkpoint yet (one is signed every \
                 audit.checkpoint_interval); try again shortly"
            )
        })?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut entries = Vec::new();
    for rec in records {
        let index = rec.seq - 1;
        let proof = tiles::compute(client, chain_id, |get| {
            tlog::inclusion_proof(index, size, get)
        })
        .await?;
        entries.push(Entry {
            leaf_index: index,
            entry: b64.encode(rec.encode_to_vec()),
            inclusion_proof: proof.iter().map(|h| b64.encode(h)).collect(),
            record: ExportRow::new(rec, &[]),
        });
    }
    Ok(Receipt {
        format: FORMAT.to_string(),
        checkpoint: note,
        entries,
    })
}

/// Checks a receipt offline: the checkpoint is signed by `log` (and cosigned by at least
/// `quorum` of `witnesses`), and each entry is in its tree at the index it claims.
pub fn check(
    receipt: &Receipt,
    log: &Vkey,
    witnesses: &[Vkey],
    quorum: usize,
) -> Result<Checked, String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    if receipt.format != FORMAT {
        return Err(format!("unknown receipt format {:?}", receipt.format));
    }
    let cp = tlog::open_checkpoint(&receipt.checkpoint, log, witnesses)?;
    if cp.cosigned_by.len() < quorum {
        return Err(format!(
            "the checkpoint carries {} of the {quorum} witness cosignatures required",
            cp.cosigned_by.len()
        ));
    }
    if receipt.entries.is_empty() {
        return Err("the receipt holds no entry".into());
    }
    let mut records = Vec::new();
    for (i, e) in receipt.entries.iter().enumerate() {
        let bytes = b64
            .decode(&e.entry)
            .map_err(|_| format!("entry {i}: not base64"))?;
        let rec = AuditRecord::decode(bytes.as_slice())
            .map_err(|_| format!("entry {i}: not a canonical audit record"))?;
        if rec.encode_to_vec() != bytes {
            return Err(format!("entry {i}: not in canonical encoding"));
        }
        if rec.seq != e.leaf_index + 1 {
            return Err(format!(
                "entry {i}: record seq {} is not at leaf index {}",
                rec.seq, e.leaf_index
            ));
        }
        let mut proof = Vec::new();
        for h in &e.inclusion_proof {
            let h: tlog::Hash = b64
                .decode(h)
                .ok()
                .and_then(|v| v.try_into().ok())
                .ok_or_else(|| format!("entry {i}: a proof hash is not 32 bytes of base64"))?;
            proof.push(h);
        }
        if !tlog::verify_inclusion(
            e.leaf_index,
            cp.body.size,
            &tlog::leaf_hash(&bytes),
            &proof,
            &cp.body.root,
        ) {
            return Err(format!(
                "entry {i}: the inclusion proof does not lead to the checkpoint's root"
            ));
        }
        let decoded = ExportRow::new(rec, &[]);
        if decoded != e.record {
            return Err(format!(
                "entry {i}: the readable record differs from the signed entry"
            ));
        }
        records.push(decoded);
    }
    Ok(Checked {
        origin: cp.body.origin,
        tree_size: cp.body.size,
        cosigned_by: cp.cosigned_by,
        records,
    })
}
