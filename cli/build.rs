//! Build script: the git commit for `--version` (see
//! `build-support/commit.rs`).

include!("../build-support/commit.rs");
