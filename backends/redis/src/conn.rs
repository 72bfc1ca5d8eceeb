//! The command connection: one multiplexed connection, replaced when it fails or goes silent.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bgtask_core::{Error, ErrorKind, Result};
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, Client, Cmd, Pipeline, RedisError, RedisFuture, Value};
use tokio::time::{timeout, timeout_at, Instant};

use bgtask_core::backoff::reconnect_delay;

use crate::config::RedisConfig;
use crate::error::{from_redis, no_answer, poisons_connection};

/// Where the commands go: one server, or a Redis Cluster.
// One per broker, never moved on a hot path: the size of its variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub(crate) enum Target {
    /// One server (`redis://`, `rediss://`, `redis+unix://`).
    Server(Client),
    /// A cluster (`redis+cluster://`): the client routes each command to its slot's master.
    Cluster(ClusterClient),
}

/// A command connection of either [`Target`]; commands run on it as on any `redis` connection.
#[derive(Clone)]
pub(crate) enum Conn {
    /// A multiplexed connection to one server.
    Server(MultiplexedConnection),
    /// A cluster connection: one multiplexed connection per node, reconnected, redirected
    /// (MOVED, ASK) and refreshed after a failover by `redis` itself.
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Server(conn) => conn.req_packed_command(cmd),
            Conn::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Server(conn) => conn.req_packed_commands(cmd, offset, count),
            Conn::Cluster(conn) => conn.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Server(conn) => conn.get_db(),
            Conn::Cluster(conn) => conn.get_db(),
        }
    }
}

/// A shared multiplexed connection that is reconnected on demand.
///
/// `redis`'s `ConnectionManager` is not used: it only replaces a connection after an error it
/// deems unrecoverable, which excludes timeouts, so a connection that silently stopped answering
/// (a network black hole) is kept forever and every request times out. Here any I/O error or
/// timeout drops the connection, and the next operation connects afresh, with backoff after
/// failed attempts.
///
/// On a cluster, `redis` reconnects the connection of each node and follows the slots by itself
/// (a try on a silent node fails after half the operation's bound, see `cluster::client`), so an
/// error never drops the cluster connection. An operation that got no answer at all opens a
/// fresh cluster connection (a fresh view of the slots) in the background; operations keep the
/// current one until the fresh one is up, so a silent node costs only the operations on its
/// slots, never all of them.
pub(crate) struct Commands {
    target: Target,
    connection_config: AsyncConnectionConfig,
    connect_timeout: Duration,
    op_timeout: Duration,
    max_backoff: Duration,
    state: Arc<Mutex<State>>,
    /// Held while connecting, so that concurrent operations share one attempt.
    connecting: tokio::sync::Mutex<()>,
    /// A fresh cluster connection is being opened.
    renewing: Arc<AtomicBool>,
}

#[derive(Default)]
struct State {
    /// The current connection and its generation.
    current: Option<(u64, Conn)>,
    generation: u64,
    /// Failed attempts since the last success.
    failures: u32,
    /// No new attempt before this instant.
    retry_at: Option<Instant>,
}

impl Commands {
    pub(crate) fn new(target: Target, config: &RedisConfig) -> Self {
        let connection_config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(config.connection.connect_timeout))
            // None: `run` bounds every operation by `op_timeout` already (and drops a silent
            // connection), so the crate's own timer per request (500 ms by default, too short
            // for large payloads) would only cost a second timer.
            .set_response_timeout(None);
        Commands {
            target,
            connection_config,
            connect_timeout: config.connection.connect_timeout,
            op_timeout: config.connection.op_timeout,
            max_backoff: config.connection.max_backoff,
            state: Arc::default(),
            connecting: tokio::sync::Mutex::new(()),
            renewing: Arc::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// A cluster operation on connection `generation` got no answer in time: open a fresh
    /// cluster connection in the background and use it from when it is up.
    fn renew_cluster(&self, generation: u64) {
        let Target::Cluster(client) = &self.target else {
            return;
        };
        if self.renewing.swap(true, Ordering::SeqCst) {
            return;
        }
        let (client, state, renewing) = (client.clone(), self.state.clone(), self.renewing.clone());
        let bound = self.connect_timeout;
        tokio::spawn(async move {
            if let Ok(Ok(conn)) = timeout(bound, client.get_async_connection()).await {
                let mut state = lock(&state);
                if matches!(&state.current, Some((g, _)) if *g == generation) {
                    state.generation += 1;
                    state.current = Some((state.generation, Conn::Cluster(conn)));
                    tracing::debug!(
                        generation = state.generation,
                        "redis: cluster connection renewed"
                    );
                    bgtask_core::metrics::broker_reconnected("redis");
                }
            }
            renewing.store(false, Ordering::SeqCst);
        });
    }

    /// Connect now (used by `connect`, which reports the error instead of retrying later).
    pub(crate) async fn connect_now(&self) -> Result<()> {
        let deadline = Instant::now() + self.connect_timeout;
        self.connection(deadline).await.map(|_| ())
    }

    /// The current connection, connecting first if there is none. Fails at once when the next
    /// attempt is not due before `deadline`.
    async fn connection(&self, deadline: Instant) -> Result<(u64, Conn)> {
        if let Some(current) = self.state().current.clone() {
            return Ok(current);
        }
        let _connecting = timeout_at(deadline, self.connecting.lock())
            .await
            .map_err(|_| no_answer("connect", self.op_timeout))?;
        let retry_at = {
            let state = self.state();
            if let Some(current) = state.current.clone() {
                return Ok(current);
            }
            state.retry_at
        };
        if let Some(at) = retry_at {
            if at > deadline {
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    "redis unavailable: the last connection attempt failed and the next one is \
                     not due yet",
                ));
            }
            tokio::time::sleep_until(at).await;
        }
        let attempt = timeout(self.connect_timeout, async {
            match &self.target {
                Target::Server(client) => client
                    .get_multiplexed_async_connection_with_config(&self.connection_config)
                    .await
                    .map(Conn::Server),
                Target::Cluster(client) => client.get_async_connection().await.map(Conn::Cluster),
            }
        })
        .await;
        let mut state = self.state();
        match attempt {
            Ok(Ok(conn)) => {
                state.generation += 1;
                state.failures = 0;
                state.retry_at = None;
                state.current = Some((state.generation, conn.clone()));
                tracing::debug!(generation = state.generation, "redis: connected");
                if state.generation > 1 {
                    bgtask_core::metrics::broker_reconnected("redis");
                }
                Ok((state.generation, conn))
            }
            failed => {
                state.failures = state.failures.saturating_add(1);
                state.retry_at =
                    Some(Instant::now() + reconnect_delay(state.failures, self.max_backoff));
                Err(match failed {
                    Ok(Err(e)) => from_redis("connect", e),
                    _ => Error::new(
                        ErrorKind::Unavailable,
                        format!(
                            "redis unavailable: no connection within {:?}",
                            self.connect_timeout
                        ),
                    ),
                })
            }
        }
    }

    /// Forget the current connection, whatever it is: another connection to the same server
    /// was just lost, so this one most likely is too, and finding out by failing the next
    /// operation would be worse than reconnecting.
    pub(crate) fn invalidate_current(&self) {
        let mut state = self.state();
        if let Some((generation, _)) = state.current.take() {
            tracing::debug!(generation, "redis: dropping the command connection too");
        }
    }

    /// Forget connection `generation` (if it is still the current one).
    fn invalidate(&self, generation: u64) {
        let mut state = self.state();
        if matches!(&state.current, Some((g, _)) if *g == generation) {
            tracing::debug!(generation, "redis: dropping a failed connection");
            state.current = None;
        }
    }

    /// Run `op` on the connection within `op_timeout`, connecting first if needed, and drop the
    /// connection when the operation shows it is broken or silent.
    pub(crate) async fn run<T, F, Fut>(&self, what: &str, op: F) -> Result<T>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, RedisError>>,
    {
        let deadline = Instant::now() + self.op_timeout;
        let mut used = None;
        let outcome = timeout_at(deadline, async {
            let (generation, conn) = self.connection(deadline).await?;
            used = Some(generation);
            let cluster = matches!(conn, Conn::Cluster(_));
            op(conn).await.map_err(|e| {
                if !cluster && poisons_connection(&e) {
                    self.invalidate(generation);
                }
                from_redis(what, e)
            })
        })
        .await;
        match outcome {
            Ok(result) => result,
            Err(_) => {
                match (used, &self.target) {
                    (Some(generation), Target::Cluster(_)) => self.renew_cluster(generation),
                    (Some(generation), Target::Server(_)) => self.invalidate(generation),
                    (None, _) => {}
                }
                Err(no_answer(what, self.op_timeout))
            }
        }
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // Every update is a few field assignments: a poisoned lock still holds consistent data.
    state.lock().unwrap_or_else(|e| e.into_inner())
}
