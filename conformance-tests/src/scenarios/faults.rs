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

/// How an outage under load is caused.
#[derive(Debug, Clone, Copy)]
enum Outage {
    /// Connections reset and new ones refused.
    Cut,
    /// Connections stay open and nothing flows.
    BlackHole,
}

/// How soon after an outage under load the first new task must be served. Redis and NATS take
/// 0.02-0.65 s; PostgreSQL after a black hole took 0.44 s on one machine and 1.4-2.1 s on another
/// (the same code, measured side by side), so the bound leaves room for the slower server.
pub const RECOVERY: Duration = Duration::from_secs(3);

/// 10,000 tasks at a steady rate (500/s) while the broker goes away for `length`, 5 s into the
/// run. Every task ends exactly once (a reply or a clear error), none after its deadline, none
/// runs twice, workers serve new tasks within [`RECOVERY`] of the broker coming back, and no
/// lease is left once the leases' TTL has passed.
async fn outage_under_load(h: Harness, outage: Outage, length: Duration) {
    use std::sync::Arc;

    let Some((proxy, worker_broker)) = h.proxied_broker().await else {
        return;
    };
    let proxy = Arc::new(proxy);
    let workers = vec![worker_broker, h.broker_via(&proxy).await.unwrap()];
    let creator = h.broker_via(&proxy).await.unwrap();
    // The brokers' connections go through the proxy: it lives as long as the load.
    let _proxy = proxy.clone();
    let fault = move || async move {
        match outage {
            Outage::Cut => proxy.cut(),
            Outage::BlackHole => proxy.black_hole(),
        }
        tokio::time::sleep(length).await;
        proxy.pass();
    };
    let report = under_load(&h, 500, workers, creator, fault).await;
    eprintln!("outage under load ({outage:?}, {length:?}): {report}");
    report.check();
    assert!(
        report.recovered <= RECOVERY,
        "workers served again only {:?} after the broker came back",
        report.recovered
    );
}

/// What [`under_load`] saw.
#[derive(Debug)]
pub struct LoadReport {
    /// Tasks submitted; each ended exactly once (asserted while running).
    pub tasks: u64,
    /// Tasks that got their reply.
    pub replies: u64,
    /// Tasks that ended with an error, by kind.
    pub errors: std::collections::HashMap<ErrorKind, u64>,
    /// Tasks that ended later than their deadline plus a 500 ms grace.
    pub late: u64,
    /// Tasks a worker ran more than once.
    pub twice: u64,
    /// From the end of the fault to the first reply of a task submitted after it (or of a
    /// probe, when the load had ended by then).
    pub recovered: Duration,
    /// Leases of the run's key values left once the longest lease's TTL had passed.
    pub leases_left: u64,
    /// Replies in each second of the run.
    pub per_second: Vec<u64>,
    /// When the fault began and ended, from the start of the run.
    pub fault: (Duration, Duration),
}

impl LoadReport {
    /// Assert what every fault must leave true: every task ended in time, none ran twice, each
    /// error is one a fault explains, no lease is left, and some tasks succeeded.
    pub fn check(&self) {
        assert_eq!(self.late, 0, "tasks ended after their deadline: {self}");
        assert_eq!(self.twice, 0, "tasks executed twice: {self}");
        for kind in self.errors.keys() {
            assert!(
                // NoWorker: the creator's connection came back before the workers' subscriptions.
                matches!(
                    kind,
                    ErrorKind::Unavailable | ErrorKind::TimedOut | ErrorKind::NoWorker
                ),
                "unexpected error kind {kind:?}: {self}"
            );
        }
        assert_eq!(self.leases_left, 0, "leases left after their TTL: {self}");
        assert!(self.replies > 0, "no task succeeded at all: {self}");
    }

    /// The replies per second before the fault (the seconds after the first, which warms up).
    pub fn rate_before(&self) -> f64 {
        let before = &self.per_second[1..(self.fault.0.as_secs() as usize).max(2)];
        before.iter().sum::<u64>() as f64 / before.len() as f64
    }

    /// How long after the fault began the replies per second were back to `share` of
    /// [`rate_before`](Self::rate_before), and stayed there for 3 full seconds (or to the end of
    /// the load); `None` if they never were.
    pub fn throughput_back(&self, share: f64) -> Option<Duration> {
        let floor = share * self.rate_before();
        let from = self.fault.0.as_secs() as usize;
        // The last second is partial (the load's tail).
        let full = self.per_second.len().saturating_sub(1);
        (from..full)
            .find(|&s| {
                self.per_second[s..full.min(s + 3)]
                    .iter()
                    .all(|&n| n as f64 >= floor)
            })
            .map(|s| Duration::from_secs(s as u64 + 1).saturating_sub(self.fault.0))
    }
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} tasks ended once each: {} replies, errors {:?}; {} after deadline, {} executed \
             twice; served again {:?} after the fault ended; {} leases left; replies per second \
             {:?} (fault from {:?} to {:?})",
            self.tasks,
            self.replies,
            self.errors,
            self.late,
            self.twice,
            self.recovered,
            self.leases_left,
            self.per_second,
            self.fault.0,
            self.fault.1,
        )
    }
}

/// 10,000 keyed tasks (50 key values) at a steady `per_second` (at most 500; 500 for every
/// scenario here), 2 s timeout, served by one worker (256 at a time) on each of `workers` and
/// submitted through `creator`, while `fault` runs from 5 s into the load: it causes the fault
/// and returns when it is over. Each task's ending is checked as it comes (exactly once, the
/// right reply); what else happened is in the report, for the caller to assert
/// ([`LoadReport::check`]).
pub async fn under_load<F, Fut>(
    h: &Harness,
    per_second: u64,
    workers: Vec<bgtask_core::DynBroker>,
    creator: bgtask_core::DynBroker,
    fault: F,
) -> LoadReport
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    use bgtask_core::{ClientConfig, KeyLimit};

    const TASKS: u64 = 10_000;
    const TIMEOUT: Duration = Duration::from_secs(2);
    const GRACE: Duration = Duration::from_millis(500);
    let executions: Arc<Mutex<HashMap<u64, u32>>> = Arc::default();
    let mut guards = Vec::new();
    for broker in workers {
        let worker = Worker::new(broker, h.worker_config(&["load"]))
            .await
            .unwrap();
        let executions = executions.clone();
        guards.push(WorkerGuard::spawn(worker, 256, move |task| {
            let executions = executions.clone();
            async move {
                let n = task.json()["n"].as_u64().unwrap_or(u64::MAX);
                *executions.lock().unwrap().entry(n).or_default() += 1;
                Ok(json!({ "n": n }))
            }
        }));
    }
    let config = ClientConfig {
        task_key: Some("user".into()),
        per_key_limit: KeyLimit::Max(10_000),
        lease_margin: Duration::from_millis(500),
        ..h.client_config()
    };
    let client = Client::new(creator, config).await.unwrap();

    let started = Instant::now();
    let fault_at = started + Duration::from_secs(5);
    let faults = tokio::spawn(async move {
        tokio::time::sleep_until(fault_at).await;
        fault().await;
        Instant::now()
    });
    let mut ticker =
        tokio::time::interval(Duration::from_micros(1_000_000 / per_second.clamp(1, 500)));
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..TASKS {
        ticker.tick().await;
        let client = client.clone();
        tasks.spawn(async move {
            let submitted = Instant::now();
            let payload = json!({ "n": n, "user": format!("u{}", n % 50) });
            let options = SubmitOptions::new().timeout(TIMEOUT);
            let result = match client.submit_with("load", &payload, options).await {
                Ok(handle) => handle.reply().await.map(|r| r.json()),
                Err(e) => Err(e),
            };
            (n, submitted, submitted.elapsed(), result)
        });
    }
    let mut ended = HashMap::new();
    let (mut replies, mut errors, mut late) = (0u64, HashMap::new(), 0u64);
    let mut done: Vec<(Instant, Instant)> = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let (n, submitted, took, result) = joined.expect("a task future panicked");
        assert!(ended.insert(n, ()).is_none(), "task {n} ended twice");
        if took > TIMEOUT + GRACE {
            late += 1;
        }
        match result {
            Ok(reply) => {
                assert_eq!(reply["n"], json!(n), "a reply for another task");
                replies += 1;
                done.push((submitted, submitted + took));
            }
            Err(e) => *errors.entry(e.kind()).or_insert(0u64) += 1,
        }
    }
    let restore_at = faults.await.unwrap();
    assert_eq!(ended.len() as u64, TASKS);
    let twice = executions
        .lock()
        .unwrap()
        .values()
        .filter(|&&c| c > 1)
        .count() as u64;
    let mut per_second = Vec::new();
    for (_, at) in &done {
        let second = (*at - started).as_secs() as usize;
        if per_second.len() <= second {
            per_second.resize(second + 1, 0);
        }
        per_second[second] += 1;
    }
    // The first reply to a task submitted after the fault ended.
    let first_after_restore = done
        .iter()
        .filter(|(submitted, _)| *submitted >= restore_at)
        .map(|(_, at)| *at - restore_at)
        .min();

    // Recovery: new tasks are served after the fault: the first reply to a task submitted after
    // it, or (when the load ended before it) a probe.
    let probe_from = Instant::now().max(restore_at);
    tokio::time::sleep_until(probe_from).await;
    let recovered = if let Some(first) = first_after_restore {
        first
    } else {
        loop {
            let options = SubmitOptions::new().timeout(Duration::from_millis(500));
            let payload = json!({ "n": u64::MAX, "user": "probe" });
            let ok = match client.submit_with("load", &payload, options).await {
                Ok(handle) => handle.reply().await.is_ok(),
                Err(_) => false,
            };
            if ok {
                break probe_from.elapsed() + (probe_from - restore_at);
            }
            assert!(
                probe_from.elapsed() < Duration::from_secs(15),
                "workers never came back"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };

    // Leases: none left once the longest lease (timeout + margin) has passed.
    tokio::time::sleep(TIMEOUT + Duration::from_millis(600)).await;
    let direct = Client::new(h.broker().await, h.client_config())
        .await
        .unwrap();
    let mut leases_left = 0;
    for user in 0..50 {
        leases_left += direct.in_flight("load", &format!("u{user}")).await.unwrap();
    }
    drop(guards);
    LoadReport {
        tasks: TASKS,
        replies,
        errors,
        late,
        twice,
        recovered,
        leases_left,
        per_second,
        fault: (fault_at - started, restore_at - started),
    }
}

/// Outage under load: a 5 s cut.
pub async fn outage_under_load_5s(h: Harness) {
    outage_under_load(h, Outage::Cut, Duration::from_secs(5)).await;
}

/// Outage under load: a 30 s cut.
pub async fn outage_under_load_30s(h: Harness) {
    outage_under_load(h, Outage::Cut, Duration::from_secs(30)).await;
}

/// Outage under load: a 5 s black hole (connections open, nothing flows).
pub async fn black_hole_under_load(h: Harness) {
    outage_under_load(h, Outage::BlackHole, Duration::from_secs(5)).await;
}

/// While the broker is cut, then black-holed, every call (three rounds of each) fails with
/// `Unavailable` within its bound; afterwards the same broker works again: its leases are
/// there and a new subscription receives.
pub async fn every_call_is_bounded_while_cut_and_recovers(h: Harness) {
    let Some((proxy, b)) = h.proxied_broker().await else {
        return;
    };
    let key = h.name("key");
    let lease = b
        .acquire(&key, LeaseRequest::new(Duration::from_secs(30)))
        .await
        .unwrap()
        .lease
        .unwrap();
    for mode in ["cut", "black hole"] {
        if mode == "cut" {
            proxy.cut();
        } else {
            proxy.black_hole();
        }
        // Each call: an Unavailable error within the broker's ~1 s bound, plus slack.
        let bound = Duration::from_millis(1500);
        macro_rules! bounded {
            ($name:literal, $call:expr) => {{
                let started = Instant::now();
                let result = tokio::time::timeout(Duration::from_secs(10), $call)
                    .await
                    .unwrap_or_else(|_| panic!("{} hung ({mode})", $name));
                let took = started.elapsed();
                let err = result.map(drop).expect_err($name);
                assert_eq!(
                    err.kind(),
                    ErrorKind::Unavailable,
                    "{} ({mode}): {err}",
                    $name
                );
                assert!(took < bound, "{} ({mode}) took {took:?}", $name);
            }};
        }
        let sub_channel = h.name(&format!("{mode}:sub"));
        for _ in 0..3 {
            bounded!("publish", b.publish(&key, Bytes::from_static(b"x")));
            bounded!("subscribe", b.subscribe(&sub_channel));
            bounded!(
                "acquire",
                b.acquire(&key, LeaseRequest::new(Duration::from_secs(5)))
            );
            bounded!("release", b.release(&key, &lease));
            bounded!("leases", b.leases(&key));
            bounded!("count", b.count(&key));
        }
        proxy.pass();
        // Back to normal within a few seconds.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match b.count(&key).await {
                Ok(n) => {
                    assert_eq!(n, 1);
                    break;
                }
                Err(e) => assert!(Instant::now() < deadline, "no recovery ({mode}): {e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let channel = h.name(&format!("{mode}:after"));
        let mut sub = loop {
            match b.subscribe(&channel).await {
                Ok(sub) => break sub,
                Err(e) => assert!(Instant::now() < deadline, "no subscribe ({mode}): {e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        b.publish(&channel, Bytes::from_static(b"back"))
            .await
            .unwrap();
        assert_eq!(
            crate::expect_message(&mut sub).await.as_ref(),
            b"back",
            "no delivery after the {mode}"
        );
    }
}
