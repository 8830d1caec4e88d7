//! The operator console, for real: a headless Debian chromium (driven by playwright-core, see
//! tests/browser/console.mjs) signs in to `/console` of an aegis running behind real Envoy,
//! Redis and PostgreSQL, watches the live feed while requests flow through Envoy, verifies the
//! chain, revokes a user and blocks an agent (signed in with the break-glass token), then signs
//! in through the sandbox IdP's page as a viewer (refused a revoke) and as an operator (whose
//! revoke is an ADMIN row naming them, read from PostgreSQL). `/metrics` is parsed with a
//! Prometheus text parser before and after, and the expected series must be there and moving.

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use support::*;

/// Upper bound on the whole browser run.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(180);

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn artifacts_dir() -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
        .join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("create target/test-artifacts");
    dir
}

/// Fails loudly (never skips) when the browser tooling is missing.
fn browser_tooling() -> PathBuf {
    let browser_dir = repo_root().join("tests/browser");
    assert!(
        Path::new("/usr/bin/chromium").is_file(),
        "/usr/bin/chromium is missing: run `make setup` (scripts/bootstrap.sh installs Debian's chromium)"
    );
    assert!(
        browser_dir.join("node_modules/playwright-core").is_dir(),
        "tests/browser/node_modules/playwright-core is missing: run `make setup`"
    );
    browser_dir
}

// === /metrics ===

type Series = HashMap<String, f64>;

/// Scrapes `/metrics` and flattens it to `name{k="v",...}` → value (labels sorted; histogram
/// and summary samples as `name_count` / `name_sum`).
async fn scrape(stack: &Stack) -> Series {
    let text = http()
        .get(format!("{}/metrics", stack.aegis_admin_url()))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body");
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("/metrics is valid Prometheus text");
    let mut out = Series::new();
    for s in scrape.samples {
        let mut labels: Vec<(String, String)> = s
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        labels.sort();
        let labels = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{v}\""))
            .collect::<Vec<_>>()
            .join(",");
        let key = |name: &str| format!("{name}{{{labels}}}");
        match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => {
                out.insert(key(&s.metric), v);
            }
            prometheus_parse::Value::Histogram(buckets) => {
                let count = buckets.last().map(|b| b.count).unwrap_or(0.0);
                out.insert(key(&format!("{}_count", s.metric)), count);
            }
            // Its `_count` line is read below.
            prometheus_parse::Value::Summary(_) => {}
        }
    }
    // `_count` lines as written (prometheus-parse folds them into histograms and summaries).
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        if let Some((name, value)) = line.rsplit_once(' ') {
            if name.contains("_count") {
                if let Ok(v) = value.parse::<f64>() {
                    let normalized = normalize(name);
                    out.insert(normalized, v);
                }
            }
        }
    }
    out
}

/// `name{b="2",a="1"}` → `name{a="1",b="2"}`.
fn normalize(series: &str) -> String {
    match series.split_once('{') {
        None => format!("{series}{{}}"),
        Some((name, rest)) => {
            let inner = rest.trim_end_matches('}');
            let mut labels: Vec<&str> = inner.split(',').filter(|s| !s.is_empty()).collect();
            labels.sort();
            format!("{name}{{{}}}", labels.join(","))
        }
    }
}

fn value(m: &Series, series: &str) -> f64 {
    *m.get(series).unwrap_or_else(|| {
        let mut names: Vec<&String> = m.keys().filter(|k| k.starts_with("aegis_")).collect();
        names.sort();
        panic!("/metrics has no series {series}; it has: {names:#?}")
    })
}

fn assert_moved(before: &Series, after: &Series, series: &str) {
    let b = before.get(series).copied().unwrap_or(0.0);
    let a = value(after, series);
    assert!(a > b, "{series} did not move: {b} -> {a}");
}

// === The test ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_console_in_a_real_browser() {
    let browser_dir = browser_tooling();
    let stack = start_with(StackOptions::new(AEGIS_BIN).with_config(|t| {
        if let Some(audit) = t.get_mut("audit").and_then(|a| a.as_table_mut()) {
            audit.insert("checkpoint_interval".into(), "1s".into());
        }
        // IdP sign-in (a public client: PKCE, no secret) with the break-glass token on.
        let admin_listen = t["server"]["admin_listen"].as_str().unwrap().to_string();
        let admin = t["admin"].as_table_mut().unwrap();
        admin.insert("allow_break_glass".into(), true.into());
        let oidc: toml::Table = toml::from_str(&format!(
            "issuer = \"dev\"\nclient_id = \"aegis-console\"\n\
             redirect_uri = \"http://{admin_listen}/console/oidc/callback\"\n\
             roles_claim = \"aegis_roles\"\nviewer_values = [\"aegis-viewers\"]\n\
             operator_values = [\"aegis-operators\"]\nauditor_values = [\"aegis-auditors\"]\n"
        ))
        .unwrap();
        admin.insert("oidc".into(), oidc.into());
    }))
    .await;
    stack.sandbox.register_oidc_client(sandbox::OidcClient {
        client_id: "aegis-console".into(),
        client_secret: None,
        redirect_uris: vec![stack.config()["admin"]["oidc"]["redirect_uri"]
            .as_str()
            .unwrap()
            .to_string()],
    });
    let alice = token(&stack, "alice");
    let bob = token(&stack, "bob");
    let mut joule_req = TokenRequest::new("bob");
    joule_req.agent = "joule".to_string();
    let joule = stack.sandbox.mint_idp_token(&joule_req);

    // Traffic before the browser opens, so the metrics have a baseline and alice a token.
    let first = get(&stack, "/api/2.0/preview/scim/v2/Me", Some(&alice)).await;
    assert_eq!(first.status, 200, "{}", first.text);
    assert_eq!(stack.sandbox.exchange_count("alice@example.com"), 1);
    let before = scrape(&stack).await;

    let screenshot = artifacts_dir().join("console.png");
    let _ = std::fs::remove_file(&screenshot);
    let _ = std::fs::remove_file(artifacts_dir().join("console-viewer.png"));
    let mut child = tokio::process::Command::new("node")
        .arg("console.mjs")
        .current_dir(&browser_dir)
        .env("ADMIN_URL", stack.aegis_admin_url())
        .env("ENVOY_URL", stack.envoy_url())
        .env("CONSOLE_TOKEN", stack.console_token())
        .env("ALICE_TOKEN", &alice)
        .env("BOB_TOKEN", &bob)
        .env("JOULE_TOKEN", &joule)
        .env("SCREENSHOT", &screenshot)
        .env(
            "INSTANCE_ID",
            stack.config()["server"]["instance_id"]
                .as_str()
                .expect("instance_id"),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run node (install it with `make setup`)");
    let stdout = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    let read_all = |mut r: Box<dyn tokio::io::AsyncRead + Unpin + Send>| async move {
        use tokio::io::AsyncReadExt;
        let mut s = String::new();
        let _ = r.read_to_string(&mut s).await;
        s
    };
    let out_task = tokio::spawn(read_all(Box::new(stdout)));
    let err_task = tokio::spawn(read_all(Box::new(stderr)));
    let status = match tokio::time::timeout(BROWSER_TIMEOUT, child.wait()).await {
        Ok(s) => s.expect("wait for node"),
        Err(_) => {
            let _ = child.kill().await;
            panic!("the browser test did not finish within {BROWSER_TIMEOUT:?}");
        }
    };
    let out = out_task.await.unwrap_or_default();
    let err = err_task.await.unwrap_or_default();
    assert!(
        status.success(),
        "the browser test failed ({status}):\n--- stdout\n{out}\n--- stderr\n{err}\n--- aegis log\n{}",
        sandbox::stack::log_tail(&stack.work_dir().join("aegis.log"), 60)
    );
    let result: serde_json::Value = out
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .and_then(|j| serde_json::from_str(j).ok())
        .unwrap_or_else(|| panic!("no RESULT line from the browser test:\n{out}\n{err}"));

    // The screenshots are PNGs, kept as test artifacts (the viewer's: no action forms).
    for shot in [
        screenshot.clone(),
        artifacts_dir().join("console-viewer.png"),
    ] {
        let png = std::fs::read(&shot).expect("the screenshot was saved");
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000);
    }

    // Revoking alice made her next request exchange again: once at the start, once after the
    // revoke, never for the cached request between them.
    assert_eq!(stack.sandbox.exchange_count("alice@example.com"), 2);
    assert!(result["verify_text"]
        .as_str()
        .unwrap_or("")
        .starts_with("intact"));

    // What the browser saw is what the chain holds.
    let rows = audit_rows(&stack).await;
    let by_trace = |t: &serde_json::Value| {
        rows.iter()
            .find(|r| &r["trace_id"] == t)
            .unwrap_or_else(|| panic!("no audit row for {t}: {rows:#?}"))
            .clone()
    };
    let allow = by_trace(&result["allow_trace"]);
    assert_eq!(allow["decision"], "ALLOW");
    assert_eq!(allow["user_name"], "alice@example.com");
    let deny = by_trace(&result["deny_trace"]);
    assert_eq!(deny["reason"], "missing_credentials");
    let blocked = by_trace(&result["blocked_trace"]);
    assert_eq!(blocked["reason"], "agent_not_allowed");
    assert_eq!(blocked["agent"], "joule");
    // The operator's revoke through the IdP sign-in: the row the feed showed names her.
    let trace = result["operator_revoke_trace"]
        .as_str()
        .expect("the ADMIN row's trace id");
    let admin_row = stack
        .postgres
        .query_json(&format!(
            "SELECT decision, method, user_name, issuer, subject, actor_chain FROM aegis_audit \
             WHERE trace_id = '{}'",
            trace.replace('\'', "")
        ))
        .await
        .expect("read the ADMIN row");
    assert_eq!(admin_row.len(), 1, "{admin_row:?}");
    let r = &admin_row[0];
    assert_eq!(r["decision"], "ADMIN");
    assert_eq!(r["method"], "REVOKE");
    assert_eq!(r["user_name"], "bob@example.com");
    assert_eq!(r["issuer"], stack.sandbox.idp_url);
    assert_eq!(r["subject"], "u-alice");
    assert_eq!(r["actor_chain"], "console:alice (operator)");
    assert_eq!(result["viewer_revoke"]["status"], 403);
    // The break-glass actions of the first part are recorded as break-glass.
    let glass = stack
        .postgres
        .query_json(
            "SELECT actor_chain FROM aegis_audit WHERE decision = 'ADMIN' AND method = 'BLOCK'",
        )
        .await
        .expect("read the BLOCK row");
    assert_eq!(glass[0]["actor_chain"], "console:break-glass");
    // The page never showed a token.
    let page_text = result.to_string();
    assert!(!page_text.contains(&alice) && !page_text.contains(stack.console_token()));

    // === /metrics: present and moving ===
    let after = scrape(&stack).await;
    for series in [
        r#"aegis_checks_total{decision="allow",reason=""}"#,
        r#"aegis_checks_total{decision="deny",reason="missing_credentials"}"#,
        r#"aegis_checks_total{decision="deny",reason="agent_not_allowed"}"#,
        "aegis_check_duration_seconds_count{}",
        r#"aegis_token_cache_total{result="hit",tier="l1"}"#,
        r#"aegis_token_cache_total{result="miss",tier="l2"}"#,
        r#"aegis_mints_total{outcome="ok",source="federation"}"#,
        "aegis_audit_append_seconds_count{}",
        "aegis_audit_batch_size_count{}",
        "aegis_audit_chain_size{}",
    ] {
        assert_moved(&before, &after, series);
    }
    for dep in ["redis", "postgres", "idp:dev", "workspace:sandbox"] {
        let series = format!(r#"aegis_dependency_up{{dependency="{dep}"}}"#);
        assert_eq!(value(&after, &series), 1.0, "{series}");
        let latency = format!(r#"aegis_dependency_latency_seconds{{dependency="{dep}"}}"#);
        assert!(value(&after, &latency) > 0.0, "{latency}");
    }
    assert!(value(&after, "aegis_audit_queue_depth{}") >= 0.0);
    // A checkpoint is signed every second here; its age is exported and small.
    eventually(
        Duration::from_secs(10),
        "aegis_checkpoint_age_seconds",
        || async {
            scrape(&stack)
                .await
                .get("aegis_checkpoint_age_seconds{}")
                .is_some_and(|age| (0.0..30.0).contains(age))
        },
    )
    .await;
}
