//! Sends a demo load through a running pipeline and prints a summary read through the gRPC API.

use clap::Parser;
use switchboard_tests::demo::{LoadSpec, percentile, run_load, summarize};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "http://127.0.0.1:18080")]
    ingest_url: String,
    #[arg(long, default_value = "http://127.0.0.1:18090")]
    api_url: String,
    #[arg(long, default_value = "website-chat")]
    channel: String,
    #[arg(long, default_value_t = 1000)]
    messages: usize,
    #[arg(long, default_value_t = 200)]
    visitors: usize,
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
    /// The API's JWT secret: the load driver signs itself an admin token of the demo account.
    #[arg(long, env = "API_JWT_SECRET", default_value = switchboard_tests::TEST_JWT_SECRET, hide_env_values = true)]
    jwt_secret: String,
    /// After the load: answer one chat conversation and the team-email conversation of
    /// `--email-contact` through SendReply, and print what the delivery service did with them.
    #[arg(long)]
    replies: bool,
    #[arg(long, default_value = "team-email")]
    email_channel: String,
    #[arg(long, default_value = "erin@customer.example")]
    email_contact: String,
    /// Mailpit's web UI, where the email reply can be read.
    #[arg(long, env = "MAILPIT_URL", default_value = "http://127.0.0.1:18026")]
    mailpit_url: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let token = switchboard_api::auth::mint_token(
        args.jwt_secret.as_bytes(),
        &switchboard_tests::demo_admin(),
        std::time::Duration::from_secs(3600),
    )?;
    let api = switchboard_tests::connect_api(&args.api_url, switchboard_tests::BearerToken::new(&token)?).await?;
    let run_id = format!("demo-{}", &uuid::Uuid::now_v7().simple().to_string()[20..]);
    let spec = LoadSpec {
        channel_id: args.channel.clone(),
        messages: args.messages,
        visitors: args.visitors,
        concurrency: args.concurrency,
        run_id: run_id.clone(),
    };
    println!("sending {} chat messages from {} visitors (run {run_id})...", spec.messages, spec.visitors);
    let report = run_load(&args.ingest_url, api.clone(), &spec).await?;
    let summary = summarize(&mut api.clone(), &report.conversation_ids).await?;

    println!();
    println!("== Switchboard demo summary (read through the gRPC API) ==");
    println!("messages sent / accepted / visible : {} / {} / {}", spec.messages, report.accepted, summary.messages);
    println!("conversations (expected {:>4})      : {}", spec.visitors, summary.conversations);
    for (agent, conversations) in &summary.per_assignee {
        println!("  assigned to {agent:<22}: {conversations}");
    }
    println!("  unassigned                        : {}", summary.unassigned);
    println!(
        "end-to-end latency (202 -> visible) : p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        percentile(&report.latencies, 50.0).as_secs_f64() * 1e3,
        percentile(&report.latencies, 99.0).as_secs_f64() * 1e3,
        percentile(&report.latencies, 100.0).as_secs_f64() * 1e3,
    );
    println!("wall time                           : {:.2} s", report.elapsed.as_secs_f64());
    let all_there = summary.messages == spec.messages && summary.conversations == spec.visitors;
    if !all_there {
        anyhow::bail!("the API does not show every message and conversation that was sent");
    }
    if args.replies {
        send_replies(&args, &mut api.clone(), &report.conversation_ids).await?;
    }
    Ok(())
}

/// O1–O5 in the demo: an agent answers a chat visitor and the customer who wrote in by email;
/// the delivery service sends both (the chat reply to ingest's SSE stream, the email to Mailpit).
async fn send_replies(
    args: &Args,
    api: &mut switchboard_tests::ApiClient,
    chat_conversations: &std::collections::BTreeSet<String>,
) -> anyhow::Result<()> {
    use switchboard_tests::demo::{reply_and_follow, wait_for_conversation};
    let settle = std::time::Duration::from_secs(30);
    println!();
    println!("== Agent replies (SendReply -> outbound.v1 -> delivery service) ==");
    let chat_id = chat_conversations.iter().next().ok_or_else(|| anyhow::anyhow!("no chat conversation"))?;
    let visitor = api
        .get_conversation(switchboard_proto::api::v1::GetConversationRequest {
            conversation_id: chat_id.clone(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .conversation
        .map(|conversation| conversation.contact_external_id)
        .unwrap_or_default();
    let chat = reply_and_follow(
        api,
        &args.api_url,
        &args.jwt_secret,
        chat_id,
        "ana",
        "Thanks for writing in! An agent is on it.",
        settle,
    )
    .await?;
    print_outcome("chat reply ", &chat);
    println!(
        "  the visitor's stream    : curl -N {}/v1/channels/{}/chat/visitors/{visitor}/events",
        args.ingest_url, chat.channel_id
    );
    let email_id = wait_for_conversation(api, &args.email_channel, Some(&args.email_contact), settle).await?;
    let email = reply_and_follow(
        api,
        &args.api_url,
        &args.jwt_secret,
        &email_id,
        "ana",
        "Hello Erin,\n\nthanks for telling us. We corrected the address on your invoice.",
        settle,
    )
    .await?;
    print_outcome("email reply", &email);
    println!("  read it in Mailpit      : {} (to {})", args.mailpit_url, args.email_contact);
    for outcome in [&chat, &email] {
        if outcome.delivery_state != "sent" {
            anyhow::bail!("the {} reply {} is {}", outcome.channel_id, outcome.reply_id, outcome.delivery_state);
        }
    }
    Ok(())
}

fn print_outcome(label: &str, outcome: &switchboard_tests::demo::ReplyOutcome) {
    println!(
        "{label} by {:<11}: {} (conversation {}, reply {}{}{})",
        outcome.agent_id,
        outcome.delivery_state,
        outcome.conversation_id,
        outcome.reply_id,
        if outcome.provider_message_id.is_empty() {
            String::new()
        } else {
            format!(", provider id {}", outcome.provider_message_id)
        },
        if outcome.failure_reason.is_empty() { String::new() } else { format!(", {}", outcome.failure_reason) },
    );
}
