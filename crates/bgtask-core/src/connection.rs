//! [`ConnectionSettings`]: what every networked backend's configuration shares — how long to
//! wait for the server, how often to prove the subscription connection alive, how to back off
//! while reconnecting, how much one subscription buffers (in messages and in bytes). Each backend's config embeds one as
//! its `connection` field, and gets the `with_*` setters from
//! [`connection_setters!`](crate::connection_setters).

use std::time::Duration;

use crate::error::{Error, ErrorKind, Result};

/// The default bound on every operation: [`ConnectionSettings::op_timeout`].
pub const DEFAULT_OP_TIMEOUT: Duration = Duration::from_secs(5);
/// The default bound on one connection attempt: [`ConnectionSettings::connect_timeout`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The default interval of the liveness round trip: [`ConnectionSettings::liveness_interval`].
pub const DEFAULT_LIVENESS_INTERVAL: Duration = Duration::from_secs(2);
/// The default longest wait between reconnection attempts: [`ConnectionSettings::max_backoff`].
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(2);
/// The default number of messages one subscription buffers:
/// [`ConnectionSettings::subscription_buffer`].
pub const DEFAULT_SUBSCRIPTION_BUFFER: usize = 65_536;
/// The default number of payload bytes one subscription buffers:
/// [`ConnectionSettings::subscription_buffer_bytes`] (64 MiB).
pub const DEFAULT_SUBSCRIPTION_BUFFER_BYTES: usize = 64 << 20;

/// How a backend waits for its server and recovers from losing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectionSettings {
    /// The longest any single operation (publish, subscribe, each lease call) waits, including
    /// a reconnection it has to make first (PostgreSQL: also the server-side
    /// `statement_timeout`). Default 5 s.
    pub op_timeout: Duration,
    /// The longest one connection attempt (TCP, TLS, handshake, authentication) waits.
    /// Default 5 s.
    pub connect_timeout: Duration,
    /// How often the subscription connection proves it is alive — Redis: a `PING` on it;
    /// NATS: the client's ping (three unanswered drop the connection); PostgreSQL: a
    /// `SELECT 1` on the listener. One that gets no answer within `op_timeout` is replaced, so
    /// a half-open connection is noticed within a few intervals. Default 2 s.
    pub liveness_interval: Duration,
    /// The longest wait between two reconnection attempts: the waits start at 50 ms and double
    /// up to this, each jittered ([`backoff`](crate::backoff)). Reconnection never gives up.
    /// Default 2 s.
    pub max_backoff: Duration,
    /// How many messages one subscription holds for a slow reader before it drops messages and
    /// yields [`Incoming::Gap`](crate::Incoming::Gap). Default 65536.
    pub subscription_buffer: usize,
    /// How many payload bytes one subscription holds for a slow reader: past this, as past
    /// `subscription_buffer` messages, messages are dropped and the reader gets
    /// [`Incoming::Gap`](crate::Incoming::Gap). One message larger than this still goes into an
    /// empty buffer. NATS does not apply it: async-nats buffers whole messages, counted only
    /// (see the bgtask-nats docs). Default 64 MiB.
    pub subscription_buffer_bytes: usize,
}

impl Default for ConnectionSettings {
    fn default() -> Self {
        ConnectionSettings {
            op_timeout: DEFAULT_OP_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            liveness_interval: DEFAULT_LIVENESS_INTERVAL,
            max_backoff: DEFAULT_MAX_BACKOFF,
            subscription_buffer: DEFAULT_SUBSCRIPTION_BUFFER,
            subscription_buffer_bytes: DEFAULT_SUBSCRIPTION_BUFFER_BYTES,
        }
    }
}

impl ConnectionSettings {
    /// Check that every value is usable; errors ([`ErrorKind::Config`]) start with `backend`.
    pub fn validate(&self, backend: &str) -> Result<()> {
        let positive = [
            ("op_timeout", self.op_timeout),
            ("connect_timeout", self.connect_timeout),
            ("liveness_interval", self.liveness_interval),
            ("max_backoff", self.max_backoff),
        ];
        for (name, value) in positive {
            if value.is_zero() {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!("{backend}: {name} must be greater than zero"),
                ));
            }
        }
        let counts = [
            ("subscription_buffer", self.subscription_buffer),
            ("subscription_buffer_bytes", self.subscription_buffer_bytes),
        ];
        for (name, value) in counts {
            if value == 0 {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!("{backend}: {name} must be at least 1"),
                ));
            }
        }
        Ok(())
    }
}

/// Which parts of a broker URL are secret, for [`redact_url`].
#[derive(Debug, Clone, Copy)]
pub struct Secrets<'a> {
    /// Query parameters whose values are secret (Redis `pass`, PostgreSQL `password`).
    pub query: &'a [&'a str],
    /// A user name without a password is a secret too (a NATS token: `nats://TOKEN@host`).
    pub bare_user: bool,
}

/// What [`redact_url`] shows for a URL that does not parse: its secret cannot be located
/// reliably, so nothing of it is shown.
pub const UNPARSABLE_URL: &str = "<unparsable url>";

/// `url` with the password of its user info replaced by `***`, reading the authority as text
/// (`scheme://[user[:password]@]hosts[/...]`), so it also serves URLs [`url::Url`] cannot parse,
/// such as several comma-separated hosts. A bare user is a secret too when `bare_user` (a NATS
/// token). For logs and messages about URLs of any scheme; [`redact_url`] also hides secrets in
/// the query.
pub fn redact_userinfo(url: &str, bare_user: bool) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => {
            let user = match userinfo.split_once(':') {
                Some((user, _password)) => format!("{user}:***"),
                None if bare_user => "***".to_owned(),
                None => userinfo.to_owned(),
            };
            format!("{scheme}://{user}@{hosts}{path}")
        }
        None => url.to_owned(),
    }
}

/// `url` without its secrets: the password of its user info (and the rest of `secrets`)
/// becomes `***`. The one redaction every backend's errors, logs and `Debug` output use.
pub fn redact_url(url: &str, secrets: &Secrets<'_>) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        return UNPARSABLE_URL.to_owned();
    };
    let hidden = if parsed.password().is_some() {
        parsed.set_password(Some("***")).is_ok()
    } else if secrets.bare_user && !parsed.username().is_empty() {
        parsed.set_username("***").is_ok()
    } else {
        true
    };
    if !hidden {
        return UNPARSABLE_URL.to_owned();
    }
    let secret = |k: &str| secrets.query.contains(&k);
    if parsed.query_pairs().any(|(k, _)| secret(&k)) {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| {
                let v = if secret(&k) {
                    "***".to_owned()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string()
}

/// The `with_*` setters of a backend configuration's `connection` field
/// ([`ConnectionSettings`]), as inherent methods: `connection_setters!(RedisConfig);`.
#[macro_export]
macro_rules! connection_setters {
    ($config:ty) => {
        $crate::connection_setters!(@setters $config;
            with_op_timeout op_timeout: ::std::time::Duration,
            with_connect_timeout connect_timeout: ::std::time::Duration,
            with_liveness_interval liveness_interval: ::std::time::Duration,
            with_max_backoff max_backoff: ::std::time::Duration,
            with_subscription_buffer subscription_buffer: usize,
            with_subscription_buffer_bytes subscription_buffer_bytes: usize
        );
    };
    (@setters $config:ty; $($setter:ident $field:ident: $type:ty),*) => {
        impl $config {
            $(
                #[doc = concat!(
                    "Set [`", stringify!($field), "`](bgtask_core::ConnectionSettings::",
                    stringify!($field), ")."
                )]
                pub fn $setter(mut self, value: $type) -> Self {
                    self.connection.$field = value;
                    self
                }
            )*
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_hides_passwords_secret_parameters_and_tokens() {
        let plain = Secrets {
            query: &["pass"],
            bare_user: false,
        };
        assert_eq!(
            redact_url("redis://u:s3cret@h:1/0", &plain),
            "redis://u:***@h:1/0"
        );
        let query = redact_url("redis+unix:///tmp/r.sock?db=1&pass=s3cret", &plain);
        assert!(
            !query.contains("s3cret") && query.contains("db=1"),
            "{query}"
        );
        assert_eq!(redact_url("redis://tok@h", &plain), "redis://tok@h");
        let token = Secrets {
            query: &[],
            bare_user: true,
        };
        assert_eq!(
            redact_url("nats://s3cret@h:4222", &token),
            "nats://***@h:4222"
        );
        assert_eq!(redact_url("nats://h:4222", &token), "nats://h:4222");
        assert_eq!(redact_url("x://:s3cret@[bad", &token), UNPARSABLE_URL);
    }

    #[test]
    fn zero_values_are_config_errors_that_name_the_backend() {
        assert!(ConnectionSettings::default().validate("redis").is_ok());
        let zero = ConnectionSettings {
            liveness_interval: Duration::ZERO,
            ..ConnectionSettings::default()
        };
        let error = zero.validate("nats").unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Config);
        assert!(
            error.to_string().contains("nats: liveness_interval"),
            "{error}"
        );
        let empty = ConnectionSettings {
            subscription_buffer: 0,
            ..ConnectionSettings::default()
        };
        assert_eq!(
            empty.validate("postgres").unwrap_err().kind(),
            ErrorKind::Config
        );
        let no_bytes = ConnectionSettings {
            subscription_buffer_bytes: 0,
            ..ConnectionSettings::default()
        };
        let error = no_bytes.validate("redis").unwrap_err();
        assert!(
            error.to_string().contains("subscription_buffer_bytes"),
            "{error}"
        );
    }
}
