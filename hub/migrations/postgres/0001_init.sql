-- synchub schema, PostgreSQL backend.
--
-- This migration ADOPTS an existing database of system 1 (the desktop app on Supabase): its
-- `sync_metadata` and `sync_log` tables keep their names, columns and rows; the hub only adds
-- columns, indexes, triggers and its own `synchub_` tables. Every statement is idempotent
-- (IF NOT EXISTS / OR REPLACE), so it is also safe on a database that already has some of it.
-- `id` columns of system 1 may be serial or uuid: the hub never relies on their type.

CREATE TABLE IF NOT EXISTS sync_metadata (
    id               BIGSERIAL PRIMARY KEY,
    sync_key         TEXT   NOT NULL UNIQUE,
    version          BIGINT NOT NULL DEFAULT 1,
    data_hash        TEXT,
    last_modified_by TEXT,
    last_modified_at TIMESTAMPTZ,
    updated_at       TIMESTAMPTZ DEFAULT now()
);
ALTER TABLE sync_metadata
    ADD COLUMN IF NOT EXISTS data_hash        TEXT,
    ADD COLUMN IF NOT EXISTS last_modified_by TEXT,
    ADD COLUMN IF NOT EXISTS last_modified_at TIMESTAMPTZ,
    ADD COLUMN IF NOT EXISTS updated_at       TIMESTAMPTZ DEFAULT now();
-- Named like the index of a `UNIQUE` column constraint, so it is skipped when that exists.
CREATE UNIQUE INDEX IF NOT EXISTS sync_metadata_sync_key_key ON sync_metadata (sync_key);

CREATE TABLE IF NOT EXISTS sync_log (
    id            BIGSERIAL PRIMARY KEY,
    discord_id    TEXT,
    sync_type     TEXT,
    status        TEXT,
    items_synced  INTEGER,
    error_message TEXT,
    synced_at     TIMESTAMPTZ DEFAULT now(),
    created_at    TIMESTAMPTZ DEFAULT now()
);
ALTER TABLE sync_log
    ADD COLUMN IF NOT EXISTS discord_id    TEXT,
    ADD COLUMN IF NOT EXISTS sync_type     TEXT,
    ADD COLUMN IF NOT EXISTS status        TEXT,
    ADD COLUMN IF NOT EXISTS items_synced  INTEGER,
    ADD COLUMN IF NOT EXISTS error_message TEXT,
    ADD COLUMN IF NOT EXISTS synced_at     TIMESTAMPTZ DEFAULT now(),
    ADD COLUMN IF NOT EXISTS created_at    TIMESTAMPTZ DEFAULT now(),
    ADD COLUMN IF NOT EXISTS report_id     TEXT,
    ADD COLUMN IF NOT EXISTS client_id     TEXT,
    ADD COLUMN IF NOT EXISTS space         TEXT,
    ADD COLUMN IF NOT EXISTS version       BIGINT,
    ADD COLUMN IF NOT EXISTS bytes         BIGINT,
    ADD COLUMN IF NOT EXISTS duration_ms   BIGINT;
CREATE UNIQUE INDEX IF NOT EXISTS sync_log_report_id_key ON sync_log (report_id);
CREATE INDEX IF NOT EXISTS sync_log_synced_at_idx ON sync_log (synced_at DESC);
CREATE INDEX IF NOT EXISTS sync_log_space_idx ON sync_log (space, synced_at DESC);
CREATE INDEX IF NOT EXISTS sync_log_client_idx ON sync_log (client_id, synced_at DESC);

-- The API lists sync_log rows with an integer id. When an adopted table's id is not an
-- integer (e.g. uuid), the hub numbers rows in a column of its own instead.
DO $$
BEGIN
    IF COALESCE((SELECT data_type FROM information_schema.columns
                  WHERE table_schema = current_schema() AND table_name = 'sync_log'
                    AND column_name = 'id'), 'none') NOT IN ('smallint', 'integer', 'bigint') THEN
        ALTER TABLE sync_log ADD COLUMN IF NOT EXISTS synchub_seq BIGSERIAL;
    END IF;
END
$$;

-- Every version the hub knows: the manifest's hash (its bytes are a blob) and who made it.
CREATE TABLE IF NOT EXISTS synchub_versions (
    space      TEXT        NOT NULL,
    version    BIGINT      NOT NULL,
    data_hash  TEXT        NOT NULL,
    forced     BOOLEAN     NOT NULL DEFAULT false,
    reason     TEXT,
    created_by TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    entries    BIGINT      NOT NULL DEFAULT 0,
    bytes      BIGINT      NOT NULL DEFAULT 0,
    PRIMARY KEY (space, version)
);

-- Bearer tokens, stored as the sha256 of the secret. `spaces`: JSON array, NULL = every space.
CREATE TABLE IF NOT EXISTS synchub_tokens (
    id         BIGSERIAL   PRIMARY KEY,
    name       TEXT        NOT NULL UNIQUE,
    role       TEXT        NOT NULL,
    spaces     TEXT,
    token_hash TEXT        NOT NULL UNIQUE,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    revoked_at TIMESTAMPTZ
);

-- Every hub replica LISTENs on these channels, so a bump by any writer (another replica,
-- system 1, a plain SQL UPDATE) reaches every hub without polling.
CREATE OR REPLACE FUNCTION synchub_notify_head() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('synchub_heads', NEW.sync_key);
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS synchub_notify_head ON sync_metadata;
CREATE TRIGGER synchub_notify_head
    AFTER INSERT OR UPDATE ON sync_metadata
    FOR EACH ROW EXECUTE FUNCTION synchub_notify_head();

CREATE OR REPLACE FUNCTION synchub_notify_tokens() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('synchub_tokens', '');
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS synchub_notify_tokens ON synchub_tokens;
CREATE TRIGGER synchub_notify_tokens
    AFTER INSERT OR UPDATE OR DELETE ON synchub_tokens
    FOR EACH STATEMENT EXECUTE FUNCTION synchub_notify_tokens();
