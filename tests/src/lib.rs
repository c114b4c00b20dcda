//! What the `tests` package's test binaries share: processes (signals,
//! bounded waits for an exit, acting as another user) and file modes. The
//! tests themselves are in `tests/`, the programs they drive in `src/bin/`.
//!
//! The repository README's Rust examples are compiled here as doctests, so
//! they stay true; the published crates carry their own READMEs instead.

#[cfg(unix)]
pub mod unix;

/// The repository README's examples.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
