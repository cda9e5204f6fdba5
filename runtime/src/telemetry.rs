//! Telemetry, initialised by one function for every binary.
//!
//! - Logs: `tracing` with a human format on a terminal and JSON otherwise (`RUST_LOG` filters).
//! - Traces: every span also becomes an OpenTelemetry span. OTLP export is switched on by the
//!   standard `OTEL_EXPORTER_OTLP_ENDPOINT` variable and is off when it is unset; span and
//!   trace ids exist either way, so trace context always travels in Kafka headers (W3C
//!   `traceparent`) and a message's spans in ingest, router and projector share one trace id.

use std::collections::HashMap;
use std::io::IsTerminal;

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use rdkafka::message::{BorrowedHeaders, Header, Headers, OwnedHeaders};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Keeps the tracer provider alive; dropping it flushes pending spans to the exporter.
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        let _ = self.provider.shutdown();
    }
}

/// Sets up logging and tracing for a binary. Call once, first thing in `main`.
/// Within one process (integration tests run several services) later calls are no-ops for the
/// subscriber, and return a guard of their own provider.
pub fn init_telemetry(service_name: &'static str) -> anyhow::Result<TelemetryGuard> {
    let mut provider_builder = SdkTracerProvider::builder()
        .with_resource(opentelemetry_sdk::Resource::builder().with_service_name(service_name).build());
    if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_some_and(|endpoint| !endpoint.is_empty()) {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
            .map_err(|error| anyhow::anyhow!("failed to create otlp span exporter: {error}"))?;
        provider_builder = provider_builder.with_batch_exporter(exporter);
    }
    let provider = provider_builder.build();
    let tracer = provider.tracer(service_name);

    // RUST_LOG filters what is logged; spans are always recorded for tracing (at info level
    // and above) so that trace context keeps flowing through Kafka headers whatever the log
    // level is.
    let log_filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,rdkafka=warn,sqlx=warn,h2=warn"));
    let otel_layer = tracing_opentelemetry::layer().with_tracer(tracer).with_filter(LevelFilter::INFO);
    let registry = tracing_subscriber::registry().with(otel_layer);
    let init_result = if std::io::stderr().is_terminal() {
        registry.with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(log_filter)).try_init()
    } else {
        registry
            .with(tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr).with_filter(log_filter))
            .try_init()
    };
    if init_result.is_ok() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        opentelemetry::global::set_tracer_provider(provider.clone());
    }
    Ok(TelemetryGuard { provider })
}

/// W3C trace context of the current span, as Kafka headers to put on a produced record.
pub fn trace_context_headers(span: &tracing::Span) -> OwnedHeaders {
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    // An empty `tracestate` is legal but useless on every record: leave it out.
    carrier.into_iter().filter(|(_, value)| !value.is_empty()).fold(OwnedHeaders::new(), |headers, (key, value)| {
        headers.insert(Header { key: &key, value: Some(value.as_bytes()) })
    })
}

/// Makes `span` a child of the trace whose context a consumed record carries (if any).
pub fn adopt_trace_context(span: &tracing::Span, headers: Option<&BorrowedHeaders>) {
    let Some(headers) = headers else { return };
    let carrier = KafkaHeaderCarrier::new(headers);
    let parent = TraceContextPropagator::new().extract(&carrier);
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// The trace id of `span` as 32 hex digits (empty if it has none).
pub fn trace_id_of(span: &tracing::Span) -> String {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    if span_context.is_valid() { span_context.trace_id().to_string() } else { String::new() }
}

/// Trace id carried by a W3C `traceparent` header value (`00-<trace id>-<span id>-<flags>`).
pub fn trace_id_from_traceparent(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let _version = parts.next()?;
    let trace_id = parts.next()?;
    (trace_id.len() == 32).then_some(trace_id)
}

struct KafkaHeaderCarrier {
    values: HashMap<String, String>,
}

impl KafkaHeaderCarrier {
    fn new(headers: &BorrowedHeaders) -> Self {
        let values = headers
            .iter()
            .filter_map(|header| {
                let value = std::str::from_utf8(header.value?).ok()?;
                Some((header.key.to_ascii_lowercase(), value.to_owned()))
            })
            .collect();
        KafkaHeaderCarrier { values }
    }
}

impl Extractor for KafkaHeaderCarrier {
    fn get(&self, key: &str) -> Option<&str> {
        self.values.get(&key.to_ascii_lowercase()).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.values.keys().map(String::as_str).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_trace_id_is_parsed() {
        let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(trace_id_from_traceparent(header), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_eq!(trace_id_from_traceparent("garbage"), None);
    }
}
