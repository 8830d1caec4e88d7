//! The aegis binary under test, run as `aegis serve --config <file>`.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use rustix::process::Signal;

use super::process::{http_client, read_log, Child, ErrorKind, StackError};

/// How long `start` and `restart` wait for `/readyz`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `aegis serve`. Killed on drop.
pub struct AegisProcess {
    bin: PathBuf,
    config_path: PathBuf,
    log_path: PathBuf,
    admin_listen: String,
    grpc_listen: String,
    child: Option<Child>,
}

// === impl AegisProcess ===

impl AegisProcess {
    /// Runs `<bin> serve --config <config_path>` and waits (up to [`READY_TIMEOUT`]) until
    /// `GET http://<server.admin_listen>/readyz` answers 200.
    pub async fn start(bin: &Path, config_path: &Path) -> Result<Self, StackError> {
        let mut aegis = Self::spawn(bin, config_path)?;
        aegis.wait_ready(READY_TIMEOUT).await?;
        Ok(aegis)
    }

    /// Runs `<bin> serve --config <config_path>` without waiting for readiness, for tests of a
    /// server that is expected not to become ready.
    pub fn spawn(bin: &Path, config_path: &Path) -> Result<Self, StackError> {
        if !bin.is_file() {
            return Err(StackError::new(
                ErrorKind::MissingBinary,
                "finding the aegis binary",
                format!(
                    "{} does not exist (build it with `make build`)",
                    bin.display()
                ),
            ));
        }
        // Absolute, since aegis runs in the config's directory.
        let bin = std::path::absolute(bin)
            .map_err(|e| StackError::io(format!("resolving {}", bin.display()), e))?;
        let config_path = std::path::absolute(config_path)
            .map_err(|e| StackError::io(format!("resolving {}", config_path.display()), e))?;
        let config_path = config_path.as_path();
        let (admin_listen, grpc_listen) = listen_addrs(config_path)?;
        let stem = config_path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("aegis");
        let log_path = config_path.with_file_name(format!("{stem}.log"));
        let mut aegis = Self {
            bin,
            config_path: config_path.to_path_buf(),
            log_path,
            admin_listen,
            grpc_listen,
            child: None,
        };
        aegis.launch()?;
        Ok(aegis)
    }

    /// Polls `/readyz` until it answers 200; an error (with the log tail) if aegis exits or
    /// `timeout` passes first.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<(), StackError> {
        let client = http_client(Duration::from_secs(2))?;
        let url = format!("{}/readyz", self.admin_url());
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.as_mut() {
                Some(child) => child.ensure_running("starting aegis")?,
                None => {
                    return Err(StackError::new(
                        ErrorKind::Exited,
                        "starting aegis",
                        "aegis is not running",
                    ));
                }
            }
            let last = match client.get(&url).send().await {
                Ok(resp) if resp.status().is_success() => return Ok(()),
                Ok(resp) => format!("{url} answered {}", resp.status()),
                Err(err) => format!("{url}: {err}"),
            };
            if Instant::now() >= deadline {
                return Err(StackError::new(
                    ErrorKind::Timeout,
                    "starting aegis",
                    format!("not ready within {timeout:?} (last: {last})"),
                )
                .with_log(&self.log_path));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `http://<server.admin_listen>`.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin_listen)
    }

    /// `server.grpc_listen` as configured (`host:port` or `unix:<path>`).
    pub fn grpc_listen(&self) -> &str {
        &self.grpc_listen
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything aegis wrote to stdout and stderr, across restarts.
    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.exit_status().is_none())
    }

    /// Sends SIGTERM (a graceful shutdown) and waits up to `timeout` for aegis to exit: its
    /// exit status, or None when it is still running then (or was not running).
    pub async fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        child.signal(Signal::TERM);
        child.wait_exit(timeout).await;
        child.exit_status()
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill();
        }
    }

    /// Kills aegis if it runs, starts it again with the same binary and config file (re-read,
    /// so a rewritten config takes effect) and waits for readiness.
    pub async fn restart(&mut self) -> Result<(), StackError> {
        self.kill();
        let (admin_listen, grpc_listen) = listen_addrs(&self.config_path)?;
        self.admin_listen = admin_listen;
        self.grpc_listen = grpc_listen;
        self.launch()?;
        self.wait_ready(READY_TIMEOUT).await
    }

    fn launch(&mut self) -> Result<(), StackError> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("serve").arg("--config").arg(&self.config_path);
        if let Some(dir) = self
            .config_path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
        {
            cmd.current_dir(dir);
        }
        self.child = Some(Child::spawn("aegis", cmd, &self.log_path)?);
        Ok(())
    }
}

/// `server.admin_listen` and `server.grpc_listen` of the config file.
fn listen_addrs(config_path: &Path) -> Result<(String, String), StackError> {
    let context = "reading the aegis config";
    let text = std::fs::read_to_string(config_path)
        .map_err(|e| StackError::io(format!("reading {}", config_path.display()), e))?;
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| StackError::new(ErrorKind::Config, context, e))?;
    let get = |key: &str| {
        table
            .get("server")
            .and_then(|s| s.get(key))
            .and_then(|v| v.as_str())
            .map(str::to_owned)
            .ok_or_else(|| {
                StackError::new(
                    ErrorKind::Config,
                    context,
                    format!("{} has no server.{key}", config_path.display()),
                )
            })
    };
    Ok((get("admin_listen")?, get("grpc_listen")?))
}
