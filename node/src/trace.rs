//! Distributed tracing (docs/behaviour.md, Tracing): a span per tunnel and per proxied HTTP
//! request on each node it crosses, exported over OTLP/HTTP to Jaeger or an OpenTelemetry
//! Collector.
//!
//! Each node has its own [`Tracer`] (an SDK provider, sampler and export queue), never the
//! process-global one: several nodes share a process in the demo and the tests, and each
//! exports its own spans under its own `service.instance.id`. Without `[tracing]` there is no
//! tracer at all, and every hook below is a branch on `None`: no span, no id, no allocation.
//!
//! The data path sees only [`Span`] (started by [`Span::client`] or [`Span::server`]) and
//! [`TunnelTrace`]; what a span records follows the OpenTelemetry semantic conventions where
//! they exist (`server.address`, `network.peer.address`, `http.request.method`, `url.path`,
//! `http.response.status_code`), plus `meshnode.*` for the mesh's own facts.

mod context;
mod export;

use std::borrow::Cow;
use std::net::SocketAddr;
use std::time::Duration;

use ::metrics::Counter;
use meshnode_transport::tunnel::SpliceOutcome;
use opentelemetry::trace::{
    Span as _, SpanBuilder, SpanKind, Status, TraceContextExt as _, Tracer as _,
    TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider, SpanExporter as _};
use opentelemetry_sdk::Resource;
use tokio::sync::{mpsc, oneshot};

pub use context::{format as format_traceparent, parse as parse_traceparent};
pub use export::{EXPORT_TIMEOUT, INTERVAL, MAX_BATCH, QUEUE};

use crate::config::TracingConfig;

/// The `traceparent` header (W3C Trace Context).
pub const TRACEPARENT: &str = "traceparent";

/// Why tracing could not start (exit 78: the config names something unusable).
#[derive(Debug, thiserror::Error)]
#[error("tracing: {0}")]
pub struct StartError(String);

/// A node's span source, present only with `[tracing]`.
pub struct Tracer {
    sdk: SdkTracer,
    /// Keeps the provider (and with it the export queue) alive.
    _provider: SdkTracerProvider,
    flush: mpsc::Sender<export::FlushRequest>,
    trust_domain: String,
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer").finish_non_exhaustive()
    }
}

impl Tracer {
    /// Builds the exporter, the sampler and the provider of node `node` and starts its export
    /// task on the current runtime. `dropped` counts spans that never reached the collector.
    pub fn start(
        cfg: &TracingConfig,
        node: &str,
        trust_domain: &str,
        dropped: Counter,
    ) -> Result<Tracer, StartError> {
        let headers = cfg.headers.clone().into_iter().collect();
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(cfg.traces_url())
            .with_timeout(EXPORT_TIMEOUT)
            .with_headers(headers)
            .build()
            .map_err(|e| StartError(e.to_string()))?;
        let resource = Resource::builder_empty()
            .with_attributes([
                KeyValue::new("service.name", cfg.service_name.clone()),
                KeyValue::new("service.instance.id", node.to_string()),
                KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            ])
            .build();
        exporter.set_resource(&resource);
        let (queue, spans) = export::queue(dropped.clone());
        let (flush, flushes) = mpsc::channel(4);
        tokio::spawn(export::run(exporter, spans, flushes, dropped, INTERVAL));
        let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(cfg.sample_ratio)));
        let provider = SdkTracerProvider::builder()
            .with_span_processor(queue)
            .with_sampler(sampler)
            .with_resource(resource)
            .build();
        Ok(Tracer {
            sdk: provider.tracer("meshnode"),
            _provider: provider,
            flush,
            trust_domain: trust_domain.to_string(),
        })
    }

    /// Sends every span ended so far, waiting at most `deadline` (a drain's last step).
    pub async fn flush(&self, deadline: Duration) {
        let (ack, done) = oneshot::channel();
        let asked = async {
            if self.flush.send(ack).await.is_ok() {
                let _ = done.await;
            }
        };
        let _ = tokio::time::timeout(deadline, asked).await;
    }

    /// Starts a span of `kind`. The sampler decides first: attributes (`extra` and those of
    /// `start`) are built only for a span that records, so an unsampled request costs ids and
    /// its `traceparent`, nothing more.
    fn start_span(
        &self,
        kind: SpanKind,
        start: &Start<'_>,
        extra: impl FnOnce() -> Vec<KeyValue>,
    ) -> Span {
        let name = match start.http {
            Some((method, _)) => method_name(method),
            None => Cow::Borrowed("tunnel"),
        };
        let parent = match start.traceparent.and_then(parse_traceparent) {
            Some(cx) => Context::new().with_remote_span_context(cx),
            None => Context::new(),
        };
        let builder = SpanBuilder::from_name(name).with_kind(kind.clone());
        let mut sdk = self.sdk.build_with_context(builder, &parent);
        if sdk.is_recording() {
            let mut attrs = extra();
            attrs.push(KeyValue::new("meshnode.service", start.service.to_string()));
            attrs.push(KeyValue::new("server.address", start.service.to_string()));
            if let Some(port) = start.port {
                attrs.push(KeyValue::new("server.port", i64::from(port)));
            }
            if let Some((method, path)) = start.http {
                attrs.push(KeyValue::new("http.request.method", method_name(method)));
                attrs.push(KeyValue::new("url.path", path.to_string()));
            }
            sdk.set_attributes(attrs);
        }
        let traceparent = format_traceparent(sdk.span_context());
        Span(Some(Box::new(Live {
            sdk,
            server: kind == SpanKind::Server,
            traceparent,
        })))
    }
}

/// An HTTP method's name, without an allocation for the common ones.
fn method_name(method: &http::Method) -> Cow<'static, str> {
    use http::Method;
    let known = [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::HEAD,
        Method::OPTIONS,
        Method::PATCH,
        Method::CONNECT,
        Method::TRACE,
    ];
    const NAMES: [&str; 9] = [
        "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE",
    ];
    match known.iter().position(|m| m == method) {
        Some(i) => Cow::Borrowed(NAMES[i]),
        None => Cow::Owned(method.to_string()),
    }
}

/// What a span is about, known when it starts.
#[derive(Debug, Clone, Copy)]
pub struct Start<'a> {
    /// The mesh service.
    pub service: &'a str,
    /// The `traceparent` the request arrived with, if any: the span becomes its child.
    pub traceparent: Option<&'a str>,
    /// The port asked for (CONNECT, a tunnel to a named port).
    pub port: Option<u16>,
    /// An HTTP request's method and path; `None` for a tunnel.
    pub http: Option<(&'a http::Method, &'a str)>,
}

/// The node at the other end of an inbound stream or request.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    /// Its node name, from its certificate.
    pub node: &'a str,
    /// Its address, as this node sees it.
    pub addr: SocketAddr,
}

struct Live {
    sdk: opentelemetry_sdk::trace::Span,
    server: bool,
    /// What the next hop is sent: this span as its parent.
    traceparent: String,
}

/// One tunnel's or request's span on this node; nothing at all when tracing is off. Ends
/// when dropped (or at [`Span::end`]).
pub struct Span(Option<Box<Live>>);

impl Span {
    /// No span (tracing off).
    pub const OFF: Span = Span(None);

    /// The caller's span of a tunnel or request this node sends into the mesh.
    pub fn client(tracer: Option<&Tracer>, start: Start<'_>) -> Span {
        match tracer {
            Some(t) => t.start_span(SpanKind::Client, &start, Vec::new),
            None => Span::OFF,
        }
    }

    /// The callee's span of a tunnel or request a peer sent to this node.
    pub fn server(tracer: Option<&Tracer>, start: Start<'_>, caller: Caller<'_>) -> Span {
        let Some(t) = tracer else {
            return Span::OFF;
        };
        let attrs = || {
            let spiffe = format!("spiffe://{}/node/{}", t.trust_domain, caller.node);
            vec![
                KeyValue::new("meshnode.peer", caller.node.to_string()),
                KeyValue::new("meshnode.peer.spiffe_id", spiffe),
                KeyValue::new("network.peer.address", caller.addr.ip().to_string()),
                KeyValue::new("network.peer.port", i64::from(caller.addr.port())),
            ]
        };
        t.start_span(SpanKind::Server, &start, attrs)
    }

    /// The `traceparent` for the next hop (this span as its parent), when tracing.
    pub fn traceparent(&self) -> Option<&str> {
        self.0.as_deref().map(|l| l.traceparent.as_str())
    }

    /// The trace id, when tracing.
    pub fn trace_id(&self) -> Option<String> {
        self.0
            .as_deref()
            .map(|l| format!("{:032x}", l.sdk.span_context().trace_id()))
    }

    /// The recording span, if this one is sampled.
    fn recording(&mut self) -> Option<&mut opentelemetry_sdk::trace::Span> {
        self.0
            .as_deref_mut()
            .map(|l| &mut l.sdk)
            .filter(|s| s.is_recording())
    }

    /// The endpoint that took the work (caller side).
    pub fn peer(&mut self, node: &str, addr: SocketAddr) {
        if let Some(s) = self.recording() {
            s.set_attributes([
                KeyValue::new("meshnode.peer", node.to_string()),
                KeyValue::new("network.peer.address", addr.ip().to_string()),
                KeyValue::new("network.peer.port", i64::from(addr.port())),
            ]);
        }
    }

    /// A failed attempt on `node`, as an event: the endpoint, the outcome (the
    /// `meshnode_tunnels_opened_total` result or `meshnode_retries_total` reason), and whether
    /// the work was retried elsewhere.
    pub fn attempt_failed(&mut self, node: &str, addr: SocketAddr, outcome: &str, retried: bool) {
        if let Some(s) = self.recording() {
            s.add_event(
                "attempt failed",
                vec![
                    KeyValue::new("meshnode.peer", node.to_string()),
                    KeyValue::new("network.peer.address", addr.ip().to_string()),
                    KeyValue::new("meshnode.outcome", outcome.to_string()),
                    KeyValue::new("meshnode.retried", retried),
                ],
            );
        }
    }

    /// The HTTP status answered, and the mesh's reason when the mesh answered it (the
    /// `meshnode-error` text). An error for a server span from 500 up, for a client span from
    /// 400 up (the OpenTelemetry HTTP conventions), and whenever the mesh refused.
    pub fn status(&mut self, code: http::StatusCode, mesh_reason: Option<&str>) {
        let Some(live) = self.0.as_deref_mut() else {
            return;
        };
        if !live.sdk.is_recording() {
            return;
        }
        live.sdk.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(code.as_u16()),
        ));
        let floor = if live.server { 500 } else { 400 };
        if mesh_reason.is_some() || code.as_u16() >= floor {
            let description = mesh_reason.unwrap_or_default().to_string();
            live.sdk.set_status(Status::error(description));
        }
    }

    /// Marks the span failed, saying why (a refusal, no endpoint, a reset).
    pub fn fail(&mut self, reason: &dyn std::fmt::Display) {
        if let Some(s) = self.recording() {
            s.set_status(Status::error(reason.to_string()));
        }
    }

    /// A tunnel's end: bytes each way, and an error if it did not end cleanly.
    pub fn tunnel_closed(&mut self, outcome: &SpliceOutcome) {
        if let Some(s) = self.recording() {
            s.set_attributes([
                KeyValue::new("meshnode.bytes_to_peer", outcome.to_peer as i64),
                KeyValue::new("meshnode.bytes_from_peer", outcome.from_peer as i64),
            ]);
            if !outcome.is_clean() {
                s.set_status(Status::error("tunnel reset"));
            }
        }
    }

    /// Ends the span now.
    pub fn end(self) {
        drop(self);
    }
}

/// The trace an L4 tunnel carries: the caller's span when tracing, else a trace id of its own
/// with a fresh parent id per attempt, so that both nodes' access logs still share an id.
pub struct TunnelTrace {
    /// The caller's span.
    pub span: Span,
    trace_id: String,
}

impl TunnelTrace {
    /// Starts the trace of one tunnel to `service` (`port` when the application named one).
    pub fn start(tracer: Option<&Tracer>, service: &str, port: Option<u16>) -> TunnelTrace {
        let start = Start {
            service,
            traceparent: None,
            port,
            http: None,
        };
        let span = Span::client(tracer, start);
        let trace_id = span
            .trace_id()
            .unwrap_or_else(|| format!("{:032x}", rand::random::<u128>()));
        TunnelTrace { span, trace_id }
    }

    /// The trace id (access logs).
    pub fn trace_id(&self) -> &str {
        &self.trace_id
    }

    /// The `traceparent` of the next attempt's tunnel header.
    pub fn traceparent(&self) -> String {
        match self.span.traceparent() {
            Some(tp) => tp.to_string(),
            None => format!("00-{}-{:016x}-01", self.trace_id, rand::random::<u64>()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracer(ratio: f64) -> Tracer {
        let cfg = TracingConfig {
            // Nothing listens on port 9 (discard): exports fail, which these tests ignore.
            otlp_endpoint: "http://127.0.0.1:9".into(),
            sample_ratio: ratio,
            service_name: "meshnode".into(),
            headers: Default::default(),
        };
        let m = crate::metrics::Metrics::new();
        let dropped = m.counter("meshnode_trace_spans_dropped_total", &[]);
        Tracer::start(&cfg, "node-a", "mesh.test", dropped).expect("tracer")
    }

    const APP: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[tokio::test]
    async fn spans_continue_the_callers_trace_and_parent_the_next_hop() {
        let t = tracer(1.0);
        let get = http::Method::GET;
        let start = Start {
            service: "web",
            traceparent: Some(APP),
            port: None,
            http: Some((&get, "/x")),
        };
        let client = Span::client(Some(&t), start);
        let sent = client.traceparent().expect("tracing").to_string();
        let cx = parse_traceparent(&sent).expect("valid");
        assert_eq!(
            client.trace_id().as_deref(),
            Some("0af7651916cd43dd8448eb211c80319c")
        );
        assert!(cx.is_sampled());
        assert_ne!(format!("{:016x}", cx.span_id()), "b7ad6b7169203331");
        let caller = Caller {
            node: "node-a",
            addr: "127.0.0.1:1".parse().expect("addr"),
        };
        let server = Span::server(
            Some(&t),
            Start {
                traceparent: Some(&sent),
                ..start
            },
            caller,
        );
        let next = parse_traceparent(server.traceparent().expect("tracing")).expect("valid");
        assert_eq!(next.trace_id(), cx.trace_id());
        assert_ne!(next.span_id(), cx.span_id());
    }

    #[tokio::test]
    async fn parent_based_sampling_and_tracing_off() {
        let never = tracer(0.0);
        let root = TunnelTrace::start(Some(&never), "db", None);
        let tp = root.traceparent();
        assert!(
            tp.ends_with("-00"),
            "a new trace at ratio 0 is not sampled: {tp}"
        );
        assert_eq!(tp, root.traceparent(), "one span, one parent id");
        // A sampled parent is followed even at ratio 0.
        let start = Start {
            service: "db",
            traceparent: Some(APP),
            port: None,
            http: None,
        };
        let followed = Span::client(Some(&never), start);
        assert!(followed.traceparent().expect("tracing").ends_with("-01"));

        let off = TunnelTrace::start(None, "db", None);
        assert!(off.span.traceparent().is_none());
        let (a, b) = (off.traceparent(), off.traceparent());
        assert!(a.contains(off.trace_id()) && b.contains(off.trace_id()));
        assert_ne!(a, b, "without tracing each attempt gets its own parent id");
        assert!(Span::client(None, start).trace_id().is_none());
    }
}
