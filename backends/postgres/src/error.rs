//! Mapping `sqlx` errors onto bgtask's [`ErrorKind`]s.

use std::time::Duration;

use bgtask_core::{Error, ErrorKind};

/// The bgtask error for a failed `what` (e.g. "publish"), from a `sqlx` error.
///
/// - refused, reset or lost connections, pool timeouts, TLS failures and transient server
///   states (starting up, shutting down, too many connections, serialization failures,
///   cancelled statements) are [`ErrorKind::Unavailable`];
/// - rejected credentials and missing privileges are [`ErrorKind::Auth`];
/// - an unusable URL, a missing database or schema is [`ErrorKind::Config`];
/// - anything else the server or the driver did not expect is [`ErrorKind::Protocol`].
///
/// `secret` (the connection's password, if any) is scrubbed from the text of the cause.
pub(crate) fn from_sqlx(what: &str, e: sqlx::Error, secret: Option<&str>) -> Error {
    let kind = kind_of(&e);
    let mut cause = e.to_string();
    if let Some(secret) = secret.filter(|s| !s.is_empty()) {
        if cause.contains(secret) {
            cause = cause.replace(secret, "***");
        }
    }
    Error::during("postgres", kind, what).with_source(Cause(cause))
}

/// The text of a driver error, kept as the source of a bgtask error (already scrubbed of
/// secrets, and without the driver's types in the public API).
#[derive(Debug)]
struct Cause(String);

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Cause {}

pub(crate) fn kind_of(e: &sqlx::Error) -> ErrorKind {
    use sqlx::Error as E;
    match e {
        E::Io(_) | E::Tls(_) | E::PoolTimedOut | E::PoolClosed | E::WorkerCrashed => {
            ErrorKind::Unavailable
        }
        E::Configuration(_) => ErrorKind::Config,
        E::Database(db) => match db.code() {
            Some(code) => kind_of_sqlstate(&code),
            None => ErrorKind::Protocol,
        },
        _ => ErrorKind::Protocol,
    }
}

/// The kind of a server error by its SQLSTATE.
pub(crate) fn kind_of_sqlstate(code: &str) -> ErrorKind {
    match code {
        // invalid_authorization_specification, invalid_password, insufficient_privilege
        "28000" | "28P01" | "42501" => ErrorKind::Auth,
        // invalid_catalog_name (no such database), invalid_schema_name
        "3D000" | "3F000" => ErrorKind::Config,
        // serialization_failure, deadlock_detected, lock_not_available, query_canceled
        // (statement_timeout), admin/crash shutdown, cannot_connect_now,
        // idle_session_timeout, database_dropped
        "40001" | "40P01" | "55P03" | "57014" | "57P01" | "57P02" | "57P03" | "57P05" | "57P04" => {
            ErrorKind::Unavailable
        }
        // connection_exception (08...), insufficient_resources (53...: too many connections,
        // disk full, out of memory), operator_intervention (57...), system_error (58...)
        c if c.starts_with("08") || c.starts_with("53") || c.starts_with("58") => {
            ErrorKind::Unavailable
        }
        _ => ErrorKind::Protocol,
    }
}

/// Whether the connection that produced `e` must not be reused: the driver lost track of it
/// (I/O, TLS, protocol) or the server is ending it.
pub(crate) fn poisons_connection(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("57P")),
        _ => false,
    }
}

/// The error of an operation that did not finish within `bound`: `Unavailable`, as the `Broker`
/// contract asks of a silent broker (`TimedOut` is kept for a task passing its deadline).
pub(crate) fn no_answer(what: &str, bound: Duration) -> Error {
    Error::new(
        ErrorKind::Unavailable,
        format!("postgres did not answer {what} within {bound:?}"),
    )
}

/// The error of an operation on a closed broker.
pub(crate) fn closed(what: &str) -> Error {
    Error::new(
        ErrorKind::Closed,
        format!("postgres broker is closed; cannot {what}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_kinds() {
        let io = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(kind_of(&io), ErrorKind::Unavailable);
        assert!(poisons_connection(&io));
        assert_eq!(kind_of(&sqlx::Error::PoolTimedOut), ErrorKind::Unavailable);
        assert!(!poisons_connection(&sqlx::Error::PoolTimedOut));
        assert_eq!(
            kind_of(&sqlx::Error::Configuration("bad".into())),
            ErrorKind::Config
        );
        assert_eq!(kind_of_sqlstate("28P01"), ErrorKind::Auth);
        assert_eq!(kind_of_sqlstate("42501"), ErrorKind::Auth);
        assert_eq!(kind_of_sqlstate("3D000"), ErrorKind::Config);
        assert_eq!(kind_of_sqlstate("53300"), ErrorKind::Unavailable);
        assert_eq!(kind_of_sqlstate("57P01"), ErrorKind::Unavailable);
        assert_eq!(kind_of_sqlstate("08006"), ErrorKind::Unavailable);
        assert_eq!(kind_of_sqlstate("57014"), ErrorKind::Unavailable);
        assert_eq!(kind_of_sqlstate("42P01"), ErrorKind::Protocol);
    }

    #[test]
    fn scrubs_the_password() {
        let e = sqlx::Error::Protocol("server said hunter2 is wrong".into());
        let err = from_sqlx("connect", e, Some("hunter2"));
        assert!(!format!("{err}").contains("hunter2"), "{err}");
        assert!(!format!("{err:?}").contains("hunter2"), "{err:?}");
    }
}
