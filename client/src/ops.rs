//! What each request is and what its answer means, written once for the
//! async client and the blocking one: an [`Op`] is a request to send and
//! the function that reads its answer. The clients only carry the bytes.

use std::time::Duration;

use lockbroker_proto::{
    Acquire, AcquireOption, ErrorCode, Grant, Inspection, LockName, Request, Response, StateEntry,
    StateSet, Versioned,
};

use crate::client::LockRequest;
use crate::error::{Error, Result, refused, unexpected};
use crate::state::{RemoveOutcome, WatchOptions, WriteOptions, WriteOutcome};

/// A request and how to read its answer.
pub(crate) struct Op<T> {
    /// What to send.
    pub(crate) request: Request,
    /// How to read the answer.
    pub(crate) answer: Answer<T>,
}

/// How to read the answer to one request.
pub(crate) struct Answer<T> {
    /// The request's short name, for an unexpected answer: `acquire`.
    verb: &'static str,
    /// What was asked, for a refusal: `acquire of "x"`.
    what: String,
    /// The answers other than `Error`; an answer it does not know is
    /// handed back.
    read: fn(Response) -> std::result::Result<T, Response>,
}

impl<T> Answer<T> {
    /// The outcome `response` means.
    pub(crate) fn read(self, response: Response) -> Result<T> {
        match response {
            Response::Error(e) => Err(refused(self.what, e)),
            other => (self.read)(other).map_err(|other| unexpected(self.verb, other)),
        }
    }
}

fn op<T>(
    request: Request,
    verb: &'static str,
    what: String,
    read: fn(Response) -> std::result::Result<T, Response>,
) -> Op<T> {
    Op {
        request,
        answer: Answer { verb, what, read },
    }
}

fn ms(d: Duration) -> u64 {
    // Rounded up, so a timeout of less than a millisecond still waits
    // (the wire's 0 is a try) and a TTL never becomes 0.
    let ms = d.as_millis() + u128::from(!d.subsec_nanos().is_multiple_of(1_000_000));
    u64::try_from(ms).unwrap_or(u64::MAX)
}

/// Checks a key as the daemon would (the rules of lock names), or a
/// prefix (which may also be empty), before anything is sent.
fn check_key(key: &str, prefix: bool) -> Result<()> {
    let checked = if prefix {
        lockbroker_proto::validate_prefix(key)
    } else {
        LockName::new(key).map(drop)
    };
    checked.map_err(|source| Error::InvalidName {
        name: key.to_owned(),
        source,
    })
}

/// `lock` on `name`, waiting at most `timeout`: the grant, or `None` when
/// it ran out (or a try found the lock taken).
/// An `actor` other than 0 asks for it with `AcquireAs`, or, running
/// within others, `AcquireWith`; so do `extras` (a contention event, a
/// lease), which need protocol version 4 (`version`).
pub(crate) fn acquire(
    name: &str,
    lock: LockRequest,
    timeout: Option<Duration>,
    (actor, within): (u64, &[u64]),
    extras: Extras,
    version: u16,
) -> Result<Op<Option<Grant>>> {
    let Extras {
        notify_contended,
        lease,
    } = extras;
    let checked = LockName::new(name).map_err(|source| Error::InvalidName {
        name: name.to_owned(),
        source,
    })?;
    let (kind, capacity, permits) = lock.wire();
    let acquire = Acquire {
        name: checked.into_string(),
        kind,
        capacity,
        permits,
        timeout_ms: timeout.map(ms),
    };
    if (notify_contended || lease.is_some()) && version < 4 {
        return Err(Error::Refused {
            what: format!("acquire of {name:?}"),
            code: ErrorCode::Unsupported,
            message: format!(
                "the daemon speaks protocol version {version}; contention events and leases need version 4"
            ),
        });
    }
    let plain = !notify_contended && lease.is_none();
    let request = match (actor, within, plain) {
        (0, _, true) => Request::Acquire(acquire),
        (actor, [], true) => Request::AcquireAs { actor, acquire },
        (actor, within, _) => {
            let mut options = Vec::new();
            if actor != 0 {
                options.push(AcquireOption::Actor(actor));
                if !within.is_empty() {
                    options.push(AcquireOption::Within(within.to_vec()));
                }
            }
            if notify_contended {
                options.push(AcquireOption::NotifyContended);
            }
            if let Some(lease) = lease {
                options.push(AcquireOption::Lease(ms(lease)));
            }
            Request::AcquireWith { acquire, options }
        }
    };
    Ok(op(
        request,
        "acquire",
        format!("acquire of {name:?}"),
        |r| match r {
            Response::Granted(grant) => Ok(Some(grant)),
            Response::TimedOut => Ok(None),
            other => Err(other),
        },
    ))
}

/// What a handle asks of its holds besides the lock.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Extras {
    /// Tell the hold when someone waits behind it.
    pub(crate) notify_contended: bool,
    /// Revoke the hold after this long.
    pub(crate) lease: Option<Duration>,
}

/// Makes hold `hold_id`'s lease (of `name`) end `lease` from now.
pub(crate) fn extend_lease(name: &str, hold_id: u64, lease: Duration) -> Op<()> {
    op(
        Request::ExtendLease {
            hold_id,
            lease_ms: ms(lease),
        },
        "lease extension",
        format!("lease extension on {name:?}"),
        |r| match r {
            Response::Done => Ok(()),
            other => Err(other),
        },
    )
}

/// Releases hold `hold_id` of `name`.
pub(crate) fn release(name: &str, hold_id: u64) -> Op<()> {
    op(
        Request::Release { hold_id },
        "release",
        format!("release of {name:?}"),
        |r| match r {
            Response::Released { .. } => Ok(()),
            other => Err(other),
        },
    )
}

/// Releases `count` permits of `name`, oldest holds first.
pub(crate) fn release_by_name(name: &str, count: u32) -> Op<u32> {
    let request = Request::ReleaseByName {
        name: name.to_owned(),
        count,
    };
    op(
        request,
        "release",
        format!("release of {name:?}"),
        |r| match r {
            Response::Released { permits } => Ok(permits),
            other => Err(other),
        },
    )
}

/// Breaks the holds of `name` (hold `hold_id` only, if given).
pub(crate) fn break_holds(name: &str, hold_id: Option<u64>) -> Result<Op<Vec<u64>>> {
    let checked = LockName::new(name).map_err(|source| Error::InvalidName {
        name: name.to_owned(),
        source,
    })?;
    let request = Request::Break {
        name: checked.into_string(),
        hold_id,
    };
    Ok(op(
        request,
        "break",
        format!("break of {name:?}"),
        |r| match r {
            Response::Broken { hold_ids } => Ok(hold_ids),
            other => Err(other),
        },
    ))
}

/// Ends the session's holds as released, not abandoned, when it closes.
pub(crate) fn release_on_close() -> Op<()> {
    op(
        Request::ReleaseOnClose,
        "release on close",
        "release on close".into(),
        |r| match r {
            Response::Done => Ok(()),
            other => Err(other),
        },
    )
}

/// A ping.
pub(crate) fn ping() -> Op<()> {
    op(Request::Ping, "ping", "ping".into(), |r| match r {
        Response::Pong => Ok(()),
        other => Err(other),
    })
}

/// The daemon's metrics, in the OpenMetrics text format.
pub(crate) fn metrics() -> Op<String> {
    op(Request::Metrics, "metrics", "metrics".into(), |r| match r {
        Response::Metrics { text } => Ok(text),
        other => Err(other),
    })
}

/// The lock entries under `prefix` after `start_after`; `paged` asks with
/// `InspectAfter`, else with `Inspect` (which every daemon knows).
pub(crate) fn inspect(prefix: &str, start_after: &str, limit: u32, paged: bool) -> Op<Inspection> {
    let request = if paged {
        Request::InspectAfter {
            prefix: prefix.to_owned(),
            start_after: start_after.to_owned(),
            limit,
        }
    } else {
        Request::Inspect {
            prefix: prefix.to_owned(),
            limit,
        }
    };
    op(
        request,
        "inspect",
        format!("inspect {prefix:?}"),
        |r| match r {
            Response::Inspection(i) => Ok(i),
            other => Err(other),
        },
    )
}

/// `write`, wrapped in a fenced write when `fence` names one.
fn fenced(write: Request, fence: Option<(String, u64)>) -> Request {
    match fence {
        Some((lock, fence)) => Request::StateFenced {
            lock,
            fence,
            write: Box::new(write),
        },
        None => write,
    }
}

/// The value and version at `key`.
pub(crate) fn get(key: &str) -> Result<Op<Option<Versioned>>> {
    check_key(key, false)?;
    let request = Request::StateGet { key: key.into() };
    Ok(op(request, "get", format!("get of {key:?}"), |r| match r {
        Response::StateValue(v) => Ok(v),
        other => Err(other),
    }))
}

/// Stores `value` at `key` as `options` say.
pub(crate) fn set(key: &str, value: Vec<u8>, options: WriteOptions) -> Result<Op<WriteOutcome>> {
    check_key(key, false)?;
    let write = Request::StateSet(StateSet {
        key: key.into(),
        value,
        if_version: options.if_version,
        ttl_ms: options.ttl.map(ms),
        guard: options.guard,
    });
    let request = fenced(write, options.fence);
    Ok(op(request, "set", format!("set of {key:?}"), |r| match r {
        Response::StateWritten { version } => Ok(WriteOutcome::Written { version }),
        Response::StateConflict { current } => Ok(WriteOutcome::Conflict { current }),
        other => Err(other),
    }))
}

/// Removes `key` as `options` say (`ttl` is ignored).
pub(crate) fn remove(key: &str, options: WriteOptions) -> Result<Op<RemoveOutcome>> {
    check_key(key, false)?;
    let write = Request::StateRemove {
        key: key.into(),
        if_version: options.if_version,
        guard: options.guard,
    };
    let request = fenced(write, options.fence);
    Ok(op(
        request,
        "remove",
        format!("remove of {key:?}"),
        |r| match r {
            Response::StateRemoved(old) => Ok(RemoveOutcome::Removed(old)),
            Response::StateConflict { current } => Ok(RemoveOutcome::Conflict { current }),
            other => Err(other),
        },
    ))
}

/// Adds `delta` to the counter at `key`, guarded by hold `guard` or by
/// `fence` if given; the new value.
pub(crate) fn increment(
    key: &str,
    delta: i64,
    guard: Option<u64>,
    fence: Option<(String, u64)>,
) -> Result<Op<i64>> {
    check_key(key, false)?;
    let write = Request::StateIncrement {
        key: key.into(),
        delta,
        guard,
    };
    let request = fenced(write, fence);
    Ok(op(
        request,
        "increment",
        format!("increment of {key:?}"),
        |r| match r {
            Response::StateCounter { value, .. } => Ok(value),
            other => Err(other),
        },
    ))
}

/// One page of keys under `prefix` after `start_after`, and whether more
/// follow.
pub(crate) fn list_page(
    prefix: &str,
    start_after: &str,
    limit: u32,
    with_values: bool,
) -> Result<Op<(Vec<StateEntry>, bool)>> {
    check_key(prefix, true)?;
    let request = Request::StateList {
        prefix: prefix.into(),
        start_after: start_after.into(),
        limit,
        with_values,
    };
    Ok(op(
        request,
        "list",
        format!("list of {prefix:?}"),
        |r| match r {
            Response::StateEntries { entries, more } => Ok((entries, more)),
            other => Err(other),
        },
    ))
}

/// Starts a watch of `key` as `options` say; answered `Done`.
pub(crate) fn watch(key: &str, options: &WatchOptions) -> Result<Op<()>> {
    check_key(key, options.prefix)?;
    let request = Request::StateWatch {
        key: key.into(),
        prefix: options.prefix,
        from_version: options.from_version,
        with_values: options.with_values,
    };
    Ok(op(
        request,
        "watch",
        format!("watch of {key:?}"),
        |r| match r {
            Response::Done => Ok(()),
            other => Err(other),
        },
    ))
}

/// The written version of an unconditional write.
pub(crate) fn written(outcome: WriteOutcome) -> Result<u64> {
    match outcome {
        WriteOutcome::Written { version } => Ok(version),
        WriteOutcome::Conflict { .. } => Err(Error::Protocol(
            "an unconditional write reported a conflict".into(),
        )),
    }
}

/// What an unconditional remove removed.
pub(crate) fn removed(outcome: RemoveOutcome) -> Result<Option<Versioned>> {
    match outcome {
        RemoveOutcome::Removed(old) => Ok(old),
        RemoveOutcome::Conflict { .. } => Err(Error::Protocol(
            "an unconditional remove reported a conflict".into(),
        )),
    }
}

/// A state value decoded from JSON.
pub(crate) fn from_json<T: serde::de::DeserializeOwned>(
    key: &str,
    value: Option<Versioned>,
) -> Result<Option<(T, u64)>> {
    match value {
        None => Ok(None),
        Some(v) => {
            let value = serde_json::from_slice(&v.value).map_err(|e| Error::Json {
                key: key.into(),
                source: e,
            })?;
            Ok(Some((value, v.version)))
        }
    }
}

/// A value encoded as JSON for `key`.
pub(crate) fn to_json<T: serde::Serialize + ?Sized>(key: &str, value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| Error::Json {
        key: key.into(),
        source: e,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeout_below_a_millisecond_still_waits() {
        assert_eq!(ms(Duration::ZERO), 0);
        assert_eq!(ms(Duration::from_nanos(1)), 1);
        assert_eq!(ms(Duration::from_micros(500)), 1);
        assert_eq!(ms(Duration::from_millis(2)), 2);
        assert_eq!(ms(Duration::from_micros(2001)), 3);
        assert_eq!(ms(Duration::MAX), u64::MAX);
    }
}
