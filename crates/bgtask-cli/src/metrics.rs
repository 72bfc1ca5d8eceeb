//! `--metrics-addr`: the process's metrics (bgtask-core's, through the `metrics` facade) served
//! at `/metrics` in the Prometheus text format.

use std::net::SocketAddr;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

use crate::exit::{CliError, CliResult};

/// Histogram buckets of every `_seconds` metric: 1 ms to 5 min.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// The flag shared by `bgtask worker` and `bgtask bench`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct MetricsArgs {
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464). Default: none,
    /// or $BGTASK_METRICS_ADDR.
    #[arg(long, value_name = "ADDR", env = "BGTASK_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
}

impl MetricsArgs {
    /// Install the exporter and start its listener on the current runtime, if asked for. Fails
    /// (a usage error) when the address cannot be bound.
    pub(crate) fn serve(&self) -> CliResult<()> {
        let Some(addr) = self.metrics_addr else {
            return Ok(());
        };
        let fail = |e: &dyn std::fmt::Display| {
            CliError::new(
                crate::exit::USAGE,
                format!("cannot serve metrics on {addr}: {e}"),
            )
        };
        PrometheusBuilder::new()
            .with_http_listener(addr)
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
            .map_err(|e| fail(&e))?
            .install()
            .map_err(|e| fail(&e))?;
        bgtask::metrics::describe();
        tracing::info!(%addr, "serving metrics at /metrics");
        Ok(())
    }
}
