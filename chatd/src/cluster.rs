//! Cluster mode: rooms that span several chatd nodes, through NATS.
//!
//! This module owns the NATS connection and is the only code that talks to
//! NATS. It is the NATS implementation of [`ClusterState`]: the hub stays
//! the single-node hub and asks the [`Link`] what it asks
//! [`SingleNode`](crate::cluster_state::SingleNode) on one node. It hands this module every batch published in a room and
//! every room notice ([`ClusterState::offer`], a `try_send` on a bounded
//! channel: the hot path never waits on the network), and says when a room
//! gains its first or loses its last local member
//! ([`ClusterState::interest_changed`]). One task, the node's cluster task,
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
//!   cluster) loses nothing: batches carry positions ([`cluster_seq`]),
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
//! a deadline ([`ADMIN_DEADLINE`]), so a dead node makes a call slower, never
//! hang, and the reply names the nodes that answered. Nodes say they are
//! there on `NAME.nodes` (presence), so a gather can stop once every live
//! node answered and name the live ones that did not.
//!
//! Nicks are unique cluster-wide through a JetStream key-value bucket
//! ([`nicks`]): `/nick` asks the nick task through
//! [`ClusterState::claim_nick`] and the client's connection waits for the
//! answer without blocking anything else.
//!
//! Who is where on the other nodes ([`members`]) makes `/who`, `/rooms`,
//! the counts in room notices and `/msg` cluster-wide.
//!
//! Room history is cluster-wide too: a JetStream stream keeps each room's
//! last batches ([`history`]), loaded when a room gains its first member on
//! a node.

pub mod bans;
pub mod history;
pub mod members;
pub mod nicks;
pub mod watch;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::{ConnectOptions, HeaderMap};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::watch as tokio_watch;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::clock;
use crate::cluster_seq::{self, Backlog, Position, SEQ_HEADER, Seen, Verdict};
use crate::cluster_state::{
    ADMIN_DEADLINE, AdminBus, AdminHandler, BoxFuture, Claim, ClientId, ClusterState, Pause,
    RemoteEvents, Reply, WatchCodec, Watching,
};
pub use crate::cluster_state::{Answer, GatherError, Gathered, Kind};
use crate::config::{ClusterConfig, OnUnreachable};
use crate::hub::Hub;
use crate::nats_options;

/// The header naming the node a message comes from.
pub const NODE_HEADER: &str = "Chatd-Node";
/// The header saying what a message holds: `chat` lines (kept as history)
/// or a `notice` (join, leave, rename; not kept).
pub const KIND_HEADER: &str = "Chatd-Kind";

/// Batches waiting for the cluster task. Past it, batches for other nodes
/// are dropped and counted: local chat never waits for NATS.
const OUTGOING_CAPACITY: usize = 4096;
/// Published batches kept to publish again after a reconnect and to replay
/// to a node that missed some ([`cluster_seq`]).
const BACKLOG_CAPACITY: usize = 4096;
/// How long a lost connection may take to come back (to another server of
/// a NATS cluster, usually within milliseconds) before users are told that
/// other nodes are unreachable. Until then batches are held and published
/// once it is back; after it they are dropped, so nothing comes late.
const HOLD: Duration = Duration::from_secs(2);
/// How long making a replicated stream waits for a JetStream that is still
/// electing its leader; within the callers' own 2 s limits.
const REPLICAS_WAIT: Duration = Duration::from_millis(1500);
/// How long a node waits for another to replay what it missed.
const REPLAY_DEADLINE: Duration = Duration::from_secs(1);
/// The most payload one replay answer carries (NATS's default maximum
/// message is 1 MiB).
const REPLAY_MAX_BYTES: usize = 512 * 1024;
/// How long after a batch is published the node asks its server to
/// confirm it (one marker message covers every batch before it). Longer
/// costs more batches published again after a reconnect (receivers drop
/// them); shorter costs NATS messages: at most one per this per node.
const MARK_AFTER: Duration = Duration::from_secs(1);
/// Messages NATS may queue for one room's subscription before it drops
/// them (and reports a slow consumer) instead of growing.
const SUBSCRIPTION_CAPACITY: usize = 4096;
/// How long a start waits for NATS before `cluster.on_unreachable` decides.
const START_WAIT: Duration = Duration::from_secs(3);
/// How often the client pings NATS: a connection that went silent (a
/// partition rather than a closed socket) is noticed after two missed
/// pongs, so within about twice this.
const PING_INTERVAL: Duration = Duration::from_secs(10);
/// At most one warning about dropped batches per this many milliseconds.
const WARN_EVERY_MS: u64 = 10_000;
/// The header of an admin answer that is an error: the gRPC code (a
/// number); the payload is then the message.
pub const ERROR_HEADER: &str = "Chatd-Error";
/// The gRPC code `INTERNAL`, for an error answer whose code is not a
/// number.
const GRPC_INTERNAL: i32 = 13;
/// How often a node says on `NAME.nodes` that it is there.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// A node not heard for this long is no longer expected to answer (nor
/// named missing).
pub const PRESENCE_TTL: Duration = Duration::from_secs(10);

/// On the wire: the `Chatd-Kind` header and the backlog's byte.
impl Kind {
    fn as_str(self) -> &'static str {
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

    /// As kept in the backlog and sent in a replay.
    fn as_byte(self) -> u8 {
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

/// One message for the other nodes.
#[derive(Debug)]
enum Outgoing {
    /// A batch for a room's subject.
    Room {
        room: Arc<str>,
        payload: Bytes,
        kind: Kind,
    },
    /// A private message (a [`members::PmMsg`]) for a client of `node`:
    /// positioned and kept like a room's batch ([`cluster_seq`]).
    Private { node: Arc<str>, payload: Bytes },
    /// A membership change, for `subject`.
    Direct { subject: String, payload: Bytes },
}

/// The hub's side of the cluster: cheap, synchronous, never blocking.
#[derive(Debug)]
pub struct Link {
    tx: mpsc::Sender<Outgoing>,
    interest: Notify,
    tag: String,
    /// Batches that did not reach NATS (queue full, or NATS unreachable).
    dropped: AtomicU64,
    last_warn_ms: AtomicU64,
    /// Cluster-wide admin; `None` only in unit tests without NATS.
    bus: Option<Bus>,
    /// The nick task ([`nicks`]); `None` only in unit tests without NATS.
    /// Unbounded, yet bounded in practice: a connection has at most one
    /// claim queued (it reads nothing more until it is answered), and a
    /// release follows a nick change or a disconnect.
    nicks: Option<mpsc::UnboundedSender<nicks::Request>>,
    /// Other nodes' clients.
    members: members::Members,
    /// The number of this node's last membership change.
    member_seq: AtomicU64,
    /// `NAME.`; `None` only in unit tests, which publish no membership.
    prefix: Option<String>,
    node_id: Arc<str>,
    /// A node not heard for this long (`cluster.member_silence_secs`,
    /// default three heartbeats) no longer counts in `/who`, `/rooms` and
    /// room counts: a dead node's members are gone within it, at most
    /// 10 s. At most [`PRESENCE_TTL`], because a member list that is
    /// briefly short costs less than an admin call that misses a node.
    member_ttl: Duration,
    /// Requests to load a room's history, for the cluster task; `None`
    /// when `chat.history` is 0 (and in unit tests).
    loads: Option<mpsc::UnboundedSender<(Arc<str>, tokio::sync::oneshot::Sender<()>)>>,
    /// What each room's listener and the private messages' receiver have
    /// handed on, per sending node (for a seamless upgrade).
    receipts: Arc<cluster_seq::Receipts>,
    /// The upgrade's freeze, which the receivers wait out.
    pause: Arc<dyn Pause>,
}

impl Link {
    /// Queues a message for NATS, or drops and counts it. Never waits.
    fn queue(&self, out: Outgoing) {
        if let Err(e) = self.tx.try_send(out) {
            if matches!(e, mpsc::error::TrySendError::Closed(_)) {
                // The cluster task has stopped: the node is shutting down.
                return;
            }
            let total = self.dropped.fetch_add(1, Relaxed) + 1;
            let now = clock::now_ms();
            let last = self.last_warn_ms.load(Relaxed);
            if (last == 0 || now.saturating_sub(last) >= WARN_EVERY_MS)
                && self
                    .last_warn_ms
                    .compare_exchange(last, now.max(1), Relaxed, Relaxed)
                    .is_ok()
            {
                warn!(
                    dropped_total = total,
                    "cluster: the queue to NATS is full; lines for other nodes are dropped"
                );
            }
        }
    }

    fn member_change(&self, set: Vec<(u64, String, String)>, gone: Vec<u64>) {
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
        format!("{}{id}-{}", crate::protocol::GUEST_PREFIX, self.tag)
    }

    /// Asks the nick task; the answer comes later. Without a nick task
    /// (unit tests) the nick is decided on this node alone.
    fn claim_nick(&self, nick: &str, client: ClientId) -> Reply<Claim> {
        let Some(tx) = &self.nicks else {
            return Reply::Now(Claim::Granted);
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        let sent = tx.send(nicks::Request::Claim {
            key: crate::protocol::fold(nick),
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
                key: crate::protocol::fold(nick),
                nick: nick.into(),
                client,
            });
        }
    }

    fn release_nick(&self, nick: &str, client: ClientId) {
        if let Some(tx) = &self.nicks {
            let _ = tx.send(nicks::Request::Release {
                key: crate::protocol::fold(nick),
                client,
            });
        }
    }

    /// Numbered and queued for the other nodes' tables ([`members`]);
    /// called under the hub's `state` lock, so that numbers follow the
    /// order of changes and a snapshot ([`Hub::member_snapshot`]) holds
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
    /// ([`cluster_seq`]).
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

/// Why the node does not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "cannot reach NATS at {urls} within {secs} s and cluster.on_unreachable = \"refuse\": start nats-server, fix cluster.nats_urls, or set cluster.on_unreachable = \"local\""
    )]
    Unreachable { urls: String, secs: u64 },
    #[error("NATS at {urls} refused this node ({source}): check {keys}")]
    Refused {
        urls: String,
        keys: &'static str,
        source: async_nats::ConnectError,
    },
    #[error(transparent)]
    Creds(#[from] nats_options::CredsError),
    #[error("cannot use cluster.nats_urls {urls}: {source}")]
    Connect {
        urls: String,
        source: async_nats::ConnectError,
    },
}

/// A NATS connection made for [`start`], before this node serves anyone
/// through it. Made apart so that a new process taking over from a running
/// one (seamless upgrade) connects while the clients are still served; only
/// [`start`] subscribes and publishes.
pub struct Connected {
    client: async_nats::Client,
    connected: bool,
    state_rx: tokio_watch::Receiver<bool>,
}

impl std::fmt::Debug for Connected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connected")
            .field("connected", &self.connected)
            .finish_non_exhaustive()
    }
}

/// Connects to NATS as `config` says: fails closed on a refusal (credentials,
/// TLS), and on a NATS that does not answer within a few seconds as
/// `cluster.on_unreachable` says.
pub async fn connect(config: &ClusterConfig) -> Result<Connected, ClusterError> {
    let urls = config.nats_urls.join(" ");
    let (state_tx, mut state_rx) = tokio_watch::channel(false);
    let state_tx = Arc::new(state_tx);
    let slow_warned = Arc::new(AtomicU64::new(0));
    let options = || async {
        let options = connect_options(config, state_tx.clone(), slow_warned.clone());
        nats_options::secure(options, config).await
    };
    // One attempt first, to tell a refusal (credentials, TLS: fail closed)
    // from a NATS that is not there (`on_unreachable` decides).
    let first = tokio::time::timeout(
        START_WAIT,
        options().await?.connect(config.nats_urls.clone()),
    )
    .await;
    let (client, connected) = match first {
        Ok(Ok(client)) => (client, true),
        Ok(Err(source)) if nats_options::refusal(&source).is_some() => {
            let keys = nats_options::refusal(&source).map_or("", |r| r.keys(config));
            return Err(ClusterError::Refused { urls, keys, source });
        }
        Ok(Err(_)) | Err(_) => {
            let client = options()
                .await?
                .retry_on_initial_connect()
                .connect(config.nats_urls.clone())
                .await
                .map_err(|source| ClusterError::Connect {
                    urls: urls.clone(),
                    source,
                })?;
            // The retrying client may have got through in the meantime.
            let connected = tokio::time::timeout(START_WAIT, state_rx.wait_for(|c| *c))
                .await
                .is_ok_and(|r| r.is_ok());
            (client, connected)
        }
    };
    if connected {
        info!(node = %config.node_id, nats = %urls, subjects = %format!("{}.room.*.*", config.name), "cluster mode: connected to NATS");
    } else if config.on_unreachable == OnUnreachable::Refuse {
        return Err(ClusterError::Unreachable {
            urls,
            secs: START_WAIT.as_secs(),
        });
    } else {
        warn!(
            node = %config.node_id,
            nats = %urls,
            "cluster mode: NATS unreachable at start; serving this node's users alone \
             (cluster.on_unreachable = \"local\") and joining the cluster when NATS answers"
        );
    }
    Ok(Connected {
        client,
        connected,
        state_rx,
    })
}

/// What the cluster is given by the rest of the daemon, which it knows
/// only through these seams.
pub struct Seams {
    /// Answers other nodes' admin requests on this node.
    pub admin: Arc<dyn AdminHandler>,
    /// Encodes this node's events for the other nodes' watches.
    pub codec: Arc<dyn WatchCodec<crate::hub::Event>>,
    /// The upgrade's freeze.
    pub pause: Arc<dyn Pause>,
    /// The previous process's receiving positions, after a seamless
    /// upgrade; empty otherwise.
    pub inherited: Vec<cluster_seq::StreamReceipts>,
}

/// The running cluster, as [`start`] returns it to the wiring.
#[derive(Debug, Clone)]
pub struct Cluster {
    bus: Bus,
    receipts: Arc<cluster_seq::Receipts>,
}

impl Cluster {
    /// The admin API's way to the other nodes.
    pub fn admin_bus(&self) -> Arc<dyn AdminBus> {
        Arc::new(self.bus.clone())
    }

    /// What every subscribed stream has handed on from each other node,
    /// for a seamless upgrade ([`cluster_seq::Receipts::export`]).
    pub fn receipts(&self) -> Arc<cluster_seq::Receipts> {
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
        prefix: format!("{}.admin.", config.name),
        peers: Arc::default(),
        feed: Default::default(),
        codec: seams.codec,
    };
    let (tx, rx) = mpsc::channel(OUTGOING_CAPACITY);
    let (nicks_tx, nicks_rx) = mpsc::unbounded_channel();
    let per_room = hub.config().chat.history;
    let (loads_tx, loads_rx) = mpsc::unbounded_channel();
    let link = Arc::new(Link {
        tx,
        interest: Notify::new(),
        tag: node_tag(&config.node_id),
        dropped: AtomicU64::new(0),
        last_warn_ms: AtomicU64::new(0),
        bus: Some(bus.clone()),
        nicks: Some(nicks_tx),
        members: members::Members::default(),
        member_seq: AtomicU64::new(0),
        prefix: Some(format!("{}.", config.name)),
        node_id: config.node_id.clone().into(),
        member_ttl: config.timings.member_silence,
        loads: (per_room > 0).then_some(loads_tx),
        receipts: Arc::new(cluster_seq::Receipts::inheriting(&seams.inherited)),
        pause: seams.pause.clone(),
    });
    let handle = Cluster {
        bus: bus.clone(),
        receipts: link.receipts.clone(),
    };
    let nick_task = nicks::Nicks::new(
        client.clone(),
        hub.clone(),
        config.node_id.clone().into(),
        format!("{}_nicks", config.name),
        replicas(config),
        &config.timings,
        seams.pause,
    );
    tokio::spawn(nick_task.run(nicks_rx, state_rx.clone(), shutdown.clone()));
    // Holds the nicks of clients taken over by a seamless upgrade.
    hub.attach_cluster(link.clone());
    tokio::spawn(bans::run(
        client.clone(),
        hub.clone(),
        config.name.clone(),
        replicas(config),
        state_rx.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(members::run(
        client.clone(),
        hub.clone(),
        link.clone(),
        config.node_id.clone().into(),
        config.name.clone(),
        state_rx.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(watch::relay(bus.clone(), hub.clone(), shutdown.clone()));
    tokio::spawn(presence(
        bus,
        format!("{}.nodes", config.name),
        shutdown.clone(),
    ));
    tokio::spawn(serve_admin(
        client.clone(),
        seams.admin,
        config.node_id.clone().into(),
        format!("{}.admin.", config.name),
        shutdown.clone(),
    ));
    let mut epoch = [0u8; 8];
    // A clock-based epoch only if the system has no randomness at all: two
    // starts of a node within a nanosecond are not a concern.
    let epoch = match getrandom::fill(&mut epoch) {
        Ok(()) => u64::from_le_bytes(epoch),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
    };
    let backlog = Arc::new(std::sync::Mutex::new(Backlog::new(epoch, BACKLOG_CAPACITY)));
    tokio::spawn(serve_replay(
        client.clone(),
        backlog.clone(),
        format!("{}.replay.{}", config.name, config.node_id),
        shutdown.clone(),
    ));
    let node = Node {
        client,
        hub,
        link,
        node_id: config.node_id.clone().into(),
        prefix: format!("{}.room.", config.name),
        replay_prefix: format!("{}.replay.", config.name),
        pm_prefix: format!("{}.pm.", config.name),
        name: config.name.clone(),
        rooms: HashMap::new(),
        backlog,
        away: if connected {
            Away::Online
        } else {
            Away::Abandoned { told: false }
        },
        marked: 0,
        mark_at: None,
        history: None,
        per_room,
        history_load: config.timings.history_load,
        history_tried: None,
        replicas: replicas(config),
        shutdown,
    };
    tokio::spawn(node.run(rx, loads_rx, state_rx));
    Ok(handle)
}

/// Replicas for the history stream and the nick and ban buckets: 3 when
/// the node is given three NATS servers or more (a NATS cluster, whose
/// JetStream then keeps nicks, history and bans through the loss of one
/// server), else 1. A node given one URL for a cluster gets one replica
/// (raise it with the `nats` CLI, docs/OPERATIONS.md).
pub fn replicas(config: &ClusterConfig) -> usize {
    if config.nats_urls.len() >= 3 { 3 } else { 1 }
}

/// Creates a JetStream stream. With more than one replica asked, a
/// JetStream still electing its leader (a NATS cluster just started) is
/// asked again for up to [`REPLICAS_WAIT`], and one that cannot place them
/// (not clustered, too few servers with JetStream) gets the stream with
/// one replica, so that nicks, history and bans work on any JetStream.
pub async fn create_stream(
    js: &async_nats::jetstream::Context,
    config: async_nats::jetstream::stream::Config,
) -> Result<async_nats::jetstream::stream::Stream, async_nats::jetstream::context::CreateStreamError>
{
    use async_nats::jetstream::ErrorCode;
    use async_nats::jetstream::context::CreateStreamErrorKind as K;
    let replicas = config.num_replicas;
    let deadline = tokio::time::Instant::now() + REPLICAS_WAIT;
    loop {
        let e = match js.create_stream(config.clone()).await {
            Err(e) if replicas > 1 => e,
            made => return made,
        };
        let code = match e.kind() {
            K::JetStream(err) => Some(err.error_code()),
            _ => None,
        };
        let cannot = code.is_some_and(|c| {
            c == ErrorCode::STREAM_REPLICAS_NOT_SUPPORTED || c == ErrorCode::INSUFFICIENT_RESOURCES
        });
        let not_ready = matches!(e.kind(), K::JetStreamUnavailable | K::TimedOut)
            || code.is_some_and(|c| {
                [
                    ErrorCode::CLUSTER_NOT_AVAILABLE,
                    ErrorCode::CLUSTER_NOT_ACTIVE,
                    ErrorCode::CLUSTER_NOT_LEADER,
                    ErrorCode::CLUSTER_NOT_ASSIGNED,
                ]
                .contains(&c)
            });
        if cannot {
            debug!(error = %e, stream = %config.name, replicas, "cluster: JetStream cannot place the stream's replicas; making it with one");
            return js
                .create_stream(async_nats::jetstream::stream::Config {
                    num_replicas: 1,
                    ..config
                })
                .await;
        }
        if !not_ready || tokio::time::Instant::now() >= deadline {
            return Err(e);
        }
        debug!(error = %e, stream = %config.name, "cluster: JetStream not ready; asking again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The connection's options, credentials and TLS aside: its name, timeouts,
/// and the events that drive `state` (connected or not) and warnings.
fn connect_options(
    config: &ClusterConfig,
    events: Arc<tokio_watch::Sender<bool>>,
    slow_warned: Arc<AtomicU64>,
) -> ConnectOptions {
    let refused_warned = Arc::new(AtomicU64::new(0));
    ConnectOptions::new()
        .name(format!("chatd {}", config.node_id))
        .connection_timeout(START_WAIT)
        .ping_interval(PING_INTERVAL)
        .subscription_capacity(SUBSCRIPTION_CAPACITY)
        .event_callback(move |event| {
            let events = events.clone();
            let slow_warned = slow_warned.clone();
            let refused_warned = refused_warned.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        events.send_replace(true);
                    }
                    async_nats::Event::Disconnected => {
                        events.send_replace(false);
                    }
                    async_nats::Event::SlowConsumer(_) => {
                        // NATS drops what a subscription cannot hold.
                        if warn_due(&slow_warned) {
                            warn!("cluster: messages from other nodes (room lines, or events for a watcher that reads slowly) arrive faster than this node hands them out; some are dropped");
                        }
                    }
                    async_nats::Event::ServerError(async_nats::ServerError::AuthorizationViolation) => {
                        // Only after a start that found NATS away: a start
                        // that reached it stops on a refusal instead.
                        if warn_due(&refused_warned) {
                            warn!("cluster: NATS refuses this node's credentials (cluster.creds_file, cluster.user/password, cluster.token); still serving this node's users alone");
                        }
                    }
                    other => debug!(event = %other, "cluster: NATS event"),
                }
            }
        })
}

/// True at most once per [`WARN_EVERY_MS`] for the same `last` stamp.
fn warn_due(last_ms: &AtomicU64) -> bool {
    let now = clock::now_ms().max(1);
    let last = last_ms.load(Relaxed);
    (last == 0 || now.saturating_sub(last) >= WARN_EVERY_MS)
        && last_ms
            .compare_exchange(last, now, Relaxed, Relaxed)
            .is_ok()
}

/// The cluster task's state.
struct Node {
    client: async_nats::Client,
    hub: Hub,
    link: Arc<Link>,
    node_id: Arc<str>,
    /// `NAME.room.`
    prefix: String,
    /// `NAME.replay.`
    replay_prefix: String,
    /// `NAME.pm.`
    pm_prefix: String,
    /// `cluster.name`.
    name: String,
    /// One subscription task per room with local members.
    rooms: HashMap<Arc<str>, RoomSub>,
    /// What this node published lately; shared with [`serve_replay`].
    backlog: Arc<std::sync::Mutex<Backlog>>,
    away: Away,
    /// The last sequence a confirmation marker was sent for.
    marked: u64,
    /// When to send the next marker: set by a publish, cleared by a marker.
    mark_at: Option<tokio::time::Instant>,
    /// The history stream, once opened (`chat.history` > 0 and JetStream
    /// there).
    history: Option<async_nats::jetstream::stream::Stream>,
    /// `chat.history`: the batches the stream keeps per room.
    per_room: usize,
    /// `cluster.history_load_ms`: how long a history load may take.
    history_load: Duration,
    /// When opening the stream was last tried.
    history_tried: Option<std::time::Instant>,
    /// Replicas for the history stream ([`replicas`]).
    replicas: usize,
    shutdown: CancellationToken,
}

/// The cluster task's view of the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Away {
    /// Batches are published as they come.
    Online,
    /// Lost since `since`: batches are held for [`HOLD`], to be published
    /// when it is back.
    Reconnecting { since: tokio::time::Instant },
    /// Lost for longer (or never reached): batches are dropped. `told`:
    /// users were told, and are told again when it is back.
    Abandoned { told: bool },
}

/// A room's subscription task, and the way to ask it for the room's
/// history.
struct RoomSub {
    stop: CancellationToken,
    loads: mpsc::UnboundedSender<tokio::sync::oneshot::Sender<()>>,
}

impl Node {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Outgoing>,
        mut loads: mpsc::UnboundedReceiver<(Arc<str>, tokio::sync::oneshot::Sender<()>)>,
        mut state: tokio_watch::Receiver<bool>,
    ) {
        if self.away == Away::Online {
            self.open_history().await;
        }
        // Rooms may have members already (none in practice: start runs
        // before the listeners serve).
        self.reconcile();
        let mut connected = self.away == Away::Online;
        let mut dropped_at_loss = 0;
        // Markers come back through this node's own subscription: once
        // one has, the server has every batch published before it.
        let marks = self.client.new_inbox();
        let mut confirms = match self.client.subscribe(marks.clone()).await {
            Ok(sub) => Some(sub),
            Err(e) => {
                warn!(error = %e, "cluster: cannot subscribe to confirmations; batches are published again after every reconnect");
                None
            }
        };
        loop {
            let hold_until = match self.away {
                Away::Reconnecting { since } => Some(since + HOLD),
                _ => None,
            };
            tokio::select! {
                () = self.shutdown.cancelled() => break,
                out = rx.recv() => match out {
                    Some(out) => self.publish(out).await,
                    None => break,
                },
                Some(msg) = next_confirm(confirms.as_mut()) => {
                    if let Some(seq) = std::str::from_utf8(&msg.payload).ok().and_then(|s| s.parse().ok()) {
                        self.lock_backlog().confirm(seq);
                    }
                }
                () = self.link.interest.notified() => self.reconcile(),
                () = sleep_until(self.mark_at) => self.mark(&marks).await,
                () = sleep_until(hold_until) => {
                    let given_up = self.lock_backlog().abandon() as u64;
                    self.link.dropped.fetch_add(given_up, Relaxed);
                    self.away = Away::Abandoned { told: true };
                    let told = self.hub.notice_rooms(
                        "Other chat nodes are unreachable; chat on this node goes on.",
                    );
                    warn!(told, "cluster: NATS lost; serving this node's users alone until it is back");
                }
                // Disabled once no sender is left (`chat.history` = 0).
                Some((room, reply)) = loads.recv() => {
                    if self.history.is_none() && connected {
                        self.open_history().await;
                    }
                    // Without NATS or the stream, the room's history is this
                    // node's: the joining client goes on at once.
                    if self.history.is_none() || !connected {
                        let _ = reply.send(());
                        continue;
                    }
                    // The room is wanted now (a client waits to join it):
                    // its subscription exists after this.
                    self.reconcile();
                    match self.rooms.get(&room) {
                        Some(sub) => {
                            if let Err(e) = sub.loads.send(reply) {
                                let _ = e.0.send(());
                            }
                        }
                        None => {
                            let _ = reply.send(());
                        }
                    }
                }
                changed = state.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let now = *state.borrow_and_update();
                    if now == connected {
                        continue;
                    }
                    connected = now;
                    if connected {
                        self.back(&marks, dropped_at_loss).await;
                        self.open_history().await;
                    } else if self.away == Away::Online {
                        dropped_at_loss = self.link.dropped();
                        self.away = Away::Reconnecting { since: tokio::time::Instant::now() };
                        debug!("cluster: NATS connection lost; holding batches while reconnecting");
                    }
                }
            }
        }
        for (_, sub) in self.rooms.drain() {
            sub.stop.cancel();
        }
        // Sends what is already queued; a lost NATS does not hold up exit.
        let _ = tokio::time::timeout(Duration::from_secs(1), self.client.flush()).await;
    }

    /// NATS is (back) there: publishes what the old server had not
    /// confirmed and what was held meanwhile, in order (receivers drop what
    /// they already have), and says so as the outage deserves.
    async fn back(&mut self, marks: &str, dropped_at_loss: u64) {
        let was = std::mem::replace(&mut self.away, Away::Online);
        let again = self.lock_backlog().unconfirmed();
        let republished = again.len();
        for (pos, entry) in again {
            self.send_entry(&entry.room, pos, entry.kind, entry.payload)
                .await;
        }
        self.mark(marks).await;
        match was {
            Away::Abandoned { told: true } => {
                let lost = self.link.dropped().saturating_sub(dropped_at_loss);
                let told = self
                    .hub
                    .notice_rooms("Other chat nodes are reachable again.");
                info!(
                    told,
                    dropped_while_away = lost,
                    "cluster: NATS is back; rooms span nodes again"
                );
            }
            Away::Abandoned { told: false } => {
                info!("cluster: connected to NATS; rooms span nodes");
            }
            Away::Reconnecting { since } => {
                let took_ms = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX);
                info!(
                    republished,
                    took_ms, "cluster: reconnected to NATS within the hold; nothing dropped"
                );
            }
            Away::Online => {}
        }
    }

    fn lock_backlog(&self) -> std::sync::MutexGuard<'_, Backlog> {
        self.backlog.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks the server to send back the last sequence given out: when it
    /// comes back, the server has every batch published before it.
    async fn mark(&mut self, inbox: &str) {
        self.mark_at = None;
        let last = self.lock_backlog().last();
        if last <= self.marked || self.away != Away::Online {
            return;
        }
        self.marked = last;
        if let Err(e) = self
            .client
            .publish(inbox.to_string(), Bytes::from(last.to_string()))
            .await
        {
            debug!(error = %e, "cluster: cannot send a confirmation marker");
        }
    }

    /// Gives a batch its position and publishes it; while NATS is
    /// reconnecting it is only kept (published when it is back), and once
    /// NATS has been away longer than [`HOLD`] it is dropped and counted:
    /// lines are not queued for a reconnect that may come much later.
    async fn publish(&mut self, out: Outgoing) {
        let (key, payload, kind) = match out {
            Outgoing::Room {
                room,
                payload,
                kind,
            } => (room, payload, kind.as_byte()),
            Outgoing::Private { node, payload } => (
                Arc::from(cluster_seq::private_stream(&node)),
                payload,
                cluster_seq::PRIVATE_KIND,
            ),
            Outgoing::Direct { subject, payload } => {
                // Membership changes are not held: a node that misses a
                // change asks for a snapshot.
                if self.away != Away::Online || self.client.connection_state() != State::Connected {
                    self.link.dropped.fetch_add(1, Relaxed);
                    return;
                }
                if let Err(e) = self.client.publish(subject, payload).await {
                    self.link.dropped.fetch_add(1, Relaxed);
                    debug!(error = %e, "cluster: publish failed");
                }
                return;
            }
        };
        if matches!(self.away, Away::Abandoned { .. }) {
            self.link.dropped.fetch_add(1, Relaxed);
            return;
        }
        let (pos, evicted) = self.lock_backlog().push(&key, kind, payload.clone());
        if self.away == Away::Online {
            // An unconfirmed batch pushed out of a full backlog was
            // published: it only loses its second chance.
            self.send_entry(&key, pos, kind, payload).await;
            self.mark_at
                .get_or_insert_with(|| tokio::time::Instant::now() + MARK_AFTER);
        } else if evicted {
            // Held too many while reconnecting: the oldest never went out.
            self.link.dropped.fetch_add(1, Relaxed);
        }
    }

    /// Opens the history stream, once, when `chat.history` > 0.
    async fn open_history(&mut self) {
        if self.per_room == 0 || self.history.is_some() {
            return;
        }
        // Not more often than this: where JetStream is off, every join
        // would otherwise hold up this task.
        if self
            .history_tried
            .is_some_and(|t| t.elapsed() < Duration::from_secs(30))
        {
            return;
        }
        self.history_tried = Some(std::time::Instant::now());
        let js = async_nats::jetstream::new(self.client.clone());
        self.history = history::open_stream(&js, &self.name, self.per_room, self.replicas).await;
    }

    /// Publishes one backlog entry: a room's batch ([`Node::send`]) or a
    /// private message, on `NAME.pm.NODE` with this node's id and the
    /// message's position (the receiver drops repeats and asks for what
    /// it missed, see [`members`]).
    async fn send_entry(&self, key: &str, pos: Position, kind: u8, payload: Bytes) {
        if kind != cluster_seq::PRIVATE_KIND {
            let kind = Kind::from_byte(kind).unwrap_or(Kind::Notice);
            return self.send(key, pos, kind, payload).await;
        }
        let Some(node) = key.strip_prefix("pm.") else {
            return;
        };
        let mut headers = HeaderMap::new();
        headers.insert(NODE_HEADER, &*self.node_id);
        headers.insert(SEQ_HEADER, pos.header().as_str());
        let subject = format!("{}{node}", self.pm_prefix);
        if let Err(e) = self
            .client
            .publish_with_headers(subject, headers, payload)
            .await
        {
            debug!(error = %e, "cluster: publish failed");
        }
    }

    /// Publishes one batch on `NAME.room.ROOM.KIND`. A failure leaves it
    /// unconfirmed in the backlog, so it goes again after the reconnect.
    /// A chat batch's id ([`history::ID_HEADER`]) is its position: the
    /// same when it is published again or replayed, so that the history
    /// stream stores it once (`Nats-Msg-Id`) and a room that loaded it
    /// from the stream does not hand it on again.
    async fn send(&self, room: &str, pos: Position, kind: Kind, payload: Bytes) {
        let mut headers = HeaderMap::new();
        headers.insert(NODE_HEADER, &*self.node_id);
        headers.insert(KIND_HEADER, kind.as_str());
        headers.insert(SEQ_HEADER, pos.header().as_str());
        if kind == Kind::Chat {
            let id = history::batch_id(&self.node_id, pos.epoch, pos.seq);
            headers.insert(history::ID_HEADER, id.as_str());
            headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
        }
        let subject = format!("{}{}.{}", self.prefix, room, kind.as_str());
        if let Err(e) = self
            .client
            .publish_with_headers(subject, headers, payload)
            .await
        {
            debug!(error = %e, "cluster: publish failed");
        }
    }

    /// Subscribes to every room with local members and drops the
    /// subscriptions of rooms without any.
    fn reconcile(&mut self) {
        let wanted = self.hub.occupied_rooms();
        let mut backlog = self.backlog.lock().unwrap_or_else(|p| p.into_inner());
        self.rooms.retain(|room, sub| {
            let keep = wanted.contains(room);
            if !keep {
                sub.stop.cancel();
                backlog.forget_room(room);
                debug!(%room, "cluster: unsubscribed");
            }
            keep
        });
        drop(backlog);
        for room in wanted {
            if self.rooms.contains_key(&room) {
                continue;
            }
            let token = self.shutdown.child_token();
            let (loads_tx, loads) = mpsc::unbounded_channel();
            self.rooms.insert(
                room.clone(),
                RoomSub {
                    stop: token.clone(),
                    loads: loads_tx,
                },
            );
            tokio::spawn(listen(
                Listener {
                    client: self.client.clone(),
                    hub: self.hub.clone(),
                    receipts: self.link.receipts.clone(),
                    pause: self.link.pause.clone(),
                    node_id: self.node_id.clone(),
                    subject: format!("{}{}", self.prefix, room),
                    replay_prefix: self.replay_prefix.clone(),
                    room,
                    history: self.history.clone(),
                    per_room: self.per_room,
                    history_load: self.history_load,
                },
                loads,
                token,
            ));
        }
    }
}

/// What a room's subscription task needs.
struct Listener {
    client: async_nats::Client,
    hub: Hub,
    receipts: Arc<cluster_seq::Receipts>,
    pause: Arc<dyn Pause>,
    node_id: Arc<str>,
    /// `NAME.room.ROOM`; chat batches on `.chat`, notices on `.notice`.
    subject: String,
    replay_prefix: String,
    room: Arc<str>,
    history: Option<async_nats::jetstream::stream::Stream>,
    per_room: usize,
    history_load: Duration,
}

/// One room's subscription: hands every batch from another node to the
/// hub until `stop`, and loads the room's history from the stream when a
/// joining client asks (see [`history`]). Dropping the subscriber
/// unsubscribes.
async fn listen(
    l: Listener,
    mut loads: mpsc::UnboundedReceiver<tokio::sync::oneshot::Sender<()>>,
    stop: CancellationToken,
) {
    let Listener {
        client,
        hub,
        receipts,
        pause,
        node_id,
        subject,
        replay_prefix,
        room,
        history,
        per_room,
        history_load,
    } = l;
    let mut sub = match client.subscribe(format!("{subject}.*")).await {
        Ok(sub) => sub,
        Err(e) => {
            warn!(%subject, error = %e, "cluster: cannot subscribe; this room hears only this node");
            return;
        }
    };
    // A round trip: once it returns, NATS holds the subscription, and every
    // line published from now on reaches this node. Bounded, so that a
    // client waiting for the room's history never waits on a lost NATS.
    tokio::select! {
        () = stop.cancelled() => return,
        flushed = tokio::time::timeout(START_WAIT, client.flush()) => if matches!(flushed, Ok(Ok(()))) {
            debug!(%room, "cluster: subscribed");
        },
    }
    let chat_subject = format!("{subject}.chat");
    // The last position handed on per sender ([`cluster_seq`]), carried on
    // from the previous process after a seamless upgrade.
    let seen = receipts.open(&room);
    let _close = CloseReceipts(&receipts, &room, seen.clone());
    // Ids of the batches the last history load read: the same batches may
    // be waiting in the subscription (or come in a replay), and are not
    // handed on twice. An id is its batch's position, so a batch the
    // stream held counts as handed on for [`Seen`] too.
    let mut loaded: std::collections::HashSet<String> = std::collections::HashSet::new();
    loop {
        let msg = tokio::select! {
            () = stop.cancelled() => break,
            Some(reply) = loads.recv() => {
                if let Some(stream) = &history {
                    let (batches, ids) = history::fetch(stream, &chat_subject, per_room, history_load).await;
                    debug!(%room, batches = batches.len(), "cluster: room history loaded");
                    let batches: Vec<(Bytes, usize)> = batches
                        .into_iter()
                        .filter_map(|b| well_formed(&b).map(|lines| (b, lines)))
                        .collect();
                    hub.replace_history(&room, &batches);
                    loaded = ids;
                }
                let _ = reply.send(());
                continue;
            }
            msg = sub.next() => match msg {
                Some(msg) => msg,
                None => break,
            },
        };
        let Some(headers) = &msg.headers else {
            continue;
        };
        let Some(from) = headers.get(NODE_HEADER).map(|f| f.as_str().to_string()) else {
            continue;
        };
        if from == *node_id {
            continue;
        }
        // `NAME.room.ROOM.chat` or `.notice`.
        let Some(kind) = msg.subject.rsplit('.').next().and_then(Kind::parse) else {
            continue;
        };
        let Some(lines) = well_formed(&msg.payload) else {
            debug!(%subject, "cluster: ignored a malformed message");
            continue;
        };
        // A message without a position (none that chatd sends) is handed
        // on as it is.
        let pos = headers
            .get(SEQ_HEADER)
            .and_then(|p| Position::parse(p.as_str()));
        let verdict = pos.map(|pos| crate::lock::lock(&seen).check(&from, pos));
        let mut missed = Vec::new();
        match (verdict, pos) {
            (Some(Verdict::Duplicate), _) => continue,
            (Some(Verdict::Gap { after }), Some(pos)) => {
                let subject = format!("{replay_prefix}{from}");
                missed = tokio::select! {
                    () = stop.cancelled() => return,
                    missed = replay(&client, subject, &room, after, pos.seq) => missed,
                };
                debug!(%room, node = %from, after, got = missed.len(), "cluster: replayed missed batches");
            }
            _ => {}
        }
        let handed = unless_frozen(&*pause, &seen, |seen| {
            for (kind, seq, batch) in missed {
                if kind == Kind::Chat
                    && pos
                        .is_some_and(|pos| loaded.remove(&history::batch_id(&from, pos.epoch, seq)))
                {
                    continue;
                }
                if let Some(lines) = well_formed(&batch) {
                    hub.deliver_remote(&room, batch, lines, kind);
                }
            }
            if let Some(pos) = pos {
                seen.record(&from, pos);
            }
            let in_history = kind == Kind::Chat
                && !loaded.is_empty()
                && headers
                    .get(history::ID_HEADER)
                    .is_some_and(|id| loaded.remove(id.as_str()));
            if !in_history {
                hub.deliver_remote(&room, msg.payload.clone(), lines, kind);
            }
        })
        .await;
        if handed.is_none() {
            return;
        }
    }
}

/// Runs `hand_on` with a stream's `seen` locked, once no upgrade has the
/// clients frozen: what a stream has handed on is then exactly what an
/// upgrade reads ([`cluster_seq::Receipts`]). `None` when an upgrade
/// committed meanwhile: the new process asks the senders for the rest.
pub(crate) async fn unless_frozen<T>(
    pause: &dyn Pause,
    seen: &std::sync::Mutex<Seen>,
    hand_on: impl FnOnce(&mut Seen) -> T,
) -> Option<T> {
    loop {
        {
            let mut seen = crate::lock::lock(seen);
            if !pause.is_frozen() {
                return Some(hand_on(&mut seen));
            }
        }
        if pause.settled().await {
            return None;
        }
    }
}

/// Forgets a room's receiving position when its listener ends.
struct CloseReceipts<'a>(
    &'a cluster_seq::Receipts,
    &'a str,
    Arc<std::sync::Mutex<Seen>>,
);

impl Drop for CloseReceipts<'_> {
    fn drop(&mut self) {
        self.0.close(self.1, &self.2);
    }
}

/// Asks `subject` (a node's replay service) for the batches of `room`
/// after `after` and before `before`, in order, with their sequences;
/// nothing when it does not
/// answer within [`REPLAY_DEADLINE`] (it may be gone with them).
async fn replay(
    client: &async_nats::Client,
    subject: String,
    room: &str,
    after: u64,
    before: u64,
) -> Vec<(Kind, u64, Bytes)> {
    replay_raw(client, subject, room, after, before)
        .await
        .into_iter()
        .filter_map(|(kind, seq, batch)| Some((Kind::from_byte(kind)?, seq, batch)))
        .collect()
}

/// [`replay`] of any backlog stream (a room, or the private messages for
/// a node, [`cluster_seq::private_stream`]), with the kind bytes as kept.
pub(crate) async fn replay_raw(
    client: &async_nats::Client,
    subject: String,
    room: &str,
    after: u64,
    before: u64,
) -> Vec<(u8, u64, Bytes)> {
    let asked = client.request(subject, cluster_seq::replay_request(room, after));
    let answer = match tokio::time::timeout(REPLAY_DEADLINE, asked).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => {
            debug!(error = %e, %room, "cluster: no replay");
            return Vec::new();
        }
        Err(_) => {
            debug!(%room, "cluster: no replay in time");
            return Vec::new();
        }
    };
    cluster_seq::decode_replay(answer.payload)
        .unwrap_or_default()
        .into_iter()
        .filter(|(_, seq, _)| *seq < before)
        .collect()
}

/// Answers other nodes' replay requests on `NAME.replay.NODE` from this
/// node's backlog until `stop`.
async fn serve_replay(
    client: async_nats::Client,
    backlog: Arc<std::sync::Mutex<Backlog>>,
    subject: String,
    stop: CancellationToken,
) {
    let mut sub = match client.subscribe(subject.clone()).await {
        Ok(sub) => sub,
        Err(e) => {
            warn!(%subject, error = %e, "cluster: cannot subscribe; other nodes cannot recover lines they miss from this one");
            return;
        }
    };
    while let Some(msg) = next_or_stop(&mut sub, &stop).await {
        let Some(reply) = msg.reply else { continue };
        let Some((room, after)) = cluster_seq::parse_replay_request(&msg.payload) else {
            continue;
        };
        let answer =
            backlog
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .replay(room, after, REPLAY_MAX_BYTES);
        if let Err(e) = client.publish(reply, answer).await {
            debug!(error = %e, "cluster: cannot answer a replay request");
        }
    }
}

/// The next confirmation marker, or never when there is no subscription.
async fn next_confirm(sub: Option<&mut async_nats::Subscriber>) -> Option<async_nats::Message> {
    match sub {
        Some(sub) => sub.next().await,
        None => std::future::pending().await,
    }
}

/// Sleeps until `at`, or forever when there is none.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The subscription's next message, or `None` once it ends or `stop` is
/// cancelled.
async fn next_or_stop(
    sub: &mut async_nats::Subscriber,
    stop: &CancellationToken,
) -> Option<async_nats::Message> {
    tokio::select! {
        () = stop.cancelled() => None,
        msg = sub.next() => msg,
    }
}

/// Cluster-wide admin: scatters a request to every node's
/// `NAME.admin.OP` and gathers the answers.
#[derive(Debug, Clone)]
pub struct Bus {
    client: async_nats::Client,
    node_id: Arc<str>,
    /// `NAME.admin.`
    prefix: String,
    /// When each other node was last heard on `NAME.nodes` (presence).
    peers: Arc<std::sync::Mutex<HashMap<String, std::time::Instant>>>,
    /// Other nodes' events for this node's watches.
    feed: watch::Feed,
    /// How this node's events look to the other nodes' watches.
    codec: watch::Codec,
}

/// The admin service scatters through the seam: the wiring hands it a bus
/// only in cluster mode ([`Cluster::admin_bus`]). The nodes that count as there
/// are those heard on `NAME.nodes` within [`PRESENCE_TTL`].
impl AdminBus for Bus {
    fn node_id(&self) -> &str {
        Bus::node_id(self)
    }

    fn gather<'a>(
        &'a self,
        op: &'a str,
        payload: Bytes,
        done: &'a (dyn Fn(&Answer) -> bool + Send + Sync),
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Gathered, GatherError>> + Send + 'a>,
    > {
        Box::pin(Bus::gather(self, op, payload, done))
    }

    fn watch<'a>(&'a self, messages: bool) -> BoxFuture<'a, Result<Watching, String>> {
        Box::pin(async move {
            let (remote, gathered) = watch::Remote::open(self, messages).await?;
            Ok((Box::new(remote) as Box<dyn RemoteEvents>, gathered))
        })
    }
}

impl Bus {
    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The NATS connection, for admin streams that are not one request
    /// (`WatchEvents`, [`watch`]).
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The other nodes' events, shared by this node's watches.
    pub fn feed(&self) -> &watch::Feed {
        &self.feed
    }

    /// How this node's events look to the other nodes' watches.
    pub fn codec(&self) -> &watch::Codec {
        &self.codec
    }

    /// The admin subject `NAME.admin.REST`.
    pub fn subject(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    /// Sends `payload` to every node's `NAME.admin.OP` (this one included)
    /// and gathers answers until [`ADMIN_DEADLINE`], or sooner once `done`
    /// says the answers so far settle the request (a kick found its
    /// client). Never waits longer than the deadline.
    pub async fn gather(
        &self,
        op: &str,
        payload: Bytes,
        done: impl Fn(&Answer) -> bool,
    ) -> Result<Gathered, GatherError> {
        if self.client.connection_state() != State::Connected {
            return Err(GatherError::Unreachable);
        }
        let nats = |e: &dyn std::fmt::Display| GatherError::Nats(e.to_string());
        let inbox = self.client.new_inbox();
        let mut replies = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| nats(&e))?;
        self.client
            .publish_with_reply(format!("{}{op}", self.prefix), inbox, payload)
            .await
            .map_err(|e| nats(&e))?;
        let deadline = tokio::time::Instant::now() + ADMIN_DEADLINE;
        let mut expected = self.live_peers();
        expected.push(self.node_id.to_string());
        let mut waiting: std::collections::BTreeSet<String> = expected.into_iter().collect();
        let mut answers = Vec::new();
        while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, replies.next()).await {
            let Some(headers) = &msg.headers else {
                continue;
            };
            let Some(node) = headers.get(NODE_HEADER) else {
                continue;
            };
            let result = match headers.get(ERROR_HEADER) {
                None => Ok(msg.payload),
                Some(code) => Err((
                    code.as_str().parse().unwrap_or(GRPC_INTERNAL),
                    String::from_utf8_lossy(&msg.payload).into_owned(),
                )),
            };
            let answer = Answer {
                node: node.as_str().to_string(),
                result,
            };
            let enough = done(&answer);
            waiting.remove(&answer.node);
            answers.push(answer);
            // Every node known to be there has answered: no need to wait
            // out the deadline.
            if enough || waiting.is_empty() {
                break;
            }
        }
        Ok(Gathered {
            answers,
            missing: waiting.into_iter().collect(),
        })
    }

    /// Other nodes heard within `ttl` (at most [`PRESENCE_TTL`]).
    pub fn peers_within(&self, ttl: Duration) -> Vec<String> {
        let now = std::time::Instant::now();
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers
            .iter()
            .filter(|(_, seen)| now.duration_since(**seen) < ttl)
            .map(|(node, _)| node.clone())
            .collect()
    }

    /// Other nodes heard within [`PRESENCE_TTL`].
    pub fn live_peers(&self) -> Vec<String> {
        let now = std::time::Instant::now();
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.retain(|_, seen| now.duration_since(*seen) < PRESENCE_TTL);
        peers.keys().cloned().collect()
    }
}

/// Presence: says on `NAME.nodes` that this node is there, at start and
/// every [`HEARTBEAT`], and records the other nodes heard there; a node
/// heard for the first time is greeted back at once, so two nodes know of
/// each other within a round trip of the later one starting.
async fn presence(bus: Bus, subject: String, stop: CancellationToken) {
    let mut sub = match bus.client.subscribe(subject.clone()).await {
        Ok(sub) => sub,
        Err(e) => {
            warn!(%subject, error = %e, "cluster: cannot subscribe; admin calls wait out their deadline");
            return;
        }
    };
    let say = |bus: &Bus| {
        let client = bus.client.clone();
        let subject = subject.clone();
        let payload = Bytes::from(bus.node_id.to_string());
        async move {
            if let Err(e) = client.publish(subject, payload).await {
                debug!(error = %e, "cluster: cannot send presence");
            }
        }
    };
    let mut tick = tokio::time::interval(HEARTBEAT);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => say(&bus).await,
            msg = sub.next() => {
                let Some(msg) = msg else { break };
                let Ok(node) = std::str::from_utf8(&msg.payload) else { continue };
                if node == &*bus.node_id || node.is_empty() {
                    continue;
                }
                let new = bus
                    .peers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(node.to_string(), std::time::Instant::now())
                    .is_none();
                if new {
                    debug!(node, "cluster: a node is there");
                    say(&bus).await;
                }
            }
        }
    }
}

/// Answers every admin request on `NAME.admin.*` through `handler` (this
/// node alone) until `stop`; each in its own task, as a ban writes a file.
async fn serve_admin(
    client: async_nats::Client,
    handler: Arc<dyn AdminHandler>,
    node_id: Arc<str>,
    prefix: String,
    stop: CancellationToken,
) {
    let subject = format!("{prefix}*");
    let mut sub = match client.subscribe(subject.clone()).await {
        Ok(sub) => sub,
        Err(e) => {
            warn!(%subject, error = %e, "cluster: cannot subscribe; admin calls through other nodes will miss this node");
            return;
        }
    };
    while let Some(msg) = next_or_stop(&mut sub, &stop).await {
        let Some(reply) = msg.reply.clone() else {
            continue;
        };
        let Some(op) = msg
            .subject
            .strip_prefix(prefix.as_str())
            .map(str::to_string)
        else {
            continue;
        };
        let (client, handler, node_id) = (client.clone(), handler.clone(), node_id.clone());
        tokio::spawn(async move {
            let mut headers = HeaderMap::new();
            headers.insert(NODE_HEADER, &*node_id);
            let payload = match handler.answer(&node_id, &op, msg.payload).await {
                Ok(payload) => payload,
                Err((code, message)) => {
                    headers.insert(ERROR_HEADER, code.to_string().as_str());
                    Bytes::from(message)
                }
            };
            if let Err(e) = client.publish_with_headers(reply, headers, payload).await {
                debug!(error = %e, %op, "cluster: cannot answer an admin request");
            }
        });
    }
}

/// The number of lines in `payload` when it is what a chatd node publishes:
/// whole `\r\n`-ended lines, each starting with a prefix chatd writes
/// (`<`, `*`, `[`), valid UTF-8 with no other control character. Anything else on the
/// subject is not passed on to users.
pub fn well_formed(payload: &[u8]) -> Option<usize> {
    let body = payload.strip_suffix(b"\n")?;
    let mut lines = 0;
    for line in body.split(|&b| b == b'\n') {
        let text = line.strip_suffix(b"\r")?;
        let clean = matches!(text.first(), Some(b'<' | b'*' | b'['))
            && std::str::from_utf8(text).is_ok_and(|t| !t.chars().any(char::is_control));
        if !clean {
            return None;
        }
        lines += 1;
    }
    Some(lines)
}

#[cfg(test)]
mod tests {
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
            crate::config::RawConfig::default()
                .validate()
                .expect("defaults"),
        )
    }

    fn peer(n: u8) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, n], 40000 + u16::from(n)))
    }

    fn drain(client: &crate::hub::Client) -> String {
        let mut q = std::collections::VecDeque::new();
        client.outbox.take(&mut q);
        let n: usize = q.iter().map(|b| b.len()).sum();
        client.outbox.written(n, usize::MAX);
        q.iter().map(|b| String::from_utf8_lossy(b)).collect()
    }

    fn link(capacity: usize) -> (Arc<Link>, mpsc::Receiver<Outgoing>) {
        let (tx, rx) = mpsc::channel(capacity);
        let link = Link {
            tx,
            interest: Notify::new(),
            tag: node_tag("web1"),
            dropped: AtomicU64::new(0),
            last_warn_ms: AtomicU64::new(0),
            bus: None,
            nicks: None,
            members: members::Members::default(),
            member_seq: AtomicU64::new(0),
            prefix: None,
            node_id: "web1".into(),
            member_ttl: Duration::from_secs(6),
            loads: None,
            receipts: Arc::default(),
            pause: Arc::new(crate::cluster_state::NeverPaused),
        };
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
        hub.leave(&a, &crate::disconnect::Disconnect::Closed);
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
