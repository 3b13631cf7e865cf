//! The hub's side of the cluster: [`Link`], the NATS implementation of
//! [`ClusterState`], cheap and synchronous, never blocking.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Notify, mpsc};
use tracing::warn;

use crate::seq::{self};
use chatd_hub::cluster_state::{Claim, ClientId, ClusterState, Kind, Pause, Reply};
use chatd_hub::rate_log::RateLimitedLog;

use super::bus::Bus;
use super::{members, nicks};

/// At most one warning about dropped batches per this many milliseconds.
pub(super) const WARN_EVERY: Duration = Duration::from_secs(10);

/// One message for the other nodes.
#[derive(Debug)]
pub(super) enum Outgoing {
    /// A batch for a room's subject.
    Room {
        room: Arc<str>,
        payload: Bytes,
        kind: Kind,
    },
    /// A private message (a [`members::PmMsg`]) for a client of `node`:
    /// positioned and kept like a room's batch ([`seq`]).
    Private { node: Arc<str>, payload: Bytes },
    /// A membership change, for `subject`.
    Direct { subject: String, payload: Bytes },
}

/// The hub's side of the cluster: cheap, synchronous, never blocking.
#[derive(Debug)]
pub struct Link {
    pub(super) tx: mpsc::Sender<Outgoing>,
    pub(super) interest: Notify,
    pub(super) tag: String,
    /// Batches that did not reach NATS (queue full, or NATS unreachable).
    pub(super) dropped: AtomicU64,
    pub(super) dropped_log: RateLimitedLog,
    /// Cluster-wide admin; `None` only in unit tests without NATS.
    pub(super) bus: Option<Bus>,
    /// The nick task ([`nicks`]); `None` only in unit tests without NATS.
    /// Unbounded, yet bounded in practice: a connection has at most one
    /// claim queued (it reads nothing more until it is answered), and a
    /// release follows a nick change or a disconnect.
    pub(super) nicks: Option<mpsc::UnboundedSender<nicks::Request>>,
    /// Other nodes' clients.
    pub(super) members: members::Members,
    /// The number of this node's last membership change.
    pub(super) member_seq: AtomicU64,
    /// `NAME.`; `None` only in unit tests, which publish no membership.
    pub(super) prefix: Option<String>,
    pub(super) node_id: Arc<str>,
    /// A node not heard for this long (`cluster.member_silence_secs`,
    /// default three heartbeats) no longer counts in `/who`, `/rooms` and
    /// room counts: a dead node's members are gone within it, at most
    /// 10 s. At most [`PRESENCE_TTL`], because a member list that is
    /// briefly short costs less than an admin call that misses a node.
    pub(super) member_ttl: Duration,
    /// Requests to load a room's history, for the cluster task; `None`
    /// when `chat.history` is 0 (and in unit tests).
    pub(super) loads: Option<mpsc::UnboundedSender<(Arc<str>, tokio::sync::oneshot::Sender<()>)>>,
    /// What each room's listener and the private messages' receiver have
    /// handed on, per sending node (for a seamless upgrade).
    pub(super) receipts: Arc<seq::Receipts>,
    /// The upgrade's freeze, which the receivers wait out.
    pub(super) pause: Arc<dyn Pause>,
}

impl Link {
    /// A link of `node_id` queueing on `tx`, without NATS behind it: the
    /// cluster's start gives it the rest, and unit tests use it as it is.
    pub(super) fn new(
        tx: mpsc::Sender<Outgoing>,
        node_id: &str,
        member_ttl: Duration,
        pause: Arc<dyn Pause>,
    ) -> Link {
        Link {
            tx,
            interest: Notify::new(),
            tag: node_tag(node_id),
            dropped: AtomicU64::new(0),
            dropped_log: RateLimitedLog::new(WARN_EVERY),
            bus: None,
            nicks: None,
            members: members::Members::default(),
            member_seq: AtomicU64::new(0),
            prefix: None,
            node_id: node_id.into(),
            member_ttl,
            loads: None,
            receipts: Arc::default(),
            pause,
        }
    }

    /// Queues a message for NATS, or drops and counts it. Never waits.
    pub(super) fn queue(&self, out: Outgoing) {
        if let Err(e) = self.tx.try_send(out) {
            if matches!(e, mpsc::error::TrySendError::Closed(_)) {
                // The cluster task has stopped: the node is shutting down.
                return;
            }
            let total = self.dropped.fetch_add(1, Relaxed) + 1;
            if self.dropped_log.allow().is_some() {
                warn!(
                    dropped_total = total,
                    "cluster: the queue to NATS is full; lines for other nodes are dropped"
                );
            }
        }
    }

    pub(super) fn member_change(&self, set: Vec<(u64, String, String)>, gone: Vec<u64>) {
        let Some(prefix) = &self.prefix else {
            return;
        };
        let seq = self.member_seq.fetch_add(1, Relaxed) + 1;
        let msg = members::MemberMsg {
            node: self.node_id.to_string(),
            seq,
            snapshot: false,
            set,
            gone,
        };
        if let Ok(payload) = serde_json::to_vec(&msg) {
            self.queue(Outgoing::Direct {
                subject: format!("{prefix}members"),
                payload: payload.into(),
            });
        }
    }

    /// Other nodes' clients.
    pub fn members(&self) -> &members::Members {
        &self.members
    }

    /// The other nodes whose members count (heard within `member_ttl`);
    /// `None` without presence (unit tests): every node counts.
    pub fn live_nodes(&self) -> Option<std::collections::HashSet<String>> {
        self.bus
            .as_ref()
            .map(|bus| bus.peers_within(self.member_ttl).into_iter().collect())
    }

    /// Batches that never reached NATS so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Relaxed)
    }
}

/// The NATS implementation of the state all nodes share. Every call is
/// cheap and synchronous: a message for NATS is queued (`try_send`), a
/// question for the nick task or a room's subscription is answered later
/// on a channel, and other nodes' members are read from their tables.
impl ClusterState for Link {
    fn node_id(&self) -> &str {
        &self.node_id
    }

    /// `guest-7-TAG`, with this node's [`node_tag`].
    fn guest_nick(&self, id: ClientId) -> String {
        format!("{}{id}-{}", chatd_text::protocol::GUEST_PREFIX, self.tag)
    }

    /// Asks the nick task; the answer comes later. Without a nick task
    /// (unit tests) the nick is decided on this node alone.
    fn claim_nick(&self, nick: &str, client: ClientId) -> Reply<Claim> {
        let Some(tx) = &self.nicks else {
            return Reply::Now(Claim::Granted);
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        let sent = tx.send(nicks::Request::Claim {
            key: chatd_text::protocol::fold(nick),
            nick: nick.into(),
            client,
            reply,
        });
        // A closed task (shutdown) drops `reply`: the claim reads as
        // unavailable.
        drop(sent);
        Reply::Later(answer)
    }

    /// The next refresh finds the bucket's value already ours and keeps it.
    fn hold_nick(&self, nick: &str, client: ClientId) {
        if let Some(tx) = &self.nicks {
            let _ = tx.send(nicks::Request::Hold {
                key: chatd_text::protocol::fold(nick),
                nick: nick.into(),
                client,
            });
        }
    }

    fn release_nick(&self, nick: &str, client: ClientId) {
        if let Some(tx) = &self.nicks {
            let _ = tx.send(nicks::Request::Release {
                key: chatd_text::protocol::fold(nick),
                client,
            });
        }
    }

    /// Numbered and queued for the other nodes' tables ([`members`]);
    /// called under the hub's `state` lock, so that numbers follow the
    /// order of changes and a snapshot ([`Hub::member_snapshot`](chatd_hub::hub::Hub::member_snapshot)) holds
    /// exactly the changes up to its number. A change dropped on a full
    /// queue makes the others ask for a snapshot.
    fn member_set(&self, id: ClientId, nick: &str, room: &str) {
        self.member_change(vec![(id, nick.to_string(), room.to_string())], Vec::new());
    }

    fn member_gone(&self, id: ClientId) {
        self.member_change(Vec::new(), vec![id]);
    }

    fn member_seq(&self) -> u64 {
        self.member_seq.load(Relaxed)
    }

    /// The cluster task re-reads which rooms to subscribe to.
    fn interest_changed(&self) {
        self.interest.notify_one();
    }

    fn remote_count(&self, room: &str) -> usize {
        self.members.count(self.live_nodes().as_ref(), room)
    }

    fn remote_nicks(&self, room: &str, max: usize) -> (Vec<Arc<str>>, usize) {
        self.members.nicks(self.live_nodes().as_ref(), room, max)
    }

    fn remote_rooms(&self) -> HashMap<Arc<str>, usize> {
        self.members.rooms(self.live_nodes().as_ref())
    }

    /// Queued for the cluster task, or dropped and counted when the queue
    /// is full.
    fn offer(&self, room: &Arc<str>, batch: &Bytes, kind: Kind) {
        self.queue(Outgoing::Room {
            room: room.clone(),
            payload: batch.clone(),
            kind,
        });
    }

    /// One NATS message, to `NAME.pm.NODE` of the node that has `to`,
    /// with a position, so that a NATS failover loses none
    /// ([`seq`]).
    fn send_private(
        &self,
        from: ClientId,
        from_nick: &str,
        to: &str,
        text: &str,
    ) -> Option<Arc<str>> {
        let (node, nick) = self.members.find(self.live_nodes().as_ref(), to)?;
        let pm = members::PmMsg {
            from_node: self.node_id.to_string(),
            from_id: from,
            from_nick: from_nick.to_string(),
            to: nick.to_string(),
            text: text.to_string(),
            error: None,
        };
        if self.prefix.is_some()
            && let Ok(payload) = serde_json::to_vec(&pm)
        {
            self.queue(Outgoing::Private {
                node: node.as_str().into(),
                payload: payload.into(),
            });
        }
        Some(nick)
    }

    /// The room's subscription task loads the stream's batches; the reply
    /// says when they are there (or that it gave up: a dropped sender).
    /// Without cluster history (`chat.history` = 0, unit tests), at once.
    /// Unbounded, yet bounded in practice: a joining client waits for its
    /// one request.
    fn load_history(&self, room: &str) -> Reply<()> {
        let Some(tx) = &self.loads else {
            return Reply::Now(());
        };
        let (reply, done) = tokio::sync::oneshot::channel();
        let _ = tx.send((room.into(), reply));
        Reply::Later(done)
    }
}

/// The guest-nick tag of `node_id`: itself when at most 6 characters, else
/// 6 hex digits of its FNV-1a hash (so the nick stays short).
pub fn node_tag(node_id: &str) -> String {
    if node_id.len() <= 6 {
        return node_id.to_string();
    }
    let mut h: u32 = 0x811c_9dc5;
    for b in node_id.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{:06x}", h & 0x00ff_ffff)
}
