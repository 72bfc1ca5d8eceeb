//! [`PostgresConfig`]: where the server is, which schema to use and how long to wait.

use std::fmt;
use std::time::Duration;

use bgtask_core::{Error, ErrorKind, Result};
use sqlx::postgres::PgConnectOptions;
use sqlx::ConnectOptions;

/// The default schema of bgtask's tables: [`PostgresConfig::schema`].
pub const DEFAULT_SCHEMA: &str = "bgtask";
/// The default `application_name` of the broker's connections:
/// [`PostgresConfig::application_name`].
pub const DEFAULT_APPLICATION_NAME: &str = "bgtask";
pub use bgtask_core::connection::{
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_LIVENESS_INTERVAL, DEFAULT_MAX_BACKOFF, DEFAULT_OP_TIMEOUT,
    DEFAULT_SUBSCRIPTION_BUFFER, DEFAULT_SUBSCRIPTION_BUFFER_BYTES,
};
use bgtask_core::ConnectionSettings;

/// The default number of pooled connections for publish and leases:
/// [`PostgresConfig::pool_size`].
pub const DEFAULT_POOL_SIZE: u32 = 8;
/// The default lifetime of a payload row: [`PostgresConfig::payload_ttl`].
pub const DEFAULT_PAYLOAD_TTL: Duration = Duration::from_secs(30);
/// The default interval of the cleanup of expired rows: [`PostgresConfig::cleanup_interval`].
pub const DEFAULT_CLEANUP_INTERVAL: Duration = Duration::from_secs(5);
/// The default largest payload [`publish`](bgtask_core::Broker::publish) accepts:
/// [`PostgresConfig::max_payload`].
pub const DEFAULT_MAX_PAYLOAD: usize = 64 << 20;

/// The URL query parameter that names the schema (removed before the URL reaches the driver).
pub const SCHEMA_PARAM: &str = "schema";

/// How to reach PostgreSQL, where bgtask keeps its tables and how long to wait.
///
/// Build one with [`PostgresConfig::new`] and adjust it with the `with_*` methods (or set the
/// public fields), then pass it to
/// [`PostgresBroker::connect_with`](crate::PostgresBroker::connect_with).
///
/// Its `Debug` output never shows the password.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PostgresConfig {
    /// The server's URL: `postgres://[user[:password]@]host[:port][/database][?param=value&...]`
    /// (`postgresql://` as well), with the driver's parameters (`sslmode`, `host` for a Unix
    /// socket directory, `application_name`, `options`, ...) and bgtask's own `schema`.
    pub url: String,
    /// The schema that holds bgtask's tables, created when missing: 1 to 63 of
    /// `[A-Za-z0-9_]`, not starting with a digit, case-sensitive. Brokers on different schemas
    /// of one database never meet (the schema is part of every channel's identifier). Default
    /// `bgtask`, or the URL's `schema` parameter.
    pub schema: String,
    /// `application_name` of the broker's connections, as `pg_stat_activity` shows it; the
    /// listener connection adds `" listener <broker id>"`. Printable ASCII, at most 40 bytes.
    /// Default `bgtask`, or the URL's `application_name` parameter.
    pub application_name: String,
    /// How long to wait for the server (`op_timeout` is also the server-side
    /// `statement_timeout` of the broker's connections, and bounds fetching a payload row),
    /// how often the listener connection makes a round trip (`SELECT 1`), how the listener
    /// backs off while reconnecting, how much a subscription buffers. Every default as in
    /// [`ConnectionSettings`]; the `with_*` setters set them.
    pub connection: ConnectionSettings,
    /// Pooled connections for publish, leases and payload fetches (opened on demand; the
    /// listener has one more of its own). Default 8.
    pub pool_size: u32,
    /// How long a payload row (a message too large for one notification) stays readable.
    /// A subscriber that reads the message later gets a `Gap` instead. Default 30 s.
    pub payload_ttl: Duration,
    /// How often the broker deletes expired lease, payload and claim rows (the only periodic query
    /// besides the listener's round trip). Default 5 s.
    pub cleanup_interval: Duration,
    /// The largest payload `publish` accepts; larger ones fail with
    /// [`ErrorKind::TooLarge`]. Default 64 MiB.
    pub max_payload: usize,
    /// Whether lease changes, claims and payload rows wait for their WAL flush before the
    /// operation returns (PostgreSQL's `synchronous_commit` for the broker's connections). Off
    /// by default: with it, every acquire, release and won claim costs a WAL flush
    /// (milliseconds on ordinary disks), which caps the task rate; without it, a crash of the
    /// *server* may forget the lease changes and claims of its last fraction of a second (never
    /// a client's crash, and other sessions see every change at once), no worse than the
    /// notifications a server crash loses anyway. Turn it on to have every lease change and
    /// claim survive a server crash.
    pub synchronous_commit: bool,
}

impl PostgresConfig {
    /// A configuration for `url` with every other setting at its default, except the schema and
    /// `application_name` when the URL names them (`?schema=...&application_name=...`).
    pub fn new(url: impl Into<String>) -> Self {
        let url = url.into();
        let mut config = PostgresConfig {
            schema: DEFAULT_SCHEMA.to_owned(),
            application_name: DEFAULT_APPLICATION_NAME.to_owned(),
            url,
            connection: ConnectionSettings::default(),
            pool_size: DEFAULT_POOL_SIZE,
            payload_ttl: DEFAULT_PAYLOAD_TTL,
            cleanup_interval: DEFAULT_CLEANUP_INTERVAL,
            max_payload: DEFAULT_MAX_PAYLOAD,
            synchronous_commit: false,
        };
        if let Ok(parsed) = url::Url::parse(&config.url) {
            for (key, value) in parsed.query_pairs() {
                match &*key {
                    SCHEMA_PARAM => config.schema = value.into_owned(),
                    "application_name" => config.application_name = value.into_owned(),
                    _ => {}
                }
            }
        }
        config
    }

    /// Set [`schema`](Self::schema).
    pub fn with_schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// Set [`application_name`](Self::application_name).
    pub fn with_application_name(mut self, name: impl Into<String>) -> Self {
        self.application_name = name.into();
        self
    }

    /// Set [`pool_size`](Self::pool_size).
    pub fn with_pool_size(mut self, connections: u32) -> Self {
        self.pool_size = connections;
        self
    }

    /// Set [`payload_ttl`](Self::payload_ttl).
    pub fn with_payload_ttl(mut self, ttl: Duration) -> Self {
        self.payload_ttl = ttl;
        self
    }

    /// Set [`cleanup_interval`](Self::cleanup_interval).
    pub fn with_cleanup_interval(mut self, interval: Duration) -> Self {
        self.cleanup_interval = interval;
        self
    }

    /// Set [`max_payload`](Self::max_payload).
    pub fn with_max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = bytes;
        self
    }

    /// Set [`synchronous_commit`](Self::synchronous_commit).
    pub fn with_synchronous_commit(mut self, on: bool) -> Self {
        self.synchronous_commit = on;
        self
    }

    /// The URL with its password (in the user info or a `password` parameter) replaced by
    /// `***`.
    pub fn redacted_url(&self) -> String {
        redact(&self.url)
    }

    /// Check that every value is usable.
    pub(crate) fn validate(&self) -> Result<()> {
        self.connection.validate("postgres")?;
        let positive = [
            ("payload_ttl", self.payload_ttl),
            ("cleanup_interval", self.cleanup_interval),
        ];
        for (name, value) in positive {
            if value.is_zero() {
                return Err(config_error(format!(
                    "postgres: {name} must be greater than zero"
                )));
            }
        }
        if self.pool_size == 0 {
            return Err(config_error("postgres: pool_size must be at least 1"));
        }
        validate_schema(&self.schema)?;
        let app = &self.application_name;
        if app.len() > 40 || !app.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err(config_error(
                "postgres: application_name must be at most 40 bytes of printable ASCII",
            ));
        }
        Ok(())
    }
}

bgtask_core::connection_setters!(PostgresConfig);

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &self.redacted_url())
            .field("schema", &self.schema)
            .field("application_name", &self.application_name)
            .field("connection", &self.connection)
            .field("pool_size", &self.pool_size)
            .field("payload_ttl", &self.payload_ttl)
            .field("cleanup_interval", &self.cleanup_interval)
            .field("max_payload", &self.max_payload)
            .field("synchronous_commit", &self.synchronous_commit)
            .finish()
    }
}

fn config_error(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Config, message)
}

/// A schema name bgtask accepts: 1 to 63 bytes of `[A-Za-z0-9_]`, not starting with a digit.
/// (It is still quoted wherever it appears in SQL, so its case is kept.)
pub(crate) fn validate_schema(schema: &str) -> Result<()> {
    let ok = !schema.is_empty()
        && schema.len() <= 63
        && !schema.as_bytes()[0].is_ascii_digit()
        && schema
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !schema.starts_with("pg_");
    if ok {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::Config,
            format!(
                "postgres: schema {schema:?} must be 1 to 63 of [A-Za-z0-9_], not starting with a \
                 digit or pg_"
            ),
        ))
    }
}

/// `url` without secrets: the password and any `password` query value become `***`.
pub(crate) fn redact(url: &str) -> String {
    let secrets = bgtask_core::connection::Secrets {
        query: &["password"],
        bare_user: false,
    };
    bgtask_core::connection::redact_url(url, &secrets)
}

/// The password of `url` (user info or `password` parameter), percent-decoded, so that error
/// texts can be scrubbed of it.
pub(crate) fn password_of(url: &str) -> Option<String> {
    let parsed = url::Url::parse(url).ok()?;
    if let Some(p) = parsed.password() {
        let decoded = percent_decode(p);
        return Some(decoded);
    }
    parsed
        .query_pairs()
        .find(|(k, _)| k == "password")
        .map(|(_, v)| v.into_owned())
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((hi * 16 + lo) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `url` names several hosts, libpq style (`postgres://h1:5432,h2:5432/db`).
fn several_hosts(url: &str) -> bool {
    let Some((_, rest)) = url.split_once("://") else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let hosts = authority
        .rsplit_once('@')
        .map_or(authority, |(_, hosts)| hosts);
    hosts.contains(',')
}

/// The driver's options for `config`: the URL without bgtask's own parameters, the
/// application name, and the server-side statement timeout.
pub(crate) fn connect_options(
    config: &PostgresConfig,
    secret: Option<&str>,
) -> Result<PgConnectOptions> {
    let bad_url = |detail: String| {
        let detail = match secret.filter(|s| !s.is_empty()) {
            Some(secret) => detail.replace(secret, "***"),
            None => detail,
        };
        Error::new(
            ErrorKind::Config,
            format!(
                "not a usable PostgreSQL URL: {}: {detail}",
                config.redacted_url()
            ),
        )
    };
    if several_hosts(&config.url) {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "{}: several hosts in one PostgreSQL URL are not supported (the driver, sqlx, \
                 connects to one host); give the address of the primary's failover endpoint \
                 (a virtual IP, a proxy such as HAProxy or PgBouncer, a managed service's \
                 writer endpoint) instead",
                config.redacted_url()
            ),
        ));
    }
    let mut url = url::Url::parse(&config.url).map_err(|e| bad_url(e.to_string()))?;
    if !matches!(url.scheme(), "postgres" | "postgresql") {
        return Err(bad_url(
            "the scheme must be postgres:// or postgresql://".to_owned(),
        ));
    }
    let kept: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| k != SCHEMA_PARAM)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if kept.is_empty() {
        url.set_query(None);
    } else {
        url.query_pairs_mut().clear().extend_pairs(kept);
    }
    let statement_timeout = config.connection.op_timeout.as_millis().max(1).to_string();
    let mut options = PgConnectOptions::from_url(&url)
        .map_err(|e| bad_url(e.to_string()))?
        .application_name(&config.application_name)
        .options([("statement_timeout", statement_timeout.as_str())]);
    if !config.synchronous_commit {
        options = options.options([("synchronous_commit", "off")]);
    }
    Ok(options)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("postgres://user:s3cret@host:5432/db"),
            "postgres://user:***@host:5432/db"
        );
        assert_eq!(
            redact("postgresql://u:s3cret@host/db?sslmode=require"),
            "postgresql://u:***@host/db?sslmode=require"
        );
        assert_eq!(redact("postgres://host/db"), "postgres://host/db");
        let query = redact("postgres://host/db?user=u&password=s3cret&schema=x");
        assert!(!query.contains("s3cret"), "{query}");
        assert!(query.contains("schema=x"), "{query}");
        assert_eq!(redact("postgres://:s3cret@[bad"), "<unparsable url>");
    }

    #[test]
    fn finds_the_password_to_scrub() {
        assert_eq!(
            password_of("postgres://u:p%40ss@h/db").as_deref(),
            Some("p@ss")
        );
        assert_eq!(
            password_of("postgres://h/db?password=x%20y").as_deref(),
            Some("x y")
        );
        assert_eq!(password_of("postgres://u@h/db"), None);
        assert_eq!(
            password_of("postgres://u:abc%@h/db").as_deref(),
            Some("abc%")
        );
    }

    #[test]
    fn debug_hides_the_password() {
        let config = PostgresConfig::new("postgres://u:hunter2@localhost/db");
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("***"), "{shown}");
    }

    #[test]
    fn url_parameters_set_schema_and_application_name() {
        let config = PostgresConfig::new("postgres://h/db?schema=jobs&application_name=svc");
        assert_eq!(config.schema, "jobs");
        assert_eq!(config.application_name, "svc");
        let config = PostgresConfig::new("postgres://h/db");
        assert_eq!(config.schema, DEFAULT_SCHEMA);
        assert_eq!(config.application_name, DEFAULT_APPLICATION_NAME);
        let config = PostgresConfig::new("postgres://h/db?schema=jobs").with_schema("other");
        assert_eq!(config.schema, "other");
    }

    #[test]
    fn rejects_unusable_values() {
        let ok = PostgresConfig::new("postgres://localhost/db");
        assert!(ok.validate().is_ok());
        let zero = ok.clone().with_op_timeout(Duration::ZERO);
        assert_eq!(zero.validate().unwrap_err().kind(), ErrorKind::Config);
        let zero = ok.clone().with_pool_size(0);
        assert_eq!(zero.validate().unwrap_err().kind(), ErrorKind::Config);
        for schema in ["", "1abc", "a-b", "a\"b", "pg_x", &"s".repeat(64), "é"] {
            let bad = ok.clone().with_schema(schema);
            assert_eq!(
                bad.validate().unwrap_err().kind(),
                ErrorKind::Config,
                "{schema}"
            );
        }
        for schema in ["bgtask", "Jobs_2", "_x", &"s".repeat(63)] {
            assert!(
                ok.clone().with_schema(schema).validate().is_ok(),
                "{schema}"
            );
        }
        let bad = ok.with_application_name("tab\there");
        assert_eq!(bad.validate().unwrap_err().kind(), ErrorKind::Config);
    }
}
