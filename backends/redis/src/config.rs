//! [`RedisConfig`]: where the server is and how long to wait for it.

use std::fmt;
use std::time::Duration;

use bgtask_core::{Error, ErrorKind, Result};

/// The default bound on every operation: [`RedisConfig::op_timeout`].
pub const DEFAULT_OP_TIMEOUT: Duration = Duration::from_secs(5);
/// The default bound on one connection attempt: [`RedisConfig::connect_timeout`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The default interval of the subscription connection's watchdog: [`RedisConfig::ping_interval`].
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(2);
/// The default longest wait between reconnection attempts: [`RedisConfig::max_backoff`].
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(2);
/// The default number of messages one subscription buffers:
/// [`RedisConfig::subscription_buffer`].
pub const DEFAULT_SUBSCRIPTION_BUFFER: usize = 65_536;

/// How to reach Redis and how long to wait for it.
///
/// Build one with [`RedisConfig::new`] and adjust it with the `with_*` methods (or set the public
/// fields), then pass it to [`RedisBroker::connect_with`](crate::RedisBroker::connect_with).
///
/// Its `Debug` output never shows the password.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisConfig {
    /// The server's URL: `redis://[user][:password@]host[:port][/db]`, `rediss://...` for TLS
    /// (when the crate is built with TLS support), or `redis+unix:///path?db=0&pass=...`.
    pub url: String,
    /// The longest any single operation (publish, subscribe, each lease call) waits, including
    /// a reconnection it has to make first. Default 5 s.
    pub op_timeout: Duration,
    /// The longest one connection attempt (TCP, TLS, authentication) waits. Default 5 s.
    pub connect_timeout: Duration,
    /// How often the subscription connection is pinged to prove it is alive; a ping that gets no
    /// answer within `op_timeout` makes the broker reconnect it. Default 2 s.
    pub ping_interval: Duration,
    /// The longest wait between two reconnection attempts; the wait starts at 50 ms and doubles
    /// up to this. Default 2 s.
    pub max_backoff: Duration,
    /// How many messages one subscription holds for a slow reader before it drops messages and
    /// yields [`Incoming::Gap`](bgtask_core::Incoming::Gap). Default 65536.
    pub subscription_buffer: usize,
}

impl RedisConfig {
    /// A configuration for `url` with every other setting at its default.
    pub fn new(url: impl Into<String>) -> Self {
        RedisConfig {
            url: url.into(),
            op_timeout: DEFAULT_OP_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            ping_interval: DEFAULT_PING_INTERVAL,
            max_backoff: DEFAULT_MAX_BACKOFF,
            subscription_buffer: DEFAULT_SUBSCRIPTION_BUFFER,
        }
    }

    /// Set [`op_timeout`](Self::op_timeout).
    pub fn with_op_timeout(mut self, timeout: Duration) -> Self {
        self.op_timeout = timeout;
        self
    }

    /// Set [`connect_timeout`](Self::connect_timeout).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Set [`ping_interval`](Self::ping_interval).
    pub fn with_ping_interval(mut self, interval: Duration) -> Self {
        self.ping_interval = interval;
        self
    }

    /// Set [`max_backoff`](Self::max_backoff).
    pub fn with_max_backoff(mut self, backoff: Duration) -> Self {
        self.max_backoff = backoff;
        self
    }

    /// Set [`subscription_buffer`](Self::subscription_buffer).
    pub fn with_subscription_buffer(mut self, messages: usize) -> Self {
        self.subscription_buffer = messages;
        self
    }

    /// The URL with its password (and any `pass=` query value) replaced by `***`.
    pub fn redacted_url(&self) -> String {
        redact(&self.url)
    }

    /// Check that every value is usable.
    pub(crate) fn validate(&self) -> Result<()> {
        let positive = [
            ("op_timeout", self.op_timeout),
            ("connect_timeout", self.connect_timeout),
            ("ping_interval", self.ping_interval),
            ("max_backoff", self.max_backoff),
        ];
        for (name, value) in positive {
            if value.is_zero() {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!("redis: {name} must be greater than zero"),
                ));
            }
        }
        if self.subscription_buffer == 0 {
            return Err(Error::new(
                ErrorKind::Config,
                "redis: subscription_buffer must be at least 1",
            ));
        }
        Ok(())
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &self.redacted_url())
            .field("op_timeout", &self.op_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("ping_interval", &self.ping_interval)
            .field("max_backoff", &self.max_backoff)
            .field("subscription_buffer", &self.subscription_buffer)
            .finish()
    }
}

/// `url` without secrets: the password and the `pass` query value become `***`. A URL that does
/// not parse is not shown at all, since its secret cannot be located reliably.
pub(crate) fn redact(url: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        return "<unparsable url>".to_owned();
    };
    if parsed.password().is_some() && parsed.set_password(Some("***")).is_err() {
        return "<unparsable url>".to_owned();
    }
    if parsed.query_pairs().any(|(k, _)| k == "pass") {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| {
                let v = if k == "pass" {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("redis://user:s3cret@host:6379/0"),
            "redis://user:***@host:6379/0"
        );
        assert_eq!(redact("rediss://:s3cret@host"), "rediss://:***@host");
        assert_eq!(redact("redis://host:6379"), "redis://host:6379");
        let unix = redact("redis+unix:///tmp/redis.sock?db=1&pass=s3cret");
        assert!(!unix.contains("s3cret"), "{unix}");
        assert!(unix.contains("db=1"), "{unix}");
        assert_eq!(redact("redis://:s3cret@[bad"), "<unparsable url>");
    }

    #[test]
    fn debug_hides_the_password() {
        let config = RedisConfig::new("redis://:hunter2@localhost");
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("***"), "{shown}");
    }

    #[test]
    fn rejects_zero_values() {
        let ok = RedisConfig::new("redis://localhost");
        assert!(ok.validate().is_ok());
        let zero = ok.clone().with_op_timeout(Duration::ZERO);
        assert_eq!(zero.validate().unwrap_err().kind(), ErrorKind::Config);
        let zero = ok.with_subscription_buffer(0);
        assert_eq!(zero.validate().unwrap_err().kind(), ErrorKind::Config);
    }
}
