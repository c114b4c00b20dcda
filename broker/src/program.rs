//! The `lockbrokerd` program: flags → config → bind → serve until SIGTERM
//! or SIGINT (a console event on Windows, or the service control manager's
//! stop when it runs as a Windows service). `main.rs` is just [`main`], so
//! that test packages can build the same program as a binary of their own.

use std::process::ExitCode;

use crate::config::{Cli, Config, LogFormat};
use crate::error::{EXIT_ALREADY_RUNNING, StartError};
use crate::logfile::LogFile;
use crate::{server, transport::Listener};
use anyhow::Context;
use lockbroker_proto::address::Env;
use tracing_subscriber::EnvFilter;

/// Runs `lockbrokerd` with this process's arguments; its exit status.
pub fn main() -> ExitCode {
    let cli = match crate::config::parse_with_file(std::env::args_os().collect()) {
        Ok(cli) => cli,
        Err(e) => {
            eprintln!("lockbrokerd: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lockbrokerd: {e:#}");
            match e.downcast_ref::<StartError>() {
                Some(StartError::AlreadyRunning { .. }) => ExitCode::from(EXIT_ALREADY_RUNNING),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(shell) = cli.completions {
        let mut command = <Cli as clap::CommandFactory>::command();
        clap_complete::generate(shell, &mut command, "lockbrokerd", &mut std::io::stdout());
        return Ok(());
    }
    if cli.man {
        clap_mangen::Man::new(<Cli as clap::CommandFactory>::command())
            .render(&mut std::io::stdout())
            .context("writing the man page")?;
        return Ok(());
    }
    #[cfg(windows)]
    if cli.install_service || cli.uninstall_service || cli.service {
        return windows_service(cli);
    }
    lockbroker_proto::os::raise_fd_limit();
    let mut config = Config::from_cli(cli, &Env::current())?;
    config.systemd = crate::systemd::Systemd::from_env();
    match &config.log_file {
        Some((path, max)) => {
            let log = LogFile::open(path, *max, true)?;
            init_logging(&config, log, false)?;
        }
        None => {
            use std::io::IsTerminal;
            init_logging(&config, std::io::stderr, std::io::stderr().is_terminal())?;
        }
    }
    // Signal handlers before the socket exists: once a client can
    // connect, SIGTERM and SIGINT shut the daemon down cleanly rather
    // than kill it with the socket file left behind.
    serve(&config, || Ok(Signals::install()?.recv()), || {})
}

/// Serves `config` until the future `shutdown` makes (within the runtime,
/// before the socket exists) completes; `listening` is called once
/// clients can connect.
pub(crate) fn serve<Fut: std::future::Future>(
    config: &Config,
    shutdown: impl FnOnce() -> anyhow::Result<Fut>,
    listening: impl FnOnce(),
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.workers)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        let shutdown = shutdown()?;
        // State first: a daemon that cannot load it must not listen.
        let server = server::Server::new(config).await?;
        let listener = bind(config)?;
        listening();
        server.run(listener, shutdown).await;
        Ok(())
    })
}

/// `--install-service`, `--uninstall-service` and `--service`.
#[cfg(windows)]
fn windows_service(cli: Cli) -> anyhow::Result<()> {
    let name = cli.service_name.clone();
    if cli.install_service {
        let mut args: Vec<std::ffi::OsString> = std::env::args_os()
            .skip(1)
            .filter(|a| a != "--install-service")
            .collect();
        // A service serves every user: the global pipe, unless told.
        let named = |flag: &str| {
            args.iter().any(|a| {
                a.to_str()
                    .is_some_and(|a| a == flag || a.starts_with(&format!("{flag}=")))
            })
        };
        if !named("--socket") && !named("--scope") {
            args.extend(["--scope".into(), "global".into()]);
        }
        crate::service::install(&name, args)?;
        println!("lockbrokerd: installed the service {name}; start it with `sc start {name}`");
        return Ok(());
    }
    if cli.uninstall_service {
        crate::service::uninstall(&name)?;
        println!("lockbrokerd: removed the service {name}");
        return Ok(());
    }
    let config = Config::from_cli(cli, &Env::current())?;
    // A service has no console: its log is a file.
    let dir = std::path::PathBuf::from(
        std::env::var_os("ProgramData").unwrap_or_else(|| r"C:\ProgramData".into()),
    )
    .join("lockbroker");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{name}.log"));
    let (path, max) = config
        .log_file
        .clone()
        .unwrap_or((path, crate::logfile::DEFAULT_MAX));
    init_logging(&config, LogFile::open(&path, max, false)?, false)?;
    crate::service::run(name, config)
}

/// The socket systemd passed, else the configured one.
fn bind(config: &Config) -> anyhow::Result<Listener> {
    #[cfg(unix)]
    if let Some(std) = crate::systemd::listen_socket().context("socket activation")? {
        tracing::info!(
            version = crate::VERSION,
            "listening on the socket passed by systemd"
        );
        return Ok(Listener::from_std(std)?);
    }
    let listener = Listener::bind(&config.socket, config.scope)?;
    tracing::info!(socket = %config.socket.display(), version = crate::VERSION, commit = crate::COMMIT, "listening");
    Ok(listener)
}

/// Logs to `writer`: stderr, or a log file (`--log-file`, a service's). Colours (`ansi`)
/// only for a person watching, not for journald or a log file.
fn init_logging<W>(config: &Config, writer: W, ansi: bool) -> anyhow::Result<()>
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    let filter = match &config.log_level {
        Some(level) => EnvFilter::try_new(level).context("invalid --log-level")?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    match config.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

/// SIGTERM and SIGINT; on Windows the console's events (Ctrl-C,
/// Ctrl-Break, its window closed, logoff, shutdown). Installed at once.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(windows)]
    c: tokio::signal::windows::CtrlC,
    #[cfg(windows)]
    brk: tokio::signal::windows::CtrlBreak,
    #[cfg(windows)]
    close: tokio::signal::windows::CtrlClose,
    #[cfg(windows)]
    logoff: tokio::signal::windows::CtrlLogoff,
    #[cfg(windows)]
    shutdown: tokio::signal::windows::CtrlShutdown,
}

impl Signals {
    /// Installs the handlers; from here on none of them kills the
    /// process. Must run within the runtime.
    fn install() -> anyhow::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Signals {
                term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
                int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            })
        }
        // For a closed window, a logoff or a shutdown, Windows waits (up to
        // its timeout) while the handler runs, and Tokio's handler blocks
        // until the process exits: the sessions are told and released
        // before the system ends the process.
        #[cfg(windows)]
        {
            use tokio::signal::windows as w;
            Ok(Signals {
                c: w::ctrl_c().context("installing the Ctrl-C handler")?,
                brk: w::ctrl_break().context("installing the Ctrl-Break handler")?,
                close: w::ctrl_close().context("installing the console-close handler")?,
                logoff: w::ctrl_logoff().context("installing the logoff handler")?,
                shutdown: w::ctrl_shutdown().context("installing the shutdown handler")?,
            })
        }
    }

    /// Completes on the first of them.
    async fn recv(mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => tracing::info!("SIGTERM received"),
            _ = self.int.recv() => tracing::info!("SIGINT received"),
        }
        // Not `tokio::signal::ctrl_c()`: it would install its handler only
        // when first polled, after the pipe exists.
        #[cfg(windows)]
        tokio::select! {
            _ = self.c.recv() => tracing::info!("Ctrl-C received"),
            _ = self.brk.recv() => tracing::info!("Ctrl-Break received"),
            _ = self.close.recv() => tracing::info!("the console was closed"),
            _ = self.logoff.recv() => tracing::info!("the user is logging off"),
            _ = self.shutdown.recv() => tracing::info!("the system is shutting down"),
        }
    }
}
