//! A TCP fault proxy for the fault-injection tests: sits between aegis and Redis or PostgreSQL
//! on a loopback port and, on command, passes bytes through, delays them, holds them (a
//! blackhole: connections stay open and nothing arrives, as in a network partition), or refuses
//! and cuts connections.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use sandbox::stack::{FaultMode, FaultProxy};
//! let proxy = FaultProxy::start().await?;
//! let url = proxy.reroute("redis://127.0.0.1:6379").expect("a host:port url");
//! // ... point aegis at `url`, then:
//! proxy.set_mode(FaultMode::Blackhole);
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy does with traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultMode {
    /// Forward bytes as they come.
    Pass,
    /// Forward every chunk after this delay (both directions).
    Slow(Duration),
    /// Accept connections but forward nothing until the mode changes; held bytes are then
    /// delivered, as TCP would after a partition heals.
    Blackhole,
    /// Close every open connection and refuse new ones, as a dead server would.
    Refuse,
}

/// How often a held connection looks at the mode again.
const POLL: Duration = Duration::from_millis(20);

struct Shared {
    target: Mutex<Option<SocketAddr>>,
    mode: watch::Sender<FaultMode>,
}

/// A running proxy on `127.0.0.1:<port>`. Stops (and drops its connections) when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

// === impl FaultProxy ===

impl FaultProxy {
    /// Binds a free loopback port; set the target with [`FaultProxy::set_target`] or
    /// [`FaultProxy::reroute`] before anything connects.
    pub async fn start() -> std::io::Result<FaultProxy> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (mode, _) = watch::channel(FaultMode::Pass);
        let shared = Arc::new(Shared {
            target: Mutex::new(None),
            mode,
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(FaultProxy {
            addr,
            shared,
            accept,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn set_target(&self, target: SocketAddr) {
        *lock(&self.shared.target) = Some(target);
    }

    /// Makes the proxy forward to the `host:port` of `url` (a loopback IP) and returns `url`
    /// with that `host:port` replaced by the proxy's address.
    pub fn reroute(&self, url: &str) -> Option<String> {
        let parsed = reqwest::Url::parse(url).ok()?;
        let host = parsed.host_str()?;
        let port = parsed.port()?;
        let target: SocketAddr = format!("{host}:{port}").parse().ok()?;
        if !target.ip().is_loopback() {
            return None;
        }
        self.set_target(target);
        Some(url.replacen(&format!("{host}:{port}"), &self.addr.to_string(), 1))
    }

    pub fn set_mode(&self, mode: FaultMode) {
        self.shared.mode.send_replace(mode);
    }

    pub fn mode(&self) -> FaultMode {
        *self.shared.mode.borrow()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        // Ends every connection task.
        self.shared.mode.send_replace(FaultMode::Refuse);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    while let Ok((client, _)) = listener.accept().await {
        let mode = *shared.mode.borrow();
        let target = *lock(&shared.target);
        let (FaultMode::Pass | FaultMode::Slow(_) | FaultMode::Blackhole, Some(target)) =
            (mode, target)
        else {
            drop(client);
            continue;
        };
        let modes = shared.mode.subscribe();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(target).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            let up = pump(cr, sw, modes.clone());
            let down = pump(sr, cw, modes.clone());
            // When either direction ends (EOF, error or Refuse), the whole connection goes.
            tokio::select! {
                _ = up => {}
                _ = down => {}
            }
        });
    }
}

/// Copies one direction chunk by chunk, obeying the mode before each write. Returns when the
/// source closes, a write fails, or the mode becomes Refuse.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut modes: watch::Receiver<FaultMode>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = refused(&mut modes) => return,
        };
        loop {
            let mode = *modes.borrow();
            match mode {
                FaultMode::Pass => break,
                FaultMode::Slow(d) => {
                    tokio::time::sleep(d).await;
                    break;
                }
                FaultMode::Blackhole => tokio::time::sleep(POLL).await,
                FaultMode::Refuse => return,
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Resolves once the mode is Refuse (or the proxy is gone).
async fn refused(modes: &mut watch::Receiver<FaultMode>) {
    loop {
        if *modes.borrow_and_update() == FaultMode::Refuse {
            return;
        }
        if modes.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 64];
                    while let Ok(n) = s.read(&mut b).await {
                        if n == 0 || s.write_all(&b[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn roundtrip(s: &mut TcpStream, limit: Duration) -> bool {
        let io = async {
            s.write_all(b"ping").await.ok()?;
            let mut b = [0u8; 4];
            s.read_exact(&mut b).await.ok()?;
            Some(&b == b"ping")
        };
        matches!(tokio::time::timeout(limit, io).await, Ok(Some(true)))
    }

    #[tokio::test]
    async fn pass_slow_blackhole_refuse() {
        let proxy = FaultProxy::start().await.unwrap();
        let url = proxy
            .reroute(&format!("redis://{}", echo_server().await))
            .unwrap();
        assert_eq!(url, format!("redis://{}", proxy.addr()));
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        assert!(roundtrip(&mut s, Duration::from_secs(2)).await);

        proxy.set_mode(FaultMode::Slow(Duration::from_millis(300)));
        let t = std::time::Instant::now();
        assert!(roundtrip(&mut s, Duration::from_secs(3)).await);
        assert!(t.elapsed() >= Duration::from_millis(500));

        proxy.set_mode(FaultMode::Blackhole);
        assert!(!roundtrip(&mut s, Duration::from_millis(300)).await);
        proxy.set_mode(FaultMode::Pass);
        // The held "ping" arrives after the partition heals.
        let mut b = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut b))
            .await
            .unwrap()
            .unwrap();

        proxy.set_mode(FaultMode::Refuse);
        let mut b = [0u8; 1];
        let closed = tokio::time::timeout(Duration::from_secs(2), s.read(&mut b)).await;
        assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))));
        let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
        assert!(!roundtrip(&mut fresh, Duration::from_millis(300)).await);
    }
}
