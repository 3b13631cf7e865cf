//! One client's task: the only owner of its socket.
//!
//! A single task per client both reads and writes, driven by the socket's
//! readiness and the client's [`Outbox`](chatd_hub::outbox::Outbox):
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
//!   ([`chatd_hub::grid`]).
//!
//! Nothing here blocks on another client. A client that stops reading only
//! stops its own writes; its outbox fills and the hub cuts it off. A client
//! that reads but is behind makes its *senders* pause reading for a moment
//! (flow control, see [`chatd_hub::outbox`]): the pause is a state of this task,
//! never a wait inside the hub.
//!
//! A `Connection` is two halves: the `wire` (the socket and the bytes on
//! their way: pending writes, write coalescing, reading on the grid, see
//! `write` and `grid_read`) and the `session` (the chat state: nick, room,
//! framer, flood control, pauses and waiting commands, see `read` and
//! `command`). Here: the task and its poll loop, which drives both.
//! Beside them: `handoff` (export to and resume from a seamless upgrade).

use std::io;
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tracing::{Instrument, debug, info, info_span};

use crate::handoff::Gate;
use chatd_hub::disconnect::Disconnect;
use chatd_hub::hub::{Client, Hub, JoinRequest, Refusal, Room, Seat, server_line};
use chatd_text::sanitize;
use session::Session;
use wire::Wire;

mod command;
mod flood;
mod grid_read;
pub mod handoff;
mod read;
mod session;
mod wire;
mod write;

pub use wire::Socket;

/// Turns per poll of a connection whose reads empty its socket: the turn
/// that read, and one to write its replies and wait for the next read.
const TURNS_PER_POLL: usize = 2;
/// How long a closing connection may take to flush its last lines when the
/// client is slow to read them.
const CLOSE_FLUSH: Duration = Duration::from_secs(5);
/// How long to wait for the client's EOF after ours, so that unread input
/// does not turn our close into a reset that destroys the last lines.
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// The longest a new client waits for the default room's cluster-wide
/// history before joining with this node's.
const WELCOME_WAIT: Duration = Duration::from_secs(5);

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
    chat: Chat,
    mut arrival: crate::handoff::Arrival,
    mut seat: Seat,
) {
    let Chat { hub, gate } = chat;
    let client = loop {
        match hub.register(&mut seat, peer, tls) {
            Ok(client) => break client,
            Err(Refusal::Upgrading) => {
                let counted = arrival.counted();
                match Box::pin(wait_out_upgrade(&stream, peer, tls, counted, &gate)).await {
                    Waited::Resumed => {}
                    Waited::HandedOver => return,
                    Waited::Reconnect => {
                        return Box::pin(tell_to_reconnect(stream, tls)).await;
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
        Connection::new(stream, Chat { hub, gate }, client, room, nick)
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

/// What this port says to a client speaking another protocol.
pub(super) const WRONG_PROTOCOL: &str = "This is a chatd chat port: plain text lines for nc or telnet, \
     not HTTP, gRPC or TLS. The admin API (chatctl) listens on its own port.";

/// What a read left to do.
pub(super) enum AfterRead {
    /// The socket is empty (its readiness cleared): the connection can go
    /// round once more, writing any replies, without waking itself.
    Drained,
    /// More may be waiting, or a command waits for the cluster: come back
    /// after other clients had their turn.
    More,
    Close(Disconnect),
}

/// What a TLS client reads when the process serving it hands over to a new
/// one: its session cannot follow (the keys live in this process's rustls
/// state), so it must reconnect.
pub(super) const TLS_NOT_HANDED: &str =
    "Server upgrade: TLS sessions cannot be carried over. Please reconnect.";

/// How a connection that met a freeze in the front door came out of it.
enum Waited {
    /// The upgrade was abandoned: register now, as if nothing happened.
    Resumed,
    /// The new process serves the socket: drop it, closing nothing.
    HandedOver,
    /// A TLS client (whose handshake began here) or one the freeze did not
    /// count: it cannot follow, so it is told to reconnect.
    Reconnect,
}

/// A connection not yet registered when an upgrade froze this process
/// (registration is refused from the freeze on). A plain one counted as an
/// arrival parks like a client and, if the upgrade goes ahead, its bare
/// socket is handed over (it has read nothing yet but its PROXY header, if
/// any, which `peer` already reflects): the new process serves it from the
/// front door. A TLS one only waits for the outcome.
async fn wait_out_upgrade<S: Socket>(
    stream: &S,
    peer: SocketAddr,
    tls: bool,
    counted: bool,
    gate: &Gate,
) -> Waited {
    if tls || !counted {
        return match gate.settled().await {
            crate::handoff::Outcome::Resumed => Waited::Resumed,
            crate::handoff::Outcome::Committed => Waited::Reconnect,
        };
    }
    let export = || crate::handoff::Export::Waiting {
        state: crate::handoff::WaitingState {
            peer,
            proxy_header: None,
            tls: false,
            age_ms: 0,
        },
        fd: stream
            .handoff_fd()
            .and_then(|fd| fd.ok_or_else(|| io::Error::other("the socket cannot be handed over"))),
    };
    match gate.park(export).await {
        crate::handoff::Outcome::Resumed => Waited::Resumed,
        crate::handoff::Outcome::Committed => {
            debug!(%peer, "handed over before it registered");
            Waited::HandedOver
        }
    }
}

/// Tells a client that could not be handed over to reconnect, and closes.
async fn tell_to_reconnect<S: Socket>(mut stream: S, tls: bool) {
    info!("connection not handed over: asked to reconnect");
    let line = server_line(if tls {
        TLS_NOT_HANDED
    } else {
        "Server upgrade: this connection cannot be carried over. Please reconnect."
    });
    let _ = tokio::time::timeout(CLOSE_FLUSH, stream.write_all(&line)).await;
    linger(stream).await;
}

/// One client's task state: its wire and its session. The poll loop below
/// is what joins them: it takes the outbox onto the wire, writes, lets the
/// session's pause and waiting command hold reads back, and reads.
struct Connection<S> {
    wire: Wire<S>,
    session: Session,
    /// The upgrade's freeze, looked at before every read.
    gate: Arc<Gate>,
}

/// What a connection is served with: the hub it chats in, and the
/// upgrade's gate it stops at (see `crate::handoff::gate`).
#[derive(Debug, Clone)]
pub struct Chat {
    pub hub: Hub,
    pub gate: Arc<Gate>,
}

impl<S: Socket> Connection<S> {
    /// A connection that starts afresh: no line read, a full flood bucket,
    /// nothing owed. Must run inside its `conn` span, which it keeps.
    fn new(stream: S, chat: Chat, client: Arc<Client>, room: Arc<Room>, nick: Arc<str>) -> Self {
        Connection {
            wire: Wire::new(stream),
            session: Session::new(client, chat.hub, room, nick),
            gate: chat.gate,
        }
    }

    /// Serves until the client goes, or until a seamless upgrade hands it
    /// to a new process.
    async fn serve(mut self) {
        loop {
            let reason = self.run().await;
            if reason != Disconnect::Handoff {
                return Box::pin(self.finish(reason)).await;
            }
            let gate = self.gate.clone();
            let outcome = Box::pin(gate.park(|| self.export())).await;
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
        self.wire.begin_grid_read(cx, &self.session.room.grid);
        let poll = self.poll_turns(cx);
        self.wire.grid_read.phase = false;
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
        if self.gate.is_frozen() && self.session.waiting.is_none() {
            return ControlFlow::Break(Poll::Ready(Disconnect::Handoff));
        }
        let Session {
            client, hub, room, ..
        } = &self.session;
        if let Some(reason) = client
            .outbox
            .take_or_wait(&mut self.wire.pending, cx.waker())
        {
            return ControlFlow::Break(Poll::Ready(reason));
        }
        if self.wire.write_queued(cx, client, hub, &room.grid).is_err() {
            return ControlFlow::Break(Poll::Ready(Disconnect::Error));
        }
        // Flow control: before reading, wait for any member of the room
        // that is behind but reading.
        if self.session.poll_pause(cx).is_pending() {
            return ControlFlow::Break(Poll::Pending);
        }
        if self.session.waiting.is_some() {
            return ControlFlow::Break(self.poll_answer(cx));
        }
        self.read_turn(cx)
    }

    /// While a command waits for the cluster: its answer, and the lines
    /// held behind it handled.
    fn poll_answer(&mut self, cx: &mut Context<'_>) -> Poll<Disconnect> {
        match self.session.poll_waiting(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(reason)) => Poll::Ready(reason),
            // Answered: what it queued for us is written on the next
            // turn, before anything more is read.
            Poll::Ready(None) => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
    }

    /// The reading part of a turn: readable as the socket says, or,
    /// reading on the grid, because the read phase came.
    fn read_turn(&mut self, cx: &mut Context<'_>) -> ControlFlow<Poll<Disconnect>> {
        match self.wire.poll_readable(cx) {
            Poll::Ready(Ok(raw)) => match self.on_readable(raw) {
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

    /// Leaves the hub, then tells the client why it is being closed (after
    /// what it is still owed) and closes gracefully.
    async fn finish(mut self, reason: Disconnect) {
        self.session.abandon_waiting();
        self.session.hub.leave(&self.session.client, &reason);
        // A freeze waiting for every client to park counts again.
        self.gate.client_left();
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
    async fn close_with(self, last: &str) {
        let Connection {
            mut wire, session, ..
        } = self;
        session.client.outbox.take(&mut wire.pending);
        wire.pending.push_back(server_line(last));
        let flushed =
            tokio::time::timeout(CLOSE_FLUSH, wire.flush_all(&session.client, &session.hub)).await;
        if matches!(flushed, Ok(Ok(()))) {
            linger(wire.stream).await;
        }
    }
}
