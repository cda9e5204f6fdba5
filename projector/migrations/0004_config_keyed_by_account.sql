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

-- Agents' workload and contacts' channel identities name the account as well: two accounts'
-- agent `ana` have two workloads, and one sender on two accounts' channels `mail` is two
-- identities. Rows written before get the account of the agent or contact they belong to.
ALTER TABLE agent_workload ADD COLUMN account_id text NOT NULL DEFAULT '';
UPDATE agent_workload w SET account_id = a.account_id FROM agents a WHERE a.agent_id = w.agent_id;
ALTER TABLE agent_workload ALTER COLUMN account_id DROP DEFAULT;
ALTER TABLE agent_workload DROP CONSTRAINT agent_workload_pkey,
    ADD PRIMARY KEY (account_id, agent_id, channel_type);

ALTER TABLE contact_identities ADD COLUMN account_id text NOT NULL DEFAULT '';
UPDATE contact_identities i SET account_id = c.account_id FROM contacts c WHERE c.contact_id = i.contact_id;
ALTER TABLE contact_identities ALTER COLUMN account_id DROP DEFAULT;
ALTER TABLE contact_identities DROP CONSTRAINT contact_identities_pkey,
    ADD PRIMARY KEY (account_id, channel_id, external_id);
