//! One client's bounded outgoing queue.
//!
//! Anyone may [`Outbox::push`] to a client — the sender of a room message, an
//! admin broadcast, a kick — and pushing never waits: it appends a cheap
//! clone of a shared [`Bytes`] under a short lock, or, when the client already
//! owes `limit` bytes, marks the client as a slow consumer and refuses. The
//! client's own connection task is the only consumer: it takes everything at
//! once and writes it with one vectored syscall. So a client that stops
//! reading costs at most `limit` bytes and never slows anyone else down.
//!
//! The same lock holds the reason the client must go (kicked, slow consumer,
//! shutdown…) and the connection task's waker, so one lock round-trip both
//! delivers lines and close requests and arms the next wake-up. There is no
//! separate notification primitive: a woken connection polls its outbox and
//! its socket's readiness directly, with no per-wake-up futures to allocate
//! or register.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::task::Waker;

use bytes::Bytes;

use crate::hub::Disconnect;

#[derive(Debug)]
pub struct Outbox {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Bytes>,
    /// Bytes pushed and not yet written to the socket, including those the
    /// connection has taken but not finished writing.
    owed: usize,
    closed: Option<Disconnect>,
    /// The connection task, parked until something is pushed or a close is
    /// requested.
    waker: Option<Waker>,
    /// Totals for the admin API: lines queued, bytes written.
    lines_out: u64,
    bytes_out: u64,
}

/// What happened to a push.
#[derive(Debug, PartialEq, Eq)]
pub enum Push {
    Queued,
    /// The client owed too much; it is now closed as a slow consumer.
    Overflow,
    /// The client is already leaving; the bytes were dropped.
    Closed,
}

impl Outbox {
    pub fn new() -> Self {
        Self {
            state: Mutex::new(State::default()),
        }
    }

    /// Queues one line unless the client would then owe more than `limit`.
    pub fn push(&self, bytes: Bytes, limit: usize) -> Push {
        self.push_lines(bytes, 1, limit)
    }

    /// Queues `bytes`, which hold `lines` whole lines, unless the client
    /// would then owe more than `limit`.
    pub fn push_lines(&self, bytes: Bytes, lines: u64, limit: usize) -> Push {
        let mut s = self.lock();
        if s.closed.is_some() {
            return Push::Closed;
        }
        if s.owed + bytes.len() > limit {
            s.closed = Some(Disconnect::SlowConsumer);
            wake(s);
            return Push::Overflow;
        }
        s.owed += bytes.len();
        s.lines_out += lines;
        s.queue.push_back(bytes);
        wake(s);
        Push::Queued
    }

    /// Asks the connection to close for `reason`. The first reason wins;
    /// returns whether this call set it.
    pub fn close(&self, reason: Disconnect) -> bool {
        let mut s = self.lock();
        if s.closed.is_some() {
            return false;
        }
        s.closed = Some(reason);
        wake(s);
        true
    }

    /// Like [`Outbox::take`], and registers `waker` to be woken at the next
    /// push or close. Registering on every call, not only when the queue is
    /// empty, is what makes a wake-up impossible to lose.
    pub fn take_or_wait(&self, into: &mut VecDeque<Bytes>, waker: &Waker) -> Option<Disconnect> {
        let mut s = self.lock();
        if !s.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
            s.waker = Some(waker.clone());
        }
        Self::take_locked(&mut s, into)
    }

    /// Moves everything queued to `into` (the connection's write queue) and
    /// reports a pending close, if any.
    pub fn take(&self, into: &mut VecDeque<Bytes>) -> Option<Disconnect> {
        Self::take_locked(&mut self.lock(), into)
    }

    fn take_locked(s: &mut State, into: &mut VecDeque<Bytes>) -> Option<Disconnect> {
        if into.is_empty() {
            std::mem::swap(into, &mut s.queue);
        } else {
            into.extend(s.queue.drain(..));
        }
        s.closed.clone()
    }

    /// Records that `n` bytes reached the socket.
    pub fn written(&self, n: usize) {
        let mut s = self.lock();
        s.owed = s.owed.saturating_sub(n);
        s.bytes_out += n as u64;
    }

    /// (lines queued, bytes written) since the client connected.
    pub fn totals(&self) -> (u64, u64) {
        let s = self.lock();
        (s.lines_out, s.bytes_out)
    }

    /// Bytes the client owes (queued or being written).
    pub fn owed(&self) -> usize {
        self.lock().owed
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        crate::lock::lock(&self.state)
    }
}

/// Releases the lock, then wakes the parked connection, if any: the woken
/// task must not find the lock still held.
fn wake(mut s: std::sync::MutexGuard<'_, State>) {
    let waker = s.waker.take();
    drop(s);
    if let Some(w) = waker {
        w.wake();
    }
}

impl Default for Outbox {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_closes_as_slow_consumer_and_keeps_memory_bounded() {
        let o = Outbox::new();
        let line = Bytes::from_static(b"0123456789\r\n");
        let mut pushed = 0;
        while o.push(line.clone(), 100) == Push::Queued {
            pushed += 1;
        }
        assert_eq!(pushed, 8);
        assert!(o.owed() <= 100);
        assert_eq!(o.push(line.clone(), 100), Push::Closed);
        let mut q = VecDeque::new();
        assert_eq!(o.take(&mut q), Some(Disconnect::SlowConsumer));
    }

    #[test]
    fn written_bytes_free_room() {
        let o = Outbox::new();
        let line = Bytes::from_static(b"0123456789");
        assert_eq!(o.push(line.clone(), 20), Push::Queued);
        assert_eq!(o.push(line.clone(), 20), Push::Queued);
        let mut q = VecDeque::new();
        assert_eq!(o.take(&mut q), None);
        assert_eq!(q.len(), 2);
        o.written(20);
        assert_eq!(o.push(line, 20), Push::Queued);
    }
}
