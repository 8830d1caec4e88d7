//! aegis: the identity layer between AI agents and Databricks.
//!
//! Envoy calls aegis over the ext_authz v3 gRPC API on every agent request. aegis validates the
//! end user's IdP token, finds or mints *that user's own* Databricks token, records the decision
//! in an HMAC chain in Postgres, and only then lets Envoy forward the request with the user's
//! token in `authorization`. Databricks' own controls (Unity Catalog grants, row filters, column
//! masks, notebook ACLs, its audit log) then apply to the real user.
//!
//! # Layout
//!
//! - [`config`]: typed config, every error reported at once.
//! - [`authz`]: the Check pipeline (identify → route → policy → token → audit → respond), the
//!   stable deny reasons, and the ports the domain modules plug into ([`authz::ports`]: the
//!   trait impls and every error → reason mapping); knows no tonic types.
//! - [`grpc`]: the tonic edge, `CheckRequest` → pipeline → `CheckResponse`.
//! - [`identity`]: JWT validation, OIDC discovery, JWKS cache.
//! - [`broker`]: per-user Databricks tokens: token sources, L1/L2 cache, sealing at rest.
//! - [`audit`]: canonical record, HMAC chain, group-commit writer, verifier, checkpoints,
//!   witness cosigning and receipts.
//! - [`tlog`]: the transparency log's pure parts (RFC 6962 tree, C2SP tiles, signed notes).
//! - [`policy`]: route → workspace, path rules, agent allowlist and blocklist, SQL and MCP
//!   guardrails.
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics`, the operator console.
//! - [`pg`]: PostgreSQL connections (verified TLS, URL validation, safe error text), shared by
//!   the ledger, the U2M grant store, the blocklist and config.
//! - [`redis`]: the Redis link (topologies, health monitor, events channel), shared by the
//!   broker, the blocklist, the consent listener and the rate limits.
//! - [`ledger`]: the transparency log served read-only (`/checkpoint`, `/tile/...`).
//! - [`reload`]: config reload on SIGHUP or a file change (issuers, policy, the HMAC key).
//! - [`public`]: the public listener where users consent to U2M (`/oauth/start`, `/oauth/callback`).
//! - [`server`]: wires it all together for `aegis serve`; [`cli`]: the other subcommands.
//!
//! # The module graph is one-way
//!
//! A module uses only modules below it (checked by a test that reads every `crate::` path):
//!
//! ```text
//! cli → server → grpc, admin, public, ledger, reload → authz
//!     → broker → identity, audit, policy → redis, logging → config → pg, tlog → clock, secret, http
//! ```
//!
//! So no lower layer speaks the wire contract: identity, broker and audit report failures in
//! their own error types, and only `authz` turns them into deny reasons.
//!
//! # Invariants
//!
//! - Fail closed: every failure is an explicit DENIED CheckResponse with a reason code, never a
//!   gRPC error, and never an allow without a committed audit row.
//! - No token, key or secret is ever logged, audited or returned ([`secret`] types cannot print).

#![forbid(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod authz;
pub mod broker;
pub mod cli;
pub mod clock;
pub mod config;
pub mod grpc;
pub mod http;
pub mod identity;
#[cfg(test)]
mod layers;
pub mod ledger;
pub mod logging;
pub mod pg;
pub mod policy;
pub mod public;
pub mod redis;
pub mod reload;
pub mod secret;
pub mod server;
pub mod tlog;
