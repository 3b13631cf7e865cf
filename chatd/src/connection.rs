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
//!   `chat.write_coalesce_ms` at `COALESCE_FULL_RATE`, so a line after a
//!   quiet spell leaves at once and only a busy client trades a few
//!   milliseconds for fewer wake-ups and syscalls.
//!
//! Nothing here blocks on another client. A client that stops reading only
//! stops its own writes; its outbox fills and the hub cuts it off. A client
//! that reads but is behind makes its *senders* pause reading for a moment
//! (flow control, see [`crate::outbox`]): the pause is a state of this task,
//! never a wait inside the hub.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::{TcpStream, UnixStream};
use tracing::{Instrument, debug, info, info_span};

use crate::cluster::nicks::Claim;
use crate::disconnect::Disconnect;
use crate::framing::{Frame, LineFramer};
use crate::hub::{Client, Hub, JoinRequest, NickRequest, PrivateError, Refusal, Room, server_line};
use crate::protocol::{self, Command};
use crate::rate::TokenBucket;
use crate::sanitize;

/// Bytes read per `read` call. Lives on the worker thread's stack, not in
/// the connection.
const READ_CHUNK: usize = 16 * 1024;
/// Reads per wake-up before yielding to other clients.
const READS_PER_WAKE: usize = 4;
/// Buffers handed to one vectored write.
const IOV_MAX: usize = 64;
/// Queued bytes that make a write worth its syscall: write coalescing
/// never holds back more.
const COALESCE_ENOUGH: usize = 4 * 1024;
/// Lines per second into one client at and above which write coalescing
/// holds writes for the whole `chat.write_coalesce_ms`; below, the window
/// shrinks in proportion, so a client that gets a line now and then (whose
/// writes would gather little) gets it at once.
const COALESCE_FULL_RATE: f32 = 1000.0;
/// How long a closing connection may take to flush its last lines when the
/// client is slow to read them.
const CLOSE_FLUSH: Duration = Duration::from_secs(5);
/// How long to wait for the client's EOF after ours, so that unread input
/// does not turn our close into a reset that destroys the last lines.
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// How often a paused sender checks that the recipient it waits for is
/// still reading (a drain wakes it at once; this is for one that stops).
const RECHECK: Duration = crate::outbox::PROGRESS_WINDOW;
/// The longest a new client waits for the default room's cluster-wide
/// history before joining with this node's.
const WELCOME_WAIT: Duration = Duration::from_secs(5);
/// What this port says to a client speaking another protocol.
const WRONG_PROTOCOL: &str = "This is a chatd chat port: plain text lines for nc or telnet, \
     not HTTP, gRPC or TLS. The admin API (chatctl) listens on its own port.";

const HELP: &[&str] = &[
    "Commands:",
    "  /nick NAME       change your nick",
    "  /join ROOM       leave this room and join (or create) ROOM",
    "  /rooms           list rooms",
    "  /who             list who is in this room",
    "  /msg NICK TEXT   send a private message",
    "  /me ACTION       send an action: * you ACTION",
    "  /quit [REASON]   leave",
    "  /help            this list",
    "Any other line is sent to everyone in your room. Start it with // to send a leading /.",
];

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
    fn handoff_fd(&self) -> Option<std::os::fd::OwnedFd>;
}

/// Which sockets another process can take over.
trait HandoffFd {
    fn handoff_fd(&self) -> Option<std::os::fd::OwnedFd>;
}

impl HandoffFd for TcpStream {
    fn handoff_fd(&self) -> Option<std::os::fd::OwnedFd> {
        use std::os::fd::AsFd;
        self.as_fd().try_clone_to_owned().ok()
    }
}

impl HandoffFd for UnixStream {
    fn handoff_fd(&self) -> Option<std::os::fd::OwnedFd> {
        None
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
            fn handoff_fd(&self) -> Option<std::os::fd::OwnedFd> {
                <$t as HandoffFd>::handoff_fd(self)
            }
        }
    };
}

socket!(TcpStream);
socket!(UnixStream);

/// Serves one accepted plain TCP socket until it closes.
pub async fn serve(stream: TcpStream, peer: SocketAddr, hub: Hub) {
    serve_on(stream, peer, false, hub).await
}

/// Serves one client until it closes; `peer` is its real address, `tls`
/// whether it came through TLS. Errors stay in here: they are logged and
/// never reach the accept loop.
///
/// Rare paths (refusal, closing) run in boxed futures: the future of every
/// live connection is sized for the common path only, which keeps an idle
/// client's footprint small.
pub async fn serve_on<S: Socket>(stream: S, peer: SocketAddr, tls: bool, hub: Hub) {
    let client = match hub.connect_with(peer, tls) {
        Ok(client) => client,
        Err(refusal) => return Box::pin(refuse(stream, peer, refusal)).await,
    };
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
        let conn = Connection {
            stream,
            hub,
            room,
            nick,
            framer: LineFramer::default(),
            pending: VecDeque::new(),
            flood: Flood::new(Instant::now()),
            overlong: 0,
            mid_line: false,
            greeted: false,
            pause: None,
            waiting: None,
            last_write: None,
            arrivals: 0.0,
            lines_seen: 0,
            write_gate: None,
            client,
            span: tracing::Span::current(),
        };
        conn.serve().await;
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

/// A formatted chat line back to its text: `<nick> text` or, for an
/// action, `* nick text`.
fn unformat<'a>(line: &'a [u8], nick: &str) -> (&'a [u8], bool) {
    let said = line
        .strip_prefix(b"<")
        .and_then(|r| r.strip_prefix(nick.as_bytes()))
        .and_then(|r| r.strip_prefix(b"> "));
    if let Some(text) = said {
        return (text, false);
    }
    let acted = line
        .strip_prefix(b"* ")
        .and_then(|r| r.strip_prefix(nick.as_bytes()))
        .and_then(|r| r.strip_prefix(b" "));
    match acted {
        Some(text) => (text, true),
        None => (line, false),
    }
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
    /// The `conn` span, whose `nick` follows the client's.
    span: tracing::Span,
}

/// A sender's pause: until `on` drains or stops reading; `until` is when
/// to check the latter next.
struct Pause {
    on: Arc<Client>,
    until: Pin<Box<tokio::time::Sleep>>,
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

struct Flood {
    bucket: TokenBucket,
    dropped: u32,
    warned: bool,
}

impl Flood {
    fn new(now: Instant) -> Self {
        Self {
            bucket: TokenBucket::new(u32::MAX, now),
            dropped: 0,
            warned: false,
        }
    }
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

    /// One turn of the connection: take what the outbox holds, write what
    /// the socket accepts, read what it offers. Readiness is polled
    /// directly rather than through `select!`ed futures, so a wake-up costs
    /// no waiter registration and the idle connection's future stays small.
    fn poll_run(&mut self, cx: &mut Context<'_>) -> Poll<Disconnect> {
        // A seamless upgrade: stop here, between reads, with nothing half
        // done (see `crate::handoff`).
        // A command waiting for the cluster finishes first (its held lines
        // then reach outboxes that are exported only once everyone has
        // parked); one that takes too long makes the upgrade time out and
        // roll back, never lose those lines.
        if self.hub.handoff().is_frozen() && self.waiting.is_none() {
            return Poll::Ready(Disconnect::Handoff);
        }
        if let Some(reason) = self
            .client
            .outbox
            .take_or_wait(&mut self.pending, cx.waker())
        {
            return Poll::Ready(reason);
        }
        let hold = !self.pending.is_empty() && self.hold_write(cx);
        if !hold && !self.pending.is_empty() {
            self.measure_arrivals();
        }
        let mut wrote = false;
        while !hold && !self.pending.is_empty() {
            match self.stream.poll_write_ready(cx) {
                // `flush` stops at `WouldBlock`, which clears the readiness,
                // so the next round registers for it instead of spinning.
                Poll::Ready(Ok(())) => {
                    if self.flush().is_err() {
                        return Poll::Ready(Disconnect::Error);
                    }
                    self.last_write = Some(tokio::time::Instant::now());
                    wrote = true;
                }
                Poll::Ready(Err(_)) => return Poll::Ready(Disconnect::Error),
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
                && member.id != self.client.id
            {
                self.pause_for(member);
            }
            let Some(pause) = &mut self.pause else {
                break;
            };
            let limit = self.hub.queue_limit();
            if pause.on.outbox.drained_or_wait(limit, cx.waker()) {
                self.room.clear_congested(&pause.on);
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
            return Poll::Pending;
        }
        if self.waiting.is_some() {
            match self.poll_waiting(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(reason)) => return Poll::Ready(reason),
                // Answered: what it queued for us is written on the next
                // turn, before anything more is read.
                Poll::Ready(None) => {
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
            }
        }
        match self.stream.poll_read_ready(cx) {
            Poll::Ready(Ok(())) => match self.on_readable() {
                Ok(None) => {
                    // Lines were handled (and may have queued replies for
                    // us); let other clients run, then come back.
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
                Ok(Some(reason)) => Poll::Ready(reason),
                Err(e) => {
                    debug!(error = %e, "read failed");
                    Poll::Ready(Disconnect::Error)
                }
            },
            Poll::Ready(Err(_)) => Poll::Ready(Disconnect::Error),
            Poll::Pending => Poll::Pending,
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
        match answer {
            Some(Claim::Granted) => match self.hub.rename(&self.client, wanted) {
                Ok(new) => self.renamed(new),
                Err(why) => {
                    self.hub.release_nick(&self.client, wanted);
                    self.error(&why);
                }
            },
            Some(Claim::Taken) => self.error(&format!("nick \"{wanted}\" is taken")),
            Some(Claim::Unavailable(why)) => self.error(&why),
            None => self.error("the server is shutting down"),
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

    /// Reads what is available and handles every complete line.
    fn on_readable(&mut self) -> io::Result<Option<Disconnect>> {
        self.follow_nick();
        let config = self.hub.config();
        let max_line = config.limits.max_line_bytes;
        let mut buf = [0u8; READ_CHUNK];
        let mut batch = Batch {
            buf: BytesMut::new(),
            lines: 0,
        };
        let mut outcome = None;
        let mut telnet_replies = BytesMut::new();
        let (mut lines, mut bytes) = (0u64, 0u64);
        let now = Instant::now();
        // One wake-up's batch stays well inside the recipients' queues, or a
        // single batch could overflow a small one.
        let budget = (config.limits.outbound_queue_bytes / 8).max(1024);
        for _ in 0..READS_PER_WAKE {
            let room = budget.saturating_sub(bytes as usize).min(buf.len());
            if room == 0 {
                break;
            }
            let n = match self.stream.try_read_draining(&mut buf[..room]) {
                Ok(0) => {
                    outcome = Some(Disconnect::Closed);
                    break;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            };
            bytes += n as u64;
            let first_read = bytes == n as u64
                && self
                    .client
                    .bytes_in
                    .load(std::sync::atomic::Ordering::Relaxed)
                    == 0;
            if first_read && looks_like_tls(&buf[..n]) {
                outcome = Some(Disconnect::WrongProtocol);
                break;
            }
            let kept = self.framer.strip_telnet(&mut buf[..n], &mut telnet_replies);
            if batch.buf.capacity() == 0 {
                batch.buf.reserve(kept + kept / 2 + 64);
            }
            let mut framer = std::mem::take(&mut self.framer);
            framer.feed(&buf[..kept], max_line, |frame| {
                if outcome.is_some() {
                    return;
                }
                lines += u64::from(matches!(frame, Frame::Line(_)));
                match &mut self.waiting {
                    Some(waiting) => waiting.held.push_back(match frame {
                        Frame::Line(line) => Held::Line(Bytes::copy_from_slice(line)),
                        Frame::TooLong => Held::TooLong,
                    }),
                    None => outcome = self.on_frame(frame, &mut batch, &config, now),
                }
            });
            self.framer = framer;
            // After the answers to this read's lines, as a timing mark
            // requires.
            if !telnet_replies.is_empty() {
                let limit = config.limits.outbound_queue_bytes;
                self.client
                    .outbox
                    .push(telnet_replies.split().freeze(), limit);
            }
            if outcome.is_some() || n < room || self.waiting.is_some() {
                break;
            }
        }
        self.publish(&mut batch);
        self.client.record_input(lines, bytes);
        self.hub.stats().input(lines, bytes);
        if self.framer.mid_line() != self.mid_line {
            self.mid_line = !self.mid_line;
            self.client.set_mid_line(self.mid_line);
        }
        Ok(outcome)
    }

    /// Stops reading until `recipient`, which is behind but reading, has
    /// drained or stopped reading: the sender's next lines wait in its own
    /// socket buffer instead of piling up in the recipient's queue.
    fn pause_for(&mut self, recipient: Arc<Client>) {
        self.hub.stats().flow_paused();
        self.pause = Some(Box::new(Pause {
            on: recipient,
            until: Box::pin(tokio::time::sleep(RECHECK)),
        }));
    }

    /// Hands the batch to the hub.
    fn publish(&mut self, batch: &mut Batch) {
        if batch.lines == 0 {
            return;
        }
        let lines = std::mem::take(&mut batch.lines);
        let bytes = batch.buf.split().freeze();
        if self.hub.watching_messages() {
            for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                let (text, action) = unformat(line, &self.nick);
                let text = String::from_utf8_lossy(text);
                self.hub
                    .message_event(self.client.id, &self.room, &self.nick, &text, action);
            }
        }
        let fanout = self.hub.publish(&self.room, self.client.id, bytes, lines);
        if let Some(recipient) = fanout.congested {
            self.pause_for(recipient);
        }
    }

    fn on_frame(
        &mut self,
        frame: Frame<'_>,
        batch: &mut Batch,
        config: &crate::config::Config,
        now: Instant,
    ) -> Option<Disconnect> {
        let limits = &config.limits;
        let line = match frame {
            Frame::TooLong => {
                self.overlong += 1;
                if self.overlong >= limits.max_overlong_lines {
                    return Some(Disconnect::OverlongLines);
                }
                self.error(&format!(
                    "line too long (max {} bytes), discarded; {} more and you are disconnected",
                    limits.max_line_bytes,
                    limits.max_overlong_lines - self.overlong
                ));
                return None;
            }
            Frame::Line(line) => line,
        };
        if !self.greeted {
            self.greeted = true;
            if looks_like_http(line) {
                return Some(Disconnect::WrongProtocol);
            }
        }
        if line.is_empty() {
            return None;
        }
        if let Some(flood) = limits.flood {
            let f = &mut self.flood;
            if f.dropped > 0 && f.bucket.is_full(flood.lines_per_sec, flood.burst, now) {
                f.dropped = 0;
                f.warned = false;
            }
            if !f.bucket.try_take(flood.lines_per_sec, flood.burst, now) {
                f.dropped += 1;
                if flood.max_dropped > 0 && f.dropped > flood.max_dropped {
                    return Some(Disconnect::Flood);
                }
                if !f.warned {
                    f.warned = true;
                    self.error("flood control: you are sending too fast, lines are being dropped");
                }
                return None;
            }
        }
        match line {
            [b'/', b'/', ..] => {
                self.say(batch, b"<", b"> ", &line[1..]);
                None
            }
            [b'/', ..] => {
                // Commands change state or answer this client: anything
                // batched so far must reach the room first.
                self.publish(batch);
                let text = String::from_utf8_lossy(line);
                // One span per command (never per chat line), so a trace
                // shows what each client did and how long it took.
                let span = info_span!(
                    "command",
                    otel.name = command_name(&text),
                    command = command_name(&text),
                    room = %self.room.name,
                );
                let _entered = span.enter();
                self.command(&text, batch)
            }
            _ => {
                self.say(batch, b"<", b"> ", line);
                None
            }
        }
    }

    /// Appends `before nick after text\r\n` to the batch, unless the cleaned
    /// text is empty.
    fn say(&mut self, batch: &mut Batch, before: &[u8], after: &[u8], text: &[u8]) {
        let start = batch.buf.len();
        batch.buf.put_slice(before);
        batch.buf.put_slice(self.nick.as_bytes());
        batch.buf.put_slice(after);
        let body = batch.buf.len();
        sanitize::clean_into(&mut batch.buf, text);
        if batch.buf[body..].iter().all(|&b| b == b' ') {
            batch.buf.truncate(start);
        } else {
            batch.buf.put_slice(b"\r\n");
            batch.lines += 1;
        }
    }

    fn command(&mut self, text: &str, batch: &mut Batch) -> Option<Disconnect> {
        let command = match protocol::parse(text) {
            Ok(c) => c,
            Err(e) => {
                self.error(&e.to_string());
                return None;
            }
        };
        match command {
            Command::Say(text) => self.say(batch, b"<", b"> ", text.as_bytes()),
            Command::Me(action) => {
                self.say(batch, b"* ", b" ", action.as_bytes());
                self.publish(batch);
            }
            Command::Help => {
                for line in HELP {
                    self.notice(line);
                }
            }
            // Same spelling: nothing changes, so the room hears nothing.
            Command::Nick(wanted) if wanted == &*self.nick => {
                self.notice(&format!("You are already known as {wanted}."));
            }
            Command::Nick(wanted) => match self.hub.request_nick(&self.client, wanted) {
                NickRequest::Done(Ok(new)) => self.renamed(new),
                NickRequest::Done(Err(why)) => self.error(&why),
                NickRequest::Wait(answer) => {
                    self.waiting = Some(Box::new(Waiting {
                        command: Pending::Nick {
                            nick: wanted.into(),
                            answer,
                        },
                        held: VecDeque::new(),
                    }));
                }
            },
            Command::Join(room) => match protocol::normalize_room(room) {
                Ok(room) => match self.hub.request_join(&self.client, &room) {
                    JoinRequest::Done(room) => {
                        self.room = room;
                        info!(room = %self.room.name, "joined");
                    }
                    JoinRequest::Wait { room, done } => {
                        self.waiting = Some(Box::new(Waiting {
                            command: Pending::Join { room, done },
                            held: VecDeque::new(),
                        }));
                    }
                },
                Err(e) => self.error(&e.describe("room", room)),
            },
            Command::Rooms => {
                let rooms = self.hub.all_rooms();
                self.notice(&format!(
                    "{}:",
                    protocol::count(rooms.len() as u64, "room", "rooms")
                ));
                for r in rooms.iter().take(100) {
                    self.notice(&format!("  {} ({})", r.name, protocol::users(r.members)));
                }
            }
            Command::Who => {
                let who = self.hub.who(&self.room);
                self.notice(&who);
            }
            Command::Msg { to, text } => match self.hub.private(&self.client, to, text) {
                Ok(Some(congested)) => self.pause_for(congested),
                Ok(None) => {}
                Err(PrivateError::Busy(target)) => {
                    self.error(&format!(
                        "{} is behind on reading; message not delivered, try again in a moment",
                        target.nick()
                    ));
                    self.pause_for(target);
                }
                Err(PrivateError::Failed(why)) => self.error(&why),
            },
            Command::Quit(reason) => {
                let reason = reason.map(sanitize::clean).filter(|r| !r.trim().is_empty());
                return Some(Disconnect::Quit(reason));
            }
        }
        None
    }

    fn notice(&self, text: &str) {
        self.client
            .notice(text, self.hub.config().limits.outbound_queue_bytes);
    }

    fn error(&self, text: &str) {
        self.notice(&format!("error: {text}"));
    }

    /// Whether to hold back the queued lines for now: lines are coming fast
    /// (the window, up to `chat.write_coalesce_ms`, grows with their rate
    /// and has not passed since the last write), so more will join them,
    /// and what is queued is still too little to be worth a syscall of its
    /// own. Arms the timer that wakes the task when the write is due; until
    /// then, lines pushed meanwhile do not wake the task.
    fn hold_write(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(last) = self.last_write else {
            return false;
        };
        let budget = self.hub.write_coalesce();
        if budget.is_zero() {
            return false;
        }
        let window = budget.mul_f32((self.arrivals / COALESCE_FULL_RATE).min(1.0));
        let due = last + window;
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
    fn measure_arrivals(&mut self) {
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
    fn flush(&mut self) -> io::Result<()> {
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
        self.client.outbox.take(&mut self.pending);
        self.pending.push_back(server_line(&last));
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

/// What a TLS client reads when the process serving it hands over to a new
/// one: its session cannot follow (the keys live in this process's rustls
/// state), so it must reconnect.
const TLS_NOT_HANDED: &str =
    "Server upgrade: TLS sessions cannot be carried over. Please reconnect.";

/// Continues serving a client handed over by the previous chatd process,
/// exactly where it stopped: the unfinished line, the flood bucket and the
/// counters carry on, and the hub has already queued what it was owed.
pub async fn resume(
    stream: TcpStream,
    client: Arc<Client>,
    room: Arc<Room>,
    state: crate::handoff::ClientState,
    hub: Hub,
) {
    let span = info_span!("conn", client = client.id, peer = %client.peer, tls = false, nick = %client.nick());
    async move {
        debug!("taken over from the previous process");
        let framer = LineFramer::import(&state.framer);
        let f = &state.flood;
        let flood = Flood {
            bucket: TokenBucket::resume(f.tokens, Duration::from_millis(f.age_ms), Instant::now()),
            dropped: f.dropped,
            warned: f.warned,
        };
        let conn = Connection {
            stream,
            hub,
            room,
            nick: client.nick(),
            mid_line: framer.mid_line(),
            framer,
            pending: VecDeque::new(),
            flood,
            overlong: state.overlong,
            greeted: state.greeted,
            pause: None,
            waiting: None,
            last_write: None,
            arrivals: 0.0,
            // The restored totals are history, not lines arriving now.
            lines_seen: client.outbox.totals().0,
            write_gate: None,
            client,
            span: tracing::Span::current(),
        };
        conn.serve().await;
    }
    .instrument(span)
    .await
}

impl<S: Socket> Connection<S> {
    /// This connection's state for the new process, taken while parked: the
    /// outbox joins what was taken but not yet written, and stays there if
    /// the upgrade is abandoned, so serving on loses nothing either.
    fn export(&mut self) -> crate::handoff::Export {
        use crate::handoff::state::{ClientState, FloodState};
        let _ = self.client.outbox.take(&mut self.pending);
        let mut unsent = Vec::with_capacity(self.pending.iter().map(Bytes::len).sum());
        for bytes in &self.pending {
            unsent.extend_from_slice(bytes);
        }
        let (tokens, age) = self.flood.bucket.export(Instant::now());
        let c = self.client.counters();
        let state = ClientState {
            id: self.client.id,
            nick: self.nick.to_string(),
            room: self.room.name.to_string(),
            peer: self.client.peer,
            connected_at_unix_ms: c.connected_at_unix_ms,
            lines_in: c.lines_in,
            bytes_in: c.bytes_in,
            lines_out: c.lines_out,
            bytes_out: c.bytes_out,
            idle_ms: c.idle_ms,
            partial_ms: c.partial_ms,
            framer: self.framer.export(),
            flood: FloodState {
                tokens,
                age_ms: age.as_millis() as u64,
                dropped: self.flood.dropped,
                warned: self.flood.warned,
            },
            overlong: self.overlong,
            greeted: self.greeted,
            unsent,
        };
        let fd = if self.client.tls {
            None
        } else {
            self.stream.handoff_fd()
        };
        crate::handoff::Export { state, fd }
    }

    /// The new process serves this client now: drop this process's copy of
    /// the socket, which closes nothing (no FIN, no reset: the new process
    /// holds the same socket), and say nothing. A TLS client, which could
    /// not be handed over, is told to reconnect.
    async fn handed_over(mut self) {
        if !self.client.tls {
            return;
        }
        info!("TLS client not handed over: asked to reconnect");
        self.client.outbox.take(&mut self.pending);
        self.pending.push_back(server_line(TLS_NOT_HANDED));
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

/// Whether the first line is an HTTP request line (`GET / HTTP/1.1`) or
/// the HTTP/2 preface (`PRI * HTTP/2.0`, which gRPC clients such as
/// `chatctl` send): someone pointed the wrong client at this port.
fn looks_like_http(line: &[u8]) -> bool {
    let mut words = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return false;
    };
    !method.is_empty()
        && method.iter().all(u8::is_ascii_uppercase)
        && !target.is_empty()
        && version.starts_with(b"HTTP/")
}

/// Whether a connection's first bytes are a TLS handshake record (content
/// type 22, version 3.x): a TLS client on the plain-text port.
fn looks_like_tls(first: &[u8]) -> bool {
    matches!(first, [0x16, 0x03, 0..=4, ..])
}

/// The command word of a `/command` line, for span names: one of a fixed
/// set, so a client cannot create unbounded span names.
fn command_name(line: &str) -> &'static str {
    let word = line.split_whitespace().next().unwrap_or("/");
    match word.to_ascii_lowercase().as_str() {
        "/nick" => "/nick",
        "/join" => "/join",
        "/rooms" => "/rooms",
        "/who" => "/who",
        "/msg" => "/msg",
        "/me" => "/me",
        "/quit" => "/quit",
        "/help" => "/help",
        _ => "/unknown",
    }
}
