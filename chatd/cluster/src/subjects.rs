//! The names on the wire that more than one of the cluster's tasks uses:
//! headers, and how a room message's kind is spelled.

use chatd_hub::cluster_state::Kind;

/// The header naming the node a message comes from.
pub const NODE_HEADER: &str = "Chatd-Node";

/// The header saying what a message holds: `chat` lines (kept as history)
/// or a `notice` (join, leave, rename; not kept).
pub const KIND_HEADER: &str = "Chatd-Kind";

/// The header of an admin answer that is an error: the gRPC code (a
/// number); the payload is then the message.
pub const ERROR_HEADER: &str = "Chatd-Error";

/// A room message's kind on the wire: the `Chatd-Kind` header and the
/// backlog's byte. The hub names the kinds; only the cluster spells them.
pub trait KindOnWire: Sized {
    fn as_str(&self) -> &'static str;
    fn parse(s: &str) -> Option<Self>;
    /// As kept in the backlog and sent in a replay.
    fn as_byte(&self) -> u8;
    fn from_byte(b: u8) -> Option<Self>;
}

impl KindOnWire for Kind {
    fn as_str(&self) -> &'static str {
        match self {
            Kind::Chat => "chat",
            Kind::Notice => "notice",
        }
    }

    fn parse(s: &str) -> Option<Kind> {
        match s {
            "chat" => Some(Kind::Chat),
            "notice" => Some(Kind::Notice),
            _ => None,
        }
    }

    fn as_byte(&self) -> u8 {
        match self {
            Kind::Chat => 0,
            Kind::Notice => 1,
        }
    }

    fn from_byte(b: u8) -> Option<Kind> {
        match b {
            0 => Some(Kind::Chat),
            1 => Some(Kind::Notice),
            _ => None,
        }
    }
}
