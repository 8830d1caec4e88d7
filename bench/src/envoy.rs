//! The Envoy side of the benchmark: one real Envoy (concurrency 2) with one listener per variant,
//! and `wrk` against each. Every variant is the same HTTP connection manager with no access log;
//! only the auth filter and the route differ.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::process::{Child, Command};

/// A listener variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    None,
    /// Envoy's native in-process JWT validation against the IdP's JWKS (inlined).
    JwtAuthn,
    /// ext_authz to the named cluster (`floor` or `aegis`; not `null`, which YAML reads as no name).
    ExtAuthz(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `direct_response` 200: no upstream cost.
    Direct,
    /// The sandbox Databricks workspace.
    Sandbox,
}

pub struct Listener {
    pub name: &'static str,
    pub port: u16,
    pub auth: Auth,
    pub route: Route,
}

/// Upstream ports the clusters point at.
pub struct Upstreams {
    pub null_port: u16,
    /// The durable floor (`null-authz` with an audit chain).
    pub durable_port: u16,
    pub aegis_port: u16,
    pub sandbox_port: u16,
    pub issuer: String,
    pub jwks_json: String,
}

fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

/// The Envoy config for `listeners`.
pub fn config(listeners: &[Listener], up: &Upstreams) -> String {
    let mut out = String::from("static_resources:\n  listeners:\n");
    for l in listeners {
        let route = match l.route {
            Route::Direct => {
                "direct_response: { status: 200, body: { inline_string: \"ok\\n\" } }".to_string()
            }
            Route::Sandbox => "route: { cluster: sandbox, timeout: 10s }".to_string(),
        };
        let per_route = match l.auth {
            Auth::ExtAuthz("aegis") => {
                concat!(
                    "\n                          typed_per_filter_config:",
                    "\n                            envoy.filters.http.ext_authz:",
                    "\n                              \"@type\": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
                    "\n                              check_settings: { context_extensions: { workspace: sandbox } }",
                )
            }
            _ => "",
        };
        let filter = match l.auth {
            Auth::None => String::new(),
            Auth::JwtAuthn => format!(
                r#"                - name: envoy.filters.http.jwt_authn
                  typed_config:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication
                    providers:
                      idp:
                        issuer: {issuer}
                        audiences: [aegis]
                        forward: true
                        local_jwks: {{ inline_string: {jwks} }}
                    rules:
                      - match: {{ prefix: "/" }}
                        requires: {{ provider_name: idp }}
"#,
                issuer = yaml_str(&up.issuer),
                jwks = yaml_str(&up.jwks_json),
            ),
            Auth::ExtAuthz(cluster) => format!(
                r#"                - name: envoy.filters.http.ext_authz
                  typed_config:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
                    transport_api_version: V3
                    failure_mode_allow: false
                    status_on_error: {{ code: ServiceUnavailable }}
                    grpc_service: {{ envoy_grpc: {{ cluster_name: {cluster} }}, timeout: 2s }}
"#
            ),
        };
        out.push_str(&format!(
            r#"    - name: {name}
      address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: {name}
                codec_type: AUTO
                route_config:
                  virtual_hosts:
                    - name: all
                      domains: ["*"]
                      routes:
                        - match: {{ prefix: "/" }}
                          {route}{per_route}
                http_filters:
{filter}                - name: envoy.filters.http.router
                  typed_config:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#,
            name = l.name,
            port = l.port,
        ));
    }
    let grpc_cluster = |name: &str, port: u16| {
        format!(
            r#"    - name: {name}
      type: STATIC
      connect_timeout: 1s
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config: {{ http2_protocol_options: {{}} }}
      load_assignment:
        cluster_name: {name}
        endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }} }} ] }} ]
"#
        )
    };
    out.push_str("  clusters:\n");
    out.push_str(&grpc_cluster("floor", up.null_port));
    out.push_str(&grpc_cluster("durable", up.durable_port));
    out.push_str(&grpc_cluster("aegis", up.aegis_port));
    out.push_str(&format!(
        r#"    - name: sandbox
      type: STATIC
      connect_timeout: 1s
      load_assignment:
        cluster_name: sandbox
        endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }} }} ] }} ]
"#,
        port = up.sandbox_port
    ));
    out
}

/// A running benchmark Envoy; killed on drop.
pub struct BenchEnvoy {
    child: Child,
    pub admin: String,
}

impl BenchEnvoy {
    pub async fn start(bin: &Path, yaml: &str, dir: &Path) -> Result<BenchEnvoy, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let config = dir.join("bench-envoy.yaml");
        std::fs::write(&config, yaml).map_err(|e| format!("writing envoy config: {e}"))?;
        let admin_file = dir.join("bench-envoy.admin");
        let _ = std::fs::remove_file(&admin_file);
        let full = format!(
            "admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }} }}\n{yaml}"
        );
        std::fs::write(&config, full).map_err(|e| format!("writing envoy config: {e}"))?;
        let log = std::fs::File::create(dir.join("bench-envoy.log"))
            .map_err(|e| format!("creating the envoy log: {e}"))?;
        let child = Command::new(bin)
            .arg("-c")
            .arg(&config)
            .args(["--concurrency", "2"])
            .arg("--disable-hot-restart")
            .args([
                "--base-id",
                &(40_000 + std::process::id() % 10_000).to_string(),
            ])
            .arg("--admin-address-path")
            .arg(&admin_file)
            .args(["--log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting envoy: {e}"))?;
        let mut envoy = BenchEnvoy {
            child,
            admin: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = reqwest::Client::new();
        loop {
            if let Ok(Some(status)) = envoy.child.try_wait() {
                let log = std::fs::read_to_string(dir.join("bench-envoy.log")).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                let head = lines[lines.len().saturating_sub(4)..].join("\n");
                return Err(format!("envoy exited ({status}): {head}"));
            }
            let text = std::fs::read_to_string(&admin_file).unwrap_or_default();
            if !text.trim().is_empty() {
                envoy.admin = text.trim().to_string();
                let ready = client
                    .get(format!("http://{}/ready", envoy.admin))
                    .send()
                    .await;
                if ready.is_ok_and(|r| r.status().is_success()) {
                    return Ok(envoy);
                }
            }
            if Instant::now() > deadline {
                return Err("envoy not ready within 30s".into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// What one wrk run measured.
#[derive(Debug, Clone, Serialize)]
pub struct WrkResult {
    pub listener: String,
    pub requests_per_s: f64,
    pub requests: u64,
    pub non_2xx: u64,
    pub socket_errors: String,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
}

/// Runs `wrk -t2` with `conns` connections for `secs` against `url`. Each request carries the next
/// of `bearers` as its `authorization` header, round-robin (several: through a Lua script written
/// to `script_dir` that pre-formats one request per token); none when `bearers` is empty. The
/// tokens go to wrk only, never to the output.
pub async fn wrk(
    name: &str,
    url: &str,
    bearers: &[String],
    script_dir: &Path,
    conns: u32,
    secs: u32,
) -> Result<WrkResult, String> {
    let mut cmd = Command::new("wrk");
    cmd.args([
        "-t2",
        &format!("-c{conns}"),
        &format!("-d{secs}s"),
        "--latency",
    ])
    .args(["--timeout", "5s"])
    .args([
        "-H",
        "user-agent: copilot-agent/1.4.2 (databricks-sdk-py/0.40.0)",
    ])
    .kill_on_drop(true);
    match bearers {
        [] => {}
        [one] => {
            cmd.args(["-H", &format!("authorization: {one}")]);
        }
        many => {
            let script = script_dir.join(format!("wrk-{name}.lua"));
            std::fs::write(&script, rotation_script(many)?)
                .map_err(|e| format!("writing {}: {e}", script.display()))?;
            cmd.arg("-s").arg(&script);
        }
    }
    cmd.arg(url);
    let out = tokio::time::timeout(Duration::from_secs(secs as u64 + 30), cmd.output())
        .await
        .map_err(|_| "wrk did not finish".to_string())?
        .map_err(|e| format!("running wrk: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // Only wrk's report is shown: its stderr could echo the script, which holds the tokens.
    parse_wrk(name, &text).ok_or_else(|| format!("unparsable wrk output: {text}"))
}

/// A wrk script whose requests take `bearers` in turn: each thread formats one request per token
/// in `init` (with the command line's headers), so sending one costs a table lookup.
fn rotation_script(bearers: &[String]) -> Result<String, String> {
    let mut lua = String::from("local tokens = {\n");
    for b in bearers {
        if !b
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_. +/=".contains(&c))
        {
            return Err("a bearer for wrk has a character a Lua string cannot take as is".into());
        }
        lua.push_str(&format!("  \"{b}\",\n"));
    }
    lua.push_str(concat!(
        "}\n",
        "local reqs = {}\n",
        "local n = 0\n",
        "init = function(args)\n",
        "  for i, t in ipairs(tokens) do\n",
        "    local h = {}\n",
        "    for k, v in pairs(wrk.headers) do h[k] = v end\n",
        "    h[\"authorization\"] = t\n",
        "    reqs[i] = wrk.format(nil, nil, h)\n",
        "  end\n",
        "end\n",
        "request = function()\n",
        "  n = n + 1\n",
        "  return reqs[(n % #reqs) + 1]\n",
        "end\n",
    ));
    Ok(lua)
}

fn parse_duration_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, mul) = if let Some(v) = s.strip_suffix("us") {
        (v, 0.001)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix("m") {
        (v, 60_000.0)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1000.0)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|n| n * mul)
}

fn parse_wrk(name: &str, text: &str) -> Option<WrkResult> {
    let mut r = WrkResult {
        listener: name.to_string(),
        requests_per_s: 0.0,
        requests: 0,
        non_2xx: 0,
        socket_errors: String::new(),
        p50_ms: 0.0,
        p90_ms: 0.0,
        p99_ms: 0.0,
    };
    let mut seen_rps = false;
    for line in text.lines() {
        let t = line.trim();
        let mut words = t.split_whitespace();
        match (words.next(), words.next()) {
            (Some("50%"), Some(v)) => r.p50_ms = parse_duration_ms(v)?,
            (Some("90%"), Some(v)) => r.p90_ms = parse_duration_ms(v)?,
            (Some("99%"), Some(v)) => r.p99_ms = parse_duration_ms(v)?,
            (Some("Requests/sec:"), Some(v)) => {
                r.requests_per_s = v.parse().ok()?;
                seen_rps = true;
            }
            (Some(n), Some("requests")) => r.requests = n.parse().ok()?,
            (Some("Non-2xx"), _) => {
                r.non_2xx = t
                    .rsplit(' ')
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            }
            (Some("Socket"), Some("errors:")) => r.socket_errors = t.to_string(),
            _ => {}
        }
    }
    seen_rps.then_some(r)
}

/// The resident set size of a process, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Where the bench binaries live: next to the running one.
pub fn sibling_bin(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_script_lists_every_bearer_once_and_refuses_what_would_break_it() {
        let bearers = vec![
            "Bearer aaa.bbb.c-_".to_string(),
            "Bearer ddd.eee.fff".to_string(),
        ];
        let lua = rotation_script(&bearers).expect("script");
        for b in &bearers {
            assert_eq!(lua.matches(&format!("\"{b}\"")).count(), 1, "{lua}");
        }
        assert!(lua.contains("request = function()"));
        for bad in ["Bearer a\"b", "Bearer a\\b", "Bearer a\nb"] {
            assert!(rotation_script(&[bad.to_string()]).is_err(), "{bad:?}");
        }
    }
}
