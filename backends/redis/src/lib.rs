//! The Redis backend of bgtask: [`RedisBroker`], a [`Broker`] on a Redis server.
//!
//! ```no_run
//! # async fn example() -> bgtask_core::Result<()> {
//! use std::time::Duration;
//! use bgtask_redis::{RedisBroker, RedisConfig};
//!
//! let broker = RedisBroker::connect("redis://127.0.0.1:6379").await?;
//! let tuned = RedisBroker::connect_with(
//!     RedisConfig::new("redis://:secret@redis.internal:6379/2")
//!         .with_op_timeout(Duration::from_secs(2)),
//! )
//! .await?;
//! # Ok(())
//! # }
//! ```
//!
//! # URLs
//!
//! - `redis://host[:port][/db]`, `redis://:password@host`, `redis://user:password@host` (ACL
//!   users), with the password percent-encoded where needed;
//! - `rediss://...` for TLS, with the `tls` cargo feature (on by default): rustls with the
//!   `ring` provider and the platform's root certificates (`SSL_CERT_FILE` is honoured). If
//!   another crate enables a second rustls provider, install one with
//!   `rustls::crypto::CryptoProvider::install_default` before connecting;
//! - `redis+unix:///path/to/redis.sock?db=0&user=...&pass=...` for a Unix socket;
//! - `?protocol=resp3` selects RESP3 for the command connection;
//! - `redis+cluster://[user[:password]@]host:port[,host:port...]` for a Redis Cluster (7.0 or
//!   later), `rediss+cluster://...` with TLS: any reachable nodes, each with its port; database 0
//!   only, no query (see [Redis Cluster](#redis-cluster)).
//!
//! The password never appears in `Debug` output or in error messages.
//!
//! # Connections
//!
//! A broker holds two connections, and its clones share them:
//!
//! - **Commands** (publish, claims and the lease operations) go over one multiplexed
//!   connection. Any I/O error, and any operation that gets no answer in time, drops it; the next
//!   operation opens a new one. After a failed attempt the next one waits (50 ms, doubling up to
//!   [`connection.max_backoff`](bgtask_core::ConnectionSettings::max_backoff), jittered: [`bgtask_core::backoff`]); an operation that cannot get a connection
//!   within its own bound fails with [`ErrorKind::Unavailable`] instead of waiting longer. When
//!   the subscription connection (below) is found lost, the command connection is dropped as
//!   well, so the first command after an outage does not fail on a dead socket. Nothing is
//!   retried after a request may have reached the server, so a publish is never delivered twice.
//! - **Subscriptions** share one dedicated pub/sub connection owned by a supervisor task (the
//!   one of every backend, [`bgtask_core::supervisor`]). It
//!   keeps a registry of channels and their local subscribers: the first subscriber of a channel
//!   sends `SUBSCRIBE` (never `PSUBSCRIBE`, so `*` and `?` in names are plain characters) and
//!   [`subscribe`](Broker::subscribe) returns once the server confirmed it; further subscribers
//!   of that channel need no round trip; dropping the last one sends `UNSUBSCRIBE`.
//!
//!   A watchdog pings the connection every [`liveness_interval`](bgtask_core::ConnectionSettings::liveness_interval) and
//!   expects the answer within [`connection.op_timeout`](bgtask_core::ConnectionSettings::op_timeout). When a ping fails or
//!   the connection ends, the supervisor reconnects, forever, with exponential backoff capped
//!   at [`connection.max_backoff`](bgtask_core::ConnectionSettings::max_backoff); subscribes every channel that still has
//!   subscribers, checking each confirmation; and only then yields [`Incoming::Gap`](bgtask_core::Incoming::Gap) on every
//!   subscription that existed during the outage. While disconnected,
//!   [`subscribe`](Broker::subscribe) waits at most `op_timeout` for the connection to come
//!   back, then fails with [`ErrorKind::Unavailable`].
//!
//!   Each subscription buffers up to [`connection.subscription_buffer`](bgtask_core::ConnectionSettings::subscription_buffer)
//!   messages and [`connection.subscription_buffer_bytes`](bgtask_core::ConnectionSettings::subscription_buffer_bytes)
//!   payload bytes; when its reader falls further behind, new messages are dropped and the next
//!   item it reads is an [`Incoming::Gap`](bgtask_core::Incoming::Gap).
//!
//! Subscriptions keep the subscription connection alive: it closes when the last clone of the
//! broker and the last subscription are dropped, or at once with [`RedisBroker::close`], which
//! also ends every subscription stream.
//!
//! `redis`'s own reconnection is deliberately not used: `aio::PubSub` never reconnects, the
//! `ConnectionManager` resubscribes only over RESP3, gives up after a handful of retries and
//! ignores a failed resubscription, and it keeps a command connection that times out instead of
//! replacing it.
//!
//! # Time bounds
//!
//! Every operation finishes within [`connection.op_timeout`](bgtask_core::ConnectionSettings::op_timeout) (publish, each lease
//! call, subscribe), including any reconnection it triggers; each connection attempt is bounded
//! by [`connection.connect_timeout`](bgtask_core::ConnectionSettings::connect_timeout). [`RedisBroker::connect`] fails with
//! [`ErrorKind::Unavailable`] when the server cannot be reached and with [`ErrorKind::Auth`] when
//! it refuses the credentials. A lost, refused or silent connection is reported as
//! [`ErrorKind::Unavailable`] (an operation that timed out included), so that it is never
//! confused with a task's own deadline; ACL denials are [`ErrorKind::Auth`].
//!
//! # Lease layout
//!
//! Lease key `K` (any UTF-8 string, used byte for byte) is stored in two Redis keys:
//!
//! - `bgl:{K}`, a sorted set: member = lease id, score = expiry in milliseconds by the server's
//!   clock (`TIME`);
//! - `bgn:{K}`, a hash: lease id → `"<seq>:<note>"` and the counter field `#seq`, which orders
//!   leases by acquisition for [`Broker::leases`].
//!
//! One Lua script (loaded with `EVALSHA` and reloaded by `redis::Script` after a `NOSCRIPT`, e.g.
//! when the server restarted) does `acquire`, `leases` and `count` atomically, reading the clock
//! inside the script: `acquire` drops the expired leases, counts the live ones, and, under the
//! cap, adds one. `admit` (every keyed task's admission) is one run of the same script on four
//! keys: the blacklist flag's live lease, if any, refuses; else it acquires as `acquire` does.
//! `admit_and_publish` (the admission with the task's offer) is the same run with the channel
//! and the message as two more arguments: the script `PUBLISH`es them when the lease is granted,
//! so a keyed task's offer costs one round trip, like an unkeyed one. When neither the flag nor
//! the limit key exists (most admissions), one `EXISTS` on both settles it. (On a Redis Cluster,
//! where the flag and the limit key hash to different slots, `admit` is the flag check, then the
//! acquire; `admit_and_publish` is `admit`, then `SPUBLISH`.) The calls that need no decision
//! skip the script, which costs far more on the server than the commands it runs:
//!
//! - `release` is one pipeline of `TIME`, `ZSCORE`, `ZREM` and `HDEL` (it was live if its
//!   expiry is after `TIME`); `release_and_publish` (a worker's reply to a keyed task) is the
//!   same pipeline with the `PUBLISH` at its end, one round trip, the slot free before the
//!   reply goes out. One connection's commands run in order, and nothing between them can make
//!   the lease live again, so they need no `MULTI`, whose `QUEUED` replies would double what
//!   the client parses (on a cluster `release` keeps `MULTI`, so that `TIME` is the key's node's);
//! - `leases` and `count` first ask `EXISTS bgl:{K}`; a key without leases (every blacklist
//!   check of a value that is not blacklisted) costs that one command.
//!
//! Each acquire sets both keys' TTL to the time left on their longest live lease; a release does
//! not shorten it. So a key outlives neither the leases acquired on it nor, when the last lease
//! is released, the longest of them (the hash then holds only its counter), even when its
//! creators crashed. The `{K}` hash tag keeps both
//! keys of a lease key on one slot of a Redis Cluster. TTLs are capped at
//! [`lease::MAX_TTL_MILLIS`] (about 69 years).
//!
//! A claim ([`Broker::claim`], the protocol's first-accept-wins) is one native command instead:
//! `SET bgc:{K} 1 NX PX <ttl>`, judged by the server's clock and gone at its TTL. It costs one
//! round trip and no script, which roughly doubles the task rate (`bgtask bench --compare`).
//!
//! # Redis Cluster
//!
//! With a `redis+cluster://` URL the broker uses `redis`'s cluster client over RESP3:
//!
//! - **Commands** go to the master of their key's slot. The two Redis keys of a lease key share
//!   a slot (the `{K}` hash tag), so `acquire`, `leases`, `count` and `release` stay one script
//!   or transaction on one node, and different lease keys (task names, key values) spread over
//!   the slots. What spans slots runs as separate steps: `admit` (the blacklist flag, then the
//!   limit key), `release_and_publish` (the release, then the publish) and `list_keys` (`SCAN`
//!   on every master, then each key's count). MOVED and ASK redirections and a failover's
//!   `TRYAGAIN`/`CLUSTERDOWN` are retried by the client within the operation's bound; a
//!   `NOSCRIPT` (a promoted replica, a restart) reloads the script on every node. Each try on a
//!   node waits at most half of `op_timeout`, and a node's connection at most half of
//!   `connect_timeout`, so a silent node fails its tries instead of holding the others up; an
//!   operation that gets no answer at all opens a fresh cluster connection (a fresh view of the
//!   slots) in the background, which the next operations use once it is up.
//! - **Pub/sub is sharded**: `publish` is `SPUBLISH` and subscriptions are `SSUBSCRIBE`s on the
//!   master of the channel's slot, so a message is not forwarded to every node; the receiver
//!   count `SPUBLISH` returns is the shard's. One cluster connection carries every subscription
//!   of a broker, under the same supervisor as one server's pub/sub connection. Its liveness ping
//!   goes to every master; when one does not answer within `op_timeout` (dead, paused, failed
//!   over), when a node's connection drops, or when the server ends a subscription itself
//!   (`sunsubscribe`: the channel's slot moved away, by a resharding or a failover), the
//!   connection counts as lost: every subscription is owed a gap, a fresh connection (a fresh
//!   view of the slots) replaces it, every channel is subscribed again on the master that now
//!   owns its slot, and then the gaps are paid. The old connection is gone before the new one
//!   subscribes, so nothing arrives twice.
//! - During a failover a request whose connection broke after it was sent may be retried by the
//!   client on the slot's new master, so a published message can, rarely, arrive twice; the task
//!   protocol tolerates that (the claim decides who runs a task, and a reply is taken once).
//!
//! A `redis+cluster://` URL naming a server that is not in cluster mode, and a `redis://` URL
//! naming a cluster node (whose keys would answer MOVED), are [`ErrorKind::Config`] errors that
//! say so.
//!
//! # Configuration
//!
//! | field | default | meaning |
//! |-------|---------|---------|
//! | [`url`](RedisConfig::url) | — | where the server is (see above) |
//! | [`connection.op_timeout`](bgtask_core::ConnectionSettings::op_timeout) | 5 s | bound on every operation and on the watchdog's ping |
//! | [`connection.connect_timeout`](bgtask_core::ConnectionSettings::connect_timeout) | 5 s | bound on one connection attempt |
//! | [`connection.liveness_interval`](bgtask_core::ConnectionSettings::liveness_interval) | 2 s | how often the pub/sub connection is pinged |
//! | [`connection.max_backoff`](bgtask_core::ConnectionSettings::max_backoff) | 2 s | longest wait between reconnection attempts |
//! | [`connection.subscription_buffer`](bgtask_core::ConnectionSettings::subscription_buffer) | 65536 | messages buffered per subscription |
//! | [`connection.subscription_buffer_bytes`](bgtask_core::ConnectionSettings::subscription_buffer_bytes) | 64 MiB | payload bytes buffered per subscription |
//!
//! # Tests
//!
//! The integration tests need a Redis at `BGTASK_REDIS_URL` (default `redis://127.0.0.1:6379`;
//! `docker compose up -d redis` or `redis-server --port 6379`) and fail when there is none. They
//! use random key and channel prefixes and never flush or reconfigure the server. Tests that
//! need a server of their own (`SCRIPT FLUSH`, a restart) or TLS are `#[ignore]`d; run them
//! with `cargo test -p bgtask-redis -- --ignored`.
#![deny(missing_docs)]

mod cluster;
mod cluster_pubsub;
mod config;
mod conn;
mod error;
pub mod lease;
mod pubsub;

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bgtask_core::{
    Acquired, Admission, Broker, Capabilities, Error, ErrorKind, KeyCount, KeyPage, KeyedOffer,
    LeaseId, LeaseInfo, LeaseRequest, Published, Result, Subscription, MAX_KEY_PAGE,
};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use redis::Value;

pub use config::{
    RedisConfig, DEFAULT_CONNECT_TIMEOUT, DEFAULT_LIVENESS_INTERVAL, DEFAULT_MAX_BACKOFF,
    DEFAULT_OP_TIMEOUT, DEFAULT_SUBSCRIPTION_BUFFER, DEFAULT_SUBSCRIPTION_BUFFER_BYTES,
};

use bgtask_core::supervisor::SupervisorHandle;
use cluster_pubsub::ClusterTransport;
use conn::{Commands, Conn, Target};
use pubsub::RedisPubSub;
use redis::cluster_routing::RoutingInfo;

/// A [`Broker`] on a Redis server. Cheap to clone; clones share the connections.
///
/// See the [crate docs](crate) for how it connects, reconnects and stores leases. Subscriptions
/// keep the subscription connection alive: it closes when the last clone and the last
/// subscription are dropped, or at once with [`close`](Self::close), which also ends every
/// subscription stream.
#[derive(Clone)]
pub struct RedisBroker {
    inner: Arc<Inner>,
}

struct Inner {
    config: RedisConfig,
    closed: AtomicBool,
    commands: Arc<Commands>,
    subscriptions: Subscriptions,
    script: redis::Script,
}

/// Where subscriptions live: one server's pub/sub connection, or a cluster's sharded pub/sub.
enum Subscriptions {
    Server(SupervisorHandle<RedisPubSub>),
    Cluster(SupervisorHandle<ClusterTransport>),
}

impl Subscriptions {
    fn is_cluster(&self) -> bool {
        matches!(self, Subscriptions::Cluster(_))
    }

    fn close(&self) {
        match self {
            Subscriptions::Server(pubsub) => pubsub.close(),
            Subscriptions::Cluster(pubsub) => pubsub.close(),
        }
    }

    fn channels(&self) -> usize {
        match self {
            Subscriptions::Server(pubsub) => pubsub.channels(),
            Subscriptions::Cluster(pubsub) => pubsub.channels(),
        }
    }
}

impl RedisBroker {
    /// Connect to the server at `url` with default settings.
    ///
    /// Fails with [`ErrorKind::Config`] for a URL that is not a Redis URL,
    /// [`ErrorKind::Unavailable`] when the server cannot be reached within the connect timeout,
    /// and [`ErrorKind::Auth`] when it refuses the credentials.
    pub async fn connect(url: &str) -> Result<RedisBroker> {
        Self::connect_with(RedisConfig::new(url)).await
    }

    /// Connect with the given settings; fails like [`connect`](Self::connect).
    pub async fn connect_with(config: RedisConfig) -> Result<RedisBroker> {
        config.validate()?;
        if cluster::is_cluster_url(&config.url) {
            return Self::connect_cluster(config).await;
        }
        let client = redis::Client::open(config.url.as_str()).map_err(|e| {
            Error::new(
                ErrorKind::Config,
                format!("not a usable redis URL: {}", config.redacted_url()),
            )
            .with_source(e)
        })?;
        let commands = Arc::new(Commands::new(Target::Server(client.clone()), &config));
        commands.connect_now().await?;
        // Opening a connection sends no command when the URL has no credentials: ask the server
        // once, so a server that wants a password (NOAUTH) is an `Auth` error here, at connect,
        // and not on the first publish. The same answer says whether it is a cluster node, which
        // would answer most keys with MOVED.
        let info: String = commands
            .run("connect", |mut conn| async move {
                redis::cmd("INFO")
                    .arg("cluster")
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        if info.lines().any(|line| line.trim() == "cluster_enabled:1") {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "{} is a Redis Cluster node: use redis+cluster://host:port[,host:port...]",
                    config.redacted_url()
                ),
            ));
        }
        // When the subscription connection is lost, the command connection most likely is too:
        // drop it, so that the first command after an outage does not fail on a dead socket.
        let weak = Arc::downgrade(&commands);
        let on_lost = Box::new(move || {
            if let Some(commands) = weak.upgrade() {
                commands.invalidate_current();
            }
        });
        let pubsub = pubsub::start(client, &config, on_lost).await?;
        tracing::debug!(url = %config.redacted_url(), "redis: broker connected");
        Ok(Self::new(config, commands, Subscriptions::Server(pubsub)))
    }

    /// Connect to the Redis Cluster of a `redis+cluster://` URL.
    async fn connect_cluster(config: RedisConfig) -> Result<RedisBroker> {
        let client = cluster::client(&config, None)?;
        let commands = Arc::new(Commands::new(Target::Cluster(client), &config));
        commands
            .connect_now()
            .await
            .map_err(|e| error::refine_cluster_connect(&config, e))?;
        commands
            .run("connect", |mut conn| async move {
                redis::cmd("PING").query_async::<()>(&mut conn).await
            })
            .await?;
        let pubsub = cluster_pubsub::start(&config).await?;
        tracing::debug!(url = %config.redacted_url(), "redis: cluster broker connected");
        Ok(Self::new(config, commands, Subscriptions::Cluster(pubsub)))
    }

    fn new(config: RedisConfig, commands: Arc<Commands>, subscriptions: Subscriptions) -> Self {
        RedisBroker {
            inner: Arc::new(Inner {
                config,
                closed: AtomicBool::new(false),
                commands,
                subscriptions,
                script: redis::Script::new(lease::SCRIPT),
            }),
        }
    }

    /// Whether this broker talks to a Redis Cluster (a `redis+cluster://` URL).
    pub fn is_cluster(&self) -> bool {
        self.inner.subscriptions.is_cluster()
    }

    /// The settings this broker was built with.
    pub fn config(&self) -> &RedisConfig {
        &self.inner.config
    }

    /// Close the broker and every clone of it now: every subscription stream ends, and every
    /// later call fails with [`ErrorKind::Closed`].
    ///
    /// Without it the connections close when the last clone and the last subscription are
    /// dropped.
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        self.inner.subscriptions.close();
        self.inner.commands.invalidate_current();
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::SeqCst)
    }

    fn check_open(&self, what: &str) -> Result<()> {
        if self.is_closed() {
            return Err(error::closed(what));
        }
        Ok(())
    }

    /// Whether lease key `key` has a sorted set, i.e. any lease at all (live or not yet purged).
    /// One `EXISTS` settles the common case of a key without leases (every blacklist check of a
    /// value that is not blacklisted) without running the script.
    async fn lease_key_exists(&self, what: &str, key: &str) -> Result<bool> {
        self.check_open(what)?;
        let (leases, _) = lease::keys(key);
        self.inner
            .commands
            .run(what, |mut conn| async move {
                redis::cmd("EXISTS")
                    .arg(leases)
                    .query_async::<u64>(&mut conn)
                    .await
            })
            .await
            .map(|n| n > 0)
    }

    /// The lease keys whose sorted set matches `pattern`, by `SCAN` (on the node `route` names,
    /// on a cluster).
    async fn scan(&self, pattern: &[u8], route: Option<RoutingInfo>) -> Result<Vec<String>> {
        let mut found = Vec::new();
        let mut cursor = 0u64;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000)
                .arg("TYPE")
                .arg("zset");
            let route = route.clone();
            let (next, batch): (u64, Vec<Vec<u8>>) = self
                .inner
                .commands
                .run("list keys", |conn| async move {
                    match (conn, route) {
                        (Conn::Cluster(mut conn), Some(route)) => {
                            let value = conn.route_command(scan, route).await?;
                            Ok(redis::FromRedisValue::from_redis_value(value)?)
                        }
                        (mut conn, _) => scan.query_async(&mut conn).await,
                    }
                })
                .await?;
            found.extend(batch.iter().filter_map(|k| lease::lease_key_of(k)));
            if next == 0 {
                return Ok(found);
            }
            cursor = next;
        }
    }

    /// The masters of the cluster.
    async fn masters(&self) -> Result<Vec<(String, u16)>> {
        self.inner
            .commands
            .run("list keys", |conn| async move {
                match conn {
                    Conn::Cluster(mut conn) => cluster::masters(&mut conn).await,
                    Conn::Server(_) => Ok(Vec::new()),
                }
            })
            .await
    }

    /// The live leases of each of `keys`, by the server's clock: `TIME`, then one pipeline of
    /// `ZCOUNT bgl:{key} (now +inf`. On a cluster, where the keys live in different slots (and
    /// each node has its clock), each key's `count`.
    async fn live_counts(&self, keys: &[String]) -> Result<Vec<KeyCount>> {
        if self.is_cluster() {
            // The keys live on different nodes: their counts run side by side, 64 at a time.
            let counts: Vec<_> = keys
                .iter()
                .map(|key| async move {
                    let live = self.count(key).await?;
                    Ok::<_, Error>(KeyCount {
                        key: key.clone(),
                        live,
                    })
                })
                .collect();
            return futures::stream::iter(counts)
                .buffered(64)
                .try_collect()
                .await;
        }
        let time: (u64, u64) = self
            .inner
            .commands
            .run("list keys", |mut conn| async move {
                redis::cmd("TIME").query_async(&mut conn).await
            })
            .await?;
        let now = lease::millis(time);
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.zcount(lease::keys(key).0, format!("({now}"), "+inf");
        }
        let counts: Vec<u64> = self
            .inner
            .commands
            .run("list keys", |mut conn| async move {
                pipe.query_async(&mut conn).await
            })
            .await?;
        Ok(keys
            .iter()
            .zip(counts)
            .map(|(key, live)| KeyCount {
                key: key.clone(),
                live,
            })
            .collect())
    }

    /// Run the lease script with operation `args[0]` on lease key `key` (and, for `admit`, on
    /// the blacklist flag `flag`).
    async fn lease_script(
        &self,
        what: &str,
        key: &str,
        flag: Option<&str>,
        args: Vec<Vec<u8>>,
    ) -> Result<Value> {
        self.check_open(what)?;
        let (leases, notes) = lease::keys(key);
        let flag = flag.map(lease::keys);
        let script = &self.inner.script;
        self.inner
            .commands
            .run(what, |mut conn| async move {
                let mut invocation = script.prepare_invoke();
                invocation.key(leases).key(notes);
                if let Some((flag_leases, flag_notes)) = flag {
                    invocation.key(flag_leases).key(flag_notes);
                }
                for arg in args {
                    invocation.arg(arg);
                }
                invocation.invoke_async::<Value>(&mut conn).await
            })
            .await
    }
}

impl fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBroker")
            .field("url", &self.inner.config.redacted_url())
            .field("op_timeout", &self.inner.config.connection.op_timeout)
            .field("cluster", &self.is_cluster())
            .field("subscribed_channels", &self.inner.subscriptions.channels())
            .finish()
    }
}

#[async_trait]
impl Broker for RedisBroker {
    /// `PUBLISH`; on a cluster `SPUBLISH`, which reaches the subscribers of the channel's shard.
    async fn publish(&self, channel: &str, payload: Bytes) -> Result<Published> {
        self.check_open("publish")?;
        let command = if self.is_cluster() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        };
        let receivers = self
            .inner
            .commands
            .run("publish", |mut conn| async move {
                redis::cmd(command)
                    .arg(channel)
                    .arg(payload.as_ref())
                    .query_async::<u64>(&mut conn)
                    .await
            })
            .await?;
        Ok(Published::Receivers(receivers))
    }

    async fn subscribe(&self, channel: &str) -> Result<Subscription> {
        self.check_open("subscribe")?;
        match &self.inner.subscriptions {
            Subscriptions::Server(supervisor) => pubsub::subscribe(supervisor, channel).await,
            Subscriptions::Cluster(supervisor) => pubsub::subscribe(supervisor, channel).await,
        }
    }

    async fn acquire(&self, key: &str, request: LeaseRequest) -> Result<Acquired> {
        let id = request.lease_id();
        let args = lease::acquire_args("acquire", &id, &request);
        let value = self.lease_script("acquire", key, None, args).await?;
        lease::parse_acquired(id, value)
    }

    /// One script run: the flag check and the acquire (see the crate docs, *Lease layout*). On
    /// a cluster, where the flag and the key live in different slots, the flag check, then the
    /// acquire.
    async fn admit(&self, flag: &str, key: &str, request: LeaseRequest) -> Result<Admission> {
        if self.is_cluster() && !cluster::same_slot(&lease::keys(flag).0, &lease::keys(key).0) {
            return bgtask_core::broker::admit_in_two_steps(self, flag, key, request).await;
        }
        let id = request.lease_id();
        let args = lease::acquire_args("admit", &id, &request);
        let value = self.lease_script("admit", key, Some(flag), args).await?;
        Ok(lease::parse_admission(id, value)?.0)
    }

    /// The admission script with the message: it publishes it when the lease is granted, so a
    /// keyed task's offer costs one round trip, as an unkeyed task's does. On a cluster (the
    /// keys and the channel live in different slots): the admission, then `SPUBLISH`.
    async fn admit_and_publish(
        &self,
        offer: KeyedOffer<'_>,
    ) -> Result<(Admission, Option<Published>)> {
        if self.is_cluster() {
            return bgtask_core::broker::admit_then_publish(self, offer).await;
        }
        let id = offer.request.lease_id();
        let mut args = lease::acquire_args("admit", &id, &offer.request);
        args.push(offer.channel.as_bytes().to_vec());
        args.push(offer.payload.to_vec());
        let value = self
            .lease_script("admit and publish", offer.key, Some(offer.flag), args)
            .await?;
        let (admission, receivers) = lease::parse_admission(id, value)?;
        Ok((admission, receivers.map(Published::Receivers)))
    }

    /// One pipeline: the release's commands (see [`release`](Broker::release)), then
    /// `PUBLISH`. One round trip, and the release is applied before the message goes out. On a
    /// cluster (the key and the channel live in different slots): the release, then `SPUBLISH`.
    async fn release_and_publish(
        &self,
        key: &str,
        lease: &LeaseId,
        channel: &str,
        payload: Bytes,
    ) -> Result<(Published, bool)> {
        self.check_open("release and publish")?;
        if self.is_cluster() {
            return bgtask_core::broker::release_then_publish(self, key, lease, channel, payload)
                .await;
        }
        let mut pipe = lease::release_pipe(key, lease, false);
        pipe.publish(channel, payload.as_ref());
        let (time, expiry, _, _, receivers): lease::ReleaseAndPublishReply = self
            .inner
            .commands
            .run("release and publish", |mut conn| async move {
                pipe.query_async(&mut conn).await
            })
            .await?;
        let released = expiry.is_some_and(|expiry| expiry > lease::millis(time) as f64);
        Ok((Published::Receivers(receivers), released))
    }

    /// One pipeline (`TIME`, `ZSCORE`, `ZREM`, `HDEL`; on a cluster in `MULTI`/`EXEC`), no
    /// script.
    async fn release(&self, key: &str, lease: &LeaseId) -> Result<bool> {
        self.check_open("release")?;
        let pipe = lease::release_pipe(key, lease, self.is_cluster());
        let (time, expiry, ..): lease::ReleaseReply = self
            .inner
            .commands
            .run("release", |mut conn| async move {
                pipe.query_async(&mut conn).await
            })
            .await?;
        Ok(expiry.is_some_and(|expiry| expiry > lease::millis(time) as f64))
    }

    async fn leases(&self, key: &str) -> Result<Vec<LeaseInfo>> {
        if !self.lease_key_exists("leases", key).await? {
            return Ok(Vec::new());
        }
        let value = self
            .lease_script("leases", key, None, vec![b"leases".to_vec()])
            .await?;
        lease::parse_leases(value)
    }

    async fn count(&self, key: &str) -> Result<u64> {
        if !self.lease_key_exists("count", key).await? {
            return Ok(0);
        }
        let value = self
            .lease_script("count", key, None, vec![b"count".to_vec()])
            .await?;
        lease::parse_count(value)
    }

    /// One native `SET bgc:{key} 1 NX PX ttl`: the server's clock, one round trip, no script.
    async fn claim(&self, key: &str, ttl: Duration) -> Result<bool> {
        self.check_open("claim")?;
        let key = lease::claim_key(key);
        let millis = bgtask_core::broker::ttl_millis(ttl).min(lease::MAX_TTL_MILLIS);
        self.inner
            .commands
            .run("claim", |mut conn| async move {
                redis::cmd("SET")
                    .arg(key)
                    .arg(1)
                    .arg("NX")
                    .arg("PX")
                    .arg(millis)
                    .query_async::<Option<String>>(&mut conn)
                    .await
            })
            .await
            .map(|set| set.is_some())
    }

    /// An incremental `SCAN … MATCH bgl:{<prefix>* TYPE zset` over the keyspace (never one
    /// blocking command; on a cluster, over each master's), then the live leases of a page of
    /// the keys found.
    async fn list_keys(&self, prefix: &str, after: Option<&str>, limit: usize) -> Result<KeyPage> {
        self.check_open("list keys")?;
        let pattern = lease::scan_pattern(prefix);
        let mut found = Vec::new();
        if self.is_cluster() {
            for (host, port) in self.masters().await? {
                found.extend(
                    self.scan(&pattern, Some(cluster::node(&host, port)))
                        .await?,
                );
            }
        } else {
            found = self.scan(&pattern, None).await?;
        }
        found.retain(|key| after.is_none_or(|after| key.as_str() > after));
        found.sort_unstable();
        found.dedup();
        // Counted one page at a time, a little over `limit` for the keys that expire meanwhile.
        let mut page = Vec::new();
        for chunk in found.chunks(limit.clamp(1, MAX_KEY_PAGE) + 1) {
            page.extend(self.live_counts(chunk).await?);
            if page.iter().filter(|k: &&KeyCount| k.live > 0).count() > limit {
                break;
            }
        }
        Ok(KeyPage::collect(page, prefix, after, limit))
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(true, true).with_key_listing()
    }
}
