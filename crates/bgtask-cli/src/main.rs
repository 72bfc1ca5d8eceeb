//! `bgtask`: the command line of the bgtask task framework. See docs/cli.md.

/// `println!` that ends the process quietly when stdout is closed (`bgtask demo | head`).
macro_rules! out {
    () => {
        $crate::write_out(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::write_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

mod bench;
mod dashboard;
mod demo;
mod exit;
mod inspect;
mod metrics;
mod settings;
mod submit;
mod supervisor;
mod worker;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use crate::exit::{CliError, CliResult};
use crate::settings::{parse_duration, Settings};

/// mimalloc instead of the system allocator: a task allocates a few dozen small buffers across
/// the runtime's threads, and glibc's malloc spent a quarter of `bgtask bench`'s CPU on them
/// (docs/performance.md, "Allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ABOUT: &str = "Distributed task execution over Redis, NATS, PostgreSQL or an embedded broker";

const LONG_ABOUT: &str = "\
Distributed task execution over Redis, NATS, PostgreSQL or an embedded broker.

Creators submit a JSON task under a task name and await its reply, with progress on the way;
each task is offered to one worker chosen by free capacity, which accepts or declines it,
reports progress, and completes it with Success,
Error or Failed. Per-key admission control limits the tasks in flight per value of a task key,
and blacklists values that workers keep reporting as bad.

Configuration, lowest precedence first: the file bgtask.toml in the working directory (or
--config FILE, or $BGTASK_CONFIG), the environment (BGTASK_BROKER_URL, BGTASK_NAMESPACE, ...),
then the flags. Logs go to stderr; set RUST_LOG (default: warn) for more, e.g. RUST_LOG=debug.";

const EXAMPLES: &str = "\
Examples:
  bgtask demo                                   # the whole protocol in one process, no server
  bgtask worker --task resize -- ./resize.sh    # serve tasks by running a program per task
  bgtask submit --task resize '{\"w\": 640}'      # submit one and print its reply
  bgtask bench --tasks 50000 --concurrency 256  # throughput and latency
  bgtask inspect --task resize --key ana        # blacklisted values and tasks in flight

Full guide: docs/cli.md";

/// The bgtask command line.
#[derive(Parser, Debug)]
#[command(
    name = "bgtask",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_help = EXAMPLES,
    after_long_help = format!("{EXAMPLES}\n\n{}", exit::TABLE),
    propagate_version = true
)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

/// Flags every subcommand takes.
#[derive(Args, Debug, Clone)]
pub(crate) struct GlobalArgs {
    /// Broker URL: redis://[user:password@]host[:port][/db], rediss://..., nats://...,
    /// postgres://..., memory://. Default: broker_url from the configuration or
    /// $BGTASK_BROKER_URL, else redis://127.0.0.1:6379 (the demo: the embedded memory://).
    #[arg(long, global = true, value_name = "URL")]
    broker: Option<String>,

    /// Namespace shared by creators and workers (1-64 of A-Z a-z 0-9 _ -). Default: namespace
    /// from the configuration or $BGTASK_NAMESPACE, else "bgtask" (the demo: a fresh one).
    #[arg(long, global = true, value_name = "NAME")]
    namespace: Option<String>,

    /// Configuration file. Default: $BGTASK_CONFIG, else ./bgtask.toml when it exists.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the whole protocol in one process: a few workers and a creator, with progress, a
    /// per-key limit hit, a timeout, a failure and a blacklisting.
    #[command(
        long_about = "Run the whole protocol in one process: three workers and a creator on the \
embedded memory broker (no server needed), with a realistic mix of tasks: progress, a per-key \
limit hit, a timeout, a failure and a blacklisting. Draws progress bars when stdout is a \
terminal and plain lines otherwise, and ends with a summary table. Exits 0 when every step went \
as expected.\n\nWith --broker URL the same demo runs against a real broker, in a fresh namespace \
unless --namespace is given.",
        after_help = "Examples:\n  bgtask demo\n  bgtask demo --broker redis://127.0.0.1:6379\n  bgtask demo --plain > demo.txt"
    )]
    Demo(demo::DemoArgs),

    /// Serve tasks by running PROGRAM once per task: task JSON on its stdin, reply JSON on its
    /// stdout, progress on stderr.
    #[command(
        long_about = worker::LONG_ABOUT,
        after_help = worker::EXAMPLES,
    )]
    Worker(worker::WorkerArgs),

    /// Submit one task, show its progress on stderr and print its reply on stdout.
    #[command(
        long_about = submit::LONG_ABOUT,
        after_help = submit::EXAMPLES,
        after_long_help = format!("{}\n\n{}", submit::EXAMPLES, exit::TABLE),
    )]
    Submit(submit::SubmitArgs),

    /// Measure throughput and latency: submit many tasks to echo workers (in-process or
    /// external), optionally compared with a bare request-reply loop on the same broker.
    #[command(long_about = bench::LONG_ABOUT, after_help = bench::EXAMPLES)]
    Bench(bench::BenchArgs),

    /// Show blacklisted key values (with reason and time left) and the tasks in flight of
    /// given key values.
    #[command(long_about = inspect::LONG_ABOUT, after_help = inspect::EXAMPLES)]
    Inspect(inspect::InspectArgs),

    /// Serve a live web page of the namespace: workers, tasks per name, key values in
    /// flight, the blacklist.
    #[command(long_about = dashboard::LONG_ABOUT, after_help = dashboard::EXAMPLES)]
    Dashboard(dashboard::DashboardArgs),

    /// List blacklisted key values, or lift a blacklisting early.
    #[command(subcommand, after_help = inspect::BLACKLIST_EXAMPLES)]
    Blacklist(inspect::BlacklistCommand),
}

fn main() -> ExitCode {
    // The helper a worker starts so that its programs die with it (not a user command).
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == supervisor::SUBCOMMAND)
    {
        return supervisor::run();
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { exit::USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    init_logging(matches!(cli.command, Command::Demo(_)));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("bgtask: cannot start the async runtime: {e}");
            return ExitCode::from(exit::INTERNAL);
        }
    };
    let result = runtime.block_on(run(cli));
    // Do not wait for background tasks (a worker's subscriptions, a demo task still sleeping).
    runtime.shutdown_timeout(Duration::from_millis(100));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bgtask: {e}");
            e.exit_code()
        }
    }
}

async fn run(cli: Cli) -> CliResult {
    let settings = Settings::load(&cli.global)?;
    match cli.command {
        Command::Demo(args) => demo::run(settings, args).await,
        Command::Worker(args) => worker::run(settings, args).await,
        Command::Submit(args) => submit::run(settings, args).await,
        Command::Bench(args) => bench::run(settings, args).await,
        Command::Inspect(args) => inspect::run(settings, args).await,
        Command::Blacklist(command) => inspect::blacklist(settings, command).await,
        Command::Dashboard(args) => dashboard::run(settings, args).await,
    }
}

/// Logs to stderr, filtered by RUST_LOG; default `warn` (the demo: `error`, since it provokes
/// warnings on purpose).
fn init_logging(demo: bool) {
    let default = if demo { "error" } else { "warn" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(settings::stderr_is_tty())
        .init();
}

/// Write to stdout; exit as a closed pipe would (141) when nobody reads it any more.
pub(crate) fn write_out(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(args).and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(141);
        }
    }
}

/// A clap value parser for durations.
pub(crate) fn duration_arg(text: &str) -> Result<Duration, String> {
    parse_duration(text)
}

/// Read a JSON value from an argument: inline JSON, `@file`, or `-` for stdin.
pub(crate) fn read_json(arg: Option<&str>, what: &str) -> CliResult<serde_json::Value> {
    let text = match arg {
        None => return Ok(serde_json::json!({})),
        Some("-") => {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                .map_err(|e| CliError::usage(format!("cannot read the {what} from stdin: {e}")))?;
            text
        }
        Some(arg) => match arg.strip_prefix('@') {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|e| CliError::usage(format!("cannot read the {what} from {path}: {e}")))?,
            None => arg.to_owned(),
        },
    };
    serde_json::from_str(&text)
        .map_err(|e| CliError::usage(format!("the {what} is not valid JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}
