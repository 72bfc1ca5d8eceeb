//! A node of a clustered broker fails under load: a runner any clustered backend calls with its
//! own brokers and its own fault (kill a NATS node, SIGSTOP it, kill a Redis master...).
//!
//! Not part of [`conformance_suite!`](crate::conformance_suite): a backend's cluster tests start
//! a cluster of their own (the fault kills its nodes), build the brokers, and call
//! [`node_failure_under_load`] from a scenario run with [`run`](crate::run):
//!
//! ```ignore
//! bgtask_conformance::run("kill_a_node_under_load", factory, |h| async move {
//!     let (worker, client) = (h.broker().await, h.broker().await);
//!     let report = node_failure_under_load(&h, worker, client, &LoadPlan::default(), || async {
//!         cluster.kill(2);
//!     })
//!     .await;
//!     report.assert_clean(Some(Duration::from_secs(10)));
//! })
//! .await;
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bgtask_core::{Client, ClientConfig, DynBroker, ErrorKind, KeyLimit, SubmitOptions, Worker};
use serde_json::json;
use tokio::time::Instant;

use crate::harness::WorkerGuard;
use crate::Harness;

/// How many whole seconds in a row throughput must stay at 80 % to count as recovered.
pub const SUSTAINED: u32 = 3;

/// The load of [`node_failure_under_load`].
#[derive(Debug, Clone)]
pub struct LoadPlan {
    /// Tasks submitted in all. Default 10,000.
    pub tasks: u64,
    /// Tasks in flight at most (submitted and not ended), and the worker's concurrency.
    /// Default 256.
    pub concurrency: usize,
    /// Tasks submitted per second (fewer when `concurrency` are in flight). A steady rate keeps
    /// the load going through the fault and after it: tasks that fail at once (`NoWorker`, say)
    /// would otherwise race through the rest of the tasks in no time. Default 400, below what
    /// one worker serves in the tests' unoptimized build on a 2-core machine (500-800/s on NATS).
    pub rate: u32,
    /// Each task's timeout. Default 2 s.
    pub timeout: Duration,
    /// How late past its timeout a task may end before it counts as late. Default 500 ms.
    pub grace: Duration,
    /// When the fault starts, from the first submit. Default 4 s.
    pub fault_after: Duration,
    /// How many task key values (`user`) the tasks spread over, each with a per-key limit
    /// high enough never to refuse. Default 50.
    pub keys: u64,
}

impl Default for LoadPlan {
    fn default() -> Self {
        LoadPlan {
            tasks: 10_000,
            concurrency: 256,
            rate: 400,
            timeout: Duration::from_secs(2),
            grace: Duration::from_millis(500),
            fault_after: Duration::from_secs(4),
            keys: 50,
        }
    }
}

/// What [`node_failure_under_load`] measured.
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// Tasks submitted.
    pub tasks: u64,
    /// Tasks that ended (a reply or an error): each once, or the runner panics.
    pub ended: u64,
    /// Tasks that ended with their reply.
    pub replies: u64,
    /// Tasks that ended with an error, by kind.
    pub errors: HashMap<ErrorKind, u64>,
    /// Tasks that ended later than their timeout plus the grace.
    pub late: u64,
    /// Tasks the worker ran more than once.
    pub ran_twice: u64,
    /// Leases left on the task keys once the longest lease's TTL has passed.
    pub leases_left: u64,
    /// Replies per whole second since the first submit (the last second may be partial).
    pub per_second: Vec<u64>,
    /// Replies per second before the fault (mean of the whole seconds from 1 s to the fault):
    /// the submit rate when the backend keeps up.
    pub before: f64,
    /// When the fault started, from the first submit.
    pub fault_at: Duration,
    /// How long the fault closure ran (a kill: about nothing; a 10 s stop: about 10 s).
    pub fault_length: Duration,
    /// From the end of the fault closure to the end of the first of [`SUSTAINED`] whole seconds
    /// in a row (counted from the fault's end) with at least 80 % of [`before`](Self::before)
    /// replies each: back, and staying back (a relapse, say a stall a few seconds after a node
    /// returns, pushes it later). `None` when the load ended first.
    pub recovered: Option<Duration>,
    /// The run, first submit to last end.
    pub elapsed: Duration,
}

impl LoadReport {
    /// Every task ended exactly once, with a reply or an `Unavailable`, `TimedOut` or `NoWorker`
    /// error; none late, none run twice, no lease left, some replies; and, when `recovery` is
    /// given, throughput was back to 80 % within it of the fault's end.
    pub fn assert_clean(&self, recovery: Option<Duration>) {
        assert_eq!(self.ended, self.tasks, "tasks that never ended: {self}");
        assert_eq!(self.late, 0, "tasks ended after their deadline: {self}");
        assert_eq!(self.ran_twice, 0, "tasks ran twice: {self}");
        assert_eq!(self.leases_left, 0, "leases left after their TTL: {self}");
        assert!(self.replies > 0, "no task succeeded: {self}");
        for kind in self.errors.keys() {
            assert!(
                matches!(
                    kind,
                    ErrorKind::Unavailable | ErrorKind::TimedOut | ErrorKind::NoWorker
                ),
                "unexpected error kind {kind:?}: {self}"
            );
        }
        if let Some(bound) = recovery {
            match self.recovered {
                Some(took) => assert!(
                    took <= bound,
                    "throughput back to 80 % only {took:?} after the fault: {self}"
                ),
                None => panic!("throughput never came back to 80 %: {self}"),
            }
        }
    }
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} tasks, {} ended ({} replies, errors {:?}), {} late, {} ran twice, {} leases left; \
             {:.0} replies/s before the fault at {:.1} s (lasting {:.1} s); back to 80 % (for \
             {SUSTAINED} s) {} after \
             it; run {:.1} s; replies per second {:?}",
            self.tasks,
            self.ended,
            self.replies,
            self.errors,
            self.late,
            self.ran_twice,
            self.leases_left,
            self.before,
            self.fault_at.as_secs_f64(),
            self.fault_length.as_secs_f64(),
            match self.recovered {
                Some(d) => format!("{:.1} s", d.as_secs_f64()),
                None => "never (the load ended first)".to_owned(),
            },
            self.elapsed.as_secs_f64(),
            self.per_second,
        )
    }
}

/// Run `plan.tasks` tasks, `plan.rate` a second and at most `plan.concurrency` at a time, from a client on `client` to one worker
/// on `worker` (concurrency `plan.concurrency`), and run `fault` `plan.fault_after` into the
/// run. Count how each task ended (exactly once each, or panic), how many the worker ran twice,
/// how many ended late, the replies per second, and, once the leases' TTL has passed, the
/// leases left on the task keys (read through a new broker from `h`). The caller judges the
/// report, usually with [`LoadReport::assert_clean`], and prints it.
pub async fn node_failure_under_load<F, Fut>(
    h: &Harness,
    worker: DynBroker,
    client: DynBroker,
    plan: &LoadPlan,
    fault: F,
) -> LoadReport
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let executions: Arc<Mutex<HashMap<u64, u32>>> = Arc::default();
    let worker = Worker::new(worker, h.worker_config(&["load"]))
        .await
        .expect("start the worker");
    let guard = {
        let executions = executions.clone();
        WorkerGuard::spawn(worker, plan.concurrency, move |task| {
            let executions = executions.clone();
            async move {
                let n = task.json()["n"].as_u64().unwrap_or(u64::MAX);
                *executions
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(n)
                    .or_default() += 1;
                Ok(json!({ "n": n }))
            }
        })
    };
    let config = ClientConfig {
        task_key: Some("user".into()),
        per_key_limit: KeyLimit::Max(1_000_000),
        lease_margin: Duration::from_millis(500),
        ..h.client_config()
    };
    let client = Client::new(client, config).await.expect("start the client");

    let started = Instant::now();
    let fault_at = started + plan.fault_after;
    let fault = tokio::spawn(async move {
        tokio::time::sleep_until(fault_at).await;
        let began = Instant::now();
        fault().await;
        (began, Instant::now())
    });
    let slots = Arc::new(tokio::sync::Semaphore::new(plan.concurrency));
    let mut running = tokio::task::JoinSet::new();
    let mut outcomes = Vec::with_capacity(plan.tasks as usize);
    let mut ticker = tokio::time::interval(Duration::from_secs(1) / plan.rate.max(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 0..plan.tasks {
        ticker.tick().await;
        let slot = slots.clone().acquire_owned().await.expect("open semaphore");
        let client = client.clone();
        let (timeout, keys) = (plan.timeout, plan.keys);
        running.spawn(async move {
            let _slot = slot;
            let submitted = Instant::now();
            let payload = json!({ "n": n, "user": format!("u{}", n % keys) });
            let options = SubmitOptions::new().timeout(timeout);
            let result = match client.submit_with("load", &payload, options).await {
                Ok(handle) => handle.reply().await.map(|r| r.json()),
                Err(e) => Err(e),
            };
            let ended = Instant::now();
            (n, ended - submitted, ended, result)
        });
        // Collect as we go, so the set holds few finished futures.
        while let Some(done) = running.try_join_next() {
            outcomes.push(done.expect("a task future panicked"));
        }
    }
    let mut ended_ids = HashMap::new();
    let (mut replies, mut errors, mut late) = (0u64, HashMap::new(), 0u64);
    let mut reply_times = Vec::new();
    let mut last_end = started;
    while let Some(done) = running.join_next().await {
        outcomes.push(done.expect("a task future panicked"));
    }
    for (n, took, ended, result) in outcomes {
        assert!(ended_ids.insert(n, ()).is_none(), "task {n} ended twice");
        last_end = last_end.max(ended);
        if took > plan.timeout + plan.grace {
            late += 1;
        }
        match result {
            Ok(reply) => {
                assert_eq!(reply["n"], json!(n), "a reply for another task");
                replies += 1;
                reply_times.push(ended - started);
            }
            Err(e) => *errors.entry(e.kind()).or_insert(0u64) += 1,
        }
    }
    let (fault_began, fault_ended) = fault.await.expect("the fault panicked");
    drop(guard);

    let seconds = (last_end - started).as_secs() as usize + 1;
    let mut per_second = vec![0u64; seconds];
    for t in &reply_times {
        per_second[(t.as_secs() as usize).min(seconds - 1)] += 1;
    }
    let fault_second = (fault_began - started).as_secs() as usize;
    let warm = &per_second[1.min(fault_second)..fault_second.max(1).min(seconds)];
    let before = warm.iter().sum::<u64>() as f64 / warm.len().max(1) as f64;
    // Whole seconds from the fault's end; the first of SUSTAINED in a row with 80 % of
    // `before` replies each.
    let after_fault = fault_ended - started;
    let mut recovered = None;
    let (mut window, mut good) = (0u32, 0u32);
    loop {
        let from = after_fault + Duration::from_secs(u64::from(window));
        let to = from + Duration::from_secs(1);
        if started + to > last_end {
            break;
        }
        let count = reply_times
            .iter()
            .filter(|t| **t >= from && **t < to)
            .count();
        good = if count as f64 >= 0.8 * before {
            good + 1
        } else {
            0
        };
        if good == SUSTAINED {
            // The end of the first of the SUSTAINED good seconds.
            recovered = Some(Duration::from_secs(u64::from(window + 2 - SUSTAINED)));
            break;
        }
        window += 1;
    }

    let ran_twice = executions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .filter(|&&c| c > 1)
        .count() as u64;
    // Leases: none left once the longest lease (timeout + margin) has passed.
    tokio::time::sleep(plan.timeout + Duration::from_millis(600)).await;
    let check = Client::new(h.broker().await, h.client_config())
        .await
        .expect("start a checking client");
    let mut leases_left = 0;
    for user in 0..plan.keys {
        leases_left += check
            .in_flight("load", &format!("u{user}"))
            .await
            .expect("count the leases left");
    }
    LoadReport {
        tasks: plan.tasks,
        ended: ended_ids.len() as u64,
        replies,
        errors,
        late,
        ran_twice,
        leases_left,
        per_second,
        before,
        fault_at: fault_began - started,
        fault_length: fault_ended - fault_began,
        recovered,
        elapsed: last_end - started,
    }
}
