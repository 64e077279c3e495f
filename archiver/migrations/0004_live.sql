-- The tasks that are not finished: one row per record of the `tasks` bucket whose latest revision
-- the archiver has seen is live (queued, running, retrying, paused), written in the same
-- transaction as the archive rows of its batch. The reconciler picks from here the records that
-- may be stranded (no lane message, no holder) without reading the whole bucket.
--
-- Guards, as for `tasks`: a row only moves to a strictly higher revision; a terminal revision or
-- a delete marker ends the rows older than itself; and a live revision older than the archived
-- terminal one of the same id (a replay) never comes back. `written_at` is the server's
-- timestamp of the revision (unix microseconds), which the reconciler's grace is measured
-- against; `deadline` is the record's absolute deadline (unix microseconds).
CREATE TABLE live (
    id          TEXT    NOT NULL PRIMARY KEY,
    revision    INTEGER NOT NULL,
    status      TEXT    NOT NULL,
    paused_from TEXT,
    class       TEXT    NOT NULL,
    priority    TEXT    NOT NULL,
    deadline    INTEGER NOT NULL,
    written_at  INTEGER NOT NULL,
    message_seq INTEGER
) STRICT;

CREATE INDEX live_by_written ON live (written_at);
