//! Distributed tracing with real parts: two `meshnode` processes on a real etcd, a real
//! HTTP/1.1 application and a TCP echo behind node-b, and a real OTLP/HTTP receiver (Python,
//! `opentelemetry-proto` decoding `ExportTraceServiceRequest`) that both nodes export to.
//! Python comes from the test venv (`common::test_python`); without `opentelemetry.proto`
//! there the tests are skipped with a note, except in CI (`CI=true`), where that fails them.

mod common;

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use common::cluster::{self, until, Cluster};
use common::process::{free_tcp, http_get, NodeProcess};
use common::*;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const LIMIT: Duration = Duration::from_secs(150);
/// The application's trace: every HTTP request below continues it.
const APP_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const APP_PARENT: &str = "00f067aa0ba902b7";
const HTTP_REQUESTS: usize = 20;
const TCP_CONNECTIONS: usize = 10;
/// OTLP `Span.kind` values.
const SERVER: u64 = 2;
const CLIENT: u64 = 3;
/// OTLP `Status.code` ERROR.
const STATUS_ERROR: u64 = 2;

/// A running `otlp_receiver.py`; killed when dropped.
struct Receiver {
    _child: Child,
    addr: SocketAddr,
}

impl Receiver {
    async fn start(mode: &str) -> Result<Receiver> {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/otlp_receiver.py");
        let mut child = Command::new(test_python())
            .arg(script)
            .arg(mode)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().context("receiver stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .context("OTLP receiver did not start within 30 s")??
            .context("OTLP receiver exited")?;
        let port: u16 = line
            .strip_prefix("READY ")
            .and_then(|p| p.trim().parse().ok())
            .with_context(|| format!("unexpected receiver line {line:?}"))?;
        Ok(Receiver {
            _child: child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        })
    }

    async fn doc(&self) -> Result<Value> {
        let (code, body) = http_get(self.addr, "/spans").await?;
        ensure!(code == 200, "receiver answered {code}");
        Ok(serde_json::from_str(&body)?)
    }

    async fn spans(&self) -> Result<Vec<Value>> {
        Ok(self.doc().await?["spans"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }
}

fn tracing_section(endpoint: &str) -> String {
    format!(
        "[tracing]\notlp_endpoint = \"{endpoint}\"\nsample_ratio = 1.0\n\
         headers = {{ x-tenant = \"mesh-test\" }}\n"
    )
}

/// An HTTP/1.1 application that keeps the `traceparent` of every request it gets; `/fail`
/// answers 500.
async fn traced_app(seen: Arc<Mutex<Vec<String>>>) -> Result<SocketAddr> {
    use http_body_util::Full;
    use hyper::body::{Bytes, Incoming};
    use hyper::{Request, Response, StatusCode};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let seen = seen.clone();
                    async move {
                        if let Some(tp) = req.headers().get("traceparent") {
                            let tp = String::from_utf8_lossy(tp.as_bytes()).into_owned();
                            seen.lock().unwrap_or_else(|p| p.into_inner()).push(tp);
                        }
                        let mut resp = Response::new(Full::new(Bytes::from_static(b"ok")));
                        if req.uri().path() == "/fail" {
                            *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                        }
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// A GET through the proxy, with the application's traceparent; returns the status and the
/// time it took.
async fn get(proxy: SocketAddr, path: &str, traceparent: Option<&str>) -> Result<(u16, Duration)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let started = Instant::now();
    let mut s = tokio::net::TcpStream::connect(proxy).await?;
    let tp = traceparent
        .map(|t| format!("traceparent: {t}\r\n"))
        .unwrap_or_default();
    let req = format!("GET {path} HTTP/1.1\r\nHost: web\r\n{tp}Connection: close\r\n\r\n");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        s.write_all(req.as_bytes()).await?;
        s.read_to_end(&mut raw).await
    })
    .await
    .context("proxy answer timed out")??;
    let text = String::from_utf8_lossy(&raw);
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status in {text:?}"))?;
    Ok((code, started.elapsed()))
}

/// Two nodes: node-b serves `web` (HTTP) and `echo` (TCP); node-a has the proxy and an
/// outbound for `echo`. Each exports to `endpoint_a` / `endpoint_b`.
struct Pair {
    _cluster: Cluster,
    a: NodeProcess,
    b: NodeProcess,
    proxy: SocketAddr,
    echo: SocketAddr,
}

async fn pair(endpoint_a: &str, endpoint_b: &str, web: SocketAddr) -> Result<Pair> {
    // node-c's certificate is for the retry test's third node.
    let cluster = Cluster::new(&["node-a", "node-b", "node-c"]).await?;
    let echo_target = echo_server().await?;
    let b_body = format!(
        "[[service]]\nname = \"web\"\nprotocol = \"http\"\ntarget = \"{web}\"\n\
         [[service]]\nname = \"echo\"\nprotocol = \"tcp\"\ntarget = \"{echo_target}\"\n{}",
        tracing_section(endpoint_b)
    );
    let b = cluster.node("node-b", &b_body).await?;
    let (proxy, echo) = (free_tcp()?, free_tcp()?);
    let a_body = format!(
        "[http_proxy]\nlisten = \"{proxy}\"\n[[outbound]]\nservice = \"echo\"\nlisten = \"{echo}\"\n{}",
        tracing_section(endpoint_a)
    );
    let a = cluster.node("node-a", &a_body).await?;
    until(
        "node-a sees web and echo on node-b",
        Duration::from_secs(20),
        async || {
            let (_, body) = a.get("/status").await?;
            let doc: Value = serde_json::from_str(&body)?;
            let ready = |name: &str| {
                doc["services"].as_array().is_some_and(|all| {
                    all.iter().any(|s| {
                        s["name"] == name
                            && s["endpoints"].as_array().is_some_and(|e| !e.is_empty())
                    })
                })
            };
            Ok(ready("web") && ready("echo"))
        },
    )
    .await?;
    Ok(Pair {
        _cluster: cluster,
        a,
        b,
        proxy,
        echo,
    })
}

fn attr<'a>(span: &'a Value, key: &str) -> &'a Value {
    &span["attributes"][key]
}

fn node_of(span: &Value) -> &str {
    span["resource"]["service.instance.id"]
        .as_str()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_of_both_nodes_form_one_trace_with_the_application() -> Result<()> {
    if !python_module_ready("opentelemetry.proto").await? {
        return Ok(());
    }
    tokio::time::timeout(LIMIT, async {
        let receiver = Receiver::start("ok").await?;
        let endpoint = format!("http://{}", receiver.addr);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let web = traced_app(seen.clone()).await?;
        let p = pair(&endpoint, &endpoint, web).await?;

        let app_tp = format!("00-{APP_TRACE}-{APP_PARENT}-01");
        for i in 0..HTTP_REQUESTS {
            let (code, _) = get(p.proxy, &format!("/item/{i}"), Some(&app_tp)).await?;
            ensure!(code == 200, "request {i}: {code}");
        }
        let (code, _) = get(p.proxy, "/fail", None).await?;
        ensure!(code == 500, "/fail answered {code}");
        for i in 0..TCP_CONNECTIONS {
            let data = format!("tunnel {i}");
            let back = roundtrip(p.echo, data.as_bytes()).await?;
            ensure!(back == data.as_bytes(), "echo {i}");
        }

        // node-a: 21 HTTP + 10 tunnel client spans; node-b: as many server spans.
        let want = 2 * (HTTP_REQUESTS + 1 + TCP_CONNECTIONS);
        until("every span exported", Duration::from_secs(30), async || {
            Ok(receiver.spans().await?.len() >= want)
        })
        .await?;
        let spans = receiver.spans().await?;
        ensure!(spans.len() == want, "{} spans, want {want}", spans.len());
        let by_id: HashMap<&str, &Value> = spans
            .iter()
            .map(|s| (s["span_id"].as_str().unwrap_or_default(), s))
            .collect();

        for s in &spans {
            let node = node_of(s);
            ensure!(s["resource"]["service.name"] == "meshnode", "{s}");
            ensure!(s["resource"]["service.version"].is_string(), "{s}");
            ensure!(s["content_type"] == "application/x-protobuf", "{s}");
            ensure!(
                s["x_tenant"] == "mesh-test",
                "configured headers are sent: {s}"
            );
            match s["kind"].as_u64() {
                Some(CLIENT) => {
                    ensure!(node == "node-a", "client span from {node}: {s}");
                    ensure!(attr(s, "meshnode.peer") == "node-b", "{s}");
                    ensure!(attr(s, "network.peer.address") == "127.0.0.1", "{s}");
                }
                Some(SERVER) => {
                    ensure!(node == "node-b", "server span from {node}: {s}");
                    ensure!(attr(s, "meshnode.peer") == "node-a", "{s}");
                    let spiffe = attr(s, "meshnode.peer.spiffe_id")
                        .as_str()
                        .unwrap_or_default();
                    ensure!(
                        spiffe.starts_with("spiffe://") && spiffe.ends_with("/node/node-a"),
                        "{s}"
                    );
                    ensure!(attr(s, "network.peer.address") == "127.0.0.1", "{s}");
                    // The callee's span is the caller's child, in the caller's trace.
                    let parent = s["parent_span_id"].as_str().unwrap_or_default();
                    let caller = by_id
                        .get(parent)
                        .with_context(|| format!("server span's parent not exported: {s}"))?;
                    ensure!(caller["kind"] == CLIENT && caller["trace_id"] == s["trace_id"]);
                    ensure!(caller["name"] == s["name"], "{s} / {caller}");
                }
                _ => anyhow::bail!("unexpected kind: {s}"),
            }
        }

        // HTTP: both spans carry the request; node-a's continue the application's trace.
        let http: Vec<&Value> = spans
            .iter()
            .filter(|s| s["name"] == "GET" && attr(s, "url.path") != "/fail")
            .collect();
        ensure!(http.len() == 2 * HTTP_REQUESTS, "{} GET spans", http.len());
        let mut callee_spans = HashSet::new();
        for s in &http {
            ensure!(s["trace_id"] == APP_TRACE, "{s}");
            ensure!(attr(s, "http.request.method") == "GET", "{s}");
            ensure!(attr(s, "server.address") == "web", "{s}");
            ensure!(attr(s, "meshnode.service") == "web", "{s}");
            ensure!(attr(s, "http.response.status_code") == 200, "{s}");
            ensure!(
                attr(s, "url.path")
                    .as_str()
                    .is_some_and(|p| p.starts_with("/item/")),
                "{s}"
            );
            ensure!(s["status_code"] != STATUS_ERROR, "{s}");
            if s["kind"] == CLIENT {
                ensure!(
                    s["parent_span_id"] == APP_PARENT,
                    "caller's span is the app's child: {s}"
                );
            } else {
                callee_spans.insert(s["span_id"].as_str().unwrap_or_default().to_string());
            }
        }
        // The application behind node-b saw the same trace, its parent the callee's span.
        let seen = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut parents = HashSet::new();
        for tp in seen.iter().filter(|tp| tp.contains(APP_TRACE)) {
            let parts: Vec<&str> = tp.split('-').collect();
            ensure!(parts.len() == 4 && parts[3] == "01", "{tp}");
            parents.insert(parts[2].to_string());
        }
        ensure!(
            parents == callee_spans,
            "target's parents {parents:?} vs callee spans {callee_spans:?}"
        );

        // An application error: both spans report it (a client span from 400, a server span
        // from 500), in a trace of their own.
        let failed: Vec<&Value> = spans
            .iter()
            .filter(|s| attr(s, "url.path") == "/fail")
            .collect();
        ensure!(failed.len() == 2, "{failed:?}");
        for s in failed {
            ensure!(attr(s, "http.response.status_code") == 500, "{s}");
            ensure!(s["status_code"] == STATUS_ERROR, "{s}");
            ensure!(s["trace_id"] != APP_TRACE, "{s}");
        }

        // Tunnels: one trace per connection, bytes counted on both sides.
        let tunnels: Vec<&Value> = spans.iter().filter(|s| s["name"] == "tunnel").collect();
        ensure!(
            tunnels.len() == 2 * TCP_CONNECTIONS,
            "{} tunnel spans",
            tunnels.len()
        );
        let traces: HashSet<&str> = tunnels
            .iter()
            .filter_map(|s| s["trace_id"].as_str())
            .collect();
        ensure!(
            traces.len() == TCP_CONNECTIONS,
            "one trace per connection: {traces:?}"
        );
        for s in &tunnels {
            ensure!(attr(s, "meshnode.service") == "echo", "{s}");
            ensure!(attr(s, "meshnode.bytes_to_peer").as_i64() > Some(0), "{s}");
            ensure!(s["status_code"] != STATUS_ERROR, "{s}");
            if s["kind"] == CLIENT {
                ensure!(s["parent_span_id"] == "", "a new trace per connection: {s}");
            }
        }
        // Spans reached the collector: nothing dropped.
        for node in [&p.a, &p.b] {
            let (_, metrics) = node.get("/metrics").await?;
            ensure!(
                metrics.contains("meshnode_trace_spans_dropped_total 0"),
                "{}",
                metrics
                    .lines()
                    .filter(|l| l.contains("trace"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        Ok(())
    })
    .await
    .context("test timed out")?
}

/// The worst time of `n` GETs and `n` echo round trips through the pair, all successful.
async fn traffic(p: &Pair, n: usize) -> Result<Duration> {
    let mut worst = Duration::ZERO;
    for i in 0..n {
        let (code, took) = get(p.proxy, &format!("/item/{i}"), None).await?;
        ensure!(code == 200, "request {i}: {code}");
        let started = Instant::now();
        ensure!(roundtrip(p.echo, b"ping").await? == b"ping", "echo {i}");
        worst = worst.max(took).max(started.elapsed());
    }
    Ok(worst)
}

fn dropped(metrics: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("meshnode_trace_spans_dropped_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_down_or_failing_costs_traffic_nothing_and_drops_are_counted() -> Result<()> {
    if !python_module_ready("opentelemetry.proto").await? {
        return Ok(());
    }
    tokio::time::timeout(LIMIT, async {
        // node-a exports to a port where nothing listens; node-b to a collector answering 500.
        let failing = Receiver::start("fail").await?;
        let down = closed_port().await?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let web = traced_app(seen).await?;
        let p = pair(
            &format!("http://{down}"),
            &format!("http://{}", failing.addr),
            web,
        )
        .await?;
        let n = 20;
        let worst = traffic(&p, n).await?;
        ensure!(
            worst < Duration::from_secs(1),
            "slowest request or tunnel took {worst:?}"
        );
        // Every span of that traffic is counted as dropped once its export failed (each
        // export gives up within 5 s, retries included).
        for (node, name) in [(&p.a, "node-a"), (&p.b, "node-b")] {
            until(
                &format!("{name} counts its lost spans"),
                Duration::from_secs(30),
                async || {
                    let (_, metrics) = node.get("/metrics").await?;
                    Ok(dropped(&metrics) >= (2 * n) as f64)
                },
            )
            .await?;
        }
        ensure!(
            failing.doc().await?["exports"]["failed"].as_u64() > Some(0),
            "node-b tried"
        );
        // Traffic still flows while exports keep failing.
        let worst = traffic(&p, 5).await?;
        ensure!(
            worst < Duration::from_secs(1),
            "slowest request or tunnel took {worst:?}"
        );
        Ok(())
    })
    .await
    .context("test timed out")?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_are_events_of_the_callers_span_and_refusals_are_errors() -> Result<()> {
    if !python_module_ready("opentelemetry.proto").await? {
        return Ok(());
    }
    tokio::time::timeout(LIMIT, async {
        let receiver = Receiver::start("ok").await?;
        let endpoint = format!("http://{}", receiver.addr);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let web = traced_app(seen).await?;
        let p = pair(&endpoint, &endpoint, web).await?;
        // node-c also serves both services, but nothing listens behind them: it refuses every
        // tunnel and request with 502 (target refused), and the caller retries on node-b.
        let nothing = closed_port().await?;
        let c_body = format!(
            "[[service]]\nname = \"web\"\nprotocol = \"http\"\ntarget = \"{nothing}\"\n\
             [[service]]\nname = \"echo\"\nprotocol = \"tcp\"\ntarget = \"{nothing}\"\n{}",
            tracing_section(&endpoint)
        );
        let _c = p._cluster.node("node-c", &c_body).await?;
        until(
            "node-a sees node-c's endpoints",
            Duration::from_secs(20),
            async || {
                let (_, body) = p.a.get("/status").await?;
                Ok(body.matches("\"node-c\"").count() >= 2)
            },
        )
        .await?;
        for i in 0..HTTP_REQUESTS {
            let (code, _) = get(p.proxy, &format!("/item/{i}"), None).await?;
            ensure!(code == 200, "request {i}: {code}");
            ensure!(roundtrip(p.echo, b"ping").await? == b"ping", "echo {i}");
        }
        // Every span that tried node-c first says so in an event, and was served by node-b.
        let want_node_c = |spans: &[Value]| {
            spans
                .iter()
                .any(|s| node_of(s) == "node-c" && s["name"] == "GET")
                && spans
                    .iter()
                    .any(|s| node_of(s) == "node-c" && s["name"] == "tunnel")
        };
        until(
            "spans of retried work",
            Duration::from_secs(30),
            async || Ok(want_node_c(&receiver.spans().await?)),
        )
        .await?;
        // The last spans of node-a end with its last tunnel: wait for all of node-a's.
        until("node-a's spans", Duration::from_secs(30), async || {
            let spans = receiver.spans().await?;
            Ok(spans.iter().filter(|s| node_of(s) == "node-a").count() >= 2 * HTTP_REQUESTS)
        })
        .await?;
        let spans = receiver.spans().await?;
        let mut retried = HashMap::new();
        for s in spans.iter().filter(|s| node_of(s) == "node-a") {
            ensure!(
                attr(s, "meshnode.peer") == "node-b",
                "served by node-b: {s}"
            );
            ensure!(s["status_code"] != STATUS_ERROR, "{s}");
            for e in s["events"].as_array().into_iter().flatten() {
                ensure!(e["name"] == "attempt failed", "{e}");
                ensure!(e["attributes"]["meshnode.peer"] == "node-c", "{e}");
                ensure!(e["attributes"]["meshnode.retried"] == true, "{e}");
                ensure!(
                    e["attributes"]["network.peer.address"] == "127.0.0.1",
                    "{e}"
                );
                let outcome = e["attributes"]["meshnode.outcome"]
                    .as_str()
                    .unwrap_or_default();
                let want = if s["name"] == "tunnel" {
                    "bad_gateway"
                } else {
                    "status_502"
                };
                ensure!(outcome == want, "{s}");
                *retried
                    .entry(s["name"].as_str().unwrap_or_default().to_string())
                    .or_insert(0) += 1;
            }
        }
        ensure!(
            retried.get("GET") > Some(&0) && retried.get("tunnel") > Some(&0),
            "{retried:?}"
        );
        // node-c's spans: the caller's children, failed, saying why.
        for s in spans.iter().filter(|s| node_of(s) == "node-c") {
            ensure!(
                s["kind"] == SERVER && s["status_code"] == STATUS_ERROR,
                "{s}"
            );
            ensure!(
                s["status_message"]
                    .as_str()
                    .is_some_and(|m| m.contains("target")),
                "{s}"
            );
            let parent = s["parent_span_id"].as_str().unwrap_or_default();
            ensure!(
                spans
                    .iter()
                    .any(|c| c["span_id"] == parent && node_of(c) == "node-a"),
                "{s}"
            );
        }
        Ok(())
    })
    .await
    .context("test timed out")?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_sharing_a_process_export_their_own_spans_and_flush_them_on_drain() -> Result<()> {
    if !python_module_ready("opentelemetry.proto").await? {
        return Ok(());
    }
    tokio::time::timeout(LIMIT, async {
        let receiver = Receiver::start("ok").await?;
        let tracing = tracing_section(&format!("http://{}", receiver.addr));
        let pki = Pki::new(&["node-a", "node-b"])?;
        let reg = memory_mesh();
        let echo = echo_server().await?;
        let b_conf = format!("{}{tracing}", cluster::echo_service(echo));
        let b = start_node(&pki, "node-b", &b_conf, reg.connect()).await?;
        let a_conf =
            format!("[[outbound]]\nservice = \"echo\"\nlisten = \"127.0.0.1:0\"\n{tracing}");
        let a = start_node(&pki, "node-a", &a_conf, reg.connect()).await?;
        wait_endpoints(&a, "echo", 1).await?;
        let out = a.outbound_addr("echo").context("outbound bound")?;
        for _ in 0..TCP_CONNECTIONS {
            ensure!(roundtrip(out, b"x").await? == b"x");
        }
        // A drain ends with a last export: the spans are there as soon as both have stopped,
        // without waiting for the next batch.
        a.drain().await;
        b.drain().await;
        let spans = receiver.spans().await?;
        for (node, kind) in [("node-a", CLIENT), ("node-b", SERVER)] {
            let n = spans
                .iter()
                .filter(|s| node_of(s) == node && s["kind"] == kind)
                .count();
            ensure!(n == TCP_CONNECTIONS, "{node}: {n} spans of kind {kind}");
        }
        ensure!(spans.len() == 2 * TCP_CONNECTIONS, "{} spans", spans.len());
        Ok(())
    })
    .await
    .context("test timed out")?
}
