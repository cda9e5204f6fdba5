//! The `/metrics` endpoint of services without an HTTP server of their own (router,
//! projector): Prometheus text rendered on each scrape (see [`crate::metrics`]).

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
            async move { metrics_response(render()) }
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

/// The answer to a scrape: `text` (from [`crate::metrics::render`]) with its content type. Also
/// used by ingest, which serves `/metrics` on its own HTTP server.
pub fn metrics_response(text: String) -> impl axum::response::IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text)
}
