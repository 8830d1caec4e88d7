//! The admin HTTP listener: `/healthz`, `/readyz`, `/metrics` and the operator console
//! (`/console`, see [`console`]).
//!
//! Served on its own port (loopback by default) so that probes, scrapes and operators never
//! share a listener with agent traffic.

pub mod console;
pub mod live;
pub mod oidc;
pub mod session;

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;

/// What readiness depends on, as seen right now.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReadyStatus {
    pub ready: bool,
    pub config: bool,
    pub jwks: bool,
    pub audit_chain_head: bool,
    /// The agent blocklist has been read from Redis once.
    pub agent_blocklist: bool,
    /// Reported, not gated on: while Redis is down every Check is denied anyway.
    pub redis: bool,
}

/// Something that can say whether the service is ready.
pub trait Readiness: Send + Sync + 'static {
    fn status(&self) -> ReadyStatus;
}

#[derive(Clone)]
pub struct AdminState {
    pub readiness: Arc<dyn Readiness>,
    pub metrics: Option<PrometheusHandle>,
    /// `None` when no console sign-in is configured: `/console` then says it is disabled.
    pub console: console::ConsoleState,
}

pub fn app(state: AdminState) -> Router {
    let console = console::routes().with_state(state.console.clone());
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
        .merge(console)
}

async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, "ok\n")
}

async fn readyz(State(state): State<AdminState>) -> Response {
    let status = state.readiness.status();
    let code = if status.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(status)).into_response()
}

async fn metrics(State(state): State<AdminState>) -> Response {
    match &state.metrics {
        Some(handle) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "metrics are not enabled\n").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    struct Fixed(bool);
    impl Readiness for Fixed {
        fn status(&self) -> ReadyStatus {
            ReadyStatus {
                ready: self.0,
                config: true,
                jwks: self.0,
                audit_chain_head: true,
                agent_blocklist: true,
                redis: true,
            }
        }
    }

    #[tokio::test]
    async fn readyz_follows_readiness() {
        for (ready, code) in [
            (false, StatusCode::SERVICE_UNAVAILABLE),
            (true, StatusCode::OK),
        ] {
            let app = app(AdminState {
                readiness: Arc::new(Fixed(ready)),
                metrics: None,
                console: None,
            });
            let resp = app
                .oneshot(Request::get("/readyz").body(Body::empty()).unwrap())
                .await
                .unwrap();
            assert_eq!(resp.status(), code);
        }
    }
}
