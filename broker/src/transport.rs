//! The listening socket: binding safely, accepting, and peer credentials.
//!
//! This is the only platform-specific module of the daemon. On Unix it binds
//! a filesystem socket (never an abstract name: those carry no permissions)
//! and makes sure exactly one daemon serves it:
//!
//! 1. An exclusive `flock` on `<socket>.lock`, held for the daemon's life,
//!    settles races between daemons starting at once.
//! 2. If the socket path exists, a connect attempt decides: somebody answers
//!    → refuse to start; connection refused → the file is stale, left by a
//!    killed daemon, and is replaced.
//! 3. The socket gets its mode between the bind and the listen, so no
//!    connection is taken while the umask's mode is on it.
//!
//! The socket file is removed when the [`Listener`] is dropped.

#[cfg(unix)]
pub use unix::*;

#[cfg(windows)]
pub use windows::*;

/// The mode of a Unix socket the daemon serves: for its own user, and
/// for the group too in the global scope (the scope's group).
pub fn socket_mode(scope: Option<lockbroker_proto::address::Scope>) -> u32 {
    use lockbroker_proto::address::Scope;
    match scope {
        Some(Scope::Global) => 0o660,
        Some(Scope::Local | Scope::Process) | None => 0o600,
    }
}

/// Who is on the other end of a connection, where the platform says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerCred {
    /// Process id.
    pub pid: Option<u32>,
    /// User id.
    pub uid: Option<u32>,
    /// Group id.
    pub gid: Option<u32>,
    /// The account's name, where the transport reads it with the uid
    /// (Windows: from the peer's token); else it is looked up by uid.
    pub user: Option<String>,
    /// The peer's supplementary groups when it connected (Linux:
    /// `SO_PEERGROUPS`), for access rules and the admin group: read from
    /// the socket, not from a pid another process may have taken since.
    pub groups: Vec<u32>,
}

#[cfg(unix)]
mod unix {
    use std::fs::{self, DirBuilder, File, OpenOptions};
    use std::io;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
    use std::os::unix::net::{UnixListener as StdListener, UnixStream as StdStream};
    use std::path::{Path, PathBuf};

    use socket2::{Domain, SockAddr, Socket, Type};

    use lockbroker_proto::address::{self, DirError, Scope};
    use tokio::net::UnixListener;
    use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

    use super::PeerCred;
    use crate::error::StartError;

    /// The reading half of an accepted connection. Tokio registers the
    /// socket for writing too, so the reactor also wakes when the client
    /// reads an answer: that readies this CPU just before the client's
    /// next request, worth more across CPUs than the wake-up costs on one
    /// (a read-only registration was measured and dropped: BENCHMARKS.md,
    /// issue 12).
    pub type ReadHalf = OwnedReadHalf;
    /// The writing half of an accepted connection.
    pub type WriteHalf = OwnedWriteHalf;

    /// A bound, listening socket.
    #[derive(Debug)]
    pub struct Listener {
        inner: UnixListener,
        /// Removed on drop; `None` for a socket we did not create.
        path: Option<PathBuf>,
        /// Held (locked) for the listener's life.
        _lock: Option<File>,
    }

    impl Listener {
        /// Binds `socket`. For a scope default, first creates and checks the
        /// scope's directory. Must be called within a Tokio runtime.
        pub fn bind(socket: &Path, scope: Option<Scope>) -> Result<Listener, StartError> {
            let mode = super::socket_mode(scope);
            if let Some(scope) = scope {
                let dir = socket.parent().unwrap_or(Path::new("/"));
                prepare_dir(dir, scope)?;
            }
            let lock = lock_file(socket)?;
            let std = bind_private(socket, mode)?;
            Listener::adopt(std, Some(socket.to_owned()), Some(lock))
        }

        /// Serves an already-listening socket (e.g. one passed by systemd).
        /// The socket file is left in place on drop.
        pub fn from_std(std: StdListener) -> Result<Listener, StartError> {
            Listener::adopt(std, None, None)
        }

        fn adopt(
            std: StdListener,
            path: Option<PathBuf>,
            lock: Option<File>,
        ) -> Result<Listener, StartError> {
            let where_ = path.clone().unwrap_or_default();
            std.set_nonblocking(true)
                .map_err(|e| StartError::io("configuring", &where_, e))?;
            let inner = UnixListener::from_std(std)
                .map_err(|e| StartError::io("registering", &where_, e))?;
            Ok(Listener {
                inner,
                path,
                _lock: lock,
            })
        }

        /// Waits for the next connection.
        pub async fn accept(&self) -> io::Result<(ReadHalf, WriteHalf, PeerCred)> {
            let (stream, _) = self.inner.accept().await?;
            let cred = stream
                .peer_cred()
                .map(|c| PeerCred {
                    pid: c.pid().map(|p| p as u32),
                    uid: Some(c.uid()),
                    gid: Some(c.gid()),
                    user: None,
                    groups: peer_groups(&stream),
                })
                .unwrap_or_default();
            let (r, w) = stream.into_split();
            Ok((r, w, cred))
        }
    }

    /// The supplementary groups of the process that connected `stream`, as
    /// the kernel recorded them at `connect` (Linux `SO_PEERGROUPS`; none
    /// where the platform does not say).
    fn peer_groups(stream: &tokio::net::UnixStream) -> Vec<u32> {
        #[cfg(all(
            target_os = "linux",
            any(
                target_arch = "x86_64",
                target_arch = "x86",
                target_arch = "aarch64",
                target_arch = "arm",
                target_arch = "riscv64"
            )
        ))]
        {
            use std::os::fd::AsRawFd;
            // linux/asm-generic/socket.h; libc does not name it.
            const SO_PEERGROUPS: libc::c_int = 59;
            let mut groups = vec![0u32; 64];
            for _ in 0..2 {
                let mut len = (groups.len() * 4) as libc::socklen_t;
                // SAFETY: the buffer is valid for `len` bytes; the kernel
                // writes at most that and says how much it wrote or needs.
                let rc = unsafe {
                    libc::getsockopt(
                        stream.as_raw_fd(),
                        libc::SOL_SOCKET,
                        SO_PEERGROUPS,
                        groups.as_mut_ptr().cast(),
                        &mut len,
                    )
                };
                let n = len as usize / 4;
                if rc == 0 {
                    groups.truncate(n);
                    return groups;
                }
                if io::Error::last_os_error().raw_os_error() != Some(libc::ERANGE) {
                    return Vec::new();
                }
                groups.resize(n, 0);
            }
            Vec::new()
        }
        #[cfg(not(all(
            target_os = "linux",
            any(
                target_arch = "x86_64",
                target_arch = "x86",
                target_arch = "aarch64",
                target_arch = "arm",
                target_arch = "riscv64"
            )
        )))]
        {
            let _ = stream;
            Vec::new()
        }
    }

    impl Drop for Listener {
        fn drop(&mut self) {
            if let Some(path) = &self.path {
                let _ = fs::remove_file(path);
            }
        }
    }

    /// Binds and listens on `path` with mode `mode`, replacing a stale
    /// socket file there (see [`Listener::bind`]).
    ///
    /// The mode is set before the socket listens: until then a connect is
    /// refused, so nobody gets in through a socket the umask left open, and
    /// a client that got in knows the daemon is past its last step on the
    /// path.
    pub fn bind_private(path: &Path, mode: u32) -> Result<StdListener, StartError> {
        let bound = bind_reclaiming(path)?;
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .map_err(|e| StartError::io("setting the mode of", path, e))?;
        bound
            .listen(libc::SOMAXCONN)
            .map_err(|e| StartError::io("listening on", path, e))?;
        Ok(bound.into())
    }

    /// Removes a socket file when dropped.
    #[derive(Debug)]
    pub struct RemoveOnDrop(pub PathBuf);

    impl Drop for RemoveOnDrop {
        fn drop(&mut self) {
            let _ = fs::remove_file(&self.0);
        }
    }

    /// Creates the scope directory if needed, then refuses one that another
    /// user could tamper with (the check clients make too).
    fn prepare_dir(dir: &Path, scope: Scope) -> Result<(), StartError> {
        match DirBuilder::new().mode(address::dir_mode(scope)).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(StartError::io("creating", dir, e)),
        }
        match address::check_dir(dir, scope, Some(address::euid())) {
            Ok(_) => Ok(()),
            Err(DirError::Io { path, source }) => Err(StartError::io("inspecting", path, source)),
            Err(DirError::Untrusted(u)) => Err(StartError::UnsafeDirectory(u)),
        }
    }

    /// Takes the exclusive lock that makes this daemon the socket's only
    /// server.
    fn lock_file(socket: &Path) -> Result<File, StartError> {
        let mut name = socket.as_os_str().to_owned();
        name.push(".lock");
        let path = PathBuf::from(name);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| StartError::io("opening", &path, e))?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            return Err(if err.kind() == io::ErrorKind::WouldBlock {
                StartError::AlreadyRunning {
                    path: socket.to_owned(),
                }
            } else {
                StartError::io("locking", &path, err)
            });
        }
        Ok(file)
    }

    /// Binds `path` (not listening yet), replacing a stale socket file
    /// only once a connect attempt proves nobody listens on it.
    fn bind_reclaiming(path: &Path) -> Result<Socket, StartError> {
        let addr = SockAddr::unix(path).map_err(|e| StartError::io("binding", path, e))?;
        let bind = || -> io::Result<Socket> {
            let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
            socket.bind(&addr)?;
            Ok(socket)
        };
        match bind() {
            Ok(socket) => return Ok(socket),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {}
            Err(e) => return Err(StartError::io("binding", path, e)),
        }
        let meta = fs::symlink_metadata(path).map_err(|e| StartError::io("inspecting", path, e))?;
        if !meta.file_type().is_socket() {
            return Err(StartError::NotASocket {
                path: path.to_owned(),
            });
        }
        match StdStream::connect(path) {
            Ok(_) => Err(StartError::AlreadyRunning {
                path: path.to_owned(),
            }),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!(socket = %path.display(), "replacing a stale socket file");
                fs::remove_file(path).map_err(|e| StartError::io("removing", path, e))?;
                bind().map_err(|e| StartError::io("binding", path, e))
            }
            Err(e) => Err(StartError::io("probing", path, e)),
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// The groups a connection records are its process's own, as
        /// `getgroups` says.
        #[cfg(target_os = "linux")]
        #[tokio::test]
        async fn a_connection_says_which_groups_its_process_is_in() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("g.sock");
            let listener = tokio::net::UnixListener::bind(&path).unwrap();
            let _client = tokio::net::UnixStream::connect(&path).await.unwrap();
            let (server, _) = listener.accept().await.unwrap();
            let mut own = vec![0 as libc::gid_t; 1024];
            // SAFETY: the buffer holds 1024 gids.
            let n = unsafe { libc::getgroups(1024, own.as_mut_ptr()) };
            assert!(n >= 0);
            own.truncate(n as usize);
            let mut seen = peer_groups(&server);
            seen.sort_unstable();
            own.sort_unstable();
            assert_eq!(seen, own);
        }

        /// Between the bind and the listen the socket refuses connections,
        /// which is what lets the mode be set before anyone gets in.
        #[test]
        fn a_bound_socket_refuses_connections_until_it_listens() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("broker.sock");
            let bound = bind_reclaiming(&path).unwrap();
            let refused = StdStream::connect(&path).unwrap_err();
            assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
            bound.listen(libc::SOMAXCONN).unwrap();
            StdStream::connect(&path).unwrap();
        }

        /// A bound socket of a daemon that never listened is stale too.
        #[test]
        fn a_socket_file_nobody_listens_on_is_reclaimed() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("broker.sock");
            let stale = bind_reclaiming(&path).unwrap();
            let bound = bind_reclaiming(&path).unwrap();
            drop(stale);
            bound.listen(libc::SOMAXCONN).unwrap();
            StdStream::connect(&path).unwrap();
        }
    }
}

#[cfg(windows)]
mod windows {
    //! Named pipes through `interprocess`. Exactly one daemon serves a
    //! pipe, settled twice: a named mutex of this session's namespace,
    //! held for the daemon's life, settles daemons of one login session
    //! starting at once (autostart), as the `flock` does on Unix; and the
    //! first instance is created with `FILE_FLAG_FIRST_PIPE_INSTANCE`, so
    //! a daemon of another session (or a squatter that created the pipe
    //! first) makes binding fail. (Wine ignores that flag; the mutex is
    //! what holds there.) Remote clients are rejected, and a security
    //! descriptor admits only the user (local scope) or SYSTEM,
    //! Administrators and Authenticated Users (global scope).
    //!
    //! Each connection's peer is identified by its process's token: the
    //! `uid` quotas are kept under is derived from the user's SID
    //! ([`windows_uid`](lockbroker_proto::address::windows_uid)).

    use std::io;
    use std::path::Path;

    use interprocess::os::windows::named_pipe::pipe_mode::Bytes;
    use interprocess::os::windows::named_pipe::tokio::PipeListener;
    use interprocess::os::windows::named_pipe::{PipeListenerOptions, PipeMode};
    use interprocess::os::windows::security_descriptor::SecurityDescriptor;
    use lockbroker_proto::address::Scope;
    use lockbroker_proto::pipe::{PipeReader, PipeWriter};

    use super::PeerCred;
    use crate::error::StartError;

    /// The reading half of an accepted connection.
    pub type ReadHalf = PipeReader;
    /// The writing half of an accepted connection.
    pub type WriteHalf = PipeWriter;

    /// Only the pipe's owner — the user running the daemon — may connect
    /// (SDDL: protected DACL, generic-all for OWNER RIGHTS).
    pub const USER_SDDL: &str = "D:P(A;;GA;;;OW)";

    /// SYSTEM and Administrators fully, Authenticated Users to read and
    /// write: every user of the machine, no anonymous or network logon.
    pub const GLOBAL_SDDL: &str = "D:P(A;;GA;;;SY)(A;;GA;;;BA)(A;;GRGW;;;AU)";

    /// A listening named pipe.
    #[derive(Debug)]
    pub struct Listener {
        inner: PipeListener<Bytes, Bytes>,
        /// Held for the listener's life: this daemon is the pipe's only one.
        _instance: Instance,
    }

    /// The named mutex that makes a daemon its pipe's only server.
    #[derive(Debug)]
    struct Instance(windows_sys::Win32::Foundation::HANDLE);

    // SAFETY: a kernel handle, usable from any thread.
    unsafe impl Send for Instance {}
    // SAFETY: as above; it is only closed, on drop.
    unsafe impl Sync for Instance {}

    impl Drop for Instance {
        fn drop(&mut self) {
            // SAFETY: the handle this value owns.
            unsafe { windows_sys::Win32::Foundation::CloseHandle(self.0) };
        }
    }

    /// Creates the mutex named after `pipe` in this login session's
    /// namespace; `AlreadyRunning` when it exists (another daemon holds it).
    /// The system closes it when the process ends, however it ends.
    fn claim(pipe: &Path) -> Result<Instance, StartError> {
        use windows_sys::Win32::Foundation::{ERROR_ALREADY_EXISTS, GetLastError};
        use windows_sys::Win32::System::Threading::CreateMutexW;
        // Kernel object names may not hold a backslash past the namespace.
        let name: String = pipe
            .to_string_lossy()
            .chars()
            .map(|c| if c == '\\' { '/' } else { c })
            .collect();
        let wide = widestring::U16CString::from_str(format!("Local\\lockbroker-daemon:{name}"))
            .map_err(|e| {
                StartError::io("naming the instance mutex of", pipe, io::Error::other(e))
            })?;
        // SAFETY: a NUL-terminated name; default security (this user's).
        let handle = unsafe { CreateMutexW(std::ptr::null(), 0, wide.as_ptr()) };
        // SAFETY: read at once after the call that set it.
        let error = unsafe { GetLastError() };
        if handle.is_null() {
            return Err(StartError::io(
                "creating the instance mutex of",
                pipe,
                io::Error::from_raw_os_error(error as i32),
            ));
        }
        let instance = Instance(handle);
        if error == ERROR_ALREADY_EXISTS {
            return Err(StartError::AlreadyRunning {
                path: pipe.to_owned(),
            });
        }
        Ok(instance)
    }

    impl Listener {
        /// Creates the pipe `name` (e.g. `\\.\pipe\lockbroker-alice`).
        /// Must be called within a Tokio runtime.
        pub fn bind(name: &Path, scope: Option<Scope>) -> Result<Listener, StartError> {
            let sddl = match scope {
                Some(Scope::Global) => GLOBAL_SDDL,
                _ => USER_SDDL,
            };
            let instance = claim(name)?;
            let wide = widestring::U16CString::from_str(sddl).expect("no NUL in the SDDL");
            let descriptor = SecurityDescriptor::deserialize(&wide)
                .map_err(|e| StartError::io("building the security descriptor of", name, e))?;
            let inner = PipeListenerOptions::new()
                .path(name)
                .mode(PipeMode::Bytes)
                .accept_remote(false)
                .security_descriptor(Some(descriptor))
                .create_tokio_duplex::<Bytes>()
                .map_err(|e| match e.kind() {
                    io::ErrorKind::PermissionDenied | io::ErrorKind::AddrInUse => {
                        StartError::AlreadyRunning {
                            path: name.to_owned(),
                        }
                    }
                    _ => StartError::io("creating the pipe", name, e),
                })?;
            Ok(Listener {
                inner,
                _instance: instance,
            })
        }

        /// Waits for the next connection.
        pub async fn accept(&self) -> io::Result<(ReadHalf, WriteHalf, PeerCred)> {
            let stream = self.inner.accept().await?;
            let pid = stream.client_process_id().ok();
            // A client whose token this daemon may not read (another
            // user's elevated process, for a daemon not run as SYSTEM)
            // gets no uid, as on a platform without credentials.
            let identity = pid.and_then(|pid| lockbroker_proto::pipe::identity_of(pid).ok());
            let cred = PeerCred {
                pid,
                uid: identity.as_ref().and_then(|identity| identity.uid),
                gid: None,
                user: identity.map(|identity| crate::identity::printable(&identity.account)),
                groups: Vec::new(),
            };
            let (r, w) = stream.split();
            Ok((r, PipeWriter::new(w), cred))
        }
    }
}
