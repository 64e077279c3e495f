//! `record`: a value of the `tasks` bucket as every service reads it ([`records::decode`]),
//! then the state machine's moves (`proto/src/task.rs`) in an order the fuzzer picks, as the
//! gateway's control verbs, the workers and the reconciler make them on whatever record they
//! read, written by whichever version or hand (`nats kv put`).
//!
//! Beyond "never panics": a move is refused exactly when the table below says it is illegal
//! from the record's state, and a refused move changes nothing (so a terminal record stays
//! terminal but for an explicit retry); an allowed one lands in the state it names; and the
//! record still survives its trip through the bucket after every move.
#![no_main]

use arbitrary::Arbitrary;
use claw_proto::records;
use claw_proto::task::IllegalTransition;
use claw_proto::{Cause, PayloadRef, Progress, Status, TaskError, TaskRecord};
use libfuzzer_sys::fuzz_target;
use serde_json::json;
use time::OffsetDateTime;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    moves: Vec<Move>,
    stored: &'a [u8],
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Move {
    Start {
        attempt: u32,
    },
    /// 0..=255 for 0.0..=1.0: a handler's fraction is clamped to that before it gets here.
    ReportProgress {
        fraction: u8,
    },
    Succeed,
    SucceedStored,
    RetryLater {
        cause: u8,
    },
    Fail {
        cause: u8,
    },
    Cancel {
        cause: u8,
    },
    Pause,
    ReleasePause,
    MessageLost,
    Resume,
    HandBack,
    Requeue,
}

const CAUSES: [Cause; 9] = [
    Cause::User,
    Cause::Worker,
    Cause::Error,
    Cause::Timeout,
    Cause::LeaseLost,
    Cause::WorkerLost,
    Cause::Limit,
    Cause::DeadLetter,
    Cause::HandedBack,
];

fuzz_target!(|input: Input| {
    let Ok(mut record) = records::decode(input.stored) else { return };
    assert_round_trip(&record);
    // Services pass their clock; a realistic one, a second further at each move.
    let start = OffsetDateTime::UNIX_EPOCH + time::Duration::days(20_000);
    for (step, m) in input.moves.into_iter().enumerate() {
        let now = start + time::Duration::seconds(step as i64);
        let before = record.clone();
        match apply(&mut record, m, now) {
            Ok(()) => {
                assert!(legal(&before, m), "{m:?} allowed from {:?}", before.status);
                assert_eq!(record.status, lands_in(&before, m), "{m:?} from {:?}", before.status);
            }
            Err(refused) => {
                assert!(!legal(&before, m), "{m:?} refused from {:?}", before.status);
                assert_eq!(refused.from, before.status);
                assert_eq!(record, before, "a refused {m:?} changed the record");
            }
        }
        assert_round_trip(&record);
    }
});

fn apply(r: &mut TaskRecord, m: Move, now: OffsetDateTime) -> Result<(), IllegalTransition> {
    let cause = |c: u8| CAUSES[usize::from(c) % CAUSES.len()];
    let error = || TaskError::new("fuzz", "a fuzzed failure", true);
    match m {
        Move::Start { attempt } => r.start(attempt, "fuzz-worker", now),
        Move::ReportProgress { fraction } => {
            r.report_progress(Progress { fraction: f64::from(fraction) / 255.0, message: None })
        }
        Move::Succeed => r.succeed(json!({"ok": true}), now),
        Move::SucceedStored => {
            let name = format!("{}/result", r.id);
            r.succeed_stored(
                PayloadRef { bucket: "payloads".into(), name, size: 1, digest: None },
                now,
            )
        }
        Move::RetryLater { cause: c } => r.retry_later(error(), cause(c)),
        Move::Fail { cause: c } => r.fail(error(), cause(c), now),
        Move::Cancel { cause: c } => r.cancel(cause(c), now),
        Move::Pause => r.pause(),
        Move::ReleasePause => r.release_pause(),
        Move::MessageLost => r.message_lost(),
        Move::Resume => r.resume(),
        Move::HandBack => r.hand_back(),
        Move::Requeue => r.requeue(now),
    }
}

/// The state machine of `docs/PROTOCOL.md`, written out once more to hold the code to it.
fn legal(r: &TaskRecord, m: Move) -> bool {
    use Status::*;
    let held_paused = r.status == Paused && r.paused_from == Some(Running);
    match m {
        Move::Start { .. } => matches!(r.status, Queued | Retrying | Running),
        Move::ReportProgress { .. } | Move::Succeed | Move::SucceedStored => r.status == Running,
        Move::RetryLater { .. } | Move::MessageLost => r.status == Running,
        Move::Fail { .. } | Move::Cancel { .. } => !r.status.is_terminal(),
        Move::Pause => matches!(r.status, Queued | Running | Retrying),
        Move::ReleasePause => held_paused,
        Move::Resume => r.status == Paused,
        Move::HandBack => r.status == Running || held_paused,
        Move::Requeue => matches!(r.status, Failed | Cancelled),
    }
}

/// The state an allowed move leaves the record in.
fn lands_in(before: &TaskRecord, m: Move) -> Status {
    use Status::*;
    match m {
        Move::Start { .. } => Running,
        Move::Succeed | Move::SucceedStored => Succeeded,
        Move::RetryLater { .. } => Retrying,
        Move::Fail { .. } => Failed,
        Move::Cancel { .. } => Cancelled,
        Move::Pause => Paused,
        Move::Resume if before.paused_from == Some(Running) => Running,
        Move::Resume | Move::Requeue => Queued,
        Move::HandBack if before.status == Running => Queued,
        Move::ReportProgress { .. } | Move::ReleasePause | Move::MessageLost | Move::HandBack => {
            before.status
        }
    }
}

/// What a service writes back is what the next one reads.
fn assert_round_trip(record: &TaskRecord) {
    let stored = serde_json::to_vec(record).unwrap();
    assert_eq!(&records::decode(&stored).unwrap(), record, "the bucket changes the record");
}
