//! Positions: which offset of each partition the read models have reached.
//!
//! The stored `next_offset` (written in the same transaction as the rows) is the truth; Kafka's
//! committed offset is only a hint for where to start fetching. Records below the stored
//! position were applied before (a redelivery) and are skipped. When a partition is first seen
//! after an assignment, a batch that starts *above* the stored position would leave a gap: it is
//! refused and the consumer seeks back to the stored position. Within one assignment records
//! arrive in order, and offsets may legitimately jump (transaction markers, aborted records are
//! never delivered under `read_committed`), so only the first batch is checked for a gap.

/// What to do with a partition's records in a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchCheck {
    /// Apply the records from this index of the partition's slice on (earlier ones were applied).
    ApplyFrom(usize),
    /// Drop the partition's records and seek: to this offset, or to the beginning if `None`.
    SeekTo(Option<i64>),
}

/// Checks one partition's batch offsets (ascending) against the stored position.
/// `positioned`: whether this partition was already checked since it was assigned.
pub fn check_batch(stored_next_offset_opt: Option<i64>, positioned: bool, batch_offsets: &[i64]) -> BatchCheck {
    let Some(&first) = batch_offsets.first() else { return BatchCheck::ApplyFrom(0) };
    let already_applied = |stored: i64| batch_offsets.iter().take_while(|&&offset| offset < stored).count();
    match (stored_next_offset_opt, positioned) {
        (Some(stored), true) => BatchCheck::ApplyFrom(already_applied(stored)),
        (None, true) => BatchCheck::ApplyFrom(0),
        (Some(stored), false) if first <= stored => BatchCheck::ApplyFrom(already_applied(stored)),
        (Some(stored), false) => BatchCheck::SeekTo(Some(stored)),
        (None, false) if first == 0 => BatchCheck::ApplyFrom(0),
        // Nothing applied yet but the consumer did not start at the beginning (e.g. the read
        // models were reset while Kafka kept the group's offsets): start over.
        (None, false) => BatchCheck::SeekTo(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_at_the_stored_position_is_applied_whole() {
        assert_eq!(check_batch(Some(10), false, &[10, 11, 12]), BatchCheck::ApplyFrom(0));
        assert_eq!(check_batch(None, false, &[0, 1]), BatchCheck::ApplyFrom(0));
    }

    #[test]
    fn redelivered_records_below_the_stored_position_are_skipped() {
        assert_eq!(check_batch(Some(12), false, &[10, 11, 12, 13]), BatchCheck::ApplyFrom(2));
        assert_eq!(check_batch(Some(20), true, &[10, 11]), BatchCheck::ApplyFrom(2));
    }

    #[test]
    fn a_first_batch_after_the_stored_position_seeks_back() {
        assert_eq!(check_batch(Some(10), false, &[11, 12]), BatchCheck::SeekTo(Some(10)));
        assert_eq!(check_batch(None, false, &[5]), BatchCheck::SeekTo(None));
    }

    #[test]
    fn once_positioned_offset_jumps_from_transaction_markers_are_fine() {
        // Offset 12 was a commit marker: never delivered.
        assert_eq!(check_batch(Some(12), true, &[13, 14]), BatchCheck::ApplyFrom(0));
    }
}
