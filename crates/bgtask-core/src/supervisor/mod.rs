//! The subscription supervisor, for backends whose subscriptions share one server connection
//! (Redis pub/sub, PostgreSQL LISTEN/NOTIFY): a task that owns the connection, proves it alive,
//! replaces it forever when it is lost, and subscribes every live channel again. A backend
//! supplies only its transport ([`Transport`], [`Connection`]); [`Supervisor::start`] does the
//! rest:
//!
//! - a registry of keys (what the server subscribes: a Redis channel, a PostgreSQL identifier),
//!   each with the channel names that map to it and their local subscribers, each a
//!   byte-and-message-bounded buffer ([`crate::gap`]);
//! - [`SupervisorHandle::subscribe`] returns once the server confirmed the key; the first
//!   subscriber of a key subscribes it, dropping the last one unsubscribes it;
//! - a liveness round trip every [`liveness_interval`](ConnectionSettings::liveness_interval),
//!   answered within [`op_timeout`](ConnectionSettings::op_timeout), else the connection is lost;
//! - once lost: every subscriber that was live is owed a gap, [`Transport::lost`] runs, and the
//!   supervisor reconnects with [`reconnect_delay`](crate::backoff::reconnect_delay) (an attempt starts at most every step of
//!   the backoff), subscribes every live key again in batches, counts
//!   [`broker_reconnected`](crate::metrics::broker_reconnected), and only then pays the gaps and
//!   answers the subscribers that waited meanwhile;
//! - it stops when the last [`SupervisorHandle`] and the last subscription are gone, or at once
//!   with [`SupervisorHandle::close`]; every subscription stream then ends and new ones fail
//!   with [`ErrorKind::Closed`].

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::timeout;

use crate::connection::ConnectionSettings;
use crate::error::{Error, ErrorKind, Result};
use crate::gap::{self, GapReceiver, GapSender, Weigh};

mod task;
#[cfg(test)]
mod tests;

pub use task::Supervisor;

/// How many keys one resubscription command carries after a reconnect, so that one command's
/// confirmations stay well within `op_timeout`.
pub const RESUBSCRIBE_BATCH: usize = 256;

/// What a backend brings to the supervisor: how to open a connection, and what its messages
/// mean.
pub trait Transport: Send + Sync + 'static {
    /// One live connection.
    type Connection: Connection<Message = Self::Message>;
    /// What the connection yields (a Redis message, a PostgreSQL notification).
    type Message: Send;
    /// What a subscription's buffer holds.
    type Item: Weigh + Clone + Send + 'static;

    /// The backend's short name, in errors, logs and the reconnect metric (`"redis"`).
    const NAME: &'static str;
    /// What the connection is called in errors and logs (`"pub/sub connection"`).
    const CONNECTION: &'static str;
    /// Whether a new subscriber of a key that is subscribed already still waits for a round
    /// trip on the connection (PostgreSQL: so that notifications sent before it subscribed
    /// have gone by). When false, it is live at once.
    const ROUND_TRIP_WHEN_SUBSCRIBED: bool;

    /// Open a connection (the supervisor bounds it by `connect_timeout`).
    fn connect(&self) -> impl Future<Output = Result<Self::Connection>> + Send;

    /// Hand `message` to the local subscribers it is for.
    fn dispatch(&self, message: Self::Message, subscribers: &mut Subscribers<'_, Self::Item>);

    /// The item that tells a reader it may have missed messages.
    fn gap() -> Self::Item;

    /// The connection was found lost (before reconnecting): e.g. drop other connections to the
    /// same server, which most likely went the same way.
    fn lost(&self);
}

/// One live connection of a [`Transport`]. The supervisor bounds every call but
/// [`recv`](Connection::recv) by `op_timeout`.
pub trait Connection: Send + 'static {
    /// What the connection yields.
    type Message: Send;

    /// The next message, or why the connection is lost. Must be cancel-safe: the supervisor
    /// drops it when a command or a tick comes first.
    fn recv(&mut self) -> impl Future<Output = std::result::Result<Self::Message, String>> + Send;

    /// Subscribe `key` (`subscribed`: it is subscribed already, make a round trip instead);
    /// returns once the server answered.
    fn subscribe(
        &mut self,
        key: &str,
        subscribed: bool,
    ) -> impl Future<Output = std::result::Result<(), Failure>> + Send;

    /// Subscribe every key of `keys` (a batch after a reconnect); returns once the server
    /// confirmed them all.
    fn subscribe_all(
        &mut self,
        keys: &[String],
    ) -> impl Future<Output = std::result::Result<(), String>> + Send;

    /// Unsubscribe `key`.
    fn unsubscribe(
        &mut self,
        key: &str,
    ) -> impl Future<Output = std::result::Result<(), Failure>> + Send;

    /// A round trip that proves the connection alive.
    fn ping(&mut self) -> impl Future<Output = std::result::Result<(), String>> + Send;

    /// A message that arrived while a command waited for its answer (delivered before the
    /// subscriber that waited becomes live), if the connection keeps such messages apart.
    fn buffered(&mut self) -> Option<Self::Message>;
}

/// How a subscription command failed.
#[derive(Debug)]
pub enum Failure {
    /// The server refused it (the error the subscriber gets); the connection is fine.
    Refused(Error),
    /// The connection is broken or silent: why.
    Lost(String),
}

/// A request to the supervisor.
enum Command {
    /// Make sure `key` is subscribed on the server (or make a round trip), then make
    /// subscriber `id` live and answer.
    Ensure {
        key: String,
        id: u64,
        reply: oneshot::Sender<Result<()>>,
    },
    /// The last local subscriber of `key` left: unsubscribe unless a new one arrived since.
    Release { key: String },
}

/// The local subscribers of every key, shared by the handles, the subscription guards and the
/// supervisor.
struct Registry<I> {
    keys: HashMap<String, Key<I>>,
    next_id: u64,
    /// The supervisor has stopped (closed or dropped): no new subscriptions.
    closed: bool,
}

struct Key<I> {
    /// Channel name → its subscribers. More than one name only where names share a key (a
    /// PostgreSQL identifier's hash collision).
    names: HashMap<String, Vec<Subscriber<I>>>,
    /// Subscribed on the current connection (confirmed).
    active: bool,
}

impl<I: Weigh> Key<I> {
    fn subscribers(&mut self) -> impl Iterator<Item = &mut Subscriber<I>> {
        self.names.values_mut().flatten()
    }

    fn has(&self, id: u64) -> bool {
        self.names.values().flatten().any(|s| s.id == id)
    }

    fn make_live(&mut self, id: u64) {
        if let Some(subscriber) = self.subscribers().find(|s| s.id == id) {
            subscriber.live = true;
        }
    }
}

struct Subscriber<I> {
    id: u64,
    /// Owes a gap after a lost message (slow reader) or a reconnect.
    tx: GapSender<I>,
    /// Receives messages. A new subscriber is live once its key is confirmed (and, where the
    /// transport asks for it, after a round trip): what was sent before must not reach it.
    live: bool,
}

/// The registry as [`Transport::dispatch`] sees it.
pub struct Subscribers<'a, I> {
    registry: &'a mut Registry<I>,
    gap: fn() -> I,
}

impl<I: Weigh + Clone> Subscribers<'_, I> {
    /// Whether anybody here subscribes `key`.
    pub fn contains(&self, key: &str) -> bool {
        self.registry.keys.contains_key(key)
    }

    /// For each channel name of `key`, deliver the item `make` returns for that name (none:
    /// skip it) to the name's live subscribers. Returns how many names got an item, or `None`
    /// when nobody here subscribes `key` (a message still in flight after the last one left).
    pub fn deliver(&mut self, key: &str, mut make: impl FnMut(&str) -> Option<I>) -> Option<usize> {
        let entry = self.registry.keys.get_mut(key)?;
        let mut names = 0;
        for (name, subscribers) in &mut entry.names {
            let Some(item) = make(name) else { continue };
            names += 1;
            for subscriber in subscribers.iter_mut().filter(|s| s.live) {
                // Closed: the subscription is being dropped; its guard removes this entry.
                subscriber.tx.deliver(item.clone(), self.gap);
            }
        }
        Some(names)
    }
}

struct Shared<I> {
    registry: Mutex<Registry<I>>,
}

impl<I> Shared<I> {
    fn registry(&self) -> MutexGuard<'_, Registry<I>> {
        // Every update is a single insert, remove or flag change, so a poisoned lock still
        // holds consistent data.
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Stops the supervisor when the last handle and the last subscription are gone, or at once
/// with [`SupervisorHandle::close`].
struct Lifeline {
    stop: watch::Sender<bool>,
}

/// A broker's handle on its supervisor. The supervisor runs as long as this handle or any
/// subscription exists, or until [`close`](Self::close).
pub struct SupervisorHandle<T: Transport> {
    shared: Arc<Shared<T::Item>>,
    commands: mpsc::UnboundedSender<Command>,
    settings: ConnectionSettings,
    lifeline: Arc<Lifeline>,
}

impl<T: Transport> std::fmt::Debug for SupervisorHandle<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SupervisorHandle")
            .field("backend", &T::NAME)
            .field("channels", &self.channels())
            .finish_non_exhaustive()
    }
}

/// The error of a subscription on a stopped supervisor.
fn closed<T: Transport>() -> Error {
    Error::new(
        ErrorKind::Closed,
        format!("{} broker is closed; cannot subscribe", T::NAME),
    )
}

impl<T: Transport> SupervisorHandle<T> {
    /// Stop the supervisor now: every subscription stream ends and new subscriptions fail.
    pub fn close(&self) {
        self.lifeline.stop.send_replace(true);
    }

    /// The number of channel names with local subscribers.
    pub fn channels(&self) -> usize {
        let registry = self.shared.registry();
        registry.keys.values().map(|k| k.names.len()).sum()
    }

    /// Subscribe to channel `name`, which the server knows as `key`; returns once the server
    /// confirmed `key` (and made the round trip the transport asks for), within `op_timeout`.
    pub async fn subscribe(&self, key: String, name: &str) -> Result<Subscribed<T::Item>> {
        let (tx, rx) = gap::channel(
            self.settings.subscription_buffer,
            self.settings.subscription_buffer_bytes,
        );
        let (id, live) = {
            let mut registry = self.shared.registry();
            if registry.closed {
                return Err(closed::<T>());
            }
            registry.next_id += 1;
            let id = registry.next_id;
            let entry = registry.keys.entry(key.clone()).or_insert_with(|| Key {
                names: HashMap::new(),
                active: false,
            });
            // Live at once on a confirmed key, unless the transport wants a round trip.
            let live = entry.active && !T::ROUND_TRIP_WHEN_SUBSCRIBED;
            let subscriber = Subscriber { id, tx, live };
            entry
                .names
                .entry(name.to_owned())
                .or_default()
                .push(subscriber);
            (id, live)
        };
        // From here on, dropping the guard (on error or with the stream) removes the subscriber.
        let guard = Unsubscribe {
            _lifeline: self.lifeline.clone(),
            shared: self.shared.clone(),
            commands: self.commands.clone(),
            key: key.clone(),
            name: name.to_owned(),
            id,
        };
        if !live {
            let (reply, answer) = oneshot::channel();
            self.commands
                .send(Command::Ensure { key, id, reply })
                .map_err(|_| closed::<T>())?;
            let bound = self.settings.op_timeout;
            match timeout(bound, answer).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => return Err(e),
                Ok(Err(_)) => return Err(closed::<T>()),
                Err(_) => {
                    return Err(Error::new(
                        ErrorKind::Unavailable,
                        format!("{} did not answer subscribe within {bound:?}", T::NAME),
                    ))
                }
            }
        }
        Ok(Subscribed { rx, guard })
    }
}

/// One subscription: its buffer, and the guard that unsubscribes when it is dropped.
pub struct Subscribed<I> {
    rx: GapReceiver<I>,
    /// Unsubscribes when dropped.
    guard: Unsubscribe<I>,
}

impl<I> std::fmt::Debug for Subscribed<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscribed")
            .field("channel", &self.guard.name)
            .finish_non_exhaustive()
    }
}

impl<I: Weigh> futures::Stream for Subscribed<I> {
    type Item = I;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<I>> {
        self.get_mut().rx.poll_recv(cx)
    }
}

/// Removes a subscriber when its subscription is dropped, and asks the supervisor to
/// unsubscribe when it was its key's last one.
struct Unsubscribe<I> {
    _lifeline: Arc<Lifeline>,
    shared: Arc<Shared<I>>,
    commands: mpsc::UnboundedSender<Command>,
    key: String,
    name: String,
    id: u64,
}

impl<I> Drop for Unsubscribe<I> {
    fn drop(&mut self) {
        let mut registry = self.shared.registry();
        let Some(entry) = registry.keys.get_mut(&self.key) else {
            return;
        };
        if let Some(subscribers) = entry.names.get_mut(&self.name) {
            subscribers.retain(|s| s.id != self.id);
            if subscribers.is_empty() {
                entry.names.remove(&self.name);
            }
        }
        if entry.names.is_empty() {
            // The entry stays (still subscribed on the server) until the supervisor handles
            // the release, so a new subscriber meanwhile needs no round trip.
            let _ = self.commands.send(Command::Release {
                key: std::mem::take(&mut self.key),
            });
        }
    }
}
