//! What the binary's end-to-end tests share: a scratch namespace with a worker script and its
//! configuration, `bgtask worker` as a child process, and `bgtask` runs with a time limit.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const BIN: &str = env!("CARGO_BIN_EXE_bgtask");

/// The longest any single `bgtask` call may take before the test fails.
pub const CALL_LIMIT: Duration = Duration::from_secs(90);

/// The program the workers run: behaves according to the task's "mode".
pub const SCRIPT: &str = r#"
input=$(cat)
case "$input" in
  *'"mode":"ok"'*)
    echo 'progress: {"percent":50}' >&2
    echo "a log line" >&2
    printf '{"echo":%s,"task":"%s","name":"%s","big":12345678901234567890}\n' "$input" "$BGTASK_TASK_ID" "$BGTASK_TASK_NAME"
    ;;
  *'"mode":"error"'*) printf '{"reason":"nope"}'; exit 1 ;;
  *'"mode":"fail"'*) echo "boom" >&2; exit 7 ;;
  *'"mode":"notjson"'*) echo "this is not json" ;;
  *'"mode":"bad"'*) echo "bad-key: uploads corrupt images" >&2; printf '{"error":"corrupt"}'; exit 1 ;;
  *'"mode":"slow"'*) touch "$BGTASK_TEST_DIR/slow.started"; sleep 3; echo '{"slow":true}' ;;
  *'"mode":"sleep"'*)
    sleep 30 &
    echo $! > "$BGTASK_TEST_DIR/child.pid"
    wait
    ;;
  *) echo "unknown mode" >&2; exit 9 ;;
esac
"#;

use super::require_redis;

/// A fresh directory with the worker script and a bgtask.toml for `namespace`.
pub struct Scratch {
    pub dir: PathBuf,
}

impl Scratch {
    pub fn new(tag: &str, extra_config: &str) -> Scratch {
        let url = require_redis();
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let namespace = format!("cli-{tag}-{}-{:x}", std::process::id(), nanos % (1 << 40));
        let dir = std::env::temp_dir().join(&namespace);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("task.sh"), SCRIPT).unwrap();
        std::fs::write(
            dir.join("bgtask.toml"),
            format!("broker_url = {url:?}\nnamespace = {namespace:?}\n{extra_config}"),
        )
        .unwrap();
        Scratch { dir }
    }

    pub fn config(&self) -> String {
        self.dir.join("bgtask.toml").display().to_string()
    }

    /// Start `bgtask worker` serving "job" and wait until it is ready.
    pub fn worker(&self, extra: &[&str]) -> WorkerProcess {
        let config = self.config();
        let script = self.dir.join("task.sh").display().to_string();
        let mut args = vec!["--config", &config, "worker", "--task", "job"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--", "sh", &script]);
        let mut child = Command::new(BIN)
            .args(&args)
            .env("BGTASK_TEST_DIR", &self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start bgtask worker");
        let lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let worker = WorkerProcess { child, lines };
        worker.wait_for_line("; ready", Duration::from_secs(60));
        worker
    }

    /// `bgtask submit --task job --key user [EXTRA...] PAYLOAD`: a task of the script's, keyed
    /// by its "user".
    pub fn submit_keyed(&self, payload: &str, extra: &[&str]) -> Run {
        self.bgtask(&keyed_submit(payload, extra))
    }

    /// [`bgtask`](Self::bgtask) on a thread of its own, for a call that runs while the test
    /// goes on (a slow task).
    pub fn spawn_bgtask(&self, args: &[&str]) -> std::thread::JoinHandle<Run> {
        let mut all = vec!["--config".to_owned(), self.config()];
        all.extend(args.iter().map(|a| a.to_string()));
        let dir = self.dir.clone();
        std::thread::spawn(move || {
            let all: Vec<&str> = all.iter().map(String::as_str).collect();
            bgtask(&all, None, &dir)
        })
    }

    /// Run `bgtask --config <this> ARGS...`.
    pub fn bgtask(&self, args: &[&str]) -> Run {
        let config = self.config();
        let mut all = vec!["--config", config.as_str()];
        all.extend_from_slice(args);
        bgtask(&all, None, &self.dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub struct WorkerProcess {
    pub child: Child,
    pub lines: Arc<Mutex<Vec<String>>>,
}

impl WorkerProcess {
    pub fn wait_for_line(&self, needle: &str, limit: Duration) -> String {
        let start = Instant::now();
        loop {
            if let Some(line) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
            {
                return line.clone();
            }
            assert!(
                start.elapsed() < limit,
                "the worker did not print {needle:?} within {limit:?}; its stderr:\n{}",
                self.lines.lock().unwrap().join("\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stderr(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Run the binary with a time limit; stdin from `input`.
pub fn bgtask(args: &[&str], input: Option<&str>, dir: &Path) -> Run {
    let mut child = Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env_remove("BGTASK_BROKER_URL")
        .env_remove("BGTASK_NAMESPACE")
        .env_remove("BGTASK_CONFIG")
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start bgtask");
    if let Some(input) = input {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    let pid = child.id();
    let watchdog = std::thread::spawn(move || {
        let start = Instant::now();
        while start.elapsed() < CALL_LIMIT {
            std::thread::sleep(Duration::from_millis(100));
            if !Path::new(&format!("/proc/{pid}")).exists() || is_gone(pid) {
                return false;
            }
        }
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
        true
    });
    let output = child.wait_with_output().expect("wait for bgtask");
    let killed = watchdog.join().unwrap_or(false);
    let run = Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    assert!(
        !killed,
        "bgtask {args:?} took longer than {CALL_LIMIT:?}: {run:?}"
    );
    run
}

/// A process that does not exist, or is a zombie waiting for a parent that reaps it.
/// The arguments of [`Scratch::submit_keyed`].
pub fn keyed_submit<'a>(payload: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["submit", "--task", "job", "--key", "user"];
    args.extend_from_slice(extra);
    args.push(payload);
    args
}

pub fn is_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
    }
}

pub fn wait_until(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    check()
}

/// A free loopback port, for a listener the test asks the binary to open.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}
