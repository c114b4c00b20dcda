//! `lockbroker`: the command-line tool. Takes locks around commands, shows
//! who holds what, starts private brokers, and runs the daemon. `main.rs`
//! is just [`main`], so that test packages can build the same program as a
//! binary of their own.

mod args;
mod child;
mod daemon;
mod held;
#[cfg(unix)]
mod hold;
mod state_cmd;
mod status;

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use lockbroker::address;
use lockbroker::{Client, Connector, LockGuard, Scope};

use crate::args::{Cli, Command, CommandArgs, LockKindArgs, ScopeArg, WaitArgs};
use crate::child::Outcome;

/// Exit statuses of lockbroker itself.
pub mod exit {
    /// The lock was not obtained in time (`--conflict-exit-code`).
    pub const CONFLICT: u8 = 75;
    /// The lock was lost while the command ran.
    pub const LOCK_LOST: u8 = 76;
    /// The daemon could not be reached, refused the request, or is not
    /// trusted (another user could be posing as it).
    pub const UNAVAILABLE: u8 = 69;
    /// The wait would deadlock: the locks it needs are held by commands
    /// that wait, in the end, for this one (35 is Linux's `EDEADLK`).
    pub const DEADLOCK: u8 = 35;
    /// Anything else that went wrong in lockbroker itself.
    pub const ERROR: u8 = 1;
    /// Forbidden: a `break` of another user's hold, or anything the
    /// daemon's access rules refuse (sysexits' `EX_NOPERM`).
    pub const FORBIDDEN: u8 = 77;
    // `lockbroker state` adds 4 (absent key) and 5 (version mismatch).
}

/// Environment variable that turns autostart off.
const NO_AUTOSTART_ENV: &str = "LOCKBROKER_NO_AUTOSTART";

/// Runs `lockbroker` with this process's arguments; its exit status.
pub fn main() -> ExitCode {
    // Like other Unix tools, die quietly when stdout is a closed pipe
    // (`lockbroker state watch | head -1`) rather than panic on the write.
    // Sockets are written with MSG_NOSIGNAL, so the daemon's going away is
    // still an error, not a signal.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    match &cli.command {
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(*shell, &mut command, "lockbroker", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Command::Man => {
            let page = clap_mangen::Man::new(<Cli as clap::CommandFactory>::command());
            return match page.render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(exit::ERROR, &format!("cannot write the man page: {e}")),
            };
        }
        _ => {}
    }
    if let Command::Daemon(d) = cli.command {
        let mut args = Vec::new();
        if let Some(socket) = &cli.socket {
            args.push("--socket".into());
            args.push(socket.into());
        } else if cli.scope == ScopeArg::Global {
            args.extend(["--scope".into(), "global".into()]);
        }
        args.extend(d.args);
        return match daemon::exec(args) {
            Ok(never) => match never {},
            Err(e) => fail(exit::ERROR, &e),
        };
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(exit::ERROR, &format!("cannot start the runtime: {e}")),
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err((code, message)) => fail(code, &message),
    }
}

/// Prints one line on stderr and exits with `code`.
fn fail(code: u8, message: &str) -> ExitCode {
    eprintln!("lockbroker: {message}");
    ExitCode::from(code)
}

type Failure = (u8, String);

async fn run(cli: Cli) -> Result<u8, Failure> {
    match &cli.command {
        Command::Lock(a) => {
            let client = connect(&cli).await?;
            match acquire_lock(&client, &a.lock, &a.wait, Some(&a.command)).await? {
                Some(guard) => run_holding(&client, guard, &a.lock.name, &a.command).await,
                None => Ok(a.wait.conflict_exit_code),
            }
        }
        Command::Hold(a) => {
            #[cfg(unix)]
            {
                let client = connect(&cli).await?;
                hold::run(&client, &a.lock, &a.wait).await
            }
            #[cfg(windows)]
            {
                let _ = a;
                Err((
                    2,
                    "`lockbroker hold` is for Unix shells; on Windows run the work under `lockbroker lock NAME COMMAND`".into(),
                ))
            }
        }
        Command::Sem(a) => {
            let client = connect(&cli).await?;
            let mut sem = client.semaphore(a.name.clone(), a.capacity);
            if a.command.on_contended.is_some() {
                sem = sem.notify_contended();
            }
            if let Some(lease) = a.command.lease {
                sem = sem.lease(lease);
            }
            let permits = a.permits;
            let guard = wait_for(&a.wait, "semaphore", &a.name, |timeout| async move {
                match timeout {
                    None => sem.acquire_many(permits).await.map(Some),
                    Some(t) => sem.acquire_many_timeout(permits, t).await,
                }
            })
            .await?;
            match guard {
                Some(guard) => run_holding(&client, guard, &a.name, &a.command).await,
                None => Ok(a.wait.conflict_exit_code),
            }
        }
        Command::Status(a) => {
            let layout = status::Layout {
                columns: status::columns_or_default(a.output.as_deref()).map_err(|e| (2, e))?,
                headings: !a.no_headings,
            };
            let (client, socket) = connect_with_address(&cli).await?;
            status::show(&client, &socket, &a.prefix, cli.json, &layout).await
        }
        Command::Ping => {
            let (client, socket) = connect_with_address(&cli).await?;
            let rtt = client.ping().await.map_err(unavailable)?;
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "version": client.server_version(),
                        "socket": socket.display().to_string(),
                        "rtt_us": rtt.as_micros() as u64,
                    })
                );
            } else {
                println!(
                    "lockbrokerd {} at {} answered in {} µs",
                    client.server_version(),
                    socket.display(),
                    rtt.as_micros()
                );
            }
            Ok(0)
        }
        Command::Break(a) => {
            let client = connect(&cli).await?;
            match client.break_lock(&a.name, a.hold).await {
                Ok(hold_ids) => {
                    if cli.json {
                        println!("{}", serde_json::json!({ "broken": hold_ids }));
                    } else {
                        for id in hold_ids {
                            println!("broke hold {id} of {:?}", a.name);
                        }
                    }
                    Ok(0)
                }
                Err(e) => Err(match e.code() {
                    Some(lockbroker::ErrorCode::NotHeld) => (exit::ERROR, e.to_string()),
                    _ => unavailable(e),
                }),
            }
        }
        Command::Metrics => {
            let client = connect(&cli).await?;
            match client.metrics().await {
                Ok(text) => {
                    print!("{text}");
                    Ok(0)
                }
                // A daemon that does not know the request ends the
                // connection (protocol: appended variants).
                Err(lockbroker::Error::ConnectionLost) => Err((
                    exit::UNAVAILABLE,
                    format!(
                        "lockbrokerd {} closed the connection: it is older than the metrics request",
                        client.server_version()
                    ),
                )),
                Err(e) => Err(unavailable(e)),
            }
        }
        Command::Run(a) => {
            let private = daemon::Private::start()
                .await
                .map_err(|e| (exit::UNAVAILABLE, e))?;
            let socket = private.socket().display().to_string();
            // Locks of an enclosing wrapper belong to another daemon.
            let inherited = [
                "LOCKBROKER_FENCE",
                "LOCKBROKER_HOLD",
                held::LOCK_ENV,
                held::LOCKS_ENV,
                held::ACTOR_ENV,
            ];
            let child = child::spawn(
                &a.command,
                &[(address::SOCKET_ENV, socket)],
                &inherited,
                false,
            )?;
            let status = child::wait_passing_term(child)
                .await
                .map_err(|e| (exit::ERROR, format!("waiting for the command: {e}")))?;
            drop(private);
            Ok(child::exit_code(status))
        }
        Command::State(command) => {
            let client = connect(&cli).await?;
            state_cmd::run(&client, command, cli.json).await
        }
        Command::Daemon(_) => unreachable!("handled before the runtime starts"),
        Command::Completions { .. } | Command::Man => {
            unreachable!("handled before the runtime starts")
        }
    }
}

/// Takes lock `lock` (its exclusive or its shared side) as `wait` says,
/// for `run`'s command (its lease and contention signal), if any.
async fn acquire_lock(
    client: &Client,
    lock: &LockKindArgs,
    wait: &WaitArgs,
    run: Option<&CommandArgs>,
) -> Result<Option<LockGuard>, Failure> {
    let what = if lock.shared { "shared lock" } else { "lock" };
    let mut rw = client.rwlock(lock.name.clone());
    let mut mutex = client.mutex(lock.name.clone());
    if run.is_some_and(|r| r.on_contended.is_some()) {
        rw = rw.notify_contended();
        mutex = mutex.notify_contended();
    }
    if let Some(lease) = run.and_then(|r| r.lease) {
        rw = rw.lease(lease);
        mutex = mutex.lease(lease);
    }
    wait_for(wait, what, &lock.name, |timeout| async move {
        match (lock.shared, timeout) {
            (true, None) => rw.read().await.map(Some),
            (true, Some(t)) => rw.read_timeout(t).await,
            (false, None) => mutex.acquire().await.map(Some),
            (false, Some(t)) => mutex.acquire_timeout(t).await,
        }
    })
    .await
}

/// Acquires with the `--timeout` / `--nonblock` of `wait`; `Ok(None)` (after
/// saying so on stderr) when the lock was not obtained.
async fn wait_for<F, Fut>(
    wait: &WaitArgs,
    what: &str,
    name: &str,
    acquire: F,
) -> Result<Option<LockGuard>, Failure>
where
    F: FnOnce(Option<Duration>) -> Fut,
    Fut: std::future::Future<Output = lockbroker::Result<Option<LockGuard>>>,
{
    let timeout = if wait.nonblock {
        Some(Duration::ZERO)
    } else {
        wait.timeout
    };
    let guard = acquire(timeout).await.map_err(|e| match e.code() {
        Some(lockbroker::ErrorCode::Deadlock) => (exit::DEADLOCK, e.to_string()),
        _ => unavailable(e),
    })?;
    if guard.is_none() {
        match timeout {
            Some(t) if !t.is_zero() => {
                eprintln!("lockbroker: {what} {name:?} not obtained within {t:?}")
            }
            _ => eprintln!("lockbroker: {what} {name:?} is busy"),
        }
    }
    Ok(guard)
}

/// Runs the command while `guard` is held, then releases it.
///
/// On Unix the command inherits the lock's connection (see
/// [`child::holding`]). When it exits, the lock is released at once, unless
/// processes it started still run and `--close` was not given: then, as
/// with `flock(1)`, the lock stays with them and ends (not abandoned) when
/// the last of them closes the connection. On Windows the command holds a
/// copy of the pipe handle that its children do not inherit: the lock ends
/// with the command.
async fn run_holding(
    client: &Client,
    guard: LockGuard,
    name: &str,
    run: &CommandArgs,
) -> Result<u8, Failure> {
    let command = &run.argv();
    let mut env = vec![
        ("LOCKBROKER_FENCE", guard.fence().to_string()),
        ("LOCKBROKER_HOLD", guard.hold_id().to_string()),
        (held::LOCK_ENV, name.to_owned()),
        (held::LOCKS_ENV, held::with(name, guard.fence())),
        // For deadlock detection the command runs within this wrapper.
        (held::ACTOR_ENV, held::command_actors()),
    ];
    let mut remove = Vec::new();
    if guard.abandoned() {
        env.push(("LOCKBROKER_ABANDONED", "1".into()));
    } else {
        remove.push("LOCKBROKER_ABANDONED");
    }
    #[cfg(unix)]
    {
        use child::holding;
        let fd = client.connection_fd();
        let mut running = match holding::spawn(command, &env, &remove, fd) {
            Ok(running) => running,
            Err(failure) => {
                // A clean release: the next holder must not be told this
                // lock was abandoned.
                let _ = guard.release().await;
                return Err(failure);
            }
        };
        let group = child::Group(running.pid());
        let outcome = child::supervise(
            running.wait(),
            &group,
            &guard,
            run.kill_grace,
            run.on_contended,
        )
        .await
        .map_err(|e| (exit::ERROR, format!("waiting for the command: {e}")))?;
        let status = match outcome {
            Outcome::LockLost => return Ok(exit::LOCK_LOST),
            Outcome::Exited(status) => status,
        };
        let left_running =
            !run.close && holding::descendants_remain(daemon::autostarted()) == Some(true);
        if left_running {
            if let Err(e) = client.release_on_close().await {
                eprintln!("lockbroker: {e}");
            }
            guard.keep_until_session_ends();
            // Exit before the client is dropped: dropping it shuts the
            // socket down for every process that shares it.
            std::process::exit(i32::from(child::exit_code(status)));
        } else {
            if let Err(e) = guard.release().await {
                eprintln!("lockbroker: releasing the lock: {e}");
            }
            if run.close {
                holding::shut_down(fd);
            }
        }
        Ok(child::exit_code(status))
    }
    #[cfg(windows)]
    {
        use child::holding;
        let handle = client.connection_handle();
        let mut running = match holding::spawn(command, &env, &remove, handle) {
            Ok(running) => running,
            Err(failure) => {
                let _ = guard.release().await;
                return Err(failure);
            }
        };
        let outcome = {
            // The tree borrows the job while `wait` borrows the child.
            let (wait_on, tree) = running.split();
            child::supervise(wait_on, &tree, &guard, run.kill_grace, run.on_contended)
                .await
                .map_err(|e| (exit::ERROR, format!("waiting for the command: {e}")))?
        };
        let status = match outcome {
            Outcome::LockLost => return Ok(exit::LOCK_LOST),
            Outcome::Exited(status) => status,
        };
        // The command's copy of the pipe handle is not inheritable (so no
        // daemon it starts can keep the lock for ever): the lock cannot
        // outlive the command, and what it left running never holds it,
        // as with `--close` on Unix.
        if let Err(e) = guard.release().await {
            eprintln!("lockbroker: releasing the lock: {e}");
        }
        Ok(child::exit_code(status))
    }
}

/// The failure `e` is: 77 for a refusal the daemon's access rules made
/// (`forbidden`), else 69 (the daemon cannot be reached, or refused).
pub(crate) fn unavailable(e: lockbroker::Error) -> Failure {
    let message = match &e {
        lockbroker::Error::Untrusted(u) if u.problem == address::Problem::Server => {
            format!("{e} (--allow-uid {} trusts it)", u.owner)
        }
        _ => e.to_string(),
    };
    match e.code() {
        Some(lockbroker::ErrorCode::Forbidden) => (exit::FORBIDDEN, message),
        _ => (exit::UNAVAILABLE, message),
    }
}

async fn connect(cli: &Cli) -> Result<Client, Failure> {
    Ok(connect_with_address(cli).await?.0)
}

/// Connects as the global options say, starting the local daemon when
/// nobody answers at the local scope's default socket.
fn scope_of(cli: &Cli) -> Scope {
    match cli.scope {
        ScopeArg::Process => Scope::Process,
        ScopeArg::Local => Scope::Local,
        ScopeArg::Global => Scope::Global,
    }
}

/// The connector the global options describe: socket or scope, and the
/// users trusted besides the defaults.
fn connector_of(cli: &Cli) -> Connector {
    let mut connector = Connector::new()
        .scope(scope_of(cli))
        .actor(held::actor())
        .within(held::within().iter().copied());
    if let Some(socket) = &cli.socket {
        connector = connector.socket(socket);
    }
    cli.allow_uid
        .iter()
        .fold(connector, |c, &uid| c.allow_server_uid(uid))
}

async fn connect_with_address(cli: &Cli) -> Result<(Client, std::path::PathBuf), Failure> {
    let scope = scope_of(cli);
    let connector = connector_of(cli).client_name(client_name(cli));
    let socket = connector.address().map_err(unavailable)?;
    match connector.connect().await {
        Ok(client) => Ok((client, socket)),
        Err(e) if e.nobody_listens() && may_autostart(cli, scope) => {
            let client = daemon::autostart(&connector, &socket)
                .await
                .map_err(|e| (exit::UNAVAILABLE, e))?;
            Ok((client, socket))
        }
        Err(e) => Err(unavailable(e)),
    }
}

/// Autostart only for the local scope's own default socket.
fn may_autostart(cli: &Cli, scope: Scope) -> bool {
    let disabled = std::env::var_os(NO_AUTOSTART_ENV).is_some_and(|v| !v.is_empty() && v != "0");
    let socket_named = std::env::var_os(address::SOCKET_ENV).is_some_and(|v| !v.is_empty());
    scope == Scope::Local && cli.socket.is_none() && !socket_named && !cli.no_autostart && !disabled
}

/// Which process a wrapper's session stands for, as `status` finds it: the
/// wrapper's child (`lock`, `sem`: the command) or its parent (`hold`: the
/// script that reads it).
pub(crate) enum Role {
    Child,
    Parent,
}

/// What separates a wrapper's own words from its command's in its client
/// name.
const COMMAND_MARK: &str = " -- ";

/// A wrapper's client name (`lockbroker lock NAME -- COMMAND`) read back:
/// whose command it names, and the command.
pub(crate) fn wrapped_command(client_name: &str) -> Option<(Role, &str)> {
    let rest = client_name.strip_prefix("lockbroker ")?;
    let role = if rest.starts_with("hold ") {
        Role::Parent
    } else if rest.starts_with("lock ") || rest.starts_with("sem ") {
        Role::Child
    } else {
        return None;
    };
    let (_, command) = rest.split_once(COMMAND_MARK)?;
    Some((role, command))
}

/// Words as a shell would read them back: plain ones as they are, others
/// in single quotes.
pub(crate) fn shell_words(words: &[String]) -> String {
    let plain = |w: &str| {
        !w.is_empty()
            && w.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c))
    };
    words
        .iter()
        .map(|w| {
            if plain(w) {
                w.clone()
            } else {
                format!("'{}'", w.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The command line a wrapper's client name carries.
fn command_words(argv: &[std::ffi::OsString]) -> String {
    let words: Vec<String> = argv
        .iter()
        .map(|w| w.to_string_lossy().into_owned())
        .collect();
    shell_words(&words)
}

/// `lockbroker lock NAME -- CMD` shows as itself in `status`, which reads
/// the command back from it (`hold` names the script it serves).
fn client_name(cli: &Cli) -> String {
    let what = match &cli.command {
        Command::Lock(a) => format!(
            "lockbroker lock {}{COMMAND_MARK}{}",
            a.lock.name,
            command_words(&a.command.argv())
        ),
        Command::Hold(a) => {
            #[cfg(unix)]
            // SAFETY: getppid has no preconditions.
            let script = status::proc_cmdline(unsafe { libc::getppid() } as u32);
            #[cfg(not(unix))]
            let script: Option<String> = None;
            match script {
                Some(script) => format!("lockbroker hold {}{COMMAND_MARK}{script}", a.lock.name),
                None => format!("lockbroker hold {}", a.lock.name),
            }
        }
        Command::Sem(a) => format!(
            "lockbroker sem {}{COMMAND_MARK}{}",
            a.name,
            command_words(&a.command.argv())
        ),
        Command::Status(_) => "lockbroker status".into(),
        Command::Ping => "lockbroker ping".into(),
        Command::Metrics => "lockbroker metrics".into(),
        Command::Break(a) => format!("lockbroker break {}", a.name),
        Command::Run(_) => "lockbroker run".into(),
        Command::Daemon(_) => "lockbroker daemon".into(),
        Command::Completions { .. } | Command::Man => "lockbroker".into(),
        Command::State(_) => "lockbroker state".into(),
    };
    let mut name: String = what.chars().filter(|c| !c.is_control()).collect();
    while name.len() > 255 {
        name.pop();
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrappers_client_name_reads_back_as_its_command() {
        let words: Vec<String> = ["sh", "-c", "echo 'hi' $x", ""].map(String::from).into();
        let line = shell_words(&words);
        assert_eq!(line, r#"sh -c 'echo '\''hi'\'' $x' ''"#);
        let name = format!("lockbroker lock deploy{COMMAND_MARK}{line}");
        assert!(matches!(wrapped_command(&name), Some((Role::Child, c)) if c == line));
        assert!(matches!(
            wrapped_command("lockbroker hold cfg -- bash x.sh"),
            Some((Role::Parent, "bash x.sh"))
        ));
        assert!(wrapped_command("lockbroker status").is_none());
        assert!(wrapped_command("python3 app.py -- x").is_none());
    }
}
