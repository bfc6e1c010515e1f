-- synchub schema, SQLite backend (the embedded default).
--
-- `sync_metadata` and `sync_log` keep the names and columns of system 1 (the desktop app's
-- PostgreSQL tables) so that both backends read the same way; the hub's own columns and tables
-- are added beside them. Timestamps are RFC 3339 TEXT in UTC ("2026-11-24T10:00:00.123Z").

CREATE TABLE IF NOT EXISTS sync_metadata (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    sync_key         TEXT    NOT NULL UNIQUE,
    version          INTEGER NOT NULL DEFAULT 1,
    data_hash        TEXT,
    last_modified_by TEXT,
    last_modified_at TEXT,
    updated_at       TEXT    DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

CREATE TABLE IF NOT EXISTS sync_log (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    discord_id    TEXT,
    sync_type     TEXT,
    status        TEXT,
    items_synced  INTEGER,
    error_message TEXT,
    synced_at     TEXT DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    created_at    TEXT DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    -- added by the hub
    report_id     TEXT UNIQUE,
    client_id     TEXT,
    space         TEXT,
    version       INTEGER,
    bytes         INTEGER,
    duration_ms   INTEGER
);
CREATE INDEX IF NOT EXISTS sync_log_synced_at_idx ON sync_log (synced_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS sync_log_space_idx ON sync_log (space, synced_at DESC);
CREATE INDEX IF NOT EXISTS sync_log_client_idx ON sync_log (client_id, synced_at DESC);

-- Every version the hub knows: the manifest's hash (its bytes are a blob) and who made it.
CREATE TABLE IF NOT EXISTS synchub_versions (
    space      TEXT    NOT NULL,
    version    INTEGER NOT NULL,
    data_hash  TEXT    NOT NULL,
    forced     INTEGER NOT NULL DEFAULT 0,
    reason     TEXT,
    created_by TEXT,
    created_at TEXT    NOT NULL,
    entries    INTEGER NOT NULL DEFAULT 0,
    bytes      INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (space, version)
);

-- Bearer tokens, stored as the sha256 of the secret. `spaces`: JSON array, NULL = every space.
CREATE TABLE IF NOT EXISTS synchub_tokens (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    name       TEXT NOT NULL UNIQUE,
    role       TEXT NOT NULL,
    spaces     TEXT,
    token_hash TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL,
    revoked_at TEXT
);

-- Change counters the poller reads in its one query, so that it notices token changes made
-- by another process (`synchub token revoke` on the same file).
CREATE TABLE IF NOT EXISTS synchub_counters (
    name  TEXT    PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO synchub_counters (name, value) VALUES ('tokens', 0);

CREATE TRIGGER IF NOT EXISTS synchub_tokens_inserted AFTER INSERT ON synchub_tokens
BEGIN
    UPDATE synchub_counters SET value = value + 1 WHERE name = 'tokens';
END;
CREATE TRIGGER IF NOT EXISTS synchub_tokens_updated AFTER UPDATE ON synchub_tokens
BEGIN
    UPDATE synchub_counters SET value = value + 1 WHERE name = 'tokens';
END;
CREATE TRIGGER IF NOT EXISTS synchub_tokens_deleted AFTER DELETE ON synchub_tokens
BEGIN
    UPDATE synchub_counters SET value = value + 1 WHERE name = 'tokens';
END;
