//! WebSocket through the mesh with real parts: etcd, `meshnode` processes, python `websockets`
//! servers behind node-b and node-c registered as `http` services, python `websockets`
//! clients on node-a's `[http_proxy]` (tests/ws_peer.py). Python comes from the test venv
//! (`common::test_python`); without `websockets` there the tests are skipped with a note,
//! except in CI (`CI=true`), where that fails them. Every wait is bounded.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use common::cluster::Cluster;
use common::process::{free_udp, NodeProcess};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

const LIMIT: Duration = Duration::from_secs(180);
const MESSAGES: usize = 100;

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/ws_peer.py")
}

/// A `websockets` server tagged `tag` (answering every handshake 426 when `reject`); killed
/// when dropped.
async fn ws_server(tag: &str, reject: bool) -> Result<(Child, SocketAddr)> {
    let mut args = vec!["server", tag];
    if reject {
        args.push("reject");
    }
    python_peer("ws_peer.py", &args).await
}

/// Runs the `websockets` client: `connections` WebSockets to `service` through `proxy`, each
/// `MESSAGES` messages both ways; returns its JSON report.
async fn ws_client(
    proxy: SocketAddr,
    service: &str,
    form: &str,
    connections: usize,
) -> Result<serde_json::Value> {
    let out = Command::new(test_python())
        .arg(script())
        .args(["client", &proxy.to_string(), service, form])
        .args([MESSAGES.to_string(), connections.to_string()])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), out)
        .await
        .context("websocket client did not finish within 120 s")??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "websocket client failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value =
        serde_json::from_str(stdout.trim()).with_context(|| format!("client output {stdout:?}"))?;
    eprintln!("{service} {form}: {v}");
    Ok(v)
}

fn http_service(name: &str, target: SocketAddr, protocol: &str) -> String {
    format!("[[service]]\nname = \"{name}\"\nprotocol = \"{protocol}\"\ntarget = \"{target}\"\n")
}

fn proxy_section(addr: SocketAddr) -> String {
    format!("[http_proxy]\nlisten = \"{addr}\"\n")
}

/// Sum of the samples of `name` whose labels include every pair of `labels`, in a
/// Prometheus text exposition.
fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn metrics(node: &NodeProcess) -> Result<String> {
    let (code, text) = node.get("/metrics").await?;
    anyhow::ensure!(code == 200, "/metrics answered {code}");
    Ok(text)
}

/// Waits until `node` routes `service` to `count` endpoints.
async fn wait_service(node: &NodeProcess, service: &str, count: usize) -> Result<()> {
    cluster::until(
        &format!("{service} on {count} endpoints"),
        Duration::from_secs(20),
        async || {
            let (_, body) = node.get("/status").await?;
            let doc: serde_json::Value = serde_json::from_str(&body)?;
            let services = doc["services"].as_array().context("services")?;
            Ok(services.iter().any(|s| {
                s["name"] == service && s["endpoints"].as_array().map(Vec::len) == Some(count)
            }))
        },
    )
    .await?;
    Ok(())
}

/// One request on a fresh connection to the proxy: the answer's head and (by its
/// `content-length`) body; the connection, for what follows a `101`.
async fn exchange(proxy: SocketAddr, request: &str) -> Result<(String, String, TcpStream)> {
    let mut s = TcpStream::connect(proxy).await?;
    s.write_all(request.as_bytes()).await?;
    let mut head = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), async {
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            if s.read(&mut b).await? == 0 {
                bail!("proxy closed after {:?}", String::from_utf8_lossy(&head));
            }
            head.push(b[0]);
        }
        Ok(())
    })
    .await
    .context("no answer head within 20 s")??;
    let head = String::from_utf8(head)?;
    let length = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut body))
        .await
        .context("no body within 20 s")??;
    Ok((head, String::from_utf8_lossy(&body).into_owned(), s))
}

fn upgrade_request(target: &str, host: &str, extra: &str) -> String {
    format!(
        "GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    )
}

/// An HTTP/1.1 application that accepts any upgrade, reads the switched connection to its
/// end, then answers "got N" and closes: a half-close must reach it while its own direction
/// stays open.
async fn half_close_app() -> Result<SocketAddr> {
    use hyper::{body::Incoming, Request, Response};
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|mut req: Request<Incoming>| async move {
                    let on = hyper::upgrade::on(&mut req);
                    tokio::spawn(async move {
                        let Ok(up) = on.await else { return };
                        let mut io = hyper_util::rt::TokioIo::new(up);
                        let mut seen = Vec::new();
                        if io.read_to_end(&mut seen).await.is_ok() {
                            let _ = io.write_all(format!("got {}", seen.len()).as_bytes()).await;
                            let _ = io.shutdown().await;
                        }
                    });
                    let resp = Response::builder()
                        .status(101)
                        .header("connection", "upgrade")
                        .header("upgrade", "websocket")
                        .body(http_body_util::Empty::<bytes::Bytes>::new());
                    Ok::<_, Infallible>(resp.unwrap_or_default())
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    Ok(addr)
}

/// Sends one masked text frame (a client's, RFC 6455 §5.2).
async fn frame_send(
    io: &mut (impl AsyncWriteExt + Unpin),
    opcode: u8,
    payload: &[u8],
) -> Result<()> {
    let mask = rand::random::<[u8; 4]>();
    let mut f = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n => {
            f.push(0x80 | 126);
            f.extend(u16::try_from(n)?.to_be_bytes());
        }
    }
    f.extend(mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    io.write_all(&f).await?;
    Ok(())
}

/// Reads the next data or close frame (a server's: unmasked), skipping pings; (opcode, payload).
async fn frame_recv(io: &mut (impl AsyncReadExt + Unpin)) -> Result<(u8, Vec<u8>)> {
    loop {
        let mut h = [0u8; 2];
        io.read_exact(&mut h).await?;
        let len = match h[1] & 0x7f {
            126 => {
                let mut l = [0u8; 2];
                io.read_exact(&mut l).await?;
                usize::from(u16::from_be_bytes(l))
            }
            127 => bail!("unexpectedly long frame"),
            n => usize::from(n),
        };
        let mut payload = vec![0u8; len];
        io.read_exact(&mut payload).await?;
        if h[0] & 0x0f != 0x9 {
            return Ok((h[0] & 0x0f, payload));
        }
    }
}

/// A WebSocket over HTTP/2 (RFC 8441) through the proxy: extended CONNECT on an h2c
/// connection, then frames written by hand to the `websockets` server; returns its tag.
async fn h2_websocket(proxy: SocketAddr, service: &str) -> Result<String> {
    use http_body_util::Empty;
    let tcp = TcpStream::connect(proxy).await?;
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await?;
    tokio::spawn(conn);
    // One plain request first: the proxy's SETTINGS (extended CONNECT allowed) have arrived
    // by its answer.
    let plain =
        hyper::Request::get(format!("http://{service}/")).body(Empty::<bytes::Bytes>::new())?;
    let _ = sender.send_request(plain).await?;
    let mut req = hyper::Request::builder()
        .method("CONNECT")
        .uri(format!("http://{service}/chat"))
        .header("sec-websocket-version", "13")
        .body(Empty::<bytes::Bytes>::new())?;
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let resp = sender.send_request(req).await?;
    anyhow::ensure!(
        resp.status() == 200,
        "extended CONNECT answered {}",
        resp.status()
    );
    let mut io = hyper_util::rt::TokioIo::new(hyper::upgrade::on(resp).await?);
    frame_send(&mut io, 0x1, b"whoami").await?;
    let (_, tag) = frame_recv(&mut io).await?;
    let tag = String::from_utf8(tag)?;
    for i in 0..MESSAGES {
        let m = format!("h2 message {i} {}", "y".repeat(i * 3));
        frame_send(&mut io, 0x1, m.as_bytes()).await?;
        let (op, back) = frame_recv(&mut io).await?;
        anyhow::ensure!(
            op == 0x1 && back == m.as_bytes(),
            "message {i} came back different"
        );
    }
    frame_send(&mut io, 0x1, format!("burst {MESSAGES}").as_bytes()).await?;
    for i in 0..MESSAGES {
        let (_, got) = frame_recv(&mut io).await?;
        anyhow::ensure!(got == format!("{tag}:{i}").as_bytes(), "pushed message {i}");
    }
    // Close handshake, then the stream ends.
    frame_send(&mut io, 0x8, &1000u16.to_be_bytes()).await?;
    let (op, _) = frame_recv(&mut io).await?;
    anyhow::ensure!(op == 0x8, "no close frame back");
    io.shutdown().await?;
    let mut rest = Vec::new();
    io.read_to_end(&mut rest).await?;
    Ok(tag)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_cross_the_mesh_retried_until_the_101() -> Result<()> {
    if !python_module_ready("websockets").await? {
        return Ok(());
    }
    tokio::time::timeout(LIMIT, async {
        let cluster = Cluster::new(&["node-a", "node-b", "node-c"]).await?;
        let (_sb, wb) = ws_server("B", false).await?;
        let (_sc, wc) = ws_server("C", false).await?;
        let (_sr, reject) = ws_server("R", true).await?;
        let refusing = closed_port().await?;
        let half = half_close_app().await?;
        let b = [
            http_service("ws", wb, "http"),
            // node-b's target refuses every connection: its far node answers 502.
            http_service("wsflaky", refusing, "http"),
            http_service("wsreject", reject, "http"),
            http_service("halfclose", half, "http"),
            http_service("grpcsvc", refusing, "grpc"),
        ]
        .concat();
        let c = [
            http_service("ws", wc, "http"),
            http_service("wsflaky", wc, "http"),
        ]
        .concat();
        let _b = cluster.node("node-b", &b).await?;
        let _c = cluster.node("node-c", &c).await?;
        let proxy = common::process::free_tcp()?;
        // An `[[outbound]]` port of the `ws` service too (mode auto: HTTP served per request).
        let outbound = common::process::free_tcp()?;
        let a_config = format!(
            "{}[[outbound]]\nservice = \"ws\"\nlisten = \"{outbound}\"\n",
            proxy_section(proxy)
        );
        let a = cluster.node("node-a", &a_config).await?;
        for (svc, n) in [("ws", 2), ("wsflaky", 2), ("wsreject", 1), ("halfclose", 1)] {
            wait_service(&a, svc, n).await?;
        }
        wait_service(&a, "grpcsvc", 1).await?;

        // 100 messages each way on each WebSocket, origin form (Host) and absolute form;
        // each connection balanced on its own.
        for form in ["origin", "absolute"] {
            let v = ws_client(proxy, "ws", form, 10).await?;
            assert_eq!(v["ok"], 10, "{form}: {v}");
            let (nb, nc) = (
                v["tags"]["B"].as_u64().unwrap_or(0),
                v["tags"]["C"].as_u64().unwrap_or(0),
            );
            assert_eq!(nb + nc, 10, "{form}: {v}");
        }
        let m = metrics(&a).await?;
        let switched = metric_sum(
            &m,
            "meshnode_http_requests_total",
            &[("service", "ws"), ("code", "101")],
        );
        assert_eq!(switched, 20.0, "each upgrade is one request, code 101");

        // The same through the outbound port: the client names no proxy, the port its service.
        let v = ws_client(outbound, "ws", "origin", 10).await?;
        assert_eq!(v["ok"], 10, "outbound port: {v}");
        let m = metrics(&a).await?;
        let switched = metric_sum(
            &m,
            "meshnode_http_requests_total",
            &[("service", "ws"), ("code", "101")],
        );
        assert_eq!(
            switched, 30.0,
            "upgrades on the outbound port are requests too"
        );

        // WebSocket over HTTP/2 (RFC 8441): answered 200, the target asked with HTTP/1.1.
        for _ in 0..4 {
            let tag = tokio::time::timeout(Duration::from_secs(30), h2_websocket(proxy, "ws"))
                .await
                .context("h2 WebSocket timed out")??;
            assert!(tag == "B" || tag == "C", "{tag}");
        }
        let m = metrics(&a).await?;
        let switched = metric_sum(
            &m,
            "meshnode_http_requests_total",
            &[("service", "ws"), ("code", "200")],
        );
        assert_eq!(
            switched, 4.0,
            "each extended CONNECT is one request, code 200"
        );

        // The first endpoint refuses (its target is down): the upgrade goes to the other
        // before the client sees anything.
        let v = ws_client(proxy, "wsflaky", "origin", 10).await?;
        assert_eq!(v["ok"], 10, "{v}");
        assert_eq!(v["tags"]["C"], 10, "{v}");
        let m = metrics(&a).await?;
        let retries = metric_sum(&m, "meshnode_retries_total", &[("service", "wsflaky")]);
        assert!(retries >= 1.0, "no retry counted:\n{m}");

        // A target that answers the upgrade with something else: passed on as it is.
        let v = ws_client(proxy, "wsreject", "origin", 1).await?;
        assert_eq!(v["statuses"], serde_json::json!([426]), "{v}");
        let (head, body, _) = exchange(proxy, &upgrade_request("/", "wsreject", "")).await?;
        assert!(head.starts_with("HTTP/1.1 426"), "{head}");
        assert_eq!(body, "no WebSocket on R\n");
        // A handshake the `websockets` server finds wrong: its 400, passed on.
        let bad = upgrade_request("/", "ws", "Sec-WebSocket-Version: 7\r\n");
        let (head, body, _) = exchange(proxy, &bad).await?;
        assert!(head.starts_with("HTTP/1.1 400"), "{head}");
        assert!(body.contains("Sec-WebSocket-Version"), "{body}");
        let m = metrics(&a).await?;
        let rejected = metric_sum(
            &m,
            "meshnode_http_requests_total",
            &[("service", "wsreject"), ("code", "426")],
        );
        assert_eq!(rejected, 2.0);

        // An HTTP/2-only service cannot take an HTTP/1.1 upgrade: a clear 400 from the mesh.
        let (head, body, _) = exchange(proxy, &upgrade_request("/", "grpcsvc", "")).await?;
        assert!(head.starts_with("HTTP/1.1 400"), "{head}");
        assert!(head.contains("meshnode-error"), "{head}");
        assert!(body.contains("WebSocket needs an http service"), "{body}");

        // Half-close: the client's FIN reaches the application, whose answer still comes back.
        let (head, _, mut s) = exchange(proxy, &upgrade_request("/", "halfclose", "")).await?;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let lower = head.to_ascii_lowercase();
        assert!(lower.contains("upgrade: websocket"), "{head}");
        assert!(lower.contains("connection: upgrade"), "{head}");
        let data = vec![7u8; 100 * 1024];
        s.write_all(&data).await?;
        s.shutdown().await?;
        let mut back = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut back))
            .await
            .context("no answer after the half-close")??;
        assert_eq!(
            String::from_utf8_lossy(&back),
            format!("got {}", data.len())
        );
        Ok(())
    })
    .await
    .context("test timed out")?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_reaches_each_endpoints_own_port_and_a_stale_one_is_retried() -> Result<()> {
    if !python_module_ready("websockets").await? {
        return Ok(());
    }
    tokio::time::timeout(LIMIT, async {
        let cluster = Cluster::new(&["node-a", "node-b", "node-c", "node-s"]).await?;
        let (_sb, wb) = ws_server("B", false).await?;
        let (_sc, wc) = ws_server("C", false).await?;
        // No `port`: each endpoint advertises its own target's port, so the two differ.
        let (qb, qc) = (free_udp()?, free_udp()?);
        let _b = cluster
            .node_at("node-b", &http_service("ws", wb, "http"), qb, "")
            .await?;
        let _c = cluster
            .node_at("node-c", &http_service("ws", wc, "http"), qc, "")
            .await?;
        let proxy = common::process::free_tcp()?;
        let a = cluster.node("node-a", &proxy_section(proxy)).await?;
        wait_service(&a, "ws", 2).await?;

        // CONNECT ws:PORT goes only to the endpoint that advertises PORT: 20 of 20 each.
        for (port, tag) in [(wb.port(), "B"), (wc.port(), "C")] {
            let v = ws_client(proxy, "ws", &format!("connect:{port}"), 20).await?;
            assert_eq!(v["ok"], 20, "port {port}: {v}");
            assert_eq!(v["tags"][tag], 20, "port {port}: {v}");
        }
        let (head, _, _) = exchange(proxy, "CONNECT ws:1 HTTP/1.1\r\nHost: ws:1\r\n\r\n").await?;
        assert!(head.starts_with("HTTP/1.1 404"), "{head}");

        // node-s lists the mesh by hand, wrongly: node-b advertising node-c's port. node-b
        // answers 404 (it does not advertise that port), and the tunnel goes to node-c.
        let stale = format!(
            "[registry]\nbackend = \"static\"\n\
             [[registry.peers]]\nname = \"node-b\"\naddr = \"{qb}\"\n\
             services = [{{ name = \"ws\", protocol = \"http\", port = {pc} }}]\n\
             [[registry.peers]]\nname = \"node-c\"\naddr = \"{qc}\"\n\
             services = [{{ name = \"ws\", protocol = \"http\", port = {pc} }}]\n",
            pc = wc.port()
        );
        let proxy_s = common::process::free_tcp()?;
        let s = static_node(
            &cluster,
            "node-s",
            &format!("{stale}{}", proxy_section(proxy_s)),
        )
        .await?;
        wait_service(&s, "ws", 2).await?;
        let v = ws_client(proxy_s, "ws", &format!("connect:{}", wc.port()), 20).await?;
        assert_eq!(v["ok"], 20, "{v}");
        assert_eq!(v["tags"]["C"], 20, "{v}");
        let m = metrics(&s).await?;
        let retried = metric_sum(
            &m,
            "meshnode_retries_total",
            &[("service", "ws"), ("reason", "not_found")],
        );
        assert!(retried >= 1.0, "node-b's 404 was never retried:\n{m}");
        Ok(())
    })
    .await
    .context("test timed out")?
}

/// A node of `cluster`'s PKI whose config `body` brings its own `[registry]`.
async fn static_node(cluster: &Cluster, name: &str, body: &str) -> Result<NodeProcess> {
    let admin = common::process::free_tcp()?;
    let dir = cluster.dir.path();
    let cfg = common::process::node_config(dir, name, free_udp()?, admin, body);
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, cfg)?;
    let mut p = NodeProcess::start(&path, admin, &dir.join(format!("{name}.log")))?;
    p.wait_ready(Duration::from_secs(20)).await?;
    Ok(p)
}
