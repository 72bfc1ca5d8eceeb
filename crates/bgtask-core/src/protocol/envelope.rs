//! Wire format (placeholder while written).
use serde::{Deserialize, Serialize};

/// How a worker completed a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The task did what it was asked.
    Success,
    /// The task ran and reports an error (the creator gets [`ErrorKind::TaskError`](crate::ErrorKind::TaskError)).
    Error,
    /// The task could not run (the creator gets [`ErrorKind::TaskFailed`](crate::ErrorKind::TaskFailed)).
    Failed,
}
