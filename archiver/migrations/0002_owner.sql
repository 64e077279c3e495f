-- The gateway principal that submitted a task (`owner` in the record), for history listed per
-- principal. NULL for tasks without one (NATS-native publishers, a gateway without API tokens),
-- which only an unfiltered listing (an admin, or no tokens) shows. Rows archived before this
-- column existed take it from their record JSON.
ALTER TABLE tasks ADD COLUMN owner TEXT;
UPDATE tasks SET owner = json_extract(record, '$.owner');
CREATE INDEX tasks_by_owner ON tasks (owner, created_at DESC, id DESC);
