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
//! - [`authz`]: the Check pipeline (identify → route → policy → token → audit → respond) and the
//!   stable deny reasons; knows no tonic types.
//! - [`grpc`]: the tonic edge, `CheckRequest` → pipeline → `CheckResponse`.
//! - [`identity`]: JWT validation, OIDC discovery, JWKS cache.
//! - [`broker`]: per-user Databricks tokens: token sources, L1/L2 cache, Redis link.
//! - [`audit`]: canonical record, HMAC chain, group-commit writer, verifier, and the
//!   transparency log over the chain (RFC 6962 tree as C2SP tiles, signed-note checkpoints,
//!   witness cosigning, receipts).
//! - [`policy`]: route → workspace, path rules, agent allowlist.
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics`.
//! - [`pg`]: PostgreSQL connections (verified TLS, URL validation, safe error text), shared by
//!   the ledger, the U2M grant store, the blocklist and config.
//! - [`ledger`]: the transparency log served read-only (`/checkpoint`, `/tile/...`).
//! - [`reload`]: config reload on SIGHUP or a file change (issuers, policy, the HMAC key).
//! - [`public`]: the public listener where users consent to U2M (`/oauth/start`, `/oauth/callback`).
//! - [`server`]: wires it all together for `aegis serve`; [`cli`]: the other subcommands.
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
pub mod ledger;
pub mod logging;
pub mod pg;
pub mod policy;
pub mod public;
pub mod reload;
pub mod secret;
pub mod server;
