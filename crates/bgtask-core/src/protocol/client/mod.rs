//! The creator side: [`Client`] submits tasks and awaits their replies.

mod config;
mod dispatch;
mod handle;
mod offer;
mod pending;

pub use config::{
    ClientConfig, ClientEvent, ClientStats, SubmitOptions, DEFAULT_MAX_PAYLOAD, DEFAULT_TIMEOUT,
    MAX_TIMEOUT,
};

use dispatch::{dispatch, watch_presence};
pub use handle::{BroadcastHandle, TaskHandle};
use handle::{Submitted, TaskGuard};
use pending::{parse_id, Counters, Pending, PendingMap, Slot};

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::broadcast;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::admission::{check_payload_size, extract_key_value, Admitted, KeyAdmission, KeyLease};
use super::blacklist::Blacklist;
use super::due::DueQueue;
use super::envelope::{Kind, Message};
use super::presence::{self, Event, Roster, Route};
use super::{duration_millis, KeyLimit};
use crate::broker::{DynBroker, Published};
use crate::error::{Error, ErrorKind, Result};
use crate::metrics;
use crate::names::{id_to_hex, random_id, validate_name, Namespace};

/// How long ending a task may wait for its key lease's release after the deadline.
const FINISH_GRACE: Duration = Duration::from_millis(200);

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
        if let Err(error) = &admitted {
            metrics::refused(task, error.kind());
        }
        Ok(Submitted {
            guard: admitted?,
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
    ) -> Result<TaskGuard> {
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
        let (mut key_value, mut body) = (None, None);
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
            key_value = Some(value);
            body = Some(raw);
        }
        let admission = key_value.as_deref().map(|value| {
            let limit = options.limit.unwrap_or(inner.config.per_key_limit);
            let ttl = timeout + inner.config.lease_margin;
            KeyAdmission::new(&inner.namespace, (task, value), limit, ttl, &id_hex)
        });
        // The limit key of the lease the admission takes, named by the task's id.
        let lease_key = admission.as_ref().and_then(KeyAdmission::lease_key);
        // The envelope, with the payload serialized straight into it.
        let mut message = Message::new(Kind::Task, id_hex.as_str());
        message.task = Some(Cow::Borrowed(task));
        message.reply_to = Some(Cow::Borrowed(inner.reply_channel.as_str()));
        message.timeout_ms = Some(duration_millis(timeout));
        message.deadline_ms = Some(deadline_ms);
        message.broadcast = broadcast;
        message.meta = meta.as_deref();
        let trace = options.trace.clone().or_else(current_trace);
        if let Some(trace) = &trace {
            message.traceparent = Some(Cow::Borrowed(trace.traceparent()));
            message.tracestate = trace.tracestate().map(Cow::Borrowed);
        }
        if !broadcast {
            message.offer_ms = Some(duration_millis(inner.config.offer_timeout).max(1));
            message.target = options.target.as_deref().map(Cow::Borrowed);
        }
        message.key = key_value.as_deref().map(Cow::Borrowed);
        if !broadcast {
            // The worker that runs it frees the slot with its reply.
            message.lease = lease_key.as_ref().map(|_| Cow::Borrowed(id_hex.as_str()));
        }
        let encoded = match &body {
            Some(raw) => message.encode_with_body(&**raw),
            None => message.encode_with_body(payload).and_then(|encoded| {
                let size = encoded.body.len();
                check_payload_size("task payload", size, inner.config.max_payload).map(|()| encoded)
            }),
        };
        let encoded = encoded?;

        let slot = Arc::new(Slot::default());
        // The name's one copy: the guard's, the offer's, and every metric's label.
        let task_name: Arc<str> = Arc::from(task);
        let bytes = bytes::Bytes::from(encoded.bytes);
        // A directed offer goes to the worker chosen now, or waits for room.
        let (offer, offer_channel) = if broadcast {
            (None, None)
        } else {
            let mut offer = Box::new(offer::OfferState::new(
                route.clone(),
                bytes.clone(),
                task_name.clone(),
            ));
            let channel = match inner.roster.choose(&route, &[]) {
                presence::Choice::Offer(member) => {
                    let channel = member.channel.clone();
                    offer.offer_to(member);
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
        metrics::in_flight(&task_name, 1.0);
        let mut guard = TaskGuard {
            client: inner.clone(),
            id,
            task: task_name.clone(),
            submitted: Instant::now(),
            deadline,
            lease_key: None,
            slot: slot.clone(),
            armed: true,
        };
        // A keyed task is admitted now; with a worker chosen, the broker publishes its offer in
        // the same step. Until the broker answers, the lease may be taken: the guard releases it
        // on an error.
        let mut published = None;
        if let Some(admission) = admission {
            guard.lease_key = lease_key;
            let offer = offer_channel.as_deref().map(|c| (c, bytes.clone()));
            match admission.admit(&inner.broker, offer).await? {
                Admitted::Granted(offered) => published = offered,
                Admitted::Refused(error) => {
                    guard.lease_key = None;
                    return Err(error);
                }
            }
        }
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
            let published = match published {
                Some(published) => published,
                None => inner.broker.publish(&offer_channel, bytes).await?,
            };
            if published.nobody() {
                inner.undelivered(id, 1);
            }
        } else {
            inner.park(route, id);
        }
        inner.counters.submitted.incr();
        metrics::submitted(&task_name);
        Ok(guard)
    }
}

/// The trace context a task carries when its submit names none: the current span's.
#[cfg(feature = "opentelemetry")]
fn current_trace() -> Option<super::TraceContext> {
    super::TraceContext::current()
}

#[cfg(not(feature = "opentelemetry"))]
fn current_trace() -> Option<super::TraceContext> {
    None
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
        self.count_workers();
        Ok(())
    }

    /// Set the workers-online gauge from the roster.
    fn count_workers(&self) {
        metrics::workers_online(self.namespace.as_str(), self.roster.live_count());
    }

    fn parked(&self) -> MutexGuard<'_, HashMap<Route, VecDeque<u128>>> {
        self.parked.lock().unwrap_or_else(|e| e.into_inner())
    }
}
