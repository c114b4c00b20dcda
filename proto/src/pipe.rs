//! The named-pipe transport both ends use on Windows, and who is at the
//! other end of a pipe.
//!
//! A pipe's write is delivered once it is issued: the daemon and the
//! clients never need `FlushFileBuffers`, which on a pipe waits until the
//! peer has *read* everything (a blocking thread per flush, stuck as long
//! as the peer does not read). [`PipeWriter`] makes a flush a no-op.
//!
//! Identity is a process's user, from its token: its SID (the stable
//! key, like a Unix uid) and its account name (`DOMAIN\user`, for people).
//! The daemon reads its client's from the pipe's client process (quotas,
//! `status`); a client reads the server's and refuses a pipe served by a
//! user it does not expect ([`identity_of`], then
//! [`check_pipe_server`](crate::address::check_pipe_server)).

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};

use interprocess::os::windows::named_pipe::pipe_mode::Bytes;
use interprocess::os::windows::named_pipe::tokio::{
    DuplexPipeStream, RecvPipeStream, SendPipeStream,
};
use tokio::io::AsyncWrite;

use crate::address::Identity;

/// The reading half of a pipe connection.
pub type PipeReader = RecvPipeStream<Bytes>;

/// The writing half of a pipe connection, whose flush does not wait for
/// the peer to read.
#[derive(Debug)]
pub struct PipeWriter(SendPipeStream<Bytes>);

impl PipeWriter {
    /// Wraps a pipe's writing half.
    pub fn new(inner: SendPipeStream<Bytes>) -> PipeWriter {
        PipeWriter(inner)
    }
}

impl std::os::windows::io::AsHandle for PipeWriter {
    fn as_handle(&self) -> std::os::windows::io::BorrowedHandle<'_> {
        self.0.as_handle()
    }
}

impl AsyncWrite for PipeWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Written data is in the pipe (Tokio completes pending writes
        // before a handle closes); there is nothing to wait for. Saying
        // so also keeps a dropped half from lingering in a flush.
        self.0.assume_flushed();
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A pipe has no half-close: the connection ends when both halves
        // are dropped.
        self.poll_flush(cx)
    }
}

/// Connects to the pipe `path`; returns the halves and the process id of
/// the pipe's server.
pub async fn connect(path: &Path) -> io::Result<(PipeReader, PipeWriter, u32)> {
    let stream = DuplexPipeStream::<Bytes>::connect_by_path(path).await?;
    let server = stream.server_process_id()?;
    let (r, w) = stream.split();
    Ok((r, PipeWriter::new(w), server))
}

/// The user process `pid` runs as, from its token.
pub fn identity_of(pid: u32) -> io::Result<Identity> {
    sys::identity_of(pid)
}

/// The user this process runs as.
pub fn current_identity() -> io::Result<Identity> {
    identity_of(std::process::id())
}

mod sys {
    //! The Win32 calls behind [`identity_of`](super::identity_of).

    use std::io;
    use std::ptr;

    use windows_sys::Win32::Foundation::{CloseHandle, HANDLE, LocalFree};
    use windows_sys::Win32::Security::Authorization::ConvertSidToStringSidW;
    use windows_sys::Win32::Security::{
        GetTokenInformation, LookupAccountSidW, PSID, SID_NAME_USE, TOKEN_OWNER, TOKEN_QUERY,
        TOKEN_USER, TokenOwner, TokenUser,
    };
    use windows_sys::Win32::System::Threading::{
        OpenProcess, OpenProcessToken, PROCESS_QUERY_LIMITED_INFORMATION,
    };
    use windows_sys::Win32::System::WindowsProgramming::GetComputerNameW;

    use crate::address::Identity;

    /// A handle closed on drop.
    struct Owned(HANDLE);

    impl Drop for Owned {
        fn drop(&mut self) {
            // SAFETY: a handle this module opened and owns.
            unsafe { CloseHandle(self.0) };
        }
    }

    pub(super) fn identity_of(pid: u32) -> io::Result<Identity> {
        // SAFETY: plain Win32 calls on handles owned here; every buffer
        // passed is sized by the preceding size query.
        unsafe {
            let process = OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION, 0, pid);
            if process.is_null() {
                return Err(io::Error::last_os_error());
            }
            let process = Owned(process);
            let mut token = ptr::null_mut();
            if OpenProcessToken(process.0, TOKEN_QUERY, &mut token) == 0 {
                return Err(io::Error::last_os_error());
            }
            let token = Owned(token);
            let user = token_info(token.0, TokenUser)?;
            let user_sid = (*user.as_ptr().cast::<TOKEN_USER>()).User.Sid;
            let owner = token_info(token.0, TokenOwner)?;
            let owner_sid = (*owner.as_ptr().cast::<TOKEN_OWNER>()).Owner;
            let sid = sid_string(user_sid)?;
            let account = account_name(user_sid);
            let local = account.as_ref().is_some_and(|(domain, _)| {
                computer_name().is_some_and(|c| c.eq_ignore_ascii_case(domain))
            });
            Ok(Identity {
                uid: crate::address::windows_uid(&sid, local),
                account: match account {
                    Some((domain, name)) if domain.is_empty() => name,
                    Some((domain, name)) => format!("{domain}\\{name}"),
                    None => sid.clone(),
                },
                owner_sid: sid_string(owner_sid)?,
                sid,
            })
        }
    }

    /// This machine's NetBIOS name, the domain of its local accounts.
    fn computer_name() -> Option<String> {
        let mut buf = [0u16; 64];
        let mut len = buf.len() as u32;
        // SAFETY: `buf` holds `len` u16s.
        if unsafe { GetComputerNameW(buf.as_mut_ptr(), &mut len) } == 0 {
            return None;
        }
        Some(String::from_utf16_lossy(&buf[..len as usize]))
    }

    /// One class of token information, in a buffer aligned for its struct.
    unsafe fn token_info(token: HANDLE, class: i32) -> io::Result<Vec<u64>> {
        let mut len = 0u32;
        // SAFETY: a size query (no buffer).
        unsafe { GetTokenInformation(token, class, ptr::null_mut(), 0, &mut len) };
        let mut buf = vec![0u64; (len as usize).div_ceil(8).max(1)];
        // SAFETY: `buf` holds at least `len` bytes.
        let ok =
            unsafe { GetTokenInformation(token, class, buf.as_mut_ptr().cast(), len, &mut len) };
        if ok == 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(buf)
    }

    unsafe fn sid_string(sid: PSID) -> io::Result<String> {
        let mut wide = ptr::null_mut();
        // SAFETY: `sid` points into a token buffer still alive.
        if unsafe { ConvertSidToStringSidW(sid, &mut wide) } == 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a NUL-terminated string the call allocated.
        let s = unsafe { from_wide_nul(wide) };
        // SAFETY: allocated by ConvertSidToStringSidW with LocalAlloc.
        unsafe { LocalFree(wide.cast()) };
        Ok(s)
    }

    /// The account's (domain, name).
    unsafe fn account_name(sid: PSID) -> Option<(String, String)> {
        let (mut name_len, mut domain_len) = (0u32, 0u32);
        let mut kind: SID_NAME_USE = 0;
        // SAFETY: a size query.
        unsafe {
            LookupAccountSidW(
                ptr::null(),
                sid,
                ptr::null_mut(),
                &mut name_len,
                ptr::null_mut(),
                &mut domain_len,
                &mut kind,
            )
        };
        if name_len == 0 {
            return None;
        }
        let mut name = vec![0u16; name_len as usize];
        let mut domain = vec![0u16; domain_len.max(1) as usize];
        // SAFETY: both buffers are the sizes the query asked for.
        let ok = unsafe {
            LookupAccountSidW(
                ptr::null(),
                sid,
                name.as_mut_ptr(),
                &mut name_len,
                domain.as_mut_ptr(),
                &mut domain_len,
                &mut kind,
            )
        };
        if ok == 0 {
            return None;
        }
        let name = String::from_utf16_lossy(&name[..name_len as usize]);
        let domain = String::from_utf16_lossy(&domain[..domain_len as usize]);
        Some((domain, name))
    }

    unsafe fn from_wide_nul(p: *const u16) -> String {
        let mut len = 0;
        // SAFETY: the caller passes a NUL-terminated string.
        while unsafe { *p.add(len) } != 0 {
            len += 1;
        }
        // SAFETY: `len` u16s were just read.
        String::from_utf16_lossy(unsafe { std::slice::from_raw_parts(p, len) })
    }
}
