//! Subscriptions on a Redis Cluster: sharded pub/sub (`SSUBSCRIBE`, `SPUBLISH`), so a message
//! travels only within its channel's shard, never to every node.
//!
//! One cluster connection over RESP3 carries every subscription of a broker; `redis` routes
//! each `SSUBSCRIBE` to the master of the channel's slot, reconnects a node's connection and
//! resubscribes it. Around that, this module keeps what the `Broker` contract asks and `redis`
//! does not give:
//!
//! - the local subscribers of each channel (one server subscription per channel, however many
//!   local subscribers), each behind a bounded [`GapSender`];
//! - a gap on every subscription when a node's connection drops, paid when that channel is
//!   confirmed again (or with its next message);
//! - a watchdog: every `liveness_interval` it pings every master within `op_timeout`. A node
//!   that stopped answering (paused, black-holed, failed over) is noticed that way: every
//!   subscription is owed a gap, a fresh cluster connection (with a fresh view of the slots)
//!   replaces the current one, and once every master of the new view answers, every channel is
//!   subscribed on the master that now owns its slot, and the gaps are paid. The two
//!   connections never hold subscriptions at once, so no message arrives twice. A server-side
//!   `sunsubscribe` (the slot moved to another node) resubscribes that channel at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bgtask_core::gap::GapSender;
use bgtask_core::{Incoming, Result, Subscription};
use bytes::Bytes;
use futures::StreamExt;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo};
use redis::{PushInfo, PushKind, Value};
use tokio::sync::mpsc;
use tokio::time::{timeout, MissedTickBehavior};

use crate::config::RedisConfig;
use crate::error::{closed, from_redis, no_answer};

#[derive(Default)]
struct Registry {
    channels: HashMap<String, Channel>,
    next_id: u64,
    /// The broker was closed: no new subscriptions.
    closed: bool,
}

#[derive(Default)]
struct Channel {
    subscribers: Vec<(u64, GapSender<Incoming>)>,
    /// Subscribed on the server (confirmed).
    active: bool,
}

struct Shared {
    registry: Mutex<Registry>,
    /// The current subscription connection (replaced by the watchdog).
    conn: Mutex<ClusterConnection>,
    op_timeout: Duration,
    /// Held around every (un)subscribe, so a channel's last unsubscribe and a new first
    /// subscribe never cross on the server.
    order: tokio::sync::Mutex<()>,
}

impl Shared {
    fn registry(&self) -> MutexGuard<'_, Registry> {
        // Every update is a single insert, remove or flag change: a poisoned lock is consistent.
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn conn(&self) -> ClusterConnection {
        self.conn.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Subscribe `channel` on the server unless it is already (or has no subscriber left).
    async fn ensure(&self, channel: &str) -> Result<()> {
        let _order = self.order.lock().await;
        match self.registry().channels.get(channel) {
            Some(entry) if !entry.active && !entry.subscribers.is_empty() => {}
            _ => return Ok(()),
        }
        let mut conn = self.conn();
        match timeout(self.op_timeout, conn.ssubscribe(channel)).await {
            Ok(Ok(())) => {
                if let Some(entry) = self.registry().channels.get_mut(channel) {
                    entry.active = true;
                    pay(entry);
                }
                Ok(())
            }
            Ok(Err(e)) => Err(from_redis("subscribe", e)),
            Err(_) => Err(no_answer("subscribe", self.op_timeout)),
        }
    }

    /// Unsubscribe `channel` on the server if it has no subscriber left.
    async fn release(&self, channel: &str) {
        let _order = self.order.lock().await;
        let active = {
            let mut registry = self.registry();
            match registry.channels.get(channel) {
                Some(entry) if entry.subscribers.is_empty() => {
                    let active = entry.active;
                    registry.channels.remove(channel);
                    active
                }
                _ => return,
            }
        };
        if active {
            let mut conn = self.conn();
            // A failure leaves a server subscription without local subscribers: its messages
            // are dropped on arrival, and it ends with the connection.
            let _ = timeout(self.op_timeout, conn.sunsubscribe(channel)).await;
        }
    }

    /// Messages may have been missed on every channel: owe each subscriber a gap, and count
    /// every channel as unsubscribed until it is confirmed again.
    fn lost(&self) {
        let mut registry = self.registry();
        for entry in registry.channels.values_mut() {
            if entry.active {
                for (_, tx) in &mut entry.subscribers {
                    tx.owe_gap();
                }
            }
            entry.active = false;
        }
    }

    /// Subscribe every channel that is not confirmed; true when all are.
    async fn resubscribe(&self) -> bool {
        let channels: Vec<String> = self
            .registry()
            .channels
            .iter()
            .filter(|(_, e)| !e.active && !e.subscribers.is_empty())
            .map(|(name, _)| name.clone())
            .collect();
        // One command per channel: the channels of one SSUBSCRIBE must share a slot.
        let results = futures::stream::iter(channels)
            .map(|channel| async move { self.ensure(&channel).await })
            .buffer_unordered(32)
            .collect::<Vec<_>>()
            .await;
        results.iter().all(Result::is_ok)
    }

    /// Hand a sharded message to every local subscriber of its channel.
    fn dispatch(&self, data: Vec<Value>) {
        let mut data = data.into_iter();
        let (Some(Value::BulkString(channel)), Some(Value::BulkString(payload))) =
            (data.next(), data.next())
        else {
            return;
        };
        let Ok(channel) = std::str::from_utf8(&channel) else {
            return;
        };
        let mut registry = self.registry();
        let Some(entry) = registry.channels.get_mut(channel) else {
            return; // a message still in flight for a channel just unsubscribed
        };
        let payload = Bytes::from(payload);
        for (_, tx) in &mut entry.subscribers {
            tx.deliver(Incoming::Message(payload.clone()), || Incoming::Gap);
        }
    }
}

/// Pay the gaps owed on `entry` (its channel was just confirmed).
fn pay(entry: &mut Channel) {
    for (_, tx) in &mut entry.subscribers {
        tx.pay_gap(|| Incoming::Gap);
    }
}

/// The first text of a push's data: the channel of an (s)subscribe or (s)unsubscribe.
fn channel_of(data: &[Value]) -> Option<&str> {
    match data.first() {
        Some(Value::BulkString(bytes)) => std::str::from_utf8(bytes).ok(),
        _ => None,
    }
}

/// The broker's handle on its cluster subscriptions. The pump and the watchdog run as long as
/// a handle or a subscription exists, or until [`close`](Self::close).
pub(crate) struct ClusterPubSub {
    shared: Arc<Shared>,
    buffer: usize,
    lifeline: Arc<Lifeline>,
}

/// Ends the pump and the watchdog when dropped (the last handle and subscription are gone) or
/// closed.
struct Lifeline {
    stop: tokio::sync::watch::Sender<bool>,
}

impl ClusterPubSub {
    /// Open the subscription connection of `config` (reporting a failure) and start its pump.
    pub(crate) async fn start(config: &RedisConfig) -> Result<Self> {
        let (conn, pushes) = open(config).await?;
        let shared = Arc::new(Shared {
            registry: Mutex::new(Registry::default()),
            conn: Mutex::new(conn),
            op_timeout: config.connection.op_timeout,
            order: tokio::sync::Mutex::new(()),
        });
        let (stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(pump(
            Arc::downgrade(&shared),
            config.clone(),
            pushes,
            stopped,
        ));
        Ok(ClusterPubSub {
            shared,
            buffer: config.connection.subscription_buffer,
            lifeline: Arc::new(Lifeline { stop }),
        })
    }

    /// End every subscription stream now; new subscriptions fail.
    pub(crate) fn close(&self) {
        let mut registry = self.shared.registry();
        registry.closed = true;
        registry.channels.clear();
        drop(registry);
        self.lifeline.stop.send_replace(true);
    }

    /// The number of channels with local subscribers.
    pub(crate) fn channels(&self) -> usize {
        self.shared.registry().channels.len()
    }

    /// Subscribe to `channel`; returns once its shard's master confirmed the subscription.
    pub(crate) async fn subscribe(&self, channel: &str) -> Result<Subscription> {
        let (tx, rx) = mpsc::channel(self.buffer);
        let id = {
            let mut registry = self.shared.registry();
            if registry.closed {
                return Err(closed("subscribe"));
            }
            registry.next_id += 1;
            let id = registry.next_id;
            let entry = registry.channels.entry(channel.to_owned()).or_default();
            entry.subscribers.push((id, GapSender::new(tx)));
            id
        };
        // From here on, dropping the guard (on error or with the stream) removes the subscriber.
        let guard = Unsubscribe {
            _lifeline: self.lifeline.clone(),
            shared: self.shared.clone(),
            channel: channel.to_owned(),
            id,
        };
        let bound = self.shared.op_timeout;
        match timeout(bound, self.shared.ensure(channel)).await {
            Ok(result) => result?,
            Err(_) => return Err(no_answer("subscribe", bound)),
        }
        let stream = futures::stream::unfold((rx, guard), |(mut rx, guard)| async move {
            rx.recv().await.map(|item| (item, (rx, guard)))
        });
        Ok(Subscription::new(channel, stream.boxed()))
    }
}

/// Removes a subscriber when its subscription is dropped, and unsubscribes the channel on the
/// server when it was the last one.
struct Unsubscribe {
    _lifeline: Arc<Lifeline>,
    shared: Arc<Shared>,
    channel: String,
    id: u64,
}

impl Drop for Unsubscribe {
    fn drop(&mut self) {
        let empty = {
            let mut registry = self.shared.registry();
            let Some(entry) = registry.channels.get_mut(&self.channel) else {
                return;
            };
            entry.subscribers.retain(|(id, _)| *id != self.id);
            entry.subscribers.is_empty()
        };
        if empty {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let shared = self.shared.clone();
                let channel = std::mem::take(&mut self.channel);
                runtime.spawn(async move { shared.release(&channel).await });
            }
        }
    }
}

/// A subscription connection of `config`'s cluster, and the receiver of its pushes.
async fn open(
    config: &RedisConfig,
) -> Result<(ClusterConnection, mpsc::UnboundedReceiver<PushInfo>)> {
    let (push, pushes) = mpsc::unbounded_channel();
    let client = crate::cluster::client(config, Some(push))?;
    let bound = config.connection.connect_timeout;
    match timeout(bound, client.get_async_connection()).await {
        Ok(Ok(conn)) => Ok((conn, pushes)),
        Ok(Err(e)) => {
            let e = from_redis("connect (pub/sub)", e);
            Err(crate::error::refine_cluster_connect(config, e))
        }
        Err(_) => Err(no_answer("connect (pub/sub)", bound)),
    }
}

/// Deliver the connection's pushes, and watch the masters' liveness, until stopped or the
/// broker is gone.
async fn pump(
    shared: std::sync::Weak<Shared>,
    config: RedisConfig,
    mut pushes: mpsc::UnboundedReceiver<PushInfo>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(config.connection.liveness_interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticker.tick().await; // the first tick is immediate
    let mut healthy = true;
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            push = pushes.recv() => {
                let (Some(push), Some(shared)) = (push, shared.upgrade()) else { return };
                match push.kind {
                    PushKind::SMessage => shared.dispatch(push.data),
                    PushKind::Disconnection => {
                        tracing::warn!("redis cluster: a node's pub/sub connection dropped");
                        shared.lost();
                        healthy = false;
                    }
                    PushKind::SSubscribe => {
                        // (Re)confirmed, by our command or by the client's own resubscription.
                        if let Some(channel) = channel_of(&push.data) {
                            if let Some(entry) = shared.registry().channels.get_mut(channel) {
                                if !entry.subscribers.is_empty() {
                                    entry.active = true;
                                    pay(entry);
                                }
                            }
                        }
                    }
                    PushKind::SUnsubscribe => {
                        // Ours after a release (the channel is gone from the registry), or the
                        // server's after the slot moved: subscribe again where it lives now.
                        if let Some(channel) = channel_of(&push.data).map(str::to_owned) {
                            let wanted = {
                                let mut registry = shared.registry();
                                match registry.channels.get_mut(&channel) {
                                    Some(entry) if !entry.subscribers.is_empty() => {
                                        for (_, tx) in &mut entry.subscribers {
                                            tx.owe_gap();
                                        }
                                        entry.active = false;
                                        true
                                    }
                                    _ => false,
                                }
                            };
                            if wanted {
                                tokio::spawn(async move {
                                    if shared.ensure(&channel).await.is_err() {
                                        tracing::warn!("redis cluster: resubscribe after a slot move failed; the watchdog retries");
                                    }
                                });
                            }
                        }
                    }
                    _ => {}
                }
            }
            _ = ticker.tick() => {
                let Some(shared) = shared.upgrade() else { return };
                if !ping_masters(&shared).await {
                    if healthy {
                        tracing::warn!("redis cluster: a master does not answer; renewing the subscription connection");
                        shared.lost();
                    }
                    healthy = false;
                    // A fresh view of the slots; the current connection (and its
                    // subscriptions) end when it is replaced.
                    match open(&config).await {
                        Ok((conn, fresh)) => {
                            *shared.conn.lock().unwrap_or_else(|e| e.into_inner()) = conn;
                            pushes = fresh;
                            shared.lost();
                        }
                        Err(e) => tracing::debug!(error = %e, "redis cluster: no fresh subscription connection yet"),
                    }
                    continue;
                }
                if !healthy || has_unconfirmed(&shared) {
                    healthy = shared.resubscribe().await;
                    if healthy {
                        tracing::info!("redis cluster: subscriptions renewed");
                        bgtask_core::metrics::broker_reconnected("redis");
                    }
                }
            }
        }
    }
}

fn has_unconfirmed(shared: &Shared) -> bool {
    shared
        .registry()
        .channels
        .values()
        .any(|e| !e.active && !e.subscribers.is_empty())
}

/// Whether every master answers `PING` within `op_timeout`.
async fn ping_masters(shared: &Shared) -> bool {
    let mut conn = shared.conn();
    let route = RoutingInfo::MultiNode((
        MultipleNodeRoutingInfo::AllMasters,
        Some(ResponsePolicy::AllSucceeded),
    ));
    matches!(
        timeout(
            shared.op_timeout,
            conn.route_command(redis::cmd("PING"), route)
        )
        .await,
        Ok(Ok(_))
    )
}
