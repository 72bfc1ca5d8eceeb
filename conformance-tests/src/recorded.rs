//! bgtask's metrics read back in tests: a Prometheus recorder installed for the test process
//! (nextest runs each test in a process of its own), read through its text rendering.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// The process's metrics recorder.
pub struct Recorded(PrometheusHandle);

impl Recorded {
    /// Install the recorder (the first call; later calls share it). Panics if another recorder
    /// was installed first.
    pub fn install() -> &'static Recorded {
        static RECORDED: OnceLock<Recorded> = OnceLock::new();
        RECORDED.get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).expect("no other metrics recorder");
            Recorded(handle)
        })
    }

    /// The value of metric `name` with exactly `labels`, as rendered; 0 when absent (a counter
    /// never incremented).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut want: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        want.sort();
        self.0
            .render()
            .lines()
            .filter(|line| !line.starts_with('#'))
            .find_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                let (series_name, rest) = series.split_once('{').unwrap_or((series, "}"));
                let mut have: Vec<String> = rest
                    .trim_end_matches('}')
                    .split(',')
                    .filter(|l| !l.is_empty())
                    .map(str::to_owned)
                    .collect();
                have.sort();
                (series_name == name && have == want).then(|| value.parse().ok())?
            })
            .unwrap_or(0.0)
    }
}
