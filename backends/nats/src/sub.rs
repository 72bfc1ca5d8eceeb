//! The stream of one subscription: messages, reassembled chunks, and `Gap`s.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_nats::{Client, Message, Statistics, Subscriber};
use bgtask_core::{Incoming, Subscription};
use futures::StreamExt;
use tokio::sync::watch;

use crate::chunk::{Reassembler, Step};
use crate::conn::Shared;

/// Where a subscription's gap detection starts: the connection count and the slow-consumer
/// count read before the `SUB` was sent.
pub(crate) struct Baseline {
    pub(crate) connects: u64,
    pub(crate) slow_consumer: u64,
}

impl Baseline {
    pub(crate) fn now(client: &Client, shared: &Shared) -> Baseline {
        Baseline {
            connects: client.statistics().connects.load(Ordering::SeqCst),
            slow_consumer: shared.slow_consumer_events(),
        }
    }
}

/// Wrap `subscriber` (already proven active) as a [`Subscription`] on `channel`.
pub(crate) fn subscription(
    channel: &str,
    subscriber: Subscriber,
    client: Client,
    shared: Arc<Shared>,
    baseline: Baseline,
    max_message_size: usize,
) -> Subscription {
    let feed = Feed {
        subscriber,
        stats: client.statistics(),
        _client: client,
        wake: shared.watch(),
        shared,
        connects: baseline.connects,
        slow_consumer: baseline.slow_consumer,
        held: None,
        chunks: Reassembler::new(max_message_size),
        channel: channel.to_owned(),
    };
    let stream = futures::stream::unfold(feed, |mut feed| async move {
        let item = feed.next().await?;
        Some((item, feed))
    });
    Subscription::new(channel, stream.boxed())
}

struct Feed {
    /// Dropping it unsubscribes.
    subscriber: Subscriber,
    stats: Arc<Statistics>,
    /// Keeps the connection open after the broker handle is dropped.
    _client: Client,
    shared: Arc<Shared>,
    wake: watch::Receiver<u64>,
    /// Connections made (initial one included) when a gap was last yielded.
    connects: u64,
    /// Slow-consumer events when a gap was last yielded.
    slow_consumer: u64,
    /// A received message not yet handed out (a gap goes first).
    held: Option<Message>,
    chunks: Reassembler,
    channel: String,
}

impl Feed {
    async fn next(&mut self) -> Option<Incoming> {
        loop {
            if self.shared.is_closed() {
                return None;
            }
            if self.lost_messages() {
                return Some(Incoming::Gap);
            }
            if let Some(message) = self.held.take() {
                match self.chunks.push(message.headers.as_ref(), message.payload) {
                    Step::Message(payload) => return Some(Incoming::Message(payload)),
                    Step::Gap => return Some(Incoming::Gap),
                    Step::Pending => {}
                    Step::Malformed => tracing::warn!(
                        channel = %self.channel,
                        "nats: dropped a message with a malformed chunk header"
                    ),
                }
                continue;
            }
            tokio::select! {
                biased;
                changed = self.wake.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
                message = self.subscriber.next() => match message {
                    // Held first, so that a reconnect that happened before it arrived is
                    // reported before it.
                    Some(message) => self.held = Some(message),
                    None => return None,
                },
            }
        }
    }

    /// Whether messages may have been lost since the last check: the client reconnected (the
    /// count grows before the client resubscribes, so before any message of the new
    /// connection), or dropped messages of a slow subscription of this connection.
    fn lost_messages(&mut self) -> bool {
        let connects = self.stats.connects.load(Ordering::SeqCst);
        let slow_consumer = self.shared.slow_consumer_events();
        if connects == self.connects && slow_consumer == self.slow_consumer {
            return false;
        }
        if connects != self.connects {
            tracing::debug!(channel = %self.channel, "nats: resubscribed after a reconnect");
        }
        self.connects = connects;
        self.slow_consumer = slow_consumer;
        // The missing chunks of a partial payload will never come.
        self.chunks.clear();
        true
    }
}
