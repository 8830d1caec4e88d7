//! The transparency log's storage: tiles, signed checkpoint notes and witness state in
//! PostgreSQL (schema version 4), and the reads the public log endpoints and the CLI make.
//!
//! The writer extends the tiles in the statement that appends the rows ([`super::APPEND_SQL`]),
//! so a committed row is always in the tree. A chain written before version 4 has rows but no
//! tiles; [`catch_up`] builds them under the head row's lock before the writer serves.

use futures_util::{pin_mut, TryStreamExt};
use tokio_postgres::{Client, GenericClient};

use super::tlog::{self, Edge, Hash, TileMap, TILE_WIDTH};
use super::verify::{record_of, SELECT_RANGE};

fn hashes_of(bytes: &[u8]) -> Vec<Hash> {
    bytes
        .chunks_exact(32)
        .map(|c| {
            let mut h = [0u8; 32];
            h.copy_from_slice(c);
            h
        })
        .collect()
}

/// The tiles at `coords` that exist (a tile may be stored longer than a reader needs).
pub async fn fetch<C: GenericClient>(
    client: &C,
    chain_id: &str,
    coords: &[(u8, u64)],
) -> Result<TileMap, tokio_postgres::Error> {
    let levels: Vec<i16> = coords.iter().map(|(l, _)| *l as i16).collect();
    let idxs: Vec<i64> = coords.iter().map(|(_, i)| *i as i64).collect();
    let rows = client
        .query(
            "SELECT t.level, t.idx, t.hashes FROM aegis_tlog_tiles t \
             JOIN UNNEST($2::int2[], $3::int8[]) AS w(level, idx) \
             ON t.level = w.level AND t.idx = w.idx WHERE t.chain_id = $1",
            &[&chain_id, &levels, &idxs],
        )
        .await?;
    let mut out = TileMap::new();
    for r in rows {
        let (level, idx, hashes): (i16, i64, Vec<u8>) = (r.get(0), r.get(1), r.get(2));
        out.insert((level as u8, idx as u64), hashes_of(&hashes));
    }
    Ok(out)
}

/// The right edge of the stored tree of `size` leaves.
pub async fn load_edge<C: GenericClient>(
    client: &C,
    chain_id: &str,
    size: u64,
) -> Result<Edge, String> {
    let coords: Vec<(u8, u64)> = Edge::partial_tiles(size)
        .into_iter()
        .map(|(l, i, _)| (l, i))
        .collect();
    let tiles = fetch(client, chain_id, &coords)
        .await
        .map_err(|e| crate::pg::error_text(&e))?;
    Edge::from_partials(size, &tiles)
}

/// Tiles as the columns [`super::APPEND_SQL`] and [`store`] take.
pub fn columns(tiles: &TileMap) -> (Vec<i16>, Vec<i64>, Vec<Vec<u8>>) {
    let mut levels = Vec::with_capacity(tiles.len());
    let mut idxs = Vec::with_capacity(tiles.len());
    let mut hashes = Vec::with_capacity(tiles.len());
    for ((l, i), h) in tiles {
        levels.push(*l as i16);
        idxs.push(*i as i64);
        hashes.push(h.concat());
    }
    (levels, idxs, hashes)
}

const UPSERT: &str = "INSERT INTO aegis_tlog_tiles (chain_id, level, idx, hashes) \
    SELECT $1, t.* FROM UNNEST($2::int2[], $3::int8[], $4::bytea[]) AS t \
    ON CONFLICT (chain_id, level, idx) DO UPDATE SET hashes = EXCLUDED.hashes";

/// Rows a catch-up reads between writes of the tiles it built.
const CATCH_UP_CHUNK: u64 = 16_384;

/// Builds the tiles of rows the tree does not hold yet (a chain written before schema version
/// 4), under the head row's lock; returns how many rows it added.
pub async fn catch_up(client: &mut Client, chain_id: &str) -> Result<u64, String> {
    let pg = |e: tokio_postgres::Error| crate::pg::error_text(&e);
    let tx = client.transaction().await.map_err(pg)?;
    let Some(head) = tx
        .query_opt(
            "SELECT size, tree_size FROM aegis_chain_head WHERE chain_id = $1 FOR UPDATE",
            &[&chain_id],
        )
        .await
        .map_err(pg)?
    else {
        return Ok(0);
    };
    let (size, tree_size) = (head.get::<_, i64>(0) as u64, head.get::<_, i64>(1) as u64);
    if tree_size == size {
        return Ok(0);
    }
    if tree_size > size {
        return Err(format!(
            "the tree holds {tree_size} leaves but the chain only {size} rows"
        ));
    }
    let mut edge = load_edge(&tx, chain_id, tree_size).await?;
    let stmt = tx.prepare(SELECT_RANGE).await.map_err(pg)?;
    let mut at = tree_size;
    while at < size {
        let hi = (at + CATCH_UP_CHUNK).min(size);
        let (lo_i, hi_i) = (at as i64, hi as i64);
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&chain_id, &lo_i, &hi_i];
        let rows = tx.query_raw(&stmt, params).await.map_err(pg)?;
        pin_mut!(rows);
        let mut leaves = Vec::with_capacity((hi - at) as usize);
        while let Some(row) = rows.try_next().await.map_err(pg)? {
            let (rec, _) = record_of(&row)?;
            if rec.seq != at + leaves.len() as u64 + 1 {
                return Err(format!(
                    "seq {} follows {} (run `aegis audit verify`)",
                    rec.seq,
                    at + leaves.len() as u64
                ));
            }
            leaves.push(rec.leaf_hash());
        }
        if leaves.len() as u64 != hi - at {
            return Err(format!(
                "rows {} to {hi} are missing (run `aegis audit verify`)",
                at + 1
            ));
        }
        let changed = edge.extend(leaves);
        let (levels, idxs, hashes) = columns(&changed);
        tx.execute(UPSERT, &[&chain_id, &levels, &idxs, &hashes])
            .await
            .map_err(pg)?;
        at = hi;
    }
    tx.execute(
        "UPDATE aegis_chain_head SET tree_size = $2 WHERE chain_id = $1",
        &[&chain_id, &(size as i64)],
    )
    .await
    .map_err(pg)?;
    tx.commit().await.map_err(pg)?;
    Ok(size - tree_size)
}

/// Computes `f` (a proof or a root) from the stored tiles (two passes: the tiles it needs, then
/// the answer).
pub async fn compute<C: GenericClient, T>(
    client: &C,
    chain_id: &str,
    f: impl FnMut(&mut tlog::EntryReader<'_>) -> T,
) -> Result<T, String> {
    tlog::with_tiles(f, |coords| async move {
        fetch(client, chain_id, &coords)
            .await
            .map_err(|e| crate::pg::error_text(&e))
    })
    .await
}

/// One tile as served: exactly `width` hashes (256 for a full tile), if the tree has them.
pub async fn tile_bytes<C: GenericClient>(
    client: &C,
    chain_id: &str,
    level: u8,
    index: u64,
    width: usize,
) -> Result<Option<Vec<u8>>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT substring(hashes FROM 1 FOR $4) FROM aegis_tlog_tiles \
             WHERE chain_id = $1 AND level = $2 AND idx = $3 AND length(hashes) >= $4",
            &[
                &chain_id,
                &(level as i16),
                &(index as i64),
                &((width * 32) as i32),
            ],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// One entry bundle: the canonical records of leaves `index * 256 ..` (`width` of them), each
/// prefixed with its big-endian u16 length, if the chain has them all.
pub async fn entry_bundle<C: GenericClient>(
    client: &C,
    chain_id: &str,
    index: u64,
    width: usize,
) -> Result<Option<Vec<u8>>, String> {
    let pg = |e: tokio_postgres::Error| crate::pg::error_text(&e);
    let lo = (index * TILE_WIDTH as u64) as i64;
    let hi = lo + width as i64;
    // Only what the tree holds: rows past tree_size are not entries yet.
    let tree: Option<i64> = client
        .query_opt(
            "SELECT tree_size FROM aegis_chain_head WHERE chain_id = $1",
            &[&chain_id],
        )
        .await
        .map_err(pg)?
        .map(|r| r.get(0));
    if tree.unwrap_or(0) < hi {
        return Ok(None);
    }
    let rows = client
        .query(SELECT_RANGE, &[&chain_id, &lo, &hi])
        .await
        .map_err(pg)?;
    if rows.len() != width {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(width * 400);
    for row in &rows {
        let (rec, _) = record_of(row)?;
        let bytes = prost::Message::encode_to_vec(&rec);
        let len = u16::try_from(bytes.len())
            .map_err(|_| format!("record {} is longer than an entry may be", rec.seq))?;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&bytes);
    }
    Ok(Some(out))
}

/// The newest signed checkpoint note of the chain.
pub async fn latest_note<C: GenericClient>(
    client: &C,
    chain_id: &str,
) -> Result<Option<(u64, String)>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT size, note FROM aegis_tlog_checkpoints WHERE chain_id = $1 \
             ORDER BY size DESC LIMIT 1",
            &[&chain_id],
        )
        .await?;
    Ok(row.map(|r| (r.get::<_, i64>(0) as u64, r.get(1))))
}

/// Every stored checkpoint note, smallest first.
pub async fn all_notes<C: GenericClient>(
    client: &C,
    chain_id: &str,
) -> Result<Vec<(u64, String)>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT size, note FROM aegis_tlog_checkpoints WHERE chain_id = $1 ORDER BY size",
            &[&chain_id],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get::<_, i64>(0) as u64, r.get(1)))
        .collect())
}
