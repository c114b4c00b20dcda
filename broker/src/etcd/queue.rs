//! The etcd backend's data: where a hold lives in etcd, what its key
//! carries, and the rule every daemon applies to a name's keys to know
//! who holds it. Pure functions, no I/O.
//!
//! # Keys
//!
//! Every hold and every wait is one key, `<prefix>/l/<name>\0<tag>`, put
//! with its session's lease. Lock names have no control characters, so
//! `<prefix>/l/<name>\0` is the range of exactly one name's keys. The tag
//! is `<daemon instance>-<hold id>` in hex: unique across
//! daemons without asking etcd. A key's create revision orders the queue
//! (etcd's commit order) and is the hold's fence.
//!
//! A release deletes its keys and, in the same transaction, puts the
//! name's *release note* `<prefix>/l/<name>\0~` naming them. A holder's
//! key that disappears without a note in the same revision was ended by
//! its lease (its client died, or its daemon or host did): abandoned.
//! Notes live on a short lease of their own, so they never pile up.
//!
//! A session that ends holding a name while nobody waits leaves the
//! name's *abandonment marker* `<prefix>/l/<name>\0!`, so the name's next
//! holder, on whichever daemon, is told; that grant removes it. Markers
//! live on a lease of an hour: an abandonment nobody took the lock after
//! is forgotten then, as the local daemon forgets its oldest past
//! `--max-abandoned`.

use lockbroker_proto::{EntryInfo, EntryKind, HolderInfo, LockKind, SessionInfo, WaiterInfo};
use serde::{Deserialize, Serialize};

/// What a hold's or a wait's key holds: the request, and who made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// What it asks for.
    pub kind: LockKind,
    /// The capacity it asks with (1 for a mutex, 0 for a rwlock).
    pub capacity: u32,
    /// Permits it holds or asks for.
    pub permits: u32,
    /// Its hold id on its own daemon.
    pub hold_id: u64,
    /// The acquire's request id in its session.
    pub request_id: u64,
    /// The session.
    pub session: SessionInfo,
    /// The host of the session's daemon: also in `session` since protocol
    /// version 2, and kept here for the daemons of before, which need it
    /// to read the record at all.
    pub host: String,
    /// When it was asked for, in milliseconds since the Unix epoch.
    pub since_ms: u64,
    /// Its timeout, if any.
    pub timeout_ms: Option<u64>,
}

impl Record {
    /// Its JSON form, as stored.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a record always encodes")
    }

    /// Reads a stored record; `None` for a key that is not one of ours.
    pub fn decode(bytes: &[u8]) -> Option<Record> {
        serde_json::from_slice(bytes).ok()
    }

    /// What it weighs against a capacity: a mutex or writer all of it.
    fn weight(&self) -> u64 {
        match self.kind {
            LockKind::Semaphore | LockKind::RwShared => u64::from(self.permits),
            LockKind::Mutex | LockKind::RwExclusive => u64::MAX,
        }
    }
}

/// The suffix of a name's release note (tags are hex, never `~`).
pub const NOTE: &[u8] = b"~";

/// The suffix of a name's abandonment marker.
pub const MARKER: &[u8] = b"!";

/// How many keys from the front of a name's range, in create revision
/// order, tell whether a new key is granted when it is among them: one
/// hold for a mutex; a permit each for a semaphore (a key behind more keys
/// than permits waits); past a bound, or for a rwlock, the whole queue is
/// read when the new key is not among them. Two more, for the name's
/// release note and abandonment marker, which live in the same range and
/// are usually older than every hold.
pub fn front_len(kind: LockKind, capacity: u32) -> i64 {
    const MOST: u32 = 64;
    let holds = match kind {
        LockKind::Mutex => 1,
        LockKind::Semaphore => i64::from(capacity.min(MOST) + 1),
        LockKind::RwShared | LockKind::RwExclusive => i64::from(MOST),
    };
    holds + 2
}

/// The range of `name`'s keys: `<prefix>/l/<name>\0`.
pub fn name_range(prefix: &str, name: &str) -> Vec<u8> {
    let mut key = locks_range(prefix, name);
    key.push(0);
    key
}

/// The start of the keys of every name beginning with `names`.
pub fn locks_range(prefix: &str, names: &str) -> Vec<u8> {
    format!("{prefix}/l/{names}").into_bytes()
}

/// The key of a hold or wait.
pub fn hold_key(prefix: &str, name: &str, tag: &str) -> Vec<u8> {
    let mut key = name_range(prefix, name);
    key.extend_from_slice(tag.as_bytes());
    key
}

/// The key of `name`'s release note.
pub fn note_key(prefix: &str, name: &str) -> Vec<u8> {
    let mut key = name_range(prefix, name);
    key.extend_from_slice(NOTE);
    key
}

/// The key of `name`'s abandonment marker.
pub fn marker_key(prefix: &str, name: &str) -> Vec<u8> {
    let mut key = name_range(prefix, name);
    key.extend_from_slice(MARKER);
    key
}

/// Whether the part of a key after its name's `\0` is a hold's tag (not
/// a note or a marker).
pub fn is_tag(tag: &[u8]) -> bool {
    tag != NOTE && tag != MARKER
}

/// A key under the locks range, split: its name and what follows the
/// `\0` (a tag, or [`NOTE`]).
pub fn split_key<'k>(prefix: &str, key: &'k [u8]) -> Option<(&'k str, &'k [u8])> {
    let rest = key.strip_prefix(locks_range(prefix, "").as_slice())?;
    let zero = rest.iter().position(|b| *b == 0)?;
    let name = std::str::from_utf8(&rest[..zero]).ok()?;
    Some((name, &rest[zero + 1..]))
}

/// One key of a name's queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    /// Its create revision: its place in the queue and its fence.
    pub revision: i64,
    /// Its tag.
    pub tag: Vec<u8>,
    /// What it holds or asks for.
    pub record: Record,
}

/// How many keys at the front of `queue` (in create revision order) are
/// granted: strict FIFO, so the holders are always the queue's front and
/// a key is granted once everything before it is and it fits beside
/// them. A mutex or a writer fits only at the very front; a reader
/// wherever no writer is before it; a semaphore request while the
/// permits up to it are within the capacity of the front's request.
pub fn granted_len<'a>(queue: impl IntoIterator<Item = &'a Queued>) -> usize {
    let mut queue = queue.into_iter().peekable();
    let Some(first) = queue.peek() else {
        return 0;
    };
    let capacity = match first.record.kind {
        LockKind::Semaphore => u64::from(first.record.capacity),
        LockKind::RwShared | LockKind::RwExclusive => u64::from(u32::MAX),
        LockKind::Mutex => 1,
    };
    // Walks the holders and the first key that waits, no further.
    let mut used: u64 = 0;
    let mut held = 0;
    for q in queue {
        let weight = q.record.weight();
        if held > 0 && (weight == u64::MAX || used.saturating_add(weight) > capacity) {
            break;
        }
        used = used.saturating_add(weight);
        held += 1;
    }
    held
}

/// Why a request may not join a queue: the name is in use as another
/// kind, or as a semaphore of another capacity. `None`: it may.
pub fn mismatch(queue: &[Queued], kind: LockKind, capacity: u32) -> Option<(EntryKind, u32)> {
    let first = &queue.first()?.record;
    let in_use = first.kind.entry_kind();
    if in_use != kind.entry_kind() || (in_use == EntryKind::Semaphore && first.capacity != capacity)
    {
        return Some((in_use, first.capacity));
    }
    None
}

/// The listing entry of a name whose queue is `queue`.
pub fn entry_info(name: &str, queue: &[Queued], abandoned: bool) -> Option<EntryInfo> {
    let first = &queue.first()?.record;
    let held = granted_len(queue);
    // A record from a daemon of before protocol version 2 has its host
    // only beside the session.
    let session = |q: &Queued| {
        let mut session = q.record.session.clone();
        if session.host.is_empty() {
            session.host.clone_from(&q.record.host);
        }
        session
    };
    let holder = |q: &Queued| HolderInfo {
        session: session(q),
        hold_id: q.record.hold_id,
        kind: q.record.kind,
        permits: q.record.permits,
        fence: q.revision as u64,
        since_ms: q.record.since_ms,
    };
    let waiter = |q: &Queued| WaiterInfo {
        session: session(q),
        request_id: q.record.request_id,
        kind: q.record.kind,
        permits: q.record.permits,
        since_ms: q.record.since_ms,
        timeout_ms: q.record.timeout_ms,
    };
    Some(EntryInfo {
        name: name.to_owned(),
        kind: first.kind.entry_kind(),
        capacity: first.capacity,
        abandoned,
        holders: queue[..held].iter().map(holder).collect(),
        waiters: queue[held..].iter().map(waiter).collect(),
    })
}

/// The listing entry of a name nobody holds or waits on whose last
/// holder, `record`, abandoned it.
pub fn idle_entry(name: &str, record: &Record) -> EntryInfo {
    EntryInfo {
        name: name.to_owned(),
        kind: record.kind.entry_kind(),
        capacity: record.capacity,
        abandoned: true,
        holders: Vec::new(),
        waiters: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(revision: i64, kind: LockKind, capacity: u32, permits: u32) -> Queued {
        Queued {
            revision,
            tag: revision.to_string().into_bytes(),
            record: Record {
                kind,
                capacity,
                permits,
                hold_id: revision as u64,
                request_id: 1,
                session: SessionInfo {
                    session_id: 1,
                    host: "h".into(),
                    user: "u".into(),
                    ..SessionInfo::default()
                },
                host: "h".into(),
                since_ms: 0,
                timeout_ms: None,
            },
        }
    }

    #[test]
    fn the_front_of_the_queue_holds() {
        use LockKind::*;
        assert_eq!(granted_len(&[]), 0);
        assert_eq!(granted_len(&[q(1, Mutex, 1, 1), q(2, Mutex, 1, 1)]), 1);
        // Semaphore of 3: 2 + 1 fit, the next 1 does not; a 3 at the
        // head waits behind nothing and blocks the 1s behind it.
        let sem = [
            q(1, Semaphore, 3, 2),
            q(2, Semaphore, 3, 1),
            q(3, Semaphore, 3, 1),
        ];
        assert_eq!(granted_len(&sem), 2);
        let head = [
            q(1, Semaphore, 3, 1),
            q(2, Semaphore, 3, 3),
            q(3, Semaphore, 3, 1),
        ];
        assert_eq!(granted_len(&head), 1, "no request passes the one before it");
        // Readers share until a writer; a writer only at the front.
        let rw = [
            q(1, RwShared, 0, 1),
            q(2, RwShared, 0, 1),
            q(3, RwExclusive, 0, 1),
            q(4, RwShared, 0, 1),
        ];
        assert_eq!(granted_len(&rw), 2);
        assert_eq!(granted_len(&rw[2..]), 1);
        assert_eq!(
            granted_len(&[q(1, RwExclusive, 0, 1), q(2, RwShared, 0, 1)]),
            1
        );
    }

    /// The front an acquire reads (its name's range in create revision
    /// order, `front_len` keys) still shows a lone new hold when the name's
    /// release note and abandonment marker are older than it, as they
    /// usually are: else every uncontended acquire read the whole queue
    /// again, an etcd round trip more.
    #[test]
    fn the_front_read_sees_past_the_note_and_the_marker() {
        use LockKind::*;
        for (kind, capacity) in [(Mutex, 1), (Semaphore, 3), (RwShared, 0), (RwExclusive, 0)] {
            // (create revision, key suffix), as etcd sorts and limits them.
            let mut range = vec![
                (10, b"~".to_vec()),
                (12, b"!".to_vec()),
                (20, b"ff-7".to_vec()),
            ];
            range.sort_by_key(|(rev, _)| *rev);
            range.truncate(front_len(kind, capacity) as usize);
            assert!(
                range.iter().any(|(rev, _)| *rev == 20),
                "{kind:?}: the new key is not in the front read"
            );
        }
    }

    #[test]
    fn a_request_of_another_kind_or_capacity_is_refused() {
        use LockKind::*;
        let sem = [q(1, Semaphore, 3, 1)];
        assert_eq!(mismatch(&sem, Semaphore, 3), None);
        assert_eq!(
            mismatch(&sem, Semaphore, 4),
            Some((EntryKind::Semaphore, 3))
        );
        assert_eq!(mismatch(&sem, Mutex, 1), Some((EntryKind::Semaphore, 3)));
        assert_eq!(mismatch(&[q(1, RwShared, 0, 1)], RwExclusive, 0), None);
        assert_eq!(mismatch(&[], Mutex, 1), None);
    }

    #[test]
    fn keys_split_back_into_name_and_tag() {
        let key = hold_key("/p", "a/b", "ff-1-2");
        assert_eq!(split_key("/p", &key), Some(("a/b", &b"ff-1-2"[..])));
        let note = note_key("/p", "a");
        assert_eq!(split_key("/p", &note), Some(("a", NOTE)));
        // Name "a" does not own the keys of name "a/b" or "ab".
        assert!(!hold_key("/p", "ab", "1").starts_with(&name_range("/p", "a")));
        assert!(!hold_key("/p", "a/b", "1").starts_with(&name_range("/p", "a")));
        assert_eq!(split_key("/p", b"/q/l/a\0x"), None);
        let r = q(7, LockKind::Mutex, 1, 1).record;
        assert_eq!(Record::decode(&r.encode()), Some(r));
        assert_eq!(Record::decode(b"not json"), None);
    }

    /// A record written by a daemon of before protocol version 2 (no host
    /// or user in its session) is read, and listed with its host.
    #[test]
    fn a_record_of_before_version_2_is_read_with_its_host() {
        let old = br#"{"kind":"Mutex","capacity":1,"permits":1,"hold_id":4,"request_id":9,
            "session":{"session_id":3,"pid":77,"uid":1000,"gid":1000,"client_name":"old"},
            "host":"h-old","since_ms":5,"timeout_ms":null}"#;
        let record = Record::decode(old).expect("an old record reads");
        assert_eq!(record.session.client_name, "old");
        assert_eq!(record.session.user, "");
        let queued = Queued {
            revision: 12,
            tag: b"t".to_vec(),
            record,
        };
        let entry = entry_info("n", &[queued], false).unwrap();
        assert_eq!(entry.holders[0].session.host, "h-old");
        assert_eq!(entry.holders[0].session.pid, Some(77));
    }
}
