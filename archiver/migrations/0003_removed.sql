-- Retention: a terminal record leaves the `tasks` bucket only once it is archived here and its
-- retention has passed; the archiver then deletes exactly the archived revision from the bucket's
-- stream and notes when in `removed_at` (unix microseconds). NULL means the revision may still be
-- in the bucket. A newer terminal revision of the same id (after an explicit retry) sets it back
-- to NULL, since that one is in the bucket again. Rows archived before this column existed start
-- as NULL: the first sweeps remove what the bucket still holds of them (a revision already gone
-- is no error).
ALTER TABLE tasks ADD COLUMN removed_at INTEGER;

-- The sweep's question, "archived, still in the bucket, finished before the cutoff", is a range
-- scan on this partial index. A terminal record always has `finished_at`; `created_at` stands in
-- for one written without it, which would otherwise stay in the bucket forever.
CREATE INDEX tasks_to_remove ON tasks (coalesce(finished_at, created_at)) WHERE removed_at IS NULL;
