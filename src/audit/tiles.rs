//! The transparency log's storage: tiles, signed checkpoint notes and witness state in
//! PostgreSQL (schema version 4), and the reads the public log endpoints and the CLI make.
//!
//! The writer extends the tiles in the statement that appends the rows ([`super::APPEND_SQL`]),
//! so a committed row is always in the tree. A chain written before version 4 has rows but no
//! tiles; [`catch_up`] builds them under the head row's lock before the writer serves.

use futures_util::{pin_mut, TryStreamExt};
use tokio_postgres::{Client, GenericClient};

use super::tlog::{self, Edge, Hash, TileMap, TILE_WIDTH};

/// Hashes per stored strip: a tile is up to 16 strips (see the schema).
pub const STRIP: usize = 16;
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

/// Tiles from their strips, (level, idx, strip, hashes) ordered by strip: each tile is its strips
/// in order, up to the first one missing or short (what follows a gap is not the tile).
fn assemble(rows: impl IntoIterator<Item = (i16, i64, i16, Vec<u8>)>) -> TileMap {
    let mut out = TileMap::new();
    let mut closed = std::collections::BTreeSet::new();
    for (level, idx, strip, hashes) in rows {
        let key = (level as u8, idx as u64);
        if closed.contains(&key) {
            continue;
        }
        let tile = out.entry(key).or_default();
        if tile.len() != strip as usize * STRIP {
            closed.insert(key);
            continue;
        }
        let list = hashes_of(&hashes);
        let full = list.len() == STRIP;
        tile.extend(list);
        if !full {
            closed.insert(key);
        }
    }
    out.retain(|_, t| !t.is_empty());
    out
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
            "SELECT t.level, t.idx, t.strip, t.hashes FROM aegis_tlog_tiles t \
             JOIN UNNEST($2::int2[], $3::int8[]) AS w(level, idx) \
             ON t.level = w.level AND t.idx = w.idx WHERE t.chain_id = $1 \
             ORDER BY t.level, t.idx, t.strip",
            &[&chain_id, &levels, &idxs],
        )
        .await?;
    Ok(assemble(
        rows.into_iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))),
    ))
}

/// Every stored tile of the chain.
pub async fn all_tiles<C: GenericClient>(
    client: &C,
    chain_id: &str,
) -> Result<TileMap, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT level, idx, strip, hashes FROM aegis_tlog_tiles WHERE chain_id = $1 \
             ORDER BY level, idx, strip",
            &[&chain_id],
        )
        .await?;
    Ok(assemble(
        rows.into_iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))),
    ))
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

/// The stored strips of the tiles a batch changed, as the columns [`super::APPEND_SQL`] and
/// [`UPSERT`] take (level, idx, strip, hashes): only the strips from the first changed position
/// on, so a small batch writes one small strip.
pub type Columns = (Vec<i16>, Vec<i64>, Vec<i16>, Vec<Vec<u8>>);

pub fn columns(changed: &std::collections::BTreeMap<(u8, u64), (usize, Vec<Hash>)>) -> Columns {
    let mut out: Columns = Default::default();
    for ((level, idx), (from, hashes)) in changed {
        if hashes.is_empty() {
            continue;
        }
        for strip in from / STRIP..=(hashes.len() - 1) / STRIP {
            let part = &hashes[strip * STRIP..(strip * STRIP + STRIP).min(hashes.len())];
            out.0.push(*level as i16);
            out.1.push(*idx as i64);
            out.2.push(strip as i16);
            out.3.push(part.concat());
        }
    }
    out
}

const UPSERT: &str = "INSERT INTO aegis_tlog_tiles (chain_id, level, idx, strip, hashes) \
    SELECT $1, t.* FROM UNNEST($2::int2[], $3::int8[], $4::int2[], $5::bytea[]) AS t \
    ON CONFLICT (chain_id, level, idx, strip) DO UPDATE SET hashes = EXCLUDED.hashes";

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
        let changed = edge.extend_tracked(leaves);
        let (levels, idxs, strips, hashes) = columns(&changed);
        tx.execute(UPSERT, &[&chain_id, &levels, &idxs, &strips, &hashes])
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
    let tiles = fetch(client, chain_id, &[(level, index)]).await?;
    Ok(tiles
        .get(&(level, index))
        .filter(|t| t.len() >= width)
        .map(|t| t[..width].concat()))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Strips written batch by batch (only those a batch changed, upserted like the writer does)
    /// put back together are the tree's tiles.
    #[test]
    fn strips_written_per_batch_assemble_into_the_tiles() {
        let mut edge = Edge::new();
        let mut want = TileMap::new();
        let mut store: std::collections::BTreeMap<(i16, i64, i16), Vec<u8>> = Default::default();
        let mut n = 0u64;
        for batch in [1usize, 3, 15, 1, 17, 200, 300, 1, 5000, 64, 1] {
            let leaves: Vec<Hash> = (0..batch)
                .map(|_| {
                    n += 1;
                    tlog::leaf_hash(&n.to_be_bytes())
                })
                .collect();
            let changed = edge.extend_tracked(leaves);
            for (k, (_, v)) in &changed {
                want.insert(*k, v.clone());
            }
            let (levels, idxs, strips, hashes) = columns(&changed);
            for i in 0..levels.len() {
                store.insert((levels[i], idxs[i], strips[i]), hashes[i].clone());
            }
        }
        let got = assemble(store.into_iter().map(|((l, i, s), h)| (l, i, s, h)));
        assert_eq!(got, want);
        // A missing strip ends the tile there.
        let mut rows: Vec<(i16, i64, i16, Vec<u8>)> =
            vec![(0, 0, 0, vec![1u8; 512]), (0, 0, 2, vec![2u8; 64])];
        rows.sort();
        assert_eq!(assemble(rows)[&(0, 0)].len(), 16);
    }
}
