//! The blacklist: key values that workers keep reporting as bad are refused for a while.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::broker::{DynBroker, LeaseRequest};
use crate::error::{Error, ErrorDetail, ErrorKind, Result};
use crate::names::{validate_name, Namespace};

/// When a key value becomes blacklisted, and for how long.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BlacklistConfig {
    /// More than this many reports within `interval` blacklist the value. Default 10.
    pub threshold: u64,
    /// The window in which reports are counted. Default 1 s.
    #[serde(rename = "interval_ms", with = "crate::protocol::duration_ms")]
    pub interval: Duration,
    /// How long a value stays blacklisted. Default 1 h.
    #[serde(rename = "duration_ms", with = "crate::protocol::duration_ms")]
    pub duration: Duration,
}

impl Default for BlacklistConfig {
    fn default() -> Self {
        BlacklistConfig {
            threshold: 10,
            interval: Duration::from_secs(1),
            duration: Duration::from_secs(3600),
        }
    }
}

/// One blacklisted key value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlacklistEntry {
    /// The task name the value was reported for.
    pub task: String,
    /// The key value.
    pub value: String,
    /// The reason given by the report that blacklisted it.
    pub reason: String,
    /// Time until the blacklisting ends on its own.
    pub remaining: Duration,
}

impl BlacklistEntry {
    /// The error a creator gets when it submits a task with this value.
    pub fn to_error(&self) -> Error {
        Error::new(
            ErrorKind::Blacklisted,
            format!(
                "key value {:?} of task {:?} is blacklisted for {} s more: {}",
                self.value,
                self.task,
                self.remaining.as_secs(),
                self.reason
            ),
        )
        .with_detail(ErrorDetail::Blacklisted {
            reason: self.reason.clone(),
            remaining: self.remaining,
        })
    }
}

/// The note kept on each lease of the namespace's blacklist index.
#[derive(Serialize, Deserialize)]
struct IndexNote {
    task: String,
    value: String,
    reason: String,
}

/// Reports, checks, lists and lifts blacklisted key values, per task name, in one namespace.
///
/// Built on broker leases only: each report is a lease of `interval` on the value's failure key;
/// when more than `threshold` are live, a flag lease of `duration` (its note is the reason) and an
/// entry in the namespace's index are added. Everything expires on its own.
#[derive(Debug, Clone)]
pub struct Blacklist {
    broker: DynBroker,
    namespace: Namespace,
    config: BlacklistConfig,
}

impl Blacklist {
    /// A blacklist over `broker` in `namespace`.
    pub fn new(broker: DynBroker, namespace: Namespace, config: BlacklistConfig) -> Self {
        Blacklist {
            broker,
            namespace,
            config,
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &BlacklistConfig {
        &self.config
    }

    /// Report `value` of `task` as bad. Returns `true` when this report blacklisted it.
    pub async fn report(&self, task: &str, value: &str, reason: &str) -> Result<bool> {
        validate_name("task name", task)?;
        validate_name("key value", value)?;
        let failures = self
            .broker
            .acquire(
                &self.namespace.failures_key(task, value),
                LeaseRequest::new(self.config.interval),
            )
            .await?;
        if failures.live <= self.config.threshold {
            return Ok(false);
        }
        let flag = self
            .broker
            .acquire(
                &self.namespace.blacklist_key(task, value),
                LeaseRequest::new(self.config.duration).cap(1).note(reason),
            )
            .await?;
        if flag.lease.is_none() {
            return Ok(false); // already blacklisted
        }
        let note = serde_json::to_string(&IndexNote {
            task: task.to_owned(),
            value: value.to_owned(),
            reason: reason.to_owned(),
        })
        .unwrap_or_default();
        self.broker
            .acquire(
                &self.namespace.blacklist_index_key(),
                LeaseRequest::new(self.config.duration).note(note),
            )
            .await?;
        tracing::info!(task, value, reason, "key value blacklisted");
        Ok(true)
    }

    /// The blacklisting of `value` of `task`, if it is blacklisted.
    pub async fn check(&self, task: &str, value: &str) -> Result<Option<BlacklistEntry>> {
        let flags = self
            .broker
            .leases(&self.namespace.blacklist_key(task, value))
            .await?;
        Ok(flags.into_iter().next().map(|lease| BlacklistEntry {
            task: task.to_owned(),
            value: value.to_owned(),
            reason: lease.note,
            remaining: lease.remaining,
        }))
    }

    /// How many key values are blacklisted in the namespace, over all task names: one broker
    /// call (the index), where [`list`](Self::list) also reads each value's flag. A value lifted
    /// by [`lift`](Self::lift) leaves the index at once; one whose flag was released by other
    /// means counts until its index entry expires.
    pub async fn count(&self) -> Result<u64> {
        let index = self
            .broker
            .leases(&self.namespace.blacklist_index_key())
            .await?;
        let mut values: Vec<(String, String)> = index
            .into_iter()
            .filter_map(|lease| serde_json::from_str::<IndexNote>(&lease.note).ok())
            .map(|note| (note.task, note.value))
            .collect();
        values.sort_unstable();
        values.dedup();
        Ok(values.len() as u64)
    }

    /// Every blacklisted key value of the namespace.
    pub async fn list(&self) -> Result<Vec<BlacklistEntry>> {
        let index = self
            .broker
            .leases(&self.namespace.blacklist_index_key())
            .await?;
        let mut entries: Vec<BlacklistEntry> = Vec::with_capacity(index.len());
        for lease in index {
            let Ok(note) = serde_json::from_str::<IndexNote>(&lease.note) else {
                continue;
            };
            if entries
                .iter()
                .any(|e| e.task == note.task && e.value == note.value)
            {
                continue;
            }
            // An index entry outlives its flag when the value was lifted by an older version or
            // the flag's lease was released elsewhere: the flag is the truth.
            if let Some(entry) = self.check(&note.task, &note.value).await? {
                entries.push(entry);
            }
        }
        Ok(entries)
    }

    /// Lift the blacklisting of `value` of `task` now. Returns `false` if it was not blacklisted.
    pub async fn lift(&self, task: &str, value: &str) -> Result<bool> {
        let flag_key = self.namespace.blacklist_key(task, value);
        let mut lifted = false;
        for lease in self.broker.leases(&flag_key).await? {
            lifted |= self.broker.release(&flag_key, &lease.id).await?;
        }
        let index_key = self.namespace.blacklist_index_key();
        for lease in self.broker.leases(&index_key).await? {
            if let Ok(note) = serde_json::from_str::<IndexNote>(&lease.note) {
                if note.task == task && note.value == value {
                    self.broker.release(&index_key, &lease.id).await?;
                }
            }
        }
        // Forget the reports too, so one more report does not blacklist it again at once.
        let failures_key = self.namespace.failures_key(task, value);
        for lease in self.broker.leases(&failures_key).await? {
            self.broker.release(&failures_key, &lease.id).await?;
        }
        Ok(lifted)
    }
}
