//! The router against the real broker under kill -9: a 50,000-message run over several accounts
//! (so several partitions), the router killed at random points and restarted (recovering from
//! its snapshots and output tail each time). Afterwards every contact, conversation, message,
//! routing decision and ticket exists exactly once, and no agent ever exceeded capacity.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use chrono::Utc;
use switchboard_proto::events::v1::Envelope;
use switchboard_proto::events::v1::envelope::Payload;
use switchboard_tests::TestEnv;
use switchboard_tests::router_fixtures::{AGENTS, account_config, inbound};

const ACCOUNTS: usize = 5;
const VISITORS_PER_ACCOUNT: usize = 1_000;
const MESSAGES: usize = 50_000;
const CAPACITY: u32 = 40;

/// A small deterministic generator seeded per run (kill points differ run to run).
fn next_random(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b1_b4_r8_kill_9_at_random_points_keeps_everything_exactly_once_and_within_capacity() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let accounts: Vec<String> = (0..ACCOUNTS).map(|index| format!("crash{index}")).collect();
    let config: Vec<_> = accounts.iter().flat_map(|account| account_config(account, CAPACITY, true)).collect();
    env.produce_envelopes(&env.topics.config, &config).await?;

    // 50,000 inputs: each visitor writes several messages; every 20th input is a provider
    // retry of an earlier message (B1).
    let mut inputs: Vec<(String, Envelope)> = Vec::with_capacity(MESSAGES);
    let mut unique_messages = BTreeSet::new();
    for index in 0..MESSAGES {
        let account = &accounts[index % ACCOUNTS];
        let visitor = (index / ACCOUNTS) % VISITORS_PER_ACCOUNT;
        let message = index / (ACCOUNTS * VISITORS_PER_ACCOUNT);
        let record = if index % 20 == 19 && message > 0 {
            inbound(account, visitor, message - 1)
        } else {
            inbound(account, visitor, message)
        };
        if let Some(Payload::InboundMessageReceived(message)) = &record.1.payload {
            unique_messages.insert(message.message_id.clone());
        }
        inputs.push(record);
    }

    // Half of the inputs are waiting before the router starts: a router that keeps up with the
    // producer would otherwise leave no backlog to be killed in the middle of.
    let (backlog, live) = inputs.split_at(MESSAGES / 2);
    env.produce_envelopes(&env.topics.inbound, backlog).await?;
    let snapshot_env = [("SWITCHBOARD_ROUTER_SNAPSHOT_EVERY_RECORDS", "3000")];
    let mut router = env.spawn_router_process_with("router-0", &snapshot_env)?;
    let production_done = std::sync::atomic::AtomicBool::new(false);
    let produce = async {
        let result = env.produce_envelopes(&env.topics.inbound, live).await;
        production_done.store(true, std::sync::atomic::Ordering::SeqCst);
        result
    };
    let group = format!("{}router", env.topics.prefix);
    let mut seed = (Utc::now().timestamp_nanos_opt().unwrap_or(7) as u64) | 1;
    let mut kills = 0;
    // Kill -9 at random moments while there is a backlog to route (during production and
    // while it drains), at most 6 times; done when everything produced has been routed.
    let killer = async {
        let deadline = Instant::now() + Duration::from_secs(900);
        loop {
            tokio::time::sleep(Duration::from_millis(200 + next_random(&mut seed) % 800)).await;
            let lag = env.group_lag(&group, &env.topics.inbound)?;
            if lag == 0 && production_done.load(std::sync::atomic::Ordering::SeqCst) {
                return anyhow::Ok(());
            }
            anyhow::ensure!(Instant::now() < deadline, "router did not catch up (lag {lag})");
            if lag > 0 && kills < 6 {
                router.kill()?; // SIGKILL: no graceful shutdown; an open transaction is left behind.
                router.wait()?;
                kills += 1;
                router = env.spawn_router_process_with("router-0", &snapshot_env)?;
            }
        }
    };
    let (produced, caught_up) = tokio::join!(produce, killer);
    produced?;
    caught_up?;
    // The loop may have ended before the last inputs arrived: wait for lag zero once more.
    let deadline = Instant::now() + Duration::from_secs(300);
    while env.group_lag(&group, &env.topics.inbound)? > 0 {
        anyhow::ensure!(Instant::now() < deadline, "router did not catch up after the kills");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    router.kill()?;
    router.wait()?;
    assert!(kills >= 3, "killed {kills} times");

    let decided = env.read_committed_events(&env.topics.conversations)?;
    let event_ids: BTreeSet<_> = decided.iter().map(|event| event.event_id.clone()).collect();
    assert_eq!(event_ids.len(), decided.len(), "no decision written twice");
    assert!(
        decided.iter().all(|event| event.source_position.as_ref().is_some_and(|source| source.topic == "inbound.v1"))
    );

    let mut contacts = BTreeMap::<String, u32>::new();
    let mut started_by_thread = BTreeMap::<(String, String), u32>::new();
    let mut appended = BTreeMap::<String, u32>::new();
    let mut routed = BTreeMap::<String, u32>::new();
    let mut tickets = BTreeMap::<String, u32>::new();
    let mut open_by_agent = BTreeMap::<String, u32>::new();
    let mut conversations = BTreeSet::new();
    // Output partitions are read in order, so folding them replays each account's history.
    for event in &decided {
        match event.payload.as_ref() {
            Some(Payload::ContactCreated(created)) => *contacts.entry(created.contact_id.clone()).or_default() += 1,
            Some(Payload::ConversationStarted(started)) => {
                conversations.insert(started.conversation_id.clone());
                *started_by_thread.entry((started.channel_id.clone(), started.thread_key.clone())).or_default() += 1;
            }
            Some(Payload::MessageAppended(message)) => *appended.entry(message.message_id.clone()).or_default() += 1,
            Some(Payload::ConversationAssigned(assigned)) => {
                *routed.entry(assigned.conversation_id.clone()).or_default() += 1;
                let open = open_by_agent.entry(assigned.assignee_agent_id.clone()).or_default();
                *open += 1;
                assert!(*open <= CAPACITY, "{} exceeded its capacity", assigned.assignee_agent_id);
            }
            Some(Payload::ConversationLeftUnassigned(left)) => {
                *routed.entry(left.conversation_id.clone()).or_default() += 1
            }
            Some(Payload::TicketCreated(created)) => *tickets.entry(created.conversation_id.clone()).or_default() += 1,
            other => panic!("unexpected decision {other:?}"),
        }
    }
    let expected_conversations = ACCOUNTS * VISITORS_PER_ACCOUNT;
    assert_eq!(contacts.len(), expected_conversations, "one contact per visitor (C4)");
    assert!(contacts.values().all(|count| *count == 1), "no contact created twice");
    assert_eq!(started_by_thread.len(), expected_conversations);
    assert!(started_by_thread.values().all(|count| *count == 1), "one conversation per thread (R10)");
    assert_eq!(appended.len(), unique_messages.len(), "every message appended");
    assert!(appended.values().all(|count| *count == 1), "no message appended twice (B1)");
    assert_eq!(routed.len(), conversations.len());
    assert!(routed.values().all(|count| *count == 1), "one routing decision per conversation");
    assert_eq!(tickets.len(), conversations.len());
    assert!(tickets.values().all(|count| *count == 1), "one ticket per conversation (T1)");
    assert_eq!(open_by_agent.len(), ACCOUNTS * AGENTS.len());
    assert!(open_by_agent.values().all(|open| *open == CAPACITY), "round robin filled every agent: {open_by_agent:?}");

    let snapshots = env.read_committed_records(&format!("{}router-snapshots.v1", env.topics.prefix))?;
    assert!(
        snapshots.iter().any(|record| record.key.as_deref() == Some(&b"manifest"[..])),
        "snapshots were written during the run"
    );
    env.cleanup().await;
    Ok(())
}
