//! Channel secrets: Meta app secrets and verify tokens, custom-channel signing keys. They never
//! travel in config events (the config topic is readable by every service); ingest reads them
//! from the TOML file named by `INGEST_SECRETS_FILE`, one table per channel id:
//!
//! ```toml
//! [channels.fb-page]
//! app_secret = "…"      # X-Hub-Signature-256 key (Messenger, WhatsApp)
//! verify_token = "…"    # the hub.verify_token of the GET handshake
//!
//! [channels.telegram-bridge]
//! signing_key = "…"     # custom channels: HMAC key of X-Switchboard-Signature
//!
//! [accounts.acme.channels.fb-page]   # one account's channel (M1: channel ids are unique
//! app_secret = "…"                   # within an account only); wins over [channels.<id>]
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use anyhow::Context;
use serde::Deserialize;

/// A secret value: never printed, not even by `Debug`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("Secret(…)")
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ChannelSecrets {
    #[serde(default)]
    pub app_secret: Option<Secret>,
    #[serde(default)]
    pub verify_token: Option<Secret>,
    #[serde(default)]
    pub signing_key: Option<Secret>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Secrets {
    /// By channel id, for every account that has no table of its own for the channel.
    #[serde(default)]
    pub channels: BTreeMap<String, ChannelSecrets>,
    /// By account, then channel id.
    #[serde(default)]
    pub accounts: BTreeMap<String, AccountSecrets>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AccountSecrets {
    #[serde(default)]
    pub channels: BTreeMap<String, ChannelSecrets>,
}

impl Secrets {
    pub fn parse(text: &str) -> anyhow::Result<Secrets> {
        let secrets: Secrets = toml::from_str(text).context("invalid secrets file")?;
        let scoped = secrets.accounts.iter().flat_map(|(account_id, account)| {
            account
                .channels
                .iter()
                .map(move |(channel_id, channel)| (format!("accounts.{account_id}.channels.{channel_id}"), channel))
        });
        let unscoped = secrets.channels.iter().map(|(channel_id, channel)| (format!("channels.{channel_id}"), channel));
        for (table, channel) in unscoped.chain(scoped) {
            for (name, secret) in [
                ("app_secret", &channel.app_secret),
                ("verify_token", &channel.verify_token),
                ("signing_key", &channel.signing_key),
            ] {
                if secret.as_ref().is_some_and(|secret| secret.expose().is_empty()) {
                    anyhow::bail!("secrets file: {table}.{name} is empty");
                }
            }
        }
        Ok(secrets)
    }

    pub fn load(path: &Path) -> anyhow::Result<Secrets> {
        let text = std::fs::read_to_string(path).with_context(|| format!("failed to read {}", path.display()))?;
        Secrets::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    /// The secrets of `account_id`'s channel `channel_id`: its account's own table if there is
    /// one, else the table of the channel id.
    pub fn channel(&self, account_id: &str, channel_id: &str) -> Option<&ChannelSecrets> {
        self.accounts
            .get(account_id)
            .and_then(|account| account.channels.get(channel_id))
            .or_else(|| self.channels.get(channel_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_file_parses_per_channel_and_hides_values_from_debug() {
        let secrets = Secrets::parse(
            "[channels.fb]\napp_secret = \"s3cret\"\nverify_token = \"tok\"\n[channels.tg]\nsigning_key = \"k\"\n",
        )
        .unwrap();
        assert_eq!(secrets.channel("acct", "fb").unwrap().app_secret.as_ref().unwrap().expose(), b"s3cret");
        assert!(secrets.channel("acct", "tg").unwrap().app_secret.is_none());
        assert!(!format!("{secrets:?}").contains("s3cret"));
        assert!(Secrets::parse("[channels.fb]\napp_secrit = \"typo\"\n").is_err());
        assert!(Secrets::parse("[channels.fb]\napp_secret = \"\"\n").is_err());
        assert!(Secrets::parse("[accounts.a.channels.fb]\napp_secret = \"\"\n").is_err());
    }

    #[test]
    fn m1_an_accounts_own_channel_table_wins_over_the_channel_ids() {
        let secrets = Secrets::parse(
            "[channels.fb]\napp_secret = \"shared\"\n[accounts.globex.channels.fb]\napp_secret = \"globex\"\n",
        )
        .unwrap();
        let app_secret = |account: &str| secrets.channel(account, "fb").unwrap().app_secret.as_ref().unwrap().expose();
        assert_eq!(app_secret("globex"), b"globex");
        assert_eq!(app_secret("acme"), b"shared");
        assert!(secrets.channel("globex", "wa").is_none());
    }
}
