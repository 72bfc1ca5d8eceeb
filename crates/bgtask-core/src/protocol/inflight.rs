//! The key values with tasks in flight, listed from the per-key limit leases without naming
//! them (see [`Broker::list_keys`](crate::Broker::list_keys)).

use crate::broker::DynBroker;
use crate::error::Result;
use crate::names::Namespace;

/// One key value with tasks in flight: a live per-key limit lease per task.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeyInFlight {
    /// The task name.
    pub task: String,
    /// The key value.
    pub value: String,
    /// Tasks of this value in flight (live limit leases).
    pub in_flight: u64,
}

/// One page of [`keys_in_flight`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeysInFlight {
    /// The key values of this page, grouped by task name (shorter names first, as the limit
    /// keys sort), then by value in byte order.
    pub keys: Vec<KeyInFlight>,
    /// The cursor of the next page (pass it as `after`), `None` after the last one.
    pub next: Option<String>,
}

/// The key values of `namespace` with tasks in flight, of one task name or of all, a page of at
/// most `limit` (clamped to 1..=[`MAX_KEY_PAGE`](crate::MAX_KEY_PAGE)) after the cursor `after`.
///
/// Only tasks admitted under a per-key limit hold a lease; tasks of an unlimited key
/// ([`KeyLimit::Unlimited`](crate::KeyLimit::Unlimited)) are not listed. A backend without
/// [`Capabilities::lists_keys`](crate::Capabilities::lists_keys) answers with an
/// [`Unsupported`](crate::ErrorKind::Unsupported) error.
pub async fn keys_in_flight(
    broker: &DynBroker,
    namespace: &Namespace,
    task: Option<&str>,
    after: Option<&str>,
    limit: usize,
) -> Result<KeysInFlight> {
    if let Some(task) = task {
        crate::names::validate_name("task name", task)?;
    }
    let page = broker
        .list_keys(&namespace.limit_prefix(task), after, limit)
        .await?;
    let keys = page
        .keys
        .into_iter()
        .filter_map(|k| {
            let (task, value) = namespace.parse_limit_key(&k.key)?;
            Some(KeyInFlight {
                task,
                value,
                in_flight: k.live,
            })
        })
        .collect();
    Ok(KeysInFlight {
        keys,
        next: page.next,
    })
}
