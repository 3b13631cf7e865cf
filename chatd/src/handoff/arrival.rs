//! The connections still in the front door, which an upgrade's freeze
//! waits for (see [`super::gate`]): each is counted from its accept until
//! it registers in the hub or gives up.

use std::sync::Arc;

use super::gate::Gate;

/// A connection in the front door, counted by an upgrade's freeze (see
/// [`crate::handoff::gate`]) until it registers in the hub or gives up.
#[derive(Debug)]
pub struct Arrival(Option<Arc<Gate>>);

impl Arrival {
    /// Counts one. Made by the accept loop itself, before it looks for a
    /// freeze again, so that a freeze that saw every loop stop has them
    /// all.
    pub fn new(gate: &Arc<Gate>) -> Arrival {
        gate.arrive();
        Arrival(Some(gate.clone()))
    }

    /// A connection the freeze does not wait for (a TLS client's, whose
    /// handshake began).
    pub fn none() -> Arrival {
        Arrival(None)
    }

    pub fn counted(&self) -> bool {
        self.0.is_some()
    }

    /// Left the front door: registered, refused, or past the point where
    /// it could be handed over.
    pub fn leave(&mut self) {
        if let Some(gate) = self.0.take() {
            gate.arrival_left();
        }
    }
}

impl Drop for Arrival {
    fn drop(&mut self) {
        self.leave();
    }
}
