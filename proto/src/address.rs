//! Where a daemon listens: the scopes of DESIGN.md and their socket paths.
//!
//! Both the daemon and the clients resolve addresses here, so the two can
//! never disagree. Clients resolve an explicit address first, then
//! [`SOCKET_ENV`], then their scope's default ([`resolve`]).
//!
//! Whom to trust at an address is decided here too, once for both ends
//! (Unix): the daemon refuses to serve from a scope directory another user
//! could tamper with ([`check_dir`]), and a client refuses such a directory
//! and, after connecting, a daemon running as a user it does not expect
//! ([`expected_server`], [`check_server`]). Otherwise another user who
//! creates `/tmp/lockbroker-$UID` first could answer the victim's locks.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

/// The environment variable that names the socket for clients.
pub const SOCKET_ENV: &str = "LOCKBROKER_SOCKET";

/// Who shares a daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scope {
    /// One process tree: the private daemon `lockbroker run` starts and
    /// names in [`SOCKET_ENV`]. It has no default address.
    Process,
    /// One user's login session (the default).
    #[default]
    Local,
    /// Every user of the machine.
    Global,
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scope::Process => "self",
            Scope::Local => "local",
            Scope::Global => "global",
        })
    }
}

/// The environment a default address depends on, captured once so that
/// resolution is a pure function (and testable).
#[derive(Debug, Clone, Default)]
pub struct Env {
    /// `LOCKBROKER_SOCKET`.
    pub socket: Option<OsString>,
    /// `XDG_RUNTIME_DIR` (Unix).
    pub runtime_dir: Option<OsString>,
    /// The effective user id (Unix) or user name (Windows).
    pub user: String,
}

impl Env {
    /// Reads the current process's environment.
    pub fn current() -> Env {
        Env {
            socket: std::env::var_os(SOCKET_ENV).filter(|s| !s.is_empty()),
            runtime_dir: std::env::var_os("XDG_RUNTIME_DIR").filter(|s| !s.is_empty()),
            user: current_user(),
        }
    }
}

#[cfg(unix)]
fn current_user() -> String {
    euid().to_string()
}

#[cfg(windows)]
fn current_user() -> String {
    std::env::var("USERNAME").unwrap_or_else(|_| "default".to_owned())
}

/// The default address of `scope`: a socket path on Unix, a pipe name on
/// Windows. The process scope has none.
pub fn default_address(scope: Scope, env: &Env) -> Option<PathBuf> {
    if cfg!(windows) {
        return match scope {
            Scope::Process => None,
            Scope::Local => Some(format!(r"\\.\pipe\lockbroker-{}", env.user).into()),
            Scope::Global => Some(r"\\.\pipe\lockbroker".into()),
        };
    }
    match scope {
        Scope::Process => None,
        Scope::Local | Scope::Global => scope_dir(scope, env).map(|d| d.join("broker.sock")),
    }
}

/// A new private address for a daemon only its starter knows: on Unix the
/// socket `broker.sock` in `dir` (a directory the caller made private), on
/// Windows an unguessable pipe name (`\\.\pipe\lockbroker-<user>-<128
/// random bits>`; `dir` is unused) that the daemon creates with an
/// owner-only security descriptor. The self scope of `lockbroker run` and
/// the tests' daemons use it.
pub fn private_address(dir: &Path) -> std::io::Result<PathBuf> {
    #[cfg(windows)]
    {
        let _ = dir;
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).map_err(std::io::Error::other)?;
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let user: String = current_user()
            .chars()
            .map(|c| if c == '\\' || c.is_control() { '_' } else { c })
            .collect();
        Ok(format!(r"\\.\pipe\lockbroker-{user}-{hex}").into())
    }
    #[cfg(not(windows))]
    Ok(dir.join("broker.sock"))
}

/// The directory holding `scope`'s default socket (Unix).
pub fn scope_dir(scope: Scope, env: &Env) -> Option<PathBuf> {
    match (scope, &env.runtime_dir) {
        (Scope::Process, _) => None,
        (Scope::Local, Some(dir)) => Some(PathBuf::from(dir).join("lockbroker")),
        (Scope::Local, None) => Some(PathBuf::from(format!("/tmp/lockbroker-{}", env.user))),
        (Scope::Global, _) => Some(PathBuf::from("/run/lockbroker")),
    }
}

/// A client's resolved address, and whether it is a scope's default (whose
/// directory is checked before connecting).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// The socket path (Unix) or pipe name (Windows).
    pub path: PathBuf,
    /// `Some(scope)` when `path` is `scope`'s default; `None` when it was
    /// given explicitly or by `LOCKBROKER_SOCKET`.
    pub default_of: Option<Scope>,
}

/// A client's address: `explicit`, else `LOCKBROKER_SOCKET`, else the
/// scope's default (`None` only for the process scope without
/// `LOCKBROKER_SOCKET`).
pub fn resolve(explicit: Option<PathBuf>, scope: Scope, env: &Env) -> Option<Address> {
    let given = explicit.or_else(|| env.socket.clone().map(PathBuf::from));
    match given {
        Some(path) => Some(Address {
            path,
            default_of: None,
        }),
        None => default_address(scope, env).map(|path| Address {
            path,
            default_of: Some(scope),
        }),
    }
}

/// The user ids a check accepts, sorted; shown in refusals as `uid 1000`
/// or `uid 0 or 1000`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Expected {
    uids: Vec<u32>,
}

impl Expected {
    /// Accepts exactly these users.
    pub fn new(uids: impl IntoIterator<Item = u32>) -> Expected {
        let mut uids: Vec<u32> = uids.into_iter().collect();
        uids.sort_unstable();
        uids.dedup();
        Expected { uids }
    }

    /// The accepted user ids, sorted.
    pub fn uids(&self) -> &[u32] {
        &self.uids
    }

    /// Whether `uid` is accepted.
    pub fn contains(&self, uid: u32) -> bool {
        self.uids.binary_search(&uid).is_ok()
    }
}

impl fmt::Display for Expected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("uid ")?;
        for (i, uid) in self.uids.iter().enumerate() {
            if i > 0 {
                f.write_str(" or ")?;
            }
            write!(f, "{uid}")?;
        }
        Ok(())
    }
}

/// What is wrong in an [`Untrusted`] refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Problem {
    /// The scope directory is a symbolic link.
    SymbolicLink,
    /// The scope directory is not a directory.
    NotADirectory,
    /// The scope directory belongs to a user not expected.
    Owner,
    /// The scope directory is open to other users.
    Mode {
        /// Its permission bits.
        mode: u32,
        /// The mode it is created with, the loosest accepted.
        required: u32,
    },
    /// The process serving the socket runs as a user not expected.
    Server,
}

/// A socket directory, or a daemon, that a lockbroker end refuses to trust:
/// another user could pose as the daemon there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Untrusted {
    /// The scope directory, or the socket whose server was checked.
    pub path: PathBuf,
    /// What is wrong.
    pub problem: Problem,
    /// The user owning the directory, or running the daemon.
    pub owner: u32,
    /// The users that were acceptable.
    pub expected: Expected,
}

impl fmt::Display for Untrusted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (path, owner, expected) = (self.path.display(), self.owner, &self.expected);
        match self.problem {
            Problem::SymbolicLink => write!(
                f,
                "{path} is a symbolic link (owned by uid {owner}), not a directory"
            ),
            Problem::NotADirectory => {
                write!(f, "{path} (owned by uid {owner}) is not a directory")
            }
            Problem::Owner => write!(
                f,
                "directory {path} is owned by uid {owner}, expected {expected}"
            ),
            Problem::Mode { mode, required } => write!(
                f,
                "directory {path} (owned by uid {owner}) is open to other users: \
                 its mode is {mode:04o}; it must be {required:04o} (chmod {required:o} {path})"
            ),
            Problem::Server => write!(
                f,
                "the daemon at {path} runs as uid {owner}, expected {expected}"
            ),
        }
    }
}

impl std::error::Error for Untrusted {}

/// Why a directory check failed.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    /// The directory could not be inspected (for a client, a missing
    /// directory is not an error: see [`expected_server`]).
    #[error("inspecting {}: {source}", path.display())]
    Io {
        /// The directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The directory is not safe to use.
    #[error(transparent)]
    Untrusted(#[from] Untrusted),
}

/// The user a process runs as, on Windows (from its token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user's SID in string form (`S-1-5-21-…`): what trust checks
    /// compare, and what a Windows peer's `uid` is derived from
    /// ([`windows_uid`]).
    pub sid: String,
    /// The owner SID of the process's token: the user, or
    /// [`ADMINISTRATORS_SID`] for an elevated process.
    pub owner_sid: String,
    /// `DOMAIN\user`, or the SID when the account cannot be looked up.
    pub account: String,
    /// The number a peer's `uid` holds for this user ([`windows_uid`]).
    pub uid: Option<u32>,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.account, self.sid)
    }
}

/// The SID of the local system account (services run as it).
pub const SYSTEM_SID: &str = "S-1-5-18";
/// The SID of the Administrators group (the owner of an elevated
/// process's token).
pub const ADMINISTRATORS_SID: &str = "S-1-5-32-544";

/// The number a Windows peer's `uid` holds (PROTOCOL.md 4.17), from its
/// SID, as Cygwin and MSYS2 number Windows accounts: a well-known
/// `S-1-5-N` is N (SYSTEM: 18), a built-in `S-1-5-32-N` is 0x20000 + N,
/// an account of this machine (`local`: its domain is the computer's) is
/// 0x30000 + its RID, any other account 0x100000 + its RID. Quotas are
/// kept per number. `None` for a SID of another shape.
pub fn windows_uid(sid: &str, local: bool) -> Option<u32> {
    let rest = sid.strip_prefix("S-1-5-")?;
    let parts: Vec<u32> = rest
        .split('-')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let rid = *parts.last()?;
    match parts.as_slice() {
        [n] => Some(*n),
        [32, n] => 0x2_0000u32.checked_add(*n),
        [21, .., _] if local => 0x3_0000u32.checked_add(rid),
        [21, .., _] => 0x10_0000u32.checked_add(rid),
        _ => None,
    }
}

/// Whom a client running as `user` accepts as the pipe server at
/// `address` (Windows), as SIDs: the local scope's pipe must be served by
/// the user; the global pipe by SYSTEM (the service) or an elevated
/// process (its token owned by Administrators); an explicit address or
/// `LOCKBROKER_SOCKET` by any of the three. `allowed` adds the SIDs the
/// caller opted in to trust.
pub fn expected_pipe_server(address: &Address, user: &Identity, allowed: &[String]) -> Vec<String> {
    let mut sids = allowed.to_vec();
    let admin = [SYSTEM_SID.to_owned(), ADMINISTRATORS_SID.to_owned()];
    match address.default_of {
        Some(Scope::Local | Scope::Process) => sids.push(user.sid.clone()),
        Some(Scope::Global) => sids.extend(admin),
        None => {
            sids.push(user.sid.clone());
            sids.extend(admin);
        }
    }
    sids
}

/// Refuses the pipe server `server` of `pipe` unless its user, or its
/// token's owner, is one of `expected` (SIDs).
pub fn check_pipe_server(
    pipe: &Path,
    server: &Identity,
    expected: &[String],
) -> Result<(), UntrustedPipe> {
    let matches = |sid: &str| expected.iter().any(|e| e.eq_ignore_ascii_case(sid));
    if matches(&server.sid) || matches(&server.owner_sid) {
        return Ok(());
    }
    Err(UntrustedPipe {
        path: pipe.to_owned(),
        server: Box::new(server.clone()),
        expected: expected.to_vec(),
    })
}

/// A pipe (Windows) whose server runs as a user a client does not trust:
/// somebody else created the pipe first and could answer the user's locks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UntrustedPipe {
    /// The pipe.
    pub path: PathBuf,
    /// Who serves it.
    pub server: Box<Identity>,
    /// The SIDs that were acceptable.
    pub expected: Vec<String>,
}

impl fmt::Display for UntrustedPipe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the daemon at {} runs as {}, expected {}",
            self.path.display(),
            self.server,
            self.expected.join(" or ")
        )
    }
}

impl std::error::Error for UntrustedPipe {}

/// The effective user id of this process (Unix).
#[cfg(unix)]
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The mode a scope directory is created with, which is also the loosest
/// accepted: the local and process scopes admit nobody else (0700); the
/// global directory may be traversed by every user, written by its owner
/// only (0755).
pub fn dir_mode(scope: Scope) -> u32 {
    match scope {
        Scope::Local | Scope::Process => 0o700,
        Scope::Global => 0o755,
    }
}

/// Checks `scope`'s directory `dir`: a real directory (not a symbolic
/// link), owned by `owner` (`None`: by anyone, for the global directory as
/// a client sees it), and no looser than [`dir_mode`]. Returns its owner.
///
/// The daemon checks the directory it serves from; a client checks the
/// directory of a scope's default address before connecting. Both use
/// this function.
#[cfg(unix)]
pub fn check_dir(dir: &Path, scope: Scope, owner: Option<u32>) -> Result<u32, DirError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(dir).map_err(|source| DirError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let refuse = |problem| Untrusted {
        path: dir.to_owned(),
        problem,
        owner: meta.uid(),
        expected: Expected::new(owner),
    };
    if meta.file_type().is_symlink() {
        return Err(refuse(Problem::SymbolicLink).into());
    }
    if !meta.is_dir() {
        return Err(refuse(Problem::NotADirectory).into());
    }
    if owner.is_some_and(|o| o != meta.uid()) {
        return Err(refuse(Problem::Owner).into());
    }
    let mode = meta.mode() & 0o777;
    let required = dir_mode(scope);
    if mode & !required != 0 {
        return Err(refuse(Problem::Mode { mode, required }).into());
    }
    Ok(meta.uid())
}

/// Whom a client running as `user` accepts as the daemon at `address`,
/// after checking the directory of a scope's default:
///
/// - the local scope's default: the directory must be the user's and
///   closed to others; the daemon must run as the user;
/// - the global scope's default: the directory must not be writable by
///   others (only root can create it in `/run`); the daemon must run as
///   root or as the directory's owner. Peer credentials name the process
///   that called `listen`: under the shipped systemd units that is systemd
///   (root), although `lockbroker.service` runs as user `lockbroker`; a
///   daemon started by hand must own the directory it serves from;
/// - an explicit address or `LOCKBROKER_SOCKET`: no directory check; the
///   daemon must run as the user or root.
///
/// `allowed` adds users the caller opted in to trust. A missing directory
/// passes: connecting then fails as "not found", which starts the local
/// daemon where that is allowed.
#[cfg(unix)]
pub fn expected_server(
    address: &Address,
    user: u32,
    allowed: &[u32],
) -> Result<Expected, DirError> {
    let dir = address.path.parent().unwrap_or(Path::new("/"));
    let checked = |scope, owner| match check_dir(dir, scope, owner) {
        Ok(owner) => Ok(Some(owner)),
        Err(DirError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Ok(None)
        }
        Err(e) => Err(e),
    };
    let mut uids = allowed.to_vec();
    match address.default_of {
        Some(scope @ (Scope::Local | Scope::Process)) => {
            checked(scope, Some(user))?;
            uids.push(user);
        }
        Some(Scope::Global) => {
            uids.push(0);
            uids.extend(checked(Scope::Global, None)?);
        }
        None => uids.extend([user, 0]),
    }
    Ok(Expected::new(uids))
}

/// Refuses the daemon at `socket` unless the user it runs as, `uid` (from
/// the connected socket's peer credentials), is `expected`.
pub fn check_server(socket: &Path, uid: u32, expected: &Expected) -> Result<(), Untrusted> {
    if expected.contains(uid) {
        return Ok(());
    }
    Err(Untrusted {
        path: socket.to_owned(),
        problem: Problem::Server,
        owner: uid,
        expected: expected.clone(),
    })
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn env(socket: Option<&str>, runtime: Option<&str>) -> Env {
        Env {
            socket: socket.map(Into::into),
            runtime_dir: runtime.map(Into::into),
            user: "1000".into(),
        }
    }

    #[test]
    fn explicit_beats_env_beats_scope() {
        let e = env(Some("/e.sock"), Some("/run/user/1000"));
        let given = |s: &str| {
            Some(Address {
                path: s.into(),
                default_of: None,
            })
        };
        let default = |s: &str, scope| {
            Some(Address {
                path: s.into(),
                default_of: Some(scope),
            })
        };
        assert_eq!(
            resolve(Some("/x.sock".into()), Scope::Local, &e),
            given("/x.sock")
        );
        assert_eq!(resolve(None, Scope::Local, &e), given("/e.sock"));
        assert_eq!(resolve(None, Scope::Process, &e), given("/e.sock"));
        assert_eq!(resolve(None, Scope::Process, &env(None, None)), None);
        assert_eq!(
            resolve(None, Scope::Local, &env(None, Some("/run/user/1000"))),
            default("/run/user/1000/lockbroker/broker.sock", Scope::Local)
        );
        assert_eq!(
            resolve(None, Scope::Local, &env(None, None)),
            default("/tmp/lockbroker-1000/broker.sock", Scope::Local)
        );
        assert_eq!(
            resolve(None, Scope::Global, &env(None, None)),
            default("/run/lockbroker/broker.sock", Scope::Global)
        );
    }

    /// A scope directory `dir` with `mode`, and the default address in it.
    fn scope_dir_with(mode: u32, scope: Scope) -> (tempfile::TempDir, Address) {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("lockbroker");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
        let address = Address {
            path: dir.join("broker.sock"),
            default_of: Some(scope),
        };
        (parent, address)
    }

    fn refusal(result: Result<Expected, DirError>) -> Untrusted {
        match result {
            Err(DirError::Untrusted(u)) => u,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn the_local_default_needs_the_users_private_directory() {
        let me = euid();
        let (_keep, address) = scope_dir_with(0o700, Scope::Local);
        let expected = expected_server(&address, me, &[]).unwrap();
        assert_eq!(expected, Expected::new([me]));
        // Opting in to another user adds it, and nothing else.
        let expected = expected_server(&address, me, &[4242]).unwrap();
        assert_eq!(expected, Expected::new([me, 4242]));

        let (_keep, open) = scope_dir_with(0o777, Scope::Local);
        let u = refusal(expected_server(&open, me, &[4242]));
        let dir = open.path.parent().unwrap();
        assert_eq!((u.path.as_path(), u.owner), (dir, me));
        assert_eq!(
            u.problem,
            Problem::Mode {
                mode: 0o777,
                required: 0o700
            }
        );
        assert!(u.to_string().contains("its mode is 0777"), "{u}");
    }

    #[test]
    fn a_local_directory_of_another_user_is_refused() {
        let (_keep, address) = scope_dir_with(0o700, Scope::Local);
        let me = euid();
        // Our own directory, as another user sees it.
        let u = refusal(expected_server(&address, me + 1, &[]));
        assert_eq!(u.problem, Problem::Owner);
        assert_eq!((u.owner, u.expected.clone()), (me, Expected::new([me + 1])));
        assert!(
            u.to_string()
                .contains(&format!("is owned by uid {me}, expected uid {}", me + 1)),
            "{u}"
        );
    }

    #[test]
    fn a_symlink_or_a_file_is_not_a_scope_directory() {
        let (keep, address) = scope_dir_with(0o700, Scope::Local);
        let link = keep.path().join("link");
        std::os::unix::fs::symlink(address.path.parent().unwrap(), &link).unwrap();
        let linked = Address {
            path: link.join("broker.sock"),
            default_of: Some(Scope::Local),
        };
        let u = refusal(expected_server(&linked, euid(), &[]));
        assert_eq!(u.problem, Problem::SymbolicLink);
        let file = keep.path().join("file");
        std::fs::write(&file, "").unwrap();
        let u = match check_dir(&file, Scope::Local, Some(euid())) {
            Err(DirError::Untrusted(u)) => u,
            other => panic!("{other:?}"),
        };
        assert_eq!(u.problem, Problem::NotADirectory);
    }

    #[test]
    fn a_missing_directory_is_left_to_the_connect() {
        let parent = tempfile::tempdir().unwrap();
        let address = Address {
            path: parent.path().join("absent/broker.sock"),
            default_of: Some(Scope::Local),
        };
        let me = euid();
        assert_eq!(
            expected_server(&address, me, &[]).unwrap(),
            Expected::new([me])
        );
    }

    #[test]
    fn the_global_default_trusts_root_and_the_directory_owner() {
        let (_keep, address) = scope_dir_with(0o755, Scope::Global);
        let owner = euid();
        assert_eq!(
            expected_server(&address, 4242, &[]).unwrap(),
            Expected::new([0, owner])
        );
        let (_keep, writable) = scope_dir_with(0o775, Scope::Global);
        let u = refusal(expected_server(&writable, 4242, &[]));
        assert_eq!(
            u.problem,
            Problem::Mode {
                mode: 0o775,
                required: 0o755
            }
        );
    }

    #[test]
    fn an_explicit_address_trusts_the_user_and_root_only() {
        // Not even a directory check: the user chose the path.
        let address = Address {
            path: "/nonexistent/x.sock".into(),
            default_of: None,
        };
        let expected = expected_server(&address, 1000, &[]).unwrap();
        assert_eq!(expected, Expected::new([0, 1000]));
        assert_eq!(expected.to_string(), "uid 0 or 1000");
        let path = Path::new("/x.sock");
        assert!(check_server(path, 1000, &expected).is_ok());
        assert!(check_server(path, 0, &expected).is_ok());
        let u = check_server(path, 65534, &expected).unwrap_err();
        assert_eq!((u.problem, u.owner), (Problem::Server, 65534));
        assert_eq!(
            u.to_string(),
            "the daemon at /x.sock runs as uid 65534, expected uid 0 or 1000"
        );
        let allowed = expected_server(&address, 1000, &[65534]).unwrap();
        assert!(check_server(path, 65534, &allowed).is_ok());
    }
}

/// The Windows trust rules are pure functions of SIDs: tested on every
/// platform (the pipe server's identity itself is read under Wine).
#[cfg(test)]
mod pipe_trust_tests {
    use super::*;

    fn identity(sid: &str, owner: &str) -> Identity {
        Identity {
            sid: sid.into(),
            owner_sid: owner.into(),
            account: "HOST\\someone".into(),
            uid: None,
        }
    }

    const ME: &str = "S-1-5-21-1-2-3-1001";
    const OTHER: &str = "S-1-5-21-1-2-3-1002";

    fn expected(default_of: Option<Scope>, allowed: &[String]) -> Vec<String> {
        let address = Address {
            path: r"\\.\pipe\x".into(),
            default_of,
        };
        expected_pipe_server(&address, &identity(ME, ME), allowed)
    }

    #[test]
    fn uids_are_numbered_as_cygwin_numbers_accounts() {
        assert_eq!(windows_uid(SYSTEM_SID, false), Some(18));
        assert_eq!(windows_uid(ADMINISTRATORS_SID, false), Some(0x20220));
        assert_eq!(windows_uid(ME, true), Some(0x30000 + 1001));
        assert_eq!(windows_uid(ME, false), Some(0x100000 + 1001));
        assert_eq!(windows_uid("S-1-1-0", false), None);
        assert_eq!(windows_uid("S-1-5-x", false), None);
        assert_eq!(windows_uid("garbage", true), None);
    }

    #[test]
    fn the_local_pipe_must_be_served_by_the_user() {
        let want = expected(Some(Scope::Local), &[]);
        let pipe = Path::new(r"\\.\pipe\lockbroker-me");
        assert!(check_pipe_server(pipe, &identity(ME, ME), &want).is_ok());
        let refused = check_pipe_server(pipe, &identity(OTHER, OTHER), &want).unwrap_err();
        assert_eq!(refused.server.sid, OTHER);
        assert!(refused.to_string().contains(OTHER), "{refused}");
        assert!(refused.to_string().contains(ME), "{refused}");
        // Even an elevated process of another user: not the user.
        assert!(check_pipe_server(pipe, &identity(OTHER, ADMINISTRATORS_SID), &want).is_err());
        assert!(check_pipe_server(pipe, &identity(SYSTEM_SID, SYSTEM_SID), &want).is_err());
    }

    #[test]
    fn the_global_pipe_must_be_served_by_system_or_an_elevated_process() {
        let want = expected(Some(Scope::Global), &[]);
        let pipe = Path::new(r"\\.\pipe\lockbroker");
        assert!(check_pipe_server(pipe, &identity(SYSTEM_SID, SYSTEM_SID), &want).is_ok());
        assert!(check_pipe_server(pipe, &identity(OTHER, ADMINISTRATORS_SID), &want).is_ok());
        assert!(check_pipe_server(pipe, &identity(OTHER, OTHER), &want).is_err());
        assert!(check_pipe_server(pipe, &identity(ME, ME), &want).is_err());
    }

    #[test]
    fn an_explicit_pipe_takes_the_user_or_an_administrator_or_whom_the_caller_allows() {
        let want = expected(None, &[]);
        let pipe = Path::new(r"\\.\pipe\mine");
        assert!(check_pipe_server(pipe, &identity(ME, ME), &want).is_ok());
        assert!(check_pipe_server(pipe, &identity(SYSTEM_SID, SYSTEM_SID), &want).is_ok());
        assert!(check_pipe_server(pipe, &identity(OTHER, OTHER), &want).is_err());
        let want = expected(None, &[OTHER.to_lowercase()]);
        assert!(check_pipe_server(pipe, &identity(OTHER, OTHER), &want).is_ok());
    }
}
