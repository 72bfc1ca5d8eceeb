//! A task as a worker sees it: [`AvailableTask`] before accepting, [`RunningTask`] after,
//! [`TaskContext`] for handlers, and how a handler's result completes it.

use std::borrow::Cow;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Inner;
use crate::broker::LeaseId;
use crate::error::{Error, ErrorKind, Result};
use crate::metrics;
use crate::protocol::decode_raw;
use crate::protocol::envelope::{Kind, Message, Status};
use crate::protocol::TraceContext;

pub(super) struct Shared {
    pub(super) worker: Arc<Inner>,
    pub(super) id: String,
    /// Shared with every metric label of the task.
    pub(super) task: Arc<str>,
    /// Which of the worker's task names it is (`None`: reached only through a target).
    pub(super) served: Option<usize>,
    pub(super) reply_to: String,
    pub(super) deadline: Instant,
    pub(super) broadcast: bool,
    pub(super) key: Option<String>,
    /// The creator's lease on the key value's limit key, released with the `done`.
    pub(super) lease: Option<LeaseId>,
    pub(super) meta: Option<Box<RawValue>>,
    pub(super) body: Box<RawValue>,
    pub(super) cancel: CancellationToken,
    /// A directed offer: when to tell the creator it was accepted if it is still running.
    pub(super) offer: Option<Instant>,
    /// The creator has heard from this worker about the task (accepted, progress or done).
    pub(super) answered: AtomicBool,
    /// The creator's trace context, validated.
    pub(super) trace: Option<TraceContext>,
    /// The task's span, from its acceptance (a child of `trace` with `opentelemetry`).
    pub(super) span: OnceLock<tracing::Span>,
}

impl Shared {
    /// The task's `task` label in the metrics: its name if this worker serves it by name (a
    /// bounded set), else `_target`, so a forged name on a target channel is never a label.
    fn metric_label(&self) -> Arc<str> {
        match self.served {
            Some(_) => self.task.clone(),
            None => super::target_label(),
        }
    }

    /// Open the task's span, once it is this worker's.
    fn open_span(&self) {
        let span = tracing::info_span!(
            "bgtask.task",
            task = %self.task,
            task_id = %self.id,
            otel.kind = "consumer",
        );
        #[cfg(feature = "opentelemetry")]
        if let Some(trace) = &self.trace {
            trace.adopt(&span);
        }
        let _ = self.span.set(span);
    }

    /// Tell the creator of a directed offer that this worker runs it, unless it has heard
    /// already (progress or done count as the answer).
    pub(super) fn notify_accepted(self: Arc<Self>) {
        if self.answered.swap(true, Ordering::Relaxed) {
            return;
        }
        tokio::spawn(async move {
            let mut message = Message::new(Kind::Accepted, self.id.as_str());
            message.worker = Some(Cow::Borrowed(self.worker.worker_id.as_str()));
            if let Err(error) = self
                .worker
                .broker
                .publish(&self.reply_to, message.encode())
                .await
            {
                tracing::debug!(%error, "could not send an acceptance");
            }
        });
    }
}

/// A task's data as a worker sees it: shared by [`AvailableTask`], [`RunningTask`] and
/// [`TaskContext`].
#[derive(Clone)]
pub struct TaskContext {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for TaskContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskContext")
            .field("id", &self.shared.id)
            .field("task", &self.shared.task)
            .finish_non_exhaustive()
    }
}

impl TaskContext {
    /// The task's id.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// The task name.
    pub fn name(&self) -> &str {
        &self.shared.task
    }

    /// The payload as raw JSON text.
    pub fn raw(&self) -> &RawValue {
        &self.shared.body
    }

    /// The payload as a JSON value.
    pub fn json(&self) -> Value {
        serde_json::from_str(self.shared.body.get()).unwrap_or(Value::Null)
    }

    /// The payload deserialized into `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T> {
        decode_raw(&self.shared.body, "task payload")
    }

    /// The creator's trace context, if it sent a valid one (a malformed one is dropped and
    /// counted in `bgtask_trace_context_dropped_total`).
    pub fn trace_context(&self) -> Option<&TraceContext> {
        self.shared.trace.as_ref()
    }

    /// The task's span, from its acceptance to its end: [`Worker::run`](crate::Worker::run)
    /// runs the handler in it. With the `opentelemetry` feature, a child of the creator's span.
    /// (Disabled until the task is accepted.)
    pub fn span(&self) -> tracing::Span {
        self.shared
            .span
            .get()
            .cloned()
            .unwrap_or_else(tracing::Span::none)
    }

    /// The metadata the creator attached, if any.
    pub fn metadata(&self) -> Option<Value> {
        self.shared
            .meta
            .as_ref()
            .map(|m| serde_json::from_str(m.get()).unwrap_or(Value::Null))
    }

    /// The value of the task key, when the creator set one.
    pub fn key_value(&self) -> Option<&str> {
        self.shared.key.as_deref()
    }

    /// Whether every worker runs this task (its creator used
    /// [`Client::broadcast`](crate::Client::broadcast)).
    pub fn is_broadcast(&self) -> bool {
        self.shared.broadcast
    }

    /// When the creator stops waiting (measured from when this worker received the task).
    pub fn deadline(&self) -> Instant {
        self.shared.deadline
    }

    /// Whether the creator cancelled the task (or the worker is shutting down past its grace).
    pub fn is_cancelled(&self) -> bool {
        self.shared.cancel.is_cancelled()
    }

    /// Resolves when the task is cancelled.
    pub async fn cancelled(&self) {
        self.shared.cancel.cancelled().await
    }

    /// Send a progress value to the creator.
    pub async fn progress<T: Serialize + ?Sized>(&self, progress: &T) -> Result<()> {
        let shared = &self.shared;
        shared.answered.store(true, Ordering::Relaxed);
        let mut message = Message::new(Kind::Progress, shared.id.as_str());
        message.worker = Some(Cow::Borrowed(shared.worker.worker_id.as_str()));
        shared
            .worker
            .publish_reply(&shared.reply_to, message, "progress value", progress)
            .await
    }

    /// Report this task's key value as bad (see [`Blacklist::report`](crate::Blacklist::report)). Returns `true` when this
    /// report blacklisted it, and an error of kind `InvalidInput` when the task has no key.
    pub async fn report_bad_key(&self, reason: &str) -> Result<bool> {
        let Some(value) = &self.shared.key else {
            return Err(Error::invalid_input(
                "the task has no task key value to report",
            ));
        };
        self.shared
            .worker
            .blacklist
            .report(&self.shared.task, value, reason)
            .await
    }
}

/// A task seen on a worker's channel, not yet accepted. Ignoring it is dropping it: a directed
/// offer is then declined at once, so its creator offers it to another worker.
pub struct AvailableTask {
    context: TaskContext,
    /// Accepted or declined already: nothing to send on drop.
    settled: bool,
}

impl Drop for AvailableTask {
    fn drop(&mut self) {
        self.settle("ignored");
    }
}

impl std::fmt::Debug for AvailableTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AvailableTask")
            .field("id", &self.context.shared.id)
            .field("task", &self.context.shared.task)
            .finish_non_exhaustive()
    }
}

impl Deref for AvailableTask {
    type Target = TaskContext;

    fn deref(&self) -> &TaskContext {
        &self.context
    }
}

impl AvailableTask {
    /// A task just received, not settled yet.
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        AvailableTask {
            context: TaskContext { shared },
            settled: false,
        }
    }

    /// Whether this is a directed offer (sent to this worker only, which owes its creator an
    /// answer), as opposed to a broadcast or a task of a creator that sends no offers.
    pub fn is_offer(&self) -> bool {
        self.context.shared.offer.is_some()
    }

    /// Turn the task down: a directed offer's creator is told at once and offers it to another
    /// worker. (Dropping the task does the same.)
    pub fn decline(mut self) {
        self.settle("declined");
    }

    /// Send a directed offer's decline with `reason`, once.
    pub(super) fn settle(&mut self, reason: &'static str) {
        if std::mem::replace(&mut self.settled, true) || !self.is_offer() {
            return;
        }
        let shared = &self.context.shared;
        shared.worker.decline(&shared.id, &shared.reply_to, reason);
    }

    /// Try to take the task. `Ok(None)` when another worker took it first, the creator
    /// cancelled it, its deadline passed, or this worker is shutting down.
    pub async fn accept(mut self) -> Result<Option<RunningTask>> {
        if self.context.shared.worker.shutdown.is_cancelled() {
            self.settle("shutdown");
            return Ok(None);
        }
        let remaining = self
            .context
            .shared
            .deadline
            .saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            self.context.shared.worker.counters.lost.incr();
            self.settle("expired");
            return Ok(None);
        }
        self.settled = true;
        let shared = self.context.shared.clone();
        let worker = &shared.worker;
        // Registered before claiming, so a cancellation that follows the claim is never missed.
        worker.running().insert(
            shared.id.clone(),
            super::Held {
                cancel: shared.cancel.clone(),
                served: shared.served,
                since: Instant::now(),
            },
        );
        if !shared.broadcast {
            let ttl = remaining + worker.config.claim_margin;
            let claimed = worker
                .broker
                .claim(&worker.namespace.claim_key(&shared.id), ttl)
                .await;
            if !matches!(claimed, Ok(true)) {
                worker.running().remove(&shared.id);
                worker.counters.lost.incr();
                if shared.offer.is_some() {
                    // Another worker has it (a re-offer raced) or the creator gave up.
                    worker.decline(&shared.id, &shared.reply_to, "claimed");
                }
                return claimed.map(|_| None);
            }
        }
        worker.counters.accepted.incr();
        shared.open_span();
        metrics::worker_accepted(&shared.metric_label());
        if let Some(due) = shared.offer {
            worker.notices.push(due, Arc::downgrade(&shared));
        }
        let running = RunningTask {
            context: TaskContext { shared },
            completed: false,
        };
        Ok(Some(running))
    }
}

/// A task this worker accepted. Complete it with [`success`](Self::success),
/// [`error`](Self::error), [`fail`](Self::fail) or [`complete`](Self::complete).
///
/// Dropped without completion, it completes itself as `Failed`, so the creator learns at once
/// instead of at its timeout.
pub struct RunningTask {
    context: TaskContext,
    completed: bool,
}

impl std::fmt::Debug for RunningTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningTask")
            .field("id", &self.context.shared.id)
            .finish_non_exhaustive()
    }
}

impl Deref for RunningTask {
    type Target = TaskContext;

    fn deref(&self) -> &TaskContext {
        &self.context
    }
}

impl RunningTask {
    /// A cloneable view of the task, for handlers.
    pub fn context(&self) -> TaskContext {
        self.context.clone()
    }

    /// Complete with `Success` and `reply`.
    pub async fn success<T: Serialize + ?Sized>(self, reply: &T) -> Result<()> {
        self.complete(Status::Success, reply).await
    }

    /// Complete with `Error` and `reply`.
    pub async fn error<T: Serialize + ?Sized>(self, reply: &T) -> Result<()> {
        self.complete(Status::Error, reply).await
    }

    /// Complete with `Failed` and `reply`.
    pub async fn fail<T: Serialize + ?Sized>(self, reply: &T) -> Result<()> {
        self.complete(Status::Failed, reply).await
    }

    /// Complete with a handler's result.
    pub async fn finish(self, result: HandlerResult) -> Result<()> {
        match result {
            Ok(reply) => self.complete(Status::Success, &reply).await,
            Err(failure) => self.complete(failure.status, &failure.reply).await,
        }
    }

    /// Complete with `status` and `reply`. A reply over the payload limit is not sent: the
    /// creator gets `Failed` with a short explanation and this returns [`ErrorKind::TooLarge`].
    pub async fn complete<T: Serialize + ?Sized>(
        mut self,
        status: Status,
        reply: &T,
    ) -> Result<()> {
        self.completed = true;
        let shared = &self.context.shared;
        shared.answered.store(true, Ordering::Relaxed);
        let worker = &shared.worker;
        match send_done(shared, status, reply).await {
            Err(error) if error.kind() == ErrorKind::TooLarge => {
                worker.ended(&shared.id, &shared.metric_label(), Status::Failed);
                let notice = json!({
                    "error": "reply too large",
                    "detail": error.message(),
                    "limit": worker.config.max_payload,
                });
                send_done(shared, Status::Failed, &notice).await?;
                Err(error)
            }
            other => {
                worker.ended(&shared.id, &shared.metric_label(), status);
                other
            }
        }
    }
}

async fn send_done<T: Serialize + ?Sized>(shared: &Shared, status: Status, body: &T) -> Result<()> {
    let worker = &shared.worker;
    let mut message = Message::new(Kind::Done, shared.id.as_str());
    message.worker = Some(Cow::Borrowed(worker.worker_id.as_str()));
    message.status = Some(status);
    let (Some(lease), Some(value)) = (&shared.lease, &shared.key) else {
        return worker
            .publish_reply(&shared.reply_to, message, "reply", body)
            .await;
    };
    // Free the task's slot in the same step as the reply, and say so, so the creator need not.
    message.released = true;
    let bytes = worker.encode_reply(&message, "reply", body)?;
    let limit_key = worker.namespace.limit_key(&shared.task, value);
    let sent = worker
        .broker
        .release_and_publish(&limit_key, lease, &shared.reply_to, bytes)
        .await;
    if let Err(error) = sent {
        tracing::debug!(%error, "could not release the key lease with the reply; the creator will");
        message.released = false;
        return worker
            .publish_reply(&shared.reply_to, message, "reply", body)
            .await;
    }
    Ok(())
}

impl Drop for RunningTask {
    fn drop(&mut self) {
        if self.completed {
            return;
        }
        let shared = self.context.shared.clone();
        shared
            .worker
            .ended(&shared.id, &shared.metric_label(), Status::Failed);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let notice = json!({"error": "the worker dropped the task without completing it"});
                if let Err(error) = send_done(&shared, Status::Failed, &notice).await {
                    tracing::warn!(%error, "could not report a dropped task");
                }
            });
        }
    }
}

/// What a [`Worker::run`](crate::Worker::run) handler returns: the reply, or how the task failed.
pub type HandlerResult = std::result::Result<Value, TaskFailure>;

/// A handler's unsuccessful completion: `Error` or `Failed` with a JSON reply.
#[derive(Debug, Clone)]
pub struct TaskFailure {
    /// `Error` or `Failed` (a `Success` here is sent as given).
    pub status: Status,
    /// The reply the creator gets in [`Error::reply`].
    pub reply: Value,
}

impl TaskFailure {
    /// Complete with `Error`.
    pub fn error(reply: Value) -> Self {
        TaskFailure {
            status: Status::Error,
            reply,
        }
    }

    /// Complete with `Failed`.
    pub fn failed(reply: Value) -> Self {
        TaskFailure {
            status: Status::Failed,
            reply,
        }
    }
}

impl From<Error> for TaskFailure {
    /// A bgtask error inside a handler fails the task with `{"error": "<message>"}`.
    fn from(error: Error) -> Self {
        TaskFailure::failed(json!({ "error": error.to_string() }))
    }
}
