//! The transparency log served read-only over HTTP (C2SP `tlog-tiles`), on `audit.tlog_listen`:
//!
//! - `GET /checkpoint`: the newest signed checkpoint note, with the witnesses' cosignatures;
//! - `GET /tile/<L>/<N>[.p/<W>]`: tree tiles;
//! - `GET /tile/entries/<N>[.p/<W>]`: entry bundles, the canonical audit records.
//!
//! Anyone who can reach the listener can check the log with the log's public key alone: no
//! database credentials, no HMAC key. The entries are the decision records themselves (user
//! names, agents, paths; never a token), so the operator chooses who reaches this listener.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::sync::Mutex;

use crate::audit::{tiles, tlog};
use crate::pg::PgTarget;

struct LogState {
    target: PgTarget,
    chain_id: String,
    /// One reused connection; reconnected when it closes.
    client: Mutex<Option<tokio_postgres::Client>>,
}

impl LogState {
    async fn client(
        &self,
    ) -> Result<tokio::sync::MutexGuard<'_, Option<tokio_postgres::Client>>, Response> {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(|c| c.is_closed()) {
            match self
                .target
                .connect(Duration::from_secs(2), "aegis-tlog")
                .await
            {
                Ok(c) => *guard = Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "transparency log: store unavailable");
                    return Err(unavailable());
                }
            }
        }
        Ok(guard)
    }
}

fn unavailable() -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n").into_response()
}

fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "not found\n").into_response()
}

/// The router (also used by tests in-process).
pub fn app(target: PgTarget, chain_id: String) -> Router {
    let state = Arc::new(LogState {
        target,
        chain_id,
        client: Mutex::new(None),
    });
    Router::new()
        .route("/checkpoint", get(checkpoint))
        .route("/tile/{*rest}", get(tile))
        .with_state(state)
}

async fn checkpoint(State(s): State<Arc<LogState>>) -> Response {
    let guard = match s.client().await {
        Ok(g) => g,
        Err(r) => return r,
    };
    let Some(client) = guard.as_ref() else {
        return unavailable();
    };
    match tiles::latest_note(client, &s.chain_id).await {
        Ok(Some((_, note))) => (
            [
                (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
                (header::CACHE_CONTROL, "no-cache, max-age=2"),
            ],
            note,
        )
            .into_response(),
        Ok(None) => not_found(),
        Err(e) => {
            tracing::warn!(error = %crate::pg::error_text(&e), "transparency log: checkpoint read failed");
            unavailable()
        }
    }
}

async fn tile(State(s): State<Arc<LogState>>, Path(rest): Path<String>) -> Response {
    let Some((level, index, width)) = tlog::parse_tile_path(&rest) else {
        return not_found();
    };
    let width = width.unwrap_or(tlog::TILE_WIDTH);
    let guard = match s.client().await {
        Ok(g) => g,
        Err(r) => return r,
    };
    let Some(client) = guard.as_ref() else {
        return unavailable();
    };
    let found = match level {
        Some(l) => tiles::tile_bytes(client, &s.chain_id, l, index, width)
            .await
            .map_err(|e| crate::pg::error_text(&e)),
        None => tiles::entry_bundle(client, &s.chain_id, index, width).await,
    };
    match found {
        Ok(Some(bytes)) => (
            [
                (header::CONTENT_TYPE, "application/octet-stream"),
                (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
            ],
            bytes,
        )
            .into_response(),
        Ok(None) => not_found(),
        Err(e) => {
            tracing::warn!(error = %e, "transparency log: tile read failed");
            unavailable()
        }
    }
}

/// Binds `addr` and serves the log until `stop` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    target: PgTarget,
    chain_id: String,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    axum::serve(listener, app(target, chain_id))
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await
}
