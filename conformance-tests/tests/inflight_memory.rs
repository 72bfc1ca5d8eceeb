//! What a creator holds per keyed task in flight: the heap bytes allocated by submitting
//! keyed tasks that a worker has accepted and not yet completed, divided by their number, with
//! a heap profiler (`dhat`) as the global allocator (bytes asked for, before the allocator's
//! rounding). The target is under 1 KiB per task, the caller's `TaskHandle` included.
//!
//! One test in its own binary: the profiler counts the whole process. The broker is the
//! embedded one, whose record of each task's limit lease (which Redis, NATS and PostgreSQL keep
//! on the server) is measured on its own and taken off.

use std::sync::Arc;
use std::time::Duration;

use bgtask_conformance::RawWorker;
use bgtask_core::{Client, ClientConfig, DynBroker, KeyLimit, MemoryBroker, Namespace};
use serde_json::json;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

/// Tasks in flight at once.
const TASKS: usize = 5_000;
/// The most heap bytes a keyed task in flight may hold at its creator.
const BUDGET: usize = 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_task_in_flight_holds_under_1_kib() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let broker: DynBroker = Arc::new(MemoryBroker::new());
    let namespace = "inflight-memory";
    let concurrency = u64::try_from(TASKS).unwrap();
    let mut worker = RawWorker::announce_on(
        broker.clone(),
        Namespace::new(namespace).unwrap(),
        &["echo"],
        concurrency,
        Duration::from_secs(600),
    )
    .await;
    let config = ClientConfig {
        namespace: namespace.into(),
        task_key: Some("user".into()),
        per_key_limit: KeyLimit::Max(5),
        default_timeout: Duration::from_secs(600),
        ..ClientConfig::default()
    };
    let client = Client::new(broker, config).await.unwrap();
    // The payloads are made before counting: they are the caller's, not the creator's.
    let payloads: Vec<_> = (0..TASKS)
        .map(|i| json!({"user": format!("user-{i}"), "data": "x".repeat(100)}))
        .collect();
    let before = dhat::HeapStats::get().curr_bytes;

    let mut handles = Vec::with_capacity(TASKS);
    for payload in &payloads {
        handles.push(client.submit("echo", payload).await.unwrap());
    }
    for _ in 0..TASKS {
        let offer = worker
            .next_offer(Duration::from_secs(10))
            .await
            .expect("every task is offered");
        worker.answer(&offer, "accepted", json!({})).await;
    }
    // Let the client read every answer (an accepted offer frees the task's kept bytes): until
    // the heap stops shrinking.
    let mut held = usize::MAX;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = dhat::HeapStats::get().curr_bytes.saturating_sub(before);
        if now == held {
            break;
        }
        held = now;
    }
    let per_task = held / TASKS;
    let leases = lease_bytes(namespace).await;
    let creator = per_task.saturating_sub(leases);
    println!(
        "{TASKS} keyed tasks in flight: {per_task} heap bytes per task, of which {leases} are the \
         embedded broker's limit lease and {creator} the creator's (its handle included)"
    );
    assert!(
        creator < BUDGET,
        "a keyed task in flight holds {creator} bytes at its creator (budget {BUDGET})"
    );
    drop(handles);
}

/// Heap bytes per lease that the embedded broker holds for leases like a keyed task's.
async fn lease_bytes(namespace: &str) -> usize {
    let broker = MemoryBroker::new();
    let ns = Namespace::new(namespace).unwrap();
    let before = dhat::HeapStats::get().curr_bytes;
    for i in 0..TASKS {
        let id = bgtask_core::names::random_id();
        let request = bgtask_core::LeaseRequest::new(Duration::from_secs(600))
            .cap(5)
            .note(id.clone())
            .id(bgtask_core::LeaseId::new(id));
        use bgtask_core::Broker;
        let key = ns.limit_key("echo", &format!("user-{i}"));
        broker.acquire(&key, request).await.unwrap();
    }
    dhat::HeapStats::get().curr_bytes.saturating_sub(before) / TASKS
}
