//! Cluster-wide membership: who is in which room on the other nodes, for
//! `/who`, `/rooms`, the counts in room notices, and `/msg` to a nick on
//! another node.
//!
//! Every node numbers the changes of its clients (a client's nick and room
//! set, or the client gone) and publishes each on `NAME.members`, in order
//! (see [`chatd_hub::cluster_state::ClusterState::member_set`]); on connecting to NATS, and
//! whenever another node asks on `NAME.members.sync`, it publishes its whole
//! table (a snapshot, numbered like the changes). A node keeps one table per
//! other node: a snapshot replaces it, a change applies when it is the next
//! number, a change already in the snapshot is skipped, and a gap (a change
//! lost while NATS was away or a queue was full) makes it ask for a new
//! snapshot. A snapshot larger than a quarter of the NATS server's
//! `max_payload` (at most [`MAX_PART_BYTES`]) goes in parts, one NATS
//! message each, so that tens of thousands of members never make one message
//! the server refuses: the parts build a new table beside the one in use,
//! changes that come meanwhile apply to the new one (and win over the parts
//! that follow them), and the table replaces the old one when the last part
//! is there; a part missing, or parts not all there within
//! [`ASSEMBLY_LIMIT`], make the node ask for a new snapshot.
//! A node that stops saying it is there (presence,
//! [`crate::PRESENCE_TTL`]) no longer counts, and its table is
//! dropped: a dead node's members leave `/who` and the counts within 10 s.
//!
//! Private messages to a client on another node go to that node's
//! `NAME.pm.NODE`, one NATS message each; an error comes back only when the
//! message cannot be delivered. Each carries its sender's position
//! ([`crate::seq`]): a repeat (published again after a NATS
//! failover) is dropped, and a gap makes this task ask the sender for the
//! missed ones on `NAME.replay.SENDER` (waiting at most a second, which
//! holds up membership changes as long, on a gap only) before handing the
//! message on, so that a failover loses none and keeps their order.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use chatd_hub::hub::ClientId;
use chatd_hub::lock::lock;
use chatd_text::protocol;

/// The largest part of a snapshot, in bytes (of its JSON): a quarter of
/// the server's `max_payload` when that is smaller. Small enough that a
/// part never holds up other messages for long; 25,000 members fit in
/// about four.
pub const MAX_PART_BYTES: usize = 256 * 1024;
/// The smallest part budget, whatever the server says: a part always holds
/// a member or more.
const MIN_PART_BYTES: usize = 1024;
/// How long the parts of one snapshot may take to arrive; past it the node
/// asks for a new one.
pub const ASSEMBLY_LIMIT: Duration = Duration::from_secs(5);

/// One client of another node: its nick and room.
#[derive(Debug, Clone)]
struct Remote {
    nick: Arc<str>,
    room: Arc<str>,
}

/// Another node's clients, as its messages said.
#[derive(Debug, Default)]
struct Table {
    /// The number of the last change applied.
    seq: u64,
    clients: HashMap<ClientId, Remote>,
}

/// The other nodes' tables; read by the hub under no other lock than its
/// own `state` (this lock is a leaf: nothing is locked while it is held).
#[derive(Debug, Default)]
pub struct Members {
    nodes: Mutex<HashMap<Arc<str>, Table>>,
    /// Snapshots coming in parts, by node. Locked before `nodes`, never
    /// while holding it.
    assembling: Mutex<HashMap<Arc<str>, Assembly>>,
}

/// A snapshot coming in parts: the table it builds.
#[derive(Debug)]
struct Assembly {
    /// The snapshot's number.
    seq: u64,
    parts: u32,
    /// The next part expected.
    next: u32,
    /// The number of the last change applied (from `seq`).
    last: u64,
    clients: HashMap<ClientId, Remote>,
    /// Clients that changes set or removed meanwhile: the parts still to
    /// come hold older news of them.
    touched: HashSet<ClientId>,
    started: Instant,
}

/// A message on `NAME.members`: a snapshot of a node's clients, or changes.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MemberMsg {
    pub node: String,
    pub seq: u64,
    #[serde(default)]
    pub snapshot: bool,
    /// Clients whose nick and room are now these.
    #[serde(default)]
    pub set: Vec<(ClientId, String, String)>,
    /// Clients gone.
    #[serde(default)]
    pub gone: Vec<ClientId>,
}

/// A message on `NAME.members` as it travels: a [`MemberMsg`], and for a
/// snapshot in parts, which part (its fields beside the message's).
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Wire {
    #[serde(flatten)]
    pub msg: MemberMsg,
    /// This part's index, from 0, of `parts`. 0 or 1 parts (and nodes that
    /// predate parts) mean a whole message.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub part: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub parts: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl MemberMsg {
    /// A snapshot of `set` under number `seq`, as one message or in parts
    /// of about `budget` bytes each (of JSON), in order.
    pub fn snapshot_parts(
        node: &str,
        seq: u64,
        set: Vec<(ClientId, String, String)>,
        budget: usize,
    ) -> Vec<Wire> {
        // A member's JSON: `[ID,"NICK","ROOM"],`; ids take at most 20.
        let size = |(_, nick, room): &(ClientId, String, String)| nick.len() + room.len() + 30;
        let mut chunks: Vec<Vec<(ClientId, String, String)>> = vec![Vec::new()];
        let mut used = 0;
        for member in set {
            let n = size(&member);
            if used + n > budget && chunks.last().is_some_and(|c| !c.is_empty()) {
                chunks.push(Vec::new());
                used = 0;
            }
            used += n;
            if let Some(chunk) = chunks.last_mut() {
                chunk.push(member);
            }
        }
        let parts = u32::try_from(chunks.len()).unwrap_or(u32::MAX);
        chunks
            .into_iter()
            .enumerate()
            .map(|(i, set)| Wire {
                msg: MemberMsg {
                    node: node.to_string(),
                    seq,
                    snapshot: true,
                    set,
                    gone: Vec::new(),
                },
                part: u32::try_from(i).unwrap_or(u32::MAX),
                parts,
            })
            .collect()
    }
}

/// The part budget for a server that accepts `max_payload` bytes (0: not
/// known yet, NATS's default of 1 MiB assumed).
pub fn part_budget(max_payload: usize) -> usize {
    let max = if max_payload == 0 {
        1024 * 1024
    } else {
        max_payload
    };
    (max / 4).clamp(MIN_PART_BYTES, MAX_PART_BYTES)
}

/// A message on `NAME.pm.NODE`: a private message for a client of NODE, or
/// the error of one that could not be delivered, for its sender.
#[derive(Debug, Serialize, Deserialize)]
pub struct PmMsg {
    pub from_node: String,
    pub from_id: ClientId,
    #[serde(default)]
    pub from_nick: String,
    #[serde(default)]
    pub to: String,
    #[serde(default)]
    pub text: String,
    /// Set on the way back: why it was not delivered.
    #[serde(default)]
    pub error: Option<String>,
}

/// Whether `s` may be shown as a nick from another node: what a nick or a
/// guest nick is made of, nothing that could forge a line.
pub(super) fn plausible_nick(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The entries of `set` that may be shown, as remote clients.
fn plausible(set: Vec<(ClientId, String, String)>) -> impl Iterator<Item = (ClientId, Remote)> {
    set.into_iter()
        .filter(|(_, nick, room)| plausible_nick(nick) && plausible_room(room))
        .map(|(id, nick, room)| {
            (
                id,
                Remote {
                    nick: nick.into(),
                    room: room.into(),
                },
            )
        })
}

/// Whether `s` may be a room name from another node.
fn plausible_room(s: &str) -> bool {
    protocol::normalize_room(s).is_ok_and(|r| r == s)
}

impl Members {
    /// Applies a message from another node; `true` when a snapshot of it
    /// is needed (a gap, or a node not known yet).
    pub fn receive(&self, wire: Wire) -> bool {
        if wire.msg.snapshot && wire.parts > 1 {
            return self.apply_part(wire.msg, wire.part, wire.parts);
        }
        self.apply(wire.msg)
    }

    /// Applies a whole message from another node; as [`Members::receive`].
    pub fn apply(&self, msg: MemberMsg) -> bool {
        {
            let mut assembling = lock(&self.assembling);
            if msg.snapshot {
                // A whole snapshot supersedes any in parts.
                assembling.remove(msg.node.as_str());
            } else if let Some(a) = assembling.get_mut(msg.node.as_str()) {
                if a.started.elapsed() > ASSEMBLY_LIMIT {
                    assembling.remove(msg.node.as_str());
                    return true;
                }
                if msg.seq <= a.last {
                    return false;
                }
                if msg.seq != a.last + 1 {
                    assembling.remove(msg.node.as_str());
                    return true;
                }
                a.last = msg.seq;
                for (id, remote) in plausible(msg.set) {
                    a.touched.insert(id);
                    a.clients.insert(id, remote);
                }
                for id in msg.gone {
                    a.touched.insert(id);
                    a.clients.remove(&id);
                }
                return false;
            }
        }
        let set = plausible(msg.set);
        let mut nodes = lock(&self.nodes);
        if msg.snapshot {
            let table = Table {
                seq: msg.seq,
                clients: set.collect(),
            };
            nodes.insert(msg.node.into(), table);
            return false;
        }
        let Some(table) = nodes.get_mut(msg.node.as_str()) else {
            return true;
        };
        if msg.seq <= table.seq {
            // Already in the snapshot this node holds.
            return false;
        }
        let gap = msg.seq != table.seq + 1;
        table.seq = msg.seq;
        table.clients.extend(set);
        for id in msg.gone {
            table.clients.remove(&id);
        }
        gap
    }

    /// Applies one part of a snapshot; `true` when a new snapshot is
    /// needed (a part missing).
    fn apply_part(&self, msg: MemberMsg, part: u32, parts: u32) -> bool {
        let mut assembling = lock(&self.assembling);
        let node: Arc<str> = msg.node.as_str().into();
        if part == 0 {
            assembling.insert(
                node.clone(),
                Assembly {
                    seq: msg.seq,
                    parts,
                    next: 0,
                    last: msg.seq,
                    clients: HashMap::new(),
                    touched: HashSet::new(),
                    started: Instant::now(),
                },
            );
        }
        let Some(a) = assembling.get_mut(&node) else {
            // The rest of a snapshot whose start came before this node
            // listened: the next one will do.
            return false;
        };
        if a.seq != msg.seq || a.parts != parts || a.next != part {
            assembling.remove(&node);
            return true;
        }
        a.next += 1;
        for (id, remote) in plausible(msg.set) {
            if !a.touched.contains(&id) {
                a.clients.insert(id, remote);
            }
        }
        if a.next < a.parts {
            return false;
        }
        let Some(done) = assembling.remove(&node) else {
            return false;
        };
        drop(assembling);
        lock(&self.nodes).insert(
            node,
            Table {
                seq: done.last,
                clients: done.clients,
            },
        );
        false
    }

    /// Whether this node holds a table of `node`.
    pub fn knows(&self, node: &str) -> bool {
        lock(&self.nodes).contains_key(node)
    }

    /// Keeps the tables of `live` nodes only.
    pub fn retain(&self, live: &HashSet<String>) {
        lock(&self.assembling).retain(|node, _| live.contains(&**node));
        lock(&self.nodes).retain(|node, _| live.contains(&**node));
    }

    /// Calls `f` for every client of a `live` node.
    fn each(&self, live: Option<&HashSet<String>>, mut f: impl FnMut(&str, ClientId, &Remote)) {
        let nodes = lock(&self.nodes);
        for (node, table) in nodes.iter() {
            if live.is_some_and(|live| !live.contains(&**node)) {
                continue;
            }
            for (id, remote) in &table.clients {
                f(node, *id, remote);
            }
        }
    }

    /// Members of `room` on the other live nodes.
    pub fn count(&self, live: Option<&HashSet<String>>, room: &str) -> usize {
        let mut n = 0;
        self.each(live, |_, _, r| n += usize::from(&*r.room == room));
        n
    }

    /// Nicks in `room` on the other live nodes: at most `max`, and how many
    /// there are in all.
    pub fn nicks(
        &self,
        live: Option<&HashSet<String>>,
        room: &str,
        max: usize,
    ) -> (Vec<Arc<str>>, usize) {
        let mut nicks = Vec::new();
        let mut total = 0;
        self.each(live, |_, _, r| {
            if &*r.room == room {
                total += 1;
                if nicks.len() < max {
                    nicks.push(r.nick.clone());
                }
            }
        });
        (nicks, total)
    }

    /// Rooms with members on the other live nodes, and how many.
    pub fn rooms(&self, live: Option<&HashSet<String>>) -> HashMap<Arc<str>, usize> {
        let mut rooms: HashMap<Arc<str>, usize> = HashMap::new();
        self.each(live, |_, _, r| {
            *rooms.entry(r.room.clone()).or_default() += 1
        });
        rooms
    }

    /// The node of the client called `nick` (any case), with its spelling.
    pub fn find(&self, live: Option<&HashSet<String>>, nick: &str) -> Option<(String, Arc<str>)> {
        let key = protocol::fold(nick);
        let mut found = None;
        self.each(live, |node, _, r| {
            if found.is_none() && protocol::fold(&r.nick) == key {
                found = Some((node.to_string(), r.nick.clone()));
            }
        });
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(
        node: &str,
        seq: u64,
        snapshot: bool,
        set: &[(u64, &str, &str)],
        gone: &[u64],
    ) -> MemberMsg {
        MemberMsg {
            node: node.into(),
            seq,
            snapshot,
            set: set
                .iter()
                .map(|(id, n, r)| (*id, n.to_string(), r.to_string()))
                .collect(),
            gone: gone.to_vec(),
        }
    }

    #[test]
    fn snapshots_replace_changes_apply_in_order_and_gaps_ask_for_more() {
        let m = Members::default();
        assert!(
            m.apply(msg("b", 3, false, &[(1, "ann", "lobby")], &[])),
            "unknown node"
        );
        assert_eq!(m.count(None, "lobby"), 0);
        assert!(!m.apply(msg(
            "b",
            3,
            true,
            &[(1, "ann", "lobby"), (2, "bo", "dev")],
            &[]
        )));
        assert!(
            !m.apply(msg("b", 3, false, &[(9, "old", "lobby")], &[])),
            "in the snapshot"
        );
        assert_eq!(m.count(None, "lobby"), 1);
        assert!(!m.apply(msg("b", 4, false, &[(2, "bo", "lobby")], &[])));
        let (mut nicks, total) = m.nicks(None, "lobby", 10);
        nicks.sort();
        assert_eq!((nicks, total), (vec!["ann".into(), "bo".into()], 2));
        assert!(m.apply(msg("b", 6, false, &[], &[1])), "a gap");
        assert_eq!(m.count(None, "lobby"), 1);
        assert_eq!(m.find(None, "BO").map(|(n, _)| n), Some("b".into()));
        assert!(!m.apply(msg(
            "b",
            7,
            false,
            &[(3, "bad nick", "lobby"), (4, "x", "#evil\r\n")],
            &[]
        )));
        assert_eq!(m.count(None, "lobby"), 1, "implausible entries are dropped");
        let live: HashSet<String> = HashSet::new();
        assert_eq!(
            m.count(Some(&live), "lobby"),
            0,
            "silent nodes do not count"
        );
        m.retain(&live);
        assert_eq!(m.count(None, "lobby"), 0);
    }

    fn members(n: u64) -> Vec<(ClientId, String, String)> {
        (1..=n)
            .map(|i| (i, format!("guest-{i}-a"), "lobby".to_string()))
            .collect()
    }

    fn roundtrip(w: &Wire) -> Wire {
        serde_json::from_slice(&serde_json::to_vec(w).expect("encode")).expect("decode")
    }

    #[test]
    fn a_large_snapshot_goes_in_parts_within_the_budget() {
        let parts = MemberMsg::snapshot_parts("a", 9, members(1000), 2048);
        assert!(parts.len() >= 10, "{} parts", parts.len());
        for (i, p) in parts.iter().enumerate() {
            assert_eq!((p.part as usize, p.parts as usize), (i, parts.len()));
            let bytes = serde_json::to_vec(p).expect("encode").len();
            assert!(bytes <= 2048 + 200, "part {i} is {bytes} bytes");
        }
        let total: usize = parts.iter().map(|p| p.msg.set.len()).sum();
        assert_eq!(total, 1000);
        let one = MemberMsg::snapshot_parts("a", 9, members(3), 2048);
        assert_eq!(one.len(), 1);
        assert_eq!(part_budget(0), MAX_PART_BYTES);
        assert_eq!(part_budget(8192), 2048);
        assert_eq!(part_budget(100), MIN_PART_BYTES);
        // A change as nodes without parts send it reads as a whole message.
        let change = msg("a", 3, false, &[(1, "x", "lobby")], &[]);
        let wire: Wire =
            serde_json::from_slice(&serde_json::to_vec(&change).expect("encode")).expect("decode");
        assert_eq!((wire.part, wire.parts, wire.msg), (0, 0, change));
    }

    #[test]
    fn parts_replace_the_table_once_all_are_there_with_changes_meanwhile_on_top() {
        let m = Members::default();
        assert!(!m.apply(msg("a", 1, true, &[(500, "old", "lobby")], &[])));
        let parts = MemberMsg::snapshot_parts("a", 5, members(300), 2048);
        assert!(parts.len() >= 3);
        let mut parts = parts.iter().map(roundtrip);
        assert!(!m.receive(parts.next().expect("first")));
        assert_eq!(m.count(None, "lobby"), 1, "the old table serves meanwhile");
        // Changes after the snapshot's number: client 300 (in a later
        // part) moved, client 1 (in the first part) left.
        assert!(!m.apply(msg("a", 5, false, &[(9, "stale", "lobby")], &[])));
        assert!(!m.apply(msg("a", 6, false, &[(300, "moved", "dev")], &[])));
        assert!(!m.apply(msg("a", 7, false, &[], &[1])));
        for p in parts {
            assert!(!m.receive(p));
        }
        assert_eq!(m.count(None, "lobby"), 298);
        assert_eq!(m.count(None, "dev"), 1, "a change beats an older part");
        assert!(m.find(None, "old").is_none() && m.find(None, "stale").is_none());
        assert!(!m.apply(msg("a", 8, false, &[(301, "new", "lobby")], &[])));
        assert_eq!(m.count(None, "lobby"), 299, "changes go on from the last");

        // A part missing: nothing replaces the table, a new snapshot is asked.
        let parts = MemberMsg::snapshot_parts("a", 20, members(300), 2048);
        assert!(!m.receive(roundtrip(&parts[0])));
        assert!(m.receive(roundtrip(&parts[2])), "a gap in the parts");
        assert_eq!(m.count(None, "lobby"), 299);
    }
}
