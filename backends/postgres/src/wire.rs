//! What travels through PostgreSQL: channel identifiers and notification texts.
//!
//! Precise enough for a publisher or subscriber in another language.
//!
//! # Channel identifiers
//!
//! A Broker channel is any UTF-8 string; a PostgreSQL channel is an identifier of at most 63
//! bytes (LISTEN truncates longer ones, a NUL ends it, an unquoted one folds to lower case).
//! Every Broker channel `C` of schema `S` maps to
//!
//! ```text
//! "bgt_" + the first 56 hex digits (lower case) of SHA-256(S + "\0" + C)
//! ```
//!
//! 60 bytes of `[a-z0-9_]`, the same quoted or not. Two channels would meet only on a
//! 224-bit hash collision, and even then every notification carries the full channel name,
//! which subscribers compare before delivering, so two names never share traffic. The schema
//! is part of the hash: brokers on different schemas of one database never meet.
//!
//! # Notification texts
//!
//! A notification's payload is text of at most [`MAX_NOTIFY_BYTES`] (7999) bytes, and
//! identical notifications inside one transaction are merged by the server. Every notification
//! therefore starts with a fresh random message id, and is plain ASCII:
//!
//! ```text
//! 1i<id>:<base64url(channel)>:<base64url(payload)>    the message itself
//! 1r<id>                                              the message is row <id> of <schema>.payloads
//! ```
//!
//! `<id>` is 32 lower-case hex digits (128 random bits); base64url is RFC 4648 §5 without
//! padding. A message whose inline text would exceed 7999 bytes (counting the base64
//! expansion) is inserted as a row of `payloads` (`id`, `channel` = the channel's UTF-8 bytes,
//! `data`, `expires_at`) in the same statement that sends `1r<id>`; subscribers read the row
//! and deliver it only when its `channel` is theirs.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use sha2::{Digest, Sha256};

/// The largest notification payload PostgreSQL accepts, in bytes (`NOTIFY` requires fewer than
/// 8000 with the default 8 KiB block size).
pub const MAX_NOTIFY_BYTES: usize = 7999;

/// The prefix of every channel identifier.
pub const IDENTIFIER_PREFIX: &str = "bgt_";

/// Hex digits of the hash kept in an identifier.
const HASH_HEX_DIGITS: usize = 56;

/// Length of a message id: 32 hex digits.
const ID_LEN: usize = 32;

/// The PostgreSQL channel identifier of Broker channel `channel` in schema `schema`.
pub fn channel_identifier(schema: &str, channel: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(schema.as_bytes());
    hasher.update([0u8]);
    hasher.update(channel.as_bytes());
    let digest = hasher.finalize();
    let mut out = String::with_capacity(IDENTIFIER_PREFIX.len() + HASH_HEX_DIGITS);
    out.push_str(IDENTIFIER_PREFIX);
    for byte in digest.iter().take(HASH_HEX_DIGITS / 2) {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

/// A new message id: 32 lower-case hex digits of randomness.
pub fn message_id() -> String {
    bgtask_core::names::random_id()
}

/// The length of the inline notification of a `payload_len`-byte message on `channel`.
pub fn inline_len(channel: &str, payload_len: usize) -> usize {
    2 + ID_LEN + 1 + b64_len(channel.len()) + 1 + b64_len(payload_len)
}

/// The largest payload that travels inline (in the notification itself) on `channel`; larger
/// ones travel by reference. `None` when the channel name alone is too long for that.
pub fn max_inline_payload(channel: &str) -> Option<usize> {
    let overhead = inline_len(channel, 0);
    let room = MAX_NOTIFY_BYTES.checked_sub(overhead)?;
    // base64 without padding: 4 characters per 3 bytes, 2 or 3 characters for a tail of 1 or 2.
    let mut n = room / 4 * 3;
    while b64_len(n + 1) <= room {
        n += 1;
    }
    Some(n)
}

fn b64_len(bytes: usize) -> usize {
    (bytes * 4).div_ceil(3)
}

/// The inline notification of `payload` on `channel`, if it fits in [`MAX_NOTIFY_BYTES`].
pub fn encode_inline(id: &str, channel: &str, payload: &[u8]) -> Option<String> {
    let len = inline_len(channel, payload.len());
    if len > MAX_NOTIFY_BYTES {
        return None;
    }
    let mut out = String::with_capacity(len);
    out.push_str("1i");
    out.push_str(id);
    out.push(':');
    URL_SAFE_NO_PAD.encode_string(channel.as_bytes(), &mut out);
    out.push(':');
    URL_SAFE_NO_PAD.encode_string(payload, &mut out);
    debug_assert_eq!(out.len(), len);
    Some(out)
}

/// The notification that points at payload row `id`.
pub fn encode_reference(id: &str) -> String {
    format!("1r{id}")
}

/// A notification, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Notice {
    /// The message itself.
    Inline {
        /// Its message id.
        id: String,
        /// The full Broker channel it was published on.
        channel: String,
        /// The payload.
        payload: Vec<u8>,
    },
    /// The message is payload row `id`.
    Reference {
        /// The row's id (and the message id).
        id: String,
    },
}

/// Decode a notification text; `None` for anything that is not one of bgtask's.
pub fn decode(text: &str) -> Option<Notice> {
    let rest = text.strip_prefix('1')?;
    let (kind, rest) = rest.split_at_checked(1)?;
    match kind {
        "i" => {
            let (id, rest) = rest.split_once(':')?;
            let (channel, payload) = rest.split_once(':')?;
            if !valid_id(id) {
                return None;
            }
            let channel = String::from_utf8(URL_SAFE_NO_PAD.decode(channel).ok()?).ok()?;
            let payload = URL_SAFE_NO_PAD.decode(payload).ok()?;
            Some(Notice::Inline {
                id: id.to_owned(),
                channel,
                payload,
            })
        }
        "r" if valid_id(rest) => Some(Notice::Reference {
            id: rest.to_owned(),
        }),
        _ => None,
    }
}

fn valid_id(id: &str) -> bool {
    id.len() == ID_LEN && id.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_safe_and_distinct() {
        let long = "x".repeat(500);
        let names = [
            "a".to_owned(),
            "A".to_owned(),
            "a\0b".to_owned(),
            "a\0c".to_owned(),
            "\"q'".to_owned(),
            format!("{long}1"),
            format!("{long}2"),
            "é✓".to_owned(),
        ];
        let mut seen = std::collections::HashSet::new();
        for name in &names {
            let id = channel_identifier("bgtask", name);
            assert_eq!(id.len(), 60);
            assert!(id.len() <= 63);
            assert!(id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'));
            assert!(seen.insert(id), "{name:?} collided");
        }
        assert_ne!(
            channel_identifier("one", "a"),
            channel_identifier("two", "a")
        );
        // The separator keeps (schema, channel) pairs apart.
        assert_ne!(channel_identifier("ab", "c"), channel_identifier("a", "bc"));
        assert_eq!(channel_identifier("s", "c"), channel_identifier("s", "c"));
    }

    #[test]
    fn inline_round_trip_and_uniqueness() {
        let payload: Vec<u8> = (0..=255u8).collect();
        let a = encode_inline(&message_id(), "ch\0\"x", &payload).unwrap();
        let b = encode_inline(&message_id(), "ch\0\"x", &payload).unwrap();
        assert_ne!(a, b, "two notifications of one message must differ");
        assert!(a.is_ascii());
        match decode(&a).unwrap() {
            Notice::Inline {
                channel,
                payload: p,
                ..
            } => {
                assert_eq!(channel, "ch\0\"x");
                assert_eq!(p, payload);
            }
            other => panic!("{other:?}"),
        }
        let empty = encode_inline(&message_id(), "c", b"").unwrap();
        assert!(
            matches!(decode(&empty), Some(Notice::Inline { payload, .. }) if payload.is_empty())
        );
    }

    #[test]
    fn the_boundary_is_exact() {
        for channel in [
            "c",
            "ab",
            "abc",
            "a longer channel name ✓",
            &"n".repeat(1024),
        ] {
            let max = max_inline_payload(channel).unwrap();
            assert!(inline_len(channel, max) <= MAX_NOTIFY_BYTES, "{channel}");
            assert!(inline_len(channel, max + 1) > MAX_NOTIFY_BYTES, "{channel}");
            let at = encode_inline(&message_id(), channel, &vec![7u8; max]).unwrap();
            assert!(at.len() <= MAX_NOTIFY_BYTES);
            assert!(encode_inline(&message_id(), channel, &vec![7u8; max + 1]).is_none());
        }
        // A name too long for any inline message.
        assert_eq!(max_inline_payload(&"n".repeat(6000)), None);
    }

    #[test]
    fn references_and_garbage() {
        let id = message_id();
        assert_eq!(
            decode(&encode_reference(&id)),
            Some(Notice::Reference { id: id.clone() })
        );
        for bad in [
            "",
            "1",
            "1x",
            "2r00000000000000000000000000000000",
            "1rshort",
            "1i:a:b",
            "1i00000000000000000000000000000000:!!:AA",
            "é",
        ] {
            assert_eq!(decode(bad), None, "{bad:?}");
        }
    }
}
