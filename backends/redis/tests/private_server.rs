//! Tests that need a Redis of their own, because they change server state that the shared test
//! server must keep: they start a throwaway `redis-server` (which must be on `PATH`) on a free
//! port. Ignored by default; run with
//! `cargo test -p bgtask-redis --test private_server -- --ignored`.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bgtask_core::{Broker, Incoming, LeaseRequest, Published};
use bgtask_redis::RedisBroker;
use bgtask_redis::RedisConfig;
use bytes::Bytes;
use futures::StreamExt;

/// A `redis-server` started for one test, killed when dropped.
struct PrivateServer {
    child: Child,
    port: u16,
}

impl PrivateServer {
    fn start() -> PrivateServer {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        Self::start_on(port)
    }

    fn start_on(port: u16) -> PrivateServer {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server (is it on PATH?): {e}"));
        PrivateServer { child, port }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn broker(&self) -> RedisBroker {
        for _ in 0..100 {
            if let Ok(broker) = RedisBroker::connect(&self.url()).await {
                return broker;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the private redis-server did not start");
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// After the server forgets its scripts (as after a restart), leases keep working:
/// `redis::Script` reloads the script on `NOSCRIPT`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts a private redis-server, which must be on PATH"]
async fn lease_script_survives_script_flush() {
    let server = PrivateServer::start();
    let broker = server.broker().await;
    let request = || LeaseRequest::new(Duration::from_secs(10)).cap(2);
    assert!(broker
        .acquire("k", request())
        .await
        .unwrap()
        .lease
        .is_some());
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    let acquired = broker.acquire("k", request()).await.unwrap();
    assert!(acquired.lease.is_some());
    assert_eq!(acquired.live, 2);
    assert_eq!(broker.count("k").await.unwrap(), 2);
}

/// A server restart (all state lost, scripts included) looks like an outage: subscriptions come
/// back with a gap, and leases work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts a private redis-server, which must be on PATH"]
async fn server_restart_is_survived() {
    let server = PrivateServer::start();
    let port = server.port;
    drop(server.broker().await); // wait until it accepts connections
    let config = RedisConfig::new(server.url())
        .with_op_timeout(Duration::from_secs(1))
        .with_ping_interval(Duration::from_secs(1))
        .with_max_backoff(Duration::from_millis(500));
    let broker = RedisBroker::connect_with(config).await.unwrap();
    let mut sub = broker.subscribe("ch").await.unwrap();
    broker
        .acquire("k", LeaseRequest::new(Duration::from_secs(60)))
        .await
        .unwrap();
    drop(server);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _restarted = PrivateServer::start_on(port);
    let next = tokio::time::timeout(Duration::from_secs(10), sub.next()).await;
    assert_eq!(next.unwrap(), Some(Incoming::Gap));
    assert_eq!(
        broker
            .publish("ch", Bytes::from_static(b"back"))
            .await
            .unwrap(),
        Published::Receivers(1)
    );
    let next = tokio::time::timeout(Duration::from_secs(5), sub.next()).await;
    assert_eq!(
        next.unwrap(),
        Some(Incoming::Message(Bytes::from_static(b"back")))
    );
    // The restarted server has no leases and no script; both come back.
    assert_eq!(broker.count("k").await.unwrap(), 0);
    let acquired = broker
        .acquire("k", LeaseRequest::new(Duration::from_secs(5)).cap(1))
        .await
        .unwrap();
    assert!(acquired.lease.is_some());
}
