//! Every type that crosses the wire.
//!
//! The encoding is positional: structs are their fields in declaration order,
//! enums a `u32` variant index then the variant's fields. So variants are only
//! ever appended, fields never reordered, and no serde attribute that makes
//! the layout depend on the data (`untagged`, `flatten`,
//! `skip_serializing_if`) is allowed here. Each variant's doc names its reply.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Every frame a client sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientMessage {
    /// Must be the first frame of a connection. Answered by
    /// [`ServerMessage::Welcome`], or [`ServerMessage::Fatal`] and close.
    Hello(Hello),
    /// A request; answered by exactly one [`ServerMessage::Response`] with
    /// the same `id`.
    Request {
        /// Chosen by the client, echoed by the response; must differ from
        /// the ids of the session's waiting acquires.
        id: u64,
        /// What is asked.
        request: Request,
    },
}

/// The opening frame of a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Always [`crate::MAGIC`].
    pub magic: u32,
    /// The protocol version the client speaks ([`crate::PROTOCOL_VERSION`]).
    pub version: u16,
    /// Free text shown by `inspect` (e.g. `deploy.sh`); at most 255 bytes.
    pub client_name: String,
}

/// Every frame the daemon sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerMessage {
    /// Accepts a `Hello`.
    Welcome(Welcome),
    /// Answers the request with the same `id`.
    Response {
        /// The id of the request this answers.
        id: u64,
        /// The answer.
        response: Response,
    },
    /// Pushed by the daemon, not an answer to any request.
    Event(Event),
    /// A connection-level error (bad frame, bad handshake, limit); the daemon
    /// closes the connection after sending it.
    Fatal(ErrorInfo),
}

/// The daemon's answer to a valid `Hello`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The protocol version the daemon will speak on this connection.
    pub version: u16,
    /// The daemon's software version, e.g. `0.1.0`.
    pub server_version: String,
    /// This session's id, unique in the daemon's life.
    pub session_id: u64,
    /// The limits this session runs under.
    pub limits: Limits,
}

/// Limits a session runs under, announced in [`Welcome`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Largest frame body, in bytes, either direction.
    pub max_frame_len: u32,
    /// Most acquires that may be waiting at once.
    pub max_pending: u32,
    /// Most holds plus waiting acquires the session may have at once.
    pub max_holds: u32,
}

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Take permits on a lock. Answered by [`Response::Granted`],
    /// [`Response::TimedOut`], [`Response::Cancelled`] or
    /// [`Response::Error`].
    Acquire(Acquire),
    /// Cancel this session's pending acquire with request id `request_id`.
    /// Answered by [`Response::Done`] (the acquire is then answered with
    /// [`Response::Cancelled`]) or [`ErrorCode::NotPending`] when it had
    /// already ended.
    Cancel {
        /// The id of the acquire request to cancel.
        request_id: u64,
    },
    /// Release one hold of this session. Answered by [`Response::Released`]
    /// or [`ErrorCode::UnknownHold`].
    Release {
        /// The hold to release, as granted.
        hold_id: u64,
    },
    /// Release `count` permits this session holds on `name`, oldest holds
    /// first. Answered by [`Response::Released`] or [`ErrorCode::NotHeld`].
    ReleaseByName {
        /// The lock.
        name: String,
        /// How many permits to release (for mutexes and rwlocks: holds).
        count: u32,
    },
    /// List lock entries whose name starts with `prefix`, in name order.
    /// Answered by [`Response::Inspection`].
    Inspect {
        /// Name prefix; empty for every entry.
        prefix: String,
        /// At most this many entries (0 means the daemon's default).
        limit: u32,
    },
    /// Answered by [`Response::Pong`].
    Ping,
    /// Read a state key. Answered by [`Response::StateValue`].
    StateGet {
        /// The key.
        key: String,
    },
    /// Write a state key. Answered by [`Response::StateWritten`],
    /// [`Response::StateConflict`] (when `if_version` does not match) or
    /// [`Response::Error`].
    StateSet(StateSet),
    /// Remove a state key. Answered by [`Response::StateRemoved`] or
    /// [`Response::StateConflict`].
    StateRemove {
        /// The key.
        key: String,
        /// Remove only if the key's version is this (0: must not exist).
        if_version: Option<u64>,
        /// Apply only while this session holds this hold.
        guard: Option<u64>,
    },
    /// Add `delta` to the decimal integer stored at `key` (absent = 0).
    /// Answered by [`Response::StateCounter`] or [`Response::Error`].
    StateIncrement {
        /// The key.
        key: String,
        /// Added to the value.
        delta: i64,
        /// Apply only while this session holds this hold.
        guard: Option<u64>,
    },
    /// List keys under a prefix, in key order. Answered by
    /// [`Response::StateEntries`].
    StateList {
        /// Key prefix; empty for every key.
        prefix: String,
        /// Start after this key (empty: from the start); the last key of
        /// the previous page.
        start_after: String,
        /// At most this many keys (0: the daemon's default).
        limit: u32,
        /// Include the values.
        with_values: bool,
    },
    /// Watch a key or every key under a prefix; the request id names the
    /// watch in its [`Event::StateChanged`] events. Answered by
    /// [`Response::Done`].
    StateWatch {
        /// The key, or the prefix when `prefix` is true.
        key: String,
        /// Watch every key starting with `key`.
        prefix: bool,
        /// 0: changes from now on. N: every change with version >= N,
        /// replayed from the daemon's recent history first.
        from_version: u64,
        /// Events carry the new value.
        with_values: bool,
    },
    /// Stop watch `watch_id`. Answered by [`Response::Done`] or
    /// [`ErrorCode::NotPending`].
    StateUnwatch {
        /// The request id of the `StateWatch`.
        watch_id: u64,
    },
    /// When the connection closes, end the session's holds as if released:
    /// the next holders are not told they were abandoned. For a session
    /// whose connection is shared with child processes (`lockbroker lock`),
    /// which keep the holds until the last of them closes it. Answered by
    /// [`Response::Done`].
    ReleaseOnClose,
    /// A state write (`StateSet`, `StateRemove` or `StateIncrement`, with
    /// no `guard` of its own) applied only while lock `lock` has a live
    /// hold with fence `fence`, whichever session holds it. Answered as the
    /// write is, or by [`ErrorCode::StaleFence`] when no such hold is live.
    StateFenced {
        /// The lock whose hold guards the write.
        lock: String,
        /// The fence of that hold, as granted.
        fence: u64,
        /// The write.
        write: Box<Request>,
    },
    /// One page of lock entries whose name starts with `prefix` and comes
    /// after `start_after`, in name order: `Inspect` with a cursor.
    /// Answered by [`Response::Inspection`], whose `truncated` then says
    /// that more entries follow.
    InspectAfter {
        /// Name prefix; empty for every entry.
        prefix: String,
        /// Start after this name (empty: from the start); the last name of
        /// the previous page.
        start_after: String,
        /// At most this many entries (0 means the daemon's default).
        limit: u32,
    },
    /// The daemon's metrics. Answered by [`Response::Metrics`].
    Metrics,
    /// `acquire` on behalf of `actor`, a thread of control (a thread, a
    /// task, a command and the commands it runs under its lock) whose
    /// holds and waits deadlock detection follows: an acquire that would
    /// have to wait and whose wait could then never be granted is refused
    /// with [`ErrorCode::Deadlock`]. Answered as `Acquire` is. Protocol
    /// version 3.
    AcquireAs {
        /// The actor: any number but 0, the same for every request of one
        /// thread of control, in any session.
        actor: u64,
        /// The acquire.
        acquire: Acquire,
    },
    /// `acquire` with `options`: on behalf of an actor, which may run
    /// within others, and asking to be told of contention. Each option at
    /// most once. Answered as `Acquire` is. Protocol version 4; later
    /// versions append options.
    AcquireWith {
        /// The acquire.
        acquire: Acquire,
        /// What else the acquire asks for.
        options: Vec<AcquireOption>,
    },
    /// Makes hold `hold_id`'s lease end `lease_ms` from now (a hold without
    /// one gets one). Answered by [`Response::Done`]. Protocol version 4.
    ExtendLease {
        /// The hold, of this session.
        hold_id: u64,
        /// The new lease, in milliseconds from now (not 0).
        lease_ms: u64,
    },
    /// Revokes, from outside, the holds of `name` — hold `hold_id` only,
    /// if given — of whichever sessions have them, as a lease running out
    /// does: each holder is told ([`Event::Revoked`]), the next holder that
    /// the lock was abandoned. Allowed on a hold of the caller's own user,
    /// and to root and the daemon's admin group on any; else nothing is
    /// broken ([`ErrorCode::Forbidden`]). Answered by
    /// [`Response::Broken`]. Protocol version 4.
    Break {
        /// The lock.
        name: String,
        /// The one hold to break; `None`: every hold of `name`.
        hold_id: Option<u64>,
    },
}

/// One option of a [`Request::AcquireWith`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AcquireOption {
    /// On behalf of this actor (not 0), as [`Request::AcquireAs`] is.
    Actor(u64),
    /// The actor runs within these actors (nearest first; at most
    /// [`MAX_WITHIN`], none 0; needs `Actor`): a command run under
    /// another's lock, whose holder keeps it until the command ends.
    /// Deadlock detection takes each of them to wait while the actor
    /// waits, so a cycle through a command and the lock its wrapper holds
    /// is found, and commands run side by side under one lock are not one
    /// actor.
    Within(Vec<u64>),
    /// Tell the holder, once, when someone waits on the name while it
    /// holds the grant ([`Event::Contended`]), so a long holder can yield.
    NotifyContended,
    /// Hold the grant at most this many milliseconds (not 0): then it is
    /// revoked ([`Event::Revoked`]) and the next grant says `abandoned`,
    /// unless [`Request::ExtendLease`] moved the end.
    Lease(u64),
}

/// Most actors an [`AcquireOption::Within`] may name: more are refused
/// (`invalid_argument`); a client keeps the nearest.
pub const MAX_WITHIN: usize = 32;

/// A state write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateSet {
    /// The key.
    pub key: String,
    /// The new value.
    pub value: Vec<u8>,
    /// Write only if the key's version is this (0: must not exist).
    pub if_version: Option<u64>,
    /// The key disappears this many milliseconds after the write.
    pub ttl_ms: Option<u64>,
    /// Apply only while this session holds this hold.
    pub guard: Option<u64>,
}

/// A stored value and its version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Versioned {
    /// The value.
    pub value: Vec<u8>,
    /// The version of the write that stored it.
    pub version: u64,
}

/// One key of a [`Response::StateEntries`] page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateEntry {
    /// The key.
    pub key: String,
    /// Its version.
    pub version: u64,
    /// Its value, when asked for.
    pub value: Option<Vec<u8>>,
}

/// What happened to a watched key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ChangeKind {
    /// Written (set or increment).
    Set,
    /// Removed.
    Removed,
    /// Its time to live ran out.
    Expired,
}

/// An acquire request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acquire {
    /// The lock's name.
    pub name: String,
    /// What kind of lock, and for rwlocks which side.
    pub kind: LockKind,
    /// A semaphore's capacity; ignored for the other kinds.
    pub capacity: u32,
    /// How many permits (1 for mutexes and rwlocks).
    pub permits: u32,
    /// `None` waits forever, `Some(0)` only tries, `Some(ms)` waits at most
    /// that long.
    pub timeout_ms: Option<u64>,
}

/// The kind of lock an acquire asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LockKind {
    /// Capacity 1.
    Mutex,
    /// Capacity N, fixed while the entry is in use.
    Semaphore,
    /// The shared side of a read-write lock.
    RwShared,
    /// The exclusive side of a read-write lock.
    RwExclusive,
}

/// The kind of a lock entry, as [`Response::Inspection`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EntryKind {
    /// A mutex.
    Mutex,
    /// A semaphore.
    Semaphore,
    /// A read-write lock.
    RwLock,
}

impl LockKind {
    /// The kind of entry this request works on.
    pub fn entry_kind(self) -> EntryKind {
        match self {
            LockKind::Mutex => EntryKind::Mutex,
            LockKind::Semaphore => EntryKind::Semaphore,
            LockKind::RwShared | LockKind::RwExclusive => EntryKind::RwLock,
        }
    }
}

impl fmt::Display for LockKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LockKind::Mutex => "mutex",
            LockKind::Semaphore => "semaphore",
            LockKind::RwShared => "shared",
            LockKind::RwExclusive => "exclusive",
        })
    }
}

impl fmt::Display for EntryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EntryKind::Mutex => "mutex",
            EntryKind::Semaphore => "semaphore",
            EntryKind::RwLock => "rwlock",
        })
    }
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// The acquire succeeded; the session now has this hold.
    Granted(Grant),
    /// The acquire's timeout ran out (or, for a try, it could not be granted
    /// at once); nothing is held.
    TimedOut,
    /// The acquire was cancelled by a `Cancel` request; nothing is held.
    Cancelled,
    /// Permits were released.
    Released {
        /// How many permits were released.
        permits: u32,
    },
    /// The answer to `Inspect`.
    Inspection(Inspection),
    /// The answer to `Ping`.
    Pong,
    /// The request failed; the connection stays usable.
    Error(ErrorInfo),
    /// The request (e.g. `Cancel`) was carried out and has nothing to report.
    Done,
    /// The answer to `StateGet`: the value, or `None` if the key is absent.
    StateValue(Option<Versioned>),
    /// A write was applied; the key now has this version.
    StateWritten {
        /// The new version.
        version: u64,
    },
    /// `if_version` did not match; nothing changed.
    StateConflict {
        /// The key's current version (0: absent).
        current: u64,
    },
    /// The answer to `StateRemove`: the removed value, or `None` if there
    /// was none.
    StateRemoved(Option<Versioned>),
    /// The answer to `StateIncrement`.
    StateCounter {
        /// The new value.
        value: i64,
        /// The new version.
        version: u64,
    },
    /// A page of `StateList`.
    StateEntries {
        /// Keys in order.
        entries: Vec<StateEntry>,
        /// More keys follow; ask again with `start_after` = the last key.
        more: bool,
    },
    /// The answer to `Metrics`: every metric, in the OpenMetrics text
    /// format (what `lockbrokerd --metrics-listen` serves).
    Metrics {
        /// The exposition, ending with `# EOF`.
        text: String,
    },
    /// The answer to `Break`: the holds it revoked, in grant order.
    Broken {
        /// Their ids.
        hold_ids: Vec<u64>,
    },
}

/// A granted hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Unique in the daemon's life; names the hold in `Release`.
    pub hold_id: u64,
    /// Strictly greater than every fence granted before for this name.
    pub fence: u64,
    /// The previous holder's session ended while holding this lock.
    pub abandoned: bool,
}

/// A snapshot of the daemon and of the lock entries under a prefix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inspection {
    /// Facts about the daemon.
    pub server: ServerInfo,
    /// Entries in name order.
    pub entries: Vec<EntryInfo>,
    /// More entries matched than `limit` allowed.
    pub truncated: bool,
}

/// Facts about the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerInfo {
    /// Software version.
    pub version: String,
    /// The daemon's process id.
    pub pid: u32,
    /// Milliseconds since the daemon started.
    pub uptime_ms: u64,
    /// Open sessions, this one included.
    pub sessions: u64,
}

/// One lock entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryInfo {
    /// The lock's name.
    pub name: String,
    /// Mutex, semaphore or rwlock.
    pub kind: EntryKind,
    /// Capacity in permits (1 for a mutex, 0 for a rwlock).
    pub capacity: u32,
    /// The next grant will carry `abandoned = true`.
    pub abandoned: bool,
    /// Current holders, oldest first.
    pub holders: Vec<HolderInfo>,
    /// Waiters in queue order.
    pub waiters: Vec<WaiterInfo>,
}

/// A hold, as `Inspect` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HolderInfo {
    /// The holding session.
    pub session: SessionInfo,
    /// The hold's id.
    pub hold_id: u64,
    /// How it was acquired.
    pub kind: LockKind,
    /// Permits held.
    pub permits: u32,
    /// The hold's fence.
    pub fence: u64,
    /// When it was granted, in milliseconds since the Unix epoch.
    pub since_ms: u64,
}

/// A queued acquire, as `Inspect` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaiterInfo {
    /// The waiting session.
    pub session: SessionInfo,
    /// The acquire's request id within that session.
    pub request_id: u64,
    /// What it asks for.
    pub kind: LockKind,
    /// Permits asked for.
    pub permits: u32,
    /// When it was queued, in milliseconds since the Unix epoch.
    pub since_ms: u64,
    /// Its timeout, if any.
    pub timeout_ms: Option<u64>,
}

/// Who a session is.
///
/// Version 2 appended `host` and `user`: its layout depends on the
/// version of the connection it is encoded for ([`wire_version`]), so its
/// serde impls are written out (in [`session_info`]). In a
/// self-describing format (the etcd backend's JSON records) every field
/// is named, and `host` and `user` may be missing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionInfo {
    /// The session id from its `Welcome`.
    pub session_id: u64,
    /// Peer process id, where the platform reports it.
    pub pid: Option<u32>,
    /// Peer user id, where the platform reports it.
    pub uid: Option<u32>,
    /// Peer group id, where the platform reports it.
    pub gid: Option<u32>,
    /// The `client_name` of its `Hello`.
    pub client_name: String,
    /// The host name of the daemon the session is connected to (version
    /// 2; empty when decoded from version 1).
    pub host: String,
    /// The name of the peer's user account on that host, empty when it
    /// has none or it cannot be looked up (version 2).
    pub user: String,
}

thread_local! {
    /// The protocol version messages are being encoded or decoded for on
    /// this thread.
    static WIRE_VERSION: std::cell::Cell<u16> =
        const { std::cell::Cell::new(crate::PROTOCOL_VERSION) };
}

/// The protocol version the message being encoded or decoded on this
/// thread is for: the latest, except inside [`in_wire_version`].
pub fn wire_version() -> u16 {
    WIRE_VERSION.with(|v| v.get())
}

/// Runs `f` with [`wire_version`] = `version` (encoding and decoding are
/// synchronous, so a thread-local scopes it exactly).
pub(crate) fn in_wire_version<R>(version: u16, f: impl FnOnce() -> R) -> R {
    struct Restore(u16);
    impl Drop for Restore {
        fn drop(&mut self) {
            WIRE_VERSION.with(|v| v.set(self.0));
        }
    }
    let _restore = Restore(WIRE_VERSION.with(|v| v.replace(version)));
    f()
}

mod session_info {
    //! [`SessionInfo`]'s serde impls: five fields for version 1, seven
    //! from version 2.

    use std::fmt;

    use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};
    use serde::ser::SerializeStruct;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::{SessionInfo, wire_version};

    const V1: &[&str] = &["session_id", "pid", "uid", "gid", "client_name"];
    const V2: &[&str] = &[
        "session_id",
        "pid",
        "uid",
        "gid",
        "client_name",
        "host",
        "user",
    ];

    fn fields() -> &'static [&'static str] {
        if wire_version() >= 2 { V2 } else { V1 }
    }

    impl Serialize for SessionInfo {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            let fields = fields();
            let mut s = serializer.serialize_struct("SessionInfo", fields.len())?;
            s.serialize_field("session_id", &self.session_id)?;
            s.serialize_field("pid", &self.pid)?;
            s.serialize_field("uid", &self.uid)?;
            s.serialize_field("gid", &self.gid)?;
            s.serialize_field("client_name", &self.client_name)?;
            if fields.len() == V2.len() {
                s.serialize_field("host", &self.host)?;
                s.serialize_field("user", &self.user)?;
            }
            s.end()
        }
    }

    impl<'de> Deserialize<'de> for SessionInfo {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            deserializer.deserialize_struct("SessionInfo", fields(), SessionInfoVisitor)
        }
    }

    struct SessionInfoVisitor;

    impl<'de> Visitor<'de> for SessionInfoVisitor {
        type Value = SessionInfo;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("struct SessionInfo")
        }

        // The wire form: the fields in order, as many as the version has
        // (the positional format stops the sequence there).
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<SessionInfo, A::Error> {
            let missing = de::Error::missing_field;
            let session_id = seq.next_element()?.ok_or_else(|| missing("session_id"))?;
            let pid = seq.next_element()?.ok_or_else(|| missing("pid"))?;
            let uid = seq.next_element()?.ok_or_else(|| missing("uid"))?;
            let gid = seq.next_element()?.ok_or_else(|| missing("gid"))?;
            let client_name = seq.next_element()?.ok_or_else(|| missing("client_name"))?;
            let host = seq.next_element()?.unwrap_or_default();
            let user = seq.next_element()?.unwrap_or_default();
            Ok(SessionInfo {
                session_id,
                pid,
                uid,
                gid,
                client_name,
                host,
                user,
            })
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SessionInfo, A::Error> {
            let mut info = SessionInfo::default();
            let mut seen = [false; 5];
            while let Some(key) = map.next_key::<String>()? {
                match key.as_str() {
                    "session_id" => (info.session_id, seen[0]) = (map.next_value()?, true),
                    "pid" => (info.pid, seen[1]) = (map.next_value()?, true),
                    "uid" => (info.uid, seen[2]) = (map.next_value()?, true),
                    "gid" => (info.gid, seen[3]) = (map.next_value()?, true),
                    "client_name" => (info.client_name, seen[4]) = (map.next_value()?, true),
                    "host" => info.host = map.next_value()?,
                    "user" => info.user = map.next_value()?,
                    _ => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            match seen.iter().position(|s| !s) {
                Some(missing) => Err(de::Error::missing_field(V1[missing])),
                None => Ok(info),
            }
        }
    }
}

/// Something the daemon pushes without being asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// The daemon is shutting down; every hold of the session ends when the
    /// connection closes, right after this event.
    ShuttingDown,
    /// A watched key changed. Events of one watch come in version order.
    StateChanged {
        /// The request id of the `StateWatch`.
        watch_id: u64,
        /// The key.
        key: String,
        /// The change's version.
        version: u64,
        /// What happened.
        change: ChangeKind,
        /// The new value, if the watch asked for values and there is one.
        value: Option<Vec<u8>>,
    },
    /// The watch fell behind: changes were missed (the watcher did not keep
    /// up, or its `from_version` is older than the daemon's history). Later
    /// changes follow; read the current state to resynchronise.
    WatchLagged {
        /// The request id of the `StateWatch`.
        watch_id: u64,
    },
    /// Someone waits on the name of hold `hold_id`, granted to an acquire
    /// that asked ([`AcquireOption::NotifyContended`]): sent once per hold,
    /// at the first wait while it is held (at once if one already waits
    /// when it is granted). Protocol version 4.
    Contended {
        /// The hold.
        hold_id: u64,
    },
    /// Hold `hold_id` of this session has ended without a release: its
    /// lease ran out, or someone broke it (`Break`). The session no longer
    /// has it, and its next holder is told it was abandoned. Protocol
    /// version 4.
    Revoked {
        /// The hold.
        hold_id: u64,
        /// Why, for people.
        message: String,
    },
}

/// An error: a stable code and a human message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    /// What went wrong, for programs.
    pub code: ErrorCode,
    /// What went wrong, for people.
    pub message: String,
}

impl ErrorInfo {
    /// An error with this code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorInfo {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for ErrorInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (code {} {})",
            self.message,
            self.code.as_u16(),
            self.code
        )
    }
}

macro_rules! error_codes {
    ($($(#[$doc:meta])* $name:ident = $num:literal, $text:literal;)*) => {
        /// Stable numeric error codes, encoded as a `u16`.
        ///
        /// 1xx end the connection (sent in [`ServerMessage::Fatal`]), 2xx are
        /// invalid requests, 3xx refer to holds or waits the session does not
        /// have, 4xx are limits, 5xx the daemon's own condition. Codes are
        /// never reused; a code this version does not know decodes as
        /// [`ErrorCode::Other`].
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(from = "u16", into = "u16")]
        #[non_exhaustive]
        pub enum ErrorCode {
            $($(#[$doc])* $name,)*
            /// A code this version does not know.
            Other(u16),
        }

        impl ErrorCode {
            /// Every known code, in numeric order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$name,)*];

            /// The numeric code.
            pub fn as_u16(self) -> u16 {
                match self {
                    $(ErrorCode::$name => $num,)*
                    ErrorCode::Other(n) => n,
                }
            }

            /// The code's stable snake_case name, e.g. `invalid_name`.
            pub fn name(self) -> &'static str {
                match self {
                    $(ErrorCode::$name => $text,)*
                    ErrorCode::Other(_) => "other",
                }
            }
        }

        impl From<u16> for ErrorCode {
            fn from(n: u16) -> Self {
                match n {
                    $($num => ErrorCode::$name,)*
                    n => ErrorCode::Other(n),
                }
            }
        }
    };
}

error_codes! {
    /// A frame body could not be decoded (fatal).
    Malformed = 100, "malformed";
    /// A frame's length is above the maximum (fatal).
    FrameTooLarge = 101, "frame_too_large";
    /// The `Hello` did not carry [`crate::MAGIC`] (fatal).
    BadMagic = 102, "bad_magic";
    /// The daemon does not speak the client's protocol version (fatal).
    UnsupportedVersion = 103, "unsupported_version";
    /// A request came before the `Hello` (fatal).
    HandshakeRequired = 104, "handshake_required";
    /// A second `Hello` on one connection (fatal).
    UnexpectedHello = 105, "unexpected_hello";
    /// The daemon is at its connection limit (fatal).
    TooManyConnections = 106, "too_many_connections";
    /// A name is empty, too long, or has NUL or control characters.
    InvalidName = 200, "invalid_name";
    /// Zero permits, or more than one for a rwlock.
    InvalidPermits = 201, "invalid_permits";
    /// More permits than the lock's capacity (a semaphore's, or 1 for a
    /// mutex).
    PermitsAboveCapacity = 202, "permits_above_capacity";
    /// A semaphore capacity of zero.
    InvalidCapacity = 203, "invalid_capacity";
    /// A semaphore request names another capacity than the busy entry has.
    CapacityMismatch = 204, "capacity_mismatch";
    /// The name is in use as a semaphore and the request is for a mutex or
    /// rwlock, or the other way round (mutexes and rwlocks share names).
    KindMismatch = 205, "kind_mismatch";
    /// The request id is already used by a waiting acquire.
    DuplicateRequestId = 206, "duplicate_request_id";
    /// Some other argument is out of range (e.g. a client name too long).
    InvalidArgument = 207, "invalid_argument";
    /// An increment met a value that is not a decimal integer, or would
    /// overflow; nothing changed.
    NotAnInteger = 208, "not_an_integer";
    /// The acquire would have to wait, and its wait would close a cycle of
    /// sessions each waiting for a lock the next one holds: it is refused
    /// (the message names the sessions and locks); nothing was queued.
    Deadlock = 209, "deadlock";
    /// The daemon's backend does not offer what the request asks (a
    /// contention event with the etcd backend); nothing happened.
    Unsupported = 210, "unsupported";
    /// The caller may not do this to what it names (a `Break` of a hold of
    /// another user); nothing changed.
    Forbidden = 211, "forbidden";
    /// The session has no hold with this id.
    UnknownHold = 300, "unknown_hold";
    /// The session holds fewer permits on this name than it releases.
    NotHeld = 301, "not_held";
    /// No pending acquire (or watch) of this session has this request id.
    NotPending = 302, "not_pending";
    /// A guarded write names a hold this session does not have (any more);
    /// nothing changed.
    GuardNotHeld = 303, "guard_not_held";
    /// A fenced write names a lock and fence that no live hold has (it was
    /// released, or the fence is older or unknown); nothing changed.
    StaleFence = 304, "stale_fence";
    /// The session has as many waiting acquires as it may.
    TooManyPending = 400, "too_many_pending";
    /// The session has as many holds as it may.
    TooManyHolds = 401, "too_many_holds";
    /// The answer would be larger than the maximum frame.
    ResponseTooLarge = 402, "response_too_large";
    /// A state value is longer than the daemon's limit.
    ValueTooLarge = 403, "value_too_large";
    /// The write would exceed a state quota (the user's keys or bytes, or
    /// the daemon's total); nothing changed.
    QuotaExceeded = 404, "quota_exceeded";
    /// The daemon is shutting down.
    ShuttingDown = 500, "shutting_down";
    /// A bug in the daemon; the request had no effect.
    Internal = 501, "internal";
    /// What the daemon keeps its locks in (its etcd cluster) did not
    /// answer; the request had no effect.
    Unavailable = 502, "unavailable";
    /// Fatal: the daemon lost contact with its etcd cluster for long
    /// enough that the session's lease may expire there; every hold of the
    /// session is lost, and the connection closes.
    HoldsLost = 503, "holds_lost";
}

impl From<ErrorCode> for u16 {
    fn from(code: ErrorCode) -> u16 {
        code.as_u16()
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Longest name, in bytes.
pub const MAX_NAME_LEN: usize = 255;

/// A validated lock or state-key name: UTF-8, 1 to 255 bytes, no NUL or
/// control characters.
///
/// The wire carries names as plain strings so that a bad name is an error
/// response rather than an undecodable frame; the daemon validates them into
/// this type. A name of up to 23 bytes is kept inline, with no allocation
/// (the daemon keeps a name in its lock table and in the holding session,
/// for every name held); a longer one is shared by its clones.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LockName(smol_str::SmolStr);

/// Why a string is not a valid [`LockName`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty.
    #[error("name is empty")]
    Empty,
    /// The name is longer than [`MAX_NAME_LEN`] bytes.
    #[error("name is {len} bytes, longer than {MAX_NAME_LEN}")]
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// The name contains a NUL or control character.
    #[error("name contains control character {ch:?} at byte {index}")]
    ControlChar {
        /// The character.
        ch: char,
        /// Its byte offset.
        index: usize,
    },
}

impl LockName {
    /// Validates `name`.
    pub fn new(name: impl Into<String>) -> Result<Self, NameError> {
        let name = name.into();
        check_name_chars(&name)?;
        if name.is_empty() {
            return Err(NameError::Empty);
        }
        Ok(LockName(smol_str::SmolStr::from(name)))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// The name as an owned string.
    pub fn into_string(self) -> String {
        self.0.to_string()
    }
}

/// Checks a name prefix: the rules of [`LockName`], except that it may be
/// empty.
pub fn validate_prefix(prefix: &str) -> Result<(), NameError> {
    check_name_chars(prefix)
}

fn check_name_chars(name: &str) -> Result<(), NameError> {
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong { len: name.len() });
    }
    if let Some((index, ch)) = name.char_indices().find(|(_, c)| c.is_control()) {
        return Err(NameError::ControlChar { ch, index });
    }
    Ok(())
}

impl fmt::Display for LockName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for LockName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for LockName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for LockName {
    type Error = NameError;
    fn try_from(s: &str) -> Result<Self, NameError> {
        LockName::new(s)
    }
}

impl TryFrom<String> for LockName {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        LockName::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_rules() {
        assert!(LockName::new("deploy/status").is_ok());
        assert!(LockName::new("ü".repeat(127)).is_ok()); // 254 bytes
        assert_eq!(LockName::new(""), Err(NameError::Empty));
        assert_eq!(
            LockName::new("a".repeat(256)),
            Err(NameError::TooLong { len: 256 })
        );
        assert_eq!(
            LockName::new("a\0b"),
            Err(NameError::ControlChar { ch: '\0', index: 1 })
        );
        assert!(LockName::new("tab\there").is_err());
        assert!(validate_prefix("").is_ok());
        assert!(validate_prefix("x\n").is_err());
    }

    #[test]
    fn error_codes_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for &code in ErrorCode::ALL {
            assert!(seen.insert(code.as_u16()), "duplicate {code}");
            assert_eq!(ErrorCode::from(code.as_u16()), code);
        }
        assert_eq!(ErrorCode::from(999), ErrorCode::Other(999));
        assert_eq!(ErrorCode::Other(999).as_u16(), 999);
    }
}
