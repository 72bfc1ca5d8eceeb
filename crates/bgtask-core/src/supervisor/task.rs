//! The supervisor task: the connected phase (messages, commands, the liveness check), then
//! reconnection with backoff and resubscription.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{timeout, Instant, MissedTickBehavior};

use super::{
    closed, Command, Connection, Failure, Lifeline, Registry, Shared, Subscribers,
    SupervisorHandle, Transport, RESUBSCRIBE_BATCH,
};
use crate::backoff::reconnect_delay;
use crate::connection::ConnectionSettings;
use crate::error::{Error, ErrorKind, Result};

/// The supervisor task of one [`Transport`].
pub struct Supervisor<T: Transport> {
    transport: T,
    shared: Arc<Shared<T::Item>>,
    settings: ConnectionSettings,
    commands: mpsc::UnboundedReceiver<Command>,
    /// Changes (or closes) when the supervisor must stop.
    stop: watch::Receiver<bool>,
    /// `Ensure` requests that arrived while disconnected, with the key and subscriber they are
    /// for; answered after the resubscription.
    waiting: Vec<(String, u64, oneshot::Sender<Result<()>>)>,
}

/// Why the connected phase ended.
enum End {
    /// The connection is lost or silent: reconnect.
    Lost(String),
    /// Closed or dropped.
    Stop,
}

/// One event of the connected phase.
enum Event<M> {
    Stop,
    Command(Option<Command>),
    Tick,
    Message(std::result::Result<M, String>),
}

impl<T: Transport> Supervisor<T> {
    /// Open the first connection (reporting a failure: [`ErrorKind::Unavailable`] after
    /// `connect_timeout`, or the transport's error) and spawn the supervisor on it.
    pub async fn start(transport: T, settings: &ConnectionSettings) -> Result<SupervisorHandle<T>> {
        let first = match timeout(settings.connect_timeout, transport.connect()).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    format!(
                        "{} unavailable: no {} within {:?}",
                        T::NAME,
                        T::CONNECTION,
                        settings.connect_timeout
                    ),
                ))
            }
        };
        let shared = Arc::new(Shared {
            registry: Mutex::new(Registry {
                keys: HashMap::new(),
                next_id: 0,
                closed: false,
            }),
        });
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let (stop, stop_rx) = watch::channel(false);
        let supervisor = Supervisor {
            transport,
            shared: shared.clone(),
            settings: *settings,
            commands: commands_rx,
            stop: stop_rx,
            waiting: Vec::new(),
        };
        tokio::spawn(supervisor.run(first));
        Ok(SupervisorHandle {
            shared,
            commands,
            settings: *settings,
            lifeline: Arc::new(Lifeline { stop }),
        })
    }

    async fn run(mut self, first: T::Connection) {
        let mut conn = first;
        loop {
            match self.connected(&mut conn).await {
                End::Stop => break,
                End::Lost(why) => {
                    tracing::warn!(reason = %why, "{}: {} lost; reconnecting", T::NAME, T::CONNECTION);
                    self.mark_lost();
                    self.transport.lost();
                }
            }
            drop(conn);
            match self.reconnect().await {
                Some(next) => conn = next,
                None => {
                    self.finish();
                    return;
                }
            }
        }
        drop(conn);
        self.finish();
    }

    /// End every stream (drop all the senders) and refuse new subscriptions.
    fn finish(&mut self) {
        let mut registry = self.shared.registry();
        registry.closed = true;
        registry.keys.clear();
        drop(registry);
        for (_, _, reply) in self.waiting.drain(..) {
            let _ = reply.send(Err(closed::<T>()));
        }
    }

    /// Serve one live connection: deliver messages, handle commands, check liveness.
    async fn connected(&mut self, conn: &mut T::Connection) -> End {
        let mut ticker = tokio::time::interval(self.settings.liveness_interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ticker.tick().await; // the first tick is immediate
        loop {
            // `recv` is cancel-safe (a `Connection` promise), so losing the race loses nothing.
            let event = tokio::select! {
                _ = self.stop.changed() => Event::Stop,
                command = self.commands.recv() => Event::Command(command),
                _ = ticker.tick() => Event::Tick,
                message = conn.recv() => Event::Message(message),
            };
            match event {
                Event::Stop | Event::Command(None) => return End::Stop,
                Event::Command(Some(command)) => {
                    if let Err(why) = self.handle(conn, command).await {
                        return End::Lost(why);
                    }
                }
                Event::Tick => {
                    let bound = self.settings.op_timeout;
                    match timeout(bound, conn.ping()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(why)) => return End::Lost(format!("liveness check failed: {why}")),
                        Err(_) => {
                            return End::Lost(format!(
                                "no answer to the liveness check within {bound:?}"
                            ))
                        }
                    }
                }
                Event::Message(Ok(message)) => self.dispatch(message),
                Event::Message(Err(why)) => return End::Lost(why),
            }
        }
    }

    fn dispatch(&self, message: T::Message) {
        let mut registry = self.shared.registry();
        let mut subscribers = Subscribers {
            registry: &mut registry,
            gap: T::gap,
        };
        self.transport.dispatch(message, &mut subscribers);
    }

    /// Handle one command on a live connection. An error means the connection is unusable.
    async fn handle(
        &mut self,
        conn: &mut T::Connection,
        command: Command,
    ) -> std::result::Result<(), String> {
        let bound = self.settings.op_timeout;
        match command {
            Command::Ensure { key, id, reply } => {
                let active = match self.shared.registry().keys.get(&key) {
                    Some(entry) if entry.has(id) => entry.active,
                    // The caller gave up and its subscriber is gone.
                    _ => {
                        let _ = reply.send(Ok(()));
                        return Ok(());
                    }
                };
                if !active || T::ROUND_TRIP_WHEN_SUBSCRIBED {
                    match timeout(bound, conn.subscribe(&key, active)).await {
                        Ok(Ok(())) => {
                            // What arrived before the answer is older than the new subscriber.
                            while let Some(message) = conn.buffered() {
                                self.dispatch(message);
                            }
                        }
                        Ok(Err(Failure::Refused(e))) => {
                            let _ = reply.send(Err(e));
                            return Ok(());
                        }
                        failed => {
                            // Answered once the connection is back and the key subscribed again.
                            self.waiting.push((key, id, reply));
                            return Err(match failed {
                                Ok(Err(Failure::Lost(why))) => {
                                    format!("subscription command failed: {why}")
                                }
                                _ => format!("subscription not confirmed within {bound:?}"),
                            });
                        }
                    }
                }
                if let Some(entry) = self.shared.registry().keys.get_mut(&key) {
                    entry.active = true;
                    entry.make_live(id);
                }
                let _ = reply.send(Ok(()));
                Ok(())
            }
            Command::Release { key } => {
                let unsubscribe = {
                    let mut registry = self.shared.registry();
                    match registry.keys.get(&key) {
                        Some(entry) if entry.names.is_empty() => {
                            let active = entry.active;
                            registry.keys.remove(&key);
                            active
                        }
                        _ => false,
                    }
                };
                if unsubscribe {
                    match timeout(bound, conn.unsubscribe(&key)).await {
                        Ok(Ok(())) | Ok(Err(Failure::Refused(_))) => {}
                        Ok(Err(Failure::Lost(why))) => {
                            return Err(format!("unsubscribe failed: {why}"))
                        }
                        Err(_) => {
                            return Err(format!("unsubscribe not confirmed within {bound:?}"))
                        }
                    }
                }
                Ok(())
            }
        }
    }

    /// The connection is gone: nothing is subscribed any more, and every live subscriber of an
    /// active key may miss messages until the resubscription. (Subscribers still waiting for
    /// their first confirmation have missed nothing: their `subscribe` has not returned yet.)
    fn mark_lost(&self) {
        let mut registry = self.shared.registry();
        for entry in registry.keys.values_mut() {
            if entry.active {
                for subscriber in entry.subscribers().filter(|s| s.live) {
                    subscriber.tx.owe_gap();
                }
            }
            entry.active = false;
        }
    }

    /// Reconnect with backoff until a new connection has every live key subscribed again;
    /// `None` when closed or dropped meanwhile.
    async fn reconnect(&mut self) -> Option<T::Connection> {
        let mut failures = 0u32;
        let mut last_attempt = Instant::now();
        loop {
            if failures > 0 {
                // Attempts start at most every step: time spent in a failed attempt (a connect
                // that hung until its timeout) counts toward the wait.
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
            last_attempt = Instant::now();
            let attempt = tokio::select! {
                _ = self.stop.changed() => return None,
                attempt = attempt(&self.transport, &self.shared, &self.settings) => attempt,
            };
            match attempt {
                Ok(conn) => {
                    tracing::info!(
                        channels = self.shared.registry().keys.len(),
                        failures,
                        "{}: {} restored",
                        T::NAME,
                        T::CONNECTION
                    );
                    crate::metrics::broker_reconnected(T::NAME);
                    self.restored();
                    return Some(conn);
                }
                Err(why) => {
                    failures = failures.saturating_add(1);
                    if failures == 1 || failures.is_multiple_of(10) {
                        tracing::warn!(reason = %why, failures, "{}: {} reconnect failed", T::NAME, T::CONNECTION);
                    } else {
                        tracing::debug!(reason = %why, failures, "{}: {} reconnect failed", T::NAME, T::CONNECTION);
                    }
                }
            }
        }
    }

    /// Keep a command that arrived while disconnected: the registry already says what must be
    /// subscribed, so only the caller of an `Ensure` needs remembering.
    fn defer(&mut self, command: Command) {
        match command {
            Command::Ensure { key, id, reply } => {
                // Forget callers that gave up, so a long outage does not pile them up.
                self.waiting.retain(|(_, _, r)| !r.is_closed());
                self.waiting.push((key, id, reply));
            }
            Command::Release { key } => {
                let mut registry = self.shared.registry();
                if matches!(registry.keys.get(&key), Some(e) if e.names.is_empty()) {
                    registry.keys.remove(&key);
                }
            }
        }
    }

    /// After a successful resubscription: tell every subscriber that messages may have been
    /// missed, and answer the subscriptions that waited for the connection (live from the
    /// resubscription on: it ran after they subscribed).
    fn restored(&mut self) {
        let mut registry = self.shared.registry();
        for entry in registry.keys.values_mut() {
            for subscriber in entry.subscribers() {
                subscriber.tx.pay_gap(T::gap);
            }
        }
        for (key, id, reply) in self.waiting.drain(..) {
            if let Some(entry) = registry.keys.get_mut(&key) {
                entry.make_live(id);
            }
            let _ = reply.send(Ok(()));
        }
    }
}

/// One attempt: connect, then subscribe every key that has local subscribers.
async fn attempt<T: Transport>(
    transport: &T,
    shared: &Shared<T::Item>,
    settings: &ConnectionSettings,
) -> std::result::Result<T::Connection, String> {
    let connect_timeout = settings.connect_timeout;
    let mut conn = match timeout(connect_timeout, transport.connect()).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return Err(format!("connect failed: {e}")),
        Err(_) => return Err(format!("no connection within {connect_timeout:?}")),
    };
    let keys: Vec<String> = {
        let mut registry = shared.registry();
        registry.keys.retain(|_, e| !e.names.is_empty());
        registry.keys.keys().cloned().collect()
    };
    let bound = settings.op_timeout;
    for batch in keys.chunks(RESUBSCRIBE_BATCH) {
        match timeout(bound, conn.subscribe_all(batch)).await {
            Ok(Ok(())) => {}
            Ok(Err(why)) => return Err(format!("resubscribe failed: {why}")),
            Err(_) => return Err(format!("resubscribe not confirmed within {bound:?}")),
        }
    }
    let mut registry = shared.registry();
    for key in &keys {
        if let Some(entry) = registry.keys.get_mut(key) {
            entry.active = true;
        }
    }
    Ok(conn)
}
