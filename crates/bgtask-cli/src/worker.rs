//! `bgtask worker`: serve tasks by running a program per task.

use std::collections::{HashSet, VecDeque};
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bgtask::{Status, TaskContext, Worker};
use clap::Args;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde_json::json;
use serde_json::value::RawValue;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::signal::unix::{signal, SignalKind};
use tokio::time::Instant;

use crate::exit::{CliError, CliResult};
use crate::settings::{human, millis, Settings};
use crate::supervisor::Supervisor;

pub(crate) const LONG_ABOUT: &str = "\
Serve tasks by running PROGRAM once per task. PROGRAM is run directly, never through a shell
(write `-- sh script.sh` to run a shell script), in its own process group.

The program's side of the contract:
  stdin    the task's payload (JSON), then end of file
  stdout   the reply: one JSON value (empty output is the reply null)
  stderr   lines starting with `progress:` are sent to the creator as progress, e.g.
             progress: {\"percent\": 50}
           (the rest of the line is JSON; text that is not JSON is sent as a string);
           a line starting with `bad-key:` reports the task key's value as bad, with the rest
           of the line as the reason (enough reports blacklist the value);
           every other line is copied to the worker's stderr, prefixed by the task id
  exit 0   Success, with stdout as the reply (stdout that is not JSON: Failed)
  exit 1   Error, with stdout as the reply when it is JSON, else {\"error\": <its text>}
  other    Failed, with {\"error\", \"exit_code\" or \"signal\", \"stderr\": last lines}
  env      BGTASK_TASK_ID, BGTASK_TASK_NAME, BGTASK_WORKER_ID, BGTASK_TIMEOUT_MS (time left),
           BGTASK_DEADLINE_MS (Unix time in ms), BGTASK_KEY_VALUE and BGTASK_METADATA when set

At the task's deadline, or when the creator cancels it, the whole process group gets SIGTERM,
then SIGKILL after --kill-grace; the task completes as Failed. When the program exits, whatever
it left running in its process group is killed, also when the worker itself is SIGKILLed (a
helper process, `bgtask supervise-programs`, kills the groups left when the worker dies).

Ctrl-C (or SIGTERM) drains: no new tasks are taken, running ones get up to the configured
shutdown grace (worker.shutdown_grace_ms, default 10 s) to finish, then are killed. A second
Ctrl-C kills every running program and exits at once.";

pub(crate) const EXAMPLES: &str = "\
Examples:
  bgtask worker --task resize -- ./resize --quality 80
  bgtask worker --task echo --concurrency 16 -- cat
  bgtask worker --task report --task export --target eu-west -- python3 jobs.py
  bgtask worker --task sh-job -- sh -c 'read task; echo \"progress: 50\" >&2; echo \"$task\"'";

/// `bgtask worker` flags.
#[derive(Args, Debug)]
pub(crate) struct WorkerArgs {
    /// A task name to serve (repeat for several).
    #[arg(
        long = "task",
        value_name = "NAME",
        required_unless_present = "targets"
    )]
    tasks: Vec<String>,

    /// A targeted channel to listen to as well (repeat for several).
    #[arg(long = "target", value_name = "T")]
    targets: Vec<String>,

    /// Programs running at once.
    #[arg(long, short = 'c', value_name = "N", default_value_t = 4)]
    concurrency: usize,

    /// Time between SIGTERM and SIGKILL when a program is stopped.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = crate::duration_arg)]
    kill_grace: Duration,

    /// Do not print a line per task on stderr.
    #[arg(long, short = 'q')]
    quiet: bool,

    #[command(flatten)]
    metrics: crate::metrics::MetricsArgs,

    /// The program to run per task, and its arguments (after `--`).
    #[arg(last = true, required = true, value_name = "PROGRAM")]
    program: Vec<String>,
}

pub(crate) async fn run(settings: Settings, args: WorkerArgs) -> CliResult {
    args.metrics.serve()?;
    let mut config = settings.config.worker_config();
    config.tasks = args.tasks.clone();
    config.targets = args.targets.clone();
    let grace = config.shutdown_grace;
    let url = settings.broker_url().to_owned();
    let broker = Settings::connect(&url).await?;
    let worker = Worker::new(broker, config).await?;
    let worker_id = worker.id().to_owned();
    let shutdown = worker.shutdown_handle();
    let runner = Arc::new(Runner {
        program: args.program[0].clone(),
        args: args.program[1..].to_vec(),
        worker_id: worker_id.clone(),
        kill_grace: args.kill_grace,
        quiet: args.quiet,
        max_payload: settings.config.worker.max_payload,
        groups: Mutex::new(HashSet::new()),
        supervisor: Supervisor::start(),
        counts: Counts::default(),
    });

    let mut serving: Vec<String> = args.tasks.iter().map(|t| format!("{t:?}")).collect();
    serving.extend(args.targets.iter().map(|t| format!("target {t:?}")));
    eprintln!(
        "bgtask worker {}: serving {} on {} (namespace {}), running {:?} with concurrency {}; ready",
        &worker_id[..8],
        serving.join(", "),
        bgtask::redact(&url),
        settings.config.namespace,
        args.program,
        args.concurrency,
    );

    // First Ctrl-C or SIGTERM: drain. Second: kill everything and exit.
    let signals = {
        let runner = runner.clone();
        let mut interrupt = signal(SignalKind::interrupt())
            .map_err(|e| CliError::new(crate::exit::INTERNAL, format!("signal handler: {e}")))?;
        let mut terminate = signal(SignalKind::terminate())
            .map_err(|e| CliError::new(crate::exit::INTERNAL, format!("signal handler: {e}")))?;
        tokio::spawn(async move {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
            eprintln!(
                "bgtask worker: draining: no new tasks; waiting up to {} for running ones (Ctrl-C again to stop at once)",
                human(grace)
            );
            shutdown.shutdown();
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
            let killed = runner.kill_all();
            eprintln!("bgtask worker: stopping at once; killed {killed} running program(s)");
            std::process::exit(i32::from(crate::exit::INTERRUPTED));
        })
    };

    serve(worker, runner.clone(), args.concurrency).await;
    signals.abort();
    let c = &runner.counts;
    eprintln!(
        "bgtask worker: stopped; {} task(s): {} success, {} error, {} failed",
        c.success.load(Ordering::Relaxed)
            + c.error.load(Ordering::Relaxed)
            + c.failed.load(Ordering::Relaxed),
        c.success.load(Ordering::Relaxed),
        c.error.load(Ordering::Relaxed),
        c.failed.load(Ordering::Relaxed),
    );
    Ok(ExitCode::SUCCESS)
}

/// Serve tasks on [`Worker::serve`] until the worker is shut down. At the end of the grace period
/// `serve` cancels the running tasks, which kills their programs (see [`Runner::execute`]); a
/// handler still running after that is aborted, and its program's group killed on drop.
///
/// The reply is passed on byte for byte as raw JSON (no reordering of keys, no rounding).
async fn serve(worker: Worker, runner: Arc<Runner>, concurrency: usize) {
    let handler = move |task: TaskContext| {
        let runner = runner.clone();
        async move { runner.execute(task).await }
    };
    if let Err(error) = worker.serve(concurrency, handler).await {
        tracing::warn!(%error, "the worker stopped");
    }
}

#[derive(Default)]
struct Counts {
    success: AtomicU64,
    error: AtomicU64,
    failed: AtomicU64,
}

struct Runner {
    program: String,
    args: Vec<String>,
    worker_id: String,
    kill_grace: Duration,
    quiet: bool,
    max_payload: usize,
    /// Process groups of the programs running now.
    groups: Mutex<HashSet<i32>>,
    /// Kills those groups if this process dies without doing it (SIGKILL).
    supervisor: Option<Supervisor>,
    counts: Counts,
}

/// How a program run ended.
enum End {
    Exited(ExitStatus),
    Deadline,
    Cancelled,
}

/// Owns a program's process group: kills whatever is left in it when dropped (the program
/// exited, or the handler was aborted).
struct Group<'a> {
    pgid: i32,
    runner: &'a Runner,
}

impl Drop for Group<'_> {
    fn drop(&mut self) {
        signal_group(self.pgid, Signal::SIGKILL);
        self.runner.groups().remove(&self.pgid);
        if let Some(supervisor) = &self.runner.supervisor {
            supervisor.ended(self.pgid);
        }
    }
}

fn signal_group(pgid: i32, signal: Signal) {
    if pgid > 1 {
        // ESRCH: the group is already empty.
        let _ = killpg(Pid::from_raw(pgid), signal);
    }
}

/// How long after a task's deadline the completion of a killed program is sent.
const AFTER_DEADLINE: Duration = Duration::from_millis(500);

/// Lines of the program's stderr kept for a failure's details.
const STDERR_TAIL: usize = 20;

impl Runner {
    fn groups(&self) -> std::sync::MutexGuard<'_, HashSet<i32>> {
        self.groups.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// SIGKILL every running program's process group; returns how many.
    fn kill_all(&self) -> usize {
        let groups = self.groups();
        for pgid in groups.iter() {
            signal_group(*pgid, Signal::SIGKILL);
        }
        groups.len()
    }

    async fn execute(&self, task: TaskContext) -> (Status, Box<RawValue>) {
        let started = Instant::now();
        let (status, reply) = match self.execute_inner(&task).await {
            Ok((status, reply)) => (status, reply),
            Err(failure) => (Status::Failed, raw(&failure)),
        };
        let (outcome, counter) = match status {
            Status::Success => ("success".to_owned(), &self.counts.success),
            Status::Error => ("error".to_owned(), &self.counts.error),
            Status::Failed => {
                let why = serde_json::from_str::<serde_json::Value>(reply.get())
                    .ok()
                    .and_then(|r| r["error"].as_str().map(str::to_owned))
                    .unwrap_or_else(|| "see the reply".to_owned());
                (format!("failed: {why}"), &self.counts.failed)
            }
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if !self.quiet {
            eprintln!(
                "[{}] {} → {outcome} in {}",
                short(task.id()),
                task.name(),
                human(started.elapsed())
            );
        }
        (status, reply)
    }

    /// Run the program for `task`. `Err` is a `Failed` reply built here.
    async fn execute_inner(
        &self,
        task: &TaskContext,
    ) -> Result<(Status, Box<RawValue>), serde_json::Value> {
        let remaining = task.deadline().saturating_duration_since(Instant::now());
        let deadline_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_add(remaining)
            .as_millis();
        let mut command = tokio::process::Command::new(&self.program);
        command
            .args(&self.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .env("BGTASK_TASK_ID", task.id())
            .env("BGTASK_TASK_NAME", task.name())
            .env("BGTASK_WORKER_ID", &self.worker_id)
            .env("BGTASK_TIMEOUT_MS", remaining.as_millis().to_string())
            .env("BGTASK_DEADLINE_MS", deadline_ms.to_string());
        if let Some(value) = task.key_value() {
            command.env("BGTASK_KEY_VALUE", value);
        }
        if let Some(meta) = task.metadata() {
            command.env("BGTASK_METADATA", meta.to_string());
        }
        let mut child = command
            .spawn()
            .map_err(|e| json!({"error": format!("cannot start {:?}: {e}", self.program)}))?;
        let pgid = child.id().map_or(0, |id| id as i32);
        self.groups().insert(pgid);
        if let Some(supervisor) = &self.supervisor {
            supervisor.started(pgid);
        }
        let _group = Group { pgid, runner: self };

        if let Some(mut stdin) = child.stdin.take() {
            let body = task.raw().get().as_bytes().to_vec();
            tokio::spawn(async move {
                // A program that does not read its input closes the pipe: not an error.
                let _ = stdin.write_all(&body).await;
                let _ = stdin.shutdown().await;
            });
        }
        let stdout = child
            .stdout
            .take()
            .map(|out| tokio::spawn(read_capped(out, self.max_payload + 1)));
        let stderr = child.stderr.take().map(|err| {
            let task = task.clone();
            tokio::spawn(forward_stderr(err, task, self.quiet))
        });

        let end = tokio::select! {
            status = child.wait() => match status {
                Ok(status) => End::Exited(status),
                Err(e) => return Err(json!({"error": format!("cannot wait for the program: {e}")})),
            },
            _ = tokio::time::sleep_until(task.deadline()) => End::Deadline,
            _ = task.cancelled() => End::Cancelled,
        };
        let status = match end {
            End::Exited(status) => Some(status),
            End::Deadline | End::Cancelled => {
                signal_group(pgid, Signal::SIGTERM);
                match tokio::time::timeout(self.kill_grace, child.wait()).await {
                    Ok(status) => status.ok(),
                    Err(_) => {
                        signal_group(pgid, Signal::SIGKILL);
                        child.wait().await.ok()
                    }
                }
            }
        };
        // Whatever the program left behind in its group goes now, which also closes its pipes.
        signal_group(pgid, Signal::SIGKILL);
        let output = match stdout {
            Some(reader) => tokio::time::timeout(Duration::from_secs(2), reader)
                .await
                .ok()
                .and_then(|r| r.ok())
                .unwrap_or_default(),
            None => Vec::new(),
        };
        let tail: Vec<String> = match stderr {
            Some(reader) => tokio::time::timeout(Duration::from_secs(2), reader)
                .await
                .ok()
                .and_then(|r| r.ok())
                .unwrap_or_default()
                .into(),
            None => Vec::new(),
        };

        match end {
            End::Deadline => {
                // The creator has given up by now, on its own clock. Completing a moment later
                // keeps this reply from racing its timeout: the creator reliably sees "timed
                // out", and this late reply is dropped.
                tokio::time::sleep_until(task.deadline() + AFTER_DEADLINE).await;
                return Err(json!({
                    "error": "timed out: the program was killed at the task's deadline",
                    "timeout_ms": millis(remaining),
                    "stderr": tail,
                }));
            }
            End::Cancelled => {
                return Err(json!({
                    "error": "cancelled: the program was killed",
                    "stderr": tail,
                }))
            }
            End::Exited(_) => {}
        }
        let status = status.unwrap_or_else(|| ExitStatus::from_raw(0));
        if output.len() > self.max_payload {
            return Err(json!({
                "error": "the program's output is larger than the payload limit",
                "limit": self.max_payload,
            }));
        }
        let text = String::from_utf8_lossy(&output);
        let text = text.trim();
        // Parsed as raw JSON: the reply is passed on exactly as the program wrote it.
        let parsed: Option<Box<RawValue>> = if text.is_empty() {
            Some(RawValue::NULL.to_owned())
        } else {
            serde_json::from_str(text).ok()
        };
        match (status.code(), parsed) {
            (Some(0), Some(reply)) => Ok((Status::Success, reply)),
            (Some(0), None) => Err(json!({
                "error": "the program's output is not JSON",
                "output": excerpt(text),
                "exit_code": 0,
            })),
            (Some(1), Some(reply)) if !text.is_empty() => Ok((Status::Error, reply)),
            (Some(1), _) => {
                let said = if text.is_empty() {
                    tail.last().cloned().unwrap_or_default()
                } else {
                    excerpt(text)
                };
                Ok((Status::Error, raw(&json!({ "error": said }))))
            }
            (Some(code), _) => Err(json!({
                "error": format!("the program exited with status {code}"),
                "exit_code": code,
                "stderr": tail,
            })),
            (None, _) => {
                let signal = status.signal().unwrap_or_default();
                let name = Signal::try_from(signal)
                    .map(|s| s.as_str().to_owned())
                    .unwrap_or_else(|_| signal.to_string());
                Err(json!({
                    "error": format!("the program was killed by {name}"),
                    "signal": signal,
                    "stderr": tail,
                }))
            }
        }
    }
}

fn raw(value: &serde_json::Value) -> Box<RawValue> {
    serde_json::value::to_raw_value(value).unwrap_or_else(|_| RawValue::NULL.to_owned())
}

/// Read everything, keeping at most `cap` bytes.
async fn read_capped(mut reader: impl AsyncRead + Unpin, cap: usize) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                let room = cap.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

/// Turn `progress:` and `bad-key:` lines into protocol calls, copy the others; return the last
/// lines for a failure's details.
async fn forward_stderr(
    reader: impl AsyncRead + Unpin,
    task: TaskContext,
    quiet: bool,
) -> VecDeque<String> {
    let mut lines = BufReader::new(reader);
    let mut tail = VecDeque::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        match lines.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return tail,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\n', '\r']);
        if let Some(progress) = text.strip_prefix("progress:") {
            let progress = progress.trim();
            let value: Box<RawValue> = serde_json::from_str(progress)
                .unwrap_or_else(|_| raw(&serde_json::Value::String(progress.to_owned())));
            if let Err(error) = task.progress(&value).await {
                tracing::warn!(task = task.id(), %error, "could not send progress");
            }
            continue;
        }
        if let Some(reason) = text.strip_prefix("bad-key:") {
            match task.report_bad_key(reason.trim()).await {
                Ok(true) if !quiet => eprintln!(
                    "[{}] key value {:?} is now blacklisted: {}",
                    short(task.id()),
                    task.key_value().unwrap_or_default(),
                    reason.trim()
                ),
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(task = task.id(), %error, "could not report a bad key")
                }
            }
            continue;
        }
        if !quiet {
            eprintln!("[{}] {text}", short(task.id()));
        }
        if tail.len() == STDERR_TAIL {
            tail.pop_front();
        }
        tail.push_back(text.to_owned());
    }
}

fn short(id: &str) -> &str {
    &id[..id.len().min(8)]
}

fn excerpt(text: &str) -> String {
    let text = text.trim();
    let mut shown: String = text.chars().take(500).collect();
    if shown.len() < text.len() {
        shown.push('…');
    }
    shown
}
