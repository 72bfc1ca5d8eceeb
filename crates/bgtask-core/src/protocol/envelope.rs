//! The wire format: every message the protocol publishes, as one JSON object.
//!
//! `docs/protocol.md` is the prose version of this file.

use std::borrow::Cow;
use std::ops::Range;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::error::{Error, Result};
pub(crate) use crate::status::Status;

/// The only wire version this crate speaks (the `v` field).
pub const WIRE_VERSION: u32 = 1;

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
    /// A worker took a directed offer, on the creator's reply channel.
    Accepted,
    /// A worker turned a directed offer down, with a reason, on the creator's reply channel.
    Declined,
    /// A worker joined, is alive (heartbeat), or left, on the namespace's presence channel.
    Presence,
}

/// One wire message. Fields a kind does not use are absent on the wire.
///
/// Decoding borrows from the received bytes wherever JSON allows (strings without escapes, raw
/// bodies), so a message costs no copies until its receiver keeps something.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Message<'a> {
    pub(crate) v: u32,
    pub(crate) kind: Kind,
    #[serde(borrow)]
    pub(crate) id: Cow<'a, str>,
    #[serde(
        borrow,
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "borrowed_str"
    )]
    pub(crate) task: Option<Cow<'a, str>>,
    #[serde(
        borrow,
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "borrowed_str"
    )]
    pub(crate) reply_to: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) deadline_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub(crate) broadcast: bool,
    #[serde(
        borrow,
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "borrowed_str"
    )]
    pub(crate) key: Option<Cow<'a, str>>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub(crate) meta: Option<&'a RawValue>,
    #[serde(
        borrow,
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "borrowed_str"
    )]
    pub(crate) worker: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) status: Option<Status>,
    /// On a directed offer (a task sent to one worker's channel): how long the creator waits
    /// for an answer (`accepted`, `declined`, `progress` or `done`) before it offers the task to
    /// another worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) offer_ms: Option<u64>,
    /// On a directed offer sent for a target: the target it was sent for.
    #[serde(
        borrow,
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "borrowed_str"
    )]
    pub(crate) target: Option<Cow<'a, str>>,
    /// Why a worker declined (`declined`), or what happened (`presence`: join, beat, leave).
    #[serde(
        borrow,
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "borrowed_str"
    )]
    pub(crate) reason: Option<Cow<'a, str>>,
    /// On a keyed task: the creator's lease on the key value's limit key, which the worker
    /// releases with its `done` (see [`Broker::release_and_publish`](crate::Broker::release_and_publish)).
    #[serde(
        borrow,
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "borrowed_str"
    )]
    pub(crate) lease: Option<Cow<'a, str>>,
    /// On a `done`: the worker released the task's `lease` before sending it, so the creator
    /// need not.
    #[serde(default, skip_serializing_if = "is_false")]
    pub(crate) released: bool,
    /// On a task: the creator's W3C trace context (see [`super::trace`]). Read leniently: a
    /// value that is not a string reads as `""`, which the worker drops as malformed; it never
    /// fails the message.
    #[serde(
        borrow,
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient_str"
    )]
    pub(crate) traceparent: Option<Cow<'a, str>>,
    #[serde(
        borrow,
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient_str"
    )]
    pub(crate) tracestate: Option<Cow<'a, str>>,
    /// The task's payload, a progress value or a reply. JSON `null` is a value here, not an
    /// absent field. Always the last field, so [`Message::encode_with_body`] can append it.
    #[serde(
        borrow,
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present_raw"
    )]
    pub(crate) body: Option<&'a RawValue>,
}

/// Deserialize a present field as `Some`, even when it is `null`.
fn present_raw<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<&'de RawValue>, D::Error> {
    <&'de RawValue>::deserialize(d).map(Some)
}

/// Deserialize an optional string borrowing from the input when it has no escapes. (serde's
/// `borrow` borrows a `Cow<str>` field but not an `Option<Cow<str>>`, which it always copies.)
fn borrowed_str<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Cow<'de, str>>, D::Error> {
    struct Str;
    impl<'de> serde::de::Visitor<'de> for Str {
        type Value = Cow<'de, str>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a string")
        }
        fn visit_borrowed_str<E>(self, s: &'de str) -> std::result::Result<Self::Value, E> {
            Ok(Cow::Borrowed(s))
        }
        fn visit_str<E>(self, s: &str) -> std::result::Result<Self::Value, E> {
            Ok(Cow::Owned(s.to_owned()))
        }
        fn visit_string<E>(self, s: String) -> std::result::Result<Self::Value, E> {
            Ok(Cow::Owned(s))
        }
    }
    struct OptionalStr;
    impl<'de> serde::de::Visitor<'de> for OptionalStr {
        type Value = Option<Cow<'de, str>>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a string or null")
        }
        fn visit_none<E>(self) -> std::result::Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E>(self) -> std::result::Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: serde::Deserializer<'de>>(
            self,
            d: D,
        ) -> std::result::Result<Self::Value, D::Error> {
            d.deserialize_str(Str).map(Some)
        }
    }
    d.deserialize_option(OptionalStr)
}

/// Deserialize an optional string that must never fail its message: any other JSON value
/// reads as `Some("")` (present, not valid), `null` as `None`.
fn lenient_str<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Cow<'de, str>>, D::Error> {
    use serde::de::{IgnoredAny, MapAccess, SeqAccess};
    struct Lenient;
    impl<'de> serde::de::Visitor<'de> for Lenient {
        type Value = Option<Cow<'de, str>>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_borrowed_str<E>(self, s: &'de str) -> std::result::Result<Self::Value, E> {
            Ok(Some(Cow::Borrowed(s)))
        }
        fn visit_str<E>(self, s: &str) -> std::result::Result<Self::Value, E> {
            Ok(Some(Cow::Owned(s.to_owned())))
        }
        fn visit_string<E>(self, s: String) -> std::result::Result<Self::Value, E> {
            Ok(Some(Cow::Owned(s)))
        }
        fn visit_unit<E>(self) -> std::result::Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_bool<E>(self, _: bool) -> std::result::Result<Self::Value, E> {
            Ok(Some(Cow::Borrowed("")))
        }
        fn visit_i64<E>(self, _: i64) -> std::result::Result<Self::Value, E> {
            Ok(Some(Cow::Borrowed("")))
        }
        fn visit_u64<E>(self, _: u64) -> std::result::Result<Self::Value, E> {
            Ok(Some(Cow::Borrowed("")))
        }
        fn visit_f64<E>(self, _: f64) -> std::result::Result<Self::Value, E> {
            Ok(Some(Cow::Borrowed("")))
        }
        fn visit_seq<A: SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> std::result::Result<Self::Value, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(Some(Cow::Borrowed("")))
        }
        fn visit_map<A: MapAccess<'de>>(
            self,
            mut map: A,
        ) -> std::result::Result<Self::Value, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(Some(Cow::Borrowed("")))
        }
    }
    d.deserialize_any(Lenient)
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// An encoded message whose body was serialized in place, with where the body lies.
pub(crate) struct Encoded {
    pub(crate) bytes: Vec<u8>,
    pub(crate) body: Range<usize>,
}

impl<'a> Message<'a> {
    /// A message of `kind` about task `id` with every optional field empty.
    pub(crate) fn new(kind: Kind, id: impl Into<Cow<'a, str>>) -> Self {
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
            offer_ms: None,
            target: None,
            reason: None,
            lease: None,
            released: false,
            traceparent: None,
            tracestate: None,
            body: None,
        }
    }

    /// Encode as JSON bytes.
    pub(crate) fn encode(&self) -> Bytes {
        let mut bytes = Vec::with_capacity(192 + self.body.map_or(0, |b| b.get().len()));
        self.write_head(&mut bytes);
        if let Some(body) = self.body {
            bytes.extend_from_slice(b",\"body\":");
            bytes.extend_from_slice(body.get().as_bytes());
        }
        bytes.push(b'}');
        Bytes::from(bytes)
    }

    /// Encode with `body` (this message's own `body` must be `None`) serialized straight into
    /// the message: one pass, no intermediate copy of the payload.
    pub(crate) fn encode_with_body<T: Serialize + ?Sized>(&self, body: &T) -> Result<Encoded> {
        debug_assert!(self.body.is_none());
        let mut bytes = Vec::with_capacity(256);
        self.write_head(&mut bytes);
        bytes.extend_from_slice(b",\"body\":");
        let start = bytes.len();
        serde_json::to_writer(&mut bytes, body).map_err(|e| {
            Error::invalid_input("value is not serializable as JSON").with_source(e)
        })?;
        let end = bytes.len();
        bytes.push(b'}');
        Ok(Encoded {
            bytes,
            body: start..end,
        })
    }

    /// Write every field but `body`, in declaration order, without the closing brace. Written
    /// by hand (field names as literals, only values escaped): the same JSON the derived
    /// `Serialize` produces, at a fraction of its cost, on the path every task takes.
    fn write_head(&self, out: &mut Vec<u8>) {
        // Writing strings and integers into a Vec cannot fail.
        fn string(out: &mut Vec<u8>, name: &str, value: &str) {
            out.extend_from_slice(name.as_bytes());
            let _ = serde_json::to_writer(&mut *out, value);
        }
        fn number(out: &mut Vec<u8>, name: &str, value: u64) {
            out.extend_from_slice(name.as_bytes());
            let _ = serde_json::to_writer(&mut *out, &value);
        }
        number(out, "{\"v\":", u64::from(self.v));
        out.extend_from_slice(match self.kind {
            Kind::Task => b",\"kind\":\"task\"",
            Kind::Progress => b",\"kind\":\"progress\"",
            Kind::Done => b",\"kind\":\"done\"",
            Kind::Cancel => b",\"kind\":\"cancel\"",
            Kind::Accepted => b",\"kind\":\"accepted\"",
            Kind::Declined => b",\"kind\":\"declined\"",
            Kind::Presence => b",\"kind\":\"presence\"",
        });
        string(out, ",\"id\":", &self.id);
        if let Some(task) = &self.task {
            string(out, ",\"task\":", task);
        }
        if let Some(reply_to) = &self.reply_to {
            string(out, ",\"reply_to\":", reply_to);
        }
        if let Some(timeout_ms) = self.timeout_ms {
            number(out, ",\"timeout_ms\":", timeout_ms);
        }
        if let Some(deadline_ms) = self.deadline_ms {
            number(out, ",\"deadline_ms\":", deadline_ms);
        }
        if self.broadcast {
            out.extend_from_slice(b",\"broadcast\":true");
        }
        if let Some(key) = &self.key {
            string(out, ",\"key\":", key);
        }
        if let Some(meta) = self.meta {
            out.extend_from_slice(b",\"meta\":");
            out.extend_from_slice(meta.get().as_bytes());
        }
        if let Some(worker) = &self.worker {
            string(out, ",\"worker\":", worker);
        }
        if let Some(status) = self.status {
            string(out, ",\"status\":", status.as_str());
        }
        if let Some(offer_ms) = self.offer_ms {
            number(out, ",\"offer_ms\":", offer_ms);
        }
        if let Some(target) = &self.target {
            string(out, ",\"target\":", target);
        }
        if let Some(reason) = &self.reason {
            string(out, ",\"reason\":", reason);
        }
        if let Some(lease) = &self.lease {
            string(out, ",\"lease\":", lease);
        }
        if self.released {
            out.extend_from_slice(b",\"released\":true");
        }
        if let Some(traceparent) = &self.traceparent {
            string(out, ",\"traceparent\":", traceparent);
        }
        if let Some(tracestate) = &self.tracestate {
            string(out, ",\"tracestate\":", tracestate);
        }
    }

    /// Decode and check a message: valid JSON, the supported version, and the fields its kind
    /// needs. Never panics, whatever the input.
    pub(crate) fn decode(bytes: &'a [u8]) -> Result<Message<'a>> {
        let msg: Message<'a> = serde_json::from_slice(bytes)
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
            Kind::Accepted => msg.worker.is_none().then_some("worker"),
            Kind::Declined => {
                if msg.worker.is_none() {
                    Some("worker")
                } else if msg.reason.is_none() {
                    Some("reason")
                } else {
                    None
                }
            }
            Kind::Presence => {
                if msg.reason.is_none() {
                    Some("reason")
                } else if msg.body.is_none() {
                    Some("body")
                } else {
                    None
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut m = Message::new(Kind::Task, "abc");
        m.task = Some("echo \"quoted\"".into());
        m.reply_to = Some("r".into());
        m.timeout_ms = Some(5);
        let encoded = m
            .encode_with_body(&serde_json::json!({"a": [1, 2]}))
            .unwrap();
        assert_eq!(&encoded.bytes[encoded.body.clone()], br#"{"a":[1,2]}"#);
        let back = Message::decode(&encoded.bytes).unwrap();
        assert_eq!(back.kind, Kind::Task);
        assert_eq!(back.task.as_deref(), Some("echo \"quoted\""));
        assert_eq!(back.body.unwrap().get(), r#"{"a":[1,2]}"#);
        assert!(
            matches!(back.reply_to, Some(Cow::Borrowed("r"))),
            "strings without escapes are borrowed"
        );
        let reencoded = back.encode();
        let again = Message::decode(&reencoded).unwrap();
        assert_eq!(again.body.unwrap().get(), r#"{"a":[1,2]}"#);
    }

    #[test]
    fn hand_encoding_is_the_derived_encoding() {
        let meta = RawValue::from_string(r#"{"m":[1]}"#.to_owned()).unwrap();
        let body = RawValue::from_string(r#""b\u00e9""#.to_owned()).unwrap();
        let mut full = Message::new(Kind::Task, "i\"d");
        full.task = Some("t\n\u{1}é".into());
        full.reply_to = Some("r".into());
        full.timeout_ms = Some(u64::MAX);
        full.deadline_ms = Some(0);
        full.broadcast = true;
        full.key = Some("k".into());
        full.meta = Some(&meta);
        full.worker = Some("w".into());
        full.status = Some(Status::Error);
        full.offer_ms = Some(250);
        full.target = Some("gpu".into());
        full.reason = Some("busy".into());
        full.lease = Some("l\"1".into());
        full.released = true;
        full.traceparent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
        full.tracestate = Some("a=\"b\"".into());
        full.body = Some(&body);
        let mut empty = Message::new(Kind::Cancel, "x");
        empty.status = Some(Status::Success);
        for kind in [
            Kind::Task,
            Kind::Progress,
            Kind::Done,
            Kind::Cancel,
            Kind::Accepted,
            Kind::Declined,
            Kind::Presence,
        ] {
            for message in [&mut full, &mut empty] {
                message.kind = kind;
                let derived = serde_json::to_vec(&*message).unwrap();
                assert_eq!(message.encode(), derived, "{message:?}");
                if let Some(body) = message.body.take() {
                    let encoded = message.encode_with_body(body).unwrap();
                    message.body = Some(body);
                    assert_eq!(encoded.bytes, derived, "{message:?}");
                    assert_eq!(&encoded.bytes[encoded.body], body.get().as_bytes());
                }
            }
        }
    }

    #[test]
    fn null_body_is_a_value() {
        let m = Message::decode(
            br#"{"v":1,"kind":"done","id":"a","worker":"w","status":"success","body":null}"#,
        )
        .unwrap();
        assert_eq!(m.body.unwrap().get(), "null");
        let m = Message::decode(br#"{"v":1,"kind":"cancel","id":"a","worker":null}"#).unwrap();
        assert_eq!(m.worker, None, "a null optional string is absent");
    }

    #[test]
    fn trace_fields_of_any_json_type_never_fail_the_message() {
        for (value, read) in [
            (r#""00-x""#, Some("00-x")),
            ("null", None),
            ("42", Some("")),
            ("true", Some("")),
            (r#"[1,{"a":[2]}]"#, Some("")),
            (r#"{"deep":{"er":[]}}"#, Some("")),
        ] {
            let text = format!(
                r#"{{"v":1,"kind":"task","id":"a","task":"t","reply_to":"r","timeout_ms":5,"traceparent":{value},"tracestate":{value},"body":{{}}}}"#
            );
            let m = Message::decode(text.as_bytes()).unwrap();
            assert_eq!(m.traceparent.as_deref(), read, "{value}");
            assert_eq!(m.tracestate.as_deref(), read, "{value}");
        }
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
            b"{\"v\":1,\"kind\":\"declined\",\"id\":\"x\",\"worker\":\"w\"}",
            b"{\"v\":1,\"kind\":\"accepted\",\"id\":\"x\"}",
            b"{\"v\":1,\"kind\":\"presence\",\"id\":\"x\",\"reason\":\"join\"}",
        ] {
            let err = Message::decode(bad).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::Protocol, "{bad:?}");
        }
    }
}
