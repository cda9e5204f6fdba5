//! The router's automated messages (O6) against the real broker: R4's owner email and C6's
//! consent prompt and greeting land on outbound.v1 in the routing transaction, partitioned by
//! their key like every other producer of that topic; provider statuses are forwarded to
//! conversations.v1 (O5).

use std::time::Duration;

use chrono::Utc;
use switchboard_proto::events::v1::envelope::Payload;
use switchboard_proto::events::v1::{
    AgentConfigured, AssignTarget, Automation, ChannelConfigured, ChannelType, ConsentMode, ContactConsentReceived,
    ContactOwnerChangeRequested, ConversationCloseRequested, DeliveryStatusReported, Envelope, InboundMessageReceived,
    InboxConfigured, MessengerSettings, OutboundMessageQueued, OutboundPurpose, RoutingRulesConfigured, Sender,
};
use switchboard_router::decide::contact_id_for;
use switchboard_runtime::envelope::new_root;
use switchboard_runtime::outbound::outbound_partition_key;
use switchboard_tests::TestEnv;
use switchboard_tests::router_fixtures::{config_event, wait_routed};

const ACCOUNT: &str = "automated";

fn config() -> Vec<(String, Envelope)> {
    let channel = |channel_id: &str, channel_type: ChannelType, messenger_opt: Option<MessengerSettings>| {
        Payload::ChannelConfigured(Box::new(ChannelConfigured {
            channel_id: channel_id.into(),
            inbox_id: "support".into(),
            channel_type: channel_type as i32,
            name: channel_id.into(),
            enabled: true,
            messenger: messenger_opt,
            ..Default::default()
        }))
    };
    let messenger = MessengerSettings {
        page_id: "page-1".into(),
        consent_mode: ConsentMode::Explicit as i32,
        consent_text: "May we keep your messages?".into(),
        greeting: "Welcome to Automated Inc.".into(),
        instant_reply: String::new(),
    };
    [
        Payload::InboxConfigured(InboxConfigured {
            inbox_id: "support".into(),
            name: "Support".into(),
            fallback_address: "support.automated@replies.example".into(),
            fallback_from_name: "Automated Support".into(),
            ..Default::default()
        }),
        channel("chat", ChannelType::Chat, None),
        channel("fb", ChannelType::FacebookMessenger, Some(messenger)),
        Payload::RoutingRulesConfigured(RoutingRulesConfigured {
            channel_id: "chat".into(),
            version: 1,
            auto_assign: true,
            target: AssignTarget::ContactOwner as i32,
            only_available: true,
            ..Default::default()
        }),
        Payload::AgentConfigured(AgentConfigured {
            agent_id: "owner".into(),
            name: "Olga Owner".into(),
            email: "olga@automated.example".into(),
            paid_seat: true,
            available: false,
            ..Default::default()
        }),
    ]
    .into_iter()
    .map(|payload| config_event(ACCOUNT, payload))
    .collect()
}

fn input(payload: Payload) -> (String, Envelope) {
    (ACCOUNT.to_owned(), new_root(ACCOUNT, ACCOUNT, Utc::now(), payload))
}

fn message(channel_id: &str, channel_type: ChannelType, sender: &str, provider_message_id: &str) -> (String, Envelope) {
    input(Payload::InboundMessageReceived(InboundMessageReceived {
        message_id: switchboard_runtime::ids::message_id_for(ACCOUNT, channel_id, provider_message_id).to_string(),
        channel_id: channel_id.into(),
        inbox_id: "support".into(),
        channel_type: channel_type as i32,
        provider_message_id: provider_message_id.into(),
        thread_key: sender.into(),
        sender: Some(Sender { external_id: sender.into(), display_name: "Vera Visitor".into(), email: String::new() }),
        text: format!("{provider_message_id}: where is my parcel?"),
        ..Default::default()
    }))
}

fn queued(events: &[Envelope]) -> Vec<(&Envelope, &OutboundMessageQueued)> {
    events
        .iter()
        .filter_map(|event| match event.payload.as_ref() {
            Some(Payload::OutboundMessageQueued(queued)) => Some((event, queued)),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn o6_r4_c6_automated_messages_reach_the_outbound_topic_and_statuses_the_conversations_topic()
-> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    env.produce_envelopes(&env.topics.config, &config()).await?;
    env.start_router("router-0").await?;

    // R4: the visitor's first conversation, then the contact gets an offline owner.
    let first = message("chat", ChannelType::Chat, "visitor-1", "c1");
    env.produce_envelopes(&env.topics.inbound, std::slice::from_ref(&first)).await?;
    wait_routed(&env, Duration::from_secs(60)).await?;
    let first_conversation = env
        .read_committed_events(&env.topics.conversations)?
        .into_iter()
        .find_map(|event| match event.payload {
            Some(Payload::ConversationStarted(started)) => Some(started.conversation_id),
            _ => None,
        })
        .expect("first conversation started");
    let second = message("chat", ChannelType::Chat, "visitor-1", "c2");
    let status = DeliveryStatusReported {
        channel_id: "fb".into(),
        provider_message_id: "m_Ours".into(),
        recipient_external_id: "psid-1".into(),
        status: "echo".into(),
        error: String::new(),
    };
    let inputs = [
        input(Payload::ContactOwnerChangeRequested(ContactOwnerChangeRequested {
            contact_id: contact_id_for(ACCOUNT, "chat", "visitor-1"),
            owner_agent_id: "owner".into(),
            request_id: "owner-1".into(),
            actor: None,
        })),
        input(Payload::ConversationCloseRequested(ConversationCloseRequested {
            conversation_id: first_conversation.clone(),
            request_id: "close-1".into(),
            actor: None,
        })),
        second.clone(),
        // C6: a Messenger thread waiting for consent is prompted once, then greeted.
        message("fb", ChannelType::FacebookMessenger, "psid-1", "m1"),
        message("fb", ChannelType::FacebookMessenger, "psid-1", "m2"),
        input(Payload::ContactConsentReceived(ContactConsentReceived {
            channel_id: "fb".into(),
            sender_external_id: "psid-1".into(),
            granted: true,
            provider_event_id: "optin-1".into(),
        })),
        // O5: a provider status rides along with the account's messages.
        input(Payload::DeliveryStatusReported(status.clone())),
    ];
    env.produce_envelopes(&env.topics.inbound, &inputs).await?;
    wait_routed(&env, Duration::from_secs(60)).await?;

    let decided = env.read_committed_events(&env.topics.conversations)?;
    assert!(queued(&decided).is_empty(), "automated messages never go to the conversations topic");
    let forwarded: Vec<_> = decided
        .iter()
        .filter_map(|event| match &event.payload {
            Some(Payload::DeliveryStatusReported(forwarded)) => Some(forwarded.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(forwarded, [status], "the status is forwarded unchanged, once");
    let second_conversation = decided
        .iter()
        .find_map(|event| match &event.payload {
            Some(Payload::MessageAppended(appended)) if appended.source_event_id == second.1.event_id => {
                Some(appended.conversation_id.clone())
            }
            _ => None,
        })
        .expect("second message routed");
    let notification = decided
        .iter()
        .find_map(|event| match &event.payload {
            Some(Payload::OwnerNotificationRequested(notification)) => Some(notification.clone()),
            _ => None,
        })
        .expect("owner notified");

    let outbound_records = env.read_committed_records(&env.topics.outbound)?;
    let outbound = env.read_committed_events(&env.topics.outbound)?;
    let sent = queued(&outbound);
    let kinds: Vec<(i32, i32)> = sent
        .iter()
        .map(|(_, queued)| (queued.purpose, queued.author.as_ref().map_or(0, |author| author.automation)))
        .collect();
    let mut expected = vec![
        (OutboundPurpose::OwnerNotification as i32, Automation::OwnerNotification as i32),
        (OutboundPurpose::ConversationReply as i32, Automation::ConsentPrompt as i32),
        (OutboundPurpose::ConversationReply as i32, Automation::Greeting as i32),
    ];
    let mut kinds_sorted = kinds.clone();
    kinds_sorted.sort_unstable();
    expected.sort_unstable();
    assert_eq!(kinds_sorted, expected, "one of each, the consent prompt once: {kinds:?}");

    let (email_event, email) = sent.iter().find(|(_, queued)| queued.email.is_some()).copied().expect("owner email");
    assert_eq!(email.reply_id, notification.reply_id);
    assert_eq!(email.conversation_id, second_conversation);
    assert_eq!(email_event.partition_key, outbound_partition_key(ACCOUNT, &second_conversation));
    let mail = email.email.as_ref().unwrap();
    assert_eq!(mail.to, ["olga@automated.example"]);
    assert_eq!(
        (mail.from_address.as_str(), mail.from_name.as_str()),
        ("support.automated@replies.example", "Automated Support")
    );
    assert_eq!(mail.subject, "New message from Vera Visitor in Support");

    // Key-based partitioning: each record sits where the key hashes to for every producer of
    // outbound.v1 (the API publishes replies to the same conversations with this publisher).
    // The probes go to delivery.v1, which has as many partitions, so outbound.v1 stays clean.
    let publisher = switchboard_runtime::publisher::EnvelopePublisher::new(
        &env.brokers,
        "partition-probe",
        Duration::from_secs(10),
    )?;
    for record in &outbound_records {
        let event = switchboard_runtime::envelope::decode(record.payload.as_deref())?;
        assert_eq!(record.key.as_deref(), Some(event.partition_key.as_bytes()));
        let mut probe =
            new_root(ACCOUNT, &event.partition_key, Utc::now(), Payload::InboxConfigured(Default::default()));
        probe.partition_key.clone_from(&event.partition_key);
        let position = publisher.publish(&env.topics.delivery, &probe).await?;
        assert_eq!(record.partition, position.partition, "key {}", event.partition_key);
    }
    env.cleanup().await;
    Ok(())
}
