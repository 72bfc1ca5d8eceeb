//! `bgtask submit`: submit one task and print its reply.

use std::process::ExitCode;
use std::time::Duration;

use bgtask::{Client, KeyLimit, SubmitOptions};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::exit::{self, CliError, CliResult};
use crate::settings::{stderr_is_tty, Settings};

pub(crate) const LONG_ABOUT: &str = "\
Submit one task: the payload is a JSON object given inline, read from a file (@FILE) or from
stdin (-); without one the payload is {}. Progress is shown on stderr (one `progress: <json>`
line per value), the reply is printed on stdout as JSON, and the exit code says how it ended.
When the worker completes the task with Error or Failed, its reply is printed on stdout too.

--key names the task key: the top-level property whose value is limited (--limit, default 5
in flight per value) and may be blacklisted. Ctrl-C cancels the task and exits with 130.";

pub(crate) const EXAMPLES: &str = "\
Examples:
  bgtask submit --task resize '{\"image\": \"a.png\", \"w\": 640}'
  bgtask submit --task resize --key user --timeout 30s @task.json
  echo '{\"n\": 1}' | bgtask submit --task count - | jq .total
  bgtask submit --task report --target eu-west --metadata '{\"priority\": 1}' '{}'";

/// `bgtask submit` flags.
#[derive(Args, Debug)]
pub(crate) struct SubmitArgs {
    /// The task name.
    #[arg(long, value_name = "NAME")]
    task: String,

    /// The task key: a top-level property of the payload whose value is limited and may be
    /// blacklisted. Default: client.task_key from the configuration (none).
    #[arg(long, value_name = "PROPERTY")]
    key: Option<String>,

    /// Tasks in flight per key value: a number or "unlimited". Default: client.per_key_limit
    /// from the configuration (5).
    #[arg(long, value_name = "N", value_parser = parse_limit)]
    limit: Option<KeyLimit>,

    /// How long to wait for the reply: 500ms, 5s, 2m. Default: client.default_timeout_ms from
    /// the configuration (5 s); 0 means that default.
    #[arg(long, value_name = "DURATION", value_parser = crate::duration_arg)]
    timeout: Option<Duration>,

    /// Send to this targeted channel instead of the task name's: only workers listening to it
    /// (`bgtask worker --target T`) see the task.
    #[arg(long, value_name = "T")]
    target: Option<String>,

    /// Metadata (JSON) that workers see before they accept the task.
    #[arg(long, value_name = "JSON")]
    metadata: Option<String>,

    /// Show no progress.
    #[arg(long, short = 'q')]
    quiet: bool,

    /// The payload: inline JSON, @FILE, or - for stdin. Default {}.
    #[arg(value_name = "JSON | @FILE | -")]
    payload: Option<String>,
}

fn parse_limit(text: &str) -> Result<KeyLimit, String> {
    match text.trim() {
        "unlimited" => Ok(KeyLimit::Unlimited),
        n => match n.parse::<u64>() {
            Ok(0) | Err(_) => Err(format!(
                "{text:?} is not a limit: use a number from 1, or \"unlimited\""
            )),
            Ok(n) => Ok(KeyLimit::Max(n)),
        },
    }
}

pub(crate) async fn run(settings: Settings, args: SubmitArgs) -> CliResult {
    let payload = crate::read_json(args.payload.as_deref(), "payload")?;
    let metadata = args
        .metadata
        .as_deref()
        .map(|m| crate::read_json(Some(m), "metadata"))
        .transpose()?;
    let mut options = SubmitOptions::new();
    if let Some(timeout) = args.timeout {
        options = options.timeout(timeout);
    }
    if let Some(key) = &args.key {
        options = options.task_key(key.clone());
    }
    if let Some(limit) = args.limit {
        options = options.limit(limit);
    }
    if let Some(target) = &args.target {
        options = options.target(target.clone());
    }
    if let Some(metadata) = metadata {
        options = options.metadata(metadata);
    }
    let url = settings.broker_url().to_owned();
    let broker = Settings::connect(&url).await?;
    let client = Client::new(broker, settings.config.client_config()).await?;
    let mut handle = client.submit_with(&args.task, &payload, options).await?;
    tracing::debug!(id = handle.id(), "submitted");

    let spinner = (!args.quiet && stderr_is_tty()).then(|| {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{spinner} {prefix} {elapsed} {wide_msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.set_prefix(format!("{} {}", args.task, &handle.id()[..8]));
        bar.enable_steady_tick(Duration::from_millis(100));
        bar
    });
    let interrupted = loop {
        tokio::select! {
            progress = handle.progress() => match progress {
                Some(value) => {
                    if args.quiet {
                        continue;
                    }
                    let line = format!("progress: {value}");
                    match &spinner {
                        Some(bar) => {
                            bar.set_message(value.to_string());
                            bar.println(line);
                        }
                        None => eprintln!("{line}"),
                    }
                }
                None => break false,
            },
            _ = tokio::signal::ctrl_c() => break true,
        }
    };
    if let Some(bar) = &spinner {
        bar.finish_and_clear();
    }
    if interrupted {
        handle.cancel().await;
        client.shutdown().await;
        return Err(CliError::new(
            exit::INTERRUPTED,
            "interrupted: the task was cancelled",
        ));
    }
    let outcome = handle.reply().await;
    client.shutdown().await;
    match outcome {
        Ok(reply) => {
            out!("{}", reply.raw().get());
            Ok(ExitCode::SUCCESS)
        }
        Err(error) => {
            if let Some(reply) = error.reply() {
                out!("{}", reply.get());
            }
            Err(error.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits() {
        assert_eq!(parse_limit("3").unwrap(), KeyLimit::Max(3));
        assert_eq!(parse_limit("unlimited").unwrap(), KeyLimit::Unlimited);
        assert!(parse_limit("0").is_err());
        assert!(parse_limit("x").is_err());
    }
}
