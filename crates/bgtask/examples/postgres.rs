//! bgtask on PostgreSQL: a worker that reports progress, a creator that follows it, and a clean
//! shutdown. The program is the Redis example's with one line changed: the broker URL (here a
//! default, so it runs as is; `bgtask.toml` or `BGTASK_BROKER_URL` override it).
//!
//! ```text
//! docker compose up -d --wait postgres   # or a local server, user postgres, trust auth
//! cargo run -p bgtask --features postgres --example postgres
//! ```

use std::time::Duration;

use bgtask::{Client, Config, Worker};
use serde_json::json;

#[tokio::main]
async fn main() -> bgtask::Result<()> {
    let (mut config, _file) = Config::load(None)?;
    config
        .broker_url
        .get_or_insert_with(|| "postgres://postgres@127.0.0.1:5432/test".to_owned()); // the one line
    if config.namespace == bgtask::names::DEFAULT_NAMESPACE {
        config.namespace = "example".to_owned(); // keep clear of real workers
    }
    println!("broker {}", bgtask::redact(config.broker_url()));
    let broker = config.connect().await?;

    // A worker serving "report", four tasks at a time.
    let worker = Worker::new(broker.clone(), {
        let mut worker = config.worker_config();
        worker.tasks = vec!["report".to_owned()];
        worker
    })
    .await?;
    let stop = worker.shutdown_handle();
    let worker = tokio::spawn(worker.run(4, |task| async move {
        let rows = task.json()["rows"].as_u64().unwrap_or(0);
        for done in (0..=rows).step_by(250) {
            task.progress(&json!({ "rows": done, "of": rows })).await?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(json!({"url": format!("https://reports.example/{}.csv", task.id())}))
    }));

    // A creator, with a task key: at most 5 reports in flight per customer.
    let client = Client::new(broker, {
        let mut client = config.client_config();
        client.task_key = Some("customer".to_owned());
        client
    })
    .await?;
    let mut handle = client
        .submit("report", &json!({"customer": "acme", "rows": 1000}))
        .await?;
    while let Some(progress) = handle.progress().await {
        println!("progress {progress}");
    }
    let reply = handle.reply().await?;
    println!("reply    {} (from worker {})", reply.json(), reply.worker());

    stop.shutdown();
    worker.await.expect("the worker task panicked")?;
    client.shutdown().await;
    Ok(())
}
