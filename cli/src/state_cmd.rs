//! `lockbroker state ...`: the shared key/value state from the shell.

use std::io::{Read, Write};

use lockbroker::{
    ChangeKind, Client, RemoveOutcome, WatchEvent, WatchOptions, WriteOptions, WriteOutcome,
};
use serde_json::{Value, json};

use crate::args::StateCommand;
use crate::exit;

/// Exit status when the key is absent.
pub const ABSENT: u8 = 4;
/// Exit status when a version does not match.
pub const CONFLICT: u8 = 5;

type Failure = (u8, String);

/// The value argument, or standard input for `-`.
fn value_arg(value: &str) -> Result<Vec<u8>, Failure> {
    if value != "-" {
        return Ok(value.as_bytes().to_vec());
    }
    let mut buf = Vec::new();
    std::io::stdin()
        .read_to_end(&mut buf)
        .map_err(|e| (exit::ERROR, format!("reading the value from stdin: {e}")))?;
    Ok(buf)
}

/// A value in JSON: text when it is UTF-8, else hex.
fn value_json(value: &[u8]) -> Value {
    match std::str::from_utf8(value) {
        Ok(text) => json!({ "value": text }),
        Err(_) => {
            let hex: String = value.iter().map(|b| format!("{b:02x}")).collect();
            json!({ "value_hex": hex })
        }
    }
}

fn merge(mut a: Value, b: Value) -> Value {
    if let (Value::Object(a), Value::Object(b)) = (&mut a, b) {
        a.extend(b);
    }
    a
}

fn print_value(value: &[u8]) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(value);
    if !value.ends_with(b"\n") {
        let _ = out.write_all(b"\n");
    }
}

fn conflict(current: u64) -> Failure {
    let now = if current == 0 {
        "the key does not exist".to_string()
    } else {
        format!("its version is {current}")
    };
    (CONFLICT, format!("version mismatch: {now}"))
}

fn kind_name(kind: ChangeKind) -> &'static str {
    match kind {
        ChangeKind::Set => "set",
        ChangeKind::Removed => "removed",
        ChangeKind::Expired => "expired",
    }
}

/// Runs one state command; returns the exit status.
pub async fn run(client: &Client, command: &StateCommand, as_json: bool) -> Result<u8, Failure> {
    let state = client.state();
    match command {
        StateCommand::Get { key } => match state.get(key).await.map_err(crate::unavailable)? {
            Some(v) if as_json => {
                println!(
                    "{}",
                    merge(
                        json!({"key": key, "version": v.version}),
                        value_json(&v.value)
                    )
                );
                Ok(0)
            }
            Some(v) => {
                print_value(&v.value);
                Ok(0)
            }
            None => Err((ABSENT, format!("no key {key:?}"))),
        },
        StateCommand::Set {
            key,
            value,
            if_version,
            ttl,
            lock,
        } => {
            let value = value_arg(value)?;
            let mut options = WriteOptions {
                if_version: *if_version,
                ttl: *ttl,
                ..WriteOptions::default()
            };
            // Under `lockbroker lock NAME`, write with the wrapper's fence
            // instead of queueing behind the wrapper's own hold.
            let inherited = lock.as_deref().and_then(crate::held::fence_of);
            if let (Some(name), Some(fence)) = (lock, inherited) {
                options = options.fence(name.clone(), fence);
            }
            let guard = match lock {
                Some(_) if inherited.is_some() => None,
                Some(name) => Some(
                    client
                        .mutex(name.clone())
                        .acquire()
                        .await
                        .map_err(crate::unavailable)?,
                ),
                None => None,
            };
            if let Some(g) = &guard {
                options = options.guard(g);
            }
            let outcome = state
                .set_with(key, value, options)
                .await
                .map_err(crate::unavailable)?;
            if let Some(g) = guard {
                let _ = g.release().await;
            }
            match outcome {
                WriteOutcome::Written { version } => {
                    print_version(version, as_json);
                    Ok(0)
                }
                WriteOutcome::Conflict { current } => Err(conflict(current)),
            }
        }
        StateCommand::Remove { key, if_version } => {
            let options = WriteOptions {
                if_version: *if_version,
                ..WriteOptions::default()
            };
            match state
                .remove_with(key, options)
                .await
                .map_err(crate::unavailable)?
            {
                RemoveOutcome::Removed(Some(old)) => {
                    if as_json {
                        println!(
                            "{}",
                            merge(
                                json!({"key": key, "version": old.version}),
                                value_json(&old.value)
                            )
                        );
                    } else {
                        print_value(&old.value);
                    }
                    Ok(0)
                }
                RemoveOutcome::Removed(None) => Err((ABSENT, format!("no key {key:?}"))),
                RemoveOutcome::Conflict { current } => Err(conflict(current)),
            }
        }
        StateCommand::Increment { key, delta } => {
            let value = state
                .increment(key, *delta)
                .await
                .map_err(crate::unavailable)?;
            if as_json {
                println!("{}", json!({"key": key, "value": value}));
            } else {
                println!("{value}");
            }
            Ok(0)
        }
        StateCommand::Cas {
            key,
            version,
            value,
        } => {
            let value = value_arg(value)?;
            match state
                .compare_and_set(key, *version, value)
                .await
                .map_err(crate::unavailable)?
            {
                WriteOutcome::Written { version } => {
                    print_version(version, as_json);
                    Ok(0)
                }
                WriteOutcome::Conflict { current } => Err(conflict(current)),
            }
        }
        StateCommand::List { prefix, values } => {
            let entries = state
                .list(prefix, *values)
                .await
                .map_err(crate::unavailable)?;
            if as_json {
                let list: Vec<Value> = entries
                    .iter()
                    .map(|e| {
                        let base = json!({"key": e.key, "version": e.version});
                        match &e.value {
                            Some(v) => merge(base, value_json(v)),
                            None => base,
                        }
                    })
                    .collect();
                println!("{}", Value::Array(list));
            } else {
                let mut out = std::io::stdout().lock();
                for e in &entries {
                    let _ = match &e.value {
                        Some(v) => writeln!(
                            out,
                            "{}\t{}\t{}",
                            e.key,
                            e.version,
                            String::from_utf8_lossy(v)
                        ),
                        None => writeln!(out, "{}\t{}", e.key, e.version),
                    };
                }
            }
            Ok(0)
        }
        StateCommand::Watch { key, prefix, from } => {
            let (target, is_prefix) = match (key, prefix) {
                (_, Some(p)) => (p.as_str(), true),
                (Some(k), None) => (k.as_str(), false),
                (None, None) => unreachable!("clap requires one"),
            };
            let options = WatchOptions {
                prefix: is_prefix,
                from_version: *from,
                with_values: true,
            };
            let mut watch = state
                .watch_with(target, options)
                .await
                .map_err(crate::unavailable)?;
            while let Some(event) = watch.next().await {
                let mut out = std::io::stdout().lock();
                let line = match event {
                    WatchEvent::Changed {
                        key,
                        version,
                        change,
                        value,
                    } => {
                        if as_json {
                            let base = json!({"key": key, "version": version, "change": kind_name(change)});
                            match &value {
                                Some(v) => merge(base, value_json(v)).to_string(),
                                None => base.to_string(),
                            }
                        } else {
                            let value = value.map(|v| String::from_utf8_lossy(&v).into_owned());
                            match value {
                                Some(v) => format!("{version} {} {key} {v}", kind_name(change)),
                                None => format!("{version} {} {key}", kind_name(change)),
                            }
                        }
                    }
                    WatchEvent::Lagged if as_json => json!({"lagged": true}).to_string(),
                    WatchEvent::Lagged => "lagged: changes were missed; re-read the state".into(),
                };
                // A closed pipe (e.g. `| head`) ends the watch quietly.
                if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                    return Ok(0);
                }
            }
            Err((
                exit::UNAVAILABLE,
                "the connection to the daemon was lost".into(),
            ))
        }
    }
}

fn print_version(version: u64, as_json: bool) {
    if as_json {
        println!("{}", json!({ "version": version }));
    } else {
        println!("{version}");
    }
}
