//! [`DueQueue`]: one background timer for many short deadlines (offer timeouts on the creator,
//! acceptance notices on the worker), instead of a spawned sleep per task.
//!
//! It is on the path of every task, so a push costs a lock and a heap insert, and wakes the timer
//! task only when the new item is due before every other; the timer task fires everything due
//! within [`SLACK`] at once, so under load it wakes at most a few hundred times a second,
//! whatever the task rate.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How early an item may fire, so that items due close together fire in one wake-up.
const SLACK: Duration = Duration::from_millis(5);

/// Items handed to a callback when they fall due. The timer task ends when `stop` is
/// cancelled.
pub(crate) struct DueQueue<T> {
    shared: Arc<Shared<T>>,
}

struct Shared<T> {
    heap: Mutex<Heap<T>>,
    /// Wakes the timer task: an item is due earlier than it sleeps for.
    earlier: Notify,
}

struct Heap<T> {
    items: BinaryHeap<Reverse<Entry<T>>>,
    seq: u64,
}

/// An item with its due time, ordered by due time (then arrival) only.
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

impl<T> Shared<T> {
    fn heap(&self) -> MutexGuard<'_, Heap<T>> {
        self.heap.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<T: Send + 'static> DueQueue<T> {
    /// Start the timer task: `on_due` runs (on that task) for each item at its due time (up to
    /// [`SLACK`] early), until `stop` is cancelled.
    pub(crate) fn spawn<F>(stop: CancellationToken, mut on_due: F) -> DueQueue<T>
    where
        F: FnMut(T) + Send + 'static,
    {
        let shared = Arc::new(Shared {
            heap: Mutex::new(Heap {
                items: BinaryHeap::new(),
                seq: 0,
            }),
            earlier: Notify::new(),
        });
        let timer = shared.clone();
        tokio::spawn(async move {
            let mut due = Vec::new();
            loop {
                let next = {
                    let mut heap = timer.heap();
                    let horizon = Instant::now() + SLACK;
                    while heap.items.peek().is_some_and(|Reverse(e)| e.0 <= horizon) {
                        if let Some(Reverse(Entry(_, _, item))) = heap.items.pop() {
                            due.push(item);
                        }
                    }
                    heap.items.peek().map(|Reverse(e)| e.0)
                };
                // Outside the lock: the callback may push.
                for item in due.drain(..) {
                    on_due(item);
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = timer.earlier.notified() => {}
                    _ = sleep_until(next) => {}
                }
            }
        });
        DueQueue { shared }
    }

    /// Hand `item` to the callback at `due`.
    pub(crate) fn push(&self, due: Instant, item: T) {
        let wake = {
            let mut heap = self.shared.heap();
            heap.seq += 1;
            let seq = heap.seq;
            let earliest = heap.items.peek().map(|Reverse(e)| e.0);
            heap.items.push(Reverse(Entry(due, seq, item)));
            earliest.is_none_or(|earliest| due < earliest)
        };
        if wake {
            self.shared.earlier.notify_one();
        }
    }
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}
