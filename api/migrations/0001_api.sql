-- Tables owned by the API (not read models: never rebuilt by replay), in their own schema.
-- Applied by sqlx's migrator with search_path = api (see `switchboard_api::migrate`). Every
-- statement is idempotent: databases created before the migrator already have these tables.
CREATE SCHEMA IF NOT EXISTS api;

-- Idempotent commands: one row per (account, client request id). `position` is set once the
-- command's records are published; a retry with the same id and the same request gets it back.
CREATE TABLE IF NOT EXISTS api.command_requests (
    account_id     text NOT NULL,
    request_id     text NOT NULL,
    command        text NOT NULL,
    -- SHA-256 of the encoded request: the same id with a different request is refused.
    request_digest text NOT NULL,
    position       text,
    claimed_at     timestamptz NOT NULL DEFAULT now(),
    completed_at   timestamptz,
    PRIMARY KEY (account_id, request_id)
);

-- Monotonic versions of config entities whose current state the API does not keep in memory
-- (ticket settings): each change gets the next version.
CREATE TABLE IF NOT EXISTS api.config_versions (
    config_key text PRIMARY KEY,
    version    bigint NOT NULL
);
