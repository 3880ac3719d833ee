//! The audit trail over real loopback sockets, one in-process node per
//! test: what decisions and config changes leave in the log (ids and hashes
//! only, chained, signed), who may read it, what bad export queries get,
//! the full-queue policies, and that every decision leaves one record.

mod t10_records;
mod t20_access;
mod t30_queue;
mod t40_volume;

/// Every line of a JSON Lines export.
pub fn lines(text: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| Ok(serde_json::from_str(l)?))
        .collect()
}

/// The export lines of one `type`.
pub fn of_type<'a>(lines: &'a [serde_json::Value], kind: &str) -> Vec<&'a serde_json::Value> {
    lines.iter().filter(|l| l["type"] == kind).collect()
}
