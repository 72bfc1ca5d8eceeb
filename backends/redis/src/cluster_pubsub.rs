//! Subscriptions on a Redis Cluster: sharded pub/sub (`SSUBSCRIBE`, `SPUBLISH`), so a message
//! travels only within its channel's shard, never to every node.
//!
//! One cluster connection over RESP3 carries every subscription of a broker: `redis` routes
//! each `SSUBSCRIBE` to the master of the channel's slot. The connection is the shared
//! subscription supervisor's ([`bgtask_core::supervisor`]), as the one server's pub/sub
//! connection is; this module is its cluster transport. The connection counts as lost, and the
//! supervisor replaces it with a fresh one (a fresh view of the slots) and subscribes every
//! channel again where its slot lives now, with a gap on every stream, when:
//!
//! - a master does not answer the liveness ping (sent to every master) within `op_timeout`:
//!   dead, paused, black-holed, or failed over while this connection still had it as a master;
//! - a node's connection drops (`redis` would reconnect that node, but not move its
//!   subscriptions after a failover);
//! - the server ends a subscription itself (`sunsubscribe` for a channel still subscribed): its
//!   slot moved to another node, by a resharding or a failover; `redis` does not follow it.
//!
//! The old connection is gone before the new one subscribes, so no message arrives twice.

use std::collections::{HashMap, HashSet};

use bgtask_core::supervisor::{
    Connection, Failure, Subscribers, Supervisor, SupervisorHandle, Transport,
};
use bgtask_core::{Incoming, Result};
use bytes::Bytes;
use futures::StreamExt;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo};
use redis::{PushInfo, PushKind, RedisError, Value};
use tokio::sync::mpsc;

use crate::config::RedisConfig;
use crate::error::{from_redis, refine_cluster_connect};

/// Open the cluster subscription connection (reporting a failure) and start its supervisor;
/// subscribe through it with [`pubsub::subscribe`](crate::pubsub::subscribe).
pub(crate) async fn start(config: &RedisConfig) -> Result<SupervisorHandle<ClusterTransport>> {
    let transport = ClusterTransport {
        config: config.clone(),
    };
    Supervisor::start(transport, &config.connection).await
}

/// Redis Cluster sharded pub/sub as the supervisor's transport: a channel is its own key.
pub(crate) struct ClusterTransport {
    config: RedisConfig,
}

impl Transport for ClusterTransport {
    type Connection = ShardedConnection;
    type Message = (Vec<u8>, Vec<u8>);
    type Item = Incoming;

    const NAME: &'static str = "redis";
    const CONNECTION: &'static str = "cluster pub/sub connection";
    const ROUND_TRIP_WHEN_SUBSCRIBED: bool = false;

    async fn connect(&self) -> Result<ShardedConnection> {
        let (push, pushes) = mpsc::unbounded_channel();
        let client = crate::cluster::client(&self.config, Some(push))?;
        let conn = client.get_async_connection().await.map_err(|e| {
            refine_cluster_connect(&self.config, from_redis("connect (pub/sub)", e))
        })?;
        Ok(ShardedConnection {
            conn,
            pushes,
            subscribed: HashSet::new(),
            unsubscribing: HashMap::new(),
        })
    }

    fn dispatch(
        &self,
        (channel, payload): Self::Message,
        subscribers: &mut Subscribers<'_, Incoming>,
    ) {
        let Ok(channel) = std::str::from_utf8(&channel) else {
            return;
        };
        let payload = Bytes::from(payload);
        subscribers.deliver(channel, |_| Some(Incoming::Message(payload.clone())));
    }

    fn gap() -> Incoming {
        Incoming::Gap
    }

    fn lost(&self) {}
}

/// One cluster connection with the pushes of all its nodes, and the channels it subscribed.
pub(crate) struct ShardedConnection {
    conn: ClusterConnection,
    pushes: mpsc::UnboundedReceiver<PushInfo>,
    /// What this connection subscribed and did not unsubscribe: a `sunsubscribe` for one of
    /// these came from the server...
    subscribed: HashSet<Vec<u8>>,
    /// ...unless it is the confirmation of one of our own `SUNSUBSCRIBE`s still to come, which
    /// may arrive after the channel was subscribed again: how many are owed, per channel.
    unsubscribing: HashMap<Vec<u8>, usize>,
}

impl Connection for ShardedConnection {
    type Message = (Vec<u8>, Vec<u8>);

    async fn recv(&mut self) -> std::result::Result<Self::Message, String> {
        loop {
            let Some(push) = self.pushes.recv().await else {
                return Err("the cluster connection closed".to_owned());
            };
            let mut data = push.data.into_iter();
            match (push.kind, data.next(), data.next()) {
                (
                    PushKind::SMessage,
                    Some(Value::BulkString(channel)),
                    Some(Value::BulkString(payload)),
                ) => {
                    return Ok((channel, payload));
                }
                (PushKind::Disconnection, ..) => {
                    return Err("a node's connection dropped".to_owned());
                }
                (PushKind::SUnsubscribe, Some(Value::BulkString(channel)), _)
                    if !self.own_unsubscribe(&channel) && self.subscribed.contains(&channel) =>
                {
                    return Err(format!(
                        "the server ended the subscription of {:?} (its slot moved)",
                        String::from_utf8_lossy(&channel)
                    ));
                }
                // Confirmations of our own commands, and pushes of other kinds.
                _ => {}
            }
        }
    }

    async fn subscribe(
        &mut self,
        key: &str,
        _subscribed: bool,
    ) -> std::result::Result<(), Failure> {
        classify(self.conn.ssubscribe(key).await)?;
        self.subscribed.insert(key.as_bytes().to_vec());
        Ok(())
    }

    /// One `SSUBSCRIBE` per channel (the channels of one command must share a slot), 32 at a
    /// time.
    async fn subscribe_all(&mut self, keys: &[String]) -> std::result::Result<(), String> {
        let commands: Vec<_> = keys
            .iter()
            .map(|key| {
                let (mut conn, key) = (self.conn.clone(), key.clone());
                async move { conn.ssubscribe(key).await }
            })
            .collect();
        let results: Vec<_> = futures::stream::iter(commands)
            .buffer_unordered(32)
            .collect()
            .await;
        if let Some(Err(e)) = results.into_iter().find(std::result::Result::is_err) {
            return Err(format!("resubscribe failed: {e}"));
        }
        self.subscribed
            .extend(keys.iter().map(|key| key.as_bytes().to_vec()));
        Ok(())
    }

    async fn unsubscribe(&mut self, key: &str) -> std::result::Result<(), Failure> {
        self.subscribed.remove(key.as_bytes());
        *self
            .unsubscribing
            .entry(key.as_bytes().to_vec())
            .or_default() += 1;
        classify(self.conn.sunsubscribe(key).await)
    }

    /// `PING` to every master: a silent one (paused, black-holed, failed over) fails it.
    async fn ping(&mut self) -> std::result::Result<(), String> {
        let route = RoutingInfo::MultiNode((
            MultipleNodeRoutingInfo::AllMasters,
            Some(ResponsePolicy::AllSucceeded),
        ));
        self.conn
            .route_command(redis::cmd("PING"), route)
            .await
            .map(drop)
            .map_err(|e| format!("a master did not answer the ping: {e}"))
    }

    fn buffered(&mut self) -> Option<Self::Message> {
        None
    }
}

impl ShardedConnection {
    /// Whether a `sunsubscribe` push for `channel` confirms one of our own (and count it paid).
    fn own_unsubscribe(&mut self, channel: &[u8]) -> bool {
        match self.unsubscribing.get_mut(channel) {
            Some(owed) => {
                *owed -= 1;
                if *owed == 0 {
                    self.unsubscribing.remove(channel);
                }
                true
            }
            None => false,
        }
    }
}

/// A failed subscription command: the server refusing it (an ACL rule) leaves the connection
/// fine; anything that may mean a node or the view of the slots is broken counts as lost.
fn classify(result: std::result::Result<(), RedisError>) -> std::result::Result<(), Failure> {
    match result {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm) => {
            Err(Failure::Refused(from_redis("subscribe", e)))
        }
        Err(e) => Err(Failure::Lost(e.to_string())),
    }
}
