//! `--metrics-listen`: `GET /metrics` over HTTP/1, on a TCP address or a
//! Unix socket, served by hyper.
//!
//! The endpoint is for a scraper, not the world: it takes a few
//! connections at a time ([`MAX_CONNECTIONS`]; more are closed at once),
//! drops one that does not send its request head within
//! [`HEADER_TIMEOUT`], and answers nothing but `GET` and `HEAD` of
//! `/metrics`. It stops with the daemon.

use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::broker::Broker;
use crate::error::StartError;

/// Scrapes served at once.
pub const MAX_CONNECTIONS: usize = 16;

/// How long a connection may take to send its request head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Where `--metrics-listen` serves: `HOST:PORT`, or a Unix socket path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsAddr {
    /// A TCP address, such as `127.0.0.1:9464`.
    Tcp(SocketAddr),
    /// A Unix socket path (anything with a `/`).
    Unix(PathBuf),
}

impl FromStr for MetricsAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<MetricsAddr, String> {
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(MetricsAddr::Tcp(addr));
        }
        if s.contains('/') {
            return Ok(MetricsAddr::Unix(PathBuf::from(s)));
        }
        Err(format!(
            "{s:?} is neither an IP address and port (127.0.0.1:9464, [::1]:9464) \
             nor a Unix socket path (one with a '/')"
        ))
    }
}

impl fmt::Display for MetricsAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetricsAddr::Tcp(addr) => write!(f, "http://{addr}/metrics"),
            MetricsAddr::Unix(path) => write!(f, "http+unix://{}:/metrics", path.display()),
        }
    }
}

/// A bound metrics endpoint, not serving yet.
#[derive(Debug)]
pub struct MetricsListener {
    inner: Inner,
    addr: MetricsAddr,
}

#[derive(Debug)]
enum Inner {
    Tcp(tokio::net::TcpListener),
    #[cfg(unix)]
    Unix {
        listener: tokio::net::UnixListener,
        _remove: crate::transport::RemoveOnDrop,
    },
}

impl MetricsListener {
    /// Binds `addr`. A Unix socket gets mode `mode` before it listens,
    /// and a stale socket file there is replaced as the daemon's own is.
    /// Must be called within a Tokio runtime.
    pub fn bind(addr: &MetricsAddr, mode: u32) -> Result<MetricsListener, StartError> {
        let inner = match addr {
            MetricsAddr::Tcp(at) => {
                let std = std::net::TcpListener::bind(at)
                    .and_then(|l| l.set_nonblocking(true).map(|()| l))
                    .map_err(|e| {
                        StartError::io("binding the metrics address", at.to_string(), e)
                    })?;
                let listener = tokio::net::TcpListener::from_std(std)
                    .map_err(|e| StartError::io("registering", at.to_string(), e))?;
                Inner::Tcp(listener)
            }
            #[cfg(unix)]
            MetricsAddr::Unix(path) => {
                let std = crate::transport::bind_private(path, mode)?;
                let remove = crate::transport::RemoveOnDrop(path.clone());
                std.set_nonblocking(true)
                    .map_err(|e| StartError::io("configuring", path, e))?;
                let listener = tokio::net::UnixListener::from_std(std)
                    .map_err(|e| StartError::io("registering", path, e))?;
                Inner::Unix {
                    listener,
                    _remove: remove,
                }
            }
            #[cfg(not(unix))]
            MetricsAddr::Unix(path) => {
                let _ = mode;
                return Err(StartError::Config(format!(
                    "--metrics-listen {}: Unix sockets are not served on this platform; \
                     give a TCP address such as 127.0.0.1:9464",
                    path.display()
                )));
            }
        };
        // The address a port 0 was given.
        let addr = match &inner {
            Inner::Tcp(l) => MetricsAddr::Tcp(
                l.local_addr()
                    .map_err(|e| StartError::io("inspecting", addr.to_string(), e))?,
            ),
            #[cfg(unix)]
            Inner::Unix { .. } => addr.clone(),
        };
        Ok(MetricsListener { inner, addr })
    }

    /// Where it listens (for a TCP port 0, the port it was given).
    pub fn addr(&self) -> &MetricsAddr {
        &self.addr
    }

    /// Serves scrapes of `broker`'s metrics until dropped.
    pub async fn serve(self, broker: Arc<Broker>) {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                accepted = self.accept() => {
                    let io = match accepted {
                        Ok(io) => io,
                        Err(e) => {
                            tracing::warn!(error = %e, "accepting a metrics connection failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                        continue; // dropped: closed
                    };
                    let broker = Arc::clone(&broker);
                    connections.spawn(async move {
                        serve_connection(io, broker).await;
                        drop(slot);
                    });
                }
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
    }

    async fn accept(&self) -> std::io::Result<Box<dyn Io>> {
        Ok(match &self.inner {
            Inner::Tcp(l) => Box::new(l.accept().await?.0),
            #[cfg(unix)]
            Inner::Unix { listener, .. } => Box::new(listener.accept().await?.0),
        })
    }
}

/// A connection of either kind.
trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

async fn serve_connection(io: Box<dyn Io>, broker: Arc<Broker>) {
    let service = service_fn(move |request| {
        let broker = Arc::clone(&broker);
        async move { Ok::<_, Infallible>(answer(&request, &broker)) }
    });
    let served = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(io), service)
        .await;
    if let Err(e) = served {
        tracing::debug!(error = %e, "a metrics connection ended");
    }
}

fn answer(request: &Request<Incoming>, broker: &Broker) -> Response<Full<Bytes>> {
    let status = |code: StatusCode, text: &'static str| {
        let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
        *response.status_mut() = code;
        response
    };
    if request.uri().path() != "/metrics" {
        return status(StatusCode::NOT_FOUND, "lockbrokerd serves /metrics only\n");
    }
    let head = request.method() == Method::HEAD;
    if !head && request.method() != Method::GET {
        let mut response = status(StatusCode::METHOD_NOT_ALLOWED, "GET /metrics\n");
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let text = broker.metrics_text();
    let mut response = Response::new(Full::new(if head {
        Bytes::new()
    } else {
        Bytes::from(text)
    }));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(super::CONTENT_TYPE));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_as_tcp_or_unix() {
        assert_eq!(
            "127.0.0.1:9464".parse(),
            Ok(MetricsAddr::Tcp("127.0.0.1:9464".parse().unwrap()))
        );
        assert_eq!(
            "[::1]:0".parse(),
            Ok(MetricsAddr::Tcp("[::1]:0".parse().unwrap()))
        );
        assert_eq!(
            "/run/lockbroker/metrics.sock".parse(),
            Ok(MetricsAddr::Unix("/run/lockbroker/metrics.sock".into()))
        );
        assert_eq!(
            "./metrics.sock".parse(),
            Ok(MetricsAddr::Unix("./metrics.sock".into()))
        );
        let err = "localhost:9464".parse::<MetricsAddr>().unwrap_err();
        assert!(err.contains("neither an IP address and port"), "{err}");
        assert!("9464".parse::<MetricsAddr>().is_err());
    }
}
