//! The creator's table of pending tasks: what arrives for each ([`Slot`]), where its offer
//! stands, and the counters of what the dispatcher dropped.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::value::RawValue;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::offer;
use crate::error::Result;
use crate::metrics::{self, Role};
use crate::protocol::{Counter, Reply};

/// Progress values buffered per task before the oldest unread are dropped (and counted).
pub(super) const PROGRESS_BUFFER: usize = 64;

/// Replies of one broadcast buffered before more are dropped (and counted).
pub(super) const BROADCAST_BUFFER: usize = 4096;

/// The client's own counters ([`ClientStats`](super::ClientStats)); each also goes to the [`metrics`](crate::metrics).
#[derive(Default)]
pub(super) struct Counters {
    pub(super) submitted: Counter,
    pub(super) malformed: Counter,
    pub(super) late: Counter,
    pub(super) dropped: Counter,
    pub(super) gaps: Counter,
}

impl Counters {
    pub(super) fn count_malformed(&self) {
        self.malformed.incr();
        metrics::malformed(Role::Client);
    }

    pub(super) fn count_late(&self) {
        self.late.incr();
        metrics::late_reply();
    }

    pub(super) fn count_dropped(&self) {
        self.dropped.incr();
        metrics::reply_dropped();
    }

    pub(super) fn count_gap(&self) {
        self.gaps.incr();
        metrics::gap(Role::Client);
    }
}

/// Where the dispatcher leaves what arrives for one task, and its handle picks it up.
#[derive(Default)]
pub(super) struct Slot {
    pub(super) state: Mutex<SlotState>,
    /// `notify_one` after every change: a stored permit means no wake-up is ever lost.
    pub(super) changed: Notify,
    /// The worker released the task's key lease with its reply.
    pub(super) released: AtomicBool,
}

#[derive(Default)]
pub(super) struct SlotState {
    pub(super) progress: VecDeque<Box<RawValue>>,
    /// The completion of a single task (at most one), or the replies of a broadcast.
    pub(super) replies: VecDeque<Result<Reply>>,
    /// The client shut down: nothing more will arrive.
    pub(super) closed: bool,
}

impl Slot {
    pub(super) fn lock(&self) -> MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn push(&self, update: impl FnOnce(&mut SlotState)) {
        update(&mut self.lock());
        self.changed.notify_one();
    }
}

pub(super) struct Pending {
    pub(super) slot: Arc<Slot>,
    pub(super) broadcast: bool,
    pub(super) deadline: Instant,
    /// Where its directed offer stands (none for broadcasts); boxed, so that the map of
    /// pending tasks, which keeps spare room, keeps it for small entries.
    pub(super) offer: Option<Box<offer::OfferState>>,
}

/// Task ids are random 128-bit numbers: their low 64 bits are already a good hash.
#[derive(Default)]
pub(super) struct IdHasher(u64);

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

pub(super) type PendingMap = HashMap<u128, Pending, BuildHasherDefault<IdHasher>>;

/// A task id from the wire: ours are 32 lowercase hex digits; anything else is not ours.
pub(super) fn parse_id(id: &str) -> Option<u128> {
    if id.len() != 32 || !id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    u128::from_str_radix(id, 16).ok()
}
