//! Cluster mode: rooms that span several chatd nodes, through NATS.
//!
//! This module owns the NATS connection and is the only code that talks to
//! NATS. It is the NATS implementation of [`ClusterState`](chatd_hub::cluster_state::ClusterState): the hub stays
//! the single-node hub and asks the [`Link`] what it asks
//! [`SingleNode`](chatd_hub::cluster_state::SingleNode) on one node. It hands this module every batch published in a room and
//! every room notice ([`ClusterState::offer`](chatd_hub::cluster_state::ClusterState::offer), a `try_send` on a bounded
//! channel: the hot path never waits on the network), and says when a room
//! gains its first or loses its last local member
//! ([`ClusterState::interest_changed`](chatd_hub::cluster_state::ClusterState::interest_changed)). One task, the node's cluster task,
//! then:
//!
//! - publishes each batch once to `NAME.room.ROOM.chat` (a room notice to
//!   `NAME.room.ROOM.notice`; one NATS message per batch, never per
//!   recipient) with this node's id and the batch's position in headers;
//! - keeps one subscription per room that has local members
//!   (`NAME.room.ROOM.*`), and hands
//!   every batch from another node to [`Hub::deliver_remote`], the same
//!   non-blocking fan-out local lines take; its own batches it ignores;
//! - watches the connection: when NATS is lost the users in rooms are told
//!   once, and once again when it is back (the client reconnects by itself,
//!   with backoff). A reconnect within `HOLD` (2 s; another server of a NATS
//!   cluster) loses nothing: batches carry positions ([`seq`]),
//!   the node publishes again what its server had not confirmed, and a node
//!   that missed some asks their sender for them. Past `HOLD`, batches
//!   for other nodes are dropped and counted, not queued. Private
//!   messages to another node's client (`NAME.pm.NODE`) are positioned
//!   and kept the same way, one backlog stream per destination node.
//!
//! Admin is cluster-wide through [`Bus`]: every node answers requests on
//! `NAME.admin.OP` (through the [`AdminHandler`] the wiring gives
//! [`start`]), and the node an
//! operator talks to scatters a request there and gathers the answers until
//! a deadline ([`ADMIN_DEADLINE`](chatd_hub::cluster_state::ADMIN_DEADLINE)), so a dead node makes a call slower, never
//! hang, and the reply names the nodes that answered. Nodes say they are
//! there on `NAME.nodes` (presence), so a gather can stop once every live
//! node answered and name the live ones that did not.
//!
//! Nicks are unique cluster-wide through a JetStream key-value bucket
//! ([`nicks`]): `/nick` asks the nick task through
//! [`ClusterState::claim_nick`](chatd_hub::cluster_state::ClusterState::claim_nick) and the client's connection waits for the
//! answer without blocking anything else.
//!
//! Who is where on the other nodes ([`members`]) makes `/who`, `/rooms`,
//! the counts in room notices and `/msg` cluster-wide.
//!
//! Room history is cluster-wide too: a JetStream stream keeps each room's
//! last batches ([`history`]), loaded when a room gains its first member on
//! a node.

mod bans;
mod bus;
mod connect;
mod history;
mod link;
mod member_task;
mod members;
mod nats_options;
mod nicks;
mod node;
mod receive;
mod room;
pub mod seq;
mod stream;
mod subjects;
mod watch;

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::sync::watch as tokio_watch;
use tokio_util::sync::CancellationToken;

pub use bus::{Bus, PRESENCE_TTL};
use bus::{presence, serve_admin};
pub use connect::{ClusterError, Connected, connect};
pub use link::{Link, node_tag};
use node::Node;
pub use room::well_formed;
pub use stream::{create_stream, replicas};
pub use subjects::{ERROR_HEADER, KIND_HEADER, NODE_HEADER};

use chatd_config::ClusterConfig;
use chatd_hub::cluster_state::{AdminBus, AdminHandler, Pause, WatchCodec};
pub use chatd_hub::cluster_state::{Answer, GatherError, Gathered, Kind};
use chatd_hub::hub::Hub;

/// Batches waiting for the cluster task. Past it, batches for other nodes
/// are dropped and counted: local chat never waits for NATS.
const OUTGOING_CAPACITY: usize = 4096;

/// What the cluster is given by the rest of the daemon, which it knows
/// only through these seams.
pub struct Seams {
    /// Answers other nodes' admin requests on this node.
    pub admin: Arc<dyn AdminHandler>,
    /// Encodes this node's events for the other nodes' watches.
    pub codec: Arc<dyn WatchCodec<chatd_hub::hub::Event>>,
    /// The upgrade's freeze.
    pub pause: Arc<dyn Pause>,
    /// The previous process's receiving positions, after a seamless
    /// upgrade; empty otherwise.
    pub inherited: Vec<seq::StreamReceipts>,
}

/// The running cluster, as [`start`] returns it to the wiring.
#[derive(Debug, Clone)]
pub struct Cluster {
    admin: watch::AdminLink,
    receipts: Arc<seq::Receipts>,
}

impl Cluster {
    /// The admin API's way to the other nodes.
    pub fn admin_bus(&self) -> Arc<dyn AdminBus> {
        Arc::new(self.admin.clone())
    }

    /// What every subscribed stream has handed on from each other node,
    /// for a seamless upgrade ([`seq::Receipts::export`]).
    pub fn receipts(&self) -> Arc<seq::Receipts> {
        self.receipts.clone()
    }
}

/// Attaches the hub to the cluster through `connection` (see [`connect`])
/// and spawns the cluster's tasks, which run until `shutdown`; nothing here
/// waits on NATS.
pub async fn start(
    config: &ClusterConfig,
    connection: Connected,
    hub: Hub,
    seams: Seams,
    shutdown: CancellationToken,
) -> Result<Cluster, ClusterError> {
    let Connected {
        client,
        connected,
        state_rx,
    } = connection;
    let bus = Bus {
        client: client.clone(),
        node_id: config.node_id.clone().into(),
        prefix: subjects::admin_prefix(&config.name),
        peers: Arc::default(),
    };
    let (tx, rx) = mpsc::channel(OUTGOING_CAPACITY);
    let (nicks_tx, nicks_rx) = mpsc::unbounded_channel();
    let (loads_tx, loads_rx) = mpsc::unbounded_channel();
    let per_room = hub.config().chat.history;
    let link = Arc::new(Link {
        bus: Some(bus.clone()),
        nicks: Some(nicks_tx),
        prefix: Some(subjects::cluster_prefix(&config.name)),
        loads: (per_room > 0).then_some(loads_tx),
        receipts: Arc::new(seq::Receipts::inheriting(&seams.inherited)),
        ..Link::new(
            tx,
            &config.node_id,
            config.timings.member_silence,
            seams.pause.clone(),
        )
    });
    let handle = Cluster {
        admin: watch::AdminLink::new(bus.clone(), watch::Feed::new(seams.codec.clone())),
        receipts: link.receipts.clone(),
    };
    let nick_task = nicks::Nicks::new(
        client.clone(),
        hub.clone(),
        config.node_id.clone().into(),
        subjects::nicks_bucket(&config.name),
        replicas(config),
        &config.timings,
        seams.pause.clone(),
    );
    tokio::spawn(nick_task.run(nicks_rx, state_rx.clone(), shutdown.clone()));
    // Holds the nicks of clients taken over by a seamless upgrade.
    hub.attach_cluster(link.clone());
    spawn_state_tasks(config, &client, &hub, &link, &state_rx, &shutdown);
    spawn_admin_tasks(config, bus, &hub, seams, &shutdown);
    let node = Node::new(config, client, hub, link, connected, shutdown);
    tokio::spawn(node.run(rx, loads_rx, state_rx));
    Ok(handle)
}

/// The tasks that keep the shared state: bans and the other nodes' members.
fn spawn_state_tasks(
    config: &ClusterConfig,
    client: &async_nats::Client,
    hub: &Hub,
    link: &Arc<Link>,
    state_rx: &tokio_watch::Receiver<bool>,
    shutdown: &CancellationToken,
) {
    tokio::spawn(bans::run(
        client.clone(),
        hub.clone(),
        config.name.clone(),
        replicas(config),
        state_rx.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(member_task::run(
        client.clone(),
        hub.clone(),
        link.clone(),
        config.node_id.clone().into(),
        config.name.clone(),
        state_rx.clone(),
        shutdown.clone(),
    ));
}

/// The tasks of cluster-wide admin: the event relay, presence, and this
/// node's answers to the other nodes' requests.
fn spawn_admin_tasks(
    config: &ClusterConfig,
    bus: Bus,
    hub: &Hub,
    seams: Seams,
    shutdown: &CancellationToken,
) {
    tokio::spawn(watch::relay(
        bus.clone(),
        hub.clone(),
        seams.codec,
        shutdown.clone(),
    ));
    tokio::spawn(presence(
        bus.clone(),
        subjects::nodes(&config.name),
        shutdown.clone(),
    ));
    tokio::spawn(serve_admin(
        bus.client().clone(),
        seams.admin,
        config.node_id.clone().into(),
        subjects::admin_prefix(&config.name),
        shutdown.clone(),
    ));
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use super::link::Outgoing;
    use super::*;

    #[test]
    fn only_what_chatd_writes_is_well_formed() {
        assert_eq!(well_formed(b"<a> hi\r\n<b> yo\r\n"), Some(2));
        assert_eq!(well_formed(b"*** a joined lobby (2 users)\r\n"), Some(1));
        assert_eq!(well_formed(b"[pm] <a> x\r\n"), Some(1));
        assert_eq!(well_formed(b""), None);
        assert_eq!(well_formed(b"<a> no end"), None);
        assert_eq!(well_formed(b"hello\r\n"), None, "user text starting a line");
        assert_eq!(well_formed(b"<a> x\r\nfake\r\n"), None);
        assert_eq!(well_formed(b"<a> x\ny\r\n"), None, "bare LF");
        assert_eq!(well_formed(b"<a> x\ry\r\n"), None, "bare CR");
        assert_eq!(well_formed(b"<a> \x1b[2J\r\n"), None, "escape");
    }

    fn hub() -> Hub {
        Hub::new(
            chatd_config::RawConfig::default()
                .validate()
                .expect("defaults"),
        )
    }

    fn peer(n: u8) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, n], 40000 + u16::from(n)))
    }

    fn drain(client: &chatd_hub::hub::Client) -> String {
        let mut q = std::collections::VecDeque::new();
        client.outbox.take(&mut q);
        let n: usize = q.iter().map(|b| b.len()).sum();
        client.outbox.written(n, usize::MAX);
        q.iter().map(|b| String::from_utf8_lossy(b)).collect()
    }

    fn link(capacity: usize) -> (Arc<Link>, mpsc::Receiver<Outgoing>) {
        let (tx, rx) = mpsc::channel(capacity);
        let link = Link::new(
            tx,
            "web1",
            Duration::from_secs(6),
            Arc::new(chatd_hub::cluster_state::NeverPaused),
        );
        (Arc::new(link), rx)
    }

    #[test]
    fn remote_batches_reach_local_members_and_chat_lines_become_history() {
        let hub = hub();
        let a = hub.connect(peer(1)).expect("a");
        let b = hub.connect(peer(2)).expect("b");
        hub.join(&a, "lobby");
        hub.join(&b, "lobby");
        drain(&a);
        drain(&b);
        let chat = Bytes::from_static(b"<x> hi\r\n<x> again\r\n");
        assert_eq!(hub.deliver_remote("lobby", chat, 2, Kind::Chat), 2);
        let notice = Bytes::from_static(b"*** y joined lobby (1 user)\r\n");
        assert_eq!(hub.deliver_remote("lobby", notice, 1, Kind::Notice), 2);
        assert_eq!(
            drain(&a),
            "<x> hi\r\n<x> again\r\n*** y joined lobby (1 user)\r\n"
        );
        assert_eq!(drain(&a), "");
        assert_eq!(
            hub.deliver_remote("nowhere", Bytes::from_static(b"<x> z\r\n"), 1, Kind::Chat),
            0
        );
        let c = hub.connect(peer(3)).expect("c");
        hub.join(&c, "lobby");
        let joined = drain(&c);
        assert!(joined.contains("<x> hi\r\n<x> again\r\n"), "{joined}");
        assert!(
            !joined.contains("y joined"),
            "notices are not history: {joined}"
        );
    }

    #[test]
    fn the_hub_offers_batches_and_interest_without_waiting() {
        use futures_util::FutureExt;
        let hub = hub();
        let (link, mut rx) = link(2);
        hub.attach_cluster(link.clone());
        let a = hub.connect(peer(1)).expect("a");
        assert_eq!(a.nick().as_ref(), "guest-1-web1");
        let room = hub.join(&a, "lobby");
        assert!(
            link.interest.notified().now_or_never().is_some(),
            "the first member asks for the room's subject"
        );
        assert_eq!(hub.occupied_rooms(), [Arc::from("lobby")]);
        let Outgoing::Room { kind, .. } = rx.try_recv().expect("the join notice") else {
            panic!("a room message");
        };
        assert_eq!(kind, Kind::Notice);
        hub.publish(&room, a.id, Bytes::from_static(b"<a> one\r\n"), 1);
        let Outgoing::Room {
            room: name,
            payload,
            kind,
        } = rx.try_recv().expect("the batch")
        else {
            panic!("a room message");
        };
        assert_eq!((&*name, kind), ("lobby", Kind::Chat));
        assert_eq!(&payload[..], b"<a> one\r\n");
        // A full queue drops and counts; it never blocks the publisher.
        for _ in 0..5 {
            hub.publish(&room, a.id, Bytes::from_static(b"<a> more\r\n"), 1);
        }
        assert_eq!(link.dropped(), 3);
        hub.leave(&a, &chatd_hub::disconnect::Disconnect::Closed);
        assert!(
            link.interest.notified().now_or_never().is_some(),
            "the last member leaving drops it"
        );
        assert!(hub.occupied_rooms().is_empty());
    }

    #[test]
    fn node_tags_are_short() {
        assert_eq!(node_tag("web1"), "web1");
        let long = node_tag("chatd-node-0123456789");
        assert_eq!(long.len(), 6);
        assert_ne!(long, node_tag("chatd-node-0123456788"));
    }
}
