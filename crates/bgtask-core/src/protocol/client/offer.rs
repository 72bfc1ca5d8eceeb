//! Directed offers, the creator's side: each task is offered to one worker of its route, chosen
//! from the [`Roster`](super::super::presence::Roster); a decline, an unanswered offer or a
//! worker that is gone moves it on; when every worker is full it is held back until one frees;
//! when every worker has turned it down the creator takes its claim and reports `NoWorker`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use tokio::time::Instant;

use super::super::envelope::Message;
use super::super::presence::{Charge, Choice, Member, Route};
use super::{Inner, PendingMap};
use crate::error::{Error, ErrorDetail, ErrorKind};
use crate::metrics;
use crate::names::id_to_hex;

/// Where a directed offer stands; lives in the task's pending entry, so it goes (and gives its
/// charge back) when the task ends.
pub(super) struct OfferState {
    pub(super) route: Route,
    /// The encoded task, kept until a worker answers, to offer it again.
    pub(super) bytes: Option<Bytes>,
    /// The worker it is offered to now; `None` while held back.
    pub(super) current: Option<Charge>,
    /// Offers so far; an offer timeout for an older attempt is stale.
    pub(super) attempt: u32,
    /// A worker said it runs the task (accepted, progress): no more offers.
    pub(super) answered: bool,
    /// Workers that turned it down for good (ignored, unanswered, gone).
    pub(super) refused: Vec<Arc<Member>>,
    /// Workers that were full in this round.
    pub(super) busy: Vec<Arc<Member>>,
    /// The task's name (its guard's), for the acceptance histogram.
    task: Arc<str>,
    /// When the task was submitted, and when it was last offered.
    submitted: Instant,
    offered: Instant,
}

impl OfferState {
    pub(super) fn new(route: Route, bytes: Bytes, task: Arc<str>) -> Self {
        let now = Instant::now();
        OfferState {
            task,
            submitted: now,
            offered: now,
            route,
            bytes: Some(bytes),
            current: None,
            attempt: 0,
            answered: false,
            refused: Vec::new(),
            busy: Vec::new(),
        }
    }

    /// A worker answered (accepted, progress, done, or "claimed"): no more offers. The first
    /// answer times the acceptance, as of the offer it answered.
    pub(super) fn answer(&mut self) {
        if !std::mem::replace(&mut self.answered, true) {
            let waited = self.offered.saturating_duration_since(self.submitted);
            metrics::accepted_after(&self.task, waited);
        }
        self.bytes = None;
    }

    /// Another offer goes out now.
    pub(super) fn offer_to(&mut self, member: Arc<Member>) {
        self.attempt += 1;
        self.offered = Instant::now();
        self.current = Some(Charge::new(member));
    }

    fn excluded(&self) -> Vec<Arc<Member>> {
        self.refused.iter().chain(&self.busy).cloned().collect()
    }
}

/// What to publish after the pending map's lock is released.
pub(super) struct Send {
    pub(super) id: u128,
    pub(super) attempt: u32,
    pub(super) channel: String,
    pub(super) bytes: Bytes,
}

impl Inner {
    /// The task's bytes as offered now: the timeout is what is left of it (a worker's deadline
    /// is its receipt plus the timeout).
    fn reencode(&self, bytes: &Bytes, deadline: Instant) -> Option<Bytes> {
        let mut message = Message::decode(bytes).ok()?;
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        message.timeout_ms = Some(super::super::duration_millis(left).max(1));
        Some(message.encode())
    }

    /// Offer the pending task `id` to the next worker: the chosen one, else hold it back
    /// (every worker full), else give up (everyone refused). Call with the pending map locked.
    pub(super) fn next_offer(self: &Arc<Self>, pending: &mut PendingMap, id: u128) -> Option<Send> {
        let entry = pending.get_mut(&id)?;
        let deadline = entry.deadline;
        let offer = entry.offer.as_mut()?;
        if offer.answered {
            return None;
        }
        offer.current = None;
        match self.roster.choose(&offer.route, &offer.excluded()) {
            Choice::Offer(member) => {
                let bytes = self.reencode(offer.bytes.as_ref()?, deadline)?;
                let channel = member.channel.clone();
                offer.offer_to(member);
                Some(Send {
                    id,
                    attempt: offer.attempt,
                    channel,
                    bytes,
                })
            }
            Choice::Full => {
                self.park(offer.route.clone(), id);
                None
            }
            Choice::Nobody if !offer.busy.is_empty() => {
                self.park(offer.route.clone(), id);
                None
            }
            Choice::Nobody => {
                offer.bytes = None;
                let workers = offer.refused.len();
                self.give_up(id, deadline, workers);
                None
            }
        }
    }

    pub(super) fn park(&self, route: Route, id: u128) {
        self.parked().entry(route).or_default().push_back(id);
    }

    /// Publish an offer made under the lock, and arm its timeout.
    pub(super) fn send(self: &Arc<Self>, send: Send) {
        let due = Instant::now() + self.config.offer_timeout;
        self.offer_timers.push(due, (send.id, send.attempt));
        let inner = self.clone();
        tokio::spawn(async move {
            match inner.broker.publish(&send.channel, send.bytes).await {
                Ok(published) if published.nobody() => inner.undelivered(send.id, send.attempt),
                Ok(_) => {}
                Err(error) => tracing::debug!(%error, "could not send an offer; it times out"),
            }
        });
    }

    /// The offer `attempt` of task `id` got no answer within its offer time: mark the worker
    /// suspect and move on (or, if it is the only one left and still present, wait for it).
    pub(super) fn unanswered(self: &Arc<Self>, id: u128, attempt: u32) {
        self.no_answer(id, attempt, true);
    }

    /// The broker counted nobody on the worker's channel for offer `attempt` of task `id`: it
    /// will never answer, so move on at once (no waiting for it).
    pub(super) fn undelivered(self: &Arc<Self>, id: u128, attempt: u32) {
        self.no_answer(id, attempt, false);
    }

    fn no_answer(self: &Arc<Self>, id: u128, attempt: u32, delivered: bool) {
        let send = {
            let mut pending = self.pending();
            let Some(offer) = pending.get_mut(&id).and_then(|p| p.offer.as_mut()) else {
                return;
            };
            if offer.attempt != attempt || offer.answered {
                return;
            }
            if let Some(charge) = offer.current.take() {
                let member = charge.0.clone();
                member.suspect.store(true, Ordering::Relaxed);
                // Nobody else to offer it to (none has room, none said busy), and the worker is
                // still present: it may only be behind (a burst larger than it reads within the
                // offer time). Wait for it another offer time instead of failing the task; a
                // worker that crashed leaves presence within its TTL, and the task then ends as
                // no worker. (With a busy worker, the task waits for its room instead.)
                let mut others = offer.excluded();
                others.push(member.clone());
                if delivered
                    && offer.busy.is_empty()
                    && self.roster.is_live(&member)
                    && matches!(self.roster.choose(&offer.route, &others), Choice::Nobody)
                {
                    offer.current = Some(charge);
                    let due = Instant::now() + self.config.offer_timeout;
                    drop(pending);
                    self.offer_timers.push(due, (id, attempt));
                    return;
                }
                offer.refused.push(member);
            }
            self.next_offer(&mut pending, id)
        };
        if let Some(send) = send {
            self.send(send);
        }
    }

    /// A worker declined task `id` with `reason`. Declines from a worker the task is not
    /// offered to now (replayed, forged, or overtaken) are ignored.
    pub(super) fn declined(self: &Arc<Self>, id: u128, worker: &str, reason: &str) -> bool {
        let send = {
            let mut pending = self.pending();
            let Some(offer) = pending.get_mut(&id).and_then(|p| p.offer.as_mut()) else {
                return false;
            };
            let current = match &offer.current {
                Some(Charge(member)) if member.id == worker && !offer.answered => member.clone(),
                _ => return false,
            };
            match reason {
                "busy" => {
                    if let Some(concurrency) = current.concurrency {
                        let ours = current.outstanding.load(Ordering::Relaxed);
                        current
                            .others
                            .store(concurrency.saturating_sub(ours), Ordering::Relaxed);
                    }
                    offer.busy.push(current);
                }
                // Another worker took it after an offer timed out: wait for its reply.
                "claimed" => {
                    offer.answer();
                    return true;
                }
                _ => offer.refused.push(current),
            }
            self.next_offer(&mut pending, id)
        };
        if let Some(send) = send {
            self.send(send);
        }
        true
    }

    /// `member` has room (it announced so, or a task of ours on it ended): offer it the tasks
    /// held back for its routes, as many as it has room for.
    pub(super) fn unpark_for(self: &Arc<Self>, member: &Arc<Member>) {
        let mut sends = Vec::new();
        {
            let mut pending = self.pending();
            let mut parked = self.parked();
            for route in member.routes() {
                let Some(queue) = parked.get_mut(route) else {
                    continue;
                };
                while member.free().is_none_or(|f| f > 0) {
                    let Some(id) = queue.pop_front() else { break };
                    let Some(entry) = pending.get_mut(&id) else {
                        continue;
                    };
                    let deadline = entry.deadline;
                    let Some(offer) = entry.offer.as_mut() else {
                        continue;
                    };
                    if offer.current.is_some() || offer.answered {
                        continue;
                    }
                    let Some(bytes) = offer
                        .bytes
                        .as_ref()
                        .and_then(|b| self.reencode(b, deadline))
                    else {
                        continue;
                    };
                    offer.busy.clear();
                    offer.offer_to(member.clone());
                    sends.push(Send {
                        id,
                        attempt: offer.attempt,
                        channel: member.channel.clone(),
                        bytes,
                    });
                }
                if queue.is_empty() {
                    parked.remove(route);
                }
            }
        }
        for send in sends {
            self.send(send);
        }
    }

    /// Every worker refused task `id`: take its claim, so none can run it from now on, and end
    /// it with `NoWorker`. If a worker holds the claim already, it runs the task: wait for it.
    fn give_up(self: &Arc<Self>, id: u128, deadline: Instant, workers: usize) {
        let inner = self.clone();
        tokio::spawn(async move {
            let ttl =
                deadline.saturating_duration_since(Instant::now()) + inner.config.lease_margin;
            let hex = id_to_hex(id);
            match inner
                .broker
                .claim(&inner.namespace.claim_key(&hex), ttl)
                .await
            {
                Ok(true) => {
                    let Some(pending) = inner.pending().remove(&id) else {
                        return;
                    };
                    let error = Error::new(
                        ErrorKind::NoWorker,
                        format!("every worker ({workers}) declined task {hex} or did not answer"),
                    )
                    .with_detail(ErrorDetail::Declined { workers });
                    pending
                        .slot
                        .push(|state| state.replies.push_back(Err(error)));
                }
                Ok(false) => {}
                Err(error) => {
                    tracing::debug!(%error, "could not take the claim of a refused task; it times out");
                }
            }
        });
    }
}
