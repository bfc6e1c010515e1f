-- Blobs the garbage collector found unreferenced and means to delete (see hub/src/gc.rs and
-- docs/OPERATIONS.md). A commit naming a doomed blob takes it off this list in its own
-- transaction; the collector deletes only blobs still listed after it waited longer than a
-- commit may take, and marks a row `deleting` first, after which commits naming that blob are
-- refused as missing it. `doomed_at`: Unix milliseconds (the same in both dialects).
CREATE TABLE synchub_gc_doomed (
    sha256    TEXT    NOT NULL PRIMARY KEY,
    doomed_at BIGINT  NOT NULL,
    deleting  BOOLEAN NOT NULL DEFAULT FALSE
);
