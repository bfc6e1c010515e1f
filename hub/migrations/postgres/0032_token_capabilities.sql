-- Token capabilities: `read` (sync), `publish` (also commit), `admin`. Tokens made before
-- them had role `agent`, which could read and commit: they become `publish`, so nothing that
-- runs today stops working; an admin narrows them to `read` by making new tokens.
UPDATE synchub_tokens SET role = 'publish' WHERE role = 'agent';
