//! The metrics a creator and a worker record, read back as the Prometheus exporter renders them
//! after known tasks: values, not only names. (The CLI's test scrapes the same over HTTP.)
//!
//! The recorder is global, so this file holds one test.

use std::sync::Arc;
use std::time::Duration;

use bgtask_conformance::recorded::Recorded;
use bgtask_core::metrics as m;
use bgtask_core::names::DEFAULT_NAMESPACE;
use bgtask_core::{
    Client, ClientConfig, DynBroker, ErrorKind, Incoming, KeyLimit, MemoryBroker, Namespace,
    SubmitOptions, TaskFailure, Worker, WorkerConfig,
};
use futures::StreamExt;
use serde_json::json;

/// Wait (up to 5 s) until `done` holds: worker-side metrics follow the creator's by a hop.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..500 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{what} never held");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_tasks_leave_known_metrics() {
    let s = Recorded::install();
    m::describe();

    let broker: DynBroker = Arc::new(MemoryBroker::new());
    let worker = Worker::new(broker.clone(), WorkerConfig::for_tasks(["job"]))
        .await
        .unwrap();
    tokio::spawn(worker.run(4, |task| async move {
        match task.json()["do"].as_str() {
            Some("error") => Err(TaskFailure::error(json!("no"))),
            Some("fail") => Err(TaskFailure::failed(json!("broken"))),
            Some("hang") => {
                task.cancelled().await;
                Err(TaskFailure::failed(json!("cancelled")))
            }
            _ => Ok(json!("done")),
        }
    }));
    let config = ClientConfig {
        task_key: Some("user".into()),
        per_key_limit: KeyLimit::Max(1),
        ..ClientConfig::default()
    };
    let client = Client::new(broker.clone(), config).await.unwrap();
    let job = [("task", "job")];

    // One of each ending: success, error, failed.
    for (user, what) in [("ana", "ok"), ("bo", "error"), ("cy", "fail")] {
        let _ = client
            .submit("job", &json!({"user": user, "do": what}))
            .await
            .unwrap()
            .reply()
            .await;
    }
    // One that never replies: in flight until it times out; meanwhile its key is full.
    let hang = client
        .submit_with(
            "job",
            &json!({"user": "dee", "do": "hang"}),
            SubmitOptions::new().timeout(Duration::from_millis(400)),
        )
        .await
        .unwrap();
    assert_eq!(s.value(m::TASKS_IN_FLIGHT, &job), 1.0);
    let full = client.submit("job", &json!({"user": "dee"})).await;
    assert_eq!(full.unwrap_err().kind(), ErrorKind::LimitReached);
    assert_eq!(hang.reply().await.unwrap_err().kind(), ErrorKind::TimedOut);

    // Refusals: a blacklisted value and a task nobody serves.
    let blacklist = client.blacklist();
    while !blacklist
        .report("job", "eve", "keeps failing")
        .await
        .unwrap()
    {}
    let refused = client.submit("job", &json!({"user": "eve"})).await;
    assert_eq!(refused.unwrap_err().kind(), ErrorKind::Blacklisted);
    let nobody = client.submit("nobody", &json!({"user": "ana"})).await;
    assert_eq!(nobody.unwrap_err().kind(), ErrorKind::NoWorker);

    // Garbage on the task channel: the worker drops it and counts it.
    let namespace = Namespace::new(DEFAULT_NAMESPACE).unwrap();
    let channel = namespace.task_channel("job");
    broker.publish(&channel, "not a task".into()).await.unwrap();

    // Tasks of a peer that sends bad trace context: each runs all the same, and each bad value
    // is dropped and counted.
    let probe = namespace.reply_channel("probe");
    let mut replies = broker.subscribe(&probe).await.unwrap();
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let oversize = format!("00{}", "-0".repeat(5_000));
    let bad_trace = [
        r#""traceparent":42"#.to_owned(),
        format!(r#""traceparent":"{oversize}""#),
        format!(r#""traceparent":"{parent}","tracestate":"not a list member""#),
    ];
    for (n, trace) in bad_trace.iter().enumerate() {
        let task = format!(
            r#"{{"v":1,"kind":"task","id":"forged{n}","task":"job","reply_to":"{probe}","timeout_ms":5000,{trace},"body":{{}}}}"#
        );
        broker.publish(&channel, task.into()).await.unwrap();
    }
    for _ in &bad_trace {
        let reply = tokio::time::timeout(Duration::from_secs(5), replies.next())
            .await
            .expect("a reply to each forged task");
        let Some(Incoming::Message(bytes)) = reply else {
            panic!("{reply:?}");
        };
        let reply: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(reply["status"], "success", "{reply}");
    }
    assert_eq!(s.value(m::TRACE_CONTEXT_DROPPED, &[]), 3.0);

    assert_eq!(s.value(m::TASKS_SUBMITTED, &job), 4.0);
    for (outcome, n) in [
        ("success", 1),
        ("error", 1),
        ("failed", 1),
        ("timed_out", 1),
    ] {
        let labels = [("task", "job"), ("outcome", outcome)];
        assert_eq!(s.value(m::TASKS_COMPLETED, &labels), n as f64, "{outcome}");
    }
    for (task, reason) in [
        ("job", "limit_reached"),
        ("job", "blacklisted"),
        ("nobody", "no_worker"),
    ] {
        let labels = [("task", task), ("reason", reason)];
        assert_eq!(s.value(m::TASKS_REFUSED, &labels), 1.0, "{reason}");
    }
    assert_eq!(s.value(m::TASKS_IN_FLIGHT, &job), 0.0);
    // Three replies (the timeout is not one), each well under the task timeout. The exporter
    // renders a histogram without buckets as a summary: `_count` and `_sum`.
    let reply_count = format!("{}_count", m::TASK_REPLY_SECONDS);
    let reply_sum = format!("{}_sum", m::TASK_REPLY_SECONDS);
    assert_eq!(s.value(&reply_count, &job), 3.0);
    let replies = s.value(&reply_sum, &job);
    assert!(replies > 0.0 && replies < 3.0, "{replies}");
    // Every offer was taken on its first try, with every worker free: no time held back. (The
    // hanging task may or may not have been accepted before it timed out.)
    let accepted = s.value(&format!("{}_count", m::TASK_ACCEPT_SECONDS), &job);
    assert!((3.0..=4.0).contains(&accepted), "{accepted}");
    let waited = s.value(&format!("{}_sum", m::TASK_ACCEPT_SECONDS), &job);
    assert!(waited < 0.5, "{waited}");
    assert_eq!(
        s.value(m::WORKERS_ONLINE, &[("namespace", DEFAULT_NAMESPACE)]),
        1.0
    );

    eventually("the worker's counts", || {
        s.value(m::WORKER_TASKS_ACCEPTED, &job) == 7.0
            && s.value(
                m::WORKER_TASKS_COMPLETED,
                &[("task", "job"), ("status", "failed")],
            ) == 2.0
            && s.value(m::MALFORMED_MESSAGES, &[("role", "worker")]) == 1.0
    })
    .await;
    let completed = |status| -> f64 {
        s.value(
            m::WORKER_TASKS_COMPLETED,
            &[("task", "job"), ("status", status)],
        )
    };
    assert_eq!((completed("success"), completed("error")), (4.0, 1.0));
    assert_eq!(s.value(m::WORKER_TASKS_RUNNING, &job), 0.0);
    assert_eq!(s.value(m::MALFORMED_MESSAGES, &[("role", "client")]), 0.0);
}
