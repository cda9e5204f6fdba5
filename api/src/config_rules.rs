//! Rules every configuration change must keep, whichever path writes it: `AdminService` and
//! `apply-config` both call these (pure functions of the current config and the new entity), so
//! the two paths can never disagree.
//!
//! - M1: entities are addressed by (account, id); nothing here ever looks at another account's
//!   entity except to keep provider identities unique.
//! - M2: a provider identity belongs to at most one channel in the installation.
//! - C1: an agent's own address cannot be a team address.
//! - R6: a routing rule names only agents with a paid seat, so a named agent keeps their seat.

use switchboard_proto::events::v1::{
    AgentConfigured, ChannelConfigured, ChannelType, InboxConfigured, RoutingRulesConfigured,
};
use switchboard_runtime::config_store::ConfigSnapshot;
use switchboard_runtime::outbound;

/// Ids chosen for config entities: 1..64 of `[a-z0-9_-]` (they are the last part of config
/// keys, which is why they never contain `/`, and never the scope separator the router uses).
pub fn is_entity_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id.chars().all(|character| {
            character.is_ascii_lowercase() || character.is_ascii_digit() || character == '_' || character == '-'
        })
}

/// A provider identity: what a provider (or a customer's app, or a visitor's browser) uses to
/// reach one channel. Values are normalised so that equal identities compare equal.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum ProviderIdentity {
    /// C1: a team address, compared case-insensitively.
    TeamAddress(String),
    /// C6: a Facebook page id.
    FacebookPage(String),
    /// C8: a WhatsApp phone-number id.
    WhatsAppNumber(String),
    /// Channels reached by their id in ingest's public URLs (chat, forms, calls, custom
    /// channels' keys): the id is the identity, so it is unique in the installation.
    ChannelAddress(String),
}

impl ProviderIdentity {
    /// What it is, for error messages.
    pub fn what(&self) -> &'static str {
        match self {
            ProviderIdentity::TeamAddress(_) => "team address",
            ProviderIdentity::FacebookPage(_) => "Facebook page",
            ProviderIdentity::WhatsAppNumber(_) => "WhatsApp phone number id",
            ProviderIdentity::ChannelAddress(_) => "channel address",
        }
    }

    pub fn value(&self) -> &str {
        match self {
            ProviderIdentity::TeamAddress(value)
            | ProviderIdentity::FacebookPage(value)
            | ProviderIdentity::WhatsAppNumber(value)
            | ProviderIdentity::ChannelAddress(value) => value,
        }
    }

    /// The request field the identity comes from.
    pub fn field(&self) -> &'static str {
        match self {
            ProviderIdentity::TeamAddress(_) => "settings.email.team_address",
            ProviderIdentity::FacebookPage(_) => "settings.messenger.page_id",
            ProviderIdentity::WhatsAppNumber(_) => "settings.whatsapp.phone_number_id",
            ProviderIdentity::ChannelAddress(_) => "channel_id",
        }
    }
}

/// An email address as compared for identity: trimmed and lower-cased (C1).
pub fn normalise_address(address: &str) -> String {
    address.trim().to_lowercase()
}

/// Whether channels of this type are reached by their id in ingest's public URLs.
pub fn addressed_by_id(channel_type: i32) -> bool {
    matches!(
        ChannelType::try_from(channel_type),
        Ok(ChannelType::Chat | ChannelType::Forms | ChannelType::Calling | ChannelType::Custom)
    )
}

/// The provider identities `channel` claims (M2).
pub fn provider_identities(channel: &ChannelConfigured) -> Vec<ProviderIdentity> {
    let mut identities = Vec::new();
    match ChannelType::try_from(channel.channel_type) {
        Ok(ChannelType::TeamEmail) => {
            if let Some(email) = &channel.email
                && !email.team_address.trim().is_empty()
            {
                identities.push(ProviderIdentity::TeamAddress(normalise_address(&email.team_address)));
            }
        }
        Ok(ChannelType::FacebookMessenger) => {
            if let Some(messenger) = &channel.messenger
                && !messenger.page_id.trim().is_empty()
            {
                identities.push(ProviderIdentity::FacebookPage(messenger.page_id.trim().to_owned()));
            }
        }
        Ok(ChannelType::Whatsapp) => {
            if let Some(whatsapp) = &channel.whatsapp
                && !whatsapp.phone_number_id.trim().is_empty()
            {
                identities.push(ProviderIdentity::WhatsAppNumber(whatsapp.phone_number_id.trim().to_owned()));
            }
        }
        _ => {}
    }
    if addressed_by_id(channel.channel_type) {
        identities.push(ProviderIdentity::ChannelAddress(channel.channel_id.clone()));
    }
    identities
}

/// A rule a config change would break, with the field it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Breach {
    /// M2: the identity is already claimed by another channel (of any account: which one is
    /// never said, so nothing about another account leaks beyond "taken").
    IdentityTaken(ProviderIdentity),
    /// C1: the team address is an agent's own address.
    TeamAddressIsAgentAddress(String),
    /// C1, seen from the agent: the agent's address is a team address.
    AgentAddressIsTeamAddress(String),
    /// R6: these agents (of the rule's account) have no paid seat.
    UnpaidAgentsInRule { channel_id: String, agent_ids: Vec<String> },
    /// R6: the agent is named by these channels' routing rules and must keep their seat.
    SeatNeededByRules { agent_id: String, channel_ids: Vec<String> },
    /// C12: another inbox's fallback address (any account: which one is never said) already
    /// sends under this from-name.
    FallbackFromNameTaken(String),
}

impl Breach {
    pub fn describe(&self) -> String {
        match self {
            Breach::IdentityTaken(identity) => format!(
                "{} `{}` is already connected to another channel; a provider identity belongs to one channel (M2)",
                identity.what(),
                identity.value()
            ),
            Breach::TeamAddressIsAgentAddress(address) => {
                format!("`{address}` is an agent's own address and cannot be a team address (C1)")
            }
            Breach::AgentAddressIsTeamAddress(address) => {
                format!("`{address}` is a team address and cannot be an agent's own address (C1)")
            }
            Breach::UnpaidAgentsInRule { channel_id, agent_ids } => format!(
                "routing rules of channel `{channel_id}` name {} without a paid seat; only paid seats can be \
                 auto-assigned (R6)",
                quoted(agent_ids)
            ),
            Breach::FallbackFromNameTaken(from_name) => format!(
                "fallback from-name `{from_name}` is already used by another inbox's fallback address; fallback \
                 from-names are unique (C12): choose another fallback_from_name"
            ),
            Breach::SeatNeededByRules { agent_id, channel_ids } => format!(
                "agent `{agent_id}` is named in the routing rules of channel(s) {} and must keep a paid seat (R6); \
                 remove them from those rules first",
                quoted(channel_ids)
            ),
        }
    }
}

fn quoted(ids: &[String]) -> String {
    ids.iter().map(|id| format!("`{id}`")).collect::<Vec<_>>().join(", ")
}

/// M2 and C1 for `channel` as account `account_id` wants to store it: every identity it claims
/// that another channel (any account; not the channel itself) already claims, and a team
/// address that is an agent's own address (any account).
pub fn channel_breaches(config: &ConfigSnapshot, account_id: &str, channel: &ChannelConfigured) -> Vec<Breach> {
    let claimed = provider_identities(channel);
    let mut breaches = Vec::new();
    if claimed.is_empty() {
        return breaches;
    }
    for other in config.channels.iter() {
        if other.account_id == account_id && other.entity.channel_id == channel.channel_id {
            continue;
        }
        for identity in provider_identities(&other.entity) {
            if claimed.contains(&identity) && !breaches.contains(&Breach::IdentityTaken(identity.clone())) {
                breaches.push(Breach::IdentityTaken(identity));
            }
        }
    }
    for identity in &claimed {
        if let ProviderIdentity::TeamAddress(address) = identity
            && config.agents.iter().any(|agent| normalise_address(&agent.entity.email) == *address)
        {
            breaches.push(Breach::TeamAddressIsAgentAddress(address.clone()));
        }
    }
    breaches
}

/// C12: the inbox's fallback from-name (as [`outbound::fallback_identity`] resolves it) must not
/// be another inbox's (any account; compared trimmed and case-insensitively).
pub fn inbox_breaches(config: &ConfigSnapshot, account_id: &str, inbox: &InboxConfigured) -> Vec<Breach> {
    let (_, from_name) = outbound::fallback_identity(account_id, inbox);
    let wanted = from_name.trim().to_lowercase();
    let taken = config.inboxes.iter().any(|other| {
        !(other.account_id == account_id && other.entity.inbox_id == inbox.inbox_id)
            && outbound::fallback_identity(&other.account_id, &other.entity).1.trim().to_lowercase() == wanted
    });
    if taken { vec![Breach::FallbackFromNameTaken(from_name.trim().to_owned())] } else { Vec::new() }
}

/// C12: the fallback from-name an inbox gets when none is chosen: its name, unless another
/// inbox's fallback address already sends under it; then "<name> (<account>)", then
/// "<name> (<account>/<inbox>)", which no other inbox can hold. Tenants may all name an inbox
/// "Support"; only a from-name chosen explicitly is refused when taken.
pub fn default_fallback_from_name(config: &ConfigSnapshot, account_id: &str, inbox_id: &str, name: &str) -> String {
    let name = name.trim();
    let probe = |from_name: &str| InboxConfigured {
        inbox_id: inbox_id.to_owned(),
        name: name.to_owned(),
        fallback_from_name: from_name.to_owned(),
        ..Default::default()
    };
    [name.to_owned(), format!("{name} ({account_id})")]
        .into_iter()
        .find(|candidate| inbox_breaches(config, account_id, &probe(candidate)).is_empty())
        .unwrap_or_else(|| format!("{name} ({account_id}/{inbox_id})"))
}

/// Type-specific channel settings that the outbound path relies on, as (field, problem): C8
/// templates need a name and a language and are listed once per name and language; a custom
/// channel's delivery URL (C10) is http or https.
pub fn channel_settings_problems(channel: &ChannelConfigured) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    if let Some(whatsapp) = &channel.whatsapp {
        let mut seen = std::collections::BTreeSet::new();
        for (index, template) in whatsapp.templates.iter().enumerate() {
            let field = format!("settings.whatsapp.templates[{index}]");
            if template.name.trim().is_empty() || template.language.trim().is_empty() {
                problems.push((field, "needs a name and a language".to_owned()));
            } else if !seen.insert((template.name.trim().to_owned(), template.language.trim().to_owned())) {
                problems.push((field, format!("`{}` ({}) is listed twice", template.name, template.language)));
            }
        }
    }
    if let Some(custom) = &channel.custom
        && !custom.delivery_url.is_empty()
    {
        let valid = reqwest::Url::parse(&custom.delivery_url)
            .is_ok_and(|url| matches!(url.scheme(), "http" | "https") && url.host().is_some());
        if !valid {
            problems.push(("settings.custom.delivery_url".to_owned(), "must be an http or https URL".to_owned()));
        }
    }
    problems
}

/// C1 for an agent's own address: it may not be any channel's team address.
pub fn agent_breaches(config: &ConfigSnapshot, agent: &AgentConfigured) -> Vec<Breach> {
    let address = normalise_address(&agent.email);
    if address.is_empty() {
        return Vec::new();
    }
    let is_team_address = config
        .channels
        .iter()
        .any(|channel| provider_identities(&channel.entity).contains(&ProviderIdentity::TeamAddress(address.clone())));
    if is_team_address { vec![Breach::AgentAddressIsTeamAddress(address)] } else { Vec::new() }
}

/// R6 for a rule of `account_id`: every named user must be an agent of the account with a paid
/// seat. `paid_seat` answers for an agent id of the account (`None`: no such agent).
pub fn unpaid_agents_in_rule(
    rules: &RoutingRulesConfigured,
    paid_seat: impl Fn(&str) -> Option<bool>,
) -> Option<Breach> {
    let unpaid: Vec<String> =
        rules.user_ids.iter().filter(|user_id| paid_seat(user_id) == Some(false)).cloned().collect();
    (!unpaid.is_empty()).then(|| Breach::UnpaidAgentsInRule { channel_id: rules.channel_id.clone(), agent_ids: unpaid })
}

/// R6 for taking a seat away: the channels of `account_id` whose routing rules name the agent.
pub fn rules_naming_agent(config: &ConfigSnapshot, account_id: &str, agent_id: &str) -> Option<Breach> {
    let channel_ids: Vec<String> = config
        .routing_rules
        .in_account(account_id)
        .filter(|rules| rules.entity.user_ids.iter().any(|user_id| user_id == agent_id))
        .map(|rules| rules.entity.channel_id.clone())
        .collect();
    (!channel_ids.is_empty()).then(|| Breach::SeatNeededByRules { agent_id: agent_id.to_owned(), channel_ids })
}

/// Whether the caller has a paid seat in their own account (I4). Admins without an agent
/// record act with a seat. The one place this is decided for every command.
pub fn caller_has_paid_seat(config: &ConfigSnapshot, account_id: &str, user_id: &str, is_admin: bool) -> bool {
    config.agents.get(account_id, user_id).map_or(is_admin, |agent| agent.entity.paid_seat)
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_proto::events::v1::{EmailSettings, MessengerSettings, WhatsAppSettings};
    use switchboard_runtime::config_store::Owned;

    fn email_channel(id: &str, address: &str) -> ChannelConfigured {
        ChannelConfigured {
            channel_id: id.into(),
            channel_type: ChannelType::TeamEmail as i32,
            email: Some(EmailSettings { team_address: address.into(), ..Default::default() }),
            ..Default::default()
        }
    }

    fn config_with(channels: Vec<(&str, ChannelConfigured)>, agents: Vec<(&str, AgentConfigured)>) -> ConfigSnapshot {
        let mut config = ConfigSnapshot::default();
        for (account, channel) in channels {
            config.channels.insert(Owned { account_id: account.into(), entity: channel });
        }
        for (account, agent) in agents {
            config.agents.insert(Owned { account_id: account.into(), entity: agent });
        }
        config
    }

    #[test]
    fn m2_c1_a_team_address_is_claimed_once_case_insensitively_across_accounts() {
        let config = config_with(vec![("a", email_channel("mail", "Support@A.test"))], vec![]);
        let breaches = channel_breaches(&config, "b", &email_channel("stolen", " support@a.TEST "));
        assert_eq!(breaches, [Breach::IdentityTaken(ProviderIdentity::TeamAddress("support@a.test".into()))]);
        // The same account connecting it twice under another channel id is refused too (C1).
        assert_eq!(channel_breaches(&config, "a", &email_channel("mail-2", "support@a.test")).len(), 1);
        // The channel itself may be stored again (an update).
        assert!(channel_breaches(&config, "a", &email_channel("mail", "support@a.test")).is_empty());
        // Account b's own channel `mail` is another channel than a's `mail`.
        assert_eq!(channel_breaches(&config, "b", &email_channel("mail", "support@a.test")).len(), 1);
    }

    #[test]
    fn m2_pages_numbers_and_url_addressed_channel_ids_are_unique_in_the_installation() {
        let page = |id: &str, page: &str| ChannelConfigured {
            channel_id: id.into(),
            channel_type: ChannelType::FacebookMessenger as i32,
            messenger: Some(MessengerSettings { page_id: page.into(), ..Default::default() }),
            ..Default::default()
        };
        let number = |id: &str, number: &str| ChannelConfigured {
            channel_id: id.into(),
            channel_type: ChannelType::Whatsapp as i32,
            whatsapp: Some(WhatsAppSettings { phone_number_id: number.into(), ..Default::default() }),
            ..Default::default()
        };
        let custom = |id: &str| ChannelConfigured {
            channel_id: id.into(),
            channel_type: ChannelType::Custom as i32,
            ..Default::default()
        };
        let config =
            config_with(vec![("a", page("fb", "123")), ("a", number("wa", "555")), ("a", custom("app"))], vec![]);
        assert_eq!(channel_breaches(&config, "b", &page("fb-b", "123")).len(), 1);
        assert!(channel_breaches(&config, "b", &page("fb", "456")).is_empty(), "same id, other page: fine");
        assert_eq!(channel_breaches(&config, "b", &number("wa-b", "555")).len(), 1);
        assert_eq!(
            channel_breaches(&config, "b", &custom("app")),
            [Breach::IdentityTaken(ProviderIdentity::ChannelAddress("app".into()))]
        );
        assert!(channel_breaches(&config, "b", &custom("app-b")).is_empty());
    }

    #[test]
    fn c1_agent_addresses_and_team_addresses_never_overlap() {
        let agent = |email: &str| AgentConfigured { agent_id: "ana".into(), email: email.into(), ..Default::default() };
        let config =
            config_with(vec![("a", email_channel("mail", "support@a.test"))], vec![("a", agent("ana@a.test"))]);
        assert_eq!(
            channel_breaches(&config, "a", &email_channel("mail-2", "ANA@a.test")),
            [Breach::TeamAddressIsAgentAddress("ana@a.test".into())]
        );
        assert_eq!(agent_breaches(&config, &agent("Support@a.test")).len(), 1);
        assert!(agent_breaches(&config, &agent("bob@a.test")).is_empty());
    }

    #[test]
    fn r6_rules_name_only_paid_agents_and_named_agents_keep_their_seat() {
        let rules = RoutingRulesConfigured {
            channel_id: "web".into(),
            user_ids: vec!["ana".into(), "bob".into(), "ghost".into()],
            ..Default::default()
        };
        let seat = |agent: &str| match agent {
            "ana" => Some(true),
            "bob" => Some(false),
            _ => None,
        };
        assert_eq!(
            unpaid_agents_in_rule(&rules, seat),
            Some(Breach::UnpaidAgentsInRule { channel_id: "web".into(), agent_ids: vec!["bob".into()] })
        );
        let mut config = ConfigSnapshot::default();
        config.routing_rules.insert(Owned { account_id: "a".into(), entity: rules });
        assert!(rules_naming_agent(&config, "a", "ana").is_some());
        assert!(rules_naming_agent(&config, "b", "ana").is_none(), "another account's rules never count");
        assert!(rules_naming_agent(&config, "a", "carol").is_none());
    }

    #[test]
    fn i4_the_paid_seat_is_the_callers_own_in_their_own_account() {
        let agent = |seat: bool| AgentConfigured { agent_id: "ana".into(), paid_seat: seat, ..Default::default() };
        let config = config_with(vec![], vec![("a", agent(false)), ("b", agent(true))]);
        assert!(!caller_has_paid_seat(&config, "a", "ana", false));
        assert!(caller_has_paid_seat(&config, "b", "ana", false));
        assert!(caller_has_paid_seat(&config, "c", "ana", true), "an admin without an agent record");
        assert!(!caller_has_paid_seat(&config, "c", "ana", false));
    }

    #[test]
    fn c12_fallback_from_names_are_unique_in_the_installation() {
        let inbox = |id: &str, name: &str, from_name: &str| InboxConfigured {
            inbox_id: id.into(),
            name: name.into(),
            fallback_from_name: from_name.into(),
            ..Default::default()
        };
        let mut config = ConfigSnapshot::default();
        config.inboxes.insert(Owned { account_id: "a".into(), entity: inbox("support", "Support", "Acme Support") });
        // A legacy inbox without the field sends under its name.
        config.inboxes.insert(Owned { account_id: "b".into(), entity: inbox("help", "Globex Help", "") });
        assert_eq!(
            inbox_breaches(&config, "c", &inbox("x", "X", " acme SUPPORT ")),
            [Breach::FallbackFromNameTaken("acme SUPPORT".into())],
            "another account's name, compared case-insensitively"
        );
        assert_eq!(inbox_breaches(&config, "c", &inbox("x", "Globex Help", "")).len(), 1, "the default is the name");
        assert!(inbox_breaches(&config, "a", &inbox("support", "Support", "Acme Support")).is_empty(), "itself");
        assert!(inbox_breaches(&config, "a", &inbox("sales", "Sales", "")).is_empty());
        assert_eq!(default_fallback_from_name(&config, "c", "x", "Sales"), "Sales");
        assert_eq!(default_fallback_from_name(&config, "c", "x", "Globex Help"), "Globex Help (c)");
        config.inboxes.insert(Owned { account_id: "c".into(), entity: inbox("y", "Globex Help", "Globex Help (c)") });
        assert_eq!(default_fallback_from_name(&config, "c", "x", "Globex Help"), "Globex Help (c/x)");
        let description = Breach::FallbackFromNameTaken("Acme Support".into()).describe();
        assert!(!description.contains("`a`"), "never names the other account: {description}");
    }

    #[test]
    fn c8_c10_outbound_channel_settings_are_checked() {
        use switchboard_proto::events::v1::{CustomChannelSettings, WhatsAppTemplate};
        let template = |name: &str, language: &str| WhatsAppTemplate {
            name: name.into(),
            language: language.into(),
            parameter_count: 1,
        };
        let whatsapp = ChannelConfigured {
            whatsapp: Some(WhatsAppSettings {
                templates: vec![template("a", "en"), template("a", "de"), template("a", "en"), template("", "en")],
                ..Default::default()
            }),
            ..Default::default()
        };
        let fields: Vec<String> = channel_settings_problems(&whatsapp).into_iter().map(|(field, _)| field).collect();
        assert_eq!(fields, ["settings.whatsapp.templates[2]", "settings.whatsapp.templates[3]"]);
        let custom = |url: &str| ChannelConfigured {
            custom: Some(CustomChannelSettings { delivery_url: url.into(), messages_per_second: 0 }),
            ..Default::default()
        };
        assert!(channel_settings_problems(&custom("https://app.example/switchboard")).is_empty());
        assert!(channel_settings_problems(&custom("")).is_empty(), "not yet set");
        assert_eq!(channel_settings_problems(&custom("ftp://app.example")).len(), 1);
        assert_eq!(channel_settings_problems(&custom("not a url")).len(), 1);
    }
}
