//! `lockbroker hold`: a lock for the rest of a shell script, as
//! `exec 9>file; flock 9` takes one. The script reads `hold`'s output
//! through a descriptor of its own (`exec 9< <(lockbroker hold NAME)`);
//! `hold` prints the fence once it holds the lock and keeps it until
//! every reader of that pipe is gone — the script exited, was killed, or
//! closed the descriptor — so the lock lives with the descriptor, and
//! with whatever the script started that kept it, as a flock does.

use std::io::Write;
use std::os::fd::RawFd;

use lockbroker::Client;

use crate::args::{LockKindArgs, WaitArgs};
use crate::{Failure, acquire_lock, exit, unavailable};

/// Takes the lock, prints the fence and holds until the readers of
/// standard output are gone (exit 0, released) or the lock is lost (the
/// parent, the script, gets SIGTERM; exit 76). Readers gone while it
/// still waits: it gives up, so a killed script leaves no waiter behind.
pub async fn run(client: &Client, lock: &LockKindArgs, wait: &WaitArgs) -> Result<u8, Failure> {
    // A reader gone before the fence is written makes the write fail,
    // rather than kill `hold` with the lock held (which would tell the
    // next holder it was abandoned).
    // SAFETY: setting a signal's disposition; no handler runs.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    // A thread of its own (not the runtime's blocking pool, whose threads
    // the runtime would wait for at exit).
    let (gone, mut readers_gone) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        wait_readers_gone(libc::STDOUT_FILENO);
        let _ = gone.send(());
    });
    let acquired = tokio::select! {
        acquired = acquire_lock(client, lock, wait, None) => acquired?,
        // Dropping the acquire withdraws it.
        _ = &mut readers_gone => return Ok(0),
    };
    let Some(guard) = acquired else {
        return Ok(wait.conflict_exit_code);
    };
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{}", guard.fence())
        .and_then(|()| out.flush())
        .is_err()
    {
        // Nobody reads: there is nobody to hold it for.
        guard.release().await.map_err(unavailable)?;
        return Ok(0);
    }
    drop(out);
    tokio::select! {
        _ = readers_gone => {
            guard.release().await.map_err(unavailable)?;
            Ok(0)
        }
        () = guard.lost() => {
            eprintln!(
                "lockbroker: lost the lock {:?} (the daemon went away); terminating the script",
                guard.name()
            );
            // SAFETY: plain system calls; the parent is the shell that
            // reads the fence, unless it is gone already (then init).
            unsafe {
                let parent = libc::getppid();
                if parent > 1 {
                    libc::kill(parent, libc::SIGTERM);
                }
            }
            Ok(exit::LOCK_LOST)
        }
    }
}

/// Returns once `fd`, the write end of a pipe or a socket, has no reader
/// left (`POLLERR` or `POLLHUP` with no events asked for). On a terminal
/// or a file that never happens: the lock is held until `hold` is killed.
fn wait_readers_gone(fd: RawFd) {
    let mut poll = libc::pollfd {
        fd,
        events: 0,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd, for the duration of the call.
        let n = unsafe { libc::poll(&mut poll, 1, -1) };
        if n > 0 && poll.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            return;
        }
        if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return;
        }
    }
}
