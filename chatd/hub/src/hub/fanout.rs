//! Every delivery: room batches (local and from other nodes), private
//! messages, room notices and their budget, message events for watchers,
//! and the server lines they are made of.

use super::*;

/// Keeps message events flowing while alive.
#[derive(Debug)]
pub struct MessageWatch {
    pub(super) hub: Hub,
}

impl Drop for MessageWatch {
    fn drop(&mut self) {
        self.hub.shared.message_watchers.fetch_sub(1, Relaxed);
    }
}

/// Why a private message was not delivered.
#[derive(Debug)]
pub enum PrivateError {
    /// The recipient is behind on reading; the sender should pause until it
    /// catches up, and may try again.
    Busy(Arc<Client>),
    /// The text follows `*** error: `.
    Failed(String),
}

/// What one fan-out did.
#[derive(Debug, Default)]
pub struct Fanout {
    pub reached: usize,
    /// A recipient that is behind but still reading (the most behind one).
    pub congested: Option<Arc<Client>>,
    /// What it owed then.
    pub owed: usize,
}

/// Pushes `batch` to every member but `from`. Never blocks: a member too far
/// behind is cut (its push overflows), one that is behind but reading is
/// reported so the sender can pause.
pub(super) fn fan_out_to(
    members: &[Arc<Client>],
    from: ClientId,
    batch: &Bytes,
    lines: u64,
    limit: usize,
) -> Fanout {
    let mut fanout = Fanout::default();
    for member in members.iter().filter(|m| m.id != from) {
        match member.outbox.push_lines(batch.clone(), lines, limit) {
            Push::Queued => fanout.reached += 1,
            Push::Congested => {
                fanout.reached += 1;
                let owed = member.outbox.owed();
                if owed > fanout.owed {
                    fanout.owed = owed;
                    fanout.congested = Some(member.clone());
                }
            }
            Push::Overflow => {
                tracing::warn!(client = member.id, peer = %member.peer, "slow consumer: outgoing queue full, disconnecting");
            }
            Push::Closed => {}
        }
    }
    fanout
}

/// `text\r\n`, for a line that starts with a prefix chatd wrote.
pub(super) fn server_free_line(text: &str) -> Bytes {
    let mut b = BytesMut::with_capacity(text.len() + 2);
    b.extend_from_slice(text.as_bytes());
    b.extend_from_slice(b"\r\n");
    b.freeze()
}

/// `*** text\r\n`, the form of every server line.
pub fn server_line(text: &str) -> Bytes {
    let mut b = BytesMut::with_capacity(text.len() + 6);
    push_server_line(&mut b, text);
    b.freeze()
}

pub(super) fn push_server_line(b: &mut BytesMut, text: &str) {
    b.extend_from_slice(b"*** ");
    b.extend_from_slice(text.as_bytes());
    b.extend_from_slice(b"\r\n");
}

impl Hub {
    /// Sends a join/leave/rename notice to `room` (all but `from`) if the
    /// room's notice budget allows; otherwise counts it for the summary.
    pub(super) fn room_notice(
        &self,
        room: &Arc<Room>,
        from: ClientId,
        kind: NoticeKind,
        text: &str,
    ) {
        let per_sec = self.shared.config.load().limits.room_notices_per_sec;
        {
            let mut gate = lock(&room.notices);
            let now = Instant::now();
            if now.saturating_duration_since(gate.window) >= Duration::from_secs(1) {
                gate.window = now;
                gate.sent = 0;
            }
            if gate.sent >= per_sec {
                match kind {
                    NoticeKind::Join => gate.joined += 1,
                    NoticeKind::Leave => gate.left += 1,
                    NoticeKind::Rename => gate.renamed += 1,
                }
                if !gate.due {
                    gate.due = true;
                    lock(&self.shared.notices_due).push(room.clone());
                }
                return;
            }
            gate.sent += 1;
        }
        let line = server_line(text);
        self.fan_out(room, from, &line, self.queue_limit());
        self.cluster().offer(&room.name, &line, Kind::Notice);
    }

    /// Sends each room that held notices back one line summing them up. Run
    /// once a second by the server.
    pub fn flush_notices(&self) {
        let due = std::mem::take(&mut *lock(&self.shared.notices_due));
        let config = self.config();
        for room in due {
            let (joined, left, renamed) = {
                let mut gate = lock(&room.notices);
                gate.due = false;
                (
                    std::mem::take(&mut gate.joined),
                    std::mem::take(&mut gate.left),
                    std::mem::take(&mut gate.renamed),
                )
            };
            let members = room.len();
            if members == 0 || members > config.limits.room_notice_max {
                continue;
            }
            let mut parts = Vec::new();
            if joined > 0 {
                parts.push(format!("{joined} joined"));
            }
            if left > 0 {
                parts.push(format!("{left} left"));
            }
            if renamed > 0 {
                parts.push(format!("{renamed} changed nick"));
            }
            if parts.is_empty() {
                continue;
            }
            let text = format!(
                "{} in {} in the last second ({})",
                parts.join(", "),
                room.name,
                users(members)
            );
            let line = server_line(&text);
            self.fan_out(&room, 0, &line, config.limits.outbound_queue_bytes);
            self.cluster().offer(&room.name, &line, Kind::Notice);
        }
    }

    /// The hot path: hands one batch of whole, formatted lines from `from`
    /// to every other member of `room`. One allocation is shared by all
    /// recipients. Returns how many recipients it reached, and a recipient
    /// that is behind but still reading, if any: the sender should pause
    /// until it drains (see [`crate::outbox`]).
    pub fn publish(&self, room: &Room, from: ClientId, batch: Bytes, lines: usize) -> Fanout {
        let started = Instant::now();
        let config = self.shared.config.load();
        let members = read(&room.members);
        let fanout = fan_out_to(
            &members,
            from,
            &batch,
            lines as u64,
            config.limits.outbound_queue_bytes,
        );
        // Remembered before the member lock is released: see `join`.
        room.remember(&batch, lines, config.chat.history);
        drop(members);
        if let Some(member) = &fanout.congested {
            room.mark_congested(member, fanout.owed);
        }
        self.shared.stats.published(lines, fanout.reached);
        self.shared.stats.fan_out_latency.observe(started.elapsed());
        // Other nodes get the batch once, whatever their number of members;
        // `offer` never waits.
        self.cluster().offer(&room.name, &batch, Kind::Chat);
        fanout
    }

    /// Hands a batch from another node to this node's members of `room`,
    /// through the same non-blocking fan-out as local lines. Chat lines
    /// are remembered as history under the member lock, as in
    /// [`Hub::publish`]. Nobody pauses for a congested member: the sender is
    /// on another node; a member too far behind is cut as usual. Returns
    /// how many members it reached.
    pub fn deliver_remote(&self, room: &str, batch: Bytes, lines: usize, kind: Kind) -> usize {
        let Some(room) = self.state().rooms.get(room).cloned() else {
            return 0;
        };
        let config = self.shared.config.load();
        let members = read(&room.members);
        let fanout = fan_out_to(
            &members,
            0,
            &batch,
            lines as u64,
            config.limits.outbound_queue_bytes,
        );
        if kind == Kind::Chat {
            room.remember(&batch, lines, config.chat.history);
        }
        fanout.reached
    }

    /// The rooms with at least one member on this node: those whose lines
    /// this node must hear from the others.
    pub fn occupied_rooms(&self) -> Vec<Arc<str>> {
        let rooms: Vec<Arc<Room>> = self.state().rooms.values().cloned().collect();
        rooms
            .into_iter()
            .filter(|r| !r.is_empty() || r.waiting.load(Relaxed) > 0)
            .map(|r| r.name.clone())
            .collect()
    }

    /// Sends a server line to every member of every room on this node (the
    /// cluster's "other nodes unreachable / back" notices). Returns how
    /// many clients it reached.
    pub fn notice_rooms(&self, text: &str) -> usize {
        let line = server_line(text);
        let limit = self.queue_limit();
        let rooms: Vec<Arc<Room>> = self.state().rooms.values().cloned().collect();
        rooms
            .iter()
            .map(|room| self.fan_out(room, 0, &line, limit))
            .sum()
    }

    /// Every client of this node in a room, with the number of the last
    /// membership change they include (cluster mode; see
    /// [`ClusterState::member_set`]).
    pub fn member_snapshot(&self) -> (u64, Vec<(ClientId, String, String)>) {
        let state = self.state();
        let seq = self.cluster().member_seq();
        let set = state
            .clients
            .values()
            .filter_map(|c| {
                let names = lock(&c.names);
                let room = names.room.as_ref()?;
                Some((c.id, names.nick.to_string(), room.name.to_string()))
            })
            .collect();
        (seq, set)
    }

    /// Queues a server line for client `id` of this node, if it is still
    /// there (an error coming back from another node).
    pub fn notify_client(&self, id: ClientId, text: &str) {
        let client = self.state().clients.get(&id).cloned();
        if let Some(client) = client {
            client.notice(text, self.queue_limit());
        }
    }

    /// This node's client called `nick` (ignoring case), if any.
    fn local_client(&self, nick: &str) -> Option<Arc<Client>> {
        let state = self.state();
        state
            .nicks
            .get(&protocol::fold(nick))
            .and_then(|id| state.clients.get(id))
            .cloned()
    }

    /// Hands a private message from `from` on another node to this node's
    /// client called `to`; or says why not (sent back to the sender).
    pub fn deliver_private(&self, from: &str, to: &str, text: &str) -> Result<(), String> {
        let limit = self.queue_limit();
        let target = self.local_client(to);
        let Some(target) = target else {
            return Err(format!("no such nick \"{}\"", sanitize::clean(to)));
        };
        let mut line = BytesMut::with_capacity(from.len() + text.len() + 12);
        line.extend_from_slice(b"[pm] <");
        line.extend_from_slice(from.as_bytes());
        line.extend_from_slice(b"> ");
        sanitize::clean_into(&mut line, text.as_bytes());
        line.extend_from_slice(b"\r\n");
        match target.outbox.push(line.freeze(), limit) {
            Push::Queued | Push::Congested => {
                self.shared.stats.published(1, 1);
                Ok(())
            }
            Push::Overflow => Err(format!(
                "{} is not reading; message not delivered",
                target.nick()
            )),
            Push::Closed => Err(format!(
                "{} is leaving; message not delivered",
                target.nick()
            )),
        }
    }

    /// Whether any watcher wants message events.
    pub fn watching_messages(&self) -> bool {
        self.shared.message_watchers.load(Relaxed) > 0
    }

    /// Subscribes to events, message events included; they stop when the
    /// returned guard is dropped.
    pub fn subscribe_messages(&self) -> (broadcast::Receiver<Event>, MessageWatch) {
        self.shared.message_watchers.fetch_add(1, Relaxed);
        (self.subscribe(), MessageWatch { hub: self.clone() })
    }

    /// Reports a room message to watchers; call only while
    /// [`Hub::watching_messages`].
    pub fn message_event(
        &self,
        id: ClientId,
        room: &Room,
        nick: &Arc<str>,
        text: &str,
        action: bool,
    ) {
        self.emit(Event::Message {
            id,
            nick: nick.clone(),
            room: Some(room.name.clone()),
            to: None,
            text: text.to_string(),
            action,
        });
    }

    pub(super) fn fan_out(&self, room: &Room, from: ClientId, line: &Bytes, limit: usize) -> usize {
        fan_out_to(&read(&room.members), from, line, 1, limit).reached
    }

    /// Sends `text` privately from `from` to the client called `to`. On
    /// success, returns the recipient when it is behind but still reading,
    /// so that the sender pauses (see [`crate::outbox`]).
    pub fn private(
        &self,
        from: &Client,
        to: &str,
        text: &str,
    ) -> Result<Option<Arc<Client>>, PrivateError> {
        let limit = self.queue_limit();
        let target = self.local_client(to);
        let Some(target) = target else {
            return self.private_remote(from, to, text);
        };
        // A reader behind on its queue gets no more private lines until it
        // catches up: the sender is told and pauses, where a burst of
        // private messages from many connections would otherwise overrun a
        // reader that is reading all it can.
        if target.outbox.congested(limit) {
            return Err(PrivateError::Busy(target));
        }
        let from_nick = from.nick();
        let mut line = BytesMut::with_capacity(from_nick.len() + text.len() + 12);
        line.extend_from_slice(b"[pm] <");
        line.extend_from_slice(from_nick.as_bytes());
        line.extend_from_slice(b"> ");
        sanitize::clean_into(&mut line, text.as_bytes());
        line.extend_from_slice(b"\r\n");
        let congested = match target.outbox.push(line.freeze(), limit) {
            Push::Queued => None,
            Push::Congested => Some(target.clone()),
            Push::Overflow => {
                tracing::warn!(client = target.id, peer = %target.peer, "slow consumer: outgoing queue full, disconnecting");
                return Err(PrivateError::Failed(format!(
                    "{} is not reading; message not delivered",
                    target.nick()
                )));
            }
            Push::Closed => {
                return Err(PrivateError::Failed(format!(
                    "{} is leaving; message not delivered",
                    target.nick()
                )));
            }
        };
        let mut echo = BytesMut::new();
        echo.extend_from_slice(b"[pm -> ");
        echo.extend_from_slice(target.nick().as_bytes());
        echo.extend_from_slice(b"] ");
        sanitize::clean_into(&mut echo, text.as_bytes());
        echo.extend_from_slice(b"\r\n");
        from.outbox.push(echo.freeze(), limit);
        self.shared.stats.published(1, 1);
        if self.watching_messages() {
            self.emit(Event::Message {
                id: from.id,
                nick: from_nick,
                room: None,
                to: Some(target.nick()),
                text: sanitize::clean(text),
                action: false,
            });
        }
        Ok(congested)
    }

    /// `/msg` to a nick not on this node: in cluster mode, to its node (one
    /// NATS message); the sender's echo is queued at once, and an error
    /// comes back only if it cannot be delivered there.
    pub(super) fn private_remote(
        &self,
        from: &Client,
        to: &str,
        text: &str,
    ) -> Result<Option<Arc<Client>>, PrivateError> {
        let from_nick = from.nick();
        let text = sanitize::clean(text);
        let Some(nick) = self.cluster().send_private(from.id, &from_nick, to, &text) else {
            return Err(PrivateError::Failed(format!(
                "no such nick \"{}\"",
                sanitize::clean(to)
            )));
        };
        from.outbox.push(
            server_free_line(&format!("[pm -> {nick}] {text}")),
            self.queue_limit(),
        );
        if self.watching_messages() {
            self.emit(Event::Message {
                id: from.id,
                nick: from_nick,
                room: None,
                to: Some(nick),
                text,
                action: false,
            });
        }
        Ok(None)
    }
}
