//! What the server keeps: after many tasks, records for tasks in flight only (issue: stale lease
//! and claim records). On a private nats-server of its own, so the count is this test's alone.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bgtask_core::{Client, ClientConfig, DynBroker, KeyLimit, Worker, WorkerConfig};
use bgtask_nats::NatsConfig;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::time::{sleep, Instant};

use common::{connect, PrivateServer};

/// Messages stored in `stream` now.
async fn stored(raw: &async_nats::Client, stream: &str) -> u64 {
    let reply = raw
        .request(format!("$JS.API.STREAM.INFO.{stream}"), "".into())
        .await
        .expect("stream info");
    let info: Value = serde_json::from_slice(&reply.payload).expect("JSON");
    info["state"]["messages"].as_u64().expect("state.messages")
}

/// 10,000 keyed tasks through one worker: every limit lease goes with its task, every claim
/// record soon after its claim is over, so the streams end up holding the live worker's
/// presence record and the clock records only, not a record per task until max_age.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_ten_thousand_tasks_only_live_records_stay() {
    const TASKS: usize = 10_000;
    let server = PrivateServer::start(&[]);
    let broker: DynBroker = Arc::new(connect(NatsConfig::new(server.url(None))).await);
    let raw = async_nats::connect(server.url(None))
        .await
        .expect("raw client");
    let worker = Worker::new(
        broker.clone(),
        WorkerConfig {
            tasks: vec!["echo".into()],
            ..WorkerConfig::default()
        },
    )
    .await
    .unwrap();
    let shutdown = worker.shutdown_handle();
    let serving = tokio::spawn(worker.run(64, |task| async move { Ok(task.json()) }));
    let client = Client::new(
        broker.clone(),
        ClientConfig {
            task_key: Some("user".into()),
            per_key_limit: KeyLimit::Max(5),
            default_timeout: Duration::from_secs(2),
            ..ClientConfig::default()
        },
    )
    .await
    .unwrap();
    let failed = futures::stream::iter(0..TASKS)
        .map(|n| {
            let client = client.clone();
            async move {
                let payload = json!({"user": format!("u{}", n % 500), "n": n});
                match client.submit("echo", &payload).await {
                    Ok(handle) => handle.reply().await.is_err(),
                    Err(_) => true,
                }
            }
        })
        .buffer_unordered(128)
        .filter(|failed| futures::future::ready(*failed))
        .count()
        .await;
    assert_eq!(failed, 0, "every task succeeded");

    // Claims live for the task's time left plus the claim margin (1 s): within a few seconds of
    // the last task, the sweepers have deleted every record that is over.
    let leases_left = |n: u64| n <= 2; // the worker's presence record and the lease clock
    let claims_left = |n: u64| n <= 1; // the claim clock
    let deadline = Instant::now() + Duration::from_secs(15);
    let (mut leases, mut claims) = (u64::MAX, u64::MAX);
    while Instant::now() < deadline {
        leases = stored(&raw, "BGTASK_LEASES").await;
        claims = stored(&raw, "BGTASK_LEASES_CLAIMS").await;
        if leases_left(leases) && claims_left(claims) {
            break;
        }
        sleep(Duration::from_millis(250)).await;
    }
    eprintln!("after {TASKS} tasks: {leases} lease records, {claims} claim records");
    assert!(leases_left(leases), "{leases} lease records stayed");
    assert!(claims_left(claims), "{claims} claim records stayed");
    shutdown.shutdown();
    serving.await.unwrap().unwrap();
}
