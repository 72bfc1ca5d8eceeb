//! [`GapSender`]: the sending side of one subscription's bounded buffer, for backends. A message
//! the buffer cannot hold is lost, and the reader is owed an [`Incoming::Gap`] before the next
//! message that fits (so is one after a reconnect). The memory broker, the Redis pub/sub
//! supervisor and the PostgreSQL listener deliver through it.
//!
//! [`Incoming::Gap`]: crate::Incoming::Gap

use tokio::sync::mpsc;

/// What became of one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// In the buffer.
    Delivered,
    /// The buffer was full: the message is lost and a gap is owed.
    Lost,
    /// The reader is gone (its subscription is being dropped).
    Closed,
}

/// A subscription buffer's sender that owes its reader a gap for what it lost.
#[derive(Debug)]
pub struct GapSender<T> {
    tx: mpsc::Sender<T>,
    owes_gap: bool,
}

impl<T> GapSender<T> {
    /// Send into `tx`, owing nothing yet.
    pub fn new(tx: mpsc::Sender<T>) -> Self {
        GapSender {
            tx,
            owes_gap: false,
        }
    }

    /// Messages may have been missed (the connection was lost): owe the reader a gap.
    pub fn owe_gap(&mut self) {
        self.owes_gap = true;
    }

    /// Whether a gap is owed.
    pub fn owes_gap(&self) -> bool {
        self.owes_gap
    }

    /// Pay an owed gap (made by `gap`) now if the buffer has room. Returns whether nothing is
    /// owed any more.
    pub fn pay_gap(&mut self, gap: impl FnOnce() -> T) -> bool {
        if self.owes_gap && self.tx.try_send(gap()).is_ok() {
            self.owes_gap = false;
        }
        !self.owes_gap
    }

    /// Deliver `item`, first paying any owed gap. When the buffer is full the item is lost and
    /// a gap is owed.
    pub fn deliver(&mut self, item: T, gap: impl FnOnce() -> T) -> Delivery {
        if self.owes_gap {
            match self.tx.try_send(gap()) {
                Ok(()) => self.owes_gap = false,
                Err(mpsc::error::TrySendError::Full(_)) => return Delivery::Lost,
                Err(mpsc::error::TrySendError::Closed(_)) => return Delivery::Closed,
            }
        }
        match self.tx.try_send(item) {
            Ok(()) => Delivery::Delivered,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.owes_gap = true;
                Delivery::Lost
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Delivery::Closed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_buffer_loses_the_message_and_owes_one_gap() {
        let (tx, mut rx) = mpsc::channel(2);
        let mut sender = GapSender::new(tx);
        assert_eq!(sender.deliver(1, || 0), Delivery::Delivered);
        assert_eq!(sender.deliver(2, || 0), Delivery::Delivered);
        assert_eq!(sender.deliver(3, || 0), Delivery::Lost);
        assert_eq!(sender.deliver(4, || 0), Delivery::Lost);
        assert!(sender.owes_gap());
        assert_eq!((rx.try_recv(), rx.try_recv()), (Ok(1), Ok(2)));
        // The gap (0) comes before the next message, once.
        assert_eq!(sender.deliver(5, || 0), Delivery::Delivered);
        assert_eq!((rx.try_recv(), rx.try_recv()), (Ok(0), Ok(5)));
        sender.owe_gap();
        assert!(sender.pay_gap(|| 0));
        assert_eq!(rx.try_recv(), Ok(0));
        drop(rx);
        assert_eq!(sender.deliver(6, || 0), Delivery::Closed);
    }
}
