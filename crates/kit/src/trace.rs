//! W3C trace context (`traceparent`) carried through NATS headers, so one
//! request can be followed through every service. The consumer loop makes
//! the incoming context current for the handler; [`crate::Bus`] puts the
//! current one on everything it publishes.

use std::fmt;

pub const TRACEPARENT: &str = "traceparent";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// 32 lowercase hex digits.
    pub trace_id: String,
    /// 16 lowercase hex digits: this span.
    pub span_id: String,
    /// The span this one continues, when it came from a header.
    pub parent_span_id: Option<String>,
    pub sampled: bool,
}

tokio::task_local! {
    static CURRENT: TraceContext;
}

fn random_hex(bytes: usize) -> String {
    use rand::RngCore;
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    if buf.iter().all(|b| *b == 0) {
        buf[0] = 1;
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl TraceContext {
    /// A new trace.
    pub fn new_root() -> Self {
        Self {
            trace_id: random_hex(16),
            span_id: random_hex(8),
            parent_span_id: None,
            sampled: true,
        }
    }

    /// Parses `00-<trace>-<parent>-<flags>`; anything malformed is `None`.
    pub fn parse(header: &str) -> Option<Self> {
        let mut parts = header.trim().split('-');
        let (version, trace, parent, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if !is_hex(version, 2)
            || version == "ff"
            || !is_hex(trace, 32)
            || !is_hex(parent, 16)
            || !is_hex(flags, 2)
        {
            return None;
        }
        if trace.bytes().all(|b| b == b'0') || parent.bytes().all(|b| b == b'0') {
            return None;
        }
        let flags = u8::from_str_radix(flags, 16).ok()?;
        Some(Self {
            trace_id: trace.to_string(),
            span_id: parent.to_string(),
            parent_span_id: None,
            sampled: flags & 1 == 1,
        })
    }

    /// A span continuing this one: same trace, new span id.
    pub fn child(&self) -> Self {
        Self {
            trace_id: self.trace_id.clone(),
            span_id: random_hex(8),
            parent_span_id: Some(self.span_id.clone()),
            sampled: self.sampled,
        }
    }

    /// Continues the header's trace, or starts a new one.
    pub fn continue_from(header: Option<&str>) -> Self {
        header
            .and_then(Self::parse)
            .map_or_else(Self::new_root, |parent| parent.child())
    }

    /// The context of the handler running now, if any.
    pub fn current() -> Option<Self> {
        CURRENT.try_with(Clone::clone).ok()
    }

    /// Runs `fut` with `self` as the current context.
    pub async fn scope<F: std::future::Future>(self, fut: F) -> F::Output {
        CURRENT.scope(self, fut).await
    }
}

impl fmt::Display for TraceContext {
    /// The `traceparent` header value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{}",
            self.trace_id,
            self.span_id,
            if self.sampled { "01" } else { "00" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_continues() {
        let h = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parent = TraceContext::parse(h).unwrap();
        assert_eq!(parent.to_string(), h);
        let child = TraceContext::continue_from(Some(h));
        assert_eq!(child.trace_id, parent.trace_id);
        assert_ne!(child.span_id, parent.span_id);
        assert_eq!(child.parent_span_id.as_deref(), Some("00f067aa0ba902b7"));
    }

    #[test]
    fn refuses_malformed_headers() {
        for bad in [
            "",
            "00-xyz-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        ] {
            assert!(TraceContext::parse(bad).is_none(), "{bad}");
        }
        let fresh = TraceContext::continue_from(Some("garbage"));
        assert!(fresh.parent_span_id.is_none());
        assert!(TraceContext::parse(&fresh.to_string()).is_some());
    }
}
