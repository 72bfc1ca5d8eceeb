//! What a client is configured with ([`ClientConfig`], [`SubmitOptions`]) and what it reports
//! ([`ClientEvent`], [`ClientStats`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::protocol::{duration_ms, KeyLimit, Status, TraceContext};

/// The default task timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest task timeout; longer ones are cut to this.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(30 * 24 * 3600);

/// The default payload limit of tasks and replies: 1 MiB.
pub const DEFAULT_MAX_PAYLOAD: usize = 1 << 20;

/// Settings of a [`Client`](crate::Client). Every field has a default; see each field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientConfig {
    /// Namespace shared with the workers; several apps can share one broker. Default `bgtask`.
    pub namespace: String,
    /// Timeout of a task submitted without one. Default 5 s.
    #[serde(rename = "default_timeout_ms", with = "duration_ms")]
    pub default_timeout: Duration,
    /// Largest task payload accepted, in bytes of JSON. Default 1 MiB.
    pub max_payload: usize,
    /// The top-level property of every task whose value is limited and may be blacklisted.
    /// Default none.
    pub task_key: Option<String>,
    /// Tasks in flight per key value when `task_key` is set. Default 5.
    pub per_key_limit: KeyLimit,
    /// How long a key's lease outlives the task's deadline, so a crashed creator's slots free
    /// themselves shortly after its tasks would have timed out. Default 1 s.
    #[serde(rename = "lease_margin_ms", with = "duration_ms")]
    pub lease_margin: Duration,
    /// How long a directed offer waits for its worker's answer before the task is offered to
    /// another worker. Default 1 s.
    #[serde(rename = "offer_timeout_ms", with = "duration_ms")]
    pub offer_timeout: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            namespace: crate::names::DEFAULT_NAMESPACE.to_owned(),
            default_timeout: DEFAULT_TIMEOUT,
            max_payload: DEFAULT_MAX_PAYLOAD,
            task_key: None,
            per_key_limit: KeyLimit::default(),
            lease_margin: Duration::from_secs(1),
            offer_timeout: Duration::from_secs(1),
        }
    }
}

/// Per-task options of [`Client::submit_with`](crate::Client::submit_with); unset fields take the client's configuration.
#[derive(Debug, Clone, Default)]
pub struct SubmitOptions {
    pub(super) timeout: Option<Duration>,
    pub(super) task_key: Option<Option<String>>,
    pub(super) limit: Option<KeyLimit>,
    pub(super) target: Option<String>,
    pub(super) metadata: Option<Value>,
    pub(super) trace: Option<TraceContext>,
}

impl SubmitOptions {
    /// Default options.
    pub fn new() -> Self {
        Self::default()
    }

    /// The task's timeout; zero means the client's default; at most [`MAX_TIMEOUT`] (30 days).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The task's timeout in milliseconds; zero or negative means the client's default, as in
    /// node-background-task.
    pub fn timeout_ms(mut self, millis: i64) -> Self {
        self.timeout = Some(Duration::from_millis(millis.max(0) as u64));
        self
    }

    /// Use this top-level property as the task key for this task.
    pub fn task_key(mut self, key: impl Into<String>) -> Self {
        self.task_key = Some(Some(key.into()));
        self
    }

    /// Submit this task without a task key, whatever the client's configuration.
    pub fn no_task_key(mut self) -> Self {
        self.task_key = Some(None);
        self
    }

    /// The per-key limit for this task.
    pub fn limit(mut self, limit: KeyLimit) -> Self {
        self.limit = Some(limit);
        self
    }

    /// Publish on the targeted channel `target` instead of the task name's channel: only
    /// workers that listen to that target see the task.
    pub fn target(mut self, target: impl Into<String>) -> Self {
        self.target = Some(target.into());
        self
    }

    /// The trace context the task carries to its worker (docs/operations.md, "Traces").
    /// Default: with the `opentelemetry` feature, the current span's; without it, none.
    pub fn trace_context(mut self, trace: TraceContext) -> Self {
        self.trace = Some(trace);
        self
    }

    /// Metadata that travels with the task, visible to workers before they accept it.
    pub fn metadata(mut self, metadata: Value) -> Self {
        self.metadata = Some(metadata);
        self
    }
}

/// Something that happened on a client, for monitoring (see [`Client::events`](crate::Client::events)).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientEvent {
    /// A task reported progress.
    Progress {
        /// The task.
        id: String,
    },
    /// A task was completed by a worker (which does not mean it succeeded).
    Done {
        /// The task.
        id: String,
        /// The worker's status.
        status: Status,
    },
    /// A task got no reply before its deadline.
    TimedOut {
        /// The task.
        id: String,
    },
    /// A message on the reply channel could not be understood; it was dropped.
    Malformed {
        /// Why.
        error: String,
    },
    /// The reply subscription reconnected; replies may have been missed.
    Gap,
}

/// Counters of a client since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientStats {
    /// Tasks published.
    pub submitted: u64,
    /// Messages on the reply channel that could not be understood.
    pub malformed: u64,
    /// Replies that arrived after their task ended (timed out, cancelled or already done).
    pub late: u64,
    /// Progress values or broadcast replies dropped because the reader fell behind.
    pub dropped: u64,
    /// Times the reply subscription said messages may have been missed.
    pub gaps: u64,
}
