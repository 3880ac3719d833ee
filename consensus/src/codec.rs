//! How Raft records are turned into bytes: serde_json for every value,
//! big-endian u64 for log keys.
//!
//! This module owns the on-disk encoding of the log, vote, meta and
//! snapshots, so a format change happens in one place. It must not touch
//! storage. JSON is chosen over postcard because license documents use
//! `skip_serializing_if` and similar serde shapes that a non-self-describing
//! format cannot read back; config writes are rare, so size does not matter.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// A value could not be encoded or a stored value could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Encoding `what` failed (a bug in a `Serialize` impl, never data).
    #[error("cannot encode {what}: {source}")]
    Encode {
        /// What was being encoded.
        what: &'static str,
        /// The serializer's error.
        #[source]
        source: serde_json::Error,
    },
    /// The stored bytes of `what` are not a valid encoding: corruption or an
    /// incompatible format version.
    #[error("corrupt {what}: {source}")]
    Decode {
        /// What was being decoded.
        what: &'static str,
        /// The deserializer's error.
        #[source]
        source: serde_json::Error,
    },
    /// A log key is not 8 bytes long.
    #[error("corrupt log key of {len} bytes (want 8)")]
    LogKey {
        /// The key's length.
        len: usize,
    },
}

/// Encodes `value` (named `what` in errors).
pub(crate) fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, CodecError> {
    serde_json::to_vec(value).map_err(|source| CodecError::Encode { what, source })
}

/// Decodes a `T` from `bytes` (named `what` in errors).
pub(crate) fn decode<T: DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
) -> Result<T, CodecError> {
    serde_json::from_slice(bytes).map_err(|source| CodecError::Decode { what, source })
}

/// The key of log entry `index`: big-endian so byte order is index order.
pub(crate) fn log_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

/// The index stored in log key `key`.
pub(crate) fn log_index(key: &[u8]) -> Result<u64, CodecError> {
    let bytes: [u8; 8] = key
        .try_into()
        .map_err(|_| CodecError::LogKey { len: key.len() })?;
    Ok(u64::from_be_bytes(bytes))
}
