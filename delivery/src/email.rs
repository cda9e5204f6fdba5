//! Team email (C1, C2, C12) and owner notifications (R4) over SMTP.
//!
//! Skeleton of the interface the delivery loop calls; the MIME building and the lettre
//! transport are being built (issue 15).

use std::time::Duration;

use switchboard_proto::events::v1::OutboundMessageQueued;

use crate::outcome::SendOutcome;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpTls {
    /// Plain SMTP (a relay on loopback, Mailpit in the tests).
    None,
    /// Upgrade with STARTTLS (required: a relay that does not offer it is an error).
    StartTls,
    /// Implicit TLS (SMTPS, usually port 465).
    Tls,
}

#[derive(Debug, Clone)]
pub struct SmtpSettings {
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
    /// AUTH credentials, from the secrets file.
    pub username: Option<String>,
    pub password: Option<String>,
    pub timeout: Duration,
}

/// The configured SMTP relay.
pub struct SmtpRelay {
    settings: SmtpSettings,
}

impl SmtpRelay {
    pub fn new(settings: SmtpSettings) -> anyhow::Result<Self> {
        Ok(SmtpRelay { settings })
    }

    /// Sends `message` (its `email` part must be set) and reports what the relay answered.
    pub async fn send(&self, message: &OutboundMessageQueued) -> SendOutcome {
        let _ = (&self.settings, message);
        SendOutcome::Permanent { error: "the SMTP transport is being built".into(), status_code: 0 }
    }
}
