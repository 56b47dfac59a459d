//! Prometheus metrics of one node (docs/README.md, Metrics), through `metrics` and
//! `metrics-exporter-prometheus`.
//!
//! One recorder per node, never the process-global one: several nodes run in one process (the
//! demo, the in-process test harness) and each exports only its own numbers. Handles are
//! registered on that recorder once per label set (see `telemetry`) and updated without a
//! lock or a lookup; the exporter renders them. Label sets are bounded by services × peers;
//! nothing is labelled per connection.

use std::fmt::Write as _;

use ::metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

/// Histogram buckets for mesh latencies, in seconds: dense below a millisecond, where a
/// node pair on a LAN lives, and out to 10 s for timeouts.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// The type of a family.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
    /// Buckets of observations.
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// Every metric family: (name, type, labels, help).
pub const FAMILIES: &[(&str, Kind, &[&str], &str)] = &[
    ("meshnode_app_connections", Kind::Gauge, &[], "Application connections held by the front-ends ([[outbound]] ports, HTTP proxy), against node.max_connections."),
    ("meshnode_build_info", Kind::Gauge, &["version"], "Build information; always 1."),
    ("meshnode_connections_refused_total", Kind::Counter, &["listener", "reason"], "Application connections refused at accept (closed with a reset) by a connection cap: node_limit or listener_limit."),
    ("meshnode_endpoint_ejections_total", Kind::Counter, &["service", "peer"], "Times an endpoint was ejected after consecutive failures."),
    ("meshnode_handshakes_total", Kind::Counter, &["result"], "Inbound QUIC handshakes by what admission made of them: accepted, retry (address validation asked), refused, ignored (over a bound, unvalidated), failed (TLS or identity), at_capacity (the node holds transport.max_peer_connections)."),
    ("meshnode_http_rejected_total", Kind::Counter, &["reason"], "Client requests or connections the caller's HTTP front-end (proxy, outbound ports) refused or closed before routing: malformed, head_too_large, transfer_encoding, duplicate_host, host_mismatch, smuggling, header_timeout, bad_body, h2_protocol_error, h2_enhance_your_calm."),
    ("meshnode_http_request_duration_seconds", Kind::Histogram, &["service", "peer"], "Time from request start to response headers."),
    ("meshnode_http_requests_total", Kind::Counter, &["service", "peer", "code"], "HTTP requests proxied, by service, serving peer and status code."),
    ("meshnode_inbound_rejected_total", Kind::Counter, &["reason"], "Inbound streams refused (malformed, forbidden, unknown service, draining, ...)."),
    ("meshnode_memory_trims_total", Kind::Counter, &[], "Times freed memory was returned to the OS after a wave of inbound peer connections closed (mimalloc's collect on each runtime thread, and glibc's malloc_trim)."),
    ("meshnode_peer_connections_inbound", Kind::Gauge, &[], "Inbound peer (QUIC) connections held, against transport.max_peer_connections."),
    ("meshnode_peer_rtt_seconds", Kind::Gauge, &["peer"], "Smoothed QUIC round-trip time to the peer."),
    ("meshnode_quic_connection_congestion_events_total", Kind::Counter, &["peer", "alpn", "direction"], "Congestion events (window reductions after loss) of this node's sending on its QUIC connection with the peer, by ALPN and direction (outbound: dialled by this node)."),
    ("meshnode_quic_connection_cwnd_bytes", Kind::Gauge, &["peer", "alpn", "direction"], "This node's congestion window on its QUIC connection with the peer, by ALPN and direction."),
    ("meshnode_quic_connection_lost_packets_total", Kind::Counter, &["peer", "alpn", "direction"], "QUIC packets this node sent to the peer and declared lost, by ALPN and direction."),
    ("meshnode_quic_connection_rtt_seconds", Kind::Gauge, &["peer", "alpn", "direction"], "Smoothed round-trip time this node measured on its QUIC connection with the peer, by ALPN and direction."),
    ("meshnode_quic_connection_sent_packets_total", Kind::Counter, &["peer", "alpn", "direction"], "QUIC packets this node sent to the peer (ACK-only packets included), by ALPN and direction."),
    ("meshnode_quic_lost_packets_total", Kind::Counter, &["peer"], "QUIC packets declared lost on this node's dialled connections to the peer (every ALPN)."),
    ("meshnode_quic_migrations_total", Kind::Counter, &[], "QUIC path migrations (this node's rebinds and peers' address changes)."),
    ("meshnode_ready", Kind::Gauge, &[], "1 while /readyz answers 200 (listeners bound, registered, not draining), else 0."),
    ("meshnode_registry_connected", Kind::Gauge, &[], "1 while the registry backend is reachable, else 0."),
    ("meshnode_registry_lease_grants_total", Kind::Counter, &[], "Registry leases granted to this node; each one after the first means the previous lease was lost."),
    ("meshnode_registry_updates_total", Kind::Counter, &[], "Registry record changes applied to this node's view."),
    ("meshnode_retries_total", Kind::Counter, &["service", "reason"], "Attempts retried on another endpoint, by reason."),
    ("meshnode_trace_spans_dropped_total", Kind::Counter, &[], "Spans not exported: the export queue was full, or the collector did not take the batch (unreachable, an error, no answer in time)."),
    ("meshnode_tunnel_bytes_total", Kind::Counter, &["service", "direction"], "Payload bytes carried by tunnels; direction is sent (towards the mesh peer) or received."),
    ("meshnode_tunnels_active", Kind::Gauge, &["service"], "Tunnels currently open, inbound and outbound."),
    ("meshnode_tunnels_opened_total", Kind::Counter, &["service", "peer", "result"], "Tunnel opens by service, serving peer and result (ok, refused, timeout, no_endpoint, ...)."),
];

static METADATA: Metadata<'static> = Metadata::new("meshnode", Level::INFO, Some("meshnode"));

/// A node's metrics registry.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
    let labels: Vec<Label> = labels
        .iter()
        .map(|(k, v)| Label::new(*k, v.to_string()))
        .collect();
    Key::from_parts(name, labels)
}

impl Metrics {
    /// A registry with every family described from start-up.
    pub fn new() -> Metrics {
        let builder = PrometheusBuilder::new();
        // Only an empty bucket list is refused, and this one is a non-empty constant.
        let builder = match builder.set_buckets_for_metric(
            Matcher::Full("meshnode_http_request_duration_seconds".into()),
            LATENCY_BUCKETS,
        ) {
            Ok(b) => b,
            Err(_) => PrometheusBuilder::new(),
        };
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        for &(name, kind, _, help) in FAMILIES {
            let (name, unit) = (name.into(), None::<Unit>);
            match kind {
                Kind::Counter => recorder.describe_counter(name, unit, help.into()),
                Kind::Gauge => recorder.describe_gauge(name, unit, help.into()),
                Kind::Histogram => recorder.describe_histogram(name, unit, help.into()),
            }
        }
        let m = Metrics { recorder, handle };
        m.gauge(
            "meshnode_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))],
        )
        .set(1.0);
        m.counter("meshnode_quic_migrations_total", &[]).absolute(0);
        m
    }

    /// The handle of a counter series; register once, keep it.
    pub fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Counter {
        self.recorder
            .register_counter(&key(name, labels), &METADATA)
    }

    /// The handle of a gauge series; register once, keep it.
    pub fn gauge(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Gauge {
        self.recorder.register_gauge(&key(name, labels), &METADATA)
    }

    /// The handle of a histogram series; register once, keep it.
    pub fn histogram(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Histogram {
        self.recorder
            .register_histogram(&key(name, labels), &METADATA)
    }

    /// The Prometheus text exposition of every family; a family without a series yet still
    /// has its HELP and TYPE lines.
    pub fn render(&self) -> String {
        self.handle.run_upkeep();
        let mut out = self.handle.render();
        for &(name, kind, _, help) in FAMILIES {
            if !out.contains(&format!("# TYPE {name} ")) {
                let _ = writeln!(out, "# HELP {name} {help}");
                let _ = writeln!(out, "# TYPE {name} {}\n", kind.as_str());
            }
        }
        out
    }

    /// The current value of a counter or gauge series, 0 when it has none (tests, the demo).
    /// Reads the rendered exposition: not for the data path.
    pub fn get(&self, name: &str, labels: &[&str]) -> f64 {
        let Some(&(_, _, names, _)) = FAMILIES.iter().find(|f| f.0 == name) else {
            return 0.0;
        };
        let mut series = name.to_string();
        if !names.is_empty() {
            let parts: Vec<String> = names
                .iter()
                .zip(labels)
                .map(|(n, v)| format!("{n}=\"{}\"", escape(v)))
                .collect();
            series = format!("{name}{{{}}}", parts.join(","));
        }
        self.render()
            .lines()
            .find_map(|l| l.strip_prefix(series.as_str())?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_has_help_and_type_from_start() {
        let text = Metrics::new().render();
        for (name, ..) in FAMILIES {
            assert!(text.contains(&format!("# HELP {name} ")), "{name}");
            assert!(text.contains(&format!("# TYPE {name} ")), "{name}");
        }
        assert!(text.contains("meshnode_build_info{version=\""));
        assert!(text.contains("meshnode_quic_migrations_total 0"), "{text}");
    }

    #[test]
    fn counters_histograms_and_escaping() {
        let m = Metrics::new();
        let c = m.counter(
            "meshnode_tunnels_opened_total",
            &[("service", "echo"), ("peer", "node-b"), ("result", "ok")],
        );
        c.increment(1);
        c.increment(1);
        m.histogram(
            "meshnode_http_request_duration_seconds",
            &[("service", "web"), ("peer", "n\"1")],
        )
        .record(0.0003);
        let text = m.render();
        assert!(
            text.contains(
                "meshnode_tunnels_opened_total{service=\"echo\",peer=\"node-b\",result=\"ok\"} 2"
            ),
            "{text}"
        );
        assert!(text.contains("le=\"0.0005\"} 1"), "{text}");
        assert!(text.contains("le=\"0.00025\"} 0"), "{text}");
        assert!(text.contains("peer=\"n\\\"1\""), "{text}");
        assert!(
            !text.contains("quantile"),
            "histograms, not summaries: {text}"
        );
        assert_eq!(
            m.get("meshnode_tunnels_opened_total", &["echo", "node-b", "ok"]),
            2.0
        );
        // Two registries in one process export only their own series.
        let other = Metrics::new();
        assert_eq!(
            other.get("meshnode_tunnels_opened_total", &["echo", "node-b", "ok"]),
            0.0
        );
    }
}
