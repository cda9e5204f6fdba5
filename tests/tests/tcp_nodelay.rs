//! Every listener sets `TCP_NODELAY` on the connections it accepts (issue 13): without it,
//! Nagle's algorithm and a client's delayed ACK stalled each answer to a client that waits for
//! one answer before its next request (44 ms per gRPC call from Python grpcio). Checked on the
//! server's socket itself, without timing anything: the figures come from `bench-api`
//! (docs/benchmarks.md).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use switchboard_tests::{TestEnv, accepted_connection_has_nodelay};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Connects to `address`, sends `request` (nothing if empty) and waits for the first bytes of
/// the answer: by then the server has accepted and configured the connection.
async fn connect_and_await_answer(address: SocketAddr, request: &[u8]) -> anyhow::Result<TcpStream> {
    let mut stream = TcpStream::connect(address).await?;
    stream.write_all(request).await?;
    let mut first_bytes = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut first_bytes))
        .await
        .context("no answer from the server")??;
    anyhow::ensure!(read > 0, "the server closed the connection without answering");
    Ok(stream)
}

const HTTP1_REQUEST: &[u8] = b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n";
/// The HTTP/2 connection preface and an empty SETTINGS frame, as a gRPC client opens with; the
/// server answers with its own SETTINGS.
const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_api_sets_tcp_nodelay_on_accepted_connections() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let url = env.start_api_server().await?;
    switchboard_tests::connect_channel(&url).await?;
    let address: SocketAddr = url.trim_start_matches("http://").parse()?;
    let connection = connect_and_await_answer(address, HTTP2_PREFACE).await?;
    assert!(accepted_connection_has_nodelay(&connection)?);
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_http_and_smtp_set_tcp_nodelay_on_accepted_connections() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let bound = env.start_ingest_with(switchboard_ingest::secrets::Secrets::default(), true).await?;
    let http_connection = connect_and_await_answer(bound.http, HTTP1_REQUEST).await?;
    assert!(accepted_connection_has_nodelay(&http_connection)?, "ingest http");
    // The SMTP server speaks first (its 220 greeting).
    let smtp_connection = connect_and_await_answer(bound.smtp.context("smtp not bound")?, b"").await?;
    assert!(accepted_connection_has_nodelay(&smtp_connection)?, "smtp");
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_sets_tcp_nodelay_on_accepted_connections() -> anyhow::Result<()> {
    // `serve_metrics` binds the address it is given: take a free port, then let it bind it.
    let address = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    tokio::spawn(switchboard_runtime::metrics_http::serve_metrics(address, String::new));
    let mut attempts = 0;
    let connection = loop {
        match connect_and_await_answer(address, HTTP1_REQUEST).await {
            Ok(connection) => break connection,
            Err(_) if attempts < 300 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(error) => return Err(error.context("metrics endpoint did not come up")),
        }
    };
    assert!(accepted_connection_has_nodelay(&connection)?);
    Ok(())
}
