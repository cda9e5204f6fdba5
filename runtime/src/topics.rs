//! Topic names and specs. `deploy/topics.txt` is the one place where partition counts and
//! topic configs are written; the stack script and this module both read it.

use std::time::Duration;

use anyhow::{Context, bail};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

const TOPICS_FILE: &str = include_str!("../../deploy/topics.txt");

/// The prefix that production-like environments use; tests use a random one per test.
pub const DEFAULT_TOPIC_PREFIX: &str = "sb.";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    /// Name without the environment prefix, e.g. `inbound.v1`.
    pub base_name: String,
    pub partitions: i32,
    pub configs: Vec<(String, String)>,
}

/// Every topic spec declared in `deploy/topics.txt` (parsed once per process).
pub fn topic_specs() -> &'static [TopicSpec] {
    static SPECS: std::sync::LazyLock<Vec<TopicSpec>> = std::sync::LazyLock::new(|| {
        parse_topic_specs(TOPICS_FILE).expect("deploy/topics.txt is valid (checked by a unit test)")
    });
    &SPECS
}

fn parse_topic_specs(text: &str) -> anyhow::Result<Vec<TopicSpec>> {
    let mut specs = Vec::new();
    for (line_index, raw_line) in text.lines().enumerate() {
        let line = raw_line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let columns: Vec<&str> = line.split_whitespace().collect();
        let [name, partitions, configs] = columns[..] else {
            bail!("topics.txt line {}: expected `name partitions configs`", line_index + 1);
        };
        let partitions: i32 =
            partitions.parse().with_context(|| format!("topics.txt line {}: bad partition count", line_index + 1))?;
        let configs = configs
            .split(',')
            .map(|pair| {
                pair.split_once('=')
                    .map(|(key, value)| (key.to_owned(), value.to_owned()))
                    .with_context(|| format!("topics.txt line {}: bad config `{pair}`", line_index + 1))
            })
            .collect::<anyhow::Result<_>>()?;
        specs.push(TopicSpec { base_name: name.to_owned(), partitions, configs });
    }
    Ok(specs)
}

/// The full names of Switchboard's topics in one environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    pub prefix: String,
    /// Inbound messages from channel adapters; keyed by account id.
    pub inbound: String,
    /// Router decisions: conversations, messages, assignments; keyed by account id.
    pub conversations: String,
    /// Compacted configuration (inboxes, channels, rules, agents); keyed by entity.
    pub config: String,
    /// Outbound messages accepted for sending (replies, notes, automated); keyed by conversation.
    pub outbound: String,
    /// Delivery attempts and their outcomes; keyed by conversation id.
    pub delivery: String,
    /// Records that could not be processed, with the reason in headers.
    pub deadletter: String,
}

impl Topics {
    pub fn with_prefix(prefix: &str) -> Self {
        Topics {
            prefix: prefix.to_owned(),
            inbound: format!("{prefix}inbound.v1"),
            conversations: format!("{prefix}conversations.v1"),
            config: format!("{prefix}config.v1"),
            outbound: format!("{prefix}outbound.v1"),
            delivery: format!("{prefix}delivery.v1"),
            deadletter: format!("{prefix}deadletter.v1"),
        }
    }

    /// Partition count of a topic of this environment, as declared in `deploy/topics.txt`.
    pub fn declared_partitions(&self, full_name: &str) -> Option<i32> {
        let base_name = full_name.strip_prefix(&self.prefix)?;
        topic_specs().iter().find(|spec| spec.base_name == base_name).map(|spec| spec.partitions)
    }
}

/// Creates any of this environment's topics that do not exist yet (idempotent).
pub async fn ensure_topics(brokers: &str, topics: &Topics) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = crate::kafka::client_config(brokers, "switchboard-admin")
        .create()
        .context("failed to create kafka admin client")?;
    let specs = topic_specs();
    let names: Vec<String> = specs.iter().map(|spec| format!("{}{}", topics.prefix, spec.base_name)).collect();
    let new_topics: Vec<NewTopic<'_>> = specs
        .iter()
        .zip(&names)
        .map(|(spec, name)| {
            spec.configs
                .iter()
                .fold(NewTopic::new(name, spec.partitions, TopicReplication::Fixed(1)), |topic, (key, value)| {
                    topic.set(key, value)
                })
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin.create_topics(&new_topics, &options).await.context("failed to create topics")?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => bail!("failed to create topic {name}: {code}"),
        }
    }
    wait_until_visible(&admin, specs, &names).await
}

/// A created topic reaches the brokers' metadata a moment after CreateTopics answers; a client
/// that looks it up in between (a config reader, a consumer's assignment) is told it does not
/// exist. So `ensure_topics` returns only once every topic shows all its partitions.
async fn wait_until_visible(
    admin: &AdminClient<DefaultClientContext>,
    specs: &[TopicSpec],
    names: &[String],
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for (spec, name) in specs.iter().zip(names) {
        loop {
            let visible_partitions = admin
                .inner()
                .fetch_metadata(Some(name), Duration::from_secs(5))
                .ok()
                .and_then(|metadata| {
                    metadata
                        .topics()
                        .first()
                        .filter(|topic| topic.error().is_none())
                        .map(|topic| topic.partitions().len())
                })
                .unwrap_or(0);
            if visible_partitions >= spec.partitions as usize {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "topic {name} was created but shows {visible_partitions} of {} partitions after 30 s",
                    spec.partitions
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_topics_parse_and_cover_every_topic_we_use() {
        let specs = topic_specs();
        let topics = Topics::with_prefix(DEFAULT_TOPIC_PREFIX);
        for name in [&topics.inbound, &topics.conversations, &topics.config, &topics.deadletter] {
            assert!(topics.declared_partitions(name).unwrap_or(0) > 0, "{name} is declared");
        }
        // Router output is written to the same partition index as its input (docs/events.md).
        assert_eq!(topics.declared_partitions(&topics.inbound), topics.declared_partitions(&topics.conversations));
        assert!(specs.iter().any(|spec| spec.configs.contains(&("cleanup.policy".into(), "compact".into()))));
    }

    #[test]
    fn malformed_topic_lines_are_rejected_with_the_line_number() {
        let error = parse_topic_specs("a.v1 x cleanup.policy=delete").unwrap_err();
        assert!(error.to_string().contains("line 1"), "{error}");
        assert!(parse_topic_specs("a.v1 3").is_err());
        assert!(parse_topic_specs("a.v1 3 novalue").is_err());
    }
}
