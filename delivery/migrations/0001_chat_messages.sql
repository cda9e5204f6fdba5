-- Chat replies as the visitor's widget receives them (C5). The delivery service "sends" a chat
-- reply by inserting it here (and NOTIFY delivery_chat_messages, payload = seq); ingest's
-- per-visitor event stream reads it, resuming after the `seq` the widget last saw.
CREATE SCHEMA IF NOT EXISTS delivery;

CREATE TABLE delivery.chat_messages (
    seq             bigserial PRIMARY KEY,
    account_id      text        NOT NULL,
    channel_id      text        NOT NULL,
    visitor_id      text        NOT NULL,
    reply_id        uuid        NOT NULL,
    conversation_id uuid        NOT NULL,
    -- "agent" or "automation", and the name the visitor sees.
    author_kind     text        NOT NULL,
    author_name     text        NOT NULL,
    text            text        NOT NULL,
    -- [{"url", "file_name", "content_type", "size_bytes"}]
    attachments     jsonb       NOT NULL DEFAULT '[]',
    sent_at         timestamptz NOT NULL,
    UNIQUE (account_id, reply_id)
);

CREATE INDEX chat_messages_by_visitor ON delivery.chat_messages (account_id, channel_id, visitor_id, seq);
