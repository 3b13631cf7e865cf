//! A room's write grid: the points in time at which its busy members are
//! written to, and the clock that wakes them there.
//!
//! A client receiving lines at the full rate has its writes held back and
//! gathered (write coalescing, see `connection::write`). Its write is due on
//! its room's grid — a point every period, at the room's own phase in it —
//! so a room's busy members are all due at once and one wake-up writes them
//! all. The period is `chat.write_coalesce_ms` at 1,000 lines/s and shorter
//! at higher rates ([`period_for`]), one for the whole room.
//!
//! **Why a clock of its own.** The runtime's timers have a millisecond
//! resolution: a deadline is rounded up to the next millisecond, and a
//! worker parked on it wakes up to a millisecond after that, depending on
//! when in its millisecond it parked. Writes due every 5 ms were therefore
//! 4 to 6 ms apart, and a line waited up to a millisecond longer than the
//! period at the tail. Each grid that has busy members waiting has a
//! `timerfd` instead, precise to microseconds: a [`Grid::wait`] registers
//! the member's task, and each expiry wakes every registered one. The
//! clock stops after [`IDLE_TICKS`] ticks with no one waiting, and starts
//! again on the next wait. Where a `timerfd` cannot be had (out of file
//! descriptors), [`Grid::wait`] says so and the member falls back on the
//! runtime's timer.
//!
//! **Two phases per point.** On the client thread (`server.client_threads
//! = 1`), a busy member that also sends reads on the grid too
//! (`connection`): nobody would get its line before the room's next point
//! anyway, so the line waits in the kernel instead of waking chatd. Each
//! point therefore first wakes those members to read ([`Grid::wait_read`],
//! the read phase), and only once they have run, every member to write:
//! one wake-up does the room's whole work.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{
    AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst,
};
use std::task::Context;
use std::time::Duration;

use rustix::time::{
    Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec, timerfd_create,
    timerfd_settime,
};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::{Notify, futures::OwnedNotified};
use tokio::time::Instant;
use tracing::warn;

/// Each member's rate report moves the room's rate by this share.
const RATE_WEIGHT: f32 = 64.0;

/// Ticks in a row with no member waiting after which a grid's clock stops.
pub const IDLE_TICKS: u32 = 64;

/// The clock's states.
const IDLE: u8 = 0;
const TICKING: u8 = 1;
/// No `timerfd` could be had: members use the runtime's timer.
const UNAVAILABLE: u8 = 2;

/// One room's grid. Shared by the room and its members' connections.
#[derive(Debug)]
pub struct Grid {
    /// Where in each period the grid's points fall, as a share of the
    /// period: a different point for each room, so that many busy rooms do
    /// not all write on the same tick.
    phase: f32,
    /// Woken at every point while the clock runs.
    tick: Arc<Notify>,
    /// Woken at every point just before `tick`: members that read on the
    /// grid read then, so that what they read reaches every member's write.
    reads: Arc<Notify>,
    /// Between a point's read phase and its write phase.
    reading: AtomicBool,
    state: AtomicU8,
    /// Whether a member has waited since the clock's last tick.
    wanted: AtomicBool,
    /// The line rate the busy members last reported (an `f32`'s bits): it
    /// sets the period (see [`period_for`]).
    rate: AtomicU32,
    /// The period the clock ticks at, in ns; 0 while it is stopped.
    step: AtomicU64,
}

/// What [`Grid::wait`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Wait {
    /// The task will be woken at the grid's next point.
    Registered,
    /// As `Registered`, and the point this task last waited for has passed.
    Passed,
    /// The grid has no clock: wait with the runtime's timer.
    Unavailable,
}

/// Where a grid's clock reads its period (`chat.write_coalesce_ms`, which a
/// reload may change); zero stops it.
pub trait Period: Clone + Send + Sync + 'static {
    fn period(&self) -> Duration;
}

impl Period for Duration {
    fn period(&self) -> Duration {
        *self
    }
}

/// A member's place in the queue for a grid's next tick; kept across waits
/// so that waiting allocates nothing.
#[derive(Debug, Default)]
pub struct Ticket {
    /// The grid's `tick`, which `notified` keeps alive: a ticket taken in
    /// another room (the member has moved) is never mistaken for this one.
    tick: usize,
    notified: Option<Pin<Box<OwnedNotified>>>,
}

impl Ticket {
    /// Whether the ticket holds a place in a queue.
    pub fn is_waiting(&self) -> bool {
        self.notified.is_some()
    }
}

impl Grid {
    pub fn new() -> Self {
        Self {
            phase: next_phase(),
            tick: Arc::new(Notify::new()),
            reads: Arc::new(Notify::new()),
            reading: AtomicBool::new(false),
            state: AtomicU8::new(IDLE),
            wanted: AtomicBool::new(false),
            rate: AtomicU32::new(0),
            step: AtomicU64::new(0),
        }
    }

    /// When a write to a busy member, last written at `last`, is due: the
    /// first point of the grid (period `step`) at least half a period after
    /// `last`. A member written on the grid is thus due a whole period
    /// later, on the next point; one written off it (a write's worth
    /// queued, or the first line after a quiet spell) joins the grid within
    /// one and a half periods.
    pub fn due(&self, last: Instant, step: Duration) -> Instant {
        grid_point(self.origin(step), last + step / 2, step)
    }

    /// The grid's period for a member receiving `rate` lines a second, with
    /// `chat.write_coalesce_ms` at `longest`: the clock's while it runs (a
    /// room's busy members must share one), else [`period_for`] the rate.
    /// Reports the rate to the clock.
    pub fn step(&self, longest: Duration, rate: f32) -> Duration {
        // The room's rate is an average over its members' reports: each
        // member's own measure is noisy, and a period that follows it
        // re-arms the clock every few ticks on a shifted grid, where
        // members skip a point.
        let reported = f32::from_bits(self.rate.load(Relaxed));
        let smoothed = if reported > 0.0 {
            reported + (rate - reported) / RATE_WEIGHT
        } else {
            rate
        };
        self.rate.store(smoothed.to_bits(), Relaxed);
        match self.step.load(Relaxed) {
            0 => period_for(longest, rate),
            ns => Duration::from_nanos(ns),
        }
    }

    fn origin(&self, step: Duration) -> Instant {
        static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *EPOCH.get_or_init(Instant::now) + step.mul_f32(self.phase.clamp(0.0, 1.0))
    }

    /// Registers the task of `cx` to be woken at the grid's next point,
    /// starting the grid's clock (with the period `period` gives, read again
    /// at every tick, so that a reload takes effect) if it is not running.
    pub fn wait(
        self: &Arc<Self>,
        ticket: &mut Ticket,
        cx: &mut Context<'_>,
        period: &impl Period,
    ) -> Wait {
        if self.state.load(Relaxed) == UNAVAILABLE {
            return Wait::Unavailable;
        }
        let tick = Arc::as_ptr(&self.tick) as usize;
        if ticket.tick != tick {
            *ticket = Ticket {
                tick,
                notified: None,
            };
        }
        let notified = ticket
            .notified
            .get_or_insert_with(|| Box::pin(self.tick.clone().notified_owned()));
        let mut passed = false;
        if notified.as_mut().poll(cx).is_ready() {
            // The tick this ticket was for has passed: take a place in the
            // queue for the next one.
            passed = true;
            notified.set(self.tick.clone().notified_owned());
            if notified.as_mut().poll(cx).is_ready() {
                cx.waker().wake_by_ref();
            }
        }
        // Ordered with the clock's stop (see `run`): either it sees this
        // wait, or this sees it stopped and starts another.
        if !self.wanted.load(Relaxed) {
            self.wanted.store(true, SeqCst);
        }
        if self.state.load(SeqCst) == IDLE {
            // Out of clocks: this wait uses the runtime's timer; a later one
            // tries again.
            let Some(slot) = ClockSlot::take() else {
                return Wait::Unavailable;
            };
            if self
                .state
                .compare_exchange(IDLE, TICKING, SeqCst, SeqCst)
                .is_ok()
            {
                tokio::spawn(Arc::clone(self).run(period.clone(), slot));
            }
        }
        if passed {
            Wait::Passed
        } else {
            Wait::Registered
        }
    }

    /// Registers the task of `cx` to be woken at the read phase of the
    /// grid's next point. `false` when the clock is not running: the member
    /// must then read as its socket says.
    pub fn wait_read(&self, ticket: &mut Ticket, cx: &mut Context<'_>) -> bool {
        if self.state.load(SeqCst) != TICKING {
            return false;
        }
        let reads = Arc::as_ptr(&self.reads) as usize;
        if ticket.tick != reads {
            *ticket = Ticket {
                tick: reads,
                notified: None,
            };
        }
        // A ticket already in the queue stays there: [`Grid::read_due`]
        // is what sees its phase come.
        if ticket.notified.is_none() {
            let mut notified = Box::pin(self.reads.clone().notified_owned());
            // Fresh, so not yet notified: this only takes its place.
            let _ = notified.as_mut().poll(cx);
            ticket.notified = Some(notified);
        }
        // Readers keep the clock running, as waiting writers do.
        if !self.wanted.load(Relaxed) {
            self.wanted.store(true, SeqCst);
        }
        self.state.load(SeqCst) == TICKING
    }

    /// Whether the grid is in a point's read phase: its write phase comes
    /// next, so a write should wait for it.
    pub fn reading(&self) -> bool {
        self.reading.load(Relaxed)
    }

    /// Whether the read ticket's point has come (it is then taken).
    pub fn read_due(ticket: &mut Ticket, cx: &mut Context<'_>) -> bool {
        let due = ticket
            .notified
            .as_mut()
            .is_some_and(|n| n.as_mut().poll(cx).is_ready());
        if due {
            ticket.notified = None;
        }
        due
    }

    /// The clock: a `timerfd` expiring at every point of the grid, each
    /// expiry waking the members waiting for it.
    async fn run(self: Arc<Self>, period: impl Period, _slot: ClockSlot) {
        let timer = match Timer::new() {
            Ok(timer) => timer,
            Err(e) => return self.unavailable(&e),
        };
        let mut step = Duration::ZERO;
        let mut idle = 0;
        loop {
            let longest = period.period();
            if longest.is_zero() {
                // Coalescing turned off: members no longer wait on the
                // grid.
                break;
            }
            // A new rate moves the period only when it moves it by more
            // than an eighth, so that noise in the rate does not shift the
            // grid (and skip or repeat a point) at every tick.
            let wanted = period_for(longest, f32::from_bits(self.rate.load(Relaxed)));
            if wanted.abs_diff(step) > step / 8 {
                step = wanted;
                self.step.store(step.as_nanos() as u64, Relaxed);
                if let Err(e) = timer.arm(self.origin(step), step) {
                    return self.unavailable(&e);
                }
            }
            if let Err(e) = timer.expired().await {
                return self.unavailable(&e);
            }
            // The read phase. The readers were woken first and a yield
            // resumes this task only after they ran (on a single-threaded
            // runtime, the only one where members read on the grid): what
            // they read reaches every write of this point.
            self.reading.store(true, Relaxed);
            self.reads.notify_waiters();
            tokio::task::yield_now().await;
            self.reading.store(false, Relaxed);
            self.tick.notify_waiters();
            if self.wanted.swap(false, SeqCst) {
                idle = 0;
                continue;
            }
            idle += 1;
            if idle < IDLE_TICKS {
                continue;
            }
            self.step.store(0, Relaxed);
            self.state.store(IDLE, SeqCst);
            if self.wanted.load(SeqCst)
                && self
                    .state
                    .compare_exchange(IDLE, TICKING, SeqCst, SeqCst)
                    .is_ok()
            {
                // A member waited while the clock was stopping: go on.
                self.step.store(step.as_nanos() as u64, Relaxed);
                idle = 0;
                continue;
            }
            self.reads.notify_waiters();
            return;
        }
        self.step.store(0, Relaxed);
        self.state.store(IDLE, SeqCst);
        self.reads.notify_waiters();
        self.tick.notify_waiters();
    }

    /// The clock failed: members use the runtime's timer from now on, and
    /// those registered must not wait for a tick that will never come.
    fn unavailable(&self, e: &std::io::Error) {
        self.step.store(0, Relaxed);
        warn!(error = %e, "no timerfd for a room's write grid; using the runtime's timer");
        self.state.store(UNAVAILABLE, SeqCst);
        self.reads.notify_waiters();
        self.tick.notify_waiters();
    }
}

impl Default for Grid {
    fn default() -> Self {
        Self::new()
    }
}

/// Most grid clocks running at once in the process. Each holds a file
/// descriptor, which comes out of the descriptors kept for everything but
/// clients (`server::reserved_files` counts them): busy rooms past this
/// many use the runtime's timer.
pub const MAX_CLOCKS: usize = 8;

/// One of the [`MAX_CLOCKS`], held by a running clock.
#[derive(Debug)]
struct ClockSlot;

static CLOCKS: AtomicUsize = AtomicUsize::new(0);

impl ClockSlot {
    fn take() -> Option<Self> {
        let taken = CLOCKS.fetch_add(1, SeqCst);
        if taken >= MAX_CLOCKS {
            CLOCKS.fetch_sub(1, SeqCst);
            return None;
        }
        Some(ClockSlot)
    }
}

impl Drop for ClockSlot {
    fn drop(&mut self) {
        CLOCKS.fetch_sub(1, SeqCst);
    }
}

/// A non-blocking periodic `timerfd`, registered with the runtime.
struct Timer(AsyncFd<std::os::fd::OwnedFd>);

impl Timer {
    fn new() -> std::io::Result<Self> {
        let fd = timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )?;
        // Deprecated because a type could close or change the descriptor
        // behind the reactor's back; an `OwnedFd` cannot, and its
        // replacement is an `unsafe` call, which this crate does not allow.
        #[allow(deprecated)]
        let fd = AsyncFd::with_interest(fd, Interest::READABLE)?;
        Ok(Self(fd))
    }

    /// Expires at every point of the grid `origin + k * step` from the next
    /// one on.
    fn arm(&self, origin: Instant, step: Duration) -> std::io::Result<()> {
        let now = Instant::now();
        // The clock and `Instant` are both CLOCK_MONOTONIC; arming relative
        // to a `now` read before the call errs towards firing late by the
        // call's microseconds, never early.
        let first = grid_point(origin, now + Duration::from_micros(1), step) - now;
        let spec = |d: Duration| Timespec::try_from(d).map_err(std::io::Error::other);
        timerfd_settime(
            self.0.get_ref(),
            TimerfdTimerFlags::empty(),
            &Itimerspec {
                it_interval: spec(step)?,
                it_value: spec(first)?,
            },
        )?;
        Ok(())
    }

    /// Waits for the next expiry (or returns at once for missed ones).
    async fn expired(&self) -> std::io::Result<()> {
        loop {
            let mut ready = self.0.readable().await?;
            let mut count = [0u8; 8];
            match ready.try_io(|fd| Ok(rustix::io::read(fd.get_ref(), &mut count)?)) {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

/// The line rate at and below which a busy member is written every
/// `chat.write_coalesce_ms`.
pub const FULL_RATE: f32 = 1000.0;

/// The grid's period for members receiving `rate` lines a second, with
/// `chat.write_coalesce_ms` at `longest`: `longest` up to [`FULL_RATE`],
/// shorter above in proportion to the inverse square root of the rate,
/// down to a tenth of it.
///
/// Why the square root: a write costs the same few microseconds whatever
/// it carries, so CPU per line is about `a + b / (rate * period)` while a
/// line waits up to `period`. The period that minimises CPU plus a price on
/// waiting is proportional to `1 / sqrt(rate)`: once a write carries a few
/// dozen lines, holding it longer saves little and costs every one of them
/// the wait. At 5,000 lines/s (a hundred members, fifty lines a second
/// each from ten senders) the default 11 ms gives 4.9 ms and 25 lines per
/// write; at 2,000 lines/s, 7.8 ms and 16 lines.
pub fn period_for(longest: Duration, rate: f32) -> Duration {
    if rate <= FULL_RATE {
        return longest;
    }
    longest.mul_f32((FULL_RATE / rate).sqrt().max(0.1))
}

/// Spreads the rooms' phases over the period: successive rooms step by the
/// golden ratio, which leaves no two of the first few close together.
fn next_phase() -> f32 {
    static ROOMS: AtomicU32 = AtomicU32::new(0);
    let n = ROOMS.fetch_add(1, Relaxed);
    (n.wrapping_mul(0x9E37_79B9) as f64 / 4_294_967_296.0) as f32
}

/// The first point at or after `t` of the grid `origin + k * step`
/// (points before `origin` count too).
fn grid_point(origin: Instant, t: Instant, step: Duration) -> Instant {
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
    use std::task::Poll;

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
        let room = Grid::new();
        let start = Instant::now();
        // Two members last written 0.5 ms apart, within one period.
        let a = room.due(start, step);
        let b = room.due(start + MS / 2, step);
        for due in [a, b] {
            assert!(due >= start + step / 2 && due < start + MS / 2 + step * 3 / 2);
        }
        // Both on the room's grid: the same point, or a period apart.
        assert_eq!((b - a).as_nanos() % step.as_nanos(), 0);
        // Written at their due point (a little late, as a timer fires), the
        // next is one period on.
        assert_eq!(room.due(a + MS / 5, step), a + step);
    }

    #[test]
    fn rooms_have_their_points_elsewhere_in_the_period() {
        let step = 6 * MS;
        let (one, other) = (Grid::new(), Grid::new());
        let start = Instant::now();
        let (a, b) = (one.due(start, step), other.due(start, step));
        let apart = a.max(b) - a.min(b);
        assert_ne!(apart.as_nanos() % step.as_nanos(), 0);
    }

    /// How late after each of 40 points of `grid` a task waiting on the
    /// grid's clock is woken; sorted.
    async fn lateness(grid: &Arc<Grid>, step: Duration) -> Vec<Duration> {
        let mut ticket = Ticket::default();
        let mut late = Vec::new();
        let mut last = Instant::now();
        for _ in 0..40 {
            let due = grid.due(last, step);
            std::future::poll_fn(|cx| {
                if Instant::now() >= due {
                    return Poll::Ready(());
                }
                assert_ne!(grid.wait(&mut ticket, cx, &step), Wait::Unavailable);
                Poll::Pending
            })
            .await;
            last = Instant::now();
            late.push(last - due);
        }
        late.sort();
        late
    }

    /// The clock wakes a waiting task at the grid's points: its median
    /// lateness stays under a millisecond, where the runtime's timer rounds
    /// up to one. (How much that buys in p99 is the benchmark's to say:
    /// docs/PERFORMANCE.md, "What each knob costs".)
    #[tokio::test]
    async fn the_clock_wakes_waiters_on_the_points() {
        let grid = Arc::new(Grid::new());
        let step = 3 * MS;
        let within = Duration::from_secs(10);
        let clock = tokio::time::timeout(within, lateness(&grid, step))
            .await
            .expect("the clock ticks");
        let clock = clock[clock.len() / 2];
        assert!(clock < MS, "median lateness on the clock: {clock:?}");
    }

    #[test]
    fn the_period_shortens_with_the_square_root_of_the_rate() {
        let longest = 11 * MS;
        assert_eq!(period_for(longest, 0.0), longest);
        assert_eq!(period_for(longest, FULL_RATE), longest);
        // Four times the rate, half the period.
        let at_4k = period_for(longest, 4.0 * FULL_RATE);
        assert!(at_4k.abs_diff(longest / 2) < Duration::from_micros(1));
        let at_5k = period_for(longest, 5.0 * FULL_RATE);
        assert!(at_5k > 4 * MS && at_5k < 5 * MS, "{at_5k:?}");
        // Never under a tenth, however fast lines come.
        let burst = period_for(longest, 1e9);
        assert!(burst.abs_diff(longest / 10) < Duration::from_micros(1));
    }

    /// The clock ticks at the period of the rate its members report, and
    /// moves when the rate does.
    #[tokio::test]
    async fn the_clock_follows_the_members_rate() {
        let grid = Arc::new(Grid::new());
        let longest = 8 * MS;
        let mut ticket = Ticket::default();
        /// Waits for points as a member at `rate` (each wait reports it)
        /// until the clock's period is within a quarter of that rate's, or
        /// for 400 points; the period then. The room's rate is an average
        /// of the reports, and the clock moves only by more than an eighth,
        /// so it settles near the rate's period, not on it.
        async fn step_at(
            grid: &Arc<Grid>,
            ticket: &mut Ticket,
            longest: Duration,
            rate: f32,
        ) -> Duration {
            let target = period_for(longest, rate);
            for _ in 0..400 {
                let due = grid.due(Instant::now(), grid.step(longest, rate));
                std::future::poll_fn(|cx| {
                    if Instant::now() >= due {
                        return Poll::Ready(());
                    }
                    grid.wait(ticket, cx, &longest);
                    Poll::Pending
                })
                .await;
                if grid.step(longest, rate).abs_diff(target) <= target / 4 {
                    break;
                }
            }
            grid.step(longest, rate)
        }
        let within = Duration::from_secs(10);
        let slow =
            tokio::time::timeout(within, step_at(&grid, &mut ticket, longest, FULL_RATE)).await;
        assert_eq!(slow.expect("ticks"), longest);
        let fast = tokio::time::timeout(
            within,
            step_at(&grid, &mut ticket, longest, 16.0 * FULL_RATE),
        )
        .await
        .expect("ticks");
        assert!(
            fast.abs_diff(longest / 4) <= longest / 16,
            "at 16 times the rate the period is {fast:?}, not about {:?}",
            longest / 4
        );
    }

    /// With no one waiting, the clock stops, and a new wait starts it.
    #[tokio::test]
    async fn the_clock_stops_when_idle_and_restarts() {
        let grid = Arc::new(Grid::new());
        let step = MS;
        let mut ticket = Ticket::default();
        async fn wait_once(grid: &Arc<Grid>, ticket: &mut Ticket, step: Duration) {
            let due = grid.due(Instant::now(), step);
            std::future::poll_fn(|cx| {
                if Instant::now() >= due {
                    return Poll::Ready(());
                }
                grid.wait(ticket, cx, &step);
                Poll::Pending
            })
            .await
        }
        let within = Duration::from_secs(5);
        tokio::time::timeout(within, wait_once(&grid, &mut ticket, step))
            .await
            .expect("woken by the clock");
        let stopped = async {
            while grid.state.load(SeqCst) != IDLE {
                tokio::time::sleep(step * 8).await;
            }
        };
        tokio::time::timeout(within, stopped)
            .await
            .expect("the clock stops when idle");
        tokio::time::timeout(within, wait_once(&grid, &mut ticket, step))
            .await
            .expect("woken by a restarted clock");
    }
}
