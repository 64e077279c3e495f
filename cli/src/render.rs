//! Human text for the client verbs: column tables (`ls`, `lanes`), a record as `key  value`
//! lines (`get`), and the one-line summaries `watch` ends with. Times are UTC.
//!
//! Hand-formatted columns rather than a table crate: the tables are a few plain columns, and
//! plain text with no borders is what `grep` and `awk` want.

use claw_proto::api::LaneInfo;
use claw_proto::task::{Progress, Status, TaskRecord};
use time::OffsetDateTime;
use time::macros::format_description;

/// Left-aligned columns separated by two spaces; no trailing blanks.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::new();
        for (cell, width) in cells.zip(&widths) {
            out.push_str(&format!("{cell:<width$}  "));
        }
        out.trim_end().to_owned() + "\n"
    };
    let mut out = line(&mut header.iter().copied());
    for row in rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    out
}

/// `claw ls`: one row per task.
pub fn task_table(tasks: &[TaskRecord]) -> String {
    let header = ["ID", "STATUS", "KIND", "SESSION", "ATTEMPT", "CREATED", "FINISHED"];
    let rows: Vec<Vec<String>> = tasks
        .iter()
        .map(|t| {
            vec![
                t.id.to_string(),
                t.status.to_string(),
                t.kind.clone(),
                t.session.to_string(),
                format!("{}/{}", t.attempt, t.max_attempts),
                timestamp(t.created_at),
                t.finished_at.map_or_else(|| "-".to_owned(), timestamp),
            ]
        })
        .collect();
    table(&header, &rows)
}

/// `claw lanes`: one row per class × priority.
pub fn lane_table(lanes: &[LaneInfo]) -> String {
    let rows: Vec<Vec<String>> = lanes
        .iter()
        .map(|l| {
            vec![
                format!("{} {}", l.class, l.priority),
                l.depth.to_string(),
                l.in_flight.to_string(),
                if l.paused { "yes" } else { "no" }.to_owned(),
            ]
        })
        .collect();
    table(&["LANE", "DEPTH", "IN FLIGHT", "PAUSED"], &rows)
}

/// `claw get`: the record as aligned `key  value` lines, the fields a person looks at first.
pub fn record(r: &TaskRecord) -> String {
    let mut lines: Vec<(&str, String)> = vec![
        ("id", r.id.to_string()),
        ("status", status_with_cause(r)),
        ("kind", r.kind.clone()),
        ("session", r.session.to_string()),
        ("lane", format!("{} {}", r.class, r.priority)),
        ("attempt", format!("{}/{}", r.attempt, r.max_attempts)),
    ];
    if let Some(p) = &r.progress {
        lines.push(("progress", progress(p)));
    }
    lines.push(("created", timestamp(r.created_at)));
    if let Some(t) = r.started_at {
        lines.push(("started", timestamp(t)));
    }
    if let Some(t) = r.finished_at {
        lines.push(("finished", timestamp(t)));
    }
    lines.push(("deadline", timestamp(r.deadline)));
    if let Some(w) = &r.worker {
        lines.push(("worker", w.clone()));
    }
    let stored = |p: &claw_proto::PayloadRef, flag: &str| {
        format!("{} bytes, stored as {} (claw get {} --{flag} FILE)", p.size, p.name, r.id)
    };
    match &r.input_ref {
        Some(p) => lines.push(("input", stored(p, "input"))),
        None => lines.push(("input", r.input.to_string())),
    }
    if let Some(p) = &r.result_ref {
        lines.push(("result", stored(p, "result")));
    } else if let Some(result) = &r.result {
        lines.push(("result", result.to_string()));
    }
    if let Some(e) = &r.error {
        lines.push(("error", e.to_string()));
    }
    lines.iter().map(|(k, v)| format!("{k:<9} {v}\n")).collect()
}

/// `succeeded (worker)`.
pub fn status_with_cause(r: &TaskRecord) -> String {
    match r.cause {
        Some(cause) => format!("{} ({})", r.status, cause_name(cause)),
        None => r.status.to_string(),
    }
}

/// ` 50% step 2/4`.
pub fn progress(p: &Progress) -> String {
    let percent = (p.fraction.clamp(0.0, 1.0) * 100.0).round();
    match &p.message {
        Some(m) => format!("{percent:>3}% {m}"),
        None => format!("{percent:>3}%"),
    }
}

/// What `watch` prints when the task is over: the status, how long it took, and the result or
/// the error.
pub fn outcome(r: &TaskRecord) -> String {
    let took = match (r.started_at, r.finished_at) {
        (Some(start), Some(end)) => format!(" in {:.1}s", (end - start).as_seconds_f64()),
        _ => String::new(),
    };
    let mut out = format!(
        "{}{took} (attempt {}/{}, {})\n",
        r.status,
        r.attempt,
        r.max_attempts,
        r.cause.map_or_else(|| "-".to_owned(), cause_name)
    );
    if r.status == Status::Succeeded
        && let Some(result) = &r.result
    {
        out.push_str(&format!("result: {result}\n"));
    }
    if let Some(e) = &r.error {
        out.push_str(&format!("error: {e}\n"));
    }
    out
}

/// The wire name of a cause (`lease_lost`), as the API and the docs spell it. Through serde,
/// so a cause added to the model later is named without a change here.
pub fn cause_name(cause: claw_proto::Cause) -> String {
    match serde_json::to_value(cause) {
        Ok(serde_json::Value::String(name)) => name,
        _ => format!("{cause:?}"),
    }
}

/// `2026-11-24 10:00:01` (UTC).
pub fn timestamp(t: OffsetDateTime) -> String {
    let format = format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    t.to_offset(time::UtcOffset::UTC).format(&format).unwrap_or_else(|_| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let rows = vec![vec!["a".into(), "long value".into()], vec!["bbb".into(), "x".into()]];
        assert_eq!(table(&["K", "V"], &rows), "K    V\na    long value\nbbb  x\n");
    }

    #[test]
    fn progress_reads_as_percent() {
        let p = Progress { fraction: 0.25, message: Some("step 1/4".into()) };
        assert_eq!(progress(&p), " 25% step 1/4");
        assert_eq!(progress(&Progress { fraction: 1.0, message: None }), "100%");
    }
}
