//! The Redis link: one multiplexed connection (standalone, cluster or Sentinel), a health
//! monitor, and the pub/sub events channel; shared by the token broker, the agent blocklist,
//! the consent listener and the rate limits.
//!
//! Redis carries revocations between replicas, so when aegis cannot see Redis it cannot know
//! whether a cached token was revoked: the monitor PINGs every [`PING_EVERY`] and, on failure,
//! marks the link down, which makes every Check deny with `dependency_unavailable` (fail closed).
//! When Redis comes back, the L1 cache is flushed (revocations may have been missed) and
//! requests flow again with no restart.
//!
//! Revocations travel on the pub/sub channel [`EVENTS_CHANNEL`]; the link counts as healthy only
//! while its subscription is up, so a replica that could miss a revocation denies instead. Loss
//! is seen at once, not at the next probe: a command that finds its connection gone, or the
//! subscription's stream ending, turns the link down immediately. A subscription that stays
//! open but delivers nothing (a connection silently dropped by a load balancer) is caught by a
//! heartbeat: every probe publishes this link's own nonce on the channel, and unless it comes
//! back within [`HEARTBEAT_DEADLINE`] the link goes down and resubscribes. Every connection has
//! TCP keepalive and a TCP user timeout, so a peer that vanished is also noticed by the kernel.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;

use crate::config::{RedisConfig, RedisTopology};

pub const PING_EVERY: Duration = Duration::from_millis(250);
/// The pub/sub channel revocations (and other cross-replica events) travel on.
pub const EVENTS_CHANNEL: &str = "aegis:v1:events";
const OP_TIMEOUT: Duration = Duration::from_millis(300);
/// How long the link waits for its own heartbeat to come back through the subscription.
pub const HEARTBEAT_DEADLINE: Duration = Duration::from_millis(1000);
/// Prefix of a heartbeat event: `hb:<nonce of the publishing link>`; never forwarded.
const HEARTBEAT_PREFIX: &str = "hb:";

/// Keepalive probes after 5 s idle, every second, 3 tries; unacknowledged data fails the
/// connection after 2 s (a partition with requests in flight).
fn tcp_settings() -> redis::io::tcp::TcpSettings {
    use redis::io::tcp::{socket2::TcpKeepalive, TcpSettings};
    let settings = TcpSettings::default().set_nodelay(true).set_keepalive(
        TcpKeepalive::new()
            .with_time(Duration::from_secs(5))
            .with_interval(Duration::from_secs(1))
            .with_retries(3),
    );
    #[cfg(target_os = "linux")]
    let settings = settings.set_user_timeout(Duration::from_secs(2));
    settings
}

/// A client for one node, with [`tcp_settings`].
fn node_client(url: &str, ca_pem: Option<&[u8]>) -> Result<redis::Client, redis::RedisError> {
    use redis::IntoConnectionInfo;
    let info = url.into_connection_info()?.set_tcp_settings(tcp_settings());
    match ca_pem {
        Some(ca) if url.starts_with("rediss://") => redis::Client::build_with_tls(
            info,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(ca.to_vec()),
            },
        ),
        _ => redis::Client::open(info),
    }
}

pub struct RedisLink {
    source: Source,
    conn: RwLock<Option<Conn>>,
    healthy: AtomicBool,
    /// Redis was healthy at least once (readiness: a replica starts serving only then).
    was_healthy: AtomicBool,
    /// Bumped on every recovery; the broker flushes L1 when it changes.
    epoch: AtomicU64,
    /// The events subscription is up.
    subscribed: AtomicBool,
    events: tokio::sync::broadcast::Sender<String>,
    /// This link's heartbeat payload (`hb:<random>`), and when it last came back (unix ms).
    heartbeat: String,
    heartbeat_seen_ms: std::sync::atomic::AtomicI64,
    /// Tells the subscription task to drop its connection and subscribe again.
    resubscribe: tokio::sync::Notify,
}

#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("redis is unavailable")]
    Down,
    /// Shown as the error's kind only: a Redis error's text can carry a key or an address.
    #[error("redis operation failed: {:?}", .0.kind())]
    Op(#[source] redis::RedisError),
    #[error("redis operation timed out")]
    Timeout,
}

impl RedisLink {
    /// A link to a single node at `url` (tests, tools).
    pub fn new(url: &str) -> Result<Arc<RedisLink>, redis::RedisError> {
        Self::with_source(Source::Standalone(node_client(url, None)?))
    }

    /// A link as configured: standalone, cluster or Sentinel, TLS with an optional private CA.
    pub fn from_config(cfg: &RedisConfig) -> Result<Arc<RedisLink>, redis::RedisError> {
        let certs = || redis::TlsCertificates {
            client_tls: None,
            root_cert: cfg.ca_pem.clone(),
        };
        let client = |url: &str| node_client(url, cfg.ca_pem.as_deref());
        let source = match &cfg.topology {
            RedisTopology::Standalone(url) => Source::Standalone(client(url)?),
            RedisTopology::Cluster(nodes) => {
                let mut builder = redis::cluster::ClusterClientBuilder::new(nodes.clone())
                    .tcp_settings(tcp_settings())
                    .connection_timeout(Duration::from_millis(500))
                    .response_timeout(OP_TIMEOUT);
                if cfg.ca_pem.is_some() {
                    builder = builder.certs(certs());
                }
                Source::Cluster {
                    cluster: builder.build()?,
                    nodes: nodes.iter().map(|n| client(n)).collect::<Result<_, _>>()?,
                    next: AtomicU64::new(0),
                }
            }
            RedisTopology::Sentinel { sentinels, master } => Source::Sentinel(
                tokio::sync::Mutex::new(redis::sentinel::SentinelClient::build(
                    sentinels.clone(),
                    master.clone(),
                    None,
                    redis::sentinel::SentinelServerType::Master,
                )?),
            ),
        };
        Self::with_source(source)
    }

    fn with_source(source: Source) -> Result<Arc<RedisLink>, redis::RedisError> {
        Ok(Arc::new(RedisLink {
            source,
            conn: RwLock::new(None),
            healthy: AtomicBool::new(false),
            was_healthy: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            subscribed: AtomicBool::new(false),
            events: tokio::sync::broadcast::channel(1024).0,
            heartbeat: {
                use rand::RngCore;
                let mut raw = [0u8; 12];
                rand::rng().fill_bytes(&mut raw);
                format!("{HEARTBEAT_PREFIX}{}", hex::encode(raw))
            },
            heartbeat_seen_ms: std::sync::atomic::AtomicI64::new(0),
            resubscribe: tokio::sync::Notify::new(),
        }))
    }

    /// Events received on [`EVENTS_CHANNEL`] from any replica (this one included).
    pub fn events(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.events.subscribe()
    }

    /// Publishes an event to every replica; the number of subscribers that received it.
    pub async fn publish(&self, payload: &str) -> Result<u64, RedisError> {
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(EVENTS_CHANNEL).arg(payload);
        self.run(cmd).await
    }

    /// Keeps a subscription to [`EVENTS_CHANNEL`] up, forwarding messages to [`Self::events`].
    async fn listen(self: Arc<Self>) {
        use futures_util::StreamExt;
        loop {
            let connected = tokio::time::timeout(Duration::from_millis(500), async {
                let client = self.source.pubsub_client().await?;
                client.get_async_pubsub().await
            })
            .await;
            if let Ok(Ok(mut pubsub)) = connected {
                let subscribed =
                    tokio::time::timeout(OP_TIMEOUT, pubsub.subscribe(EVENTS_CHANNEL)).await;
                if matches!(subscribed, Ok(Ok(()))) {
                    // Events published while we were not subscribed are lost: a new epoch
                    // makes the broker flush everything cached before this point.
                    self.epoch.fetch_add(1, Ordering::AcqRel);
                    self.heartbeat_seen_ms
                        .store(crate::clock::unix_ms(), Ordering::Release);
                    self.subscribed.store(true, Ordering::Release);
                    let mut stream = pubsub.into_on_message();
                    loop {
                        let msg = tokio::select! {
                            msg = stream.next() => msg,
                            () = self.resubscribe.notified() => None,
                        };
                        let Some(msg) = msg else { break };
                        let Ok(payload) = msg.get_payload::<String>() else {
                            continue;
                        };
                        if payload.starts_with(HEARTBEAT_PREFIX) {
                            if payload == self.heartbeat {
                                self.heartbeat_seen_ms
                                    .store(crate::clock::unix_ms(), Ordering::Release);
                            }
                            continue;
                        }
                        let _ = self.events.send(payload);
                    }
                    self.subscribed.store(false, Ordering::Release);
                    self.down("events subscription lost");
                }
            }
            tokio::time::sleep(PING_EVERY).await;
        }
    }

    /// Redis answers and the events subscription is up. Losing the subscription counts at
    /// once: a replica that could miss a revocation must deny.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire) && self.subscribed.load(Ordering::Acquire)
    }

    /// Whether this link's own heartbeat came back through the subscription recently; if not,
    /// the subscription is told to start over.
    fn heartbeat_fresh(&self) -> bool {
        if !self.subscribed.load(Ordering::Acquire) {
            return false;
        }
        let age = crate::clock::unix_ms() - self.heartbeat_seen_ms.load(Ordering::Acquire);
        if age <= HEARTBEAT_DEADLINE.as_millis() as i64 {
            return true;
        }
        tracing::warn!(
            age_ms = age,
            "redis events subscription delivers nothing; resubscribing"
        );
        metrics::counter!("aegis_redis_heartbeat_missed_total").increment(1);
        if self.subscribed.swap(false, Ordering::AcqRel) {
            self.resubscribe.notify_one();
        }
        false
    }

    /// Redis was healthy at least once since this link was made.
    pub fn was_healthy(&self) -> bool {
        self.was_healthy.load(Ordering::Acquire)
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    fn connection(&self) -> Option<Conn> {
        self.conn.read().ok().and_then(|g| g.clone())
    }

    fn set_connection(&self, c: Option<Conn>) {
        if let Ok(mut g) = self.conn.write() {
            *g = c;
        }
    }

    /// One health probe: (re)connect if needed, then PING.
    pub async fn probe(&self) -> bool {
        let conn = match self.connection() {
            Some(c) => Some(c),
            None => match tokio::time::timeout(Duration::from_secs(1), self.source.connect()).await
            {
                Ok(Ok(c)) => {
                    self.set_connection(Some(c.clone()));
                    Some(c)
                }
                _ => None,
            },
        };
        let ok = match conn {
            Some(mut c) => {
                let pong: Result<Result<String, _>, _> = tokio::time::timeout(
                    OP_TIMEOUT,
                    redis::cmd("PING").query_async::<String>(&mut c),
                )
                .await;
                matches!(pong, Ok(Ok(ref p)) if p == "PONG")
            }
            None => false,
        };
        if !ok {
            self.set_connection(None);
        }
        let ok = ok && self.subscribed.load(Ordering::Acquire) && self.heartbeat_fresh();
        if ok {
            // The next probe checks that this one came back through the subscription.
            let mut cmd = redis::cmd("PUBLISH");
            cmd.arg(EVENTS_CHANNEL).arg(&self.heartbeat);
            if let Some(mut c) = self.connection() {
                let _ = tokio::time::timeout(OP_TIMEOUT, cmd.query_async::<i64>(&mut c)).await;
            }
        }
        let was = self.healthy.swap(ok, Ordering::AcqRel);
        if ok {
            self.was_healthy.store(true, Ordering::Release);
        }
        if ok && !was {
            self.epoch.fetch_add(1, Ordering::AcqRel);
            tracing::info!("redis is reachable");
        } else if !ok && was {
            tracing::warn!("redis is unreachable; denying every request until it returns");
        }
        metrics::gauge!("aegis_dependency_up", "dependency" => "redis").set(if ok {
            1.0
        } else {
            0.0
        });
        ok
    }

    /// Probes forever (and keeps the events subscription up).
    pub async fn monitor(self: Arc<Self>) {
        tokio::spawn(self.clone().listen());
        let mut tick = tokio::time::interval(PING_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.probe().await;
        }
    }

    /// A failed command; a lost connection turns the link down at once (every Check denies
    /// from now on), not at the next probe.
    fn failed(&self, e: redis::RedisError) -> RedisError {
        if e.is_connection_dropped() || e.is_io_error() || e.is_connection_refusal() {
            self.down("command connection lost");
        }
        RedisError::Op(e)
    }

    /// Marks the link down now; the monitor brings it back (and bumps the epoch, so L1 is
    /// flushed) once Redis answers again.
    fn down(&self, why: &'static str) {
        self.set_connection(None);
        if self.healthy.swap(false, Ordering::AcqRel) {
            tracing::warn!(
                why,
                "redis link lost; denying every request until it returns"
            );
            metrics::gauge!("aegis_dependency_up", "dependency" => "redis").set(0.0);
        }
    }

    fn live(&self) -> Result<Conn, RedisError> {
        if !self.healthy() {
            return Err(RedisError::Down);
        }
        self.connection().ok_or(RedisError::Down)
    }

    /// Runs one command on the live connection (fails fast while the link is down).
    pub async fn run<T: redis::FromRedisValue>(&self, cmd: redis::Cmd) -> Result<T, RedisError> {
        let mut c = self.live()?;
        match tokio::time::timeout(OP_TIMEOUT, cmd.query_async::<T>(&mut c)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.failed(e)),
            Err(_) => Err(RedisError::Timeout),
        }
    }

    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, RedisError> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(key);
        self.run(cmd).await
    }

    pub async fn set_px(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), RedisError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key)
            .arg(value)
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64);
        self.run(cmd).await
    }

    /// `SET key value NX PX ttl`: true when this call took the key.
    pub async fn set_nx_px(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<bool, RedisError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key)
            .arg(value)
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64);
        let r: Option<String> = self.run(cmd).await?;
        Ok(r.is_some())
    }

    /// Deletes `key` only while it still holds `value` (a lock we own, not one that expired and
    /// was taken by someone else).
    pub async fn release(&self, key: &str, value: &str) -> Result<bool, RedisError> {
        let mut c = self.live()?;
        let script = redis::Script::new(
            "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end",
        );
        let mut inv = script.key(key);
        inv.arg(value);
        match tokio::time::timeout(OP_TIMEOUT, inv.invoke_async::<i64>(&mut c)).await {
            Ok(Ok(n)) => Ok(n == 1),
            Ok(Err(e)) => Err(self.failed(e)),
            Err(_) => Err(RedisError::Timeout),
        }
    }

    /// Runs a Lua script (EVALSHA, loading it on first use) on the live connection.
    pub async fn script<T: redis::FromRedisValue>(
        &self,
        script: &redis::Script,
        keys: &[&str],
        args: &[&[u8]],
    ) -> Result<T, RedisError> {
        let mut c = self.live()?;
        let mut inv = script.prepare_invoke();
        for k in keys {
            inv.key(*k);
        }
        for a in args {
            inv.arg(*a);
        }
        match tokio::time::timeout(OP_TIMEOUT, inv.invoke_async::<T>(&mut c)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.failed(e)),
            Err(_) => Err(RedisError::Timeout),
        }
    }

    pub async fn del(&self, keys: &[String]) -> Result<u64, RedisError> {
        let mut cmd = redis::cmd("DEL");
        cmd.arg(keys);
        self.run(cmd).await
    }
}

// === Topologies ===

enum Source {
    Standalone(redis::Client),
    Cluster {
        cluster: redis::cluster::ClusterClient,
        /// One client per node: pub/sub messages are broadcast cluster-wide, so a subscription
        /// on any node hears them; on failure the next node is tried.
        nodes: Vec<redis::Client>,
        next: AtomicU64,
    },
    Sentinel(tokio::sync::Mutex<redis::sentinel::SentinelClient>),
}

impl Source {
    async fn connect(&self) -> Result<Conn, redis::RedisError> {
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(Some(OP_TIMEOUT));
        match self {
            Source::Standalone(c) => Ok(Conn::Single(
                c.get_multiplexed_async_connection_with_config(&cfg).await?,
            )),
            Source::Cluster { cluster, .. } => {
                Ok(Conn::Cluster(cluster.get_async_connection().await?))
            }
            Source::Sentinel(s) => {
                // Asks the sentinels for the current primary on every reconnect (failover).
                let client = s.lock().await.async_get_client().await?;
                Ok(Conn::Single(
                    client
                        .get_multiplexed_async_connection_with_config(&cfg)
                        .await?,
                ))
            }
        }
    }

    async fn pubsub_client(&self) -> Result<redis::Client, redis::RedisError> {
        match self {
            Source::Standalone(c) => Ok(c.clone()),
            Source::Cluster { nodes, next, .. } => {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize % nodes.len().max(1);
                nodes.get(i).cloned().ok_or_else(|| {
                    redis::RedisError::from((redis::ErrorKind::Client, "no cluster nodes"))
                })
            }
            Source::Sentinel(s) => s.lock().await.async_get_client().await,
        }
    }
}

/// A command connection to one node or to a cluster.
#[derive(Clone)]
enum Conn {
    Single(MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}
