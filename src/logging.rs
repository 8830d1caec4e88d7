//! JSON structured logs on stderr; level from `AEGIS_LOG` (default `info`). Lines logged while
//! a Check runs carry its `check` span: `trace_id`, and `w3c_trace_id` / `w3c_parent_id` when
//! Envoy sent a `traceparent`.

pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("AEGIS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // The `check` span carries the trace ids (see `authz::Pipeline::check`).
        .with_current_span(true)
        .with_span_list(false)
        .try_init();
}
