//! Why a client leaves: shared by the hub, the outbox (its close reason) and
//! the stats, so that none of them depends on the hub for it.

use std::fmt;

/// Why a client leaves. Its `Display` is the reason others see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disconnect {
    Quit(Option<String>),
    Closed,
    Error,
    Kicked(String),
    SlowConsumer,
    Flood,
    Idle,
    PartialLine,
    OverlongLines,
    WrongProtocol,
    Shutdown,
    Banned(String),
    /// Handed to a new chatd process (seamless upgrade): not a leave.
    Handoff,
}

impl fmt::Display for Disconnect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Disconnect::Quit(None) => f.write_str("quit"),
            Disconnect::Quit(Some(r)) => write!(f, "quit: {r}"),
            Disconnect::Closed => f.write_str("connection closed"),
            Disconnect::Error => f.write_str("connection error"),
            Disconnect::Kicked(r) => write!(f, "kicked: {r}"),
            Disconnect::SlowConsumer => f.write_str("too slow to read (slow consumer)"),
            Disconnect::Flood => f.write_str("flooding"),
            Disconnect::Idle => f.write_str("idle timeout"),
            Disconnect::PartialLine => f.write_str("line not finished in time"),
            Disconnect::WrongProtocol => f.write_str("not a chat client"),
            Disconnect::OverlongLines => f.write_str("too many over-long lines"),
            Disconnect::Shutdown => f.write_str("server shutting down"),
            Disconnect::Banned(r) => write!(f, "banned: {r}"),
            Disconnect::Handoff => f.write_str("handed to a new process"),
        }
    }
}
