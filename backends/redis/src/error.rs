//! Mapping `redis` errors onto bgtask's [`ErrorKind`]s.

use std::time::Duration;

use bgtask_core::{Error, ErrorKind};
use redis::{RedisError, ServerErrorKind};

/// The bgtask error for a failed `what` (e.g. "publish"), from a `redis` error.
///
/// - refused, reset or lost connections, I/O timeouts and transient server states (loading,
///   busy, read-only replica, out of memory, ...) are [`ErrorKind::Unavailable`];
/// - failed authentication and missing ACL permissions are [`ErrorKind::Auth`];
/// - an unusable URL or client setting is [`ErrorKind::Config`];
/// - anything else the server or the client did not expect is [`ErrorKind::Protocol`].
pub(crate) fn from_redis(what: &str, e: RedisError) -> Error {
    Error::during("redis", kind_of(&e), what).with_source(e)
}

fn kind_of(e: &RedisError) -> ErrorKind {
    use redis::ErrorKind as K;
    match e.kind() {
        K::AuthenticationFailed => ErrorKind::Auth,
        K::Io => ErrorKind::Unavailable,
        K::InvalidClientConfig => ErrorKind::Config,
        K::Server(server) => match server {
            ServerErrorKind::NoPerm => ErrorKind::Auth,
            ServerErrorKind::BusyLoading
            | ServerErrorKind::TryAgain
            | ServerErrorKind::ClusterDown
            | ServerErrorKind::MasterDown
            | ServerErrorKind::ReadOnly => ErrorKind::Unavailable,
            _ => match e.code() {
                // Not authenticated (a server that gained a password), wrong credentials.
                Some("NOAUTH" | "WRONGPASS") => ErrorKind::Auth,
                // Out of memory under maxmemory, or a script that runs too long.
                Some("OOM" | "BUSY") => ErrorKind::Unavailable,
                _ => ErrorKind::Protocol,
            },
        },
        K::Extension => match e.code() {
            Some("NOAUTH" | "WRONGPASS") => ErrorKind::Auth,
            Some("OOM" | "BUSY") => ErrorKind::Unavailable,
            _ => ErrorKind::Protocol,
        },
        _ if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() => {
            ErrorKind::Unavailable
        }
        _ => ErrorKind::Protocol,
    }
}

/// Whether the connection that produced `e` must be replaced before it is used again.
///
/// Besides what `redis` itself calls unrecoverable (I/O errors of a dropped connection, parse
/// errors), an I/O timeout counts: `redis`'s own `ConnectionManager` keeps a connection that
/// stopped answering, so every later request would time out as well.
pub(crate) fn poisons_connection(e: &RedisError) -> bool {
    e.is_unrecoverable_error() || e.is_io_error() || e.is_timeout()
}

/// The error of an operation that did not finish within `bound`: `Unavailable`, as the `Broker`
/// contract asks of a silent broker (`TimedOut` is kept for a task passing its deadline).
pub(crate) fn no_answer(what: &str, bound: Duration) -> Error {
    Error::new(
        ErrorKind::Unavailable,
        format!("redis did not answer {what} within {bound:?}"),
    )
}

/// The error of a failed connection to a cluster: a seed node that is not in cluster mode is a
/// [`ErrorKind::Config`] error naming the problem; anything else is `e` unchanged.
pub(crate) fn refine_cluster_connect(config: &crate::RedisConfig, e: Error) -> Error {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(error) = cause {
        let text = error.to_string();
        if text.contains("cluster support disabled") || text.contains("cluster mode is not enabled")
        {
            return Error::new(
                ErrorKind::Config,
                format!(
                    "{} names a Redis Cluster, but the server is not in cluster mode \
                     (cluster_enabled:0): use a redis:// URL for one server",
                    config.redacted_url()
                ),
            )
            .with_source(e);
        }
        cause = error.source();
    }
    e
}

/// The error of an operation on a broker whose background task has stopped.
pub(crate) fn closed(what: &str) -> Error {
    Error::new(
        ErrorKind::Closed,
        format!("redis broker is closed; cannot {what}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_kinds() {
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(from_redis("publish", io).kind(), ErrorKind::Unavailable);
        let timeout = RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut));
        assert_eq!(kind_of(&timeout), ErrorKind::Unavailable);
        assert!(poisons_connection(&timeout));
        let auth = RedisError::from((redis::ErrorKind::AuthenticationFailed, "nope"));
        assert_eq!(kind_of(&auth), ErrorKind::Auth);
        let config = RedisError::from((redis::ErrorKind::InvalidClientConfig, "bad"));
        assert_eq!(kind_of(&config), ErrorKind::Config);
        let perm = RedisError::from((redis::ErrorKind::Server(ServerErrorKind::NoPerm), "no"));
        assert_eq!(kind_of(&perm), ErrorKind::Auth);
        let loading = RedisError::from((
            redis::ErrorKind::Server(ServerErrorKind::BusyLoading),
            "loading",
        ));
        assert_eq!(kind_of(&loading), ErrorKind::Unavailable);
        let other = RedisError::from((
            redis::ErrorKind::Server(ServerErrorKind::ResponseError),
            "wat",
        ));
        assert_eq!(kind_of(&other), ErrorKind::Protocol);
    }
}
