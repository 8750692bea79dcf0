//! Trace context that travels with an order: W3C `traceparent` values
//! (<https://www.w3.org/TR/trace-context/>) from the ingress request, through the AMQP
//! message's `traceparent` header and the outbox row, to the notifier.
//!
//! A [`TraceParent`] is plain data: parsing and formatting one costs nanoseconds and no
//! span machinery. Spans are exported only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set
//! ([`crate::telemetry::init_service`]); [`exporting`] says so, and the helpers here do
//! OpenTelemetry work only then.

use std::{
    fmt,
    sync::atomic::{AtomicBool, Ordering},
};
use tracing::Span;

/// The AMQP header (and HTTP request header) that carries a [`TraceParent`].
pub const HEADER: &str = "traceparent";

static EXPORTING: AtomicBool = AtomicBool::new(false);

/// True when spans are exported over OTLP (set once at start-up).
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

pub(crate) fn set_exporting() {
    EXPORTING.store(true, Ordering::Relaxed);
}

/// One span's place in a trace: the trace id, the span's id and the sampled flag.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    trace_id: u128,
    span_id: u64,
    flags: u8,
}

impl TraceParent {
    /// Parses a `traceparent` value; None for anything malformed (the caller starts a new
    /// trace instead: a bad header is never an error). Version `00` must be exactly
    /// 55 characters; a later version may append fields after a `-`, which are ignored.
    pub fn parse(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        if b.len() < 55 || (b.len() > 55 && b[55] != b'-') {
            return None;
        }
        if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let version = hex_u8(&b[0..2])?;
        // ff is forbidden; version 00 has nothing after the flags.
        if version == 0xff || (version == 0 && b.len() != 55) {
            return None;
        }
        let trace_id = hex_u128(&b[3..35])?;
        let span_id = hex_u64(&b[36..52])?;
        // Only the flags this version defines (sampled, random) travel on; the spec wants
        // the reserved bits zero when a trace is passed on.
        let flags = hex_u8(&b[53..55])? & 0x03;
        if trace_id == 0 || span_id == 0 {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            flags,
        })
    }

    /// A new trace: random trace and span ids, sampled.
    pub fn new_root() -> Self {
        Self {
            trace_id: nonzero(rand::random::<u128>),
            span_id: nonzero(rand::random::<u64>),
            flags: 1,
        }
    }

    /// A new span in the same trace (a random span id).
    pub fn child(&self) -> Self {
        Self {
            span_id: nonzero(rand::random::<u64>),
            ..*self
        }
    }

    /// The trace id, 32 lowercase hex digits: what log lines carry as `trace_id`.
    pub fn trace_id(&self) -> TraceId {
        TraceId(self.trace_id)
    }

    pub fn span_id(&self) -> u64 {
        self.span_id
    }

    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    pub(crate) fn from_parts(trace_id: u128, span_id: u64, flags: u8) -> Option<Self> {
        (trace_id != 0 && span_id != 0).then_some(Self {
            trace_id,
            span_id,
            flags,
        })
    }

    pub(crate) fn parts(&self) -> (u128, u64, u8) {
        (self.trace_id, self.span_id, self.flags)
    }
}

/// `00-<trace id>-<span id>-<flags>`, the header's value.
impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.span_id, self.flags
        )
    }
}

impl fmt::Debug for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A trace id as log lines show it (32 lowercase hex digits).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TraceId(u128);

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

fn nonzero<T: PartialEq + Default>(mut gen_: impl FnMut() -> T) -> T {
    loop {
        let v = gen_();
        if v != T::default() {
            return v;
        }
    }
}

/// Lowercase hex only, as the specification requires.
fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

fn hex_u128(b: &[u8]) -> Option<u128> {
    b.iter()
        .try_fold(0u128, |acc, &c| Some(acc << 4 | hex_digit(c)? as u128))
}

fn hex_u64(b: &[u8]) -> Option<u64> {
    b.iter()
        .try_fold(0u64, |acc, &c| Some(acc << 4 | hex_digit(c)? as u64))
}

fn hex_u8(b: &[u8]) -> Option<u8> {
    b.iter()
        .try_fold(0u8, |acc, &c| Some(acc << 4 | hex_digit(c)?))
}

/// The trace context of `span` once it continues `parent` (or starts a trace): when
/// exporting, `span` becomes `parent`'s child in OpenTelemetry and its own context is
/// returned, so what is sent on names this span; otherwise a new span id in `parent`'s
/// trace (or a new trace), no OpenTelemetry involved.
pub fn continue_trace(span: &Span, parent: Option<TraceParent>) -> TraceParent {
    if exporting()
        && let Some(own) = otel::adopt(span, parent)
    {
        return own;
    }
    match parent {
        Some(p) => p.child(),
        None => TraceParent::new_root(),
    }
}

/// When exporting, makes `span` a child of `parent` (a remote span). A no-op otherwise.
pub fn set_parent(span: &Span, parent: Option<&TraceParent>) {
    if exporting()
        && let Some(p) = parent
    {
        otel::adopt(span, Some(*p));
    }
}

/// When exporting, links `span` to each of `others` (a batch of many orders' traces).
/// A no-op otherwise.
pub fn link<'a>(span: &Span, others: impl IntoIterator<Item = &'a TraceParent>) {
    if exporting() {
        otel::link(span, others);
    }
}

mod otel {
    use super::TraceParent;
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    use tracing::Span;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    /// At most this many links per span (OpenTelemetry's default limit).
    const MAX_LINKS: usize = 128;

    fn remote(p: &TraceParent) -> SpanContext {
        let (t, s, f) = p.parts();
        SpanContext::new(
            TraceId::from_bytes(t.to_be_bytes()),
            SpanId::from_bytes(s.to_be_bytes()),
            TraceFlags::new(f),
            true,
            TraceState::default(),
        )
    }

    pub(super) fn adopt(span: &Span, parent: Option<TraceParent>) -> Option<TraceParent> {
        if let Some(p) = parent {
            let cx = opentelemetry::Context::new().with_remote_span_context(remote(&p));
            let _ = span.set_parent(cx);
        }
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        if !sc.is_valid() {
            return None;
        }
        TraceParent::from_parts(
            u128::from_be_bytes(sc.trace_id().to_bytes()),
            u64::from_be_bytes(sc.span_id().to_bytes()),
            sc.trace_flags().to_u8(),
        )
    }

    pub(super) fn link<'a>(span: &Span, others: impl IntoIterator<Item = &'a TraceParent>) {
        for p in others.into_iter().take(MAX_LINKS) {
            span.add_link(remote(p));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_on_only_the_flags_the_version_defines() {
        let t = TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-ff")
            .expect("reserved flag bits are not an error");
        assert!(t.to_string().ends_with("-03"), "{t}");
    }

    #[test]
    fn parses_the_specifications_examples_and_refuses_junk() {
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let p = TraceParent::parse(ok).unwrap();
        assert_eq!(p.to_string(), ok);
        assert_eq!(p.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(p.sampled());
        // A later version may carry more after a dash.
        assert!(
            TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xyz")
                .is_some()
        );
        for bad in [
            "",
            "garbage",
            // Upper case, zero ids, version ff, extra text on version 00, wrong dashes.
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01a",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn new_traces_and_children_round_trip() {
        let root = TraceParent::new_root();
        assert_eq!(TraceParent::parse(&root.to_string()), Some(root));
        let child = root.child();
        assert_eq!(child.trace_id(), root.trace_id());
        assert_ne!(child.span_id(), root.span_id());
        let s = Span::none();
        let cont = continue_trace(&s, Some(root));
        assert_eq!(cont.trace_id(), root.trace_id());
        assert_ne!(continue_trace(&s, None).trace_id(), root.trace_id());
    }
}
