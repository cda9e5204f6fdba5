//! What Messenger and WhatsApp share: Meta's webhook contract. One callback URL per Meta app
//! (`/v1/webhooks/messenger`, `/v1/webhooks/whatsapp`); each entry names the page or phone
//! number it is for, which picks the channel; the body is signed with the app secret
//! (`X-Hub-Signature-256`), and the URL is proven ours by the GET handshake.

use std::collections::BTreeMap;

use serde::Deserialize;
use switchboard_proto::events::v1::{ChannelConfigured, ChannelType};
use switchboard_runtime::config_store::{ConfigSnapshot, Owned};

use crate::error::IngestError;
use crate::secrets::Secrets;
use crate::signature;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaProduct {
    Messenger,
    WhatsApp,
}

impl MetaProduct {
    pub fn channel_type(self) -> ChannelType {
        match self {
            MetaProduct::Messenger => ChannelType::FacebookMessenger,
            MetaProduct::WhatsApp => ChannelType::Whatsapp,
        }
    }
}

/// `GET …?hub.mode=subscribe&hub.verify_token=…&hub.challenge=…`
#[derive(Debug, Default, Deserialize)]
pub struct HandshakeQuery {
    #[serde(rename = "hub.mode")]
    pub mode: Option<String>,
    #[serde(rename = "hub.verify_token")]
    pub verify_token: Option<String>,
    #[serde(rename = "hub.challenge")]
    pub challenge: Option<String>,
}

fn constant_time_eq(left: &[u8], right: &[u8]) -> bool {
    if left.len() != right.len() {
        return false;
    }
    left.iter().zip(right).fold(0u8, |difference, (a, b)| difference | (a ^ b)) == 0
}

/// The subscription handshake: answer the challenge only when the token is the verify token
/// of one of this product's channels.
pub fn verify_handshake(
    config: &ConfigSnapshot,
    secrets: &Secrets,
    product: MetaProduct,
    query: &HandshakeQuery,
) -> Result<String, IngestError> {
    if query.mode.as_deref() != Some("subscribe") {
        return Err(IngestError::InvalidField { field: "hub.mode", problem: "must be `subscribe`".into() });
    }
    let challenge = query
        .challenge
        .as_deref()
        .filter(|challenge| !challenge.is_empty())
        .ok_or(IngestError::InvalidField { field: "hub.challenge", problem: "missing".into() })?;
    let token = query.verify_token.as_deref().unwrap_or_default().as_bytes();
    let known = config
        .channels
        .iter()
        .filter(|owned| owned.entity.channel_type == product.channel_type() as i32)
        .filter_map(|owned| secrets.channel(&owned.account_id, &owned.entity.channel_id)?.verify_token.as_ref())
        .any(|verify_token| constant_time_eq(verify_token.expose(), token));
    if !known {
        return Err(IngestError::VerificationFailed("hub.verify_token matches no channel".into()));
    }
    Ok(challenge.to_owned())
}

/// Checks the body's signature with the app secret of every channel the delivery touches (a
/// delivery comes from one app; a channel without a secret cannot be verified and is refused).
pub fn verify_delivery<'c>(
    secrets: &Secrets,
    channels: impl IntoIterator<Item = &'c Owned<ChannelConfigured>>,
    signature_header_opt: Option<&str>,
    body: &[u8],
) -> Result<(), IngestError> {
    let mut verified = BTreeMap::new();
    for owned in channels {
        let channel_id = &owned.entity.channel_id;
        if verified.contains_key(channel_id) {
            continue;
        }
        let app_secret = secrets
            .channel(&owned.account_id, channel_id)
            .and_then(|channel| channel.app_secret.as_ref())
            .ok_or_else(|| IngestError::SecretNotConfigured { channel_id: channel_id.clone(), secret: "app_secret" })?;
        signature::verify_meta(app_secret, signature_header_opt, body)?;
        verified.insert(channel_id.clone(), ());
    }
    Ok(())
}

/// The `X-Hub-Signature-256` header must be there before anything else is looked at.
pub fn require_signature_header(signature_header_opt: Option<&str>) -> Result<(), IngestError> {
    match signature_header_opt {
        Some(header) if header.trim().starts_with("sha256=") => Ok(()),
        Some(_) => Err(IngestError::SignatureMissing("X-Hub-Signature-256 must start with `sha256=`".into())),
        None => Err(IngestError::SignatureMissing("no X-Hub-Signature-256 header".into())),
    }
}

pub fn parse_json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, IngestError> {
    serde_json::from_slice(body).map_err(|error| IngestError::MalformedBody(error.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secrets::{ChannelSecrets, Secret};
    use switchboard_proto::events::v1::ChannelConfigured;

    #[test]
    fn c6_handshake_echoes_the_challenge_only_for_a_known_verify_token() {
        let mut config = ConfigSnapshot::default();
        config.channels.insert(Owned {
            account_id: "acct".into(),
            entity: ChannelConfigured {
                channel_id: "fb".into(),
                channel_type: ChannelType::FacebookMessenger as i32,
                ..Default::default()
            },
        });
        let mut secrets = Secrets::default();
        secrets
            .channels
            .insert("fb".into(), ChannelSecrets { verify_token: Some(Secret::new("tok")), ..Default::default() });
        let query = |mode: &str, token: &str| HandshakeQuery {
            mode: Some(mode.into()),
            verify_token: Some(token.into()),
            challenge: Some("1158201444".into()),
        };
        assert_eq!(
            verify_handshake(&config, &secrets, MetaProduct::Messenger, &query("subscribe", "tok")).unwrap(),
            "1158201444"
        );
        assert!(matches!(
            verify_handshake(&config, &secrets, MetaProduct::Messenger, &query("subscribe", "nope")),
            Err(IngestError::VerificationFailed(_))
        ));
        assert!(matches!(
            verify_handshake(&config, &secrets, MetaProduct::WhatsApp, &query("subscribe", "tok")),
            Err(IngestError::VerificationFailed(_))
        ));
        assert!(matches!(
            verify_handshake(&config, &secrets, MetaProduct::Messenger, &query("unsubscribe", "tok")),
            Err(IngestError::InvalidField { field: "hub.mode", .. })
        ));
    }
}
