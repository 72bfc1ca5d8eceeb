//! Helpers shared by the integration tests: the test server, brokers, private servers.
#![allow(dead_code, unreachable_pub)]

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bgtask_nats::{NatsBroker, NatsConfig};

/// The environment variable naming the test server.
pub const URL_VAR: &str = "BGTASK_NATS_URL";
/// The test server when the variable is not set.
pub const DEFAULT_URL: &str = "nats://127.0.0.1:4222";

/// How to get a server for the tests.
pub const HOW_TO_START: &str = "start NATS with JetStream: `docker compose up -d nats`, or \
     `nats-server -js -p 4222`, or point BGTASK_NATS_URL at a server";

/// The URL of the test server.
pub fn url() -> String {
    std::env::var(URL_VAR).unwrap_or_else(|_| DEFAULT_URL.to_owned())
}

/// A broker on the test server; panics with instructions when the server is unreachable.
pub async fn broker() -> NatsBroker {
    connect(NatsConfig::new(url())).await
}

/// A broker with `config`; panics with instructions when the server is unreachable.
pub async fn connect(config: NatsConfig) -> NatsBroker {
    let shown = config.redacted_url();
    match NatsBroker::connect_with(config).await {
        Ok(broker) => broker,
        Err(e) => panic!("cannot reach the test NATS at {shown}: {e}\n{HOW_TO_START}"),
    }
}

/// The test server's TCP address.
pub fn server_addr() -> SocketAddr {
    bgtask_conformance::servers::server_addr(&url(), URL_VAR, 4222)
}

/// The test server's URL with its host and port replaced by `addr`: how a broker reaches the
/// server through a fault proxy.
pub fn url_via(addr: SocketAddr) -> String {
    bgtask_conformance::servers::url_via(&url(), addr)
}

/// Short bounds so outages are noticed quickly: ~1 s timeouts, pings and backoff.
pub fn short(config: NatsConfig) -> NatsConfig {
    config
        .with_op_timeout(Duration::from_secs(1))
        .with_connect_timeout(Duration::from_secs(1))
        .with_liveness_interval(Duration::from_secs(1))
        .with_max_backoff(Duration::from_secs(1))
}

/// Settings for brokers behind a fault proxy.
pub fn fault_config(addr: SocketAddr) -> NatsConfig {
    short(NatsConfig::new(url_via(addr)))
}

/// A name unique to one test, so tests never see each other's channels and keys.
pub fn prefix() -> String {
    format!("bgtask-nats-test:{}", bgtask_core::names::random_id())
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// A `nats-server` started for one test, with JetStream and a store directory of its own;
/// killed (and its directory removed) when dropped.
pub struct PrivateServer {
    child: Child,
    pub port: u16,
    pub dir: PathBuf,
    scheme: &'static str,
}

impl PrivateServer {
    /// Start `nats-server -js` on a free port with the extra `args`.
    pub fn start(args: &[&str]) -> PrivateServer {
        let dir = std::env::temp_dir().join(format!(
            "bgtask-nats-test-{}",
            bgtask_core::names::random_id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self::start_in(dir, free_port(), args)
    }

    /// Start it on `port` with the store in `dir` (to restart a server on its old state).
    pub fn start_in(dir: PathBuf, port: u16, args: &[&str]) -> PrivateServer {
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir.join("store"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start nats-server (is it on PATH?): {e}"));
        let scheme = if args.contains(&"--tls") {
            "tls"
        } else {
            "nats"
        };
        let server = PrivateServer {
            child,
            port,
            dir,
            scheme,
        };
        server.wait_until_listening();
        server
    }

    fn wait_until_listening(&self) {
        for _ in 0..200 {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!(
            "the private nats-server did not start on port {}",
            self.port
        );
    }

    /// `nats://127.0.0.1:<port>` (or `tls://`), with `userinfo@` when given.
    pub fn url(&self, userinfo: Option<&str>) -> String {
        match userinfo {
            Some(userinfo) => format!("{}://{userinfo}@127.0.0.1:{}", self.scheme, self.port),
            None => format!("{}://127.0.0.1:{}", self.scheme, self.port),
        }
    }

    /// Stop the server, keeping its store directory.
    pub fn stop(mut self) -> (PathBuf, u16) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let dir = std::mem::take(&mut self.dir);
        (dir, self.port)
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if self.dir != Path::new("") {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
