//! What every scenario gets: brokers, clients and workers in a namespace of its own.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bgtask_core::{Client, ClientConfig, DynBroker, Incoming, Subscription, Worker, WorkerConfig};
use bytes::Bytes;
use futures::StreamExt;
use serde_json::Value;

use crate::proxy::FaultProxy;
use crate::BrokerFactory;

/// How long one scenario may run before it fails as hung.
const SCENARIO_LIMIT: Duration = Duration::from_secs(120);

/// Run one scenario with a fresh [`Harness`], failing it if it runs longer than two minutes.
pub async fn run<F, S, Fut>(name: &str, factory: F, scenario: S)
where
    F: BrokerFactory,
    S: FnOnce(Harness) -> Fut,
    Fut: Future<Output = ()>,
{
    let harness = Harness {
        factory: Arc::new(factory),
        namespace: format!("t{}", &bgtask_core::names::random_id()[..16]),
    };
    if tokio::time::timeout(SCENARIO_LIMIT, scenario(harness))
        .await
        .is_err()
    {
        panic!("scenario {name} did not finish within {SCENARIO_LIMIT:?}: something hangs");
    }
}

/// A scenario's fixture: its own namespace on the backend under test.
#[derive(Clone)]
pub struct Harness {
    factory: Arc<dyn BrokerFactory>,
    namespace: String,
}

impl Harness {
    /// This scenario's namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// A channel or key name unique to this scenario.
    pub fn name(&self, suffix: &str) -> String {
        format!("{}:{suffix}", self.namespace)
    }

    /// A new broker on the backend under test.
    pub async fn broker(&self) -> DynBroker {
        self.factory.broker().await
    }

    /// Whether the backend is reached over a network (fault scenarios apply).
    pub fn networked(&self) -> bool {
        self.factory.server_addr().is_some()
    }

    /// A fault proxy in front of the server, and a broker connected through it. `None` (after
    /// saying so on stderr) for an in-process broker.
    pub async fn proxied_broker(&self) -> Option<(FaultProxy, DynBroker)> {
        let Some(server) = self.factory.server_addr() else {
            eprintln!("not applicable: the backend declares no network connection");
            return None;
        };
        let proxy = FaultProxy::start(server)
            .await
            .expect("start the fault proxy");
        let broker = self
            .factory
            .broker_via(proxy.addr())
            .await
            .expect("connect through the fault proxy");
        Some((proxy, broker))
    }

    /// A broker connected through `proxy`, or the connect error.
    pub async fn broker_via(&self, proxy: &FaultProxy) -> bgtask_core::Result<DynBroker> {
        self.factory.broker_via(proxy.addr()).await
    }

    /// The client configuration of this namespace.
    pub fn client_config(&self) -> ClientConfig {
        ClientConfig {
            namespace: self.namespace.clone(),
            ..Default::default()
        }
    }

    /// The worker configuration of this namespace for `tasks`.
    pub fn worker_config(&self, tasks: &[&str]) -> WorkerConfig {
        WorkerConfig {
            namespace: self.namespace.clone(),
            ..WorkerConfig::for_tasks(tasks.iter().copied())
        }
    }

    /// A client on `broker` with `config`.
    pub async fn client_on(&self, broker: DynBroker, config: ClientConfig) -> Client {
        Client::new(broker, config).await.expect("start a client")
    }

    /// A client with the default configuration on a new broker.
    pub async fn client(&self) -> Client {
        self.client_on(self.broker().await, self.client_config())
            .await
    }

    /// A worker on a new broker.
    pub async fn worker(&self, config: WorkerConfig) -> Worker {
        Worker::new(self.broker().await, config)
            .await
            .expect("start a worker")
    }

    /// Start `count` workers of `task` that echo each task's payload back, each on its own
    /// broker. They stop when the returned handles are dropped.
    pub async fn echo_workers(&self, task: &str, count: usize) -> Vec<WorkerGuard> {
        let mut guards = Vec::new();
        for _ in 0..count {
            let worker = self.worker(self.worker_config(&[task])).await;
            guards.push(WorkerGuard::spawn(worker, 16, |task| async move {
                Ok(task.json())
            }));
        }
        guards
    }
}

/// A worker running a handler in the background; dropping the guard shuts it down.
pub struct WorkerGuard {
    shutdown: bgtask_core::ShutdownHandle,
    join: Option<tokio::task::JoinHandle<bgtask_core::Result<()>>>,
}

impl WorkerGuard {
    /// Run `handler` on `worker` with `concurrency`.
    pub fn spawn<F, Fut>(worker: Worker, concurrency: usize, handler: F) -> WorkerGuard
    where
        F: Fn(bgtask_core::TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = bgtask_core::HandlerResult> + Send + 'static,
    {
        let shutdown = worker.shutdown_handle();
        let join = tokio::spawn(worker.run(concurrency, handler));
        WorkerGuard {
            shutdown,
            join: Some(join),
        }
    }

    /// Shut the worker down and wait until `run` returns.
    pub async fn stop(mut self) {
        self.shutdown.shutdown();
        if let Some(join) = self.join.take() {
            join.await.expect("worker task").expect("worker run");
        }
    }
}

impl Drop for WorkerGuard {
    fn drop(&mut self) {
        self.shutdown.shutdown();
    }
}

/// The next message of `subscription` within `wait`, skipping gaps.
pub async fn next_message(subscription: &mut Subscription, wait: Duration) -> Option<Bytes> {
    tokio::time::timeout(wait, async {
        loop {
            match subscription.next().await {
                Some(Incoming::Message(bytes)) => return Some(bytes),
                Some(Incoming::Gap) => continue,
                None => return None,
            }
        }
    })
    .await
    .ok()
    .flatten()
}

/// Generous bound for one item to arrive on a healthy connection.
pub const ARRIVES: Duration = Duration::from_secs(5);

/// The next item of `subscription` within [`ARRIVES`]; panics if none comes or the stream ends.
pub async fn expect_next(subscription: &mut Subscription) -> Incoming {
    tokio::time::timeout(ARRIVES, subscription.next())
        .await
        .expect("nothing arrived")
        .expect("the subscription ended")
}

/// The next item, which must be a message (not a gap).
pub async fn expect_message(subscription: &mut Subscription) -> Bytes {
    match expect_next(subscription).await {
        Incoming::Message(m) => m,
        Incoming::Gap => panic!("unexpected gap"),
    }
}

/// Nothing arrives on `subscription` within `wait`.
pub async fn expect_silence(subscription: &mut Subscription, wait: Duration) {
    if let Ok(item) = tokio::time::timeout(wait, subscription.next()).await {
        panic!("unexpected {item:?}");
    }
}

/// A worker spoken by hand on the wire: it announces its presence for some task names and hands
/// the raw offers it receives to the scenario, which answers them (or not) itself. It stands for
/// a worker that crashed or was cut off after it announced itself, or for a hostile one.
pub struct RawWorker {
    /// Its id.
    pub id: String,
    /// Its offers channel, subscribed.
    pub offers: Subscription,
    broker: DynBroker,
    namespace: bgtask_core::Namespace,
    record: Value,
}

impl RawWorker {
    /// Announce a worker of `tasks` with concurrency `concurrency` whose presence lasts `ttl`
    /// (one join, never renewed).
    pub async fn announce(h: &Harness, tasks: &[&str], concurrency: u64, ttl: Duration) -> Self {
        let namespace = bgtask_core::Namespace::new(h.namespace()).expect("namespace");
        Self::announce_on(h.broker().await, namespace, tasks, concurrency, ttl).await
    }

    /// [`announce`](Self::announce) on `broker` in `namespace`, without a harness.
    pub async fn announce_on(
        broker: DynBroker,
        namespace: bgtask_core::Namespace,
        tasks: &[&str],
        concurrency: u64,
        ttl: Duration,
    ) -> Self {
        let id = bgtask_core::names::random_id();
        let offers = broker
            .subscribe(&namespace.worker_channel(&id))
            .await
            .expect("subscribe the raw worker's offers");
        let record = serde_json::json!({
            "id": id, "host": "raw", "pid": 1, "tasks": tasks, "targets": [],
            "concurrency": concurrency, "in_flight": 0, "level": "v1",
            "ttl_ms": u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX), "started_ms": 0,
        });
        let raw = RawWorker {
            id,
            offers,
            broker,
            namespace,
            record,
        };
        raw.presence("join").await;
        raw
    }

    /// Announce `event` (`join`, `beat`, `leave`) with this worker's record, and hold a
    /// presence lease for a join or beat.
    pub async fn presence(&self, event: &str) {
        let ttl = Duration::from_millis(self.record["ttl_ms"].as_u64().unwrap_or(1000));
        if event != "leave" {
            let request = bgtask_core::LeaseRequest::new(ttl).note(self.record.to_string());
            self.broker
                .acquire(&self.namespace.workers_key(), request)
                .await
                .expect("presence lease");
        }
        let message = serde_json::json!({
            "v": 1, "kind": "presence", "id": self.id, "reason": event, "body": self.record,
        });
        self.broker
            .publish(
                &self.namespace.presence_channel(),
                Bytes::from(message.to_string()),
            )
            .await
            .expect("announce");
    }

    /// The next offer received within `wait`, as JSON.
    pub async fn next_offer(&mut self, wait: Duration) -> Option<Value> {
        let bytes = next_message(&mut self.offers, wait).await?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Send `message` (a JSON object without `v`, `id`, `worker`) about `offer` to its creator.
    pub async fn answer(&self, offer: &Value, kind: &str, extra: Value) {
        let mut message = serde_json::json!({
            "v": 1, "kind": kind, "id": offer["id"], "worker": self.id,
        });
        if let (Some(m), Some(e)) = (message.as_object_mut(), extra.as_object()) {
            m.extend(e.clone());
        }
        self.broker
            .publish(
                offer["reply_to"].as_str().expect("reply_to"),
                Bytes::from(message.to_string()),
            )
            .await
            .expect("answer an offer");
    }
}
