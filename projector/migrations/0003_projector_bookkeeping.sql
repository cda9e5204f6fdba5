-- Projector bookkeeping for exactly-once, lag reporting and schema switching (issue 5).

-- Events that have no natural key in the read models (conversation closed, ticket stage
-- changed, contact owner changed): recorded here in the same transaction as their effect, so
-- the same event delivered twice (or published twice) is applied once.
CREATE TABLE applied_events (
    event_id text PRIMARY KEY
);

-- How far behind the log the live projector is, per input partition (B6: the API exposes it).
-- Written about once a second by the instance that owns the partition.
CREATE TABLE projector_lag (
    topic       text NOT NULL,
    partition   integer NOT NULL,
    -- Next offset to apply (the stored position).
    next_offset bigint NOT NULL,
    -- Last stable offset of the partition as the broker reported it (read_committed end).
    end_offset  bigint NOT NULL,
    lag         bigint NOT NULL,
    measured_at timestamptz NOT NULL,
    PRIMARY KEY (topic, partition)
);

-- Which schema holds the read models readers should use (docs/contracts.md). Always in
-- `public`, whatever schema these migrations are run for; at most one row; no row = `public`.
CREATE TABLE IF NOT EXISTS public.read_model_control (
    singleton       boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    active_schema   text NOT NULL,
    previous_schema text,
    switched_at     timestamptz NOT NULL
);
