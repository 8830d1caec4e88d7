//! Witness cosigning (C2SP `tlog-witness`): each new checkpoint goes to the configured
//! witnesses with a consistency proof from the size each last cosigned; their cosignatures
//! (C2SP `tlog-cosignature`, Ed25519) are checked and kept on the note.
//!
//! A witness refuses a checkpoint that does not extend what it saw before, so a log that shows
//! two histories (two checkpoints of one size with different roots, or one that is not an
//! extension of the other) cannot get both cosigned: a reader that requires a quorum of
//! cosignatures is never shown the split.

use std::time::Duration;

use base64::Engine;
use tokio_postgres::GenericClient;

use super::tiles;
use super::tlog::{self, LineCheck};

pub use super::tlog::Witness;

/// What one witness did with a checkpoint.
#[derive(Debug)]
pub enum Outcome {
    /// Its verified cosignature line.
    Cosigned(String),
    /// Why not (no secret in it).
    Failed(String),
}

/// The size this witness last cosigned for the chain (0 when never).
async fn known_size<C: GenericClient>(pg: &C, chain_id: &str, name: &str) -> u64 {
    pg.query_opt(
        "SELECT size FROM aegis_tlog_witnesses WHERE chain_id = $1 AND witness = $2",
        &[&chain_id, &name],
    )
    .await
    .ok()
    .flatten()
    .map(|r| r.get::<_, i64>(0) as u64)
    .unwrap_or(0)
}

/// A signed checkpoint to submit: the whole note, its text (the checkpoint body) and size.
pub struct Signed<'a> {
    pub chain_id: &'a str,
    pub note: &'a str,
    pub text: &'a str,
    pub size: u64,
}

/// Submits the note to one witness; retries once from the size a 409 names.
pub async fn submit<C: GenericClient>(
    pg: &C,
    http: &reqwest::Client,
    timeout: Duration,
    witness: &Witness,
    signed: &Signed<'_>,
) -> Outcome {
    let Signed {
        chain_id,
        note,
        text,
        size,
    } = *signed;
    let b64 = base64::engine::general_purpose::STANDARD;
    let name = &witness.vkey.name;
    let mut old = known_size(pg, chain_id, name).await;
    for _ in 0..2 {
        if old > size {
            return Outcome::Failed(format!(
                "witness {name} already cosigned size {old}, more than {size}: the log was \
                 rolled back or shows another history"
            ));
        }
        let proof = if old == 0 || old == size {
            Vec::new()
        } else {
            match tiles::compute(pg, chain_id, |get| tlog::consistency_proof(old, size, get)).await
            {
                Ok(p) => p,
                Err(e) => {
                    return Outcome::Failed(format!("no consistency proof {old} -> {size}: {e}"))
                }
            }
        };
        let mut body = format!("old {old}\n");
        for h in &proof {
            body.push_str(&b64.encode(h));
            body.push('\n');
        }
        body.push('\n');
        body.push_str(note);
        let url = format!("{}/add-checkpoint", witness.url.trim_end_matches('/'));
        let resp = match http.post(&url).timeout(timeout).body(body).send().await {
            Ok(r) => r,
            Err(e) => {
                return Outcome::Failed(format!(
                    "witness {name} unreachable: {}",
                    crate::http::without_url(e)
                ))
            }
        };
        let status = resp.status().as_u16();
        let text_body = crate::http::read_body(resp)
            .await
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        match status {
            200 => {
                for line in text_body.split_inclusive('\n') {
                    let Ok(sig) = tlog::parse_sig_line(line) else {
                        continue;
                    };
                    if let LineCheck::Good(Some(_)) = tlog::verify_line(&witness.vkey, text, &sig) {
                        let _ = pg
                            .execute(
                                "INSERT INTO aegis_tlog_witnesses (chain_id, witness, size) \
                                 VALUES ($1, $2, $3) ON CONFLICT (chain_id, witness) DO UPDATE \
                                 SET size = GREATEST(aegis_tlog_witnesses.size, EXCLUDED.size), \
                                 updated_at = now()",
                                &[&chain_id, name, &(size as i64)],
                            )
                            .await;
                        return Outcome::Cosigned(sig.line);
                    }
                }
                return Outcome::Failed(format!(
                    "witness {name} answered 200 without a cosignature that verifies"
                ));
            }
            409 => {
                // The witness names the size it last cosigned: prove from there.
                match text_body.trim_end_matches('\n').parse::<u64>() {
                    Ok(n) if n != old => old = n,
                    _ => {
                        return Outcome::Failed(format!(
                            "witness {name} refused old size {old} (409) without a usable size"
                        ))
                    }
                }
            }
            s => {
                return Outcome::Failed(format!("witness {name} refused the checkpoint ({s})"));
            }
        }
    }
    Outcome::Failed(format!("witness {name} kept refusing the old size"))
}
