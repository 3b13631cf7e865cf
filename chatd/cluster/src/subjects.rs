//! Every name the cluster puts on the wire, built in one place: the
//! subjects (all under the cluster's `name`, so that two clusters can share
//! one NATS), the JetStream streams and buckets, the headers, and how a room
//! message's kind is spelled. Nodes of different versions meet on these
//! names: change one and a rolling upgrade splits the cluster.

use chatd_hub::cluster_state::Kind;

/// A room's messages: `NAME.room.ROOM.KIND` (`chat` or `notice`).
pub fn room_prefix(name: &str) -> String {
    format!("{name}.room.")
}

/// What the history stream keeps: every room's chat lines.
pub fn history_subjects(name: &str) -> String {
    format!("{name}.room.*.chat")
}

/// Private messages to one node: `NAME.pm.NODE`.
pub fn pm_prefix(name: &str) -> String {
    format!("{name}.pm.")
}

/// Replays of what one node published: `NAME.replay.NODE`.
pub fn replay_prefix(name: &str) -> String {
    format!("{name}.replay.")
}

/// Membership changes, and the requests for a full table (`.sync`).
pub fn members(name: &str) -> String {
    format!("{name}.members")
}

/// Every node's presence heartbeat.
pub fn nodes(name: &str) -> String {
    format!("{name}.nodes")
}

/// Admin requests between nodes: `NAME.admin.OP`.
pub fn admin_prefix(name: &str) -> String {
    format!("{name}.admin.")
}

/// The cluster's own subjects, for those built from a suffix.
pub fn cluster_prefix(name: &str) -> String {
    format!("{name}.")
}

/// The JetStream stream of room history.
pub fn history_stream(name: &str) -> String {
    format!("{name}_history")
}

/// The key-value bucket of nick claims.
pub fn nicks_bucket(name: &str) -> String {
    format!("{name}_nicks")
}

/// The key-value bucket of bans.
pub fn bans_bucket(name: &str) -> String {
    format!("{name}_bans")
}

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
