//! Exit codes and the error type of the command line.

use std::fmt;
use std::process::ExitCode;

use bgtask::ErrorKind;

/// The worker completed the task with `Error`.
pub(crate) const TASK_ERROR: u8 = 1;
/// The worker completed the task with `Failed`.
pub(crate) const TASK_FAILED: u8 = 2;
/// No reply came before the task's timeout.
pub(crate) const TIMED_OUT: u8 = 3;
/// Rejected at once: the per-key limit is reached.
pub(crate) const LIMIT_REACHED: u8 = 4;
/// Rejected at once: the task key's value is blacklisted.
pub(crate) const BLACKLISTED: u8 = 5;
/// Rejected at once: no worker is listening for the task.
pub(crate) const NO_WORKER: u8 = 6;
/// The broker cannot be reached (or refused the credentials).
pub(crate) const UNAVAILABLE: u8 = 7;
/// Bad flags, bad JSON, a bad name, a payload over the limit, a bad configuration.
pub(crate) const USAGE: u8 = 64;
/// Anything else (a protocol error, the task was cancelled, a bug).
pub(crate) const INTERNAL: u8 = 70;
/// Stopped by Ctrl-C.
pub(crate) const INTERRUPTED: u8 = 130;

/// The exit code for an error of `kind`.
pub(crate) fn code_of(kind: ErrorKind) -> u8 {
    match kind {
        ErrorKind::TaskError => TASK_ERROR,
        ErrorKind::TaskFailed => TASK_FAILED,
        ErrorKind::TimedOut => TIMED_OUT,
        ErrorKind::LimitReached => LIMIT_REACHED,
        ErrorKind::Blacklisted => BLACKLISTED,
        ErrorKind::NoWorker => NO_WORKER,
        ErrorKind::Unavailable | ErrorKind::Auth => UNAVAILABLE,
        ErrorKind::InvalidName
        | ErrorKind::InvalidInput
        | ErrorKind::TooLarge
        | ErrorKind::Config => USAGE,
        _ => INTERNAL,
    }
}

/// An error that ends the command: a message for stderr and an exit code.
#[derive(Debug)]
pub(crate) struct CliError {
    pub(crate) code: u8,
    pub(crate) message: String,
}

impl CliError {
    pub(crate) fn usage(message: impl Into<String>) -> Self {
        CliError {
            code: USAGE,
            message: message.into(),
        }
    }

    pub(crate) fn new(code: u8, message: impl Into<String>) -> Self {
        CliError {
            code,
            message: message.into(),
        }
    }

    pub(crate) fn exit_code(&self) -> ExitCode {
        ExitCode::from(self.code)
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<bgtask::Error> for CliError {
    fn from(error: bgtask::Error) -> Self {
        let mut message = error.to_string();
        if error.kind() == ErrorKind::Unavailable {
            message.push_str(
                "\n  is the broker running? Redis: `docker compose up -d --wait redis` or `redis-server`; \
                 or pick another with --broker URL, BGTASK_BROKER_URL or broker_url in bgtask.toml",
            );
        }
        CliError {
            code: code_of(error.kind()),
            message,
        }
    }
}

pub(crate) type CliResult<T = ExitCode> = Result<T, CliError>;

/// The table printed by `--help` (and copied into docs/cli.md).
pub(crate) const TABLE: &str = "\
Exit codes:
  0    success
  1    the worker completed the task with Error (its reply is printed on stdout)
  2    the worker completed the task with Failed, or the program crashed or was killed
  3    timed out: no reply within the task's timeout
  4    rejected at once: the per-key limit of the task key's value is reached
  5    rejected at once: the task key's value is blacklisted
  6    rejected at once: no worker is listening for the task (Redis and memory can tell)
  7    the broker is unavailable (unreachable, refused, or authentication failed)
  64   usage: bad flags, bad JSON, a bad name, a payload over the limit, a bad configuration
  70   anything else (a protocol error, a cancelled task, a bug)
  130  interrupted by Ctrl-C";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_has_its_own_code() {
        let kinds = [
            ErrorKind::TaskError,
            ErrorKind::TaskFailed,
            ErrorKind::TimedOut,
            ErrorKind::LimitReached,
            ErrorKind::Blacklisted,
            ErrorKind::NoWorker,
            ErrorKind::Unavailable,
            ErrorKind::InvalidInput,
            ErrorKind::Protocol,
        ];
        let codes: std::collections::BTreeSet<u8> = kinds.iter().map(|k| code_of(*k)).collect();
        assert_eq!(codes.len(), kinds.len());
        assert!(!codes.contains(&0));
        assert!(!codes.contains(&INTERRUPTED));
    }
}
