//! Shared helpers for the end-to-end tests: a whole stack (real Envoy, Redis, PostgreSQL, the
//! sandbox and the aegis binary) and small HTTP helpers. Every wait is bounded.

#![allow(dead_code, unused_imports)]

use std::time::{Duration, Instant};

pub use sandbox::stack::{
    dev_envoy_yaml, envoy_bin, free_port, AegisProcess, EnvoyProcess, EnvoyUpstreams,
};
pub use sandbox::stack::{Stack, StackOptions};
pub use sandbox::{RequestRecord, TokenRequest};

pub mod python;
pub mod sql_corpus;

pub const AEGIS_BIN: &str = env!("CARGO_BIN_EXE_aegis");

/// Starts a stack, failing loudly if anything cannot start.
pub async fn start() -> Stack {
    start_with(StackOptions::new(AEGIS_BIN)).await
}

pub async fn start_with(opts: StackOptions) -> Stack {
    match Stack::start(opts).await {
        Ok(s) => s,
        Err(e) => panic!("the test stack could not start: {e}"),
    }
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("http client")
}

pub fn token(stack: &Stack, user: &str) -> String {
    stack.sandbox.mint_idp_token(&TokenRequest::new(user))
}

/// A response, read whole.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: serde_json::Value,
    pub text: String,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn trace_id(&self) -> String {
        self.header("x-aegis-trace-id")
            .unwrap_or_else(|| panic!("no x-aegis-trace-id on {self:?}"))
            .to_string()
    }
}

pub async fn read(resp: reqwest::Response) -> Resp {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
    Resp {
        status,
        headers,
        body,
        text,
    }
}

/// GET through Envoy with an optional bearer token.
pub async fn get(stack: &Stack, path: &str, bearer: Option<&str>) -> Resp {
    let mut req = http().get(format!("{}{}", stack.envoy_url(), path));
    if let Some(t) = bearer {
        req = req.bearer_auth(t);
    }
    read(req.send().await.expect("request through envoy")).await
}

/// Runs a statement through Envoy with the SQL Statement Execution API.
pub async fn sql(stack: &Stack, bearer: &str, statement: &str) -> Resp {
    let resp = http()
        .post(format!("{}/api/2.0/sql/statements", stack.envoy_url()))
        .bearer_auth(bearer)
        .header("user-agent", "copilot-agent/1.0")
        .json(&serde_json::json!({
            "statement": statement,
            "warehouse_id": sandbox::WAREHOUSE_ID,
            "wait_timeout": "30s",
        }))
        .send()
        .await
        .expect("request through envoy");
    read(resp).await
}

/// Polls `probe` every 100 ms until it returns true, for at most `limit`.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if probe().await {
            return;
        }
        if start.elapsed() > limit {
            panic!("timed out after {limit:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `aegis <args>` and returns (exit code, stdout, stderr).
pub fn aegis(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(AEGIS_BIN)
        .args(args)
        .output()
        .expect("run aegis");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Audit rows as JSON objects, oldest first.
pub async fn audit_rows(stack: &Stack) -> Vec<serde_json::Value> {
    stack
        .postgres
        .query_json(
            "SELECT seq, decision, reason, user_name, agent, workspace, method, path, trace_id, \
             token_source, encode(token_fp, 'hex') AS token_fp FROM aegis_audit ORDER BY seq",
        )
        .await
        .expect("read audit rows")
}

/// A second aegis replica (same Redis, Postgres, chain and keys) behind its own Envoy.
pub struct Replica {
    pub envoy: EnvoyProcess,
    pub aegis: AegisProcess,
}

pub async fn second_replica(stack: &Stack) -> Replica {
    replica(stack, "replica-b").await
}

/// Another aegis replica named `instance_id`, with its own Envoy.
pub async fn replica(stack: &Stack, instance_id: &str) -> Replica {
    let grpc = free_port().unwrap();
    let admin = free_port().unwrap();
    let mut cfg = stack.config().clone();
    let server = cfg
        .get_mut("server")
        .and_then(|v| v.as_table_mut())
        .expect("server table");
    server.insert("grpc_listen".into(), format!("127.0.0.1:{grpc}").into());
    server.insert("admin_listen".into(), format!("127.0.0.1:{admin}").into());
    server.insert("instance_id".into(), instance_id.into());
    let path = stack
        .write_config_as(&format!("aegis-{instance_id}.toml"), &cfg)
        .unwrap();
    let aegis = AegisProcess::start(stack.aegis_bin(), &path)
        .await
        .expect("second aegis starts");
    let ws_port: u16 = stack
        .sandbox
        .workspace_url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("workspace port");
    let envoy = EnvoyProcess::start(
        &envoy_bin().unwrap(),
        &dev_envoy_yaml().unwrap(),
        &stack.work_dir().join(format!("envoy-{instance_id}")),
        EnvoyUpstreams {
            databricks_port: ws_port,
            aegis_port: grpc,
        },
    )
    .await
    .expect("second envoy starts");
    Replica { envoy, aegis }
}

/// `aegis token revoke --config <the stack's config> --user <user>`, plus `extra` arguments.
pub fn revoke(stack: &Stack, user: &str, extra: &[&str]) -> (i32, String, String) {
    let config = stack
        .config_path()
        .to_str()
        .expect("config path")
        .to_string();
    let mut args = vec!["token", "revoke", "--config", &config, "--user", user];
    args.extend_from_slice(extra);
    aegis(&args)
}

/// Adds a second trusted issuer, `tenant-b` (`{idp}/tenant-b`, signing with the dev IdP's
/// keys, which the sandbox workspace's federation also trusts), to an aegis config.
pub fn add_tenant_b(c: &mut toml::Table) {
    let first = c["issuers"][0].as_table().expect("an issuer").clone();
    let idp = first["issuer"].as_str().expect("issuer").to_string();
    let mut second = first;
    second.insert("name".into(), "tenant-b".into());
    second.insert(
        "issuer".into(),
        format!("{idp}{}", sandbox::SECOND_ISSUER_PATH).into(),
    );
    second.insert("jwks_uri".into(), format!("{idp}/jwks").into());
    c.get_mut("issuers")
        .and_then(|v| v.as_array_mut())
        .expect("issuers")
        .push(second.into());
}

/// An IdP token from `tenant-b` for subject `sub`, asserting the e-mail `email`.
pub fn tenant_b_token(stack: &Stack, sub: &str, email: &str) -> String {
    let mut req = TokenRequest::new(email);
    req.extra_claims.insert(
        "iss".into(),
        format!("{}{}", stack.sandbox.idp_url, sandbox::SECOND_ISSUER_PATH).into(),
    );
    req.extra_claims.insert("sub".into(), sub.into());
    req.extra_claims.insert("email".into(), email.into());
    stack.sandbox.mint_idp_token(&req)
}

/// One request of a background load: when it was sent, its status, aegis' deny reason (if
/// any), whether it carried `retry-after`, and its aegis trace id.
#[derive(Debug)]
pub struct Sample {
    pub sent: Instant,
    pub status: u16,
    pub reason: String,
    pub retry_after: bool,
    pub trace: Option<String>,
}

/// `workers` loops sending `GET {base}{path}` as `bearer` until `until` (bounded to 50,000
/// requests each; a refused request is followed by a 20 ms pause), then all their samples.
pub fn spawn_load(
    base: String,
    path: &'static str,
    bearer: String,
    workers: usize,
    until: Instant,
) -> tokio::task::JoinHandle<Vec<Sample>> {
    tokio::spawn(async move {
        let client = http();
        let loops = (0..workers).map(|_| {
            let (client, base, bearer) = (client.clone(), base.clone(), bearer.clone());
            async move {
                let mut out = Vec::new();
                for _ in 0..50_000 {
                    if Instant::now() >= until {
                        break;
                    }
                    let sent = Instant::now();
                    let Ok(r) = client
                        .get(format!("{base}{path}"))
                        .bearer_auth(&bearer)
                        .send()
                        .await
                    else {
                        continue;
                    };
                    let status = r.status().as_u16();
                    let retry_after = r.headers().contains_key("retry-after");
                    let trace = r
                        .headers()
                        .get("x-aegis-trace-id")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    let body: serde_json::Value = r.json().await.unwrap_or_default();
                    out.push(Sample {
                        sent,
                        status,
                        reason: body["error"].as_str().unwrap_or_default().to_string(),
                        retry_after,
                        trace,
                    });
                    if status != 200 {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                out
            }
        });
        futures_util::future::join_all(loops)
            .await
            .into_iter()
            .flatten()
            .collect()
    })
}

/// `FLUSHALL` on the stack's Redis: every key gone, as after a restart without persistence.
pub async fn flushall(stack: &Stack) {
    let client = redis::Client::open(stack.redis.url()).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection");
    redis::cmd("FLUSHALL")
        .query_async::<()>(&mut conn)
        .await
        .expect("FLUSHALL");
}

/// A signed-in operator console session (static-token sign-in): the cookie and the CSRF token
/// its actions must carry.
pub struct Console {
    pub base: String,
    pub host: String,
    pub cookie: String,
    pub csrf: String,
}

pub async fn console_sign_in(stack: &Stack) -> Console {
    let base = stack.aegis_admin_url();
    let host = base.trim_start_matches("http://").to_string();
    let resp = http()
        .post(format!("{base}/console/login"))
        .header("origin", format!("http://{host}"))
        .form(&[("token", stack.console_token())])
        .send()
        .await
        .expect("console login");
    assert_eq!(resp.status().as_u16(), 303);
    let cookie = resp
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .expect("a session cookie")
        .to_string();
    let page = http()
        .get(format!("{base}/console"))
        .header("cookie", &cookie)
        .send()
        .await
        .expect("console page")
        .text()
        .await
        .expect("console page text");
    let csrf = page
        .split("name=\"aegis-csrf\" content=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a csrf token in the page")
        .to_string();
    Console {
        base,
        host,
        cookie,
        csrf,
    }
}

impl Console {
    /// POSTs a console action (a JSON body, or none for `Value::Null`).
    pub async fn act(&self, path: &str, body: serde_json::Value) -> Resp {
        let mut req = http()
            .post(format!("{}{path}", self.base))
            .header("cookie", &self.cookie)
            .header("x-aegis-csrf", &self.csrf)
            .header("origin", format!("http://{}", self.host));
        if !body.is_null() {
            req = req.json(&body);
        }
        read(req.send().await.expect("console action")).await
    }
}

/// Joins the chain with the workspace's request log: every ALLOW row whose path `ours` accepts
/// reached the workspace exactly once, as its user, and every request the workspace logged that
/// `keep` accepts (and whose path `ours` accepts) has its ALLOW row with the same trace id and
/// user. Returns (ALLOW rows, requests) joined.
pub async fn assert_allows_joined(
    stack: &Stack,
    ours: impl Fn(&str) -> bool,
    keep: impl Fn(&RequestRecord) -> bool,
) -> (usize, usize) {
    let seen: Vec<RequestRecord> = stack
        .sandbox
        .requests()
        .into_iter()
        .filter(|r| keep(r) && ours(&r.path))
        .collect();
    let chain = stack
        .postgres
        .query_json("SELECT decision, user_name, path, trace_id FROM aegis_audit ORDER BY seq")
        .await
        .expect("chain rows");
    let allows: Vec<&serde_json::Value> = chain
        .iter()
        .filter(|r| r["decision"] == "ALLOW" && ours(r["path"].as_str().unwrap_or("")))
        .collect();
    for row in &allows {
        let trace = row["trace_id"].as_str().expect("trace id");
        let hits: Vec<&RequestRecord> = seen
            .iter()
            .filter(|r| r.trace_id.as_deref() == Some(trace))
            .collect();
        assert_eq!(
            hits.len(),
            1,
            "{row} reached the workspace {} times",
            hits.len()
        );
        assert_eq!(
            hits[0].user.as_deref(),
            row["user_name"].as_str(),
            "{row} vs {:?}",
            hits[0]
        );
    }
    for r in &seen {
        let trace = r
            .trace_id
            .as_deref()
            .unwrap_or_else(|| panic!("no trace id on {r:?}"));
        assert!(
            allows
                .iter()
                .any(|a| a["trace_id"] == trace && a["user_name"].as_str() == r.user.as_deref()),
            "the workspace saw {r:?} without its ALLOW row"
        );
    }
    (allows.len(), seen.len())
}
