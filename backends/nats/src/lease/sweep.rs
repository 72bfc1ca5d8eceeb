//! The sweeper: deletes expired lease records on servers without per-message TTLs.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::Store;

/// How long after its longest lease should have ended a record is checked: covers the time
/// between reading the server's clock and the write.
const SWEEP_MARGIN: Duration = Duration::from_millis(500);

/// At most this many records are watched per broker; beyond, the stream's `max_age` removes
/// them.
const MAX_SWEEP: usize = 100_000;

/// Deletes the records this broker wrote once their leases are over, on servers that do not
/// expire messages by themselves (no per-message TTLs before 2.11). A record whose broker is
/// gone before that stays until the next operation on its key, or the stream's `max_age`.
#[derive(Debug)]
pub(super) struct Sweeper {
    requests: mpsc::UnboundedSender<(Instant, String)>,
}

impl Sweeper {
    pub(super) fn start(store: Arc<Store>, op_timeout: Duration) -> Sweeper {
        let (requests, rx) = mpsc::unbounded_channel();
        tokio::spawn(sweep(store, op_timeout, rx));
        Sweeper { requests }
    }

    /// Check `subject` once `left` (and a margin) has passed.
    pub(super) fn schedule(&self, subject: &str, left: Duration) {
        let at = Instant::now() + left.min(Duration::from_secs(400 * 24 * 3600)) + SWEEP_MARGIN;
        let _ = self.requests.send((at, subject.to_owned()));
    }
}

/// The sweeper's loop: one timer for the earliest record due; ends with the broker.
async fn sweep(
    store: Arc<Store>,
    op_timeout: Duration,
    mut requests: mpsc::UnboundedReceiver<(Instant, String)>,
) {
    // The latest time each watched record is due, and one queue entry per record (moved
    // later, lazily, when a newer request came in meanwhile).
    let mut due: HashMap<String, Instant> = HashMap::new();
    let mut queue: BinaryHeap<Reverse<(Instant, String)>> = BinaryHeap::new();
    loop {
        let next = queue.peek().map(|Reverse((at, _))| *at);
        tokio::select! {
            request = requests.recv() => match request {
                Some((at, subject)) => {
                    if let Some(known) = due.get_mut(&subject) {
                        *known = (*known).max(at);
                    } else if due.len() < MAX_SWEEP {
                        due.insert(subject.clone(), at);
                        queue.push(Reverse((at, subject)));
                    }
                }
                None => return,
            },
            _ = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                let Some(Reverse((at, subject))) = queue.pop() else { continue };
                match due.get(&subject) {
                    Some(&wanted) if wanted > at => {
                        queue.push(Reverse((wanted, subject)));
                        continue;
                    }
                    Some(_) => {}
                    None => continue,
                }
                due.remove(&subject);
                match tokio::time::timeout(op_timeout, store.sweep(&subject)).await {
                    Ok(Ok(None)) => {}
                    Ok(Ok(Some(left))) => {
                        let at = Instant::now() + left + SWEEP_MARGIN;
                        due.insert(subject.clone(), at);
                        queue.push(Reverse((at, subject)));
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, "nats: lease record sweep failed"),
                    Err(_) => tracing::debug!("nats: lease record sweep timed out"),
                }
            }
        }
    }
}
