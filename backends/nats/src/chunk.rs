//! Payloads larger than the server's `max_payload`: split into chunks by the publisher,
//! reassembled by each subscription.
//!
//! A payload that fits in one NATS message travels as it is, without headers. A larger one
//! travels as `count` messages on the same subject, each with the header
//! `Bgt-Chunk: <id> <index> <count> <total>`: a random 128-bit message id (hex), the chunk's
//! index from 0, the number of chunks and the payload's total length. One publisher's chunks
//! are sent back to back on one connection, so they arrive in order; chunks of different
//! publishers may interleave, and are told apart by their ids. A subscription that misses a
//! chunk (a reconnect, a full buffer, a publisher that died half-way) drops the partial payload
//! and yields `Gap`.

use async_nats::HeaderMap;
use bytes::{Bytes, BytesMut};

/// The header that marks a chunk.
pub(crate) const HEADER: &str = "Bgt-Chunk";

/// Bytes of each message kept free for the chunk header (`NATS/1.0`, the header line and the
/// blank line take about 100).
pub(crate) const HEADER_RESERVE: usize = 256;

/// At most this many partial payloads are reassembled at once per subscription; the oldest is
/// dropped (with a `Gap`) when another starts.
const MAX_PARTIALS: usize = 16;

/// The chunks of `payload` for a server whose `max_payload` is `max_payload`: `None` when it
/// fits in one message.
pub(crate) fn split(payload: &Bytes, max_payload: usize) -> Option<Vec<(HeaderMap, Bytes)>> {
    if payload.len() <= max_payload {
        return None;
    }
    let size = max_payload.saturating_sub(HEADER_RESERVE).max(1);
    let count = payload.len().div_ceil(size);
    let id = format!("{:032x}", rand::random::<u128>());
    let chunks = (0..count)
        .map(|index| {
            let start = index * size;
            let end = (start + size).min(payload.len());
            let mut headers = HeaderMap::new();
            headers.insert(
                HEADER,
                format!("{id} {index} {count} {}", payload.len()).as_str(),
            );
            (headers, payload.slice(start..end))
        })
        .collect();
    Some(chunks)
}

/// What a subscription makes of one received message.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// A whole payload.
    Message(Bytes),
    /// A payload was lost (a chunk is missing).
    Gap,
    /// A chunk was stored; nothing to deliver yet.
    Pending,
    /// A chunk header that cannot be ours (logged and dropped).
    Malformed,
}

struct Partial {
    id: String,
    next: usize,
    count: usize,
    total: usize,
    buf: BytesMut,
}

/// The partial payloads of one subscription.
pub(crate) struct Reassembler {
    partials: Vec<Partial>,
    max_total: usize,
}

impl Reassembler {
    /// A reassembler that refuses payloads larger than `max_total` bytes.
    pub(crate) fn new(max_total: usize) -> Self {
        Reassembler {
            partials: Vec::new(),
            max_total,
        }
    }

    /// Forget every partial payload (after a gap, their missing chunks will never come).
    /// Returns whether there were any.
    pub(crate) fn clear(&mut self) -> bool {
        let had = !self.partials.is_empty();
        self.partials.clear();
        had
    }

    /// Take one received message: its headers and payload.
    pub(crate) fn push(&mut self, headers: Option<&HeaderMap>, payload: Bytes) -> Step {
        let Some(value) = headers.and_then(|h| h.get(HEADER)) else {
            return Step::Message(payload);
        };
        let Some((id, index, count, total)) = parse(value.as_str()) else {
            return Step::Malformed;
        };
        if count < 2 || index >= count || total > self.max_total || payload.len() > total {
            return Step::Malformed;
        }
        let position = self.partials.iter().position(|p| p.id == id);
        if index == 0 {
            let mut step = Step::Pending;
            if let Some(i) = position {
                // The same id twice cannot happen with random ids; treat it as a loss.
                self.partials.remove(i);
                step = Step::Gap;
            }
            if self.partials.len() >= MAX_PARTIALS {
                self.partials.remove(0);
                step = Step::Gap;
            }
            let mut buf = BytesMut::with_capacity(payload.len() * 2);
            buf.extend_from_slice(&payload);
            self.partials.push(Partial {
                id: id.to_owned(),
                next: 1,
                count,
                total,
                buf,
            });
            return step;
        }
        let Some(i) = position else {
            // Its first chunks were lost.
            return Step::Gap;
        };
        let partial = &mut self.partials[i];
        if partial.next != index
            || partial.count != count
            || partial.total != total
            || partial.buf.len() + payload.len() > total
        {
            self.partials.remove(i);
            return Step::Gap;
        }
        partial.buf.extend_from_slice(&payload);
        partial.next += 1;
        if partial.next < partial.count {
            return Step::Pending;
        }
        let done = self.partials.remove(i);
        if done.buf.len() != done.total {
            return Step::Gap;
        }
        Step::Message(done.buf.freeze())
    }
}

fn parse(value: &str) -> Option<(&str, usize, usize, usize)> {
    let mut parts = value.split(' ');
    let id = parts.next().filter(|id| !id.is_empty())?;
    let index = parts.next()?.parse().ok()?;
    let count = parts.next()?.parse().ok()?;
    let total = parts.next()?.parse().ok()?;
    if parts.next().is_some() {
        return None;
    }
    Some((id, index, count, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(n: usize) -> Bytes {
        (0..n).map(|i| (i % 251) as u8).collect::<Vec<_>>().into()
    }

    #[test]
    fn small_payloads_are_not_split() {
        assert!(split(&payload(1000), 1000).is_none());
        assert!(split(&Bytes::new(), 1000).is_none());
    }

    #[test]
    fn chunks_reassemble_and_fit() {
        let p = payload((1 << 20) + (64 << 10));
        let chunks = split(&p, 1 << 20).unwrap();
        assert_eq!(chunks.len(), 2);
        for (headers, body) in &chunks {
            let header_len = format!(
                "NATS/1.0\r\n{HEADER}: {}\r\n\r\n",
                headers.get(HEADER).unwrap()
            )
            .len();
            assert!(header_len + body.len() <= 1 << 20);
        }
        let mut r = Reassembler::new(64 << 20);
        assert_eq!(
            r.push(Some(&chunks[0].0), chunks[0].1.clone()),
            Step::Pending
        );
        assert_eq!(
            r.push(Some(&chunks[1].0), chunks[1].1.clone()),
            Step::Message(p)
        );
        assert!(!r.clear());
    }

    #[test]
    fn interleaved_publishers_are_told_apart() {
        let (a, b) = (payload(3000), payload(2500).slice(7..));
        let ca = split(&a, 1000).unwrap();
        let cb = split(&b, 1000).unwrap();
        let mut r = Reassembler::new(1 << 20);
        let mut out = Vec::new();
        for i in 0..ca.len().max(cb.len()) {
            for c in [&ca, &cb] {
                if let Some((h, body)) = c.get(i) {
                    if let Step::Message(m) = r.push(Some(h), body.clone()) {
                        out.push(m);
                    }
                }
            }
        }
        assert_eq!(out, vec![b, a]);
    }

    #[test]
    fn a_missing_chunk_is_a_gap() {
        let chunks = split(&payload(3000), 1000).unwrap();
        let mut r = Reassembler::new(1 << 20);
        assert_eq!(
            r.push(Some(&chunks[0].0), chunks[0].1.clone()),
            Step::Pending
        );
        assert_eq!(r.push(Some(&chunks[2].0), chunks[2].1.clone()), Step::Gap);
        // A chunk whose start was never seen.
        assert_eq!(r.push(Some(&chunks[1].0), chunks[1].1.clone()), Step::Gap);
        // A plain message passes through.
        assert_eq!(
            r.push(None, Bytes::from_static(b"x")),
            Step::Message(Bytes::from_static(b"x"))
        );
    }

    #[test]
    fn oversized_or_garbled_chunks_are_refused() {
        let chunks = split(&payload(3000), 1000).unwrap();
        let mut r = Reassembler::new(2000);
        assert_eq!(
            r.push(Some(&chunks[0].0), chunks[0].1.clone()),
            Step::Malformed
        );
        let mut h = HeaderMap::new();
        h.insert(HEADER, "id x 2 10");
        assert_eq!(r.push(Some(&h), Bytes::new()), Step::Malformed);
    }

    #[test]
    fn too_many_partials_drop_the_oldest() {
        let mut r = Reassembler::new(1 << 20);
        for i in 0..MAX_PARTIALS {
            let chunks = split(&payload(2000 + i), 1000).unwrap();
            assert_eq!(
                r.push(Some(&chunks[0].0), chunks[0].1.clone()),
                Step::Pending
            );
        }
        let chunks = split(&payload(2000), 1000).unwrap();
        assert_eq!(r.push(Some(&chunks[0].0), chunks[0].1.clone()), Step::Gap);
        assert!(r.clear());
    }
}
