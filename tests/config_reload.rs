//! Config reload without a restart (issue 19), under live traffic through Envoy: a new issuer,
//! a new deny rule and an HMAC key rotation take effect between Checks; a config with an error,
//! or one that changes what only a restart can change, is refused whole while the running one
//! keeps serving; SIGHUP reloads too; no Check of the background load fails meanwhile, and the
//! chain signed with both keys verifies.

mod support;

use std::time::{Duration, Instant};

use support::*;

const ME: &str = "/api/2.0/preview/scim/v2/Me";
const CATALOGS: &str = "/api/2.1/unity-catalog/catalogs";

/// One sample of `/metrics` by its exact name and labels (0 when absent).
async fn metric(stack: &Stack, series: &str) -> f64 {
    let text = http()
        .get(format!("{}/metrics", stack.aegis_admin_url()))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body");
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

async fn wait_reloads(stack: &Stack, result: &str, want: f64) {
    let series = format!("aegis_config_reloads_total{{result=\"{result}\"}}");
    let mut last = 0.0;
    let until = Instant::now() + Duration::from_secs(15);
    while Instant::now() < until {
        last = metric(stack, &series).await;
        if last >= want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "{series} stayed at {last}, expected {want}\n{}",
        stack.aegis.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuers_rules_and_keys_reload_under_load_and_bad_configs_are_refused_whole() {
    let mut stack = start().await;
    let config = stack.config_path().to_str().unwrap().to_string();
    let alice = token(&stack, "alice");
    let tenant_b = tenant_b_token(&stack, "b-alice", "alice@example.com");
    // Before: catalogs allowed, the second issuer unknown.
    assert_eq!(get(&stack, CATALOGS, Some(&alice)).await.status, 200);
    let r = get(&stack, ME, Some(&tenant_b)).await;
    assert_eq!(
        (r.status, r.body["error"].as_str()),
        (401, Some("untrusted_issuer"))
    );
    assert_eq!(
        metric(&stack, "aegis_config_reloads_total{result=\"ok\"}").await,
        0.0
    );

    // Live traffic for the whole test.
    let until = Instant::now() + Duration::from_secs(14);
    let load = spawn_load(stack.envoy_url(), ME, alice.clone(), 4, until);

    // 1. A good change: a second issuer, a deny rule and a new HMAC key (k1 kept for its rows).
    let keys = stack.keys_dir();
    let k2 = keys.join("audit-k2.key");
    std::fs::write(
        &k2,
        format!("{}\n", aegis::secret::Key32::generate().to_base64()),
    )
    .unwrap();
    let old_key = stack.config()["audit"]["hmac_key_file"]
        .as_str()
        .unwrap()
        .to_string();
    let old_id = stack.config()["audit"]["key_id"]
        .as_str()
        .unwrap()
        .to_string();
    stack
        .update_config(|c| {
            add_tenant_b(c);
            let audit = c["audit"].as_table_mut().unwrap();
            audit.insert("key_id".into(), "k2".into());
            audit.insert("hmac_key_file".into(), k2.to_str().unwrap().into());
            let mut previous = toml::Table::new();
            previous.insert(old_id.clone(), old_key.clone().into());
            audit.insert("previous_keys".into(), previous.into());
            let mut rule = toml::Table::new();
            rule.insert("methods".into(), toml::Value::Array(vec!["GET".into()]));
            rule.insert("path".into(), CATALOGS.into());
            c["policy"]
                .as_table_mut()
                .unwrap()
                .insert("deny".into(), toml::Value::Array(vec![rule.into()]));
        })
        .unwrap();
    wait_reloads(&stack, "ok", 1.0).await;
    let r = get(&stack, CATALOGS, Some(&alice)).await;
    assert_eq!(
        (r.status, r.body["error"].as_str()),
        (403, Some("path_blocked")),
        "the new deny rule is in force"
    );
    let r = get(&stack, ME, Some(&tenant_b)).await;
    assert_eq!(r.status, 200, "the new issuer is trusted: {:?}", r.body);
    let rows = stack
        .postgres
        .query_json("SELECT key_id FROM aegis_audit ORDER BY seq DESC LIMIT 1")
        .await
        .unwrap();
    assert_eq!(
        rows[0]["key_id"], "k2",
        "new rows are signed with the new key"
    );

    // 2. A config with an error is refused whole: the running one (the deny rule included)
    // keeps serving.
    let good = stack.config().clone();
    stack
        .update_config(|c| {
            c["policy"]
                .as_table_mut()
                .unwrap()
                .insert("deny".into(), 5.into());
            c["policy"].as_table_mut().unwrap().insert(
                "allowed_agents".into(),
                toml::Value::Array(vec!["nobody".into()]),
            );
        })
        .unwrap();
    wait_reloads(&stack, "error", 1.0).await;
    assert_eq!(
        get(&stack, ME, Some(&alice)).await.status,
        200,
        "not half applied"
    );
    assert_eq!(get(&stack, CATALOGS, Some(&alice)).await.status, 403);
    assert_eq!(metric(&stack, "aegis_config_last_reload_ok").await, 0.0);

    // 3. A change only a restart can apply is refused too, named in the log.
    stack.update_config(|c| *c = good.clone()).unwrap();
    wait_reloads(&stack, "ok", 2.0).await;
    stack
        .update_config(|c| {
            let server = c["server"].as_table_mut().unwrap();
            server.insert("grpc_listen".into(), "127.0.0.1:1".into());
        })
        .unwrap();
    wait_reloads(&stack, "error", 2.0).await;
    assert!(
        stack
            .aegis
            .log()
            .contains("[server] changed: it takes effect on a restart"),
        "{}",
        stack.aegis.log()
    );
    assert_eq!(get(&stack, ME, Some(&alice)).await.status, 200);

    // 4. Back to the good file, the deny rule removed; then SIGHUP with the file unchanged.
    stack
        .update_config(|c| {
            *c = good.clone();
            c["policy"].as_table_mut().unwrap().remove("deny");
        })
        .unwrap();
    wait_reloads(&stack, "ok", 3.0).await;
    assert_eq!(get(&stack, CATALOGS, Some(&alice)).await.status, 200);
    let pid = stack.aegis.pid().expect("aegis pid");
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    wait_reloads(&stack, "ok", 4.0).await;

    // No Check of the load failed across four reloads and two refusals.
    let samples = load.await.expect("load");
    let failed: Vec<_> = samples.iter().filter(|s| s.status != 200).collect();
    assert!(samples.len() > 50, "only {} requests", samples.len());
    assert!(
        failed.is_empty(),
        "{} of {} failed: {:?}",
        failed.len(),
        samples.len(),
        failed.first()
    );

    // The chain signed with k1 and then k2 verifies with the reloaded config.
    let (code, out, err) = aegis(&["audit", "verify", "--config", &config]);
    assert_eq!(code, 0, "{out}{err}");

    stack.shutdown().await;
}
