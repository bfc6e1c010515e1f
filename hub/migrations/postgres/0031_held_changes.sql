-- Local mass changes agents in two-way mode hold until an admin approves or rejects them:
-- one row per agent and space, removed by the agent once it has published or rolled back.
CREATE TABLE synchub_held_changes (
    space TEXT NOT NULL,
    client_id TEXT NOT NULL,
    change TEXT NOT NULL,
    decision TEXT NOT NULL DEFAULT 'pending',
    decided_by TEXT,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (space, client_id)
);
