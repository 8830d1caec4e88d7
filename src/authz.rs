//! The Check pipeline: one agent request in, one [`Decision`] out.
//!
//! identify → route → policy → token → audit → respond. This module knows no tonic or Envoy
//! types: the gRPC edge ([`crate::grpc`]) translates a `CheckRequest` into a [`CheckInput`] and a
//! [`Decision`] back into a `CheckResponse`. Each dependency sits behind one small trait
//! ([`Identify`], [`Tokens`], [`Audit`]) so the pipeline is tested without sockets.
//!
//! Invariant: an [`Decision::Allow`] is only ever returned after the audit row for it committed.

pub mod headers;
pub mod ports;
pub mod prm;
pub mod reason;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

pub use reason::Reason;

use crate::audit::{AuditError, Draft, Verdict};
use crate::broker::{BrokerError, DbToken};
use crate::config::WorkspaceConfig;
use crate::identity::{Identity, IdentityError};
use crate::policy::{normalize_path, AgentBlocklist, Policy};
use tracing::Instrument;

// === Inputs and outputs ===

/// The parts of an Envoy CheckRequest the pipeline reads, borrowed from it.
#[derive(Debug, Clone, Copy)]
pub struct CheckInput<'a> {
    pub method: &'a str,
    /// Path with query, as Envoy saw it.
    pub path: &'a str,
    pub authority: &'a str,
    /// Request headers, lower-case names (Envoy joins repeated headers with ',').
    pub headers: &'a HashMap<String, String>,
    /// The `workspace` per-route context extension, if Envoy set one.
    pub context_workspace: Option<&'a str>,
    /// Envoy's `x-request-id`.
    pub request_id: &'a str,
    /// The request body, when Envoy sent it (only the routes that carry SQL or MCP calls).
    pub body: Option<&'a [u8]>,
}

/// A 128-bit random trace id, written as 32 lower-case hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId([u8; 32]);

impl TraceId {
    pub fn random() -> Self {
        use rand::RngCore;
        let mut raw = [0u8; 16];
        rand::rng().fill_bytes(&mut raw);
        let mut out = [0u8; 32];
        // hex::encode_to_slice cannot fail: the output is exactly twice the input.
        let _ = hex::encode_to_slice(raw, &mut out);
        TraceId(out)
    }

    pub fn as_str(&self) -> &str {
        // Always ASCII hex.
        std::str::from_utf8(&self.0).unwrap_or("00000000000000000000000000000000")
    }
}

impl std::fmt::Debug for TraceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Display for TraceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the pipeline decided.
#[derive(Debug)]
pub enum Decision {
    Allow(Allow),
    Deny(Deny),
}

#[derive(Debug)]
pub struct Allow {
    pub trace_id: TraceId,
    pub seq: u64,
    /// The user's Databricks token; the edge writes it into `authorization`.
    pub token: Arc<DbToken>,
    /// The upstream `user-agent`: the agent's, cleaned, plus `aegis/<v> aegis-trace/<id>`.
    pub user_agent: String,
    /// Client-sent `x-aegis-*` headers to strip before the request goes upstream.
    pub remove_headers: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Deny {
    pub trace_id: TraceId,
    pub reason: Reason,
    pub retry_after: Option<u64>,
    /// For `consent_required`: the signed link where the user consents (U2M workspaces).
    pub consent_url: Option<String>,
    /// For a refused MCP message: its JSON-RPC id, so the answer is a JSON-RPC error.
    pub jsonrpc_id: Option<serde_json::Value>,
}

impl Decision {
    pub fn trace_id(&self) -> TraceId {
        match self {
            Decision::Allow(a) => a.trace_id,
            Decision::Deny(d) => d.trace_id,
        }
    }
}

// === The dependencies, as traits ===

/// Validates an IdP bearer token.
pub trait Identify: Send + Sync + 'static {
    fn identify(
        &self,
        token: &str,
    ) -> impl Future<Output = Result<Arc<Identity>, IdentityError>> + Send;
}

/// Finds or mints the user's Databricks token for a workspace.
pub trait Tokens: Send + Sync + 'static {
    fn token(
        &self,
        workspace: &WorkspaceConfig,
        identity: &Identity,
        subject_token: &str,
    ) -> impl Future<Output = Result<Arc<DbToken>, BrokerError>> + Send;
}

/// Makes the signed consent link a `consent_required` deny carries (U2M workspaces).
/// The link is bound to the verified principal (issuer, subject) as well as the user name.
pub trait ConsentLink: Send + Sync + 'static {
    fn consent_url(
        &self,
        workspace: &str,
        user_name: &str,
        issuer: &str,
        subject: &str,
    ) -> Option<String>;
}

/// Appends a decision to the audit chain; resolves once the row is committed.
pub trait Audit: Send + Sync + 'static {
    fn append(&self, draft: Draft) -> impl Future<Output = Result<u64, AuditError>> + Send;
}

// === Pipeline ===

pub struct Pipeline<I, T, A> {
    identify: I,
    tokens: T,
    audit: A,
    /// Swapped whole by a config reload; each Check reads one version of it.
    policy: Arc<arc_swap::ArcSwap<Policy>>,
    /// Agents blocked from the operator console; read in memory on every Check.
    blocklist: Arc<AgentBlocklist>,
    /// Signs consent links for `consent_required` denies; None: denies carry no link.
    consent: Option<Arc<dyn ConsentLink>>,
    ready: Arc<AtomicBool>,
    check_timeout: Duration,
    user_agent_suffix: String,
}

/// The outcome of the deciding steps, before auditing: a token, or a reason and a retry hint.
type Decided = Result<Arc<DbToken>, (Reason, Option<u64>)>;

impl<I: Identify, T: Tokens, A: Audit> Pipeline<I, T, A> {
    pub fn new(
        identify: I,
        tokens: T,
        audit: A,
        policy: Arc<Policy>,
        ready: Arc<AtomicBool>,
        check_timeout: Duration,
    ) -> Self {
        Pipeline {
            identify,
            tokens,
            audit,
            policy: Arc::new(arc_swap::ArcSwap::new(policy)),
            blocklist: Arc::new(AgentBlocklist::empty()),
            consent: None,
            ready,
            check_timeout,
            user_agent_suffix: format!(" aegis/{}", env!("CARGO_PKG_VERSION")),
        }
    }

    /// Uses `blocklist` (shared with the console) instead of an empty one.
    pub fn with_blocklist(mut self, blocklist: Arc<AgentBlocklist>) -> Self {
        self.blocklist = blocklist;
        self
    }

    /// Puts a signed consent link into `consent_required` denies (None: no link).
    pub fn with_consent_links(mut self, consent: Option<Arc<dyn ConsentLink>>) -> Self {
        self.consent = consent;
        self
    }

    /// The policy in force now.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.load_full()
    }

    /// Where a config reload puts the next policy (shared with the pipeline).
    pub fn policy_cell(&self) -> Arc<arc_swap::ArcSwap<Policy>> {
        self.policy.clone()
    }

    /// Runs the whole pipeline for one request. Never panics, never returns an error: every
    /// failure becomes a [`Decision::Deny`].
    ///
    /// Log lines on the way carry a `check` span with the aegis trace id and, when Envoy sent a
    /// W3C `traceparent`, the caller's trace and parent span ids. The aegis trace id stays a
    /// fresh random id per request: one W3C trace can span many requests, each with its own row.
    pub async fn check(&self, input: &CheckInput<'_>) -> Decision {
        use tracing::Instrument;
        let trace_id = TraceId::random();
        let span = tracing::info_span!(
            "check",
            trace_id = %trace_id,
            w3c_trace_id = tracing::field::Empty,
            w3c_parent_id = tracing::field::Empty,
            user = tracing::field::Empty,
            agent = tracing::field::Empty,
            workspace = tracing::field::Empty,
            decision = tracing::field::Empty,
            reason = tracing::field::Empty,
        );
        if let Some(tp) = headers::traceparent(input.headers) {
            span.record("w3c_trace_id", tp.trace_id);
            span.record("w3c_parent_id", tp.parent_id);
        }
        if crate::logging::exporting() {
            // Exported spans continue the caller's W3C trace (Envoy forwards `traceparent`).
            use opentelemetry::propagation::TextMapPropagator;
            use tracing_opentelemetry::OpenTelemetrySpanExt;
            let parent = opentelemetry_sdk::propagation::TraceContextPropagator::new()
                .extract(input.headers);
            let _ = span.set_parent(parent);
        }
        let decision = self
            .check_traced(input, trace_id)
            .instrument(span.clone())
            .await;
        match &decision {
            Decision::Allow(_) => span.record("decision", "allow"),
            Decision::Deny(d) => span
                .record("decision", "deny")
                .record("reason", d.reason.code()),
        };
        decision
    }

    async fn check_traced(&self, input: &CheckInput<'_>, trace_id: TraceId) -> Decision {
        let started = Instant::now();
        let deadline = started + self.check_timeout;
        let path = normalize_path(input.path);
        let mut draft = Draft {
            ts: SystemTime::now(),
            trace_id: trace_id.as_str().to_string(),
            request_id: clean(input.request_id, 128),
            method: clean(input.method, 16),
            path: clean(&path, 2048),
            ..Draft::default()
        };

        let mut jsonrpc_id = None;
        let decided = match tokio::time::timeout_at(
            deadline.into(),
            self.decide(input, &path, &mut draft, &mut jsonrpc_id),
        )
        .await
        {
            Ok(d) => d,
            Err(_) => Err((Reason::DependencyUnavailable, Some(1))),
        };

        let decision = match decided {
            Ok(token) => {
                draft.verdict = Verdict::Allow;
                draft.token_source = token.source.as_str().to_string();
                draft.token_fp = token.token.fingerprint().to_vec();
                let commit = self
                    .audit
                    .append(draft)
                    .instrument(tracing::info_span!(target: crate::logging::SPANS, "audit_commit"));
                match tokio::time::timeout_at(deadline.into(), commit).await {
                    Ok(Ok(seq)) => Decision::Allow(Allow {
                        trace_id,
                        seq,
                        user_agent: self.upstream_user_agent(input.headers, trace_id),
                        remove_headers: headers::client_aegis_headers(input.headers),
                        token,
                    }),
                    Ok(Err(e)) => {
                        tracing::warn!(trace_id = %trace_id, error = %e, "audit append failed; denying");
                        deny(trace_id, Reason::DependencyUnavailable, Some(1))
                    }
                    Err(_) => {
                        tracing::warn!(trace_id = %trace_id, "audit append timed out; denying");
                        deny(trace_id, Reason::DependencyUnavailable, Some(1))
                    }
                }
            }
            Err((reason, retry_after)) => {
                let consent_url = match (reason, &self.consent) {
                    (Reason::ConsentRequired, Some(c)) => c.consent_url(
                        &draft.workspace,
                        &draft.user_name,
                        &draft.issuer,
                        &draft.subject,
                    ),
                    _ => None,
                };
                draft.verdict = Verdict::Deny;
                draft.reason = reason.code().to_string();
                // A deny stands whether or not its row commits; we still wait (bounded) so the
                // chain holds every decision we could record.
                let commit = self
                    .audit
                    .append(draft)
                    .instrument(tracing::info_span!(target: crate::logging::SPANS, "audit_commit"));
                match tokio::time::timeout_at(deadline.into(), commit).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(trace_id = %trace_id, error = %e, "audit append for a deny failed")
                    }
                    Err(_) => {
                        tracing::warn!(trace_id = %trace_id, "audit append for a deny timed out")
                    }
                }
                let mut decision = deny(trace_id, reason, retry_after);
                if let Decision::Deny(d) = &mut decision {
                    d.consent_url = consent_url;
                    d.jsonrpc_id = jsonrpc_id;
                }
                decision
            }
        };

        let elapsed = started.elapsed();
        match &decision {
            Decision::Allow(_) => {
                metrics::counter!("aegis_checks_total", "decision" => "allow", "reason" => "")
                    .increment(1)
            }
            Decision::Deny(d) => metrics::counter!(
                "aegis_checks_total",
                "decision" => "deny",
                "reason" => d.reason.code()
            )
            .increment(1),
        }
        metrics::histogram!("aegis_check_duration_seconds").record(elapsed.as_secs_f64());
        decision
    }

    async fn decide(
        &self,
        input: &CheckInput<'_>,
        path: &str,
        draft: &mut Draft,
        jsonrpc_id: &mut Option<serde_json::Value>,
    ) -> Decided {
        let fail = |reason: Reason| -> Decided { Err((reason, None)) };
        // One version of the policy for the whole Check, even if a reload swaps it meanwhile.
        let policy = self.policy.load_full();
        if !self.ready.load(Ordering::Acquire) {
            return Err((Reason::DependencyUnavailable, Some(1)));
        }

        // 1. identify
        let token = match headers::bearer_token(input.headers) {
            Ok(t) => t,
            Err(reason) => return fail(reason),
        };
        let identify = tracing::info_span!(target: crate::logging::SPANS, "identify");
        let identity = match self.identify.identify(token).instrument(identify).await {
            Ok(id) => id,
            Err(e) => {
                tracing::debug!(error = %e, "token rejected");
                let reason = Reason::from(&e);
                let retry = (reason == Reason::DependencyUnavailable).then_some(1);
                return Err((reason, retry));
            }
        };
        draft.issuer = identity.issuer.to_string();
        draft.subject = identity.subject.clone();
        draft.user_name = identity.user_name.clone();
        draft.agent = identity.agent.clone().unwrap_or_default();
        draft.actor_chain = clean(&identity.actor_chain, 1024);
        let check = tracing::Span::current();
        check.record("user", draft.user_name.as_str());
        check.record("agent", draft.agent.as_str());

        // 2. route
        let routed = tracing::info_span!(target: crate::logging::SPANS, "route")
            .in_scope(|| policy.route(input.context_workspace, input.authority));
        let Some(workspace) = routed else {
            return fail(Reason::UnknownWorkspace);
        };
        draft.workspace = workspace.name.clone();
        check.record("workspace", draft.workspace.as_str());
        if !crate::config::Config::issuer_admitted(workspace, &identity.issuer_name) {
            return fail(Reason::UntrustedIssuer);
        }

        // 3. policy (no await in it: the span's guard never crosses one)
        let policy_span = tracing::info_span!(target: crate::logging::SPANS, "policy");
        let in_policy = policy_span.enter();
        if !policy.agent_allowed(workspace, identity.agent.as_deref()) {
            return fail(Reason::AgentNotAllowed);
        }
        // Until the operators' blocklist is loaded we cannot tell who is blocked.
        if !self.blocklist.loaded() {
            return Err((Reason::DependencyUnavailable, Some(1)));
        }
        if identity
            .agent
            .as_deref()
            .is_some_and(|a| self.blocklist.contains(a))
        {
            return fail(Reason::AgentNotAllowed);
        }
        if policy.path_blocked(
            input.method,
            path,
            identity.agent.as_deref(),
            &workspace.name,
        ) {
            return fail(Reason::PathBlocked);
        }
        // What the agent's MCP calls and SQL are is recorded whatever is decided; a refused
        // tool is refused whatever SQL it carries.
        match policy.tool_guard(
            input.method,
            path,
            input.body,
            identity.agent.as_deref(),
            &workspace.name,
        ) {
            Ok(tool) => draft.mcp_tool = clean(tool.as_deref().unwrap_or(""), 256),
            Err(block) => {
                let tool = block.tool.as_deref().unwrap_or("");
                tracing::info!(tool, "mcp tool blocked");
                draft.mcp_tool = clean(tool, 256);
                *jsonrpc_id = block.jsonrpc_id;
                return fail(Reason::ToolBlocked);
            }
        }
        drop(in_policy);
        let judged = policy.statement_guard(
            input.method,
            path,
            input.body,
            identity.agent.as_deref(),
            &workspace.name,
        );
        match judged {
            Ok(None) => {}
            Ok(Some(seen)) => {
                draft.statement_kind = seen.kind.as_str().to_string();
                draft.statement_fp = seen.fingerprint.to_vec();
                draft.statement_text = seen.text.unwrap_or_default();
            }
            Err(block) => {
                tracing::info!(
                    why = block.why,
                    kind = block.kind.as_str(),
                    "statement blocked"
                );
                draft.statement_kind = block.kind.as_str().to_string();
                if block.fingerprint != [0u8; 32] {
                    draft.statement_fp = block.fingerprint.to_vec();
                }
                draft.statement_text = block.text.unwrap_or_default();
                *jsonrpc_id = block.jsonrpc_id;
                return fail(Reason::StatementBlocked);
            }
        }
        // 4. token
        let token_span = tracing::info_span!(
            target: crate::logging::SPANS,
            "token",
            cache = tracing::field::Empty,
        );
        match self
            .tokens
            .token(workspace, &identity, token)
            .instrument(token_span)
            .await
        {
            Ok(t) => Ok(t),
            Err(e) => {
                tracing::info!(workspace = %workspace.name, error = %e, "no Databricks token");
                Err((Reason::from(&e), e.retry_after()))
            }
        }
    }

    fn upstream_user_agent(&self, headers: &HashMap<String, String>, trace_id: TraceId) -> String {
        let agent_ua = headers.get("user-agent").map(String::as_str).unwrap_or("");
        let mut ua = headers::clean_user_agent(agent_ua);
        if !ua.is_empty() {
            ua.push(' ');
        }
        ua.push_str(self.user_agent_suffix.trim_start());
        ua.push_str(" aegis-trace/");
        ua.push_str(trace_id.as_str());
        ua
    }
}

fn deny(trace_id: TraceId, reason: Reason, retry_after: Option<u64>) -> Decision {
    let retry_after = retry_after.or(match reason {
        Reason::DependencyUnavailable | Reason::RateLimited => Some(1),
        _ => None,
    });
    Decision::Deny(Deny {
        trace_id,
        reason,
        retry_after,
        consent_url: None,
        jsonrpc_id: None,
    })
}

/// Bounds a request-controlled string before it reaches the audit chain; control characters
/// become `?` so a row always renders on one line.
fn clean(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max));
    for c in s.chars() {
        if out.len() + c.len_utf8() > max {
            break;
        }
        out.push(if c.is_control() { '?' } else { c });
    }
    out
}

#[cfg(test)]
mod tests;
