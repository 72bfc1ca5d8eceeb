//! `bgtask dashboard` end to end: a real broker, `bgtask worker` processes, the dashboard, and
//! headless Chromium driven over the DevTools protocol. The page shows a worker within 2 s of its
//! start, counts change as tasks run, a blacklisted value is lifted from the page, and nothing is
//! logged to the browser's console; a screenshot goes to `target/tmp/dashboard.png`. Then the
//! HTTP surface without a browser: 404, 400, 401, 403, the refusal to listen on a non-loopback
//! address without a token, no password in any response, and the other backends.
//!
//! Chromium: `$BGTASK_CHROMIUM`, else `chromium` on PATH (`apt-get install chromium`;
//! `scripts/test` and `.ci/run` install it). Without it the test fails, saying so.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::json;

use common::browser::{first_event, http, Browser, Process};
use common::scratch::{free_port, Scratch, BIN};

/// `bgtask --config <s> [extra global flags] dashboard ARGS...`, once it is ready.
async fn dashboard(s: &Scratch, global: &[&str], args: &[&str]) -> Process {
    let mut command = Command::new(BIN);
    command
        .arg("--config")
        .arg(s.config())
        .args(global)
        .arg("dashboard")
        .args(args);
    let process = Process::start(command);
    process.wait_for("; ready").await;
    process
}

fn submit(s: &Scratch, payload: &str) -> i32 {
    s.submit_keyed(payload, &[]).code
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_workers_counts_and_lifts_a_blacklisted_value() {
    let s = Scratch::new(
        "dashboard",
        "[worker.blacklist]\nthreshold = 1\ninterval_ms = 60000\nduration_ms = 60000\n",
    );
    let addr = format!("127.0.0.1:{}", free_port());
    let _dashboard = dashboard(
        &s,
        &[],
        &["--listen", &addr, "--allow-writes", "--interval", "200ms"],
    )
    .await;
    let browser = Browser::start().await;
    let mut page = browser.page().await;
    page.call(
        "Emulation.setDeviceMetricsOverride",
        json!({"width": 1360, "height": 860, "deviceScaleFactor": 1, "mobile": false}),
    )
    .await;
    page.call("Page.navigate", json!({"url": format!("http://{addr}/")}))
        .await;
    page.until(
        "document.getElementById('status').textContent === 'live'",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        page.eval("document.querySelectorAll('[data-worker]').length")
            .await,
        0
    );

    // A worker starts: the page shows it within 2 s of its being ready.
    let _worker = s.worker(&["--concurrency", "4"]);
    let seen = page
        .until(
            "document.querySelectorAll('[data-worker]').length === 1",
            Duration::from_secs(2),
        )
        .await;
    eprintln!("the page showed the worker {seen:?} after it was ready");

    // Tasks run: the counts change.
    for n in 0..3 {
        assert_eq!(submit(&s, &format!(r#"{{"mode":"ok","user":"u{n}"}}"#)), 0);
    }
    assert_eq!(submit(&s, r#"{"mode":"error","user":"ana"}"#), 1);
    page.until(
        "document.querySelector('[data-task=\"job\"] .done')?.textContent === '3'",
        Duration::from_secs(10),
    )
    .await;
    let row = page
        .eval("document.querySelector('[data-task=\"job\"]').innerText")
        .await;
    assert!(row.as_str().unwrap().contains('1'), "the error: {row}");

    // A value gets blacklisted, shows up, and is lifted from the page.
    for _ in 0..2 {
        assert_eq!(submit(&s, r#"{"mode":"bad","user":"mallory"}"#), 1);
    }
    assert_eq!(submit(&s, r#"{"mode":"ok","user":"mallory"}"#), 5);
    page.until(
        "document.querySelector('[data-blacklisted=\"job/mallory\"]') !== null",
        Duration::from_secs(10),
    )
    .await;

    // A slow keyed task: its key value shows as in flight, and the worker's in-flight count.
    let slow_task = r#"{"mode":"slow","user":"slowpoke"}"#;
    let slow = s.spawn_bgtask(&common::scratch::keyed_submit(slow_task, &[]));
    page.until(
        "document.querySelector('[data-key=\"job/slowpoke\"]') !== null",
        Duration::from_secs(10),
    )
    .await;
    page.until(
        "document.querySelector('[data-task=\"job\"] .in-flight')?.textContent === '1'",
        Duration::from_secs(5),
    )
    .await;
    std::fs::create_dir_all(screenshot_dir()).unwrap();
    let shot = page
        .call("Page.captureScreenshot", json!({"format": "png"}))
        .await;
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().unwrap())
        .unwrap();
    let path = screenshot_dir().join("dashboard.png");
    std::fs::write(&path, png).unwrap();
    eprintln!("screenshot: {}", path.display());
    let slow = slow.join().unwrap();
    assert_eq!(slow.code, 0, "the slow task: {slow:?}");
    page.until(
        "document.querySelector('[data-key=\"job/slowpoke\"]') === null",
        Duration::from_secs(10),
    )
    .await;
    page.eval("document.querySelector('[data-lift=\"job/mallory\"]').click(), true")
        .await;
    page.until(
        "document.querySelector('[data-blacklisted=\"job/mallory\"]') === null",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(submit(&s, r#"{"mode":"ok","user":"mallory"}"#), 0, "lifted");
    assert_eq!(
        page.eval("document.getElementById('write-error').hidden")
            .await,
        true
    );
    assert!(
        page.console.is_empty(),
        "console errors: {:#?}",
        page.console
    );
}

fn screenshot_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).to_path_buf()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_and_no_password_is_shown() {
    let s = Scratch::new("dashboard-http", "");
    let addr = format!("127.0.0.1:{}", free_port());
    let _dashboard = dashboard(&s, &[], &["--listen", &addr, "--allow-writes"]).await;

    let (status, page) = http(&addr, "GET", "/", &[], "").await;
    assert_eq!(status, 200, "{page}");
    let csrf = page
        .split("name=\"csrf-token\" content=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the page carries its CSRF token")
        .to_owned();
    assert_eq!(http(&addr, "GET", "/nope", &[], "").await.0, 404);
    let lift = "/api/blacklist/lift";
    let body = r#"{"task":"job","value":"x"}"#;
    assert_eq!(http(&addr, "POST", lift, &[], body).await.0, 403);
    let wrong = [("X-CSRF-Token", "0123")];
    assert_eq!(http(&addr, "POST", lift, &wrong, body).await.0, 403);
    let right = [("X-CSRF-Token", csrf.as_str())];
    assert_eq!(http(&addr, "POST", lift, &right, "{not json").await.0, 400);
    for bad in [
        r#"{"task":"job","value":""}"#,
        r#"{"task":"job"}"#,
        r#"{"task":"job","value":"x","also":1}"#,
        r#""job/x""#,
    ] {
        assert_eq!(http(&addr, "POST", lift, &right, bad).await.0, 400, "{bad}");
    }
    let foreign = [
        ("X-CSRF-Token", csrf.as_str()),
        ("Origin", "http://evil.example"),
    ];
    assert_eq!(http(&addr, "POST", lift, &foreign, body).await.0, 403);
    let (status, lifted) = http(&addr, "POST", lift, &right, body).await;
    assert_eq!(status, 200, "{lifted}");
    assert!(lifted.contains(r#""lifted":false"#), "{lifted}");
    for path in [
        "/api/workers",
        "/api/tasks",
        "/api/keys",
        "/api/blacklist",
        "/api/overview",
    ] {
        let (status, response) = http(&addr, "GET", path, &[], "").await;
        assert_eq!(status, 200, "{path}: {response}");
        assert!(response.contains("application/json"), "{path}: {response}");
    }

    // Read-only by default.
    let addr = format!("127.0.0.1:{}", free_port());
    let _read_only = dashboard(&s, &[], &["--listen", &addr]).await;
    let (_, page) = http(&addr, "GET", "/", &[], "").await;
    let csrf = page
        .split("content=\"")
        .nth(2)
        .unwrap_or_default()
        .split('"')
        .next();
    let headers = [("X-CSRF-Token", csrf.unwrap_or_default())];
    let (status, response) = http(&addr, "POST", lift, &headers, body).await;
    assert_eq!(status, 403, "{response}");
    assert!(response.contains("--allow-writes"), "{response}");

    // Not on loopback without a token: refused before anything starts.
    let run = s.bgtask(&["dashboard", "--listen", &format!("0.0.0.0:{}", free_port())]);
    assert_eq!(run.code, 64, "{run:?}");
    assert!(run.stderr.contains("--auth-token"), "{run:?}");

    // With a token: 401 to read without it, 403 to write without it.
    let addr = format!("127.0.0.1:{}", free_port());
    let _guarded = dashboard(
        &s,
        &[],
        &[
            "--listen",
            &addr,
            "--auth-token",
            "s3cret",
            "--allow-writes",
        ],
    )
    .await;
    let (status, response) = http(&addr, "GET", "/api/workers", &[], "").await;
    assert_eq!(status, 401, "{response}");
    assert!(
        response.contains("WWW-Authenticate: Basic")
            || response.contains("www-authenticate: Basic"),
        "{response}"
    );
    assert_eq!(http(&addr, "POST", lift, &[], body).await.0, 403);
    let bearer = [("Authorization", "Bearer s3cret")];
    assert_eq!(http(&addr, "GET", "/api/workers", &bearer, "").await.0, 200);
    // "user:s3cret"
    let basic = [("Authorization", "Basic dXNlcjpzM2NyZXQ=")];
    assert_eq!(http(&addr, "GET", "/", &basic, "").await.0, 200);

    // A broker URL with a password: it appears nowhere.
    let redis = PrivateRedis::start("hunter2");
    let addr = format!("127.0.0.1:{}", free_port());
    let url = format!("redis://:hunter2@127.0.0.1:{}", redis.port);
    let _private = dashboard(&s, &["--broker", &url], &["--listen", &addr]).await;
    let (_, event) = first_event(&addr, &[]).await;
    let mut seen = event.to_string();
    for path in [
        "/",
        "/assets/app.js",
        "/api/overview",
        "/api/workers",
        "/api/blacklist",
    ] {
        seen.push_str(&http(&addr, "GET", path, &[], "").await.1);
    }
    assert!(seen.contains("127.0.0.1"), "{seen}");
    assert!(!seen.contains("hunter2"), "{seen}");
}

/// A `redis-server` of this test's own with a password, killed when dropped.
struct PrivateRedis {
    child: Child,
    port: u16,
}

impl PrivateRedis {
    fn start(password: &str) -> PrivateRedis {
        let port = free_port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--requirepass", password])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server on PATH");
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        PrivateRedis { child, port }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The same dashboard over NATS and PostgreSQL: a worker started there is listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_lists_workers_on_nats_and_postgres() {
    let s = Scratch::new("dashboard-backends", "");
    let backends = [
        common::require_server("BGTASK_NATS_URL", "nats://127.0.0.1:4222", 4222),
        common::require_server(
            "BGTASK_POSTGRES_URL",
            "postgres://postgres@127.0.0.1:5432/test",
            5432,
        ),
    ];
    for url in &backends {
        let addr = format!("127.0.0.1:{}", free_port());
        let _dashboard = dashboard(&s, &["--broker", url], &["--listen", &addr]).await;
        let mut command = Command::new(BIN);
        command.args(["--config", &s.config(), "--broker", url]);
        command.args(["worker", "--task", "job", "--", "cat"]);
        let worker = Process::start(command);
        worker.wait_for("; ready").await;
        let start = Instant::now();
        loop {
            let (status, response) = http(&addr, "GET", "/api/workers", &[], "").await;
            assert_eq!(status, 200, "{url}: {response}");
            if response.contains(r#""tasks":["job"]"#) {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{url}: {response}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
