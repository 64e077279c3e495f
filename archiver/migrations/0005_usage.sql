-- Each principal's share of the system, which the gateways' quotas read (`claw.archive.usage`):
-- the owner and the bytes (the record's JSON and the objects its refs name, `stored_bytes`) of
-- every live row, and the bytes of every archived revision that is still in the bucket. Rows
-- archived before this migration count their record's JSON.
ALTER TABLE live ADD COLUMN owner TEXT;
ALTER TABLE live ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0;
UPDATE tasks SET bytes = length(record) WHERE removed_at IS NULL;

CREATE INDEX live_by_owner ON live (owner, status, bytes) WHERE owner IS NOT NULL;
CREATE INDEX tasks_held_by_owner ON tasks (owner, bytes)
    WHERE removed_at IS NULL AND owner IS NOT NULL;
