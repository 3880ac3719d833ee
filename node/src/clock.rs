//! The node's wall clock: the one place the node reads the time of day.
//!
//! This module owns [`Clock`], which the hot path, usage windows, seat
//! leases and config history read through `NodeState::now_ms`. In
//! production it is the system clock; the simulator gives each node a clock
//! driven by simulated time and a skew it can change. It must not be used
//! for timeouts or pacing: those follow `tokio::time` (monotonic, and
//! simulated under the simulator).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// A source of Unix time in milliseconds.
pub type TimeSource = Arc<dyn Fn() -> i64 + Send + Sync>;

/// A node's wall clock, with an adjustable skew.
pub struct Clock {
    source: Option<TimeSource>,
    skew_ms: AtomicI64,
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clock")
            .field("system", &self.source.is_none())
            .field("skew_ms", &self.skew_ms())
            .finish()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::system()
    }
}

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Self {
            source: None,
            skew_ms: AtomicI64::new(0),
        }
    }

    /// A clock that reads `source` (the simulator's).
    pub fn from_source(source: TimeSource) -> Self {
        Self {
            source: Some(source),
            skew_ms: AtomicI64::new(0),
        }
    }

    /// Unix time in milliseconds, skew included.
    pub fn now_ms(&self) -> i64 {
        let base = match &self.source {
            Some(source) => source(),
            None => system_now_ms(),
        };
        base.saturating_add(self.skew_ms())
    }

    /// How far this clock is set ahead (positive) or behind.
    pub fn skew_ms(&self) -> i64 {
        self.skew_ms.load(Ordering::Relaxed)
    }

    /// Sets the skew: every later reading is moved by `skew_ms`.
    pub fn set_skew_ms(&self, skew_ms: i64) {
        self.skew_ms.store(skew_ms, Ordering::Relaxed);
    }
}

/// Unix time in milliseconds from the system clock.
pub fn system_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skew_moves_every_reading() {
        let clock = Clock::from_source(Arc::new(|| 1_000));
        assert_eq!(clock.now_ms(), 1_000);
        clock.set_skew_ms(-250);
        assert_eq!(clock.now_ms(), 750);
        clock.set_skew_ms(500);
        assert_eq!(clock.now_ms(), 1_500);
    }

    #[test]
    fn the_system_clock_is_unix_time() {
        let before = system_now_ms();
        let read = Clock::system().now_ms();
        assert!(read >= before && read - before < 60_000);
    }
}
