-- Read models for issues 5 and 6: configuration (inboxes, channels, agents), contacts,
-- tickets, workload, routing audit and a change feed for the API's Watch stream.
-- Every table is derived from the log (conversations.v1 and config.v1) and can be rebuilt.
-- Tables are created unqualified so the same migrations build a fresh schema for replay (B4).

CREATE TABLE inboxes (
    inbox_id        text PRIMARY KEY,
    account_id      text NOT NULL,
    name            text NOT NULL,
    -- 'conversations' or 'help_desk' (I5)
    kind            text NOT NULL DEFAULT 'conversations',
    -- 'everyone' or 'specific_users_and_teams' (I2)
    access_mode     text NOT NULL DEFAULT 'everyone',
    access_user_ids text[] NOT NULL DEFAULT '{}',
    access_team_ids text[] NOT NULL DEFAULT '{}',
    updated_at      timestamptz NOT NULL
);
CREATE INDEX inboxes_by_account ON inboxes (account_id, inbox_id);

CREATE TABLE channels (
    channel_id      text PRIMARY KEY,
    account_id      text NOT NULL,
    inbox_id        text NOT NULL,
    channel_type    text NOT NULL,
    name            text NOT NULL,
    enabled         boolean NOT NULL,
    -- Type-specific settings (email identity, chat widget, Messenger consent...), as JSON of
    -- the ChannelConfigured sub-message. Never contains secrets.
    settings        jsonb NOT NULL DEFAULT '{}',
    routing_rules   jsonb,
    ticket_settings jsonb,
    updated_at      timestamptz NOT NULL
);
CREATE INDEX channels_by_inbox ON channels (inbox_id, channel_id);

CREATE TABLE agents (
    agent_id                  text PRIMARY KEY,
    account_id                text NOT NULL,
    name                      text NOT NULL,
    email                     text NOT NULL,
    -- 'agent', 'admin' or 'super_admin' (I3)
    role                      text NOT NULL DEFAULT 'agent',
    paid_seat                 boolean NOT NULL,
    available                 boolean NOT NULL,
    team_ids                  text[] NOT NULL DEFAULT '{}',
    skills                    text[] NOT NULL DEFAULT '{}',
    max_open_conversations    integer NOT NULL DEFAULT 0,
    -- {"chat": 5, "email": 10, ...} (R8)
    capacity_per_channel_type jsonb NOT NULL DEFAULT '{}',
    updated_at                timestamptz NOT NULL
);
CREATE INDEX agents_by_account ON agents (account_id, agent_id);

-- Open conversations per agent and channel type (R8 bookkeeping as the log says it).
CREATE TABLE agent_workload (
    agent_id     text NOT NULL,
    channel_type text NOT NULL,
    open_count   integer NOT NULL DEFAULT 0,
    PRIMARY KEY (agent_id, channel_type)
);

CREATE TABLE contacts (
    contact_id     uuid PRIMARY KEY,
    account_id     text NOT NULL,
    display_name   text NOT NULL,
    email          text NOT NULL DEFAULT '',
    owner_agent_id text,
    created_at     timestamptz NOT NULL
);
CREATE INDEX contacts_by_account ON contacts (account_id, created_at DESC, contact_id DESC);

-- One row per channel-scoped identity of a contact (email address, PSID, phone, visitor id).
CREATE TABLE contact_identities (
    channel_id  text NOT NULL,
    external_id text NOT NULL,
    contact_id  uuid NOT NULL,
    PRIMARY KEY (channel_id, external_id)
);
CREATE INDEX contact_identities_by_contact ON contact_identities (contact_id);

ALTER TABLE conversations
    ADD COLUMN contact_id           uuid,
    ADD COLUMN subject              text NOT NULL DEFAULT '',
    ADD COLUMN updated_at           timestamptz,
    ADD COLUMN closed_at            timestamptz,
    ADD COLUMN ticket_id            uuid,
    -- C6/C8: when replying stops being allowed (24 h after the customer's last message).
    ADD COLUMN reply_window_ends_at timestamptz;
UPDATE conversations SET updated_at = last_message_at WHERE updated_at IS NULL;
ALTER TABLE conversations ALTER COLUMN updated_at SET NOT NULL;
CREATE INDEX conversations_by_contact ON conversations (contact_id, started_at DESC);
CREATE INDEX conversations_by_inbox_updated ON conversations (inbox_id, updated_at DESC, conversation_id DESC);

ALTER TABLE messages
    ADD COLUMN contact_id    uuid,
    ADD COLUMN kind          text NOT NULL DEFAULT 'text',
    ADD COLUMN subject       text NOT NULL DEFAULT '',
    -- Structured content shown in the inbox view: attachments, visible form fields, call, location.
    ADD COLUMN content       jsonb NOT NULL DEFAULT '{}',
    -- C7: hidden form fields. Kept for the contact timeline, never returned by inbox queries.
    ADD COLUMN hidden_fields jsonb NOT NULL DEFAULT '[]';
CREATE INDEX messages_by_contact ON messages (contact_id, sent_at);

CREATE TABLE tickets (
    ticket_id       uuid PRIMARY KEY,
    account_id      text NOT NULL,
    conversation_id uuid NOT NULL,
    contact_id      uuid,
    inbox_id        text NOT NULL,
    channel_id      text NOT NULL,
    pipeline        text NOT NULL,
    stage           text NOT NULL,
    owner_agent_id  text,
    owner_source    text NOT NULL,
    name            text NOT NULL DEFAULT '',
    description     text NOT NULL DEFAULT '',
    status          text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'closed')),
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL
);
CREATE INDEX tickets_by_pipeline ON tickets (account_id, pipeline, stage, created_at DESC);
CREATE INDEX tickets_by_owner ON tickets (owner_agent_id, created_at DESC);
CREATE INDEX tickets_by_conversation ON tickets (conversation_id);

-- Why a message never reached the inbox or a conversation stayed unassigned (B2).
CREATE TABLE routing_audit (
    event_id        text PRIMARY KEY,
    account_id      text NOT NULL,
    -- 'withheld', 'left_unassigned', 'ticket_not_created', 'command_rejected', 'owner_notified'
    kind            text NOT NULL,
    reason          text NOT NULL,
    channel_id      text NOT NULL DEFAULT '',
    inbox_id        text NOT NULL DEFAULT '',
    conversation_id uuid,
    message_id      uuid,
    detail          jsonb NOT NULL DEFAULT '{}',
    at              timestamptz NOT NULL
);
CREATE INDEX routing_audit_by_account ON routing_audit (account_id, at DESC);
CREATE INDEX routing_audit_by_message ON routing_audit (message_id);

-- Change feed for the API's Watch stream: one row per conversation change, written in the
-- same transaction as the change; `change_id` is the resume position. The projector also
-- NOTIFYs channel 'conversation_changes' so watchers wake without polling.
CREATE TABLE conversation_changes (
    change_id       bigserial PRIMARY KEY,
    account_id      text NOT NULL,
    inbox_id        text NOT NULL,
    conversation_id uuid NOT NULL,
    -- 'started', 'message', 'assigned', 'unassigned', 'closed', 'ticket'
    kind            text NOT NULL,
    event_id        text NOT NULL,
    at              timestamptz NOT NULL
);
CREATE INDEX conversation_changes_by_inbox ON conversation_changes (inbox_id, change_id);
