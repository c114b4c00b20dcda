//! Reading and writing frames over Tokio's `AsyncRead` / `AsyncWrite`.
//!
//! [`FrameReader`] keeps one buffer per connection and hands out whole
//! messages; [`FrameReader::read_message`] is cancel-safe, so it can sit in a
//! `select!` beside other events. Writers encode any number of messages into
//! one buffer with [`crate::frame::encode`] and write it once, so a batch of
//! answers costs one system call.

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::frame::{self, FrameError};

/// Room made for the next read when the buffer is empty. Small, because an
/// idle connection keeps it (the daemon may have tens of thousands); a
/// larger frame grows the buffer to its size.
const READ_CHUNK: usize = 1024;

/// A buffer grown past this by a large frame shrinks back once empty.
const KEEP_CAPACITY: usize = 64 * 1024;

/// Reads whole frames from a stream.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    /// Bytes of `buf` before this offset have been decoded already.
    start: usize,
    max_len: u32,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Reads frames of at most `max_len` body bytes from `inner`.
    pub fn new(inner: R, max_len: u32) -> Self {
        FrameReader {
            inner,
            buf: Vec::new(),
            start: 0,
            max_len,
        }
    }

    /// Changes the maximum body length (e.g. once the peer announced its own).
    pub fn set_max_len(&mut self, max_len: u32) {
        self.max_len = max_len;
    }

    /// Decodes the next message if a whole frame is already buffered,
    /// without reading from the stream.
    pub fn try_next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        match frame::decode(&self.buf[self.start..], self.max_len)? {
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

    /// Makes sure the next read has room for the rest of the pending frame,
    /// moving a partial frame to the front instead of growing without end.
    fn make_room(&mut self) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        // peek_len cannot fail here: try_next just checked the header.
        let want = match frame::peek_len(&self.buf, self.max_len) {
            Ok(Some(len)) => (frame::HEADER_LEN + len).saturating_sub(self.buf.len()),
            _ => 0,
        };
        self.buf.reserve(want.max(READ_CHUNK));
    }

    /// The stream being read.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// The stream being read.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
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

    /// Feeds the decoder the same bytes in 1-byte, small and whole chunks
    /// (as watchman's `test_decoder` does).
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
