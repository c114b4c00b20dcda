//! Writing a grant straight into the waiting session's socket, in the pass
//! of the session whose release made it (Unix; on Windows grants go
//! through the waiter's task as before).
//!
//! A grant used to reach its session's task through a channel, and that
//! task wrote it: on one CPU the releasing session's own answer went out
//! first, its client woke for it, and the waiter's grant came a round trip
//! later. Now the releasing session writes the grant frame itself, before
//! its own answer, when it can do so without breaking the waiter's stream:
//! every session's writing half is a [`Gated`] writer sharing a [`Gate`]
//! with its [`Peer`](crate::lock_table::Peer), and the gate lets another
//! session write a whole frame only between the owner's frames (the owner
//! never stopped inside one), only while the socket is open, and never
//! while the owner itself writes. The grant still goes through the channel
//! too, marked sent, so the owner records the hold. The protocol lets
//! answers come out of order ([PROTOCOL.md 7]), and a frame the socket
//! took only in part is finished by the owner before anything else.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use lockbroker_proto::Grant;
#[cfg(unix)]
use lockbroker_proto::{Response, ServerMessage, frame};
use tokio::io::AsyncWrite;

/// What a session's writer and the sessions granting to it share.
#[derive(Debug)]
pub struct Gate {
    state: Mutex<GateState>,
    /// The daemon is shutting down: write nothing.
    ending: Arc<AtomicBool>,
}

/// A socket's descriptor (Unix); nothing on Windows, where no gate has one.
#[cfg(unix)]
pub type Fd = std::os::fd::RawFd;
/// A socket's descriptor (Unix); nothing on Windows, where no gate has one.
#[cfg(windows)]
pub type Fd = std::convert::Infallible;

/// A writing half that can say which socket it writes.
pub trait DirectFd {
    /// The socket, if others may write whole frames into it directly.
    fn direct_fd(&self) -> Option<Fd>;
}

#[cfg(unix)]
impl DirectFd for tokio::net::unix::OwnedWriteHalf {
    fn direct_fd(&self) -> Option<Fd> {
        use std::os::fd::AsRawFd;
        Some(self.as_ref().as_raw_fd())
    }
}

#[cfg(windows)]
impl DirectFd for lockbroker_proto::pipe::PipeWriter {
    fn direct_fd(&self) -> Option<Fd> {
        None
    }
}

/// In-process streams (tests) have no socket.
impl<T> DirectFd for tokio::io::WriteHalf<T> {
    fn direct_fd(&self) -> Option<Fd> {
        None
    }
}

#[derive(Debug)]
struct GateState {
    /// The socket; `None` once the owner's writer is gone (the descriptor
    /// may then be closed and its number reused).
    fd: Option<Fd>,
    /// The owner's last write ended inside a frame.
    partial: bool,
    /// The rest of a frame written here that the socket took only in part;
    /// the owner writes it before anything of its own.
    spill: Vec<u8>,
}

impl Gate {
    fn state(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes the answer granting request `request_id` into the socket now,
    /// if that can be done between the owner's frames, and tells `note`
    /// whether it was (wholly, or with the rest left for the owner to
    /// write) — under the gate's lock, so an owner that passed
    /// [`Gate::barrier`] after its peer saw the grant has been told.
    pub fn send_grant(&self, request_id: u64, grant: Grant, note: impl FnOnce(bool)) {
        let mut g = self.state();
        let ending = self.ending.load(Ordering::Acquire);
        note(!ending && Self::write_grant(&mut g, request_id, grant));
    }

    /// Waits for a grant being written here to be noted.
    pub fn barrier(&self) {
        drop(self.state());
    }

    /// No frame is written here any more: the owner is ending.
    pub fn close(&self) {
        self.state().fd = None;
    }

    #[cfg(unix)]
    fn write_grant(g: &mut GateState, request_id: u64, grant: Grant) -> bool {
        let msg = ServerMessage::Response {
            id: request_id,
            response: Response::Granted(grant),
        };
        // A grant is far below any frame limit.
        let Ok(bytes) = frame::to_frame(&msg, lockbroker_proto::MIN_MAX_FRAME_LEN) else {
            return false;
        };
        let Some(fd) = g.fd else { return false };
        if g.partial || !g.spill.is_empty() {
            return false;
        }
        // SAFETY: `fd` is open while the gate has it (the owner clears it
        // under this lock before the socket can close); MSG_NOSIGNAL: a
        // closed peer is an error, not a SIGPIPE.
        let n = unsafe {
            libc::send(
                fd,
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n <= 0 {
            return false;
        }
        let n = n as usize;
        if n < bytes.len() {
            g.spill.extend_from_slice(&bytes[n..]);
        }
        true
    }

    /// Never on Windows: the waiter's task writes its grants.
    #[cfg(windows)]
    fn write_grant(_g: &mut GateState, _request_id: u64, _grant: Grant) -> bool {
        false
    }

    /// Whether part of a frame written here waits for the owner to write.
    pub fn has_spill(&self) -> bool {
        !self.state().spill.is_empty()
    }
}

/// A session's writing half, shared through its [`Gate`].
#[derive(Debug)]
pub struct Gated<W> {
    inner: W,
    gate: Arc<Gate>,
}

impl<W> Gated<W> {
    /// Wraps `inner`; others may write into its socket if it names one,
    /// until `ending` is raised.
    pub fn new(inner: W, ending: Arc<AtomicBool>) -> (Gated<W>, Arc<Gate>)
    where
        W: DirectFd,
    {
        let gate = Arc::new(Gate {
            state: Mutex::new(GateState {
                fd: inner.direct_fd(),
                partial: false,
                spill: Vec::new(),
            }),
            ending,
        });
        (
            Gated {
                inner,
                gate: Arc::clone(&gate),
            },
            gate,
        )
    }
}

impl<W: AsyncWrite + Unpin> Gated<W> {
    /// Writes what another session left in the spill, under the gate's
    /// lock; ready once it is empty, with the lock still held.
    fn poll_spill(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<(MutexGuard<'_, GateState>, &mut W)>> {
        let Gated { inner, gate } = self;
        let mut g = gate.state();
        match Self::write_spill(inner, &mut g, cx) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok((g, inner))),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    fn write_spill(inner: &mut W, g: &mut GateState, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !g.spill.is_empty() {
            match Pin::new(&mut *inner).poll_write(cx, &g.spill) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    g.spill.drain(..n);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Gated<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let (mut g, inner) = std::task::ready!(self.get_mut().poll_spill(cx))?;
        let written = Pin::new(inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = written {
            // The session always hands over whole frames to their end.
            g.partial = n < buf.len();
        }
        written
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let (g, inner) = std::task::ready!(self.get_mut().poll_spill(cx))?;
        drop(g);
        Pin::new(inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let (mut g, inner) = std::task::ready!(self.get_mut().poll_spill(cx))?;
        // No one may write a frame after the end.
        g.fd = None;
        drop(g);
        Pin::new(inner).poll_shutdown(cx)
    }
}

impl<W> Drop for Gated<W> {
    fn drop(&mut self) {
        // Before `inner` drops, and so before the socket can close.
        self.gate.state().fd = None;
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use lockbroker_proto::io::FrameReader;
    use lockbroker_proto::{Response, ServerMessage, frame};
    use tokio::io::AsyncWriteExt;
    use tokio::net::UnixStream;

    fn grant(hold_id: u64) -> Grant {
        Grant {
            hold_id,
            fence: hold_id,
            abandoned: false,
        }
    }

    async fn next(reader: &mut FrameReader<tokio::net::unix::OwnedReadHalf>) -> ServerMessage {
        reader.read_message().await.unwrap().unwrap()
    }

    fn granted(msg: &ServerMessage) -> Option<u64> {
        match msg {
            ServerMessage::Response {
                id,
                response: Response::Granted(_),
            } => Some(*id),
            _ => None,
        }
    }

    #[tokio::test]
    async fn a_grant_is_written_between_frames_and_noted_either_way() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let (_r, w) = ours.into_split();
        let (mut gated, gate) = Gated::new(w, Arc::default());
        let mut reader = FrameReader::new(theirs.into_split().0, 4 << 20);
        let mut noted = Vec::new();
        gate.send_grant(7, grant(1), |sent| noted.push(sent));
        assert_eq!(noted, [true]);
        assert_eq!(granted(&next(&mut reader).await), Some(7));
        // The owner's frame, which the socket took only in part (larger
        // than its buffer): no grant may cut into it.
        let big = frame::to_frame(
            &ServerMessage::Response {
                id: 9,
                response: Response::StateValue(Some(lockbroker_proto::Versioned {
                    value: vec![7; 1 << 20],
                    version: 1,
                })),
            },
            2 << 20,
        )
        .unwrap();
        let n = gated.write(&big).await.unwrap();
        assert!(n < big.len(), "the socket took the whole megabyte");
        gate.send_grant(8, grant(2), |sent| noted.push(sent));
        assert_eq!(noted, [true, false], "written inside the owner's frame");
        let (rest, read) = tokio::join!(gated.write_all(&big[n..]), next(&mut reader));
        rest.unwrap();
        assert!(matches!(
            read,
            ServerMessage::Response {
                id: 9,
                response: Response::StateValue(_)
            }
        ));
        // Between frames again.
        gate.send_grant(10, grant(3), |sent| noted.push(sent));
        assert_eq!(noted, [true, false, true]);
        assert_eq!(granted(&next(&mut reader).await), Some(10));
        // A closed gate, and a dropped writer, write nothing.
        gate.close();
        gate.send_grant(11, grant(4), |sent| noted.push(sent));
        drop(gated);
        gate.send_grant(12, grant(5), |sent| noted.push(sent));
        assert_eq!(noted, [true, false, true, false, false]);
    }

    #[tokio::test]
    async fn what_a_grant_left_unwritten_goes_before_the_owners_bytes() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let (_r, w) = ours.into_split();
        let (mut gated, gate) = Gated::new(w, Arc::default());
        let mut reader = FrameReader::new(theirs.into_split().0, 1 << 20);
        let whole = frame::to_frame(
            &ServerMessage::Response {
                id: 5,
                response: Response::Granted(grant(1)),
            },
            1 << 20,
        )
        .unwrap();
        // As if the socket had taken only the first bytes of the grant.
        gated.write_all(&whole[..4]).await.unwrap();
        gate.state().spill.extend_from_slice(&whole[4..]);
        assert!(gate.has_spill());
        gate.send_grant(6, grant(2), |sent| assert!(!sent, "behind a spill"));
        let pong = frame::to_frame(
            &ServerMessage::Response {
                id: 9,
                response: Response::Pong,
            },
            1 << 20,
        )
        .unwrap();
        gated.write_all(&pong).await.unwrap();
        assert!(!gate.has_spill());
        assert_eq!(granted(&next(&mut reader).await), Some(5));
        assert!(matches!(
            next(&mut reader).await,
            ServerMessage::Response {
                id: 9,
                response: Response::Pong
            }
        ));
    }
}
