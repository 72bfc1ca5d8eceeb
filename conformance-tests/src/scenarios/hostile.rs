//! Hostile input end to end: malformed and forged messages, names that trip naive mappings,
//! namespaces that must never meet.

use std::time::Duration;

use bgtask_core::{ClientConfig, ErrorKind, Worker};
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{json, Value};

use super::hostile_names;
use super::protocol::{next_task, WAIT};
use crate::harness::WorkerGuard;
use crate::Harness;

/// Garbage, truncated JSON, wrong versions and forged replies on every channel kind are
/// counted and dropped; workers and creators keep serving.
pub async fn malformed_messages_do_not_stop_anyone(h: Harness) {
    let worker = h.worker(h.worker_config(&["echo"])).await;
    let worker_id = worker.id().to_owned();
    let mut events = worker.events();
    let guard = WorkerGuard::spawn(worker, 4, |task| async move { Ok(task.json()) });
    let client = h.client().await;
    let attacker = h.broker().await;
    let ns = bgtask_core::Namespace::new(h.namespace()).unwrap();
    let garbage: Vec<Bytes> = vec![
        Bytes::from_static(b"\x00\xff\xfe garbage"),
        Bytes::from_static(b"{\"v\":1,\"kind\":\"task\",\"id\":\"x\",\"task\":"),
        Bytes::from_static(b"{\"v\":99,\"kind\":\"task\",\"id\":\"x\"}"),
        Bytes::from_static(b"[1,2,3]"),
        Bytes::from(vec![b'{'; 100_000]),
    ];
    let forged_done = Bytes::from_static(
        b"{\"v\":1,\"kind\":\"done\",\"id\":\"not-a-task\",\"worker\":\"w\",\"status\":\"success\",\"body\":1}",
    );
    // Another creator's reply channel cannot be known, but if it were, forged ids go nowhere.
    let channels = [
        ns.task_channel("echo"),
        ns.worker_channel(worker_id.as_str()),
        ns.cancel_channel(),
    ];
    for channel in &channels {
        for bytes in &garbage {
            attacker.publish(channel, bytes.clone()).await.unwrap();
        }
    }
    // The worker counted each bad message once.
    let mut malformed = 0;
    while malformed < garbage.len() * channels.len() {
        match tokio::time::timeout(WAIT, events.next()).await {
            Ok(Some(bgtask_core::WorkerEvent::Malformed { .. })) => malformed += 1,
            Ok(Some(_)) => {}
            other => panic!("expected malformed events, got {other:?} after {malformed}"),
        }
    }
    let reply = client
        .submit("echo", &json!({"still": "alive"}))
        .await
        .unwrap()
        .reply()
        .await;
    assert_eq!(reply.unwrap().json(), json!({"still": "alive"}));
    drop(guard);
    // The creator's reply channel: publish to it through a task we control.
    let mut raw_worker = h.worker(h.worker_config(&["probe"])).await;
    let mut handle = client.submit("probe", &json!({})).await.unwrap();
    let task = next_task(&mut raw_worker, WAIT).await.unwrap();
    let running = task.accept().await.unwrap().unwrap();
    let reply_channel = find_reply_channel(&h, &client).await;
    for bytes in garbage.iter().chain([&forged_done]) {
        attacker
            .publish(&reply_channel, bytes.clone())
            .await
            .unwrap();
    }
    running.progress(&json!(1)).await.unwrap();
    assert_eq!(handle.progress().await, Some(json!(1)));
    running.success(&json!("ok")).await.unwrap();
    assert_eq!(handle.reply().await.unwrap().json(), json!("ok"));
    let stats = client.stats();
    assert_eq!(stats.malformed, garbage.len() as u64, "{stats:?}");
    assert_eq!(stats.late, 1, "the forged reply counted as late: {stats:?}");
}

/// The reply channel of `client`, learnt the way a worker learns it: from a task it receives.
async fn find_reply_channel(h: &Harness, client: &bgtask_core::Client) -> String {
    let mut spy = crate::RawWorker::announce(h, &["spy"], 1, Duration::from_secs(5)).await;
    let _handle = client.submit("spy", &json!({})).await.unwrap();
    let message: Value = spy.next_offer(WAIT).await.unwrap();
    message["reply_to"].as_str().unwrap().to_owned()
}

/// A task whose reply channel lies outside the namespace's reply channels is never run.
pub async fn forged_reply_channel_is_refused(h: Harness) {
    let mut worker = h.worker(h.worker_config(&["echo"])).await;
    let ns = bgtask_core::Namespace::new(h.namespace()).unwrap();
    let forged = json!({
        "v": 1, "kind": "task", "id": "forged", "task": "echo",
        "reply_to": ns.task_channel("other"), "timeout_ms": 5000, "body": {}
    });
    h.broker()
        .await
        .publish(&ns.task_channel("echo"), Bytes::from(forged.to_string()))
        .await
        .unwrap();
    assert!(next_task(&mut worker, Duration::from_millis(500))
        .await
        .is_none());
    assert_eq!(worker.stats().malformed, 1);
}

/// Two namespaces on one broker never see each other's tasks.
pub async fn namespaces_never_meet(h: Harness) {
    let mut worker = h.worker(h.worker_config(&["echo"])).await;
    let other = ClientConfig {
        namespace: format!("{}-other", h.namespace()),
        default_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let client = h.client_on(h.broker().await, other).await;
    let result = match client.submit("echo", &json!({})).await {
        Ok(handle) => handle.reply().await.map(|_| ()),
        Err(e) => Err(e),
    };
    assert!(matches!(
        result.unwrap_err().kind(),
        ErrorKind::NoWorker | ErrorKind::TimedOut
    ));
    assert!(next_task(&mut worker, Duration::from_millis(200))
        .await
        .is_none());
}

/// Empty, over-long and control-character names, and bad namespaces, are `InvalidName`.
pub async fn invalid_names_are_rejected(h: Harness) {
    let client = h.client().await;
    for name in [
        String::new(),
        "a\0b".into(),
        "tab\t".into(),
        "n".repeat(513),
    ] {
        let err = client.submit(&name, &json!({})).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidName, "{name:?}");
    }
    let bad_ns = ClientConfig {
        namespace: "a:b".into(),
        ..Default::default()
    };
    let err = bgtask_core::Client::new(h.broker().await, bad_ns)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidName);
    let err = Worker::new(h.broker().await, h.worker_config(&["ok", ""]))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidName);
}

/// Tasks named with wildcards, separators, `$` prefixes and long names (up to the longest a task
/// name may be) reach only their own workers.
pub async fn hostile_task_names_reach_only_their_workers(h: Harness) {
    let mut names = hostile_names();
    names.push("n".repeat(bgtask_core::names::MAX_NAME_BYTES));
    let mut workers = Vec::new();
    for name in &names {
        let worker = h.worker(h.worker_config(&[name.as_str()])).await;
        let expected = name.clone();
        workers.push(WorkerGuard::spawn(worker, 1, move |task| {
            let expected = expected.clone();
            async move {
                assert_eq!(task.name(), expected, "a worker got another name's task");
                Ok(json!(task.name()))
            }
        }));
    }
    let client = h.client().await;
    for name in &names {
        let reply = client
            .submit(name, &json!({}))
            .await
            .unwrap()
            .reply()
            .await
            .unwrap();
        assert_eq!(reply.json(), json!(name));
    }
}
