//! Resource bounds: a creator with 100,000 tasks in flight, and a worker flooded with tasks it
//! never takes, keep bounded memory.

use std::sync::Arc;
use std::time::Duration;

use bgtask_core::{
    Client, ClientConfig, DynBroker, MemoryBroker, SubmitOptions, Worker, WorkerConfig,
};
use serde_json::json;

/// Resident memory of this process, in bytes (Linux).
fn resident() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_thousand_tasks_in_flight_and_a_flooded_worker_stay_bounded() {
    const TASKS: usize = 100_000;
    let broker: DynBroker = Arc::new(MemoryBroker::new());
    // A worker that never takes anything: its offers subscription fills up and then drops
    // (with a gap), instead of growing. The creator's offers to it never time out, so every task
    // stays in flight on the creator, with its offer (and the bytes kept to offer it again).
    let idle_worker = Worker::new(broker.clone(), WorkerConfig::for_tasks(["flood"]))
        .await
        .unwrap();
    let config = ClientConfig {
        offer_timeout: Duration::from_secs(600),
        ..ClientConfig::default()
    };
    let client = Client::new(broker.clone(), config).await.unwrap();
    let before = resident();
    let mut handles = Vec::with_capacity(TASKS);
    for n in 0..TASKS {
        let options = SubmitOptions::new().timeout(Duration::from_secs(600));
        handles.push(
            client
                .submit_with("flood", &json!({ "n": n }), options)
                .await
                .unwrap(),
        );
    }
    let grown = resident().saturating_sub(before);
    let per_task = grown / TASKS as u64;
    eprintln!(
        "{TASKS} tasks in flight, worker flooded: resident memory grew {} MiB ({per_task} bytes per task, \
         including the worker's full subscription buffer)",
        grown >> 20
    );
    // The bound documented in docs/reliability.md: under 2 KiB per pending task plus the
    // worker's subscription buffer (65,536 messages of ~250 bytes here).
    assert!(
        grown < (TASKS as u64) * 2048 + 65_536 * 1024,
        "memory grew {grown} bytes"
    );
    drop(handles);
    drop(idle_worker);
}
