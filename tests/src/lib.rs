//! The integration tests' package: the tests themselves are in `tests/`,
//! the worker process they start in `src/bin/`.
//!
//! The repository README's Rust examples are compiled here as doctests, so
//! they stay true; the published crates carry their own READMEs instead.

/// The repository README's examples.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
