//! The audit log as JSON Lines: one object per record (its fields, hash and
//! link), and after a record that a checkpoint covers, one `checkpoint`
//! object. Shared by `GET /v1/audit` and `tollgate audit export
//! --data-dir`.
//!
//! An export walks the log in chunks and stops at the head it saw when it
//! started, so a stream over a busy node ends. A record that does not
//! decode is exported as an `unreadable` line, never skipped in silence.

use chrono::DateTime;
use tollgate_consensus::storage::StorageError;

use super::record::{Hash, Record};
use super::store::{AuditStore, Frame};

/// Records one export call returns when the caller names no limit.
pub const DEFAULT_EXPORT_LIMIT: usize = 10_000;
/// Most records one export call returns; page on with `after_seq`.
pub const MAX_EXPORT_LIMIT: usize = 100_000;
/// Records read per storage call (and per streamed chunk).
pub const EXPORT_CHUNK_RECORDS: usize = 1_024;
/// How far out of time order a record may be and still be found by
/// `since` (records are written in the order decisions were queued, which
/// is the order of their times give or take a few milliseconds; this is for
/// clock steps).
pub const SINCE_SLACK_MS: i64 = 60_000;

/// What to export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportQuery {
    /// Only records at or after this time (unix ms).
    pub since_ms: Option<i64>,
    /// Only records after this seq (paging).
    pub after_seq: u64,
    /// At most this many records.
    pub limit: usize,
}

impl Default for ExportQuery {
    fn default() -> Self {
        Self {
            since_ms: None,
            after_seq: 0,
            limit: DEFAULT_EXPORT_LIMIT,
        }
    }
}

/// Parses a time given as RFC 3339 (`2025-07-01T00:00:00Z`) or as unix
/// milliseconds.
pub fn parse_time(text: &str) -> Result<i64, String> {
    let text = text.trim();
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(ms);
    }
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.timestamp_millis())
        .map_err(|e| format!("{text:?} is neither RFC 3339 nor unix milliseconds ({e})"))
}

/// An export in progress.
#[derive(Debug)]
pub struct ExportCursor {
    next_seq: u64,
    end_seq: u64,
    remaining: usize,
    since_ms: Option<i64>,
}

impl ExportCursor {
    /// Positions an export of `store` for `query`.
    pub fn start(store: &AuditStore, query: &ExportQuery) -> Result<Self, StorageError> {
        let end_seq = store.head()?.map_or(0, |h| h.seq);
        let mut next_seq = query.after_seq.saturating_add(1);
        if let Some(since) = query.since_ms {
            next_seq = next_seq.max(store.first_seq_near(since, SINCE_SLACK_MS)?);
        }
        Ok(Self {
            next_seq,
            end_seq,
            remaining: query.limit.min(MAX_EXPORT_LIMIT),
            since_ms: query.since_ms,
        })
    }

    /// Whether everything asked for was returned.
    pub fn is_done(&self) -> bool {
        self.remaining == 0 || self.next_seq > self.end_seq
    }

    /// The next lines (each ending in `\n`), or `None` when done.
    pub fn next_chunk(&mut self, store: &AuditStore) -> Result<Option<Vec<u8>>, StorageError> {
        let mut out = Vec::new();
        while out.is_empty() && !self.is_done() {
            let first = self.next_seq;
            let frames = store.scan(first, EXPORT_CHUNK_RECORDS)?;
            if frames.is_empty() {
                self.next_seq = self.end_seq + 1;
                break;
            }
            let last = frames
                .iter()
                .map(|f| match f {
                    Frame::Record { seq, .. } => *seq,
                    Frame::Damaged { segment_last_seq } => *segment_last_seq,
                })
                .max()
                .unwrap_or(first);
            let mut checkpoints = store
                .checkpoints(first, last)?
                .into_iter()
                .filter_map(Result::ok)
                .peekable();
            for frame in frames {
                if self.is_done() {
                    break;
                }
                let (seq, value) = match frame {
                    Frame::Record { seq, value } => (seq, value),
                    Frame::Damaged { segment_last_seq } => {
                        // The rest of that segment cannot be told apart.
                        push_line(
                            &mut out,
                            &serde_json::json!({"type": "unreadable", "up_to_seq": segment_last_seq}),
                        );
                        self.next_seq = self.next_seq.max(segment_last_seq + 1);
                        continue;
                    }
                };
                if seq < self.next_seq || seq > self.end_seq {
                    continue;
                }
                self.next_seq = seq + 1;
                let line = match decode(&value) {
                    Some((hash, record)) => {
                        if self.since_ms.is_some_and(|since| record.at_ms < since) {
                            continue;
                        }
                        record.to_json(&hash)
                    }
                    None => serde_json::json!({"seq": seq, "type": "unreadable"}),
                };
                self.remaining -= 1;
                push_line(&mut out, &line);
                while let Some(cp) = checkpoints.next_if(|c| c.seq <= seq) {
                    if cp.seq == seq {
                        push_line(&mut out, &cp.to_json());
                    }
                }
            }
            // Nothing usable in what was read (all before `next_seq`):
            // move past it.
            if self.next_seq == first {
                self.next_seq = last + 1;
            }
        }
        Ok((!out.is_empty()).then_some(out))
    }
}

fn decode(value: &[u8]) -> Option<(Hash, Record)> {
    let hash: Hash = value.get(..32)?.try_into().ok()?;
    let record = Record::decode(value.get(32..)?).ok()?;
    Some((hash, record))
}

fn push_line(out: &mut Vec<u8>, value: &serde_json::Value) {
    // Serialising a `Value` cannot fail.
    if serde_json::to_writer(&mut *out, value).is_ok() {
        out.push(b'\n');
    }
}

/// The whole export for `query` in one buffer (offline use).
pub fn export_all(store: &AuditStore, query: &ExportQuery) -> Result<Vec<u8>, StorageError> {
    let mut cursor = ExportCursor::start(store, query)?;
    let mut out = Vec::new();
    while let Some(chunk) = cursor.next_chunk(store)? {
        out.extend(chunk);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_as_rfc3339_or_unix_ms() {
        assert_eq!(parse_time("1700000000000"), Ok(1_700_000_000_000));
        assert_eq!(parse_time("2023-11-14T22:13:20Z"), Ok(1_700_000_000_000));
        assert_eq!(
            parse_time("2023-11-14T23:13:20.5+01:00"),
            Ok(1_700_000_000_500)
        );
        assert!(parse_time("yesterday").is_err());
        assert!(parse_time("").is_err());
    }
}
