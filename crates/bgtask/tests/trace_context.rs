//! Trace context across the hop, on Redis and NATS: a task submitted inside a span reaches its
//! worker with that span's W3C context, and the worker's task span is its child (exported to
//! memory by the OpenTelemetry SDK). A task submitted outside any span carries none, and its
//! worker's span is a root: peers that send no trace context still interoperate.
//!
//! Servers: BGTASK_REDIS_URL (default redis://127.0.0.1:6379) and BGTASK_NATS_URL (default
//! nats://127.0.0.1:4222); `scripts/test` starts them. One test, since it installs the global
//! tracing subscriber.

use std::time::Duration;

use bgtask::{Client, ClientConfig, Worker, WorkerConfig};
use opentelemetry::trace::{SpanId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use serde_json::{json, Value};
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

fn url(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_owned())
}

/// Submit one task inside the span `creator` and one outside any span, on `broker_url`.
async fn run_tasks(backend: &str, broker_url: &str) -> (Value, Value) {
    let broker = bgtask::connect(broker_url)
        .await
        .unwrap_or_else(|e| panic!("{backend} at {broker_url}: {e} (scripts/test starts it)"));
    let namespace = format!("trace-{backend}-{:x}", rand_suffix());
    let worker_config = WorkerConfig {
        namespace: namespace.clone(),
        ..WorkerConfig::for_tasks(["traced"])
    };
    let worker = Worker::new(broker.clone(), worker_config).await.unwrap();
    let stop = worker.shutdown_handle();
    let serving = tokio::spawn(worker.run(2, |task| async move {
        // A span the handler opens: a child of the task span.
        tracing::info_span!("handler").in_scope(|| {});
        Ok(json!({ "trace_id": task.trace_context().map(|t| t.trace_id().to_owned()) }))
    }));
    let client_config = ClientConfig {
        namespace,
        ..ClientConfig::default()
    };
    let client = Client::new(broker, client_config).await.unwrap();
    let creator = tracing::info_span!("creator", otel.name = %format!("creator {backend}"));
    let traced = async { client.submit("traced", &json!({})).await?.reply().await }
        .instrument(creator)
        .await
        .unwrap();
    let plain = client
        .submit("traced", &json!({}))
        .await
        .unwrap()
        .reply()
        .await
        .unwrap();
    stop.shutdown();
    let _ = tokio::time::timeout(Duration::from_secs(5), serving).await;
    (traced.json(), plain.json())
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

fn named<'a>(spans: &'a [SpanData], name: &str) -> Vec<&'a SpanData> {
    spans.iter().filter(|s| s.name == name).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_task_span_is_a_child_of_the_creator_span_on_redis_and_nats() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("bgtask-test"));
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer)).unwrap();

    let backends = [
        ("redis", url("BGTASK_REDIS_URL", "redis://127.0.0.1:6379")),
        ("nats", url("BGTASK_NATS_URL", "nats://127.0.0.1:4222")),
    ];
    let mut replies = Vec::new();
    for (backend, broker_url) in &backends {
        replies.push(run_tasks(backend, broker_url).await);
    }
    provider.force_flush().unwrap();
    let spans = exporter.get_finished_spans().unwrap();

    for ((backend, _), (traced, plain)) in backends.iter().zip(&replies) {
        let creator = named(&spans, &format!("creator {backend}"));
        assert_eq!(creator.len(), 1, "{backend}: {spans:#?}");
        let creator = creator[0].span_context.clone();
        let trace_id = creator.trace_id().to_string();
        // The worker saw the creator's trace id in the envelope...
        assert_eq!(traced["trace_id"], json!(trace_id), "{backend}");
        assert_eq!(plain["trace_id"], Value::Null, "{backend}");
        // ...and its task span is the creator span's child, in the creator's trace.
        let children: Vec<&SpanData> = named(&spans, "bgtask.task")
            .into_iter()
            .filter(|s| s.parent_span_id == creator.span_id())
            .collect();
        assert_eq!(children.len(), 1, "{backend}: {spans:#?}");
        let task = children[0];
        assert_eq!(task.span_context.trace_id(), creator.trace_id());
        assert!(
            task.parent_span_is_remote,
            "{backend}: the parent came over the broker"
        );
        // The handler's own span is the task span's child.
        let handler = named(&spans, "handler")
            .into_iter()
            .filter(|s| s.parent_span_id == task.span_context.span_id())
            .count();
        assert_eq!(handler, 1, "{backend}");
    }
    // The two tasks submitted outside any span have root task spans, in traces of their own.
    let roots = named(&spans, "bgtask.task")
        .into_iter()
        .filter(|s| s.parent_span_id == SpanId::INVALID)
        .count();
    assert_eq!(roots, 2, "{spans:#?}");
}
