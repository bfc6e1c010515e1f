-- Which spaces reference a blob, so a token reads only blobs of spaces it may read: a row per
-- (blob, space) for every entry of a version's manifest, and one for the manifest itself,
-- written after its entries (so its row says the whole manifest is indexed).
CREATE TABLE synchub_blob_spaces (
    sha256 TEXT NOT NULL,
    space  TEXT NOT NULL,
    PRIMARY KEY (sha256, space)
);

-- Blobs a token uploaded itself: readable by it before any version names them (a publish in
-- progress, or a resumed one).
CREATE TABLE synchub_blob_uploads (
    sha256   TEXT NOT NULL,
    token_id BIGINT NOT NULL,
    PRIMARY KEY (sha256, token_id)
);

-- The token each client id reports under: bound by its first report or held change, so no
-- other token can write `sync_log` rows or held changes in that PC's name.
CREATE TABLE synchub_client_tokens (
    client_id TEXT NOT NULL PRIMARY KEY,
    token_id  BIGINT NOT NULL
);
