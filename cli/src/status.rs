//! `lockbroker status`: the daemon's facts and every lock under a prefix,
//! as a table or as JSON.
//!
//! The locks are read a page at a time and printed as they come, so that
//! a daemon with a million names is listed in small steps for it (other
//! sessions are served between pages) and in one page's memory here.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lockbroker::Client;
use lockbroker::{EntryInfo, EntryKind, ServerInfo, SessionInfo};
use serde_json::{Value, json};

use crate::exit;

/// Entries asked for per page.
const PAGE: u32 = 1000;

/// Prints the status; exit status 0.
pub async fn show(
    client: &Client,
    socket: &Path,
    prefix: &str,
    as_json: bool,
) -> Result<u8, (u8, String)> {
    let unavailable = |e: lockbroker::Error| (exit::UNAVAILABLE, e.to_string());
    let broken = |e: std::io::Error| (exit::ERROR, format!("cannot write the status: {e}"));
    // The first page with Inspect, which every daemon answers; the next
    // ones from the last name seen.
    let mut page = client
        .inspect_limit(prefix, PAGE)
        .await
        .map_err(unavailable)?;
    let now = now_ms();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut listed = 0usize;
    if as_json {
        let daemon = daemon_json(&page.server, socket);
        write!(out, "{{\"daemon\":{daemon},\"locks\":[").map_err(broken)?;
    } else {
        write!(out, "{}", header(&page.server, socket)).map_err(broken)?;
    }
    loop {
        for e in &page.entries {
            if as_json {
                let sep = if listed == 0 { "" } else { "," };
                write!(out, "{sep}{}", entry_json(e, now)).map_err(broken)?;
            } else {
                write!(out, "{}", entry_block(e, now)).map_err(broken)?;
            }
            listed += 1;
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

fn entry_json(e: &EntryInfo, now: u64) -> Value {
    json!({
        "name": e.name,
        "kind": e.kind.to_string(),
        "capacity": e.capacity,
        "abandoned": e.abandoned,
        "holders": e.holders.iter().map(|h| merge(session_json(&h.session), json!({
            "hold_id": h.hold_id,
            "mode": h.kind.to_string(),
            "permits": h.permits,
            "fence": h.fence,
            "held_ms": now.saturating_sub(h.since_ms),
        }))).collect::<Vec<_>>(),
        "waiters": e.waiters.iter().map(|w| merge(session_json(&w.session), json!({
            "request_id": w.request_id,
            "mode": w.kind.to_string(),
            "permits": w.permits,
            "waited_ms": now.saturating_sub(w.since_ms),
            "timeout_ms": w.timeout_ms,
        }))).collect::<Vec<_>>(),
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

fn who(s: &SessionInfo) -> String {
    let opt = |v: Option<u32>| v.map_or("-".to_string(), |v| v.to_string());
    let client = if s.client_name.is_empty() {
        "-"
    } else {
        &s.client_name
    };
    // The account's name where its host knows it, else its number.
    let user = if s.user.is_empty() {
        format!("uid {:<6}", opt(s.uid))
    } else {
        format!("user {}", s.user)
    };
    // Which host, for daemons that share an etcd cluster.
    let host = if s.host.is_empty() {
        String::new()
    } else {
        format!(" on {}", s.host)
    };
    format!("pid {:<7} {user}{host} {client}", opt(s.pid))
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

/// One lock of the table form: its line, then its holders and waiters.
fn entry_block(e: &EntryInfo, now: u64) -> String {
    let mut out = String::new();
    let cap = match e.kind {
        EntryKind::Semaphore => format!(" capacity {}", e.capacity),
        _ => String::new(),
    };
    let flag = if e.abandoned {
        "  [abandoned: next holder is told]"
    } else {
        ""
    };
    let _ = writeln!(out, "\n{}  {}{cap}{flag}", e.name, e.kind);
    for h in &e.holders {
        let held = human(Duration::from_millis(now.saturating_sub(h.since_ms)));
        let _ = writeln!(
            out,
            "  holder   {}  {} x{}  held {held}  fence {}",
            who(&h.session),
            h.kind,
            h.permits,
            h.fence
        );
    }
    for (n, w) in e.waiters.iter().enumerate() {
        let waited = human(Duration::from_millis(now.saturating_sub(w.since_ms)));
        let limit = w.timeout_ms.map_or(String::new(), |t| {
            format!(" of {}", human(Duration::from_millis(t)))
        });
        let _ = writeln!(
            out,
            "  waiter {:<2}{}  {} x{}  waiting {waited}{limit}",
            n + 1,
            who(&w.session),
            w.kind,
            w.permits
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_durations() {
        assert_eq!(human(Duration::from_millis(850)), "850ms");
        assert_eq!(human(Duration::from_millis(12_340)), "12.3s");
        assert_eq!(human(Duration::from_secs(245)), "4m05s");
        assert_eq!(human(Duration::from_secs(2 * 3600 + 13 * 60)), "2h13m");
    }
}
