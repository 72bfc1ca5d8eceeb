//! One subscription's bounded buffer, for backends: [`channel`] makes a [`GapSender`] and its
//! [`GapReceiver`]. The buffer is bounded twice, in messages and in bytes (what
//! [`Weigh::weight`] says each item holds). A message the buffer cannot hold is lost, and the
//! reader is owed an [`Incoming::Gap`] before the next message that fits (so is one after a
//! reconnect). The memory broker, the Redis pub/sub supervisor and the PostgreSQL listener
//! deliver through it.
//!
//! The byte bound counts what the sender put in and the receiver has not taken out yet. One
//! message larger than the whole bound still goes into an empty buffer (else it could never be
//! delivered), so a buffer holds at most the bound or one message, whichever is larger.
//!
//! [`Incoming::Gap`]: crate::Incoming::Gap

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::mpsc;

use crate::broker::Incoming;

/// How many bytes an item holds in a subscription buffer.
pub trait Weigh {
    /// The bytes this item holds; it must not change while the item is in the buffer.
    fn weight(&self) -> usize;
}

impl Weigh for Incoming {
    fn weight(&self) -> usize {
        match self {
            Incoming::Message(bytes) => bytes.len(),
            Incoming::Gap => 0,
        }
    }
}

/// What became of one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// In the buffer.
    Delivered,
    /// The buffer was full (in messages or in bytes): the message is lost and a gap is owed.
    Lost,
    /// The reader is gone (its subscription is being dropped).
    Closed,
}

/// A bounded subscription buffer: at most `messages` items and, beyond one item, at most
/// `bytes` bytes of them. Both must be at least 1.
pub fn channel<T: Weigh>(messages: usize, bytes: usize) -> (GapSender<T>, GapReceiver<T>) {
    let (tx, rx) = mpsc::channel(messages);
    let held = Arc::new(AtomicUsize::new(0));
    let sender = GapSender {
        tx,
        held: held.clone(),
        max_bytes: bytes,
        owes_gap: false,
    };
    (sender, GapReceiver { rx, held })
}

/// A subscription buffer's sender that owes its reader a gap for what it lost.
#[derive(Debug)]
pub struct GapSender<T> {
    tx: mpsc::Sender<T>,
    /// The bytes in the buffer: added here, given back by the [`GapReceiver`].
    held: Arc<AtomicUsize>,
    max_bytes: usize,
    owes_gap: bool,
}

/// Why one send did not go into the buffer.
enum Refused {
    Full,
    Closed,
}

impl<T: Weigh> GapSender<T> {
    /// Messages may have been missed (the connection was lost): owe the reader a gap.
    pub fn owe_gap(&mut self) {
        self.owes_gap = true;
    }

    /// Whether a gap is owed.
    pub fn owes_gap(&self) -> bool {
        self.owes_gap
    }

    /// The bytes in the buffer now (what was sent and not read yet).
    pub fn held_bytes(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    /// Pay an owed gap (made by `gap`) now if the buffer has room. Returns whether nothing is
    /// owed any more.
    pub fn pay_gap(&mut self, gap: impl FnOnce() -> T) -> bool {
        if self.owes_gap && self.send(gap()).is_ok() {
            self.owes_gap = false;
        }
        !self.owes_gap
    }

    /// Deliver `item`, first paying any owed gap. When the buffer is full (in messages or in
    /// bytes) the item is lost and a gap is owed. An owed gap is paid only with the item that
    /// follows it, so a reader never reads two gaps in a row.
    pub fn deliver(&mut self, item: T, gap: impl FnOnce() -> T) -> Delivery {
        if self.owes_gap {
            if self.tx.is_closed() {
                return Delivery::Closed;
            }
            // Room for the gap and the item; the reader only makes more room meanwhile.
            let room = self.tx.capacity() >= self.tx.max_capacity().min(2);
            if !room || !self.fits(item.weight()) {
                return Delivery::Lost;
            }
            match self.send(gap()) {
                Ok(()) => self.owes_gap = false,
                Err(Refused::Full) => return Delivery::Lost,
                Err(Refused::Closed) => return Delivery::Closed,
            }
        }
        match self.send(item) {
            Ok(()) => Delivery::Delivered,
            Err(Refused::Full) => {
                self.owes_gap = true;
                Delivery::Lost
            }
            Err(Refused::Closed) => Delivery::Closed,
        }
    }

    /// Whether `weight` more bytes fit: under the bound, or alone in an empty buffer. (The
    /// receiver only ever lowers `held`, so a check that passes stays true.)
    fn fits(&self, weight: usize) -> bool {
        let held = self.held.load(Ordering::Acquire);
        held == 0 || held.saturating_add(weight) <= self.max_bytes
    }

    /// Put `item` in the buffer if both bounds allow it, counting its bytes.
    fn send(&self, item: T) -> Result<(), Refused> {
        if self.tx.is_closed() {
            return Err(Refused::Closed);
        }
        let weight = item.weight();
        if !self.fits(weight) {
            return Err(Refused::Full);
        }
        self.held.fetch_add(weight, Ordering::AcqRel);
        match self.tx.try_send(item) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.held.fetch_sub(weight, Ordering::AcqRel);
                match e {
                    mpsc::error::TrySendError::Full(_) => Err(Refused::Full),
                    mpsc::error::TrySendError::Closed(_) => Err(Refused::Closed),
                }
            }
        }
    }
}

/// The reading side of a subscription buffer: gives each item's bytes back to the sender's
/// bound as it reads it.
#[derive(Debug)]
pub struct GapReceiver<T> {
    rx: mpsc::Receiver<T>,
    held: Arc<AtomicUsize>,
}

impl<T: Weigh> GapReceiver<T> {
    /// The next item; `None` once every sender is gone and the buffer is empty.
    pub async fn recv(&mut self) -> Option<T> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Poll for the next item (as [`recv`](Self::recv)).
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let item = std::task::ready!(self.rx.poll_recv(cx));
        if let Some(item) = &item {
            self.held.fetch_sub(item.weight(), Ordering::AcqRel);
        }
        Poll::Ready(item)
    }
}

impl<T: Weigh> futures::Stream for GapReceiver<T> {
    type Item = T;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        self.get_mut().poll_recv(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A test item that weighs its value in bytes.
    #[derive(Debug, PartialEq, Eq)]
    struct Item(usize);

    impl Weigh for Item {
        fn weight(&self) -> usize {
            self.0
        }
    }

    #[test]
    fn a_full_buffer_loses_the_message_and_owes_one_gap() {
        let (mut sender, mut rx) = channel::<Item>(2, usize::MAX);
        let gap = || Item(0);
        assert_eq!(sender.deliver(Item(1), gap), Delivery::Delivered);
        assert_eq!(sender.deliver(Item(2), gap), Delivery::Delivered);
        assert_eq!(sender.deliver(Item(3), gap), Delivery::Lost);
        assert_eq!(sender.deliver(Item(4), gap), Delivery::Lost);
        assert!(sender.owes_gap());
        let next = |rx: &mut GapReceiver<Item>| rx.rx.try_recv().ok();
        assert_eq!(
            (next(&mut rx), next(&mut rx)),
            (Some(Item(1)), Some(Item(2)))
        );
        // The gap (0) comes before the next message, once.
        assert_eq!(sender.deliver(Item(5), gap), Delivery::Delivered);
        assert_eq!(
            (next(&mut rx), next(&mut rx)),
            (Some(Item(0)), Some(Item(5)))
        );
        sender.owe_gap();
        assert!(sender.pay_gap(gap));
        assert_eq!(next(&mut rx), Some(Item(0)));
        drop(rx);
        assert_eq!(sender.deliver(Item(6), gap), Delivery::Closed);
    }

    #[tokio::test]
    async fn the_byte_bound_loses_what_does_not_fit_until_the_reader_gives_bytes_back() {
        let (mut sender, mut rx) = channel::<Item>(100, 10);
        let gap = || Item(0);
        assert_eq!(sender.deliver(Item(4), gap), Delivery::Delivered);
        assert_eq!(sender.deliver(Item(6), gap), Delivery::Delivered);
        assert_eq!(sender.held_bytes(), 10);
        // One byte over the bound: lost, a gap owed, nothing counted; the (weightless) gap
        // waits for an item that fits with it.
        assert_eq!(sender.deliver(Item(1), gap), Delivery::Lost);
        assert_eq!(sender.deliver(Item(1), gap), Delivery::Lost);
        assert!(sender.owes_gap());
        assert_eq!(sender.held_bytes(), 10);
        // Reading gives the bytes back; the gap comes first, then what fits again.
        assert_eq!(rx.recv().await, Some(Item(4)));
        assert_eq!(sender.held_bytes(), 6);
        assert_eq!(sender.deliver(Item(4), gap), Delivery::Delivered);
        assert_eq!(sender.held_bytes(), 10);
        assert_eq!(rx.recv().await, Some(Item(6)));
        assert_eq!(rx.recv().await, Some(Item(0)));
        assert_eq!(rx.recv().await, Some(Item(4)));
        assert_eq!(sender.held_bytes(), 0);
        // One message larger than the whole bound still goes into an empty buffer, alone.
        assert_eq!(sender.deliver(Item(50), gap), Delivery::Delivered);
        assert_eq!(sender.deliver(Item(1), gap), Delivery::Lost);
        assert_eq!(rx.recv().await, Some(Item(50)));
        drop(sender);
        assert_eq!(rx.recv().await, None);
    }
}
