//! A loopback TCP proxy whose path can be cut and restored: a network partition between one
//! client and etcd, while other clients keep reaching it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Forwards `127.0.0.1:{port}` to a target address until cut.
pub struct TcpProxy {
    /// `http://127.0.0.1:{port}`, usable as an etcd endpoint.
    pub endpoint: String,
    /// The proxy's listening address.
    pub addr: SocketAddr,
    blocked: Arc<AtomicBool>,
    cuts: watch::Sender<u64>,
    task: JoinHandle<()>,
}

impl TcpProxy {
    /// Starts forwarding to `target` (`host:port`, or a URL such as `http://127.0.0.1:2379`).
    pub async fn start(target: &str) -> anyhow::Result<TcpProxy> {
        let target = target
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .trim_end_matches('/')
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding proxy")?;
        let addr = listener.local_addr()?;
        let blocked = Arc::new(AtomicBool::new(false));
        let (cuts, _) = watch::channel(0u64);
        let task = tokio::spawn(accept_loop(listener, target, blocked.clone(), cuts.clone()));
        Ok(TcpProxy {
            endpoint: format!("http://{addr}"),
            addr,
            blocked,
            cuts,
            task,
        })
    }

    /// Drops every open connection and refuses new ones (accepted, then closed at once).
    pub fn cut(&self) {
        self.blocked.store(true, Ordering::SeqCst);
        self.cuts.send_modify(|n| *n += 1);
    }

    /// Forwards new connections again.
    pub fn restore(&self) {
        self.blocked.store(false, Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: String,
    blocked: Arc<AtomicBool>,
    cuts: watch::Sender<u64>,
) {
    while let Ok((mut down, _)) = listener.accept().await {
        if blocked.load(Ordering::SeqCst) {
            drop(down);
            continue;
        }
        let mut cut = cuts.subscribe();
        let target = target.clone();
        tokio::spawn(async move {
            let Ok(mut up) = TcpStream::connect(&target).await else {
                return;
            };
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                _ = cut.changed() => {}
            }
        });
    }
}
