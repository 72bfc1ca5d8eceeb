//! The [`Broker`](bgtask_core::Broker) contract: publish, subscribe, leases.

use std::time::Duration;

use bgtask_core::{LeaseId, LeaseRequest, Published};
use bytes::Bytes;

use super::{from_four_brokers, hostile_names};
use crate::harness::next_message;
use crate::Harness;

const WAIT: Duration = Duration::from_secs(5);

/// A message reaches every subscription of the channel, on several brokers.
pub async fn publish_reaches_every_subscriber(h: Harness) {
    let channel = h.name("fanout");
    let mut subs = Vec::new();
    for _ in 0..3 {
        subs.push(h.broker().await.subscribe(&channel).await.unwrap());
    }
    let publisher = h.broker().await;
    let published = publisher
        .publish(&channel, Bytes::from_static(b"hello"))
        .await
        .unwrap();
    if publisher.capabilities().receiver_counts {
        assert!(
            matches!(published, Published::Receivers(n) if n >= 1),
            "{published:?}"
        );
    } else {
        assert_eq!(published, Published::Unknown);
    }
    for sub in &mut subs {
        assert_eq!(
            next_message(sub, WAIT).await.as_deref(),
            Some(&b"hello"[..])
        );
    }
}

/// With nobody subscribed, a backend that counts receivers says 0; one that cannot says so.
pub async fn publish_without_subscribers_is_declared(h: Harness) {
    let broker = h.broker().await;
    let published = broker
        .publish(&h.name("nobody"), Bytes::from_static(b"x"))
        .await
        .unwrap();
    if broker.capabilities().receiver_counts {
        assert!(published.nobody(), "{published:?}");
    } else {
        assert_eq!(published, Published::Unknown);
    }
}

/// A message published right after `subscribe` returns is delivered, every time.
pub async fn subscription_is_active_on_return(h: Harness) {
    let subscriber = h.broker().await;
    let publisher = h.broker().await;
    for i in 0..20 {
        let channel = h.name(&format!("active{i}"));
        let mut sub = subscriber.subscribe(&channel).await.unwrap();
        publisher
            .publish(&channel, Bytes::from(format!("m{i}")))
            .await
            .unwrap();
        assert_eq!(
            next_message(&mut sub, WAIT).await,
            Some(Bytes::from(format!("m{i}"))),
            "round {i}"
        );
    }
}

/// Messages of one publisher on one channel arrive in order.
pub async fn messages_arrive_in_order(h: Harness) {
    let channel = h.name("order");
    let mut sub = h.broker().await.subscribe(&channel).await.unwrap();
    let publisher = h.broker().await;
    for i in 0..1000u32 {
        publisher
            .publish(&channel, Bytes::from(i.to_be_bytes().to_vec()))
            .await
            .unwrap();
    }
    for i in 0..1000u32 {
        let got = next_message(&mut sub, WAIT).await.expect("message");
        assert_eq!(got.as_ref(), i.to_be_bytes(), "message {i}");
    }
}

/// Every byte value, an empty payload and invalid UTF-8 arrive unchanged.
pub async fn payloads_are_binary_safe(h: Harness) {
    let channel = h.name("binary");
    let mut sub = h.broker().await.subscribe(&channel).await.unwrap();
    let publisher = h.broker().await;
    let payloads = [
        Bytes::from((0..=255u8).collect::<Vec<_>>()),
        Bytes::new(),
        Bytes::from_static(b"\xff\xfe\x00\x01 not utf-8 \xc3\x28"),
    ];
    for payload in &payloads {
        publisher.publish(&channel, payload.clone()).await.unwrap();
    }
    for payload in &payloads {
        assert_eq!(next_message(&mut sub, WAIT).await.as_ref(), Some(payload));
    }
}

/// 1 MiB plus 64 KiB travel whole.
pub async fn one_mib_payload(h: Harness) {
    let channel = h.name("big");
    let mut sub = h.broker().await.subscribe(&channel).await.unwrap();
    let payload: Bytes = (0..(1 << 20) + (64 << 10))
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect::<Vec<_>>()
        .into();
    h.broker()
        .await
        .publish(&channel, payload.clone())
        .await
        .unwrap();
    assert!(
        next_message(&mut sub, WAIT).await == Some(payload),
        "payload changed"
    );
}

/// Dropping the only subscription stops delivery (and, where counted, the count drops to 0).
pub async fn dropping_a_subscription_unsubscribes(h: Harness) {
    let channel = h.name("drop");
    let subscriber = h.broker().await;
    let publisher = h.broker().await;
    let sub = subscriber.subscribe(&channel).await.unwrap();
    let published = publisher
        .publish(&channel, Bytes::from_static(b"1"))
        .await
        .unwrap();
    assert_ne!(published, Published::Receivers(0));
    drop(sub);
    if publisher.capabilities().receiver_counts {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let p = publisher
                .publish(&channel, Bytes::from_static(b"2"))
                .await
                .unwrap();
            if p.nobody() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "still subscribed: {p:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // A new subscription after the drop works and sees only new messages.
    let mut again = subscriber.subscribe(&channel).await.unwrap();
    publisher
        .publish(&channel, Bytes::from_static(b"3"))
        .await
        .unwrap();
    assert_eq!(
        next_message(&mut again, WAIT).await.as_deref(),
        Some(&b"3"[..])
    );
}

/// Two subscriptions to one channel on one broker both receive; dropping one keeps the other.
pub async fn subscriptions_on_one_broker_share_a_channel(h: Harness) {
    let channel = h.name("shared");
    let broker = h.broker().await;
    let mut a = broker.subscribe(&channel).await.unwrap();
    let mut b = broker.subscribe(&channel).await.unwrap();
    let publisher = h.broker().await;
    publisher
        .publish(&channel, Bytes::from_static(b"1"))
        .await
        .unwrap();
    assert_eq!(next_message(&mut a, WAIT).await.as_deref(), Some(&b"1"[..]));
    assert_eq!(next_message(&mut b, WAIT).await.as_deref(), Some(&b"1"[..]));
    drop(a);
    publisher
        .publish(&channel, Bytes::from_static(b"2"))
        .await
        .unwrap();
    assert_eq!(next_message(&mut b, WAIT).await.as_deref(), Some(&b"2"[..]));
}

/// Hostile channel names (wildcards, separators, case, long shared prefixes) never share
/// traffic: each subscription gets exactly its own message.
pub async fn channel_names_never_meet(h: Harness) {
    let names = hostile_names();
    let subscriber = h.broker().await;
    let mut subs = Vec::new();
    for name in &names {
        subs.push(subscriber.subscribe(&h.name(name)).await.unwrap());
    }
    let publisher = h.broker().await;
    for name in &names {
        publisher
            .publish(&h.name(name), Bytes::from(name.clone()))
            .await
            .unwrap();
    }
    for (name, sub) in names.iter().zip(&mut subs) {
        assert_eq!(
            next_message(sub, WAIT).await,
            Some(Bytes::from(name.clone())),
            "channel {name:?}"
        );
    }
    for (name, sub) in names.iter().zip(&mut subs) {
        let extra = next_message(sub, Duration::from_millis(50)).await;
        assert_eq!(
            extra, None,
            "channel {name:?} received another channel's message"
        );
    }
}

/// With a cap of 3, the 4th acquire gets no lease and reports 3 live.
pub async fn lease_cap_is_respected(h: Harness) {
    let broker = h.broker().await;
    let key = h.name("cap");
    let request = LeaseRequest::new(Duration::from_secs(30)).cap(3);
    for i in 1..=3 {
        let acquired = broker.acquire(&key, request.clone()).await.unwrap();
        assert!(acquired.lease.is_some());
        assert_eq!(acquired.live, i);
    }
    let full = broker.acquire(&key, request).await.unwrap();
    assert_eq!(full.lease, None);
    assert_eq!(full.live, 3);
    assert_eq!(broker.count(&key).await.unwrap(), 3);
}

/// 100 concurrent acquires with cap 5, from four brokers, yield exactly 5 leases.
pub async fn concurrent_acquires_respect_the_cap(h: Harness) {
    let key = h.name("race");
    let request = LeaseRequest::new(Duration::from_secs(30)).cap(5);
    let (results, brokers) = from_four_brokers(&h, 100, |broker| {
        let (key, request) = (key.clone(), request.clone());
        async move { broker.acquire(&key, request).await.unwrap() }
    })
    .await;
    let granted = results.iter().filter(|a| a.lease.is_some()).count();
    assert_eq!(granted, 5, "100 concurrent acquires with cap 5");
    assert_eq!(brokers[0].count(&key).await.unwrap(), 5);
}

/// A lease expires after its TTL without anybody releasing it.
pub async fn leases_expire_on_their_own(h: Harness) {
    let broker = h.broker().await;
    let key = h.name("expiry");
    let request = LeaseRequest::new(Duration::from_millis(300)).cap(1);
    assert!(broker
        .acquire(&key, request.clone())
        .await
        .unwrap()
        .lease
        .is_some());
    assert!(broker
        .acquire(&key, request.clone())
        .await
        .unwrap()
        .lease
        .is_none());
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(broker.count(&key).await.unwrap(), 0);
    assert!(broker.acquire(&key, request).await.unwrap().lease.is_some());
}

/// Each increment expires on its own: a short lease goes, a long one stays.
pub async fn each_lease_expires_individually(h: Harness) {
    let broker = h.broker().await;
    let key = h.name("individual");
    broker
        .acquire(&key, LeaseRequest::new(Duration::from_millis(300)))
        .await
        .unwrap();
    broker
        .acquire(&key, LeaseRequest::new(Duration::from_secs(30)))
        .await
        .unwrap();
    assert_eq!(broker.count(&key).await.unwrap(), 2);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(broker.count(&key).await.unwrap(), 1);
}

/// Releasing frees the slot at once; releasing twice is `false` the second time.
pub async fn release_frees_a_slot(h: Harness) {
    let broker = h.broker().await;
    let key = h.name("release");
    let request = LeaseRequest::new(Duration::from_secs(30)).cap(1);
    let lease = broker
        .acquire(&key, request.clone())
        .await
        .unwrap()
        .lease
        .unwrap();
    assert!(broker.release(&key, &lease).await.unwrap());
    assert!(!broker.release(&key, &lease).await.unwrap());
    assert_eq!(broker.count(&key).await.unwrap(), 0);
    assert!(broker.acquire(&key, request).await.unwrap().lease.is_some());
}

/// Releasing a lease that never existed, on a key that never existed, is `false`.
pub async fn release_of_an_unknown_lease_is_false(h: Harness) {
    let broker = h.broker().await;
    assert!(!broker
        .release(&h.name("never"), &LeaseId::random())
        .await
        .unwrap());
    let key = h.name("some");
    broker
        .acquire(&key, LeaseRequest::new(Duration::from_secs(30)))
        .await
        .unwrap();
    assert!(!broker.release(&key, &LeaseId::random()).await.unwrap());
    assert_eq!(broker.count(&key).await.unwrap(), 1);
}

/// `leases` lists live leases with their notes and the time they have left.
pub async fn leases_list_notes_and_remaining_time(h: Harness) {
    let broker = h.broker().await;
    let key = h.name("notes");
    let note = "reason: \"bad\" ✓ {json} 'quotes'";
    let lease = broker
        .acquire(&key, LeaseRequest::new(Duration::from_secs(10)).note(note))
        .await
        .unwrap()
        .lease
        .unwrap();
    broker
        .acquire(&key, LeaseRequest::new(Duration::from_millis(1)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let leases = broker.leases(&key).await.unwrap();
    assert_eq!(leases.len(), 1, "{leases:?}");
    assert_eq!(leases[0].id, lease);
    assert_eq!(leases[0].note, note);
    assert!(
        leases[0].remaining > Duration::from_secs(8)
            && leases[0].remaining <= Duration::from_secs(10),
        "{:?}",
        leases[0].remaining
    );
    assert!(broker.leases(&h.name("empty")).await.unwrap().is_empty());
}

/// Hostile key names never share a counter.
pub async fn lease_keys_never_meet(h: Harness) {
    let broker = h.broker().await;
    let request = LeaseRequest::new(Duration::from_secs(30)).cap(1);
    for name in hostile_names() {
        let acquired = broker
            .acquire(&h.name(&name), request.clone())
            .await
            .unwrap();
        assert!(acquired.lease.is_some(), "key {name:?} met another key");
        assert_eq!(acquired.live, 1, "key {name:?}");
    }
}

/// Without a cap, every acquire adds a lease.
pub async fn uncapped_leases_count_up(h: Harness) {
    let broker = h.broker().await;
    let key = h.name("uncapped");
    for i in 1..=20 {
        let acquired = broker
            .acquire(&key, LeaseRequest::new(Duration::from_secs(30)))
            .await
            .unwrap();
        assert_eq!(acquired.live, i);
    }
    assert_eq!(broker.count(&key).await.unwrap(), 20);
}

/// 100 concurrent claims of one key, from four brokers: exactly one wins; the claim expires by
/// itself; claim keys are exact (hostile names never meet).
pub async fn claims_are_exclusive_and_expire(h: Harness) {
    let key = h.name("claim");
    let ttl = Duration::from_millis(400);
    let (results, brokers) = from_four_brokers(&h, 100, |broker| {
        let key = key.clone();
        async move { broker.claim(&key, ttl).await.unwrap() }
    })
    .await;
    assert_eq!(results.iter().filter(|&&won| won).count(), 1);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        brokers[0].claim(&key, ttl).await.unwrap(),
        "the claim did not expire"
    );
    for name in hostile_names() {
        assert!(
            brokers[1]
                .claim(&h.name(&format!("c:{name}")), ttl)
                .await
                .unwrap(),
            "claim {name:?} met another claim"
        );
    }
}
