//! `bgtask inspect` and `bgtask blacklist`.

use std::process::ExitCode;

use bgtask::{Blacklist, BlacklistConfig, BlacklistEntry, Namespace};
use clap::{Args, Subcommand};
use serde_json::json;

use crate::exit::{CliError, CliResult};
use crate::settings::{human, millis, Settings};

pub(crate) const LONG_ABOUT: &str = "\
Show the state of a namespace: every blacklisted key value, with the reason the reporting worker
gave and the time until the blacklisting ends on its own; and, for the key values given with
--task NAME --key VALUE, the tasks in flight (live leases of the per-key limit), each with its
task id and the time until its lease expires.

`bgtask inspect keys` lists the key values with tasks in flight without naming them (on every
bundled backend), a page at a time; `bgtask inspect workers` lists the live workers.";

pub(crate) const EXAMPLES: &str = "\
Examples:
  bgtask inspect workers
  bgtask inspect workers --json | jq '.[].in_flight'
  bgtask inspect keys --task resize --limit 20
  bgtask inspect
  bgtask inspect --task resize --key ana --key bo
  bgtask inspect --json | jq '.blacklisted[].value'";

pub(crate) const BLACKLIST_EXAMPLES: &str = "\
Examples:
  bgtask blacklist list
  bgtask blacklist lift --task resize mallory";

/// `bgtask inspect` flags.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct InspectArgs {
    /// What to show instead of the blacklist and key values.
    #[command(subcommand)]
    what: Option<InspectWhat>,

    /// The task name whose key values to show (with --key).
    #[arg(long, value_name = "NAME", requires = "keys")]
    task: Option<String>,

    /// A key value to show the tasks in flight of (repeat for several; needs --task).
    #[arg(long = "key", value_name = "VALUE", requires = "task")]
    keys: Vec<String>,

    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
}

/// `bgtask inspect` subcommands.
#[derive(Subcommand, Debug)]
pub(crate) enum InspectWhat {
    /// The live workers, from their presence: id, host, pid, task names, targets, concurrency,
    /// tasks in flight and when each was last heard from.
    Workers {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The key values with tasks in flight (live leases of the per-key limit), found without
    /// naming them: a page of key values in key order, with the cursor of the next page.
    Keys {
        /// Only the key values of this task name.
        #[arg(long, value_name = "NAME")]
        task: Option<String>,
        /// Start after this cursor (the `next` of the previous page).
        #[arg(long, value_name = "CURSOR")]
        after: Option<String>,
        /// At most this many key values (1 to 1000).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=1000))]
        limit: u64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// `bgtask blacklist` subcommands.
#[derive(Subcommand, Debug)]
pub(crate) enum BlacklistCommand {
    /// List blacklisted key values with reason and time left.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Lift the blacklisting of a key value now (and forget its recent bad-key reports).
    Lift {
        /// The task name the value was blacklisted for.
        #[arg(long, value_name = "NAME")]
        task: String,
        /// The key value.
        #[arg(value_name = "VALUE")]
        value: String,
    },
}

async fn blacklist_of(settings: &Settings) -> CliResult<(bgtask::DynBroker, Namespace, Blacklist)> {
    let broker = Settings::connect(settings.broker_url()).await?;
    let namespace = Namespace::new(settings.config.namespace.clone())?;
    let blacklist = Blacklist::new(
        broker.clone(),
        namespace.clone(),
        BlacklistConfig::default(),
    );
    Ok((broker, namespace, blacklist))
}

/// The width of a table column: its widest cell, at least `header` (the header's width).
fn column_width<T>(rows: &[T], cell: impl Fn(&T) -> usize, header: usize) -> usize {
    rows.iter().map(cell).max().unwrap_or(0).max(header)
}

fn entry_json(e: &BlacklistEntry) -> serde_json::Value {
    json!({
        "task": e.task,
        "value": e.value,
        "reason": e.reason,
        "remaining_ms": millis(e.remaining),
    })
}

fn print_blacklist(namespace: &Namespace, entries: &[BlacklistEntry]) {
    out!(
        "blacklisted key values in namespace {namespace}: {}",
        entries.len()
    );
    if entries.is_empty() {
        return;
    }
    let task_w = column_width(entries, |e| e.task.len(), 4);
    let value_w = column_width(entries, |e| e.value.len(), 5);
    out!(
        "  {:<task_w$}  {:<value_w$}  {:>12}  REASON",
        "TASK",
        "VALUE",
        "TIME LEFT"
    );
    for e in entries {
        out!(
            "  {:<task_w$}  {:<value_w$}  {:>12}  {}",
            e.task,
            e.value,
            human(e.remaining),
            e.reason
        );
    }
}

/// `bgtask inspect workers`.
async fn workers(settings: &Settings, as_json: bool) -> CliResult {
    let broker = Settings::connect(settings.broker_url()).await?;
    let namespace = Namespace::new(settings.config.namespace.clone())?;
    let workers = bgtask::list_workers(&broker, &namespace).await?;
    if as_json {
        let out: Vec<_> = workers
            .iter()
            .map(|w| {
                let r = &w.record;
                json!({
                    "id": r.id, "host": r.host, "pid": r.pid, "tasks": r.tasks,
                    "targets": r.targets, "concurrency": r.concurrency,
                    "in_flight": r.in_flight, "running": r.running, "level": r.level,
                    "last_seen_ms": millis(w.last_seen),
                })
            })
            .collect();
        out!("{:#}", serde_json::Value::Array(out));
        return Ok(ExitCode::SUCCESS);
    }
    out!("live workers in namespace {namespace}: {}", workers.len());
    if workers.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    let names = |w: &bgtask::ListedWorker| {
        let mut names = w.record.tasks.join(",");
        for target in &w.record.targets {
            names.push_str(&format!(" @{target}"));
        }
        names
    };
    let host_w = column_width(&workers, |w| w.record.host.len(), 4);
    let names_w = column_width(&workers, |w| names(w).len(), 5);
    out!(
        "  {:<8}  {:<host_w$}  {:>7}  {:<names_w$}  {:>11}  {:>9}  LAST SEEN",
        "ID",
        "HOST",
        "PID",
        "TASKS",
        "CONCURRENCY",
        "IN FLIGHT"
    );
    for w in &workers {
        let r = &w.record;
        let concurrency = r.concurrency.map_or("-".to_owned(), |c| c.to_string());
        out!(
            "  {:<8}  {:<host_w$}  {:>7}  {:<names_w$}  {:>11}  {:>9}  {} ago",
            &r.id[..r.id.len().min(8)],
            r.host,
            r.pid,
            names(w),
            concurrency,
            r.in_flight,
            human(w.last_seen)
        );
    }
    // Tasks in flight per task name, summed over the workers' last heartbeats.
    let mut by_task = std::collections::BTreeMap::<&str, u64>::new();
    for (task, n) in workers.iter().flat_map(|w| &w.record.running) {
        *by_task.entry(task.as_str()).or_insert(0) += n;
    }
    let by_task: Vec<String> = by_task.iter().map(|(t, n)| format!("{t} {n}")).collect();
    out!(
        "tasks in flight by task name: {}",
        if by_task.is_empty() {
            "none".to_owned()
        } else {
            by_task.join(", ")
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// `bgtask inspect keys`.
async fn keys(
    settings: &Settings,
    task: Option<&str>,
    after: Option<&str>,
    limit: u64,
    as_json: bool,
) -> CliResult {
    let broker = Settings::connect(settings.broker_url()).await?;
    let namespace = Namespace::new(settings.config.namespace.clone())?;
    let limit = usize::try_from(limit).unwrap_or(bgtask::MAX_KEY_PAGE);
    let page = bgtask::keys_in_flight(&broker, &namespace, task, after, limit).await?;
    if as_json {
        let out = json!({
            "namespace": namespace.as_str(),
            "keys": page.keys.iter().map(|k| json!({
                "task": k.task, "value": k.value, "in_flight": k.in_flight,
            })).collect::<Vec<_>>(),
            "next": page.next,
        });
        out!("{out:#}");
        return Ok(ExitCode::SUCCESS);
    }
    out!(
        "key values with tasks in flight in namespace {namespace}: {}{}",
        page.keys.len(),
        if page.next.is_some() {
            " (more follow)"
        } else {
            ""
        }
    );
    if !page.keys.is_empty() {
        let task_w = column_width(&page.keys, |k| k.task.len(), 4);
        let value_w = column_width(&page.keys, |k| k.value.len(), 5);
        out!("  {:<task_w$}  {:<value_w$}  IN FLIGHT", "TASK", "VALUE");
        for k in &page.keys {
            out!(
                "  {:<task_w$}  {:<value_w$}  {}",
                k.task,
                k.value,
                k.in_flight
            );
        }
    }
    if let Some(next) = &page.next {
        out!(
            "next page: bgtask inspect keys --after {}",
            shell_word(next)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `text` as one shell word, in single quotes when it needs them.
fn shell_word(text: &str) -> String {
    if !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:/".contains(&b))
    {
        return text.to_owned();
    }
    format!("'{}'", text.replace('\'', "'\\''"))
}

pub(crate) async fn run(settings: Settings, args: InspectArgs) -> CliResult {
    match &args.what {
        Some(InspectWhat::Workers { json }) => return workers(&settings, *json).await,
        Some(InspectWhat::Keys {
            task,
            after,
            limit,
            json,
        }) => return keys(&settings, task.as_deref(), after.as_deref(), *limit, *json).await,
        None => {}
    }
    let (broker, namespace, blacklist) = blacklist_of(&settings).await?;
    let entries = blacklist.list().await?;
    let mut in_flight = Vec::new();
    if let Some(task) = &args.task {
        for value in &args.keys {
            bgtask::names::validate_name("key value", value)?;
            let leases = broker.leases(&namespace.limit_key(task, value)).await?;
            in_flight.push((value.clone(), leases));
        }
    }
    if args.json {
        let out = json!({
            "namespace": namespace.as_str(),
            "blacklisted": entries.iter().map(entry_json).collect::<Vec<_>>(),
            "in_flight": in_flight.iter().map(|(value, leases)| json!({
                "task": args.task,
                "value": value,
                "count": leases.len(),
                "tasks": leases.iter().map(|l| json!({
                    "id": l.note,
                    "lease_remaining_ms": millis(l.remaining),
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        });
        out!("{out:#}");
        return Ok(ExitCode::SUCCESS);
    }
    print_blacklist(&namespace, &entries);
    if let Some(task) = &args.task {
        out!("\ntasks in flight of {task:?} (live leases of the per-key limit):");
        let value_w = column_width(&args.keys, |v| v.len(), 5);
        out!(
            "  {:<value_w$}  {:>9}  TASKS (id, lease time left)",
            "VALUE",
            "IN FLIGHT"
        );
        for (value, leases) in &in_flight {
            let tasks: Vec<String> = leases
                .iter()
                .map(|l| {
                    format!(
                        "{} ({})",
                        &l.note[..l.note.len().min(8)],
                        human(l.remaining)
                    )
                })
                .collect();
            let line = format!(
                "  {:<value_w$}  {:>9}  {}",
                value,
                leases.len(),
                tasks.join(", ")
            );
            out!("{}", line.trim_end());
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn blacklist(settings: Settings, command: BlacklistCommand) -> CliResult {
    let (_broker, namespace, blacklist) = blacklist_of(&settings).await?;
    match command {
        BlacklistCommand::List { json } => {
            let entries = blacklist.list().await?;
            if json {
                let out: Vec<_> = entries.iter().map(entry_json).collect();
                out!("{:#}", serde_json::Value::Array(out));
            } else {
                print_blacklist(&namespace, &entries);
            }
        }
        BlacklistCommand::Lift { task, value } => {
            bgtask::names::validate_name("task name", &task)?;
            bgtask::names::validate_name("key value", &value)
                .map_err(|e| CliError::usage(e.to_string()))?;
            if blacklist.lift(&task, &value).await? {
                out!("lifted: key value {value:?} of task {task:?} is no longer blacklisted");
            } else {
                out!("key value {value:?} of task {task:?} was not blacklisted");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
