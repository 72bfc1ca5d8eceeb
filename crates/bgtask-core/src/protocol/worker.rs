//! The worker side: [`Worker`] is told of available tasks, accepts some, and completes them.

use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use futures::stream::{SelectAll, StreamExt};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::sync::{broadcast, Notify, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::admission::check_payload_size;
use super::blacklist::{Blacklist, BlacklistConfig};
use super::due::DueQueue;
use super::envelope::{Kind, Message, Status};
use super::presence::{Announcer, Event, WorkerRecord};
use super::{decode_raw, duration_ms, Counter};
use crate::broker::{DynBroker, Incoming, LeaseId, Subscription};
use crate::error::{Error, ErrorKind, Result};
use crate::names::{random_id, validate_name, Namespace, PROTOCOL_LEVEL};

/// Settings of a [`Worker`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Namespace shared with the creators. Default `bgtask`.
    pub namespace: String,
    /// Task names this worker serves.
    pub tasks: Vec<String>,
    /// Extra targeted channels this worker listens to (see
    /// [`SubmitOptions::target`](crate::SubmitOptions::target)).
    pub targets: Vec<String>,
    /// Largest progress value or reply accepted, in bytes of JSON. Default 1 MiB.
    pub max_payload: usize,
    /// When reported key values become blacklisted.
    pub blacklist: BlacklistConfig,
    /// How long a task's claim outlives its deadline. Default 1 s.
    #[serde(rename = "claim_margin_ms", with = "duration_ms")]
    pub claim_margin: Duration,
    /// How long [`Worker::run`] waits for running tasks at shutdown before cancelling them.
    /// Default 10 s.
    #[serde(rename = "shutdown_grace_ms", with = "duration_ms")]
    pub shutdown_grace: Duration,
    /// How often the worker renews its presence (see `docs/protocol.md`, "Presence").
    /// Default 1 s.
    #[serde(rename = "heartbeat_ms", with = "duration_ms")]
    pub heartbeat: Duration,
    /// How long one presence announcement holds: a worker that stops announcing (a crash)
    /// leaves every creator's view within this. Default 3 s; at least twice `heartbeat`.
    #[serde(rename = "presence_ttl_ms", with = "duration_ms")]
    pub presence_ttl: Duration,
    /// The concurrency an event-style worker announces (creators then hold tasks back when it
    /// is full). [`Worker::run`] announces its own. Default none: the worker states no bound
    /// and decides itself, offer by offer.
    pub concurrency: Option<usize>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            namespace: crate::names::DEFAULT_NAMESPACE.to_owned(),
            tasks: Vec::new(),
            targets: Vec::new(),
            max_payload: super::DEFAULT_MAX_PAYLOAD,
            blacklist: BlacklistConfig::default(),
            claim_margin: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(10),
            heartbeat: Duration::from_secs(1),
            presence_ttl: Duration::from_secs(3),
            concurrency: None,
        }
    }
}

impl WorkerConfig {
    /// The default configuration serving `tasks`.
    pub fn for_tasks<I, S>(tasks: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        WorkerConfig {
            tasks: tasks.into_iter().map(Into::into).collect(),
            ..Default::default()
        }
    }
}

/// Something that happened on a worker, for monitoring (see [`Worker::events`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum WorkerEvent {
    /// A message on one of the worker's channels could not be understood; it was dropped.
    Malformed {
        /// The channel.
        channel: String,
        /// Why.
        error: String,
    },
    /// A creator cancelled a task this worker runs.
    Cancelled {
        /// The task.
        id: String,
    },
    /// A subscription resumed after a reconnect; tasks may have been missed.
    Gap,
}

/// Counters of a worker since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerStats {
    /// Tasks seen on the worker's channels.
    pub seen: u64,
    /// Tasks this worker accepted.
    pub accepted: u64,
    /// Accepts that lost to another worker (or to a cancellation).
    pub lost: u64,
    /// Tasks completed (any status).
    pub completed: u64,
    /// Directed offers this worker declined (busy, ignored, lost to another worker, or at
    /// shutdown).
    pub declined: u64,
    /// Messages that could not be understood.
    pub malformed: u64,
    /// Times a subscription said messages may have been missed.
    pub gaps: u64,
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

struct Inner {
    broker: DynBroker,
    namespace: Namespace,
    config: WorkerConfig,
    worker_id: String,
    reply_prefix: String,
    running: Mutex<HashMap<String, CancellationToken>>,
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
        WorkerRecord {
            id: self.worker_id.clone(),
            host: self.host.clone(),
            pid: std::process::id(),
            tasks: self.config.tasks.clone(),
            targets: self.config.targets.clone(),
            concurrency: (concurrency > 0).then_some(concurrency as u64),
            in_flight: self.running().len() as u64,
            level: PROTOCOL_LEVEL.to_owned(),
            ttl_ms: super::duration_millis(self.config.presence_ttl),
            started_ms: self.started_ms,
        }
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

    fn running(&self) -> MutexGuard<'_, HashMap<String, CancellationToken>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn emit(&self, event: impl FnOnce() -> WorkerEvent) {
        if self.events.receiver_count() > 0 {
            let _ = self.events.send(event());
        }
    }

    fn malformed(&self, channel: &str, error: &Error) {
        self.counters.malformed.incr();
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
        let encoded = message.encode_with_body(body)?;
        check_payload_size(what, encoded.body.len(), self.config.max_payload)?;
        self.broker.publish(reply_to, encoded.bytes.into()).await?;
        Ok(())
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
                    self.inner.counters.gaps.incr();
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
                .map(Cow::into_owned),
            key: message.key.map(Cow::into_owned),
            meta: message.meta.map(ToOwned::to_owned),
            body: body.to_owned(),
            cancel: CancellationToken::new(),
            offer: offer.map(|o| received + o / 2),
            answered: AtomicBool::new(false),
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
        Ok(AvailableTask {
            context: TaskContext { shared },
            settled: false,
        })
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
                let Ok(_permit) = permits.acquire_owned().await else {
                    return;
                };
                let outcome = handler(task.context()).await;
                drop(_slot);
                if let Err(error) = outcome.complete(task).await {
                    tracing::warn!(%error, "could not complete a task");
                }
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
            for token in self.inner.running().values() {
                token.cancel();
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
                inner.counters.gaps.incr();
                continue;
            }
        };
        match Message::decode(&bytes) {
            Ok(message) if message.kind == Kind::Cancel => {
                let token = inner.running().get(message.id.as_ref()).cloned();
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

struct Shared {
    worker: Arc<Inner>,
    id: String,
    task: String,
    reply_to: String,
    deadline: Instant,
    broadcast: bool,
    key: Option<String>,
    /// The creator's lease on the key value's limit key, released with the `done`.
    lease: Option<String>,
    meta: Option<Box<RawValue>>,
    body: Box<RawValue>,
    cancel: CancellationToken,
    /// A directed offer: when to tell the creator it was accepted if it is still running.
    offer: Option<Instant>,
    /// The creator has heard from this worker about the task (accepted, progress or done).
    answered: AtomicBool,
}

impl Shared {
    /// Tell the creator of a directed offer that this worker runs it, unless it has heard
    /// already (progress or done count as the answer).
    fn notify_accepted(self: Arc<Self>) {
        if self.answered.swap(true, Ordering::Relaxed) {
            return;
        }
        tokio::spawn(async move {
            let mut message = Message::new(Kind::Accepted, self.id.as_str());
            message.worker = Some(Cow::Borrowed(self.worker.worker_id.as_str()));
            if let Err(error) = self
                .worker
                .broker
                .publish(&self.reply_to, message.encode())
                .await
            {
                tracing::debug!(%error, "could not send an acceptance");
            }
        });
    }
}

/// A task's data as a worker sees it: shared by [`AvailableTask`], [`RunningTask`] and
/// [`TaskContext`].
#[derive(Clone)]
pub struct TaskContext {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for TaskContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskContext")
            .field("id", &self.shared.id)
            .field("task", &self.shared.task)
            .finish_non_exhaustive()
    }
}

impl TaskContext {
    /// The task's id.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// The task name.
    pub fn name(&self) -> &str {
        &self.shared.task
    }

    /// The payload as raw JSON text.
    pub fn raw(&self) -> &RawValue {
        &self.shared.body
    }

    /// The payload as a JSON value.
    pub fn json(&self) -> Value {
        serde_json::from_str(self.shared.body.get()).unwrap_or(Value::Null)
    }

    /// The payload deserialized into `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T> {
        decode_raw(&self.shared.body, "task payload")
    }

    /// The metadata the creator attached, if any.
    pub fn metadata(&self) -> Option<Value> {
        self.shared
            .meta
            .as_ref()
            .map(|m| serde_json::from_str(m.get()).unwrap_or(Value::Null))
    }

    /// The value of the task key, when the creator set one.
    pub fn key_value(&self) -> Option<&str> {
        self.shared.key.as_deref()
    }

    /// Whether every worker runs this task (its creator used
    /// [`Client::broadcast`](crate::Client::broadcast)).
    pub fn is_broadcast(&self) -> bool {
        self.shared.broadcast
    }

    /// When the creator stops waiting (measured from when this worker received the task).
    pub fn deadline(&self) -> Instant {
        self.shared.deadline
    }

    /// Whether the creator cancelled the task (or the worker is shutting down past its grace).
    pub fn is_cancelled(&self) -> bool {
        self.shared.cancel.is_cancelled()
    }

    /// Resolves when the task is cancelled.
    pub async fn cancelled(&self) {
        self.shared.cancel.cancelled().await
    }

    /// Send a progress value to the creator.
    pub async fn progress<T: Serialize + ?Sized>(&self, progress: &T) -> Result<()> {
        let shared = &self.shared;
        shared.answered.store(true, Ordering::Relaxed);
        let mut message = Message::new(Kind::Progress, shared.id.as_str());
        message.worker = Some(Cow::Borrowed(shared.worker.worker_id.as_str()));
        shared
            .worker
            .publish_reply(&shared.reply_to, message, "progress value", progress)
            .await
    }

    /// Report this task's key value as bad (see [`Blacklist::report`]). Returns `true` when this
    /// report blacklisted it, and an error of kind `InvalidInput` when the task has no key.
    pub async fn report_bad_key(&self, reason: &str) -> Result<bool> {
        let Some(value) = &self.shared.key else {
            return Err(Error::invalid_input(
                "the task has no task key value to report",
            ));
        };
        self.shared
            .worker
            .blacklist
            .report(&self.shared.task, value, reason)
            .await
    }
}

/// A task seen on a worker's channel, not yet accepted. Ignoring it is dropping it: a directed
/// offer is then declined at once, so its creator offers it to another worker.
pub struct AvailableTask {
    context: TaskContext,
    /// Accepted or declined already: nothing to send on drop.
    settled: bool,
}

impl Drop for AvailableTask {
    fn drop(&mut self) {
        self.settle("ignored");
    }
}

impl std::fmt::Debug for AvailableTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AvailableTask")
            .field("id", &self.context.shared.id)
            .field("task", &self.context.shared.task)
            .finish_non_exhaustive()
    }
}

impl Deref for AvailableTask {
    type Target = TaskContext;

    fn deref(&self) -> &TaskContext {
        &self.context
    }
}

impl AvailableTask {
    /// Whether this is a directed offer (sent to this worker only, which owes its creator an
    /// answer), as opposed to a broadcast or a task of a creator that sends no offers.
    pub fn is_offer(&self) -> bool {
        self.context.shared.offer.is_some()
    }

    /// Turn the task down: a directed offer's creator is told at once and offers it to another
    /// worker. (Dropping the task does the same.)
    pub fn decline(mut self) {
        self.settle("declined");
    }

    /// Send a directed offer's decline with `reason`, once.
    fn settle(&mut self, reason: &'static str) {
        if std::mem::replace(&mut self.settled, true) || !self.is_offer() {
            return;
        }
        let shared = &self.context.shared;
        shared.worker.decline(&shared.id, &shared.reply_to, reason);
    }

    /// Try to take the task. `Ok(None)` when another worker took it first, the creator
    /// cancelled it, its deadline passed, or this worker is shutting down.
    pub async fn accept(mut self) -> Result<Option<RunningTask>> {
        if self.context.shared.worker.shutdown.is_cancelled() {
            self.settle("shutdown");
            return Ok(None);
        }
        let remaining = self
            .context
            .shared
            .deadline
            .saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            self.context.shared.worker.counters.lost.incr();
            self.settle("expired");
            return Ok(None);
        }
        self.settled = true;
        let shared = self.context.shared.clone();
        let worker = &shared.worker;
        // Registered before claiming, so a cancellation that follows the claim is never missed.
        worker
            .running()
            .insert(shared.id.clone(), shared.cancel.clone());
        if !shared.broadcast {
            let ttl = remaining + worker.config.claim_margin;
            let claimed = worker
                .broker
                .claim(&worker.namespace.claim_key(&shared.id), ttl)
                .await;
            if !matches!(claimed, Ok(true)) {
                worker.running().remove(&shared.id);
                worker.counters.lost.incr();
                if shared.offer.is_some() {
                    // Another worker has it (a re-offer raced) or the creator gave up.
                    worker.decline(&shared.id, &shared.reply_to, "claimed");
                }
                return claimed.map(|_| None);
            }
        }
        worker.counters.accepted.incr();
        if let Some(due) = shared.offer {
            worker.notices.push(due, Arc::downgrade(&shared));
        }
        let running = RunningTask {
            context: TaskContext { shared },
            completed: false,
        };
        Ok(Some(running))
    }
}

/// A task this worker accepted. Complete it with [`success`](Self::success),
/// [`error`](Self::error), [`fail`](Self::fail) or [`complete`](Self::complete).
///
/// Dropped without completion, it completes itself as `Failed`, so the creator learns at once
/// instead of at its timeout.
pub struct RunningTask {
    context: TaskContext,
    completed: bool,
}

impl std::fmt::Debug for RunningTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningTask")
            .field("id", &self.context.shared.id)
            .finish_non_exhaustive()
    }
}

impl Deref for RunningTask {
    type Target = TaskContext;

    fn deref(&self) -> &TaskContext {
        &self.context
    }
}

impl RunningTask {
    /// A cloneable view of the task, for handlers.
    pub fn context(&self) -> TaskContext {
        self.context.clone()
    }

    /// Complete with `Success` and `reply`.
    pub async fn success<T: Serialize + ?Sized>(self, reply: &T) -> Result<()> {
        self.complete(Status::Success, reply).await
    }

    /// Complete with `Error` and `reply`.
    pub async fn error<T: Serialize + ?Sized>(self, reply: &T) -> Result<()> {
        self.complete(Status::Error, reply).await
    }

    /// Complete with `Failed` and `reply`.
    pub async fn fail<T: Serialize + ?Sized>(self, reply: &T) -> Result<()> {
        self.complete(Status::Failed, reply).await
    }

    /// Complete with a handler's result.
    pub async fn finish(self, result: HandlerResult) -> Result<()> {
        match result {
            Ok(reply) => self.complete(Status::Success, &reply).await,
            Err(failure) => self.complete(failure.status, &failure.reply).await,
        }
    }

    /// Complete with `status` and `reply`. A reply over the payload limit is not sent: the
    /// creator gets `Failed` with a short explanation and this returns [`ErrorKind::TooLarge`].
    pub async fn complete<T: Serialize + ?Sized>(
        mut self,
        status: Status,
        reply: &T,
    ) -> Result<()> {
        self.completed = true;
        let shared = &self.context.shared;
        shared.answered.store(true, Ordering::Relaxed);
        let worker = &shared.worker;
        worker.running().remove(&shared.id);
        worker.counters.completed.incr();
        match send_done(shared, status, reply).await {
            Err(error) if error.kind() == ErrorKind::TooLarge => {
                let notice = json!({
                    "error": "reply too large",
                    "detail": error.message(),
                    "limit": worker.config.max_payload,
                });
                send_done(shared, Status::Failed, &notice).await?;
                Err(error)
            }
            other => other,
        }
    }
}

async fn send_done<T: Serialize + ?Sized>(shared: &Shared, status: Status, body: &T) -> Result<()> {
    let worker = &shared.worker;
    let mut message = Message::new(Kind::Done, shared.id.as_str());
    message.worker = Some(Cow::Borrowed(worker.worker_id.as_str()));
    message.status = Some(status);
    let (Some(lease), Some(value)) = (&shared.lease, &shared.key) else {
        return worker
            .publish_reply(&shared.reply_to, message, "reply", body)
            .await;
    };
    // Free the task's slot in the same step as the reply, and say so, so the creator need not.
    message.released = true;
    let encoded = message.encode_with_body(body)?;
    check_payload_size("reply", encoded.body.len(), worker.config.max_payload)?;
    let limit_key = worker.namespace.limit_key(&shared.task, value);
    let lease = LeaseId::new(lease.as_str());
    let sent = worker
        .broker
        .release_and_publish(&limit_key, &lease, &shared.reply_to, encoded.bytes.into())
        .await;
    if let Err(error) = sent {
        tracing::debug!(%error, "could not release the key lease with the reply; the creator will");
        message.released = false;
        return worker
            .publish_reply(&shared.reply_to, message, "reply", body)
            .await;
    }
    Ok(())
}

impl Drop for RunningTask {
    fn drop(&mut self) {
        if self.completed {
            return;
        }
        let shared = self.context.shared.clone();
        shared.worker.running().remove(&shared.id);
        shared.worker.counters.completed.incr();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let notice = json!({"error": "the worker dropped the task without completing it"});
                if let Err(error) = send_done(&shared, Status::Failed, &notice).await {
                    tracing::warn!(%error, "could not report a dropped task");
                }
            });
        }
    }
}

/// What a [`Worker::run`] handler returns: the reply, or how the task failed.
pub type HandlerResult = std::result::Result<Value, TaskFailure>;

/// A handler's unsuccessful completion: `Error` or `Failed` with a JSON reply.
#[derive(Debug, Clone)]
pub struct TaskFailure {
    /// `Error` or `Failed` (a `Success` here is sent as given).
    pub status: Status,
    /// The reply the creator gets in [`Error::reply`].
    pub reply: Value,
}

impl TaskFailure {
    /// Complete with `Error`.
    pub fn error(reply: Value) -> Self {
        TaskFailure {
            status: Status::Error,
            reply,
        }
    }

    /// Complete with `Failed`.
    pub fn failed(reply: Value) -> Self {
        TaskFailure {
            status: Status::Failed,
            reply,
        }
    }
}

impl From<Error> for TaskFailure {
    /// A bgtask error inside a handler fails the task with `{"error": "<message>"}`.
    fn from(error: Error) -> Self {
        TaskFailure::failed(json!({ "error": error.to_string() }))
    }
}
