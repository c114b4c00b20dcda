//! The locks a command runs under, as `lockbroker lock` and `sem` tell it
//! in the environment: `LOCKBROKER_LOCK` (the innermost lock's name) and
//! `LOCKBROKER_LOCKS`, one `FENCE NAME` line per enclosing wrapper,
//! outermost first. Names have no control characters, so a newline
//! separates them safely. And, with `--detect-deadlocks`,
//! `LOCKBROKER_DETECT_DEADLOCKS` and `LOCKBROKER_ACTOR`: the actor every
//! `lockbroker` acquires for, the same in a command as in the wrapper
//! that runs it.

/// The innermost lock's name.
pub const LOCK_ENV: &str = "LOCKBROKER_LOCK";
/// Every enclosing lock, one `FENCE NAME` line each.
pub const LOCKS_ENV: &str = "LOCKBROKER_LOCKS";

/// The actor, as 16 hex digits.
pub const ACTOR_ENV: &str = "LOCKBROKER_ACTOR";

/// Set (to anything but "" or "0") by `--detect-deadlocks`, and inherited.
pub const DETECT_ENV: &str = "LOCKBROKER_DETECT_DEADLOCKS";

/// Whether this process takes part in deadlock detection: by flag, or as
/// a command of a wrapper that did.
pub fn detects(flag: bool) -> bool {
    flag || std::env::var_os(DETECT_ENV).is_some_and(|v| !v.is_empty() && v != "0")
}

/// The actor this process acquires for: an enclosing wrapper's, from
/// `LOCKBROKER_ACTOR`, so that a command run under a lock waits, for the
/// daemon, as the wrapper that holds it; else one of its own, at random.
pub fn actor() -> u64 {
    static ACTOR: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *ACTOR.get_or_init(|| {
        std::env::var(ACTOR_ENV)
            .ok()
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .filter(|a| *a != 0)
            .unwrap_or_else(|| {
                use std::hash::BuildHasher;
                // A key of its own, from the system's randomness.
                std::hash::RandomState::new()
                    .hash_one(std::process::id())
                    .max(1)
            })
    })
}

/// `actor` as `LOCKBROKER_ACTOR` spells it.
pub fn actor_text(actor: u64) -> String {
    format!("{actor:016x}")
}

/// The inherited list with `name` (held with `fence`) appended.
pub fn with(name: &str, fence: u64) -> String {
    let mut list = std::env::var(LOCKS_ENV).unwrap_or_default();
    if !list.is_empty() && !list.ends_with('\n') {
        list.push('\n');
    }
    list.push_str(&format!("{fence} {name}"));
    list
}

/// The fence of the innermost enclosing hold of `name`, if a wrapper this
/// process runs under holds it.
pub fn fence_of(name: &str) -> Option<u64> {
    let list = std::env::var(LOCKS_ENV).ok()?;
    parse(&list, name)
}

fn parse(list: &str, name: &str) -> Option<u64> {
    list.lines().rev().find_map(|line| {
        let (fence, held) = line.split_once(' ')?;
        (held == name).then(|| fence.parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_innermost_hold_of_a_name_wins() {
        let list = "7 deploy\n9 db lock\n12 deploy";
        assert_eq!(super::parse(list, "deploy"), Some(12));
        assert_eq!(super::parse(list, "db lock"), Some(9));
        assert_eq!(super::parse(list, "db"), None);
        assert_eq!(super::parse("x deploy", "deploy"), None);
    }
}
