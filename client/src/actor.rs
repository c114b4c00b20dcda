//! `LOCKBROKER_ACTOR`: the actors a command run under a lock runs within,
//! as `lockbroker lock` passes them to it, for the daemon's deadlock
//! detection (PROTOCOL.md 8.11). The variable holds the wrapper's actor
//! and those it runs within, nearest first, each as 16 hex digits,
//! separated by commas: `00c0ffee00c0ffee,0123456789abcdef`.

use lockbroker_proto::MAX_WITHIN;

/// The variable's name.
pub const ACTOR_ENV: &str = "LOCKBROKER_ACTOR";

/// The actors `text` names, nearest first, at most
/// [`MAX_WITHIN`]; none if any of them is not 1–16 hex digits or is 0 (a
/// damaged variable takes no part rather than a wrong one).
pub fn parse(text: &str) -> Vec<u64> {
    let parsed: Option<Vec<u64>> = text
        .trim()
        .split(',')
        .map(|a| {
            let a = a.trim();
            let valid = (1..=16).contains(&a.len()) && a.bytes().all(|b| b.is_ascii_hexdigit());
            valid
                .then(|| u64::from_str_radix(a, 16).ok())
                .flatten()
                .filter(|a| *a != 0)
        })
        .collect();
    let mut actors = parsed.unwrap_or_default();
    actors.truncate(MAX_WITHIN);
    actors
}

/// `actors` as the variable spells them (the nearest [`MAX_WITHIN`]).
pub fn text(actors: &[u64]) -> String {
    let kept = &actors[..actors.len().min(MAX_WITHIN)];
    kept.iter()
        .map(|a| format!("{a:016x}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The actors this process runs within, from its environment: none
/// outside a `lockbroker lock` (or when the variable is damaged).
pub fn inherited() -> Vec<u64> {
    std::env::var(ACTOR_ENV)
        .map(|v| parse(&v))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_variable_reads_back_what_was_written() {
        let chain = [0x00c0_ffee_00c0_ffee, 0x2a, u64::MAX];
        assert_eq!(
            text(&chain),
            "00c0ffee00c0ffee,000000000000002a,ffffffffffffffff"
        );
        assert_eq!(parse(&text(&chain)), chain);
        // One actor, as version 3's lockbroker wrote it, with a newline.
        assert_eq!(parse(" 00000000000000ff\n"), [255]);
        // The nearest MAX_WITHIN are kept.
        let long: Vec<u64> = (1..=40).collect();
        assert_eq!(parse(&text(&long)), &long[..MAX_WITHIN]);
        assert_eq!(text(&long).split(',').count(), MAX_WITHIN);
    }

    #[test]
    fn a_damaged_variable_names_no_actor() {
        for bad in [
            "",
            "xyz",
            "0",
            "2a,,3",
            "2a,0",
            "+2a",
            "00000000000000001",
            "2a;3",
            "2a, -3",
        ] {
            assert_eq!(parse(bad), Vec::<u64>::new(), "{bad:?}");
        }
    }
}
