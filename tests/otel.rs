//! OpenTelemetry traces over OTLP (issue 19): an OTLP receiver in the test (gRPC
//! `TraceService/Export` and HTTP `POST /v1/traces`, decoded with the OTLP protobuf types)
//! gets a `check` span per Check that continues the caller's W3C `traceparent` through Envoy,
//! with children for identify, route, policy, token (its cache tier) and the audit commit, and no
//! token or claim beyond the user, agent and workspace in any attribute. Sampling follows the
//! parent: an unsampled caller is never exported, a sampled one always is.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use support::*;

const ME: &str = "/api/2.0/preview/scim/v2/Me";

/// Every span received, with its service name.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<(String, Span)>>>);

impl Received {
    fn take(&self, req: ExportTraceServiceRequest) {
        let mut all = self.0.lock().unwrap();
        for rs in req.resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(AnyValue::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    all.push((service.clone(), span));
                }
            }
        }
    }

    fn of_trace(&self, trace: &[u8]) -> Vec<Span> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, s)| s.trace_id == trace)
            .map(|(_, s)| s.clone())
            .collect()
    }

    fn all(&self) -> Vec<(String, Span)> {
        self.0.lock().unwrap().clone()
    }
}

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.take(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn grpc_receiver(received: Received) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(received))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    format!("http://{addr}")
}

async fn http_receiver(received: Received) -> String {
    use axum::routing::post;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route(
        "/v1/traces",
        post(move |body: axum::body::Bytes| {
            let received = received.clone();
            async move {
                match <ExportTraceServiceRequest as prost::Message>::decode(body) {
                    Ok(req) => {
                        received.take(req);
                        (axum::http::StatusCode::OK, Vec::new())
                    }
                    Err(_) => (axum::http::StatusCode::BAD_REQUEST, Vec::new()),
                }
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| match &v.value {
            Some(AnyValue::StringValue(s)) => Some(s.clone()),
            Some(AnyValue::IntValue(i)) => Some(i.to_string()),
            Some(AnyValue::BoolValue(b)) => Some(b.to_string()),
            _ => None,
        })
}

async fn get_traced(stack: &Stack, bearer: &str, traceparent: &str) -> u16 {
    http()
        .get(format!("{}{ME}", stack.envoy_url()))
        .bearer_auth(bearer)
        .header("traceparent", traceparent)
        .send()
        .await
        .expect("request")
        .status()
        .as_u16()
}

/// Stops aegis with SIGTERM, which flushes the exporter, and starts it again.
async fn flush(stack: &mut Stack) {
    stack.aegis.terminate(Duration::from_secs(15)).await;
}

fn set_tracing(stack: &mut Stack, endpoint: &str, protocol: &str, ratio: f64) {
    let (endpoint, protocol) = (endpoint.to_string(), protocol.to_string());
    stack
        .update_config(move |c| {
            let mut t = toml::Table::new();
            t.insert("otlp_endpoint".into(), endpoint.into());
            t.insert("protocol".into(), protocol.into());
            t.insert("sample_ratio".into(), ratio.into());
            t.insert("service_name".into(), "aegis-test".into());
            c.insert("tracing".into(), t.into());
        })
        .expect("config");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_are_traced_over_otlp_grpc_and_http_continuing_the_callers_trace() {
    let grpc = Received::default();
    let http_rx = Received::default();
    let grpc_url = grpc_receiver(grpc.clone()).await;
    let http_url = http_receiver(http_rx.clone()).await;
    let mut stack = start().await;
    let alice = token(&stack, "alice");

    // --- OTLP/gRPC, everything sampled ---
    set_tracing(&mut stack, &grpc_url, "grpc", 1.0);
    stack.aegis.restart().await.expect("aegis restarts");
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let tp = format!("00-{trace}-{parent}-01");
    assert_eq!(get_traced(&stack, &alice, &tp).await, 200);
    flush(&mut stack).await;
    let spans = grpc.of_trace(&hex::decode(trace).unwrap());
    let check = spans
        .iter()
        .find(|s| s.name == "check")
        .unwrap_or_else(|| panic!("no check span in the caller's trace: {spans:?}"));
    assert_eq!(
        check.parent_span_id,
        hex::decode(parent).unwrap(),
        "the check span continues the caller's span"
    );
    assert_eq!(attr(check, "user").as_deref(), Some("alice@example.com"));
    assert_eq!(attr(check, "agent").as_deref(), Some("copilot"));
    assert_eq!(attr(check, "workspace").as_deref(), Some("sandbox"));
    assert_eq!(attr(check, "decision").as_deref(), Some("allow"));
    for step in ["identify", "route", "policy", "token", "audit_commit"] {
        let s = spans
            .iter()
            .find(|s| s.name == step)
            .unwrap_or_else(|| panic!("no {step} span: {spans:?}"));
        assert_eq!(
            s.parent_span_id, check.span_id,
            "{step} is a child of check"
        );
    }
    let token_span = spans.iter().find(|s| s.name == "token").unwrap();
    assert!(
        matches!(
            attr(token_span, "cache").as_deref(),
            Some("mint" | "l1" | "l2")
        ),
        "{token_span:?}"
    );
    // No token, nor any other claim, in any exported attribute.
    let everything = format!("{:?}", grpc.all());
    for secret in [alice.as_str(), "Bearer", "eyJ"] {
        assert!(!everything.contains(secret), "{secret:?} was exported");
    }
    assert!(grpc.all().iter().all(|(svc, _)| svc == "aegis-test"));

    // --- OTLP/HTTP (protobuf), sampling off for new traces: the parent decides ---
    set_tracing(&mut stack, &http_url, "http", 0.0);
    stack.aegis.restart().await.expect("aegis restarts");
    let sampled = "0af7651916cd43dd8448eb211c80319c";
    let unsampled = "5b8aa5a2d2c872e8321cf37308d69df2";
    assert_eq!(
        get_traced(&stack, &alice, &format!("00-{sampled}-b7ad6b7169203331-01")).await,
        200
    );
    assert_eq!(
        get_traced(
            &stack,
            &alice,
            &format!("00-{unsampled}-b7ad6b7169203331-00")
        )
        .await,
        200
    );
    // No traceparent at all: a new trace, sampled at ratio 0, never exported.
    assert_eq!(get(&stack, ME, Some(&alice)).await.status, 200);
    flush(&mut stack).await;
    let spans = http_rx.of_trace(&hex::decode(sampled).unwrap());
    assert!(
        spans.iter().any(|s| s.name == "check") && spans.iter().any(|s| s.name == "token"),
        "a sampled parent is followed: {spans:?}"
    );
    assert!(http_rx
        .of_trace(&hex::decode(unsampled).unwrap())
        .is_empty());
    let checks = http_rx
        .all()
        .iter()
        .filter(|(_, s)| s.name == "check")
        .count();
    assert_eq!(checks, 1, "only the sampled parent's Check was exported");

    stack.aegis.restart().await.expect("aegis restarts");
    stack.shutdown().await;
}
