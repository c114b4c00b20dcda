//! The Unix-socket transport both ends use: a connected stream registered
//! with Tokio's reactor for reading only.
//!
//! Tokio registers a `UnixStream` for both directions, edge-triggered, and
//! a socket registered for writing gets an event each time its peer reads
//! (the room that read freed). Every request the daemon reads is such an
//! event on the client's socket, and every answer a client reads one on the
//! daemon's, so each round trip woke both reactors' threads for nothing:
//! on one CPU a context switch pair per round trip, a fifth of its time
//! (BENCHMARKS.md, issue 12). Here the socket is registered for
//! readability alone; writes go straight to the socket, and only a write
//! that finds it full registers a duplicate of the descriptor for
//! writability, dropped again at the first write that succeeds.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// Splits a connected stream into halves registered with the current
/// Tokio runtime's reactor (which must exist), for reading only. The
/// stream is made non-blocking.
pub fn split(stream: UnixStream) -> io::Result<(ReadHalf, WriteHalf)> {
    stream.set_nonblocking(true)?;
    // SAFETY: the AsyncFd owns the stream, so the descriptor stays open and
    // the same for as long as it is registered.
    let io = unsafe { AsyncFd::register_with_interest(stream, Interest::READABLE) }?;
    let io = Arc::new(io);
    Ok((
        ReadHalf(Arc::clone(&io)),
        WriteHalf {
            io,
            full: None,
            shut: false,
        },
    ))
}

/// The reading half of a [`split`] stream.
#[derive(Debug)]
pub struct ReadHalf(Arc<AsyncFd<UnixStream>>);

/// The writing half of a [`split`] stream. Dropping it shuts the stream
/// down for writing (the peer reads end-of-file once it has read what was
/// written), as Tokio's own halves do.
#[derive(Debug)]
pub struct WriteHalf {
    io: Arc<AsyncFd<UnixStream>>,
    /// While a write waits for room: a duplicate of the descriptor,
    /// registered for writability.
    full: Option<AsyncFd<OwnedFd>>,
    /// Shut down already (by `poll_shutdown`).
    shut: bool,
}

impl ReadHalf {
    /// The stream, to ask it things (peer credentials, options); never
    /// read from it directly.
    pub fn stream(&self) -> &UnixStream {
        self.0.get_ref()
    }
}

impl WriteHalf {
    /// The stream, to ask it things (peer credentials, options).
    pub fn stream(&self) -> &UnixStream {
        self.io.get_ref()
    }

    /// Whether a write is waiting for room (the duplicate is registered).
    pub fn is_waiting_for_room(&self) -> bool {
        self.full.is_some()
    }
}

impl AsRawFd for ReadHalf {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl AsFd for ReadHalf {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.get_ref().as_fd()
    }
}

impl AsRawFd for WriteHalf {
    fn as_raw_fd(&self) -> RawFd {
        self.io.as_raw_fd()
    }
}

impl AsFd for WriteHalf {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.io.get_ref().as_fd()
    }
}

impl AsyncRead for ReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let want = unfilled.len();
            match guard.try_io(|io| io.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    // A short read drained the socket: the next read waits
                    // for the next event instead of trying (as Tokio's own
                    // streams do; an event that came meanwhile is kept).
                    if n > 0 && n < want {
                        guard.clear_ready();
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => {}
            }
        }
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            let Some(full) = &this.full else {
                match this.io.get_ref().write(buf) {
                    Ok(n) => return Poll::Ready(Ok(n)),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        // Registered now, so the room made from here on is
                        // an event (one there already is reported at once).
                        let dup = this.io.get_ref().as_fd().try_clone_to_owned()?;
                        // SAFETY: the AsyncFd owns the duplicate, as above.
                        let full =
                            unsafe { AsyncFd::register_with_interest(dup, Interest::WRITABLE) }?;
                        this.full = Some(full);
                        continue;
                    }
                    Err(e) => return Poll::Ready(Err(e)),
                }
            };
            let mut guard = ready!(full.poll_write_ready(cx))?;
            match guard.try_io(|_| this.io.get_ref().write(buf)) {
                Ok(Ok(n)) => {
                    this.full = None;
                    return Poll::Ready(Ok(n));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => {}
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Nothing is buffered here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.shut = true;
        this.full = None;
        Poll::Ready(this.io.get_ref().shutdown(std::net::Shutdown::Write))
    }
}

impl Drop for WriteHalf {
    fn drop(&mut self) {
        if !self.shut {
            let _ = self.io.get_ref().shutdown(std::net::Shutdown::Write);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The event masks this process's `epoll` instances have for `fd`,
    /// from `/proc/self/fdinfo` (each registration is a `tfd:` line; an
    /// instance behind two descriptors, as the reactor's is, lists it
    /// twice, so equal lines count once).
    #[cfg(target_os = "linux")]
    fn epoll_masks(fd: RawFd) -> Vec<u32> {
        let mut seen = std::collections::HashSet::new();
        let mut masks = Vec::new();
        for entry in std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd") {
            let entry = entry.expect("an fd entry");
            let Ok(target) = std::fs::read_link(entry.path()) else {
                continue;
            };
            if target.to_string_lossy() != "anon_inode:[eventpoll]" {
                continue;
            }
            let info = std::fs::read_to_string(format!(
                "/proc/self/fdinfo/{}",
                entry.file_name().to_string_lossy()
            ))
            .expect("fdinfo");
            for line in info.lines() {
                let mut words = line.split_whitespace();
                if words.next() == Some("tfd:")
                    && words.next() == Some(&fd.to_string())
                    && seen.insert(line.to_owned())
                {
                    // "tfd: N events: MASK data: ..."
                    let mask = line.split("events:").nth(1).expect("events").trim();
                    let mask = mask.split_whitespace().next().expect("a mask");
                    masks.push(u32::from_str_radix(mask, 16).expect("hex"));
                }
            }
        }
        masks
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn the_socket_is_registered_for_reading_only_until_a_write_finds_it_full() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let (_reader, mut writer) = split(ours).unwrap();
        let fd = writer.as_raw_fd();
        let masks = epoll_masks(fd);
        assert_eq!(masks.len(), 1, "registered once: {masks:x?}");
        assert_eq!(masks[0] & libc::EPOLLIN as u32, libc::EPOLLIN as u32);
        // Tokio's own stream would have EPOLLOUT here: every read by the
        // peer would wake this process's reactor.
        assert_eq!(masks[0] & libc::EPOLLOUT as u32, 0, "{:x}", masks[0]);

        // Fill the socket; the write that does not fit waits for room on a
        // duplicate registered for writing.
        let chunk = vec![7u8; 64 * 1024];
        let mut written = 0usize;
        let pending = loop {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            match Pin::new(&mut writer).poll_write(&mut cx, &chunk) {
                Poll::Ready(Ok(n)) => written += n,
                Poll::Ready(Err(e)) => panic!("{e}"),
                Poll::Pending => break true,
            }
        };
        assert!(pending && writer.is_waiting_for_room());
        let dup = writer.full.as_ref().unwrap().as_raw_fd();
        let dup_masks = epoll_masks(dup);
        assert_eq!(dup_masks.len(), 1);
        assert_eq!(dup_masks[0] & libc::EPOLLOUT as u32, libc::EPOLLOUT as u32);

        // The peer reads everything; the waiting write goes through, and
        // the duplicate is gone.
        let drain = std::thread::spawn(move || {
            let mut theirs = theirs;
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0usize;
            loop {
                match theirs.read(&mut buf) {
                    Ok(0) | Err(_) => return total,
                    Ok(n) => total += n,
                }
            }
        });
        writer.write_all(&chunk).await.unwrap();
        written += chunk.len();
        assert!(!writer.is_waiting_for_room());
        assert!(epoll_masks(dup).is_empty(), "the duplicate is deregistered");
        assert_eq!(epoll_masks(fd).len(), 1);
        drop(writer);
        assert_eq!(drain.join().unwrap(), written, "every byte, then EOF");
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_and_dropping_the_writer_ends_the_peers_stream() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let (mut reader, mut writer) = split(ours).unwrap();
        let (mut their_reader, their_writer) = split(theirs).unwrap();
        writer.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        their_reader.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
        drop(writer);
        assert_eq!(their_reader.read(&mut buf).await.unwrap(), 0, "EOF");
        drop(their_writer);
        assert_eq!(reader.read(&mut buf).await.unwrap(), 0, "EOF");
    }
}
