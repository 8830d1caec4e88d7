//! Typed configuration, read from TOML with collect-all-errors validation.
//!
//! Every setting is parsed and every problem is reported at once (`aegis config check` exits 64
//! listing them all). Nothing is silently defaulted: a key that is present but wrong is an error,
//! an unknown key is an error, and a missing optional key takes the default documented in the
//! README's config reference (the `DEFAULT_*` constants below).
//!
//! The file's sections are `#[serde(default, deny_unknown_fields)]` structs (the structs are the
//! key lists); each has a `validate` that reports through one collector and builds the resolved
//! types the rest of aegis uses ([`Config`] and its parts).
//!
//! The process environment is read through the small [`Env`] trait so tests never touch it.
//! Strings may reference `${VAR}` (and `$$` for a literal `$`); every `*_file` key may instead be
//! given as the env variable `AEGIS_<SECTION>_<KEY>` (e.g. `AEGIS_AUDIT_HMAC_KEY`) holding the
//! file's content.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use jsonwebtoken::Algorithm;
use serde::de::value::MapAccessDeserializer;
use serde::de::{DeserializeOwned, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_path_to_error::Segment;
use toml::{Table, Value};

use crate::secret::{Key32, SecretString};
use crate::tlog::Witness;

// === Env ===

/// Read access to environment variables.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Env for HashMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

// === Errors ===

/// One problem with one setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted path of the setting, e.g. `issuers[0].audiences`.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in a config.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl std::error::Error for ConfigErrors {}

// === Defaults ===
// What a missing key means; the README's config reference names the same values.

pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_millis(1800);
pub const DEFAULT_WORKER_THREADS: usize = 1;
/// The most `server.worker_threads` may be.
pub const MAX_WORKER_THREADS: i64 = 256;
pub const DEFAULT_MIGRATE_ON_START: bool = true;
pub const DEFAULT_MAX_CLOCK_SKEW: Duration = Duration::from_secs(5);
pub const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_WITNESS_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_KEY_AGE: Duration = Duration::from_secs(24 * 3600);
pub const DEFAULT_SAMPLE_RATIO: f64 = 1.0;
pub const DEFAULT_SERVICE_NAME: &str = "aegis";

// === Config ===

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub admin: AdminConfig,
    pub redis: RedisConfig,
    pub postgres: PostgresConfig,
    pub audit: AuditConfig,
    pub issuers: Vec<IssuerConfig>,
    pub workspaces: Vec<WorkspaceConfig>,
    pub policy: PolicyConfig,
    /// OpenTelemetry trace export (`[tracing]`); off when absent.
    pub tracing: Option<TracingConfig>,
}

/// How spans are exported over OTLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// OTLP/gRPC (`opentelemetry.proto.collector.trace.v1.TraceService/Export`).
    Grpc,
    /// OTLP/HTTP with protobuf bodies (`POST <endpoint>/v1/traces`).
    Http,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TracingConfig {
    pub otlp_endpoint: url::Url,
    pub protocol: OtlpProtocol,
    /// The share of new traces sampled (0.0 to 1.0); a trace whose parent (Envoy's
    /// `traceparent`) is sampled is always followed, one that is not never is.
    pub sample_ratio: f64,
    pub service_name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Whether `pem` holds a `-----BEGIN ...<label>-----` block.
fn pem_has(pem: &[u8], label: &str) -> bool {
    let text = String::from_utf8_lossy(pem);
    text.split("-----BEGIN ").skip(1).any(|rest| {
        rest.split("-----")
            .next()
            .is_some_and(|l| l.ends_with(label))
    })
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub grpc_listen: ListenAddr,
    pub admin_listen: SocketAddr,
    pub public_listen: Option<SocketAddr>,
    pub public_url: Option<url::Url>,
    pub instance_id: String,
    /// Upper bound on the whole Check (must fit inside Envoy's ext_authz timeout).
    pub check_timeout: Duration,
    /// Threads that run Checks: 1 (the default) runs everything on one thread, which costs the
    /// least CPU per Check (no cross-thread wake-ups); more spread Checks over that many.
    pub worker_threads: usize,
    /// mTLS on the gRPC listener. The listener hands out users' Databricks tokens, so a TCP
    /// address other than loopback needs it (or `grpc_allow_plaintext`).
    pub grpc_tls: Option<GrpcTls>,
    /// The operator's explicit opt-out of that rule (a trusted network; logged loudly).
    pub grpc_allow_plaintext: bool,
}

/// The gRPC listener's certificate and the CA its clients (Envoy) must present a certificate of.
#[derive(Clone)]
pub struct GrpcTls {
    pub cert_pem: Vec<u8>,
    pub key_pem: SecretString,
    pub client_ca_pem: Vec<u8>,
}

impl fmt::Debug for GrpcTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcTls").finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// The static console token, only while static sign-in is allowed: always without
    /// `[admin.oidc]`; with it, only when `allow_break_glass = true` (the break-glass sign-in).
    pub console_token: Option<SecretString>,
    /// Console sign-in through the IdP (`[admin.oidc]`); see [`ConsoleOidcConfig`].
    pub oidc: Option<ConsoleOidcConfig>,
}

#[derive(Clone)]
pub struct RedisConfig {
    pub topology: RedisTopology,
    /// PEM bundle of the CA that signs the Redis servers' certificates (`rediss://` with a
    /// private CA); the Mozilla roots otherwise.
    pub ca_pem: Option<Vec<u8>>,
    pub cache_key: Key32,
}

/// Where Redis is: one node (`url`), a cluster (`cluster_nodes`), or a Sentinel-managed
/// primary (`sentinels` + `sentinel_master`).
#[derive(Clone, PartialEq, Eq)]
pub enum RedisTopology {
    Standalone(String),
    Cluster(Vec<String>),
    Sentinel {
        sentinels: Vec<String>,
        master: String,
    },
}

impl fmt::Debug for RedisTopology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RedisTopology::Standalone(u) => write!(f, "Standalone({})", redact_url(u)),
            RedisTopology::Cluster(n) => {
                let n: Vec<_> = n.iter().map(|u| redact_url(u)).collect();
                write!(f, "Cluster({n:?})")
            }
            RedisTopology::Sentinel { sentinels, master } => {
                let s: Vec<_> = sentinels.iter().map(|u| redact_url(u)).collect();
                write!(f, "Sentinel({s:?}, {master})")
            }
        }
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("topology", &self.topology)
            .field("ca_pem", &self.ca_pem.is_some())
            .field("cache_key", &self.cache_key)
            .finish()
    }
}

#[derive(Clone)]
pub struct PostgresConfig {
    /// The serving role's connection (INSERT-only on the audit table is enough).
    pub url: String,
    /// An owner role's connection for `aegis migrate`; defaults to `url`.
    pub migrate_url: Option<String>,
    /// Create the schema at start when it is missing (needs an owner role in `url`).
    pub migrate_on_start: bool,
    /// The weakest `synchronous_commit` the audit writer accepts (it also sets it on its own
    /// session): `on` (default, a commit is flushed locally, or on the synchronous standbys if
    /// any) or `remote_apply` (applied on synchronous standbys, which must be configured).
    pub min_synchronous_commit: SyncCommit,
}

/// A workspace's request limits (`None`: no limit of that kind).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimits {
    pub user: Option<Rate>,
    pub agent: Option<Rate>,
    pub user_agent: Option<Rate>,
}

impl RateLimits {
    pub fn any(&self) -> bool {
        self.user.is_some() || self.agent.is_some() || self.user_agent.is_some()
    }
}

/// `N` requests per `per`, e.g. "600/min".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub requests: u64,
    pub per: Duration,
}

impl Rate {
    /// "N/s", "N/min" or "N/h", N from 1 to 1,000,000.
    pub fn parse(s: &str) -> Option<Rate> {
        let (n, unit) = s.trim().split_once('/')?;
        let requests: u64 = n
            .trim()
            .parse()
            .ok()
            .filter(|n| (1..=1_000_000).contains(n))?;
        let per = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            _ => return None,
        };
        Some(Rate { requests, per })
    }
}

/// `postgres.min_synchronous_commit`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SyncCommit {
    #[default]
    On,
    RemoteApply,
}

impl SyncCommit {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncCommit::On => "on",
            SyncCommit::RemoteApply => "remote_apply",
        }
    }
}

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &redact_url(&self.url))
            .field("migrate_url", &self.migrate_url.as_deref().map(redact_url))
            .field("migrate_on_start", &self.migrate_on_start)
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct AuditConfig {
    pub hmac_key: Key32,
    pub key_id: String,
    pub chain_id: String,
    pub checkpoint_signing_key: Key32,
    pub checkpoint_dir: PathBuf,
    pub checkpoint_interval: Duration,
    /// Retired HMAC keys by key id: old rows keep verifying after a rotation.
    pub previous_keys: Vec<(String, Key32)>,
    /// Refuse to serve when this host's clock is further than this from PostgreSQL's.
    pub max_clock_skew: Duration,
    /// The transparency log's origin line, also the name of its note key (default
    /// `aegis/<chain_id>`).
    pub tlog_origin: String,
    /// Where the transparency log is served read-only (`/checkpoint`, `/tile/...`); off when
    /// absent.
    pub tlog_listen: Option<SocketAddr>,
    /// Witnesses that cosign each checkpoint (`[[audit.witnesses]]`).
    pub witnesses: Vec<Witness>,
    /// Cosignatures a checkpoint needs to count as witnessed (default: every witness).
    pub witness_quorum: usize,
    pub witness_timeout: Duration,
    /// Keep the SQL (or command) text an agent sent in its audit row (record field 25); off
    /// by default: the row then holds the statement's kind and fingerprint only.
    pub record_statement_text: bool,
}

impl AuditConfig {
    /// Every HMAC key by id: the current one and the retired ones.
    pub fn keys(&self) -> HashMap<String, Key32> {
        let mut keys: HashMap<String, Key32> = self.previous_keys.iter().cloned().collect();
        keys.insert(self.key_id.clone(), self.hmac_key.clone());
        keys
    }
}

#[derive(Debug, Clone)]
pub struct IssuerConfig {
    pub name: String,
    pub issuer: String,
    pub audiences: Vec<String>,
    pub jwks_uri: Option<url::Url>,
    pub algorithms: Vec<Algorithm>,
    pub username_claim: String,
    pub agent_claim: String,
    pub leeway: Duration,
    /// How long a fetched key set may be used while the JWKS cannot be refreshed; past that,
    /// tokens of this issuer are denied (`dependency_unavailable`). Default 24h.
    pub max_key_age: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSourceKind {
    Federation,
    U2m,
    EntraObo,
}

impl TokenSourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenSourceKind::Federation => "federation",
            TokenSourceKind::U2m => "u2m",
            TokenSourceKind::EntraObo => "entra_obo",
        }
    }
}

#[derive(Debug, Clone)]
pub struct WorkspaceConfig {
    pub name: String,
    pub url: url::Url,
    pub hosts: Vec<String>,
    pub token_source: TokenSourceKind,
    pub client_id: Option<String>,
    pub scopes: Vec<String>,
    /// Per-workspace agent allowlist; `None` falls back to `policy.allowed_agents`.
    pub allowed_agents: Option<Vec<String>>,
    /// Request limits per user, per agent and per (user, agent), shared by every replica.
    pub rate_limits: RateLimits,
    /// The issuers (by `name`) whose users may reach this workspace; `None`: every issuer.
    pub issuers: Option<Vec<String>>,
    /// `entra_obo`: the Entra tenant (directory) id.
    pub tenant_id: Option<String>,
    /// `entra_obo`: the token endpoint; default
    /// `https://login.microsoftonline.com/{tenant_id}/oauth2/v2.0/token`.
    pub entra_token_url: Option<url::Url>,
    /// `entra_obo`: the confidential app's client secret (`client_secret_file` or env
    /// `AEGIS_WORKSPACE_<NAME>_CLIENT_SECRET`).
    pub client_secret: Option<SecretString>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    pub allowed_agents: Vec<String>,
    #[serde(deserialize_with = "tables")]
    pub deny: Vec<RuleConfig>,
    #[serde(deserialize_with = "tables")]
    pub allow: Vec<RuleConfig>,
    /// Agents (per workspace) that may run SQL the statement guardrail would block.
    #[serde(deserialize_with = "tables")]
    pub allow_statements: Vec<ScopeConfig>,
    /// Agents (per workspace) that may run Python, Scala and R through the command execution
    /// API (`/api/1.2/commands/execute`), which the guardrail refuses otherwise.
    #[serde(deserialize_with = "tables")]
    pub allow_commands: Vec<ScopeConfig>,
    /// MCP tools agents may not call.
    #[serde(deserialize_with = "tables")]
    pub tool_deny: Vec<ToolRuleConfig>,
    /// MCP tools agents may call: where a rule's server, agents and workspaces match, only the
    /// tools listed by such rules may be called.
    #[serde(deserialize_with = "tables")]
    pub tool_allow: Vec<ToolRuleConfig>,
}

/// One MCP tool rule: an MCP server path (exact, or a prefix ending in `/*`), tool names
/// (empty = every tool), agents and workspaces (empty = any).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ToolRuleConfig {
    pub server: String,
    pub tools: Vec<String>,
    pub agents: Vec<String>,
    pub workspaces: Vec<String>,
}

/// Who a rule applies to: agents and workspaces (empty = any).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScopeConfig {
    pub agents: Vec<String>,
    pub workspaces: Vec<String>,
}

/// One path rule: matches when the method, path pattern, agent and workspace all match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuleConfig {
    /// Upper-case methods; empty = any method.
    pub methods: Vec<String>,
    /// An exact path, or a prefix ending in `/*`.
    pub path: String,
    /// Empty = any agent.
    pub agents: Vec<String>,
    /// Empty = any workspace.
    pub workspaces: Vec<String>,
}

// === impl Config ===

impl Config {
    /// Reads and validates a config file; relative `*_file` paths resolve against its directory.
    pub fn load(path: &Path, env: &dyn Env) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                path: String::new(),
                message: format!("cannot read config file {}: {e}", path.display()),
            }])
        })?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        Config::parse(&text, base, env)
    }

    /// Parses config text; `base_dir` resolves relative file paths.
    pub fn parse(text: &str, base_dir: &Path, env: &dyn Env) -> Result<Config, ConfigErrors> {
        let doc: Table = toml::from_str(text).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                path: String::new(),
                message: format!("invalid TOML: {}", e.message()),
            }])
        })?;
        let mut e = Errors {
            list: Vec::new(),
            env,
            base_dir,
        };
        let mut doc = Value::Table(doc);
        e.deserialize::<ConfigFile>(&mut doc);
        e.expand_all(&mut doc, "");
        let cfg = e.deserialize::<ConfigFile>(&mut doc).validate(&mut e);
        match cfg {
            Some(cfg) if e.list.is_empty() => Ok(cfg),
            _ => {
                if e.list.is_empty() {
                    e.add("", "config is invalid");
                }
                Err(ConfigErrors(e.list))
            }
        }
    }

    /// Whether users of the issuer named `issuer_name` may reach `ws`.
    pub fn issuer_admitted(ws: &WorkspaceConfig, issuer_name: &str) -> bool {
        ws.issuers
            .as_ref()
            .is_none_or(|list| list.iter().any(|n| n == issuer_name))
    }

    /// Settings that are valid but risky, for `aegis config check` and the start-up log.
    ///
    /// Several issuers that can reach one workspace may assert the same user name for
    /// different people. aegis keeps their credentials apart (everything is keyed by issuer and
    /// subject), but Databricks only sees the user name, so each such issuer must be trusted
    /// to assert it.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.admin.oidc.is_some() && self.admin.console_token.is_some() {
            out.push(
                "admin.allow_break_glass = true: the static console token signs in as \"break-glass\" \
                 with every console role, next to IdP sign-in; switch it off once IdP sign-in works"
                    .to_string(),
            );
        }
        if let ListenAddr::Tcp(addr) = &self.server.grpc_listen {
            if self.server.grpc_tls.is_none() && !addr.ip().is_loopback() {
                out.push(format!(
                    "server.grpc_listen {addr} serves gRPC in plaintext on a non-loopback address \
                     (server.grpc_allow_plaintext = true): anyone who can reach it can obtain \
                     users' Databricks tokens; use mTLS unless this network is trusted"
                ));
            }
        }
        for (i, ws) in self.workspaces.iter().enumerate() {
            let reach: Vec<&IssuerConfig> = self
                .issuers
                .iter()
                .filter(|iss| Config::issuer_admitted(ws, &iss.name))
                .collect();
            if reach.len() < 2 {
                continue;
            }
            let names: Vec<String> = reach
                .iter()
                .map(|iss| format!("{} ({})", iss.name, iss.username_claim))
                .collect();
            out.push(format!(
                "workspaces[{i}] (\"{}\") can be reached by users of {} issuers: {}; their user-name \
                 claims can name the same Databricks user for different people, and Databricks \
                 sees only that name. List only the issuers allowed to reach it \
                 (workspaces[{i}].issuers = [...]) unless each of them is trusted to assert every \
                 user name it sends",
                ws.name,
                reach.len(),
                names.join(", ")
            ));
        }
        out
    }

    pub fn workspace(&self, name: &str) -> Option<&WorkspaceConfig> {
        self.workspaces.iter().find(|w| w.name == name)
    }
}

/// Hides the password of a `scheme://user:password@host` URL.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("redacted"));
            }
            u.to_string()
        }
        Err(_) => "[unparseable url]".to_string(),
    }
}

fn is_loopback_host(host: &url::Host<&str>) -> bool {
    match host {
        url::Host::Domain(d) => d.eq_ignore_ascii_case("localhost"),
        url::Host::Ipv4(ip) => ip.is_loopback(),
        url::Host::Ipv6(ip) => ip.is_loopback(),
    }
}

// === Reading ===
//
// A file is read in four steps, each adding to one [`Errors`]: the tree is deserialized into the
// section structs below, and every unknown key and value of the wrong type is reported and
// dropped until the rest deserializes; `${VAR}` is expanded in every string left; the tree is
// deserialized again; and each section's `validate` parses its values, checks what needs several
// keys or the rest of the config, and builds the types above.

/// The problems found so far, and what reading `*_file` keys needs.
struct Errors<'a> {
    list: Vec<ConfigError>,
    env: &'a dyn Env,
    base_dir: &'a Path,
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// The `AEGIS_*` variable that may hold a `*_file` key's content: `audit.hmac_key_file` →
/// `AEGIS_AUDIT_HMAC_KEY`.
fn env_name(path: &str) -> String {
    let stem = path.strip_suffix("_file").unwrap_or(path);
    format!("AEGIS_{stem}")
        .to_ascii_uppercase()
        .replace(['.', '-'], "_")
}

impl Errors<'_> {
    fn add(&mut self, path: &str, message: impl Into<String>) {
        self.list.push(ConfigError {
            path: path.to_string(),
            message: message.into(),
        });
    }

    /// Whether a problem with the value at `path` (or with an item of it) is reported.
    fn reported(&self, path: &str) -> bool {
        self.list.iter().any(|e| {
            e.path
                .strip_prefix(path)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
        })
    }

    /// Whether the value at `path` itself is reported (e.g. a list item that is not a table).
    fn failed(&self, path: &str) -> bool {
        self.list.iter().any(|e| e.path == path)
    }

    /// Reports a missing or empty value, unless a problem with it is reported already.
    fn missing(&mut self, path: &str, message: impl Into<String>) {
        if !self.reported(path) {
            self.add(path, message);
        }
    }

    /// A value that is given and valid; "is required" when it is not given.
    fn need<T>(&mut self, path: &str, v: Option<T>) -> Option<T> {
        if v.is_none() {
            self.missing(path, "is required");
        }
        v.filter(|_| !self.reported(path))
    }

    /// Parses a string setting; `Err` is the message.
    fn parse<T>(&mut self, path: &str, v: Option<String>, f: Parse<T>) -> Option<T> {
        f(&v?).map_err(|why| self.add(path, why)).ok()
    }

    /// Parses a required string setting.
    fn parse_need<T>(&mut self, path: &str, v: Option<String>, f: Parse<T>) -> Option<T> {
        let v = self.need(path, v);
        self.parse(path, v, f)
    }

    /// A duration setting, `default` when it is not given (or not valid, which is reported).
    fn duration(&mut self, path: &str, v: Option<String>, default: Duration) -> Duration {
        self.parse(path, v, duration).unwrap_or(default)
    }

    /// Expands `${VAR}` and `$$` in every string of `v`; a string that cannot be expanded or is
    /// empty is reported and dropped.
    fn expand_all(&mut self, v: &mut Value, path: &str) -> bool {
        match v {
            Value::String(s) => match self.expand(s, path) {
                Some(x) if x.trim().is_empty() => {
                    self.add(path, "must not be empty");
                    false
                }
                Some(x) => {
                    *s = x;
                    true
                }
                None => false,
            },
            Value::Table(t) => {
                t.retain(|k, v| self.expand_all(v, &join(path, k)));
                true
            }
            Value::Array(items) => {
                let mut i = 0;
                items.retain_mut(|item| {
                    i += 1;
                    self.expand_all(item, &format!("{path}[{}]", i - 1))
                });
                true
            }
            _ => true,
        }
    }

    fn expand(&mut self, raw: &str, path: &str) -> Option<String> {
        let mut out = String::with_capacity(raw.len());
        let mut rest = raw;
        let mut ok = true;
        while let Some(pos) = rest.find('$') {
            out.push_str(&rest[..pos]);
            let after = &rest[pos + 1..];
            if let Some(stripped) = after.strip_prefix('$') {
                out.push('$');
                rest = stripped;
            } else if let Some(body) = after.strip_prefix('{') {
                let Some(end) = body.find('}') else {
                    self.add(path, "unterminated ${ in value");
                    return None;
                };
                let name = &body[..end];
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    self.add(path, format!("invalid variable reference ${{{name}}}"));
                    ok = false;
                } else if let Some(v) = self.env.var(name) {
                    out.push_str(&v);
                } else {
                    self.add(path, format!("environment variable {name} is not set"));
                    ok = false;
                }
                rest = &body[end + 1..];
            } else {
                // A lone `$` is kept as it is.
                out.push('$');
                rest = after;
            }
        }
        out.push_str(rest);
        ok.then_some(out)
    }

    /// Deserializes `doc`, reporting each unknown key and each value of the wrong type and
    /// dropping it from `doc`, until the rest deserializes. Each round drops a value or empties
    /// a list item, so the rounds end; the bound is only a backstop (every round reports).
    fn deserialize<T: DeserializeOwned + Default>(&mut self, doc: &mut Value) -> T {
        for _ in 0..10_000 {
            let err = match serde_path_to_error::deserialize(doc.clone()) {
                Ok(v) => return v,
                Err(err) => err,
            };
            let segments: Vec<Segment> = err.path().iter().cloned().collect();
            let path = match segments.is_empty() {
                true => String::new(),
                false => err.path().to_string(),
            };
            let message = shape_message(&path, err.inner().message());
            // A list item that is not a table where one is expected becomes an empty table, so
            // the items after it keep their index (and `failed` skips it).
            let placeholder = message.starts_with("must be a table");
            self.add(&path, message);
            if !drop_value(doc, &segments, placeholder) {
                break;
            }
        }
        T::default()
    }

    /// The content of a secret: from env `env`, or from the file `file` names (relative to the
    /// config's directory), not both.
    fn secret(&mut self, path: &str, env: &str, file: Option<String>) -> Option<String> {
        match (self.env.var(env), file) {
            (Some(_), Some(_)) => {
                self.add(
                    path,
                    format!("is set both in the file and by {env}; keep one"),
                );
                None
            }
            (Some(v), None) => Some(v),
            (None, Some(f)) => {
                let full = self.base_dir.join(f);
                std::fs::read_to_string(&full)
                    .map_err(|e| self.add(path, format!("cannot read {}: {e}", full.display())))
                    .ok()
            }
            (None, None) => None,
        }
    }

    /// A required base64 key from its `*_file` key at `path` or its `AEGIS_*` variable.
    fn key(&mut self, path: &str, file: Option<String>) -> Option<Key32> {
        let env = env_name(path);
        if file.is_none() && self.env.var(&env).is_none() {
            self.missing(path, format!("is required (or set {env})"));
        }
        let text = self.secret(path, &env, file)?;
        Key32::from_base64(&text)
            .map_err(|why| self.add(path, format!("the key {why}")))
            .ok()
    }

    /// A PEM file (relative to the config's directory) that must hold a `-----BEGIN <label>`
    /// block (`label` may be a suffix, e.g. "PRIVATE KEY").
    fn pem(&mut self, path: &str, file: Option<String>, label: &str) -> Option<Vec<u8>> {
        let full = self.base_dir.join(file?);
        match std::fs::read(&full) {
            Ok(pem) if pem_has(&pem, label) => Some(pem),
            Ok(_) => {
                let what = label.to_lowercase();
                self.add(path, format!("{} holds no PEM {what}", full.display()));
                None
            }
            Err(e) => {
                self.add(path, format!("cannot read {}: {e}", full.display()));
                None
            }
        }
    }

    /// A required short identifier: 1-64 chars of `[A-Za-z0-9_.-]`.
    fn ident(&mut self, path: &str, v: Option<String>) -> Option<String> {
        let v = self.need(path, v)?;
        if v.len() <= 64 && v.chars().all(is_ident_char) {
            Some(v)
        } else {
            let why = "must be 1-64 characters of letters, digits, '_', '-', '.'";
            self.add(path, why);
            None
        }
    }

    /// Reports each workspace in `names` that is not configured.
    fn known_workspaces(&mut self, path: &str, names: &[String], workspaces: &[WorkspaceConfig]) {
        for w in names
            .iter()
            .filter(|w| workspaces.iter().all(|c| c.name != **w))
        {
            self.add(
                &join(path, "workspaces"),
                format!("unknown workspace \"{w}\""),
            );
        }
    }

    /// A rule's path pattern: an exact path under `prefix`, or such a prefix ending in `/*`.
    fn pattern(&mut self, path: &str, p: &str, prefix: &str, why: &str) {
        if p.is_empty() {
            self.missing(path, "is required");
            return;
        }
        if !p.starts_with(prefix) {
            self.add(path, why);
        }
        if p.contains('*') && !(p.ends_with("/*") && p.matches('*').count() == 1) {
            self.add(path, "a wildcard is allowed only as a trailing \"/*\"");
        }
    }
}

/// Parses a setting's text; `Err` is the message.
type Parse<T> = fn(&str) -> Result<T, String>;

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')
}

/// serde's words for a value of the wrong shape at `path`, in the config's words.
fn shape_message(path: &str, msg: &str) -> String {
    if msg.starts_with("unknown field") {
        return "unknown key".to_string();
    }
    let want = match msg.split_once(", expected ") {
        Some((head, want)) if head.starts_with("invalid type") => want,
        _ => return msg.to_string(),
    };
    // The key the value or its list is under: `policy.deny[0]` → "deny".
    let key = path.rsplit('.').next().unwrap_or(path);
    let key = key.split('[').next().unwrap_or(key);
    let like = match key {
        "deny" | "allow" => "{ methods = [\"POST\"], path = \"/api/...\" }",
        "allow_statements" | "allow_commands" => {
            "{ agents = [\"dba-bot\"], workspaces = [\"prod\"] }"
        }
        "tool_deny" | "tool_allow" => {
            "{ server = \"/api/2.0/mcp/sql\", tools = [\"execute_sql\"] }"
        }
        "rate_limits" => "{ user = \"600/min\" }",
        _ => "",
    };
    match want {
        "a boolean" => "must be true or false".to_string(),
        "a table" | "a map" if like.is_empty() => "must be a table".to_string(),
        "a table" | "a map" => format!("must be a table like {like}"),
        "a sequence" if matches!(path, "issuers" | "workspaces" | "audit.witnesses") => {
            format!("must be an array of tables ([[{path}]])")
        }
        "a sequence" if key == "deny" || key == "allow" => "must be an array of rule tables".into(),
        "a sequence" if !like.is_empty() => format!("must be an array of tables like {like}"),
        "a sequence" => "must be an array of strings".to_string(),
        w => format!("must be {w}"),
    }
}

/// Removes the value at `path` from `v` (or, with `placeholder`, makes it an empty table);
/// false when there is none.
fn drop_value(v: &mut Value, path: &[Segment], placeholder: bool) -> bool {
    match (path, v) {
        ([Segment::Map { key }], Value::Table(t)) => t.remove(key).is_some(),
        ([Segment::Seq { index }], Value::Array(a)) if *index < a.len() => {
            match placeholder {
                true => a[*index] = Value::Table(Table::new()),
                false => _ = a.remove(*index),
            }
            true
        }
        ([Segment::Map { key }, rest @ ..], Value::Table(t)) => t
            .get_mut(key)
            .is_some_and(|v| drop_value(v, rest, placeholder)),
        ([Segment::Seq { index }, rest @ ..], Value::Array(a)) => a
            .get_mut(*index)
            .is_some_and(|v| drop_value(v, rest, placeholder)),
        _ => false,
    }
}

/// A struct deserialized only from a TOML table (serde's derive would also take an array).
struct Tbl<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Tbl<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = T;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData)).map(Tbl)
    }
}

fn table<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    Tbl::deserialize(d).map(|t| t.0)
}

fn some_table<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    table(d).map(Some)
}

fn tables<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    let items = Vec::<Tbl<T>>::deserialize(d)?;
    Ok(items.into_iter().map(|t| t.0).collect())
}

// --- values that parse on their own ---

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("is not a duration like \"10s\": {e}"))
}

fn socket_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("\"{s}\" is not an ip:port socket address"))
}

/// An http(s) URL without credentials; plain http only for loopback hosts.
fn http_url(raw: &str) -> Result<url::Url, String> {
    let u = url::Url::parse(raw).map_err(|e| format!("\"{raw}\" is not a valid URL: {e}"))?;
    let loopback = u.host().is_some_and(|h| is_loopback_host(&h));
    match u.scheme() {
        "https" => {}
        "http" if loopback => {}
        "http" => return Err("plain http is accepted only for loopback hosts; use https".into()),
        other => return Err(format!("scheme \"{other}\" is not http or https")),
    }
    if u.host().is_none() {
        return Err("URL has no host".into());
    }
    if u.username() != "" || u.password().is_some() {
        return Err("URL must not carry credentials".into());
    }
    Ok(u)
}

fn listen_addr(s: &str) -> Result<ListenAddr, String> {
    match s.strip_prefix("unix:") {
        Some(p) if p.starts_with('/') => Ok(ListenAddr::Unix(PathBuf::from(p))),
        Some(_) => {
            Err("a unix socket must be an absolute path, e.g. unix:/run/aegis/authz.sock".into())
        }
        None => s
            .parse()
            .map(ListenAddr::Tcp)
            .map_err(|_| format!("\"{s}\" is neither ip:port nor unix:/path")),
    }
}

fn rate(s: &str) -> Result<Rate, String> {
    Rate::parse(s).ok_or_else(|| {
        format!("\"{s}\" is not a rate like \"600/min\" (N/s, N/min or N/h, N from 1 to 1000000)")
    })
}

fn token_source(s: &str) -> Result<TokenSourceKind, String> {
    use TokenSourceKind::*;
    [Federation, U2m, EntraObo]
        .into_iter()
        .find(|k| k.as_str() == s)
        .ok_or_else(|| format!("\"{s}\" is not one of federation, u2m, entra_obo"))
}

fn redis_url(s: &str) -> Result<String, String> {
    match url::Url::parse(s) {
        Ok(u) if matches!(u.scheme(), "redis" | "rediss") => Ok(s.to_string()),
        Ok(u) => Err(format!(
            "scheme \"{}\" is not redis:// or rediss://",
            u.scheme()
        )),
        Err(e) => Err(format!("is not a valid URL: {e}")),
    }
}

// === Sections ===
//
// Each section as written. To add one: a `#[serde(default, deny_unknown_fields)]` struct whose
// fields are its keys (strings that parse later stay `Option<String>`), a field for it in
// `ConfigFile` (`deserialize_with = "table"`, or `"some_table"` for an optional section), and a
// `validate` that parses and checks its values through `Errors` and builds the resolved type.

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct ConfigFile {
    #[serde(deserialize_with = "some_table")]
    server: Option<ServerFile>,
    #[serde(deserialize_with = "table")]
    admin: AdminFile,
    #[serde(deserialize_with = "some_table")]
    redis: Option<RedisFile>,
    #[serde(deserialize_with = "some_table")]
    postgres: Option<PostgresFile>,
    #[serde(deserialize_with = "some_table")]
    audit: Option<AuditFile>,
    #[serde(deserialize_with = "tables")]
    issuers: Vec<IssuerFile>,
    #[serde(deserialize_with = "tables")]
    workspaces: Vec<WorkspaceFile>,
    #[serde(deserialize_with = "table")]
    policy: PolicyConfig,
    #[serde(deserialize_with = "some_table")]
    tracing: Option<TracingFile>,
}

/// A required section; when it is missing (or not a table) its required keys are named too.
fn section<T: Default>(e: &mut Errors, name: &str, s: Option<T>) -> T {
    if s.is_none() {
        e.missing(name, "section is required");
    }
    s.unwrap_or_default()
}

impl ConfigFile {
    fn validate(self, e: &mut Errors) -> Option<Config> {
        let server = section(e, "server", self.server).validate(e);
        let admin = self.admin.validate(&self.issuers, e);
        let redis = section(e, "redis", self.redis).validate(e);
        let postgres = section(e, "postgres", self.postgres).validate(e);
        let audit = section(e, "audit", self.audit).validate(e);
        let issuers = IssuerFile::validate_all(self.issuers, e);
        let workspaces = WorkspaceFile::validate_all(self.workspaces, &issuers, e);
        let policy = self.policy.validate(&workspaces, e);
        let tracing = self.tracing.and_then(|t| t.validate(e));
        if let Some(s) = &server {
            if workspaces
                .iter()
                .any(|w| w.token_source == TokenSourceKind::U2m)
            {
                // Users consent in a browser: aegis must serve and name its public listener.
                let why = "is required when a workspace uses token_source u2m";
                if s.public_listen.is_none() {
                    e.missing("server.public_listen", why);
                }
                if s.public_url.is_none() {
                    e.missing("server.public_url", why);
                }
            }
        }
        Some(Config {
            server: server?,
            admin,
            redis: redis?,
            postgres: postgres?,
            audit: audit?,
            issuers,
            workspaces,
            policy,
            tracing,
        })
    }
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct TracingFile {
    otlp_endpoint: Option<String>,
    protocol: Option<Value>,
    sample_ratio: Option<Value>,
    service_name: Option<String>,
}

impl TracingFile {
    fn validate(self, e: &mut Errors) -> Option<TracingConfig> {
        let endpoint = e.parse_need("tracing.otlp_endpoint", self.otlp_endpoint, http_url);
        let protocol = match self.protocol.as_ref().map(|p| p.as_str()) {
            None | Some(Some("grpc")) => Some(OtlpProtocol::Grpc),
            Some(Some("http")) => Some(OtlpProtocol::Http),
            Some(_) => {
                e.add("tracing.protocol", "must be \"grpc\" or \"http\"");
                None
            }
        };
        let sample_ratio = match self.sample_ratio {
            None => Some(DEFAULT_SAMPLE_RATIO),
            Some(Value::Float(f)) if (0.0..=1.0).contains(&f) => Some(f),
            Some(Value::Integer(i)) if i == 0 || i == 1 => Some(i as f64),
            Some(_) => {
                e.add("tracing.sample_ratio", "must be a number from 0.0 to 1.0");
                None
            }
        };
        Some(TracingConfig {
            otlp_endpoint: endpoint?,
            protocol: protocol?,
            sample_ratio: sample_ratio?,
            service_name: (self.service_name).unwrap_or_else(|| DEFAULT_SERVICE_NAME.into()),
        })
    }
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct ServerFile {
    grpc_listen: Option<String>,
    admin_listen: Option<String>,
    public_listen: Option<String>,
    public_url: Option<String>,
    instance_id: Option<String>,
    check_timeout: Option<String>,
    worker_threads: Option<Value>,
    grpc_tls_cert_file: Option<String>,
    grpc_tls_key_file: Option<String>,
    grpc_client_ca_file: Option<String>,
    grpc_allow_plaintext: Option<Value>,
}

impl ServerFile {
    fn validate(self, e: &mut Errors) -> Option<ServerConfig> {
        let grpc_listen = e.parse_need("server.grpc_listen", self.grpc_listen, listen_addr);
        let admin_listen = e.parse_need("server.admin_listen", self.admin_listen, socket_addr);
        let public_listen = e.parse("server.public_listen", self.public_listen, socket_addr);
        let public_url = e.parse("server.public_url", self.public_url, http_url);
        let check_timeout = e.duration(
            "server.check_timeout",
            self.check_timeout,
            DEFAULT_CHECK_TIMEOUT,
        );
        if check_timeout.is_zero() || check_timeout > Duration::from_secs(30) {
            e.add("server.check_timeout", "must be between 1ms and 30s");
        }
        let worker_threads = match self.worker_threads {
            None => DEFAULT_WORKER_THREADS,
            Some(Value::Integer(n)) if (1..=MAX_WORKER_THREADS).contains(&n) => n as usize,
            Some(v) => {
                let why = format!("must be an integer from 1 to {MAX_WORKER_THREADS}, not {v}");
                e.add("server.worker_threads", why);
                DEFAULT_WORKER_THREADS
            }
        };
        let grpc_tls = grpc_tls(
            e,
            self.grpc_tls_cert_file,
            self.grpc_tls_key_file,
            self.grpc_client_ca_file,
        );
        let grpc_allow_plaintext = match self.grpc_allow_plaintext {
            None => false,
            Some(Value::Boolean(b)) => b,
            Some(v) => {
                let why = format!("must be true or false, not {v}");
                e.add("server.grpc_allow_plaintext", why);
                false
            }
        };
        match (&grpc_listen, &grpc_tls) {
            (Some(ListenAddr::Tcp(a)), None) if !a.ip().is_loopback() && !grpc_allow_plaintext => {
                e.add(
                    "server.grpc_listen",
                    format!(
                        "plaintext gRPC on {a}, a non-loopback address, would hand users' \
                         Databricks tokens to anyone who can reach it: configure mTLS \
                         (server.grpc_tls_cert_file, grpc_tls_key_file, grpc_client_ca_file), \
                         listen on loopback or a unix socket, or set \
                         server.grpc_allow_plaintext = true for a network you trust"
                    ),
                );
            }
            (Some(ListenAddr::Unix(_)), Some(_)) => e.add(
                "server.grpc_tls_cert_file",
                "mTLS applies to a TCP grpc_listen, not a unix socket",
            ),
            _ => {}
        }
        Some(ServerConfig {
            grpc_listen: grpc_listen?,
            admin_listen: admin_listen?,
            public_listen,
            public_url,
            instance_id: self.instance_id.unwrap_or_else(hostname),
            check_timeout,
            worker_threads,
            grpc_tls,
            grpc_allow_plaintext,
        })
    }
}

/// `server.grpc_tls_*`: all three files, or none.
fn grpc_tls(
    e: &mut Errors,
    cert: Option<String>,
    key: Option<String>,
    ca: Option<String>,
) -> Option<GrpcTls> {
    const CERT: &str = "server.grpc_tls_cert_file";
    const KEY: &str = "server.grpc_tls_key_file";
    const CA: &str = "server.grpc_client_ca_file";
    // A key given with a value of the wrong type counts as given.
    let given = [
        (CERT, cert.is_some()),
        (KEY, key.is_some()),
        (CA, ca.is_some()),
    ]
    .map(|(path, some)| (path, some || e.reported(path)));
    match given.iter().filter(|(_, given)| *given).count() {
        0 => return None,
        3 => {}
        _ => {
            for (path, _) in given.iter().filter(|(_, given)| !given) {
                let why = "is required with the other grpc_tls settings (mTLS needs all three)";
                e.add(path, why);
            }
            return None;
        }
    }
    let cert = e.pem(CERT, cert, "CERTIFICATE");
    let key = e.pem(KEY, key, "PRIVATE KEY");
    let ca = e.pem(CA, ca, "CERTIFICATE");
    let key = key.and_then(|k| match String::from_utf8(k) {
        Ok(text) => Some(SecretString::new(text)),
        Err(_) => {
            e.add(KEY, "is not UTF-8 PEM text");
            None
        }
    });
    Some(GrpcTls {
        cert_pem: cert?,
        key_pem: key?,
        client_ca_pem: ca?,
    })
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct AdminFile {
    console_token_file: Option<String>,
    allow_break_glass: Option<bool>,
    #[serde(deserialize_with = "some_table")]
    oidc: Option<OidcFile>,
}

impl AdminFile {
    /// The static token (as far as it may still be used) and the IdP sign-in: with
    /// `[admin.oidc]`, the token is the break-glass sign-in and `allow_break_glass` must say
    /// whether it is allowed.
    fn validate(self, issuers: &[IssuerFile], e: &mut Errors) -> AdminConfig {
        let path = "admin.console_token_file";
        let env = env_name(path);
        // A value of the wrong type counts as given (it is reported on its own).
        let token_given =
            self.console_token_file.is_some() || e.env.var(&env).is_some() || e.reported(path);
        let text = e.secret(path, &env, self.console_token_file);
        let console_token = text.and_then(|text| {
            let token = text.trim();
            if token.len() < 16 {
                e.add(path, "the console token must be at least 16 characters");
                return None;
            }
            Some(SecretString::new(token.to_string()))
        });
        let Some(oidc) = self.oidc else {
            if self.allow_break_glass.is_some() {
                e.add(
                    "admin.allow_break_glass",
                    "applies only with [admin.oidc]; without it the console token is the only \
                     sign-in (remove this key, or configure [admin.oidc])",
                );
            }
            return AdminConfig {
                console_token,
                oidc: None,
            };
        };
        let oidc = oidc.validate(issuers, e);
        let console_token = match (self.allow_break_glass, token_given) {
            (Some(true), true) => console_token,
            (Some(true), false) => {
                e.add(
                    path,
                    "is required when admin.allow_break_glass = true (the break-glass token)",
                );
                None
            }
            // Explicitly off: the token may stay mounted for an emergency; it is never accepted.
            (Some(false), _) | (None, false) => None,
            (None, true) => {
                e.missing(
                    "admin.allow_break_glass",
                    "is required when both [admin.oidc] and admin.console_token_file are set: \
                     with IdP sign-in the static token is a break-glass sign-in only; set it to \
                     true to allow it or false to refuse it",
                );
                None
            }
        };
        AdminConfig {
            console_token,
            oidc,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct RedisFile {
    url: Option<String>,
    cluster_nodes: Option<Vec<String>>,
    sentinels: Option<Vec<String>>,
    sentinel_master: Option<String>,
    ca_file: Option<String>,
    cache_key_file: Option<String>,
}

impl RedisFile {
    fn validate(self, e: &mut Errors) -> Option<RedisConfig> {
        // A key given with a value of the wrong type counts as given.
        let given = [
            ("url", self.url.is_some() || e.reported("redis.url")),
            (
                "cluster_nodes",
                self.cluster_nodes.is_some() || e.reported("redis.cluster_nodes"),
            ),
            (
                "sentinels",
                self.sentinels.is_some() || e.reported("redis.sentinels"),
            ),
        ];
        let given: Vec<&str> = given.iter().filter(|(_, g)| *g).map(|(k, _)| *k).collect();
        let mut urls = |key: &str, list: Option<Vec<String>>| -> Option<Vec<String>> {
            let list = e.need(&format!("redis.{key}"), list)?;
            if list.is_empty() {
                e.add(&format!("redis.{key}"), "must not be empty");
                return None;
            }
            let parsed: Vec<_> = (list.into_iter().enumerate())
                .map(|(i, u)| e.parse(&format!("redis.{key}[{i}]"), Some(u), redis_url))
                .collect();
            parsed.into_iter().collect()
        };
        let topology = match given.as_slice() {
            ["url"] => {
                let url = e.parse_need("redis.url", self.url, redis_url);
                url.map(RedisTopology::Standalone)
            }
            ["cluster_nodes"] => {
                urls("cluster_nodes", self.cluster_nodes).map(RedisTopology::Cluster)
            }
            ["sentinels"] => {
                let sentinels = urls("sentinels", self.sentinels);
                let master = e.need("redis.sentinel_master", self.sentinel_master.clone());
                let sentinel = |(sentinels, master)| RedisTopology::Sentinel { sentinels, master };
                sentinels.zip(master).map(sentinel)
            }
            [] => {
                e.add("redis.url", "is required (or cluster_nodes, or sentinels)");
                None
            }
            _ => {
                e.add("redis", "give exactly one of url, cluster_nodes, sentinels");
                None
            }
        };
        if self.sentinel_master.is_some() && !given.contains(&"sentinels") {
            e.add("redis.sentinel_master", "is only used with sentinels");
        }
        let ca_pem = e.pem("redis.ca_file", self.ca_file, "CERTIFICATE");
        let cache_key = e.key("redis.cache_key_file", self.cache_key_file);
        Some(RedisConfig {
            topology: topology?,
            ca_pem,
            cache_key: cache_key?,
        })
    }
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct PostgresFile {
    url: Option<String>,
    migrate_url: Option<String>,
    migrate_on_start: Option<bool>,
    min_synchronous_commit: Option<String>,
}

impl PostgresFile {
    fn validate(self, e: &mut Errors) -> Option<PostgresConfig> {
        let pg_url = |s: &str| crate::pg::validate_url(s).map(|()| s.to_string());
        let url = e.parse_need("postgres.url", self.url, pg_url);
        let migrate_url = e.parse("postgres.migrate_url", self.migrate_url, pg_url);
        let sync_commit = |s: &str| {
            [SyncCommit::On, SyncCommit::RemoteApply]
                .into_iter()
                .find(|k| k.as_str() == s)
                .ok_or_else(|| {
                    format!("\"{s}\" is not on or remote_apply (weaker settings can lose acknowledged decisions)")
                })
        };
        let min_sync = self.min_synchronous_commit;
        let min_sync = e.parse("postgres.min_synchronous_commit", min_sync, sync_commit);
        Some(PostgresConfig {
            url: url?,
            migrate_url,
            migrate_on_start: self.migrate_on_start.unwrap_or(DEFAULT_MIGRATE_ON_START),
            min_synchronous_commit: min_sync.unwrap_or_default(),
        })
    }
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct AuditFile {
    hmac_key_file: Option<String>,
    key_id: Option<String>,
    chain_id: Option<String>,
    checkpoint_signing_key_file: Option<String>,
    checkpoint_dir: Option<String>,
    checkpoint_interval: Option<String>,
    /// Retired HMAC keys: `key_id = "path/to/key"`.
    previous_keys: BTreeMap<String, String>,
    max_clock_skew: Option<String>,
    tlog_origin: Option<String>,
    tlog_listen: Option<String>,
    #[serde(deserialize_with = "tables")]
    witnesses: Vec<WitnessFile>,
    witness_quorum: Option<Value>,
    witness_timeout: Option<String>,
    record_statement_text: Option<bool>,
}

/// `[[audit.witnesses]]`: `url` (the submission prefix) and `vkey` (the witness' cosigning key,
/// type 0x04).
#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct WitnessFile {
    url: Option<String>,
    vkey: Option<String>,
}

impl AuditFile {
    fn validate(self, e: &mut Errors) -> Option<AuditConfig> {
        let mut previous_keys = Vec::new();
        for (id, file) in self.previous_keys {
            let p = format!("audit.previous_keys.{id}");
            if id.is_empty() || id.len() > 64 || !id.chars().all(is_ident_char) {
                let why = "a key id must be 1-64 characters of letters, digits, '_', '-', '.'";
                e.add(&p, why);
            } else if self.key_id.as_ref() == Some(&id) {
                e.add(&p, "is the current key_id; a retired key needs its own id");
            } else if let Some(key) = e.key(&p, Some(file)) {
                previous_keys.push((id, key));
            }
        }
        let max_clock_skew = e.duration(
            "audit.max_clock_skew",
            self.max_clock_skew,
            DEFAULT_MAX_CLOCK_SKEW,
        );
        if max_clock_skew < Duration::from_millis(100) || max_clock_skew > Duration::from_secs(300)
        {
            e.add("audit.max_clock_skew", "must be between 100ms and 5m");
        }
        let hmac_key = e.key("audit.hmac_key_file", self.hmac_key_file);
        let key_id = e.ident("audit.key_id", self.key_id);
        let chain_id = e.ident("audit.chain_id", self.chain_id);
        let signing_key_path = "audit.checkpoint_signing_key_file";
        let checkpoint_signing_key = e.key(signing_key_path, self.checkpoint_signing_key_file);
        let checkpoint_dir = e.need("audit.checkpoint_dir", self.checkpoint_dir);
        let checkpoint_interval = e.duration(
            "audit.checkpoint_interval",
            self.checkpoint_interval,
            DEFAULT_CHECKPOINT_INTERVAL,
        );
        if checkpoint_interval < Duration::from_secs(1) {
            e.add("audit.checkpoint_interval", "must be at least 1s");
        }
        let tlog_origin = match self.tlog_origin {
            None if e.reported("audit.tlog_origin") => None,
            None => chain_id.as_ref().map(|c| format!("aegis/{c}")),
            Some(o) if crate::tlog::valid_key_name(&o) => Some(o),
            Some(o) => {
                let why = "must be non-empty, without spaces or '+' (it names the log's key)";
                e.add("audit.tlog_origin", format!("\"{o}\" {why}"));
                None
            }
        };
        let tlog_listen = e.parse("audit.tlog_listen", self.tlog_listen, socket_addr);
        let witnesses = WitnessFile::validate_all(self.witnesses, e);
        let witness_quorum = match self.witness_quorum {
            None => witnesses.len(),
            Some(Value::Integer(n)) if n >= 1 && (n as usize) <= witnesses.len() => n as usize,
            Some(_) => {
                let n = witnesses.len();
                let why = format!("must be a whole number from 1 to the {n} witnesses configured");
                e.add("audit.witness_quorum", why);
                0
            }
        };
        let witness_timeout = e.duration(
            "audit.witness_timeout",
            self.witness_timeout,
            DEFAULT_WITNESS_TIMEOUT,
        );
        if witness_timeout < Duration::from_millis(100) || witness_timeout > Duration::from_secs(60)
        {
            e.add("audit.witness_timeout", "must be between 100ms and 60s");
        }
        Some(AuditConfig {
            hmac_key: hmac_key?,
            key_id: key_id?,
            chain_id: chain_id?,
            checkpoint_signing_key: checkpoint_signing_key?,
            checkpoint_dir: e.base_dir.join(checkpoint_dir?),
            checkpoint_interval,
            previous_keys,
            max_clock_skew,
            tlog_origin: tlog_origin?,
            tlog_listen,
            witnesses,
            witness_quorum,
            witness_timeout,
            record_statement_text: self.record_statement_text.unwrap_or(false),
        })
    }
}

impl WitnessFile {
    /// Each witness with a cosignature key, each named once.
    fn validate_all(items: Vec<WitnessFile>, e: &mut Errors) -> Vec<Witness> {
        let mut out: Vec<Witness> = Vec::new();
        for (i, w) in items.into_iter().enumerate() {
            let path = format!("audit.witnesses[{i}]");
            if e.failed(&path) {
                continue;
            }
            let url = e.parse_need(&format!("{path}.url"), w.url, http_url);
            let vkey_path = format!("{path}.vkey");
            let vkey =
                e.need(&vkey_path, w.vkey)
                    .and_then(|v| match crate::tlog::Vkey::parse(&v) {
                        Ok(k) if k.kind == crate::tlog::TYPE_COSIGNATURE_V1 => Some(k),
                        Ok(_) => {
                            let why =
                                "is not a cosignature key (type 0x04, c2sp.org/tlog-cosignature)";
                            e.add(&vkey_path, why);
                            None
                        }
                        Err(why) => {
                            e.add(&vkey_path, why);
                            None
                        }
                    });
            let (Some(url), Some(vkey)) = (url, vkey) else {
                continue;
            };
            if out.iter().any(|o| o.vkey.name == vkey.name) {
                e.add(&vkey_path, format!("witness {} is listed twice", vkey.name));
                continue;
            }
            out.push(Witness {
                url: url.to_string(),
                vkey,
            });
        }
        out
    }
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct IssuerFile {
    name: Option<String>,
    issuer: Option<String>,
    audiences: Option<Vec<String>>,
    jwks_uri: Option<String>,
    algorithms: Option<Vec<String>>,
    username_claim: Option<String>,
    agent_claim: Option<String>,
    leeway: Option<String>,
    max_key_age: Option<String>,
}

impl IssuerFile {
    /// `[[issuers]]`: at least one, names and issuer URLs each configured once.
    fn validate_all(items: Vec<IssuerFile>, e: &mut Errors) -> Vec<IssuerConfig> {
        if items.is_empty() {
            e.missing("issuers", "at least one is required");
        }
        let mut out: Vec<IssuerConfig> = Vec::new();
        let (mut names, mut urls) = (BTreeSet::new(), BTreeSet::new());
        for (i, item) in items.into_iter().enumerate() {
            let path = format!("issuers[{i}]");
            if e.failed(&path) {
                continue;
            }
            if let Some(n) = item.name.as_ref().filter(|n| !names.insert(n.to_string())) {
                e.add(
                    &format!("{path}.name"),
                    format!("duplicate issuer name \"{n}\""),
                );
            }
            if let Some(u) = item.issuer.as_ref().filter(|u| !urls.insert(u.to_string())) {
                e.add(
                    &format!("{path}.issuer"),
                    format!("issuer \"{u}\" is configured twice"),
                );
            }
            out.extend(item.validate(&path, e));
        }
        out
    }

    fn validate(self, path: &str, e: &mut Errors) -> Option<IssuerConfig> {
        let p = |key: &str| join(path, key);
        let name = e.ident(&p("name"), self.name);
        let issuer = e.parse_need(&p("issuer"), self.issuer, |s| {
            http_url(s).map(|_| s.to_string())
        });
        let audiences = e.need(&p("audiences"), self.audiences);
        if audiences.as_ref().is_some_and(|a| a.is_empty()) {
            e.missing(&p("audiences"), "must not be empty");
        }
        let jwks_uri = e.parse(&p("jwks_uri"), self.jwks_uri, http_url);
        let algorithms = e.need(&p("algorithms"), self.algorithms);
        let algorithms = algorithms.and_then(|names| algorithms_of(&names, &p("algorithms"), e));
        let username_claim = e.need(&p("username_claim"), self.username_claim);
        let agent_claim = e.need(&p("agent_claim"), self.agent_claim);
        let leeway = e.duration(&p("leeway"), self.leeway, DEFAULT_LEEWAY);
        if leeway > Duration::from_secs(300) {
            e.add(&p("leeway"), "must be at most 5m");
        }
        let max_key_age = e.duration(&p("max_key_age"), self.max_key_age, DEFAULT_MAX_KEY_AGE);
        if max_key_age < Duration::from_secs(1) || max_key_age > Duration::from_secs(30 * 86400) {
            e.add(&p("max_key_age"), "must be between 1s and 30d");
        }
        Some(IssuerConfig {
            name: name?,
            issuer: issuer?,
            audiences: audiences?,
            jwks_uri,
            algorithms: algorithms?,
            username_claim: username_claim?,
            agent_claim: agent_claim?,
            leeway,
            max_key_age,
        })
    }
}

/// An issuer's `algorithms`: asymmetric JWS algorithms only, each bad name reported.
fn algorithms_of(names: &[String], path: &str, e: &mut Errors) -> Option<Vec<Algorithm>> {
    use Algorithm::*;
    const ALL: [Algorithm; 9] = [
        RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA,
    ];
    if names.is_empty() {
        e.add(path, "must not be empty");
        return None;
    }
    let mut out = Vec::new();
    for n in names {
        match ALL.into_iter().find(|a| format!("{a:?}") == *n) {
            Some(alg) => out.push(alg),
            None if matches!(n.as_str(), "HS256" | "HS384" | "HS512") => {
                let why = "is symmetric and cannot be verified with an issuer's public keys";
                e.add(path, format!("{n} {why}"));
            }
            None => e.add(
                path,
                format!("unsupported algorithm \"{n}\" (RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA)"),
            ),
        }
    }
    (out.len() == names.len()).then_some(out)
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct WorkspaceFile {
    name: Option<String>,
    url: Option<String>,
    hosts: Vec<String>,
    token_source: Option<String>,
    client_id: Option<String>,
    scopes: Option<Vec<String>>,
    allowed_agents: Option<Vec<String>>,
    issuers: Option<Vec<String>>,
    #[serde(deserialize_with = "table")]
    rate_limits: RateLimitsFile,
    /// `entra_obo` only: the tenant, or the token endpoint, and the app's client secret.
    tenant_id: Option<String>,
    entra_token_url: Option<String>,
    client_secret_file: Option<String>,
}

/// `rate_limits = { user = "600/min", agent = "6000/min", user_agent = ".." }`.
#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct RateLimitsFile {
    user: Option<String>,
    agent: Option<String>,
    user_agent: Option<String>,
}

impl WorkspaceFile {
    /// `[[workspaces]]`: at least one, names and hosts each claimed once, every issuer named
    /// configured.
    fn validate_all(
        items: Vec<WorkspaceFile>,
        issuers: &[IssuerConfig],
        e: &mut Errors,
    ) -> Vec<WorkspaceConfig> {
        if items.is_empty() {
            e.missing("workspaces", "at least one is required");
        }
        let (mut names, mut hosts) = (BTreeSet::new(), BTreeSet::new());
        let mut out = Vec::new();
        for (i, item) in items.into_iter().enumerate() {
            let path = format!("workspaces[{i}]");
            if e.failed(&path) {
                continue;
            }
            if let Some(n) = item.name.as_ref().filter(|n| !names.insert(n.to_string())) {
                e.add(
                    &format!("{path}.name"),
                    format!("duplicate workspace name \"{n}\""),
                );
            }
            for h in item.hosts.iter().map(|h| h.to_ascii_lowercase()) {
                if !hosts.insert(h.clone()) {
                    let why = format!("host \"{h}\" is claimed by two workspaces");
                    e.add(&format!("{path}.hosts"), why);
                }
            }
            let ws = item.validate(&path, e);
            for name in ws.iter().flat_map(|w| w.issuers.iter().flatten()) {
                if issuers.iter().all(|c| c.name != *name) {
                    let why = format!("\"{name}\" is not the name of a configured issuer");
                    e.add(&format!("{path}.issuers"), why);
                }
            }
            out.extend(ws);
        }
        out
    }

    fn validate(self, path: &str, e: &mut Errors) -> Option<WorkspaceConfig> {
        let p = |key: &str| join(path, key);
        let given = |e: &Errors, key: &str, v: bool| v || e.reported(&p(key));
        let name = e.ident(&p("name"), self.name);
        let url = e.parse_need(&p("url"), self.url, http_url);
        let source = e.parse_need(&p("token_source"), self.token_source, token_source);
        let scopes = e.need(&p("scopes"), self.scopes);
        if scopes.as_ref().is_some_and(|s| s.is_empty()) {
            e.missing(&p("scopes"), "must not be empty");
        }
        if self.issuers.as_ref().is_some_and(|i| i.is_empty()) {
            let why = "must not be empty (leave it out to admit every issuer)";
            e.missing(&p("issuers"), why);
        }
        let limits = self.rate_limits;
        let mut limit = |key: &str, v| e.parse(&format!("{path}.rate_limits.{key}"), v, rate);
        let rate_limits = RateLimits {
            user: limit("user", limits.user),
            agent: limit("agent", limits.agent),
            user_agent: limit("user_agent", limits.user_agent),
        };
        let oauth_app = matches!(
            source,
            Some(TokenSourceKind::U2m | TokenSourceKind::EntraObo)
        );
        if oauth_app && self.client_id.is_none() {
            let why = "is required for token_source u2m and entra_obo (the OAuth app)";
            e.add(&p("client_id"), why);
        }
        let tenant_ok = |t: &String| {
            t.len() <= 64
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        };
        if self.tenant_id.as_ref().is_some_and(|t| !tenant_ok(t)) {
            let why = "must be a tenant id or domain (letters, digits, '-', '.', '_')";
            e.add(&p("tenant_id"), why);
        }
        let token_url = e.parse(&p("entra_token_url"), self.entra_token_url, http_url);
        let secret_given = given(e, "client_secret_file", self.client_secret_file.is_some());
        // A workspace's name is `[A-Za-z0-9_.-]`, so its env name is well-formed; an invalid
        // name is reported by `ident` already.
        let ws = name.as_deref().unwrap_or("invalid");
        let secret_env = env_name(&format!("workspace_{ws}.client_secret_file"));
        let text = e.secret(
            &p("client_secret_file"),
            &secret_env,
            self.client_secret_file,
        );
        let client_secret = text.and_then(|text| match text.trim() {
            "" => {
                e.add(&p("client_secret_file"), "the secret is empty");
                None
            }
            secret => Some(SecretString::new(secret.to_string())),
        });
        if source == Some(TokenSourceKind::EntraObo) {
            if self.tenant_id.is_none() && !given(e, "entra_token_url", token_url.is_some()) {
                let why = "is required for token_source entra_obo (or set entra_token_url)";
                e.add(&p("tenant_id"), why);
            }
            if client_secret.is_none() && !secret_given {
                let why = format!("is required for token_source entra_obo (or set {secret_env})");
                e.add(&p("client_secret_file"), why);
            }
        } else {
            let entra_keys = [
                ("tenant_id", given(e, "tenant_id", self.tenant_id.is_some())),
                (
                    "entra_token_url",
                    given(e, "entra_token_url", token_url.is_some()),
                ),
                ("client_secret_file", secret_given),
            ];
            for (key, _) in entra_keys.iter().filter(|(_, given)| *given) {
                e.add(&p(key), "is used only with token_source entra_obo");
            }
        }
        Some(WorkspaceConfig {
            name: name?,
            url: url?,
            hosts: self.hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
            token_source: source?,
            client_id: self.client_id,
            scopes: scopes?,
            allowed_agents: self.allowed_agents,
            rate_limits,
            issuers: self.issuers,
            tenant_id: self.tenant_id,
            entra_token_url: token_url,
            client_secret,
        })
    }
}

impl PolicyConfig {
    /// Methods are upper-cased; every path pattern, MCP server and workspace named is checked.
    fn validate(mut self, workspaces: &[WorkspaceConfig], e: &mut Errors) -> PolicyConfig {
        for (key, rules) in [("deny", &mut self.deny), ("allow", &mut self.allow)] {
            for (i, r) in rules.iter_mut().enumerate() {
                let path = format!("policy.{key}[{i}]");
                if e.failed(&path) {
                    continue;
                }
                for m in &mut r.methods {
                    *m = m.to_ascii_uppercase();
                    if !m.chars().all(|c| c.is_ascii_alphabetic()) {
                        let why = format!("\"{m}\" is not an HTTP method");
                        e.add(&format!("{path}.methods"), why);
                    }
                }
                e.pattern(&format!("{path}.path"), &r.path, "/", "must start with '/'");
                e.known_workspaces(&path, &r.workspaces, workspaces);
            }
        }
        let scopes = [
            ("allow_statements", &self.allow_statements),
            ("allow_commands", &self.allow_commands),
        ];
        for (key, scopes) in scopes {
            for (i, s) in scopes.iter().enumerate() {
                let path = format!("policy.{key}[{i}]");
                if e.failed(&path) {
                    continue;
                }
                e.known_workspaces(&path, &s.workspaces, workspaces);
                if s.agents.is_empty() {
                    // An empty list would lift the guardrail for every agent: say so explicitly.
                    let why = "must name the agents (the guardrail is lifted only for them)";
                    e.add(&format!("{path}.agents"), why);
                }
            }
        }
        for (key, rules) in [
            ("tool_deny", &self.tool_deny),
            ("tool_allow", &self.tool_allow),
        ] {
            for (i, r) in rules.iter().enumerate() {
                let path = format!("policy.{key}[{i}]");
                if e.failed(&path) {
                    continue;
                }
                let why = "must be an MCP server path under /api/2.0/mcp/";
                e.pattern(&format!("{path}.server"), &r.server, "/api/2.0/mcp/", why);
                e.known_workspaces(&path, &r.workspaces, workspaces);
            }
        }
        self
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "aegis".to_string())
}

// === [admin.oidc]: console sign-in through the IdP ===
//
// Kept in one place (types, reader, checks) so it ports as a unit. The console signs people in
// with the OIDC authorization code flow + PKCE against one of the configured `[[issuers]]`
// (whose keys aegis already fetches and whose validation it reuses), and maps a claim of the
// ID token to console roles. With it configured, the static `console_token_file` is only the
// break-glass sign-in and must be switched on explicitly (`allow_break_glass = true`).

/// The path aegis serves the OIDC callback on; `redirect_uri` must name it.
pub const CONSOLE_OIDC_CALLBACK_PATH: &str = "/console/oidc/callback";

/// `Debug` prints the client secret as `[redacted]` ([`SecretString`]).
#[derive(Debug, Clone)]
pub struct ConsoleOidcConfig {
    /// The configured issuer's `name` (`[[issuers]].name`).
    pub issuer_name: String,
    /// Its `iss` URL (from `[[issuers]].issuer`): discovery is read from here.
    pub issuer: String,
    pub client_id: String,
    /// Sent with HTTP Basic (`client_secret_basic`) to the token endpoint, when set.
    pub client_secret: Option<SecretString>,
    /// The console's callback URL as registered at the IdP.
    pub redirect_uri: url::Url,
    /// Requested scopes; always holds `openid`.
    pub scopes: Vec<String>,
    /// The ID token claim holding the roles (a string or an array of strings).
    pub roles_claim: String,
    pub viewer_values: Vec<String>,
    pub operator_values: Vec<String>,
    pub auditor_values: Vec<String>,
}

/// `[admin.oidc]` as written.
#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct OidcFile {
    issuer: Option<String>,
    client_id: Option<String>,
    client_secret_file: Option<String>,
    redirect_uri: Option<String>,
    scopes: Option<Vec<String>>,
    roles_claim: Option<String>,
    viewer_values: Vec<String>,
    operator_values: Vec<String>,
    auditor_values: Vec<String>,
}

/// The scopes asked for when `scopes` is not given.
pub const DEFAULT_CONSOLE_SCOPES: &[&str] = &["openid", "profile", "email"];

impl OidcFile {
    fn validate(self, issuers: &[IssuerFile], e: &mut Errors) -> Option<ConsoleOidcConfig> {
        const P: &str = "admin.oidc";
        let issuer_name = e.need("admin.oidc.issuer", self.issuer);
        // Discovery, authorization and token endpoints all hang off the issuer's URL; the
        // issuer itself is checked (and its URL reported) under [[issuers]].
        let issuer = issuer_name.as_ref().and_then(|name| {
            let found = issuers.iter().find(|i| i.name.as_ref() == Some(name));
            // Not when the issuers' names are themselves in doubt (reported on their own).
            let names_reported = e.list.iter().any(|x| {
                x.path == "issuers" || (x.path.starts_with("issuers[") && x.path.ends_with("].name"))
            });
            if found.is_none() && !names_reported {
                let names: Vec<&str> = issuers.iter().filter_map(|i| i.name.as_deref()).collect();
                let configured = if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                };
                e.add(
                    "admin.oidc.issuer",
                    format!("\"{name}\" is not the name of a configured issuer (configured: {configured})"),
                );
            }
            found.and_then(|i| i.issuer.clone())
        });
        let client_id = e.need("admin.oidc.client_id", self.client_id);
        if client_id
            .as_ref()
            .is_some_and(|c| c.chars().any(char::is_control))
        {
            e.add("admin.oidc.client_id", "must not hold control characters");
        }
        let secret_path = "admin.oidc.client_secret_file";
        let client_secret = e
            .secret(secret_path, &env_name(secret_path), self.client_secret_file)
            .and_then(|text| match text.trim() {
                "" => {
                    e.add(secret_path, "the client secret is empty");
                    None
                }
                s => Some(SecretString::new(s.to_string())),
            });
        let redirect_uri = e.parse_need("admin.oidc.redirect_uri", self.redirect_uri, |raw| {
            let u = http_url(raw)?;
            if u.path() != CONSOLE_OIDC_CALLBACK_PATH || u.query().is_some() || u.fragment().is_some() {
                return Err(format!(
                    "must be this console's callback, <scheme>://<host>[:port]{CONSOLE_OIDC_CALLBACK_PATH} \
                     with no query or fragment, not \"{raw}\""
                ));
            }
            Ok(u)
        });
        let scopes = match self.scopes {
            None => Some(
                DEFAULT_CONSOLE_SCOPES
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            ),
            Some(list) if !list.iter().any(|s| s == "openid") => {
                e.add("admin.oidc.scopes", "must include \"openid\"");
                None
            }
            Some(list) if list.iter().any(|s| s.contains(char::is_whitespace)) => {
                e.add("admin.oidc.scopes", "a scope must not contain spaces");
                None
            }
            Some(list) => Some(list),
        };
        let roles_claim = e.need("admin.oidc.roles_claim", self.roles_claim);
        let no_mapping = self.viewer_values.is_empty()
            && self.operator_values.is_empty()
            && self.auditor_values.is_empty();
        let typed_wrong = ["viewer_values", "operator_values", "auditor_values"]
            .iter()
            .any(|k| e.reported(&format!("{P}.{k}")));
        if no_mapping && !typed_wrong {
            e.add(
                "admin.oidc.viewer_values",
                "no role mapping: set at least one of viewer_values, operator_values, \
                 auditor_values to the values of the roles claim that grant that role",
            );
        }
        Some(ConsoleOidcConfig {
            issuer_name: issuer_name?,
            issuer: issuer?,
            client_id: client_id?,
            client_secret,
            redirect_uri: redirect_uri?,
            scopes: scopes?,
            roles_claim: roles_claim?,
            viewer_values: self.viewer_values,
            operator_values: self.operator_values,
            auditor_values: self.auditor_values,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            for name in ["audit.key", "cache.key", "checkpoint.key"] {
                std::fs::write(dir.path().join(name), Key32::generate().to_base64()).unwrap();
            }
            std::fs::write(dir.path().join("console.token"), "0123456789abcdef0123").unwrap();
            Fixture { dir }
        }

        fn parse(&self, text: &str, env: &HashMap<String, String>) -> Result<Config, ConfigErrors> {
            Config::parse(text, self.dir.path(), env)
        }
    }

    const GOOD: &str = r#"
[server]
grpc_listen = "127.0.0.1:9191"
admin_listen = "127.0.0.1:9192"
instance_id = "pod-a"

[admin]
console_token_file = "console.token"

[redis]
url = "redis://127.0.0.1:6379"
cache_key_file = "cache.key"

[postgres]
url = "postgres://aegis@127.0.0.1:5432/aegis"

[audit]
hmac_key_file = "audit.key"
key_id = "k1"
chain_id = "main"
checkpoint_signing_key_file = "checkpoint.key"
checkpoint_dir = "checkpoints"
checkpoint_interval = "10s"

[[issuers]]
name = "corp"
issuer = "https://idp.example.com"
audiences = ["aegis"]
algorithms = ["RS256", "ES256"]
username_claim = "email"
agent_claim = "azp"

[[workspaces]]
name = "prod"
url = "https://dbc-123.cloud.databricks.com"
hosts = ["dbc-123.cloud.databricks.com"]
token_source = "federation"
scopes = ["all-apis"]

[policy]
allowed_agents = []
deny = [ { methods = ["POST"], path = "/api/2.0/token/create" } ]
"#;

    #[test]
    fn the_design_example_parses() {
        let f = Fixture::new();
        let cfg = f.parse(GOOD, &HashMap::new()).unwrap();
        assert_eq!(cfg.server.instance_id, "pod-a");
        assert_eq!(
            cfg.issuers[0].algorithms,
            vec![Algorithm::RS256, Algorithm::ES256]
        );
        assert_eq!(cfg.issuers[0].leeway, Duration::from_secs(30));
        assert_eq!(cfg.workspaces[0].token_source, TokenSourceKind::Federation);
        assert_eq!(cfg.policy.deny[0].methods, vec!["POST".to_string()]);
        assert_eq!(cfg.audit.checkpoint_dir, f.dir.path().join("checkpoints"));
    }

    #[test]
    fn guardrail_and_limit_settings_parse_and_bad_ones_are_named() {
        let f = Fixture::new();
        let good = GOOD.replace(
            "scopes = [\"all-apis\"]\n",
            "scopes = [\"all-apis\"]\nrate_limits = { user = \"600/min\", user_agent = \"5/s\" }\n",
        ) + "allow_statements = [ { agents = [\"dba-bot\"] } ]\n\
             allow_commands = [ { agents = [\"notebook-bot\"], workspaces = [\"prod\"] } ]\n\
             tool_deny = [ { server = \"/api/2.0/mcp/sql\", tools = [\"execute_sql\"] } ]\n";
        let cfg = f.parse(&good, &HashMap::new()).unwrap();
        let limits = cfg.workspaces[0].rate_limits;
        assert_eq!(
            limits.user,
            Some(Rate {
                requests: 600,
                per: Duration::from_secs(60)
            })
        );
        assert_eq!(limits.agent, None);
        assert_eq!(cfg.policy.allow_statements[0].agents, vec!["dba-bot"]);
        assert_eq!(cfg.policy.allow_commands[0].agents, vec!["notebook-bot"]);
        assert_eq!(cfg.policy.allow_commands[0].workspaces, vec!["prod"]);
        assert_eq!(cfg.policy.tool_deny[0].tools, vec!["execute_sql"]);

        let bad = GOOD.replace(
            "scopes = [\"all-apis\"]\n",
            "scopes = [\"all-apis\"]\nrate_limits = { user = \"lots\", per_day = \"1/d\" }\n",
        ) + "allow_statements = [ { workspaces = [\"prod\"] } ]\n\
             allow_commands = [ { agents = [] } ]\n\
             tool_deny = [ { server = \"/api/2.0/sql/statements\" } ]\n";
        let errs = f.parse(&bad, &HashMap::new()).unwrap_err().to_string();
        for want in [
            "workspaces[0].rate_limits.user",
            "workspaces[0].rate_limits.per_day",
            "policy.allow_statements[0].agents",
            "policy.allow_commands[0].agents",
            "policy.tool_deny[0].server",
        ] {
            assert!(errs.contains(want), "{want} not reported in:\n{errs}");
        }
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let f = Fixture::new();
        let bad = GOOD
            .replace("\"127.0.0.1:9192\"", "\"nowhere\"")
            .replace("https://idp.example.com", "http://idp.example.com")
            .replace("[\"RS256\", \"ES256\"]", "[\"HS256\", \"none\"]")
            .replace("token_source = \"federation\"", "token_source = \"magic\"")
            .replace("key_id = \"k1\"", "key_id = \"k1\"\nkey_idd = 1")
            .replace(
                "hmac_key_file = \"audit.key\"",
                "hmac_key_file = \"missing.key\"",
            );
        let errs = f.parse(&bad, &HashMap::new()).unwrap_err();
        let text = errs.to_string();
        for needle in [
            "server.admin_listen: \"nowhere\" is not an ip:port socket address",
            "issuers[0].issuer: plain http is accepted only for loopback hosts",
            "issuers[0].algorithms: HS256 is symmetric",
            "issuers[0].algorithms: unsupported algorithm \"none\"",
            "workspaces[0].token_source: \"magic\" is not one of",
            "audit.key_idd: unknown key",
            "audit.hmac_key_file: cannot read",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        assert!(errs.0.len() >= 7);
    }

    #[test]
    fn worker_threads_defaults_to_one_and_is_bounded() {
        let f = Fixture::new();
        let cfg = f.parse(GOOD, &HashMap::new()).unwrap();
        assert_eq!(cfg.server.worker_threads, 1);
        let four = GOOD.replace("instance_id", "worker_threads = 4\ninstance_id");
        let cfg = f.parse(&four, &HashMap::new()).unwrap();
        assert_eq!(cfg.server.worker_threads, 4);
        for bad in ["0", "257", "\"2\"", "1.5"] {
            let text = GOOD.replace(
                "instance_id",
                &format!("worker_threads = {bad}\ninstance_id"),
            );
            let errs = f.parse(&text, &HashMap::new()).unwrap_err().to_string();
            assert!(
                errs.contains("server.worker_threads: must be an integer from 1 to 256"),
                "{bad}: {errs}"
            );
        }
    }

    #[test]
    fn loopback_http_is_accepted() {
        let f = Fixture::new();
        let cfg = f
            .parse(
                &GOOD.replace("https://idp.example.com", "http://127.0.0.1:8443"),
                &HashMap::new(),
            )
            .unwrap();
        assert_eq!(cfg.issuers[0].issuer, "http://127.0.0.1:8443");
    }

    #[test]
    fn env_expansion_and_key_env_override() {
        let f = Fixture::new();
        let mut env = HashMap::new();
        env.insert("REDIS_PORT".to_string(), "6380".to_string());
        env.insert(
            "AEGIS_AUDIT_HMAC_KEY".to_string(),
            Key32::generate().to_base64(),
        );
        let text = GOOD
            .replace("127.0.0.1:6379", "127.0.0.1:${REDIS_PORT}")
            .replace("hmac_key_file = \"audit.key\"\n", "");
        let cfg = f.parse(&text, &env).unwrap();
        assert_eq!(
            cfg.redis.topology,
            RedisTopology::Standalone("redis://127.0.0.1:6380".into())
        );

        let errs = f
            .parse(&GOOD.replace("127.0.0.1:6379", "${NOPE}"), &HashMap::new())
            .unwrap_err();
        assert!(errs
            .to_string()
            .contains("environment variable NOPE is not set"));
    }

    #[test]
    fn both_file_and_env_for_a_key_is_an_error() {
        let f = Fixture::new();
        let mut env = HashMap::new();
        env.insert(
            "AEGIS_AUDIT_HMAC_KEY".to_string(),
            Key32::generate().to_base64(),
        );
        let errs = f.parse(GOOD, &env).unwrap_err();
        assert!(errs
            .to_string()
            .contains("audit.hmac_key_file: is set both"));
    }

    #[test]
    fn malformed_keys_are_errors_never_defaults() {
        let f = Fixture::new();
        std::fs::write(f.dir.path().join("cache.key"), "c2hvcnQ=").unwrap();
        let errs = f.parse(GOOD, &HashMap::new()).unwrap_err();
        assert!(errs
            .to_string()
            .contains("redis.cache_key_file: the key must decode to exactly 32 bytes"));
    }

    #[test]
    fn missing_sections_are_named() {
        let f = Fixture::new();
        let errs = f.parse("", &HashMap::new()).unwrap_err().to_string();
        for s in [
            "server",
            "redis",
            "postgres",
            "audit",
            "issuers",
            "workspaces",
        ] {
            assert!(errs.contains(s), "{s} not named in {errs}");
        }
    }

    #[test]
    fn u2m_and_entra_obo_report_every_missing_key() {
        let f = Fixture::new();
        let u2m = GOOD.replace("token_source = \"federation\"", "token_source = \"u2m\"");
        let text = f.parse(&u2m, &HashMap::new()).unwrap_err().to_string();
        for needle in [
            "workspaces[0].client_id: is required for token_source u2m",
            "server.public_listen: is required when a workspace uses token_source u2m",
            "server.public_url: is required when a workspace uses token_source u2m",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }

        let obo = GOOD.replace(
            "token_source = \"federation\"",
            "token_source = \"entra_obo\"",
        );
        let text = f.parse(&obo, &HashMap::new()).unwrap_err().to_string();
        for needle in [
            "workspaces[0].client_id: is required",
            "workspaces[0].tenant_id: is required for token_source entra_obo",
            "workspaces[0].client_secret_file: is required for token_source entra_obo (or set AEGIS_WORKSPACE_PROD_CLIENT_SECRET)",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }

        // Entra keys on another source are mistakes, not silently ignored.
        let stray = GOOD.replace(
            "token_source = \"federation\"",
            "token_source = \"federation\"\ntenant_id = \"t\"",
        );
        let text = f.parse(&stray, &HashMap::new()).unwrap_err().to_string();
        assert!(text.contains("workspaces[0].tenant_id: is used only with token_source entra_obo"));
    }

    #[test]
    fn entra_obo_and_u2m_parse_with_their_keys() {
        let f = Fixture::new();
        std::fs::write(f.dir.path().join("entra.secret"), "s3cret\n").unwrap();
        let obo = GOOD.replace(
            "token_source = \"federation\"",
            "token_source = \"entra_obo\"\nclient_id = \"app\"\ntenant_id = \"contoso.onmicrosoft.com\"\nclient_secret_file = \"entra.secret\"",
        );
        let cfg = f.parse(&obo, &HashMap::new()).unwrap();
        let ws = &cfg.workspaces[0];
        assert_eq!(ws.token_source, TokenSourceKind::EntraObo);
        assert_eq!(ws.client_secret.as_ref().unwrap().expose(), "s3cret");
        assert_eq!(ws.tenant_id.as_deref(), Some("contoso.onmicrosoft.com"));

        // The secret may come from the environment instead, but not from both.
        let mut env = HashMap::new();
        env.insert(
            "AEGIS_WORKSPACE_PROD_CLIENT_SECRET".to_string(),
            "from-env".to_string(),
        );
        let errs = f.parse(&obo, &env).unwrap_err().to_string();
        assert!(
            errs.contains("workspaces[0].client_secret_file: is set both"),
            "{errs}"
        );
        let cfg = f
            .parse(
                &obo.replace("client_secret_file = \"entra.secret\"", ""),
                &env,
            )
            .unwrap();
        assert_eq!(
            cfg.workspaces[0].client_secret.as_ref().unwrap().expose(),
            "from-env"
        );

        let u2m = GOOD
            .replace(
                "token_source = \"federation\"",
                "token_source = \"u2m\"\nclient_id = \"app\"",
            )
            .replace(
                "instance_id = \"pod-a\"",
                "instance_id = \"pod-a\"\npublic_listen = \"127.0.0.1:9193\"\npublic_url = \"https://aegis.example.com\"",
            );
        let cfg = f.parse(&u2m, &HashMap::new()).unwrap();
        assert_eq!(cfg.workspaces[0].token_source, TokenSourceKind::U2m);
    }

    #[test]
    fn redacts_url_passwords() {
        assert_eq!(
            redact_url("postgres://aegis:hunter2@db:5432/aegis"),
            "postgres://aegis:redacted@db:5432/aegis"
        );
    }

    // --- [admin.oidc] ---

    const OIDC: &str = r#"
[admin.oidc]
issuer = "corp"
client_id = "aegis-console"
redirect_uri = "https://aegis-admin.example.com/console/oidc/callback"
roles_claim = "groups"
viewer_values = ["aegis-viewers"]
operator_values = ["aegis-operators", "sre"]
auditor_values = ["aegis-auditors"]
"#;

    /// GOOD with `[admin]` replaced by `admin` and the `[admin.oidc]` table `oidc`.
    fn with_admin(admin: &str, oidc: &str) -> String {
        GOOD.replace(
            "[admin]\nconsole_token_file = \"console.token\"\n",
            &format!("[admin]\n{admin}\n{oidc}\n"),
        )
    }

    fn errors(f: &Fixture, text: &str) -> Vec<String> {
        match f.parse(text, &HashMap::new()) {
            Ok(_) => Vec::new(),
            Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn console_oidc_parses_and_break_glass_is_explicit() {
        let f = Fixture::new();
        std::fs::write(f.dir.path().join("client.secret"), "s3cret-value\n").unwrap();
        let oidc = OIDC.to_string() + "client_secret_file = \"client.secret\"\n";
        // IdP sign-in with the break-glass token switched on.
        let cfg = f
            .parse(
                &with_admin(
                    "console_token_file = \"console.token\"\nallow_break_glass = true",
                    &oidc,
                ),
                &HashMap::new(),
            )
            .unwrap();
        let o = cfg.admin.oidc.as_ref().expect("oidc");
        assert_eq!(o.issuer_name, "corp");
        assert_eq!(o.issuer, "https://idp.example.com");
        assert_eq!(o.client_id, "aegis-console");
        assert_eq!(o.client_secret.as_ref().unwrap().expose(), "s3cret-value");
        assert_eq!(o.scopes, ["openid", "profile", "email"]);
        assert_eq!(o.operator_values, ["aegis-operators", "sre"]);
        assert!(cfg.admin.console_token.is_some());
        assert!(cfg
            .warnings()
            .iter()
            .any(|w| w.contains("allow_break_glass")));
        // The secret never prints.
        assert!(!format!("{cfg:?}").contains("s3cret-value"));

        // Explicitly off: the token file may stay, it is not used.
        let cfg = f
            .parse(
                &with_admin(
                    "console_token_file = \"console.token\"\nallow_break_glass = false",
                    OIDC,
                ),
                &HashMap::new(),
            )
            .unwrap();
        assert!(cfg.admin.oidc.is_some() && cfg.admin.console_token.is_none());
        assert!(!cfg
            .warnings()
            .iter()
            .any(|w| w.contains("allow_break_glass")));

        // IdP only.
        let cfg = f.parse(&with_admin("", OIDC), &HashMap::new()).unwrap();
        assert!(cfg.admin.oidc.is_some() && cfg.admin.console_token.is_none());

        // No OIDC: the static token works as it always did.
        let cfg = f.parse(GOOD, &HashMap::new()).unwrap();
        assert!(cfg.admin.oidc.is_none() && cfg.admin.console_token.is_some());
    }

    #[test]
    fn console_oidc_errors_name_the_key() {
        let f = Fixture::new();
        let cases: Vec<(String, &str, &str)> = vec![
            (
                with_admin("console_token_file = \"console.token\"", OIDC),
                "admin.allow_break_glass:",
                "is required when both",
            ),
            (
                with_admin("allow_break_glass = true", OIDC),
                "admin.console_token_file:",
                "is required when admin.allow_break_glass = true",
            ),
            (
                with_admin(
                    "console_token_file = \"console.token\"\nallow_break_glass = true",
                    "",
                ),
                "admin.allow_break_glass:",
                "applies only with [admin.oidc]",
            ),
            (
                with_admin("allow_break_glass = \"yes\"", OIDC),
                "admin.allow_break_glass:",
                "must be true or false",
            ),
            (
                with_admin("", &OIDC.replace("issuer = \"corp\"", "issuer = \"okta\"")),
                "admin.oidc.issuer:",
                "\"okta\" is not the name of a configured issuer (configured: corp)",
            ),
            (
                with_admin(
                    "",
                    &OIDC.replace(
                        "https://aegis-admin.example.com",
                        "http://aegis-admin.example.com",
                    ),
                ),
                "admin.oidc.redirect_uri:",
                "plain http is accepted only for loopback hosts",
            ),
            (
                with_admin("", &OIDC.replace("/console/oidc/callback", "/callback")),
                "admin.oidc.redirect_uri:",
                "must be this console's callback",
            ),
            (
                with_admin(
                    "",
                    &OIDC.replace("/console/oidc/callback\"", "/console/oidc/callback?x=1\""),
                ),
                "admin.oidc.redirect_uri:",
                "with no query or fragment",
            ),
            (
                with_admin("", &OIDC.replace("client_id = \"aegis-console\"\n", "")),
                "admin.oidc.client_id:",
                "is required",
            ),
            (
                with_admin("", &OIDC.replace("roles_claim = \"groups\"\n", "")),
                "admin.oidc.roles_claim:",
                "is required",
            ),
            (
                with_admin(
                    "",
                    &OIDC
                        .replace("viewer_values = [\"aegis-viewers\"]\n", "")
                        .replace("operator_values = [\"aegis-operators\", \"sre\"]\n", "")
                        .replace("auditor_values = [\"aegis-auditors\"]\n", ""),
                ),
                "admin.oidc.viewer_values:",
                "no role mapping",
            ),
            (
                with_admin("", &(OIDC.to_string() + "scopes = [\"profile\"]\n")),
                "admin.oidc.scopes:",
                "must include \"openid\"",
            ),
            (
                with_admin(
                    "",
                    &(OIDC.to_string() + "client_secret_file = \"missing.secret\"\n"),
                ),
                "admin.oidc.client_secret_file:",
                "cannot read",
            ),
            (
                with_admin("", &(OIDC.to_string() + "authorize_url = \"x\"\n")),
                "admin.oidc.authorize_url:",
                "unknown key",
            ),
        ];
        for (text, key, why) in cases {
            let errs = errors(&f, &text);
            assert!(
                errs.iter().any(|e| e.starts_with(key) && e.contains(why)),
                "want {key} {why}; got {errs:#?}"
            );
        }
        // Loopback redirect over plain http is fine (the sandbox, a port-forward).
        let text = with_admin(
            "",
            &OIDC.replace("https://aegis-admin.example.com", "http://127.0.0.1:9192"),
        );
        assert!(errors(&f, &text).is_empty(), "{:?}", errors(&f, &text));
    }
}
