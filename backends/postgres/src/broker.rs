//! The [`Broker`] calls of [`PostgresBroker`]: publish (inline, or by reference through a
//! payload row) and subscribe, and the lease, claim and key-listing statements, each one
//! statement on a pooled connection under the call's deadline.

use std::time::Duration;

use async_trait::async_trait;
use bgtask_core::{
    Acquired, Admission, Broker, Capabilities, Error, ErrorKind, KeyCount, KeyPage, KeyedOffer,
    LeaseId, LeaseInfo, LeaseRequest, Published, Result, Subscription, MAX_KEY_PAGE,
};
use bytes::Bytes;
use tokio::time::timeout_at;

use crate::{wire, PostgresBroker, MAX_TTL_MILLIS};

/// A row of `admit_lease`: (flag id, flag note, flag seconds left, granted, live).
type AdmitRow = (
    Option<String>,
    Option<Vec<u8>>,
    Option<f64>,
    Option<bool>,
    Option<i64>,
);

impl PostgresBroker {
    /// One call of `admit_lease` for a new lease on `key` under `request`, refused if `flag` has
    /// a live lease (no flag: a plain acquire), and when `notify` (a channel identifier and a
    /// notification text) is given, that notification if granted. Returns the row and the id
    /// asked for.
    async fn admit_lease(
        &self,
        what: &str,
        flag: Option<&str>,
        key: &str,
        request: &LeaseRequest,
        notify: Option<(&str, &str)>,
    ) -> Result<(AdmitRow, LeaseId)> {
        let db = &self.inner.db;
        let id = request.lease_id();
        let ttl = stored_ttl_millis(request.ttl_millis());
        let cap = request.cap.map(|c| i64::try_from(c).unwrap_or(i64::MAX));
        let query = sqlx::query_as::<_, AdmitRow>(&db.statements.admit)
            .bind(flag.map(str::as_bytes))
            .bind(key.as_bytes())
            .bind(id.as_str())
            .bind(request.note.as_bytes())
            .bind(ttl)
            .bind(cap)
            .bind(notify.map(|(ident, _)| ident))
            .bind(notify.map(|(_, text)| text));
        let (mut conn, deadline) = self.conn(what).await?;
        let result = timeout_at(deadline, query.fetch_one(&mut *conn)).await;
        Ok((db.settle(what, conn, result)?, id))
    }

    /// An `admit_lease` row as an admission of lease `id`.
    fn admission(row: AdmitRow, id: LeaseId) -> Admission {
        let (flag_id, flag_note, flag_left, granted, live) = row;
        if let Some(flag_id) = flag_id {
            return Admission::Blacklisted(LeaseInfo {
                id: LeaseId::new(flag_id),
                note: String::from_utf8_lossy(&flag_note.unwrap_or_default()).into_owned(),
                remaining: remaining(flag_left.unwrap_or(0.0)),
            });
        }
        let live = u64::try_from(live.unwrap_or(0)).unwrap_or(0);
        if granted == Some(true) {
            Admission::Granted(id)
        } else {
            Admission::Full { live }
        }
    }
}

/// A TTL in milliseconds as stored: at most [`MAX_TTL_MILLIS`].
fn stored_ttl_millis(millis: u64) -> i64 {
    i64::try_from(millis.min(MAX_TTL_MILLIS)).unwrap_or(i64::MAX)
}

/// A claim's TTL in whole milliseconds as stored: at least 1, at most [`MAX_TTL_MILLIS`] (like
/// a lease's).
fn claim_ttl_millis(ttl: Duration) -> i64 {
    stored_ttl_millis(bgtask_core::broker::ttl_millis(ttl))
}

/// Seconds left on a lease, as the database computed them, as a duration.
fn remaining(seconds: f64) -> Duration {
    Duration::try_from_secs_f64(seconds.max(0.0)).unwrap_or(Duration::MAX)
}

#[async_trait]
impl Broker for PostgresBroker {
    async fn publish(&self, channel: &str, payload: Bytes) -> Result<Published> {
        self.check_open("publish")?;
        let max = self.inner.config.max_payload;
        if payload.len() > max {
            return Err(Error::new(
                ErrorKind::TooLarge,
                format!(
                    "payload of {} bytes is over the broker's limit of {max} bytes",
                    payload.len()
                ),
            ));
        }
        let db = &self.inner.db;
        let ident = self.channel_identifier(channel);
        let id = wire::message_id();
        let (mut conn, deadline) = self.conn("publish").await?;
        let result = match wire::encode_inline(&id, channel, &payload) {
            Some(text) => {
                timeout_at(
                    deadline,
                    sqlx::query(&db.statements.notify)
                        .bind(&ident)
                        .bind(&text)
                        .execute(&mut *conn),
                )
                .await
            }
            None => {
                timeout_at(
                    deadline,
                    sqlx::query(&db.statements.notify_by_reference)
                        .bind(&id)
                        .bind(channel.as_bytes())
                        .bind(payload.as_ref())
                        .bind(db.payload_ttl_ms)
                        .bind(&ident)
                        .bind(wire::encode_reference(&id))
                        .execute(&mut *conn),
                )
                .await
            }
        };
        db.settle("publish", conn, result)?;
        Ok(Published::Unknown)
    }

    async fn subscribe(&self, channel: &str) -> Result<Subscription> {
        self.check_open("subscribe")?;
        self.inner.listener.subscribe(channel).await
    }

    async fn acquire(&self, key: &str, request: LeaseRequest) -> Result<Acquired> {
        let ((.., granted, live), id) = self
            .admit_lease("acquire", None, key, &request, None)
            .await?;
        Ok(Acquired {
            lease: (granted == Some(true)).then_some(id),
            live: u64::try_from(live.unwrap_or(0)).unwrap_or(0),
        })
    }

    /// One statement calling `admit_lease` (see the crate docs, *Leases*).
    async fn admit(&self, flag: &str, key: &str, request: LeaseRequest) -> Result<Admission> {
        let (row, id) = self
            .admit_lease("admit", Some(flag), key, &request, None)
            .await?;
        Ok(Self::admission(row, id))
    }

    /// One statement: `admit_lease`, then `pg_notify` if granted, which the database sends at
    /// commit, after the insert. A payload too large for one notification takes the two calls.
    async fn admit_and_publish(
        &self,
        offer: KeyedOffer<'_>,
    ) -> Result<(Admission, Option<Published>)> {
        let id = wire::message_id();
        let Some(text) = wire::encode_inline(&id, offer.channel, &offer.payload) else {
            return bgtask_core::broker::admit_then_publish(self, offer).await;
        };
        let ident = self.channel_identifier(offer.channel);
        let notify = Some((ident.as_str(), text.as_str()));
        let (row, id) = self
            .admit_lease(
                "admit and publish",
                Some(offer.flag),
                offer.key,
                &offer.request,
                notify,
            )
            .await?;
        let admission = Self::admission(row, id);
        let published = matches!(admission, Admission::Granted(_)).then_some(Published::Unknown);
        Ok((admission, published))
    }

    /// One statement: the delete, then `pg_notify`, which the database sends at commit, after
    /// the delete. A payload too large for one notification takes the two calls.
    async fn release_and_publish(
        &self,
        key: &str,
        lease: &LeaseId,
        channel: &str,
        payload: Bytes,
    ) -> Result<(Published, bool)> {
        let id = wire::message_id();
        let Some(text) = wire::encode_inline(&id, channel, &payload) else {
            return bgtask_core::broker::release_then_publish(self, key, lease, channel, payload)
                .await;
        };
        let db = &self.inner.db;
        let ident = self.channel_identifier(channel);
        let (mut conn, deadline) = self.conn("release and publish").await?;
        let result = timeout_at(
            deadline,
            sqlx::query_scalar::<_, Option<bool>>(&db.statements.release_and_notify)
                .bind(key.as_bytes())
                .bind(lease.as_str())
                .bind(&ident)
                .bind(&text)
                .fetch_one(&mut *conn),
        )
        .await;
        let released = db.settle("release and publish", conn, result)?;
        Ok((Published::Unknown, released == Some(true)))
    }

    async fn release(&self, key: &str, lease: &LeaseId) -> Result<bool> {
        let db = &self.inner.db;
        let (mut conn, deadline) = self.conn("release").await?;
        let result = timeout_at(
            deadline,
            sqlx::query_scalar::<_, bool>(&db.statements.release)
                .bind(key.as_bytes())
                .bind(lease.as_str())
                .fetch_optional(&mut *conn),
        )
        .await;
        Ok(db.settle("release", conn, result)? == Some(true))
    }

    async fn leases(&self, key: &str) -> Result<Vec<LeaseInfo>> {
        let db = &self.inner.db;
        let (mut conn, deadline) = self.conn("leases").await?;
        let result = timeout_at(
            deadline,
            sqlx::query_as::<_, (String, Vec<u8>, f64)>(&db.statements.leases)
                .bind(key.as_bytes())
                .fetch_all(&mut *conn),
        )
        .await;
        let rows = db.settle("leases", conn, result)?;
        Ok(rows
            .into_iter()
            .map(|(id, note, seconds)| LeaseInfo {
                id: LeaseId::new(id),
                note: String::from_utf8_lossy(&note).into_owned(),
                remaining: remaining(seconds),
            })
            .collect())
    }

    async fn count(&self, key: &str) -> Result<u64> {
        let db = &self.inner.db;
        let (mut conn, deadline) = self.conn("count").await?;
        let result = timeout_at(
            deadline,
            sqlx::query_scalar::<_, i64>(&db.statements.count)
                .bind(key.as_bytes())
                .fetch_one(&mut *conn),
        )
        .await;
        Ok(u64::try_from(db.settle("count", conn, result)?).unwrap_or(0))
    }

    /// One statement over the live leases, grouped by key, in key order.
    async fn list_keys(&self, prefix: &str, after: Option<&str>, limit: usize) -> Result<KeyPage> {
        let db = &self.inner.db;
        let limit = limit.clamp(1, MAX_KEY_PAGE);
        let (mut conn, deadline) = self.conn("list keys").await?;
        let result = timeout_at(
            deadline,
            sqlx::query_as::<_, (Vec<u8>, i64)>(&db.statements.list_keys)
                .bind(prefix.as_bytes())
                .bind(after.map(str::as_bytes))
                .bind(i64::try_from(limit + 1).unwrap_or(i64::MAX))
                .fetch_all(&mut *conn),
        )
        .await;
        let rows = db.settle("list keys", conn, result)?;
        let keys = rows.into_iter().filter_map(|(key, live)| {
            Some(KeyCount {
                key: String::from_utf8(key).ok()?,
                live: u64::try_from(live).unwrap_or(0),
            })
        });
        Ok(KeyPage::collect(keys, prefix, after, limit))
    }

    /// One statement on the `claims` table, judged by the database clock (see the crate docs,
    /// *Claims*).
    async fn claim(&self, key: &str, ttl: Duration) -> Result<bool> {
        let db = &self.inner.db;
        let ttl = claim_ttl_millis(ttl);
        let (mut conn, deadline) = self.conn("claim").await?;
        let result = timeout_at(
            deadline,
            sqlx::query_scalar::<_, bool>(&db.statements.claim)
                .bind(key.as_bytes())
                .bind(ttl)
                .fetch_optional(&mut *conn),
        )
        .await;
        Ok(db.settle("claim", conn, result)?.is_some())
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(false, true).with_key_listing()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_ttls_are_bounded() {
        assert_eq!(claim_ttl_millis(Duration::ZERO), 1);
        assert_eq!(claim_ttl_millis(Duration::from_micros(1500)), 1);
        assert_eq!(claim_ttl_millis(Duration::from_secs(30)), 30_000);
        let max = i64::try_from(MAX_TTL_MILLIS).unwrap();
        assert_eq!(
            claim_ttl_millis(Duration::from_millis(MAX_TTL_MILLIS + 1)),
            max
        );
        assert_eq!(claim_ttl_millis(Duration::MAX), max);
    }
}
