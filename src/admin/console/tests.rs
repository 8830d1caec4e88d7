//! Console handlers through `oneshot`, with a fake [`Operations`]: sign-in, sessions, CSRF and
//! Origin checks, the disabled console, and that no response carries the console token.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use tower::ServiceExt;

use super::*;
use crate::admin::{app, AdminState, Readiness, ReadyStatus};

const TOKEN: &str = "console-token-0123456789";
const HOST: &str = "127.0.0.1:9192";
const ORIGIN: &str = "http://127.0.0.1:9192";

#[derive(Default)]
struct Fake {
    verifies: AtomicUsize,
    exports: AtomicUsize,
    /// Who each action was done by (`Operator::actor`).
    actors: Mutex<Vec<String>>,
    revoked: Mutex<Vec<(String, Option<String>)>>,
    blocked: Mutex<Vec<(String, bool)>>,
    feed: Option<broadcast::Sender<Arc<Committed>>>,
}

fn row(seq: u64, decision: &'static str, reason: &str) -> Committed {
    Committed {
        seq,
        ts_unix_micros: 1_700_000_000_000_000,
        trace_id: format!("{seq:032x}"),
        decision,
        reason: reason.into(),
        user_name: "alice@example.com".into(),
        agent: "copilot".into(),
        workspace: "prod".into(),
        method: "GET".into(),
        path: "/api/2.0/clusters/list".into(),
        actor_chain: String::new(),
    }
}

impl Operations for Fake {
    fn status(&self) -> BoxFuture<'_, ConsoleStatus> {
        Box::pin(async {
            ConsoleStatus {
                instance_id: "test".into(),
                chain: ChainStatus {
                    chain_id: "main".into(),
                    size: 7,
                    ..ChainStatus::default()
                },
                ..ConsoleStatus::default()
            }
        })
    }
    fn subscribe(&self) -> broadcast::Receiver<Arc<Committed>> {
        match &self.feed {
            Some(tx) => tx.subscribe(),
            None => broadcast::channel(1).1,
        }
    }
    fn recent(&self, _limit: usize) -> BoxFuture<'_, Result<Vec<Committed>, OpError>> {
        Box::pin(async { Ok(vec![row(1, "ALLOW", ""), row(2, "DENY", "path_blocked")]) })
    }
    fn verify(&self, by: Operator) -> BoxFuture<'_, Result<VerifyOutcome, OpError>> {
        self.actors.lock().unwrap().push(by.actor());
        self.verifies.fetch_add(1, Ordering::SeqCst);
        Box::pin(async {
            Ok(VerifyOutcome {
                at_unix_ms: 1,
                intact: true,
                rows: 7,
                first_bad_seq: None,
                problem: None,
                detail: None,
                duration_ms: 1,
            })
        })
    }
    fn revoke(
        &self,
        by: Operator,
        user: String,
        workspace: Option<String>,
    ) -> BoxFuture<'_, Result<Vec<String>, OpError>> {
        self.actors.lock().unwrap().push(by.actor());
        self.revoked.lock().unwrap().push((user, workspace));
        Box::pin(async { Ok(vec!["prod".to_string()]) })
    }
    fn set_agent_blocked(
        &self,
        by: Operator,
        agent: String,
        blocked: bool,
    ) -> BoxFuture<'_, Result<(), OpError>> {
        self.actors.lock().unwrap().push(by.actor());
        self.blocked.lock().unwrap().push((agent, blocked));
        Box::pin(async { Ok(()) })
    }
    fn export(&self, by: Operator, limit: usize) -> BoxFuture<'_, Result<Vec<Committed>, OpError>> {
        self.actors.lock().unwrap().push(by.actor());
        self.exports.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            Ok(
                vec![row(1, "ALLOW", ""), row(2, "ADMIN", "token_revoked")][..limit.min(2)]
                    .to_vec(),
            )
        })
    }
}

struct Ready;
impl Readiness for Ready {
    fn status(&self) -> ReadyStatus {
        ReadyStatus {
            ready: true,
            config: true,
            jwks: true,
            audit_chain_head: true,
            agent_blocklist: true,
            redis: true,
        }
    }
}

fn router(fake: Arc<Fake>, enabled: bool) -> Router {
    router_with(fake, enabled).0
}

/// The router and the console behind it (to open sessions with given roles).
fn router_with(fake: Arc<Fake>, enabled: bool) -> (Router, Option<Arc<Console>>) {
    let console = Console::new(
        enabled.then(|| SecretString::new(TOKEN.to_string())),
        None,
        fake as Arc<dyn Operations>,
    )
    .map(Arc::new);
    let app = app(AdminState {
        readiness: Arc::new(Ready),
        metrics: None,
        console: console.clone(),
    });
    (app, console)
}

/// A session for an IdP principal with `roles`: (cookie, csrf).
fn session_for(console: &Console, name: &str, roles: session::Roles) -> (String, String) {
    let s = console
        .sessions
        .create(Operator {
            principal: session::Principal::Oidc {
                issuer: "https://idp.example.com".into(),
                subject: format!("u-{name}"),
                name: name.into(),
            },
            roles,
        })
        .unwrap();
    (format!("{}={}", session::COOKIE, s.id), s.csrf)
}

async fn send(app: &Router, req: Request<Body>) -> (StatusCode, HeaderMap, String) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

fn login_req(token: &str, origin: Option<&str>) -> Request<Body> {
    let mut b = Request::post("/console/login")
        .header("host", HOST)
        .header("content-type", "application/x-www-form-urlencoded");
    if let Some(o) = origin {
        b = b.header("origin", o);
    }
    b.body(Body::from(format!("token={token}"))).unwrap()
}

/// Signs in; returns (cookie header value, csrf token).
async fn sign_in(app: &Router) -> (String, String) {
    let (status, headers, _) = send(app, login_req(TOKEN, Some(ORIGIN))).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let set_cookie = headers
        .get("set-cookie")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let cookie = set_cookie.split(';').next().unwrap().to_string();
    let (status, _, page) = send(
        app,
        Request::get("/console")
            .header("cookie", &cookie)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let csrf = page
        .split("name=\"aegis-csrf\" content=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap()
        .to_string();
    assert_eq!(csrf.len(), 64);
    (cookie, csrf)
}

fn action(
    path: &str,
    cookie: &str,
    csrf: Option<&str>,
    origin: Option<&str>,
    body: &str,
) -> Request<Body> {
    let mut b = Request::post(path)
        .header("host", HOST)
        .header("cookie", cookie)
        .header("content-type", "application/json");
    if let Some(c) = csrf {
        b = b.header(CSRF_HEADER, c);
    }
    if let Some(o) = origin {
        b = b.header("origin", o);
    }
    b.body(Body::from(body.to_string())).unwrap()
}

#[tokio::test]
async fn a_console_without_a_token_says_it_is_disabled() {
    let app = router(Arc::new(Fake::default()), false);
    let (status, _, body) = send(&app, Request::get("/console").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.contains("console is disabled"), "{body}");
    let (status, _, _) = send(&app, login_req(TOKEN, Some(ORIGIN))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = send(
        &app,
        Request::get("/console/api/status")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn sign_in_sets_a_strict_http_only_cookie_and_a_wrong_token_does_not() {
    let app = router(Arc::new(Fake::default()), true);
    let (status, _, page) = send(&app, Request::get("/console").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("type=\"password\" name=\"token\""), "{page}");

    let (status, headers, body) =
        send(&app, login_req("wrong-token-0123456789", Some(ORIGIN))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(headers.get("set-cookie").is_none());
    assert!(!body.contains(TOKEN));

    // A sign-in posted from another site is refused even with the right token.
    let (status, headers, _) = send(&app, login_req(TOKEN, Some("http://evil.example"))).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(headers.get("set-cookie").is_none());
    let (status, _, _) = send(&app, login_req(TOKEN, None)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    let (status, headers, _) = send(&app, login_req(TOKEN, Some(ORIGIN))).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let cookie = headers.get("set-cookie").unwrap().to_str().unwrap();
    assert!(cookie.starts_with("aegis_console="), "{cookie}");
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    assert!(cookie.contains("SameSite=Strict"), "{cookie}");
    assert!(!cookie.contains(TOKEN), "{cookie}");
    assert!(headers
        .get("content-security-policy")
        .is_some_and(|v| v.to_str().unwrap().contains("default-src 'none'")));
}

#[tokio::test]
async fn the_api_needs_a_session() {
    let app = router(Arc::new(Fake::default()), true);
    for path in ["/console/api/status", "/console/events"] {
        let (status, _, _) = send(&app, Request::get(path).body(Body::empty()).unwrap()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
        let (status, _, _) = send(
            &app,
            Request::get(path)
                .header("cookie", "aegis_console=forged")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
    }
    let (cookie, _) = sign_in(&app).await;
    let (status, _, body) = send(
        &app,
        Request::get("/console/api/status")
            .header("cookie", &cookie)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["chain"]["size"], 7);
    assert!(!body.contains(TOKEN));
}

#[tokio::test]
async fn actions_need_the_csrf_token_and_a_same_origin() {
    let fake = Arc::new(Fake::default());
    let app = router(fake.clone(), true);
    let (cookie, csrf) = sign_in(&app).await;

    let refused = [
        (None, Some(ORIGIN)),
        (Some("0".repeat(64)), Some(ORIGIN)),
        (Some(csrf.clone()), Some("http://evil.example")),
        (Some(csrf.clone()), Some("null")),
        (Some(csrf.clone()), None),
    ];
    for (token, origin) in &refused {
        let (status, _, _) = send(
            &app,
            action(
                "/console/api/verify",
                &cookie,
                token.as_deref(),
                *origin,
                "{}",
            ),
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{token:?} {origin:?}");
    }
    assert_eq!(fake.verifies.load(Ordering::SeqCst), 0);

    let (status, _, body) = send(
        &app,
        action(
            "/console/api/verify",
            &cookie,
            Some(&csrf),
            Some(ORIGIN),
            "{}",
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("\"intact\":true"));
    assert_eq!(fake.verifies.load(Ordering::SeqCst), 1);

    let (status, _, _) = send(
        &app,
        action(
            "/console/api/revoke",
            &cookie,
            Some(&csrf),
            Some(ORIGIN),
            r#"{"user":" alice@example.com ","workspace":null}"#,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        fake.revoked.lock().unwrap().as_slice(),
        &[("alice@example.com".to_string(), None)]
    );
    let (status, _, _) = send(
        &app,
        action(
            "/console/api/revoke",
            &cookie,
            Some(&csrf),
            Some(ORIGIN),
            r#"{"user":""}"#,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    for (path, blocked) in [
        ("/console/api/block", true),
        ("/console/api/unblock", false),
    ] {
        let (status, _, _) = send(
            &app,
            action(
                path,
                &cookie,
                Some(&csrf),
                Some(ORIGIN),
                r#"{"agent":"joule"}"#,
            ),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            fake.blocked.lock().unwrap().last().unwrap(),
            &("joule".to_string(), blocked)
        );
    }

    // Signing out ends the session.
    let (status, _, _) = send(
        &app,
        action("/console/logout", &cookie, Some(&csrf), Some(ORIGIN), ""),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = send(
        &app,
        action(
            "/console/api/verify",
            &cookie,
            Some(&csrf),
            Some(ORIGIN),
            "{}",
        ),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn the_feed_sends_the_backlog_then_live_rows_once() {
    let (tx, _) = broadcast::channel(16);
    let fake = Arc::new(Fake {
        feed: Some(tx.clone()),
        ..Fake::default()
    });
    let app = router(fake, true);
    let (cookie, _) = sign_in(&app).await;
    let resp = app
        .clone()
        .oneshot(
            Request::get("/console/events")
                .header("cookie", &cookie)
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    // seq 2 is in the backlog too: it must not be sent twice.
    tx.send(Arc::new(row(2, "DENY", "path_blocked"))).unwrap();
    tx.send(Arc::new(row(3, "DENY", "agent_not_allowed")))
        .unwrap();
    let mut body = resp.into_body().into_data_stream();
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while text.matches("event: decision").count() < 3 {
        use futures_util::StreamExt;
        let chunk = tokio::time::timeout_at(deadline, body.next())
            .await
            .expect("feed rows in time")
            .expect("stream open")
            .unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let seqs: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .collect();
    assert_eq!(seqs, vec!["1", "2", "3"], "{text}");
    assert!(text.contains("\"reason\":\"agent_not_allowed\""), "{text}");
    assert!(
        text.contains(&format!("\"trace_id\":\"{:032x}\"", 3)),
        "{text}"
    );
}

#[test]
fn origin_must_match_the_host() {
    let h = |pairs: &[(&'static str, &'static str)]| {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.insert(*k, HeaderValue::from_static(v));
        }
        m
    };
    assert!(same_origin(&h(&[("host", HOST), ("origin", ORIGIN)])));
    assert!(!same_origin(&h(&[
        ("host", HOST),
        ("origin", "http://127.0.0.1:9193")
    ])));
    assert!(!same_origin(&h(&[("origin", ORIGIN)])));
    assert!(!same_origin(&h(&[("host", HOST)])));
    assert!(same_origin(&h(&[
        ("host", HOST),
        ("sec-fetch-site", "same-origin")
    ])));
    assert!(!same_origin(&h(&[
        ("host", HOST),
        ("sec-fetch-site", "cross-site")
    ])));
}

#[tokio::test]
async fn each_action_needs_its_role_and_a_refusal_does_nothing() {
    use session::Roles;
    let fake = Arc::new(Fake::default());
    let (app, console) = router_with(fake.clone(), true);
    let console = console.unwrap();
    let viewer = Roles {
        viewer: true,
        ..Roles::default()
    };
    let operator = Roles {
        viewer: true,
        operator: true,
        auditor: false,
    };
    let auditor = Roles {
        viewer: true,
        operator: false,
        auditor: true,
    };
    let actions = [
        ("/console/api/revoke", r#"{"user":"alice@example.com"}"#),
        ("/console/api/block", r#"{"agent":"joule"}"#),
        ("/console/api/unblock", r#"{"agent":"joule"}"#),
        ("/console/api/verify", "{}"),
        ("/console/api/export", "{}"),
    ];
    // (name, roles, which of `actions` it may do)
    let people = [
        ("bob", viewer, [false, false, false, false, false]),
        ("alice", operator, [true, true, true, false, false]),
        ("carol", auditor, [false, false, false, true, true]),
    ];
    for (name, roles, may) in people {
        let (cookie, csrf) = session_for(&console, name, roles);
        // Every role reads.
        let (status, _, _) = send(
            &app,
            Request::get("/console/api/status")
                .header("cookie", &cookie)
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{name} reads the status");
        let (status, _, page) = send(
            &app,
            Request::get("/console")
                .header("cookie", &cookie)
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            page.contains(&format!("name=\"aegis-operator\" content=\"{name}\"")),
            "{page}"
        );
        for ((path, body), allowed) in actions.iter().zip(may) {
            let before = fake.actors.lock().unwrap().len();
            let (status, _, text) =
                send(&app, action(path, &cookie, Some(&csrf), Some(ORIGIN), body)).await;
            let after = fake.actors.lock().unwrap().len();
            if allowed {
                assert_eq!(status, StatusCode::OK, "{name} {path}: {text}");
                assert_eq!(after, before + 1, "{name} {path} reached the operation");
                let actor = fake.actors.lock().unwrap().last().unwrap().clone();
                assert!(actor.starts_with(&format!("console:{name} (")), "{actor}");
            } else {
                assert_eq!(status, StatusCode::FORBIDDEN, "{name} {path}: {text}");
                assert_eq!(
                    serde_json::from_str::<serde_json::Value>(&text).unwrap()["error"],
                    ROLE_REFUSED
                );
                assert_eq!(after, before, "{name} {path} must not reach the operation");
            }
        }
    }
    // The role check does not replace the CSRF check: an operator without the token is
    // refused as cross-site.
    let (cookie, _) = session_for(&console, "alice", operator);
    let (status, _, text) = send(
        &app,
        action(
            "/console/api/revoke",
            &cookie,
            Some(&"0".repeat(64)),
            Some(ORIGIN),
            r#"{"user":"x"}"#,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(text.contains("cross-site"), "{text}");
    // Break-glass (the static token) has every role and says so.
    let (cookie, csrf) = sign_in(&app).await;
    let (status, _, text) = send(
        &app,
        action(
            "/console/api/export",
            &cookie,
            Some(&csrf),
            Some(ORIGIN),
            r#"{"limit":1}"#,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["rows"].as_array().unwrap().len(), 1);
    assert_eq!(
        fake.actors.lock().unwrap().last().unwrap(),
        "console:break-glass"
    );
}

#[tokio::test]
async fn static_sign_in_is_refused_when_break_glass_is_off() {
    // Only IdP sign-in configured (no token): the form is hidden and a posted token refused.
    let fake = Arc::new(Fake::default());
    let validator = Arc::new(crate::identity::Validator::new(&[], reqwest::Client::new()));
    let oidc = OidcSignIn::new(
        crate::config::ConsoleOidcConfig {
            issuer_name: "corp".into(),
            issuer: "https://idp.example.com".into(),
            client_id: "aegis-console".into(),
            client_secret: None,
            redirect_uri: url::Url::parse("http://127.0.0.1:9192/console/oidc/callback").unwrap(),
            scopes: vec!["openid".into()],
            roles_claim: "groups".into(),
            viewer_values: vec!["v".into()],
            operator_values: vec![],
            auditor_values: vec![],
        },
        validator,
        reqwest::Client::new(),
    );
    let console = Console::new(None, Some(oidc), fake as Arc<dyn Operations>).map(Arc::new);
    let app = app(AdminState {
        readiness: Arc::new(Ready),
        metrics: None,
        console,
    });
    let (status, _, page) = send(&app, Request::get("/console").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("href=\"/console/oidc/start\""), "{page}");
    assert!(
        page.contains("class=\"hidden\" id=\"login-form\""),
        "{page}"
    );
    let (status, headers, body) = send(&app, login_req(TOKEN, Some(ORIGIN))).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(headers.get("set-cookie").is_none());
    assert!(body.contains("switched off"), "{body}");
    // A callback without a started sign-in opens nothing.
    let (status, headers, body) = send(
        &app,
        Request::get("/console/oidc/callback?code=x&state=y")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body.contains("expired or was already used"), "{body}");
    assert!(headers
        .get_all("set-cookie")
        .iter()
        .all(|v| !v.to_str().unwrap().starts_with("aegis_console=")));
}

#[test]
fn escape_html_escapes_markup() {
    assert_eq!(
        escape_html("<a href=\"x\">'&'</a>"),
        "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
    );
}
