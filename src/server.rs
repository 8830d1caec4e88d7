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
use crate::broker::seal::Sealer;
use crate::broker::Broker;
use crate::config::{Config, ListenAddr};
use crate::grpc::AuthzService;
use crate::identity::Validator;
use crate::pg::PgTarget;
use crate::policy::blocklist::BlockStore;
use crate::policy::{AgentBlocklist, Policy};
use crate::redis::RedisLink;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
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

/// The gRPC listener: TCP, or a Unix socket (a sidecar sharing a pod with Envoy).
pub enum GrpcListener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener, std::path::PathBuf),
}

/// Every socket `aegis serve` listens on, bound before anything else is built, so an address
/// in use is reported before any connection to Redis or PostgreSQL is made, and tests can hand
/// in listeners bound to port 0.
pub struct Listeners {
    pub grpc: GrpcListener,
    pub admin: tokio::net::TcpListener,
    /// The consent listener, when configured and a workspace uses U2M.
    pub public: Option<tokio::net::TcpListener>,
    /// The transparency log, when `audit.tlog_listen` is set.
    pub tlog: Option<tokio::net::TcpListener>,
}

impl Listeners {
    /// Binds the configured addresses.
    pub async fn bind(cfg: &Config) -> Result<Listeners, ServeError> {
        async fn tcp(addr: std::net::SocketAddr) -> Result<tokio::net::TcpListener, ServeError> {
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Listen {
                    addr: addr.to_string(),
                    source,
                })
        }
        let grpc = match &cfg.server.grpc_listen {
            ListenAddr::Tcp(addr) => GrpcListener::Tcp(tcp(*addr).await?),
            ListenAddr::Unix(path) => {
                let _ = std::fs::remove_file(path);
                let listener =
                    tokio::net::UnixListener::bind(path).map_err(|source| ServeError::Listen {
                        addr: format!("unix:{}", path.display()),
                        source,
                    })?;
                GrpcListener::Unix(listener, path.clone())
            }
        };
        let admin = tcp(cfg.server.admin_listen).await?;
        let public = match cfg.server.public_listen {
            Some(addr) if crate::public::wanted(cfg) => Some(tcp(addr).await?),
            _ => None,
        };
        let tlog = match cfg.audit.tlog_listen {
            Some(addr) => Some(tcp(addr).await?),
            None => None,
        };
        Ok(Listeners {
            grpc,
            admin,
            public,
            tlog,
        })
    }
}

/// One background task of a running aegis, by name.
struct Task {
    name: &'static str,
    handle: tokio::task::JoinHandle<()>,
    /// Ends by itself once the stop signal is sent; the others run until aborted.
    stops: bool,
}

/// aegis built and bound, not yet serving Checks: [`App::serve`] starts the listeners.
pub struct App {
    cfg: Config,
    listeners: Listeners,
    stop_tx: tokio::sync::watch::Sender<bool>,
    tasks: Vec<Task>,
    ready: Arc<AtomicBool>,
    health: tonic_health::server::HealthReporter,
    health_service:
        tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>,
    pipeline: Arc<Pipeline<Arc<Validator>, Arc<Broker>, Arc<AuditChain>>>,
    audit: Arc<AuditChain>,
    checkpointer: Arc<Checkpointer>,
    admin_app: axum::Router,
    u2m: Option<Arc<crate::broker::u2m::U2m>>,
    /// The audit store, parsed once; the transparency log listener reads it too.
    pg: PgTarget,
}

/// Binds the configured listeners, builds aegis and serves until `shutdown` resolves.
pub async fn run(
    cfg: Config,
    config_path: Option<std::path::PathBuf>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let listeners = Listeners::bind(&cfg).await?;
    App::build(cfg, config_path, listeners)
        .await?
        .serve(shutdown)
        .await
}

impl App {
    /// Builds every component on already-bound listeners and starts the background work
    /// (key refresh, Redis monitor, revocations, blocklist, checkpoints, readiness, reload, the
    /// console's monitor). No Check is answered until [`App::serve`], and none is allowed
    /// until readiness says the dependencies are there.
    pub async fn build(
        cfg: Config,
        config_path: Option<std::path::PathBuf>,
        listeners: Listeners,
    ) -> Result<App, ServeError> {
        let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Suffix("_seconds".to_string()),
                &[
                    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    0.5, 1.0, 2.5,
                ],
            )
            .ok()
            .and_then(|b| b.install_recorder().ok());
        export_alert_baselines(&cfg);
        for w in cfg.warnings() {
            tracing::warn!("config: {w}");
        }
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut tasks = Vec::new();

        // Outbound calls must finish well inside the Check deadline.
        let outbound_timeout = cfg.server.check_timeout.mul_f32(0.7);
        let http =
            crate::http::client(outbound_timeout).map_err(|e| ServeError::Http(e.to_string()))?;
        let target = PgTarget::parse(&cfg.postgres.url).map_err(|message| {
            ServeError::Config(crate::config::ConfigError {
                path: "postgres.url".into(),
                message,
            })
        })?;

        let validator = Arc::new(Validator::new(&cfg.issuers, http.clone()));
        spawn_task(
            &mut tasks,
            "issuer keys",
            false,
            keep_keys_fresh(validator.clone()),
        );

        let redis = RedisLink::from_config(&cfg.redis)
            .map_err(|e| ServeError::Redis(format!("{:?}", e.kind())))?;
        spawn_task(&mut tasks, "redis monitor", false, redis.clone().monitor());

        // U2M: refresh tokens in Postgres, consent links in `consent_required` denies.
        let u2m = crate::public::u2m_source(&cfg, &http, &redis)?;
        let broker = Arc::new(
            Broker::new(
                redis.clone(),
                Sealer::new(&cfg.redis.cache_key),
                http.clone(),
            )
            .with_mint_timeout(outbound_timeout)
            .with_u2m(u2m.clone()),
        );
        spawn_task(
            &mut tasks,
            "revocations",
            false,
            broker.clone().follow_revocations(),
        );

        // Agents blocked from the console: durable in Postgres, fanned out through Redis; the
        // pipeline reads the in-memory copy, re-read every 500 ms and on every change event.
        let blocks = Arc::new(BlockStore::new(target.clone()));
        let blocklist = Arc::new(AgentBlocklist::unloaded());
        spawn_task(
            &mut tasks,
            "blocklist",
            false,
            blocklist.clone().keep_fresh(blocks.clone(), redis.clone()),
        );

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
            target.clone(),
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
        spawn_task(
            &mut tasks,
            "checkpoints",
            true,
            checkpointer
                .clone()
                .run(cfg.audit.checkpoint_interval, stop_rx.clone()),
        );

        let ready = Arc::new(AtomicBool::new(false));
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
        let health = tonic_health::server::HealthReporter::new();
        let health_service = tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(health.clone()),
        );
        set_serving(&ready, &health, false).await;
        spawn_task(
            &mut tasks,
            "readiness",
            true,
            track_readiness(
                components.clone(),
                ready.clone(),
                health.clone(),
                stop_rx.clone(),
            ),
        );

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
            spawn_task(
                &mut tasks,
                "config reload",
                true,
                reloader.run(stop_rx.clone()),
            );
        }

        // The console and its dependency monitor (which feeds /metrics too).
        let console_pg = target.clone();
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
        spawn_task(
            &mut tasks,
            "console monitor",
            true,
            ops.clone().monitor(stop_rx.clone()),
        );
        let admin_app = admin::app(AdminState {
            readiness: components.clone(),
            metrics,
            console: Console::new(
                cfg.admin.console_token.clone(),
                cfg.admin.oidc.clone().map(|o| {
                    crate::admin::oidc::OidcSignIn::new(o, validator.clone(), http.clone())
                }),
                ops,
            )
            .map(Arc::new),
        });

        Ok(App {
            cfg,
            listeners,
            stop_tx,
            tasks,
            ready,
            health,
            health_service,
            pipeline,
            audit,
            checkpointer,
            admin_app,
            u2m,
            pg: target,
        })
    }

    /// Serves on the bound listeners until `shutdown` resolves, then stops in order: not
    /// serving first, in-flight Checks drained, the audit queue committed, a final checkpoint
    /// over it, and the remaining tasks joined (or aborted after a deadline).
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let App {
            cfg,
            listeners,
            stop_tx,
            mut tasks,
            ready,
            health,
            health_service,
            pipeline,
            audit,
            checkpointer,
            admin_app,
            u2m,
            pg,
        } = self;
        let stop_rx = stop_tx.subscribe();
        let until_stop = |mut stop: tokio::sync::watch::Receiver<bool>| async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        let logged = |name: &'static str, r: std::io::Result<()>| {
            if let Err(e) = r {
                tracing::error!(listener = name, error = %e, "listener failed");
            }
        };

        let admin_stop = stop_rx.clone();
        let admin = listeners.admin;
        tasks.push(Task {
            name: "admin listener",
            handle: tokio::spawn(async move {
                let r = axum::serve(admin, admin_app)
                    .with_graceful_shutdown(until_stop(admin_stop))
                    .await;
                logged("admin", r);
            }),
            stops: true,
        });
        if let (Some(listener), Some(u2m)) = (listeners.public, u2m) {
            let (cfg, stop) = (cfg.clone(), stop_rx.clone());
            tasks.push(Task {
                name: "consent listener",
                handle: tokio::spawn(async move {
                    logged(
                        "public",
                        crate::public::serve(listener, &cfg, u2m, stop).await,
                    );
                }),
                stops: true,
            });
        }
        if let Some(listener) = listeners.tlog {
            let (chain, stop) = (cfg.audit.chain_id.clone(), stop_rx.clone());
            tasks.push(Task {
                name: "transparency log listener",
                handle: tokio::spawn(async move {
                    logged(
                        "tlog",
                        crate::ledger::serve(listener, pg, chain, stop).await,
                    );
                }),
                stops: true,
            });
        }

        let authz = AuthorizationServer::new(AuthzService::new(pipeline))
            .max_decoding_message_size(1024 * 1024);
        let mut builder = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(Duration::from_secs(30)));
        if let Some(tls) = &cfg.server.grpc_tls {
            // mTLS: only a client with a certificate from the configured CA (Envoy) may ask.
            let identity = tonic::transport::Identity::from_pem(
                &tls.cert_pem,
                tls.key_pem.expose().as_bytes(),
            );
            builder = builder
                .tls_config(
                    tonic::transport::ServerTlsConfig::new()
                        .identity(identity)
                        .client_ca_root(tonic::transport::Certificate::from_pem(
                            &tls.client_ca_pem,
                        )),
                )
                .map_err(|e| ServeError::Tls(e.to_string()))?;
        }
        let router = builder.add_service(health_service).add_service(authz);
        let grpc_signal = until_stop(stop_rx.clone());
        let (grpc_task, unix_path) = match listeners.grpc {
            GrpcListener::Tcp(listener) => {
                let addr = listener
                    .local_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                tracing::info!(grpc = %addr, admin = %cfg.server.admin_listen, "aegis listening");
                // `serve_with_incoming` ignores the builder's `tcp_nodelay`: without it on each
                // accepted socket, Nagle holds small response frames until the peer's delayed
                // ACK (tens of ms per Check under load; see BENCHMARKS.md).
                let incoming =
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
                (
                    tokio::spawn(router.serve_with_incoming_shutdown(incoming, grpc_signal)),
                    None,
                )
            }
            GrpcListener::Unix(listener, path) => {
                tracing::info!(grpc = %format!("unix:{}", path.display()), admin = %cfg.server.admin_listen, "aegis listening");
                let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
                (
                    tokio::spawn(router.serve_with_incoming_shutdown(incoming, grpc_signal)),
                    Some(path),
                )
            }
        };

        shutdown.await;
        tracing::info!("shutting down: no longer serving");
        set_serving(&ready, &health, false).await;
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
        join_tasks(&mut tasks, Duration::from_secs(2)).await;
        if let Some(path) = unix_path {
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
}

fn spawn_task(
    tasks: &mut Vec<Task>,
    name: &'static str,
    stops: bool,
    work: impl Future<Output = ()> + Send + 'static,
) {
    tasks.push(Task {
        name,
        handle: tokio::spawn(work),
        stops,
    });
}

/// Waits for the tasks that end on the stop signal (all of them together at most `deadline`),
/// then aborts whatever still runs.
async fn join_tasks(tasks: &mut Vec<Task>, deadline: Duration) {
    let until = tokio::time::Instant::now() + deadline;
    for task in tasks.iter_mut().filter(|t| t.stops) {
        if tokio::time::timeout_at(until, &mut task.handle)
            .await
            .is_err()
        {
            tracing::warn!(task = task.name, "did not stop in time; aborting it");
        }
    }
    for task in tasks.drain(..) {
        if !task.handle.is_finished() {
            tracing::debug!(task = task.name, "stopping");
            task.handle.abort();
        }
    }
}

/// The one place readiness is published: the pipeline's flag and both gRPC health names.
async fn set_serving(
    ready: &AtomicBool,
    health: &tonic_health::server::HealthReporter,
    serving: bool,
) {
    ready.store(serving, Ordering::Release);
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    for service in ["", "envoy.service.auth.v3.Authorization"] {
        health.set_service_status(service, status).await;
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
            set_serving(&ready, &health, now).await;
            tracing::info!(ready = now, "readiness changed");
            last = Some(now);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = stop.changed() => {}
        }
    }
}
