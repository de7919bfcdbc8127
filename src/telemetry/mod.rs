//! Observability: metrics, logs, traces, and the health/dependency state. This file holds the
//! W3C trace-context helpers that tie a request's trace to the jobs it creates.

pub(crate) mod health;
pub(crate) mod logs;
pub(crate) mod metrics;
pub(crate) mod traces;

use std::collections::BTreeMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Makes `span` a child of the trace named in the request's `traceparent` header, if any.
pub(crate) fn extract_remote_parent(span: &tracing::Span, headers: &http::HeaderMap) {
    let carrier: BTreeMap<String, String> = ["traceparent", "tracestate"]
        .iter()
        .filter_map(|k| {
            let v = headers.get(*k)?.to_str().ok()?;
            Some((k.to_string(), v.to_string()))
        })
        .collect();
    if !carrier.is_empty() {
        link_to_stored_context(span, &carrier);
    }
}

/// The current span's trace context (`traceparent`, `tracestate`), to store with a job.
pub(crate) fn current_trace_context() -> BTreeMap<String, String> {
    let mut carrier = std::collections::HashMap::new();
    let cx = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.into_iter().collect()
}

/// Makes `span` a child of a stored trace context (a job's spans under the request that
/// created it, also after a restart).
pub(crate) fn link_to_stored_context(span: &tracing::Span, carrier: &BTreeMap<String, String>) {
    if carrier.is_empty() {
        return;
    }
    let carrier: std::collections::HashMap<String, String> = carrier
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let parent = TraceContextPropagator::new().extract(&carrier);
    let _ = span.set_parent(parent);
}
