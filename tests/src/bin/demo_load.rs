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
        channel_id: args.channel,
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
    Ok(())
}
