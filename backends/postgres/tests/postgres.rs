//! Integration tests of `PostgresBroker` against a real PostgreSQL (`BGTASK_POSTGRES_URL`,
//! default `postgres://postgres@127.0.0.1:5432/test`), with faults injected by the conformance
//! crate's TCP proxy and by `pg_terminate_backend`.
//!
//! Every test uses a schema of its own and drops only that schema; none reconfigures the server.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bgtask_conformance::proxy::FaultProxy;
use bgtask_conformance::servers::{
    refused_connection_is_unavailable, silent_server_is_unavailable,
};
use bgtask_core::metrics::BROKER_RECONNECTS;
use bgtask_core::{
    Broker, Client, ClientConfig, DynBroker, ErrorKind, Incoming, LeaseRequest, Published,
    SubmitOptions, Worker, WorkerConfig,
};
use bgtask_postgres::{wire, PostgresBroker, PostgresConfig};
use bytes::Bytes;
use futures::StreamExt;
use serde_json::json;
use sqlx::{Connection, Executor};
use tokio::time::{sleep, timeout, Instant};

use common::{connect, listener_pid, notify, raw, server_addr, TestSchema};

use bgtask_conformance::{
    expect_message as next_message, expect_next as next, expect_silence as silent, ARRIVES,
};

/// Payload rows of `schema` whose channel is `channel`.
async fn rows_of(schema: &TestSchema, channel: &str) -> i64 {
    let sql = format!(
        "SELECT count(*) FROM \"{}\".payloads WHERE channel = $1",
        schema.name
    );
    sqlx::query_scalar(&sql)
        .bind(channel.as_bytes())
        .fetch_one(&mut raw().await)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_subscribe() {
    let schema = TestSchema::new();
    let (a, b) = (schema.broker().await, schema.broker().await);
    let mut sub = a.subscribe("basic").await.unwrap();
    assert_eq!(sub.channel(), "basic");
    for i in 0..100u32 {
        let sent = b
            .publish("basic", Bytes::from(i.to_be_bytes().to_vec()))
            .await
            .unwrap();
        assert_eq!(sent, Published::Unknown);
    }
    for i in 0..100u32 {
        assert_eq!(next_message(&mut sub).await.as_ref(), i.to_be_bytes());
    }
    assert!(!b.capabilities().receiver_counts);
    assert!(b.capabilities().networked);
}

/// The schema is created by the migrations, once, even when brokers start together; a broker
/// on another schema of the same database never meets this one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_run_once_and_schemas_never_meet() {
    let schema = TestSchema::new();
    let brokers = futures::future::join_all((0..8).map(|_| schema.broker())).await;
    let sql = format!(
        "SELECT version, count(*) OVER () FROM \"{}\".migrations",
        schema.name
    );
    let rows: Vec<(i32, i64)> = sqlx::query_as(&sql)
        .fetch_all(&mut raw().await)
        .await
        .unwrap();
    assert_eq!(rows, vec![(1, 3), (2, 3), (3, 3)]);

    let other = TestSchema::new();
    let elsewhere = other.broker().await;
    assert_ne!(
        brokers[0].channel_identifier("ch"),
        elsewhere.channel_identifier("ch")
    );
    let mut here = brokers[0].subscribe("ch").await.unwrap();
    let mut there = elsewhere.subscribe("ch").await.unwrap();
    brokers[1]
        .publish("ch", Bytes::from_static(b"here"))
        .await
        .unwrap();
    assert_eq!(next_message(&mut here).await.as_ref(), b"here");
    silent(&mut there, Duration::from_millis(300)).await;
    // Leases too.
    let request = LeaseRequest::new(Duration::from_secs(30)).cap(1);
    assert!(brokers[0]
        .acquire("k", request.clone())
        .await
        .unwrap()
        .lease
        .is_some());
    assert!(elsewhere
        .acquire("k", request)
        .await
        .unwrap()
        .lease
        .is_some());
}

/// NOTIFY refuses 8000 bytes (the trap); the broker sends a message whose notification is
/// exactly 7999 bytes inline and one byte more by reference, both intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_7999_byte_boundary() {
    let schema = TestSchema::new();
    let broker = schema.broker().await;
    // The trap itself.
    let err = sqlx::query("SELECT pg_notify('bgtask_probe', repeat('x', 8000))")
        .execute(&mut raw().await)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("too long"), "{err}");
    sqlx::query("SELECT pg_notify('bgtask_probe', repeat('x', 7999))")
        .execute(&mut raw().await)
        .await
        .unwrap();

    let channel = "boundary";
    let max = wire::max_inline_payload(channel).unwrap();
    assert_eq!(wire::inline_len(channel, max), wire::MAX_NOTIFY_BYTES);
    let mut sub = broker.subscribe(channel).await.unwrap();
    let publisher = schema.broker().await;
    let at: Bytes = (0..max).map(|i| (i % 256) as u8).collect::<Vec<_>>().into();
    let over: Bytes = (0..=max)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<_>>()
        .into();
    publisher.publish(channel, at.clone()).await.unwrap();
    assert_eq!(
        rows_of(&schema, channel).await,
        0,
        "7999 bytes went by reference"
    );
    publisher.publish(channel, over.clone()).await.unwrap();
    assert_eq!(rows_of(&schema, channel).await, 1, "8000 bytes went inline");
    assert_eq!(next_message(&mut sub).await, at);
    assert_eq!(next_message(&mut sub).await, over);
    eprintln!(
        "channel {channel:?}: {max} payload bytes travel inline (a 7999-byte notification), \
         {} by reference",
        max + 1
    );
}

/// 1 MiB + 64 KiB by reference, in order with inline messages around it; the rows are gone
/// after their expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_mib_travels_by_reference_and_its_rows_expire() {
    let schema = TestSchema::new();
    let config = schema
        .config()
        .with_payload_ttl(Duration::from_secs(1))
        .with_cleanup_interval(Duration::from_millis(500));
    let publisher = connect(config).await;
    let (s1, s2) = (schema.broker().await, schema.broker().await);
    let mut subs = vec![
        s1.subscribe("big").await.unwrap(),
        s1.subscribe("big").await.unwrap(),
        s2.subscribe("big").await.unwrap(),
    ];
    let payload: Bytes = (0..(1 << 20) + (64 << 10))
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect::<Vec<_>>()
        .into();
    let started = Instant::now();
    publisher
        .publish("big", Bytes::from_static(b"before"))
        .await
        .unwrap();
    for _ in 0..3 {
        publisher.publish("big", payload.clone()).await.unwrap();
    }
    publisher
        .publish("big", Bytes::from_static(b"after"))
        .await
        .unwrap();
    assert_eq!(rows_of(&schema, "big").await, 3);
    for sub in &mut subs {
        assert_eq!(next_message(sub).await.as_ref(), b"before");
        for _ in 0..3 {
            assert!(next_message(sub).await == payload, "payload changed");
        }
        assert_eq!(next_message(sub).await.as_ref(), b"after");
    }
    eprintln!(
        "3 x 1 MiB + 64 KiB to 3 subscriptions on 2 brokers: {:?}",
        started.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while schema.payload_rows().await > 0 {
        assert!(
            Instant::now() < deadline,
            "payload rows outlived their expiry"
        );
        sleep(Duration::from_millis(100)).await;
    }
}

/// A reader that gets to a by-reference message after its row expired reads a gap instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_payload_row_is_a_gap() {
    let schema = TestSchema::new();
    let config = schema
        .config()
        .with_payload_ttl(Duration::from_millis(200))
        .with_cleanup_interval(Duration::from_millis(100));
    let broker = connect(config).await;
    let mut sub = broker.subscribe("late").await.unwrap();
    broker
        .publish("late", Bytes::from(vec![1u8; 10_000]))
        .await
        .unwrap();
    broker
        .publish("late", Bytes::from_static(b"small"))
        .await
        .unwrap();
    sleep(Duration::from_millis(800)).await;
    assert_eq!(next(&mut sub).await, Incoming::Gap);
    assert_eq!(next_message(&mut sub).await.as_ref(), b"small");
}

/// 1,000 tasks of 100 KiB through the task protocol (task and reply both by reference) leave
/// no payload row behind after their expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_tasks_of_100_kib_leave_no_payload_rows() {
    let schema = TestSchema::new();
    let config = || {
        schema
            .config()
            .with_payload_ttl(Duration::from_secs(2))
            .with_cleanup_interval(Duration::from_secs(1))
    };
    let namespace = format!("t{}", &bgtask_core::names::random_id()[..12]);
    let mut workers = Vec::new();
    for _ in 0..4 {
        let broker: DynBroker = Arc::new(connect(config()).await);
        let worker_config = WorkerConfig {
            namespace: namespace.clone(),
            ..WorkerConfig::for_tasks(["blob"])
        };
        let worker = Worker::new(broker, worker_config).await.unwrap();
        workers.push(worker.shutdown_handle());
        tokio::spawn(worker.run(16, |task| async move { Ok(task.json()) }));
    }
    let client_broker: DynBroker = Arc::new(connect(config()).await);
    let client = Client::new(
        client_broker,
        ClientConfig {
            namespace,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let blob = "b".repeat(100 << 10);
    let started = Instant::now();
    let results = futures::stream::iter(0..1000u32)
        .map(|i| {
            let client = &client;
            let payload = json!({ "i": i, "blob": blob });
            async move {
                let options = SubmitOptions::new().timeout(Duration::from_secs(30));
                let reply = client
                    .submit_with("blob", &payload, options)
                    .await?
                    .reply()
                    .await?;
                assert_eq!(reply.json()["i"], i);
                Ok::<(), bgtask_core::Error>(())
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} failed, e.g. {}",
        failed.len(),
        failed[0]
    );
    let took = started.elapsed();
    let right_after = schema.payload_rows().await;
    assert!(
        right_after > 0,
        "the 100 KiB messages did not go by reference"
    );
    let expired = Instant::now();
    while schema.payload_rows().await > 0 {
        assert!(
            expired.elapsed() < Duration::from_secs(15),
            "payload rows outlived their expiry"
        );
        sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "1,000 tasks of 100 KiB in {took:?}; {right_after} payload rows right after, 0 after {:?} \
         (payload_ttl 2 s, cleanup every 1 s)",
        expired.elapsed()
    );
    for worker in workers {
        worker.shutdown();
    }
}

/// PostgreSQL merges identical notifications of one transaction (the trap); bgtask's never
/// are identical, so every publish arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_notifications_are_never_merged() {
    let schema = TestSchema::new();
    let broker = schema.broker().await;
    let mut sub = broker.subscribe("same").await.unwrap();
    let ident = broker.channel_identifier("same");

    // The trap: the same text twice in one transaction arrives once.
    let text = wire::encode_inline(&wire::message_id(), "same", b"dup").unwrap();
    let mut conn = raw().await;
    let mut tx = conn.begin().await.unwrap();
    for _ in 0..2 {
        notify(&mut *tx, &ident, &text).await;
    }
    tx.commit().await.unwrap();
    assert_eq!(next_message(&mut sub).await.as_ref(), b"dup");
    silent(&mut sub, Duration::from_millis(300)).await;

    // bgtask's encoding: one message id each, so both arrive, even inside one transaction.
    let mut tx = conn.begin().await.unwrap();
    for _ in 0..2 {
        let text = wire::encode_inline(&wire::message_id(), "same", b"dup").unwrap();
        notify(&mut *tx, &ident, &text).await;
    }
    tx.commit().await.unwrap();
    assert_eq!(next_message(&mut sub).await.as_ref(), b"dup");
    assert_eq!(next_message(&mut sub).await.as_ref(), b"dup");

    // And through publish: 200 identical payloads, 200 messages.
    let publisher = schema.broker().await;
    for _ in 0..200 {
        publisher
            .publish("same", Bytes::from_static(b"again"))
            .await
            .unwrap();
    }
    for _ in 0..200 {
        assert_eq!(next_message(&mut sub).await.as_ref(), b"again");
    }
    silent(&mut sub, Duration::from_millis(200)).await;
}

/// Names that break naive mappings onto identifiers: 64+ bytes sharing a 63-byte prefix (LISTEN
/// truncates), NUL (ends an identifier; PostgreSQL text cannot even hold it), case (unquoted
/// identifiers fold), quotes and SQL, empty, long non-ASCII. Their traffic and their leases
/// never meet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_channel_names_never_meet() {
    let schema = TestSchema::new();
    let prefix = "p".repeat(63);
    let names: Vec<String> = vec![
        prefix.clone(),
        format!("{prefix}a"),
        format!("{prefix}b"),
        format!("{prefix}{}", "c".repeat(1000)),
        "a".into(),
        "a\0".into(),
        "a\0b".into(),
        "a\0c".into(),
        "\0".into(),
        "Chan".into(),
        "chan".into(),
        "CHAN".into(),
        "\"chan\"".into(),
        "q".into(),
        "'q'".into(),
        "\"q".into(),
        "x\"; NOTIFY bgt_x; --".into(),
        "'); DROP TABLE leases; --".into(),
        "".into(),
        " ".into(),
        "é✓ünï".repeat(200),
    ];
    let subscriber = schema.broker().await;
    let mut identifiers = HashSet::new();
    let mut subs = Vec::new();
    for name in &names {
        let ident = subscriber.channel_identifier(name);
        assert!(ident.len() <= 63);
        assert!(identifiers.insert(ident), "{name:?}");
        subs.push(subscriber.subscribe(name).await.unwrap());
    }
    let publisher = schema.broker().await;
    for name in &names {
        publisher
            .publish(name, Bytes::from(name.clone()))
            .await
            .unwrap();
    }
    for (name, sub) in names.iter().zip(&mut subs) {
        assert_eq!(
            next_message(sub).await,
            Bytes::from(name.clone()),
            "{name:?}"
        );
    }
    for (name, sub) in names.iter().zip(&mut subs) {
        if let Ok(item) = timeout(Duration::from_millis(50), sub.next()).await {
            panic!("channel {name:?} received another's message: {item:?}");
        }
    }
    let request = LeaseRequest::new(Duration::from_secs(30))
        .cap(1)
        .note("n\0te");
    for name in &names {
        let acquired = publisher.acquire(name, request.clone()).await.unwrap();
        assert!(acquired.lease.is_some(), "key {name:?} met another key");
        assert_eq!(acquired.live, 1, "key {name:?}");
        assert_eq!(publisher.count(name).await.unwrap(), 1, "key {name:?}");
        assert_eq!(publisher.leases(name).await.unwrap()[0].note, "n\0te");
    }
    // Nothing was dropped by the SQL-looking names.
    assert_eq!(schema.lease_rows().await, names.len() as i64);
}

/// A notification on a channel's identifier that names another channel (as a hash collision
/// would), inline or by reference, is never delivered to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_colliding_name_is_dropped() {
    let schema = TestSchema::new();
    let broker = schema.broker().await;
    let mut sub = broker.subscribe("mine").await.unwrap();
    let ident = broker.channel_identifier("mine");
    let mut conn = raw().await;
    let foreign = wire::encode_inline(&wire::message_id(), "theirs", b"inline").unwrap();
    notify(&mut conn, &ident, &foreign).await;
    let id = wire::message_id();
    let insert = format!(
        "INSERT INTO \"{}\".payloads (id, channel, data, expires_at) \
         VALUES ($1, $2, $3, now() + interval '1 minute')",
        schema.name
    );
    sqlx::query(&insert)
        .bind(&id)
        .bind(b"theirs".as_slice())
        .bind(b"by reference".as_slice())
        .execute(&mut conn)
        .await
        .unwrap();
    notify(&mut conn, &ident, &wire::encode_reference(&id)).await;
    // Not bgtask's format at all.
    sqlx::query("SELECT pg_notify($1, 'hello')")
        .bind(&ident)
        .execute(&mut conn)
        .await
        .unwrap();
    broker
        .publish("mine", Bytes::from_static(b"own"))
        .await
        .unwrap();
    assert_eq!(next_message(&mut sub).await.as_ref(), b"own");
    silent(&mut sub, Duration::from_millis(200)).await;
}

/// A subscription made right after a message was published never receives it, even when the
/// channel is already LISTENed to and the notification is still on its way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_subscription_sees_only_later_messages() {
    let schema = TestSchema::new();
    let broker = schema.broker().await;
    let publisher = schema.broker().await;
    let _keep = broker.subscribe("later").await.unwrap();
    for i in 0..50u32 {
        publisher
            .publish("later", Bytes::from(format!("old{i}")))
            .await
            .unwrap();
        let mut sub = broker.subscribe("later").await.unwrap();
        publisher
            .publish("later", Bytes::from(format!("new{i}")))
            .await
            .unwrap();
        assert_eq!(
            next_message(&mut sub).await,
            Bytes::from(format!("new{i}")),
            "round {i}"
        );
    }
}

/// The byte bound counts inline payloads (a payload stored as a row holds no bytes while it
/// waits: it is read when the reader gets to it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_of_inline_payloads_holds_the_byte_bound_then_gets_a_gap() {
    const PAYLOAD: usize = 1024;
    let schema = TestSchema::new();
    let config = schema.config().with_subscription_buffer_bytes(4 * PAYLOAD);
    slow_reader_keeps_four_then_a_gap(config, PAYLOAD).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_gets_a_gap() {
    let schema = TestSchema::new();
    slow_reader_keeps_four_then_a_gap(schema.config().with_subscription_buffer(4), 1).await;
}

/// Ten `payload`-byte messages to a reader that does not read, whose buffer (`config`) holds
/// four: it reads those four, then one gap, then what comes next.
async fn slow_reader_keeps_four_then_a_gap(config: PostgresConfig, payload: usize) {
    let b = connect(config).await;
    let mut sub = b.subscribe("slow").await.unwrap();
    for i in 0..10u8 {
        b.publish("slow", Bytes::from(vec![i; payload]))
            .await
            .unwrap();
    }
    sleep(Duration::from_millis(500)).await;
    for i in 0..4u8 {
        assert_eq!(next_message(&mut sub).await.as_ref(), vec![i; payload]);
    }
    b.publish("slow", Bytes::from_static(b"later"))
        .await
        .unwrap();
    assert_eq!(next(&mut sub).await, Incoming::Gap);
    assert_eq!(next_message(&mut sub).await.as_ref(), b"later");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_outlive_the_broker_handle() {
    let schema = TestSchema::new();
    let mut sub = schema.broker().await.subscribe("outlive").await.unwrap();
    let publisher = schema.broker().await;
    publisher
        .publish("outlive", Bytes::from_static(b"x"))
        .await
        .unwrap();
    assert_eq!(next_message(&mut sub).await.as_ref(), b"x");
    publisher
        .publish("outlive", Bytes::from(vec![9u8; 20_000]))
        .await
        .unwrap();
    assert_eq!(next_message(&mut sub).await.len(), 20_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_ends_streams_and_refuses_calls() {
    let schema = TestSchema::new();
    let b = schema.broker().await;
    let mut sub = b.subscribe("close").await.unwrap();
    b.clone().close();
    assert!(b.is_closed());
    assert_eq!(timeout(ARRIVES, sub.next()).await.unwrap(), None);
    let err = b
        .publish("close", Bytes::from_static(b"x"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed);
    assert_eq!(
        b.subscribe("close").await.unwrap_err().kind(),
        ErrorKind::Closed
    );
    assert_eq!(
        b.count("close").await.unwrap_err().kind(),
        ErrorKind::Closed
    );
    // The listener connection is gone from the server.
    let deadline = Instant::now() + ARRIVES;
    while listener_pid(&b).await.is_some() {
        assert!(Instant::now() < deadline, "the listener connection stayed");
        sleep(Duration::from_millis(50)).await;
    }
}

/// 100 concurrent acquires with cap 5, from four brokers: exactly 5 leases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_acquires_with_cap_5_yield_5() {
    let schema = TestSchema::new();
    let brokers = futures::future::join_all((0..4).map(|_| schema.broker())).await;
    for round in 0..3 {
        let key = format!("race{round}");
        let results = futures::future::join_all((0..100).map(|i| {
            let broker = brokers[i % 4].clone();
            let key = key.clone();
            async move {
                let request = LeaseRequest::new(Duration::from_secs(30))
                    .cap(5)
                    .note(format!("n{i}"));
                broker.acquire(&key, request).await.unwrap()
            }
        }))
        .await;
        let won: Vec<_> = results.iter().filter_map(|a| a.lease.clone()).collect();
        assert_eq!(won.len(), 5, "round {round}");
        assert!(results.iter().all(|a| a.live <= 5));
        assert_eq!(brokers[0].count(&key).await.unwrap(), 5);
        let leases = brokers[1].leases(&key).await.unwrap();
        assert_eq!(leases.len(), 5);
        for info in &leases {
            assert!(won.contains(&info.id));
            assert!(info.remaining <= Duration::from_secs(30));
            assert!(info.remaining > Duration::from_secs(25));
        }
        eprintln!(
            "round {round}: 100 concurrent acquires with cap 5 granted {}",
            won.len()
        );
    }
}

/// Expiry is judged by the database's clock; expired rows are deleted by the next acquire of
/// their key and by the cleanup, so nothing stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_lease_rows_are_deleted() {
    let schema = TestSchema::new();
    let config = schema
        .config()
        .with_cleanup_interval(Duration::from_millis(300));
    let b = connect(config).await;
    let short = LeaseRequest::new(Duration::from_millis(200));
    for _ in 0..3 {
        b.acquire("gone", short.clone()).await.unwrap();
    }
    let kept = b
        .acquire("kept", LeaseRequest::new(Duration::from_secs(30)))
        .await
        .unwrap()
        .lease
        .unwrap();
    assert_eq!(schema.lease_rows().await, 4);
    let deadline = Instant::now() + Duration::from_secs(5);
    while schema.lease_rows().await != 1 {
        assert!(Instant::now() < deadline, "expired lease rows stayed");
        sleep(Duration::from_millis(50)).await;
    }
    assert!(b.release("kept", &kept).await.unwrap());
    assert_eq!(schema.lease_rows().await, 0);
    // An expired lease's release is false, and removes its row.
    let lease = b
        .acquire("k", LeaseRequest::new(Duration::from_millis(50)))
        .await
        .unwrap()
        .lease
        .unwrap();
    sleep(Duration::from_millis(100)).await;
    assert!(!b.release("k", &lease).await.unwrap());
    // The TTL is counted by the database: what `leases` reports matches the server's view.
    b.acquire("db", LeaseRequest::new(Duration::from_secs(60)))
        .await
        .unwrap();
    let sql = format!(
        "SELECT extract(epoch FROM expires_at - clock_timestamp())::float8 FROM \"{}\".leases \
         WHERE key = $1",
        schema.name
    );
    let server_left: f64 = sqlx::query_scalar(&sql)
        .bind(b"db".as_slice())
        .fetch_one(&mut raw().await)
        .await
        .unwrap();
    let reported = b.leases("db").await.unwrap()[0].remaining.as_secs_f64();
    assert!(
        (server_left - reported).abs() < 1.0,
        "{server_left} vs {reported}"
    );
}

/// A claim is one row of `claims`, apart from leases: it never shows as a lease, a lease of
/// the same key does not hold it, and its expiry is the database's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_is_one_row_apart_from_leases() {
    let schema = TestSchema::new();
    let b = schema.broker().await;
    assert!(b.claim("task", Duration::from_secs(60)).await.unwrap());
    for _ in 0..5 {
        assert!(!b.claim("task", Duration::from_secs(60)).await.unwrap());
    }
    assert_eq!(schema.claim_rows().await, 1);
    assert_eq!(schema.lease_rows().await, 0);
    assert_eq!(b.count("task").await.unwrap(), 0);
    assert!(b.leases("task").await.unwrap().is_empty());
    let request = LeaseRequest::new(Duration::from_secs(60)).cap(1);
    assert!(b.acquire("task", request).await.unwrap().lease.is_some());
    assert!(b.claim("other", Duration::from_secs(60)).await.unwrap());
    assert_eq!(schema.claim_rows().await, 2);
    assert_eq!(schema.lease_rows().await, 1);

    let sql = format!(
        "SELECT key, extract(epoch FROM expires_at - clock_timestamp())::float8 \
         FROM \"{}\".claims WHERE key_hash = sha256($1)",
        schema.name
    );
    let (key, left): (Vec<u8>, f64) = sqlx::query_as(&sql)
        .bind(b"task".as_slice())
        .fetch_one(&mut raw().await)
        .await
        .unwrap();
    assert_eq!(key, b"task");
    assert!(left > 58.0 && left <= 60.0, "{left}");

    // Keys far beyond what a btree index entry can hold, and TTLs beyond the cap.
    let long = "κ".repeat(50_000);
    assert!(b.claim(&long, Duration::from_secs(60)).await.unwrap());
    assert!(!b.claim(&long, Duration::from_secs(60)).await.unwrap());
    assert!(b.claim(&format!("{long}x"), Duration::MAX).await.unwrap());
    assert!(!b.claim(&format!("{long}x"), Duration::MAX).await.unwrap());
    assert!(b.claim("zero", Duration::ZERO).await.unwrap());
}

/// An expired claim can be taken again, by any broker, and once only; the winner's TTL counts
/// from the takeover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_claim_is_taken_again_once() {
    let schema = TestSchema::new();
    let brokers = futures::future::join_all((0..3).map(|_| schema.broker())).await;
    let ttl = Duration::from_millis(300);
    for round in 0..3 {
        let results = futures::future::join_all((0..30).map(|i| {
            let broker = brokers[i % brokers.len()].clone();
            async move { broker.claim("again", ttl).await.unwrap() }
        }))
        .await;
        assert_eq!(
            results.iter().filter(|&&won| won).count(),
            1,
            "round {round}"
        );
        assert!(!brokers[round % 3].claim("again", ttl).await.unwrap());
        sleep(Duration::from_millis(450)).await;
    }
    assert_eq!(schema.claim_rows().await, 1, "taken over in place");
    assert!(brokers[0]
        .claim("again", Duration::from_secs(60))
        .await
        .unwrap());
    sleep(Duration::from_millis(450)).await;
    assert!(!brokers[1].claim("again", ttl).await.unwrap());
}

/// The cleanup deletes expired claim rows and keeps live ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_claim_rows_are_deleted() {
    let schema = TestSchema::new();
    let config = schema
        .config()
        .with_cleanup_interval(Duration::from_millis(300));
    let b = connect(config).await;
    for i in 0..20 {
        assert!(b
            .claim(&format!("short{i}"), Duration::from_millis(200))
            .await
            .unwrap());
    }
    assert!(b.claim("kept", Duration::from_secs(60)).await.unwrap());
    assert_eq!(schema.claim_rows().await, 21);
    let deadline = Instant::now() + Duration::from_secs(5);
    while schema.claim_rows().await != 1 {
        assert!(Instant::now() < deadline, "expired claim rows stayed");
        sleep(Duration::from_millis(50)).await;
    }
    assert!(!b.claim("kept", Duration::from_secs(60)).await.unwrap());
    assert!(b.claim("short0", Duration::from_secs(60)).await.unwrap());
}

/// A schema at version 1 (before `claims`) is migrated to the latest version by the next
/// broker; its leases stay, and claims work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_schema_is_migrated() {
    let schema = TestSchema::new();
    let old = schema.broker().await;
    let request = LeaseRequest::new(Duration::from_secs(60)).cap(1);
    assert!(old
        .acquire("k", request.clone())
        .await
        .unwrap()
        .lease
        .is_some());
    old.close();
    // Migration 1 is never edited, so removing what migrations 2 and 3 added leaves exactly a
    // version-1 schema.
    let mut conn = raw().await;
    conn.execute(
        format!(
            "DROP FUNCTION \"{0}\".admit_lease; DROP TABLE \"{0}\".claims; \
             DELETE FROM \"{0}\".migrations WHERE version > 1",
            schema.name
        )
        .as_str(),
    )
    .await
    .unwrap();

    let brokers = futures::future::join_all((0..4).map(|_| schema.broker())).await;
    let sql = format!(
        "SELECT version, count(*) OVER () FROM \"{}\".migrations ORDER BY version",
        schema.name
    );
    let rows: Vec<(i32, i64)> = sqlx::query_as(&sql).fetch_all(&mut conn).await.unwrap();
    assert_eq!(rows, vec![(1, 3), (2, 3), (3, 3)]);
    assert!(brokers[0]
        .acquire("k", request)
        .await
        .unwrap()
        .lease
        .is_none());
    assert!(brokers[1]
        .claim("c", Duration::from_secs(60))
        .await
        .unwrap());
    assert!(!brokers[2]
        .claim("c", Duration::from_secs(60))
        .await
        .unwrap());
    assert_eq!(schema.claim_rows().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connection_is_unavailable_at_once() {
    let url = |port| format!("postgres://u:secret-pw@127.0.0.1:{port}/db");
    let connect = |port| PostgresBroker::connect_with(PostgresConfig::new(url(port)));
    refused_connection_is_unavailable(connect, "secret-pw", Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_server_is_unavailable_within_the_connect_timeout() {
    let schema = TestSchema::new();
    let connect = |proxy| PostgresBroker::connect_with(schema.fault_config(proxy));
    silent_server_is_unavailable(server_addr(), connect, Duration::from_millis(2500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_urls_and_settings_are_config_errors() {
    let missing_db = {
        let mut url = url::Url::parse(&common::url()).unwrap();
        url.set_path("/bgtask_no_such_database");
        url.to_string()
    };
    for url in [
        "http://localhost/db",
        "not a url",
        "postgres://localhost/db?schema=bad-name",
        "postgres://localhost/db?schema=pg_catalog",
        missing_db.as_str(),
    ] {
        let err = PostgresBroker::connect(url).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config, "{url}: {err}");
    }
    // libpq's multi-host form: a clear error that says what to do instead, without the
    // password.
    let several =
        "postgres://u:s3cret@127.0.0.1:5432,127.0.0.1:5433/db?target_session_attrs=read-write";
    let err = PostgresBroker::connect(several).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("several hosts"), "{err}");
    assert!(!err.to_string().contains("s3cret"), "{err}");
    let err = PostgresBroker::connect_with(
        PostgresConfig::new(common::url()).with_liveness_interval(Duration::ZERO),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_from_the_url_and_debug_without_password() {
    let schema = TestSchema::new();
    let mut url = url::Url::parse(&common::url()).unwrap();
    url.query_pairs_mut().append_pair("schema", &schema.name);
    let b = PostgresBroker::connect(url.as_str()).await.unwrap();
    assert_eq!(b.config().schema, schema.name);
    let shown = format!("{b:?}");
    assert!(
        shown.contains("PostgresBroker") && shown.contains(&schema.name),
        "{shown}"
    );
    let config = PostgresConfig::new("postgres://user:hunter2@host/db?password=hunter3");
    let shown = format!("{config:?}");
    assert!(
        !shown.contains("hunter2") && !shown.contains("hunter3"),
        "{shown}"
    );
}

/// A subscribe call made during an outage succeeds if the connection returns within its
/// bound, and the subscription then missed nothing (no gap).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_during_a_short_outage_waits_for_the_connection() {
    let schema = TestSchema::new();
    let proxy = FaultProxy::start(server_addr()).await.unwrap();
    let config = schema
        .fault_config(proxy.addr())
        .with_op_timeout(Duration::from_secs(4));
    let b = connect(config).await;
    let direct = schema.broker().await;
    // Make sure the listener has noticed the cut before subscribing.
    let mut watch = b.subscribe("watch").await.unwrap();
    proxy.cut();
    assert_eq!(
        timeout(Duration::from_secs(5), watch.next()).await.ok(),
        None,
        "nothing arrives while cut"
    );
    let healer = tokio::spawn(async move {
        sleep(Duration::from_millis(500)).await;
        proxy.pass();
        proxy
    });
    let started = Instant::now();
    let mut sub = b
        .subscribe("waits")
        .await
        .expect("subscribe after the outage");
    assert!(started.elapsed() < Duration::from_secs(4));
    let _proxy = healer.await.unwrap();
    direct
        .publish("waits", Bytes::from_static(b"hi"))
        .await
        .unwrap();
    assert_eq!(
        next(&mut sub).await,
        Incoming::Message(Bytes::from_static(b"hi"))
    );
    // The older subscription says it may have missed messages.
    assert_eq!(next(&mut watch).await, Incoming::Gap);
}

/// Calls made while the listener is down each end within op_timeout (1 s) plus slack.
async fn calls_stay_bounded(b: &PostgresBroker, ch: &str, for_how_long: Duration) -> Duration {
    let until = Instant::now() + for_how_long;
    let mut longest = Duration::ZERO;
    let mut check = |started: Instant, what: &str| {
        let took = started.elapsed();
        longest = longest.max(took);
        assert!(took < Duration::from_millis(1500), "{what} took {took:?}");
    };
    while Instant::now() < until {
        let started = Instant::now();
        let _ = b
            .publish(&format!("{ch}:calls"), Bytes::from_static(b"during"))
            .await;
        check(started, "publish");
        let started = Instant::now();
        let _ = b.count("k").await;
        check(started, "count");
        let started = Instant::now();
        let _ = b.subscribe(&format!("{ch}:during")).await;
        check(started, "subscribe");
        sleep(Duration::from_millis(100)).await;
    }
    longest
}

/// The listener comes back after a 20 s outage through the fault proxy: every subscription
/// yields a gap, then new messages; no call waits past its bound meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_comes_back_after_a_20s_outage() {
    let schema = TestSchema::new();
    let proxy = FaultProxy::start(server_addr()).await.unwrap();
    let b = connect(schema.fault_config(proxy.addr())).await;
    let direct = schema.broker().await;
    let mut subs = vec![
        b.subscribe("outage").await.unwrap(),
        b.subscribe("outage").await.unwrap(),
        b.subscribe("other").await.unwrap(),
    ];
    direct
        .publish("outage", Bytes::from_static(b"before"))
        .await
        .unwrap();
    assert_eq!(next_message(&mut subs[0]).await.as_ref(), b"before");
    assert_eq!(next_message(&mut subs[1]).await.as_ref(), b"before");

    proxy.cut();
    let longest = calls_stay_bounded(&b, "outage", Duration::from_secs(20)).await;
    proxy.pass();
    let restored = Instant::now();
    for sub in &mut subs {
        assert_eq!(
            timeout(Duration::from_secs(10), sub.next()).await.unwrap(),
            Some(Incoming::Gap)
        );
    }
    let back = restored.elapsed();
    direct
        .publish("outage", Bytes::from_static(b"after"))
        .await
        .unwrap();
    assert_eq!(next_message(&mut subs[0]).await.as_ref(), b"after");
    assert_eq!(next_message(&mut subs[1]).await.as_ref(), b"after");
    silent(&mut subs[2], Duration::from_millis(200)).await;
    b.publish("outage", Bytes::from(vec![5u8; 50_000]))
        .await
        .unwrap();
    assert_eq!(next_message(&mut subs[0]).await.len(), 50_000);
    eprintln!(
        "listener back {back:?} after a 20 s cut; longest call during the outage {longest:?} \
         (op_timeout 1 s)"
    );
}

/// The listener comes back after its backend is terminated with `pg_terminate_backend`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_comes_back_after_pg_terminate_backend() {
    let recorded = bgtask_conformance::recorded::Recorded::install();
    let reconnects = || recorded.value(BROKER_RECONNECTS, &[("backend", "postgres")]);
    let schema = TestSchema::new();
    let config = schema
        .config()
        .with_op_timeout(Duration::from_secs(1))
        .with_liveness_interval(Duration::from_secs(1))
        .with_max_backoff(Duration::from_secs(1));
    let b = connect(config).await;
    let direct = schema.broker().await;
    let mut sub = b.subscribe("terminated").await.unwrap();
    for round in 0..3 {
        let pid = listener_pid(&b).await.expect("listener connection");
        let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .fetch_one(&mut raw().await)
            .await
            .unwrap();
        assert!(terminated);
        let killed = Instant::now();
        let longest = calls_stay_bounded(&b, "terminated", Duration::from_millis(300)).await;
        assert_eq!(
            timeout(Duration::from_secs(10), sub.next()).await.unwrap(),
            Some(Incoming::Gap),
            "round {round}"
        );
        let back = killed.elapsed();
        direct
            .publish("terminated", Bytes::from(format!("after{round}")))
            .await
            .unwrap();
        assert_eq!(
            next_message(&mut sub).await,
            Bytes::from(format!("after{round}"))
        );
        let new_pid = listener_pid(&b).await.expect("a new listener connection");
        assert_ne!(new_pid, pid);
        assert_eq!(reconnects(), f64::from(round + 1), "counted in the metrics");
        eprintln!(
            "round {round}: listener pid {pid} terminated, back as pid {new_pid} within {back:?}; \
             longest call meanwhile {longest:?}"
        );
    }
}

/// A half-open listener connection (a black hole: nothing flows, nothing is reset) is found by
/// the liveness round trip and replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_listener_is_detected() {
    let schema = TestSchema::new();
    let proxy = FaultProxy::start(server_addr()).await.unwrap();
    let b = connect(schema.fault_config(proxy.addr())).await;
    let direct = schema.broker().await;
    let mut sub = b.subscribe("bh").await.unwrap();
    proxy.black_hole();
    sleep(Duration::from_secs(4)).await;
    direct
        .publish("bh", Bytes::from_static(b"lost"))
        .await
        .unwrap();
    proxy.pass();
    let restored = Instant::now();
    assert_eq!(
        timeout(Duration::from_secs(10), sub.next()).await.unwrap(),
        Some(Incoming::Gap)
    );
    direct
        .publish("bh", Bytes::from_static(b"after"))
        .await
        .unwrap();
    assert_eq!(next_message(&mut sub).await.as_ref(), b"after");
    eprintln!(
        "listener back {:?} after a 4 s black hole",
        restored.elapsed()
    );
}

/// Connection resets (which sqlx's `try_recv` returns as errors instead of reconnecting) never
/// end the listener: five in a row, each followed by a gap and delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_survives_repeated_resets() {
    let schema = TestSchema::new();
    let proxy = FaultProxy::start(server_addr()).await.unwrap();
    let b = connect(schema.fault_config(proxy.addr())).await;
    let direct = schema.broker().await;
    let mut sub = b.subscribe("resets").await.unwrap();
    for round in 0..5 {
        proxy.cut();
        sleep(Duration::from_millis(300 + 200 * round)).await;
        proxy.pass();
        assert_eq!(
            timeout(Duration::from_secs(10), sub.next()).await.unwrap(),
            Some(Incoming::Gap),
            "round {round}"
        );
        let msg = Bytes::from(format!("r{round}"));
        direct.publish("resets", msg.clone()).await.unwrap();
        assert_eq!(next_message(&mut sub).await, msg);
    }
    // The raw connection setting is untouched.
    let mut conn = raw().await;
    conn.execute("SELECT 1").await.unwrap();
}
