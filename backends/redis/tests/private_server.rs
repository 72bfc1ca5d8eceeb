//! Tests that need a Redis of their own, started by the test on a free loopback port from the
//! local `redis-server` binary (which must be on `PATH`; `apt-get install redis-server`):
//! scripts flushed, a server restart, passwords, ACL users and TLS with certificates generated
//! here (by the `openssl` command). The shared test server is never touched.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bgtask_core::metrics::BROKER_RECONNECTS as RECONNECTS;
use bgtask_core::{Broker, ErrorKind, Incoming, LeaseRequest, Published};
use bgtask_redis::RedisBroker;
use bgtask_redis::RedisConfig;
use bytes::Bytes;
use futures::StreamExt;

/// A `redis-server` started for one test, killed when dropped.
struct PrivateServer {
    child: Child,
    port: u16,
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

impl PrivateServer {
    fn start() -> PrivateServer {
        Self::start_on(free_port())
    }

    fn start_on(port: u16) -> PrivateServer {
        Self::start_with(port, &["--port".into(), port.to_string()])
    }

    /// Start with `args` (which set the port); wait until `port` accepts connections.
    fn start_with(port: u16, args: &[String]) -> PrivateServer {
        let child = Command::new("redis-server")
            .args(args)
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start redis-server (install it: apt-get install redis-server): {e}")
            });
        let server = PrivateServer { child, port };
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the private redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn broker(&self) -> RedisBroker {
        RedisBroker::connect(&self.url())
            .await
            .expect("connect to the private server")
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Publish, subscribe and a lease work on `broker`.
async fn round_trip(broker: &RedisBroker) {
    let mut sub = broker.subscribe("ch").await.unwrap();
    assert_eq!(
        broker
            .publish("ch", Bytes::from_static(b"hi"))
            .await
            .unwrap(),
        Published::Receivers(1)
    );
    let got = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .unwrap();
    assert_eq!(got, Some(Incoming::Message(Bytes::from_static(b"hi"))));
    let acquired = broker
        .acquire("k", LeaseRequest::new(Duration::from_secs(5)).cap(1))
        .await
        .unwrap();
    assert!(acquired.lease.is_some());
}

/// Connecting to `url` fails with `Auth`, quickly, and `secret` appears nowhere in the error.
async fn refused(url: &str, secret: &str) {
    let started = Instant::now();
    let err = RedisBroker::connect(url).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    assert!(!format!("{err} {err:?}").contains(secret), "{err:?}");
}

/// A password (`requirepass`): the right one works; a wrong or missing one is `Auth` at
/// connect, and never shows in errors or `Debug`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_auth() {
    let port = free_port();
    let server = PrivateServer::start_with(
        port,
        &[
            "--port".into(),
            port.to_string(),
            "--requirepass".into(),
            "s3cret-pw".into(),
        ],
    );
    let base = format!("127.0.0.1:{}", server.port);
    let broker = RedisBroker::connect(&format!("redis://:s3cret-pw@{base}"))
        .await
        .unwrap();
    round_trip(&broker).await;
    assert!(!format!("{broker:?}").contains("s3cret-pw"));
    refused(&format!("redis://:wrong-pw-123@{base}"), "wrong-pw-123").await;
    refused(&format!("redis://{base}"), "s3cret-pw").await;
}

/// An ACL user: its password works; a wrong one is `Auth`; a command the user may not run is
/// `Auth` too, not a hang or a protocol error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_users() {
    let port = free_port();
    let server = PrivateServer::start_with(
        port,
        &[
            "--port".into(),
            port.to_string(),
            "--user".into(),
            "default".into(),
            "off".into(),
            "--user".into(),
            "alice".into(),
            "on".into(),
            ">wonderland-pw".into(),
            "~*".into(),
            "&*".into(),
            "+@all".into(),
            "--user".into(),
            "bob".into(),
            "on".into(),
            ">builder-pw".into(),
            "~*".into(),
            "&*".into(),
            "+@all".into(),
            "-publish".into(),
        ],
    );
    let base = format!("127.0.0.1:{}", server.port);
    let alice = RedisBroker::connect(&format!("redis://alice:wonderland-pw@{base}"))
        .await
        .unwrap();
    round_trip(&alice).await;
    refused(&format!("redis://alice:not-her-pw@{base}"), "not-her-pw").await;
    let bob = RedisBroker::connect(&format!("redis://bob:builder-pw@{base}"))
        .await
        .unwrap();
    let err = bob
        .publish("ch", Bytes::from_static(b"x"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
}

/// A CA and a server certificate for `localhost`/127.0.0.1, made once per test run with the
/// `openssl` command; the process trusts the CA through `SSL_CERT_FILE`.
fn certificates() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("bgtask-redis-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let openssl = |args: &[&str]| {
            let status = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .unwrap_or_else(|e| panic!("cannot run openssl (apt-get install openssl): {e}"));
            assert!(status.success(), "openssl {args:?} failed");
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        openssl(
            &[
                &["req", "-x509"][..],
                &ec[..],
                &[
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.crt",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=bgtask test CA",
                ][..],
            ]
            .concat(),
        );
        openssl(
            &[
                &["req"][..],
                &ec[..],
                &[
                    "-keyout",
                    "server.key",
                    "-out",
                    "server.csr",
                    "-subj",
                    "/CN=localhost",
                ][..],
            ]
            .concat(),
        );
        std::fs::write(
            dir.join("ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "ext",
        ]);
        std::env::set_var("SSL_CERT_FILE", dir.join("ca.crt"));
        dir
    })
}

/// `rediss://` with a password against a TLS-only server whose certificate was made here.
#[cfg(feature = "tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_password() {
    let certs = certificates();
    let port = free_port();
    let file = |name: &str| certs.join(name).display().to_string();
    let server = PrivateServer::start_with(
        port,
        &[
            "--port".into(),
            "0".into(),
            "--tls-port".into(),
            port.to_string(),
            "--tls-cert-file".into(),
            file("server.crt"),
            "--tls-key-file".into(),
            file("server.key"),
            "--tls-ca-cert-file".into(),
            file("ca.crt"),
            "--tls-auth-clients".into(),
            "no".into(),
            "--requirepass".into(),
            "tls-pw".into(),
        ],
    );
    let broker = RedisBroker::connect(&format!("rediss://:tls-pw@localhost:{}", server.port))
        .await
        .expect("connect over TLS");
    round_trip(&broker).await;
    refused(
        &format!("rediss://:wrong-tls-pw@localhost:{}", server.port),
        "wrong-tls-pw",
    )
    .await;
    // Plain TCP to a TLS port is not a hang: it fails within the connect timeout.
    let started = Instant::now();
    let plain = RedisConfig::new(format!("redis://:tls-pw@127.0.0.1:{}", server.port))
        .with_connect_timeout(Duration::from_secs(1))
        .with_op_timeout(Duration::from_secs(1));
    assert!(RedisBroker::connect_with(plain).await.is_err());
    assert!(started.elapsed() < Duration::from_secs(4));
}

/// After the server forgets its scripts (as after a restart), leases keep working:
/// `redis::Script` reloads the script on `NOSCRIPT`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_script_survives_script_flush() {
    let server = PrivateServer::start();
    let broker = server.broker().await;
    let request = || LeaseRequest::new(Duration::from_secs(10)).cap(2);
    assert!(broker
        .acquire("k", request())
        .await
        .unwrap()
        .lease
        .is_some());
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    let acquired = broker.acquire("k", request()).await.unwrap();
    assert!(acquired.lease.is_some());
    assert_eq!(acquired.live, 2);
    assert_eq!(broker.count("k").await.unwrap(), 2);
}

/// A server restart (all state lost, scripts included) looks like an outage: subscriptions come
/// back with a gap, leases work again, and the reconnects are counted in the metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_is_survived() {
    let recorded = bgtask_conformance::recorded::Recorded::install();
    let reconnects = || recorded.value(RECONNECTS, &[("backend", "redis")]);
    let server = PrivateServer::start();
    let port = server.port;
    let config = RedisConfig::new(server.url())
        .with_op_timeout(Duration::from_secs(1))
        .with_liveness_interval(Duration::from_secs(1))
        .with_max_backoff(Duration::from_millis(500));
    let broker = RedisBroker::connect_with(config).await.unwrap();
    let mut sub = broker.subscribe("ch").await.unwrap();
    broker
        .acquire("k", LeaseRequest::new(Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(reconnects(), 0.0, "first connections are not reconnects");
    drop(server);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _restarted = PrivateServer::start_on(port);
    let next = tokio::time::timeout(Duration::from_secs(10), sub.next()).await;
    assert_eq!(next.unwrap(), Some(Incoming::Gap));
    assert_eq!(
        broker
            .publish("ch", Bytes::from_static(b"back"))
            .await
            .unwrap(),
        Published::Receivers(1)
    );
    let next = tokio::time::timeout(Duration::from_secs(5), sub.next()).await;
    assert_eq!(
        next.unwrap(),
        Some(Incoming::Message(Bytes::from_static(b"back")))
    );
    // The restarted server has no leases and no script; both come back.
    assert_eq!(broker.count("k").await.unwrap(), 0);
    let acquired = broker
        .acquire("k", LeaseRequest::new(Duration::from_secs(5)).cap(1))
        .await
        .unwrap();
    assert!(acquired.lease.is_some());
    // The pub/sub connection and the command connection each came back once.
    assert_eq!(reconnects(), 2.0);
}
