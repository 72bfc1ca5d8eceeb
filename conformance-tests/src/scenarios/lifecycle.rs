//! A task's end other than its reply: cancellation by the creator, a timeout observed by the
//! worker, and the shutdown of either side.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bgtask_core::{ErrorKind, KeyLimit, SubmitOptions};
use serde_json::json;
use tokio::time::Instant;

use super::keys::holding;
use super::protocol::{accept_next, next_task, WAIT};
use crate::harness::WorkerGuard;
use crate::Harness;

/// A task of `task` with `timeout`, submitted by a new client and accepted by a new worker. The
/// client and worker live on in the background (the handle and the running task hold them).
async fn running_task(
    h: &Harness,
    task: &str,
    timeout: Duration,
) -> (bgtask_core::TaskHandle, bgtask_core::RunningTask) {
    let mut worker = h.worker(h.worker_config(&[task])).await;
    let client = h.client().await;
    let handle = client
        .submit_with(task, &json!({}), SubmitOptions::new().timeout(timeout))
        .await
        .unwrap();
    let running = accept_next(&mut worker).await;
    (handle, running)
}

/// A creator's cancellation reaches the worker running the task.
pub async fn cancel_is_observed_by_the_running_worker(h: Harness) {
    let (mut handle, running) = running_task(&h, "long", Duration::from_secs(20)).await;
    assert!(handle.cancel().await);
    tokio::time::timeout(WAIT, running.cancelled())
        .await
        .expect("the worker saw the cancellation");
    assert!(running.is_cancelled());
    assert_eq!(
        handle.reply().await.unwrap_err().kind(),
        ErrorKind::Cancelled
    );
}

/// A task cancelled before any worker accepted it can no longer be accepted.
pub async fn cancel_before_accept_prevents_accept(h: Harness) {
    let mut worker = h.worker(h.worker_config(&["c"])).await;
    let client = h.client().await;
    let mut handle = client.submit("c", &json!({})).await.unwrap();
    let task = next_task(&mut worker, WAIT).await.unwrap();
    assert!(handle.cancel().await);
    assert!(task.accept().await.unwrap().is_none());
    assert!(!handle.cancel().await, "cancelling twice");
}

/// Shutdown stops taking tasks and lets the running ones finish.
pub async fn worker_shutdown_drains_in_flight(h: Harness) {
    let worker = h.worker(h.worker_config(&["drain"])).await;
    let started = Arc::new(AtomicUsize::new(0));
    let counter = started.clone();
    let guard = WorkerGuard::spawn(worker, 4, move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok(json!("finished"))
        }
    });
    let client = h.client().await;
    let mut handles = Vec::new();
    for _ in 0..3 {
        handles.push(client.submit("drain", &json!({})).await.unwrap());
    }
    let deadline = Instant::now() + WAIT;
    while started.load(Ordering::SeqCst) < 3 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    guard.stop().await;
    for handle in handles {
        assert_eq!(handle.reply().await.unwrap().json(), json!("finished"));
    }
    let options = SubmitOptions::new().timeout(Duration::from_millis(300));
    let late = match client.submit_with("drain", &json!({}), options).await {
        Ok(handle) => handle.reply().await,
        Err(e) => Err(e),
    };
    assert!(matches!(
        late.unwrap_err().kind(),
        ErrorKind::NoWorker | ErrorKind::TimedOut
    ));
}

/// Client shutdown ends pending tasks with `Closed` and releases their key leases.
pub async fn client_shutdown_ends_pending_tasks(h: Harness) {
    let (_worker, client) = holding(&h, KeyLimit::Max(5)).await;
    let handle = client.submit("held", &json!({"user": "u1"})).await.unwrap();
    assert_eq!(client.in_flight("held", "u1").await.unwrap(), 1);
    client.shutdown().await;
    assert_eq!(handle.reply().await.unwrap_err().kind(), ErrorKind::Closed);
    assert_eq!(client.in_flight("held", "u1").await.unwrap(), 0);
    let err = client
        .submit("held", &json!({"user": "u1"}))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed);
}

/// When the creator stops waiting (timeout), the worker running the task is told, so it can
/// stop; and the creator holds the task's claim, so no worker can accept it any more.
pub async fn timed_out_task_is_cancelled_at_the_worker(h: Harness) {
    let (handle, running) = running_task(&h, "slow", Duration::from_millis(300)).await;
    let id = handle.id().to_owned();
    assert_eq!(
        handle.reply().await.unwrap_err().kind(),
        ErrorKind::TimedOut
    );
    tokio::time::timeout(WAIT, running.cancelled())
        .await
        .expect("the running worker was told the creator gave up");
    let ns = bgtask_core::Namespace::new(h.namespace()).unwrap();
    let claimed = h
        .broker()
        .await
        .claim(&ns.claim_key(&id), Duration::from_secs(1))
        .await
        .unwrap();
    assert!(!claimed, "the task's claim is held: no late accept can win");
}
