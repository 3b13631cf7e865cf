//! How long this process did not serve its clients: stopped (SIGSTOP, a
//! paused virtual machine), a runtime starved, or every connection frozen
//! for an upgrade. Lines a client sent meanwhile wait in its socket and are
//! read together afterwards; flood control forgives them as far as they
//! could have arrived within the limit (`connection::flood::Flood` in the daemon), so an honest
//! speaker is not taken for a flooder because chatd was away.
//!
//! A ticker on each runtime that serves clients notices when its own tick
//! comes late; the upgrade's gate reports its freezes. Overlapping reports
//! (both runtimes stopped together) are counted once.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use chatd_hub::clock;

/// How often each runtime looks at the clock.
const TICK: Duration = Duration::from_millis(500);
/// Lateness of a tick below this is ordinary scheduling, not a stall.
const SLACK: Duration = Duration::from_millis(250);

/// Stall time counted once however many report it.
struct Stalls {
    /// Milliseconds of stall so far, read on every read of a client.
    total_ms: AtomicU64,
    /// The end of the last stall counted, so that an overlapping report
    /// adds only what is new.
    counted_until_ms: Mutex<u64>,
}

impl Stalls {
    const fn new() -> Stalls {
        Stalls {
            total_ms: AtomicU64::new(0),
            counted_until_ms: Mutex::new(0),
        }
    }

    fn record(&self, from_ms: u64, to_ms: u64) {
        let mut until = chatd_hub::lock::lock(&self.counted_until_ms);
        let start = from_ms.max(*until);
        if to_ms > start {
            self.total_ms.fetch_add(to_ms - start, Ordering::Relaxed);
            *until = to_ms;
        }
    }
}

/// This process's stalls.
static STALLS: Stalls = Stalls::new();

/// Milliseconds this process has spent stalled since it started.
pub fn total_ms() -> u64 {
    STALLS.total_ms.load(Ordering::Relaxed)
}

/// Counts the stall from `from_ms` to `to_ms` ([`clock::now_ms`] readings).
pub fn record(from_ms: u64, to_ms: u64) {
    STALLS.record(from_ms, to_ms);
}

/// Ticks on the runtime it is spawned on until `stop`, counting every tick
/// that came later than [`SLACK`] as a stall.
pub async fn watch(stop: CancellationToken) {
    let tick = TICK.as_millis() as u64;
    let slack = SLACK.as_millis() as u64;
    let mut last = clock::now_ms();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(TICK) => {}
        }
        let now = clock::now_ms();
        let due = last + tick;
        if now > due + slack {
            record(due, now);
        }
        last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_stalls_count_once() {
        let stalls = Stalls::new();
        stalls.record(1000, 1100);
        stalls.record(1050, 1150);
        stalls.record(1010, 1090);
        assert_eq!(stalls.total_ms.load(Ordering::Relaxed), 150);
    }
}
