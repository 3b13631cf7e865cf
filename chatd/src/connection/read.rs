//! Reading: a wake-up's reads, framed into lines; chat lines into one
//! batch for the room, commands to `command`.

use std::io;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use bytes::{BufMut, BytesMut};

use super::flood::Verdict;
use super::session::{Batch, Session};
use super::wire::Socket;
use super::{AfterRead, Connection};
use chatd_config::{Config, Limits};
use chatd_hub::disconnect::Disconnect;
use chatd_text::framing::Frame;
use chatd_text::sanitize;

/// Bytes read per `read` call. Lives on the worker thread's stack, not in
/// the connection.
pub(super) const READ_CHUNK: usize = 16 * 1024;
/// Reads per wake-up before yielding to other clients.
const READS_PER_WAKE: usize = 4;

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

/// One wake-up's reads: what they gathered, and what they decided.
struct Pass {
    batch: Batch,
    telnet_replies: BytesMut,
    outcome: Option<Disconnect>,
    /// Whether the socket was emptied (a short read, or `WouldBlock`):
    /// its readiness is then cleared, and nothing is left to come back
    /// for.
    drained: bool,
    lines: u64,
    bytes: u64,
}

impl<S: Socket> Connection<S> {
    /// Reads what is available and handles every complete line; `raw`:
    /// whatever the reactor says of the socket's readiness (the grid's read
    /// phase).
    pub(super) fn on_readable(&mut self, raw: bool) -> io::Result<AfterRead> {
        self.session.follow_nick();
        let config = self.session.hub.config();
        let mut pass = Pass {
            batch: Batch::new(),
            telnet_replies: BytesMut::new(),
            outcome: None,
            drained: false,
            lines: 0,
            bytes: 0,
        };
        let now = Instant::now();
        self.session
            .flood
            .before_read(config.limits.flood.as_ref(), now);
        self.read_chunks(&mut pass, raw, &config, now)?;
        let session = &mut self.session;
        session.publish(&mut pass.batch);
        session.flood.after_read(now, pass.drained);
        self.wire.grid_read_done(pass.bytes > 0, raw, &session.hub);
        session.client.record_input(pass.lines, pass.bytes);
        session.hub.stats().input(pass.lines, pass.bytes);
        session.track_mid_line(pass.lines);
        Ok(match pass.outcome {
            Some(reason) => AfterRead::Close(reason),
            None if pass.drained && session.waiting.is_none() => AfterRead::Drained,
            None => AfterRead::More,
        })
    }

    /// Reads into a buffer on the thread's stack, up to [`READS_PER_WAKE`]
    /// times, and hands each chunk to the session; stops early when the
    /// socket is emptied or closed, or the session must stop reading.
    fn read_chunks(
        &mut self,
        pass: &mut Pass,
        raw: bool,
        config: &Config,
        now: Instant,
    ) -> io::Result<()> {
        let mut buf = [0u8; READ_CHUNK];
        // One wake-up's batch stays well inside the recipients' queues, or a
        // single batch could overflow a small one.
        let budget = (config.limits.outbound_queue_bytes / 8).max(1024);
        for _ in 0..READS_PER_WAKE {
            let space = budget.saturating_sub(pass.bytes as usize).min(buf.len());
            if space == 0 {
                break;
            }
            let n = match self.wire.read(&mut buf[..space], raw) {
                Ok(0) => {
                    pass.outcome = Some(Disconnect::Closed);
                    break;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    pass.drained = true;
                    break;
                }
                Err(e) => return Err(e),
            };
            pass.bytes += n as u64;
            if self.session.on_chunk(&mut buf[..n], pass, config, now) {
                break;
            }
            if n < space {
                pass.drained = true;
                break;
            }
        }
        Ok(())
    }
}

impl Session {
    /// Handles one chunk read: telnet commands out, lines framed and each
    /// handled (or held behind a waiting command). `true` when reading
    /// must stop: the client goes, or a command waits.
    fn on_chunk(
        &mut self,
        chunk: &mut [u8],
        pass: &mut Pass,
        config: &Config,
        now: Instant,
    ) -> bool {
        let first_read =
            pass.bytes == chunk.len() as u64 && self.client.bytes_in.load(Relaxed) == 0;
        if first_read && looks_like_tls(chunk) {
            pass.outcome = Some(Disconnect::WrongProtocol);
            return true;
        }
        let kept = self.framer.strip_telnet(chunk, &mut pass.telnet_replies);
        if pass.batch.buf.capacity() == 0 {
            pass.batch.buf.reserve(kept + kept / 2 + 64);
        }
        let mut framer = std::mem::take(&mut self.framer);
        framer.feed(&chunk[..kept], config.limits.max_line_bytes, |frame| {
            if pass.outcome.is_some() {
                return;
            }
            pass.lines += u64::from(matches!(frame, Frame::Line(_)));
            match &mut self.waiting {
                Some(waiting) => waiting.hold(frame),
                None => pass.outcome = self.on_frame(frame, &mut pass.batch, config, now),
            }
        });
        self.framer = framer;
        // After the answers to this read's lines, as a timing mark
        // requires.
        if !pass.telnet_replies.is_empty() {
            let limit = config.limits.outbound_queue_bytes;
            self.client
                .outbox
                .push(pass.telnet_replies.split().freeze(), limit);
        }
        pass.outcome.is_some() || self.waiting.is_some()
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

    /// Handles one frame: an over-long line, a chat line, or a command.
    pub(super) fn on_frame(
        &mut self,
        frame: Frame<'_>,
        batch: &mut Batch,
        config: &Config,
        now: Instant,
    ) -> Option<Disconnect> {
        let limits = &config.limits;
        let line = match frame {
            Frame::TooLong => return self.too_long(limits),
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
            [b'/', ..] => self.on_command(line, batch),
            _ => {
                self.say(batch, b"<", b"> ", line);
                None
            }
        }
    }

    /// An over-long line, discarded: the client is told, and cut after
    /// `limits.max_overlong_lines` of them.
    fn too_long(&mut self, limits: &Limits) -> Option<Disconnect> {
        self.overlong += 1;
        if self.overlong >= limits.max_overlong_lines {
            return Some(Disconnect::OverlongLines);
        }
        self.error(&format!(
            "line too long (max {} bytes), discarded; {} more and you are disconnected",
            limits.max_line_bytes,
            limits.max_overlong_lines - self.overlong
        ));
        None
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
