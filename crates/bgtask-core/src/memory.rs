//! [`MemoryBroker`]: the embedded backend for one process.

use crate::gap::{self, Delivery, GapSender};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tokio::time::Instant;

use crate::broker::{
    Acquired, Admission, Broker, Capabilities, Incoming, KeyCount, KeyPage, LeaseId, LeaseInfo,
    LeaseRequest, Published, Subscription,
};
use crate::error::Result;

/// How many messages one subscription buffers before it drops and signals [`Incoming::Gap`].
pub const DEFAULT_SUBSCRIPTION_BUFFER: usize = crate::connection::DEFAULT_SUBSCRIPTION_BUFFER;
/// How many payload bytes one subscription buffers before it drops and signals
/// [`Incoming::Gap`] (one larger message still goes into an empty buffer).
pub const DEFAULT_SUBSCRIPTION_BUFFER_BYTES: usize =
    crate::connection::DEFAULT_SUBSCRIPTION_BUFFER_BYTES;

/// A broker that lives inside one process: publish, subscribe and leases in memory.
///
/// Clones share the same state. Its clock is the process's monotonic clock. A subscriber that
/// falls more than [`DEFAULT_SUBSCRIPTION_BUFFER`] messages or
/// [`DEFAULT_SUBSCRIPTION_BUFFER_BYTES`] bytes behind loses the newest messages and is told so
/// by an [`Incoming::Gap`]; publishers never wait for slow subscribers.
#[derive(Clone, Default)]
pub struct MemoryBroker {
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    next_subscriber: u64,
    channels: HashMap<String, Vec<Subscriber>>,
    leases: HashMap<String, Vec<Lease>>,
    /// When each key's newest lease expires, earliest first: keys whose leases all expired are
    /// dropped from `leases` as time passes, so memory is bounded by the live leases.
    expiries: BinaryHeap<Reverse<(Instant, String)>>,
    /// Live claims and when each expires; kept apart from leases (see [`Broker::claim`]).
    claims: HashMap<Arc<str>, Instant>,
    /// When each claim expires, earliest first, to drop expired claims as time passes.
    claim_expiries: BinaryHeap<Reverse<(Instant, Arc<str>)>>,
}

struct Subscriber {
    id: u64,
    tx: GapSender<Incoming>,
}

struct Lease {
    id: LeaseId,
    note: String,
    expires: Instant,
}

impl Lease {
    fn info(&self, now: Instant) -> LeaseInfo {
        LeaseInfo {
            id: self.id.clone(),
            note: self.note.clone(),
            remaining: self.expires - now,
        }
    }
}

impl MemoryBroker {
    /// A new, empty broker.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps inconsistent (every update is a
        // single insert or remove), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl std::fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.state();
        f.debug_struct("MemoryBroker")
            .field("channels", &state.channels.len())
            .field("lease_keys", &state.leases.len())
            .field("claims", &state.claims.len())
            .finish()
    }
}

/// Drops the subscriber's entry when the subscription's stream is dropped.
struct Unsubscribe {
    broker: MemoryBroker,
    channel: String,
    id: u64,
}

impl Drop for Unsubscribe {
    fn drop(&mut self) {
        let mut state = self.broker.state();
        if let Some(subs) = state.channels.get_mut(&self.channel) {
            subs.retain(|s| s.id != self.id);
            if subs.is_empty() {
                state.channels.remove(&self.channel);
            }
        }
    }
}

/// `ttl_millis` from `now`; a TTL past what the clock can represent lasts a century.
fn expiry(now: Instant, ttl_millis: u64) -> Instant {
    now.checked_add(Duration::from_millis(ttl_millis))
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

fn live_leases<'a>(
    leases: &'a mut HashMap<String, Vec<Lease>>,
    key: &str,
    now: Instant,
) -> Option<&'a mut Vec<Lease>> {
    let list = leases.get_mut(key)?;
    list.retain(|l| l.expires > now);
    Some(list)
}

/// Pop every entry of an expiry queue due by `now`, earliest first, handing its key to `due`.
fn pop_due<K: Ord>(
    queue: &mut BinaryHeap<Reverse<(Instant, K)>>,
    now: Instant,
    mut due: impl FnMut(K),
) {
    while queue.peek().is_some_and(|Reverse((when, _))| *when <= now) {
        if let Some(Reverse((_, key))) = queue.pop() {
            due(key);
        }
    }
}

impl State {
    /// [`Broker::acquire`] on this state.
    fn acquire(&mut self, key: &str, request: LeaseRequest, now: Instant) -> Acquired {
        let expires = expiry(now, request.ttl_millis());
        self.expire(now);
        let list = match live_leases(&mut self.leases, key, now) {
            Some(list) => list,
            None => self.leases.entry(key.to_owned()).or_default(),
        };
        let live = list.len() as u64;
        if request.cap.is_some_and(|cap| live >= cap) {
            return Acquired { lease: None, live };
        }
        let id = request.lease_id();
        let extends = list.iter().all(|l| l.expires < expires);
        list.push(Lease {
            id: id.clone(),
            note: request.note,
            expires,
        });
        if extends {
            self.expiries.push(Reverse((expires, key.to_owned())));
        }
        Acquired {
            lease: Some(id),
            live: live + 1,
        }
    }

    /// Drop the claims that expired, by their expiry queue.
    fn expire_claims(&mut self, now: Instant) {
        let claims = &mut self.claims;
        pop_due(&mut self.claim_expiries, now, |key| {
            if claims.get(&key).is_some_and(|expires| *expires <= now) {
                claims.remove(&key);
            }
        });
    }

    /// Drop the keys whose every lease has expired, by the expiry queue: amortized O(log n) per
    /// acquire, never a scan of every key.
    fn expire(&mut self, now: Instant) {
        let leases = &mut self.leases;
        pop_due(&mut self.expiries, now, |key| {
            if leases
                .get(&key)
                .is_some_and(|list| list.iter().all(|l| l.expires <= now))
            {
                leases.remove(&key);
            }
        });
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    async fn publish(&self, channel: &str, payload: Bytes) -> Result<Published> {
        let mut state = self.state();
        let mut receivers = 0;
        if let Some(subs) = state.channels.get_mut(channel) {
            // A subscriber whose buffer is full still counts: it is there, and loses this
            // message to a gap (as a server counts a slow subscriber), so a creator does not
            // take a busy worker for no worker.
            for sub in subs.iter_mut() {
                match sub
                    .tx
                    .deliver(Incoming::Message(payload.clone()), || Incoming::Gap)
                {
                    Delivery::Delivered | Delivery::Lost => receivers += 1,
                    // The stream is being dropped; its Unsubscribe removes the entry.
                    Delivery::Closed => {}
                }
            }
        }
        Ok(Published::Receivers(receivers))
    }

    async fn subscribe(&self, channel: &str) -> Result<Subscription> {
        let (tx, rx) = gap::channel(
            DEFAULT_SUBSCRIPTION_BUFFER,
            DEFAULT_SUBSCRIPTION_BUFFER_BYTES,
        );
        let id = {
            let mut state = self.state();
            state.next_subscriber += 1;
            let id = state.next_subscriber;
            state
                .channels
                .entry(channel.to_owned())
                .or_default()
                .push(Subscriber { id, tx });
            id
        };
        let guard = Unsubscribe {
            broker: self.clone(),
            channel: channel.to_owned(),
            id,
        };
        let stream = futures::stream::unfold((rx, guard), |(mut rx, guard)| async move {
            rx.recv().await.map(|item| (item, (rx, guard)))
        });
        Ok(Subscription::new(channel, stream.boxed()))
    }

    async fn acquire(&self, key: &str, request: LeaseRequest) -> Result<Acquired> {
        Ok(self.state().acquire(key, request, Instant::now()))
    }

    /// The check and the acquire under one lock.
    async fn admit(&self, flag: &str, key: &str, request: LeaseRequest) -> Result<Admission> {
        let now = Instant::now();
        let mut state = self.state();
        let flagged = live_leases(&mut state.leases, flag, now).and_then(|list| list.first());
        if let Some(flag) = flagged.map(|l| l.info(now)) {
            return Ok(Admission::Blacklisted(flag));
        }
        Ok(Admission::from(state.acquire(key, request, now)))
    }

    async fn release(&self, key: &str, lease: &LeaseId) -> Result<bool> {
        let now = Instant::now();
        let mut state = self.state();
        let Some(list) = live_leases(&mut state.leases, key, now) else {
            return Ok(false);
        };
        let before = list.len();
        list.retain(|l| &l.id != lease);
        let released = list.len() < before;
        if list.is_empty() {
            state.leases.remove(key);
        }
        Ok(released)
    }

    async fn leases(&self, key: &str) -> Result<Vec<LeaseInfo>> {
        let now = Instant::now();
        let mut state = self.state();
        Ok(live_leases(&mut state.leases, key, now)
            .map(|list| list.iter().map(|l| l.info(now)).collect())
            .unwrap_or_default())
    }

    async fn count(&self, key: &str) -> Result<u64> {
        let now = Instant::now();
        let mut state = self.state();
        Ok(live_leases(&mut state.leases, key, now).map_or(0, |l| l.len() as u64))
    }

    async fn claim(&self, key: &str, ttl: Duration) -> Result<bool> {
        let now = Instant::now();
        let expires = expiry(now, crate::broker::ttl_millis(ttl));
        let mut state = self.state();
        state.expire_claims(now);
        if state.claims.get(key).is_some_and(|held| *held > now) {
            return Ok(false);
        }
        let key: Arc<str> = Arc::from(key);
        state.claims.insert(key.clone(), expires);
        state.claim_expiries.push(Reverse((expires, key)));
        Ok(true)
    }

    async fn list_keys(&self, prefix: &str, after: Option<&str>, limit: usize) -> Result<KeyPage> {
        let now = Instant::now();
        let state = self.state();
        let keys = state
            .leases
            .iter()
            .filter(|(key, _)| key.starts_with(prefix))
            .map(|(key, list)| KeyCount {
                key: key.clone(),
                live: list.iter().filter(|l| l.expires > now).count() as u64,
            });
        Ok(KeyPage::collect(keys, prefix, after, limit))
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(true, false).with_key_listing()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A broker with only the required methods: what a third-party backend gets by default.
    #[derive(Debug)]
    struct Plain(MemoryBroker);

    #[async_trait]
    impl Broker for Plain {
        async fn publish(&self, channel: &str, payload: Bytes) -> Result<Published> {
            self.0.publish(channel, payload).await
        }
        async fn subscribe(&self, channel: &str) -> Result<Subscription> {
            self.0.subscribe(channel).await
        }
        async fn acquire(&self, key: &str, request: LeaseRequest) -> Result<Acquired> {
            self.0.acquire(key, request).await
        }
        async fn release(&self, key: &str, lease: &LeaseId) -> Result<bool> {
            self.0.release(key, lease).await
        }
        async fn leases(&self, key: &str) -> Result<Vec<LeaseInfo>> {
            self.0.leases(key).await
        }
        async fn count(&self, key: &str) -> Result<u64> {
            self.0.count(key).await
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities::new(true, false)
        }
    }

    #[tokio::test]
    async fn a_full_subscriber_still_counts_and_gets_a_gap() {
        use futures::StreamExt;
        let broker = MemoryBroker::new();
        let mut sub = broker.subscribe("slow").await.unwrap();
        for _ in 0..DEFAULT_SUBSCRIPTION_BUFFER {
            broker
                .publish("slow", Bytes::from_static(b"m"))
                .await
                .unwrap();
        }
        // Full: the next ones are lost to a gap, but the subscriber is still a receiver.
        for _ in 0..2 {
            let published = broker.publish("slow", Bytes::from_static(b"lost")).await;
            assert_eq!(published.unwrap(), Published::Receivers(1));
        }
        for _ in 0..DEFAULT_SUBSCRIPTION_BUFFER {
            assert_eq!(
                sub.next().await,
                Some(Incoming::Message(Bytes::from_static(b"m")))
            );
        }
        gap_then_after(&broker, &mut sub).await;
    }

    #[tokio::test]
    async fn a_reader_that_does_not_read_holds_at_most_the_byte_bound_then_gets_a_gap() {
        use futures::StreamExt;
        const MIB: usize = 1 << 20;
        let broker = MemoryBroker::new();
        let mut sub = broker.subscribe("large").await.unwrap();
        let fit = DEFAULT_SUBSCRIPTION_BUFFER_BYTES / MIB;
        // A burst of 1 MiB payloads, each its own allocation, to a reader that does not read.
        for i in 0..fit + 8 {
            let payload = Bytes::from(vec![u8::try_from(i % 251).unwrap(); MIB]);
            let published = broker.publish("large", payload).await.unwrap();
            assert_eq!(published, Published::Receivers(1), "still a receiver");
        }
        let held = {
            let state = broker.state();
            state.channels["large"][0].tx.held_bytes()
        };
        assert_eq!(
            held,
            fit * MIB,
            "the buffer holds the byte bound, not the burst"
        );
        for i in 0..fit {
            match sub.next().await {
                Some(Incoming::Message(bytes)) => {
                    assert_eq!(
                        (bytes.len(), bytes[0]),
                        (MIB, u8::try_from(i % 251).unwrap())
                    );
                }
                other => panic!("message {i}: {other:?}"),
            }
        }
        gap_then_after(&broker, &mut sub).await;
    }

    /// After a reader caught up with a buffer that overflowed: the next message comes after
    /// one gap.
    async fn gap_then_after(broker: &MemoryBroker, sub: &mut Subscription) {
        use futures::StreamExt;
        let after = Bytes::from_static(b"after");
        broker.publish(sub.channel(), after.clone()).await.unwrap();
        assert_eq!(sub.next().await, Some(Incoming::Gap));
        assert_eq!(sub.next().await, Some(Incoming::Message(after)));
    }

    #[tokio::test]
    async fn without_an_override_listing_keys_is_unsupported() {
        let plain = Plain(MemoryBroker::new());
        plain
            .acquire("k", LeaseRequest::new(Duration::from_secs(5)))
            .await
            .unwrap();
        assert!(!plain.capabilities().lists_keys);
        let err = plain.list_keys("", None, 10).await.unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Unsupported);
        let page = plain.0.list_keys("", None, 10).await.unwrap();
        assert_eq!(
            page.keys,
            [KeyCount {
                key: "k".into(),
                live: 1
            }]
        );
    }

    #[tokio::test]
    async fn a_ttl_beyond_the_clock_is_a_long_lease_not_a_panic() {
        let broker = MemoryBroker::new();
        let acquired = broker
            .acquire("k", LeaseRequest::new(Duration::MAX))
            .await
            .unwrap();
        assert!(acquired.lease.is_some());
        assert!(broker.claim("c", Duration::MAX).await.unwrap());
        assert!(!broker.claim("c", Duration::MAX).await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn expired_claims_are_dropped() {
        let broker = MemoryBroker::new();
        for i in 0..100 {
            assert!(broker
                .claim(&format!("c{i}"), Duration::from_millis(10))
                .await
                .unwrap());
        }
        tokio::time::advance(Duration::from_millis(20)).await;
        assert!(broker.claim("c0", Duration::from_secs(1)).await.unwrap());
        let state = broker.state();
        assert_eq!(state.claims.len(), 1, "expired claims are gone");
        assert_eq!(state.claim_expiries.len(), 1);
    }
}
