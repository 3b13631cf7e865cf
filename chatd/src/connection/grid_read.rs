//! Reading on the room's grid: a member of a busy room that also sends
//! reads at the room's grid points, not when each line arrives.
//!
//! **Why.** A busy member's lines are written on its room's grid
//! (`chatd_hub::grid`), so a line read the moment it arrives reaches nobody
//! sooner than one read at the next point. But each arrival wakes the
//! client thread: at 5,000 lines a second into a room, that was most of
//! chatd's context switches. So the member raises its socket's receive
//! low-water mark ([`crate::sockopt`]): a line no longer makes the socket
//! readable, and the member reads it in the point's read phase, which
//! runs before every member's write (see `Grid::wait_read`). A burst past
//! the mark, a close or an error still wake it at once.
//!
//! Only on a single-threaded runtime (the client thread,
//! `server.client_threads = 1`): there the read phase is sure to run
//! before the write phase; with several workers it is not, and the
//! wake-ups it saves are paid back in workers waking each other.
//!
//! A member stops reading on the grid when its writes leave the grid, when
//! its room's clock stops, or after [`EMPTY_PHASES`] read phases in a row
//! that found nothing: the mark is lowered, and the kernel reports a line
//! already waiting at once.

use std::io;
use std::task::{Context, Poll};

use super::read::READ_CHUNK;
use super::wire::{Socket, Wire};
use chatd_hub::grid::{Grid, Ticket};
use chatd_hub::hub::Hub;

/// Read phases in a row with nothing to read after which a member reads
/// as its socket says again.
const EMPTY_PHASES: u8 = 4;

/// The low-water mark while reading on the grid: a read's worth.
const LOW_WATER: usize = READ_CHUNK;

impl<S: Socket> Wire<S> {
    /// At the start of a poll: whether the room's read phase has come.
    pub(super) fn begin_grid_read(&mut self, cx: &mut Context<'_>, grid: &Grid) {
        let reads = &mut self.grid_read;
        if !reads.on || !chatd_hub::grid::Grid::read_due(&mut reads.ticket, cx) {
            return;
        }
        reads.phase = true;
        reads.owed = true;
        if reads.empty >= EMPTY_PHASES || !grid.wait_read(&mut reads.ticket, cx) {
            self.grid_read_off();
        }
    }

    /// Starts reading on the grid, called when this connection's writes
    /// are held to it. Only for a client that sends: one that only reads
    /// would be woken at every read phase for nothing.
    pub(super) fn grid_read_on(&mut self, cx: &mut Context<'_>, grid: &Grid) {
        let reads = &mut self.grid_read;
        if !reads.allowed {
            return;
        }
        if !reads.on {
            if !std::mem::take(&mut reads.sent) {
                return;
            }
            if self.stream.set_read_low_water(LOW_WATER).is_err() {
                // A socket without the option (a TLS client's pair): it
                // reads as lines arrive.
                reads.allowed = false;
                return;
            }
            reads.on = true;
            reads.empty = 0;
        }
        if !reads.ticket.is_waiting() && !grid.wait_read(&mut reads.ticket, cx) {
            self.grid_read_off();
        }
    }

    /// Stops reading on the grid.
    pub(super) fn grid_read_off(&mut self) {
        let reads = &mut self.grid_read;
        if reads.on {
            reads.on = false;
            reads.ticket = Ticket::default();
            // Lowering the mark makes the kernel report a line already
            // there; if it fails the socket is going anyway.
            let _ = self.stream.set_read_low_water(1);
        }
    }

    /// The socket's read readiness: `Ok(raw)` when it is to be read, as
    /// the socket says, or (`raw`) because the read phase came, owed,
    /// while the reactor was not told of the lines.
    pub(super) fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        let ready = match self.stream.poll_read_ready(cx) {
            Poll::Pending if self.grid_read.owed => Poll::Ready(Ok(true)),
            Poll::Pending => Poll::Pending,
            Poll::Ready(ready) => Poll::Ready(ready.map(|()| false)),
        };
        if let Poll::Ready(Ok(_)) = ready {
            self.grid_read.owed = false;
        }
        ready
    }

    /// After a read: `got` whether it found bytes, `phase` whether it was
    /// the read phase's.
    pub(super) fn grid_read_done(&mut self, got: bool, phase: bool, hub: &Hub) {
        if phase {
            hub.stats().grid_read();
        }
        let reads = &mut self.grid_read;
        if got {
            reads.sent = true;
            reads.empty = 0;
        } else if phase {
            reads.empty = reads.empty.saturating_add(1);
        }
    }
}
