//! The CLI contracts that need no servers.

mod support;

use support::aegis;

#[test]
fn config_check_reports_every_error_and_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("aegis.toml");
    std::fs::write(
        &path,
        r#"
[server]
grpc_listen = "nowhere"
admin_listen = "127.0.0.1:9192"
[redis]
url = "http://127.0.0.1:6379"
cache_key_file = "missing.key"
[postgres]
url = "postgres://aegis@127.0.0.1:5432/aegis"
[audit]
key_id = "k1"
chain_id = "main"
checkpoint_dir = "cp"
[[issuers]]
name = "corp"
issuer = "http://idp.example.com"
audiences = []
algorithms = ["none"]
username_claim = "email"
agent_claim = "azp"
[[workspaces]]
name = "prod"
url = "https://dbc-123.cloud.databricks.com"
token_source = "federation"
scopes = ["all-apis"]
colour = "blue"
"#,
    )
    .unwrap();
    let (code, out, err) = aegis(&["config", "check", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 64, "{out}{err}");
    for needle in [
        "server.grpc_listen",
        "redis.url",
        "redis.cache_key_file",
        "audit.hmac_key_file: is required",
        "audit.checkpoint_signing_key_file: is required",
        "issuers[0].issuer: plain http is accepted only for loopback hosts",
        "issuers[0].audiences: must not be empty",
        "issuers[0].algorithms: unsupported algorithm \"none\"",
        "workspaces[0].colour: unknown key",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
}

#[test]
fn keys_generate_prints_usable_keys() {
    let (code, out, _) = aegis(&["keys", "generate"]);
    assert_eq!(code, 0);
    let keys: Vec<&str> = out
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split_once('=').unwrap().1.trim())
        .collect();
    assert_eq!(keys.len(), 4);
    for k in &keys {
        assert!(aegis::secret::Key32::from_base64(k).is_ok(), "{k}");
    }
    let mut unique = keys.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 4);
}

#[test]
fn a_good_config_checks_clean() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["audit.key", "cache.key", "checkpoint.key"] {
        std::fs::write(
            dir.path().join(name),
            aegis::secret::Key32::generate().to_base64(),
        )
        .unwrap();
    }
    let path = dir.path().join("aegis.toml");
    std::fs::write(
        &path,
        r#"
[server]
grpc_listen = "unix:/run/aegis/authz.sock"
admin_listen = "127.0.0.1:9192"
[redis]
url = "rediss://redis.internal:6380"
cache_key_file = "cache.key"
[postgres]
url = "postgres://aegis@db.internal:5432/aegis?sslmode=require"
[audit]
hmac_key_file = "audit.key"
key_id = "k1"
chain_id = "main"
checkpoint_signing_key_file = "checkpoint.key"
checkpoint_dir = "cp"
[[issuers]]
name = "corp"
issuer = "https://idp.example.com"
audiences = ["aegis"]
algorithms = ["RS256"]
username_claim = "email"
agent_claim = "azp"
[[workspaces]]
name = "prod"
url = "https://dbc-123.cloud.databricks.com"
token_source = "federation"
scopes = ["all-apis"]
"#,
    )
    .unwrap();
    let (code, out, err) = aegis(&["config", "check", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("ok (1 issuer(s), 1 workspace(s))"));
}
