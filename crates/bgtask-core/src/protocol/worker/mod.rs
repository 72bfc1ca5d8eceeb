//! The worker side: [`Worker`] is told of available tasks, accepts some, and completes them.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use futures::stream::{SelectAll, StreamExt};
use serde::Serialize;
use tokio::sync::{broadcast, Notify, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::admission::check_payload_size;
use super::blacklist::Blacklist;
use super::due::DueQueue;
use super::envelope::{Kind, Message, Status};
use super::presence::{Announcer, Event, TaskTotals, WorkerRecord};
use super::{Counter, TraceContext};
use crate::broker::{DynBroker, Incoming, LeaseId, Subscription};
use crate::error::{Error, ErrorKind, Result};
use crate::metrics::{self, Role};
use crate::names::{random_id, validate_name, Namespace, PROTOCOL_LEVEL};

mod config;
mod task;

pub use config::{WorkerConfig, WorkerEvent, WorkerStats};
use task::Shared;
pub use task::{AvailableTask, HandlerResult, RunningTask, TaskContext, TaskFailure};

/// The name under which a worker counts a task it reached only through a target (metrics,
/// presence): bounded, whatever task names the target's creators send.
const TARGET_LABEL: &str = "_target";

/// A task this worker took and has not completed.
struct Held {
    cancel: CancellationToken,
    /// Which of the worker's task names it is (`None`: reached through a target).
    served: Option<usize>,
    since: Instant,
}

/// A worker's running tasks by id.
type Running = HashMap<String, Held>;

/// Run times kept per task name for the presence record's quantiles.
const RECENT_RUNS: usize = 256;

/// What a worker completed of one task name (by index into its task names; `None`: targets).
#[derive(Default)]
struct Completed {
    totals: TaskTotals,
    /// Run times of the last [`RECENT_RUNS`], in milliseconds.
    recent: VecDeque<u32>,
}

#[derive(Default)]
struct Counters {
    seen: Counter,
    accepted: Counter,
    lost: Counter,
    completed: Counter,
    declined: Counter,
    malformed: Counter,
    gaps: Counter,
}

impl Counters {
    fn count_gap(&self) {
        self.gaps.incr();
        metrics::gap(Role::Worker);
    }
}

struct Inner {
    broker: DynBroker,
    namespace: Namespace,
    config: WorkerConfig,
    worker_id: String,
    reply_prefix: String,
    /// Tasks accepted and not completed: their cancellation, and which of `config.tasks` they
    /// are (`None`: reached through a target).
    running: Mutex<Running>,
    completed: Mutex<HashMap<Option<usize>, Completed>>,
    counters: Counters,
    events: broadcast::Sender<WorkerEvent>,
    shutdown: CancellationToken,
    /// Cancelled when the worker is dropped: ends the control loop.
    dropped: CancellationToken,
    blacklist: Blacklist,
    announcer: Announcer,
    host: String,
    started_ms: u64,
    /// The concurrency announced (0: none stated).
    concurrency: AtomicUsize,
    /// An offer was declined as busy since the last announcement: announce when a slot frees.
    declined_busy: AtomicBool,
    /// Wakes the heartbeat for an announcement now.
    beat_now: Arc<Notify>,
    /// Acceptance notices of directed offers that are still running at half their offer time.
    notices: DueQueue<Weak<Shared>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.dropped.cancel();
        let (broker, key, leases) = self.announcer.take_leases();
        if leases.is_empty() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                for lease in leases {
                    let _ = broker.release(&key, &lease).await;
                }
            });
        }
    }
}

impl Inner {
    /// This worker's presence record as of now.
    fn record(&self) -> WorkerRecord {
        let concurrency = self.concurrency.load(Ordering::Relaxed);
        let name = |served: Option<usize>| {
            let name = served.and_then(|i| self.config.tasks.get(i));
            name.map_or(TARGET_LABEL, String::as_str).to_owned()
        };
        let running = self.running();
        let mut by_task = BTreeMap::new();
        for held in running.values() {
            *by_task.entry(name(held.served)).or_insert(0) += 1;
        }
        let completed = self
            .completed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(served, c)| {
                let mut recent: Vec<u32> = c.recent.iter().copied().collect();
                recent.sort_unstable();
                let at = |q: f64| {
                    let i = ((recent.len() as f64 - 1.0) * q).round() as usize;
                    recent.get(i).map(|&ms| u64::from(ms))
                };
                let totals = TaskTotals {
                    p50_ms: at(0.5),
                    p99_ms: at(0.99),
                    ..c.totals.clone()
                };
                (name(*served), totals)
            })
            .collect();
        WorkerRecord {
            id: self.worker_id.clone(),
            host: self.host.clone(),
            pid: std::process::id(),
            tasks: self.config.tasks.clone(),
            targets: self.config.targets.clone(),
            concurrency: (concurrency > 0).then_some(concurrency as u64),
            in_flight: running.len() as u64,
            running: by_task,
            completed,
            level: PROTOCOL_LEVEL.to_owned(),
            ttl_ms: super::duration_millis(self.config.presence_ttl),
            started_ms: self.started_ms,
        }
    }

    /// A task ended with `status` (the one its creator gets): forget it and count it (stats,
    /// metrics, the presence record's totals and run times).
    fn ended(&self, id: &str, label: &str, status: Status) {
        let held = self.running().remove(id);
        self.counters.completed.incr();
        metrics::worker_completed(label, status);
        let Some(held) = held else { return };
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
    }

    /// Tell the creator that this worker turns the offer of task `id` down.
    fn decline(self: &Arc<Self>, id: &str, reply_to: &str, reason: &'static str) {
        self.counters.declined.incr();
        if reason == "busy" {
            self.declined_busy.store(true, Ordering::Relaxed);
        }
        let mut message = Message::new(Kind::Declined, id);
        message.worker = Some(Cow::Borrowed(self.worker_id.as_str()));
        message.reason = Some(Cow::Borrowed(reason));
        let bytes = message.encode();
        let (broker, reply_to) = (self.broker.clone(), reply_to.to_owned());
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(error) = broker.publish(&reply_to, bytes).await {
                    tracing::debug!(%error, "could not send a decline; the creator's offer times out");
                }
            });
        }
    }

    /// A slot freed: if offers were declined as busy since the last announcement, announce
    /// now, so creators holding tasks back offer them again.
    fn slot_freed(&self) {
        if self.declined_busy.swap(false, Ordering::Relaxed) {
            self.beat_now.notify_one();
        }
    }

    fn running(&self) -> MutexGuard<'_, Running> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn emit(&self, event: impl FnOnce() -> WorkerEvent) {
        if self.events.receiver_count() > 0 {
            let _ = self.events.send(event());
        }
    }

    fn malformed(&self, channel: &str, error: &Error) {
        self.counters.malformed.incr();
        metrics::malformed(Role::Worker);
        tracing::warn!(channel, %error, "dropped a malformed message");
        self.emit(|| WorkerEvent::Malformed {
            channel: channel.to_owned(),
            error: error.to_string(),
        });
    }

    /// Publish a progress or done message with `body` to `reply_to`, unless the body is over
    /// the payload limit.
    async fn publish_reply<T: Serialize + ?Sized>(
        &self,
        reply_to: &str,
        message: Message<'_>,
        what: &str,
        body: &T,
    ) -> Result<()> {
        let bytes = self.encode_reply(&message, what, body)?;
        self.broker.publish(reply_to, bytes).await?;
        Ok(())
    }

    /// `message` with `body`, encoded, unless the body (`what`) is over the payload limit.
    fn encode_reply<T: Serialize + ?Sized>(
        &self,
        message: &Message<'_>,
        what: &str,
        body: &T,
    ) -> Result<bytes::Bytes> {
        let encoded = message.encode_with_body(body)?;
        check_payload_size(what, encoded.body.len(), self.config.max_payload)?;
        Ok(encoded.bytes.into())
    }
}

/// A worker: subscribed to task names (and targeted channels), told of each available task.
///
/// Two styles: the event style ([`next_task`](Self::next_task), then
/// [`AvailableTask::accept`]) and the handler style ([`run`](Self::run)).
pub struct Worker {
    inner: Arc<Inner>,
    tasks: SelectAll<Subscription>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("id", &self.inner.worker_id)
            .field("tasks", &self.inner.config.tasks)
            .field("targets", &self.inner.config.targets)
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// Start a worker: subscribe to its control channel, its task names and its targets.
    /// Subscriptions are active when this returns.
    pub async fn new(broker: DynBroker, config: WorkerConfig) -> Result<Worker> {
        let namespace = Namespace::new(config.namespace.clone())?;
        if config.tasks.is_empty() && config.targets.is_empty() {
            return Err(Error::new(
                ErrorKind::Config,
                "a worker needs at least one task name or target",
            ));
        }
        for task in &config.tasks {
            validate_name("task name", task)?;
        }
        for target in &config.targets {
            validate_name("target", target)?;
        }
        if config.heartbeat.is_zero() || config.presence_ttl < config.heartbeat * 2 {
            return Err(Error::new(
                ErrorKind::Config,
                "heartbeat must be at least 1 ms and presence_ttl at least twice the heartbeat",
            ));
        }
        let worker_id = random_id();
        let control = broker.subscribe(&namespace.cancel_channel()).await?;
        let mut tasks = SelectAll::new();
        // Offers first: the worker is announced only once its offers reach it.
        tasks.push(
            broker
                .subscribe(&namespace.worker_channel(&worker_id))
                .await?,
        );
        for task in &config.tasks {
            tasks.push(broker.subscribe(&namespace.task_channel(task)).await?);
        }
        for target in &config.targets {
            tasks.push(broker.subscribe(&namespace.target_channel(target)).await?);
        }
        let dropped = CancellationToken::new();
        let notices = DueQueue::spawn(dropped.clone(), |shared: Weak<Shared>| {
            if let Some(shared) = shared.upgrade() {
                shared.notify_accepted();
            }
        });
        let inner = Arc::new(Inner {
            blacklist: Blacklist::new(broker.clone(), namespace.clone(), config.blacklist.clone()),
            reply_prefix: namespace.reply_channel(""),
            announcer: Announcer::new(broker.clone(), &namespace, config.presence_ttl),
            host: host_name(),
            started_ms: super::duration_millis(
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default(),
            ),
            concurrency: AtomicUsize::new(config.concurrency.unwrap_or(0)),
            declined_busy: AtomicBool::new(false),
            beat_now: Arc::new(Notify::new()),
            notices,
            broker,
            namespace,
            config,
            worker_id,
            running: Mutex::new(HashMap::new()),
            completed: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            events: broadcast::channel(1024).0,
            shutdown: CancellationToken::new(),
            dropped,
        });
        inner
            .announcer
            .announce(Event::Join, &inner.record())
            .await?;
        tokio::spawn(control_loop(
            Arc::downgrade(&inner),
            inner.dropped.clone(),
            control,
        ));
        tokio::spawn(heartbeat(
            Arc::downgrade(&inner),
            inner.dropped.clone(),
            inner.shutdown.clone(),
            inner.beat_now.clone(),
        ));
        Ok(Worker { inner, tasks })
    }

    /// This worker's id, as creators see it.
    pub fn id(&self) -> &str {
        &self.inner.worker_id
    }

    /// The blacklist of the worker's namespace, with the worker's thresholds.
    pub fn blacklist(&self) -> &Blacklist {
        &self.inner.blacklist
    }

    /// A handle that stops this worker from anywhere (e.g. a signal handler).
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.inner.shutdown.clone())
    }

    /// Counters since the worker started.
    pub fn stats(&self) -> WorkerStats {
        let c = &self.inner.counters;
        WorkerStats {
            seen: c.seen.get(),
            accepted: c.accepted.get(),
            lost: c.lost.get(),
            completed: c.completed.get(),
            declined: c.declined.get(),
            malformed: c.malformed.get(),
            gaps: c.gaps.get(),
        }
    }

    /// A stream of what happens on this worker from now on (malformed messages, cancellations,
    /// gaps). A reader more than 1024 events behind misses the oldest.
    pub fn events(&self) -> futures::stream::BoxStream<'static, WorkerEvent> {
        super::event_stream(&self.inner.events)
    }

    /// The next available task, or `None` once the worker is shut down. Malformed messages are
    /// counted, logged and skipped; they never end the stream.
    pub async fn next_task(&mut self) -> Option<AvailableTask> {
        loop {
            let item = tokio::select! {
                biased;
                _ = self.inner.shutdown.cancelled() => return None,
                item = self.tasks.next() => item?,
            };
            let bytes = match item {
                Incoming::Message(bytes) => bytes,
                Incoming::Gap => {
                    self.inner.counters.count_gap();
                    tracing::warn!("a task subscription resumed; tasks may have been missed");
                    self.inner.emit(|| WorkerEvent::Gap);
                    continue;
                }
            };
            self.inner.counters.seen.incr();
            match self.parse_task(&bytes) {
                Ok(task) => return Some(task),
                Err(error) => self.inner.malformed("task channel", &error),
            }
        }
    }

    fn parse_task(&self, bytes: &[u8]) -> Result<AvailableTask> {
        let received = Instant::now();
        let message = Message::decode(bytes)?;
        if message.kind != Kind::Task {
            return Err(Error::protocol(format!(
                "a {:?} message on a task channel",
                message.kind
            )));
        }
        // decode() checked that these are present.
        let (Some(task), Some(reply_to), Some(timeout_ms), Some(body)) = (
            message.task,
            message.reply_to,
            message.timeout_ms,
            message.body,
        ) else {
            return Err(Error::protocol("a task message without its fields"));
        };
        // Replies go to creators' reply channels of this namespace only, so a forged task cannot
        // make workers publish onto any other channel.
        if !reply_to.starts_with(&self.inner.reply_prefix)
            || validate_name("reply channel", &reply_to[self.inner.reply_prefix.len()..]).is_err()
        {
            return Err(Error::protocol(format!(
                "reply channel {reply_to:?} is not a reply channel of this namespace"
            )));
        }
        let timeout = Duration::from_millis(timeout_ms.min(u64::from(u32::MAX)));
        let offer = message
            .offer_ms
            .map(|ms| Duration::from_millis(ms.min(u64::from(u32::MAX))));
        let shared = Arc::new(Shared {
            worker: self.inner.clone(),
            id: message.id.into_owned(),
            task: task.into_owned(),
            reply_to: reply_to.into_owned(),
            deadline: received + timeout,
            broadcast: message.broadcast,
            lease: message
                .lease
                .filter(|_| !message.broadcast && message.key.is_some())
                .map(|lease| LeaseId::new(lease.into_owned())),
            key: message.key.map(Cow::into_owned),
            meta: message.meta.map(ToOwned::to_owned),
            body: body.to_owned(),
            cancel: CancellationToken::new(),
            offer: offer.map(|o| received + o / 2),
            answered: AtomicBool::new(false),
            trace: TraceContext::from_wire(
                message.traceparent.as_deref(),
                message.tracestate.as_deref(),
            ),
            span: OnceLock::new(),
        });
        let config = &self.inner.config;
        let serves = match &message.target {
            Some(target) => config.targets.iter().any(|t| t == target),
            None => config.tasks.iter().any(|t| *t == shared.task),
        };
        if offer.is_some() && !serves {
            // An offer for something this worker does not serve: say so, so the creator moves on.
            self.inner.decline(&shared.id, &shared.reply_to, "unknown");
            return Err(Error::protocol(format!(
                "an offer of {:?}, which this worker does not serve",
                shared.task
            )));
        }
        Ok(AvailableTask::new(shared))
    }

    /// Serve tasks with `handler`, at most `concurrency` at a time, until shut down. Every task
    /// offered is accepted while there is capacity and declined (`busy`) when there is none, so
    /// creators offer it to another worker; broadcast tasks wait for a free slot. The handler's
    /// result completes the task.
    ///
    /// At shutdown: stop taking tasks, wait up to `shutdown_grace` for running ones, then cancel
    /// them; a task whose handler never returns is completed as `Failed`. A handler that panics
    /// completes its task as `Failed` and the worker goes on.
    pub async fn run<F, Fut>(self, concurrency: usize, handler: F) -> Result<()>
    where
        F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        self.serve(concurrency, handler).await
    }

    /// [`run`](Self::run) with a handler of any [`Outcome`]: a [`HandlerResult`], or a
    /// `(Status, reply)` pair whose reply is any `Serialize` type (raw JSON passes through
    /// byte for byte).
    pub async fn serve<F, Fut, O>(mut self, concurrency: usize, handler: F) -> Result<()>
    where
        F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = O> + Send + 'static,
        O: Outcome,
    {
        let concurrency = concurrency.max(1);
        self.inner.concurrency.store(concurrency, Ordering::Relaxed);
        self.inner.beat_now.notify_one();
        let handler = Arc::new(handler);
        let permits = Arc::new(Semaphore::new(concurrency));
        // Tasks taken and whose handler has not returned; offers past `concurrency` are declined.
        let taken = Arc::new(AtomicUsize::new(0));
        let mut running = JoinSet::new();
        while let Some(mut task) = self.next_task().await {
            while let Some(joined) = running.try_join_next() {
                log_join(joined);
            }
            if task.is_offer() && taken.load(Ordering::Relaxed) >= concurrency {
                task.settle("busy");
                continue;
            }
            taken.fetch_add(1, Ordering::Relaxed);
            let slot = Taken(taken.clone(), self.inner.clone());
            let (handler, permits) = (handler.clone(), permits.clone());
            running.spawn(async move {
                let _slot = slot;
                // Offers are accepted before waiting, so the creator's offer is answered.
                let task = match task.accept().await {
                    Ok(Some(task)) => task,
                    Ok(None) => return,
                    Err(error) => {
                        tracing::warn!(%error, "could not accept a task");
                        return;
                    }
                };
                let span = task.span();
                async move {
                    let Ok(_permit) = permits.acquire_owned().await else {
                        return;
                    };
                    let outcome = handler(task.context()).await;
                    drop(_slot);
                    if let Err(error) = outcome.complete(task).await {
                        tracing::warn!(%error, "could not complete a task");
                    }
                }
                .instrument(span)
                .await
            });
        }
        // Stop receiving tasks, say so, then drain.
        self.tasks = SelectAll::new();
        let record = self.inner.record();
        let leave = self.inner.announcer.announce(Event::Leave, &record);
        if let Ok(Err(error)) = tokio::time::timeout(Duration::from_secs(1), leave).await {
            tracing::debug!(%error, "could not announce the worker's leave; its presence expires");
        }
        let grace = self.inner.config.shutdown_grace;
        let drained = tokio::time::timeout(grace, async {
            while let Some(joined) = running.join_next().await {
                log_join(joined);
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                tasks = running.len(),
                "tasks still running after the shutdown grace period; cancelling them"
            );
            for held in self.inner.running().values() {
                held.cancel.cancel();
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                while let Some(joined) = running.join_next().await {
                    log_join(joined);
                }
            })
            .await;
            // Whatever is left is aborted; each dropped task completes as Failed.
            running.shutdown().await;
        }
        Ok(())
    }
}

/// One task taken by [`Worker::serve`]: gives its place back when its handler returns.
struct Taken(Arc<AtomicUsize>, Arc<Inner>);

impl Drop for Taken {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
        self.1.slot_freed();
    }
}

/// How a [`Worker::serve`] handler's result completes its task.
pub trait Outcome: Send + 'static {
    /// Complete `task` with this outcome.
    fn complete(self, task: RunningTask) -> BoxFuture<'static, Result<()>>;
}

impl Outcome for HandlerResult {
    fn complete(self, task: RunningTask) -> BoxFuture<'static, Result<()>> {
        Box::pin(task.finish(self))
    }
}

impl<R: Serialize + Send + Sync + 'static> Outcome for (Status, R) {
    fn complete(self, task: RunningTask) -> BoxFuture<'static, Result<()>> {
        Box::pin(async move { task.complete(self.0, &self.1).await })
    }
}

/// Renew the worker's presence every `heartbeat`, or at once when asked, until it is dropped
/// or shut down.
async fn heartbeat(
    inner: Weak<Inner>,
    dropped: CancellationToken,
    shutdown: CancellationToken,
    beat_now: Arc<Notify>,
) {
    let Some(interval) = inner.upgrade().map(|i| i.config.heartbeat) else {
        return;
    };
    loop {
        tokio::select! {
            _ = dropped.cancelled() => return,
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
            _ = beat_now.notified() => {}
        }
        let Some(inner) = inner.upgrade() else { return };
        if let Err(error) = inner.announcer.announce(Event::Beat, &inner.record()).await {
            tracing::debug!(%error, "could not renew the worker's presence");
        }
    }
}

/// This machine's host name, for the presence record.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

fn log_join(joined: std::result::Result<(), tokio::task::JoinError>) {
    if let Err(error) = joined {
        if error.is_panic() {
            tracing::error!("a task handler panicked; its task was completed as failed");
        }
    }
}

/// Stops a [`Worker`]: it takes no new tasks, and [`Worker::run`] drains and returns.
#[derive(Debug, Clone)]
pub struct ShutdownHandle(CancellationToken);

impl ShutdownHandle {
    /// Begin the shutdown.
    pub fn shutdown(&self) {
        self.0.cancel();
    }

    /// Whether the shutdown has begun.
    pub fn is_shutdown(&self) -> bool {
        self.0.is_cancelled()
    }
}

async fn control_loop(
    inner: Weak<Inner>,
    dropped: CancellationToken,
    mut subscription: Subscription,
) {
    loop {
        let item = tokio::select! {
            _ = dropped.cancelled() => return,
            item = subscription.next() => match item {
                Some(item) => item,
                None => return,
            },
        };
        let Some(inner) = inner.upgrade() else { return };
        let bytes = match item {
            Incoming::Message(bytes) => bytes,
            Incoming::Gap => {
                inner.counters.count_gap();
                continue;
            }
        };
        match Message::decode(&bytes) {
            Ok(message) if message.kind == Kind::Cancel => {
                let token = inner
                    .running()
                    .get(message.id.as_ref())
                    .map(|held| held.cancel.clone());
                if let Some(token) = token {
                    token.cancel();
                    inner.emit(|| WorkerEvent::Cancelled {
                        id: message.id.into_owned(),
                    });
                }
            }
            Ok(message) => inner.malformed(
                "cancel channel",
                &Error::protocol(format!(
                    "a {:?} message on the cancel channel",
                    message.kind
                )),
            ),
            Err(error) => inner.malformed("cancel channel", &error),
        }
    }
}
