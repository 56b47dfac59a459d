//! Process limits set at start.
//!
//! A node holds two sockets per tunnel (the application's and, on the callee, the target's):
//! the soft `RLIMIT_NOFILE` a shell or an old init hands out (1024) was measured to run out at
//! about 1,000 idle application connections, after which accepts failed in a loop. The hard
//! limit is the administrator's (systemd's `LimitNOFILE=`), so the node raises its soft limit
//! to it at start and logs both.

/// The file-descriptor limits before and after [`raise_nofile`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimits {
    /// Soft limit as the node was started with it.
    pub was: u64,
    /// Soft limit now (the hard limit, unless raising it failed).
    pub now: u64,
    /// Hard limit.
    pub hard: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit.
pub fn raise_nofile() -> std::io::Result<NofileLimits> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read or write the struct passed by pointer, which lives
    // on this stack frame for the whole call; no other memory is touched.
    #[allow(unsafe_code)]
    let got = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    if got != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let was = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above.
        #[allow(unsafe_code)]
        let set = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) };
        if set != 0 {
            return Err(std::io::Error::last_os_error());
        }
        lim = raised;
    }
    Ok(NofileLimits {
        was,
        now: lim.rlim_cur,
        hard: lim.rlim_max,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_ends_at_the_hard_limit() {
        let l = raise_nofile().expect("getrlimit");
        assert_eq!(l.now, l.hard);
        assert!(l.was <= l.now);
        // Idempotent.
        assert_eq!(raise_nofile().expect("again").was, l.now);
    }
}
