//! One client's task: the only owner of its socket.
//!
//! A single task per client both reads and writes, driven by the socket's
//! readiness and the client's [`Outbox`](crate::outbox::Outbox):
//!
//! - **read**: whatever is readable is read into a buffer on the thread's
//!   stack (so an idle client holds no read buffer), framed into lines,
//!   cleaned, and consecutive chat lines are formatted into *one* batch that
//!   the hub hands, as one shared allocation, to every other room member;
//! - **write**: everything queued for this client is written with one
//!   vectored `try_write` per wake-up, so a client that fell behind catches
//!   up in few syscalls. While lines keep coming, writes to one client are
//!   a window apart unless a write's worth (`COALESCE_ENOUGH`) is queued:
//!   what arrives meanwhile waits, without waking the task, and leaves in
//!   the next write. The window grows with the client's line rate, up to
//!   `chat.write_coalesce_ms` at `grid::FULL_RATE`, so a line after a
//!   quiet spell leaves at once and only a busy client trades a few
//!   milliseconds for fewer wake-ups and syscalls. Busy clients are written
//!   on their room's grid, whose period shortens again as the rate rises
//!   further (a write already carries enough lines), so a room's held
//!   writes all fall due at one instant, when the grid's clock wakes them
//!   ([`crate::grid`]).
//!
//! Nothing here blocks on another client. A client that stops reading only
//! stops its own writes; its outbox fills and the hub cuts it off. A client
//! that reads but is behind makes its *senders* pause reading for a moment
//! (flow control, see [`crate::outbox`]): the pause is a state of this task,
//! never a wait inside the hub.
//!
//! Here: the task, its state and its poll loop. Beside it: `read` (framing,
//! chat lines, commands), `write` (the write path and its coalescing),
//! `handoff` (export to and resume from a seamless upgrade).

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::{TcpStream, UnixStream};
use tracing::{Instrument, debug, info, info_span};

use crate::cluster_state::Claim;
use crate::disconnect::Disconnect;
use crate::framing::{Frame, LineFramer};
use crate::grid::{Ticket, Wait};
use crate::hub::{
    Client, Hub, JoinRequest, NickRequest, PrivateError, Refusal, Room, Seat, server_line,
};
use crate::protocol::{self, Command};
use crate::rate::TokenBucket;
use crate::sanitize;

/// Bytes read per `read` call. Lives on the worker thread's stack, not in
/// the connection.
const READ_CHUNK: usize = 16 * 1024;
/// Reads per wake-up before yielding to other clients.
const READS_PER_WAKE: usize = 4;
/// Turns per poll of a connection whose reads empty its socket: the turn
/// that read, and one to write its replies and wait for the next read.
const TURNS_PER_POLL: usize = 2;
/// Buffers handed to one vectored write.
const IOV_MAX: usize = 64;
/// Queued bytes that make a write worth its syscall: write coalescing
/// never holds back more.
const COALESCE_ENOUGH: usize = 8 * 1024;
/// How long a closing connection may take to flush its last lines when the
/// client is slow to read them.
const CLOSE_FLUSH: Duration = Duration::from_secs(5);
/// How long to wait for the client's EOF after ours, so that unread input
/// does not turn our close into a reset that destroys the last lines.
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// How often a paused sender checks that the recipient it waits for is
/// still reading (a drain wakes it at once; this is for one that stops).
const RECHECK: Duration = crate::outbox::PROGRESS_WINDOW;
/// The longest a sender pauses for the target of its private message. Its
/// other senders do not pause with it (unlike a room's, which all wait for
/// the member behind) and may keep the target's queue above the mark where
/// it counts as drained for as long as they send: without a bound, a flood
/// of private messages to one reader would silence everyone else who
/// wrote to him, in every room. Past it, the sender's next message to a
/// target still behind is refused with a line, and it pauses again.
const PRIVATE_PAUSE: Duration = Duration::from_secs(1);
/// The longest a new client waits for the default room's cluster-wide
/// history before joining with this node's.
const WELCOME_WAIT: Duration = Duration::from_secs(5);
/// What a connection needs of its socket: readiness-driven, non-blocking
/// I/O. A TCP socket for plain clients; one end of a UNIX socket pair for
/// TLS clients, whose other end the TLS pump serves (see [`crate::tls`]).
pub trait Socket: AsyncWrite + Unpin + Send + Sync + 'static {
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Like `try_read`; a read shorter than `buf` emptied the socket, so
    /// it also clears the read readiness, as a `WouldBlock` would: the
    /// syscall that would only say `WouldBlock` is saved. The readiness is
    /// sampled before the read, so data arriving after it is never missed.
    fn try_read_draining(&self, buf: &mut [u8]) -> io::Result<usize>;
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send;
    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// A copy of the socket for a seamless upgrade; `None` when it cannot
    /// be handed to another process (a TLS client's socket pair).
    fn handoff_fd(&self) -> io::Result<Option<std::os::fd::OwnedFd>>;
    /// Reads what the socket holds now, whatever the reactor last said of
    /// its readiness: a socket reading on the grid is read in the read
    /// phase without having been reported readable.
    fn read_now(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Sets the bytes the socket must hold before it counts as readable
    /// (see [`grid_read`]).
    fn set_read_low_water(&self, bytes: usize) -> io::Result<()>;
}

/// Which sockets another process can take over.
trait HandoffFd {
    fn handoff_fd(&self) -> io::Result<Option<std::os::fd::OwnedFd>>;
    /// Only a TCP socket reads on the grid: a TLS client's socket pair
    /// reports every byte.
    fn set_read_low_water(&self, _bytes: usize) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
}

impl HandoffFd for TcpStream {
    fn handoff_fd(&self) -> io::Result<Option<std::os::fd::OwnedFd>> {
        use std::os::fd::AsFd;
        self.as_fd().try_clone_to_owned().map(Some)
    }
    fn set_read_low_water(&self, bytes: usize) -> io::Result<()> {
        crate::sockopt::set_recv_low_water(self, bytes)
    }
}

impl HandoffFd for UnixStream {
    fn handoff_fd(&self) -> io::Result<Option<std::os::fd::OwnedFd>> {
        Ok(None)
    }
}

macro_rules! socket {
    ($t:ty) => {
        impl Socket for $t {
            fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
                <$t>::try_read(self, buf)
            }
            fn try_read_draining(&self, buf: &mut [u8]) -> io::Result<usize> {
                let len = buf.len();
                let mut short = None;
                let read = <$t>::try_io(self, Interest::READABLE, || {
                    match <$t>::try_read(self, buf)? {
                        n if n > 0 && n < len => {
                            short = Some(n);
                            Err(io::ErrorKind::WouldBlock.into())
                        }
                        n => Ok(n),
                    }
                });
                match (read, short) {
                    (_, Some(n)) => Ok(n),
                    (read, None) => read,
                }
            }
            fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
                <$t>::try_write_vectored(self, bufs)
            }
            fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                <$t>::poll_read_ready(self, cx)
            }
            fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                <$t>::poll_write_ready(self, cx)
            }
            fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
                <$t>::readable(self)
            }
            fn writable(&self) -> impl Future<Output = io::Result<()>> + Send {
                <$t>::writable(self)
            }
            fn handoff_fd(&self) -> io::Result<Option<std::os::fd::OwnedFd>> {
                <$t as HandoffFd>::handoff_fd(self)
            }
            fn read_now(&self, buf: &mut [u8]) -> io::Result<usize> {
                Ok(rustix::net::recv(self, buf, rustix::net::RecvFlags::DONTWAIT)?.0)
            }
            fn set_read_low_water(&self, bytes: usize) -> io::Result<()> {
                <$t as HandoffFd>::set_read_low_water(self, bytes)
            }
        }
    };
}

socket!(TcpStream);
socket!(UnixStream);

/// Serves one client until it closes; `peer` is its real address, `tls`
/// whether it came through TLS. Errors stay in here: they are logged and
/// never reach the accept loop.
///
/// Rare paths (refusal, closing) run in boxed futures: the future of every
/// live connection is sized for the common path only, which keeps an idle
/// client's footprint small.
///
/// `arrival` counts the connection as still in the front door until it
/// registers: one that meets an upgrade's freeze first waits it out there
/// (see [`handoff::wait_out_upgrade`]). `seat` is the place the connection
/// took among those the limits allow when it was accepted; the client
/// registers in it, and a refused connection holds it until it is closed.
pub async fn serve_on<S: Socket>(
    stream: S,
    peer: SocketAddr,
    tls: bool,
    hub: Hub,
    mut arrival: crate::handoff::Arrival,
    mut seat: Seat,
) {
    let client = loop {
        match hub.register(&mut seat, peer, tls) {
            Ok(client) => break client,
            Err(Refusal::Upgrading) => {
                let counted = arrival.counted();
                match Box::pin(handoff::wait_out_upgrade(&stream, peer, tls, counted, &hub)).await {
                    handoff::Waited::Resumed => {}
                    handoff::Waited::HandedOver => return,
                    handoff::Waited::Reconnect => {
                        return Box::pin(handoff::tell_to_reconnect(stream, tls)).await;
                    }
                }
            }
            Err(refusal) => {
                drop(arrival);
                Box::pin(refuse(stream, peer, refusal)).await;
                drop(seat);
                return;
            }
        }
    };
    arrival.leave();
    let span = info_span!("conn", client = client.id, %peer, tls, nick = %client.nick());
    async move {
        info!("connected");
        let nick = client.nick();
        let room = match welcome(&hub, &client, &nick) {
            JoinRequest::Done(room) => room,
            // Cluster mode, the default room's first member here: its
            // history is loaded first. Nothing was read yet, so nothing
            // waits behind this.
            JoinRequest::Wait { room, done } => {
                // Bounded even if the cluster task is held up: the client
                // then joins with this node's history.
                let _ = tokio::time::timeout(WELCOME_WAIT, done).await;
                hub.finish_join(&client, &room)
            }
        };
        Connection::new(stream, hub, client, room, nick)
            .serve()
            .await;
    }
    .instrument(span)
    .await
}

/// Greets a new client and puts it in the default room.
fn welcome(hub: &Hub, client: &Arc<Client>, nick: &str) -> JoinRequest {
    let config = hub.config();
    let limit = config.limits.outbound_queue_bytes;
    client.notice(
        &format!(
            "Welcome to {}, {nick}! Type /help for commands.",
            config.server.name
        ),
        limit,
    );
    for line in config.server.motd.lines() {
        client.notice(&sanitize::clean(line), limit);
    }
    hub.request_join(client, &config.chat.default_room)
}

/// Tells a refused client why, in one line, and closes.
async fn refuse<S: Socket>(mut stream: S, peer: SocketAddr, refusal: Refusal) {
    info!(%peer, reason = %refusal, "refused connection");
    let line = server_line(&format!("error: {refusal}"));
    let _ = tokio::time::timeout(CLOSE_FLUSH, stream.write_all(&line)).await;
    linger(stream).await;
}

/// Half-closes and waits briefly for the peer's EOF, discarding its input.
async fn linger<S: Socket>(mut stream: S) {
    if stream.shutdown().await.is_err() {
        return;
    }
    let drain = async {
        let mut sink = [0u8; 1024];
        loop {
            if stream.readable().await.is_err() {
                return;
            }
            match stream.try_read(&mut sink) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_LINGER, drain).await;
}

struct Connection<S> {
    stream: S,
    client: Arc<Client>,
    hub: Hub,
    /// The room this client is in; cached so the hot path needs no lookup.
    room: Arc<Room>,
    nick: Arc<str>,
    framer: LineFramer,
    /// Lines taken from the outbox and not yet fully written.
    pending: VecDeque<Bytes>,
    flood: Flood,
    overlong: u32,
    /// Whether the client is in the middle of a line (mirrored in the hub
    /// for the partial-line deadline, on change only).
    mid_line: bool,
    /// Whether the first line has been read: it is checked for another
    /// protocol (HTTP, gRPC) before anything else.
    greeted: bool,
    /// While set, this client does not read: a recipient of its lines is
    /// behind (flow control).
    pause: Option<Box<Pause>>,
    /// While set, a command waits for the cluster's answer (cluster mode):
    /// this client's later lines wait too, unread or held, so that they are
    /// handled after it, in order; writes go on.
    waiting: Option<Box<Waiting>>,
    /// When the last write to the socket happened (write coalescing).
    last_write: Option<tokio::time::Instant>,
    /// Recent lines per second queued for this client, measured at each
    /// write: how long write coalescing may hold a write (see `hold_write`).
    arrivals: f32,
    /// Lines queued for this client in all, at the last write.
    lines_seen: u64,
    /// Wakes the task when a held-back write is due; made on first use, so
    /// a client that is never busy does not carry a timer.
    write_gate: Option<Pin<Box<tokio::time::Sleep>>>,
    /// This client's place in its room's queue for the grid's next tick,
    /// when busy (see [`crate::grid`]).
    ticket: Ticket,
    /// Set while the socket refuses bytes: wakes the task when it takes
    /// them again, telling the outbox first (see [`write::Writable`]).
    /// Made on the first refusal and kept.
    writable: Option<Arc<write::Writable>>,
    /// The socket refused bytes and has taken none since.
    refused: bool,
    /// Reading on the room's grid (see [`grid_read`]).
    grid_read: grid_read::GridRead,
    /// The `conn` span, whose `nick` follows the client's.
    span: tracing::Span,
}

impl<S: Socket> Connection<S> {
    /// A connection that starts afresh: no line read, a full flood bucket,
    /// nothing owed. Must run inside its `conn` span, which it keeps.
    fn new(stream: S, hub: Hub, client: Arc<Client>, room: Arc<Room>, nick: Arc<str>) -> Self {
        Connection {
            stream,
            client,
            hub,
            room,
            nick,
            framer: LineFramer::default(),
            pending: VecDeque::new(),
            flood: Flood::new(
                TokenBucket::new(u32::MAX, Instant::now()),
                Instant::now(),
                true,
            ),
            overlong: 0,
            mid_line: false,
            greeted: false,
            pause: None,
            waiting: None,
            last_write: None,
            arrivals: 0.0,
            lines_seen: 0,
            write_gate: None,
            ticket: Ticket::default(),
            writable: None,
            refused: false,
            grid_read: grid_read::GridRead::new(),
            span: tracing::Span::current(),
        }
    }
}

/// A sender's pause: until `on` drains or stops reading; `until` is when
/// to check the latter next.
struct Pause {
    on: Arc<Client>,
    until: Pin<Box<tokio::time::Sleep>>,
    /// For the target of a private message, when the pause ends anyway
    /// (see [`PRIVATE_PAUSE`]).
    ends: Option<tokio::time::Instant>,
}

/// A command waiting for the cluster, and the lines read after it.
struct Waiting {
    command: Pending,
    /// Lines read after the command, in order, handled once it is answered.
    held: VecDeque<Held>,
}

/// The commands that may wait for the cluster.
enum Pending {
    /// `/nick`: whether the nick is free cluster-wide.
    Nick {
        nick: Arc<str>,
        answer: tokio::sync::oneshot::Receiver<Claim>,
    },
    /// `/join`: the room's cluster-wide history, loaded into the room.
    Join {
        room: Arc<Room>,
        done: tokio::sync::oneshot::Receiver<()>,
    },
}

/// A frame read while a command waits.
enum Held {
    Line(Bytes),
    TooLong,
}

/// Chat lines read in one wake-up, formatted for the room, waiting to be
/// handed to the hub as one batch.
struct Batch {
    buf: BytesMut,
    lines: usize,
}

impl<S: Socket> Connection<S> {
    /// Serves until the client goes, or until a seamless upgrade hands it
    /// to a new process.
    async fn serve(mut self) {
        loop {
            let reason = self.run().await;
            if reason != Disconnect::Handoff {
                return Box::pin(self.finish(reason)).await;
            }
            let hub = self.hub.clone();
            let outcome = Box::pin(hub.handoff().park(|| self.export())).await;
            match outcome {
                crate::handoff::Outcome::Resumed => {}
                crate::handoff::Outcome::Committed => return Box::pin(self.handed_over()).await,
            }
        }
    }

    /// Serves until the client must go, and says why. Shutdown, kicks and
    /// idle timeouts all arrive as a close reason on the outbox.
    async fn run(&mut self) -> Disconnect {
        std::future::poll_fn(|cx| self.poll_run(cx)).await
    }

    /// Turns of the connection until it must wait. A read that emptied the
    /// socket goes round once more at once (writing what it queued for
    /// this client, and registering for the next read) instead of waking
    /// itself: a self-wake puts the task back on the run queue, which with
    /// several workers wakes a parked one to share it, for a turn that
    /// would find nothing to read. Readiness is polled directly rather than
    /// through `select!`ed futures, so a wake-up costs no waiter
    /// registration and the idle connection's future stays small.
    fn poll_run(&mut self, cx: &mut Context<'_>) -> Poll<Disconnect> {
        self.begin_grid_read(cx);
        let poll = self.poll_turns(cx);
        self.grid_read.phase = false;
        poll
    }

    fn poll_turns(&mut self, cx: &mut Context<'_>) -> Poll<Disconnect> {
        for _ in 0..TURNS_PER_POLL {
            match self.turn(cx) {
                ControlFlow::Break(poll) => return poll,
                ControlFlow::Continue(()) => {}
            }
        }
        // Still reading after as many turns: let other clients run.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// One turn: take what the outbox holds, write what the socket
    /// accepts, read what it offers. `Continue` when the socket was
    /// emptied and the turn can be taken again at once.
    fn turn(&mut self, cx: &mut Context<'_>) -> ControlFlow<Poll<Disconnect>> {
        // A seamless upgrade: stop here, between reads, with nothing half
        // done (see `crate::handoff`).
        // A command waiting for the cluster finishes first (its held lines
        // then reach outboxes that are exported only once everyone has
        // parked); one that takes too long makes the upgrade time out and
        // roll back, never lose those lines.
        if self.hub.handoff().is_frozen() && self.waiting.is_none() {
            return ControlFlow::Break(Poll::Ready(Disconnect::Handoff));
        }
        if let Some(reason) = self
            .client
            .outbox
            .take_or_wait(&mut self.pending, cx.waker())
        {
            return ControlFlow::Break(Poll::Ready(reason));
        }
        let hold = !self.pending.is_empty() && self.hold_write(cx);
        if !hold && !self.pending.is_empty() {
            self.measure_arrivals();
        }
        let mut wrote = false;
        while !hold && !self.pending.is_empty() {
            match self.poll_writable(cx) {
                // `flush` stops at `WouldBlock`, which clears the readiness,
                // so the next round registers for it instead of spinning.
                Poll::Ready(Ok(())) => {
                    if self.flush().is_err() {
                        return ControlFlow::Break(Poll::Ready(Disconnect::Error));
                    }
                    self.last_write = Some(tokio::time::Instant::now());
                    wrote = true;
                }
                Poll::Ready(Err(_)) => return ControlFlow::Break(Poll::Ready(Disconnect::Error)),
                Poll::Pending => break,
            }
        }
        if wrote && self.pending.is_empty() {
            // Lines keep coming: the next write is held anyway, so the next
            // line need not wake the task either, only the timer (the
            // window is zero, and nothing is armed, when they do not).
            self.hold_write(cx);
        }
        // Flow control: before reading, wait for any member of the room
        // that is behind but reading. Checked again after each pause, so
        // senders released together do not all publish at once into a
        // queue that is filling up again.
        loop {
            if self.pause.is_none()
                && let Some(member) = self.room.congested_member()
            {
                let limit = self.hub.queue_limit();
                if member.id != self.client.id {
                    self.pause_for(member);
                } else if !self.client.outbox.congested(limit) {
                    // The room waits for this client, which has just
                    // caught up: it is the others' turn to be waited for.
                    self.room.pass_congested(&self.client, limit);
                    continue;
                }
            }
            let Some(pause) = &mut self.pause else {
                break;
            };
            let limit = self.hub.queue_limit();
            let over = pause
                .ends
                .is_some_and(|ends| tokio::time::Instant::now() >= ends);
            if over || pause.on.outbox.drained_or_wait(limit, cx.waker()) {
                self.room.pass_congested(&pause.on, limit);
                self.pause = None;
                continue;
            }
            // Still behind and still reading: wait on. The timer only makes
            // sure a recipient that stops reading meanwhile is noticed (it
            // then no longer holds anyone back).
            while pause.until.as_mut().poll(cx).is_ready() {
                pause
                    .until
                    .as_mut()
                    .reset(tokio::time::Instant::now() + RECHECK);
            }
            return ControlFlow::Break(Poll::Pending);
        }
        if self.waiting.is_some() {
            match self.poll_waiting(cx) {
                Poll::Pending => return ControlFlow::Break(Poll::Pending),
                Poll::Ready(Some(reason)) => return ControlFlow::Break(Poll::Ready(reason)),
                // Answered: what it queued for us is written on the next
                // turn, before anything more is read.
                Poll::Ready(None) => {
                    cx.waker().wake_by_ref();
                    return ControlFlow::Break(Poll::Pending);
                }
            }
        }
        // Readable as the socket says, or, reading on the grid, because the
        // read phase came (`raw`: the reactor was not told of the lines).
        let ready = match self.stream.poll_read_ready(cx) {
            Poll::Pending if self.grid_read.owed => Poll::Ready(Ok(true)),
            Poll::Pending => Poll::Pending,
            Poll::Ready(ready) => Poll::Ready(ready.map(|()| false)),
        };
        match ready {
            Poll::Ready(Ok(raw)) => match self.read_now_or_phase(raw) {
                // Lines were handled (and may have queued replies for us);
                // the socket is empty: go round again at once.
                Ok(AfterRead::Drained) => ControlFlow::Continue(()),
                // More to read: let other clients run, then come back.
                Ok(AfterRead::More) => {
                    cx.waker().wake_by_ref();
                    ControlFlow::Break(Poll::Pending)
                }
                Ok(AfterRead::Close(reason)) => ControlFlow::Break(Poll::Ready(reason)),
                Err(e) => {
                    debug!(error = %e, "read failed");
                    ControlFlow::Break(Poll::Ready(Disconnect::Error))
                }
            },
            Poll::Ready(Err(_)) => ControlFlow::Break(Poll::Ready(Disconnect::Error)),
            Poll::Pending => ControlFlow::Break(Poll::Pending),
        }
    }

    /// Waits for the cluster's answer to the waiting command, then handles
    /// the lines held behind it (which may start another wait). `None` once
    /// nothing waits any more.
    fn poll_waiting(&mut self, cx: &mut Context<'_>) -> Poll<Option<Disconnect>> {
        while let Some(waiting) = &mut self.waiting {
            let answer = match &mut waiting.command {
                Pending::Nick { answer, .. } => match Pin::new(answer).poll(cx) {
                    Poll::Ready(answer) => Some(answer.ok()),
                    Poll::Pending => return Poll::Pending,
                },
                // Loaded, or given up: either way the client joins now.
                Pending::Join { done, .. } => match Pin::new(done).poll(cx) {
                    Poll::Ready(_) => None,
                    Poll::Pending => return Poll::Pending,
                },
            };
            let Some(waiting) = self.waiting.take() else {
                break;
            };
            let Waiting { command, held } = *waiting;
            match (command, answer) {
                (Pending::Nick { nick, .. }, Some(answer)) => self.nick_answered(&nick, answer),
                (Pending::Join { room, .. }, _) => {
                    self.room = self.hub.finish_join(&self.client, &room);
                    info!(room = %self.room.name, "joined");
                }
                (Pending::Nick { .. }, None) => {}
            }
            if let Some(reason) = self.replay(held) {
                return Poll::Ready(Some(reason));
            }
        }
        Poll::Ready(None)
    }

    /// Handles lines held while a command waited, in order, until one
    /// waits again (the rest stay held behind it).
    fn replay(&mut self, mut held: VecDeque<Held>) -> Option<Disconnect> {
        self.follow_nick();
        let config = self.hub.config();
        let now = Instant::now();
        let mut batch = Batch {
            buf: BytesMut::new(),
            lines: 0,
        };
        let mut outcome = None;
        while let Some(frame) = held.pop_front() {
            if let Some(waiting) = &mut self.waiting {
                waiting.held.push_back(frame);
                waiting.held.extend(held.drain(..));
                break;
            }
            let frame = match &frame {
                Held::Line(line) => Frame::Line(line),
                Held::TooLong => Frame::TooLong,
            };
            outcome = self.on_frame(frame, &mut batch, &config, now);
            if outcome.is_some() {
                break;
            }
        }
        self.publish(&mut batch);
        outcome
    }

    /// The cluster answered a `/nick`.
    fn nick_answered(&mut self, wanted: &str, answer: Option<Claim>) {
        let Some(claim) = answer else {
            self.error("the server is shutting down");
            return;
        };
        match self.hub.nick_claimed(&self.client, wanted, claim) {
            Ok(new) => self.renamed(new),
            Err(why) => self.error(&why),
        }
    }

    fn renamed(&mut self, new: Arc<str>) {
        self.span.record("nick", tracing::field::display(&new));
        info!(old = %self.nick, new = %new, "nick changed");
        self.nick = new;
        self.notice(&format!("You are now known as {}.", self.nick));
    }

    /// Re-reads the nick when the hub changed it (cluster mode: another
    /// node holds it).
    fn follow_nick(&mut self) {
        if self.client.take_renamed() {
            let new = self.client.nick();
            self.span.record("nick", tracing::field::display(&new));
            info!(old = %self.nick, new = %new, "nick changed by the cluster");
            self.nick = new;
        }
    }

    /// Stops reading until `recipient`, which is behind but reading, has
    /// drained or stopped reading: the sender's next lines wait in its own
    /// socket buffer instead of piling up in the recipient's queue.
    fn pause_for(&mut self, recipient: Arc<Client>) {
        self.pause_until(recipient, None);
    }

    /// Like [`Connection::pause_for`], for the target of a private message:
    /// for [`PRIVATE_PAUSE`] at most.
    fn pause_for_private(&mut self, target: Arc<Client>) {
        self.pause_until(target, Some(tokio::time::Instant::now() + PRIVATE_PAUSE));
    }

    fn pause_until(&mut self, recipient: Arc<Client>, ends: Option<tokio::time::Instant>) {
        self.hub.stats().flow_paused();
        self.pause = Some(Box::new(Pause {
            on: recipient,
            until: Box::pin(tokio::time::sleep(RECHECK)),
            ends,
        }));
    }

    /// Leaves the hub, then tells the client why it is being closed (after
    /// what it is still owed) and closes gracefully.
    async fn finish(mut self, reason: Disconnect) {
        if let Some(waiting) = self.waiting.take() {
            match &waiting.command {
                // Queued after the claim: frees the nick if it was granted.
                Pending::Nick { nick, .. } => self.hub.release_nick(&self.client, nick),
                Pending::Join { room, .. } => self.hub.cancel_join(room),
            }
        }
        self.hub.leave(&self.client, &reason);
        info!(%reason, "disconnected");
        let last = match &reason {
            Disconnect::Closed | Disconnect::Error | Disconnect::SlowConsumer => return,
            Disconnect::Quit(_) => "Goodbye.".to_string(),
            Disconnect::Kicked(why) => format!("You were kicked: {why}"),
            Disconnect::Shutdown => "Server is shutting down.".to_string(),
            Disconnect::Flood => "Disconnected: flooding.".to_string(),
            Disconnect::Idle => "Disconnected: idle for too long.".to_string(),
            Disconnect::PartialLine => "Disconnected: line not finished in time.".to_string(),
            Disconnect::WrongProtocol => WRONG_PROTOCOL.to_string(),
            Disconnect::OverlongLines => "Disconnected: too many over-long lines.".to_string(),
            Disconnect::Banned(why) => format!("You are banned: {why}"),
            Disconnect::Handoff => return,
        };
        self.close_with(&last).await;
    }

    /// Writes what the client is still owed plus `last` as a server line,
    /// within [`CLOSE_FLUSH`], then closes gently.
    async fn close_with(mut self, last: &str) {
        self.client.outbox.take(&mut self.pending);
        self.pending.push_back(server_line(last));
        let flushed = tokio::time::timeout(CLOSE_FLUSH, async {
            while !self.pending.is_empty() {
                self.stream.writable().await?;
                self.flush()?;
            }
            io::Result::Ok(())
        })
        .await;
        if matches!(flushed, Ok(Ok(()))) {
            linger(self.stream).await;
        }
    }
}

mod flood;
mod grid_read;
mod handoff;
mod read;
mod write;

use flood::{Flood, Verdict};
pub use handoff::resume;
use read::*;
