//! Subscriptions: one dedicated pub/sub connection, owned by a supervisor task that reconnects
//! it forever and resubscribes every live channel.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bgtask_core::{Error, ErrorKind, Incoming, Result, Subscription};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use redis::aio::{PubSub, PubSubSink, PubSubStream};
use redis::{Client, Msg, RedisError};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{timeout, MissedTickBehavior};

use crate::config::RedisConfig;
use crate::error::{closed, from_redis, no_answer};
use bgtask_core::backoff::reconnect_delay;
use bgtask_core::gap::{self, GapReceiver, GapSender};

/// A request to the supervisor.
enum Command {
    /// Make sure `channel` is subscribed on the server, then answer.
    Ensure {
        channel: String,
        reply: oneshot::Sender<Result<()>>,
    },
    /// The last local subscriber of `channel` left: unsubscribe unless a new one arrived since.
    Release { channel: String },
}

/// The local subscribers of every channel, shared by the broker handles, the subscription
/// guards and the supervisor.
#[derive(Default)]
struct Registry {
    channels: HashMap<String, Channel>,
    next_id: u64,
    /// The supervisor has stopped (the broker was closed or dropped): no new subscriptions.
    closed: bool,
}

struct Channel {
    subscribers: Vec<Subscriber>,
    /// Subscribed on the current server connection (confirmed).
    active: bool,
}

struct Subscriber {
    id: u64,
    /// Owes a `Gap` after a lost message (slow reader) or a reconnect.
    tx: GapSender<Incoming>,
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
/// once with [`PubSubHandle::close`].
struct Lifeline {
    stop: watch::Sender<bool>,
}

/// The broker's handle on its subscription machinery. The supervisor runs as long as this handle
/// or any subscription exists, or until [`close`](Self::close).
pub(crate) struct PubSubHandle {
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<Command>,
    op_timeout: Duration,
    buffer: usize,
    buffer_bytes: usize,
    lifeline: Arc<Lifeline>,
}

impl PubSubHandle {
    /// Open the pub/sub connection (reporting a failure) and start its supervisor.
    ///
    /// `on_lost` runs whenever the supervisor finds the connection lost.
    pub(crate) async fn start(
        client: Client,
        config: &RedisConfig,
        on_lost: Box<dyn Fn() + Send + Sync>,
    ) -> Result<Self> {
        let conn = open(&client, config).await?;
        let shared = Arc::new(Shared {
            registry: Mutex::new(Registry::default()),
        });
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let (stop, stop_rx) = watch::channel(false);
        let supervisor = Supervisor {
            shared: shared.clone(),
            client,
            op_timeout: config.connection.op_timeout,
            connect_timeout: config.connection.connect_timeout,
            ping_interval: config.connection.liveness_interval,
            max_backoff: config.connection.max_backoff,
            commands: commands_rx,
            stop: stop_rx,
            waiting: Vec::new(),
            on_lost,
        };
        tokio::spawn(supervisor.run(conn));
        Ok(PubSubHandle {
            shared,
            commands,
            op_timeout: config.connection.op_timeout,
            buffer: config.connection.subscription_buffer,
            buffer_bytes: config.connection.subscription_buffer_bytes,
            lifeline: Arc::new(Lifeline { stop }),
        })
    }

    /// Stop the supervisor now: every subscription stream ends and new subscriptions fail.
    pub(crate) fn close(&self) {
        self.lifeline.stop.send_replace(true);
    }

    /// The number of channels with local subscribers.
    pub(crate) fn channels(&self) -> usize {
        self.shared.registry().channels.len()
    }

    /// Subscribe to `channel`; returns once the server confirmed the subscription.
    pub(crate) async fn subscribe(&self, channel: &str) -> Result<Subscription> {
        let (tx, rx) = gap::channel(self.buffer, self.buffer_bytes);
        let (id, confirmed) = {
            let mut registry = self.shared.registry();
            if registry.closed {
                return Err(closed("subscribe"));
            }
            registry.next_id += 1;
            let id = registry.next_id;
            let entry = registry
                .channels
                .entry(channel.to_owned())
                .or_insert_with(|| Channel {
                    subscribers: Vec::new(),
                    active: false,
                });
            entry.subscribers.push(Subscriber { id, tx });
            (id, entry.active)
        };
        // From here on, dropping the guard (on error or with the stream) removes the subscriber.
        let guard = Unsubscribe {
            _lifeline: self.lifeline.clone(),
            shared: self.shared.clone(),
            commands: self.commands.clone(),
            channel: channel.to_owned(),
            id,
        };
        if !confirmed {
            let (reply, answer) = oneshot::channel();
            self.commands
                .send(Command::Ensure {
                    channel: channel.to_owned(),
                    reply,
                })
                .map_err(|_| closed("subscribe"))?;
            match timeout(self.op_timeout, answer).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => return Err(e),
                Ok(Err(_)) => return Err(closed("subscribe")),
                Err(_) => return Err(no_answer("subscribe", self.op_timeout)),
            }
        }
        let stream = SubscriptionStream { rx, _guard: guard };
        Ok(Subscription::new(channel, stream.boxed()))
    }
}

/// The stream of one subscription: its buffer, and the guard that unsubscribes on drop.
struct SubscriptionStream {
    rx: GapReceiver<Incoming>,
    _guard: Unsubscribe,
}

impl futures::Stream for SubscriptionStream {
    type Item = Incoming;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Incoming>> {
        self.rx.poll_recv(cx)
    }
}

/// Removes a subscriber when its subscription is dropped, and asks the supervisor to
/// unsubscribe when it was the channel's last one.
struct Unsubscribe {
    _lifeline: Arc<Lifeline>,
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<Command>,
    channel: String,
    id: u64,
}

impl Drop for Unsubscribe {
    fn drop(&mut self) {
        let mut registry = self.shared.registry();
        let Some(entry) = registry.channels.get_mut(&self.channel) else {
            return;
        };
        entry.subscribers.retain(|s| s.id != self.id);
        if entry.subscribers.is_empty() {
            // The entry stays (still subscribed on the server) until the supervisor handles
            // the release, so a new subscriber meanwhile needs no round trip.
            let _ = self.commands.send(Command::Release {
                channel: std::mem::take(&mut self.channel),
            });
        }
    }
}

/// Open a pub/sub connection within `connect_timeout`.
async fn open(client: &Client, config: &RedisConfig) -> Result<PubSub> {
    match timeout(config.connection.connect_timeout, client.get_async_pubsub()).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(from_redis("connect (pub/sub)", e)),
        Err(_) => Err(Error::new(
            ErrorKind::Unavailable,
            format!(
                "redis unavailable: no pub/sub connection within {:?}",
                config.connection.connect_timeout
            ),
        )),
    }
}

/// Why the connected phase ended.
enum End {
    /// The connection is lost or silent: reconnect.
    Lost(String),
    /// The broker was dropped.
    Stop,
}

struct Supervisor {
    shared: Arc<Shared>,
    client: Client,
    op_timeout: Duration,
    connect_timeout: Duration,
    ping_interval: Duration,
    max_backoff: Duration,
    commands: mpsc::UnboundedReceiver<Command>,
    /// Changes (or closes) when the supervisor must stop.
    stop: watch::Receiver<bool>,
    /// `Ensure` requests that arrived while disconnected; answered after the resubscription.
    waiting: Vec<oneshot::Sender<Result<()>>>,
    /// Called when the connection is found lost.
    on_lost: Box<dyn Fn() + Send + Sync>,
}

impl Supervisor {
    async fn run(mut self, first: PubSub) {
        let mut conn = first;
        loop {
            let (sink, stream) = conn.split();
            match self.connected(sink, stream).await {
                End::Stop => break,
                End::Lost(why) => {
                    tracing::warn!(reason = %why, "redis: pub/sub connection lost; reconnecting");
                    self.mark_lost();
                    (self.on_lost)();
                }
            }
            match self.reconnect().await {
                Some(next) => conn = next,
                None => break,
            }
        }
        // Ending every stream: drop all the senders and refuse new subscriptions.
        let mut registry = self.shared.registry();
        registry.closed = true;
        registry.channels.clear();
        drop(registry);
        for reply in self.waiting.drain(..) {
            let _ = reply.send(Err(closed("subscribe")));
        }
    }

    /// Serve one live connection: deliver messages, handle commands, ping on schedule.
    async fn connected(&mut self, mut sink: PubSubSink, mut stream: PubSubStream) -> End {
        let mut ticker = tokio::time::interval(self.ping_interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ticker.tick().await; // the first tick is immediate
        let mut ping: Option<BoxFuture<'static, std::result::Result<(), String>>> = None;
        loop {
            tokio::select! {
                _ = self.stop.changed() => return End::Stop,
                msg = stream.next() => match msg {
                    Some(msg) => self.dispatch(msg),
                    None => return End::Lost("the connection closed".to_owned()),
                },
                command = self.commands.recv() => match command {
                    Some(command) => {
                        if let Err(why) = self.handle(&mut sink, command).await {
                            return End::Lost(why);
                        }
                    }
                    None => return End::Stop,
                },
                _ = ticker.tick(), if ping.is_none() => {
                    let mut sink = sink.clone();
                    let bound = self.op_timeout;
                    ping = Some(async move {
                        match timeout(bound, sink.ping::<redis::Value>()).await {
                            Ok(Ok(_)) => Ok(()),
                            Ok(Err(e)) => Err(format!("ping failed: {e}")),
                            Err(_) => Err(format!("no answer to ping within {bound:?}")),
                        }
                    }.boxed());
                },
                result = async { ping.as_mut().expect("guarded").await }, if ping.is_some() => {
                    ping = None;
                    if let Err(why) = result {
                        return End::Lost(why);
                    }
                },
            }
        }
    }

    /// Hand a message to every local subscriber of its channel.
    fn dispatch(&self, msg: Msg) {
        let Ok(channel) = msg.get_channel::<Vec<u8>>() else {
            return;
        };
        let Ok(channel) = std::str::from_utf8(&channel) else {
            return;
        };
        let mut registry = self.shared.registry();
        let Some(entry) = registry.channels.get_mut(channel) else {
            return; // a message still in flight for a channel just unsubscribed
        };
        let payload = Bytes::copy_from_slice(msg.get_payload_bytes());
        for subscriber in &mut entry.subscribers {
            // Closed: the subscription is being dropped; its guard removes this entry.
            subscriber
                .tx
                .deliver(Incoming::Message(payload.clone()), || Incoming::Gap);
        }
    }

    /// Handle one command on a live connection. An error means the connection is unusable.
    async fn handle(
        &mut self,
        sink: &mut PubSubSink,
        command: Command,
    ) -> std::result::Result<(), String> {
        match command {
            Command::Ensure { channel, reply } => {
                let needed = {
                    let registry = self.shared.registry();
                    match registry.channels.get(&channel) {
                        Some(entry) => !entry.active && !entry.subscribers.is_empty(),
                        // The caller gave up and its subscriber is gone.
                        None => false,
                    }
                };
                if !needed {
                    let _ = reply.send(Ok(()));
                    return Ok(());
                }
                match self.bounded(sink.subscribe(&channel)).await {
                    Ok(()) => {
                        if let Some(entry) = self.shared.registry().channels.get_mut(&channel) {
                            entry.active = true;
                        }
                        let _ = reply.send(Ok(()));
                        Ok(())
                    }
                    Err(Failure::Refused(e)) => {
                        // The server said no (e.g. an ACL rule): the connection is fine.
                        let _ = reply.send(Err(from_redis("subscribe", e)));
                        Ok(())
                    }
                    Err(Failure::Lost(why)) => {
                        // Answered once the connection is back and the channel resubscribed.
                        self.waiting.push(reply);
                        Err(why)
                    }
                }
            }
            Command::Release { channel } => {
                let unsubscribe = {
                    let mut registry = self.shared.registry();
                    match registry.channels.get(&channel) {
                        Some(entry) if entry.subscribers.is_empty() => {
                            let active = entry.active;
                            registry.channels.remove(&channel);
                            active
                        }
                        _ => false,
                    }
                };
                if unsubscribe {
                    match self.bounded(sink.unsubscribe(&channel)).await {
                        Ok(()) | Err(Failure::Refused(_)) => {}
                        Err(Failure::Lost(why)) => return Err(why),
                    }
                }
                Ok(())
            }
        }
    }

    /// Run a subscription command within `op_timeout`.
    async fn bounded(
        &self,
        command: impl std::future::Future<Output = std::result::Result<(), RedisError>>,
    ) -> std::result::Result<(), Failure> {
        match timeout(self.op_timeout, command).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) if e.kind() == redis::ErrorKind::Io || e.is_unrecoverable_error() => {
                Err(Failure::Lost(format!("subscription command failed: {e}")))
            }
            Ok(Err(e)) => Err(Failure::Refused(e)),
            Err(_) => Err(Failure::Lost(format!(
                "no confirmation within {:?}",
                self.op_timeout
            ))),
        }
    }

    /// The connection is gone: nothing is subscribed any more, and every subscriber of an
    /// active channel may miss messages until the resubscription. (Subscribers of a channel
    /// still waiting for its first confirmation have missed nothing: their `subscribe` call has
    /// not returned yet.)
    fn mark_lost(&self) {
        let mut registry = self.shared.registry();
        for entry in registry.channels.values_mut() {
            if entry.active {
                for subscriber in &mut entry.subscribers {
                    subscriber.tx.owe_gap();
                }
            }
            entry.active = false;
        }
    }

    /// Reconnect with backoff until a new connection has every live channel subscribed again;
    /// `None` when the broker was dropped meanwhile.
    async fn reconnect(&mut self) -> Option<PubSub> {
        let mut failures = 0u32;
        loop {
            if failures > 0 {
                let wait = tokio::time::sleep(reconnect_delay(failures, self.max_backoff));
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
            let attempt = tokio::select! {
                _ = self.stop.changed() => return None,
                attempt = attempt(
                    &self.shared,
                    &self.client,
                    self.connect_timeout,
                    self.op_timeout,
                ) => attempt,
            };
            match attempt {
                Ok(conn) => {
                    tracing::info!(
                        channels = self.shared.registry().channels.len(),
                        "redis: pub/sub connection restored"
                    );
                    bgtask_core::metrics::broker_reconnected("redis");
                    self.restored();
                    return Some(conn);
                }
                Err(why) => {
                    failures = failures.saturating_add(1);
                    if failures == 1 || failures.is_multiple_of(10) {
                        tracing::warn!(reason = %why, failures, "redis: pub/sub reconnect failed");
                    } else {
                        tracing::debug!(reason = %why, failures, "redis: pub/sub reconnect failed");
                    }
                }
            }
        }
    }

    /// Keep a command that arrived while disconnected: the registry already says what must be
    /// subscribed, so only the caller of an `Ensure` needs remembering.
    fn defer(&mut self, command: Command) {
        match command {
            Command::Ensure { reply, .. } => {
                // Forget callers that gave up, so a long outage does not pile them up.
                self.waiting.retain(|r| !r.is_closed());
                self.waiting.push(reply);
            }
            Command::Release { channel } => {
                let mut registry = self.shared.registry();
                if matches!(registry.channels.get(&channel), Some(e) if e.subscribers.is_empty()) {
                    registry.channels.remove(&channel);
                }
            }
        }
    }

    /// After a successful resubscription: tell every subscriber that messages may have been
    /// missed, and answer the subscriptions that waited for the connection.
    fn restored(&mut self) {
        let mut registry = self.shared.registry();
        for entry in registry.channels.values_mut() {
            for subscriber in &mut entry.subscribers {
                subscriber.tx.pay_gap(|| Incoming::Gap);
            }
        }
        drop(registry);
        for reply in self.waiting.drain(..) {
            let _ = reply.send(Ok(()));
        }
    }
}

/// One attempt: connect, then subscribe every channel that has local subscribers.
async fn attempt(
    shared: &Shared,
    client: &Client,
    connect_timeout: Duration,
    op_timeout: Duration,
) -> std::result::Result<PubSub, String> {
    let mut conn = match timeout(connect_timeout, client.get_async_pubsub()).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return Err(format!("connect failed: {e}")),
        Err(_) => return Err(format!("no connection within {:?}", connect_timeout)),
    };
    let channels: Vec<String> = {
        let mut registry = shared.registry();
        registry.channels.retain(|_, e| !e.subscribers.is_empty());
        registry.channels.keys().cloned().collect()
    };
    // Subscribe in batches so one command's confirmations stay well within the bound.
    for batch in channels.chunks(256) {
        match timeout(op_timeout, conn.subscribe(batch)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("resubscribe failed: {e}")),
            Err(_) => {
                return Err(format!("resubscribe not confirmed within {:?}", op_timeout));
            }
        }
    }
    let mut registry = shared.registry();
    for channel in &channels {
        if let Some(entry) = registry.channels.get_mut(channel) {
            entry.active = true;
        }
    }
    Ok(conn)
}

/// How a subscription command failed.
enum Failure {
    /// The server refused it; the connection is fine.
    Refused(RedisError),
    /// The connection is broken or silent.
    Lost(String),
}
