//! One state entry as the store keeps it, and its encoding in the
//! database: version, expiry and owner, then the value.

use std::sync::Arc;

use lockbroker_proto::Versioned;

/// One key's value and what goes with it.
#[derive(Debug, Clone)]
pub(super) struct Record {
    pub(super) value: Arc<Vec<u8>>,
    pub(super) version: u64,
    /// Unix milliseconds; 0 for none.
    pub(super) expires_ms: u64,
    /// The uid whose quota it counts against.
    pub(super) owner: u32,
}

impl Record {
    /// The database's bytes for this record.
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(20 + self.value.len());
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&self.expires_ms.to_le_bytes());
        out.extend_from_slice(&self.owner.to_le_bytes());
        out.extend_from_slice(&self.value);
        out
    }

    /// A record from the database's bytes; `None` if they are malformed.
    pub(super) fn decode(bytes: &[u8]) -> Option<Record> {
        let version = u64::from_le_bytes(bytes.get(0..8)?.try_into().ok()?);
        let expires_ms = u64::from_le_bytes(bytes.get(8..16)?.try_into().ok()?);
        let owner = u32::from_le_bytes(bytes.get(16..20)?.try_into().ok()?);
        Some(Record {
            value: Arc::new(bytes[20..].to_vec()),
            version,
            expires_ms,
            owner,
        })
    }

    /// What the entry counts against quotas: its key and value bytes.
    pub(super) fn charge(&self, key: &str) -> u64 {
        (key.len() + self.value.len()) as u64
    }

    /// The value and version, as an answer carries them.
    pub(super) fn versioned(&self) -> Versioned {
        Versioned {
            value: self.value.to_vec(),
            version: self.version,
        }
    }
}
