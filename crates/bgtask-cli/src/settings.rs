//! The configuration of one run: `bgtask.toml`, then the environment, then the global flags.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use bgtask::Config;

use crate::exit::{CliError, CliResult};
use crate::GlobalArgs;

/// The resolved configuration.
pub(crate) struct Settings {
    pub(crate) config: Config,
    /// Whether the namespace was chosen by the user (file, environment or flag).
    pub(crate) namespace_given: bool,
}

impl Settings {
    pub(crate) fn load(global: &GlobalArgs) -> CliResult<Settings> {
        let path: Option<PathBuf> = global
            .config
            .clone()
            .or_else(|| std::env::var_os("BGTASK_CONFIG").map(PathBuf::from));
        let (mut config, file) = Config::load(path.as_deref())?;
        if let Some(file) = &file {
            tracing::debug!(file = %file.display(), "read the configuration");
        }
        if let Some(url) = &global.broker {
            config.broker_url = Some(url.clone());
        }
        if let Some(namespace) = &global.namespace {
            config.namespace = namespace.clone();
        }
        config.validate()?;
        let namespace_given = config.namespace != bgtask::names::DEFAULT_NAMESPACE;
        tracing::debug!(?config, "configuration");
        Ok(Settings {
            config,
            namespace_given,
        })
    }

    /// The broker URL for every command but the demo: the configured one, else local Redis.
    pub(crate) fn broker_url(&self) -> &str {
        self.config.broker_url()
    }

    /// Connect to `url`, saying which broker could not be reached.
    pub(crate) async fn connect(url: &str) -> CliResult<bgtask::DynBroker> {
        bgtask::connect(url).await.map_err(|e| {
            let mut err = CliError::from(e);
            if !err.message.contains(&bgtask::redact(url)) {
                err.message = format!("{}: {}", bgtask::redact(url), err.message);
            }
            err
        })
    }
}

/// Parse a duration: `500ms`, `5s`, `1.5s`, `2m`, `1h`; a bare number is seconds.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 500ms, 5s, 2m or 1h"))?;
    let seconds = match unit.trim() {
        "ms" => number / 1000.0,
        "" | "s" => number,
        "m" | "min" => number * 60.0,
        "h" => number * 3600.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?} (use ms, s, m or h)"
            ))
        }
    };
    if !seconds.is_finite() || !(0.0..=1e9).contains(&seconds) {
        return Err(format!("{text:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// `d` in whole milliseconds for JSON output, saturating (never truncated modulo 2^64).
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `d` for people: `850 ms`, `1.2 s`, `3 min 5 s`, `1 h 0 min`.
pub(crate) fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms < 10_000 {
        format!("{:.1} s", d.as_secs_f64())
    } else if ms < 60_000 {
        format!("{} s", d.as_secs())
    } else if ms < 3_600_000 {
        format!("{} min {} s", d.as_secs() / 60, d.as_secs() % 60)
    } else {
        format!("{} h {} min", d.as_secs() / 3600, (d.as_secs() % 3600) / 60)
    }
}

pub(crate) fn stdout_is_tty() -> bool {
    std::io::stdout().is_terminal()
}

pub(crate) fn stderr_is_tty() -> bool {
    std::io::stderr().is_terminal()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("5").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("-1s").is_err());
        assert_eq!(human(Duration::from_millis(1500)), "1.5 s");
        assert_eq!(human(Duration::from_secs(3600)), "1 h 0 min");
    }
}
