//! Telemetry, initialised by one function for every binary.
//!
//! - Logs: `tracing` with a human format on a terminal and JSON otherwise (`RUST_LOG` filters).
//! - Traces: every span also becomes an OpenTelemetry span. OTLP export is switched on by the
//!   standard `OTEL_EXPORTER_OTLP_ENDPOINT` variable and is off when it is unset; span and
//!   trace ids exist either way, so trace context always travels in Kafka headers (W3C
//!   `traceparent`) and a message's spans in ingest, router and projector share one trace id.

use std::io::IsTerminal;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
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

/// Makes `span` a child of the trace whose context a consumed record carries (if any).
pub fn adopt_trace_context(span: &tracing::Span, headers: Option<&BorrowedHeaders>) {
    let Some(headers) = headers else { return };
    // Only the two W3C headers matter; they are looked up directly (per record on hot paths:
    // no map of every header, no copies).
    let carrier = W3cHeaderCarrier::from_headers(headers);
    if carrier.traceparent_opt.is_none() {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&carrier);
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// The W3C trace context of one span as header values, computed once and put on every record
/// the span produces (a router input produces one to four outputs). The one way trace context
/// goes onto a produced record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceContextHeaders {
    traceparent_opt: Option<String>,
    tracestate_opt: Option<String>,
}

impl TraceContextHeaders {
    pub fn of(span: &tracing::Span) -> Self {
        let mut headers = TraceContextHeaders::default();
        TraceContextPropagator::new().inject_context(&span.context(), &mut headers);
        headers
    }

    /// Kafka headers holding the trace context, with room for `extra` more.
    pub fn to_kafka_headers(&self, extra: usize) -> OwnedHeaders {
        let mut headers = OwnedHeaders::new_with_capacity(2 + extra);
        if let Some(traceparent) = &self.traceparent_opt {
            headers =
                headers.insert(Header { key: crate::kafka::header::TRACEPARENT, value: Some(traceparent.as_bytes()) });
        }
        if let Some(tracestate) = &self.tracestate_opt {
            headers =
                headers.insert(Header { key: crate::kafka::header::TRACESTATE, value: Some(tracestate.as_bytes()) });
        }
        headers
    }
}

impl Injector for TraceContextHeaders {
    fn set(&mut self, key: &str, value: String) {
        // An empty `tracestate` is legal but useless on every record: leave it out.
        if value.is_empty() {
            return;
        }
        if key.eq_ignore_ascii_case(crate::kafka::header::TRACEPARENT) {
            self.traceparent_opt = Some(value);
        } else if key.eq_ignore_ascii_case(crate::kafka::header::TRACESTATE) {
            self.tracestate_opt = Some(value);
        }
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

/// The W3C trace context headers of a consumed record, borrowed (header names compared
/// case-insensitively, as HTTP's are).
struct W3cHeaderCarrier<'a> {
    traceparent_opt: Option<&'a str>,
    tracestate_opt: Option<&'a str>,
}

impl<'a> W3cHeaderCarrier<'a> {
    fn from_headers(headers: &'a BorrowedHeaders) -> Self {
        let mut carrier = W3cHeaderCarrier { traceparent_opt: None, tracestate_opt: None };
        for header in headers.iter() {
            let Some(value) = header.value.and_then(|value| std::str::from_utf8(value).ok()) else { continue };
            if header.key.eq_ignore_ascii_case(crate::kafka::header::TRACEPARENT) {
                carrier.traceparent_opt = Some(value);
            } else if header.key.eq_ignore_ascii_case(crate::kafka::header::TRACESTATE) {
                carrier.tracestate_opt = Some(value);
            }
        }
        carrier
    }
}

impl Extractor for W3cHeaderCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        if key.eq_ignore_ascii_case(crate::kafka::header::TRACEPARENT) {
            self.traceparent_opt
        } else if key.eq_ignore_ascii_case(crate::kafka::header::TRACESTATE) {
            self.tracestate_opt
        } else {
            None
        }
    }

    fn keys(&self) -> Vec<&str> {
        let mut keys = Vec::with_capacity(2);
        if self.traceparent_opt.is_some() {
            keys.push(crate::kafka::header::TRACEPARENT);
        }
        if self.tracestate_opt.is_some() {
            keys.push(crate::kafka::header::TRACESTATE);
        }
        keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `check` with a subscriber whose spans are OpenTelemetry spans (as `init_telemetry`
    /// sets up, without an exporter).
    fn with_otel_subscriber(check: impl FnOnce()) {
        let provider = SdkTracerProvider::builder().build();
        let subscriber =
            tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, check);
    }

    #[test]
    fn a_span_adopted_from_record_headers_passes_the_trace_on_once_computed() {
        with_otel_subscriber(|| {
            let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
            let consumed = OwnedHeaders::new()
                .insert(Header { key: "sb-event-type", value: Some("inbound_message_received") })
                .insert(Header { key: "TraceParent", value: Some(incoming) })
                .insert(Header { key: "tracestate", value: Some("vendor=value") });
            let span = tracing::info_span!("route");
            adopt_trace_context(&span, Some(consumed.as_borrowed()));

            let once = TraceContextHeaders::of(&span);
            let traceparent = once.traceparent_opt.as_deref().expect("a traceparent");
            assert_eq!(trace_id_from_traceparent(traceparent), trace_id_from_traceparent(incoming));
            assert_ne!(traceparent, incoming, "the route span is a new child span of the incoming one");
            assert_eq!(once.tracestate_opt.as_deref(), Some("vendor=value"));
            // The Kafka headers carry exactly these two values.
            let header_pairs: Vec<(String, Vec<u8>)> = once
                .to_kafka_headers(0)
                .iter()
                .map(|header| (header.key.to_owned(), header.value.unwrap_or_default().to_vec()))
                .collect();
            assert_eq!(
                header_pairs,
                vec![
                    ("traceparent".to_owned(), traceparent.as_bytes().to_vec()),
                    ("tracestate".to_owned(), b"vendor=value".to_vec()),
                ]
            );
        });
    }

    #[test]
    fn records_without_trace_context_start_no_trace_of_theirs() {
        with_otel_subscriber(|| {
            let consumed = OwnedHeaders::new().insert(Header { key: "sb-event-type", value: Some("x") });
            let span = tracing::info_span!("route");
            adopt_trace_context(&span, Some(consumed.as_borrowed()));
            adopt_trace_context(&span, None);
            // The span is a root of its own: still a valid trace context to pass on.
            let headers = TraceContextHeaders::of(&span);
            assert_eq!(headers.traceparent_opt.as_deref().map(str::len), Some(55));
            assert_eq!(headers.tracestate_opt, None);
        });
    }

    #[test]
    fn traceparent_trace_id_is_parsed() {
        let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(trace_id_from_traceparent(header), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_eq!(trace_id_from_traceparent("garbage"), None);
    }
}
