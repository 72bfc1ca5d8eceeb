//! Node failures of a Redis Cluster under load, each on a private cluster of its own (6 nodes:
//! 3 masters, 3 replicas, started by `scripts/redis-cluster` from the installed `redis-server`):
//! 10,000 keyed tasks at 500 per second while one master is killed (`kill -9`, its replica takes
//! over) or paused (`SIGSTOP` for 10 s, then `SIGCONT`). Every task ends once, none after its
//! deadline, none runs twice, no lease is left, and the task rate is back to 80 % of what it was
//! within 10 s of the fault.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bgtask_conformance::scenarios::faults::{under_load, LoadReport};
use bgtask_conformance::{BrokerFactory, Harness};
use bgtask_core::{DynBroker, Error, ErrorKind, Result};
use bgtask_redis::{RedisBroker, RedisConfig};

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

    /// (pid, port) of every master.
    fn masters(&self) -> Vec<(u32, u16)> {
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
                (role == "master").then(|| (pid.parse().unwrap(), port.parse().unwrap()))
            })
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

    fn server_addr(&self) -> Option<SocketAddr> {
        None
    }

    async fn broker_via(&self, _addr: SocketAddr) -> Result<DynBroker> {
        Err(Error::new(ErrorKind::Unsupported, "no proxy for a cluster"))
    }
}

/// Run the load on `cluster` with `fault` (given the first master's pid) from 5 s in.
async fn fault_under_load<F, Fut>(name: &str, cluster: &PrivateCluster, fault: F) -> LoadReport
where
    F: FnOnce(u32) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    // RUST_LOG=bgtask_redis=debug shows what the brokers saw.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let (pid, port) = cluster.masters()[0];
    eprintln!("{name}: the fault hits the master on port {port} (pid {pid})");
    let (tx, rx) = tokio::sync::oneshot::channel();
    bgtask_conformance::run(
        name,
        Factory(cluster.url.clone()),
        |h: Harness| async move {
            let workers = vec![h.broker().await, h.broker().await];
            let creator = h.broker().await;
            let report = under_load(&h, workers, creator, move || fault(pid)).await;
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
    report
}

fn check(report: &LoadReport) {
    report.check();
    let back = report.throughput_back(0.8);
    assert!(
        back.is_some_and(|back| back <= Duration::from_secs(10)),
        "the task rate was not back to 80 % within 10 s of the fault: {report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_under_load() {
    let cluster = PrivateCluster::up("kill");
    let report = fault_under_load("a_master_killed_under_load", &cluster, |pid| async move {
        signal(pid, "-KILL");
    })
    .await;
    check(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_paused_10s_under_load() {
    let cluster = PrivateCluster::up("pause");
    let report = fault_under_load(
        "a_master_paused_10s_under_load",
        &cluster,
        |pid| async move {
            signal(pid, "-STOP");
            tokio::time::sleep(Duration::from_secs(10)).await;
            signal(pid, "-CONT");
        },
    )
    .await;
    check(&report);
}
