//! What a worker is configured with ([`WorkerConfig`]) and what it counts ([`WorkerStats`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::protocol::blacklist::BlacklistConfig;
use crate::protocol::duration_ms;

/// Settings of a [`Worker`](crate::Worker).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Namespace shared with the creators. Default `bgtask`.
    pub namespace: String,
    /// Task names this worker serves.
    pub tasks: Vec<String>,
    /// Extra targeted channels this worker listens to (see
    /// [`SubmitOptions::target`](crate::SubmitOptions::target)).
    pub targets: Vec<String>,
    /// Largest progress value or reply accepted, in bytes of JSON. Default 1 MiB.
    pub max_payload: usize,
    /// When reported key values become blacklisted.
    pub blacklist: BlacklistConfig,
    /// How long a task's claim outlives its deadline. Default 1 s.
    #[serde(rename = "claim_margin_ms", with = "duration_ms")]
    pub claim_margin: Duration,
    /// How long [`Worker::run`](crate::Worker::run) waits for running tasks at shutdown before cancelling them.
    /// Default 10 s.
    #[serde(rename = "shutdown_grace_ms", with = "duration_ms")]
    pub shutdown_grace: Duration,
    /// How often the worker renews its presence (see `docs/protocol.md`, "Presence").
    /// Default 1 s.
    #[serde(rename = "heartbeat_ms", with = "duration_ms")]
    pub heartbeat: Duration,
    /// How long one presence announcement holds: a worker that stops announcing (a crash)
    /// leaves every creator's view within this. Default 3 s; at least twice `heartbeat`.
    #[serde(rename = "presence_ttl_ms", with = "duration_ms")]
    pub presence_ttl: Duration,
    /// The concurrency an event-style worker announces (creators then hold tasks back when it
    /// is full). [`Worker::run`](crate::Worker::run) announces its own. Default none: the worker states no bound
    /// and decides itself, offer by offer.
    pub concurrency: Option<usize>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            namespace: crate::names::DEFAULT_NAMESPACE.to_owned(),
            tasks: Vec::new(),
            targets: Vec::new(),
            max_payload: crate::protocol::DEFAULT_MAX_PAYLOAD,
            blacklist: BlacklistConfig::default(),
            claim_margin: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(10),
            heartbeat: Duration::from_secs(1),
            presence_ttl: Duration::from_secs(3),
            concurrency: None,
        }
    }
}

impl WorkerConfig {
    /// The default configuration serving `tasks`.
    pub fn for_tasks<I, S>(tasks: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        WorkerConfig {
            tasks: tasks.into_iter().map(Into::into).collect(),
            ..Default::default()
        }
    }
}

/// Something that happened on a worker, for monitoring (see [`Worker::events`](crate::Worker::events)).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum WorkerEvent {
    /// A message on one of the worker's channels could not be understood; it was dropped.
    Malformed {
        /// The channel.
        channel: String,
        /// Why.
        error: String,
    },
    /// A creator cancelled a task this worker runs.
    Cancelled {
        /// The task.
        id: String,
    },
    /// A subscription resumed after a reconnect; tasks may have been missed.
    Gap,
}

/// Counters of a worker since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerStats {
    /// Tasks seen on the worker's channels.
    pub seen: u64,
    /// Tasks this worker accepted.
    pub accepted: u64,
    /// Accepts that lost to another worker (or to a cancellation).
    pub lost: u64,
    /// Tasks completed (any status).
    pub completed: u64,
    /// Directed offers this worker declined (busy, ignored, lost to another worker, or at
    /// shutdown).
    pub declined: u64,
    /// Messages that could not be understood.
    pub malformed: u64,
    /// Times a subscription said messages may have been missed.
    pub gaps: u64,
}
