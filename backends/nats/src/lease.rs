//! Leases: one JetStream message per lease key holds the key's whole lease set, and every
//! change replaces it by compare-and-set, judged by the server's clock.
//!
//! See the [crate docs](crate#leases) for the design and the clock argument.

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use bgtask_core::{Error, ErrorKind, KeyCount, KeyPage, LeaseId, LeaseInfo, Result, MAX_KEY_PAGE};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::clock::Clock;
use crate::error::no_answer;
use crate::js::{stream_missing, Cas, Got, Js, Stored};
use crate::stream::Stream;
use crate::subject::Subjects;
use crate::time::conflict_backoff;

mod change;
mod sweep;

use sweep::Sweeper;

/// Bytes of a lease write kept free for its headers (`Nats-Expected-*`, `Nats-TTL`).
const HEADER_RESERVE: usize = 512;

/// A lease key's record, as stored (JSON).
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    /// Format version.
    v: u32,
    /// The leases, oldest first.
    l: Vec<Entry>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    /// Lease id.
    i: String,
    /// Note.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    n: String,
    /// Expiry: nanoseconds since the Unix epoch by the server's clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    e: Option<u64>,
    /// Expiry relative to the record's own timestamp (the server's clock when it stored the
    /// record), in nanoseconds: how a new lease is written, since the time the server will
    /// stamp is not known before the write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    t: Option<u64>,
}

/// One lease, with its expiry resolved to server time.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Lease {
    id: String,
    note: String,
    /// Nanoseconds since the Unix epoch, by the server's clock.
    expires: u64,
}

/// A key's lease set as read: the record's sequence (0: no record) and its leases.
#[derive(Debug, Default)]
struct State {
    seq: u64,
    leases: Vec<Lease>,
}

impl State {
    fn live(&self, now: u64) -> Vec<Lease> {
        self.leases
            .iter()
            .filter(|l| l.expires > now)
            .cloned()
            .collect()
    }
}

/// What one attempt of an operation came to.
enum Outcome<T> {
    Done(T),
    /// Somebody else changed the key first: read again and retry.
    Conflict,
    /// The lease stream is gone: create it and retry.
    NoStream,
}

/// The stream's reads, shared by the lease operations and the sweeper.
#[derive(Debug)]
struct Store {
    js: Js,
    /// The server's clock, read on the stream's clock subject.
    clock: Clock,
    /// Lease subjects this broker last saw with a record. Only a guess, never trusted: an
    /// acquire on a subject not in it first tries to create the record outright (a write that
    /// the server refuses if a record exists), which saves the read.
    with_record: std::sync::Mutex<HashSet<String>>,
}

/// At most this many subjects are remembered in [`Store::with_record`]; beyond, it starts over
/// (a forgotten subject costs one refused write).
const MAX_REMEMBERED: usize = 100_000;

impl Store {
    /// The key's lease set and the server's current time.
    ///
    /// A key without a record has no lease to judge, so the clock is read only when there is a
    /// record: the common cases (a fresh claim, a key value that is not blacklisted) cost one
    /// request. The time read is kept in `clock` (0: not read yet) for the operation's retries:
    /// read during the operation, it is still a time within the operation, before any of its
    /// writes; it only gets more conservative (a lease that expires meanwhile counts as live a
    /// little longer), and retries after a conflict need only the read and the write.
    async fn snapshot(&self, subject: &str, clock: &AtomicU64) -> Result<Outcome<(State, u64)>> {
        let state = match self.read(subject).await? {
            Outcome::Done(state) => state,
            Outcome::Conflict => return Ok(Outcome::Conflict),
            Outcome::NoStream => return Ok(Outcome::NoStream),
        };
        if state.seq == 0 {
            return Ok(Outcome::Done((state, 0)));
        }
        let known = clock.load(Ordering::SeqCst);
        if known != 0 {
            return Ok(Outcome::Done((state, known)));
        }
        Ok(self.now().await?.map(|now| {
            clock.store(now, Ordering::SeqCst);
            (state, now)
        }))
    }

    /// The key's lease set.
    async fn read(&self, subject: &str) -> Result<Outcome<State>> {
        Ok(match self.js.last(subject).await? {
            Got::Message(stored) => {
                self.saw(subject, true);
                Outcome::Done(State {
                    seq: stored.seq,
                    leases: decode(&stored)?,
                })
            }
            Got::Empty => {
                self.saw(subject, false);
                Outcome::Done(State::default())
            }
            Got::NoStream => Outcome::NoStream,
        })
    }

    /// Remember whether `subject` has a record, as just seen.
    fn saw(&self, subject: &str, record: bool) {
        let mut with_record = self
            .with_record
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !record {
            with_record.remove(subject);
        } else if !with_record.contains(subject) {
            if with_record.len() >= MAX_REMEMBERED {
                with_record.clear();
            }
            with_record.insert(subject.to_owned());
        }
    }

    /// Whether `subject` had a record when this broker last looked.
    fn had_record(&self, subject: &str) -> bool {
        self.with_record
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(subject)
    }

    /// The server's current time: a timestamp the lease stream gave a message written after
    /// this call began (one reading shared with the operations that asked meanwhile).
    async fn now(&self) -> Result<Outcome<u64>> {
        Ok(match self.clock.now().await? {
            Some(now) => Outcome::Done(now),
            None => Outcome::NoStream,
        })
    }

    /// Delete the record of `subject` if its leases have all expired; else the time its
    /// longest lease has left.
    async fn sweep(&self, subject: &str) -> Result<Option<Duration>> {
        let (state, now) = match self.snapshot(subject, &AtomicU64::new(0)).await? {
            Outcome::Done(found) => found,
            Outcome::Conflict | Outcome::NoStream => return Ok(None),
        };
        if state.seq == 0 {
            return Ok(None);
        }
        match state.live(now).iter().map(|l| l.expires - now).max() {
            Some(left) => Ok(Some(Duration::from_nanos(left))),
            None => {
                // Conditional on the record being unchanged: a newer one is never deleted.
                self.js.delete(state.seq).await?;
                self.saw(subject, false);
                Ok(None)
            }
        }
    }
}

/// The lease operations of one broker.
#[derive(Debug)]
pub(crate) struct Leases {
    store: Arc<Store>,
    stream: Stream,
    subjects: Subjects,
    op_timeout: Duration,
    /// Deletes expired records where the server does not (no per-message TTLs).
    sweeper: Sweeper,
}

impl Leases {
    /// Set up the lease stream and the lease operations on it.
    pub(crate) async fn start(
        js: Js,
        subjects: Subjects,
        op_timeout: Duration,
        max_ttl: Duration,
    ) -> Result<Leases> {
        let stream_subjects = vec![subjects.lease_filter(), subjects.clock()];
        let stream = Stream::open(js.clone(), stream_subjects, max_ttl).await?;
        let clock = Clock::start(js.clone(), subjects.clock(), op_timeout);
        let store = Arc::new(Store {
            js,
            clock,
            with_record: std::sync::Mutex::new(HashSet::new()),
        });
        let sweeper = Sweeper::start(store.clone(), op_timeout);
        Ok(Leases {
            store,
            stream,
            sweeper,
            subjects,
            op_timeout,
        })
    }

    /// The longest TTL [`acquire`](Self::acquire) accepts.
    pub(crate) fn max_ttl(&self) -> Duration {
        self.stream.max_ttl()
    }

    /// The lease stream's replicas.
    pub(crate) fn replicas(&self) -> u32 {
        self.stream.replicas()
    }

    /// Whether records carry a per-message TTL (the server keeps them: 2.11+).
    pub(crate) fn message_ttl(&self) -> bool {
        self.stream.message_ttl()
    }

    pub(crate) async fn leases(&self, key: &str) -> Result<Vec<LeaseInfo>> {
        let subject = self.subjects.lease(key)?;
        let clock = AtomicU64::new(0);
        self.run("list leases", || async {
            let (state, now) = match self.store.snapshot(&subject, &clock).await? {
                Outcome::Done(found) => found,
                Outcome::Conflict => return Ok(Outcome::Conflict),
                Outcome::NoStream => return Ok(Outcome::NoStream),
            };
            self.collect_garbage(&state, now).await;
            let leases = state
                .live(now)
                .into_iter()
                .map(|l| LeaseInfo {
                    id: LeaseId::new(l.id),
                    note: l.note,
                    remaining: Duration::from_nanos(l.expires - now),
                })
                .collect();
            Ok(Outcome::Done(leases))
        })
        .await
    }

    pub(crate) async fn count(&self, key: &str) -> Result<u64> {
        let subject = self.subjects.lease(key)?;
        let clock = AtomicU64::new(0);
        self.run("count leases", || async {
            let (state, now) = match self.store.snapshot(&subject, &clock).await? {
                Outcome::Done(found) => found,
                Outcome::Conflict => return Ok(Outcome::Conflict),
                Outcome::NoStream => return Ok(Outcome::NoStream),
            };
            self.collect_garbage(&state, now).await;
            Ok(Outcome::Done(state.live(now).len() as u64))
        })
        .await
    }

    /// The lease keys under `prefix` with live leases: the stream's lease subjects (one
    /// `STREAM.INFO` per server page), then a read of each candidate key's record, 16 at a
    /// time, until the page is full.
    pub(crate) async fn list_keys(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<KeyPage> {
        let subjects = self
            .store
            .js
            .subjects(&self.subjects.lease_filter())
            .await?;
        let mut candidates: Vec<String> = subjects
            .iter()
            .filter_map(|s| self.subjects.lease_key(s))
            .filter(|key| key.starts_with(prefix) && after.is_none_or(|a| key.as_str() > a))
            .collect();
        candidates.sort_unstable();
        let limit = limit.clamp(1, MAX_KEY_PAGE);
        let mut found = Vec::new();
        for chunk in candidates.chunks(16) {
            let counts = futures::future::join_all(chunk.iter().map(|key| self.count(key))).await;
            for (key, live) in chunk.iter().zip(counts) {
                found.push(KeyCount {
                    key: key.clone(),
                    live: live?,
                });
            }
            if found.iter().filter(|k| k.live > 0).count() > limit {
                break;
            }
        }
        Ok(KeyPage::collect(found, prefix, after, limit))
    }

    /// Run `attempt` until it is done, within `op_timeout`: after a conflict, again after a
    /// random wait; after finding the stream gone, again once it is created.
    async fn run<T, F, Fut>(&self, what: &str, mut attempt: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Outcome<T>>>,
    {
        let deadline = Instant::now() + self.op_timeout;
        let work = async {
            let mut conflicts = 0u32;
            let mut recreated = false;
            loop {
                match attempt().await? {
                    Outcome::Done(value) => return Ok(value),
                    Outcome::Conflict => {
                        conflicts += 1;
                        tokio::time::sleep(conflict_backoff(conflicts)).await;
                    }
                    Outcome::NoStream if recreated => {
                        return Err(stream_missing(self.store.js.stream()))
                    }
                    Outcome::NoStream => {
                        self.stream.recreate().await?;
                        recreated = true;
                    }
                }
            }
        };
        match tokio::time::timeout_at(deadline, work).await {
            Ok(result) => result,
            Err(_) => Err(no_answer(what, self.op_timeout)),
        }
    }

    /// Replace record `expected` of `subject` with `data`, whose longest lease has `longest`
    /// left.
    async fn write(
        &self,
        subject: &str,
        expected: u64,
        longest: Duration,
        data: Vec<u8>,
    ) -> Result<Outcome<()>> {
        // A second more than the longest lease, so that rounding never cuts one short.
        let ttl = self.message_ttl().then(|| longest + Duration::from_secs(1));
        Ok(
            match self
                .store
                .js
                .publish_if(subject, expected, ttl, data)
                .await?
            {
                Cas::Stored(_) => {
                    self.store.saw(subject, true);
                    if !self.message_ttl() {
                        self.sweeper.schedule(subject, longest);
                    }
                    Outcome::Done(())
                }
                Cas::Conflict => {
                    self.store.saw(subject, true);
                    Outcome::Conflict
                }
                Cas::NoStream => Outcome::NoStream,
                Cas::TtlRefused => {
                    self.stream.ttl_refused();
                    Outcome::Conflict
                }
            },
        )
    }

    /// Delete a record whose leases have all expired (best effort: it is conditional on the
    /// record being unchanged, and a failure only leaves it to the stream's `max_age`).
    async fn collect_garbage(&self, state: &State, now: u64) {
        if state.seq != 0 && state.live(now).is_empty() {
            if let Err(e) = self.store.js.delete(state.seq).await {
                tracing::debug!(error = %e, "nats: could not delete an expired lease record");
            }
        }
    }

    fn check_size(&self, data: &[u8], leases: usize) -> Result<()> {
        let limit = self.store.js.max_payload().saturating_sub(HEADER_RESERVE);
        if data.len() > limit {
            return Err(Error::new(
                ErrorKind::TooLarge,
                format!(
                    "nats: {leases} leases with their notes ({} bytes) do not fit in one NATS \
                     message of at most {limit} bytes (the server's max_payload); release some \
                     or use shorter notes",
                    data.len()
                ),
            ));
        }
        Ok(())
    }
}

impl<T> Outcome<T> {
    fn map<U>(self, f: impl FnOnce(T) -> U) -> Outcome<U> {
        match self {
            Outcome::Done(value) => Outcome::Done(f(value)),
            Outcome::Conflict => Outcome::Conflict,
            Outcome::NoStream => Outcome::NoStream,
        }
    }
}

/// The leases of a stored record, with expiries resolved against its timestamp.
fn decode(stored: &Stored) -> Result<Vec<Lease>> {
    if stored.data.is_empty() {
        return Ok(Vec::new());
    }
    let record: Record = serde_json::from_slice(&stored.data).map_err(|e| {
        Error::new(
            ErrorKind::Protocol,
            format!(
                "nats: lease record #{} is not one this backend wrote",
                stored.seq
            ),
        )
        .with_source(e)
    })?;
    if record.v != 1 {
        return Err(Error::new(
            ErrorKind::Protocol,
            format!(
                "nats: lease record #{} has format version {}, newer than this backend's 1",
                stored.seq, record.v
            ),
        ));
    }
    Ok(record
        .l
        .into_iter()
        .map(|entry| Lease {
            expires: match (entry.e, entry.t) {
                (Some(at), _) => at,
                (None, Some(ttl)) => stored.time_nanos.saturating_add(ttl),
                (None, None) => 0,
            },
            id: entry.i,
            note: entry.n,
        })
        .collect())
}

/// A record of `leases` (absolute expiries) and, optionally, a new lease `(id, note, ttl)`
/// that expires `ttl` nanoseconds after the server stores the record.
fn encode(leases: &[Lease], new: Option<(&str, &str, u64)>) -> Vec<u8> {
    let mut entries: Vec<Entry> = leases
        .iter()
        .map(|l| Entry {
            i: l.id.clone(),
            n: l.note.clone(),
            e: Some(l.expires),
            t: None,
        })
        .collect();
    if let Some((id, note, ttl)) = new {
        entries.push(Entry {
            i: id.to_owned(),
            n: note.to_owned(),
            e: None,
            t: Some(ttl),
        });
    }
    serde_json::to_vec(&Record { v: 1, l: entries }).expect("a lease record serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(time_nanos: u64, data: Vec<u8>) -> Stored {
        Stored {
            seq: 7,
            time_nanos,
            data,
        }
    }

    #[test]
    fn relative_expiries_resolve_against_the_record_timestamp() {
        let old = Lease {
            id: "a".into(),
            note: "n \"q\" ✓".into(),
            expires: 5_000,
        };
        let data = encode(std::slice::from_ref(&old), Some(("b", "", 300)));
        let leases = decode(&stored(1_000, data)).unwrap();
        assert_eq!(leases[0], old);
        assert_eq!(
            leases[1],
            Lease {
                id: "b".into(),
                note: String::new(),
                expires: 1_300
            }
        );
        let state = State { seq: 7, leases };
        assert_eq!(state.live(1_299).len(), 2);
        assert_eq!(state.live(1_300).len(), 1);
        assert_eq!(state.live(5_000).len(), 0);
    }

    #[test]
    fn foreign_records_are_protocol_errors() {
        let err = decode(&stored(1, b"not json".to_vec())).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Protocol);
        let err = decode(&stored(1, br#"{"v":2,"l":[]}"#.to_vec())).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Protocol);
        assert!(decode(&stored(1, Vec::new())).unwrap().is_empty());
    }
}
