//! [`RedisConfig`]: where the server is and how long to wait for it.

use std::fmt;

use bgtask_core::Result;

pub use bgtask_core::connection::{
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_LIVENESS_INTERVAL, DEFAULT_MAX_BACKOFF, DEFAULT_OP_TIMEOUT,
    DEFAULT_SUBSCRIPTION_BUFFER, DEFAULT_SUBSCRIPTION_BUFFER_BYTES,
};
use bgtask_core::ConnectionSettings;

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
    /// How long to wait for the server, how often to ping the subscription connection, how
    /// to back off while reconnecting, how much a subscription buffers (every default as in
    /// [`ConnectionSettings`]; the `with_*` setters set them).
    pub connection: ConnectionSettings,
}

impl RedisConfig {
    /// A configuration for `url` with every other setting at its default.
    pub fn new(url: impl Into<String>) -> Self {
        RedisConfig {
            url: url.into(),
            connection: ConnectionSettings::default(),
        }
    }

    /// The URL with its password (and any `pass=` query value) replaced by `***`.
    pub fn redacted_url(&self) -> String {
        redact(&self.url)
    }

    /// Check that every value is usable.
    pub(crate) fn validate(&self) -> Result<()> {
        self.connection.validate("redis")
    }
}

bgtask_core::connection_setters!(RedisConfig);

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &self.redacted_url())
            .field("connection", &self.connection)
            .finish()
    }
}

/// `url` without secrets: the password and the `pass` query value become `***`. A cluster URL
/// (`redis+cluster://user:password@h1:p1,h2:p2`) keeps its nodes and loses its password.
pub(crate) fn redact(url: &str) -> String {
    if crate::cluster::is_cluster_url(url) {
        return bgtask_core::connection::redact_userinfo(url, false);
    }
    let secrets = bgtask_core::connection::Secrets {
        query: &["pass"],
        bare_user: false,
    };
    bgtask_core::connection::redact_url(url, &secrets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bgtask_core::ErrorKind;
    use std::time::Duration;

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
        assert_eq!(
            redact("redis+cluster://u:s3cret@a:1,b:2/0"),
            "redis+cluster://u:***@a:1,b:2/0"
        );
        assert_eq!(
            redact("rediss+cluster://a:1,b:2"),
            "rediss+cluster://a:1,b:2"
        );
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
