#!/usr/bin/env python3
"""OpenClaw over NATS alone, from another language: the interop test.

Drives a running system (nats-server + gateway + worker + archiver) with the `nats-py` client,
using only what docs/PROTOCOL.md documents, and validates every task spec it sends and every
record, event, error and lanes reply it reads against the JSON Schemas in nats/schema/, so the
schemas cannot drift from the Rust types silently.

    PYTHONPATH=.tools/python python3 tests/interop/interop.py nats://127.0.0.1:4222

(`scripts/install-interop` installs nats-py and jsonschema into .tools/python.) Prints one line
per check and exits 0 when all hold; any failure raises, prints the reason and exits 1.

What it does:
 1. publishes sleep tasks to `tasks.short.normal` with `Nats-Msg-Id` (one with the id only in
    the header), sees a re-publish de-duplicated by JetStream;
 2. watches `progress.<session>.*` live: running → progress → succeeded (with the result);
 3. reads the records from the KV bucket `tasks` until `succeeded`, with the result;
 4. replays the same events from stream `PROGRESS` by sequence (what `since` resumes from);
 5. cancels a running long sleep with `claw.api.cancel` request/reply and sees `cancelled`
    (record, event), then a 409 conflict reply for `pause` and a 404 for an unknown id;
 6. publishes garbage and an unknown kind, and reads them back from stream `DLQ` with their
    `Claw-Dlq-*` headers, and their `failed`/`dead_letter` records;
 7. submits with `claw.api.submit` and `Idempotency-Key`, lists and pauses lanes with
    `claw.api.lanes*`, and reads history with `claw.archive.get` / `claw.archive.list`.
"""

import asyncio
import datetime
import json
import pathlib
import sys
import time
import uuid

try:
    import jsonschema
    import nats
    import referencing
    from nats.js.errors import KeyNotFoundError, NotFoundError
except ImportError as e:  # pragma: no cover - the Rust side explains how to install
    sys.stderr.write(
        f"interop: missing Python package ({e}); run scripts/install-interop and set "
        "PYTHONPATH=.tools/python\n"
    )
    sys.exit(2)

SCHEMA_DIR = pathlib.Path(__file__).resolve().parents[2] / "nats" / "schema"
# Every wait below is bounded by this; the whole script normally takes a few seconds.
WAIT_S = 20.0
RUN = uuid.uuid4().hex[:8]
SESSION = f"interop-{RUN}"
LANE = "tasks.short.normal"


def check(what):
    print(f"ok: {what}", flush=True)


# ---------------------------------------------------------------------------------------------
# Schemas


def _date_time(value):
    if not isinstance(value, str):
        return True
    # RFC 3339 with a mandatory offset; Python 3.11 reads any number of fraction digits.
    if "T" not in value or not (value.endswith("Z") or value[-6] in "+-"):
        return False
    datetime.datetime.fromisoformat(value)
    return True


class Schemas:
    """The files of nats/schema, cross-referenced by file name as on disk."""

    def __init__(self, directory):
        resources = []
        self.raw = {}
        for path in sorted(directory.glob("*.schema.json")):
            schema = json.loads(path.read_text())
            jsonschema.Draft202012Validator.check_schema(schema)
            self.raw[path.name] = schema
            resources.append(
                (path.name, referencing.Resource.from_contents(
                    schema, default_specification=referencing.jsonschema.DRAFT202012))
            )
        registry = referencing.Registry().with_resources(resources)
        formats = jsonschema.FormatChecker(formats=())
        formats.checks("date-time", raises=ValueError)(_date_time)
        self.validators = {
            name.removesuffix(".schema.json"): jsonschema.Draft202012Validator(
                {"$ref": name}, registry=registry, format_checker=formats)
            for name in self.raw
        }
        self.counts = {name: 0 for name in self.validators}

    def validate(self, name, value):
        errors = sorted(self.validators[name].iter_errors(value), key=lambda e: list(e.path))
        if errors:
            detail = "; ".join(f"{'/'.join(map(str, e.path)) or '.'}: {e.message}" for e in errors)
            raise AssertionError(f"{name} schema refuses {json.dumps(value)}: {detail}")
        self.counts[name] += 1
        return value

    def refuses(self, name, value):
        if self.validators[name].is_valid(value):
            raise AssertionError(f"{name} schema accepts {json.dumps(value)}")


def schema_self_test(schemas):
    """The schemas say what serde says for a few edge cases, before any server is involved."""
    ok = schemas.validate
    ok("task-spec", {"kind": "sleep"})
    ok("task-spec", {"kind": "sleep", "priority": 9, "class": "long", "session": None})
    ok("task-spec", {"kind": "x", "priority": "low", "id": "A_b-9", "input": [1]})
    for bad in [
        {},
        {"kind": "sleep", "prority": 1},
        {"kind": "sleep", "priority": 10},
        {"kind": "sleep", "priority": "urgent"},
        {"kind": "sleep", "class": "medium"},
        {"kind": "sleep", "session": "a.b"},
        {"kind": "sleep", "id": "x" * 65},
        {"kind": "sleep", "timeout_s": -1},
    ]:
        schemas.refuses("task-spec", bad)
    schemas.refuses("error", {"error": {"code": "nope", "message": "m"}})
    schemas.refuses("event", {"type": "status", "task_id": "t", "session": "s",
                              "at": "2026-01-01T00:00:00Z", "data": {"status": "done", "attempt": 1}})
    schemas.refuses("event", {"type": "status", "task_id": "t", "session": "s",
                              "at": "yesterday", "data": {"status": "queued", "attempt": 0}})
    check("the schemas are valid draft 2020-12 and refuse what serde refuses")


# ---------------------------------------------------------------------------------------------
# Helpers


def header(headers, name):
    for key, value in (headers or {}).items():
        if key.lower() == name.lower():
            return value
    return None


async def eventually(what, probe, timeout=WAIT_S, every=0.05):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = probe()
        if asyncio.iscoroutine(last):
            last = await last
        if last is not None and last is not False:
            return last
        await asyncio.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Events:
    """A live core-NATS subscription to `progress.<session>.*`, validating every event."""

    def __init__(self, schemas):
        self.schemas = schemas
        self.by_task = {}

    async def start(self, nc, session):
        async def on_event(msg):
            event = self.schemas.validate("event", json.loads(msg.data))
            _, session_token, task_id = msg.subject.split(".")
            assert (event["session"], event["task_id"]) == (session_token, task_id), msg.subject
            self.by_task.setdefault(task_id, []).append(event)

        self.sub = await nc.subscribe(f"progress.{session}.*", cb=on_event)
        await nc.flush()

    def of(self, task_id):
        return list(self.by_task.get(task_id, []))

    def statuses(self, task_id):
        return [e["data"]["status"] for e in self.of(task_id) if e["type"] == "status"]

    async def until_status(self, task_id, status):
        return await eventually(
            f"a {status!r} status event of {task_id}",
            lambda: status in self.statuses(task_id),
        )


async def kv_record(kv, schemas, task_id):
    try:
        entry = await kv.get(task_id)
    except KeyNotFoundError:
        return None
    if entry.value is None:
        return None
    return schemas.validate("task-record", json.loads(entry.value))


async def record_with_status(kv, schemas, task_id, status):
    async def probe():
        record = await kv_record(kv, schemas, task_id)
        return record if record and record["status"] == status else None

    return await eventually(f"record {task_id} {status} in KV", probe)


async def request(nc, schemas, subject, payload, headers=None, expect=None):
    """A request/reply call; returns (body, error status). Validates error replies."""
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    msg = await nc.request(subject, data, timeout=10, headers=headers)
    body = json.loads(msg.data)
    code = header(msg.headers, "Nats-Service-Error-Code")
    if code is not None:
        schemas.validate("error", body)
        assert header(msg.headers, "Nats-Service-Error"), f"{subject}: no Nats-Service-Error"
        code = int(code)
    if expect is not None:
        assert code == expect, f"{subject} {payload!r}: expected {expect}, got {code}: {body}"
    return body, code


def subsequence(wanted, seen):
    it = iter(seen)
    return all(any(s == w for s in it) for w in wanted)


# ---------------------------------------------------------------------------------------------
# The scenario


async def publish_and_watch(js, kv, schemas, events):
    ids = [f"{SESSION}-a", f"{SESSION}-b", f"{SESSION}-c"]
    for n, task_id in enumerate(ids):
        spec = {"kind": "sleep", "session": SESSION,
                "input": {"seconds": 0.3, "steps": 3, "echo": {"n": n}}}
        if n > 0:  # the first one carries its id only in Nats-Msg-Id
            spec["id"] = task_id
        schemas.validate("task-spec", spec)
        ack = await js.publish(LANE, json.dumps(spec).encode(), headers={"Nats-Msg-Id": task_id})
        assert ack.stream == "TASKS" and not ack.duplicate, ack
        if n == 0:
            again = await js.publish(LANE, json.dumps(spec).encode(),
                                     headers={"Nats-Msg-Id": task_id})
            assert again.duplicate and again.seq == ack.seq, f"not de-duplicated: {again}"
    check(f"published {len(ids)} tasks to {LANE} with Nats-Msg-Id; a re-publish was a duplicate")

    for n, task_id in enumerate(ids):
        record = await record_with_status(kv, schemas, task_id, "succeeded")
        assert record["id"] == task_id and record["session"] == SESSION, record
        assert (record["class"], record["priority"], record["kind"]) == ("short", "normal", "sleep")
        assert record["result"]["echo"] == {"n": n}, record["result"]
        assert record["attempt"] == 1 and record["cause"] == "worker", record
        assert record["error"] is None and record["finished_at"], record
    check("read every record from KV bucket `tasks` until succeeded, with its result")

    for n, task_id in enumerate(ids):
        await events.until_status(task_id, "succeeded")
        seen = events.of(task_id)
        statuses = events.statuses(task_id)
        # Protocol 5: a NATS-published task's first status is `running` (its record was
        # created running), and its end is one `succeeded` status carrying the result.
        assert subsequence(["running", "succeeded"], statuses), statuses
        assert "queued" not in statuses, statuses
        fractions = [e["data"]["fraction"] for e in seen if e["type"] == "progress"]
        assert fractions and all(0 <= f <= 1 for f in fractions), seen
        ends = [e["data"] for e in seen
                if e["type"] == "status" and e["data"]["status"] == "succeeded"]
        assert len(ends) == 1 and ends[0]["result"]["echo"] == {"n": n}, seen
        assert not [e for e in seen if e["type"] in ("result", "result_ref", "error")], seen
    check("watched progress.<session>.<id>: running, progress, succeeded with the result")
    return ids


async def replay(js, schemas, events, ids):
    """Reads the session's events back from PROGRESS by sequence, as `since` resumes."""
    subject = f"progress.{SESSION}.*"

    async def stored():
        replayed, seq = [], 1
        while True:
            try:
                msg = await js.get_msg("PROGRESS", seq, subject=subject, next=True)
            except NotFoundError:
                break
            replayed.append(schemas.validate("event", json.loads(msg.data)))
            seq = msg.seq + 1
        # The stream stores a core publish independently of its delivery to us: poll.
        for task_id in ids:
            if [e for e in replayed if e["task_id"] == task_id] != events.of(task_id):
                return None
        return replayed

    replayed = await eventually("the stored events to equal the live ones", stored)
    check(f"replayed {len(replayed)} events from stream PROGRESS by sequence, equal to the live ones")


async def cancel_running(nc, js, kv, schemas, events):
    task_id = f"{SESSION}-long"
    spec = {"kind": "sleep", "id": task_id, "session": SESSION,
            "input": {"seconds": 120, "steps": 120}}
    schemas.validate("task-spec", spec)
    await js.publish(LANE, json.dumps(spec).encode(), headers={"Nats-Msg-Id": task_id})
    await record_with_status(kv, schemas, task_id, "running")

    reply, code = await request(nc, schemas, "claw.api.cancel", task_id.encode())
    assert code is None, reply
    schemas.validate("task-record", reply)
    assert (reply["id"], reply["status"], reply["cause"]) == (task_id, "cancelled", "user"), reply
    record = await record_with_status(kv, schemas, task_id, "cancelled")
    assert record["finished_at"] and record["result"] is None, record
    await events.until_status(task_id, "cancelled")
    check("cancelled a running task with claw.api.cancel; record and event say cancelled")

    # Repeats are harmless; a verb that does not apply is a 409 with the current status.
    again, code = await request(nc, schemas, "claw.api.cancel", {"id": task_id})
    assert code is None and again["status"] == "cancelled", again
    conflict, _ = await request(nc, schemas, "claw.api.pause", {"id": task_id}, expect=409)
    assert conflict["error"]["code"] == "conflict", conflict
    assert conflict["error"]["status"] == "cancelled", conflict
    missing, _ = await request(nc, schemas, "claw.api.get", f"{SESSION}-nope".encode(), expect=404)
    assert missing["error"]["code"] == "not_found", missing
    bad, _ = await request(nc, schemas, "claw.api.submit", {"kind": "sleep", "bogus": 1},
                           expect=422)
    assert bad["error"]["code"] == "invalid_request", bad
    check("error replies: 409 conflict with status, 404 not_found, 422 invalid_request")

    # A short wait: the worker stops the attempt; the record must stay cancelled.
    await asyncio.sleep(0.5)
    record = await kv_record(kv, schemas, task_id)
    assert record["status"] == "cancelled", record
    return task_id


async def dead_letters(js, kv, schemas, events):
    cases = {
        f"{SESSION}-garbage": b"this is not a task {",
        f"{SESSION}-unknown": json.dumps({"kind": "no-such-kind", "session": SESSION}).encode(),
    }
    before = (await js.stream_info("DLQ")).state.last_seq
    for task_id, payload in cases.items():
        await js.publish(LANE, payload, headers={"Nats-Msg-Id": task_id})

    found = {}

    async def probe():
        seq = before + 1
        while True:
            try:
                msg = await js.get_msg("DLQ", seq, subject="dlq.>", next=True)
            except NotFoundError:
                break
            task_id = header(msg.headers, "Claw-Task-Id")
            if task_id in cases:
                found[task_id] = msg
            seq = msg.seq + 1
        return len(found) == len(cases)

    await eventually("both dead letters in stream DLQ", probe)
    for task_id, payload in cases.items():
        msg = found[task_id]
        assert msg.subject == "dlq.short.normal", msg.subject
        assert msg.data == payload, f"not verbatim: {msg.data!r}"
        assert header(msg.headers, "Claw-Dlq-Reason") == "invalid_task", msg.headers
        assert header(msg.headers, "Claw-Dlq-Subject") == LANE, msg.headers
        assert header(msg.headers, "Claw-Dlq-Deliveries") == "1", msg.headers
        assert header(msg.headers, "Claw-Dlq-Message"), msg.headers
        record = await record_with_status(kv, schemas, task_id, "failed")
        assert record["cause"] == "dead_letter", record
        assert record["error"]["code"] == "invalid_task" and not record["error"]["retryable"]
    unknown = await kv_record(kv, schemas, f"{SESSION}-unknown")
    assert "no-such-kind" in unknown["error"]["message"], unknown
    await events.until_status(f"{SESSION}-unknown", "failed")
    check("garbage and an unknown kind: read from stream DLQ verbatim with Claw-Dlq-Reason "
          "invalid_task; their records failed with cause dead_letter")


async def request_reply(nc, kv, schemas, events):
    spec = {"kind": "sleep", "session": SESSION, "priority": 9, "input": {"seconds": 0.1}}
    schemas.validate("task-spec", spec)
    key = {"Idempotency-Key": f"{SESSION}-order-42"}
    first, code = await request(nc, schemas, "claw.api.submit", spec, headers=key)
    assert code is None, first
    schemas.validate("task-record", first)
    assert (first["status"], first["priority"], first["class"]) == ("queued", "high", "short")
    repeat, _ = await request(nc, schemas, "claw.api.submit", spec, headers=key)
    assert repeat["id"] == first["id"], (first, repeat)
    await record_with_status(kv, schemas, first["id"], "succeeded")
    got, _ = await request(nc, schemas, "claw.api.get", {"id": first["id"]})
    schemas.validate("task-record", got)
    assert got["status"] == "succeeded", got
    await events.until_status(first["id"], "succeeded")
    check("claw.api.submit with Idempotency-Key (same id twice), claw.api.get")

    lanes, code = await request(nc, schemas, "claw.api.lanes", {})
    assert code is None, lanes
    schemas.validate("lanes", lanes)
    names = sorted(lane["consumer"] for lane in lanes["lanes"])
    assert names == sorted(f"{c}-{p}" for c in ("short", "long") for p in ("high", "normal", "low"))
    paused, code = await request(nc, schemas, "claw.api.lanes.pause",
                                 {"class": "long", "priority": "low"})
    assert code is None and paused["paused"] is True, paused
    schemas.validate("lanes", {"lanes": [paused]})
    listed, _ = await request(nc, schemas, "claw.api.lanes", {})
    assert [lane["paused"] for lane in listed["lanes"] if lane["consumer"] == "long-low"] == [True]
    resumed, _ = await request(nc, schemas, "claw.api.lanes.resume",
                               {"class": "long", "priority": "low"})
    assert resumed["paused"] is False, resumed
    check("claw.api.lanes lists six lanes; claw.api.lanes.pause / resume")
    return first["id"]


async def archive(nc, schemas, ids, elsewhere):
    """`ids` are tasks of SESSION; `elsewhere` finished tasks of other sessions."""
    async def archived(task_id):
        body, code = await request(nc, schemas, "claw.archive.get", task_id.encode())
        if code == 404:
            return None
        assert code is None, body
        return schemas.validate("task-record", body)

    for task_id in ids + elsewhere:
        record = await eventually(f"{task_id} in the archive", lambda: archived(task_id))
        assert record["id"] == task_id and record["status"] in ("succeeded", "failed", "cancelled")

    page, code = await request(nc, schemas, "claw.archive.list", {"session": SESSION, "limit": 500})
    assert code is None, page
    for record in page["tasks"]:
        schemas.validate("task-record", record)
    listed = {record["id"] for record in page["tasks"]}
    assert set(ids) <= listed, (ids, listed)
    failed, _ = await request(nc, schemas, "claw.archive.list",
                              {"session": SESSION, "status": "failed"})
    assert failed["tasks"] and all(r["status"] == "failed" for r in failed["tasks"]), failed
    bad, _ = await request(nc, schemas, "claw.archive.list", {"limit": 0}, expect=400)
    assert (bad["error"]["code"], bad["error"]["field"]) == ("invalid_request", "limit"), bad
    usage, code = await request(nc, schemas, "claw.archive.usage", b"")
    assert code is None, usage
    schemas.validate("usage", usage)
    check(f"claw.archive.get / list return the {len(ids + elsewhere)} finished tasks; "
          "a bad limit is a 400; claw.archive.usage answers")


async def main(url):
    schemas = Schemas(SCHEMA_DIR)
    schema_self_test(schemas)

    nc = await nats.connect(url, name="claw-interop", connect_timeout=5, max_reconnect_attempts=0)
    try:
        js = nc.jetstream()
        kv = await js.key_value("tasks")
        events = Events(schemas)
        await events.start(nc, SESSION)

        ids = await publish_and_watch(js, kv, schemas, events)
        await replay(js, schemas, events, ids)
        cancelled = await cancel_running(nc, js, kv, schemas, events)
        await dead_letters(js, kv, schemas, events)
        submitted = await request_reply(nc, kv, schemas, events)
        # The garbage message named no session: its record is in session `default`.
        await archive(nc, schemas, ids + [cancelled, f"{SESSION}-unknown", submitted],
                      [f"{SESSION}-garbage"])
    finally:
        await nc.drain()
    counts = ", ".join(f"{n} {name}" for name, n in sorted(schemas.counts.items()))
    print(f"interop: all checks hold; validated against the schemas: {counts}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: interop.py NATS_URL")
    try:
        asyncio.run(asyncio.wait_for(main(sys.argv[1]), timeout=180))
    except AssertionError as e:
        sys.stderr.write(f"interop: FAILED: {e}\n")
        sys.exit(1)
