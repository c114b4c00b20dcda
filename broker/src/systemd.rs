//! systemd integration: socket activation (`LISTEN_FDS`), readiness and
//! stopping notifications, and the watchdog.
//!
//! Everything is read from the environment once, in `main`, into a
//! [`Systemd`] value carried by the [`Config`](crate::Config); without
//! systemd it is inert.

use std::time::Duration;

/// What systemd asked of this process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Systemd {
    /// `NOTIFY_SOCKET` is set: send READY=1 and STOPPING=1.
    pub notify: bool,
    /// `WATCHDOG_USEC` is set for this process: ping at half this interval.
    pub watchdog: Option<Duration>,
}

#[cfg(unix)]
impl Systemd {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`.
    pub fn from_env() -> Systemd {
        Systemd {
            notify: std::env::var_os("NOTIFY_SOCKET").is_some(),
            watchdog: sd_notify::watchdog_enabled(),
        }
    }

    /// The daemon accepts connections.
    pub fn ready(&self) {
        self.send(sd_notify::NotifyState::Ready);
    }

    /// The daemon is shutting down.
    pub fn stopping(&self) {
        self.send(sd_notify::NotifyState::Stopping);
    }

    /// The event loop is alive.
    pub fn watchdog(&self) {
        self.send(sd_notify::NotifyState::Watchdog);
    }

    fn send(&self, state: sd_notify::NotifyState<'_>) {
        if self.notify
            && let Err(e) = sd_notify::notify(&[state])
        {
            tracing::warn!(error = %e, "cannot notify systemd");
        }
    }
}

#[cfg(not(unix))]
impl Systemd {
    /// Not on this platform.
    pub fn from_env() -> Systemd {
        Systemd::default()
    }
    /// Not on this platform.
    pub fn ready(&self) {}
    /// Not on this platform.
    pub fn stopping(&self) {}
    /// Not on this platform.
    pub fn watchdog(&self) {}
}

/// The listening socket passed by systemd, if any (exactly one is
/// expected; more is an error).
#[cfg(unix)]
pub fn listen_socket() -> std::io::Result<Option<std::os::unix::net::UnixListener>> {
    use std::os::fd::FromRawFd;
    let mut fds = sd_notify::listen_fds()?;
    let count = fds.len();
    let Some(fd) = fds.next() else {
        return Ok(None);
    };
    if count > 1 {
        return Err(std::io::Error::other(format!(
            "systemd passed {count} sockets; lockbrokerd serves exactly one"
        )));
    }
    // SAFETY: systemd passes us this descriptor, open and owned by nobody
    // else in this process; sd_notify checked LISTEN_PID is ours.
    Ok(Some(unsafe {
        std::os::unix::net::UnixListener::from_raw_fd(fd)
    }))
}
