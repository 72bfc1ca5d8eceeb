//! A small connection pool whose every step is bounded.
//!
//! sqlx's `PgPool` is not used for operations: it tests every connection it takes back with a
//! round trip that has no time bound (sqlx-core 0.8 `pool/connection.rs`, `return_to_pool`),
//! in a spawned task that holds a pool slot meanwhile (on a half-open connection, until the OS
//! gives up on the socket); with `test_before_acquire` it adds another round trip to every
//! acquisition; and it retries refused connections until its timeout. Here:
//!
//! - a connection goes back to the pool after an operation that finished, with no round trip;
//! - one whose operation failed on I/O is closed, and so is every idle one opened before (the
//!   server most likely went away for all of them; also when the listener finds its
//!   connection lost);
//! - one whose operation was abandoned (timed out or cancelled) is brought back in the
//!   background with one round trip bounded by the operation timeout, or closed;
//! - a connection being opened for an operation that gave up meanwhile is finished in the
//!   background (within the connect timeout) and kept, so that under a burst connections are
//!   not opened and thrown away again and again.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::{timeout, timeout_at, Instant};

/// How long a connection may stay unused in the pool before it is closed.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Why no connection could be had.
#[derive(Debug)]
pub(crate) enum AcquireError {
    /// The deadline passed (waiting for a slot or connecting).
    Timeout,
    /// Connecting failed.
    Connect(sqlx::Error),
    /// The pool was closed.
    Closed,
}

struct Idle {
    conn: PgConnection,
    generation: u64,
    since: Instant,
}

struct Inner {
    options: PgConnectOptions,
    connect_timeout: Duration,
    /// Bound on bringing back a connection whose operation was abandoned.
    recover_timeout: Duration,
    slots: Arc<Semaphore>,
    idle: Mutex<Vec<Idle>>,
    /// Bumped when a connection is found lost: idle connections of older generations are
    /// dropped instead of used.
    generation: AtomicU64,
    closed: AtomicBool,
}

impl Inner {
    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        // Every update is a single push, pop, retain or clear.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keep `conn` for reuse, unless the pool closed or a loss was seen since it was opened.
    fn put_back(&self, conn: PgConnection, generation: u64) {
        if self.closed.load(Ordering::SeqCst)
            || generation != self.generation.load(Ordering::SeqCst)
        {
            return;
        }
        self.idle().push(Idle {
            conn,
            generation,
            since: Instant::now(),
        });
    }
}

/// Connections to one server, at most `size` at a time.
pub(crate) struct Pool {
    inner: Arc<Inner>,
}

impl Pool {
    pub(crate) fn new(
        options: PgConnectOptions,
        size: u32,
        connect_timeout: Duration,
        recover_timeout: Duration,
    ) -> Pool {
        Pool {
            inner: Arc::new(Inner {
                options,
                connect_timeout,
                recover_timeout,
                slots: Arc::new(Semaphore::new(size as usize)),
                idle: Mutex::new(Vec::new()),
                generation: AtomicU64::new(0),
                closed: AtomicBool::new(false),
            }),
        }
    }

    /// A connection, waiting no later than `deadline`.
    pub(crate) async fn acquire(&self, deadline: Instant) -> Result<Conn, AcquireError> {
        let inner = &self.inner;
        if inner.closed.load(Ordering::SeqCst) {
            return Err(AcquireError::Closed);
        }
        let permit = timeout_at(deadline, inner.slots.clone().acquire_owned())
            .await
            .map_err(|_| AcquireError::Timeout)?
            .map_err(|_| AcquireError::Closed)?;
        let generation = inner.generation.load(Ordering::SeqCst);
        loop {
            let Some(idle) = inner.idle().pop() else {
                break;
            };
            if idle.generation == generation && idle.since.elapsed() < IDLE_TIMEOUT {
                return Ok(Conn {
                    conn: Some(idle.conn),
                    generation,
                    pool: inner.clone(),
                    permit: Some(permit),
                });
            }
            // Stale: dropping it closes the socket.
        }
        // Connect in a task of its own, so that a connection this caller no longer waits for
        // is still finished and kept.
        let (tx, rx) = oneshot::channel();
        let connecting = inner.clone();
        tokio::spawn(async move {
            let result = timeout(connecting.connect_timeout, connecting.options.connect()).await;
            let outcome = match result {
                Ok(Ok(conn)) => Ok(conn),
                Ok(Err(e)) => Err(AcquireError::Connect(e)),
                Err(_) => Err(AcquireError::Timeout),
            };
            if let Err((Ok(conn), _permit)) = tx.send((outcome, permit)) {
                connecting.put_back(conn, generation);
            }
        });
        match timeout_at(deadline, rx).await {
            Ok(Ok((Ok(conn), permit))) => Ok(Conn {
                conn: Some(conn),
                generation,
                pool: inner.clone(),
                permit: Some(permit),
            }),
            Ok(Ok((Err(e), _))) => Err(e),
            Ok(Err(_)) | Err(_) => Err(AcquireError::Timeout),
        }
    }

    /// A connection was found lost: no idle connection opened before now is used again.
    pub(crate) fn invalidate(&self) {
        self.inner.generation.fetch_add(1, Ordering::SeqCst);
        self.inner.idle().clear();
    }

    /// Close idle connections unused for longer than [`IDLE_TIMEOUT`].
    pub(crate) fn prune(&self) {
        self.inner
            .idle()
            .retain(|i| i.since.elapsed() < IDLE_TIMEOUT);
    }

    /// Refuse new acquisitions and close the idle connections (politely, in the background).
    pub(crate) fn close(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        self.inner.slots.close();
        let idle: Vec<Idle> = std::mem::take(&mut *self.inner.idle());
        if !idle.is_empty() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    for idle in idle {
                        let _ = timeout(Duration::from_millis(500), idle.conn.close()).await;
                    }
                });
            }
        }
    }

    /// Connections in the pool, unused.
    pub(crate) fn idle_count(&self) -> usize {
        self.inner.idle().len()
    }
}

/// A connection taken from the pool, holding one of its slots.
///
/// [`release`](Conn::release) puts it back, [`discard`](Conn::discard) closes it. Dropped
/// otherwise (an operation that timed out or was cancelled, perhaps in the middle of a
/// statement), it is brought back in the background by one round trip bounded by the
/// recover timeout, or closed.
pub(crate) struct Conn {
    conn: Option<PgConnection>,
    generation: u64,
    pool: Arc<Inner>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Conn {
    /// Put the connection back for reuse: its last operation finished.
    pub(crate) fn release(mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.put_back(conn, self.generation);
        }
    }

    /// Close the connection: it is broken.
    pub(crate) fn discard(mut self) {
        self.conn = None;
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (pool, generation, permit) = (self.pool.clone(), self.generation, self.permit.take());
        runtime.spawn(async move {
            // Waits for whatever the abandoned statement left to read, then one more answer.
            if let Ok(Ok(())) = timeout(pool.recover_timeout, conn.ping()).await {
                pool.put_back(conn, generation);
            }
            drop(permit);
        });
    }
}

impl std::ops::Deref for Conn {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        self.conn
            .as_ref()
            .expect("connection present until released")
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.conn
            .as_mut()
            .expect("connection present until released")
    }
}
