//! Router tests against the real broker: poison input, and several instances sharing the work.
//! Inputs and config are produced straight to the topics and the router's output is read back,
//! so these tests depend on Kafka and the router only.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use switchboard_proto::events::v1::envelope::Payload;
use switchboard_proto::events::v1::{AgentConfigured, UnassignedReason};
use switchboard_tests::TestEnv;
use switchboard_tests::router_fixtures::{account_config, inbound, wait_routed};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_inbound_records_go_to_the_dead_letter_topic_and_routing_continues() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    env.produce_envelopes(&env.topics.config, &account_config("poison", 10, false)).await?;
    env.start_router("router-0").await?;
    // Garbage bytes, and a well-formed envelope that does not belong on the inbound topic.
    env.produce_raw(&env.topics.inbound, "poison", b"\xff\xfe not protobuf").await?;
    let misplaced = switchboard_runtime::envelope::new_root(
        "poison",
        "poison",
        chrono::Utc::now(),
        Payload::AgentConfigured(AgentConfigured { agent_id: "x".into(), ..Default::default() }),
    );
    env.produce_raw(&env.topics.inbound, "poison", &switchboard_runtime::envelope::encode(&misplaced)).await?;
    // A good message after them is still routed.
    let good = inbound("poison", 1, 0);
    env.produce_envelopes(&env.topics.inbound, std::slice::from_ref(&good)).await?;
    wait_routed(&env, Duration::from_secs(60)).await?;

    let decided = env.read_committed_events(&env.topics.conversations)?;
    let appended = decided.iter().any(|event| {
        matches!(&event.payload, Some(Payload::MessageAppended(appended))
            if Some(&appended.source_event_id) == Some(&good.1.event_id))
    });
    assert!(appended, "the good message was routed: {decided:?}");
    let dead = env.read_committed_records(&env.topics.deadletter)?;
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert_eq!(dead[0].payload.as_deref(), Some(&b"\xff\xfe not protobuf"[..]), "original bytes kept");
    assert!(dead[0].headers["sb-deadletter-reason"].contains("not a valid envelope"), "{:?}", dead[0].headers);
    assert!(dead[0].headers["sb-deadletter-source"].starts_with(&env.topics.inbound));
    assert!(dead[1].headers["sb-deadletter-reason"].contains("not a router input"), "{:?}", dead[1].headers);
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r3_r8_r10_t1_three_router_instances_with_a_crash_keep_every_invariant() -> anyhow::Result<()> {
    const ACCOUNTS: usize = 6;
    const VISITORS_PER_ACCOUNT: usize = 40;
    const MESSAGES_PER_ACCOUNT: usize = 200;
    const CAPACITY: u32 = 10;
    let env = TestEnv::new().await?;
    let accounts: Vec<String> = (0..ACCOUNTS).map(|index| format!("acct{index}")).collect();
    let config: Vec<_> = accounts.iter().flat_map(|account| account_config(account, CAPACITY, true)).collect();
    env.produce_envelopes(&env.topics.config, &config).await?;
    let mut routers: Vec<_> =
        (0..3).map(|index| env.spawn_router_process(&format!("router-{index}"))).collect::<Result<_, _>>()?;

    // Each account's visitors write in turn; produced in two halves around a crash.
    let inputs: Vec<_> = (0..MESSAGES_PER_ACCOUNT)
        .flat_map(|index| {
            let visitor = index % VISITORS_PER_ACCOUNT;
            let message = index / VISITORS_PER_ACCOUNT;
            accounts.iter().map(move |account| inbound(account, visitor, message))
        })
        .collect();
    let (first_half, second_half) = inputs.split_at(inputs.len() / 2);
    env.produce_envelopes(&env.topics.inbound, first_half).await?;
    // Kill -9 one instance mid-stream: its partitions move to the others, then it comes back.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    routers[1].kill()?;
    routers[1].wait()?;
    env.produce_envelopes(&env.topics.inbound, second_half).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    routers[1] = env.spawn_router_process("router-1")?;
    wait_routed(&env, Duration::from_secs(180)).await?;
    for router in &mut routers {
        router.kill()?;
        router.wait()?;
    }

    let inbound_partitions: BTreeSet<i32> =
        env.read_committed_records(&env.topics.inbound)?.iter().map(|r| r.partition).collect();
    assert!(inbound_partitions.len() >= 2, "accounts spread over several partitions: {inbound_partitions:?}");

    let decided = env.read_committed_events(&env.topics.conversations)?;
    for account in &accounts {
        let of_account =
            || decided.iter().filter(|event| &event.account_id == account).filter_map(|event| event.payload.as_ref());
        let started = of_account().filter(|payload| matches!(payload, Payload::ConversationStarted(_))).count();
        assert_eq!(started, VISITORS_PER_ACCOUNT, "{account}: one conversation per visitor (R10)");
        let appended: BTreeSet<_> = of_account()
            .filter_map(|payload| match payload {
                Payload::MessageAppended(appended) => Some(appended.message_id.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(appended.len(), MESSAGES_PER_ACCOUNT, "{account}: every message once");
        assert_eq!(
            of_account().filter(|payload| matches!(payload, Payload::MessageAppended(_))).count(),
            MESSAGES_PER_ACCOUNT
        );
        // T1: exactly one ticket per conversation, whichever instance routed it.
        let conversations: BTreeSet<_> = of_account()
            .filter_map(|payload| match payload {
                Payload::ConversationStarted(started) => Some(started.conversation_id.clone()),
                _ => None,
            })
            .collect();
        let ticketed: Vec<_> = of_account()
            .filter_map(|payload| match payload {
                Payload::TicketCreated(created) => Some(created.conversation_id.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(ticketed.len(), conversations.len(), "{account}: one ticket per conversation");
        assert_eq!(ticketed.iter().collect::<BTreeSet<_>>(), conversations.iter().collect::<BTreeSet<_>>());
        let contacts = of_account().filter(|payload| matches!(payload, Payload::ContactCreated(_))).count();
        assert_eq!(contacts, VISITORS_PER_ACCOUNT, "{account}: one contact per visitor (C4)");

        let mut per_agent: BTreeMap<String, u32> = BTreeMap::new();
        let mut left_at_capacity = 0;
        for payload in of_account() {
            match payload {
                Payload::ConversationAssigned(assigned) => {
                    let open = per_agent.entry(assigned.assignee_agent_id.clone()).or_default();
                    *open += 1;
                    assert!(*open <= CAPACITY, "{account}: {} over capacity", assigned.assignee_agent_id);
                }
                Payload::ConversationLeftUnassigned(left) => {
                    assert_eq!(left.reason, UnassignedReason::NoEligibleAgent as i32);
                    left_at_capacity += 1;
                }
                _ => {}
            }
        }
        // Round robin fills the three agents evenly up to capacity (R3, R8), never beyond.
        assert_eq!(per_agent.values().copied().collect::<Vec<_>>(), [CAPACITY; 3], "{account}: {per_agent:?}");
        assert_eq!(left_at_capacity, VISITORS_PER_ACCOUNT - 3 * CAPACITY as usize);
    }
    env.cleanup().await;
    Ok(())
}
