//! A real Envoy, from a config template such as `envoy/dev.yaml`.
//!
//! The template names well-known loopback ports; rendering replaces them. The listeners and
//! the admin port become 0 so that the kernel picks them with no race; the harness then reads
//! the admin address from `--admin-address-path` and the listeners' from `/listeners`.
//!
//! A template whose TLS listener names certificate files under [`TEMPLATE_TLS_DIR`] gets a
//! fresh test CA and a certificate for `127.0.0.1` and `localhost` signed by it, written to
//! `<dir>/tls/` (`ca.crt`, `tls.crt`, `tls.key`); clients trust [`EnvoyProcess::tls_ca_file`].

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
/// `port_value` of the TLS listener in the templates that have one (`envoy/dev.yaml`).
pub const TEMPLATE_TLS_LISTENER_PORT: u16 = 10443;
/// Where the templates name their TLS certificate and key (`tls.crt`, `tls.key`).
pub const TEMPLATE_TLS_DIR: &str = "/etc/envoy/tls/";
/// The name of the TLS listener in `envoy/dev.yaml`.
const TLS_LISTENER_NAME: &str = "agents_tls";
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
        // The TLS listener always gets a port the kernel picks (found through the admin API).
        (TEMPLATE_TLS_LISTENER_PORT, 0, false),
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

/// Writes a fresh test CA (`ca.crt`) and a certificate for `127.0.0.1`, `localhost` and
/// `extra_ips` signed by it (`tls.crt`, `tls.key`, mode 0600) into `dir`. Loopback tests only.
pub fn write_test_tls(dir: &Path, extra_ips: &[std::net::IpAddr]) -> Result<(), StackError> {
    let context = "making a test certificate";
    let fail = |e: rcgen::Error| StackError::new(ErrorKind::Config, context, e);
    std::fs::create_dir_all(dir)
        .map_err(|e| StackError::io(format!("creating {}", dir.display()), e))?;
    let ca_key = rcgen::KeyPair::generate().map_err(fail)?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(fail)?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "aegis sandbox test CA");
    let ca = ca_params.self_signed(&ca_key).map_err(fail)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().map_err(fail)?;
    let mut names = vec!["127.0.0.1".to_string(), "localhost".to_string()];
    names.extend(extra_ips.iter().map(|ip| ip.to_string()));
    let params = rcgen::CertificateParams::new(names).map_err(fail)?;
    let cert = params.signed_by(&key, &issuer).map_err(fail)?;
    let write = |name: &str, text: String, mode: u32| {
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join(name);
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()))
            .map_err(|e| StackError::io(format!("writing {}", path.display()), e))
    };
    write("ca.crt", ca.pem(), 0o644)?;
    write("tls.crt", cert.pem(), 0o644)?;
    write("tls.key", key.serialize_pem(), 0o600)
}

/// A running Envoy. Killed on drop.
pub struct EnvoyProcess {
    child: Child,
    admin: SocketAddr,
    listeners: Vec<SocketAddr>,
    /// The TLS listener and the CA file its certificate chains to, when the template has one.
    tls: Option<(SocketAddr, PathBuf)>,
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
        let tls_dir = dir.join("tls");
        let has_tls = template.contains(TEMPLATE_TLS_DIR);
        let mut template = template.to_string();
        if has_tls {
            let addr = tls_listen_addr();
            write_test_tls(&tls_dir, &[addr.ip()])?;
            template = template
                .replace(TEMPLATE_TLS_DIR, &format!("{}/", tls_dir.display()))
                .replace(
                    &format!("address: 127.0.0.1, port_value: {TEMPLATE_TLS_LISTENER_PORT}"),
                    &format!("address: {}, port_value: {}", addr.ip(), addr.port()),
                );
        }
        let yaml = render_envoy_yaml(&template, 0, 0, upstreams)?;
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
        let tls = listeners
            .iter()
            .find(|(name, _)| name == TLS_LISTENER_NAME)
            .map(|(_, addr)| (*addr, tls_dir.join("ca.crt")))
            .filter(|_| has_tls);
        let listeners: Vec<SocketAddr> = listeners.into_iter().map(|(_, a)| a).collect();
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
            tls,
            config_path,
        })
    }

    /// `https://127.0.0.1:<port>` of the TLS listener, when the template has one.
    pub fn tls_listener_url(&self) -> Option<String> {
        self.tls.as_ref().map(|(a, _)| format!("https://{a}"))
    }

    /// The TLS listener's address (host:port, what the SQL connector calls `server_hostname`).
    pub fn tls_listener_addr(&self) -> Option<SocketAddr> {
        self.tls.as_ref().map(|(a, _)| *a)
    }

    /// The PEM file of the test CA that signed the TLS listener's certificate.
    pub fn tls_ca_file(&self) -> Option<&Path> {
        self.tls.as_ref().map(|(_, ca)| ca.as_path())
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

/// Where the TLS listener binds: port 443 on a loopback address of its own (127.a.b.c, free
/// when probed), so that clients which always speak to port 443 of a host, as
/// `databricks-sql-connector` does for its feature flags and telemetry, reach this Envoy with
/// nothing but `server_hostname`. Without the right to bind port 443, a port the kernel picks on
/// 127.0.0.1.
fn tls_listen_addr() -> SocketAddr {
    for _ in 0..8 {
        let [a, b, c] = rand::random::<[u8; 3]>();
        let ip = std::net::Ipv4Addr::new(127, a.clamp(16, 250), b.max(1), c.clamp(1, 254));
        let addr = SocketAddr::from((ip, 443));
        if std::net::TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Base ids unique within this process (and spread by pid across processes).
fn next_base_id() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    (std::process::id() % 100_000) * 100 + NEXT.fetch_add(1, Ordering::Relaxed) % 100
}

/// The names and bound addresses of Envoy's listeners, from the admin `/listeners?format=json`.
async fn listener_addrs(
    client: &reqwest::Client,
    admin: SocketAddr,
) -> Result<Vec<(String, SocketAddr)>, StackError> {
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
            let name = status["name"].as_str().unwrap_or_default().to_string();
            format!("{ip}:{port}")
                .parse::<SocketAddr>()
                .map(|a| (name, a))
                .map_err(|e| StackError::new(ErrorKind::Http, context, format!("{e} in {status}")))
        })
        .collect()
}
