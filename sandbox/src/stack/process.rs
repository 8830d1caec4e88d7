//! The pieces every server wrapper shares: the error type, child processes that die with their
//! owner, free loopback ports, binary discovery and bounded waits.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};

/// How many lines of a server's log an error carries.
const LOG_TAIL_LINES: usize = 40;

// === impl StackError ===

/// What kind of step failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// A program the harness runs is not installed (run `make setup`).
    MissingBinary,
    /// A file or socket operation failed.
    Io,
    /// A server exited while it was starting or was expected to run.
    Exited,
    /// A bounded wait ran out.
    Timeout,
    /// A server answered, but not what the caller expected.
    Unexpected,
    /// A SQL statement or a connection to PostgreSQL failed.
    Postgres,
    /// An HTTP request to a server failed.
    Http,
    /// A config file or template is not what the harness expects.
    Config,
}

/// An error from the harness, naming the step that failed and, where a server was involved, the
/// tail of that server's log.
pub struct StackError {
    kind: ErrorKind,
    context: Cow<'static, str>,
    detail: String,
    log: Option<(PathBuf, String)>,
}

impl StackError {
    pub fn new(
        kind: ErrorKind,
        context: impl Into<Cow<'static, str>>,
        detail: impl fmt::Display,
    ) -> Self {
        Self {
            kind,
            context: context.into(),
            detail: detail.to_string(),
            log: None,
        }
    }

    pub fn io(context: impl Into<Cow<'static, str>>, err: impl fmt::Display) -> Self {
        Self::new(ErrorKind::Io, context, err)
    }

    /// Attaches the last lines of the log at `path`.
    pub fn with_log(mut self, path: &Path) -> Self {
        self.log = Some((path.to_path_buf(), log_tail(path, LOG_TAIL_LINES)));
        self
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn context(&self) -> &str {
        &self.context
    }

    /// The log lines attached with [`StackError::with_log`], if any.
    pub fn log_tail(&self) -> Option<&str> {
        self.log.as_ref().map(|(_, tail)| tail.as_str())
    }
}

impl fmt::Display for StackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.context, self.detail)?;
        if let Some((path, tail)) = &self.log {
            write!(
                f,
                "\n--- last lines of {} ---\n{}",
                path.display(),
                tail.trim_end()
            )?;
            write!(f, "\n--- end of {} ---", path.display())?;
        }
        Ok(())
    }
}

// `Result::expect` in tests prints `Debug`: make it as readable as `Display`.
impl fmt::Debug for StackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for StackError {}

/// The last `lines` lines of a log file (or a note saying why there are none).
pub fn log_tail(path: &Path, lines: usize) -> String {
    const MAX_BYTES: u64 = 64 * 1024;
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(err) => return format!("(no log: {err})"),
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if len > MAX_BYTES {
        let _ = file.seek(SeekFrom::Start(len - MAX_BYTES));
    }
    let mut bytes = Vec::new();
    if let Err(err) = file.read_to_end(&mut bytes) {
        return format!("(log unreadable: {err})");
    }
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    if all.is_empty() {
        return "(log is empty)".to_owned();
    }
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Reads a whole log file, lossily, or an empty string when it does not exist.
pub fn read_log(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

// === impl Child ===

/// A child process with its output in a log file, killed (SIGKILL) and reaped on drop so that a
/// panicking test leaves no server behind.
pub(crate) struct Child {
    name: &'static str,
    inner: std::process::Child,
    log: PathBuf,
    exited: Option<ExitStatus>,
}

impl Child {
    /// Spawns `cmd` with stdin closed and stdout and stderr appended to `log`.
    pub(crate) fn spawn(
        name: &'static str,
        mut cmd: Command,
        log: &Path,
    ) -> Result<Self, StackError> {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| StackError::io(format!("opening the {name} log {}", log.display()), e))?;
        let err = out
            .try_clone()
            .map_err(|e| StackError::io(format!("opening the {name} log {}", log.display()), e))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let inner = cmd.spawn().map_err(|e| {
            let kind = if e.kind() == std::io::ErrorKind::NotFound {
                ErrorKind::MissingBinary
            } else {
                ErrorKind::Io
            };
            StackError::new(
                kind,
                format!("starting {name} ({:?})", cmd.get_program()),
                e,
            )
        })?;
        Ok(Self {
            name,
            inner,
            log: log.to_path_buf(),
            exited: None,
        })
    }

    pub(crate) fn id(&self) -> u32 {
        self.inner.id()
    }

    pub(crate) fn log(&self) -> &Path {
        &self.log
    }

    /// The exit status, if the process has exited.
    pub(crate) fn exit_status(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.inner.try_wait().ok().flatten();
        }
        self.exited
    }

    /// An `Exited` error with the log tail if the process is no longer running.
    pub(crate) fn ensure_running(&mut self, context: &'static str) -> Result<(), StackError> {
        match self.exit_status() {
            None => Ok(()),
            Some(status) => Err(StackError::new(
                ErrorKind::Exited,
                context,
                format!("{} exited ({status})", self.name),
            )
            .with_log(&self.log)),
        }
    }

    /// Sends `signal`; a process that already exited is not an error.
    pub(crate) fn signal(&mut self, signal: Signal) {
        if self.exit_status().is_none() {
            if let Some(pid) = Pid::from_raw(self.inner.id() as i32) {
                let _ = kill_process(pid, signal);
            }
        }
    }

    /// Waits up to `timeout` for the process to exit; true when it did.
    pub(crate) async fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.exit_status().is_some() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Like `wait_exit`, for `Drop` where there is no runtime to await on.
    pub(crate) fn wait_exit_blocking(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.exit_status().is_some() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL and reap.
    pub(crate) fn kill(&mut self) {
        if self.exit_status().is_none() {
            let _ = self.inner.kill();
            self.exited = self.inner.wait().ok();
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.kill();
    }
}

// === ports ===

/// Ports this process has handed out, so two servers started at once never get the same one.
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A loopback port that nothing listens on right now and that this process has not handed out
/// before.
pub fn free_port() -> Result<u16, StackError> {
    for _ in 0..64 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(|e| StackError::io("finding a free loopback port", e))?;
        let port = listener
            .local_addr()
            .map_err(|e| StackError::io("finding a free loopback port", e))?
            .port();
        let mut handed = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
        if handed.insert(port) {
            return Ok(port);
        }
    }
    Err(StackError::new(
        ErrorKind::Io,
        "finding a free loopback port",
        "the kernel kept returning ports already handed out",
    ))
}

/// `127.0.0.1:<free port>`.
pub fn free_addr() -> Result<SocketAddr, StackError> {
    Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?)))
}

// === binaries ===

/// The workspace root: the parent of the sandbox crate.
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// `name` on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn missing(what: &str, detail: String) -> StackError {
    StackError::new(
        ErrorKind::MissingBinary,
        format!("finding {what}"),
        format!("{detail}: run `make setup` (scripts/bootstrap.sh)"),
    )
}

/// An executable given by the env var `var`, which must exist when set.
fn from_env(var: &str, what: &str) -> Result<Option<PathBuf>, StackError> {
    match std::env::var_os(var) {
        Some(path) if !path.is_empty() => {
            let path = PathBuf::from(path);
            if is_executable(&path) {
                Ok(Some(path))
            } else {
                Err(missing(
                    what,
                    format!(
                        "${var} points at {}, which is not an executable",
                        path.display()
                    ),
                ))
            }
        }
        _ => Ok(None),
    }
}

/// The Envoy binary: `$AEGIS_ENVOY_BIN`, else `<workspace>/.venv/bin/envoy`.
pub fn envoy_bin() -> Result<PathBuf, StackError> {
    if let Some(path) = from_env("AEGIS_ENVOY_BIN", "envoy")? {
        return Ok(path);
    }
    let path = workspace_root().join(".venv/bin/envoy");
    if is_executable(&path) {
        Ok(path)
    } else {
        Err(missing(
            "envoy",
            format!("{} does not exist", path.display()),
        ))
    }
}

/// `redis-server`: `$AEGIS_REDIS_BIN`, else on PATH, else `/usr/bin/redis-server`.
pub fn redis_bin() -> Result<PathBuf, StackError> {
    if let Some(path) = from_env("AEGIS_REDIS_BIN", "redis-server")? {
        return Ok(path);
    }
    which("redis-server")
        .or_else(|| Some(PathBuf::from("/usr/bin/redis-server")).filter(|p| is_executable(p)))
        .ok_or_else(|| missing("redis-server", "redis-server is not on PATH".to_owned()))
}

/// The directory holding `initdb` and `postgres`: `$AEGIS_PG_BIN_DIR`, else where they are on
/// PATH, else the newest `/usr/lib/postgresql/<version>/bin` (Debian keeps them off PATH).
pub fn postgres_bin_dir() -> Result<PathBuf, StackError> {
    let complete =
        |dir: &Path| is_executable(&dir.join("initdb")) && is_executable(&dir.join("postgres"));
    if let Some(dir) = std::env::var_os("AEGIS_PG_BIN_DIR").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        return if complete(&dir) {
            Ok(dir)
        } else {
            Err(missing(
                "postgresql",
                format!(
                    "$AEGIS_PG_BIN_DIR={} holds no initdb and postgres",
                    dir.display()
                ),
            ))
        };
    }
    if let (Some(initdb), Some(_)) = (which("initdb"), which("postgres")) {
        // Debian's /usr/local/bin links resolve to the versioned directory; either works.
        if let Some(dir) = initdb.parent().filter(|d| complete(d)) {
            return Ok(dir.to_path_buf());
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            complete(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, dir)| dir).ok_or_else(|| {
        missing(
            "postgresql",
            "no initdb on PATH or under /usr/lib/postgresql/*/bin".to_owned(),
        )
    })
}

// === waits ===

/// Runs `cmd` to completion with output to `log`, bounded by `timeout`; a non-zero exit or a
/// time-out is an error carrying the log tail.
pub(crate) async fn run_bounded(
    name: &'static str,
    cmd: Command,
    log: &Path,
    timeout: Duration,
) -> Result<(), StackError> {
    let mut child = Child::spawn(name, cmd, log)?;
    if !child.wait_exit(timeout).await {
        child.kill();
        return Err(StackError::new(
            ErrorKind::Timeout,
            format!("running {name}"),
            format!("still running after {timeout:?}"),
        )
        .with_log(log));
    }
    match child.exit_status() {
        Some(status) if status.success() => Ok(()),
        status => Err(StackError::new(
            ErrorKind::Exited,
            format!("running {name}"),
            format!(
                "failed ({})",
                status.map(|s| s.to_string()).unwrap_or_default()
            ),
        )
        .with_log(log)),
    }
}

/// A reqwest client for loopback servers: never through a proxy from the environment.
pub(crate) fn http_client(timeout: Duration) -> Result<reqwest::Client, StackError> {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(timeout)
        .build()
        .map_err(|e| StackError::new(ErrorKind::Http, "building an http client", e))
}
