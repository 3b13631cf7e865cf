//! Flood control: a token bucket per client, judged by when lines could
//! have arrived rather than by when chatd read them.
//!
//! A client's lines wait in its socket whenever chatd does not read it: the
//! client is paused by flow control, every connection is frozen for an
//! upgrade, or the whole process stalled (see [`crate::stall`]). Read
//! afterwards all at once, an honest speaker's backlog looks like a burst.
//! So each read first works out how long chatd was not reading this client,
//! and the lines that could have arrived meanwhile at the allowed rate
//! (beyond the burst the bucket holds anyway) are forgiven, until a read
//! empties the socket: from then on lines are live again. Nothing is
//! forgiven for a client's own silence: a paste after a quiet minute meets
//! the plain bucket.

use std::time::{Duration, Instant};

use chatd_config::FloodLimits;
use chatd_text::rate::TokenBucket;

/// Most lines forgiven at once: more than any socket buffer holds.
const MAX_FORGIVEN: f64 = 100_000.0;

pub(super) struct Flood {
    pub(super) bucket: TokenBucket,
    pub(super) dropped: u32,
    pub(super) warned: bool,
    /// Lines forgiven for the backlog being read now.
    forgiven: f64,
    /// When this client was last read, whether that read emptied its
    /// socket, and the process's stall total then.
    last_read: Instant,
    emptied: bool,
    stall_mark: u64,
}

/// What flood control says of one line.
pub(super) enum Verdict {
    Pass,
    /// Dropped; `warn`: the first drop of this episode, to be told.
    Drop {
        warn: bool,
    },
    /// Too many dropped: disconnect.
    Cut,
}

impl Flood {
    /// A full bucket; `emptied`: whether the socket is known to be empty
    /// (a new client), or may hold lines from before (one taken over).
    pub(super) fn new(bucket: TokenBucket, now: Instant, emptied: bool) -> Self {
        Self {
            bucket,
            dropped: 0,
            warned: false,
            forgiven: 0.0,
            last_read: now,
            emptied,
            stall_mark: crate::stall::total_ms(),
        }
    }

    /// Before a read at `now`: forgives what could have arrived while
    /// chatd was not reading. When the last read left bytes in the socket,
    /// chatd has not read since; when it emptied it, only the process's
    /// stalls since then kept lines waiting.
    pub(super) fn before_read(&mut self, limits: Option<&FloodLimits>, now: Instant) {
        let Some(limits) = limits else {
            return;
        };
        let since = now.saturating_duration_since(self.last_read);
        let stalled = Duration::from_millis(crate::stall::total_ms() - self.stall_mark);
        let away = if self.emptied {
            stalled.min(since)
        } else {
            since
        };
        let could_arrive =
            away.as_secs_f64() * f64::from(limits.lines_per_sec) - f64::from(limits.burst);
        if could_arrive > 0.0 {
            self.forgiven = (self.forgiven + could_arrive).min(MAX_FORGIVEN);
        }
    }

    /// After a read: `emptied` if it left the socket empty, which ends the
    /// backlog.
    pub(super) fn after_read(&mut self, now: Instant, emptied: bool) {
        self.last_read = now;
        self.emptied = emptied;
        self.stall_mark = crate::stall::total_ms();
        if emptied {
            self.forgiven = 0.0;
        }
    }

    /// Judges one line read at `now`.
    pub(super) fn check(&mut self, limits: &FloodLimits, now: Instant) -> Verdict {
        let (rate, burst) = (limits.lines_per_sec, limits.burst);
        if self.dropped > 0 && self.bucket.is_full(rate, burst, now) {
            self.dropped = 0;
            self.warned = false;
        }
        if self.forgiven >= 1.0 {
            self.forgiven -= 1.0;
            return Verdict::Pass;
        }
        if self.bucket.try_take(rate, burst, now) {
            return Verdict::Pass;
        }
        self.dropped += 1;
        if limits.max_dropped > 0 && self.dropped > limits.max_dropped {
            return Verdict::Cut;
        }
        let warn = !self.warned;
        self.warned = true;
        Verdict::Drop { warn }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: FloodLimits = FloodLimits {
        lines_per_sec: 10,
        burst: 20,
        max_dropped: 100,
    };

    fn passed(f: &mut Flood, lines: usize, now: Instant) -> usize {
        (0..lines)
            .filter(|_| matches!(f.check(&LIMITS, now), Verdict::Pass))
            .count()
    }

    #[test]
    fn a_backlog_left_in_the_socket_is_forgiven_until_it_is_read() {
        let t0 = Instant::now();
        let mut f = Flood::new(TokenBucket::new(20, t0), t0, true);
        // Paused 10 s with lines left in the socket: 100 could arrive.
        f.after_read(t0, false);
        let t1 = t0 + Duration::from_secs(10);
        f.before_read(Some(&LIMITS), t1);
        assert_eq!(passed(&mut f, 100, t1), 100);
        f.after_read(t1, true);
        // Live again: the plain bucket (empty now).
        assert_eq!(passed(&mut f, 5, t1), 0);
    }

    #[test]
    fn a_paste_after_silence_meets_the_plain_bucket() {
        let t0 = Instant::now();
        let mut f = Flood::new(TokenBucket::new(20, t0), t0, true);
        let t1 = t0 + Duration::from_secs(60);
        f.before_read(Some(&LIMITS), t1);
        assert_eq!(passed(&mut f, 100, t1), 20);
    }
}
