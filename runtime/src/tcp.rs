//! How every service treats an accepted TCP connection: the gRPC API, ingest's HTTP and SMTP
//! listeners and the `/metrics` endpoints all pass each accepted stream to
//! [`configure_accepted_connection`] before serving it.
//!
//! Accepted connections get `TCP_NODELAY`. Without it, Nagle's algorithm holds back a small
//! write while an earlier one is unacknowledged, and a client that delays its ACKs (Linux: up
//! to 40 ms) then stalls each answer. A client that sends one request at a time and waits for
//! each answer paid that on every call (issue 13: 44 ms per `GetConversation` from Python
//! grpcio, against under 1 ms with this option); concurrent callers on one connection hide it.

use tokio::net::TcpStream;

/// Sets the options of an accepted connection (`TCP_NODELAY`). A failure is logged, not
/// returned: the connection still works, only slower (hyper and tonic treat it the same way).
pub fn configure_accepted_connection(stream: &TcpStream) {
    if let Err(error) = stream.set_nodelay(true) {
        tracing::warn!(%error, "failed to set TCP_NODELAY on an accepted connection");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_get_tcp_nodelay() -> std::io::Result<()> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let _client = TcpStream::connect(listener.local_addr()?).await?;
        let (accepted, _) = listener.accept().await?;
        assert!(!accepted.nodelay()?, "Linux accepts connections without TCP_NODELAY");
        configure_accepted_connection(&accepted);
        assert!(accepted.nodelay()?);
        Ok(())
    }
}
