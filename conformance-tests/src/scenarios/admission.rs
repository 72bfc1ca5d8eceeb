//! Keyed tasks: [`Broker::admit`](bgtask_core::Broker::admit) (blacklist check and limit lease
//! in one call), [`Broker::admit_and_publish`](bgtask_core::Broker::admit_and_publish) (and the
//! offer published when granted) and [`Broker::release_and_publish`](bgtask_core::Broker::release_and_publish)
//! (the limit lease freed with the reply), on the broker and through the protocol.
//!
//! A backend that overrides either method must behave exactly as the provided composition of
//! `leases`, `acquire`, `release` and `publish`: these scenarios hold for both.

use std::time::Duration;

use bgtask_core::{
    Admission, ClientConfig, DynBroker, ErrorKind, KeyLimit, KeyedOffer, LeaseId, LeaseRequest,
};
use bytes::Bytes;
use futures::future::join_all;
use serde_json::{json, Value};

use super::from_four_brokers;
use crate::harness::{expect_message, next_message, RawWorker};
use crate::Harness;

const WAIT: Duration = Duration::from_secs(5);

/// Blacklist `flag` for `ttl` with `reason`, as a worker's report does (a cap-1 lease).
async fn blacklist(broker: &DynBroker, flag: &str, reason: &str, ttl: Duration) {
    let flagged = broker
        .acquire(flag, LeaseRequest::new(ttl).cap(1).note(reason))
        .await
        .unwrap();
    assert!(flagged.lease.is_some());
}

fn limit(cap: u64, ttl: Duration) -> LeaseRequest {
    LeaseRequest::new(ttl).cap(cap).note("task-id")
}

/// 64 concurrent admissions with cap 5, from four brokers: exactly 5 granted, the rest `Full`
/// with a live count of 5, and 5 leases live after.
pub async fn admit_caps_exactly_under_64_creators(h: Harness) {
    let (flag, key) = (h.name("flag"), h.name("limit"));
    let (results, brokers) = from_four_brokers(&h, 64, |broker| {
        let (flag, key) = (flag.clone(), key.clone());
        async move {
            broker
                .admit(&flag, &key, limit(5, Duration::from_secs(30)))
                .await
                .unwrap()
        }
    })
    .await;
    let granted = results
        .iter()
        .filter(|a| matches!(a, Admission::Granted(_)))
        .count();
    assert_eq!(granted, 5, "64 concurrent admissions with cap 5");
    for result in &results {
        match result {
            Admission::Granted(_) => {}
            Admission::Full { live } => assert_eq!(*live, 5),
            other => panic!("unexpected admission {other:?}"),
        }
    }
    assert_eq!(brokers[0].count(&key).await.unwrap(), 5);
}

/// A blacklisted value is refused with the flag's reason and time left, and takes no slot, even
/// with 16 admissions at once.
pub async fn admit_refuses_a_blacklisted_value_without_a_slot(h: Harness) {
    let broker = h.broker().await;
    let (flag, key) = (h.name("flag"), h.name("limit"));
    blacklist(&broker, &flag, "bad input", Duration::from_secs(30)).await;
    let results = join_all((0..16).map(|_| broker.admit(&flag, &key, limit(5, WAIT)))).await;
    for result in results {
        match result.unwrap() {
            Admission::Blacklisted(lease) => {
                assert_eq!(lease.note, "bad input");
                assert!(lease.remaining <= Duration::from_secs(30));
                assert!(lease.remaining > Duration::from_secs(20));
            }
            other => panic!("a blacklisted value was admitted: {other:?}"),
        }
    }
    assert_eq!(broker.count(&key).await.unwrap(), 0, "no slot taken");
}

/// Admission leases behave as acquired ones: noted, released early, expiring on their own; an
/// expired blacklisting no longer refuses.
pub async fn admit_leases_release_and_expire(h: Harness) {
    let broker = h.broker().await;
    let (flag, key) = (h.name("flag"), h.name("limit"));
    let Admission::Granted(first) = broker
        .admit(&flag, &key, limit(2, Duration::from_secs(30)))
        .await
        .unwrap()
    else {
        panic!("the first admission is granted")
    };
    let leases = broker.leases(&key).await.unwrap();
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].note, "task-id");
    assert!(broker.release(&key, &first).await.unwrap());
    assert_eq!(broker.count(&key).await.unwrap(), 0);

    for _ in 0..2 {
        let admitted = broker
            .admit(&flag, &key, limit(2, Duration::from_millis(300)))
            .await
            .unwrap();
        assert!(matches!(admitted, Admission::Granted(_)));
    }
    assert_eq!(
        broker.admit(&flag, &key, limit(2, WAIT)).await.unwrap(),
        Admission::Full { live: 2 }
    );
    blacklist(&broker, &flag, "flaky", Duration::from_millis(300)).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(broker.count(&key).await.unwrap(), 0, "leases expired");
    assert!(matches!(
        broker.admit(&flag, &key, limit(2, WAIT)).await.unwrap(),
        Admission::Granted(_)
    ));
}

/// `release_and_publish` frees the lease before the message arrives: the subscriber that gets
/// it can take the slot at once. A second call finds the lease gone and still publishes.
pub async fn release_and_publish_frees_the_slot_before_delivery(h: Harness) {
    let broker = h.broker().await;
    let (key, channel) = (h.name("limit"), h.name("reply"));
    let mut subscription = h.broker().await.subscribe(&channel).await.unwrap();
    let other = h.broker().await;
    let request = LeaseRequest::new(Duration::from_secs(30)).cap(1);
    for round in 0..5u8 {
        let lease = broker.acquire(&key, request.clone()).await.unwrap();
        let lease = lease.lease.expect("the slot is free");
        let (_, released) = broker
            .release_and_publish(&key, &lease, &channel, Bytes::from(vec![round]))
            .await
            .unwrap();
        assert!(released, "round {round}: the lease was live");
        assert_eq!(expect_message(&mut subscription).await.as_ref(), [round]);
        let next = other.acquire(&key, request.clone()).await.unwrap();
        assert!(next.lease.is_some(), "round {round}: freed before delivery");
        let next = next.lease.unwrap();
        assert!(other.release(&key, &next).await.unwrap());
        let (_, again) = broker
            .release_and_publish(&key, &lease, &channel, Bytes::from_static(b"again"))
            .await
            .unwrap();
        assert!(!again, "released already");
        assert_eq!(expect_message(&mut subscription).await.as_ref(), b"again");
    }
}

/// A lease named by its caller (`LeaseRequest::id`) gets that identity from `acquire` and
/// `admit`, is listed and released under it, and a request without one gets a fresh identity
/// each time.
pub async fn a_chosen_lease_id_names_the_lease(h: Harness) {
    let broker = h.broker().await;
    let (flag, key) = (h.name("flag"), h.name("limit"));
    let chosen = LeaseId::new(bgtask_core::names::random_id());
    let acquired = broker
        .acquire(&key, limit(3, WAIT).id(chosen.clone()))
        .await
        .unwrap();
    assert_eq!(acquired.lease.as_ref(), Some(&chosen));
    let admitted_id = LeaseId::new(bgtask_core::names::random_id());
    let admitted = broker
        .admit(&flag, &key, limit(3, WAIT).id(admitted_id.clone()))
        .await
        .unwrap();
    assert_eq!(admitted, Admission::Granted(admitted_id.clone()));
    let random = broker.acquire(&key, limit(3, WAIT)).await.unwrap().lease;
    let random = random.expect("under the cap");
    assert!(random != chosen && random != admitted_id);
    let listed: Vec<LeaseId> = broker
        .leases(&key)
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.id)
        .collect();
    assert_eq!(listed, [chosen.clone(), admitted_id.clone(), random]);
    assert!(broker.release(&key, &chosen).await.unwrap());
    assert!(broker.release(&key, &admitted_id).await.unwrap());
    assert_eq!(broker.count(&key).await.unwrap(), 1);
}

/// `admit_and_publish` publishes only what it admits: granted offers arrive (and whoever gets
/// one finds its lease), a full key and a blacklisted value publish nothing and take no slot.
pub async fn admit_and_publish_offers_only_when_granted(h: Harness) {
    let broker = h.broker().await;
    let (flag, key, channel) = (h.name("flag"), h.name("limit"), h.name("offers"));
    let mut offers = h.broker().await.subscribe(&channel).await.unwrap();
    let observer = h.broker().await;
    for n in 0..2u8 {
        let id = LeaseId::new(format!("lease-{n}"));
        let offer = KeyedOffer {
            flag: &flag,
            key: &key,
            request: limit(2, WAIT).id(id.clone()),
            channel: &channel,
            payload: Bytes::from(vec![n]),
        };
        let (admission, published) = broker.admit_and_publish(offer).await.unwrap();
        assert_eq!(admission, Admission::Granted(id.clone()));
        let published = published.expect("a granted admission publishes");
        assert!(!published.nobody(), "a subscriber is listening");
        assert_eq!(expect_message(&mut offers).await.as_ref(), [n]);
        let leases = observer.leases(&key).await.unwrap();
        assert!(
            leases.iter().any(|l| l.id == id),
            "the lease before the offer"
        );
    }
    let offer = |flag, key, payload: &'static [u8]| KeyedOffer {
        flag,
        key,
        request: limit(2, WAIT),
        channel: &channel,
        payload: Bytes::from_static(payload),
    };
    let full = offer(&flag, &key, b"full");
    let (admission, published) = broker.admit_and_publish(full).await.unwrap();
    assert_eq!((admission, published), (Admission::Full { live: 2 }, None));
    let (other_flag, other_key) = (h.name("flag2"), h.name("limit2"));
    blacklist(&broker, &other_flag, "bad input", Duration::from_secs(30)).await;
    let flagged = offer(&other_flag, &other_key, b"flagged");
    let (admission, published) = broker.admit_and_publish(flagged).await.unwrap();
    assert!(matches!(admission, Admission::Blacklisted(ref l) if l.note == "bad input"));
    assert_eq!(published, None);
    assert_eq!(broker.count(&other_key).await.unwrap(), 0, "no slot taken");
    assert!(
        next_message(&mut offers, Duration::from_millis(300))
            .await
            .is_none(),
        "a refused admission published"
    );
}

/// 64 concurrent `admit_and_publish` calls with cap 5, from four brokers: exactly 5 granted,
/// exactly their 5 messages published.
pub async fn admit_and_publish_caps_exactly_under_64_creators(h: Harness) {
    let (flag, key, channel) = (h.name("flag"), h.name("limit"), h.name("offers"));
    let mut offers = h.broker().await.subscribe(&channel).await.unwrap();
    let (results, brokers) = from_four_brokers(&h, 64, |broker| {
        let (flag, key, channel) = (flag.clone(), key.clone(), channel.clone());
        async move {
            let id = LeaseId::new(bgtask_core::names::random_id());
            let payload = Bytes::from(id.as_str().to_owned());
            let request = limit(5, Duration::from_secs(30)).id(id);
            let offer = KeyedOffer {
                flag: &flag,
                key: &key,
                request,
                channel: &channel,
                payload,
            };
            broker.admit_and_publish(offer).await.unwrap()
        }
    })
    .await;
    let mut granted = Vec::new();
    for (admission, published) in results {
        match admission {
            Admission::Granted(id) => {
                assert!(published.is_some());
                granted.push(id.as_str().to_owned());
            }
            Admission::Full { live } => {
                assert_eq!(live, 5);
                assert_eq!(published, None);
            }
            other => panic!("unexpected admission {other:?}"),
        }
    }
    assert_eq!(granted.len(), 5, "64 concurrent admissions with cap 5");
    let mut received = Vec::new();
    for _ in 0..5 {
        let message = expect_message(&mut offers).await;
        received.push(String::from_utf8(message.to_vec()).unwrap());
    }
    granted.sort();
    received.sort();
    assert_eq!(
        received, granted,
        "the granted ones' messages, and only theirs"
    );
    assert!(next_message(&mut offers, Duration::from_millis(300))
        .await
        .is_none());
    assert_eq!(brokers[0].count(&key).await.unwrap(), 5);
}

fn keyed(h: &Harness, max: u64) -> ClientConfig {
    ClientConfig {
        task_key: Some("user".into()),
        per_key_limit: KeyLimit::Max(max),
        ..h.client_config()
    }
}

/// The worker frees a keyed task's slot with its reply: the `done` it sends says `released`
/// and, when it arrives, the lease is gone. A creator of tasks without a `lease` gets a plain
/// `done`.
pub async fn the_worker_frees_the_slot_with_its_reply(h: Harness) {
    let _workers = h.echo_workers("echo", 1).await;
    let creator = h.broker().await;
    let ns = bgtask_core::Namespace::new(h.namespace()).unwrap();
    let key = ns.limit_key("echo", "u1");
    let reply_to = ns.reply_channel(&bgtask_core::names::random_id());
    let mut replies = creator.subscribe(&reply_to).await.unwrap();
    let request = LeaseRequest::new(Duration::from_secs(30)).cap(1);
    for with_lease in [true, false] {
        let lease = creator.acquire(&key, request.clone()).await.unwrap();
        let lease = lease.lease.expect("the slot is free");
        // As a creator without offers publishes it: on the task channel, first accept wins.
        let mut task = json!({
            "v": 1, "kind": "task", "id": bgtask_core::names::random_id(), "task": "echo",
            "reply_to": reply_to, "timeout_ms": 5000, "key": "u1", "body": {"user": "u1"},
        });
        if with_lease {
            task["lease"] = json!(lease.as_str());
        }
        creator
            .publish(&ns.task_channel("echo"), Bytes::from(task.to_string()))
            .await
            .unwrap();
        let done: Value = serde_json::from_slice(&expect_message(&mut replies).await).unwrap();
        assert_eq!(done["kind"], "done");
        assert_eq!(done["status"], "success");
        if with_lease {
            assert_eq!(done["released"], true);
            assert_eq!(
                creator.count(&key).await.unwrap(),
                0,
                "freed before the reply"
            );
        } else {
            assert!(done.get("released").is_none());
            assert_eq!(
                creator.count(&key).await.unwrap(),
                1,
                "the creator's to free"
            );
            assert!(creator.release(&key, &lease).await.unwrap());
        }
    }
}

/// The creator trusts `released`: it does not release the lease again (the task's slot stays
/// taken when a worker claims to have freed it and did not), and releases it itself when a
/// `done` does not say so.
pub async fn the_creator_releases_unless_the_worker_did(h: Harness) {
    let broker = h.broker().await;
    let client = h.client_on(broker.clone(), keyed(&h, 5)).await;
    let mut raw = RawWorker::announce(&h, &["echo"], 8, Duration::from_secs(30)).await;
    let key = bgtask_core::Namespace::new(h.namespace())
        .unwrap()
        .limit_key("echo", "u1");
    for released in [true, false] {
        let handle = client.submit("echo", &json!({"user": "u1"})).await.unwrap();
        let offer = raw.next_offer(WAIT).await.expect("the task is offered");
        let lease = offer["lease"]
            .as_str()
            .expect("the offer carries its lease")
            .to_owned();
        assert!(broker
            .leases(&key)
            .await
            .unwrap()
            .iter()
            .any(|l| l.id.as_str() == lease));
        let mut extra = json!({"status": "success", "body": {"ok": true}});
        if released {
            extra["released"] = json!(true);
        }
        raw.answer(&offer, "done", extra).await;
        assert_eq!(handle.reply().await.unwrap().json(), json!({"ok": true}));
        let leases = broker.leases(&key).await.unwrap();
        let kept = leases.iter().any(|l| l.id.as_str() == lease);
        assert_eq!(kept, released, "released: {released}");
    }
    assert!(next_message(&mut raw.offers, Duration::from_millis(100))
        .await
        .is_none());
    let refused = client
        .submit("echo", &json!({"user": ""}))
        .await
        .unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::InvalidName, "an empty key value");
}
