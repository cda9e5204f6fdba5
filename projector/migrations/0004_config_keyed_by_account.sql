-- M1: configuration rows are addressed by (account, id), as the config topic's keys are: two
-- accounts may both have an inbox `support`, a channel `web` or an agent `ana`, and an upsert
-- of one never moves or overwrites the other's row. Existing rows keep their account_id; only
-- the keys change, so no data moves.
ALTER TABLE inboxes DROP CONSTRAINT inboxes_pkey, ADD PRIMARY KEY (account_id, inbox_id);
DROP INDEX inboxes_by_account;

ALTER TABLE channels DROP CONSTRAINT channels_pkey, ADD PRIMARY KEY (account_id, channel_id);
DROP INDEX channels_by_inbox;
CREATE INDEX channels_by_inbox ON channels (account_id, inbox_id, channel_id);

ALTER TABLE agents DROP CONSTRAINT agents_pkey, ADD PRIMARY KEY (account_id, agent_id);
DROP INDEX agents_by_account;
