//! JSON structured logs on stderr; level from `AEGIS_LOG` (default `info`). Lines logged while
//! a Check runs carry its `check` span: `trace_id`, and `w3c_trace_id` / `w3c_parent_id` when
//! Envoy sent a `traceparent`.
//!
//! With `[tracing]` configured, spans are also exported over OTLP (gRPC or HTTP/protobuf): a
//! `check` span per Check, continuing Envoy's W3C `traceparent`, with children for identify,
//! route, policy, token and audit commit (target [`SPANS`], which the log lines leave out). Their
//! attributes name the user, the agent, the workspace, the decision and the reason, never a
//! token or another claim.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use crate::config::{OtlpProtocol, TracingConfig};

/// The target of the spans that exist for trace export only (the Check's steps).
pub const SPANS: &str = "aegis_spans";

static EXPORTING: AtomicBool = AtomicBool::new(false);

/// True when spans are exported (the pipeline then continues Envoy's `traceparent`).
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Flushes exported spans when dropped (at the end of `aegis serve`).
pub struct Telemetry {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

fn env_filter() -> tracing_subscriber::EnvFilter {
    let filter = tracing_subscriber::EnvFilter::try_from_env("AEGIS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // The export-only spans never reach the log lines.
    filter.add_directive(
        format!("{SPANS}=off")
            .parse()
            .unwrap_or_else(|_| unreachable!("a static directive")),
    )
}

fn fmt_layer<S>() -> impl Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_subscriber::fmt::layer()
        .json()
        .with_writer(std::io::stderr)
        // The `check` span carries the trace ids (see `authz::Pipeline::check`).
        .with_current_span(true)
        .with_span_list(false)
}

/// Logs only (every command but `serve` with `[tracing]`).
pub fn init() {
    let _ = tracing_subscriber::registry()
        .with(fmt_layer().with_filter(env_filter()))
        .try_init();
}

/// Logs, and span export when `tracing` is set. Must run inside the Tokio runtime (the batch
/// exporter runs on it).
pub fn init_with(tracing: Option<&TracingConfig>) -> Result<Telemetry, String> {
    let Some(cfg) = tracing else {
        init();
        return Ok(Telemetry { provider: None });
    };
    let timeout = Duration::from_secs(5);
    let exporter = match cfg.protocol {
        OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(cfg.otlp_endpoint.as_str().trim_end_matches('/'))
            .with_timeout(timeout)
            .build(),
        OtlpProtocol::Http => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(
                reqwest::Client::builder()
                    .timeout(timeout)
                    .build()
                    .map_err(|e| format!("tracing: the OTLP HTTP client: {e}"))?,
            )
            .with_endpoint(format!(
                "{}/v1/traces",
                cfg.otlp_endpoint.as_str().trim_end_matches('/')
            ))
            .with_timeout(timeout)
            .build(),
    }
    .map_err(|e| format!("tracing: the OTLP exporter: {e}"))?;
    let processor =
        opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
            exporter,
            opentelemetry_sdk::runtime::Tokio,
        )
        .build();
    let sampler = opentelemetry_sdk::trace::Sampler::ParentBased(Box::new(
        opentelemetry_sdk::trace::Sampler::TraceIdRatioBased(cfg.sample_ratio),
    ));
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_sampler(sampler)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(cfg.service_name.clone())
                .build(),
        )
        .build();
    let tracer = provider.tracer("aegis");
    // Only aegis' own spans are exported: the Check and its steps.
    let exported = tracing_subscriber::filter::Targets::new()
        .with_target("aegis", tracing::Level::INFO)
        .with_target(SPANS, tracing::Level::INFO);
    tracing_subscriber::registry()
        .with(fmt_layer().with_filter(env_filter()))
        .with(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(exported),
        )
        .try_init()
        .map_err(|e| format!("tracing: {e}"))?;
    EXPORTING.store(true, Ordering::Relaxed);
    Ok(Telemetry {
        provider: Some(provider),
    })
}
