//! A line of user input → a [`Command`]; the rules for nicks and rooms.
//!
//! Pure: it knows nothing about sockets, rooms or other users. See
//! `docs/PROTOCOL.md` for the user-facing description.

use std::fmt;

/// Longest nick, in characters (all ASCII).
pub const MAX_NICK: usize = 20;
/// Longest room name, in characters (all ASCII).
pub const MAX_ROOM: usize = 32;

/// Names no user may take, so nobody can pose as the server, its operators
/// or an IRC-style service. Compared by [`fold`], so `r00t` and `AdrnIn` are
/// reserved too; so is every nick ending in `serv` (`NickServ`, `ChanServ`)
/// and every nick starting with [`GUEST_PREFIX`].
const RESERVED_NICKS: &[&str] = &[
    "admin",
    "administrator",
    "chatd",
    "everyone",
    "guest",
    "mod",
    "moderator",
    "op",
    "operator",
    "root",
    "server",
    "services",
    "staff",
    "sysop",
    "system",
];

/// Default nicks are `guest-N`; no chosen nick may start like one, so a
/// guest is always a guest.
pub const GUEST_PREFIX: &str = "guest-";

#[derive(Debug, PartialEq, Eq)]
pub enum Command<'a> {
    /// A plain line for the room. For `//text` this is `/text`.
    Say(&'a str),
    Help,
    Nick(&'a str),
    Join(&'a str),
    Rooms,
    Who,
    Msg {
        to: &'a str,
        text: &'a str,
    },
    Me(&'a str),
    Quit(Option<&'a str>),
}

/// Why a line is not a valid command. The text is shown to the user after
/// `*** error: `.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("unknown command /{0} (try /help)")]
    Unknown(String),
    #[error("usage: {0}")]
    Usage(&'static str),
}

/// Parses one line (already decoded, without its line ending).
pub fn parse(line: &str) -> Result<Command<'_>, ParseError> {
    let Some(rest) = line.strip_prefix('/') else {
        return Ok(Command::Say(line));
    };
    if rest.starts_with('/') {
        return Ok(Command::Say(rest));
    }
    let (word, args) = match rest.split_once(char::is_whitespace) {
        Some((w, a)) => (w, a.trim()),
        None => (rest, ""),
    };
    let word_lower = word.to_ascii_lowercase();
    match word_lower.as_str() {
        "help" => Ok(Command::Help),
        "nick" => one_arg(args, "/nick NAME").map(Command::Nick),
        "join" => one_arg(args, "/join ROOM").map(Command::Join),
        "rooms" => Ok(Command::Rooms),
        "who" => Ok(Command::Who),
        "msg" => match args.split_once(char::is_whitespace) {
            Some((to, text)) if !text.trim().is_empty() => Ok(Command::Msg {
                to,
                text: text.trim_start(),
            }),
            _ => Err(ParseError::Usage("/msg NICK TEXT")),
        },
        "me" if !args.is_empty() => Ok(Command::Me(args)),
        "me" => Err(ParseError::Usage("/me ACTION")),
        "quit" => Ok(Command::Quit((!args.is_empty()).then_some(args))),
        _ => {
            // Keep the echoed name short and printable.
            let shown: String = word
                .chars()
                .filter(|c| c.is_ascii_graphic())
                .take(32)
                .collect();
            Err(ParseError::Unknown(shown))
        }
    }
}

fn one_arg<'a>(args: &'a str, usage: &'static str) -> Result<&'a str, ParseError> {
    if args.is_empty() || args.contains(char::is_whitespace) {
        Err(ParseError::Usage(usage))
    } else {
        Ok(args)
    }
}

/// Why a nick or room name is refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("must be 1 to {0} characters")]
    Length(usize),
    #[error("may only contain {0}")]
    Charset(&'static str),
    #[error("must start with a letter")]
    Start,
    #[error("is reserved")]
    Reserved,
}

impl NameError {
    pub fn describe(&self, what: &str, name: &str) -> String {
        format!("{what} {} {self}", Quoted(name))
    }
}

/// Shows a user-supplied name in messages without letting it carry anything
/// unprintable.
struct Quoted<'a>(&'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: String = self
            .0
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(40)
            .collect();
        write!(f, "\"{shown}\"")
    }
}

/// Checks a nick chosen with `/nick`. Case is kept for display; uniqueness
/// ignores case and look-alike letters (see [`fold`]).
pub fn validate_nick(nick: &str) -> Result<(), NameError> {
    if nick.is_empty() || nick.len() > MAX_NICK {
        return Err(NameError::Length(MAX_NICK));
    }
    if !nick
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(NameError::Charset("letters, digits, '_' and '-'"));
    }
    if !nick.as_bytes()[0].is_ascii_alphabetic() {
        return Err(NameError::Start);
    }
    let folded = fold(nick);
    let reserved = folded.starts_with(&fold(GUEST_PREFIX))
        || folded.ends_with(&fold("serv"))
        || RESERVED_NICKS.iter().any(|r| fold(r) == folded);
    if reserved {
        return Err(NameError::Reserved);
    }
    Ok(())
}

/// The key nicks are compared by: two nicks with the same key cannot both be
/// taken. Nicks are ASCII, so this is a small skeleton of the letters that
/// look alike in a terminal font, in the spirit of Unicode's confusables
/// (UTS #39), made case-insensitive:
///
/// - case: `A` = `a`;
/// - `0` = `o` (so `O` too);
/// - `1` = `l` = `i` (because `I` looks like `l`, and `I` = `i` by case);
/// - `m` = `rn`, `w` = `vv`: each is written as the pair, so that every
///   string of `r n m` or `v w` has one key however it is split.
///
/// `_` and `-` stay apart from each other and from everything else.
pub fn fold(name: &str) -> String {
    let mut key = String::with_capacity(name.len() + 4);
    for b in name.bytes() {
        match b.to_ascii_lowercase() {
            b'0' => key.push('o'),
            b'1' | b'i' | b'l' => key.push('l'),
            b'm' => key.push_str("rn"),
            b'w' => key.push_str("vv"),
            other => key.push(char::from(other)),
        }
    }
    key
}

/// Checks a room name and returns its canonical form (lowercase, no `#`).
pub fn normalize_room(room: &str) -> Result<String, NameError> {
    let room = room.strip_prefix('#').unwrap_or(room);
    if room.is_empty() || room.len() > MAX_ROOM {
        return Err(NameError::Length(MAX_ROOM));
    }
    if !room
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(NameError::Charset("letters, digits, '_' and '-'"));
    }
    Ok(room.to_ascii_lowercase())
}

/// `1 user`, `3 users`.
pub fn users(n: usize) -> String {
    count(n as u64, "user", "users")
}

/// A count and its noun, in the singular for exactly one: `1 room`,
/// `0 rooms`, `2 rooms`.
pub fn count(n: u64, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {many}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lines_are_messages() {
        assert_eq!(parse("hello"), Ok(Command::Say("hello")));
        assert_eq!(parse("//shrug"), Ok(Command::Say("/shrug")));
        assert_eq!(parse(" /nick x"), Ok(Command::Say(" /nick x")));
    }

    #[test]
    fn commands_parse_case_insensitively() {
        assert_eq!(parse("/HELP"), Ok(Command::Help));
        assert_eq!(parse("/nick  alice "), Ok(Command::Nick("alice")));
        assert_eq!(parse("/join #dev"), Ok(Command::Join("#dev")));
        assert_eq!(parse("/rooms"), Ok(Command::Rooms));
        assert_eq!(parse("/who"), Ok(Command::Who));
        assert_eq!(
            parse("/msg bob  hi there"),
            Ok(Command::Msg {
                to: "bob",
                text: "hi there"
            })
        );
        assert_eq!(parse("/me waves"), Ok(Command::Me("waves")));
        assert_eq!(parse("/quit"), Ok(Command::Quit(None)));
        assert_eq!(parse("/quit see you"), Ok(Command::Quit(Some("see you"))));
    }

    #[test]
    fn bad_commands_say_why() {
        assert_eq!(parse("/frob x"), Err(ParseError::Unknown("frob".into())));
        assert_eq!(parse("/nick"), Err(ParseError::Usage("/nick NAME")));
        assert_eq!(parse("/nick a b"), Err(ParseError::Usage("/nick NAME")));
        assert_eq!(parse("/msg bob"), Err(ParseError::Usage("/msg NICK TEXT")));
        assert_eq!(parse("/me"), Err(ParseError::Usage("/me ACTION")));
        assert_eq!(
            parse("/\x1b[2J").map_err(|e| e.to_string()),
            Err("unknown command /[2J (try /help)".into())
        );
    }

    #[test]
    fn nick_rules() {
        assert_eq!(validate_nick("alice_2-x"), Ok(()));
        assert_eq!(validate_nick(""), Err(NameError::Length(MAX_NICK)));
        assert_eq!(
            validate_nick(&"a".repeat(21)),
            Err(NameError::Length(MAX_NICK))
        );
        assert_eq!(
            validate_nick("***"),
            Err(NameError::Charset("letters, digits, '_' and '-'"))
        );
        assert!(validate_nick("al ice").is_err());
        assert_eq!(validate_nick("2pac"), Err(NameError::Start));
        assert_eq!(validate_nick("Server"), Err(NameError::Reserved));
        assert_eq!(validate_nick("GUEST-12"), Err(NameError::Reserved));
        assert!(validate_nick("élodie").is_err());
    }

    #[test]
    fn guest_and_service_names_are_reserved_in_every_disguise() {
        for nick in [
            "guest-x",
            "Guest-alice",
            "guest",
            "NickServ",
            "ChanServ",
            "nickserv",
            "r00t",
            "ROOT",
            "adrnin",
            "Administrator",
            "SysOp",
            "moderator",
            "chatd",
            "oPerat0r",
            "server",
        ] {
            assert_eq!(validate_nick(nick), Err(NameError::Reserved), "{nick}");
        }
        assert_eq!(validate_nick("guest_1"), Ok(()));
        assert_eq!(validate_nick("alice"), Ok(()));
        assert_eq!(validate_nick("serval"), Ok(()));
    }

    #[test]
    fn look_alike_nicks_fold_together() {
        for (a, b) in [
            ("alice", "aIice"),
            ("alice", "a1ice"),
            ("alice", "ALICE"),
            ("bob", "b0b"),
            ("mallory", "rnallory"),
            ("william", "vviIIiarn"),
            ("rnrn", "mm"),
            ("vvv", "wv"),
            ("vvv", "vw"),
        ] {
            assert_eq!(fold(a), fold(b), "{a} vs {b}");
        }
        assert_ne!(fold("a-b"), fold("a_b"));
        assert_ne!(fold("carol"), fold("caro1_"));
    }

    #[test]
    fn counts_agree_with_their_noun() {
        assert_eq!(count(0, "room", "rooms"), "0 rooms");
        assert_eq!(count(1, "room", "rooms"), "1 room");
        assert_eq!(count(2, "message", "messages"), "2 messages");
        assert_eq!(users(1), "1 user");
    }

    #[test]
    fn room_rules() {
        assert_eq!(normalize_room("#Dev"), Ok("dev".into()));
        assert_eq!(normalize_room("a_b-1"), Ok("a_b-1".into()));
        assert!(normalize_room("").is_err());
        assert!(normalize_room("#").is_err());
        assert!(normalize_room("no spaces").is_err());
        assert!(normalize_room(&"r".repeat(33)).is_err());
    }
}
