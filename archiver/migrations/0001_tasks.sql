-- The archive: one row per task, holding its latest terminal record.
--
-- `record` is the full TaskRecord JSON, byte for byte as it was in the `tasks` KV bucket, so
-- `claw.archive.get` answers exactly what `nats kv get tasks <id>` showed. The other columns are
-- copies of its fields that listing filters and sorts on. `revision` is the KV revision (the
-- stream sequence of the `KV_tasks` message): upserts only move it forward, which is what makes
-- a redelivered or replayed message harmless.
CREATE TABLE tasks (
    id          TEXT    NOT NULL PRIMARY KEY,
    revision    INTEGER NOT NULL,
    session     TEXT    NOT NULL,
    kind        TEXT    NOT NULL,
    status      TEXT    NOT NULL,
    class       TEXT    NOT NULL,
    priority    TEXT    NOT NULL,
    -- Unix microseconds: integers sort correctly, RFC 3339 text with varying precision does not.
    created_at  INTEGER NOT NULL,
    finished_at INTEGER,
    record      TEXT    NOT NULL
) STRICT;

-- Listing is newest first with keyset paging on (created_at, id); each filter gets an index
-- that ends in that key, so a page is an index range scan whichever filter is used.
CREATE INDEX tasks_by_created ON tasks (created_at DESC, id DESC);
CREATE INDEX tasks_by_session ON tasks (session, created_at DESC, id DESC);
CREATE INDEX tasks_by_status ON tasks (status, created_at DESC, id DESC);
CREATE INDEX tasks_by_kind ON tasks (kind, created_at DESC, id DESC);
