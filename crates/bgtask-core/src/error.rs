//! One error type for the whole crate, with a portable [`ErrorKind`].

use std::fmt;
use std::time::Duration;

use serde_json::value::RawValue;

use crate::status::Status;

/// The boxed source of an [`Error`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A `Result` whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, in terms every backend shares.
///
/// Tests assert on the kind, never on the message, so every backend reports the same kind for the
/// same failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The broker cannot be reached, refused the connection, or the connection was lost.
    Unavailable,
    /// An operation did not finish within its bounded time, or a task passed its deadline.
    TimedOut,
    /// A payload is larger than the configured or the transport's limit.
    TooLarge,
    /// A channel, key, task or namespace name is not acceptable.
    InvalidName,
    /// Input that is not what the API accepts (not a JSON object, a missing task key, ...).
    InvalidInput,
    /// A message on the wire could not be understood, or a broker answered something unexpected.
    Protocol,
    /// A task was not admitted: the per-key limit is reached.
    LimitReached,
    /// A task was not admitted: its key value is blacklisted.
    Blacklisted,
    /// Nobody subscribed to the task's channel received it.
    NoWorker,
    /// The worker completed the task with [`Status::Error`].
    TaskError,
    /// The worker completed the task with [`Status::Failed`].
    TaskFailed,
    /// The task was cancelled.
    Cancelled,
    /// The client or worker was shut down.
    Closed,
    /// A configuration value or URL is not acceptable, or a backend is not compiled in.
    Config,
    /// Authentication with the broker failed.
    Auth,
    /// The backend does not offer this operation (see [`Capabilities`](crate::Capabilities)).
    Unsupported,
}

impl ErrorKind {
    /// A short, stable, lowercase name for this kind (used in logs and the CLI).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::TimedOut => "timed out",
            ErrorKind::TooLarge => "too large",
            ErrorKind::InvalidName => "invalid name",
            ErrorKind::InvalidInput => "invalid input",
            ErrorKind::Protocol => "protocol",
            ErrorKind::LimitReached => "limit reached",
            ErrorKind::Blacklisted => "blacklisted",
            ErrorKind::NoWorker => "no worker",
            ErrorKind::TaskError => "task error",
            ErrorKind::TaskFailed => "task failed",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Closed => "closed",
            ErrorKind::Config => "config",
            ErrorKind::Auth => "auth",
            ErrorKind::Unsupported => "unsupported",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Structured facts that come with some kinds of [`Error`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ErrorDetail {
    /// The worker's reply of a task completed with `Error` or `Failed`.
    Reply {
        /// The status the worker gave.
        status: Status,
        /// The worker's JSON reply, as sent.
        reply: Box<RawValue>,
    },
    /// Why a key value is blacklisted and for how much longer.
    Blacklisted {
        /// The reason the last reporting worker gave.
        reason: String,
        /// Time until the blacklisting ends on its own.
        remaining: Duration,
    },
    /// Every live worker of the task's route declined the task's offer or did not answer.
    Declined {
        /// How many workers it was offered to.
        workers: usize,
    },
    /// How many tasks of that key value are in flight, and the limit.
    Limit {
        /// Live leases on the key value.
        in_flight: u64,
        /// The configured limit.
        limit: u64,
    },
}

/// The error of every bgtask operation: a kind, a message, optional details and a source.
pub struct Error {
    kind: ErrorKind,
    message: String,
    detail: Option<Box<ErrorDetail>>,
    source: Option<BoxError>,
}

impl Error {
    /// The error of a backend's failed operation `what` (e.g. "publish"), worded alike by every
    /// backend: "redis unavailable during publish", "postgres refused the credentials or
    /// privileges during subscribe", ... (`backend` is the backend's short name).
    pub fn during(backend: &str, kind: ErrorKind, what: &str) -> Self {
        let message = match kind {
            ErrorKind::Unavailable => format!("{backend} unavailable during {what}"),
            ErrorKind::Auth => {
                format!("{backend} refused the credentials or privileges during {what}")
            }
            ErrorKind::Config => format!("{backend} configuration rejected during {what}"),
            _ => format!("{backend} failed during {what}"),
        };
        Error::new(kind, message)
    }

    /// A new error of `kind` with a human-readable message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            detail: None,
            source: None,
        }
    }

    /// Attach the underlying cause.
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Attach structured details.
    pub fn with_detail(mut self, detail: ErrorDetail) -> Self {
        self.detail = Some(Box::new(detail));
        self
    }

    /// The portable kind of this error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message, without the kind or the source.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Structured details, where the kind has some.
    pub fn detail(&self) -> Option<&ErrorDetail> {
        self.detail.as_deref()
    }

    /// The worker's reply, for [`ErrorKind::TaskError`] and [`ErrorKind::TaskFailed`].
    pub fn reply(&self) -> Option<&RawValue> {
        match self.detail() {
            Some(ErrorDetail::Reply { reply, .. }) => Some(reply),
            _ => None,
        }
    }

    /// Whether trying the same operation again later may succeed.
    ///
    /// True for a broker that is unavailable or slow, a full per-key limit and a missing worker;
    /// false for bad input and for answers a retry would only repeat.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::Unavailable
                | ErrorKind::TimedOut
                | ErrorKind::LimitReached
                | ErrorKind::NoWorker
        )
    }

    pub(crate) fn invalid_input(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidInput, message)
    }

    pub(crate) fn protocol(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Protocol, message)
    }

    pub(crate) fn closed(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Closed, message)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind).field("message", &self.message);
        if let Some(detail) = &self.detail {
            d.field("detail", detail);
        }
        if let Some(source) = &self.source {
            d.field("source", source);
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)?;
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|s| &**s as &(dyn std::error::Error + 'static))
    }
}
