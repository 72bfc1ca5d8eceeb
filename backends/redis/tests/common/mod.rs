//! Helpers shared by the integration tests: the test server, brokers, raw connections.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::time::Duration;

use bgtask_redis::{RedisBroker, RedisConfig};

/// The environment variable naming the test server.
pub const URL_VAR: &str = "BGTASK_REDIS_URL";
/// The test server when the variable is not set.
pub const DEFAULT_URL: &str = "redis://127.0.0.1:6379";

/// How to get a server for the tests.
pub const HOW_TO_START: &str = "start Redis: `docker compose up -d redis`, or \
     `redis-server --port 6379`, or point BGTASK_REDIS_URL at a server";

/// The URL of the test server.
pub fn url() -> String {
    std::env::var(URL_VAR).unwrap_or_else(|_| DEFAULT_URL.to_owned())
}

/// A broker on the test server; panics with instructions when the server is unreachable.
pub async fn broker() -> RedisBroker {
    connect(RedisConfig::new(url())).await
}

/// A broker with `config`; panics with instructions when the server is unreachable.
pub async fn connect(config: RedisConfig) -> RedisBroker {
    let shown = config.redacted_url();
    match RedisBroker::connect_with(config).await {
        Ok(broker) => broker,
        Err(e) => panic!("cannot reach the test Redis at {shown}: {e}\n{HOW_TO_START}"),
    }
}

/// The test server's TCP address.
pub fn server_addr() -> SocketAddr {
    bgtask_conformance::servers::server_addr(&url(), URL_VAR, 6379)
}

/// The test server's URL with its host and port replaced by `addr`: how a broker reaches the
/// server through a fault proxy.
pub fn url_via(addr: SocketAddr) -> String {
    bgtask_conformance::servers::url_via(&url(), addr)
}

/// Settings for brokers behind a fault proxy: short bounds so outages are noticed quickly.
pub fn fault_config(addr: SocketAddr) -> RedisConfig {
    RedisConfig::new(url_via(addr))
        .with_op_timeout(Duration::from_secs(1))
        .with_connect_timeout(Duration::from_secs(1))
        .with_liveness_interval(Duration::from_secs(1))
        .with_max_backoff(Duration::from_secs(1))
}

/// A plain connection for checking the server's side of things.
pub async fn raw() -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(url()).expect("BGTASK_REDIS_URL");
    match tokio::time::timeout(
        Duration::from_secs(5),
        client.get_multiplexed_async_connection(),
    )
    .await
    {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => panic!("cannot reach the test Redis: {e}\n{HOW_TO_START}"),
        Err(_) => panic!("the test Redis does not answer\n{HOW_TO_START}"),
    }
}

/// A prefix unique to one test, so tests never see each other's channels and keys.
pub fn prefix() -> String {
    format!("bgtask-redis-test:{}", bgtask_core::names::random_id())
}
