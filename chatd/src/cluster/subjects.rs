//! The names on the wire that more than one of the cluster's tasks uses:
//! headers, and how a room message's kind is spelled.

use crate::cluster_state::Kind;

/// The header naming the node a message comes from.
pub const NODE_HEADER: &str = "Chatd-Node";

/// The header saying what a message holds: `chat` lines (kept as history)
/// or a `notice` (join, leave, rename; not kept).
pub const KIND_HEADER: &str = "Chatd-Kind";

/// The header of an admin answer that is an error: the gRPC code (a
/// number); the payload is then the message.
pub const ERROR_HEADER: &str = "Chatd-Error";

/// On the wire: the `Chatd-Kind` header and the backlog's byte.
impl Kind {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Kind::Chat => "chat",
            Kind::Notice => "notice",
        }
    }

    pub(super) fn parse(s: &str) -> Option<Kind> {
        match s {
            "chat" => Some(Kind::Chat),
            "notice" => Some(Kind::Notice),
            _ => None,
        }
    }

    /// As kept in the backlog and sent in a replay.
    pub(super) fn as_byte(self) -> u8 {
        match self {
            Kind::Chat => 0,
            Kind::Notice => 1,
        }
    }

    pub(super) fn from_byte(b: u8) -> Option<Kind> {
        match b {
            0 => Some(Kind::Chat),
            1 => Some(Kind::Notice),
            _ => None,
        }
    }
}
