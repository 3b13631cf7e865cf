//! The hub's part in a seamless upgrade (the daemon's `handoff`): what it
//! exports (rooms, history, the next id, each client's counters) and how a
//! new process rebuilds it, without a single join, leave or history replay
//! reaching anyone.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{Client, Hub, Names, Room};
use crate::clock;
use crate::lock::{lock, write};
use crate::outbox::Outbox;
use chatd_text::framing::FramerState;
use chatd_text::protocol;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoomState {
    pub name: String,
    pub messages: u64,
    /// The remembered lines, oldest first, each with its `\r\n`.
    pub history: Vec<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientState {
    pub id: u64,
    pub nick: String,
    pub room: String,
    pub peer: SocketAddr,
    pub connected_at_unix_ms: u64,
    pub lines_in: u64,
    pub bytes_in: u64,
    pub lines_out: u64,
    pub bytes_out: u64,
    /// Milliseconds since the last complete line (the idle deadline's
    /// clock).
    pub idle_ms: u64,
    /// Milliseconds the client has been in the middle of a line, if it is.
    pub partial_ms: Option<u64>,
    pub framer: chatd_text::framing::FramerState,
    pub flood: FloodState,
    pub overlong: u32,
    pub greeted: bool,
    /// Bytes owed to the client: taken from the outbox or queued, not yet
    /// written. The new process writes them first.
    pub unsent: Vec<u8>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FloodState {
    pub tokens: f64,
    /// Milliseconds since the bucket was last refilled.
    pub age_ms: u64,
    pub dropped: u32,
    pub warned: bool,
}

impl Client {
    /// The part of this client's handoff state the hub keeps: its id,
    /// address and counters. The connection fills in the rest (its nick and
    /// room as it sees them, the framer, the flood bucket, the bytes owed)
    /// with struct update syntax; [`Hub::adopt`] reads both parts back.
    pub fn handoff_state(&self) -> ClientState {
        let now = clock::now_ms();
        let (lines_out, bytes_out) = self.outbox.totals();
        let partial = self.partial_since_ms.load(Relaxed);
        ClientState {
            id: self.id,
            peer: self.peer,
            connected_at_unix_ms: super::unix_ms(self.connected_at),
            lines_in: self.lines_in.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
            lines_out,
            bytes_out,
            idle_ms: now.saturating_sub(self.last_line_ms.load(Relaxed)),
            partial_ms: (partial != 0).then(|| now.saturating_sub(partial)),
            nick: String::new(),
            room: String::new(),
            framer: FramerState::default(),
            flood: FloodState::default(),
            overlong: 0,
            greeted: false,
            unsent: Vec::new(),
        }
    }
}

impl Hub {
    /// Clients registered now.
    pub fn client_count(&self) -> usize {
        self.state().clients.len()
    }

    /// The id the next client would get.
    pub fn next_client_id(&self) -> u64 {
        self.shared.next_id.load(Relaxed)
    }

    /// Wakes every connection task, so that each sees a freeze at once
    /// rather than at its client's next byte.
    pub fn wake_connections(&self) {
        let clients: Vec<Arc<Client>> = self.state().clients.values().cloned().collect();
        for c in clients {
            c.outbox.wake_task();
        }
    }

    /// Every room with its history and message count.
    pub fn export_rooms(&self) -> Vec<RoomState> {
        let rooms: Vec<Arc<Room>> = self.state().rooms.values().cloned().collect();
        rooms
            .iter()
            .map(|r| RoomState {
                name: r.name.to_string(),
                messages: r.messages.load(Relaxed),
                history: lock(&r.history).iter().map(|l| l.to_vec()).collect(),
            })
            .collect()
    }

    /// Rebuilds rooms, history and the id counter from a handed-over state,
    /// before any client is adopted.
    pub fn restore(
        &self,
        rooms: &[RoomState],
        clients: &[ClientState],
        next_id: u64,
        stats: Option<&crate::stats::Counters>,
    ) {
        let next = clients
            .iter()
            .map(|c| c.id + 1)
            .max()
            .unwrap_or(1)
            .max(next_id);
        self.shared.next_id.fetch_max(next, Relaxed);
        if let Some(stats) = stats {
            self.shared.stats.import(stats);
        }
        let mut s = self.state();
        for r in rooms {
            let room = s
                .rooms
                .entry(r.name.as_str().into())
                .or_insert_with(|| Arc::new(Room::new(&r.name)))
                .clone();
            room.messages.store(r.messages, Relaxed);
            let mut history = lock(&room.history);
            history.clear();
            history.extend(r.history.iter().map(|l| Bytes::copy_from_slice(l)));
        }
    }

    /// The next client id, as the previous process had it once every
    /// client was collected: no id is handed out twice.
    pub fn restore_next_id(&self, next: u64) {
        self.shared.next_id.fetch_max(next, Relaxed);
    }

    /// Registers a handed-over client with its id, nick, room and counters,
    /// and queues the bytes it was still owed: no notice to anyone, no
    /// history replay. Limits are not applied: the client was admitted
    /// already.
    pub fn adopt(&self, c: &ClientState) -> (Arc<Client>, Arc<Room>) {
        let now = clock::now_ms();
        let mut state = self.state();
        let room = state
            .rooms
            .entry(c.room.as_str().into())
            .or_insert_with(|| Arc::new(Room::new(&c.room)))
            .clone();
        let client = Arc::new(Client {
            id: c.id,
            peer: c.peer,
            tls: false,
            connected_at: UNIX_EPOCH + Duration::from_millis(c.connected_at_unix_ms),
            outbox: Outbox::new(),
            names: Mutex::new(Names {
                nick: c.nick.as_str().into(),
                room: Some(room.clone()),
            }),
            lines_in: AtomicU64::new(c.lines_in),
            bytes_in: AtomicU64::new(c.bytes_in),
            last_line_ms: AtomicU64::new(now.saturating_sub(c.idle_ms).max(1)),
            partial_since_ms: AtomicU64::new(
                c.partial_ms.map_or(0, |ago| now.saturating_sub(ago).max(1)),
            ),
            renamed: AtomicBool::new(false),
            group: self.address_group(c.peer.ip()),
            files: 1,
        });
        client.outbox.restore_totals(c.lines_out, c.bytes_out);
        if !c.unsent.is_empty() {
            // Owed before the handoff: queued whatever the limit, first.
            client
                .outbox
                .push_lines(Bytes::copy_from_slice(&c.unsent), 0, usize::MAX);
        }
        state.nicks.insert(protocol::fold(&c.nick), c.id);
        state.occupy(Some(client.group), client.files);
        state.clients.insert(c.id, client.clone());
        let first = {
            let mut members = write(&room.members);
            members.push(client.clone());
            members.len() == 1
        };
        drop(state);
        if first {
            self.cluster().interest_changed();
        }
        (client, room)
    }
}
