//! A real Envoy, from a config template such as `envoy/dev.yaml`.
//!
//! The template names four well-known loopback ports; rendering replaces them. The listener and
//! the admin port become 0 so that the kernel picks them with no race; the harness then reads
//! the admin address from `--admin-address-path` and the listener's from `/listeners`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::process::{
    http_client, read_log, run_bounded, workspace_root, Child, ErrorKind, StackError,
};

/// `port_value` of the listener in the templates.
pub const TEMPLATE_LISTENER_PORT: u16 = 10000;
/// `port_value` of the admin interface in the templates.
pub const TEMPLATE_ADMIN_PORT: u16 = 9901;
/// `port_value` of the `databricks` cluster (the sandbox workspace) in the templates.
pub const TEMPLATE_DATABRICKS_PORT: u16 = 8080;
/// `port_value` of the `aegis` cluster (ext_authz gRPC) in the templates.
pub const TEMPLATE_AEGIS_PORT: u16 = 9191;
/// `path` of the `aegis` cluster's Unix socket in the templates that reach aegis over one
/// (`envoy/sidecar.yaml`); [`render_aegis_socket`] replaces it.
pub const TEMPLATE_AEGIS_SOCKET: &str = "/run/aegis/authz.sock";

const START_TIMEOUT: Duration = Duration::from_secs(30);
const VALIDATE_TIMEOUT: Duration = Duration::from_secs(60);

/// Where Envoy sends what it proxies and what it asks.
#[derive(Clone, Copy, Debug)]
pub struct EnvoyUpstreams {
    /// Port of the Databricks workspace (the sandbox) on 127.0.0.1.
    pub databricks_port: u16,
    /// Port of aegis' gRPC listener on 127.0.0.1.
    pub aegis_port: u16,
}

/// The text of `envoy/dev.yaml`.
pub fn dev_envoy_yaml() -> Result<String, StackError> {
    let path = workspace_root().join("envoy/dev.yaml");
    std::fs::read_to_string(&path)
        .map_err(|e| StackError::io(format!("reading {}", path.display()), e))
}

/// Replaces the well-known ports of `template` (each `port_value: <port>`). The listener and
/// admin ports must be present; the upstream ones may not be, in a custom template.
pub fn render_envoy_yaml(
    template: &str,
    listener_port: u16,
    admin_port: u16,
    upstreams: EnvoyUpstreams,
) -> Result<String, StackError> {
    let mut text = template.to_owned();
    for (from, to, required) in [
        (TEMPLATE_LISTENER_PORT, listener_port, true),
        (TEMPLATE_ADMIN_PORT, admin_port, true),
        (TEMPLATE_DATABRICKS_PORT, upstreams.databricks_port, false),
        (TEMPLATE_AEGIS_PORT, upstreams.aegis_port, false),
    ] {
        let needle = format!("port_value: {from}");
        if required && !text.contains(&needle) {
            return Err(StackError::new(
                ErrorKind::Config,
                "rendering the envoy config",
                format!("the template has no `{needle}`"),
            ));
        }
        text = text.replace(&needle, &format!("port_value: {to}"));
    }
    Ok(text)
}

/// Points the template's `aegis` Unix socket ([`TEMPLATE_AEGIS_SOCKET`]) at `socket`.
pub fn render_aegis_socket(template: &str, socket: &Path) -> String {
    template.replace(
        &format!("path: {TEMPLATE_AEGIS_SOCKET}"),
        &format!("path: {}", socket.display()),
    )
}

/// Runs `envoy --mode validate` on `yaml` (written to `<dir>/validate.yaml`).
pub async fn validate_envoy_config(bin: &Path, yaml: &str, dir: &Path) -> Result<(), StackError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| StackError::io(format!("creating {}", dir.display()), e))?;
    let file = dir.join("validate.yaml");
    std::fs::write(&file, yaml)
        .map_err(|e| StackError::io(format!("writing {}", file.display()), e))?;
    let mut cmd = Command::new(bin);
    cmd.args([
        "--mode",
        "validate",
        "--disable-hot-restart",
        "--log-level",
        "warn",
        "-c",
    ])
    .arg(&file);
    run_bounded(
        "envoy --mode validate",
        cmd,
        &dir.join("validate.log"),
        VALIDATE_TIMEOUT,
    )
    .await
}

/// A running Envoy. Killed on drop.
pub struct EnvoyProcess {
    child: Child,
    admin: SocketAddr,
    listeners: Vec<SocketAddr>,
    config_path: PathBuf,
}

// === impl EnvoyProcess ===

impl EnvoyProcess {
    /// Renders `template` for `upstreams`, starts Envoy with its files in `dir` and waits until
    /// the admin interface says `/ready`.
    pub async fn start(
        bin: &Path,
        template: &str,
        dir: &Path,
        upstreams: EnvoyUpstreams,
    ) -> Result<Self, StackError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StackError::io(format!("creating {}", dir.display()), e))?;
        let yaml = render_envoy_yaml(template, 0, 0, upstreams)?;
        let config_path = dir.join("envoy.yaml");
        std::fs::write(&config_path, yaml)
            .map_err(|e| StackError::io(format!("writing {}", config_path.display()), e))?;
        let admin_file = dir.join("envoy.admin-address");
        let _ = std::fs::remove_file(&admin_file);

        let mut cmd = Command::new(bin);
        cmd.arg("-c")
            .arg(&config_path)
            .args(["--concurrency", "1"])
            // Hot restart is what base ids separate; with it off, several Envoys share nothing.
            .arg("--disable-hot-restart")
            .args(["--base-id", &next_base_id().to_string()])
            .arg("--admin-address-path")
            .arg(&admin_file)
            .args(["--log-level", "info"]);
        let log = dir.join("envoy.log");
        let mut child = Child::spawn("envoy", cmd, &log)?;

        let client = http_client(Duration::from_secs(2))?;
        let deadline = Instant::now() + START_TIMEOUT;
        let timeout = |what: &str| {
            StackError::new(
                ErrorKind::Timeout,
                "starting envoy",
                format!("{what} within {START_TIMEOUT:?}"),
            )
            .with_log(&log)
        };

        let admin = loop {
            child.ensure_running("starting envoy")?;
            let text = std::fs::read_to_string(&admin_file).unwrap_or_default();
            if let Ok(addr) = text.trim().parse::<SocketAddr>() {
                break addr;
            }
            if Instant::now() >= deadline {
                return Err(timeout("no admin address written"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        loop {
            child.ensure_running("starting envoy")?;
            let ready = client.get(format!("http://{admin}/ready")).send().await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                break;
            }
            if Instant::now() >= deadline {
                return Err(timeout("admin /ready not 200"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let listeners = listener_addrs(&client, admin)
            .await
            .map_err(|e| e.with_log(&log))?;
        if listeners.is_empty() {
            return Err(
                StackError::new(ErrorKind::Config, "starting envoy", "no listener is up")
                    .with_log(&log),
            );
        }
        Ok(Self {
            child,
            admin,
            listeners,
            config_path,
        })
    }

    /// `http://<first listener>`.
    pub fn listener_url(&self) -> String {
        format!("http://{}", self.listeners[0])
    }

    /// Every listener's address, in config order.
    pub fn listener_addrs(&self) -> &[SocketAddr] {
        &self.listeners
    }

    /// `http://<admin address>`.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    /// The rendered config Envoy runs with.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Envoy's log (its own lines and the stdout access log).
    pub fn log(&self) -> String {
        read_log(self.child.log())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.exit_status().is_none()
    }

    /// Kills Envoy now.
    pub fn stop(&mut self) {
        self.child.kill();
    }
}

/// Base ids unique within this process (and spread by pid across processes).
fn next_base_id() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    (std::process::id() % 100_000) * 100 + NEXT.fetch_add(1, Ordering::Relaxed) % 100
}

/// The bound addresses of Envoy's listeners, from the admin `/listeners?format=json`.
async fn listener_addrs(
    client: &reqwest::Client,
    admin: SocketAddr,
) -> Result<Vec<SocketAddr>, StackError> {
    let context = "reading envoy's listeners";
    let body: serde_json::Value = client
        .get(format!("http://{admin}/listeners?format=json"))
        .send()
        .await
        .map_err(|e| StackError::new(ErrorKind::Http, context, e))?
        .json()
        .await
        .map_err(|e| StackError::new(ErrorKind::Http, context, e))?;
    let statuses = body["listener_statuses"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    statuses
        .iter()
        .map(|status| {
            let socket = &status["local_address"]["socket_address"];
            let ip = socket["address"].as_str().unwrap_or_default();
            let port = socket["port_value"].as_u64().unwrap_or_default();
            format!("{ip}:{port}")
                .parse::<SocketAddr>()
                .map_err(|e| StackError::new(ErrorKind::Http, context, format!("{e} in {status}")))
        })
        .collect()
}
