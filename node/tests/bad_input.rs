//! Bad input at the receiving node: every case gets a clear status or a refused handshake,
//! is counted, and leaves other tunnels untouched.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use common::*;
use meshnode_proto::{Status, StatusCode, StreamHeader};
use meshnode_transport::pki::Ca;
use meshnode_transport::tunnel::{self, OpenError};
use meshnode_transport::{Alpn, EndpointOptions, Identity, MeshEndpoint, TransportConfig};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(60);

/// A bare client endpoint holding `identity` (no node around it).
fn client(identity: Identity) -> Result<MeshEndpoint> {
    let opts = EndpointOptions {
        listen: "127.0.0.1:0".parse()?,
        state_dir: None,
        transport: TransportConfig::default(),
    };
    Ok(MeshEndpoint::bind(&opts, identity)?)
}

fn header(service: &str, port: u16) -> StreamHeader {
    StreamHeader {
        service: service.into(),
        port,
        traceparent: None,
        deadline_ms: None,
    }
}

async fn status_after_raw(conn: &quinn::Connection, bytes: Vec<u8>) -> Result<Option<Status>> {
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_chunk(Bytes::from(bytes)).await?;
    let _ = send.finish();
    let mut buf = Vec::new();
    match tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(8192)).await? {
        Ok(b) => buf.extend(b),
        Err(_) => return Ok(None),
    }
    Ok(Status::decode(&buf)?.map(|(s, _)| s))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_gets_its_status_and_the_node_keeps_serving() -> Result<()> {
    tokio::time::timeout(LIMIT, async {
        let pki = Pki::new(&["node-a", "node-b", "node-c"])?;
        let mesh = memory_mesh();
        let echo = echo_server().await?;
        let refused = closed_port().await?;
        let extra = format!(
            "[[service]]\nname = \"echo\"\nprotocol = \"tcp\"\ntarget = \"{echo}\"\n\
             [[service]]\nname = \"private\"\nprotocol = \"tcp\"\ntarget = \"{echo}\"\nallow = [\"node-c\"]\n\
             [[service]]\nname = \"down\"\nprotocol = \"tcp\"\ntarget = \"{refused}\"\n"
        );
        let b = start_node(&pki, "node-b", &extra, mesh.connect()).await?;
        let b_addr: SocketAddr = b.quic_addr();
        let ep = client(pki.identity("node-a")?)?;
        let conn = ep.connect("node-b", b_addr, Alpn::Meshnode).await?;

        // A long-lived tunnel that must survive everything below.
        let mut good = tunnel::open(&conn, &header("echo", echo.port()), Duration::from_secs(5)).await?;
        good.send.write_all(b"before").await?;

        let t = Duration::from_secs(5);
        let code = |e: OpenError| match e {
            OpenError::Refused(s) => s.code,
            other => panic!("expected a status, got {other}"),
        };
        // Unknown service → 404; unadvertised port → 404.
        assert_eq!(code(tunnel::open(&conn, &header("nope", 1), t).await.expect_err("404")), StatusCode::NotFound);
        assert_eq!(code(tunnel::open(&conn, &header("echo", 1), t).await.expect_err("404")), StatusCode::NotFound);
        // Caller not in allow → 403.
        assert_eq!(code(tunnel::open(&conn, &header("private", echo.port()), t).await.expect_err("403")), StatusCode::Forbidden);
        // Target refusing → 502.
        assert_eq!(code(tunnel::open(&conn, &header("down", refused.port()), t).await.expect_err("502")), StatusCode::BadGateway);
        // Malformed header → 400.
        let s = status_after_raw(&conn, b"GET / HTTP/1.1\r\n\r\n".to_vec()).await?;
        assert_eq!(s.map(|s| s.code), Some(StatusCode::BadRequest));
        // Oversized header (declared length beyond the bound) → 400.
        let mut big = b"MN\x01".to_vec();
        big.extend_from_slice(&u16::MAX.to_be_bytes());
        big.extend(std::iter::repeat_n(b'a', 5000));
        let s = status_after_raw(&conn, big).await?;
        assert_eq!(s.map(|s| s.code), Some(StatusCode::BadRequest));
        // Truncated header then FIN: the stream just ends, no status, nothing breaks.
        let mut trunc = header("echo", echo.port()).to_bytes()?;
        trunc.truncate(trunc.len() - 2);
        let _ = status_after_raw(&conn, trunc).await?;

        // The long-lived tunnel still works.
        good.send.write_all(b"+after").await?;
        good.send.finish()?;
        let mut back = Vec::new();
        back.extend_from_slice(&good.leftover);
        back.extend(good.recv.read_to_end(1024).await?);
        assert_eq!(back, b"before+after");

        let m = b.metrics();
        assert_eq!(m.get("meshnode_inbound_rejected_total", &["unknown_service"]), 1.0);
        assert_eq!(m.get("meshnode_inbound_rejected_total", &["unknown_port"]), 1.0);
        assert_eq!(m.get("meshnode_inbound_rejected_total", &["forbidden"]), 1.0);
        assert_eq!(m.get("meshnode_inbound_rejected_total", &["target_refused"]), 1.0);
        assert_eq!(m.get("meshnode_inbound_rejected_total", &["malformed"]), 2.0);
        Ok(())
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_ca_and_wrong_name_are_refused() -> Result<()> {
    tokio::time::timeout(LIMIT, async {
        let pki = Pki::new(&["node-a", "node-b", "node-c"])?;
        let mesh = memory_mesh();
        let echo = echo_server().await?;
        let b = start_node(
            &pki,
            "node-b",
            &format!("[[service]]\nname = \"echo\"\nprotocol = \"tcp\"\ntarget = \"{echo}\"\n"),
            mesh.connect(),
        )
        .await?;
        // A caller whose certificate comes from another CA: the handshake fails.
        let other = Ca::generate("test.mesh", 2)?;
        let cert = other.issue("node-a", 2)?;
        let foreign = Identity::from_pem(other.cert_pem(), &cert.cert_pem, &cert.key_pem)?;
        let ep = client(foreign)?;
        let r = ep.connect("node-b", b.quic_addr(), Alpn::Meshnode).await;
        let refused = match r {
            Err(_) => true,
            // With TLS 1.3 the client may finish before the server rejects its certificate:
            // then the first stream must fail.
            Ok(conn) => tunnel::open(&conn, &header("echo", echo.port()), Duration::from_secs(5))
                .await
                .is_err(),
        };
        assert!(refused, "a foreign-CA caller got through");
        eventually(
            "the refused handshake to be counted",
            Duration::from_secs(5),
            || {
                b.metrics()
                    .get("meshnode_inbound_rejected_total", &["handshake"])
                    >= 1.0
            },
        )
        .await?;

        // Dialling node-b's address while expecting node-c: b's valid certificate names the
        // wrong node, so the dialler refuses it.
        let ep = client(pki.identity("node-a")?)?;
        let r = ep.connect("node-c", b.quic_addr(), Alpn::Meshnode).await;
        assert!(
            r.is_err(),
            "a certificate for node-b was accepted as node-c"
        );

        // And the node still serves a legitimate caller.
        let conn = ep.connect("node-b", b.quic_addr(), Alpn::Meshnode).await?;
        let mut t =
            tunnel::open(&conn, &header("echo", echo.port()), Duration::from_secs(5)).await?;
        t.send.write_all(b"ok").await?;
        t.send.finish()?;
        assert_eq!(t.recv.read_to_end(16).await?, b"ok");
        Ok(())
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_to_unknown_or_refusing_service_resets_the_client() -> Result<()> {
    tokio::time::timeout(LIMIT, async {
        let pki = Pki::new(&["node-a", "node-b"])?;
        let mesh = memory_mesh();
        let refused = closed_port().await?;
        let _b = start_node(
            &pki,
            "node-b",
            &format!("[[service]]\nname = \"down\"\nprotocol = \"tcp\"\ntarget = \"{refused}\"\n"),
            mesh.connect(),
        )
        .await?;
        let a = start_node(
            &pki,
            "node-a",
            "[[outbound]]\nservice = \"down\"\nlisten = \"127.0.0.1:0\"\n[[outbound]]\nservice = \"ghost\"\nlisten = \"127.0.0.1:0\"\n",
            mesh.connect(),
        )
        .await?;
        wait_endpoints(&a, "down", 1).await?;
        for svc in ["down", "ghost"] {
            // The reset can come so fast that it already fails the connect.
            let r = match TcpStream::connect(a.outbound_addr(svc).expect("bound")).await {
                Ok(mut s) => {
                    let mut buf = [0u8; 8];
                    tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await?
                }
                Err(e) => Err(e),
            };
            assert!(
                matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
                "{svc}: expected a reset, got {r:?}"
            );
        }
        assert!(a.metrics().get("meshnode_tunnels_opened_total", &["ghost", "", "no_endpoint"]) >= 1.0);
        Ok(())
    })
    .await?
}

/// An h3 request stream whose headers never complete is reset within the header deadline and
/// counted as `slow_header`; one whose headers do not decode is counted as `malformed`; the
/// connection's other requests are served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h3_requests_that_never_finish_their_headers_are_reset_and_counted() -> Result<()> {
    tokio::time::timeout(LIMIT, async {
        let pki = Pki::new(&["node-a", "node-b"])?;
        let mesh = memory_mesh();
        let echo = echo_server().await?;
        let extra =
            format!("[[service]]\nname = \"echo\"\nprotocol = \"tcp\"\ntarget = \"{echo}\"\n");
        let b = start_node(&pki, "node-b", &extra, mesh.connect()).await?;
        let ep = client(pki.identity("node-a")?)?;
        let conn = ep.connect("node-b", b.quic_addr(), Alpn::H3).await?;
        let started = std::time::Instant::now();
        // 20 streams that start a HEADERS frame (type 0x01, length 100) and send 3 bytes of it.
        let mut slow = Vec::new();
        for _ in 0..20 {
            let (mut send, recv) = conn.open_bi().await?;
            send.write_all(&[0x01, 0x40, 0x64, 0, 0, 0]).await?;
            slow.push((send, recv));
        }
        // Each slow stream ends (reset or finished) once the deadline passes.
        for (_send, mut recv) in slow {
            let ended = tokio::time::timeout(Duration::from_secs(15), recv.read_to_end(1024)).await;
            assert!(ended.is_ok(), "a slow h3 stream was held past the deadline");
        }
        let waited = started.elapsed();
        // A stream whose HEADERS frame is complete but is not QPACK (h3 may close that
        // connection: a decoding failure is a connection error), on a connection of its own.
        let conn2 = ep.connect("node-b", b.quic_addr(), Alpn::H3).await?;
        let (mut bad, mut bad_recv) = conn2.open_bi().await?;
        bad.write_all(&[0x01, 0x03, 0xff, 0xff, 0xff]).await?;
        let _ = bad.finish();
        let _ = tokio::time::timeout(Duration::from_secs(10), bad_recv.read_to_end(1024)).await;
        assert!(
            waited >= Duration::from_secs(4),
            "reset before the deadline: {waited:?}"
        );
        assert!(waited < Duration::from_secs(12), "reset late: {waited:?}");
        let m = b.metrics();
        assert_eq!(
            m.get("meshnode_inbound_rejected_total", &["slow_header"]),
            20.0
        );
        // The client may see its stream end before the node's task has counted it.
        let counted = std::time::Instant::now();
        while b
            .metrics()
            .get("meshnode_inbound_rejected_total", &["malformed"])
            < 1.0
        {
            assert!(
                counted.elapsed() < Duration::from_secs(5),
                "undecodable h3 headers were not counted as malformed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The node still serves tunnels.
        let mesh_conn = ep.connect("node-b", b.quic_addr(), Alpn::Meshnode).await?;
        let mut t = tunnel::open(
            &mesh_conn,
            &header("echo", echo.port()),
            Duration::from_secs(5),
        )
        .await?;
        t.send.write_all(b"ok").await?;
        t.send.finish()?;
        let mut back = t.leftover.to_vec();
        back.extend(t.recv.read_to_end(64).await?);
        assert_eq!(back, b"ok");
        Ok(())
    })
    .await?
}
