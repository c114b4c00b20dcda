//! What the `tests` package's test binaries share: daemons in-process and
//! as processes, a raw protocol client, bounded waits (`harness`), and
//! processes and users (`unix`: signals, exit waits, acting as nobody). The
//! tests themselves are in `tests/`, the programs they drive in `src/bin/`.
//!
//! The repository README's Rust examples are compiled here as doctests, so
//! they stay true; the published crates carry their own READMEs instead.

pub mod harness;
#[cfg(unix)]
pub mod unix;

/// The repository README's examples.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
