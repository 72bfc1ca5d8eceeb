//! `bgtask demo`: workers and a creator in one process, running a realistic mix of tasks.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bgtask::{
    BlacklistConfig, Client, ClientConfig, ErrorDetail, ErrorKind, KeyLimit, ShutdownHandle,
    SubmitOptions, TaskFailure, TaskHandle, Worker,
};
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::exit::{CliError, CliResult};
use crate::settings::{human, stdout_is_tty, Settings};

/// `bgtask demo` flags.
#[derive(Args, Debug)]
pub(crate) struct DemoArgs {
    /// Print plain lines instead of progress bars (the default when stdout is not a terminal).
    #[arg(long)]
    plain: bool,

    /// Workers serving the demo's tasks.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=16))]
    workers: u64,
}

const TASK: &str = "thumbnail";
/// Tasks in flight per user.
const LIMIT: u64 = 2;
/// Bad-key reports beyond which a user is blacklisted.
const THRESHOLD: u64 = 2;
const TIMEOUT: Duration = Duration::from_millis(1500);

/// Tasks run by each worker, by outcome.
#[derive(Default)]
struct WorkerCounts {
    success: AtomicU64,
    error: AtomicU64,
    failed: AtomicU64,
}

pub(crate) async fn run(settings: Settings, args: DemoArgs) -> CliResult {
    let url = settings
        .config
        .broker_url
        .clone()
        .unwrap_or_else(|| "memory://".to_owned());
    let namespace = if settings.namespace_given {
        settings.config.namespace.clone()
    } else {
        format!("demo-{}", &bgtask::names::random_id()[..8])
    };
    let broker = Settings::connect(&url).await?;
    let ui = Ui {
        bars: !args.plain && stdout_is_tty(),
    };
    let started = Instant::now();
    let where_ = if url.starts_with("memory:") {
        "memory:// (embedded, no server)".to_owned()
    } else {
        bgtask::redact(&url)
    };
    out!(
        "bgtask demo: {} workers and 1 creator on {where_}",
        args.workers
    );
    out!("namespace {namespace}; task {TASK:?} with the task key \"user\"");
    out!(
        "rules: at most {LIMIT} in flight per user; blacklisted after more than {THRESHOLD} bad reports\n"
    );

    // The workers: make thumbnails, report progress, flag users who upload corrupt images.
    let mut shutdowns: Vec<ShutdownHandle> = Vec::new();
    let mut counts: Vec<Arc<WorkerCounts>> = Vec::new();
    for n in 1..=args.workers {
        let mut config = settings.config.worker_config();
        config.namespace = namespace.clone();
        config.tasks = vec![TASK.to_owned()];
        config.blacklist = BlacklistConfig {
            threshold: THRESHOLD,
            interval: Duration::from_secs(10),
            duration: Duration::from_secs(60),
        };
        let worker = Worker::new(broker.clone(), config).await?;
        shutdowns.push(worker.shutdown_handle());
        let count = Arc::new(WorkerCounts::default());
        counts.push(count.clone());
        tokio::spawn(worker.run(2, move |task| {
            let count = count.clone();
            async move {
                let result = thumbnail(&task, n).await;
                let counter = match &result {
                    Ok(_) => &count.success,
                    Err(f) if f.status == bgtask::Status::Error => &count.error,
                    Err(_) => &count.failed,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                result
            }
        }));
    }

    // The creator.
    let client = Client::new(
        broker.clone(),
        ClientConfig {
            namespace: namespace.clone(),
            task_key: Some("user".into()),
            per_key_limit: KeyLimit::Max(LIMIT),
            ..settings.config.client_config()
        },
    )
    .await?;
    let mut tally = Tally::default();

    // 1. Progress.
    ui.heading("1. six users upload an image each; the workers report progress");
    let phase = ui.phase();
    let mut running = Vec::new();
    for (i, user) in ["ana", "bo", "cy", "di", "ed", "flo"].iter().enumerate() {
        let payload =
            json!({"user": user, "image": format!("{user}.png"), "step_ms": 45 + 25 * (i % 4)});
        let handle = client.submit(TASK, &payload).await?;
        running.push(tokio::spawn(follow(phase.line(user), handle)));
    }
    for outcome in futures::future::join_all(running).await {
        tally.add(outcome.map_err(|e| CliError::new(crate::exit::INTERNAL, e.to_string()))?);
    }
    drop(phase);

    // 2. The per-key limit.
    ui.heading(&format!(
        "2. gus uploads three images at once, limit {LIMIT} per user: the third is refused"
    ));
    let phase = ui.phase();
    let mut running = Vec::new();
    for n in 1..=3 {
        let label = format!("gus #{n}");
        let payload = json!({"user": "gus", "image": format!("gus-{n}.png"), "step_ms": 70});
        match client.submit(TASK, &payload).await {
            Ok(handle) => running.push(tokio::spawn(follow(phase.line(&label), handle))),
            Err(e) => {
                let (outcome, line) = refused(e, ErrorKind::LimitReached)?;
                phase.line(&label).finish(false, line);
                tally.add(outcome);
            }
        }
    }
    for outcome in futures::future::join_all(running).await {
        tally.add(outcome.map_err(|e| CliError::new(crate::exit::INTERNAL, e.to_string()))?);
    }
    drop(phase);

    // 3. A timeout.
    ui.heading(&format!(
        "3. hal's panorama is too big to finish within its {} timeout",
        human(TIMEOUT)
    ));
    let phase = ui.phase();
    let handle = client
        .submit_with(
            TASK,
            &json!({"user": "hal", "image": "panorama.tiff", "kind": "huge"}),
            SubmitOptions::new().timeout(TIMEOUT),
        )
        .await?;
    tally.add(follow(phase.line("hal"), handle).await);
    drop(phase);

    // 4. A failure.
    ui.heading("4. ida's image crashes the codec");
    let phase = ui.phase();
    let handle = client
        .submit(
            TASK,
            &json!({"user": "ida", "image": "weird.heic", "kind": "broken"}),
        )
        .await?;
    tally.add(follow(phase.line("ida"), handle).await);
    drop(phase);

    // 5. A blacklisting.
    ui.heading(&format!(
        "5. mallory keeps uploading corrupt images: blacklisted after more than {THRESHOLD} reports"
    ));
    let phase = ui.phase();
    for attempt in 1..=5 {
        let label = format!("mallory #{attempt}");
        let payload =
            json!({"user": "mallory", "image": format!("evil-{attempt}.png"), "kind": "corrupt"});
        match client.submit(TASK, &payload).await {
            Ok(handle) => tally.add(follow(phase.line(&label), handle).await),
            Err(e) => {
                let (outcome, line) = refused(e, ErrorKind::Blacklisted)?;
                phase.line(&label).finish(false, line);
                tally.add(outcome);
            }
        }
    }
    drop(phase);
    let blacklisted = client.blacklist().list().await?;
    for entry in &blacklisted {
        out!(
            "   blacklisted now: {} ({}), {} left: {}",
            entry.value,
            entry.task,
            human(entry.remaining),
            entry.reason
        );
    }

    for shutdown in &shutdowns {
        shutdown.shutdown();
    }
    client.shutdown().await;

    // The summary.
    let elapsed = started.elapsed();
    out!("\nsummary: {} tasks in {}", tally.total(), human(elapsed));
    out!("   {:<15} {:>5}  {:<8}", "outcome", "tasks", "expected");
    let mut surprises = Vec::new();
    for (outcome, expected) in EXPECTED {
        let got = tally.count(outcome);
        let mark = if got == expected { "✓" } else { "✗" };
        if got != expected {
            surprises.push(format!("{} {got} (expected {expected})", outcome.name()));
        }
        out!("   {:<15} {:>5}  {mark} {expected}", outcome.name(), got);
    }
    out!(
        "\n   {:<15} {:>7} {:>7} {:>7}",
        "worker",
        "success",
        "error",
        "failed"
    );
    for (n, count) in counts.iter().enumerate() {
        out!(
            "   {:<15} {:>7} {:>7} {:>7}",
            format!("worker {}", n + 1),
            count.success.load(Ordering::Relaxed),
            count.error.load(Ordering::Relaxed),
            count.failed.load(Ordering::Relaxed),
        );
    }
    out!("   (hal's panorama still runs on its worker; its late reply will be dropped)");
    if !surprises.is_empty() {
        return Err(CliError::new(
            crate::exit::INTERNAL,
            format!("the demo did not go as expected: {}", surprises.join(", ")),
        ));
    }
    out!("\nnext: the 5-minute tour of the CLI on Redis, in docs/cli.md");
    Ok(ExitCode::SUCCESS)
}

/// What the worker does with an image.
async fn thumbnail(task: &bgtask::TaskContext, worker: u64) -> bgtask::HandlerResult {
    let image = task.json();
    let user = image["user"].as_str().unwrap_or_default().to_owned();
    let step = Duration::from_millis(image["step_ms"].as_u64().unwrap_or(80));
    match image["kind"].as_str() {
        Some("corrupt") => {
            tokio::time::sleep(Duration::from_millis(60)).await;
            task.report_bad_key("uploads corrupt images").await?;
            return Err(TaskFailure::error(json!({"error": "corrupt image"})));
        }
        Some("broken") => {
            for percent in [10, 20, 30] {
                tokio::time::sleep(Duration::from_millis(120)).await;
                task.progress(&json!({ "percent": percent })).await?;
            }
            return Err(TaskFailure::failed(json!({"error": "codec crashed"})));
        }
        Some("huge") => {
            // 5 % every 250 ms: it would need 5 s.
            for percent in (5..=100).step_by(5) {
                tokio::time::sleep(Duration::from_millis(250)).await;
                task.progress(&json!({ "percent": percent })).await?;
            }
        }
        _ => {
            for percent in (10..=100).step_by(10) {
                tokio::time::sleep(step).await;
                task.progress(&json!({ "percent": percent })).await?;
            }
        }
    }
    Ok(json!({"thumbnail": format!("thumbs/{user}.png"), "worker": worker}))
}

/// A submit that admission control refused at once with `expected` (a limit or a blacklist):
/// its outcome and the line that shows it. Any other error is the demo's own.
fn refused(e: bgtask::Error, expected: ErrorKind) -> CliResult<(Outcome, String)> {
    if e.kind() != expected {
        return Err(e.into());
    }
    let (outcome, what, detail) = match e.detail() {
        Some(ErrorDetail::Limit { in_flight, limit }) => (
            Outcome::LimitReached,
            "limit reached",
            format!("{in_flight} in flight, limit {limit}"),
        ),
        Some(ErrorDetail::Blacklisted { reason, remaining }) => (
            Outcome::Blacklisted,
            "blacklisted",
            format!("{reason}; {} left", human(*remaining)),
        ),
        _ if expected == ErrorKind::LimitReached => {
            (Outcome::LimitReached, "limit reached", e.to_string())
        }
        _ => (Outcome::Blacklisted, "blacklisted", e.to_string()),
    };
    Ok((outcome, format!("refused at once: {what} ({detail})")))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    Success,
    LimitReached,
    TimedOut,
    Failed,
    TaskError,
    Blacklisted,
    Other,
}

impl Outcome {
    fn name(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::LimitReached => "limit reached",
            Outcome::TimedOut => "timed out",
            Outcome::Failed => "failed",
            Outcome::TaskError => "task error",
            Outcome::Blacklisted => "blacklisted",
            Outcome::Other => "other",
        }
    }
}

const EXPECTED: [(Outcome, u64); 7] = [
    (Outcome::Success, 8),
    (Outcome::LimitReached, 1),
    (Outcome::TimedOut, 1),
    (Outcome::Failed, 1),
    (Outcome::TaskError, 3),
    (Outcome::Blacklisted, 2),
    (Outcome::Other, 0),
];

#[derive(Default)]
struct Tally(BTreeMap<Outcome, u64>);

impl Tally {
    fn add(&mut self, outcome: Outcome) {
        *self.0.entry(outcome).or_default() += 1;
    }
    fn count(&self, outcome: Outcome) -> u64 {
        self.0.get(&outcome).copied().unwrap_or_default()
    }
    fn total(&self) -> u64 {
        self.0.values().sum()
    }
}

/// Follow one task to its end on its line.
async fn follow(mut line: Line, mut handle: TaskHandle) -> Outcome {
    let started = Instant::now();
    while let Some(progress) = handle.progress().await {
        if let Some(percent) = progress["percent"].as_u64() {
            line.progress(percent);
        }
    }
    match handle.reply().await {
        Ok(reply) => {
            let reply = reply.json();
            let by = reply["worker"].as_u64().unwrap_or_default();
            line.finish(
                true,
                format!(
                    "{} by worker {by} in {}",
                    reply["thumbnail"].as_str().unwrap_or_default(),
                    human(started.elapsed())
                ),
            );
            Outcome::Success
        }
        Err(e) => {
            let said = e
                .reply()
                .and_then(|r| serde_json::from_str::<Value>(r.get()).ok())
                .and_then(|r| r["error"].as_str().map(str::to_owned))
                .unwrap_or_default();
            let (outcome, text) = match e.kind() {
                ErrorKind::TimedOut => (
                    Outcome::TimedOut,
                    format!("timed out after {}", human(started.elapsed())),
                ),
                ErrorKind::TaskFailed => (Outcome::Failed, format!("failed: {said}")),
                ErrorKind::TaskError => (Outcome::TaskError, format!("task error: {said}")),
                _ => (Outcome::Other, e.to_string()),
            };
            line.finish(false, text);
            outcome
        }
    }
}

/// How the demo draws: progress bars on a terminal, plain lines elsewhere.
struct Ui {
    bars: bool,
}

impl Ui {
    fn heading(&self, text: &str) {
        out!("{text}");
    }

    /// The lines of one step; bars are drawn until it is dropped, then stay on the screen.
    fn phase(&self) -> Phase {
        Phase {
            multi: self
                .bars
                .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stdout())),
        }
    }
}

struct Phase {
    multi: Option<MultiProgress>,
}

impl Drop for Phase {
    fn drop(&mut self) {
        // Finished bars stay on the screen; the next heading goes below them.
        // indicatif leaves the cursor at the end of the last bar: end that line first.
        if let Some(multi) = self.multi.take() {
            drop(multi);
            out!();
        }
        out!();
    }
}

impl Phase {
    fn line(&self, label: &str) -> Line {
        let bar = self.multi.as_ref().map(|multi| {
            let bar = multi.add(ProgressBar::new(100));
            bar.set_style(style("{bar:30.cyan/blue}"));
            bar.set_prefix(label.to_owned());
            bar.enable_steady_tick(Duration::from_millis(100));
            bar
        });
        Line {
            label: label.to_owned(),
            bar,
            updates: 0,
            first: None,
            last: None,
        }
    }
}

fn style(bar: &str) -> ProgressStyle {
    ProgressStyle::with_template(&format!("   {{prefix:<10}} {bar} {{pos:>3}}%  {{msg}}"))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("━━─")
}

/// One task's line: a bar, or a plain line printed when the task ends.
struct Line {
    label: String,
    bar: Option<ProgressBar>,
    updates: u32,
    first: Option<u64>,
    last: Option<u64>,
}

impl Line {
    fn progress(&mut self, percent: u64) {
        self.updates += 1;
        self.first.get_or_insert(percent);
        self.last = Some(percent);
        if let Some(bar) = &self.bar {
            bar.set_position(percent.min(100));
        }
    }

    fn finish(self, ok: bool, message: String) {
        let mark = if ok { "✓" } else { "✗" };
        match &self.bar {
            Some(bar) => {
                if self.updates == 0 {
                    bar.set_style(
                        ProgressStyle::with_template("   {prefix:<10} {msg}")
                            .unwrap_or_else(|_| ProgressStyle::default_bar()),
                    );
                } else if ok {
                    bar.set_style(style("{bar:30.green/blue}"));
                } else {
                    bar.set_style(style("{bar:30.red/blue}"));
                }
                // Abandon, not finish: a task that failed keeps its bar where it stopped.
                bar.abandon_with_message(format!("{mark} {message}"));
            }
            None => {
                let progress = match (self.first, self.last) {
                    (Some(first), Some(last)) => format!(
                        "{} update{} {first}%→{last}%, ",
                        self.updates,
                        if self.updates == 1 { "" } else { "s" }
                    ),
                    _ => String::new(),
                };
                out!("   {:<10} {mark} {progress}{message}", self.label);
            }
        }
    }
}
