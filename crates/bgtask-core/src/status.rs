//! [`Status`]: how a worker completed a task. A leaf module: the wire format and the error
//! types both use it, and it uses neither.

use serde::{Deserialize, Serialize};

/// How a worker completed a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The task did what it was asked.
    Success,
    /// The task ran and reports an error; the creator gets
    /// [`ErrorKind::TaskError`](crate::ErrorKind::TaskError).
    Error,
    /// The task could not run; the creator gets
    /// [`ErrorKind::TaskFailed`](crate::ErrorKind::TaskFailed).
    Failed,
}

impl Status {
    /// The lowercase wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Success => "success",
            Status::Error => "error",
            Status::Failed => "failed",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
