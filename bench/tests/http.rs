//! `meshbench http-echo` and the open-loop HTTP client on loopback.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use meshnode_bench::closed;
use meshnode_bench::http::{self, HttpGet};
use meshnode_bench::latency::{self, LatencyOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::timeout;

const LIMIT: Duration = Duration::from_secs(60);

fn options(addr: SocketAddr, rate: f64, conns: usize) -> LatencyOptions {
    LatencyOptions {
        addr,
        rate,
        duration: Duration::from_millis(600),
        warmup: Duration::from_millis(100),
        size: 0,
        conns,
        spin: Duration::from_micros(100),
        drain: Duration::from_secs(5),
    }
}

fn get(expect_size: Option<u64>) -> HttpGet {
    HttpGet {
        host: "web".into(),
        path: "/x?y=1".into(),
        expect_size,
    }
}

async fn run(opts: LatencyOptions, protocol: HttpGet) -> latency::LatencyReport {
    let job = tokio::task::spawn_blocking(move || latency::run_with(&opts, protocol));
    timeout(LIMIT, job)
        .await
        .expect("in time")
        .expect("join")
        .expect("http run")
}

#[tokio::test(flavor = "multi_thread")]
async fn open_loop_against_http_echo() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(http::serve_echo(l, Bytes::from(vec![b'x'; 300])));

    let probe = get(Some(300));
    let answer = tokio::task::spawn_blocking(move || http::probe(addr, &probe))
        .await
        .unwrap()
        .expect("probe");
    assert!(answer.ok);
    assert_eq!(answer.seq, Some(0), "x-seq is copied to the response");

    let report = run(options(addr, 1000.0, 3), get(Some(300))).await;
    assert_eq!(report.missing, 0);
    assert_eq!(report.errors, 0);
    // 600 ms at 1,000 req/s, all answered in order (the reader checks x-seq).
    assert!(
        (590..=610).contains(&report.requests),
        "{}",
        report.requests
    );
    assert!(report.achieved_rps > 900.0, "{}", report.achieved_rps);
    assert!(report.corrected_us.p50 >= report.uncorrected_us.p50);

    // A body of the wrong length is an error, not a success.
    let report = run(options(addr, 500.0, 1), get(Some(299))).await;
    assert_eq!(report.requests, 0);
    assert!(report.errors >= 290, "{}", report.errors);
}

/// Reads one request head from `s` (no body) and returns its `x-seq` value.
async fn read_request(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            buf.drain(..end + 4);
            return head
                .lines()
                .find_map(|l| l.strip_prefix("x-seq: "))
                .map(str::to_string);
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn chunked_bodies_and_error_statuses() {
    // Even requests: 200 with a chunked 5-byte body and a trailer; odd ones: 503 with a
    // Content-Length body, as meshnode's proxy sends when no endpoint is healthy.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some(seq) = read_request(&mut s, &mut buf).await {
                    let n: u64 = seq.parse().unwrap();
                    let resp = if n.is_multiple_of(2) {
                        format!(
                            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nx-seq: {seq}\r\n\r\n\
                             2;ext=1\r\nab\r\n3\r\ncde\r\n0\r\nx-trailer: 1\r\n\r\n"
                        )
                    } else {
                        format!(
                            "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\nx-seq: {seq}\r\n\r\nnope"
                        )
                    };
                    if s.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let report = run(options(addr, 1000.0, 2), get(Some(5))).await;
    assert_eq!(report.missing, 0);
    assert!(
        (295..=305).contains(&report.requests),
        "{}",
        report.requests
    );
    assert!((295..=305).contains(&report.errors), "{}", report.errors);
}

#[tokio::test(flavor = "multi_thread")]
async fn closed_loop_against_http_echo() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(http::serve_echo(l, Bytes::from(vec![b'x'; 300])));
    let closed = |expect: u64| {
        let opts = options(addr, 1.0, 1);
        let job =
            tokio::task::spawn_blocking(move || closed::run_closed(&opts, 4, get(Some(expect))));
        async move {
            timeout(LIMIT, job)
                .await
                .expect("in time")
                .expect("join")
                .expect("run")
        }
    };
    let report = closed(300).await;
    assert_eq!(report.concurrency, Some(4));
    assert_eq!((report.conns, report.errors, report.missing), (4, 0, 0));
    // Far more than the open-loop rate of 1/s that `options` carries: the loop is closed.
    assert!(report.requests > 100, "{}", report.requests);

    let report = closed(299).await;
    assert_eq!(report.requests, 0);
    assert!(report.errors > 100, "{}", report.errors);
}
