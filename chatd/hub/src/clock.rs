//! A monotonic clock in milliseconds, cheap to keep in an atomic.
//!
//! Idle and stall deadlines must not move when the wall clock is stepped
//! (NTP, an operator's `date -s`): they are measured here, from the first
//! reading in the process. Wall-clock times are only derived for display.

use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Milliseconds since the process's first reading; never goes back. Never 0
/// after the first call, so 0 can mean "never".
pub fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64 + 1
}

/// The wall-clock time (Unix milliseconds) of a [`now_ms`] reading, for
/// reports.
pub fn to_unix_ms(mono_ms: u64) -> u64 {
    let ago = now_ms().saturating_sub(mono_ms);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    now.saturating_sub(ago)
}
