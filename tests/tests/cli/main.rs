//! Black-box tests of the `lockbroker` command-line tool and the real
//! `lockbrokerd` binary, on each platform with the commands it can run.

mod both;
mod fixture;
#[cfg(unix)]
mod unix;
#[cfg(windows)]
mod windows;
