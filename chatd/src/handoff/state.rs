//! What the old process tells the new one, besides descriptors: a versioned
//! JSON document.
//!
//! [`CURRENT`] is the version this binary writes. [`decode`] reads every
//! version it knows and converts it to today's structs, so a new binary can
//! take over from the previous release; a newer version than it knows is
//! refused with a message the old process shows the operator, who then
//! keeps the old process (rollback). `tests/fixtures/handoff-state-v1.json`
//! and `handoff-state-v2.json` are documents of versions 1 and 2: they must
//! keep decoding in every later version.
//!
//! - Version 1: one document with every client in `clients`, their
//!   sockets following the listeners' in the same message.
//! - Version 2: adds `stats` (server-wide counters carry on). The old
//!   process sends the listeners before it freezes anyone and the
//!   clients after the document, in chunks each with its sockets
//!   ([`crate::handoff`]), so `clients` is empty in the document itself.
//!   A version 2 reader takes a version 1 document as it was: every field
//!   version 2 added has a default.
//! - Added within version 2, because an older version 2 reader stays safe:
//!   `cluster_receipts`, which it ignores (it then may lose what other
//!   nodes sent during the freeze, as it always could), and the exchange's
//!   `Waiting` and `NextId` messages, which it rejects, so that the
//!   upgrade rolls back. Keeping the number lets an operator go back to
//!   the previous release by an upgrade.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use chatd_hub::hub::handoff::{ClientState, RoomState};

/// The state version this binary writes.
pub const CURRENT: u32 = 2;

/// The old process's state, in the order its descriptors follow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    /// The descriptors, in order: one listener per entry, then one socket
    /// per client in `clients`.
    pub listeners: Vec<ListenerKind>,
    /// The next client id to hand out: ids stay unique across processes.
    pub next_id: u64,
    pub rooms: Vec<RoomState>,
    pub clients: Vec<ClientState>,
    /// The generated admin token, when none is configured: it stays valid.
    #[serde(default)]
    pub admin_token: Option<String>,
    /// Server-wide counters (version 2; none from version 1).
    #[serde(default)]
    pub stats: Option<chatd_hub::stats::Counters>,
    /// Cluster mode: what each subscribed stream had handed on from each
    /// other node when the clients were frozen, so that the new process
    /// asks for what it then missed instead of losing it. Added within
    /// version 2: a reader that predates it ignores it (and may lose the
    /// batches other nodes sent during the freeze, as it always did).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cluster_receipts: Vec<StreamReceipts>,
}

/// A stream's receiving position, defined where the cluster keeps it.
pub use chatd_cluster::seq::{SenderReceipt, StreamReceipts};

/// What a handed-over listener serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListenerKind {
    Chat,
    Tls,
    Udp,
    Admin,
    /// The admin UNIX socket, with its path (removed at exit by whoever
    /// serves it last).
    AdminUnix(std::path::PathBuf),
    Metrics,
}

/// A client of the old process that was not handed over (a TLS client,
/// told to reconnect): what the new process needs to announce its leave.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Gone {
    pub nick: String,
    pub room: String,
}

/// A connection still in the front door at the freeze: accepted, not yet a
/// client, nothing of it read but the part of a PROXY header below. Handed
/// over as a bare socket, which the new process serves from the front door
/// again. Sent in the handoff's `Waiting` messages, beside the document;
/// older processes send none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WaitingState {
    /// The socket's peer; the client's, once a trusted proxy's header told
    /// it.
    pub peer: SocketAddr,
    /// From a trusted proxy whose header is still arriving: the bytes of it
    /// read so far.
    pub proxy_header: Option<Vec<u8>>,
    /// Accepted on a TLS listener (only while the PROXY header is awaited:
    /// a handshake that began cannot be handed over).
    pub tls: bool,
    /// Milliseconds since it was accepted: the handshake deadline's clock.
    pub age_ms: u64,
}

/// Why a state document cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("the handoff state is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the handoff state has no version")]
    NoVersion,
    #[error(
        "the handoff state is version {0}, newer than this chatd reads (up to {CURRENT}); \
         upgrade to a release that reads it, or restart instead"
    )]
    TooNew(u64),
}

/// Reads a state document of any known version.
pub fn decode(bytes: &[u8]) -> Result<State, DecodeError> {
    decode_value(serde_json::from_slice(bytes)?)
}

/// [`decode`], from parsed JSON.
pub fn decode_value(value: serde_json::Value) -> Result<State, DecodeError> {
    match value.get("version").and_then(serde_json::Value::as_u64) {
        None => Err(DecodeError::NoVersion),
        // Version 2 only added fields with defaults to version 1. When the
        // layout changes otherwise, keep the older structs here and
        // convert them.
        Some(1 | 2) => Ok(serde_json::from_value(value)?),
        Some(v) => Err(DecodeError::TooNew(v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: &str = include_str!("../../tests/fixtures/handoff-state-v1.json");
    const V2: &str = include_str!("../../tests/fixtures/handoff-state-v2.json");

    #[test]
    fn reads_a_version_1_document() {
        let state = decode(V1.as_bytes()).expect("version 1 decodes");
        assert_eq!(state.version, 1);
        assert_eq!(state.listeners[0], ListenerKind::Chat);
        assert_eq!(state.clients.len(), 1);
        let c = &state.clients[0];
        assert_eq!(c.nick, "alice");
        assert_eq!(c.room, "lobby");
        assert_eq!(c.framer.partial, b"half a li".to_vec());
        assert_eq!(c.unsent, b"<bob> hi\r\n".to_vec());
        assert_eq!(state.rooms[0].history, vec![b"<bob> hi\r\n".to_vec()]);
        assert_eq!(state.stats, None);
    }

    #[test]
    fn reads_a_version_2_document() {
        let state = decode(V2.as_bytes()).expect("version 2 decodes");
        assert_eq!(state.version, 2);
        assert!(state.clients.is_empty(), "clients follow the document");
        assert_eq!(state.next_id, 8);
        let stats = state.stats.expect("version 2 has stats");
        assert_eq!(stats.connections, 12);
        assert_eq!(stats.lines_relayed, 40);
        assert_eq!(stats.udp_dropped, 1);
        assert_eq!(state.admin_token.as_deref(), Some("c2VjcmV0"));
    }

    #[test]
    fn refuses_a_newer_version_with_a_message() {
        let e = decode(br#"{"version": 7}"#).expect_err("too new");
        assert!(e.to_string().contains("version 7"), "{e}");
        assert!(matches!(decode(b"{}"), Err(DecodeError::NoVersion)));
    }

    #[test]
    fn what_this_version_writes_it_reads() {
        let mut state = decode(V1.as_bytes()).expect("decodes");
        state.version = CURRENT;
        state.stats = Some(chatd_hub::stats::Counters {
            deliveries: 99,
            ..chatd_hub::stats::Counters::default()
        });
        let again = serde_json::to_vec(&state).expect("encodes");
        assert_eq!(decode(&again).expect("decodes again"), state);
    }
}
