//! The connection: `async-nats` options, connection events, and the round-trip barrier.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::{Client, ConnectOptions, Event};
use bgtask_core::backoff::reconnect_delay;
use bgtask_core::Result;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{watch, Mutex};

use crate::config::{Credentials, NatsConfig};
use crate::error::{closed, disconnected, from_connect, from_publish, from_subscribe, no_answer};

/// State shared by a broker, its subscriptions and the client's event callback.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Bumped whenever the client dropped messages for a slow subscription. The client names
    /// the subscription only by an id it does not expose, so every subscription of the
    /// connection yields a `Gap`.
    slow_consumer: AtomicU64,
    /// The latest connection (counted as the client's `Statistics::connects` counts) whose
    /// resubscriptions the server is known to have processed.
    confirmed: AtomicU64,
    /// [`NatsBroker::close`](crate::NatsBroker::close) was called.
    closed: AtomicBool,
    /// Wakes the subscriptions: after a confirmed reconnect, a slow-consumer event or `close`.
    wake: watch::Sender<u64>,
    /// Bumped by every `Connected` event, for the reconnect watcher.
    connected: watch::Sender<u64>,
}

impl Shared {
    pub(crate) fn new() -> Arc<Shared> {
        Arc::new(Shared {
            slow_consumer: AtomicU64::new(0),
            confirmed: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            wake: watch::channel(0).0,
            connected: watch::channel(0).0,
        })
    }

    fn wake(&self) {
        self.wake.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub(crate) fn slow_consumer_events(&self) -> u64 {
        self.slow_consumer.load(Ordering::SeqCst)
    }

    /// The latest connection whose resubscriptions are confirmed.
    pub(crate) fn confirmed_connection(&self) -> u64 {
        self.confirmed.load(Ordering::SeqCst)
    }

    /// Connection `generation` has its subscriptions back: wake the subscriptions.
    pub(crate) fn confirm(&self, generation: u64) {
        if self.confirmed.fetch_max(generation, Ordering::SeqCst) < generation {
            self.wake();
        }
    }

    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.wake();
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    pub(crate) fn watch(&self) -> watch::Receiver<u64> {
        self.wake.subscribe()
    }

    fn on_event(&self, event: &Event) {
        match event {
            Event::Connected => {
                tracing::info!("nats: connected");
                // The client reports its first connection too: only the later ones count.
                let mut before = 0;
                self.connected.send_modify(|n| {
                    before = *n;
                    *n = n.wrapping_add(1);
                });
                if before > 0 {
                    bgtask_core::metrics::broker_reconnected("nats");
                }
            }
            Event::Disconnected => tracing::warn!("nats: connection lost; reconnecting"),
            Event::SlowConsumer(_) => {
                self.slow_consumer.fetch_add(1, Ordering::SeqCst);
                self.wake();
            }
            Event::LameDuckMode => tracing::info!("nats: the server is entering lame duck mode"),
            Event::ServerError(e) => tracing::warn!(error = %e, "nats: server error"),
            Event::ClientError(e) => tracing::debug!(error = %e, "nats: client error"),
            Event::Draining | Event::Closed => {}
        }
    }
}

/// Kept by a broker and each of its subscriptions; when the last one is dropped, the reconnect
/// watcher stops (and with it the last handle on the connection).
#[derive(Debug)]
pub(crate) struct Lifeline {
    _alive: watch::Sender<()>,
}

/// After every (re)connection, wait for a round trip through the new connection: async-nats
/// queues the resubscriptions before anything else, so once the round trip is back the server
/// has them, and the subscriptions may say so (with a gap) without waiting for a message.
pub(crate) fn watch_reconnects(
    client: &Client,
    barrier: Arc<Barrier>,
    shared: Arc<Shared>,
    bound: Duration,
) -> Arc<Lifeline> {
    let (alive, mut lifeline_gone) = watch::channel(());
    let mut connected = shared.connected.subscribe();
    let statistics = client.statistics();
    let client = client.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = lifeline_gone.changed() => return,
                changed = connected.changed() => if changed.is_err() { return },
            }
            // Until the round trip succeeds on a connection, or the connection is lost again
            // (the next `Connected` event starts over).
            loop {
                let generation = statistics.connects.load(Ordering::SeqCst);
                if client.connection_state() != State::Connected {
                    break;
                }
                if let Ok(Ok(())) = tokio::time::timeout(bound, barrier.wait()).await {
                    shared.confirm(generation);
                    break;
                }
            }
        }
    });
    Arc::new(Lifeline { _alive: alive })
}

/// Connect as `config` says, with the client's events reported to `shared`.
///
/// Bounded by `connect_timeout` per server named in the URL.
pub(crate) async fn connect(config: &NatsConfig, shared: &Arc<Shared>) -> Result<Client> {
    let target = config.target()?;
    let shown = config.redacted_url();
    let max_backoff = config.connection.max_backoff;
    let events = Arc::downgrade(shared);
    let mut options = ConnectOptions::new()
        .name("bgtask")
        .connection_timeout(config.connection.connect_timeout)
        .ping_interval(config.connection.liveness_interval)
        .request_timeout(Some(config.connection.op_timeout))
        .subscription_capacity(config.connection.subscription_buffer)
        .reconnect_delay_callback(move |attempt| {
            // async-nats counts attempts from 1: the first goes at once.
            let failures = u32::try_from(attempt.saturating_sub(1)).unwrap_or(u32::MAX);
            reconnect_delay(failures, max_backoff)
        })
        .event_callback(move |event| {
            if let Some(shared) = events.upgrade() {
                shared.on_event(&event);
            }
            async {}
        });
    // async-nats parses credentials in a server URL but never sends them: they must be set
    // as options.
    match target.credentials {
        Credentials::UserPassword(user, password) => {
            options = options.user_and_password(user, password);
        }
        Credentials::Token(token) => options = options.token(token),
        Credentials::None => {}
    }
    if target.tls {
        options = options.require_tls(true);
    }
    for pem in &config.tls_root_certificates {
        options = options.add_root_certificates(pem.clone());
    }
    if let Some((cert, key)) = &config.tls_client_certificate {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    let servers = u32::try_from(target.servers.len()).unwrap_or(u32::MAX);
    let bound = config
        .connection
        .connect_timeout
        .saturating_mul(servers.max(1));
    match tokio::time::timeout(bound, options.connect(target.servers)).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e)) => Err(from_connect(&shown, e)),
        Err(_) => Err(no_answer(&format!("connect to {shown}"), bound)),
    }
}

/// Fail with `Unavailable` at once when the client is not connected, rather than queueing a
/// command that would be sent, or dropped, at some later time.
pub(crate) fn ensure_connected(client: &Client, what: &str) -> Result<()> {
    match client.connection_state() {
        State::Connected => Ok(()),
        State::Pending | State::Disconnected => Err(disconnected(what)),
    }
}

/// A round trip through the server on the client's one connection.
///
/// `flush` only writes the client's buffer to the socket, so it proves nothing about what the
/// server has processed. The server processes a connection's commands in order, so when a probe
/// published to an inbox this client subscribes to comes back, every command the client sent
/// before the probe (a `SUB`, a `PUB`) has been processed: the subscription is in the server's
/// interest graph, the message has been routed.
pub(crate) struct Barrier {
    client: Client,
    subject: String,
    /// Held while publishing a probe, so that probes are queued in the order of their numbers.
    next: Mutex<u64>,
    /// The highest probe number received back.
    echoed: watch::Receiver<u64>,
}

impl Barrier {
    /// Subscribe to a new inbox and prove it with a first round trip within `bound`.
    pub(crate) async fn start(client: &Client, bound: Duration) -> Result<Barrier> {
        let subject = client.new_inbox();
        let mut probes = client
            .subscribe(subject.clone())
            .await
            .map_err(from_subscribe)?;
        let (tx, echoed) = watch::channel(0u64);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    // The broker is gone: unsubscribe.
                    _ = tx.closed() => break,
                    probe = probes.next() => match probe {
                        Some(probe) => {
                            let number = std::str::from_utf8(&probe.payload)
                                .ok()
                                .and_then(|s| s.parse::<u64>().ok());
                            if let Some(number) = number {
                                tx.send_if_modified(|seen| {
                                    let newer = number > *seen;
                                    if newer {
                                        *seen = number;
                                    }
                                    newer
                                });
                            }
                        }
                        None => break,
                    },
                }
            }
        });
        let barrier = Barrier {
            client: client.clone(),
            subject,
            next: Mutex::new(0),
            echoed,
        };
        match tokio::time::timeout(bound, barrier.wait()).await {
            Ok(result) => result?,
            Err(_) => return Err(no_answer("the first round trip", bound)),
        }
        Ok(barrier)
    }

    /// Return once the server has processed every command this client queued before the call.
    /// Unbounded: callers bound it with their operation's timeout.
    pub(crate) async fn wait(&self) -> Result<()> {
        let number = {
            let mut next = self.next.lock().await;
            *next += 1;
            self.client
                .publish(self.subject.clone(), Bytes::from(next.to_string()))
                .await
                .map_err(|e| from_publish("round trip", e))?;
            *next
        };
        let mut echoed = self.echoed.clone();
        echoed
            .wait_for(|seen| *seen >= number)
            .await
            .map_err(|_| closed("wait for the server"))?;
        Ok(())
    }
}
