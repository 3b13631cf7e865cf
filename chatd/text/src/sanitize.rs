//! Cleaning user text for other terminals.
//!
//! nc and telnet print raw bytes, so one user's bytes must never move another
//! user's cursor, recolour their screen, set their window title, break a line
//! or hide what they say. [`clean_into`] keeps printable text and
//!
//! - drops C0/C1 controls, whole ANSI/VT escape sequences, and the
//!   characters a terminal does not show (zero-width characters, direction
//!   marks and overrides, the soft hyphen, fillers: Unicode's
//!   default-ignorable code points, except the variation selectors emoji
//!   need);
//! - turns every line break, tab and other blank (no-break and wide spaces,
//!   U+2028/2029) into a plain space, so words never run together;
//! - shortens every run of blanks to at most [`MAX_BLANKS`] spaces, so a
//!   line cannot be padded to wrap on an 80-column terminal and start a
//!   second screen line that looks like a server line.
//!
//! It is pure and knows nothing about sockets; the hot path calls it once per
//! line, writing straight into the outgoing batch.

use bytes::BufMut;

/// The longest run of spaces cleaned text can hold: enough for indented
/// code, far too few to push text to the next line of a terminal.
pub const MAX_BLANKS: usize = 4;

/// Appends the cleaned form of `input` to `out`. Invalid UTF-8 becomes U+FFFD.
/// Returns the number of bytes appended.
pub fn clean_into<B: BufMut>(out: &mut B, input: &[u8]) -> usize {
    // Fast path: printable ASCII without long runs of spaces needs no work
    // at all, and it is most lines.
    if is_plain(input) {
        out.put_slice(input);
        return input.len();
    }
    let text = String::from_utf8_lossy(input);
    let mut written = 0;
    let mut blanks = 0;
    let mut state = Escape::None;
    for ch in text.chars() {
        state = match state {
            Escape::None => {
                if ch == '\u{1b}' {
                    Escape::Start
                } else {
                    match class(ch) {
                        Class::Drop => {}
                        Class::Blank => {
                            if blanks < MAX_BLANKS {
                                out.put_u8(b' ');
                                written += 1;
                            }
                            blanks += 1;
                        }
                        Class::Keep => {
                            blanks = 0;
                            let mut buf = [0u8; 4];
                            let s = ch.encode_utf8(&mut buf);
                            out.put_slice(s.as_bytes());
                            written += s.len();
                        }
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

/// Printable ASCII with no run of more than [`MAX_BLANKS`] spaces.
fn is_plain(input: &[u8]) -> bool {
    let mut blanks = 0;
    for &b in input {
        if !(0x20..0x7f).contains(&b) {
            return false;
        }
        blanks = if b == b' ' { blanks + 1 } else { 0 };
        if blanks > MAX_BLANKS {
            return false;
        }
    }
    true
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

/// What a single character (outside an escape sequence) becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Shown as is.
    Keep,
    /// Shown as one space, and counts towards a run of blanks.
    Blank,
    /// Not shown at all.
    Drop,
}

fn class(ch: char) -> Class {
    match ch {
        // Tabs, line breaks (LF, VT, FF, CR, NEL, U+2028/2029) and every
        // space character, including the blank braille pattern.
        '\t'..='\r'
        | ' '
        | '\u{85}'
        | '\u{a0}'
        | '\u{1680}'
        | '\u{2000}'..='\u{200a}'
        | '\u{2028}'
        | '\u{2029}'
        | '\u{202f}'
        | '\u{205f}'
        | '\u{2800}'
        | '\u{3000}' => Class::Blank,
        '\u{0}'..='\u{1f}' | '\u{7f}'..='\u{9f}' => Class::Drop,
        // Default-ignorable code points (Unicode's DerivedCoreProperties),
        // minus the variation selectors U+FE00–FE0F: soft hyphen, combining
        // grapheme joiner, Arabic letter mark, Hangul fillers, Khmer
        // inherent vowels, Mongolian selectors and vowel separator,
        // zero-width space/joiners and direction marks, bidi embeddings,
        // overrides and isolates, word joiner and invisible operators,
        // byte order mark, shorthand format controls, musical symbol
        // formatting, tags. Plus the interlinear annotation controls.
        '\u{ad}'
        | '\u{34f}'
        | '\u{61c}'
        | '\u{115f}'..='\u{1160}'
        | '\u{17b4}'..='\u{17b5}'
        | '\u{180b}'..='\u{180f}'
        | '\u{200b}'..='\u{200f}'
        | '\u{202a}'..='\u{202e}'
        | '\u{2060}'..='\u{206f}'
        | '\u{3164}'
        | '\u{feff}'
        | '\u{ffa0}'
        | '\u{fff0}'..='\u{fffb}'
        | '\u{1bca0}'..='\u{1bca3}'
        | '\u{1d173}'..='\u{1d17a}'
        | '\u{e0000}'..='\u{e0fff}' => Class::Drop,
        _ => Class::Keep,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn c(input: &[u8]) -> String {
        let mut out = Vec::new();
        clean_into(&mut out, input);
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn plain_text_is_untouched() {
        assert_eq!(c(b"hello, world!"), "hello, world!");
        assert_eq!(
            c("héllo ✓ 日本 ❤\u{fe0f}".as_bytes()),
            "héllo ✓ 日本 ❤\u{fe0f}"
        );
        assert_eq!(c(b"    indented"), "    indented");
    }

    #[test]
    fn control_characters_go() {
        assert_eq!(c(b"a\x00b\x07c\x08d\x7fg"), "abcdg");
        assert_eq!(c("c1\u{9b}31m".as_bytes()), "c131m");
    }

    #[test]
    fn line_breaks_and_tabs_become_spaces() {
        assert_eq!(c(b"two\nlines"), "two lines");
        assert_eq!(c(b"two\r\nlines\rand\ttab"), "two  lines and tab");
        assert_eq!(
            c("nel\u{85}ls\u{2028}ps\u{2029}end".as_bytes()),
            "nel ls ps end"
        );
        assert_eq!(c("no\u{a0}break\u{3000}wide".as_bytes()), "no break wide");
    }

    #[test]
    fn runs_of_blanks_are_bounded() {
        let padded = format!("x{}*** fake", " ".repeat(80));
        assert_eq!(c(padded.as_bytes()), "x    *** fake");
        assert_eq!(c(b"a\t\t\t\t\t\tb"), "a    b");
        // Blanks hidden behind invisible characters or escapes still count.
        assert_eq!(
            c("a  \u{200b}  \x1b[0m  \u{2800}\u{a0}b".as_bytes()),
            "a    b"
        );
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

    #[test]
    fn invisible_and_direction_marks_go() {
        let marks = "\u{200b}\u{200c}\u{200d}\u{200e}\u{200f}\u{2060}\u{2061}\u{2062}\
                     \u{2063}\u{2064}\u{feff}\u{61c}\u{180e}\u{ad}\u{202a}\u{202b}\
                     \u{202c}\u{202d}\u{202e}\u{2066}\u{2067}\u{2068}\u{2069}\u{3164}\
                     \u{e0041}";
        for mark in marks.chars() {
            assert_eq!(c(format!("ad{mark}min").as_bytes()), "admin", "{mark:?}");
        }
    }

    /// Characters nothing but a terminal's own text may contain.
    fn unsafe_char(ch: char) -> bool {
        ch.is_control() || class(ch) == Class::Drop || (class(ch) == Class::Blank && ch != ' ')
    }

    proptest! {
        #[test]
        fn cleaned_text_is_always_safe(input in proptest::collection::vec(any::<u8>(), 0..200)) {
            let out = c(&input);
            prop_assert!(!out.chars().any(unsafe_char), "{:?} -> {:?}", input, out);
            prop_assert!(!out.contains(&" ".repeat(MAX_BLANKS + 1)));
        }

        #[test]
        fn cleaned_unicode_is_always_safe(input in any::<String>()) {
            let out = clean(&input);
            prop_assert!(!out.chars().any(unsafe_char), "{:?} -> {:?}", input, out);
            prop_assert!(!out.contains(&" ".repeat(MAX_BLANKS + 1)));
            // Cleaning what is clean changes nothing.
            prop_assert_eq!(clean(&out), out.clone());
        }
    }
}
