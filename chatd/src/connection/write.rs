//! Writing: the outbox to the socket, coalesced while lines keep coming.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes};
use futures_util::task::AtomicWaker;

use super::wire::{Socket, Wire, Writable};
use chatd_hub::grid::{Grid, Wait};
use chatd_hub::hub::{Client, Hub};

/// Buffers handed to one vectored write.
const IOV_MAX: usize = 64;
/// Queued bytes that make a write worth its syscall: write coalescing
/// never holds back more.
const COALESCE_ENOUGH: usize = 8 * 1024;

impl<S: Socket> Wire<S> {
    /// Writes what the outbox gave unless write coalescing holds it: as
    /// much as the socket takes now. An error: the socket is broken.
    pub(super) fn write_queued(
        &mut self,
        cx: &mut Context<'_>,
        client: &Arc<Client>,
        hub: &Hub,
        grid: &Arc<Grid>,
    ) -> io::Result<()> {
        let hold = !self.pending.is_empty() && self.hold_write(cx, client, hub, grid);
        if !hold && !self.pending.is_empty() {
            self.measure_arrivals(client);
        }
        let mut wrote = false;
        while !hold && !self.pending.is_empty() {
            match self.poll_writable(cx, client) {
                // `flush` stops at `WouldBlock`, which clears the readiness,
                // so the next round registers for it instead of spinning.
                Poll::Ready(Ok(())) => {
                    self.flush(client, hub)?;
                    self.last_write = Some(tokio::time::Instant::now());
                    wrote = true;
                }
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => break,
            }
        }
        if wrote && self.pending.is_empty() {
            // Lines keep coming: the next write is held anyway, so the next
            // line need not wake the task either, only the timer (the
            // window is zero, and nothing is armed, when they do not).
            self.hold_write(cx, client, hub, grid);
        }
        Ok(())
    }

    /// Whether to hold back the queued lines for now: lines are coming fast
    /// (the window, up to `chat.write_coalesce_ms`, grows with their rate
    /// and has not passed since the last write), so more will join them,
    /// and what is queued is still too little to be worth a syscall of its
    /// own. Arranges for the task to be woken when the write is due; until
    /// then, lines pushed meanwhile do not wake the task.
    ///
    /// A client at the full rate is written to on its room's grid (see
    /// [`chatd_hub::grid`]), not a window after its own last write: then every
    /// busy member of a room is due at the same instant, and one wake-up
    /// writes them all, where per-client windows spread the room's writes
    /// over every millisecond and woke the second worker on each. The grid's
    /// clock wakes it; slower clients, and all where the grid has no clock,
    /// use the runtime's timer.
    fn hold_write(
        &mut self,
        cx: &mut Context<'_>,
        client: &Client,
        hub: &Hub,
        grid: &Arc<Grid>,
    ) -> bool {
        let Some(last) = self.last_write else {
            return false;
        };
        let budget = hub.write_coalesce();
        if budget.is_zero() {
            return false;
        }
        // At and above the full rate, the room's grid; below, a window
        // shrinking with the rate, so that a client that gets a line now and
        // then (whose writes would gather little) gets it at once.
        let share = self.arrivals / chatd_hub::grid::FULL_RATE;
        let on_grid = share >= 1.0;
        let due = if on_grid {
            let step = grid.step(budget, self.arrivals);
            grid.due(last, step)
        } else {
            last + budget.mul_f32(share)
        };
        // In the read phase, this connection's own or the room's (members
        // reading on the grid are filling this write), the write waits for
        // the write phase, right after.
        let reading = on_grid && (self.grid_read.phase || grid.reading());
        if !reading && tokio::time::Instant::now() >= due {
            return false;
        }
        // Under saturation the queue already holds enough for an efficient
        // write: holding it would only add latency.
        let held: usize = self.pending.iter().map(Bytes::len).sum();
        if held >= COALESCE_ENOUGH && !reading {
            return false;
        }
        if on_grid {
            match grid.wait(&mut self.ticket, cx, hub) {
                // This write's point has passed as well (the task ran
                // late): write now.
                Wait::Passed if self.grid_read.phase => return false,
                Wait::Registered | Wait::Passed => {
                    // Until the write phase only a queue near its limit
                    // wakes the task.
                    let enough = if reading {
                        hub.queue_limit() / 4
                    } else {
                        COALESCE_ENOUGH
                    };
                    client.outbox.wake_only_at(enough.saturating_sub(held));
                    self.grid_read_on(cx, grid);
                    return true;
                }
                Wait::Unavailable => {}
            }
        }
        self.grid_read_off();
        if self.grid_read.phase {
            return false;
        }
        self.hold_until(cx, client, due, held)
    }

    /// Holds the write until `due` on the runtime's timer, unless it has
    /// come; `held`: the bytes queued now.
    fn hold_until(
        &mut self,
        cx: &mut Context<'_>,
        client: &Client,
        due: tokio::time::Instant,
        held: usize,
    ) -> bool {
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
        client.outbox.wake_only_at(COALESCE_ENOUGH - held);
        true
    }

    /// The socket's write readiness; while it refuses bytes, through
    /// [`Writable`].
    fn poll_writable(
        &mut self,
        cx: &mut Context<'_>,
        client: &Arc<Client>,
    ) -> Poll<io::Result<()>> {
        if !self.refused {
            return self.stream.poll_write_ready(cx);
        }
        let writable = self.writable.get_or_insert_with(|| {
            Arc::new(Writable {
                client: Arc::clone(client),
                task: AtomicWaker::new(),
            })
        });
        writable.task.register(cx.waker());
        let waker = Waker::from(Arc::clone(writable));
        self.stream
            .poll_write_ready(&mut Context::from_waker(&waker))
    }

    /// Updates the arrival rate with what gathered since the last write.
    fn measure_arrivals(&mut self, client: &Client) {
        let now = tokio::time::Instant::now();
        let (total, _) = client.outbox.totals();
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
    fn flush(&mut self, client: &Client, hub: &Hub) -> io::Result<()> {
        while !self.pending.is_empty() {
            let mut slices = [IoSlice::new(&[]); IOV_MAX];
            let mut count = 0;
            for (slot, bytes) in slices.iter_mut().zip(self.pending.iter()) {
                *slot = IoSlice::new(bytes);
                count += 1;
            }
            let mut written = match self.stream.try_write_vectored(&slices[..count]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Its buffers are full: whether it reads shows next.
                    if !self.refused {
                        self.refused = true;
                        client.outbox.refused(hub.queue_limit());
                    }
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
            self.refused = false;
            client.outbox.written(written, hub.queue_limit());
            hub.stats().output(written as u64);
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

    /// Writes `pending` whole, waiting for the socket as needed: the last
    /// lines of a closing connection.
    pub(super) async fn flush_all(&mut self, client: &Client, hub: &Hub) -> io::Result<()> {
        while !self.pending.is_empty() {
            self.stream.writable().await?;
            self.flush(client, hub)?;
        }
        Ok(())
    }
}
