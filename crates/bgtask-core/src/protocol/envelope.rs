//! The wire format: every message the protocol publishes, as one JSON object.
//!
//! `docs/protocol.md` is the prose version of this file.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::error::{Error, Result};

/// The only wire version this crate speaks (the `v` field).
pub const WIRE_VERSION: u32 = 1;

/// How a worker completed a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The task did what it was asked.
    Success,
    /// The task ran and reports an error; the creator gets
    /// [`ErrorKind::TaskError`](crate::ErrorKind::TaskError).
    Error,
    /// The task could not run; the creator gets
    /// [`ErrorKind::TaskFailed`](crate::ErrorKind::TaskFailed).
    Failed,
}

impl Status {
    /// The lowercase wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Success => "success",
            Status::Error => "error",
            Status::Failed => "failed",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The kind of a wire message (the `kind` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Kind {
    /// A task, on a task or target channel.
    Task,
    /// A progress report, on the creator's reply channel.
    Progress,
    /// The task's completion, on the creator's reply channel.
    Done,
    /// The creator cancelled the task or stopped waiting for it, on the cancel channel.
    Cancel,
}

/// One wire message. Fields a kind does not use are absent on the wire.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Message {
    pub(crate) v: u32,
    pub(crate) kind: Kind,
    pub(crate) id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) task: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) reply_to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) deadline_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub(crate) broadcast: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) meta: Option<Box<RawValue>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) worker: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) status: Option<Status>,
    /// The task's payload, a progress value or a reply. JSON `null` is a value here, not an
    /// absent field.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present_raw"
    )]
    pub(crate) body: Option<Box<RawValue>>,
}

/// Deserialize a present field as `Some`, even when it is `null`.
fn present_raw<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(d).map(Some)
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl Message {
    /// A message of `kind` about task `id` with every optional field empty.
    pub(crate) fn new(kind: Kind, id: impl Into<String>) -> Self {
        Message {
            v: WIRE_VERSION,
            kind,
            id: id.into(),
            task: None,
            reply_to: None,
            timeout_ms: None,
            deadline_ms: None,
            broadcast: false,
            key: None,
            meta: None,
            worker: None,
            status: None,
            body: None,
        }
    }

    /// Encode as JSON bytes.
    pub(crate) fn encode(&self) -> Bytes {
        // Serializing this struct cannot fail: every field is a string, number, bool or raw JSON.
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    /// Decode and check a message: valid JSON, the supported version, and the fields its kind
    /// needs. Never panics, whatever the input.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Message> {
        let msg: Message = serde_json::from_slice(bytes)
            .map_err(|e| Error::protocol("malformed message").with_source(e))?;
        if msg.v != WIRE_VERSION {
            return Err(Error::protocol(format!(
                "unsupported wire version {} (this side speaks {WIRE_VERSION})",
                msg.v
            )));
        }
        if msg.id.is_empty() || msg.id.len() > 128 {
            return Err(Error::protocol("message id must be 1 to 128 bytes"));
        }
        let missing = match msg.kind {
            Kind::Task => {
                if msg.task.is_none() {
                    Some("task")
                } else if msg.reply_to.is_none() {
                    Some("reply_to")
                } else if msg.timeout_ms.is_none() {
                    Some("timeout_ms")
                } else if msg.body.is_none() {
                    Some("body")
                } else {
                    None
                }
            }
            Kind::Progress => msg.body.is_none().then_some("body"),
            Kind::Done => {
                if msg.status.is_none() {
                    Some("status")
                } else if msg.body.is_none() {
                    Some("body")
                } else {
                    None
                }
            }
            Kind::Cancel => None,
        };
        match missing {
            Some(field) => Err(Error::protocol(format!(
                "{:?} message without the field {field:?}",
                msg.kind
            ))),
            None => Ok(msg),
        }
    }
}

/// Serialize any value as raw JSON.
pub(crate) fn to_raw<T: Serialize + ?Sized>(value: &T) -> Result<Box<RawValue>> {
    serde_json::value::to_raw_value(value)
        .map_err(|e| Error::invalid_input("value is not serializable as JSON").with_source(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut m = Message::new(Kind::Task, "abc");
        m.task = Some("echo".into());
        m.reply_to = Some("r".into());
        m.timeout_ms = Some(5);
        m.body = Some(to_raw(&serde_json::json!({"a": [1, 2]})).unwrap());
        let back = Message::decode(&m.encode()).unwrap();
        assert_eq!(back.kind, Kind::Task);
        assert_eq!(back.body.unwrap().get(), r#"{"a":[1,2]}"#);
    }

    #[test]
    fn null_body_is_a_value() {
        let m = Message::decode(
            br#"{"v":1,"kind":"done","id":"a","worker":"w","status":"success","body":null}"#,
        )
        .unwrap();
        assert_eq!(m.body.unwrap().get(), "null");
    }

    #[test]
    fn garbage_is_a_protocol_error() {
        for bad in [
            &b""[..],
            b"\xff\xfe",
            b"{",
            b"[]",
            b"{\"v\":2,\"kind\":\"cancel\",\"id\":\"x\"}",
            b"{\"v\":1,\"kind\":\"task\",\"id\":\"x\"}",
            b"{\"v\":1,\"kind\":\"nope\",\"id\":\"x\"}",
            b"{\"v\":1,\"kind\":\"cancel\",\"id\":\"\"}",
        ] {
            let err = Message::decode(bad).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::Protocol, "{bad:?}");
        }
    }
}
