//! What the `tests` package's test binaries share: daemons in-process and
//! as processes, a raw protocol client, bounded waits (`harness`), and
//! real etcd clusters for the etcd backend (`etcd`, Unix); processes and
//! users (`unix`: signals, exit waits, acting as nobody;
//! `windows`: console control events, telling Wine from Windows), and a
//! strict reader of the metrics' text format (`openmetrics`). The
//! tests themselves are in `tests/`, the programs they drive in `src/bin/`.
//!
//! The repository README's Rust examples are compiled here as doctests, so
//! they stay true; the published crates carry their own READMEs instead.

#[cfg(unix)]
pub mod etcd;
pub mod harness;
pub mod openmetrics;
#[cfg(unix)]
pub mod unix;
#[cfg(windows)]
pub mod windows;

/// The repository README's examples.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
