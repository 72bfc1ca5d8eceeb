//! End-to-end tests of the `bgtask` binary: `bgtask worker -- sh script.sh` and `bgtask submit`
//! on Redis (BGTASK_REDIS_URL, default redis://127.0.0.1:6379), and `bgtask demo` on the
//! embedded broker.
//!
//! Every test runs in its own namespace. Timeouts are generous: the tests share a small,
//! loaded machine.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::scratch::{
    bgtask, free_port, is_gone, keyed_submit, wait_until, Run, Scratch, BIN, CALL_LIMIT,
};

#[test]
fn worker_runs_the_program_and_submit_maps_every_outcome_to_its_exit_code() {
    let s = Scratch::new("outcomes", "");
    let worker = s.worker(&["--concurrency", "4"]);

    // Success: the reply on stdout exactly as the program wrote it, a progress line on stderr.
    let run = s.bgtask(&["submit", "--task", "job", r#"{"mode":"ok","n":1}"#]);
    assert_eq!(run.code, 0, "{run:?}");
    let reply: serde_json::Value = serde_json::from_str(&run.stdout).expect("the reply is JSON");
    assert_eq!(
        reply["echo"],
        serde_json::json!({"mode": "ok", "n": 1}),
        "{run:?}"
    );
    assert_eq!(reply["name"], "job");
    assert_eq!(
        reply["task"].as_str().unwrap().len(),
        32,
        "BGTASK_TASK_ID is set"
    );
    assert!(
        run.stdout.contains("12345678901234567890"),
        "big numbers pass through unrounded: {run:?}"
    );
    assert!(
        run.stderr.contains(r#"progress: {"percent":50}"#),
        "{run:?}"
    );
    worker.wait_for_line("a log line", Duration::from_secs(10));

    // The payload from stdin (-) and from a file (@FILE).
    let run = bgtask(
        &["--config", &s.config(), "submit", "--task", "job", "-"],
        Some(r#"{"mode":"ok","from":"stdin"}"#),
        &s.dir,
    );
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains(r#""from":"stdin""#), "{run:?}");
    std::fs::write(s.dir.join("task.json"), r#"{"mode":"ok","from":"file"}"#).unwrap();
    let file_arg = format!("@{}", s.dir.join("task.json").display());
    let run = s.bgtask(&["submit", "--task", "job", &file_arg]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains(r#""from":"file""#), "{run:?}");

    // Exit 1 → Error, with the program's reply on stdout.
    let run = s.bgtask(&["submit", "--task", "job", r#"{"mode":"error"}"#]);
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(run.stdout.trim(), r#"{"reason":"nope"}"#);

    // Another exit status → Failed, with the status and the end of stderr.
    let run = s.bgtask(&["submit", "--task", "job", r#"{"mode":"fail"}"#]);
    assert_eq!(run.code, 2, "{run:?}");
    let reply: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(reply["exit_code"], 7, "{run:?}");
    assert_eq!(reply["stderr"], serde_json::json!(["boom"]), "{run:?}");

    // Exit 0 with output that is not JSON → Failed.
    let run = s.bgtask(&["submit", "--task", "job", r#"{"mode":"notjson"}"#]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stdout.contains("not JSON"), "{run:?}");

    // Nobody serves the task → rejected at once.
    let run = s.bgtask(&["submit", "--task", "nobody-serves-this", "{}"]);
    assert_eq!(run.code, 6, "{run:?}");
    assert!(run.stderr.contains("no worker"), "{run:?}");

    // Usage errors.
    let run = s.bgtask(&["submit", "--task", "job", "{not json"]);
    assert_eq!(run.code, 64, "{run:?}");
    let run = s.bgtask(&["submit", "--no-such-flag"]);
    assert_eq!(run.code, 64, "{run:?}");
    let run = s.bgtask(&["submit", "--task", "job", "--timeout", "soon", "{}"]);
    assert_eq!(run.code, 64, "{run:?}");

    assert!(
        worker.stderr().contains("job → success"),
        "{}",
        worker.stderr()
    );
}

#[test]
fn a_program_past_its_deadline_is_killed_with_its_children() {
    let s = Scratch::new("deadline", "");
    let worker = s.worker(&["--kill-grace", "500ms"]);
    let run = s.bgtask(&[
        "submit",
        "--task",
        "job",
        "--timeout",
        "2s",
        r#"{"mode":"sleep"}"#,
    ]);
    assert_eq!(run.code, 3, "timed out: {run:?}");
    assert!(run.stderr.contains("timed out"), "{run:?}");

    // The script wrote the pid of its `sleep 30`; the worker kills the whole process group.
    let pid_file = s.dir.join("child.pid");
    assert!(
        wait_until(Duration::from_secs(10), || pid_file.exists()),
        "the script never started its child"
    );
    assert_child_gone(&pid_file, "after the deadline", || worker.stderr());
    worker.wait_for_line("killed at the task's deadline", Duration::from_secs(20));
}

/// The child whose pid the worker's program wrote to `pid_file` is gone within 20 s.
fn assert_child_gone(pid_file: &std::path::Path, when: &str, worker_stderr: impl Fn() -> String) {
    let pid: u32 = std::fs::read_to_string(pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || is_gone(pid)),
        "the program's child {pid} is still running {when}; worker:\n{}",
        worker_stderr()
    );
}

#[test]
fn the_per_key_limit_and_the_blacklist_reject_at_once() {
    let s = Scratch::new(
        "admission",
        "[worker.blacklist]\nthreshold = 1\ninterval_ms = 60000\nduration_ms = 60000\n",
    );
    let _worker = s.worker(&["--concurrency", "4"]);

    // One slow task of user "ana" in flight, limit 1: the next one for "ana" is refused.
    let slow_task = r#"{"mode":"slow","user":"ana"}"#;
    let slow = s.spawn_bgtask(&keyed_submit(
        slow_task,
        &["--limit", "1", "--timeout", "60s"],
    ));
    let limit_key = ["--task", "job", "--key", "ana"];
    let in_flight = wait_until(Duration::from_secs(30), || {
        let mut args = vec!["inspect"];
        args.extend_from_slice(&limit_key);
        let run = s.bgtask(&args);
        run.code == 0
            && run
                .stdout
                .lines()
                .any(|l| l.trim_start().starts_with("ana") && l.contains(" 1 "))
    });
    assert!(in_flight, "inspect never showed ana's task in flight");
    // The same task, found without naming its key value.
    let run = s.bgtask(&["inspect", "keys", "--task", "job", "--json"]);
    assert_eq!(run.code, 0, "{run:?}");
    let keys: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(
        keys["keys"],
        serde_json::json!([{"task": "job", "value": "ana", "in_flight": 1}]),
        "{run:?}"
    );
    assert_eq!(keys["next"], serde_json::Value::Null, "{run:?}");
    // And by task name, from the worker's presence (renewed every second).
    let mut run = s.bgtask(&["inspect", "workers"]);
    let by_name = wait_until(Duration::from_secs(10), || {
        run = s.bgtask(&["inspect", "workers"]);
        run.stdout.contains("tasks in flight by task name: job 1")
    });
    assert!(by_name, "{run:?}");
    let run = s.bgtask(&["inspect", "workers", "--json"]);
    let workers: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(
        workers[0]["running"],
        serde_json::json!({"job": 1}),
        "{run:?}"
    );
    let run = s.submit_keyed(r#"{"mode":"ok","user":"ana"}"#, &["--limit", "1"]);
    assert_eq!(run.code, 4, "limit reached: {run:?}");
    assert!(run.stderr.contains("limit"), "{run:?}");
    let slow = slow.join().unwrap();
    assert_eq!(slow.code, 0, "{slow:?}");

    // Threshold 1: the second bad-key report blacklists "mallory"; the third submit is refused.
    for attempt in 1..=2 {
        let run = s.submit_keyed(r#"{"mode":"bad","user":"mallory"}"#, &[]);
        assert_eq!(run.code, 1, "attempt {attempt} is a task error: {run:?}");
    }
    let run = s.submit_keyed(r#"{"mode":"ok","user":"mallory"}"#, &[]);
    assert_eq!(run.code, 5, "blacklisted: {run:?}");
    assert!(run.stderr.contains("uploads corrupt images"), "{run:?}");

    let run = s.bgtask(&["inspect"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("mallory"), "{run:?}");
    assert!(run.stdout.contains("uploads corrupt images"), "{run:?}");
    let run = s.bgtask(&["blacklist", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(list[0]["value"], "mallory", "{run:?}");
    assert!(list[0]["remaining_ms"].as_u64().unwrap() > 1000);

    let run = s.bgtask(&["blacklist", "lift", "--task", "job", "mallory"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("lifted"), "{run:?}");
    let run = s.submit_keyed(r#"{"mode":"ok","user":"mallory"}"#, &[]);
    assert_eq!(run.code, 0, "accepted again after the lift: {run:?}");
}

#[test]
fn an_unreachable_broker_exits_with_7_and_hides_the_password() {
    let dir = std::env::temp_dir();
    let run = bgtask(
        &[
            "--broker",
            "redis://:hunter2@127.0.0.1:1",
            "submit",
            "--task",
            "job",
            "{}",
        ],
        None,
        &dir,
    );
    assert_eq!(run.code, 7, "{run:?}");
    assert!(run.stderr.contains("unavailable"), "{run:?}");
    assert!(!run.stderr.contains("hunter2"), "{run:?}");
}

#[test]
fn ctrl_c_drains_the_worker() {
    let s = Scratch::new("drain", "");
    let mut worker = s.worker(&[]);
    let slow = s.spawn_bgtask(&[
        "submit",
        "--task",
        "job",
        "--timeout",
        "60s",
        r#"{"mode":"slow"}"#,
    ]);
    // Wait until the program runs, then interrupt the worker once: it finishes the task.
    let started = s.dir.join("slow.started");
    assert!(
        wait_until(Duration::from_secs(30), || started.exists()),
        "the program never started"
    );
    let pid = worker.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let slow = slow.join().unwrap();
    assert_eq!(
        slow.code, 0,
        "the running task completes during the drain: {slow:?}"
    );
    assert!(slow.stdout.contains(r#""slow":true"#), "{slow:?}");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = worker.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the worker did not stop"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status.code(), Some(0), "{}", worker.stderr());
    assert!(worker.stderr().contains("draining"), "{}", worker.stderr());
}

#[test]
fn ctrl_c_on_submit_cancels_the_task_and_the_worker_kills_the_program() {
    let s = Scratch::new("cancel", "");
    let worker = s.worker(&["--kill-grace", "500ms"]);
    let mut submit = Command::new(BIN)
        .args([
            "--config",
            &s.config(),
            "submit",
            "--task",
            "job",
            "--timeout",
            "60s",
        ])
        .arg(r#"{"mode":"sleep"}"#)
        .current_dir(&s.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid_file = s.dir.join("child.pid");
    assert!(
        wait_until(Duration::from_secs(30), || pid_file.exists()),
        "the program never started; worker:\n{}",
        worker.stderr()
    );
    let submit_pid = submit.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &submit_pid])
        .status()
        .unwrap()
        .success());
    let start = Instant::now();
    let status = loop {
        if let Some(status) = submit.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < CALL_LIMIT,
            "submit did not stop on Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = submit.wait_with_output().unwrap();
    assert_eq!(
        status.code(),
        Some(130),
        "interrupted: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_child_gone(&pid_file, "after the cancellation", || worker.stderr());
    worker.wait_for_line("cancelled: the program was killed", Duration::from_secs(20));
}

#[test]
fn bench_counts_errors_and_exits_70_when_tasks_fail() {
    let s = Scratch::new("bench", "");
    let args = ["--workers", "0", "--tasks", "5", "--concurrency", "2"];
    let (run, out) = bench_json(&s, &args, 70);
    assert_eq!(out["bgtask"]["errors"]["no worker"], 5, "{run:?}");

    let args = ["--tasks", "200", "--concurrency", "8", "--compare"];
    let (run, out) = bench_json(&s, &args, 0);
    assert_eq!(out["bgtask"]["ok"], 200, "{run:?}");
    assert_eq!(out["baseline"]["ok"], 200, "{run:?}");
    assert!(
        out["ratio"]["throughput"].as_f64().unwrap() > 0.0,
        "{run:?}"
    );
    assert!(
        out["bgtask"]["latency_ms"]["p99"].as_f64().unwrap() > 0.0,
        "{run:?}"
    );
}

/// `bgtask bench <args> --json`, which must exit with `code`: the run and its JSON report.
fn bench_json(s: &Scratch, args: &[&str], code: i32) -> (Run, serde_json::Value) {
    let all: Vec<&str> = ["bench"]
        .iter()
        .chain(args)
        .chain(&["--json"])
        .copied()
        .collect();
    let run = s.bgtask(&all);
    assert_eq!(run.code, code, "{run:?}");
    let out = serde_json::from_str(&run.stdout).unwrap();
    (run, out)
}

#[test]
fn the_demo_runs_without_a_server_and_prints_its_summary() {
    let dir = std::env::temp_dir();
    let run = bgtask(&["demo"], None, &dir);
    assert_eq!(run.code, 0, "{run:?}");
    for needle in [
        "summary: 16 tasks",
        "limit reached",
        "timed out",
        "failed: codec crashed",
        "refused at once: blacklisted",
    ] {
        assert!(
            run.stdout.contains(needle),
            "{needle:?} missing: {}",
            run.stdout
        );
    }
}

#[test]
fn every_command_has_help_with_examples() {
    let dir = std::env::temp_dir();
    for command in [
        "demo",
        "worker",
        "submit",
        "bench",
        "inspect",
        "blacklist",
        "dashboard",
    ] {
        let run = bgtask(&[command, "--help"], None, &dir);
        assert_eq!(run.code, 0, "{command}: {run:?}");
        assert!(
            run.stdout.contains("Examples:"),
            "{command}: {}",
            run.stdout
        );
    }
    let run = bgtask(&["submit", "--help"], None, &dir);
    assert!(run.stdout.contains("Exit codes:"), "{}", run.stdout);
    let run = bgtask(&["frobnicate"], None, &dir);
    assert_eq!(run.code, 64, "{run:?}");
}

/// `GET /metrics` on `addr` over plain HTTP/1.0: the body.
fn scrape(addr: &str) -> String {
    use std::io::Read;
    let mut stream = std::net::TcpStream::connect(addr).expect("the metrics listener");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1."), "{head}");
    assert!(head.contains(" 200 "), "{head}");
    body.to_owned()
}

/// The value of the series `name` whose labels include every one of `labels` (`k="v"`).
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (series_name, rest) = series.split_once('{').unwrap_or((series, ""));
        (series_name == name && labels.iter().all(|l| rest.contains(l)))
            .then(|| value.parse().ok())
            .flatten()
    })
}

#[test]
fn the_worker_serves_prometheus_metrics_of_the_tasks_it_ran() {
    let s = Scratch::new("metrics", "");
    let addr = format!("127.0.0.1:{}", free_port());
    let worker = s.worker(&["--metrics-addr", &addr]);

    for (mode, code) in [("ok", 0), ("ok", 0), ("error", 1), ("fail", 2)] {
        let run = s.bgtask(&[
            "submit",
            "--task",
            "job",
            &format!(r#"{{"mode":"{mode}"}}"#),
        ]);
        assert_eq!(run.code, code, "{run:?}");
    }
    // The worker counts a completion as it sends the reply: scrape until all four are in.
    let mut text = String::new();
    let counted = wait_until(Duration::from_secs(10), || {
        text = scrape(&addr);
        sample(
            &text,
            "bgtask_worker_tasks_accepted_total",
            &[r#"task="job""#],
        ) == Some(4.0)
    });
    assert!(counted, "{text}");
    let completed = |status: &str| {
        let status = format!(r#"status="{status}""#);
        let labels = [r#"task="job""#, status.as_str()];
        sample(&text, "bgtask_worker_tasks_completed_total", &labels)
    };
    assert_eq!(completed("success"), Some(2.0), "{text}");
    assert_eq!(completed("error"), Some(1.0), "{text}");
    assert_eq!(completed("failed"), Some(1.0), "{text}");
    let running = sample(&text, "bgtask_worker_tasks_running", &[r#"task="job""#]);
    assert_eq!(running, Some(0.0), "{text}");
    assert!(
        text.contains("# TYPE bgtask_worker_tasks_completed_total counter"),
        "{text}"
    );

    // The address is taken now: a second worker says so and exits with a usage error.
    let script = s.dir.join("task.sh").display().to_string();
    let run = s.bgtask(&[
        "worker",
        "--task",
        "job",
        "--metrics-addr",
        &addr,
        "--",
        "sh",
        &script,
    ]);
    assert_eq!(run.code, 64, "{run:?}");
    assert!(run.stderr.contains("cannot serve metrics"), "{run:?}");
    drop(worker);
}
