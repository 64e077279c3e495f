#!/usr/bin/env python3
"""Writes the seed corpus fuzz/seeds/<target>/: realistic valid inputs from docs/PROTOCOL.md and
the crates' tests. Run it again after changing a target's input type, and check a seed with
`cargo +nightly fuzz fmt <target> fuzz/seeds/<target>/<seed>` (it prints the decoded input).

The JSON targets take raw text. The structured ones (`lane_message`, `record`, `tokens_file`)
decode their input with the `arbitrary` crate (1.x), whose format this file writes: integers
little-endian from the front, a bool as one byte (& 1), an enum variant as a u32 scaled to the
number of variants, a `Vec` as a 1 byte before each element and a 0 after the last, the length
of a `&str` that is not the last field taken from the end of the input, and the last field all
that is left.
"""

import hashlib
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


class Arbitrary:
    """The bytes `arbitrary`'s `Unstructured` decodes into the values given, in field order."""

    def __init__(self):
        self.ops = []  # ("front", bytes) or ("len", n), in the order the decoder consumes them

    def u8(self, v):
        self.ops.append(("front", bytes([v])))

    def u32(self, v):
        self.ops.append(("front", struct.pack("<I", v)))

    def u64(self, v):
        self.ops.append(("front", struct.pack("<Q", v)))

    def variant(self, index, count):
        v = (index * 2**32 + count - 1) // count
        assert (v * count) >> 32 == index
        self.u32(v)

    def items(self, elements, write):
        for e in elements:
            self.u8(1)
            write(e)
        self.u8(0)

    def str(self, s):
        b = s.encode()
        self.ops.append(("len", len(b)))
        self.ops.append(("front", b))

    def finish(self, rest):
        """The input, with `rest` as the last field (take-rest)."""
        if isinstance(rest, str):
            rest = rest.encode()
        front = sum(len(b) for kind, b in self.ops if kind == "front")
        lens = [n for kind, n in self.ops if kind == "len"]
        # Each length takes 1, 2, 4 or 8 bytes off the end, as many as the data left then
        # needs: iterate until the widths agree with the lengths they imply.
        widths = [1] * len(lens)
        while True:
            new, consumed = [], 0
            for i in range(len(lens)):
                before = [b for kind, b in self.ops[: self._op_index(i)] if kind == "front"]
                remaining = front - sum(len(b) for b in before) + len(rest) + sum(widths[i:])
                new.append(1 if remaining <= 256 else 2 if remaining <= 65537 else 4)
            if new == widths:
                break
            widths = new
        back = []
        for i, n in enumerate(lens):
            before = [b for kind, b in self.ops[: self._op_index(i)] if kind == "front"]
            remaining = front - sum(len(b) for b in before) + len(rest) + sum(widths[i:])
            max_size = remaining - widths[i]
            assert n <= max_size
            if widths[i] == 1 or max_size < 256:
                chunk = bytes([n]) + bytes(widths[i] - 1)
            else:
                chunk = n.to_bytes(widths[i], "big")
            back.append(chunk)
        data = b"".join(b for kind, b in self.ops if kind == "front") + rest
        return data + b"".join(reversed(back))

    def _op_index(self, len_number):
        seen = -1
        for i, (kind, _) in enumerate(self.ops):
            if kind == "len":
                seen += 1
                if seen == len_number:
                    return i
        raise IndexError(len_number)


def write(target, name, data):
    os.makedirs(os.path.join(HERE, target), exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(HERE, target, name), "wb") as f:
        f.write(data)


def compact(value):
    return json.dumps(value, separators=(",", ":"))


# task_spec: bodies of POST /v1/tasks (docs/PROTOCOL.md, "Submitting").
SPECS = {
    "protocol-example": '{"kind": "sleep", "input": {"seconds": 2, "steps": 4}, "session": "chat-17",\n'
    ' "id": "optional-own-id", "max_attempts": 3, "timeout_s": 60, "deadline_s": 3600}',
    "sleep": '{"kind":"sleep","input":{"seconds":1}}',
    "sleep-level-9": '{"kind":"sleep","input":{"seconds":1},"priority":9}',
    "sleep-estimated-long": '{"kind": "sleep", "input": {"seconds": 1}, "estimated_s": 600}',
    "exec": '{"kind":"exec","input":{"program":"agent"}}',
    "exec-args": '{"kind":"exec","input":{"program":"wc","args":["-l"],"stdin":"a\\nb\\n"},"max_attempts":1}',
    "llm": '{"kind":"llm","input":{"messages":[{"role":"user","content":"hi"}],"temperature":0.2},'
    '"class":"short","priority":"high"}',
    "nulls": '{"kind":"sleep","input":null,"session":null,"priority":null,"class":null,"timeout_s":null}',
    "normalized": compact(
        {
            "id": "0199b6f2-0000-7000-8000-000000000000",
            "kind": "sleep",
            "input": {"seconds": 0.5, "steps": 3, "fail_attempts": 1, "retryable": False, "echo": {"x": [1, 2.5, "y"]}},
            "session": "default",
            "priority": "normal",
            "class": "short",
            "timeout_s": 300,
            "max_attempts": 3,
            "deadline_s": 604800,
        }
    ),
    "input-ref": compact(
        {
            "id": "t-1",
            "kind": "sleep",
            "input": None,
            "input_ref": {"bucket": "payloads", "name": "t-1/input", "size": 70000, "digest": "SHA-256=abc"},
        }
    ),
}
for name, body in SPECS.items():
    write("task_spec", name, body)

# lane_message: docs/PROTOCOL.md, "Publishing straight to NATS", and the gateway's republish.
MSG_ID, TRACEPARENT, OTHER = 0, 1, 2
LANES = ["short-high", "short-normal", "short-low", "long-high", "long-normal", "long-low"]
TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
MESSAGES = {
    "nats-pub-short": ("short-normal", [], '{"kind":"sleep","session":"chat-17","input":{"seconds":2,"steps":4}}'),
    "nats-pub-msg-id": ("long-high", [(MSG_ID, "job-2")], '{"kind":"exec","input":{"program":"agent"}}'),
    "republished": (
        "short-normal",
        [(MSG_ID, "t-1:42"), (TRACEPARENT, TRACE)],
        '{"id":"t-1","kind":"sleep","input":{"seconds":1},"session":"default","priority":"normal",'
        '"class":"short","timeout_s":300,"max_attempts":3,"deadline_s":3600}',
    ),
    "invalid": ("short-low", [(MSG_ID, "order:42"), ((OTHER, "X-Custom"), "v")], '{"kind":"sleep","bogus":1}'),
}
for name, (lane, headers, payload) in MESSAGES.items():
    a = Arbitrary()
    a.u8(LANES.index(lane))
    a.u64(17)
    a.u32(1_764_000_000)

    def header(h):
        name, value = h
        if isinstance(name, tuple):
            a.variant(OTHER, 3)
            a.str(name[1])
        else:
            a.variant(name, 3)
        a.str(value)

    a.items(headers, header)
    write("lane_message", name, a.finish(payload))

# record: records as the bucket holds them (docs/PROTOCOL.md, "The task record"), and moves.
MOVES = ["Start", "ReportProgress", "Succeed", "SucceedStored", "RetryLater", "Fail", "Cancel",
         "Pause", "ReleasePause", "MessageLost", "Resume", "HandBack", "Requeue"]
WITH_U32, WITH_U8 = {"Start"}, {"ReportProgress", "RetryLater", "Fail", "Cancel"}


def record(status, **fields):
    r = {
        "id": "0199b6f2-0000-7000-8000-000000000000", "session": "default", "kind": "sleep",
        "input": {"seconds": 1}, "class": "short", "priority": "normal", "status": status,
        "attempt": 0, "max_attempts": 3, "timeout_s": 300, "progress": None, "result": None,
        "error": None, "cause": "user", "created_at": "2026-11-24T00:00:00.1Z", "started_at": None,
        "finished_at": None, "deadline": "2026-12-01T00:00:00.1Z", "worker": None,
    }
    r.update(fields)
    return compact(r)


SUCCEEDED = record(
    "succeeded", attempt=1, progress={"fraction": 1.0, "message": "step 4/4"},
    result={"slept_s": 1.0, "echo": None}, cause="worker", started_at="2026-11-24T00:00:00.5Z",
    finished_at="2026-11-24T00:00:01.5Z", worker="host-1234", message_seq=17,
)
RECORDS = {
    "queued-runs-and-succeeds": (record("queued"), [("Start", 1), ("ReportProgress", 128), ("Succeed",)]),
    "retried-then-failed-and-requeued": (
        record("queued", owner="alice"),
        [("Start", 1), ("RetryLater", 2), ("Start", 2), ("Fail", 7), ("Requeue",), ("Start", 1)],
    ),
    "paused-while-running": (
        record("running", attempt=1, cause="worker", started_at="2026-11-24T00:00:00.5Z",
               worker="w1", message_seq=7),
        [("Pause",), ("ReleasePause",), ("Resume",), ("Start", 2), ("HandBack",), ("Cancel", 0)],
    ),
    "protocol-example-succeeded": (SUCCEEDED, [("Start", 2), ("Cancel", 0), ("Requeue",)]),
    "stored-payloads": (
        record("running", attempt=1, input=None, message_seq=3,
               input_ref={"bucket": "payloads", "name": "0199b6f2-0000-7000-8000-000000000000/input",
                          "size": 70000, "digest": "SHA-256=abc"}),
        [("MessageLost",), ("SucceedStored",)],
    ),
}
for name, (stored, moves) in RECORDS.items():
    a = Arbitrary()

    def move(m):
        a.variant(MOVES.index(m[0]), len(MOVES))
        if m[0] in WITH_U32:
            a.u32(m[1])
        elif m[0] in WITH_U8:
            a.u8(m[1])

    a.items(moves, move)
    write("record", name, a.finish(stored))

# ws_command: client frames (docs/PROTOCOL.md, "WebSocket").
FRAMES = {
    "submit": '{"op": "submit", "ref": 1, "task": {"kind": "sleep", "input": {"seconds": 1}}, "idempotency_key": "k"}',
    "submit-own-session": '{"op":"submit","ref":"a","task":{"kind":"exec","session":"chat-17","input":{"program":"agent"}}}',
    "cancel": '{"op": "cancel", "ref": 2, "id": "0199b6f2-..."}',
    "pause": '{"op":"pause","ref":{"n":3},"id":"t-1"}',
    "resume": '{"op":"resume","ref":null,"id":"t-1"}',
    "retry": '{"op":"retry","ref":[4],"id":"t-1"}',
}
for name, frame in FRAMES.items():
    write("ws_command", name, frame)

# tokens_file: the module docs of gateway/src/auth.rs and its tests.
ALICE = "alice-token-0123456789"
OPS = "claw_ops-token-abcdefghij"
ALICE_DIGEST = hashlib.sha256(ALICE.encode()).hexdigest()
FILES = {
    "digest-and-plain": (
        f'[principals.alice]\ntokens = ["sha256:{ALICE_DIGEST}"]\n\n'
        f'[principals.ops]\ntokens = ["{OPS}"]\nadmin = true\n',
        [ALICE, OPS, "nope-nope-nope-nope", ALICE_DIGEST],
    ),
    "generated-line": (
        "# claw token new\n[principals.x]\n"
        'tokens = ["sha256:9c1d000000000000000000000000000000000000000000000000000000000007", '
        '"claw_0f3a0000000000000000000000000000000000000000000000000000000000aa"]   # two\n',
        ["claw_0f3a0000000000000000000000000000000000000000000000000000000000aa", ""],
    ),
}
for name, (text, presented) in FILES.items():
    a = Arbitrary()
    a.items(presented, a.str)
    write("tokens_file", name, a.finish(text))
