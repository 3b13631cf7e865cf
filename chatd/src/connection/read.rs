//! Reading: framing, flood control, chat lines into batches, commands.

use super::*;

/// What this port says to a client speaking another protocol.
pub(super) const WRONG_PROTOCOL: &str = "This is a chatd chat port: plain text lines for nc or telnet, \
     not HTTP, gRPC or TLS. The admin API (chatctl) listens on its own port.";

pub(super) const HELP: &[&str] = &[
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

/// A formatted chat line back to its text: `<nick> text` or, for an
/// action, `* nick text`.
pub(super) fn unformat<'a>(line: &'a [u8], nick: &str) -> (&'a [u8], bool) {
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

impl<S: Socket> Connection<S> {
    /// Reads what is available and handles every complete line; `raw`:
    /// whatever the reactor says of the socket's readiness (the grid's read
    /// phase).
    pub(super) fn on_readable(&mut self, raw: bool) -> io::Result<AfterRead> {
        self.follow_nick();
        let config = self.hub.config();
        let max_line = config.limits.max_line_bytes;
        let mut buf = [0u8; READ_CHUNK];
        let mut batch = Batch {
            buf: BytesMut::new(),
            lines: 0,
        };
        let mut outcome = None;
        // Whether the socket was emptied (a short read, or `WouldBlock`):
        // its readiness is then cleared, and nothing is left to come back
        // for.
        let mut drained = false;
        let mut telnet_replies = BytesMut::new();
        let (mut lines, mut bytes) = (0u64, 0u64);
        let now = Instant::now();
        self.flood.before_read(config.limits.flood.as_ref(), now);
        // One wake-up's batch stays well inside the recipients' queues, or a
        // single batch could overflow a small one.
        let budget = (config.limits.outbound_queue_bytes / 8).max(1024);
        for _ in 0..READS_PER_WAKE {
            let room = budget.saturating_sub(bytes as usize).min(buf.len());
            if room == 0 {
                break;
            }
            let read = if raw {
                self.stream.read_now(&mut buf[..room])
            } else {
                self.stream.try_read_draining(&mut buf[..room])
            };
            let n = match read {
                Ok(0) => {
                    outcome = Some(Disconnect::Closed);
                    break;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    drained = true;
                    break;
                }
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
            if outcome.is_some() || self.waiting.is_some() {
                break;
            }
            if n < room {
                drained = true;
                break;
            }
        }
        self.publish(&mut batch);
        self.flood.after_read(now, drained);
        self.grid_read_done(bytes > 0, raw);
        self.client.record_input(lines, bytes);
        self.hub.stats().input(lines, bytes);
        // A read that finished lines and ends in another starts the
        // deadline afresh: a client that writes without a break, or one
        // read in chunks after a pause, is mid-line after nearly every
        // read, yet finishes lines all the time.
        let mid_line = self.framer.mid_line();
        if mid_line != self.mid_line || (mid_line && lines > 0) {
            self.mid_line = mid_line;
            self.client.set_mid_line(mid_line);
        }
        Ok(match outcome {
            Some(reason) => AfterRead::Close(reason),
            None if drained && self.waiting.is_none() => AfterRead::Drained,
            None => AfterRead::More,
        })
    }

    /// Hands the batch to the hub.
    pub(super) fn publish(&mut self, batch: &mut Batch) {
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

    pub(super) fn on_frame(
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
        if let Some(flood) = &limits.flood {
            match self.flood.check(flood, now) {
                Verdict::Pass => {}
                Verdict::Cut => return Some(Disconnect::Flood),
                Verdict::Drop { warn } => {
                    if warn {
                        self.error(
                            "flood control: you are sending too fast, lines are being dropped",
                        );
                    }
                    return None;
                }
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
    pub(super) fn say(&mut self, batch: &mut Batch, before: &[u8], after: &[u8], text: &[u8]) {
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

    pub(super) fn command(&mut self, text: &str, batch: &mut Batch) -> Option<Disconnect> {
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
                Ok(Some(congested)) => self.pause_for_private(congested),
                Ok(None) => {}
                Err(PrivateError::Busy(target)) => {
                    self.error(&format!(
                        "{} is behind on reading; message not delivered, try again in a moment",
                        target.nick()
                    ));
                    self.pause_for_private(target);
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

    pub(super) fn notice(&self, text: &str) {
        self.client
            .notice(text, self.hub.config().limits.outbound_queue_bytes);
    }

    pub(super) fn error(&self, text: &str) {
        self.notice(&format!("error: {text}"));
    }
}

/// Whether the first line is an HTTP request line (`GET / HTTP/1.1`) or
/// the HTTP/2 preface (`PRI * HTTP/2.0`, which gRPC clients such as
/// `chatctl` send): someone pointed the wrong client at this port.
pub(super) fn looks_like_http(line: &[u8]) -> bool {
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
pub(super) fn looks_like_tls(first: &[u8]) -> bool {
    matches!(first, [0x16, 0x03, 0..=4, ..])
}

/// The command word of a `/command` line, for span names: one of a fixed
/// set, so a client cannot create unbounded span names.
pub(super) fn command_name(line: &str) -> &'static str {
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
