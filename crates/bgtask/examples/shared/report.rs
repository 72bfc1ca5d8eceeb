//! The program of the `redis`, `nats` and `postgres` examples: a worker that reports progress,
//! a creator that follows it, and a clean shutdown. Only the default broker URL differs between
//! them; `bgtask.toml` or `BGTASK_BROKER_URL` override it.

use std::time::Duration;

use bgtask::{Client, Config, Worker};
use serde_json::json;

/// Run the example on the configured broker, else on `default_url`.
pub(crate) async fn run(default_url: &str) -> bgtask::Result<()> {
    let (mut config, _file) = Config::load(None)?;
    config
        .broker_url
        .get_or_insert_with(|| default_url.to_owned());
    if config.namespace == bgtask::names::DEFAULT_NAMESPACE {
        config.namespace = "example".to_owned(); // keep clear of real workers
    }
    println!("broker {}", bgtask::redact(config.broker_url()));
    let broker = config.connect().await?;

    // A worker serving "report", four tasks at a time. In production it runs in its own
    // process (or many processes, on many machines): the broker connects them.
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
