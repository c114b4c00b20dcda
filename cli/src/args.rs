//! The command line, as clap parses it.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::exit;

/// What `--version` shows: the version and the git commit.
static LONG_VERSION: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "{} (commit {})",
        env!("CARGO_PKG_VERSION"),
        lockbroker::COMMIT
    )
});

/// lockbroker: FIFO named locks for shell scripts, cron jobs and services.
///
/// Locks live in a small daemon (lockbrokerd); whatever a command held is
/// released the moment it exits or is killed, and the next holder is told
/// when the previous one died holding it.
#[derive(Debug, Parser)]
#[command(
    name = "lockbroker",
    version = LONG_VERSION.as_str(),
    after_help = "\
Examples:
  lockbroker lock deploy -- ./deploy.sh          run deploy.sh holding mutex \"deploy\"
  lockbroker lock --timeout 30s backup -- tar c /srv
  lockbroker sem gpu --capacity 2 -- ./train.py  at most two at once
  lockbroker status                              who holds what, who waits
  lockbroker run -- make -j8                     a private broker for one process tree

Exit status: the command's own; 75 when the lock was not obtained in time
(--conflict-exit-code); 76 when the lock was lost while the command ran;
35 when waiting would deadlock: every holder it needs waits, in the end,
for this command or the lock it runs under (README, Deadlock detection);
69 when the daemon cannot be reached, refuses, or is not trusted
(--allow-uid); 2 for usage errors;
`state`: 4 for an absent key, 5 for a version mismatch."
)]
pub struct Cli {
    /// Talk to the daemon on this socket (overrides --scope and
    /// LOCKBROKER_SOCKET).
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// Which daemon: `self` (the one `lockbroker run` started, via
    /// LOCKBROKER_SOCKET), `local` (this login session) or `global` (every
    /// user).
    #[arg(long, global = true, value_enum, default_value_t = ScopeArg::Local)]
    pub scope: ScopeArg,

    /// Print data as JSON (status, ping).
    #[arg(long, global = true)]
    pub json: bool,

    /// Never start a local daemon (also: LOCKBROKER_NO_AUTOSTART=1).
    #[arg(long, global = true)]
    pub no_autostart: bool,

    /// Deadlock detection is always on now; the flag that once turned it
    /// on is still accepted, so scripts written for it keep working.
    #[arg(long, global = true, hide = true)]
    pub detect_deadlocks: bool,

    /// Also trust a daemon running as this user id (repeatable). By
    /// default the daemon must run as you (local scope), as root or the
    /// owner of /run/lockbroker (global scope), or as you or root (--socket,
    /// LOCKBROKER_SOCKET); anything else is refused with exit status 69.
    #[arg(long, global = true, value_name = "UID")]
    pub allow_uid: Vec<u32>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// `--scope` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScopeArg {
    /// The private daemon of `lockbroker run` (LOCKBROKER_SOCKET).
    #[value(name = "self")]
    Process,
    /// This login session's daemon, started on first use.
    Local,
    /// The machine-wide daemon (systemd's lockbroker.socket).
    Global,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a command while holding a mutex (or the shared side of a rwlock).
    #[command(after_help = "\
Examples:
  lockbroker lock deploy/status ./update-status.sh
  lockbroker lock -n nightly ./job.sh || echo \"already running\"
  lockbroker lock -s config cat /etc/app.conf
  lockbroker lock -w 0.5 -E 3 cache -c 'make cache && touch done'
  lockbroker lock deploy -- ./deploy.sh --fast

flock(1)'s options mean the same here: -s, -x/-e, -n, -w SECONDS, -E CODE,
-o, -c COMMAND; the command is every word after NAME (or after --).

The command gets LOCKBROKER_FENCE (the lock's fencing token),
LOCKBROKER_HOLD (its hold id), LOCKBROKER_LOCK (the lock's name) and
LOCKBROKER_ABANDONED=1 when the previous holder died holding it;
`lockbroker state set --lock NAME` inside it writes under this hold.

The lock lives as long as the command's process tree, as a flock(1) lock
does: the command inherits the lock's connection, so if lockbroker itself is
killed (kill -9, the OOM killer, a CI timeout), nobody else gets the lock
until the command and every process it started that kept the connection
have exited (the next holder is then told it was abandoned). When the
command exits and processes it started still run, the lock stays with them
until the last one exits. With -o/--close those left-behind processes do
not keep it: the lock is released when the command itself exits. (On
Windows the lock always ends with the command itself.)

The command runs in its own process group; SIGINT and SIGTERM sent to
lockbroker are passed on to it. If the lock is lost while it runs (the
daemon went away), the group gets SIGTERM, then SIGKILL after --kill-grace,
and lockbroker exits 76.")]
    Lock(LockArgs),

    /// Take a lock for the rest of a shell script: held once a line is
    /// read from this command's output, released when the shell's end of
    /// it closes (the script exits, is killed, or closes it).
    #[command(after_help = "\
Examples (bash, zsh, ksh):
  exec 9< <(lockbroker hold deploy) && read -r fence <&9 || exit 75
  ...                          # held from here on; $fence is its fencing token
  exec 9<&-                    # release early (else: when the script ends)

`hold` prints one line, the lock's fence, once it holds the lock, and keeps
it until every process that has the other end of its standard output closes
it: the shell that reads it, and whatever it started that kept the
descriptor, as a lock taken with `exec 9>file; flock 9` lives with its
descriptor. Killed (kill -9 included), it releases at once; the script is
sent SIGTERM if the lock is lost while it holds. When the lock is not
obtained, it prints nothing and exits with the conflict status, so the
`read` fails. Options as for `lockbroker lock`. Unix only.")]
    Hold(HoldArgs),

    /// Run a command while holding permits of a counting semaphore.
    #[command(after_help = "\
Examples:
  lockbroker sem encoders --capacity 4 -- ffmpeg -i in.mov out.mp4
  lockbroker sem db-heavy --capacity 3 --permits 2 --timeout 1m -- ./report.sh

Every user of a name must give the same --capacity while it is in use.
The command's environment and signals are as for `lockbroker lock`.")]
    Sem(SemArgs),

    /// Show every lock under a prefix: holders, waiters in queue order.
    #[command(after_help = "\
Examples:
  lockbroker status
  lockbroker status deploy/
  lockbroker status -o NAME,PID,COMMAND --no-headings
  lockbroker status -o +HOST,SESSION
  lockbroker status --json | jq '.locks[].holders[].command'

One row per holder and per waiter (in queue order), as lslocks shows
them. PID and COMMAND are those of the command a `lockbroker lock` or
`sem` runs (of the script a `lockbroker hold` serves), else of the client
process; WRAPPER is the pid of the session's own process. FOR is how long
it has held or waited. --json carries every column (README).")]
    Status(StatusArgs),

    /// Check that the daemon answers, and how fast.
    #[command(after_help = "\
Examples:
  lockbroker ping
  lockbroker --scope global ping")]
    Ping,

    /// Revoke a lock's holds from outside (a stuck holder): each holder
    /// loses it (a `lockbroker lock` command is terminated), and the next
    /// holder is told the lock was abandoned.
    #[command(after_help = "\
Examples:
  lockbroker break deploy              every hold of \"deploy\"
  lockbroker break deploy --hold 42    only hold 42 (HOLD in `status -o +HOLD`)

Allowed on holds of your own user; root, and members of the daemon's
--admin-group, may break any. Exit status: 0 when broken; 1 when nobody
holds it; 77 when a hold is another user's (nothing is broken); 69 when
the daemon cannot be reached or cannot break holds (its etcd backend).")]
    Break(BreakArgs),

    /// Print the daemon's metrics (OpenMetrics text, as `lockbrokerd
    /// --metrics-listen` serves them).
    #[command(after_help = "\
Examples:
  lockbroker metrics
  lockbroker metrics | grep '^lockbroker_holds'

The metrics are described in README (Metrics).")]
    Metrics,

    /// Print shell completions for lockbroker (install: README).
    #[command(after_help = "\
Examples:
  lockbroker completions bash > ~/.local/share/bash-completion/completions/lockbroker
  lockbroker completions zsh > ~/.zfunc/_lockbroker
  lockbroker completions fish > ~/.config/fish/completions/lockbroker.fish")]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },

    /// Print lockbroker's man page (roff).
    #[command(after_help = "\
Examples:
  lockbroker man > /usr/local/share/man/man1/lockbroker.1
  lockbroker man | man -l -")]
    Man,

    /// Run a command with a private broker for it and its children.
    #[command(after_help = "\
Examples:
  lockbroker run -- make -j8
  lockbroker run -- sh -c 'lockbroker --scope self lock db -- ./migrate'

The private daemon listens on a temporary socket exported as
LOCKBROKER_SOCKET; it stops, and the socket is removed, when the command
exits. Two `run` trees never share a lock. The exit status is the
command's.")]
    Run(RunArgs),

    /// Read, write and watch the daemon's shared key/value state.
    #[command(subcommand)]
    State(StateCommand),

    /// Run the daemon (lockbrokerd) in the foreground.
    #[command(after_help = "\
Examples:
  lockbroker daemon
  lockbroker --socket /tmp/test.sock daemon --log-level debug

Every lockbrokerd flag is accepted; see `lockbrokerd --help`.")]
    Daemon(DaemonArgs),
}

/// `lockbroker state ...`.
#[derive(Debug, Subcommand)]
#[command(after_help = "\
Examples:
  lockbroker state set build/status running
  lockbroker state get build/status
  lockbroker state incr visits
  lockbroker state watch --prefix build/

Exit status: 0; 4 when the key is absent (get, rm); 5 when --if-version or
cas does not match the key's version; 69 when the daemon refuses.")]
pub enum StateCommand {
    /// Print a key's value (add --json for its version too).
    #[command(
        after_help = "Examples:\n  lockbroker state get build/status\n  lockbroker state get --json build/status\n\nExit status 4 when the key is absent."
    )]
    Get {
        /// The key.
        key: String,
    },
    /// Store a value; prints the new version.
    #[command(
        after_help = "Examples:\n  lockbroker state set build/status running\n  date | lockbroker state set build/started -\n  lockbroker state set --ttl 30s session/alive yes\n  lockbroker state set --lock deploy deploy/status done   # written only while holding \"deploy\""
    )]
    Set {
        /// The key.
        key: String,
        /// The value; `-` reads it from standard input.
        value: String,
        /// Write only if the key's version is this (0: it must not exist).
        #[arg(long, value_name = "VERSION")]
        if_version: Option<u64>,
        /// The key disappears after this long.
        #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
        ttl: Option<Duration>,
        /// Write only while holding mutex NAME (a guarded write): under
        /// `lockbroker lock NAME`, with that hold's fence; else take it.
        #[arg(long, value_name = "NAME")]
        lock: Option<String>,
    },
    /// Remove a key; prints its old value.
    #[command(
        name = "rm",
        after_help = "Examples:\n  lockbroker state rm build/status\n\nExit status 4 when the key is absent."
    )]
    Remove {
        /// The key.
        key: String,
        /// Remove only if the key's version is this.
        #[arg(long, value_name = "VERSION")]
        if_version: Option<u64>,
    },
    /// Add DELTA (default 1) to a decimal integer; prints the new value.
    #[command(
        name = "incr",
        after_help = "Examples:\n  lockbroker state incr visits\n  lockbroker state incr -- stock -3"
    )]
    Increment {
        /// The key (absent counts as 0).
        key: String,
        /// Added to the value.
        #[arg(default_value_t = 1, allow_negative_numbers = true)]
        delta: i64,
    },
    /// Compare-and-set: store VALUE only if the key's version is VERSION
    /// (0: it must not exist); prints the new version.
    #[command(
        after_help = "Examples:\n  v=$(lockbroker state get --json cfg | jq .version)\n  lockbroker state cas cfg \"$v\" new-value || echo \"someone else changed it\"\n\nExit status 5 when the version does not match."
    )]
    Cas {
        /// The key.
        key: String,
        /// The version the key must have.
        version: u64,
        /// The value; `-` reads it from standard input.
        value: String,
    },
    /// List keys under a prefix, in key order: KEY, VERSION (and VALUE).
    #[command(
        after_help = "Examples:\n  lockbroker state list build/\n  lockbroker state list --values --json"
    )]
    List {
        /// Key prefix.
        #[arg(default_value = "")]
        prefix: String,
        /// Show the values too.
        #[arg(long)]
        values: bool,
    },
    /// Print one line per change of a key (or prefix) until interrupted:
    /// VERSION KIND KEY [VALUE].
    #[command(
        after_help = "Examples:\n  lockbroker state watch build/status\n  lockbroker state watch --prefix build/ --json"
    )]
    Watch {
        /// The key to watch (or use --prefix).
        #[arg(required_unless_present = "prefix", conflicts_with = "prefix")]
        key: Option<String>,
        /// Watch every key starting with this.
        #[arg(long, value_name = "PREFIX")]
        prefix: Option<String>,
        /// Replay changes from this version on first (as far as the
        /// daemon's history reaches).
        #[arg(long, value_name = "VERSION", default_value_t = 0)]
        from: u64,
    },
}

/// How long to wait for a lock.
#[derive(Debug, Clone, Args)]
pub struct WaitArgs {
    /// Give up after this long (e.g. 250ms, 2s, 1m; a bare number is
    /// seconds, fractions allowed: `-w 0.5` as flock).
    #[arg(
        long,
        short = 't',
        visible_short_alias = 'w',
        visible_alias = "wait",
        value_parser = parse_duration,
        value_name = "DURATION",
        conflicts_with = "nonblock"
    )]
    pub timeout: Option<Duration>,

    /// Give up at once if the lock is not free (never jumps the queue).
    #[arg(long, short = 'n')]
    pub nonblock: bool,

    /// Exit status when the lock is not obtained (as `flock -E`).
    #[arg(long, short = 'E', value_name = "N", default_value_t = exit::CONFLICT)]
    pub conflict_exit_code: u8,
}

/// `lockbroker lock`.
#[derive(Debug, Args)]
pub struct LockArgs {
    #[command(flatten)]
    pub lock: LockKindArgs,

    #[command(flatten)]
    pub wait: WaitArgs,

    #[command(flatten)]
    pub command: CommandArgs,
}

/// The name and side of a lock, as `flock -s` / `-x` choose them.
#[derive(Debug, Clone, Args)]
pub struct LockKindArgs {
    /// The lock's name, e.g. deploy/status.
    pub name: String,

    /// Take the shared side of rwlock NAME (many holders at once), as
    /// `flock -s`.
    #[arg(long, short = 's')]
    pub shared: bool,

    /// Take NAME exclusively, as `flock -x` or `-e` (the default).
    #[arg(long, short = 'x', short_alias = 'e', conflicts_with = "shared")]
    pub exclusive: bool,
}

/// The command a wrapper runs: the words after NAME (or after `--`), or
/// one shell command line (`-c`, as `flock -c`).
#[derive(Debug, Args)]
pub struct CommandArgs {
    /// Processes the command leaves running do not keep the lock: it is
    /// released when the command itself exits (as `flock -o`).
    #[arg(long, short = 'o')]
    pub close: bool,

    /// After losing the lock, how long the command gets between SIGTERM
    /// and SIGKILL.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION", default_value = "10s")]
    pub kill_grace: Duration,

    /// Hold the lock at most this long (e.g. 30m): then the daemon revokes
    /// it, the next holder is told it was abandoned, and the command is
    /// terminated as on any loss (exit 76).
    #[arg(long, value_parser = parse_lease, value_name = "DURATION")]
    pub lease: Option<Duration>,

    /// Send the command this signal (e.g. USR1) when someone starts
    /// waiting for the lock while it runs, once: a long job can finish
    /// early or let go.
    #[arg(long, value_parser = crate::child::Signal::parse, value_name = "SIGNAL")]
    pub on_contended: Option<crate::child::Signal>,

    /// Run COMMAND with `sh -c` (`cmd /C` on Windows), as `flock -c`.
    #[arg(long = "command", short = 'c', value_name = "COMMAND")]
    pub shell: Option<OsString>,

    /// The command and its arguments: every word after NAME, or after
    /// `--`.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        required_unless_present = "shell",
        conflicts_with = "shell",
        value_name = "CMD"
    )]
    pub argv: Vec<OsString>,
}

impl CommandArgs {
    /// The program and its arguments.
    pub fn argv(&self) -> Vec<OsString> {
        match &self.shell {
            #[cfg(unix)]
            Some(line) => vec!["sh".into(), "-c".into(), line.clone()],
            #[cfg(windows)]
            Some(line) => vec!["cmd".into(), "/C".into(), line.clone()],
            None => self.argv.clone(),
        }
    }
}

/// `lockbroker hold`.
#[derive(Debug, Args)]
pub struct HoldArgs {
    #[command(flatten)]
    pub lock: LockKindArgs,

    #[command(flatten)]
    pub wait: WaitArgs,
}

/// `lockbroker sem`.
#[derive(Debug, Args)]
pub struct SemArgs {
    /// The semaphore's name.
    pub name: String,

    /// Total permits of the semaphore.
    #[arg(long, value_name = "N")]
    pub capacity: u32,

    /// Permits this command takes.
    #[arg(long, value_name = "K", default_value_t = 1)]
    pub permits: u32,

    #[command(flatten)]
    pub wait: WaitArgs,

    #[command(flatten)]
    pub command: CommandArgs,
}

/// `lockbroker break`.
#[derive(Debug, Args)]
pub struct BreakArgs {
    /// The lock.
    pub name: String,

    /// Break only this hold (its id, as `status` shows it).
    #[arg(long, value_name = "ID")]
    pub hold: Option<u64>,
}

/// `lockbroker status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Only locks whose names start with this.
    #[arg(default_value = "")]
    pub prefix: String,

    /// The columns, comma-separated (as lslocks -o); `+COLS` adds to the
    /// default ones. Columns: NAME, TYPE, MODE, STATE, PID, USER, HOST,
    /// FOR, FENCE, COMMAND, TIMEOUT, PERMITS, SESSION, CLIENT, WRAPPER.
    #[arg(long, short = 'o', value_name = "COLUMNS")]
    pub output: Option<String>,

    /// No header lines (the daemon's line and the column names).
    #[arg(long, short = 'n')]
    pub no_headings: bool,
}

/// `lockbroker run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The command to run.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        required = true,
        value_name = "CMD"
    )]
    pub command: Vec<OsString>,
}

/// `lockbroker daemon`.
#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// Flags for lockbrokerd.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "FLAGS"
    )]
    pub args: Vec<OsString>,
}

/// A lease: a duration of at least a millisecond.
pub fn parse_lease(text: &str) -> Result<Duration, String> {
    let lease = parse_duration(text)?;
    if lease < Duration::from_millis(1) {
        return Err(format!(
            "a lease of {text:?} would end at once: give at least 1ms"
        ));
    }
    Ok(lease)
}

/// Parses `250ms`, `2s`, `1.5s`, `1m`, `1h`; a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (try 250ms, 2s, 1m)"))?;
    let scale = match unit {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?} (use ms, s, m or h)"
            ));
        }
    };
    Duration::try_from_secs_f64(value * scale).map_err(|e| format!("{text:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("ms").is_err());
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
