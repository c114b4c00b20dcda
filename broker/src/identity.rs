//! Who a session's peer is, by name, for `Inspect` (protocol version 2):
//! the host name of this daemon, and the name of each peer's account.
//!
//! On Unix an account is looked up by uid once (`getpwuid_r`, off the
//! runtime's threads and for at most [`LOOKUP_WAIT`] of a handshake, since
//! NSS may ask a directory server) and kept, up to [`MAX_CACHED`] uids; on
//! Windows the transport reads it from the peer's token with the uid.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Most uids whose account names are kept; past it, names are looked up
/// each time (a host rarely has this many users connect).
const MAX_CACHED: usize = 4096;

/// How long a session's handshake waits for its account's first lookup;
/// a lookup that takes longer (a directory server that does not answer)
/// leaves that session unnamed, and fills the cache when it ends.
const LOOKUP_WAIT: Duration = Duration::from_millis(100);

/// The uid of user `user`, a name the system knows (Unix; looked up once,
/// at start).
pub fn user_id(user: &str) -> Result<u32, String> {
    #[cfg(unix)]
    {
        let name = std::ffi::CString::new(user).map_err(|_| "a NUL in the name".to_string())?;
        // SAFETY: a zeroed passwd is a valid out-parameter.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut buf = vec![0u8; 16384];
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call; the result points
        // into `pwd` and `buf`, read before they go.
        let rc = unsafe {
            libc::getpwnam_r(
                name.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut found,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc).to_string());
        }
        if found.is_null() {
            return Err("no such user".into());
        }
        Ok(pwd.pw_uid)
    }
    #[cfg(windows)]
    {
        let _ = user;
        Err("on Windows users are matched by name, not looked up".into())
    }
}

/// The gid of group `group`: a number, or a name the system knows (Unix;
/// looked up once, at start).
pub fn group_id(group: &str) -> Result<u32, String> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    #[cfg(unix)]
    {
        let name = std::ffi::CString::new(group).map_err(|_| "a NUL in the name".to_string())?;
        // SAFETY: a zeroed group is a valid out-parameter.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut buf = vec![0u8; 16384];
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call; the result points
        // into `grp` and `buf`, read before they go.
        let rc = unsafe {
            libc::getgrnam_r(
                name.as_ptr(),
                &mut grp,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut found,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc).to_string());
        }
        if found.is_null() {
            return Err("no such group".into());
        }
        Ok(grp.gr_gid)
    }
    #[cfg(windows)]
    Err("on Windows give a group by number (groups are not looked up)".into())
}

/// Whether a peer whose primary group is `primary` and whose
/// supplementary groups are `groups` (as its connection recorded them) is
/// in group `gid`.
pub fn in_group(groups: &[u32], primary: Option<u32>, gid: u32) -> bool {
    primary == Some(gid) || groups.contains(&gid)
}

/// This host's name, as its peers on other hosts know it (empty if the
/// system does not say).
pub fn host_name() -> String {
    #[cfg(unix)]
    let name = {
        let mut buf = [0u8; 256];
        // SAFETY: the buffer is valid for its length; gethostname writes a
        // NUL-terminated name into it (truncated if longer).
        if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0 {
            let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
            String::from_utf8_lossy(&buf[..end]).into_owned()
        } else {
            String::new()
        }
    };
    #[cfg(windows)]
    let name = std::env::var("COMPUTERNAME").unwrap_or_default();
    printable(&name)
}

/// `name` without control characters, which `lockbroker status` would
/// print as they are.
pub fn printable(name: &str) -> String {
    name.chars().filter(|c| !c.is_control()).collect()
}

/// Account names by uid, looked up once each.
#[derive(Debug, Default)]
pub struct Accounts {
    inner: Arc<Mutex<Known>>,
}

#[derive(Debug, Default)]
struct Known {
    names: HashMap<u32, Arc<str>>,
    /// Uids being looked up: one lookup at a time each.
    pending: HashSet<u32>,
}

impl Accounts {
    /// The name of account `uid` on this host; empty if it has none, or
    /// if it could not be told within [`LOOKUP_WAIT`] (a lookup that
    /// failed is made again for the next session of that uid).
    pub async fn name(&self, uid: u32) -> Arc<str> {
        {
            let mut known = self.inner.lock().expect("accounts lock");
            if let Some(name) = known.names.get(&uid) {
                return Arc::clone(name);
            }
            if !known.pending.insert(uid) {
                // Another session's lookup of it is under way.
                return Arc::from("");
            }
        }
        let inner = Arc::clone(&self.inner);
        // The lookup fills the cache itself, so one that outlasts the
        // wait is not wasted.
        let lookup = tokio::task::spawn_blocking(move || {
            let found = lookup(uid);
            let mut known = inner.lock().expect("accounts lock");
            known.pending.remove(&uid);
            let name: Arc<str> = match &found {
                Ok(name) => Arc::from(printable(name.as_deref().unwrap_or_default())),
                Err(()) => Arc::from(""),
            };
            if found.is_ok() && known.names.len() < MAX_CACHED {
                known.names.insert(uid, Arc::clone(&name));
            }
            name
        });
        match tokio::time::timeout(LOOKUP_WAIT, lookup).await {
            Ok(Ok(name)) => name,
            _ => Arc::from(""),
        }
    }
}

/// The name of account `uid`: `Ok(None)` if there is none, `Err` if the
/// system could not tell.
#[cfg(unix)]
fn lookup(uid: u32) -> Result<Option<String>, ()> {
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: passwd is plain data that getpwuid_r fills in; its
        // strings point into `buf`, which outlives their use below.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is to a live local, and `buf`'s length is
        // the one passed.
        let rc = unsafe {
            libc::getpwuid_r(
                uid,
                &mut pwd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut found,
            )
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 {
            return Err(());
        }
        if found.is_null() || pwd.pw_name.is_null() {
            return Ok(None);
        }
        // SAFETY: a found entry's pw_name is a NUL-terminated string in buf.
        let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
        return Ok(Some(name.to_string_lossy().into_owned()));
    }
}

/// Windows names the account from the peer's token instead (see
/// `transport`).
#[cfg(windows)]
fn lookup(_uid: u32) -> Result<Option<String>, ()> {
    Ok(None)
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_daemons_own_account_is_named_and_an_unknown_uid_is_not() {
        let accounts = Accounts::default();
        // SAFETY: getuid cannot fail.
        let me = unsafe { libc::getuid() };
        // What /etc/passwd says, when the account is there (NSS may have
        // others).
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        let listed = passwd.lines().find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.get(2) == Some(&me.to_string().as_str())).then(|| fields[0].to_owned())
        });
        if let Some(listed) = listed {
            assert_eq!(&*accounts.name(me).await, listed);
            // Asked again, it comes from the cache.
            assert_eq!(&*accounts.name(me).await, listed);
        }
        assert_eq!(&*accounts.name(u32::MAX - 7).await, "");
    }
}
