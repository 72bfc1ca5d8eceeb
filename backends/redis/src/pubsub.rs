//! Subscriptions: one dedicated pub/sub connection, owned by the shared subscription supervisor
//! ([`bgtask_core::supervisor`]), which reconnects it forever and resubscribes every live
//! channel. This module is its Redis transport: `SUBSCRIBE`, `UNSUBSCRIBE` and `PING` on
//! `redis`'s `aio::PubSub`.

use bgtask_core::supervisor::{Connection, Failure, Supervisor, SupervisorHandle, Transport};
use bgtask_core::{Incoming, Result, Subscription};
use bytes::Bytes;
use futures::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};
use redis::{Client, Msg, RedisError};

use crate::config::RedisConfig;
use crate::error::from_redis;

/// Open the pub/sub connection (reporting a failure) and start its supervisor, which runs as
/// long as the handle or any subscription exists, or until it is closed.
///
/// `on_lost` runs whenever the supervisor finds the connection lost.
pub(crate) async fn start(
    client: Client,
    config: &RedisConfig,
    on_lost: Box<dyn Fn() + Send + Sync>,
) -> Result<SupervisorHandle<RedisPubSub>> {
    Supervisor::start(RedisPubSub { client, on_lost }, &config.connection).await
}

/// Subscribe to `channel` through `supervisor` (one server's or a cluster's); returns once the
/// server confirmed the subscription (at once when the channel is subscribed already).
pub(crate) async fn subscribe<T: Transport<Item = Incoming>>(
    supervisor: &SupervisorHandle<T>,
    channel: &str,
) -> Result<Subscription> {
    let subscribed = supervisor.subscribe(channel.to_owned(), channel).await?;
    Ok(Subscription::new(channel, subscribed.boxed()))
}

/// Redis pub/sub as the supervisor's transport: a channel is its own key (`SUBSCRIBE`, never
/// `PSUBSCRIBE`, so `*` and `?` in names are plain characters).
pub(crate) struct RedisPubSub {
    client: Client,
    /// Called when the connection is found lost.
    on_lost: Box<dyn Fn() + Send + Sync>,
}

impl Transport for RedisPubSub {
    type Connection = PubSubConnection;
    type Message = Msg;
    type Item = Incoming;

    const NAME: &'static str = "redis";
    const CONNECTION: &'static str = "pub/sub connection";
    const ROUND_TRIP_WHEN_SUBSCRIBED: bool = false;

    async fn connect(&self) -> Result<PubSubConnection> {
        let (sink, stream) = self
            .client
            .get_async_pubsub()
            .await
            .map_err(|e| from_redis("connect (pub/sub)", e))?
            .split();
        Ok(PubSubConnection { sink, stream })
    }

    fn dispatch(
        &self,
        msg: Msg,
        subscribers: &mut bgtask_core::supervisor::Subscribers<'_, Incoming>,
    ) {
        let Ok(channel) = msg.get_channel::<Vec<u8>>() else {
            return;
        };
        let Ok(channel) = std::str::from_utf8(&channel) else {
            return;
        };
        let payload = Bytes::copy_from_slice(msg.get_payload_bytes());
        subscribers.deliver(channel, |_| Some(Incoming::Message(payload.clone())));
    }

    fn gap() -> Incoming {
        Incoming::Gap
    }

    fn lost(&self) {
        (self.on_lost)();
    }
}

/// One pub/sub connection, split: commands go out on the sink while messages come in on the
/// stream.
pub(crate) struct PubSubConnection {
    sink: PubSubSink,
    stream: PubSubStream,
}

impl Connection for PubSubConnection {
    type Message = Msg;

    async fn recv(&mut self) -> std::result::Result<Msg, String> {
        self.stream
            .next()
            .await
            .ok_or_else(|| "the connection closed".to_owned())
    }

    /// `SUBSCRIBE` (idempotent on a channel subscribed already), confirmed by the server.
    async fn subscribe(
        &mut self,
        key: &str,
        _subscribed: bool,
    ) -> std::result::Result<(), Failure> {
        classify(self.sink.subscribe(key).await)
    }

    async fn subscribe_all(&mut self, keys: &[String]) -> std::result::Result<(), String> {
        self.sink.subscribe(keys).await.map_err(|e| e.to_string())
    }

    async fn unsubscribe(&mut self, key: &str) -> std::result::Result<(), Failure> {
        classify(self.sink.unsubscribe(key).await)
    }

    async fn ping(&mut self) -> std::result::Result<(), String> {
        self.sink
            .ping::<redis::Value>()
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    }

    fn buffered(&mut self) -> Option<Msg> {
        None
    }
}

/// A failed subscription command: an I/O or unrecoverable error means the connection is lost;
/// anything else (e.g. an ACL rule) is the server saying no on a connection that is fine.
fn classify(result: std::result::Result<(), RedisError>) -> std::result::Result<(), Failure> {
    match result {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == redis::ErrorKind::Io || e.is_unrecoverable_error() => {
            Err(Failure::Lost(e.to_string()))
        }
        Err(e) => Err(Failure::Refused(from_redis("subscribe", e))),
    }
}
