//! Crashes, with real processes and SIGKILL, on every networked backend (Redis, NATS,
//! PostgreSQL; URLs from BGTASK_REDIS_URL, BGTASK_NATS_URL, BGTASK_POSTGRES_URL):
//!
//! - a worker process killed mid-task: its program dies with it (within 2 s), the creator gets
//!   a timeout (exit 3) and the key's capacity comes back;
//! - a creator process killed with a task in flight, 20 times: the key's capacity comes back
//!   within the lease TTL and nothing accumulates.
//!
//! A server that does not answer fails the test with a message saying how to start it.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_bgtask");

/// The worker's program: announces the task with its pid, then sleeps far past any deadline.
const SLEEPER: &str =
    r#"cat > /dev/null; echo $$ > "$BGTASK_TEST_DIR/started.$BGTASK_TASK_ID"; exec sleep 30"#;

fn redis() -> String {
    common::require_redis()
}

fn nats() -> String {
    common::require_server("BGTASK_NATS_URL", "nats://127.0.0.1:4222", 4222)
}

fn postgres() -> String {
    common::require_server(
        "BGTASK_POSTGRES_URL",
        "postgres://postgres@127.0.0.1:5432/test",
        5432,
    )
}

/// A scratch directory with a config naming `broker` and a fresh namespace.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(broker: &str) -> Scratch {
        let namespace = format!("crash-{}", &random_hex()[16..]);
        let dir = std::env::temp_dir().join(&namespace);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("sleeper.sh"), SLEEPER).unwrap();
        std::fs::write(
            dir.join("bgtask.toml"),
            format!(
                "broker_url = {broker:?}\nnamespace = {namespace:?}\n\
                 [client]\ntask_key = \"user\"\nper_key_limit = 25\nlease_margin_ms = 1000\n"
            ),
        )
        .unwrap();
        Scratch { dir }
    }

    /// `bgtask submit` of one task of "job" for key value u1, with `timeout`.
    fn submit(&self, timeout: &str) -> Command {
        self.command(&[
            "submit",
            "--task",
            "job",
            "--timeout",
            timeout,
            r#"{"user":"u1"}"#,
        ])
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(BIN);
        command
            .arg("--config")
            .arg(self.dir.join("bgtask.toml"))
            .args(args)
            .current_dir(&self.dir)
            .env("BGTASK_TEST_DIR", &self.dir)
            .env_remove("BGTASK_BROKER_URL")
            .env_remove("BGTASK_NAMESPACE")
            .env_remove("BGTASK_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        command
    }

    /// A `bgtask worker` running the sleeper, ready to serve.
    fn worker(&self) -> Child {
        let script = self.dir.join("sleeper.sh").display().to_string();
        let mut child = self
            .command(&["worker", "--task", "job", "-c", "32", "--", "sh", &script])
            .stderr(Stdio::piped())
            .spawn()
            .expect("start bgtask worker");
        let stderr = child.stderr.take().unwrap();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if line.contains("; ready") {
                    let _ = ready_tx.send(());
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the worker did not get ready");
        child
    }

    /// Tasks started by the worker so far.
    fn started(&self) -> usize {
        std::fs::read_dir(&self.dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("started."))
            })
            .count()
    }

    /// Live leases of key value `u1`, read with `bgtask inspect --json`.
    fn in_flight(&self) -> u64 {
        let output = self
            .command(&["inspect", "--task", "job", "--key", "u1", "--json"])
            .stdout(Stdio::piped())
            .output()
            .expect("run bgtask inspect");
        assert!(output.status.success(), "bgtask inspect failed");
        let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        json["in_flight"][0]["count"].as_u64().unwrap()
    }

    fn wait_started(&self, count: usize) {
        let started = Instant::now();
        while self.started() < count {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the task never started"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn random_hex() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{:032x}", nanos ^ (u128::from(std::process::id()) << 64))
}

fn kill9(child: &mut Child) {
    child.kill().expect("SIGKILL");
    let _ = child.wait();
}

/// The pids of the sleepers the worker started.
fn sleepers(scratch: &Scratch) -> Vec<String> {
    std::fs::read_dir(&scratch.dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("started."))
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .map(|pid| pid.trim().to_owned())
        .collect()
}

/// Whether process `pid` runs (a zombie, dead but not reaped yet, does not).
fn running(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

/// Kill the sleepers still running (so a failed assertion leaves nothing behind).
fn reap_sleepers(scratch: &Scratch) {
    for pid in sleepers(scratch) {
        let _ = Command::new("kill").args(["-9", &pid]).status();
    }
}

/// A SIGKILLed worker's programs die with it: none of its sleepers runs 2 s later.
fn assert_sleepers_gone(scratch: &Scratch) {
    let pids = sleepers(scratch);
    assert!(!pids.is_empty(), "the worker started a sleeper");
    let deadline = Instant::now() + Duration::from_secs(2);
    while pids.iter().any(|pid| running(pid)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left: Vec<&String> = pids.iter().filter(|pid| running(pid)).collect();
    if !left.is_empty() {
        reap_sleepers(scratch);
        panic!("the SIGKILLed worker's programs still run 2 s later: pids {left:?}");
    }
}

fn worker_killed_mid_task(broker: String) {
    let scratch = Scratch::new(&broker);
    let mut worker = scratch.worker();
    let submitted = Instant::now();
    let mut creator = scratch.submit("3s").spawn().unwrap();
    scratch.wait_started(1);
    assert_eq!(scratch.in_flight(), 1);
    kill9(&mut worker);
    assert_sleepers_gone(&scratch);
    let status = creator.wait().unwrap();
    let took = submitted.elapsed();
    assert_eq!(status.code(), Some(3), "the creator should time out");
    assert!(took < Duration::from_secs(8), "the creator took {took:?}");
    // The creator released the key on its timeout; at the latest the lease expires 1 s later.
    let deadline = submitted + Duration::from_secs(3 + 1 + 2);
    while scratch.in_flight() != 0 {
        assert!(
            Instant::now() < deadline,
            "the key's capacity did not come back"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "{broker}: worker SIGKILLed mid-task: creator timed out after {took:?}; capacity back"
    );
}

fn creator_killed_twenty_times(broker: String) {
    let scratch = Scratch::new(&broker);
    let _worker = KillOnDrop(scratch.worker());
    let mut last_kill = Instant::now();
    for round in 1..=20 {
        let mut creator = scratch.submit("2s").spawn().unwrap();
        scratch.wait_started(round);
        kill9(&mut creator);
        last_kill = Instant::now();
    }
    let leases_after_kills = scratch.in_flight();
    // Every lease lives at most the task's timeout plus the margin (2 s + 1 s) from its submit.
    let deadline = last_kill + Duration::from_secs(2 + 1 + 2);
    let back = loop {
        if scratch.in_flight() == 0 {
            break last_kill.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "the leases of killed creators did not expire"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    reap_sleepers(&scratch);
    eprintln!(
        "{broker}: 20 creators SIGKILLed with a task in flight: {leases_after_kills} leases right \
         after, 0 after {back:?}"
    );
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        kill9(&mut self.0);
    }
}

#[test]
fn redis_worker_killed_mid_task() {
    worker_killed_mid_task(redis());
}

#[test]
fn nats_worker_killed_mid_task() {
    worker_killed_mid_task(nats());
}

#[test]
fn postgres_worker_killed_mid_task() {
    worker_killed_mid_task(postgres());
}

#[test]
fn redis_creator_killed_twenty_times() {
    creator_killed_twenty_times(redis());
}

#[test]
fn nats_creator_killed_twenty_times() {
    creator_killed_twenty_times(nats());
}

#[test]
fn postgres_creator_killed_twenty_times() {
    creator_killed_twenty_times(postgres());
}
