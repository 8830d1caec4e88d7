//! `aegis serve`: wires the pipeline to its dependencies and runs the gRPC and admin listeners.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::ext_authz::v3::pb::AuthorizationServer;
use tonic_health::ServingStatus;

use crate::admin::console::Console;
use crate::admin::live::{self, LiveOps};
use crate::admin::{self, AdminState, Readiness, ReadyStatus};
use crate::audit::checkpoint::{Checkpointer, DirSink};
use crate::audit::{AuditChain, WriterOptions};
use crate::authz::Pipeline;
use crate::broker::redis::{RedisLink, Sealer};
use crate::broker::Broker;
use crate::config::{Config, ListenAddr};
use crate::grpc::AuthzService;
use crate::identity::Validator;
use crate::pg::PgTarget;
use crate::policy::blocklist::BlockStore;
use crate::policy::{AgentBlocklist, Policy};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("postgres.url: {0}")]
    Postgres(String),
    #[error("invalid redis url: {0}")]
    Redis(String),
    #[error("cannot build the HTTP client: {0}")]
    Http(String),
    #[error("server failed: {0}")]
    Serve(String),
    #[error("server.grpc_tls: {0}")]
    Tls(String),
}

/// The live components readiness is computed from.
struct Components {
    validator: Arc<Validator>,
    audit: Arc<AuditChain>,
    redis: Arc<RedisLink>,
    /// The operators' agent blocklist; a replica is ready once it has been read (the pipeline
    /// also denies whenever the latest read failed).
    blocklist: Arc<AgentBlocklist>,
    /// The flag the pipeline reads; `/readyz` reports it, so a 200 there means Checks run.
    ready: Arc<AtomicBool>,
}

impl Components {
    fn conditions_met(&self) -> bool {
        self.validator.all_loaded()
            && self.audit.head_loaded()
            && self.blocklist.ever_loaded()
            && self.redis.was_healthy()
    }
}

impl Readiness for Components {
    fn status(&self) -> ReadyStatus {
        let jwks = self.validator.all_loaded();
        let head = self.audit.head_loaded();
        ReadyStatus {
            ready: self.ready.load(Ordering::Acquire),
            config: true,
            jwks,
            audit_chain_head: head,
            agent_blocklist: self.blocklist.ever_loaded(),
            redis: self.redis.healthy(),
        }
    }
}

/// Runs until `shutdown` resolves.
pub async fn run(
    cfg: Config,
    config_path: Option<std::path::PathBuf>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Suffix("_seconds".to_string()),
            &[
                0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5,
            ],
        )
        .ok()
        .and_then(|b| b.install_recorder().ok());
    export_alert_baselines(&cfg);

    for w in cfg.warnings() {
        tracing::warn!("config: {w}");
    }

    // Outbound calls must finish well inside the Check deadline.
    let outbound_timeout = cfg.server.check_timeout.mul_f32(0.7);
    let http =
        crate::http::client(outbound_timeout).map_err(|e| ServeError::Http(e.to_string()))?;

    let validator = Arc::new(Validator::new(&cfg.issuers, http.clone()));
    tokio::spawn(keep_keys_fresh(validator.clone()));

    let redis = RedisLink::from_config(&cfg.redis)
        .map_err(|e| ServeError::Redis(format!("{:?}", e.kind())))?;
    tokio::spawn(redis.clone().monitor());

    let broker = Arc::new(
        Broker::new(
            redis.clone(),
            Sealer::new(&cfg.redis.cache_key),
            http.clone(),
        )
        .with_mint_timeout(outbound_timeout),
    );
    tokio::spawn(broker.clone().follow_revocations());
    let target = PgTarget::parse(&cfg.postgres.url).map_err(ServeError::Postgres)?;
    // Agents blocked from the console: durable in Postgres, fanned out through Redis.
    let blocks = Arc::new(BlockStore::new(target.clone()));
    let audit = AuditChain::start(
        target.clone(),
        cfg.audit.chain_id.clone(),
        cfg.audit.key_id.clone(),
        cfg.audit.hmac_key.clone(),
        cfg.server.instance_id.clone(),
        WriterOptions {
            migrate_on_start: cfg.postgres.migrate_on_start,
            max_clock_skew: cfg.audit.max_clock_skew,
            min_synchronous_commit: cfg.postgres.min_synchronous_commit,
            ..WriterOptions::default()
        },
    );
    let checkpointer = Arc::new(Checkpointer::new(
        target,
        cfg.audit.chain_id.clone(),
        cfg.audit.keys(),
        cfg.audit.checkpoint_signing_key.clone(),
        Arc::new(DirSink::new(
            &cfg.audit.checkpoint_dir,
            &cfg.server.instance_id,
        )),
        &cfg.server.instance_id,
        crate::audit::checkpoint::TlogSettings {
            origin: cfg.audit.tlog_origin.clone(),
            witnesses: cfg.audit.witnesses.clone(),
            quorum: cfg.audit.witness_quorum,
            witness_timeout: cfg.audit.witness_timeout,
            http: http.clone(),
        },
    ));

    // The in-memory copy the pipeline reads: re-read every 500 ms and on every change event.
    let blocklist = Arc::new(AgentBlocklist::unloaded());
    tokio::spawn(blocklist.clone().keep_fresh(blocks.clone(), redis.clone()));

    let ready = Arc::new(AtomicBool::new(false));
    // U2M: refresh tokens in Postgres, consent links in `consent_required` denies.
    let u2m = crate::public::u2m_source(&cfg, &http, &redis).map_err(ServeError::Postgres)?;
    if let Some(u) = &u2m {
        broker.set_u2m(u.clone());
    }
    let pipeline = Arc::new(
        Pipeline::new(
            validator.clone(),
            broker.clone(),
            audit.clone(),
            Arc::new(Policy::new(&cfg)),
            ready.clone(),
            cfg.server.check_timeout,
        )
        .with_blocklist(blocklist.clone())
        .with_consent_links(u2m.clone().map(|u| u as Arc<dyn crate::authz::ConsentLink>)),
    );

    let components = Arc::new(Components {
        validator: validator.clone(),
        audit: audit.clone(),
        redis: redis.clone(),
        blocklist: blocklist.clone(),
        ready: ready.clone(),
    });

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    health
        .set_service_status(
            "envoy.service.auth.v3.Authorization",
            ServingStatus::NotServing,
        )
        .await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(
        checkpointer
            .clone()
            .run(cfg.audit.checkpoint_interval, stop_rx.clone()),
    );
    tokio::spawn(track_readiness(
        components.clone(),
        ready.clone(),
        health.clone(),
        stop_rx.clone(),
    ));

    // Config reload (SIGHUP, or the file changing): issuers, policy, the HMAC key.
    let console_keys = Arc::new(std::sync::RwLock::new(cfg.audit.keys()));
    if let Some(path) = config_path {
        let reloader = Arc::new(crate::reload::Reloader::new(
            path,
            cfg.clone(),
            pipeline.policy_cell(),
            validator.clone(),
            audit.clone(),
            checkpointer.clone(),
            console_keys.clone(),
        ));
        metrics::gauge!("aegis_config_last_reload_ok").set(1.0);
        for result in ["ok", "error"] {
            metrics::counter!("aegis_config_reloads_total", "result" => result).increment(0);
        }
        tokio::spawn(reloader.run(stop_rx.clone()));
    }

    // --- admin listener (and the console's dependency monitor, which feeds /metrics too) ---
    let console_pg = PgTarget::parse(&cfg.postgres.url).map_err(ServeError::Postgres)?;
    let last_cp = checkpointer.clone();
    let last_tree = checkpointer.clone();
    let ops = LiveOps::new(
        &cfg,
        live::Parts {
            audit: audit.clone(),
            broker: broker.clone(),
            validator: validator.clone(),
            redis: redis.clone(),
            blocklist: blocklist.clone(),
            blocks: blocks.clone(),
            readiness: components.clone(),
            http: http.clone(),
            keys: console_keys.clone(),
            checkpoint_dir: cfg.audit.checkpoint_dir.clone(),
            checkpoint_public_key: crate::audit::checkpoint::public_key(
                &cfg.audit.checkpoint_signing_key,
            ),
            pg_connect: Arc::new(move || {
                let target = console_pg.clone();
                Box::pin(async move {
                    target
                        .connect(Duration::from_secs(2), "aegis-console")
                        .await
                })
            }),
            last_checkpoint: Arc::new(move || last_cp.last().map(|c| (c.size, c.ts))),
            last_tree: Arc::new(move || last_tree.last_tree()),
            tlog_vkey: checkpointer.vkey(),
        },
    );
    tokio::spawn(ops.clone().monitor(stop_rx.clone()));
    let admin_app = admin::app(AdminState {
        readiness: components.clone(),
        metrics,
        console: Console::new(
            cfg.admin.console_token.clone(),
            cfg.admin
                .oidc
                .clone()
                .map(|o| crate::admin::oidc::OidcSignIn::new(o, validator.clone(), http.clone())),
            ops,
        )
        .map(Arc::new),
    });
    let admin_listener = tokio::net::TcpListener::bind(cfg.server.admin_listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: cfg.server.admin_listen.to_string(),
            source,
        })?;
    let mut admin_stop = stop_rx.clone();
    let admin_task = tokio::spawn(async move {
        axum::serve(admin_listener, admin_app)
            .with_graceful_shutdown(async move {
                let _ = admin_stop.wait_for(|s| *s).await;
            })
            .await
    });

    // --- public listener (U2M consent) ---
    let _public_task = crate::public::spawn(&cfg, u2m, stop_rx.clone())
        .await
        .map_err(|(addr, source)| ServeError::Listen { addr, source })?;

    // --- transparency log (read-only, public data) ---
    let _tlog_task = match cfg.audit.tlog_listen {
        Some(addr) => Some(
            crate::ledger::spawn(
                addr,
                PgTarget::parse(&cfg.postgres.url).map_err(ServeError::Postgres)?,
                cfg.audit.chain_id.clone(),
                stop_rx.clone(),
            )
            .await
            .map_err(|(addr, source)| ServeError::Listen { addr, source })?,
        ),
        None => None,
    };

    // --- gRPC listener ---
    let authz = AuthorizationServer::new(AuthzService::new(pipeline.clone()))
        .max_decoding_message_size(1024 * 1024);
    let mut builder = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(30)));
    if let Some(tls) = &cfg.server.grpc_tls {
        // mTLS: only a client with a certificate from the configured CA (Envoy) may ask.
        let identity =
            tonic::transport::Identity::from_pem(&tls.cert_pem, tls.key_pem.expose().as_bytes());
        builder = builder
            .tls_config(
                tonic::transport::ServerTlsConfig::new()
                    .identity(identity)
                    .client_ca_root(tonic::transport::Certificate::from_pem(&tls.client_ca_pem)),
            )
            .map_err(|e| ServeError::Tls(e.to_string()))?;
    }
    let router = builder.add_service(health_service).add_service(authz);
    let mut grpc_stop = stop_rx.clone();
    let grpc_signal = async move {
        let _ = grpc_stop.wait_for(|s| *s).await;
    };
    let grpc_task = match &cfg.server.grpc_listen {
        ListenAddr::Tcp(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Listen {
                    addr: addr.to_string(),
                    source,
                })?;
            tracing::info!(grpc = %addr, admin = %cfg.server.admin_listen, "aegis listening");
            // `serve_with_incoming` ignores the builder's `tcp_nodelay`: without it on each
            // accepted socket, Nagle holds small response frames until the peer's delayed ACK
            // (tens of ms per Check under load; see BENCHMARKS.md).
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, grpc_signal))
        }
        ListenAddr::Unix(path) => {
            let _ = std::fs::remove_file(path);
            let listener =
                tokio::net::UnixListener::bind(path).map_err(|source| ServeError::Listen {
                    addr: format!("unix:{}", path.display()),
                    source,
                })?;
            tracing::info!(grpc = %format!("unix:{}", path.display()), admin = %cfg.server.admin_listen, "aegis listening");
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, grpc_signal))
        }
    };

    shutdown.await;
    tracing::info!("shutting down: no longer serving");
    ready.store(false, Ordering::Release);
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    health
        .set_service_status(
            "envoy.service.auth.v3.Authorization",
            ServingStatus::NotServing,
        )
        .await;
    let _ = stop_tx.send(true);
    let grpc_result = tokio::time::timeout(Duration::from_secs(10), grpc_task).await;
    // In-flight checks are done: commit what they queued, then pin the final head.
    if tokio::time::timeout(Duration::from_secs(5), audit.flush())
        .await
        .is_err()
    {
        tracing::warn!("audit queue did not flush within 5s");
    }
    match tokio::time::timeout(Duration::from_secs(10), checkpointer.run_once()).await {
        Ok(Ok(Some(cp))) => tracing::info!(size = cp.size, "final checkpoint written"),
        Ok(Ok(None)) => tracing::info!("final checkpoint: head unchanged"),
        Ok(Err(e)) => tracing::error!(error = %e, "final checkpoint not written"),
        Err(_) => tracing::error!("final checkpoint timed out"),
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), admin_task).await;
    if let ListenAddr::Unix(path) = &cfg.server.grpc_listen {
        let _ = std::fs::remove_file(path);
    }
    match grpc_result {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(e))) => Err(ServeError::Serve(e.to_string())),
        Ok(Err(e)) => Err(ServeError::Serve(e.to_string())),
        Err(_) => Err(ServeError::Serve(
            "in-flight checks did not drain within 10s".into(),
        )),
    }
}

/// What deploy/observability/aegis-alerts.yml reads before anything has happened: the
/// checkpoint interval (the checkpoint-age alert compares the age with it), and the counters
/// the alerts take `increase()` of, at zero. A counter first exported at 1 shows Prometheus no
/// increase, so without these the first fail-closed deny, commit failure or tampered verify
/// after a start would not alert.
fn export_alert_baselines(cfg: &Config) {
    metrics::gauge!("aegis_checkpoint_interval_seconds")
        .set(cfg.audit.checkpoint_interval.as_secs_f64());
    let fail_closed = crate::authz::Reason::DependencyUnavailable.code();
    metrics::counter!("aegis_checks_total", "decision" => "deny", "reason" => fail_closed)
        .increment(0);
    metrics::counter!("aegis_audit_commit_failures_total").increment(0);
    for kind in ["inconsistent", "unavailable"] {
        metrics::counter!("aegis_checkpoint_failures_total", "kind" => kind).increment(0);
    }
    for result in ["intact", "tampered"] {
        metrics::counter!("aegis_console_verify_total", "result" => result).increment(0);
    }
    for ws in &cfg.workspaces {
        for outcome in ["ok", "rejected", "rate_limited", "error"] {
            let source = ws.token_source.as_str();
            metrics::counter!("aegis_mints_total", "source" => source, "outcome" => outcome)
                .increment(0);
        }
    }
    for w in &cfg.audit.witnesses {
        metrics::counter!("aegis_witness_failures_total", "witness" => w.vkey.name.clone())
            .increment(0);
    }
}

/// Loads every issuer's keys until all are loaded, then refreshes them every
/// [`Validator::refresh_interval`] (at most five minutes).
async fn keep_keys_fresh(validator: Arc<Validator>) {
    loop {
        let failed = validator.load_all().await;
        for (issuer, error) in &failed {
            tracing::warn!(issuer = %issuer, error = %error, "could not load the issuer's signing keys");
        }
        // A failed refresh is retried soon, so keys past their max_key_age come back as soon as
        // the IdP does.
        let wait = if !validator.all_loaded() {
            Duration::from_secs(1)
        } else if failed.is_empty() {
            validator.refresh_interval()
        } else {
            validator.refresh_interval().min(Duration::from_secs(5))
        };
        tokio::time::sleep(wait).await;
    }
}

/// Keeps the pipeline's ready flag and gRPC health in step with the components.
async fn track_readiness(
    components: Arc<Components>,
    ready: Arc<AtomicBool>,
    health: tonic_health::server::HealthReporter,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut last = None;
    loop {
        if *stop.borrow() {
            return;
        }
        let now = components.conditions_met();
        if last != Some(now) {
            ready.store(now, Ordering::Release);
            let status = if now {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            health.set_service_status("", status).await;
            health
                .set_service_status("envoy.service.auth.v3.Authorization", status)
                .await;
            tracing::info!(ready = now, "readiness changed");
            last = Some(now);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = stop.changed() => {}
        }
    }
}
