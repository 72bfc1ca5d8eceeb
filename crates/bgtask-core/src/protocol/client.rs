//! The creator side: [`Client`] submits tasks and awaits their replies.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::blacklist::Blacklist;
use super::envelope::{to_raw, Kind, Message, Status};
use super::{duration_ms, Counter, KeyLimit, Reply};
use crate::broker::{DynBroker, Incoming, LeaseId, LeaseRequest, Published};
use crate::error::{Error, ErrorDetail, ErrorKind, Result};
use crate::names::{random_id, validate_name, Namespace};

/// The default task timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest task timeout; longer ones are cut to this.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(30 * 24 * 3600);

/// The default payload limit of tasks and replies: 1 MiB.
pub const DEFAULT_MAX_PAYLOAD: usize = 1 << 20;

/// How long ending a task may wait for its key lease's release after the deadline.
const FINISH_GRACE: Duration = Duration::from_millis(200);

/// Progress values buffered per task before the oldest unread are dropped (and counted).
const PROGRESS_BUFFER: usize = 64;

/// Replies of one broadcast buffered before more are dropped (and counted).
const BROADCAST_BUFFER: usize = 4096;

/// Settings of a [`Client`]. Every field has a default; see each field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientConfig {
    /// Namespace shared with the workers; several apps can share one broker. Default `bgtask`.
    pub namespace: String,
    /// Timeout of a task submitted without one. Default 5 s.
    #[serde(rename = "default_timeout_ms", with = "duration_ms")]
    pub default_timeout: Duration,
    /// Largest task payload accepted, in bytes of JSON. Default 1 MiB.
    pub max_payload: usize,
    /// The top-level property of every task whose value is limited and may be blacklisted.
    /// Default none.
    pub task_key: Option<String>,
    /// Tasks in flight per key value when `task_key` is set. Default 5.
    pub per_key_limit: KeyLimit,
    /// How long a key's lease outlives the task's deadline, so a crashed creator's slots free
    /// themselves shortly after its tasks would have timed out. Default 1 s.
    #[serde(rename = "lease_margin_ms", with = "duration_ms")]
    pub lease_margin: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            namespace: crate::names::DEFAULT_NAMESPACE.to_owned(),
            default_timeout: DEFAULT_TIMEOUT,
            max_payload: DEFAULT_MAX_PAYLOAD,
            task_key: None,
            per_key_limit: KeyLimit::default(),
            lease_margin: Duration::from_secs(1),
        }
    }
}

/// Per-task options of [`Client::submit_with`]; unset fields take the client's configuration.
#[derive(Debug, Clone, Default)]
pub struct SubmitOptions {
    timeout: Option<Duration>,
    task_key: Option<Option<String>>,
    limit: Option<KeyLimit>,
    target: Option<String>,
    metadata: Option<Value>,
}

impl SubmitOptions {
    /// Default options.
    pub fn new() -> Self {
        Self::default()
    }

    /// The task's timeout; zero means the client's default; at most [`MAX_TIMEOUT`] (30 days).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The task's timeout in milliseconds; zero or negative means the client's default, as in
    /// node-background-task.
    pub fn timeout_ms(mut self, millis: i64) -> Self {
        self.timeout = Some(Duration::from_millis(millis.max(0) as u64));
        self
    }

    /// Use this top-level property as the task key for this task.
    pub fn task_key(mut self, key: impl Into<String>) -> Self {
        self.task_key = Some(Some(key.into()));
        self
    }

    /// Submit this task without a task key, whatever the client's configuration.
    pub fn no_task_key(mut self) -> Self {
        self.task_key = Some(None);
        self
    }

    /// The per-key limit for this task.
    pub fn limit(mut self, limit: KeyLimit) -> Self {
        self.limit = Some(limit);
        self
    }

    /// Publish on the targeted channel `target` instead of the task name's channel: only
    /// workers that listen to that target see the task.
    pub fn target(mut self, target: impl Into<String>) -> Self {
        self.target = Some(target.into());
        self
    }

    /// Metadata that travels with the task, visible to workers before they accept it.
    pub fn metadata(mut self, metadata: Value) -> Self {
        self.metadata = Some(metadata);
        self
    }
}

/// Something that happened on a client, for monitoring (see [`Client::events`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientEvent {
    /// A task reported progress.
    Progress {
        /// The task.
        id: String,
    },
    /// A task was completed by a worker (which does not mean it succeeded).
    Done {
        /// The task.
        id: String,
        /// The worker's status.
        status: Status,
    },
    /// A task got no reply before its deadline.
    TimedOut {
        /// The task.
        id: String,
    },
    /// A message on the reply channel could not be understood; it was dropped.
    Malformed {
        /// Why.
        error: String,
    },
    /// The reply subscription reconnected; replies may have been missed.
    Gap,
}

/// Counters of a client since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientStats {
    /// Tasks published.
    pub submitted: u64,
    /// Messages on the reply channel that could not be understood.
    pub malformed: u64,
    /// Replies that arrived after their task ended (timed out, cancelled or already done).
    pub late: u64,
    /// Progress values or broadcast replies dropped because the reader fell behind.
    pub dropped: u64,
    /// Times the reply subscription said messages may have been missed.
    pub gaps: u64,
}

#[derive(Default)]
struct Counters {
    submitted: Counter,
    malformed: Counter,
    late: Counter,
    dropped: Counter,
    gaps: Counter,
}

enum Update {
    Progress(Box<RawValue>),
    Reply(Result<Reply>),
}

struct Pending {
    updates: mpsc::Sender<Update>,
    done: Option<oneshot::Sender<Result<Reply>>>,
    broadcast: bool,
    deadline: Instant,
}

struct Inner {
    broker: DynBroker,
    namespace: Namespace,
    config: ClientConfig,
    client_id: String,
    reply_channel: String,
    pending: Mutex<HashMap<String, Pending>>,
    counters: Counters,
    events: broadcast::Sender<ClientEvent>,
    closed: AtomicBool,
    stop: CancellationToken,
    blacklist: Blacklist,
}

/// A task creator. Cheap to clone; clones share one reply subscription.
///
/// ```
/// # async fn demo() -> bgtask_core::Result<()> {
/// use bgtask_core::{Client, ClientConfig, MemoryBroker, Worker, WorkerConfig};
/// use std::sync::Arc;
///
/// let broker = Arc::new(MemoryBroker::new());
/// let worker = Worker::new(broker.clone(), WorkerConfig::for_tasks(["echo"])).await?;
/// tokio::spawn(worker.run(4, |task| async move { Ok(task.json()) }));
///
/// let client = Client::new(broker, ClientConfig::default()).await?;
/// let reply = client.submit("echo", &serde_json::json!({"hello": "world"})).await?.reply().await?;
/// assert_eq!(reply.json()["hello"], "world");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("id", &self.inner.client_id)
            .field("namespace", &self.inner.namespace)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Start a client: validate `config` and subscribe to a fresh reply channel.
    pub async fn new(broker: DynBroker, config: ClientConfig) -> Result<Client> {
        let namespace = Namespace::new(config.namespace.clone())?;
        if let Some(key) = &config.task_key {
            validate_name("task key", key)?;
        }
        if let KeyLimit::Max(0) = config.per_key_limit {
            return Err(Error::new(
                ErrorKind::Config,
                "per_key_limit must be at least 1 (use \"unlimited\" for no limit)",
            ));
        }
        if config.default_timeout.is_zero() || config.default_timeout > MAX_TIMEOUT {
            return Err(Error::new(
                ErrorKind::Config,
                "default_timeout must be between 1 ms and 30 days",
            ));
        }
        let client_id = random_id();
        let reply_channel = namespace.reply_channel(&client_id);
        let subscription = broker.subscribe(&reply_channel).await?;
        let inner = Arc::new(Inner {
            blacklist: Blacklist::new(broker.clone(), namespace.clone(), Default::default()),
            broker,
            namespace,
            config,
            client_id,
            reply_channel,
            pending: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            events: broadcast::channel(1024).0,
            closed: AtomicBool::new(false),
            stop: CancellationToken::new(),
        });
        tokio::spawn(dispatch(Arc::downgrade(&inner), subscription));
        Ok(Client { inner })
    }

    /// The configuration in use.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// The blacklist of this client's namespace (check, count, list, lift).
    pub fn blacklist(&self) -> &Blacklist {
        &self.inner.blacklist
    }

    /// Submit `payload` (a JSON object) as a task named `task`, with the client's defaults.
    pub async fn submit<T: Serialize + ?Sized>(
        &self,
        task: &str,
        payload: &T,
    ) -> Result<TaskHandle> {
        self.submit_with(task, payload, SubmitOptions::default())
            .await
    }

    /// Submit a task with per-task options. Returns as soon as the task is published; the
    /// [`TaskHandle`] awaits progress and the reply.
    ///
    /// Fails at once, before anything is published, when the payload is too large, a name is
    /// invalid, the task key's value is blacklisted or at its limit, or (where the broker can
    /// tell) no worker received the task.
    pub async fn submit_with<T: Serialize + ?Sized>(
        &self,
        task: &str,
        payload: &T,
        options: SubmitOptions,
    ) -> Result<TaskHandle> {
        let (prepared, updates, done) = self.prepare(task, payload, &options, false).await?;
        Ok(TaskHandle {
            id: prepared.id.clone(),
            deadline: prepared.deadline,
            timeout: prepared.timeout,
            updates,
            done,
            outcome: None,
            guard: prepared.into_guard(self.inner.clone()),
        })
    }

    /// Submit a task and await its reply, typed: `payload` serialized, the reply deserialized.
    pub async fn call<T: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        task: &str,
        payload: &T,
    ) -> Result<R> {
        self.submit(task, payload).await?.reply().await?.decode()
    }

    /// Publish a broadcast task: every worker of `task` runs it, and every reply arrives on the
    /// returned handle until the task's timeout.
    pub async fn broadcast<T: Serialize + ?Sized>(
        &self,
        task: &str,
        payload: &T,
        options: SubmitOptions,
    ) -> Result<BroadcastHandle> {
        let (prepared, updates, _done) = self.prepare(task, payload, &options, true).await?;
        Ok(BroadcastHandle {
            deadline: prepared.deadline,
            updates,
            guard: prepared.into_guard(self.inner.clone()),
        })
    }

    /// Live leases (tasks in flight) of one key value of `task`.
    pub async fn in_flight(&self, task: &str, value: &str) -> Result<u64> {
        self.inner
            .broker
            .count(&self.inner.namespace.limit_key(task, value))
            .await
    }

    /// Counters since the client started.
    pub fn stats(&self) -> ClientStats {
        let c = &self.inner.counters;
        ClientStats {
            submitted: c.submitted.get(),
            malformed: c.malformed.get(),
            late: c.late.get(),
            dropped: c.dropped.get(),
            gaps: c.gaps.get(),
        }
    }

    /// A stream of what happens on this client from now on. A reader that falls more than 1024
    /// events behind misses the oldest ones.
    pub fn events(&self) -> futures::stream::BoxStream<'static, ClientEvent> {
        let rx = self.inner.events.subscribe();
        futures::stream::unfold(rx, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(event) => return Some((event, rx)),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
        .boxed()
    }

    /// Stop: refuse new tasks, end every pending task with an [`ErrorKind::Closed`] error (their
    /// handles release their key leases) and drop the reply subscription.
    pub async fn shutdown(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        let pending: Vec<Pending> = self.inner.pending().drain().map(|(_, p)| p).collect();
        for mut p in pending {
            if let Some(done) = p.done.take() {
                let _ = done.send(Err(Error::closed("the client was shut down")));
            }
        }
        self.inner.stop.cancel();
    }

    fn timeout_of(&self, options: &SubmitOptions) -> Duration {
        match options.timeout {
            Some(t) if !t.is_zero() => t.min(MAX_TIMEOUT),
            _ => self.inner.config.default_timeout,
        }
    }

    /// Validate, admit and publish a task, within its timeout: a slow or unreachable broker
    /// never makes a submit wait past the task's deadline.
    async fn prepare<T: Serialize + ?Sized>(
        &self,
        task: &str,
        payload: &T,
        options: &SubmitOptions,
        broadcast: bool,
    ) -> Result<(
        Prepared,
        mpsc::Receiver<Update>,
        oneshot::Receiver<Result<Reply>>,
    )> {
        let timeout = self.timeout_of(options);
        tokio::time::timeout(
            timeout,
            self.admit_and_publish(task, payload, options, broadcast),
        )
        .await
        .unwrap_or_else(|_| {
            Err(Error::new(
                ErrorKind::TimedOut,
                format!(
                    "submitting {task:?} took longer than its timeout of {} ms",
                    timeout.as_millis()
                ),
            ))
        })
    }

    async fn admit_and_publish<T: Serialize + ?Sized>(
        &self,
        task: &str,
        payload: &T,
        options: &SubmitOptions,
        broadcast: bool,
    ) -> Result<(
        Prepared,
        mpsc::Receiver<Update>,
        oneshot::Receiver<Result<Reply>>,
    )> {
        let inner = &self.inner;
        let deadline = Instant::now() + self.timeout_of(options);
        if inner.closed.load(Ordering::SeqCst) {
            return Err(Error::closed("the client was shut down"));
        }
        validate_name("task name", task)?;
        let channel = match &options.target {
            Some(target) => {
                validate_name("target", target)?;
                inner.namespace.target_channel(target)
            }
            None => inner.namespace.task_channel(task),
        };
        let body = to_raw(payload)?;
        check_payload_size("task payload", body.get().len(), inner.config.max_payload)?;
        let meta = options.metadata.as_ref().map(to_raw).transpose()?;
        let timeout = self.timeout_of(options);
        let task_key = match &options.task_key {
            Some(key) => key.as_deref(),
            None => inner.config.task_key.as_deref(),
        };
        let key_value = task_key.map(|key| key_value(&body, key)).transpose()?;
        let limit = options.limit.unwrap_or(inner.config.per_key_limit);

        let id = random_id();
        let mut lease = None;
        if let Some(value) = &key_value {
            validate_name("task key value", value)?;
            if let Some(entry) = inner.blacklist.check(task, value).await? {
                return Err(entry.to_error());
            }
            if let KeyLimit::Max(max) = limit {
                let key = inner.namespace.limit_key(task, value);
                let request = LeaseRequest::new(timeout + inner.config.lease_margin)
                    .cap(max)
                    .note(&id);
                let acquired = inner.broker.acquire(&key, request).await?;
                match acquired.lease {
                    Some(l) => lease = Some((key, l)),
                    None => {
                        return Err(Error::new(
                            ErrorKind::LimitReached,
                            format!(
                                "{} tasks of {task:?} with key value {value:?} are in flight; the limit is {max}",
                                acquired.live
                            ),
                        )
                        .with_detail(ErrorDetail::Limit {
                            in_flight: acquired.live,
                            limit: max,
                        }))
                    }
                }
            }
        }

        let deadline_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_add(timeout)
            .as_millis() as u64;
        let mut message = Message::new(Kind::Task, id.clone());
        message.task = Some(task.to_owned());
        message.reply_to = Some(inner.reply_channel.clone());
        message.timeout_ms = Some(timeout.as_millis() as u64);
        message.deadline_ms = Some(deadline_ms);
        message.broadcast = broadcast;
        message.key = key_value;
        message.meta = meta;
        message.body = Some(body);

        let (updates_tx, updates) = mpsc::channel(if broadcast {
            BROADCAST_BUFFER
        } else {
            PROGRESS_BUFFER
        });
        let (done_tx, done) = oneshot::channel();
        inner.pending().insert(
            id.clone(),
            Pending {
                updates: updates_tx,
                done: (!broadcast).then_some(done_tx),
                broadcast,
                deadline,
            },
        );
        let prepared = Prepared {
            id,
            task: task.to_owned(),
            deadline,
            timeout,
            lease,
        };
        // From here on the guard cleans up (pending entry, lease) on every early return.
        let guard = prepared.into_guard(inner.clone());
        let published = inner.broker.publish(&channel, message.encode()).await?;
        if published == Published::Receivers(0) {
            return Err(Error::new(
                ErrorKind::NoWorker,
                format!("no worker is listening for {:?}", guard.task),
            ));
        }
        inner.counters.submitted.incr();
        Ok((guard.disarm(), updates, done))
    }
}

pub(crate) fn check_payload_size(what: &str, size: usize, max: usize) -> Result<()> {
    if size > max {
        return Err(Error::new(
            ErrorKind::TooLarge,
            format!("{what} is {size} bytes; the limit is {max}"),
        ));
    }
    Ok(())
}

/// The task key's value in a task payload: a string as is, anything else as its JSON text.
fn key_value(body: &RawValue, key: &str) -> Result<String> {
    let object: BTreeMap<String, &RawValue> = serde_json::from_str(body.get()).map_err(|_| {
        Error::invalid_input(format!(
            "a task with the task key {key:?} must be a JSON object"
        ))
    })?;
    let raw = object.get(key).ok_or_else(|| {
        Error::invalid_input(format!(
            "the task has no top-level property {key:?} (its task key)"
        ))
    })?;
    Ok(match serde_json::from_str::<String>(raw.get()) {
        Ok(s) => s,
        Err(_) => raw.get().to_owned(),
    })
}

impl Drop for Inner {
    /// The last clone of the client is gone: stop the dispatcher, which drops the subscription.
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Inner {
    fn pending(&self) -> MutexGuard<'_, HashMap<String, Pending>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn emit(&self, event: impl FnOnce() -> ClientEvent) {
        if self.events.receiver_count() > 0 {
            let _ = self.events.send(event());
        }
    }

    /// Route one message of the reply channel.
    async fn handle(&self, bytes: &[u8]) {
        let message = match Message::decode(bytes) {
            Ok(m) => m,
            Err(error) => {
                self.counters.malformed.incr();
                tracing::warn!(channel = %self.reply_channel, %error, "dropped a malformed reply message");
                self.emit(|| ClientEvent::Malformed {
                    error: error.to_string(),
                });
                return;
            }
        };
        let id = message.id;
        let worker = message.worker.unwrap_or_default();
        match message.kind {
            Kind::Progress => {
                let sent = match self.pending().get(&id) {
                    Some(p) => {
                        // Only None when the dispatcher has a bug: decode checked the body.
                        let body = message.body.unwrap_or_else(null_raw);
                        if p.updates.try_send(Update::Progress(body)).is_err() {
                            self.counters.dropped.incr();
                        }
                        true
                    }
                    None => false,
                };
                if sent {
                    self.emit(|| ClientEvent::Progress { id });
                } else {
                    self.counters.late.incr();
                }
            }
            Kind::Done => {
                let status = message.status.unwrap_or(Status::Failed);
                let reply = Reply::from_wire(status, worker, message.body.unwrap_or_else(null_raw));
                let mut pending = self.pending();
                let Some(p) = pending.get_mut(&id) else {
                    drop(pending);
                    self.counters.late.incr();
                    tracing::debug!(%id, "dropped a reply that arrived after its task ended");
                    return;
                };
                if p.broadcast {
                    if p.updates.try_send(Update::Reply(reply)).is_err() {
                        self.counters.dropped.incr();
                    }
                } else if let Some(done) = p.done.take() {
                    pending.remove(&id);
                    let _ = done.send(reply);
                }
                drop(pending);
                self.emit(|| ClientEvent::Done { id, status });
            }
            Kind::Task | Kind::Cancel => {
                self.counters.malformed.incr();
                tracing::warn!(channel = %self.reply_channel, kind = ?message.kind, "dropped a message of the wrong kind on a reply channel");
            }
        }
    }

    /// End a pending task on this side with `outcome`: take its claim so no worker accepts it
    /// from now on, and tell the workers (one message on the namespace's cancel channel) so one
    /// that runs it can stop. Returns false if the task was not pending.
    async fn abandon(&self, id: &str, outcome: Result<Reply>) -> bool {
        let Some(mut pending) = self.pending().remove(id) else {
            return false;
        };
        if let Some(done) = pending.done.take() {
            let _ = done.send(outcome);
        }
        if !pending.broadcast {
            let ttl = pending.deadline.saturating_duration_since(Instant::now())
                + self.config.lease_margin;
            let request = LeaseRequest::new(ttl).cap(1).note("abandoned");
            if let Err(error) = self
                .broker
                .acquire(&self.namespace.claim_key(id), request)
                .await
            {
                tracing::debug!(%error, "could not take the claim of an abandoned task");
            }
        }
        let cancel = Message::new(Kind::Cancel, id);
        if let Err(error) = self
            .broker
            .publish(&self.namespace.cancel_channel(), cancel.encode())
            .await
        {
            tracing::debug!(%error, "could not publish a cancellation");
        }
        true
    }
}

fn null_raw() -> Box<RawValue> {
    RawValue::NULL.to_owned()
}

async fn dispatch(inner: std::sync::Weak<Inner>, mut subscription: crate::Subscription) {
    let Some(stop) = inner.upgrade().map(|i| i.stop.clone()) else {
        return;
    };
    loop {
        let item = tokio::select! {
            item = subscription.next() => item,
            _ = stop.cancelled() => return,
        };
        let Some(inner) = inner.upgrade() else { return };
        match item {
            Some(Incoming::Message(bytes)) => inner.handle(&bytes).await,
            Some(Incoming::Gap) => {
                inner.counters.gaps.incr();
                tracing::warn!(channel = %inner.reply_channel, "reply subscription resumed; replies may have been missed");
                inner.emit(|| ClientEvent::Gap);
            }
            None => {
                tracing::error!(channel = %inner.reply_channel, "reply subscription ended");
                return;
            }
        }
    }
}

struct Prepared {
    id: String,
    task: String,
    deadline: Instant,
    timeout: Duration,
    lease: Option<(String, LeaseId)>,
}

impl Prepared {
    fn into_guard(self, client: Arc<Inner>) -> TaskGuard {
        TaskGuard {
            client,
            id: self.id,
            task: self.task,
            deadline: self.deadline,
            timeout: self.timeout,
            lease: self.lease,
        }
    }
}

/// Owns a submitted task's pending entry and key lease, and frees both exactly once: when the
/// task ends, or when its handle is dropped.
struct TaskGuard {
    client: Arc<Inner>,
    id: String,
    task: String,
    deadline: Instant,
    timeout: Duration,
    lease: Option<(String, LeaseId)>,
}

impl TaskGuard {
    /// Hand the parts back without cleaning up (the submit succeeded).
    fn disarm(mut self) -> Prepared {
        Prepared {
            id: std::mem::take(&mut self.id),
            task: std::mem::take(&mut self.task),
            deadline: self.deadline,
            timeout: self.timeout,
            lease: self.lease.take(),
        }
    }

    /// Forget the pending entry and release the key lease: awaited until the task's deadline
    /// (at least [`FINISH_GRACE`]), then left to finish in the background, so a slow broker
    /// never makes a task call wait past its deadline.
    async fn finish(&mut self) {
        self.client.pending().remove(&self.id);
        if let Some((key, lease)) = self.lease.take() {
            let broker = self.client.broker.clone();
            let release = tokio::spawn(async move {
                if let Err(error) = broker.release(&key, &lease).await {
                    tracing::warn!(%error, key, "could not release a key lease; it expires on its own");
                }
            });
            let wait = self
                .deadline
                .saturating_duration_since(Instant::now())
                .max(FINISH_GRACE);
            let _ = tokio::time::timeout(wait, release).await;
        }
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if self.id.is_empty() {
            return; // disarmed
        }
        self.client.pending().remove(&self.id);
        if let Some((key, lease)) = self.lease.take() {
            let broker = self.client.broker.clone();
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    if let Err(error) = broker.release(&key, &lease).await {
                        tracing::warn!(%error, key, "could not release a key lease; it expires on its own");
                    }
                });
            }
        }
    }
}

/// A submitted task: its id, its progress, and its reply.
///
/// Dropping the handle abandons the task: a later reply is dropped and the key lease released.
pub struct TaskHandle {
    id: String,
    deadline: Instant,
    timeout: Duration,
    updates: mpsc::Receiver<Update>,
    done: oneshot::Receiver<Result<Reply>>,
    outcome: Option<Result<Reply>>,
    guard: TaskGuard,
}

impl std::fmt::Debug for TaskHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskHandle")
            .field("id", &self.id)
            .field("task", &self.guard.task)
            .finish_non_exhaustive()
    }
}

impl TaskHandle {
    /// The task's id, known as soon as it is submitted.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// When the task times out.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The next progress value, in the order the worker sent them; `None` once the task has
    /// ended (its outcome is then ready for [`reply`](Self::reply)).
    pub async fn progress(&mut self) -> Option<Value> {
        self.next_progress()
            .await
            .map(|raw| serde_json::from_str(raw.get()).unwrap_or(Value::Null))
    }

    /// Like [`progress`](Self::progress), without parsing the JSON.
    pub async fn next_progress(&mut self) -> Option<Box<RawValue>> {
        if self.outcome.is_some() {
            return None;
        }
        let outcome = tokio::select! {
            biased;
            Some(Update::Progress(p)) = self.updates.recv() => return Some(p),
            done = &mut self.done => done.unwrap_or_else(|_| Err(Error::closed("the client was shut down"))),
            _ = tokio::time::sleep_until(self.deadline) => {
                // Stop any worker still on it, without making this call wait on the broker.
                let (client, id) = (self.guard.client.clone(), self.id.clone());
                tokio::spawn(async move { client.abandon(&id, Err(Error::closed("timed out"))).await });
                Err(self.timed_out())
            }
        };
        self.end(outcome).await;
        None
    }

    /// Await the reply. Progress not yet read is skipped.
    ///
    /// Errors: [`ErrorKind::TimedOut`] when no reply came before the deadline;
    /// [`ErrorKind::TaskError`] / [`ErrorKind::TaskFailed`] when the worker said so, with its
    /// reply in [`Error::reply`]; [`ErrorKind::Cancelled`] after [`cancel`](Self::cancel).
    pub async fn reply(mut self) -> Result<Reply> {
        while self.next_progress().await.is_some() {}
        self.outcome
            .take()
            .unwrap_or_else(|| Err(Error::closed("the task has no outcome")))
    }

    /// Cancel the task: no worker accepts it from now on, a worker running it is told (see
    /// [`RunningTask::cancelled`](crate::RunningTask::cancelled)), and the reply is
    /// [`ErrorKind::Cancelled`]. Returns `false` if the task had already ended.
    pub async fn cancel(&mut self) -> bool {
        if self.outcome.is_some() {
            return false;
        }
        let cancelled = || Err(Error::new(ErrorKind::Cancelled, "the task was cancelled"));
        let was_pending = self.guard.client.abandon(&self.id, cancelled()).await;
        if was_pending {
            self.end(cancelled()).await;
        }
        was_pending
    }

    fn timed_out(&self) -> Error {
        let id = self.id.clone();
        self.guard.client.emit(|| ClientEvent::TimedOut { id });
        Error::new(
            ErrorKind::TimedOut,
            format!(
                "task {} ({:?}) got no reply within {} ms",
                self.id,
                self.guard.task,
                self.timeout.as_millis()
            ),
        )
    }

    async fn end(&mut self, outcome: Result<Reply>) {
        self.guard.finish().await;
        self.outcome = Some(outcome);
    }
}

/// The replies of a broadcast task, one per worker that ran it, until the task's timeout.
pub struct BroadcastHandle {
    deadline: Instant,
    updates: mpsc::Receiver<Update>,
    guard: TaskGuard,
}

impl std::fmt::Debug for BroadcastHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BroadcastHandle")
            .field("id", &self.guard.id)
            .finish_non_exhaustive()
    }
}

impl BroadcastHandle {
    /// The task's id.
    pub fn id(&self) -> &str {
        &self.guard.id
    }

    /// The next worker's reply (an error for `Error`/`Failed`), or `None` at the deadline.
    /// Progress of broadcast tasks is not forwarded.
    pub async fn next_reply(&mut self) -> Option<Result<Reply>> {
        loop {
            tokio::select! {
                biased;
                update = self.updates.recv() => match update {
                    Some(Update::Reply(reply)) => return Some(reply),
                    Some(Update::Progress(_)) => continue,
                    None => break,
                },
                _ = tokio::time::sleep_until(self.deadline) => break,
            }
        }
        self.guard.finish().await;
        None
    }

    /// Every reply until the deadline.
    pub async fn collect(mut self) -> Vec<Result<Reply>> {
        let mut replies = Vec::new();
        while let Some(reply) = self.next_reply().await {
            replies.push(reply);
        }
        replies
    }
}

impl Reply {
    /// Turn a wire completion into the creator's result.
    fn from_wire(status: Status, worker: String, body: Box<RawValue>) -> Result<Reply> {
        let kind = match status {
            Status::Success => return Ok(Reply { worker, body }),
            Status::Error => ErrorKind::TaskError,
            Status::Failed => ErrorKind::TaskFailed,
        };
        let mut shown: String = body.get().chars().take(200).collect();
        if shown.len() < body.get().len() {
            shown.push('…');
        }
        Err(
            Error::new(kind, format!("worker {worker} reported {status}: {shown}")).with_detail(
                ErrorDetail::Reply {
                    status,
                    reply: body,
                },
            ),
        )
    }
}
