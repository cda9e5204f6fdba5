//! `switchboard.api.v1.AdminService`: commands. Each one is (1) checked against a stored
//! request id ([`crate::idempotency`]: a retry returns the original position, B6), (2) authorised
//! (roles, I2-I4), (3) validated with field-level details, and only then (4) published through
//! the runtime's `EnvelopePublisher` (trace context and event type headers): configuration as the
//! entity's whole new state on the compacted config topic (as `apply-config` does), routing-state
//! commands on `inbound.v1` keyed by account so the router orders them with the messages they
//! affect (docs/contracts.md).

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Context as _;
use chrono::Utc;
use prost::Message as _;
use sqlx::PgPool;
use switchboard_proto::api::v1::admin_service_server::AdminService;
use switchboard_proto::api::v1::channel_settings::Settings;
use switchboard_proto::api::v1::*;
use switchboard_proto::events::v1::envelope::Payload;
use switchboard_proto::events::v1::{
    Actor, AgentAvailabilityChanged, AgentConfigured, AssignTarget, AssignmentStrategy, ChannelConfigured, ChannelType,
    ChannelTypeCapacity, ContactOwnerChangeRequested, ConversationCloseRequested, InboxAccessMode, InboxConfigured,
    InboxKind, ManualAssignmentRequested, RoutingRulesConfigured, TicketSettingsConfigured, TicketStageChangeRequested,
};
use switchboard_runtime::config_store::{ConfigSnapshot, ConfigStore, config_key};

use crate::config_rules::{self, Breach};
use switchboard_runtime::attachment_hosts::{self, AttachmentHosts};
use switchboard_runtime::envelope;
use switchboard_runtime::outbound;
use switchboard_runtime::publisher::EnvelopePublisher;
use switchboard_runtime::topics::Topics;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::access::{self, ConversationAction, InboxAccess};
use crate::auth::{Identity, Role};
use crate::error::{ApiError, Violations};
use crate::idempotency::{self, Claim, validate_request_id};
use crate::position::Position;
use crate::read::ReadModels;
use crate::scope;

/// How long a config command waits to see its own write in the config view, so the next
/// command of this API instance starts from it.
const CONFIG_ECHO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a command waits for Kafka to acknowledge its records before UNAVAILABLE.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

/// The two topics commands go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Destination {
    Config,
    Inbound,
}

pub struct Admin {
    read: ReadModels,
    config: ConfigStore,
    publisher: EnvelopePublisher,
    topics: Topics,
    outbound: OutboundSettings,
    /// Config commands of this instance run one at a time, each starting from the state the
    /// previous one published (read-modify-write of whole entities).
    config_lock: tokio::sync::Mutex<()>,
}

/// What the outbound commands need besides the log and the read models.
#[derive(Clone)]
pub struct OutboundSettings {
    /// Checks attachment references (SendReply).
    pub http: reqwest::Client,
    /// Which hosts attachment references may point at (public addresses unless configured).
    pub attachment_hosts: AttachmentHosts,
    /// C12: the mail domain of the fallback addresses new inboxes get.
    pub fallback_email_domain: String,
}

impl OutboundSettings {
    pub fn new(fallback_email_domain: &str, attachment_hosts: AttachmentHosts) -> anyhow::Result<Self> {
        let http = attachment_hosts::client_builder(attachment_hosts)
            .connect_timeout(crate::replies::ATTACHMENT_FETCH_TIMEOUT)
            .timeout(crate::replies::ATTACHMENT_FETCH_TIMEOUT)
            .user_agent("switchboard-api (attachment check)")
            .build()
            .context("failed to build the attachment-check http client")?;
        Ok(OutboundSettings {
            http,
            attachment_hosts,
            fallback_email_domain: fallback_email_domain.trim().to_ascii_lowercase(),
        })
    }
}

impl Admin {
    pub fn new(
        read: ReadModels,
        config: ConfigStore,
        publisher: EnvelopePublisher,
        topics: Topics,
        outbound: OutboundSettings,
    ) -> Self {
        Admin { read, config, publisher, topics, outbound, config_lock: tokio::sync::Mutex::new(()) }
    }

    fn pool(&self) -> &PgPool {
        self.read.pool()
    }

    pub(crate) fn read_models(&self) -> &ReadModels {
        &self.read
    }

    pub(crate) fn publisher(&self) -> &EnvelopePublisher {
        &self.publisher
    }

    pub(crate) fn topics(&self) -> &Topics {
        &self.topics
    }

    pub(crate) fn http(&self) -> &reqwest::Client {
        &self.outbound.http
    }

    pub(crate) fn attachment_hosts(&self) -> AttachmentHosts {
        self.outbound.attachment_hosts
    }

    /// The idempotent command frame: replay, claim, run, record.
    async fn run_command<Fut>(
        &self,
        identity: &Identity,
        command: &'static str,
        request_id: &str,
        request_bytes: Vec<u8>,
        body: Fut,
    ) -> Result<Response<CommandResult>, Status>
    where
        Fut: Future<Output = Result<Vec<Position>, ApiError>>,
    {
        let (position, replayed) = self.run_claimed(identity, command, request_id, request_bytes, body).await?;
        Ok(Response::new(CommandResult { position, replayed }))
    }

    /// The frame itself: the position of the command's records and whether it was a replay.
    pub(crate) async fn run_claimed<Fut>(
        &self,
        identity: &Identity,
        command: &'static str,
        request_id: &str,
        request_bytes: Vec<u8>,
        body: Fut,
    ) -> Result<(String, bool), Status>
    where
        Fut: Future<Output = Result<Vec<Position>, ApiError>>,
    {
        validate_request_id(request_id)?;
        let digest = idempotency::request_digest(command, &request_bytes);
        let account_id = identity.account_id.as_str();
        if let Claim::Replay(position) =
            idempotency::try_claim(self.pool(), account_id, request_id, command, &digest).await?
        {
            return Ok((position, true));
        }
        match body.await {
            Ok(positions) => {
                let position = Position::join(&positions);
                idempotency::record_position(self.pool(), account_id, request_id, &position).await?;
                tracing::info!(command, request_id, %position, user = %identity.user_id, "command published");
                Ok((position, false))
            }
            Err(error) => {
                // Nothing was published: free the id so the client may retry (fixed) requests.
                idempotency::release(self.pool(), account_id, request_id).await?;
                Err(error.into())
            }
        }
    }

    /// Publishes `event` and answers with its position (topic named without the environment
    /// prefix, as clients see it).
    async fn publish(
        &self,
        destination: Destination,
        event: &switchboard_proto::events::v1::Envelope,
    ) -> Result<Position, ApiError> {
        let (topic, base_name) = match destination {
            Destination::Config => (&self.topics.config, "config.v1"),
            Destination::Inbound => (&self.topics.inbound, "inbound.v1"),
        };
        let published = self.publisher.publish(topic, event).await.map_err(|error| {
            tracing::warn!(error = format!("{:#}", anyhow::Error::new(error)), "failed to publish command");
            ApiError::Unavailable("the event log is unavailable; retry the command with the same request_id".into())
        })?;
        Ok(Position { topic: base_name.to_owned(), partition: published.partition, offset: published.offset })
    }

    /// Publishes a config entity and waits until this instance's config view shows it.
    async fn publish_config(&self, identity: &Identity, payload: Payload) -> Result<Position, ApiError> {
        let key = config_key(&identity.account_id, &payload).expect("config payloads have keys");
        let event = envelope::new_root(&identity.account_id, &key, Utc::now(), payload.clone());
        let position = self.publish(Destination::Config, &event).await?;
        let mut updates = self.config.subscribe();
        let echoed = tokio::time::timeout(
            CONFIG_ECHO_TIMEOUT,
            updates.wait_for(|snapshot| snapshot.holds(&identity.account_id, &payload)),
        )
        .await;
        if !matches!(echoed, Ok(Ok(_))) {
            tracing::warn!(%key, "config view did not show the published entity in time");
        }
        Ok(position)
    }

    async fn publish_command(&self, identity: &Identity, payload: Payload) -> Result<Position, ApiError> {
        let event = envelope::new_root(&identity.account_id, &identity.account_id, Utc::now(), payload);
        self.publish(Destination::Inbound, &event).await
    }

    fn snapshot(&self) -> std::sync::Arc<ConfigSnapshot> {
        self.config.snapshot()
    }

    /// The inbox's current access list from configuration (authoritative for commands).
    fn inbox_of(
        &self,
        snapshot: &ConfigSnapshot,
        identity: &Identity,
        inbox_id: &str,
    ) -> Result<InboxAccess, ApiError> {
        snapshot
            .inboxes
            .get(&identity.account_id, inbox_id)
            .map(|owned| inbox_access_of(&owned.account_id, &owned.entity))
            .ok_or_else(|| ApiError::not_found("inbox", inbox_id))
    }

    /// The inbox's configured entity, for a command that changes it.
    fn inbox_entity(
        &self,
        snapshot: &ConfigSnapshot,
        identity: &Identity,
        inbox_id: &str,
    ) -> Result<InboxConfigured, ApiError> {
        snapshot
            .inboxes
            .get(&identity.account_id, inbox_id)
            .map(|owned| owned.entity.clone())
            .ok_or_else(|| ApiError::not_found("inbox", inbox_id))
    }

    fn channel_of(
        &self,
        snapshot: &ConfigSnapshot,
        identity: &Identity,
        channel_id: &str,
    ) -> Result<(ChannelConfigured, InboxAccess), ApiError> {
        let channel = snapshot
            .channels
            .get(&identity.account_id, channel_id)
            .map(|owned| owned.entity.clone())
            .ok_or_else(|| ApiError::not_found("channel", channel_id))?;
        let inbox = self.inbox_of(snapshot, identity, &channel.inbox_id)?;
        access::check_act(identity, &inbox, "channel", channel_id)?;
        Ok((channel, inbox))
    }

    fn agent_of(
        &self,
        snapshot: &ConfigSnapshot,
        identity: &Identity,
        agent_id: &str,
    ) -> Result<AgentConfigured, ApiError> {
        snapshot
            .agents
            .get(&identity.account_id, agent_id)
            .map(|owned| owned.entity.clone())
            .ok_or_else(|| ApiError::not_found("agent", agent_id))
    }

    /// Changes one agent's definition (admins only).
    async fn update_agent(
        &self,
        identity: &Identity,
        agent_id: &str,
        change: impl FnOnce(&ConfigSnapshot, &mut AgentConfigured) -> Result<(), ApiError>,
    ) -> Result<Vec<Position>, ApiError> {
        access::check_admin(identity)?;
        let _guard = self.config_lock.lock().await;
        let snapshot = self.snapshot();
        let mut agent = self.agent_of(&snapshot, identity, agent_id)?;
        change(&snapshot, &mut agent)?;
        Ok(vec![self.publish_config(identity, Payload::AgentConfigured(agent)).await?])
    }

    /// The frame of every manual action on a conversation: the conversation as the read model
    /// has it, authorised for `action` (I2-I4) against the current configuration.
    pub(crate) async fn authorised_conversation(
        &self,
        identity: &Identity,
        conversation_id_text: &str,
        action: ConversationAction<'_>,
    ) -> Result<AuthorisedConversation, ApiError> {
        let conversation_id = scope::parse_uuid("conversation_id", conversation_id_text)?;
        let mut connection = self.read.connection().await?;
        let row: Option<(String, Option<String>, String)> = sqlx::query_as(
            "SELECT inbox_id, assignee_id, status FROM conversations WHERE conversation_id = $1 AND account_id = $2",
        )
        .bind(conversation_id)
        .bind(&identity.account_id)
        .fetch_optional(&mut *connection)
        .await?;
        let Some((inbox_id, current_assignee_opt, status)) = row else {
            return Err(ApiError::not_found("conversation", conversation_id.to_string()));
        };
        let snapshot = self.snapshot();
        let inbox = self
            .inbox_of(&snapshot, identity, &inbox_id)
            .map_err(|_| ApiError::not_found("conversation", conversation_id.to_string()))?;
        access::check_act(identity, &inbox, "conversation", &conversation_id.to_string())?;
        let caller_paid_seat = caller_has_paid_seat(&snapshot, identity);
        access::check_seat_allows(identity, caller_paid_seat, current_assignee_opt.as_deref(), action)?;
        Ok(AuthorisedConversation { conversation_id, inbox, snapshot, current_assignee_opt, is_open: status == "open" })
    }
}

/// A conversation a caller may act on, with what the action's own checks need.
pub(crate) struct AuthorisedConversation {
    pub(crate) conversation_id: Uuid,
    pub(crate) inbox: InboxAccess,
    /// The configuration the action was authorised against.
    pub(crate) snapshot: std::sync::Arc<ConfigSnapshot>,
    pub(crate) current_assignee_opt: Option<String>,
    pub(crate) is_open: bool,
}

/// I4: whether the caller holds a paid seat in their account.
fn caller_has_paid_seat(snapshot: &ConfigSnapshot, identity: &Identity) -> bool {
    config_rules::caller_has_paid_seat(snapshot, &identity.account_id, &identity.user_id, identity.role.is_admin())
}

/// The first broken config rule, as the error the caller gets.
fn refuse_breaches(breaches: Vec<Breach>) -> Result<(), ApiError> {
    match breaches.into_iter().next() {
        Some(breach) => Err(breach.into()),
        None => Ok(()),
    }
}

pub(crate) fn actor(identity: &Identity) -> Option<Actor> {
    Some(Actor { user_id: identity.user_id.clone(), role: identity.role.name().to_owned() })
}

fn inbox_access_of(account_id: &str, inbox: &InboxConfigured) -> InboxAccess {
    InboxAccess {
        inbox_id: inbox.inbox_id.clone(),
        account_id: account_id.to_owned(),
        access_mode: switchboard_proto::names::name_of_or(inbox.access_mode, InboxAccessMode::Everyone).into(),
        access_user_ids: inbox.access_user_ids.clone(),
        access_team_ids: inbox.access_team_ids.clone(),
    }
}

// ---------------------------------------------------------------------------------------------
// Field validation (pure).
// ---------------------------------------------------------------------------------------------

/// Ids chosen by clients for config entities: 1..64 of `[a-z0-9_-]` (they end up in Kafka keys).
fn check_entity_id(violations: &mut Violations, field: &str, id: &str) {
    if id.is_empty() {
        violations.add(field, "is required");
    } else if !config_rules::is_entity_id(id) {
        violations.add(field, "must be 1..64 characters of a-z, 0-9, '_' and '-'");
    }
}

fn check_name(violations: &mut Violations, field: &str, name: &str) {
    if name.trim().is_empty() {
        violations.add(field, "must not be empty");
    } else if name.chars().count() > 200 {
        violations.add(field, "must be at most 200 characters");
    }
}

fn check_labels(violations: &mut Violations, field: &str, labels: &[String]) {
    let mut seen = BTreeSet::new();
    for (index, label) in labels.iter().enumerate() {
        if label.trim().is_empty() || label.len() > 64 {
            violations.add(format!("{field}[{index}]"), "must be 1..64 characters");
        } else if !seen.insert(label) {
            violations.add(format!("{field}[{index}]"), "is listed twice");
        }
    }
}

fn access_mode_of(violations: &mut Violations, field: &str, value: i32) -> InboxAccessMode {
    match InboxAccessMode::try_from(value) {
        Ok(InboxAccessMode::Unspecified) => InboxAccessMode::Everyone,
        Ok(mode) => mode,
        Err(_) => {
            violations.add(field, "unknown access mode");
            InboxAccessMode::Everyone
        }
    }
}

/// A caller may not lock themselves out of an inbox they configure (they would lose the right
/// to repair it, I3).
fn check_keeps_caller(
    identity: &Identity,
    mode: InboxAccessMode,
    users: &[String],
    teams: &[String],
) -> Result<(), ApiError> {
    if mode != InboxAccessMode::SpecificUsersAndTeams
        || users.contains(&identity.user_id)
        || identity.team_ids.iter().any(|team| teams.contains(team))
    {
        Ok(())
    } else {
        Err(ApiError::FailedPrecondition(
            "the access list must include you or one of your teams, or you could no longer manage this inbox".into(),
        ))
    }
}

fn channel_type_of(violations: &mut Violations, value: i32) -> ChannelType {
    match ChannelType::try_from(value) {
        Ok(ChannelType::Unspecified) => {
            violations.add("channel_type", "is required");
            ChannelType::Unspecified
        }
        Ok(channel_type) => channel_type,
        Err(_) => {
            violations.add("channel_type", "unknown channel type");
            ChannelType::Unspecified
        }
    }
}

/// Applies type-specific settings to a channel, refusing settings of another type.
fn apply_settings(
    violations: &mut Violations,
    channel: &mut ChannelConfigured,
    settings_opt: Option<&ChannelSettings>,
) {
    let Some(settings) = settings_opt.and_then(|settings| settings.settings.as_ref()) else {
        return;
    };
    let channel_type = ChannelType::try_from(channel.channel_type).unwrap_or(ChannelType::Unspecified);
    let matches = match settings {
        Settings::Email(email) => {
            if email.team_address.is_empty() || !email.team_address.contains('@') {
                violations.add("settings.email.team_address", "must be an email address");
            }
            if !["", "agent_and_company", "company"].contains(&email.from_name_mode.as_str()) {
                violations.add("settings.email.from_name_mode", "must be agent_and_company or company");
            }
            channel.email = Some(email.clone());
            channel_type == ChannelType::TeamEmail
        }
        Settings::Chat(chat) => {
            if !["", "user_availability", "chat_hours", "always"].contains(&chat.availability_mode.as_str()) {
                violations.add("settings.chat.availability_mode", "must be user_availability, chat_hours or always");
            }
            if !["", "show_return_time", "away_message", "hide_launcher"].contains(&chat.offline_behaviour.as_str()) {
                violations
                    .add("settings.chat.offline_behaviour", "must be show_return_time, away_message or hide_launcher");
            }
            // C5: what the widget does when every member is at capacity (ingest's widget endpoint).
            if !["", "waiting_message", "hide_launcher", "nothing"].contains(&chat.at_capacity_behaviour.as_str()) {
                violations
                    .add("settings.chat.at_capacity_behaviour", "must be waiting_message, hide_launcher or nothing");
            }
            for (index, range) in chat.chat_hours.iter().enumerate() {
                if range.weekday > 6 || range.start_minute >= range.end_minute || range.end_minute > 24 * 60 {
                    violations.add(
                        format!("settings.chat.chat_hours[{index}]"),
                        "must be a weekday 0..6 and start < end <= 1440",
                    );
                }
            }
            channel.chat = Some(chat.clone());
            channel_type == ChannelType::Chat
        }
        Settings::Messenger(messenger) => {
            channel.messenger = Some(messenger.clone());
            channel_type == ChannelType::FacebookMessenger
        }
        Settings::Whatsapp(whatsapp) => {
            channel.whatsapp = Some(whatsapp.clone());
            channel_type == ChannelType::Whatsapp
        }
        Settings::Custom(custom) => {
            channel.custom = Some(custom.clone());
            channel_type == ChannelType::Custom
        }
    };
    if !matches {
        violations.add("settings", "do not match the channel's type");
    }
    for (field, problem) in config_rules::channel_settings_problems(channel) {
        violations.add(field, problem);
    }
}

fn check_capacity(violations: &mut Violations, capacities: &[ChannelTypeCapacity]) {
    let mut seen = BTreeSet::new();
    for (index, capacity) in capacities.iter().enumerate() {
        match ChannelType::try_from(capacity.channel_type) {
            Ok(ChannelType::Unspecified) | Err(_) => violations
                .add(format!("capacity_per_channel_type[{index}].channel_type"), "must be a known channel type"),
            Ok(channel_type) if !seen.insert(channel_type) => {
                violations.add(format!("capacity_per_channel_type[{index}]"), "channel type listed twice")
            }
            Ok(_) => {}
        }
    }
}

async fn next_config_version(pool: &PgPool, key: &str) -> Result<u64, ApiError> {
    let version: i64 = sqlx::query_scalar(
        "INSERT INTO api.config_versions (config_key, version) VALUES ($1, 1) \
         ON CONFLICT (config_key) DO UPDATE SET version = api.config_versions.version + 1 RETURNING version",
    )
    .bind(key)
    .fetch_one(pool)
    .await?;
    Ok(version.max(1) as u64)
}

macro_rules! command {
    ($self:ident, $request:ident, $name:literal, |$identity:ident, $body:ident| $run:expr) => {{
        let $identity = Identity::of(&$request)?;
        let $body = $request.into_inner();
        let bytes = $body.encode_to_vec();
        let request_id = $body.request_id.clone();
        $self.run_command(&$identity, $name, &request_id, bytes, async { $run }).await
    }};
}

#[tonic::async_trait]
impl AdminService for Admin {
    async fn create_inbox(&self, request: Request<CreateInboxRequest>) -> Result<Response<CommandResult>, Status> {
        command!(self, request, "CreateInbox", |identity, body| {
            access::check_admin(&identity)?;
            let mut violations = Violations::default();
            check_entity_id(&mut violations, "inbox_id", &body.inbox_id);
            check_name(&mut violations, "name", &body.name);
            let kind = match InboxKind::try_from(body.kind) {
                Ok(InboxKind::Unspecified) => InboxKind::Conversations,
                Ok(kind) => kind,
                Err(_) => {
                    violations.add("kind", "unknown inbox kind");
                    InboxKind::Conversations
                }
            };
            let mode = access_mode_of(&mut violations, "access_mode", body.access_mode);
            check_labels(&mut violations, "access_user_ids", &body.access_user_ids);
            check_labels(&mut violations, "access_team_ids", &body.access_team_ids);
            if !body.fallback_from_name.is_empty() {
                check_name(&mut violations, "fallback_from_name", &body.fallback_from_name);
            }
            violations.into_result()?;
            check_keeps_caller(&identity, mode, &body.access_user_ids, &body.access_team_ids)?;
            let _guard = self.config_lock.lock().await;
            let snapshot = self.snapshot();
            if snapshot.inboxes.contains(&identity.account_id, &body.inbox_id) {
                return Err(ApiError::AlreadyExists { what: "inbox", id: body.inbox_id.clone() });
            }
            let name = body.name.trim().to_owned();
            // C12: every inbox gets its fallback address now; a from-name not chosen is derived
            // unique (config_rules::default_fallback_from_name), a chosen one must be free.
            let fallback_from_name = if body.fallback_from_name.trim().is_empty() {
                config_rules::default_fallback_from_name(&snapshot, &identity.account_id, &body.inbox_id, &name)
            } else {
                body.fallback_from_name.trim().to_owned()
            };
            let inbox = InboxConfigured {
                inbox_id: body.inbox_id.clone(),
                name,
                access_mode: mode as i32,
                access_user_ids: body.access_user_ids.clone(),
                access_team_ids: body.access_team_ids.clone(),
                kind: kind as i32,
                fallback_address: outbound::default_fallback_address(
                    &identity.account_id,
                    &body.inbox_id,
                    &self.outbound.fallback_email_domain,
                ),
                fallback_from_name,
            };
            refuse_breaches(config_rules::inbox_breaches(&snapshot, &identity.account_id, &inbox))?;
            Ok(vec![self.publish_config(&identity, Payload::InboxConfigured(inbox)).await?])
        })
    }

    async fn rename_inbox(&self, request: Request<RenameInboxRequest>) -> Result<Response<CommandResult>, Status> {
        command!(self, request, "RenameInbox", |identity, body| {
            access::check_admin(&identity)?;
            let mut violations = Violations::default();
            check_name(&mut violations, "name", &body.name);
            violations.into_result()?;
            let _guard = self.config_lock.lock().await;
            let snapshot = self.snapshot();
            let mut inbox = self.inbox_entity(&snapshot, &identity, &body.inbox_id)?;
            let access = inbox_access_of(&identity.account_id, &inbox);
            access::check_act(&identity, &access, "inbox", &body.inbox_id)?;
            // The fallback address and from-name (C12) stay as they are: customers know them.
            inbox.name = body.name.trim().to_owned();
            Ok(vec![self.publish_config(&identity, Payload::InboxConfigured(inbox)).await?])
        })
    }

    async fn set_inbox_access(
        &self,
        request: Request<SetInboxAccessRequest>,
    ) -> Result<Response<CommandResult>, Status> {
        command!(self, request, "SetInboxAccess", |identity, body| {
            access::check_admin(&identity)?;
            let mut violations = Violations::default();
            let mode = access_mode_of(&mut violations, "access_mode", body.access_mode);
            check_labels(&mut violations, "access_user_ids", &body.access_user_ids);
            check_labels(&mut violations, "access_team_ids", &body.access_team_ids);
            violations.into_result()?;
            let _guard = self.config_lock.lock().await;
            let snapshot = self.snapshot();
            let mut inbox = self.inbox_entity(&snapshot, &identity, &body.inbox_id)?;
            let access = inbox_access_of(&identity.account_id, &inbox);
            access::check_act(&identity, &access, "inbox", &body.inbox_id)?;
            check_keeps_caller(&identity, mode, &body.access_user_ids, &body.access_team_ids)?;
            inbox.access_mode = mode as i32;
            inbox.access_user_ids = body.access_user_ids.clone();
            inbox.access_team_ids = body.access_team_ids.clone();
            Ok(vec![self.publish_config(&identity, Payload::InboxConfigured(inbox)).await?])
        })
    }

    async fn connect_channel(
        &self,
        request: Request<ConnectChannelRequest>,
    ) -> Result<Response<CommandResult>, Status> {
        command!(self, request, "ConnectChannel", |identity, body| {
            access::check_admin(&identity)?;
            let mut violations = Violations::default();
            check_entity_id(&mut violations, "channel_id", &body.channel_id);
            check_name(&mut violations, "name", &body.name);
            if body.inbox_id.is_empty() {
                violations.add("inbox_id", "is required");
            }
            let channel_type = channel_type_of(&mut violations, body.channel_type);
            let mut channel = ChannelConfigured {
                channel_id: body.channel_id.clone(),
                inbox_id: body.inbox_id.clone(),
                channel_type: channel_type as i32,
                name: body.name.trim().to_owned(),
                enabled: body.enabled,
                ..Default::default()
            };
            apply_settings(&mut violations, &mut channel, body.settings.as_ref());
            violations.into_result()?;
            let _guard = self.config_lock.lock().await;
            let snapshot = self.snapshot();
            let inbox = self.inbox_of(&snapshot, &identity, &body.inbox_id)?;
            access::check_act(&identity, &inbox, "inbox", &body.inbox_id)?;
            if snapshot.channels.contains(&identity.account_id, &body.channel_id) {
                return Err(ApiError::AlreadyExists { what: "channel", id: body.channel_id.clone() });
            }
            refuse_breaches(config_rules::channel_breaches(&snapshot, &identity.account_id, &channel))?;
            Ok(vec![self.publish_config(&identity, Payload::ChannelConfigured(Box::new(channel))).await?])
        })
    }

    async fn update_channel_settings(
        &self,
        request: Request<UpdateChannelSettingsRequest>,
    ) -> Result<Response<CommandResult>, Status> {
        command!(self, request, "UpdateChannelSettings", |identity, body| {
            access::check_admin(&identity)?;
            let _guard = self.config_lock.lock().await;
            let snapshot = self.snapshot();
            let (mut channel, _) = self.channel_of(&snapshot, &identity, &body.channel_id)?;
            let mut violations = Violations::default();
            if !body.name.is_empty() {
                check_name(&mut violations, "name", &body.name);
                channel.name = body.name.trim().to_owned();
            }
            apply_settings(&mut violations, &mut channel, body.settings.as_ref());
            violations.into_result()?;
            refuse_breaches(config_rules::channel_breaches(&snapshot, &identity.account_id, &channel))?;
            Ok(vec![self.publish_config(&identity, Payload::ChannelConfigured(Box::new(channel))).await?])
        })
    }

    async fn set_channel_enabled(
        &self,
        request: Request<SetChannelEnabledRequest>,
    ) -> Result<Response<CommandResult>, Status> {
        command!(self, request, "SetChannelEnabled", |identity, body| {
            access::check_admin(&identity)?;
            let _guard = self.config_lock.lock().await;
            let (mut channel, _) = self.channel_of(&self.snapshot(), &identity, &body.channel_id)?;
            channel.enabled = body.enabled;
            Ok(vec![self.publish_config(&identity, Payload::ChannelConfigured(Box::new(channel))).await?])
        })
    }

    async fn set_routing_rules(
        &self,
        request: Request<SetRoutingRulesRequest>,
    ) -> Result<Response<CommandResult>, Status> {
        command!(self, request, "SetRoutingRules", |identity, body| {
            access::check_admin(&identity)?;
            let _guard = self.config_lock.lock().await;
            let snapshot = self.snapshot();
            self.channel_of(&snapshot, &identity, &body.channel_id)?;
            let mut violations = Violations::default();
            let target = match AssignTarget::try_from(body.target) {
                Ok(AssignTarget::Unspecified) => AssignTarget::Nobody,
                Ok(target) => target,
                Err(_) => {
                    violations.add("target", "unknown assignment target");
                    AssignTarget::Nobody
                }
            };
            let strategy = match AssignmentStrategy::try_from(body.strategy) {
                Ok(AssignmentStrategy::Unspecified) => AssignmentStrategy::RoundRobin,
                Ok(strategy) => strategy,
                Err(_) => {
                    violations.add("strategy", "unknown strategy");
                    AssignmentStrategy::RoundRobin
                }
            };
            check_labels(&mut violations, "user_ids", &body.user_ids);
            check_labels(&mut violations, "team_ids", &body.team_ids);
            check_labels(&mut violations, "required_skills", &body.required_skills);
            for (index, user_id) in body.user_ids.iter().enumerate() {
                match snapshot.agents.get(&identity.account_id, user_id) {
                    None => violations
                        .add(format!("user_ids[{index}]"), format!("`{user_id}` is not an agent of this account")),
                    // R6: a rule cannot include users without a paid seat.
                    Some(agent) if !agent.entity.paid_seat => violations.add(
                        format!("user_ids[{index}]"),
                        format!("`{user_id}` has no paid seat and cannot be auto-assigned (R6)"),
                    ),
                    Some(_) => {}
                }
            }
            if target == AssignTarget::SpecificUsersAndTeams && body.user_ids.is_empty() && body.team_ids.is_empty() {
                violations.add("user_ids", "name at least one user or team for specific_users_and_teams");
            }
            violations.into_result()?;
            let mut rules = RoutingRulesConfigured {
                channel_id: body.channel_id.clone(),
                version: 0,
                auto_assign: body.auto_assign,
                target: target as i32,
                user_ids: body.user_ids.clone(),
                team_ids: body.team_ids.clone(),
                only_available: body.only_available,
                strategy: strategy as i32,
                required_skills: body.required_skills.clone(),
                redrive_backlog: body.redrive_backlog,
            };
            // As apply-config: the version moves exactly when the rule changes (B2).
            rules.version = crate::config_file::next_version(
                snapshot.routing_rules.get(&identity.account_id, &body.channel_id).map(|existing| &existing.entity),
                &rules,
            );
            Ok(vec![self.publish_config(&identity, Payload::RoutingRulesConfigured(rules)).await?])
        })
    }

    async fn set_ticket_settings(
        &self,
        request: Request<SetTicketSettingsRequest>,
    ) -> Result<Response<CommandResult>, Status> {
        command!(self, request, "SetTicketSettings", |identity, body| {
            access::check_admin(&identity)?;
            let _guard = self.config_lock.lock().await;
            let snapshot = self.snapshot();
            self.channel_of(&snapshot, &identity, &body.channel_id)?;
            let mut violations = Violations::default();
            if body.treat_as_tickets {
                if body.default_pipeline.trim().is_empty() {
                    violations.add("default_pipeline", "is required when treat_as_tickets is on (T1)");
                }
                if body.default_stage.trim().is_empty() {
                    violations.add("default_stage", "is required when treat_as_tickets is on (T1)");
                }
            }
            if !body.fixed_owner_agent_id.is_empty()
                && self.agent_of(&snapshot, &identity, &body.fixed_owner_agent_id).is_err()
            {
                violations.add("fixed_owner_agent_id", "is not an agent of this account");
            }
            violations.into_result()?;
            let mut settings = TicketSettingsConfigured {
                channel_id: body.channel_id.clone(),
                treat_as_tickets: body.treat_as_tickets,
                default_pipeline: body.default_pipeline.trim().to_owned(),
                default_stage: body.default_stage.trim().to_owned(),
                fixed_owner_agent_id: body.fixed_owner_agent_id.clone(),
                contact_association_limit: body.contact_association_limit,
                version: 0,
            };
            let key = config_key(&identity.account_id, &Payload::TicketSettingsConfigured(settings.clone()))
                .expect("ticket settings have a config key");
            settings.version = next_config_version(self.pool(), &key).await?;
            Ok(vec![self.publish_config(&identity, Payload::TicketSettingsConfigured(settings)).await?])
        })
    }

    async fn create_agent(&self, request: Request<CreateAgentRequest>) -> Result<Response<CommandResult>, Status> {
        command!(self, request, "CreateAgent", |identity, body| {
            access::check_admin(&identity)?;
            let mut violations = Violations::default();
            check_entity_id(&mut violations, "agent_id", &body.agent_id);
            check_name(&mut violations, "name", &body.name);
            if !body.email.is_empty() && !body.email.contains('@') {
                violations.add("email", "must be an email address");
            }
            let role = if body.role.is_empty() { Some(Role::Agent) } else { Role::parse(&body.role) };
            if role.is_none() {
                violations.add("role", "must be agent, admin or super_admin");
            }
            check_labels(&mut violations, "team_ids", &body.team_ids);
            check_labels(&mut violations, "skills", &body.skills);
            check_capacity(&mut violations, &body.capacity_per_channel_type);
            violations.into_result()?;
            let role = role.unwrap_or(Role::Agent);
            access::check_may_grant_role(&identity, role)?;
            let _guard = self.config_lock.lock().await;
            let snapshot = self.snapshot();
            if snapshot.agents.contains(&identity.account_id, &body.agent_id) {
                return Err(ApiError::AlreadyExists { what: "agent", id: body.agent_id.clone() });
            }
            let agent = AgentConfigured {
                agent_id: body.agent_id.clone(),
                name: body.name.trim().to_owned(),
                email: body.email.clone(),
                paid_seat: body.paid_seat,
                available: body.available,
                team_ids: body.team_ids.clone(),
                skills: body.skills.clone(),
                max_open_conversations: body.max_open_conversations,
                capacity_per_channel_type: body.capacity_per_channel_type.clone(),
                role: role.name().to_owned(),
            };
            refuse_breaches(config_rules::agent_breaches(&snapshot, &agent))?;
            Ok(vec![self.publish_config(&identity, Payload::AgentConfigured(agent)).await?])
        })
    }

    async fn set_agent_seat(&self, request: Request<SetAgentSeatRequest>) -> Result<Response<CommandResult>, Status> {
        command!(self, request, "SetAgentSeat", |identity, body| {
            let account_id = identity.account_id.clone();
            self.update_agent(&identity, &body.agent_id, |snapshot, agent| {
                if agent.paid_seat && !body.paid_seat {
                    refuse_breaches(
                        config_rules::rules_naming_agent(snapshot, &account_id, &agent.agent_id).into_iter().collect(),
                    )?;
                }
                agent.paid_seat = body.paid_seat;
                Ok(())
            })
            .await
        })
    }

    async fn set_agent_skills(
        &self,
        request: Request<SetAgentSkillsRequest>,
    ) -> Result<Response<CommandResult>, Status> {
        command!(self, request, "SetAgentSkills", |identity, body| {
            let mut violations = Violations::default();
            check_labels(&mut violations, "skills", &body.skills);
            violations.into_result()?;
            self.update_agent(&identity, &body.agent_id, |_, agent| {
                agent.skills = body.skills.clone();
                Ok(())
            })
            .await
        })
    }

    async fn set_agent_teams(&self, request: Request<SetAgentTeamsRequest>) -> Result<Response<CommandResult>, Status> {
        command!(self, request, "SetAgentTeams", |identity, body| {
            let mut violations = Violations::default();
            check_labels(&mut violations, "team_ids", &body.team_ids);
            violations.into_result()?;
            self.update_agent(&identity, &body.agent_id, |_, agent| {
                agent.team_ids = body.team_ids.clone();
                Ok(())
            })
            .await
        })
    }

    async fn set_agent_capacity(
        &self,
        request: Request<SetAgentCapacityRequest>,
    ) -> Result<Response<CommandResult>, Status> {
        command!(self, request, "SetAgentCapacity", |identity, body| {
            let mut violations = Violations::default();
            check_capacity(&mut violations, &body.capacity_per_channel_type);
            violations.into_result()?;
            self.update_agent(&identity, &body.agent_id, |_, agent| {
                agent.max_open_conversations = body.max_open_conversations;
                agent.capacity_per_channel_type = body.capacity_per_channel_type.clone();
                Ok(())
            })
            .await
        })
    }

    async fn set_agent_availability(
        &self,
        request: Request<SetAgentAvailabilityRequest>,
    ) -> Result<Response<CommandResult>, Status> {
        command!(self, request, "SetAgentAvailability", |identity, body| {
            let agent_id = if body.agent_id.is_empty() { identity.user_id.clone() } else { body.agent_id.clone() };
            if agent_id != identity.user_id {
                access::check_admin(&identity)
                    .map_err(|_| ApiError::denied("agents may only set their own availability"))?;
            }
            let _guard = self.config_lock.lock().await;
            let mut agent = self.agent_of(&self.snapshot(), &identity, &agent_id)?;
            // The command is what routing follows (ordered with messages on inbound.v1); the
            // config record keeps the agents read model and the chat widget current.
            let command = Payload::AgentAvailabilityChanged(AgentAvailabilityChanged {
                agent_id: agent_id.clone(),
                available: body.available,
                request_id: body.request_id.clone(),
                actor: actor(&identity),
            });
            let inbound_position = self.publish_command(&identity, command).await?;
            agent.available = body.available;
            let config_position = self.publish_config(&identity, Payload::AgentConfigured(agent)).await?;
            Ok(vec![inbound_position, config_position])
        })
    }

    async fn assign_conversation(
        &self,
        request: Request<AssignConversationRequest>,
    ) -> Result<Response<CommandResult>, Status> {
        command!(self, request, "AssignConversation", |identity, body| {
            let assignee_id = if body.assignee_agent_id.is_empty() {
                identity.user_id.clone()
            } else {
                body.assignee_agent_id.clone()
            };
            let conversation = self
                .authorised_conversation(
                    &identity,
                    &body.conversation_id,
                    ConversationAction::Assign { assignee_id: &assignee_id },
                )
                .await?;
            if !conversation.is_open {
                return Err(ApiError::FailedPrecondition("the conversation is closed".into()));
            }
            let assignee = self.agent_of(&conversation.snapshot, &identity, &assignee_id).map_err(|_| {
                ApiError::invalid("assignee_agent_id", format!("`{assignee_id}` is not an agent of this account"))
            })?;
            // I2: the assignee must be able to work in the inbox.
            if !conversation.inbox.has_member(&assignee.agent_id, &assignee.team_ids) {
                return Err(ApiError::invalid(
                    "assignee_agent_id",
                    format!("`{assignee_id}` has no access to inbox `{}`", conversation.inbox.inbox_id),
                ));
            }
            let command = Payload::ManualAssignmentRequested(ManualAssignmentRequested {
                conversation_id: conversation.conversation_id.to_string(),
                assignee_agent_id: assignee_id,
                request_id: body.request_id.clone(),
                actor: actor(&identity),
            });
            Ok(vec![self.publish_command(&identity, command).await?])
        })
    }

    async fn unassign_conversation(
        &self,
        request: Request<UnassignConversationRequest>,
    ) -> Result<Response<CommandResult>, Status> {
        command!(self, request, "UnassignConversation", |identity, body| {
            let conversation =
                self.authorised_conversation(&identity, &body.conversation_id, ConversationAction::Unassign).await?;
            if conversation.current_assignee_opt.is_none() {
                return Err(ApiError::FailedPrecondition("the conversation is not assigned".into()));
            }
            let command = Payload::ManualAssignmentRequested(ManualAssignmentRequested {
                conversation_id: conversation.conversation_id.to_string(),
                assignee_agent_id: String::new(),
                request_id: body.request_id.clone(),
                actor: actor(&identity),
            });
            Ok(vec![self.publish_command(&identity, command).await?])
        })
    }

    async fn close_conversation(
        &self,
        request: Request<CloseConversationRequest>,
    ) -> Result<Response<CommandResult>, Status> {
        command!(self, request, "CloseConversation", |identity, body| {
            let conversation =
                self.authorised_conversation(&identity, &body.conversation_id, ConversationAction::Close).await?;
            if !conversation.is_open {
                return Err(ApiError::FailedPrecondition("the conversation is already closed".into()));
            }
            let command = Payload::ConversationCloseRequested(ConversationCloseRequested {
                conversation_id: conversation.conversation_id.to_string(),
                request_id: body.request_id.clone(),
                actor: actor(&identity),
            });
            Ok(vec![self.publish_command(&identity, command).await?])
        })
    }

    async fn move_ticket_stage(
        &self,
        request: Request<MoveTicketStageRequest>,
    ) -> Result<Response<CommandResult>, Status> {
        command!(self, request, "MoveTicketStage", |identity, body| {
            let ticket_id = scope::parse_uuid("ticket_id", &body.ticket_id)?;
            if body.stage.trim().is_empty() && !body.close {
                return Err(ApiError::invalid("stage", "is required unless the ticket is being closed"));
            }
            let mut connection = self.read.connection().await?;
            let ticket: Option<(String, Option<String>, String)> = sqlx::query_as(
                "SELECT inbox_id, owner_agent_id, status FROM tickets WHERE ticket_id = $1 AND account_id = $2",
            )
            .bind(ticket_id)
            .bind(&identity.account_id)
            .fetch_optional(&mut *connection)
            .await?;
            let Some((inbox_id, owner_opt, status)) = ticket else {
                return Err(ApiError::not_found("ticket", ticket_id.to_string()));
            };
            let snapshot = self.snapshot();
            let inbox = self
                .inbox_of(&snapshot, &identity, &inbox_id)
                .map_err(|_| ApiError::not_found("ticket", ticket_id.to_string()))?;
            access::check_act(&identity, &inbox, "ticket", &ticket_id.to_string())?;
            // I4, as for conversations: without a seat, only one's own tickets.
            let caller_paid_seat = caller_has_paid_seat(&snapshot, &identity);
            access::check_seat_allows(&identity, caller_paid_seat, owner_opt.as_deref(), ConversationAction::Close)?;
            if status != "open" {
                return Err(ApiError::FailedPrecondition("the ticket is closed".into()));
            }
            let command = Payload::TicketStageChangeRequested(TicketStageChangeRequested {
                ticket_id: ticket_id.to_string(),
                stage: body.stage.trim().to_owned(),
                close: body.close,
                request_id: body.request_id.clone(),
                actor: actor(&identity),
            });
            Ok(vec![self.publish_command(&identity, command).await?])
        })
    }

    /// O1-O4: built in [`crate::replies`].
    async fn send_reply(&self, request: Request<SendReplyRequest>) -> Result<Response<ReplyResult>, Status> {
        self.reply_command(request).await
    }

    /// O1: built in [`crate::replies`].
    async fn add_internal_note(
        &self,
        request: Request<AddInternalNoteRequest>,
    ) -> Result<Response<ReplyResult>, Status> {
        self.note_command(request).await
    }

    async fn set_contact_owner(
        &self,
        request: Request<SetContactOwnerRequest>,
    ) -> Result<Response<CommandResult>, Status> {
        command!(self, request, "SetContactOwner", |identity, body| {
            let contact_id = scope::parse_uuid("contact_id", &body.contact_id)?;
            let snapshot = self.snapshot();
            if !caller_has_paid_seat(&snapshot, &identity) {
                return Err(ApiError::denied("only users with a paid seat may change contact owners"));
            }
            if !body.owner_agent_id.is_empty() && self.agent_of(&snapshot, &identity, &body.owner_agent_id).is_err() {
                return Err(ApiError::invalid("owner_agent_id", "is not an agent of this account"));
            }
            let mut connection = self.read.connection().await?;
            let exists: Option<(Uuid,)> =
                sqlx::query_as("SELECT contact_id FROM contacts WHERE contact_id = $1 AND account_id = $2")
                    .bind(contact_id)
                    .bind(&identity.account_id)
                    .fetch_optional(&mut *connection)
                    .await?;
            if exists.is_none() {
                return Err(ApiError::not_found("contact", contact_id.to_string()));
            }
            let command = Payload::ContactOwnerChangeRequested(ContactOwnerChangeRequested {
                contact_id: contact_id.to_string(),
                owner_agent_id: body.owner_agent_id.clone(),
                request_id: body.request_id.clone(),
                actor: actor(&identity),
            });
            Ok(vec![self.publish_command(&identity, command).await?])
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(user: &str, teams: &[&str]) -> Identity {
        Identity {
            user_id: user.into(),
            account_id: "acme".into(),
            role: Role::Admin,
            team_ids: teams.iter().map(|team| team.to_string()).collect(),
        }
    }

    #[test]
    fn request_ids_are_required_and_bounded() {
        assert!(validate_request_id("").is_err());
        assert!(validate_request_id(&"x".repeat(129)).is_err());
        assert!(validate_request_id("a\nb").is_err());
        assert!(validate_request_id(&Uuid::now_v7().to_string()).is_ok());
    }

    #[test]
    fn entity_ids_names_and_labels_are_checked_field_by_field() {
        let mut violations = Violations::default();
        check_entity_id(&mut violations, "inbox_id", "Bad Id!");
        check_name(&mut violations, "name", "  ");
        check_labels(&mut violations, "skills", &["fr".into(), "fr".into(), String::new()]);
        let Err(ApiError::InvalidArgument(found)) = violations.into_result() else { panic!("expected violations") };
        let fields: Vec<&str> = found.iter().map(|violation| violation.field.as_str()).collect();
        assert_eq!(fields, ["inbox_id", "name", "skills[1]", "skills[2]"]);
    }

    #[test]
    fn i3_an_admin_cannot_lock_themselves_out_of_an_inbox() {
        let admin = identity("root", &["ops"]);
        let specific = InboxAccessMode::SpecificUsersAndTeams;
        assert!(check_keeps_caller(&admin, specific, &["ana".into()], &[]).is_err());
        assert!(check_keeps_caller(&admin, specific, &["root".into()], &[]).is_ok());
        assert!(check_keeps_caller(&admin, specific, &[], &["ops".into()]).is_ok());
        assert!(check_keeps_caller(&admin, InboxAccessMode::Everyone, &[], &[]).is_ok());
    }

    #[test]
    fn channel_settings_must_match_the_channel_type() {
        let mut chat = ChannelConfigured { channel_type: ChannelType::Chat as i32, ..Default::default() };
        let email = ChannelSettings {
            settings: Some(Settings::Email(switchboard_proto::events::v1::EmailSettings {
                team_address: "support@acme.test".into(),
                ..Default::default()
            })),
        };
        let mut violations = Violations::default();
        apply_settings(&mut violations, &mut chat, Some(&email));
        assert!(violations.into_result().is_err());
        let mut team_email = ChannelConfigured { channel_type: ChannelType::TeamEmail as i32, ..Default::default() };
        let mut violations = Violations::default();
        apply_settings(&mut violations, &mut team_email, Some(&email));
        assert!(violations.into_result().is_ok());
        assert_eq!(team_email.email.unwrap().team_address, "support@acme.test");
    }

    #[test]
    fn c5_chat_behaviours_must_be_ones_the_widget_knows() {
        let chat_settings = |offline_behaviour: &str, at_capacity_behaviour: &str| ChannelSettings {
            settings: Some(Settings::Chat(switchboard_proto::events::v1::ChatSettings {
                offline_behaviour: offline_behaviour.into(),
                at_capacity_behaviour: at_capacity_behaviour.into(),
                ..Default::default()
            })),
        };
        let mut chat = ChannelConfigured { channel_type: ChannelType::Chat as i32, ..Default::default() };
        let mut violations = Violations::default();
        apply_settings(&mut violations, &mut chat, Some(&chat_settings("hide_launcher", "waiting_message")));
        assert!(violations.into_result().is_ok());
        assert_eq!(chat.chat.unwrap().at_capacity_behaviour, "waiting_message");
        let mut chat = ChannelConfigured { channel_type: ChannelType::Chat as i32, ..Default::default() };
        let mut violations = Violations::default();
        apply_settings(&mut violations, &mut chat, Some(&chat_settings("vanish", "queue")));
        let Err(ApiError::InvalidArgument(found)) = violations.into_result() else { panic!("expected violations") };
        let fields: Vec<&str> = found.iter().map(|violation| violation.field.as_str()).collect();
        assert_eq!(fields, ["settings.chat.offline_behaviour", "settings.chat.at_capacity_behaviour"]);
    }

    #[test]
    fn m1_config_keys_name_the_account() {
        let payload = Payload::TicketSettingsConfigured(TicketSettingsConfigured {
            channel_id: "web".into(),
            ..Default::default()
        });
        assert_eq!(config_key("acme", &payload).as_deref(), Some("tickets/acme/web"));
        let inbox = Payload::InboxConfigured(InboxConfigured { inbox_id: "support".into(), ..Default::default() });
        assert_eq!(config_key("acme", &inbox).as_deref(), Some("inbox/acme/support"));
        assert_ne!(config_key("acme", &inbox), config_key("globex", &inbox));
    }
}
