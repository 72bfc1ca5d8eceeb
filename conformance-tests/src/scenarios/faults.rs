//! Faults injected with the TCP fault proxy: refused connections, black holes, outages.
//!
//! These apply to networked backends only; an in-process broker says so on stderr and passes.

use std::time::Duration;

use bgtask_core::{Client, ErrorKind, Incoming, LeaseRequest, SubmitOptions, Worker};
use bytes::Bytes;
use futures::StreamExt;
use serde_json::json;
use tokio::time::Instant;

use crate::harness::WorkerGuard;
use crate::Harness;

/// Generous bound for any single operation through the proxy (brokers there use ~1 s timeouts).
const BOUND: Duration = Duration::from_secs(4);

/// Connecting while the server refuses connections is an `Unavailable` error, not a hang.
pub async fn refused_connection_is_unavailable(h: Harness) {
    let Some((proxy, _broker)) = h.proxied_broker().await else {
        return;
    };
    proxy.cut();
    let started = Instant::now();
    let result = h.broker_via(&proxy).await;
    let err = result.expect_err("connecting through a cut proxy succeeded");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(started.elapsed() < BOUND, "took {:?}", started.elapsed());
}

/// In a black hole (connections open, nothing flows) every operation fails within its bound.
pub async fn calls_are_bounded_in_a_black_hole(h: Harness) {
    let Some((proxy, broker)) = h.proxied_broker().await else {
        return;
    };
    proxy.black_hole();
    let key = h.name("bh");
    let ops: Vec<(
        &str,
        futures::future::BoxFuture<'_, bgtask_core::Result<()>>,
    )> = vec![
        (
            "publish",
            Box::pin(async {
                broker
                    .publish(&key, Bytes::from_static(b"x"))
                    .await
                    .map(drop)
            }),
        ),
        (
            "subscribe",
            Box::pin(async { broker.subscribe(&h.name("bh2")).await.map(drop) }),
        ),
        (
            "acquire",
            Box::pin(async {
                broker
                    .acquire(&key, LeaseRequest::new(Duration::from_secs(5)))
                    .await
                    .map(drop)
            }),
        ),
        (
            "count",
            Box::pin(async { broker.count(&key).await.map(drop) }),
        ),
        (
            "leases",
            Box::pin(async { broker.leases(&key).await.map(drop) }),
        ),
    ];
    for (name, op) in ops {
        let started = Instant::now();
        let result = tokio::time::timeout(BOUND * 2, op).await;
        let took = started.elapsed();
        let err = result
            .unwrap_or_else(|_| panic!("{name} hung in a black hole"))
            .expect_err(name);
        assert!(err.kind() == ErrorKind::Unavailable, "{name}: {err}");
        assert!(took < BOUND, "{name} took {took:?}");
    }
}

/// While the broker is unreachable, neither submit nor the reply waits past the deadline.
pub async fn no_task_call_waits_past_its_deadline(h: Harness) {
    let Some((proxy, broker)) = h.proxied_broker().await else {
        return;
    };
    let client = Client::new(broker, h.client_config()).await.unwrap();
    for cut in [true, false] {
        if cut {
            proxy.cut();
        } else {
            proxy.black_hole();
        }
        let timeout = Duration::from_millis(1500);
        let started = Instant::now();
        let result = match client
            .submit_with("any", &json!({}), SubmitOptions::new().timeout(timeout))
            .await
        {
            Ok(handle) => handle.reply().await.map(drop),
            Err(e) => Err(e),
        };
        let took = started.elapsed();
        let err = result.expect_err("a task succeeded with the broker unreachable");
        assert!(
            matches!(err.kind(), ErrorKind::Unavailable | ErrorKind::TimedOut),
            "{err}"
        );
        assert!(
            took <= timeout + Duration::from_millis(250),
            "cut={cut}: took {took:?}"
        );
    }
}

async fn outage_then_resume(h: Harness, outage: Duration) {
    let Some((proxy, broker)) = h.proxied_broker().await else {
        return;
    };
    let channel = h.name("resume");
    let mut sub = broker.subscribe(&channel).await.unwrap();
    let direct = h.broker().await;
    direct
        .publish(&channel, Bytes::from_static(b"before"))
        .await
        .unwrap();
    assert_eq!(
        tokio::time::timeout(BOUND, sub.next()).await.unwrap(),
        Some(Incoming::Message(Bytes::from_static(b"before")))
    );
    proxy.cut();
    tokio::time::sleep(outage).await;
    proxy.pass();
    let restored = Instant::now();
    // The stream says messages may have been missed, then delivers new ones.
    let mut saw_gap = false;
    let deadline = restored + Duration::from_secs(15);
    loop {
        assert!(
            Instant::now() < deadline,
            "the subscription did not come back"
        );
        direct
            .publish(&channel, Bytes::from_static(b"after"))
            .await
            .unwrap();
        match tokio::time::timeout(Duration::from_millis(200), sub.next()).await {
            Ok(Some(Incoming::Gap)) => saw_gap = true,
            Ok(Some(Incoming::Message(m))) if m.as_ref() == b"after" => break,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) => {}
        }
    }
    assert!(saw_gap, "no gap signalled after the outage");
    eprintln!(
        "subscription back {:?} after a {outage:?} outage",
        restored.elapsed()
    );
}

/// A subscription comes back by itself after a 3 s outage, and says it may have missed messages.
pub async fn subscription_resumes_after_outage(h: Harness) {
    outage_then_resume(h, Duration::from_secs(3)).await;
}

/// A subscription comes back after a 20 s outage (past any fixed retry budget).
pub async fn subscription_resumes_after_20s_outage(h: Harness) {
    outage_then_resume(h, Duration::from_secs(20)).await;
}

/// After a 20 s outage of client and worker, a task submitted afterwards completes.
pub async fn task_completes_after_outage(h: Harness) {
    let Some((proxy, worker_broker)) = h.proxied_broker().await else {
        return;
    };
    let client_broker = h.broker_via(&proxy).await.unwrap();
    let worker = Worker::new(worker_broker, h.worker_config(&["echo"]))
        .await
        .unwrap();
    let _guard = WorkerGuard::spawn(worker, 4, |task| async move { Ok(task.json()) });
    let client = Client::new(client_broker, h.client_config()).await.unwrap();
    let reply = client
        .submit("echo", &json!({"n": 1}))
        .await
        .unwrap()
        .reply()
        .await;
    assert_eq!(reply.unwrap().json(), json!({"n": 1}));
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(20)).await;
    proxy.pass();
    let restored = Instant::now();
    loop {
        let options = SubmitOptions::new().timeout(Duration::from_secs(2));
        let result = match client.submit_with("echo", &json!({"n": 2}), options).await {
            Ok(handle) => handle.reply().await,
            Err(e) => Err(e),
        };
        match result {
            Ok(reply) => {
                assert_eq!(reply.json(), json!({"n": 2}));
                break;
            }
            Err(e) => assert!(
                restored.elapsed() < Duration::from_secs(20),
                "no task completed after the outage: {e}"
            ),
        }
    }
    eprintln!(
        "tasks complete again {:?} after the outage",
        restored.elapsed()
    );
}
