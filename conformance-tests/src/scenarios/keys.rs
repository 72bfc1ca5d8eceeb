//! Per-key admission control end to end: the limit on tasks in flight per key value, and the
//! blacklist that workers' reports raise.

use std::time::Duration;

use bgtask_core::{
    BlacklistConfig, Client, ClientConfig, ErrorDetail, ErrorKind, KeyLimit, SubmitOptions, Worker,
};
use serde_json::json;
use tokio::time::Instant;

use super::protocol::{next_task, WAIT};
use crate::Harness;

/// A client config whose tasks are keyed by `user`, at most `limit` in flight per value.
fn keyed(h: &Harness, limit: KeyLimit) -> ClientConfig {
    ClientConfig {
        task_key: Some("user".into()),
        per_key_limit: limit,
        ..h.client_config()
    }
}

/// A worker of `held` that never answers (its tasks stay in flight), and a client whose tasks
/// are keyed by `user` with `limit`.
pub(super) async fn holding(h: &Harness, limit: KeyLimit) -> (Worker, Client) {
    let worker = h.worker(h.worker_config(&["held"])).await;
    let client = h.client_on(h.broker().await, keyed(h, limit)).await;
    (worker, client)
}

/// A task for key value `u1` that `client` must refuse at once: the value is at its limit.
async fn limit_reached(client: &Client) -> bgtask_core::Error {
    let err = client
        .submit("held", &json!({"user": "u1"}))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::LimitReached);
    err
}

/// Over the per-key limit, submit fails at once with `LimitReached`; other values are admitted.
pub async fn per_key_limit_rejects_over_limit(h: Harness) {
    let (_worker, client) = holding(&h, KeyLimit::Max(2)).await;
    let _a = client.submit("held", &json!({"user": "u1"})).await.unwrap();
    let _b = client.submit("held", &json!({"user": "u1"})).await.unwrap();
    let started = Instant::now();
    let err = limit_reached(&client).await;
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(matches!(
        err.detail(),
        Some(ErrorDetail::Limit {
            in_flight: 2,
            limit: 2
        })
    ));
    assert_eq!(client.in_flight("held", "u1").await.unwrap(), 2);
    let _c = client.submit("held", &json!({"user": "u2"})).await.unwrap();
    // Numbers are key values too, as their JSON text.
    let _d = client.submit("held", &json!({"user": 7})).await.unwrap();
    assert_eq!(client.in_flight("held", "7").await.unwrap(), 1);
}

/// A completed task frees its slot at once.
pub async fn per_key_limit_frees_on_completion(h: Harness) {
    let _workers = h.echo_workers("echo", 1).await;
    let client = h
        .client_on(h.broker().await, keyed(&h, KeyLimit::Max(1)))
        .await;
    for i in 0..5 {
        let reply = client
            .submit("echo", &json!({"user": "u1", "i": i}))
            .await
            .unwrap();
        reply.reply().await.unwrap();
        assert_eq!(client.in_flight("echo", "u1").await.unwrap(), 0);
    }
}

/// A timed-out task frees its slot.
pub async fn per_key_limit_frees_on_timeout(h: Harness) {
    let _worker = h.worker(h.worker_config(&["ignored"])).await;
    let client = h
        .client_on(h.broker().await, keyed(&h, KeyLimit::Max(1)))
        .await;
    let options = SubmitOptions::new().timeout(Duration::from_millis(200));
    let handle = client
        .submit_with("ignored", &json!({"user": "u1"}), options.clone())
        .await
        .unwrap();
    assert_eq!(
        handle.reply().await.unwrap_err().kind(),
        ErrorKind::TimedOut
    );
    assert_eq!(client.in_flight("ignored", "u1").await.unwrap(), 0);
    client
        .submit_with("ignored", &json!({"user": "u1"}), options)
        .await
        .unwrap();
}

/// With an explicit unlimited limit, every task is admitted.
pub async fn unlimited_per_key_admits_all(h: Harness) {
    let (_worker, client) = holding(&h, KeyLimit::Unlimited).await;
    let mut handles = Vec::new();
    for _ in 0..20 {
        handles.push(client.submit("held", &json!({"user": "u1"})).await.unwrap());
    }
    assert_eq!(
        client.in_flight("held", "u1").await.unwrap(),
        0,
        "unlimited takes no leases"
    );
}

/// A creator that vanishes with 5 tasks in flight (no cleanup at all) does not block the key:
/// its leases expire shortly after the tasks' deadline.
pub async fn crashed_creator_leases_free_themselves(h: Harness) {
    let _worker = h.worker(h.worker_config(&["held"])).await;
    let config = ClientConfig {
        lease_margin: Duration::from_millis(300),
        ..keyed(&h, KeyLimit::Max(5))
    };
    let crashed = h.client_on(h.broker().await, config.clone()).await;
    let options = SubmitOptions::new().timeout(Duration::from_millis(700));
    for _ in 0..5 {
        let handle = crashed
            .submit_with("held", &json!({"user": "u1"}), options.clone())
            .await
            .unwrap();
        std::mem::forget(handle); // a crash runs no destructor
    }
    std::mem::forget(crashed);
    let survivor = h.client_on(h.broker().await, config).await;
    let started = Instant::now();
    limit_reached(&survivor).await;
    loop {
        match survivor.submit("held", &json!({"user": "u1"})).await {
            Ok(_) => break,
            Err(e) if e.kind() == ErrorKind::LimitReached => {}
            Err(e) => panic!("{e}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "leases did not expire"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "key admitted again {:?} after the crash (TTL 1 s)",
        started.elapsed()
    );
}

/// With a task key set, a task that is not an object or lacks the property is refused.
pub async fn task_without_its_key_is_rejected(h: Harness) {
    let _worker = h.worker(h.worker_config(&["keyed"])).await;
    let client = h
        .client_on(h.broker().await, keyed(&h, KeyLimit::Max(5)))
        .await;
    for payload in [json!({"other": 1}), json!([1, 2]), json!("text")] {
        let err = client.submit("keyed", &payload).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{payload}");
    }
}

fn quick_blacklist(h: &Harness, task: &str, duration: Duration) -> bgtask_core::WorkerConfig {
    bgtask_core::WorkerConfig {
        blacklist: BlacklistConfig {
            threshold: 3,
            interval: Duration::from_secs(2),
            duration,
        },
        ..h.worker_config(&[task])
    }
}

async fn report_bad(
    worker: &mut Worker,
    client: &bgtask_core::Client,
    task: &str,
    times: usize,
) -> bool {
    let mut blacklisted = false;
    for _ in 0..times {
        let _handle = client.submit(task, &json!({"user": "bad"})).await.unwrap();
        let available = next_task(worker, WAIT).await.unwrap();
        let running = available.accept().await.unwrap().unwrap();
        blacklisted = running.report_bad_key("corrupt account").await.unwrap();
        running.error(&json!("bad user")).await.unwrap();
    }
    blacklisted
}

/// More than `threshold` reports within the interval blacklist the value; submits for it fail
/// with the reason and the time left; other values pass; the count is readable.
pub async fn blacklist_after_threshold(h: Harness) {
    let (mut worker, client) = blacklist_fixture(&h, Duration::from_secs(30)).await;
    assert!(
        report_bad(&mut worker, &client, "bl", 4).await,
        "the 4th report blacklists"
    );
    let err = client
        .submit("bl", &json!({"user": "bad"}))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Blacklisted);
    match err.detail() {
        Some(ErrorDetail::Blacklisted { reason, remaining }) => {
            assert_eq!(reason, "corrupt account");
            assert!(*remaining > Duration::from_secs(25) && *remaining <= Duration::from_secs(30));
        }
        other => panic!("{other:?}"),
    }
    client.submit("bl", &json!({"user": "good"})).await.unwrap();
    assert_eq!(client.blacklist().count().await.unwrap(), 1);
    let listed = client.blacklist().list().await.unwrap();
    assert_eq!(
        (listed[0].task.as_str(), listed[0].value.as_str()),
        ("bl", "bad")
    );
}

/// A worker of "bl" that blacklists after 3 reports for `duration`, and a keyed client.
async fn blacklist_fixture(h: &Harness, duration: Duration) -> (Worker, bgtask_core::Client) {
    let worker = h.worker(quick_blacklist(h, "bl", duration)).await;
    let client = h
        .client_on(h.broker().await, keyed(h, KeyLimit::Unlimited))
        .await;
    (worker, client)
}

/// A worker of "bl" and a keyed client, after the worker blacklisted the key value "bad" for
/// `duration`.
async fn blacklisted_bad(h: &Harness, duration: Duration) -> (Worker, bgtask_core::Client) {
    let (mut worker, client) = blacklist_fixture(h, duration).await;
    assert!(report_bad(&mut worker, &client, "bl", 4).await);
    (worker, client)
}

/// Lifting a blacklisting admits the value again at once.
pub async fn blacklist_lift(h: Harness) {
    let (_worker, client) = blacklisted_bad(&h, Duration::from_secs(30)).await;
    assert!(client.blacklist().lift("bl", "bad").await.unwrap());
    assert!(!client.blacklist().lift("bl", "bad").await.unwrap());
    assert_eq!(client.blacklist().count().await.unwrap(), 0);
    client.submit("bl", &json!({"user": "bad"})).await.unwrap();
}

/// A blacklisting ends by itself after its duration.
pub async fn blacklist_expires(h: Harness) {
    let (_worker, client) = blacklisted_bad(&h, Duration::from_millis(500)).await;
    assert_eq!(
        client
            .submit("bl", &json!({"user": "bad"}))
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::Blacklisted
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    client.submit("bl", &json!({"user": "bad"})).await.unwrap();
    assert_eq!(client.blacklist().count().await.unwrap(), 0);
}

/// Exactly `threshold` reports do not blacklist ("more than" the threshold does).
pub async fn reports_at_threshold_do_not_blacklist(h: Harness) {
    let (mut worker, client) = blacklist_fixture(&h, Duration::from_secs(30)).await;
    assert!(!report_bad(&mut worker, &client, "bl", 3).await);
    client.submit("bl", &json!({"user": "bad"})).await.unwrap();
    assert_eq!(client.blacklist().count().await.unwrap(), 0);
}
