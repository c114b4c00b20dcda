//! A Redis lock the standard way: `SET key token NX PX 30000` to take it,
//! a compare-and-delete Lua script to release it, over Redis's Unix socket
//! — against a `redis-server` the harness starts on a temporary socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use crate::floor::drive;
use crate::run::{Measure, Sample, Server, pinned};

const RELEASE: &str = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end";

/// Whether `redis-server` is on the PATH.
pub fn available() -> bool {
    std::process::Command::new("redis-server")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn command(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
    }
    out
}

/// Reads one simple reply line (`+OK`, `:1`, `$-1`...).
fn reply(r: &mut BufReader<UnixStream>) -> String {
    let mut line = String::new();
    r.read_line(&mut line).expect("redis reply");
    line
}

struct Conn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    key: String,
    token: String,
}

impl Conn {
    fn new(socket: &Path, i: usize) -> Conn {
        let stream = UnixStream::connect(socket).expect("connect to redis");
        Conn {
            reader: BufReader::new(stream.try_clone().expect("clone")),
            writer: stream,
            key: format!("bench:lock:{i}"),
            token: format!("token-{i}-{}", std::process::id()),
        }
    }
}

/// A `redis-server` on a temporary Unix socket, pinned as `m` says, with
/// nothing saved.
pub fn server(m: &Measure) -> Server {
    Server::start(|socket| {
        let mut cmd = pinned(m.placement.server_cpu(), Path::new("redis-server"));
        cmd.args(["--port", "0", "--save", "", "--appendonly", "no"])
            .arg("--unixsocket")
            .arg(socket);
        cmd
    })
}

/// Uncontended lock cycles, each client on its own key.
pub fn run(m: &Measure) -> Sample {
    let server = server(m);
    let socket = server.socket.clone();
    let mut next = 0;
    drive(
        m,
        move || {
            next += 1;
            Conn::new(&socket, next)
        },
        |c| {
            let set = command(&["SET", &c.key, &c.token, "NX", "PX", "30000"]);
            c.writer.write_all(&set).expect("write");
            let ok = reply(&mut c.reader);
            assert!(ok.starts_with("+OK"), "lock not taken: {ok}");
            let del = command(&["EVAL", RELEASE, "1", &c.key, &c.token]);
            c.writer.write_all(&del).expect("write");
            let n = reply(&mut c.reader);
            assert!(n.starts_with(":1"), "lock not released: {n}");
        },
    )
}
