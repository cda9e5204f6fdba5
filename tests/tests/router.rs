//! Router tests against the real broker: poison input, several instances sharing the work, and
//! instances joining and leaving the group while input flows.
//! Inputs and config are produced straight to the topics and the router's output is read back,
//! so these tests depend on Kafka and the router only.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use switchboard_proto::events::v1::envelope::Payload;
use switchboard_proto::events::v1::{AgentConfigured, Envelope, UnassignedReason};
use switchboard_tests::router_fixtures::{account_config, inbound, wait_routed};
use switchboard_tests::{KillOnDrop, TestEnv};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_inbound_records_go_to_the_dead_letter_topic_and_routing_continues() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    env.produce_envelopes(&env.topics.config, &account_config("poison", 10, false)).await?;
    let metrics = env.start_router("router-0").await?;
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
    // Operators see the same on /metrics: three inputs routed, two of them dead-lettered, and
    // the good message's conversation open in its partition's state.
    // (The counters move right after the commit that wait_routed saw: give them a moment.)
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !metrics.render_prometheus().contains("switchboard_router_inputs_routed_total 3\n")
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reported = metrics.render_prometheus();
    for expected in [
        "switchboard_router_inputs_routed_total 3\n",
        "switchboard_router_dead_lettered_total 2\n",
        "switchboard_router_transactions_aborted_total 0\n",
    ] {
        assert!(reported.contains(expected), "{expected} missing in\n{reported}");
    }
    let partitions = metrics.partitions();
    assert_eq!(partitions.values().filter_map(|figures| figures.open_conversations_opt).sum::<u64>(), 1, "{reported}");
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
    assert_routed_exactly_once(&decided, &accounts, VISITORS_PER_ACCOUNT, MESSAGES_PER_ACCOUNT, CAPACITY);
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r3_r8_r10_t1_instances_joining_and_leaving_while_input_flows_keep_every_invariant() -> anyhow::Result<()> {
    // Twelve accounts over the inbound topic's twelve partitions, so every rebalance moves
    // partitions that have records in flight.
    const ACCOUNTS: usize = 12;
    const VISITORS_PER_ACCOUNT: usize = 40;
    const MESSAGES_PER_ACCOUNT: usize = 300;
    const CAPACITY: u32 = 10;
    const SLICES: usize = 240;
    // Batches linger 200 ms after their first record (5 ms in production), so that rebalances
    // mostly begin while a batch holds records of partitions about to be revoked.
    let router_env = [("SWITCHBOARD_ROUTER_BATCH_LINGER_MS", "200")];
    let env = TestEnv::new().await?;
    let accounts: Vec<String> = (0..ACCOUNTS).map(|index| format!("churn{index}")).collect();
    let config: Vec<_> = accounts.iter().flat_map(|account| account_config(account, CAPACITY, true)).collect();
    env.produce_envelopes(&env.topics.config, &config).await?;
    let inputs: Vec<_> = (0..MESSAGES_PER_ACCOUNT)
        .flat_map(|index| {
            let visitor = index % VISITORS_PER_ACCOUNT;
            let message = index / VISITORS_PER_ACCOUNT;
            accounts.iter().map(move |account| inbound(account, visitor, message))
        })
        .collect();

    let mut routers: BTreeMap<&str, KillOnDrop> = BTreeMap::new();
    for instance in ["router-0", "router-1"] {
        routers.insert(instance, env.spawn_router_process_with(instance, &router_env)?);
    }
    // Input flows in slices for ~12 s while the membership changes every ~1.2 s: joins, graceful
    // leaves (the instance finishes its batch and leaves the group) and kill -9 (its open
    // transaction is fenced by its restart; the group notices the dead member after the
    // session timeout). The schedule is fixed; only the moments within batches vary.
    let produce = env.produce_envelopes_paced(
        &env.topics.inbound,
        &inputs,
        inputs.len().div_ceil(SLICES),
        Duration::from_millis(100),
    );
    let churn = async {
        let schedule = [
            Membership::Join("router-2"),
            Membership::Leave("router-0"),
            Membership::Join("router-3"),
            Membership::Leave("router-2"),
            Membership::Crash("router-1"),
            Membership::Join("router-0"),
            Membership::Leave("router-3"),
            Membership::Join("router-2"),
            Membership::Leave("router-0"),
            Membership::Join("router-3"),
            Membership::Leave("router-1"),
            Membership::Join("router-0"),
            Membership::Leave("router-3"),
        ];
        for change in schedule {
            tokio::time::sleep(Duration::from_millis(1_000)).await;
            match change {
                Membership::Join(instance) => {
                    routers.insert(instance, env.spawn_router_process_with(instance, &router_env)?);
                    // A new process needs a moment before it joins (config read, producer set-up).
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Membership::Leave(instance) => {
                    let router = routers.remove(instance).expect("a running instance leaves");
                    stop_gracefully(router).await?;
                }
                Membership::Crash(instance) => {
                    // SIGKILL (on drop): an open transaction is left behind.
                    drop(routers.remove(instance).expect("a running instance crashes"));
                    routers.insert(instance, env.spawn_router_process_with(instance, &router_env)?);
                    // The group waits for the dead member until its session times out; changes
                    // made meanwhile would all fold into that one rebalance.
                    tokio::time::sleep(ROUTER_SESSION_TIMEOUT).await;
                }
            }
        }
        anyhow::Ok(())
    };
    let (produced, churned) = tokio::join!(produce, churn);
    produced?;
    churned?;
    wait_routed(&env, Duration::from_secs(120)).await?;
    drop(routers);

    let decided = env.read_committed_events(&env.topics.conversations)?;
    assert_routed_exactly_once(&decided, &accounts, VISITORS_PER_ACCOUNT, MESSAGES_PER_ACCOUNT, CAPACITY);
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b1_r10_t1_a_transaction_aborted_mid_batch_is_rewound_and_everything_is_routed_once() -> anyhow::Result<()> {
    const ACCOUNTS: usize = 4;
    const VISITORS_PER_ACCOUNT: usize = 40;
    const MESSAGES_PER_ACCOUNT: usize = 1_000;
    const CAPACITY: u32 = 10;
    // The output topic refuses records above this (RECORD_TOO_LARGE); the router's batches of
    // ordinary events stay far below it.
    const OUTPUT_RECORD_LIMIT: &str = "524288";
    const LARGE_TEXT_BYTES: usize = 600 * 1024;
    let env = TestEnv::new().await?;
    let accounts: Vec<String> = (0..ACCOUNTS).map(|index| format!("abort{index}")).collect();
    let config: Vec<_> = accounts.iter().flat_map(|account| account_config(account, CAPACITY, true)).collect();
    env.produce_envelopes(&env.topics.config, &config).await?;
    let mut inputs: Vec<_> = (0..MESSAGES_PER_ACCOUNT)
        .flat_map(|index| {
            let visitor = index % VISITORS_PER_ACCOUNT;
            let message = index / VISITORS_PER_ACCOUNT;
            accounts.iter().map(move |account| inbound(account, visitor, message))
        })
        .collect();
    // One early follow-up carries a text the output topic will not take while its limit stands
    // (incompressible, so lz4 does not shrink it under the limit). Its partition's backlog
    // follows it, so the batch that holds it is still routing when the refusal comes back and
    // its later sends fail with records still queued.
    let large_input = &mut inputs[ACCOUNTS * (VISITORS_PER_ACCOUNT + 5)].1;
    let Some(Payload::InboundMessageReceived(large_message)) = large_input.payload.as_mut() else {
        anyhow::bail!("fixture inputs are inbound messages");
    };
    large_message.text = incompressible_text(LARGE_TEXT_BYTES);

    env.set_topic_configs(&env.topics.conversations, &[("max.message.bytes", OUTPUT_RECORD_LIMIT)]).await?;
    // librdkafka reports every refused attempt as an error; the router's own warnings stay.
    let quiet_librdkafka = [("RUST_LOG", "warn,librdkafka=off")];
    let routers: Vec<_> = (0..2)
        .map(|index| env.spawn_router_process_with(&format!("router-{index}"), &quiet_librdkafka))
        .collect::<Result<_, _>>()?;
    env.produce_envelopes(&env.topics.inbound, &inputs).await?;
    // Every transaction holding the large message aborts; its partition stays behind.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let group = format!("{}router", env.topics.prefix);
    let lag = env.group_lag(&group, &env.topics.inbound)?;
    assert!(lag > 0, "the large message's partition cannot be routed while its output is refused");
    let written = env.read_records(&env.topics.conversations, "read_uncommitted")?.len();
    let committed = env.read_committed_records(&env.topics.conversations)?.len();
    eprintln!("lag {lag} with the limit; output records: {written} written, {committed} committed");

    // The operator raises the limit: the router gets past the message at its next attempt.
    env.set_topic_configs(&env.topics.conversations, &[]).await?;
    wait_routed(&env, Duration::from_secs(90)).await?;
    drop(routers);
    let decided = env.read_committed_events(&env.topics.conversations)?;
    assert_routed_exactly_once(&decided, &accounts, VISITORS_PER_ACCOUNT, MESSAGES_PER_ACCOUNT, CAPACITY);
    env.cleanup().await;
    Ok(())
}

/// `length` bytes of pseudo-random letters and digits.
fn incompressible_text(length: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..length)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            ALPHABET[(seed % ALPHABET.len() as u64) as usize] as char
        })
        .collect()
}

/// `session.timeout.ms` of the router's consumer (`runtime::kafka::group_consumer_config`).
const ROUTER_SESSION_TIMEOUT: Duration = Duration::from_secs(10);

/// One change of the router group's membership.
#[derive(Debug)]
enum Membership {
    /// A new instance starts and joins the group.
    Join(&'static str),
    /// An instance is stopped with SIGTERM: it finishes its batch and leaves the group.
    Leave(&'static str),
    /// An instance is killed with SIGKILL and started again under the same instance id.
    Crash(&'static str),
}

/// SIGTERM, then waits for the process to exit (the router finishes its current batch first).
async fn stop_gracefully(mut router: KillOnDrop) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill").arg("-TERM").arg(router.0.id().to_string()).status()?;
    anyhow::ensure!(status.success(), "kill -TERM failed");
    let deadline = Instant::now() + Duration::from_secs(30);
    while router.0.try_wait()?.is_none() {
        anyhow::ensure!(Instant::now() < deadline, "router did not stop within 30 s of SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// The exactly-once invariants of a run in which every account's visitors wrote
/// `messages_per_account` messages in turn to a round-robin chat channel of three agents that
/// treats conversations as tickets, whoever routed them and however often the router failed.
fn assert_routed_exactly_once(
    decided: &[Envelope],
    accounts: &[String],
    visitors_per_account: usize,
    messages_per_account: usize,
    capacity: u32,
) {
    // Derived event ids are a function of the cause: an input routed twice shows up here.
    let event_ids: BTreeSet<_> = decided.iter().map(|event| event.event_id.as_str()).collect();
    assert_eq!(event_ids.len(), decided.len(), "no decision written twice");
    for account in accounts {
        let of_account =
            || decided.iter().filter(|event| &event.account_id == account).filter_map(|event| event.payload.as_ref());
        let started = of_account().filter(|payload| matches!(payload, Payload::ConversationStarted(_))).count();
        assert_eq!(started, visitors_per_account, "{account}: one conversation per visitor (R10)");
        let appended: BTreeSet<_> = of_account()
            .filter_map(|payload| match payload {
                Payload::MessageAppended(appended) => Some(appended.message_id.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(appended.len(), messages_per_account, "{account}: every message once");
        assert_eq!(
            of_account().filter(|payload| matches!(payload, Payload::MessageAppended(_))).count(),
            messages_per_account
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
        assert_eq!(contacts, visitors_per_account, "{account}: one contact per visitor (C4)");

        let mut per_agent: BTreeMap<String, u32> = BTreeMap::new();
        let mut left_at_capacity = 0;
        for payload in of_account() {
            match payload {
                Payload::ConversationAssigned(assigned) => {
                    let open = per_agent.entry(assigned.assignee_agent_id.clone()).or_default();
                    *open += 1;
                    assert!(*open <= capacity, "{account}: {} over capacity", assigned.assignee_agent_id);
                }
                Payload::ConversationLeftUnassigned(left) => {
                    assert_eq!(left.reason, UnassignedReason::NoEligibleAgent as i32);
                    left_at_capacity += 1;
                }
                _ => {}
            }
        }
        // Round robin fills the three agents evenly up to capacity (R3, R8), never beyond.
        assert_eq!(per_agent.values().copied().collect::<Vec<_>>(), [capacity; 3], "{account}: {per_agent:?}");
        assert_eq!(left_at_capacity, visitors_per_account - 3 * capacity as usize);
    }
}
