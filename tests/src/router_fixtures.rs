//! Router test fixtures: config and inbound events produced straight to the topics, so router
//! tests depend on nothing but Kafka and the router binary.

use chrono::Utc;
use switchboard_proto::events::v1::envelope::Payload;
use switchboard_proto::events::v1::{
    AgentConfigured, AssignTarget, AssignmentStrategy, ChannelConfigured, ChannelType, Envelope,
    InboundMessageReceived, InboxConfigured, RoutingRulesConfigured, Sender, TicketSettingsConfigured,
};
use switchboard_runtime::config_store::config_key;
use switchboard_runtime::envelope::new_root;

pub const AGENTS: [&str; 3] = ["ana", "bo", "cy"];

pub fn config_event(account: &str, payload: Payload) -> (String, Envelope) {
    let key = config_key(account, &payload).expect("config payload");
    (key.clone(), new_root(account, &key, Utc::now(), payload))
}

/// One account: a chat channel `<account>-chat` round-robining among three agents
/// (`<account>-ana|bo|cy`) with a capacity, optionally treating conversations as tickets (T1).
pub fn account_config(account: &str, capacity: u32, treat_as_tickets: bool) -> Vec<(String, Envelope)> {
    let channel_id = format!("{account}-chat");
    let mut records = vec![
        config_event(
            account,
            Payload::InboxConfigured(InboxConfigured {
                inbox_id: format!("{account}-inbox"),
                name: "Support".into(),
                ..Default::default()
            }),
        ),
        config_event(
            account,
            Payload::ChannelConfigured(Box::new(ChannelConfigured {
                channel_id: channel_id.clone(),
                inbox_id: format!("{account}-inbox"),
                channel_type: ChannelType::Chat as i32,
                name: "Chat".into(),
                enabled: true,
                ..Default::default()
            })),
        ),
        config_event(
            account,
            Payload::RoutingRulesConfigured(RoutingRulesConfigured {
                channel_id: channel_id.clone(),
                version: 1,
                auto_assign: true,
                target: AssignTarget::SpecificUsersAndTeams as i32,
                user_ids: AGENTS.iter().map(|name| format!("{account}-{name}")).collect(),
                only_available: true,
                strategy: AssignmentStrategy::RoundRobin as i32,
                ..Default::default()
            }),
        ),
        config_event(
            account,
            Payload::TicketSettingsConfigured(TicketSettingsConfigured {
                channel_id: channel_id.clone(),
                treat_as_tickets,
                default_pipeline: "support".into(),
                default_stage: "new".into(),
                version: 1,
                ..Default::default()
            }),
        ),
    ];
    for name in AGENTS {
        records.push(config_event(
            account,
            Payload::AgentConfigured(AgentConfigured {
                agent_id: format!("{account}-{name}"),
                name: name.into(),
                paid_seat: true,
                available: true,
                max_open_conversations: capacity,
                ..Default::default()
            }),
        ));
    }
    records
}

pub fn inbound(account: &str, visitor: usize, message: usize) -> (String, Envelope) {
    let channel_id = format!("{account}-chat");
    let provider_message_id = format!("{account}-v{visitor}-m{message}");
    let payload = Payload::InboundMessageReceived(InboundMessageReceived {
        message_id: switchboard_runtime::ids::message_id_for(account, &channel_id, &provider_message_id).to_string(),
        channel_id,
        inbox_id: format!("{account}-inbox"),
        channel_type: ChannelType::Chat as i32,
        provider_message_id,
        thread_key: format!("visitor-{visitor}"),
        sender: Some(Sender {
            external_id: format!("visitor-{visitor}"),
            display_name: "Visitor".into(),
            email: String::new(),
        }),
        text: format!("message {message}"),
        ..Default::default()
    });
    (account.to_owned(), new_root(account, account, Utc::now(), payload))
}

/// Waits until the router's consumer group has committed everything on the inbound topic.
pub async fn wait_routed(env: &crate::TestEnv, timeout: std::time::Duration) -> anyhow::Result<()> {
    let group = format!("{}router", env.topics.prefix);
    let deadline = std::time::Instant::now() + timeout;
    loop {
        // A lag query can time out while the broker is busy (tests run side by side on two
        // cores): that is a reason to ask again, not a failure, until the deadline.
        match env.group_lag(&group, &env.topics.inbound) {
            Ok(0) => return Ok(()),
            Ok(lag) => anyhow::ensure!(std::time::Instant::now() < deadline, "router did not catch up (lag {lag})"),
            Err(error) if std::time::Instant::now() >= deadline => {
                return Err(error.context("router lag still unknown at the deadline"));
            }
            Err(_) => {}
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}
