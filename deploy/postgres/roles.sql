-- PostgreSQL roles for aegis in production. Run as an administrator of the `aegis` database,
-- once. The schema (tables, the append-only trigger) is then created by
-- `aegis migrate --config aegis.toml --grant-to aegis_service`, connecting as aegis_owner through
-- `postgres.migrate_url`; its --grant-to applies the same grants as the last section below.
--
--   aegis_owner    owns the tables; used only to migrate, never by the running service
--   aegis_service  what `[postgres] url` names: appends audit rows and moves the chain head,
--                  nothing else (no UPDATE or DELETE on aegis_audit, no DDL)
--   aegis_auditor  read-only, for `aegis audit verify` / `aegis audit export`

-- === before the first start ===
CREATE ROLE aegis_owner NOLOGIN;
CREATE ROLE aegis_service LOGIN PASSWORD NULL;   -- set it with \password, or use IAM auth
CREATE ROLE aegis_auditor LOGIN PASSWORD NULL;

REVOKE ALL ON SCHEMA public FROM PUBLIC;
GRANT USAGE, CREATE ON SCHEMA public TO aegis_owner;
GRANT USAGE ON SCHEMA public TO aegis_service, aegis_auditor;

-- === after the first migration (the tables exist, owned by aegis_owner) ===
REVOKE ALL ON aegis_audit, aegis_chain_head, aegis_schema_version FROM aegis_service;
-- SELECT lets a starting replica compare the chain head with the last row.
GRANT SELECT, INSERT ON aegis_audit TO aegis_service;
GRANT SELECT, INSERT, UPDATE ON aegis_chain_head TO aegis_service;
GRANT SELECT ON aegis_schema_version TO aegis_service;

GRANT SELECT ON aegis_audit, aegis_chain_head, aegis_schema_version TO aegis_auditor;
