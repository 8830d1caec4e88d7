//! Every config error's path and text, pinned: each case of `config_messages.txt` changes one
//! key of a config that reads clean (removes it, gives it a value of another type, an empty or
//! unexpandable string, or gives its table an unknown key) and lists every error that must be
//! reported, no more. The cases were taken from the hand-written reader the serde one replaced,
//! so operators keep the messages they know.
//!
//! A new key gets its cases as `<path> <kind>` lines (kinds: deleted, int, str, empty, nope,
//! arr, table, unknown) once the base config below has it; `AEGIS_BLESS=1 cargo test --test
//! config_messages` then writes what the reader reports under each case, for review in the diff.

use std::collections::HashMap;
use std::path::Path;

use aegis::config::Config;
use aegis::secret::Key32;
use toml::{Table, Value};

const VKEY: &str = "witness.example.org+458bd513+BOkyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k";

/// Every section and key, each with a valid value.
fn base() -> String {
    format!(
        r#"
[server]
grpc_listen = "0.0.0.0:9191"
admin_listen = "127.0.0.1:9192"
public_listen = "127.0.0.1:9193"
public_url = "https://aegis.example.com"
instance_id = "pod-a"
check_timeout = "2s"
worker_threads = 2
grpc_tls_cert_file = "tls.crt"
grpc_tls_key_file = "tls.key"
grpc_client_ca_file = "ca.crt"

[admin]
console_token_file = "console.token"
allow_break_glass = true
[admin.oidc]
issuer = "corp"
client_id = "aegis-console"
client_secret_file = "console.secret"
redirect_uri = "https://aegis-admin.example.com/console/oidc/callback"
scopes = ["openid", "email"]
roles_claim = "groups"
viewer_values = ["viewers"]
operator_values = ["operators"]
auditor_values = ["auditors"]

[redis]
url = "rediss://127.0.0.1:6379"
ca_file = "ca.crt"
cache_key_file = "cache.key"

[postgres]
url = "postgres://aegis@127.0.0.1:5432/aegis"
migrate_url = "postgres://owner@127.0.0.1:5432/aegis"
migrate_on_start = false
min_synchronous_commit = "remote_apply"

[audit]
hmac_key_file = "audit.key"
key_id = "k2"
chain_id = "main"
checkpoint_signing_key_file = "checkpoint.key"
checkpoint_dir = "checkpoints"
checkpoint_interval = "10s"
max_clock_skew = "1s"
tlog_origin = "aegis.test/main"
tlog_listen = "127.0.0.1:9194"
witness_quorum = 1
witness_timeout = "2s"
record_statement_text = true
[audit.previous_keys]
k1 = "old.key"
[[audit.witnesses]]
url = "https://witness.example.org/"
vkey = "{VKEY}"

[[issuers]]
name = "corp"
issuer = "https://idp.example.com"
audiences = ["aegis"]
jwks_uri = "https://idp.example.com/jwks"
algorithms = ["RS256", "ES256"]
username_claim = "email"
agent_claim = "azp"
leeway = "10s"
max_key_age = "1h"

[[issuers]]
name = "other"
issuer = "http://127.0.0.1:8443"
audiences = ["aegis", "x"]
algorithms = ["EdDSA"]
username_claim = "upn"
agent_claim = "appid"

[[workspaces]]
name = "prod"
url = "https://dbc-123.cloud.databricks.com"
hosts = ["DBC-123.cloud.databricks.com"]
token_source = "federation"
scopes = ["all-apis"]
allowed_agents = ["a1"]
issuers = ["corp"]
rate_limits = {{ user = "600/min", agent = "10/s", user_agent = "5/h" }}

[[workspaces]]
name = "u2m"
url = "https://dbc-456.cloud.databricks.com"
token_source = "u2m"
client_id = "app"
scopes = ["sql"]

[[workspaces]]
name = "obo"
url = "https://dbc-789.cloud.databricks.com"
token_source = "entra_obo"
client_id = "app2"
scopes = ["sql"]
tenant_id = "contoso.onmicrosoft.com"
entra_token_url = "https://login.example.com/token"
client_secret_file = "entra.secret"

[policy]
allowed_agents = ["a1", "a2"]
deny = [ {{ methods = ["post"], path = "/api/2.0/token/*", agents = ["a1"], workspaces = ["prod"] }} ]
allow = [ {{ path = "/api/2.0/sql/statements" }} ]
allow_statements = [ {{ agents = ["dba"], workspaces = ["prod"] }} ]
allow_commands = [ {{ agents = ["nb"] }} ]
tool_deny = [ {{ server = "/api/2.0/mcp/sql", tools = ["execute_sql"], agents = ["a2"], workspaces = ["u2m"] }} ]
tool_allow = [ {{ server = "/api/2.0/mcp/*" }} ]

[tracing]
otlp_endpoint = "http://127.0.0.1:4317"
protocol = "http"
sample_ratio = 0.5
service_name = "aegis-test"
"#
    )
}

fn fixture(dir: &Path) {
    for name in ["audit.key", "cache.key", "checkpoint.key", "old.key"] {
        std::fs::write(dir.join(name), Key32::generate().to_base64()).unwrap();
    }
    let pem = |label: &str| format!("-----BEGIN {label}-----\nAA==\n-----END {label}-----\n");
    std::fs::write(dir.join("console.token"), "0123456789abcdef0123").unwrap();
    std::fs::write(dir.join("entra.secret"), "s3cret\n").unwrap();
    std::fs::write(dir.join("console.secret"), "console-s3cret\n").unwrap();
    std::fs::write(dir.join("tls.crt"), pem("CERTIFICATE")).unwrap();
    std::fs::write(dir.join("ca.crt"), pem("CERTIFICATE")).unwrap();
    std::fs::write(dir.join("tls.key"), pem("PRIVATE KEY")).unwrap();
}

/// The value at `path` (`audit.witnesses[0].url`) and the table or array holding it.
fn parent<'a>(doc: &'a mut Value, path: &str) -> (&'a mut Value, String) {
    let mut segs: Vec<String> = Vec::new();
    for part in path.split('.') {
        let mut rest = part;
        if let Some(i) = rest.find('[') {
            segs.push(rest[..i].to_string());
            rest = &rest[i..];
            while let Some(end) = rest.find(']') {
                segs.push(rest[..=end].to_string());
                rest = &rest[end + 1..];
            }
        } else {
            segs.push(rest.to_string());
        }
    }
    let last = segs.pop().unwrap();
    let mut cur = doc;
    for s in segs {
        cur = match s.strip_prefix('[') {
            Some(i) => {
                &mut cur.as_array_mut().unwrap()[i.trim_end_matches(']').parse::<usize>().unwrap()]
            }
            None => cur.get_mut(&s).unwrap(),
        };
    }
    (cur, last)
}

fn mutate(doc: &mut Value, path: &str, kind: &str) {
    let (holder, last) = parent(doc, path);
    let slot = match last.strip_prefix('[') {
        Some(i) => {
            &mut holder.as_array_mut().unwrap()[i.trim_end_matches(']').parse::<usize>().unwrap()]
        }
        None => holder.get_mut(&last).unwrap(),
    };
    let new = match kind {
        "int" => Value::Integer(5),
        "str" => Value::String("x".into()),
        "empty" => Value::String(" ".into()),
        "nope" => Value::String("${NOPE}".into()),
        "arr" => Value::Array(vec![]),
        "table" => Value::Table(Table::new()),
        "unknown" => {
            let t = slot.as_table_mut().expect("unknown: a table");
            t.insert("colour".into(), Value::String("blue".into()));
            return;
        }
        "deleted" => {
            match last.strip_prefix('[') {
                Some(i) => {
                    let i: usize = i.trim_end_matches(']').parse().unwrap();
                    holder.as_array_mut().unwrap().remove(i);
                }
                None => {
                    holder.as_table_mut().unwrap().remove(&last);
                }
            }
            return;
        }
        other => panic!("unknown kind {other}"),
    };
    *slot = new;
}

#[test]
fn every_config_error_keeps_its_path_and_text() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    let env: HashMap<String, String> = HashMap::new();
    let doc = Value::Table(toml::from_str::<Table>(&base()).unwrap());
    // Positive control: the unchanged config reads clean.
    let text = toml::to_string(&doc).unwrap();
    if let Err(e) = Config::parse(&text, dir.path(), &env) {
        panic!("the base config does not read clean:\n{e}");
    }

    let cases = include_str!("config_messages.txt");
    let mut lines = cases.lines().peekable();
    let (mut n, mut failed, mut blessed) = (0, Vec::new(), String::new());
    while let Some(head) = lines.next() {
        let (path, kind) = head.rsplit_once(' ').expect("case: <path> <kind>");
        let mut want: Vec<String> = Vec::new();
        while let Some(l) = lines.next_if(|l| l.starts_with("  ")) {
            want.push(l[2..].to_string());
        }
        want.sort();
        let mut d = doc.clone();
        mutate(&mut d, path, kind);
        let text = toml::to_string(&d).unwrap();
        let mut got: Vec<String> = match Config::parse(&text, dir.path(), &env) {
            Ok(_) => vec!["(reads clean)".to_string()],
            Err(errs) => errs.0.iter().map(|e| e.to_string()).collect(),
        };
        let dir_text = dir.path().display().to_string();
        got = got
            .into_iter()
            .map(|l| l.replace(&dir_text, "<dir>"))
            .collect();
        got.sort();
        n += 1;
        blessed.push_str(&format!("{head}\n"));
        for l in &got {
            blessed.push_str(&format!("  {l}\n"));
        }
        if got != want {
            failed.push(format!("{head}\n  want: {want:#?}\n  got: {got:#?}"));
        }
    }
    if std::env::var_os("AEGIS_BLESS").is_some() {
        let file = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/config_messages.txt");
        std::fs::write(file, blessed).unwrap();
        return;
    }
    assert!(n > 200, "only {n} cases");
    assert!(
        failed.is_empty(),
        "{} of {n} cases differ:\n{}",
        failed.len(),
        failed.join("\n")
    );
}
