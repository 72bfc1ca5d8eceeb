//! Admission of a task before it is published: its payload size, its task key's value, and (for
//! a keyed task) the blacklist and the per-key limit in one broker call, which also publishes
//! the task's offer when the broker can do both in one step.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use serde_json::value::RawValue;

use super::blacklist::BlacklistEntry;
use super::KeyLimit;
use crate::broker::{
    Admission, DynBroker, KeyedOffer, LeaseId, LeaseInfo, LeaseRequest, Published,
};
use crate::error::{Error, ErrorDetail, ErrorKind, Result};
use crate::names::Namespace;

/// A limit lease taken for a task: its key and its identity.
pub(crate) type KeyLease = (String, LeaseId);

/// Refuse `size` bytes of `what` over `max` with [`ErrorKind::TooLarge`].
pub(crate) fn check_payload_size(what: &str, size: usize, max: usize) -> Result<()> {
    if size > max {
        return Err(Error::new(
            ErrorKind::TooLarge,
            format!("{what} is {size} bytes; the limit is {max}"),
        ));
    }
    Ok(())
}

/// The task key's value in a task payload: a string as is, anything else as its JSON text.
pub(crate) fn extract_key_value(body: &RawValue, key: &str) -> Result<String> {
    let object: BTreeMap<Cow<'_, str>, &RawValue> =
        serde_json::from_str(body.get()).map_err(|_| {
            Error::invalid_input(format!(
                "a task with the task key {key:?} must be a JSON object"
            ))
        })?;
    let raw = object.get(key).ok_or_else(|| {
        Error::invalid_input(format!(
            "the task has no top-level property {key:?} (its task key)"
        ))
    })?;
    Ok(match serde_json::from_str::<String>(raw.get()) {
        Ok(s) => s,
        Err(_) => raw.get().to_owned(),
    })
}

/// A keyed task's admission, prepared before anything reaches the broker: the blacklist flag
/// to check and, under a limit, the lease to take, named by the task's id (always: the
/// creator's guard and the worker rely on it), so that the task can carry it before it is
/// granted.
pub(crate) struct KeyAdmission<'a> {
    task: &'a str,
    value: &'a str,
    flag: String,
    /// The limit key, the lease request and the limit; `None` when unlimited.
    limited: Option<(String, LeaseRequest, u64)>,
}

/// What [`KeyAdmission::admit`] decided.
pub(crate) enum Admitted {
    /// Admitted; with what the publish returned when the broker published the offer in the same
    /// step (`None`: the caller publishes it).
    Granted(Option<Published>),
    /// Refused (`LimitReached` or `Blacklisted`): no lease was taken.
    Refused(Error),
}

impl<'a> KeyAdmission<'a> {
    /// The admission of one task of `task` with key value `value` under `limit`; the lease, if
    /// any, lives `ttl` and is named and noted by `task_id`.
    pub(crate) fn new(
        namespace: &Namespace,
        (task, value): (&'a str, &'a str),
        limit: KeyLimit,
        ttl: Duration,
        task_id: &str,
    ) -> Self {
        let limited = match limit {
            KeyLimit::Max(max) => {
                let request = LeaseRequest::new(ttl)
                    .cap(max)
                    .note(task_id)
                    .id(LeaseId::new(task_id));
                Some((namespace.limit_key(task, value), request, max))
            }
            KeyLimit::Unlimited => None,
        };
        KeyAdmission {
            task,
            value,
            flag: namespace.blacklist_key(task, value),
            limited,
        }
    }

    /// The limit key of the lease this admission takes, if any. The lease is named by the
    /// task's id.
    pub(crate) fn lease_key(&self) -> Option<String> {
        self.limited.as_ref().map(|(key, ..)| key.clone())
    }

    /// Admit the task in one broker call: [`Broker::admit_and_publish`] when it has a limit
    /// and `offer` (a channel and the task's bytes) is given, [`Broker::admit`] when it has a
    /// limit and no offer, the blacklist flag's [`Broker::leases`] when unlimited.
    ///
    /// An error leaves the outcome unknown: the lease (see [`lease`](Self::lease)) may have
    /// been taken and the offer published.
    ///
    /// [`Broker::admit_and_publish`]: crate::Broker::admit_and_publish
    /// [`Broker::admit`]: crate::Broker::admit
    /// [`Broker::leases`]: crate::Broker::leases
    pub(crate) async fn admit(
        self,
        broker: &DynBroker,
        offer: Option<(&str, Bytes)>,
    ) -> Result<Admitted> {
        let Some((key, request, max)) = self.limited else {
            return Ok(match broker.leases(&self.flag).await?.into_iter().next() {
                Some(flag) => Admitted::Refused(blacklisted(self.task, self.value, flag)),
                None => Admitted::Granted(None),
            });
        };
        let (admission, published) = match offer {
            Some((channel, payload)) => {
                let offer = KeyedOffer {
                    flag: &self.flag,
                    key: &key,
                    request,
                    channel,
                    payload,
                };
                broker.admit_and_publish(offer).await?
            }
            None => (broker.admit(&self.flag, &key, request).await?, None),
        };
        Ok(match admission {
            Admission::Granted(_) => Admitted::Granted(published),
            Admission::Blacklisted(flag) => {
                Admitted::Refused(blacklisted(self.task, self.value, flag))
            }
            Admission::Full { live } => Admitted::Refused(
                Error::new(
                    ErrorKind::LimitReached,
                    format!(
                        "{live} tasks of {:?} with key value {:?} are in flight; the limit is {max}",
                        self.task, self.value
                    ),
                )
                .with_detail(ErrorDetail::Limit {
                    in_flight: live,
                    limit: max,
                }),
            ),
        })
    }
}

/// The refusal of a blacklisted key value, from its flag.
fn blacklisted(task: &str, value: &str, flag: LeaseInfo) -> Error {
    BlacklistEntry {
        task: task.to_owned(),
        value: value.to_owned(),
        reason: flag.note,
        remaining: flag.remaining,
    }
    .to_error()
}
