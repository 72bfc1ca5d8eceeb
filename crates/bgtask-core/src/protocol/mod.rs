//! The task protocol, built on [`Broker`](crate::Broker) only: [`Client`] (creators),
//! [`Worker`] (workers), [`Blacklist`], and the wire format.

mod admission;
mod blacklist;
mod client;
mod due;
mod envelope;
mod inflight;
mod presence;
mod trace;
mod worker;

use std::sync::atomic::{AtomicU64, Ordering};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::Value;

pub use crate::status::Status;
pub use blacklist::{Blacklist, BlacklistConfig, BlacklistEntry};
pub use client::{
    BroadcastHandle, Client, ClientConfig, ClientEvent, ClientStats, SubmitOptions, TaskHandle,
    DEFAULT_MAX_PAYLOAD, DEFAULT_TIMEOUT, MAX_TIMEOUT,
};
pub use envelope::WIRE_VERSION;
pub use inflight::{keys_in_flight, KeyInFlight, KeysInFlight};
pub use presence::{list_workers, ListedWorker, TaskTotals, WorkerRecord};
pub use trace::{TraceContext, MAX_TRACEPARENT, MAX_TRACESTATE};
pub use worker::{
    AvailableTask, HandlerResult, Outcome, RunningTask, ShutdownHandle, TaskContext, TaskFailure,
    Worker, WorkerConfig, WorkerEvent, WorkerStats,
};

use crate::error::{Error, ErrorDetail, ErrorKind, Result};

/// What the fuzz targets drive: the decoders that see untrusted bytes.
pub(crate) mod fuzz {
    use super::envelope::Message;

    /// Decode a wire message; if it decodes, encode it again and check the result decodes to
    /// the same message. Panics only on a real bug.
    pub fn decode_message(bytes: &[u8]) {
        let Ok(message) = Message::decode(bytes) else {
            return;
        };
        let encoded = message.encode();
        let again = Message::decode(&encoded).expect("a decoded message re-encodes validly");
        assert_eq!(format!("{message:?}"), format!("{again:?}"));
    }

    /// Extract a task key's value from a payload, as a creator does.
    pub fn key_value(payload: &[u8], key: &str) {
        let Ok(text) = std::str::from_utf8(payload) else {
            return;
        };
        let Ok(raw) = serde_json::from_str::<&serde_json::value::RawValue>(text) else {
            return;
        };
        let _ = super::admission::extract_key_value(raw, key);
    }
}

/// What the criterion benchmarks (`benches/hot_paths.rs`) drive: the wire format and the task
/// key, with the envelope fields a creator and a worker fill in. Thin wrappers, nothing more.
pub(crate) mod bench {
    use std::borrow::Cow;

    use bytes::Bytes;
    use serde_json::value::RawValue;

    use super::envelope::{Kind, Message, Status};
    use crate::error::Result;

    /// A task id as a creator writes it: 32 hex digits.
    pub const TASK_ID: &str = "0123456789abcdef0123456789abcdef";
    /// A creator's reply channel in the default namespace.
    pub const REPLY_TO: &str = "bgtask:v1:reply:fedcba9876543210fedcba9876543210";
    /// A worker id: 32 hex digits.
    pub const WORKER_ID: &str = "00112233445566778899aabbccddeeff";

    /// Encode a task offer of the task name `task` as a creator does
    /// (`Message::encode_with_body`): id, reply channel, timeout, deadline, the task key's value
    /// when given, and `payload` serialized straight into the envelope.
    pub fn encode_task(task: &str, key_value: Option<&str>, payload: &RawValue) -> Result<Vec<u8>> {
        let mut message = Message::new(Kind::Task, TASK_ID);
        message.task = Some(Cow::Borrowed(task));
        message.reply_to = Some(Cow::Borrowed(REPLY_TO));
        message.timeout_ms = Some(30_000);
        message.deadline_ms = Some(1_800_000_000_000);
        message.key = key_value.map(Cow::Borrowed);
        Ok(message.encode_with_body(payload)?.bytes)
    }

    /// Encode a successful `done` reply carrying `reply`, as a worker does
    /// (`Message::encode_with_body`).
    pub fn encode_done(reply: &RawValue) -> Result<Vec<u8>> {
        let mut message = Message::new(Kind::Done, TASK_ID);
        message.worker = Some(Cow::Borrowed(WORKER_ID));
        message.status = Some(Status::Success);
        Ok(message.encode_with_body(reply)?.bytes)
    }

    /// Encode a `cancel` message (`Message::encode`, no body), as a creator does when a task
    /// times out.
    pub fn encode_cancel() -> Bytes {
        Message::new(Kind::Cancel, TASK_ID).encode()
    }

    /// A decoded wire message, borrowing from the bytes it was decoded from.
    #[derive(Debug)]
    pub struct Decoded<'a>(Message<'a>);

    impl Decoded<'_> {
        /// The length of the body in bytes (0 without one).
        pub fn body_len(&self) -> usize {
            self.0.body.map_or(0, |b| b.get().len())
        }

        /// Encode the message again (`Message::encode`: the body, already JSON, is copied).
        pub fn encode(&self) -> Bytes {
            self.0.encode()
        }
    }

    /// Decode and check a wire message (`Message::decode`), as a worker decodes a task offer
    /// and a creator a reply.
    pub fn decode(bytes: &[u8]) -> Result<Decoded<'_>> {
        Message::decode(bytes).map(Decoded)
    }

    /// The value of the top-level property `key` of a payload, as a creator extracts its task
    /// key (`admission::extract_key_value`).
    pub fn extract_key_value(payload: &RawValue, key: &str) -> Result<String> {
        super::admission::extract_key_value(payload, key)
    }
}

/// How many tasks of one key value may be in flight at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyLimit {
    /// At most this many (at least 1).
    Max(u64),
    /// No limit; only the blacklist applies.
    Unlimited,
}

impl Default for KeyLimit {
    /// Five tasks per key value, as in node-background-task.
    fn default() -> Self {
        KeyLimit::Max(5)
    }
}

impl Serialize for KeyLimit {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            KeyLimit::Max(n) => s.serialize_u64(*n),
            KeyLimit::Unlimited => s.serialize_str("unlimited"),
        }
    }
}

impl<'de> Deserialize<'de> for KeyLimit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Max(u64),
            Word(String),
        }
        match Repr::deserialize(d)? {
            Repr::Max(n) => Ok(KeyLimit::Max(n)),
            Repr::Word(w) if w == "unlimited" => Ok(KeyLimit::Unlimited),
            Repr::Word(w) => Err(serde::de::Error::custom(format!(
                "expected a number or \"unlimited\", found {w:?}"
            ))),
        }
    }
}

/// A worker's successful reply to a task.
#[derive(Debug, Clone)]
pub struct Reply {
    worker: String,
    body: Box<RawValue>,
}

impl Reply {
    /// The id of the worker that sent it.
    pub fn worker(&self) -> &str {
        &self.worker
    }

    /// The reply as raw JSON text.
    pub fn raw(&self) -> &RawValue {
        &self.body
    }

    /// The reply as a JSON value.
    pub fn json(&self) -> Value {
        serde_json::from_str(self.body.get()).unwrap_or(Value::Null)
    }

    /// The reply deserialized into `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T> {
        decode_raw(&self.body, "reply")
    }
}

impl Reply {
    /// Turn a wire completion into the creator's result.
    pub(crate) fn from_wire(status: Status, worker: String, body: Box<RawValue>) -> Result<Reply> {
        let kind = match status {
            Status::Success => return Ok(Reply { worker, body }),
            Status::Error => ErrorKind::TaskError,
            Status::Failed => ErrorKind::TaskFailed,
        };
        let mut shown: String = body.get().chars().take(200).collect();
        if shown.len() < body.get().len() {
            shown.push('…');
        }
        Err(
            Error::new(kind, format!("worker {worker} reported {status}: {shown}")).with_detail(
                ErrorDetail::Reply {
                    status,
                    reply: body,
                },
            ),
        )
    }
}

fn decode_raw<T: DeserializeOwned>(raw: &RawValue, what: &str) -> Result<T> {
    serde_json::from_str(raw.get()).map_err(|e| {
        Error::new(
            crate::ErrorKind::InvalidInput,
            format!("the {what} does not have the expected shape"),
        )
        .with_source(e)
    })
}

/// A stream of the events sent on `events` from now on; a reader that falls behind the channel's
/// capacity skips the oldest.
fn event_stream<T: Clone + Send + 'static>(
    events: &tokio::sync::broadcast::Sender<T>,
) -> futures::stream::BoxStream<'static, T> {
    use futures::StreamExt;
    use tokio::sync::broadcast::error::RecvError;
    futures::stream::unfold(events.subscribe(), |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(event) => return Some((event, rx)),
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return None,
            }
        }
    })
    .boxed()
}

/// A relaxed atomic counter for statistics.
#[derive(Debug, Default)]
struct Counter(AtomicU64);

impl Counter {
    fn incr(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A duration in whole milliseconds, saturating (never truncating) at `u64::MAX`.
pub(crate) fn duration_millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Serde for durations as whole milliseconds (configuration files).
pub(crate) mod duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(super::duration_millis(*d))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}
