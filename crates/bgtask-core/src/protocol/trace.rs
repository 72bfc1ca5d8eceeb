//! Trace context across the hop: the creator's W3C `traceparent` and `tracestate`
//! (<https://www.w3.org/TR/trace-context/>) travel in the task's envelope, and the worker's task
//! span is their child.
//!
//! Validation is always on: a worker of any build drops (and counts, in
//! `bgtask_trace_context_dropped_total`) a malformed or oversize value and runs the task without
//! a parent. Reading the creator's span and parenting the worker's span on it use OpenTelemetry
//! through `tracing-opentelemetry`, behind the `opentelemetry` cargo feature.

use crate::metrics;

/// The longest `traceparent` accepted (version `00` is exactly 55 bytes; later versions may
/// append fields).
pub const MAX_TRACEPARENT: usize = 256;

/// The longest `tracestate` accepted (W3C asks to propagate at least 512 bytes).
pub const MAX_TRACESTATE: usize = 512;

/// The most list members of a `tracestate` (W3C's limit).
const MAX_TRACESTATE_MEMBERS: usize = 32;

/// A task's W3C trace context, validated: what the creator's span was when it submitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    traceparent: String,
    tracestate: Option<String>,
}

impl TraceContext {
    /// A trace context from header values; `None` unless `traceparent` is valid. A `tracestate`
    /// that is not valid is left out (the parent stays).
    pub fn new(traceparent: &str, tracestate: Option<&str>) -> Option<TraceContext> {
        if !valid_traceparent(traceparent) {
            return None;
        }
        Some(TraceContext {
            traceparent: traceparent.to_owned(),
            tracestate: tracestate
                .filter(|s| !s.is_empty() && valid_tracestate(s))
                .map(str::to_owned),
        })
    }

    /// The `traceparent` header value: `00-<trace id>-<parent span id>-<flags>`.
    pub fn traceparent(&self) -> &str {
        &self.traceparent
    }

    /// The `tracestate` header value, if the creator had one.
    pub fn tracestate(&self) -> Option<&str> {
        self.tracestate.as_deref()
    }

    /// The trace id: 32 lowercase hex digits.
    pub fn trace_id(&self) -> &str {
        &self.traceparent[3..35]
    }

    /// The fields of a received task, checked: a malformed or oversize value is dropped,
    /// counted and logged, never an error.
    pub(crate) fn from_wire(traceparent: Option<&str>, tracestate: Option<&str>) -> Option<Self> {
        let traceparent = traceparent?;
        let Some(context) = TraceContext::new(traceparent, tracestate) else {
            metrics::trace_context_dropped();
            tracing::debug!(
                len = traceparent.len(),
                "dropped a malformed traceparent; the task runs without a parent span"
            );
            return None;
        };
        if tracestate.is_some_and(|s| !s.is_empty()) && context.tracestate.is_none() {
            metrics::trace_context_dropped();
            tracing::debug!("dropped a malformed tracestate; the traceparent stays");
        }
        Some(context)
    }
}

fn lower_hex(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn not_zero(s: &str) -> bool {
    s.bytes().any(|b| b != b'0')
}

/// `version-traceid-parentid-flags`, lowercase hex, ids not all zeros, version not `ff`;
/// version `00` exactly 55 bytes, a later one 55 or more with a `-` after the flags.
fn valid_traceparent(s: &str) -> bool {
    if s.len() < 55 || s.len() > MAX_TRACEPARENT || !s.is_ascii() {
        return false;
    }
    let b = s.as_bytes();
    let (version, trace_id, parent_id, flags) = (&s[0..2], &s[3..35], &s[36..52], &s[53..55]);
    let dashes = b[2] == b'-' && b[35] == b'-' && b[52] == b'-';
    let rest = match version {
        "00" => s.len() == 55,
        _ => s.len() == 55 || b[55] == b'-',
    };
    dashes
        && rest
        && version != "ff"
        && [version, trace_id, parent_id, flags]
            .iter()
            .all(|f| lower_hex(f))
        && not_zero(trace_id)
        && not_zero(parent_id)
}

/// Printable ASCII, at most [`MAX_TRACESTATE`] bytes and 32 members, each empty or `key=value`.
fn valid_tracestate(s: &str) -> bool {
    s.len() <= MAX_TRACESTATE
        && s.bytes().all(|b| (0x20..=0x7e).contains(&b))
        && s.split(',').count() <= MAX_TRACESTATE_MEMBERS
        && s.split(',').all(|member| {
            let member = member.trim_matches(|c| c == ' ' || c == '\t');
            member.is_empty()
                || member
                    .split_once('=')
                    .is_some_and(|(k, v)| !k.is_empty() && !v.is_empty() && !v.contains('='))
        })
}

#[cfg(feature = "opentelemetry")]
mod otel {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    use opentelemetry::Context;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use super::TraceContext;

    impl TraceContext {
        /// The trace context of the current `tracing` span, if it belongs to an OpenTelemetry
        /// trace (through a `tracing-opentelemetry` layer).
        pub fn current() -> Option<TraceContext> {
            let context = tracing::Span::current().context();
            let span = context.span();
            let span = span.span_context();
            if !span.is_valid() {
                return None;
            }
            let traceparent = format!(
                "00-{}-{}-{:02x}",
                span.trace_id(),
                span.span_id(),
                span.trace_flags().to_u8()
            );
            let tracestate = span.trace_state().header();
            TraceContext::new(&traceparent, Some(&tracestate))
        }

        /// As an OpenTelemetry context whose span is the creator's (remote) span.
        pub fn to_context(&self) -> Context {
            let tp = &self.traceparent;
            let (Ok(trace_id), Ok(span_id), Ok(flags)) = (
                TraceId::from_hex(&tp[3..35]),
                SpanId::from_hex(&tp[36..52]),
                u8::from_str_radix(&tp[53..55], 16),
            ) else {
                return Context::new();
            };
            let state = self
                .tracestate
                .as_deref()
                .and_then(|s| s.parse::<TraceState>().ok())
                .unwrap_or_default();
            let span = SpanContext::new(trace_id, span_id, TraceFlags::new(flags), true, state);
            Context::new().with_remote_span_context(span)
        }

        /// Make `span` a child of this context.
        pub(crate) fn adopt(&self, span: &tracing::Span) {
            if let Err(error) = span.set_parent(self.to_context()) {
                tracing::debug!(?error, "could not set a task span's parent");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn w3c_examples_pass_and_damaged_ones_do_not() {
        assert!(TraceContext::new(GOOD, None).is_some());
        let later = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-holds";
        assert!(TraceContext::new(later, None).is_some());
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01é",
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        ] {
            assert_eq!(TraceContext::new(bad, None), None, "{bad:?}");
        }
        let huge = format!("cc{}-x", &GOOD[2..]).repeat(10);
        assert_eq!(TraceContext::new(&huge, None), None);
    }

    #[test]
    fn a_bad_tracestate_goes_and_the_parent_stays() {
        let ok = TraceContext::new(GOOD, Some("congo=t61rcWkgMzE, rojo=00f067aa0ba902b7")).unwrap();
        assert_eq!(
            ok.tracestate(),
            Some("congo=t61rcWkgMzE, rojo=00f067aa0ba902b7")
        );
        assert_eq!(ok.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let oversize = "a=b,".repeat(200);
        for bad in ["novalue", "a=b\n", "=x", oversize.as_str()] {
            let context = TraceContext::new(GOOD, Some(bad)).unwrap();
            assert_eq!(context.tracestate(), None, "{bad:?}");
        }
    }
}
