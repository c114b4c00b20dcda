//! The store's durable half: one `redb` database in the state directory.
//!
//! Every write is one committed transaction that changes the key and
//! records the daemon-wide version, so the store answers a write only once
//! it is on disk. At start the database is loaded whole (expired keys
//! dropped) and the fence epoch is bumped and committed, so that fences
//! never go backwards across restarts. A database that cannot be opened or
//! read stops the daemon: it never silently starts with empty state.

use std::path::{Path, PathBuf};

use lockbroker_proto::{ErrorCode, ErrorInfo};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use super::record::Record;
use crate::error::StartError;

/// The database file inside the state directory.
pub const DB_FILE: &str = "state.redb";

const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("keys");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const LAST_VERSION: &str = "last_version";
const FENCE_EPOCH: &str = "fence_epoch";

/// The open database.
pub(super) struct Database {
    db: redb::Database,
    path: PathBuf,
}

/// What a database held at start.
pub(super) struct Loaded {
    /// Every key not yet expired, with its record.
    pub(super) entries: Vec<(String, Record)>,
    /// Keys dropped because their time ran out while the daemon was down.
    pub(super) expired: usize,
    /// The last version given to a change.
    pub(super) last_version: u64,
    /// The fence epoch of this run (already committed).
    pub(super) epoch: u64,
}

impl Database {
    /// Opens (or creates) the database in `dir`, creating the directory
    /// (0700) if it is missing, and loads it as of `now_ms`.
    pub(super) fn open(dir: &Path, now_ms: u64) -> Result<(Database, Loaded), StartError> {
        create_private_dir(dir)?;
        let path = dir.join(DB_FILE);
        let refuse = |e: &dyn std::fmt::Display| StartError::StateDatabase {
            path: path.clone(),
            reason: e.to_string(),
        };
        let db = redb::Database::create(&path).map_err(|e| refuse(&e))?;
        let loaded = load(&db, now_ms).map_err(|e| refuse(&e))?;
        Ok((Database { db, path }, loaded))
    }

    /// Stores `record` under `key` and records `version`, committed.
    pub(super) fn put(&self, key: &str, record: &Record, version: u64) -> Result<(), ErrorInfo> {
        self.commit(version, |keys| {
            keys.insert(key, record.encode().as_slice())?;
            Ok(())
        })
    }

    /// Removes `key` and records `version`, committed.
    pub(super) fn remove(&self, key: &str, version: u64) -> Result<(), ErrorInfo> {
        self.commit(version, |keys| {
            keys.remove(key)?;
            Ok(())
        })
    }

    /// Applies `change` to the keys table and records `version`, in one
    /// committed transaction.
    fn commit(
        &self,
        version: u64,
        change: impl FnOnce(&mut redb::Table<&str, &[u8]>) -> Result<(), redb::Error>,
    ) -> Result<(), ErrorInfo> {
        let result = (|| -> Result<(), redb::Error> {
            let write = self.db.begin_write()?;
            {
                let mut keys = write.open_table(KEYS)?;
                change(&mut keys)?;
                let mut meta = write.open_table(META)?;
                meta.insert(LAST_VERSION, version)?;
            }
            write.commit()?;
            Ok(())
        })();
        result.map_err(|e| {
            let e = format!("{}: {e}", self.path.display());
            tracing::error!(error = %e, "state storage failed");
            ErrorInfo::new(ErrorCode::Internal, format!("state storage failed: {e}"))
        })
    }
}

/// Loads every entry, drops expired ones, and bumps the fence epoch.
fn load(db: &redb::Database, now_ms: u64) -> Result<Loaded, redb::Error> {
    let mut loaded = Loaded {
        entries: Vec::new(),
        expired: 0,
        last_version: 0,
        epoch: 0,
    };
    let mut expired = Vec::new();
    {
        let read = db.begin_read()?;
        match read.open_table(META) {
            Ok(meta) => {
                loaded.last_version = meta.get(LAST_VERSION)?.map_or(0, |v| v.value());
                loaded.epoch = meta.get(FENCE_EPOCH)?.map_or(0, |v| v.value());
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(e.into()),
        }
        match read.open_table(KEYS) {
            Ok(keys) => {
                for item in keys.iter()? {
                    let (k, v) = item?;
                    let key = k.value().to_owned();
                    let record = Record::decode(v.value()).ok_or_else(|| {
                        redb::Error::Corrupted(format!("record of key {key:?} is malformed"))
                    })?;
                    loaded.last_version = loaded.last_version.max(record.version);
                    if record.expires_ms != 0 && record.expires_ms <= now_ms {
                        expired.push(key);
                    } else {
                        loaded.entries.push((key, record));
                    }
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    loaded.epoch += 1;
    loaded.expired = expired.len();
    let write = db.begin_write()?;
    {
        let mut keys = write.open_table(KEYS)?;
        for key in &expired {
            keys.remove(key.as_str())?;
        }
        let mut meta = write.open_table(META)?;
        meta.insert(FENCE_EPOCH, loaded.epoch)?;
        meta.insert(LAST_VERSION, loaded.last_version)?;
    }
    write.commit()?;
    Ok(loaded)
}

/// Creates the state directory (0700 on Unix) if it is missing.
fn create_private_dir(dir: &Path) -> Result<(), StartError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder
        .create(dir)
        .map_err(|e| StartError::io("creating the state directory", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file that is not a database is refused with its path, and left
    /// as it was.
    #[test]
    fn a_corrupt_database_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(DB_FILE);
        std::fs::write(&file, vec![0x5a; 8192]).unwrap();
        let Err(err) = Database::open(dir.path(), 0) else {
            panic!("a corrupt database was opened");
        };
        match &err {
            StartError::StateDatabase { path, .. } => assert_eq!(path, &file),
            other => panic!("expected StateDatabase, got {other:?}"),
        }
        assert!(err.to_string().contains("refusing to start"), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), vec![0x5a; 8192]);
    }

    /// What is put is there after a reopen, with the version and a higher
    /// fence epoch; an expired record is dropped at load.
    #[test]
    fn writes_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let record = |version, expires_ms| Record {
            value: std::sync::Arc::new(b"v".to_vec()),
            version,
            expires_ms,
            owner: 7,
        };
        let (db, first) = Database::open(dir.path(), 1_000).unwrap();
        db.put("kept", &record(1, 0), 1).unwrap();
        db.put("gone", &record(2, 5_000), 2).unwrap();
        db.put("removed", &record(3, 0), 3).unwrap();
        db.remove("removed", 4).unwrap();
        drop(db);
        let (_db, again) = Database::open(dir.path(), 10_000).unwrap();
        let keys: Vec<&str> = again.entries.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["kept"]);
        assert_eq!((again.expired, again.last_version), (1, 4));
        assert_eq!(again.epoch, first.epoch + 1);
    }
}
