//! Node failures of a Redis Cluster under load, each on a private cluster of its own (6 nodes:
//! 3 masters, 3 replicas, started by `scripts/redis-cluster` from the installed `redis-server`):
//! 10,000 keyed tasks at 500 per second while one master is killed (`kill -9`, its replica takes
//! over) or paused (`SIGSTOP` for 10 s, then `SIGCONT`). Every task ends once, none after its
//! deadline, none runs twice, no lease is left, and the task rate is back to 80 % of what it was
//! within 10 s of the fault.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bgtask_conformance::scenarios::faults::under_load;
use bgtask_conformance::{BrokerFactory, Harness};
use bgtask_core::{Broker, DynBroker, Incoming, LeaseRequest};
use bgtask_redis::{RedisBroker, RedisConfig};
use bytes::Bytes;
use futures::StreamExt;

/// A cluster of this test's own, stopped (exactly its processes) when dropped.
struct PrivateCluster {
    dir: PathBuf,
    url: String,
}

fn script() -> Command {
    Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../scripts/redis-cluster"
    ))
}

impl PrivateCluster {
    fn up(name: &str) -> PrivateCluster {
        let dir = std::env::temp_dir().join(format!(
            "bgtask-redis-cluster-{name}-{}",
            std::process::id()
        ));
        let out = script()
            .arg("up")
            .env("BGTASK_REDIS_CLUSTER_DIR", &dir)
            .output()
            .expect("scripts/redis-cluster runs");
        assert!(
            out.status.success(),
            "scripts/redis-cluster up failed (it needs redis-server and redis-cli 7+): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let url = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        PrivateCluster { dir, url }
    }

    /// (pid, port, role) of every node.
    fn nodes(&self) -> Vec<(u32, u16, String)> {
        let out = script()
            .arg("nodes")
            .env("BGTASK_REDIS_CLUSTER_DIR", &self.dir)
            .output()
            .unwrap();
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                let (pid, port, role) = (fields.next()?, fields.next()?, fields.next()?);
                Some((pid.parse().unwrap(), port.parse().unwrap(), role.to_owned()))
            })
            .collect()
    }

    /// (pid, port) of every master.
    fn masters(&self) -> Vec<(u32, u16)> {
        self.nodes()
            .into_iter()
            .filter(|(_, _, role)| role == "master")
            .map(|(pid, port, _)| (pid, port))
            .collect()
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let _ = script()
            .arg("down")
            .env("BGTASK_REDIS_CLUSTER_DIR", &self.dir)
            .status();
    }
}

/// `redis-cli -p port args...`, its output trimmed; panics when it fails.
fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli runs");
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        out.status.success() && !text.starts_with("ERR"),
        "redis-cli -p {port} {args:?}: {text}"
    );
    text
}

fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal} {pid}");
}

/// Brokers on a private cluster, with ~1 s bounds so a silent node is noticed quickly.
struct Factory(String);

#[async_trait]
impl BrokerFactory for Factory {
    async fn broker(&self) -> DynBroker {
        let config = RedisConfig::new(&self.0)
            .with_op_timeout(Duration::from_secs(1))
            .with_connect_timeout(Duration::from_secs(1))
            .with_liveness_interval(Duration::from_secs(1))
            .with_max_backoff(Duration::from_secs(1));
        Arc::new(RedisBroker::connect_with(config).await.unwrap())
    }
}

/// Run the load on a private cluster with `fault` (given the first master's pid) from 5 s in,
/// and check what it must leave true.
async fn fault_under_load<F, Fut>(name: &str, fault: F)
where
    F: FnOnce(u32) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    // RUST_LOG=bgtask_redis=debug shows what the brokers saw.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let cluster = PrivateCluster::up(name);
    let (pid, port) = cluster.masters()[0];
    eprintln!("{name}: the fault hits the master on port {port} (pid {pid})");
    let (tx, rx) = tokio::sync::oneshot::channel();
    bgtask_conformance::run(
        name,
        Factory(cluster.url.clone()),
        |h: Harness| async move {
            let workers = vec![h.broker().await, h.broker().await];
            let creator = h.broker().await;
            let report = under_load(&h, 500, workers, creator, move || fault(pid)).await;
            let _ = tx.send(report);
        },
    )
    .await;
    let report = rx.await.unwrap();
    eprintln!("{name}: {report}");
    eprintln!(
        "{name}: {:.0} replies/s before the fault; back to 80 % {:?} after it began",
        report.rate_before(),
        report.throughput_back(0.8)
    );
    report.check();
    let back = report.throughput_back(0.8);
    assert!(
        back.is_some_and(|back| back <= Duration::from_secs(10)),
        "the task rate was not back to 80 % within 10 s of the fault: {report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_under_load() {
    fault_under_load("a_master_killed_under_load", |pid| async move {
        signal(pid, "-KILL");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_paused_10s_under_load() {
    fault_under_load("a_master_paused_10s_under_load", |pid| async move {
        signal(pid, "-STOP");
        tokio::time::sleep(Duration::from_secs(10)).await;
        signal(pid, "-CONT");
    })
    .await;
}

/// A channel whose slot moves to another master (as a resharding does) while it is subscribed:
/// the old master ends the subscription (`sunsubscribe`), the broker subscribes again where the
/// slot lives now, the stream says messages may have been missed, and it receives again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_moved_by_resharding_is_subscribed_again() {
    let cluster = PrivateCluster::up("reshard");
    let subscriber = RedisBroker::connect(&cluster.url).await.unwrap();
    let publisher = RedisBroker::connect(&cluster.url).await.unwrap();
    let channel = format!("reshard:{}", std::process::id());
    let mut sub = subscriber.subscribe(&channel).await.unwrap();
    publisher
        .publish(&channel, Bytes::from_static(b"before"))
        .await
        .unwrap();
    assert_eq!(
        bgtask_conformance::expect_message(&mut sub).await.as_ref(),
        b"before"
    );

    // Move the channel's slot from its master to another one.
    let masters = cluster.masters();
    let any = masters[0].1;
    let slot = cli(any, &["CLUSTER", "KEYSLOT", &channel]);
    let id = |port: u16| cli(port, &["CLUSTER", "MYID"]);
    let owner = masters
        .iter()
        .map(|&(_, port)| port)
        .find(|&port| {
            cli(port, &["CLUSTER", "NODES"])
                .lines()
                .find(|line| line.contains("myself"))
                .is_some_and(|me| owns(me, slot.parse().unwrap()))
        })
        .expect("a master owns the slot");
    let target = masters
        .iter()
        .map(|&(_, port)| port)
        .find(|&p| p != owner)
        .unwrap();
    let (owner_id, target_id) = (id(owner), id(target));
    cli(
        target,
        &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &owner_id],
    );
    cli(
        owner,
        &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &target_id],
    );
    for &(_, port) in &masters {
        cli(port, &["CLUSTER", "SETSLOT", &slot, "NODE", &target_id]);
    }

    // Published until one arrives: the stream first says it may have missed messages.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut saw_gap = false;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no message after the slot moved (gap seen: {saw_gap})"
        );
        let _ = publisher
            .publish(&channel, Bytes::from_static(b"after"))
            .await;
        match tokio::time::timeout(Duration::from_millis(200), sub.next()).await {
            Ok(Some(Incoming::Gap)) => saw_gap = true,
            Ok(Some(Incoming::Message(m))) if m.as_ref() == b"after" => break,
            Ok(Some(other)) => panic!("unexpected {other:?}"),
            Ok(None) => panic!("the subscription ended"),
            Err(_) => {}
        }
    }
    assert!(
        saw_gap,
        "the subscription did not say it may have missed messages"
    );
}

/// Whether a `CLUSTER NODES` line's slot ranges include `slot`.
fn owns(line: &str, slot: u16) -> bool {
    line.split_whitespace().skip(8).any(|range| {
        let mut ends = range.split('-').map(|n| n.parse::<u16>());
        match (ends.next(), ends.next()) {
            (Some(Ok(a)), Some(Ok(b))) => (a..=b).contains(&slot),
            (Some(Ok(a)), None) => a == slot,
            _ => false,
        }
    })
}

/// Scripts gone from every node (as after a failover to a replica that never loaded them, or a
/// restart): the lease script is loaded again and the call succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_calls_survive_a_script_flush_on_every_node() {
    let cluster = PrivateCluster::up("noscript");
    let broker = RedisBroker::connect(&cluster.url).await.unwrap();
    let keys: Vec<String> = (0..20).map(|n| format!("noscript:{n}")).collect();
    for key in &keys {
        let request = LeaseRequest::new(Duration::from_secs(30)).cap(5);
        assert!(broker.acquire(key, request).await.unwrap().lease.is_some());
    }
    for (_, port, _) in cluster.nodes() {
        cli(port, &["SCRIPT", "FLUSH"]);
    }
    for key in &keys {
        let request = LeaseRequest::new(Duration::from_secs(30)).cap(5);
        let acquired = broker.acquire(key, request).await.unwrap();
        assert!(acquired.lease.is_some(), "{key}: {acquired:?}");
        assert_eq!(broker.count(key).await.unwrap(), 2, "{key}");
    }
}
