//! The programs of a `bgtask worker` die with it, even when it is SIGKILLed.
//!
//! Each program runs in a process group of its own, which the worker kills when the task ends.
//! A worker killed with SIGKILL can kill nothing, so it starts one small helper process first,
//! `bgtask supervise-programs` (hidden), in a process group of its own, with a pipe on its stdin.
//! The worker writes `+<pgid>` when a program starts and `-<pgid>` when its group is gone; the
//! helper keeps the set. When the pipe ends (the worker exited, however it died), the helper
//! SIGKILLs every group still in the set, and exits. No polling, no `unsafe`
//! (`PR_SET_PDEATHSIG` would need a `pre_exec` hook, and fires when the spawning *thread* ends,
//! not the process).
//!
//! Left open: a worker killed between starting a program and writing its line (microseconds).

use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::sync::Mutex;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// The hidden subcommand the helper runs as.
pub(crate) const SUBCOMMAND: &str = "supervise-programs";

/// The worker's side: the helper process and the pipe to it.
pub(crate) struct Supervisor {
    stdin: Mutex<Option<ChildStdin>>,
    child: Mutex<Child>,
}

impl Supervisor {
    /// Start the helper (this same executable). `None`, with a warning, when it cannot start:
    /// the worker still runs, and its programs die with it on every exit but SIGKILL.
    pub(crate) fn start() -> Option<Supervisor> {
        let started = std::env::current_exe().and_then(|exe| {
            Command::new(exe)
                .arg(SUBCOMMAND)
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                // Its own group: a Ctrl-C meant for the worker does not stop it first.
                .process_group(0)
                .spawn()
        });
        match started {
            Ok(mut child) => Some(Supervisor {
                stdin: Mutex::new(child.stdin.take()),
                child: Mutex::new(child),
            }),
            Err(error) => {
                tracing::warn!(%error, "cannot start the program supervisor; programs outlive a SIGKILLed worker");
                None
            }
        }
    }

    /// A program's process group started.
    pub(crate) fn started(&self, pgid: i32) {
        self.send(&format!("+{pgid}\n"));
    }

    /// A program's process group is gone.
    pub(crate) fn ended(&self, pgid: i32) {
        self.send(&format!("-{pgid}\n"));
    }

    /// Write one line; a few bytes into a pipe the helper drains, so it does not block. If the
    /// helper is gone, say so once and stop writing.
    fn send(&self, line: &str) {
        let mut stdin = self.stdin.lock().unwrap_or_else(|e| e.into_inner());
        let Some(pipe) = stdin.as_mut() else { return };
        if let Err(error) = pipe.write_all(line.as_bytes()) {
            tracing::warn!(%error, "the program supervisor is gone; programs outlive a SIGKILLed worker");
            *stdin = None;
        }
    }
}

impl Drop for Supervisor {
    /// Close the pipe (the helper kills what is left and exits) and reap it.
    fn drop(&mut self) {
        self.stdin.lock().unwrap_or_else(|e| e.into_inner()).take();
        let _ = self.child.lock().unwrap_or_else(|e| e.into_inner()).wait();
    }
}

/// The helper: keep the set of process groups from stdin; at its end, SIGKILL them all.
pub(crate) fn run() -> ExitCode {
    let mut groups = HashSet::new();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let (sign, pgid) = line.split_at(line.len().min(1));
        match (sign, pgid.parse::<i32>()) {
            ("+", Ok(pgid)) if pgid > 1 => {
                groups.insert(pgid);
            }
            ("-", Ok(pgid)) => {
                groups.remove(&pgid);
            }
            _ => {}
        }
    }
    for pgid in groups {
        // ESRCH: the group is already empty.
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    }
    ExitCode::SUCCESS
}
