//! The declarative config file (TOML) and its translation into config events.
//!
//! Until the admin API exists, an account's inboxes, channels, routing rules and agents are
//! declared in a file and applied with `api apply-config FILE`. Applying is idempotent: only
//! entities whose state differs from the config topic are published, and a routing rule's
//! version increases exactly when its rule changes (B2 records that version).

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, bail};
use chrono::Utc;
use serde::Deserialize;
use switchboard_proto::events::v1::envelope::Payload;
use switchboard_proto::events::v1::{
    AgentConfigured, AssignTarget, AssignmentStrategy, ChannelConfigured, ChannelType, ChannelTypeCapacity,
    ChatHoursRange, ChatSettings, ConsentMode, CustomChannelSettings, EmailSettings, InboxAccessMode, InboxConfigured,
    InboxKind, MessengerSettings, RoutingRulesConfigured, TicketSettingsConfigured, WhatsAppSettings, WhatsAppTemplate,
};
use switchboard_proto::names;
use switchboard_runtime::config_store::{ConfigSnapshot, config_key};

use crate::config_rules::{self, Breach};
use switchboard_runtime::envelope;
use switchboard_runtime::outbound;
use switchboard_runtime::publisher::EnvelopePublisher;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub account_id: String,
    #[serde(default)]
    pub inboxes: Vec<InboxDecl>,
    #[serde(default)]
    pub channels: Vec<ChannelDecl>,
    #[serde(default)]
    pub agents: Vec<AgentDecl>,
    /// C12: mail domain of the fallback addresses of inboxes this file creates (the API's
    /// `--fallback-email-domain`); not part of the file. `None`: the default domain.
    #[serde(skip)]
    pub fallback_email_domain_opt: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboxDecl {
    pub id: String,
    pub name: String,
    /// I2: `everyone` (default) or `specific_users_and_teams`.
    #[serde(default = "default_access")]
    pub access: String,
    #[serde(default)]
    pub access_users: Vec<String>,
    #[serde(default)]
    pub access_teams: Vec<String>,
    /// I5: `conversations` (default) or `help_desk` (every conversation becomes a ticket).
    #[serde(default = "default_inbox_kind")]
    pub kind: String,
    /// C12: the from-name of the inbox's fallback address (default: `name`); unique among the
    /// installation's fallback addresses.
    #[serde(default)]
    pub fallback_from_name: String,
}

fn default_inbox_kind() -> String {
    "conversations".into()
}

fn default_access() -> String {
    "everyone".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelDecl {
    pub id: String,
    pub inbox: String,
    #[serde(rename = "type")]
    pub channel_type: String,
    pub name: String,
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default)]
    pub routing: RoutingDecl,
    /// T1/R9/T2: ticket creation for this channel (absent: no tickets unless the inbox is a
    /// help desk).
    pub tickets: Option<TicketsDecl>,
    /// Type-specific settings; only the one matching `type` may be given.
    pub email: Option<EmailDecl>,
    pub chat: Option<ChatDecl>,
    pub messenger: Option<MessengerDecl>,
    pub whatsapp: Option<WhatsAppDecl>,
    pub custom: Option<CustomDecl>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TicketsDecl {
    #[serde(default = "yes")]
    pub treat_as_tickets: bool,
    pub pipeline: String,
    pub stage: String,
    /// R9: a fixed owner instead of the conversation's assignee.
    #[serde(default)]
    pub fixed_owner: String,
    /// T2/C7: tickets a contact may be associated with; 0 = no limit.
    #[serde(default)]
    pub contact_association_limit: u32,
}

/// C1-C3. Secrets never go here (see docs/channels.md).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailDecl {
    pub team_address: String,
    /// C2: `agent_and_company` (default) or `company`.
    #[serde(default = "default_from_name_mode")]
    pub from_name_mode: String,
    #[serde(default)]
    pub from_address: String,
    #[serde(default)]
    pub signature: String,
    #[serde(default)]
    pub signature_is_html: bool,
    /// C3: log forwarded mail to the forwarder instead of the original sender.
    #[serde(default)]
    pub log_forwarded_to_forwarder: bool,
    /// C12: the team address is disconnected; replies go out from the inbox's fallback address.
    #[serde(default)]
    pub disconnected: bool,
}

fn default_from_name_mode() -> String {
    "agent_and_company".into()
}

/// C5: what the website widget shows.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatDecl {
    #[serde(default)]
    pub accent_colour: String,
    #[serde(default)]
    pub welcome_message: String,
    #[serde(default)]
    pub pop_open_welcome: bool,
    /// `user_availability` (default), `chat_hours` or `always`.
    #[serde(default = "default_availability_mode")]
    pub availability_mode: String,
    /// IANA time zone of `hours`, e.g. `Europe/Berlin`.
    #[serde(default)]
    pub time_zone: String,
    #[serde(default)]
    pub hours: Vec<ChatHoursDecl>,
    #[serde(default)]
    pub typical_reply_time: String,
    #[serde(default)]
    pub away_message: String,
    /// `show_return_time`, `away_message` (default) or `hide_launcher`.
    #[serde(default = "default_offline_behaviour")]
    pub offline_behaviour: String,
    /// `waiting_message`, `hide_launcher` or `nothing` (default).
    #[serde(default = "default_at_capacity_behaviour")]
    pub at_capacity_behaviour: String,
    #[serde(default)]
    pub at_capacity_message: String,
}

fn default_availability_mode() -> String {
    "user_availability".into()
}

fn default_offline_behaviour() -> String {
    "away_message".into()
}

fn default_at_capacity_behaviour() -> String {
    "nothing".into()
}

/// One opening range: `weekday` 0 = Monday .. 6 = Sunday, `from`/`until` as `HH:MM` local time.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatHoursDecl {
    pub weekday: u32,
    pub from: String,
    pub until: String,
}

/// C6.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessengerDecl {
    pub page_id: String,
    /// `implicit` (default) or `explicit`.
    #[serde(default = "default_consent_mode")]
    pub consent_mode: String,
    #[serde(default)]
    pub consent_text: String,
    #[serde(default)]
    pub greeting: String,
    #[serde(default)]
    pub instant_reply: String,
}

fn default_consent_mode() -> String {
    "implicit".into()
}

/// C8.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WhatsAppDecl {
    pub phone_number_id: String,
    #[serde(default)]
    pub display_phone_number: String,
    /// C8: the templates Meta approved for the number (the only messages outside 24 hours).
    #[serde(default)]
    pub templates: Vec<WhatsAppTemplateDecl>,
    /// Outbound messages per second for the number; 0 = Meta's default (80).
    #[serde(default)]
    pub messages_per_second: u32,
}

/// C8: `{ name = "order_update", language = "en_US", parameters = 2 }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WhatsAppTemplateDecl {
    pub name: String,
    pub language: String,
    #[serde(default)]
    pub parameters: u32,
}

/// C10: where replies to the custom app are delivered (its signing key is in the secrets file).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomDecl {
    pub delivery_url: String,
    /// Outbound messages per second to the app; 0 = no limit.
    #[serde(default)]
    pub messages_per_second: u32,
}

fn yes() -> bool {
    true
}

/// Routing rules of a channel; the defaults are the spec's (R1: auto-assignment off, R5: only
/// available users on).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingDecl {
    #[serde(default)]
    pub auto_assign: bool,
    /// `nobody`, `specific_users_and_teams` or `contact_owner`.
    #[serde(default = "default_target")]
    pub assign_to: String,
    #[serde(default)]
    pub users: Vec<String>,
    #[serde(default)]
    pub teams: Vec<String>,
    #[serde(default = "yes")]
    pub only_available: bool,
    /// `round_robin` or `balanced`.
    #[serde(default = "default_strategy")]
    pub strategy: String,
    /// R7: only members holding every listed skill are eligible.
    #[serde(default)]
    pub required_skills: Vec<String>,
    /// B3: assign waiting unassigned conversations when an agent frees up.
    #[serde(default)]
    pub redrive_backlog: bool,
}

impl Default for RoutingDecl {
    fn default() -> Self {
        RoutingDecl {
            auto_assign: false,
            assign_to: default_target(),
            users: Vec::new(),
            teams: Vec::new(),
            only_available: true,
            strategy: default_strategy(),
            required_skills: Vec::new(),
            redrive_backlog: false,
        }
    }
}

fn default_target() -> String {
    "nobody".into()
}

fn default_strategy() -> String {
    "round_robin".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentDecl {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub email: String,
    #[serde(default)]
    pub paid_seat: bool,
    #[serde(default)]
    pub available: bool,
    #[serde(default)]
    pub teams: Vec<String>,
    #[serde(default)]
    pub skills: Vec<String>,
    /// 0: no limit.
    #[serde(default)]
    pub max_open_conversations: u32,
    /// R8: per-channel-type limits, e.g. `{ chat = 3, team_email = 10 }`.
    #[serde(default)]
    pub capacity: BTreeMap<String, u32>,
    /// I3: `agent` (default), `admin` or `super_admin`.
    #[serde(default = "default_role")]
    pub role: String,
}

fn default_role() -> String {
    "agent".into()
}

/// `HH:MM` → minutes since midnight (24:00 allowed as the end of the day).
fn minutes_of_day(text: &str) -> anyhow::Result<u32> {
    let (hours, minutes) = text.split_once(':').with_context(|| format!("`{text}` is not HH:MM"))?;
    let hours: u32 = hours.parse().with_context(|| format!("`{text}` is not HH:MM"))?;
    let minutes: u32 = minutes.parse().with_context(|| format!("`{text}` is not HH:MM"))?;
    if minutes >= 60 || hours > 24 || (hours == 24 && minutes != 0) {
        bail!("`{text}` is not a time of day");
    }
    Ok(hours * 60 + minutes)
}

impl ChannelDecl {
    /// The type-specific settings sub-messages, checked against the channel's type.
    fn settings(&self, channel_type: ChannelType) -> anyhow::Result<ChannelConfigured> {
        let given = [
            ("email", self.email.is_some(), ChannelType::TeamEmail),
            ("chat", self.chat.is_some(), ChannelType::Chat),
            ("messenger", self.messenger.is_some(), ChannelType::FacebookMessenger),
            ("whatsapp", self.whatsapp.is_some(), ChannelType::Whatsapp),
            ("custom", self.custom.is_some(), ChannelType::Custom),
        ];
        for (section, present, for_type) in given {
            if present && for_type != channel_type {
                bail!("channel `{}`: `[{section}]` settings do not fit a `{}` channel", self.id, self.channel_type);
            }
        }
        let mut channel = ChannelConfigured::default();
        if let Some(email) = &self.email {
            if !email.team_address.contains('@') {
                bail!("channel `{}`: team_address `{}` is not an email address", self.id, email.team_address);
            }
            if !matches!(email.from_name_mode.as_str(), "agent_and_company" | "company") {
                bail!("channel `{}`: unknown from_name_mode `{}`", self.id, email.from_name_mode);
            }
            channel.email = Some(EmailSettings {
                team_address: email.team_address.trim().to_lowercase(),
                from_name_mode: email.from_name_mode.clone(),
                from_address: email.from_address.clone(),
                signature: email.signature.clone(),
                signature_is_html: email.signature_is_html,
                log_forwarded_to_forwarder: email.log_forwarded_to_forwarder,
                disconnected: email.disconnected,
            });
        }
        if let Some(chat) = &self.chat {
            if !matches!(chat.availability_mode.as_str(), "user_availability" | "chat_hours" | "always") {
                bail!("channel `{}`: unknown availability_mode `{}`", self.id, chat.availability_mode);
            }
            if !matches!(chat.offline_behaviour.as_str(), "show_return_time" | "away_message" | "hide_launcher") {
                bail!("channel `{}`: unknown offline_behaviour `{}`", self.id, chat.offline_behaviour);
            }
            if !matches!(chat.at_capacity_behaviour.as_str(), "waiting_message" | "hide_launcher" | "nothing") {
                bail!("channel `{}`: unknown at_capacity_behaviour `{}`", self.id, chat.at_capacity_behaviour);
            }
            if chat.availability_mode == "chat_hours" && (chat.time_zone.is_empty() || chat.hours.is_empty()) {
                bail!("channel `{}`: chat_hours needs a time_zone and at least one [[channels.chat.hours]]", self.id);
            }
            let mut chat_hours = Vec::with_capacity(chat.hours.len());
            for range in &chat.hours {
                let start_minute = minutes_of_day(&range.from).with_context(|| format!("channel `{}`", self.id))?;
                let end_minute = minutes_of_day(&range.until).with_context(|| format!("channel `{}`", self.id))?;
                if range.weekday > 6 || start_minute >= end_minute {
                    bail!("channel `{}`: chat hours need weekday 0-6 and from < until", self.id);
                }
                chat_hours.push(ChatHoursRange { weekday: range.weekday, start_minute, end_minute });
            }
            channel.chat = Some(ChatSettings {
                accent_colour: chat.accent_colour.clone(),
                welcome_message: chat.welcome_message.clone(),
                pop_open_welcome: chat.pop_open_welcome,
                availability_mode: chat.availability_mode.clone(),
                time_zone: chat.time_zone.clone(),
                chat_hours,
                typical_reply_time: chat.typical_reply_time.clone(),
                away_message: chat.away_message.clone(),
                offline_behaviour: chat.offline_behaviour.clone(),
                at_capacity_behaviour: chat.at_capacity_behaviour.clone(),
                at_capacity_message: chat.at_capacity_message.clone(),
            });
        }
        if let Some(messenger) = &self.messenger {
            let Some(consent_mode) = names::parse::<ConsentMode>(&messenger.consent_mode) else {
                bail!("channel `{}`: unknown consent_mode `{}`", self.id, messenger.consent_mode);
            };
            channel.messenger = Some(MessengerSettings {
                page_id: messenger.page_id.clone(),
                consent_mode: consent_mode as i32,
                consent_text: messenger.consent_text.clone(),
                greeting: messenger.greeting.clone(),
                instant_reply: messenger.instant_reply.clone(),
            });
        }
        if let Some(whatsapp) = &self.whatsapp {
            channel.whatsapp = Some(WhatsAppSettings {
                phone_number_id: whatsapp.phone_number_id.clone(),
                display_phone_number: whatsapp.display_phone_number.clone(),
                templates: whatsapp
                    .templates
                    .iter()
                    .map(|template| WhatsAppTemplate {
                        name: template.name.trim().to_owned(),
                        language: template.language.trim().to_owned(),
                        parameter_count: template.parameters,
                    })
                    .collect(),
                messages_per_second: whatsapp.messages_per_second,
            });
        }
        if let Some(custom) = &self.custom {
            channel.custom = Some(CustomChannelSettings {
                delivery_url: custom.delivery_url.trim().to_owned(),
                messages_per_second: custom.messages_per_second,
            });
        }
        if let Some((field, problem)) = config_rules::channel_settings_problems(&channel).into_iter().next() {
            bail!("channel `{}`: {field} {problem}", self.id);
        }
        Ok(channel)
    }
}

fn channel_type(name: &str) -> anyhow::Result<ChannelType> {
    names::parse(name).with_context(|| format!("unknown channel type `{name}`"))
}

impl ConfigFile {
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let file: ConfigFile = toml::from_str(text).context("config file is not valid")?;
        file.validate()?;
        Ok(file)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.account_id.trim().is_empty() {
            bail!("account_id must not be empty");
        }
        let ids = self
            .inboxes
            .iter()
            .map(|inbox| ("inbox", &inbox.id))
            .chain(self.channels.iter().map(|channel| ("channel", &channel.id)))
            .chain(self.agents.iter().map(|agent| ("agent", &agent.id)));
        for (kind, id) in ids {
            if !config_rules::is_entity_id(id) {
                bail!("{kind} id `{id}` must be 1..64 characters of a-z, 0-9, '_' and '-'");
            }
        }
        let inbox_ids: BTreeSet<&str> = self.inboxes.iter().map(|inbox| inbox.id.as_str()).collect();
        let agent_ids: BTreeSet<&str> = self.agents.iter().map(|agent| agent.id.as_str()).collect();
        for channel in &self.channels {
            if !inbox_ids.contains(channel.inbox.as_str()) {
                bail!("channel `{}` names unknown inbox `{}`", channel.id, channel.inbox);
            }
            channel_type(&channel.channel_type).with_context(|| format!("channel `{}`", channel.id))?;
            if let Some(tickets) = &channel.tickets
                && !tickets.fixed_owner.is_empty()
                && !agent_ids.contains(tickets.fixed_owner.as_str())
            {
                bail!("tickets of channel `{}` name unknown fixed owner `{}`", channel.id, tickets.fixed_owner);
            }
            for user in &channel.routing.users {
                if !agent_ids.contains(user.as_str()) {
                    bail!("routing rules of channel `{}` name unknown agent `{user}`", channel.id);
                }
            }
        }
        Ok(())
    }

    /// The config events this file declares. `current` supplies rule versions: a rule keeps its
    /// version when unchanged, and gets the next one when changed.
    pub fn to_payloads(&self, current: &ConfigSnapshot) -> anyhow::Result<Vec<Payload>> {
        let mut payloads = Vec::new();
        for inbox in &self.inboxes {
            let Some(access_mode) = names::parse::<InboxAccessMode>(&inbox.access) else {
                bail!("inbox `{}`: unknown access `{}`", inbox.id, inbox.access);
            };
            let Some(kind) = names::parse::<InboxKind>(&inbox.kind) else {
                bail!("inbox `{}`: unknown kind `{}`", inbox.id, inbox.kind);
            };
            // C12: an inbox keeps the fallback address it was given; a new one gets one now.
            let fallback_address = current
                .inboxes
                .get(&self.account_id, &inbox.id)
                .map(|existing| existing.entity.fallback_address.clone())
                .filter(|address| !address.is_empty())
                .unwrap_or_else(|| {
                    outbound::default_fallback_address(
                        &self.account_id,
                        &inbox.id,
                        self.fallback_email_domain_opt.as_deref().unwrap_or(outbound::DEFAULT_FALLBACK_DOMAIN),
                    )
                });
            // A from-name not declared: the one the inbox has, else a unique default.
            let fallback_from_name = if inbox.fallback_from_name.trim().is_empty() {
                current
                    .inboxes
                    .get(&self.account_id, &inbox.id)
                    .map(|existing| existing.entity.fallback_from_name.clone())
                    .filter(|from_name| !from_name.is_empty())
                    .unwrap_or_else(|| {
                        config_rules::default_fallback_from_name(current, &self.account_id, &inbox.id, &inbox.name)
                    })
            } else {
                inbox.fallback_from_name.trim().to_owned()
            };
            payloads.push(Payload::InboxConfigured(InboxConfigured {
                inbox_id: inbox.id.clone(),
                name: inbox.name.clone(),
                access_mode: access_mode as i32,
                access_user_ids: inbox.access_users.clone(),
                access_team_ids: inbox.access_teams.clone(),
                kind: kind as i32,
                fallback_address,
                fallback_from_name,
            }));
        }
        for agent in &self.agents {
            payloads.push(Payload::AgentConfigured(AgentConfigured {
                agent_id: agent.id.clone(),
                name: agent.name.clone(),
                email: agent.email.clone(),
                paid_seat: agent.paid_seat,
                available: agent.available,
                team_ids: agent.teams.clone(),
                skills: agent.skills.clone(),
                max_open_conversations: agent.max_open_conversations,
                capacity_per_channel_type: agent
                    .capacity
                    .iter()
                    .map(|(type_name, max_open)| {
                        let channel_type = channel_type(type_name).with_context(|| format!("agent `{}`", agent.id))?;
                        Ok(ChannelTypeCapacity { channel_type: channel_type as i32, max_open: *max_open })
                    })
                    .collect::<anyhow::Result<_>>()?,
                role: match agent.role.as_str() {
                    role @ ("agent" | "admin" | "super_admin") => role.to_owned(),
                    other => bail!("agent `{}`: unknown role `{other}`", agent.id),
                },
            }));
        }
        for channel in &self.channels {
            let declared_type = channel_type(&channel.channel_type)?;
            payloads.push(Payload::ChannelConfigured(Box::new(ChannelConfigured {
                channel_id: channel.id.clone(),
                inbox_id: channel.inbox.clone(),
                channel_type: declared_type as i32,
                name: channel.name.clone(),
                enabled: channel.enabled,
                ..channel.settings(declared_type)?
            })));
            if let Some(tickets) = &channel.tickets {
                if tickets.pipeline.trim().is_empty() || tickets.stage.trim().is_empty() {
                    bail!("channel `{}`: tickets need a pipeline and a stage (T1)", channel.id);
                }
                let mut settings = TicketSettingsConfigured {
                    channel_id: channel.id.clone(),
                    treat_as_tickets: tickets.treat_as_tickets,
                    default_pipeline: tickets.pipeline.trim().to_owned(),
                    default_stage: tickets.stage.trim().to_owned(),
                    fixed_owner_agent_id: tickets.fixed_owner.clone(),
                    contact_association_limit: tickets.contact_association_limit,
                    version: 0,
                };
                settings.version = next_version(
                    current.ticket_settings.get(&self.account_id, &channel.id).map(|existing| &existing.entity),
                    &settings,
                );
                payloads.push(Payload::TicketSettingsConfigured(settings));
            }
            let routing = &channel.routing;
            let Some(target) = names::parse::<AssignTarget>(&routing.assign_to) else {
                bail!("channel `{}`: unknown assign_to `{}`", channel.id, routing.assign_to);
            };
            let Some(strategy) = names::parse::<AssignmentStrategy>(&routing.strategy) else {
                bail!("channel `{}`: unknown strategy `{}`", channel.id, routing.strategy);
            };
            let mut rules = RoutingRulesConfigured {
                channel_id: channel.id.clone(),
                version: 0,
                auto_assign: routing.auto_assign,
                target: target as i32,
                user_ids: routing.users.clone(),
                team_ids: routing.teams.clone(),
                only_available: routing.only_available,
                strategy: strategy as i32,
                required_skills: routing.required_skills.clone(),
                redrive_backlog: routing.redrive_backlog,
            };
            rules.version = next_version(
                current.routing_rules.get(&self.account_id, &channel.id).map(|existing| &existing.entity),
                &rules,
            );
            payloads.push(Payload::RoutingRulesConfigured(rules));
        }
        Ok(payloads)
    }

    /// The rules AdminService enforces (M2, C1, R6), checked on the config as it will be once
    /// `payloads` (this file's) are applied over `current`: the same refusals, whichever path.
    pub fn check_rules(&self, current: &ConfigSnapshot, payloads: &[Payload]) -> anyhow::Result<()> {
        let mut prospective = current.clone();
        for payload in payloads {
            prospective.apply(&envelope::new_root(&self.account_id, "", Utc::now(), payload.clone()));
        }
        let mut breaches: Vec<Breach> = Vec::new();
        for payload in payloads {
            match payload {
                Payload::ChannelConfigured(channel) => {
                    breaches.extend(config_rules::channel_breaches(&prospective, &self.account_id, channel))
                }
                Payload::AgentConfigured(agent) => breaches.extend(config_rules::agent_breaches(&prospective, agent)),
                Payload::InboxConfigured(inbox) => {
                    breaches.extend(config_rules::inbox_breaches(&prospective, &self.account_id, inbox))
                }
                _ => {}
            }
        }
        for rules in prospective.routing_rules.in_account(&self.account_id) {
            let seat = |agent_id: &str| prospective.agents.get(&self.account_id, agent_id).map(|a| a.entity.paid_seat);
            breaches.extend(config_rules::unpaid_agents_in_rule(&rules.entity, seat));
        }
        if !breaches.is_empty() {
            bail!(
                "config for account `{}` refused: {}",
                self.account_id,
                breaches.iter().map(Breach::describe).collect::<Vec<_>>().join("; ")
            );
        }
        Ok(())
    }
}

/// Config entities whose version is recorded in decisions (B2).
pub trait Versioned: Clone + PartialEq {
    fn version(&self) -> u64;
    fn with_version(self, version: u64) -> Self;
}

impl Versioned for RoutingRulesConfigured {
    fn version(&self) -> u64 {
        self.version
    }
    fn with_version(self, version: u64) -> Self {
        RoutingRulesConfigured { version, ..self }
    }
}

impl Versioned for TicketSettingsConfigured {
    fn version(&self) -> u64 {
        self.version
    }
    fn with_version(self, version: u64) -> Self {
        TicketSettingsConfigured { version, ..self }
    }
}

/// The version `candidate` (built with version 0) gets: the existing one when nothing else
/// changed, the next one when something did, 1 for a new entity.
pub fn next_version<T: Versioned>(existing_opt: Option<&T>, candidate: &T) -> u64 {
    match existing_opt {
        Some(existing) if &existing.clone().with_version(candidate.version()) == candidate => existing.version(),
        Some(existing) => existing.version() + 1,
        None => 1,
    }
}

/// Publishes the file's changed entities to the config topic; returns how many were published.
pub async fn apply_config(
    brokers: &str,
    config_topic: &str,
    file: &ConfigFile,
    current: &ConfigSnapshot,
) -> anyhow::Result<usize> {
    let publisher = EnvelopePublisher::new(brokers, "switchboard-config", std::time::Duration::from_secs(30))?;
    let payloads = file.to_payloads(current)?;
    file.check_rules(current, &payloads)?;
    let mut published = 0;
    for payload in payloads {
        if current.holds(&file.account_id, &payload) {
            continue;
        }
        let key = config_key(&file.account_id, &payload).expect("config payloads have keys");
        let event = envelope::new_root(&file.account_id, &key, Utc::now(), payload);
        publisher.publish(config_topic, &event).await.with_context(|| format!("failed to publish config `{key}`"))?;
        published += 1;
    }
    Ok(published)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The config `file` leaves behind when applied over `current`.
    fn applied(current: &ConfigSnapshot, file: &ConfigFile) -> ConfigSnapshot {
        let mut next = current.clone();
        for payload in file.to_payloads(current).unwrap() {
            next.apply(&envelope::new_root(&file.account_id, "", Utc::now(), payload));
        }
        next
    }

    fn account_file(account: &str, team_address: &str, extra: &str) -> ConfigFile {
        ConfigFile::parse(&format!(
            "account_id = \"{account}\"\n[[inboxes]]\nid = \"support\"\nname = \"Support\"\n\
             [[agents]]\nid = \"ana\"\nname = \"Ana\"\nemail = \"ana@{account}.test\"\n\
             [[channels]]\nid = \"mail\"\ninbox = \"support\"\nname = \"Mail\"\ntype = \"team_email\"\n\
             [channels.email]\nteam_address = \"{team_address}\"\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn m1_tenancy_two_accounts_apply_the_same_ids_side_by_side() {
        let a = account_file("a", "support@a.test", "");
        let b = account_file("b", "support@b.test", "");
        let after_a = applied(&ConfigSnapshot::default(), &a);
        let payloads = b.to_payloads(&after_a).unwrap();
        b.check_rules(&after_a, &payloads).unwrap();
        // Nothing of b's is "current" in a's state: every entity is published for b.
        assert!(payloads.iter().all(|payload| !after_a.holds("b", payload)));
        let after_b = applied(&after_a, &b);
        assert_eq!(after_b.inboxes.len(), 2);
        assert_eq!(after_b.channels.get("a", "mail").unwrap().account_id, "a");
        assert_eq!(after_b.channels.get("b", "mail").unwrap().account_id, "b");
    }

    #[test]
    fn m2_tenancy_apply_config_refuses_another_accounts_team_address_like_the_api() {
        let a = account_file("a", "support@a.test", "");
        let after_a = applied(&ConfigSnapshot::default(), &a);
        let thief = account_file("b", "SUPPORT@a.test", "");
        let error = thief.check_rules(&after_a, &thief.to_payloads(&after_a).unwrap()).unwrap_err().to_string();
        assert!(error.contains("support@a.test") && error.contains("M2"), "{error}");
        // C1: an agent's own address as the team address.
        let own = account_file("c", "ana@a.test", "");
        let error = own.check_rules(&after_a, &own.to_payloads(&after_a).unwrap()).unwrap_err().to_string();
        assert!(error.contains("C1"), "{error}");
    }

    #[test]
    fn r6_apply_config_refuses_rules_that_name_unpaid_agents() {
        let routing =
            "[channels.routing]\nauto_assign = true\nassign_to = \"specific_users_and_teams\"\nusers = [\"ana\"]\n";
        let unpaid = account_file("a", "support@a.test", routing);
        let payloads = unpaid.to_payloads(&ConfigSnapshot::default()).unwrap();
        let error = unpaid.check_rules(&ConfigSnapshot::default(), &payloads).unwrap_err().to_string();
        assert!(error.contains("R6") && error.contains("`ana`"), "{error}");

        let paid = account_file("a", "support@a.test", routing);
        let mut payloads = paid.to_payloads(&ConfigSnapshot::default()).unwrap();
        for payload in &mut payloads {
            if let Payload::AgentConfigured(agent) = payload {
                agent.paid_seat = true;
            }
        }
        paid.check_rules(&ConfigSnapshot::default(), &payloads).unwrap();
        // Taking the seat away later, while the rule still names her, is refused as well.
        let after = {
            let mut config = ConfigSnapshot::default();
            for payload in &payloads {
                config.apply(&envelope::new_root("a", "", Utc::now(), payload.clone()));
            }
            config
        };
        let no_seat = paid.to_payloads(&after).unwrap();
        assert!(paid.check_rules(&after, &no_seat).unwrap_err().to_string().contains("R6"));
    }

    #[test]
    fn m1_config_file_ids_are_checked_like_the_apis() {
        let error =
            ConfigFile::parse("account_id = \"a\"\n[[inboxes]]\nid = \"a/b\"\nname = \"x\"\n").unwrap_err().to_string();
        assert!(error.contains("a/b"), "{error}");
    }

    const DEMO: &str = include_str!("../../deploy/demo-config.toml");

    #[test]
    fn the_demo_config_parses_and_declares_a_chat_channel_with_round_robin() {
        let file = ConfigFile::parse(DEMO).unwrap();
        let payloads = file.to_payloads(&ConfigSnapshot::default()).unwrap();
        let rules = payloads
            .iter()
            .find_map(|payload| match payload {
                Payload::RoutingRulesConfigured(rules) => Some(rules.clone()),
                _ => None,
            })
            .unwrap();
        assert!(rules.auto_assign);
        assert_eq!(rules.version, 1);
        assert_eq!(rules.user_ids.len(), 3);
    }

    #[test]
    fn the_demo_email_channel_declares_settings_tickets_skills_and_capacity() {
        let file = ConfigFile::parse(DEMO).unwrap();
        let payloads = file.to_payloads(&ConfigSnapshot::default()).unwrap();
        let email = payloads
            .iter()
            .find_map(|payload| match payload {
                Payload::ChannelConfigured(channel) if channel.channel_id == "team-email" => channel.email.clone(),
                _ => None,
            })
            .unwrap();
        assert_eq!(email.team_address, "support@demo.example");
        let tickets = payloads
            .iter()
            .find_map(|payload| match payload {
                Payload::TicketSettingsConfigured(settings) => Some(settings.clone()),
                _ => None,
            })
            .unwrap();
        assert!(tickets.treat_as_tickets);
        assert_eq!(
            (tickets.default_pipeline.as_str(), tickets.default_stage.as_str(), tickets.version),
            ("support", "new", 1)
        );
        let ana = payloads
            .iter()
            .find_map(|payload| match payload {
                Payload::AgentConfigured(agent) if agent.agent_id == "ana" => Some(agent.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(ana.skills, ["english"]);
        assert_eq!(ana.capacity_per_channel_type.len(), 1);
        assert_eq!(ana.role, "agent");
    }

    #[test]
    fn settings_that_do_not_fit_the_channel_or_are_malformed_are_refused() {
        let base = "account_id = \"a\"\n[[inboxes]]\nid = \"i\"\nname = \"I\"\n[[channels]]\nid = \"c\"\ninbox = \"i\"\nname = \"C\"\n";
        let wrong_type = format!("{base}type = \"chat\"\n[channels.email]\nteam_address = \"a@b.c\"\n");
        assert!(ConfigFile::parse(&wrong_type).unwrap().to_payloads(&ConfigSnapshot::default()).is_err());
        let bad_hours = format!(
            "{base}type = \"chat\"\n[channels.chat]\navailability_mode = \"chat_hours\"\ntime_zone = \"UTC\"\n\
             [[channels.chat.hours]]\nweekday = 0\nfrom = \"18:00\"\nuntil = \"09:00\"\n"
        );
        assert!(ConfigFile::parse(&bad_hours).unwrap().to_payloads(&ConfigSnapshot::default()).is_err());
        let good_hours = bad_hours.replace("\"18:00\"", "\"08:30\"").replace("\"09:00\"", "\"17:00\"");
        let payloads = ConfigFile::parse(&good_hours).unwrap().to_payloads(&ConfigSnapshot::default()).unwrap();
        let chat = payloads
            .iter()
            .find_map(|payload| match payload {
                Payload::ChannelConfigured(channel) => channel.chat.clone(),
                _ => None,
            })
            .unwrap();
        assert_eq!((chat.chat_hours[0].start_minute, chat.chat_hours[0].end_minute), (510, 1020));
        let unknown_field = format!("{base}type = \"chat\"\nsurprise = 1\n");
        assert!(ConfigFile::parse(&unknown_field).is_err());
    }

    #[test]
    fn r1_r5_defaults_are_auto_assignment_off_and_only_available_on() {
        let routing = RoutingDecl::default();
        assert!(!routing.auto_assign);
        assert!(routing.only_available);
        assert_eq!(routing.assign_to, "nobody");
    }

    #[test]
    fn rule_versions_increase_only_when_the_rule_changes() {
        let file = ConfigFile::parse(DEMO).unwrap();
        let mut current = ConfigSnapshot::default();
        for payload in file.to_payloads(&current).unwrap() {
            if let Payload::RoutingRulesConfigured(rules) = payload {
                current.routing_rules.insert(switchboard_runtime::config_store::Owned {
                    account_id: file.account_id.clone(),
                    entity: rules,
                });
            }
        }
        let unchanged = file.to_payloads(&current).unwrap();
        assert!(unchanged.iter().all(|payload| current.holds(&file.account_id, payload)
            || !matches!(payload, Payload::RoutingRulesConfigured(_))));
        let edited = DEMO.replace("strategy = \"round_robin\"", "strategy = \"balanced\"");
        let changed = ConfigFile::parse(&edited).unwrap().to_payloads(&current).unwrap();
        assert!(
            changed
                .iter()
                .any(|payload| matches!(payload, Payload::RoutingRulesConfigured(rules) if rules.version == 2))
        );
    }

    #[test]
    fn invalid_config_files_are_refused_with_a_reason() {
        let unknown_inbox = DEMO.replace("inbox = \"support\"", "inbox = \"nope\"");
        assert!(ConfigFile::parse(&unknown_inbox).unwrap_err().to_string().contains("unknown inbox"));
        let unknown_field = format!("{DEMO}\nsurprise = 1\n");
        assert!(ConfigFile::parse(&unknown_field).is_err());
    }

    #[test]
    fn c8_c10_c12_outbound_settings_and_fallback_addresses_come_from_the_file() {
        let text = r#"
account_id = "acme"

[[inboxes]]
id = "support"
name = "Support"
fallback_from_name = "Acme Support"

[[inboxes]]
id = "web"
name = "Web"

[[channels]]
id = "mail"
inbox = "support"
type = "team_email"
name = "Acme Help"
[channels.email]
team_address = "help@acme.test"
disconnected = true

[[channels]]
id = "wa"
inbox = "support"
type = "whatsapp"
name = "WhatsApp"
[channels.whatsapp]
phone_number_id = "pn-1"
templates = [{ name = "order_update", language = "en_US", parameters = 2 }]

[[channels]]
id = "app"
inbox = "support"
type = "custom"
name = "App"
[channels.custom]
delivery_url = "https://app.example/deliver"
"#;
        let mut file = ConfigFile::parse(text).unwrap();
        file.fallback_email_domain_opt = Some("replies.example".into());
        let payloads = file.to_payloads(&ConfigSnapshot::default()).unwrap();
        file.check_rules(&ConfigSnapshot::default(), &payloads).unwrap();
        let inboxes: Vec<&InboxConfigured> = payloads
            .iter()
            .filter_map(|payload| match payload {
                Payload::InboxConfigured(inbox) => Some(inbox),
                _ => None,
            })
            .collect();
        assert_eq!(inboxes[0].fallback_address, "support.acme@replies.example");
        assert_eq!(inboxes[0].fallback_from_name, "Acme Support");
        assert_eq!(inboxes[1].fallback_from_name, "Web", "defaults to the name");
        let channel = |id: &str| {
            payloads
                .iter()
                .find_map(|payload| match payload {
                    Payload::ChannelConfigured(channel) if channel.channel_id == id => Some(channel.clone()),
                    _ => None,
                })
                .unwrap()
        };
        assert!(channel("mail").email.unwrap().disconnected);
        assert_eq!(channel("wa").whatsapp.unwrap().templates[0].parameter_count, 2);
        assert_eq!(channel("app").custom.unwrap().delivery_url, "https://app.example/deliver");
        // Applied again over itself, the inbox keeps its address whatever the domain now is.
        let mut current = ConfigSnapshot::default();
        for payload in &payloads {
            current.apply(&envelope::new_root("acme", "", Utc::now(), payload.clone()));
        }
        file.fallback_email_domain_opt = None;
        let again = file.to_payloads(&current).unwrap();
        assert!(again.iter().all(|payload| current.holds("acme", payload)), "nothing changes");
        // A second account may not take a chosen from-name (C12).
        let thief = ConfigFile::parse(
            "account_id = \"globex\"\n[[inboxes]]\nid = \"s\"\nname = \"S\"\nfallback_from_name = \"ACME support\"\n",
        )
        .unwrap();
        let error = thief.check_rules(&current, &thief.to_payloads(&current).unwrap()).unwrap_err().to_string();
        assert!(error.contains("C12"), "{error}");
        let bad_url = text.replace("https://app.example/deliver", "mailto:x@y");
        assert!(ConfigFile::parse(&bad_url).unwrap().to_payloads(&ConfigSnapshot::default()).is_err());
    }
}
