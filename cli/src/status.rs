//! `lockbroker status`: the daemon's facts and every lock under a prefix,
//! as a table or as JSON.
//!
//! The locks are read a page at a time and printed as they come, so that
//! a daemon with a million names is listed in small steps for it (other
//! sessions are served between pages) and in one page's memory here.

use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lockbroker::Client;
use lockbroker::{EntryInfo, EntryKind, LockKind, ServerInfo, SessionInfo};
use serde_json::{Value, json};

use crate::exit;

/// Entries asked for per page.
const PAGE: u32 = 1000;

/// How the table form looks.
pub struct Layout {
    /// Its columns.
    pub columns: Vec<Column>,
    /// Whether the daemon's line and the column titles are printed.
    pub headings: bool,
}

/// Prints the status; exit status 0.
pub async fn show(
    client: &Client,
    socket: &Path,
    prefix: &str,
    as_json: bool,
    layout: &Layout,
) -> Result<u8, (u8, String)> {
    let unavailable = crate::unavailable;
    let broken = |e: std::io::Error| (exit::ERROR, format!("cannot write the status: {e}"));
    // The first page with Inspect, which every daemon answers; the next
    // ones from the last name seen.
    let mut page = client
        .inspect_limit(prefix, PAGE)
        .await
        .map_err(unavailable)?;
    let now = now_ms();
    let mut procs = Procs::new();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut listed = 0usize;
    if as_json {
        let daemon = daemon_json(&page.server, socket);
        write!(out, "{{\"daemon\":{daemon},\"locks\":[").map_err(broken)?;
    } else if layout.headings {
        write!(out, "{}", header(&page.server, socket)).map_err(broken)?;
    }
    loop {
        if as_json {
            for e in &page.entries {
                let sep = if listed == 0 { "" } else { "," };
                write!(out, "{sep}{}", entry_json(e, now, &mut procs)).map_err(broken)?;
                listed += 1;
            }
        } else {
            // Aligned a page at a time: a page is what is in memory.
            let rows: Vec<Row> = page
                .entries
                .iter()
                .flat_map(|e| rows(e, now, &mut procs))
                .collect();
            let titles = layout.headings && listed == 0;
            write!(out, "{}", table(&rows, &layout.columns, titles)).map_err(broken)?;
            listed += page.entries.len();
        }
        let Some(last) = page.entries.last().filter(|_| page.truncated) else {
            break;
        };
        let after = last.name.clone();
        page = client
            .inspect_after(prefix, &after, PAGE)
            .await
            .map_err(unavailable)?;
    }
    if as_json {
        // Every matching lock is listed: nothing is ever left out.
        writeln!(out, "],\"truncated\":false}}").map_err(broken)?;
    } else if listed == 0 {
        writeln!(out, "no locks held or awaited").map_err(broken)?;
    }
    out.flush().map_err(broken)?;
    Ok(0)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn session_json(s: &SessionInfo) -> Value {
    let named = |text: &str| (!text.is_empty()).then(|| text.to_owned());
    json!({
        "session": s.session_id,
        "host": named(&s.host),
        "pid": s.pid,
        "uid": s.uid,
        "gid": s.gid,
        "user": named(&s.user),
        "client": s.client_name,
    })
}

fn merge(mut a: Value, b: Value) -> Value {
    if let (Value::Object(a), Value::Object(b)) = (&mut a, b) {
        a.extend(b);
    }
    a
}

/// One lock in JSON: every column of the table form is there (README
/// maps them), with the protocol's own names for what it says.
fn entry_json(e: &EntryInfo, now: u64, procs: &mut Procs) -> Value {
    let mut who = |s: &SessionInfo| {
        let w = procs.who(s);
        json!({"command": w.command, "command_pid": w.pid})
    };
    let holders: Vec<Value> = e
        .holders
        .iter()
        .map(|h| {
            let row = json!({
                "hold_id": h.hold_id,
                "mode": h.kind.to_string(),
                "access": mode(h.kind, h.permits, e.capacity),
                "state": "holder",
                "permits": h.permits,
                "fence": h.fence,
                "held_ms": now.saturating_sub(h.since_ms),
            });
            merge(merge(session_json(&h.session), who(&h.session)), row)
        })
        .collect();
    let waiters: Vec<Value> = e
        .waiters
        .iter()
        .enumerate()
        .map(|(n, w)| {
            let row = json!({
                "request_id": w.request_id,
                "mode": w.kind.to_string(),
                "access": mode(w.kind, w.permits, e.capacity),
                "state": format!("waiter {}", n + 1),
                "permits": w.permits,
                "waited_ms": now.saturating_sub(w.since_ms),
                "timeout_ms": w.timeout_ms,
            });
            merge(merge(session_json(&w.session), who(&w.session)), row)
        })
        .collect();
    json!({
        "name": e.name,
        "kind": e.kind.to_string(),
        "capacity": e.capacity,
        "abandoned": e.abandoned,
        "holders": holders,
        "waiters": waiters,
    })
}

/// The `daemon` object of the JSON form, whose whole is
/// `{"daemon": {...}, "locks": [...], "truncated": false}`.
fn daemon_json(s: &ServerInfo, socket: &Path) -> Value {
    json!({
        "version": s.version,
        "pid": s.pid,
        "socket": socket.display().to_string(),
        "uptime_ms": s.uptime_ms,
        "sessions": s.sessions,
    })
}

/// A short human duration: `850ms`, `12.3s`, `4m05s`, `2h13m`.
fn human(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        0..=999 => format!("{ms}ms"),
        1_000..=59_999 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..=3_599_999 => format!("{}m{:02}s", ms / 60_000, (ms / 1000) % 60),
        _ => format!("{}h{:02}m", ms / 3_600_000, (ms / 60_000) % 60),
    }
}

/// The first line of the table form.
fn header(s: &ServerInfo, socket: &Path) -> String {
    format!(
        "lockbrokerd {} (pid {}) at {}: up {}, {} session{}\n",
        s.version,
        s.pid,
        socket.display(),
        human(Duration::from_millis(s.uptime_ms)),
        s.sessions,
        if s.sessions == 1 { "" } else { "s" }
    )
}

/// A column of the table form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column {
    Name,
    Type,
    Mode,
    State,
    Pid,
    User,
    Host,
    For,
    Fence,
    Command,
    Timeout,
    Permits,
    Session,
    Client,
    Wrapper,
    Hold,
}

/// Every column, by the name `-o` takes.
const COLUMNS: [(&str, Column); 16] = [
    ("NAME", Column::Name),
    ("TYPE", Column::Type),
    ("MODE", Column::Mode),
    ("STATE", Column::State),
    ("PID", Column::Pid),
    ("USER", Column::User),
    ("HOST", Column::Host),
    ("FOR", Column::For),
    ("FENCE", Column::Fence),
    ("COMMAND", Column::Command),
    ("TIMEOUT", Column::Timeout),
    ("PERMITS", Column::Permits),
    ("SESSION", Column::Session),
    ("CLIENT", Column::Client),
    ("WRAPPER", Column::Wrapper),
    ("HOLD", Column::Hold),
];

/// The columns shown without `-o`.
const DEFAULT_COLUMNS: [Column; 10] = [
    Column::Name,
    Column::Type,
    Column::Mode,
    Column::State,
    Column::Pid,
    Column::User,
    Column::Host,
    Column::For,
    Column::Fence,
    Column::Command,
];

impl Column {
    fn title(self) -> &'static str {
        COLUMNS
            .iter()
            .find(|(_, c)| *c == self)
            .map_or("?", |(n, _)| n)
    }
}

/// `-o`'s list: `A,B,C`, or `+A,B` for the defaults and more; names in
/// any case.
pub fn parse_columns(spec: &str) -> Result<Vec<Column>, String> {
    let (mut columns, list) = match spec.strip_prefix('+') {
        Some(more) => (DEFAULT_COLUMNS.to_vec(), more),
        None => (Vec::new(), spec),
    };
    for word in list.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        let column = COLUMNS
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(word))
            .map(|(_, c)| *c)
            .ok_or_else(|| {
                let known: Vec<&str> = COLUMNS.iter().map(|(n, _)| *n).collect();
                format!("unknown column {word:?} (columns: {})", known.join(", "))
            })?;
        columns.push(column);
    }
    if columns.is_empty() {
        return Err("no columns given".into());
    }
    Ok(columns)
}

/// The columns of the table form.
pub fn columns_or_default(spec: Option<&str>) -> Result<Vec<Column>, String> {
    spec.map_or_else(|| Ok(DEFAULT_COLUMNS.to_vec()), parse_columns)
}

/// What a holder or waiter row says, every column of it.
struct Row {
    name: String,
    kind: EntryKind,
    mode: String,
    state: String,
    who: Option<Who>,
    session: Option<u64>,
    for_ms: Option<u64>,
    fence: Option<u64>,
    hold_id: Option<u64>,
    timeout_ms: Option<u64>,
    permits: Option<u32>,
}

/// Who holds or waits: the session, and the command it serves.
#[derive(Clone)]
struct Who {
    info: SessionInfo,
    /// The command a wrapper runs (or the script `hold` serves), or the
    /// client process's command line, or its client name.
    command: String,
    /// That command's pid, when known; else the session's own.
    pid: Option<u32>,
}

/// The mode of a hold or wait: which side of the lock it takes.
fn mode(kind: LockKind, permits: u32, capacity: u32) -> String {
    match kind {
        LockKind::Mutex | LockKind::RwExclusive => "exclusive".into(),
        LockKind::RwShared => "shared".into(),
        LockKind::Semaphore => format!("{permits}/{capacity}"),
    }
}

/// Rows of one lock: its holders, its waiters in queue order, and a row
/// for a pending abandonment notice when nobody holds it.
fn rows(e: &EntryInfo, now: u64, procs: &mut Procs) -> Vec<Row> {
    let mut rows = Vec::new();
    for h in &e.holders {
        rows.push(Row {
            name: e.name.clone(),
            kind: e.kind,
            mode: mode(h.kind, h.permits, e.capacity),
            state: "holder".into(),
            who: Some(procs.who(&h.session)),
            session: Some(h.session.session_id),
            for_ms: Some(now.saturating_sub(h.since_ms)),
            fence: Some(h.fence),
            hold_id: Some(h.hold_id),
            timeout_ms: None,
            permits: Some(h.permits),
        });
    }
    for (n, w) in e.waiters.iter().enumerate() {
        rows.push(Row {
            name: e.name.clone(),
            kind: e.kind,
            mode: mode(w.kind, w.permits, e.capacity),
            state: format!("waiter {}", n + 1),
            who: Some(procs.who(&w.session)),
            session: Some(w.session.session_id),
            for_ms: Some(now.saturating_sub(w.since_ms)),
            fence: None,
            hold_id: None,
            timeout_ms: w.timeout_ms,
            permits: Some(w.permits),
        });
    }
    if e.abandoned && e.holders.is_empty() {
        rows.push(Row {
            name: e.name.clone(),
            kind: e.kind,
            mode: String::new(),
            state: "abandoned".into(),
            who: None,
            session: None,
            for_ms: None,
            fence: None,
            hold_id: None,
            timeout_ms: None,
            permits: None,
        });
    }
    rows
}

fn cell(row: &Row, column: Column) -> String {
    let dash = || "-".to_string();
    let num = |v: Option<u64>| v.map_or_else(dash, |v| v.to_string());
    let text = |v: &str| if v.is_empty() { dash() } else { v.to_owned() };
    let who = row.who.as_ref();
    match column {
        Column::Name => row.name.clone(),
        Column::Type => row.kind.to_string(),
        Column::Mode => text(&row.mode),
        Column::State => row.state.clone(),
        Column::Pid => num(who.and_then(|w| w.pid).map(u64::from)),
        Column::User => who.map_or_else(dash, |w| {
            if w.info.user.is_empty() {
                num(w.info.uid.map(u64::from))
            } else {
                w.info.user.clone()
            }
        }),
        Column::Host => who.map_or_else(dash, |w| text(&w.info.host)),
        Column::For => row
            .for_ms
            .map_or_else(dash, |ms| human(Duration::from_millis(ms))),
        Column::Fence => num(row.fence),
        Column::Hold => num(row.hold_id),
        Column::Command => who.map_or_else(dash, |w| text(&w.command)),
        Column::Timeout => row
            .timeout_ms
            .map_or_else(dash, |ms| human(Duration::from_millis(ms))),
        Column::Permits => num(row.permits.map(u64::from)),
        Column::Session => num(row.session),
        Column::Client => who.map_or_else(dash, |w| text(&w.info.client_name)),
        Column::Wrapper => num(who.and_then(|w| w.info.pid).map(u64::from)),
    }
}

/// The column titles, aligned as `table` aligns the rows.
fn table(rows: &[Row], columns: &[Column], headings: bool) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| columns.iter().map(|&c| cell(r, c)).collect())
        .collect();
    let mut widths: Vec<usize> = columns
        .iter()
        .map(|c| if headings { c.title().len() } else { 0 })
        .collect();
    for row in &cells {
        for (w, text) in widths.iter_mut().zip(row) {
            *w = (*w).max(text.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |texts: &mut dyn Iterator<Item = &str>| {
        let mut first = true;
        let mut pending = String::new();
        for (text, width) in texts.zip(&widths) {
            if !first {
                pending.push_str("  ");
            }
            first = false;
            pending.push_str(text);
            for _ in text.chars().count()..*width {
                pending.push(' ');
            }
        }
        out.push_str(pending.trim_end());
        out.push('\n');
    };
    if headings {
        line(&mut columns.iter().map(|c| c.title()));
    }
    for row in &cells {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// What this host knows of the processes behind its sessions (Linux:
/// `/proc`), looked up once per session.
#[derive(Default)]
struct Procs {
    host: Option<String>,
    known: std::collections::HashMap<u64, Who>,
}

impl Procs {
    fn new() -> Procs {
        Procs {
            host: local_host(),
            known: Default::default(),
        }
    }

    fn who(&mut self, s: &SessionInfo) -> Who {
        if let Some(w) = self.known.get(&s.session_id) {
            return w.clone();
        }
        // A process of this host (an old daemon does not say its host).
        let here = s.host.is_empty() || self.host.as_deref() == Some(s.host.as_str());
        let wrapped = crate::wrapped_command(&s.client_name);
        let (command, pid) = match wrapped {
            Some((role, command)) => {
                let pid = if here {
                    s.pid.and_then(|p| match role {
                        crate::Role::Parent => proc_parent(p),
                        crate::Role::Child => proc_child(p),
                    })
                } else {
                    None
                };
                (command.to_owned(), pid.or(s.pid))
            }
            None => {
                let line = if here {
                    s.pid.and_then(proc_cmdline)
                } else {
                    None
                };
                (line.unwrap_or_else(|| s.client_name.clone()), s.pid)
            }
        };
        let who = Who {
            info: s.clone(),
            command,
            pid,
        };
        self.known.insert(s.session_id, who.clone());
        who
    }
}

/// This host's name, as the daemon names it in sessions.
fn local_host() -> Option<String> {
    #[cfg(target_os = "linux")]
    {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// The command line of process `pid`, its words joined by spaces.
pub(crate) fn proc_cmdline(pid: u32) -> Option<String> {
    #[cfg(target_os = "linux")]
    {
        let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let words: Vec<String> = raw
            .split(|b| *b == 0)
            .filter(|w| !w.is_empty())
            .map(|w| String::from_utf8_lossy(w).into_owned())
            .collect();
        (!words.is_empty()).then(|| crate::shell_words(&words))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = pid;
        None
    }
}

/// The parent of process `pid`.
fn proc_parent(pid: u32) -> Option<u32> {
    #[cfg(target_os = "linux")]
    {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
        let after = &stat[stat.rfind(')')? + 1..];
        after.split_whitespace().nth(1)?.parse().ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = pid;
        None
    }
}

/// The first child of process `pid` (a wrapper has one: its command).
fn proc_child(pid: u32) -> Option<u32> {
    #[cfg(target_os = "linux")]
    {
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
        children.split_whitespace().next()?.parse().ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = pid;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_as_lslocks_takes_them() {
        assert_eq!(
            parse_columns("name,PID , Command").unwrap(),
            [Column::Name, Column::Pid, Column::Command]
        );
        let more = parse_columns("+session").unwrap();
        assert_eq!(more.len(), DEFAULT_COLUMNS.len() + 1);
        assert_eq!(more.last(), Some(&Column::Session));
        assert!(parse_columns("name,bogus").unwrap_err().contains("bogus"));
        assert!(parse_columns(",").is_err());
    }

    #[test]
    fn human_durations() {
        assert_eq!(human(Duration::from_millis(850)), "850ms");
        assert_eq!(human(Duration::from_millis(12_340)), "12.3s");
        assert_eq!(human(Duration::from_secs(245)), "4m05s");
        assert_eq!(human(Duration::from_secs(2 * 3600 + 13 * 60)), "2h13m");
    }
}
