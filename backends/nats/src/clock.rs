//! The server's clock, as JetStream stamps messages: one reading shared by every caller that
//! asked before it began.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bgtask_core::{Error, ErrorKind, Result};
use tokio::sync::{mpsc, oneshot};

use crate::error::no_answer;
use crate::js::{Cas, Got, Js};

/// What one reading of the clock gave: the server's time (`None`: the stream is gone).
type Reading = std::result::Result<Option<u64>, Arc<Error>>;

/// The server's current time, read from a stream (the lease stream or the claim stream) for many
/// callers at once.
///
/// A reading writes an empty message on the clock subject and reads back the last one's server
/// timestamp: a time at which the server stored a message after the reading began. Callers that
/// ask while a reading is under way wait for the next one, which begins after they asked, so
/// every caller gets a time from after its own call began (and before it returns). Concurrent
/// operations that need the time (a claim that meets a record, a release, a count) thus share
/// one reading instead of two requests each.
#[derive(Debug, Clone)]
pub(crate) struct Clock {
    requests: mpsc::UnboundedSender<oneshot::Sender<Reading>>,
    /// The latest reading (0: none yet): a server time in the past.
    latest: Arc<AtomicU64>,
}

impl Clock {
    /// Read the clock on `subject` of the stream of `js`.
    pub(crate) fn start(js: Js, subject: String, op_timeout: Duration) -> Clock {
        let (requests, rx) = mpsc::unbounded_channel();
        let latest = Arc::new(AtomicU64::new(0));
        tokio::spawn(run_clock(js, subject, op_timeout, rx, latest.clone()));
        Clock { requests, latest }
    }

    /// The latest server time read (0: none yet), without asking the server: a time that has
    /// passed.
    pub(crate) fn latest(&self) -> u64 {
        self.latest.load(Ordering::SeqCst)
    }

    /// A server time from after this call began; `None` when the stream is gone.
    pub(crate) async fn now(&self) -> Result<Option<u64>> {
        let (tx, rx) = oneshot::channel();
        let stopped = || {
            Error::new(
                ErrorKind::Unavailable,
                "nats: the JetStream clock reader stopped",
            )
        };
        self.requests.send(tx).map_err(|_| stopped())?;
        match rx.await {
            Ok(Ok(now)) => Ok(now),
            Ok(Err(shared)) => {
                let error = Error::new(shared.kind(), shared.message());
                Err(match std::error::Error::source(&*shared) {
                    Some(_) => error.with_source(SharedCause(shared)),
                    None => error,
                })
            }
            Err(_) => Err(stopped()),
        }
    }
}

/// The clock's loop: one reading for every caller that asked before it began; ends with the
/// broker.
async fn run_clock(
    js: Js,
    subject: String,
    op_timeout: Duration,
    mut requests: mpsc::UnboundedReceiver<oneshot::Sender<Reading>>,
    latest: Arc<AtomicU64>,
) {
    while let Some(first) = requests.recv().await {
        let mut waiting = vec![first];
        while let Ok(more) = requests.try_recv() {
            waiting.push(more);
        }
        let reading = match tokio::time::timeout(op_timeout, read_clock(&js, &subject)).await {
            Ok(Ok(now)) => {
                if let Some(now) = now {
                    latest.fetch_max(now, Ordering::SeqCst);
                }
                Ok(now)
            }
            Ok(Err(e)) => Err(Arc::new(e)),
            Err(_) => Err(Arc::new(no_answer("a clock reading", op_timeout))),
        };
        for waiter in waiting {
            let _ = waiter.send(reading.clone());
        }
    }
}

/// Write on the clock subject, then read its last message's timestamp (ours or a later one).
async fn read_clock(js: &Js, subject: &str) -> Result<Option<u64>> {
    loop {
        match js.touch(subject).await? {
            Cas::Stored(_) => {}
            Cas::NoStream => return Ok(None),
            Cas::Conflict | Cas::TtlRefused => {
                return Err(Error::new(
                    ErrorKind::Protocol,
                    format!(
                        "nats: JetStream refused a write to the clock subject of stream {}",
                        js.stream()
                    ),
                ))
            }
        }
        match js.last(subject).await? {
            Got::Message(stored) => return Ok(Some(stored.time_nanos)),
            // Purged in between: write again.
            Got::Empty => continue,
            Got::NoStream => return Ok(None),
        }
    }
}

/// The cause of an error that several callers of one clock reading share.
#[derive(Debug)]
struct SharedCause(Arc<Error>);

impl fmt::Display for SharedCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match std::error::Error::source(&*self.0) {
            Some(cause) => fmt::Display::fmt(cause, f),
            None => f.write_str(self.0.message()),
        }
    }
}

impl std::error::Error for SharedCause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&*self.0).and_then(std::error::Error::source)
    }
}
