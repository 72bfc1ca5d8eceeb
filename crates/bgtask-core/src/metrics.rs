//! Metrics, through the [`metrics`] facade: bgtask records them and the application picks the
//! exporter (the CLI serves them in the Prometheus text format with `--metrics-addr`). Without a
//! recorder installed every call here is a no-op.
//!
//! Names and labels follow Prometheus conventions: counters end in `_total`, durations are
//! `_seconds` histograms, and labels are bounded. A `task` label is a task name the application
//! submits or a worker serves (a worker labels tasks it only reached through a target as
//! `task="_target"`); task ids, key values and worker ids are never labels. docs/operations.md
//! lists every metric with a PromQL example.

use std::sync::Arc;
use std::time::Duration;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, SharedString,
};

use crate::error::ErrorKind;
use crate::status::Status;

/// Tasks a creator published (single and broadcast). Labels: `task`.
pub const TASKS_SUBMITTED: &str = "bgtask_tasks_submitted_total";
/// Single tasks that ended on their creator. Labels: `task`, `outcome` (`success`, `error`,
/// `failed`, `timed_out`, `cancelled`, `no_worker`, `closed`, `unavailable`).
pub const TASKS_COMPLETED: &str = "bgtask_tasks_completed_total";
/// Tasks refused at submit, before they were published. Labels: `task`, `reason`
/// (`limit_reached`, `blacklisted`, `no_worker`, `too_large`, `timed_out`, `unavailable`).
pub const TASKS_REFUSED: &str = "bgtask_tasks_refused_total";
/// Tasks a creator has submitted and not yet seen end. Labels: `task`.
pub const TASKS_IN_FLIGHT: &str = "bgtask_tasks_in_flight";
/// From submit to a worker's reply, in seconds (replies only, not timeouts). Labels: `task`.
pub const TASK_REPLY_SECONDS: &str = "bgtask_task_reply_seconds";
/// From submit to the offer a worker took, in seconds: time held back while every worker was
/// full, plus declined and unanswered offers. Labels: `task`.
pub const TASK_ACCEPT_SECONDS: &str = "bgtask_task_accept_seconds";
/// Live workers a creator sees through their presence. Labels: `namespace`.
pub const WORKERS_ONLINE: &str = "bgtask_workers_online";
/// Replies and answers that arrived after their task had ended on the creator.
pub const LATE_REPLIES: &str = "bgtask_late_replies_total";
/// Progress values and broadcast replies dropped because the reader fell behind.
pub const REPLIES_DROPPED: &str = "bgtask_replies_dropped_total";
/// Messages that could not be understood and were dropped. Labels: `role` (`client`, `worker`).
pub const MALFORMED_MESSAGES: &str = "bgtask_malformed_messages_total";
/// Times a subscription resumed after its connection was lost (messages may have been
/// missed). Labels: `role` (`client`, `worker`).
pub const SUBSCRIPTION_GAPS: &str = "bgtask_subscription_gaps_total";
/// Times a broker backend got its connection back after losing it. Labels: `backend`
/// (`redis`, `nats`, `postgres`).
pub const BROKER_RECONNECTS: &str = "bgtask_broker_reconnects_total";
/// Trace context (`traceparent`/`tracestate`) received malformed or oversize and dropped; the
/// task ran all the same (without a parent span, for a bad `traceparent`).
pub const TRACE_CONTEXT_DROPPED: &str = "bgtask_trace_context_dropped_total";
/// Tasks a worker took (claimed, or a broadcast). Labels: `task`.
pub const WORKER_TASKS_ACCEPTED: &str = "bgtask_worker_tasks_accepted_total";
/// Tasks a worker completed. Labels: `task`, `status` (`success`, `error`, `failed`).
pub const WORKER_TASKS_COMPLETED: &str = "bgtask_worker_tasks_completed_total";
/// Tasks a worker has taken and not yet completed. Labels: `task`.
pub const WORKER_TASKS_RUNNING: &str = "bgtask_worker_tasks_running";

/// What kind of metric a name is, for [`describe`].
#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Seconds,
}

/// Every metric with its `# HELP` text.
const DESCRIPTIONS: &[(&str, Kind, &str)] = &[
    (TASKS_SUBMITTED, Kind::Counter, "Tasks a creator published."),
    (
        TASKS_COMPLETED,
        Kind::Counter,
        "Single tasks that ended, by outcome.",
    ),
    (
        TASKS_REFUSED,
        Kind::Counter,
        "Tasks refused at submit, by reason.",
    ),
    (
        TASKS_IN_FLIGHT,
        Kind::Gauge,
        "Tasks submitted and not yet ended.",
    ),
    (
        TASK_REPLY_SECONDS,
        Kind::Seconds,
        "From submit to the worker's reply.",
    ),
    (
        TASK_ACCEPT_SECONDS,
        Kind::Seconds,
        "From submit to the offer a worker took.",
    ),
    (
        WORKERS_ONLINE,
        Kind::Gauge,
        "Live workers seen through their presence.",
    ),
    (
        LATE_REPLIES,
        Kind::Counter,
        "Replies that arrived after their task ended.",
    ),
    (
        REPLIES_DROPPED,
        Kind::Counter,
        "Progress values and broadcast replies dropped because the reader fell behind.",
    ),
    (
        MALFORMED_MESSAGES,
        Kind::Counter,
        "Messages dropped as malformed.",
    ),
    (
        SUBSCRIPTION_GAPS,
        Kind::Counter,
        "Times a subscription resumed after a lost connection.",
    ),
    (
        BROKER_RECONNECTS,
        Kind::Counter,
        "Times a broker connection came back.",
    ),
    (
        TRACE_CONTEXT_DROPPED,
        Kind::Counter,
        "Malformed or oversize trace context dropped.",
    ),
    (WORKER_TASKS_ACCEPTED, Kind::Counter, "Tasks a worker took."),
    (
        WORKER_TASKS_COMPLETED,
        Kind::Counter,
        "Tasks a worker completed, by status.",
    ),
    (
        WORKER_TASKS_RUNNING,
        Kind::Gauge,
        "Tasks a worker is running.",
    ),
];

/// Register the description of every metric with the installed recorder (exporters print them
/// as `# HELP`). Call once after installing a recorder; recording works without it.
pub fn describe() {
    for &(name, kind, help) in DESCRIPTIONS {
        match kind {
            Kind::Counter => describe_counter!(name, help),
            Kind::Gauge => describe_gauge!(name, help),
            Kind::Seconds => describe_histogram!(name, metrics::Unit::Seconds, help),
        }
    }
}

/// For [`Broker`](crate::Broker) implementations: the connection to the server came back
/// after it was lost. `backend` is a short constant name (`"redis"`).
pub fn broker_reconnected(backend: &'static str) {
    counter!(BROKER_RECONNECTS, "backend" => backend).increment(1);
}

/// Who dropped a message or saw a gap.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Role {
    Client,
    Worker,
}

impl Role {
    fn label(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Worker => "worker",
        }
    }
}

pub(crate) fn malformed(role: Role) {
    counter!(MALFORMED_MESSAGES, "role" => role.label()).increment(1);
}

pub(crate) fn gap(role: Role) {
    counter!(SUBSCRIPTION_GAPS, "role" => role.label()).increment(1);
}

pub(crate) fn late_reply() {
    counter!(LATE_REPLIES).increment(1);
}

pub(crate) fn reply_dropped() {
    counter!(REPLIES_DROPPED).increment(1);
}

pub(crate) fn trace_context_dropped() {
    counter!(TRACE_CONTEXT_DROPPED).increment(1);
}

/// A `task` label: the task's shared name, so recording copies no string.
fn label(task: &Arc<str>) -> SharedString {
    SharedString::from(task.clone())
}

pub(crate) fn submitted(task: &Arc<str>) {
    counter!(TASKS_SUBMITTED, "task" => label(task)).increment(1);
}

/// A submit failed with `kind` before its task was published. Only refusals are counted (a
/// task name that is not valid is never a label).
pub(crate) fn refused(task: &str, kind: ErrorKind) {
    let reason = match kind {
        ErrorKind::LimitReached => "limit_reached",
        ErrorKind::Blacklisted => "blacklisted",
        ErrorKind::NoWorker => "no_worker",
        ErrorKind::TooLarge => "too_large",
        ErrorKind::TimedOut => "timed_out",
        ErrorKind::Unavailable => "unavailable",
        _ => return,
    };
    counter!(TASKS_REFUSED, "task" => task.to_owned(), "reason" => reason).increment(1);
}

/// The outcome label of a task that ended with `result` (`Ok` is a success).
pub(crate) fn outcome_label(result: Result<(), ErrorKind>) -> &'static str {
    match result {
        Ok(()) => "success",
        Err(ErrorKind::TaskError) => "error",
        Err(ErrorKind::TaskFailed) => "failed",
        Err(ErrorKind::TimedOut) => "timed_out",
        Err(ErrorKind::Cancelled) => "cancelled",
        Err(ErrorKind::NoWorker) => "no_worker",
        Err(ErrorKind::Closed) => "closed",
        Err(_) => "unavailable",
    }
}

/// A single task ended on its creator `elapsed` after its submit; a worker's reply (success,
/// error, failed) also goes into the reply histogram.
pub(crate) fn completed(task: &Arc<str>, result: Result<(), ErrorKind>, elapsed: Duration) {
    let outcome = outcome_label(result);
    counter!(TASKS_COMPLETED, "task" => label(task), "outcome" => outcome).increment(1);
    if matches!(outcome, "success" | "error" | "failed") {
        histogram!(TASK_REPLY_SECONDS, "task" => label(task)).record(elapsed.as_secs_f64());
    }
}

/// A worker took the offer made `waited` after the task's submit.
pub(crate) fn accepted_after(task: &Arc<str>, waited: Duration) {
    histogram!(TASK_ACCEPT_SECONDS, "task" => label(task)).record(waited.as_secs_f64());
}

pub(crate) fn in_flight(task: &Arc<str>, delta: f64) {
    gauge!(TASKS_IN_FLIGHT, "task" => label(task)).increment(delta);
}

pub(crate) fn workers_online(namespace: &str, live: usize) {
    gauge!(WORKERS_ONLINE, "namespace" => namespace.to_owned()).set(live as f64);
}

pub(crate) fn worker_accepted(task: &Arc<str>) {
    counter!(WORKER_TASKS_ACCEPTED, "task" => label(task)).increment(1);
    gauge!(WORKER_TASKS_RUNNING, "task" => label(task)).increment(1.0);
}

pub(crate) fn worker_completed(task: &Arc<str>, status: Status) {
    counter!(WORKER_TASKS_COMPLETED, "task" => label(task), "status" => status.as_str())
        .increment(1);
    gauge!(WORKER_TASKS_RUNNING, "task" => label(task)).decrement(1.0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_described_once() {
        let mut names: Vec<&str> = DESCRIPTIONS.iter().map(|(name, _, _)| *name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), DESCRIPTIONS.len());
        assert_eq!(names.len(), 16, "a new metric goes into DESCRIPTIONS too");
    }

    #[test]
    fn every_ending_has_a_bounded_outcome_label() {
        assert_eq!(outcome_label(Ok(())), "success");
        assert_eq!(outcome_label(Err(ErrorKind::TaskFailed)), "failed");
        assert_eq!(outcome_label(Err(ErrorKind::Auth)), "unavailable");
    }
}
