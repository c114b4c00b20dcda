//! The `lockbrokerd` program: flags → config → bind → serve until SIGTERM
//! or SIGINT (a console event on Windows). `main.rs` is just [`main`], so
//! that test packages can build the same program as a binary of their own.

use std::process::ExitCode;

use crate::config::{Cli, Config, LogFormat};
use crate::error::{EXIT_ALREADY_RUNNING, StartError};
use crate::{server, transport::Listener};
use anyhow::Context;
use clap::Parser;
use lockbroker_proto::address::Env;
use tracing_subscriber::EnvFilter;

/// Runs `lockbrokerd` with this process's arguments; its exit status.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
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
    lockbroker_proto::os::raise_fd_limit();
    let mut config = Config::from_cli(cli, &Env::current())?;
    config.systemd = crate::systemd::Systemd::from_env();
    init_logging(&config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.workers)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        // Signal handlers before the socket exists: once a client can
        // connect, SIGTERM and SIGINT shut the daemon down cleanly rather
        // than kill it with the socket file left behind.
        let shutdown = Signals::install()?;
        // State first: a daemon that cannot load it must not listen.
        let server = server::Server::new(&config)?;
        let listener = bind(&config)?;
        server.run(listener, shutdown.recv()).await;
        Ok(())
    })
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
    tracing::info!(socket = %config.socket.display(), version = crate::VERSION, "listening");
    Ok(listener)
}

fn init_logging(config: &Config) -> anyhow::Result<()> {
    let filter = match &config.log_level {
        Some(level) => EnvFilter::try_new(level).context("invalid --log-level")?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    use std::io::IsTerminal;
    // Colours only for a person watching, not for journald or a log file.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
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
