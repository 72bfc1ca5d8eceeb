//! Admission of a task before it is published: its payload size, its task key's value, and (for
//! a keyed task) the blacklist and the per-key limit in one broker call.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::value::RawValue;

use super::blacklist::BlacklistEntry;
use super::KeyLimit;
use crate::broker::{Admission, DynBroker, LeaseId, LeaseInfo, LeaseRequest};
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

/// Admit one task of `task` with key value `value` under `limit`: one broker call, either
/// [`Broker::admit`] (with a limit) or the blacklist flag's [`Broker::leases`] (unlimited).
///
/// Returns the limit lease taken (`None` when unlimited), or the refusal: `Blacklisted` with the
/// flag's reason and time left, `LimitReached` with the count in flight.
///
/// [`Broker::admit`]: crate::Broker::admit
/// [`Broker::leases`]: crate::Broker::leases
pub(crate) async fn admit(
    broker: &DynBroker,
    namespace: &Namespace,
    (task, value): (&str, &str),
    limit: KeyLimit,
    ttl: Duration,
    note: &str,
) -> Result<Option<KeyLease>> {
    let flag_key = namespace.blacklist_key(task, value);
    let flag: LeaseInfo = match limit {
        KeyLimit::Max(max) => {
            let key = namespace.limit_key(task, value);
            let request = LeaseRequest::new(ttl).cap(max).note(note);
            match broker.admit(&flag_key, &key, request).await? {
                Admission::Granted(lease) => return Ok(Some((key, lease))),
                Admission::Blacklisted(flag) => flag,
                Admission::Full { live } => {
                    return Err(Error::new(
                        ErrorKind::LimitReached,
                        format!(
                            "{live} tasks of {task:?} with key value {value:?} are in flight; the limit is {max}"
                        ),
                    )
                    .with_detail(ErrorDetail::Limit {
                        in_flight: live,
                        limit: max,
                    }))
                }
            }
        }
        KeyLimit::Unlimited => match broker.leases(&flag_key).await?.into_iter().next() {
            Some(flag) => flag,
            None => return Ok(None),
        },
    };
    Err(BlacklistEntry {
        task: task.to_owned(),
        value: value.to_owned(),
        reason: flag.note,
        remaining: flag.remaining,
    }
    .to_error())
}
