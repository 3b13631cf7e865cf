//! A room: its members, the member it is congested on, its held-back
//! notices and its history; joining and parting.

use super::*;

/// A snapshot of one room, for the admin API and `/rooms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomInfo {
    pub name: String,
    pub members: usize,
    pub messages: u64,
}

#[derive(Debug)]
pub struct Room {
    pub name: Arc<str>,
    pub(super) members: RwLock<Vec<Arc<Client>>>,
    pub(super) history: Mutex<VecDeque<Bytes>>,
    pub(super) messages: AtomicU64,
    pub(super) notices: Mutex<NoticeGate>,
    /// The member most behind among those behind but still reading, if
    /// any: every sender of the room pauses before its next read until it
    /// drains (flow control, see [`crate::outbox`]). Checking before
    /// reading, not only after publishing, is what keeps many senders from
    /// overrunning a reader with one batch each; waiting for the one most
    /// behind, not the first found, keeps a member whose connection waits
    /// long for a worker from getting a batch each time another drains.
    /// `has_congested` is the hot path's cheap look.
    pub(super) congested: Mutex<Option<Arc<Client>>>,
    pub(super) has_congested: AtomicBool,
    /// Cluster mode: whether the room's cluster-wide history has been
    /// loaded since the room last had no member here.
    pub(super) loaded: AtomicBool,
    /// Cluster mode: clients waiting for that load to join the room; while
    /// there are some, the room is kept and subscribed.
    pub(super) waiting: AtomicUsize,
    /// When the room's busy members are written to (see [`crate::grid`]).
    pub grid: Arc<Grid>,
}

/// A room's budget of join/leave/rename notices: at most
/// `limits.room_notices_per_sec` go out as they happen; the rest are counted
/// and summed up in one line a second later ([`Hub::flush_notices`]). So
/// churn, whatever its rate or its number of addresses, costs each member at
/// most that many lines a second.
#[derive(Debug)]
pub(super) struct NoticeGate {
    pub(super) window: Instant,
    pub(super) sent: u32,
    pub(super) joined: u32,
    pub(super) left: u32,
    pub(super) renamed: u32,
    /// Whether this room is in the hub's list of rooms with a summary due.
    pub(super) due: bool,
}

/// Which kind of room notice, for the summary of those held back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum NoticeKind {
    Join,
    Leave,
    Rename,
}

impl Room {
    pub(super) fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            members: RwLock::new(Vec::new()),
            history: Mutex::new(VecDeque::new()),
            messages: AtomicU64::new(0),
            congested: Mutex::new(None),
            has_congested: AtomicBool::new(false),
            loaded: AtomicBool::new(false),
            waiting: AtomicUsize::new(0),
            grid: Arc::new(Grid::new()),
            notices: Mutex::new(NoticeGate {
                window: Instant::now(),
                sent: 0,
                joined: 0,
                left: 0,
                renamed: 0,
                due: false,
            }),
        }
    }

    pub fn len(&self) -> usize {
        read(&self.members).len()
    }

    /// The member every sender should wait for before reading, if any.
    pub fn congested_member(&self) -> Option<Arc<Client>> {
        if !self.has_congested.load(Relaxed) {
            return None;
        }
        lock(&self.congested).clone()
    }

    /// Makes `member`, which owes `owed` bytes, the one senders wait for,
    /// unless the one they wait for owes more.
    pub(super) fn mark_congested(&self, member: &Arc<Client>, owed: usize) {
        let mut congested = lock(&self.congested);
        if congested
            .as_ref()
            .is_none_or(|c| c.id != member.id && c.outbox.owed() < owed)
        {
            *congested = Some(member.clone());
            self.has_congested.store(true, Relaxed);
        }
    }

    /// Forgets `member`, which drained or stopped reading, as the member
    /// senders wait for, and puts in its place the one most behind among
    /// the others still behind and reading, if any. Several members can be
    /// behind at once (in a burst, their connections wait for a worker in
    /// turn): releasing the senders when the first of them drains would
    /// hand each of the others one more batch per sender. One scan of the
    /// members per drained member: whoever is released first does it.
    pub fn pass_congested(&self, member: &Client, limit: usize) {
        if self.congested_member().is_none_or(|c| c.id != member.id) {
            return;
        }
        let next = {
            let members = read(&self.members);
            let mut worst: Option<(&Arc<Client>, usize)> = None;
            for m in members.iter().filter(|m| m.id != member.id) {
                if let Some(owed) = m.outbox.congested_owed(limit)
                    && worst.is_none_or(|(_, w)| owed > w)
                {
                    worst = Some((m, owed));
                }
            }
            worst.map(|(m, _)| Arc::clone(m))
        };
        let mut congested = lock(&self.congested);
        if congested.as_ref().is_some_and(|c| c.id == member.id) {
            self.has_congested.store(next.is_some(), Relaxed);
            *congested = next;
        }
    }

    /// Forgets `member` as the room's congested member (it left).
    pub fn clear_congested(&self, member: &Client) {
        let mut congested = lock(&self.congested);
        if congested.as_ref().is_some_and(|c| c.id == member.id) {
            *congested = None;
            self.has_congested.store(false, Relaxed);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(super) fn info(&self) -> RoomInfo {
        RoomInfo {
            name: self.name.to_string(),
            members: self.len(),
            messages: self.messages.load(Relaxed),
        }
    }

    /// Keeps the last `keep` lines of `batch` (whole `\r\n`-ended lines).
    /// They are copied, in one allocation, so that history never pins a
    /// large batch in memory.
    pub(super) fn remember(&self, batch: &Bytes, lines: usize, keep: usize) {
        self.messages.fetch_add(lines as u64, Relaxed);
        self.keep(batch, lines, keep);
    }

    /// Keeps the last `keep` lines of `batch` as history, as `remember`
    /// does, without counting them as messages.
    pub(super) fn keep(&self, batch: &Bytes, lines: usize, keep: usize) {
        if keep == 0 {
            return;
        }
        let take = lines.min(keep);
        let mut ends = Vec::with_capacity(take + 1);
        let mut end = batch.len();
        ends.push(end);
        while ends.len() <= take && end > 0 {
            // Each line ends in "\r\n": find the end of the line before it.
            end = memchr::memrchr(b'\n', &batch[..end - 1]).map_or(0, |p| p + 1);
            ends.push(end);
        }
        let start = end;
        let tail = Bytes::copy_from_slice(&batch[start..]);
        let mut history = lock(&self.history);
        for pair in ends.windows(2).rev() {
            if history.len() == keep {
                history.pop_front();
            }
            history.push_back(tail.slice(pair[1] - start..pair[0] - start));
        }
    }
}

/// How a join goes on: done, or waiting for the room's history.
#[derive(Debug)]
pub enum JoinRequest {
    Done(Arc<Room>),
    /// Call [`Hub::finish_join`] once `done` resolves (or fails).
    Wait {
        room: Arc<Room>,
        done: tokio::sync::oneshot::Receiver<()>,
    },
}

/// The history replayed to a client joining `room`: the newest lines that
/// fit in a quarter of the client's queue (`limit`), so that a long history
/// or a small queue can never cut a newcomer before it has read a line.
pub(super) fn history_block(history: &VecDeque<Bytes>, room: &str, limit: usize) -> Option<Bytes> {
    let budget = limit / 4;
    let mut size = 0;
    let kept = history
        .iter()
        .rev()
        .take_while(|line| {
            size += line.len();
            size <= budget
        })
        .count();
    if kept == 0 {
        return None;
    }
    let mut block = BytesMut::with_capacity(size + 64);
    push_server_line(
        &mut block,
        &format!(
            "Last {} in {room}:",
            protocol::count(kept as u64, "message", "messages")
        ),
    );
    for line in history.iter().skip(history.len() - kept) {
        block.extend_from_slice(line);
    }
    push_server_line(&mut block, "End of history.");
    Some(block.freeze())
}

impl Hub {
    /// Moves `client` into `room` (leaving its current one), tells both
    /// rooms, and sends the client its room line and the room's history.
    ///
    /// Order, for the joining client: every line of the old room published
    /// before it left, then the room line, then the history, then live lines
    /// of the new room — each line exactly once. The room line and history
    /// are queued under the new room's member lock, which
    /// [`Hub::publish`] holds (shared) across both delivery and
    /// remembering: a line is either remembered before the snapshot or
    /// delivered live after it, never both, never neither.
    pub fn join(&self, client: &Arc<Client>, room: &str) -> Arc<Room> {
        let config = self.config();
        let limit = config.limits.outbound_queue_bytes;
        // Members on other nodes (cluster mode), counted in the notices.
        let remote = self.cluster().remote_count(room);
        let mut state = self.state();
        let old = lock(&client.names).room.clone();
        let mut parted = None;
        if let Some(old) = &old {
            if *old.name == *room {
                drop(state);
                client.notice(&format!("You are already in {room}."), limit);
                return old.clone();
            }
            parted = self.part_locked(&mut state, client, old, None);
        }
        let target = state
            .rooms
            .entry(room.into())
            .or_insert_with(|| Arc::new(Room::new(room)))
            .clone();
        let nick = {
            let mut names = lock(&client.names);
            names.room = Some(target.clone());
            names.nick.clone()
        };
        let count = {
            let mut members = write(&target.members);
            let count = members.len() + 1 + remote;
            client.notice(&format!("You are now in {room} ({}).", users(count)), limit);
            if let Some(block) = history_block(&lock(&target.history), room, limit) {
                client.outbox.push(block, limit);
            }
            members.push(client.clone());
            count
        };
        if target.len() == 1 {
            self.cluster().interest_changed();
        }
        self.cluster().member_set(client.id, &nick, room);
        drop(state);
        if let Some((old, text)) = parted {
            self.room_notice(&old, client.id, NoticeKind::Leave, &text);
        }
        if count <= config.limits.room_notice_max {
            let text = format!("{nick} joined {room} ({})", users(count));
            self.room_notice(&target, client.id, NoticeKind::Join, &text);
        }
        self.emit(Event::Join {
            id: client.id,
            nick,
            room: target.name.clone(),
        });
        target
    }

    /// Starts moving `client` into `room`: at once (as [`Hub::join`]) when
    /// the room's history is here already, and on one node, whose history
    /// is always here; in cluster mode, when the room has no member on this
    /// node yet, once its cluster-wide history is loaded: the caller waits
    /// for `done`, then calls [`Hub::finish_join`] (or [`Hub::cancel_join`]
    /// if it goes away).
    pub fn request_join(&self, client: &Arc<Client>, room: &str) -> JoinRequest {
        let waiting = {
            let mut state = self.state();
            let here = lock(&client.names)
                .room
                .as_ref()
                .is_some_and(|r| *r.name == *room);
            let target = state
                .rooms
                .entry(room.into())
                .or_insert_with(|| Arc::new(Room::new(room)))
                .clone();
            if here || target.loaded.load(Relaxed) {
                None
            } else {
                target.waiting.fetch_add(1, Relaxed);
                Some(target)
            }
        };
        let Some(target) = waiting else {
            return JoinRequest::Done(self.join(client, room));
        };
        match self.cluster().load_history(room) {
            Reply::Later(done) => JoinRequest::Wait { room: target, done },
            Reply::Now(()) => JoinRequest::Done(self.finish_join(client, &target)),
        }
    }

    /// Joins the room [`Hub::request_join`] waited for.
    pub fn finish_join(&self, client: &Arc<Client>, room: &Arc<Room>) -> Arc<Room> {
        let joined = self.join(client, &room.name);
        room.waiting.fetch_sub(1, Relaxed);
        joined
    }

    /// A client waiting to join `room` went away.
    pub fn cancel_join(&self, room: &Arc<Room>) {
        let mut state = self.state();
        if room.waiting.fetch_sub(1, Relaxed) == 1
            && room.is_empty()
            && *room.name != *self.config().chat.default_room
            && state
                .rooms
                .get(&room.name)
                .is_some_and(|r| Arc::ptr_eq(r, room))
        {
            state.rooms.remove(&room.name);
            drop(state);
            self.cluster().interest_changed();
        }
    }

    /// Cluster mode: `batches` (whole lines, checked by the caller, with
    /// their number of lines; oldest first) are `room`'s cluster-wide
    /// history; they replace what this node kept. Under the room's member
    /// lock, as a join's snapshot: a joiner sees either the old history or
    /// this one.
    pub fn replace_history(&self, room: &str, batches: &[(Bytes, usize)]) {
        let Some(room) = self.state().rooms.get(room).cloned() else {
            return;
        };
        let keep = self.config().chat.history;
        let _members = write(&room.members);
        lock(&room.history).clear();
        for (batch, lines) in batches {
            room.keep(batch, *lines, keep);
        }
        room.loaded.store(true, Relaxed);
    }

    /// Tells `room` that `nick`, a client of the previous process that could
    /// not be handed over (a TLS client at an upgrade), left: it was never
    /// registered here, so no one else would.
    pub fn announce_left(&self, nick: &str, room: &str, reason: &str) {
        let Some(room) = self.state().rooms.get(room).cloned() else {
            return;
        };
        let total = read(&room.members).len() + self.cluster().remote_count(&room.name);
        let Some(text) = self.leave_notice(nick, &room, total, Some(&reason)) else {
            return;
        };
        // From no client of this node: every member hears it.
        self.room_notice(&room, 0, NoticeKind::Leave, &text);
    }

    /// `*** nick left ROOM (N users): reason`, unless the room is empty now
    /// or too big for notices (`limits.room_notice_max`).
    fn leave_notice(
        &self,
        nick: &str,
        room: &Room,
        total: usize,
        reason: Option<&dyn std::fmt::Display>,
    ) -> Option<String> {
        if total == 0 || total >= self.config().limits.room_notice_max {
            return None;
        }
        Some(match reason {
            Some(r) => format!("{nick} left {} ({}): {r}", room.name, users(total)),
            None => format!("{nick} left {} ({})", room.name, users(total)),
        })
    }

    /// Removes `client` from `room` under the state lock, and drops the room
    /// when it empties (except the default room). Returns the leave notice
    /// to send once the lock is released, if one is due.
    pub(super) fn part_locked(
        &self,
        state: &mut State,
        client: &Arc<Client>,
        room: &Arc<Room>,
        reason: Option<&Disconnect>,
    ) -> Option<(Arc<Room>, String)> {
        let remaining = {
            let mut members = write(&room.members);
            if let Some(pos) = members.iter().position(|m| m.id == client.id) {
                members.swap_remove(pos);
            }
            members.len()
        };
        if remaining == 0 {
            // Unsubscribed from now on (cluster mode): its history goes
            // stale, and is loaded again for the next member.
            room.loaded.store(false, Relaxed);
        }
        if remaining == 0 {
            self.cluster().interest_changed();
        }
        room.clear_congested(client);
        let nick = client.nick();
        let config = self.config();
        let total = remaining + self.cluster().remote_count(&room.name);
        if remaining == 0
            && room.waiting.load(Relaxed) == 0
            && *room.name != *config.chat.default_room
        {
            state.rooms.remove(&room.name);
        }
        self.emit(Event::Part {
            id: client.id,
            nick: nick.clone(),
            room: room.name.clone(),
        });
        // At shutdown everyone leaves at once: notices would be O(n²) noise.
        // With members left on other nodes only, the notice is for them.
        if reason == Some(&Disconnect::Shutdown) {
            return None;
        }
        let reason = reason.map(|r| r as &dyn std::fmt::Display);
        let text = self.leave_notice(&nick, room, total, reason)?;
        Some((room.clone(), text))
    }
}
