//! Router tests against the real broker: poison input, and several instances sharing the work.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use switchboard_proto::events::v1::envelope::Payload;
use switchboard_proto::events::v1::{AgentConfigured, UnassignedReason};
use switchboard_tests::TestEnv;
use switchboard_tests::demo::{LoadSpec, post_chat, run_load, wait_visible};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_inbound_records_go_to_the_dead_letter_topic_and_routing_continues() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let mut pipeline = env.start_pipeline().await?;
    // Garbage bytes, and a well-formed envelope that does not belong on the inbound topic.
    env.produce_raw(&env.topics.inbound, "demo", b"\xff\xfe not protobuf").await?;
    let misplaced = switchboard_runtime::envelope::new_root(
        "demo",
        "demo",
        chrono::Utc::now(),
        Payload::AgentConfigured(AgentConfigured { agent_id: "x".into(), ..Default::default() }),
    );
    env.produce_raw(&env.topics.inbound, "demo", &switchboard_runtime::envelope::encode(&misplaced)).await?;

    // A good message after them is still routed.
    let accepted =
        post_chat(&pipeline.http, &pipeline.ingest_url, "website-chat", "zoe", "z-1", "still there?").await?;
    wait_visible(&mut pipeline.api, &accepted.message_id, Duration::from_secs(60)).await?;

    let dead = env.read_committed_records(&env.topics.deadletter)?;
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert_eq!(dead[0].payload.as_deref(), Some(&b"\xff\xfe not protobuf"[..]), "original bytes kept");
    assert!(dead[0].headers["sb-deadletter-reason"].contains("not a valid envelope"), "{:?}", dead[0].headers);
    assert!(dead[0].headers["sb-deadletter-source"].starts_with(&env.topics.inbound));
    assert!(dead[1].headers["sb-deadletter-reason"].contains("not an inbound message"), "{:?}", dead[1].headers);
    env.cleanup().await;
    Ok(())
}

/// A config file for one account with one chat channel round-robining among three agents
/// with a capacity of `capacity` open conversations each.
fn account_config(account: &str, capacity: u32) -> String {
    let agents: String = ["ana", "bo", "cy"]
        .iter()
        .map(|name| {
            format!(
                "[[agents]]\nid = \"{account}-{name}\"\nname = \"{name}\"\npaid_seat = true\navailable = true\nmax_open_conversations = {capacity}\n\n"
            )
        })
        .collect();
    format!(
        "account_id = \"{account}\"\n\n[[inboxes]]\nid = \"{account}-inbox\"\nname = \"Support\"\n\n\
         [[channels]]\nid = \"{account}-chat\"\ninbox = \"{account}-inbox\"\ntype = \"chat\"\nname = \"Chat\"\n\n\
         [channels.routing]\nauto_assign = true\nassign_to = \"specific_users_and_teams\"\n\
         users = [\"{account}-ana\", \"{account}-bo\", \"{account}-cy\"]\nstrategy = \"round_robin\"\n\n{agents}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r3_r8_r10_three_router_instances_with_a_crash_keep_every_invariant() -> anyhow::Result<()> {
    const ACCOUNTS: usize = 6;
    const VISITORS_PER_ACCOUNT: usize = 40;
    const MESSAGES_PER_ACCOUNT: usize = 200;
    const CAPACITY: u32 = 10;
    let env = TestEnv::new().await?;
    let accounts: Vec<String> = (0..ACCOUNTS).map(|index| format!("acct{index}")).collect();
    for account in &accounts {
        env.apply_config(&account_config(account, CAPACITY)).await?;
    }
    let ingest_url = env.start_ingest().await?;
    env.start_projector().await?;
    let api = env.start_api().await?;
    let mut routers: Vec<_> =
        (0..3).map(|index| env.spawn_router_process(&format!("router-{index}"))).collect::<Result<_, _>>()?;

    let loads: Vec<_> = accounts
        .iter()
        .map(|account| {
            let spec = LoadSpec {
                channel_id: format!("{account}-chat"),
                messages: MESSAGES_PER_ACCOUNT,
                visitors: VISITORS_PER_ACCOUNT,
                concurrency: 5,
                run_id: account.clone(),
            };
            let (ingest_url, api) = (ingest_url.clone(), api.clone());
            tokio::spawn(async move { run_load(&ingest_url, api, &spec).await })
        })
        .collect();
    // Kill -9 one instance mid-stream: its partitions move to the others, then it comes back.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    routers[1].kill()?;
    routers[1].wait()?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    routers[1] = env.spawn_router_process("router-1")?;
    for load in loads {
        assert_eq!(load.await??.accepted, MESSAGES_PER_ACCOUNT);
    }
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

        let mut per_agent: BTreeMap<String, u32> = BTreeMap::new();
        let mut left_at_capacity = 0;
        for payload in of_account() {
            match payload {
                Payload::ConversationAssigned(assigned) => {
                    *per_agent.entry(assigned.assignee_agent_id.clone()).or_default() += 1
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
