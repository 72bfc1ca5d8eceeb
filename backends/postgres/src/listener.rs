//! Subscriptions: one listener connection per broker, owned by the shared subscription
//! supervisor ([`bgtask_core::supervisor`]), which checks it with a periodic round trip,
//! replaces it forever with backoff, and LISTENs every live channel again. This module is its
//! PostgreSQL transport: `LISTEN`, `UNLISTEN` and `SELECT 1` on a `sqlx` `PgListener`, and what
//! a notification means (an inline message, or a payload row read once per broker).

use std::sync::Arc;

use bgtask_core::gap::Weigh;
use bgtask_core::supervisor::{
    Connection, Failure, Subscribers, Supervisor, SupervisorHandle, Transport,
};
use bgtask_core::{ConnectionSettings, Incoming, Result, Subscription};
use bytes::Bytes;
use futures::StreamExt;
use sqlx::postgres::{PgConnectOptions, PgListener, PgNotification, PgPoolOptions};
use tokio::sync::OnceCell;

use crate::db::{Db, Fetched};
use crate::error::from_sqlx;
use crate::wire::{self, Notice};

/// Settings of the listener.
pub(crate) struct ListenerSettings {
    /// Connection options of the listener connection (its own `application_name`).
    pub(crate) options: PgConnectOptions,
    pub(crate) schema: String,
    pub(crate) connection: ConnectionSettings,
    pub(crate) secret: Option<String>,
}

/// What a subscription's buffer holds.
#[derive(Clone)]
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

/// The broker's handle on its subscription machinery.
pub(crate) struct ListenerHandle {
    supervisor: SupervisorHandle<Listen>,
    schema: String,
}

impl ListenerHandle {
    /// Open the listener connection (reporting a failure) and start its supervisor.
    pub(crate) async fn start(settings: ListenerSettings, db: Arc<Db>) -> Result<Self> {
        let transport = Listen {
            options: settings.options,
            connect_timeout: settings.connection.connect_timeout,
            secret: settings.secret,
            db,
        };
        let supervisor = Supervisor::start(transport, &settings.connection).await?;
        Ok(ListenerHandle {
            supervisor,
            schema: settings.schema,
        })
    }

    /// Stop the supervisor now: every subscription stream ends and new subscriptions fail.
    pub(crate) fn close(&self) {
        self.supervisor.close();
    }

    /// The number of channels with local subscribers.
    pub(crate) fn channels(&self) -> usize {
        self.supervisor.channels()
    }

    /// Subscribe to `channel`; returns once the server confirmed the LISTEN and everything
    /// published before the call started has gone by.
    pub(crate) async fn subscribe(&self, channel: &str) -> Result<Subscription> {
        let ident = wire::channel_identifier(&self.schema, channel);
        let subscribed = self.supervisor.subscribe(ident, channel).await?;
        let stream = futures::stream::unfold(subscribed, |mut subscribed| async move {
            loop {
                let incoming = match subscribed.next().await? {
                    Item::Message(bytes) => Incoming::Message(bytes),
                    Item::Gap => Incoming::Gap,
                    Item::Row(row) => match row.fetch().await {
                        Fetched::Message(bytes) => Incoming::Message(bytes),
                        Fetched::Missing => Incoming::Gap,
                        Fetched::NotMine => continue,
                    },
                };
                return Some((incoming, subscribed));
            }
        });
        Ok(Subscription::new(channel, stream.boxed()))
    }
}

/// LISTEN/NOTIFY as the supervisor's transport: a channel's key is its PostgreSQL identifier
/// (several names share one only on a hash collision; the notification names its channel).
struct Listen {
    options: PgConnectOptions,
    connect_timeout: std::time::Duration,
    /// The connection's password, scrubbed from error texts.
    secret: Option<String>,
    db: Arc<Db>,
}

impl Transport for Listen {
    type Connection = Listener;
    type Message = PgNotification;
    type Item = Item;

    const NAME: &'static str = "postgres";
    const CONNECTION: &'static str = "listener connection";
    /// Even on an identifier LISTENed to already, a new subscriber waits for a round trip:
    /// every notification committed before the server read it arrives before its answer, and
    /// must not reach the new subscriber.
    const ROUND_TRIP_WHEN_SUBSCRIBED: bool = true;

    /// Each connection gets a pool of its own (`PgListener` needs one): when a lost listener is
    /// dropped, sqlx spawns `UNLISTEN *` and a return to that pool, neither with a time bound
    /// (sqlx-postgres `listener.rs`, `impl Drop for PgListener`); on a half-open connection
    /// that task waits until the OS gives up on the socket, and with a shared pool it would
    /// hold the slot the next listener needs. sqlx's own reconnection is turned off
    /// (`eager_reconnect`): the supervisor replaces the whole listener instead.
    async fn connect(&self) -> Result<Listener> {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .acquire_timeout(self.connect_timeout)
            .idle_timeout(None)
            .max_lifetime(None)
            .test_before_acquire(false)
            .connect_lazy_with(self.options.clone());
        let mut listener = PgListener::connect_with(&pool)
            .await
            .map_err(|e| from_sqlx("connect (listener)", e, self.secret.as_deref()))?;
        listener.ignore_pool_close_event(true);
        listener.eager_reconnect(false);
        Ok(Listener {
            listener,
            secret: self.secret.clone(),
        })
    }

    /// Hand a notification to the local subscribers of its channel.
    fn dispatch(&self, notification: PgNotification, subscribers: &mut Subscribers<'_, Item>) {
        let ident = notification.channel();
        if !subscribers.contains(ident) {
            return; // a notification still in flight for a channel just released
        }
        match wire::decode(notification.payload()) {
            Some(Notice::Inline {
                channel, payload, ..
            }) => {
                let payload = Bytes::from(payload);
                let mine = |name: &str| (name == channel).then(|| Item::Message(payload.clone()));
                if subscribers.deliver(ident, mine) == Some(0) {
                    // Another name with the same identifier: never delivered here.
                    tracing::debug!("postgres: notification for another channel name dropped");
                }
            }
            Some(Notice::Reference { id }) => {
                subscribers.deliver(ident, |name| {
                    Some(Item::Row(Arc::new(Row {
                        id: id.clone(),
                        channel: name.to_owned(),
                        db: self.db.clone(),
                        fetched: OnceCell::new(),
                    })))
                });
            }
            None => {
                tracing::warn!(
                    channel = ident,
                    "postgres: a notification that is not bgtask's was dropped"
                );
            }
        }
    }

    fn gap() -> Item {
        Item::Gap
    }

    /// The pooled connections most likely went the same way: retire the idle ones, so the first
    /// operations after the outage do not fail on them.
    fn lost(&self) {
        self.db.pool.invalidate();
    }
}

/// One listener connection.
struct Listener {
    listener: PgListener,
    secret: Option<String>,
}

impl Listener {
    /// A database error is the server saying no on a connection that is fine; any other error
    /// means the connection is lost.
    fn failure(&self, e: sqlx::Error) -> Failure {
        match e {
            sqlx::Error::Database(e) => Failure::Refused(from_sqlx(
                "subscribe",
                sqlx::Error::Database(e),
                self.secret.as_deref(),
            )),
            e => Failure::Lost(e.to_string()),
        }
    }

    async fn select_1(&mut self) -> std::result::Result<(), sqlx::Error> {
        sqlx::query("SELECT 1")
            .execute(&mut self.listener)
            .await
            .map(drop)
    }
}

impl Connection for Listener {
    type Message = PgNotification;

    /// `try_recv` reads whole messages only (`PgStream::recv_unchecked` is cancel-safe), so
    /// nothing is lost when another branch wins.
    async fn recv(&mut self) -> std::result::Result<PgNotification, String> {
        match self.listener.try_recv().await {
            Ok(Some(notification)) => Ok(notification),
            // sqlx saw the connection end (EOF, aborted, broken pipe, timed out).
            Ok(None) => Err("the connection closed".to_owned()),
            // Any other error, e.g. a connection reset, which sqlx returns as an error without
            // dropping the connection (launchbadge/sqlx#4014).
            Err(e) => Err(format!("receive failed: {e}")),
        }
    }

    /// `listen` quotes the identifier (ours are [a-z0-9_] anyway) and returns once the server
    /// answered, so the LISTEN is in effect. On an identifier already LISTENed to, a plain
    /// round trip: either way, every notification committed before the server read this
    /// command arrives before its answer.
    async fn subscribe(&mut self, key: &str, subscribed: bool) -> std::result::Result<(), Failure> {
        let result = if subscribed {
            self.select_1().await
        } else {
            self.listener.listen(key).await
        };
        result.map_err(|e| self.failure(e))
    }

    async fn subscribe_all(&mut self, keys: &[String]) -> std::result::Result<(), String> {
        let listen = self.listener.listen_all(keys.iter().map(String::as_str));
        listen.await.map_err(|e| e.to_string())
    }

    async fn unsubscribe(&mut self, key: &str) -> std::result::Result<(), Failure> {
        let result = self.listener.unlisten(key).await;
        result.map_err(|e| self.failure(e))
    }

    async fn ping(&mut self) -> std::result::Result<(), String> {
        self.select_1().await.map_err(|e| e.to_string())
    }

    fn buffered(&mut self) -> Option<PgNotification> {
        self.listener.next_buffered()
    }
}
