//! [`DueQueue`]: one background timer for many short deadlines (offer timeouts on the creator,
//! acceptance notices on the worker), instead of a spawned sleep per task.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Items handed to a callback when they fall due. Dropping every sender ends the timer task.
pub(crate) struct DueQueue<T> {
    tx: mpsc::UnboundedSender<(Instant, T)>,
}

impl<T> Clone for DueQueue<T> {
    fn clone(&self) -> Self {
        DueQueue {
            tx: self.tx.clone(),
        }
    }
}

/// An item with its due time, ordered by due time only.
struct Entry<T>(Instant, u64, T);

impl<T> PartialEq for Entry<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.0, self.1) == (other.0, other.1)
    }
}
impl<T> Eq for Entry<T> {}
impl<T> PartialOrd for Entry<T> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Entry<T> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.0, self.1).cmp(&(other.0, other.1))
    }
}

impl<T: Send + 'static> DueQueue<T> {
    /// Start the timer task: `on_due` runs (on that task) for each item at its due time, until
    /// `stop` is cancelled or every sender is dropped.
    pub(crate) fn spawn<F>(stop: CancellationToken, mut on_due: F) -> DueQueue<T>
    where
        F: FnMut(T) + Send + 'static,
    {
        let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, T)>();
        tokio::spawn(async move {
            let mut heap: BinaryHeap<Reverse<Entry<T>>> = BinaryHeap::new();
            let mut seq = 0u64;
            loop {
                // Everything already due, without touching the timer.
                let now = Instant::now();
                while heap.peek().is_some_and(|Reverse(e)| e.0 <= now) {
                    if let Some(Reverse(Entry(_, _, item))) = heap.pop() {
                        on_due(item);
                    }
                }
                let next = heap.peek().map(|Reverse(e)| e.0);
                let received = tokio::select! {
                    _ = stop.cancelled() => return,
                    received = rx.recv() => received,
                    _ = sleep_until(next) => continue,
                };
                let Some((due, item)) = received else { return };
                seq += 1;
                heap.push(Reverse(Entry(due, seq, item)));
            }
        });
        DueQueue { tx }
    }

    /// Hand `item` to the callback at `due`.
    pub(crate) fn push(&self, due: Instant, item: T) {
        let _ = self.tx.send((due, item));
    }
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}
