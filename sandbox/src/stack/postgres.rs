//! A throwaway PostgreSQL cluster on a free loopback port, with the `aegis` role and database.
//!
//! `initdb` and `postgres` refuse to run as root; when the harness is root (CI, the dev box)
//! they run as the `postgres` OS user, so the data directory is chowned to it and every parent
//! directory must be traversable by it (see [`postgres_can_use`]).

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rustix::process::Signal;
use tokio_postgres::{Client, NoTls};

use super::process::{
    free_port, postgres_bin_dir, read_log, run_bounded, Child, ErrorKind, StackError,
};

const INITDB_TIMEOUT: Duration = Duration::from_secs(120);
const START_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
const PORT_ATTEMPTS: usize = 3;
/// The cluster's superuser (initdb `-U`).
const SUPERUSER: &str = "postgres";
/// The role and database aegis uses.
const SERVICE_ROLE: &str = "aegis";
/// Room for `/.s.PGSQL.<port>` inside `sun_path` (108 bytes on Linux).
const MAX_SOCKET_DIR_LEN: usize = 90;

/// A PostgreSQL server (postmaster) run from a fresh `initdb`. Shut down on drop.
pub struct PostgresServer {
    bin_dir: PathBuf,
    dir: PathBuf,
    port: u16,
    os_user: Option<(u32, u32)>,
    child: Option<Child>,
    /// fsync and full page writes on (benchmarks); off for tests.
    durable: bool,
}

// === impl PostgresServer ===

impl PostgresServer {
    /// Runs `initdb` into `<dir>/data` (trust auth), starts `postgres` on a free port and creates
    /// the `aegis` login role and the `aegis` database it owns.
    pub async fn start(dir: impl AsRef<Path>) -> Result<Self, StackError> {
        Self::start_with(dir, false).await
    }

    /// Like [`PostgresServer::start`], but with `fsync` and full page writes on: what a
    /// production server does, for benchmarks of durable commits.
    pub async fn start_durable(dir: impl AsRef<Path>) -> Result<Self, StackError> {
        Self::start_with(dir, true).await
    }

    async fn start_with(dir: impl AsRef<Path>, durable: bool) -> Result<Self, StackError> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| {
            StackError::io(format!("creating the postgres dir {}", dir.display()), e)
        })?;
        let dir = dir.canonicalize().map_err(|e| {
            StackError::io(format!("resolving the postgres dir {}", dir.display()), e)
        })?;
        let os_user = postgres_os_user()?;
        if let Some((uid, gid)) = os_user {
            if let Some(blocked) = untraversable_ancestor(&dir) {
                return Err(StackError::new(
                    ErrorKind::Config,
                    "preparing the postgres dir",
                    format!(
                        "the postgres os user cannot reach {}: {} is not traversable by others \
                         (use a directory under /tmp)",
                        dir.display(),
                        blocked.display()
                    ),
                ));
            }
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).map_err(|e| {
                StackError::io(format!("chowning {} to postgres", dir.display()), e)
            })?;
        }
        let mut server = Self {
            bin_dir: postgres_bin_dir()?,
            dir,
            port: 0,
            os_user,
            child: None,
            durable,
        };
        server.initdb().await?;

        let mut attempt = 0;
        loop {
            attempt += 1;
            server.port = free_port()?;
            match server.launch().await {
                Ok(()) => break,
                Err(err)
                    if attempt < PORT_ATTEMPTS && server.log_mentions("Address already in use") =>
                {
                    tracing::debug!(%err, "postgres port taken, retrying");
                }
                Err(err) => return Err(err),
            }
        }
        // Two calls: CREATE DATABASE refuses the implicit transaction of a multi-statement query.
        server
            .batch_execute_on("postgres", &format!("CREATE ROLE {SERVICE_ROLE} LOGIN"))
            .await?;
        server
            .batch_execute_on(
                "postgres",
                &format!("CREATE DATABASE {SERVICE_ROLE} OWNER {SERVICE_ROLE}"),
            )
            .await?;
        Ok(server)
    }

    /// A streaming standby of this server in `dir`: `pg_basebackup -R` (a base backup plus
    /// `standby.signal` and `primary_conninfo`), started on a free port. It replays this
    /// server's WAL until [`PostgresServer::promote`]. Same durability settings as this one.
    pub async fn start_standby(&self, dir: impl AsRef<Path>) -> Result<Self, StackError> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir)
            .map_err(|e| StackError::io(format!("creating {}", dir.display()), e))?;
        let dir = dir
            .canonicalize()
            .map_err(|e| StackError::io(format!("resolving {}", dir.display()), e))?;
        if let Some((uid, gid)) = self.os_user {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).map_err(|e| {
                StackError::io(format!("chowning {} to postgres", dir.display()), e)
            })?;
        }
        let mut standby = Self {
            bin_dir: self.bin_dir.clone(),
            dir,
            port: 0,
            os_user: self.os_user,
            child: None,
            durable: self.durable,
        };
        let mut cmd = standby.command("pg_basebackup");
        cmd.arg("-D")
            .arg(standby.data_dir())
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", SUPERUSER, "-R", "-X", "stream", "--no-sync"])
            .args(["--checkpoint", "fast"]);
        run_bounded(
            "pg_basebackup",
            cmd,
            &standby.dir.join("basebackup.log"),
            INITDB_TIMEOUT,
        )
        .await?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            standby.port = free_port()?;
            match standby.launch().await {
                Ok(()) => return Ok(standby),
                Err(err)
                    if attempt < PORT_ATTEMPTS
                        && standby.log_mentions("Address already in use") =>
                {
                    tracing::debug!(%err, "postgres port taken, retrying");
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// Promotes a standby to primary (`pg_promote()`, waiting until it is done).
    pub async fn promote(&self) -> Result<(), StackError> {
        self.batch_execute_on("postgres", "SELECT pg_promote(true, 30)")
            .await
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://aegis@127.0.0.1:<port>/aegis`: the service's own role.
    pub fn url(&self) -> String {
        format!(
            "postgres://{SERVICE_ROLE}@127.0.0.1:{}/{SERVICE_ROLE}",
            self.port
        )
    }

    /// `postgres://postgres@127.0.0.1:<port>/aegis`: the cluster superuser, on aegis' database.
    pub fn superuser_url(&self) -> String {
        format!(
            "postgres://{SUPERUSER}@127.0.0.1:{}/{SERVICE_ROLE}",
            self.port
        )
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.exit_status().is_none())
    }

    /// Fast shutdown (SIGINT: roll back open transactions, disconnect, checkpoint), bounded;
    /// SIGKILL if it does not finish in time.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.signal(Signal::INT);
            if !child.wait_exit(STOP_TIMEOUT).await {
                tracing::warn!("postgres did not stop within {STOP_TIMEOUT:?}; killing it");
                child.kill();
            }
        }
    }

    /// SIGKILL to the postmaster, as a crash would. Its backends notice and exit on their own.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill();
        }
    }

    /// Starts the server again on the same port and data directory (after `stop` or `kill`).
    pub async fn start_again(&mut self) -> Result<(), StackError> {
        self.stop().await;
        // After a SIGKILL the old backends may still hold the shared memory segment for a
        // moment, and postgres refuses to start until they are gone: retry for a short while.
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let mark = read_log(&self.log_path()).len();
            match self.launch().await {
                Ok(()) => return Ok(()),
                Err(err) => {
                    let new_lines = read_log(&self.log_path())
                        .get(mark..)
                        .unwrap_or_default()
                        .to_owned();
                    let transient =
                        new_lines.contains("is still in use") || new_lines.contains("lock file");
                    if !transient || Instant::now() >= deadline {
                        return Err(err);
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// A superuser connection to the `aegis` database; its connection task runs on the current
    /// runtime.
    pub async fn connect_superuser(&self) -> Result<Client, StackError> {
        self.connect(SUPERUSER, SERVICE_ROLE).await
    }

    /// Runs one statement as superuser on the `aegis` database; the number of rows it touched.
    pub async fn execute(&self, sql: &str) -> Result<u64, StackError> {
        let client = self.connect_superuser().await?;
        client.execute(sql, &[]).await.map_err(|e| {
            StackError::new(
                ErrorKind::Postgres,
                format!("executing `{sql}`"),
                db_error(&e),
            )
        })
    }

    /// Runs any number of `;`-separated statements as superuser on the `aegis` database.
    pub async fn batch_execute(&self, sql: &str) -> Result<(), StackError> {
        self.batch_execute_on(SERVICE_ROLE, sql).await
    }

    /// Runs a query as superuser on the `aegis` database and returns each row as a JSON object
    /// (column name -> value, typed as `row_to_json` types it). `sql` must be a single query
    /// usable as a subquery (a SELECT, VALUES or TABLE).
    pub async fn query_json(&self, sql: &str) -> Result<Vec<serde_json::Value>, StackError> {
        let client = self.connect_superuser().await?;
        let inner = sql.trim().trim_end_matches(';');
        let wrapped = format!("SELECT row_to_json(q)::text FROM ({inner}) AS q");
        let rows = client.query(wrapped.as_str(), &[]).await.map_err(|e| {
            StackError::new(
                ErrorKind::Postgres,
                format!("querying `{inner}`"),
                db_error(&e),
            )
        })?;
        rows.iter()
            .map(|row| {
                let text: String = row
                    .try_get(0)
                    .map_err(|e| StackError::new(ErrorKind::Postgres, "reading a row", e))?;
                serde_json::from_str(&text)
                    .map_err(|e| StackError::new(ErrorKind::Postgres, "decoding a row", e))
            })
            .collect()
    }

    // --- internals ---

    fn command(&self, program: &str) -> Command {
        // The bin dir may hold only links to a few server binaries (initdb, postgres): other
        // programs (pg_basebackup) live beside the real `postgres`.
        let mut bin = self.bin_dir.join(program);
        if !bin.exists() {
            if let Ok(real) = self.bin_dir.join("postgres").canonicalize() {
                if let Some(dir) = real.parent() {
                    bin = dir.join(program);
                }
            }
        }
        let mut cmd = Command::new(bin);
        cmd.current_dir(&self.dir);
        if let Some((uid, gid)) = self.os_user {
            // std drops supplementary groups too when it changes uid as root.
            cmd.uid(uid).gid(gid);
            cmd.env("HOME", &self.dir)
                .env("USER", SUPERUSER)
                .env("LOGNAME", SUPERUSER);
        }
        cmd
    }

    async fn initdb(&self) -> Result<(), StackError> {
        let mut cmd = self.command("initdb");
        cmd.arg("-D").arg(self.data_dir()).args([
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        run_bounded("initdb", cmd, &self.dir.join("initdb.log"), INITDB_TIMEOUT).await
    }

    async fn launch(&mut self) -> Result<(), StackError> {
        let socket_dir = if self.dir.as_os_str().len() <= MAX_SOCKET_DIR_LEN {
            self.dir.to_string_lossy().into_owned()
        } else {
            String::new() // no unix socket at all; everything uses TCP
        };
        let mut cmd = self.command("postgres");
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-p", &self.port.to_string()])
            .args(["-k", &socket_dir])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "max_connections=200"]);
        if !self.durable {
            // Speed without losing what a process crash (`kill`) must keep: commits still write
            // their WAL before returning (synchronous_commit stays on), only the fsync to disk
            // is skipped, which matters for a machine crash alone.
            cmd.args(["-c", "fsync=off"])
                .args(["-c", "full_page_writes=off"]);
        }
        let log = self.log_path();
        let mut child = Child::spawn("postgres", cmd, &log)?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            child.ensure_running("starting postgres")?;
            match self.connect(SUPERUSER, "postgres").await {
                Ok(_) => {
                    self.child = Some(child);
                    return Ok(());
                }
                Err(err) if Instant::now() >= deadline => {
                    return Err(StackError::new(
                        ErrorKind::Timeout,
                        "starting postgres",
                        format!("not accepting connections within {START_TIMEOUT:?} ({err})"),
                    )
                    .with_log(&log));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    fn log_mentions(&self, needle: &str) -> bool {
        read_log(&self.log_path()).contains(needle)
    }

    async fn connect(&self, user: &str, dbname: &str) -> Result<Client, StackError> {
        let (client, connection) = tokio_postgres::Config::new()
            .host("127.0.0.1")
            .port(self.port)
            .user(user)
            .dbname(dbname)
            .connect_timeout(Duration::from_secs(5))
            .connect(NoTls)
            .await
            .map_err(|e| {
                StackError::new(
                    ErrorKind::Postgres,
                    format!(
                        "connecting to postgres on 127.0.0.1:{} as {user}",
                        self.port
                    ),
                    db_error(&e),
                )
            })?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    async fn batch_execute_on(&self, dbname: &str, sql: &str) -> Result<(), StackError> {
        let client = self.connect(SUPERUSER, dbname).await?;
        client.batch_execute(sql).await.map_err(|e| {
            StackError::new(
                ErrorKind::Postgres,
                format!("executing `{sql}`"),
                db_error(&e),
            )
        })
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Immediate shutdown: the postmaster takes its backends down with it.
            child.signal(Signal::QUIT);
            if !child.wait_exit_blocking(Duration::from_secs(5)) {
                child.kill();
            }
        }
    }
}

/// The server's own message for a database error, not just "db error".
fn db_error(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => err.to_string(),
    }
}

/// When the harness runs as root: the uid and gid of the `postgres` OS user (Debian's package
/// creates it). None when not root, since then the servers run as the current user.
fn postgres_os_user() -> Result<Option<(u32, u32)>, StackError> {
    if !rustix::process::geteuid().is_root() {
        return Ok(None);
    }
    let id = |flag: &str| -> Result<u32, StackError> {
        let out = Command::new("id")
            .args([flag, SUPERUSER])
            .output()
            .map_err(|e| StackError::io("looking up the postgres os user", e))?;
        if !out.status.success() {
            return Err(StackError::new(
                ErrorKind::MissingBinary,
                "looking up the postgres os user",
                "initdb refuses root and there is no `postgres` user: run `make setup`",
            ));
        }
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .map_err(|e| StackError::new(ErrorKind::Io, "looking up the postgres os user", e))
    };
    Ok(Some((id("-u")?, id("-g")?)))
}

/// The first ancestor of `dir` that others cannot traverse (no `o+x`), if any.
fn untraversable_ancestor(dir: &Path) -> Option<PathBuf> {
    dir.ancestors().skip(1).find_map(|ancestor| {
        let mode = std::fs::metadata(ancestor).ok()?.permissions().mode();
        (mode & 0o001 == 0).then(|| ancestor.to_path_buf())
    })
}

/// Whether [`PostgresServer::start`] can use `dir`: always when not root, else when the
/// `postgres` OS user can traverse every existing parent of `dir` (the ones still to be created
/// get the default, traversable mode).
pub fn postgres_can_use(dir: &Path) -> bool {
    if !rustix::process::geteuid().is_root() {
        return true;
    }
    resolve(dir).is_some_and(|dir| untraversable_ancestor(&dir).is_none())
}

/// `dir` made absolute with its existing part's symlinks resolved; it need not exist.
fn resolve(dir: &Path) -> Option<PathBuf> {
    let mut existing = std::path::absolute(dir).ok()?;
    let mut rest = Vec::new();
    while !existing.exists() {
        rest.push(existing.file_name()?.to_owned());
        existing = existing.parent()?.to_path_buf();
    }
    let mut resolved = existing.canonicalize().ok()?;
    resolved.extend(rest.iter().rev());
    Some(resolved)
}
