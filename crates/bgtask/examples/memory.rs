//! bgtask on the embedded memory broker (one process, no server): a worker that reports
//! progress, a creator that follows it, and a clean shutdown.
//!
//! ```text
//! cargo run -p bgtask --example memory
//! ```

use std::time::Duration;

use bgtask::{Client, ClientConfig, TaskFailure, Worker, WorkerConfig};
use serde_json::json;

#[tokio::main]
async fn main() -> bgtask::Result<()> {
    // Every `connect("memory://")` is a new broker: share this one by cloning it.
    let broker = bgtask::connect("memory://").await?;

    // A worker serving "resize", two tasks at a time.
    let worker = Worker::new(broker.clone(), WorkerConfig::for_tasks(["resize"])).await?;
    let stop = worker.shutdown_handle();
    let worker = tokio::spawn(worker.run(2, |task| async move {
        let width = task.json()["width"].as_u64().unwrap_or(0);
        if width == 0 {
            return Err(TaskFailure::error(
                json!({"error": "width must be positive"}),
            ));
        }
        for percent in [25, 50, 75, 100] {
            tokio::time::sleep(Duration::from_millis(50)).await;
            task.progress(&json!({ "percent": percent })).await?;
        }
        Ok(json!({"resized_to": width}))
    }));

    // A creator: submit, follow the progress, await the reply.
    let client = Client::new(broker, ClientConfig::default()).await?;
    let mut handle = client.submit("resize", &json!({"width": 640})).await?;
    while let Some(progress) = handle.progress().await {
        println!("progress {progress}");
    }
    println!("reply    {}", handle.reply().await?.json());

    // A task error comes back as an error with the worker's reply.
    let err = client
        .submit("resize", &json!({"width": 0}))
        .await?
        .reply()
        .await
        .unwrap_err();
    println!(
        "error    {} → {}",
        err.kind(),
        err.reply().map(|r| r.get()).unwrap_or("")
    );

    // Shutdown: the worker stops taking tasks and drains; the client ends its subscription.
    stop.shutdown();
    worker.await.expect("the worker task panicked")?;
    client.shutdown().await;
    Ok(())
}
