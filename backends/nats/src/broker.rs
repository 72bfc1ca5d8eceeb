//! The [`Broker`] impl of [`NatsBroker`]: publish and subscribe, leases, admission and claims.

use std::time::Duration;

use async_trait::async_trait;
use bgtask_core::{
    Acquired, Admission, Broker, Capabilities, Error, ErrorKind, KeyPage, LeaseId, LeaseInfo,
    LeaseRequest, Published, Result, Subscription,
};
use bytes::Bytes;

use crate::conn::ensure_connected;
use crate::error::{from_publish, from_subscribe};
use crate::{chunk, sub, NatsBroker};

#[async_trait]
impl Broker for NatsBroker {
    async fn publish(&self, channel: &str, payload: Bytes) -> Result<Published> {
        self.check_open("publish")?;
        let subject = self.inner.subjects.channel(channel)?;
        let limit = self.inner.config.max_message_size;
        if payload.len() > limit {
            return Err(Error::new(
                ErrorKind::TooLarge,
                format!(
                    "nats: a payload of {} bytes is larger than the {limit} bytes this broker \
                     carries (NatsConfig::max_message_size)",
                    payload.len()
                ),
            ));
        }
        let client = &self.inner.client;
        ensure_connected(client, "publish")?;
        self.bounded("publish", async {
            match chunk::split(&payload, client.max_payload()) {
                None => client
                    .publish(subject, payload)
                    .await
                    .map_err(|e| from_publish("publish", e))?,
                Some(chunks) => {
                    for (headers, body) in chunks {
                        client
                            .publish_with_headers(subject.clone(), headers, body)
                            .await
                            .map_err(|e| from_publish("publish a chunk", e))?;
                    }
                }
            }
            self.inner.barrier.wait().await
        })
        .await?;
        Ok(Published::Unknown)
    }

    async fn subscribe(&self, channel: &str) -> Result<Subscription> {
        self.check_open("subscribe")?;
        let subject = self.inner.subjects.channel(channel)?;
        let client = &self.inner.client;
        ensure_connected(client, "subscribe")?;
        let baseline = sub::Baseline::now(client, &self.inner.shared);
        let subscriber = self
            .bounded("subscribe", async {
                let subscriber = client.subscribe(subject).await.map_err(from_subscribe)?;
                // Dropped (and so unsubscribed) if the round trip fails.
                self.inner.barrier.wait().await?;
                Ok(subscriber)
            })
            .await?;
        Ok(sub::subscription(
            channel,
            subscriber,
            client.clone(),
            self.inner.shared.clone(),
            self.inner.lifeline.clone(),
            baseline,
            self.inner.config.max_message_size,
        ))
    }

    async fn acquire(&self, key: &str, request: LeaseRequest) -> Result<Acquired> {
        self.check_open("acquire a lease")?;
        ensure_connected(&self.inner.client, "acquire a lease")?;
        self.inner.leases.acquire(key, &request).await
    }

    /// The flag read and the acquire at once, so admission costs one round trip's wait (see
    /// [Leases](crate#leases)): a blacklisted value's lease, taken meanwhile, is given back
    /// before this returns.
    async fn admit(&self, flag: &str, key: &str, request: LeaseRequest) -> Result<Admission> {
        let (flag, acquired) = tokio::join!(self.leases(flag), self.acquire(key, request));
        let flag = flag.map(|flags| flags.into_iter().next());
        if !matches!(flag, Ok(None)) {
            if let Ok(Acquired {
                lease: Some(lease), ..
            }) = &acquired
            {
                if let Err(error) = self.release(key, lease).await {
                    tracing::debug!(%error, "nats: could not give back a lease; it expires on its own");
                }
            }
        }
        if let Some(flag) = flag? {
            return Ok(Admission::Blacklisted(flag));
        }
        Ok(Admission::from(acquired?))
    }

    async fn release(&self, key: &str, lease: &LeaseId) -> Result<bool> {
        self.check_open("release a lease")?;
        ensure_connected(&self.inner.client, "release a lease")?;
        self.inner.leases.release(key, lease).await
    }

    async fn leases(&self, key: &str) -> Result<Vec<LeaseInfo>> {
        self.check_open("list leases")?;
        ensure_connected(&self.inner.client, "list leases")?;
        self.inner.leases.leases(key).await
    }

    async fn count(&self, key: &str) -> Result<u64> {
        self.check_open("count leases")?;
        ensure_connected(&self.inner.client, "count leases")?;
        self.inner.leases.count(key).await
    }

    /// The lease stream's subjects, then each candidate key's record (see
    /// [Leases](crate#leases)).
    async fn list_keys(&self, prefix: &str, after: Option<&str>, limit: usize) -> Result<KeyPage> {
        self.check_open("list lease keys")?;
        ensure_connected(&self.inner.client, "list lease keys")?;
        self.inner.leases.list_keys(prefix, after, limit).await
    }

    /// One write in the common case: see [Claims](crate#claims).
    async fn claim(&self, key: &str, ttl: Duration) -> Result<bool> {
        self.check_open("claim")?;
        ensure_connected(&self.inner.client, "claim")?;
        self.inner.claims.claim(key, ttl).await
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(false, true).with_key_listing()
    }
}
