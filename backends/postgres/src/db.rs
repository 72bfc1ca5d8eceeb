//! The pooled connections: every bounded operation except the listener's.

use std::time::Duration;

use bgtask_core::{Error, Result};
use bytes::Bytes;
use tokio::time::{error::Elapsed, timeout_at, Instant};

use crate::error::{closed, from_sqlx, no_answer, poisons_connection};
use crate::pool::{AcquireError, Conn, Pool};
use crate::schema::Statements;

/// The broker's pool and statements, shared by the broker handles, the cleanup task and the
/// subscriptions (which read payload rows through it).
pub(crate) struct Db {
    pub(crate) pool: Pool,
    pub(crate) op_timeout: Duration,
    /// The connection's password, scrubbed from error texts.
    pub(crate) secret: Option<String>,
    pub(crate) statements: Statements,
    pub(crate) payload_ttl_ms: i64,
}

/// What reading a payload row found.
#[derive(Debug, Clone)]
pub(crate) enum Fetched {
    /// The message.
    Message(Bytes),
    /// The row belongs to another channel whose identifier is the same (a hash collision):
    /// not for this subscription.
    NotMine,
    /// The row is gone (expired) or could not be read: the message is lost.
    Missing,
}

impl Db {
    /// A connection from the pool, waiting no later than `deadline`.
    pub(crate) async fn conn(&self, what: &str, deadline: Instant) -> Result<Conn> {
        match self.pool.acquire(deadline).await {
            Ok(conn) => Ok(conn),
            Err(AcquireError::Timeout) => {
                tracing::debug!(what, "postgres: no connection in time");
                Err(no_answer(what, self.op_timeout))
            }
            Err(AcquireError::Connect(e)) => {
                tracing::debug!(what, error = %e, "postgres: cannot connect");
                Err(self.error(what, e))
            }
            Err(AcquireError::Closed) => Err(closed(what)),
        }
    }

    /// The outcome of a statement run on `conn` under a deadline: a clean finish (a server
    /// error included) puts the connection back; a broken one is closed, and an I/O error
    /// also retires every idle connection (the server most likely went away); one that timed
    /// out is brought back in the background, or closed (see [`Conn`]).
    pub(crate) fn settle<T>(
        &self,
        what: &str,
        conn: Conn,
        result: std::result::Result<sqlx::Result<T>, Elapsed>,
    ) -> Result<T> {
        match result {
            Ok(Ok(value)) => {
                conn.release();
                Ok(value)
            }
            Ok(Err(e)) => {
                tracing::debug!(what, error = %e, "postgres: statement failed");
                if poisons_connection(&e) {
                    conn.discard();
                    if matches!(e, sqlx::Error::Io(_)) {
                        self.pool.invalidate();
                    }
                } else {
                    conn.release();
                }
                Err(self.error(what, e))
            }
            Err(_) => {
                tracing::debug!(what, "postgres: no answer in time");
                drop(conn);
                Err(no_answer(what, self.op_timeout))
            }
        }
    }

    pub(crate) fn error(&self, what: &str, e: sqlx::Error) -> Error {
        from_sqlx(what, e, self.secret.as_deref())
    }

    /// Read payload row `id` for a subscription of `channel`.
    pub(crate) async fn fetch(&self, id: &str, channel: &str) -> Fetched {
        let deadline = Instant::now() + self.op_timeout;
        let result = async {
            let mut conn = self.conn("fetch a payload", deadline).await?;
            let result = timeout_at(
                deadline,
                sqlx::query_scalar::<_, Option<Vec<u8>>>(&self.statements.fetch_payload)
                    .bind(id)
                    .bind(channel.as_bytes())
                    .fetch_optional(&mut *conn),
            )
            .await;
            self.settle("fetch a payload", conn, result)
        }
        .await;
        match result {
            Ok(Some(Some(data))) => Fetched::Message(Bytes::from(data)),
            Ok(Some(None)) => Fetched::NotMine,
            Ok(None) => {
                tracing::warn!(id, "postgres: payload row expired before it was read");
                Fetched::Missing
            }
            Err(e) => {
                tracing::warn!(id, error = %e, "postgres: cannot read a payload row");
                Fetched::Missing
            }
        }
    }

    /// Delete expired lease, payload and claim rows; returns how many of each.
    pub(crate) async fn cleanup(&self) -> Result<(i64, i64, i64)> {
        let deadline = Instant::now() + self.op_timeout;
        let mut conn = self.conn("cleanup", deadline).await?;
        let result = timeout_at(
            deadline,
            sqlx::query_as::<_, (i64, i64, i64)>(&self.statements.cleanup).fetch_one(&mut *conn),
        )
        .await;
        self.settle("cleanup", conn, result)
    }
}
