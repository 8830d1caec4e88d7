//! The tonic edge: `envoy.service.auth.v3.Authorization/Check` → pipeline → `CheckResponse`.
//!
//! This layer only translates. It never returns a gRPC error for a decision: every outcome,
//! including internal failures, is an explicit CheckResponse (an OK with header mutations, or a
//! denial with an HTTP status, a JSON body and `x-aegis-trace-id`).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use envoy_types::ext_authz::v3::pb::{
    Authorization, CheckRequest, CheckResponse, HeaderAppendAction, HttpStatusCode,
};
use envoy_types::ext_authz::v3::{
    CheckResponseExt, DeniedHttpResponseBuilder, OkHttpResponseBuilder,
};
use tonic::{Request, Response, Status};

use crate::authz::{prm, Audit, CheckInput, Decision, Deny, Identify, Pipeline, Reason, Tokens};

pub struct AuthzService<I, T, A> {
    pipeline: Arc<Pipeline<I, T, A>>,
}

impl<I, T, A> AuthzService<I, T, A> {
    pub fn new(pipeline: Arc<Pipeline<I, T, A>>) -> Self {
        AuthzService { pipeline }
    }
}

#[tonic::async_trait]
impl<I: Identify, T: Tokens, A: Audit> Authorization for AuthzService<I, T, A> {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let req = request.into_inner();
        Ok(Response::new(check(&self.pipeline, &req).await))
    }
}

/// Runs one CheckRequest through the pipeline.
pub async fn check<I: Identify, T: Tokens, A: Audit>(
    pipeline: &Pipeline<I, T, A>,
    req: &CheckRequest,
) -> CheckResponse {
    let attrs = req.attributes.as_ref();
    let http = attrs
        .and_then(|a| a.request.as_ref())
        .and_then(|r| r.http.as_ref());
    let Some(http) = http else {
        // Not an HTTP check: nothing to decide on, so refuse.
        return respond(Decision::Deny(Deny {
            trace_id: crate::authz::TraceId::random(),
            reason: Reason::BadRequest,
            retry_after: None,
            consent_url: None,
            jsonrpc_id: None,
        }));
    };
    let headers: Cow<'_, HashMap<String, String>> = if http.headers.is_empty() {
        Cow::Owned(raw_headers(http))
    } else {
        Cow::Borrowed(&http.headers)
    };
    let context_workspace = attrs
        .and_then(|a| a.context_extensions.get("workspace"))
        .map(String::as_str);
    // RFC 9728 metadata for MCP clients: answered here, needs no credentials.
    let policy = pipeline.policy();
    if let Some(doc) = prm::document(
        &http.method,
        &http.path,
        &http.scheme,
        &http.host,
        policy.authorization_servers(),
    ) {
        return metadata_response(doc);
    }
    let input = CheckInput {
        method: &http.method,
        path: &http.path,
        authority: &http.host,
        headers: &headers,
        context_workspace,
        // Envoy's `x-request-id` (what its access log and the client see); `http.id` is only
        // Envoy's internal stream id.
        request_id: headers
            .get("x-request-id")
            .map(String::as_str)
            .unwrap_or(&http.id),
        // Envoy sends the body only on routes set up for it (`with_request_body`), as raw
        // bytes with `pack_as_bytes`, else as UTF-8 text.
        body: if !http.raw_body.is_empty() {
            Some(&http.raw_body)
        } else if !http.body.is_empty() {
            Some(http.body.as_bytes())
        } else {
            None
        },
    };
    let decision = pipeline.check(&input).await;
    if let Decision::Deny(d) = &decision {
        if d.reason == Reason::PathBlocked && crate::policy::is_oauth_token_endpoint(&http.path) {
            return oauth_error_response(d);
        }
        if let Some(id) = &d.jsonrpc_id {
            return jsonrpc_error_response(d, id);
        }
    }
    let resource_metadata = match &decision {
        Decision::Deny(d) if d.reason.is_credential_problem() => {
            prm::metadata_url(&http.path, &http.scheme, &http.host)
        }
        _ => None,
    };
    let phrase = match &decision {
        Decision::Deny(d) if crate::policy::is_sql_endpoint(&http.path) => Some(reason_phrase(d)),
        _ => None,
    };
    let mut resp = respond_with(decision, resource_metadata.as_deref());
    if let Some(phrase) = phrase {
        add_denied_header(&mut resp, "x-databricks-reason-phrase", phrase);
    }
    resp
}

/// On the SQL endpoint a deny also names its reason in `x-databricks-reason-phrase`, the only
/// header `databricks-sql-connector` shows from a refused HTTP call, so the agent sees the
/// reason code and the trace id rather than "Error during request to server". Fixed text only:
/// the code, its message and the trace id.
fn reason_phrase(deny: &Deny) -> String {
    format!(
        "{}: {} (trace_id {})",
        deny.reason.code(),
        deny.reason.message(),
        deny.trace_id
    )
}

/// Adds a header to a denied response (no-op on an allow).
fn add_denied_header(resp: &mut CheckResponse, key: &str, value: String) {
    use envoy_types::ext_authz::v3::pb::HttpResponse;
    let Some(HttpResponse::DeniedResponse(denied)) = resp.http_response.as_mut() else {
        return;
    };
    denied.headers.push(
        envoy_types::pb::envoy::config::core::v3::HeaderValueOption {
            header: Some(envoy_types::pb::envoy::config::core::v3::HeaderValue {
                key: key.into(),
                value,
                ..Default::default()
            }),
            append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
            ..Default::default()
        },
    );
}

/// The Protected Resource Metadata document as a direct 200 answer (a denied response with
/// status 200 is how ext_authz answers a request itself).
fn metadata_response(doc: String) -> CheckResponse {
    let trace = crate::authz::TraceId::random();
    let mut d = DeniedHttpResponseBuilder::new();
    d.set_http_status(HttpStatusCode::Ok)
        .add_header("content-type", "application/json", OVERWRITE, false)
        .add_header("cache-control", "no-cache", OVERWRITE, false)
        .add_header("x-aegis-trace-id", trace.as_str(), OVERWRITE, false)
        .set_body(doc);
    let mut resp = CheckResponse::with_status(Status::permission_denied("resource_metadata"));
    resp.set_http_response(d);
    resp
}

/// A refused MCP message, answered as MCP clients show it: HTTP 200 with a JSON-RPC error that
/// carries the message's id, the reason code and the trace id. The audit row and the metrics
/// still say what the reason is (a DENY row), and nothing reaches the workspace.
fn jsonrpc_error_response(deny: &Deny, id: &serde_json::Value) -> CheckResponse {
    let trace = deny.trace_id.as_str();
    let body = serde_json::json!({
        "jsonrpc": "2.0",
        "id": id,
        "error": {
            // JSON-RPC's server-error range; the reason code is in `data`.
            "code": -32001,
            "message": format!("{} ({})", deny.reason.message(), deny.reason.code()),
            "data": { "reason": deny.reason.code(), "trace_id": trace },
        },
    });
    let mut d = DeniedHttpResponseBuilder::new();
    d.set_http_status(HttpStatusCode::Ok)
        .add_header("content-type", "application/json", OVERWRITE, false)
        .add_header("cache-control", "no-store", OVERWRITE, false)
        .add_header("x-aegis-trace-id", trace, OVERWRITE, false)
        .set_body(body.to_string());
    let mut resp = CheckResponse::with_status(Status::permission_denied(deny.reason.code()));
    resp.set_http_response(d);
    resp
}

/// A blocked OAuth token endpoint, answered the way an OAuth authorization server refuses a
/// grant (RFC 6749 section 5.2): `databricks-sql-connector` posts a token exchange there on its
/// own and only falls back to the IdP token after a delay unless it gets an OAuth error at once.
/// The audit row and the metrics still say `path_blocked`.
///
/// Status 400, not the 403 of other policy denials: section 5.2 answers every error but
/// `invalid_client` with 400 Bad Request, and `unauthorized_client` ("the client is not
/// authorized to use this authorization grant type") is what this is.
fn oauth_error_response(deny: &Deny) -> CheckResponse {
    let trace = deny.trace_id.as_str();
    let body = serde_json::json!({
        "error": "unauthorized_client",
        "error_description": OAUTH_BLOCKED_DESCRIPTION,
        "trace_id": trace,
    });
    let mut d = DeniedHttpResponseBuilder::new();
    d.set_http_status(HttpStatusCode::BadRequest)
        .add_header("content-type", "application/json", OVERWRITE, false)
        .add_header("cache-control", "no-store", OVERWRITE, false)
        .add_header("pragma", "no-cache", OVERWRITE, false)
        .add_header("x-aegis-trace-id", trace, OVERWRITE, false)
        .set_body(body.to_string());
    let mut resp = CheckResponse::with_status(Status::permission_denied(deny.reason.code()));
    resp.set_http_response(d);
    resp
}

/// The fixed `error_description` of a blocked OAuth token endpoint.
const OAUTH_BLOCKED_DESCRIPTION: &str = "agents may not obtain Databricks tokens through the \
    gateway; send the identity provider token with each request instead";

/// Headers from `header_map` (when Envoy sends raw headers), lower-cased and comma-joined the
/// way the `headers` map would hold them.
fn raw_headers(
    http: &envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest,
) -> HashMap<String, String> {
    let mut out: HashMap<String, String> = HashMap::new();
    if let Some(map) = &http.header_map {
        for h in &map.headers {
            let value = if h.raw_value.is_empty() {
                h.value.clone()
            } else {
                String::from_utf8_lossy(&h.raw_value).into_owned()
            };
            out.entry(h.key.to_ascii_lowercase())
                .and_modify(|v| {
                    v.push(',');
                    v.push_str(&value);
                })
                .or_insert(value);
        }
    }
    out
}

const OVERWRITE: Option<HeaderAppendAction> = Some(HeaderAppendAction::OverwriteIfExistsOrAdd);

/// Turns a decision into Envoy's response.
pub fn respond(decision: Decision) -> CheckResponse {
    respond_with(decision, None)
}

/// Same, with the RFC 9728 metadata URL to name in a 401's challenge (MCP paths).
pub fn respond_with(decision: Decision, resource_metadata: Option<&str>) -> CheckResponse {
    match decision {
        Decision::Allow(allow) => {
            let trace = allow.trace_id.as_str();
            let mut ok = OkHttpResponseBuilder::new();
            let mut bearer = String::with_capacity(7 + allow.token.token.expose().len());
            bearer.push_str("Bearer ");
            bearer.push_str(allow.token.token.expose());
            ok.add_header("authorization", bearer, OVERWRITE, false)
                .add_header("x-aegis-trace-id", trace, OVERWRITE, false)
                .add_header("user-agent", allow.user_agent, OVERWRITE, false)
                .add_response_header("x-aegis-trace-id", trace, OVERWRITE, false);
            for h in allow.remove_headers {
                ok.remove_header(h);
            }
            let mut resp = CheckResponse::with_status(Status::ok(""));
            resp.set_http_response(ok);
            resp
        }
        Decision::Deny(deny) => {
            let reason = deny.reason;
            let trace = deny.trace_id.as_str();
            let mut d = DeniedHttpResponseBuilder::new();
            d.set_http_status(status_code(reason.status()))
                .add_header("content-type", "application/json", OVERWRITE, false)
                .add_header("cache-control", "no-store", OVERWRITE, false)
                .add_header("x-aegis-trace-id", trace, OVERWRITE, false);
            if reason.is_credential_problem() {
                d.add_header(
                    "www-authenticate",
                    www_authenticate(reason, resource_metadata),
                    OVERWRITE,
                    false,
                );
            }
            if let Some(secs) = deny.retry_after {
                d.add_header("retry-after", secs.to_string(), OVERWRITE, false);
            }
            d.set_body(deny_body(reason, trace, deny.consent_url.as_deref()));
            let status = if reason.status() == 401 {
                Status::unauthenticated(reason.code())
            } else {
                Status::permission_denied(reason.code())
            };
            let mut resp = CheckResponse::with_status(status);
            resp.set_http_response(d);
            resp
        }
    }
}

/// `{"error": "<reason>", "message": "<human text>", "trace_id": "<id>"}`, plus
/// `"consent_url"` on a `consent_required` deny that has one.
pub fn deny_body(reason: Reason, trace_id: &str, consent_url: Option<&str>) -> String {
    let mut body = serde_json::json!({
        "error": reason.code(),
        "message": reason.message(),
        "trace_id": trace_id,
    });
    if let (Reason::ConsentRequired, Some(url)) = (reason, consent_url) {
        body["consent_url"] = serde_json::Value::String(url.to_string());
    }
    body.to_string()
}

/// RFC 6750 challenge, with RFC 9728 `resource_metadata` when given.
fn www_authenticate(reason: Reason, resource_metadata: Option<&str>) -> String {
    let mut challenge = match reason {
        Reason::MissingCredentials => "Bearer realm=\"aegis\"".to_string(),
        Reason::TokenExpired | Reason::InvalidToken | Reason::UntrustedIssuer => format!(
            "Bearer realm=\"aegis\", error=\"invalid_token\", error_description=\"{}\"",
            reason.code()
        ),
        other => format!("Bearer realm=\"aegis\", error=\"{}\"", other.code()),
    };
    if let Some(url) = resource_metadata {
        challenge.push_str(", resource_metadata=\"");
        challenge.push_str(url);
        challenge.push('"');
    }
    challenge
}

fn status_code(status: u16) -> HttpStatusCode {
    match status {
        400 => HttpStatusCode::BadRequest,
        401 => HttpStatusCode::Unauthorized,
        403 => HttpStatusCode::Forbidden,
        429 => HttpStatusCode::TooManyRequests,
        _ => HttpStatusCode::ServiceUnavailable,
    }
}
