-- Who did what to the hub as an admin, when and from where: force-syncs, rollbacks, token
-- changes, held-change decisions. Written after the action succeeded; never updated.
CREATE TABLE synchub_audit (
    id     BIGSERIAL PRIMARY KEY,
    at     TEXT NOT NULL,
    who    TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    peer   TEXT
);
