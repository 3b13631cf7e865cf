//! The session: what the chat knows of one client between its lines.
//!
//! Its nick and room, the framer holding a line not yet finished, flood
//! control, and the two states that stop it reading: a pause for a
//! recipient that is behind (flow control, see [`chatd_hub::outbox`]) and a
//! command waiting for the cluster's answer. The bytes themselves, and the
//! socket, are the [`Wire`](super::wire::Wire)'s. Beside it: `read` (lines
//! into batches) and `command` (one function per chat command).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tracing::info;

use super::flood::Flood;
use chatd_hub::cluster_state::Claim;
use chatd_hub::disconnect::Disconnect;
use chatd_hub::hub::{Client, Hub, Room};
use chatd_text::framing::{Frame, LineFramer};
use chatd_text::rate::TokenBucket;

/// How often a paused sender checks that the recipient it waits for is
/// still reading (a drain wakes it at once; this is for one that stops).
const RECHECK: Duration = chatd_hub::outbox::PROGRESS_WINDOW;
/// The longest a sender pauses for the target of its private message. Its
/// other senders do not pause with it (unlike a room's, which all wait for
/// the member behind) and may keep the target's queue above the mark where
/// it counts as drained for as long as they send: without a bound, a flood
/// of private messages to one reader would silence everyone else who
/// wrote to him, in every room. Past it, the sender's next message to a
/// target still behind is refused with a line, and it pauses again.
const PRIVATE_PAUSE: Duration = Duration::from_secs(1);

/// One client's chat state.
pub(super) struct Session {
    pub(super) client: Arc<Client>,
    pub(super) hub: Hub,
    /// The room this client is in; cached so the hot path needs no lookup.
    pub(super) room: Arc<Room>,
    pub(super) nick: Arc<str>,
    pub(super) framer: LineFramer,
    pub(super) flood: Flood,
    pub(super) overlong: u32,
    /// Whether the client is in the middle of a line (mirrored in the hub
    /// for the partial-line deadline, on change only).
    pub(super) mid_line: bool,
    /// Whether the first line has been read: it is checked for another
    /// protocol (HTTP, gRPC) before anything else.
    pub(super) greeted: bool,
    /// While set, this client does not read: a recipient of its lines is
    /// behind (flow control).
    pub(super) pause: Option<Box<Pause>>,
    /// While set, a command waits for the cluster's answer (cluster mode):
    /// this client's later lines wait too, unread or held, so that they are
    /// handled after it, in order; writes go on.
    pub(super) waiting: Option<Box<Waiting>>,
    /// The `conn` span, whose `nick` follows the client's.
    pub(super) span: tracing::Span,
}

/// A sender's pause: until `on` drains or stops reading; `until` is when
/// to check the latter next.
pub(super) struct Pause {
    on: Arc<Client>,
    until: Pin<Box<tokio::time::Sleep>>,
    /// For the target of a private message, when the pause ends anyway
    /// (see [`PRIVATE_PAUSE`]).
    ends: Option<tokio::time::Instant>,
}

/// A command waiting for the cluster, and the lines read after it.
pub(super) struct Waiting {
    command: Pending,
    /// Lines read after the command, in order, handled once it is answered.
    held: VecDeque<Held>,
}

/// The commands that may wait for the cluster.
pub(super) enum Pending {
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

impl Waiting {
    /// Keeps a frame read while the command waits, to be handled after it.
    pub(super) fn hold(&mut self, frame: Frame<'_>) {
        self.held.push_back(match frame {
            Frame::Line(line) => Held::Line(Bytes::copy_from_slice(line)),
            Frame::TooLong => Held::TooLong,
        });
    }
}

impl Session {
    /// A session that starts afresh: no line read, a full flood bucket.
    /// Must be made inside its `conn` span, which it keeps.
    pub(super) fn new(client: Arc<Client>, hub: Hub, room: Arc<Room>, nick: Arc<str>) -> Self {
        Session {
            client,
            hub,
            room,
            nick,
            framer: LineFramer::default(),
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
            span: tracing::Span::current(),
        }
    }

    pub(super) fn notice(&self, text: &str) {
        self.client
            .notice(text, self.hub.config().limits.outbound_queue_bytes);
    }

    pub(super) fn error(&self, text: &str) {
        self.notice(&format!("error: {text}"));
    }

    /// Takes the new nick the hub granted, and tells the client.
    pub(super) fn renamed(&mut self, new: Arc<str>) {
        self.span.record("nick", tracing::field::display(&new));
        info!(old = %self.nick, new = %new, "nick changed");
        self.nick = new;
        self.notice(&format!("You are now known as {}.", self.nick));
    }

    /// Re-reads the nick when the hub changed it (cluster mode: another
    /// node holds it).
    pub(super) fn follow_nick(&mut self) {
        if self.client.take_renamed() {
            let new = self.client.nick();
            self.span.record("nick", tracing::field::display(&new));
            info!(old = %self.nick, new = %new, "nick changed by the cluster");
            self.nick = new;
        }
    }

    /// Mirrors in the hub whether the client is in the middle of a line,
    /// after a read that finished `lines`. A read that finished lines and
    /// ends in another starts the deadline afresh: a client that writes
    /// without a break, or one read in chunks after a pause, is mid-line
    /// after nearly every read, yet finishes lines all the time.
    pub(super) fn track_mid_line(&mut self, lines: u64) {
        let mid_line = self.framer.mid_line();
        if mid_line != self.mid_line || (mid_line && lines > 0) {
            self.mid_line = mid_line;
            self.client.set_mid_line(mid_line);
        }
    }
}

/// Flow control: the pause of a sender whose recipient is behind.
impl Session {
    /// Stops reading until `recipient`, which is behind but reading, has
    /// drained or stopped reading: the sender's next lines wait in its own
    /// socket buffer instead of piling up in the recipient's queue.
    pub(super) fn pause_for(&mut self, recipient: Arc<Client>) {
        self.pause_until(recipient, None);
    }

    /// Like [`Session::pause_for`], for the target of a private message:
    /// for [`PRIVATE_PAUSE`] at most.
    pub(super) fn pause_for_private(&mut self, target: Arc<Client>) {
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

    /// Before reading, waits for any member of the room that is behind but
    /// reading: `Pending` while this client must not read. Checked again
    /// after each pause, so senders released together do not all publish
    /// at once into a queue that is filling up again.
    pub(super) fn poll_pause(&mut self, cx: &mut Context<'_>) -> Poll<()> {
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
                return Poll::Ready(());
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
            return Poll::Pending;
        }
    }
}

/// Commands that wait for the cluster, and the lines held behind them.
impl Session {
    /// Holds this client's later lines behind `command` until the cluster
    /// answers it.
    pub(super) fn wait_for(&mut self, command: Pending) {
        self.waiting = Some(Box::new(Waiting {
            command,
            held: VecDeque::new(),
        }));
    }

    /// Waits for the cluster's answer to the waiting command, then handles
    /// the lines held behind it (which may start another wait). `None` once
    /// nothing waits any more.
    pub(super) fn poll_waiting(&mut self, cx: &mut Context<'_>) -> Poll<Option<Disconnect>> {
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
        let mut batch = Batch::new();
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

    /// The cluster answered a `/nick`; `None`: it never will (shutdown).
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

    /// Gives up a command still waiting when the client leaves: a nick
    /// claimed meanwhile is freed, a join's room no longer waited for.
    pub(super) fn abandon_waiting(&mut self) {
        if let Some(waiting) = self.waiting.take() {
            match &waiting.command {
                // Queued after the claim: frees the nick if it was granted.
                Pending::Nick { nick, .. } => self.hub.release_nick(&self.client, nick),
                Pending::Join { room, .. } => self.hub.cancel_join(room),
            }
        }
    }
}

/// Chat lines read in one wake-up, formatted for the room, waiting to be
/// handed to the hub as one batch.
pub(super) struct Batch {
    pub(super) buf: BytesMut,
    pub(super) lines: usize,
}

impl Batch {
    /// An empty batch, which allocates nothing until a line comes.
    pub(super) fn new() -> Self {
        Batch {
            buf: BytesMut::new(),
            lines: 0,
        }
    }
}
