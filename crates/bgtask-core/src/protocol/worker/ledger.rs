//! What a worker holds and has done, per task name: the tasks it runs (for cancellation and
//! its presence record's `running`) and what it completed (totals and recent run times, the
//! record's `completed`).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::protocol::presence::TaskTotals;
use crate::status::Status;

/// The name under which a worker counts a task it reached only through a target (metrics,
/// presence): bounded, whatever task names the target's creators send.
pub(super) const TARGET_LABEL: &str = "_target";

/// [`TARGET_LABEL`], shared, for the metrics.
pub(super) fn target_label() -> std::sync::Arc<str> {
    static LABEL: std::sync::OnceLock<std::sync::Arc<str>> = std::sync::OnceLock::new();
    LABEL.get_or_init(|| TARGET_LABEL.into()).clone()
}

/// Run times kept per task name for the presence record's quantiles.
const RECENT_RUNS: usize = 256;

/// A task this worker took and has not completed.
pub(super) struct Held {
    pub(super) cancel: CancellationToken,
    /// Which of the worker's task names it is (`None`: reached through a target).
    pub(super) served: Option<usize>,
    pub(super) since: Instant,
}

/// What a worker completed of one task name.
#[derive(Default)]
struct Completed {
    totals: TaskTotals,
    /// Run times of the last [`RECENT_RUNS`], in milliseconds.
    recent: VecDeque<u32>,
}

/// A task name's part of the presence record: running, and completed.
pub(super) type ByTask = (BTreeMap<String, u64>, BTreeMap<String, TaskTotals>);

#[derive(Default)]
pub(super) struct Ledger {
    running: Mutex<HashMap<String, Held>>,
    /// By index into the worker's task names; `None`: reached through a target.
    completed: Mutex<HashMap<Option<usize>, Completed>>,
}

impl Ledger {
    /// The running tasks by id.
    pub(super) fn running(&self) -> MutexGuard<'_, HashMap<String, Held>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Task `id` ended with `status`: forget it and keep its run time. Returns whether it was
    /// held.
    pub(super) fn ended(&self, id: &str, status: Status) -> bool {
        let Some(held) = self.running().remove(id) else {
            return false;
        };
        let ms = held.since.elapsed().as_millis().min(u128::from(u32::MAX)) as u32;
        let mut completed = self.completed.lock().unwrap_or_else(|e| e.into_inner());
        let entry = completed.entry(held.served).or_default();
        let totals = &mut entry.totals;
        *match status {
            Status::Success => &mut totals.success,
            Status::Error => &mut totals.error,
            Status::Failed => &mut totals.failed,
        } += 1;
        if entry.recent.len() == RECENT_RUNS {
            entry.recent.pop_front();
        }
        entry.recent.push_back(ms);
        true
    }

    /// Running and completed per task name (`names`: the worker's task names), and the number
    /// running in all.
    pub(super) fn by_task(&self, names: &[String]) -> (u64, ByTask) {
        let name = |served: Option<usize>| {
            let name = served.and_then(|i| names.get(i));
            name.map_or(TARGET_LABEL, String::as_str).to_owned()
        };
        let running = self.running();
        let mut by_task = BTreeMap::new();
        for held in running.values() {
            *by_task.entry(name(held.served)).or_insert(0) += 1;
        }
        let completed = self.completed.lock().unwrap_or_else(|e| e.into_inner());
        let completed = completed
            .iter()
            .map(|(served, c)| {
                let (p50_ms, p99_ms) = quantiles(&c.recent);
                let totals = TaskTotals {
                    p50_ms,
                    p99_ms,
                    ..c.totals.clone()
                };
                (name(*served), totals)
            })
            .collect();
        (running.len() as u64, (by_task, completed))
    }
}

/// The median and 99th percentile of `runs` (nearest rank), `None` when empty.
fn quantiles(runs: &VecDeque<u32>) -> (Option<u64>, Option<u64>) {
    let mut sorted: Vec<u32> = runs.iter().copied().collect();
    sorted.sort_unstable();
    let at = |q: f64| {
        let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
        sorted.get(i).map(|&ms| u64::from(ms))
    };
    (at(0.5), at(0.99))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_ranks() {
        assert_eq!(quantiles(&VecDeque::new()), (None, None));
        let runs: VecDeque<u32> = (1..=100).rev().collect();
        assert_eq!(quantiles(&runs), (Some(51), Some(99)));
        assert_eq!(quantiles(&[7].into()), (Some(7), Some(7)));
    }

    #[tokio::test]
    async fn completions_are_counted_per_task_name() {
        let ledger = Ledger::default();
        let names = ["resize".to_owned()];
        for (id, served) in [("a", Some(0)), ("b", Some(0)), ("c", None)] {
            let held = Held {
                cancel: CancellationToken::new(),
                served,
                since: Instant::now(),
            };
            ledger.running().insert(id.to_owned(), held);
        }
        assert!(ledger.ended("a", Status::Success));
        assert!(!ledger.ended("a", Status::Success), "once");
        assert!(ledger.ended("c", Status::Failed));
        let (in_flight, (running, completed)) = ledger.by_task(&names);
        assert_eq!(in_flight, 1);
        assert_eq!(running, BTreeMap::from([("resize".to_owned(), 1)]));
        assert_eq!(completed["resize"].success, 1);
        assert_eq!(completed[TARGET_LABEL].failed, 1);
        assert!(completed["resize"].p50_ms.is_some());
    }
}
