//! Who a session's peer is, by name, for `Inspect` (protocol version 2):
//! the host name of this daemon, and the name of each peer's account.
//!
//! On Unix an account is looked up by uid once (`getpwuid_r`, off the
//! runtime's threads, since NSS may ask a directory server) and kept, up to
//! [`MAX_CACHED`] uids; on Windows the transport reads it from the peer's
//! token with the uid.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Most uids whose account names are kept; past it, names are looked up
/// each time (a host rarely has this many users connect).
const MAX_CACHED: usize = 4096;

/// This host's name, as its peers on other hosts know it (empty if the
/// system does not say).
pub fn host_name() -> String {
    #[cfg(unix)]
    {
        let mut buf = [0u8; 256];
        // SAFETY: the buffer is valid for its length; gethostname writes a
        // NUL-terminated name into it (truncated if longer).
        if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0 {
            let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
            return String::from_utf8_lossy(&buf[..end]).into_owned();
        }
        String::new()
    }
    #[cfg(windows)]
    {
        std::env::var("COMPUTERNAME").unwrap_or_default()
    }
}

/// Account names by uid, looked up once each.
#[derive(Debug, Default)]
pub struct Accounts {
    names: Mutex<HashMap<u32, Arc<str>>>,
}

impl Accounts {
    /// The name of account `uid` on this host; empty if it has none.
    pub async fn name(&self, uid: u32) -> Arc<str> {
        if let Some(name) = self.names.lock().expect("accounts lock").get(&uid) {
            return Arc::clone(name);
        }
        let name: Arc<str> = tokio::task::spawn_blocking(move || lookup(uid))
            .await
            .ok()
            .flatten()
            .unwrap_or_default()
            .into();
        let mut names = self.names.lock().expect("accounts lock");
        if names.len() < MAX_CACHED {
            names.insert(uid, Arc::clone(&name));
        }
        name
    }
}

#[cfg(unix)]
fn lookup(uid: u32) -> Option<String> {
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: passwd is plain data that getpwuid_r fills in; its
        // strings point into `buf`, which outlives their use below.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
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
        if rc != 0 || found.is_null() || pwd.pw_name.is_null() {
            return None;
        }
        // SAFETY: a found entry's pw_name is a NUL-terminated string in buf.
        let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
        return Some(name.to_string_lossy().into_owned());
    }
}

/// Windows names the account from the peer's token instead (see
/// `transport`).
#[cfg(windows)]
fn lookup(_uid: u32) -> Option<String> {
    None
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
