//! deploy/observability, checked: the alert rules pass `promtool check rules` and their unit
//! tests (`promtool test rules`, from Debian's `prometheus` package, which `make setup`
//! installs; missing promtool is a failure, never a skip); every alert has a firing and a silent
//! case and a runbook hint; the Grafana dashboard queries through its datasource variable with
//! PromQL that promtool parses; and every metric the rules and the dashboard name is one a
//! running aegis really exports on `/metrics`.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/observability");
const RULES: &str = "aegis-alerts.yml";
const RULE_TESTS: &str = "aegis-alerts.test.yml";
const DASHBOARD: &str = "aegis-dashboard.json";
const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

/// The conditions issue 19 asks alerts for, by the alert that covers each.
const REQUIRED_ALERTS: &[&str] = &[
    "AegisFailClosedDenies",
    "AegisAuditCommitFailures",
    "AegisCheckpointStale",
    "AegisAuditVerifyNotIntact",
    "AegisRedisDown",
    "AegisPostgresDown",
    "AegisTokenEndpointErrors",
    "AegisCheckLatencyHigh",
    "AegisCheckpointNotWitnessed",
    "AegisWitnessFailures",
];

/// What the dashboard must show, by the series it reads.
const REQUIRED_DASHBOARD_SERIES: &[&str] = &[
    "aegis_checks_total",
    "aegis_check_duration_seconds_bucket",
    "aegis_dependency_up",
    "aegis_audit_queue_depth",
    "aegis_audit_commit_failures_total",
    "aegis_audit_append_seconds_bucket",
    "aegis_checkpoint_age_seconds",
    "aegis_checkpoint_size",
    "aegis_tlog_size",
    "aegis_checkpoint_witnessed",
    "aegis_token_cache_total",
    "aegis_mints_total",
];

/// Series Prometheus itself makes; everything else a query names must come from aegis.
const PROMETHEUS_OWN: &[&str] = &["up"];

// === tools ===

fn path(name: &str) -> PathBuf {
    Path::new(DIR).join(name)
}

fn read_file(name: &str) -> String {
    std::fs::read_to_string(path(name)).unwrap_or_else(|e| panic!("{}: {e}", path(name).display()))
}

/// promtool on PATH; a loud failure when it is not.
fn promtool() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("promtool"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!("promtool is missing: run `make setup` (scripts/bootstrap.sh installs Debian's prometheus)")
    })
}

/// Runs `cmd` to completion within `limit`: (exit code, stdout, stderr).
fn run(mut cmd: Command, limit: Duration) -> (i32, String, String) {
    let program = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("stdout")));
    let err = drain(Box::new(child.stderr.take().expect("stderr")));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{program} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (
        status.code().unwrap_or(-1),
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    )
}

/// A YAML file as JSON (PyYAML's safe loader, from the repo's .venv).
fn yaml(name: &str) -> Value {
    let mut cmd = Command::new(support::python::python());
    cmd.args([
        "-c",
        "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
    ])
    .arg(path(name));
    let (code, out, err) = run(cmd, TOOL_TIMEOUT);
    assert_eq!(code, 0, "{name} did not parse as YAML: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{name} as JSON: {e}: {out}"))
}

fn str_of<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {v}"))
}

fn array<'a>(v: &'a Value, what: &str) -> &'a Vec<Value> {
    v.as_array()
        .unwrap_or_else(|| panic!("{what} is not a list: {v}"))
}

/// Every alerting rule in the rules file.
fn alert_rules() -> Vec<Value> {
    let doc = yaml(RULES);
    let mut out = Vec::new();
    for group in array(&doc["groups"], "groups") {
        for rule in array(&group["rules"], "rules") {
            assert!(
                rule.get("alert").is_some(),
                "only alerting rules belong in {RULES}: {rule}"
            );
            out.push(rule.clone());
        }
    }
    out
}

/// The panels of the dashboard, with those nested in collapsed rows.
fn dashboard_panels(dash: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    for p in array(&dash["panels"], "panels") {
        if let Some(inner) = p["panels"].as_array() {
            out.extend(inner.iter().cloned());
        }
        out.push(p.clone());
    }
    out
}

/// Every PromQL expression of the dashboard (panel targets and query variables), with Grafana's
/// variables replaced by what Grafana would put there.
fn dashboard_exprs(dash: &Value) -> Vec<(String, String)> {
    let grafana = |e: &str| {
        e.replace("$__rate_interval", "5m")
            .replace("$__range", "1h")
            .replace("$instance", ".*")
    };
    let mut out = Vec::new();
    for p in dashboard_panels(dash) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let title = str_of(&p["title"], "panel title");
            out.push((title.to_string(), grafana(str_of(&t["expr"], title))));
        }
    }
    for v in array(&dash["templating"]["list"], "templating.list") {
        if v["type"] == "query" {
            let q = str_of(&v["query"]["query"], "variable query");
            // label_values(<series selector>, label): the selector is PromQL.
            let selector = q
                .strip_prefix("label_values(")
                .and_then(|r| r.rsplit_once(','))
                .map(|(sel, _)| sel.trim())
                .unwrap_or_else(|| panic!("unexpected variable query {q}"));
            out.push((
                format!("${}", str_of(&v["name"], "name")),
                grafana(selector),
            ));
        }
    }
    out
}

// === PromQL metric names ===

/// Whether `by` or `without` starts at `at` as a whole word (`sum by (job) (...)`), not as the
/// start of a longer identifier.
fn grouping_follows(b: &[u8], at: usize) -> bool {
    ["by", "without"].iter().any(|w| {
        b[at..].starts_with(w.as_bytes())
            && !b
                .get(at + w.len())
                .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_' || *c == b':')
    })
}

/// The series names a PromQL expression selects: identifiers that are not functions,
/// aggregations, keywords, label names (in `{}`, `by (...)`, `on (...)`, ...), strings, numbers
/// or durations.
fn metric_names(expr: &str) -> BTreeSet<String> {
    const GROUPING: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    const KEYWORDS: &[&str] = &["and", "or", "unless", "bool", "offset", "inf", "nan"];
    let b = expr.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    let skip_string = |mut i: usize| {
        let quote = b[i];
        i += 1;
        while i < b.len() && b[i] != quote {
            i += if b[i] == b'\\' { 2 } else { 1 };
        }
        i + 1
    };
    let skip_group = |mut i: usize, close: u8| {
        while i < b.len() && b[i] != close {
            i = match b[i] {
                b'"' | b'\'' | b'`' => skip_string(i),
                _ => i + 1,
            };
        }
        i + 1
    };
    let next_char = |mut i: usize| {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        (i, b.get(i).copied())
    };
    let mut out = BTreeSet::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if matches!(c, b'"' | b'\'' | b'`') {
            i = skip_string(i);
        } else if c == b'{' {
            i = skip_group(i + 1, b'}');
        } else if c == b'[' {
            i = skip_group(i + 1, b']');
        } else if c.is_ascii_digit() || c == b'.' || c == b'$' {
            // Numbers, durations and template variables.
            i += 1;
            while i < b.len() && (ident(b[i]) || b[i] == b'.') {
                i += 1;
            }
        } else if ident(c) {
            let start = i;
            while i < b.len() && ident(b[i]) {
                i += 1;
            }
            let word = &expr[start..i];
            let (at, next) = next_char(i);
            if GROUPING.contains(&word) {
                if next == Some(b'(') {
                    i = skip_group(at + 1, b')');
                }
            } else if KEYWORDS.contains(&word.to_ascii_lowercase().as_str())
                || next == Some(b'(')
                || grouping_follows(b, at)
            {
                // A keyword, or a function or aggregation about to take its grouping or its
                // arguments (`sum by (job) (...)`).
            } else {
                out.insert(word.to_string());
            }
        } else {
            i += 1;
        }
    }
    out
}

#[test]
fn metric_names_finds_series_and_nothing_else() {
    let got = metric_names(
        r#"sum by (job, le) (rate(aegis_a_bucket{x="}{", instance=~"$instance"}[$__rate_interval]))
           / on (job) group_left (le) clamp_min(3 * aegis_b, 60) > bool 0.5e3
           and up{job='aegis'} offset 5m unless histogram_quantile(0.99, aegis_c)"#,
    );
    let want: BTreeSet<String> = ["aegis_a_bucket", "aegis_b", "up", "aegis_c"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(got, want);
}

// === the alert rules ===

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let rules = alert_rules();
    let mut cmd = Command::new(promtool());
    cmd.current_dir(DIR).args(["check", "rules", RULES]);
    let (code, out, err) = run(cmd, TOOL_TIMEOUT);
    assert_eq!(code, 0, "promtool check rules failed:\n{out}\n{err}");
    assert!(
        out.contains(&format!("SUCCESS: {} rules found", rules.len())),
        "promtool check rules: {out}"
    );

    let mut cmd = Command::new(promtool());
    cmd.current_dir(DIR).args(["test", "rules", RULE_TESTS]);
    let (code, out, err) = run(cmd, TOOL_TIMEOUT);
    assert_eq!(code, 0, "promtool test rules failed:\n{out}\n{err}");
    assert!(out.contains("SUCCESS") && !out.contains("FAILED"), "{out}");
}

#[test]
fn every_alert_has_a_runbook_hint_a_firing_case_and_a_silent_case() {
    let rules = alert_rules();
    let names: BTreeSet<&str> = rules.iter().map(|r| str_of(&r["alert"], "alert")).collect();
    assert_eq!(names.len(), rules.len(), "alert names repeat");
    for want in REQUIRED_ALERTS {
        assert!(names.contains(want), "no alert {want} in {RULES}");
    }

    let tests = yaml(RULE_TESTS);
    assert_eq!(
        tests["rule_files"],
        serde_json::json!([RULES]),
        "{RULE_TESTS} must test {RULES}"
    );
    // alertname -> (firing cases' expected alerts, silent cases)
    let mut cases: BTreeMap<String, (Vec<Value>, usize)> = BTreeMap::new();
    for t in array(&tests["tests"], "tests") {
        for case in array(&t["alert_rule_test"], "alert_rule_test") {
            let name = str_of(&case["alertname"], "alertname").to_string();
            let entry = cases.entry(name).or_default();
            match case["exp_alerts"].as_array() {
                Some(exp) if !exp.is_empty() => entry.0.extend(exp.iter().cloned()),
                _ => entry.1 += 1,
            }
        }
    }

    for rule in &rules {
        let name = str_of(&rule["alert"], "alert");
        let severity = str_of(&rule["labels"]["severity"], "severity");
        assert!(
            ["critical", "warning"].contains(&severity),
            "{name}: severity {severity}"
        );
        let summary = str_of(&rule["annotations"]["summary"], "summary");
        let description = str_of(&rule["annotations"]["description"], "description");
        assert!(!summary.is_empty(), "{name}: empty summary");
        assert!(
            description.contains("First check:"),
            "{name}: the description has no runbook hint (\"First check: ...\")"
        );
        let (firing, silent) = cases
            .get(name)
            .unwrap_or_else(|| panic!("{name} has no unit test in {RULE_TESTS}"));
        assert!(!firing.is_empty(), "{name}: no case where it fires");
        assert!(*silent > 0, "{name}: no case where it stays silent");
        for exp in firing {
            assert_eq!(
                exp["exp_labels"]["severity"], severity,
                "{name}: a firing case does not check the severity label"
            );
            for key in ["summary", "description"] {
                assert!(
                    exp["exp_annotations"][key].is_string(),
                    "{name}: a firing case does not check the {key} annotation"
                );
            }
        }
    }
    let unknown: Vec<&String> = cases
        .keys()
        .filter(|n| !names.contains(n.as_str()))
        .collect();
    assert!(
        unknown.is_empty(),
        "tests for alerts that do not exist: {unknown:?}"
    );
}

// === the dashboard ===

#[test]
fn the_dashboard_queries_through_its_datasource_variable_with_valid_promql() {
    let dash: Value = serde_json::from_str(&read_file(DASHBOARD)).expect("the dashboard is JSON");
    assert!(
        dash["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "schemaVersion {} is old",
        dash["schemaVersion"]
    );
    assert!(dash["uid"].is_string() && dash["title"].is_string());
    let vars = array(&dash["templating"]["list"], "templating.list");
    let ds_var = vars
        .iter()
        .find(|v| v["type"] == "datasource" && v["query"] == "prometheus")
        .expect("a Prometheus datasource variable");
    let uid = format!(
        "${{{}}}",
        str_of(&ds_var["name"], "datasource variable name")
    );
    let uses_var = |ds: &Value| ds["type"] == "prometheus" && ds["uid"] == uid.as_str();
    for v in vars.iter().filter(|v| v["type"] == "query") {
        assert!(
            uses_var(&v["datasource"]),
            "variable {}: {}",
            v["name"],
            v["datasource"]
        );
    }

    let mut ids = BTreeSet::new();
    let mut queried = 0;
    for p in dashboard_panels(&dash) {
        let title = str_of(&p["title"], "panel title");
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "{title}: id repeats"
        );
        let (x, w) = (&p["gridPos"]["x"], &p["gridPos"]["w"]);
        let (x, w) = (x.as_u64().expect("x"), w.as_u64().expect("w"));
        assert!(x + w <= 24, "{title}: outside the 24-column grid");
        if p["type"] == "row" {
            continue;
        }
        assert!(
            uses_var(&p["datasource"]),
            "{title}: datasource {}",
            p["datasource"]
        );
        let targets = array(&p["targets"], title);
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            assert!(
                uses_var(&t["datasource"]),
                "{title}: target datasource {}",
                t["datasource"]
            );
            queried += 1;
        }
    }
    assert!(queried >= 20, "only {queried} queries");

    let exprs = dashboard_exprs(&dash);
    let named: BTreeSet<String> = exprs.iter().flat_map(|(_, e)| metric_names(e)).collect();
    for want in REQUIRED_DASHBOARD_SERIES {
        assert!(named.contains(*want), "no panel reads {want}");
    }

    // promtool parses each expression as a recording rule.
    let dir = tempfile::tempdir().expect("tempdir");
    let rules: Vec<Value> = exprs
        .iter()
        .enumerate()
        .map(|(i, (_, e))| serde_json::json!({ "record": format!("dashboard:query_{i}"), "expr": e }))
        .collect();
    let file = dir.path().join("dashboard-queries.json");
    // JSON is YAML: promtool reads it as a rule file.
    std::fs::write(
        &file,
        serde_json::json!({ "groups": [{ "name": "dashboard", "rules": rules }] }).to_string(),
    )
    .expect("write the query rules");
    let mut cmd = Command::new(promtool());
    cmd.args(["check", "rules"]).arg(&file);
    let (code, out, err) = run(cmd, TOOL_TIMEOUT);
    assert_eq!(
        code, 0,
        "a dashboard query is not valid PromQL:\n{out}\n{err}\n{exprs:#?}"
    );
    assert!(
        out.contains(&format!("SUCCESS: {} rules found", exprs.len())),
        "{out}"
    );
}

// === against a running aegis ===

/// Sample names on `/metrics`, and the names `# TYPE` declares a histogram.
async fn exported(stack: &Stack) -> (BTreeSet<String>, BTreeSet<String>) {
    let text = http()
        .get(format!("{}/metrics", stack.aegis_admin_url()))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body");
    let mut samples = BTreeSet::new();
    let mut histograms = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some(name) = rest.strip_suffix(" histogram") {
                histograms.insert(name.to_string());
            }
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            samples.insert(line[..end].to_string());
        }
    }
    (samples, histograms)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_metric_the_rules_and_the_dashboard_name_is_exported_by_aegis() {
    let mut wanted: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for rule in alert_rules() {
        let name = str_of(&rule["alert"], "alert").to_string();
        for m in metric_names(str_of(&rule["expr"], &name)) {
            wanted.entry(m).or_default().insert(format!("alert {name}"));
        }
    }
    let dash: Value = serde_json::from_str(&read_file(DASHBOARD)).expect("the dashboard is JSON");
    for (title, expr) in dashboard_exprs(&dash) {
        for m in metric_names(&expr) {
            wanted
                .entry(m)
                .or_default()
                .insert(format!("panel {title}"));
        }
    }
    assert!(
        wanted.len() >= 20,
        "only {} series named: {:?}",
        wanted.len(),
        wanted.keys()
    );
    for own in PROMETHEUS_OWN {
        wanted.remove(*own);
    }
    let foreign: Vec<&String> = wanted.keys().filter(|m| !m.starts_with("aegis_")).collect();
    assert!(
        foreign.is_empty(),
        "series aegis does not export: {foreign:?}"
    );

    // A witness nobody runs: its failures counter exists (and counts), and the checkpoint is
    // not witnessed.
    let closed = free_port().expect("a free port");
    let stack = start_with(StackOptions::new(AEGIS_BIN).with_config(move |c| {
        let audit = c["audit"].as_table_mut().expect("audit table");
        let mut w = toml::Table::new();
        w.insert("url".into(), format!("http://127.0.0.1:{closed}").into());
        w.insert(
            "vkey".into(),
            // The C2SP example public key, as a cosignature (0x04) key of this name.
            "witness.example.org+458bd513+BOkyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k".into(),
        );
        audit.insert(
            "witnesses".into(),
            toml::Value::Array(vec![toml::Value::Table(w)]),
        );
    }))
    .await;

    // Allows (a mint, then cache hits), a deny, and a console verify.
    let alice = token(&stack, "alice");
    for _ in 0..3 {
        let r = get(&stack, "/api/2.0/preview/scim/v2/Me", Some(&alice)).await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    let r = get(&stack, "/api/2.0/preview/scim/v2/Me", None).await;
    assert_eq!(r.status, 401, "{r:?}");
    console_verify(&stack).await;

    // Checkpoint age and the witness outcome come with the first checkpoint (10s interval).
    let deadline = Instant::now() + Duration::from_secs(60);
    let missing = loop {
        let (samples, histograms) = exported(&stack).await;
        let missing = wanted
            .iter()
            .filter(|(m, _)| !samples.contains(*m))
            .map(|(m, by)| format!("{m} (read by {by:?})"))
            .collect::<Vec<_>>();
        if missing.is_empty() {
            for m in wanted.keys() {
                if let Some(base) = m
                    .strip_suffix("_bucket")
                    .or_else(|| m.strip_suffix("_sum"))
                    .or_else(|| m.strip_suffix("_count"))
                    .filter(|b| histograms.contains(*b))
                {
                    assert!(samples.contains(&format!("{base}_bucket")), "{base}");
                } else {
                    assert!(
                        !m.ends_with("_bucket"),
                        "{m}: a _bucket series of something that is not a histogram"
                    );
                }
            }
        }
        if missing.is_empty() || Instant::now() >= deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        missing.is_empty(),
        "series the rules or the dashboard read that aegis does not export:\n{}",
        missing.join("\n")
    );
    stack.shutdown().await;
}

/// Signs in to the console and verifies the chain, which must be intact.
async fn console_verify(stack: &Stack) {
    let console = console_sign_in(stack).await;
    let r = console
        .act("/console/api/verify", serde_json::Value::Null)
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["intact"], true, "{r:?}");
}
