//! The worker side: [`Worker`] is told of available tasks, accepts some, and completes them.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, MutexGuard, OnceLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::stream::{SelectAll, StreamExt};
use serde::Serialize;
use tokio::sync::{broadcast, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::admission::check_payload_size;
use super::blacklist::Blacklist;
use super::due::DueQueue;
use super::envelope::{Kind, Message, Status};
use super::presence::{Announcer, Event, WorkerRecord};
use super::{Counter, TraceContext};
use crate::broker::{DynBroker, Incoming, LeaseId, Subscription};
use crate::error::{Error, ErrorKind, Result};
use crate::metrics::{self, Role};
use crate::names::{random_id, validate_name, Namespace, PROTOCOL_LEVEL};

mod config;
mod ledger;
mod serve;
mod task;

pub use config::{WorkerConfig, WorkerEvent, WorkerStats};
use ledger::{target_label, Held, Ledger};
pub use serve::Outcome;
use task::Shared;
pub use task::{AvailableTask, HandlerResult, RunningTask, TaskContext, TaskFailure};

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
    /// Tasks accepted and not completed, and what was completed, per task name.
    ledger: Ledger,
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
        let (in_flight, (running, completed)) = self.ledger.by_task(&self.config.tasks);
        WorkerRecord {
            id: self.worker_id.clone(),
            host: self.host.clone(),
            pid: std::process::id(),
            tasks: self.config.tasks.clone(),
            targets: self.config.targets.clone(),
            concurrency: (concurrency > 0).then_some(concurrency as u64),
            in_flight,
            running,
            completed,
            level: PROTOCOL_LEVEL.to_owned(),
            ttl_ms: super::duration_millis(self.config.presence_ttl),
            started_ms: self.started_ms,
        }
    }

    /// A task ended with `status` (the one its creator gets): forget it and count it (stats,
    /// metrics, the presence record's totals and run times).
    fn ended(&self, id: &str, label: &Arc<str>, status: Status) {
        self.ledger.ended(id, status);
        self.counters.completed.incr();
        metrics::worker_completed(label, status);
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

    fn running(&self) -> MutexGuard<'_, HashMap<String, Held>> {
        self.ledger.running()
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
            ledger: Ledger::default(),
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
        let config = &self.inner.config;
        let served = config.tasks.iter().position(|t| *t == *task);
        let serves = match &message.target {
            Some(target) => config.targets.iter().any(|t| t == target),
            None => served.is_some(),
        };
        let shared = Arc::new(Shared {
            worker: self.inner.clone(),
            id: message.id.into_owned(),
            served,
            task: Arc::from(&*task),
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
