//! `meshbench grpc-echo` and the gRPC-shaped h2c client on loopback.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use meshnode_bench::grpc::{self, GrpcOptions, Load};
use tokio::net::TcpListener;
use tokio::time::timeout;

const LIMIT: Duration = Duration::from_secs(60);

async fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(grpc::serve_echo(l));
    addr
}

fn options(addr: SocketAddr, load: Load) -> GrpcOptions {
    GrpcOptions {
        addr,
        authority: Some("rpc".into()),
        size: 300,
        conns: 2,
        load,
        duration: Duration::from_millis(600),
        warmup: Duration::from_millis(100),
        spin: Duration::from_micros(100),
        drain: Duration::from_secs(5),
    }
}

async fn run(opts: GrpcOptions) -> meshnode_bench::latency::LatencyReport {
    timeout(LIMIT, grpc::run(&opts))
        .await
        .expect("in time")
        .expect("grpc run")
}

#[test]
fn framing() {
    let framed = grpc::frame(b"hello");
    assert_eq!(&framed[..], b"\0\0\0\0\x05hello");
    assert_eq!(grpc::unframe(&framed), Ok(&b"hello"[..]));
    assert!(grpc::unframe(b"\0\0\0").is_err(), "short header");
    assert!(
        grpc::unframe(b"\0\0\0\0\x06hello").is_err(),
        "length mismatch"
    );
    assert!(grpc::unframe(b"\x01\0\0\0\x05hello").is_err(), "compressed");
}

#[tokio::test(flavor = "multi_thread")]
async fn closed_and_open_loop_against_grpc_echo() {
    let addr = echo_server().await;
    let sender = grpc::connect(addr).await.unwrap();
    let uri = grpc::uri("rpc").unwrap();
    assert!(grpc::call(&sender, &uri, &grpc::message(7, 100))
        .await
        .unwrap());

    let report = run(options(addr, Load::Closed(8))).await;
    assert_eq!(report.concurrency, Some(8));
    assert_eq!((report.errors, report.missing), (0, 0));
    assert!(report.requests > 50, "{}", report.requests);
    assert!(report.achieved_rps > 80.0, "{}", report.achieved_rps);

    // 600 ms at 500 calls/s, every one a correct echo.
    let report = run(options(addr, Load::Open(500.0))).await;
    assert_eq!(report.concurrency, None);
    assert_eq!((report.errors, report.missing), (0, 0));
    assert!(
        (295..=305).contains(&report.requests),
        "{}",
        report.requests
    );
    assert!(report.corrected_us.p50 >= report.uncorrected_us.p50);
}

#[tokio::test(flavor = "multi_thread")]
async fn echo_server_refuses_what_is_not_grpc() {
    let addr = echo_server().await;
    let sender = grpc::connect(addr).await.unwrap();
    let uri = grpc::uri("rpc").unwrap();

    // Not gRPC: 415, no body.
    let mut s = sender.clone().ready().await.unwrap();
    let get = Request::builder()
        .method(Method::GET)
        .uri(uri.clone())
        .body(())
        .unwrap();
    let (response, _) = s.send_request(get, true).unwrap();
    let response = timeout(LIMIT, response).await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);

    // gRPC with a length prefix that lies: 200 with grpc-status 13 and no message.
    let mut s = sender.clone().ready().await.unwrap();
    let post = Request::builder()
        .method(Method::POST)
        .uri(uri)
        .header("content-type", "application/grpc")
        .body(())
        .unwrap();
    let (response, mut send) = s.send_request(post, false).unwrap();
    send.send_data(Bytes::from_static(b"\0\0\0\0\x09short"), true)
        .unwrap();
    let response = timeout(LIMIT, response).await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    assert!(body.data().await.is_none(), "no message");
    let trailers = body.trailers().await.unwrap().expect("trailers");
    assert_eq!(trailers.get("grpc-status").unwrap(), "13");
}

/// An h2c server answering every call trailers-only with `grpc-status: 14` (UNAVAILABLE).
async fn unavailable_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((_, mut respond))) = conn.accept().await {
                    let head = Response::builder()
                        .status(StatusCode::OK)
                        .header("content-type", "application/grpc")
                        .header("grpc-status", "14")
                        .body(())
                        .unwrap();
                    let _ = respond.send_response(head, true);
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_calls_are_errors_not_successes() {
    let addr = unavailable_server().await;
    let sender = grpc::connect(addr).await.unwrap();
    let uri = grpc::uri("rpc").unwrap();
    assert!(!grpc::call(&sender, &uri, &grpc::message(1, 64))
        .await
        .unwrap());

    let report = run(options(addr, Load::Open(500.0))).await;
    assert_eq!(report.requests, 0);
    assert!((295..=305).contains(&report.errors), "{}", report.errors);
}
