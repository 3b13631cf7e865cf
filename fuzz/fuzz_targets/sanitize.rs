//! The sanitiser on any bytes. Invariants: the output is UTF-8 with no
//! control character, escape, line break, invisible or direction mark, no
//! run of more than MAX_BLANKS spaces; cleaning it again changes nothing;
//! and prefixed as a connection relays it (`<nick> `, `* nick `,
//! `[pm] <nick> `) the line never starts with the server prefix `*** ` and
//! is one line.
#![no_main]

use chatd_text::sanitize::{self, MAX_BLANKS};
use libfuzzer_sys::fuzz_target;

/// An oracle independent of the sanitiser's own table.
fn forbidden(ch: char) -> bool {
    ch.is_control()
        || matches!(ch,
            '\u{85}' | '\u{a0}' | '\u{ad}' | '\u{34f}' | '\u{61c}' | '\u{115f}' | '\u{1160}'
            | '\u{1680}' | '\u{17b4}' | '\u{17b5}' | '\u{180b}'..='\u{180f}'
            | '\u{2000}'..='\u{200f}' | '\u{2028}'..='\u{202f}' | '\u{205f}'..='\u{206f}'
            | '\u{2800}' | '\u{3000}' | '\u{3164}' | '\u{feff}' | '\u{ffa0}'
            | '\u{fff0}'..='\u{fffb}' | '\u{1bca0}'..='\u{1bca3}' | '\u{1d173}'..='\u{1d17a}'
            | '\u{e0000}'..='\u{e0fff}')
}

fuzz_target!(|data: &[u8]| {
    let mut out = Vec::new();
    let n = sanitize::clean_into(&mut out, data);
    assert_eq!(n, out.len());
    let text = std::str::from_utf8(&out).expect("cleaned text is UTF-8");
    if let Some(bad) = text.chars().find(|&c| forbidden(c)) {
        panic!("{data:?} cleaned to {text:?}, which holds {bad:?}");
    }
    assert!(!text.contains(&" ".repeat(MAX_BLANKS + 1)), "{text:?}");
    assert_eq!(sanitize::clean(text), text, "cleaning is idempotent");
    for prefix in ["<alice> ", "* alice ", "[pm] <alice> "] {
        let line = format!("{prefix}{text}\r\n");
        assert!(!line.starts_with("*** "), "{line:?}");
        assert_eq!(line.find(['\r', '\n']), Some(line.len() - 2), "{line:?}");
    }
});
