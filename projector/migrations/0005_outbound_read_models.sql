-- Outbound (O1-O6, issue 15): replies, notes and automated messages, and what became of them.
-- Built from outbound.v1 (queued replies, notes), delivery.v1 (attempts) and the provider
-- statuses the router forwards to conversations.v1. Rows written before are the customers'.

ALTER TABLE messages
    -- "inbound" (the customer's), "outbound" (a reply or automated message) or "note".
    ADD COLUMN direction           text NOT NULL DEFAULT 'inbound',
    -- "customer", "agent" or "automation".
    ADD COLUMN author_kind         text NOT NULL DEFAULT 'customer',
    ADD COLUMN author_agent_id     text NOT NULL DEFAULT '',
    ADD COLUMN author_name         text NOT NULL DEFAULT '',
    ADD COLUMN automation          text NOT NULL DEFAULT '',
    -- Outbound only: the channel-scoped identity it is sent to (Messenger watermarks match on it).
    ADD COLUMN recipient           text NOT NULL DEFAULT '',
    -- Outbound only: queued, sent, delivered, read, failed ('' for inbound messages and notes).
    -- A function of the reply's message_delivery_steps (projector/src/outbound.rs).
    ADD COLUMN delivery_state      text NOT NULL DEFAULT '',
    ADD COLUMN failure_reason      text NOT NULL DEFAULT '',
    ADD COLUMN will_retry          boolean NOT NULL DEFAULT false;
CREATE INDEX messages_by_recipient ON messages (account_id, channel_id, recipient) WHERE direction = 'outbound';

ALTER TABLE conversations
    -- Agent replies only (not notes, not automated messages), at the time the reply was queued.
    ADD COLUMN first_response_at   timestamptz,
    ADD COLUMN last_agent_reply_at timestamptz;

-- Every step of an outbound message (replies and owner notifications): queued, each attempt's
-- outcome, each provider status. Keyed by what the step is, so applying an event twice, or a
-- status reported twice, adds nothing; the earliest time of a repeated status is kept.
CREATE TABLE message_delivery_steps (
    message_id          uuid NOT NULL,
    -- "queued", "attempt:<n>", "status:<word>".
    step_key            text NOT NULL,
    account_id          text NOT NULL,
    state               text NOT NULL,
    attempt             integer NOT NULL,
    provider_message_id text NOT NULL,
    error               text NOT NULL,
    will_retry          boolean NOT NULL,
    at                  timestamptz NOT NULL,
    -- The event that recorded it (the earliest, for a repeated status).
    event_id            text NOT NULL,
    PRIMARY KEY (message_id, step_key)
);

-- The provider's ids of our sends (from SENT attempts): how a status finds its reply.
CREATE TABLE outbound_provider_ids (
    account_id          text NOT NULL,
    channel_id          text NOT NULL,
    provider_message_id text NOT NULL,
    message_id          uuid NOT NULL,
    -- When the attempt that got this id sent (Messenger watermarks compare with it).
    sent_at             timestamptz NOT NULL,
    PRIMARY KEY (account_id, channel_id, provider_message_id)
);
CREATE INDEX outbound_provider_ids_by_message ON outbound_provider_ids (message_id);

-- Every provider status, kept: one that arrives before its reply's SENT record (or, for a
-- watermark, before the reply itself) is applied when the reply becomes known.
CREATE TABLE delivery_statuses (
    event_id            text PRIMARY KEY,
    account_id          text NOT NULL,
    channel_id          text NOT NULL,
    -- The provider's message id, or `watermark:<millis>` (Messenger: every message to the
    -- recipient sent at or before it).
    provider_message_id text NOT NULL,
    recipient           text NOT NULL,
    watermark_at        timestamptz,
    -- sent, delivered, read, failed, echo.
    status              text NOT NULL,
    error               text NOT NULL,
    at                  timestamptz NOT NULL
);
CREATE INDEX delivery_statuses_by_id ON delivery_statuses (account_id, channel_id, provider_message_id);
CREATE INDEX delivery_statuses_by_recipient ON delivery_statuses (account_id, channel_id, recipient)
    WHERE watermark_at IS NOT NULL;

-- R4: emails to contact owners about a conversation. Not conversation messages; kept for the
-- audit with their delivery state (their steps are in message_delivery_steps).
CREATE TABLE owner_notifications (
    notification_id     uuid PRIMARY KEY,
    account_id          text NOT NULL,
    conversation_id     uuid,
    inbox_id            text NOT NULL,
    channel_id          text NOT NULL,
    recipient           text NOT NULL,
    subject             text NOT NULL,
    body                text NOT NULL,
    queued_at           timestamptz NOT NULL,
    source_event_id     text NOT NULL,
    delivery_state      text NOT NULL DEFAULT 'queued',
    failure_reason      text NOT NULL DEFAULT '',
    will_retry          boolean NOT NULL DEFAULT false
);
CREATE INDEX owner_notifications_by_conversation ON owner_notifications (conversation_id);
