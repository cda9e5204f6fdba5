//! The retry policy (O5): what follows an attempt's outcome. Pure: the clock and the randomness
//! (the jitter) are arguments, so every decision is reproducible in a unit test.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::outcome::SendOutcome;

/// Exponential backoff with full jitter, capped, and a limit after which a message is failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The backoff ceiling of the first retry; it doubles with every attempt.
    pub base_delay: Duration,
    /// The backoff ceiling never exceeds this.
    pub max_delay: Duration,
    /// After this many attempts the message is failed with the last reason.
    pub max_attempts: u32,
    /// No attempt is scheduled later than this after the message was queued.
    pub give_up_after: Duration,
}

impl Default for RetryPolicy {
    /// 10 attempts within 24 hours; the backoff ceilings are 1 s, 2 s, 4 s, ... up to 10 min.
    fn default() -> Self {
        RetryPolicy {
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(600),
            max_attempts: 10,
            give_up_after: Duration::from_secs(24 * 3600),
        }
    }
}

/// What becomes of the message after an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NextStep {
    /// The provider accepted it: done.
    Sent,
    /// Try again at this time (the row's `next_attempt_at`).
    RetryAt(DateTime<Utc>),
    /// Never again: a permanent error, or the limit was reached (`gave_up`).
    Failed { gave_up: bool },
}

impl RetryPolicy {
    /// The backoff before attempt `attempt + 1`: full jitter, a uniformly random time up to
    /// the exponential ceiling (`jitter` in `[0, 1)`), but never less than the provider's
    /// `Retry-After`.
    pub fn backoff(&self, attempt: u32, jitter: f64, retry_after: Option<Duration>) -> Duration {
        let exponent = attempt.saturating_sub(1).min(30);
        let ceiling = self.base_delay.saturating_mul(1u32 << exponent).min(self.max_delay);
        let jittered = ceiling.mul_f64(jitter.clamp(0.0, 1.0));
        retry_after.map_or(jittered, |retry_after| retry_after.max(jittered))
    }

    /// The step after attempt number `attempt` (1-based) of a message queued at `queued_at`
    /// ended with `outcome` at `now`.
    pub fn next_step(
        &self,
        outcome: &SendOutcome,
        attempt: u32,
        queued_at: DateTime<Utc>,
        now: DateTime<Utc>,
        jitter: f64,
    ) -> NextStep {
        match outcome {
            SendOutcome::Sent { .. } => NextStep::Sent,
            SendOutcome::Permanent { .. } => NextStep::Failed { gave_up: false },
            SendOutcome::Retryable { retry_after, .. } => {
                if attempt >= self.max_attempts {
                    return NextStep::Failed { gave_up: true };
                }
                let at = now + self.backoff(attempt, jitter, *retry_after);
                let deadline = queued_at + self.give_up_after;
                if at > deadline { NextStep::Failed { gave_up: true } } else { NextStep::RetryAt(at) }
            }
        }
    }
}

/// An HTTP `Retry-After` value: delay seconds or an HTTP date (relative to `now`; a date in
/// the past means "now"). `None` when it is neither.
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at: DateTime<Utc> = httpdate::parse_http_date(value).ok()?.into();
    Some((at - now).to_std().unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + seconds, 0).unwrap()
    }

    fn retryable(retry_after: Option<Duration>) -> SendOutcome {
        SendOutcome::Retryable { error: "HTTP 503".into(), status_code: 503, retry_after }
    }

    #[test]
    fn o5_backoff_is_exponential_with_full_jitter_and_capped() {
        let policy = RetryPolicy::default();
        assert_eq!(policy.backoff(1, 0.999_999, None).as_secs(), 0);
        assert_eq!(policy.backoff(1, 0.5, None), Duration::from_millis(500));
        assert_eq!(policy.backoff(3, 0.5, None), Duration::from_secs(2));
        assert_eq!(policy.backoff(4, 0.0, None), Duration::ZERO);
        assert_eq!(policy.backoff(4, 1.0, None), Duration::from_secs(8));
        // Capped at max_delay however many attempts.
        assert_eq!(policy.backoff(40, 1.0, None), Duration::from_secs(600));
    }

    #[test]
    fn o5_retry_after_is_a_lower_bound() {
        let policy = RetryPolicy::default();
        assert_eq!(policy.backoff(1, 0.5, Some(Duration::from_secs(7))), Duration::from_secs(7));
        assert_eq!(policy.backoff(8, 1.0, Some(Duration::from_secs(7))), Duration::from_secs(128));
        assert_eq!(
            policy.next_step(&retryable(Some(Duration::from_secs(30))), 1, at(0), at(5), 0.1),
            NextStep::RetryAt(at(35))
        );
    }

    #[test]
    fn o5_sent_and_permanent_outcomes_end_the_message() {
        let policy = RetryPolicy::default();
        let sent = SendOutcome::Sent { provider_message_id: "m".into(), status_code: 200 };
        assert_eq!(policy.next_step(&sent, 1, at(0), at(0), 0.5), NextStep::Sent);
        let permanent = SendOutcome::Permanent { error: "(#100) Invalid parameter".into(), status_code: 400 };
        assert_eq!(policy.next_step(&permanent, 1, at(0), at(0), 0.5), NextStep::Failed { gave_up: false });
    }

    #[test]
    fn o5_gives_up_after_the_attempt_limit_or_the_time_limit() {
        let policy = RetryPolicy::default();
        assert_eq!(policy.next_step(&retryable(None), 9, at(0), at(60), 0.5), NextStep::RetryAt(at(60 + 128)));
        assert_eq!(policy.next_step(&retryable(None), 10, at(0), at(60), 0.5), NextStep::Failed { gave_up: true });
        // A Retry-After beyond the 24-hour limit is not waited for.
        let late = retryable(Some(Duration::from_secs(3600)));
        assert_eq!(policy.next_step(&late, 2, at(0), at(23 * 3600 + 1), 0.5), NextStep::Failed { gave_up: true });
    }

    #[test]
    fn o5_retry_after_parses_seconds_and_http_dates() {
        let now = DateTime::parse_from_rfc3339("2015-10-21T07:28:00Z").unwrap().with_timezone(&Utc);
        assert_eq!(parse_retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
