//! The PostgreSQL backend of bgtask: [`PostgresBroker`], a [`Broker`] on LISTEN/NOTIFY and three
//! tables, for teams that already run PostgreSQL and want no second server.
//!
//! ```no_run
//! # async fn example() -> bgtask_core::Result<()> {
//! use std::time::Duration;
//! use bgtask_postgres::{PostgresBroker, PostgresConfig};
//!
//! let broker = PostgresBroker::connect("postgres://postgres@127.0.0.1:5432/test").await?;
//! let tuned = PostgresBroker::connect_with(
//!     PostgresConfig::new("postgresql://app:secret@db.internal/app?sslmode=require")
//!         .with_schema("jobs")
//!         .with_op_timeout(Duration::from_secs(2)),
//! )
//! .await?;
//! # Ok(())
//! # }
//! ```
//!
//! Requires PostgreSQL 12 or later (generated columns, `sha256()`, `hashtextextended()`).
//!
//! # URLs
//!
//! `postgres://[user[:password]@]host[:port][/database][?param=value&...]`, or `postgresql://`.
//! The driver's parameters work as usual: `sslmode` (`disable`, `prefer`, `require`,
//! `verify-ca`, `verify-full`; TLS needs the `tls` cargo feature, on by default: rustls with
//! `ring` and the webpki roots, `sslrootcert` for your own CA), `host=/run/postgresql` for a
//! Unix socket, `application_name`, `options`, `password`. bgtask adds `schema=<name>` (see
//! below), which is removed before the URL reaches the driver. The password never appears in
//! `Debug` output or in error messages.
//!
//! # Schema
//!
//! Everything lives in one schema, [`schema`](PostgresConfig::schema) (default `bgtask`),
//! created on [`connect`](PostgresBroker::connect) by embedded, versioned migrations: run in
//! one transaction under a transaction-scoped advisory lock (so brokers starting together
//! migrate once), recorded in `<schema>.migrations`, and skipped with a single read when the
//! schema is current (so a role without `CREATE` works once an administrator migrated; a
//! broker of a newer version on an older schema needs `CREATE` on the schema, or an
//! administrator to connect once first). The migrations: 1 creates `leases`, `payloads` and
//! `acquire_lease`; 2 adds `claims`; 3 adds `admit_lease`. The tables:
//!
//! - `leases (key bytea, key_hash bytea = sha256(key), id text, note bytea, seq bigint,
//!   expires_at timestamptz)`, primary key `(key_hash, id)`: one row per live lease. Keys and
//!   notes are stored as their UTF-8 bytes, so any name works, NUL included (PostgreSQL text
//!   cannot hold NUL), and the index holds a fixed-size hash whatever the key's length;
//! - `payloads (id text, channel bytea, data bytea, expires_at timestamptz)`: messages too
//!   large for one notification (below);
//! - `claims (key bytea, key_hash bytea = sha256(key) primary key, expires_at timestamptz)`:
//!   one row per claimed key, see *Claims*;
//! - the function `acquire_lease(key, id, note, ttl_ms, cap)`, see *Leases*.
//!
//! Brokers on different schemas of one database never meet: the schema is part of every
//! channel identifier.
//!
//! # Publish and subscribe
//!
//! [`publish`](Broker::publish) is one statement, `SELECT pg_notify($1, $2)`, with the channel
//! identifier and the text as bind parameters; nothing is ever pasted into SQL. See [`wire`]
//! for the exact formats.
//!
//! - **Channel names.** LISTEN truncates identifiers at 63 bytes, a NUL ends them and unquoted
//!   ones fold to lower case, so no Broker name is used as is: each maps to
//!   `bgt_<56 hex digits of SHA-256(schema, NUL, name)>`. Every notification also carries the
//!   full name, and subscribers deliver only messages whose name is exactly theirs, so two
//!   names never share traffic, even on a hash collision.
//! - **Unique notifications.** PostgreSQL merges identical notifications of one transaction;
//!   every notification starts with a fresh 128-bit message id, so none is ever identical.
//! - **Binary payloads and the 7999-byte limit.** Notifications are text, so payloads travel as
//!   base64 (4 characters per 3 bytes). When the whole notification (id, base64 name, base64
//!   payload) would exceed 7999 bytes, the message goes **by reference**: the same statement
//!   inserts it into `payloads` and notifies `1r<id>`; each subscribing broker reads the row
//!   once, when its reader gets to that message, so messages stay in order. Rows expire after
//!   [`payload_ttl`](PostgresConfig::payload_ttl) (default 30 s) and are deleted by the
//!   cleanup; a reader that comes later gets [`Incoming::Gap`](bgtask_core::Incoming::Gap) instead. Payloads up to
//!   [`max_payload`](PostgresConfig::max_payload) (64 MiB) are accepted.
//! - **One listener connection per broker** carries every subscription: the first subscriber of
//!   a channel sends `LISTEN` and [`subscribe`](Broker::subscribe) returns once the server
//!   answered it; dropping the last one sends `UNLISTEN`. Each subscription buffers
//!   [`connection.subscription_buffer`](bgtask_core::ConnectionSettings::subscription_buffer) messages and
//!   [`connection.subscription_buffer_bytes`](bgtask_core::ConnectionSettings::subscription_buffer_bytes) bytes of inline
//!   payloads (a payload stored as a row is read when the reader gets to it, so it holds no
//!   bytes while it waits); a reader that falls further behind loses messages and reads a `Gap`.
//! - **Receivers are not counted**: PostgreSQL cannot tell who received a notification, so
//!   publish returns [`Published::Unknown`] and [`Capabilities::receiver_counts`] is false.
//!
//! # The listener, its liveness and reconnection
//!
//! A supervisor task (the one of every backend, [`bgtask_core::supervisor`]) owns the listener
//! connection (a `sqlx` `PgListener`). It replaces the
//! connection when `try_recv` reports it lost, when receiving fails with any error (sqlx
//! returns some, like a connection reset, as errors without reconnecting), and when the
//! periodic liveness round trip (`SELECT 1` every
//! [`connection.liveness_interval`](bgtask_core::ConnectionSettings::liveness_interval), answered within
//! [`connection.op_timeout`](bgtask_core::ConnectionSettings::op_timeout)) fails: sqlx sets no TCP keepalive, so without it
//! a half-open connection would wait forever. It reconnects forever, with backoff from 50 ms
//! doubling up to [`connection.max_backoff`](bgtask_core::ConnectionSettings::max_backoff), jittered
//! ([`bgtask_core::backoff`]) (attempts start at most that
//! often; time spent in a failed attempt counts toward the wait), LISTENs every channel that has
//! subscribers again, and only then yields [`Incoming::Gap`](bgtask_core::Incoming::Gap) on each subscription that existed
//! during the outage. sqlx's own `recv()` would reconnect silently; it is not used. While
//! disconnected, `subscribe` waits at most `op_timeout` for the connection to come back.
//!
//! The listener connection's `application_name` is `"<application_name> listener <broker
//! id>"` ([`PostgresBroker::listener_application_name`]), so it can be found in
//! `pg_stat_activity`; the pooled connections use
//! [`application_name`](PostgresConfig::application_name).
//!
//! # Leases
//!
//! [`acquire`](Broker::acquire) is one statement calling `acquire_lease` (through `admit_lease`
//! without a flag, below), a PL/pgSQL function
//! that takes a transaction-scoped advisory lock on the key (a hash of schema and key), reads
//! the database clock (`clock_timestamp()`) after it holds the lock, deletes the key's expired
//! leases, counts the live ones, inserts the new one if under the cap, and returns whether it
//! did and the live count. The lock ends with the statement's transaction; session-level
//! advisory locks, which misbehave with pooled connections, are never used. Every expiry is
//! judged by the database's clock (`clock_timestamp()`, `statement_timestamp()`), never the
//! client's. `release`, `leases` and `count` are single statements. [`admit`](Broker::admit),
//! every keyed task's admission, is one statement calling `admit_lease`, which reads the
//! blacklist flag's oldest live lease and returns it if there is one, else calls `acquire_lease`.
//! [`admit_and_publish`](Broker::admit_and_publish) is the same statement with
//! `pg_notify(…)` for the granted row: the offer goes out at commit, after the insert (a payload
//! too large for one notification takes `admit` then `publish`).
//! [`release_and_publish`](Broker::release_and_publish), a worker's reply to a keyed task, is one
//! statement (`WITH released AS (DELETE …) SELECT … FROM (SELECT pg_notify(…))`): the
//! notification goes out at commit, after the delete; a payload too large for one notification
//! takes `release` then `publish`. TTLs are capped at about
//! 100 years ([`MAX_TTL_MILLIS`]).
//!
//! # Claims
//!
//! [`claim`](Broker::claim), which the protocol calls once per worker per task (the first
//! accept wins), does not go through leases: it is one plain statement on `claims`, without
//! a function or an advisory lock, like Redis's `SET NX PX`:
//!
//! ```sql
//! INSERT INTO claims AS c (key, expires_at)
//!     SELECT $1, clock_timestamp() + $2 * interval '1 millisecond'
//!     WHERE NOT EXISTS (SELECT FROM claims
//!         WHERE key_hash = sha256($1) AND expires_at > clock_timestamp())
//! ON CONFLICT (key_hash) DO UPDATE SET expires_at = EXCLUDED.expires_at
//!     WHERE c.expires_at <= clock_timestamp()
//! RETURNING true
//! ```
//!
//! A row back is a won claim, none a claim that is held. A caller that finds a committed live
//! claim only reads (no row lock, no transaction id, no WAL), which is what most of a task's
//! claims do. Otherwise the primary key decides: of concurrent inserters one wins and the others wait
//! for it and then find its row live; an expired row is taken over in place by whoever locks it
//! first, and the others re-check the row's latest version after the lock and find it live. So
//! exactly one caller holds a key's claim at a time, even across brokers. Expiry is judged by
//! `clock_timestamp()` (the database's clock when the row is looked at, also after waiting for
//! a lock; `now()` would be the start of the transaction), never the client's. Keys are stored
//! as their UTF-8 bytes and indexed by their SHA-256, so keys of any length work (the btree
//! index would refuse a long key itself). TTLs are at least 1 ms and capped like leases'.
//!
//! Each row stays until its claim expired and the cleanup (below) deletes it, or a later claim
//! of the same key takes it over: nothing is stored without an expiry, and the table holds about
//! (claimed keys per second) × (TTL + [`cleanup_interval`](PostgresConfig::cleanup_interval))
//! rows. Claims are never released or listed, and live apart from leases: a claim key is only
//! ever used with `claim`.
//!
//! `claims` is an ordinary (logged) table like `leases`, not `UNLOGGED`: an unlogged table is
//! emptied by a server crash and is not replicated, so after a crash or a failover every task
//! claimed within its TTL could be accepted a second time. With `synchronous_commit = off`
//! (below) only the claims of the server's last fraction of a second are at risk.
//!
//! Brokers before migration 2 took claims as cap-1 leases in `leases`; such a broker and a
//! newer one do not see each other's claims, so upgrade the brokers of one namespace together.
//!
//! # Durability
//!
//! The broker's connections run with `synchronous_commit = off` unless
//! [`synchronous_commit`](PostgresConfig::synchronous_commit) is set: a lease change or a claim
//! then does not wait for its WAL flush (which costs milliseconds per acquire on ordinary disks and
//! caps the task rate). Other sessions see it at once and a client crash loses nothing; only a
//! crash of the server itself may forget the changes of its last fraction of a second.
//!
//! # Cleanup
//!
//! Nothing polls for messages: notifications wake the subscribers. The only periodic work is
//! the listener's round trip and one statement deleting the expired rows of `leases`,
//! `payloads` and `claims` every
//! [`cleanup_interval`](PostgresConfig::cleanup_interval) (default 5 s) by every broker, so no
//! row outlives its expiry by more than that, even when every creator crashed. Acquiring a
//! lease also deletes its key's expired rows; a claim takes over its key's expired row. Each
//! table has an index on `expires_at`, so the cleanup reads only the expired rows.
//!
//! # Time bounds
//!
//! Every operation (publish, subscribe, each lease call, a claim, reading a payload row) finishes
//! within [`connection.op_timeout`](bgtask_core::ConnectionSettings::op_timeout), waiting for a pooled connection (and
//! opening one, within [`connection.connect_timeout`](bgtask_core::ConnectionSettings::connect_timeout)) included; the
//! server aborts statements that run longer (`statement_timeout` = `op_timeout`).
//!
//! The pool is the crate's own, not sqlx's `PgPool`, which tests every connection it takes
//! back with a round trip that has no time bound, in a task that holds a pool slot meanwhile
//! (on a half-open connection until the OS gives up on the socket, with the pool exhausted),
//! and retries refused connections until its timeout. Here a connection whose operation
//! finished goes back without a round trip; one that broke on I/O is closed, together with
//! every idle connection opened before (as when the listener finds its connection lost); one
//! whose operation timed out or was cancelled is brought back in the background by one round
//! trip bounded by `op_timeout`, or closed; and a connection still being opened when its
//! operation gave up is finished in the background and kept, so a burst after an outage does
//! not open and drop connections over and over.
//!
//! [`PostgresBroker::connect`] opens its first connection directly, within `connect_timeout`:
//! a refused connection fails with [`ErrorKind::Unavailable`] at once and rejected credentials
//! with [`ErrorKind::Auth`]. Lost, refused and silent connections are
//! [`ErrorKind::Unavailable`]; a missing database or an unusable URL is [`ErrorKind::Config`].
//!
//! # Configuration
//!
//! | field | default | meaning |
//! |-------|---------|---------|
//! | [`url`](PostgresConfig::url) | — | where the server is (see above) |
//! | [`schema`](PostgresConfig::schema) | `bgtask` (or `?schema=`) | schema of bgtask's tables |
//! | [`application_name`](PostgresConfig::application_name) | `bgtask` | shown in `pg_stat_activity` |
//! | [`connection.op_timeout`](bgtask_core::ConnectionSettings::op_timeout) | 5 s | bound on every operation and on the liveness round trip |
//! | [`connection.connect_timeout`](bgtask_core::ConnectionSettings::connect_timeout) | 5 s | bound on one connection attempt |
//! | [`connection.liveness_interval`](bgtask_core::ConnectionSettings::liveness_interval) | 2 s | how often the listener connection makes a round trip |
//! | [`connection.max_backoff`](bgtask_core::ConnectionSettings::max_backoff) | 2 s | longest wait between reconnection attempts |
//! | [`pool_size`](PostgresConfig::pool_size) | 8 | pooled connections (plus one listener connection) |
//! | [`connection.subscription_buffer`](bgtask_core::ConnectionSettings::subscription_buffer) | 65536 | messages buffered per subscription |
//! | [`connection.subscription_buffer_bytes`](bgtask_core::ConnectionSettings::subscription_buffer_bytes) | 64 MiB | payload bytes buffered per subscription |
//! | [`payload_ttl`](PostgresConfig::payload_ttl) | 30 s | how long a by-reference message stays readable |
//! | [`cleanup_interval`](PostgresConfig::cleanup_interval) | 5 s | how often expired rows are deleted |
//! | [`max_payload`](PostgresConfig::max_payload) | 64 MiB | largest payload `publish` accepts |
//! | [`synchronous_commit`](PostgresConfig::synchronous_commit) | off | whether lease changes and claims wait for their WAL flush |
//!
//! # Lifetimes
//!
//! A broker's clones share its pool and listener. Subscriptions keep the listener alive: it
//! closes when the last clone and the last subscription are dropped, or at once with
//! [`PostgresBroker::close`], which also ends every subscription stream.
//!
//! # Tests
//!
//! The integration tests need a PostgreSQL at `BGTASK_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`; `docker compose up -d postgres`, or a local
//! server) and fail when there is none. Each test uses a schema of its own (`bgtask_t<random>`)
//! and drops only that schema. The wrong-password test starts a private server with `initdb`
//! and `pg_ctl` from `BGTASK_POSTGRES_BIN` (default: the newest `/usr/lib/postgresql/*/bin`).
#![deny(missing_docs)]

mod broker;
mod config;
mod db;
mod error;
mod listener;
mod pool;
mod schema;
pub mod wire;

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[cfg(doc)]
use bgtask_core::{Broker, Capabilities, Published};
use bgtask_core::{Error, ErrorKind, Result};
use sqlx::{ConnectOptions, Connection};
use tokio::time::{timeout, Instant};

pub use config::{
    PostgresConfig, DEFAULT_APPLICATION_NAME, DEFAULT_CLEANUP_INTERVAL, DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_LIVENESS_INTERVAL, DEFAULT_MAX_BACKOFF, DEFAULT_MAX_PAYLOAD, DEFAULT_OP_TIMEOUT,
    DEFAULT_PAYLOAD_TTL, DEFAULT_POOL_SIZE, DEFAULT_SCHEMA, DEFAULT_SUBSCRIPTION_BUFFER,
    DEFAULT_SUBSCRIPTION_BUFFER_BYTES, SCHEMA_PARAM,
};

use config::connect_options;
use db::Db;
use error::{closed, from_sqlx, no_answer};
use listener::{ListenerHandle, ListenerSettings};

/// The longest lease or claim TTL: about 100 years (longer ones are shortened to this).
pub const MAX_TTL_MILLIS: u64 = 100 * 365 * 24 * 3600 * 1000;

/// A [`Broker`] on PostgreSQL LISTEN/NOTIFY. Cheap to clone; clones share the connections.
///
/// See the [crate docs](crate) for the schema, the channel mapping, by-reference payloads,
/// leases and time bounds.
#[derive(Clone)]
pub struct PostgresBroker {
    inner: Arc<Inner>,
}

struct Inner {
    config: PostgresConfig,
    listener_application_name: String,
    closed: AtomicBool,
    db: Arc<Db>,
    listener: ListenerHandle,
    cleanup: tokio::task::JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.cleanup.abort();
    }
}

impl PostgresBroker {
    /// Connect to the server at `url` with default settings (and the URL's `schema` parameter,
    /// if any), creating or migrating the schema.
    ///
    /// Fails with [`ErrorKind::Config`] for a URL that is not a PostgreSQL URL or names a
    /// missing database, [`ErrorKind::Unavailable`] when the server cannot be reached within
    /// the connect timeout, and [`ErrorKind::Auth`] when it refuses the credentials.
    pub async fn connect(url: &str) -> Result<PostgresBroker> {
        Self::connect_with(PostgresConfig::new(url)).await
    }

    /// Connect with the given settings; fails like [`connect`](Self::connect).
    pub async fn connect_with(config: PostgresConfig) -> Result<PostgresBroker> {
        config.validate()?;
        let secret = config::password_of(&config.url);
        let options = connect_options(&config, secret.as_deref())?;

        // The first connection is made directly, not through the pool: a refused connection
        // fails at once (the pool would retry it until its timeout), and the schema is
        // migrated on it.
        let mut conn = match timeout(config.connection.connect_timeout, options.connect()).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(from_sqlx("connect", e, secret.as_deref())),
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    format!(
                        "postgres unavailable: no connection to {} within {:?}",
                        config.redacted_url(),
                        config.connection.connect_timeout
                    ),
                ))
            }
        };
        let migrated = timeout(
            config.connection.op_timeout.max(Duration::from_secs(1)) * 2,
            schema::migrate(&mut conn, &config.schema),
        )
        .await;
        let _ = timeout(Duration::from_millis(500), conn.close()).await;
        match migrated {
            Ok(Ok(applied)) if !applied.is_empty() => {
                tracing::info!(schema = %config.schema, ?applied, "postgres: schema migrated");
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(from_sqlx("migrate the schema", e, secret.as_deref())),
            Err(_) => {
                return Err(no_answer(
                    "migrate the schema",
                    config.connection.op_timeout * 2,
                ))
            }
        }

        let pool = pool::Pool::new(
            options.clone(),
            config.pool_size,
            config.connection.connect_timeout,
            config.connection.op_timeout,
        );
        let db = Arc::new(Db {
            pool,
            op_timeout: config.connection.op_timeout,
            secret: secret.clone(),
            statements: schema::Statements::new(&config.schema),
            payload_ttl_ms: i64::try_from(config.payload_ttl.as_millis()).unwrap_or(i64::MAX),
        });

        let broker_id = &bgtask_core::names::random_id()[..12];
        let listener_application_name = format!("{} listener {broker_id}", config.application_name);
        let listener = ListenerHandle::start(
            ListenerSettings {
                options: options.application_name(&listener_application_name),
                schema: config.schema.clone(),
                connection: config.connection,
                secret,
            },
            db.clone(),
        )
        .await?;
        let cleanup = tokio::spawn(cleanup_loop(db.clone(), config.cleanup_interval));
        tracing::debug!(url = %config.redacted_url(), schema = %config.schema, "postgres: broker connected");
        Ok(PostgresBroker {
            inner: Arc::new(Inner {
                config,
                listener_application_name,
                closed: AtomicBool::new(false),
                db,
                listener,
                cleanup,
            }),
        })
    }

    /// The settings this broker was built with.
    pub fn config(&self) -> &PostgresConfig {
        &self.inner.config
    }

    /// The `application_name` of this broker's listener connection (unique per broker), to find
    /// it in `pg_stat_activity`.
    pub fn listener_application_name(&self) -> &str {
        &self.inner.listener_application_name
    }

    /// The PostgreSQL channel identifier that `channel` is LISTENed to and notified on.
    pub fn channel_identifier(&self, channel: &str) -> String {
        wire::channel_identifier(&self.inner.config.schema, channel)
    }

    /// Close the broker and every clone of it now: every subscription stream ends, the pool
    /// closes, and every later call fails with [`ErrorKind::Closed`].
    ///
    /// Without it the connections close when the last clone and the last subscription are
    /// dropped.
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        self.inner.listener.close();
        self.inner.cleanup.abort();
        self.inner.db.pool.close();
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::SeqCst)
    }

    fn check_open(&self, what: &str) -> Result<()> {
        if self.is_closed() {
            return Err(closed(what));
        }
        Ok(())
    }

    /// For a call `what` on an open broker: a pooled connection, and the deadline (the call's
    /// `op_timeout`, counted from now) that its statement must finish by.
    async fn conn(&self, what: &str) -> Result<(pool::Conn, Instant)> {
        self.check_open(what)?;
        let deadline = Instant::now() + self.inner.config.connection.op_timeout;
        Ok((self.inner.db.conn(what, deadline).await?, deadline))
    }
}

/// Delete expired rows every `interval` (with a little jitter, so brokers started together
/// spread out), for as long as the broker lives.
async fn cleanup_loop(db: Arc<Db>, interval: Duration) {
    loop {
        let jitter = interval.mul_f64(rand_fraction() * 0.2);
        tokio::time::sleep(interval + jitter).await;
        db.pool.prune();
        match db.cleanup().await {
            Ok((0, 0, 0)) => {}
            Ok((leases, payloads, claims)) => {
                tracing::debug!(leases, payloads, claims, "postgres: expired rows deleted");
            }
            Err(e) => tracing::debug!(error = %e, "postgres: cleanup failed; retrying later"),
        }
    }
}

fn rand_fraction() -> f64 {
    let id = bgtask_core::names::random_id();
    u32::from_str_radix(&id[..8], 16).unwrap_or(0) as f64 / u32::MAX as f64
}

impl fmt::Debug for PostgresBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresBroker")
            .field("url", &self.inner.config.redacted_url())
            .field("schema", &self.inner.config.schema)
            .field("listener", &self.inner.listener_application_name)
            .field("op_timeout", &self.inner.config.connection.op_timeout)
            .field("subscribed_channels", &self.inner.listener.channels())
            .field("idle_connections", &self.inner.db.pool.idle_count())
            .finish()
    }
}
