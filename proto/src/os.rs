//! What both ends need from the operating system besides the socket: the
//! daemon and the benchmark's load generator each hold one descriptor per
//! connection, thousands of them.

/// Raises this process's open-file limit to its hard maximum: every
/// connection is a descriptor, and the soft default (often 1024) is far
/// below what a daemon (`--max-connections`) or a load of many clients
/// needs. Does nothing where there is no such limit, or when it cannot.
pub fn raise_fd_limit() {
    #[cfg(unix)]
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
