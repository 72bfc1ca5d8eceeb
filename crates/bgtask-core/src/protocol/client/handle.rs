//! What a submit hands back: [`TaskHandle`] and [`BroadcastHandle`], and the guard that frees
//! a task's pending entry and key lease exactly once.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::value::RawValue;
use serde_json::Value;
use tokio::time::{Instant, Sleep};

use super::{ClientEvent, Inner, Slot, FINISH_GRACE};
use crate::broker::LeaseId;
use crate::error::{Error, ErrorKind, Result};
use crate::metrics;
use crate::names::id_to_hex;
use crate::protocol::admission::KeyLease;
use crate::protocol::Reply;

/// Owns a submitted task's pending entry and key lease, and frees both exactly once: when the
/// task ends, or when its handle is dropped. A worker that completes the task frees the lease
/// with its reply (`released`); the guard releases it otherwise. The lease is named by the
/// task's id (see [`KeyAdmission`](crate::protocol::admission::KeyAdmission)), so the guard
/// keeps only its key.
pub(super) struct TaskGuard {
    pub(super) client: Arc<Inner>,
    pub(super) id: u128,
    /// The task name, shared with its offer (for the metrics).
    pub(super) task: Arc<str>,
    /// When the task was published, for the reply histogram.
    pub(super) submitted: Instant,
    pub(super) deadline: Instant,
    /// The limit key of the task's lease, if it has one.
    pub(super) lease_key: Option<String>,
    pub(super) slot: Arc<Slot>,
    pub(super) armed: bool,
}

impl TaskGuard {
    /// The task ends here: forget its pending entry and count it out of flight.
    fn disarm(&mut self) {
        self.armed = false;
        self.client.pending().remove(&self.id);
        metrics::in_flight(&self.task, -1.0);
    }

    /// The lease still to release: none if the worker released it with its reply.
    fn take_lease(&mut self) -> Option<KeyLease> {
        let key = self.lease_key.take();
        if self.slot.released.load(Ordering::Relaxed) {
            return None;
        }
        Some((key?, LeaseId::new(id_to_hex(self.id))))
    }

    /// Forget the pending entry and release the key lease: awaited until the task's deadline
    /// (at least [`FINISH_GRACE`]), then left to finish in the background, so a slow broker
    /// never makes a task call wait past its deadline.
    async fn finish(&mut self) {
        if !self.armed {
            return;
        }
        self.disarm();
        let lease = self.take_lease();
        if let Some(release) = self.client.release_in_background(lease) {
            let wait = self
                .deadline
                .saturating_duration_since(Instant::now())
                .max(FINISH_GRACE);
            let _ = tokio::time::timeout(wait, release).await;
        }
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.disarm();
        let lease = self.take_lease();
        self.client.release_in_background(lease);
    }
}

/// What a submit leaves for its handle.
pub(super) struct Submitted {
    /// Also holds the task's slot, where its progress and reply arrive.
    pub(super) guard: TaskGuard,
    /// The task's one timer, armed for its deadline.
    pub(super) sleep: Pin<Box<Sleep>>,
    pub(super) timeout: Duration,
}

impl Submitted {
    /// Wait for the slot to change or the deadline. Returns false at the deadline.
    async fn wait(&mut self) -> bool {
        tokio::select! {
            _ = self.guard.slot.changed.notified() => true,
            _ = &mut self.sleep => false,
        }
    }
}

/// A submitted task: its id, its progress, and its reply.
///
/// Dropping the handle abandons the task: a later reply is dropped and the key lease released.
pub struct TaskHandle {
    pub(super) id: String,
    pub(super) outcome: Option<Result<Reply>>,
    pub(super) submitted: Submitted,
}

impl std::fmt::Debug for TaskHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskHandle")
            .field("id", &self.id)
            .field("task", &self.submitted.guard.task)
            .finish_non_exhaustive()
    }
}

impl TaskHandle {
    /// The task's id, known as soon as it is submitted.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// When the task times out.
    pub fn deadline(&self) -> Instant {
        self.submitted.guard.deadline
    }

    /// The next progress value, in the order the worker sent them; `None` once the task has
    /// ended (its outcome is then ready for [`reply`](Self::reply)).
    pub async fn progress(&mut self) -> Option<Value> {
        self.next_progress()
            .await
            .map(|raw| serde_json::from_str(raw.get()).unwrap_or(Value::Null))
    }

    /// Like [`progress`](Self::progress), without parsing the JSON.
    pub async fn next_progress(&mut self) -> Option<Box<RawValue>> {
        if self.outcome.is_some() {
            return None;
        }
        let outcome = loop {
            // Past the deadline, nothing that arrives counts: a reply racing the timeout loses.
            let expired = Instant::now() >= self.submitted.guard.deadline;
            if !expired {
                let mut state = self.submitted.guard.slot.lock();
                if let Some(progress) = state.progress.pop_front() {
                    return Some(progress);
                }
                if let Some(reply) = state.replies.pop_front() {
                    break reply;
                }
                if state.closed {
                    break Err(Error::closed("the client was shut down"));
                }
            }
            if expired || !self.submitted.wait().await {
                // Stop any worker still on it, without making this call wait on the broker.
                let guard = &self.submitted.guard;
                if let Some(abandon) = guard.client.abandon(guard.id) {
                    tokio::spawn(abandon);
                }
                break Err(self.timed_out());
            }
        };
        self.end(outcome).await;
        None
    }

    /// Await the reply. Progress not yet read is skipped.
    ///
    /// Errors: [`ErrorKind::TimedOut`] when no reply came before the deadline;
    /// [`ErrorKind::TaskError`] / [`ErrorKind::TaskFailed`] when the worker said so, with its
    /// reply in [`Error::reply`]; [`ErrorKind::Cancelled`] after [`cancel`](Self::cancel).
    pub async fn reply(mut self) -> Result<Reply> {
        while self.next_progress().await.is_some() {}
        self.outcome
            .take()
            .unwrap_or_else(|| Err(Error::closed("the task has no outcome")))
    }

    /// Cancel the task: no worker accepts it from now on, a worker running it is told (see
    /// [`TaskContext::cancelled`](crate::TaskContext::cancelled)), and the reply is
    /// [`ErrorKind::Cancelled`]. Returns `false` if the task had already ended.
    pub async fn cancel(&mut self) -> bool {
        if self.outcome.is_some() {
            return false;
        }
        let guard = &self.submitted.guard;
        let Some(abandon) = guard.client.abandon(guard.id) else {
            return false;
        };
        abandon.await;
        self.end(Err(Error::new(
            ErrorKind::Cancelled,
            "the task was cancelled",
        )))
        .await;
        true
    }

    fn timed_out(&self) -> Error {
        let id = self.id.clone();
        self.submitted
            .guard
            .client
            .emit(|| ClientEvent::TimedOut { id });
        Error::new(
            ErrorKind::TimedOut,
            format!(
                "task {} ({:?}) got no reply within {} ms",
                self.id,
                self.submitted.guard.task,
                self.submitted.timeout.as_millis()
            ),
        )
    }

    async fn end(&mut self, outcome: Result<Reply>) {
        let guard = &self.submitted.guard;
        let ended = outcome.as_ref().map(|_| ()).map_err(Error::kind);
        metrics::completed(&guard.task, ended, guard.submitted.elapsed());
        self.submitted.guard.finish().await;
        self.outcome = Some(outcome);
    }
}

/// The replies of a broadcast task, one per worker that ran it, until the task's timeout.
pub struct BroadcastHandle {
    pub(super) id: String,
    pub(super) submitted: Submitted,
}

impl std::fmt::Debug for BroadcastHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BroadcastHandle")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl BroadcastHandle {
    /// The task's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The next worker's reply (an error for `Error`/`Failed`), or `None` at the deadline.
    /// Progress of broadcast tasks is not forwarded.
    pub async fn next_reply(&mut self) -> Option<Result<Reply>> {
        loop {
            {
                let mut state = self.submitted.guard.slot.lock();
                state.progress.clear();
                if let Some(reply) = state.replies.pop_front() {
                    return Some(reply);
                }
                if state.closed {
                    break;
                }
            }
            if !self.submitted.wait().await {
                break;
            }
        }
        self.submitted.guard.finish().await;
        None
    }

    /// Every reply until the deadline.
    pub async fn collect(mut self) -> Vec<Result<Reply>> {
        let mut replies = Vec::new();
        while let Some(reply) = self.next_reply().await {
            replies.push(reply);
        }
        replies
    }
}
