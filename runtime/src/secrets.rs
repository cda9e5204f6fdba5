//! Secrets: Meta app secrets, verify tokens and access tokens, custom-channel signing keys, the
//! SMTP relay's credentials. They never travel in config events (the config topic is readable by
//! every service); ingest reads them from the TOML file named by `INGEST_SECRETS_FILE`, the
//! delivery service from `DELIVERY_SECRETS_FILE` (same format; each reads what it needs), one
//! table per channel id:
//!
//! ```toml
//! [smtp]                 # delivery: AUTH at the SMTP relay (both or neither)
//! username = "…"
//! password = "…"
//!
//! [channels.fb-page]
//! app_secret = "…"      # X-Hub-Signature-256 key (Messenger, WhatsApp)
//! verify_token = "…"    # the hub.verify_token of the GET handshake
//! access_token = "…"    # delivery: the page token (Messenger) or WhatsApp token of the Graph API
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

    /// The value as text (tokens sent in headers).
    pub fn expose_str(&self) -> &str {
        &self.0
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
    /// Graph API token of the channel (Messenger page token, WhatsApp token): delivery only.
    #[serde(default)]
    pub access_token: Option<Secret>,
}

/// AUTH credentials of the SMTP relay the delivery service sends email through.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SmtpSecrets {
    pub username: Secret,
    pub password: Secret,
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
    /// The installation's SMTP relay credentials (delivery).
    #[serde(default)]
    pub smtp: Option<SmtpSecrets>,
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
                ("access_token", &channel.access_token),
            ] {
                if secret.as_ref().is_some_and(|secret| secret.expose().is_empty()) {
                    anyhow::bail!("secrets file: {table}.{name} is empty");
                }
            }
        }
        if let Some(smtp) = &secrets.smtp
            && (smtp.username.expose().is_empty() || smtp.password.expose().is_empty())
        {
            anyhow::bail!("secrets file: smtp.username and smtp.password must not be empty");
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
    fn delivery_reads_access_tokens_and_smtp_credentials() {
        let secrets = Secrets::parse(
            "[smtp]\nusername = \"relay-user\"\npassword = \"relay-pass\"\n[channels.wa]\naccess_token = \"EAAG\"\n",
        )
        .unwrap();
        assert_eq!(secrets.channel("acct", "wa").unwrap().access_token.as_ref().unwrap().expose_str(), "EAAG");
        let smtp = secrets.smtp.as_ref().unwrap();
        assert_eq!((smtp.username.expose_str(), smtp.password.expose_str()), ("relay-user", "relay-pass"));
        assert!(!format!("{secrets:?}").contains("relay-pass"));
        assert!(Secrets::parse("[smtp]\nusername = \"u\"\n").is_err());
        assert!(Secrets::parse("[smtp]\nusername = \"u\"\npassword = \"\"\n").is_err());
        assert!(Secrets::parse("[channels.wa]\naccess_token = \"\"\n").is_err());
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
