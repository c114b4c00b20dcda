//! Finding, starting and waiting for `lockbrokerd`: autostart of the local
//! daemon, the private daemon of `lockbroker run`, and `lockbroker daemon`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use lockbroker::launch::{self, LaunchError, START_TIMEOUT, binary};
use lockbroker::{Client, Connector};

/// The pid of the daemon this process autostarted, if any.
static AUTOSTARTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// The daemon this process started by autostart: a child of ours that the
/// command's tree did not start.
#[cfg(unix)]
pub fn autostarted() -> Option<u32> {
    match AUTOSTARTED.load(std::sync::atomic::Ordering::Relaxed) {
        0 => None,
        pid => Some(pid),
    }
}

/// Starts the local daemon detached — its own session (on Windows: no
/// console, its own process group, out of any job), logging to
/// `broker.log` beside the socket (on Windows in `%LOCALAPPDATA%\lockbroker`)
/// with `--log-file`, which keeps it bounded, and what it writes before
/// its log is open appended there too — and connects once it is ready. Several
/// tools may race here; the daemons settle who serves the socket, and every
/// tool connects to the winner.
pub async fn autostart(connector: &Connector, socket: &Path) -> Result<Client, String> {
    let dir = log_dir(socket)?;
    let dir = dir.as_path();
    let log_path = dir.join("broker.log");
    // Only what this start appends to the log is this start's error.
    let log_start = std::fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0);
    let mut child = spawn_detached(dir, &log_path).map_err(|e| {
        format!(
            "cannot start {}: {e} (set LOCKBROKERD to its path)",
            binary().display()
        )
    })?;
    AUTOSTARTED.store(child.id(), std::sync::atomic::Ordering::Relaxed);
    // A daemon that lost the race to another exits at once (status 3):
    // then the winner is waited for. Any other exit is a daemon that
    // cannot start: say why now, in its own words.
    match launch::wait_until_serving(&mut child, connector, START_TIMEOUT, true).await {
        Ok(client) => Ok(client),
        Err(LaunchError::Exited(status)) => Err(format!(
            "lockbrokerd could not start ({status}): {}",
            last_error_line(&log_path, log_start)
        )),
        Err(LaunchError::TimedOut(t)) => Err(format!(
            "lockbrokerd did not start listening on {} within {t:?}; see {}",
            socket.display(),
            log_path.display()
        )),
        Err(LaunchError::Connect(e)) => Err(e.to_string()),
    }
}

/// The last line the daemon wrote to `log` after byte `from` (its error),
/// or a pointer to the log. A log shorter than `from` was turned over by
/// the daemon (`--log-file`): all of it is the daemon's.
fn last_error_line(log: &Path, from: u64) -> String {
    let text = std::fs::read(log).unwrap_or_default();
    let from = usize::try_from(from).unwrap_or(0);
    let start = if from > text.len() { 0 } else { from };
    last_line(&String::from_utf8_lossy(&text[start..]))
        .unwrap_or_else(|| format!("see {}", log.display()))
}

/// The last non-empty line of a daemon's output: the error it exited on.
fn last_line(output: &str) -> Option<String> {
    output
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim().to_owned())
}

#[cfg(unix)]
fn spawn_detached(dir: &Path, log_path: &Path) -> std::io::Result<Child> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    use std::os::unix::process::CommandExt;
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    // Another user may have made the directory since the client checked it:
    // check it again before writing in it, and never follow a symbolic
    // link to the log (it could point at any file of this user's).
    lockbroker::address::check_dir(
        dir,
        lockbroker::Scope::Local,
        Some(lockbroker::address::euid()),
    )
    .map_err(std::io::Error::other)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(log_path)
        .map_err(|e| {
            std::io::Error::new(e.kind(), format!("opening {}: {e}", log_path.display()))
        })?;
    let mut cmd = Command::new(binary());
    cmd.args(["--scope", "local", "--log-file"])
        .arg(log_path)
        .env_remove("LOCKBROKER_SOCKET")
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid and the calls of `no_inherited_fds` are
    // async-signal-safe; setsid detaches the daemon from our session and
    // terminal so it outlives us.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            no_inherited_fds();
            Ok(())
        });
    }
    cmd.spawn()
}

/// Marks every descriptor but stdio close-on-exec, in a child about to
/// exec a daemon. Under `lockbroker lock` this process inherited the
/// lock's connection: a daemon that kept a copy would hold that lock for
/// its whole life. (Closing them instead would also close the pipe std
/// reports a failed exec through.)
#[cfg(unix)]
fn no_inherited_fds() {
    #[cfg(target_os = "linux")]
    // SAFETY: a plain system call (Linux 5.11+); on failure, the loop.
    unsafe {
        if libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ) == 0
        {
            return;
        }
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and fcntl on descriptors of this process only.
    unsafe {
        let top = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur.min(1 << 20) as libc::c_int
        } else {
            1024
        };
        for fd in 3..top {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
}

/// Where the autostarted daemon's log goes: beside the socket.
#[cfg(unix)]
fn log_dir(socket: &Path) -> Result<PathBuf, String> {
    Ok(socket.parent().unwrap_or(Path::new("/")).to_owned())
}

/// Where the autostarted daemon's log goes: a pipe has no directory, so
/// the user's own `%LOCALAPPDATA%\lockbroker`.
#[cfg(windows)]
fn log_dir(_socket: &Path) -> Result<PathBuf, String> {
    let base = std::env::var_os("LOCALAPPDATA")
        .filter(|v| !v.is_empty())
        .ok_or("cannot autostart lockbrokerd: LOCALAPPDATA is not set (start it by hand)")?;
    Ok(PathBuf::from(base).join("lockbroker"))
}

#[cfg(windows)]
fn spawn_detached(dir: &Path, log_path: &Path) -> std::io::Result<Child> {
    use std::os::windows::process::CommandExt;
    use windows_sys::Win32::Foundation::{
        HANDLE_FLAG_INHERIT, INVALID_HANDLE_VALUE, SetHandleInformation,
    };
    use windows_sys::Win32::System::Console::{
        GetStdHandle, STD_ERROR_HANDLE, STD_INPUT_HANDLE, STD_OUTPUT_HANDLE,
    };
    // No console (its own, hidden, so console events of ours never reach
    // it), a process group of its own, and out of the job of a command
    // running under `lockbroker lock`, so that it outlives all of them.
    const DETACHED_PROCESS: u32 = 0x0000_0008;
    const CREATE_NEW_PROCESS_GROUP: u32 = 0x0000_0200;
    const CREATE_BREAKAWAY_FROM_JOB: u32 = 0x0100_0000;
    std::fs::create_dir_all(dir)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .map_err(|e| {
            std::io::Error::new(e.kind(), format!("opening {}: {e}", log_path.display()))
        })?;
    let spawn = |flags: u32| {
        Command::new(binary())
            .args(["--scope", "local", "--log-file"])
            .arg(log_path)
            .env_remove("LOCKBROKER_SOCKET")
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log.try_clone()?)
            .creation_flags(flags)
            .spawn()
    };
    // Windows hands a child every inheritable handle, not only its stdio:
    // our own stdout and stderr (a pipe, when a script captures
    // lockbroker's output) would stay open in the daemon for its whole
    // life, and whoever reads them would never see their end. They need
    // not be inheritable: a child given them as stdio gets a copy.
    for std_handle in [STD_INPUT_HANDLE, STD_OUTPUT_HANDLE, STD_ERROR_HANDLE] {
        // SAFETY: flags of this process's own standard handles.
        unsafe {
            let handle = GetStdHandle(std_handle);
            if !handle.is_null() && handle != INVALID_HANDLE_VALUE {
                SetHandleInformation(handle, HANDLE_FLAG_INHERIT, 0);
            }
        }
    }
    let flags = DETACHED_PROCESS | CREATE_NEW_PROCESS_GROUP;
    match spawn(flags | CREATE_BREAKAWAY_FROM_JOB) {
        // A job that forbids breaking away: the daemon stays in it.
        Err(e) if e.raw_os_error() == Some(5) => spawn(flags),
        other => other,
    }
}

/// A private daemon on a socket in its own temporary directory (a private
/// pipe on Windows), stopped (and its directory removed) on drop.
pub struct Private {
    child: Child,
    /// Copies the daemon's stderr to ours until the daemon exits.
    relay: Option<std::thread::JoinHandle<()>>,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Private {
    /// Starts the daemon and waits until it accepts connections. A daemon
    /// that exits first is reported at once, in its own words.
    pub async fn start() -> Result<Private, String> {
        let dir = tempfile::Builder::new()
            .prefix("lockbroker-run-")
            .tempdir()
            .map_err(|e| format!("cannot create a temporary directory: {e}"))?;
        // A socket in the private directory; on Windows an unguessable
        // pipe name, created owner-only.
        let socket = lockbroker::address::private_address(dir.path())
            .map_err(|e| format!("cannot choose a private pipe name: {e}"))?;
        let mut cmd = Command::new(binary());
        cmd.arg("--socket")
            .arg(&socket)
            .args(["--log-level", "warn"])
            .env_remove("LOCKBROKER_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        #[cfg(unix)]
        // SAFETY: see `no_inherited_fds`.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                no_inherited_fds();
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary().display()))?;
        // Left unread while the daemon starts: if it exits, its error is
        // in the pipe; once it listens, a thread passes its output on to
        // our stderr, where it went before.
        let mut stderr = child.stderr.take().expect("piped");
        let mut private = Private {
            child,
            relay: None,
            socket,
            _dir: dir,
        };
        let connector = Connector::new()
            .socket(&private.socket)
            .client_name("lockbroker run");
        match launch::wait_until_serving(&mut private.child, &connector, START_TIMEOUT, false).await
        {
            Ok(_) => {
                private.relay = Some(std::thread::spawn(move || {
                    let _ = std::io::copy(&mut stderr, &mut std::io::stderr());
                }));
                Ok(private)
            }
            Err(LaunchError::Exited(status)) => {
                let mut output = String::new();
                let _ = std::io::Read::read_to_string(&mut stderr, &mut output);
                Err(format!(
                    "the private lockbrokerd could not start ({status}): {}",
                    last_line(&output).unwrap_or_else(|| "it said nothing".into())
                ))
            }
            Err(LaunchError::TimedOut(_)) => {
                Err("the private lockbrokerd did not start in time".into())
            }
            Err(LaunchError::Connect(e)) => Err(e.to_string()),
        }
    }

    /// Its socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for Private {
    fn drop(&mut self) {
        #[cfg(unix)]
        {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        }
        #[cfg(not(unix))]
        {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        // The daemon has exited: the copy ends with its last words.
        if let Some(relay) = self.relay.take() {
            let _ = relay.join();
        }
    }
}

/// Replaces this process with `lockbrokerd ARGS` (runs it, on Windows).
pub fn exec(args: Vec<OsString>) -> Result<std::convert::Infallible, String> {
    let mut cmd = Command::new(binary());
    cmd.args(args);
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        let e = cmd.exec();
        Err(format!("cannot run {}: {e}", binary().display()))
    }
    #[cfg(not(unix))]
    {
        let status = cmd
            .status()
            .map_err(|e| format!("cannot run {}: {e}", binary().display()))?;
        std::process::exit(status.code().unwrap_or(1));
    }
}
