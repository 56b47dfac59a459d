//! The relay's sockets and tasks: receive loops, per-client upstream sockets, and one
//! timer-queue scheduler per direction that applies loss, delay, jitter and blackhole.

use std::cmp::Ordering as CmpOrdering;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket as StdUdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::{Direction, RelayStats};

/// Datagrams waiting in one direction's delay queue beyond which new ones are dropped.
const MAX_QUEUED: usize = 1 << 16;
/// Requested SO_RCVBUF / SO_SNDBUF of every relay socket (the kernel may cap it).
const SOCKET_BUFFER: usize = 4 << 20;
/// Largest UDP payload.
const MAX_DATAGRAM: usize = 65_535;

/// Fault settings of one direction, readable without locks.
#[derive(Default)]
pub(super) struct Faults {
    pub(super) delay_ns: AtomicU64,
    pub(super) jitter_ns: AtomicU64,
    pub(super) loss_bits: AtomicU64,
}

/// One downstream source address and the upstream socket that stands for it.
struct Client {
    addr: SocketAddr,
    socket: Mutex<Arc<UdpSocket>>,
    reader: Mutex<Option<AbortHandle>>,
}

/// Where a scheduled datagram goes.
enum Target {
    /// Upstream, through this client's current upstream socket.
    Up(Arc<Client>),
    /// Back to this client address, through the listening socket.
    Down(SocketAddr),
}

struct Packet {
    target: Target,
    data: Bytes,
    received: Instant,
}

/// State shared by the handle and every task of one relay.
pub(super) struct Shared {
    pub(super) upstream: SocketAddr,
    pub(super) faults: [Faults; 2],
    pub(super) blackhole: AtomicBool,
    forwarded: [AtomicU64; 2],
    dropped: AtomicU64,
    rebinds: AtomicU64,
    closed: AtomicBool,
    runtime: Handle,
    clients: Mutex<HashMap<SocketAddr, Arc<Client>>>,
    tasks: Mutex<Vec<AbortHandle>>,
    down_tx: mpsc::UnboundedSender<Packet>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Binds a non-blocking UDP socket with large buffers.
pub(super) fn bind_udp(addr: SocketAddr) -> io::Result<StdUdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: the kernel caps these at net.core.{r,w}mem_max.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// A fresh upstream socket on an ephemeral port, connected to `upstream`.
fn upstream_socket(upstream: SocketAddr) -> io::Result<UdpSocket> {
    let any: SocketAddr = match upstream {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = bind_udp(any)?;
    socket.connect(upstream)?;
    UdpSocket::from_std(socket)
}

/// Errors a UDP receive loop should shrug off (ICMP unreachable reports and the like).
fn transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    ) || e.raw_os_error() == Some(113) // EHOSTUNREACH
}

impl Shared {
    /// Wraps `socket` in a Tokio socket and spawns the receive loop and both schedulers.
    pub(super) fn start(
        runtime: Handle,
        socket: StdUdpSocket,
        upstream: SocketAddr,
    ) -> io::Result<Arc<Shared>> {
        socket.set_nonblocking(true)?;
        let _guard = runtime.enter();
        let listen = Arc::new(UdpSocket::from_std(socket)?);
        let (up_tx, up_rx) = mpsc::unbounded_channel();
        let (down_tx, down_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            upstream,
            faults: Default::default(),
            blackhole: AtomicBool::new(false),
            forwarded: Default::default(),
            dropped: AtomicU64::new(0),
            rebinds: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            runtime: runtime.clone(),
            clients: Mutex::new(HashMap::new()),
            tasks: Mutex::new(Vec::new()),
            down_tx,
        });
        let tasks = [
            runtime.spawn(schedule(
                shared.clone(),
                Direction::Up,
                up_rx,
                listen.clone(),
            )),
            runtime.spawn(schedule(
                shared.clone(),
                Direction::Down,
                down_rx,
                listen.clone(),
            )),
            runtime.spawn(receive_downstream(shared.clone(), listen, up_tx)),
        ];
        lock(&shared.tasks).extend(tasks.iter().map(|t| t.abort_handle()));
        Ok(shared)
    }

    pub(super) fn stats(&self) -> RelayStats {
        RelayStats {
            forwarded_up: self.forwarded[0].load(Ordering::Relaxed),
            forwarded_down: self.forwarded[1].load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            rebinds: self.rebinds.load(Ordering::Relaxed),
        }
    }

    fn drop_one(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// The client record for `addr`, creating its upstream socket on first sight.
    fn client(self: &Arc<Self>, addr: SocketAddr) -> io::Result<Arc<Client>> {
        let mut clients = lock(&self.clients);
        if let Some(c) = clients.get(&addr) {
            return Ok(c.clone());
        }
        let socket = Arc::new(upstream_socket(self.upstream)?);
        let client = Arc::new(Client {
            addr,
            socket: Mutex::new(socket.clone()),
            reader: Mutex::new(None),
        });
        let reader = self
            .runtime
            .spawn(receive_upstream(self.clone(), addr, socket));
        *lock(&client.reader) = Some(reader.abort_handle());
        clients.insert(addr, client.clone());
        Ok(client)
    }

    pub(super) fn rebind(self: &Arc<Self>) -> io::Result<()> {
        let _guard = self.runtime.enter();
        let clients: Vec<Arc<Client>> = lock(&self.clients).values().cloned().collect();
        for client in clients {
            // Bound before the old socket closes, so the kernel cannot hand out the same port.
            let socket = Arc::new(upstream_socket(self.upstream)?);
            let reader =
                self.runtime
                    .spawn(receive_upstream(self.clone(), client.addr, socket.clone()));
            *lock(&client.socket) = socket;
            if let Some(old) = lock(&client.reader).replace(reader.abort_handle()) {
                old.abort();
            }
        }
        self.rebinds.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    pub(super) fn shutdown(&self) {
        self.closed.store(true, Ordering::Relaxed);
        for task in lock(&self.tasks).drain(..) {
            task.abort();
        }
        for (_, client) in lock(&self.clients).drain() {
            if let Some(reader) = lock(&client.reader).take() {
                reader.abort();
            }
        }
    }
}

/// Reads datagrams from clients and hands them to the upstream scheduler.
async fn receive_downstream(
    shared: Arc<Shared>,
    listen: Arc<UdpSocket>,
    up_tx: mpsc::UnboundedSender<Packet>,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, from) = match listen.recv_from(&mut buf).await {
            Ok(v) => v,
            Err(e) if transient(&e) => continue,
            Err(e) => {
                eprintln!("meshrelay: listening socket failed: {e}");
                return;
            }
        };
        let received = Instant::now();
        if shared.closed.load(Ordering::Relaxed) {
            return;
        }
        let client = match shared.client(from) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("meshrelay: no upstream socket for {from}: {e}");
                shared.drop_one();
                continue;
            }
        };
        let data = Bytes::copy_from_slice(&buf[..n]);
        if up_tx
            .send(Packet {
                target: Target::Up(client),
                data,
                received,
            })
            .is_err()
        {
            return;
        }
    }
}

/// Reads replies on one client's upstream socket and hands them to the downstream scheduler.
async fn receive_upstream(shared: Arc<Shared>, client: SocketAddr, socket: Arc<UdpSocket>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let n = match socket.recv(&mut buf).await {
            Ok(n) => n,
            Err(e) if transient(&e) => continue,
            Err(e) => {
                eprintln!("meshrelay: upstream socket of {client} failed: {e}");
                return;
            }
        };
        let received = Instant::now();
        let data = Bytes::copy_from_slice(&buf[..n]);
        let packet = Packet {
            target: Target::Down(client),
            data,
            received,
        };
        if shared.down_tx.send(packet).is_err() {
            return;
        }
    }
}

/// A datagram waiting in the timer queue; ordered by due time, then arrival.
struct Queued {
    due: Instant,
    seq: u64,
    packet: Packet,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Queued {
    /// Reversed, so that `BinaryHeap` (a max-heap) pops the earliest due time first.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}

/// One direction's scheduler: decides loss, draws the delay, and sends when due.
async fn schedule(
    shared: Arc<Shared>,
    dir: Direction,
    mut rx: mpsc::UnboundedReceiver<Packet>,
    listen: Arc<UdpSocket>,
) {
    let mut heap: BinaryHeap<Queued> = BinaryHeap::new();
    let mut rng = StdRng::from_entropy();
    let mut seq = 0u64;
    let mut last_due: Option<Instant> = None;
    loop {
        let now = Instant::now();
        while heap.peek().is_some_and(|q| q.due <= now) {
            if let Some(q) = heap.pop() {
                send(&shared, dir, &listen, q.packet).await;
            }
        }
        let next_due = heap.peek().map(|q| q.due);
        tokio::select! {
            msg = rx.recv() => {
                let Some(first) = msg else { return };
                let mut next = Some(first);
                while let Some(packet) = next {
                    let faults = &shared.faults[dir.index()];
                    if shared.blackhole.load(Ordering::Relaxed)
                        || rng.gen::<f64>() < f64::from_bits(faults.loss_bits.load(Ordering::Relaxed))
                    {
                        shared.drop_one();
                    } else {
                        let delay = faults.delay_ns.load(Ordering::Relaxed);
                        let jitter = faults.jitter_ns.load(Ordering::Relaxed);
                        let due = if jitter == 0 {
                            // No jitter: never overtake an earlier datagram, even if the delay
                            // was just lowered.
                            let due = packet.received + std::time::Duration::from_nanos(delay);
                            last_due.map_or(due, |last| due.max(last))
                        } else {
                            let offset = rng.gen_range(-(jitter as i128)..=jitter as i128);
                            let ns = (delay as i128 + offset).max(0) as u64;
                            packet.received + std::time::Duration::from_nanos(ns)
                        };
                        last_due = Some(due);
                        if heap.is_empty() && due <= Instant::now() {
                            send(&shared, dir, &listen, packet).await;
                        } else if heap.len() >= MAX_QUEUED {
                            shared.drop_one();
                        } else {
                            seq += 1;
                            heap.push(Queued { due, seq, packet });
                        }
                    }
                    next = rx.try_recv().ok();
                }
            }
            _ = tokio::time::sleep_until(next_due.unwrap_or_else(Instant::now)), if next_due.is_some() => {}
        }
    }
}

/// Sends one datagram that has fallen due, unless the relay is blackholed meanwhile.
async fn send(shared: &Shared, dir: Direction, listen: &UdpSocket, packet: Packet) {
    if shared.blackhole.load(Ordering::Relaxed) {
        shared.drop_one();
        return;
    }
    let result = match &packet.target {
        Target::Up(client) => {
            let socket = lock(&client.socket).clone();
            socket.send(&packet.data).await
        }
        Target::Down(addr) => listen.send_to(&packet.data, *addr).await,
    };
    match result {
        Ok(_) => {
            shared.forwarded[dir.index()].fetch_add(1, Ordering::Relaxed);
        }
        Err(_) => shared.drop_one(),
    }
}
