//! `rediss://` against a TLS-enabled Redis named by `BGTASK_REDIS_TLS_URL`
//! (e.g. `rediss://:password@localhost:6380`). Ignored by default, since the shared test server
//! speaks plain TCP; run with `cargo test -p bgtask-redis --test tls -- --ignored`, with
//! `SSL_CERT_FILE` pointing at the server's CA when it is not a public one.
#![cfg(feature = "tls")]

use std::time::Duration;

use bgtask_core::{Broker, ErrorKind, Incoming, LeaseRequest, Published};
use bgtask_redis::RedisBroker;
use bytes::Bytes;
use futures::StreamExt;

fn tls_url() -> String {
    std::env::var("BGTASK_REDIS_TLS_URL").unwrap_or_else(|_| {
        panic!(
            "set BGTASK_REDIS_TLS_URL to a TLS Redis, e.g. rediss://:password@localhost:6380 \
             (start one with redis-server --port 0 --tls-port 6380 --tls-cert-file ... \
             --tls-key-file ... --tls-ca-cert-file ... --tls-auth-clients no)"
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a TLS Redis in BGTASK_REDIS_TLS_URL"]
async fn tls_round_trip() {
    let b = RedisBroker::connect(&tls_url())
        .await
        .expect("connect over TLS");
    let ch = format!("bgtask-redis-test:{}:tls", bgtask_core::names::random_id());
    let mut sub = b.subscribe(&ch).await.unwrap();
    assert_eq!(
        b.publish(&ch, Bytes::from_static(b"secure")).await.unwrap(),
        Published::Receivers(1)
    );
    let got = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .unwrap();
    assert_eq!(got, Some(Incoming::Message(Bytes::from_static(b"secure"))));
    let acquired = b
        .acquire(&ch, LeaseRequest::new(Duration::from_secs(5)).cap(1))
        .await
        .unwrap();
    assert!(acquired.lease.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a TLS Redis in BGTASK_REDIS_TLS_URL"]
async fn tls_wrong_password_is_an_auth_error() {
    let mut url = url::Url::parse(&tls_url()).unwrap();
    url.set_password(Some("not-the-tls-password")).unwrap();
    let err = RedisBroker::connect(url.as_str()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
    assert!(!format!("{err:?}").contains("not-the-tls-password"));
}
