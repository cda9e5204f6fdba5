-- Read models built from the conversations topic. Every table is derived: it can be dropped
-- and rebuilt from the log. Ids of the log are kept as they are (uuid where they are UUIDs).

CREATE TABLE conversations (
    conversation_id     uuid PRIMARY KEY,
    account_id          text NOT NULL,
    inbox_id            text NOT NULL,
    channel_id          text NOT NULL,
    channel_type        text NOT NULL,
    thread_key          text NOT NULL,
    status              text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'closed')),
    assignee_id         text,
    contact_external_id text NOT NULL,
    contact_name        text NOT NULL,
    message_count       integer NOT NULL DEFAULT 0,
    started_at          timestamptz NOT NULL,
    last_message_at     timestamptz NOT NULL
);
-- ListConversations: by inbox (optionally by assignee), newest first, keyset-paginated.
CREATE INDEX conversations_by_inbox ON conversations (inbox_id, started_at DESC, conversation_id DESC);
CREATE INDEX conversations_by_inbox_assignee ON conversations (inbox_id, assignee_id, started_at DESC, conversation_id DESC);

CREATE TABLE messages (
    message_id          uuid PRIMARY KEY,
    conversation_id     uuid NOT NULL,
    account_id          text NOT NULL,
    channel_id          text NOT NULL,
    provider_message_id text NOT NULL,
    sender_external_id  text NOT NULL,
    sender_name         text NOT NULL,
    body                text NOT NULL,
    sent_at             timestamptz NOT NULL,
    recorded_at         timestamptz NOT NULL,
    source_event_id     text NOT NULL,
    trace_id            text NOT NULL
);
CREATE INDEX messages_by_conversation ON messages (conversation_id, sent_at, message_id);

-- Every routing decision with the router's explanation (B2).
CREATE TABLE assignments (
    event_id           text PRIMARY KEY,
    conversation_id    uuid NOT NULL,
    assignee_id        text,
    outcome            text NOT NULL,
    channel_id         text NOT NULL,
    rule_version       bigint NOT NULL,
    strategy           text NOT NULL,
    eligible_agent_ids text[] NOT NULL,
    skipped            jsonb NOT NULL,
    decided_at         timestamptz NOT NULL
);
CREATE INDEX assignments_by_conversation ON assignments (conversation_id, decided_at);

-- Exactly-once: the next offset to apply per projection, topic and partition, written in the
-- same transaction as the rows the records produced.
CREATE TABLE projector_positions (
    projection  text NOT NULL,
    topic       text NOT NULL,
    partition   integer NOT NULL,
    next_offset bigint NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, topic, partition)
);

-- Records the projector could not apply (undecodable, unknown payload), kept with the reason
-- instead of stopping the projection; the position moves past them.
CREATE TABLE projection_rejects (
    topic       text NOT NULL,
    partition   integer NOT NULL,
    "offset"    bigint NOT NULL,
    reason      text NOT NULL,
    payload     bytea,
    rejected_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition, "offset")
);
