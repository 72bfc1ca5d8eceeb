//! Listing lease keys by prefix ([`Broker::list_keys`](bgtask_core::Broker::list_keys)) and,
//! on it, the key values with tasks in flight ([`keys_in_flight`](bgtask_core::keys_in_flight)).
//!
//! A backend that does not declare
//! [`Capabilities::lists_keys`](bgtask_core::Capabilities::lists_keys) must answer
//! `Unsupported`; one that declares it must page exactly as below.

use std::collections::BTreeMap;
use std::time::Duration;

use bgtask_core::{
    keys_in_flight, ClientConfig, DynBroker, ErrorKind, KeyLimit, LeaseRequest, Namespace,
};
use serde_json::json;

use crate::Harness;

const LONG: Duration = Duration::from_secs(30);

/// Every key under `prefix`, page after page of `limit`, with each page's size checked.
async fn all_pages(broker: &DynBroker, prefix: &str, limit: usize) -> Vec<(String, u64)> {
    let mut keys = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..100 {
        let page = broker
            .list_keys(prefix, after.as_deref(), limit)
            .await
            .unwrap();
        assert!(page.keys.len() <= limit, "a page holds at most the limit");
        if page.next.is_some() {
            assert_eq!(page.keys.len(), limit, "only the last page is short");
            assert_eq!(
                page.next.as_deref(),
                page.keys.last().map(|k| k.key.as_str())
            );
        }
        keys.extend(page.keys.into_iter().map(|k| (k.key, k.live)));
        match page.next {
            Some(next) => after = Some(next),
            None => return keys,
        }
    }
    panic!("the listing of {prefix:?} did not end within 100 pages");
}

/// Whether the backend lists keys; if not, that it says so with `Unsupported`.
async fn lists_keys(broker: &DynBroker, prefix: &str) -> bool {
    if broker.capabilities().lists_keys {
        return true;
    }
    let err = broker.list_keys(prefix, None, 10).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    false
}

/// 25 keys under one prefix (hostile names among them), with 1 to 3 leases each, listed 10 at
/// a time: three pages, in byte order, each key once with its live count. Keys that only share
/// the prefix's start, claim keys and released or expired leases are not listed.
pub async fn list_keys_pages_in_order(h: Harness) {
    let broker = h.broker().await;
    let prefix = h.name("list:");
    if !lists_keys(&broker, &prefix).await {
        return;
    }
    let mut expected = BTreeMap::new();
    let names = super::hostile_names();
    for i in 0..25usize {
        let key = format!("{prefix}{}:{i:02}", names[i % names.len()]);
        let leases = 1 + (i % 3) as u64;
        for _ in 0..leases {
            broker.acquire(&key, LeaseRequest::new(LONG)).await.unwrap();
        }
        expected.insert(key, leases);
    }
    // Not under the prefix, not leases, or no longer live.
    broker
        .acquire(&h.name("list"), LeaseRequest::new(LONG))
        .await
        .unwrap();
    assert!(broker
        .claim(&format!("{prefix}claimed"), LONG)
        .await
        .unwrap());
    let released = broker
        .acquire(&format!("{prefix}released"), LeaseRequest::new(LONG))
        .await
        .unwrap();
    assert!(broker
        .release(&format!("{prefix}released"), &released.lease.unwrap())
        .await
        .unwrap());
    broker
        .acquire(
            &format!("{prefix}expired"),
            LeaseRequest::new(Duration::from_millis(50)),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let listed = all_pages(&broker, &prefix, 10).await;
    let expected: Vec<(String, u64)> = expected.into_iter().collect();
    assert_eq!(listed, expected);
    // A page of everything, and the clamp of a zero limit to one.
    assert_eq!(all_pages(&broker, &prefix, 1000).await, expected);
    let one = broker.list_keys(&prefix, None, 0).await.unwrap();
    assert_eq!(one.keys.len(), 1);
    assert_eq!(one.next.as_deref(), Some(expected[0].0.as_str()));
}

/// Keyed tasks held by a worker show up as their key values with their counts in flight, per
/// task name and for the whole namespace, and go once they complete.
pub async fn keys_in_flight_lists_running_tasks(h: Harness) {
    let broker = h.broker().await;
    if !lists_keys(&broker, &h.name("")).await {
        return;
    }
    let namespace = Namespace::new(h.namespace()).unwrap();
    let _worker = h.worker(h.worker_config(&["held", "other"])).await;
    let config = ClientConfig {
        task_key: Some("user".into()),
        per_key_limit: KeyLimit::Max(5),
        ..h.client_config()
    };
    let client = h.client_on(broker.clone(), config).await;
    let mut handles = Vec::new();
    for user in ["ana", "ana", "bo", "c:d"] {
        handles.push(client.submit("held", &json!({"user": user})).await.unwrap());
    }
    handles.push(client.submit("other", &json!({"user": 7})).await.unwrap());

    let held = keys_in_flight(&broker, &namespace, Some("held"), None, 100)
        .await
        .unwrap();
    let listed: Vec<(&str, &str, u64)> = held
        .keys
        .iter()
        .map(|k| (k.task.as_str(), k.value.as_str(), k.in_flight))
        .collect();
    assert_eq!(
        listed,
        [("held", "ana", 2), ("held", "bo", 1), ("held", "c:d", 1)]
    );
    assert_eq!(held.next, None);

    let all = keys_in_flight(&broker, &namespace, None, None, 2)
        .await
        .unwrap();
    assert_eq!(all.keys.len(), 2);
    let rest = keys_in_flight(&broker, &namespace, None, all.next.as_deref(), 100)
        .await
        .unwrap();
    let mut every: Vec<(String, String)> = all
        .keys
        .into_iter()
        .chain(rest.keys)
        .map(|k| (k.task, k.value))
        .collect();
    every.sort();
    let expected: Vec<(String, String)> = [
        ("held", "ana"),
        ("held", "bo"),
        ("held", "c:d"),
        ("other", "7"),
    ]
    .iter()
    .map(|(t, v)| (t.to_string(), v.to_string()))
    .collect();
    assert_eq!(every, expected);

    for mut handle in handles {
        assert!(handle.cancel().await);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let left = keys_in_flight(&broker, &namespace, None, None, 100)
            .await
            .unwrap();
        if left.keys.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "cancelled tasks leave no key in flight: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
