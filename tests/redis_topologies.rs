//! Production Redis is rarely one plaintext node: TLS with a private CA and ACL users, and a
//! real 3-node Redis Cluster behind a whole stack (commands, the mint lock's Lua script and
//! revocations over pub/sub). And the whole stack with Redis and PostgreSQL both on TLS, set
//! up from the config file alone, through Envoy.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aegis::config::{RedisConfig, RedisTopology};
use aegis::redis::RedisLink;
use aegis::secret::Key32;
use sandbox::stack::free_port;
use support::*;

/// A redis-server child killed on drop.
struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn redis_server(conf: &Path, log: &Path) -> Node {
    let log = std::fs::File::create(log).unwrap();
    let child = Command::new(sandbox::stack::redis_bin().expect("redis-server (make setup)"))
        .arg(conf)
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("redis-server starts");
    Node(child)
}

fn redis_cli(args: &[&str]) -> String {
    let bin = sandbox::stack::redis_bin()
        .unwrap()
        .with_file_name("redis-cli");
    let out = Command::new(bin)
        .args(args)
        .output()
        .expect("redis-cli runs");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

async fn wait_until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn self_signed_ca() -> (rcgen::Issuer<'static, rcgen::KeyPair>, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "aegis redis test CA");
    let cert = params.self_signed(&key).unwrap();
    (rcgen::Issuer::new(params, key), cert.pem())
}

async fn healthy_within(link: &std::sync::Arc<RedisLink>, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if link.healthy() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca_and_an_acl_user() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, ca_pem) = self_signed_ca();
    let server_key = rcgen::KeyPair::generate().unwrap();
    let server = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&server_key, &ca)
        .unwrap();
    let d = dir.path();
    std::fs::write(d.join("ca.pem"), &ca_pem).unwrap();
    std::fs::write(d.join("server.pem"), server.pem()).unwrap();
    std::fs::write(d.join("server.key"), server_key.serialize_pem()).unwrap();
    let port = free_port().unwrap();
    std::fs::write(
        d.join("redis.conf"),
        format!(
            "bind 127.0.0.1\nport 0\ntls-port {port}\ntls-cert-file {d}/server.pem\n\
             tls-key-file {d}/server.key\ntls-ca-cert-file {d}/ca.pem\ntls-auth-clients no\n\
             save \"\"\nappendonly no\nuser aegis on >s3cret-pw ~aegis:* &aegis:* +@all\n\
             user default off\n",
            d = d.display()
        ),
    )
    .unwrap();
    let _node = redis_server(&d.join("redis.conf"), &d.join("redis.log"));

    let cfg = |url: String, ca: Option<Vec<u8>>| RedisConfig {
        topology: RedisTopology::Standalone(url),
        ca_pem: ca,
        cache_key: Key32::generate(),
    };
    let good = RedisLink::from_config(&cfg(
        format!("rediss://aegis:s3cret-pw@127.0.0.1:{port}"),
        Some(ca_pem.clone().into_bytes()),
    ))
    .unwrap();
    tokio::spawn(good.clone().monitor());
    assert!(
        healthy_within(&good, Duration::from_secs(10)).await,
        "never healthy over TLS with the right CA and user"
    );
    good.set_px("aegis:v1:probe", b"x", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(
        good.get("aegis:v1:probe").await.unwrap().as_deref(),
        Some(&b"x"[..])
    );
    let mut events = good.events();
    good.publish("hello").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(2), events.recv())
        .await
        .expect("event arrives")
        .unwrap();
    assert_eq!(got, "hello");

    // A wrong password, no CA (the server's CA is private) and plaintext all stay unhealthy:
    // every Check would be denied.
    for (what, url, ca) in [
        (
            "wrong password",
            format!("rediss://aegis:nope@127.0.0.1:{port}"),
            Some(ca_pem.clone().into_bytes()),
        ),
        (
            "unknown CA",
            format!("rediss://aegis:s3cret-pw@127.0.0.1:{port}"),
            None,
        ),
        (
            "plaintext",
            format!("redis://aegis:s3cret-pw@127.0.0.1:{port}"),
            None,
        ),
    ] {
        let bad = RedisLink::from_config(&cfg(url, ca)).unwrap();
        let monitor = tokio::spawn(bad.clone().monitor());
        assert!(
            !healthy_within(&bad, Duration::from_secs(2)).await,
            "{what}: the link became healthy"
        );
        monitor.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_cluster_behind_the_whole_stack() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = Vec::new();
    let mut addrs = Vec::new();
    for i in 0..3 {
        let port = free_port().unwrap();
        let nd = dir.path().join(format!("node{i}"));
        std::fs::create_dir_all(&nd).unwrap();
        std::fs::write(
            nd.join("redis.conf"),
            format!(
                "bind 127.0.0.1\nport {port}\ncluster-enabled yes\ncluster-config-file nodes.conf\n\
                 cluster-node-timeout 2000\ndir {}\nsave \"\"\nappendonly no\n",
                nd.display()
            ),
        )
        .unwrap();
        nodes.push(redis_server(&nd.join("redis.conf"), &nd.join("redis.log")));
        addrs.push(format!("127.0.0.1:{port}"));
    }
    for a in &addrs {
        let port = a.rsplit(':').next().unwrap().to_string();
        wait_until(Duration::from_secs(10), "a cluster node", || {
            redis_cli(&["-p", &port, "ping"]).contains("PONG")
        })
        .await;
    }
    let mut create = vec!["--cluster", "create"];
    create.extend(addrs.iter().map(String::as_str));
    create.extend(["--cluster-replicas", "0", "--cluster-yes"]);
    let out = redis_cli(&create);
    assert!(out.contains("All 16384 slots covered"), "{out}");
    let first_port = addrs[0].rsplit(':').next().unwrap().to_string();
    wait_until(Duration::from_secs(20), "cluster_state:ok", || {
        redis_cli(&["-p", &first_port, "cluster", "info"]).contains("cluster_state:ok")
    })
    .await;

    let cluster_urls: Vec<toml::Value> = addrs
        .iter()
        .map(|a| toml::Value::String(format!("redis://{a}")))
        .collect();
    let stack = start_with(StackOptions::new(AEGIS_BIN).with_config(move |cfg| {
        let redis = cfg
            .get_mut("redis")
            .and_then(|v| v.as_table_mut())
            .expect("redis table");
        redis.remove("url");
        redis.insert("cluster_nodes".into(), toml::Value::Array(cluster_urls));
    }))
    .await;

    let alice = token(&stack, "alice");
    for _ in 0..3 {
        let r = get(&stack, "/api/2.0/preview/scim/v2/Me", Some(&alice)).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    assert_eq!(stack.sandbox.exchange_count("alice@example.com"), 1);
    // The token is sealed in the cluster, never in clear.
    let keys: String = addrs
        .iter()
        .map(|a| {
            let port = a.rsplit(':').next().unwrap();
            redis_cli(&["-p", port, "--scan", "--pattern", "aegis:v2:*:tok:*"])
        })
        .collect();
    // Keyed by the principal, in the user name's hash slot.
    assert!(
        keys.starts_with("aegis:v2:{") && keys.contains("}:tok:"),
        "{keys}"
    );

    // A revocation published on the cluster reaches aegis' subscription.
    let (code, out, err) = revoke(&stack, "alice@example.com", &[]);
    assert_eq!(code, 0, "{out}{err}");
    eventually(
        Duration::from_secs(2),
        "alice to need a fresh token",
        || async {
            assert_eq!(
                get(&stack, "/api/2.0/preview/scim/v2/Me", Some(&alice))
                    .await
                    .status,
                200
            );
            stack.sandbox.exchange_count("alice@example.com") == 2
        },
    )
    .await;
    drop(nodes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_managed_primary() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let primary_port = free_port().unwrap();
    let sentinel_port = free_port().unwrap();
    std::fs::write(
        d.join("primary.conf"),
        format!("bind 127.0.0.1\nport {primary_port}\nsave \"\"\nappendonly no\n"),
    )
    .unwrap();
    std::fs::write(
        d.join("sentinel.conf"),
        format!(
            "bind 127.0.0.1\nport {sentinel_port}\ndir {}\n\
             sentinel monitor aegis-primary 127.0.0.1 {primary_port} 1\n\
             sentinel down-after-milliseconds aegis-primary 2000\n",
            d.display()
        ),
    )
    .unwrap();
    let _primary = redis_server(&d.join("primary.conf"), &d.join("primary.log"));
    wait_until(Duration::from_secs(10), "the primary", || {
        redis_cli(&["-p", &primary_port.to_string(), "ping"]).contains("PONG")
    })
    .await;
    let log = std::fs::File::create(d.join("sentinel.log")).unwrap();
    let _sentinel = Node(
        Command::new(sandbox::stack::redis_bin().unwrap())
            .arg(d.join("sentinel.conf"))
            .arg("--sentinel")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("sentinel starts"),
    );
    wait_until(
        Duration::from_secs(10),
        "the sentinel to know the primary",
        || {
            redis_cli(&[
                "-p",
                &sentinel_port.to_string(),
                "sentinel",
                "get-master-addr-by-name",
                "aegis-primary",
            ])
            .contains(&primary_port.to_string())
        },
    )
    .await;

    let stack = start_with(StackOptions::new(AEGIS_BIN).with_config(move |cfg| {
        let redis = cfg
            .get_mut("redis")
            .and_then(|v| v.as_table_mut())
            .expect("redis table");
        redis.remove("url");
        redis.insert(
            "sentinels".into(),
            toml::Value::Array(vec![format!("redis://127.0.0.1:{sentinel_port}").into()]),
        );
        redis.insert("sentinel_master".into(), "aegis-primary".into());
    }))
    .await;
    let alice = token(&stack, "alice");
    for _ in 0..2 {
        let r = get(&stack, "/api/2.0/preview/scim/v2/Me", Some(&alice)).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    // The token landed on the primary the sentinel named.
    let keys = redis_cli(&[
        "-p",
        &primary_port.to_string(),
        "--scan",
        "--pattern",
        "aegis:v2:*:tok:*",
    ]);
    // Keyed by the principal, in the user name's hash slot.
    assert!(
        keys.starts_with("aegis:v2:{") && keys.contains("}:tok:"),
        "{keys}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_and_postgres_over_tls_from_the_config_through_envoy() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ca, ca_pem) = self_signed_ca();
    let leaf = || {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let ca_file = d.join("ca.pem");
    std::fs::write(&ca_file, &ca_pem).unwrap();

    // Redis: TLS only, an ACL user, no default user.
    let (redis_cert, redis_key) = leaf();
    std::fs::write(d.join("redis.pem"), redis_cert).unwrap();
    std::fs::write(d.join("redis.key"), redis_key).unwrap();
    let port = free_port().unwrap();
    std::fs::write(
        d.join("redis.conf"),
        format!(
            "bind 127.0.0.1\nport 0\ntls-port {port}\ntls-cert-file {d}/redis.pem\n\
             tls-key-file {d}/redis.key\ntls-ca-cert-file {d}/ca.pem\ntls-auth-clients no\n\
             save \"\"\nappendonly no\nuser aegis on >s3cret-pw ~aegis:* &aegis:* +@all\n\
             user default off\n",
            d = d.display()
        ),
    )
    .unwrap();
    let _node = redis_server(&d.join("redis.conf"), &d.join("redis.log"));

    let mut stack = start().await;
    // PostgreSQL: TLS on, with a certificate for 127.0.0.1 from the same CA.
    let (pg_cert, pg_key) = leaf();
    let data = stack.postgres.data_dir();
    std::fs::write(data.join("server.crt"), pg_cert).unwrap();
    std::fs::write(data.join("server.key"), pg_key).unwrap();
    let owner = std::fs::metadata(&data).unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    for f in ["server.crt", "server.key"] {
        let p = data.join(f);
        std::os::unix::fs::chown(&p, Some(owner.uid()), Some(owner.gid())).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    stack
        .postgres
        .batch_execute("ALTER SYSTEM SET ssl = on")
        .await
        .unwrap();
    stack
        .postgres
        .execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // aegis, from its config file alone.
    let pg_url = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        stack.postgres.url(),
        ca_file.display()
    );
    let ca_path = ca_file.display().to_string();
    stack
        .update_config(|c| {
            let redis = c.get_mut("redis").and_then(|v| v.as_table_mut()).unwrap();
            redis.insert(
                "url".into(),
                format!("rediss://aegis:s3cret-pw@127.0.0.1:{port}").into(),
            );
            redis.insert("ca_file".into(), ca_path.clone().into());
            let pg = c
                .get_mut("postgres")
                .and_then(|v| v.as_table_mut())
                .unwrap();
            pg.insert("url".into(), pg_url.clone().into());
        })
        .unwrap();
    stack
        .aegis
        .restart()
        .await
        .expect("aegis restarts over TLS");

    let alice = token(&stack, "alice");
    for _ in 0..2 {
        let r = get(&stack, "/api/2.0/preview/scim/v2/Me", Some(&alice)).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    assert_eq!(stack.sandbox.exchange_count("alice@example.com"), 1);

    // Every aegis session on PostgreSQL is encrypted.
    let sessions = stack
        .postgres
        .query_json(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.usename = 'aegis'",
        )
        .await
        .unwrap();
    assert!(!sessions.is_empty());
    assert!(sessions.iter().all(|s| s["ssl"] == true), "{sessions:?}");
    // The token sits (sealed) in the TLS Redis, the only Redis aegis now knows.
    let keys = redis_cli(&[
        "-p",
        &port.to_string(),
        "--tls",
        "--cacert",
        &ca_path,
        "--user",
        "aegis",
        "--pass",
        "s3cret-pw",
        "--no-auth-warning",
        "--scan",
        "--pattern",
        "aegis:v2:*:tok:*",
    ]);
    assert!(keys.contains(":tok:"), "{keys}");

    // The CLI over the same config: a revocation and a verify.
    let config = stack.config_path().to_str().unwrap().to_string();
    let (code, out, err) = revoke(&stack, "alice@example.com", &[]);
    assert_eq!(code, 0, "{out}{err}");
    eventually(
        Duration::from_secs(3),
        "a fresh token after the revoke",
        || async {
            get(&stack, "/api/2.0/preview/scim/v2/Me", Some(&alice))
                .await
                .status
                == 200
                && stack.sandbox.exchange_count("alice@example.com") == 2
        },
    )
    .await;
    let (code, out, err) = aegis(&["audit", "verify", "--config", &config]);
    assert_eq!(code, 0, "{out}{err}");
    stack.shutdown().await;
}
