//! [`Connector`]: where and how to connect, then the handshake.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[cfg(unix)]
use lockbroker_proto::address::Expected;
use lockbroker_proto::address::{self, Address, Env, Scope};
use lockbroker_proto::io::{FrameReader, write_message};
use lockbroker_proto::{
    ClientMessage, Hello, MAGIC, OLDEST_PROTOCOL_VERSION, PROTOCOL_VERSION, ServerMessage, Welcome,
    frame,
};

use crate::client::Client;
use crate::error::{Error, Result};
use crate::transport;

/// How long connecting and the handshake may take by default.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Builds a [`Client`]: the address (explicit, else `LOCKBROKER_SOCKET`,
/// else the scope's default), the name shown by `inspect`, and a timeout.
///
/// Connecting refuses a daemon another user could be posing as. On Unix
/// ([`Error::Untrusted`]): a scope default whose directory is not safe (the
/// local scope's must be the user's, mode 0700; the global one must not be
/// writable by others), and, checked on the connected socket's peer
/// credentials, a daemon running as a user not expected — the local
/// scope's must be the user; the global scope's root or the owner of
/// `/run/lockbroker`; one at an explicit socket or `LOCKBROKER_SOCKET` the
/// user or root. [`allow_server_uid`](Connector::allow_server_uid) opts in
/// to others. On Windows ([`Error::UntrustedPipe`]), checked on the pipe
/// server's process token: the local pipe must be served by the user; the
/// global pipe by SYSTEM or an elevated process; a pipe named explicitly
/// or by `LOCKBROKER_SOCKET` by any of them.
/// [`allow_server_sid`](Connector::allow_server_sid) opts in to others.
///
/// ```no_run
/// # async fn demo() -> lockbroker::Result<()> {
/// let client = lockbroker::Connector::new()
///     .socket("/tmp/lockbroker-demo.sock")
///     .client_name("deploy.sh")
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Connector {
    socket: Option<PathBuf>,
    scope: Scope,
    client_name: Option<String>,
    timeout: Duration,
    /// Users trusted to serve the socket besides the defaults.
    allowed_uids: Vec<u32>,
    /// The same on Windows, as SIDs.
    allowed_sids: Vec<String>,
    /// On whose behalf acquires are made, for deadlock detection.
    who: Who,
    /// The actors those run within; `None`: as `LOCKBROKER_ACTOR` says.
    within: Option<Arc<[u64]>>,
}

/// Who a client's acquires are made for (`AcquireAs`, protocol version 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    /// Plain acquires: never checked.
    Off,
    /// The calling task's (async) or thread's (blocking).
    Own,
    /// This one, for every acquire of the client.
    Fixed(u64),
}

/// On whose behalf a client's acquires are made, which the daemon's
/// deadlock detection follows: an actor (`AcquireAs`, protocol version 3)
/// and the actors it runs within (`AcquireWith`, version 4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Actors {
    who: Who,
    within: Arc<[u64]>,
}

impl Actors {
    /// The actor of an acquire made now, in a session of protocol
    /// `version` (0: none), and the actors it runs within.
    pub(crate) fn current(&self, version: u16) -> (u64, &[u64]) {
        let actor = match self.who {
            _ if version < 3 => 0,
            Who::Off => 0,
            Who::Own => own_actor(),
            Who::Fixed(actor) => actor,
        };
        let within = if actor != 0 && version >= 4 {
            &self.within[..]
        } else {
            &[]
        };
        (actor, within)
    }
}

/// The calling task's actor, or, outside a Tokio task, the calling
/// thread's: a number no other task or thread of any process is likely to
/// have (hashed with this process's random key).
fn own_actor() -> u64 {
    use std::hash::BuildHasher;
    static KEY: std::sync::LazyLock<std::hash::RandomState> =
        std::sync::LazyLock::new(std::hash::RandomState::new);
    let hash = match tokio::task::try_id() {
        Some(task) => KEY.hash_one(("task", task)),
        None => KEY.hash_one(("thread", std::thread::current().id())),
    };
    hash.max(1)
}

/// The protocol versions a client asks for, latest first: a daemon that
/// refuses one is asked again in the next.
pub(crate) const VERSIONS: [u16; 4] = [PROTOCOL_VERSION, 3, 2, OLDEST_PROTOCOL_VERSION];

impl Default for Connector {
    fn default() -> Self {
        Connector::new()
    }
}

impl Connector {
    /// The defaults: local scope, the program's name, a 10 s timeout.
    pub fn new() -> Connector {
        Connector {
            socket: None,
            scope: Scope::Local,
            client_name: None,
            timeout: DEFAULT_CONNECT_TIMEOUT,
            allowed_uids: Vec::new(),
            allowed_sids: Vec::new(),
            who: Who::Off,
            within: None,
        }
    }

    /// Whether acquires ask the daemon to refuse a wait that could never
    /// be granted (`Error::Refused` with `ErrorCode::Deadlock`), with a
    /// daemon of protocol version 3 or later; off by default.
    ///
    /// Each acquire is then made on behalf of its caller: the task it is
    /// awaited in (the async client) or the thread (the blocking client).
    /// The daemon takes that caller to do nothing else while it waits —
    /// to release nothing until the wait ends — and refuses a wait that
    /// could then never be granted, timeout or not. Code in which one task
    /// holds a lock while it awaits another that only a timeout, or a
    /// release from another branch of a `select!`, would end, should leave
    /// detection off (and so it is off unless asked for).
    ///
    /// A program run by `lockbroker lock` under a lock runs within the
    /// wrapper that holds it: unless [`within`](Connector::within) says
    /// otherwise, its callers run within the actors `LOCKBROKER_ACTOR`
    /// names ([`actor::inherited`](crate::actor::inherited)), so a wait
    /// for a lock whose holder waits for the wrapper's is refused too.
    pub fn detect_deadlocks(mut self, on: bool) -> Connector {
        self.who = if on { Who::Own } else { Who::Off };
        self
    }

    /// Makes every acquire of the client on behalf of `actor` (not 0), as
    /// detection sees it: the same thread of control as whatever else
    /// acquires as `actor`, in any session (0: detection off).
    pub fn actor(mut self, actor: u64) -> Connector {
        self.who = if actor == 0 {
            Who::Off
        } else {
            Who::Fixed(actor)
        };
        self
    }

    /// The actors this client's actor runs within, nearest first (at most
    /// [`MAX_WITHIN`](lockbroker_proto::MAX_WITHIN) are kept): each keeps
    /// what it holds while an acquire of this client waits, as a wrapper
    /// keeps its lock until its command ends. With detection on and no
    /// call to this, the actors `LOCKBROKER_ACTOR` names. A daemon of
    /// protocol version 3 is told the actor alone.
    pub fn within(mut self, actors: impl IntoIterator<Item = u64>) -> Connector {
        let mut actors: Vec<u64> = actors.into_iter().filter(|a| *a != 0).collect();
        actors.truncate(lockbroker_proto::MAX_WITHIN);
        self.within = Some(actors.into());
        self
    }

    /// Connect to this socket path (or pipe name), ignoring
    /// `LOCKBROKER_SOCKET` and the scope.
    pub fn socket(mut self, path: impl Into<PathBuf>) -> Connector {
        self.socket = Some(path.into());
        self
    }

    /// Use this scope's default address when no socket is given.
    pub fn scope(mut self, scope: Scope) -> Connector {
        self.scope = scope;
        self
    }

    /// The name `inspect` shows for this client (at most 255 bytes).
    pub fn client_name(mut self, name: impl Into<String>) -> Connector {
        self.client_name = Some(name.into());
        self
    }

    /// How long connecting and the handshake may take.
    pub fn timeout(mut self, timeout: Duration) -> Connector {
        self.timeout = timeout;
        self
    }

    /// Also accept a daemon running as user `uid`, on any address: for a
    /// daemon another user (a service account) runs on purpose. The
    /// directory checks of a scope's default socket are not relaxed.
    /// Unix only in effect: on Windows see
    /// [`allow_server_sid`](Connector::allow_server_sid).
    pub fn allow_server_uid(mut self, uid: u32) -> Connector {
        self.allowed_uids.push(uid);
        self
    }

    /// Also accept a pipe served by the user with this SID (`S-1-5-…`), on
    /// any address: the Windows counterpart of
    /// [`allow_server_uid`](Connector::allow_server_uid). Windows only in
    /// effect.
    pub fn allow_server_sid(mut self, sid: impl Into<String>) -> Connector {
        self.allowed_sids.push(sid.into());
        self
    }

    /// The address this connector will use: the explicit socket, else
    /// `LOCKBROKER_SOCKET`, else the scope's default.
    pub fn address(&self) -> Result<PathBuf> {
        Ok(self.resolve()?.path)
    }

    fn resolve(&self) -> Result<Address> {
        address::resolve(self.socket.clone(), self.scope, &Env::current()).ok_or(Error::NoAddress)
    }

    /// Checks the directory of a scope's default socket, and says whom to
    /// accept as the daemon.
    #[cfg(unix)]
    fn expected_server(&self, address: &Address) -> Result<Trust> {
        use lockbroker_proto::address::DirError;
        match address::expected_server(address, address::euid(), &self.allowed_uids) {
            Ok(expected) => Ok(Trust(expected)),
            Err(DirError::Untrusted(u)) => Err(Error::Untrusted(u)),
            Err(DirError::Io { path: dir, source }) => Err(Error::Connect {
                path: address.path.clone(),
                source: std::io::Error::new(
                    source.kind(),
                    format!("inspecting {}: {source}", dir.display()),
                ),
            }),
        }
    }

    /// Says whom to accept as the pipe's server.
    #[cfg(windows)]
    fn expected_server(&self, address: &Address) -> Result<Trust> {
        let me = lockbroker_proto::pipe::current_identity().map_err(|source| Error::Connect {
            path: address.path.clone(),
            source: std::io::Error::new(
                source.kind(),
                format!("reading this process's user: {source}"),
            ),
        })?;
        Ok(Trust(address::expected_pipe_server(
            address,
            &me,
            &self.allowed_sids,
        )))
    }

    /// Connects and shakes hands. Must run within a Tokio runtime.
    pub async fn connect(&self) -> Result<Client> {
        let (path, name, trust) = self.prepare()?;
        let connecting = connect(path.clone(), name, trust, self.actors());
        match tokio::time::timeout(self.timeout, connecting).await {
            Ok(result) => result,
            Err(_) => Err(Error::Connect {
                path,
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {:?}", self.timeout),
                ),
            }),
        }
    }
}

impl Connector {
    /// Where to connect, the name to give, and whom to trust there.
    pub(crate) fn prepare(&self) -> Result<(PathBuf, String, Trust)> {
        let address = self.resolve()?;
        let trust = self.expected_server(&address)?;
        let name = self.client_name.clone().unwrap_or_else(program_name);
        Ok((address.path, name, trust))
    }

    /// How long connecting and the handshake may take.
    #[cfg(unix)]
    pub(crate) fn connect_timeout(&self) -> Duration {
        self.timeout
    }

    /// On whose behalf the client's acquires are made.
    pub(crate) fn actors(&self) -> Actors {
        let within = match (&self.within, self.who) {
            (_, Who::Off) => Arc::from([]),
            (Some(within), _) => Arc::clone(within),
            (None, _) => crate::actor::inherited().into(),
        };
        Actors {
            who: self.who,
            within,
        }
    }
}

/// Whom a connector accepts as the daemon: users (Unix) or SIDs (Windows).
pub(crate) struct Trust(#[cfg(unix)] Expected, #[cfg(windows)] Vec<String>);

impl Trust {
    /// Refuses the daemon that serves `path` as `server` (its uid on
    /// Unix, its process id on Windows) unless it is trusted.
    /// Checks who serves `path` (its uid on Unix, its process on Windows).
    pub(crate) fn verify(&self, path: &std::path::Path, server: u32) -> Result<()> {
        #[cfg(unix)]
        {
            address::check_server(path, server, &self.0).map_err(Error::Untrusted)
        }
        #[cfg(windows)]
        {
            let identity =
                lockbroker_proto::pipe::identity_of(server).map_err(|source| Error::Connect {
                    path: path.to_owned(),
                    source: std::io::Error::new(
                        source.kind(),
                        format!(
                            "reading the user of the pipe's server, process {server}: {source}"
                        ),
                    ),
                })?;
            address::check_pipe_server(path, &identity, &self.0).map_err(Error::UntrustedPipe)
        }
    }
}

async fn connect(
    path: PathBuf,
    client_name: String,
    trust: Trust,
    actors: Actors,
) -> Result<Client> {
    let mut versions = VERSIONS.into_iter().peekable();
    loop {
        let version = versions.next().expect("versions to try");
        match connect_as(&path, client_name.clone(), &trust, version, actors.clone()).await {
            Err(e) if refused_version(&e) && versions.peek().is_some() => continue,
            other => return other,
        }
    }
}

/// Whether a handshake failed only for the version asked: a daemon of
/// before that version, to be asked again in the one before.
pub(crate) fn refused_version(e: &Error) -> bool {
    matches!(
        e,
        Error::Handshake {
            code: Some(lockbroker_proto::ErrorCode::UnsupportedVersion),
            ..
        }
    )
}

async fn connect_as(
    path: &std::path::Path,
    client_name: String,
    trust: &Trust,
    version: u16,
    actors: Actors,
) -> Result<Client> {
    let path = path.to_owned();
    let (reader, mut writer, server) =
        transport::connect(&path)
            .await
            .map_err(|source| Error::Connect {
                path: path.clone(),
                source,
            })?;
    // Before anything is sent: a Hello names this program.
    trust.verify(&path, server)?;
    // A daemon that refuses us (e.g. at its connection limit) may answer
    // and close before reading the Hello, so a failed write is only final
    // if no answer can be read either.
    let sent = write_message(&mut writer, &hello(client_name, version), HELLO_MAX).await;
    let mut reader = FrameReader::new(reader, frame::DEFAULT_MAX_FRAME_LEN);
    let answer = reader.read_message::<ServerMessage>().await;
    let welcome = welcome(&path, answer, sent.map_err(|e| e.to_string()), version)?;
    reader.set_max_len(welcome.limits.max_frame_len);
    reader.set_version(welcome.version);
    Ok(Client::start(reader, writer, welcome, actors))
}

/// Before the Welcome the daemon's limit is unknown; a Hello is small.
pub(crate) const HELLO_MAX: u32 = lockbroker_proto::MIN_MAX_FRAME_LEN;

/// The first frame this client sends, asking for protocol `version`.
pub(crate) fn hello(client_name: String, version: u16) -> ClientMessage {
    ClientMessage::Hello(Hello {
        magic: MAGIC,
        version,
        client_name,
    })
}

/// What the daemon's first answer means, given whether the Hello (of
/// protocol `version`) was sent.
pub(crate) fn welcome(
    path: &std::path::Path,
    answer: std::result::Result<Option<ServerMessage>, lockbroker_proto::FrameError>,
    sent: std::result::Result<(), String>,
    version: u16,
) -> Result<Welcome> {
    let handshake = |code, message: String| Error::Handshake {
        path: path.to_owned(),
        code,
        message,
    };
    let welcome = match (answer, sent) {
        (Ok(Some(ServerMessage::Fatal(e))), _) => {
            return Err(handshake(Some(e.code), e.message));
        }
        (_, Err(e)) => return Err(handshake(None, e)),
        (Ok(Some(ServerMessage::Welcome(w))), Ok(())) => w,
        (Ok(Some(other)), Ok(())) => {
            return Err(handshake(
                None,
                format!("expected a Welcome, got {other:?}"),
            ));
        }
        (Ok(None), Ok(())) => {
            return Err(handshake(None, "the daemon closed the connection".into()));
        }
        (Err(e), Ok(())) => return Err(handshake(None, e.to_string())),
    };
    if welcome.version != version {
        return Err(handshake(
            None,
            format!(
                "the daemon answered with protocol version {}",
                welcome.version
            ),
        ));
    }
    Ok(welcome)
}

/// The running program's file name, the default client name.
fn program_name() -> String {
    std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .map(|mut n| {
            // Keep within the protocol's 255 bytes on a char boundary.
            while n.len() > 255 {
                n.pop();
            }
            n.retain(|c| !c.is_control());
            n
        })
        .unwrap_or_default()
}
