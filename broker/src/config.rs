//! Configuration: the raw command-line flags ([`Cli`]) and the validated
//! [`Config`] passed down to the server.
//!
//! Flags are parsed once, here, into a validated [`Config`]; nothing
//! deeper reads the command line or the environment.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use lockbroker_proto::address::{self, Env, Scope};
use lockbroker_proto::{DEFAULT_MAX_FRAME_LEN, MIN_MAX_FRAME_LEN};

use crate::error::StartError;
use crate::metrics::http::MetricsAddr;
use crate::state::StateConfig;

/// Default cap on open connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Default cap on one session's waiting acquires.
pub const DEFAULT_MAX_PENDING: u32 = 1024;
/// Default cap on one session's holds.
pub const DEFAULT_MAX_HOLDS: u32 = 65536;
/// How long a new connection has to send its `Hello`.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default number of entries an `Inspect` returns when it names no limit.
pub const DEFAULT_INSPECT_LIMIT: u32 = 1000;
/// Largest number of entries one `Inspect` may ask for.
pub const MAX_INSPECT_LIMIT: u32 = 100_000;
/// Default cap on idle names kept only for their abandoned flag: one
/// session's worth of holds (`--max-holds`), about 200 bytes each, so
/// about 13 MiB at most.
pub const DEFAULT_MAX_ABANDONED: usize = 65_536;

/// `lockbrokerd`: serve named mutexes, semaphores and rwlocks on a local
/// socket.
///
/// Example: `lockbrokerd --socket /tmp/demo.sock --log-level debug`
#[derive(Debug, Clone, Parser)]
#[command(
    name = "lockbrokerd",
    version = crate::LONG_VERSION.as_str(),
    about,
    long_about = None,
    after_help = "Exit status: 0 after SIGTERM or SIGINT; 3 when another lockbrokerd already \
serves the socket; 1 for any other failure to start (the reason is the last line on stderr)."
)]
pub struct Cli {
    /// Serve this socket path (overrides --scope).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// Serve the default socket of this scope.
    #[arg(long, value_enum, default_value_t = ScopeArg::Local)]
    pub scope: ScopeArg,

    /// Most connections open at once; more are refused with an error.
    #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS, value_name = "N")]
    pub max_connections: usize,

    /// Most acquires one session may have waiting at once.
    #[arg(long, default_value_t = DEFAULT_MAX_PENDING, value_name = "N")]
    pub max_pending: u32,

    /// Most holds (plus waiting acquires) one session may have.
    #[arg(long, default_value_t = DEFAULT_MAX_HOLDS, value_name = "N")]
    pub max_holds: u32,

    /// Largest frame body accepted or sent, in bytes.
    #[arg(long, default_value_t = DEFAULT_MAX_FRAME_LEN, value_name = "BYTES")]
    pub max_frame_len: u32,

    /// Most idle names whose abandoned flag is remembered (a session ended
    /// holding them, and nobody took them since). Past this the oldest
    /// flag is forgotten first, and that name's next grant does not report
    /// the abandonment; names held or waited for always keep their flag.
    #[arg(long, default_value_t = DEFAULT_MAX_ABANDONED, value_name = "N")]
    pub max_abandoned: usize,

    /// Runtime worker threads (1 avoids a cross-thread hop per grant).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub workers: usize,

    /// Log level or filter (e.g. `info`, `lockbrokerd=debug`); RUST_LOG is
    /// used when this is not given.
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,

    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log to this file instead of stderr (stdout and stderr go there too,
    /// on Unix). When the next line would take it past --log-file-max
    /// bytes, it becomes FILE.1, replacing the one before, and a new FILE
    /// is begun.
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,

    /// The size at which --log-file turns over.
    #[arg(long, value_name = "BYTES", default_value_t = crate::logfile::DEFAULT_MAX)]
    pub log_file_max: u64,

    /// Keep shared state in this directory (an embedded database), so it
    /// survives restarts; without it, state lives in memory.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Largest state value, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = StateConfig::default().max_value_len)]
    pub max_value_len: u32,

    /// Most state keys one user (peer uid) may own.
    #[arg(long, value_name = "N", default_value_t = StateConfig::default().max_keys_per_user)]
    pub state_keys_per_user: u64,

    /// Most bytes of state (keys and values) one user may own.
    #[arg(long, value_name = "BYTES", default_value_t = StateConfig::default().max_bytes_per_user)]
    pub state_bytes_per_user: u64,

    /// Most state keys in all.
    #[arg(long, value_name = "N", default_value_t = StateConfig::default().max_keys)]
    pub state_max_keys: u64,

    /// Most bytes of state in all.
    #[arg(long, value_name = "BYTES", default_value_t = StateConfig::default().max_bytes)]
    pub state_max_bytes: u64,

    /// Recent state changes kept for watchers; a watcher further behind is
    /// told it lagged.
    #[arg(long, value_name = "N", default_value_t = StateConfig::default().history)]
    pub watch_history: usize,

    /// Serve the metrics (OpenMetrics text, `GET /metrics` over HTTP) on
    /// this TCP address (e.g. `127.0.0.1:9464`) or Unix socket path
    /// (anything with a `/`). Off by default; `lockbroker metrics` prints
    /// the same through the daemon's own socket.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<MetricsAddr>,

    /// Access rules (TOML): who may acquire, inspect, read and write state,
    /// watch and break, by name prefix (README, Access control). Without
    /// it everything is allowed.
    #[arg(long, value_name = "FILE")]
    pub acl: Option<PathBuf>,

    /// Members of this group (a name or a gid; Unix) may break any hold
    /// (`lockbroker break`), as root may; everyone else only holds of
    /// their own user. Meant for the global scope's daemon.
    #[arg(long, value_name = "GROUP")]
    pub admin_group: Option<String>,

    /// Where the locks are kept: this daemon's memory (`local`), or an etcd
    /// cluster shared with the daemons of other hosts (`etcd`).
    #[arg(long, value_enum, default_value_t = BackendArg::Local)]
    pub backend: BackendArg,

    /// `--backend etcd`: the client URLs of the cluster's members,
    /// comma-separated (e.g. `http://10.0.0.1:2379,http://10.0.0.2:2379`).
    #[arg(long, value_name = "URL[,URL...]", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,

    /// `--backend etcd`: every key lockbroker writes starts with this;
    /// daemons share their locks when they name the same cluster and
    /// prefix.
    #[arg(long, value_name = "P", default_value = DEFAULT_ETCD_PREFIX)]
    pub etcd_prefix: String,

    /// `--backend etcd`: the TTL of each session's lease, e.g. `10s` or
    /// `1m`: how long the locks of a daemon (or host) that died or was cut
    /// off stay held. Whole seconds, at least 1.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub lease_ttl: Duration,

    /// `--backend etcd`: TLS, trusting the CA certificate in this PEM file.
    #[arg(long, value_name = "PATH")]
    pub etcd_ca_cert: Option<PathBuf>,

    /// `--backend etcd`: TLS client certificate (PEM), with --etcd-key.
    #[arg(long, value_name = "PATH", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,

    /// `--backend etcd`: TLS client private key (PEM), with --etcd-cert.
    #[arg(long, value_name = "PATH", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,

    /// `--backend etcd`: the etcd user to authenticate as; the password is
    /// read from the file --etcd-password-file names.
    #[arg(long, value_name = "NAME", requires = "etcd_password_file")]
    pub etcd_user: Option<String>,

    /// `--backend etcd`: a file holding the etcd user's password (its
    /// first line), so that it appears in no process listing.
    #[arg(long, value_name = "PATH", requires = "etcd_user")]
    pub etcd_password_file: Option<PathBuf>,

    /// Read flags from this TOML file: each key is a flag's long name
    /// (`log-level = "info"`, `etcd-endpoints = ["http://a:2379"]`); a
    /// flag given on the command line overrides the file's.
    #[arg(long, value_name = "FILE", conflicts_with = "config_if_exists")]
    pub config: Option<PathBuf>,

    /// As --config, when FILE exists (the systemd units name
    /// /etc/lockbroker/lockbrokerd.toml so).
    #[arg(long, value_name = "FILE")]
    pub config_if_exists: Option<PathBuf>,

    /// Print this shell's completions for lockbrokerd's flags, then exit
    /// (bash, zsh, fish, elvish, powershell).
    #[arg(long, value_name = "SHELL")]
    pub completions: Option<clap_complete::Shell>,

    /// Print lockbrokerd's man page (roff), then exit.
    #[arg(long, conflicts_with = "completions")]
    pub man: bool,

    /// Windows: install lockbrokerd as a service (started at boot, as
    /// SYSTEM) that runs with the other flags given here, then exit.
    #[cfg(windows)]
    #[arg(long, conflicts_with_all = ["uninstall_service", "service"])]
    pub install_service: bool,

    /// Windows: stop and remove the service, then exit.
    #[cfg(windows)]
    #[arg(long, conflicts_with = "service")]
    pub uninstall_service: bool,

    /// Windows: run under the service control manager (how the installed
    /// service starts; not for use by hand). Logs go to
    /// `%ProgramData%\lockbroker\<service name>.log`.
    #[cfg(windows)]
    #[arg(long, hide = true)]
    pub service: bool,

    /// Windows: the service's name.
    #[cfg(windows)]
    #[arg(long, value_name = "NAME", default_value = "lockbroker")]
    pub service_name: String,
}

/// Flags a config file may not set: the file's own, and those that make
/// the program do something else than serve.
const NOT_IN_FILE: [&str; 7] = [
    "config",
    "config_if_exists",
    "completions",
    "man",
    "install_service",
    "uninstall_service",
    "service",
];

/// Parses `args` (the program's name first) with the flags of the file
/// `--config` or `--config-if-exists` names under them: every flag the
/// command line does not give is taken from the file, so the command
/// line overrides it. Usage errors exit as clap's do; a file that cannot
/// be read, is not TOML, or has a key that is no flag is an error naming
/// the file and the key.
pub fn parse_with_file(args: Vec<std::ffi::OsString>) -> anyhow::Result<Cli> {
    use anyhow::Context as _;
    use clap::CommandFactory as _;
    let mut command = Cli::command();
    // Built, so that each flag knows whether it takes a value.
    command.build();
    let given = command.clone().get_matches_from(args.clone());
    let path = match (
        given.get_one::<PathBuf>("config"),
        given.get_one::<PathBuf>("config_if_exists"),
    ) {
        (Some(path), _) => path.clone(),
        (None, Some(path)) if path.exists() => path.clone(),
        _ => return Ok(Cli::parse_from(args)),
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read the config file {}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("{} is not a valid TOML file", path.display()))?;
    let mut from_file: Vec<std::ffi::OsString> = Vec::new();
    for (key, value) in &table {
        let arg = command
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()))
            .filter(|a| !NOT_IN_FILE.contains(&a.get_id().as_str()))
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: unknown key {key:?} (the keys are lockbrokerd's flags without \
                     the leading --, as `lockbrokerd --help` lists them)",
                    path.display()
                )
            })?;
        let id = arg.get_id().as_str();
        if given.value_source(id) == Some(clap::parser::ValueSource::CommandLine) {
            continue;
        }
        let flag = format!("--{key}");
        let bad = || {
            anyhow::anyhow!(
                "{}: key {key:?} has a value of the wrong type",
                path.display()
            )
        };
        let text = |v: &toml::Value| match v {
            toml::Value::String(s) => Some(s.clone()),
            toml::Value::Integer(i) => Some(i.to_string()),
            toml::Value::Float(f) => Some(f.to_string()),
            _ => None,
        };
        let takes_values = arg.get_num_args().is_some_and(|n| n.takes_values());
        match value {
            toml::Value::Boolean(_) if takes_values => return Err(bad()),
            toml::Value::Boolean(true) => from_file.push(flag.into()),
            toml::Value::Boolean(false) => {}
            _ if !takes_values => return Err(bad()),
            toml::Value::Array(items) => {
                let items: Option<Vec<String>> = items.iter().map(text).collect();
                from_file.push(flag.into());
                from_file.push(items.ok_or_else(bad)?.join(",").into());
            }
            other => {
                from_file.push(flag.into());
                from_file.push(text(other).ok_or_else(bad)?.into());
            }
        }
    }
    let mut merged = args;
    // After the program's name: the file's flags, then the command line's.
    let rest = merged.split_off(1.min(merged.len()));
    merged.extend(from_file);
    merged.extend(rest);
    Cli::try_parse_from(merged).map_err(|e| {
        anyhow::anyhow!(
            "{} (with the flags of {})",
            e.to_string().trim_end(),
            path.display()
        )
    })
}

/// `--scope` values the daemon serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScopeArg {
    /// One user's login session.
    Local,
    /// Every user of the machine.
    Global,
}

/// `--backend` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    /// This daemon's own memory: the locks of one host.
    Local,
    /// An etcd cluster, shared with the daemons of other hosts.
    Etcd,
}

/// The default `--etcd-prefix`.
pub const DEFAULT_ETCD_PREFIX: &str = "/lockbroker";

/// Parses `500ms`, `10s`, `2m` or `1h` (a bare number is seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 10s, 500ms or 2m"))?;
    let ms = match unit {
        "ms" => Some(n),
        "" | "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => return Err(format!("{text:?}: the unit must be ms, s, m or h")),
    };
    ms.map(Duration::from_millis)
        .ok_or_else(|| format!("{text:?} is too long"))
}

/// Where the locks are kept.
#[derive(Debug, Clone)]
pub enum BackendConfig {
    /// In this daemon's memory.
    Local,
    /// In an etcd cluster.
    Etcd(Box<EtcdConfig>),
}

/// How to reach an etcd cluster, and the daemon's part in it.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// Client URLs of the cluster's members.
    pub endpoints: Vec<String>,
    /// Every key lockbroker writes starts with this.
    pub prefix: String,
    /// The TTL of each session's lease (whole seconds).
    pub lease_ttl: Duration,
    /// TLS: the CA certificate to trust.
    pub ca_cert: Option<PathBuf>,
    /// TLS: the client's certificate and private key.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// User name and password, for a cluster with authentication on.
    pub user: Option<(String, String)>,
}

impl EtcdConfig {
    /// A cluster at `endpoints`, with the default prefix and a lease TTL
    /// of `lease_ttl`.
    pub fn new(endpoints: Vec<String>, prefix: &str, lease_ttl: Duration) -> EtcdConfig {
        EtcdConfig {
            endpoints,
            prefix: prefix.to_owned(),
            lease_ttl,
            ca_cert: None,
            identity: None,
            user: None,
        }
    }
}

/// `--log-format` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Limits applied to every session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// Most waiting acquires.
    pub max_pending: u32,
    /// Most holds plus waiting acquires.
    pub max_holds: u32,
    /// Largest frame body.
    pub max_frame_len: u32,
    /// Time allowed for the `Hello`.
    pub handshake_timeout: Duration,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            max_pending: DEFAULT_MAX_PENDING,
            max_holds: DEFAULT_MAX_HOLDS,
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
            handshake_timeout: HANDSHAKE_TIMEOUT,
        }
    }
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The socket path (or pipe name) to serve.
    pub socket: PathBuf,
    /// The scope, when the socket is a scope default: its directory is
    /// created and checked.
    pub scope: Option<Scope>,
    /// Most open connections.
    pub max_connections: usize,
    /// Per-session limits.
    pub limits: SessionLimits,
    /// Most idle names kept for their abandoned flag.
    pub max_abandoned: usize,
    /// Runtime worker threads.
    pub workers: usize,
    /// Log filter, if given by flag.
    pub log_level: Option<String>,
    /// Log format.
    pub log_format: LogFormat,
    /// The log file, if not stderr, and the size at which it turns over.
    pub log_file: Option<(PathBuf, u64)>,
    /// What systemd asked for (nothing, outside systemd).
    pub systemd: crate::systemd::Systemd,
    /// Shared state: storage and limits.
    pub state: StateConfig,
    /// Where the locks are kept.
    pub backend: BackendConfig,
    /// Members of this group may break any hold.
    pub admin_gid: Option<u32>,
    /// Who may do what to which names (`--acl`).
    pub acl: Option<std::sync::Arc<crate::acl::Acl>>,
    /// Where the metrics are served over HTTP, if anywhere.
    pub metrics_listen: Option<MetricsAddr>,
}

impl Config {
    /// A configuration with default limits serving `socket`.
    pub fn for_socket(socket: impl Into<PathBuf>) -> Config {
        Config {
            socket: socket.into(),
            scope: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            limits: SessionLimits::default(),
            max_abandoned: DEFAULT_MAX_ABANDONED,
            workers: 1,
            log_level: None,
            log_format: LogFormat::Text,
            log_file: None,
            systemd: Default::default(),
            state: StateConfig::default(),
            backend: BackendConfig::Local,
            metrics_listen: None,
            admin_gid: None,
            acl: None,
        }
    }

    /// Validates the flags against the process environment `env`.
    pub fn from_cli(cli: Cli, env: &Env) -> Result<Config, StartError> {
        let bad = |msg: String| Err(StartError::Config(msg));
        if cli.max_connections == 0 {
            return bad("--max-connections must be at least 1".into());
        }
        if cli.max_pending == 0 || cli.max_holds == 0 {
            return bad("--max-pending and --max-holds must be at least 1".into());
        }
        if cli.max_frame_len < MIN_MAX_FRAME_LEN {
            return bad(format!(
                "--max-frame-len must be at least {MIN_MAX_FRAME_LEN}"
            ));
        }
        if cli.log_file_max < 4096 {
            return bad("--log-file-max must be at least 4096".into());
        }
        if cli.workers == 0 {
            return bad("--workers must be at least 1".into());
        }
        if cli.watch_history == 0 {
            return bad("--watch-history must be at least 1".into());
        }
        // An increment stores up to 20 bytes ("-9223372036854775808").
        if cli.max_value_len < 64 {
            return bad("--max-value-len must be at least 64".into());
        }
        // A value must fit in a frame with its key and the message around it.
        if u64::from(cli.max_value_len) + 1024 > u64::from(cli.max_frame_len) {
            return bad(format!(
                "--max-value-len {} does not fit in --max-frame-len {} (leave 1024 bytes)",
                cli.max_value_len, cli.max_frame_len
            ));
        }
        let backend = backend_config(&cli)?;
        let admin_gid = match &cli.admin_group {
            None => None,
            Some(group) => match crate::identity::group_id(group) {
                Ok(gid) => Some(gid),
                Err(e) => return bad(format!("--admin-group {group:?}: {e}")),
            },
        };
        let acl = match &cli.acl {
            None => None,
            Some(path) => match crate::acl::Acl::load(path) {
                Ok(acl) => Some(std::sync::Arc::new(acl)),
                Err(e) => return bad(format!("--acl {}: {e}", path.display())),
            },
        };
        let scope = match cli.scope {
            ScopeArg::Local => Scope::Local,
            ScopeArg::Global => Scope::Global,
        };
        let (socket, scope) = match cli.socket {
            Some(path) => (path, None),
            None => (
                address::default_address(scope, env).expect("local and global have defaults"),
                Some(scope),
            ),
        };
        Ok(Config {
            socket,
            scope,
            max_connections: cli.max_connections,
            limits: SessionLimits {
                max_pending: cli.max_pending,
                max_holds: cli.max_holds,
                max_frame_len: cli.max_frame_len,
                handshake_timeout: HANDSHAKE_TIMEOUT,
            },
            max_abandoned: cli.max_abandoned,
            workers: cli.workers,
            log_level: cli.log_level,
            log_format: cli.log_format,
            log_file: cli.log_file.map(|path| (path, cli.log_file_max)),
            systemd: Default::default(),
            state: StateConfig {
                dir: cli.state_dir,
                max_value_len: cli.max_value_len,
                max_keys_per_user: cli.state_keys_per_user,
                max_bytes_per_user: cli.state_bytes_per_user,
                max_keys: cli.state_max_keys,
                max_bytes: cli.state_max_bytes,
                history: cli.watch_history,
            },
            backend,
            metrics_listen: cli.metrics_listen,
            admin_gid,
            acl,
        })
    }
}

/// `--backend` and the etcd flags, checked.
fn backend_config(cli: &Cli) -> Result<BackendConfig, StartError> {
    let bad = |msg: &str| Err(StartError::Config(msg.into()));
    let etcd_flags = !cli.etcd_endpoints.is_empty()
        || cli.etcd_ca_cert.is_some()
        || cli.etcd_cert.is_some()
        || cli.etcd_user.is_some();
    match cli.backend {
        BackendArg::Local if etcd_flags => bad("the --etcd-* flags need --backend etcd"),
        BackendArg::Local => Ok(BackendConfig::Local),
        BackendArg::Etcd if !cfg!(feature = "etcd") => {
            bad("this lockbrokerd was built without the etcd backend (cargo feature `etcd`)")
        }
        BackendArg::Etcd => {
            if cli.state_dir.is_some() {
                return bad(
                    "--state-dir keeps state on this host; with --backend etcd it lives in etcd",
                );
            }
            if cli.etcd_endpoints.iter().all(|e| e.trim().is_empty()) {
                return bad("--backend etcd needs --etcd-endpoints URL[,URL...]");
            }
            let prefix = cli.etcd_prefix.trim_end_matches('/');
            if prefix.is_empty() || !prefix.starts_with('/') {
                return bad("--etcd-prefix must start with / and name more than the root");
            }
            let ttl = cli.lease_ttl;
            if ttl < Duration::from_secs(1) || ttl.subsec_millis() != 0 {
                return bad("--lease-ttl must be whole seconds, at least 1s");
            }
            let user = match (&cli.etcd_user, &cli.etcd_password_file) {
                (Some(user), Some(file)) => {
                    let text = std::fs::read_to_string(file).map_err(|e| {
                        StartError::Config(format!(
                            "cannot read --etcd-password-file {}: {e}",
                            file.display()
                        ))
                    })?;
                    let password = text.lines().next().unwrap_or("").to_owned();
                    Some((user.clone(), password))
                }
                _ => None,
            };
            Ok(BackendConfig::Etcd(Box::new(EtcdConfig {
                endpoints: cli
                    .etcd_endpoints
                    .iter()
                    .map(|e| e.trim().to_owned())
                    .filter(|e| !e.is_empty())
                    .collect(),
                prefix: prefix.to_owned(),
                lease_ttl: ttl,
                ca_cert: cli.etcd_ca_cert.clone(),
                identity: cli.etcd_cert.clone().zip(cli.etcd_key.clone()),
                user,
            })))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, StartError> {
        let env = Env {
            socket: Some("/ignored/by/the/daemon".into()),
            runtime_dir: Some("/run/user/7".into()),
            user: "7".into(),
        };
        let cli = Cli::try_parse_from(std::iter::once("lockbrokerd").chain(args.iter().copied()))
            .expect("flags parse");
        Config::from_cli(cli, &env)
    }

    /// `lockbrokerd --config FILE ARGS` with FILE holding `toml`.
    fn with_file(toml: &str, args: &[&str]) -> anyhow::Result<Cli> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("lockbrokerd.toml");
        std::fs::write(&file, toml).unwrap();
        let mut argv: Vec<std::ffi::OsString> =
            vec!["lockbrokerd".into(), "--config".into(), file.into()];
        argv.extend(args.iter().map(Into::into));
        parse_with_file(argv)
    }

    #[test]
    fn a_config_file_sets_flags_and_the_command_line_overrides_them() {
        let toml = r#"
            socket = "/tmp/from-file.sock"
            max-holds = 12
            log-level = "debug"
            backend = "etcd"
            etcd-endpoints = ["http://a:2379", "http://b:2379"]
            lease-ttl = "4s"
        "#;
        let cli = with_file(toml, &[]).unwrap();
        assert_eq!(cli.socket, Some(PathBuf::from("/tmp/from-file.sock")));
        assert_eq!(cli.max_holds, 12);
        assert_eq!(cli.log_level.as_deref(), Some("debug"));
        assert_eq!(cli.backend, BackendArg::Etcd);
        assert_eq!(cli.etcd_endpoints, ["http://a:2379", "http://b:2379"]);
        assert_eq!(cli.lease_ttl, Duration::from_secs(4));
        let cli = with_file(
            toml,
            &["--max-holds", "99", "--etcd-endpoints", "http://c:2379"],
        )
        .unwrap();
        assert_eq!(cli.max_holds, 99, "the command line wins");
        assert_eq!(cli.etcd_endpoints, ["http://c:2379"]);
        assert_eq!(cli.socket, Some(PathBuf::from("/tmp/from-file.sock")));
    }

    #[test]
    fn a_config_file_with_an_unknown_key_or_a_bad_value_is_refused_by_name() {
        let err = with_file("max-holdz = 3\n", &[]).unwrap_err().to_string();
        assert!(err.contains("unknown key \"max-holdz\""), "{err}");
        let err = with_file("config = \"/etc/x\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown key \"config\""), "{err}");
        let err = with_file("max-holds = true\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"max-holds\" has a value of the wrong type"),
            "{err}"
        );
        let err = with_file("max-holds = \"many\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("max-holds") && err.contains("lockbrokerd.toml"),
            "{err}"
        );
        let err = with_file("max-holds = [\n", &[]).unwrap_err();
        assert!(
            format!("{err:#}").contains("not a valid TOML file"),
            "{err:#}"
        );
        let missing = parse_with_file(vec![
            "lockbrokerd".into(),
            "--config".into(),
            "/nonexistent.toml".into(),
        ]);
        assert!(
            missing
                .unwrap_err()
                .to_string()
                .contains("/nonexistent.toml")
        );
        // --config-if-exists: a missing file is no file.
        let cli = parse_with_file(vec![
            "lockbrokerd".into(),
            "--config-if-exists".into(),
            "/nonexistent.toml".into(),
            "--max-holds".into(),
            "5".into(),
        ])
        .unwrap();
        assert_eq!(cli.max_holds, 5);
    }

    #[test]
    fn scope_defaults_and_explicit_socket() {
        let c = parse(&[]).unwrap();
        if cfg!(unix) {
            assert_eq!(
                c.socket,
                PathBuf::from("/run/user/7/lockbroker/broker.sock")
            );
        }
        assert_eq!(c.scope, Some(Scope::Local));
        let c = parse(&["--scope", "global"]).unwrap();
        assert_eq!(c.scope, Some(Scope::Global));
        let c = parse(&["--socket", "/tmp/x.sock"]).unwrap();
        assert_eq!((c.socket, c.scope), (PathBuf::from("/tmp/x.sock"), None));
    }

    #[test]
    fn the_etcd_backend_flags() {
        let c = parse(&[
            "--backend",
            "etcd",
            "--etcd-endpoints",
            "http://127.0.0.1:2379,http://127.0.0.1:2479",
            "--etcd-prefix",
            "/locks/",
            "--lease-ttl",
            "2m",
        ])
        .unwrap();
        let BackendConfig::Etcd(etcd) = c.backend else {
            panic!("not the etcd backend");
        };
        assert_eq!(
            etcd.endpoints,
            ["http://127.0.0.1:2379", "http://127.0.0.1:2479"]
        );
        assert_eq!(etcd.prefix, "/locks");
        assert_eq!(etcd.lease_ttl, Duration::from_secs(120));
        assert!(matches!(parse(&[]).unwrap().backend, BackendConfig::Local));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("7 days").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn an_acl_file_is_read_at_start_and_a_bad_one_stops_the_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.toml");
        std::fs::write(&good, "[[rule]]\nprefix = \"x/\"\nacquire = [\"*\"]\n").unwrap();
        let config = parse(&["--acl", good.to_str().unwrap()]).unwrap();
        assert!(config.acl.is_some());
        assert!(parse(&[]).unwrap().acl.is_none());
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "[[rule]]\nprefix = \"x/\"\ntake = [\"*\"]\n").unwrap();
        let err = parse(&["--acl", bad.to_str().unwrap()]).unwrap_err();
        assert!(err.to_string().contains("unknown verb \"take\""), "{err}");
        let missing = dir.path().join("missing.toml");
        let err = parse(&["--acl", missing.to_str().unwrap()]).unwrap_err();
        assert!(err.to_string().contains("reading it"), "{err}");
    }

    #[test]
    #[cfg(unix)]
    fn the_admin_group_is_a_gid_or_a_name_the_system_knows() {
        assert_eq!(parse(&[]).unwrap().admin_gid, None);
        assert_eq!(
            parse(&["--admin-group", "4242"]).unwrap().admin_gid,
            Some(4242)
        );
        // Every Unix has group 0 by a name (root on Linux, wheel on BSD).
        let name = {
            // SAFETY: getgrgid returns a static entry or null; read at once.
            let grp = unsafe { libc::getgrgid(0) };
            assert!(!grp.is_null());
            unsafe { std::ffi::CStr::from_ptr((*grp).gr_name) }
                .to_string_lossy()
                .into_owned()
        };
        assert_eq!(parse(&["--admin-group", &name]).unwrap().admin_gid, Some(0));
        let err = parse(&["--admin-group", "no-such-group-here"]).unwrap_err();
        assert!(err.to_string().contains("no such group"), "{err}");
    }

    #[test]
    fn bad_limits_are_refused() {
        for args in [
            &["--max-connections", "0"][..],
            &["--max-pending", "0"],
            &["--max-frame-len", "100"],
            &["--workers", "0"],
            &["--etcd-endpoints", "http://127.0.0.1:2379"],
            &["--backend", "etcd"],
            &[
                "--backend",
                "etcd",
                "--etcd-endpoints",
                "http://a:1",
                "--lease-ttl",
                "500ms",
            ],
            &[
                "--backend",
                "etcd",
                "--etcd-endpoints",
                "http://a:1",
                "--etcd-prefix",
                "x",
            ],
        ] {
            let err = parse(args).unwrap_err();
            assert!(matches!(err, StartError::Config(_)), "{args:?}: {err}");
        }
    }
}
