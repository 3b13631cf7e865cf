//! The hub: who is connected, which rooms exist, and every fan-out.
//!
//! All delivery goes through the hub's methods ([`Hub::publish`],
//! [`Hub::private`], [`Hub::broadcast`], the notices sent by [`Hub::join`] and
//! [`Hub::leave`]): that is the one seam where a multi-node backend can take
//! over. The operations the admin API exposes (list, get, kick, broadcast,
//! rooms, stats, bans) are methods here too, so they are tested without
//! gRPC. The hub enforces bans at connect; [`crate::bans`] keeps the list.
//!
//! The hub holds what is local: this node's clients, their outboxes, rooms
//! and members. What all nodes share (nicks, members on other nodes,
//! history, admin across nodes) it asks of a [`ClusterState`], the same
//! calls on one node ([`SingleNode`]) and in a cluster (NATS), so the hub
//! reads the same in both. Two operations may need an answer from
//! elsewhere: a nick change ([`Hub::request_nick`]) and a join of a room
//! that has no member on this node yet ([`Hub::request_join`], which loads
//! the room's history). They return a channel to wait on instead of
//! blocking; the connection waits without reading further lines. On one
//! node they decide at once.
//!
//! Locking: the control plane (connect, join, nick, leave) takes the `state`
//! mutex and then, when needed, one room's member lock. The hot path
//! ([`Hub::publish`]) takes only the room's read lock and each recipient's
//! outbox lock, briefly, and never waits on a socket: pushing to an outbox
//! is non-blocking. No lock is ever held across an `.await`.
//!
//! Here: the [`Hub`] handle, its state, connect and leave. Beside it:
//! `seat` (every accepted connection's place under the limits, from accept
//! to registration and leave), `client` (clients, nicks), `room` (rooms,
//! join, history), `fanout` (every delivery and the notices), `admin` (the
//! admin operations), `reap` (deadlines), `handoff` (the hub's part of a
//! seamless upgrade).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use tokio::sync::broadcast;

use crate::bans::{Ban, BanError, Bans};
use crate::clock;
use crate::cluster_state::{Claim, ClusterState, Kind, Reply, SingleNode};
use crate::disconnect::Disconnect;
use crate::grid::{Grid, Period};
use crate::lock::{lock, read, write};
use crate::outbox::{Outbox, Push};
use crate::stats::{Stats, StatsSnapshot};
use chatd_config::{Config, Limits};
use chatd_text::protocol::{self, users};
use chatd_text::rate::TokenBucket;
use chatd_text::sanitize;

/// Why a new connection is refused. The text is sent to it as one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("server is full ({}), try again later", protocol::count(*.0 as u64, "client", "clients"))]
    Full(usize),
    #[error("too many connections from your address (max {0})")]
    PerIp(usize),
    #[error("too many new connections from your address, slow down")]
    TooFast,
    #[error("server is shutting down")]
    ShuttingDown,
    /// A seamless upgrade is freezing this process: the connection waits
    /// in the front door for its outcome (handed over, or registered once
    /// this process resumes). Never shown to a plain client.
    #[error("server is being upgraded, please reconnect")]
    Upgrading,
    #[error("you are banned: {0}")]
    Banned(String),
}

/// Errors of the operations the admin API exposes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HubError {
    #[error("no client {0}")]
    NoSuchClient(Target),
    #[error("no room {0:?}")]
    NoSuchRoom(String),
    #[error("{0}")]
    Invalid(String),
}

/// A client named by an operator: by id, or by nick (nicks never start with
/// a digit, so a number is always an id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Id(ClientId),
    Nick(String),
}

impl Target {
    pub fn parse(s: &str) -> Target {
        match s.parse() {
            Ok(id) => Target::Id(id),
            Err(_) => Target::Nick(s.to_string()),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Id(id) => write!(f, "with id {id}"),
            Target::Nick(n) => write!(f, "with nick {n:?}"),
        }
    }
}

/// What happened, for live watchers (the admin API's `WatchEvents`).
#[derive(Debug, Clone)]
pub enum Event {
    Connect {
        id: ClientId,
        nick: Arc<str>,
        peer: SocketAddr,
    },
    Disconnect {
        id: ClientId,
        nick: Arc<str>,
        reason: Disconnect,
    },
    Nick {
        id: ClientId,
        old: Arc<str>,
        new: Arc<str>,
    },
    Join {
        id: ClientId,
        nick: Arc<str>,
        room: Arc<str>,
    },
    Part {
        id: ClientId,
        nick: Arc<str>,
        room: Arc<str>,
    },
    Kick {
        id: ClientId,
        nick: Arc<str>,
        reason: String,
    },
    Broadcast {
        room: Option<String>,
        text: String,
        reached: usize,
    },
    /// A chat line; only while someone watches messages.
    Message {
        id: ClientId,
        nick: Arc<str>,
        /// `None` for a private message.
        room: Option<Arc<str>>,
        /// The recipient of a private message.
        to: Option<Arc<str>>,
        text: String,
        action: bool,
    },
    Ban {
        ban: Ban,
        kicked: usize,
    },
    Unban {
        target: String,
    },
}

#[derive(Debug, Default)]
struct State {
    clients: HashMap<ClientId, Arc<Client>>,
    /// Folded nick → client.
    nicks: HashMap<String, ClientId>,
    rooms: HashMap<Arc<str>, Arc<Room>>,
    /// Seats per address group ([`Hub::address_group`]): connections in
    /// the front door whose address is known, and registered clients.
    per_ip: HashMap<IpAddr, usize>,
    /// Seats taken: every accepted connection until it ends (`seat`).
    seats: usize,
    /// Descriptors the seats cost.
    files: usize,
    closing: bool,
    /// The descriptors the process's file limit leaves for chat
    /// connections; see [`Hub::set_fd_capacity`].
    fd_capacity: Option<usize>,
}

#[derive(Debug)]
struct Shared {
    config: ArcSwap<Config>,
    state: Mutex<State>,
    stats: Stats,
    next_id: AtomicU64,
    /// Registrations are refused ([`Refusal::Upgrading`]) while set: a
    /// seamless upgrade is taking this process's clients, and counts them
    /// under the state lock after setting it.
    upgrading: AtomicBool,
    started: Instant,
    events: broadcast::Sender<Event>,
    bans: Bans,
    /// Watchers that asked for message events; while 0, the hot path skips
    /// building them.
    message_watchers: AtomicU64,
    /// Rooms holding back notices, summed up by [`Hub::flush_notices`].
    notices_due: Mutex<Vec<Arc<Room>>>,
    connect_rate: Mutex<ConnectRate>,
    /// The state shared with other nodes, set once at start in cluster
    /// mode; unset, it is [`SingleNode`] (see [`Hub::cluster`]).
    cluster: OnceLock<Arc<dyn ClusterState>>,
}

/// The per-address connection rate (`limits.connect_rate_per_ip`): one token
/// bucket per address group ([`Hub::address_group`]). Full buckets are
/// forgotten, which bounds the map by the addresses that connected within
/// the last few seconds.
#[derive(Debug, Default)]
struct ConnectRate {
    buckets: HashMap<IpAddr, TokenBucket>,
    last_prune: Option<Instant>,
}

/// Most addresses remembered at once; past it the map is pruned at once.
const CONNECT_RATE_MAX_ADDRS: usize = 65_536;

/// A cheap handle to the hub; clone it freely.
#[derive(Debug, Clone)]
pub struct Hub {
    shared: Arc<Shared>,
}

/// How many events a watcher may fall behind before it is told it missed some.
const EVENT_BUFFER: usize = 1024;
/// Longest list of names `/who` prints before summarising.
const WHO_MAX: usize = 50;

impl Hub {
    /// A hub with no bans; they will be saved under `server.state_dir`.
    pub fn new(config: Config) -> Hub {
        let bans = Bans::empty(&config.server.state_dir);
        Hub::with_bans(config, bans)
    }

    /// A hub enforcing `bans` (loaded by the caller, which reports a bad
    /// bans file before serving anyone).
    pub fn with_bans(config: Config, bans: Bans) -> Hub {
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        Hub {
            shared: Arc::new(Shared {
                config: ArcSwap::from_pointee(config),
                state: Mutex::new(State::default()),
                stats: Stats::default(),
                next_id: AtomicU64::new(1),
                upgrading: AtomicBool::new(false),
                started: Instant::now(),
                events,
                bans,
                message_watchers: AtomicU64::new(0),
                notices_due: Mutex::new(Vec::new()),
                connect_rate: Mutex::new(ConnectRate::default()),
                cluster: OnceLock::new(),
            }),
        }
    }

    /// Puts this hub in cluster mode: from now on it asks `cluster` for
    /// what all nodes share. Call once, before serving; a second call is
    /// ignored. Clients taken over by a seamless upgrade keep their nicks:
    /// the previous process of this node held them under the same node and
    /// client ids, so `cluster` goes on holding them and no other node can
    /// take one across the handoff.
    pub fn attach_cluster(&self, cluster: Arc<dyn ClusterState>) {
        if self.shared.cluster.set(cluster).is_err() {
            return;
        }
        let cluster = self.cluster();
        for c in self.clients(None, None) {
            if !c.nick.starts_with(protocol::GUEST_PREFIX) {
                cluster.hold_nick(&c.nick, c.id);
            }
        }
    }

    /// The state shared with the other nodes: the one attached at start in
    /// cluster mode, else this node alone ([`SingleNode`]).
    #[inline]
    pub fn cluster(&self) -> &dyn ClusterState {
        match self.shared.cluster.get() {
            Some(cluster) => cluster.as_ref(),
            None => &SingleNode,
        }
    }

    pub fn config(&self) -> Arc<Config> {
        self.shared.config.load_full()
    }

    /// Applies a new configuration; connections read limits on each use.
    pub fn set_config(&self, config: Config) {
        self.shared.config.store(Arc::new(config));
    }

    pub fn limits(&self) -> Limits {
        self.shared.config.load().limits.clone()
    }

    /// `limits.outbound_queue_bytes`, read without cloning the limits.
    pub fn queue_limit(&self) -> usize {
        self.shared.config.load().limits.outbound_queue_bytes
    }

    /// `chat.write_coalesce_ms`, read without cloning the config.
    pub fn write_coalesce(&self) -> Duration {
        self.shared.config.load().chat.write_coalesce
    }

    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.shared.events.subscribe()
    }

    fn emit(&self, event: Event) {
        // No receiver is the normal case, not an error.
        let _ = self.shared.events.send(event);
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.shared.state)
    }

    /// Makes the client registering in a seat, under `state`'s lock.
    fn add_client(
        &self,
        state: &mut State,
        peer: SocketAddr,
        tls: bool,
        group: IpAddr,
        files: usize,
    ) -> Arc<Client> {
        let id = self.shared.next_id.fetch_add(1, Relaxed);
        // In cluster mode the node's tag keeps guest nicks of different
        // nodes apart.
        let mut nick = self.cluster().guest_nick(id);
        // A guest nick can only be taken by another guest with the same id,
        // which cannot exist; the loop is a guard, not a hot path.
        while state.nicks.contains_key(&protocol::fold(&nick)) {
            nick.push('_');
        }
        let client = Arc::new(Client {
            id,
            peer,
            tls,
            connected_at: SystemTime::now(),
            outbox: Outbox::new(),
            names: Mutex::new(Names {
                nick: nick.as_str().into(),
                room: None,
            }),
            lines_in: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            last_line_ms: AtomicU64::new(clock::now_ms()),
            partial_since_ms: AtomicU64::new(0),
            renamed: AtomicBool::new(false),
            group,
            files,
        });
        state.nicks.insert(protocol::fold(&nick), id);
        state.clients.insert(id, client.clone());
        self.shared.stats.connected(state.clients.len());
        client
    }

    /// Whether a new connection from `ip` is within
    /// `limits.connect_rate_per_ip`; counts it if so, and counts a refusal
    /// if not.
    pub fn admit_connection(&self, ip: IpAddr) -> bool {
        let Some(limit) = self.shared.config.load().limits.connect_rate else {
            return true;
        };
        let ip = self.address_group(ip);
        let now = Instant::now();
        let mut rate = lock(&self.shared.connect_rate);
        let stale = rate
            .last_prune
            .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(10));
        if stale || rate.buckets.len() >= CONNECT_RATE_MAX_ADDRS {
            rate.buckets
                .retain(|_, b| !b.is_full(limit.per_sec, limit.burst, now));
            rate.last_prune = Some(now);
        }
        let admitted = rate
            .buckets
            .entry(ip)
            .or_insert_with(|| TokenBucket::new(limit.burst, now))
            .try_take(limit.per_sec, limit.burst, now);
        drop(rate);
        if !admitted {
            self.shared.stats.refused.fetch_add(1, Relaxed);
        }
        admitted
    }

    /// Whether `ip` is one of `chat.trusted_proxies`.
    pub fn is_trusted_proxy(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.shared
            .config
            .load()
            .chat
            .trusted_proxies
            .iter()
            .any(|net| net.contains(&ip))
    }

    /// Caps the descriptors chat connections may cost (one each, three for
    /// a TLS client) below what `max_clients` says when the process may not
    /// open that many files: past the cap a connection is refused with the
    /// usual one line instead of meeting `EMFILE`.
    pub fn set_fd_capacity(&self, capacity: usize) {
        self.state().fd_capacity = Some(capacity);
    }

    /// Shutdown has begun: refuses new registrations and asks every
    /// connection to close.
    pub fn close(&self) {
        let mut state = self.state();
        state.closing = true;
        for client in state.clients.values() {
            client.outbox.close(Disconnect::Shutdown);
        }
    }

    /// Refuses (`true`) or admits again (`false`) new registrations, for a
    /// seamless upgrade's freeze: once set, the client count read under the
    /// state lock is final.
    pub fn set_upgrading(&self, upgrading: bool) {
        self.shared
            .upgrading
            .store(upgrading, std::sync::atomic::Ordering::SeqCst);
    }

    /// Unregisters `client` for good: leaves its room (others see `reason`)
    /// and frees its nick.
    pub fn leave(&self, client: &Arc<Client>, reason: &Disconnect) {
        let mut state = self.state();
        if state.clients.remove(&client.id).is_none() {
            return;
        }
        let room = lock(&client.names).room.take();
        let parted =
            room.and_then(|room| self.part_locked(&mut state, client, &room, Some(reason)));
        let nick = client.nick();
        state.nicks.remove(&protocol::fold(&nick));
        self.release_nick(client, &nick);
        self.cluster().member_gone(client.id);
        state.vacate(Some(client.group), client.files);
        self.shared.stats.disconnected(reason);
        drop(state);
        if let Some((room, text)) = parted {
            self.room_notice(&room, client.id, NoticeKind::Leave, &text);
        }
        self.emit(Event::Disconnect {
            id: client.id,
            nick,
            reason: reason.clone(),
        });
    }
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

mod admin;
mod client;
mod fanout;
pub mod handoff;
mod reap;
mod room;
mod seat;

pub use client::*;
pub use fanout::*;
pub use reap::*;
pub use room::*;
pub use seat::*;

#[cfg(test)]
mod tests;

/// A room's grid ticks at `chat.write_coalesce_ms`, as it is now.
impl Period for Hub {
    fn period(&self) -> Duration {
        self.write_coalesce()
    }
}
