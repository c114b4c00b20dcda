//! The metrics: what sessions do shows in them, by kind and by error
//! code, through the `Metrics` request and over HTTP (`--metrics-listen`,
//! TCP and Unix socket), each scrape read by a strict parser of the
//! OpenMetrics text format.

use std::time::Duration;

use lockbroker::{Client, Error};
use lockbroker_tests::openmetrics::{Exposition, parse};
use lockbrokerd::config::Config;
use lockbrokerd::metrics::http::MetricsAddr;
use lockbrokerd::server::Server;
use lockbrokerd::transport::Listener;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use lockbroker_tests::harness::hold_over_raw;

use crate::util::{bounded, on_both_backends, wait_until, waiters};

/// The daemon's metrics through `client`, parsed.
async fn scrape(client: &Client) -> Exposition {
    let text = client.metrics().await.expect("metrics");
    parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn kind(k: &str) -> [(&'static str, &str); 1] {
    [("kind", k)]
}

on_both_backends! {
async fn what_sessions_do_shows_in_the_metrics(backend) {
    bounded(async {
        let daemon = backend.start().await;
        let watcher = daemon.client().await;
        let m = scrape(&watcher).await;
        assert_eq!(m.get("lockbroker_sessions", &[]), 1.0);
        assert_eq!(m.get("lockbroker_grants_total", &kind("mutex")), 0.0);
        let build = &m.families["lockbroker_build"];
        assert_eq!(build.kind, "info");
        assert_eq!(
            build.samples[0].1.get("version").map(String::as_str),
            Some(lockbrokerd::VERSION)
        );

        // A holder, a waiter behind it, a try that finds it taken, and a
        // waiter that is cancelled.
        // Over a raw connection, which can close without releasing.
        let holder = hold_over_raw(&daemon.socket, "m").await;
        let other = daemon.client().await;
        let mutex = other.mutex("m");
        let waiting = tokio::spawn(async move { mutex.acquire().await.unwrap() });
        waiters(&watcher, "m", 1).await;
        assert!(other.mutex("m").try_acquire().await.unwrap().is_none());
        let m = scrape(&watcher).await;
        assert_eq!(m.get("lockbroker_sessions", &[]), 3.0);
        assert_eq!(m.get("lockbroker_holds", &kind("mutex")), 1.0);
        assert_eq!(m.get("lockbroker_waiters", &kind("mutex")), 1.0);
        assert_eq!(m.get("lockbroker_timeouts_total", &kind("mutex")), 1.0);

        let third = daemon.client().await;
        let mutex = third.mutex("m");
        let cancelled = tokio::spawn(async move { mutex.acquire().await });
        waiters(&watcher, "m", 2).await;
        cancelled.abort();
        wait_until("the cancel is counted", || async {
            scrape(&watcher).await.get("lockbroker_cancels_total", &kind("mutex")) == 1.0
        })
        .await;

        // The holder's session ends holding: an abandon, and the waiter's
        // grant says so.
        drop(holder);
        let granted = waiting.await.unwrap();
        assert!(granted.abandoned());
        // The grant may have been written to its session's socket by
        // another (the releasing one, or the etcd backend's task), so it is
        // counted once its own session reads it: scraped through that
        // session, which reads its grants before each request.
        let m = scrape(&other).await;
        assert_eq!(m.get("lockbroker_abandons_total", &kind("mutex")), 1.0);
        assert_eq!(m.get("lockbroker_abandoned_grants_total", &kind("mutex")), 1.0);
        assert_eq!(m.get("lockbroker_grants_total", &kind("mutex")), 2.0);
        assert_eq!(m.get("lockbroker_waiters", &kind("mutex")), 0.0);
        assert_eq!(m.get("lockbroker_holds", &kind("mutex")), 1.0);
        // Both grants were timed; the waiter's wait and the ended hold.
        assert_eq!(m.get("lockbroker_wait_seconds_count", &kind("mutex")), 2.0);
        assert_eq!(m.get("lockbroker_hold_seconds_count", &kind("mutex")), 1.0);
        granted.release().await.unwrap();

        // The other kinds are counted apart.
        let s = other.semaphore("s", 3).acquire_many(2).await.unwrap();
        let r = other.rwlock("rw").read().await.unwrap();
        let m = scrape(&other).await;
        assert_eq!(m.get("lockbroker_holds", &kind("semaphore")), 1.0);
        assert_eq!(m.get("lockbroker_holds", &kind("rwlock_shared")), 1.0);
        assert_eq!(m.get("lockbroker_holds", &kind("mutex")), 0.0);
        assert_eq!(m.get("lockbroker_grants_total", &kind("rwlock_exclusive")), 0.0);
        s.release().await.unwrap();
        r.release().await.unwrap();
        let w = other.rwlock("rw").write().await.unwrap();
        w.release().await.unwrap();
        let m = scrape(&other).await;
        assert_eq!(m.get("lockbroker_grants_total", &kind("rwlock_exclusive")), 1.0);
        assert_eq!(m.get("lockbroker_hold_seconds_count", &kind("rwlock_exclusive")), 1.0);
        for k in ["mutex", "semaphore", "rwlock_shared", "rwlock_exclusive"] {
            assert_eq!(m.get("lockbroker_holds", &kind(k)), 0.0, "{k}");
        }

        // Refusals by code.
        let err = other.release_by_name("never-held", 1).await.unwrap_err();
        assert!(matches!(err, Error::Refused { .. }), "{err:?}");
        let code = err.code().expect("the daemon's code").to_string();
        let m = scrape(&watcher).await;
        assert_eq!(m.get("lockbroker_refusals_total", &[("code", &code)]), 1.0);

        // State requests by operation.
        let state = other.state();
        state.set("k/a", "one").await.unwrap();
        state.increment("k/n", 5).await.unwrap();
        state.get("k/a").await.unwrap();
        state.get("k/b").await.unwrap();
        let m = scrape(&watcher).await;
        assert_eq!(m.get("lockbroker_state_ops_total", &[("op", "get")]), 2.0);
        assert_eq!(m.get("lockbroker_state_ops_total", &[("op", "set")]), 1.0);
        assert_eq!(m.get("lockbroker_state_ops_total", &[("op", "increment")]), 1.0);
        if matches!(backend, crate::util::Backend::Local) {
            assert_eq!(m.get("lockbroker_state_keys", &[]), 2.0);
            assert!(m.get("lockbroker_state_bytes", &[]) > 0.0);
        }
        drop((third, other, state));
        wait_until("the sessions end", || async {
            scrape(&watcher).await.get("lockbroker_sessions", &[]) == 1.0
        })
        .await;
        daemon.stop().await;
    })
    .await;
}
}

/// Sends `GET path` (or another `method`) over `io`; the status code, the
/// headers (names lowercased) and the body.
async fn http<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    method: &str,
    path: &str,
) -> (u16, Vec<(String, String)>, String) {
    let request =
        format!("{method} {path} HTTP/1.1\r\nHost: lockbroker\r\nConnection: close\r\n\r\n");
    io.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    io.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a head and a body");
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap();
    let code = status
        .strip_prefix("HTTP/1.1 ")
        .and_then(|s| s.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("status line {status:?}"));
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap();
            (k.trim().to_ascii_lowercase(), v.trim().to_owned())
        })
        .collect();
    if let Some((_, len)) = headers.iter().find(|(k, _)| k == "content-length") {
        assert_eq!(body.len(), len.parse::<usize>().unwrap(), "content-length");
    }
    (code, headers, body.to_owned())
}

/// A daemon in this process serving its metrics at `addr`; its client,
/// where they are served, and its stop.
async fn serve_metrics(
    dir: &std::path::Path,
    addr: MetricsAddr,
) -> (
    Client,
    MetricsAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let socket = lockbroker_tests::harness::address(dir);
    let mut config = Config::for_socket(&socket);
    config.metrics_listen = Some(addr);
    let server = Server::new(&config).await.expect("the daemon starts");
    let at = server.metrics_addr().expect("metrics are served").clone();
    let listener = Listener::bind(&socket, None).expect("bind");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(listener, async {
        let _ = stopped.await;
    }));
    let client = lockbroker::Connector::new()
        .socket(&socket)
        .connect()
        .await
        .unwrap();
    (client, at, stop, task)
}

#[tokio::test]
async fn the_http_endpoint_serves_what_the_request_answers() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let any_port = MetricsAddr::Tcp("127.0.0.1:0".parse().unwrap());
        let (client, at, stop, task) = serve_metrics(dir.path(), any_port).await;
        let MetricsAddr::Tcp(addr) = at else {
            panic!("{at:?}")
        };
        assert_ne!(addr.port(), 0, "the port the system chose");
        let _held = client.mutex("job").acquire().await.unwrap();
        let connect = || async { tokio::net::TcpStream::connect(addr).await.unwrap() };

        let (code, headers, body) = http(connect().await, "GET", "/metrics").await;
        assert_eq!(code, 200, "{body}");
        assert!(
            headers.iter().any(|(k, v)| k == "content-type"
                && v.starts_with("application/openmetrics-text; version=1.0.0")),
            "{headers:?}"
        );
        let scraped = parse(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
        let asked = scrape(&client).await;
        assert_eq!(
            scraped.families.keys().collect::<Vec<_>>(),
            asked.families.keys().collect::<Vec<_>>(),
            "the same families both ways"
        );
        for m in [&scraped, &asked] {
            assert_eq!(m.get("lockbroker_holds", &kind("mutex")), 1.0);
            assert_eq!(m.get("lockbroker_sessions", &[]), 1.0);
        }

        // HEAD has the head only; other paths and methods are refused.
        let (code, _, body) = http(connect().await, "HEAD", "/metrics").await;
        assert_eq!((code, body.as_str()), (200, ""));
        let (code, _, _) = http(connect().await, "GET", "/").await;
        assert_eq!(code, 404);
        let (code, headers, _) = http(connect().await, "POST", "/metrics").await;
        assert_eq!(code, 405);
        assert!(
            headers
                .iter()
                .any(|(k, v)| k == "allow" && v == "GET, HEAD")
        );
        // Garbage is answered 400 and disturbs nothing.
        let mut garbage = connect().await;
        garbage
            .write_all(b"\x00\x01 not http\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        garbage.read_to_end(&mut answer).await.unwrap();
        assert!(answer.starts_with(b"HTTP/1.1 400"), "{answer:?}");
        client.ping().await.unwrap();

        // That the endpoint is gone once the daemon stops is checked with
        // a Unix socket's file: a TCP port may live on a moment in a child
        // this test process forks meanwhile.
        drop(_held);
        drop(client);
        stop.send(()).unwrap();
        task.await.unwrap();
    })
    .await;
}

#[cfg(unix)]
#[tokio::test]
async fn a_unix_socket_endpoint_is_private_and_removed_on_stop() {
    use std::os::unix::fs::PermissionsExt;
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.sock");
        let (client, at, stop, task) =
            serve_metrics(dir.path(), MetricsAddr::Unix(path.clone())).await;
        assert_eq!(at, MetricsAddr::Unix(path.clone()));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (code, _, body) = http(
            tokio::net::UnixStream::connect(&path).await.unwrap(),
            "GET",
            "/metrics",
        )
        .await;
        assert_eq!(code, 200);
        let m = parse(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
        assert_eq!(m.get("lockbroker_sessions", &[]), 1.0);
        drop(client);
        stop.send(()).unwrap();
        task.await.unwrap();
        assert!(
            !path.exists(),
            "the endpoint is closed when the daemon stops"
        );
    })
    .await;
}

#[tokio::test]
async fn an_address_in_use_stops_the_start() {
    bounded(async {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::for_socket(lockbroker_tests::harness::address(dir.path()));
        config.metrics_listen = Some(MetricsAddr::Tcp(taken.local_addr().unwrap()));
        let err = Server::new(&config).await.unwrap_err().to_string();
        assert!(err.contains("binding the metrics address"), "{err}");
        assert!(
            err.contains(&taken.local_addr().unwrap().to_string()),
            "{err}"
        );
    })
    .await;
}

/// Holding connections open takes the endpoint's few slots, not the
/// daemon: more are closed at once, and a slot given back serves again.
#[tokio::test]
async fn idle_scrapers_take_only_the_endpoints_slots() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let any_port = MetricsAddr::Tcp("127.0.0.1:0".parse().unwrap());
        let (client, at, stop, task) = serve_metrics(dir.path(), any_port).await;
        let MetricsAddr::Tcp(addr) = at else {
            panic!("{at:?}")
        };
        let mut idle = Vec::new();
        for _ in 0..lockbrokerd::metrics::http::MAX_CONNECTIONS {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        // Each accepted connection has its slot once it is served; a scrape
        // over one of them proves the endpoint took them all.
        let mut last = idle.pop().unwrap();
        last.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut first = [0u8; 12];
        last.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"HTTP/1.1 200");
        idle.push(last);
        let mut over = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(10), over.read(&mut byte))
            .await
            .expect("the connection over the limit is closed")
            .unwrap_or(0);
        assert_eq!(n, 0, "closed without an answer");
        client.ping().await.unwrap();
        drop(idle);
        wait_until("a slot serves again", || async {
            let io = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut io = io;
            if io
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .is_err()
            {
                return false;
            }
            let mut answer = Vec::new();
            let _ = io.read_to_end(&mut answer).await;
            answer.starts_with(b"HTTP/1.1 200")
        })
        .await;
        drop(client);
        stop.send(()).unwrap();
        task.await.unwrap();
    })
    .await;
}
