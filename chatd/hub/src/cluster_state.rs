//! Where this node ends and the chat service begins: the state that all
//! nodes share, behind one interface with two implementations.
//!
//! The hub owns what is local: sockets (through the connections), outboxes,
//! this node's clients, rooms and members, and every fan-out to them. What
//! belongs to the whole service it asks of a [`ClusterState`]: whether a
//! nick is free everywhere, who is in a room on the other nodes, which node
//! a `/msg` goes to, a room's history when the room first gets a member
//! here, and the way to the other nodes for room lines, notices and admin
//! requests. Bans reach the other nodes through the hub's events
//! ([`crate::hub::Event::Ban`]), which the NATS side listens to.
//!
//! Two implementations:
//!
//! - [`SingleNode`], in process: this node is the whole service. Every
//!   answer is immediate and comes from this node alone (a nick free here
//!   is free; nobody is elsewhere), and there is nobody to publish to. No
//!   NATS at run time; this is chatd without `[cluster]`.
//! - `cluster::Link`, through NATS (`[cluster] nats_urls`): nick
//!   claims in a key-value bucket, other nodes' members, room messages,
//!   history in a stream.
//!
//! Beside it, the seams between the cluster and the admin API, which know
//! nothing of each other: [`AdminBus`] (the admin API's way to the other
//! nodes, handed to it by the wiring in cluster mode), [`AdminHandler`]
//! (how this node answers them, handed to the cluster), [`WatchCodec`] and
//! [`RemoteEvents`] (other nodes' events as opaque bytes), and [`Pause`]
//! (the upgrade's freeze, as the cluster waits it out).
//!
//! The hub calls the same methods in both modes, so it reads the same in
//! both. Every method is synchronous and cheap and never waits on the
//! network: what needs a remote answer returns a [`Reply::Later`], which the
//! asking connection waits for without blocking anything else and without
//! reordering its client's lines (the daemon's `connection::session::Waiting`).
//!
//! This module depends on nothing of chatd's but [`crate::protocol`], so
//! that both the hub and the cluster can depend on it.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::oneshot;

/// How long a cluster-wide admin call waits for the other nodes' answers.
/// Every live node answers in milliseconds; a node that is down or cut off
/// costs the caller this long, and is then named as missing.
pub const ADMIN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(1);

/// A client's number, unique on its node (the hub counts them); a
/// cluster names a client by its node and this number.
pub type ClientId = u64;

/// What the cluster state answers: at once, or later on a channel. A
/// dropped sender means "given up" (shutdown, or NATS gone).
#[derive(Debug)]
pub enum Reply<T> {
    Now(T),
    Later(oneshot::Receiver<T>),
}

/// The answer to a nick claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The nick is this client's, cluster-wide (or on this node alone while
    /// NATS is away, until it is back).
    Granted,
    /// Another client holds it, on this node or another.
    Taken,
    /// The bucket could not be asked; the text follows `*** error: `.
    Unavailable(String),
}

/// What a room message holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Chat lines, kept as room history on every node.
    Chat,
    /// A server line (join, leave, rename), not kept.
    Notice,
}

/// The state the chat service shares across nodes, as the hub asks for it.
///
/// Calls that report a change of this node (`member_set`, `member_gone`)
/// are made under the hub's `state` lock, so they must never block or take
/// a lock of the hub.
pub trait ClusterState: fmt::Debug + Send + Sync {
    /// This node's id (`cluster.node_id`); empty on a single node.
    fn node_id(&self) -> &str;

    /// The guest nick of this node's client `id`: `guest-7`, or in a
    /// cluster `guest-7-TAG`, so that guests of two nodes never share a nick.
    fn guest_nick(&self, id: ClientId) -> String;

    /// Asks for `nick` for `client`, once this node's own checks passed.
    fn claim_nick(&self, nick: &str, client: ClientId) -> Reply<Claim>;

    /// Keeps holding `nick` for `client`, taken over from the previous
    /// process of this node by a seamless upgrade. Never waits.
    fn hold_nick(&self, nick: &str, client: ClientId);

    /// Frees `client`'s claim on `nick`, if it holds one. Never waits.
    fn release_nick(&self, nick: &str, client: ClientId);

    /// This node's client `id` is now `nick` in `room`.
    fn member_set(&self, id: ClientId, nick: &str, room: &str);

    /// This node's client `id` is gone.
    fn member_gone(&self, id: ClientId);

    /// The number of this node's last membership change (0 on one node);
    /// read under the hub's `state` lock for a snapshot.
    fn member_seq(&self) -> u64;

    /// A room gained its first or lost its last member on this node.
    fn interest_changed(&self);

    /// Members of `room` on the other nodes.
    fn remote_count(&self, room: &str) -> usize;

    /// Nicks in `room` on the other nodes: at most `max`, and how many
    /// there are in all.
    fn remote_nicks(&self, room: &str, max: usize) -> (Vec<Arc<str>>, usize);

    /// Rooms with members on the other nodes, and how many.
    fn remote_rooms(&self) -> HashMap<Arc<str>, usize>;

    /// A batch of whole lines published in `room` on this node, for the
    /// other nodes' members. Never waits: the hot path calls it.
    fn offer(&self, room: &Arc<str>, batch: &Bytes, kind: Kind);

    /// A private message from this node's client to `to`, who is not on
    /// this node: sent to the node that has `to`, whose spelling of the
    /// nick is returned; `None` when nobody is called `to`. `text` is
    /// clean already.
    fn send_private(
        &self,
        from: ClientId,
        from_nick: &str,
        to: &str,
        text: &str,
    ) -> Option<Arc<str>>;

    /// `room` has no member on this node and is about to get one: its
    /// history, when kept by the cluster, is loaded into it (through
    /// [`crate::hub::Hub::replace_history`]) before the reply.
    fn load_history(&self, room: &str) -> Reply<()>;
}

/// Cluster-wide admin: a request scattered to every node, this one
/// included, and their answers gathered until a deadline.
pub trait AdminBus: fmt::Debug + Send + Sync {
    /// This node's id.
    fn node_id(&self) -> &str;

    /// Sends `payload` (an encoded admin request) to every node's `op` and
    /// gathers the answers until the deadline, or sooner once `done` says
    /// the answers so far settle the request.
    fn gather<'a>(
        &'a self,
        op: &'a str,
        payload: Bytes,
        done: &'a (dyn Fn(&Answer) -> bool + Send + Sync),
    ) -> Pin<Box<dyn Future<Output = Result<Gathered, GatherError>> + Send + 'a>>;

    /// Opens a stream of the other nodes' events (`WatchEvents`): the
    /// stream, and which nodes agreed to send theirs. A stream rather than
    /// a gather, so it gets its own method.
    fn watch<'a>(&'a self, messages: bool) -> BoxFuture<'a, Result<Watching, String>>;
}

/// A watch's feed of the other nodes' events, and which nodes agreed to
/// send theirs.
pub type Watching = (Box<dyn RemoteEvents>, Gathered);

/// The other nodes' events for one watch, as the cluster relays them:
/// opaque bytes that the admin API encoded on the sending node and decodes
/// here. Dropping it ends the watch's interest in them.
pub trait RemoteEvents: fmt::Debug + Send {
    /// The next item from another node; `None` once the feed ends.
    fn next(&mut self) -> BoxFuture<'_, Option<Relayed>>;
}

/// One item of [`RemoteEvents`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Relayed {
    /// An event of `node`, as its [`WatchCodec`] encoded it.
    Event { node: String, payload: Bytes },
    /// `missed` events of `node` never reached this watch (NATS was away,
    /// dropped them, or the watch fell behind).
    Lagged { node: String, missed: u64 },
}

/// What a node relays to the other nodes' watches: one of its own events
/// (`E`: the hub's event), or how many of them its relay skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchItem<E> {
    Event(E),
    Lagged(u64),
}

/// How relayed events look on the wire, given to the cluster by the admin
/// API, which owns the format: the cluster carries the bytes, never reads
/// them beyond the node they name.
pub trait WatchCodec<E>: fmt::Debug + Send + Sync {
    /// `item` of `node`, as the other nodes' watches receive it.
    fn encode(&self, item: WatchItem<E>, node: &str) -> Bytes;

    /// The node an encoded item comes from; `None` when it is not one.
    fn node(&self, payload: &Bytes) -> Option<String>;
}

/// Answers the admin requests other nodes send to this one, given to the
/// cluster by the admin API: this node alone answers, never scattering
/// again, so a request cannot loop.
pub trait AdminHandler: fmt::Debug + Send + Sync {
    /// Runs `op` with `payload` (an encoded admin request) on this node,
    /// `node`, and returns the encoded answer, or the error's gRPC code and
    /// message.
    fn answer<'a>(
        &'a self,
        node: &'a str,
        op: &'a str,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<Bytes, (i32, String)>>;
}

/// The upgrade's hold on this node, as the cluster sees it: while a
/// seamless upgrade has the clients frozen, nothing is handed on to them,
/// so what the upgrade reads of the receiving positions is exactly what
/// reached them.
pub trait Pause: fmt::Debug + Send + Sync {
    /// Whether the clients are frozen now.
    fn is_frozen(&self) -> bool;

    /// Waits out a freeze: `true` when it ended in a commit (the new
    /// process serves), `false` when the clients resumed here.
    fn settled(&self) -> BoxFuture<'_, bool>;

    /// Whether a new process took over: this one lets go of nothing it
    /// hands on (nicks, sockets).
    fn committed(&self) -> bool;
}

/// No upgrade ever pauses: for nodes and tests without one.
#[derive(Debug, Default, Clone, Copy)]
pub struct NeverPaused;

impl Pause for NeverPaused {
    fn is_frozen(&self) -> bool {
        false
    }

    fn settled(&self) -> BoxFuture<'_, bool> {
        Box::pin(std::future::ready(false))
    }

    fn committed(&self) -> bool {
        false
    }
}

/// A boxed future, as the object-safe traits here return them.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a scattered request brought back.
#[derive(Debug, Default)]
pub struct Gathered {
    pub answers: Vec<Answer>,
    /// Nodes known to be there that did not answer in time, sorted.
    pub missing: Vec<String>,
}

/// One node's answer to a scattered admin request.
#[derive(Debug)]
pub struct Answer {
    pub node: String,
    /// The answer (an encoded admin response), or the error's gRPC code and
    /// message.
    pub result: Result<Bytes, (i32, String)>,
}

/// Why a request could not be scattered at all.
#[derive(Debug, thiserror::Error)]
pub enum GatherError {
    #[error("NATS is unreachable")]
    Unreachable,
    #[error("cannot ask the other nodes: {0}")]
    Nats(String),
}

/// One node that is the whole service: what this node's hub knows is all
/// there is. Every answer is immediate; nothing is published.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleNode;

impl ClusterState for SingleNode {
    fn node_id(&self) -> &str {
        ""
    }

    fn guest_nick(&self, id: ClientId) -> String {
        format!("{}{id}", chatd_text::protocol::GUEST_PREFIX)
    }

    /// The hub's own checks, already passed, are the whole answer.
    fn claim_nick(&self, _nick: &str, _client: ClientId) -> Reply<Claim> {
        Reply::Now(Claim::Granted)
    }

    fn hold_nick(&self, _nick: &str, _client: ClientId) {}

    fn release_nick(&self, _nick: &str, _client: ClientId) {}

    fn member_set(&self, _id: ClientId, _nick: &str, _room: &str) {}

    fn member_gone(&self, _id: ClientId) {}

    fn member_seq(&self) -> u64 {
        0
    }

    fn interest_changed(&self) {}

    fn remote_count(&self, _room: &str) -> usize {
        0
    }

    fn remote_nicks(&self, _room: &str, _max: usize) -> (Vec<Arc<str>>, usize) {
        (Vec::new(), 0)
    }

    fn remote_rooms(&self) -> HashMap<Arc<str>, usize> {
        HashMap::new()
    }

    fn offer(&self, _room: &Arc<str>, _batch: &Bytes, _kind: Kind) {}

    fn send_private(
        &self,
        _from: ClientId,
        _from_nick: &str,
        _to: &str,
        _text: &str,
    ) -> Option<Arc<str>> {
        None
    }

    /// A room's history is the one this node kept.
    fn load_history(&self, _room: &str) -> Reply<()> {
        Reply::Now(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_node_answers_at_once_from_itself() {
        let node = SingleNode;
        assert_eq!(node.guest_nick(7), "guest-7");
        assert!(matches!(
            node.claim_nick("alice", 1),
            Reply::Now(Claim::Granted)
        ));
        assert!(matches!(node.load_history("lobby"), Reply::Now(())));
        node.member_set(1, "alice", "lobby");
        assert_eq!(node.member_seq(), 0);
        assert_eq!(node.remote_count("lobby"), 0);
        assert_eq!(node.remote_nicks("lobby", 50), (Vec::new(), 0));
        assert!(node.remote_rooms().is_empty());
        assert_eq!(node.send_private(1, "alice", "bob", "hi"), None);
        assert_eq!(node.node_id(), "");
    }
}
