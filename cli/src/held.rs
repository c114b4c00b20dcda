//! The locks a command runs under, as `lockbroker lock` and `sem` tell it
//! in the environment: `LOCKBROKER_LOCK` (the innermost lock's name) and
//! `LOCKBROKER_LOCKS`, one `FENCE NAME` line per enclosing wrapper,
//! outermost first. Names have no control characters, so a newline
//! separates them safely. And `LOCKBROKER_ACTOR`: the actors a command
//! runs within (its wrapper's, then theirs), for deadlock detection.

/// The innermost lock's name.
pub const LOCK_ENV: &str = "LOCKBROKER_LOCK";
/// Every enclosing lock, one `FENCE NAME` line each.
pub const LOCKS_ENV: &str = "LOCKBROKER_LOCKS";

pub use lockbroker::actor::ACTOR_ENV;

/// The actor this process acquires for: one of its own, at random, which
/// runs within the actors of the wrappers it runs under ([`within`]).
pub fn actor() -> u64 {
    static ACTOR: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *ACTOR.get_or_init(|| {
        use std::hash::BuildHasher;
        // A key of its own, from the system's randomness.
        std::hash::RandomState::new()
            .hash_one(std::process::id())
            .max(1)
    })
}

/// The actors this process runs within: its wrappers', nearest first.
pub fn within() -> &'static [u64] {
    static WITHIN: std::sync::OnceLock<Vec<u64>> = std::sync::OnceLock::new();
    WITHIN.get_or_init(lockbroker::actor::inherited)
}

/// `LOCKBROKER_ACTOR` for a command this process runs under its lock: it
/// runs within this process's actor and those this one runs within.
pub fn command_actors() -> String {
    let mut chain = vec![actor()];
    chain.extend_from_slice(within());
    lockbroker::actor::text(&chain)
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
