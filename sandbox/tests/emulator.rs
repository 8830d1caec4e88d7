//! The dev IdP and the workspace emulator over real sockets, as aegis and the Databricks SDK see
//! them.

use std::time::Duration;

use sandbox::{JwksFault, RequestRecord, Sandbox, SandboxOptions, TokenRequest, WAREHOUSE_ID};
use serde_json::{json, Value};

const GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const JWT: &str = "urn:ietf:params:oauth:token-type:jwt";

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("http client")
}

async fn start() -> Sandbox {
    Sandbox::start(SandboxOptions::default())
        .await
        .expect("sandbox starts")
}

/// POSTs a token exchange; returns the status and the JSON body.
async fn exchange(sb: &Sandbox, subject_token: &str) -> (u16, Value) {
    let resp = client()
        .post(format!("{}/oidc/v1/token", sb.workspace_url))
        .form(&[
            ("grant_type", GRANT),
            ("subject_token", subject_token),
            ("subject_token_type", JWT),
            ("scope", "all-apis"),
        ])
        .send()
        .await
        .expect("token endpoint answers");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("json body"))
}

/// A Databricks token for `user` obtained through the federation exchange.
async fn databricks_token(sb: &Sandbox, user: &str) -> String {
    let idp_token = sb.mint_idp_token(&TokenRequest::new(user));
    let (status, body) = exchange(sb, &idp_token).await;
    assert_eq!(status, 200, "{body}");
    body["access_token"]
        .as_str()
        .expect("access_token")
        .to_string()
}

async fn get(sb: &Sandbox, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut req = client().get(format!("{}{path}", sb.workspace_url));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("workspace answers");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn post(sb: &Sandbox, path: &str, token: &str, body: Value) -> (u16, Value) {
    let resp = client()
        .post(format!("{}{path}", sb.workspace_url))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .expect("workspace answers");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn sql(sb: &Sandbox, token: &str, statement: &str) -> Value {
    let (status, body) = post(
        sb,
        "/api/2.0/sql/statements",
        token,
        json!({ "statement": statement, "warehouse_id": WAREHOUSE_ID, "wait_timeout": "30s" }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body
}

fn last(sb: &Sandbox) -> RequestRecord {
    sb.requests().pop().expect("a logged request")
}

#[tokio::test]
async fn token_exchange_follows_the_federation_policy() {
    let sb = start().await;

    let (status, body) = exchange(&sb, &sb.mint_idp_token(&TokenRequest::new("alice"))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3600);
    assert_eq!(body["scope"], "all-apis");
    assert!(body["access_token"].as_str().is_some_and(|t| t.len() > 32));
    let rec = last(&sb);
    assert_eq!(
        (rec.service.as_str(), rec.action.as_str()),
        ("oauth2", "tokenExchange")
    );
    assert_eq!(rec.user.as_deref(), Some("alice@example.com"));
    assert_eq!(rec.status, 200);

    let mut es = TokenRequest::new("carol");
    es.alg = Some("ES256".into());
    assert_eq!(exchange(&sb, &sb.mint_idp_token(&es)).await.0, 200);

    let rejected = |f: &dyn Fn(&mut TokenRequest)| {
        let mut r = TokenRequest::new("alice");
        f(&mut r);
        sb.mint_idp_token(&r)
    };
    let bad = [
        (
            "wrong audience",
            rejected(&|r| r.audience = "someone-else".into()),
        ),
        ("expired", rejected(&|r| r.ttl_secs = -120)),
        ("unknown user", rejected(&|r| r.user = "mallory".into())),
        ("hs256", rejected(&|r| r.alg = Some("HS256".into()))),
        ("unsigned", rejected(&|r| r.alg = Some("none".into()))),
        ("rs384", rejected(&|r| r.alg = Some("RS384".into()))),
        ("unknown alg", rejected(&|r| r.alg = Some("ES384".into()))),
        (
            "foreign issuer",
            rejected(&|r| {
                r.extra_claims
                    .insert("iss".into(), json!("https://evil.example.com"));
            }),
        ),
        (
            "not yet valid",
            rejected(&|r| {
                r.extra_claims.insert("nbf".into(), json!(4_000_000_000i64));
            }),
        ),
        ("garbage", "not-a-jwt".to_string()),
    ];
    for (what, token) in &bad {
        let (status, body) = exchange(&sb, token).await;
        assert_eq!(status, 400, "{what}: {body}");
        assert_eq!(body["error"], "invalid_grant", "{what}: {body}");
        assert!(body["error_description"].is_string(), "{what}");
    }
    // A tampered signature.
    let good = sb.mint_idp_token(&TokenRequest::new("alice"));
    let tampered = format!("{}x", &good[..good.len() - 1]);
    assert_eq!(exchange(&sb, &tampered).await.1["error"], "invalid_grant");

    let form_post = |fields: Vec<(&'static str, &'static str)>| {
        let url = format!("{}/oidc/v1/token", sb.workspace_url);
        async move {
            let resp = client()
                .post(url)
                .form(&fields)
                .send()
                .await
                .expect("answers");
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.expect("json"))
        }
    };
    let (status, body) = form_post(vec![("grant_type", GRANT), ("subject_token_type", JWT)]).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request"))
    );
    let (status, body) = form_post(vec![("grant_type", "client_credentials")]).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("unsupported_grant_type"))
    );

    assert_eq!(sb.exchange_count("alice@example.com"), 1);
    assert_eq!(sb.exchange_count("carol@example.com"), 1);
    assert_eq!(sb.exchange_count("mallory@example.com"), 0);
    sb.shutdown().await;
}

#[tokio::test]
async fn workspace_rejects_idp_jwts_and_bad_credentials() {
    let sb = start().await;
    let me = "/api/2.0/preview/scim/v2/Me";

    let idp_jwt = sb.mint_idp_token(&TokenRequest::new("alice"));
    let (status, body) = get(&sb, me, Some(&idp_jwt)).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error_code"], 403);
    assert!(body["message"]
        .as_str()
        .is_some_and(|m| m.starts_with("Invalid access token.")));
    let rec = last(&sb);
    assert_eq!(rec.authorization_kind, "idp_jwt");
    assert_eq!(rec.user, None);
    assert_eq!(rec.status, 403);

    let (status, body) = get(&sb, me, None).await;
    assert_eq!(status, 401);
    assert_eq!(body["error_code"], 401);
    assert!(body["message"]
        .as_str()
        .is_some_and(|m| m.starts_with("Credential was not sent or was of an unsupported type")));
    assert_eq!(last(&sb).authorization_kind, "none");

    // Two Authorization headers, even if both are valid, are refused.
    let token = databricks_token(&sb, "alice").await;
    let resp = client()
        .get(format!("{}{me}", sb.workspace_url))
        .header("authorization", format!("Bearer {token}"))
        .header("authorization", format!("Bearer {token}"))
        .send()
        .await
        .expect("answers");
    assert_eq!(resp.status().as_u16(), 401);
    let rec = last(&sb);
    assert_eq!((rec.authorization_count, rec.status), (2, 401));

    let (status, _) = get(&sb, me, Some("dapi-not-issued-here")).await;
    assert_eq!(status, 403);
    assert_eq!(last(&sb).authorization_kind, "other");

    let resp = client()
        .get(format!("{}{me}", sb.workspace_url))
        .basic_auth("alice", Some("pw"))
        .send()
        .await
        .expect("answers");
    assert_eq!(resp.status().as_u16(), 401);
    sb.shutdown().await;
}

#[tokio::test]
async fn expired_databricks_tokens_are_rejected_and_logged() {
    let sb = Sandbox::start(SandboxOptions {
        token_ttl: Duration::ZERO,
        ..SandboxOptions::default()
    })
    .await
    .expect("starts");
    let token = databricks_token(&sb, "alice").await;
    let (status, body) = get(&sb, "/api/2.0/preview/scim/v2/Me", Some(&token)).await;
    assert_eq!(status, 403, "{body}");
    let rec = last(&sb);
    assert!(rec.token_expired);
    assert_eq!(rec.authorization_kind, "databricks_token");
    assert_eq!(rec.user.as_deref(), Some("alice@example.com"));
    sb.shutdown().await;
}

#[tokio::test]
async fn scim_me_has_the_databricks_shape() {
    let sb = start().await;
    let token = databricks_token(&sb, "alice").await;
    let (status, me) = get(&sb, "/api/2.0/preview/scim/v2/Me", Some(&token)).await;
    assert_eq!(status, 200);
    assert_eq!(me["userName"], "alice@example.com");
    assert_eq!(me["displayName"], "Alice Anders");
    assert_eq!(me["active"], true);
    assert_eq!(me["emails"][0]["value"], "alice@example.com");
    assert_eq!(me["emails"][0]["primary"], true);
    assert!(me["id"].is_string());
    assert_eq!(
        me["schemas"][0],
        "urn:ietf:params:scim:schemas:core:2.0:User"
    );
    let groups: Vec<&str> = me["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .filter_map(|g| g["display"].as_str())
        .collect();
    assert_eq!(groups, vec!["analysts", "emea"]);
    assert!(me["groups"][0]["$ref"]
        .as_str()
        .is_some_and(|r| r.starts_with("Groups/")));
    let rec = last(&sb);
    assert_eq!(
        (rec.service.as_str(), rec.action.as_str()),
        ("accounts", "me")
    );
    assert_eq!(rec.user.as_deref(), Some("alice@example.com"));
    sb.shutdown().await;
}

#[tokio::test]
async fn sql_enforces_grants_row_filters_and_masks() {
    let sb = start().await;
    let query =
        "SELECT order_id, region, customer_email, amount FROM main.sales.orders ORDER BY order_id";

    let alice = databricks_token(&sb, "alice").await;
    let resp = sql(&sb, &alice, query).await;
    assert_eq!(resp["status"]["state"], "SUCCEEDED", "{resp}");
    assert!(resp["statement_id"].is_string());
    let manifest = &resp["manifest"];
    assert_eq!(manifest["format"], "JSON_ARRAY");
    assert_eq!(manifest["schema"]["column_count"], 4);
    assert_eq!(
        manifest["schema"]["columns"][0],
        json!({ "name": "order_id", "type_text": "INT", "type_name": "INT", "position": 0 })
    );
    assert_eq!(manifest["schema"]["columns"][3]["type_name"], "DOUBLE");
    assert_eq!(manifest["total_row_count"], 3);
    assert_eq!(manifest["total_chunk_count"], 1);
    assert_eq!(manifest["truncated"], false);
    assert_eq!(
        manifest["chunks"],
        json!([{ "chunk_index": 0, "row_offset": 0, "row_count": 3 }])
    );
    assert_eq!(resp["result"]["chunk_index"], 0);
    assert_eq!(resp["result"]["row_count"], 3);
    assert_eq!(
        resp["result"]["data_array"],
        json!([
            ["1", "EMEA", "***", "120.5"],
            ["2", "EMEA", "***", "75.0"],
            ["3", "EMEA", "***", "310.25"]
        ])
    );
    let rec = last(&sb);
    assert_eq!(
        (rec.service.as_str(), rec.action.as_str()),
        ("sql", "executeStatement")
    );
    assert_eq!(rec.user.as_deref(), Some("alice@example.com"));

    let carol = databricks_token(&sb, "carol").await;
    let resp = sql(&sb, &carol, query).await;
    assert_eq!(resp["manifest"]["total_row_count"], 8);
    assert_eq!(
        resp["result"]["data_array"][3],
        json!(["4", "AMER", "dave@example.com", "42.0"])
    );

    let bob = databricks_token(&sb, "bob").await;
    let resp = sql(&sb, &bob, query).await;
    assert_eq!(resp["status"]["state"], "FAILED", "{resp}");
    assert_eq!(resp["status"]["error"]["error_code"], "BAD_REQUEST");
    assert_eq!(
        resp["status"]["error"]["message"],
        "[INSUFFICIENT_PERMISSIONS] Insufficient privileges:\nUser does not have SELECT on Table \
         'main.sales.orders'. SQLSTATE: 42501"
    );
    assert_eq!(resp["status"]["sql_state"], "42501");
    assert!(resp.get("manifest").is_none());

    let resp = sql(&sb, &carol, "SELECT * FROM main.sales.missing").await;
    assert_eq!(resp["status"]["state"], "FAILED");
    assert!(resp["status"]["error"]["message"]
        .as_str()
        .is_some_and(|m| m.starts_with(
            "[TABLE_OR_VIEW_NOT_FOUND] The table or view `main`.`sales`.`missing` cannot be found."
        )));

    let resp = sql(&sb, &alice, "SELECT count(*) AS n FROM main.sales.orders").await;
    assert_eq!(
        resp["manifest"]["schema"]["columns"][0],
        json!({ "name": "n", "type_text": "BIGINT", "type_name": "LONG", "position": 0 })
    );
    assert_eq!(resp["result"]["data_array"], json!([["3"]]));
    sb.shutdown().await;
}

#[tokio::test]
async fn statements_poll_chunk_and_validate() {
    let sb = start().await;
    let carol = databricks_token(&sb, "carol").await;

    // wait_timeout 0s returns at once; the client polls.
    let (status, resp) = post(
        &sb,
        "/api/2.0/sql/statements",
        &carol,
        json!({
            "statement": "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r WHERE x < 2500) SELECT x FROM r",
            "warehouse_id": WAREHOUSE_ID,
            "wait_timeout": "0s",
        }),
    )
    .await;
    assert_eq!(status, 200, "{resp}");
    let id = resp["statement_id"].as_str().expect("id").to_string();
    let mut state = resp;
    for _ in 0..100 {
        if state["status"]["state"] == "SUCCEEDED" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        state = get(&sb, &format!("/api/2.0/sql/statements/{id}"), Some(&carol))
            .await
            .1;
    }
    assert_eq!(state["status"]["state"], "SUCCEEDED", "{state}");
    assert_eq!(state["manifest"]["total_row_count"], 2500);
    assert_eq!(state["manifest"]["total_chunk_count"], 3);
    assert_eq!(state["result"]["next_chunk_index"], 1);
    assert_eq!(
        state["result"]["next_chunk_internal_link"],
        format!("/api/2.0/sql/statements/{id}/result/chunks/1")
    );
    let (status, chunk) = get(
        &sb,
        &format!("/api/2.0/sql/statements/{id}/result/chunks/2"),
        Some(&carol),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(chunk["chunk_index"], 2);
    assert_eq!(chunk["row_offset"], 2000);
    assert_eq!(chunk["row_count"], 500);
    assert_eq!(chunk["data_array"][499], json!(["2500"]));
    assert!(chunk.get("next_chunk_index").is_none());
    assert_eq!(last(&sb).action, "getStatementResultChunkN");

    // Another user cannot see carol's statement.
    let alice = databricks_token(&sb, "alice").await;
    let (status, body) = get(&sb, &format!("/api/2.0/sql/statements/{id}"), Some(&alice)).await;
    assert_eq!(status, 404, "{body}");

    // Cancel is accepted.
    let (status, body) = post(
        &sb,
        &format!("/api/2.0/sql/statements/{id}/cancel"),
        &carol,
        json!({}),
    )
    .await;
    assert_eq!((status, body), (200, json!({})));

    // A runaway statement is canceled and stops.
    let (_, resp) = post(
        &sb,
        "/api/2.0/sql/statements",
        &carol,
        json!({ "statement": "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r) SELECT count(*) FROM r",
                "warehouse_id": WAREHOUSE_ID, "wait_timeout": "0s" }),
    )
    .await;
    let runaway = resp["statement_id"].as_str().expect("id").to_string();
    assert!(
        matches!(
            resp["status"]["state"].as_str(),
            Some("PENDING" | "RUNNING")
        ),
        "{resp}"
    );
    let path = format!("/api/2.0/sql/statements/{runaway}");
    assert_eq!(
        post(&sb, &format!("{path}/cancel"), &carol, json!({}))
            .await
            .0,
        200
    );
    assert_eq!(
        get(&sb, &path, Some(&carol)).await.1["status"]["state"],
        "CANCELED"
    );

    // row_limit truncates.
    let (_, resp) = post(
        &sb,
        "/api/2.0/sql/statements",
        &carol,
        json!({ "statement": "SELECT order_id FROM orders ORDER BY order_id", "warehouse_id": WAREHOUSE_ID,
                "catalog": "main", "schema": "sales", "row_limit": 2 }),
    )
    .await;
    assert_eq!(resp["manifest"]["truncated"], true, "{resp}");
    assert_eq!(resp["result"]["data_array"], json!([["1"], ["2"]]));

    // Named parameters.
    let (_, resp) = post(
        &sb,
        "/api/2.0/sql/statements",
        &carol,
        json!({ "statement": "SELECT count(*) FROM main.sales.orders WHERE region = :region",
                "warehouse_id": WAREHOUSE_ID,
                "parameters": [{ "name": "region", "value": "APAC" }] }),
    )
    .await;
    assert_eq!(resp["result"]["data_array"], json!([["2"]]), "{resp}");

    // Request validation errors are non-200 with the standard error body.
    for (body, status, code) in [
        (
            json!({ "statement": "SELECT 1", "warehouse_id": "nope" }),
            404,
            "RESOURCE_DOES_NOT_EXIST",
        ),
        (
            json!({ "warehouse_id": WAREHOUSE_ID }),
            400,
            "INVALID_PARAMETER_VALUE",
        ),
        (
            json!({ "statement": "SELECT 1", "warehouse_id": WAREHOUSE_ID, "wait_timeout": "3s" }),
            400,
            "INVALID_PARAMETER_VALUE",
        ),
    ] {
        let (got, resp) = post(&sb, "/api/2.0/sql/statements", &carol, body).await;
        assert_eq!(
            (got, resp["error_code"].as_str()),
            (status, Some(code)),
            "{resp}"
        );
    }
    sb.shutdown().await;
}

#[tokio::test]
async fn request_log_records_what_databricks_would_audit() {
    let sb = start().await;
    let token = databricks_token(&sb, "alice").await;
    sb.clear_requests();

    let resp = client()
        .get(format!(
            "{}/api/2.0/preview/scim/v2/Me?x=1",
            sb.workspace_url
        ))
        .bearer_auth(&token)
        .header("user-agent", "copilot/1.0 aegis/0.1.0 aegis-trace/tr-123")
        .header("x-aegis-leak", "1")
        .send()
        .await
        .expect("answers");
    assert_eq!(resp.status().as_u16(), 200);
    let log = sb.requests();
    assert_eq!(log.len(), 1);
    let rec = &log[0];
    assert_eq!(rec.method, "GET");
    assert_eq!(rec.path, "/api/2.0/preview/scim/v2/Me?x=1");
    assert_eq!(rec.authorization_count, 1);
    assert_eq!(rec.authorization_kind, "databricks_token");
    assert!(!rec.token_expired);
    assert_eq!(rec.user.as_deref(), Some("alice@example.com"));
    assert_eq!(
        rec.user_agent.as_deref(),
        Some("copilot/1.0 aegis/0.1.0 aegis-trace/tr-123")
    );
    assert_eq!(rec.trace_id.as_deref(), Some("tr-123"));
    assert_eq!(rec.x_aegis_headers, vec!["x-aegis-leak".to_string()]);
    assert_eq!(rec.status, 200);
    assert!(rec.ts_ms > 0);

    // Unknown endpoints: the Databricks 404, logged too.
    let (status, body) = get(&sb, "/api/2.0/clusters/get-delete", Some(&token)).await;
    assert_eq!(status, 404);
    assert_eq!(
        body,
        json!({ "error_code": "ENDPOINT_NOT_FOUND", "message": "No API found for 'GET /clusters/get-delete'" })
    );
    assert_eq!(last(&sb).status, 404);

    // The HTTP view of the same log, and reset.
    let http_log: Vec<RequestRecord> = client()
        .get(format!("{}/_sandbox/requests", sb.workspace_url))
        .send()
        .await
        .expect("answers")
        .json()
        .await
        .expect("records");
    assert_eq!(http_log.len(), 2);
    assert_eq!(http_log[1].path, "/api/2.0/clusters/get-delete");
    let status = client()
        .post(format!("{}/_sandbox/reset", sb.workspace_url))
        .send()
        .await
        .expect("answers")
        .status();
    assert!(status.is_success());
    assert!(sb.requests().is_empty());
    assert_eq!(sb.exchange_count("alice@example.com"), 0);
    sb.shutdown().await;
}

#[tokio::test]
async fn discovery_documents_and_idp_endpoints() {
    let sb = start().await;
    let http = client();

    let cfg: Value = http
        .get(format!(
            "{}/.well-known/databricks-config",
            sb.workspace_url
        ))
        .send()
        .await
        .expect("answers")
        .json()
        .await
        .expect("json");
    assert_eq!(cfg["oidc_endpoint"], format!("{}/oidc", sb.workspace_url));
    assert!(cfg["workspace_id"].is_string() && cfg["account_id"].is_string());
    let oas: Value = http
        .get(format!(
            "{}/oidc/.well-known/oauth-authorization-server",
            sb.workspace_url
        ))
        .send()
        .await
        .expect("answers")
        .json()
        .await
        .expect("json");
    assert_eq!(
        oas["token_endpoint"],
        format!("{}/oidc/v1/token", sb.workspace_url)
    );
    assert_eq!(
        oas["authorization_endpoint"],
        format!("{}/oidc/v1/authorize", sb.workspace_url)
    );

    let oidc: Value = http
        .get(format!("{}/.well-known/openid-configuration", sb.idp_url))
        .send()
        .await
        .expect("answers")
        .json()
        .await
        .expect("json");
    assert_eq!(oidc["issuer"], sb.idp_url);
    assert_eq!(oidc["jwks_uri"], format!("{}/jwks", sb.idp_url));
    let jwks: Value = http
        .get(format!("{}/jwks", sb.idp_url))
        .send()
        .await
        .expect("answers")
        .json()
        .await
        .expect("json");
    let keys = jwks["keys"].as_array().expect("keys");
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[0]["kty"], "RSA");
    assert_eq!(keys[1]["crv"], "P-256");

    // The token it mints carries the documented claims and verifies against the JWKS key.
    let token = sb.mint_idp_token(&TokenRequest::new("bob"));
    let header = jsonwebtoken::decode_header(&token).expect("header");
    assert_eq!(header.kid.as_deref(), keys[0]["kid"].as_str());
    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(keys[0].clone()).expect("jwk");
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_audience(&["aegis"]);
    validation.set_issuer(&[sb.idp_url.as_str()]);
    let claims = jsonwebtoken::decode::<Value>(
        &token,
        &jsonwebtoken::DecodingKey::from_jwk(&jwk).expect("key"),
        &validation,
    )
    .expect("verifies")
    .claims;
    assert_eq!(claims["email"], "bob@example.com");
    assert_eq!(claims["sub"], "u-bob");
    assert_eq!(claims["azp"], "copilot");
    assert!(claims["jti"].is_string() && claims["nbf"].is_i64());

    // POST /dev/token.
    let minted: Value = http
        .post(format!("{}/dev/token", sb.idp_url))
        .json(&json!({ "user": "carol", "agent": "claude", "alg": "ES256", "ttl_secs": 60 }))
        .send()
        .await
        .expect("answers")
        .json()
        .await
        .expect("json");
    assert_eq!(minted["token_type"], "Bearer");
    assert_eq!(minted["expires_in"], 60);
    let t = minted["access_token"].as_str().expect("token");
    assert_eq!(
        jsonwebtoken::decode_header(t).expect("header").alg,
        jsonwebtoken::Algorithm::ES256
    );

    // JWKS faults, over HTTP and through the Rust API.
    let set = |mode: &'static str| {
        let url = format!("{}/dev/faults", sb.idp_url);
        let http = http.clone();
        async move {
            http.post(url)
                .json(&json!({ "jwks": mode }))
                .send()
                .await
                .expect("answers")
                .status()
        }
    };
    let jwks_status = || {
        let url = format!("{}/jwks", sb.idp_url);
        let http = http.clone();
        async move {
            let r = http.get(url).send().await.expect("answers");
            (r.status().as_u16(), r.text().await.unwrap_or_default())
        }
    };
    assert!(set("down").await.is_success());
    assert_eq!(jwks_status().await.0, 503);
    set("html").await;
    assert!(jwks_status().await.1.starts_with("<!doctype html>"));
    set("empty").await;
    assert_eq!(jwks_status().await.1, r#"{"keys":[]}"#);
    sb.set_jwks_fault(JwksFault::Ok);
    assert_eq!(jwks_status().await.0, 200);
    sb.shutdown().await;
}
