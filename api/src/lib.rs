//! The gRPC API. Requests enter through the [`auth`] interceptor (every Switchboard service is
//! authenticated), are answered from the PostgreSQL read models ([`conversations`],
//! [`workspace`], via [`read`] and the caller's [`scope`]) or published as commands
//! ([`admin`]); every failure leaves through the one mapping in [`error`].
//! [`config_file`] turns the declarative config file into config events.

pub mod access;
pub mod admin;
pub mod auth;
pub mod config_file;
pub mod config_rules;
pub mod conversations;
pub mod error;
pub mod idempotency;
pub mod position;
pub mod read;
pub mod replies;
pub mod scope;
pub mod workspace;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use switchboard_proto::api::v1::admin_service_server::AdminServiceServer;
use switchboard_proto::api::v1::conversation_service_server::ConversationServiceServer;
use switchboard_proto::api::v1::workspace_service_server::WorkspaceServiceServer;
use switchboard_runtime::config_store::ConfigStore;
use switchboard_runtime::publisher::EnvelopePublisher;
use switchboard_runtime::topics::Topics;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::interceptor::InterceptedService;

/// Largest request or response message the API accepts or sends.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// Upper bound on any unary call, whatever deadline the client sets (watch streams excepted:
/// tonic applies this per response future, which for a stream is the stream's opening).
const MAX_CALL_DURATION: Duration = Duration::from_secs(30);

/// Schema of the API's own tables (idempotency records, config versions): not read models,
/// never rebuilt by replay.
const API_SCHEMA: &str = "api";

/// Everything the API needs besides its listener.
pub struct ApiSettings {
    pub pool: PgPool,
    pub authenticator: auth::Authenticator,
    pub brokers: String,
    pub topics: Topics,
    /// C12: mail domain of the fallback addresses new inboxes get
    /// (`runtime::outbound::DEFAULT_FALLBACK_DOMAIN` unless configured).
    pub fallback_email_domain: String,
    /// Whether SendReply may check attachments on loopback and private addresses.
    pub attachment_hosts: switchboard_runtime::attachment_hosts::AttachmentHosts,
}

/// Runs the API's migrations (`api/migrations`) in the `api` schema.
///
/// The API and the projector may share a database, and sqlx records applied migrations in an
/// unqualified `_sqlx_migrations` table: run with `search_path` set to `api`, the API's record is
/// `api._sqlx_migrations`, apart from the projector's in its read-model schema. Databases whose
/// `api` tables predate the migrator start too: the first migration only creates what is missing.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    let options = (*pool.connect_options()).clone().options([("search_path", API_SCHEMA)]);
    // A pool of one (not a bare connection): its future is `Send`, so `serve` stays spawnable.
    let migration_pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .context("failed to connect to postgres for the api migrations")?;
    // The migrator's own table is created before any migration runs, so the schema must exist.
    sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {API_SCHEMA}"))
        .execute(&migration_pool)
        .await
        .context("failed to create the api schema")?;
    let migrated =
        sqlx::migrate!("./migrations").run(&migration_pool).await.context("failed to run the api migrations");
    migration_pool.close().await;
    migrated
}

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    settings: ApiSettings,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let local_addr: SocketAddr = listener.local_addr()?;
    migrate(&settings.pool).await?;
    let (stop_sender, stop) = tokio::sync::watch::channel(false);
    let read = read::ReadModels::start(settings.pool.clone(), stop).await?;
    let config = ConfigStore::start(&settings.brokers, &settings.topics.config, "switchboard-api")
        .await
        .context("failed to read the config topic")?;
    let publisher = EnvelopePublisher::new(&settings.brokers, "switchboard-api", admin::PUBLISH_TIMEOUT)?;
    let outbound = admin::OutboundSettings::new(&settings.fallback_email_domain, settings.attachment_hosts)?;

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<ConversationServiceServer<conversations::Conversations>>().await;
    health_reporter.set_serving::<WorkspaceServiceServer<workspace::Workspace>>().await;
    health_reporter.set_serving::<AdminServiceServer<admin::Admin>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(switchboard_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("failed to build reflection service")?;
    let authenticator = settings.authenticator;
    let conversations = InterceptedService::new(
        ConversationServiceServer::new(conversations::Conversations::new(read.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        authenticator.clone(),
    );
    let workspace = InterceptedService::new(
        WorkspaceServiceServer::new(workspace::Workspace::new(read.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        authenticator.clone(),
    );
    let admin = InterceptedService::new(
        AdminServiceServer::new(admin::Admin::new(read, config, publisher, settings.topics.clone(), outbound))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        authenticator,
    );
    // `Server::tcp_nodelay` applies only to listeners tonic binds itself, so accepted
    // connections are configured here.
    let incoming = futures::StreamExt::inspect(TcpListenerStream::new(listener), |accepted| {
        if let Ok(stream) = accepted {
            switchboard_runtime::tcp::configure_accepted_connection(stream);
        }
    });
    tracing::info!(%local_addr, "api listening");
    let result = tonic::transport::Server::builder()
        // gRPC-Web for browser clients (HTTP/1.1 + CORS-free same-origin or behind a proxy).
        .accept_http1(true)
        .timeout(MAX_CALL_DURATION)
        .layer(tonic_web::GrpcWebLayer::new())
        .trace_fn(|request| tracing::info_span!("grpc", path = %request.uri().path(), user = tracing::field::Empty))
        // Health and reflection stay unauthenticated: load balancers and `grpcurl list` must
        // work without a token, and they disclose no data.
        .add_service(health_service)
        .add_service(reflection)
        .add_service(conversations)
        .add_service(workspace)
        .add_service(admin)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .context("api server failed");
    let _ = stop_sender.send(true);
    result
}
