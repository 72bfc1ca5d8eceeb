//! The creator side: [`Client`] submits tasks and awaits their replies.

mod offer;

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;
use tokio::sync::{broadcast, Notify};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use super::admission::{self, check_payload_size, extract_key_value, KeyLease};
use super::blacklist::Blacklist;
use super::due::DueQueue;
use super::envelope::{Kind, Message, Status};
use super::presence::{self, Charge, Event, Roster, Route};
use super::{duration_millis, duration_ms, Counter, KeyLimit, Reply};
use crate::broker::{DynBroker, Incoming, Published};
use crate::error::{Error, ErrorKind, Result};
use crate::names::{id_to_hex, random_id, validate_name, Namespace};

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
    /// How long a directed offer waits for its worker's answer before the task is offered to
    /// another worker. Default 1 s.
    #[serde(rename = "offer_timeout_ms", with = "duration_ms")]
    pub offer_timeout: Duration,
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
            offer_timeout: Duration::from_secs(1),
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

/// Where the dispatcher leaves what arrives for one task, and its handle picks it up.
#[derive(Default)]
struct Slot {
    state: Mutex<SlotState>,
    /// `notify_one` after every change: a stored permit means no wake-up is ever lost.
    changed: Notify,
    /// The worker released the task's key lease with its reply.
    released: AtomicBool,
}

#[derive(Default)]
struct SlotState {
    progress: VecDeque<Box<RawValue>>,
    /// The completion of a single task (at most one), or the replies of a broadcast.
    replies: VecDeque<Result<Reply>>,
    /// The client shut down: nothing more will arrive.
    closed: bool,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, update: impl FnOnce(&mut SlotState)) {
        update(&mut self.lock());
        self.changed.notify_one();
    }
}

struct Pending {
    slot: Arc<Slot>,
    broadcast: bool,
    deadline: Instant,
    /// Where its directed offer stands (none for broadcasts).
    offer: Option<offer::OfferState>,
}

/// Task ids are random 128-bit numbers: their low 64 bits are already a good hash.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u128(&mut self, id: u128) {
        self.0 = id as u64;
    }
}

type PendingMap = HashMap<u128, Pending, BuildHasherDefault<IdHasher>>;

/// A task id from the wire: ours are 32 lowercase hex digits; anything else is not ours.
fn parse_id(id: &str) -> Option<u128> {
    if id.len() != 32 || !id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    u128::from_str_radix(id, 16).ok()
}

struct Inner {
    broker: DynBroker,
    namespace: Namespace,
    config: ClientConfig,
    client_id: String,
    reply_channel: String,
    pending: Mutex<PendingMap>,
    counters: Counters,
    events: broadcast::Sender<ClientEvent>,
    closed: AtomicBool,
    stop: CancellationToken,
    blacklist: Blacklist,
    /// The live workers, from their presence.
    roster: Roster,
    /// Tasks held back because every worker of their route is full, oldest first.
    parked: Mutex<HashMap<Route, VecDeque<u128>>>,
    /// Offer timeouts: (task, attempt).
    offer_timers: DueQueue<(u128, u32)>,
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
        if config.offer_timeout.is_zero() {
            return Err(Error::new(
                ErrorKind::Config,
                "offer_timeout must be at least 1 ms",
            ));
        }
        let client_id = random_id();
        let reply_channel = namespace.reply_channel(&client_id);
        let subscription = broker.subscribe(&reply_channel).await?;
        // Subscribed before listing, so no announcement falls between the two.
        let presence = broker.subscribe(&namespace.presence_channel()).await?;
        let stop = CancellationToken::new();
        let inner = Arc::new_cyclic(|weak: &std::sync::Weak<Inner>| {
            let weak = weak.clone();
            let offer_timers = DueQueue::spawn(stop.clone(), move |(id, attempt)| {
                if let Some(inner) = weak.upgrade() {
                    inner.unanswered(id, attempt);
                }
            });
            Inner {
                blacklist: Blacklist::new(broker.clone(), namespace.clone(), Default::default()),
                roster: Roster::new(namespace.clone()),
                parked: Mutex::new(HashMap::new()),
                offer_timers,
                broker,
                namespace,
                config,
                client_id,
                reply_channel,
                pending: Mutex::new(PendingMap::default()),
                counters: Counters::default(),
                events: broadcast::channel(1024).0,
                closed: AtomicBool::new(false),
                stop,
            }
        });
        inner.refresh_roster().await?;
        tokio::spawn(dispatch(Arc::downgrade(&inner), subscription));
        tokio::spawn(watch_presence(Arc::downgrade(&inner), presence));
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
    /// tell) no worker received the task. Never waits past the task's deadline.
    pub async fn submit_with<T: Serialize + ?Sized>(
        &self,
        task: &str,
        payload: &T,
        options: SubmitOptions,
    ) -> Result<TaskHandle> {
        let submitted = self.submit_inner(task, payload, &options, false).await?;
        Ok(TaskHandle {
            id: id_to_hex(submitted.guard.id),
            outcome: None,
            submitted,
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
        let submitted = self.submit_inner(task, payload, &options, true).await?;
        Ok(BroadcastHandle {
            id: id_to_hex(submitted.guard.id),
            submitted,
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
        super::event_stream(&self.inner.events)
    }

    /// Stop: refuse new tasks, end every pending task with an [`ErrorKind::Closed`] error (their
    /// handles release their key leases) and drop the reply subscription.
    pub async fn shutdown(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        let pending: Vec<Pending> = self.inner.pending().drain().map(|(_, p)| p).collect();
        for p in pending {
            p.slot.push(|state| state.closed = true);
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
    /// never makes a submit wait past the task's deadline. The task's one timer serves both
    /// this and the handle.
    async fn submit_inner<T: Serialize + ?Sized>(
        &self,
        task: &str,
        payload: &T,
        options: &SubmitOptions,
        broadcast: bool,
    ) -> Result<Submitted> {
        let timeout = self.timeout_of(options);
        let deadline = Instant::now() + timeout;
        let mut sleep = Box::pin(tokio::time::sleep_until(deadline));
        let admitted = tokio::select! {
            biased;
            admitted = self.admit_and_publish(task, payload, options, broadcast, deadline) => admitted,
            _ = &mut sleep => Err(Error::new(
                ErrorKind::TimedOut,
                format!(
                    "submitting {task:?} took longer than its timeout of {} ms",
                    timeout.as_millis()
                ),
            )),
        };
        let (guard, slot) = admitted?;
        Ok(Submitted {
            guard,
            slot,
            sleep,
            timeout,
        })
    }

    async fn admit_and_publish<T: Serialize + ?Sized>(
        &self,
        task: &str,
        payload: &T,
        options: &SubmitOptions,
        broadcast: bool,
        deadline: Instant,
    ) -> Result<(TaskGuard, Arc<Slot>)> {
        let inner = &self.inner;
        if inner.closed.load(Ordering::SeqCst) {
            return Err(Error::closed("the client was shut down"));
        }
        validate_name("task name", task)?;
        let (channel, route) = match &options.target {
            Some(target) => {
                validate_name("target", target)?;
                (
                    inner.namespace.target_channel(target),
                    Route::Target(target.clone()),
                )
            }
            None => (
                inner.namespace.task_channel(task),
                Route::Task(task.to_owned()),
            ),
        };
        // From presence, not from the broker: a task no live worker serves fails at once. A
        // worker that has just started may not have been heard yet: ask the broker then.
        if !inner.roster.has_live(&route) {
            inner.refresh_roster().await?;
            if !inner.roster.has_live(&route) {
                return Err(Error::new(
                    ErrorKind::NoWorker,
                    match &options.target {
                        Some(target) => format!("no live worker listens to the target {target:?}"),
                        None => format!("no live worker serves {task:?}"),
                    },
                ));
            }
        }
        let meta = options
            .metadata
            .as_ref()
            .map(serde_json::value::to_raw_value)
            .transpose()
            .map_err(|e| Error::invalid_input("metadata is not JSON").with_source(e))?;
        let timeout = deadline.saturating_duration_since(Instant::now());
        let id = rand::random::<u128>();
        let id_hex = id_to_hex(id);
        let deadline_ms = duration_millis(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .saturating_add(timeout),
        );

        let task_key = match &options.task_key {
            Some(key) => key.as_deref(),
            None => inner.config.task_key.as_deref(),
        };
        let (mut key_value, mut lease, mut body) = (None, None, None);
        if let Some(key) = task_key {
            // The key value goes in the envelope (before the body), so serialize the payload on
            // its own first; this path pays one copy of it. Everything is checked before the
            // admission, so a refused task never holds a slot.
            let raw = serde_json::value::to_raw_value(payload).map_err(|e| {
                Error::invalid_input("value is not serializable as JSON").with_source(e)
            })?;
            check_payload_size("task payload", raw.get().len(), inner.config.max_payload)?;
            let value = extract_key_value(&raw, key)?;
            validate_name("task key value", &value)?;
            let limit = options.limit.unwrap_or(inner.config.per_key_limit);
            let ttl = timeout + inner.config.lease_margin;
            lease = admission::admit(
                &inner.broker,
                &inner.namespace,
                (task, &value),
                limit,
                ttl,
                &id_hex,
            )
            .await?;
            key_value = Some(value);
            body = Some(raw);
        }
        // The envelope, with the payload serialized straight into it.
        let mut message = Message::new(Kind::Task, id_hex.as_str());
        message.task = Some(Cow::Borrowed(task));
        message.reply_to = Some(Cow::Borrowed(inner.reply_channel.as_str()));
        message.timeout_ms = Some(duration_millis(timeout));
        message.deadline_ms = Some(deadline_ms);
        message.broadcast = broadcast;
        message.meta = meta.as_deref();
        if !broadcast {
            message.offer_ms = Some(duration_millis(inner.config.offer_timeout).max(1));
            message.target = options.target.as_deref().map(Cow::Borrowed);
        }
        message.key = key_value.as_deref().map(Cow::Borrowed);
        if !broadcast {
            // The worker that runs it frees the slot with its reply.
            message.lease = lease.as_ref().map(|(_, l)| Cow::Borrowed(l.as_str()));
        }
        let encoded = match &body {
            Some(raw) => message.encode_with_body(&**raw),
            None => message.encode_with_body(payload).and_then(|encoded| {
                let size = encoded.body.len();
                check_payload_size("task payload", size, inner.config.max_payload).map(|()| encoded)
            }),
        };
        let encoded = match encoded {
            Ok(encoded) => encoded,
            Err(error) => {
                inner.release_in_background(lease);
                return Err(error);
            }
        };

        let slot = Arc::new(Slot::default());
        let bytes = bytes::Bytes::from(encoded.bytes);
        // A directed offer goes to the worker chosen now, or waits for room.
        let (offer, offer_channel) = if broadcast {
            (None, None)
        } else {
            let mut offer = offer::OfferState::new(route.clone(), bytes.clone());
            let channel = match inner.roster.choose(&route, &[]) {
                presence::Choice::Offer(member) => {
                    let channel = member.channel.clone();
                    offer.attempt = 1;
                    offer.current = Some(Charge::new(member));
                    Some(channel)
                }
                presence::Choice::Full | presence::Choice::Nobody => None,
            };
            (Some(offer), channel)
        };
        inner.pending().insert(
            id,
            Pending {
                slot: slot.clone(),
                broadcast,
                deadline,
                offer,
            },
        );
        // From here on the guard cleans up (pending entry, lease) on every early return.
        let guard = TaskGuard {
            client: inner.clone(),
            id,
            task: task.to_owned(),
            deadline,
            lease,
            slot: slot.clone(),
            armed: true,
        };
        if broadcast {
            let published = inner.broker.publish(&channel, bytes).await?;
            if published == Published::Receivers(0) {
                return Err(Error::new(
                    ErrorKind::NoWorker,
                    format!("no worker is listening for {task:?}"),
                ));
            }
        } else if let Some(offer_channel) = offer_channel {
            inner
                .offer_timers
                .push(Instant::now() + inner.config.offer_timeout, (id, 1));
            let published = inner.broker.publish(&offer_channel, bytes).await?;
            if published.nobody() {
                inner.unanswered(id, 1);
            }
        } else {
            inner.park(route, id);
        }
        inner.counters.submitted.incr();
        Ok((guard, slot))
    }
}

impl Drop for Inner {
    /// The last clone of the client is gone: stop the dispatcher, which drops the subscription.
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Inner {
    /// Release a key lease on a task of its own, which a caller may await; a failure is logged
    /// (the lease expires on its own).
    fn release_in_background(
        &self,
        lease: Option<KeyLease>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let (key, lease) = lease?;
        let broker = self.broker.clone();
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        Some(runtime.spawn(async move {
            if let Err(error) = broker.release(&key, &lease).await {
                tracing::warn!(%error, key, "could not release a key lease; it expires on its own");
            }
        }))
    }

    fn pending(&self) -> MutexGuard<'_, PendingMap> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn emit(&self, event: impl FnOnce() -> ClientEvent) {
        if self.events.receiver_count() > 0 {
            let _ = self.events.send(event());
        }
    }

    /// Bring the roster up to date from the presence key (one broker call).
    async fn refresh_roster(&self) -> Result<()> {
        let leases = self.broker.leases(&self.namespace.workers_key()).await?;
        for lease in leases {
            if let Ok(record) = presence::parse_note(&lease.note) {
                self.roster.apply(Event::Join, &record, lease.remaining);
            }
        }
        Ok(())
    }

    fn parked(&self) -> MutexGuard<'_, HashMap<Route, VecDeque<u128>>> {
        self.parked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Apply one message of the presence channel.
    fn presence(self: &Arc<Self>, bytes: &[u8]) {
        match presence::decode(bytes) {
            Ok((event, record)) => {
                let ttl = Duration::from_millis(record.ttl_ms.min(u64::from(u32::MAX)));
                let member = self.roster.apply(event, &record, ttl);
                if let Some(member) = member {
                    if member.free().is_none_or(|f| f > 0) && !self.parked().is_empty() {
                        self.unpark_for(&member);
                    }
                }
            }
            Err(error) => {
                self.counters.malformed.incr();
                tracing::debug!(%error, "dropped a malformed presence message");
            }
        }
    }

    /// Route one message of the reply channel.
    fn handle(self: &Arc<Self>, bytes: &[u8]) {
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
        match message.kind {
            Kind::Progress | Kind::Done => {}
            Kind::Accepted | Kind::Declined => {
                let answered = parse_id(&message.id).is_some_and(|id| {
                    // decode() checked that these carry a worker and declines a reason.
                    let worker = message.worker.as_deref().unwrap_or_default();
                    if message.kind == Kind::Declined {
                        let reason = message.reason.as_deref().unwrap_or_default();
                        return self.declined(id, worker, reason);
                    }
                    let mut pending = self.pending();
                    let Some(offer) = pending.get_mut(&id).and_then(|p| p.offer.as_mut()) else {
                        return false;
                    };
                    offer.answered = true;
                    offer.bytes = None;
                    true
                });
                if !answered {
                    self.counters.late.incr();
                    tracing::debug!(id = %message.id, kind = ?message.kind, "dropped an answer for no offer of ours");
                }
                return;
            }
            _ => {
                self.counters.malformed.incr();
                tracing::warn!(channel = %self.reply_channel, kind = ?message.kind, "dropped a message of the wrong kind on a reply channel");
                return;
            }
        }
        // decode() checked that progress and done carry a body.
        let body = message.body.unwrap_or(RawValue::NULL).to_owned();
        let mut freed = None;
        let routed = parse_id(&message.id).and_then(|id| {
            let mut pending = self.pending();
            let p = pending.get_mut(&id)?;
            let slot = p.slot.clone();
            let ends = message.kind == Kind::Done && !p.broadcast;
            if ends {
                slot.released.store(message.released, Ordering::Relaxed);
                let ended = pending.remove(&id)?;
                freed = ended.offer.and_then(|o| o.current).map(|c| c.0.clone());
            } else if let Some(offer) = p.offer.as_mut() {
                offer.answered = true;
                offer.bytes = None;
            }
            Some(slot)
        });
        // A task of ours on that worker ended: it has room for one held back.
        if let Some(member) = freed {
            if !self.parked().is_empty() {
                self.unpark_for(&member);
            }
        }
        let Some(slot) = routed else {
            self.counters.late.incr();
            tracing::debug!(id = %message.id, "dropped a reply that arrived after its task ended");
            return;
        };
        let id = || message.id.clone().into_owned();
        if message.kind == Kind::Progress {
            let mut dropped = false;
            slot.push(|state| {
                if state.progress.len() < PROGRESS_BUFFER {
                    state.progress.push_back(body);
                } else {
                    dropped = true;
                }
            });
            if dropped {
                self.counters.dropped.incr();
            }
            self.emit(|| ClientEvent::Progress { id: id() });
        } else {
            let status = message.status.unwrap_or(Status::Failed);
            let worker = message.worker.as_deref().unwrap_or_default().to_owned();
            let reply = Reply::from_wire(status, worker, body);
            let mut dropped = false;
            slot.push(|state| {
                if state.replies.len() < BROADCAST_BUFFER {
                    state.replies.push_back(reply);
                } else {
                    dropped = true;
                }
            });
            if dropped {
                self.counters.dropped.incr();
            }
            self.emit(|| ClientEvent::Done { id: id(), status });
        }
    }

    /// Stop waiting for a pending task: take its claim so no worker accepts it from now on,
    /// and tell the workers (one message on the namespace's cancel channel) so one that runs it
    /// can stop. Returns the work to do on the broker, or `None` if the task was not pending.
    ///
    /// The pending entry goes at once (so later replies count as late); the broker work is a
    /// future the caller may await or spawn.
    fn abandon(
        self: &Arc<Self>,
        id: u128,
    ) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        let pending = self.pending().remove(&id)?;
        let inner = self.clone();
        Some(async move {
            let id = id_to_hex(id);
            if !pending.broadcast {
                let ttl = pending.deadline.saturating_duration_since(Instant::now())
                    + inner.config.lease_margin;
                let claim_key = inner.namespace.claim_key(&id);
                if let Err(error) = inner.broker.claim(&claim_key, ttl).await {
                    tracing::debug!(%error, "could not take the claim of an abandoned task");
                }
            }
            let cancel = Message::new(Kind::Cancel, id.as_str());
            if let Err(error) = inner
                .broker
                .publish(&inner.namespace.cancel_channel(), cancel.encode())
                .await
            {
                tracing::debug!(%error, "could not publish a cancellation");
            }
        })
    }
}

/// Hand each item of `subscription` to `on_item` until the client goes or `on_item` says stop.
async fn listen<F, Fut>(
    inner: std::sync::Weak<Inner>,
    mut subscription: crate::Subscription,
    on_item: F,
) where
    F: Fn(Arc<Inner>, Option<Incoming>) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let Some(stop) = inner.upgrade().map(|i| i.stop.clone()) else {
        return;
    };
    loop {
        let item = tokio::select! {
            item = subscription.next() => item,
            _ = stop.cancelled() => return,
        };
        let Some(inner) = inner.upgrade() else { return };
        if !on_item(inner, item).await {
            return;
        }
    }
}

/// Keep the roster from the presence channel.
async fn watch_presence(inner: std::sync::Weak<Inner>, subscription: crate::Subscription) {
    listen(inner, subscription, |inner, item| async move {
        match item {
            Some(Incoming::Message(bytes)) => inner.presence(&bytes),
            // Announcements may have been missed: list the workers again.
            Some(Incoming::Gap) => {
                if let Err(error) = inner.refresh_roster().await {
                    tracing::debug!(%error, "could not list the workers after a presence gap");
                }
            }
            None => return false,
        }
        true
    })
    .await
}

/// Route the replies of the reply channel.
async fn dispatch(inner: std::sync::Weak<Inner>, subscription: crate::Subscription) {
    listen(inner, subscription, |inner, item| async move {
        match item {
            Some(Incoming::Message(bytes)) => inner.handle(&bytes),
            Some(Incoming::Gap) => {
                inner.counters.gaps.incr();
                tracing::warn!(channel = %inner.reply_channel, "reply subscription resumed; replies may have been missed");
                inner.emit(|| ClientEvent::Gap);
            }
            None => {
                tracing::error!(channel = %inner.reply_channel, "reply subscription ended");
                return false;
            }
        }
        true
    })
    .await
}

/// Owns a submitted task's pending entry and key lease, and frees both exactly once: when the
/// task ends, or when its handle is dropped. A worker that completes the task frees the lease
/// with its reply (`released`); the guard releases it otherwise.
struct TaskGuard {
    client: Arc<Inner>,
    id: u128,
    task: String,
    deadline: Instant,
    lease: Option<KeyLease>,
    slot: Arc<Slot>,
    armed: bool,
}

impl TaskGuard {
    /// The lease still to release: none if the worker released it with its reply.
    fn take_lease(&mut self) -> Option<KeyLease> {
        let lease = self.lease.take();
        if self.slot.released.load(Ordering::Relaxed) {
            return None;
        }
        lease
    }

    /// Forget the pending entry and release the key lease: awaited until the task's deadline
    /// (at least [`FINISH_GRACE`]), then left to finish in the background, so a slow broker
    /// never makes a task call wait past its deadline.
    async fn finish(&mut self) {
        if !self.armed {
            return;
        }
        self.armed = false;
        self.client.pending().remove(&self.id);
        let lease = self.take_lease();
        if let Some(release) = self.client.release_in_background(lease) {
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
        if !self.armed {
            return;
        }
        self.client.pending().remove(&self.id);
        let lease = self.take_lease();
        self.client.release_in_background(lease);
    }
}

/// What a submit leaves for its handle.
struct Submitted {
    guard: TaskGuard,
    slot: Arc<Slot>,
    /// The task's one timer, armed for its deadline.
    sleep: Pin<Box<Sleep>>,
    timeout: Duration,
}

impl Submitted {
    /// Wait for the slot to change or the deadline. Returns false at the deadline.
    async fn wait(&mut self) -> bool {
        tokio::select! {
            _ = self.slot.changed.notified() => true,
            _ = &mut self.sleep => false,
        }
    }
}

/// A submitted task: its id, its progress, and its reply.
///
/// Dropping the handle abandons the task: a later reply is dropped and the key lease released.
pub struct TaskHandle {
    id: String,
    outcome: Option<Result<Reply>>,
    submitted: Submitted,
}

impl std::fmt::Debug for TaskHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskHandle")
            .field("id", &self.id)
            .field("task", &self.submitted.guard.task)
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
        self.submitted.guard.deadline
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
        let outcome = loop {
            // Past the deadline, nothing that arrives counts: a reply racing the timeout loses.
            let expired = Instant::now() >= self.submitted.guard.deadline;
            if !expired {
                let mut state = self.submitted.slot.lock();
                if let Some(progress) = state.progress.pop_front() {
                    return Some(progress);
                }
                if let Some(reply) = state.replies.pop_front() {
                    break reply;
                }
                if state.closed {
                    break Err(Error::closed("the client was shut down"));
                }
            }
            if expired || !self.submitted.wait().await {
                // Stop any worker still on it, without making this call wait on the broker.
                let guard = &self.submitted.guard;
                if let Some(abandon) = guard.client.abandon(guard.id) {
                    tokio::spawn(abandon);
                }
                break Err(self.timed_out());
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
    /// [`TaskContext::cancelled`](crate::TaskContext::cancelled)), and the reply is
    /// [`ErrorKind::Cancelled`]. Returns `false` if the task had already ended.
    pub async fn cancel(&mut self) -> bool {
        if self.outcome.is_some() {
            return false;
        }
        let guard = &self.submitted.guard;
        let Some(abandon) = guard.client.abandon(guard.id) else {
            return false;
        };
        abandon.await;
        self.end(Err(Error::new(
            ErrorKind::Cancelled,
            "the task was cancelled",
        )))
        .await;
        true
    }

    fn timed_out(&self) -> Error {
        let id = self.id.clone();
        self.submitted
            .guard
            .client
            .emit(|| ClientEvent::TimedOut { id });
        Error::new(
            ErrorKind::TimedOut,
            format!(
                "task {} ({:?}) got no reply within {} ms",
                self.id,
                self.submitted.guard.task,
                self.submitted.timeout.as_millis()
            ),
        )
    }

    async fn end(&mut self, outcome: Result<Reply>) {
        self.submitted.guard.finish().await;
        self.outcome = Some(outcome);
    }
}

/// The replies of a broadcast task, one per worker that ran it, until the task's timeout.
pub struct BroadcastHandle {
    id: String,
    submitted: Submitted,
}

impl std::fmt::Debug for BroadcastHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BroadcastHandle")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl BroadcastHandle {
    /// The task's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The next worker's reply (an error for `Error`/`Failed`), or `None` at the deadline.
    /// Progress of broadcast tasks is not forwarded.
    pub async fn next_reply(&mut self) -> Option<Result<Reply>> {
        loop {
            {
                let mut state = self.submitted.slot.lock();
                state.progress.clear();
                if let Some(reply) = state.replies.pop_front() {
                    return Some(reply);
                }
                if state.closed {
                    break;
                }
            }
            if !self.submitted.wait().await {
                break;
            }
        }
        self.submitted.guard.finish().await;
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
