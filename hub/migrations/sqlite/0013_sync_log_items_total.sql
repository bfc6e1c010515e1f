-- items_synced counts the files a sync changed; the version's file count goes here.
ALTER TABLE sync_log ADD COLUMN items_total INTEGER;
