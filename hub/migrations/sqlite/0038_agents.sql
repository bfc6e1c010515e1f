-- Every agent the hub has heard from, one row per agent and space, so that a PC that went
-- offline stays listed with when it was last seen and what it held. Written by the hub's
-- fleet task a few seconds after an agent's state changes (never once per frame), and once a
-- minute while it stays connected. `state` is the agent's last reported state as JSON.
CREATE TABLE synchub_agents (
    space TEXT NOT NULL,
    client_id TEXT NOT NULL,
    token_name TEXT NOT NULL,
    hostname TEXT,
    agent_version TEXT,
    state TEXT NOT NULL,
    version BIGINT NOT NULL,
    connected BOOLEAN NOT NULL,
    last_seen TEXT NOT NULL,
    PRIMARY KEY (space, client_id)
);
