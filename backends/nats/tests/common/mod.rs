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

/// Connecting with `config` is a `Config` error whose message contains each of `parts`.
pub async fn assert_config_error(config: NatsConfig, parts: &[&str]) {
    let err = NatsBroker::connect_with(config).await.unwrap_err();
    assert_eq!(err.kind(), bgtask_core::ErrorKind::Config, "{err}");
    let shown = err.to_string();
    for part in parts {
        assert!(shown.contains(part), "{part:?} missing from: {shown}");
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

/// The environment variable naming the test cluster (several URLs, comma-separated).
pub const CLUSTER_URL_VAR: &str = "BGTASK_NATS_CLUSTER_URL";

/// How to get a cluster for the tests.
pub const HOW_TO_START_CLUSTER: &str = "start a local 3-node cluster and point the tests at it: \
     `export BGTASK_NATS_CLUSTER_URL=$(scripts/nats-cluster up)` (scripts/test does this)";

/// The URL of the test cluster; panics with instructions when `BGTASK_NATS_CLUSTER_URL` is not
/// set (there is no default: a cluster test never runs against a single server by mistake).
pub fn cluster_url() -> String {
    match std::env::var(CLUSTER_URL_VAR) {
        Ok(url) if !url.trim().is_empty() => url,
        _ => panic!("{CLUSTER_URL_VAR} is not set: {HOW_TO_START_CLUSTER}"),
    }
}

/// A broker with `config` on the test cluster; panics with instructions when it is unreachable.
pub async fn connect_cluster(config: NatsConfig) -> NatsBroker {
    let shown = config.redacted_url();
    match NatsBroker::connect_with(config).await {
        Ok(broker) => broker,
        Err(e) => {
            panic!("cannot reach the test NATS cluster at {shown}: {e}\n{HOW_TO_START_CLUSTER}")
        }
    }
}

/// A broker on the test cluster, with the default settings.
pub async fn cluster_broker() -> NatsBroker {
    connect_cluster(NatsConfig::new(cluster_url())).await
}

/// A 3-node cluster of its own for one test (faults kill and stop its nodes), started by
/// `scripts/nats-cluster` in a directory of its own; brought down when dropped.
pub struct PrivateCluster {
    dir: PathBuf,
    /// `nats://127.0.0.1:p1,nats://127.0.0.1:p2,nats://127.0.0.1:p3`.
    pub url: String,
}

impl PrivateCluster {
    fn script() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/nats-cluster")
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new(Self::script())
            .args(args)
            .env("BGTASK_NATS_CLUSTER_DIR", &self.dir)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run scripts/nats-cluster: {e}"));
        assert!(
            out.status.success(),
            "scripts/nats-cluster {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Start one (`scripts/nats-cluster up`); panics with the script's message when it fails.
    pub fn start() -> PrivateCluster {
        let dir = std::env::temp_dir().join(format!(
            "bgtask-nats-cluster-test-{}",
            &bgtask_core::names::random_id()[..12]
        ));
        let mut cluster = PrivateCluster {
            dir,
            url: String::new(),
        };
        cluster.url = cluster.run(&["up"]);
        cluster
    }

    /// The client URL of node `n` (1 to 3) alone.
    pub fn node_url(&self, n: usize) -> String {
        self.url
            .split(',')
            .nth(n - 1)
            .expect("node 1 to 3")
            .to_owned()
    }

    /// `kill -9` node `n`.
    pub fn kill(&self, n: usize) {
        self.run(&["kill", &n.to_string()]);
    }

    /// SIGSTOP node `n`.
    pub fn stop(&self, n: usize) {
        self.run(&["stop", &n.to_string()]);
    }

    /// SIGCONT node `n`.
    pub fn cont(&self, n: usize) {
        self.run(&["cont", &n.to_string()]);
    }

    /// Start node `n` again (after a kill) and wait until it is back in the cluster.
    pub fn restart(&self, n: usize) {
        self.run(&["restart", &n.to_string()]);
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let _ = Command::new(Self::script())
            .arg("down")
            .env("BGTASK_NATS_CLUSTER_DIR", &self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
