//! Integration tests of `NatsBroker` against a real NATS with JetStream (`BGTASK_NATS_URL`,
//! default `nats://127.0.0.1:4222`), one per trap of async-nats and nats-server 2.9, with
//! faults injected by the conformance crate's TCP proxy.
//!
//! Every test uses channels and keys under a random prefix; none purges or reconfigures the
//! shared server. Tests that need a server of their own (a small `max_payload`, a deleted
//! stream) start a private `nats-server` (see `common::PrivateServer`).

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bgtask_conformance::proxy::FaultProxy;
use bgtask_core::metrics::BROKER_RECONNECTS;
use bgtask_core::{Broker, ErrorKind, Incoming, LeaseRequest, Published};
use bgtask_nats::{NatsBroker, NatsConfig};
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::time::{sleep, timeout, Instant};

use common::{broker, connect, fault_config, prefix, short, PrivateServer};

use bgtask_conformance::{expect_message as next_message, expect_silence as silent, ARRIVES};

/// A plain async-nats client, for looking at the server's side of things.
async fn raw(url: &str) -> async_nats::Client {
    async_nats::connect(url)
        .await
        .unwrap_or_else(|e| panic!("cannot reach NATS at {url}: {e}\n{}", common::HOW_TO_START))
}

/// One JetStream API request, with its JSON reply.
async fn js(client: &async_nats::Client, subject: String, body: Value) -> Value {
    let body = if body.is_null() {
        Bytes::new()
    } else {
        Bytes::from(body.to_string())
    };
    let reply = client.request(subject, body).await.unwrap();
    serde_json::from_slice(&reply.payload).unwrap()
}

/// The base64url token of a name, as the backend encodes it.
fn token(name: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(name)
}

/// The last message on `subject` in stream `stream`, if any: its sequence, data (JSON) and
/// server time.
async fn last_message(
    client: &async_nats::Client,
    stream: &str,
    subject: String,
) -> Option<(u64, Value, String)> {
    use base64::Engine;
    let reply = js(
        client,
        format!("$JS.API.STREAM.MSG.GET.{stream}"),
        json!({ "last_by_subj": subject }),
    )
    .await;
    let message = reply.get("message")?;
    let data = base64::engine::general_purpose::STANDARD
        .decode(message["data"].as_str().unwrap_or(""))
        .unwrap();
    Some((
        message["seq"].as_u64().unwrap(),
        serde_json::from_slice(&data).unwrap(),
        message["time"].as_str().unwrap().to_owned(),
    ))
}

/// The stored record of lease key `key` in the default stream, if any.
async fn record(client: &async_nats::Client, key: &str) -> Option<(Value, String)> {
    let subject = format!("bgtask.lease.{}", token(key));
    let (_, data, time) = last_message(client, "BGTASK_LEASES", subject).await?;
    Some((data, time))
}

// ---------------------------------------------------------------------------------------------
// Publish and subscribe

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_subscribe_in_order() {
    let b = broker().await;
    let ch = format!("{}:basic", prefix());
    let mut sub = b.subscribe(&ch).await.unwrap();
    assert_eq!(sub.channel(), ch);
    for i in 0..200u32 {
        let sent = b
            .publish(&ch, Bytes::from(i.to_be_bytes().to_vec()))
            .await
            .unwrap();
        assert_eq!(sent, Published::Unknown, "NATS cannot count receivers");
    }
    for i in 0..200u32 {
        assert_eq!(next_message(&mut sub).await.as_ref(), i.to_be_bytes());
    }
    assert!(!b.capabilities().receiver_counts);
    assert!(b.capabilities().networked);
}

/// `flush` is not a round trip: the barrier is. A message published by another connection right
/// after `subscribe` returns is delivered, every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_is_active_on_return() {
    let (a, b) = (broker().await, broker().await);
    let p = prefix();
    for i in 0..100 {
        let ch = format!("{p}:active:{i}");
        let mut sub = a.subscribe(&ch).await.unwrap();
        b.publish(&ch, Bytes::from_static(b"now")).await.unwrap();
        assert_eq!(next_message(&mut sub).await.as_ref(), b"now", "round {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_subscription_unsubscribes_and_streams_outlive_the_broker() {
    let publisher = broker().await;
    let ch = format!("{}:drop", prefix());
    let (mut kept, dropped) = {
        let b = broker().await;
        (
            b.subscribe(&ch).await.unwrap(),
            b.subscribe(&ch).await.unwrap(),
        )
        // The broker handle is dropped here; the subscriptions keep the connection.
    };
    drop(dropped);
    publisher
        .publish(&ch, Bytes::from_static(b"still"))
        .await
        .unwrap();
    assert_eq!(next_message(&mut kept).await.as_ref(), b"still");
    // The server has no interest left once the last subscription is dropped: a raw request to
    // the channel's subject gets "no responders" at once.
    drop(kept);
    let raw = raw(&common::url()).await;
    let subject = format!("bgtask.ch.{}", token(&ch));
    let deadline = Instant::now() + ARRIVES;
    loop {
        match raw.request(subject.clone(), Bytes::new()).await {
            Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => break,
            other => assert!(Instant::now() < deadline, "still subscribed: {other:?}"),
        }
        sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_ends_streams_and_refuses_calls() {
    let b = broker().await;
    let ch = format!("{}:close", prefix());
    let mut sub = b.subscribe(&ch).await.unwrap();
    let clone = b.clone();
    b.close();
    assert!(clone.is_closed());
    assert_eq!(timeout(ARRIVES, sub.next()).await.unwrap(), None);
    let err = clone.publish(&ch, Bytes::new()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed);
    let err = clone.count("k").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed);
}

// ---------------------------------------------------------------------------------------------
// Subjects

/// Hostile names (wildcards, separators, `$SYS`, spaces, 1 KiB and 2 KiB names) are one literal
/// token each: a raw subscriber on `bgtask.ch.*` (exactly one token after the prefix) sees every
/// one of them, each subscription gets only its own message, and nothing reaches `$SYS`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_channel_names_are_single_literal_tokens() {
    let p = prefix();
    let mut names: Vec<String> = [
        "a.*",
        "a.>",
        "*",
        ">",
        "a b",
        "$SYS.x",
        "$JS.API.INFO",
        "a.b",
        "a\tb",
        "é✓ünï",
        "",
    ]
    .iter()
    .map(|s| format!("{p}:{s}"))
    .collect();
    names.push(format!("{p}:{}", "é".repeat(512))); // 1 KiB
    names.push("x".repeat(bgtask_nats::subject::MAX_NAME_BYTES));
    names.push(String::new());
    let raw = raw(&common::url()).await;
    let mut one_token = raw.subscribe("bgtask.ch.*").await.unwrap();
    raw.flush().await.unwrap();
    let b = broker().await;
    let mut subs = Vec::new();
    for name in &names {
        subs.push(b.subscribe(name).await.unwrap());
    }
    for (i, name) in names.iter().enumerate() {
        b.publish(name, Bytes::from(i.to_string())).await.unwrap();
    }
    for (i, sub) in subs.iter_mut().enumerate() {
        assert_eq!(next_message(sub).await, Bytes::from(i.to_string()));
        silent(sub, Duration::from_millis(20)).await;
    }
    let mut seen = 0;
    while seen < names.len() {
        let m = timeout(ARRIVES, one_token.next()).await.unwrap().unwrap();
        assert!(!m.subject.contains('*') && !m.subject.contains('>'));
        // Other tests publish too: count only ours.
        if names
            .iter()
            .any(|n| m.subject.as_str() == format!("bgtask.ch.{}", token(n)).as_str())
            || m.subject.as_str() == "bgtask.ch._"
        {
            seen += 1;
        }
    }
    let err = b
        .publish(
            &"x".repeat(bgtask_nats::subject::MAX_NAME_BYTES + 1),
            Bytes::new(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidName);
}

// The same at the protocol level (workers of `a.*`, `a.>`, `a b`, `$SYS.x` and a 512-byte name
// each get only their own tasks) is the conformance scenario
// `hostile_task_names_reach_only_their_workers`, which runs on NATS too.

// ---------------------------------------------------------------------------------------------
// Payloads

/// 1 MiB + 64 KiB is more than the default `max_payload` (1 MiB, read from INFO): it travels in
/// chunks with a `Bgt-Chunk` header and arrives whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_over_max_payload_travel_in_chunks() {
    let b = broker().await;
    assert_eq!(
        b.server_max_payload(),
        raw(&common::url()).await.server_info().max_payload
    );
    let ch = format!("{}:big", prefix());
    let raw = raw(&common::url()).await;
    let mut chunks = raw
        .subscribe(format!("bgtask.ch.{}", token(&ch)))
        .await
        .unwrap();
    raw.flush().await.unwrap();
    let mut sub = b.subscribe(&ch).await.unwrap();
    let payload: Bytes = (0..(1 << 20) + (64 << 10))
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect::<Vec<_>>()
        .into();
    for _ in 0..3 {
        b.publish(&ch, payload.clone()).await.unwrap();
    }
    for _ in 0..3 {
        assert!(next_message(&mut sub).await == payload, "payload changed");
    }
    let mut headers = Vec::new();
    for _ in 0..6 {
        let m = timeout(ARRIVES, chunks.next()).await.unwrap().unwrap();
        assert!(m.payload.len() <= b.server_max_payload());
        headers.push(m.headers.unwrap().get("Bgt-Chunk").unwrap().to_string());
    }
    assert!(headers[0].ends_with(" 0 2 1114112"), "{headers:?}");
    assert!(headers[1].ends_with(" 1 2 1114112"), "{headers:?}");
}

/// A server with a small `max_payload` (64 KiB, from a config file): the broker reads it from
/// INFO, splits into many chunks, and chunks of concurrent publishers never mix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_server_max_payload_is_read_from_info_and_chunks_never_mix() {
    let dir = std::env::temp_dir().join(format!("bgtask-nats-conf-{}", prefix().replace(':', "-")));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("server.conf");
    std::fs::write(&conf, "max_payload: 65536\n").unwrap();
    let server = PrivateServer::start(&["-c", conf.to_str().unwrap()]);
    let a = connect(NatsConfig::new(server.url(None))).await;
    let b = connect(NatsConfig::new(server.url(None))).await;
    assert_eq!(a.server_max_payload(), 65536);
    let mut sub = a.subscribe("big").await.unwrap();
    let make = |seed: u8| -> Bytes {
        (0..300_000u32)
            .map(|i| (i as u8).wrapping_mul(seed))
            .collect::<Vec<_>>()
            .into()
    };
    let sends = (0..10u8).map(|i| {
        let (publisher, payload) = (if i.is_multiple_of(2) { &a } else { &b }, make(i + 1));
        async move { publisher.publish("big", payload).await.unwrap() }
    });
    futures::future::join_all(sends).await;
    let mut got = Vec::new();
    for _ in 0..10 {
        got.push(next_message(&mut sub).await);
    }
    for i in 0..10u8 {
        assert!(got.contains(&make(i + 1)), "payload {i} lost or mixed");
    }
    // The absolute limit is TooLarge before anything is sent.
    let limited = connect(NatsConfig::new(server.url(None)).with_max_message_size(100_000)).await;
    let err = limited.publish("big", make(1)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TooLarge, "{err}");
    silent(&mut sub, Duration::from_millis(200)).await;
    // A lease record larger than max_payload is TooLarge, not a protocol error.
    let note = "n".repeat(10_000);
    let mut too_large = None;
    for _ in 0..10 {
        match a
            .acquire(
                "notes",
                LeaseRequest::new(Duration::from_secs(30)).note(&note),
            )
            .await
        {
            Ok(_) => {}
            Err(e) => {
                too_large = Some(e);
                break;
            }
        }
    }
    assert_eq!(too_large.expect("no limit").kind(), ErrorKind::TooLarge);
    let _ = std::fs::remove_dir_all(dir);
}

// ---------------------------------------------------------------------------------------------
// Leases

/// The configuration of `stream`, checked to be what the backend creates with a one-hour
/// `lease_max_ttl`: one message per subject, file storage, these subjects.
async fn stream_config(raw: &async_nats::Client, stream: &str, subjects: Value) -> Value {
    let info = js(raw, format!("$JS.API.STREAM.INFO.{stream}"), Value::Null).await;
    let config = info["config"].clone();
    assert_eq!(config["max_msgs_per_subject"], json!(1), "{info}");
    assert_eq!(config["max_age"], json!(3_600_000_000_000u64), "{info}");
    assert_eq!(config["storage"], json!("file"), "{info}");
    assert_eq!(config["subjects"], subjects, "{info}");
    config
}

/// The lease stream is created with the backend's own JSON on nats-server 2.9 (where
/// async-nats' typed API fails to parse the replies): one message per subject, file storage,
/// `max_age` = `lease_max_ttl`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_stream_is_created_on_this_server() {
    let server = PrivateServer::start(&[]);
    let b =
        connect(NatsConfig::new(server.url(None)).with_lease_max_ttl(Duration::from_secs(3600)))
            .await;
    let raw = raw(&server.url(None)).await;
    let config = stream_config(
        &raw,
        "BGTASK_LEASES",
        json!(["bgtask.lease.*", "bgtask.clock"]),
    )
    .await;
    let version = raw.server_info().version;
    // allow_msg_ttl exists from 2.11: older servers neither keep nor echo it.
    assert_eq!(
        b.lease_records_expire(),
        config["allow_msg_ttl"] == json!(true)
    );
    eprintln!(
        "server {version}: lease stream created; per-message TTLs: {}",
        b.lease_records_expire()
    );
    assert!(b
        .acquire("k", LeaseRequest::new(Duration::from_secs(5)).cap(1))
        .await
        .unwrap()
        .lease
        .is_some());
    // A second broker with another max TTL uses the stream as it is, with its shorter max_age.
    let other = connect(NatsConfig::new(server.url(None))).await;
    assert_eq!(other.lease_max_ttl(), Duration::from_secs(3600));
    let err = other
        .acquire("k", LeaseRequest::new(Duration::from_secs(7200)))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    assert_eq!(other.count("k").await.unwrap(), 1);

    // A stream that cannot hold leases (several messages per subject) is a Config error.
    create_stream(&raw, "BAD", json!(["bad.lease.*", "bad.clock"]), 5).await;
    let err = refused_stream(&server, "BAD", "bad").await;
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");

    // A stream deleted under a running broker is created again.
    delete_stream(&raw, "BGTASK_LEASES").await;
    let acquired = b
        .acquire("k", LeaseRequest::new(Duration::from_secs(5)).cap(1))
        .await
        .unwrap();
    assert_eq!(acquired.live, 1);
    assert!(acquired.lease.is_some());
}

/// Create the memory stream `name` over `subjects` on the server directly.
async fn create_stream(raw: &async_nats::Client, name: &str, subjects: Value, per_subject: i64) {
    let config = json!({"name": name, "subjects": subjects, "max_msgs_per_subject": per_subject,
                        "retention": "limits", "storage": "memory", "num_replicas": 1});
    let created = js(raw, format!("$JS.API.STREAM.CREATE.{name}"), config).await;
    assert!(created.get("error").is_none(), "{created}");
}

/// Delete the stream `name` on the server directly.
async fn delete_stream(raw: &async_nats::Client, name: &str) {
    let deleted = js(raw, format!("$JS.API.STREAM.DELETE.{name}"), Value::Null).await;
    assert_eq!(deleted["success"], json!(true), "{deleted}");
}

/// Why a broker on `server` with lease stream `stream` and subject prefix `prefix` cannot
/// connect.
async fn refused_stream(server: &PrivateServer, stream: &str, prefix: &str) -> bgtask_core::Error {
    let config = NatsConfig::new(server.url(None))
        .with_lease_stream(stream)
        .with_subject_prefix(prefix);
    NatsBroker::connect_with(config).await.unwrap_err()
}

/// 100 concurrent acquires with cap 5, from 4 brokers, yield exactly 5; then 40 tasks cycling
/// acquire/release on one key never hold more than the cap at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_set_keeps_the_cap_under_contention() {
    let mut brokers = Vec::new();
    for _ in 0..4 {
        brokers.push(broker().await);
    }
    let key = format!("{}:race", prefix());
    let request = LeaseRequest::new(Duration::from_secs(30)).cap(5);
    let started = Instant::now();
    let results = futures::future::join_all((0..100).map(|i| {
        let (broker, key, request) = (brokers[i % 4].clone(), key.clone(), request.clone());
        async move { broker.acquire(&key, request).await.unwrap() }
    }))
    .await;
    let granted = results.iter().filter(|a| a.lease.is_some()).count();
    eprintln!(
        "100 concurrent acquires with cap 5 on 4 brokers: {granted} granted in {:?}",
        started.elapsed()
    );
    assert_eq!(granted, 5);
    assert!(results.iter().all(|a| a.live <= 5));
    assert_eq!(brokers[0].count(&key).await.unwrap(), 5);

    let key = format!("{}:cycle", prefix());
    let held = Arc::new(AtomicU64::new(0));
    let most = Arc::new(AtomicU64::new(0));
    let cycles = futures::future::join_all((0..40).map(|i| {
        let (broker, key) = (brokers[i % 4].clone(), key.clone());
        let (held, most) = (held.clone(), most.clone());
        async move {
            let mut won = 0;
            for _ in 0..5 {
                let request = LeaseRequest::new(Duration::from_secs(30)).cap(3);
                let acquired = broker.acquire(&key, request).await.unwrap();
                assert!(acquired.live <= 3);
                if let Some(lease) = acquired.lease {
                    let now = held.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    sleep(Duration::from_millis(2)).await;
                    held.fetch_sub(1, Ordering::SeqCst);
                    assert!(broker.release(&key, &lease).await.unwrap());
                    won += 1;
                }
            }
            won
        }
    }))
    .await;
    let won: u32 = cycles.iter().sum();
    assert!(
        most.load(Ordering::SeqCst) <= 3,
        "more than the cap held at once"
    );
    assert!(won > 0);
    assert_eq!(brokers[1].count(&key).await.unwrap(), 0);
}

/// An acquire on a key this broker has not seen with a record first tries to create the record
/// outright. When another broker made one meanwhile, that write is refused and the acquire reads
/// the record: the other broker's leases are kept and count against the cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquire_that_guesses_no_record_keeps_the_leases_of_another_broker() {
    let (a, b) = (broker().await, broker().await);
    let raw = raw(&common::url()).await;
    let key = format!("{}:guess", prefix());
    let request = LeaseRequest::new(Duration::from_secs(30)).cap(2);
    // An empty key: the guess is right, one write makes the record.
    let first = a.acquire(&key, request.clone()).await.unwrap();
    assert_eq!((first.lease.is_some(), first.live), (true, 1));
    let (record_1, _) = record(&raw, &key).await.expect("a record");
    assert_eq!(record_1["l"].as_array().unwrap().len(), 1);
    // b has never seen the key: its guess is wrong, and it must find a's lease.
    let second = b.acquire(&key, request.clone().note("b")).await.unwrap();
    assert_eq!((second.lease.is_some(), second.live), (true, 2));
    let refused = LeaseRequest::new(Duration::from_secs(30)).cap(2);
    let third = broker().await.acquire(&key, refused).await.unwrap();
    assert_eq!(
        (third.lease.is_none(), third.live),
        (true, 2),
        "a third broker's guess went over the cap"
    );
    let listed = a.leases(&key).await.unwrap();
    assert_eq!(
        listed.iter().map(|l| &l.id).collect::<Vec<_>>(),
        [
            first.lease.as_ref().unwrap(),
            second.lease.as_ref().unwrap()
        ]
    );
    // Released by b, the last lease deletes the record; a's next acquire guesses right again.
    assert!(b
        .release(&key, first.lease.as_ref().unwrap())
        .await
        .unwrap());
    assert!(a
        .release(&key, second.lease.as_ref().unwrap())
        .await
        .unwrap());
    assert!(
        record(&raw, &key).await.is_none(),
        "the record outlived its leases"
    );
    let again = a.acquire(&key, request).await.unwrap();
    assert_eq!((again.lease.is_some(), again.live), (true, 1));
}

/// Expiry is judged by the server's clock only: a new lease is stored as a TTL relative to the
/// record's own server timestamp, and rewritten as that timestamp plus the TTL; the backend
/// reads no client clock at all. (A skewed server clock cannot be staged here: nats-server is
/// a Go binary, which libfaketime does not reach.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_judged_by_the_server_clock() {
    let b = broker().await;
    let raw = raw(&common::url()).await;
    let key = format!("{}:clock", prefix());
    b.acquire(
        &key,
        LeaseRequest::new(Duration::from_millis(1500)).note("first"),
    )
    .await
    .unwrap();
    let (first, first_time) = record(&raw, &key).await.expect("a record");
    assert_eq!(first["l"][0]["t"], json!(1_500_000_000u64), "{first}");
    assert!(first["l"][0].get("e").is_none(), "{first}");
    b.acquire(&key, LeaseRequest::new(Duration::from_secs(30)))
        .await
        .unwrap();
    let (second, _) = record(&raw, &key).await.expect("a record");
    let stamp = parse_time(&first_time);
    assert_eq!(
        second["l"][0]["e"],
        json!(stamp + 1_500_000_000),
        "the carried lease expires at the first record's server stamp + TTL: {second}"
    );
    let left = b.leases(&key).await.unwrap();
    assert_eq!(left.len(), 2);
    assert!(left[0].remaining <= Duration::from_millis(1500));
    sleep(Duration::from_millis(1700)).await;
    assert_eq!(b.count(&key).await.unwrap(), 1);
    // No client clock in the crate's code.
    for source in [
        include_str!("../src/lease.rs"),
        include_str!("../src/claim.rs"),
        include_str!("../src/js.rs"),
        include_str!("../src/lib.rs"),
    ] {
        assert!(!source.contains("SystemTime"), "a client clock is read");
    }
}

/// RFC 3339 to nanoseconds, for the test above (UTC `Z` only, as JetStream writes it).
fn parse_time(text: &str) -> u64 {
    let (date, rest) = text.split_once('T').unwrap();
    let mut d = date.split('-').map(|x| x.parse::<i64>().unwrap());
    let (y, m, dd) = (d.next().unwrap(), d.next().unwrap(), d.next().unwrap());
    let rest = rest.trim_end_matches('Z');
    let (hms, frac) = rest.split_once('.').unwrap_or((rest, "0"));
    let mut t = hms.split(':').map(|x| x.parse::<i64>().unwrap());
    let (h, mi, s) = (t.next().unwrap(), t.next().unwrap(), t.next().unwrap());
    let nanos: i64 = format!("{frac:0<9}")[..9].parse().unwrap();
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + dd - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    ((days * 86_400 + h * 3600 + mi * 60 + s) * 1_000_000_000 + nanos) as u64
}

/// On servers without per-message TTLs (2.9), a record whose leases are all over is deleted by
/// the broker that wrote it, not kept until the stream's max_age; a release of the last lease
/// deletes it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_go_when_their_leases_are_over() {
    let b = broker().await;
    let raw = raw(&common::url()).await;
    let p = prefix();
    let (short_key, released) = (format!("{p}:short"), format!("{p}:released"));
    b.acquire(&short_key, LeaseRequest::new(Duration::from_millis(300)))
        .await
        .unwrap();
    let lease = b
        .acquire(&released, LeaseRequest::new(Duration::from_secs(60)))
        .await
        .unwrap()
        .lease
        .unwrap();
    assert!(record(&raw, &short_key).await.is_some());
    assert!(b.release(&released, &lease).await.unwrap());
    assert!(
        record(&raw, &released).await.is_none(),
        "release left a record"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while record(&raw, &short_key).await.is_some() {
        assert!(Instant::now() < deadline, "an expired record stayed");
        sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_reports_liveness_and_leases_list_oldest_first() {
    let b = broker().await;
    let key = format!("{}:list", prefix());
    let mut ids = Vec::new();
    for note in ["one", "two \"2\"", "три"] {
        ids.push(
            b.acquire(&key, LeaseRequest::new(Duration::from_secs(20)).note(note))
                .await
                .unwrap()
                .lease
                .unwrap(),
        );
    }
    let short = b
        .acquire(&key, LeaseRequest::new(Duration::from_millis(200)))
        .await
        .unwrap()
        .lease
        .unwrap();
    let listed = b.leases(&key).await.unwrap();
    assert_eq!(
        listed.iter().map(|l| &l.id).collect::<Vec<_>>(),
        ids.iter().chain([&short]).collect::<Vec<_>>()
    );
    assert_eq!(listed[1].note, "two \"2\"");
    sleep(Duration::from_millis(300)).await;
    assert!(
        !b.release(&key, &short).await.unwrap(),
        "an expired lease was live"
    );
    assert!(b.release(&key, &ids[1]).await.unwrap());
    assert!(!b.release(&key, &ids[1]).await.unwrap());
    let listed = b.leases(&key).await.unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[1].note, "три");
}

// ---------------------------------------------------------------------------------------------
// Claims

/// The stored claim record of claim key `key` in the default claim stream, if any: its
/// sequence, data and server time.
async fn claim_record(client: &async_nats::Client, key: &str) -> Option<(u64, Value, String)> {
    let subject = format!("bgtask.claim.{}", token(key));
    last_message(client, "BGTASK_LEASES_CLAIMS", subject).await
}

/// A claim is one record in the claim stream, apart from the leases, written once: a losing
/// claim writes nothing, a claim that is over is taken over by replacing the record, and the
/// record's timestamp plus its TTL is when the claim is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_are_one_record_in_their_own_stream_judged_by_the_server_clock() {
    let (a, b) = (broker().await, broker().await);
    assert_eq!(a.claim_stream(), "BGTASK_LEASES_CLAIMS");
    let raw = raw(&common::url()).await;
    let key = format!("{}:claim", prefix());
    assert!(claim_record(&raw, &key).await.is_none());
    assert!(a.claim(&key, Duration::from_millis(600)).await.unwrap());
    let (seq, data, time) = claim_record(&raw, &key).await.expect("a claim record");
    assert_eq!(data, json!({"v": 1, "t": 600_000_000u64}));
    assert!(record(&raw, &key).await.is_none(), "a claim wrote a lease");
    assert_eq!(a.count(&key).await.unwrap(), 0, "a claim is a lease");

    assert!(!b.claim(&key, Duration::from_secs(30)).await.unwrap());
    assert!(!a.claim(&key, Duration::from_secs(30)).await.unwrap());
    let (same, _, _) = claim_record(&raw, &key).await.unwrap();
    assert_eq!(same, seq, "a losing claim wrote");

    // Over 600 ms after the record's server stamp.
    let stamp = parse_time(&time);
    sleep(Duration::from_millis(800)).await;
    assert!(b.claim(&key, Duration::from_secs(30)).await.unwrap());
    let (taken, data, time) = claim_record(&raw, &key).await.expect("a claim record");
    assert!(taken > seq, "the takeover did not replace the record");
    assert_eq!(data, json!({"v": 1, "t": 30_000_000_000u64}));
    assert!(parse_time(&time) >= stamp + 600_000_000);
    assert!(!a.claim(&key, Duration::from_millis(1)).await.unwrap());

    // Claim keys and lease keys never meet.
    assert!(a
        .acquire(&key, LeaseRequest::new(Duration::from_secs(5)).cap(1))
        .await
        .unwrap()
        .lease
        .is_some());
    let other = format!("{}:other", prefix());
    assert!(a
        .acquire(&other, LeaseRequest::new(Duration::from_secs(5)).cap(1))
        .await
        .unwrap()
        .lease
        .is_some());
    assert!(a.claim(&other, Duration::from_secs(5)).await.unwrap());

    // Bad input is typed.
    let err = a
        .claim(&"k".repeat(5000), Duration::from_secs(1))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidName, "{err}");
    let err = a
        .claim(&key, a.lease_max_ttl() + Duration::from_secs(1))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    let err = a.claim(&key, Duration::MAX).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
}

/// Many claims on many keys at once, from one broker (whose calls on one key are queued behind
/// each other) and from others: exactly one winner per key, and only the keys' records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claims_from_one_and_several_brokers_have_one_winner_per_key() {
    let shared = broker().await;
    let mut brokers = vec![shared.clone(), shared.clone(), shared.clone()];
    brokers.push(broker().await);
    brokers.push(broker().await);
    let p = prefix();
    let keys: Vec<String> = (0..20).map(|k| format!("{p}:many:{k}")).collect();
    let started = Instant::now();
    let results = futures::future::join_all((0..20 * 16).map(|i| {
        let broker = brokers[i % brokers.len()].clone();
        let key = keys[i % keys.len()].clone();
        async move {
            (
                key.clone(),
                broker.claim(&key, Duration::from_secs(30)).await,
            )
        }
    }))
    .await;
    eprintln!(
        "320 claims on 20 keys from 3 brokers: {:?}",
        started.elapsed()
    );
    for key in &keys {
        let won = results
            .iter()
            .filter(|(k, r)| k == key && *r.as_ref().unwrap())
            .count();
        assert_eq!(won, 1, "{key}: {won} winners");
    }
}

/// A broker answers its later claims on a key it took from what it remembers while the
/// server's clock says the claim is live, and asks the server again once it may be over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remembered_claims_hold_until_the_server_clock_says_otherwise() {
    let (a, b) = (broker().await, broker().await);
    let p = prefix();
    // A losing claim reads the server's clock, which the broker then knows.
    let warm = format!("{p}:warm");
    assert!(b.claim(&warm, Duration::from_secs(30)).await.unwrap());
    assert!(!a.claim(&warm, Duration::from_secs(30)).await.unwrap());
    let key = format!("{p}:mine");
    assert!(a.claim(&key, Duration::from_millis(500)).await.unwrap());
    let results =
        futures::future::join_all((0..50).map(|_| a.claim(&key, Duration::from_millis(500)))).await;
    assert!(results.iter().all(|r| !r.as_ref().unwrap()), "{results:?}");
    assert!(!b.claim(&key, Duration::from_secs(30)).await.unwrap());
    sleep(Duration::from_millis(700)).await;
    let results = futures::future::join_all(
        (0..20).map(|i| [&a, &b][i % 2].claim(&key, Duration::from_secs(30))),
    )
    .await;
    let won = results.iter().filter(|r| *r.as_ref().unwrap()).count();
    assert_eq!(won, 1, "{results:?}");
    assert!(!a.claim(&key, Duration::from_secs(30)).await.unwrap());
    assert!(!b.claim(&key, Duration::from_secs(30)).await.unwrap());
}

/// On servers without per-message TTLs (2.9), the broker that wrote a claim record deletes it
/// soon after its claim is over, not at the stream's max_age; the key can be claimed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_records_go_when_their_claims_are_over() {
    let b = broker().await;
    let raw = raw(&common::url()).await;
    let key = format!("{}:swept", prefix());
    let long = format!("{}:kept", prefix());
    assert!(b.claim(&key, Duration::from_millis(300)).await.unwrap());
    assert!(b.claim(&long, Duration::from_secs(60)).await.unwrap());
    assert!(claim_record(&raw, &key).await.is_some());
    let deadline = Instant::now() + Duration::from_secs(6);
    while claim_record(&raw, &key).await.is_some() {
        assert!(Instant::now() < deadline, "a claim record stayed");
        sleep(Duration::from_millis(100)).await;
    }
    assert!(
        claim_record(&raw, &long).await.is_some(),
        "a live claim's record went"
    );
    assert!(!b.claim(&long, Duration::from_secs(1)).await.unwrap());
    assert!(b.claim(&key, Duration::from_secs(1)).await.unwrap());
}

/// The claim stream is created next to the lease stream, checked like it, and created again
/// when deleted under a running broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_stream_is_created_on_this_server() {
    let server = PrivateServer::start(&[]);
    let b =
        connect(NatsConfig::new(server.url(None)).with_lease_max_ttl(Duration::from_secs(3600)))
            .await;
    let raw = raw(&server.url(None)).await;
    stream_config(
        &raw,
        "BGTASK_LEASES_CLAIMS",
        json!(["bgtask.claim.*", "bgtask.claimclock"]),
    )
    .await;
    assert!(b.claim("k", Duration::from_secs(5)).await.unwrap());
    let err = b.claim("k2", Duration::from_secs(7200)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");

    // A stream named like the claim stream that cannot hold claims is a Config error.
    let subjects = json!(["other.claim.*", "other.claimclock"]);
    create_stream(&raw, "OTHER_CLAIMS", subjects, -1).await;
    let err = refused_stream(&server, "OTHER", "other").await;
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("OTHER_CLAIMS"), "{err}");

    // Deleted under a running broker: created again, and claims work.
    delete_stream(&raw, "BGTASK_LEASES_CLAIMS").await;
    assert!(b.claim("k", Duration::from_secs(5)).await.unwrap());
    assert!(!b.claim("k", Duration::from_secs(5)).await.unwrap());
}

// ---------------------------------------------------------------------------------------------
// Outages, reconnects, slow consumers

/// During a cut every call fails fast with Unavailable (the client is not connected, so nothing
/// is queued to be sent late), a message published during the outage is never delivered after
/// it, and everything works again afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_during_an_outage_fail_fast_and_nothing_is_sent_late() {
    let proxy = FaultProxy::start(common::server_addr()).await.unwrap();
    let b = connect(fault_config(proxy.addr())).await;
    let ch = format!("{}:outage", prefix());
    let mut watcher = broker().await.subscribe(&ch).await.unwrap();
    proxy.cut();
    sleep(Duration::from_millis(300)).await;
    let key = format!("{}:k", prefix());
    for _ in 0..3 {
        let started = Instant::now();
        let results = [
            b.publish(&ch, Bytes::from_static(b"lost")).await.map(drop),
            b.subscribe(&ch).await.map(drop),
            b.acquire(&key, LeaseRequest::new(Duration::from_secs(5)))
                .await
                .map(drop),
            b.count(&key).await.map(drop),
        ];
        for result in results {
            assert_eq!(result.unwrap_err().kind(), ErrorKind::Unavailable);
        }
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "{:?}",
            started.elapsed()
        );
    }
    proxy.pass();
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.publish(&ch, Bytes::from_static(b"back")).await.is_err() {
        assert!(Instant::now() < deadline, "never came back");
        sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(next_message(&mut watcher).await.as_ref(), b"back");
    silent(&mut watcher, Duration::from_millis(300)).await;
    assert_eq!(b.count(&key).await.unwrap(), 0);
}

/// In a black hole, every call fails with Unavailable within op_timeout, and the client finds
/// the silent connection dead by its pings (1 s here) and reports it at once afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_hole_is_bounded_and_found_by_pings() {
    let proxy = FaultProxy::start(common::server_addr()).await.unwrap();
    let b = connect(fault_config(proxy.addr())).await;
    proxy.black_hole();
    let ch = format!("{}:bh", prefix());
    let started = Instant::now();
    let err = b.publish(&ch, Bytes::from_static(b"x")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    assert!(started.elapsed() < Duration::from_millis(1500));
    // Three unanswered pings at 1 s: the connection is dropped, calls fail at once.
    sleep(Duration::from_secs(4)).await;
    let started = Instant::now();
    let err = b.count("k").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "{:?}",
        started.elapsed()
    );
    assert!(format!("{b:?}").contains("Disconnected"), "{b:?}");
}

/// After a reconnect an idle subscription yields a gap by itself (no message needed), before
/// any message of the new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gap_after_reconnect_comes_first_and_unprompted() {
    let proxy = FaultProxy::start(common::server_addr()).await.unwrap();
    let b = connect(fault_config(proxy.addr())).await;
    let ch = format!("{}:gap", prefix());
    let mut sub = b.subscribe(&ch).await.unwrap();
    let direct = broker().await;
    direct.publish(&ch, Bytes::from_static(b"1")).await.unwrap();
    assert_eq!(next_message(&mut sub).await.as_ref(), b"1");
    proxy.cut();
    sleep(Duration::from_secs(2)).await;
    proxy.pass();
    let started = Instant::now();
    assert_eq!(
        timeout(Duration::from_secs(5), sub.next()).await.unwrap(),
        Some(Incoming::Gap)
    );
    eprintln!("gap {:?} after the proxy passed again", started.elapsed());
    direct.publish(&ch, Bytes::from_static(b"2")).await.unwrap();
    assert_eq!(next_message(&mut sub).await.as_ref(), b"2");
}

/// A reader that falls behind its buffer loses messages and is told with a gap; then messages
/// flow again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_gets_a_gap() {
    let b = connect(NatsConfig::new(common::url()).with_subscription_buffer(16)).await;
    let ch = format!("{}:slow", prefix());
    let mut sub = b.subscribe(&ch).await.unwrap();
    let publisher = broker().await;
    for i in 0..300u32 {
        publisher
            .publish(&ch, Bytes::from(i.to_string()))
            .await
            .unwrap();
    }
    let mut messages = 0;
    let mut gap = false;
    while let Ok(Some(item)) = timeout(Duration::from_millis(500), sub.next()).await {
        match item {
            Incoming::Gap => gap = true,
            Incoming::Message(_) => messages += 1,
        }
    }
    assert!(gap, "no gap after dropping messages");
    assert!(messages < 300, "nothing was dropped ({messages})");
    publisher
        .publish(&ch, Bytes::from_static(b"again"))
        .await
        .unwrap();
    assert_eq!(next_message(&mut sub).await.as_ref(), b"again");
}

/// A 20 s outage through the proxy: the subscription comes back with a gap, no call waits past
/// its bound meanwhile, and the time to recover is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_resumes_after_a_20s_cut_and_no_call_waits_past_its_bound() {
    let proxy = FaultProxy::start(common::server_addr()).await.unwrap();
    let b = connect(fault_config(proxy.addr())).await;
    let ch = format!("{}:20s", prefix());
    let mut sub = b.subscribe(&ch).await.unwrap();
    let direct = broker().await;
    proxy.cut();
    let outage_end = Instant::now() + Duration::from_secs(20);
    let mut longest = Duration::ZERO;
    let mut calls = 0;
    while Instant::now() < outage_end {
        let started = Instant::now();
        let failed = b
            .acquire("k", LeaseRequest::new(Duration::from_secs(1)))
            .await
            .is_err()
            && b.publish(&ch, Bytes::from_static(b"x")).await.is_err();
        assert!(failed, "a call succeeded during the outage");
        longest = longest.max(started.elapsed());
        calls += 1;
        sleep(Duration::from_millis(200)).await;
    }
    proxy.pass();
    let restored = Instant::now();
    let mut saw_gap = false;
    loop {
        assert!(
            restored.elapsed() < Duration::from_secs(15),
            "never came back"
        );
        direct
            .publish(&ch, Bytes::from_static(b"after"))
            .await
            .unwrap();
        match timeout(Duration::from_millis(200), sub.next()).await {
            Ok(Some(Incoming::Gap)) => saw_gap = true,
            Ok(Some(Incoming::Message(m))) if m.as_ref() == b"after" => break,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) => {}
        }
    }
    assert!(saw_gap);
    eprintln!(
        "20 s cut: {calls} call pairs failed, the longest took {longest:?} (bound 1 s); \
         subscription back {:?} after the proxy passed again",
        restored.elapsed()
    );
    assert!(longest <= Duration::from_millis(1100), "{longest:?}");
}

// ---------------------------------------------------------------------------------------------
// Connecting

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connection_is_unavailable_at_once() {
    let url = |port| format!("nats://u:secret-pw@127.0.0.1:{port}");
    let connect = |port| NatsBroker::connect_with(NatsConfig::new(url(port)));
    bgtask_conformance::servers::refused_connection_is_unavailable(
        connect,
        "secret-pw",
        Duration::from_secs(1),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_server_is_unavailable_within_the_connect_timeout() {
    let connect = |proxy| NatsBroker::connect_with(fault_config(proxy));
    bgtask_conformance::servers::silent_server_is_unavailable(
        common::server_addr(),
        connect,
        Duration::from_millis(1500),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_urls_and_settings_are_config_errors() {
    for url in [
        "redis://127.0.0.1",
        "nats://",
        "127.0.0.1:4222",
        "nats://h/db",
    ] {
        let err = NatsBroker::connect(url).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config, "{url}: {err}");
    }
    let err = NatsBroker::connect_with(NatsConfig::new(common::url()).with_subject_prefix("a.b"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
}

/// A server without JetStream cannot hold leases: a Config error saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_without_jetstream_is_a_config_error() {
    let port = common::free_port();
    let mut child = std::process::Command::new("nats-server")
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start nats-server (is it on PATH?)");
    let url = format!("nats://127.0.0.1:{port}");
    let mut result = NatsBroker::connect(&url).await;
    for _ in 0..100 {
        if !matches!(&result, Err(e) if e.kind() == ErrorKind::Unavailable) {
            break;
        }
        sleep(Duration::from_millis(50)).await;
        result = NatsBroker::connect(&url).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    let err = result.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("-js"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_password_in_the_url() {
    let server = PrivateServer::start(&["--user", "app", "--pass", "s3cr%t pw"]);
    let good = server.url(Some("app:s3cr%25t%20pw"));
    let b = connect(short(NatsConfig::new(&good))).await;
    let ch = "auth";
    let mut sub = b.subscribe(ch).await.unwrap();
    b.publish(ch, Bytes::from_static(b"in")).await.unwrap();
    assert_eq!(next_message(&mut sub).await.as_ref(), b"in");
    assert!(!format!("{b:?}").contains("s3cr"), "{b:?}");

    for userinfo in ["app:wrong-password", "nobody:s3cr%25t%20pw"] {
        let started = Instant::now();
        let err = NatsBroker::connect(&server.url(Some(userinfo)))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
        assert!(started.elapsed() < Duration::from_secs(1));
        let shown = format!("{err} {err:?}");
        assert!(
            !shown.contains("wrong-password") && !shown.contains("s3cr"),
            "{shown}"
        );
    }
    let err = NatsBroker::connect(&server.url(None)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_in_the_url() {
    let server = PrivateServer::start(&["--auth", "t0ken"]);
    let b = connect(NatsConfig::new(server.url(Some("t0ken")))).await;
    assert!(b
        .acquire("k", LeaseRequest::new(Duration::from_secs(5)).cap(1))
        .await
        .unwrap()
        .lease
        .is_some());
    assert!(!format!("{b:?} {:?}", b.config()).contains("t0ken"));
    let err = NatsBroker::connect(&server.url(Some("not-the-token")))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
    assert!(!format!("{err} {err:?}").contains("not-the-token"));
}

/// A server restart on the same store: subscriptions come back with a gap, and leases and
/// claims, which are stored on disk, survive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_keeps_leases_and_claims_and_resubscribes() {
    let recorded = bgtask_conformance::recorded::Recorded::install();
    let reconnects = || recorded.value(BROKER_RECONNECTS, &[("backend", "nats")]);
    let server = PrivateServer::start(&[]);
    let b = connect(short(NatsConfig::new(server.url(None)))).await;
    let mut sub = b.subscribe("ch").await.unwrap();
    b.acquire("k", LeaseRequest::new(Duration::from_secs(60)).cap(1))
        .await
        .unwrap();
    assert!(b.claim("task", Duration::from_secs(60)).await.unwrap());
    assert_eq!(reconnects(), 0.0, "the first connection is not a reconnect");
    let (dir, port) = server.stop();
    sleep(Duration::from_secs(1)).await;
    let _restarted = PrivateServer::start_in(dir, port, &[]);
    assert_eq!(
        timeout(Duration::from_secs(10), sub.next()).await.unwrap(),
        Some(Incoming::Gap)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match b.count("k").await {
            Ok(n) => {
                assert_eq!(n, 1, "the lease did not survive the restart");
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "{e}"),
        }
        sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !b.claim("task", Duration::from_secs(60)).await.unwrap(),
        "the claim did not survive the restart"
    );
    b.publish("ch", Bytes::from_static(b"back")).await.unwrap();
    assert_eq!(next_message(&mut sub).await.as_ref(), b"back");
    assert_eq!(reconnects(), 1.0, "counted in the metrics");
}

/// Replicas on a single server: asking for 3 is a clear `Config` error naming the stream and the
/// fix; the default is 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_need_a_cluster() {
    let probe = broker().await;
    assert_eq!(probe.stream_replicas(), (1, 1));
    let stream = format!("BGTASK_TEST_R3_{}", &bgtask_core::names::random_id()[..12]);
    let config = NatsConfig::new(format!("{}?replicas=3", common::url()))
        .with_lease_stream(&stream)
        .with_subject_prefix(format!("r{}", &bgtask_core::names::random_id()[..12]));
    // A server before 2.10.19 refuses replicated streams first (nats-server#4320).
    let expected: &[&str] = if probe.replicated_streams_supported() {
        &[
            "needs 3 replicas",
            "not in a cluster",
            "replicas=1",
            &stream,
        ]
    } else {
        &["replicas=3", "#4320", "replicas=1"]
    };
    common::assert_config_error(config, expected).await;
}
