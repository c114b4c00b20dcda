//! Real etcd clusters for the tests of the etcd backend (Unix): members
//! started from Debian's `etcd` on 127.0.0.1 with ports of their own, data
//! on tmpfs, and heartbeat and election timers fast enough for CI; and
//! in-process daemons on them, standing in for hosts.
//!
//! Without `etcd` on the PATH the tests that need it skip, saying so,
//! unless `LOCKBROKER_REQUIRE_ETCD=1` (CI sets it), which fails them.
//!
//! Every member is a child of one thread that lives as long as the test
//! process, with `PR_SET_PDEATHSIG`, so no member outlives the tests
//! however they end; a cluster a test owns is killed when it drops.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::mpsc;
use std::time::Duration;

use lockbrokerd::config::{BackendConfig, EtcdConfig};

use crate::harness::Daemon;

/// Heartbeat and election timers of the test members, in milliseconds:
/// a tenth of etcd's defaults, which still keeps a loaded two-CPU machine
/// from electing leaders under load.
const HEARTBEAT_MS: u32 = 50;
const ELECTION_MS: u32 = 500;

/// The lease TTL of the daemons of tests that wait for leases to expire
/// (the semantic tests keep the default, 10 s: a test that floods the
/// cluster can delay its renewals by more than a short TTL allows, and
/// its daemon would rightly end its sessions as lost).
pub const SHORT_LEASE_TTL: Duration = Duration::from_secs(2);

/// Whether etcd tests can run; `false` (with a line saying so) to skip.
/// Fails the test if they must run and cannot.
pub fn etcd_present() -> bool {
    let present = Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !present {
        if std::env::var_os("LOCKBROKER_REQUIRE_ETCD").is_some_and(|v| v == "1") {
            panic!(
                "etcd is not on the PATH, and the etcd tests are required (LOCKBROKER_REQUIRE_ETCD=1)"
            );
        }
        eprintln!("skipped: etcd is not on the PATH (Debian: apt-get install etcd-server)");
    }
    present
}

/// One member.
#[derive(Debug)]
pub struct Member {
    /// Its name in the cluster.
    pub name: String,
    /// Its client URL.
    pub client_url: String,
    child: Child,
}

/// A cluster the test started.
#[derive(Debug)]
pub struct Cluster {
    _dir: tempfile::TempDir,
    /// Its members, in order.
    pub members: Vec<Member>,
    /// Its clients' TLS files, if they must speak TLS.
    tls: Option<Tls>,
}

/// The files of a cluster whose clients must speak TLS and show a
/// certificate (`--client-cert-auth`), made with `openssl`: a CA, the
/// members' certificate (for 127.0.0.1) and a client's, all signed by it.
#[derive(Debug)]
pub struct Tls {
    dir: tempfile::TempDir,
}

impl Tls {
    /// New files, from a new CA.
    pub fn generate() -> Tls {
        let dir = tempfile::tempdir().expect("a directory for certificates");
        let at = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .output()
                .expect("openssl (Debian: apt-get install openssl)");
            assert!(out.status.success(), "openssl {args:?}: {out:?}");
        };
        let key = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let ca = [
            &["req", "-x509"][..],
            &key,
            &["-days", "2", "-subj", "/CN=lockbroker test CA"],
        ];
        openssl(
            &[
                &ca.concat()[..],
                &["-keyout", &at("ca.key"), "-out", &at("ca.pem")],
            ]
            .concat(),
        );
        for (who, usage) in [
            ("server", "serverAuth,clientAuth"),
            ("client", "clientAuth"),
        ] {
            let ext = at(&format!("{who}.ext"));
            std::fs::write(
                &ext,
                format!("subjectAltName=IP:127.0.0.1\nextendedKeyUsage={usage}\n"),
            )
            .unwrap();
            let csr = at(&format!("{who}.csr"));
            let subject = format!("/CN={who}");
            openssl(
                &[
                    &["req"][..],
                    &key,
                    &[
                        "-subj",
                        &subject,
                        "-keyout",
                        &at(&format!("{who}.key")),
                        "-out",
                        &csr,
                    ],
                ]
                .concat(),
            );
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &at("ca.pem"),
                "-CAkey",
                &at("ca.key"),
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &ext,
                "-out",
                &at(&format!("{who}.pem")),
            ]);
        }
        Tls { dir }
    }

    /// The file `name` (`ca.pem`, `server.pem`, `server.key`, `client.pem`,
    /// `client.key`).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn options(&self) -> etcd_client::TlsOptions {
        let read = |name: &str| std::fs::read(self.path(name)).expect("a certificate file");
        etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read("ca.pem")))
            .identity(etcd_client::Identity::from_pem(
                read("client.pem"),
                read("client.key"),
            ))
    }
}

/// A command for the spawner thread, and where to send its child.
type Spawn = (Command, mpsc::Sender<Child>);

/// Runs `command` from the spawner thread (see the module's text).
fn spawn(mut command: Command) -> Child {
    static SPAWNER: Mutex<Option<mpsc::Sender<Spawn>>> = Mutex::new(None);
    let tx = {
        let mut spawner = SPAWNER.lock().unwrap();
        spawner
            .get_or_insert_with(|| {
                let (tx, rx) = mpsc::channel::<Spawn>();
                std::thread::spawn(move || {
                    for (mut command, back) in rx {
                        // SAFETY: prctl is async-signal-safe; it only sets a
                        // flag of the child.
                        unsafe {
                            command.pre_exec(|| {
                                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                                Ok(())
                            });
                        }
                        let _ = back.send(command.spawn().expect("spawn etcd"));
                    }
                    // Keep the thread (the members' parent) alive.
                    loop {
                        std::thread::park();
                    }
                });
                tx
            })
            .clone()
    };
    let (back, child) = mpsc::channel();
    command.stdin(Stdio::null());
    tx.send((command, back)).unwrap();
    child.recv().unwrap()
}

/// A data directory on tmpfs where there is one. The shared cluster is
/// never dropped (its members die with the test process), so directories
/// left by test processes that are gone are removed first.
fn data_dir() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    if let Ok(entries) = std::fs::read_dir(&base) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(rest) = name
                .to_str()
                .and_then(|n| n.strip_prefix("lockbroker-etcd-"))
            else {
                continue;
            };
            let pid: Option<u32> = rest.split('-').next().and_then(|p| p.parse().ok());
            if pid.is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    tempfile::Builder::new()
        .prefix(&format!("lockbroker-etcd-{}-", std::process::id()))
        .tempdir_in(base)
        .expect("a data directory")
}

fn free_port() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").expect("a free port")
}

impl Cluster {
    /// Starts `n` members and waits until the cluster has a leader.
    pub async fn start(n: usize) -> Cluster {
        Cluster::start_with(n, None).await
    }

    /// Starts `n` members whose clients must speak TLS with `tls`'s
    /// certificates.
    pub async fn start_tls(n: usize, tls: Tls) -> Cluster {
        Cluster::start_with(n, Some(tls)).await
    }

    async fn start_with(n: usize, tls: Option<Tls>) -> Cluster {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let dir = data_dir();
        // Every port is held until all are chosen.
        let ports: Vec<(TcpListener, TcpListener)> =
            (0..n).map(|_| (free_port(), free_port())).collect();
        let port = |l: &TcpListener| l.local_addr().unwrap().port();
        let names: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
        let initial: Vec<String> = names
            .iter()
            .zip(&ports)
            .map(|(name, (_, peer))| format!("{name}=http://127.0.0.1:{}", port(peer)))
            .collect();
        let urls: Vec<(String, String)> = ports
            .iter()
            .map(|(client, peer)| {
                (
                    format!("{scheme}://127.0.0.1:{}", port(client)),
                    format!("http://127.0.0.1:{}", port(peer)),
                )
            })
            .collect();
        drop(ports);
        let mut members = Vec::new();
        for (name, (client_url, peer_url)) in names.iter().zip(urls) {
            let mut command = Command::new("etcd");
            command
                .arg("--name")
                .arg(name)
                .arg("--data-dir")
                .arg(dir.path().join(name))
                .arg("--listen-client-urls")
                .arg(&client_url)
                .arg("--advertise-client-urls")
                .arg(&client_url)
                .arg("--listen-peer-urls")
                .arg(&peer_url)
                .arg("--initial-advertise-peer-urls")
                .arg(&peer_url)
                .arg("--initial-cluster")
                .arg(initial.join(","))
                .arg("--initial-cluster-state")
                .arg("new")
                .arg("--heartbeat-interval")
                .arg(HEARTBEAT_MS.to_string())
                .arg("--election-timeout")
                .arg(ELECTION_MS.to_string())
                .arg("--auto-compaction-retention")
                .arg("1h")
                .args(tls.iter().flat_map(|tls| {
                    [
                        "--cert-file".into(),
                        tls.path("server.pem").into_os_string(),
                        "--key-file".into(),
                        tls.path("server.key").into_os_string(),
                        "--trusted-ca-file".into(),
                        tls.path("ca.pem").into_os_string(),
                        "--client-cert-auth".into(),
                    ]
                }))
                .stdout(Stdio::null())
                .stderr(
                    std::fs::File::create(dir.path().join(format!("{name}.log")))
                        .expect("a log file"),
                );
            members.push(Member {
                name: name.clone(),
                client_url,
                child: spawn(command),
            });
        }
        let cluster = Cluster {
            _dir: dir,
            members,
            tls,
        };
        for i in 0..n {
            cluster.wait_ready(i).await;
        }
        cluster
    }

    /// Waits until member `i` answers a linearizable read (it has a
    /// leader); fails after 20 seconds.
    pub async fn wait_ready(&self, i: usize) {
        let url = self.members[i].client_url.clone();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let mut options = etcd_client::ConnectOptions::new()
                .with_connect_timeout(Duration::from_millis(500))
                .with_timeout(Duration::from_millis(500));
            if let Some(tls) = &self.tls {
                options = options.with_tls(tls.options());
            }
            if let Ok(mut client) = etcd_client::Client::connect([&url], Some(options)).await
                && client.get("ready", None).await.is_ok()
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "etcd member {url} did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Its clients' TLS files, if they must speak TLS.
    pub fn tls(&self) -> Option<&Tls> {
        self.tls.as_ref()
    }

    /// How the test's own clients of this cluster connect.
    pub fn options(&self) -> Option<etcd_client::ConnectOptions> {
        let tls = self.tls.as_ref()?;
        Some(etcd_client::ConnectOptions::new().with_tls(tls.options()))
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// A daemon configuration on member `member` only (or on all), with
    /// keys under `prefix` and leases of `ttl`.
    pub fn config(&self, prefix: &str, member: Option<usize>, ttl: Duration) -> EtcdConfig {
        let endpoints = match member {
            Some(i) => vec![self.members[i].client_url.clone()],
            None => self.endpoints(),
        };
        let mut config = EtcdConfig::new(endpoints, prefix, ttl);
        if let Some(tls) = &self.tls {
            config.ca_cert = Some(tls.path("ca.pem"));
            config.identity = Some((tls.path("client.pem"), tls.path("client.key")));
        }
        config
    }

    /// An in-process daemon on this cluster under `prefix`, talking to
    /// `member` only (or to all), with leases of `ttl`.
    pub async fn daemon(&self, prefix: &str, member: Option<usize>, ttl: Duration) -> Daemon {
        let config = self.config(prefix, member, ttl);
        Daemon::start_with(move |c| c.backend = BackendConfig::Etcd(Box::new(config))).await
    }

    /// The index of the leader, as member 0 (or the first that answers)
    /// sees it.
    pub async fn leader(&self) -> usize {
        for m in &self.members {
            let Ok(mut client) =
                etcd_client::Client::connect([&m.client_url], self.options()).await
            else {
                continue;
            };
            let Ok(status) = client.status().await else {
                continue;
            };
            let leader = status.leader();
            for (i, m) in self.members.iter().enumerate() {
                let Ok(mut c) = etcd_client::Client::connect([&m.client_url], self.options()).await
                else {
                    continue;
                };
                if c.status()
                    .await
                    .is_ok_and(|s| s.header().is_some_and(|h| h.member_id() == leader))
                {
                    return i;
                }
            }
        }
        panic!("no member knows the leader");
    }

    /// Every key under `prefix`, with its value.
    pub async fn keys(&self, prefix: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut client = etcd_client::Client::connect(self.endpoints(), self.options())
            .await
            .expect("connect to etcd");
        let got = client
            .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
            .await
            .expect("read etcd");
        got.kvs()
            .iter()
            .map(|kv| (kv.key().to_vec(), kv.value().to_vec()))
            .collect()
    }

    /// Sends `signal` to member `i`.
    pub fn signal(&self, i: usize, signal: i32) {
        crate::unix::signal(self.members[i].child.id(), signal);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            crate::unix::signal(m.child.id(), libc::SIGCONT);
            let _ = m.child.kill();
            let _ = m.child.wait();
        }
    }
}

/// The cluster the semantic tests share, each under a prefix of its own;
/// `None` (the test skips) without etcd.
pub async fn shared() -> Option<&'static Cluster> {
    static SHARED: tokio::sync::OnceCell<Cluster> = tokio::sync::OnceCell::const_new();
    if !etcd_present() {
        return None;
    }
    Some(SHARED.get_or_init(|| Cluster::start(3)).await)
}

/// A prefix no other test uses.
pub fn unique_prefix(what: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "/test/{}-{}-{}",
        what,
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}
