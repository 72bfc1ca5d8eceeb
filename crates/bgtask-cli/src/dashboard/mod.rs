//! `bgtask dashboard`: a web page of the live workers, the tasks per name, the key values in
//! flight and the blacklist, updated every second over Server-Sent Events, with the JSON
//! endpoints behind it. The page and its assets are compiled into the binary.
//!
//! A sampler reads the broker once per `--interval` (the workers' presence, one page of key
//! values, the blacklist): its cost does not grow with the task rate. Tasks per second come from
//! the totals the workers put in their presence records.

mod http;
mod snapshot;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bgtask::Namespace;
use clap::Args;
use tokio::sync::watch;

use std::process::ExitCode;

use crate::exit::{CliError, CliResult};
use crate::settings::Settings;

pub(crate) const LONG_ABOUT: &str = "\
Serve a web page of the namespace: the live workers (tasks, capacity, in flight), per task name \
tasks/s over the last minutes with outcome counts and run times, the key values with tasks in \
flight, and the blacklisted values with reason and time left. The page updates itself every \
second (Server-Sent Events); the JSON behind it is at /api/workers, /api/tasks, /api/keys, \
/api/blacklist and /api/overview.\n\n\
Read-only unless --allow-writes: then each blacklisted value has a lift button (a POST with a \
CSRF token). Listening on an address other than loopback requires --auth-token (HTTP Basic \
with the token as password, or Authorization: Bearer); without it the command refuses to start.";

pub(crate) const EXAMPLES: &str = "\
Examples:
  bgtask dashboard                                   # http://127.0.0.1:8080/
  bgtask dashboard --listen 127.0.0.1:9000 --allow-writes
  BGTASK_DASHBOARD_TOKEN=s3cret bgtask dashboard --listen 0.0.0.0:8080
  curl -s http://127.0.0.1:8080/api/workers | jq '.[].in_flight'";

/// `bgtask dashboard` flags.
#[derive(Args, Debug)]
pub(crate) struct DashboardArgs {
    /// The address to serve the page on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,

    /// Let the page lift blacklisted values (POSTs with a CSRF token).
    #[arg(long)]
    allow_writes: bool,

    /// Require this token: the password of HTTP Basic (any user name) or `Authorization:
    /// Bearer TOKEN`. Required to listen on anything but loopback. Default:
    /// $BGTASK_DASHBOARD_TOKEN.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "BGTASK_DASHBOARD_TOKEN",
        hide_env_values = true
    )]
    auth_token: Option<String>,

    /// How often to read the broker.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = crate::duration_arg)]
    interval: Duration,
}

pub(crate) async fn run(settings: Settings, args: DashboardArgs) -> CliResult {
    let token = match args.auth_token.as_deref() {
        Some("") => return Err(CliError::usage("--auth-token must not be empty")),
        token => token.map(str::to_owned),
    };
    if !args.listen.ip().is_loopback() && token.is_none() {
        return Err(CliError::usage(format!(
            "refusing to serve the dashboard on {}, which is not a loopback address, without \
             --auth-token (or $BGTASK_DASHBOARD_TOKEN): anyone who can reach it would see the \
             namespace",
            args.listen
        )));
    }
    if args.interval < Duration::from_millis(100) {
        return Err(CliError::usage("--interval must be at least 100ms"));
    }
    let url = settings.broker_url().to_owned();
    let broker = Settings::connect(&url).await?;
    let namespace = Namespace::new(settings.config.namespace.clone())?;
    let overview = snapshot::Overview {
        namespace: namespace.as_str().to_owned(),
        broker: bgtask::redact(&url),
        writes: args.allow_writes,
    };
    let (snapshots, _) = watch::channel(Arc::new(snapshot::Snapshot::empty(&overview)));
    // The namespace's blacklist: listed by the sampler, lifted by the page.
    let blacklist = bgtask::Blacklist::new(broker.clone(), namespace.clone(), Default::default());
    let sampler = snapshot::Sampler::new(broker, namespace.clone(), blacklist.clone(), overview);
    tokio::spawn(sampler.run(args.interval, snapshots.clone()));

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| CliError::usage(format!("cannot listen on {}: {e}", args.listen)))?;
    let state = Arc::new(http::State::new(
        blacklist,
        snapshots,
        token,
        args.allow_writes,
    ));
    eprintln!(
        "bgtask dashboard: http://{}/ (namespace {namespace} on {}, writes {}); ready",
        args.listen,
        bgtask::redact(&url),
        if args.allow_writes { "on" } else { "off" },
    );
    let stop = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    axum::serve(listener, http::router(state))
        .with_graceful_shutdown(stop)
        .await
        .map_err(|e| CliError::new(crate::exit::INTERNAL, format!("dashboard server: {e}")))?;
    Ok(ExitCode::SUCCESS)
}
