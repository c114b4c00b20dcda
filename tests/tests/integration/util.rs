//! The integration tests' harness: the shared one
//! ([`lockbroker_tests::harness`]), with the programs of this package.

use std::path::Path;

pub use lockbroker_tests::harness::*;
use lockbrokerd::config::Config;

/// Path of the worker binary used for multi-process tests.
pub fn worker() -> &'static str {
    env!("CARGO_BIN_EXE_lb-worker")
}

/// The `lockbrokerd` binary, for tests that kill or restart the daemon
/// process.
pub fn daemon_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lb-daemon"))
}

/// The daemon program as a process on `socket`, with extra flags, once it
/// serves.
pub async fn spawn_daemon(socket: &Path, flags: &[&std::ffi::OsStr]) -> DaemonProcess {
    DaemonProcess::start(daemon_bin(), socket, flags).await
}

/// Fails the test if `cond` does not hold within 20 seconds, asking again
/// every few milliseconds: for what only a blocking client can see.
pub fn wait_until_blocking(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// Waits until `name` shows `n` waiters to `client`.
pub async fn waiters(client: &lockbroker::Client, name: &str, n: usize) {
    wait_until(&format!("{name} has {n} waiters"), || async {
        let i = client.inspect(name).await.unwrap();
        i.entries.first().map_or(0, |e| e.waiters.len()) == n
    })
    .await;
}

/// The `lockbrokerd` process on `socket`, on the etcd cluster at
/// `endpoints` under `prefix`, with leases of `ttl`, once it serves.
#[cfg(unix)]
pub async fn spawn_etcd_daemon(
    socket: &Path,
    endpoints: &str,
    prefix: &str,
    ttl: std::time::Duration,
) -> DaemonProcess {
    let ttl = format!("{}s", ttl.as_secs());
    let flags = [
        "--backend",
        "etcd",
        "--etcd-endpoints",
        endpoints,
        "--etcd-prefix",
        prefix,
        "--lease-ttl",
        &ttl,
    ];
    let flags: Vec<&std::ffi::OsStr> = flags.iter().map(std::ffi::OsStr::new).collect();
    spawn_daemon(socket, &flags).await
}

/// Which backend a test's daemon keeps its locks in.
#[derive(Debug, Clone, Copy)]
// The etcd tests run on Unix; on Windows the variant is only named.
#[cfg_attr(not(unix), allow(dead_code))]
pub enum Backend {
    /// The daemon's own memory.
    Local,
    /// The cluster the tests share (Unix), under a prefix of the test's
    /// own.
    Etcd,
}

impl Backend {
    /// A daemon on this backend.
    pub async fn start(self) -> Daemon {
        self.start_with(|_| {}).await
    }

    /// A daemon on this backend, after `configure` adjusts it.
    pub async fn start_with(self, configure: impl FnOnce(&mut Config)) -> Daemon {
        match self {
            Backend::Local => Daemon::start_with(configure).await,
            #[cfg(unix)]
            Backend::Etcd => {
                let cluster = lockbroker_tests::etcd::shared()
                    .await
                    .expect("etcd is present");
                let prefix = lockbroker_tests::etcd::unique_prefix("it");
                let ttl = std::time::Duration::from_secs(10);
                let config = cluster.config(&prefix, None, ttl);
                Daemon::start_with(move |c| {
                    configure(c);
                    c.backend = lockbrokerd::config::BackendConfig::Etcd(Box::new(config));
                })
                .await
            }
            #[cfg(not(unix))]
            Backend::Etcd => unreachable!("the etcd tests run on Unix"),
        }
    }

    /// The etcd backend, if etcd is there to run its tests (on Unix).
    #[cfg_attr(not(unix), allow(dead_code))]
    pub async fn etcd() -> Option<Backend> {
        #[cfg(unix)]
        if lockbroker_tests::etcd::shared().await.is_some() {
            return Some(Backend::Etcd);
        }
        None
    }
}

/// Each test in it, twice: on the local backend (`<name>::local`) and on
/// etcd (`<name>::etcd`, Unix, skipped without etcd); its body gets the
/// backend as its one argument and starts its daemons with it.
macro_rules! on_both_backends {
    ($($(#[$attr:meta])* async fn $name:ident($backend:ident) $body:block)*) => {$(
        $(#[$attr])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            async fn run($backend: crate::util::Backend) $body

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn local() {
                run(crate::util::Backend::Local).await
            }

            #[cfg(unix)]
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn etcd() {
                if let Some(backend) = crate::util::Backend::etcd().await {
                    run(backend).await
                }
            }
        }
    )*};
}
pub(crate) use on_both_backends;
