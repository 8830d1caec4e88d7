//! Process orchestration for the end-to-end tests and the demo: real Redis, PostgreSQL, Envoy
//! and aegis processes on free loopback ports, plus the in-process sandbox (dev IdP and
//! Databricks workspace).
//!
//! Every wait is bounded, every failure names the step and carries the log tail of the server
//! involved, and every child process is killed when its handle drops, also when a test panics.
//! Nothing is skipped: a missing binary is an error that says to run `make setup`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), sandbox::stack::StackError> {
//! use sandbox::stack::{Stack, StackOptions};
//! // In aegis' integration tests: `env!("CARGO_BIN_EXE_aegis")`.
//! let stack = Stack::start(StackOptions::new("target/debug/aegis")).await?;
//! let url = format!("{}/api/2.0/preview/scim/v2/Me", stack.envoy_url());
//! # let _ = url; Ok(()) }
//! ```
//!
//! Layout of the work directory:
//!
//! ```text
//! aegis.toml  aegis.log   the config Stack wrote (patchable before start) and aegis' output
//! keys/       audit.key cache.key checkpoint.key console.token
//! checkpoints/            audit.checkpoint_dir
//! redis/ postgres/ envoy/ each server's files and log
//! ```

mod aegis;
mod envoy;
mod faultproxy;
mod postgres;
mod process;
mod redis;

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;

use crate::{Sandbox, SandboxOptions};

pub use self::aegis::{AegisProcess, READY_TIMEOUT};
pub use self::envoy::{
    dev_envoy_yaml, render_aegis_socket, render_envoy_yaml, validate_envoy_config, write_test_tls,
    EnvoyProcess, EnvoyUpstreams, TEMPLATE_ADMIN_PORT, TEMPLATE_AEGIS_PORT, TEMPLATE_AEGIS_SOCKET,
    TEMPLATE_DATABRICKS_PORT, TEMPLATE_LISTENER_PORT, TEMPLATE_TLS_DIR, TEMPLATE_TLS_LISTENER_PORT,
};
pub use self::faultproxy::{FaultMode, FaultProxy};
pub use self::postgres::{postgres_can_use, PostgresServer};
pub use self::process::{
    envoy_bin, free_addr, free_port, log_tail, postgres_bin_dir, redis_bin, workspace_root,
    ErrorKind, StackError,
};
pub use self::redis::RedisServer;

/// The name of the one workspace and issuer in the generated config.
pub const WORKSPACE_NAME: &str = "sandbox";
pub const ISSUER_NAME: &str = "dev";

/// How often [`Stack::start`] picks new aegis ports when another process took one first.
const PORT_ATTEMPTS: usize = 3;

/// A hook that edits the generated aegis config before aegis starts.
pub type ConfigHook = Box<dyn FnOnce(&mut toml::Table) + Send>;

/// What [`Stack::start`] starts, and how.
pub struct StackOptions {
    /// The aegis binary (tests: `env!("CARGO_BIN_EXE_aegis")`).
    pub aegis_bin: PathBuf,
    /// Where everything goes; a temp dir, removed on drop (unless `AEGIS_KEEP_STACK_DIRS=1`),
    /// when None. A given directory is kept.
    pub work_dir: Option<PathBuf>,
    /// The Envoy binary; [`envoy_bin`] when None.
    pub envoy_bin: Option<PathBuf>,
    /// The Envoy config template; `envoy/dev.yaml` when None.
    pub envoy_template: Option<String>,
    pub sandbox: SandboxOptions,
    /// Edits the generated `aegis.toml` before it is written and aegis starts.
    pub customize: Option<ConfigHook>,
    /// PostgreSQL with fsync on ([`PostgresServer::start_durable`]), for benchmarks.
    pub durable_postgres: bool,
}

// === impl StackOptions ===

impl StackOptions {
    pub fn new(aegis_bin: impl Into<PathBuf>) -> Self {
        Self {
            aegis_bin: aegis_bin.into(),
            work_dir: None,
            envoy_bin: None,
            envoy_template: None,
            sandbox: SandboxOptions::default(),
            customize: None,
            durable_postgres: false,
        }
    }

    pub fn with_work_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.work_dir = Some(dir.into());
        self
    }

    pub fn with_sandbox(mut self, sandbox: SandboxOptions) -> Self {
        self.sandbox = sandbox;
        self
    }

    pub fn with_envoy_template(mut self, yaml: impl Into<String>) -> Self {
        self.envoy_template = Some(yaml.into());
        self
    }

    /// Sets the hook that edits `aegis.toml` before aegis starts.
    pub fn with_config(
        mut self,
        customize: impl FnOnce(&mut toml::Table) + Send + 'static,
    ) -> Self {
        self.customize = Some(Box::new(customize));
        self
    }
}

/// Everything aegis needs, running: Redis, PostgreSQL, the sandbox, aegis and Envoy in front.
///
/// Fields drop in declaration order: Envoy and aegis go first, the stores last, the work dir
/// after every process is gone.
pub struct Stack {
    pub envoy: EnvoyProcess,
    pub aegis: AegisProcess,
    pub sandbox: Sandbox,
    pub postgres: PostgresServer,
    pub redis: RedisServer,
    config: toml::Table,
    config_path: PathBuf,
    aegis_bin: PathBuf,
    console_token: String,
    work_dir: PathBuf,
    _pg_temp: Option<tempfile::TempDir>,
    _temp: Option<tempfile::TempDir>,
}

// === impl Stack ===

impl Stack {
    /// Starts the whole stack; see [`StackOptions`].
    pub async fn start(opts: StackOptions) -> Result<Stack, StackError> {
        let envoy_bin = match opts.envoy_bin {
            Some(bin) => bin,
            None => envoy_bin()?,
        };
        let template = match opts.envoy_template {
            Some(yaml) => yaml,
            None => dev_envoy_yaml()?,
        };
        // Fail before starting anything when a binary is missing.
        redis_bin()?;
        postgres_bin_dir()?;
        if !opts.aegis_bin.is_file() {
            return Err(StackError::new(
                ErrorKind::MissingBinary,
                "finding the aegis binary",
                format!(
                    "{} does not exist (build it with `make build`)",
                    opts.aegis_bin.display()
                ),
            ));
        }

        let aegis_bin = std::path::absolute(&opts.aegis_bin)
            .map_err(|e| StackError::io(format!("resolving {}", opts.aegis_bin.display()), e))?;
        let (temp, work_dir) = match opts.work_dir {
            Some(dir) => {
                std::fs::create_dir_all(&dir).map_err(|e| {
                    StackError::io(format!("creating the work dir {}", dir.display()), e)
                })?;
                (None, dir)
            }
            None => {
                let mut temp = tempfile::Builder::new()
                    .prefix("aegis-stack-")
                    .tempdir()
                    .map_err(|e| StackError::io("creating a temp work dir", e))?;
                let dir = temp.path().to_path_buf();
                if keep_work_dirs() {
                    temp.disable_cleanup(true);
                    eprintln!("stack: keeping the work dir {}", dir.display());
                }
                (Some(temp), dir)
            }
        };
        let work_dir = work_dir.canonicalize().map_err(|e| {
            StackError::io(format!("resolving the work dir {}", work_dir.display()), e)
        })?;
        // Traversable by the postgres OS user, which owns the cluster below it.
        set_mode(&work_dir, 0o755)?;

        let (pg_temp, pg_dir) = if postgres_can_use(&work_dir.join("postgres")) {
            (None, work_dir.join("postgres"))
        } else {
            let mut temp = tempfile::Builder::new()
                .prefix("aegis-pg-")
                .tempdir_in("/tmp")
                .map_err(|e| StackError::io("creating a temp dir for postgres", e))?;
            temp.disable_cleanup(keep_work_dirs());
            set_mode(temp.path(), 0o755)?;
            let dir = temp.path().join("postgres");
            (Some(temp), dir)
        };

        let start_postgres = async {
            if opts.durable_postgres {
                PostgresServer::start_durable(&pg_dir).await
            } else {
                PostgresServer::start(&pg_dir).await
            }
        };
        let (redis, postgres) =
            tokio::try_join!(RedisServer::start(work_dir.join("redis")), start_postgres)?;
        let sandbox = Sandbox::start(opts.sandbox)
            .await
            .map_err(|e| StackError::io("starting the sandbox", e))?;

        let keys = work_dir.join("keys");
        std::fs::create_dir_all(&keys)
            .map_err(|e| StackError::io(format!("creating {}", keys.display()), e))?;
        for name in ["audit.key", "cache.key", "checkpoint.key"] {
            write_secret(&keys.join(name), &random_key())?;
        }
        let console_token =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 24]>());
        write_secret(&keys.join("console.token"), &console_token)?;
        let checkpoints = work_dir.join("checkpoints");
        std::fs::create_dir_all(&checkpoints)
            .map_err(|e| StackError::io(format!("creating {}", checkpoints.display()), e))?;

        let mut listen = (free_addr()?, free_addr()?);
        let mut config = aegis_config(&ConfigInputs {
            grpc_listen: listen.0,
            admin_listen: listen.1,
            instance_id: format!("stack-{}", std::process::id()),
            work_dir: &work_dir,
            redis_url: &redis.url(),
            postgres_url: &postgres.url(),
            idp_url: &sandbox.idp_url,
            workspace_url: &sandbox.workspace_url,
        });
        if let Some(customize) = opts.customize {
            customize(&mut config);
        }
        let config_path = work_dir.join("aegis.toml");
        let databricks_port = url_port(&sandbox.workspace_url, "the sandbox workspace url")?;
        let envoy_dir = work_dir.join("envoy");

        let mut attempt = 0;
        let (aegis, envoy) = loop {
            attempt += 1;
            write_config(&config_path, &config)?;
            let upstreams = EnvoyUpstreams {
                databricks_port,
                aegis_port: grpc_port(&config)?,
            };
            // aegis on a Unix socket: the template's `aegis` cluster names the socket instead.
            let template = match grpc_socket(&config) {
                Some(socket) => render_aegis_socket(&template, Path::new(socket)),
                None => template.clone(),
            };
            match tokio::try_join!(
                AegisProcess::start(&aegis_bin, &config_path),
                EnvoyProcess::start(&envoy_bin, &template, &envoy_dir, upstreams),
            ) {
                Ok(both) => break both,
                // Another process took a port between our probe and aegis' bind: pick new
                // ones, unless the caller chose them.
                Err(err)
                    if attempt < PORT_ATTEMPTS
                        && err.kind() == ErrorKind::Exited
                        && err
                            .log_tail()
                            .is_some_and(|t| t.contains("Address already in use"))
                        && listen_addrs_of(&config) == Some(listen) =>
                {
                    tracing::debug!(%err, "aegis port taken, retrying");
                    let fresh = (free_addr()?, free_addr()?);
                    set_listen_addrs(&mut config, fresh);
                    listen = fresh;
                }
                Err(err) => return Err(err),
            }
        };

        Ok(Stack {
            envoy,
            aegis,
            sandbox,
            postgres,
            redis,
            config,
            config_path,
            aegis_bin,
            console_token,
            work_dir,
            _pg_temp: pg_temp,
            _temp: temp,
        })
    }

    /// Envoy's listener: where agents send requests.
    pub fn envoy_url(&self) -> String {
        self.envoy.listener_url()
    }

    /// aegis' admin listener (`/healthz`, `/readyz`, `/metrics`, `/console`).
    pub fn aegis_admin_url(&self) -> String {
        self.aegis.admin_url()
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The config as written to [`Stack::config_path`].
    pub fn config(&self) -> &toml::Table {
        &self.config
    }

    /// Edits the config and rewrites the file; call `stack.aegis.restart()` to apply it.
    pub fn update_config(&mut self, edit: impl FnOnce(&mut toml::Table)) -> Result<(), StackError> {
        edit(&mut self.config);
        write_config(&self.config_path, &self.config)
    }

    /// Writes `config` as `<work dir>/<file_name>` (e.g. a second replica's config, with its
    /// own listen addresses) and returns its path.
    pub fn write_config_as(
        &self,
        file_name: &str,
        config: &toml::Table,
    ) -> Result<PathBuf, StackError> {
        let path = self.work_dir.join(file_name);
        write_config(&path, config)?;
        Ok(path)
    }

    pub fn aegis_bin(&self) -> &Path {
        &self.aegis_bin
    }

    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    pub fn keys_dir(&self) -> PathBuf {
        self.work_dir.join("keys")
    }

    /// The operator console's sign-in token (`keys/console.token`).
    pub fn console_token(&self) -> &str {
        &self.console_token
    }

    /// Stops everything in order: Envoy, aegis, the sandbox, PostgreSQL (fast shutdown), Redis.
    pub async fn shutdown(self) {
        let Stack {
            mut envoy,
            mut aegis,
            sandbox,
            mut postgres,
            mut redis,
            ..
        } = self;
        envoy.stop();
        aegis.kill();
        sandbox.shutdown().await;
        postgres.stop().await;
        redis.stop();
    }
}

/// `server.grpc_listen` and `server.admin_listen`, when both are TCP addresses.
fn listen_addrs_of(config: &toml::Table) -> Option<(SocketAddr, SocketAddr)> {
    let server = config.get("server")?;
    let addr = |key: &str| server.get(key)?.as_str()?.parse::<SocketAddr>().ok();
    Some((addr("grpc_listen")?, addr("admin_listen")?))
}

fn set_listen_addrs(config: &mut toml::Table, (grpc, admin): (SocketAddr, SocketAddr)) {
    if let Some(server) = config.get_mut("server").and_then(|s| s.as_table_mut()) {
        server.insert("grpc_listen".into(), grpc.to_string().into());
        server.insert("admin_listen".into(), admin.to_string().into());
    }
}

/// `AEGIS_KEEP_STACK_DIRS=1` keeps temp work dirs (configs, logs) after the stack is gone, for
/// a look at what happened in a failed test.
fn keep_work_dirs() -> bool {
    std::env::var_os("AEGIS_KEEP_STACK_DIRS").is_some_and(|v| !v.is_empty() && v != "0")
}

/// What the generated aegis config depends on.
struct ConfigInputs<'a> {
    grpc_listen: SocketAddr,
    admin_listen: SocketAddr,
    instance_id: String,
    work_dir: &'a Path,
    redis_url: &'a str,
    postgres_url: &'a str,
    idp_url: &'a str,
    workspace_url: &'a str,
}

/// The aegis config for the stack, in the format of DESIGN.md.
fn aegis_config(inputs: &ConfigInputs<'_>) -> toml::Table {
    let path = |rel: &str| inputs.work_dir.join(rel).to_string_lossy().into_owned();
    let config = serde_json::json!({
        "server": {
            "grpc_listen": inputs.grpc_listen.to_string(),
            "admin_listen": inputs.admin_listen.to_string(),
            "instance_id": inputs.instance_id,
        },
        "admin": { "console_token_file": path("keys/console.token") },
        "redis": { "url": inputs.redis_url, "cache_key_file": path("keys/cache.key") },
        "postgres": { "url": inputs.postgres_url },
        "audit": {
            "hmac_key_file": path("keys/audit.key"),
            "key_id": "k1",
            "chain_id": "main",
            "checkpoint_signing_key_file": path("keys/checkpoint.key"),
            "checkpoint_dir": path("checkpoints"),
            "checkpoint_interval": "10s",
        },
        "issuers": [{
            "name": ISSUER_NAME,
            "issuer": inputs.idp_url,
            "audiences": ["aegis"],
            "algorithms": ["RS256", "ES256"],
            "username_claim": "email",
            "agent_claim": "azp",
        }],
        "workspaces": [{
            "name": WORKSPACE_NAME,
            "url": inputs.workspace_url,
            "hosts": [],
            "token_source": "federation",
            "scopes": ["all-apis"],
        }],
        "policy": { "allowed_agents": [] },
    });
    match toml::Value::try_from(config) {
        Ok(toml::Value::Table(table)) => table,
        // A JSON object of strings and arrays always converts to a table.
        _ => toml::Table::new(),
    }
}

fn write_config(path: &Path, config: &toml::Table) -> Result<(), StackError> {
    let text = toml::to_string(config)
        .map_err(|e| StackError::new(ErrorKind::Config, "serializing the aegis config", e))?;
    // Atomically (a temporary file renamed over it): a running aegis watches the file and must
    // never read half of it.
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| StackError::io(format!("writing {}", path.display()), e))
}

/// 32 random bytes, standard base64.
fn random_key() -> String {
    base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>())
}

/// Writes `value` and a newline to a new mode-0600 file.
fn write_secret(path: &Path, value: &str) -> Result<(), StackError> {
    let context = || format!("writing {}", path.display());
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| StackError::io(context(), e))?;
    writeln!(file, "{value}").map_err(|e| StackError::io(context(), e))
}

fn set_mode(path: &Path, mode: u32) -> Result<(), StackError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| StackError::io(format!("setting the mode of {}", path.display()), e))
}

fn url_port(url: &str, what: &'static str) -> Result<u16, StackError> {
    reqwest::Url::parse(url)
        .ok()
        .and_then(|u| u.port_or_known_default())
        .ok_or_else(|| StackError::new(ErrorKind::Config, what, format!("no port in {url}")))
}

/// The path of `server.grpc_listen` when it is `unix:<path>`.
fn grpc_socket(config: &toml::Table) -> Option<&str> {
    config
        .get("server")
        .and_then(|s| s.get("grpc_listen"))
        .and_then(|v| v.as_str())
        .and_then(|listen| listen.strip_prefix("unix:"))
}

/// The TCP port of `server.grpc_listen`, which Envoy's `aegis` cluster points at (the
/// template's own port, left as it is, when aegis listens on a Unix socket).
fn grpc_port(config: &toml::Table) -> Result<u16, StackError> {
    if grpc_socket(config).is_some() {
        return Ok(TEMPLATE_AEGIS_PORT);
    }
    let listen = config
        .get("server")
        .and_then(|s| s.get("grpc_listen"))
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    listen.parse::<SocketAddr>().map(|a| a.port()).map_err(|_| {
        StackError::new(
            ErrorKind::Config,
            "pointing envoy at aegis",
            format!("server.grpc_listen {listen:?} is not a loopback host:port"),
        )
    })
}
