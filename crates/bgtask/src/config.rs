//! [`Config`]: the one configuration of a program that uses bgtask, read from `bgtask.toml`, the
//! environment and (in the `bgtask` command line) flags, in that order of precedence.
//!
//! ```toml
//! # bgtask.toml — every field is optional
//! broker_url = "redis://127.0.0.1:6379"   # swap the broker by changing this line: "nats://127.0.0.1:4222"
//! namespace = "myapp"
//!
//! [client]
//! default_timeout_ms = 5000
//! max_payload = 1048576
//! task_key = "user"
//! per_key_limit = 5                       # or "unlimited"
//! lease_margin_ms = 1000
//!
//! [worker]
//! max_payload = 1048576
//! claim_margin_ms = 1000
//! shutdown_grace_ms = 10000
//!
//! [worker.blacklist]
//! threshold = 10
//! interval_ms = 1000
//! duration_ms = 3600000
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{ClientConfig, DynBroker, Error, ErrorKind, KeyLimit, Namespace, Result, WorkerConfig};

/// The broker a program connects to when no URL is configured: Redis on its default port.
pub const DEFAULT_BROKER_URL: &str = "redis://127.0.0.1:6379";

/// The configuration file read from the working directory when it exists.
pub const CONFIG_FILE: &str = "bgtask.toml";

/// The environment variables [`Config::apply_env`] reads, with the field each one sets.
pub const ENV_VARS: &[(&str, &str)] = &[
    ("BGTASK_BROKER_URL", "broker_url"),
    ("BGTASK_NAMESPACE", "namespace"),
    ("BGTASK_DEFAULT_TIMEOUT_MS", "client.default_timeout_ms"),
    ("BGTASK_TASK_KEY", "client.task_key (empty: none)"),
    (
        "BGTASK_PER_KEY_LIMIT",
        "client.per_key_limit (a number or \"unlimited\")",
    ),
    (
        "BGTASK_MAX_PAYLOAD",
        "client.max_payload and worker.max_payload",
    ),
    ("BGTASK_SHUTDOWN_GRACE_MS", "worker.shutdown_grace_ms"),
];

/// Everything a creator or worker process needs to know: which broker, which namespace, and the
/// [`ClientConfig`] and [`WorkerConfig`] to use there.
///
/// Every field has a default, so an empty file is a valid configuration. Unknown fields are an
/// error (a typo never goes unnoticed). The namespace is set once, at the top level; it is copied
/// into the client and worker configurations by [`client_config`](Self::client_config) and
/// [`worker_config`](Self::worker_config).
///
/// Its `Debug` output never shows a password of the broker URL.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The broker's URL (see [`connect`](crate::connect)). Default none, which means
    /// [`DEFAULT_BROKER_URL`] (`redis://127.0.0.1:6379`) for [`connect`](Self::connect); the
    /// `bgtask demo` command uses the embedded `memory://` broker instead.
    pub broker_url: Option<String>,
    /// The namespace of the client and the workers. Default `bgtask`.
    pub namespace: String,
    /// The creator side. Its `namespace` is taken from the top level.
    pub client: ClientConfig,
    /// The worker side. Its `namespace` is taken from the top level; its `tasks` and `targets`
    /// are usually given per worker (the command line's `--task`, `--target`).
    pub worker: WorkerConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            broker_url: None,
            namespace: crate::names::DEFAULT_NAMESPACE.to_owned(),
            client: ClientConfig::default(),
            worker: WorkerConfig::default(),
        }
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("broker_url", &self.broker_url.as_deref().map(crate::redact))
            .field("namespace", &self.namespace)
            .field("client", &self.client)
            .field("worker", &self.worker)
            .finish()
    }
}

impl Config {
    /// Parse a configuration from TOML text and [`validate`](Self::validate) it.
    ///
    /// A syntax error names the line and column, never the text of the line (it may hold a
    /// password).
    pub fn from_toml(text: &str) -> Result<Config> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let place = e
                .span()
                .map(|span| {
                    let before = &text[..span.start.min(text.len())];
                    let line = before.matches('\n').count() + 1;
                    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                    format!(" at line {line}, column {column}")
                })
                .unwrap_or_default();
            Error::new(
                ErrorKind::Config,
                format!("invalid configuration{place}: {}", e.message().trim_end()),
            )
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Read a configuration file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Config> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::new(
                ErrorKind::Config,
                format!("cannot read the configuration file {}: {e}", path.display()),
            )
        })?;
        Config::from_toml(&text)
            .map_err(|e| Error::new(e.kind(), format!("{}: {}", path.display(), e.message())))
    }

    /// The configuration of a process: the file `path` (which must exist) or else
    /// [`CONFIG_FILE`] in the working directory when it exists, then the environment
    /// ([`apply_env`](Self::apply_env)). Returns the file that was read, if any.
    pub fn load(path: Option<&Path>) -> Result<(Config, Option<PathBuf>)> {
        let (mut config, read) = match path {
            Some(path) => (Config::from_file(path)?, Some(path.to_owned())),
            None => {
                let default = Path::new(CONFIG_FILE);
                if default.is_file() {
                    (Config::from_file(default)?, Some(default.to_owned()))
                } else {
                    (Config::default(), None)
                }
            }
        };
        config.apply_env()?;
        Ok((config, read))
    }

    /// Override fields from the process environment (see [`ENV_VARS`]).
    pub fn apply_env(&mut self) -> Result<()> {
        self.apply_vars(std::env::vars())
    }

    /// Override fields from `(name, value)` pairs, as [`apply_env`](Self::apply_env) does with the
    /// environment. Names not in [`ENV_VARS`] are ignored.
    pub fn apply_vars<I, K, V>(&mut self, vars: I) -> Result<()>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        for (name, value) in vars {
            let (name, value) = (name.as_ref(), value.as_ref());
            let number = || -> Result<u64> {
                value.trim().parse().map_err(|_| {
                    Error::new(
                        ErrorKind::Config,
                        format!("{name} must be a whole number, not {value:?}"),
                    )
                })
            };
            match name {
                "BGTASK_BROKER_URL" => self.broker_url = Some(value.to_owned()),
                "BGTASK_NAMESPACE" => self.namespace = value.to_owned(),
                "BGTASK_DEFAULT_TIMEOUT_MS" => {
                    self.client.default_timeout = Duration::from_millis(number()?)
                }
                "BGTASK_TASK_KEY" if value.is_empty() => self.client.task_key = None,
                "BGTASK_TASK_KEY" => self.client.task_key = Some(value.to_owned()),
                "BGTASK_PER_KEY_LIMIT" => {
                    self.client.per_key_limit = if value.trim() == "unlimited" {
                        KeyLimit::Unlimited
                    } else {
                        KeyLimit::Max(number()?)
                    }
                }
                "BGTASK_MAX_PAYLOAD" => {
                    let max = usize::try_from(number()?).unwrap_or(usize::MAX);
                    self.client.max_payload = max;
                    self.worker.max_payload = max;
                }
                "BGTASK_SHUTDOWN_GRACE_MS" => {
                    self.worker.shutdown_grace = Duration::from_millis(number()?)
                }
                _ => {}
            }
        }
        self.validate()
    }

    /// Check what can be checked without a broker: the namespace, and that `[client]` and
    /// `[worker]` do not set a namespace of their own that differs from the top-level one.
    pub fn validate(&self) -> Result<()> {
        Namespace::new(self.namespace.clone())?;
        for (section, namespace) in [
            ("client", &self.client.namespace),
            ("worker", &self.worker.namespace),
        ] {
            if namespace != crate::names::DEFAULT_NAMESPACE && namespace != &self.namespace {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "[{section}] sets namespace {namespace:?}; set the namespace once, at the top level"
                    ),
                ));
            }
        }
        if let KeyLimit::Max(0) = self.client.per_key_limit {
            return Err(Error::new(
                ErrorKind::Config,
                "client.per_key_limit must be at least 1 (or \"unlimited\")",
            ));
        }
        Ok(())
    }

    /// The broker URL to connect to: the configured one, else [`DEFAULT_BROKER_URL`].
    pub fn broker_url(&self) -> &str {
        self.broker_url.as_deref().unwrap_or(DEFAULT_BROKER_URL)
    }

    /// Connect to [`broker_url`](Self::broker_url).
    pub async fn connect(&self) -> Result<DynBroker> {
        crate::connect(self.broker_url()).await
    }

    /// The client configuration, in this configuration's namespace.
    pub fn client_config(&self) -> ClientConfig {
        ClientConfig {
            namespace: self.namespace.clone(),
            ..self.client.clone()
        }
    }

    /// The worker configuration, in this configuration's namespace.
    pub fn worker_config(&self) -> WorkerConfig {
        WorkerConfig {
            namespace: self.namespace.clone(),
            ..self.worker.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_is_the_default() {
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
        assert_eq!(Config::default().broker_url(), DEFAULT_BROKER_URL);
    }

    #[test]
    fn every_field_is_read() {
        let config = Config::from_toml(
            r#"
            broker_url = "nats://127.0.0.1:4222"
            namespace = "app"
            [client]
            default_timeout_ms = 2500
            task_key = "user"
            per_key_limit = "unlimited"
            [worker]
            shutdown_grace_ms = 3000
            [worker.blacklist]
            threshold = 2
            interval_ms = 500
            duration_ms = 60000
            "#,
        )
        .unwrap();
        assert_eq!(config.broker_url(), "nats://127.0.0.1:4222");
        let client = config.client_config();
        assert_eq!(client.namespace, "app");
        assert_eq!(client.default_timeout, Duration::from_millis(2500));
        assert_eq!(client.task_key.as_deref(), Some("user"));
        assert_eq!(client.per_key_limit, KeyLimit::Unlimited);
        let worker = config.worker_config();
        assert_eq!(worker.namespace, "app");
        assert_eq!(worker.shutdown_grace, Duration::from_secs(3));
        assert_eq!(worker.blacklist.threshold, 2);
        assert_eq!(worker.blacklist.duration, Duration::from_secs(60));
    }

    #[test]
    fn mistakes_are_config_errors_without_secrets() {
        let err = Config::from_toml("brokr_url = \"x\"").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(err.to_string().contains("brokr_url"), "{err}");

        let err = Config::from_toml("broker_url = \"redis://:hunter2@h\" junk").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(err.to_string().contains("line 1"), "{err}");
        assert!(!err.to_string().contains("hunter2"), "{err}");

        let err = Config::from_toml("namespace = \"a b\"").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidName);

        let err = Config::from_toml("namespace = \"a\"\n[client]\nnamespace = \"b\"").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
    }

    #[test]
    fn the_environment_overrides_the_file() {
        let mut config =
            Config::from_toml("namespace = \"file\"\nbroker_url = \"memory://\"").unwrap();
        config
            .apply_vars([
                ("BGTASK_NAMESPACE", "env"),
                ("BGTASK_BROKER_URL", "redis://:pw@h"),
                ("BGTASK_PER_KEY_LIMIT", "3"),
                ("BGTASK_MAX_PAYLOAD", "1000"),
                ("BGTASK_TASK_KEY", "user"),
                ("UNRELATED", "x"),
            ])
            .unwrap();
        assert_eq!(config.namespace, "env");
        assert_eq!(config.client.per_key_limit, KeyLimit::Max(3));
        assert_eq!(config.worker.max_payload, 1000);
        assert!(!format!("{config:?}").contains("pw"));
        let err = config
            .apply_vars([("BGTASK_DEFAULT_TIMEOUT_MS", "5s")])
            .unwrap_err();
        assert!(
            err.to_string().contains("BGTASK_DEFAULT_TIMEOUT_MS"),
            "{err}"
        );
    }
}
