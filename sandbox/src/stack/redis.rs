//! A throwaway `redis-server` on a free loopback port.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::process::{free_port, read_log, redis_bin, Child, ErrorKind, StackError};

const START_TIMEOUT: Duration = Duration::from_secs(15);
const PORT_ATTEMPTS: usize = 3;

/// A `redis-server` with persistence off, listening on 127.0.0.1 only. Killed on drop.
pub struct RedisServer {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

// === impl RedisServer ===

impl RedisServer {
    /// Starts redis-server on a free port with its files (log) in `dir`, and waits for PING.
    pub async fn start(dir: impl AsRef<Path>) -> Result<Self, StackError> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir)
            .map_err(|e| StackError::io(format!("creating the redis dir {}", dir.display()), e))?;
        let mut server = Self {
            bin: redis_bin()?,
            dir,
            port: 0,
            child: None,
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            server.port = free_port()?;
            match server.launch().await {
                Ok(()) => return Ok(server),
                // Another process took the port between our probe and redis' bind: pick again.
                Err(err) if attempt < PORT_ATTEMPTS && address_in_use(&server.log_path()) => {
                    tracing::debug!(%err, "redis port taken, retrying");
                }
                Err(err) => return Err(err),
            }
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("redis.log")
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.exit_status().is_none())
    }

    /// Kills the server (data is not persisted, so a restart starts empty).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill();
        }
    }

    /// Starts the server again on the same port.
    pub async fn start_again(&mut self) -> Result<(), StackError> {
        self.stop();
        self.launch().await
    }

    async fn launch(&mut self) -> Result<(), StackError> {
        let mut cmd = Command::new(&self.bin);
        cmd.current_dir(&self.dir)
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--daemonize", "no"])
            .args(["--protected-mode", "yes"])
            .arg("--dir")
            .arg(&self.dir);
        let log = self.log_path();
        let mut child = Child::spawn("redis-server", cmd, &log)?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            child.ensure_running("starting redis-server")?;
            if ping(self.port).await {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(StackError::new(
                    ErrorKind::Timeout,
                    "starting redis-server",
                    format!(
                        "no PONG on 127.0.0.1:{} within {START_TIMEOUT:?}",
                        self.port
                    ),
                )
                .with_log(&log));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn address_in_use(log: &Path) -> bool {
    read_log(log).contains("Address already in use")
}

/// True when a PING on the port gets `+PONG`.
async fn ping(port: u16) -> bool {
    let attempt = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        stream.write_all(b"PING\r\n").await.ok()?;
        let mut buf = [0u8; 64];
        let n = stream.read(&mut buf).await.ok()?;
        Some(buf[..n].starts_with(b"+PONG"))
    };
    tokio::time::timeout(Duration::from_secs(1), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}
