//! Framing: a 4-byte little-endian body length, then the body.
//!
//! Bodies are bincode 1.3.3 in fixed-int little-endian mode, with a byte
//! limit equal to the frame length and trailing bytes rejected. This is the
//! only module that knows bincode, so replacing it touches one file.
//!
//! Decoding is two-step: first check that a whole
//! frame is buffered (an incomplete frame is `Ok(None)`, not an error), and
//! reject a length above the maximum before anything is allocated for it.
//!
//! One message can also be built in pieces: [`InspectionFrame`], so that
//! the daemon encodes a large listing a few entries at a time.

use bincode::Options;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::message::{EntryInfo, Inspection, Response, ServerInfo, ServerMessage, in_wire_version};

/// Bytes in the length prefix.
pub const HEADER_LEN: usize = 4;

/// Default largest frame body: room for a 1 MiB state value and its key.
pub const DEFAULT_MAX_FRAME_LEN: u32 = 2 * 1024 * 1024;

/// The smallest maximum a daemon may be configured with; every request and
/// a `Welcome` fit in it.
pub const MIN_MAX_FRAME_LEN: u32 = 4096;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix announces more than the maximum.
    #[error("frame of {len} bytes is larger than the maximum of {max}")]
    TooLarge {
        /// Announced (or encoded) body length.
        len: u64,
        /// The maximum in force.
        max: u32,
    },
    /// The body is not a valid message.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The stream ended in the middle of a frame.
    #[error("connection closed in the middle of a frame ({buffered} bytes buffered)")]
    Truncated {
        /// Bytes of the partial frame that had arrived.
        buffered: usize,
    },
    /// The underlying stream failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

fn options(limit: u64) -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .with_limit(limit)
        .reject_trailing_bytes()
}

/// Appends `msg` as one frame (length prefix and body) to `out`, in the
/// latest protocol version.
///
/// Fails with [`FrameError::TooLarge`] — leaving `out` as it was — if the
/// body would be longer than `max_len`.
pub fn encode<T: Serialize>(msg: &T, max_len: u32, out: &mut Vec<u8>) -> Result<(), FrameError> {
    encode_in(crate::PROTOCOL_VERSION, msg, max_len, out)
}

/// [`encode`] for a connection that speaks protocol `version`.
pub fn encode_in<T: Serialize>(
    version: u16,
    msg: &T,
    max_len: u32,
    out: &mut Vec<u8>,
) -> Result<(), FrameError> {
    in_wire_version(version, || encode_latest(msg, max_len, out))
}

fn encode_latest<T: Serialize>(msg: &T, max_len: u32, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    // The limit makes bincode stop (with an error) once the body passes
    // max_len, so an oversized message is never fully serialised.
    let result = options(u64::from(max_len)).serialize_into(&mut *out, msg);
    if let Err(e) = result {
        out.truncate(start);
        return Err(match *e {
            bincode::ErrorKind::SizeLimit => FrameError::TooLarge {
                len: options(u64::MAX).serialized_size(msg).unwrap_or(u64::MAX),
                max: max_len,
            },
            other => FrameError::Malformed(other.to_string()),
        });
    }
    let body_len = (out.len() - start - HEADER_LEN) as u32;
    out[start..start + HEADER_LEN].copy_from_slice(&body_len.to_le_bytes());
    Ok(())
}

/// Encodes `msg` as one frame into a new buffer.
pub fn to_frame<T: Serialize>(msg: &T, max_len: u32) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::new();
    encode(msg, max_len, &mut out)?;
    Ok(out)
}

/// The body length announced by the header at the start of `buf`, checked
/// against `max_len`; `Ok(None)` if fewer than [`HEADER_LEN`] bytes are
/// buffered.
pub fn peek_len(buf: &[u8], max_len: u32) -> Result<Option<usize>, FrameError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let len = u32::from_le_bytes(header.try_into().expect("4 bytes"));
    if len > max_len {
        return Err(FrameError::TooLarge {
            len: u64::from(len),
            max: max_len,
        });
    }
    Ok(Some(len as usize))
}

/// Decodes the frame at the start of `buf`, in the latest protocol
/// version.
///
/// Returns the message and how many bytes of `buf` it used, or `Ok(None)` if
/// the frame is not complete yet.
pub fn decode<T: DeserializeOwned>(
    buf: &[u8],
    max_len: u32,
) -> Result<Option<(T, usize)>, FrameError> {
    decode_in(crate::PROTOCOL_VERSION, buf, max_len)
}

/// [`decode`] for a connection that speaks protocol `version`.
pub fn decode_in<T: DeserializeOwned>(
    version: u16,
    buf: &[u8],
    max_len: u32,
) -> Result<Option<(T, usize)>, FrameError> {
    let Some(len) = peek_len(buf, max_len)? else {
        return Ok(None);
    };
    let Some(body) = buf.get(HEADER_LEN..HEADER_LEN + len) else {
        return Ok(None);
    };
    let msg = decode_body_in(version, body)?;
    Ok(Some((msg, HEADER_LEN + len)))
}

/// A `Response::Inspection` frame encoded entry by entry.
///
/// The encoding is positional, so the frame is the message with no entries
/// (its entry count and `truncated` being its last 9 bytes) with the
/// entries spliced in before them: the count is written, and `truncated`
/// appended, by [`InspectionFrame::finish`].
#[derive(Debug)]
pub struct InspectionFrame {
    /// Header, body up to the entry count, the count, the entries so far.
    buf: Vec<u8>,
    /// Where the entry count is.
    count_at: usize,
    count: u64,
    max_len: u32,
    version: u16,
}

/// Bytes after the entries: `Inspection.truncated`.
const AFTER_ENTRIES: usize = 1;

impl InspectionFrame {
    /// The answer to request `id`, from `server`, with no entries yet, for
    /// a connection that speaks protocol `version`; its body may be at most
    /// `max_len` bytes.
    pub fn new(id: u64, server: ServerInfo, max_len: u32, version: u16) -> InspectionFrame {
        let empty = ServerMessage::Response {
            id,
            response: Response::Inspection(Inspection {
                server,
                entries: Vec::new(),
                truncated: false,
            }),
        };
        let mut buf = vec![0; HEADER_LEN];
        options(u64::MAX)
            .serialize_into(&mut buf, &empty)
            .expect("a message without entries encodes");
        buf.truncate(buf.len() - AFTER_ENTRIES);
        InspectionFrame {
            count_at: buf.len() - 8,
            buf,
            count: 0,
            max_len,
            version,
        }
    }

    /// Appends `entry`; fails with [`FrameError::TooLarge`], and leaves the
    /// frame as it was, if the body would then be longer than the maximum.
    pub fn push(&mut self, entry: &EntryInfo) -> Result<(), FrameError> {
        let start = self.buf.len();
        let used = (start - HEADER_LEN + AFTER_ENTRIES) as u64;
        let room = u64::from(self.max_len).saturating_sub(used);
        let written = in_wire_version(self.version, || {
            options(room).serialize_into(&mut self.buf, entry)
        });
        if let Err(e) = written {
            self.buf.truncate(start);
            return Err(match *e {
                bincode::ErrorKind::SizeLimit => FrameError::TooLarge {
                    len: used
                        + in_wire_version(self.version, || {
                            options(u64::MAX).serialized_size(entry).unwrap_or(0)
                        }),
                    max: self.max_len,
                },
                other => FrameError::Malformed(other.to_string()),
            });
        }
        self.count += 1;
        Ok(())
    }

    /// Entries appended so far.
    pub fn len(&self) -> u64 {
        self.count
    }

    /// Whether no entry was appended.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Closes the frame with `truncated` and appends it to `out`.
    pub fn finish(mut self, truncated: bool, out: &mut Vec<u8>) {
        self.buf[self.count_at..self.count_at + 8].copy_from_slice(&self.count.to_le_bytes());
        self.buf.push(u8::from(truncated));
        let body_len = (self.buf.len() - HEADER_LEN) as u32;
        self.buf[..HEADER_LEN].copy_from_slice(&body_len.to_le_bytes());
        if out.is_empty() {
            *out = self.buf;
        } else {
            out.extend_from_slice(&self.buf);
        }
    }
}

/// Decodes a frame body (without its length prefix) in the latest
/// protocol version; the whole body must be one message.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    decode_body_in(crate::PROTOCOL_VERSION, body)
}

/// [`decode_body`] for a connection that speaks protocol `version`.
pub fn decode_body_in<T: DeserializeOwned>(version: u16, body: &[u8]) -> Result<T, FrameError> {
    in_wire_version(version, || {
        options(body.len() as u64)
            .deserialize(body)
            .map_err(|e| FrameError::Malformed(e.to_string()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::*;

    fn ping(id: u64) -> ClientMessage {
        ClientMessage::Request {
            id,
            request: Request::Ping,
        }
    }

    #[test]
    fn round_trip() {
        let frame = to_frame(&ping(7), DEFAULT_MAX_FRAME_LEN).unwrap();
        // variant 1 (Request), id 7, variant 5 (Ping)
        assert_eq!(
            frame,
            [16, 0, 0, 0, 1, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0]
        );
        let (msg, used) = decode::<ClientMessage>(&frame, DEFAULT_MAX_FRAME_LEN)
            .unwrap()
            .unwrap();
        assert_eq!(msg, ping(7));
        assert_eq!(used, frame.len());
    }

    #[test]
    fn incomplete_is_not_an_error() {
        let frame = to_frame(&ping(1), DEFAULT_MAX_FRAME_LEN).unwrap();
        for cut in 0..frame.len() {
            assert!(
                decode::<ClientMessage>(&frame[..cut], DEFAULT_MAX_FRAME_LEN)
                    .unwrap()
                    .is_none()
            );
        }
    }

    #[test]
    fn oversized_length_is_rejected_before_the_body_arrives() {
        let header = (DEFAULT_MAX_FRAME_LEN + 1).to_le_bytes();
        let err = decode::<ClientMessage>(&header, DEFAULT_MAX_FRAME_LEN).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let mut frame = to_frame(&ping(1), DEFAULT_MAX_FRAME_LEN).unwrap();
        frame.push(0);
        frame[0] += 1;
        let err = decode::<ClientMessage>(&frame, DEFAULT_MAX_FRAME_LEN).unwrap_err();
        assert!(matches!(err, FrameError::Malformed(_)), "{err}");
    }

    #[test]
    fn string_length_beyond_the_body_is_malformed_not_an_allocation() {
        // Hello with a client_name claiming u64::MAX bytes.
        let mut body = vec![0, 0, 0, 0];
        body.extend_from_slice(&crate::MAGIC.to_le_bytes());
        body.extend_from_slice(&1u16.to_le_bytes());
        body.extend_from_slice(&u64::MAX.to_le_bytes());
        let err = decode_body::<ClientMessage>(&body).unwrap_err();
        assert!(matches!(err, FrameError::Malformed(_)), "{err}");
    }

    #[test]
    fn encoding_above_the_limit_fails_and_leaves_the_buffer() {
        let msg = ClientMessage::Hello(Hello {
            magic: crate::MAGIC,
            version: 1,
            client_name: "x".repeat(100),
        });
        let mut out = vec![9];
        let err = encode(&msg, 50, &mut out).unwrap_err();
        assert!(
            matches!(err, FrameError::TooLarge { len: 118, max: 50 }),
            "{err}"
        );
        assert_eq!(out, [9]);
    }

    fn entry(name: &str) -> EntryInfo {
        let session = SessionInfo {
            session_id: 3,
            pid: Some(9),
            uid: None,
            gid: Some(5),
            client_name: "x".into(),
            host: "h".into(),
            user: String::new(),
        };
        EntryInfo {
            name: name.into(),
            kind: EntryKind::Semaphore,
            capacity: 4,
            abandoned: true,
            holders: vec![HolderInfo {
                session: session.clone(),
                hold_id: 1,
                kind: LockKind::Semaphore,
                permits: 2,
                fence: 7,
                since_ms: 8,
            }],
            waiters: vec![WaiterInfo {
                session,
                request_id: 4,
                kind: LockKind::Semaphore,
                permits: 3,
                since_ms: 9,
                timeout_ms: Some(10),
            }],
        }
    }

    #[test]
    fn an_inspection_built_entry_by_entry_is_the_whole_message() {
        let server = ServerInfo {
            version: "0.1.0".into(),
            pid: 42,
            uptime_ms: 5,
            sessions: 2,
        };
        for (n, truncated) in [(0, false), (1, true), (3, false)] {
            let entries: Vec<EntryInfo> = (0..n).map(|i| entry(&format!("e{i}"))).collect();
            let whole = ServerMessage::Response {
                id: 77,
                response: Response::Inspection(Inspection {
                    server: server.clone(),
                    entries: entries.clone(),
                    truncated,
                }),
            };
            let mut built = InspectionFrame::new(
                77,
                server.clone(),
                DEFAULT_MAX_FRAME_LEN,
                crate::PROTOCOL_VERSION,
            );
            for e in &entries {
                built.push(e).unwrap();
            }
            assert_eq!(built.len(), n as u64);
            let mut out = vec![1, 2];
            built.finish(truncated, &mut out);
            assert_eq!(
                out[2..],
                to_frame(&whole, DEFAULT_MAX_FRAME_LEN).unwrap()[..]
            );
        }
    }

    #[test]
    fn an_entry_past_the_limit_is_refused_and_leaves_the_frame() {
        let server = ServerInfo {
            version: "0.1.0".into(),
            pid: 42,
            uptime_ms: 5,
            sessions: 2,
        };
        let whole = |entries: Vec<EntryInfo>| ServerMessage::Response {
            id: 1,
            response: Response::Inspection(Inspection {
                server: server.clone(),
                entries,
                truncated: false,
            }),
        };
        // Room for exactly one entry.
        let max = to_frame(&whole(vec![entry("a")]), u32::MAX).unwrap().len() - HEADER_LEN;
        let mut built =
            InspectionFrame::new(1, server.clone(), max as u32, crate::PROTOCOL_VERSION);
        built.push(&entry("a")).unwrap();
        let err = built.push(&entry("b")).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }), "{err}");
        let mut out = Vec::new();
        built.finish(false, &mut out);
        assert_eq!(out, to_frame(&whole(vec![entry("a")]), u32::MAX).unwrap());
    }

    #[test]
    fn unknown_variant_is_malformed() {
        let body = [2u8, 0, 0, 0];
        assert!(matches!(
            decode_body::<ClientMessage>(&body),
            Err(FrameError::Malformed(_))
        ));
    }
}
