//! The `/metrics` endpoint of services without an HTTP server of their own (router,
//! projector): Prometheus text rendered on each scrape.

use anyhow::Context;
use axum::serve::ListenerExt as _;

/// Serves `GET /metrics` with whatever `render` returns, until the process ends.
pub async fn serve_metrics<Render>(address: std::net::SocketAddr, render: Render) -> anyhow::Result<()>
where
    Render: Fn() -> String + Clone + Send + Sync + 'static,
{
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let render = render.clone();
            async move { ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], render()) }
        }),
    );
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("failed to bind metrics on {address}"))?
        .tap_io(|stream| crate::tcp::configure_accepted_connection(stream));
    axum::serve(listener, app).await.context("metrics server failed")
}

/// Serves `/metrics` in the background. The service goes on without the endpoint if it stops
/// (e.g. its port is taken): metrics are not worth an outage, so the failure is logged only.
pub fn spawn_metrics_server<Render>(address: std::net::SocketAddr, render: Render)
where
    Render: Fn() -> String + Clone + Send + Sync + 'static,
{
    tokio::spawn(async move {
        if let Err(error) = serve_metrics(address, render).await {
            tracing::error!(error = format!("{error:#}"), "metrics endpoint stopped");
        }
    });
}

/// Appends one unlabelled metric with its `HELP` and `TYPE` lines (`kind`: counter, gauge).
pub fn write_metric(out: &mut String, kind: &str, name: &str, help: &str, value: impl std::fmt::Display) {
    use std::fmt::Write as _;
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
}

/// Appends a labelled metric: its `HELP` and `TYPE` lines, then one sample per `(labels,
/// value)`, labels written as Prometheus expects them inside braces (`partition="3"`).
pub fn write_labelled<Value: std::fmt::Display>(
    out: &mut String,
    kind: &str,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (String, Value)>,
) {
    use std::fmt::Write as _;
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{{{labels}}} {value}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_written_in_the_prometheus_text_format() {
        let mut out = String::new();
        write_metric(&mut out, "counter", "a_total", "As seen.", 3);
        write_labelled(&mut out, "gauge", "b", "Bs by partition.", [("partition=\"1\"".to_string(), 0.5)]);
        assert_eq!(
            out,
            "# HELP a_total As seen.\n# TYPE a_total counter\na_total 3\n\
             # HELP b Bs by partition.\n# TYPE b gauge\nb{partition=\"1\"} 0.5\n"
        );
    }
}
