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

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

use common::scratch::{free_port, Scratch, BIN};

/// A child process with its stderr collected, killed when dropped.
struct Process {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Process {
    fn start(mut command: Command) -> Process {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {command:?}: {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Process { child, lines }
    }

    fn stderr(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    async fn wait_for(&self, needle: &str) {
        let start = Instant::now();
        while !self.stderr().contains(needle) {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "no {needle:?} within 30 s: {}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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

/// One HTTP/1.1 request to `addr` (`Connection: close`): (status, headers and body as text).
/// The body is read up to its `Content-Length` (Chromium's DevTools server does not close).
async fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if method != "GET" {
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let mut buffer = vec![0u8; 65536];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = String::from_utf8_lossy(&response).into_owned();
        if let Some((head, rest)) = text.split_once("\r\n\r\n") {
            let length = head.lines().find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().ok())?
            });
            if length.is_some_and(|n| rest.len() >= n) {
                break;
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, stream.read(&mut buffer))
            .await
            .expect("a response within 10 s")
            .unwrap();
        if n == 0 {
            break;
        }
        response.extend_from_slice(&buffer[..n]);
    }
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, response)
}

/// The first `snapshot` event of `/api/events`, as JSON, and the raw text read.
async fn first_event(addr: &str, headers: &[(&str, &str)]) -> (Value, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut request = format!("GET /api/events HTTP/1.1\r\nHost: {addr}\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut text = String::new();
    let mut buffer = vec![0u8; 65536];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(data) = text
            .lines()
            .find_map(|l| l.strip_prefix("data: "))
            .filter(|d| serde_json::from_str::<Value>(d).is_ok())
        {
            return (serde_json::from_str(data).unwrap(), text.clone());
        }
        assert!(Instant::now() < deadline, "no event: {text}");
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer))
            .await
            .expect("event stream")
            .unwrap();
        assert!(n > 0, "the event stream ended: {text}");
        text.push_str(&String::from_utf8_lossy(&buffer[..n]));
    }
}

fn chromium_binary() -> String {
    if let Ok(path) = std::env::var("BGTASK_CHROMIUM") {
        return path;
    }
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {name}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if found {
            return name.to_owned();
        }
    }
    panic!(
        "no Chromium to drive: install it (`apt-get install chromium`; scripts/test and .ci/run \
         do) or point BGTASK_CHROMIUM at one"
    );
}

/// Headless Chromium with its DevTools port, in a profile of its own.
struct Browser {
    _process: Process,
    profile: PathBuf,
    port: u16,
}

impl Browser {
    async fn start() -> Browser {
        let port = free_port();
        let profile = std::env::temp_dir().join(format!("bgtask-chromium-{port}"));
        let mut command = Command::new(chromium_binary());
        command.args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            &format!("--remote-debugging-port={port}"),
            &format!("--user-data-dir={}", profile.display()),
            "about:blank",
        ]);
        Browser {
            _process: Process::start(command),
            profile,
            port,
        }
    }

    /// The DevTools connection of its page.
    async fn page(&self) -> Page {
        let addr = format!("127.0.0.1:{}", self.port);
        let start = Instant::now();
        let url = loop {
            if let Ok(stream) = tokio::net::TcpStream::connect(&addr).await {
                drop(stream);
                let (_, response) = http(&addr, "GET", "/json/list", &[], "").await;
                let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
                if let Ok(Value::Array(targets)) = serde_json::from_str(body) {
                    if let Some(url) = targets
                        .iter()
                        .find(|t| t["type"] == "page")
                        .and_then(|t| t["webSocketDebuggerUrl"].as_str())
                    {
                        break url.to_owned();
                    }
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "Chromium's DevTools did not answer on {addr}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let (socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        let mut page = Page {
            socket,
            next_id: 0,
            console: Vec::new(),
        };
        page.call("Runtime.enable", json!({})).await;
        page.call("Log.enable", json!({})).await;
        page.call("Page.enable", json!({})).await;
        page
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One page over the DevTools protocol: calls, and the console errors seen on the way.
struct Page {
    socket: Socket,
    next_id: u64,
    console: Vec<String>,
}

impl Page {
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let request = json!({"id": id, "method": method, "params": params}).to_string();
        self.socket.send(Message::text(request)).await.unwrap();
        loop {
            let message = tokio::time::timeout(Duration::from_secs(30), self.socket.next())
                .await
                .unwrap_or_else(|_| panic!("no answer to {method}"))
                .expect("the DevTools connection closed")
                .unwrap();
            let Message::Text(text) = message else {
                continue;
            };
            let value: Value = serde_json::from_str(&text).unwrap();
            if value["id"] == id {
                assert!(value.get("error").is_none(), "{method}: {value}");
                return value["result"].clone();
            }
            self.note(&value);
        }
    }

    /// Keep what the page logged as an error.
    fn note(&mut self, event: &Value) {
        let params = &event["params"];
        match event["method"].as_str() {
            Some("Runtime.exceptionThrown") => self.console.push(params.to_string()),
            Some("Runtime.consoleAPICalled") if params["type"] == "error" => {
                self.console.push(params.to_string())
            }
            Some("Log.entryAdded") if params["entry"]["level"] == "error" => {
                self.console.push(params["entry"].to_string())
            }
            _ => {}
        }
    }

    async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        assert!(
            result.get("exceptionDetails").is_none(),
            "{expression}: {result}"
        );
        result["result"]["value"].clone()
    }

    /// Wait until `expression` is true on the page; how long it took.
    async fn until(&mut self, expression: &str, limit: Duration) -> Duration {
        let start = Instant::now();
        // Before the page has loaded, what the expression reads may not exist yet.
        let guarded = format!(
            "(() => {{ try {{ return ({expression}); }} catch (e) {{ return false; }} }})()"
        );
        while self.eval(&guarded).await != Value::Bool(true) {
            assert!(
                start.elapsed() < limit,
                "{expression} did not hold within {limit:?}; the page: {}",
                self.eval("document.querySelector('main').innerText").await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        start.elapsed()
    }
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
