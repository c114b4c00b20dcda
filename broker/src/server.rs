//! The accept loop, the connection limit, and shutdown.
//!
//! [`run`] takes a bound [`Listener`] and a shutdown future: `main.rs`
//! chooses the signals, tests pass their own.
//! Each connection gets a session task in a `JoinSet`; on shutdown the loop
//! stops accepting, fires the [`Shutdown`](crate::shutdown::Shutdown) signal
//! (each session sends the shutting-down event and releases everything), and
//! waits for the sessions, at most [`SHUTDOWN_GRACE`].

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use lockbroker_proto::{ErrorCode, ErrorInfo, ServerMessage, frame};
use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::broker::Broker;
use crate::config::{BackendConfig, Config};
use crate::error::StartError;
use crate::metrics::http::{MetricsAddr, MetricsListener};
use crate::session;
use crate::shutdown;
use crate::state::{FENCE_EPOCH_SHIFT, State};
use crate::transport::Listener;

/// How long sessions get to finish once shutdown is signalled.
pub const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);

/// Pause after a failed accept (e.g. out of file descriptors) before the
/// next try, so the loop backs off instead of spinning or ending.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// A daemon ready to serve: its state is open (loaded from disk, if
/// configured), but nothing listens yet.
#[derive(Debug)]
pub struct Server {
    broker: Arc<Broker>,
    config: Config,
    metrics: Option<MetricsListener>,
}

impl Server {
    /// Opens the state store, and connects to the etcd cluster if the
    /// locks are kept there. Fails (and the daemon must not start) if a
    /// state directory cannot be opened or read, or no member of the
    /// cluster answers.
    pub async fn new(config: &Config) -> Result<Server, StartError> {
        let (state, epoch) = State::open(&config.state)?;
        let broker = match &config.backend {
            BackendConfig::Local => Broker::new(
                config.limits,
                state,
                epoch << FENCE_EPOCH_SHIFT,
                config.max_abandoned,
            ),
            #[cfg(feature = "etcd")]
            BackendConfig::Etcd(etcd) => {
                // The state lives in etcd too; the local store is not used.
                drop(state);
                let backend = crate::etcd::Etcd::connect(etcd, &config.state)
                    .await
                    .map_err(StartError::Backend)?;
                Broker::with_backend(config.limits, Box::new(backend))
            }
            #[cfg(not(feature = "etcd"))]
            BackendConfig::Etcd(_) => {
                return Err(StartError::Backend(
                    "this lockbrokerd was built without the etcd backend".into(),
                ));
            }
        };
        let mut broker = broker;
        broker.admin_gid = config.admin_gid;
        broker.acl = config.acl.clone();
        let metrics = match &config.metrics_listen {
            Some(addr) => Some(MetricsListener::bind(
                addr,
                crate::transport::socket_mode(config.scope),
            )?),
            None => None,
        };
        Ok(Server {
            broker: Arc::new(broker),
            config: config.clone(),
            metrics,
        })
    }

    /// Where the metrics are served, if anywhere (a TCP port 0 resolved).
    pub fn metrics_addr(&self) -> Option<&MetricsAddr> {
        self.metrics.as_ref().map(MetricsListener::addr)
    }

    /// Serves `listener` until `shutdown` completes, then shuts down
    /// gracefully. The socket file is removed when this returns.
    pub async fn run(self, listener: Listener, shutdown: impl Future) {
        // Scrapes are served until the daemon stops: dropping the task
        // closes the endpoint (and removes its socket file).
        let metrics = self.metrics.map(|m| {
            tracing::info!(at = %m.addr(), "serving metrics");
            AbortOnDrop(tokio::spawn(m.serve(Arc::clone(&self.broker))))
        });
        serve(self.broker, listener, &self.config, shutdown).await;
        if let Some(metrics) = metrics {
            metrics.stop().await;
        }
    }
}

/// Aborts a task when dropped (so when `run`'s future is).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl AbortOnDrop {
    /// Aborts the task and waits until it is gone: the endpoint is closed
    /// when `run` returns.
    async fn stop(mut self) {
        self.0.abort();
        let _ = (&mut self.0).await;
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Opens the state and serves `listener` until `shutdown` completes; see
/// [`Server`].
pub async fn run(
    listener: Listener,
    config: &Config,
    shutdown: impl Future,
) -> Result<(), StartError> {
    Server::new(config).await?.run(listener, shutdown).await;
    Ok(())
}

async fn serve(broker: Arc<Broker>, listener: Listener, config: &Config, shutdown: impl Future) {
    let connections = Arc::new(Semaphore::new(config.max_connections));
    let (trigger, signal) = shutdown::channel();
    let mut sessions = JoinSet::new();
    tokio::pin!(shutdown);
    // The listener is bound, so connections are accepted from here on.
    let systemd = config.systemd;
    systemd.ready();
    // Pinging from this loop means a wedged loop stops the pings.
    let mut watchdog = systemd
        .watchdog
        .map(|every| tokio::time::interval(every / 2));
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = async { watchdog.as_mut().expect("guarded").tick().await }, if watchdog.is_some() => {
                systemd.watchdog();
            }
            accepted = listener.accept() => match accepted {
                Ok((reader, writer, cred)) => {
                    let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
                        broker.metrics.refused(ErrorCode::TooManyConnections);
                        tracing::warn!(
                            pid = cred.pid,
                            uid = cred.uid,
                            limit = config.max_connections,
                            "refused a connection: the daemon serves its maximum"
                        );
                        sessions.spawn(refuse(writer, config.max_connections, config.limits.max_frame_len));
                        continue;
                    };
                    let broker = Arc::clone(&broker);
                    let signal = signal.clone();
                    sessions.spawn(async move {
                        session::run(reader, writer, cred, broker, signal).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; backing off");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(done) = sessions.join_next(), if !sessions.is_empty() => {
                if let Err(e) = done
                    && e.is_panic() {
                        tracing::error!(error = %e, "a session panicked");
                    }
            }
        }
    }
    tracing::info!("shutting down");
    systemd.stopping();
    drop(listener);
    broker.begin_ending();
    trigger.fire();
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            left = sessions.len(),
            "sessions did not finish in time; aborting them"
        );
        sessions.shutdown().await;
    }
}

/// Tells a connection over the limit why it is refused, then closes it.
async fn refuse<W: AsyncWriteExt + Unpin>(mut writer: W, max: usize, max_frame_len: u32) {
    let error = ErrorInfo::new(
        ErrorCode::TooManyConnections,
        format!("the daemon is serving its maximum of {max} connections"),
    );
    let Ok(bytes) = frame::to_frame(&ServerMessage::Fatal(error), max_frame_len) else {
        return;
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        writer.write_all(&bytes).await?;
        writer.shutdown().await
    })
    .await;
}
