//! Pipeline tests with in-memory dependencies: no sockets.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;
use crate::config::{Config, TokenSourceKind};
use crate::secret::{Key32, SecretString};

struct FakeIdentity;

impl Identify for FakeIdentity {
    async fn identify(&self, token: &str) -> Result<Arc<Identity>, IdentityError> {
        match token {
            "alice" | "slow" => Ok(Arc::new(Identity {
                issuer_name: Arc::from("dev"),
                issuer: Arc::from("http://127.0.0.1:1"),
                subject: "u-alice".into(),
                user_name: "alice@example.com".into(),
                agent: Some("copilot".into()),
                expires_at: i64::MAX / 2,
                actor_chain: String::new(),
            })),
            "joule" => Ok(Arc::new(Identity {
                issuer_name: Arc::from("dev"),
                issuer: Arc::from("http://127.0.0.1:1"),
                subject: "u-bob".into(),
                user_name: "bob@example.com".into(),
                agent: Some("joule".into()),
                expires_at: i64::MAX / 2,
                actor_chain: String::new(),
            })),
            "expired" => Err(IdentityError::Expired),
            "nokeys" => Err(IdentityError::KeysUnavailable),
            _ => Err(IdentityError::Rejected("bad signature")),
        }
    }
}

struct FakeTokens {
    fail: Option<BrokerError>,
}

impl Tokens for FakeTokens {
    async fn token(
        &self,
        _ws: &WorkspaceConfig,
        identity: &Identity,
        subject: &str,
    ) -> Result<Arc<DbToken>, BrokerError> {
        if subject == "slow" {
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        if let Some(e) = &self.fail {
            return Err(e.clone());
        }
        Ok(Arc::new(DbToken {
            token: SecretString::new(format!("dbx-{}", identity.user_name)),
            expires_at_ms: i64::MAX / 2,
            use_until_ms: i64::MAX / 2,
            refresh_at_ms: i64::MAX / 2,
            source: TokenSourceKind::Federation,
            seq: 0,
        }))
    }
}

#[derive(Default)]
struct FakeAudit {
    rows: Mutex<Vec<Draft>>,
    fail: AtomicBool,
    calls: AtomicUsize,
}

impl Audit for Arc<FakeAudit> {
    async fn append(&self, draft: Draft) -> Result<u64, AuditError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.fail.load(Ordering::SeqCst) {
            return Err(AuditError::Store(crate::pg::PgError::NotConnected));
        }
        let mut rows = self.rows.lock().unwrap();
        rows.push(draft);
        Ok(rows.len() as u64)
    }
}

fn config() -> (tempfile::TempDir, Config) {
    let dir = tempfile::tempdir().unwrap();
    for name in ["audit.key", "cache.key", "checkpoint.key"] {
        std::fs::write(dir.path().join(name), Key32::generate().to_base64()).unwrap();
    }
    let text = r#"
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
issuer = "http://127.0.0.1:1"
audiences = ["aegis"]
algorithms = ["RS256"]
username_claim = "email"
agent_claim = "azp"
[[workspaces]]
name = "sandbox"
url = "http://127.0.0.1:5"
token_source = "federation"
scopes = ["all-apis"]
allowed_agents = ["copilot"]
"#;
    let cfg = Config::parse(text, dir.path(), &HashMap::new()).unwrap();
    (dir, cfg)
}

struct Harness {
    _dir: tempfile::TempDir,
    pipeline: Pipeline<FakeIdentity, FakeTokens, Arc<FakeAudit>>,
    audit: Arc<FakeAudit>,
    ready: Arc<AtomicBool>,
}

fn harness(fail: Option<BrokerError>) -> Harness {
    let (dir, cfg) = config();
    let audit = Arc::new(FakeAudit::default());
    let ready = Arc::new(AtomicBool::new(true));
    let pipeline = Pipeline::new(
        FakeIdentity,
        FakeTokens { fail },
        audit.clone(),
        Arc::new(Policy::new(&cfg)),
        ready.clone(),
        Duration::from_millis(500),
    );
    Harness {
        _dir: dir,
        pipeline,
        audit,
        ready,
    }
}

fn headers(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn input<'a>(method: &'a str, path: &'a str, h: &'a HashMap<String, String>) -> CheckInput<'a> {
    CheckInput {
        method,
        path,
        authority: "127.0.0.1:10000",
        headers: h,
        context_workspace: None,
        request_id: "req-1",
        body: None,
    }
}

fn denied(d: &Decision) -> Reason {
    match d {
        Decision::Deny(d) => d.reason,
        Decision::Allow(_) => panic!("expected a deny"),
    }
}

#[tokio::test]
async fn allow_carries_the_users_token_after_its_row_commits() {
    let h = harness(None);
    let hdrs = headers(&[
        ("authorization", "Bearer alice"),
        (
            "user-agent",
            "copilot/1.0 x(aegis-trace/forged foo;AEGIS/9.9",
        ),
        ("x-aegis-user", "root"),
    ]);
    let d = h
        .pipeline
        .check(&input("GET", "/api/2.0/preview/scim/v2/Me?x=1", &hdrs))
        .await;
    let Decision::Allow(a) = d else {
        panic!("expected allow, got {d:?}")
    };
    assert_eq!(a.token.token.expose(), "dbx-alice@example.com");
    assert_eq!(a.remove_headers, vec!["x-aegis-user".to_string()]);
    assert!(a.user_agent.starts_with("copilot/1.0 x( foo; aegis/"));
    assert!(a
        .user_agent
        .ends_with(&format!("aegis-trace/{}", a.trace_id)));
    assert!(!a.user_agent.contains("forged") && !a.user_agent.contains("9.9"));
    let lower = a.user_agent.to_ascii_lowercase();
    assert_eq!(lower.matches("aegis-trace/").count(), 1, "{}", a.user_agent);
    assert_eq!(lower.matches("aegis/").count(), 1, "{}", a.user_agent);

    let rows = h.audit.rows.lock().unwrap();
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(row.verdict, Verdict::Allow);
    assert_eq!(row.trace_id, a.trace_id.as_str());
    assert_eq!(row.user_name, "alice@example.com");
    assert_eq!(row.agent, "copilot");
    assert_eq!(row.workspace, "sandbox");
    assert_eq!(row.path, "/api/2.0/preview/scim/v2/Me");
    assert_eq!(row.request_id, "req-1");
    assert_eq!(row.token_source, "federation");
    assert_eq!(row.token_fp.len(), 8);
    assert_eq!(a.seq, 1);
}

#[tokio::test]
async fn no_allow_without_a_committed_row() {
    let h = harness(None);
    h.audit.fail.store(true, Ordering::SeqCst);
    let hdrs = headers(&[("authorization", "Bearer alice")]);
    let d = h
        .pipeline
        .check(&input("GET", "/api/2.0/preview/scim/v2/Me", &hdrs))
        .await;
    assert_eq!(denied(&d), Reason::DependencyUnavailable);
    match d {
        Decision::Deny(d) => assert_eq!(d.retry_after, Some(1)),
        _ => unreachable!(),
    }
}

#[tokio::test]
async fn every_deny_is_audited_with_its_reason() {
    let h = harness(None);
    type Case<'a> = (Vec<(&'a str, &'a str)>, &'a str, &'a str, Reason);
    let cases: Vec<Case> = vec![
        (
            vec![],
            "GET",
            "/api/2.0/preview/scim/v2/Me",
            Reason::MissingCredentials,
        ),
        (
            vec![("authorization", "Basic abc")],
            "GET",
            "/",
            Reason::MissingCredentials,
        ),
        (
            vec![("authorization", "Bearer forged")],
            "GET",
            "/",
            Reason::InvalidToken,
        ),
        (
            vec![("authorization", "Bearer expired")],
            "GET",
            "/",
            Reason::TokenExpired,
        ),
        (
            vec![("authorization", "Bearer nokeys")],
            "GET",
            "/",
            Reason::DependencyUnavailable,
        ),
        (
            vec![("authorization", "Bearer joule")],
            "GET",
            "/",
            Reason::AgentNotAllowed,
        ),
        (
            vec![("authorization", "Bearer alice")],
            "POST",
            "/api/2.0/sql/../token/create",
            Reason::PathBlocked,
        ),
    ];
    for (i, (hdrs, method, path, want)) in cases.iter().enumerate() {
        let hdrs = headers(hdrs);
        let d = h.pipeline.check(&input(method, path, &hdrs)).await;
        assert_eq!(denied(&d), *want, "case {i}");
        let rows = h.audit.rows.lock().unwrap();
        let row = rows.last().unwrap();
        assert_eq!(row.verdict, Verdict::Deny);
        assert_eq!(row.reason, want.code());
        assert_eq!(row.trace_id, d.trace_id().as_str());
    }
}

#[tokio::test]
async fn not_ready_denies_503() {
    let h = harness(None);
    h.ready.store(false, Ordering::SeqCst);
    let hdrs = headers(&[("authorization", "Bearer alice")]);
    let d = h.pipeline.check(&input("GET", "/", &hdrs)).await;
    assert_eq!(denied(&d), Reason::DependencyUnavailable);
}

#[tokio::test]
async fn broker_errors_map_to_reasons() {
    let cases = [
        (
            BrokerError::Unavailable("redis"),
            Reason::DependencyUnavailable,
            Some(1),
        ),
        (
            BrokerError::RateLimited { retry_after: 7 },
            Reason::RateLimited,
            Some(7),
        ),
        (
            BrokerError::Rejected("invalid_grant".into()),
            Reason::TokenExchangeRejected,
            None,
        ),
    ];
    for (err, want, retry) in cases {
        let h = harness(Some(err));
        let hdrs = headers(&[("authorization", "Bearer alice")]);
        match h.pipeline.check(&input("GET", "/", &hdrs)).await {
            Decision::Deny(d) => {
                assert_eq!(d.reason, want);
                assert_eq!(d.retry_after, retry);
            }
            other => panic!("expected deny, got {other:?}"),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_stuck_dependency_is_cut_off_at_the_check_timeout() {
    let h = harness(None);
    let hdrs = headers(&[("authorization", "Bearer slow")]);
    let d = h.pipeline.check(&input("GET", "/", &hdrs)).await;
    assert_eq!(denied(&d), Reason::DependencyUnavailable);
}

#[test]
fn trace_ids_are_32_hex_and_distinct() {
    let a = TraceId::random();
    let b = TraceId::random();
    assert_eq!(a.as_str().len(), 32);
    assert!(a.as_str().bytes().all(|c| c.is_ascii_hexdigit()));
    assert_ne!(a, b);
}

#[test]
fn responses_follow_the_header_contract() {
    use envoy_types::ext_authz::v3::pb::HttpResponse;
    let trace = TraceId::random();
    let allow = crate::grpc::respond(Decision::Allow(Allow {
        trace_id: trace,
        seq: 1,
        token: Arc::new(DbToken {
            token: SecretString::new("dbx-token".into()),
            expires_at_ms: 0,
            use_until_ms: 0,
            refresh_at_ms: 0,
            source: TokenSourceKind::Federation,
            seq: 0,
        }),
        user_agent: "ua".into(),
        remove_headers: vec!["x-aegis-user".into()],
    }));
    assert_eq!(allow.status.as_ref().unwrap().code, 0);
    let Some(HttpResponse::OkResponse(ok)) = allow.http_response else {
        panic!()
    };
    let auth: Vec<_> = ok
        .headers
        .iter()
        .filter(|h| h.header.as_ref().unwrap().key == "authorization")
        .collect();
    assert_eq!(auth.len(), 1);
    assert_eq!(auth[0].header.as_ref().unwrap().value, "Bearer dbx-token");
    assert_eq!(
        auth[0].append_action,
        envoy_types::ext_authz::v3::pb::HeaderAppendAction::OverwriteIfExistsOrAdd as i32
    );
    assert_eq!(ok.headers_to_remove, vec!["x-aegis-user".to_string()]);

    let deny = crate::grpc::respond(Decision::Deny(Deny {
        trace_id: trace,
        reason: Reason::MissingCredentials,
        retry_after: None,
        consent_url: None,
        jsonrpc_id: None,
    }));
    assert_ne!(deny.status.as_ref().unwrap().code, 0);
    let Some(HttpResponse::DeniedResponse(d)) = deny.http_response else {
        panic!()
    };
    assert_eq!(d.status.unwrap().code, 401);
    let body: serde_json::Value = serde_json::from_str(&d.body).unwrap();
    assert_eq!(body["error"], "missing_credentials");
    assert_eq!(body["trace_id"], trace.as_str());
    assert!(d
        .headers
        .iter()
        .any(|h| h.header.as_ref().unwrap().key == "www-authenticate"));
}

#[test]
fn a_consent_required_deny_carries_only_its_consent_url() {
    use envoy_types::ext_authz::v3::pb::HttpResponse;
    let trace = TraceId::random();
    let url = "https://aegis.example.com/oauth/start?w=prod&s=x";
    let resp = crate::grpc::respond(Decision::Deny(Deny {
        trace_id: trace,
        reason: Reason::ConsentRequired,
        retry_after: None,
        consent_url: Some(url.into()),
        jsonrpc_id: None,
    }));
    let Some(HttpResponse::DeniedResponse(d)) = resp.http_response else {
        panic!("not a denied response")
    };
    assert_eq!(d.status.unwrap().code, 401);
    let body: serde_json::Value = serde_json::from_str(&d.body).unwrap();
    let keys: Vec<&str> = body
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys.len(), 4, "{body}");
    assert_eq!(body["error"], "consent_required");
    assert_eq!(body["consent_url"], url);
    // Another reason never carries a link, even if one was set by mistake.
    let resp = crate::grpc::respond(Decision::Deny(Deny {
        trace_id: trace,
        reason: Reason::PathBlocked,
        retry_after: None,
        consent_url: Some(url.into()),
        jsonrpc_id: None,
    }));
    let Some(HttpResponse::DeniedResponse(d)) = resp.http_response else {
        panic!("not a denied response")
    };
    assert!(!d.body.contains("consent_url"), "{}", d.body);
}

#[tokio::test]
async fn sql_that_changes_permissions_is_blocked_and_audited_queries_pass() {
    let h = harness(None);
    let hd = headers(&[("authorization", "Bearer alice")]);
    let statement =
        |sql: &str| serde_json::json!({ "statement": sql, "warehouse_id": "w" }).to_string();
    let run = |body: Option<String>| {
        let h = &h;
        let hd = &hd;
        async move {
            let mut i = input("POST", "/api/2.0/sql/statements", hd);
            i.body = body.as_deref().map(str::as_bytes);
            h.pipeline.check(&i).await
        }
    };
    // Positive control: a query passes.
    assert!(matches!(
        run(Some(statement("SELECT * FROM main.sales.orders"))).await,
        Decision::Allow(_)
    ));
    for body in [
        Some(statement(
            "GRANT ALL PRIVILEGES ON CATALOG main TO `account users`",
        )),
        Some(statement("select 1; ALTER SCHEMA s OWNER TO `mallory`")),
        Some("{not json".to_string()),
        Some(serde_json::json!({ "statement": 7 }).to_string()),
        None,
    ] {
        let d = run(body.clone()).await;
        assert_eq!(denied(&d), Reason::StatementBlocked, "{body:?}");
    }
    let blocked = h
        .audit
        .rows
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.reason == "statement_blocked")
        .count();
    assert_eq!(blocked, 5);
    // MCP: the refused message's JSON-RPC id travels with the deny.
    let mut i = input("POST", "/api/2.0/mcp/sql", &hd);
    let call = serde_json::json!({
        "jsonrpc": "2.0", "id": 42, "method": "tools/call",
        "params": { "name": "execute_sql", "arguments": { "query": "REVOKE SELECT ON t FROM x" } }
    })
    .to_string();
    i.body = Some(call.as_bytes());
    match h.pipeline.check(&i).await {
        Decision::Deny(d) => {
            assert_eq!(d.reason, Reason::StatementBlocked);
            assert_eq!(d.jsonrpc_id, Some(serde_json::json!(42)));
        }
        Decision::Allow(_) => panic!("a REVOKE through the MCP SQL tool was allowed"),
    }
    // Other JSON-RPC methods on the same path pass (tools/list, initialize).
    let list = serde_json::json!({ "jsonrpc": "2.0", "id": 1, "method": "tools/list" }).to_string();
    i.body = Some(list.as_bytes());
    assert!(matches!(h.pipeline.check(&i).await, Decision::Allow(_)));
}
