//! The shared conformance suite, and the replica settings, on a NATS cluster:
//! `BGTASK_NATS_CLUSTER_URL` (several URLs, comma-separated; `scripts/nats-cluster up` starts a
//! local 3-node cluster and prints it). There is no default: unset, every test here fails saying
//! how to start the cluster.
//!
//! The fault-proxy scenarios do not apply (the factory has no `server_addr`): the proxy stands
//! in front of one server, but a cluster client learns the other nodes from the server's `INFO`
//! (`connect_urls`) and reconnects to them around the proxy, so its cuts would not cut it off.
//! Node faults on a cluster (a node killed or stopped under load) are `cluster_faults.rs`.

mod common;

use std::sync::Arc;

use async_trait::async_trait;
use bgtask_conformance::BrokerFactory;
use bgtask_core::{DynBroker, ErrorKind};
use bgtask_nats::{NatsBroker, NatsConfig};

/// Brokers on the test cluster, with the default settings (3 replicas for the lease and claim
/// streams where the server keeps them exclusive).
///
/// All the brokers of one scenario connect to the same node, picked at random per scenario (its
/// URL alone; they learn the others from it), while the streams live wherever JetStream put
/// them. Not spread over nodes: a subscription reaches the other nodes asynchronously (see the
/// crate docs, "Channels"), and `subscription_is_active_on_return`, which publishes from a
/// second broker the instant `subscribe` returns, then loses a message now and then (once in a
/// full run on 2.9.10; 2 of 7 runs on 2.15.1). Brokers on different nodes are exercised by
/// `cluster_faults.rs`, where the clients move to other nodes.
pub struct ClusterFactory {
    node: String,
}

impl ClusterFactory {
    /// Brokers on one node of the cluster, picked at random.
    pub fn new() -> Self {
        let url = common::cluster_url();
        // A query (`?replicas=N`) ends the list; it applies to whichever node is picked.
        let (list, query) = url.split_once('?').unwrap_or((&url, ""));
        let nodes: Vec<&str> = list.split(',').map(str::trim).collect();
        let mut node = nodes[rand::random::<u64>() as usize % nodes.len()].to_owned();
        if !query.is_empty() {
            node = format!("{node}?{query}");
        }
        ClusterFactory { node }
    }
}

impl Default for ClusterFactory {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl BrokerFactory for ClusterFactory {
    async fn broker(&self) -> DynBroker {
        Arc::new(common::connect_cluster(NatsConfig::new(&self.node)).await)
    }
}

bgtask_conformance::conformance_suite!(ClusterFactory::new());

/// On a cluster of 3, the lease and claim streams have 3 replicas by default where the server
/// keeps compare-and-set writes exclusive on replicated streams (2.10.19+), else 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_replicas_follow_the_cluster_and_the_server() {
    let broker = common::cluster_broker().await;
    let expected = if broker.replicated_streams_supported() {
        3
    } else {
        1
    };
    eprintln!(
        "nats-server {}: lease and claim streams with {expected} replicas",
        broker.server_version()
    );
    assert_eq!(broker.stream_replicas(), (expected, expected));
}

/// A stream name and a subject prefix of one test's own (the default streams capture the
/// default prefix's subjects).
fn own_streams() -> (String, String) {
    let id = &bgtask_core::names::random_id()[..12];
    (format!("BGTASK_TEST_{id}"), format!("r{id}"))
}

/// Asking for more replicas than the cluster can place (or, on a server before 2.10.19, for
/// replicated streams at all) is a clear `Config` error naming the stream or the server, the
/// replicas and the fix, and creates nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_the_cluster_cannot_keep_are_a_config_error() {
    let (stream, prefix) = own_streams();
    let probe = common::cluster_broker().await;
    let config = NatsConfig::new(common::cluster_url())
        .with_lease_stream(&stream)
        .with_subject_prefix(prefix)
        .with_replicas(5);
    let expected: &[&str] = if probe.replicated_streams_supported() {
        &[
            "needs 5 replicas",
            "cluster of 3 servers",
            "replicas=1",
            &stream,
        ]
    } else {
        &[
            "replicas=5",
            "does not keep compare-and-set writes exclusive",
            "replicas=1",
            "2.10.19",
        ]
    };
    common::assert_config_error(config, expected).await;
}

/// On a server before 2.10.19, an existing lease stream with 3 replicas (made by hand) is refused
/// with a `Config` error that says why: its leases would not be exclusive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_replicated_stream_needs_a_recent_server() {
    let probe = common::cluster_broker().await;
    if probe.replicated_streams_supported() {
        eprintln!(
            "nats-server {} keeps replicated streams exclusive: nothing to refuse",
            probe.server_version()
        );
        return;
    }
    let (stream, prefix) = own_streams();
    let raw = raw_client().await;
    let config = serde_json::json!({
        "name": stream, "subjects": [format!("{prefix}.lease.*"), format!("{prefix}.clock")],
        "max_msgs_per_subject": 1, "retention": "limits", "storage": "file", "num_replicas": 3,
    });
    let reply = js(&raw, format!("$JS.API.STREAM.CREATE.{stream}"), config).await;
    assert!(reply.get("error").is_none(), "{reply}");
    let err = NatsBroker::connect_with(
        NatsConfig::new(common::cluster_url())
            .with_lease_stream(&stream)
            .with_subject_prefix(prefix),
    )
    .await
    .unwrap_err();
    delete_streams(&raw, &stream).await;
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    let shown = err.to_string();
    for part in ["has 3 replicas", "#4320", &stream] {
        assert!(shown.contains(part), "{part:?} missing from: {shown}");
    }
}

/// A plain client on the cluster's first node.
async fn raw_client() -> async_nats::Client {
    let url = common::cluster_url();
    let first = url.split(',').next().unwrap_or(&url).to_owned();
    async_nats::connect(first).await.unwrap()
}

/// One JetStream API request, with its JSON answer.
async fn js(
    raw: &async_nats::Client,
    subject: String,
    body: serde_json::Value,
) -> serde_json::Value {
    let body = if body.is_null() {
        Vec::new()
    } else {
        body.to_string().into_bytes()
    };
    let reply = raw.request(subject, body.into()).await.unwrap();
    serde_json::from_slice(&reply.payload).unwrap()
}

/// Delete a test's lease stream and its claim stream, where they exist.
async fn delete_streams(raw: &async_nats::Client, stream: &str) {
    for name in [stream.to_owned(), format!("{stream}_CLAIMS")] {
        let reply = js(
            raw,
            format!("$JS.API.STREAM.DELETE.{name}"),
            serde_json::Value::Null,
        )
        .await;
        let gone = reply["success"] == serde_json::json!(true)
            || reply["error"]["err_code"] == serde_json::json!(10059);
        assert!(gone, "{reply}");
    }
}

/// `?replicas=1` in the URL creates the streams with one replica; a broker with the default
/// settings then uses them as they are (it does not change their replicas).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_in_the_url_and_existing_streams() {
    let (stream, prefix) = own_streams();
    let one = NatsConfig::new(format!("{}?replicas=1", common::cluster_url()))
        .with_lease_stream(&stream)
        .with_subject_prefix(&prefix);
    let broker = common::connect_cluster(one).await;
    assert_eq!(broker.stream_replicas(), (1, 1));
    let again = common::connect_cluster(
        NatsConfig::new(common::cluster_url())
            .with_lease_stream(&stream)
            .with_subject_prefix(prefix),
    )
    .await;
    assert_eq!(again.stream_replicas(), (1, 1));
    // Leases and claims work across both brokers.
    use bgtask_core::{Broker, LeaseRequest};
    let request = LeaseRequest::new(std::time::Duration::from_secs(30)).cap(1);
    assert!(broker
        .acquire("k", request.clone())
        .await
        .unwrap()
        .lease
        .is_some());
    assert!(again.acquire("k", request).await.unwrap().lease.is_none());
    assert!(again
        .claim("c", std::time::Duration::from_secs(30))
        .await
        .unwrap());
    assert!(!broker
        .claim("c", std::time::Duration::from_secs(30))
        .await
        .unwrap());
    // The test's streams go; the default ones stay for the other tests.
    delete_streams(&raw_client().await, &stream).await;
}
