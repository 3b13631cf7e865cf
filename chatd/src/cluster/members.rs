//! Cluster-wide membership: who is in which room on the other nodes, for
//! `/who`, `/rooms`, the counts in room notices, and `/msg` to a nick on
//! another node.
//!
//! Every node numbers the changes of its clients (a client's nick and room
//! set, or the client gone) and publishes each on `NAME.members`, in order
//! (see [`crate::cluster_state::ClusterState::member_set`]); on connecting to NATS, and
//! whenever another node asks on `NAME.members.sync`, it publishes its whole
//! table (a snapshot, numbered like the changes). A node keeps one table per
//! other node: a snapshot replaces it, a change applies when it is the next
//! number, a change already in the snapshot is skipped, and a gap (a change
//! lost while NATS was away or a queue was full) makes it ask for a new
//! snapshot. A node that stops saying it is there (presence,
//! [`crate::cluster::PRESENCE_TTL`]) no longer counts, and its table is
//! dropped: a dead node's members leave `/who` and the counts within 10 s.
//!
//! Private messages to a client on another node go to that node's
//! `NAME.pm.NODE`, one NATS message each; an error comes back only when the
//! message cannot be delivered.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::hub::{ClientId, Hub};
use crate::lock::lock;
use crate::protocol;

/// How often tables of silent nodes are dropped (queries skip them at once).
const PRUNE_EVERY: Duration = Duration::from_secs(2);
/// At most one snapshot request per this long, however many gaps are seen.
const SYNC_EVERY: Duration = Duration::from_secs(1);

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
fn plausible_nick(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Whether `s` may be a room name from another node.
fn plausible_room(s: &str) -> bool {
    protocol::normalize_room(s).is_ok_and(|r| r == s)
}

impl Members {
    /// Applies a message from another node; `true` when a snapshot of it
    /// is needed (a gap, or a node not known yet).
    pub fn apply(&self, msg: MemberMsg) -> bool {
        let set = msg
            .set
            .into_iter()
            .filter(|(_, nick, room)| plausible_nick(nick) && plausible_room(room))
            .map(|(id, nick, room)| {
                (
                    id,
                    Remote {
                        nick: nick.into(),
                        room: room.into(),
                    },
                )
            });
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

    /// Whether this node holds a table of `node`.
    pub fn knows(&self, node: &str) -> bool {
        lock(&self.nodes).contains_key(node)
    }

    /// Keeps the tables of `live` nodes only.
    pub fn retain(&self, live: &HashSet<String>) {
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

/// The membership task: applies other nodes' tables, answers snapshot
/// requests, delivers private messages from other nodes, and drops the
/// tables of silent nodes, until `stop`.
pub async fn run(
    client: async_nats::Client,
    hub: Hub,
    link: Arc<super::Link>,
    node_id: Arc<str>,
    name: String,
    mut state: watch::Receiver<bool>,
    stop: CancellationToken,
) {
    let subject = format!("{name}.members");
    let sync_subject = format!("{name}.members.sync");
    let pm_subject = format!("{name}.pm.{node_id}");
    let subscribe = |s: String| {
        let client = client.clone();
        async move {
            client
                .subscribe(s.clone())
                .await
                .map_err(|e| warn!(subject = %s, error = %e, "cluster: cannot subscribe; other nodes' members are unknown"))
                .ok()
        }
    };
    let (Some(mut changes), Some(mut syncs), Some(mut pms)) = (
        subscribe(subject.clone()).await,
        subscribe(sync_subject.clone()).await,
        subscribe(pm_subject).await,
    ) else {
        return;
    };
    let snapshot = |hub: &Hub| {
        let (seq, set) = hub.member_snapshot();
        let msg = MemberMsg {
            node: node_id.to_string(),
            seq,
            snapshot: true,
            set,
            gone: Vec::new(),
        };
        Bytes::from(serde_json::to_vec(&msg).unwrap_or_default())
    };
    let mut last_sync: Option<Instant> = None;
    let mut prune = tokio::time::interval(PRUNE_EVERY);
    // Connected at start, or later: either way the first `changed` or the
    // initial state says when to introduce this node.
    let mut introduce = *state.borrow_and_update();
    loop {
        if introduce {
            introduce = false;
            // Our whole table for the others, then theirs for us.
            let _ = client.publish(subject.clone(), snapshot(&hub)).await;
            let _ = client
                .publish(sync_subject.clone(), Bytes::from(node_id.to_string()))
                .await;
            last_sync = Some(Instant::now());
        }
        tokio::select! {
            () = stop.cancelled() => break,
            changed = state.changed() => {
                if changed.is_err() {
                    break;
                }
                introduce = *state.borrow_and_update();
            }
            _ = prune.tick() => {
                let Some(live) = link.live_nodes() else { continue };
                link.members().retain(&live);
                // A node that is there but whose table this node lacks (its
                // snapshot was lost, or it was silent a while): ask again.
                let lacking = live.iter().any(|n| !link.members().knows(n));
                if lacking && last_sync.is_none_or(|t| t.elapsed() >= SYNC_EVERY) {
                    last_sync = Some(Instant::now());
                    let _ = client
                        .publish(sync_subject.clone(), Bytes::from(node_id.to_string()))
                        .await;
                }
            }
            msg = changes.next() => {
                let Some(msg) = msg else { break };
                let Ok(msg) = serde_json::from_slice::<MemberMsg>(&msg.payload) else {
                    debug!("cluster: ignored a malformed member message");
                    continue;
                };
                if msg.node == *node_id {
                    continue;
                }
                let gap = link.members().apply(msg);
                if gap && last_sync.is_none_or(|t| t.elapsed() >= SYNC_EVERY) {
                    last_sync = Some(Instant::now());
                    let _ = client
                        .publish(sync_subject.clone(), Bytes::from(node_id.to_string()))
                        .await;
                }
            }
            msg = syncs.next() => {
                let Some(msg) = msg else { break };
                if &msg.payload[..] != node_id.as_bytes() {
                    let _ = client.publish(subject.clone(), snapshot(&hub)).await;
                }
            }
            msg = pms.next() => {
                let Some(msg) = msg else { break };
                let Ok(pm) = serde_json::from_slice::<PmMsg>(&msg.payload) else {
                    continue;
                };
                if let Some(back) = deliver(&hub, pm) {
                    let subject = format!("{name}.pm.{}", back.from_node);
                    if let Ok(payload) = serde_json::to_vec(&back) {
                        let _ = client.publish(subject, payload.into()).await;
                    }
                }
            }
        }
    }
}

/// Hands a private message from another node to its recipient here, or
/// an error back to its sender here. Returns the error to send back, if the
/// message could not be delivered.
fn deliver(hub: &Hub, pm: PmMsg) -> Option<PmMsg> {
    if let Some(error) = &pm.error {
        hub.notify_client(
            pm.from_id,
            &format!("error: {}", crate::sanitize::clean(error)),
        );
        return None;
    }
    if !plausible_nick(&pm.from_nick) || !plausible_node(&pm.from_node) {
        return None;
    }
    match hub.deliver_private(&pm.from_nick, &pm.to, &pm.text) {
        Ok(()) => None,
        Err(why) => Some(PmMsg {
            error: Some(why),
            text: String::new(),
            ..pm
        }),
    }
}

/// Whether `s` may be a node id (a subject token).
fn plausible_node(s: &str) -> bool {
    plausible_nick(s)
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
}
