//! Benchmark of the router's pure core: `decide` + `evolve` on one thread, no I/O.
//!
//! State: 1,000 agents (paid, available, capacity 200) in 20 routing rules of 50 agents each,
//! and 100,000 open conversations. Input: a realistic mix of follow-ups in open conversations
//! (R10) and new conversations that go through assignment (R3/R5/R6/R8).
//!
//! By default the state stays at 100,000 open conversations, as in a support team's steady
//! state: agents close conversations as fast as customers open new ones, so each new
//! conversation comes with one close of a random open one (a `ConversationCloseRequested`
//! input, which also counts as a decision). `--growing` leaves the closes out: the state then
//! grows by every new conversation and contact, and the figure includes growing its tables.
//!
//! `--rounds N` times N rounds of `--inputs` each in the same process (state and code layout
//! unchanged between them) and prints each round's figure and their median: on a shared VM the
//! spread between rounds shows how much of a difference between builds is the machine.
//!
//!   cargo run --release -p switchboard-router --bin bench_decide [-- --inputs 1000000 --new-share 0.2 --growing --rounds 5]

use std::time::Instant;

use chrono::{TimeZone, Utc};
use switchboard_proto::events::v1::envelope::Payload;
use switchboard_proto::events::v1::{
    Actor, AgentConfigured, AssignTarget, AssignmentStrategy, ChannelConfigured, ChannelType,
    ConversationCloseRequested, Envelope, InboundMessageReceived, RoutingRulesConfigured, Sender,
};
use switchboard_router::bench_support::{argument, flag};
use switchboard_router::decide::{RouterConfig, RouterState, align_state, decide, evolve};
use switchboard_router::state::RECENT_MESSAGE_WINDOW;
use switchboard_runtime::config_store::{ConfigSnapshot, Owned};
use switchboard_runtime::envelope::{new_root, timestamp};

/// The router binary's allocator, so the figures are the production ones (see Cargo.toml).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ACCOUNT: &str = "bench";
const AGENTS: usize = 1_000;
const CHANNELS: usize = 20;
const OPEN_CONVERSATIONS: usize = 100_000;
/// Inputs built, then routed, per batch: small enough that they are still in cache when routed,
/// as in the shell, which decodes each record right before routing it.
const INPUT_BATCH: u64 = 2_000;

fn config() -> RouterConfig {
    let mut config = ConfigSnapshot::default();
    for index in 0..AGENTS {
        let agent = AgentConfigured {
            agent_id: format!("agent-{index:04}"),
            name: format!("Agent {index}"),
            paid_seat: true,
            available: true,
            max_open_conversations: 200,
            ..Default::default()
        };
        config.agents.insert(Owned { account_id: ACCOUNT.into(), entity: agent });
    }
    for channel in 0..CHANNELS {
        let users = (0..AGENTS / CHANNELS)
            .map(|offset| format!("agent-{:04}", channel * (AGENTS / CHANNELS) + offset))
            .collect();
        let rules = RoutingRulesConfigured {
            channel_id: format!("chat-{channel}"),
            version: 1,
            auto_assign: true,
            target: AssignTarget::SpecificUsersAndTeams as i32,
            user_ids: users,
            only_available: true,
            strategy: if channel % 2 == 0 { AssignmentStrategy::RoundRobin } else { AssignmentStrategy::Balanced }
                as i32,
            ..Default::default()
        };
        let channel = ChannelConfigured {
            channel_id: rules.channel_id.clone(),
            inbox_id: "inbox".into(),
            channel_type: ChannelType::Chat as i32,
            name: rules.channel_id.clone(),
            enabled: true,
            ..Default::default()
        };
        config.channels.insert(Owned { account_id: ACCOUNT.into(), entity: channel });
        config.routing_rules.insert(Owned { account_id: ACCOUNT.into(), entity: rules });
    }
    RouterConfig::from_snapshot(config)
}

fn channel_of(visitor: u64) -> String {
    format!("chat-{}", visitor % CHANNELS as u64)
}

fn thread_of(visitor: u64) -> String {
    format!("visitor-{visitor}")
}

/// An agent closes a conversation (the API's close command, as the router reads it).
fn close_request(sequence: u64, conversation_id: String) -> Envelope {
    let at = Utc.timestamp_opt(1_700_000_000 + sequence as i64, 0).unwrap();
    let mut envelope = new_root(
        ACCOUNT,
        ACCOUNT,
        at,
        Payload::ConversationCloseRequested(ConversationCloseRequested {
            conversation_id,
            request_id: format!("close-{sequence}"),
            actor: Some(Actor { user_id: "agent-0000".into(), role: "agent".into() }),
        }),
    );
    envelope.recorded_at = Some(timestamp(at));
    envelope
}

fn inbound(sequence: u64, visitor: u64) -> Envelope {
    let channel_id = channel_of(visitor);
    let provider_message_id = format!("m-{sequence}");
    let mut envelope = new_root(
        ACCOUNT,
        ACCOUNT,
        Utc.timestamp_opt(1_700_000_000 + sequence as i64, 0).unwrap(),
        Payload::InboundMessageReceived(InboundMessageReceived {
            message_id: switchboard_runtime::ids::message_id_for(ACCOUNT, &channel_id, &provider_message_id)
                .to_string(),
            channel_id,
            inbox_id: "inbox".into(),
            channel_type: ChannelType::Chat as i32,
            provider_message_id,
            thread_key: thread_of(visitor),
            sender: Some(Sender {
                external_id: thread_of(visitor),
                display_name: "Visitor".into(),
                email: String::new(),
            }),
            text: "Hello, I have a question about my order".into(),
            ..Default::default()
        }),
    );
    envelope.recorded_at = Some(timestamp(Utc.timestamp_opt(1_700_000_000 + sequence as i64, 0).unwrap()));
    envelope
}

/// Nanoseconds this thread has run on a CPU (Linux `schedstat`): on a shared machine the wall
/// clock also counts time other processes held the core, so both figures are printed.
fn thread_cpu_nanos() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// With `PERF_CTL_FIFO` set (`perf record --delay=-1 --control fifo:$PERF_CTL_FIFO ...`), perf
/// samples only the timed loop, not building the state and the inputs.
fn profiler_control(command: &str) {
    if let Some(fifo) = std::env::var_os("PERF_CTL_FIFO") {
        use std::io::Write;
        if let Ok(mut control) = std::fs::OpenOptions::new().write(true).open(fifo) {
            let _ = writeln!(control, "{command}");
        }
    }
}

/// Resident set size of this process (Linux `statm`, in pages of 4 KiB).
fn resident_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = text.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// A deterministic pseudo-random sequence (no dependency, reproducible runs).
fn next_random(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// The stream of inputs: follow-ups to open conversations, new conversations and (in the
/// steady state) as many closes as new conversations.
struct Workload {
    new_share: f64,
    steady: bool,
    seed: u64,
    sequence: u64,
    next_new_visitor: u64,
    /// Visitors with an open conversation (follow-ups and closes pick from them); those new in
    /// the batch being built join after it, as their conversations exist only once it is routed.
    open_visitors: Vec<u64>,
    new_in_batch: Vec<u64>,
    closes: u64,
}

impl Workload {
    fn next_batch(&mut self, state: &RouterState, batch_size: u64) -> Vec<Envelope> {
        let mut batch: Vec<Envelope> = Vec::with_capacity(batch_size as usize);
        while (batch.len() as u64) < batch_size {
            self.sequence += 1;
            let is_new = (next_random(&mut self.seed) % 10_000) as f64 / 10_000.0 < self.new_share;
            if !is_new {
                let index = (next_random(&mut self.seed) % self.open_visitors.len() as u64) as usize;
                batch.push(inbound(self.sequence, self.open_visitors[index]));
                continue;
            }
            self.next_new_visitor += 1;
            self.new_in_batch.push(self.next_new_visitor);
            batch.push(inbound(self.sequence, self.next_new_visitor));
            if self.steady && (batch.len() as u64) < batch_size {
                // One conversation closes for each new one; no later input of the batch is a
                // follow-up to it (that would open a new conversation and grow the state).
                let index = (next_random(&mut self.seed) % self.open_visitors.len() as u64) as usize;
                let visitor = self.open_visitors.swap_remove(index);
                let conversation_id = state
                    .open_conversation_id(ACCOUNT, &channel_of(visitor), &thread_of(visitor))
                    .expect("open conversation");
                self.sequence += 1;
                batch.push(close_request(self.sequence, conversation_id));
                self.closes += 1;
            }
        }
        self.open_visitors.append(&mut self.new_in_batch);
        batch
    }
}

/// What routing a number of inputs took.
#[derive(Default)]
struct Measured {
    elapsed: std::time::Duration,
    cpu_nanos_opt: Option<u64>,
    emitted: usize,
}

/// Routes `inputs` inputs of the workload; only routing is timed. Inputs are built in batches
/// just before they are routed, the way the shell decodes a polled batch and routes it at once.
/// (Inputs built all up front would be cold in memory by the time they are routed, a cost the
/// router never pays.)
fn route(
    state: &mut RouterState,
    config: &RouterConfig,
    workload: &mut Workload,
    inputs: u64,
    profile: bool,
) -> Measured {
    let mut measured = Measured { cpu_nanos_opt: Some(0), ..Default::default() };
    let mut remaining = inputs;
    while remaining > 0 {
        let batch_size = remaining.min(INPUT_BATCH);
        remaining -= batch_size;
        let batch = workload.next_batch(state, batch_size);
        if profile {
            profiler_control("enable");
        }
        let started = Instant::now();
        let cpu_started_opt = thread_cpu_nanos();
        // The inputs are consumed, as the shell's decoded records are: what a decision does not
        // move into its events is freed within the timed loop.
        for input in batch {
            let events = decide(state, config, input).expect("routable");
            for event in &events {
                evolve(state, event);
            }
            measured.emitted += events.len();
        }
        let cpu_ended_opt = thread_cpu_nanos();
        measured.elapsed += started.elapsed();
        if profile {
            profiler_control("disable");
        }
        measured.cpu_nanos_opt = match (measured.cpu_nanos_opt, cpu_started_opt, cpu_ended_opt) {
            (Some(total), Some(start), Some(end)) => Some(total + (end - start)),
            _ => None,
        };
    }
    measured
}

/// One timed round of `inputs` inputs; prints its figures and returns decisions per CPU-second
/// of the routing thread (when the platform reports thread CPU time).
fn timed_round(
    state: &mut RouterState,
    config: &RouterConfig,
    workload: &mut Workload,
    inputs: u64,
    new_share: f64,
    steady: bool,
) -> Option<f64> {
    let closes_before = workload.closes;
    let resident_before_opt = resident_bytes();
    let measured = route(state, config, workload, inputs, true);
    let (elapsed, emitted, closes) = (measured.elapsed, measured.emitted, workload.closes - closes_before);
    let cpu_seconds_opt = measured.cpu_nanos_opt.map(|nanos| nanos as f64 / 1e9);
    println!(
        "inputs: {inputs} ({:.0}% of messages start a conversation; {closes} closes), events emitted: {emitted}, open conversations at the end: {}{}",
        new_share * 100.0,
        state.conversations.len(),
        if steady { "" } else { " (--growing)" }
    );
    println!(
        "decide+evolve: {:.0} decisions/s on one thread ({:.2} µs each)",
        inputs as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1e6 / inputs as f64
    );
    if let (Some(before), Some(after)) = (resident_before_opt, resident_bytes()) {
        println!(
            "resident memory: {:.0} MB after routing ({:+.0} MB while routing)",
            after as f64 / 1e6,
            (after as f64 - before as f64) / 1e6
        );
    }
    if let Some(cpu_seconds) = cpu_seconds_opt {
        println!(
            "decide+evolve: {:.0} decisions per CPU-second of the routing thread ({:.2} µs CPU each; {:.0}% of wall time on CPU)",
            inputs as f64 / cpu_seconds,
            cpu_seconds * 1e6 / inputs as f64,
            cpu_seconds * 100.0 / elapsed.as_secs_f64()
        );
    }
    cpu_seconds_opt.map(|cpu_seconds| inputs as f64 / cpu_seconds)
}

fn main() {
    let inputs = argument("--inputs", 1_000_000.0) as u64;
    let new_share = argument("--new-share", 0.2);
    let steady = !flag("--growing");
    // A running router's dedup window (`RECENT_MESSAGE_WINDOW` retired message ids) is full,
    // and so are its tables; a freshly built state's are not. In the steady state the warm-up
    // routes the same mix, untimed, until the window is full, so the figure is that of the
    // steady state, not of tables growing (`--warmup 0` measures from the fresh state).
    let warmup_opt = flag("--warmup").then(|| argument("--warmup", 0.0) as u64);
    let config = config();
    let mut state = RouterState::default();
    align_state(&mut state, &config);
    let setup_started = Instant::now();
    for visitor in 0..OPEN_CONVERSATIONS as u64 {
        for event in decide(&state, &config, inbound(visitor + 1, visitor)).expect("routable") {
            evolve(&mut state, &event);
        }
    }
    let mut workload = Workload {
        new_share,
        steady,
        seed: 0x9E37_79B9_7F4A_7C15,
        sequence: OPEN_CONVERSATIONS as u64,
        next_new_visitor: OPEN_CONVERSATIONS as u64,
        open_visitors: (0..OPEN_CONVERSATIONS as u64).collect(),
        new_in_batch: Vec::new(),
        closes: 0,
    };
    let warmup = match warmup_opt {
        Some(warmup) => {
            route(&mut state, &config, &mut workload, warmup, false);
            warmup
        }
        None if steady => {
            let mut warmup = 0;
            while state.dedup.retired().len() < RECENT_MESSAGE_WINDOW && warmup < 5_000_000 {
                route(&mut state, &config, &mut workload, 100_000, false);
                warmup += 100_000;
            }
            warmup
        }
        None => 0,
    };
    println!(
        "state: {} agents, {} rules, {} open conversations (built in {:.2} s, with {warmup} inputs of warm-up)",
        AGENTS,
        CHANNELS,
        state.conversations.len(),
        setup_started.elapsed().as_secs_f64()
    );

    let rounds = (argument("--rounds", 1.0) as usize).max(1);
    let mut per_cpu_second_by_round = Vec::with_capacity(rounds);
    for round in 1..=rounds {
        if rounds > 1 {
            println!("round {round} of {rounds}:");
        }
        if let Some(per_cpu_second) = timed_round(&mut state, &config, &mut workload, inputs, new_share, steady) {
            per_cpu_second_by_round.push(per_cpu_second);
        }
    }
    if per_cpu_second_by_round.len() > 1 {
        per_cpu_second_by_round.sort_by(f64::total_cmp);
        let rounded: Vec<String> = per_cpu_second_by_round.iter().map(|figure| format!("{figure:.0}")).collect();
        println!(
            "median of {} rounds: {:.0} decisions per CPU-second (rounds, sorted: {})",
            per_cpu_second_by_round.len(),
            per_cpu_second_by_round[per_cpu_second_by_round.len() / 2],
            rounded.join(", ")
        );
    }
    // Tearing down millions of small allocations takes seconds and is not routing work; the
    // process exits right after, so profiles of this benchmark show only setup and routing.
    std::mem::forget(state);
}
