//! The declarative config file (TOML) and its translation into config events.
//!
//! Until the admin API exists, an account's inboxes, channels, routing rules and agents are
//! declared in a file and applied with `api apply-config FILE`. Applying is idempotent: only
//! entities whose state differs from the config topic are published, and a routing rule's
//! version increases exactly when its rule changes (B2 records that version).

use std::collections::BTreeSet;

use anyhow::{Context, bail};
use chrono::Utc;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Deserialize;
use switchboard_proto::events::v1::envelope::Payload;
use switchboard_proto::events::v1::{
    AgentConfigured, AssignTarget, AssignmentStrategy, ChannelConfigured, ChannelType, InboxAccessMode,
    InboxConfigured, RoutingRulesConfigured,
};
use switchboard_runtime::config_store::{ConfigSnapshot, config_key};
use switchboard_runtime::{envelope, kafka};

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
}

fn channel_type(name: &str) -> anyhow::Result<ChannelType> {
    Ok(match name {
        "team_email" => ChannelType::TeamEmail,
        "chat" => ChannelType::Chat,
        "facebook_messenger" => ChannelType::FacebookMessenger,
        "forms" => ChannelType::Forms,
        "whatsapp" => ChannelType::Whatsapp,
        "calling" => ChannelType::Calling,
        "custom" => ChannelType::Custom,
        other => bail!("unknown channel type `{other}`"),
    })
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
        let inbox_ids: BTreeSet<&str> = self.inboxes.iter().map(|inbox| inbox.id.as_str()).collect();
        let agent_ids: BTreeSet<&str> = self.agents.iter().map(|agent| agent.id.as_str()).collect();
        for channel in &self.channels {
            if !inbox_ids.contains(channel.inbox.as_str()) {
                bail!("channel `{}` names unknown inbox `{}`", channel.id, channel.inbox);
            }
            channel_type(&channel.channel_type).with_context(|| format!("channel `{}`", channel.id))?;
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
            let access_mode = match inbox.access.as_str() {
                "everyone" => InboxAccessMode::Everyone,
                "specific_users_and_teams" => InboxAccessMode::SpecificUsersAndTeams,
                other => bail!("inbox `{}`: unknown access `{other}`", inbox.id),
            };
            payloads.push(Payload::InboxConfigured(InboxConfigured {
                inbox_id: inbox.id.clone(),
                name: inbox.name.clone(),
                access_mode: access_mode as i32,
                access_user_ids: inbox.access_users.clone(),
                access_team_ids: inbox.access_teams.clone(),
                ..Default::default()
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
                ..Default::default()
            }));
        }
        for channel in &self.channels {
            payloads.push(Payload::ChannelConfigured(ChannelConfigured {
                channel_id: channel.id.clone(),
                inbox_id: channel.inbox.clone(),
                channel_type: channel_type(&channel.channel_type)? as i32,
                name: channel.name.clone(),
                enabled: channel.enabled,
                ..Default::default()
            }));
            let routing = &channel.routing;
            let target = match routing.assign_to.as_str() {
                "nobody" => AssignTarget::Nobody,
                "specific_users_and_teams" => AssignTarget::SpecificUsersAndTeams,
                "contact_owner" => AssignTarget::ContactOwner,
                other => bail!("channel `{}`: unknown assign_to `{other}`", channel.id),
            };
            let strategy = match routing.strategy.as_str() {
                "round_robin" => AssignmentStrategy::RoundRobin,
                "balanced" => AssignmentStrategy::Balanced,
                other => bail!("channel `{}`: unknown strategy `{other}`", channel.id),
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
                ..Default::default()
            };
            rules.version = match current.routing_rules.get(&channel.id) {
                Some(existing) if RoutingRulesConfigured { version: 0, ..existing.entity.clone() } == rules => {
                    existing.entity.version
                }
                Some(existing) => existing.entity.version + 1,
                None => 1,
            };
            payloads.push(Payload::RoutingRulesConfigured(rules));
        }
        Ok(payloads)
    }
}

/// Whether `payload` already is the entity's current state in `current`.
fn is_current(current: &ConfigSnapshot, account_id: &str, payload: &Payload) -> bool {
    let same = |stored_account: &str| stored_account == account_id;
    match payload {
        Payload::InboxConfigured(inbox) => {
            current.inboxes.get(&inbox.inbox_id).is_some_and(|c| same(&c.account_id) && &c.entity == inbox)
        }
        Payload::ChannelConfigured(channel) => {
            current.channels.get(&channel.channel_id).is_some_and(|c| same(&c.account_id) && &c.entity == channel)
        }
        Payload::RoutingRulesConfigured(rules) => {
            current.routing_rules.get(&rules.channel_id).is_some_and(|c| same(&c.account_id) && &c.entity == rules)
        }
        Payload::AgentConfigured(agent) => {
            current.agents.get(&agent.agent_id).is_some_and(|c| same(&c.account_id) && &c.entity == agent)
        }
        _ => false,
    }
}

/// Publishes the file's changed entities to the config topic; returns how many were published.
pub async fn apply_config(
    brokers: &str,
    config_topic: &str,
    file: &ConfigFile,
    current: &ConfigSnapshot,
) -> anyhow::Result<usize> {
    let producer: FutureProducer = kafka::idempotent_producer_config(brokers, "switchboard-config", 30_000)
        .create()
        .context("failed to create kafka producer")?;
    let mut published = 0;
    for payload in file.to_payloads(current)? {
        if is_current(current, &file.account_id, &payload) {
            continue;
        }
        let key = config_key(&payload).expect("config payloads have keys");
        let event = envelope::new_root(&file.account_id, &key, Utc::now(), payload);
        let bytes = envelope::encode(&event);
        let event_type = event.payload.as_ref().map_or("none", envelope::payload_name);
        let headers = OwnedHeaders::new().insert(Header { key: kafka::header::EVENT_TYPE, value: Some(event_type) });
        producer
            .send(
                FutureRecord::to(config_topic).key(&key).payload(&bytes).headers(headers),
                std::time::Duration::from_secs(30),
            )
            .await
            .map_err(|(error, _)| anyhow::Error::new(error).context(format!("failed to publish config `{key}`")))?;
        published += 1;
    }
    Ok(published)
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_runtime::config_store::Owned;

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
                current
                    .routing_rules
                    .insert(rules.channel_id.clone(), Owned { account_id: file.account_id.clone(), entity: rules });
            }
        }
        let unchanged = file.to_payloads(&current).unwrap();
        assert!(unchanged.iter().all(|payload| is_current(&current, &file.account_id, payload)
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
}
