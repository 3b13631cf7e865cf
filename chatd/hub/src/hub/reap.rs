//! Deadlines: closing idle clients, unfinished lines and stalled readers.

use super::*;

/// What one pass of [`Hub::reap`] closed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reaped {
    pub idle: usize,
    pub partial: usize,
    pub stalled: usize,
}

impl Reaped {
    pub fn total(&self) -> usize {
        self.idle + self.partial + self.stalled
    }
}

impl Hub {
    /// Closes every client that sent no complete line for
    /// `limits.idle_timeout`, sat in the middle of a line for
    /// `limits.partial_line_timeout`, or owed bytes without reading any for
    /// `limits.slow_consumer_timeout`; returns how many. Run periodically by
    /// the server, so that these deadlines cost no timer per connection.
    pub fn reap(&self) -> Reaped {
        let limits = self.limits();
        let now = clock::now_ms();
        let before =
            |limit: Option<Duration>| limit.map(|l| now.saturating_sub(l.as_millis() as u64));
        let idle_cutoff = before(limits.idle_timeout);
        let partial_cutoff = before(limits.partial_line_timeout);
        let clients: Vec<Arc<Client>> = self.state().clients.values().cloned().collect();
        let mut reaped = Reaped::default();
        for c in clients {
            if idle_cutoff.is_some_and(|cut| c.last_line_ms.load(Relaxed) <= cut) {
                reaped.idle += usize::from(c.outbox.close(Disconnect::Idle));
                continue;
            }
            let partial = c.partial_since_ms.load(Relaxed);
            if partial != 0 && partial_cutoff.is_some_and(|cut| partial <= cut) {
                reaped.partial += usize::from(c.outbox.close(Disconnect::PartialLine));
                continue;
            }
            if let Some(stall) = limits.slow_consumer_timeout
                && c.outbox.stalled_for().is_some_and(|d| d >= stall)
                && c.outbox.close(Disconnect::SlowConsumer)
            {
                tracing::warn!(client = c.id, peer = %c.peer, owed = c.outbox.owed(), "slow consumer: read nothing for too long, disconnecting");
                reaped.stalled += 1;
            }
        }
        reaped
    }
}
