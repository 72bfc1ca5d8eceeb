//! `bgtask bench`: a load generator, and a bare request-reply baseline on the same broker.

use std::collections::{BTreeMap, HashMap};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bgtask::{
    Client, ClientConfig, DynBroker, Incoming, KeyLimit, Published, Status, SubmitOptions,
    TaskContext, Worker, WorkerConfig,
};
use bytes::Bytes;
use clap::Args;
use futures::StreamExt;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::exit::{self, CliError, CliResult};
use crate::settings::{human, stderr_is_tty, Settings};

pub(crate) const LONG_ABOUT: &str = "\
Measure throughput and latency. Submits --tasks tasks, --concurrency at a time, each a JSON
object of about --payload bytes, to echo workers, and prints tasks per second and the latency
(submit to reply) percentiles p50, p90, p99 and max.

--workers W starts W echo workers in this process (each task is offered to one of them, chosen
by free capacity). --workers 0 uses external workers instead, e.g. in another terminal:
    bgtask worker --task bench --concurrency 64 -- cat
(the embedded memory:// broker cannot reach other processes, so it needs W > 0).

--baseline measures a bare request-reply loop over the same broker instead: the request is
published on a channel, an echo task publishes it back on the client's channel; no envelope, no
claim, no leases, no progress. It is the floor any protocol on this broker pays. --compare runs
both, one after the other, and prints the ratio bgtask/baseline.

Without --namespace, in-process workers run in a fresh namespace. Exits 0 when every task
succeeded, 70 otherwise (the errors are counted by kind in the output).";

pub(crate) const EXAMPLES: &str = "\
Examples:
  bgtask bench                                            # Redis at 127.0.0.1:6379 unless configured
  bgtask bench --broker memory:// --tasks 50000 --concurrency 256
  bgtask bench --broker redis://127.0.0.1:6379 --tasks 50000 --concurrency 256 --compare
  bgtask bench --key user --key-values 100 --payload 1024 --json
  bgtask bench --workers 0 --task bench                   # with `bgtask worker --task bench -- cat`";

/// `bgtask bench` flags.
#[derive(Args, Debug)]
pub(crate) struct BenchArgs {
    /// Tasks to submit.
    #[arg(long, short = 'n', value_name = "N", default_value_t = 10_000)]
    tasks: u64,

    /// Tasks in flight at once.
    #[arg(long, short = 'c', value_name = "C", default_value_t = 64)]
    concurrency: usize,

    /// Approximate size of each task's JSON payload, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 64)]
    payload: usize,

    /// In-process echo workers; 0 uses external workers.
    #[arg(long, short = 'w', value_name = "W", default_value_t = 2)]
    workers: usize,

    /// Tasks each in-process worker runs at once. Default: --concurrency.
    #[arg(long, value_name = "N")]
    worker_concurrency: Option<usize>,

    /// Use this top-level property as the task key (per-key limit and blacklist checks on
    /// every task).
    #[arg(long, value_name = "PROPERTY")]
    key: Option<String>,

    /// Distinct key values, used in turn. Default: --concurrency (about one task in flight per
    /// value, so the default limit of 5 is never hit).
    #[arg(long, value_name = "N", requires = "key")]
    key_values: Option<u64>,

    /// The task name.
    #[arg(long, value_name = "NAME", default_value = "bench")]
    task: String,

    /// Timeout of each task.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = crate::duration_arg)]
    timeout: Duration,

    /// Print the results as JSON on stdout (no progress bar).
    #[arg(long)]
    json: bool,

    /// Measure the bare request-reply baseline instead of bgtask.
    #[arg(long, conflicts_with = "compare")]
    baseline: bool,

    /// Measure bgtask and the baseline, and print the ratio.
    #[arg(long)]
    compare: bool,

    #[command(flatten)]
    metrics: crate::metrics::MetricsArgs,
}

/// The process's peak resident memory so far (Linux `VmHWM`), for memory per task in flight:
/// compare runs at two concurrencies. `None` where `/proc` does not say.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The results of one run.
struct Measured {
    mode: &'static str,
    ok: u64,
    errors: BTreeMap<String, u64>,
    elapsed: Duration,
    /// Latencies of successful tasks, in microseconds.
    latency: Histogram<u64>,
}

impl Measured {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn ms(&self, quantile: f64) -> f64 {
        if self.latency.is_empty() {
            return 0.0;
        }
        let us = if quantile >= 1.0 {
            self.latency.max()
        } else {
            self.latency.value_at_quantile(quantile)
        };
        us as f64 / 1000.0
    }

    fn to_json(&self) -> Value {
        json!({
            "ok": self.ok,
            "errors": self.errors,
            "seconds": round(self.elapsed.as_secs_f64(), 3),
            "tasks_per_second": round(self.rate(), 1),
            "latency_ms": {
                "p50": round(self.ms(0.5), 3),
                "p90": round(self.ms(0.9), 3),
                "p99": round(self.ms(0.99), 3),
                "max": round(self.ms(1.0), 3),
                "mean": round(if self.latency.is_empty() { 0.0 } else { self.latency.mean() / 1000.0 }, 3),
            },
        })
    }

    fn row(&self) -> String {
        let errors: u64 = self.errors.values().sum();
        format!(
            "  {:<9} {:>10.0} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>8} {:>8}",
            self.mode,
            self.rate(),
            self.ms(0.5),
            self.ms(0.9),
            self.ms(0.99),
            self.ms(1.0),
            errors,
            human(self.elapsed),
        )
    }
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

struct Plan {
    tasks: u64,
    concurrency: usize,
    workers: usize,
    worker_concurrency: usize,
    namespace: String,
    task: String,
    key: Option<String>,
    key_values: u64,
    timeout: Duration,
    filler: String,
    progress: bool,
}

impl Plan {
    /// The payload of task `i`: about `--payload` bytes of JSON.
    fn payload(&self, i: u64) -> String {
        match &self.key {
            Some(key) => format!(
                "{{{}:\"v{}\",\"data\":\"{}\"}}",
                Value::String(key.clone()),
                i % self.key_values,
                self.filler
            ),
            None => format!("{{\"data\":\"{}\"}}", self.filler),
        }
    }

    fn progress_bar(&self, label: &str) -> ProgressBar {
        if !self.progress {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::with_draw_target(Some(self.tasks), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>9} {bar:40.cyan/blue} {pos}/{len} {per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("━━─"),
        );
        bar.set_prefix(label.to_owned());
        bar
    }
}

pub(crate) async fn run(settings: Settings, args: BenchArgs) -> CliResult {
    args.metrics.serve()?;
    if args.tasks == 0 || args.concurrency == 0 {
        return Err(CliError::usage(
            "--tasks and --concurrency must be at least 1",
        ));
    }
    let url = settings
        .config
        .broker_url
        .clone()
        .unwrap_or_else(|| bgtask::DEFAULT_BROKER_URL.to_owned());
    let memory = bgtask::Scheme::of(&url)? == bgtask::Scheme::Memory;
    if args.workers == 0 && memory {
        return Err(CliError::usage(
            "--workers 0 needs a networked broker: memory:// cannot reach workers in other processes",
        ));
    }
    if args.workers == 0 && (args.baseline || args.compare) {
        return Err(CliError::usage(
            "the baseline needs in-process workers (--workers 1 or more)",
        ));
    }
    let namespace = if settings.namespace_given || args.workers == 0 {
        settings.config.namespace.clone()
    } else {
        format!("bench-{}", &bgtask::names::random_id()[..8])
    };
    let mut plan = Plan {
        tasks: args.tasks,
        concurrency: args.concurrency,
        workers: args.workers,
        worker_concurrency: args.worker_concurrency.unwrap_or(args.concurrency).max(1),
        namespace,
        task: args.task.clone(),
        key: args.key.clone(),
        key_values: args.key_values.unwrap_or(args.concurrency as u64).max(1),
        timeout: args.timeout,
        filler: String::new(),
        progress: !args.json && stderr_is_tty(),
    };
    // Pad task 0 to exactly --payload bytes (others differ by the digits of their key value).
    plan.filler = "x".repeat(args.payload.saturating_sub(plan.payload(0).len()));
    let broker = Settings::connect(&url).await?;
    let workers = if args.workers == 0 {
        "external workers".to_owned()
    } else {
        format!("{} in-process echo worker(s)", args.workers)
    };
    let header = format!(
        "bgtask bench: {} tasks, concurrency {}, payload {} B, {workers}, {} (namespace {}){}",
        plan.tasks,
        plan.concurrency,
        plan.payload(0).len(),
        bgtask::redact(&url),
        plan.namespace,
        plan.key
            .as_ref()
            .map(|k| format!(", task key {k:?} over {} values", plan.key_values))
            .unwrap_or_default(),
    );
    if !args.json {
        out!("{header}");
    }

    let mut runs = Vec::new();
    if !args.baseline {
        runs.push(run_bgtask(&broker, &settings, &plan).await?);
    }
    if args.baseline || args.compare {
        runs.push(run_baseline(&broker, &plan).await?);
    }

    let ratio = (runs.len() == 2).then(|| {
        let (b, base) = (&runs[0], &runs[1]);
        json!({
            "throughput": round(b.rate() / base.rate().max(1e-9), 3),
            "p50_latency": round(b.ms(0.5) / base.ms(0.5).max(1e-9), 3),
            "p99_latency": round(b.ms(0.99) / base.ms(0.99).max(1e-9), 3),
        })
    });
    if args.json {
        let mut out = json!({
            "broker": bgtask::redact(&url),
            "namespace": plan.namespace,
            "tasks": plan.tasks,
            "concurrency": plan.concurrency,
            "payload_bytes": plan.payload(0).len(),
            "workers": plan.workers,
            "key": plan.key,
            "key_values": plan.key.as_ref().map(|_| plan.key_values),
            "peak_rss_bytes": peak_rss_bytes(),
        });
        for run in &runs {
            out[run.mode] = run.to_json();
        }
        if let Some(ratio) = &ratio {
            out["ratio"] = ratio.clone();
        }
        out!("{out:#}");
    } else {
        out!(
            "\n  {:<9} {:>10} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8}",
            "",
            "tasks/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            "errors",
            "time"
        );
        for run in &runs {
            out!("{}", run.row());
        }
        for run in &runs {
            for (kind, count) in &run.errors {
                out!("  {} errors: {count} {kind}", run.mode);
            }
        }
        if let (Some(ratio), [b, base]) = (&ratio, runs.as_slice()) {
            out!(
                "\n  bgtask/baseline: throughput ×{:.2} ({:.0} vs {:.0} tasks/s), p50 latency ×{:.2}, p99 latency ×{:.2}",
                ratio["throughput"].as_f64().unwrap_or_default(),
                b.rate(),
                base.rate(),
                ratio["p50_latency"].as_f64().unwrap_or_default(),
                ratio["p99_latency"].as_f64().unwrap_or_default(),
            );
        }
    }
    let failed = runs.iter().any(|r| !r.errors.is_empty());
    Ok(if failed {
        ExitCode::from(exit::INTERNAL)
    } else {
        ExitCode::SUCCESS
    })
}

/// Run `plan.tasks` calls of `call`, `plan.concurrency` at a time, measuring each.
async fn drive<F, Fut>(plan: &Plan, mode: &'static str, call: F) -> Measured
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    let call = Arc::new(call);
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let bar = plan.progress_bar(mode);
    let ticker = {
        let (bar, done) = (bar.clone(), done.clone());
        tokio::spawn(async move {
            loop {
                bar.set_position(done.load(Ordering::Relaxed));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let started = Instant::now();
    let mut loops = Vec::with_capacity(plan.concurrency);
    for _ in 0..plan.concurrency {
        let (call, next, done, tasks) = (call.clone(), next.clone(), done.clone(), plan.tasks);
        loops.push(tokio::spawn(async move {
            // Raw samples: a histogram per loop would cost more to create and merge than the
            // tasks of a fast broker, inside the measured time.
            let mut latencies = Vec::new();
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= tasks {
                    break;
                }
                let t0 = Instant::now();
                match call(i).await {
                    Ok(()) => latencies.push(t0.elapsed()),
                    Err(kind) => *errors.entry(kind).or_default() += 1,
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            (latencies, errors)
        }));
    }
    let joined = futures::future::join_all(loops).await;
    let elapsed = started.elapsed();
    ticker.abort();
    bar.finish_and_clear();
    let mut latency = new_histogram();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for result in joined {
        match result {
            Ok((latencies, e)) => {
                for t in latencies {
                    let us = t.as_micros().max(1) as u64;
                    let _ = latency.record(us.min(latency.high()));
                }
                for (kind, n) in e {
                    *errors.entry(kind).or_default() += n;
                }
            }
            Err(_) => *errors.entry("panic".to_owned()).or_default() += 1,
        }
    }
    Measured {
        mode,
        ok: latency.len(),
        errors,
        elapsed,
        latency,
    }
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs to 1 h, 3 significant digits; these bounds are valid, so this cannot fail.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap_or_else(|_| Histogram::new(3).unwrap())
}

async fn run_bgtask(broker: &DynBroker, settings: &Settings, plan: &Plan) -> CliResult<Measured> {
    let mut shutdowns = Vec::new();
    for _ in 0..plan.workers {
        let config = WorkerConfig {
            namespace: plan.namespace.clone(),
            tasks: vec![plan.task.clone()],
            ..settings.config.worker_config()
        };
        let worker = Worker::new(broker.clone(), config).await?;
        shutdowns.push(worker.shutdown_handle());
        tokio::spawn(echo_worker(worker, plan.worker_concurrency));
    }
    let client = Client::new(
        broker.clone(),
        ClientConfig {
            namespace: plan.namespace.clone(),
            task_key: plan.key.clone(),
            per_key_limit: match plan.key {
                Some(_) => settings.config.client.per_key_limit,
                None => KeyLimit::default(),
            },
            ..settings.config.client_config()
        },
    )
    .await?;
    let payloads: Arc<Vec<Box<RawValue>>> = Arc::new(
        (0..plan.key_values.min(plan.tasks))
            .map(|i| RawValue::from_string(plan.payload(i)).expect("the payload is valid JSON"))
            .collect(),
    );
    let (task, timeout) = (Arc::new(plan.task.clone()), plan.timeout);
    let c = client.clone();
    let measured = drive(plan, "bgtask", move |i| {
        let (client, payloads, task) = (c.clone(), payloads.clone(), task.clone());
        async move {
            let payload = &payloads[(i % payloads.len() as u64) as usize];
            let handle = client
                .submit_with(&task, payload, SubmitOptions::new().timeout(timeout))
                .await
                .map_err(|e| e.kind().to_string())?;
            handle.reply().await.map_err(|e| e.kind().to_string())?;
            Ok(())
        }
    })
    .await;
    client.shutdown().await;
    for shutdown in shutdowns {
        shutdown.shutdown();
    }
    Ok(measured)
}

/// Reply to every task with its payload, at most `concurrency` at a time (offers past that are
/// declined and wait at the creator).
async fn echo_worker(worker: Worker, concurrency: usize) {
    let echo = |task: TaskContext| async move { (Status::Success, task.raw().to_owned()) };
    if let Err(error) = worker.serve(concurrency, echo).await {
        tracing::debug!(%error, "echo worker stopped");
    }
}

/// The bare request-reply loop: request `<reply channel>\n<id>\n<payload>` on one of the
/// workers' channels, reply `<id>\n<payload>` on the client's channel.
async fn run_baseline(broker: &DynBroker, plan: &Plan) -> CliResult<Measured> {
    let tag = &bgtask::names::random_id()[..8];
    let prefix = format!("{}:bench-baseline:{tag}", plan.namespace);
    let requests: Arc<Vec<String>> = Arc::new(
        (0..plan.workers)
            .map(|i| format!("{prefix}:req:{i}"))
            .collect(),
    );
    let reply_channel = format!("{prefix}:reply");
    let mut echoes = Vec::new();
    for channel in requests.iter() {
        let mut subscription = broker.subscribe(channel).await?;
        let broker = broker.clone();
        echoes.push(tokio::spawn(async move {
            while let Some(item) = subscription.next().await {
                let Incoming::Message(bytes) = item else {
                    continue;
                };
                let Some(split) = bytes.iter().position(|b| *b == b'\n') else {
                    continue;
                };
                let Ok(channel) = std::str::from_utf8(&bytes[..split]).map(str::to_owned) else {
                    continue;
                };
                let reply = bytes.slice(split + 1..);
                let broker = broker.clone();
                tokio::spawn(async move {
                    if let Err(error) = broker.publish(&channel, reply).await {
                        tracing::debug!(%error, "baseline echo failed");
                    }
                });
            }
        }));
    }
    type Waiting = Mutex<HashMap<u64, oneshot::Sender<()>>>;
    let waiting: Arc<Waiting> = Arc::new(Mutex::new(HashMap::new()));
    let mut replies = broker.subscribe(&reply_channel).await?;
    let dispatcher = {
        let waiting = waiting.clone();
        tokio::spawn(async move {
            while let Some(item) = replies.next().await {
                let Incoming::Message(bytes) = item else {
                    continue;
                };
                let id = bytes
                    .iter()
                    .position(|b| *b == b'\n')
                    .and_then(|n| std::str::from_utf8(&bytes[..n]).ok()?.parse::<u64>().ok());
                if let Some(id) = id {
                    let sender = waiting
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&id);
                    if let Some(sender) = sender {
                        let _ = sender.send(());
                    }
                }
            }
        })
    };
    let payloads: Arc<Vec<String>> = Arc::new(
        (0..plan.key_values.min(plan.tasks))
            .map(|i| plan.payload(i))
            .collect(),
    );
    let (b, timeout, reply_channel) = (broker.clone(), plan.timeout, Arc::new(reply_channel));
    let measured = drive(plan, "baseline", move |i| {
        let (broker, requests, payloads, waiting, reply_channel) = (
            b.clone(),
            requests.clone(),
            payloads.clone(),
            waiting.clone(),
            reply_channel.clone(),
        );
        async move {
            let payload = &payloads[(i % payloads.len() as u64) as usize];
            let request = Bytes::from(format!("{reply_channel}\n{i}\n{payload}"));
            let (tx, rx) = oneshot::channel();
            waiting
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(i, tx);
            let channel = &requests[(i % requests.len() as u64) as usize];
            let published = broker.publish(channel, request).await;
            let result = match published {
                Ok(Published::Receivers(0)) => Err("no worker".to_owned()),
                Ok(_) => match tokio::time::timeout(timeout, rx).await {
                    Ok(Ok(())) => return Ok(()),
                    _ => Err("timed out".to_owned()),
                },
                Err(e) => Err(e.kind().to_string()),
            };
            waiting.lock().unwrap_or_else(|e| e.into_inner()).remove(&i);
            result
        }
    })
    .await;
    dispatcher.abort();
    for echo in echoes {
        echo.abort();
    }
    Ok(measured)
}
