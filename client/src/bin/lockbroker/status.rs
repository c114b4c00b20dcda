//! `lockbroker status`: the daemon's facts and every lock under a prefix,
//! as a table or as JSON.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lockbroker::Client;
use lockbroker_proto::{EntryInfo, Inspection, SessionInfo};
use serde_json::{Value, json};

use crate::exit;

/// Most entries shown.
const LIMIT: u32 = 10_000;

/// Prints the status; exit status 0.
pub async fn show(
    client: &Client,
    socket: &Path,
    prefix: &str,
    as_json: bool,
) -> Result<u8, (u8, String)> {
    let inspection = client
        .inspect_limit(prefix, LIMIT)
        .await
        .map_err(|e| (exit::UNAVAILABLE, e.to_string()))?;
    let now = now_ms();
    if as_json {
        println!("{}", to_json(&inspection, socket, now));
    } else {
        print!("{}", to_table(&inspection, socket, now));
    }
    Ok(0)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn session_json(s: &SessionInfo) -> Value {
    json!({
        "session": s.session_id,
        "pid": s.pid,
        "uid": s.uid,
        "gid": s.gid,
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

/// The JSON form: `{"daemon": {...}, "locks": [...], "truncated": bool}`.
pub fn to_json(i: &Inspection, socket: &Path, now: u64) -> Value {
    json!({
        "daemon": {
            "version": i.server.version,
            "pid": i.server.pid,
            "socket": socket.display().to_string(),
            "uptime_ms": i.server.uptime_ms,
            "sessions": i.server.sessions,
        },
        "locks": i.entries.iter().map(|e| entry_json(e, now)).collect::<Vec<_>>(),
        "truncated": i.truncated,
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
    format!("pid {:<7} uid {:<6} {client}", opt(s.pid), opt(s.uid))
}

/// The table form.
pub fn to_table(i: &Inspection, socket: &Path, now: u64) -> String {
    let mut out = String::new();
    let s = &i.server;
    let _ = writeln!(
        out,
        "lockbrokerd {} (pid {}) at {}: up {}, {} session{}",
        s.version,
        s.pid,
        socket.display(),
        human(Duration::from_millis(s.uptime_ms)),
        s.sessions,
        if s.sessions == 1 { "" } else { "s" }
    );
    if i.entries.is_empty() {
        let _ = writeln!(out, "no locks held or awaited");
        return out;
    }
    for e in &i.entries {
        let cap = match e.kind {
            lockbroker_proto::EntryKind::Semaphore => format!(" capacity {}", e.capacity),
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
    }
    if i.truncated {
        let _ = writeln!(out, "\n(more locks match; narrow the prefix)");
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
