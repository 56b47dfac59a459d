//! Prometheus metrics of one node (SPEC §7), rendered in the text exposition format.
//!
//! A small registry of our own rather than a process-global recorder: several nodes can run
//! in one process (the demo, the in-process test harness) and each must export its own
//! numbers. Label sets are bounded by services × peers; nothing is labelled per connection.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

/// Histogram buckets for mesh latencies, in seconds: dense below a millisecond, where a
/// node pair on a LAN lives, and out to 10 s for timeouts.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
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

#[derive(Default, Clone)]
struct Hist {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

struct Family {
    help: &'static str,
    kind: Kind,
    labels: &'static [&'static str],
    values: BTreeMap<Vec<String>, f64>,
    hists: BTreeMap<Vec<String>, Hist>,
}

/// Every metric family of SPEC §7: (name, type, labels, help).
const FAMILIES: &[(&str, Kind, &[&str], &str)] = &[
    ("meshnode_build_info", Kind::Gauge, &["version"], "Build information; always 1."),
    ("meshnode_tunnels_opened_total", Kind::Counter, &["service", "peer", "result"], "Tunnel opens by service, serving peer and result (ok, refused, timeout, no_endpoint, ...)."),
    ("meshnode_tunnels_active", Kind::Gauge, &["service"], "Tunnels currently open, inbound and outbound."),
    ("meshnode_tunnel_bytes_total", Kind::Counter, &["service", "direction"], "Payload bytes carried by tunnels; direction is sent (towards the mesh peer) or received."),
    ("meshnode_http_requests_total", Kind::Counter, &["service", "peer", "code"], "HTTP requests proxied, by service, serving peer and status code."),
    ("meshnode_http_request_duration_seconds", Kind::Histogram, &["service", "peer"], "Time from request start to response headers."),
    ("meshnode_peer_rtt_seconds", Kind::Gauge, &["peer"], "Smoothed QUIC round-trip time to the peer."),
    ("meshnode_quic_lost_packets_total", Kind::Counter, &["peer"], "QUIC packets declared lost on this node's connection to the peer."),
    ("meshnode_quic_migrations_total", Kind::Counter, &[], "QUIC path migrations (this node's rebinds and peers' address changes)."),
    ("meshnode_endpoint_ejections_total", Kind::Counter, &["service", "peer"], "Times an endpoint was ejected after consecutive failures."),
    ("meshnode_retries_total", Kind::Counter, &["service", "reason"], "Attempts retried on another endpoint, by reason."),
    ("meshnode_registry_connected", Kind::Gauge, &[], "1 while the registry backend is reachable, else 0."),
    ("meshnode_registry_updates_total", Kind::Counter, &[], "Registry record changes applied to this node's view."),
    ("meshnode_inbound_rejected_total", Kind::Counter, &["reason"], "Inbound streams refused (malformed, forbidden, unknown service, draining, ...)."),
];

/// A node's metrics.
pub struct Metrics {
    families: Mutex<BTreeMap<&'static str, Family>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every family described from start-up.
    pub fn new() -> Metrics {
        let families = FAMILIES
            .iter()
            .map(|&(name, kind, labels, help)| {
                (
                    name,
                    Family {
                        help,
                        kind,
                        labels,
                        values: BTreeMap::new(),
                        hists: BTreeMap::new(),
                    },
                )
            })
            .collect();
        let m = Metrics {
            families: Mutex::new(families),
        };
        m.set("meshnode_build_info", &[env!("CARGO_PKG_VERSION")], 1.0);
        m.add("meshnode_quic_migrations_total", &[], 0.0);
        m
    }

    fn with<R>(
        &self,
        name: &str,
        labels: &[&str],
        f: impl FnOnce(&mut Family, Vec<String>) -> R,
    ) -> Option<R> {
        let mut fams = self.families.lock().unwrap_or_else(|p| p.into_inner());
        let fam = fams.get_mut(name)?;
        debug_assert_eq!(fam.labels.len(), labels.len(), "labels of {name}");
        if fam.labels.len() != labels.len() {
            return None;
        }
        let key = labels.iter().map(|s| s.to_string()).collect();
        Some(f(fam, key))
    }

    /// Adds `v` to a counter or gauge.
    pub fn add(&self, name: &str, labels: &[&str], v: f64) {
        self.with(name, labels, |fam, key| {
            *fam.values.entry(key).or_insert(0.0) += v
        });
    }

    /// Increments a counter by one.
    pub fn inc(&self, name: &str, labels: &[&str]) {
        self.add(name, labels, 1.0);
    }

    /// Sets a gauge.
    pub fn set(&self, name: &str, labels: &[&str], v: f64) {
        self.with(name, labels, |fam, key| {
            fam.values.insert(key, v);
        });
    }

    /// Raises a counter to `v` if it is below (for totals sampled from elsewhere).
    pub fn set_counter(&self, name: &str, labels: &[&str], v: f64) {
        self.with(name, labels, |fam, key| {
            let e = fam.values.entry(key).or_insert(0.0);
            if v > *e {
                *e = v;
            }
        });
    }

    /// Records one observation in a histogram.
    pub fn observe(&self, name: &str, labels: &[&str], v: f64) {
        self.with(name, labels, |fam, key| {
            let h = fam.hists.entry(key).or_insert_with(|| Hist {
                counts: vec![0; LATENCY_BUCKETS.len()],
                ..Hist::default()
            });
            for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
                if v <= *b {
                    h.counts[i] += 1;
                }
            }
            h.sum += v;
            h.count += 1;
        });
    }

    /// The current value of a counter or gauge (tests, status).
    pub fn get(&self, name: &str, labels: &[&str]) -> f64 {
        self.with(name, labels, |fam, key| {
            fam.values.get(&key).copied().unwrap_or(0.0)
        })
        .unwrap_or(0.0)
    }

    /// The Prometheus text exposition of every family.
    pub fn render(&self) -> String {
        let fams = self.families.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::with_capacity(4096);
        for (name, fam) in fams.iter() {
            let _ = writeln!(out, "# HELP {name} {}", fam.help);
            let _ = writeln!(out, "# TYPE {name} {}", fam.kind.as_str());
            for (key, v) in &fam.values {
                let _ = writeln!(out, "{name}{} {}", labels(fam.labels, key, None), num(*v));
            }
            for (key, h) in &fam.hists {
                for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
                    let le = num(*b);
                    let _ = writeln!(
                        out,
                        "{name}_bucket{} {}",
                        labels(fam.labels, key, Some(&le)),
                        h.counts[i]
                    );
                }
                let _ = writeln!(
                    out,
                    "{name}_bucket{} {}",
                    labels(fam.labels, key, Some("+Inf")),
                    h.count
                );
                let _ = writeln!(
                    out,
                    "{name}_sum{} {}",
                    labels(fam.labels, key, None),
                    num(h.sum)
                );
                let _ = writeln!(
                    out,
                    "{name}_count{} {}",
                    labels(fam.labels, key, None),
                    h.count
                );
            }
        }
        out
    }
}

fn num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

fn labels(names: &[&str], values: &[String], le: Option<&str>) -> String {
    if names.is_empty() && le.is_none() {
        return String::new();
    }
    let mut parts: Vec<String> = names
        .iter()
        .zip(values)
        .map(|(n, v)| format!("{n}=\"{}\"", escape(v)))
        .collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    format!("{{{}}}", parts.join(","))
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
    }

    #[test]
    fn counters_histograms_and_escaping() {
        let m = Metrics::new();
        m.inc("meshnode_tunnels_opened_total", &["echo", "node-b", "ok"]);
        m.inc("meshnode_tunnels_opened_total", &["echo", "node-b", "ok"]);
        m.observe(
            "meshnode_http_request_duration_seconds",
            &["web", "n\"1"],
            0.0003,
        );
        let text = m.render();
        assert!(text.contains(
            "meshnode_tunnels_opened_total{service=\"echo\",peer=\"node-b\",result=\"ok\"} 2"
        ));
        assert!(text.contains("le=\"0.0005\"} 1"));
        assert!(text.contains("le=\"0.00025\"} 0"));
        assert!(text.contains("peer=\"n\\\"1\""));
        assert_eq!(
            m.get("meshnode_tunnels_opened_total", &["echo", "node-b", "ok"]),
            2.0
        );
    }
}
