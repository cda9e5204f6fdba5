//! The gRPC API. Requests enter in [`service`], are answered from the PostgreSQL read models,
//! and every failure leaves through the one mapping in [`error`].
//! [`config_file`] turns the declarative config file into config events (until the admin API).

pub mod config_file;
pub mod error;
pub mod service;

use std::net::SocketAddr;

use anyhow::Context;
use sqlx::PgPool;
use switchboard_proto::api::v1::conversation_service_server::ConversationServiceServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

/// Largest request or response message the API accepts or sends.
const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    pool: PgPool,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let local_addr: SocketAddr = listener.local_addr()?;
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<ConversationServiceServer<service::Conversations>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(switchboard_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("failed to build reflection service")?;
    let conversations = ConversationServiceServer::new(service::Conversations::new(pool))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    tracing::info!(%local_addr, "api listening");
    tonic::transport::Server::builder()
        .trace_fn(|request| tracing::info_span!("grpc", path = %request.uri().path()))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(conversations)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
        .context("api server failed")
}
