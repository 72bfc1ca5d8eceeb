//! Scale-out: worker presence and directed offers (each task offered to one worker).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bgtask_core::{ClientConfig, ErrorDetail, ErrorKind, SubmitOptions, WorkerConfig};
use bytes::Bytes;
use futures::StreamExt;
use serde_json::json;
use tokio::time::Instant;

use crate::harness::{RawWorker, WorkerGuard};
use crate::Harness;

const WAIT: Duration = Duration::from_secs(5);

/// Echo workers of `task` that record which worker ran each task.
async fn counting_workers(
    h: &Harness,
    task: &str,
    count: usize,
    concurrency: usize,
    runs: &Arc<Mutex<HashMap<String, usize>>>,
) -> Vec<WorkerGuard> {
    let mut guards = Vec::new();
    for _ in 0..count {
        let worker = h.worker(h.worker_config(&[task])).await;
        let (id, runs) = (worker.id().to_owned(), runs.clone());
        guards.push(WorkerGuard::spawn(worker, concurrency, move |task| {
            let (id, runs) = (id.clone(), runs.clone());
            async move {
                *runs.lock().unwrap().entry(id).or_default() += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
                Ok(task.json())
            }
        }));
    }
    guards
}

/// Submit `count` tasks of `task`, `in_flight` at a time, and check that every one succeeded.
async fn submit_all(client: &bgtask_core::Client, task: &str, count: u32, in_flight: usize) {
    let results = futures::stream::iter(0..count)
        .map(|n| {
            let client = client.clone();
            async move { client.submit(task, &json!({"n": n})).await?.reply().await }
        })
        .buffer_unordered(in_flight)
        .collect::<Vec<_>>()
        .await;
    let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(failed.is_empty(), "every task succeeded: {failed:?}");
}

/// A task is offered to one worker only: of four workers of its name, one receives it.
pub async fn an_offer_reaches_one_worker_only(h: Harness) {
    let mut workers = Vec::new();
    for _ in 0..4 {
        workers.push(h.worker(h.worker_config(&["one"])).await);
    }
    let client = h.client().await;
    let handle = client.submit("one", &json!({})).await.unwrap();
    // Whoever has it answers at once (so the offer does not time out and move on).
    let mut seen = 0;
    let mut running = Vec::new();
    for round in 0..2 {
        for worker in &mut workers {
            let wait = Duration::from_millis(if round == 0 { 100 } else { 300 });
            if let Ok(Some(task)) = tokio::time::timeout(wait, worker.next_task()).await {
                assert_eq!(task.id(), handle.id());
                assert!(task.is_offer());
                seen += 1;
                running.push(task.accept().await.unwrap().unwrap());
            }
        }
    }
    assert_eq!(seen, 1, "exactly one worker was offered the task");
    running
        .pop()
        .unwrap()
        .success(&json!("done"))
        .await
        .unwrap();
    assert_eq!(handle.reply().await.unwrap().json(), json!("done"));
}

/// A worker that declines (drops the offer) makes the creator offer the task to the next one
/// at once, long before the offer timeout.
pub async fn a_decline_goes_to_the_next_worker(h: Harness) {
    let mut first = h.worker(h.worker_config(&["next"])).await;
    let mut second = h.worker(h.worker_config(&["next"])).await;
    let client = h.client().await;
    let started = Instant::now();
    let handle = client.submit("next", &json!({"n": 1})).await.unwrap();
    let (task, other) = tokio::select! {
        Some(task) = first.next_task() => (task, &mut second),
        Some(task) = second.next_task() => (task, &mut first),
    };
    assert_eq!(task.id(), handle.id());
    task.decline();
    let again = tokio::time::timeout(WAIT, other.next_task())
        .await
        .expect("the other worker was offered the task")
        .unwrap();
    assert_eq!(again.id(), handle.id());
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "re-offered after a decline, not after the 1 s offer timeout: {:?}",
        started.elapsed()
    );
    again
        .accept()
        .await
        .unwrap()
        .unwrap()
        .success(&json!(2))
        .await
        .unwrap();
    assert_eq!(handle.reply().await.unwrap().json(), json!(2));
}

/// The chosen worker is gone after it announced itself (crashed, or cut off): its offer goes
/// unanswered, the task is offered to a live worker after the offer timeout, runs once, and
/// ends well before its deadline.
pub async fn an_unanswered_offer_is_offered_again(h: Harness) {
    let runs: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let _live = counting_workers(&h, "again", 1, 4, &runs).await;
    let mut dead = RawWorker::announce(&h, &["again"], 1_000, Duration::from_secs(30)).await;
    let config = ClientConfig {
        offer_timeout: Duration::from_millis(300),
        ..h.client_config()
    };
    let client = h.client_on(h.broker().await, config).await;
    // The dead worker has all the room, so it is chosen first whenever it is drawn.
    let started = Instant::now();
    let options = || SubmitOptions::new().timeout(Duration::from_secs(5));
    let mut handles = Vec::new();
    for n in 0..8 {
        handles.push(
            client
                .submit_with("again", &json!({"n": n}), options())
                .await
                .unwrap(),
        );
    }
    for handle in handles {
        handle.reply().await.unwrap();
    }
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert!(
        dead.next_offer(Duration::from_millis(100)).await.is_some(),
        "the dead worker was offered a task"
    );
    let runs = runs.lock().unwrap();
    assert_eq!(
        runs.values().sum::<usize>(),
        8,
        "each task ran once: {runs:?}"
    );
}

/// The only worker is slow to read its offers (a burst larger than it reads within the offer
/// time) but present: the creator waits for it instead of failing the task, without offering the
/// task to it twice, and gets its reply.
pub async fn a_slow_worker_keeps_its_offers(h: Harness) {
    let mut slow = RawWorker::announce(&h, &["slow"], 8, Duration::from_secs(30)).await;
    let config = ClientConfig {
        offer_timeout: Duration::from_millis(200),
        ..h.client_config()
    };
    let client = h.client_on(h.broker().await, config).await;
    let handle = client.submit("slow", &json!({"n": 1})).await.unwrap();
    // Three offer times pass before the worker reads its offers.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let offer = slow.next_offer(WAIT).await.expect("the task is offered");
    assert!(
        slow.next_offer(Duration::from_millis(100)).await.is_none(),
        "offered once"
    );
    slow.answer(
        &offer,
        "done",
        json!({"status": "success", "body": {"ok": 1}}),
    )
    .await;
    assert_eq!(handle.reply().await.unwrap().json(), json!({"ok": 1}));
}

/// When every live worker declines, the creator ends the task with `NoWorker` (detail
/// `Declined`) before its deadline, and holds its claim so no worker runs it later.
pub async fn all_declines_are_a_clear_error(h: Harness) {
    let mut workers = Vec::new();
    for _ in 0..3 {
        workers.push(h.worker(h.worker_config(&["nope"])).await);
    }
    let decliners: Vec<_> = workers
        .into_iter()
        .map(|mut worker| {
            tokio::spawn(async move {
                while let Some(task) = worker.next_task().await {
                    drop(task);
                }
            })
        })
        .collect();
    let client = h.client().await;
    let started = Instant::now();
    let options = SubmitOptions::new().timeout(Duration::from_secs(10));
    let handle = client
        .submit_with("nope", &json!({}), options)
        .await
        .unwrap();
    let id = handle.id().to_owned();
    let err = handle.reply().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NoWorker, "{err}");
    assert!(
        matches!(err.detail(), Some(ErrorDetail::Declined { workers: 3 })),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let ns = bgtask_core::Namespace::new(h.namespace()).unwrap();
    let claim = h
        .broker()
        .await
        .claim(&ns.claim_key(&id), WAIT)
        .await
        .unwrap();
    assert!(!claim, "the creator holds the claim of the refused task");
    for decliner in decliners {
        decliner.abort();
    }
}

/// A worker that stops announcing itself (a crash) leaves the creators' view within its
/// presence TTL: then a task of its name fails at once with `NoWorker`.
pub async fn presence_expires_after_a_crash(h: Harness) {
    let _crashed = RawWorker::announce(&h, &["gone"], 4, Duration::from_millis(600)).await;
    let client = h.client().await;
    let listed = bgtask_core::list_workers(
        &h.broker().await,
        &bgtask_core::Namespace::new(h.namespace()).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    tokio::time::sleep(Duration::from_millis(900)).await;
    let err = client.submit("gone", &json!({})).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NoWorker);
    let listed = bgtask_core::list_workers(
        &h.broker().await,
        &bgtask_core::Namespace::new(h.namespace()).unwrap(),
    )
    .await
    .unwrap();
    assert!(listed.is_empty(), "the presence lease expired: {listed:?}");
}

/// A worker that joins while tasks flow starts receiving offers within a second.
pub async fn a_joining_worker_gets_offers_within_a_second(h: Harness) {
    let runs: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let _first = counting_workers(&h, "join", 1, 8, &runs).await;
    let client = h.client().await;
    // Tasks flow, 16 in flight (twice the first worker's concurrency), until told to stop.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flow = {
        let (client, stop) = (client.clone(), stop.clone());
        tokio::spawn(async move {
            futures::stream::iter(0..1_000_000u32)
                .take_while(|_| {
                    let go = !stop.load(std::sync::atomic::Ordering::Relaxed);
                    async move { go }
                })
                .map(|n| {
                    let client = client.clone();
                    async move {
                        let handle = client.submit("join", &json!({"n": n})).await?;
                        handle.reply().await
                    }
                })
                .buffer_unordered(16)
                .collect::<Vec<_>>()
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let joined = Instant::now();
    let newcomer = h.worker(h.worker_config(&["join"])).await;
    let newcomer_id = newcomer.id().to_owned();
    let runs2 = runs.clone();
    let id2 = newcomer_id.clone();
    let _second = WorkerGuard::spawn(newcomer, 8, move |task| {
        let (id, runs) = (id2.clone(), runs2.clone());
        async move {
            *runs.lock().unwrap().entry(id).or_default() += 1;
            tokio::time::sleep(Duration::from_millis(2)).await;
            Ok(task.json())
        }
    });
    loop {
        if runs.lock().unwrap().get(&newcomer_id).copied().unwrap_or(0) > 0 {
            break;
        }
        assert!(
            joined.elapsed() < Duration::from_secs(1),
            "no offer reached the newcomer within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let results = flow.await.unwrap();
    assert!(results.iter().all(|r| r.is_ok()), "every task succeeded");
}

/// Tasks spread evenly: 4 workers, 400 tasks at 16 in flight; none runs more than 1.5x the mean.
pub async fn tasks_spread_evenly(h: Harness) {
    let runs: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let _workers = counting_workers(&h, "spread", 4, 4, &runs).await;
    let client = h.client().await;
    submit_all(&client, "spread", 400, 16).await;
    let runs = runs.lock().unwrap();
    assert_eq!(runs.values().sum::<usize>(), 400);
    assert_eq!(runs.len(), 4, "every worker ran tasks: {runs:?}");
    let most = *runs.values().max().unwrap();
    assert!(most as f64 <= 1.5 * 100.0, "uneven: {runs:?}");
}

/// More tasks than every worker's concurrency together: the excess waits at the creator and is
/// offered as slots free; nothing fails, nothing runs twice, and no handler runs over its limit.
pub async fn full_workers_hold_tasks_back(h: Harness) {
    let runs: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let _workers = counting_workers(&h, "full", 2, 2, &runs).await;
    let client = h.client().await;
    submit_all(&client, "full", 100, 20).await;
    assert_eq!(runs.lock().unwrap().values().sum::<usize>(), 100);
}

/// Targeted tasks are offered only to workers of that target, and a worker's presence lists
/// its tasks, targets and concurrency.
pub async fn presence_lists_workers_and_targets(h: Harness) {
    let config = WorkerConfig {
        targets: vec!["gpu".into()],
        concurrency: Some(3),
        ..h.worker_config(&["render"])
    };
    let mut special = h.worker(config).await;
    let mut general = h.worker(h.worker_config(&["render"])).await;
    let ns = bgtask_core::Namespace::new(h.namespace()).unwrap();
    let listed = bgtask_core::list_workers(&h.broker().await, &ns)
        .await
        .unwrap();
    let record = &listed
        .iter()
        .find(|w| w.record.id == special.id())
        .expect("listed")
        .record;
    assert_eq!(record.tasks, vec!["render".to_owned()]);
    assert_eq!(record.targets, vec!["gpu".to_owned()]);
    assert_eq!(record.concurrency, Some(3));
    assert_eq!(record.level, "v1");
    assert_eq!(listed.len(), 2);
    let client = h.client().await;
    for _ in 0..5 {
        let handle = client
            .submit_with("render", &json!({}), SubmitOptions::new().target("gpu"))
            .await
            .unwrap();
        let task = tokio::time::timeout(WAIT, special.next_task())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(task.id(), handle.id());
        drop(task.accept().await.unwrap());
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(200), general.next_task())
            .await
            .is_err()
    );
}

/// A worker's presence counts its running tasks per task name (a task reached only through a
/// target under `_target`), so `inspect workers` shows tasks in flight by name.
pub async fn presence_counts_running_tasks_by_name(h: Harness) {
    let config = WorkerConfig {
        targets: vec!["gpu".into()],
        heartbeat: Duration::from_millis(200),
        ..h.worker_config(&["render", "encode"])
    };
    let mut worker = h.worker(config).await;
    let client = h.client().await;
    let submits = [
        ("render", SubmitOptions::new()),
        ("render", SubmitOptions::new()),
        ("encode", SubmitOptions::new()),
        ("paint", SubmitOptions::new().target("gpu")),
    ];
    let mut handles = Vec::new();
    let mut running = Vec::new();
    for (task, options) in submits {
        handles.push(client.submit_with(task, &json!({}), options).await.unwrap());
        let offered = tokio::time::timeout(WAIT, worker.next_task())
            .await
            .unwrap()
            .unwrap();
        running.push(offered.accept().await.unwrap().expect("taken"));
    }
    let ns = bgtask_core::Namespace::new(h.namespace()).unwrap();
    let broker = h.broker().await;
    let listed_running = || async {
        let listed = bgtask_core::list_workers(&broker, &ns).await.unwrap();
        assert_eq!(listed.len(), 1, "{listed:?}");
        listed[0].record.clone()
    };
    let want: std::collections::BTreeMap<String, u64> =
        [("render", 2), ("encode", 1), ("_target", 1)]
            .into_iter()
            .map(|(t, n)| (t.to_owned(), n))
            .collect();
    let started = tokio::time::Instant::now();
    let mut record = listed_running().await;
    while record.running != want && started.elapsed() < WAIT {
        tokio::time::sleep(Duration::from_millis(50)).await;
        record = listed_running().await;
    }
    assert_eq!(record.running, want, "{record:?}");
    assert_eq!(record.in_flight, 4);
    for task in running {
        task.success(&json!({})).await.unwrap();
    }
    for handle in handles {
        handle.reply().await.unwrap();
    }
    let started = tokio::time::Instant::now();
    let mut record = listed_running().await;
    while !record.running.is_empty() && started.elapsed() < WAIT {
        tokio::time::sleep(Duration::from_millis(50)).await;
        record = listed_running().await;
    }
    assert!(record.running.is_empty(), "{record:?}");
}

/// Malformed, foreign-level, replayed and forged presence messages and answers are ignored and
/// counted; they never make a task run twice or stop a creator.
pub async fn hostile_presence_and_answers_are_ignored(h: Harness) {
    let runs: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let _workers = counting_workers(&h, "safe", 1, 4, &runs).await;
    let client = h.client().await;
    let attacker = h.broker().await;
    let ns = bgtask_core::Namespace::new(h.namespace()).unwrap();
    let garbage = [
        json!("not an object").to_string(),
        json!({"v": 1, "kind": "presence", "id": "x", "reason": "join", "body": {"id": "y", "level": "v1", "ttl_ms": 1}}).to_string(),
        json!({"v": 1, "kind": "presence", "id": "x", "reason": "join", "body": {"id": "x", "level": "v9", "ttl_ms": 99999, "tasks": ["safe"]}}).to_string(),
        json!({"v": 1, "kind": "presence", "id": "x", "reason": "dance", "body": {}}).to_string(),
        json!({"v": 2, "kind": "presence", "id": "x", "reason": "join", "body": {}}).to_string(),
    ];
    for bytes in &garbage {
        attacker
            .publish(&ns.presence_channel(), Bytes::from(bytes.clone()))
            .await
            .unwrap();
    }
    let mut spy = RawWorker::announce(&h, &["spied"], 1, Duration::from_secs(5)).await;
    let _spied = client.submit("spied", &json!({})).await.unwrap();
    let offer = spy.next_offer(WAIT).await.unwrap();
    let reply_to = offer["reply_to"].as_str().unwrap().to_owned();
    for n in 0..20u32 {
        let handle = client.submit("safe", &json!({"n": n})).await.unwrap();
        // A forged decline and acceptance from a worker the task was not offered to.
        for kind in ["declined", "accepted"] {
            let forged = json!({"v": 1, "kind": kind, "id": handle.id(), "worker": "f00d", "reason": "busy"});
            attacker
                .publish(&reply_to, Bytes::from(forged.to_string()))
                .await
                .unwrap();
        }
        handle.reply().await.unwrap();
    }
    assert_eq!(
        runs.lock().unwrap().values().sum::<usize>(),
        20,
        "each ran once"
    );
    let stats = client.stats();
    assert!(stats.malformed >= garbage.len() as u64, "{stats:?}");
}
