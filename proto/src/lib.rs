//! Wire types and framing of the lockbroker socket protocol, versions 1
//! and 2.
//!
//! A lockbroker client talks to the daemon over one stream (a Unix domain
//! socket, or a named pipe on Windows). Both directions carry *frames*: a
//! 4-byte little-endian body length, then a body encoded with bincode 1.3.3
//! in fixed-int little-endian mode. `PROTOCOL.md` at the repository root is
//! the normative, byte-by-byte specification; this crate is its Rust
//! implementation.
//!
//! A session goes like this:
//!
//! 1. The client sends [`ClientMessage::Hello`] with [`MAGIC`] and
//!    [`PROTOCOL_VERSION`]; the daemon answers [`ServerMessage::Welcome`]
//!    (session id, limits) or [`ServerMessage::Fatal`] and closes.
//! 2. The client sends [`ClientMessage::Request`]s, each with an id of its
//!    choosing. Every request gets exactly one [`ServerMessage::Response`]
//!    with the same id, in any order: a blocked acquire never delays the
//!    answers to later requests.
//! 3. The daemon may push [`ServerMessage::Event`]s at any time.
//!
//! # Layout
//!
//! - [`address`]: scopes and the socket paths both ends resolve.
//! - [`message`]: every type that crosses the wire, plus the validated
//!   [`LockName`] and the stable [`ErrorCode`]s.
//! - [`frame`]: length prefix and body codec; the only module that knows
//!   bincode.
//! - [`io`]: async reading and writing of frames over Tokio's I/O traits.
//! - `pipe` (Windows): the named-pipe transport and the identity of a
//!   pipe's peer.

/// The git commit the workspace was built from ("unknown" outside a git
/// checkout), for the programs' `--version`.
pub const COMMIT: &str = env!("LOCKBROKER_COMMIT");

pub mod address;
pub mod frame;
pub mod io;
pub mod message;
pub mod os;
#[cfg(windows)]
pub mod pipe;

pub use frame::{DEFAULT_MAX_FRAME_LEN, FrameError, HEADER_LEN, MIN_MAX_FRAME_LEN};
pub use message::*;

/// The four bytes every `Hello` starts with: `LKBR` on the wire.
pub const MAGIC: u32 = u32::from_le_bytes(*b"LKBR");

/// The latest protocol version this crate speaks (and the one its
/// clients ask for).
pub const PROTOCOL_VERSION: u16 = 4;

/// The oldest protocol version this crate speaks: a daemon accepts every
/// version from this one to [`PROTOCOL_VERSION`].
pub const OLDEST_PROTOCOL_VERSION: u16 = 1;
