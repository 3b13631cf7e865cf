//! Writing: the outbox to the socket, coalesced while lines keep coming.

use super::*;

impl<S: Socket> Connection<S> {
    /// Whether to hold back the queued lines for now: lines are coming fast
    /// (the window, up to `chat.write_coalesce_ms`, grows with their rate
    /// and has not passed since the last write), so more will join them,
    /// and what is queued is still too little to be worth a syscall of its
    /// own. Arms the timer that wakes the task when the write is due; until
    /// then, lines pushed meanwhile do not wake the task.
    ///
    /// A client at the full rate is written to on its room's grid (see
    /// [`on_room_grid`]), not a window after its own last write: then every
    /// busy member of a room is due on the same timer tick, and one worker
    /// wake-up writes them all, where per-client windows spread the room's
    /// writes over every millisecond tick and woke the second worker on each.
    pub(super) fn hold_write(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(last) = self.last_write else {
            return false;
        };
        let budget = self.hub.write_coalesce();
        if budget.is_zero() {
            return false;
        }
        let share = self.arrivals / COALESCE_FULL_RATE;
        let due = if share >= 1.0 {
            on_room_grid(last, budget, self.room.write_phase)
        } else {
            last + budget.mul_f32(share)
        };
        if tokio::time::Instant::now() >= due {
            return false;
        }
        // Under saturation the queue already holds enough for an efficient
        // write: holding it would only add latency.
        let held: usize = self.pending.iter().map(Bytes::len).sum();
        if held >= COALESCE_ENOUGH {
            return false;
        }
        let gate = self
            .write_gate
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        if gate.deadline() != due {
            gate.as_mut().reset(due);
        }
        if gate.as_mut().poll(cx).is_ready() {
            return false;
        }
        // Until the write is due, lines joining it need not wake the task:
        // the timer will. Only enough to be worth a write of its own does.
        self.client.outbox.wake_only_at(COALESCE_ENOUGH - held);
        true
    }

    /// Updates the arrival rate with what gathered since the last write.
    pub(super) fn measure_arrivals(&mut self) {
        let now = tokio::time::Instant::now();
        let (total, _) = self.client.outbox.totals();
        let lines = total.saturating_sub(std::mem::replace(&mut self.lines_seen, total));
        let rate = match self.last_write {
            Some(last) => {
                let secs = now.duration_since(last).as_secs_f32().max(1e-4);
                lines as f32 / secs
            }
            None => 0.0,
        };
        self.arrivals = (self.arrivals + rate) / 2.0;
    }

    /// Writes as much of `pending` as the socket takes now, in one vectored
    /// syscall per round, and releases the queue's memory once it is empty.
    pub(super) fn flush(&mut self) -> io::Result<()> {
        while !self.pending.is_empty() {
            let mut slices = [IoSlice::new(&[]); IOV_MAX];
            let mut count = 0;
            for (slot, bytes) in slices.iter_mut().zip(self.pending.iter()) {
                *slot = IoSlice::new(bytes);
                count += 1;
            }
            let mut written = match self.stream.try_write_vectored(&slices[..count]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            };
            self.client.outbox.written(written, self.hub.queue_limit());
            self.hub.stats().output(written as u64);
            while written > 0 {
                let Some(front) = self.pending.front_mut() else {
                    break;
                };
                if front.len() <= written {
                    written -= front.len();
                    self.pending.pop_front();
                } else {
                    front.advance(written);
                    written = 0;
                }
            }
        }
        if self.pending.capacity() > IOV_MAX {
            self.pending = VecDeque::new();
        }
        Ok(())
    }
}

/// When a write to a busy client, last written at `last`, is due: the first
/// point of its room's grid (period `step`, offset by the room's `phase`,
/// a share of the period) at least half a period after `last`. A client
/// written on the grid is thus due a whole period later, on the next point;
/// one written off it (a write's worth queued, or the first line after a
/// quiet spell) joins the grid within one and a half periods.
fn on_room_grid(last: tokio::time::Instant, step: Duration, phase: f32) -> tokio::time::Instant {
    static EPOCH: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(tokio::time::Instant::now) + step.mul_f32(phase.clamp(0.0, 1.0));
    grid_point(epoch, last + step / 2, step)
}

/// The first point at or after `t` of the grid `origin + k * step`
/// (points before `origin` count too).
fn grid_point(
    origin: tokio::time::Instant,
    t: tokio::time::Instant,
    step: Duration,
) -> tokio::time::Instant {
    let step_ns = step.as_nanos().max(1);
    if t <= origin {
        let back = (origin - t).as_nanos() / step_ns;
        return origin - Duration::from_nanos((back * step_ns) as u64);
    }
    let ahead = (t - origin).as_nanos().div_ceil(step_ns);
    origin + Duration::from_nanos((ahead * step_ns) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn grid_points_are_the_first_at_or_after() {
        let origin = Instant::now() + 100 * MS;
        assert_eq!(grid_point(origin, origin, 6 * MS), origin);
        assert_eq!(grid_point(origin, origin + MS, 6 * MS), origin + 6 * MS);
        assert_eq!(
            grid_point(origin, origin + 12 * MS, 6 * MS),
            origin + 12 * MS
        );
        // Before the origin, the grid goes on backwards.
        assert_eq!(grid_point(origin, origin - 5 * MS, 6 * MS), origin);
        assert_eq!(grid_point(origin, origin - 6 * MS, 6 * MS), origin - 6 * MS);
        assert_eq!(grid_point(origin, origin - 7 * MS, 6 * MS), origin - 6 * MS);
    }

    #[test]
    fn busy_members_of_a_room_share_due_points_a_period_apart() {
        let step = 6 * MS;
        let start = Instant::now();
        // Two members last written 0.5 ms apart, within one period.
        let a = on_room_grid(start, step, 0.25);
        let b = on_room_grid(start + MS / 2, step, 0.25);
        for due in [a, b] {
            assert!(due >= start + step / 2 && due < start + MS / 2 + step * 3 / 2);
        }
        // Both on the room's grid: the same point, or a period apart.
        assert_eq!((b - a).as_nanos() % step.as_nanos(), 0);
        // Written at their due point (a little late, as a timer fires), the
        // next is one period on.
        let next = on_room_grid(a + MS / 5, step, 0.25);
        assert_eq!(next, a + step);
        // Another room's points are elsewhere in the period.
        let other = on_room_grid(a + MS / 5, step, 0.75);
        assert_ne!((other - a).as_nanos() % step.as_nanos(), 0);
    }
}
