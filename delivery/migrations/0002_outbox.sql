-- The delivery service's outbox (O5). One row per outbound message, keyed by (account, reply):
-- intake inserts it exactly once, in the transaction that stores the consumer positions; the
-- attempt loop moves it queued -> sending -> sent | retry | failed (docs/delivery.md).
CREATE TABLE delivery.outbox (
    account_id       text        NOT NULL,
    reply_id         text        NOT NULL,
    -- The outbound.v1 partition it was read from: the instance owning that partition sends it.
    source_partition integer     NOT NULL,
    source_offset    bigint      NOT NULL,
    channel_type     text        NOT NULL,
    -- The OutboundMessageQueued envelope as consumed (protobuf).
    envelope         bytea       NOT NULL,
    -- W3C trace context of the record it came in (empty: none).
    traceparent      text        NOT NULL DEFAULT '',
    tracestate       text        NOT NULL DEFAULT '',
    -- queued | sending | retry | sent | failed
    state            text        NOT NULL DEFAULT 'queued',
    attempts         integer     NOT NULL DEFAULT 0,
    queued_at        timestamptz NOT NULL,
    next_attempt_at  timestamptz NOT NULL,
    last_error       text        NOT NULL DEFAULT '',
    provider_message_id text     NOT NULL DEFAULT '',
    PRIMARY KEY (account_id, reply_id)
);

CREATE INDEX outbox_due ON delivery.outbox (source_partition, next_attempt_at) WHERE state IN ('queued', 'retry');
CREATE INDEX outbox_sending ON delivery.outbox (source_partition) WHERE state = 'sending';

-- Every attempt, recorded (outcome NULL) and committed before the send; its outcome after.
-- `published` turns true once its DeliveryAttemptRecorded was acknowledged on delivery.v1.
CREATE TABLE delivery.attempts (
    account_id          text        NOT NULL,
    reply_id            text        NOT NULL,
    attempt             integer     NOT NULL,
    source_partition    integer     NOT NULL,
    started_at          timestamptz NOT NULL,
    -- The attempt resent a message whose previous send had an unknown outcome (a crash).
    resent_after_crash  boolean     NOT NULL DEFAULT false,
    -- NULL while sending; then sent | retry | failed.
    outcome             text,
    finished_at         timestamptz,
    status_code         integer     NOT NULL DEFAULT 0,
    error               text        NOT NULL DEFAULT '',
    provider_message_id text        NOT NULL DEFAULT '',
    next_attempt_at     timestamptz,
    published           boolean     NOT NULL DEFAULT false,
    PRIMARY KEY (account_id, reply_id, attempt)
);

CREATE INDEX attempts_unpublished ON delivery.attempts (source_partition) WHERE outcome IS NOT NULL AND NOT published;

-- Where intake has read outbound.v1 to, stored with the rows it inserted.
CREATE TABLE delivery.consumer_positions (
    topic       text    NOT NULL,
    partition   integer NOT NULL,
    next_offset bigint  NOT NULL,
    PRIMARY KEY (topic, partition)
);
