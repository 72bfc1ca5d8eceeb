//! Tests that need a PostgreSQL of their own, because the shared test server trusts every
//! connection: a throwaway server with password authentication (`scram-sha-256`), started
//! with `initdb` and `pg_ctl` from `BGTASK_POSTGRES_BIN` (default: the newest
//! `/usr/lib/postgresql/*/bin`, else `PATH`) on a free port, as user `postgres` when run as
//! root. A missing binary fails the test with a message; it never passes silently.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use bgtask_core::{Broker, ErrorKind, LeaseRequest};
use bgtask_postgres::{PostgresBroker, PostgresConfig};
use bytes::Bytes;
use futures::StreamExt;
use tokio::time::Instant;

const PASSWORD: &str = "correct-horse-7c1e";

/// A private `postgres` server, stopped and deleted when dropped.
struct PrivateServer {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    as_root: bool,
}

fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("BGTASK_POSTGRES_BIN") {
        return PathBuf::from(dir);
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .filter(|p| p.join("initdb").exists())
                .collect()
        })
        .unwrap_or_default();
    dirs.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    dirs.pop().unwrap_or_default()
}

impl PrivateServer {
    fn start() -> PrivateServer {
        let bin = bin_dir();
        let initdb = if bin.as_os_str().is_empty() {
            PathBuf::from("initdb")
        } else {
            bin.join("initdb")
        };
        let as_root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let dir = std::env::temp_dir().join(format!(
            "bgtask-pg-{}",
            &bgtask_core::names::random_id()[..12]
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let pwfile = dir.join("pw");
        std::fs::write(&pwfile, PASSWORD).unwrap();
        let server = PrivateServer {
            bin,
            dir: dir.clone(),
            port,
            as_root,
        };
        if as_root {
            let status = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(&dir)
                .status()
                .unwrap();
            assert!(status.success(), "chown the private server's directory");
        }
        let data = dir.join("data");
        let status = server
            .command(&initdb)
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=scram-sha-256", "--no-sync"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {} (install PostgreSQL's server binaries or set \
                     BGTASK_POSTGRES_BIN): {e}",
                    initdb.display()
                )
            });
        assert!(status.success(), "initdb failed");
        let status = server
            .command(&server.tool("pg_ctl"))
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(dir.join("log"))
            .arg("-o")
            .arg(format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
                dir.display()
            ))
            .args(["-w", "start"])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "pg_ctl start failed");
        server
    }

    fn tool(&self, name: &str) -> PathBuf {
        if self.bin.as_os_str().is_empty() {
            PathBuf::from(name)
        } else {
            self.bin.join(name)
        }
    }

    fn command(&self, program: &Path) -> Command {
        if self.as_root {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(program);
            command
        } else {
            Command::new(program)
        }
    }

    fn url(&self, password: &str) -> String {
        format!(
            "postgres://postgres:{password}@127.0.0.1:{}/postgres",
            self.port
        )
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        let _ = self
            .command(&self.tool("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A wrong password is an `Auth` error at once, and neither password shows in it; the right
/// one works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_an_auth_error_and_never_shown() {
    let server = tokio::task::spawn_blocking(PrivateServer::start)
        .await
        .unwrap();
    let wrong = "definitely-not-the-password-7c1e";
    let started = Instant::now();
    let err = PostgresBroker::connect(&server.url(wrong))
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    for shown in [format!("{err}"), format!("{err:?}")] {
        assert!(
            !shown.contains("definitely-not"),
            "password leaked: {shown}"
        );
    }
    eprintln!("wrong password: {err} (after {took:?})");

    let config = PostgresConfig::new(server.url(PASSWORD)).with_schema("private");
    let shown = format!("{config:?}");
    assert!(!shown.contains(PASSWORD), "{shown}");
    let broker = PostgresBroker::connect_with(config).await.unwrap();
    assert!(!format!("{broker:?}").contains(PASSWORD));
    let mut sub = broker.subscribe("ch").await.unwrap();
    broker
        .publish("ch", Bytes::from(vec![3u8; 9000]))
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(got, bgtask_core::Incoming::Message(m) if m.len() == 9000));
    assert!(broker
        .acquire("k", LeaseRequest::new(Duration::from_secs(5)).cap(1))
        .await
        .unwrap()
        .lease
        .is_some());
    broker.close();
    drop(sub);
    drop(broker);
    // The password also never reaches a refused connection's error.
    drop(server);
    let err = PostgresBroker::connect(&format!(
        "postgres://postgres:{PASSWORD}@127.0.0.1:1/postgres"
    ))
    .await
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(!format!("{err:?}").contains(PASSWORD));
}
