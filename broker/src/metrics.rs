//! What the daemon counts for its operators, in the OpenMetrics text
//! format: served over HTTP by `--metrics-listen` ([`http`]) and answered
//! to the `Metrics` request (`lockbroker metrics`).
//!
//! Sessions do the counting, since every outcome of every request passes
//! through the session that asked, whichever backend decided it. Labels
//! come from fixed sets only (the lock kind, the state operation, the
//! error code): never a lock name or a key, so what the daemon keeps for
//! its metrics does not grow with what clients do. The metrics of one
//! kind are looked up once, at start, so counting is an atomic add.

pub mod http;

use std::time::Duration;

use lockbroker_proto::{ErrorCode, LockKind};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

/// The content type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds of the wait-time buckets, in seconds: 10 µs to 100 s.
const WAIT_BUCKETS: [f64; 22] = [
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0,
];

/// Upper bounds of the hold-time buckets, in seconds: 100 µs to an hour.
const HOLD_BUCKETS: [f64; 22] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// The kinds, in [`kind_index`] order, as the `kind` label spells them.
const KINDS: [(LockKind, &str); 4] = [
    (LockKind::Mutex, "mutex"),
    (LockKind::Semaphore, "semaphore"),
    (LockKind::RwShared, "rwlock_shared"),
    (LockKind::RwExclusive, "rwlock_exclusive"),
];

fn kind_index(kind: LockKind) -> usize {
    match kind {
        LockKind::Mutex => 0,
        LockKind::Semaphore => 1,
        LockKind::RwShared => 2,
        LockKind::RwExclusive => 3,
    }
}

/// A state request, for the `op` label ([`STATE_OPS`] in this order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateOp {
    /// `StateGet`.
    Get,
    /// `StateSet`.
    Set,
    /// `StateRemove`.
    Remove,
    /// `StateIncrement`.
    Increment,
    /// `StateList`.
    List,
    /// `StateWatch`.
    Watch,
    /// `StateUnwatch`.
    Unwatch,
}

/// The `op` labels, in [`StateOp`] order.
const STATE_OPS: [&str; 7] = [
    "get",
    "set",
    "remove",
    "increment",
    "list",
    "watch",
    "unwatch",
];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    commit: &'static str,
}

/// The metrics of one lock kind.
#[derive(Debug, Clone)]
struct OfKind {
    holds: Gauge,
    waiters: Gauge,
    grants: Counter,
    abandoned_grants: Counter,
    timeouts: Counter,
    cancels: Counter,
    abandons: Counter,
    wait: Histogram,
    hold: Histogram,
}

/// Everything the daemon counts, and the registry that encodes it.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    kinds: [OfKind; 4],
    state_ops: [Counter; 7],
    refusals: Family<CodeLabel, Counter>,
    sessions: Gauge,
    sessions_opened: Counter,
    state_keys: Gauge,
    state_bytes: Gauge,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    /// Every metric at zero, registered under the `lockbroker_` prefix.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("lockbroker");
        registry.register(
            "build",
            "The daemon's version and the git commit it was built from",
            Info::new(BuildLabels {
                version: crate::VERSION,
                commit: crate::COMMIT,
            }),
        );
        let sessions = Gauge::default();
        registry.register("sessions", "Sessions open now", sessions.clone());
        let sessions_opened = Counter::default();
        registry.register(
            "sessions_opened",
            "Sessions opened since the daemon started",
            sessions_opened.clone(),
        );

        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let family = Family::<KindLabel, Gauge>::default();
            registry.register(name, help, family.clone());
            family
        };
        let counter = |registry: &mut Registry, name: &str, help: &str| {
            let family = Family::<KindLabel, Counter>::default();
            registry.register(name, help, family.clone());
            family
        };
        let histogram = |registry: &mut Registry, name: &str, help: &str, buckets: fn() -> _| {
            let family = Family::<KindLabel, Histogram, _>::new_with_constructor(buckets);
            registry.register_with_unit(name, help, Unit::Seconds, family.clone());
            family
        };
        let holds = gauge(&mut registry, "holds", "Holds granted and not yet ended");
        let waiters = gauge(&mut registry, "waiters", "Acquires waiting in a queue");
        let grants = counter(&mut registry, "grants", "Acquires granted");
        let abandoned_grants = counter(
            &mut registry,
            "abandoned_grants",
            "Grants that told their holder the lock was abandoned",
        );
        let timeouts = counter(
            &mut registry,
            "timeouts",
            "Acquires whose timeout ran out (tries that found the lock taken included)",
        );
        let cancels = counter(&mut registry, "cancels", "Waiting acquires cancelled");
        let abandons = counter(
            &mut registry,
            "abandons",
            "Holds ended because their session ended without releasing them",
        );
        let wait: Family<KindLabel, Histogram, fn() -> Histogram> = histogram(
            &mut registry,
            "wait",
            "How long granted acquires waited",
            || Histogram::new(WAIT_BUCKETS),
        );
        let hold: Family<KindLabel, Histogram, fn() -> Histogram> = histogram(
            &mut registry,
            "hold",
            "How long ended holds were held",
            || Histogram::new(HOLD_BUCKETS),
        );
        let kinds = KINDS.map(|(_, kind)| {
            let label = KindLabel { kind };
            OfKind {
                holds: holds.get_or_create_owned(&label),
                waiters: waiters.get_or_create_owned(&label),
                grants: grants.get_or_create_owned(&label),
                abandoned_grants: abandoned_grants.get_or_create_owned(&label),
                timeouts: timeouts.get_or_create_owned(&label),
                cancels: cancels.get_or_create_owned(&label),
                abandons: abandons.get_or_create_owned(&label),
                wait: wait.get_or_create_owned(&label),
                hold: hold.get_or_create_owned(&label),
            }
        });

        let ops = Family::<OpLabel, Counter>::default();
        registry.register("state_ops", "State requests, by operation", ops.clone());
        let state_ops = STATE_OPS.map(|op| ops.get_or_create_owned(&OpLabel { op }));
        let state_keys = Gauge::default();
        registry.register(
            "state_keys",
            "Keys in the shared state (kept by this daemon; not with --backend etcd)",
            state_keys.clone(),
        );
        let state_bytes = Gauge::default();
        registry.register_with_unit(
            "state",
            "Bytes the shared state's keys and values take, as its quotas count them \
             (kept by this daemon; not with --backend etcd)",
            Unit::Bytes,
            state_bytes.clone(),
        );
        let refusals = Family::<CodeLabel, Counter>::default();
        registry.register(
            "refusals",
            "Requests answered with an error, and connections ended by one, by error code",
            refusals.clone(),
        );
        Metrics {
            registry,
            kinds,
            state_ops,
            refusals,
            sessions,
            sessions_opened,
            state_keys,
            state_bytes,
        }
    }

    fn of(&self, kind: LockKind) -> &OfKind {
        &self.kinds[kind_index(kind)]
    }

    /// An acquire of `kind` was granted after waiting `waited`; `abandoned`
    /// as its grant says.
    pub fn granted(&self, kind: LockKind, waited: Duration, abandoned: bool) {
        let of = self.of(kind);
        of.grants.inc();
        if abandoned {
            of.abandoned_grants.inc();
        }
        of.holds.inc();
        of.wait.observe(waited.as_secs_f64());
    }

    /// An acquire of `kind` started waiting in a queue.
    pub fn queued(&self, kind: LockKind) {
        self.of(kind).waiters.inc();
    }

    /// A waiting acquire of `kind` left its queue (granted, timed out,
    /// cancelled, refused, or its session ended).
    pub fn dequeued(&self, kind: LockKind) {
        self.of(kind).waiters.dec();
    }

    /// An acquire of `kind` timed out (or a try found the lock taken).
    pub fn timed_out(&self, kind: LockKind) {
        self.of(kind).timeouts.inc();
    }

    /// A waiting acquire of `kind` was cancelled.
    pub fn cancelled(&self, kind: LockKind) {
        self.of(kind).cancels.inc();
    }

    /// A hold of `kind` ended after `held`; `abandoned` if its session
    /// ended without releasing it.
    pub fn hold_ended(&self, kind: LockKind, held: Duration, abandoned: bool) {
        let of = self.of(kind);
        of.holds.dec();
        of.hold.observe(held.as_secs_f64());
        if abandoned {
            of.abandons.inc();
        }
    }

    /// A state request `op` was received.
    pub fn state_op(&self, op: StateOp) {
        self.state_ops[op as usize].inc();
    }

    /// A request was answered with, or a connection ended by, `code`.
    pub fn refused(&self, code: ErrorCode) {
        self.refusals
            .get_or_create(&CodeLabel {
                code: code.to_string(),
            })
            .inc();
    }

    /// A session was opened.
    pub fn session_opened(&self) {
        self.sessions_opened.inc();
    }

    /// The text of every metric, with `sessions` open now and the state's
    /// `(keys, bytes)` where this daemon keeps it.
    pub fn render(&self, sessions: u64, state: Option<(u64, u64)>) -> String {
        self.sessions.set(clamp(sessions));
        let (keys, bytes) = state.unwrap_or_default();
        self.state_keys.set(clamp(keys));
        self.state_bytes.set(clamp(bytes));
        let mut text = String::with_capacity(16 * 1024);
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String does not fail");
        text
    }
}

fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_show_in_the_text_by_kind_and_code() {
        let m = Metrics::new();
        m.queued(LockKind::Semaphore);
        m.granted(LockKind::Semaphore, Duration::from_millis(3), true);
        m.dequeued(LockKind::Semaphore);
        m.granted(LockKind::Mutex, Duration::ZERO, false);
        m.hold_ended(LockKind::Mutex, Duration::from_secs(2), true);
        m.refused(ErrorCode::TooManyHolds);
        m.state_op(StateOp::Increment);
        let text = m.render(3, Some((4, 120)));
        for line in [
            r#"lockbroker_grants_total{kind="semaphore"} 1"#,
            r#"lockbroker_abandoned_grants_total{kind="semaphore"} 1"#,
            r#"lockbroker_holds{kind="semaphore"} 1"#,
            r#"lockbroker_waiters{kind="semaphore"} 0"#,
            r#"lockbroker_holds{kind="mutex"} 0"#,
            r#"lockbroker_abandons_total{kind="mutex"} 1"#,
            r#"lockbroker_hold_seconds_count{kind="mutex"} 1"#,
            r#"lockbroker_wait_seconds_bucket{le="0.005",kind="semaphore"} 1"#,
            r#"lockbroker_wait_seconds_bucket{le="0.0025",kind="semaphore"} 0"#,
            r#"lockbroker_refusals_total{code="too_many_holds"} 1"#,
            r#"lockbroker_state_ops_total{op="increment"} 1"#,
            "lockbroker_sessions 3",
            "lockbroker_state_keys 4",
            "lockbroker_state_bytes 120",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
