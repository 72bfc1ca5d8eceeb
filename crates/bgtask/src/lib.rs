#![doc = include_str!("../../../README.md")]
#![deny(missing_docs)]

pub use bgtask_core::*;

mod config;
pub use config::{Config, CONFIG_FILE, DEFAULT_BROKER_URL, ENV_VARS};

/// The Redis backend (cargo feature `redis`, on by default).
#[cfg(feature = "redis")]
pub use bgtask_redis as redis;

/// The NATS backend (cargo feature `nats`).
#[cfg(feature = "nats")]
pub use bgtask_nats as nats;

/// The PostgreSQL backend (cargo feature `postgres`).
#[cfg(feature = "postgres")]
pub use bgtask_postgres as postgres;

use std::sync::Arc;

/// The broker backends a URL can name, by scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Scheme {
    /// `memory://`: a new in-process [`MemoryBroker`].
    Memory,
    /// `redis://` or `rediss://` (TLS); a Redis Cluster with `redis+cluster://` or
    /// `rediss+cluster://`.
    Redis,
    /// `nats://` or `tls://`.
    Nats,
    /// `postgres://` or `postgresql://`.
    Postgres,
}

impl Scheme {
    /// The scheme of `url`, or a [`ErrorKind::Config`] error naming the accepted ones.
    pub fn of(url: &str) -> Result<Scheme> {
        let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or_default();
        match scheme.to_ascii_lowercase().as_str() {
            "memory" => Ok(Scheme::Memory),
            "redis" | "rediss" | "redis+cluster" | "rediss+cluster" => Ok(Scheme::Redis),
            "nats" | "tls" => Ok(Scheme::Nats),
            "postgres" | "postgresql" => Ok(Scheme::Postgres),
            _ => Err(Error::new(
                ErrorKind::Config,
                format!(
                    "unknown broker URL {:?}: expected memory://, redis://, rediss://, redis+cluster://, rediss+cluster://, nats://, tls://, postgres:// or postgresql://",
                    redact(url)
                ),
            )),
        }
    }

    /// The cargo feature of the `bgtask` crate that compiles this backend in.
    pub fn feature(self) -> &'static str {
        match self {
            Scheme::Memory => "(built in)",
            Scheme::Redis => "redis",
            Scheme::Nats => "nats",
            Scheme::Postgres => "postgres",
        }
    }
}

/// Connect to the broker that `url` names.
///
/// | URL | backend |
/// |---|---|
/// | `memory://` | a new [`MemoryBroker`] (one process; share it by cloning the `Arc`) |
/// | `redis://[user:password@]host[:port][/db]`, `rediss://...` | Redis (feature `redis`, default) |
/// | `redis+cluster://[user:password@]host:port[,host:port...]`, `rediss+cluster://...` | a Redis Cluster (feature `redis`) |
/// | `nats://...`, `tls://...` | NATS (feature `nats`) |
/// | `postgres://...`, `postgresql://...` | PostgreSQL (feature `postgres`) |
///
/// A URL whose backend is not compiled in is an [`ErrorKind::Config`] error that names the
/// cargo feature to enable. Passwords in URLs never appear in errors or logs.
pub async fn connect(url: &str) -> Result<DynBroker> {
    let scheme = Scheme::of(url)?;
    match scheme {
        Scheme::Memory => Ok(Arc::new(MemoryBroker::new())),
        #[cfg(feature = "redis")]
        Scheme::Redis => Ok(Arc::new(bgtask_redis::RedisBroker::connect(url).await?)),
        #[cfg(feature = "nats")]
        Scheme::Nats => Ok(Arc::new(bgtask_nats::NatsBroker::connect(url).await?)),
        #[cfg(feature = "postgres")]
        Scheme::Postgres => Ok(Arc::new(
            bgtask_postgres::PostgresBroker::connect(url).await?,
        )),
        #[allow(unreachable_patterns)] // with every backend compiled in
        _ => Err(not_compiled_in(scheme, url)),
    }
}

#[allow(dead_code)] // unused when every backend is compiled in
fn not_compiled_in(scheme: Scheme, url: &str) -> Error {
    let feature = scheme.feature();
    Error::new(
        ErrorKind::Config,
        format!(
            "the broker URL {:?} needs the `{feature}` cargo feature of bgtask: \
             bgtask = {{ version = \"0.1\", features = [\"{feature}\"] }}",
            redact(url)
        ),
    )
}

/// `url` with any password replaced by `***`, for messages and logs.
pub fn redact(url: &str) -> String {
    let scheme = url.split_once("://").map_or("", |(scheme, _)| scheme);
    bgtask_core::connection::redact_userinfo(url, scheme.starts_with("nats") || scheme == "tls")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes() {
        assert_eq!(Scheme::of("redis://localhost").unwrap(), Scheme::Redis);
        assert_eq!(Scheme::of("REDISS://x").unwrap(), Scheme::Redis);
        assert_eq!(
            Scheme::of("redis+cluster://a:1,b:2").unwrap(),
            Scheme::Redis
        );
        assert_eq!(Scheme::of("memory://").unwrap(), Scheme::Memory);
        assert_eq!(Scheme::of("postgresql://x").unwrap(), Scheme::Postgres);
        let err = Scheme::of("ftp://user:secret@x").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(!err.to_string().contains("secret"));
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("redis://:pw@h:1/0"), "redis://:***@h:1/0");
        assert_eq!(redact("redis://u:pw@h"), "redis://u:***@h");
        assert_eq!(redact("nats://token@h"), "nats://***@h");
        assert_eq!(redact("redis://h/0?x=@"), "redis://h/0?x=@");
        assert_eq!(redact("memory://"), "memory://");
    }

    #[tokio::test]
    async fn missing_backends_name_their_feature() {
        for scheme in [Scheme::Redis, Scheme::Nats, Scheme::Postgres] {
            let err = not_compiled_in(scheme, "x://user:secret@h");
            assert_eq!(err.kind(), ErrorKind::Config);
            let feature = format!("`{}` cargo feature", scheme.feature());
            assert!(err.to_string().contains(&feature), "{err}");
            assert!(!err.to_string().contains("secret"), "{err}");
        }
        #[cfg(not(feature = "nats"))]
        {
            let err = connect("nats://127.0.0.1:4222").await.unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Config);
            assert!(err.to_string().contains("`nats` cargo feature"), "{err}");
        }
        #[cfg(not(feature = "postgres"))]
        {
            let err = connect("postgres://u:secret@127.0.0.1:5432/db")
                .await
                .unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Config);
            assert!(
                err.to_string().contains("`postgres` cargo feature"),
                "{err}"
            );
            assert!(!err.to_string().contains("secret"), "{err}");
        }
    }

    /// With the feature, postgres URLs reach the backend (a refused connection, not a
    /// missing feature).
    #[cfg(feature = "postgres")]
    #[tokio::test]
    async fn postgres_urls_reach_the_backend() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        for scheme in ["postgres", "postgresql"] {
            let err = connect(&format!("{scheme}://u:secret@127.0.0.1:{port}/db"))
                .await
                .unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
            assert!(!format!("{err:?}").contains("secret"), "{err:?}");
        }
    }

    #[tokio::test]
    async fn memory_urls_connect() {
        let broker = connect("memory://").await.unwrap();
        assert!(!broker.capabilities().networked);
    }
}
