//! Processes and users on Unix, for tests: signals, waits for an exit that
//! are bounded (a test never hangs on a child), whether a process lives,
//! and running a command as `nobody` when the tests run as root.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus};

pub use crate::harness::wait_exit;
use std::time::Instant;

/// `nobody` and `nogroup`: the other user of the trust tests.
pub const NOBODY: u32 = 65534;

/// Sends `signal` to process `pid`; false if it is gone.
pub fn signal(pid: u32, signal: i32) -> bool {
    // SAFETY: signalling a process the test started.
    unsafe { libc::kill(pid as i32, signal) == 0 }
}

/// Waits for `child` to exit — blocked on the exit itself, not polling —
/// and returns its status and stderr (if piped). Kills it and fails the
/// test if it is still running at `deadline`.
pub fn exit_before(child: Child, deadline: Instant) -> (ExitStatus, String) {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        Ok(out) => {
            let out = out.unwrap();
            (
                out.status,
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
        Err(_) => {
            // Not yet reaped: the waiting thread has not returned.
            signal(pid, libc::SIGKILL);
            panic!("process {pid} did not exit in time");
        }
    }
}

/// Whether process `pid` is alive (a zombie is dead for a test's purposes).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// This process's effective uid.
pub fn euid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

/// Whether this test can act as nobody (it runs as root); says on stderr
/// what is skipped when not.
pub fn can_be_nobody(what: &str) -> bool {
    if euid() == 0 {
        return true;
    }
    eprintln!("skipped {what}: running a process as another user needs root");
    false
}

/// Makes `cmd` run as nobody:nogroup without supplementary groups.
pub fn as_nobody(cmd: &mut Command) -> &mut Command {
    // SAFETY: setgroups, setgid and setuid are async-signal-safe system
    // calls; the closure allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(NOBODY) != 0
                || libc::setuid(NOBODY) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// Sets `path`'s mode.
pub fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// `runtime/lockbroker`, the local scope's directory, created with `mode`
/// and given to `owner`; `runtime` itself lets every user through.
pub fn local_dir(runtime: &Path, owner: u32, mode: u32) -> std::path::PathBuf {
    chmod(runtime, 0o755);
    let dir = runtime.join("lockbroker");
    std::fs::create_dir(&dir).unwrap();
    chmod(&dir, mode);
    std::os::unix::fs::chown(&dir, Some(owner), Some(owner)).unwrap();
    dir
}
