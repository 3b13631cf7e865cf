//! Server-wide counters.
//!
//! Plain relaxed atomics: they are only ever added to, read for reports, and
//! updated once per batch or per event, never per recipient.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::disconnect::Disconnect;

#[derive(Debug, Default)]
pub struct Stats {
    pub connections: AtomicU64,
    pub peak_clients: AtomicU64,
    pub refused: AtomicU64,
    pub lines_in: AtomicU64,
    pub bytes_in: AtomicU64,
    /// Bytes written to clients' sockets.
    pub bytes_out: AtomicU64,
    /// Lines relayed to a room or a person (each counted once).
    pub lines_relayed: AtomicU64,
    /// Line deliveries: lines × recipients.
    pub deliveries: AtomicU64,
    pub kicks: AtomicU64,
    pub slow_consumer_disconnects: AtomicU64,
    pub flood_disconnects: AtomicU64,
    pub idle_disconnects: AtomicU64,
    pub overlong_disconnects: AtomicU64,
    /// Times a sender paused reading because a recipient was behind.
    pub flow_pauses: AtomicU64,
    /// Reads made in a room's read phase (see `connection::grid_read`).
    pub grid_reads: AtomicU64,
    pub udp_in: AtomicU64,
    pub udp_out: AtomicU64,
    pub udp_dropped: AtomicU64,
    /// How long [`Hub::publish`](crate::hub::Hub::publish) takes.
    pub fan_out_latency: Latency,
}

/// Upper bounds of the [`Latency`] buckets, in microseconds.
pub const LATENCY_BUCKETS_US: [u64; 14] = [
    1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 50_000,
];

/// A fixed-bucket histogram of durations: one relaxed add per observation.
#[derive(Debug, Default)]
pub struct Latency {
    /// Observations per bucket (not cumulative); the last one is `+Inf`.
    buckets: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    sum_ns: AtomicU64,
}

impl Latency {
    pub fn observe(&self, elapsed: Duration) {
        let us = elapsed.as_micros();
        let slot = LATENCY_BUCKETS_US
            .iter()
            .position(|&bound| us <= u128::from(bound))
            .unwrap_or(LATENCY_BUCKETS_US.len());
        self.buckets[slot].fetch_add(1, Relaxed);
        self.sum_ns
            .fetch_add(elapsed.as_nanos().min(u128::from(u64::MAX)) as u64, Relaxed);
    }

    /// Counts per bucket, keyed by upper bound in seconds (the last one,
    /// `f64::MAX`, stands for `+Inf`), the total count and the sum in
    /// seconds.
    pub fn buckets(&self) -> (Vec<(f64, u64)>, u64, f64) {
        let mut total = 0;
        let mut out = Vec::with_capacity(self.buckets.len());
        for (i, bucket) in self.buckets.iter().enumerate() {
            let n = bucket.load(Relaxed);
            total += n;
            let bound = LATENCY_BUCKETS_US
                .get(i)
                .map_or(f64::MAX, |&us| us as f64 / 1e6);
            out.push((bound, n));
        }
        (out, total, self.sum_ns.load(Relaxed) as f64 / 1e9)
    }
}

/// A copy of every counter at one moment, plus gauges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub uptime: Duration,
    pub clients: u64,
    pub rooms: u64,
    pub counters: Counters,
}

/// The value of every counter of [`Stats`] at one moment. It is also what
/// a seamless upgrade carries to the next process, so that totals do not
/// restart (`handoff::state`, version 2); a counter a later version adds
/// reads as zero from an older state.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Counters {
    pub connections: u64,
    pub peak_clients: u64,
    pub refused: u64,
    pub lines_in: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub lines_relayed: u64,
    pub deliveries: u64,
    pub kicks: u64,
    pub slow_consumer_disconnects: u64,
    pub flood_disconnects: u64,
    pub idle_disconnects: u64,
    pub overlong_disconnects: u64,
    pub flow_pauses: u64,
    pub grid_reads: u64,
    pub udp_in: u64,
    pub udp_out: u64,
    pub udp_dropped: u64,
}

impl Stats {
    pub fn connected(&self, now: usize) {
        self.connections.fetch_add(1, Relaxed);
        self.peak_clients.fetch_max(now as u64, Relaxed);
    }

    pub fn disconnected(&self, reason: &Disconnect) {
        let counter = match reason {
            Disconnect::SlowConsumer => &self.slow_consumer_disconnects,
            Disconnect::Flood => &self.flood_disconnects,
            Disconnect::Idle | Disconnect::PartialLine => &self.idle_disconnects,
            Disconnect::OverlongLines => &self.overlong_disconnects,
            _ => return,
        };
        counter.fetch_add(1, Relaxed);
    }

    pub fn published(&self, lines: usize, reached: usize) {
        self.lines_relayed.fetch_add(lines as u64, Relaxed);
        self.deliveries.fetch_add((lines * reached) as u64, Relaxed);
    }

    pub fn flow_paused(&self) {
        self.flow_pauses.fetch_add(1, Relaxed);
    }

    pub fn grid_read(&self) {
        self.grid_reads.fetch_add(1, Relaxed);
    }

    pub fn input(&self, lines: u64, bytes: u64) {
        self.lines_in.fetch_add(lines, Relaxed);
        self.bytes_in.fetch_add(bytes, Relaxed);
    }

    pub fn output(&self, bytes: u64) {
        self.bytes_out.fetch_add(bytes, Relaxed);
    }

    pub fn snapshot(&self, clients: usize, rooms: usize, uptime: Duration) -> StatsSnapshot {
        StatsSnapshot {
            uptime,
            clients: clients as u64,
            rooms: rooms as u64,
            counters: self.counters(),
        }
    }

    /// Every counter's value now: for reports, and for the next process
    /// of a seamless upgrade.
    pub fn counters(&self) -> Counters {
        let get = |c: &AtomicU64| c.load(Relaxed);
        Counters {
            connections: get(&self.connections),
            peak_clients: get(&self.peak_clients),
            refused: get(&self.refused),
            lines_in: get(&self.lines_in),
            bytes_in: get(&self.bytes_in),
            bytes_out: get(&self.bytes_out),
            lines_relayed: get(&self.lines_relayed),
            deliveries: get(&self.deliveries),
            kicks: get(&self.kicks),
            slow_consumer_disconnects: get(&self.slow_consumer_disconnects),
            flood_disconnects: get(&self.flood_disconnects),
            idle_disconnects: get(&self.idle_disconnects),
            overlong_disconnects: get(&self.overlong_disconnects),
            flow_pauses: get(&self.flow_pauses),
            grid_reads: get(&self.grid_reads),
            udp_in: get(&self.udp_in),
            udp_out: get(&self.udp_out),
            udp_dropped: get(&self.udp_dropped),
        }
    }

    /// Carries on from the previous process's counters: added to this
    /// process's own, the peak kept as the larger.
    pub fn import(&self, from: &Counters) {
        let add = |c: &AtomicU64, v: u64| {
            c.fetch_add(v, Relaxed);
        };
        add(&self.connections, from.connections);
        self.peak_clients.fetch_max(from.peak_clients, Relaxed);
        add(&self.refused, from.refused);
        add(&self.lines_in, from.lines_in);
        add(&self.bytes_in, from.bytes_in);
        add(&self.bytes_out, from.bytes_out);
        add(&self.lines_relayed, from.lines_relayed);
        add(&self.deliveries, from.deliveries);
        add(&self.kicks, from.kicks);
        add(
            &self.slow_consumer_disconnects,
            from.slow_consumer_disconnects,
        );
        add(&self.flood_disconnects, from.flood_disconnects);
        add(&self.idle_disconnects, from.idle_disconnects);
        add(&self.overlong_disconnects, from.overlong_disconnects);
        add(&self.flow_pauses, from.flow_pauses);
        add(&self.grid_reads, from.grid_reads);
        add(&self.udp_in, from.udp_in);
        add(&self.udp_out, from.udp_out);
        add(&self.udp_dropped, from.udp_dropped);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_carry_over_to_the_next_process() {
        let old = Stats::default();
        old.connected(3);
        old.published(2, 5);
        old.udp_dropped.fetch_add(4, Relaxed);
        let new = Stats::default();
        new.import(&old.counters());
        assert_eq!(new.counters(), old.counters());
    }
}
