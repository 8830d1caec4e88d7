//! Typed configuration, read from TOML with collect-all-errors validation.
//!
//! Every setting is parsed and every problem is reported at once (`aegis config check` exits 64
//! listing them all). Nothing is silently defaulted: a key that is present but wrong is an error,
//! an unknown key is an error, and a missing optional key takes the default documented in the
//! README's config reference.
//!
//! The process environment is read through the small [`Env`] trait so tests never touch it.
//! Strings may reference `${VAR}` (and `$$` for a literal `$`); every `*_file` key may instead be
//! given as the env variable `AEGIS_<SECTION>_<KEY>` (e.g. `AEGIS_AUDIT_HMAC_KEY`) holding the
//! file's content.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use jsonwebtoken::Algorithm;
use toml::{Table, Value};

use crate::secret::{Key32, SecretString};

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

impl std::error::Error for ConfigErrors {}

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

/// The most `server.worker_threads` may be.
pub const MAX_WORKER_THREADS: i64 = 256;

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncCommit {
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
    pub witnesses: Vec<crate::audit::witness::Witness>,
    /// Cosignatures a checkpoint needs to count as witnessed (default: every witness).
    pub witness_quorum: usize,
    pub witness_timeout: Duration,
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

#[derive(Debug, Clone, Default)]
pub struct PolicyConfig {
    pub allowed_agents: Vec<String>,
    pub deny: Vec<RuleConfig>,
    pub allow: Vec<RuleConfig>,
    /// Agents (per workspace) that may run SQL the statement guardrail would block.
    pub allow_statements: Vec<ScopeConfig>,
    /// Agents (per workspace) that may run Python, Scala and R through the command execution
    /// API (`/api/1.2/commands/execute`), which the guardrail refuses otherwise.
    pub allow_commands: Vec<ScopeConfig>,
    /// MCP tools agents may not call.
    pub tool_deny: Vec<ToolRuleConfig>,
    /// MCP tools agents may call: where a rule's server, agents and workspaces match, only the
    /// tools listed by such rules may be called.
    pub tool_allow: Vec<ToolRuleConfig>,
}

/// One MCP tool rule: an MCP server path (exact, or a prefix ending in `/*`), tool names
/// (empty = every tool), agents and workspaces (empty = any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolRuleConfig {
    pub server: String,
    pub tools: Vec<String>,
    pub agents: Vec<String>,
    pub workspaces: Vec<String>,
}

/// Who a rule applies to: agents and workspaces (empty = any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopeConfig {
    pub agents: Vec<String>,
    pub workspaces: Vec<String>,
}

/// One path rule: matches when the method, path pattern, agent and workspace all match.
#[derive(Debug, Clone, PartialEq, Eq)]
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
        let mut r = Reader {
            errors: Vec::new(),
            env,
            base_dir,
        };
        let cfg = r.config(&doc);
        match cfg {
            Some(cfg) if r.errors.is_empty() => Ok(cfg),
            _ => {
                if r.errors.is_empty() {
                    r.err("", "config is invalid");
                }
                Err(ConfigErrors(r.errors))
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

// === Reader ===

struct Reader<'a> {
    errors: Vec<ConfigError>,
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

impl Reader<'_> {
    fn err(&mut self, path: &str, message: impl Into<String>) {
        self.errors.push(ConfigError {
            path: path.to_string(),
            message: message.into(),
        });
    }

    fn unknown_keys(&mut self, t: &Table, path: &str, known: &[&str]) {
        for key in t.keys() {
            if !known.contains(&key.as_str()) {
                self.err(&join(path, key), "unknown key");
            }
        }
    }

    fn table<'t>(&mut self, t: &'t Table, key: &str, path: &str) -> Option<&'t Table> {
        match t.get(key) {
            None => None,
            Some(Value::Table(inner)) => Some(inner),
            Some(_) => {
                self.err(&join(path, key), "must be a table");
                None
            }
        }
    }

    /// Expands `${VAR}` and `$$` in a string value.
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
                match body.find('}') {
                    Some(end) => {
                        let name = &body[..end];
                        let valid = !name.is_empty()
                            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                        if !valid {
                            self.err(path, format!("invalid variable reference ${{{name}}}"));
                            ok = false;
                        } else if let Some(v) = self.env.var(name) {
                            out.push_str(&v);
                        } else {
                            self.err(path, format!("environment variable {name} is not set"));
                            ok = false;
                        }
                        rest = &body[end + 1..];
                    }
                    None => {
                        self.err(path, "unterminated ${ in value");
                        return None;
                    }
                }
            } else {
                // A lone `$` is kept as it is.
                out.push('$');
                rest = after;
            }
        }
        out.push_str(rest);
        ok.then_some(out)
    }

    fn string(&mut self, t: &Table, key: &str, path: &str, required: bool) -> Option<String> {
        let p = join(path, key);
        match t.get(key) {
            None => {
                if required {
                    self.err(&p, "is required");
                }
                None
            }
            Some(Value::String(s)) => {
                let v = self.expand(s, &p)?;
                if v.trim().is_empty() {
                    self.err(&p, "must not be empty");
                    None
                } else {
                    Some(v)
                }
            }
            Some(_) => {
                self.err(&p, "must be a string");
                None
            }
        }
    }

    fn string_list(
        &mut self,
        t: &Table,
        key: &str,
        path: &str,
        required: bool,
    ) -> Option<Vec<String>> {
        let p = join(path, key);
        match t.get(key) {
            None => {
                if required {
                    self.err(&p, "is required");
                }
                None
            }
            Some(Value::Array(items)) => {
                let mut out = Vec::with_capacity(items.len());
                let mut ok = true;
                for (i, item) in items.iter().enumerate() {
                    let ip = format!("{p}[{i}]");
                    match item {
                        Value::String(s) => match self.expand(s, &ip) {
                            Some(v) if !v.trim().is_empty() => out.push(v),
                            Some(_) => {
                                self.err(&ip, "must not be empty");
                                ok = false;
                            }
                            None => ok = false,
                        },
                        _ => {
                            self.err(&ip, "must be a string");
                            ok = false;
                        }
                    }
                }
                ok.then_some(out)
            }
            Some(_) => {
                self.err(&p, "must be an array of strings");
                None
            }
        }
    }

    fn duration(&mut self, t: &Table, key: &str, path: &str, default: Duration) -> Duration {
        let p = join(path, key);
        match self.string(t, key, path, false) {
            None if t.contains_key(key) => default,
            None => default,
            Some(s) => match humantime::parse_duration(&s) {
                Ok(d) => d,
                Err(e) => {
                    self.err(&p, format!("is not a duration like \"10s\": {e}"));
                    default
                }
            },
        }
    }

    fn socket_addr(
        &mut self,
        t: &Table,
        key: &str,
        path: &str,
        required: bool,
    ) -> Option<SocketAddr> {
        let s = self.string(t, key, path, required)?;
        match s.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.err(
                    &join(path, key),
                    format!("\"{s}\" is not an ip:port socket address"),
                );
                None
            }
        }
    }

    /// Parses an http(s) URL; plain http only for loopback hosts.
    fn http_url(&mut self, raw: &str, p: &str) -> Option<url::Url> {
        let u = match url::Url::parse(raw) {
            Ok(u) => u,
            Err(e) => {
                self.err(p, format!("\"{raw}\" is not a valid URL: {e}"));
                return None;
            }
        };
        let loopback = u.host().map(|h| is_loopback_host(&h)).unwrap_or(false);
        match u.scheme() {
            "https" => {}
            "http" if loopback => {}
            "http" => {
                self.err(
                    p,
                    "plain http is accepted only for loopback hosts; use https",
                );
                return None;
            }
            other => {
                self.err(p, format!("scheme \"{other}\" is not http or https"));
                return None;
            }
        }
        if u.host().is_none() {
            self.err(p, "URL has no host");
            return None;
        }
        if u.username() != "" || u.password().is_some() {
            self.err(p, "URL must not carry credentials");
            return None;
        }
        Some(u)
    }

    /// Reads a base64 key from `<key>` (a file path) or from env `AEGIS_<SECTION>_<KEY>`.
    /// A PEM file named by `key` (relative to the config's directory) that must hold a
    /// `-----BEGIN <label>` block (`label` may be a suffix, e.g. "PRIVATE KEY").
    fn pem_file(&mut self, t: &Table, key: &str, path: &str, label: &str) -> Option<Vec<u8>> {
        let p = join(path, key);
        let f = self.string(t, key, path, false)?;
        let full = self.base_dir.join(&f);
        match std::fs::read(&full) {
            Ok(pem) if pem_has(&pem, label) => Some(pem),
            Ok(_) => {
                self.err(
                    &p,
                    format!("{} holds no PEM {}", full.display(), label.to_lowercase()),
                );
                None
            }
            Err(e) => {
                self.err(&p, format!("cannot read {}: {e}", full.display()));
                None
            }
        }
    }

    /// `server.grpc_tls_*`: all three files, or none.
    fn grpc_tls(&mut self, t: &Table) -> Option<GrpcTls> {
        const KEYS: [&str; 3] = [
            "grpc_tls_cert_file",
            "grpc_tls_key_file",
            "grpc_client_ca_file",
        ];
        let given = KEYS.iter().filter(|k| t.contains_key(**k)).count();
        if given == 0 {
            return None;
        }
        if given < KEYS.len() {
            for k in KEYS.iter().filter(|k| !t.contains_key(**k)) {
                self.err(
                    &format!("server.{k}"),
                    "is required with the other grpc_tls settings (mTLS needs all three)",
                );
            }
            return None;
        }
        let cert = self.pem_file(t, KEYS[0], "server", "CERTIFICATE");
        let key = self.pem_file(t, KEYS[1], "server", "PRIVATE KEY");
        let ca = self.pem_file(t, KEYS[2], "server", "CERTIFICATE");
        let key = key.and_then(|k| match String::from_utf8(k) {
            Ok(text) => Some(SecretString::new(text)),
            Err(_) => {
                self.err("server.grpc_tls_key_file", "is not UTF-8 PEM text");
                None
            }
        });
        Some(GrpcTls {
            cert_pem: cert?,
            key_pem: key?,
            client_ca_pem: ca?,
        })
    }

    fn key_file(&mut self, t: &Table, key: &str, path: &str, required: bool) -> Option<Key32> {
        let p = join(path, key);
        let text = self.secret_text(t, key, path, required)?;
        match Key32::from_base64(&text) {
            Ok(k) => Some(k),
            Err(why) => {
                self.err(&p, format!("the key {why}"));
                None
            }
        }
    }

    fn env_name(path: &str, key: &str) -> String {
        let stem = key.strip_suffix("_file").unwrap_or(key);
        format!("AEGIS_{}_{}", path, stem)
            .to_ascii_uppercase()
            .replace(['.', '-'], "_")
    }

    /// The content of a secret given as a `*_file` path or via its env variable.
    fn secret_text(&mut self, t: &Table, key: &str, path: &str, required: bool) -> Option<String> {
        let p = join(path, key);
        let env_name = Self::env_name(path, key);
        if let Some(v) = self.env.var(&env_name) {
            if t.contains_key(key) {
                self.err(
                    &p,
                    format!("is set both in the file and by {env_name}; keep one"),
                );
                return None;
            }
            return Some(v);
        }
        let file = self.string(t, key, path, false);
        let Some(file) = file else {
            if required && !t.contains_key(key) {
                self.err(&p, format!("is required (or set {env_name})"));
            }
            return None;
        };
        let full = self.base_dir.join(&file);
        match std::fs::read_to_string(&full) {
            Ok(text) => Some(text),
            Err(e) => {
                self.err(&p, format!("cannot read {}: {e}", full.display()));
                None
            }
        }
    }

    // --- sections ---

    fn config(&mut self, doc: &Table) -> Option<Config> {
        self.unknown_keys(
            doc,
            "",
            &[
                "server",
                "admin",
                "redis",
                "postgres",
                "audit",
                "issuers",
                "workspaces",
                "policy",
                "tracing",
            ],
        );
        let empty = Table::new();
        let section = |r: &mut Self, name: &str| -> Table {
            match r.table(doc, name, "") {
                Some(t) => t.clone(),
                None => {
                    if !doc.contains_key(name) && name != "admin" && name != "policy" {
                        r.err(name, "section is required");
                    }
                    empty.clone()
                }
            }
        };
        let server_t = section(self, "server");
        let admin_t = section(self, "admin");
        let redis_t = section(self, "redis");
        let pg_t = section(self, "postgres");
        let audit_t = section(self, "audit");
        let policy_t = section(self, "policy");

        let server = self.server(&server_t);
        let redis = self.redis(&redis_t);
        let postgres = self.postgres(&pg_t);
        let audit = self.audit(&audit_t);
        let issuers = self.issuers(doc);
        let admin = self.admin(&admin_t, &issuers);
        let workspaces = self.workspaces(doc);
        for (i, w) in workspaces.iter().enumerate() {
            for name in w.issuers.iter().flatten() {
                if !issuers.iter().any(|c| c.name == *name) {
                    self.err(
                        &format!("workspaces[{i}].issuers"),
                        format!("\"{name}\" is not the name of a configured issuer"),
                    );
                }
            }
        }
        let policy = self.policy(&policy_t, &workspaces);
        let tracing = match self.table(doc, "tracing", "") {
            Some(t) => {
                let t = t.clone();
                self.tracing(&t)
            }
            None => None,
        };
        if workspaces
            .iter()
            .any(|w| w.token_source == TokenSourceKind::U2m)
        {
            // Users consent in a browser: aegis must serve and name its public listener.
            for (key, missing) in [
                (
                    "public_listen",
                    server.as_ref().is_some_and(|s| s.public_listen.is_none()),
                ),
                (
                    "public_url",
                    server.as_ref().is_some_and(|s| s.public_url.is_none()),
                ),
            ] {
                if missing && !server_t.contains_key(key) {
                    self.err(
                        &format!("server.{key}"),
                        "is required when a workspace uses token_source u2m",
                    );
                }
            }
        }

        Some(Config {
            server: server?,
            admin: admin?,
            redis: redis?,
            postgres: postgres?,
            audit: audit?,
            issuers,
            workspaces,
            policy: policy?,
            tracing,
        })
    }

    fn tracing(&mut self, t: &Table) -> Option<TracingConfig> {
        let path = "tracing";
        self.unknown_keys(
            t,
            path,
            &["otlp_endpoint", "protocol", "sample_ratio", "service_name"],
        );
        let endpoint = self
            .string(t, "otlp_endpoint", path, true)
            .and_then(|u| self.http_url(&u, "tracing.otlp_endpoint"));
        let protocol = match t.get("protocol").map(|v| v.as_str()) {
            None | Some(Some("grpc")) => Some(OtlpProtocol::Grpc),
            Some(Some("http")) => Some(OtlpProtocol::Http),
            _ => {
                self.err("tracing.protocol", "must be \"grpc\" or \"http\"");
                None
            }
        };
        let sample_ratio = match t.get("sample_ratio") {
            None => Some(1.0),
            Some(Value::Float(f)) if (0.0..=1.0).contains(f) => Some(*f),
            Some(Value::Integer(i)) if *i == 0 || *i == 1 => Some(*i as f64),
            Some(_) => {
                self.err("tracing.sample_ratio", "must be a number from 0.0 to 1.0");
                None
            }
        };
        let service_name = match t.get("service_name") {
            None => Some("aegis".to_string()),
            Some(_) => self.string(t, "service_name", path, true),
        };
        Some(TracingConfig {
            otlp_endpoint: endpoint?,
            protocol: protocol?,
            sample_ratio: sample_ratio?,
            service_name: service_name?,
        })
    }

    fn server(&mut self, t: &Table) -> Option<ServerConfig> {
        let path = "server";
        self.unknown_keys(
            t,
            path,
            &[
                "grpc_listen",
                "admin_listen",
                "public_listen",
                "public_url",
                "instance_id",
                "check_timeout",
                "worker_threads",
                "grpc_tls_cert_file",
                "grpc_tls_key_file",
                "grpc_client_ca_file",
                "grpc_allow_plaintext",
            ],
        );
        let grpc_listen = match self.string(t, "grpc_listen", path, true) {
            Some(s) => {
                if let Some(p) = s.strip_prefix("unix:") {
                    if p.is_empty() || !p.starts_with('/') {
                        self.err(
                            "server.grpc_listen",
                            "a unix socket must be an absolute path, e.g. unix:/run/aegis/authz.sock",
                        );
                        None
                    } else {
                        Some(ListenAddr::Unix(PathBuf::from(p)))
                    }
                } else {
                    match s.parse::<SocketAddr>() {
                        Ok(a) => Some(ListenAddr::Tcp(a)),
                        Err(_) => {
                            self.err(
                                "server.grpc_listen",
                                format!("\"{s}\" is neither ip:port nor unix:/path"),
                            );
                            None
                        }
                    }
                }
            }
            None => None,
        };
        let admin_listen = self.socket_addr(t, "admin_listen", path, true);
        let public_listen = self.socket_addr(t, "public_listen", path, false);
        let public_url = self
            .string(t, "public_url", path, false)
            .and_then(|s| self.http_url(&s, "server.public_url"));
        let instance_id = match self.string(t, "instance_id", path, false) {
            Some(id) => id,
            None => hostname(),
        };
        let check_timeout = self.duration(t, "check_timeout", path, Duration::from_millis(1800));
        if check_timeout.is_zero() || check_timeout > Duration::from_secs(30) {
            self.err("server.check_timeout", "must be between 1ms and 30s");
        }
        let worker_threads = match t.get("worker_threads") {
            None => 1,
            Some(toml::Value::Integer(n)) if (1..=MAX_WORKER_THREADS).contains(n) => *n as usize,
            Some(v) => {
                self.err(
                    "server.worker_threads",
                    format!("must be an integer from 1 to {MAX_WORKER_THREADS}, not {v}"),
                );
                1
            }
        };
        let grpc_tls = self.grpc_tls(t);
        let grpc_allow_plaintext = match t.get("grpc_allow_plaintext") {
            None => false,
            Some(toml::Value::Boolean(b)) => *b,
            Some(v) => {
                self.err(
                    "server.grpc_allow_plaintext",
                    format!("must be true or false, not {v}"),
                );
                false
            }
        };
        match (&grpc_listen, &grpc_tls) {
            (Some(ListenAddr::Tcp(a)), None) if !a.ip().is_loopback() && !grpc_allow_plaintext => {
                self.err(
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
            (Some(ListenAddr::Unix(_)), Some(_)) => self.err(
                "server.grpc_tls_cert_file",
                "mTLS applies to a TCP grpc_listen, not a unix socket",
            ),
            _ => {}
        }
        Some(ServerConfig {
            grpc_tls,
            grpc_allow_plaintext,
            grpc_listen: grpc_listen?,
            admin_listen: admin_listen?,
            public_listen,
            public_url,
            instance_id,
            check_timeout,
            worker_threads,
        })
    }

    fn admin(&mut self, t: &Table, issuers: &[IssuerConfig]) -> Option<AdminConfig> {
        self.unknown_keys(
            t,
            "admin",
            &["console_token_file", "allow_break_glass", "oidc"],
        );
        let console_token = self
            .secret_text(t, "console_token_file", "admin", false)
            .and_then(|text| {
                let token = text.trim().to_string();
                if token.len() < 16 {
                    self.err(
                        "admin.console_token_file",
                        "the console token must be at least 16 characters",
                    );
                    None
                } else {
                    Some(SecretString::new(token))
                }
            });
        let (console_token, oidc) = self.admin_oidc(t, issuers, console_token);
        Some(AdminConfig {
            console_token,
            oidc,
        })
    }

    fn redis(&mut self, t: &Table) -> Option<RedisConfig> {
        self.unknown_keys(
            t,
            "redis",
            &[
                "url",
                "cluster_nodes",
                "sentinels",
                "sentinel_master",
                "ca_file",
                "cache_key_file",
            ],
        );
        let check = |r: &mut Self, u: String, p: &str| -> Option<String> {
            match url::Url::parse(&u) {
                Ok(parsed) if matches!(parsed.scheme(), "redis" | "rediss") => Some(u),
                Ok(parsed) => {
                    r.err(
                        p,
                        format!(
                            "scheme \"{}\" is not redis:// or rediss://",
                            parsed.scheme()
                        ),
                    );
                    None
                }
                Err(e) => {
                    r.err(p, format!("is not a valid URL: {e}"));
                    None
                }
            }
        };
        let given: Vec<&str> = ["url", "cluster_nodes", "sentinels"]
            .into_iter()
            .filter(|k| t.contains_key(*k))
            .collect();
        let topology = match given.as_slice() {
            ["url"] => self
                .string(t, "url", "redis", true)
                .and_then(|u| check(self, u, "redis.url"))
                .map(RedisTopology::Standalone),
            ["cluster_nodes"] => {
                let nodes = self.string_list(t, "cluster_nodes", "redis", true);
                nodes.and_then(|nodes| {
                    if nodes.is_empty() {
                        self.err("redis.cluster_nodes", "must not be empty");
                        return None;
                    }
                    let mut ok = Vec::new();
                    for (i, n) in nodes.into_iter().enumerate() {
                        ok.push(check(self, n, &format!("redis.cluster_nodes[{i}]"))?);
                    }
                    Some(RedisTopology::Cluster(ok))
                })
            }
            ["sentinels"] => {
                let sentinels = self.string_list(t, "sentinels", "redis", true);
                let master = self.string(t, "sentinel_master", "redis", true);
                match (sentinels, master) {
                    (Some(s), Some(master)) if !s.is_empty() => {
                        let mut ok = Vec::new();
                        for (i, n) in s.into_iter().enumerate() {
                            ok.push(check(self, n, &format!("redis.sentinels[{i}]"))?);
                        }
                        Some(RedisTopology::Sentinel {
                            sentinels: ok,
                            master,
                        })
                    }
                    (Some(_), Some(_)) => {
                        self.err("redis.sentinels", "must not be empty");
                        None
                    }
                    _ => None,
                }
            }
            [] => {
                self.err("redis.url", "is required (or cluster_nodes, or sentinels)");
                None
            }
            _ => {
                self.err("redis", "give exactly one of url, cluster_nodes, sentinels");
                None
            }
        };
        if t.contains_key("sentinel_master") && !t.contains_key("sentinels") {
            self.err("redis.sentinel_master", "is only used with sentinels");
        }
        let ca_pem = self.pem_file(t, "ca_file", "redis", "CERTIFICATE");
        let cache_key = self.key_file(t, "cache_key_file", "redis", true);
        Some(RedisConfig {
            topology: topology?,
            ca_pem,
            cache_key: cache_key?,
        })
    }

    fn postgres(&mut self, t: &Table) -> Option<PostgresConfig> {
        self.unknown_keys(
            t,
            "postgres",
            &[
                "url",
                "migrate_url",
                "migrate_on_start",
                "min_synchronous_commit",
            ],
        );
        let check = |r: &mut Self, key: &str| -> Option<String> {
            let url = r.string(t, key, "postgres", key == "url")?;
            match crate::pg::validate_url(&url) {
                Ok(()) => Some(url),
                Err(why) => {
                    r.err(&format!("postgres.{key}"), why);
                    None
                }
            }
        };
        let url = check(self, "url");
        let migrate_url = check(self, "migrate_url");
        let migrate_on_start = match t.get("migrate_on_start") {
            None => true,
            Some(Value::Boolean(b)) => *b,
            Some(_) => {
                self.err("postgres.migrate_on_start", "must be true or false");
                true
            }
        };
        let min_synchronous_commit = match self
            .string(t, "min_synchronous_commit", "postgres", false)
            .as_deref()
        {
            None | Some("on") => SyncCommit::On,
            Some("remote_apply") => SyncCommit::RemoteApply,
            Some(other) => {
                self.err(
                    "postgres.min_synchronous_commit",
                    format!(
                        "\"{other}\" is not on or remote_apply (weaker settings can lose acknowledged decisions)"
                    ),
                );
                SyncCommit::On
            }
        };
        Some(PostgresConfig {
            url: url?,
            migrate_url,
            migrate_on_start,
            min_synchronous_commit,
        })
    }

    fn audit(&mut self, t: &Table) -> Option<AuditConfig> {
        let path = "audit";
        self.unknown_keys(
            t,
            path,
            &[
                "hmac_key_file",
                "key_id",
                "chain_id",
                "checkpoint_signing_key_file",
                "checkpoint_dir",
                "checkpoint_interval",
                "previous_keys",
                "max_clock_skew",
                "tlog_origin",
                "tlog_listen",
                "witnesses",
                "witness_quorum",
                "witness_timeout",
            ],
        );
        let previous_keys = self.previous_keys(t);
        let max_clock_skew = self.duration(t, "max_clock_skew", path, Duration::from_secs(5));
        if max_clock_skew < Duration::from_millis(100) || max_clock_skew > Duration::from_secs(300)
        {
            self.err("audit.max_clock_skew", "must be between 100ms and 5m");
        }
        let hmac_key = self.key_file(t, "hmac_key_file", path, true);
        let key_id = self.ident(t, "key_id", path);
        let chain_id = self.ident(t, "chain_id", path);
        let checkpoint_signing_key = self.key_file(t, "checkpoint_signing_key_file", path, true);
        let checkpoint_dir = self
            .string(t, "checkpoint_dir", path, true)
            .map(|d| self.base_dir.join(d));
        let checkpoint_interval =
            self.duration(t, "checkpoint_interval", path, Duration::from_secs(10));
        if checkpoint_interval < Duration::from_secs(1) {
            self.err("audit.checkpoint_interval", "must be at least 1s");
        }
        let tlog_origin = match t.get("tlog_origin") {
            None => chain_id.as_ref().map(|c| format!("aegis/{c}")),
            Some(_) => {
                let o = self.string(t, "tlog_origin", path, true);
                match o {
                    Some(o) if crate::audit::tlog::valid_key_name(&o) => Some(o),
                    Some(o) => {
                        self.err(
                            "audit.tlog_origin",
                            format!("\"{o}\" must be non-empty, without spaces or '+' (it names the log's key)"),
                        );
                        None
                    }
                    None => None,
                }
            }
        };
        let tlog_listen = match t.get("tlog_listen") {
            None => None,
            Some(_) => self.socket_addr(t, "tlog_listen", path, true),
        };
        let witnesses = self.witnesses(t);
        let witness_quorum = match t.get("witness_quorum") {
            None => witnesses.len(),
            Some(Value::Integer(n)) if *n >= 1 && (*n as usize) <= witnesses.len() => *n as usize,
            Some(_) => {
                self.err(
                    "audit.witness_quorum",
                    format!(
                        "must be a whole number from 1 to the {} witnesses configured",
                        witnesses.len()
                    ),
                );
                0
            }
        };
        let witness_timeout = self.duration(t, "witness_timeout", path, Duration::from_secs(5));
        if witness_timeout < Duration::from_millis(100) || witness_timeout > Duration::from_secs(60)
        {
            self.err("audit.witness_timeout", "must be between 100ms and 60s");
        }
        Some(AuditConfig {
            tlog_origin: tlog_origin?,
            tlog_listen,
            witnesses,
            witness_quorum,
            witness_timeout,
            hmac_key: hmac_key?,
            key_id: key_id?,
            chain_id: chain_id?,
            checkpoint_signing_key: checkpoint_signing_key?,
            checkpoint_dir: checkpoint_dir?,
            checkpoint_interval,
            previous_keys,
            max_clock_skew,
        })
    }

    /// `[[audit.witnesses]]`: `url` (the submission prefix) and `vkey` (the witness' cosigning
    /// key, type 0x04), each witness named once.
    fn witnesses(&mut self, t: &Table) -> Vec<crate::audit::witness::Witness> {
        let items = match t.get("witnesses") {
            None => return Vec::new(),
            Some(Value::Array(items)) => items,
            Some(_) => {
                self.err(
                    "audit.witnesses",
                    "must be an array of tables ([[audit.witnesses]])",
                );
                return Vec::new();
            }
        };
        let mut out: Vec<crate::audit::witness::Witness> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let path = format!("audit.witnesses[{i}]");
            let Value::Table(w) = item else {
                self.err(&path, "must be a table");
                continue;
            };
            self.unknown_keys(w, &path, &["url", "vkey"]);
            let url = self
                .string(w, "url", &path, true)
                .and_then(|u| self.http_url(&u, &join(&path, "url")));
            let vkey = self.string(w, "vkey", &path, true).and_then(|v| {
                match crate::audit::tlog::Vkey::parse(&v) {
                    Ok(k) if k.kind == crate::audit::tlog::TYPE_COSIGNATURE_V1 => Some(k),
                    Ok(_) => {
                        self.err(
                            &join(&path, "vkey"),
                            "is not a cosignature key (type 0x04, c2sp.org/tlog-cosignature)",
                        );
                        None
                    }
                    Err(e) => {
                        self.err(&join(&path, "vkey"), e);
                        None
                    }
                }
            });
            if let (Some(url), Some(vkey)) = (url, vkey) {
                if out.iter().any(|o| o.vkey.name == vkey.name) {
                    self.err(
                        &join(&path, "vkey"),
                        format!("witness {} is listed twice", vkey.name),
                    );
                    continue;
                }
                out.push(crate::audit::witness::Witness {
                    url: url.to_string(),
                    vkey,
                });
            }
        }
        out
    }

    /// `[audit.previous_keys]`: `key_id = "path/to/key"`, each key id unique.
    fn previous_keys(&mut self, t: &Table) -> Vec<(String, Key32)> {
        let Some(table) = self.table(t, "previous_keys", "audit") else {
            return Vec::new();
        };
        let current = t.get("key_id").and_then(|v| v.as_str()).unwrap_or("");
        let mut out = Vec::new();
        for id in table.keys() {
            let p = format!("audit.previous_keys.{id}");
            let ok = !id.is_empty()
                && id.len() <= 64
                && id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
            if !ok {
                self.err(
                    &p,
                    "a key id must be 1-64 characters of letters, digits, '_', '-', '.'",
                );
                continue;
            }
            if id == current {
                self.err(&p, "is the current key_id; a retired key needs its own id");
                continue;
            }
            if let Some(key) = self.key_file(table, id, "audit.previous_keys", true) {
                out.push((id.clone(), key));
            }
        }
        out
    }

    /// A short identifier: 1-64 chars of `[A-Za-z0-9_.-]`.
    fn ident(&mut self, t: &Table, key: &str, path: &str) -> Option<String> {
        let v = self.string(t, key, path, true)?;
        let ok = v.len() <= 64
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if ok {
            Some(v)
        } else {
            self.err(
                &join(path, key),
                "must be 1-64 characters of letters, digits, '_', '-', '.'",
            );
            None
        }
    }

    fn array_of_tables<'t>(&mut self, doc: &'t Table, key: &str) -> Vec<&'t Table> {
        match doc.get(key) {
            None => {
                self.err(key, "at least one is required");
                Vec::new()
            }
            Some(Value::Array(items)) => {
                let mut out = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    match item {
                        Value::Table(t) => out.push(t),
                        _ => self.err(&format!("{key}[{i}]"), "must be a table"),
                    }
                }
                if items.is_empty() {
                    self.err(key, "at least one is required");
                }
                out
            }
            Some(_) => {
                self.err(key, format!("must be an array of tables ([[{key}]])"));
                Vec::new()
            }
        }
    }

    fn issuers(&mut self, doc: &Table) -> Vec<IssuerConfig> {
        let tables = self.array_of_tables(doc, "issuers");
        let mut out = Vec::new();
        let mut names = BTreeSet::new();
        let mut issuers = BTreeSet::new();
        for (i, t) in tables.into_iter().enumerate() {
            let path = format!("issuers[{i}]");
            self.unknown_keys(
                t,
                &path,
                &[
                    "name",
                    "issuer",
                    "audiences",
                    "jwks_uri",
                    "algorithms",
                    "username_claim",
                    "agent_claim",
                    "leeway",
                    "max_key_age",
                ],
            );
            let name = self.ident(t, "name", &path);
            if let Some(n) = &name {
                if !names.insert(n.clone()) {
                    self.err(
                        &format!("{path}.name"),
                        format!("duplicate issuer name \"{n}\""),
                    );
                }
            }
            let issuer = self.string(t, "issuer", &path, true).and_then(|s| {
                let p = format!("{path}.issuer");
                self.http_url(&s, &p)?;
                if !issuers.insert(s.clone()) {
                    self.err(&p, format!("issuer \"{s}\" is configured twice"));
                }
                Some(s)
            });
            let audiences = self.string_list(t, "audiences", &path, true);
            if matches!(&audiences, Some(a) if a.is_empty()) {
                self.err(&format!("{path}.audiences"), "must not be empty");
            }
            let jwks_uri = self
                .string(t, "jwks_uri", &path, false)
                .and_then(|s| self.http_url(&s, &format!("{path}.jwks_uri")));
            let algorithms = self
                .string_list(t, "algorithms", &path, true)
                .and_then(|algs| self.algorithms(&algs, &format!("{path}.algorithms")));
            let username_claim = self.string(t, "username_claim", &path, true);
            let agent_claim = self.string(t, "agent_claim", &path, true);
            let leeway = self.duration(t, "leeway", &path, Duration::from_secs(30));
            if leeway > Duration::from_secs(300) {
                self.err(&format!("{path}.leeway"), "must be at most 5m");
            }
            let max_key_age =
                self.duration(t, "max_key_age", &path, Duration::from_secs(24 * 3600));
            if max_key_age < Duration::from_secs(1) || max_key_age > Duration::from_secs(30 * 86400)
            {
                self.err(&format!("{path}.max_key_age"), "must be between 1s and 30d");
            }
            if let (
                Some(name),
                Some(issuer),
                Some(audiences),
                Some(algorithms),
                Some(username_claim),
                Some(agent_claim),
            ) = (
                name,
                issuer,
                audiences,
                algorithms,
                username_claim,
                agent_claim,
            ) {
                out.push(IssuerConfig {
                    name,
                    issuer,
                    audiences,
                    jwks_uri,
                    algorithms,
                    username_claim,
                    agent_claim,
                    leeway,
                    max_key_age,
                });
            }
        }
        out
    }

    fn algorithms(&mut self, names: &[String], p: &str) -> Option<Vec<Algorithm>> {
        if names.is_empty() {
            self.err(p, "must not be empty");
            return None;
        }
        let mut out = Vec::new();
        let mut ok = true;
        for n in names {
            let alg = match n.as_str() {
                "RS256" => Algorithm::RS256,
                "RS384" => Algorithm::RS384,
                "RS512" => Algorithm::RS512,
                "PS256" => Algorithm::PS256,
                "PS384" => Algorithm::PS384,
                "PS512" => Algorithm::PS512,
                "ES256" => Algorithm::ES256,
                "ES384" => Algorithm::ES384,
                "EdDSA" => Algorithm::EdDSA,
                "HS256" | "HS384" | "HS512" => {
                    self.err(
                        p,
                        format!(
                            "{n} is symmetric and cannot be verified with an issuer's public keys"
                        ),
                    );
                    ok = false;
                    continue;
                }
                other => {
                    self.err(
                        p,
                        format!("unsupported algorithm \"{other}\" (RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA)"),
                    );
                    ok = false;
                    continue;
                }
            };
            out.push(alg);
        }
        ok.then_some(out)
    }

    fn workspaces(&mut self, doc: &Table) -> Vec<WorkspaceConfig> {
        let tables = self.array_of_tables(doc, "workspaces");
        let mut out = Vec::new();
        let mut names = BTreeSet::new();
        let mut hosts_seen = BTreeSet::new();
        for (i, t) in tables.into_iter().enumerate() {
            let path = format!("workspaces[{i}]");
            self.unknown_keys(
                t,
                &path,
                &[
                    "name",
                    "url",
                    "hosts",
                    "token_source",
                    "client_id",
                    "scopes",
                    "allowed_agents",
                    "issuers",
                    "rate_limits",
                    "tenant_id",
                    "entra_token_url",
                    "client_secret_file",
                ],
            );
            let name = self.ident(t, "name", &path);
            if let Some(n) = &name {
                if !names.insert(n.clone()) {
                    self.err(
                        &format!("{path}.name"),
                        format!("duplicate workspace name \"{n}\""),
                    );
                }
            }
            let url = self
                .string(t, "url", &path, true)
                .and_then(|s| self.http_url(&s, &format!("{path}.url")));
            let hosts = self
                .string_list(t, "hosts", &path, false)
                .unwrap_or_default()
                .into_iter()
                .map(|h| h.to_ascii_lowercase())
                .collect::<Vec<_>>();
            for h in &hosts {
                if !hosts_seen.insert(h.clone()) {
                    self.err(
                        &format!("{path}.hosts"),
                        format!("host \"{h}\" is claimed by two workspaces"),
                    );
                }
            }
            let token_source = match self.string(t, "token_source", &path, true).as_deref() {
                Some("federation") => Some(TokenSourceKind::Federation),
                Some("u2m") => Some(TokenSourceKind::U2m),
                Some("entra_obo") => Some(TokenSourceKind::EntraObo),
                Some(other) => {
                    self.err(
                        &format!("{path}.token_source"),
                        format!("\"{other}\" is not one of federation, u2m, entra_obo"),
                    );
                    None
                }
                None => None,
            };
            let client_id = self.string(t, "client_id", &path, false);
            let scopes = self.string_list(t, "scopes", &path, true);
            if matches!(&scopes, Some(s) if s.is_empty()) {
                self.err(&format!("{path}.scopes"), "must not be empty");
            }
            let allowed_agents = self.string_list(t, "allowed_agents", &path, false);
            let rate_limits = self.rate_limits(t, &path);
            let issuers = self.string_list(t, "issuers", &path, false);
            if matches!(&issuers, Some(i) if i.is_empty()) {
                self.err(
                    &format!("{path}.issuers"),
                    "must not be empty (leave it out to admit every issuer)",
                );
            }
            let entra = self.entra_keys(t, &path, name.as_deref(), token_source, &client_id);
            if let (Some(name), Some(url), Some(token_source), Some(scopes), Some(entra)) =
                (name, url, token_source, scopes, entra)
            {
                out.push(WorkspaceConfig {
                    name,
                    url,
                    hosts,
                    token_source,
                    client_id,
                    scopes,
                    allowed_agents,
                    rate_limits,
                    issuers,
                    tenant_id: entra.tenant_id,
                    entra_token_url: entra.token_url,
                    client_secret: entra.client_secret,
                });
            }
        }
        out
    }

    /// The keys `u2m` and `entra_obo` need: `client_id` for both; `tenant_id` (or
    /// `entra_token_url`) and `client_secret_file` for `entra_obo`, which are refused elsewhere.
    fn entra_keys(
        &mut self,
        t: &Table,
        path: &str,
        name: Option<&str>,
        source: Option<TokenSourceKind>,
        client_id: &Option<String>,
    ) -> Option<EntraKeys> {
        let obo = source == Some(TokenSourceKind::EntraObo);
        if matches!(
            source,
            Some(TokenSourceKind::U2m | TokenSourceKind::EntraObo)
        ) && client_id.is_none()
        {
            self.err(
                &format!("{path}.client_id"),
                "is required for token_source u2m and entra_obo (the OAuth app)",
            );
        }
        let tenant_id = self.string(t, "tenant_id", path, false);
        if let Some(tenant) = &tenant_id {
            let ok = tenant.len() <= 64
                && tenant
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
            if !ok {
                self.err(
                    &format!("{path}.tenant_id"),
                    "must be a tenant id or domain (letters, digits, '-', '.', '_')",
                );
            }
        }
        let token_url = self
            .string(t, "entra_token_url", path, false)
            .and_then(|s| self.http_url(&s, &format!("{path}.entra_token_url")));
        // A workspace's name is `[A-Za-z0-9_.-]`, so its env name is well-formed; an invalid
        // name is reported by `ident` already.
        let env_path = format!("workspace_{}", name.unwrap_or("invalid"));
        let client_secret = match self
            .env
            .var(&Self::env_name(&env_path, "client_secret_file"))
        {
            Some(_) if t.contains_key("client_secret_file") => {
                self.err(
                    &format!("{path}.client_secret_file"),
                    format!(
                        "is set both in the file and by {}; keep one",
                        Self::env_name(&env_path, "client_secret_file")
                    ),
                );
                None
            }
            Some(v) => Some(v),
            None => self.secret_text(t, "client_secret_file", path, false),
        }
        .and_then(|text| {
            let secret = text.trim().to_string();
            if secret.is_empty() {
                self.err(&format!("{path}.client_secret_file"), "the secret is empty");
                None
            } else {
                Some(SecretString::new(secret))
            }
        });
        if obo {
            if tenant_id.is_none() && token_url.is_none() && !t.contains_key("entra_token_url") {
                self.err(
                    &format!("{path}.tenant_id"),
                    "is required for token_source entra_obo (or set entra_token_url)",
                );
            }
            if client_secret.is_none() && !t.contains_key("client_secret_file") {
                self.err(
                    &format!("{path}.client_secret_file"),
                    format!(
                        "is required for token_source entra_obo (or set {})",
                        Self::env_name(&env_path, "client_secret_file")
                    ),
                );
            }
        } else {
            for key in ["tenant_id", "entra_token_url", "client_secret_file"] {
                if t.contains_key(key) {
                    self.err(
                        &format!("{path}.{key}"),
                        "is used only with token_source entra_obo",
                    );
                }
            }
        }
        Some(EntraKeys {
            tenant_id,
            token_url,
            client_secret,
        })
    }

    fn policy(&mut self, t: &Table, workspaces: &[WorkspaceConfig]) -> Option<PolicyConfig> {
        self.unknown_keys(
            t,
            "policy",
            &[
                "allowed_agents",
                "deny",
                "allow",
                "allow_statements",
                "allow_commands",
                "tool_deny",
                "tool_allow",
            ],
        );
        let allowed_agents = self
            .string_list(t, "allowed_agents", "policy", false)
            .unwrap_or_default();
        let deny = self.rules(t, "deny", workspaces);
        let allow = self.rules(t, "allow", workspaces);
        let allow_statements = self.scopes(t, "allow_statements", workspaces);
        let allow_commands = self.scopes(t, "allow_commands", workspaces);
        let tool_deny = self.tool_rules(t, "tool_deny", workspaces);
        let tool_allow = self.tool_rules(t, "tool_allow", workspaces);
        Some(PolicyConfig {
            allowed_agents,
            deny,
            allow,
            allow_statements,
            allow_commands,
            tool_deny,
            tool_allow,
        })
    }

    /// `policy.<key>`: the tables of an array of tables, each with its path for errors
    /// (`policy.<key>[i]`); anything else is reported with `example`.
    fn policy_tables<'t>(
        &mut self,
        t: &'t Table,
        key: &str,
        example: &str,
    ) -> Vec<(String, &'t Table)> {
        let items = match t.get(key) {
            None => return Vec::new(),
            Some(Value::Array(items)) => items,
            Some(_) => {
                self.err(
                    &format!("policy.{key}"),
                    format!("must be an array of tables like {example}"),
                );
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let path = format!("policy.{key}[{i}]");
            match item {
                Value::Table(rt) => out.push((path, rt)),
                _ => self.err(&path, format!("must be a table like {example}")),
            }
        }
        out
    }

    /// A rule's `agents` and `workspaces` (empty = any); every workspace must be configured.
    fn rule_scope(
        &mut self,
        rt: &Table,
        path: &str,
        workspaces: &[WorkspaceConfig],
    ) -> (Vec<String>, Vec<String>) {
        let agents = self
            .string_list(rt, "agents", path, false)
            .unwrap_or_default();
        let ws = self
            .string_list(rt, "workspaces", path, false)
            .unwrap_or_default();
        for w in &ws {
            if !workspaces.iter().any(|c| &c.name == w) {
                self.err(
                    &format!("{path}.workspaces"),
                    format!("unknown workspace \"{w}\""),
                );
            }
        }
        (agents, ws)
    }

    /// `policy.<key>`: an array of `{ server = "/api/2.0/mcp/...", tools = [...], agents = [...],
    /// workspaces = [...] }`.
    fn tool_rules(
        &mut self,
        t: &Table,
        key: &str,
        workspaces: &[WorkspaceConfig],
    ) -> Vec<ToolRuleConfig> {
        let mut out = Vec::new();
        let example = "{ server = \"/api/2.0/mcp/sql\", tools = [\"execute_sql\"] }";
        for (path, rt) in self.policy_tables(t, key, example) {
            self.unknown_keys(rt, &path, &["server", "tools", "agents", "workspaces"]);
            let server = self.string(rt, "server", &path, true);
            if let Some(s) = &server {
                if !s.starts_with("/api/2.0/mcp/") {
                    self.err(
                        &format!("{path}.server"),
                        "must be an MCP server path under /api/2.0/mcp/",
                    );
                }
                if s.contains('*') && !(s.ends_with("/*") && s.matches('*').count() == 1) {
                    self.err(
                        &format!("{path}.server"),
                        "a wildcard is allowed only as a trailing \"/*\"",
                    );
                }
            }
            let tools = self
                .string_list(rt, "tools", &path, false)
                .unwrap_or_default();
            let (agents, ws) = self.rule_scope(rt, &path, workspaces);
            if let Some(server) = server {
                out.push(ToolRuleConfig {
                    server,
                    tools,
                    agents,
                    workspaces: ws,
                });
            }
        }
        out
    }

    /// `workspaces[i].rate_limits = { user = "600/min", agent = "6000/min", user_agent = ".." }`.
    fn rate_limits(&mut self, t: &Table, path: &str) -> RateLimits {
        let Some(v) = t.get("rate_limits") else {
            return RateLimits::default();
        };
        let p = format!("{path}.rate_limits");
        let Value::Table(rt) = v else {
            self.err(&p, "must be a table like { user = \"600/min\" }");
            return RateLimits::default();
        };
        self.unknown_keys(rt, &p, &["user", "agent", "user_agent"]);
        let mut one = |key: &str| -> Option<Rate> {
            let text = self.string(rt, key, &p, false)?;
            let rate = Rate::parse(&text);
            if rate.is_none() {
                self.err(
                    &format!("{p}.{key}"),
                    format!("\"{text}\" is not a rate like \"600/min\" (N/s, N/min or N/h, N from 1 to 1000000)"),
                );
            }
            rate
        };
        RateLimits {
            user: one("user"),
            agent: one("agent"),
            user_agent: one("user_agent"),
        }
    }

    /// `policy.<key>`: an array of `{ agents = [...], workspaces = [...] }`.
    fn scopes(&mut self, t: &Table, key: &str, workspaces: &[WorkspaceConfig]) -> Vec<ScopeConfig> {
        let mut out = Vec::new();
        let example = "{ agents = [\"dba-bot\"], workspaces = [\"prod\"] }";
        for (path, rt) in self.policy_tables(t, key, example) {
            self.unknown_keys(rt, &path, &["agents", "workspaces"]);
            let (agents, ws) = self.rule_scope(rt, &path, workspaces);
            if agents.is_empty() {
                // An empty list would lift the guardrail for every agent: say so explicitly.
                self.err(
                    &format!("{path}.agents"),
                    "must name the agents (the guardrail is lifted only for them)",
                );
            }
            out.push(ScopeConfig {
                agents,
                workspaces: ws,
            });
        }
        out
    }

    fn rules(&mut self, t: &Table, key: &str, workspaces: &[WorkspaceConfig]) -> Vec<RuleConfig> {
        let items = match t.get(key) {
            None => return Vec::new(),
            Some(Value::Array(items)) => items,
            Some(_) => {
                self.err(&format!("policy.{key}"), "must be an array of rule tables");
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let path = format!("policy.{key}[{i}]");
            let Value::Table(rt) = item else {
                self.err(
                    &path,
                    "must be a table like { methods = [\"POST\"], path = \"/api/...\" }",
                );
                continue;
            };
            self.unknown_keys(rt, &path, &["methods", "path", "agents", "workspaces"]);
            let methods = self
                .string_list(rt, "methods", &path, false)
                .unwrap_or_default()
                .into_iter()
                .map(|m| m.to_ascii_uppercase())
                .collect::<Vec<_>>();
            for m in &methods {
                if !m.chars().all(|c| c.is_ascii_alphabetic()) {
                    self.err(
                        &format!("{path}.methods"),
                        format!("\"{m}\" is not an HTTP method"),
                    );
                }
            }
            let rule_path = self.string(rt, "path", &path, true);
            if let Some(p) = &rule_path {
                if !p.starts_with('/') {
                    self.err(&format!("{path}.path"), "must start with '/'");
                }
                if p.contains('*') && !(p.ends_with("/*") && p.matches('*').count() == 1) {
                    self.err(
                        &format!("{path}.path"),
                        "a wildcard is allowed only as a trailing \"/*\"",
                    );
                }
            }
            let (agents, ws) = self.rule_scope(rt, &path, workspaces);
            if let Some(p) = rule_path {
                out.push(RuleConfig {
                    methods,
                    path: p,
                    agents,
                    workspaces: ws,
                });
            }
        }
        out
    }
}

/// What [`Reader::entra_keys`] reads.
struct EntraKeys {
    tenant_id: Option<String>,
    token_url: Option<url::Url>,
    client_secret: Option<SecretString>,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "aegis".to_string())
}

/// True when `ip` is on the loopback range.
pub fn is_loopback_ip(ip: IpAddr) -> bool {
    ip.is_loopback()
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

const ADMIN_OIDC_KEYS: &[&str] = &[
    "issuer",
    "client_id",
    "client_secret_file",
    "redirect_uri",
    "scopes",
    "roles_claim",
    "viewer_values",
    "operator_values",
    "auditor_values",
];

impl Reader<'_> {
    /// `[admin.oidc]` and `admin.allow_break_glass`: returns the static token as far as it may
    /// still be used, and the OIDC settings.
    fn admin_oidc(
        &mut self,
        admin: &Table,
        issuers: &[IssuerConfig],
        token: Option<SecretString>,
    ) -> (Option<SecretString>, Option<ConsoleOidcConfig>) {
        let break_glass = match admin.get("allow_break_glass") {
            None => None,
            Some(Value::Boolean(b)) => Some(*b),
            Some(v) => {
                self.err(
                    "admin.allow_break_glass",
                    format!("must be true or false, not {v}"),
                );
                return (None, None);
            }
        };
        let token_given = admin.contains_key("console_token_file")
            || self
                .env
                .var(&Self::env_name("admin", "console_token_file"))
                .is_some();
        let Some(t) = self.table(admin, "oidc", "admin") else {
            if break_glass.is_some() {
                self.err(
                    "admin.allow_break_glass",
                    "applies only with [admin.oidc]; without it the console token is the only \
                     sign-in (remove this key, or configure [admin.oidc])",
                );
            }
            return (token, None);
        };
        let t = t.clone();
        const P: &str = "admin.oidc";
        self.unknown_keys(&t, P, ADMIN_OIDC_KEYS);
        let oidc = self.console_oidc(&t, P, issuers);
        let token = match (break_glass, token_given) {
            (Some(true), true) => token,
            (Some(true), false) => {
                self.err(
                    "admin.console_token_file",
                    "is required when admin.allow_break_glass = true (the break-glass token)",
                );
                None
            }
            // Explicitly off: the token may stay mounted for an emergency; it is never accepted.
            (Some(false), _) | (None, false) => None,
            (None, true) => {
                self.err(
                    "admin.allow_break_glass",
                    "is required when both [admin.oidc] and admin.console_token_file are set: \
                     with IdP sign-in the static token is a break-glass sign-in only; set it to \
                     true to allow it or false to refuse it",
                );
                None
            }
        };
        (token, oidc)
    }

    fn console_oidc(
        &mut self,
        t: &Table,
        p: &str,
        issuers: &[IssuerConfig],
    ) -> Option<ConsoleOidcConfig> {
        let issuer_name = self.string(t, "issuer", p, true);
        let issuer = issuer_name.as_ref().and_then(|name| {
            let found = issuers.iter().find(|i| i.name == *name);
            if found.is_none() {
                let names: Vec<&str> = issuers.iter().map(|i| i.name.as_str()).collect();
                self.err(
                    &join(p, "issuer"),
                    format!(
                        "\"{name}\" is not the name of a configured issuer (configured: {})",
                        if names.is_empty() {
                            "none".to_string()
                        } else {
                            names.join(", ")
                        }
                    ),
                );
            }
            found
        });
        if let Some(iss) = issuer {
            // Discovery, authorization and token endpoints all hang off the issuer URL.
            let _ = self.http_url(&iss.issuer, &join(p, "issuer"));
        }
        let client_id = self.string(t, "client_id", p, true);
        if client_id
            .as_ref()
            .is_some_and(|c| c.chars().any(char::is_control))
        {
            self.err(&join(p, "client_id"), "must not hold control characters");
        }
        let client_secret = self
            .secret_text(t, "client_secret_file", p, false)
            .and_then(|text| {
                let s = text.trim().to_string();
                if s.is_empty() {
                    self.err(&join(p, "client_secret_file"), "the client secret is empty");
                    None
                } else {
                    Some(SecretString::new(s))
                }
            });
        let redirect_uri = self.string(t, "redirect_uri", p, true).and_then(|raw| {
            let rp = join(p, "redirect_uri");
            let u = self.http_url(&raw, &rp)?;
            if u.path() != CONSOLE_OIDC_CALLBACK_PATH || u.query().is_some() || u.fragment().is_some()
            {
                self.err(
                    &rp,
                    format!(
                        "must be this console's callback, <scheme>://<host>[:port]{CONSOLE_OIDC_CALLBACK_PATH} \
                         with no query or fragment, not \"{raw}\""
                    ),
                );
                return None;
            }
            Some(u)
        });
        let scopes = match self.string_list(t, "scopes", p, false) {
            None if t.contains_key("scopes") => None,
            None => Some(vec!["openid".into(), "profile".into(), "email".into()]),
            Some(list) if !list.iter().any(|s| s == "openid") => {
                self.err(&join(p, "scopes"), "must include \"openid\"");
                None
            }
            Some(list) if list.iter().any(|s| s.contains(char::is_whitespace)) => {
                self.err(&join(p, "scopes"), "a scope must not contain spaces");
                None
            }
            Some(list) => Some(list),
        };
        let roles_claim = self.string(t, "roles_claim", p, true);
        let values = |r: &mut Self, key: &str| -> Option<Vec<String>> {
            if !t.contains_key(key) {
                return Some(Vec::new());
            }
            r.string_list(t, key, p, false)
        };
        let viewer = values(self, "viewer_values");
        let operator = values(self, "operator_values");
        let auditor = values(self, "auditor_values");
        if let (Some(v), Some(o), Some(a)) = (&viewer, &operator, &auditor) {
            if v.is_empty() && o.is_empty() && a.is_empty() {
                self.err(
                    &join(p, "viewer_values"),
                    "no role mapping: set at least one of viewer_values, operator_values, \
                     auditor_values to the values of the roles claim that grant that role",
                );
            }
        }
        Some(ConsoleOidcConfig {
            issuer_name: issuer_name?,
            issuer: issuer?.issuer.clone(),
            client_id: client_id?,
            client_secret,
            redirect_uri: redirect_uri?,
            scopes: scopes?,
            roles_claim: roles_claim?,
            viewer_values: viewer?,
            operator_values: operator?,
            auditor_values: auditor?,
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
