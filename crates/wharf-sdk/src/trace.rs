//! W3C trace context (`traceparent`), carried across the outbox and the broker so that one trace
//! follows an order through every service.
//!
//! - The consumer runtime reads a delivery's `traceparent` header, and runs the handler inside
//!   that context, as a child span of the publisher's.
//! - `Outbox::enqueue` writes the context in force into the event's headers, as the event's own
//!   span: a child of the handler's, or the root of a new trace outside any.
//! - Application code starts or continues a trace with [`in_context`] (an HTTP request's own
//!   `traceparent`, say).
//!
//! Each step's ids are recorded on a `tracing` span (`trace_id`, `span_id`, `parent_id`), so a
//! log of any service shows the trace it belongs to. Services that run OpenTelemetry pick up the
//! same header (OpenTelemetry's messaging conventions name it `traceparent` too).
//!
//! Why not OpenTelemetry's crates: the format is one line of hex fields (W3C Trace Context
//! level 1), and `opentelemetry` with its SDK and `tracing-opentelemetry` would add a dozen crates
//! and minutes of build on two cores to every user of the SDK. Carrying the context and recording
//! it on `tracing` spans is all the SDK needs; exporting is the application's choice.

use std::fmt;

/// The header (and the AMQP header) that carries the context.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// One position in a trace: the trace, the span, whether it is sampled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    /// The trace, 16 bytes, never all zero.
    pub trace_id: [u8; 16],
    /// The span, 8 bytes, never all zero.
    pub span_id: [u8; 8],
    /// The trace flags (bit 0: sampled).
    pub flags: u8,
}

/// A random trace id: a UUIDv4 (its 6 fixed version and variant bits are allowed in a trace id,
/// which only has to be unique and not all zero).
fn random_trace_id() -> [u8; 16] {
    uuid::Uuid::new_v4().into_bytes()
}

/// A random span id: 8 of a UUIDv4's fully random bytes.
fn random_span_id() -> [u8; 8] {
    let bytes = uuid::Uuid::new_v4().into_bytes();
    [bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5], bytes[10], bytes[11]]
}

impl TraceContext {
    /// The root of a new, sampled trace.
    pub fn new_root() -> TraceContext {
        TraceContext { trace_id: random_trace_id(), span_id: random_span_id(), flags: 1 }
    }

    /// A child span in the same trace.
    pub fn child(&self) -> TraceContext {
        TraceContext { trace_id: self.trace_id, span_id: random_span_id(), flags: self.flags }
    }

    /// Parses a `traceparent` value; `None` for anything that is not a valid version-00 value
    /// (or a later version's, read as the spec says: its first four fields).
    pub fn parse(value: &str) -> Option<TraceContext> {
        let value = value.trim();
        let mut parts = value.split('-');
        let version = parts.next()?;
        let trace_id = parts.next()?;
        let span_id = parts.next()?;
        let flags = parts.next()?;
        let rest = parts.next();
        if version.len() != 2 || version == "ff" || (version == "00" && rest.is_some()) {
            return None;
        }
        u8::from_str_radix(version, 16).ok()?;
        let trace_id: [u8; 16] = hex(trace_id)?;
        let span_id: [u8; 8] = hex(span_id)?;
        let [flags] = hex(flags)?;
        if trace_id.iter().all(|byte| *byte == 0) || span_id.iter().all(|byte| *byte == 0) {
            return None;
        }
        Some(TraceContext { trace_id, span_id, flags })
    }

    /// The trace id as 32 lowercase hex digits.
    pub fn trace_id_hex(&self) -> String {
        to_hex(&self.trace_id)
    }

    /// The span id as 16 lowercase hex digits.
    pub fn span_id_hex(&self) -> String {
        to_hex(&self.span_id)
    }
}

/// The `traceparent` value.
impl fmt::Display for TraceContext {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "00-{}-{}-{:02x}", self.trace_id_hex(), self.span_id_hex(), self.flags)
    }
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn hex<const BYTES: usize>(text: &str) -> Option<[u8; BYTES]> {
    if text.len() != BYTES * 2 || !text.bytes().all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte)) {
        return None;
    }
    let mut out = [0u8; BYTES];
    for (index, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[index * 2..index * 2 + 2], 16).ok()?;
    }
    Some(out)
}

tokio::task_local! {
    static CURRENT: TraceContext;
}

/// The context in force in this task, if any.
pub fn current() -> Option<TraceContext> {
    CURRENT.try_with(|context| *context).ok()
}

/// Runs `work` inside `context` (events written to an outbox in it join its trace).
pub async fn in_context<F: std::future::Future>(context: TraceContext, work: F) -> F::Output {
    CURRENT.scope(context, work).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_round_trips_and_bad_ones_are_refused() {
        let value = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let context = TraceContext::parse(value).unwrap();
        assert_eq!(context.to_string(), value);
        assert_eq!(context.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(context.flags, 1);
        let later_version = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-extra";
        assert!(TraceContext::parse(later_version).is_some(), "a later version is read by its first fields");
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_child_keeps_the_trace_and_takes_a_new_span() {
        let root = TraceContext::new_root();
        let child = root.child();
        assert_eq!(child.trace_id, root.trace_id);
        assert_ne!(child.span_id, root.span_id);
        assert_ne!(TraceContext::new_root().trace_id, root.trace_id);
        assert_eq!(TraceContext::parse(&child.to_string()), Some(child));
    }

    #[tokio::test]
    async fn the_context_is_the_tasks_own() {
        assert_eq!(current(), None);
        let context = TraceContext::new_root();
        assert_eq!(in_context(context, async { current() }).await, Some(context));
        assert_eq!(current(), None);
    }
}
