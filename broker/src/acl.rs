//! Access control (`lockbrokerd --acl FILE`): who may do what to which
//! lock names and state keys, for a daemon that several users share (the
//! global scope's).
//!
//! The file is TOML, a list of rules, each for a name prefix (lock names
//! and state keys alike) and, per verb, the principals allowed:
//!
//! ```toml
//! [[rule]]
//! prefix = "deploy/"
//! acquire = ["group:deployers"]
//! inspect = ["*"]
//! ```
//!
//! For a request on a name, the rule with the longest prefix of that name
//! that speaks of the request's verb decides; no such rule, and it is
//! allowed (as without a file). A request over a prefix (an inspect, a
//! state list, a prefix watch) must also be allowed by every rule beneath
//! that prefix, so that nothing it would show is hidden behind a rule.
//! Root (uid 0) is always allowed. Refusals are `forbidden` (211).

use lockbroker_proto::{ErrorCode, ErrorInfo, Request, SessionInfo};

/// What a request does, as rules name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// Take a lock (any kind).
    Acquire,
    /// See who holds and waits (`Inspect`).
    Inspect,
    /// Read state (`StateGet`, `StateList`).
    StateRead,
    /// Write state (set, remove, increment, fenced or guarded).
    StateWrite,
    /// Watch state.
    Watch,
    /// Break others' holds.
    Break,
}

impl Verb {
    const ALL: [(&'static str, Verb); 6] = [
        ("acquire", Verb::Acquire),
        ("inspect", Verb::Inspect),
        ("state-read", Verb::StateRead),
        ("state-write", Verb::StateWrite),
        ("watch", Verb::Watch),
        ("break", Verb::Break),
    ];

    fn name(self) -> &'static str {
        Verb::ALL
            .iter()
            .find(|(_, v)| *v == self)
            .map(|(n, _)| *n)
            .expect("every verb is named")
    }
}

/// Who a rule lets through.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Principal {
    Everyone,
    /// A user, by uid (and name, which Windows peers are known by).
    User {
        uid: Option<u32>,
        name: String,
    },
    /// A group, by gid (Unix only).
    Group(u32),
}

#[derive(Debug, Clone)]
struct Rule {
    prefix: String,
    /// Per verb named in the rule, who may.
    verbs: Vec<(Verb, Vec<Principal>)>,
}

/// The rules of an ACL file.
#[derive(Debug, Clone)]
pub struct Acl {
    rules: Vec<Rule>,
}

/// How names of users and groups become ids (the system's databases, or a
/// test's).
pub struct Resolver<'a> {
    /// A user's uid by name.
    pub user: &'a dyn Fn(&str) -> Result<u32, String>,
    /// A group's gid by name.
    pub group: &'a dyn Fn(&str) -> Result<u32, String>,
}

impl Acl {
    /// Reads and checks the ACL file `path`.
    pub fn load(path: &std::path::Path) -> Result<Acl, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("reading it: {e}"))?;
        let resolver = Resolver {
            user: &crate::identity::user_id,
            group: &crate::identity::group_id,
        };
        Acl::parse(&text, &resolver)
    }

    /// Parses an ACL file's text; an unknown key, verb, user or group is an
    /// error naming it.
    pub fn parse(text: &str, resolve: &Resolver<'_>) -> Result<Acl, String> {
        let table: toml::Table = text.parse().map_err(|e| format!("{e}"))?;
        let mut rules = Vec::new();
        for (key, value) in &table {
            if key != "rule" {
                return Err(format!("unknown key {key:?} (rules are [[rule]] tables)"));
            }
            let list = value
                .as_array()
                .ok_or("`rule` must be a list of tables: [[rule]]")?;
            for (n, item) in list.iter().enumerate() {
                let at = format!("rule {}", n + 1);
                let item = item.as_table().ok_or(format!("{at}: not a table"))?;
                rules.push(parse_rule(item, &at, resolve)?);
            }
        }
        Ok(Acl { rules })
    }

    /// Whether `who` (in the supplementary `groups`) may do `verb` on
    /// `name` (or, if `prefix`, on every name starting with it); the
    /// refusal says which rule refused.
    pub fn check(
        &self,
        who: &SessionInfo,
        groups: &[u32],
        verb: Verb,
        name: &str,
        prefix: bool,
    ) -> Result<(), ErrorInfo> {
        if who.uid == Some(0) {
            return Ok(());
        }
        let speaks = |r: &&Rule| r.verbs.iter().any(|(v, _)| *v == verb);
        let governing = (self.rules.iter().filter(speaks))
            .filter(|r| name.starts_with(r.prefix.as_str()))
            .max_by_key(|r| r.prefix.len());
        let beneath = (self.rules.iter().filter(speaks))
            .filter(|r| prefix && r.prefix.starts_with(name) && r.prefix.len() > name.len());
        for rule in governing.into_iter().chain(beneath) {
            if !rule.allows(verb, who, groups) {
                let what = match prefix {
                    true => format!("names under {name:?}"),
                    false => format!("{name:?}"),
                };
                return Err(ErrorInfo::new(
                    ErrorCode::Forbidden,
                    format!(
                        "{} of {what}: the rule for {:?} does not let {} do it",
                        verb.name(),
                        rule.prefix,
                        describe(who)
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl Rule {
    fn allows(&self, verb: Verb, who: &SessionInfo, groups: &[u32]) -> bool {
        let Some((_, principals)) = self.verbs.iter().find(|(v, _)| *v == verb) else {
            return true;
        };
        principals.iter().any(|p| match p {
            Principal::Everyone => true,
            Principal::User { uid, name } => match (uid, who.uid) {
                (Some(u), Some(w)) => *u == w,
                // Windows peers are known by account name, DOMAIN\user.
                _ => {
                    !who.user.is_empty()
                        && (who.user == *name || who.user.rsplit('\\').next() == Some(name))
                }
            },
            Principal::Group(gid) => crate::identity::in_group(groups, who.gid, *gid),
        })
    }
}

fn parse_rule(item: &toml::Table, at: &str, resolve: &Resolver<'_>) -> Result<Rule, String> {
    let prefix = match item.get("prefix") {
        Some(toml::Value::String(p)) => p.clone(),
        Some(_) => return Err(format!("{at}: `prefix` must be a string")),
        None => return Err(format!("{at}: no `prefix` (\"\" for every name)")),
    };
    let mut verbs = Vec::new();
    for (key, value) in item {
        if key == "prefix" {
            continue;
        }
        let verb = Verb::ALL
            .iter()
            .find(|(n, _)| n == key)
            .map(|(_, v)| *v)
            .ok_or_else(|| {
                let known: Vec<&str> = Verb::ALL.iter().map(|(n, _)| *n).collect();
                format!("{at}: unknown verb {key:?} (one of {})", known.join(", "))
            })?;
        let list = value
            .as_array()
            .ok_or(format!("{at}: `{key}` must be a list of principals"))?;
        let mut principals = Vec::new();
        for p in list {
            let text = p
                .as_str()
                .ok_or(format!("{at}: `{key}`: principals are strings"))?;
            principals
                .push(parse_principal(text, resolve).map_err(|e| format!("{at}: `{key}`: {e}"))?);
        }
        verbs.push((verb, principals));
    }
    Ok(Rule { prefix, verbs })
}

/// `*`, `user:NAME`, `user:UID`, `group:NAME` or `group:GID`.
fn parse_principal(text: &str, resolve: &Resolver<'_>) -> Result<Principal, String> {
    if text == "*" {
        return Ok(Principal::Everyone);
    }
    if let Some(user) = text.strip_prefix("user:") {
        let uid = match user.parse::<u32>() {
            Ok(uid) => Some(uid),
            Err(_) => match (resolve.user)(user) {
                Ok(uid) => Some(uid),
                // Windows peers are matched by account name, not looked up.
                Err(_) if cfg!(windows) => None,
                Err(e) => return Err(format!("user {user:?}: {e}")),
            },
        };
        return Ok(Principal::User {
            uid,
            name: user.to_owned(),
        });
    }
    if let Some(group) = text.strip_prefix("group:") {
        let gid = (resolve.group)(group).map_err(|e| format!("group {group:?}: {e}"))?;
        return Ok(Principal::Group(gid));
    }
    Err(format!(
        "{text:?} is no principal: \"*\", \"user:NAME\", \"user:UID\", \"group:NAME\" or \"group:GID\""
    ))
}

/// "uid 1000 (alice)": who a refused caller is.
fn describe(who: &SessionInfo) -> String {
    match (who.uid, who.user.as_str()) {
        (Some(uid), "") => format!("uid {uid}"),
        (Some(uid), user) => format!("uid {uid} ({user})"),
        (None, "") => "this session".into(),
        (None, user) => user.to_owned(),
    }
}

/// What `request` does to which name, if a rule can speak of it: the
/// verb, the name or prefix, and whether it is a prefix.
pub fn access(request: &Request) -> Option<(Verb, &str, bool)> {
    Some(match request {
        Request::Acquire(a)
        | Request::AcquireAs { acquire: a, .. }
        | Request::AcquireWith { acquire: a, .. } => (Verb::Acquire, a.name.as_str(), false),
        Request::Inspect { prefix, .. } | Request::InspectAfter { prefix, .. } => {
            (Verb::Inspect, prefix.as_str(), true)
        }
        Request::StateGet { key } => (Verb::StateRead, key.as_str(), false),
        Request::StateList { prefix, .. } => (Verb::StateRead, prefix.as_str(), true),
        Request::StateSet(set) => (Verb::StateWrite, set.key.as_str(), false),
        Request::StateRemove { key, .. } | Request::StateIncrement { key, .. } => {
            (Verb::StateWrite, key.as_str(), false)
        }
        Request::StateFenced { write, .. } => return access(write),
        Request::StateWatch { key, prefix, .. } => (Verb::Watch, key.as_str(), *prefix),
        Request::Break { name, .. } => (Verb::Break, name.as_str(), false),
        // The session's own holds, waits and watches, and the daemon's
        // own counts: nothing a rule names.
        Request::Cancel { .. }
        | Request::Release { .. }
        | Request::ReleaseByName { .. }
        | Request::ExtendLease { .. }
        | Request::Ping
        | Request::Metrics
        | Request::StateUnwatch { .. }
        | Request::ReleaseOnClose => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolver() -> Resolver<'static> {
        Resolver {
            user: &|name| match name {
                "alice" => Ok(1000),
                "bob" => Ok(1001),
                _ => Err("no such user".into()),
            },
            group: &|name| match name {
                "deployers" => Ok(500),
                n => n.parse().map_err(|_| "no such group".to_string()),
            },
        }
    }

    fn acl(text: &str) -> Acl {
        Acl::parse(text, &resolver()).unwrap()
    }

    fn who(uid: u32, gid: u32) -> SessionInfo {
        SessionInfo {
            uid: Some(uid),
            gid: Some(gid),
            ..SessionInfo::default()
        }
    }

    const FILE: &str = r#"
        [[rule]]
        prefix = "deploy/"
        acquire = ["group:deployers"]
        inspect = ["*"]

        [[rule]]
        prefix = "deploy/prod/"
        acquire = ["user:alice"]

        [[rule]]
        prefix = "secrets/"
        state-read = ["user:alice", "user:1001"]
        state-write = ["user:alice"]
        watch = ["user:alice"]
        inspect = ["user:alice"]
        break = []
    "#;

    #[test]
    fn the_longest_prefix_speaking_of_the_verb_decides() {
        let a = acl(FILE);
        let (alice, bob, deployer) = (who(1000, 1000), who(1001, 1001), who(1002, 500));
        let ok = |w: &SessionInfo, v, n| a.check(w, &[], v, n, false).is_ok();
        assert!(ok(&deployer, Verb::Acquire, "deploy/web"));
        assert!(!ok(&bob, Verb::Acquire, "deploy/web"));
        // The longer rule decides: the deployer may not, alice may.
        assert!(!ok(&deployer, Verb::Acquire, "deploy/prod/db"));
        assert!(ok(&alice, Verb::Acquire, "deploy/prod/db"));
        // No rule speaks of it: allowed, as without a file.
        assert!(ok(&bob, Verb::Acquire, "other"));
        assert!(ok(&bob, Verb::StateWrite, "deploy/web"));
        assert!(ok(&bob, Verb::Inspect, "deploy/web"));
        // Per verb, by uid as a number too; an empty list lets nobody.
        assert!(ok(&bob, Verb::StateRead, "secrets/k"));
        assert!(!ok(&bob, Verb::StateWrite, "secrets/k"));
        assert!(!ok(&alice, Verb::Break, "secrets/k"));
        // Root always may.
        assert!(ok(&who(0, 0), Verb::Break, "secrets/k"));
        // A supplementary group counts as the primary one does.
        assert!(
            a.check(&bob, &[7, 500], Verb::Acquire, "deploy/web", false)
                .is_ok()
        );
        assert!(
            a.check(&bob, &[7], Verb::Acquire, "deploy/web", false)
                .is_err()
        );
    }

    #[test]
    fn a_prefix_request_needs_every_rule_beneath_it() {
        let a = acl(FILE);
        let bob = who(1001, 1001);
        // Listing everything would show secrets/, which bob may not see.
        let err = a.check(&bob, &[], Verb::Inspect, "", true).unwrap_err();
        assert_eq!(err.code, ErrorCode::Forbidden);
        assert!(
            err.message.contains("\"secrets/\"") && err.message.contains("uid 1001"),
            "{}",
            err.message
        );
        assert!(a.check(&bob, &[], Verb::Inspect, "deploy/", true).is_ok());
        assert!(
            a.check(&bob, &[], Verb::Inspect, "secrets/x", true)
                .is_err()
        );
        assert!(a.check(&who(1000, 1), &[], Verb::Inspect, "", true).is_ok());
        // The same name as an exact one is governed by its rule alone.
        assert!(a.check(&bob, &[], Verb::Watch, "secrets/k", false).is_err());
        assert!(a.check(&bob, &[], Verb::Watch, "secr", false).is_ok());
        assert!(a.check(&bob, &[], Verb::Watch, "secr", true).is_err());
    }

    #[test]
    fn a_bad_file_is_refused_naming_what_is_wrong() {
        for (text, why) in [
            ("rule = 3", "list of tables"),
            ("[[rules]]\nprefix = \"x\"", "unknown key \"rules\""),
            ("[[rule]]\nacquire = [\"*\"]", "no `prefix`"),
            ("[[rule]]\nprefix = 1", "`prefix` must be a string"),
            (
                "[[rule]]\nprefix = \"x\"\ntake = [\"*\"]",
                "unknown verb \"take\"",
            ),
            (
                "[[rule]]\nprefix = \"x\"\nacquire = \"*\"",
                "must be a list",
            ),
            (
                "[[rule]]\nprefix = \"x\"\nacquire = [1]",
                "principals are strings",
            ),
            (
                "[[rule]]\nprefix = \"x\"\nacquire = [\"root\"]",
                "is no principal",
            ),
            (
                "[[rule]]\nprefix = \"x\"\nacquire = [\"group:ops\"]",
                "group \"ops\": no such group",
            ),
            ("[[rule]\n", "TOML"),
        ] {
            let err = Acl::parse(text, &resolver()).unwrap_err();
            assert!(err.contains(why) || why == "TOML", "{text:?}: {err}");
        }
        // An unknown user stops the daemon on Unix; on Windows users are
        // matched by account name, so any name is taken.
        let unknown = Acl::parse(
            "[[rule]]\nprefix = \"x\"\nacquire = [\"user:carol\"]",
            &resolver(),
        );
        #[cfg(unix)]
        assert!(
            unknown
                .unwrap_err()
                .contains("user \"carol\": no such user")
        );
        #[cfg(windows)]
        assert!(unknown.is_ok());
    }

    #[test]
    fn every_request_on_a_name_is_governed_by_a_verb() {
        use lockbroker_proto::{Acquire, LockKind, StateSet};
        let acquire = Acquire {
            name: "n".into(),
            kind: LockKind::Mutex,
            capacity: 1,
            permits: 1,
            timeout_ms: None,
        };
        let set = Request::StateSet(StateSet {
            key: "k".into(),
            value: Vec::new(),
            if_version: None,
            ttl_ms: None,
            guard: None,
        });
        assert_eq!(
            access(&Request::Acquire(acquire.clone())),
            Some((Verb::Acquire, "n", false))
        );
        let with = Request::AcquireWith {
            acquire,
            options: Vec::new(),
        };
        assert_eq!(access(&with), Some((Verb::Acquire, "n", false)));
        assert_eq!(access(&set), Some((Verb::StateWrite, "k", false)));
        let fenced = Request::StateFenced {
            lock: "l".into(),
            fence: 1,
            write: Box::new(set),
        };
        assert_eq!(access(&fenced), Some((Verb::StateWrite, "k", false)));
        let watch = Request::StateWatch {
            key: "p/".into(),
            prefix: true,
            from_version: 0,
            with_values: false,
        };
        assert_eq!(access(&watch), Some((Verb::Watch, "p/", true)));
        assert_eq!(access(&Request::Ping), None);
    }
}
