//! The supervisor against a fake transport whose connection the test cuts and refuses at will.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;

use super::*;
use crate::broker::Incoming;

/// What the fake server knows: its one connection and what that connection subscribed.
#[derive(Default)]
struct Server {
    /// The current connection's inbox: a message, or why the connection broke.
    conn: Option<mpsc::UnboundedSender<std::result::Result<(String, Bytes), String>>>,
    subscribed: HashSet<String>,
    /// Refuses connections.
    down: bool,
    connects: usize,
}

#[derive(Clone, Default)]
struct Fake {
    server: Arc<Mutex<Server>>,
    lost: Arc<AtomicUsize>,
}

impl Fake {
    fn server(&self) -> std::sync::MutexGuard<'_, Server> {
        self.server.lock().unwrap()
    }

    /// Publish on `key`: delivered when the current connection subscribes it.
    fn publish(&self, key: &str, payload: &'static [u8]) {
        let server = self.server();
        if server.subscribed.contains(key) {
            let conn = server.conn.as_ref().unwrap();
            let _ = conn.send(Ok((key.to_owned(), Bytes::from_static(payload))));
        }
    }

    /// Break the current connection; with `down`, refuse new ones until [`Fake::up`].
    fn cut(&self, down: bool) {
        let mut server = self.server();
        server.down = down;
        server.subscribed.clear();
        if let Some(conn) = server.conn.take() {
            let _ = conn.send(Err("cut".to_owned()));
        }
    }

    fn up(&self) {
        self.server().down = false;
    }

    fn subscribed(&self, key: &str) -> bool {
        self.server().subscribed.contains(key)
    }

    /// Wait (a bounded time) until `key` is subscribed or not.
    async fn until_subscribed(&self, key: &str, subscribed: bool) {
        for _ in 0..200 {
            if self.subscribed(key) == subscribed {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{key} never became subscribed = {subscribed}");
    }
}

struct FakeConnection {
    inbox: mpsc::UnboundedReceiver<std::result::Result<(String, Bytes), String>>,
    server: Arc<Mutex<Server>>,
}

impl Transport for Fake {
    type Connection = FakeConnection;
    type Message = (String, Bytes);
    type Item = Incoming;

    const NAME: &'static str = "fake";
    const CONNECTION: &'static str = "fake connection";
    const ROUND_TRIP_WHEN_SUBSCRIBED: bool = false;

    async fn connect(&self) -> Result<FakeConnection> {
        let mut server = self.server();
        if server.down {
            return Err(Error::new(ErrorKind::Unavailable, "fake server is down"));
        }
        let (tx, inbox) = mpsc::unbounded_channel();
        server.conn = Some(tx);
        server.subscribed.clear();
        server.connects += 1;
        Ok(FakeConnection {
            inbox,
            server: self.server.clone(),
        })
    }

    fn dispatch(
        &self,
        (key, payload): (String, Bytes),
        subscribers: &mut Subscribers<'_, Incoming>,
    ) {
        subscribers.deliver(&key, |_| Some(Incoming::Message(payload.clone())));
    }

    fn gap() -> Incoming {
        Incoming::Gap
    }

    fn lost(&self) {
        self.lost.fetch_add(1, Ordering::SeqCst);
    }
}

impl Connection for FakeConnection {
    type Message = (String, Bytes);

    async fn recv(&mut self) -> std::result::Result<(String, Bytes), String> {
        self.inbox
            .recv()
            .await
            .unwrap_or_else(|| Err("closed".to_owned()))
    }

    async fn subscribe(&mut self, key: &str, _: bool) -> std::result::Result<(), Failure> {
        if key == "refused" {
            return Err(Failure::Refused(Error::new(ErrorKind::Auth, "no")));
        }
        self.server
            .lock()
            .unwrap()
            .subscribed
            .insert(key.to_owned());
        Ok(())
    }

    async fn subscribe_all(&mut self, keys: &[String]) -> std::result::Result<(), String> {
        let mut server = self.server.lock().unwrap();
        server.subscribed.extend(keys.iter().cloned());
        Ok(())
    }

    async fn unsubscribe(&mut self, key: &str) -> std::result::Result<(), Failure> {
        self.server.lock().unwrap().subscribed.remove(key);
        Ok(())
    }

    async fn ping(&mut self) -> std::result::Result<(), String> {
        Ok(())
    }

    fn buffered(&mut self) -> Option<(String, Bytes)> {
        None
    }
}

fn settings() -> ConnectionSettings {
    ConnectionSettings {
        op_timeout: Duration::from_secs(2),
        max_backoff: Duration::from_millis(50),
        ..ConnectionSettings::default()
    }
}

async fn next(sub: &mut Subscribed<Incoming>) -> Incoming {
    tokio::time::timeout(Duration::from_secs(2), sub.next())
        .await
        .expect("an item in time")
        .expect("the stream goes on")
}

#[tokio::test]
async fn a_lost_connection_is_replaced_and_its_subscribers_get_one_gap_after_resubscribing() {
    let fake = Fake::default();
    let handle = Supervisor::start(fake.clone(), &settings()).await.unwrap();
    let mut sub = handle.subscribe("a".into(), "a").await.unwrap();
    assert!(fake.subscribed("a"), "subscribed when subscribe returned");
    fake.publish("a", b"1");
    assert_eq!(
        next(&mut sub).await,
        Incoming::Message(Bytes::from_static(b"1"))
    );

    fake.cut(true);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(fake.lost.load(Ordering::SeqCst), 1);
    // No gap before the key is subscribed again: what follows the gap must arrive.
    let early = tokio::time::timeout(Duration::from_millis(50), sub.next()).await;
    assert!(
        early.is_err(),
        "nothing while the server is down: {early:?}"
    );

    fake.up();
    fake.until_subscribed("a", true).await;
    assert_eq!(next(&mut sub).await, Incoming::Gap);
    fake.publish("a", b"2");
    assert_eq!(
        next(&mut sub).await,
        Incoming::Message(Bytes::from_static(b"2"))
    );
    assert!(fake.server().connects >= 2);
}

#[tokio::test]
async fn subscribers_share_a_key_that_the_last_one_releases_and_close_ends_them() {
    let fake = Fake::default();
    let handle = Supervisor::start(fake.clone(), &settings()).await.unwrap();
    let first = handle.subscribe("k".into(), "k").await.unwrap();
    let mut second = handle.subscribe("k".into(), "k").await.unwrap();
    assert_eq!(handle.channels(), 1);
    drop(first);
    fake.publish("k", b"m");
    assert_eq!(
        next(&mut second).await,
        Incoming::Message(Bytes::from_static(b"m"))
    );
    drop(second);
    fake.until_subscribed("k", false).await;
    assert_eq!(handle.channels(), 0);

    let refused = handle
        .subscribe("refused".into(), "refused")
        .await
        .unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Auth, "the transport's refusal");

    let mut live = handle.subscribe("k".into(), "k").await.unwrap();
    handle.close();
    let end = tokio::time::timeout(Duration::from_secs(2), live.next()).await;
    assert_eq!(end.expect("ends in time"), None, "close ends every stream");
    let closed = handle.subscribe("k".into(), "k").await.unwrap_err();
    assert_eq!(closed.kind(), ErrorKind::Closed);
}
