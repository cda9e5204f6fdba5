//! The `/metrics` endpoint of services without an HTTP server of their own (router,
//! projector): Prometheus text rendered on each scrape.

use anyhow::Context;

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
    let listener =
        tokio::net::TcpListener::bind(address).await.with_context(|| format!("failed to bind metrics on {address}"))?;
    axum::serve(listener, app).await.context("metrics server failed")
}
