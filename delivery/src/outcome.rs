//! What a provider's answer to one send attempt means. Every transport (SMTP, Graph API,
//! custom apps, chat) reports one of these; the retry policy and the records follow from it.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutcome {
    /// The provider accepted the message.
    Sent {
        /// The provider's id of the message (email: the Message-ID we sent).
        provider_message_id: String,
        /// HTTP status or SMTP reply code.
        status_code: u32,
    },
    /// Worth another attempt: 5xx, 429, timeouts, dropped connections, SMTP 4xx.
    Retryable {
        error: String,
        /// 0 when there was no answer (timeout, connection dropped).
        status_code: u32,
        /// The provider's `Retry-After`, when it sent one.
        retry_after: Option<Duration>,
    },
    /// Never worth another attempt: HTTP 4xx (but 429), SMTP 5xx. The provider's own error is
    /// kept in `error`.
    Permanent { error: String, status_code: u32 },
}
