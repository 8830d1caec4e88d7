//! The audit tables and their append-only guard.

use tokio_postgres::Client;

use super::record::GENESIS_MAC;

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("postgres: {0}")]
    Pg(#[from] tokio_postgres::Error),
    #[error("{0}")]
    Inconsistent(String),
}

/// Migration statements, run in one transaction under an advisory lock so replicas starting
/// together do not race.
const MIGRATION: &str = r#"
CREATE TABLE IF NOT EXISTS aegis_audit (
    chain_id     text        NOT NULL,
    seq          bigint      NOT NULL CHECK (seq > 0),
    ts           timestamptz NOT NULL,
    trace_id     text        NOT NULL,
    request_id   text        NOT NULL,
    decision     text        NOT NULL CHECK (decision IN ('ALLOW', 'DENY', 'ADMIN')),
    reason       text        NOT NULL,
    issuer       text        NOT NULL,
    subject      text        NOT NULL,
    user_name    text        NOT NULL,
    agent        text        NOT NULL,
    workspace    text        NOT NULL,
    method       text        NOT NULL,
    path         text        NOT NULL,
    token_source text        NOT NULL,
    token_fp     bytea       NOT NULL,
    key_id       text        NOT NULL,
    instance_id  text        NOT NULL,
    version      integer     NOT NULL,
    prev_mac     bytea       NOT NULL,
    mac          bytea       NOT NULL,
    actor_chain  text        NOT NULL DEFAULT '',
    PRIMARY KEY (chain_id, seq)
);
CREATE INDEX IF NOT EXISTS aegis_audit_trace_id ON aegis_audit (trace_id);
-- Version 3: what the agent guardrails saw (record fields 22 to 24; empty on older rows, which
-- therefore keep their MACs).
ALTER TABLE aegis_audit ADD COLUMN IF NOT EXISTS statement_kind text NOT NULL DEFAULT '';
ALTER TABLE aegis_audit ADD COLUMN IF NOT EXISTS statement_fp bytea NOT NULL DEFAULT ''::bytea;
ALTER TABLE aegis_audit ADD COLUMN IF NOT EXISTS mcp_tool text NOT NULL DEFAULT '';
-- Version 5: the SQL text itself (record field 25), only when audit.record_statement_text is on.
ALTER TABLE aegis_audit ADD COLUMN IF NOT EXISTS statement_text text NOT NULL DEFAULT '';
CREATE TABLE IF NOT EXISTS aegis_chain_head (
    chain_id   text        PRIMARY KEY,
    size       bigint      NOT NULL,
    head_mac   bytea       NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS aegis_schema_version (
    version    integer     PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);
CREATE OR REPLACE FUNCTION aegis_audit_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    RAISE EXCEPTION 'aegis_audit is append-only: % refused', TG_OP;
END
$fn$;
DROP TRIGGER IF EXISTS aegis_audit_no_update_delete ON aegis_audit;
CREATE TRIGGER aegis_audit_no_update_delete BEFORE UPDATE OR DELETE ON aegis_audit
    FOR EACH ROW EXECUTE FUNCTION aegis_audit_refuse_change();
DROP TRIGGER IF EXISTS aegis_audit_no_truncate ON aegis_audit;
CREATE TRIGGER aegis_audit_no_truncate BEFORE TRUNCATE ON aegis_audit
    FOR EACH STATEMENT EXECUTE FUNCTION aegis_audit_refuse_change();
-- Version 3: U2M grants belong to a verified principal (workspace, issuer, subject). The
-- version-2 rows were keyed by user name alone and cannot be bound to a principal, so they
-- are dropped, never served: those users consent once more.
DROP TABLE IF EXISTS aegis_u2m_tokens;
CREATE TABLE IF NOT EXISTS aegis_u2m_grants (
    workspace        text        NOT NULL,
    issuer           text        NOT NULL,
    subject          text        NOT NULL,
    user_name        text        NOT NULL,
    sealed           bytea       NOT NULL,
    key_id           text        NOT NULL,
    access_discarded boolean     NOT NULL DEFAULT false,
    generation       bigint      NOT NULL DEFAULT 1,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace, issuer, subject)
);
CREATE INDEX IF NOT EXISTS aegis_u2m_grants_by_name ON aegis_u2m_grants (workspace, user_name);
-- Version 3 too: agent blocks are durable (Redis only fans changes out).
CREATE TABLE IF NOT EXISTS aegis_agent_blocks (
    agent      text        PRIMARY KEY,
    blocked_by text        NOT NULL,
    blocked_at timestamptz NOT NULL DEFAULT now()
);
-- Version 4: the transparency log over the chain (src/audit/tlog.rs). Tiles hold the RFC 6962
-- tree as C2SP tlog-tiles; the writer extends them in the statement that appends the rows, and
-- tree_size follows the head in that same statement. A tile only ever grows: the trigger
-- refuses an update that is not an extension of what is stored, and no tile is deleted.
ALTER TABLE aegis_chain_head ADD COLUMN IF NOT EXISTS tree_size bigint NOT NULL DEFAULT 0;
-- A tile is stored as strips of up to 16 hashes (512 bytes, kept inline: a batch rewrites one
-- small strip, not a whole 8 KiB tile); tile (level, idx) is its strips in order.
CREATE TABLE IF NOT EXISTS aegis_tlog_tiles (
    chain_id text     NOT NULL,
    level    smallint NOT NULL CHECK (level BETWEEN 0 AND 63),
    idx      bigint   NOT NULL CHECK (idx >= 0),
    strip    smallint NOT NULL CHECK (strip BETWEEN 0 AND 15),
    hashes   bytea    NOT NULL CHECK (length(hashes) % 32 = 0 AND length(hashes) BETWEEN 32 AND 512),
    PRIMARY KEY (chain_id, level, idx, strip)
);
CREATE OR REPLACE FUNCTION aegis_tlog_tile_grows() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF NEW.chain_id <> OLD.chain_id OR NEW.level <> OLD.level OR NEW.idx <> OLD.idx
       OR NEW.strip <> OLD.strip OR length(NEW.hashes) < length(OLD.hashes)
       OR substring(NEW.hashes FROM 1 FOR length(OLD.hashes)) <> OLD.hashes THEN
        RAISE EXCEPTION 'aegis_tlog_tiles only grow: tile %/% strip % refused', OLD.level, OLD.idx, OLD.strip;
    END IF;
    RETURN NEW;
END
$fn$;
DROP TRIGGER IF EXISTS aegis_tlog_tiles_grow ON aegis_tlog_tiles;
CREATE TRIGGER aegis_tlog_tiles_grow BEFORE UPDATE ON aegis_tlog_tiles
    FOR EACH ROW EXECUTE FUNCTION aegis_tlog_tile_grows();
DROP TRIGGER IF EXISTS aegis_tlog_tiles_no_delete ON aegis_tlog_tiles;
CREATE TRIGGER aegis_tlog_tiles_no_delete BEFORE DELETE ON aegis_tlog_tiles
    FOR EACH ROW EXECUTE FUNCTION aegis_audit_refuse_change();
DROP TRIGGER IF EXISTS aegis_tlog_tiles_no_truncate ON aegis_tlog_tiles;
CREATE TRIGGER aegis_tlog_tiles_no_truncate BEFORE TRUNCATE ON aegis_tlog_tiles
    FOR EACH STATEMENT EXECUTE FUNCTION aegis_audit_refuse_change();
-- Signed checkpoint notes (the newest is served at /checkpoint), with the witnesses' cosignatures
-- added as they come, and the size each witness last cosigned for this log.
CREATE TABLE IF NOT EXISTS aegis_tlog_checkpoints (
    chain_id  text        NOT NULL,
    size      bigint      NOT NULL CHECK (size > 0),
    root      bytea       NOT NULL,
    note      text        NOT NULL,
    cosigners integer     NOT NULL DEFAULT 0,
    signed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (chain_id, size)
);
CREATE TABLE IF NOT EXISTS aegis_tlog_witnesses (
    chain_id   text        NOT NULL,
    witness    text        NOT NULL,
    size       bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (chain_id, witness)
);
INSERT INTO aegis_schema_version (version) VALUES (1), (2), (3), (4), (5) ON CONFLICT DO NOTHING;
"#;

/// The schema version this build writes.
/// (2 added `aegis_u2m_tokens`, the sealed U2M refresh tokens; 3 replaced it with
/// `aegis_u2m_grants`, one per verified principal, and added `aegis_agent_blocks`; 4 added the
/// transparency log: `aegis_tlog_tiles`, `aegis_tlog_checkpoints`, `aegis_tlog_witnesses` and
/// `aegis_chain_head.tree_size`; 5 added `aegis_audit.statement_text`, record field 25.)
pub const SCHEMA_VERSION: i32 = 5;

/// The installed schema version, `None` when aegis' tables are absent.
pub async fn installed_version(client: &Client) -> Result<Option<i32>, SchemaError> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('aegis_schema_version') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    if !exists {
        return Ok(None);
    }
    let row = client
        .query_opt("SELECT max(version) FROM aegis_schema_version", &[])
        .await?;
    Ok(row.and_then(|r| r.get::<_, Option<i32>>(0)))
}

/// Makes sure the schema is current: migrates when allowed, else explains what to run.
pub async fn ensure(client: &Client, migrate_allowed: bool) -> Result<(), SchemaError> {
    match installed_version(client).await? {
        Some(v) if v == SCHEMA_VERSION => Ok(()),
        Some(v) if v > SCHEMA_VERSION => Err(SchemaError::Inconsistent(format!(
            "the audit schema is version {v}, newer than this build ({SCHEMA_VERSION})"
        ))),
        _ if migrate_allowed => migrate(client).await,
        _ => Err(SchemaError::Inconsistent(
            "the audit schema is missing or outdated; run `aegis migrate` with an owner role"
                .into(),
        )),
    }
}

/// Lets `role` serve: append to the chain, move its head and keep U2M grants, nothing else.
pub async fn grant_service_role(client: &Client, role: &str) -> Result<(), SchemaError> {
    let ok = !role.is_empty()
        && role.len() <= 63
        && role.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !ok {
        return Err(SchemaError::Inconsistent(format!(
            "role name {role:?} must be letters, digits and '_'"
        )));
    }
    client
        .batch_execute(&format!(
            "REVOKE ALL ON aegis_audit, aegis_chain_head, aegis_schema_version, aegis_u2m_grants, \
             aegis_agent_blocks, aegis_tlog_tiles, aegis_tlog_checkpoints, aegis_tlog_witnesses \
             FROM {role}; \
             GRANT SELECT, INSERT ON aegis_audit TO {role}; \
             GRANT SELECT, INSERT, UPDATE ON aegis_chain_head TO {role}; \
             GRANT SELECT ON aegis_schema_version TO {role}; \
             GRANT SELECT, INSERT, UPDATE, DELETE ON aegis_u2m_grants TO {role}; \
             GRANT SELECT, INSERT, DELETE ON aegis_agent_blocks TO {role}; \
             GRANT SELECT, INSERT, UPDATE ON aegis_tlog_tiles, aegis_tlog_checkpoints, \
             aegis_tlog_witnesses TO {role};"
        ))
        .await?;
    Ok(())
}

/// Creates or updates the schema. On error the session is left mid-transaction; callers drop
/// the connection.
pub async fn migrate(client: &Client) -> Result<(), SchemaError> {
    client
        .batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock(7346720011); {MIGRATION} COMMIT;"
        ))
        .await?;
    Ok(())
}

/// Ensures the chain's head row exists and agrees with the table's last row; returns the size.
pub async fn load_head(client: &Client, chain_id: &str) -> Result<u64, SchemaError> {
    client
        .execute(
            "INSERT INTO aegis_chain_head (chain_id, size, head_mac) VALUES ($1, 0, $2) \
             ON CONFLICT (chain_id) DO NOTHING",
            &[&chain_id, &GENESIS_MAC.as_slice()],
        )
        .await?;
    let head = client
        .query_one(
            "SELECT size, head_mac FROM aegis_chain_head WHERE chain_id = $1",
            &[&chain_id],
        )
        .await?;
    let size: i64 = head.get(0);
    let head_mac: Vec<u8> = head.get(1);
    let last = client
        .query_opt(
            "SELECT seq, mac FROM aegis_audit WHERE chain_id = $1 ORDER BY seq DESC LIMIT 1",
            &[&chain_id],
        )
        .await?;
    match last {
        None if size == 0 && head_mac == GENESIS_MAC => Ok(0),
        Some(row) => {
            let seq: i64 = row.get(0);
            let mac: Vec<u8> = row.get(1);
            if seq == size && mac == head_mac {
                Ok(size as u64)
            } else {
                Err(SchemaError::Inconsistent(format!(
                    "chain {chain_id}: head row says size {size} but the last row is seq {seq} \
                     with a different mac; run `aegis audit verify`"
                )))
            }
        }
        None => Err(SchemaError::Inconsistent(format!(
            "chain {chain_id}: head row says size {size} but the table holds no rows; \
             run `aegis audit verify`"
        ))),
    }
}
