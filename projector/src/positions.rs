//! Positions: which offset of each partition the read models have reached.
//!
//! The stored `next_offset` (written in the same transaction as the rows) is the truth; Kafka's
//! committed offset is only a hint for where to start fetching. Records below the stored
//! position were applied before (a redelivery) and are skipped.
//!
//! Every batch of every partition is checked against the stored position, read under the
//! partition's lock in the transaction that will apply it. Offsets may legitimately jump
//! (transaction markers and aborted records are never delivered under `read_committed`), so the
//! check cannot compare offsets alone; it relies on what the writer knows of the partition's
//! reading in the current epoch ([`Continuity`]):
//!
//! - The consumer delivers, in order and without holes, every record after the point it was
//!   sought to, and the writer writes every batch of the epoch (a failed one again, until it
//!   commits). So while the writer knows the position it last stored (or sought to), a batch
//!   continues from it.
//! - If the stored position is now *behind* that, the database lost committed batches: a crash
//!   with asynchronous commit, a failover to a replica that had not received them, a restore.
//!   The batch is refused and the partition re-read from the stored position; never skipped.
//! - Without that knowledge (a seek that failed, a switch to another schema), a batch is
//!   applied only if it starts at or below the stored position; otherwise the partition is
//!   sought back to it.

/// What the writer knows of a partition's reading within the current epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Continuity {
    /// The batch holds every record after this position, which the writer stored itself or
    /// sought to (`None`: nothing was stored, the reading started where it was told to).
    ContinuesFrom(Option<i64>),
    /// Nothing known: the epoch did not start with a seek to a known position (a seek that
    /// failed), or what was known belongs to another schema, or records of the epoch were
    /// dropped.
    Unknown,
}

/// What to do with a partition's records in a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchCheck {
    /// Apply the records from this index of the partition's slice on (earlier ones were applied).
    ApplyFrom(usize),
    /// The batch does not start at the stored position (a gap): drop the partition's records
    /// and seek to the stored position, or to the beginning if `None`.
    SeekTo(Option<i64>),
    /// The stored position is behind `expected`, which this projector stored or sought to:
    /// committed batches were lost by the database. Drop the records and seek to `stored_opt`.
    StoredPositionWentBack { stored_opt: Option<i64>, expected: i64 },
}

/// Checks one partition's batch offsets (ascending) against the stored position.
pub fn check_batch(stored_next_offset_opt: Option<i64>, continuity: Continuity, batch_offsets: &[i64]) -> BatchCheck {
    let Some(&first) = batch_offsets.first() else { return BatchCheck::ApplyFrom(0) };
    let already_applied = |stored: i64| batch_offsets.iter().take_while(|&&offset| offset < stored).count();
    match continuity {
        // `None < Some(_)`: a position that vanished altogether went back too.
        Continuity::ContinuesFrom(Some(expected)) if stored_next_offset_opt < Some(expected) => {
            BatchCheck::StoredPositionWentBack { stored_opt: stored_next_offset_opt, expected }
        }
        // At the expected position, or further (another instance applied records meanwhile:
        // those below the stored position are skipped, the rest continue from it).
        Continuity::ContinuesFrom(_) => BatchCheck::ApplyFrom(stored_next_offset_opt.map_or(0, already_applied)),
        Continuity::Unknown => match stored_next_offset_opt {
            Some(stored) if first <= stored => BatchCheck::ApplyFrom(already_applied(stored)),
            Some(stored) => BatchCheck::SeekTo(Some(stored)),
            None if first == 0 => BatchCheck::ApplyFrom(0),
            // Nothing applied yet but the consumer did not start at the beginning (e.g. the read
            // models were reset while Kafka kept the group's offsets): start over.
            None => BatchCheck::SeekTo(None),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_at_the_stored_position_is_applied_whole() {
        assert_eq!(check_batch(Some(10), Continuity::Unknown, &[10, 11, 12]), BatchCheck::ApplyFrom(0));
        assert_eq!(check_batch(None, Continuity::Unknown, &[0, 1]), BatchCheck::ApplyFrom(0));
        assert_eq!(check_batch(Some(10), Continuity::ContinuesFrom(Some(10)), &[10, 11]), BatchCheck::ApplyFrom(0));
    }

    #[test]
    fn redelivered_records_below_the_stored_position_are_skipped() {
        assert_eq!(check_batch(Some(12), Continuity::Unknown, &[10, 11, 12, 13]), BatchCheck::ApplyFrom(2));
        // Another instance went further while this one still read from 10.
        assert_eq!(check_batch(Some(20), Continuity::ContinuesFrom(Some(10)), &[10, 11]), BatchCheck::ApplyFrom(2));
        assert_eq!(check_batch(Some(12), Continuity::ContinuesFrom(None), &[10, 11, 12]), BatchCheck::ApplyFrom(2));
    }

    #[test]
    fn a_batch_after_the_stored_position_without_continuity_seeks_back() {
        assert_eq!(check_batch(Some(10), Continuity::Unknown, &[11, 12]), BatchCheck::SeekTo(Some(10)));
        assert_eq!(check_batch(None, Continuity::Unknown, &[5]), BatchCheck::SeekTo(None));
    }

    #[test]
    fn offset_jumps_from_transaction_markers_are_fine_while_the_reading_continues() {
        // Offset 12 was a commit marker: never delivered.
        assert_eq!(check_batch(Some(12), Continuity::ContinuesFrom(Some(12)), &[13, 14]), BatchCheck::ApplyFrom(0));
        // A replay or a seek to the beginning starts wherever the log starts.
        assert_eq!(check_batch(None, Continuity::ContinuesFrom(None), &[700, 701]), BatchCheck::ApplyFrom(0));
    }

    #[test]
    fn a_stored_position_behind_what_was_committed_is_never_skipped() {
        // Issue 13.4: the batch 10..20 was committed asynchronously, then PostgreSQL crashed and
        // rolled it back together with its position.
        assert_eq!(
            check_batch(Some(10), Continuity::ContinuesFrom(Some(20)), &[21, 22]),
            BatchCheck::StoredPositionWentBack { stored_opt: Some(10), expected: 20 }
        );
        // The first commit of the partition was lost: no position at all any more.
        assert_eq!(
            check_batch(None, Continuity::ContinuesFrom(Some(5)), &[5, 6]),
            BatchCheck::StoredPositionWentBack { stored_opt: None, expected: 5 }
        );
    }

    /// A model of one partition: the log (with transaction markers that are never delivered),
    /// the consumer, the database (whose last commits may not be durable yet) and the writer,
    /// driven by `check_batch` the way the projector's writer uses it.
    mod model {
        use super::super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        pub enum Step {
            /// The consumer delivers up to this many records; the writer checks and applies them.
            Batch(usize),
            /// Like `Batch`, but the commit's answer is lost (it committed; the writer saw an
            /// error) and the same batch is retried.
            BatchWithLostAnswer(usize),
            /// PostgreSQL crashes: up to this many of the latest, not yet durable commits vanish.
            Crash(usize),
            /// The latest commits reach the disk.
            Flush,
            /// The partition is assigned afresh. The reader seeks it to the stored position, or,
            /// if it could not read that, the consumer starts at `start` (Kafka's committed
            /// offset is only a hint: it may be ahead of what the database kept) until the
            /// reader's next attempt.
            Assigned { start: i64, seek_to_stored: bool },
            /// The reader tries again to read the stored position of an assignment and seek.
            ReaderRetriesSeekToStored,
            /// The writer's periodic comparison of known and stored positions.
            Audit,
        }

        pub fn step_strategy(log_len: i64) -> impl Strategy<Value = Step> {
            prop_oneof![
                6 => (1usize..8).prop_map(Step::Batch),
                1 => (1usize..8).prop_map(Step::BatchWithLostAnswer),
                2 => (0usize..4).prop_map(Step::Crash),
                2 => Just(Step::Flush),
                1 => ((0..=log_len), any::<bool>()).prop_map(|(start, seek_to_stored)| Step::Assigned { start, seek_to_stored }),
                1 => Just(Step::ReaderRetriesSeekToStored),
                1 => Just(Step::Audit),
            ]
        }

        #[derive(Clone, Default)]
        struct Database {
            stored_opt: Option<i64>,
            applied: Vec<i64>,
        }

        pub struct World {
            /// Offsets of the data records (markers are the offsets missing in between).
            records: Vec<i64>,
            log_end: i64,
            /// Next offset the consumer reads.
            reading_at: i64,
            continuity: Continuity,
            seek_to_stored_pending: bool,
            database: Database,
            /// States before each commit that is not durable yet (oldest first).
            not_durable: Vec<Database>,
            pub lost_commits: usize,
        }

        impl World {
            pub fn new(is_marker: &[bool]) -> World {
                let records = (0..is_marker.len() as i64).filter(|offset| !is_marker[*offset as usize]).collect();
                World {
                    records,
                    log_end: is_marker.len() as i64,
                    reading_at: 0,
                    continuity: Continuity::ContinuesFrom(None),
                    seek_to_stored_pending: false,
                    database: Database::default(),
                    not_durable: Vec::new(),
                    lost_commits: 0,
                }
            }

            fn seek(&mut self, offset_opt: Option<i64>) {
                self.reading_at = offset_opt.unwrap_or(0);
                self.continuity = Continuity::ContinuesFrom(offset_opt);
            }

            fn batch(&mut self, max_records: usize, answer_lost: bool) {
                let offsets: Vec<i64> = self
                    .records
                    .iter()
                    .copied()
                    .filter(|offset| *offset >= self.reading_at)
                    .take(max_records)
                    .collect();
                let Some(&last) = offsets.last() else { return };
                self.reading_at = last + 1;
                // A lost answer: the batch committed, the writer retries it.
                let attempts = if answer_lost { 2 } else { 1 };
                for attempt in 1..=attempts {
                    match check_batch(self.database.stored_opt, self.continuity, &offsets) {
                        BatchCheck::ApplyFrom(index) => {
                            self.not_durable.push(self.database.clone());
                            self.database.applied.extend(&offsets[index..]);
                            if index < offsets.len() {
                                self.database.stored_opt = Some(last + 1);
                            }
                            if attempt == attempts {
                                self.continuity = Continuity::ContinuesFrom(Some(last + 1));
                            }
                        }
                        BatchCheck::SeekTo(offset_opt) => return self.seek(offset_opt),
                        BatchCheck::StoredPositionWentBack { stored_opt, .. } => {
                            self.lost_commits += 1;
                            return self.seek(stored_opt);
                        }
                    }
                }
            }

            fn retry_seek_to_stored(&mut self) {
                if self.seek_to_stored_pending {
                    self.seek_to_stored_pending = false;
                    self.seek(self.database.stored_opt);
                }
            }

            fn audit(&mut self) {
                if let Continuity::ContinuesFrom(Some(expected)) = self.continuity
                    && self.database.stored_opt < Some(expected)
                {
                    self.lost_commits += 1;
                    self.seek(self.database.stored_opt);
                }
            }

            pub fn run(&mut self, step: &Step) {
                match step {
                    Step::Batch(max_records) => self.batch(*max_records, false),
                    Step::BatchWithLostAnswer(max_records) => self.batch(*max_records, true),
                    Step::Crash(commits) => {
                        let keep = self.not_durable.len().saturating_sub(*commits);
                        if keep < self.not_durable.len() {
                            self.database = self.not_durable[keep].clone();
                        }
                        self.not_durable.clear();
                    }
                    Step::Flush => self.not_durable.clear(),
                    Step::Assigned { start, seek_to_stored } => {
                        if *seek_to_stored {
                            self.seek(self.database.stored_opt);
                        } else {
                            self.reading_at = *start;
                            self.continuity = Continuity::Unknown;
                        }
                        self.seek_to_stored_pending = !seek_to_stored;
                    }
                    Step::ReaderRetriesSeekToStored => self.retry_seek_to_stored(),
                    Step::Audit => self.audit(),
                }
            }

            /// Runs until the consumer is at the end and the audit finds nothing; returns what
            /// the database holds, sorted.
            pub fn finish(&mut self) -> Vec<i64> {
                self.retry_seek_to_stored();
                for _ in 0..10_000 {
                    self.audit();
                    if self.reading_at >= self.log_end {
                        break;
                    }
                    self.batch(5, false);
                }
                let mut applied = self.database.applied.clone();
                applied.sort_unstable();
                applied
            }

            pub fn records(&self) -> &[i64] {
                &self.records
            }
        }
    }

    mod properties {
        use proptest::prelude::*;

        use super::model::{World, step_strategy};

        proptest! {
            #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

            /// Whatever crashes, lost answers, reassignments and audits happen, every record ends
            /// up applied exactly once.
            #[test]
            fn every_record_is_applied_exactly_once_whatever_the_database_loses(
                is_marker in proptest::collection::vec(proptest::bool::weighted(0.2), 1..60),
                steps in proptest::collection::vec(step_strategy(60), 0..80),
            ) {
                let mut world = World::new(&is_marker);
                for step in &steps {
                    world.run(step);
                }
                let applied = world.finish();
                prop_assert_eq!(applied.as_slice(), world.records());
            }
        }
    }
}
