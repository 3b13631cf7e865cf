//! The command parser and the nick and room rules, on any text.
//! Invariants: no panic; an accepted nick holds no `*`, no blank and no
//! control character, so a relayed line can never look like a server line;
//! a normalised room name is stable.
#![no_main]

use chatd_text::protocol::{self, Command};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let parsed = protocol::parse(&text);
    if let Ok(Command::Nick(nick)) = parsed {
        if protocol::validate_nick(nick).is_ok() {
            assert!(!nick.contains('*'), "{nick:?}");
            assert!(!nick.chars().any(|c| c.is_whitespace() || c.is_control()));
            assert!(!nick.is_empty() && nick.len() <= protocol::MAX_NICK * 4);
        }
    }
    if let Ok(Command::Join(room)) = parsed {
        if let Ok(normal) = protocol::normalize_room(room) {
            assert_eq!(protocol::normalize_room(&normal).as_deref(), Ok(normal.as_str()));
        }
    }
    let _ = protocol::fold(&text);
    if let Err(e) = protocol::validate_nick(&text) {
        let _ = e.describe("nick", &text);
    }
});
