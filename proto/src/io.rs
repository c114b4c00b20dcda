//! Reading and writing frames over Tokio's `AsyncRead` / `AsyncWrite`.
//!
//! [`FrameReader`] keeps one buffer per connection and hands out whole
//! messages; [`FrameReader::read_message`] is cancel-safe, so it can sit in a
//! `select!` beside other events. [`FrameWriter`] is the other half: any
//! number of messages are encoded into its one buffer and written together,
//! so a batch of answers costs one system call, and its high-water mark
//! tells the owner to stop taking work while the peer does not read. The
//! daemon's sessions and the client's connection task both use the pair.

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::frame::{self, FrameError};

/// Room made for the next read when the buffer is empty. Small, because an
/// idle connection keeps it (the daemon may have tens of thousands); a
/// larger frame grows the buffer to its size.
const READ_CHUNK: usize = 1024;

/// A read buffer grown past this by a large frame shrinks back once empty.
const KEEP_CAPACITY: usize = 64 * 1024;

/// A write buffer grown past this by a burst shrinks back to it once
/// written: an idle connection keeps little (the daemon may have tens of
/// thousands).
const WRITE_KEEP_CAPACITY: usize = 16 * 1024;

/// Reads whole frames from a stream.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    /// Bytes of `buf` before this offset have been decoded already.
    start: usize,
    max_len: u32,
    version: u16,
}

impl<R> FrameReader<R> {
    /// Reads frames of at most `max_len` body bytes from `inner`.
    pub fn new(inner: R, max_len: u32) -> Self {
        FrameReader {
            inner,
            buf: Vec::new(),
            start: 0,
            max_len,
            version: crate::PROTOCOL_VERSION,
        }
    }

    /// Changes the maximum body length (e.g. once the peer announced its own).
    pub fn set_max_len(&mut self, max_len: u32) {
        self.max_len = max_len;
    }

    /// Decodes messages of protocol `version` from now on (the latest
    /// until the handshake agrees on one).
    pub fn set_version(&mut self, version: u16) {
        self.version = version;
    }

    /// Decodes the next message if a whole frame is already buffered,
    /// without reading from the stream.
    pub fn try_next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        match frame::decode_in(self.version, &self.buf[self.start..], self.max_len)? {
            Some((msg, used)) => {
                self.start += used;
                if self.start == self.buf.len() {
                    self.buf.clear();
                    self.start = 0;
                    if self.buf.capacity() > KEEP_CAPACITY {
                        self.buf.shrink_to(READ_CHUNK);
                    }
                }
                Ok(Some(msg))
            }
            None => Ok(None),
        }
    }

    /// Reads more bytes with `read`, handed the buffer's free room, for an
    /// owner that does its own (blocking) I/O, as the blocking client does;
    /// returns what `read` returned (`Ok(0)`: the stream ended).
    pub fn fill_with(
        &mut self,
        read: impl FnOnce(&mut [u8]) -> std::io::Result<usize>,
    ) -> std::io::Result<usize> {
        let room = self.make_room();
        let len = self.buf.len();
        self.buf.resize(len + room, 0);
        let got = read(&mut self.buf[len..]);
        self.buf.truncate(len + got.as_ref().map_or(0, |n| *n));
        got
    }

    /// Whether a frame has been read in part.
    pub fn has_partial(&self) -> bool {
        self.start < self.buf.len()
    }

    /// Makes sure the next read has room for the rest of the pending frame,
    /// moving a partial frame to the front instead of growing without end;
    /// returns the room made.
    fn make_room(&mut self) -> usize {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        // peek_len cannot fail here: try_next just checked the header.
        let want = match frame::peek_len(&self.buf, self.max_len) {
            Ok(Some(len)) => (frame::HEADER_LEN + len).saturating_sub(self.buf.len()),
            _ => 0,
        };
        let room = want.max(READ_CHUNK);
        self.buf.reserve(room);
        room
    }
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Reads the next message. `Ok(None)` means the stream ended cleanly
    /// between frames; ending inside a frame is [`FrameError::Truncated`].
    ///
    /// Cancel-safe: if the future is dropped, no data is lost and the next
    /// call continues where this one stopped.
    pub async fn read_message<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        loop {
            if let Some(msg) = self.try_next()? {
                return Ok(Some(msg));
            }
            self.make_room();
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                let buffered = self.buf.len() - self.start;
                return if buffered == 0 {
                    Ok(None)
                } else {
                    Err(FrameError::Truncated { buffered })
                };
            }
        }
    }
}

/// Queues frames and writes them in batches.
///
/// Encoding never touches the stream; [`FrameWriter::write_some`] writes
/// what is queued and is cancel-safe (a write either happens and is
/// counted, or does not happen), so it can sit in a `select!` beside reads.
#[derive(Debug)]
pub struct FrameWriter<W> {
    inner: W,
    buf: Vec<u8>,
    /// Bytes of `buf` before this offset are written already.
    written: usize,
    max_len: u32,
    high_water: usize,
    version: u16,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// Writes frames of at most `max_len` body bytes to `inner`;
    /// [`FrameWriter::is_full`] once `high_water` bytes wait.
    pub fn new(inner: W, max_len: u32, high_water: usize) -> Self {
        FrameWriter {
            inner,
            buf: Vec::new(),
            written: 0,
            max_len,
            high_water,
            version: crate::PROTOCOL_VERSION,
        }
    }

    /// Encodes messages of protocol `version` from now on (the latest
    /// until the handshake agrees on one).
    pub fn set_version(&mut self, version: u16) {
        self.version = version;
    }

    /// The protocol version messages are encoded in.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// Queues `msg` as one frame; a message over the maximum is refused
    /// and nothing is queued.
    pub fn encode<T: Serialize>(&mut self, msg: &T) -> Result<(), FrameError> {
        frame::encode_in(self.version, msg, self.max_len, &mut self.buf)
    }

    /// Queues frames encoded elsewhere (see
    /// [`InspectionFrame`](crate::frame::InspectionFrame)).
    pub fn queue_encoded(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// The largest frame body this writer sends.
    pub fn max_len(&self) -> u32 {
        self.max_len
    }

    /// Bytes queued and not yet written.
    pub fn backlog(&self) -> usize {
        self.buf.len() - self.written
    }

    /// Whether the backlog reached the high-water mark: the owner should
    /// take no more work until the peer reads.
    pub fn is_full(&self) -> bool {
        self.backlog() >= self.high_water
    }

    /// Writes some of the backlog (at least one byte); an empty buffer
    /// shrinks back if a burst grew it. A peer that accepts nothing is
    /// [`std::io::ErrorKind::WriteZero`].
    pub async fn write_some(&mut self) -> std::io::Result<()> {
        let n = self.inner.write(&self.buf[self.written..]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        self.written += n;
        if self.written == self.buf.len() {
            self.buf.clear();
            self.written = 0;
            // A burst's buffer is not kept by an idle connection.
            if self.buf.capacity() > WRITE_KEEP_CAPACITY {
                self.buf.shrink_to(WRITE_KEEP_CAPACITY);
            }
        }
        Ok(())
    }

    /// Writes the whole backlog and flushes.
    pub async fn flush(&mut self) -> std::io::Result<()> {
        while self.backlog() > 0 {
            self.write_some().await?;
        }
        self.inner.flush().await
    }

    /// Drops the backlog unwritten (what follows replaces it).
    pub fn discard(&mut self) {
        self.buf.clear();
        self.written = 0;
    }

    /// Writes the backlog, then shuts the stream's write side down.
    pub async fn shutdown(&mut self) -> std::io::Result<()> {
        self.flush().await?;
        self.inner.shutdown().await
    }
}

/// Writes `msg` as one frame and flushes.
pub async fn write_message<W, T>(w: &mut W, msg: &T, max_len: u32) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let bytes = frame::to_frame(msg, max_len)?;
    w.write_all(&bytes).await?;
    w.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::*;
    use crate::{DEFAULT_MAX_FRAME_LEN, MAGIC};

    fn messages() -> Vec<ClientMessage> {
        let mut v = vec![ClientMessage::Hello(Hello {
            magic: MAGIC,
            version: 1,
            client_name: "test".into(),
        })];
        for id in 0..20 {
            v.push(ClientMessage::Request {
                id,
                request: Request::Acquire(Acquire {
                    name: format!("lock/{id}"),
                    kind: LockKind::Semaphore,
                    capacity: 4,
                    permits: 2,
                    timeout_ms: Some(id * 10),
                }),
            });
        }
        v
    }

    /// Feeds the decoder the same bytes in 1-byte, small and whole chunks:
    /// a frame may arrive split anywhere.
    #[tokio::test]
    async fn decodes_any_chunking() {
        let msgs = messages();
        let mut bytes = Vec::new();
        for m in &msgs {
            frame::encode(m, DEFAULT_MAX_FRAME_LEN, &mut bytes).unwrap();
        }
        for chunk in [1, 3, 7, 64, bytes.len()] {
            let (mut tx, rx) = tokio::io::duplex(chunk.max(8));
            let data = bytes.clone();
            let writer = tokio::spawn(async move {
                for piece in data.chunks(chunk) {
                    tx.write_all(piece).await.unwrap();
                }
            });
            let mut reader = FrameReader::new(rx, DEFAULT_MAX_FRAME_LEN);
            let mut got = Vec::new();
            while let Some(m) = reader.read_message::<ClientMessage>().await.unwrap() {
                got.push(m);
            }
            writer.await.unwrap();
            assert_eq!(got, msgs, "chunk size {chunk}");
        }
    }

    /// Frames queued in several batches, written in pieces through a small
    /// pipe while a reader drains it, arrive whole and in order; the
    /// high-water mark says when to stop queueing.
    #[tokio::test]
    async fn the_writer_batches_and_says_when_it_is_full() {
        let msgs = messages();
        let (tx, rx) = tokio::io::duplex(16);
        let one = frame::to_frame(&msgs[1], DEFAULT_MAX_FRAME_LEN)
            .unwrap()
            .len();
        let mut writer = FrameWriter::new(tx, DEFAULT_MAX_FRAME_LEN, 3 * one);
        let reader = tokio::spawn(async move {
            let mut reader = FrameReader::new(rx, DEFAULT_MAX_FRAME_LEN);
            let mut got = Vec::new();
            while let Some(m) = reader.read_message::<ClientMessage>().await.unwrap() {
                got.push(m);
            }
            got
        });
        for batch in msgs.chunks(4) {
            for m in batch {
                writer.encode(m).unwrap();
            }
            assert_eq!(writer.is_full(), writer.backlog() >= 3 * one);
            while writer.backlog() > 0 {
                writer.write_some().await.unwrap();
            }
            assert!(!writer.is_full());
        }
        writer.shutdown().await.unwrap();
        assert_eq!(reader.await.unwrap(), msgs);
    }

    #[tokio::test]
    async fn a_message_over_the_limit_queues_nothing() {
        let (tx, _rx) = tokio::io::duplex(16);
        let mut writer = FrameWriter::new(tx, 8, usize::MAX);
        let err = writer.encode(&messages()[1]).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }), "{err}");
        assert_eq!(writer.backlog(), 0);
    }

    #[tokio::test]
    async fn eof_inside_a_frame_is_truncated() {
        let bytes = frame::to_frame(&messages()[1], DEFAULT_MAX_FRAME_LEN).unwrap();
        let mut reader = FrameReader::new(&bytes[..bytes.len() - 1], DEFAULT_MAX_FRAME_LEN);
        let err = reader.read_message::<ClientMessage>().await.unwrap_err();
        assert!(matches!(err, FrameError::Truncated { .. }), "{err}");
    }

    #[tokio::test]
    async fn oversized_header_fails_without_reading_the_body() {
        let header = u32::MAX.to_le_bytes();
        let mut reader = FrameReader::new(&header[..], 1024);
        let err = reader.read_message::<ClientMessage>().await.unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }), "{err}");
    }
}
