//! A credential belongs to one verified principal (issuer, subject), never to a user name:
//! two issuers whose users share a user name each get their own Databricks token, in every
//! order and across replicas; a revocation that lands while a mint is in flight means the
//! minted token is never used.
//!
//! What reached the workspace is read from the sandbox's own request log (which subject token
//! stands behind the presented token, and which issued token it was), not from aegis.

mod support;

use std::time::{Duration, Instant};

use sandbox::{TokenFault, SECOND_ISSUER_PATH};
use support::*;

const ME: &str = "/api/2.0/preview/scim/v2/Me";

/// A stack that trusts a second issuer (`{idp}/tenant-b`, same keys) whose `email` claim also
/// names Databricks users, with a Check deadline long enough for a slow token endpoint.
async fn two_issuer_stack() -> Stack {
    // Envoy must wait for aegis longer than a slow mint takes (the dev config says 2 s).
    let envoy = dev_envoy_yaml()
        .expect("envoy/dev.yaml")
        .replace("timeout: 2s\n", "timeout: 20s\n");
    let opts = StackOptions::new(AEGIS_BIN)
        .with_envoy_template(envoy)
        .with_config(|c| {
            add_tenant_b(c);
            c.get_mut("server")
                .and_then(|v| v.as_table_mut())
                .expect("server")
                .insert("check_timeout".into(), "15s".into());
        });
    start_with(opts).await
}

/// The workspace's record of the request aegis let through under `trace_id`.
fn upstream(stack: &Stack, trace_id: &str) -> RequestRecord {
    stack
        .sandbox
        .requests()
        .into_iter()
        .find(|r| r.trace_id.as_deref() == Some(trace_id) && r.service != "oauth2")
        .unwrap_or_else(|| panic!("the workspace saw no request with trace id {trace_id}"))
}

async fn me_at(base: &str, bearer: &str) -> Resp {
    read(
        http()
            .get(format!("{base}{ME}"))
            .bearer_auth(bearer)
            .send()
            .await
            .expect("request through envoy"),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_issuers_sharing_a_user_name_never_share_a_token() {
    let stack = two_issuer_stack().await;
    let b = second_replica(&stack).await;
    let idp = stack.sandbox.idp_url.clone();
    let tenant_b = format!("{idp}{SECOND_ISSUER_PATH}");
    let replicas = [stack.envoy_url(), b.envoy.listener_url()];

    // Order 1: the real alice first (replica A), then mallory of tenant-b claiming alice's
    // e-mail (replica B, then A). Order 2, for bob: the impostor first, then the real bob.
    let alice = token(&stack, "alice");
    let mallory = tenant_b_token(&stack, "mallory", "alice@example.com");
    let bob = token(&stack, "bob");
    let trudy = tenant_b_token(&stack, "trudy", "bob@example.com");
    let plan: [(&str, &String, String, usize); 8] = [
        ("alice", &alice, format!("{idp}#u-alice"), 0),
        ("mallory", &mallory, format!("{tenant_b}#mallory"), 1),
        ("mallory", &mallory, format!("{tenant_b}#mallory"), 0),
        ("alice", &alice, format!("{idp}#u-alice"), 1),
        ("trudy", &trudy, format!("{tenant_b}#trudy"), 0),
        ("bob", &bob, format!("{idp}#u-bob"), 1),
        ("bob", &bob, format!("{idp}#u-bob"), 0),
        ("trudy", &trudy, format!("{tenant_b}#trudy"), 1),
    ];
    for (who, bearer, principal, replica) in plan {
        let r = me_at(&replicas[replica], bearer).await;
        // Positive control: every principal is let through (the workspace's federation policy
        // maps both tenants' e-mails to its users; that is Databricks' decision to make).
        assert_eq!(r.status, 200, "{who} at replica {replica}: {}", r.text);
        let seen = upstream(&stack, &r.trace_id());
        assert_eq!(
            seen.subject.as_deref(),
            Some(principal.as_str()),
            "{who} at replica {replica} reached Databricks with another principal's token: {seen:?}"
        );
    }
    // Each principal was exchanged for exactly once (the second replica reused the first's
    // token for the *same* principal, through Redis).
    assert_eq!(stack.sandbox.exchange_count("alice@example.com"), 2);
    assert_eq!(stack.sandbox.exchange_count("bob@example.com"), 2);

    // The chain records the user name and the principal behind it.
    let rows = stack
        .postgres
        .query_json(
            "SELECT DISTINCT issuer, subject, user_name FROM aegis_audit \
             WHERE decision = 'ALLOW' ORDER BY subject",
        )
        .await
        .expect("audit rows");
    let subjects: Vec<&str> = rows.iter().filter_map(|r| r["subject"].as_str()).collect();
    assert_eq!(
        subjects,
        ["mallory", "trudy", "u-alice", "u-bob"],
        "{rows:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_during_a_mint_means_the_minted_token_is_never_used() {
    let stack = two_issuer_stack().await;
    let alice = token(&stack, "alice");
    stack
        .sandbox
        .set_token_fault(TokenFault::Slow { millis: 2500 });

    // alice's first request: aegis reads her revocation generation, then waits on the token
    // endpoint.
    let base = stack.envoy_url();
    let bearer = alice.clone();
    let first = tokio::spawn(async move { me_at(&base, &bearer).await });
    let started = Instant::now();
    while stack.sandbox.token_requests() == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "aegis never called the token endpoint"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The revocation lands while that mint is in flight.
    let (code, out, err) = revoke(&stack, "alice@example.com", &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        stack.sandbox.exchange_count("alice@example.com"),
        0,
        "the revocation finished after the mint; the test proves nothing (slow the endpoint)"
    );
    assert!(out.contains("1 principal(s)"), "{out}");

    // The in-flight request still succeeds, with a token minted after the revocation.
    let r = first.await.expect("request task");
    assert_eq!(r.status, 200, "{}", r.text);
    let seen = upstream(&stack, &r.trace_id());
    assert_eq!(stack.sandbox.exchange_count("alice@example.com"), 2);
    assert_eq!(
        seen.token_serial,
        Some(2),
        "the token minted before the revocation reached Databricks: {seen:?}"
    );

    // And it stays that way: later requests use the fresh token, never the first.
    stack.sandbox.set_token_fault(TokenFault::Ok);
    for _ in 0..3 {
        let r = get(&stack, ME, Some(&alice)).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(upstream(&stack, &r.trace_id()).token_serial, Some(2));
    }
    let used: Vec<Option<u64>> = stack
        .sandbox
        .requests()
        .iter()
        .filter(|r| r.service != "oauth2")
        .map(|r| r.token_serial)
        .collect();
    assert!(!used.contains(&Some(1)), "token 1 was used: {used:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_by_user_name_reaches_every_principal_and_can_be_narrowed() {
    let stack = two_issuer_stack().await;
    let alice = token(&stack, "alice");
    let mallory = tenant_b_token(&stack, "mallory", "alice@example.com");
    for t in [&alice, &mallory] {
        assert_eq!(get(&stack, ME, Some(t)).await.status, 200);
    }
    assert_eq!(stack.sandbox.exchange_count("alice@example.com"), 2);

    // Narrowed to tenant-b's mallory (by the issuer's configured name): only her token goes.
    let (code, out, err) = revoke(
        &stack,
        "alice@example.com",
        &["--issuer", "tenant-b", "--subject", "mallory"],
    );
    assert_eq!(code, 0, "{out}{err}");
    let settle = Instant::now();
    loop {
        assert_eq!(get(&stack, ME, Some(&mallory)).await.status, 200);
        if stack.sandbox.exchange_count("alice@example.com") == 3 {
            break;
        }
        assert!(
            settle.elapsed() < Duration::from_secs(2),
            "mallory's token was not revoked"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(get(&stack, ME, Some(&alice)).await.status, 200);
    assert_eq!(
        stack.sandbox.exchange_count("alice@example.com"),
        3,
        "a narrowed revocation also dropped the other principal's token"
    );

    // By user name alone: both principals are revoked.
    let (code, out, err) = revoke(&stack, "alice@example.com", &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("2 principal(s)"), "{out}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    for t in [&alice, &mallory] {
        assert_eq!(get(&stack, ME, Some(t)).await.status, 200);
    }
    assert_eq!(stack.sandbox.exchange_count("alice@example.com"), 5);

    // An unknown issuer is a clear error, and revokes nothing.
    let (code, _out, err) = revoke(
        &stack,
        "alice@example.com",
        &["--issuer", "nobody", "--subject", "mallory"],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no issuer named \"nobody\""), "{err}");
    let rows = stack
        .postgres
        .query_json(
            "SELECT reason, issuer, subject, path FROM aegis_audit WHERE decision = 'ADMIN' ORDER BY seq",
        )
        .await
        .expect("admin rows");
    assert_eq!(rows.len(), 2, "{rows:?}");
    // The principal revoked is named in the path; issuer and subject say who acted (the CLI
    // has no signed-in principal), as they do in console rows.
    assert!(
        rows[0]["path"]
            .as_str()
            .is_some_and(|p| p.ends_with("--subject mallory")),
        "{rows:?}"
    );
    assert_eq!(rows[0]["subject"], "");
    assert_eq!(rows[1]["path"], "aegis token revoke");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workspace_admits_only_its_listed_issuers_and_config_check_warns_otherwise() {
    let mut stack = two_issuer_stack().await;
    let config = stack.config_path().to_str().expect("path").to_string();
    // Two issuers can reach the one workspace: valid, but config check says why it is risky.
    let (code, out, err) = aegis(&["config", "check", "--config", &config]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        err.contains("warning: workspaces[0]") && err.contains("2 issuers"),
        "{err}"
    );

    // The workspace admits only the first issuer.
    let first = stack.config()["issuers"][0]["name"]
        .as_str()
        .expect("issuer name")
        .to_string();
    stack
        .update_config(|c| {
            c["workspaces"][0]
                .as_table_mut()
                .expect("workspace")
                .insert("issuers".into(), vec![first.clone()].into());
        })
        .expect("config written");
    let (code, out, err) = aegis(&["config", "check", "--config", &config]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!err.contains("warning"), "{err}");
    stack.aegis.restart().await.expect("aegis restarts");

    let alice = token(&stack, "alice");
    let mallory = tenant_b_token(&stack, "mallory", "alice@example.com");
    // Positive control: the listed issuer's user is let through.
    assert_eq!(get(&stack, ME, Some(&alice)).await.status, 200);
    let r = get(&stack, ME, Some(&mallory)).await;
    assert_eq!(r.status, 401, "{}", r.text);
    assert_eq!(r.body["error"], "untrusted_issuer", "{}", r.text);
    assert_eq!(r.body["trace_id"].as_str(), Some(r.trace_id().as_str()));
    assert_eq!(stack.sandbox.exchange_count("alice@example.com"), 1);

    // A name that is not a configured issuer is a config error.
    stack
        .update_config(|c| {
            c["workspaces"][0]
                .as_table_mut()
                .expect("workspace")
                .insert("issuers".into(), vec!["tenant-c".to_string()].into());
        })
        .expect("config written");
    let (code, _out, err) = aegis(&["config", "check", "--config", &config]);
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("workspaces[0].issuers") && err.contains("\"tenant-c\""),
        "{err}"
    );
}
