//! The task protocol, built on [`Broker`](crate::Broker) only: [`Client`] (creators),
//! [`Worker`] (workers), [`Blacklist`], and the wire format.

mod blacklist;
mod client;
mod envelope;
mod worker;

use std::sync::atomic::{AtomicU64, Ordering};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::Value;

pub use blacklist::{Blacklist, BlacklistConfig, BlacklistEntry};
pub use client::{
    BroadcastHandle, Client, ClientConfig, ClientEvent, ClientStats, SubmitOptions, TaskHandle,
    DEFAULT_MAX_PAYLOAD, DEFAULT_TIMEOUT, MAX_TIMEOUT,
};
pub use envelope::{Status, WIRE_VERSION};
pub use worker::{
    AvailableTask, HandlerResult, RunningTask, ShutdownHandle, TaskContext, TaskFailure, Worker,
    WorkerConfig, WorkerEvent, WorkerStats,
};

use crate::error::{Error, Result};

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
        let _ = super::client::extract_key_value(raw, key);
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

/// Serde for durations as whole milliseconds (configuration files).
pub(crate) mod duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}
