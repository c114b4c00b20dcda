//! `--log-file PATH`: the daemon's log in a file that stays bounded. When
//! the next line would take it past `--log-file-max` bytes, `PATH` becomes
//! `PATH.1` (replacing the one before) and a new `PATH` is begun, so the
//! log never takes more than twice the bound, however long the daemon
//! runs. The autostarted daemon's `broker.log` and a Windows service's
//! log are such files.
//!
//! On Unix the file is also the process's stdout and stderr from the
//! moment it is opened (and again after each turn), so a panic or the
//! last error line lands in the current file, and no descriptor keeps an
//! old one alive.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// `--log-file-max` when not given: 4 MiB.
pub const DEFAULT_MAX: u64 = 4 << 20;

/// A log file that turns over at a size bound.
#[derive(Debug)]
pub struct LogFile {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    file: File,
    len: u64,
    max: u64,
    /// Make the file the process's stdout and stderr (Unix: Windows
    /// programs write to their handles as given).
    #[cfg_attr(not(unix), allow(dead_code))]
    stdio: bool,
}

impl LogFile {
    /// Opens `path` for appending (turning it over first if it is at
    /// `max` already). With `stdio`, it becomes the process's stdout and
    /// stderr (Unix).
    pub fn open(path: &Path, max: u64, stdio: bool) -> io::Result<LogFile> {
        let file = open_append(path)?;
        let len = file.metadata()?.len();
        let mut inner = Inner {
            path: path.to_owned(),
            file,
            len,
            max: max.max(1),
            stdio,
        };
        if inner.len >= inner.max {
            inner.turn_over()?;
        } else {
            inner.redirect_stdio();
        }
        Ok(LogFile {
            inner: Mutex::new(inner),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while writing a line leaves nothing half-changed that
        // matters: the next line goes on.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    /// `PATH` → `PATH.1`, and a new `PATH`. Where the rename cannot be
    /// done (Windows, while another process has the old `.1` open), the
    /// file is emptied instead: the bound holds either way.
    fn turn_over(&mut self) -> io::Result<()> {
        let mut old = self.path.as_os_str().to_owned();
        old.push(".1");
        match std::fs::rename(&self.path, &old) {
            Ok(()) => {
                self.file = open_append(&self.path)?;
                self.redirect_stdio();
            }
            Err(_) => self.file.set_len(0)?,
        }
        self.len = 0;
        Ok(())
    }

    #[cfg(unix)]
    fn redirect_stdio(&self) {
        use std::os::fd::AsRawFd;
        if self.stdio {
            // SAFETY: dup2 onto this process's own stdout and stderr.
            unsafe {
                libc::dup2(self.file.as_raw_fd(), libc::STDOUT_FILENO);
                libc::dup2(self.file.as_raw_fd(), libc::STDERR_FILENO);
            }
        }
    }

    #[cfg(not(unix))]
    fn redirect_stdio(&self) {}
}

/// The writer of one log event.
#[derive(Debug)]
pub struct LogWriter<'a>(MutexGuard<'a, Inner>);

impl Write for LogWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // An event is one write: the file turns over before the line that
        // would cross the bound, never inside it.
        let log = &mut *self.0;
        if log.len > 0 && log.len + buf.len() as u64 > log.max {
            log.turn_over()?;
        }
        let n = log.file.write(buf)?;
        log.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.file.flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogFile {
    type Writer = LogWriter<'a>;

    fn make_writer(&'a self) -> LogWriter<'a> {
        LogWriter(self.lock())
    }
}

/// Opens `path` to append, never through a symbolic link (Unix), and
/// private to the user when it is created.
fn open_append(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NOFOLLOW).mode(0o600);
    }
    options
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("opening {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::fmt::MakeWriter;

    fn line(log: &LogFile, text: &str) {
        log.make_writer().write_all(text.as_bytes()).unwrap();
    }

    #[test]
    fn the_file_turns_over_at_the_bound_and_keeps_one_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.log");
        let old = dir.path().join("broker.log.1");
        let log = LogFile::open(&path, 100, false).unwrap();
        for i in 0..50 {
            line(&log, &format!("line {i:03} of the log\n")); // 20 bytes: 5 a file
        }
        let now = std::fs::read_to_string(&path).unwrap();
        let before = std::fs::read_to_string(&old).unwrap();
        assert!(
            now.len() <= 100 && before.len() <= 100,
            "{now:?} {before:?}"
        );
        assert!(now.ends_with("line 049 of the log\n"), "{now:?}");
        // The old file holds the lines just before, whole.
        assert!(before.ends_with("line 044 of the log\n"), "{before:?}");
        assert!(before.starts_with("line 040"), "{before:?}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn a_file_over_the_bound_at_start_is_turned_over_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.log");
        std::fs::write(&path, vec![b'x'; 500]).unwrap();
        let log = LogFile::open(&path, 100, false).unwrap();
        line(&log, "fresh\n");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "fresh\n");
        assert_eq!(
            std::fs::metadata(dir.path().join("broker.log.1"))
                .unwrap()
                .len(),
            500
        );
        // A line longer than the bound is written whole, alone.
        let long = "y".repeat(300) + "\n";
        line(&log, &long);
        line(&log, "after\n");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("broker.log.1")).unwrap(),
            long
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "after\n");
    }

    #[cfg(unix)]
    #[test]
    fn a_symbolic_link_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let path = dir.path().join("broker.log");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        let err = LogFile::open(&path, 100, false).unwrap_err();
        assert!(err.to_string().contains("opening"), "{err}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    }
}
