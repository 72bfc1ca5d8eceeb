//! Subscriptions: one listener connection per broker, owned by a supervisor task that checks it
//! with a periodic round trip, replaces it forever with backoff, and LISTENs every live channel
//! again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bgtask_core::backoff::reconnect_delay;
use bgtask_core::gap::{self, GapSender, Weigh};
use bgtask_core::{Error, ErrorKind, Incoming, Result, Subscription};
use bytes::Bytes;
use futures::StreamExt;
use sqlx::postgres::{PgConnectOptions, PgListener, PgNotification, PgPoolOptions};
use tokio::sync::{mpsc, oneshot, watch, OnceCell};
use tokio::time::{timeout, MissedTickBehavior};

use crate::db::{Db, Fetched};
use crate::error::{closed, from_sqlx, no_answer};
use crate::wire::{self, Notice};

/// Settings of the supervisor.
pub(crate) struct ListenerSettings {
    /// Connection options of the listener connection (its own `application_name`).
    pub(crate) options: PgConnectOptions,
    pub(crate) schema: String,
    pub(crate) op_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) liveness_interval: Duration,
    pub(crate) max_backoff: Duration,
    pub(crate) buffer: usize,
    pub(crate) buffer_bytes: usize,
    pub(crate) secret: Option<String>,
}

/// A request to the supervisor.
enum Command {
    /// Make sure `ident` is LISTENed to on the server, make a round trip on the listener
    /// connection, deliver what arrived before its answer, then make subscriber `id` live
    /// and answer.
    Ensure {
        ident: String,
        id: u64,
        reply: oneshot::Sender<Result<()>>,
    },
    /// The last local subscriber of `ident` left: UNLISTEN unless a new one arrived since.
    Release { ident: String },
}

/// What a subscription's buffer holds.
enum Item {
    Message(Bytes),
    /// A message stored as a payload row, read when the subscriber gets to it (once per
    /// broker, however many local subscribers share the channel).
    Row(Arc<Row>),
    Gap,
}

impl Weigh for Item {
    /// A row's payload is read when the subscriber gets to it: it holds no payload bytes in
    /// the buffer.
    fn weight(&self) -> usize {
        match self {
            Item::Message(bytes) => bytes.len(),
            Item::Row(_) | Item::Gap => 0,
        }
    }
}

/// A payload row announced by a notification, read at most once per broker.
struct Row {
    id: String,
    channel: String,
    db: Arc<Db>,
    fetched: OnceCell<Fetched>,
}

impl Row {
    async fn fetch(&self) -> Fetched {
        self.fetched
            .get_or_init(|| self.db.fetch(&self.id, &self.channel))
            .await
            .clone()
    }
}

/// The local subscribers of every channel, by PostgreSQL identifier then by full name, shared
/// by the broker handles, the subscription guards and the supervisor.
#[derive(Default)]
struct Registry {
    idents: HashMap<String, Ident>,
    next_id: u64,
    /// The supervisor has stopped (the broker was closed or dropped): no new subscriptions.
    closed: bool,
}

#[derive(Default)]
struct Ident {
    /// Full channel name → its subscribers. More than one name only on a hash collision.
    names: HashMap<String, Vec<Subscriber>>,
    /// LISTENed to on the current connection (confirmed).
    active: bool,
}

impl Ident {
    fn subscribers(&mut self) -> impl Iterator<Item = &mut Subscriber> {
        self.names.values_mut().flatten()
    }

    fn subscribers_any(&self, id: u64) -> bool {
        self.names.values().flatten().any(|s| s.id == id)
    }

    fn make_live(&mut self, id: u64) {
        if let Some(subscriber) = self.subscribers().find(|s| s.id == id) {
            subscriber.live = true;
        }
    }
}

struct Subscriber {
    id: u64,
    /// Owes a `Gap` after a lost message (slow reader) or a reconnect.
    tx: GapSender<Item>,
    /// Receives notifications. A new subscriber is not live until the listener connection
    /// made a round trip after it subscribed: notifications published before then may still
    /// be on their way, and must not reach it.
    live: bool,
}

impl Subscriber {
    /// Deliver `item`, first paying any owed `Gap`; a full buffer loses it and owes a gap.
    /// (Closed: the subscription is being dropped; its guard removes this entry.)
    fn deliver(&mut self, item: Item) {
        self.tx.deliver(item, || Item::Gap);
    }
}

struct Shared {
    registry: Mutex<Registry>,
}

impl Shared {
    fn registry(&self) -> MutexGuard<'_, Registry> {
        // Every update is a single insert, remove or flag change, so a poisoned lock still
        // holds consistent data.
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Stops the supervisor when the last broker handle and the last subscription are gone, or at
/// once with [`ListenerHandle::close`].
struct Lifeline {
    stop: watch::Sender<bool>,
}

/// The broker's handle on its subscription machinery.
pub(crate) struct ListenerHandle {
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<Command>,
    schema: String,
    op_timeout: Duration,
    buffer: usize,
    buffer_bytes: usize,
    lifeline: Arc<Lifeline>,
}

impl ListenerHandle {
    /// Open the listener connection (reporting a failure) and start its supervisor.
    pub(crate) async fn start(settings: ListenerSettings, db: Arc<Db>) -> Result<Self> {
        let listener = open(&settings).await.map_err(|e| match e {
            Failure::Timeout => Error::new(
                ErrorKind::Unavailable,
                format!(
                    "postgres unavailable: no listener connection within {:?}",
                    settings.connect_timeout
                ),
            ),
            Failure::Sql(e) => from_sqlx("connect (listener)", e, settings.secret.as_deref()),
        })?;
        let shared = Arc::new(Shared {
            registry: Mutex::new(Registry::default()),
        });
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let (stop, stop_rx) = watch::channel(false);
        let handle = ListenerHandle {
            shared: shared.clone(),
            commands,
            schema: settings.schema.clone(),
            op_timeout: settings.op_timeout,
            buffer: settings.buffer,
            buffer_bytes: settings.buffer_bytes,
            lifeline: Arc::new(Lifeline { stop }),
        };
        let supervisor = Supervisor {
            shared,
            settings,
            db,
            commands: commands_rx,
            stop: stop_rx,
            waiting: Vec::new(),
        };
        tokio::spawn(supervisor.run(listener));
        Ok(handle)
    }

    /// Stop the supervisor now: every subscription stream ends and new subscriptions fail.
    pub(crate) fn close(&self) {
        self.lifeline.stop.send_replace(true);
    }

    /// The number of channels with local subscribers.
    pub(crate) fn channels(&self) -> usize {
        self.shared
            .registry()
            .idents
            .values()
            .map(|i| i.names.len())
            .sum()
    }

    /// Subscribe to `channel`; returns once the server confirmed the LISTEN and everything
    /// published before the call started has gone by.
    pub(crate) async fn subscribe(&self, channel: &str) -> Result<Subscription> {
        let ident = wire::channel_identifier(&self.schema, channel);
        let (tx, rx) = gap::channel(self.buffer, self.buffer_bytes);
        let id = {
            let mut registry = self.shared.registry();
            if registry.closed {
                return Err(closed("subscribe"));
            }
            registry.next_id += 1;
            let id = registry.next_id;
            let entry = registry.idents.entry(ident.clone()).or_default();
            entry
                .names
                .entry(channel.to_owned())
                .or_default()
                .push(Subscriber {
                    id,
                    tx,
                    live: false,
                });
            id
        };
        // From here on, dropping the guard (on error or with the stream) removes the subscriber.
        let guard = Unsubscribe {
            _lifeline: self.lifeline.clone(),
            shared: self.shared.clone(),
            commands: self.commands.clone(),
            ident: ident.clone(),
            channel: channel.to_owned(),
            id,
        };
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Ensure { ident, id, reply })
            .map_err(|_| closed("subscribe"))?;
        match timeout(self.op_timeout, answer).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => return Err(e),
            Ok(Err(_)) => return Err(closed("subscribe")),
            Err(_) => return Err(no_answer("subscribe", self.op_timeout)),
        }
        let stream = futures::stream::unfold((rx, guard), |(mut rx, guard)| async move {
            loop {
                let incoming = match rx.recv().await? {
                    Item::Message(bytes) => Incoming::Message(bytes),
                    Item::Gap => Incoming::Gap,
                    Item::Row(row) => match row.fetch().await {
                        Fetched::Message(bytes) => Incoming::Message(bytes),
                        Fetched::Missing => Incoming::Gap,
                        Fetched::NotMine => continue,
                    },
                };
                return Some((incoming, (rx, guard)));
            }
        });
        Ok(Subscription::new(channel, stream.boxed()))
    }
}

/// Removes a subscriber when its subscription is dropped, and asks the supervisor to UNLISTEN
/// when it was the identifier's last one.
struct Unsubscribe {
    _lifeline: Arc<Lifeline>,
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<Command>,
    ident: String,
    channel: String,
    id: u64,
}

impl Drop for Unsubscribe {
    fn drop(&mut self) {
        let mut registry = self.shared.registry();
        let Some(entry) = registry.idents.get_mut(&self.ident) else {
            return;
        };
        if let Some(subscribers) = entry.names.get_mut(&self.channel) {
            subscribers.retain(|s| s.id != self.id);
            if subscribers.is_empty() {
                entry.names.remove(&self.channel);
            }
        }
        if entry.names.is_empty() {
            // The entry stays (still LISTENed to on the server) until the supervisor handles
            // the release, so a new subscriber meanwhile needs no round trip.
            let _ = self.commands.send(Command::Release {
                ident: std::mem::take(&mut self.ident),
            });
        }
    }
}

/// How a listener operation failed.
enum Failure {
    Timeout,
    Sql(sqlx::Error),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Timeout => f.write_str("no answer in time"),
            Failure::Sql(e) => write!(f, "{e}"),
        }
    }
}

/// Open a listener connection within `connect_timeout`.
///
/// Each connection gets a pool of its own (`PgListener` needs one): when a lost listener is
/// dropped, sqlx spawns `UNLISTEN *` and a return to that pool, neither with a time bound
/// (sqlx-postgres `listener.rs`, `impl Drop for PgListener`); on a half-open connection that
/// task waits until the OS gives up on the socket, and with a shared pool it would hold the
/// slot the next listener needs. sqlx's own reconnection is turned off (`eager_reconnect`):
/// the supervisor replaces the whole listener instead.
async fn open(settings: &ListenerSettings) -> std::result::Result<PgListener, Failure> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .acquire_timeout(settings.connect_timeout)
        .idle_timeout(None)
        .max_lifetime(None)
        .test_before_acquire(false)
        .connect_lazy_with(settings.options.clone());
    let mut listener =
        match timeout(settings.connect_timeout, PgListener::connect_with(&pool)).await {
            Ok(Ok(listener)) => listener,
            Ok(Err(e)) => return Err(Failure::Sql(e)),
            Err(_) => return Err(Failure::Timeout),
        };
    listener.ignore_pool_close_event(true);
    listener.eager_reconnect(false);
    Ok(listener)
}

/// Why the connected phase ended.
enum End {
    /// The connection is lost or silent: reconnect.
    Lost(String),
    /// The broker was closed or dropped.
    Stop,
}

/// One event of the connected phase.
enum Event {
    Stop,
    Command(Option<Command>),
    Tick,
    Notification(std::result::Result<Option<PgNotification>, sqlx::Error>),
}

struct Supervisor {
    shared: Arc<Shared>,
    settings: ListenerSettings,
    db: Arc<Db>,
    commands: mpsc::UnboundedReceiver<Command>,
    /// Changes (or closes) when the supervisor must stop.
    stop: watch::Receiver<bool>,
    /// `Ensure` requests that arrived while disconnected, with the identifier and subscriber
    /// they are for; answered after the re-LISTEN.
    waiting: Vec<(String, u64, oneshot::Sender<Result<()>>)>,
}

impl Supervisor {
    async fn run(mut self, first: PgListener) {
        let mut listener = first;
        loop {
            match self.connected(&mut listener).await {
                End::Stop => break,
                End::Lost(why) => {
                    tracing::warn!(reason = %why, "postgres: listener connection lost; reconnecting");
                    self.mark_lost();
                    // The pooled connections most likely went the same way: retire the idle
                    // ones, so the first operations after the outage do not fail on them.
                    self.db.pool.invalidate();
                }
            }
            drop(listener);
            match self.reconnect().await {
                Some(next) => listener = next,
                None => {
                    self.finish();
                    return;
                }
            }
        }
        drop(listener);
        self.finish();
    }

    /// End every stream (drop all the senders) and refuse new subscriptions.
    fn finish(&mut self) {
        let mut registry = self.shared.registry();
        registry.closed = true;
        registry.idents.clear();
        drop(registry);
        for (_, _, reply) in self.waiting.drain(..) {
            let _ = reply.send(Err(closed("subscribe")));
        }
    }

    /// Serve one live connection: deliver notifications, handle commands, check liveness.
    async fn connected(&mut self, listener: &mut PgListener) -> End {
        let mut ticker = tokio::time::interval(self.settings.liveness_interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ticker.tick().await; // the first tick is immediate
        loop {
            // `try_recv` is dropped when another branch wins; sqlx reads whole messages only
            // (`PgStream::recv_unchecked` is cancel-safe), so nothing is lost.
            let event = tokio::select! {
                _ = self.stop.changed() => Event::Stop,
                command = self.commands.recv() => Event::Command(command),
                _ = ticker.tick() => Event::Tick,
                notification = listener.try_recv() => Event::Notification(notification),
            };
            match event {
                Event::Stop | Event::Command(None) => return End::Stop,
                Event::Command(Some(command)) => {
                    if let Err(why) = self.handle(listener, command).await {
                        return End::Lost(why);
                    }
                }
                Event::Tick => {
                    let bound = self.settings.op_timeout;
                    match timeout(bound, sqlx::query("SELECT 1").execute(&mut *listener)).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return End::Lost(format!("liveness check failed: {e}")),
                        Err(_) => {
                            return End::Lost(format!("no answer to SELECT 1 within {bound:?}"))
                        }
                    }
                }
                Event::Notification(Ok(Some(notification))) => self.dispatch(&notification),
                // sqlx saw the connection end (EOF, aborted, broken pipe, timed out).
                Event::Notification(Ok(None)) => {
                    return End::Lost("the connection closed".to_owned())
                }
                // Any other error, e.g. a connection reset, which sqlx returns as an error
                // without dropping the connection (launchbadge/sqlx#4014).
                Event::Notification(Err(e)) => return End::Lost(format!("receive failed: {e}")),
            }
        }
    }

    /// Hand a notification to the local subscribers of its channel.
    fn dispatch(&self, notification: &PgNotification) {
        let mut registry = self.shared.registry();
        let Some(entry) = registry.idents.get_mut(notification.channel()) else {
            return; // a notification still in flight for a channel just released
        };
        match wire::decode(notification.payload()) {
            Some(Notice::Inline {
                channel, payload, ..
            }) => {
                let Some(subscribers) = entry.names.get_mut(&channel) else {
                    // Another name with the same identifier: never delivered here.
                    tracing::debug!("postgres: notification for another channel name dropped");
                    return;
                };
                let payload = Bytes::from(payload);
                for subscriber in subscribers.iter_mut().filter(|s| s.live) {
                    subscriber.deliver(Item::Message(payload.clone()));
                }
            }
            Some(Notice::Reference { id }) => {
                for (channel, subscribers) in &mut entry.names {
                    let row = Arc::new(Row {
                        id: id.clone(),
                        channel: channel.clone(),
                        db: self.db.clone(),
                        fetched: OnceCell::new(),
                    });
                    for subscriber in subscribers.iter_mut().filter(|s| s.live) {
                        subscriber.deliver(Item::Row(row.clone()));
                    }
                }
            }
            None => {
                tracing::warn!(
                    channel = notification.channel(),
                    "postgres: a notification that is not bgtask's was dropped"
                );
            }
        }
    }

    /// Handle one command on a live connection. An error means the connection is unusable.
    async fn handle(
        &mut self,
        listener: &mut PgListener,
        command: Command,
    ) -> std::result::Result<(), String> {
        let bound = self.settings.op_timeout;
        match command {
            Command::Ensure { ident, id, reply } => {
                let active = match self.shared.registry().idents.get(&ident) {
                    Some(entry) if entry.subscribers_any(id) => entry.active,
                    // The caller gave up and its subscriber is gone.
                    _ => {
                        let _ = reply.send(Ok(()));
                        return Ok(());
                    }
                };
                // `listen` quotes the identifier (ours are [a-z0-9_] anyway) and returns once
                // the server answered, so the LISTEN is in effect. On an identifier already
                // LISTENed to, a plain round trip: either way, every notification committed
                // before the server read this command arrives before its answer.
                let round_trip = async {
                    if active {
                        sqlx::query("SELECT 1")
                            .execute(&mut *listener)
                            .await
                            .map(drop)
                    } else {
                        listener.listen(&ident).await
                    }
                };
                match timeout(bound, round_trip).await {
                    Ok(Ok(())) => {
                        // What arrived before the answer is older than the new subscriber.
                        while let Some(notification) = listener.next_buffered() {
                            self.dispatch(&notification);
                        }
                        if let Some(entry) = self.shared.registry().idents.get_mut(&ident) {
                            entry.active = true;
                            entry.make_live(id);
                        }
                        let _ = reply.send(Ok(()));
                        Ok(())
                    }
                    Ok(Err(sqlx::Error::Database(e))) => {
                        // The server said no; the connection is fine.
                        let e = from_sqlx(
                            "subscribe",
                            sqlx::Error::Database(e),
                            self.settings.secret.as_deref(),
                        );
                        let _ = reply.send(Err(e));
                        Ok(())
                    }
                    failed => {
                        // Answered once the connection is back and the channel LISTENed again.
                        self.waiting.push((ident, id, reply));
                        Err(match failed {
                            Ok(Err(e)) => format!("LISTEN failed: {e}"),
                            _ => format!("LISTEN not confirmed within {bound:?}"),
                        })
                    }
                }
            }
            Command::Release { ident } => {
                let unlisten = {
                    let mut registry = self.shared.registry();
                    match registry.idents.get(&ident) {
                        Some(entry) if entry.names.is_empty() => {
                            let active = entry.active;
                            registry.idents.remove(&ident);
                            active
                        }
                        _ => false,
                    }
                };
                if unlisten {
                    match timeout(bound, listener.unlisten(&ident)).await {
                        Ok(Ok(())) | Ok(Err(sqlx::Error::Database(_))) => {}
                        Ok(Err(e)) => return Err(format!("UNLISTEN failed: {e}")),
                        Err(_) => return Err(format!("UNLISTEN not confirmed within {bound:?}")),
                    }
                }
                Ok(())
            }
        }
    }

    /// The connection is gone: nothing is LISTENed to any more, and every subscriber of an
    /// active channel may miss messages until the re-LISTEN. (Subscribers still waiting for
    /// their first confirmation have missed nothing: their `subscribe` has not returned yet.)
    fn mark_lost(&self) {
        let mut registry = self.shared.registry();
        for entry in registry.idents.values_mut() {
            if entry.active {
                for subscriber in entry.subscribers().filter(|s| s.live) {
                    subscriber.tx.owe_gap();
                }
            }
            entry.active = false;
        }
    }

    /// Reconnect with backoff until a new connection LISTENs to every live channel again;
    /// `None` when the broker was closed or dropped meanwhile.
    async fn reconnect(&mut self) -> Option<PgListener> {
        let mut failures = 0u32;
        let mut last_attempt = tokio::time::Instant::now();
        loop {
            if failures > 0 {
                // Attempts start at most every `backoff`: time spent in a failed attempt (a
                // connect that hung until its timeout) counts toward the wait.
                let wait = reconnect_delay(failures, self.settings.max_backoff)
                    .saturating_sub(last_attempt.elapsed());
                let wait = tokio::time::sleep(wait);
                tokio::pin!(wait);
                loop {
                    tokio::select! {
                        _ = self.stop.changed() => return None,
                        _ = &mut wait => break,
                        command = self.commands.recv() => match command {
                            Some(command) => self.defer(command),
                            None => return None,
                        },
                    }
                }
            }
            last_attempt = tokio::time::Instant::now();
            let attempt = tokio::select! {
                _ = self.stop.changed() => return None,
                attempt = attempt(&self.shared, &self.settings) => attempt,
            };
            match attempt {
                Ok(listener) => {
                    tracing::info!(
                        channels = self.shared.registry().idents.len(),
                        failures,
                        "postgres: listener connection restored"
                    );
                    bgtask_core::metrics::broker_reconnected("postgres");
                    self.restored();
                    return Some(listener);
                }
                Err(why) => {
                    failures = failures.saturating_add(1);
                    if failures == 1 || failures.is_multiple_of(10) {
                        tracing::warn!(reason = %why, failures, "postgres: listener reconnect failed");
                    } else {
                        tracing::debug!(reason = %why, failures, "postgres: listener reconnect failed");
                    }
                }
            }
        }
    }

    /// Keep a command that arrived while disconnected: the registry already says what must be
    /// LISTENed to, so only the caller of an `Ensure` needs remembering.
    fn defer(&mut self, command: Command) {
        match command {
            Command::Ensure { ident, id, reply } => {
                // Forget callers that gave up, so a long outage does not pile them up.
                self.waiting.retain(|(_, _, r)| !r.is_closed());
                self.waiting.push((ident, id, reply));
            }
            Command::Release { ident } => {
                let mut registry = self.shared.registry();
                if matches!(registry.idents.get(&ident), Some(e) if e.names.is_empty()) {
                    registry.idents.remove(&ident);
                }
            }
        }
    }

    /// After a successful re-LISTEN: tell every subscriber that messages may have been missed,
    /// and answer the subscriptions that waited for the connection.
    fn restored(&mut self) {
        let mut registry = self.shared.registry();
        for entry in registry.idents.values_mut() {
            for subscriber in entry.subscribers() {
                subscriber.tx.pay_gap(|| Item::Gap);
            }
        }
        // The subscribers that waited are live from the re-LISTEN on (it ran after they
        // subscribed).
        for (ident, id, reply) in self.waiting.drain(..) {
            if let Some(entry) = registry.idents.get_mut(&ident) {
                entry.make_live(id);
            }
            let _ = reply.send(Ok(()));
        }
    }
}

/// One attempt: connect, then LISTEN to every identifier that has local subscribers.
async fn attempt(
    shared: &Shared,
    settings: &ListenerSettings,
) -> std::result::Result<PgListener, String> {
    let mut listener = open(settings)
        .await
        .map_err(|e| format!("connect failed: {e}"))?;
    let idents: Vec<String> = {
        let mut registry = shared.registry();
        registry.idents.retain(|_, e| !e.names.is_empty());
        registry.idents.keys().cloned().collect()
    };
    // In batches, so that one batch's answer stays well within the bound.
    for batch in idents.chunks(256) {
        let listen = listener.listen_all(batch.iter().map(String::as_str));
        match timeout(settings.op_timeout, listen).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("LISTEN again failed: {e}")),
            Err(_) => {
                return Err(format!(
                    "LISTEN again not confirmed within {:?}",
                    settings.op_timeout
                ))
            }
        }
    }
    let mut registry = shared.registry();
    for ident in &idents {
        if let Some(entry) = registry.idents.get_mut(ident) {
            entry.active = true;
        }
    }
    Ok(listener)
}
