//! Integration tests of `RedisBroker` against a real Redis (`BGTASK_REDIS_URL`, default
//! `redis://127.0.0.1:6379`), with faults injected by the conformance crate's TCP proxy.
//!
//! Every test uses channels and keys under a random prefix; none flushes or reconfigures the
//! server.

mod common;

use std::time::Duration;

use bgtask_conformance::proxy::FaultProxy;
use bgtask_conformance::servers::{
    refused_connection_is_unavailable, silent_server_is_unavailable,
};
use bgtask_core::{Broker, ErrorKind, Incoming, LeaseRequest, Published};
use bgtask_redis::{RedisBroker, RedisConfig};
use bytes::Bytes;
use futures::StreamExt;
use tokio::time::{sleep, timeout, Instant};

use common::{broker, connect, fault_config, prefix, raw, server_addr};

use bgtask_conformance::{
    expect_message as next_message, expect_next as next, expect_silence as silent, ARRIVES,
};

async fn numsub(channel: &str) -> u64 {
    let (_, n): (String, u64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(channel)
        .query_async::<Vec<(String, u64)>>(&mut raw().await)
        .await
        .unwrap()
        .remove(0);
    n
}

/// Wait (at most 5 s) until the server has no subscriber of `channel` any more.
async fn until_unsubscribed(channel: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while numsub(channel).await != 0 {
        assert!(Instant::now() < deadline, "still subscribed on the server");
        sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_subscribe() {
    let b = broker().await;
    let ch = format!("{}:basic", prefix());
    let mut sub = b.subscribe(&ch).await.unwrap();
    assert_eq!(sub.channel(), ch);
    for i in 0..100u32 {
        let sent = b
            .publish(&ch, Bytes::from(i.to_be_bytes().to_vec()))
            .await
            .unwrap();
        assert_eq!(sent, Published::Receivers(1));
    }
    for i in 0..100u32 {
        assert_eq!(next_message(&mut sub).await.as_ref(), i.to_be_bytes());
    }
    assert!(b.capabilities().receiver_counts);
    assert!(b.capabilities().networked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_counts() {
    let (a, b) = (broker().await, broker().await);
    let ch = format!("{}:count", prefix());
    assert_eq!(
        a.publish(&ch, Bytes::from_static(b"x")).await.unwrap(),
        Published::Receivers(0)
    );
    // Two local subscriptions share one server subscription, which Redis counts once.
    let mut s1 = a.subscribe(&ch).await.unwrap();
    let mut s2 = a.subscribe(&ch).await.unwrap();
    assert_eq!(
        a.publish(&ch, Bytes::from_static(b"y")).await.unwrap(),
        Published::Receivers(1)
    );
    let mut s3 = b.subscribe(&ch).await.unwrap();
    assert_eq!(
        a.publish(&ch, Bytes::from_static(b"z")).await.unwrap(),
        Published::Receivers(2)
    );
    assert_eq!(next_message(&mut s1).await.as_ref(), b"y");
    assert_eq!(next_message(&mut s1).await.as_ref(), b"z");
    assert_eq!(next_message(&mut s2).await.as_ref(), b"y");
    assert_eq!(next_message(&mut s2).await.as_ref(), b"z");
    assert_eq!(next_message(&mut s3).await.as_ref(), b"z");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_mib_payload_round_trips() {
    let b = broker().await;
    let ch = format!("{}:big", prefix());
    let mut sub = b.subscribe(&ch).await.unwrap();
    let payload: Vec<u8> = (0..(1 << 20) + (64 << 10))
        .map(|i| (i % 251) as u8)
        .collect();
    let payload = Bytes::from(payload);
    for _ in 0..3 {
        assert_eq!(
            b.publish(&ch, payload.clone()).await.unwrap(),
            Published::Receivers(1)
        );
    }
    for _ in 0..3 {
        assert_eq!(next_message(&mut sub).await, payload);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_is_active_on_return() {
    let (a, b) = (broker().await, broker().await);
    let p = prefix();
    for i in 0..50 {
        let ch = format!("{p}:active:{i}");
        let mut sub = a.subscribe(&ch).await.unwrap();
        // Published from another connection right away: must be delivered.
        assert_eq!(
            b.publish(&ch, Bytes::from_static(b"now")).await.unwrap(),
            Published::Receivers(1),
            "round {i}"
        );
        assert_eq!(next_message(&mut sub).await.as_ref(), b"now");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_last_subscription_unsubscribes() {
    let b = broker().await;
    let ch = format!("{}:drop", prefix());
    let s1 = b.subscribe(&ch).await.unwrap();
    assert_eq!(numsub(&ch).await, 1);
    let s2 = b.subscribe(&ch).await.unwrap();
    assert_eq!(numsub(&ch).await, 1);
    drop(s1);
    sleep(Duration::from_millis(200)).await;
    assert_eq!(
        numsub(&ch).await,
        1,
        "unsubscribed while a subscriber is left"
    );
    drop(s2);
    until_unsubscribed(&ch).await;
    assert_eq!(
        b.publish(&ch, Bytes::from_static(b"x")).await.unwrap(),
        Published::Receivers(0)
    );
    // Subscribing again works after the unsubscription.
    let mut s3 = b.subscribe(&ch).await.unwrap();
    b.publish(&ch, Bytes::from_static(b"again")).await.unwrap();
    assert_eq!(next_message(&mut s3).await.as_ref(), b"again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resubscribing_while_the_unsubscribe_is_pending_keeps_delivering() {
    let b = broker().await;
    let ch = format!("{}:churn", prefix());
    for i in 0..50u32 {
        let sub = b.subscribe(&ch).await.unwrap();
        drop(sub);
        let mut sub = b.subscribe(&ch).await.unwrap();
        let msg = Bytes::from(i.to_string());
        assert_eq!(
            b.publish(&ch, msg.clone()).await.unwrap(),
            Published::Receivers(1),
            "round {i}"
        );
        assert_eq!(next_message(&mut sub).await, msg);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_names_are_exact_never_patterns() {
    let b = broker().await;
    let p = prefix();
    let star = format!("{p}:a*");
    let question = format!("{p}:?");
    let mut s_star = b.subscribe(&star).await.unwrap();
    let mut s_question = b.subscribe(&question).await.unwrap();
    for other in [format!("{p}:ab"), format!("{p}:x")] {
        assert_eq!(
            b.publish(&other, Bytes::from_static(b"no")).await.unwrap(),
            Published::Receivers(0),
            "{other} reached a pattern"
        );
    }
    b.publish(&star, Bytes::from_static(b"star")).await.unwrap();
    b.publish(&question, Bytes::from_static(b"q"))
        .await
        .unwrap();
    assert_eq!(next_message(&mut s_star).await.as_ref(), b"star");
    assert_eq!(next_message(&mut s_question).await.as_ref(), b"q");
    // Hostile and long names work as they are.
    let long = format!("{p}:{}", "é".repeat(600));
    for name in [
        format!("{p}: spaces and \"quotes\" 'too' $x > y.z [a-c] \\"),
        long,
    ] {
        let mut sub = b.subscribe(&name).await.unwrap();
        b.publish(&name, Bytes::from_static(b"ok")).await.unwrap();
        assert_eq!(next_message(&mut sub).await.as_ref(), b"ok");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_of_large_payloads_holds_the_byte_bound_then_gets_a_gap() {
    const PAYLOAD: usize = 256 << 10;
    let config = RedisConfig::new(common::url()).with_subscription_buffer_bytes(4 * PAYLOAD);
    slow_reader_keeps_four_then_a_gap(config, PAYLOAD).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_gets_a_gap() {
    let config = RedisConfig::new(common::url()).with_subscription_buffer(4);
    slow_reader_keeps_four_then_a_gap(config, 1).await;
}

/// Ten `payload`-byte messages to a reader that does not read, whose buffer (`config`) holds
/// four: it reads those four, then one gap, then what comes next.
async fn slow_reader_keeps_four_then_a_gap(config: RedisConfig, payload: usize) {
    let b = connect(config).await;
    let ch = format!("{}:slow", prefix());
    let mut sub = b.subscribe(&ch).await.unwrap();
    for i in 0..10u8 {
        b.publish(&ch, Bytes::from(vec![i; payload])).await.unwrap();
    }
    sleep(Duration::from_millis(500)).await;
    for i in 0..4u8 {
        assert_eq!(next_message(&mut sub).await.as_ref(), vec![i; payload]);
    }
    b.publish(&ch, Bytes::from_static(b"later")).await.unwrap();
    assert_eq!(next(&mut sub).await, Incoming::Gap);
    assert_eq!(next_message(&mut sub).await.as_ref(), b"later");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_outlive_the_broker_handle() {
    let ch = format!("{}:outlive", prefix());
    let mut sub = broker().await.subscribe(&ch).await.unwrap();
    let publisher = broker().await;
    publisher
        .publish(&ch, Bytes::from_static(b"x"))
        .await
        .unwrap();
    assert_eq!(next_message(&mut sub).await.as_ref(), b"x");
    drop(sub);
    until_unsubscribed(&ch).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_ends_streams_and_refuses_calls() {
    let b = broker().await;
    let ch = format!("{}:close", prefix());
    let mut sub = b.subscribe(&ch).await.unwrap();
    let clone = b.clone();
    clone.close();
    assert!(b.is_closed());
    assert_eq!(timeout(ARRIVES, sub.next()).await.unwrap(), None);
    let err = b.publish(&ch, Bytes::from_static(b"x")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed);
    let err = b.subscribe(&ch).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed);
    let err = b.count(&ch).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed);
    until_unsubscribed(&ch).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_acquires_respect_the_cap() {
    let b = broker().await;
    let key = format!("{}:cap", prefix());
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let b = b.clone();
            let key = key.clone();
            tokio::spawn(async move {
                let request = LeaseRequest::new(Duration::from_secs(30))
                    .cap(5)
                    .note(format!("n{i}"));
                b.acquire(&key, request).await.unwrap()
            })
        })
        .collect();
    let mut won = Vec::new();
    for task in tasks {
        let acquired = task.await.unwrap();
        assert!(acquired.live <= 5, "{acquired:?}");
        if let Some(lease) = acquired.lease {
            won.push(lease);
        }
    }
    assert_eq!(won.len(), 5);
    assert_eq!(b.count(&key).await.unwrap(), 5);
    let leases = b.leases(&key).await.unwrap();
    assert_eq!(leases.len(), 5);
    for info in &leases {
        assert!(won.contains(&info.id));
        assert!(info.note.starts_with('n'));
        assert!(info.remaining <= Duration::from_secs(30));
        assert!(info.remaining > Duration::from_secs(25));
    }
    for lease in &won {
        assert!(b.release(&key, lease).await.unwrap());
    }
    assert_eq!(b.count(&key).await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_expire_by_ttl_and_release_reports_liveness() {
    let b = broker().await;
    let key = format!("{}:ttl", prefix());
    let short = b
        .acquire(&key, LeaseRequest::new(Duration::from_millis(300)).cap(1))
        .await
        .unwrap();
    let short = short.lease.expect("first lease");
    let full = b
        .acquire(&key, LeaseRequest::new(Duration::from_secs(10)).cap(1))
        .await
        .unwrap();
    assert_eq!((full.lease, full.live), (None, 1));
    sleep(Duration::from_millis(450)).await;
    assert_eq!(b.count(&key).await.unwrap(), 0);
    assert!(b.leases(&key).await.unwrap().is_empty());
    assert!(
        !b.release(&key, &short).await.unwrap(),
        "expired lease released"
    );
    let again = b
        .acquire(&key, LeaseRequest::new(Duration::from_secs(10)).cap(1))
        .await
        .unwrap();
    let again = again.lease.expect("slot freed by expiry");
    assert!(b.release(&key, &again).await.unwrap());
    assert!(!b.release(&key, &again).await.unwrap(), "released twice");
    assert!(!b
        .release(&key, &bgtask_core::LeaseId::new("#seq"))
        .await
        .unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_listed_oldest_first_with_notes() {
    let b = broker().await;
    let key = format!("{}:list", prefix());
    // Decreasing TTLs: acquisition order differs from expiry order.
    for (i, secs) in [30u64, 20, 10].into_iter().enumerate() {
        b.acquire(
            &key,
            LeaseRequest::new(Duration::from_secs(secs)).note(format!("lease {i}: ok")),
        )
        .await
        .unwrap();
    }
    b.acquire(&key, LeaseRequest::new(Duration::from_secs(5)))
        .await
        .unwrap();
    let leases = b.leases(&key).await.unwrap();
    let notes: Vec<&str> = leases.iter().map(|l| l.note.as_str()).collect();
    assert_eq!(notes, ["lease 0: ok", "lease 1: ok", "lease 2: ok", ""]);
    assert!(leases[0].remaining > Duration::from_secs(25));
    assert!(leases[3].remaining <= Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_lease_key_carries_a_ttl() {
    let b = broker().await;
    let p = prefix();
    let long = format!("{p}:long");
    let short = format!("{p}:short");
    b.acquire(&long, LeaseRequest::new(Duration::from_secs(60)).note("n"))
        .await
        .unwrap();
    // A shorter lease later must not shorten the key's life.
    let lease = b
        .acquire(&long, LeaseRequest::new(Duration::from_secs(2)))
        .await
        .unwrap()
        .lease
        .unwrap();
    b.release(&long, &lease).await.unwrap();
    b.acquire(&short, LeaseRequest::new(Duration::from_secs(3)))
        .await
        .unwrap();
    let released = b
        .acquire(
            &format!("{p}:gone"),
            LeaseRequest::new(Duration::from_secs(3)),
        )
        .await
        .unwrap()
        .lease
        .unwrap();
    b.release(&format!("{p}:gone"), &released).await.unwrap();

    let mut conn = raw().await;
    let mut keys = Vec::new();
    for prefix in ["bgl:{", "bgn:{"] {
        let pattern = format!("{prefix}{p}*");
        let mut cursor = 0u64;
        loop {
            let (next, batch): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .unwrap();
            keys.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    // long: zset + hash; short: zset + hash (the sequence counter); gone: only its hash, which
    // keeps the counter until the released lease would have expired.
    assert_eq!(keys.len(), 5, "{keys:?}");
    assert!(
        !keys
            .iter()
            .any(|k| k.starts_with(b"bgl:{") && k.ends_with(b":gone}")),
        "the sorted set of a key whose last lease was released is left: {keys:?}"
    );
    for key in keys {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        let name = String::from_utf8_lossy(&key);
        assert!(ttl > 0, "{name} has no TTL ({ttl})");
        if name.contains(":long") {
            assert!(ttl > 55_000, "{name} was shortened to {ttl} ms");
        } else {
            assert!(ttl <= 3_000, "{name} lives {ttl} ms");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_keys_are_exact() {
    let b = broker().await;
    let p = prefix();
    let names = [
        format!("{p}:k"),
        format!("{p}:k}}"),
        format!("{p}:k*"),
        format!("{p}:K"),
        format!("{p}:k "),
    ];
    for (i, name) in names.iter().enumerate() {
        for _ in 0..=i {
            b.acquire(name, LeaseRequest::new(Duration::from_secs(10)))
                .await
                .unwrap();
        }
    }
    for (i, name) in names.iter().enumerate() {
        assert_eq!(b.count(name).await.unwrap(), i as u64 + 1, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_an_auth_error() {
    let mut url = url::Url::parse(&common::url()).unwrap();
    url.set_password(Some("definitely-not-the-password-7c1e"))
        .unwrap();
    let started = Instant::now();
    let err = RedisBroker::connect(url.as_str()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
    assert!(started.elapsed() < Duration::from_secs(2));
    for shown in [format!("{err}"), format!("{err:?}")] {
        assert!(
            !shown.contains("definitely-not"),
            "password leaked: {shown}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connection_is_unavailable_at_once() {
    let url = |port| format!("redis://:secret-pw@127.0.0.1:{port}");
    let connect = |port| RedisBroker::connect_with(RedisConfig::new(url(port)));
    refused_connection_is_unavailable(connect, "secret-pw", Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_server_is_unavailable_within_the_connect_timeout() {
    let connect = |proxy| RedisBroker::connect_with(fault_config(proxy));
    silent_server_is_unavailable(server_addr(), connect, Duration::from_millis(2500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_urls_are_config_errors() {
    for url in ["http://localhost", "not a url", "redis://:pw@0.0.0.0"] {
        let err = RedisBroker::connect(url).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config, "{url}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_output_hides_the_password() {
    let b = broker().await;
    let shown = format!("{b:?}");
    assert!(shown.contains("RedisBroker"), "{shown}");
    let config = RedisConfig::new("redis://user:hunter2@host");
    assert!(!format!("{config:?}").contains("hunter2"));
}

/// A subscribe call made during an outage succeeds if the connection returns within its bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_during_a_short_outage_waits_for_the_connection() {
    let proxy = FaultProxy::start(server_addr()).await.unwrap();
    let config = fault_config(proxy.addr()).with_op_timeout(Duration::from_secs(4));
    let b = connect(config).await;
    let direct = broker().await;
    let ch = format!("{}:waits", prefix());
    // Make sure the watchdog has noticed the cut before subscribing.
    let _watch = b.subscribe(&format!("{ch}:watch")).await.unwrap();
    proxy.cut();
    sleep(Duration::from_millis(2500)).await;
    let healer = tokio::spawn(async move {
        sleep(Duration::from_millis(500)).await;
        proxy.pass();
        proxy
    });
    let started = Instant::now();
    let mut sub = b.subscribe(&ch).await.expect("subscribe after the outage");
    assert!(started.elapsed() < Duration::from_secs(4));
    let _proxy = healer.await.unwrap();
    assert_eq!(
        direct
            .publish(&ch, Bytes::from_static(b"hi"))
            .await
            .unwrap(),
        Published::Receivers(1)
    );
    // A subscription made during the outage missed nothing: no gap.
    assert_eq!(
        next(&mut sub).await,
        Incoming::Message(Bytes::from_static(b"hi"))
    );
}

async fn outage(length: Duration) {
    let proxy = FaultProxy::start(server_addr()).await.unwrap();
    let b = connect(fault_config(proxy.addr())).await;
    let direct = broker().await;
    let p = prefix();
    let ch = format!("{p}:outage");
    let mut subs = vec![
        b.subscribe(&ch).await.unwrap(),
        b.subscribe(&ch).await.unwrap(),
        b.subscribe(&format!("{p}:other")).await.unwrap(),
    ];
    direct
        .publish(&ch, Bytes::from_static(b"before"))
        .await
        .unwrap();
    assert_eq!(next_message(&mut subs[0]).await.as_ref(), b"before");
    assert_eq!(next_message(&mut subs[1]).await.as_ref(), b"before");

    proxy.cut();
    sleep(length).await;
    assert_eq!(
        numsub(&ch).await,
        0,
        "the cut did not drop the subscription"
    );
    proxy.pass();
    let restored = Instant::now();

    // Every subscription yields a gap once it is active again, then new messages.
    for sub in &mut subs {
        assert_eq!(
            timeout(Duration::from_secs(10), sub.next()).await.unwrap(),
            Some(Incoming::Gap)
        );
    }
    assert_eq!(numsub(&ch).await, 1);
    assert_eq!(
        direct
            .publish(&ch, Bytes::from_static(b"after"))
            .await
            .unwrap(),
        Published::Receivers(1)
    );
    assert_eq!(next_message(&mut subs[0]).await.as_ref(), b"after");
    assert_eq!(next_message(&mut subs[1]).await.as_ref(), b"after");
    silent(&mut subs[2], Duration::from_millis(200)).await;
    eprintln!(
        "resubscribed {:?} after a {length:?} cut",
        restored.elapsed()
    );
    // Commands work again as well.
    b.publish(&ch, Bytes::from_static(b"mine")).await.unwrap();
    assert_eq!(next_message(&mut subs[0]).await.as_ref(), b"mine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_resumes_after_a_3s_cut() {
    outage(Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_resumes_after_a_20s_cut() {
    outage(Duration::from_secs(20)).await;
}

/// A black hole is detected by the watchdog; the subscription comes back with a gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_resumes_after_a_black_hole() {
    let proxy = FaultProxy::start(server_addr()).await.unwrap();
    let b = connect(fault_config(proxy.addr())).await;
    let direct = broker().await;
    let ch = format!("{}:bh", prefix());
    let mut sub = b.subscribe(&ch).await.unwrap();
    proxy.black_hole();
    let started = Instant::now();
    let err = b
        .publish(&ch, Bytes::from_static(b"lost"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(started.elapsed() < Duration::from_millis(1500));
    sleep(Duration::from_secs(4)).await;
    proxy.pass();
    assert_eq!(
        timeout(Duration::from_secs(10), sub.next()).await.unwrap(),
        Some(Incoming::Gap)
    );
    direct
        .publish(&ch, Bytes::from_static(b"after"))
        .await
        .unwrap();
    assert_eq!(next_message(&mut sub).await.as_ref(), b"after");
}
