//! Bytes from the socket → lines.
//!
//! [`LineFramer`] turns whatever TCP hands us — half a line, ten lines, a
//! line split across a dozen segments — into whole lines, enforcing the
//! maximum line length *while* reading, so a peer that never sends a newline
//! costs at most `max_line_bytes` of memory. It also removes telnet
//! negotiation (`IAC …`) first. It is pure: no sockets, no async.
//!
//! An idle connection holds no buffer at all: the partial-line buffer is only
//! allocated while a line is incomplete and is released once it completes.

use bytes::BytesMut;

/// One result of framing.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A complete line without its `\n` or `\r\n`.
    Line(&'a [u8]),
    /// A line went over the limit; its bytes up to the next newline are
    /// discarded. Reported once per such line, when the limit is crossed.
    TooLong,
}

const IAC: u8 = 255;
const SB: u8 = 250;
const SE: u8 = 240;

/// Telnet negotiation state, kept across reads since a sequence may be split.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Telnet {
    #[default]
    Data,
    /// Just saw IAC.
    Iac,
    /// Saw IAC WILL/WONT/DO/DONT: one option byte follows.
    Option,
    /// Inside IAC SB … IAC SE.
    Sub,
    /// Saw IAC inside a subnegotiation.
    SubIac,
}

#[derive(Debug, Default)]
pub struct LineFramer {
    partial: BytesMut,
    discarding: bool,
    telnet: Telnet,
}

impl LineFramer {
    /// Removes telnet negotiation from `buf` in place and returns the length
    /// of what is left. Byte 255 never occurs in UTF-8, so it always starts a
    /// telnet command.
    pub fn strip_telnet(&mut self, buf: &mut [u8]) -> usize {
        if self.telnet == Telnet::Data && memchr::memchr(IAC, buf).is_none() {
            return buf.len();
        }
        let mut out = 0;
        for i in 0..buf.len() {
            let b = buf[i];
            self.telnet = match (self.telnet, b) {
                (Telnet::Data, IAC) => Telnet::Iac,
                (Telnet::Data, _) => {
                    buf[out] = b;
                    out += 1;
                    Telnet::Data
                }
                (Telnet::Iac, 251..=254) => Telnet::Option,
                (Telnet::Iac, SB) => Telnet::Sub,
                // IAC IAC (a literal 255, never valid text) and every other
                // two-byte command are dropped.
                (Telnet::Iac, _) => Telnet::Data,
                (Telnet::Option, _) => Telnet::Data,
                (Telnet::Sub, IAC) => Telnet::SubIac,
                (Telnet::Sub, _) => Telnet::Sub,
                (Telnet::SubIac, SE) => Telnet::Data,
                (Telnet::SubIac, _) => Telnet::Sub,
            };
        }
        out
    }

    /// Feeds `chunk` (already stripped of telnet) and calls `on_frame` for
    /// each complete line or over-long line, in order.
    pub fn feed(&mut self, chunk: &[u8], max_line: usize, mut on_frame: impl FnMut(Frame<'_>)) {
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

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(framer: &mut LineFramer, chunk: &[u8], max: usize) -> Vec<Result<String, ()>> {
        let mut out = Vec::new();
        let mut buf = chunk.to_vec();
        let n = framer.strip_telnet(&mut buf);
        framer.feed(&buf[..n], max, |f| {
            out.push(match f {
                Frame::Line(l) => Ok(String::from_utf8_lossy(l).into_owned()),
                Frame::TooLong => Err(()),
            })
        });
        out
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
        let mut f = LineFramer::default();
        // IAC DO ECHO, IAC SB ... IAC SE, IAC IAC
        assert!(frames(&mut f, b"\xff\xfd\x01hi\xff\xfa\x18\x01", 100).is_empty());
        assert_eq!(frames(&mut f, b"\xff\xf0 there\xff", 100), vec![]);
        assert_eq!(
            frames(&mut f, b"\xff!\n", 100),
            vec![Ok("hi there!".into())]
        );
    }
}
