//! One client's bounded outgoing queue, and the flow control built on it.
//!
//! Anyone may [`Outbox::push`] to a client — the sender of a room message, an
//! admin broadcast, a kick — and pushing never waits: it appends a cheap
//! clone of a shared [`Bytes`] under a short lock. The client's own
//! connection task is the only consumer: it takes everything at once and
//! writes it with one vectored syscall.
//!
//! **Flow control.** A burst can legitimately outrun a reader that reads all
//! the time, so cutting on bytes alone cuts healthy readers. The policy:
//!
//! - above a quarter of `limit` a client is *congested*. While it is still
//!   reading, a push reports [`Push::Congested`]; the sender, and every
//!   other sender of its room before its next read, pause until this client
//!   drains to an eighth of `limit`: the burst waits in the senders' kernel
//!   buffers, at the pace of the readers, and nothing is lost.
//! - whether a client still reads is judged by what its socket takes,
//!   never by how long its lines have waited. Every chat socket holds at
//!   most [`UNSENT_LIMIT`] bytes not yet sent (`TCP_NOTSENT_LOWAT`, set at
//!   accept), so once it has refused bytes, what it takes next is what the
//!   client's kernel acknowledged meanwhile, whatever the size of the
//!   kernel's buffers. From then on the client is *behind* until its
//!   connection has written all it took, and keeps a reading credit
//!   ([`Credit`]): [`PROGRESS_BYTES`] to start with, refilled by every byte
//!   its socket takes while behind, drained at [`PROGRESS_BYTES`] per
//!   [`PROGRESS_WINDOW`] (80 KiB/s) while it is behind and congested
//!   (while it would hold its senders back), within ±[`PROGRESS_CREDIT`].
//!   It counts as reading while the credit is positive. So a client that
//!   never read is recognised 50 ms after it holds anyone back, one that
//!   stops after reading within [`PROGRESS_CREDIT`] at 80 KiB/s (3.2 s), a
//!   reader on average faster than 80 KiB/s keeps counting between the
//!   steps, seconds apart, in which its kernel shows progress, and a
//!   trickle never brings the credit above zero. The moment its socket
//!   takes bytes again counts as well, told by the reactor
//!   ([`Outbox::writable`]) before the connection gets a worker to write.
//!   Lines that wait because the client's connection has not had a worker
//!   yet (chatd is busy, a burst is being fanned out) are chatd's delay,
//!   not the client's; they count against it only past [`CHATD_LATE`].
//! - a client that reads slower than that, or not at all, never slows a
//!   sender; it is cut as a slow consumer when it owes `limit` bytes (the
//!   memory bound) or when it has owed something without making progress
//!   for `limits.slow_consumer_secs` ([`Outbox::stalled_for`]).
//!
//! The same lock holds the reason the client must go (kicked, slow consumer,
//! shutdown…), the connection task's waker and the wakers of paused senders,
//! so one lock round-trip both delivers lines and close requests and arms the
//! next wake-up. While the connection holds a write back to gather lines
//! (write coalescing), it asks to be woken only by a write's worth of bytes
//! or a close ([`Outbox::wake_only_at`]): lines arriving meanwhile cost no
//! wake-up each.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::task::Waker;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::disconnect::Disconnect;

/// With [`PROGRESS_BYTES`], the pace a client behind must keep to count as
/// still reading (4 KiB per 50 ms: 80 KiB/s), and how long a client that
/// never read (its kernel buffers just full) can hold its room's senders
/// back.
pub const PROGRESS_WINDOW: Duration = Duration::from_millis(50);
/// Bytes a client must read per [`PROGRESS_WINDOW`] to count as making
/// progress: a trickle (a byte now and then, as a hostile reader would
/// do) does not hold senders back. Also what a client that has not been
/// behind yet starts with, and what resets the stall deadline.
pub const PROGRESS_BYTES: usize = 4 * 1024;
/// The most reading credit a client banks, and the most debt it owes, in
/// bytes. Larger than the steps in which a reader's kernel shows progress:
/// once its receive buffer is full, it reopens its window only after the
/// reader has emptied a good part of it (on loopback, 256 KiB at once
/// behind a 128 KiB `SO_RCVBUF`, every 1.7 s at 150 KB/s), so that a
/// reader above the pace keeps counting between them. The price: a reader
/// that stops after reading well holds its room's senders back for up to
/// 3.2 s before it is recognised, and one judged stopped must read this
/// much more than the pace to count again.
pub const PROGRESS_CREDIT: usize = 256 * 1024;
/// Bytes a chat socket may hold that it has not sent yet
/// (`TCP_NOTSENT_LOWAT`): what keeps a client's progress visible whatever
/// the kernel lets its send buffer grow to. Without it, a socket took
/// bytes again only once a third of a buffer autotuned up to `tcp_wmem`'s
/// maximum (4 MB) had drained, so that a reader had to take a megabyte at
/// once to show it was reading. Enough for a write of a busy room and a
/// link's worth of segments ready to go; the bytes in flight are the
/// congestion window's, not this.
pub const UNSENT_LIMIT: u32 = 64 * 1024;
/// How long a client whose socket refused nothing still counts as reading
/// while it takes nothing: its connection is waiting for a worker, which
/// on a busy machine can take a few hundred milliseconds in a burst. A
/// bound all the same, so that a connection held up for any reason never
/// holds its room back for good.
pub const CHATD_LATE: Duration = Duration::from_secs(1);

/// The share of the queue limit above which a reading client slows its
/// senders down (1/4), and below which they resume (1/8).
const CONGESTED_DIVISOR: usize = 4;
const DRAINED_DIVISOR: usize = 8;
/// Most paused senders one outbox remembers; beyond it, a sender falls back
/// on its own deadline. Keeps a pathological room from growing the list.
const MAX_DRAIN_WAITERS: usize = 64;

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
    /// Bytes in `queue` (pushed, not yet taken by the connection).
    queued: usize,
    /// A push wakes the parked connection only once `queued` reaches this
    /// (0: any push). Set while the connection holds a write back to gather
    /// more lines (write coalescing): it wakes at its own deadline, so a
    /// line arriving meanwhile costs no wake-up of its own.
    wake_at: usize,
    /// Senders paused until this client drains.
    drain_waiters: Vec<Waker>,
    /// When the client last read [`PROGRESS_BYTES`], caught up, or started
    /// owing after owing nothing: the clock of "is it still reading?".
    progress: Option<Instant>,
    /// Bytes written since `progress` was last set.
    since_progress: usize,
    /// Set from the socket's first refusal until the connection has
    /// written all it took: whether the client keeps reading.
    credit: Option<Credit>,
    /// Totals for the admin API: lines queued, bytes written.
    lines_out: u64,
    bytes_out: u64,
}

/// What happened to a push.
#[derive(Debug, PartialEq, Eq)]
pub enum Push {
    Queued,
    /// Queued, and the client, though still reading, is behind: the sender
    /// should pause (see the module doc).
    Congested,
    /// The client owed too much; it is now closed as a slow consumer.
    Overflow,
    /// The client is already leaving; the bytes were dropped.
    Closed,
}

impl Push {
    /// Whether the bytes were queued.
    pub fn queued(&self) -> bool {
        matches!(self, Push::Queued | Push::Congested)
    }
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
        if s.owed == 0 {
            s.progress = Some(Instant::now());
            s.since_progress = 0;
        }
        s.owed += bytes.len();
        s.queued += bytes.len();
        s.lines_out += lines;
        s.queue.push_back(bytes);
        s.press(limit);
        let congested = s.owed > limit / CONGESTED_DIVISOR && s.reading();
        if s.queued >= s.wake_at {
            wake(s);
        }
        if congested {
            Push::Congested
        } else {
            Push::Queued
        }
    }

    /// Whether the client is behind (over a quarter of `limit`) but still
    /// reading.
    pub fn congested(&self, limit: usize) -> bool {
        self.congested_owed(limit).is_some()
    }

    /// What the client owes, if it is behind but still reading.
    pub fn congested_owed(&self, limit: usize) -> Option<usize> {
        let s = self.lock();
        (s.owed > limit / CONGESTED_DIVISOR && s.reading()).then_some(s.owed)
    }

    /// For a paused sender: whether this client has drained below an
    /// eighth of `limit`, stopped reading, or is leaving — any of which ends
    /// the pause. If not, `waker` is woken when it does drain.
    pub fn drained_or_wait(&self, limit: usize, waker: &Waker) -> bool {
        let mut s = self.lock();
        if s.closed.is_some() || s.owed <= limit / DRAINED_DIVISOR || !s.reading() {
            return true;
        }
        if !s.drain_waiters.iter().any(|w| w.will_wake(waker))
            && s.drain_waiters.len() < MAX_DRAIN_WAITERS
        {
            s.drain_waiters.push(waker.clone());
        }
        false
    }

    /// Asks the connection to close for `reason`. The first reason wins;
    /// returns whether this call set it.
    pub fn close(&self, reason: Disconnect) -> bool {
        let mut s = self.lock();
        if s.closed.is_some() {
            return false;
        }
        s.closed = Some(reason);
        let waiters = std::mem::take(&mut s.drain_waiters);
        wake(s);
        waiters.into_iter().for_each(Waker::wake);
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
        s.wake_at = 0;
        Self::take_locked(&mut s, into)
    }

    /// For a connection holding back a write after [`Outbox::take_or_wait`]:
    /// until its next take, only a push that brings the queue to `bytes`,
    /// or a close, wakes it. If a push or close came in since that take, the
    /// wake-up has already been spent (the task will be polled again) and
    /// nothing changes.
    pub fn wake_only_at(&self, bytes: usize) {
        let mut s = self.lock();
        if s.waker.is_some() && s.closed.is_none() && s.queued < bytes {
            s.wake_at = bytes;
        }
    }

    /// Moves everything queued to `into` (the connection's write queue) and
    /// reports a pending close, if any.
    pub fn take(&self, into: &mut VecDeque<Bytes>) -> Option<Disconnect> {
        Self::take_locked(&mut self.lock(), into)
    }

    fn take_locked(s: &mut State, into: &mut VecDeque<Bytes>) -> Option<Disconnect> {
        s.queued = 0;
        if into.is_empty() {
            std::mem::swap(into, &mut s.queue);
        } else {
            into.extend(s.queue.drain(..));
        }
        s.closed.clone()
    }

    /// Records that `n` bytes reached the socket; wakes the senders paused
    /// on this client once it has drained to an eighth of `limit`.
    pub fn written(&self, n: usize, limit: usize) {
        let mut s = self.lock();
        s.owed = s.owed.saturating_sub(n);
        s.bytes_out += n as u64;
        s.since_progress += n;
        if n > 0 && (s.owed == 0 || s.since_progress >= PROGRESS_BYTES) {
            s.progress = Some(Instant::now());
            s.since_progress = 0;
        }
        // All it took is written: the socket takes what it is given.
        let caught_up = s.owed == s.queued;
        if let Some(credit) = &mut s.credit {
            credit.took(n, caught_up, Instant::now());
        }
        s.press(limit);
        if !s.drain_waiters.is_empty() && s.owed <= limit / DRAINED_DIVISOR {
            let waiters = std::mem::take(&mut s.drain_waiters);
            drop(s);
            waiters.into_iter().for_each(Waker::wake);
        }
    }

    /// Records that the socket refused bytes: the client's kernel buffers
    /// are full, and from now on what it takes shows whether it reads (see
    /// [`Credit`]).
    pub fn refused(&self, limit: usize) {
        let mut s = self.lock();
        let now = Instant::now();
        s.credit
            .get_or_insert_with(|| Credit::new(now))
            .refused(now);
        s.press(limit);
    }

    /// Records that the socket, which refused bytes, takes them again: the
    /// client has read enough to free buffer space. Said by the reactor,
    /// before the connection gets a worker to write.
    pub fn writable(&self) {
        let mut s = self.lock();
        if let Some(credit) = &mut s.credit
            && credit.writable(Instant::now())
        {
            s.progress = Some(Instant::now());
            s.since_progress = 0;
        }
    }

    /// How long the client has owed bytes without writing any; `None` when
    /// it owes nothing.
    pub fn stalled_for(&self) -> Option<Duration> {
        let s = self.lock();
        if s.owed == 0 {
            return None;
        }
        s.progress.map(|t| t.elapsed())
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

    /// Wakes the connection task without queueing anything, so that it
    /// looks at the upgrade gate (see [`crate::handoff`]).
    pub fn wake_task(&self) {
        wake(self.lock());
    }

    /// Continues the totals of a client handed over by another process.
    pub fn restore_totals(&self, lines_out: u64, bytes_out: u64) {
        let mut s = self.lock();
        s.lines_out = lines_out;
        s.bytes_out = bytes_out;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        crate::lock::lock(&self.state)
    }
}

impl State {
    /// Tells the credit whether the client owes enough to hold its
    /// senders back (over a quarter of `limit`).
    fn press(&mut self, limit: usize) {
        let pressing = self.owed > limit / CONGESTED_DIVISOR;
        if let Some(credit) = &mut self.credit {
            credit.press(pressing, Instant::now);
        }
    }

    /// Whether the client counts as still reading (see the module doc).
    fn reading(&self) -> bool {
        match &self.credit {
            Some(credit) if credit.behind => credit.reading(Instant::now()),
            _ => self.progress.is_none_or(|t| t.elapsed() < CHATD_LATE),
        }
    }
}

/// Whether a client whose socket refused bytes keeps reading: a bucket of
/// bytes, drained at the pace a reader must keep ([`PROGRESS_BYTES`] per
/// [`PROGRESS_WINDOW`]) while the client is behind and holds its senders
/// back, and refilled by what its socket takes while behind, between
/// `-PROGRESS_CREDIT` and `PROGRESS_CREDIT`. A
/// client behind counts as reading while it is positive, or while chatd
/// has yet to write to a socket the reactor said takes bytes again.
///
/// Judged over seconds rather than per refusal because a reader's kernel
/// shows progress in steps: once its buffer is full, a receiver reopens
/// its window only after reading a good part of it, so that a reader at
/// 150 KB/s behind a 256 KiB buffer takes 256 KiB every 1.7 s and nothing
/// in between. And kept, frozen, while the client is not behind, so that
/// the next time it falls behind it starts from what it has shown, not
/// from scratch: a step can be due just then.
#[derive(Debug)]
struct Credit {
    /// Bytes of credit at `at` (negative: debt).
    level: i64,
    at: Instant,
    /// Whether the client is behind: from a refusal until the connection
    /// has written all it took.
    behind: bool,
    /// Whether it owes over a quarter of its queue, where it holds its
    /// senders back. The credit drains only while it is behind and
    /// pressing: until then, what it owes is what chatd's queue is for, and
    /// a reader's first steps fill its credit rather than pay for its
    /// start.
    pressing: bool,
    /// Since when the socket takes bytes again, while the connection has
    /// not written to it yet.
    writable: Option<Instant>,
}

impl Credit {
    /// A client's first refusal: [`PROGRESS_WINDOW`] of holding its
    /// senders back to show progress.
    fn new(now: Instant) -> Self {
        Credit {
            level: PROGRESS_BYTES as i64,
            at: now,
            behind: false,
            pressing: false,
            writable: None,
        }
    }

    /// The level now: drained since `at` while behind and pressing, down
    /// to the floor.
    fn level(&self, now: Instant) -> i64 {
        if !(self.behind && self.pressing) {
            return self.level;
        }
        let drained = now.saturating_duration_since(self.at).as_micros() * PROGRESS_BYTES as u128
            / PROGRESS_WINDOW.as_micros();
        let drained = i64::try_from(drained).unwrap_or(i64::MAX);
        self.level
            .saturating_sub(drained)
            .max(-(PROGRESS_CREDIT as i64))
    }

    /// Sets the level as of now.
    fn settle(&mut self, now: Instant) {
        self.level = self.level(now);
        self.at = now;
    }

    /// The socket took `n` bytes; `caught_up`: all the connection took.
    /// Bytes taken while the client is not behind show nothing: its
    /// kernel buffers had room.
    fn took(&mut self, n: usize, caught_up: bool, now: Instant) {
        if !self.behind {
            return;
        }
        self.settle(now);
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        self.level = self.level.saturating_add(n).min(PROGRESS_CREDIT as i64);
        self.writable = None;
        if caught_up {
            self.behind = false;
        }
    }

    /// The socket refused bytes: the client is behind.
    fn refused(&mut self, now: Instant) {
        if !self.behind {
            self.at = now;
            self.behind = true;
        }
        self.writable = None;
    }

    /// Whether the client owes enough to hold its senders back; reads the
    /// clock only on a change, so that a push costs none.
    fn press(&mut self, pressing: bool, now: impl FnOnce() -> Instant) {
        if pressing != self.pressing {
            self.settle(now());
            self.pressing = pressing;
        }
    }

    /// The reactor says the socket takes bytes again; whether this is news.
    fn writable(&mut self, now: Instant) -> bool {
        self.behind && self.writable.is_none() && {
            self.writable = Some(now);
            true
        }
    }

    fn reading(&self, now: Instant) -> bool {
        self.writable
            .is_some_and(|t| now.saturating_duration_since(t) < CHATD_LATE)
            || self.level(now) > 0
    }
}

/// Releases the lock, then wakes the parked connection, if any: the woken
/// task must not find the lock still held.
fn wake(mut s: std::sync::MutexGuard<'_, State>) {
    let waker = s.waker.take();
    s.wake_at = 0;
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
        while o.push(line.clone(), 100).queued() {
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
        assert!(o.push(line.clone(), 20).queued());
        assert!(o.push(line.clone(), 20).queued());
        let mut q = VecDeque::new();
        assert_eq!(o.take(&mut q), None);
        assert_eq!(q.len(), 2);
        o.written(20, 20);
        assert!(o.push(line, 20).queued());
    }

    /// A waker that counts its wake-ups.
    struct Count(std::sync::atomic::AtomicUsize);
    impl std::task::Wake for Count {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn a_held_write_wakes_only_when_enough_is_queued_or_on_close() {
        let o = Outbox::new();
        let count = std::sync::Arc::new(Count(0.into()));
        let waker = Waker::from(count.clone());
        let woken = || count.0.load(std::sync::atomic::Ordering::SeqCst);
        let line = Bytes::from(vec![b'x'; 100]);
        let mut q = VecDeque::new();
        assert_eq!(o.take_or_wait(&mut q, &waker), None);
        o.wake_only_at(250);
        // 100 and 200 bytes queued: below the mark, no wake-up.
        o.push(line.clone(), 1 << 20);
        o.push(line.clone(), 1 << 20);
        assert_eq!(woken(), 0);
        // 300: the mark is reached.
        o.push(line.clone(), 1 << 20);
        assert_eq!(woken(), 1);
        // Taking again forgets the mark: the next push wakes at once.
        assert_eq!(o.take_or_wait(&mut q, &waker), None);
        assert_eq!(q.len(), 3);
        o.push(line.clone(), 1 << 20);
        assert_eq!(woken(), 2);
        // A close always wakes a held connection.
        assert_eq!(o.take_or_wait(&mut q, &waker), None);
        o.wake_only_at(1 << 20);
        o.push(line, 1 << 20);
        assert_eq!(woken(), 2);
        o.close(Disconnect::Shutdown);
        assert_eq!(woken(), 3);
    }

    #[test]
    fn a_reading_client_behind_slows_its_senders_until_it_drains() {
        let o = Outbox::new();
        let kib = Bytes::from(vec![b'x'; 1024]);
        // Below a quarter of the limit: plain queued.
        for _ in 0..4 {
            assert_eq!(o.push(kib.clone(), 16 * 1024), Push::Queued);
        }
        assert_eq!(o.push(kib.clone(), 16 * 1024), Push::Congested);
        let count = std::sync::Arc::new(Count(0.into()));
        let waker = Waker::from(count.clone());
        assert!(!o.drained_or_wait(16 * 1024, &waker));
        // Writing 2 KiB leaves 3 KiB owed: still above an eighth (2 KiB).
        o.written(2048, 16 * 1024);
        assert_eq!(count.0.load(std::sync::atomic::Ordering::SeqCst), 0);
        o.written(1024, 16 * 1024);
        assert_eq!(count.0.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(o.drained_or_wait(16 * 1024, &waker));
    }

    #[test]
    fn a_client_that_stopped_reading_slows_nobody() {
        let o = Outbox::new();
        let kib = Bytes::from(vec![b'x'; 1024]);
        for _ in 0..5 {
            o.push(kib.clone(), 16 * 1024);
        }
        // Its socket refuses bytes, then takes none for longer than the
        // window: queued, not congested, and a paused sender is released at
        // once.
        o.refused(16 * 1024);
        std::thread::sleep(PROGRESS_WINDOW + Duration::from_millis(50));
        assert_eq!(o.push(kib.clone(), 16 * 1024), Push::Queued);
        let waker = Waker::from(std::sync::Arc::new(Count(0.into())));
        assert!(o.drained_or_wait(16 * 1024, &waker));
        assert!(o.stalled_for().is_some_and(|d| d >= PROGRESS_WINDOW));
        // Then cut at the memory bound.
        let mut last = Push::Queued;
        for _ in 0..16 {
            last = o.push(kib.clone(), 16 * 1024);
        }
        assert_eq!(last, Push::Closed);
        assert!(o.owed() <= 16 * 1024);
    }

    const MIB: usize = 1024 * 1024;

    /// Pushes 64 KiB blocks until `o` owes more than a quarter of 1 MiB.
    fn fill_past_a_quarter(o: &Outbox) {
        let block = Bytes::from(vec![b'x'; 64 * 1024]);
        while o.owed() <= MIB / CONGESTED_DIVISOR {
            o.push(block.clone(), MIB);
        }
    }

    fn released(o: &Outbox) -> bool {
        let waker = Waker::from(std::sync::Arc::new(Count(0.into())));
        o.drained_or_wait(MIB, &waker)
    }

    #[test]
    fn lines_waiting_for_chatd_do_not_make_a_client_a_stopped_one() {
        // Its connection has had no worker to write for a while (chatd is
        // busy): no sign that the client stopped reading.
        let o = Outbox::new();
        fill_past_a_quarter(&o);
        std::thread::sleep(PROGRESS_WINDOW * 2);
        assert_eq!(o.push(Bytes::from_static(b"x"), MIB), Push::Congested);
        assert!(!released(&o));
        // Up to a bound.
        std::thread::sleep(CHATD_LATE);
        assert_eq!(o.push(Bytes::from_static(b"x"), MIB), Push::Queued);
        assert!(released(&o));
    }

    #[test]
    fn a_trickle_between_refusals_does_not_keep_a_client_reading() {
        let o = Outbox::new();
        fill_past_a_quarter(&o);
        // Its buffers fill, and it takes a trickle between refusals: the
        // credit drains faster than the trickle fills it.
        o.refused(MIB);
        for _ in 0..3 {
            o.written(PROGRESS_BYTES / 8, MIB);
            o.refused(MIB);
        }
        std::thread::sleep(PROGRESS_WINDOW * 2);
        assert_eq!(o.push(Bytes::from_static(b"x"), MIB), Push::Queued);
        assert!(released(&o));
    }

    /// Whether a client behind, whose socket takes `step` bytes every
    /// `every` from its first refusal on, counts as reading at each 10 ms
    /// of `run`, after `settle`.
    fn judged(step: usize, every: Duration, run: Duration, settle: Duration) -> Vec<bool> {
        let t0 = Instant::now();
        let mut credit = Credit::new(t0);
        credit.refused(t0);
        credit.press(true, || t0);
        let mut next = t0 + every;
        let mut seen = Vec::new();
        let tick = Duration::from_millis(10);
        let mut t = t0;
        while t < t0 + run {
            t += tick;
            if t >= next {
                credit.took(step, false, t);
                credit.refused(t);
                next += every;
            }
            if t >= t0 + settle {
                seen.push(credit.reading(t));
            }
        }
        seen
    }

    #[test]
    fn a_reader_above_the_pace_counts_between_the_steps_its_kernel_shows() {
        // 150 KB/s behind a 256 KiB window, as on loopback: 256 KiB every
        // 1.75 s, nothing in between. Starting from nothing, it counts
        // without a break once it has shown two steps.
        let seen = judged(
            256 * 1024,
            Duration::from_millis(1750),
            Duration::from_secs(60),
            Duration::from_secs(4),
        );
        assert!(seen.iter().all(|&r| r), "judged stopped between steps");
        // 100 KB/s in 64 KiB steps: some steps more.
        let seen = judged(
            64 * 1024,
            Duration::from_millis(650),
            Duration::from_secs(60),
            Duration::from_secs(4),
        );
        assert!(seen.iter().all(|&r| r), "judged stopped between steps");
    }

    #[test]
    fn a_reader_below_the_pace_never_counts() {
        // 20 KB/s in 64 KiB steps, and 10 KB/s a kilobyte at a time.
        let seen = judged(
            64 * 1024,
            Duration::from_millis(3200),
            Duration::from_secs(60),
            PROGRESS_WINDOW,
        );
        assert!(
            seen.iter().all(|&r| !r),
            "a 20 KB/s reader held its room back"
        );
        let seen = judged(
            1000,
            Duration::from_millis(100),
            Duration::from_secs(60),
            PROGRESS_WINDOW,
        );
        assert!(
            seen.iter().all(|&r| !r),
            "a 10 KB/s trickle held its room back"
        );
    }

    #[test]
    fn a_reader_that_stops_is_recognised_within_its_credit() {
        let t0 = Instant::now();
        let mut credit = Credit::new(t0);
        credit.refused(t0);
        credit.press(true, || t0);
        credit.took(PROGRESS_CREDIT * 4, false, t0);
        credit.refused(t0);
        let horizon = PROGRESS_WINDOW * (PROGRESS_CREDIT / PROGRESS_BYTES) as u32;
        assert!(credit.reading(t0 + horizon - PROGRESS_WINDOW));
        assert!(!credit.reading(t0 + horizon));
        // Judged stopped, it must pay its debt before it counts again.
        let later = t0 + horizon * 3;
        credit.took(PROGRESS_CREDIT, false, later);
        credit.refused(later);
        assert!(!credit.reading(later));
        credit.took(PROGRESS_BYTES, false, later);
        assert!(credit.reading(later));
    }

    #[test]
    fn the_credit_holds_while_the_client_is_not_behind() {
        let t0 = Instant::now();
        let mut credit = Credit::new(t0);
        credit.refused(t0);
        credit.took(PROGRESS_CREDIT, true, t0);
        // An hour keeping up; then behind again, with what it had shown.
        let later = t0 + Duration::from_secs(3600);
        credit.took(PROGRESS_CREDIT, true, later);
        credit.refused(later);
        assert_eq!(credit.level(later), PROGRESS_CREDIT as i64);
        credit.press(true, || later);
        assert!(credit.reading(later + Duration::from_secs(3)));
    }

    #[test]
    fn the_credit_holds_while_the_client_owes_too_little_to_hold_anyone_back() {
        let t0 = Instant::now();
        let mut credit = Credit::new(t0);
        credit.refused(t0);
        // Behind, but owing less than a quarter of its queue: its first
        // steps, a second apart, fill its credit.
        let second = Duration::from_secs(1);
        credit.took(64 * 1024, false, t0 + second);
        credit.took(64 * 1024, false, t0 + second * 2);
        assert_eq!(
            credit.level(t0 + second * 3),
            (PROGRESS_BYTES + 128 * 1024) as i64
        );
        assert!(credit.reading(t0 + second * 3));
    }

    #[test]
    fn a_socket_taking_bytes_again_counts_before_chatd_writes() {
        let o = Outbox::new();
        fill_past_a_quarter(&o);
        o.refused(MIB);
        std::thread::sleep(PROGRESS_WINDOW * 2);
        assert_eq!(o.push(Bytes::from_static(b"x"), MIB), Push::Queued);
        // The reactor says the client freed buffer space; chatd has not
        // written yet: it reads.
        o.writable();
        assert_eq!(o.push(Bytes::from_static(b"x"), MIB), Push::Congested);
        assert!(!released(&o));
    }
}
