//! Claims: one JetStream message per claim key, written only if the key has none ("create if
//! absent"), taken over by compare-and-set once the server's clock says it is over.
//!
//! See the [crate docs](crate#claims) for the design, the clock argument and what is stored.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use bgtask_core::{Error, ErrorKind, Result};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::clock::Clock;
use crate::error::no_answer;
use crate::js::{stream_missing, Cas, Got, Js, Stored};
use crate::stream::Stream;
use crate::subject::Subjects;
use crate::time::{conflict_backoff, nanos};

/// A claim record, as stored (JSON): the claim is over `t` nanoseconds after the server stored
/// the record (its timestamp).
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    /// Format version.
    v: u32,
    /// The claim's TTL in nanoseconds.
    t: u64,
}

/// The claim operations of one broker, on the claim stream.
#[derive(Debug)]
pub(crate) struct Claims {
    store: Arc<Store>,
}

/// What the claim operations share, with the tasks that run queued claims.
#[derive(Debug)]
struct Store {
    stream: Stream,
    subjects: Subjects,
    op_timeout: Duration,
    /// The server's time, read for many calls at once.
    clock: Clock,
    /// Deletes records that are over where the server does not (no per-message TTLs).
    sweeper: Sweeper,
    /// The keys with a claim attempt under way in this broker, each with the calls that came
    /// meanwhile: the next attempt on the key, made for all of them at once.
    queues: std::sync::Mutex<HashMap<String, Vec<Waiter>>>,
    /// Claims this broker took or found held, by subject: a server time before which the claim
    /// is surely live (a lower bound of its record's timestamp, plus its TTL).
    known: std::sync::Mutex<HashMap<String, u64>>,
}

/// At most this many claims are remembered per broker (about 100 bytes each).
const MAX_KNOWN: usize = 100_000;

/// A claim call waiting for the next attempt on its key.
#[derive(Debug)]
struct Waiter {
    ttl: Duration,
    result: oneshot::Sender<Result<bool>>,
}

impl Claims {
    /// Set up the claim stream `js` and the claim operations on it.
    pub(crate) async fn start(
        js: Js,
        subjects: Subjects,
        op_timeout: Duration,
        max_ttl: Duration,
    ) -> Result<Claims> {
        let stream_subjects = vec![subjects.claim_filter(), subjects.claim_clock()];
        let stream = Stream::open(js.clone(), stream_subjects, max_ttl).await?;
        let clock = Clock::start(js.clone(), subjects.claim_clock(), op_timeout);
        let sweeper = Sweeper::start(js, clock.clone(), op_timeout);
        let store = Store {
            stream,
            subjects,
            op_timeout,
            clock,
            sweeper,
            queues: std::sync::Mutex::new(HashMap::new()),
            known: std::sync::Mutex::new(HashMap::new()),
        };
        Ok(Claims {
            store: Arc::new(store),
        })
    }

    /// The claim stream's replicas.
    pub(crate) fn replicas(&self) -> u32 {
        self.store.stream.replicas()
    }

    /// The claim stream's name.
    pub(crate) fn stream(&self) -> &str {
        self.store.stream.js().stream()
    }

    /// Take the claim on `key` for `ttl` if nobody holds it.
    ///
    /// One attempt per key at a time in a broker: calls on a key that come while an attempt on
    /// it is under way wait, and the next attempt is made for all of them at once. It begins
    /// after each of them began and ends before each returns, so its outcome holds for each:
    /// `false` for all, or `true` for the first and `false` for the others (claimed by the
    /// first). Many workers of one process that all see a task thus cost two attempts, not one
    /// each.
    pub(crate) async fn claim(&self, key: &str, ttl: Duration) -> Result<bool> {
        let store = &self.store;
        let subject = store.subjects.claim(key)?;
        let ttl = Duration::from_millis(bgtask_core::broker::ttl_millis(ttl));
        if ttl > store.stream.max_ttl() {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "nats: a claim of {ttl:?} is longer than the {:?} this backend keeps \
                     anything (NatsConfig::lease_max_ttl, or the claim stream's max_age)",
                    store.stream.max_ttl()
                ),
            ));
        }
        let work = async {
            let queued = {
                let mut queues = store.queues.lock().unwrap_or_else(PoisonError::into_inner);
                match queues.get_mut(&subject) {
                    Some(queue) => {
                        let (result, rx) = oneshot::channel();
                        queue.push(Waiter { ttl, result });
                        Some(rx)
                    }
                    None => {
                        queues.insert(subject.clone(), Vec::new());
                        None
                    }
                }
            };
            match queued {
                Some(rx) => rx.await.unwrap_or_else(|_| {
                    Err(Error::new(
                        ErrorKind::Unavailable,
                        "nats: a queued claim was dropped (the runtime is shutting down)",
                    ))
                }),
                None => {
                    // Hands the key on when done, also if this call is dropped.
                    let turn = Turn {
                        store: store.clone(),
                        subject,
                    };
                    store.try_claim(&turn.subject, ttl).await
                }
            }
        };
        match tokio::time::timeout(store.op_timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(no_answer("a claim", store.op_timeout)),
        }
    }
}

/// The attempt under way on a key; when it ends, the calls that came meanwhile get theirs.
struct Turn {
    store: Arc<Store>,
    subject: String,
}

impl Drop for Turn {
    fn drop(&mut self) {
        let subject = std::mem::take(&mut self.subject);
        let store = &self.store;
        let batch: Vec<Waiter> = {
            let mut queues = store.queues.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(queue) = queues.get_mut(&subject) else {
                return;
            };
            // Calls that gave up (timed out) are not claimed for.
            let batch: Vec<Waiter> = std::mem::take(queue)
                .into_iter()
                .filter(|w| !w.result.is_closed())
                .collect();
            if batch.is_empty() {
                queues.remove(&subject);
                return;
            }
            batch
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime to run it on: the waiters learn that from their dropped senders.
            let mut queues = store.queues.lock().unwrap_or_else(PoisonError::into_inner);
            queues.remove(&subject);
            return;
        };
        let store = store.clone();
        runtime.spawn(async move {
            let turn = Turn {
                store: store.clone(),
                subject,
            };
            let ttl = batch[0].ttl;
            let result =
                match tokio::time::timeout(store.op_timeout, store.try_claim(&turn.subject, ttl))
                    .await
                {
                    Ok(result) => result,
                    Err(_) => Err(no_answer("a claim", store.op_timeout)),
                };
            let mut first = true;
            for waiter in batch {
                let outcome = match &result {
                    Ok(claimed) => Ok(*claimed && first),
                    Err(e) => Err(Error::new(e.kind(), e.message())),
                };
                first = false;
                let _ = waiter.result.send(outcome);
            }
            drop(turn);
        });
    }
}

impl Store {
    async fn try_claim(&self, subject: &str, ttl: Duration) -> Result<bool> {
        let data = serde_json::to_vec(&Record {
            v: 1,
            t: nanos(ttl),
        })
        .expect("a claim record serializes");
        // The subject's last sequence the next write expects: 0 for "no record".
        let mut expected = 0;
        // The server's time, read once during this call, when a record is found.
        let mut now: Option<u64> = None;
        // A claim this broker took or saw, and that was surely live until `live_until`: if the
        // server's time is still before that, it is live now, without asking for the record.
        let remembered = self.known().get(subject).copied();
        if let Some(live_until) = remembered {
            if let Some(server_now) = self.clock.now().await? {
                if live_until > server_now {
                    return Ok(false);
                }
                self.known().remove(subject);
                now = Some(server_now);
            }
        }
        let mut recreated = false;
        let mut rounds = 0u32;
        loop {
            // A second more than the claim, so that rounding to seconds never cuts it short.
            let record_ttl = self
                .stream
                .message_ttl()
                .then(|| ttl + Duration::from_secs(1));
            // A server time before the write, so before the record's timestamp.
            let before = self.clock.latest();
            match self
                .stream
                .js()
                .publish_if(subject, expected, record_ttl, data.clone())
                .await?
            {
                Cas::Stored(seq) => {
                    if record_ttl.is_none() {
                        self.sweeper.schedule(seq, ttl);
                    }
                    if before > 0 {
                        self.remember(subject, before.saturating_add(nanos(ttl)));
                    }
                    return Ok(true);
                }
                Cas::Conflict => {}
                Cas::TtlRefused => {
                    self.stream.ttl_refused();
                    continue;
                }
                Cas::NoStream => {
                    self.stream_gone(&mut recreated).await?;
                    expected = 0;
                    continue;
                }
            }
            // Somebody holds it, or held it: is that claim over, by the server's clock?
            rounds += 1;
            if rounds > 2 {
                tokio::time::sleep(conflict_backoff(rounds - 2)).await;
            }
            let (found, read) = match now {
                Some(known) => (self.stream.js().last(subject).await?, Some(known)),
                None => {
                    let (found, read) =
                        futures::join!(self.stream.js().last(subject), self.clock.now());
                    (found?, read?)
                }
            };
            let Some(server_now) = read else {
                // The clock found no stream.
                self.stream_gone(&mut recreated).await?;
                expected = 0;
                continue;
            };
            now = Some(server_now);
            match found {
                Got::Message(stored) => {
                    let over = expires(&stored)?;
                    if over > server_now {
                        self.remember(subject, over);
                        return Ok(false);
                    }
                    // Over: take it over, if nobody else does first.
                    expected = stored.seq;
                }
                // Deleted since (it was over): create it again.
                Got::Empty => expected = 0,
                Got::NoStream => {
                    self.stream_gone(&mut recreated).await?;
                    expected = 0;
                }
            }
        }
    }

    fn known(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.known.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Remember that the claim on `subject` is live until server time `live_until` at least.
    ///
    /// Used only while the server's time is before that: a record leaves (taken over, swept,
    /// `max_age`) only once it is over, so until then it is still there and still live.
    fn remember(&self, subject: &str, live_until: u64) {
        let mut known = self.known();
        if known.len() >= MAX_KNOWN {
            let now = self.clock.latest();
            known.retain(|_, until| *until > now);
            if known.len() >= MAX_KNOWN / 2 {
                known.clear();
            }
        }
        known.insert(subject.to_owned(), live_until);
    }

    /// The stream is gone: create it again, once per call.
    async fn stream_gone(&self, recreated: &mut bool) -> Result<()> {
        if *recreated {
            return Err(stream_missing(self.stream.js().stream()));
        }
        self.stream.recreate().await?;
        // The records are gone with the old stream.
        self.known().clear();
        *recreated = true;
        Ok(())
    }
}

/// When the claim of a stored record is over: its server timestamp plus its TTL.
fn expires(stored: &Stored) -> Result<u64> {
    let record: Record = serde_json::from_slice(&stored.data).map_err(|e| {
        Error::new(
            ErrorKind::Protocol,
            format!(
                "nats: claim record #{} is not one this backend wrote",
                stored.seq
            ),
        )
        .with_source(e)
    })?;
    if record.v != 1 {
        return Err(Error::new(
            ErrorKind::Protocol,
            format!(
                "nats: claim record #{} has format version {}, newer than this backend's 1",
                stored.seq, record.v
            ),
        ));
    }
    Ok(stored.time_nanos.saturating_add(record.t))
}

// ---------------------------------------------------------------------------------------------
// The sweeper

/// At most this many records are watched per broker (16 bytes each); beyond, the stream's
/// `max_age` removes them.
const MAX_SWEEP: usize = 1_000_000;

/// How long a new record waits at most before the sweeper reads the clock for it: the bound on
/// its timestamp, and so its deletion, is at most about this late.
const STAMP_DELAY: Duration = Duration::from_millis(500);

/// The shortest interval between two clock readings of the sweeper.
const MIN_TICK: Duration = Duration::from_millis(50);

/// How long the sweeper pauses after failing to read the clock.
const ERROR_PAUSE: Duration = Duration::from_secs(1);

/// Deletes are sent this many at a time.
const DELETES_IN_FLIGHT: usize = 32;

/// Deletes the records this broker wrote once their claims are over, on servers that do not
/// expire messages by themselves (no per-message TTLs before 2.11). A record whose broker is
/// gone before that stays until it is taken over or the stream's `max_age`.
#[derive(Debug)]
struct Sweeper {
    requests: mpsc::UnboundedSender<(u64, u64)>,
}

impl Sweeper {
    fn start(js: Js, clock: Clock, op_timeout: Duration) -> Sweeper {
        let (requests, rx) = mpsc::unbounded_channel();
        tokio::spawn(sweep(js, clock, op_timeout, rx));
        Sweeper { requests }
    }

    /// Delete record `seq`, a claim of `ttl`, once it is over.
    fn schedule(&self, seq: u64, ttl: Duration) {
        let _ = self.requests.send((seq, nanos(ttl)));
    }
}

/// The sweeper's loop; ends with the broker.
///
/// A record's timestamp is not in the write's acknowledgement, so the sweeper bounds it from
/// above instead: a clock reading that begins after the acknowledgement arrived is a server
/// time after the record was stored. A record is deleted once a later reading is at least that
/// bound plus its TTL: by the server's clock, its claim is over. The delete names the record's
/// sequence, so a record that replaced it is never deleted.
async fn sweep(
    js: Js,
    clock: Clock,
    op_timeout: Duration,
    mut requests: mpsc::UnboundedReceiver<(u64, u64)>,
) {
    // Records without a bound on their timestamp yet: (sequence, TTL), and since when.
    let mut unstamped: Vec<(u64, u64)> = Vec::new();
    let mut waiting_since: Option<Instant> = None;
    // Records by the server time from which they are surely over: (time, sequence).
    let mut due: BinaryHeap<Reverse<(u64, u64)>> = BinaryHeap::new();
    // The last reading: server time, and the local instant it came back (to plan the next).
    let mut last: Option<(u64, Instant)> = None;
    let mut warned = false;
    let mut accept = |unstamped: &mut Vec<(u64, u64)>,
                      due: &BinaryHeap<Reverse<(u64, u64)>>,
                      record: (u64, u64)| {
        if unstamped.len() + due.len() < MAX_SWEEP {
            unstamped.push(record);
        } else if !warned {
            warned = true;
            tracing::warn!(
                "nats: more than {MAX_SWEEP} claim records to delete; the claim stream's \
                 max_age will remove the others"
            );
        }
    };
    loop {
        let next = next_tick(waiting_since, &due, last);
        tokio::select! {
            request = requests.recv() => match request {
                Some(record) => {
                    waiting_since.get_or_insert_with(Instant::now);
                    accept(&mut unstamped, &due, record);
                }
                None => return,
            },
            _ = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                // Every record received so far was acknowledged before this reading begins.
                while let Ok(record) = requests.try_recv() {
                    accept(&mut unstamped, &due, record);
                }
                let now = match clock.now().await {
                    Ok(Some(now)) => now,
                    Ok(None) => {
                        // The stream is gone, and the records with it.
                        unstamped.clear();
                        due.clear();
                        waiting_since = None;
                        continue;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "nats: claim sweep could not read the clock");
                        tokio::time::sleep(ERROR_PAUSE).await;
                        continue;
                    }
                };
                last = Some((now, Instant::now()));
                waiting_since = None;
                for (seq, ttl) in unstamped.drain(..) {
                    due.push(Reverse((now.saturating_add(ttl), seq)));
                }
                let mut over = Vec::new();
                while let Some(&Reverse((at, seq))) = due.peek() {
                    if at > now {
                        break;
                    }
                    due.pop();
                    over.push((at, seq));
                }
                for failed in delete_all(&js, op_timeout, over).await {
                    due.push(Reverse(failed));
                }
            }
        }
    }
}

/// When the sweeper should read the clock next: soon after a record arrived, and when the
/// earliest watched record should be over (planned by the local clock from the last reading;
/// the decision itself is the server's).
fn next_tick(
    waiting_since: Option<Instant>,
    due: &BinaryHeap<Reverse<(u64, u64)>>,
    last: Option<(u64, Instant)>,
) -> Option<Instant> {
    let stamp = waiting_since.map(|since| since + STAMP_DELAY);
    let earliest = due.peek().map(|Reverse((at, _))| match last {
        Some((now, when)) => when + Duration::from_nanos(at.saturating_sub(now)),
        None => Instant::now(),
    });
    let next = match (stamp, earliest) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b)?,
    };
    Some(match last {
        Some((_, when)) => next.max(when + MIN_TICK),
        None => next,
    })
}

/// Delete records that are over, a few at a time; returns the ones to try again later (all
/// the rest once one fails, since the server is then likely unreachable).
async fn delete_all(js: &Js, op_timeout: Duration, over: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    let mut failed = Vec::new();
    let mut records = over.into_iter();
    loop {
        let chunk: Vec<(u64, u64)> = records.by_ref().take(DELETES_IN_FLIGHT * 4).collect();
        if chunk.is_empty() {
            return failed;
        }
        let results: Vec<Option<(u64, u64)>> = futures::stream::iter(chunk)
            .map(|(at, seq)| async move {
                match tokio::time::timeout(op_timeout, js.delete(seq)).await {
                    // Deleted, or already gone (taken over, or the stream deleted).
                    Ok(Ok(_)) => None,
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "nats: could not delete a claim record");
                        Some((at, seq))
                    }
                    Err(_) => Some((at, seq)),
                }
            })
            .buffer_unordered(DELETES_IN_FLIGHT)
            .collect()
            .await;
        let before = failed.len();
        failed.extend(results.into_iter().flatten());
        if failed.len() > before {
            failed.extend(records);
            return failed;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(time_nanos: u64, data: &[u8]) -> Stored {
        Stored {
            seq: 3,
            time_nanos,
            data: data.to_vec(),
        }
    }

    #[test]
    fn expiry_is_the_record_stamp_plus_its_ttl() {
        let data = serde_json::to_vec(&Record { v: 1, t: 400 }).unwrap();
        assert_eq!(data, br#"{"v":1,"t":400}"#);
        assert_eq!(expires(&stored(1_000, &data)).unwrap(), 1_400);
        let far = serde_json::to_vec(&Record { v: 1, t: u64::MAX }).unwrap();
        assert_eq!(expires(&stored(1_000, &far)).unwrap(), u64::MAX);
    }

    #[test]
    fn foreign_records_are_protocol_errors() {
        for bad in [&b""[..], b"not json", br#"{"v":2,"t":1}"#, br#"{"v":1}"#] {
            let err = expires(&stored(1, bad)).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Protocol, "{bad:?}");
        }
    }

    #[test]
    fn sweeper_plans_by_the_last_reading() {
        let mut due = BinaryHeap::new();
        assert_eq!(next_tick(None, &due, None), None);
        let at = Instant::now();
        due.push(Reverse((5_000_000_000, 1)));
        // 5 s of server time to go from a reading that came back at `at`.
        let next = next_tick(None, &due, Some((0, at))).unwrap();
        assert_eq!(next, at + Duration::from_secs(5));
        // A new record is looked at within STAMP_DELAY.
        let next = next_tick(Some(at), &due, Some((0, at))).unwrap();
        assert_eq!(next, at + STAMP_DELAY);
        // Never sooner than MIN_TICK after the last reading.
        let next = next_tick(None, &due, Some((6_000_000_000, at))).unwrap();
        assert_eq!(next, at + MIN_TICK);
    }
}
