//! The task protocol end to end: clients and workers over the backend under test.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bgtask_core::{
    ClientConfig, ErrorDetail, ErrorKind, Status, SubmitOptions, TaskFailure, Worker,
};
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::harness::WorkerGuard;
use crate::Harness;

pub(super) const WAIT: Duration = Duration::from_secs(5);

pub(super) async fn next_task(
    worker: &mut Worker,
    wait: Duration,
) -> Option<bgtask_core::AvailableTask> {
    tokio::time::timeout(wait, worker.next_task())
        .await
        .ok()
        .flatten()
}

/// The next task `worker` sees within [`WAIT`], accepted.
pub(super) async fn accept_next(worker: &mut Worker) -> bgtask_core::RunningTask {
    next_task(worker, WAIT)
        .await
        .expect("a task arrives")
        .accept()
        .await
        .expect("accept")
        .expect("the claim is granted")
}

/// A task's payload reaches a worker and its reply comes back.
pub async fn submit_and_reply(h: Harness) {
    let _workers = h.echo_workers("echo", 1).await;
    let client = h.client().await;
    let payload = json!({"text": "hello", "n": [1, 2, 3]});
    let reply = client
        .submit("echo", &payload)
        .await
        .unwrap()
        .reply()
        .await
        .unwrap();
    assert_eq!(reply.json(), payload);
}

/// `submit` returns the task's id before any reply; ids are unique.
pub async fn submit_returns_the_id_at_once(h: Harness) {
    let mut worker = h.worker(h.worker_config(&["slow"])).await;
    let client = h.client().await;
    let mut ids = std::collections::HashSet::new();
    let mut handles = Vec::new();
    for i in 0..50 {
        let handle = client.submit("slow", &json!({"i": i})).await.unwrap();
        assert!(ids.insert(handle.id().to_owned()), "duplicate id");
        handles.push(handle);
    }
    // The worker has not replied to anything yet; it sees the first task with that id.
    let first = next_task(&mut worker, WAIT).await.unwrap();
    assert_eq!(first.id(), handles[0].id());
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Add {
    a: i64,
    b: i64,
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Sum {
    sum: i64,
}

/// The typed API: a serde type in, a serde type out.
pub async fn typed_call_round_trip(h: Harness) {
    let worker = h.worker(h.worker_config(&["add"])).await;
    let _guard = WorkerGuard::spawn(worker, 4, |task| async move {
        let add: Add = task.decode()?;
        Ok(json!(Sum { sum: add.a + add.b }))
    });
    let client = h.client().await;
    let sum: Sum = client.call("add", &Add { a: 40, b: 2 }).await.unwrap();
    assert_eq!(sum, Sum { sum: 42 });
}

/// Progress values reach the creator in order, before the reply.
pub async fn progress_arrives_in_order(h: Harness) {
    let worker = h.worker(h.worker_config(&["steps"])).await;
    let _guard = WorkerGuard::spawn(worker, 4, |task| async move {
        for step in 0..10 {
            task.progress(&json!({"step": step})).await?;
        }
        Ok(json!("done"))
    });
    let client = h.client().await;
    let mut handle = client.submit("steps", &json!({})).await.unwrap();
    let mut steps = Vec::new();
    while let Some(progress) = handle.progress().await {
        steps.push(progress["step"].as_i64().unwrap());
    }
    assert_eq!(steps, (0..10).collect::<Vec<_>>());
    assert_eq!(handle.reply().await.unwrap().json(), json!("done"));
}

/// A worker sees metadata, the task key's value and the deadline before it accepts.
pub async fn worker_sees_metadata_and_key_before_accepting(h: Harness) {
    let mut worker = h.worker(h.worker_config(&["meta"])).await;
    let client = h.client().await;
    let options = SubmitOptions::new()
        .task_key("user")
        .metadata(json!({"trace": "abc"}))
        .timeout(Duration::from_secs(3));
    let handle = client
        .submit_with("meta", &json!({"user": "u1", "x": 1}), options)
        .await
        .unwrap();
    let task = next_task(&mut worker, WAIT).await.unwrap();
    assert_eq!(task.id(), handle.id());
    assert_eq!(task.name(), "meta");
    assert_eq!(task.metadata(), Some(json!({"trace": "abc"})));
    assert_eq!(task.key_value(), Some("u1"));
    assert!(!task.is_broadcast());
    let left = task.deadline() - Instant::now();
    assert!(
        left > Duration::from_secs(1) && left <= Duration::from_secs(3),
        "{left:?}"
    );
}

/// A task published on its task name's channel (as creators that send no directed offers do)
/// reaches every worker; of the many that try to accept it, exactly one wins.
pub async fn first_accept_wins(h: Harness) {
    let mut workers = Vec::new();
    for _ in 0..5 {
        workers.push(h.worker(h.worker_config(&["race"])).await);
    }
    let creator = h.broker().await;
    let ns = bgtask_core::Namespace::new(h.namespace()).unwrap();
    for round in 0..5 {
        let task = json!({
            "v": 1, "kind": "task", "id": bgtask_core::names::random_id(), "task": "race",
            "reply_to": ns.reply_channel(&bgtask_core::names::random_id()), "timeout_ms": 5000,
            "body": {"round": round},
        });
        creator
            .publish(&ns.task_channel("race"), Bytes::from(task.to_string()))
            .await
            .unwrap();
        let mut tasks = Vec::new();
        for worker in &mut workers {
            tasks.push(
                next_task(worker, WAIT)
                    .await
                    .expect("every worker sees the task"),
            );
        }
        let accepted = futures::future::join_all(tasks.into_iter().map(|t| t.accept())).await;
        let winners: Vec<_> = accepted.into_iter().filter_map(|a| a.unwrap()).collect();
        assert_eq!(winners.len(), 1, "round {round}");
    }
}

/// 1,000 tasks over 10 workers: each accepted exactly once, each reply delivered once.
pub async fn thousand_tasks_ten_workers_exactly_once(h: Harness) {
    let executions: Arc<Mutex<HashMap<u64, usize>>> = Arc::default();
    let mut guards = Vec::new();
    for _ in 0..10 {
        let worker = h.worker(h.worker_config(&["count"])).await;
        let executions = executions.clone();
        guards.push(WorkerGuard::spawn(worker, 32, move |task| {
            let executions = executions.clone();
            async move {
                let n = task.json()["n"].as_u64().unwrap();
                *executions.lock().unwrap().entry(n).or_default() += 1;
                Ok(json!({"n": n}))
            }
        }));
    }
    let client = h.client().await;
    let replies = futures::stream::iter(0..1000u64)
        .map(|n| {
            let client = client.clone();
            async move {
                let options = SubmitOptions::new().timeout(Duration::from_secs(30));
                let handle = client
                    .submit_with("count", &json!({"n": n}), options)
                    .await
                    .unwrap();
                (n, handle.reply().await.unwrap().json())
            }
        })
        .buffer_unordered(100)
        .collect::<Vec<_>>()
        .await;
    assert_eq!(replies.len(), 1000);
    for (n, reply) in &replies {
        assert_eq!(reply["n"], json!(n));
    }
    let executions = executions.lock().unwrap();
    assert_eq!(executions.len(), 1000, "every task ran");
    assert!(executions.values().all(|&c| c == 1), "a task ran twice");
    assert_eq!(client.stats().late, 0, "no reply arrived twice");
}

/// Submit a task of "ignored" with `options`; its reply must be a timeout error, and the time
/// it took is returned.
async fn times_out(client: &bgtask_core::Client, options: SubmitOptions) -> Duration {
    let started = Instant::now();
    let handle = client
        .submit_with("ignored", &json!({}), options)
        .await
        .unwrap();
    let err = handle.reply().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TimedOut);
    started.elapsed()
}

/// A task no worker takes ends with a timeout error, at its timeout.
pub async fn ignored_task_times_out(h: Harness) {
    let _worker = h.worker(h.worker_config(&["ignored"])).await;
    let client = h.client().await;
    let took = times_out(
        &client,
        SubmitOptions::new().timeout(Duration::from_millis(300)),
    )
    .await;
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(2),
        "{took:?}"
    );
}

/// A timeout of zero or below means the client's default.
pub async fn zero_or_negative_timeout_means_default(h: Harness) {
    let _worker = h.worker(h.worker_config(&["ignored"])).await;
    let config = ClientConfig {
        default_timeout: Duration::from_millis(400),
        ..h.client_config()
    };
    let client = h.client_on(h.broker().await, config).await;
    for millis in [0, -5] {
        let took = times_out(&client, SubmitOptions::new().timeout_ms(millis)).await;
        assert!(
            took >= Duration::from_millis(400) && took < Duration::from_secs(2),
            "{millis}: {took:?}"
        );
    }
}

/// A per-task timeout wins over the default.
pub async fn per_task_timeout_overrides_default(h: Harness) {
    let _worker = h.worker(h.worker_config(&["ignored"])).await;
    let client = h.client().await; // default 5 s
    let took = times_out(
        &client,
        SubmitOptions::new().timeout(Duration::from_millis(200)),
    )
    .await;
    assert!(took < Duration::from_secs(2), "{took:?}");
}

/// A reply after the creator gave up is dropped and counted; nothing runs twice.
pub async fn late_reply_is_dropped(h: Harness) {
    let mut worker = h.worker(h.worker_config(&["late"])).await;
    let client = h.client().await;
    let options = SubmitOptions::new().timeout(Duration::from_millis(300));
    let handle = client
        .submit_with("late", &json!({}), options)
        .await
        .unwrap();
    let task = next_task(&mut worker, WAIT).await.unwrap();
    let running = task.accept().await.unwrap().expect("accepted");
    assert_eq!(
        handle.reply().await.unwrap_err().kind(),
        ErrorKind::TimedOut
    );
    running.success(&json!("too late")).await.unwrap();
    let deadline = Instant::now() + WAIT;
    while client.stats().late == 0 {
        assert!(Instant::now() < deadline, "the late reply was never seen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A task completed with `Error` reaches the creator as `TaskError` with the worker's fields.
pub async fn error_status_is_a_typed_error(h: Harness) {
    let worker = h.worker(h.worker_config(&["err"])).await;
    let _guard = WorkerGuard::spawn(worker, 1, |_| async move {
        Err(TaskFailure::error(json!({"code": 42, "why": "bad input"})))
    });
    let client = h.client().await;
    let err = client
        .submit("err", &json!({}))
        .await
        .unwrap()
        .reply()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TaskError);
    let reply: Value = serde_json::from_str(err.reply().unwrap().get()).unwrap();
    assert_eq!(reply, json!({"code": 42, "why": "bad input"}));
    assert!(matches!(
        err.detail(),
        Some(ErrorDetail::Reply {
            status: Status::Error,
            ..
        })
    ));
}

/// A task completed with `Failed` reaches the creator as `TaskFailed`.
pub async fn failed_status_is_a_typed_error(h: Harness) {
    let mut worker = h.worker(h.worker_config(&["fail"])).await;
    let client = h.client().await;
    let handle = client.submit("fail", &json!({})).await.unwrap();
    let task = next_task(&mut worker, WAIT).await.unwrap();
    task.accept()
        .await
        .unwrap()
        .unwrap()
        .fail(&json!({"disk": "full"}))
        .await
        .unwrap();
    let err = handle.reply().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TaskFailed);
    assert_eq!(err.reply().unwrap().get(), r#"{"disk":"full"}"#);
}

/// A handler that panics fails its task, and the worker goes on serving.
pub async fn handler_panic_fails_the_task(h: Harness) {
    let worker = h.worker(h.worker_config(&["panic"])).await;
    let _guard = WorkerGuard::spawn(worker, 2, |task| async move {
        if task.json()["panic"] == json!(true) {
            panic!("handler bug (expected by the test)");
        }
        Ok(json!("fine"))
    });
    let client = h.client().await;
    let err = client
        .submit("panic", &json!({"panic": true}))
        .await
        .unwrap()
        .reply()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TaskFailed);
    let ok = client
        .submit("panic", &json!({"panic": false}))
        .await
        .unwrap()
        .reply()
        .await;
    assert_eq!(ok.unwrap().json(), json!("fine"));
}

/// A running task dropped without completion fails at once, not at the timeout.
pub async fn dropped_running_task_fails_fast(h: Harness) {
    let mut worker = h.worker(h.worker_config(&["dropped"])).await;
    let client = h.client().await;
    let started = Instant::now();
    let options = SubmitOptions::new().timeout(Duration::from_secs(10));
    let handle = client
        .submit_with("dropped", &json!({}), options)
        .await
        .unwrap();
    let task = next_task(&mut worker, WAIT).await.unwrap();
    drop(task.accept().await.unwrap().unwrap());
    let err = handle.reply().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TaskFailed);
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// A broadcast task runs on every worker; the creator gets every reply.
pub async fn broadcast_runs_on_every_worker(h: Harness) {
    let mut guards = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let worker = h.worker(h.worker_config(&["all"])).await;
        ids.push(worker.id().to_owned());
        guards.push(WorkerGuard::spawn(worker, 1, |task| async move {
            assert!(task.is_broadcast());
            Ok(json!("ran"))
        }));
    }
    let client = h.client().await;
    let options = SubmitOptions::new().timeout(Duration::from_millis(1500));
    let replies = client
        .broadcast("all", &json!({}), options)
        .await
        .unwrap()
        .collect()
        .await;
    let mut workers: Vec<String> = replies
        .into_iter()
        .map(|r| r.unwrap().worker().to_owned())
        .collect();
    workers.sort();
    ids.sort();
    assert_eq!(workers, ids);
}

/// An oversized task is refused before anything is published.
pub async fn oversized_task_is_refused_before_publishing(h: Harness) {
    let mut worker = h.worker(h.worker_config(&["big"])).await;
    let config = ClientConfig {
        max_payload: 1000,
        ..h.client_config()
    };
    let client = h.client_on(h.broker().await, config).await;
    let err = client
        .submit("big", &json!({"blob": "x".repeat(2000)}))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TooLarge);
    assert!(next_task(&mut worker, Duration::from_millis(300))
        .await
        .is_none());
    assert_eq!(client.stats().submitted, 0);
}

/// An oversized reply is not sent: the worker gets `TooLarge`, the creator `TaskFailed`.
pub async fn oversized_reply_is_refused(h: Harness) {
    let config = bgtask_core::WorkerConfig {
        max_payload: 1000,
        ..h.worker_config(&["big"])
    };
    let mut worker = h.worker(config).await;
    let client = h.client().await;
    let handle = client.submit("big", &json!({})).await.unwrap();
    let running = accept_next(&mut worker).await;
    let err = running.success(&json!("y".repeat(2000))).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TooLarge);
    let err = handle.reply().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TaskFailed);
    assert!(err.reply().unwrap().get().contains("reply too large"));
}

/// A task and a reply just under the 1 MiB default limit round-trip.
pub async fn one_mib_task_and_reply(h: Harness) {
    let _workers = h.echo_workers("echo", 1).await;
    let client = h.client().await;
    let blob = "z".repeat((1 << 20) - 64);
    let payload = json!({ "blob": blob });
    let options = SubmitOptions::new().timeout(Duration::from_secs(20));
    let reply = client
        .submit_with("echo", &payload, options)
        .await
        .unwrap()
        .reply()
        .await
        .unwrap();
    assert!(reply.json() == payload, "payload changed");
}

/// With no live worker of the task name (known from presence, on every backend), the submit
/// fails at once with `NoWorker`, for tasks, targets and broadcasts alike.
pub async fn no_worker_fails_fast(h: Harness) {
    let _other = h.worker(h.worker_config(&["somebody"])).await;
    let client = h.client().await;
    let started = Instant::now();
    let options = || SubmitOptions::new().timeout(Duration::from_millis(500));
    let task = client.submit_with("nobody", &json!({}), options()).await;
    assert_eq!(task.unwrap_err().kind(), ErrorKind::NoWorker);
    let targeted = client
        .submit_with("somebody", &json!({}), options().target("nowhere"))
        .await;
    assert_eq!(targeted.unwrap_err().kind(), ErrorKind::NoWorker);
    let broadcast = client.broadcast("nobody", &json!({}), options()).await;
    assert_eq!(broadcast.unwrap_err().kind(), ErrorKind::NoWorker);
    assert!(started.elapsed() < Duration::from_millis(450));
}

/// A task sent to a target reaches only workers that listen to that target.
pub async fn targeted_task_reaches_only_its_workers(h: Harness) {
    let mut general = h.worker(h.worker_config(&["job"])).await;
    let special_config = bgtask_core::WorkerConfig {
        targets: vec!["gpu-1".into()],
        ..h.worker_config(&["job"])
    };
    let mut special = h.worker(special_config).await;
    let client = h.client().await;
    let handle = client
        .submit_with("job", &json!({}), SubmitOptions::new().target("gpu-1"))
        .await
        .unwrap();
    let task = next_task(&mut special, WAIT).await.unwrap();
    assert_eq!(task.id(), handle.id());
    assert_eq!(task.name(), "job");
    assert!(next_task(&mut general, Duration::from_millis(300))
        .await
        .is_none());
}

/// `run` never has more than `concurrency` handlers running.
pub async fn handler_concurrency_is_respected(h: Harness) {
    let worker = h.worker(h.worker_config(&["par"])).await;
    let now = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (n, p) = (now.clone(), peak.clone());
    let _guard = WorkerGuard::spawn(worker, 2, move |_| {
        let (n, p) = (n.clone(), p.clone());
        async move {
            let running = n.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(running, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(100)).await;
            n.fetch_sub(1, Ordering::SeqCst);
            Ok(json!(null))
        }
    });
    let client = h.client().await;
    let mut handles = Vec::new();
    for _ in 0..6 {
        handles.push(client.submit("par", &json!({})).await.unwrap());
    }
    for handle in handles {
        handle.reply().await.unwrap();
    }
    assert_eq!(peak.load(Ordering::SeqCst), 2);
}

/// The client's event stream reports progress and completion.
pub async fn events_report_the_task_lifecycle(h: Harness) {
    let worker = h.worker(h.worker_config(&["ev"])).await;
    let _guard = WorkerGuard::spawn(worker, 1, |task| async move {
        task.progress(&json!(50)).await?;
        Ok(json!("done"))
    });
    let client = h.client().await;
    let mut events = client.events();
    let handle = client.submit("ev", &json!({})).await.unwrap();
    let id = handle.id().to_owned();
    handle.reply().await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let event = tokio::time::timeout(WAIT, events.next())
            .await
            .unwrap()
            .unwrap();
        seen.push(event);
    }
    use bgtask_core::ClientEvent::*;
    assert!(
        matches!(&seen[0], Progress { id: i } if *i == id),
        "{seen:?}"
    );
    assert!(
        matches!(&seen[1], Done { id: i, status: Status::Success } if *i == id),
        "{seen:?}"
    );
}

/// Extreme timeouts neither panic nor overflow: they are cut to 30 days.
pub async fn huge_timeouts_are_capped(h: Harness) {
    let _worker = h.worker(h.worker_config(&["any"])).await;
    let client = h.client().await;
    let mut handle = client
        .submit_with(
            "any",
            &json!({}),
            SubmitOptions::new().timeout(Duration::MAX),
        )
        .await
        .unwrap();
    let left = handle.deadline() - Instant::now();
    assert!(left <= bgtask_core::MAX_TIMEOUT && left > Duration::from_secs(29 * 24 * 3600));
    let handle2 = client
        .submit_with("any", &json!({}), SubmitOptions::new().timeout_ms(i64::MAX))
        .await
        .unwrap();
    assert!(handle.cancel().await);
    drop(handle2);
}
