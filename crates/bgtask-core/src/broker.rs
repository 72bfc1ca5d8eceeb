//! The [`Broker`] contract: publish, subscribe and an atomic counter of expiring leases.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{BoxStream, Stream};

use crate::error::Result;

/// A shared, type-erased broker: what clients, workers and the facade hold.
pub type DynBroker = Arc<dyn Broker>;

/// The smallest service bgtask needs from a message broker.
///
/// Clients and workers are built only on this trait, so a backend that implements it and passes
/// the `bgtask-conformance` suite runs the whole task protocol.
///
/// # Contract
///
/// **Names.** Channels and lease keys are arbitrary UTF-8 strings of up to at least 1 KiB: spaces,
/// dots, `*`, `>`, quotes, `$`, non-ASCII. A backend maps them onto its own naming rules so that
/// two different names never share traffic or counters, and no name reaches another name's traffic
/// (no wildcards, no truncation, no case folding). Names are never pasted unescaped into a query or
/// subject.
///
/// **Payloads** are opaque bytes, binary-safe, and at least 1 MiB plus 64 KiB must work. A backend
/// whose transport carries less splits or stores the payload itself. A larger payload than the
/// backend can carry fails with [`ErrorKind::TooLarge`](crate::ErrorKind::TooLarge).
///
/// **Time.** Every operation returns within a bounded time. A connection that is lost, refused or
/// silent, and an operation that exceeds the backend's own time bound, are reported as
/// [`ErrorKind::Unavailable`](crate::ErrorKind::Unavailable) — never as a hang and never as a
/// success. ([`TimedOut`](crate::ErrorKind::TimedOut) is kept for a task passing its deadline.)
/// The backend reconnects by itself, with backoff.
///
/// **Lifetimes.** A [`Subscription`] keeps what it needs alive: it goes on receiving after the
/// broker handle that created it is dropped, until it is dropped itself.
///
/// **Delivery** is at most once: a message reaches the subscriptions that are active when it is
/// published, and no others. Messages from one publisher on one channel arrive in order.
///
/// **What the protocol builds on these** (so a backend knows what is hot): directed offers are
/// a publish on one worker's own channel (the receiver count, where known, tells a creator at
/// once that the worker is gone); worker presence is one lease per worker on one key, renewed
/// every heartbeat, whose note is the worker's record (JSON: a few hundred bytes, a few KiB for a
/// worker of many task names), listed with [`leases`](Broker::leases) when a creator starts; the first-accept-wins arbiter is
/// [`claim`](Broker::claim). A keyed task adds [`admit_and_publish`](Broker::admit_and_publish)
/// at the creator (blacklist check, limit lease, and the offer when granted; or
/// [`admit`](Broker::admit) alone when the task is held back or broadcast) and
/// [`release_and_publish`](Broker::release_and_publish) at the worker (the limit lease freed
/// with the reply). All three are provided from the other methods, so nothing
/// else is asked of a backend: every backend, and any third-party one, gets scale-out and keyed
/// tasks unchanged, and overrides them only to save round trips.
#[async_trait]
pub trait Broker: Send + Sync + fmt::Debug + 'static {
    /// Publish `payload` on `channel` to every subscription that is active at this moment.
    ///
    /// # Behaviour
    ///
    /// - At most once; no retry that could deliver twice.
    /// - Returns [`Published::Receivers`] when the broker can tell who received it (see
    ///   [`Capabilities::receiver_counts`]), else [`Published::Unknown`]. The count is 0 exactly
    ///   when no subscription received the message; a backend that multiplexes several local
    ///   subscriptions over one connection may count that connection once. A subscription
    ///   whose buffer is full counts: it loses the message to an [`Incoming::Gap`], as a server
    ///   counts a slow subscriber, so a busy worker is never taken for no worker.
    /// - A broker that cannot be reached is an `Unavailable` error, never `Ok`.
    async fn publish(&self, channel: &str, payload: Bytes) -> Result<Published>;

    /// Subscribe to `channel`.
    ///
    /// # Behaviour
    ///
    /// - The subscription is active on the server when this returns: a message published after
    ///   the call returns is delivered.
    /// - Dropping the [`Subscription`] unsubscribes.
    /// - After a reconnect the subscription is active again without the caller doing anything,
    ///   and the stream yields [`Incoming::Gap`] to say messages may have been missed. A backend
    ///   that has to drop messages because the reader is too slow yields `Gap` as well.
    /// - The stream does not end while the backend can still reconnect; it outlives the broker
    ///   handle that created it.
    async fn subscribe(&self, channel: &str) -> Result<Subscription>;

    /// Try to add one lease on `key`.
    ///
    /// # Behaviour
    ///
    /// - Atomically: drop the expired leases of `key`; if `request.cap` is `None` or fewer than
    ///   `cap` live leases remain, add one that expires `request.ttl` from now and return it.
    /// - [`Acquired::live`] is the number of live leases after the call, whether or not one was
    ///   added.
    /// - Expiry is judged by the broker's clock only, never by the callers' clocks.
    /// - Every lease expires on its own; a backend never keeps data about a key for longer than
    ///   its longest lease.
    async fn acquire(&self, key: &str, request: LeaseRequest) -> Result<Acquired>;

    /// Release a lease before it expires. Returns `false` if it was not live (already released,
    /// expired, or never existed).
    async fn release(&self, key: &str, lease: &LeaseId) -> Result<bool>;

    /// The live leases of `key`, oldest first, each with its note and the time it has left.
    async fn leases(&self, key: &str) -> Result<Vec<LeaseInfo>>;

    /// The number of live leases of `key`.
    async fn count(&self, key: &str) -> Result<u64>;

    /// Take an exclusive claim on `key` for `ttl`: `true` for exactly one caller until the claim
    /// expires (by the broker's clock). Claims are never released early, never listed, and a
    /// claim key is only ever used with this method, so a backend may keep claims apart from
    /// leases and take them in one cheap step (Redis: `SET NX PX`).
    ///
    /// This is how the protocol makes the first accept win, once per worker per task: the
    /// hottest broker call after publish. The provided implementation is a lease with cap 1.
    async fn claim(&self, key: &str, ttl: Duration) -> Result<bool> {
        let acquired = self.acquire(key, LeaseRequest::new(ttl).cap(1)).await?;
        Ok(acquired.lease.is_some())
    }

    /// Admit one keyed task in one step: refuse it if `flag` (the key value's blacklist flag) has
    /// a live lease, else [`acquire`](Broker::acquire) a lease on `key` (its limit key) under
    /// `request`.
    ///
    /// # Behaviour
    ///
    /// - Blacklisted: [`Admission::Blacklisted`] with the flag's oldest live lease; no lease is
    ///   taken (a backend that checks and acquires at once gives back what it took before it
    ///   returns).
    /// - Otherwise exactly as [`acquire`](Broker::acquire) on `key`: [`Admission::Granted`] with
    ///   the new lease, or [`Admission::Full`] with the live count. The cap is exact under any
    ///   number of concurrent callers.
    ///
    /// This is the creator's hot call for every keyed task. The provided implementation is
    /// [`leases`](Broker::leases) then [`acquire`](Broker::acquire): two round trips, which a
    /// backend overrides with one where it can (Redis: one script; PostgreSQL: one statement).
    async fn admit(&self, flag: &str, key: &str, request: LeaseRequest) -> Result<Admission> {
        admit_in_two_steps(self, flag, key, request).await
    }

    /// [`Admit`](Broker::admit) one keyed task (`offer.flag`, `offer.key`, `offer.request`) and,
    /// only if it is granted, [`publish`](Broker::publish) `offer.payload` on `offer.channel`:
    /// how a creator offers a keyed task to the worker it chose, in the same step as it takes
    /// the task's slot.
    ///
    /// # Behaviour
    ///
    /// - `request.id` names the lease to take (the payload names it too, so that the worker
    ///   can free it with its reply). A request without one gets a random id, as in `admit`.
    /// - Granted: the lease is taken, then the message published; returns the admission and
    ///   what the publish returned. Refused (blacklisted or full): nothing is published and no
    ///   lease is taken; returns the admission and `None`. The cap is exact, as in `admit`.
    /// - Ordered: a subscriber that receives the message and then looks at `key` finds the
    ///   lease.
    /// - An error leaves the outcome unknown: the lease may have been taken and the message
    ///   published. The caller releases the lease it named (releasing a lease that was never
    ///   taken is harmless).
    ///
    /// The provided implementation is [`admit`](Broker::admit) then, when granted,
    /// [`publish`](Broker::publish); a backend overrides it with one round trip where it can
    /// (Redis: the admission script publishes; PostgreSQL: one statement).
    async fn admit_and_publish(
        &self,
        offer: KeyedOffer<'_>,
    ) -> Result<(Admission, Option<Published>)> {
        admit_then_publish(self, offer).await
    }

    /// [`Release`](Broker::release) `lease` of `key`, then [`publish`](Broker::publish)
    /// `payload` on `channel`: how a worker completes a keyed task, freeing its slot in the same
    /// step as it sends the reply.
    ///
    /// # Behaviour
    ///
    /// - Ordered: a subscriber that receives the message and then looks at `key` finds the lease
    ///   gone.
    /// - An error means the message may not have been published: the caller publishes it
    ///   without the release (the lease then expires on its own or its owner releases it).
    /// - Returns what the publish returned and whether the lease was live.
    ///
    /// The provided implementation is the two calls in that order; a backend overrides it with
    /// one round trip where it can (Redis: one transaction; PostgreSQL: one statement).
    async fn release_and_publish(
        &self,
        key: &str,
        lease: &LeaseId,
        channel: &str,
        payload: Bytes,
    ) -> Result<(Published, bool)> {
        release_then_publish(self, key, lease, channel, payload).await
    }

    /// One page of the lease keys that start with `prefix` and have at least one live lease,
    /// each with its number of live leases: how an operator sees which key values have tasks in
    /// flight without naming them. Claim keys are not leases and are never listed.
    ///
    /// # Behaviour
    ///
    /// - Keys in ascending byte order, strictly after `after` when given, at most `limit` of
    ///   them (`limit` is clamped to 1..=[`MAX_KEY_PAGE`]).
    /// - [`KeyPage::next`] is the cursor of the next page (pass it as `after`), `None` when the
    ///   listing is complete. A key that is live for the whole listing appears exactly once; a
    ///   key acquired or expiring meanwhile may or may not appear.
    /// - Bounded in time like every operation, and incremental on the server (never one long
    ///   blocking command); a page may cost a pass over every lease key the backend stores
    ///   (Redis: `SCAN`; NATS: the lease stream's subjects), so this is an operator's call,
    ///   not a per-task one.
    ///
    /// Not every broker can enumerate keys, so the provided implementation returns an error of
    /// kind [`Unsupported`](crate::ErrorKind::Unsupported), and a backend that lists keys
    /// overrides it and declares [`Capabilities::lists_keys`].
    async fn list_keys(&self, prefix: &str, after: Option<&str>, limit: usize) -> Result<KeyPage> {
        let _ = (prefix, after, limit);
        Err(crate::Error::new(
            crate::ErrorKind::Unsupported,
            format!("the {self:?} broker cannot list lease keys"),
        ))
    }

    /// What this backend can and cannot do.
    fn capabilities(&self) -> Capabilities;
}

/// The most keys one [`Broker::list_keys`] page holds.
pub const MAX_KEY_PAGE: usize = 1000;

/// One page of [`Broker::list_keys`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPage {
    /// The keys of this page, in ascending byte order.
    pub keys: Vec<KeyCount>,
    /// Where the next page starts (pass as `after`), or `None` when this was the last.
    pub next: Option<String>,
}

impl KeyPage {
    /// The page of `keys` that [`Broker::list_keys`]`(prefix, after, limit)` answers: those
    /// that start with `prefix`, come after `after` and have live leases, sorted and cut to
    /// `limit` (clamped to 1..=[`MAX_KEY_PAGE`]). What every backend builds its answer with.
    pub fn collect(
        keys: impl IntoIterator<Item = KeyCount>,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> KeyPage {
        let limit = limit.clamp(1, MAX_KEY_PAGE);
        let mut keys: Vec<KeyCount> = keys
            .into_iter()
            .filter(|k| {
                k.live > 0
                    && k.key.starts_with(prefix)
                    && after.is_none_or(|after| k.key.as_str() > after)
            })
            .collect();
        keys.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        keys.dedup_by(|a, b| a.key == b.key);
        if keys.len() <= limit {
            return KeyPage { keys, next: None };
        }
        keys.truncate(limit);
        let next = keys.last().map(|k| k.key.clone());
        KeyPage { keys, next }
    }
}

/// One key of a [`KeyPage`] and its number of live leases (at least 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyCount {
    /// The lease key, as given to [`Broker::acquire`].
    pub key: String,
    /// Its live leases when it was read.
    pub live: u64,
}

/// What [`Broker::admit_and_publish`] is asked: admit one keyed task and, if it is granted,
/// publish its offer.
#[derive(Debug, Clone)]
pub struct KeyedOffer<'a> {
    /// The key value's blacklist flag: a live lease on it refuses the task.
    pub flag: &'a str,
    /// The limit key the task's lease is taken on.
    pub key: &'a str,
    /// The lease asked for: TTL, cap, note and (see [`LeaseRequest::id`]) its identity.
    pub request: LeaseRequest,
    /// Where the offer is published when the task is admitted.
    pub channel: &'a str,
    /// The offer.
    pub payload: Bytes,
}

/// The outcome of [`Broker::admit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Not blacklisted, and under the limit: the lease taken.
    Granted(LeaseId),
    /// Not blacklisted, but the limit key already has `live` leases, at or over the cap.
    Full {
        /// Live leases on the limit key.
        live: u64,
    },
    /// The blacklist key has a live lease: this one (its note is the reason).
    Blacklisted(LeaseInfo),
}

/// What a backend declares it can do; the conformance suite checks what is declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// [`Broker::publish`] returns [`Published::Receivers`].
    pub receiver_counts: bool,
    /// The broker is reached over a network connection (and so can suffer outages).
    pub networked: bool,
    /// [`Broker::list_keys`] lists keys (rather than returning `Unsupported`).
    pub lists_keys: bool,
}

impl Capabilities {
    /// Capabilities with the flags given and [`lists_keys`](Capabilities::lists_keys) off.
    pub fn new(receiver_counts: bool, networked: bool) -> Self {
        Capabilities {
            receiver_counts,
            networked,
            lists_keys: false,
        }
    }

    /// The same capabilities, with [`lists_keys`](Capabilities::lists_keys) on.
    pub fn with_key_listing(mut self) -> Self {
        self.lists_keys = true;
        self
    }
}

/// The outcome of [`Broker::publish`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// How many subscriptions (or connections, see [`Broker::publish`]) received the message;
    /// 0 means nobody did.
    Receivers(u64),
    /// The broker accepted the message but cannot say who received it.
    Unknown,
}

impl Published {
    /// True when the broker knows that nobody received the message.
    pub fn nobody(self) -> bool {
        self == Published::Receivers(0)
    }
}

/// One item of a [`Subscription`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A message published on the channel.
    Message(Bytes),
    /// Messages may have been missed here (reconnect, or the reader fell behind).
    Gap,
}

/// A live subscription to one channel: a stream of [`Incoming`]. Dropping it unsubscribes.
pub struct Subscription {
    channel: String,
    inner: BoxStream<'static, Incoming>,
}

impl Subscription {
    /// Wrap a backend's stream. The stream must unsubscribe when dropped.
    pub fn new(channel: impl Into<String>, inner: BoxStream<'static, Incoming>) -> Self {
        Subscription {
            channel: channel.into(),
            inner,
        }
    }

    /// The channel this subscription listens to, as given to [`Broker::subscribe`].
    pub fn channel(&self) -> &str {
        &self.channel
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("channel", &self.channel)
            .finish_non_exhaustive()
    }
}

impl Stream for Subscription {
    type Item = Incoming;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Incoming>> {
        self.inner.as_mut().poll_next(cx)
    }
}

/// What [`Broker::acquire`] is asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRequest {
    /// How long the lease lives unless released first. At least 1 ms.
    pub ttl: Duration,
    /// At most this many live leases on the key; `None` for no cap.
    pub cap: Option<u64>,
    /// A short text stored with the lease and returned by [`Broker::leases`] (may be empty).
    pub note: String,
    /// The new lease's identity, chosen by the caller, or `None` for a random one (see
    /// [`LeaseId::random`]). The caller keeps it unique per key (a random 128-bit id is), so
    /// that it can name the lease before it is granted: in the payload of
    /// [`Broker::admit_and_publish`], or to release it after an error that leaves the outcome
    /// unknown. Short printable ASCII, like the random ones (the protocol uses the task's id).
    pub id: Option<LeaseId>,
}

impl LeaseRequest {
    /// A lease of `ttl` with no cap and no note.
    pub fn new(ttl: Duration) -> Self {
        LeaseRequest {
            ttl,
            cap: None,
            note: String::new(),
            id: None,
        }
    }

    /// Set the cap.
    pub fn cap(mut self, cap: u64) -> Self {
        self.cap = Some(cap);
        self
    }

    /// Set the note.
    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = note.into();
        self
    }

    /// Set the new lease's identity (see [`LeaseRequest::id`]).
    pub fn id(mut self, id: LeaseId) -> Self {
        self.id = Some(id);
        self
    }

    /// The TTL in whole milliseconds, at least 1 (see [`ttl_millis`]).
    pub fn ttl_millis(&self) -> u64 {
        ttl_millis(self.ttl)
    }

    /// The identity the new lease gets: the caller's, else a new random one. What every
    /// backend calls before it stores a lease.
    pub fn lease_id(&self) -> LeaseId {
        self.id.clone().unwrap_or_else(LeaseId::random)
    }
}

/// [`Broker::admit`]'s provided implementation, [`leases`](Broker::leases) of `flag` then
/// [`acquire`](Broker::acquire) on `key`: for a backend whose own `admit` cannot take one step
/// every time (e.g. a Redis Cluster, when `flag` and `key` live on different nodes).
pub async fn admit_in_two_steps<B: Broker + ?Sized>(
    broker: &B,
    flag: &str,
    key: &str,
    request: LeaseRequest,
) -> Result<Admission> {
    if let Some(flag) = broker.leases(flag).await?.into_iter().next() {
        return Ok(Admission::Blacklisted(flag));
    }
    Ok(Admission::from(broker.acquire(key, request).await?))
}

/// [`Broker::admit_and_publish`]'s provided implementation, [`admit`](Broker::admit) then,
/// when granted, [`publish`](Broker::publish): for a backend whose own one cannot take one step
/// every time (a Redis Cluster, a payload too large for one PostgreSQL notification).
pub async fn admit_then_publish<B: Broker + ?Sized>(
    broker: &B,
    offer: KeyedOffer<'_>,
) -> Result<(Admission, Option<Published>)> {
    let admission = broker.admit(offer.flag, offer.key, offer.request).await?;
    let published = match admission {
        Admission::Granted(_) => Some(broker.publish(offer.channel, offer.payload).await?),
        Admission::Full { .. } | Admission::Blacklisted(_) => None,
    };
    Ok((admission, published))
}

/// [`Broker::release_and_publish`]'s provided implementation, [`release`](Broker::release)
/// then [`publish`](Broker::publish): for a backend whose own one cannot take one step every
/// time (a payload too large for one PostgreSQL notification, a Redis Cluster).
pub async fn release_then_publish<B: Broker + ?Sized>(
    broker: &B,
    key: &str,
    lease: &LeaseId,
    channel: &str,
    payload: Bytes,
) -> Result<(Published, bool)> {
    let released = broker.release(key, lease).await?;
    let published = broker.publish(channel, payload).await?;
    Ok((published, released))
}

/// A lease or claim TTL in whole milliseconds, at least 1 (saturating): the unit every backend
/// stores TTLs in.
pub fn ttl_millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// The identity of one lease, unique per key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(String);

impl LeaseId {
    /// Wrap a backend's lease identity.
    pub fn new(id: impl Into<String>) -> Self {
        LeaseId(id.into())
    }

    /// A new random identity (128 bits, hex), for backends that let the caller pick one.
    pub fn random() -> Self {
        LeaseId(crate::names::random_id())
    }

    /// The identity as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<Acquired> for Admission {
    /// An acquire on the limit key, as an admission: the lease granted, or the key full.
    fn from(acquired: Acquired) -> Self {
        match acquired.lease {
            Some(lease) => Admission::Granted(lease),
            None => Admission::Full {
                live: acquired.live,
            },
        }
    }
}

/// The outcome of [`Broker::acquire`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acquired {
    /// The new lease, or `None` when the cap was reached.
    pub lease: Option<LeaseId>,
    /// Live leases on the key after the call.
    pub live: u64,
}

/// One live lease, as listed by [`Broker::leases`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseInfo {
    /// Its identity.
    pub id: LeaseId,
    /// The note it was acquired with.
    pub note: String,
    /// Time until it expires, by the broker's clock.
    pub remaining: Duration,
}
