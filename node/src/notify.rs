//! systemd readiness notifications (`sd_notify(3)`), with std only.
//!
//! Under `Type=notify` systemd passes the path of a datagram socket in `NOTIFY_SOCKET`; the
//! service sends newline-separated `KEY=VALUE` assignments to it: `READY=1` once it serves,
//! `RELOADING=1` while it re-reads its config, `STOPPING=1` when it starts draining, and
//! `STATUS=…` as a free-form line for `systemctl status`. Without `NOTIFY_SOCKET` (a shell, a
//! container, a test) every call is a no-op.
//!
//! `RELOADING=1` goes without `MONOTONIC_USEC`: the unit uses `Type=notify` with `ExecReload=`
//! rather than `Type=notify-reload` (systemd ≥ 253, which wants that timestamp), and std offers
//! no way to read `CLOCK_MONOTONIC` as a number without `unsafe`.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The environment variable systemd sets to the notification socket's address.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Tells systemd the node is ready (listening, registered). Also ends a reload.
pub fn ready() {
    report("READY=1");
}

/// Tells systemd the node is draining and will exit.
pub fn stopping() {
    report("STOPPING=1");
}

/// Tells systemd the node is re-reading its config (SIGHUP); send [`ready`] when done.
pub fn reloading() {
    report("RELOADING=1");
}

/// Sets the one-line status `systemctl status` shows. Newlines become spaces, since a
/// newline would start a new assignment.
pub fn status(msg: &str) {
    report(&status_line(msg));
}

fn status_line(msg: &str) -> String {
    format!("STATUS={}", msg.replace(['\n', '\r'], " "))
}

/// Sends `state` (e.g. `"READY=1"`, several assignments separated by newlines) to the socket
/// named by `NOTIFY_SOCKET`. `Ok(false)` when that variable is unset: not run by systemd.
pub fn send(state: &str) -> io::Result<bool> {
    match std::env::var_os(NOTIFY_SOCKET) {
        None => Ok(false),
        Some(socket) => send_to(&socket, state).map(|()| true),
    }
}

/// Sends `state` as one datagram to `socket`: a file-system path (`/run/systemd/notify`) or,
/// with a leading `@`, a name in the Linux abstract namespace.
pub fn send_to(socket: &OsStr, state: &str) -> io::Result<()> {
    let addr = parse_addr(socket)?;
    let sock = UnixDatagram::unbound()?;
    let sent = sock.send_to_addr(state.as_bytes(), &addr)?;
    if sent != state.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!(
                "short write to the notify socket: {sent} of {} bytes",
                state.len()
            ),
        ));
    }
    Ok(())
}

fn parse_addr(socket: &OsStr) -> io::Result<SocketAddr> {
    let bytes = socket.as_bytes();
    match bytes.first() {
        Some(b'/') => SocketAddr::from_pathname(socket),
        Some(b'@') => abstract_addr(&bytes[1..]),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{NOTIFY_SOCKET}={:?} is neither an absolute path nor an @abstract name",
                socket
            ),
        )),
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_addr(name: &[u8]) -> io::Result<SocketAddr> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn abstract_addr(_name: &[u8]) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract unix socket names exist only on Linux",
    ))
}

/// Sends and logs: a notification that cannot be delivered must never stop the node, but
/// systemd will then time out the start or stop, so the reason goes to the journal.
fn report(state: &str) {
    match send(state) {
        Ok(true) => tracing::debug!(state, "notified systemd"),
        Ok(false) => {}
        Err(e) => tracing::warn!(state, error = %e, "cannot notify systemd ({NOTIFY_SOCKET})"),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn recv(sock: &UnixDatagram) -> String {
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).expect("a datagram within 5 s");
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn sends_one_datagram_to_a_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();

        send_to(path.as_os_str(), "READY=1").unwrap();
        assert_eq!(recv(&sock), "READY=1");

        send_to(path.as_os_str(), "STOPPING=1\nSTATUS=draining").unwrap();
        assert_eq!(recv(&sock), "STOPPING=1\nSTATUS=draining");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn sends_to_an_abstract_name() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("meshnode-notify-test-{}-{}", std::process::id(), line!());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).unwrap();

        send_to(OsStr::new(&format!("@{name}")), "RELOADING=1").unwrap();
        assert_eq!(recv(&sock), "RELOADING=1");
    }

    #[test]
    fn a_status_stays_one_assignment() {
        assert_eq!(status_line("ready: 3 peers"), "STATUS=ready: 3 peers");
        assert_eq!(status_line("a\nREADY=1\r"), "STATUS=a READY=1 ");
    }

    #[test]
    fn rejects_a_relative_or_empty_address() {
        for bad in ["", "notify", "./notify"] {
            let e = send_to(OsStr::new(bad), "READY=1").unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }
    }

    #[test]
    fn a_missing_socket_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let e = send_to(dir.path().join("absent").as_os_str(), "READY=1").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
