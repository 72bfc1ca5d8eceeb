//! [`Worker::run`] and [`Worker::serve`]: the one serving loop (the CLI worker and the bench run
//! on it too): take what there is room for, decline offers past the concurrency, run each
//! handler in its task's span, and drain at shutdown.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::SelectAll;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::Instrument;

use super::{log_join, HandlerResult, Inner, RunningTask, TaskContext, Worker};
use crate::error::Result;
use crate::protocol::envelope::Status;
use crate::protocol::presence::Event;

impl Worker {
    /// Serve tasks with `handler`, at most `concurrency` at a time, until shut down. Every task
    /// offered is accepted while there is capacity and declined (`busy`) when there is none, so
    /// creators offer it to another worker; broadcast tasks wait for a free slot. The handler's
    /// result completes the task.
    ///
    /// At shutdown: stop taking tasks, wait up to `shutdown_grace` for running ones, then cancel
    /// them; a task whose handler never returns is completed as `Failed`. A handler that panics
    /// completes its task as `Failed` and the worker goes on.
    pub async fn run<F, Fut>(self, concurrency: usize, handler: F) -> Result<()>
    where
        F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        self.serve(concurrency, handler).await
    }

    /// [`run`](Self::run) with a handler of any [`Outcome`]: a [`HandlerResult`], or a
    /// `(Status, reply)` pair whose reply is any `Serialize` type (raw JSON passes through
    /// byte for byte).
    pub async fn serve<F, Fut, O>(mut self, concurrency: usize, handler: F) -> Result<()>
    where
        F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = O> + Send + 'static,
        O: Outcome,
    {
        let concurrency = concurrency.max(1);
        self.inner.concurrency.store(concurrency, Ordering::Relaxed);
        self.inner.beat_now.notify_one();
        let handler = Arc::new(handler);
        let permits = Arc::new(Semaphore::new(concurrency));
        // Tasks taken and whose handler has not returned; offers past `concurrency` are declined.
        let taken = Arc::new(AtomicUsize::new(0));
        let mut running = JoinSet::new();
        while let Some(mut task) = self.next_task().await {
            while let Some(joined) = running.try_join_next() {
                log_join(joined);
            }
            if task.is_offer() && taken.load(Ordering::Relaxed) >= concurrency {
                task.settle("busy");
                continue;
            }
            taken.fetch_add(1, Ordering::Relaxed);
            let slot = Taken(taken.clone(), self.inner.clone());
            let (handler, permits) = (handler.clone(), permits.clone());
            running.spawn(async move {
                let _slot = slot;
                // Offers are accepted before waiting, so the creator's offer is answered.
                let task = match task.accept().await {
                    Ok(Some(task)) => task,
                    Ok(None) => return,
                    Err(error) => {
                        tracing::warn!(%error, "could not accept a task");
                        return;
                    }
                };
                let span = task.span();
                async move {
                    let Ok(_permit) = permits.acquire_owned().await else {
                        return;
                    };
                    let outcome = handler(task.context()).await;
                    drop(_slot);
                    if let Err(error) = outcome.complete(task).await {
                        tracing::warn!(%error, "could not complete a task");
                    }
                }
                .instrument(span)
                .await
            });
        }
        // Stop receiving tasks, say so, then drain.
        self.tasks = SelectAll::new();
        let record = self.inner.record();
        let leave = self.inner.announcer.announce(Event::Leave, &record);
        if let Ok(Err(error)) = tokio::time::timeout(Duration::from_secs(1), leave).await {
            tracing::debug!(%error, "could not announce the worker's leave; its presence expires");
        }
        let grace = self.inner.config.shutdown_grace;
        let drained = tokio::time::timeout(grace, async {
            while let Some(joined) = running.join_next().await {
                log_join(joined);
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                tasks = running.len(),
                "tasks still running after the shutdown grace period; cancelling them"
            );
            for held in self.inner.running().values() {
                held.cancel.cancel();
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                while let Some(joined) = running.join_next().await {
                    log_join(joined);
                }
            })
            .await;
            // Whatever is left is aborted; each dropped task completes as Failed.
            running.shutdown().await;
        }
        Ok(())
    }
}

/// One task taken by [`Worker::serve`]: gives its place back when its handler returns.
struct Taken(Arc<AtomicUsize>, Arc<Inner>);

impl Drop for Taken {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
        self.1.slot_freed();
    }
}

/// How a [`Worker::serve`] handler's result completes its task.
pub trait Outcome: Send + 'static {
    /// Complete `task` with this outcome.
    fn complete(self, task: RunningTask) -> BoxFuture<'static, Result<()>>;
}

impl Outcome for HandlerResult {
    fn complete(self, task: RunningTask) -> BoxFuture<'static, Result<()>> {
        Box::pin(task.finish(self))
    }
}

impl<R: Serialize + Send + Sync + 'static> Outcome for (Status, R) {
    fn complete(self, task: RunningTask) -> BoxFuture<'static, Result<()>> {
        Box::pin(async move { task.complete(self.0, &self.1).await })
    }
}
