//! The shared conformance suite, run against a Redis Cluster (`BGTASK_REDIS_CLUSTER_URL`, a
//! `redis+cluster://host:port,...` URL; `scripts/redis-cluster up` starts one and prints it).
//!
//! The fault-proxy scenarios do not apply: a cluster client learns every node's address from
//! the cluster and connects to it directly, past any proxy in front of one node. Node failures
//! (a master killed, a node paused) are the cluster's own fault tests, in `cluster_faults.rs`.

use std::sync::Arc;

use async_trait::async_trait;
use bgtask_conformance::BrokerFactory;
use bgtask_core::{DynBroker, ErrorKind};
use bgtask_redis::RedisBroker;

/// The environment variable naming the test cluster.
const URL_VAR: &str = "BGTASK_REDIS_CLUSTER_URL";

/// The test cluster's URL; panics saying how to start one when it is not set.
fn cluster_url() -> String {
    std::env::var(URL_VAR).unwrap_or_else(|_| {
        panic!("{URL_VAR} is not set: run `export {URL_VAR}=$(scripts/redis-cluster up)`")
    })
}

/// Brokers on the test cluster.
pub struct RedisClusterFactory;

#[async_trait]
impl BrokerFactory for RedisClusterFactory {
    async fn broker(&self) -> DynBroker {
        let url = cluster_url();
        match RedisBroker::connect(&url).await {
            Ok(broker) => Arc::new(broker),
            Err(e) => panic!(
                "cannot reach the test Redis Cluster at {url}: {e}\n\
                 start one with `export {URL_VAR}=$(scripts/redis-cluster up)`"
            ),
        }
    }
}

bgtask_conformance::conformance_suite!(RedisClusterFactory);

/// A `redis+cluster://` URL that names a single server (not in cluster mode) is a `Config` error
/// that says so, and a plain `redis://` URL that names a cluster node is one that names the
/// cluster URL form.
#[tokio::test]
async fn cluster_and_single_server_urls_are_not_mixed_up() {
    let single = std::env::var("BGTASK_REDIS_URL").unwrap_or("redis://127.0.0.1:6379".into());
    let hostport = single
        .split("://")
        .nth(1)
        .and_then(|rest| rest.rsplit('@').next())
        .map(|rest| rest.trim_end_matches('/').to_owned())
        .unwrap();
    refused(
        &format!("redis+cluster://{hostport}"),
        "not in cluster mode",
    )
    .await;
    let cluster = cluster_url();
    let node = cluster
        .trim_start_matches("redis+cluster://")
        .split(',')
        .next()
        .unwrap();
    refused(&format!("redis://{node}"), "redis+cluster://").await;
}

/// Connecting to `url` is a `Config` error whose message contains `says`.
async fn refused(url: &str, says: &str) {
    let e = RedisBroker::connect(url).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config, "{url}: {e}");
    assert!(e.to_string().contains(says), "{url}: {e}");
}
