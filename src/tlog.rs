//! The transparency log over the chain: an RFC 6962 Merkle tree whose leaf `i` is the canonical
//! record of seq `i + 1`, kept as C2SP `tlog-tiles`, with C2SP `tlog-checkpoint` bodies signed as
//! C2SP `signed-note`s and cosigned by witnesses (`tlog-witness`, `tlog-cosignature`).
//!
//! The HMAC chain proves a row to whoever holds the HMAC key; the tree proves it to anyone:
//! a reader with the log's public key (a `vkey`) checks a checkpoint, an inclusion proof for one
//! decision, or that a later checkpoint extends an earlier one, with no database access and no
//! secret. Witnesses keep the log from showing different histories to different readers.
//!
//! This module is pure: hashing, the writer's right edge of the tree, proofs over any source of
//! tile hashes, and the note formats. Storage is in [`crate::audit::tiles`].

use std::collections::BTreeMap;

use base64::Engine;
use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::secret::Key32;

pub type Hash = [u8; 32];

/// Hashes per full tile (tile height 8).
pub const TILE_WIDTH: usize = 256;
const TILE_HEIGHT: u32 = 8;

/// The root of the empty tree: SHA-256 of the empty string (RFC 6962, 2.1).
pub fn empty_root() -> Hash {
    Sha256::digest(b"").into()
}

/// `SHA-256(0x00 || leaf)`.
pub fn leaf_hash(leaf: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(leaf);
    h.finalize().into()
}

/// `SHA-256(0x01 || left || right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The root of a perfect subtree whose bottom row is `row` (a power of two long).
fn perfect_root(row: &[Hash]) -> Hash {
    debug_assert!(row.len().is_power_of_two());
    let mut level: Vec<Hash> = row.to_vec();
    while level.len() > 1 {
        level = level
            .chunks_exact(2)
            .map(|p| node_hash(&p[0], &p[1]))
            .collect();
    }
    level[0]
}

/// Tile (level, index) → its hashes.
pub type TileMap = BTreeMap<(u8, u64), Vec<Hash>>;

/// The right edge of the tree: for each tile level, the hashes of its rightmost, partial tile.
/// Everything a writer needs to extend the tree and to know which tiles a batch changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Edge {
    size: u64,
    levels: Vec<Vec<Hash>>,
}

impl Edge {
    pub fn new() -> Edge {
        Edge::default()
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The partial tiles a tree of `size` leaves has: (level, index, width), lowest level first.
    pub fn partial_tiles(size: u64) -> Vec<(u8, u64, usize)> {
        let mut out = Vec::new();
        let mut level = 0u32;
        while level < 64 && (size >> (TILE_HEIGHT * level)) > 0 {
            let entries = size >> (TILE_HEIGHT * level);
            let width = (entries % TILE_WIDTH as u64) as usize;
            if width > 0 {
                out.push((level as u8, entries / TILE_WIDTH as u64, width));
            }
            level += 1;
        }
        out
    }

    /// The edge of a tree of `size` leaves from its partial tiles (as [`Edge::partial_tiles`]
    /// lists them; a tile may be stored longer than the width needed: the rest is ignored).
    pub fn from_partials(size: u64, tiles: &TileMap) -> Result<Edge, String> {
        let mut edge = Edge {
            size,
            levels: Vec::new(),
        };
        for (level, index, width) in Edge::partial_tiles(size) {
            let tile = tiles
                .get(&(level, index))
                .ok_or_else(|| format!("tile {level}/{index} is missing"))?;
            if tile.len() < width {
                return Err(format!(
                    "tile {level}/{index} holds {} hashes, the tree needs {width}",
                    tile.len()
                ));
            }
            while edge.levels.len() <= level as usize {
                edge.levels.push(Vec::new());
            }
            edge.levels[level as usize] = tile[..width].to_vec();
        }
        Ok(edge)
    }

    /// Appends leaf hashes; returns every tile they changed with its new contents (the full
    /// tiles they completed and the partial tiles they left).
    pub fn extend(&mut self, leaves: impl IntoIterator<Item = Hash>) -> TileMap {
        self.extend_tracked(leaves)
            .into_iter()
            .map(|(k, (_, v))| (k, v))
            .collect()
    }

    /// As [`Edge::extend`], with where each tile changed: (level, index) → (the first position
    /// that changed, the tile's new contents). Everything before that position was stored
    /// already (the tile's partial contents before these leaves).
    pub fn extend_tracked(
        &mut self,
        leaves: impl IntoIterator<Item = Hash>,
    ) -> BTreeMap<(u8, u64), (usize, Vec<Hash>)> {
        let before: Vec<((u8, u64), usize)> = self
            .levels
            .iter()
            .enumerate()
            .map(|(level, row)| {
                let index = (self.size >> (TILE_HEIGHT * level as u32)) / TILE_WIDTH as u64;
                ((level as u8, index), row.len())
            })
            .collect();
        let mut changed = TileMap::new();
        let mut touched = 0u64;
        for leaf in leaves {
            self.push(leaf, &mut changed, &mut touched);
        }
        for (level, row) in self.levels.iter().enumerate() {
            if touched & (1 << level) != 0 && !row.is_empty() {
                let index = (self.size >> (TILE_HEIGHT * level as u32)) / TILE_WIDTH as u64;
                changed.insert((level as u8, index), row.clone());
            }
        }
        changed
            .into_iter()
            .map(|(k, v)| {
                let from = before
                    .iter()
                    .find(|(c, _)| *c == k)
                    .map_or(0, |(_, len)| *len);
                (k, (from, v))
            })
            .collect()
    }

    fn push(&mut self, leaf: Hash, completed: &mut TileMap, touched: &mut u64) {
        let index = self.size;
        let mut hash = leaf;
        let mut level = 0usize;
        loop {
            if self.levels.len() <= level {
                self.levels.push(Vec::new());
            }
            *touched |= 1 << level;
            let row = &mut self.levels[level];
            row.push(hash);
            if row.len() < TILE_WIDTH {
                break;
            }
            let tile_index = index >> (TILE_HEIGHT * (level as u32 + 1));
            hash = perfect_root(row);
            completed.insert((level as u8, tile_index), std::mem::take(row));
            level += 1;
        }
        self.size += 1;
    }

    /// The tree's root hash (RFC 6962 MTH over all leaves).
    pub fn root(&self) -> Hash {
        if self.size == 0 {
            return empty_root();
        }
        // The perfect subtrees of the size's binary decomposition, largest (leftmost) first.
        let mut parts = Vec::new();
        for row in self.levels.iter().rev() {
            let mut at = 0usize;
            for bit in (0..TILE_HEIGHT).rev() {
                let n = 1usize << bit;
                if row.len() & n != 0 {
                    parts.push(perfect_root(&row[at..at + n]));
                    at += n;
                }
            }
        }
        let mut acc = parts.pop().unwrap_or_else(empty_root);
        while let Some(left) = parts.pop() {
            acc = node_hash(&left, &acc);
        }
        acc
    }
}

// === Proofs over stored tiles ===

/// The hash of the perfect subtree of height `8 * level` with index `index`: entry `index % 256`
/// of tile (`level`, `index / 256`).
pub type EntryReader<'a> = dyn FnMut(u8, u64) -> Hash + 'a;

/// The perfect subtree of height `height`, index `index`, from tile entries.
fn node(height: u32, index: u64, get: &mut EntryReader<'_>) -> Hash {
    let level = height / TILE_HEIGHT;
    let rest = height % TILE_HEIGHT;
    let first = index << rest;
    let row: Vec<Hash> = (first..first + (1u64 << rest))
        .map(|j| get(level as u8, j))
        .collect();
    perfect_root(&row)
}

/// The largest power of two smaller than `n` (n > 1).
fn split(n: u64) -> u64 {
    1u64 << (63 - (n - 1).leading_zeros())
}

/// MTH(D[lo:hi]).
fn mth(lo: u64, hi: u64, get: &mut EntryReader<'_>) -> Hash {
    let n = hi - lo;
    if n == 0 {
        return empty_root();
    }
    if n.is_power_of_two() && lo % n == 0 {
        return node(n.trailing_zeros(), lo / n, get);
    }
    let k = split(n);
    let left = mth(lo, lo + k, get);
    let right = mth(lo + k, hi, get);
    node_hash(&left, &right)
}

/// The root of the tree of `size` leaves.
pub fn tree_root(size: u64, get: &mut EntryReader<'_>) -> Hash {
    mth(0, size, get)
}

/// RFC 6962 2.1.1 PATH(m, D[lo:hi]).
fn path(m: u64, lo: u64, hi: u64, get: &mut EntryReader<'_>, out: &mut Vec<Hash>) {
    let n = hi - lo;
    if n <= 1 {
        return;
    }
    let k = split(n);
    if m < k {
        path(m, lo, lo + k, get, out);
        out.push(mth(lo + k, hi, get));
    } else {
        path(m - k, lo + k, hi, get, out);
        out.push(mth(lo, lo + k, get));
    }
}

/// The inclusion proof of leaf `index` in the tree of `size` leaves.
pub fn inclusion_proof(index: u64, size: u64, get: &mut EntryReader<'_>) -> Vec<Hash> {
    let mut out = Vec::new();
    if index < size {
        path(index, 0, size, get, &mut out);
    }
    out
}

/// RFC 6962 2.1.2 SUBPROOF(m, D[lo:hi], b).
fn subproof(m: u64, lo: u64, hi: u64, whole: bool, get: &mut EntryReader<'_>, out: &mut Vec<Hash>) {
    let n = hi - lo;
    if m == n {
        if !whole {
            out.push(mth(lo, hi, get));
        }
        return;
    }
    let k = split(n);
    if m <= k {
        subproof(m, lo, lo + k, whole, get, out);
        out.push(mth(lo + k, hi, get));
    } else {
        subproof(m - k, lo + k, hi, false, get, out);
        out.push(mth(lo, lo + k, get));
    }
}

/// The consistency proof from the tree of `old` leaves to the tree of `new` leaves (empty when
/// `old` is 0 or equals `new`).
pub fn consistency_proof(old: u64, new: u64, get: &mut EntryReader<'_>) -> Vec<Hash> {
    let mut out = Vec::new();
    if old > 0 && old < new {
        subproof(old, 0, new, true, get, &mut out);
    }
    out
}

/// Runs `f` twice: first to learn which tiles it reads, then, once `fetch` has loaded them,
/// for real. `f` must read the same entries given any hashes (every proof here does).
pub async fn with_tiles<T, F, Fut>(
    mut f: F,
    fetch: impl FnOnce(Vec<(u8, u64)>) -> Fut,
) -> Result<T, String>
where
    F: FnMut(&mut EntryReader<'_>) -> T,
    Fut: std::future::Future<Output = Result<TileMap, String>>,
{
    let mut wanted = std::collections::BTreeSet::new();
    f(&mut |level, j| {
        wanted.insert((level, j / TILE_WIDTH as u64));
        [0u8; 32]
    });
    let tiles = fetch(wanted.into_iter().collect()).await?;
    let mut missing = None;
    let out = f(&mut |level, j| {
        let index = j / TILE_WIDTH as u64;
        let at = (j % TILE_WIDTH as u64) as usize;
        match tiles.get(&(level, index)).and_then(|t| t.get(at)) {
            Some(h) => *h,
            None => {
                missing.get_or_insert((level, j));
                [0u8; 32]
            }
        }
    });
    match missing {
        None => Ok(out),
        Some((level, j)) => Err(format!(
            "tile {level}/{} has no entry {} (the stored tree is shorter than the chain)",
            j / TILE_WIDTH as u64,
            j % TILE_WIDTH as u64
        )),
    }
}

/// RFC 9162 2.1.3.2: does `proof` show leaf `index` (hash `leaf`) in the tree `root` of `size`?
pub fn verify_inclusion(index: u64, size: u64, leaf: &Hash, proof: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut fnode, mut snode) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            r = node_hash(p, &r);
            while fnode & 1 == 0 && fnode != 0 {
                fnode >>= 1;
                snode >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    snode == 0 && &r == root
}

/// RFC 9162 2.1.4.2: does `proof` show that tree (`old`, `old_root`) is a prefix of tree
/// (`new`, `new_root`)?
pub fn verify_consistency(
    old: u64,
    new: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> bool {
    if old > new {
        return false;
    }
    if old == new {
        return proof.is_empty() && old_root == new_root;
    }
    if old == 0 {
        return proof.is_empty();
    }
    if proof.is_empty() {
        return false;
    }
    let mut nodes: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if old.is_power_of_two() {
        nodes.push(*old_root);
    }
    nodes.extend_from_slice(proof);
    let (mut fnode, mut snode) = (old - 1, new - 1);
    while fnode & 1 == 1 {
        fnode >>= 1;
        snode >>= 1;
    }
    let (mut fr, mut sr) = (nodes[0], nodes[0]);
    for c in &nodes[1..] {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while fnode & 1 == 0 && fnode != 0 {
                fnode >>= 1;
                snode >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    &fr == old_root && &sr == new_root && snode == 0
}

// === Tile paths ===

/// `<N>` of a tile path: 3-digit elements, all but the last prefixed with `x`.
pub fn index_path(mut n: u64) -> String {
    let mut parts = vec![format!("{:03}", n % 1000)];
    n /= 1000;
    while n > 0 {
        parts.push(format!("x{:03}", n % 1000));
        n /= 1000;
    }
    parts.reverse();
    parts.join("/")
}

/// A parsed `tile/...` path (after `tile/`): level (`None` for entry bundles), index, width
/// (`None` for a full tile).
pub fn parse_tile_path(path: &str) -> Option<(Option<u8>, u64, Option<usize>)> {
    let mut parts: Vec<&str> = path.split('/').collect();
    let first = parts.first()?;
    let level = if *first == "entries" {
        None
    } else {
        if first.is_empty() || (first.len() > 1 && first.starts_with('0')) {
            return None;
        }
        let l: u8 = first.parse().ok().filter(|l| *l <= 63)?;
        Some(l)
    };
    parts.remove(0);
    // A partial tile ends in `.p/<W>`.
    let mut width = None;
    if parts.len() >= 2 && parts[parts.len() - 2].ends_with(".p") {
        let w = parts.pop()?;
        if w.is_empty() || w.starts_with('0') || !w.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let w: usize = w.parse().ok().filter(|w| (1..TILE_WIDTH).contains(w))?;
        width = Some(w);
        let last = parts.last_mut()?;
        *last = last.strip_suffix(".p")?;
    }
    if parts.is_empty() {
        return None;
    }
    let mut n: u64 = 0;
    for (i, p) in parts.iter().enumerate() {
        let digits = if i + 1 < parts.len() {
            p.strip_prefix('x')?
        } else {
            p
        };
        if digits.len() != 3 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        n = n
            .checked_mul(1000)?
            .checked_add(digits.parse::<u64>().ok()?)?;
    }
    // One spelling per index: no leading `x000` elements.
    if index_path(n).split('/').count() != parts.len() {
        return None;
    }
    Some((level, n, width))
}

// === Signed notes (C2SP signed-note, tlog-checkpoint, tlog-cosignature) ===

/// Signature type bytes of the key ids.
pub const TYPE_ED25519: u8 = 0x01;
pub const TYPE_COSIGNATURE_V1: u8 = 0x04;

/// `SHA-256(name || "\n" || type || public key)[:4]`, big-endian.
pub fn key_id(name: &str, kind: u8, public: &[u8]) -> u32 {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(b"\n");
    h.update([kind]);
    h.update(public);
    let d = h.finalize();
    u32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

/// A key name as signed-note allows it: non-empty, no spaces, no `+`, printable.
pub fn valid_key_name(name: &str) -> bool {
    !name.is_empty()
        && !name
            .chars()
            .any(|c| c.is_whitespace() || c == '+' || c.is_control())
}

/// A verifier key: `<name>+<hex key id>+<base64(type || public key)>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vkey {
    pub name: String,
    pub id: u32,
    pub kind: u8,
    pub public: [u8; 32],
}

impl Vkey {
    pub fn new(name: &str, kind: u8, public: [u8; 32]) -> Vkey {
        Vkey {
            name: name.to_string(),
            id: key_id(name, kind, &public),
            kind,
            public,
        }
    }

    pub fn parse(text: &str) -> Result<Vkey, String> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut parts = text.trim().splitn(3, '+');
        let (Some(name), Some(id), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
            return Err("a vkey is <name>+<hex key id>+<base64 key>".into());
        };
        if !valid_key_name(name) {
            return Err(format!("{name:?} is not a valid key name"));
        }
        if id.len() != 8 {
            return Err("the key id is not 8 hex digits".into());
        }
        let id = u32::from_str_radix(id, 16).map_err(|_| "the key id is not hex".to_string())?;
        let raw = b64
            .decode(key)
            .map_err(|_| "the key is not base64".to_string())?;
        let (kind, public) = match raw.split_first() {
            Some((&k, rest)) if rest.len() == 32 => (k, rest),
            _ => return Err("the key is not a type byte and a 32-byte Ed25519 key".into()),
        };
        if kind != TYPE_ED25519 && kind != TYPE_COSIGNATURE_V1 {
            return Err(format!(
                "key type 0x{kind:02x} is not Ed25519 (0x01) or an Ed25519 cosignature key (0x04)"
            ));
        }
        let public: [u8; 32] = public
            .try_into()
            .map_err(|_| "bad key length".to_string())?;
        VerifyingKey::from_bytes(&public).map_err(|_| "not an Ed25519 public key".to_string())?;
        if key_id(name, kind, &public) != id {
            return Err("the key id does not match the name and key".into());
        }
        Ok(Vkey {
            name: name.to_string(),
            id,
            kind,
            public,
        })
    }

    pub fn encode(&self) -> String {
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut raw = vec![self.kind];
        raw.extend_from_slice(&self.public);
        format!("{}+{:08x}+{}", self.name, self.id, b64.encode(raw))
    }
}

/// The log's signing key under its key name (the checkpoint origin).
pub struct NoteSigner {
    pub name: String,
    key: SigningKey,
}

impl NoteSigner {
    pub fn new(name: &str, seed: &Key32) -> NoteSigner {
        NoteSigner {
            name: name.to_string(),
            key: SigningKey::from_bytes(seed.expose()),
        }
    }

    pub fn vkey(&self) -> Vkey {
        Vkey::new(
            &self.name,
            TYPE_ED25519,
            self.key.verifying_key().to_bytes(),
        )
    }

    /// The signature line over `text` (which ends in a newline).
    pub fn sign_line(&self, text: &str) -> String {
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut raw = self.vkey().id.to_be_bytes().to_vec();
        raw.extend_from_slice(&self.key.sign(text.as_bytes()).to_bytes());
        format!("\u{2014} {} {}\n", self.name, b64.encode(raw))
    }

    /// `text`, a blank line and the signature line.
    pub fn sign(&self, text: &str) -> String {
        format!("{text}\n{}", self.sign_line(text))
    }
}

/// One signature line of a note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigLine {
    pub name: String,
    pub id: u32,
    pub sig: Vec<u8>,
    /// The line as it was, with its newline.
    pub line: String,
}

/// One `— <name> <base64(key id || signature)>\n` line.
pub fn parse_sig_line(line: &str) -> Result<SigLine, String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let body = line
        .strip_prefix("\u{2014} ")
        .and_then(|l| l.strip_suffix('\n'))
        .ok_or("a signature line does not start with an em dash and a space")?;
    let (name, sig) = body
        .split_once(' ')
        .ok_or("a signature line has no signature")?;
    if !valid_key_name(name) {
        return Err(format!("{name:?} is not a valid key name"));
    }
    let raw = b64
        .decode(sig)
        .map_err(|_| "a signature is not base64".to_string())?;
    if raw.len() < 5 {
        return Err("a signature is too short".into());
    }
    Ok(SigLine {
        name: name.to_string(),
        id: u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]),
        sig: raw[4..].to_vec(),
        line: line.to_string(),
    })
}

/// Splits a signed note into its text (with the final newline) and signature lines.
pub fn split_note(note: &str) -> Result<(String, Vec<SigLine>), String> {
    if note.len() > 1 << 20 {
        return Err("the note is too long".into());
    }
    if note.chars().any(|c| c.is_control() && c != '\n') {
        return Err("the note holds control characters".into());
    }
    let at = note
        .rfind("\n\n")
        .ok_or("no blank line separates the text from its signatures")?;
    let text = &note[..at + 1];
    let sigs = &note[at + 2..];
    if !sigs.ends_with('\n') {
        return Err("the last signature line does not end in a newline".into());
    }
    let mut out = Vec::new();
    for line in sigs.split_inclusive('\n') {
        out.push(parse_sig_line(line)?);
        if out.len() > 64 {
            return Err("too many signatures".into());
        }
    }
    if out.is_empty() {
        return Err("the note has no signature".into());
    }
    Ok((text.to_string(), out))
}

/// What one signature line says under one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineCheck {
    /// The line names another key (name or id differ): ignored.
    OtherKey,
    /// The line names this key but its signature does not verify.
    Bad,
    /// Verified; a cosignature carries its time.
    Good(Option<u64>),
}

/// Checks `sig` over `text` under `key`. Ed25519 notes sign the text; cosignatures (v1) sign
/// `cosignature/v1\ntime <t>\n` followed by the text, and carry the time first.
pub fn verify_line(key: &Vkey, text: &str, sig: &SigLine) -> LineCheck {
    if sig.name != key.name || sig.id != key.id {
        return LineCheck::OtherKey;
    }
    let Ok(vk) = VerifyingKey::from_bytes(&key.public) else {
        return LineCheck::Bad;
    };
    match key.kind {
        TYPE_ED25519 => match ed25519_dalek::Signature::from_slice(&sig.sig) {
            Ok(s) if vk.verify(text.as_bytes(), &s).is_ok() => LineCheck::Good(None),
            _ => LineCheck::Bad,
        },
        TYPE_COSIGNATURE_V1 if sig.sig.len() == 72 => {
            let mut t = [0u8; 8];
            t.copy_from_slice(&sig.sig[..8]);
            let time = u64::from_be_bytes(t);
            let msg = format!("cosignature/v1\ntime {time}\n{text}");
            match ed25519_dalek::Signature::from_slice(&sig.sig[8..]) {
                Ok(s) if time > 0 && vk.verify(msg.as_bytes(), &s).is_ok() => {
                    LineCheck::Good(Some(time))
                }
                _ => LineCheck::Bad,
            }
        }
        _ => LineCheck::Bad,
    }
}

/// A checkpoint body: origin, size, root hash (no extension lines are written; any read are
/// kept as text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointBody {
    pub origin: String,
    pub size: u64,
    pub root: Hash,
}

impl CheckpointBody {
    pub fn text(&self) -> String {
        let b64 = base64::engine::general_purpose::STANDARD;
        format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            b64.encode(self.root)
        )
    }

    pub fn parse(text: &str) -> Result<CheckpointBody, String> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut lines = text.split('\n');
        let origin = lines
            .next()
            .filter(|l| !l.is_empty())
            .ok_or("no origin line")?;
        let size = lines.next().ok_or("no size line")?;
        if size.is_empty()
            || (size.len() > 1 && size.starts_with('0'))
            || !size.bytes().all(|b| b.is_ascii_digit())
        {
            return Err("the size line is not a decimal without leading zeroes".into());
        }
        let size: u64 = size
            .parse()
            .map_err(|_| "the size is too large".to_string())?;
        let root: Hash = b64
            .decode(lines.next().ok_or("no root hash line")?)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or("the root hash is not 32 bytes of base64")?;
        Ok(CheckpointBody {
            origin: origin.to_string(),
            size,
            root,
        })
    }
}

/// A signed checkpoint after checking: its body, its text, and the witnesses that cosigned it
/// (name and cosignature time).
#[derive(Debug, Clone)]
pub struct OpenedCheckpoint {
    pub body: CheckpointBody,
    pub text: String,
    pub cosigned_by: Vec<(String, u64)>,
}

/// Opens a checkpoint note: the log's signature must verify (a signature line naming the log key
/// that does not verify rejects the note), and every line from a known witness must verify.
pub fn open_checkpoint(
    note: &str,
    log: &Vkey,
    witnesses: &[Vkey],
) -> Result<OpenedCheckpoint, String> {
    let (text, sigs) = split_note(note)?;
    let mut by_log = false;
    let mut cosigned_by = Vec::new();
    for s in &sigs {
        if s.name == log.name && s.id == log.id {
            if verify_line(log, &text, s) != LineCheck::Good(None) {
                return Err("the log's signature does not verify".into());
            }
            by_log = true;
            continue;
        }
        if let Some(w) = witnesses.iter().find(|w| w.name == s.name && w.id == s.id) {
            match verify_line(w, &text, s) {
                LineCheck::Good(Some(time)) => cosigned_by.push((w.name.clone(), time)),
                _ => return Err(format!("the cosignature of {} does not verify", w.name)),
            }
        }
        // Unknown keys are ignored, as signed-note requires.
    }
    if !by_log {
        return Err(format!("the note is not signed by {}", log.encode()));
    }
    let body = CheckpointBody::parse(&text)?;
    if body.origin != log.name {
        return Err(format!(
            "the checkpoint's origin {:?} is not the log key's name {:?}",
            body.origin, log.name
        ));
    }
    Ok(OpenedCheckpoint {
        body,
        text,
        cosigned_by,
    })
}

/// A configured witness: its submission prefix and its cosigning key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Witness {
    pub url: String,
    pub vkey: Vkey,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The RFC 6962 reference inputs (certificate-transparency's merkle tree tests).
    fn leaves() -> Vec<Vec<u8>> {
        [
            "",
            "00",
            "10",
            "2021",
            "3031",
            "40414243",
            "5051525354555657",
            "606162636465666768696a6b6c6d6e6f",
        ]
        .iter()
        .map(|h| hex::decode(h).unwrap())
        .collect()
    }

    fn edge_of(n: usize, data: &[Vec<u8>]) -> (Edge, TileMap) {
        let mut e = Edge::new();
        let mut tiles = TileMap::new();
        tiles.extend(e.extend(data[..n].iter().map(|d| leaf_hash(d))));
        (e, tiles)
    }

    #[test]
    fn roots_match_the_rfc_6962_reference_vectors() {
        let want = [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
            "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
            "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
            "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
            "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
        ];
        let data = leaves();
        assert_eq!(
            hex::encode(empty_root()),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        for (n, w) in want.iter().enumerate() {
            let (e, tiles) = edge_of(n + 1, &data);
            assert_eq!(hex::encode(e.root()), *w, "size {}", n + 1);
            let mut get = |l: u8, j: u64| tiles[&(l, j / 256)][(j % 256) as usize];
            assert_eq!(hex::encode(tree_root(n as u64 + 1, &mut get)), *w);
        }
    }

    #[test]
    fn inclusion_and_consistency_proofs_match_the_reference_vectors() {
        let data = leaves();
        let (_, tiles) = edge_of(8, &data);
        let mut get = |l: u8, j: u64| tiles[&(l, j / 256)][(j % 256) as usize];
        // From certificate-transparency's reference tests: leaf 5 of 8.
        let proof = inclusion_proof(5, 8, &mut get);
        let hexed: Vec<String> = proof.iter().map(hex::encode).collect();
        assert_eq!(
            hexed,
            [
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ]
        );
        // Consistency 6 -> 8.
        let proof = consistency_proof(6, 8, &mut get);
        let hexed: Vec<String> = proof.iter().map(hex::encode).collect();
        assert_eq!(
            hexed,
            [
                "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ]
        );
    }

    /// Every proof of every pair in a tree that spans several tiles verifies, and a proof against
    /// another root, index or size does not.
    #[test]
    fn proofs_across_tiles_verify_and_nothing_else_does() {
        let n = 70_000u64;
        let mut e = Edge::new();
        let mut tiles = TileMap::new();
        let sizes = [
            1u64, 2, 255, 256, 257, 65_535, 65_536, 65_537, 69_999, 70_000,
        ];
        let olds = [1u64, 7, 256, 4096, 65_536];
        // The edge's root (one algorithm) at every size a proof below needs, and one either side.
        let mut roots = std::collections::HashMap::new();
        roots.insert(0u64, empty_root());
        let wanted: std::collections::HashSet<u64> = sizes
            .iter()
            .chain(olds.iter())
            .flat_map(|s| [s - 1, *s, s + 1])
            .collect();
        for i in 0..n {
            tiles.extend(e.extend([leaf_hash(&i.to_be_bytes())]));
            if wanted.contains(&(i + 1)) {
                roots.insert(i + 1, e.root());
            }
        }
        // 273 full level-0 tiles + a partial of 112, one full level-1 tile + a partial of 17,
        // and a level-2 partial of 1: the spec's own example.
        assert_eq!(tiles.get(&(0, 273)).map(Vec::len), Some(112));
        assert_eq!(tiles.get(&(1, 1)).map(Vec::len), Some(17));
        assert_eq!(tiles.get(&(2, 0)).map(Vec::len), Some(1));
        assert_eq!(
            Edge::partial_tiles(n),
            vec![(0, 273, 112), (1, 1, 17), (2, 0, 1)]
        );
        let edge = Edge::from_partials(n, &tiles).unwrap();
        assert_eq!(edge, e);
        let mut get = |l: u8, j: u64| tiles[&(l, j / 256)][(j % 256) as usize];
        for size in sizes {
            assert_eq!(tree_root(size, &mut get), roots[&size], "root {size}");
            for index in [0, size / 3, size - 1] {
                let leaf = leaf_hash(&index.to_be_bytes());
                let proof = inclusion_proof(index, size, &mut get);
                assert!(verify_inclusion(index, size, &leaf, &proof, &roots[&size]));
                assert!(!verify_inclusion(
                    index,
                    size,
                    &leaf,
                    &proof,
                    &roots[&(size - 1)]
                ));
                if size > 1 {
                    let other = (index + 1) % size;
                    assert!(!verify_inclusion(other, size, &leaf, &proof, &roots[&size]));
                }
            }
            for old in olds {
                if old >= size {
                    continue;
                }
                let proof = consistency_proof(old, size, &mut get);
                let (o, s) = (&roots[&old], &roots[&size]);
                assert!(
                    verify_consistency(old, size, o, s, &proof),
                    "{old} -> {size}"
                );
                assert!(!verify_consistency(
                    old,
                    size,
                    &roots[&(old + 1)],
                    s,
                    &proof
                ));
                assert!(!verify_consistency(
                    old,
                    size,
                    o,
                    &roots[&(size - 1)],
                    &proof
                ));
            }
        }
    }

    #[test]
    fn tile_paths_have_one_spelling() {
        assert_eq!(index_path(1_234_067), "x001/x234/067");
        assert_eq!(index_path(5), "005");
        assert_eq!(
            parse_tile_path("0/x001/x234/067"),
            Some((Some(0), 1_234_067, None))
        );
        assert_eq!(parse_tile_path("2/005.p/17"), Some((Some(2), 5, Some(17))));
        assert_eq!(
            parse_tile_path("entries/x001/000.p/1"),
            Some((None, 1000, Some(1)))
        );
        for bad in [
            "0/5",
            "0/x000/005",
            "00/005",
            "64/000",
            "0/005.p/0",
            "0/005.p/256",
            "0/005.p/07",
            "0/",
            "x/000",
            "0/1234",
            "0/x1/000",
        ] {
            assert_eq!(parse_tile_path(bad), None, "{bad}");
        }
    }

    /// The signed-note spec's own example key and note.
    #[test]
    fn signed_note_spec_vector_verifies() {
        let vkey =
            Vkey::parse("example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k")
                .unwrap();
        let note = "This is an example message.\n\n\u{2014} example.com/foo Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6TfXppzi2ONncAlTgK7Ztg1ERYNZXsYjOBH3mFXmRKuwHjG1Yu72IneyaQM=\n";
        let (text, sigs) = split_note(note).unwrap();
        assert_eq!(text, "This is an example message.\n");
        assert_eq!(verify_line(&vkey, &text, &sigs[0]), LineCheck::Good(None));
        let tampered = note.replace("example message", "example massage");
        let (text, sigs) = split_note(&tampered).unwrap();
        assert_eq!(verify_line(&vkey, &text, &sigs[0]), LineCheck::Bad);
        assert_eq!(
            vkey.encode(),
            "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k"
        );
    }

    #[test]
    fn checkpoints_open_only_under_the_log_key() {
        let seed = Key32::from_bytes([9u8; 32]);
        let log = NoteSigner::new("aegis.example/main", &seed);
        let body = CheckpointBody {
            origin: "aegis.example/main".into(),
            size: 8,
            root: [3u8; 32],
        };
        let note = log.sign(&body.text());
        let opened = open_checkpoint(&note, &log.vkey(), &[]).unwrap();
        assert_eq!(opened.body, body);
        let other = NoteSigner::new("aegis.example/main", &Key32::from_bytes([8u8; 32]));
        assert!(open_checkpoint(&note, &other.vkey(), &[]).is_err());
        let forged = note.replace("\n8\n", "\n9\n");
        assert!(open_checkpoint(&forged, &log.vkey(), &[]).is_err());
    }
}
