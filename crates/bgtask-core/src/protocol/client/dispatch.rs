//! Delivery back to the creator: the reply channel's messages routed to their tasks, presence
//! applied to the roster, and the loops that read both subscriptions.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::value::RawValue;
use tokio::time::Instant;

use super::pending::{BROADCAST_BUFFER, PROGRESS_BUFFER};
use super::{parse_id, ClientEvent, Inner};
use crate::broker::Incoming;
use crate::names::id_to_hex;
use crate::protocol::envelope::{Kind, Message, Status};
use crate::protocol::presence;
use crate::protocol::Reply;

impl Inner {
    /// Apply one message of the presence channel.
    pub(super) fn presence(self: &Arc<Self>, bytes: &[u8]) {
        match presence::decode(bytes) {
            Ok((event, record)) => {
                let ttl = Duration::from_millis(record.ttl_ms.min(u64::from(u32::MAX)));
                let member = self.roster.apply(event, &record, ttl);
                self.count_workers();
                if let Some(member) = member {
                    if member.free().is_none_or(|f| f > 0) && !self.parked().is_empty() {
                        self.unpark_for(&member);
                    }
                }
            }
            Err(error) => {
                self.counters.count_malformed();
                tracing::debug!(%error, "dropped a malformed presence message");
            }
        }
    }

    /// Route one message of the reply channel.
    pub(super) fn handle(self: &Arc<Self>, bytes: &[u8]) {
        let message = match Message::decode(bytes) {
            Ok(m) => m,
            Err(error) => {
                self.counters.count_malformed();
                tracing::warn!(channel = %self.reply_channel, %error, "dropped a malformed reply message");
                self.emit(|| ClientEvent::Malformed {
                    error: error.to_string(),
                });
                return;
            }
        };
        match message.kind {
            Kind::Progress | Kind::Done => {}
            Kind::Accepted | Kind::Declined => {
                let answered = parse_id(&message.id).is_some_and(|id| {
                    // decode() checked that these carry a worker and declines a reason.
                    let worker = message.worker.as_deref().unwrap_or_default();
                    if message.kind == Kind::Declined {
                        let reason = message.reason.as_deref().unwrap_or_default();
                        return self.declined(id, worker, reason);
                    }
                    let mut pending = self.pending();
                    let Some(offer) = pending.get_mut(&id).and_then(|p| p.offer.as_mut()) else {
                        return false;
                    };
                    offer.answer();
                    true
                });
                if !answered {
                    self.counters.count_late();
                    tracing::debug!(id = %message.id, kind = ?message.kind, "dropped an answer for no offer of ours");
                }
                return;
            }
            _ => {
                self.counters.count_malformed();
                tracing::warn!(channel = %self.reply_channel, kind = ?message.kind, "dropped a message of the wrong kind on a reply channel");
                return;
            }
        }
        // decode() checked that progress and done carry a body.
        let body = message.body.unwrap_or(RawValue::NULL).to_owned();
        let mut freed = None;
        let routed = parse_id(&message.id).and_then(|id| {
            let mut pending = self.pending();
            let p = pending.get_mut(&id)?;
            let slot = p.slot.clone();
            let ends = message.kind == Kind::Done && !p.broadcast;
            if ends {
                slot.released.store(message.released, Ordering::Relaxed);
                let mut ended = pending.remove(&id)?;
                freed = ended.offer.as_mut().and_then(|offer| {
                    offer.answer();
                    offer.current.as_ref().map(|c| c.0.clone())
                });
            } else if let Some(offer) = p.offer.as_mut() {
                offer.answer();
            }
            Some(slot)
        });
        // A task of ours on that worker ended: it has room for one held back.
        if let Some(member) = freed {
            member.completed_one();
            if !self.parked().is_empty() {
                self.unpark_for(&member);
            }
        }
        let Some(slot) = routed else {
            self.counters.count_late();
            tracing::debug!(id = %message.id, "dropped a reply that arrived after its task ended");
            return;
        };
        let id = || message.id.clone().into_owned();
        if message.kind == Kind::Progress {
            let mut kept = true;
            slot.push(|state| kept = push_bounded(&mut state.progress, body, PROGRESS_BUFFER));
            if !kept {
                self.counters.count_dropped();
            }
            self.emit(|| ClientEvent::Progress { id: id() });
        } else {
            let status = message.status.unwrap_or(Status::Failed);
            let worker = message.worker.as_deref().unwrap_or_default().to_owned();
            let reply = Reply::from_wire(status, worker, body);
            let mut kept = true;
            slot.push(|state| kept = push_bounded(&mut state.replies, reply, BROADCAST_BUFFER));
            if !kept {
                self.counters.count_dropped();
            }
            self.emit(|| ClientEvent::Done { id: id(), status });
        }
    }

    /// Stop waiting for a pending task: take its claim so no worker accepts it from now on,
    /// and tell the workers (one message on the namespace's cancel channel) so one that runs it
    /// can stop. Returns the work to do on the broker, or `None` if the task was not pending.
    ///
    /// The pending entry goes at once (so later replies count as late); the broker work is a
    /// future the caller may await or spawn.
    pub(super) fn abandon(
        self: &Arc<Self>,
        id: u128,
    ) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        let pending = self.pending().remove(&id)?;
        let inner = self.clone();
        Some(async move {
            let id = id_to_hex(id);
            if !pending.broadcast {
                let ttl = pending.deadline.saturating_duration_since(Instant::now())
                    + inner.config.lease_margin;
                let claim_key = inner.namespace.claim_key(&id);
                if let Err(error) = inner.broker.claim(&claim_key, ttl).await {
                    tracing::debug!(%error, "could not take the claim of an abandoned task");
                }
            }
            let cancel = Message::new(Kind::Cancel, id.as_str());
            if let Err(error) = inner
                .broker
                .publish(&inner.namespace.cancel_channel(), cancel.encode())
                .await
            {
                tracing::debug!(%error, "could not publish a cancellation");
            }
        })
    }
}

/// Hand each item of `subscription` to `on_item` until the client goes or `on_item` says stop.
async fn listen<F, Fut>(
    inner: std::sync::Weak<Inner>,
    mut subscription: crate::Subscription,
    on_item: F,
) where
    F: Fn(Arc<Inner>, Option<Incoming>) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let Some(stop) = inner.upgrade().map(|i| i.stop.clone()) else {
        return;
    };
    loop {
        let item = tokio::select! {
            item = subscription.next() => item,
            _ = stop.cancelled() => return,
        };
        let Some(inner) = inner.upgrade() else { return };
        if !on_item(inner, item).await {
            return;
        }
    }
}

/// Keep the roster from the presence channel.
pub(super) async fn watch_presence(
    inner: std::sync::Weak<Inner>,
    subscription: crate::Subscription,
) {
    listen(inner, subscription, |inner, item| async move {
        match item {
            Some(Incoming::Message(bytes)) => inner.presence(&bytes),
            // Announcements may have been missed: list the workers again.
            Some(Incoming::Gap) => {
                if let Err(error) = inner.refresh_roster().await {
                    tracing::debug!(%error, "could not list the workers after a presence gap");
                }
            }
            None => return false,
        }
        true
    })
    .await
}

/// Route the replies of the reply channel.
pub(super) async fn dispatch(inner: std::sync::Weak<Inner>, subscription: crate::Subscription) {
    listen(inner, subscription, |inner, item| async move {
        match item {
            Some(Incoming::Message(bytes)) => inner.handle(&bytes),
            Some(Incoming::Gap) => {
                inner.counters.count_gap();
                tracing::warn!(channel = %inner.reply_channel, "reply subscription resumed; replies may have been missed");
                inner.emit(|| ClientEvent::Gap);
            }
            None => {
                tracing::error!(channel = %inner.reply_channel, "reply subscription ended");
                return false;
            }
        }
        true
    })
    .await
}

/// Push `item` at the back of `queue` unless it holds `cap` items already; whether it was kept.
fn push_bounded<T>(queue: &mut VecDeque<T>, item: T, cap: usize) -> bool {
    let kept = queue.len() < cap;
    if kept {
        queue.push_back(item);
    }
    kept
}
