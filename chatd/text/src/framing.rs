//! Bytes from the socket → lines.
//!
//! [`LineFramer`] turns whatever TCP hands us — half a line, ten lines, a
//! line split across a dozen segments — into whole lines, enforcing the
//! maximum line length *while* reading, so a peer that never sends a newline
//! costs at most `max_line_bytes` of memory. It is pure: no sockets, no async.
//!
//! Before framing, [`LineFramer::strip_telnet`] removes telnet commands and
//! writes the answers telnet expects (see `docs/PROTOCOL.md`, "Telnet"):
//! chatd refuses every option request, except that it confirms a timing
//! mark (`DO TIMING-MARK` → `WILL TIMING-MARK`), which telnet sends after
//! Ctrl-C and then waits for, discarding all output until it arrives, and
//! agrees to binary input (`WILL BINARY` → `DO BINARY`), which is what it
//! reads anyway.
//!
//! Interrupt and break discard the line being typed, like Ctrl-C in a
//! terminal; but telnet, outside binary mode, also sends them for bytes
//! 0x80–0x9F of UTF-8 text (it compares each typed byte's low 7 bits with
//! its control characters), so a command that arrives inside an incomplete
//! UTF-8 character is taken back to the byte it stands for ([`typed_byte`]).
//! Two such bytes telnet never sends at all (0x85, its echo toggle, and
//! 0x9D, its escape), so the first time a command is taken back chatd asks
//! the client, now known to be such a telnet, to send binary (`DO
//! BINARY`): from then on it sends every byte as typed.
//!
//! Byte 255 that does not start a telnet command is kept as data, and a
//! subnegotiation can swallow at most [`MAX_SUB`] bytes, so a Latin-1 `ÿ` in
//! text never eats the rest of the input.
//!
//! An idle connection holds no buffer at all: the partial-line buffer is only
//! allocated while a line is incomplete and is released once it completes.

use bytes::{BufMut, BytesMut};

/// One result of framing.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A complete line without its `\n` or `\r\n`.
    Line(&'a [u8]),
    /// A line went over the limit; its bytes up to the next newline are
    /// discarded. Reported once per such line, when the limit is crossed.
    TooLong,
}

/// Telnet commands (RFC 854) and the options chatd agrees to: binary input
/// (RFC 856) and timing marks (RFC 860).
const IAC: u8 = 255;
const DONT: u8 = 254;
const DO: u8 = 253;
const WONT: u8 = 252;
const WILL: u8 = 251;
const SB: u8 = 250;
const EL: u8 = 248;
const AYT: u8 = 246;
const AO: u8 = 245;
const IP: u8 = 244;
const BRK: u8 = 243;
const SE: u8 = 240;
/// Linemode's commands (RFC 1184), below 240: end of file, suspend, abort.
const EOF: u8 = 236;
const SUSP: u8 = 237;
const ABORT: u8 = 238;
const BINARY: u8 = 0;
const TIMING_MARK: u8 = 6;

/// The byte a telnet client replaced with `IAC cmd`: its control character
/// for that command with the high bit set, as it matched a typed byte
/// 0x80–0x9F on its low 7 bits. Debian's telnet (inetutils) sends `IP` for
/// 0x83 (`^C`), `AO` for 0x8F (`^O`), `SUSP` for 0x9A (`^Z`) and `BRK` for
/// 0x9C (`^\`), each followed by `IAC DO TIMING-MARK`; in RFC 1184
/// linemode it would send `ABORT` for `^\`, `EOF` for `^D`, and `AYT` and
/// `EL` with their usual `^T` and `^U`. `EC` is missing: its `^?` gives
/// 0xFF, never in UTF-8, and `^H` would be a guess.
fn typed_byte(command: u8) -> Option<u8> {
    let control = match command {
        IP => 0x03,
        EOF => 0x04,
        AO => 0x0F,
        AYT => 0x14,
        EL => 0x15,
        SUSP => 0x1A,
        BRK | ABORT => 0x1C,
        _ => return None,
    };
    Some(control | 0x80)
}

/// UTF-8 continuation bytes still owed after `b`, when `owed` were owed
/// before it. An invalid byte owes none: a command after it is a command.
fn utf8_step(owed: u8, b: u8) -> u8 {
    match b {
        0x80..=0xBF => owed.saturating_sub(1),
        0xC2..=0xDF => 1,
        0xE0..=0xEF => 2,
        0xF0..=0xF4 => 3,
        _ => 0,
    }
}

/// [`utf8_step`] over `data`. A character is at most 4 bytes, so only the
/// last 3 can leave one incomplete: the cost is the same for any length.
fn utf8_owed_after(owed: u8, data: &[u8]) -> u8 {
    let (start, tail) = match data.len().checked_sub(3) {
        Some(at) => (0, &data[at..]),
        None => (owed, data),
    };
    tail.iter().fold(start, |owed, &b| utf8_step(owed, b))
}

/// Most bytes a subnegotiation (`IAC SB … IAC SE`) may hold before the
/// framer gives up on it and returns to data. chatd agrees to no option that
/// has one, so a well-behaved client sends no subnegotiation at all; the ones clients
/// send unasked (window size, terminal type) fit easily.
pub const MAX_SUB: u8 = 64;

/// Telnet negotiation state, kept across reads since a sequence may be split.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
enum Telnet {
    #[default]
    Data,
    /// Just saw IAC.
    Iac,
    /// Saw IAC and this verb (WILL, WONT, DO, DONT): the option byte follows.
    Option(u8),
    /// Inside IAC SB …, with this many bytes swallowed so far.
    Sub(u8),
    /// Saw IAC inside a subnegotiation.
    SubIac(u8),
}

#[derive(Debug, Default)]
pub struct LineFramer {
    partial: BytesMut,
    discarding: bool,
    telnet: Telnet,
    /// The last option request refused (verb, option), so that a request
    /// repeated in a row is answered once, not once per copy.
    refused: Option<(u8, u8)>,
    /// Where in the data of the read being framed an interrupt (`IP`, `BRK`,
    /// `EL`) came. [`feed`](Self::feed) frames the data before each one
    /// before it drops the typed line, so a line is reported over-long the
    /// same however its bytes were split. Empty, and holding no allocation,
    /// between reads.
    interrupts: Vec<usize>,
    /// UTF-8 continuation bytes the data so far still owes: a command that
    /// arrives while some are owed stands for one of them.
    utf8_owed: u8,
    /// Whether chatd has sent `DO BINARY`; the client's `WILL BINARY` is
    /// then its consent, not a request to answer.
    binary_asked: bool,
}

impl LineFramer {
    /// Removes telnet commands from `buf` in place and returns the length of
    /// the data left, appending the answers owed to the client to `replies`.
    ///
    /// - `DO TIMING-MARK` is answered `WILL TIMING-MARK`, every time;
    /// - `WILL BINARY` is agreed to with `DO BINARY`, unless chatd has
    ///   sent that already;
    /// - `DO x` is refused with `WONT x`, any other `WILL x` with `DONT x`;
    ///   `WONT` and `DONT` are never answered, and a request identical to
    ///   the last one refused is not answered again, so two peers cannot
    ///   loop;
    /// - inside an incomplete UTF-8 character, a command that telnet sends
    ///   for a byte of text ([`typed_byte`]) is that byte again, and the
    ///   first time, the client is asked for binary (`DO BINARY`);
    /// - otherwise `IP`, `BRK` and `EL` discard the line being typed (its
    ///   bytes in `buf` and those already buffered); every other command is
    ///   dropped;
    /// - `IAC IAC` is a data byte 255; `IAC` followed by a byte below 240 is
    ///   no command, and both bytes stay data (invalid UTF-8, which cleaning
    ///   shows as `�`);
    /// - a subnegotiation ends at `IAC SE` or after [`MAX_SUB`] bytes.
    pub fn strip_telnet(&mut self, buf: &mut [u8], replies: &mut BytesMut) -> usize {
        if self.telnet == Telnet::Data && memchr::memchr(IAC, buf).is_none() {
            self.utf8_owed = utf8_owed_after(self.utf8_owed, buf);
            return buf.len();
        }
        let mut out = 0;
        for i in 0..buf.len() {
            let b = buf[i];
            if let Some(byte) = self.restored(b) {
                buf[out] = byte;
                out += 1;
                self.utf8_owed = utf8_step(self.utf8_owed, byte);
                self.telnet = Telnet::Data;
                self.ask_binary(replies);
                continue;
            }
            let data_before = out;
            self.telnet = match (self.telnet, b) {
                (Telnet::Data, IAC) => Telnet::Iac,
                (Telnet::Data, _) => {
                    buf[out] = b;
                    out += 1;
                    Telnet::Data
                }
                (Telnet::Iac, IAC) => {
                    buf[out] = IAC;
                    out += 1;
                    Telnet::Data
                }
                (Telnet::Iac, WILL..=DONT) => Telnet::Option(b),
                (Telnet::Iac, SB) => Telnet::Sub(0),
                (Telnet::Iac, IP | BRK | EL) => {
                    self.interrupts.push(out);
                    Telnet::Data
                }
                // NOP, DM, AO, AYT, EC, GA and a stray SE.
                (Telnet::Iac, SE..) => Telnet::Data,
                // Not a command: a raw 255 in text, kept with what follows.
                (Telnet::Iac, _) => {
                    if out < i {
                        buf[out] = IAC;
                        out += 1;
                    } else {
                        // The 255 ended the previous read and there is no
                        // room before this byte: it goes where that read's
                        // data went, in front of this read's.
                        if !self.discarding {
                            self.partial.put_u8(IAC);
                        }
                        self.utf8_owed = 0;
                    }
                    buf[out] = b;
                    out += 1;
                    Telnet::Data
                }
                (Telnet::Option(verb), option) => {
                    self.answer(verb, option, replies);
                    Telnet::Data
                }
                (Telnet::Sub(n), _) | (Telnet::SubIac(n), _) if n >= MAX_SUB => {
                    // Too long to be a subnegotiation: back to data, which
                    // this byte already is.
                    buf[out] = b;
                    out += 1;
                    Telnet::Data
                }
                (Telnet::Sub(n), IAC) => Telnet::SubIac(n + 1),
                (Telnet::Sub(n), _) => Telnet::Sub(n + 1),
                (Telnet::SubIac(_), SE) => Telnet::Data,
                (Telnet::SubIac(n), _) => Telnet::Sub(n + 1),
            };
            self.utf8_owed = utf8_owed_after(self.utf8_owed, &buf[data_before..out]);
        }
        out
    }

    /// The byte of text that `IAC b` stands for, when `b` follows an `IAC`
    /// inside an incomplete UTF-8 character and is a command telnet sends
    /// for a typed byte. A real Ctrl-C comes between characters, where
    /// nothing is owed, and still interrupts.
    fn restored(&self, b: u8) -> Option<u8> {
        if self.telnet != Telnet::Iac || self.utf8_owed == 0 {
            return None;
        }
        typed_byte(b)
    }

    /// Asks the client, once, to send binary: a telnet that replaced a
    /// byte of text with a command also drops bytes it cannot replace, and
    /// in binary mode it sends every byte as typed.
    fn ask_binary(&mut self, replies: &mut BytesMut) {
        if !self.binary_asked {
            self.binary_asked = true;
            replies.put_slice(&[IAC, DO, BINARY]);
        }
    }

    /// Answers one option request.
    fn answer(&mut self, verb: u8, option: u8, replies: &mut BytesMut) {
        let reply = match (verb, option) {
            // A timing mark is a question, not a mode: answer every one.
            (DO, TIMING_MARK) => {
                replies.put_slice(&[IAC, WILL, TIMING_MARK]);
                return;
            }
            // Binary input is what chatd reads anyway: agreed to, once.
            // After chatd's own `DO BINARY` this is the client's consent,
            // and answering it would start the negotiation over.
            (WILL, BINARY) => {
                self.ask_binary(replies);
                return;
            }
            (DO, _) => WONT,
            (WILL, _) => DONT,
            // WONT and DONT are never answered (RFC 854: never acknowledge
            // a request to enter the mode one is already in; chatd's mode
            // is always "off").
            _ => return,
        };
        if self.refused == Some((verb, option)) {
            return;
        }
        self.refused = Some((verb, option));
        replies.put_slice(&[IAC, reply, option]);
    }

    /// Interrupt: drops the line being typed (the whole lines before it
    /// were framed already).
    fn interrupt(&mut self) {
        self.release();
        self.discarding = false;
    }

    /// Feeds `chunk` (what [`strip_telnet`](Self::strip_telnet) left of a
    /// read, which must be fed before the next read is stripped) and calls
    /// `on_frame` for each complete line or over-long line, in order.
    pub fn feed(&mut self, chunk: &[u8], max_line: usize, mut on_frame: impl FnMut(Frame<'_>)) {
        let interrupts = std::mem::take(&mut self.interrupts);
        let mut start = 0;
        for at in interrupts {
            self.frame(&chunk[start..at], max_line, &mut on_frame);
            self.interrupt();
            start = at;
        }
        self.frame(&chunk[start..], max_line, &mut on_frame);
    }

    fn frame(&mut self, chunk: &[u8], max_line: usize, on_frame: &mut impl FnMut(Frame<'_>)) {
        let mut rest = chunk;
        while !rest.is_empty() {
            match memchr::memchr(b'\n', rest) {
                Some(pos) => {
                    let (head, tail) = (&rest[..pos], &rest[pos + 1..]);
                    rest = tail;
                    if self.discarding {
                        self.discarding = false;
                        continue;
                    }
                    if self.partial.is_empty() {
                        let line = trim_cr(head);
                        if line.len() > max_line {
                            on_frame(Frame::TooLong);
                        } else {
                            on_frame(Frame::Line(line));
                        }
                    } else if self.partial.len() + head.len() > max_line + 1 {
                        self.release();
                        on_frame(Frame::TooLong);
                    } else {
                        self.partial.extend_from_slice(head);
                        let whole = std::mem::take(&mut self.partial);
                        let line = trim_cr(&whole);
                        if line.len() > max_line {
                            on_frame(Frame::TooLong);
                        } else {
                            on_frame(Frame::Line(line));
                        }
                    }
                }
                None => {
                    if !self.discarding {
                        // `+ 1` leaves room for a `\r` that may precede the
                        // `\n` in the next segment.
                        if self.partial.len() + rest.len() > max_line + 1 {
                            self.release();
                            self.discarding = true;
                            on_frame(Frame::TooLong);
                        } else {
                            self.partial.extend_from_slice(rest);
                        }
                    }
                    rest = &[];
                }
            }
        }
    }

    /// Bytes held for an incomplete line.
    pub fn buffered(&self) -> usize {
        self.partial.len()
    }

    /// Whether a line has begun and not ended (including an over-long one
    /// being discarded): what the partial-line deadline watches.
    pub fn mid_line(&self) -> bool {
        !self.partial.is_empty() || self.discarding
    }

    fn release(&mut self) {
        self.partial = BytesMut::new();
    }
}

/// A framer's state between reads, for handing a connection to another
/// process: the unfinished line and the telnet negotiation in progress.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FramerState {
    pub partial: Vec<u8>,
    pub discarding: bool,
    telnet: Telnet,
    refused: Option<(u8, u8)>,
    /// Absent from states exported before it existed: 0, nothing owed.
    #[serde(default)]
    utf8_owed: u8,
    /// Absent from older states: not asked, so asked at the next chance.
    #[serde(default)]
    binary_asked: bool,
}

impl LineFramer {
    /// The state to carry over; between reads, `interrupts` is empty.
    pub fn export(&self) -> FramerState {
        FramerState {
            partial: self.partial.to_vec(),
            discarding: self.discarding,
            telnet: self.telnet,
            refused: self.refused,
            utf8_owed: self.utf8_owed,
            binary_asked: self.binary_asked,
        }
    }

    /// A framer that continues where [`LineFramer::export`] left off.
    pub fn import(state: &FramerState) -> LineFramer {
        LineFramer {
            partial: BytesMut::from(&state.partial[..]),
            discarding: state.discarding,
            telnet: state.telnet,
            refused: state.refused,
            interrupts: Vec::new(),
            utf8_owed: state.utf8_owed,
            binary_asked: state.binary_asked,
        }
    }
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    type Framed = Vec<Result<Vec<u8>, ()>>;

    /// Strips and frames `chunks` in order, as the connection does; returns
    /// the frames and the telnet replies.
    fn run(framer: &mut LineFramer, chunks: &[&[u8]], max: usize) -> (Framed, Vec<u8>) {
        let mut out = Vec::new();
        let mut replies = BytesMut::new();
        for chunk in chunks {
            let mut buf = chunk.to_vec();
            let n = framer.strip_telnet(&mut buf, &mut replies);
            framer.feed(&buf[..n], max, |f| {
                out.push(match f {
                    Frame::Line(l) => Ok(l.to_vec()),
                    Frame::TooLong => Err(()),
                })
            });
        }
        (out, replies.to_vec())
    }

    fn frames(framer: &mut LineFramer, chunk: &[u8], max: usize) -> Vec<Result<String, ()>> {
        run(framer, &[chunk], max)
            .0
            .into_iter()
            .map(|f| f.map(|l| String::from_utf8_lossy(&l).into_owned()))
            .collect()
    }

    fn lines(texts: &[&[u8]]) -> Framed {
        texts.iter().map(|t| Ok(t.to_vec())).collect()
    }

    /// The same frames and replies whether `input` arrives whole, in two
    /// pieces split anywhere, or one byte at a time.
    fn assert_split_invariant(input: &[u8], max: usize) -> (Framed, Vec<u8>) {
        let whole = run(&mut LineFramer::default(), &[input], max);
        for cut in 0..=input.len() {
            let (a, b) = input.split_at(cut);
            let split = run(&mut LineFramer::default(), &[a, b], max);
            assert_eq!(split, whole, "split at {cut} of {input:?}");
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(run(&mut LineFramer::default(), &bytes, max), whole);
        whole
    }

    #[test]
    fn many_lines_in_one_chunk() {
        let mut f = LineFramer::default();
        assert_eq!(
            frames(&mut f, b"a\nbb\r\nccc\n", 100),
            vec![Ok("a".into()), Ok("bb".into()), Ok("ccc".into())]
        );
        assert_eq!(f.buffered(), 0);
    }

    #[test]
    fn one_line_over_many_chunks() {
        let mut f = LineFramer::default();
        assert!(frames(&mut f, b"hel", 100).is_empty());
        assert!(frames(&mut f, b"lo wo", 100).is_empty());
        assert!(frames(&mut f, b"rld\r", 100).is_empty());
        assert_eq!(
            frames(&mut f, b"\nnext", 100),
            vec![Ok("hello world".into())]
        );
        assert_eq!(frames(&mut f, b"\n", 100), vec![Ok("next".into())]);
    }

    #[test]
    fn over_long_line_is_reported_once_and_discarded_to_newline() {
        let mut f = LineFramer::default();
        assert_eq!(frames(&mut f, &[b'x'; 30], 10), vec![Err(())]);
        assert!(frames(&mut f, &[b'x'; 30], 10).is_empty());
        assert_eq!(f.buffered(), 0, "discarded bytes are not kept");
        assert_eq!(frames(&mut f, b"xx\nok\n", 10), vec![Ok("ok".into())]);
        assert_eq!(
            frames(&mut f, b"0123456789A\nfine\n", 10),
            vec![Err(()), Ok("fine".into())]
        );
    }

    #[test]
    fn line_at_the_limit_passes_even_with_crlf_split() {
        let mut f = LineFramer::default();
        assert!(frames(&mut f, b"0123456789\r", 10).is_empty());
        assert_eq!(frames(&mut f, b"\n", 10), vec![Ok("0123456789".into())]);
    }

    #[test]
    fn telnet_negotiation_is_removed_even_when_split() {
        // IAC DO ECHO, IAC SB TTYPE … IAC SE (with an escaped 255 inside),
        // IAC NOP, IAC WONT SGA.
        let (framed, replies) = assert_split_invariant(
            b"\xff\xfd\x01hi\xff\xfa\x18\x01\xff\xff\x02\xff\xf0 there\xff\xf1\xff\xfc\x03!\r\n",
            100,
        );
        assert_eq!(framed, lines(&[b"hi there!"]));
        assert_eq!(replies, b"\xff\xfc\x01", "DO ECHO refused, WONT unanswered");
    }

    #[test]
    fn ctrl_c_gets_its_timing_mark_and_drops_the_typed_line() {
        // What telnet sends on Ctrl-C: IAC IP IAC DO TIMING-MARK.
        let (framed, replies) =
            assert_split_invariant(b"sent\r\nhalf a li\xff\xf4\xff\xfd\x06next\r\n", 100);
        assert_eq!(framed, lines(&[b"sent", b"next"]));
        assert_eq!(replies, b"\xff\xfb\x06");
        // The typed part may have arrived in an earlier read.
        let mut f = LineFramer::default();
        let (framed, _) = run(&mut f, &[b"done\nhal", b"f\xff\xf3", b"new\n"], 100);
        assert_eq!(framed, lines(&[b"done", b"new"]));
        // Break and erase-line do the same; an interrupt ends the discarding
        // of an over-long line too.
        let mut f = LineFramer::default();
        let (framed, _) = run(&mut f, &[&[b'x'; 30], b"\xff\xf8ok\n"], 10);
        assert_eq!(framed, vec![Err(()), Ok(b"ok".to_vec())]);
    }

    /// `text` as Debian's telnet sends it outside binary mode: a byte whose
    /// low 7 bits are `^C`, `^O`, `^Z` or `^\` goes out as `IP`, `AO`,
    /// `SUSP` or `BRK`, each followed by `DO TIMING-MARK`.
    fn as_telnet_sends(text: &[u8]) -> Vec<u8> {
        let mut sent = Vec::new();
        for &b in text {
            match b {
                0x83 => sent.extend_from_slice(&[IAC, IP, IAC, DO, TIMING_MARK]),
                0x8F => sent.extend_from_slice(&[IAC, AO, IAC, DO, TIMING_MARK]),
                0x9A => sent.extend_from_slice(&[IAC, SUSP, IAC, DO, TIMING_MARK]),
                0x9C => sent.extend_from_slice(&[IAC, BRK, IAC, DO, TIMING_MARK]),
                _ => sent.push(b),
            }
        }
        sent
    }

    #[test]
    fn commands_inside_a_character_are_the_bytes_telnet_replaced() {
        // ✓ (e2 9c 93) as the issue shows it on the wire.
        let (framed, replies) = assert_split_invariant(b"\xe2\xff\xf3\xff\xfd\x06\x93\r\n", 100);
        assert_eq!(framed, lines(&["✓".as_bytes()]));
        assert_eq!(
            replies, b"\xff\xfd\x00\xff\xfb\x06",
            "binary asked for; the timing mark still answered"
        );
        let texts = [
            "Привет всем, у нас тест",
            "Καλημέρα σας",
            "中文测试：你好世界",
            "これは日本語のテストです",
            "😀 🙃 🚀 👋 💬 ✓",
            "Привет, Καλημέρα, 我们, テスト ✓ 😀",
            "Ѓ Џ К М: IP, AO, SUSP, BRK",
        ];
        for text in texts {
            let mut input = as_telnet_sends(text.as_bytes());
            input.extend_from_slice(b"\r\n");
            assert_ne!(
                input[..input.len() - 2],
                *text.as_bytes(),
                "{text} has a command"
            );
            let (framed, _) = assert_split_invariant(&input, 1000);
            assert_eq!(framed, lines(&[text.as_bytes()]), "{text}");
        }
    }

    #[test]
    fn binary_is_asked_for_or_agreed_to_once() {
        // Offered by the client (telnet's `toggle outbinary`), binary is
        // agreed to, once.
        let (_, replies) = assert_split_invariant(b"\xff\xfb\x00\xff\xfb\x00", 100);
        assert_eq!(replies, b"\xff\xfd\x00");
        let mut input = as_telnet_sends("✓\r\n".as_bytes());
        input.extend_from_slice(b"\xff\xfb\x00");
        input.extend_from_slice(&as_telnet_sends("Ѓ\r\n".as_bytes()));
        input.extend_from_slice(b"\xff\xfb\x00\xff\xfc\x00");
        let (framed, replies) = assert_split_invariant(&input, 100);
        assert_eq!(framed, lines(&["✓".as_bytes(), "Ѓ".as_bytes()]));
        assert_eq!(
            replies, b"\xff\xfd\x00\xff\xfb\x06\xff\xfb\x06",
            "DO BINARY once, a timing mark for each command, no answer to WILL or WONT BINARY"
        );
    }

    #[test]
    fn ctrl_c_between_characters_still_drops_the_typed_line() {
        // After a whole character nothing is owed: IP is an interrupt.
        let mut input = "Прив✓".as_bytes().to_vec();
        input.extend_from_slice(b"\xff\xf4\xff\xfd\x06");
        input.extend_from_slice("тест\r\n".as_bytes());
        let (framed, replies) = assert_split_invariant(&input, 100);
        assert_eq!(framed, lines(&["тест".as_bytes()]));
        assert_eq!(replies, b"\xff\xfb\x06");
        // Neither does invalid UTF-8 make a command data: 0xFF owes nothing.
        let (framed, _) = assert_split_invariant(b"a\xd0\xff\xff\xff\xf4b\n", 100);
        assert_eq!(framed, lines(&[b"b"]));
    }

    #[test]
    fn a_character_cut_by_an_upgrade_is_restored_by_the_successor() {
        let mut f = LineFramer::default();
        let (framed, _) = run(&mut f, &[b"ok \xe2"], 100);
        assert!(framed.is_empty());
        let mut g = LineFramer::import(&f.export());
        let (framed, replies) = run(&mut g, &[b"\xff\xf3\xff\xfd\x06\x93\n"], 100);
        assert_eq!(framed, lines(&["ok ✓".as_bytes()]));
        assert_eq!(replies, b"\xff\xfd\x00\xff\xfb\x06");
        // The successor's successor knows binary was asked for.
        let mut h = LineFramer::import(&g.export());
        let (_, replies) = run(&mut h, &[&as_telnet_sends("Ѓ\n".as_bytes())], 100);
        assert_eq!(replies, b"\xff\xfb\x06");
        // A state exported before these fields existed owes nothing and
        // has asked for nothing.
        let old: FramerState = serde_json::from_str(
            r#"{"partial":[],"discarding":false,"telnet":"data","refused":null}"#,
        )
        .expect("an older state loads");
        let old = LineFramer::import(&old);
        assert_eq!((old.utf8_owed, old.binary_asked), (0, false));
    }

    #[test]
    fn an_interrupted_over_long_line_is_reported_however_it_was_split() {
        // Found by fuzzing: when the line and the interrupt came in one read,
        // the interrupt dropped the line before it was seen as over-long.
        let (framed, _) = assert_split_invariant(b"0123456789abcdef\xff\xf4next\n", 10);
        assert_eq!(framed, vec![Err(()), Ok(b"next".to_vec())]);
    }

    #[test]
    fn every_timing_mark_is_answered_and_refusals_do_not_repeat() {
        let (_, replies) = assert_split_invariant(
            b"\xff\xfd\x06\xff\xfd\x06\xff\xfd\x18\xff\xfd\x18\xff\xfb\x1f\xff\xfd\x18\xff\xfe\x01\xff\xfc\x01",
            100,
        );
        assert_eq!(
            replies,
            b"\xff\xfb\x06\xff\xfb\x06\xff\xfc\x18\xff\xfe\x1f\xff\xfc\x18".to_vec(),
            "WILL TM twice; WONT TTYPE once for two DOs in a row, again after \
             another request; DONT NAWS; nothing for DONT or WONT"
        );
    }

    #[test]
    fn a_raw_255_is_data_unless_a_command_follows() {
        // Latin-1 "ÿa", an escaped 255, and 255 before a newline.
        let (framed, replies) = assert_split_invariant(b"\xffa \xff\xff b\xff\nok\n", 100);
        assert_eq!(framed, lines(&[b"\xffa \xff b\xff", b"ok"]));
        assert!(replies.is_empty());
    }

    #[test]
    fn a_subnegotiation_swallows_at_most_its_bound() {
        // Latin-1 "ÿú" reads as IAC SB.
        let text = [b'y'; 100];
        let mut input = b"\xff\xfa".to_vec();
        input.extend_from_slice(&text);
        input.extend_from_slice(b"\nnext\n");
        let (framed, _) = assert_split_invariant(&input, 1000);
        let kept = &text[usize::from(MAX_SUB)..];
        assert_eq!(framed, lines(&[kept, b"next"]));
    }

    fn chunked(input: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
        cuts.sort_unstable();
        let mut chunks = Vec::new();
        let mut at = 0;
        for cut in cuts {
            chunks.push(input[at..cut].to_vec());
            at = cut;
        }
        chunks.push(input[at..].to_vec());
        chunks
    }

    /// Bytes that exercise every telnet path: commands, options, data.
    fn telnet_soup() -> impl Strategy<Value = Vec<u8>> {
        let byte = prop_oneof![
            Just(IAC),
            Just(SB),
            Just(SE),
            Just(DO),
            Just(WILL),
            Just(IP),
            Just(BRK),
            Just(AO),
            Just(SUSP),
            Just(TIMING_MARK),
            Just(0xD0),
            Just(0xE2),
            Just(0xF0),
            Just(0x9C),
            Just(b'\n'),
            Just(b'\r'),
            any::<u8>(),
            b'a'..=b'z',
        ];
        proptest::collection::vec(byte, 0..300)
    }

    proptest! {
        #[test]
        fn framing_does_not_depend_on_how_bytes_are_split(
            input in telnet_soup(),
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
        ) {
            let chunks = chunked(&input, &cuts);
            let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
            let whole = run(&mut LineFramer::default(), &[&input], 100_000);
            prop_assert_eq!(run(&mut LineFramer::default(), &refs, 100_000), whole);
        }

        #[test]
        fn valid_lines_come_back_byte_for_byte(
            texts in proptest::collection::vec(any::<String>(), 0..12),
            crlf in any::<bool>(),
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
        ) {
            let texts: Vec<String> = texts.iter().map(|t| t.replace(['\n', '\r'], "")).collect();
            let end = if crlf { "\r\n" } else { "\n" };
            let input: String = texts.iter().map(|t| format!("{t}{end}")).collect();
            let chunks = chunked(input.as_bytes(), &cuts);
            let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
            let (framed, replies) = run(&mut LineFramer::default(), &refs, 100_000);
            let expected: Framed = texts.iter().map(|t| Ok(t.as_bytes().to_vec())).collect();
            prop_assert_eq!(framed, expected);
            prop_assert!(replies.is_empty());
        }
    }

    proptest! {
        #[test]
        fn text_telnet_cut_into_commands_comes_back_whole(
            texts in proptest::collection::vec(any::<String>(), 0..8),
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
        ) {
            let texts: Vec<String> = texts.iter().map(|t| t.replace(['\n', '\r'], "")).collect();
            let input: String = texts.iter().map(|t| format!("{t}\r\n")).collect();
            let sent = as_telnet_sends(input.as_bytes());
            let chunks = chunked(&sent, &cuts);
            let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
            let (framed, replies) = run(&mut LineFramer::default(), &refs, 100_000);
            let expected: Framed = texts.iter().map(|t| Ok(t.as_bytes().to_vec())).collect();
            prop_assert_eq!(framed, expected);
            let marks = (sent.len() - input.len()) / 4;
            let mut owed = Vec::new();
            if marks > 0 {
                owed.extend_from_slice(&[IAC, DO, BINARY]);
            }
            owed.extend_from_slice(&[IAC, WILL, TIMING_MARK].repeat(marks));
            prop_assert_eq!(replies, owed);
        }
    }

    #[test]
    fn an_exported_framer_continues_the_line() {
        let mut f = LineFramer::default();
        f.feed(b"half a li", 100, |_| panic!("no line yet"));
        let mut g = LineFramer::import(&f.export());
        let mut lines = Vec::new();
        g.feed(b"ne\r\n", 100, |frame| {
            if let Frame::Line(l) = frame {
                lines.push(l.to_vec());
            }
        });
        assert_eq!(lines, vec![b"half a line".to_vec()]);
    }
}
