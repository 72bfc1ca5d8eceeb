//! The stream of one subscription: messages, reassembled chunks, and `Gap`s.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_nats::{Client, Message, Statistics, Subscriber};
use bgtask_core::{Incoming, Subscription};
use futures::StreamExt;
use tokio::sync::watch;

use crate::chunk::{Reassembler, Step};
use crate::conn::{Lifeline, Shared};

/// Where a subscription's gap detection starts: the connection count and the slow-consumer
/// count read before the `SUB` was sent.
pub(crate) struct Baseline {
    pub(crate) connection: u64,
    pub(crate) slow_consumer: u64,
}

impl Baseline {
    pub(crate) fn now(client: &Client, shared: &Shared) -> Baseline {
        Baseline {
            connection: client.statistics().connects.load(Ordering::SeqCst),
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
    lifeline: Arc<Lifeline>,
    baseline: Baseline,
    max_message_size: usize,
) -> Subscription {
    let feed = Feed {
        subscriber,
        stats: client.statistics(),
        _client: client,
        _lifeline: lifeline,
        wake: shared.watch(),
        shared,
        connection: baseline.connection,
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
    /// Keeps the reconnect watcher running after the broker handle is dropped.
    _lifeline: Arc<Lifeline>,
    shared: Arc<Shared>,
    wake: watch::Receiver<u64>,
    /// The connection (numbered as the client counts connections, the first one 1) whose
    /// subscription this stream last reported.
    connection: u64,
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
            // Idle: a reconnect whose resubscriptions the server confirmed.
            if self.moved_to(self.shared.confirmed_connection()) {
                return Some(Incoming::Gap);
            }
            if let Some(message) = self.held.take() {
                // A message of a newer connection: the resubscription is in place, and
                // messages may have been lost before it.
                if self.moved_to(self.stats.connects.load(Ordering::SeqCst)) {
                    self.held = Some(message);
                    return Some(Incoming::Gap);
                }
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

    /// Whether messages may have been lost since the last check: the subscription now lives on
    /// a newer connection than `connection`, or the client dropped messages of a slow
    /// subscription of this connection.
    fn moved_to(&mut self, connection: u64) -> bool {
        let slow_consumer = self.shared.slow_consumer_events();
        if connection <= self.connection && slow_consumer == self.slow_consumer {
            return false;
        }
        if connection > self.connection {
            tracing::debug!(channel = %self.channel, "nats: resubscribed after a reconnect");
            self.connection = connection;
        }
        self.slow_consumer = slow_consumer;
        // The missing chunks of a partial payload will never come.
        self.chunks.clear();
        true
    }
}
