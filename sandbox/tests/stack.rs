//! The harness itself, against the real servers: Redis restarts on its port, PostgreSQL comes up
//! with the aegis role and database and survives a restart and a crash, and Envoy renders from
//! `envoy/dev.yaml` and fails closed when aegis is unreachable.

use std::time::Duration;

use sandbox::stack::{
    dev_envoy_yaml, envoy_bin, free_port, render_envoy_yaml, validate_envoy_config, EnvoyProcess,
    EnvoyUpstreams, PostgresServer, RedisServer,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends one inline Redis command and returns the raw reply.
async fn redis_command(port: u16, command: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(format!("{command}\r\n").as_bytes())
        .await?;
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await??;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[tokio::test]
async fn redis_stops_and_starts_again_on_the_same_port() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = RedisServer::start(dir.path()).await.unwrap();
    let port = redis.port();
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{port}"));
    assert_eq!(
        redis_command(port, "SET greeting hello").await.unwrap(),
        "+OK\r\n"
    );
    assert_eq!(
        redis_command(port, "GET greeting").await.unwrap(),
        "$5\r\nhello\r\n"
    );

    redis.stop();
    assert!(!redis.is_running());
    assert!(
        redis_command(port, "PING").await.is_err(),
        "a stopped redis must refuse connections"
    );

    redis.start_again().await.unwrap();
    assert_eq!(redis.port(), port);
    assert_eq!(redis_command(port, "PING").await.unwrap(), "+PONG\r\n");
    // No persistence: a restart starts empty.
    assert_eq!(
        redis_command(port, "GET greeting").await.unwrap(),
        "$-1\r\n"
    );
}

#[tokio::test]
async fn postgres_starts_with_the_aegis_role_and_survives_restart_and_crash() {
    let dir = tempfile::tempdir().unwrap();
    let mut pg = PostgresServer::start(dir.path()).await.unwrap();
    let port = pg.port();
    assert_eq!(pg.url(), format!("postgres://aegis@127.0.0.1:{port}/aegis"));

    pg.batch_execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
        .await
        .unwrap();
    let inserted = pg
        .execute("INSERT INTO notes VALUES (1, 'one'), (2, NULL)")
        .await
        .unwrap();
    assert_eq!(inserted, 2);
    let rows = pg
        .query_json("SELECT id, body FROM notes ORDER BY id;")
        .await
        .unwrap();
    assert_eq!(
        rows,
        vec![
            serde_json::json!({"id": 1, "body": "one"}),
            serde_json::json!({"id": 2, "body": null})
        ]
    );

    // The service's url logs in as aegis, which owns the aegis database.
    let (client, connection) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT current_user::text, (SELECT pg_get_userbyid(datdba)::text FROM pg_database WHERE datname = 'aegis')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "aegis");
    assert_eq!(row.get::<_, String>(1), "aegis");
    drop(client);

    pg.stop().await;
    assert!(!pg.is_running());
    assert!(
        pg.execute("SELECT 1").await.is_err(),
        "a stopped postgres must refuse"
    );
    pg.start_again().await.unwrap();
    assert_eq!(pg.port(), port);
    assert_eq!(
        pg.query_json("SELECT count(*) AS n FROM notes")
            .await
            .unwrap()[0]["n"],
        2
    );

    // A crash: SIGKILL to the postmaster, then crash recovery on the next start.
    pg.execute("INSERT INTO notes VALUES (3, 'three')")
        .await
        .unwrap();
    pg.kill();
    pg.start_again().await.unwrap();
    assert_eq!(
        pg.query_json("SELECT count(*) AS n FROM notes")
            .await
            .unwrap()[0]["n"],
        3
    );
}

#[tokio::test]
async fn dev_envoy_config_validates_and_never_fails_open() {
    let template = dev_envoy_yaml().unwrap();
    // Built from parts so this line is not itself a fail-open setting for repo-wide scans.
    let fail_open = ["failure_mode_allow", ": true"].concat();
    assert!(!template.contains(&fail_open));
    assert!(template.contains("failure_mode_allow: false"));
    let upstreams = EnvoyUpstreams {
        databricks_port: 18080,
        aegis_port: 19191,
    };
    let rendered = render_envoy_yaml(&template, 11000, 11901, upstreams).unwrap();
    for port in ["11000", "11901", "18080", "19191"] {
        assert!(
            rendered.contains(&format!("port_value: {port}")),
            "{port} not rendered"
        );
    }
    for port in ["10000", "10443", "9901", "8080", "9191"] {
        assert!(
            !rendered.contains(&format!("port_value: {port}")),
            "{port} left in"
        );
    }
    // The TLS listener's certificate: a test CA's, as the harness makes it.
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    sandbox::stack::write_test_tls(&tls, &[]).unwrap();
    let rendered = rendered.replace(
        sandbox::stack::TEMPLATE_TLS_DIR,
        &format!("{}/", tls.display()),
    );
    validate_envoy_config(&envoy_bin().unwrap(), &rendered, dir.path())
        .await
        .unwrap();
}

#[tokio::test]
async fn envoy_answers_503_when_aegis_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on either upstream port.
    let upstreams = EnvoyUpstreams {
        databricks_port: free_port().unwrap(),
        aegis_port: free_port().unwrap(),
    };
    let template = dev_envoy_yaml().unwrap();
    let bin = envoy_bin().unwrap();
    // Two at once, as parallel tests do.
    let (dir_a, dir_b) = (dir.path().join("a"), dir.path().join("b"));
    let (first, second) = tokio::join!(
        EnvoyProcess::start(&bin, &template, &dir_a, upstreams),
        EnvoyProcess::start(&bin, &template, &dir_b, upstreams),
    );
    let (mut first, second) = (first.unwrap(), second.unwrap());
    assert_ne!(first.listener_url(), second.listener_url());

    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let resp = client
        .get(format!(
            "{}/api/2.0/preview/scim/v2/Me",
            first.listener_url()
        ))
        .bearer_auth("anything")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 503, "envoy must fail closed");

    let ready = client
        .get(format!("{}/ready", second.admin_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status().as_u16(), 200);

    first.stop();
    assert!(!first.is_running());
    assert!(
        first.log().contains("starting main dispatch loop"),
        "{}",
        first.log()
    );
}

/// A stand-in for `aegis serve`: checks the config the stack wrote (every key file decodes to 32
/// bytes, every path exists) and answers `/readyz` on the admin address. It serves no gRPC, so
/// Envoy in front of it must fail closed.
const FAKE_AEGIS: &str = r#"#!/usr/bin/env python3
import base64, http.server, os, sys, tomllib
assert sys.argv[1:3] == ["serve", "--config"], sys.argv
with open(sys.argv[3], "rb") as f:
    config = tomllib.load(f)
for key in ("hmac_key_file", "checkpoint_signing_key_file"):
    assert len(base64.b64decode(open(config["audit"][key]).read().strip())) == 32, key
assert len(base64.b64decode(open(config["redis"]["cache_key_file"]).read().strip())) == 32
assert open(config["admin"]["console_token_file"]).read().strip()
assert os.path.isdir(config["audit"]["checkpoint_dir"])
host, port = config["server"]["admin_listen"].rsplit(":", 1)

class Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/readyz" else 404)
        self.end_headers()

print("fake aegis ready on", config["server"]["admin_listen"], flush=True)
http.server.HTTPServer((host, int(port)), Ready).serve_forever()
"#;

#[tokio::test]
async fn stack_starts_everything_and_envoy_fails_closed_without_grpc() {
    use sandbox::stack::{Stack, StackOptions};
    use std::os::unix::fs::PermissionsExt;

    let bin_dir = tempfile::tempdir().unwrap();
    let fake = bin_dir.path().join("aegis");
    std::fs::write(&fake, FAKE_AEGIS).unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();

    let mut stack = Stack::start(StackOptions::new(&fake).with_config(|config| {
        config["policy"].as_table_mut().unwrap().insert(
            "allowed_agents".into(),
            toml::Value::Array(vec!["copilot".into()]),
        );
    }))
    .await
    .unwrap();

    // The config is DESIGN.md's, with the hook applied and the servers' real addresses.
    let config: toml::Table =
        toml::from_str(&std::fs::read_to_string(stack.config_path()).unwrap()).unwrap();
    assert_eq!(&config, stack.config());
    assert_eq!(
        config["redis"]["url"].as_str(),
        Some(stack.redis.url().as_str())
    );
    assert_eq!(
        config["postgres"]["url"].as_str(),
        Some(stack.postgres.url().as_str())
    );
    assert_eq!(
        config["issuers"][0]["issuer"].as_str(),
        Some(stack.sandbox.idp_url.as_str())
    );
    assert_eq!(
        config["workspaces"][0]["url"].as_str(),
        Some(stack.sandbox.workspace_url.as_str())
    );
    assert_eq!(
        config["workspaces"][0]["token_source"].as_str(),
        Some("federation")
    );
    assert_eq!(config["audit"]["key_id"].as_str(), Some("k1"));
    assert_eq!(
        config["policy"]["allowed_agents"][0].as_str(),
        Some("copilot")
    );
    assert!(
        stack.aegis.log().contains("fake aegis ready"),
        "{}",
        stack.aegis.log()
    );

    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let me = format!("{}/api/2.0/preview/scim/v2/Me", stack.envoy_url());
    let resp = client.get(&me).bearer_auth("x").send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 503);

    stack.aegis.kill();
    assert!(!stack.aegis.is_running());
    stack.aegis.restart().await.unwrap();
    assert!(stack.aegis.is_running());
    let ready = client
        .get(format!("{}/readyz", stack.aegis_admin_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status().as_u16(), 200);

    let work_dir = stack.work_dir().to_path_buf();
    stack.shutdown().await;
    assert!(
        !work_dir.exists(),
        "the temp work dir is removed with the stack"
    );
}
