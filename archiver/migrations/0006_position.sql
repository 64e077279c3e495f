-- How far the archive has read the bucket's stream (`KV_tasks`): every revision at or below
-- `upto` is written (or was not a task record). It is committed in the same transaction as the
-- rows it covers, so a crash never skips a revision and a restart reads on from exactly there,
-- whatever happened to a consumer on the server meanwhile. One row.
CREATE TABLE position (
    one  INTEGER NOT NULL PRIMARY KEY CHECK (one = 1),
    upto INTEGER NOT NULL
);
INSERT INTO position (one, upto) VALUES (1, 0);
