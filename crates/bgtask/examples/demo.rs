//! The bgtask demo: creators and workers in one process on the embedded memory broker, running a
//! realistic mix of tasks — progress, a per-key limit hit, a timeout, a failure, a blacklisting.
//!
//! ```text
//! cargo run --example demo                          # embedded memory broker, no server
//! cargo run --example demo -- redis://127.0.0.1:6379   # the same against Redis
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use bgtask::{
    BlacklistConfig, Client, ClientConfig, ErrorKind, KeyLimit, SubmitOptions, TaskFailure, Worker,
    WorkerConfig,
};
use serde_json::json;

#[tokio::main]
async fn main() -> bgtask::Result<()> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "memory://".to_owned());
    let broker = bgtask::connect(&url).await?;
    let namespace = format!("demo-{}", &bgtask::names::random_id()[..8]);
    println!(
        "bgtask demo on {} (namespace {namespace})\n",
        bgtask::redact(&url)
    );

    // Three workers serve "thumbnail"; each reports progress, and flags accounts it cannot
    // process so that a user who keeps failing gets blacklisted.
    let mut workers = Vec::new();
    for n in 1..=3 {
        let config = WorkerConfig {
            namespace: namespace.clone(),
            blacklist: BlacklistConfig {
                threshold: 3,
                interval: Duration::from_secs(5),
                duration: Duration::from_secs(60),
            },
            ..WorkerConfig::for_tasks(["thumbnail"])
        };
        let worker = Worker::new(broker.clone(), config).await?;
        workers.push(worker.shutdown_handle());
        tokio::spawn(worker.run(4, move |task| async move {
            let image = task.json();
            let user = image["user"].as_str().unwrap_or_default().to_owned();
            match image["kind"].as_str() {
                Some("corrupt") => {
                    task.report_bad_key("uploads corrupt images").await?;
                    return Err(TaskFailure::error(json!({"error": "corrupt image"})));
                }
                Some("broken") => {
                    return Err(TaskFailure::failed(json!({"error": "codec crashed"})))
                }
                Some("huge") => tokio::time::sleep(Duration::from_secs(3)).await,
                _ => {}
            }
            for percent in [25, 50, 75, 100] {
                tokio::time::sleep(Duration::from_millis(40)).await;
                task.progress(&json!({ "percent": percent })).await?;
            }
            Ok(json!({"thumbnail": format!("{user}/thumb.png"), "worker": n}))
        }));
    }

    // One creator; at most 2 tasks in flight per user.
    let client = Client::new(
        broker.clone(),
        ClientConfig {
            namespace: namespace.clone(),
            task_key: Some("user".into()),
            per_key_limit: KeyLimit::Max(2),
            ..Default::default()
        },
    )
    .await?;

    let mut outcomes: BTreeMap<&'static str, u32> = BTreeMap::new();
    let mut record = |outcome: &'static str| *outcomes.entry(outcome).or_default() += 1;

    println!("1. six users, one image each, with progress:");
    let mut handles = Vec::new();
    for user in ["ana", "bo", "cy", "di", "ed", "flo"] {
        handles.push((
            user,
            client.submit("thumbnail", &json!({"user": user})).await?,
        ));
    }
    for (user, mut handle) in handles {
        let mut steps = Vec::new();
        while let Some(progress) = handle.progress().await {
            steps.push(format!("{}%", progress["percent"]));
        }
        let reply = handle.reply().await?;
        println!(
            "   {user:<4} progress {} → {}",
            steps.join(" "),
            reply.json()
        );
        record("success");
    }

    println!("\n2. three images of one user at once (limit 2 per user):");
    let first = client.submit("thumbnail", &json!({"user": "gus"})).await?;
    let second = client.submit("thumbnail", &json!({"user": "gus"})).await?;
    match client.submit("thumbnail", &json!({"user": "gus"})).await {
        Err(e) if e.kind() == ErrorKind::LimitReached => {
            println!("   third refused at once: {e}");
            record("limit reached");
        }
        other => println!("   unexpected: {other:?}"),
    }
    first.reply().await?;
    second.reply().await?;
    record("success");
    record("success");

    println!("\n3. an image too big to finish within its 1 s timeout:");
    let options = SubmitOptions::new().timeout(Duration::from_secs(1));
    let huge = client
        .submit_with(
            "thumbnail",
            &json!({"user": "hal", "kind": "huge"}),
            options,
        )
        .await?;
    let err = huge.reply().await.unwrap_err();
    println!("   {err}");
    record("timed out");

    println!("\n4. a codec crash:");
    let err = client
        .submit("thumbnail", &json!({"user": "ida", "kind": "broken"}))
        .await?
        .reply()
        .await
        .unwrap_err();
    println!("   {err}");
    record("failed");

    println!("\n5. a user who keeps uploading corrupt images (blacklisted after 3 reports):");
    for attempt in 1..=5 {
        let submitted = client
            .submit("thumbnail", &json!({"user": "mallory", "kind": "corrupt"}))
            .await;
        match submitted {
            Ok(handle) => {
                let err = handle.reply().await.unwrap_err();
                println!("   attempt {attempt}: {}", err.kind());
                record("task error");
            }
            Err(e) if e.kind() == ErrorKind::Blacklisted => {
                println!("   attempt {attempt}: refused: {e}");
                record("blacklisted");
            }
            Err(e) => return Err(e),
        }
    }
    println!(
        "   blacklisted users now: {}",
        client.blacklist().count().await?
    );

    for worker in &workers {
        worker.shutdown();
    }
    client.shutdown().await;

    println!("\nsummary");
    println!("   {:<14} {:>5}", "outcome", "tasks");
    for (outcome, count) in &outcomes {
        println!("   {outcome:<14} {count:>5}");
    }
    Ok(())
}
