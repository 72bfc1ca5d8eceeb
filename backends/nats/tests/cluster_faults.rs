//! A node of a NATS cluster fails under load: 10,000 keyed tasks at 300/s from one creator to two
//! workers (256 at a time each), while a node is killed (`kill -9`) or stopped (`SIGSTOP`) for 10 s.
//! Each test starts a private 3-node cluster with `scripts/nats-cluster` (in a directory of its
//! own, on free loopback ports) and brings it down at the end; the shared servers are never
//! touched.
//!
//! The runner is the shared [`under_load`] (the Redis Cluster's node faults use it too); run
//! with `--nocapture` to see the figures (docs/reliability.md has them).
//!
//! On nats-server before 2.10.19 the lease and claim streams have one replica (see the crate
//! docs, "Replicas and clusters"), so they live on one node: the tests say which node they
//! fault, one that holds neither stream or the one that holds the lease stream.

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bgtask_conformance::scenarios::faults::under_load;
use bgtask_conformance::BrokerFactory;
use bgtask_core::DynBroker;
use bgtask_nats::{NatsBroker, NatsConfig};

use common::{short, PrivateCluster};

/// Brokers on `url` with ~1 s timeouts, pings and backoff, so a dead or stopped node is left
/// within seconds.
struct Cluster {
    url: String,
}

#[async_trait]
impl BrokerFactory for Cluster {
    /// Tries for up to 10 s: on a loaded machine a cluster that has just started can take
    /// longer than the short connect timeout to answer (seen in CI once).
    async fn broker(&self) -> DynBroker {
        let mut tries = 0;
        loop {
            match NatsBroker::connect_with(short(NatsConfig::new(&self.url))).await {
                Ok(broker) => return Arc::new(broker),
                Err(_) if tries < 9 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("cannot reach the private cluster at {}: {e}", self.url),
            }
        }
    }
}

/// Which node (1 to 3) leads `stream`, asked through the node at `url`, by the server name
/// `bgtask-n<N>` the script gives.
async fn stream_node(url: &str, stream: &str) -> usize {
    let raw = async_nats::connect(url)
        .await
        .expect("connect to the cluster");
    let reply = raw
        .request(format!("$JS.API.STREAM.INFO.{stream}"), "".into())
        .await
        .expect("stream info");
    let info: serde_json::Value = serde_json::from_slice(&reply.payload).expect("JSON");
    let leader = info["cluster"]["leader"].as_str().unwrap_or_default();
    leader
        .strip_prefix("bgtask-n")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no leader for {stream}: {info}"))
}

/// A private cluster with the default lease and claim streams created (by a first broker), and
/// which node leads the lease stream and the claim stream.
async fn cluster_with_streams() -> (PrivateCluster, usize, usize) {
    let (cluster, leases, claims, _) = cluster_with_replicas().await;
    (cluster, leases, claims)
}

/// [`cluster_with_streams`], with the lease stream's replicas.
async fn cluster_with_replicas() -> (PrivateCluster, usize, usize, u32) {
    let cluster = PrivateCluster::start();
    let broker = common::connect_cluster(NatsConfig::new(&cluster.url)).await;
    let replicas = broker.stream_replicas();
    eprintln!(
        "nats-server {}: lease and claim streams with {replicas:?} replicas",
        broker.server_version(),
    );
    let leases = stream_node(&cluster.node_url(1), bgtask_nats::DEFAULT_LEASE_STREAM).await;
    let claims = stream_node(&cluster.node_url(1), broker.claim_stream()).await;
    broker.close();
    (cluster, leases, claims, replicas.0)
}

/// Run the load with its worker and creator connected to node `node` (listed alone in their
/// URL: they learn the other nodes from it and move to them when it fails), run `fault`, and
/// print and check the report ([`LoadReport::check`]) and the recovery: the task rate back to
/// 80 % (for 3 s in a row) within 10 s of the fault's beginning, or of its end when
/// `from_end` (a fault that includes a restart).
///
/// [`LoadReport::check`]: bgtask_conformance::scenarios::faults::LoadReport::check
async fn run_load<F, Fut>(
    name: &'static str,
    cluster: PrivateCluster,
    node: usize,
    from_end: bool,
    fault: F,
) where
    F: FnOnce(Arc<PrivateCluster>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let cluster = Arc::new(cluster);
    let faulted = cluster.clone();
    let fault = move || fault(faulted);
    let node_url = cluster.node_url(node);
    // The final lease count goes through the whole cluster's URL.
    let factory = Cluster {
        url: cluster.url.clone(),
    };
    bgtask_conformance::run(name, factory, move |h| async move {
        let on_node = Cluster { url: node_url };
        // Two workers, as in the other load scenarios: one worker of the tests' unoptimized
        // build serves about 500-800 tasks/s on NATS, too close to the 500/s offered. And 300
        // tasks/s, not 500: with three servers, the test and its workers on two cores, keyed
        // tasks on 50 key values settled at 300-450/s after a fault, so the 80 % bar failed in
        // 2 of 4 runs of `stop_a_node_for_10s_under_load` on 2026-12-05, for this build and the
        // one before alike.
        let workers = vec![on_node.broker().await, on_node.broker().await];
        let creator = on_node.broker().await;
        let report = under_load(&h, 300, workers, creator, fault).await;
        let back = report.throughput_back(0.8);
        let length = report.fault.1.saturating_sub(report.fault.0);
        let back_after_end = back.map(|b| b.saturating_sub(length));
        eprintln!("{name}: {report}");
        eprintln!(
            "{name}: {:.0} replies/s before the fault; back to 80 % {back:?} after it began \
             ({back_after_end:?} after it ended, {length:?} later)",
            report.rate_before()
        );
        report.check();
        let counted = if from_end { back_after_end } else { back };
        assert!(
            counted.is_some_and(|b| b <= Duration::from_secs(10)),
            "the task rate was not back to 80 % within 10 s of the fault's {}: {report}",
            if from_end { "end" } else { "beginning" }
        );
    })
    .await;
}

/// `kill -9` a node that holds neither stream, the one the worker and the client are connected
/// to: they reconnect to the others, and the task rate is back to 80 % within 10 s of the kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_a_node_under_load() {
    let (cluster, leases, claims) = cluster_with_streams().await;
    let node = (1..=3).find(|n| *n != leases && *n != claims).unwrap_or(1);
    eprintln!("streams on nodes {leases} (leases) and {claims} (claims); killing node {node}");
    run_load(
        "kill_a_node_under_load",
        cluster,
        node,
        false,
        move |cluster| async move { cluster.kill(node) },
    )
    .await;
}

/// `kill -9` the node that leads the lease stream. With one replica (servers before 2.10.19) the
/// stream has no other copy: the node is started again 5 s later, meanwhile admissions fail with
/// clear errors, and the task rate is back to 80 % within 10 s of the restart. With 3 replicas
/// nobody restarts it: JetStream elects another leader, and the rate is back within 10 s of the
/// kill. Either way none ends past its deadline, none runs twice, no lease is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_the_lease_stream_node_under_load() {
    let (cluster, leases, claims, replicas) = cluster_with_replicas().await;
    let restart = replicas < 3;
    eprintln!(
        "streams on nodes {leases} (leases) and {claims} (claims); killing node {leases}{}",
        if restart {
            ", restarting it after 5 s"
        } else {
            " for good (3 replicas)"
        }
    );
    run_load(
        "kill_the_lease_stream_node_under_load",
        cluster,
        leases,
        restart,
        move |cluster| async move {
            cluster.kill(leases);
            if restart {
                tokio::time::sleep(Duration::from_secs(5)).await;
                tokio::task::spawn_blocking(move || cluster.restart(leases))
                    .await
                    .expect("restart the node");
            }
        },
    )
    .await;
}

/// SIGSTOP for 10 s the node the worker and the client are connected to (one that holds neither
/// stream), then SIGCONT: they leave it once pings go unanswered and carry on through the others;
/// the task rate is back to 80 % within 10 s of the SIGSTOP (the clients' move takes about 4 s).
/// This needs the servers to drop a hung peer soon, as `scripts/nats-cluster` sets them
/// (`ping_interval` 1 s, `ping_max` 3, `write_deadline` 2 s): with nats-server's defaults the
/// others keep their routes to the stopped node for minutes, and the SIGCONT stalled the task
/// traffic for about 6 s in 2 runs of 3 (docs/reliability.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_a_node_for_10s_under_load() {
    let (cluster, leases, claims) = cluster_with_streams().await;
    let node = (1..=3).find(|n| *n != leases && *n != claims).unwrap_or(1);
    eprintln!(
        "streams on nodes {leases} (leases) and {claims} (claims); stopping node {node} for 10 s"
    );
    run_load(
        "stop_a_node_for_10s_under_load",
        cluster,
        node,
        false,
        move |cluster| async move {
            cluster.stop(node);
            tokio::time::sleep(Duration::from_secs(10)).await;
            cluster.cont(node);
        },
    )
    .await;
}
