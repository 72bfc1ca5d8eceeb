//! The task protocol on Redis leaves nothing behind that never expires.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bgtask_core::{
    Client, ClientConfig, DynBroker, ErrorKind, KeyLimit, SubmitOptions, Worker, WorkerConfig,
};
use futures::StreamExt;
use serde_json::json;

/// 1,000 tasks over 10 workers, half of them timed out on purpose (their replies arrive late),
/// with task keys, limits and blacklist reports: afterwards every key of the namespace carries
/// a TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_tasks_half_timed_out_leave_no_key_without_ttl() {
    let namespace = format!("t{}", &bgtask_core::names::random_id()[..16]);
    let mut shutdowns = Vec::new();
    for _ in 0..10 {
        let broker: DynBroker = Arc::new(common::broker().await);
        let config = WorkerConfig {
            namespace: namespace.clone(),
            ..WorkerConfig::for_tasks(["job"])
        };
        let worker = Worker::new(broker, config).await.unwrap();
        shutdowns.push(worker.shutdown_handle());
        tokio::spawn(worker.run(64, |task| async move {
            let n = task.json()["n"].as_u64().unwrap();
            if n.is_multiple_of(50) {
                task.report_bad_key("test report").await?;
            }
            if n % 2 == 1 {
                // Past the creator's 300 ms timeout: the reply arrives late and is dropped.
                tokio::time::sleep(Duration::from_millis(600)).await;
            }
            Ok(json!({"n": n}))
        }));
    }
    let broker: DynBroker = Arc::new(common::broker().await);
    let client = Client::new(
        broker,
        ClientConfig {
            namespace: namespace.clone(),
            task_key: Some("user".into()),
            per_key_limit: KeyLimit::Max(1000),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let outcomes = futures::stream::iter(0..1000u64)
        .map(|n| {
            let client = client.clone();
            async move {
                let options = SubmitOptions::new().timeout(Duration::from_millis(300));
                let payload = json!({"n": n, "user": format!("u{}", n % 20)});
                let handle = client.submit_with("job", &payload, options).await.unwrap();
                handle.reply().await.map(|_| ()).map_err(|e| e.kind())
            }
        })
        .buffer_unordered(100)
        .collect::<Vec<_>>()
        .await;
    let timed_out = outcomes
        .iter()
        .filter(|o| **o == Err(ErrorKind::TimedOut))
        .count();
    assert!(timed_out >= 500, "{timed_out} timed out");
    // Let the late replies arrive and be dropped.
    tokio::time::sleep(Duration::from_millis(800)).await;
    for s in &shutdowns {
        s.shutdown();
    }

    let mut redis = common::raw().await;
    let mut keys: Vec<Vec<u8>> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("*{namespace}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut redis)
            .await
            .unwrap();
        keys.extend(batch);
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    assert!(
        !keys.is_empty(),
        "the run left no keys at all: the scan pattern is wrong"
    );
    let mut longest = 0i64;
    for key in &keys {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut redis)
            .await
            .unwrap();
        // PTTL: -1 means no expiry, -2 that the key is gone, and 0 that it
        // expires within the millisecond.
        assert!(
            ttl != -1,
            "key {} has no expiry (PTTL {ttl})",
            String::from_utf8_lossy(key)
        );
        longest = longest.max(ttl);
    }
    eprintln!(
        "{timed_out} of 1000 tasks timed out; {} keys left in the namespace, every one with a TTL (longest {longest} ms)",
        keys.len()
    );
}
