//! A log line let through at most once per period, for whatever a peer can
//! repeat at will (refused connections, refused calls): the log says how
//! many were held back instead of filling up.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::lock::lock;

/// Lets a log line through at most once per period and counts the ones held
/// back, so a peer cannot fill the log by repeating a refused request.
#[derive(Debug)]
pub struct RateLimitedLog {
    period: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl RateLimitedLog {
    pub const fn new(period: Duration) -> RateLimitedLog {
        RateLimitedLog {
            period,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(n)`: log now, mentioning the `n` occurrences held back since
    /// the last line; `None`: hold this one back.
    pub fn allow(&self) -> Option<u64> {
        let mut state = lock(&self.state);
        let now = Instant::now();
        match state.0 {
            Some(last) if now.duration_since(last) < self.period => {
                state.1 += 1;
                None
            }
            _ => {
                state.0 = Some(now);
                Some(std::mem::take(&mut state.1))
            }
        }
    }
}
