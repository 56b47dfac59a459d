//! gRPC through the mesh with real grpcio (Python) servers and client: a `grpc` service on
//! node-b and node-c, the client on node-a's `[http_proxy]` (h2c, `:authority` = service),
//! each call balanced on its own; a node SIGKILLed under a call loop (real `meshnode`
//! processes on a real etcd); cancellation and deadlines seen by the server. Python comes
//! from the test venv (`common::test_python`, made by `scripts/deps.sh --test`); without grpcio
//! there the test is skipped with a note, except in CI (`CI=true`), where that fails it.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use common::cluster::{service_endpoints, until, Cluster};
use common::process::{free_tcp, NodeProcess};
use common::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

const LIMIT: Duration = Duration::from_secs(120);
const CALLS: usize = 300;

/// These tests measure timing on 2 cores: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/grpc_peer.py")
}

/// A grpcio server answering `tag`; killed when dropped.
async fn grpc_server(tag: &str) -> Result<(Child, SocketAddr)> {
    python_peer("grpc_peer.py", &["server", tag]).await
}

fn grpc_service(target: SocketAddr) -> String {
    format!("[[service]]\nname = \"greeter\"\nprotocol = \"grpc\"\ntarget = \"{target}\"\nrequest_timeout = \"5s\"\n")
}

/// Calls `Slow` with `grpc-timeout: 300m` over a bare HTTP/2 connection to the proxy;
/// returns the HTTP status, `grpc-status` and `meshnode-error` of the answer's head.
async fn slow_call(proxy: SocketAddr) -> Result<(u16, Option<String>, Option<String>)> {
    use http_body_util::{BodyExt, Full};
    let tcp = tokio::net::TcpStream::connect(proxy).await?;
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await?;
    tokio::spawn(conn);
    // One gRPC message: not compressed, 2 bytes.
    let body = Full::new(bytes::Bytes::from_static(b"\0\0\0\0\x02hi"));
    let req = hyper::Request::builder()
        .method("POST")
        .uri("http://greeter/mesh.Greeter/Slow")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "300m")
        .body(body)?;
    let started = std::time::Instant::now();
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req)).await??;
    let header = |n: &str| {
        resp.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let answer = (
        resp.status().as_u16(),
        header("grpc-status"),
        header("meshnode-error"),
    );
    let _ = resp.into_body().collect().await;
    let took = started.elapsed();
    anyhow::ensure!(
        took < Duration::from_secs(2),
        "answered after {took:?}, not at the 300 ms deadline"
    );
    Ok(answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_calls_are_balanced_per_call_with_trailers_and_statuses() -> Result<()> {
    if !python_module_ready("grpc").await? {
        return Ok(());
    }
    let _serial = SERIAL.lock().await;
    tokio::time::timeout(LIMIT, async {
        let pki = Pki::new(&["node-a", "node-b", "node-c"])?;
        let reg = memory_mesh();
        let (_sb, tb) = grpc_server("B").await?;
        let (_sc, tc) = grpc_server("C").await?;
        let _b = start_node(&pki, "node-b", &grpc_service(tb), reg.connect()).await?;
        let _c = start_node(&pki, "node-c", &grpc_service(tc), reg.connect()).await?;
        let proxy = "[http_proxy]\nlisten = \"127.0.0.1:0\"\n";
        let a = start_node(&pki, "node-a", proxy, reg.connect()).await?;
        wait_endpoints(&a, "greeter", 2).await?;
        let proxy = a.http_proxy_addr().context("proxy bound")?;

        let v = python_json(
            "grpc_peer.py",
            ["client", &proxy.to_string(), &CALLS.to_string()],
        )
        .await?;
        eprintln!("grpc client: {v}");

        // 300 unary calls on one channel (one h2c connection), each balanced on its own.
        assert_eq!(v["unary_failures"], 0, "{v}");
        let (nb, nc) = (
            v["unary"]["B"].as_u64().unwrap_or(0),
            v["unary"]["C"].as_u64().unwrap_or(0),
        );
        assert_eq!(nb + nc, CALLS as u64, "{v}");
        let min = (CALLS as u64) / 5;
        assert!(
            nb >= min && nc >= min,
            "each endpoint ≥ 20 %: B {nb}, C {nc}"
        );

        // Server streaming: every message, in order, from one endpoint.
        assert_eq!(v["stream_count"], 50, "{v}");
        assert_eq!(v["stream_in_order"], true, "{v}");
        assert_eq!(v["stream_one_endpoint"], true, "{v}");

        // An error status with details and a custom trailer, end to end.
        let fail = &v["fail"];
        assert_eq!(fail["code"], "FAILED_PRECONDITION", "{v}");
        assert!(
            fail["details"]
                .as_str()
                .is_some_and(|d| d.starts_with("refused by ")),
            "{v}"
        );
        assert_eq!(fail["custom"], "yes", "{v}");
        assert_eq!(fail["status_details"], "08091204626f6f6d", "{v}");

        // A trailers-only UNAVAILABLE (every call node-b gets) is retried on node-c.
        assert_eq!(v["flaky"]["C"], 20, "{v}");

        // The call's grpc-timeout is the mesh's deadline: answered DEADLINE_EXCEEDED by the
        // mesh (no client-side timer here) while the application still sleeps.
        let (status, grpc_status, mesh_error) = slow_call(proxy).await?;
        assert_eq!(status, 200);
        assert_eq!(grpc_status.as_deref(), Some("4"), "{mesh_error:?}");
        // Said by the caller's node; or, when a loaded machine runs its timer late, by the
        // callee's, which bounds its wait for the target by the same grpc-timeout.
        assert!(
            matches!(
                mesh_error.as_deref(),
                Some("grpc-timeout passed" | "target timed out")
            ),
            "{mesh_error:?}"
        );

        // A service the mesh does not know: UNIMPLEMENTED, said by the mesh.
        assert_eq!(v["unknown"]["code"], "UNIMPLEMENTED", "{v}");
        assert!(
            v["unknown"]["details"]
                .as_str()
                .is_some_and(|d| d.contains("unknown service")),
            "{v}"
        );
        Ok(())
    })
    .await
    .context("test timed out")?
}

/// node-b and node-c (real processes) serving `greeter` from grpcio servers B and C with
/// `request_timeout`, node-a with its proxy; returns when node-a routes to both.
struct Mesh {
    _cluster: Cluster,
    a: NodeProcess,
    b: NodeProcess,
    c: NodeProcess,
    proxy: SocketAddr,
    servers: [SocketAddr; 2],
    _children: [Child; 2],
}

async fn process_mesh(request_timeout: &str) -> Result<Mesh> {
    let cluster = Cluster::new(&["node-a", "node-b", "node-c"]).await?;
    let (sb, tb) = grpc_server("B").await?;
    let (sc, tc) = grpc_server("C").await?;
    let service = |t: SocketAddr| {
        format!("[[service]]\nname = \"greeter\"\nprotocol = \"grpc\"\ntarget = \"{t}\"\nrequest_timeout = \"{request_timeout}\"\n")
    };
    let b = cluster.node("node-b", &service(tb)).await?;
    let c = cluster.node("node-c", &service(tc)).await?;
    let proxy = free_tcp()?;
    let a = cluster
        .node("node-a", &format!("[http_proxy]\nlisten = \"{proxy}\"\n"))
        .await?;
    until(
        "node-a to route greeter to B and C",
        Duration::from_secs(20),
        async || Ok(service_endpoints(&a, "greeter").await? == ["node-b", "node-c"]),
    )
    .await?;
    Ok(Mesh {
        _cluster: cluster,
        a,
        b,
        c,
        proxy,
        servers: [tb, tc],
        _children: [sb, sc],
    })
}

/// Seconds since the Unix epoch: the clock the Python client's `time.time()` reads.
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_an_endpoint_fails_no_call_started_a_second_later() -> Result<()> {
    if !python_module_ready("grpc").await? {
        return Ok(());
    }
    let _serial = SERIAL.lock().await;
    tokio::time::timeout(LIMIT, async {
        let mut m = process_mesh("5s").await?;
        // Four threads calling back to back on one channel (one h2c connection to node-a).
        let mut client = Command::new(test_python())
            .arg(script())
            .args(["loop", &m.proxy.to_string(), "4"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let mut stdin = client.stdin.take().context("client stdin")?;
        let mut lines = BufReader::new(client.stdout.take().context("client stdout")?).lines();
        let both = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .context("B and C did not both answer within 30 s")??;
        anyhow::ensure!(both.as_deref() == Some("BOTH"), "client said {both:?}");
        // A second of steady calls on both, then node-b's meshnode dies mid-loop.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let killed = unix_now();
        m.b.signal(libc::SIGKILL)?;
        m.b.wait_exit(Duration::from_secs(5)).await?;
        stdin
            .write_all(format!("killed {killed}\n").as_bytes())
            .await?;
        tokio::time::sleep(Duration::from_secs(4)).await;
        stdin.write_all(b"stop\n").await?;
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .context("client did not stop within 30 s")??
            .context("client exited without a summary")?;
        let v: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("client output {line:?}"))?;
        eprintln!("grpc SIGKILL: {v}");
        assert_eq!(
            v["failed_after_first_second"],
            0,
            "calls started ≥ 1 s after the kill failed: {v}\nnode-a:\n{}",
            m.a.log_text()
        );
        assert_eq!(v["failed_before_kill"], 0, "{v}");
        // Every call after the first second went to C, and there were plenty of them.
        assert_eq!(v["by_tag_after_first_second"]["B"], 0, "{v}");
        assert!(
            v["by_tag_after_first_second"]["C"].as_u64().unwrap_or(0) >= 100,
            "{v}"
        );
        drop(m.c);
        Ok(())
    })
    .await
    .context("test timed out")?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_and_deadlines_reach_the_grpc_server() -> Result<()> {
    if !python_module_ready("grpc").await? {
        return Ok(());
    }
    let _serial = SERIAL.lock().await;
    tokio::time::timeout(LIMIT, async {
        // A long request timeout: only the client's cancellation or deadline may end a call.
        let m = process_mesh("60s").await?;
        let args = ["cancel".to_string(), m.proxy.to_string()]
            .into_iter()
            .chain(m.servers.iter().map(|s| s.to_string()));
        let v = python_json("grpc_peer.py", args).await?;
        eprintln!("grpc cancellation: {v}");
        // The server sees each call end (cancelled) within 2 s of the client's cancel, before
        // (`hold`) and after (`park`) the response head, and within 2 s of the deadline.
        let bound = 2000.0;
        for call in [
            "hold_0", "hold_1", "hold_2", "park_0", "park_1", "park_2", "deadline",
        ] {
            let r = &v[call];
            assert_eq!(
                r["ended"],
                true,
                "{call} never ended at the server: {v}\nnode-a:\n{}\nnode-b:\n{}\nnode-c:\n{}",
                m.a.log_text(),
                m.b.log_text(),
                m.c.log_text()
            );
            assert_eq!(r["cancelled"], true, "{call}: {v}");
            let lag = r["lag_ms"].as_f64().unwrap_or(f64::MAX);
            assert!(
                lag < bound,
                "{call} ended {lag} ms after the client let go: {v}"
            );
        }
        assert_eq!(v["deadline"]["client_code"], "DEADLINE_EXCEEDED", "{v}");

        // The caller's node dies under a call: the callee finds its connection dead (the
        // 1 s idle timeout) and cancels the call at the server.
        let mut m = m;
        let mut orphan = Command::new(test_python())
            .arg(script())
            .args(["orphan", &m.proxy.to_string()])
            .args(m.servers.iter().map(|s| s.to_string()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let mut stdin = orphan.stdin.take().context("orphan stdin")?;
        let mut lines = BufReader::new(orphan.stdout.take().context("orphan stdout")?).lines();
        let started = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .context("the orphan call did not start")??;
        anyhow::ensure!(
            started.as_deref() == Some("STARTED"),
            "orphan said {started:?}"
        );
        m.a.signal(libc::SIGKILL)?;
        m.a.wait_exit(Duration::from_secs(5)).await?;
        stdin.write_all(b"killed\n").await?;
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .context("orphan did not report")??
            .context("orphan exited without a report")?;
        let v: serde_json::Value = serde_json::from_str(&line)?;
        eprintln!("grpc call whose caller node was SIGKILLed: {v}");
        assert_eq!(v["ended"], true, "{v}");
        assert_eq!(v["cancelled"], true, "{v}");
        let lag = v["lag_ms"].as_f64().unwrap_or(f64::MAX);
        assert!(
            lag < 3000.0,
            "ended {lag} ms after the caller's node died: {v}"
        );
        Ok(())
    })
    .await
    .context("test timed out")?
}
