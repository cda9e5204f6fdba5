//! SMTP throughput: `--replies` agent replies sent through `SmtpRelay` (pooled connections, the
//! delivery service's transport) to an SMTP server, `--concurrency` sends in flight at once; the
//! bench prints sent replies/s and p50/p99 send latency (from the start of `send` to the relay's
//! 250). With `--mailpit-url` it then counts what Mailpit stored for this run, so every reply
//! counted as sent is checked to have arrived.
//!
//! `cargo build --release -p switchboard-delivery --bin bench-smtp`
//! `eval "$(scripts/stack env)" && target/release/bench-smtp --replies 20000 --concurrency 64`

use std::sync::Arc;
use std::time::{Duration, Instant};
use switchboard_runtime::attachment_hosts::AttachmentHosts;

use anyhow::{Context, bail};
use clap::Parser;
use futures::StreamExt;
use switchboard_delivery::email::{SmtpRelay, SmtpSettings, SmtpTls};
use switchboard_delivery::outcome::SendOutcome;
use switchboard_proto::events::v1::{
    Author, AuthorKind, ChannelType, OutboundEmail, OutboundMessageQueued, OutboundPurpose,
};
use switchboard_runtime::outbound::email_message_id;

/// The delivery binary's allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// Replies to send in total.
    #[arg(long, default_value_t = 5_000)]
    replies: usize,
    /// Sends in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Pooled SMTP connections (default: one per concurrent send).
    #[arg(long)]
    max_connections: Option<u32>,
    #[arg(long, default_value = "127.0.0.1")]
    smtp_host: String,
    #[arg(long, env = "MAILPIT_SMTP_PORT")]
    smtp_port: u16,
    /// `none`, `starttls` or `tls`.
    #[arg(long, default_value = "none")]
    smtp_tls: SmtpTls,
    /// Mailpit's API, to count the replies that arrived (skipped when unset).
    #[arg(long, env = "MAILPIT_URL")]
    mailpit_url: Option<String>,
}

/// A realistic agent reply: both bodies with a signature, threaded on a customer's message.
fn reply(run: &str, index: usize) -> OutboundMessageQueued {
    let reply_id = uuid::Uuid::now_v7();
    let from_address = "support@acme.example";
    let message_id = email_message_id(reply_id, from_address);
    let to = format!("customer-{index}@{run}.bench.example");
    OutboundMessageQueued {
        reply_id: reply_id.to_string(),
        conversation_id: format!("conv-{index}"),
        channel_type: ChannelType::TeamEmail as i32,
        purpose: OutboundPurpose::ConversationReply as i32,
        author: Some(Author {
            kind: AuthorKind::Agent as i32,
            agent_id: "ana".into(),
            name: "Ana Díaz".into(),
            automation: 0,
        }),
        recipient: to.clone(),
        idempotency_key: message_id.clone(),
        email: Some(OutboundEmail {
            from_name: "Ana Díaz from Acme Support".into(),
            from_address: from_address.into(),
            to: vec![to],
            subject: format!("Re: order {index}"),
            message_id_header: message_id,
            in_reply_to: format!("customer-{index}@{run}.bench.example"),
            references: vec![format!("customer-{index}@{run}.bench.example")],
            from_fallback_address: false,
            text_body: format!("Hello,\nyour order {index} ships today.\n\n-- \nAna Díaz\nAcme Support"),
            html_body: format!(
                "<p>Hello,<br>your order {index} ships today.</p><p>-- <br>Ana Díaz<br>Acme Support</p>"
            ),
        }),
        ..Default::default()
    }
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// How many messages Mailpit holds addressed to this run's domain.
async fn arrived(mailpit_url: &str, run: &str) -> anyhow::Result<u64> {
    let body: serde_json::Value = reqwest::Client::new()
        .get(format!("{}/api/v1/search", mailpit_url.trim_end_matches('/')))
        .query(&[("query", format!("to:\"@{run}.bench.example\"")), ("limit", "1".into())])
        .send()
        .await
        .context("mailpit search failed")?
        .error_for_status()?
        .json()
        .await?;
    body["messages_count"].as_u64().context("mailpit search answered no messages_count")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let settings = SmtpSettings {
        host: args.smtp_host.clone(),
        port: args.smtp_port,
        tls: args.smtp_tls,
        username: None,
        password: None,
        timeout: Duration::from_secs(30),
        attachment_hosts: AttachmentHosts::PublicOnly,
    };
    let max_connections = args.max_connections.unwrap_or(args.concurrency as u32);
    let relay = Arc::new(SmtpRelay::with_max_connections(settings, max_connections)?);
    let run = format!("run-{}", uuid::Uuid::now_v7().simple());
    let replies: Vec<OutboundMessageQueued> = (0..args.replies).map(|index| reply(&run, index)).collect();

    let started = Instant::now();
    let results: Vec<(SendOutcome, Duration)> = futures::stream::iter(replies)
        .map(|message| {
            let relay = Arc::clone(&relay);
            async move {
                let sent_at = Instant::now();
                let outcome = relay.send(&message).await;
                (outcome, sent_at.elapsed())
            }
        })
        .buffer_unordered(args.concurrency.max(1))
        .collect()
        .await;
    let elapsed = started.elapsed();

    let mut latencies: Vec<Duration> = Vec::with_capacity(results.len());
    let mut failures = 0usize;
    for (outcome, latency) in &results {
        match outcome {
            SendOutcome::Sent { .. } => latencies.push(*latency),
            other => {
                if failures < 5 {
                    eprintln!("bench-smtp: send failed: {other:?}");
                }
                failures += 1;
            }
        }
    }
    latencies.sort_unstable();
    let sent = latencies.len();
    println!(
        "bench-smtp: {sent} sent, {failures} failed in {:.2} s: {:.0} replies/s (concurrency {}, {} connections); send latency p50 {:.1} ms, p99 {:.1} ms",
        elapsed.as_secs_f64(),
        sent as f64 / elapsed.as_secs_f64(),
        args.concurrency,
        max_connections,
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
    );
    if let Some(mailpit_url) = &args.mailpit_url {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut count = arrived(mailpit_url, &run).await?;
        while count < sent as u64 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            count = arrived(mailpit_url, &run).await?;
        }
        println!("bench-smtp: mailpit holds {count} of the {sent} sent replies");
        if count != sent as u64 {
            bail!("mailpit holds {count} replies of this run, {sent} were sent");
        }
    }
    if failures > 0 {
        bail!("{failures} sends failed");
    }
    Ok(())
}
