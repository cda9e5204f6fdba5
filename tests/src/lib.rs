//! Black-box harness for tests against the real stack (Kafka + PostgreSQL started by
//! `scripts/stack up`): every test gets its own topic prefix, consumer groups and database, runs
//! the real services (in-process, or as child processes where a test kills them), and talks to
//! them only through their public interfaces (HTTP, gRPC, Kafka topics).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Headers;
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use switchboard_proto::api::v1::conversation_service_client::ConversationServiceClient;
use switchboard_proto::events::v1::Envelope;
use switchboard_runtime::config_store::ConfigStore;
use switchboard_runtime::topics::{Topics, ensure_topics};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub mod api_seed;
pub mod demo;
pub mod router_fixtures;

/// HS256 secret of the API started by tests (and by scripts/demo, see `API_JWT_SECRET`).
pub const TEST_JWT_SECRET: &str = "switchboard-demo-secret-not-for-production-use";

/// Adds `authorization: Bearer <token>` to every call of a client.
#[derive(Clone)]
pub struct BearerToken(MetadataValue<Ascii>);

impl BearerToken {
    pub fn new(token: &str) -> anyhow::Result<BearerToken> {
        Ok(BearerToken(format!("Bearer {token}").parse().context("token is not valid metadata")?))
    }

    /// A token signed with [`TEST_JWT_SECRET`] for `identity`, valid for a day.
    pub fn for_identity(identity: &switchboard_api::auth::Identity) -> anyhow::Result<BearerToken> {
        let token =
            switchboard_api::auth::mint_token(TEST_JWT_SECRET.as_bytes(), identity, Duration::from_secs(86_400))?;
        BearerToken::new(&token)
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        request.metadata_mut().insert("authorization", self.0.clone());
        Ok(request)
    }
}

/// An authenticated ConversationService client.
pub type ApiClient = ConversationServiceClient<InterceptedService<Channel, BearerToken>>;

/// The identity the harness's API clients use unless a test asks for another: an admin of the
/// demo account (admins read every inbox, I3).
pub fn demo_admin() -> switchboard_api::auth::Identity {
    switchboard_api::auth::Identity {
        user_id: "demo-admin".into(),
        account_id: "demo".into(),
        role: switchboard_api::auth::Role::Admin,
        team_ids: Vec::new(),
    }
}

/// The demo config (one chat channel round-robining among ana, bo and cy).
pub const DEMO_CONFIG: &str = include_str!("../../deploy/demo-config.toml");

fn required_env(name: &str) -> anyhow::Result<String> {
    std::env::var(name)
        .with_context(|| format!("{name} is not set: run the tests with scripts/test (it starts the stack)"))
}

/// One isolated environment on the shared stack.
pub struct TestEnv {
    pub brokers: String,
    pub topics: Topics,
    pub database_url: String,
    pub pool: PgPool,
    /// Set when the test ends: stops in-process services.
    shutdown: Arc<AtomicBool>,
    shutdown_sender: tokio::sync::watch::Sender<bool>,
}

impl TestEnv {
    /// Fresh topics (random prefix) and a fresh database with the read-model schema.
    pub async fn new() -> anyhow::Result<TestEnv> {
        static TELEMETRY: std::sync::Once = std::sync::Once::new();
        // The guard shuts the tracer provider down when dropped; the test process keeps it.
        TELEMETRY.call_once(|| std::mem::forget(switchboard_runtime::telemetry::init_telemetry("switchboard-tests")));
        let brokers = required_env("KAFKA_BROKERS")?;
        let admin_url = required_env("DATABASE_URL")?;
        let unique = uuid::Uuid::now_v7().simple().to_string();
        let suffix = &unique[unique.len() - 12..];
        let topics = Topics::with_prefix(&format!("test.{suffix}."));
        ensure_topics(&brokers, &topics).await?;

        let database = format!("sb_test_{suffix}");
        let admin_pool = PgPoolOptions::new()
            .max_connections(1)
            .connect(&admin_url)
            .await
            .context("failed to connect to postgres")?;
        sqlx::query(&format!("CREATE DATABASE {database}"))
            .execute(&admin_pool)
            .await
            .context("failed to create test database")?;
        admin_pool.close().await;
        let database_url = replace_database(&admin_url, &database);
        let pool = PgPoolOptions::new().max_connections(8).connect(&database_url).await?;
        switchboard_projector::migrate(&pool).await?;
        let (shutdown_sender, _) = tokio::sync::watch::channel(false);
        Ok(TestEnv { brokers, topics, database_url, pool, shutdown: Arc::default(), shutdown_sender })
    }

    /// Publishes a config file (TOML) to this environment's config topic.
    pub async fn apply_config(&self, toml: &str) -> anyhow::Result<()> {
        let file = switchboard_api::config_file::ConfigFile::parse(toml)?;
        let current = ConfigStore::start(&self.brokers, &self.topics.config, "test-config").await?;
        switchboard_api::config_file::apply_config(&self.brokers, &self.topics.config, &file, &current.snapshot())
            .await?;
        Ok(())
    }

    pub async fn config_store(&self, client_id: &str) -> anyhow::Result<ConfigStore> {
        ConfigStore::start(&self.brokers, &self.topics.config, client_id).await
    }

    /// Starts ingest in-process; returns its base URL.
    pub async fn start_ingest(&self) -> anyhow::Result<String> {
        let config = self.config_store("test-ingest").await?;
        let settings = switchboard_ingest::IngestSettings {
            max_body_bytes: 64 * 1024,
            delivery_timeout: Duration::from_secs(10),
            ..switchboard_ingest::IngestSettings::new("127.0.0.1:0".parse()?, &self.brokers, &self.topics.inbound)
        };
        self.serve_ingest(settings, config).await
    }

    /// Serves ingest in-process until the environment shuts down; returns its base URL.
    async fn serve_ingest(
        &self,
        settings: switchboard_ingest::IngestSettings,
        config: ConfigStore,
    ) -> anyhow::Result<String> {
        let (bound_sender, bound) = tokio::sync::oneshot::channel();
        let mut shutdown = self.shutdown_sender.subscribe();
        tokio::spawn(switchboard_ingest::serve(settings, config, bound_sender, async move {
            let _ = shutdown.changed().await;
        }));
        let address: SocketAddr = bound.await.context("ingest did not start")?;
        Ok(format!("http://{address}"))
    }

    /// Starts ingest in-process with its chat widget reading open-conversation counts (C5) from
    /// `database_url` every 100 ms (as `DATABASE_URL` makes the binary do every second); returns
    /// its base URL.
    pub async fn start_ingest_reading_workload(&self, database_url: &str) -> anyhow::Result<String> {
        let config = self.config_store("test-ingest").await?;
        let settings = switchboard_ingest::IngestSettings {
            max_body_bytes: 64 * 1024,
            workload_opt: Some(switchboard_ingest::workload::WorkloadSettings {
                database_url: database_url.to_owned(),
                refresh_interval: Duration::from_millis(100),
                stale_after: Duration::from_secs(2),
            }),
            ..switchboard_ingest::IngestSettings::new("127.0.0.1:0".parse()?, &self.brokers, &self.topics.inbound)
        };
        self.serve_ingest(settings, config).await
    }

    /// Publishes config events as they are (for settings the config file does not express).
    pub async fn publish_config_events(
        &self,
        account_id: &str,
        payloads: Vec<switchboard_proto::events::v1::envelope::Payload>,
    ) -> anyhow::Result<()> {
        for payload in payloads {
            let key =
                switchboard_runtime::config_store::config_key(account_id, &payload).context("not a config payload")?;
            let event = switchboard_runtime::envelope::new_root(account_id, &key, chrono::Utc::now(), payload);
            self.produce_raw(&self.topics.config, &key, &switchboard_runtime::envelope::encode(&event)).await?;
        }
        Ok(())
    }

    /// Starts ingest in-process with channel secrets and, if asked, its SMTP listener.
    pub async fn start_ingest_with(
        &self,
        secrets: switchboard_ingest::secrets::Secrets,
        with_smtp: bool,
    ) -> anyhow::Result<switchboard_ingest::BoundAddresses> {
        let config = self.config_store("test-ingest").await?;
        let settings = switchboard_ingest::IngestSettings {
            max_body_bytes: 64 * 1024,
            smtp_listen: if with_smtp { Some("127.0.0.1:0".parse()?) } else { None },
            smtp_max_message_bytes: 256 * 1024,
            secrets,
            ..switchboard_ingest::IngestSettings::new("127.0.0.1:0".parse()?, &self.brokers, &self.topics.inbound)
        };
        let (bound_sender, bound) = tokio::sync::oneshot::channel();
        let mut shutdown = self.shutdown_sender.subscribe();
        tokio::spawn(switchboard_ingest::serve_all(settings, config, bound_sender, async move {
            let _ = shutdown.changed().await;
        }));
        bound.await.context("ingest did not start")
    }

    /// Starts a router instance in-process (on a blocking thread); returns what it reports on
    /// `/metrics`.
    pub async fn start_router(
        &self,
        instance_id: &str,
    ) -> anyhow::Result<std::sync::Arc<switchboard_router::metrics::RouterMetrics>> {
        let config = self.config_store(&format!("test-router-{instance_id}")).await?;
        let settings = switchboard_router::shell::RouterSettings::new(&self.brokers, self.topics.clone(), instance_id);
        let shutdown = self.shutdown.clone();
        let metrics = std::sync::Arc::new(switchboard_router::metrics::RouterMetrics::default());
        let reported = metrics.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(error) = switchboard_router::shell::run_router(&settings, &config, &shutdown, &metrics) {
                tracing::error!(error = format!("{error:#}"), "router failed");
            }
        });
        Ok(reported)
    }

    /// Starts the router binary as a child process (for tests that kill it); it is killed when
    /// dropped, so a test that fails part-way leaves no router running.
    pub fn spawn_router_process(&self, instance_id: &str) -> anyhow::Result<KillOnDrop> {
        self.spawn_router_process_with(instance_id, &[])
    }

    pub fn projector_settings(&self, group_suffix: &str) -> switchboard_projector::ProjectorSettings {
        switchboard_projector::ProjectorSettings {
            brokers: self.brokers.clone(),
            topic: self.topics.conversations.clone(),
            group_id: format!("{}projector{group_suffix}", self.topics.prefix),
            max_batch_records: 1_000,
            batch_linger: Duration::from_millis(10),
            synchronous_commit: true,
        }
    }

    /// Starts the projector in-process.
    pub async fn start_projector(&self) -> anyhow::Result<()> {
        let settings = self.projector_settings("");
        let pool = self.pool.clone();
        let shutdown = self.shutdown_sender.subscribe();
        tokio::spawn(async move {
            if let Err(error) = switchboard_projector::run_projector(settings, pool, shutdown).await {
                tracing::error!(error = format!("{error:#}"), "projector failed");
            }
        });
        Ok(())
    }

    /// Starts the gRPC API in-process; returns a client authenticated as [`demo_admin`].
    pub async fn start_api(&self) -> anyhow::Result<ApiClient> {
        let url = self.start_api_server().await?;
        connect_api(&url, BearerToken::for_identity(&demo_admin())?).await
    }

    /// Starts the gRPC API in-process (JWTs signed with [`TEST_JWT_SECRET`], plus the API keys
    /// in `api_keys_toml_opt`); returns its URL.
    pub async fn start_api_server_with_keys(&self, api_keys_toml_opt: Option<&str>) -> anyhow::Result<String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let mut shutdown = self.shutdown_sender.subscribe();
        let settings = switchboard_api::ApiSettings {
            pool: self.pool.clone(),
            authenticator: switchboard_api::auth::Authenticator::new(
                Some(TEST_JWT_SECRET.as_bytes()),
                api_keys_toml_opt,
            )?,
            brokers: self.brokers.clone(),
            topics: self.topics.clone(),
            fallback_email_domain: switchboard_runtime::outbound::DEFAULT_FALLBACK_DOMAIN.to_owned(),
            // Attachment hosts in the tests are local stand-ins.
            attachment_hosts: switchboard_runtime::attachment_hosts::AttachmentHosts::AnyAddress,
        };
        tokio::spawn(async move {
            let stopped = async move {
                let _ = shutdown.changed().await;
            };
            if let Err(error) = switchboard_api::serve(listener, settings, stopped).await {
                tracing::error!(error = format!("{error:#}"), "api failed");
            }
        });
        Ok(format!("http://{address}"))
    }

    /// Starts the gRPC API in-process; returns its URL.
    pub async fn start_api_server(&self) -> anyhow::Result<String> {
        self.start_api_server_with_keys(None).await
    }

    /// Applies the demo config and starts every service in-process.
    pub async fn start_pipeline(&self) -> anyhow::Result<Pipeline> {
        self.apply_config(DEMO_CONFIG).await?;
        let ingest_url = self.start_ingest().await?;
        self.start_router("router-0").await?;
        self.start_projector().await?;
        let api = self.start_api().await?;
        Ok(Pipeline { ingest_url, api, http: reqwest::Client::new() })
    }

    /// Reads every committed event on a topic (read_committed), in partition order.
    pub fn read_committed_events(&self, topic: &str) -> anyhow::Result<Vec<Envelope>> {
        self.read_committed_records(topic)?
            .into_iter()
            .map(|record| Ok(switchboard_runtime::envelope::decode(record.payload.as_deref())?))
            .collect()
    }

    /// Reads every committed record on a topic (read_committed), undecoded, in partition order.
    pub fn read_committed_records(&self, topic: &str) -> anyhow::Result<Vec<RawRecord>> {
        self.read_records(topic, "read_committed")
    }

    /// Reads every record on a topic, undecoded, in partition order, with the given
    /// `isolation.level` (`read_uncommitted` also returns the records of aborted transactions).
    pub fn read_records(&self, topic: &str, isolation_level: &str) -> anyhow::Result<Vec<RawRecord>> {
        let partitions = self.topics.declared_partitions(topic).context("unknown topic")?;
        let reader: BaseConsumer<switchboard_runtime::kafka::ReaderContext> =
            switchboard_runtime::kafka::reader_config(&self.brokers, "test-reader")
                .set("isolation.level", isolation_level)
                .create_with_context(switchboard_runtime::kafka::ReaderContext)?;
        let mut assignment = TopicPartitionList::new();
        for partition in 0..partitions {
            assignment.add_partition_offset(topic, partition, Offset::Beginning)?;
        }
        reader.assign(&assignment)?;
        let mut records = Vec::new();
        let mut at_end = 0;
        let deadline = Instant::now() + Duration::from_secs(60);
        while at_end < partitions {
            if Instant::now() > deadline {
                bail!("timed out reading {topic}");
            }
            match reader.poll(Duration::from_secs(5)) {
                Some(Ok(record)) => records.push(RawRecord {
                    partition: record.partition(),
                    offset: record.offset(),
                    key: record.key().map(<[u8]>::to_vec),
                    payload: record.payload().map(<[u8]>::to_vec),
                    headers: record
                        .headers()
                        .map(|headers| {
                            headers
                                .iter()
                                .map(|header| {
                                    let value = header.value.map(|value| String::from_utf8_lossy(value).into_owned());
                                    (header.key.to_owned(), value.unwrap_or_default())
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                }),
                Some(Err(KafkaError::PartitionEOF(_))) => at_end += 1,
                Some(Err(error)) => tracing::warn!(%error, "test reader error"),
                None => {}
            }
        }
        Ok(records)
    }

    /// Produces raw bytes to a topic (for poison-input tests).
    pub async fn produce_raw(&self, topic: &str, key: &str, payload: &[u8]) -> anyhow::Result<()> {
        use rdkafka::producer::{FutureProducer, FutureRecord};
        let producer: FutureProducer =
            switchboard_runtime::kafka::idempotent_producer_config(&self.brokers, "test-raw", 10_000).create()?;
        producer
            .send(FutureRecord::to(topic).key(key).payload(payload), Duration::from_secs(10))
            .await
            .map_err(|(error, _)| anyhow::Error::new(error))?;
        Ok(())
    }

    /// Sets the configs of one of this environment's topics to its declared ones
    /// (`deploy/topics.txt`) plus `extra` (Kafka's AlterConfigs replaces the whole set).
    pub async fn set_topic_configs(&self, topic: &str, extra: &[(&str, &str)]) -> anyhow::Result<()> {
        use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
        use rdkafka::client::DefaultClientContext;
        let spec = switchboard_runtime::topics::topic_specs()
            .iter()
            .find(|spec| format!("{}{}", self.topics.prefix, spec.base_name) == topic)
            .context("not a topic of this environment")?;
        let admin: AdminClient<DefaultClientContext> =
            switchboard_runtime::kafka::client_config(&self.brokers, "test-admin").create()?;
        let mut change = AlterConfig::new(ResourceSpecifier::Topic(topic));
        for (key, value) in &spec.configs {
            change = change.set(key, value);
        }
        for (key, value) in extra {
            change = change.set(key, value);
        }
        let results = admin.alter_configs(&[change], &AdminOptions::new()).await?;
        for result in results {
            result.map_err(|(resource, code)| anyhow::anyhow!("failed to alter {resource:?}: {code}"))?;
        }
        Ok(())
    }

    /// Stops in-process services and drops this test's database and topics.
    pub async fn cleanup(&self) {
        self.shutdown.store(true, Ordering::Relaxed);
        let _ = self.shutdown_sender.send(true);
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.pool.close().await;
        if let Ok(admin_url) = required_env("DATABASE_URL")
            && let Ok(admin_pool) = PgPoolOptions::new().max_connections(1).connect(&admin_url).await
        {
            let database = self.database_url.rsplit('/').next().unwrap_or_default().to_owned();
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)")).execute(&admin_pool).await;
        }
        delete_topics(&self.brokers, &self.topics).await;
    }
}

impl Drop for TestEnv {
    /// A failed assertion skips `cleanup`; in-process services must still stop, or the test
    /// runtime would wait for the router's thread forever.
    fn drop(&mut self) {
        self.shutdown.store(true, Ordering::Relaxed);
        let _ = self.shutdown_sender.send(true);
    }
}

async fn delete_topics(brokers: &str, topics: &Topics) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let Ok(admin) = switchboard_runtime::kafka::client_config(brokers, "test-cleanup")
        .create::<AdminClient<DefaultClientContext>>()
    else {
        return;
    };
    // Every declared topic of the environment (router snapshots included).
    let names: Vec<String> = switchboard_runtime::topics::topic_specs()
        .iter()
        .map(|spec| format!("{}{}", topics.prefix, spec.base_name))
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let _ = admin.delete_topics(&names, &AdminOptions::new()).await;
}

fn replace_database(url: &str, database: &str) -> String {
    match url.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{database}"),
        None => format!("{url}/{database}"),
    }
}

/// Where cargo put a workspace binary (the test executable lives in `target/<profile>/deps`).
pub fn binary_path(name: &str) -> anyhow::Result<PathBuf> {
    let test_executable = std::env::current_exe()?;
    let profile_dir =
        test_executable.parent().and_then(|deps| deps.parent()).context("unexpected test executable location")?;
    let path = profile_dir.join(name);
    if !path.exists() {
        bail!("{} not found: build the binaries first (`cargo build --bins`, as scripts/test does)", path.display());
    }
    Ok(path)
}

/// A channel to the API at `url`, once it accepts connections.
pub async fn connect_channel(url: &str) -> anyhow::Result<Channel> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match Channel::from_shared(url.to_owned())?.connect().await {
            Ok(channel) => return Ok(channel),
            Err(error) if Instant::now() > deadline => return Err(error).context("api did not come up"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Whether the server side of `client`'s connection has `TCP_NODELAY` set, for a listener
/// served in this process (in-process services, as [`TestEnv`] starts them). The accepted socket
/// is found among the process's file descriptors (Linux `/proc/self/fd`) by its two addresses,
/// so this checks each listener as it is wired, not a helper it should call. Call it once the
/// server has answered on the connection (it configures a connection before serving it).
pub fn accepted_connection_has_nodelay(client: &tokio::net::TcpStream) -> anyhow::Result<bool> {
    use std::os::fd::{BorrowedFd, RawFd};
    let server_address = client.peer_addr()?;
    let client_address = client.local_addr()?;
    for entry in std::fs::read_dir("/proc/self/fd").context("failed to list /proc/self/fd")? {
        let entry = entry?;
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<RawFd>() else { continue };
        let is_socket =
            std::fs::read_link(entry.path()).is_ok_and(|target| target.to_string_lossy().starts_with("socket:"));
        if !is_socket {
            continue;
        }
        // SAFETY: the descriptor is borrowed only to duplicate it at once; all further calls go
        // to the duplicate, which this function owns and closes. Should another thread close the
        // original in between, the duplication fails or yields a socket whose addresses do not
        // match; neither touches memory.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let Ok(duplicate) = borrowed.try_clone_to_owned() else { continue };
        let socket = std::net::TcpStream::from(duplicate);
        if socket.local_addr().ok() == Some(server_address) && socket.peer_addr().ok() == Some(client_address) {
            return Ok(socket.nodelay()?);
        }
    }
    bail!("no accepted connection {server_address} <- {client_address} in this process")
}

/// An authenticated ConversationService client for the API at `url`.
pub async fn connect_api(url: &str, token: BearerToken) -> anyhow::Result<ApiClient> {
    Ok(ConversationServiceClient::with_interceptor(connect_channel(url).await?, token))
}

/// A child process (a service under test) that is killed when dropped, so a test that fails
/// part-way leaves nothing running.
pub struct KillOnDrop(pub Child);

impl std::ops::Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A record as read from a topic, undecoded.
#[derive(Debug, Clone)]
pub struct RawRecord {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: std::collections::BTreeMap<String, String>,
}

/// A running pipeline as its clients see it.
pub struct Pipeline {
    pub ingest_url: String,
    pub api: ApiClient,
    pub http: reqwest::Client,
}

impl TestEnv {
    /// Starts the router binary as a child process with extra environment (e.g. snapshot cadence).
    pub fn spawn_router_process_with(
        &self,
        instance_id: &str,
        extra_env: &[(&str, &str)],
    ) -> anyhow::Result<KillOnDrop> {
        let mut command = Command::new(binary_path("router")?);
        command
            .env("KAFKA_BROKERS", &self.brokers)
            .env("SWITCHBOARD_TOPIC_PREFIX", &self.topics.prefix)
            .env("SWITCHBOARD_INSTANCE_ID", instance_id)
            // Several routers run side by side: each serves /metrics on a port of its own.
            .env("SWITCHBOARD_ROUTER_METRICS_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (name, value) in extra_env {
            command.env(name, value);
        }
        command.spawn().map(KillOnDrop).context("failed to start the router binary")
    }

    /// Starts the projector binary (`projector run`) as a child process with its default group,
    /// serving `/metrics` on `metrics_addr`; it is killed when dropped.
    pub fn spawn_projector_process(&self, metrics_addr: SocketAddr) -> anyhow::Result<KillOnDrop> {
        Command::new(binary_path("projector")?)
            .args(["run", "--metrics-addr", &metrics_addr.to_string()])
            .env("KAFKA_BROKERS", &self.brokers)
            .env("DATABASE_URL", &self.database_url)
            .env("SWITCHBOARD_TOPIC_PREFIX", &self.topics.prefix)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map(KillOnDrop)
            .context("failed to start the projector binary")
    }

    /// Produces envelopes with their keys to a topic (partitioned by key, as services do) and
    /// waits until every one is acknowledged.
    pub async fn produce_envelopes(&self, topic: &str, records: &[(String, Envelope)]) -> anyhow::Result<()> {
        // Bounded in-flight sends: a few thousand at a time.
        self.produce_envelopes_paced(topic, records, 5_000, Duration::ZERO).await
    }

    /// Produces envelopes like [`TestEnv::produce_envelopes`], `slice_len` at a time with a pause
    /// after each slice (one producer throughout): input that keeps flowing for a while.
    pub async fn produce_envelopes_paced(
        &self,
        topic: &str,
        records: &[(String, Envelope)],
        slice_len: usize,
        pause: Duration,
    ) -> anyhow::Result<()> {
        use rdkafka::producer::{FutureProducer, FutureRecord};
        let producer: FutureProducer =
            switchboard_runtime::kafka::idempotent_producer_config(&self.brokers, "test-envelopes", 60_000).create()?;
        for slice in records.chunks(slice_len.max(1)) {
            let deliveries = slice.iter().map(|(key, envelope)| {
                let payload = switchboard_runtime::envelope::encode(envelope);
                let producer = &producer;
                async move {
                    producer
                        .send(FutureRecord::to(topic).key(key).payload(&payload), Duration::from_secs(60))
                        .await
                        .map_err(|(error, _)| anyhow::Error::new(error))
                }
            });
            futures::future::try_join_all(deliveries).await?;
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
        Ok(())
    }

    /// How many records of `topic` the consumer group has not committed yet (all partitions).
    pub fn group_lag(&self, group_id: &str, topic: &str) -> anyhow::Result<i64> {
        let partitions = self.topics.declared_partitions(topic).context("unknown topic")?;
        let consumer: BaseConsumer<switchboard_runtime::kafka::ReaderContext> =
            switchboard_runtime::kafka::client_config(&self.brokers, "test-lag")
                .set("group.id", group_id)
                .set("enable.auto.commit", "false")
                .create_with_context(switchboard_runtime::kafka::ReaderContext)?;
        let mut wanted = TopicPartitionList::new();
        for partition in 0..partitions {
            wanted.add_partition(topic, partition);
        }
        let committed = consumer.committed_offsets(wanted, Duration::from_secs(10))?;
        let mut lag = 0;
        for element in committed.elements() {
            let (_, high) = consumer.fetch_watermarks(topic, element.partition(), Duration::from_secs(10))?;
            let committed_offset = match element.offset() {
                Offset::Offset(offset) => offset,
                _ => 0,
            };
            lag += (high - committed_offset).max(0);
        }
        Ok(lag)
    }
}

// ------------------------------------------------------------------------------------------
// Mailpit: the real SMTP server of the stack (`scripts/stack up`), read through its REST API.
// Tests run in parallel against one Mailpit, so each finds its own mails by a unique address or
// Message-ID and never deletes others'.

/// A message as Mailpit lists it (`GET /api/v1/search`).
#[derive(Debug, Clone)]
pub struct MailpitSummary {
    /// Mailpit's own id, for [`Mailpit::raw`].
    pub id: String,
    /// Without angle brackets.
    pub message_id: String,
    pub subject: String,
}

/// A client of one Mailpit's REST API, and its SMTP port.
#[derive(Debug, Clone)]
pub struct Mailpit {
    http: reqwest::Client,
    pub base_url: String,
    pub smtp_port: u16,
}

impl Mailpit {
    /// The stack's Mailpit (`MAILPIT_URL`, `MAILPIT_SMTP_PORT`, exported by `scripts/stack env`).
    pub fn from_env() -> anyhow::Result<Mailpit> {
        let base_url = required_env("MAILPIT_URL")?;
        let smtp_port = required_env("MAILPIT_SMTP_PORT")?.parse().context("MAILPIT_SMTP_PORT is not a port")?;
        Ok(Mailpit::at(base_url, smtp_port))
    }

    pub fn at(base_url: String, smtp_port: u16) -> Mailpit {
        Mailpit { http: reqwest::Client::new(), base_url: base_url.trim_end_matches('/').to_owned(), smtp_port }
    }

    /// Messages matching a Mailpit search (`to:kim@example.org`, `message-id:<id>`, ...),
    /// newest first.
    pub async fn search(&self, query: &str) -> anyhow::Result<Vec<MailpitSummary>> {
        self.list("search", &[("query", query), ("limit", "500")]).await
    }

    /// The newest messages (at most 500) of this Mailpit. Only for a Mailpit a test started
    /// itself: the stack's is shared by every test.
    pub async fn messages(&self) -> anyhow::Result<Vec<MailpitSummary>> {
        self.list("messages", &[("limit", "500")]).await
    }

    async fn list(&self, endpoint: &str, query: &[(&str, &str)]) -> anyhow::Result<Vec<MailpitSummary>> {
        let response = self
            .http
            .get(format!("{}/api/v1/{endpoint}", self.base_url))
            .query(query)
            .send()
            .await
            .with_context(|| format!("mailpit /api/v1/{endpoint} request failed"))?
            .error_for_status()
            .with_context(|| format!("mailpit /api/v1/{endpoint} answered an error"))?;
        let body: serde_json::Value = response.json().await.context("mailpit answered no JSON")?;
        let messages = body["messages"].as_array().cloned().unwrap_or_default();
        Ok(messages
            .iter()
            .map(|message| MailpitSummary {
                id: message["ID"].as_str().unwrap_or_default().to_owned(),
                message_id: message["MessageID"].as_str().unwrap_or_default().to_owned(),
                subject: message["Subject"].as_str().unwrap_or_default().to_owned(),
            })
            .collect())
    }

    /// Waits until `query` matches at least `count` messages, and returns them.
    pub async fn wait_for(&self, query: &str, count: usize, timeout: Duration) -> anyhow::Result<Vec<MailpitSummary>> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self.search(query).await?;
            if found.len() >= count {
                return Ok(found);
            }
            if Instant::now() > deadline {
                bail!("mailpit has {} message(s) for '{query}' after {timeout:?}, expected {count}", found.len());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The one message with this Message-ID (without angle brackets), once it has arrived.
    pub async fn wait_for_message_id(&self, message_id: &str, timeout: Duration) -> anyhow::Result<MailpitSummary> {
        let found = self.wait_for(&format!("message-id:\"{message_id}\""), 1, timeout).await?;
        let mut exact: Vec<MailpitSummary> =
            found.into_iter().filter(|summary| summary.message_id == message_id).collect();
        match exact.len() {
            1 => Ok(exact.remove(0)),
            n => bail!("mailpit holds {n} messages with Message-ID {message_id}"),
        }
    }

    /// The message exactly as received (`GET /api/v1/message/{id}/raw`).
    pub async fn raw(&self, id: &str) -> anyhow::Result<Vec<u8>> {
        let response = self
            .http
            .get(format!("{}/api/v1/message/{id}/raw", self.base_url))
            .send()
            .await
            .context("mailpit raw message request failed")?
            .error_for_status()
            .context("mailpit raw message answered an error")?;
        Ok(response.bytes().await.context("failed to read the raw message")?.to_vec())
    }

    /// A second Mailpit of its own (the stack's binary, `MAILPIT_BIN`) whose SMTP answers follow
    /// `chaos_triggers` (Mailpit's `--chaos-triggers`, e.g. `Recipient:550:100`): a relay that
    /// refuses, for the tests of failed sends. Stopped, and its data file removed, when dropped.
    pub async fn spawn_with_chaos(chaos_triggers: &str) -> anyhow::Result<(Mailpit, OwnMailpit)> {
        Mailpit::spawn_with_args(&["--enable-chaos", "--chaos-triggers", chaos_triggers, "--smtp-auth-allow-insecure"])
            .await
    }

    /// A Mailpit of its own (the stack's binary, `MAILPIT_BIN`) on free loopback ports, accepting
    /// any AUTH, started with `extra_args` (e.g. `--smtp-tls-cert`; `--smtp-auth-allow-insecure`
    /// for AUTH without TLS). Stopped, and its data file removed, when
    /// dropped.
    pub async fn spawn_with_args(extra_args: &[&str]) -> anyhow::Result<(Mailpit, OwnMailpit)> {
        let binary = required_env("MAILPIT_BIN")?;
        let smtp_port = free_port()?;
        let http_port = free_port()?;
        let database = std::env::temp_dir().join(format!("mailpit-test-{}.db", uuid::Uuid::now_v7()));
        let child = Command::new(&binary)
            .args(["--smtp", &format!("127.0.0.1:{smtp_port}"), "--listen", &format!("127.0.0.1:{http_port}")])
            .arg("--database")
            .arg(&database)
            .args(["--smtp-auth-accept-any", "--smtp-disable-rdns", "--disable-version-check", "--quiet"])
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("failed to start {binary}"))?;
        let process = OwnMailpit { process: KillOnDrop(child), database };
        let mailpit = Mailpit::at(format!("http://127.0.0.1:{http_port}"), smtp_port);
        let deadline = Instant::now() + Duration::from_secs(20);
        while mailpit.messages().await.is_err()
            || tokio::net::TcpStream::connect(("127.0.0.1", smtp_port)).await.is_err()
        {
            if Instant::now() > deadline {
                bail!("the test's own mailpit did not come up on SMTP {smtp_port} / HTTP {http_port}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok((mailpit, process))
    }
}

/// A Mailpit started by [`Mailpit::spawn_with_args`].
pub struct OwnMailpit {
    process: KillOnDrop,
    database: PathBuf,
}

impl Drop for OwnMailpit {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
        for suffix in ["", "-wal", "-shm"] {
            let mut path = self.database.clone().into_os_string();
            path.push(suffix);
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
// ---------------------------------------------------------------------- end of Mailpit block

// ---------------------------------------------------------------------------------------------
// Delivery service (issue 15): starting it in-process or as the binary.
// ---------------------------------------------------------------------------------------------

impl TestEnv {
    /// Delivery settings for this environment: Graph API calls go to `graph_base_url` (a
    /// stand-in), secrets from `secrets_toml`, retries after 100 ms instead of 1 s.
    pub fn delivery_settings(
        &self,
        graph_base_url: &str,
        secrets_toml: &str,
    ) -> anyhow::Result<switchboard_delivery::DeliverySettings> {
        Ok(switchboard_delivery::DeliverySettings {
            brokers: self.brokers.clone(),
            group_id: format!("{}delivery", self.topics.prefix),
            outbound_topic: self.topics.outbound.clone(),
            delivery_topic: self.topics.delivery.clone(),
            graph_base_url: graph_base_url.to_owned(),
            secrets: switchboard_runtime::secrets::Secrets::parse(secrets_toml)?,
            smtp: None,
            smtp_connections: switchboard_delivery::service::DEFAULT_SMTP_CONNECTIONS,
            concurrency: 64,
            http_timeout: Duration::from_secs(5),
            retry: switchboard_delivery::retry::RetryPolicy {
                base_delay: Duration::from_millis(100),
                ..Default::default()
            },
            poll_interval: Duration::from_millis(50),
        })
    }

    /// Starts the delivery service in-process; it stops with the environment.
    pub async fn start_delivery(
        &self,
        settings: switchboard_delivery::DeliverySettings,
    ) -> anyhow::Result<Arc<switchboard_delivery::metrics::Metrics>> {
        switchboard_delivery::migrate(&self.pool).await?;
        let metrics = Arc::new(switchboard_delivery::metrics::Metrics::default());
        let shutdown = self.shutdown_sender.subscribe();
        let pool = self.pool.clone();
        let running = metrics.clone();
        tokio::spawn(async move {
            if let Err(error) = switchboard_delivery::run_delivery(settings, pool, shutdown, running).await {
                tracing::error!(error = format!("{error:#}"), "delivery failed");
            }
        });
        Ok(metrics)
    }

    /// Starts the delivery binary as a child process (killed when dropped), sending to the
    /// stand-in at `graph_base_url` with the secrets in `secrets_file`.
    pub fn spawn_delivery_process(
        &self,
        graph_base_url: &str,
        secrets_file: &std::path::Path,
        extra_env: &[(&str, &str)],
    ) -> anyhow::Result<KillOnDrop> {
        let mut command = Command::new(binary_path("delivery")?);
        command
            .env("KAFKA_BROKERS", &self.brokers)
            .env("DATABASE_URL", &self.database_url)
            .env("SWITCHBOARD_TOPIC_PREFIX", &self.topics.prefix)
            .env("DELIVERY_GRAPH_API_BASE_URL", graph_base_url)
            .env("DELIVERY_SECRETS_FILE", secrets_file)
            .env("DELIVERY_METRICS_ADDR", "127.0.0.1:0")
            .env("DELIVERY_RETRY_BASE_MS", "100")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (name, value) in extra_env {
            command.env(name, value);
        }
        command.spawn().map(KillOnDrop).context("failed to start the delivery binary")
    }
}

// ---------------------------------------------------------------------------------------------
// The whole outbound path (issue 15): ingest, router, projector, API and delivery in-process,
// email over the stack's Mailpit, Meta and customers' apps at a stand-in.
// ---------------------------------------------------------------------------------------------

/// Every service of the outbound path, as its clients see it.
pub struct OutboundPipeline {
    /// Ingest's HTTP and SMTP listeners.
    pub ingest: switchboard_ingest::BoundAddresses,
    pub ingest_url: String,
    /// The gRPC API's URL (connect with any identity, e.g. `api_seed::clients_for`).
    pub api_url: String,
    /// The stack's Mailpit, where every email the delivery service sends arrives.
    pub mailpit: Mailpit,
    pub delivery_metrics: Arc<switchboard_delivery::metrics::Metrics>,
    pub http: reqwest::Client,
}

impl TestEnv {
    /// Starts the outbound path over this environment's topics and database, for the config
    /// already applied: ingest (HTTP, SMTP, the chat reply stream; channel secrets from
    /// `secrets_toml`), the router, the projector, the API and the delivery service. Delivery
    /// sends email to the stack's Mailpit (`MAILPIT_URL`, `MAILPIT_SMTP_PORT` from
    /// `scripts/stack env`), Graph API calls to `graph_base_url` (a stand-in) and reads its
    /// tokens and keys from the same `secrets_toml` (one secrets format for both services).
    pub async fn start_outbound_pipeline(
        &self,
        secrets_toml: &str,
        graph_base_url: &str,
    ) -> anyhow::Result<OutboundPipeline> {
        let mailpit = Mailpit::from_env()?;
        let config = self.config_store("test-ingest").await?;
        let settings = switchboard_ingest::IngestSettings {
            max_body_bytes: 256 * 1024,
            delivery_timeout: Duration::from_secs(10),
            smtp_listen: Some("127.0.0.1:0".parse()?),
            smtp_max_message_bytes: 256 * 1024,
            secrets: switchboard_runtime::secrets::Secrets::parse(secrets_toml)?,
            chat_stream_opt: Some(switchboard_ingest::chat_stream::ChatStreamSettings {
                database_url: self.database_url.clone(),
                keep_alive: Duration::from_secs(1),
            }),
            ..switchboard_ingest::IngestSettings::new("127.0.0.1:0".parse()?, &self.brokers, &self.topics.inbound)
        };
        // Delivery creates the chat table ingest streams from.
        switchboard_delivery::migrate(&self.pool).await?;
        let (bound_sender, bound) = tokio::sync::oneshot::channel();
        let mut shutdown = self.shutdown_sender.subscribe();
        tokio::spawn(switchboard_ingest::serve_all(settings, config, bound_sender, async move {
            let _ = shutdown.changed().await;
        }));
        let ingest = bound.await.context("ingest did not start")?;
        self.start_router("router-0").await?;
        self.start_projector().await?;
        let api_url = self.start_api_server().await?;
        let delivery = switchboard_delivery::DeliverySettings {
            smtp: Some(switchboard_delivery::email::SmtpSettings {
                host: "127.0.0.1".into(),
                port: mailpit.smtp_port,
                tls: switchboard_delivery::email::SmtpTls::None,
                username: None,
                password: None,
                timeout: Duration::from_secs(5),
                // As the test API: attachments may come from loopback stand-ins.
                attachment_hosts: switchboard_runtime::attachment_hosts::AttachmentHosts::AnyAddress,
            }),
            ..self.delivery_settings(graph_base_url, secrets_toml)?
        };
        let delivery_metrics = self.start_delivery(delivery).await?;
        Ok(OutboundPipeline {
            ingest_url: format!("http://{}", ingest.http),
            ingest,
            api_url,
            mailpit,
            delivery_metrics,
            http: reqwest::Client::new(),
        })
    }
}
