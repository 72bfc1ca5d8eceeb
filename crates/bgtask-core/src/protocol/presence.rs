//! Worker presence: each worker holds one lease on the namespace's presence key (its note the
//! worker's [`WorkerRecord`]), renewed by a heartbeat, and announces join, beat and leave on the
//! presence channel. Creators keep a [`Roster`] from those announcements: the live workers of
//! each task name and target, with no broker round trip per task.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::time::Instant;

use super::envelope::{Kind, Message};
use crate::broker::{DynBroker, LeaseId, LeaseRequest};
use crate::error::{Error, Result};
use crate::names::{validate_name, Namespace, PROTOCOL_LEVEL};

/// What a worker announces about itself: its presence lease's note and the body of its
/// presence messages. `docs/protocol.md` lists the fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct WorkerRecord {
    /// The worker's id (32 hex digits); its offers channel is `NS:v1:worker:<id>`.
    pub id: String,
    /// The host name the worker runs on (informational).
    #[serde(default)]
    pub host: String,
    /// The worker's process id (informational).
    #[serde(default)]
    pub pid: u32,
    /// Task names it serves.
    #[serde(default)]
    pub tasks: Vec<String>,
    /// Targets it listens to.
    #[serde(default)]
    pub targets: Vec<String>,
    /// How many tasks it runs at once; `None` when it does not say (event-style workers).
    #[serde(default)]
    pub concurrency: Option<u64>,
    /// Tasks it has accepted and not completed, at the time of the announcement.
    #[serde(default)]
    pub in_flight: u64,
    /// The same per task name (tasks it reached only through a target: under `_target`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub running: BTreeMap<String, u64>,
    /// What it completed per task name since it started (same names as `running`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub completed: BTreeMap<String, TaskTotals>,
    /// The protocol level it speaks (`v1`).
    pub level: String,
    /// How long the announcement holds: with no newer one within this, the worker is gone.
    pub ttl_ms: u64,
    /// When it started, Unix milliseconds.
    #[serde(default)]
    pub started_ms: u64,
}

/// What a worker has completed of one task name, in its [`WorkerRecord`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct TaskTotals {
    /// Completed with `Success`.
    #[serde(default)]
    pub success: u64,
    /// Completed with `Error`.
    #[serde(default)]
    pub error: u64,
    /// Completed with `Failed` (including tasks dropped without completion).
    #[serde(default)]
    pub failed: u64,
    /// The median run time (acceptance to completion) of its last 256 tasks of this name, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p50_ms: Option<u64>,
    /// The 99th percentile of the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<u64>,
}

impl WorkerRecord {
    /// Free capacity at the time of the announcement, when the worker states a concurrency.
    pub fn free(&self) -> Option<u64> {
        self.concurrency.map(|c| c.saturating_sub(self.in_flight))
    }

    /// Check what a creator relies on: the id, the names and the level.
    fn check(&self) -> Result<()> {
        if self.id.is_empty() || self.id.len() > 128 {
            return Err(Error::protocol("a worker id must be 1 to 128 bytes"));
        }
        validate_name("worker id", &self.id)?;
        if self.level != PROTOCOL_LEVEL {
            return Err(Error::protocol(format!(
                "a worker of protocol level {:?} (this side speaks {PROTOCOL_LEVEL})",
                self.level
            )));
        }
        for name in self
            .tasks
            .iter()
            .chain(&self.targets)
            .chain(self.running.keys())
            .chain(self.completed.keys())
        {
            validate_name("task name or target", name)?;
        }
        Ok(())
    }

    fn to_json(&self) -> String {
        // A struct of strings and numbers always serializes.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// A presence event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    Join,
    Beat,
    Leave,
}

impl Event {
    fn as_str(self) -> &'static str {
        match self {
            Event::Join => "join",
            Event::Beat => "beat",
            Event::Leave => "leave",
        }
    }

    fn parse(s: &str) -> Option<Event> {
        match s {
            "join" => Some(Event::Join),
            "beat" => Some(Event::Beat),
            "leave" => Some(Event::Leave),
            _ => None,
        }
    }
}

/// Decode a presence message into its event and record; anything else is an error.
pub(crate) fn decode(bytes: &[u8]) -> Result<(Event, WorkerRecord)> {
    let message = Message::decode(bytes)?;
    if message.kind != Kind::Presence {
        return Err(Error::protocol(format!(
            "a {:?} message on the presence channel",
            message.kind
        )));
    }
    let event = message
        .reason
        .as_deref()
        .and_then(Event::parse)
        .ok_or_else(|| Error::protocol("a presence message with an unknown event"))?;
    let body = message.body.unwrap_or(RawValue::NULL);
    let record: WorkerRecord = serde_json::from_str(body.get())
        .map_err(|e| Error::protocol("a malformed worker record").with_source(e))?;
    if record.id != message.id {
        return Err(Error::protocol("a presence message about another worker"));
    }
    record.check()?;
    Ok((event, record))
}

/// Parse a presence lease's note.
pub(crate) fn parse_note(note: &str) -> Result<WorkerRecord> {
    let record: WorkerRecord = serde_json::from_str(note)
        .map_err(|e| Error::protocol("a malformed worker record").with_source(e))?;
    record.check()?;
    Ok(record)
}

/// A live worker as the presence key lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ListedWorker {
    /// Its newest record.
    pub record: WorkerRecord,
    /// How long ago it announced that record (by the broker's clock).
    pub last_seen: Duration,
}

/// The live workers of a namespace, as the presence key lists them (one per worker, newest
/// record first), skipping notes that do not parse. One broker call.
pub async fn list_workers(broker: &DynBroker, namespace: &Namespace) -> Result<Vec<ListedWorker>> {
    let leases = broker.leases(&namespace.workers_key()).await?;
    let mut workers: Vec<ListedWorker> = Vec::new();
    for lease in leases.iter().rev() {
        if let Ok(record) = parse_note(&lease.note) {
            if !workers.iter().any(|w| w.record.id == record.id) {
                let ttl = Duration::from_millis(record.ttl_ms);
                workers.push(ListedWorker {
                    last_seen: ttl.saturating_sub(lease.remaining),
                    record,
                });
            }
        }
    }
    Ok(workers)
}

/// The worker side: keeps the presence leases and sends the announcements.
///
/// A beat adds a lease and leaves the older ones to expire on their own (one broker call per
/// beat, not two: a release costs several JetStream requests on NATS); a leave releases every
/// one still live, so a listing never shows a worker that left.
pub(crate) struct Announcer {
    broker: DynBroker,
    channel: String,
    key: String,
    ttl: Duration,
    /// The leases acquired within the last TTL, oldest first, with when each was acquired.
    leases: Mutex<std::collections::VecDeque<(Instant, LeaseId)>>,
}

impl Announcer {
    pub(crate) fn new(broker: DynBroker, namespace: &Namespace, ttl: Duration) -> Self {
        Announcer {
            broker,
            channel: namespace.presence_channel(),
            key: namespace.workers_key(),
            ttl,
            leases: Mutex::new(std::collections::VecDeque::new()),
        }
    }

    fn leases(&self) -> MutexGuard<'_, std::collections::VecDeque<(Instant, LeaseId)>> {
        self.leases.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The leases still live (acquired within the TTL), taken out of the list.
    fn take_live(&self) -> Vec<LeaseId> {
        let now = Instant::now();
        self.leases()
            .drain(..)
            .filter(|(at, _)| now.duration_since(*at) < self.ttl)
            .map(|(_, lease)| lease)
            .collect()
    }

    /// Renew presence with `record` (a new lease; the older ones expire on their own) and
    /// announce `event`; a leave releases every live lease instead.
    pub(crate) async fn announce(&self, event: Event, record: &WorkerRecord) -> Result<()> {
        let note = record.to_json();
        if event == Event::Leave {
            for lease in self.take_live() {
                self.broker.release(&self.key, &lease).await?;
            }
        } else {
            let acquired = self
                .broker
                .acquire(&self.key, LeaseRequest::new(self.ttl).note(note.as_str()))
                .await?;
            let now = Instant::now();
            let mut leases = self.leases();
            while leases
                .front()
                .is_some_and(|(at, _)| now.duration_since(*at) >= self.ttl)
            {
                leases.pop_front();
            }
            if let Some(lease) = acquired.lease {
                leases.push_back((now, lease));
            }
        }
        let mut message = Message::new(Kind::Presence, record.id.as_str());
        message.reason = Some(Cow::Borrowed(event.as_str()));
        let body = RawValue::from_string(note)
            .map_err(|e| Error::protocol("worker record").with_source(e))?;
        message.body = Some(&body);
        self.broker.publish(&self.channel, message.encode()).await?;
        Ok(())
    }

    /// The leases still live, for a leave done without awaiting (on drop).
    pub(crate) fn take_leases(&self) -> (DynBroker, String, Vec<LeaseId>) {
        (self.broker.clone(), self.key.clone(), self.take_live())
    }
}

/// Where a creator offers a task: the workers of a task name, or of a target.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Route {
    Task(String),
    Target(String),
}

/// One live worker as a creator sees it.
pub(crate) struct Member {
    pub(crate) id: String,
    /// Its offers channel.
    pub(crate) channel: String,
    pub(crate) concurrency: Option<u64>,
    /// Tasks of other creators in flight on it, as of its last report (its announced
    /// `in_flight` less this creator's offers to it then and its completions on it since the
    /// report before; a `busy` decline: all the rest).
    pub(crate) others: AtomicU64,
    /// This creator's offers to it that are not answered by a completion yet.
    pub(crate) outstanding: AtomicU64,
    /// This creator's completions on it since its last report was applied.
    completed_since_report: AtomicU64,
    /// An offer to it went unanswered: skip it until it announces itself again.
    pub(crate) suspect: AtomicBool,
    /// Milliseconds since the roster's epoch after which it counts as gone.
    expires: AtomicU64,
    routes: Vec<Route>,
}

impl Member {
    /// Free capacity as far as this creator can tell: `None` means unbounded (not stated).
    pub(crate) fn free(&self) -> Option<i64> {
        let concurrency = self.concurrency? as i64;
        let load = self.others.load(Ordering::Relaxed) + self.outstanding.load(Ordering::Relaxed);
        Some(concurrency - load as i64)
    }

    /// One of this creator's tasks on it ended. Its last report may have counted that task as
    /// another creator's (reported before the task ended, read after): take one off the
    /// estimate, so a stale report does not starve the worker until its next one. Guessing low
    /// costs at most a `busy` decline, which corrects the estimate at once.
    pub(crate) fn completed_one(&self) {
        self.completed_since_report.fetch_add(1, Ordering::Relaxed);
        let _ = self
            .others
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    fn score(&self) -> i64 {
        self.free().unwrap_or(i64::MAX / 2)
            - self.outstanding.load(Ordering::Relaxed) as i64
                * i64::from(self.concurrency.is_none())
    }

    pub(crate) fn routes(&self) -> &[Route] {
        &self.routes
    }
}

/// A creator's count of its offers to one member, given back when dropped.
pub(crate) struct Charge(pub(crate) Arc<Member>);

impl Charge {
    pub(crate) fn new(member: Arc<Member>) -> Charge {
        member.outstanding.fetch_add(1, Ordering::Relaxed);
        Charge(member)
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What [`Roster::choose`] found.
pub(crate) enum Choice {
    /// Offer it to this worker.
    Offer(Arc<Member>),
    /// Every candidate is full as far as this creator knows: hold the task until one frees.
    Full,
    /// No live candidate is left.
    Nobody,
}

#[derive(Default)]
struct Members {
    by_id: HashMap<String, Arc<Member>>,
    by_route: HashMap<Route, Vec<Arc<Member>>>,
}

/// A creator's live view of the workers of its namespace.
pub(crate) struct Roster {
    namespace: Namespace,
    epoch: Instant,
    members: Mutex<Members>,
}

impl Roster {
    pub(crate) fn new(namespace: Namespace) -> Self {
        Roster {
            namespace,
            epoch: Instant::now(),
            members: Mutex::new(Members::default()),
        }
    }

    fn members(&self) -> MutexGuard<'_, Members> {
        self.members.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now_ms(&self) -> u64 {
        super::duration_millis(self.epoch.elapsed())
    }

    /// Apply an announcement (or a listed lease, as a join with `ttl` left). Returns the member
    /// when it is live afterwards.
    pub(crate) fn apply(
        &self,
        event: Event,
        record: &WorkerRecord,
        ttl: Duration,
    ) -> Option<Arc<Member>> {
        let mut members = self.members();
        if event == Event::Leave {
            if let Some(gone) = members.by_id.remove(&record.id) {
                unlink(&mut members, &gone);
            }
            return None;
        }
        let expires = self.now_ms() + ttl.as_millis().min(u128::from(u32::MAX)) as u64;
        if let Some(member) = members.by_id.get(&record.id) {
            if member.concurrency == record.concurrency && member.routes == routes_of(record) {
                // The report counts this creator's tasks on it: those still outstanding, and
                // maybe some completed since the last report, whose replies were read before
                // it (replies and reports are separate streams, and a report is built before
                // it is sent). Counting those as other creators' load would hold tasks back
                // until the next report; guessing low costs at most a `busy` decline.
                let ours = member.outstanding.load(Ordering::Relaxed)
                    + member.completed_since_report.swap(0, Ordering::Relaxed);
                member
                    .others
                    .store(record.in_flight.saturating_sub(ours), Ordering::Relaxed);
                member.expires.fetch_max(expires, Ordering::Relaxed);
                member.suspect.store(false, Ordering::Relaxed);
                return Some(member.clone());
            }
            let old = members.by_id.remove(&record.id)?;
            unlink(&mut members, &old);
        }
        let member = Arc::new(Member {
            id: record.id.clone(),
            channel: self.namespace.worker_channel(&record.id),
            concurrency: record.concurrency,
            others: AtomicU64::new(record.in_flight),
            outstanding: AtomicU64::new(0),
            completed_since_report: AtomicU64::new(0),
            suspect: AtomicBool::new(false),
            expires: AtomicU64::new(expires),
            routes: routes_of(record),
        });
        for route in &member.routes {
            members
                .by_route
                .entry(route.clone())
                .or_default()
                .push(member.clone());
        }
        members.by_id.insert(record.id.clone(), member.clone());
        Some(member)
    }

    /// How many workers' presence has not expired.
    pub(crate) fn live_count(&self) -> usize {
        let now = self.now_ms();
        let members = self.members();
        members
            .by_id
            .values()
            .filter(|m| m.expires.load(Ordering::Relaxed) > now)
            .count()
    }

    /// Whether `member`'s presence has not expired.
    pub(crate) fn is_live(&self, member: &Member) -> bool {
        member.expires.load(Ordering::Relaxed) > self.now_ms()
    }

    /// Whether `route` has a live worker (suspects count: they may only be slow).
    pub(crate) fn has_live(&self, route: &Route) -> bool {
        let now = self.now_ms();
        let members = self.members();
        members
            .by_route
            .get(route)
            .is_some_and(|list| list.iter().any(|m| m.expires.load(Ordering::Relaxed) > now))
    }

    /// Pick a worker of `route` not in `exclude`: the freer of two chosen at random (power of
    /// two choices), else any with room; expired members are dropped on the way.
    pub(crate) fn choose(&self, route: &Route, exclude: &[Arc<Member>]) -> Choice {
        let now = self.now_ms();
        let mut members = self.members();
        let Some(list) = members.by_route.get(route) else {
            return Choice::Nobody;
        };
        if list
            .iter()
            .any(|m| m.expires.load(Ordering::Relaxed) <= now)
        {
            let gone: Vec<Arc<Member>> = list
                .iter()
                .filter(|m| m.expires.load(Ordering::Relaxed) <= now)
                .cloned()
                .collect();
            for member in gone {
                members.by_id.remove(&member.id);
                unlink(&mut members, &member);
            }
        }
        let Some(list) = members.by_route.get(route) else {
            return Choice::Nobody;
        };
        let usable = |m: &Arc<Member>| {
            !m.suspect.load(Ordering::Relaxed) && !exclude.iter().any(|x| Arc::ptr_eq(x, m))
        };
        let n = list.len();
        let (a, b) = (rand::random_range(0..n), rand::random_range(0..n));
        let best = [&list[a], &list[b]]
            .into_iter()
            .filter(|m| usable(m))
            .max_by_key(|m| m.score())
            .cloned();
        if let Some(member) = best {
            if member.free().is_none_or(|f| f > 0) {
                return Choice::Offer(member);
            }
        }
        let mut any = false;
        let mut roomiest: Option<&Arc<Member>> = None;
        for member in list.iter().filter(|m| usable(m)) {
            any = true;
            if member.free().is_none_or(|f| f > 0)
                && roomiest.is_none_or(|r| member.score() > r.score())
            {
                roomiest = Some(member);
            }
        }
        match (roomiest, any) {
            (Some(member), _) => Choice::Offer(member.clone()),
            (None, true) => Choice::Full,
            // Only suspects are left (an offer to each went unanswered): they may just be slow.
            (None, false) => list
                .iter()
                .find(|m| !exclude.iter().any(|x| Arc::ptr_eq(x, m)))
                .map_or(Choice::Nobody, |m| Choice::Offer(m.clone())),
        }
    }
}

fn routes_of(record: &WorkerRecord) -> Vec<Route> {
    let tasks = record.tasks.iter().cloned().map(Route::Task);
    let targets = record.targets.iter().cloned().map(Route::Target);
    tasks.chain(targets).collect()
}

fn unlink(members: &mut Members, gone: &Arc<Member>) {
    for route in &gone.routes {
        if let Some(list) = members.by_route.get_mut(route) {
            list.retain(|m| !Arc::ptr_eq(m, gone));
            if list.is_empty() {
                members.by_route.remove(route);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(in_flight: u64) -> WorkerRecord {
        serde_json::from_value(serde_json::json!({
            "id": "w1", "tasks": ["echo"], "concurrency": 1, "in_flight": in_flight,
            "level": "v1", "ttl_ms": 3000,
        }))
        .unwrap()
    }

    /// A report built while one of this creator's tasks ran, read after its reply: that task is
    /// not another creator's load, so the worker is offered the next task at once. A later
    /// report of the same load is another creator's.
    #[test]
    fn a_report_read_after_our_completion_does_not_hold_tasks_back() {
        let roster = Roster::new(Namespace::new("ns").unwrap());
        let route = Route::Task("echo".into());
        let ttl = Duration::from_secs(3);
        let member = roster.apply(Event::Join, &report(0), ttl).unwrap();
        drop(Charge::new(member.clone()));
        member.completed_one();
        roster.apply(Event::Beat, &report(1), ttl);
        assert!(matches!(roster.choose(&route, &[]), Choice::Offer(_)));
        roster.apply(Event::Beat, &report(1), ttl);
        assert!(matches!(roster.choose(&route, &[]), Choice::Full));
    }
}
