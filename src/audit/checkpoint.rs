//! Signed checkpoints: the chain's head (chain id, size, head mac, time) signed with Ed25519 and
//! written outside PostgreSQL, like a Certificate Transparency checkpoint.
//!
//! A plain HMAC chain cannot show that rows were cut off its tail, that the table was rolled back
//! to a backup, or that someone holding the HMAC key rewrote it consistently. A checkpoint pins
//! "the chain had N rows and its head was H" in a place the database's users cannot rewrite; the
//! verifier then checks the table against every checkpoint.
//!
//! Writers never sign an inconsistent checkpoint: before signing size N, the checkpointer
//! re-walks every row since the previous checkpoint (links, seqs, MACs) and requires the walk to
//! end exactly at the head it is about to sign.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use futures_util::{pin_mut, TryStreamExt};
use serde::{Deserialize, Serialize};

use super::record::GENESIS_MAC;
use super::verify::{record_of, Walk, SELECT_RANGE};
use crate::pg::PgTarget;
use crate::secret::Key32;

const DOMAIN_V1: &str = "aegis.checkpoint.v1";
const DOMAIN_V2: &str = "aegis.checkpoint.v2";
/// The format this build writes. Version 2 signs the signer's instance id too, and its `ts` is
/// PostgreSQL's clock read together with the head (version 1: the signing host's clock).
pub const VERSION: u32 = 2;

/// One signed head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub version: u32,
    pub chain_id: String,
    pub size: u64,
    pub head_mac: [u8; 32],
    /// Seconds since the epoch: when the head had this size, by the database's clock (v2).
    pub ts: i64,
    /// The instance that signed it (v2; empty in v1).
    pub signer: String,
    pub public_key: [u8; 32],
    pub signature: [u8; 64],
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckpointFile {
    version: u32,
    chain_id: String,
    size: u64,
    head_mac: String,
    ts: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    signer: Option<String>,
    public_key: String,
    signature: String,
}

/// The public half of the checkpoint signing key.
pub fn public_key(seed: &Key32) -> [u8; 32] {
    SigningKey::from_bytes(seed.expose())
        .verifying_key()
        .to_bytes()
}

impl Checkpoint {
    /// The signed bytes: one field per line, like a transparency-log note.
    fn message(&self) -> Vec<u8> {
        let head = hex::encode(self.head_mac);
        let (chain_id, size, ts) = (&self.chain_id, self.size, self.ts);
        match self.version {
            1 => format!("{DOMAIN_V1}\n{chain_id}\n{size}\n{head}\n{ts}\n"),
            _ => format!(
                "{DOMAIN_V2}\n{chain_id}\n{size}\n{head}\n{ts}\n{}\n",
                self.signer
            ),
        }
        .into_bytes()
    }

    /// Signs a head (the current format, [`VERSION`]) as `signer`.
    pub fn sign(
        chain_id: &str,
        size: u64,
        head_mac: [u8; 32],
        ts: i64,
        signer: &str,
        seed: &Key32,
    ) -> Checkpoint {
        let key = SigningKey::from_bytes(seed.expose());
        let mut cp = Checkpoint {
            version: VERSION,
            chain_id: chain_id.to_string(),
            size,
            head_mac,
            ts,
            signer: signer.to_string(),
            public_key: key.verifying_key().to_bytes(),
            signature: [0u8; 64],
        };
        cp.signature = key.sign(&cp.message()).to_bytes();
        cp
    }

    /// True when signed by `expected` (the configured signing key's public half).
    pub fn verify(&self, expected: &[u8; 32]) -> bool {
        if &self.public_key != expected {
            return false;
        }
        let Ok(key) = VerifyingKey::from_bytes(expected) else {
            return false;
        };
        let sig = ed25519_dalek::Signature::from_bytes(&self.signature);
        key.verify(&self.message(), &sig).is_ok()
    }

    pub fn to_json(&self) -> String {
        let b64 = base64::engine::general_purpose::STANDARD;
        let file = CheckpointFile {
            version: self.version,
            chain_id: self.chain_id.clone(),
            size: self.size,
            head_mac: hex::encode(self.head_mac),
            ts: self.ts,
            signer: (self.version >= 2).then(|| self.signer.clone()),
            public_key: b64.encode(self.public_key),
            signature: b64.encode(self.signature),
        };
        serde_json::to_string_pretty(&file).unwrap_or_default()
    }

    pub fn from_json(text: &str) -> Result<Checkpoint, String> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let f: CheckpointFile =
            serde_json::from_str(text).map_err(|e| format!("not a checkpoint: {e}"))?;
        let signer = match (f.version, f.signer) {
            (1, None) => String::new(),
            (2, Some(s)) => s,
            (1, Some(_)) => return Err("a version 1 checkpoint has no signer".into()),
            (2, None) => return Err("a version 2 checkpoint names its signer".into()),
            (v, _) => return Err(format!("unknown checkpoint version {v}")),
        };
        let head_mac: [u8; 32] = hex::decode(&f.head_mac)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or("head_mac is not 32 bytes of hex")?;
        let public_key: [u8; 32] = b64
            .decode(&f.public_key)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or("public_key is not 32 bytes of base64")?;
        let signature: [u8; 64] = b64
            .decode(&f.signature)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or("signature is not 64 bytes of base64")?;
        Ok(Checkpoint {
            version: f.version,
            chain_id: f.chain_id,
            size: f.size,
            head_mac,
            ts: f.ts,
            signer,
            public_key,
            signature,
        })
    }
}

// === Sinks ===

/// Where checkpoints go. The directory sink is the default; object storage with retention
/// (S3 Object Lock, GCS retention) can implement the same trait.
pub trait CheckpointSink: Send + Sync + 'static {
    fn write(&self, cp: &Checkpoint) -> std::io::Result<()>;
    /// Every stored checkpoint, or why one could not be read (the verifier treats an unreadable
    /// checkpoint as tampering, never skips it).
    fn list(&self) -> std::io::Result<Vec<Result<Checkpoint, String>>>;
    /// Writes (or rewrites, with more cosignatures) the signed note of the transparency log's
    /// checkpoint of `size`.
    fn write_note(&self, chain_id: &str, size: u64, note: &str) -> std::io::Result<()>;
    /// Every stored note as (file name, text), or why one could not be read.
    fn list_notes(&self) -> std::io::Result<Vec<Result<(String, String), String>>>;
}

/// Checkpoints as files `checkpoint-<chain>-<size>-<ts>-<instance>.json` in one directory.
pub struct DirSink {
    dir: PathBuf,
    instance: String,
}

impl DirSink {
    pub fn new(dir: impl Into<PathBuf>, instance: &str) -> DirSink {
        let instance = instance
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        DirSink {
            dir: dir.into(),
            instance,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl DirSink {
    /// Writes `name` atomically and durably (temporary file, fsync, rename, fsync the directory).
    fn put(&self, name: &str, data: &[u8]) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let tmp = self.dir.join(format!(".{name}.{}.tmp", self.instance));
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, self.dir.join(name))?;
        if let Ok(d) = std::fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

impl CheckpointSink for DirSink {
    fn write(&self, cp: &Checkpoint) -> std::io::Result<()> {
        let name = format!(
            "checkpoint-{}-{:020}-{}-{}.json",
            cp.chain_id, cp.size, cp.ts, self.instance
        );
        self.put(&name, cp.to_json().as_bytes())
    }

    fn write_note(&self, chain_id: &str, size: u64, note: &str) -> std::io::Result<()> {
        self.put(&format!("note-{chain_id}-{size:020}.txt"), note.as_bytes())
    }

    fn list_notes(&self) -> std::io::Result<Vec<Result<(String, String), String>>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !(name.starts_with("note-") && name.ends_with(".txt")) {
                continue;
            }
            out.push(
                std::fs::read_to_string(entry.path())
                    .map(|t| (name.clone(), t))
                    .map_err(|e| format!("{name}: {e}")),
            );
        }
        Ok(out)
    }

    fn list(&self) -> std::io::Result<Vec<Result<Checkpoint, String>>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !(name.starts_with("checkpoint-") && name.ends_with(".json")) {
                continue;
            }
            let parsed = std::fs::read_to_string(entry.path())
                .map_err(|e| format!("{name}: {e}"))
                .and_then(|t| Checkpoint::from_json(&t).map_err(|e| format!("{name}: {e}")));
            out.push(parsed);
        }
        Ok(out)
    }
}

/// The chain a note file (`note-<chain>-<size, 20 digits>.txt`) belongs to.
pub fn note_file_chain(name: &str) -> Option<&str> {
    let stem = name.strip_prefix("note-")?.strip_suffix(".txt")?;
    let (chain, size) = stem.rsplit_once('-')?;
    (size.len() == 20 && size.bytes().all(|b| b.is_ascii_digit())).then_some(chain)
}

/// Keeps the notes of `chain_id` (and every unreadable one: the verifier reports those).
pub fn notes_of(
    notes: Vec<Result<(String, String), String>>,
    chain_id: &str,
) -> Vec<Result<(String, String), String>> {
    notes
        .into_iter()
        .filter(|n| match n {
            Ok((name, _)) => note_file_chain(name) == Some(chain_id),
            Err(_) => true,
        })
        .collect()
}

// === The checkpointer ===

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("audit store unavailable: {0}")]
    Store(#[from] crate::pg::PgError),
    #[error("refusing to sign an inconsistent chain: {0}")]
    Inconsistent(String),
    #[error("cannot write the checkpoint: {0}")]
    Sink(String),
}

/// The transparency log's part of checkpointing: the origin (also the note key's name), the
/// witnesses and how many of them must cosign.
pub struct TlogSettings {
    pub origin: String,
    pub witnesses: Vec<super::witness::Witness>,
    pub quorum: usize,
    pub witness_timeout: Duration,
    pub http: reqwest::Client,
}

/// The newest signed tree head this process knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeHead {
    pub size: u64,
    pub root: [u8; 32],
    /// Witnesses whose cosignature it carries.
    pub cosigners: usize,
    /// Whether that reaches the configured quorum (true when no witness is configured).
    pub witnessed: bool,
}

/// Signs the chain head periodically.
pub struct Checkpointer {
    target: PgTarget,
    chain_id: String,
    /// The HMAC keys rows may be signed with (a config reload may add one).
    keys: std::sync::RwLock<HashMap<String, Key32>>,
    signing: Key32,
    sink: Arc<dyn CheckpointSink>,
    /// This instance's id, signed into every checkpoint it writes.
    signer: String,
    last: Mutex<Option<Checkpoint>>,
    tlog: TlogSettings,
    notes: super::tlog::NoteSigner,
    last_tree: Mutex<Option<TreeHead>>,
}

impl Checkpointer {
    pub fn new(
        target: PgTarget,
        chain_id: String,
        keys: HashMap<String, Key32>,
        signing: Key32,
        sink: Arc<dyn CheckpointSink>,
        signer: &str,
        tlog: TlogSettings,
    ) -> Checkpointer {
        let notes = super::tlog::NoteSigner::new(&tlog.origin, &signing);
        Checkpointer {
            target,
            chain_id,
            keys: std::sync::RwLock::new(keys),
            signing,
            sink,
            signer: signer.to_string(),
            last: Mutex::new(None),
            tlog,
            notes,
            last_tree: Mutex::new(None),
        }
    }

    /// Takes the HMAC keys of a reloaded config.
    pub fn set_keys(&self, keys: HashMap<String, Key32>) {
        if let Ok(mut k) = self.keys.write() {
            *k = keys;
        }
    }

    /// The log's verifier key (what auditors and witnesses are given).
    pub fn vkey(&self) -> super::tlog::Vkey {
        self.notes.vkey()
    }

    /// The newest tree head this process signed or cosigned.
    pub fn last_tree(&self) -> Option<TreeHead> {
        self.last_tree.lock().ok().and_then(|g| g.clone())
    }

    /// The newest checkpoint this process knows (signed here or found in the sink).
    pub fn last(&self) -> Option<Checkpoint> {
        self.last.lock().ok().and_then(|g| g.clone())
    }

    /// Reads the sink on the blocking pool: Checks may share this thread.
    async fn newest_in_sink(&self) -> Option<Checkpoint> {
        let public = public_key(&self.signing);
        let sink = self.sink.clone();
        let listed = tokio::task::spawn_blocking(move || sink.list())
            .await
            .ok()?
            .ok()?;
        listed
            .into_iter()
            .filter_map(Result::ok)
            .filter(|c| c.chain_id == self.chain_id && c.verify(&public))
            .max_by_key(|c| (c.size, c.ts))
    }

    /// Signs the current head if it moved and is consistent; returns the new checkpoint.
    pub async fn run_once(&self) -> Result<Option<Checkpoint>, CheckpointError> {
        let client = self
            .target
            .connect(Duration::from_secs(2), "aegis-checkpoint")
            .await?;
        let pg = |e: tokio_postgres::Error| CheckpointError::Store(e.into());
        // The head and the database's clock, read together: with several replicas signing, the
        // database orders the checkpoints, not each host's clock.
        let head = client
            .query_opt(
                "SELECT size, head_mac, floor(extract(epoch FROM clock_timestamp()))::bigint, \
                 tree_size FROM aegis_chain_head WHERE chain_id = $1",
                &[&self.chain_id],
            )
            .await
            .map_err(pg)?;
        let Some(head) = head else {
            return Ok(None);
        };
        let size = head.get::<_, i64>(0) as u64;
        let head_mac: [u8; 32] = head
            .get::<_, Vec<u8>>(1)
            .try_into()
            .map_err(|_| CheckpointError::Inconsistent("head mac is not 32 bytes".into()))?;
        let tree_size = head.get::<_, i64>(3) as u64;
        let last = match self.last() {
            Some(c) => Some(c),
            None => self.newest_in_sink().await,
        };
        let latest_note = super::tiles::latest_note(&client, &self.chain_id)
            .await
            .map_err(pg)?;
        let note_current = latest_note.as_ref().is_some_and(|(n, _)| *n == size);
        let (from, from_mac, json_needed) = match &last {
            Some(c) if c.size == size && c.head_mac == head_mac && note_current => return Ok(None),
            Some(c) if c.size > size => {
                return Err(CheckpointError::Inconsistent(format!(
                    "the chain has {size} rows but checkpoint {} was signed for {} rows",
                    c.chain_id, c.size
                )))
            }
            Some(c) if c.size == size && c.head_mac == head_mac => (c.size, c.head_mac, false),
            Some(c) => (c.size, c.head_mac, true),
            None => (0, GENESIS_MAC, true),
        };
        if size == 0 {
            return Ok(None);
        }
        if tree_size != size {
            return Err(CheckpointError::Inconsistent(format!(
                "the transparency log holds {tree_size} leaves but the chain {size} rows"
            )));
        }

        // Re-walk every row since the last checkpoint; sign only what the walk proves.
        let stmt = client.prepare(SELECT_RANGE).await.map_err(pg)?;
        let (lo, hi) = (from as i64, size as i64);
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&self.chain_id, &lo, &hi];
        let rows = client.query_raw(&stmt, params).await.map_err(pg)?;
        pin_mut!(rows);
        let mut walk = Walk::resume(from + 1, from_mac.to_vec());
        let mut walked = 0u64;
        let mut leaves = Vec::new();
        let keys = self.keys.read().map(|k| k.clone()).unwrap_or_default();
        while let Some(row) = rows.try_next().await.map_err(pg)? {
            walked += 1;
            if walked % super::verify::YIELD_EVERY == 0 {
                tokio::task::yield_now().await;
            }
            let (rec, mac) = record_of(&row).map_err(CheckpointError::Inconsistent)?;
            if let Err(bad) = walk.step(&rec, &mac, &keys) {
                return Err(CheckpointError::Inconsistent(format!(
                    "seq {}: {} ({})",
                    bad.seq, bad.problem, bad.detail
                )));
            }
            leaves.push(rec.leaf_hash());
        }
        if walk.next_seq() != size + 1 || walk.head() != head_mac.as_slice() {
            return Err(CheckpointError::Inconsistent(format!(
                "the rows end at seq {} but the head row says {size}",
                walk.next_seq() - 1
            )));
        }
        let root = self
            .check_tree(&client, from, &leaves, size, latest_note.as_ref())
            .await?;
        let ts: i64 = head.get(2);
        let cp = Checkpoint::sign(
            &self.chain_id,
            size,
            head_mac,
            ts,
            &self.signer,
            &self.signing,
        );
        // The signed note: the C2SP checkpoint body, signed by the log key.
        let body = super::tlog::CheckpointBody {
            origin: self.tlog.origin.clone(),
            size,
            root,
        };
        let note = self.notes.sign(&body.text());
        client
            .execute(
                "INSERT INTO aegis_tlog_checkpoints (chain_id, size, root, note) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (chain_id, size) DO NOTHING",
                &[&self.chain_id, &(size as i64), &root.as_slice(), &note],
            )
            .await
            .map_err(pg)?;
        // File writes and fsyncs go to the blocking pool, off the thread that runs Checks.
        let (sink, signed, chain, n) = (
            self.sink.clone(),
            cp.clone(),
            self.chain_id.clone(),
            note.clone(),
        );
        tokio::task::spawn_blocking(move || {
            if json_needed {
                sink.write(&signed)?;
            }
            sink.write_note(&chain, size, &n)
        })
        .await
        .map_err(|e| CheckpointError::Sink(e.to_string()))?
        .map_err(|e| CheckpointError::Sink(e.to_string()))?;
        metrics::gauge!("aegis_checkpoint_size").set(size as f64);
        metrics::gauge!("aegis_checkpoint_timestamp_seconds").set(ts as f64);
        metrics::gauge!("aegis_tlog_size").set(size as f64);
        if let Ok(mut g) = self.last.lock() {
            *g = Some(cp.clone());
        }
        let cosigners = self.witness(&client, &note, &body.text(), size).await;
        let witnessed = cosigners >= self.tlog.quorum;
        metrics::gauge!("aegis_checkpoint_witnessed").set(if witnessed { 1.0 } else { 0.0 });
        if let Ok(mut g) = self.last_tree.lock() {
            *g = Some(TreeHead {
                size,
                root,
                cosigners,
                witnessed,
            });
        }
        Ok(Some(cp))
    }

    /// Before a tree head is signed: the leaves of the rows just walked are the tree's leaves,
    /// and the tree still has the root of the last note signed (by any replica), so the new
    /// head extends it. Returns the root at `size`.
    async fn check_tree(
        &self,
        client: &tokio_postgres::Client,
        from: u64,
        leaves: &[[u8; 32]],
        size: u64,
        latest: Option<&(u64, String)>,
    ) -> Result<[u8; 32], CheckpointError> {
        use super::tlog::TILE_WIDTH;
        let bad = CheckpointError::Inconsistent;
        let w = TILE_WIDTH as u64;
        if !leaves.is_empty() {
            let coords: Vec<(u8, u64)> = (from / w..=(size - 1) / w).map(|i| (0u8, i)).collect();
            let stored = super::tiles::fetch(client, &self.chain_id, &coords)
                .await
                .map_err(|e| CheckpointError::Store(e.into()))?;
            for (i, leaf) in leaves.iter().enumerate() {
                let j = from + i as u64;
                let found = stored
                    .get(&(0, j / w))
                    .and_then(|t| t.get((j % w) as usize));
                if found != Some(leaf) {
                    return Err(bad(format!(
                        "leaf {j} of the transparency log is not the hash of row {}",
                        j + 1
                    )));
                }
            }
        }
        let root = super::tiles::compute(client, &self.chain_id, |get| {
            super::tlog::tree_root(size, get)
        })
        .await
        .map_err(bad)?;
        if let Some((old, note)) = latest {
            let opened = super::tlog::open_checkpoint(note, &self.notes.vkey(), &[])
                .map_err(|e| bad(format!("the stored checkpoint note of size {old}: {e}")))?;
            if opened.body.size > size {
                return Err(bad(format!(
                    "a checkpoint note was signed for {} leaves but the tree has {size}",
                    opened.body.size
                )));
            }
            let old_size = opened.body.size;
            let old_root = super::tiles::compute(client, &self.chain_id, |get| {
                super::tlog::tree_root(old_size, get)
            })
            .await
            .map_err(bad)?;
            if old_root != opened.body.root {
                return Err(bad(format!(
                    "the tree no longer has the root signed at size {old_size}"
                )));
            }
        }
        Ok(root)
    }

    /// Sends the note to every witness; keeps the cosignatures that verify, on the stored note
    /// and its file. Returns how many witnesses cosigned.
    async fn witness(
        &self,
        client: &tokio_postgres::Client,
        note: &str,
        text: &str,
        size: u64,
    ) -> usize {
        use super::witness::{submit, Outcome, Signed};
        if self.tlog.witnesses.is_empty() {
            return 0;
        }
        let mut lines = Vec::new();
        let signed = Signed {
            chain_id: &self.chain_id,
            note,
            text,
            size,
        };
        for w in &self.tlog.witnesses {
            match submit(
                client,
                &self.tlog.http,
                self.tlog.witness_timeout,
                w,
                &signed,
            )
            .await
            {
                Outcome::Cosigned(line) => lines.push(line),
                Outcome::Failed(why) => {
                    metrics::counter!("aegis_witness_failures_total", "witness" => w.vkey.name.clone())
                        .increment(1);
                    tracing::warn!(witness = %w.vkey.name, size, reason = %why, "checkpoint not cosigned");
                }
            }
        }
        if lines.is_empty() {
            return 0;
        }
        let cosigned = format!("{note}{}", lines.concat());
        let n = lines.len() as i32;
        let stored = client
            .execute(
                "UPDATE aegis_tlog_checkpoints SET note = $3, cosigners = $4 \
                 WHERE chain_id = $1 AND size = $2 AND cosigners < $4",
                &[&self.chain_id, &(size as i64), &cosigned, &n],
            )
            .await;
        if let Err(e) = stored {
            tracing::warn!(error = %crate::pg::error_text(&e), "cosigned note not stored");
        }
        let (sink, chain) = (self.sink.clone(), self.chain_id.clone());
        let written =
            tokio::task::spawn_blocking(move || sink.write_note(&chain, size, &cosigned)).await;
        if !matches!(written, Ok(Ok(()))) {
            tracing::warn!(
                size,
                "cosigned note not written to the checkpoint directory"
            );
        }
        lines.len()
    }

    /// Checkpoints every `interval` until `stop` turns true.
    pub async fn run(
        self: Arc<Self>,
        interval: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            match self.run_once().await {
                Ok(Some(cp)) => tracing::debug!(size = cp.size, "checkpoint signed"),
                Ok(None) => {}
                Err(e @ CheckpointError::Inconsistent(_)) => {
                    metrics::counter!("aegis_checkpoint_failures_total", "kind" => "inconsistent")
                        .increment(1);
                    tracing::error!(error = %e, "audit chain inconsistency: checkpoint not signed");
                }
                Err(e) => {
                    metrics::counter!("aegis_checkpoint_failures_total", "kind" => "unavailable")
                        .increment(1);
                    tracing::warn!(error = %e, "checkpoint not written");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_bind_every_field() {
        let seed = Key32::generate();
        let public = public_key(&seed);
        let cp = Checkpoint::sign("main", 42, [7u8; 32], 1_700_000_000, "pod-a", &seed);
        assert!(cp.verify(&public));
        let back = Checkpoint::from_json(&cp.to_json()).unwrap();
        assert_eq!(back, cp);
        for tamper in [
            Checkpoint {
                size: 41,
                ..cp.clone()
            },
            Checkpoint {
                head_mac: [8u8; 32],
                ..cp.clone()
            },
            Checkpoint {
                chain_id: "other".into(),
                ..cp.clone()
            },
            Checkpoint {
                ts: 1,
                ..cp.clone()
            },
            Checkpoint {
                signer: "pod-b".into(),
                ..cp.clone()
            },
            Checkpoint {
                version: 1,
                ..cp.clone()
            },
        ] {
            assert!(!tamper.verify(&public));
        }
        let other = public_key(&Key32::generate());
        assert!(!cp.verify(&other));
    }

    /// A version-1 checkpoint (no signer; written by earlier builds) still verifies: signed here
    /// straight from the v1 note format, not through `Checkpoint::sign`.
    #[test]
    fn version_1_checkpoints_still_verify() {
        let seed = Key32::from_bytes([3u8; 32]);
        let key = SigningKey::from_bytes(seed.expose());
        let head = [5u8; 32];
        let note = format!(
            "aegis.checkpoint.v1\nmain\n7\n{}\n1700000000\n",
            hex::encode(head)
        );
        let b64 = base64::engine::general_purpose::STANDARD;
        let json = serde_json::json!({
            "version": 1,
            "chain_id": "main",
            "size": 7,
            "head_mac": hex::encode(head),
            "ts": 1_700_000_000,
            "public_key": b64.encode(key.verifying_key().to_bytes()),
            "signature": b64.encode(key.sign(note.as_bytes()).to_bytes()),
        });
        let cp = Checkpoint::from_json(&json.to_string()).unwrap();
        assert_eq!((cp.version, cp.signer.as_str()), (1, ""));
        assert!(cp.verify(&public_key(&seed)));
        // A v2 file must name its signer, a v1 file must not.
        let mut v2 = json.clone();
        v2["version"] = 2.into();
        assert!(Checkpoint::from_json(&v2.to_string()).is_err());
        let mut v1_signer = json;
        v1_signer["signer"] = "pod-a".into();
        assert!(Checkpoint::from_json(&v1_signer.to_string()).is_err());
    }
}
