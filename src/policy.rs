//! Route → workspace, path rules, agent allowlist.
//!
//! Agents get an agent-safe policy by default: they may not mint long-lived credentials, get a
//! raw Databricks token from the OAuth endpoints, read secrets, change permissions, write SCIM or
//! call account APIs unless an operator lifts a rule with `[policy] allow`. Operator `deny` rules
//! always win.
//!
//! Paths are matched after [`normalize_path`], which undoes every trick that lets a request reach
//! the same Databricks handler under a different spelling (`//`, `/./`, `/../`, `%2e`, `%2f`,
//! double encoding, `\`, `;params`, letter case), so a rule cannot be dodged by re-spelling.

pub mod blocklist;
pub mod sql;
pub mod thrift;

use std::collections::HashMap;

use crate::config::{Config, RuleConfig, WorkspaceConfig};

pub use blocklist::AgentBlocklist;

#[derive(Debug, Clone)]
enum Pattern {
    Exact(String),
    /// `/a/b/*` matches `/a/b` and everything below it.
    Prefix(String),
    /// Segment by segment, a `*` segment standing for any one segment (`/oidc/accounts/*/v1`);
    /// with `below`, everything under a match too. Only the built-in defaults use it: a
    /// configured rule may only end in `/*`.
    Segments {
        segments: Vec<String>,
        below: bool,
    },
}

#[derive(Debug, Clone)]
struct Rule {
    methods: Vec<String>,
    pattern: Pattern,
    agents: Vec<String>,
    workspaces: Vec<String>,
}

/// The built-in agent-safe deny rules: (methods, path). Empty methods = every method.
const AGENT_SAFE_DEFAULTS: &[(&[&str], &str)] = &[
    // Long-lived credentials.
    (&["POST"], "/api/2.0/token/create"),
    (&[], "/api/2.0/token-management/*"),
    (&[], "/api/2.0/credentials-manager/*"),
    // Permission changes: Unity Catalog grants and workspace object ACLs.
    (
        &["PATCH", "PUT", "POST"],
        "/api/2.1/unity-catalog/permissions/*",
    ),
    (
        &["PATCH", "PUT", "POST"],
        "/api/2.0/unity-catalog/permissions/*",
    ),
    (&["PATCH", "PUT", "POST"], "/api/2.0/permissions/*"),
    // Identity writes.
    (
        &["POST", "PUT", "PATCH", "DELETE"],
        "/api/2.0/preview/scim/v2/*",
    ),
    (&["POST", "PUT", "PATCH", "DELETE"], "/api/2.0/scim/v2/*"),
    // Secrets.
    (&[], "/api/2.0/secrets/*"),
    // Account-level APIs.
    (&[], "/api/2.0/accounts/*"),
    (&[], "/api/2.1/accounts/*"),
    // Workspace-wide security settings.
    (&["PATCH", "PUT", "POST"], "/api/2.0/workspace-conf"),
    (
        &["POST", "PUT", "PATCH", "DELETE"],
        "/api/2.0/ip-access-lists/*",
    ),
    // Legacy SQL object ACLs (queries, dashboards, alerts, warehouses): permission changes.
    (
        &["POST", "PUT", "PATCH", "DELETE"],
        "/api/2.0/preview/sql/permissions/*",
    ),
    // Git credentials: an agent could store its own token as the user's, or remove theirs.
    (
        &["POST", "PUT", "PATCH", "DELETE"],
        "/api/2.0/git-credentials/*",
    ),
    // Workspace settings (default namespace, restrict-workspace-admins, compliance profiles...).
    (&["POST", "PUT", "PATCH", "DELETE"], "/api/2.0/settings/*"),
    // Unity Catalog workspace bindings: which workspaces may reach a catalog or a credential
    // (also under the older `workspace-bindings` name).
    (
        &["POST", "PUT", "PATCH", "DELETE"],
        "/api/2.1/unity-catalog/bindings/*",
    ),
    (
        &["POST", "PUT", "PATCH", "DELETE"],
        "/api/2.1/unity-catalog/workspace-bindings/*",
    ),
    // Delta Sharing: creating, changing or deleting shares (adding a table to a share publishes
    // it), their recipient grants, recipients (and rotating their tokens) and providers all
    // change who outside the workspace can read data. Reading them stays allowed.
    (
        &["POST", "PUT", "PATCH", "DELETE"],
        "/api/2.1/unity-catalog/shares/*",
    ),
    (
        &["POST", "PUT", "PATCH", "DELETE"],
        "/api/2.1/unity-catalog/recipients/*",
    ),
    (
        &["POST", "PUT", "PATCH", "DELETE"],
        "/api/2.1/unity-catalog/providers/*",
    ),
    (
        &["POST", "PUT", "PATCH", "DELETE"],
        "/api/2.0/data-sharing/recipients/*",
    ),
    // Publishing an AI/BI dashboard: with `embed_credentials` every viewer reads its data with
    // the publisher's access, a permission change the body decides; any publish is refused.
    (
        &["POST", "PUT", "PATCH"],
        "/api/2.0/lakeview/dashboards/*/published",
    ),
    // A cluster's owner (whose identity single-user clusters run as).
    (&["POST"], "/api/2.1/clusters/change-owner"),
    (&["POST"], "/api/2.0/clusters/change-owner"),
    // The workspace's and the account's OAuth endpoints: with its IdP JWT as the subject token
    // an agent would get a raw Databricks token (RFC 8693 token exchange) and could use it without
    // aegis. The metadata documents (`/oidc/.well-known/*`, `/.well-known/databricks-config`)
    // stay reachable.
    (&[], "/oidc/v1/token/*"),
    (&[], "/oidc/v1/authorize/*"),
    (&[], "/oidc/accounts/*/v1/token/*"),
    (&[], "/oidc/accounts/*/v1/authorize/*"),
];

/// The routes whose bodies carry an agent's SQL (or code).
enum SqlRoute {
    Statements,
    McpSql,
    /// The command execution API: SQL, or Python, Scala and R that can issue any SQL.
    Commands,
    /// The SQL warehouse endpoint (and the clusters' one, `/sql/protocolv1/...`): one
    /// TCLIService Thrift call per body.
    Thrift,
}

/// Whether `path` (normalized or not) is under `/sql/`, where the SQL warehouse and cluster
/// endpoints take TCLIService calls over HTTP (`/sql/1.0/warehouses/<id>`,
/// `/sql/protocolv1/o/<org>/<cluster>`). Compared without allocating.
pub fn is_sql_endpoint(path: &str) -> bool {
    path.get(..5)
        .is_some_and(|p| p.eq_ignore_ascii_case("/sql/"))
}

/// The fields of a command execution request the guardrail reads. Deserialized into a struct so
/// that a body naming a field twice (which another JSON reader might resolve the other way) is
/// refused as unreadable.
#[derive(serde::Deserialize)]
struct CommandBody {
    language: Option<serde_json::Value>,
    command: Option<serde_json::Value>,
}

const NOT_SQL_COMMAND: &str = "runs Python, Scala or R, which can issue any SQL";

/// The messages of a JSON-RPC body: one message, or each message of a batch.
fn jsonrpc_messages(doc: &serde_json::Value) -> Vec<&serde_json::Value> {
    match doc {
        serde_json::Value::Array(batch) => batch.iter().collect(),
        one => vec![one],
    }
}

/// An MCP tool rule, as the policy matches it.
fn tool_rule(c: &crate::config::ToolRuleConfig) -> (Rule, Vec<String>) {
    (
        Rule::new(
            Vec::new(),
            &c.server,
            c.agents.clone(),
            c.workspaces.clone(),
        ),
        c.tools.clone(),
    )
}

/// Why the MCP tool policy refused a request.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolBlock {
    /// The tool refused (None: the body could not be read, or a call named no tool).
    pub tool: Option<String>,
    pub jsonrpc_id: Option<serde_json::Value>,
}

/// Why the statement guardrail refused a request.
#[derive(Debug, Clone, PartialEq)]
pub struct StatementBlock {
    /// Fixed text (for logs; the deny body carries the reason code only).
    pub why: &'static str,
    /// The JSON-RPC id of the refused MCP message, so the answer can be a JSON-RPC error.
    pub jsonrpc_id: Option<serde_json::Value>,
    pub kind: sql::StatementKind,
    /// See [`sql::Classified::fingerprint`]; zeros when there was no statement to read.
    pub fingerprint: [u8; 32],
    /// The text itself, only when `audit.record_statement_text` is on (at most
    /// [`MAX_RECORDED_TEXT`] bytes).
    pub text: Option<String>,
}

/// What the statement guardrail saw in a request it let through (for the audit row).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatementSeen {
    pub kind: sql::StatementKind,
    pub fingerprint: [u8; 32],
    /// As in [`StatementBlock::text`].
    pub text: Option<String>,
}

/// The most of a statement's text an audit row keeps; the fingerprint covers all of it.
pub const MAX_RECORDED_TEXT: usize = 16 * 1024;

/// `text` cut to at most [`MAX_RECORDED_TEXT`] bytes, at a character boundary.
fn recorded(text: &str) -> String {
    let mut end = text.len().min(MAX_RECORDED_TEXT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

pub struct Policy {
    workspaces: Vec<WorkspaceConfig>,
    by_host: HashMap<String, usize>,
    allowed_agents: Vec<String>,
    defaults: Vec<Rule>,
    deny: Vec<Rule>,
    allow: Vec<Rule>,
    /// Agents (per workspace) the statement guardrail does not apply to.
    allow_statements: Vec<crate::config::ScopeConfig>,
    /// Agents (per workspace) that may run Python, Scala and R commands.
    allow_commands: Vec<crate::config::ScopeConfig>,
    /// MCP tool rules: (server pattern, tools) for deny and allow.
    tool_deny: Vec<(Rule, Vec<String>)>,
    tool_allow: Vec<(Rule, Vec<String>)>,
    /// Keep the SQL (or command) text in the audit row (`audit.record_statement_text`).
    record_text: bool,
    /// The configured issuers' `issuer` URLs, the OAuth authorization servers MCP clients are
    /// sent to by the Protected Resource Metadata (RFC 9728).
    authorization_servers: Vec<String>,
}

impl Rule {
    fn from_config(c: &RuleConfig) -> Rule {
        Rule::new(
            c.methods.clone(),
            &c.path,
            c.agents.clone(),
            c.workspaces.clone(),
        )
    }

    fn new(methods: Vec<String>, path: &str, agents: Vec<String>, workspaces: Vec<String>) -> Rule {
        let lower = path.to_ascii_lowercase();
        let (base, below) = match lower.strip_suffix("/*") {
            Some(prefix) => (prefix, true),
            None => (lower.as_str(), false),
        };
        let base = normalize_path(base).to_ascii_lowercase();
        let pattern = if base.split('/').any(|s| s == "*") {
            Pattern::Segments {
                segments: base.split('/').skip(1).map(str::to_string).collect(),
                below,
            }
        } else if below {
            Pattern::Prefix(base)
        } else {
            Pattern::Exact(base)
        };
        Rule {
            methods,
            pattern,
            agents,
            workspaces,
        }
    }

    fn matches(
        &self,
        method: &str,
        lower_path: &str,
        agent: Option<&str>,
        workspace: &str,
    ) -> bool {
        if !self.methods.is_empty() && !self.methods.iter().any(|m| m.eq_ignore_ascii_case(method))
        {
            return false;
        }
        if !self.agents.is_empty() && !agent.is_some_and(|a| self.agents.iter().any(|x| x == a)) {
            return false;
        }
        if !self.workspaces.is_empty() && !self.workspaces.iter().any(|w| w == workspace) {
            return false;
        }
        match &self.pattern {
            Pattern::Exact(p) => lower_path == p,
            Pattern::Prefix(p) => {
                lower_path == p
                    || (lower_path.starts_with(p.as_str())
                        && lower_path.as_bytes().get(p.len()) == Some(&b'/'))
            }
            Pattern::Segments { segments, below } => {
                let mut have = lower_path.split('/').skip(1);
                for want in segments {
                    match have.next() {
                        Some(h) if want == "*" || h == want => {}
                        _ => return false,
                    }
                }
                *below || have.next().is_none()
            }
        }
    }
}

/// True for the workspace's and the account's OAuth token endpoints (`/oidc/v1/token`,
/// `/oidc/accounts/<id>/v1/token`, and anything below them). A denial there is answered in the
/// OAuth error format (RFC 6749 section 5.2), so an OAuth client gives up at once instead of
/// retrying or waiting.
pub fn is_oauth_token_endpoint(raw_path: &str) -> bool {
    let path = normalize_path(raw_path).to_ascii_lowercase();
    // A decoded `?` or `#` ends the path for a server that re-parses it (see `path_blocked`).
    let path = path.split(['?', '#']).next().unwrap_or("");
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    matches!(
        segments.as_slice(),
        ["oidc", "v1", "token", ..] | ["oidc", "accounts", _, "v1", "token", ..]
    )
}

impl Policy {
    pub fn new(cfg: &Config) -> Policy {
        let mut by_host = HashMap::new();
        for (i, w) in cfg.workspaces.iter().enumerate() {
            for h in &w.hosts {
                by_host.insert(h.to_ascii_lowercase(), i);
            }
        }
        Policy {
            workspaces: cfg.workspaces.clone(),
            by_host,
            allowed_agents: cfg.policy.allowed_agents.clone(),
            defaults: AGENT_SAFE_DEFAULTS
                .iter()
                .map(|(methods, path)| {
                    Rule::new(
                        methods.iter().map(|m| m.to_string()).collect(),
                        path,
                        Vec::new(),
                        Vec::new(),
                    )
                })
                .collect(),
            deny: cfg.policy.deny.iter().map(Rule::from_config).collect(),
            allow: cfg.policy.allow.iter().map(Rule::from_config).collect(),
            allow_statements: cfg.policy.allow_statements.clone(),
            allow_commands: cfg.policy.allow_commands.clone(),
            tool_deny: cfg.policy.tool_deny.iter().map(tool_rule).collect(),
            tool_allow: cfg.policy.tool_allow.iter().map(tool_rule).collect(),
            record_text: cfg.audit.record_statement_text,
            authorization_servers: cfg.issuers.iter().map(|i| i.issuer.clone()).collect(),
        }
    }

    /// The issuers MCP clients should sign in with, in configuration order.
    pub fn authorization_servers(&self) -> &[String] {
        &self.authorization_servers
    }

    pub fn workspaces(&self) -> &[WorkspaceConfig] {
        &self.workspaces
    }

    /// The workspace for a request: the `workspace` context extension, else the `:authority`,
    /// else the only configured workspace.
    pub fn route(
        &self,
        context_workspace: Option<&str>,
        authority: &str,
    ) -> Option<&WorkspaceConfig> {
        if let Some(name) = context_workspace {
            return self.workspaces.iter().find(|w| w.name == name);
        }
        let host = authority.trim().to_ascii_lowercase();
        if let Some(i) = self.by_host.get(&host) {
            return self.workspaces.get(*i);
        }
        if let Some((bare, _port)) = host.rsplit_once(':') {
            if !bare.ends_with(']') || bare.starts_with('[') {
                if let Some(i) = self.by_host.get(bare) {
                    return self.workspaces.get(*i);
                }
            }
        }
        if self.workspaces.len() == 1 {
            return self.workspaces.first();
        }
        None
    }

    pub fn agent_allowed(&self, workspace: &WorkspaceConfig, agent: Option<&str>) -> bool {
        let list = workspace
            .allowed_agents
            .as_deref()
            .unwrap_or(&self.allowed_agents);
        list.is_empty() || agent.is_some_and(|a| list.iter().any(|x| x == a))
    }

    /// The statement guardrail: on the routes that carry SQL (the Statement Execution API, the
    /// managed MCP SQL server, the command execution API, the SQL endpoint's Thrift
    /// `ExecuteStatement`), the SQL an agent sends must not change permissions (see [`sql`]). A
    /// command in any language but `sql` (Python, Scala, R, or none named) is refused unless
    /// `allow_commands` lifts it for the agent and workspace: such code can issue any SQL.
    /// `Ok` passes; `Err` is a `statement_blocked` deny, with the JSON-RPC id of the offending
    /// MCP message when there is one. A guarded route whose body aegis did not get (Envoy not
    /// set up to send it) or cannot read is blocked, never passed unread. `path` is already
    /// normalized.
    pub fn statement_guard(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        agent: Option<&str>,
        workspace: &str,
    ) -> Result<Option<StatementSeen>, StatementBlock> {
        // Called on every Check: compare without allocating.
        let trimmed = path.trim_end_matches('/');
        let route = if method != "POST" {
            return Ok(None);
        } else if trimmed.eq_ignore_ascii_case("/api/2.0/sql/statements") {
            SqlRoute::Statements
        } else if trimmed.eq_ignore_ascii_case("/api/2.0/mcp/sql") {
            SqlRoute::McpSql
        } else if trimmed.eq_ignore_ascii_case("/api/1.2/commands/execute") {
            SqlRoute::Commands
        } else if is_sql_endpoint(path) {
            SqlRoute::Thrift
        } else {
            return Ok(None);
        };
        let scoped = |scopes: &[crate::config::ScopeConfig]| {
            scopes.iter().any(|s| {
                agent.is_some_and(|a| s.agents.iter().any(|x| x == a))
                    && (s.workspaces.is_empty() || s.workspaces.iter().any(|w| w == workspace))
            })
        };
        let commands_lifted = matches!(route, SqlRoute::Commands) && scoped(&self.allow_commands);
        // On the command route an unread body could be any language: only an agent free of
        // both guardrails may send one.
        let lifted = scoped(&self.allow_statements)
            && (commands_lifted || !matches!(route, SqlRoute::Commands));
        let unread = |why: &'static str| {
            if lifted {
                Ok(None)
            } else {
                Err(StatementBlock {
                    why,
                    jsonrpc_id: None,
                    kind: sql::StatementKind::Unknown,
                    fingerprint: [0u8; 32],
                    text: None,
                })
            }
        };
        let keep = |sql: &str| self.record_text.then(|| recorded(sql));
        // Every statement is classified (the ledger records what it saw); only an agent the
        // guardrail applies to is refused.
        let judge = |sql: &str, id: Option<&serde_json::Value>| {
            let c = sql::classify(sql);
            match c.blocked {
                Some(why) if !lifted => Err(StatementBlock {
                    why,
                    jsonrpc_id: id.cloned(),
                    kind: c.kind,
                    fingerprint: c.fingerprint,
                    text: keep(sql),
                }),
                _ => Ok(Some(StatementSeen {
                    kind: c.kind,
                    fingerprint: c.fingerprint,
                    text: keep(sql),
                })),
            }
        };
        let Some(body) = body.filter(|b| !b.is_empty()) else {
            return unread("the request body was not sent to aegis");
        };
        // A TCLIService call: only ExecuteStatement carries SQL; every other call passes.
        if let SqlRoute::Thrift = route {
            return match thrift::read_call(body) {
                Err(e) => unread(e.0),
                Ok(thrift::Call {
                    statement: None, ..
                }) => Ok(None),
                Ok(thrift::Call {
                    statement: Some(text),
                    ..
                }) => judge(text, None),
            };
        }
        if matches!(route, SqlRoute::Commands) {
            return self.command_guard(
                body,
                lifted,
                scoped(&self.allow_statements),
                commands_lifted,
            );
        }
        let Ok(doc) = serde_json::from_slice::<serde_json::Value>(body) else {
            return unread("the request body is not JSON");
        };
        match route {
            SqlRoute::Statements => match doc.get("statement") {
                Some(serde_json::Value::String(sql)) => judge(sql, None),
                _ => unread("the statement is missing or not a string"),
            },
            SqlRoute::Commands => unread("the command was not read"),
            // Read above, before the JSON.
            SqlRoute::Thrift => Ok(None),
            SqlRoute::McpSql => {
                let mut seen = None;
                for m in jsonrpc_messages(&doc) {
                    if m.get("method").and_then(|v| v.as_str()) != Some("tools/call") {
                        continue;
                    }
                    let id = m.get("id");
                    let params = m.get("params");
                    let tool = params.and_then(|p| p.get("name")).and_then(|v| v.as_str());
                    if tool != Some("execute_sql") {
                        // Other tools of the SQL server (none today) carry no agent SQL.
                        continue;
                    }
                    match params
                        .and_then(|p| p.get("arguments"))
                        .and_then(|a| a.get("query"))
                    {
                        Some(serde_json::Value::String(sql)) => {
                            let this = judge(sql, id)?;
                            seen = seen.or(this);
                        }
                        _ if lifted => {}
                        _ => {
                            return Err(StatementBlock {
                                why: "the execute_sql query is missing or not a string",
                                jsonrpc_id: id.cloned(),
                                kind: sql::StatementKind::Unknown,
                                fingerprint: [0u8; 32],
                                text: None,
                            })
                        }
                    }
                }
                Ok(seen)
            }
        }
    }

    /// The command execution API's body: `language` `sql` (exactly that word, in any letter
    /// case) is classified like any agent SQL; every other language, or none, is code that can
    /// issue any SQL. `unread_ok`: the body may pass unread; `sql_lifted`, `code_lifted`: the
    /// statement and command guardrails do not apply to this agent.
    fn command_guard(
        &self,
        body: &[u8],
        unread_ok: bool,
        sql_lifted: bool,
        code_lifted: bool,
    ) -> Result<Option<StatementSeen>, StatementBlock> {
        let block = |why, kind, fingerprint, text| StatementBlock {
            why,
            jsonrpc_id: None,
            kind,
            fingerprint,
            text,
        };
        let unread = |why: &'static str| {
            if unread_ok {
                Ok(None)
            } else {
                Err(block(why, sql::StatementKind::Unknown, [0u8; 32], None))
            }
        };
        let Ok(cmd) = serde_json::from_slice::<CommandBody>(body) else {
            return unread("the command body is not JSON naming each field once");
        };
        let Some(serde_json::Value::String(text)) = cmd.command else {
            return unread("the command is missing or not a string");
        };
        let is_sql = match &cmd.language {
            Some(serde_json::Value::String(l)) => l.eq_ignore_ascii_case("sql"),
            None => false,
            Some(_) => return unread("the command language is not a string"),
        };
        let kept = self.record_text.then(|| recorded(&text));
        if is_sql {
            let c = sql::classify(&text);
            return match c.blocked {
                Some(why) if !sql_lifted => Err(block(why, c.kind, c.fingerprint, kept)),
                _ => Ok(Some(StatementSeen {
                    kind: c.kind,
                    fingerprint: c.fingerprint,
                    text: kept,
                })),
            };
        }
        use sha2::Digest;
        let fingerprint: [u8; 32] = sha2::Sha256::digest(text.as_bytes()).into();
        if code_lifted {
            Ok(Some(StatementSeen {
                kind: sql::StatementKind::Unknown,
                fingerprint,
                text: kept,
            }))
        } else {
            Err(block(
                NOT_SQL_COMMAND,
                sql::StatementKind::Unknown,
                fingerprint,
                kept,
            ))
        }
    }

    /// MCP tool policy: every JSON-RPC `tools/call` in a POST to an MCP server is matched by the
    /// server's path and the tool's name, per agent and workspace. A `tool_deny` rule refuses
    /// the call; where `tool_allow` rules match the server, agent and workspace, only the tools
    /// they list may be called. `Err` is a `tool_blocked` deny with the call's JSON-RPC id. With
    /// tool rules configured, an MCP POST whose body aegis did not get or cannot read is refused.
    pub fn tool_guard(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        agent: Option<&str>,
        workspace: &str,
    ) -> Result<Option<String>, ToolBlock> {
        // Called on every Check: only an MCP POST goes past this line (no allocation before).
        const MCP: &str = "/api/2.0/mcp/";
        let is_mcp = path
            .get(..MCP.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(MCP));
        if method != "POST" || !is_mcp {
            return Ok(None);
        }
        let lower = path.trim_end_matches('/').to_ascii_lowercase();
        let ruled = !(self.tool_deny.is_empty() && self.tool_allow.is_empty());
        let Some(doc) = body
            .filter(|b| !b.is_empty())
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok())
        else {
            return if ruled {
                Err(ToolBlock {
                    tool: None,
                    jsonrpc_id: None,
                })
            } else {
                Ok(None)
            };
        };
        // The first tool called is what the audit row records.
        let mut first = None;
        for m in jsonrpc_messages(&doc) {
            if m.get("method").and_then(|v| v.as_str()) != Some("tools/call") {
                continue;
            }
            let id = m.get("id").cloned();
            let Some(tool) = m
                .get("params")
                .and_then(|p| p.get("name"))
                .and_then(|v| v.as_str())
            else {
                if ruled {
                    return Err(ToolBlock {
                        tool: None,
                        jsonrpc_id: id,
                    });
                }
                continue;
            };
            if first.is_none() {
                first = Some(tool.to_string());
            }
            if !ruled {
                continue;
            }
            let listed = |tools: &[String]| tools.is_empty() || tools.iter().any(|t| t == tool);
            let denied = self
                .tool_deny
                .iter()
                .any(|(r, tools)| r.matches(method, &lower, agent, workspace) && listed(tools));
            let scoped: Vec<&Vec<String>> = self
                .tool_allow
                .iter()
                .filter(|(r, _)| r.matches(method, &lower, agent, workspace))
                .map(|(_, tools)| tools)
                .collect();
            let outside_allowlist = !scoped.is_empty() && !scoped.iter().any(|t| listed(t));
            if denied || outside_allowlist {
                return Err(ToolBlock {
                    tool: Some(tool.to_string()),
                    jsonrpc_id: id,
                });
            }
        }
        Ok(first)
    }

    /// True when the request must be refused with `path_blocked`. `path` is already normalized.
    pub fn path_blocked(
        &self,
        method: &str,
        path: &str,
        agent: Option<&str>,
        workspace: &str,
    ) -> bool {
        let lower = path.to_ascii_lowercase();
        if self.blocked_as(method, &lower, agent, workspace) {
            return true;
        }
        // A decoded `?` or `#` (sent as `%3F`, `%253F`, ...) stays in the normalized path; a
        // server that re-parses the decoded path would stop there, so that reading must pass
        // the rules too (found by the normalize_path fuzz target).
        match lower.find(['?', '#']) {
            Some(i) => self.blocked_as(method, &normalize_path(&lower[..i]), agent, workspace),
            None => false,
        }
    }

    fn blocked_as(&self, method: &str, lower: &str, agent: Option<&str>, workspace: &str) -> bool {
        if self
            .deny
            .iter()
            .any(|r| r.matches(method, lower, agent, workspace))
        {
            return true;
        }
        self.defaults
            .iter()
            .any(|r| r.matches(method, lower, agent, workspace))
            && !self
                .allow
                .iter()
                .any(|r| r.matches(method, lower, agent, workspace))
    }
}

/// The path Databricks will route on: query and fragment dropped, percent-escapes decoded (until
/// stable, so double encoding does not hide a `.` or `/`), `\` as `/`, `;params` dropped, empty
/// and `.` segments removed, `..` resolved. Letter case is kept (rules compare ignoring case).
pub fn normalize_path(raw: &str) -> String {
    let end = raw.find(['?', '#']).unwrap_or(raw.len());
    let mut path = raw[..end].to_string();
    for _ in 0..4 {
        // Invalid UTF-8 after decoding is replaced, never passed through raw.
        let decoded = match percent_encoding::percent_decode_str(&path).decode_utf8_lossy() {
            std::borrow::Cow::Borrowed(_) => break,
            std::borrow::Cow::Owned(d) => d,
        };
        if decoded == path {
            break;
        }
        path = decoded;
    }
    if path.contains('\\') {
        path = path.replace('\\', "/");
    }
    let mut segments: Vec<&str> = Vec::new();
    for seg in path.split('/') {
        let seg = seg.split(';').next().unwrap_or("");
        match seg {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(path.len() + 1);
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalization_undoes_the_usual_tricks() {
        let cases = [
            ("/api/2.0/token/create", "/api/2.0/token/create"),
            ("//api//2.0///token/create", "/api/2.0/token/create"),
            ("/api/2.0/sql/../token/create", "/api/2.0/token/create"),
            ("/api/2.0/./token/create?x=1", "/api/2.0/token/create"),
            ("/api/2.0/%2e%2e/2.0/token/create", "/api/2.0/token/create"),
            ("/api/2.0/token%2fcreate", "/api/2.0/token/create"),
            ("/api/2.0/token%252fcreate", "/api/2.0/token/create"),
            ("/api\\2.0\\token\\create", "/api/2.0/token/create"),
            (
                "/api/2.0/token/create;jsessionid=1",
                "/api/2.0/token/create",
            ),
            ("/../../etc/passwd", "/etc/passwd"),
            ("", "/"),
            ("/%", "/%"),
            ("/a%zz", "/a%zz"),
        ];
        for (raw, want) in cases {
            assert_eq!(normalize_path(raw), want, "{raw}");
        }
    }

    fn policy(extra: &str) -> Policy {
        let dir = tempfile::tempdir().unwrap();
        for name in ["audit.key", "cache.key", "checkpoint.key"] {
            std::fs::write(
                dir.path().join(name),
                crate::secret::Key32::generate().to_base64(),
            )
            .unwrap();
        }
        let text = format!(
            r#"
[server]
grpc_listen = "127.0.0.1:1"
admin_listen = "127.0.0.1:2"
[redis]
url = "redis://127.0.0.1:3"
cache_key_file = "cache.key"
[postgres]
url = "postgres://aegis@127.0.0.1:4/aegis"
[audit]
hmac_key_file = "audit.key"
key_id = "k1"
chain_id = "main"
checkpoint_signing_key_file = "checkpoint.key"
checkpoint_dir = "cp"
[[issuers]]
name = "dev"
issuer = "http://127.0.0.1:5"
audiences = ["aegis"]
algorithms = ["RS256"]
username_claim = "email"
agent_claim = "azp"
[[workspaces]]
name = "a"
url = "https://a.cloud.databricks.com"
hosts = ["a.example.com"]
token_source = "federation"
scopes = ["all-apis"]
[[workspaces]]
name = "b"
url = "https://b.cloud.databricks.com"
hosts = ["b.example.com:8443"]
token_source = "federation"
scopes = ["all-apis"]
allowed_agents = ["joule"]
{extra}
"#
        );
        let cfg = Config::parse(&text, dir.path(), &HashMap::new()).unwrap();
        Policy::new(&cfg)
    }

    #[test]
    fn agent_safe_defaults_block_and_cannot_be_dodged() {
        let p = policy("");
        let blocked = [
            ("POST", "/api/2.0/token/create"),
            ("post", "/API/2.0/Token/Create"),
            ("GET", "/api/2.0/token-management/tokens"),
            (
                "PATCH",
                "/api/2.1/unity-catalog/permissions/table/main.sales.orders",
            ),
            ("GET", "/api/2.0/secrets/get"),
            ("POST", "/api/2.0/preview/scim/v2/Users"),
            ("GET", "/api/2.0/accounts/123/workspaces"),
            // The workspace's and the account's OAuth endpoints hand out raw tokens.
            ("POST", "/oidc/v1/token"),
            ("POST", "/OIDC/v1/Token/"),
            ("POST", "/oidc//v1/./token"),
            ("POST", "/oidc/v1/%74oken"),
            ("POST", "/oidc/v1/token%3Fx=1"),
            ("GET", "/oidc/v1/authorize?client_id=x"),
            ("POST", "/oidc/accounts/7f3e2c1a/v1/token"),
            ("GET", "/oidc/accounts/7f3e2c1a/v1/authorize"),
            ("POST", "/oidc/accounts/x/../7f3e2c1a/v1/token"),
            // Writes to legacy SQL ACLs, Git credentials, settings and UC workspace bindings.
            ("POST", "/api/2.0/preview/sql/permissions/queries/1"),
            (
                "POST",
                "/api/2.0/preview/sql/permissions/dashboards/1/transfer",
            ),
            ("DELETE", "/api/2.0/preview/SQL/Permissions/alerts/1"),
            ("POST", "/api/2.0/git-credentials"),
            ("PATCH", "/api/2.0/git-credentials/123"),
            ("DELETE", "/api/2.0/git-credentials/123"),
            ("POST", "/api/2.0/git-credentials/"),
            ("POST", "/api/2.0/repos/../git-credentials"),
            (
                "PATCH",
                "/api/2.0/settings/types/default_namespace_ws/names/default",
            ),
            ("PUT", "/api/2.0/settings/types/x/names/y"),
            ("DELETE", "/api/2.0/settings/types/x/names/y"),
            ("POST", "/api/2.0/%73ettings/types/x/names/y"),
            ("PATCH", "/api/2.1/unity-catalog/bindings/catalog/main"),
            ("PATCH", "/api/2.1/unity-catalog/bindings/catalog%2fmain"),
            (
                "PUT",
                "/api/2.1/unity-catalog/bindings/storage_credential/c",
            ),
            (
                "PATCH",
                "/api/2.1/unity-catalog/workspace-bindings/catalogs/main",
            ),
            // Cluster and dashboard ACLs (the Permissions API), share grants, recipients.
            ("PUT", "/api/2.0/permissions/clusters/0601-101010-shared01"),
            (
                "PATCH",
                "/api/2.0/permissions/clusters/0601-101010-shared01",
            ),
            ("PUT", "/api/2.0/permissions/dashboards/01f0d5a1"),
            ("PATCH", "/api/2.0/permissions/dashboards/01f0d5a1"),
            (
                "PATCH",
                "/api/2.1/unity-catalog/shares/sales_share/permissions",
            ),
            ("PATCH", "/api/2.1/unity-catalog/shares/sales_share"),
            ("POST", "/api/2.1/unity-catalog/shares"),
            ("DELETE", "/api/2.1/unity-catalog/shares/sales_share"),
            ("POST", "/api/2.1/unity-catalog/recipients"),
            (
                "POST",
                "/api/2.1/unity-catalog/recipients/partner_acme/rotate-token",
            ),
            ("PATCH", "/api/2.1/unity-catalog/Recipients/partner_acme"),
            ("POST", "/api/2.1/unity-catalog/providers"),
            (
                "POST",
                "/api/2.0/data-sharing/recipients/r/federation-policies",
            ),
            ("POST", "/api/2.1/clusters/change-owner"),
            ("POST", "/api/2.0/lakeview/dashboards/01f0d5a1/published"),
        ];
        for (m, raw) in blocked {
            assert!(
                p.path_blocked(m, &normalize_path(raw), Some("copilot"), "a"),
                "{m} {raw}"
            );
        }
        let allowed = [
            ("GET", "/api/2.0/preview/scim/v2/Me"),
            ("POST", "/api/2.0/sql/statements"),
            (
                "GET",
                "/api/2.1/unity-catalog/permissions/table/main.sales.orders",
            ),
            ("GET", "/api/2.0/token-managementx"),
            // The OAuth metadata documents stay public.
            ("GET", "/oidc/.well-known/oauth-authorization-server"),
            ("GET", "/oidc/.well-known/openid-configuration"),
            ("GET", "/oidc/jwks.json"),
            ("GET", "/.well-known/databricks-config"),
            (
                "GET",
                "/oidc/accounts/7f3e2c1a/.well-known/oauth-authorization-server",
            ),
            ("POST", "/oidc/v1/tokens"),
            ("POST", "/oidc/accounts/7f3e2c1a/v2/token"),
            // Reading them stays allowed.
            ("GET", "/api/2.0/preview/sql/permissions/queries/1"),
            ("GET", "/api/2.0/git-credentials"),
            ("GET", "/api/2.0/git-credentials/123"),
            (
                "GET",
                "/api/2.0/settings/types/default_namespace_ws/names/default",
            ),
            ("GET", "/api/2.1/unity-catalog/bindings/catalog/main"),
            (
                "GET",
                "/api/2.1/unity-catalog/workspace-bindings/catalogs/main",
            ),
            ("POST", "/api/2.0/preview/sql/queries"),
            ("POST", "/api/2.0/git-credentialsx"),
            // Reading clusters, dashboards and shares, and starting a cluster.
            ("GET", "/api/2.0/permissions/clusters/0601-101010-shared01"),
            ("GET", "/api/2.1/unity-catalog/shares"),
            (
                "GET",
                "/api/2.1/unity-catalog/shares/sales_share/permissions",
            ),
            ("GET", "/api/2.1/unity-catalog/recipients"),
            ("GET", "/api/2.1/unity-catalog/providers/p"),
            ("POST", "/api/2.1/clusters/start"),
            ("POST", "/api/1.2/contexts/create"),
            ("GET", "/api/2.0/lakeview/dashboards/01f0d5a1/published"),
        ];
        for (m, raw) in allowed {
            assert!(
                !p.path_blocked(m, &normalize_path(raw), Some("copilot"), "a"),
                "{m} {raw}"
            );
        }
    }

    #[test]
    fn oauth_token_endpoints_are_recognized_under_any_spelling() {
        for raw in [
            "/oidc/v1/token",
            "/OIDC/V1/TOKEN/",
            "//oidc/v1/./token",
            "/oidc/v1/%74oken",
            "/oidc/v1/token%3Fx",
            "/oidc/accounts/7f3e2c1a/v1/token",
        ] {
            assert!(is_oauth_token_endpoint(raw), "{raw}");
        }
        for raw in [
            "/oidc/v1/authorize",
            "/oidc/v1/tokens",
            "/oidc/.well-known/oauth-authorization-server",
            "/api/2.0/token/create",
            "/oidc/accounts/v1/token",
        ] {
            assert!(!is_oauth_token_endpoint(raw), "{raw}");
        }
    }

    /// `%3F` decodes to a `?` that stays in the normalized path; the rules also see the path
    /// cut there.
    #[test]
    fn an_encoded_question_mark_does_not_dodge_a_rule() {
        let p = policy("");
        for (m, raw) in [
            ("POST", "/api/2.0/token/create%3Fx=1"),
            ("POST", "/api/2.0/token/create%253F"),
            ("GET", "/api/2.0/secrets%3F/get"),
            ("GET", "/api/2.0/secrets%23frag"),
        ] {
            assert!(
                p.path_blocked(m, &normalize_path(raw), Some("copilot"), "a"),
                "{m} {raw}"
            );
        }
        assert!(!p.path_blocked("GET", &normalize_path("/api/2.0/sql%3F/x"), None, "a"));
    }

    #[test]
    fn operator_allow_lifts_a_default_and_deny_wins() {
        let p = policy(
            r#"[policy]
allow = [ { methods = ["GET"], path = "/api/2.0/secrets/*", agents = ["joule"] } ]
deny = [ { path = "/api/2.0/sql/statements/*", workspaces = ["b"] } ]"#,
        );
        assert!(!p.path_blocked("GET", "/api/2.0/secrets/get", Some("joule"), "a"));
        assert!(p.path_blocked("GET", "/api/2.0/secrets/get", Some("copilot"), "a"));
        assert!(p.path_blocked("POST", "/api/2.0/sql/statements", None, "b"));
        assert!(!p.path_blocked("POST", "/api/2.0/sql/statements", None, "a"));
    }

    #[test]
    fn routing_by_context_authority_or_only_one() {
        let p = policy("");
        assert_eq!(p.route(Some("b"), "x").unwrap().name, "b");
        assert!(p.route(Some("nope"), "a.example.com").is_none());
        assert_eq!(p.route(None, "A.Example.com").unwrap().name, "a");
        assert_eq!(p.route(None, "a.example.com:443").unwrap().name, "a");
        assert_eq!(p.route(None, "b.example.com:8443").unwrap().name, "b");
        assert!(p.route(None, "c.example.com").is_none());
    }

    #[test]
    fn agent_allowlists_per_workspace() {
        let p = policy("[policy]\nallowed_agents = [\"copilot\"]");
        let a = p.route(Some("a"), "").unwrap();
        let b = p.route(Some("b"), "").unwrap();
        assert!(p.agent_allowed(a, Some("copilot")));
        assert!(!p.agent_allowed(a, Some("joule")));
        assert!(!p.agent_allowed(a, None));
        assert!(p.agent_allowed(b, Some("joule")));
        assert!(!p.agent_allowed(b, Some("copilot")));
    }

    #[test]
    fn mcp_tool_rules_deny_and_allowlist_per_server_agent_and_workspace() {
        let p = policy(
            "[policy]\n\
             tool_deny = [ { server = \"/api/2.0/mcp/sql\", tools = [\"execute_sql\"], agents = [\"joule\"] } ]\n\
             tool_allow = [ { server = \"/api/2.0/mcp/functions/*\", tools = [\"lookup_order\"], workspaces = [\"a\"] } ]",
        );
        let call = |tool: &str| {
            serde_json::json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": tool}})
                .to_string()
        };
        let sql = "/api/2.0/mcp/sql";
        let functions = "/api/2.0/mcp/functions/main/sales";
        let guard = |path: &str, body: &str, agent: &str, ws: &str| {
            p.tool_guard("POST", path, Some(body.as_bytes()), Some(agent), ws)
        };
        // Denied for joule, allowed for copilot (the control).
        let refused = guard(sql, &call("execute_sql"), "joule", "a").unwrap_err();
        assert_eq!(refused.tool.as_deref(), Some("execute_sql"));
        assert_eq!(refused.jsonrpc_id, Some(serde_json::json!(7)));
        assert!(guard(sql, &call("execute_sql"), "copilot", "a").is_ok());
        // The allowlist holds in workspace a, not in b.
        assert!(guard(functions, &call("lookup_order"), "copilot", "a").is_ok());
        assert!(guard(functions, &call("refund_order"), "copilot", "a").is_err());
        assert!(guard(functions, &call("refund_order"), "copilot", "b").is_ok());
        // Other JSON-RPC methods pass; an unreadable MCP body does not.
        let list = r#"{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}"#;
        assert!(guard(functions, list, "copilot", "a").is_ok());
        assert!(guard(functions, "{not json", "copilot", "a").is_err());
        // A batch is judged call by call.
        let batch = format!("[{}, {}]", call("lookup_order"), call("refund_order"));
        assert!(guard(functions, &batch, "copilot", "a").is_err());
    }

    #[test]
    fn allow_statements_lifts_the_guardrail_for_named_agents_and_workspaces_only() {
        let p = policy(
            "[policy]\nallow_statements = [ { agents = [\"dba-bot\"], workspaces = [\"a\"] } ]",
        );
        let grant = br#"{"statement": "GRANT SELECT ON t TO x"}"#;
        let path = "/api/2.0/sql/statements";
        assert!(p
            .statement_guard("POST", path, Some(grant), Some("dba-bot"), "a")
            .is_ok());
        // Another workspace, another agent: still blocked.
        assert!(p
            .statement_guard("POST", path, Some(grant), Some("dba-bot"), "b")
            .is_err());
        assert!(p
            .statement_guard("POST", path, Some(grant), Some("copilot"), "a")
            .is_err());
        // Only POSTs to the SQL routes are read; a GET of a statement's status is not.
        assert!(p
            .statement_guard("GET", "/api/2.0/sql/statements/abc", None, None, "a")
            .is_ok());
        // Spelled otherwise, the route is still the route (the path arrives normalized).
        assert!(p
            .statement_guard("POST", "/API/2.0/SQL/Statements/", Some(grant), None, "a")
            .is_err());
    }

    #[test]
    fn commands_are_classified_by_language_and_code_needs_allow_commands() {
        let p = policy(
            "[policy]\n\
             allow_commands = [ { agents = [\"notebook-bot\"], workspaces = [\"a\"] } ]\n\
             allow_statements = [ { agents = [\"dba-bot\"] } ]",
        );
        let path = "/api/1.2/commands/execute";
        let cmd = |language: &str, command: &str| {
            serde_json::json!({"clusterId": "c", "contextId": "1", "language": language, "command": command})
                .to_string()
        };
        let guard = |body: &str, agent: &str, ws: &str| {
            p.statement_guard("POST", path, Some(body.as_bytes()), Some(agent), ws)
        };
        // SQL: the classifier decides; permission changes are refused, queries pass.
        let grant = guard(&cmd("sql", "GRANT SELECT ON t TO x"), "copilot", "a").unwrap_err();
        assert_eq!(grant.kind, sql::StatementKind::Dcl);
        assert_ne!(grant.fingerprint, [0u8; 32]);
        let seen = guard(&cmd("SQL", "SELECT 1"), "copilot", "a")
            .unwrap()
            .unwrap();
        assert_eq!(seen.kind, sql::StatementKind::Query);
        assert!(guard(&cmd("sql", "GRANT SELECT ON t TO x"), "dba-bot", "a").is_ok());
        // Code: refused by default, lifted per agent and workspace.
        for language in ["python", "scala", "r", "PYTHON", "sql ", ""] {
            let refused = guard(&cmd(language, "1 + 1"), "copilot", "a").unwrap_err();
            assert_eq!(refused.why, NOT_SQL_COMMAND, "{language:?}");
            assert_ne!(refused.fingerprint, [0u8; 32]);
        }
        assert!(guard(&cmd("python", "1 + 1"), "notebook-bot", "a").is_ok());
        assert!(guard(&cmd("python", "1 + 1"), "notebook-bot", "b").is_err());
        // allow_statements does not lift code.
        assert!(guard(&cmd("python", "1 + 1"), "dba-bot", "a").is_err());
        // No language named: it runs in the context's language, so it is code.
        let no_language = r#"{"clusterId": "c", "contextId": "1", "command": "1 + 1"}"#;
        assert!(guard(no_language, "copilot", "a").is_err());
        // A field named twice, a form body, no body: unreadable, refused.
        let twice = r#"{"language": "sql", "command": "SELECT 1", "language": "python"}"#;
        assert!(guard(twice, "copilot", "a").is_err());
        assert!(guard("language=python&command=1", "copilot", "a").is_err());
        assert!(p
            .statement_guard("POST", path, None, Some("copilot"), "a")
            .is_err());
        // Only an agent free of both guardrails may send an unreadable body.
        assert!(guard(twice, "dba-bot", "a").is_err());
        assert!(guard(twice, "notebook-bot", "a").is_err());
        // Status polls and context calls are not read.
        assert!(p
            .statement_guard(
                "GET",
                "/api/1.2/commands/status",
                None,
                Some("copilot"),
                "a"
            )
            .is_ok());
    }

    #[test]
    fn the_sql_endpoint_judges_execute_statement_and_passes_other_calls() {
        let p = policy("");
        let hex = |s: &str| -> Vec<u8> {
            let s: String = s.split_whitespace().collect();
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                .collect()
        };
        let grant = hex(include_str!("policy/thrift_golden/execute_grant.hex"));
        let tables = hex(include_str!("policy/thrift_golden/get_tables.hex"));
        let path = "/sql/1.0/warehouses/abcdef0123456789";
        let blocked = p
            .statement_guard("POST", path, Some(&grant), None, "a")
            .unwrap_err();
        assert_eq!(blocked.kind, sql::StatementKind::Dcl);
        assert_ne!(blocked.fingerprint, [0u8; 32]);
        assert_eq!(
            p.statement_guard("POST", path, Some(&tables), None, "a"),
            Ok(None)
        );
        // Not a call, no body at all, or the interactive clusters' spelling of the endpoint.
        for body in [
            Some(&b"GRANT ALL ON CATALOG main TO x"[..]),
            None,
            Some(&[][..]),
        ] {
            assert!(p.statement_guard("POST", path, body, None, "a").is_err());
        }
        assert!(p
            .statement_guard("POST", "/SQL/protocolv1/o/1/0123", Some(&grant), None, "a")
            .is_err());
        // Lifted for the agents an allow_statements rule names.
        let lifted = policy("[policy]\nallow_statements = [ { agents = [\"dba-bot\"] } ]");
        assert!(lifted
            .statement_guard("POST", path, Some(&grant), Some("dba-bot"), "a")
            .is_ok_and(|seen| seen.is_some()));
        assert!(is_sql_endpoint("/Sql/1.0/warehouses/x") && !is_sql_endpoint("/sq"));
    }
}
