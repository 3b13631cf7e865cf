//! Cleaning user text before anyone else's terminal sees it.
//!
//! nc and telnet print raw bytes, so one user's bytes must never move another
//! user's cursor, recolour their screen, set their window title or break a
//! line. [`clean_into`] keeps printable text and drops C0/C1 controls, whole
//! ANSI/VT escape sequences and bidirectional overrides. It is pure and knows
//! nothing about sockets; the hot path calls it once per line, writing straight
//! into the outgoing batch.

use bytes::BufMut;

/// Appends the cleaned form of `input` to `out`. Invalid UTF-8 becomes U+FFFD,
/// a tab becomes a space. Returns the number of bytes appended.
pub fn clean_into<B: BufMut>(out: &mut B, input: &[u8]) -> usize {
    // Fast path: printable ASCII needs no work at all, and it is most lines.
    if input.iter().all(|&b| (0x20..0x7f).contains(&b)) {
        out.put_slice(input);
        return input.len();
    }
    let text = String::from_utf8_lossy(input);
    let mut written = 0;
    let mut state = Escape::None;
    for ch in text.chars() {
        state = match state {
            Escape::None => {
                if ch == '\u{1b}' {
                    Escape::Start
                } else {
                    if let Some(kept) = keep(ch) {
                        let mut buf = [0u8; 4];
                        let s = kept.encode_utf8(&mut buf);
                        out.put_slice(s.as_bytes());
                        written += s.len();
                    }
                    Escape::None
                }
            }
            // ESC [ starts a CSI sequence, ESC ] an OSC string; ESC P, X, ^
            // and _ start strings ended like OSC. Anything else after ESC is
            // a two-character sequence and both characters go.
            Escape::Start => match ch {
                '[' => Escape::Csi,
                ']' | 'P' | 'X' | '^' | '_' => Escape::String,
                _ => Escape::None,
            },
            // CSI: parameter and intermediate bytes, then one final byte in
            // 0x40..=0x7e. A character outside that grammar ends it too, so a
            // broken sequence cannot swallow the rest of the line.
            Escape::Csi => {
                if ('\u{20}'..='\u{3f}').contains(&ch) {
                    Escape::Csi
                } else {
                    Escape::None
                }
            }
            // OSC-like strings end at BEL or ST (ESC \).
            Escape::String => match ch {
                '\u{07}' => Escape::None,
                '\u{1b}' => Escape::StringEsc,
                _ => Escape::String,
            },
            Escape::StringEsc => match ch {
                '\\' => Escape::None,
                _ => Escape::String,
            },
        };
    }
    written
}

/// The cleaned form of `input` as a `String` (for command arguments, which
/// are short and off the hot path).
pub fn clean(input: &str) -> String {
    let mut out = Vec::with_capacity(input.len());
    clean_into(&mut out, input.as_bytes());
    // `clean_into` writes whole UTF-8 characters only.
    String::from_utf8(out).unwrap_or_default()
}

#[derive(Clone, Copy)]
enum Escape {
    None,
    Start,
    Csi,
    String,
    StringEsc,
}

/// What a single character becomes: itself, a space (tab) or nothing.
fn keep(ch: char) -> Option<char> {
    match ch {
        '\t' => Some(' '),
        '\u{0}'..='\u{1f}' | '\u{7f}'..='\u{9f}' => None,
        // Bidirectional embeddings, overrides and isolates.
        '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' => None,
        _ => Some(ch),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(input: &[u8]) -> String {
        let mut out = Vec::new();
        clean_into(&mut out, input);
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn plain_text_is_untouched() {
        assert_eq!(c(b"hello, world!"), "hello, world!");
        assert_eq!(c("héllo ✓ 日本".as_bytes()), "héllo ✓ 日本");
    }

    #[test]
    fn control_characters_go() {
        assert_eq!(c(b"a\x00b\x07c\x08d\re\nf\x7fg"), "abcdefg");
        assert_eq!(c(b"tab\there"), "tab here");
        assert_eq!(c("c1\u{85}\u{9b}31m".as_bytes()), "c131m");
    }

    #[test]
    fn escape_sequences_go_whole() {
        assert_eq!(c(b"\x1b[31mred\x1b[0m"), "red");
        assert_eq!(c(b"\x1b[2J\x1b[Hclear"), "clear");
        assert_eq!(c(b"\x1b]0;pwned title\x07after"), "after");
        assert_eq!(c(b"\x1b]0;title\x1b\\after"), "after");
        assert_eq!(c(b"\x1bcreset"), "reset");
        assert_eq!(c(b"\x1b[?1049h\x1b[1;1Hx"), "x");
    }

    #[test]
    fn broken_escape_cannot_swallow_the_line() {
        assert_eq!(c(b"\x1b[12;\xe2\x9c\x93ok"), "ok");
    }

    #[test]
    fn invalid_utf8_is_replaced() {
        assert_eq!(c(b"bad\xff\xfebytes"), "bad\u{fffd}\u{fffd}bytes");
    }

    #[test]
    fn bidi_overrides_go() {
        assert_eq!(c("a\u{202e}b\u{2066}c".as_bytes()), "abc");
    }
}
