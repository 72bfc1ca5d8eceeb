//! What the page shows, sampled from the broker: one [`Snapshot`] per interval, and the
//! history of each task name's completions for its tasks/s chart.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bgtask::{Blacklist, DynBroker, ListedWorker, Namespace};
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;

/// Key values listed per snapshot (the first page of `inspect keys`).
const KEYS_SHOWN: usize = 100;

/// The chart: this many buckets of [`BUCKET`] each, oldest first (5 minutes).
const BUCKETS: usize = 60;
const BUCKET: Duration = Duration::from_secs(5);

/// The "tasks/s" figure: completions over this last stretch.
const RATE_WINDOW: Duration = Duration::from_secs(10);

/// Where the page is looking (no secret in it: the broker URL is redacted).
#[derive(Debug, Clone, Serialize)]
pub(super) struct Overview {
    pub(super) namespace: String,
    pub(super) broker: String,
    pub(super) writes: bool,
}

/// One reading of the namespace, as `/api/*` and the event stream serve it.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Snapshot {
    pub(super) overview: OverviewNow,
    pub(super) workers: Vec<WorkerRow>,
    pub(super) tasks: Vec<TaskRow>,
    pub(super) keys: KeysRow,
    pub(super) blacklist: Vec<BlacklistRow>,
}

#[derive(Debug, Clone, Serialize)]
pub(super) struct OverviewNow {
    #[serde(flatten)]
    pub(super) overview: Overview,
    /// When this snapshot was taken, Unix ms.
    pub(super) updated_ms: u64,
    /// Why the last reading failed, if it did (the rest is then the reading before).
    pub(super) error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub(super) struct WorkerRow {
    id: String,
    host: String,
    pid: u32,
    tasks: Vec<String>,
    targets: Vec<String>,
    concurrency: Option<u64>,
    in_flight: u64,
    running: BTreeMap<String, u64>,
    last_seen_ms: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub(super) struct Outcomes {
    success: u64,
    error: u64,
    failed: u64,
}

#[derive(Debug, Clone, Serialize)]
pub(super) struct TaskRow {
    task: String,
    /// Live workers that serve it by name.
    workers: u64,
    in_flight: u64,
    /// Completions of the live workers since they started.
    completed: Outcomes,
    /// Completions per second over the last 10 s.
    per_second: f64,
    /// Completions per second in each 5 s of the last 5 minutes, oldest first.
    history: Vec<f64>,
    /// The slowest worker's median and 99th percentile run time of its last 256 tasks.
    p50_ms: Option<u64>,
    p99_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub(super) struct KeysRow {
    pub(super) keys: Vec<bgtask::KeyInFlight>,
    /// More key values than shown.
    pub(super) more: bool,
}

#[derive(Debug, Clone, Serialize)]
pub(super) struct BlacklistRow {
    task: String,
    value: String,
    reason: String,
    remaining_ms: u64,
}

fn millis(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(millis)
        .unwrap_or_default()
}

impl Snapshot {
    /// Before the first reading.
    pub(super) fn empty(overview: &Overview) -> Snapshot {
        Snapshot {
            overview: OverviewNow {
                overview: overview.clone(),
                updated_ms: 0,
                error: None,
            },
            workers: Vec::new(),
            tasks: Vec::new(),
            keys: KeysRow::default(),
            blacklist: Vec::new(),
        }
    }
}

/// Reads the broker every interval and publishes a [`Snapshot`].
pub(super) struct Sampler {
    broker: DynBroker,
    namespace: Namespace,
    blacklist: Blacklist,
    overview: Overview,
    /// Per task name: (when, completions of the live workers), oldest first.
    history: HashMap<String, VecDeque<(Instant, u64)>>,
    last: Option<Snapshot>,
}

impl Sampler {
    pub(super) fn new(
        broker: DynBroker,
        namespace: Namespace,
        blacklist: Blacklist,
        overview: Overview,
    ) -> Sampler {
        Sampler {
            blacklist,
            broker,
            namespace,
            overview,
            history: HashMap::new(),
            last: None,
        }
    }

    /// Sample until nobody holds the receiving side of `out` any more.
    pub(super) async fn run(mut self, every: Duration, out: watch::Sender<Arc<Snapshot>>) {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let snapshot = match self.read().await {
                Ok(snapshot) => snapshot,
                Err(error) => {
                    let mut last = self
                        .last
                        .clone()
                        .unwrap_or_else(|| Snapshot::empty(&self.overview));
                    last.overview.error = Some(error.to_string());
                    last.overview.updated_ms = unix_ms();
                    last
                }
            };
            self.last = Some(snapshot.clone());
            // Sent even with no page open: a page that opens gets the latest at once.
            out.send_replace(Arc::new(snapshot));
        }
    }

    async fn read(&mut self) -> bgtask::Result<Snapshot> {
        let workers = bgtask::list_workers(&self.broker, &self.namespace).await?;
        let keys =
            bgtask::keys_in_flight(&self.broker, &self.namespace, None, None, KEYS_SHOWN).await?;
        let blacklist = self.blacklist.list().await?;
        let tasks = self.tasks(&workers, Instant::now());
        Ok(Snapshot {
            overview: OverviewNow {
                overview: self.overview.clone(),
                updated_ms: unix_ms(),
                error: None,
            },
            workers: workers.iter().map(worker_row).collect(),
            tasks,
            keys: KeysRow {
                more: keys.next.is_some(),
                keys: keys.keys,
            },
            blacklist: blacklist
                .into_iter()
                .map(|e| BlacklistRow {
                    task: e.task,
                    value: e.value,
                    reason: e.reason,
                    remaining_ms: millis(e.remaining),
                })
                .collect(),
        })
    }

    /// Per task name over the live workers, and the history updated with this reading.
    fn tasks(&mut self, workers: &[ListedWorker], now: Instant) -> Vec<TaskRow> {
        let mut rows: BTreeMap<String, TaskRow> = BTreeMap::new();
        for w in workers {
            for task in &w.record.tasks {
                entry(&mut rows, task).workers += 1;
            }
            for (task, n) in &w.record.running {
                entry(&mut rows, task).in_flight += n;
            }
            for (task, totals) in &w.record.completed {
                let r = entry(&mut rows, task);
                r.completed.success += totals.success;
                r.completed.error += totals.error;
                r.completed.failed += totals.failed;
                r.p50_ms = r.p50_ms.max(totals.p50_ms);
                r.p99_ms = r.p99_ms.max(totals.p99_ms);
            }
        }
        let keep = BUCKET * BUCKETS as u32 + RATE_WINDOW;
        for r in rows.values_mut() {
            let total = r.completed.success + r.completed.error + r.completed.failed;
            let samples = self.history.entry(r.task.clone()).or_default();
            samples.push_back((now, total));
            while samples
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > keep)
            {
                samples.pop_front();
            }
            r.per_second = rate(samples, now.checked_sub(RATE_WINDOW), now);
            r.history = (0..BUCKETS)
                .map(|i| {
                    let end = now.checked_sub(BUCKET * (BUCKETS - 1 - i) as u32);
                    let start = end.and_then(|e| e.checked_sub(BUCKET));
                    match end {
                        Some(end) => rate(samples, start, end),
                        None => 0.0,
                    }
                })
                .collect();
        }
        self.history.retain(|task, _| rows.contains_key(task));
        rows.into_values().collect()
    }
}

fn entry<'a>(rows: &'a mut BTreeMap<String, TaskRow>, task: &str) -> &'a mut TaskRow {
    rows.entry(task.to_owned()).or_insert_with(|| TaskRow {
        task: task.to_owned(),
        workers: 0,
        in_flight: 0,
        completed: Outcomes::default(),
        per_second: 0.0,
        history: Vec::new(),
        p50_ms: None,
        p99_ms: None,
    })
}

/// Completions per second between `start` and `end` from the samples (the last sample at or
/// before each instant; a total that fell, as when a worker left, counts as no completions).
fn rate(samples: &VecDeque<(Instant, u64)>, start: Option<Instant>, end: Instant) -> f64 {
    let at = |when: Instant| {
        samples
            .iter()
            .rev()
            .find(|(t, _)| *t <= when)
            .map(|(t, total)| (*t, *total))
    };
    let (Some(start), Some((t1, n1))) = (start, at(end)) else {
        return 0.0;
    };
    let Some((t0, n0)) = at(start).or_else(|| samples.front().copied()) else {
        return 0.0;
    };
    let seconds = t1.saturating_duration_since(t0).as_secs_f64();
    if seconds <= 0.0 {
        return 0.0;
    }
    n1.saturating_sub(n0) as f64 / seconds
}

fn worker_row(w: &ListedWorker) -> WorkerRow {
    let r = &w.record;
    WorkerRow {
        id: r.id.clone(),
        host: r.host.clone(),
        pid: r.pid,
        tasks: r.tasks.clone(),
        targets: r.targets.clone(),
        concurrency: r.concurrency,
        in_flight: r.in_flight,
        running: r.running.clone(),
        last_seen_ms: millis(w.last_seen),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_come_from_the_samples_around_each_instant() {
        let t0 = Instant::now();
        let s = |secs: u64, total: u64| (t0 + Duration::from_secs(secs), total);
        let samples: VecDeque<_> = [s(0, 0), s(5, 50), s(10, 150), s(15, 100)].into();
        let at = |secs| t0 + Duration::from_secs(secs);
        assert_eq!(rate(&samples, Some(at(0)), at(10)), 15.0);
        assert_eq!(rate(&samples, Some(at(5)), at(10)), 20.0);
        // A worker left: the total fell; no negative rate.
        assert_eq!(rate(&samples, Some(at(10)), at(15)), 0.0);
        assert_eq!(rate(&samples, None, at(15)), 0.0);
    }
}
