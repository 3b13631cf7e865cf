//! The hub: who is connected, which rooms exist, and every fan-out.
//!
//! All delivery goes through the hub's methods ([`Hub::publish`],
//! [`Hub::private`], [`Hub::broadcast`], the notices sent by [`Hub::join`] and
//! [`Hub::leave`]): that is the one seam where a multi-node backend can take
//! over. The operations the admin API exposes (list, get, kick, broadcast,
//! rooms, stats, bans) are methods here too, so they are tested without
//! gRPC. The hub enforces bans at connect; [`crate::bans`] keeps the list.
//!
//! In cluster mode two operations may need an answer from NATS: a nick
//! change ([`Hub::request_nick`]) and a join of a room that has no member on
//! this node yet ([`Hub::request_join`], which loads the room's history).
//! They return a channel to wait on instead of blocking; the connection
//! waits without reading further lines. On one node they decide at once.
//!
//! Locking: the control plane (connect, join, nick, leave) takes the `state`
//! mutex and then, when needed, one room's member lock. The hot path
//! ([`Hub::publish`]) takes only the room's read lock and each recipient's
//! outbox lock, briefly, and never waits on a socket: pushing to an outbox
//! is non-blocking. No lock is ever held across an `.await`.

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
use crate::cluster::{Kind, Link};
use crate::config::{Config, Limits};
use crate::disconnect::Disconnect;
use crate::lock::{lock, read, write};
use crate::outbox::{Outbox, Push};
use crate::protocol::{self, users};
use crate::rate::TokenBucket;
use crate::sanitize;
use crate::stats::{Stats, StatsSnapshot};

pub type ClientId = u64;

/// What one pass of [`Hub::reap`] closed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reaped {
    pub idle: usize,
    pub partial: usize,
    pub stalled: usize,
}

impl Reaped {
    pub fn total(&self) -> usize {
        self.idle + self.partial + self.stalled
    }
}

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

/// A connected client as the rest of the daemon sees it. Its connection task
/// owns the socket; everyone else reaches it through its [`Outbox`].
#[derive(Debug)]
pub struct Client {
    pub id: ClientId,
    pub peer: SocketAddr,
    /// Whether the client came through the TLS listener.
    pub tls: bool,
    pub connected_at: SystemTime,
    pub outbox: Outbox,
    names: Mutex<Names>,
    pub lines_in: AtomicU64,
    pub bytes_in: AtomicU64,
    /// When the client last sent a complete line ([`clock::now_ms`]): bytes
    /// that never make a line do not keep a connection alive.
    last_line_ms: AtomicU64,
    /// Since when the client has been in the middle of a line
    /// ([`clock::now_ms`]), 0 when it is not: a partial line has its own
    /// deadline, so a byte a minute cannot hold a connection forever.
    partial_since_ms: AtomicU64,
    /// Set when the hub renamed the client behind its connection's back
    /// (cluster mode: its nick was held by another node); the connection
    /// then re-reads its nick.
    renamed: AtomicBool,
}

#[derive(Debug)]
struct Names {
    nick: Arc<str>,
    room: Option<Arc<Room>>,
}

impl Client {
    pub fn nick(&self) -> Arc<str> {
        lock(&self.names).nick.clone()
    }

    pub fn room(&self) -> Option<Arc<Room>> {
        lock(&self.names).room.clone()
    }

    /// Whether the hub renamed this client since the last call; the
    /// connection then re-reads [`Client::nick`].
    pub fn take_renamed(&self) -> bool {
        self.renamed.load(Relaxed) && self.renamed.swap(false, Relaxed)
    }

    /// Records input: called once per read, not per line. Only complete
    /// lines count as activity.
    pub fn record_input(&self, lines: u64, bytes: u64) {
        self.lines_in.fetch_add(lines, Relaxed);
        self.bytes_in.fetch_add(bytes, Relaxed);
        if lines > 0 {
            self.last_line_ms.store(clock::now_ms(), Relaxed);
        }
    }

    /// Records whether the client is in the middle of a line; called only
    /// when that changes.
    pub fn set_mid_line(&self, mid_line: bool) {
        let since = if mid_line { clock::now_ms() } else { 0 };
        self.partial_since_ms.store(since, Relaxed);
    }

    /// Queues a server line for this client alone.
    pub fn notice(&self, text: &str, limit: usize) -> Push {
        self.outbox.push(server_line(text), limit)
    }

    pub fn info(&self) -> ClientInfo {
        let names = lock(&self.names);
        let (lines_out, bytes_out) = self.outbox.totals();
        ClientInfo {
            id: self.id,
            nick: names.nick.to_string(),
            peer: self.peer,
            tls: self.tls,
            room: names
                .room
                .as_ref()
                .map(|r| r.name.to_string())
                .unwrap_or_default(),
            connected_at_ms: unix_ms(self.connected_at),
            last_active_ms: clock::to_unix_ms(self.last_line_ms.load(Relaxed)),
            lines_in: self.lines_in.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
            lines_out,
            bytes_out,
            queued_bytes: self.outbox.owed() as u64,
        }
    }
}

/// A snapshot of one client, for the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    pub id: ClientId,
    pub nick: String,
    pub peer: SocketAddr,
    pub tls: bool,
    pub room: String,
    pub connected_at_ms: u64,
    pub last_active_ms: u64,
    pub lines_in: u64,
    pub bytes_in: u64,
    pub lines_out: u64,
    pub bytes_out: u64,
    pub queued_bytes: u64,
}

/// A snapshot of one room, for the admin API and `/rooms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomInfo {
    pub name: String,
    pub members: usize,
    pub messages: u64,
}

#[derive(Debug)]
pub struct Room {
    pub name: Arc<str>,
    members: RwLock<Vec<Arc<Client>>>,
    history: Mutex<VecDeque<Bytes>>,
    messages: AtomicU64,
    notices: Mutex<NoticeGate>,
    /// A member that is behind but still reading, if any: every sender of
    /// the room pauses before its next read until it drains (flow control,
    /// see [`crate::outbox`]). Checking before reading, not only after
    /// publishing, is what keeps many senders from overrunning a reader
    /// with one batch each. `has_congested` is the hot path's cheap look.
    congested: Mutex<Option<Arc<Client>>>,
    has_congested: AtomicBool,
    /// Cluster mode: whether the room's cluster-wide history has been
    /// loaded since the room last had no member here.
    loaded: AtomicBool,
    /// Cluster mode: clients waiting for that load to join the room; while
    /// there are some, the room is kept and subscribed.
    waiting: AtomicUsize,
}

/// A room's budget of join/leave/rename notices: at most
/// `limits.room_notices_per_sec` go out as they happen; the rest are counted
/// and summed up in one line a second later ([`Hub::flush_notices`]). So
/// churn, whatever its rate or its number of addresses, costs each member at
/// most that many lines a second.
#[derive(Debug)]
struct NoticeGate {
    window: Instant,
    sent: u32,
    joined: u32,
    left: u32,
    renamed: u32,
    /// Whether this room is in the hub's list of rooms with a summary due.
    due: bool,
}

/// Which kind of room notice, for the summary of those held back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NoticeKind {
    Join,
    Leave,
    Rename,
}

impl Room {
    fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            members: RwLock::new(Vec::new()),
            history: Mutex::new(VecDeque::new()),
            messages: AtomicU64::new(0),
            congested: Mutex::new(None),
            has_congested: AtomicBool::new(false),
            loaded: AtomicBool::new(false),
            waiting: AtomicUsize::new(0),
            notices: Mutex::new(NoticeGate {
                window: Instant::now(),
                sent: 0,
                joined: 0,
                left: 0,
                renamed: 0,
                due: false,
            }),
        }
    }

    pub fn len(&self) -> usize {
        read(&self.members).len()
    }

    /// The member every sender should wait for before reading, if any.
    pub fn congested_member(&self) -> Option<Arc<Client>> {
        if !self.has_congested.load(Relaxed) {
            return None;
        }
        lock(&self.congested).clone()
    }

    fn mark_congested(&self, member: &Arc<Client>) {
        let mut congested = lock(&self.congested);
        if congested.is_none() {
            *congested = Some(member.clone());
            self.has_congested.store(true, Relaxed);
        }
    }

    /// Forgets `member` as the room's congested member (it drained, stopped
    /// reading, or left).
    pub fn clear_congested(&self, member: &Client) {
        let mut congested = lock(&self.congested);
        if congested.as_ref().is_some_and(|c| c.id == member.id) {
            *congested = None;
            self.has_congested.store(false, Relaxed);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn info(&self) -> RoomInfo {
        RoomInfo {
            name: self.name.to_string(),
            members: self.len(),
            messages: self.messages.load(Relaxed),
        }
    }

    /// Keeps the last `keep` lines of `batch` (whole `\r\n`-ended lines).
    /// They are copied, in one allocation, so that history never pins a
    /// large batch in memory.
    fn remember(&self, batch: &Bytes, lines: usize, keep: usize) {
        self.messages.fetch_add(lines as u64, Relaxed);
        self.keep(batch, lines, keep);
    }

    /// Keeps the last `keep` lines of `batch` as history, as `remember`
    /// does, without counting them as messages.
    fn keep(&self, batch: &Bytes, lines: usize, keep: usize) {
        if keep == 0 {
            return;
        }
        let take = lines.min(keep);
        let mut ends = Vec::with_capacity(take + 1);
        let mut end = batch.len();
        ends.push(end);
        while ends.len() <= take && end > 0 {
            // Each line ends in "\r\n": find the end of the line before it.
            end = memchr::memrchr(b'\n', &batch[..end - 1]).map_or(0, |p| p + 1);
            ends.push(end);
        }
        let start = end;
        let tail = Bytes::copy_from_slice(&batch[start..]);
        let mut history = lock(&self.history);
        for pair in ends.windows(2).rev() {
            if history.len() == keep {
                history.pop_front();
            }
            history.push_back(tail.slice(pair[1] - start..pair[0] - start));
        }
    }
}

#[derive(Debug, Default)]
struct State {
    clients: HashMap<ClientId, Arc<Client>>,
    /// Folded nick → client.
    nicks: HashMap<String, ClientId>,
    rooms: HashMap<Arc<str>, Arc<Room>>,
    per_ip: HashMap<IpAddr, usize>,
    closing: bool,
    /// The most clients the process's file limit allows; see
    /// [`Hub::set_fd_capacity`].
    fd_capacity: Option<usize>,
}

#[derive(Debug)]
struct Shared {
    config: ArcSwap<Config>,
    state: Mutex<State>,
    stats: Stats,
    next_id: AtomicU64,
    started: Instant,
    events: broadcast::Sender<Event>,
    bans: Bans,
    /// Watchers that asked for message events; while 0, the hot path skips
    /// building them.
    message_watchers: AtomicU64,
    /// Rooms holding back notices, summed up by [`Hub::flush_notices`].
    notices_due: Mutex<Vec<Arc<Room>>>,
    connect_rate: Mutex<ConnectRate>,
    /// The way to other nodes, set once at start in cluster mode; unset,
    /// the hub is exactly the single-node hub.
    cluster: OnceLock<Arc<Link>>,
    /// The freeze of a seamless upgrade (see [`crate::handoff`]).
    handoff: crate::handoff::Gate,
}

/// The per-address connection rate (`limits.connect_rate_per_ip`): one token
/// bucket per address. Full buckets are forgotten, which bounds the map by
/// the addresses that connected within the last few seconds.
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
                started: Instant::now(),
                events,
                bans,
                message_watchers: AtomicU64::new(0),
                notices_due: Mutex::new(Vec::new()),
                connect_rate: Mutex::new(ConnectRate::default()),
                cluster: OnceLock::new(),
                handoff: crate::handoff::Gate::default(),
            }),
        }
    }

    /// Puts this hub in cluster mode: room lines and notices also go to
    /// `link`, and guest nicks carry the node's tag. Call once, before
    /// serving; a second call is ignored.
    pub fn attach_cluster(&self, link: Arc<Link>) {
        let _ = self.shared.cluster.set(link);
    }

    /// The link to the other nodes, in cluster mode (the admin service
    /// gathers through it).
    pub fn cluster(&self) -> Option<&Arc<Link>> {
        self.shared.cluster.get()
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

    /// Registers a new plain connection, or says why it is refused.
    pub fn connect(&self, peer: SocketAddr) -> Result<Arc<Client>, Refusal> {
        self.connect_with(peer, false)
    }

    /// Registers a new connection from `peer` (its real address), which
    /// came through TLS or not; or says why it is refused.
    pub fn connect_with(&self, peer: SocketAddr, tls: bool) -> Result<Arc<Client>, Refusal> {
        let limits = self.limits();
        if let Some(ban) = self.shared.bans.check(peer.ip()) {
            self.shared.stats.refused.fetch_add(1, Relaxed);
            return Err(Refusal::Banned(ban.reason_text().to_string()));
        }
        let mut state = self.state();
        if state.closing {
            return Err(Refusal::ShuttingDown);
        }
        let max_clients = state
            .fd_capacity
            .map_or(limits.max_clients, |cap| cap.min(limits.max_clients));
        if state.clients.len() >= max_clients {
            self.shared.stats.refused.fetch_add(1, Relaxed);
            return Err(Refusal::Full(max_clients));
        }
        let from_ip = state.per_ip.entry(peer.ip()).or_default();
        if *from_ip >= limits.max_clients_per_ip {
            self.shared.stats.refused.fetch_add(1, Relaxed);
            return Err(Refusal::PerIp(limits.max_clients_per_ip));
        }
        *from_ip += 1;
        let id = self.shared.next_id.fetch_add(1, Relaxed);
        // In cluster mode the node's tag keeps guest nicks of different
        // nodes apart.
        let mut nick = match self.cluster() {
            Some(link) => format!("guest-{id}-{}", link.tag()),
            None => format!("guest-{id}"),
        };
        // A guest nick can only be taken by another guest with the same id,
        // which cannot exist; the loop is a guard, not a hot path.
        while state.nicks.contains_key(&protocol::fold(&nick)) {
            nick.push('_');
        }
        let now = SystemTime::now();
        let client = Arc::new(Client {
            id,
            peer,
            tls,
            connected_at: now,
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
        });
        state.nicks.insert(protocol::fold(&nick), id);
        state.clients.insert(id, client.clone());
        self.shared.stats.connected(state.clients.len());
        drop(state);
        self.emit(Event::Connect {
            id,
            nick: nick.into(),
            peer,
        });
        Ok(client)
    }

    /// Whether a new connection from `ip` is within
    /// `limits.connect_rate_per_ip`; counts it if so, and counts a refusal
    /// if not.
    pub fn admit_connection(&self, ip: IpAddr) -> bool {
        let Some(limit) = self.limits().connect_rate else {
            return true;
        };
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

    /// Caps the number of clients below what `max_clients` says when the
    /// process may not open that many files: past the cap a client is
    /// refused with the usual one line instead of meeting `EMFILE`.
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

    /// Closes every client that sent no complete line for
    /// `limits.idle_timeout`, sat in the middle of a line for
    /// `limits.partial_line_timeout`, or owed bytes without reading any for
    /// `limits.slow_consumer_timeout`; returns how many. Run periodically by
    /// the server, so that these deadlines cost no timer per connection.
    pub fn reap(&self) -> Reaped {
        let limits = self.limits();
        let now = clock::now_ms();
        let before =
            |limit: Option<Duration>| limit.map(|l| now.saturating_sub(l.as_millis() as u64));
        let idle_cutoff = before(limits.idle_timeout);
        let partial_cutoff = before(limits.partial_line_timeout);
        let clients: Vec<Arc<Client>> = self.state().clients.values().cloned().collect();
        let mut reaped = Reaped::default();
        for c in clients {
            if idle_cutoff.is_some_and(|cut| c.last_line_ms.load(Relaxed) <= cut) {
                reaped.idle += usize::from(c.outbox.close(Disconnect::Idle));
                continue;
            }
            let partial = c.partial_since_ms.load(Relaxed);
            if partial != 0 && partial_cutoff.is_some_and(|cut| partial <= cut) {
                reaped.partial += usize::from(c.outbox.close(Disconnect::PartialLine));
                continue;
            }
            if let Some(stall) = limits.slow_consumer_timeout
                && c.outbox.stalled_for().is_some_and(|d| d >= stall)
                && c.outbox.close(Disconnect::SlowConsumer)
            {
                tracing::warn!(client = c.id, peer = %c.peer, owed = c.outbox.owed(), "slow consumer: read nothing for too long, disconnecting");
                reaped.stalled += 1;
            }
        }
        reaped
    }

    /// Moves `client` into `room` (leaving its current one), tells both
    /// rooms, and sends the client its room line and the room's history.
    ///
    /// Order, for the joining client: every line of the old room published
    /// before it left, then the room line, then the history, then live lines
    /// of the new room — each line exactly once. The room line and history
    /// are queued under the new room's member lock, which
    /// [`Hub::publish`] holds (shared) across both delivery and
    /// remembering: a line is either remembered before the snapshot or
    /// delivered live after it, never both, never neither.
    pub fn join(&self, client: &Arc<Client>, room: &str) -> Arc<Room> {
        let config = self.config();
        let limit = config.limits.outbound_queue_bytes;
        // Members on other nodes (cluster mode), counted in the notices.
        let remote = self.remote_count(room);
        let mut state = self.state();
        let old = lock(&client.names).room.clone();
        let mut parted = None;
        if let Some(old) = &old {
            if *old.name == *room {
                drop(state);
                client.notice(&format!("You are already in {room}."), limit);
                return old.clone();
            }
            parted = self.part_locked(&mut state, client, old, None);
        }
        let target = state
            .rooms
            .entry(room.into())
            .or_insert_with(|| Arc::new(Room::new(room)))
            .clone();
        let nick = {
            let mut names = lock(&client.names);
            names.room = Some(target.clone());
            names.nick.clone()
        };
        let count = {
            let mut members = write(&target.members);
            let count = members.len() + 1 + remote;
            client.notice(&format!("You are now in {room} ({}).", users(count)), limit);
            if let Some(block) = history_block(&lock(&target.history), room, limit) {
                client.outbox.push(block, limit);
            }
            members.push(client.clone());
            count
        };
        if let Some(link) = self.cluster() {
            if target.len() == 1 {
                link.interest_changed();
            }
            link.member_set(client.id, &nick, room);
        }
        drop(state);
        if let Some((old, text)) = parted {
            self.room_notice(&old, client.id, NoticeKind::Leave, &text);
        }
        if count <= config.limits.room_notice_max {
            let text = format!("{nick} joined {room} ({})", users(count));
            self.room_notice(&target, client.id, NoticeKind::Join, &text);
        }
        self.emit(Event::Join {
            id: client.id,
            nick,
            room: target.name.clone(),
        });
        target
    }

    /// Starts moving `client` into `room`: at once (as [`Hub::join`]) on one
    /// node or when the room's history is here already; in cluster mode,
    /// when the room has no member on this node yet, once its cluster-wide
    /// history is loaded: the caller waits for `done`, then calls
    /// [`Hub::finish_join`] (or [`Hub::cancel_join`] if it goes away).
    pub fn request_join(&self, client: &Arc<Client>, room: &str) -> JoinRequest {
        let Some(link) = self.cluster().filter(|l| l.keeps_history()) else {
            return JoinRequest::Done(self.join(client, room));
        };
        let waiting = {
            let mut state = self.state();
            let here = lock(&client.names)
                .room
                .as_ref()
                .is_some_and(|r| *r.name == *room);
            let target = state
                .rooms
                .entry(room.into())
                .or_insert_with(|| Arc::new(Room::new(room)))
                .clone();
            if here || target.loaded.load(Relaxed) {
                None
            } else {
                target.waiting.fetch_add(1, Relaxed);
                Some(target)
            }
        };
        let Some(target) = waiting else {
            return JoinRequest::Done(self.join(client, room));
        };
        match link.load_history(room) {
            Some(done) => JoinRequest::Wait { room: target, done },
            None => JoinRequest::Done(self.finish_join(client, &target)),
        }
    }

    /// Joins the room [`Hub::request_join`] waited for.
    pub fn finish_join(&self, client: &Arc<Client>, room: &Arc<Room>) -> Arc<Room> {
        let joined = self.join(client, &room.name);
        room.waiting.fetch_sub(1, Relaxed);
        joined
    }

    /// A client waiting to join `room` went away.
    pub fn cancel_join(&self, room: &Arc<Room>) {
        let mut state = self.state();
        if room.waiting.fetch_sub(1, Relaxed) == 1
            && room.is_empty()
            && *room.name != *self.config().chat.default_room
            && state
                .rooms
                .get(&room.name)
                .is_some_and(|r| Arc::ptr_eq(r, room))
        {
            state.rooms.remove(&room.name);
            drop(state);
            if let Some(link) = self.cluster() {
                link.interest_changed();
            }
        }
    }

    /// Cluster mode: `batches` (whole lines, oldest first) are `room`'s
    /// cluster-wide history; they replace what this node kept. Under the
    /// room's member lock, as a join's snapshot: a joiner sees either the
    /// old history or this one.
    pub fn replace_history(&self, room: &str, batches: &[Bytes]) {
        let Some(room) = self.state().rooms.get(room).cloned() else {
            return;
        };
        let keep = self.config().chat.history;
        let _members = write(&room.members);
        lock(&room.history).clear();
        for batch in batches {
            if let Some(lines) = crate::cluster::well_formed(batch) {
                room.keep(batch, lines, keep);
            }
        }
        room.loaded.store(true, Relaxed);
    }

    /// Removes `client` from `room` under the state lock, and drops the room
    /// when it empties (except the default room). Returns the leave notice
    /// to send once the lock is released, if one is due.
    fn part_locked(
        &self,
        state: &mut State,
        client: &Arc<Client>,
        room: &Arc<Room>,
        reason: Option<&Disconnect>,
    ) -> Option<(Arc<Room>, String)> {
        let remaining = {
            let mut members = write(&room.members);
            if let Some(pos) = members.iter().position(|m| m.id == client.id) {
                members.swap_remove(pos);
            }
            members.len()
        };
        if remaining == 0 {
            // Unsubscribed from now on (cluster mode): its history goes
            // stale, and is loaded again for the next member.
            room.loaded.store(false, Relaxed);
        }
        if remaining == 0
            && let Some(link) = self.cluster()
        {
            link.interest_changed();
        }
        room.clear_congested(client);
        let nick = client.nick();
        let config = self.config();
        let total = remaining + self.remote_count(&room.name);
        if remaining == 0
            && room.waiting.load(Relaxed) == 0
            && *room.name != *config.chat.default_room
        {
            state.rooms.remove(&room.name);
        }
        self.emit(Event::Part {
            id: client.id,
            nick: nick.clone(),
            room: room.name.clone(),
        });
        // At shutdown everyone leaves at once: notices would be O(n²) noise.
        // With members left on other nodes only, the notice is for them.
        if total >= config.limits.room_notice_max
            || total == 0
            || reason == Some(&Disconnect::Shutdown)
        {
            return None;
        }
        let text = match reason {
            Some(r) => format!("{nick} left {} ({}): {r}", room.name, users(total)),
            None => format!("{nick} left {} ({})", room.name, users(total)),
        };
        Some((room.clone(), text))
    }

    /// Sends a join/leave/rename notice to `room` (all but `from`) if the
    /// room's notice budget allows; otherwise counts it for the summary.
    fn room_notice(&self, room: &Arc<Room>, from: ClientId, kind: NoticeKind, text: &str) {
        let per_sec = self.shared.config.load().limits.room_notices_per_sec;
        {
            let mut gate = lock(&room.notices);
            let now = Instant::now();
            if now.saturating_duration_since(gate.window) >= Duration::from_secs(1) {
                gate.window = now;
                gate.sent = 0;
            }
            if gate.sent >= per_sec {
                match kind {
                    NoticeKind::Join => gate.joined += 1,
                    NoticeKind::Leave => gate.left += 1,
                    NoticeKind::Rename => gate.renamed += 1,
                }
                if !gate.due {
                    gate.due = true;
                    lock(&self.shared.notices_due).push(room.clone());
                }
                return;
            }
            gate.sent += 1;
        }
        let line = server_line(text);
        self.fan_out(room, from, &line, self.queue_limit());
        if let Some(link) = self.cluster() {
            link.offer(&room.name, &line, Kind::Notice);
        }
    }

    /// Sends each room that held notices back one line summing them up. Run
    /// once a second by the server.
    pub fn flush_notices(&self) {
        let due = std::mem::take(&mut *lock(&self.shared.notices_due));
        let config = self.config();
        for room in due {
            let (joined, left, renamed) = {
                let mut gate = lock(&room.notices);
                gate.due = false;
                (
                    std::mem::take(&mut gate.joined),
                    std::mem::take(&mut gate.left),
                    std::mem::take(&mut gate.renamed),
                )
            };
            let members = room.len();
            if members == 0 || members > config.limits.room_notice_max {
                continue;
            }
            let mut parts = Vec::new();
            if joined > 0 {
                parts.push(format!("{joined} joined"));
            }
            if left > 0 {
                parts.push(format!("{left} left"));
            }
            if renamed > 0 {
                parts.push(format!("{renamed} changed nick"));
            }
            if parts.is_empty() {
                continue;
            }
            let text = format!(
                "{} in {} in the last second ({})",
                parts.join(", "),
                room.name,
                users(members)
            );
            let line = server_line(&text);
            self.fan_out(&room, 0, &line, config.limits.outbound_queue_bytes);
            if let Some(link) = self.cluster() {
                link.offer(&room.name, &line, Kind::Notice);
            }
        }
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
        if let Some(link) = self.cluster() {
            link.member_gone(client.id);
        }
        if let Some(n) = state.per_ip.get_mut(&client.peer.ip()) {
            *n -= 1;
            if *n == 0 {
                state.per_ip.remove(&client.peer.ip());
            }
        }
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

    /// Starts a nick change: on one node it is decided at once (as by
    /// [`Hub::rename`]); in cluster mode, once the nick passes this node's
    /// checks, the cluster is asked and the caller waits for the answer,
    /// then calls [`Hub::rename`] (or [`Hub::release_nick`] when it no
    /// longer wants it).
    pub fn request_nick(&self, client: &Arc<Client>, wanted: &str) -> NickRequest {
        let Some(link) = self.cluster() else {
            return NickRequest::Done(self.rename(client, wanted));
        };
        if let Err(why) = self.check_nick(client, wanted) {
            return NickRequest::Done(Err(why));
        }
        match link.claim_nick(protocol::fold(wanted), wanted, client.id) {
            Some(answer) => NickRequest::Wait(answer),
            None => NickRequest::Done(self.rename(client, wanted)),
        }
    }

    /// Whether `client` may take `wanted` as far as this node knows.
    fn check_nick(&self, client: &Client, wanted: &str) -> Result<(), String> {
        protocol::validate_nick(wanted).map_err(|e| e.describe("nick", wanted))?;
        let taken = self
            .state()
            .nicks
            .get(&protocol::fold(wanted))
            .is_some_and(|&owner| owner != client.id);
        if taken {
            return Err(format!("nick \"{wanted}\" is taken"));
        }
        Ok(())
    }

    /// Frees `client`'s cluster-wide claim on `nick`, if any (cluster mode;
    /// guest nicks are never claimed). Never waits.
    pub fn release_nick(&self, client: &Client, nick: &str) {
        if let Some(link) = self.cluster()
            && !nick.starts_with(protocol::GUEST_PREFIX)
        {
            link.release_nick(protocol::fold(nick), client.id);
        }
    }

    /// Cluster mode: another node holds the nick folded to `key`, which
    /// this node's client `id` had taken while NATS was away. The client
    /// goes back to its guest nick and is told why; its room hears the
    /// change as any other.
    pub fn nick_lost(&self, id: ClientId, key: &str) {
        let mut state = self.state();
        let Some(client) = state.clients.get(&id).cloned() else {
            return;
        };
        let old = client.nick();
        if protocol::fold(&old) != key {
            return;
        }
        let mut guest = match self.cluster() {
            Some(link) => format!("{}{id}-{}", protocol::GUEST_PREFIX, link.tag()),
            None => format!("{}{id}", protocol::GUEST_PREFIX),
        };
        while state.nicks.contains_key(&protocol::fold(&guest)) {
            guest.push('_');
        }
        state.nicks.remove(key);
        state.nicks.insert(protocol::fold(&guest), id);
        let new: Arc<str> = guest.into();
        let room = {
            let mut names = lock(&client.names);
            names.nick = new.clone();
            names.room.clone()
        };
        client.renamed.store(true, Relaxed);
        if let (Some(link), Some(room)) = (self.cluster(), &room) {
            link.member_set(id, &new, &room.name);
        }
        drop(state);
        client.notice(
            &format!(
                "Your nick {old} was taken on another chat node while this one was cut off; you are now {new}."
            ),
            self.queue_limit(),
        );
        if let Some(room) = room {
            let text = format!("{old} is now known as {new}");
            self.room_notice(&room, client.id, NoticeKind::Rename, &text);
        }
        self.emit(Event::Nick { id, old, new });
    }

    /// Changes a nick, or says why not (the text follows `*** error: `).
    pub fn rename(&self, client: &Arc<Client>, wanted: &str) -> Result<Arc<str>, String> {
        protocol::validate_nick(wanted).map_err(|e| e.describe("nick", wanted))?;
        let folded = protocol::fold(wanted);
        let mut state = self.state();
        let old = client.nick();
        if state
            .nicks
            .get(&folded)
            .is_some_and(|&owner| owner != client.id)
        {
            return Err(format!("nick \"{wanted}\" is taken"));
        }
        state.nicks.remove(&protocol::fold(&old));
        if protocol::fold(&old) != folded {
            self.release_nick(client, &old);
        }
        state.nicks.insert(folded, client.id);
        let new: Arc<str> = wanted.into();
        let room = {
            let mut names = lock(&client.names);
            names.nick = new.clone();
            names.room.clone()
        };
        if let (Some(link), Some(room)) = (self.cluster(), &room) {
            link.member_set(client.id, &new, &room.name);
        }
        drop(state);
        if let Some(room) = room {
            let text = format!("{old} is now known as {new}");
            self.room_notice(&room, client.id, NoticeKind::Rename, &text);
        }
        self.emit(Event::Nick {
            id: client.id,
            old,
            new: new.clone(),
        });
        Ok(new)
    }

    /// The hot path: hands one batch of whole, formatted lines from `from`
    /// to every other member of `room`. One allocation is shared by all
    /// recipients. Returns how many recipients it reached, and a recipient
    /// that is behind but still reading, if any: the sender should pause
    /// until it drains (see [`crate::outbox`]).
    pub fn publish(&self, room: &Room, from: ClientId, batch: Bytes, lines: usize) -> Fanout {
        let started = Instant::now();
        let config = self.shared.config.load();
        let members = read(&room.members);
        let fanout = fan_out_to(
            &members,
            from,
            &batch,
            lines as u64,
            config.limits.outbound_queue_bytes,
        );
        // Remembered before the member lock is released: see `join`.
        room.remember(&batch, lines, config.chat.history);
        drop(members);
        if let Some(member) = &fanout.congested {
            room.mark_congested(member);
        }
        self.shared.stats.published(lines, fanout.reached);
        self.shared.stats.fan_out_latency.observe(started.elapsed());
        // Other nodes get the batch once, whatever their number of members;
        // `offer` never waits.
        if let Some(link) = self.cluster() {
            link.offer(&room.name, &batch, Kind::Chat);
        }
        fanout
    }

    /// Hands a batch from another node to this node's members of `room`,
    /// through the same non-blocking fan-out as local lines. Chat lines
    /// are remembered as history under the member lock, as in
    /// [`Hub::publish`]. Nobody pauses for a congested member: the sender is
    /// on another node; a member too far behind is cut as usual. Returns
    /// how many members it reached.
    pub fn deliver_remote(&self, room: &str, batch: Bytes, lines: usize, kind: Kind) -> usize {
        let Some(room) = self.state().rooms.get(room).cloned() else {
            return 0;
        };
        let config = self.shared.config.load();
        let members = read(&room.members);
        let fanout = fan_out_to(
            &members,
            0,
            &batch,
            lines as u64,
            config.limits.outbound_queue_bytes,
        );
        if kind == Kind::Chat {
            room.remember(&batch, lines, config.chat.history);
        }
        fanout.reached
    }

    /// The rooms with at least one member on this node: those whose lines
    /// this node must hear from the others.
    pub fn occupied_rooms(&self) -> Vec<Arc<str>> {
        let rooms: Vec<Arc<Room>> = self.state().rooms.values().cloned().collect();
        rooms
            .into_iter()
            .filter(|r| !r.is_empty() || r.waiting.load(Relaxed) > 0)
            .map(|r| r.name.clone())
            .collect()
    }

    /// Sends a server line to every member of every room on this node (the
    /// cluster's "other nodes unreachable / back" notices). Returns how
    /// many clients it reached.
    pub fn notice_rooms(&self, text: &str) -> usize {
        let line = server_line(text);
        let limit = self.queue_limit();
        let rooms: Vec<Arc<Room>> = self.state().rooms.values().cloned().collect();
        rooms
            .iter()
            .map(|room| self.fan_out(room, 0, &line, limit))
            .sum()
    }

    /// Members of `room` on the other live nodes; 0 on one node.
    fn remote_count(&self, room: &str) -> usize {
        self.cluster().map_or(0, |link| {
            link.members().count(link.live_nodes().as_ref(), room)
        })
    }

    /// Every client of this node in a room, with the number of the last
    /// membership change they include (cluster mode; see
    /// [`Link::member_set`]).
    pub fn member_snapshot(&self) -> (u64, Vec<(ClientId, String, String)>) {
        let state = self.state();
        let seq = self.cluster().map_or(0, |link| link.member_seq());
        let set = state
            .clients
            .values()
            .filter_map(|c| {
                let names = lock(&c.names);
                let room = names.room.as_ref()?;
                Some((c.id, names.nick.to_string(), room.name.to_string()))
            })
            .collect();
        (seq, set)
    }

    /// Queues a server line for client `id` of this node, if it is still
    /// there (an error coming back from another node).
    pub fn notify_client(&self, id: ClientId, text: &str) {
        let client = self.state().clients.get(&id).cloned();
        if let Some(client) = client {
            client.notice(text, self.queue_limit());
        }
    }

    /// Hands a private message from `from` on another node to this node's
    /// client called `to`; or says why not (sent back to the sender).
    pub fn deliver_private(&self, from: &str, to: &str, text: &str) -> Result<(), String> {
        let limit = self.queue_limit();
        let target = {
            let state = self.state();
            state
                .nicks
                .get(&protocol::fold(to))
                .and_then(|id| state.clients.get(id))
                .cloned()
        };
        let Some(target) = target else {
            return Err(format!("no such nick \"{}\"", sanitize::clean(to)));
        };
        let mut line = BytesMut::with_capacity(from.len() + text.len() + 12);
        line.extend_from_slice(b"[pm] <");
        line.extend_from_slice(from.as_bytes());
        line.extend_from_slice(b"> ");
        sanitize::clean_into(&mut line, text.as_bytes());
        line.extend_from_slice(b"\r\n");
        match target.outbox.push(line.freeze(), limit) {
            Push::Queued | Push::Congested => {
                self.shared.stats.published(1, 1);
                Ok(())
            }
            Push::Overflow => Err(format!(
                "{} is not reading; message not delivered",
                target.nick()
            )),
            Push::Closed => Err(format!(
                "{} is leaving; message not delivered",
                target.nick()
            )),
        }
    }

    /// Whether any watcher wants message events.
    pub fn watching_messages(&self) -> bool {
        self.shared.message_watchers.load(Relaxed) > 0
    }

    /// Subscribes to events, message events included; they stop when the
    /// returned guard is dropped.
    pub fn subscribe_messages(&self) -> (broadcast::Receiver<Event>, MessageWatch) {
        self.shared.message_watchers.fetch_add(1, Relaxed);
        (self.subscribe(), MessageWatch { hub: self.clone() })
    }

    /// Reports a room message to watchers; call only while
    /// [`Hub::watching_messages`].
    pub fn message_event(
        &self,
        id: ClientId,
        room: &Room,
        nick: &Arc<str>,
        text: &str,
        action: bool,
    ) {
        self.emit(Event::Message {
            id,
            nick: nick.clone(),
            room: Some(room.name.clone()),
            to: None,
            text: text.to_string(),
            action,
        });
    }

    fn fan_out(&self, room: &Room, from: ClientId, line: &Bytes, limit: usize) -> usize {
        fan_out_to(&read(&room.members), from, line, 1, limit).reached
    }

    /// Sends `text` privately from `from` to the client called `to`. On
    /// success, returns the recipient when it is behind but still reading,
    /// so that the sender pauses (see [`crate::outbox`]).
    pub fn private(
        &self,
        from: &Client,
        to: &str,
        text: &str,
    ) -> Result<Option<Arc<Client>>, PrivateError> {
        let limit = self.queue_limit();
        let target = {
            let state = self.state();
            state
                .nicks
                .get(&protocol::fold(to))
                .and_then(|id| state.clients.get(id))
                .cloned()
        };
        let Some(target) = target else {
            return self.private_remote(from, to, text);
        };
        // A reader behind on its queue gets no more private lines until it
        // catches up: the sender is told and pauses, where a burst of
        // private messages from many connections would otherwise overrun a
        // reader that is reading all it can.
        if target.outbox.congested(limit) {
            return Err(PrivateError::Busy(target));
        }
        let from_nick = from.nick();
        let mut line = BytesMut::with_capacity(from_nick.len() + text.len() + 12);
        line.extend_from_slice(b"[pm] <");
        line.extend_from_slice(from_nick.as_bytes());
        line.extend_from_slice(b"> ");
        sanitize::clean_into(&mut line, text.as_bytes());
        line.extend_from_slice(b"\r\n");
        let congested = match target.outbox.push(line.freeze(), limit) {
            Push::Queued => None,
            Push::Congested => Some(target.clone()),
            Push::Overflow => {
                tracing::warn!(client = target.id, peer = %target.peer, "slow consumer: outgoing queue full, disconnecting");
                return Err(PrivateError::Failed(format!(
                    "{} is not reading; message not delivered",
                    target.nick()
                )));
            }
            Push::Closed => {
                return Err(PrivateError::Failed(format!(
                    "{} is leaving; message not delivered",
                    target.nick()
                )));
            }
        };
        let mut echo = BytesMut::new();
        echo.extend_from_slice(b"[pm -> ");
        echo.extend_from_slice(target.nick().as_bytes());
        echo.extend_from_slice(b"] ");
        sanitize::clean_into(&mut echo, text.as_bytes());
        echo.extend_from_slice(b"\r\n");
        from.outbox.push(echo.freeze(), limit);
        self.shared.stats.published(1, 1);
        if self.watching_messages() {
            self.emit(Event::Message {
                id: from.id,
                nick: from_nick,
                room: None,
                to: Some(target.nick()),
                text: sanitize::clean(text),
                action: false,
            });
        }
        Ok(congested)
    }

    /// `/msg` to a nick not on this node: in cluster mode, to its node (one
    /// NATS message); the sender's echo is queued at once, and an error
    /// comes back only if it cannot be delivered there.
    fn private_remote(
        &self,
        from: &Client,
        to: &str,
        text: &str,
    ) -> Result<Option<Arc<Client>>, PrivateError> {
        let no_such = || PrivateError::Failed(format!("no such nick \"{}\"", sanitize::clean(to)));
        let link = self.cluster().ok_or_else(no_such)?;
        let (node, nick) = link
            .members()
            .find(link.live_nodes().as_ref(), to)
            .ok_or_else(no_such)?;
        let from_nick = from.nick();
        let text = sanitize::clean(text);
        link.send_private(
            &node,
            &crate::cluster::members::PmMsg {
                from_node: link.node_id().to_string(),
                from_id: from.id,
                from_nick: from_nick.to_string(),
                to: nick.to_string(),
                text: text.clone(),
                error: None,
            },
        );
        from.outbox.push(
            server_free_line(&format!("[pm -> {nick}] {text}")),
            self.queue_limit(),
        );
        if self.watching_messages() {
            self.emit(Event::Message {
                id: from.id,
                nick: from_nick,
                room: None,
                to: Some(nick),
                text,
                action: false,
            });
        }
        Ok(None)
    }

    /// `/who`: the nicks in `room` (on every node, in cluster mode), sorted,
    /// at most [`WHO_MAX`] of them.
    pub fn who(&self, room: &Room) -> String {
        let members = read(&room.members);
        let mut total = members.len();
        let mut nicks: Vec<Arc<str>> = members.iter().take(WHO_MAX).map(|m| m.nick()).collect();
        drop(members);
        if let Some(link) = self.cluster() {
            let room_name: &str = &room.name;
            let max = WHO_MAX.saturating_sub(nicks.len());
            let (remote, count) = link
                .members()
                .nicks(link.live_nodes().as_ref(), room_name, max);
            nicks.extend(remote);
            total += count;
        }
        nicks.sort();
        let mut text = format!("{} ({}): {}", room.name, users(total), nicks.join(", "));
        if total > WHO_MAX {
            text.push_str(&format!(", and {} more", total - WHO_MAX));
        }
        text
    }

    /// The rooms of this node (admin), with this node's members.
    pub fn rooms(&self) -> Vec<RoomInfo> {
        let rooms: Vec<Arc<Room>> = self.state().rooms.values().cloned().collect();
        let mut infos: Vec<RoomInfo> = rooms.iter().map(|r| r.info()).collect();
        infos.sort_by(|a, b| a.name.cmp(&b.name));
        infos
    }

    /// `/rooms`: the rooms with their members on every node (cluster mode;
    /// on one node, [`Hub::rooms`]).
    pub fn all_rooms(&self) -> Vec<RoomInfo> {
        let mut infos = self.rooms();
        let Some(link) = self.cluster() else {
            return infos;
        };
        let mut remote = link.members().rooms(link.live_nodes().as_ref());
        for info in &mut infos {
            info.members += remote.remove(info.name.as_str()).unwrap_or(0);
        }
        infos.extend(remote.into_iter().map(|(name, members)| RoomInfo {
            name: name.to_string(),
            members,
            messages: 0,
        }));
        infos.sort_by(|a, b| a.name.cmp(&b.name));
        infos
    }

    fn find(&self, target: &Target) -> Option<Arc<Client>> {
        let state = self.state();
        let id = match target {
            Target::Id(id) => *id,
            Target::Nick(n) => *state.nicks.get(&protocol::fold(n))?,
        };
        state.clients.get(&id).cloned()
    }

    /// Every client, optionally only those in `room` and those whose nick or
    /// address contains `filter`; sorted by id.
    pub fn clients(&self, room: Option<&str>, filter: Option<&str>) -> Vec<ClientInfo> {
        let clients: Vec<Arc<Client>> = self.state().clients.values().cloned().collect();
        let filter = filter.map(|f| f.to_ascii_lowercase());
        let mut infos: Vec<ClientInfo> = clients
            .iter()
            .map(|c| c.info())
            .filter(|i| {
                room.is_none_or(|r| i.room == r.trim_start_matches('#').to_ascii_lowercase())
            })
            .filter(|i| {
                filter.as_deref().is_none_or(|f| {
                    i.nick.to_ascii_lowercase().contains(f) || i.peer.to_string().contains(f)
                })
            })
            .collect();
        infos.sort_by_key(|i| i.id);
        infos
    }

    pub fn client(&self, target: &Target) -> Result<ClientInfo, HubError> {
        self.find(target)
            .map(|c| c.info())
            .ok_or_else(|| HubError::NoSuchClient(target.clone()))
    }

    /// Disconnects a client: it reads `*** You were kicked: REASON`, its room
    /// sees it leave with the reason.
    pub fn kick(&self, target: &Target, reason: &str) -> Result<ClientInfo, HubError> {
        let client = self
            .find(target)
            .ok_or_else(|| HubError::NoSuchClient(target.clone()))?;
        let reason = sanitize::clean(reason);
        let reason = if reason.trim().is_empty() {
            "no reason given".to_string()
        } else {
            reason
        };
        let info = client.info();
        if client.outbox.close(Disconnect::Kicked(reason.clone())) {
            self.shared.stats.kicks.fetch_add(1, Relaxed);
            tracing::info!(client = client.id, nick = %info.nick, %reason, "kicked");
            self.emit(Event::Kick {
                id: client.id,
                nick: info.nick.as_str().into(),
                reason,
            });
        }
        Ok(info)
    }

    /// Sends a system notice to everyone, or to one room. Returns how many
    /// clients it reached.
    pub fn broadcast(&self, room: Option<&str>, text: &str) -> Result<usize, HubError> {
        let clean = sanitize::clean(text);
        if clean.trim().is_empty() {
            return Err(HubError::Invalid("the message is empty".into()));
        }
        let limit = self.queue_limit();
        let line = server_line(&format!("NOTICE: {clean}"));
        // A notice larger than a queue would cut every client it reaches.
        if line.len() > limit {
            return Err(HubError::Invalid(format!(
                "the notice is {} bytes; it must fit limits.outbound_queue_bytes ({limit})",
                line.len()
            )));
        }
        let (targets, room_name) = {
            let state = self.state();
            match room {
                None => (state.clients.values().cloned().collect::<Vec<_>>(), None),
                Some(name) => {
                    let name = protocol::normalize_room(name)
                        .map_err(|_| HubError::NoSuchRoom(name.to_string()))?;
                    let room = state
                        .rooms
                        .get(name.as_str())
                        .ok_or_else(|| HubError::NoSuchRoom(name.clone()))?;
                    (read(&room.members).clone(), Some(name))
                }
            }
        };
        let reached = targets
            .iter()
            .filter(|c| c.outbox.push(line.clone(), limit).queued())
            .count();
        self.emit(Event::Broadcast {
            room: room_name,
            text: clean,
            reached,
        });
        Ok(reached)
    }

    /// Bans in force.
    pub fn bans(&self) -> Vec<Ban> {
        self.shared.bans.active()
    }

    /// Bans an address or network: saves it, then disconnects the matching
    /// clients (each reads `*** You are banned: REASON`; its room sees it
    /// leave). Returns the ban and how many clients it disconnected. Blocks
    /// on file I/O.
    pub fn ban(&self, ban: Ban) -> Result<(Ban, usize), BanError> {
        let ban = self.shared.bans.add(ban)?;
        let now = SystemTime::now();
        let matching: Vec<Arc<Client>> = self
            .state()
            .clients
            .values()
            .filter(|c| ban.matches(c.peer.ip(), now))
            .cloned()
            .collect();
        let reason = ban.reason_text().to_string();
        let kicked = matching
            .iter()
            .filter(|c| c.outbox.close(Disconnect::Banned(reason.clone())))
            .count();
        tracing::info!(ban = %ban.target(), %reason, kicked, "banned");
        self.emit(Event::Ban {
            ban: ban.clone(),
            kicked,
        });
        Ok((ban, kicked))
    }

    /// Lifts the ban of `net`. Blocks on file I/O.
    pub fn unban(&self, net: ipnet::IpNet) -> Result<(), BanError> {
        self.shared.bans.remove(net)?;
        let target = crate::bans::format_target(&net);
        tracing::info!(ban = %target, "unbanned");
        self.emit(Event::Unban { target });
        Ok(())
    }

    /// Re-reads the bans file from `state_dir`; returns the bans in force.
    /// Blocks on file I/O.
    pub fn reload_bans(&self, state_dir: &std::path::Path) -> Result<usize, BanError> {
        self.shared.bans.reload(state_dir)
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let (clients, rooms) = {
            let state = self.state();
            (state.clients.len(), state.rooms.len())
        };
        self.shared
            .stats
            .snapshot(clients, rooms, self.shared.started.elapsed())
    }
}

/// Keeps message events flowing while alive.
#[derive(Debug)]
pub struct MessageWatch {
    hub: Hub,
}

impl Drop for MessageWatch {
    fn drop(&mut self) {
        self.hub.shared.message_watchers.fetch_sub(1, Relaxed);
    }
}

/// How a join goes on: done, or waiting for the room's history.
#[derive(Debug)]
pub enum JoinRequest {
    Done(Arc<Room>),
    /// Call [`Hub::finish_join`] once `done` resolves (or fails).
    Wait {
        room: Arc<Room>,
        done: tokio::sync::oneshot::Receiver<()>,
    },
}

/// How a nick change goes on: decided, or waiting for the cluster.
#[derive(Debug)]
pub enum NickRequest {
    /// The new nick, or why not (the text follows `*** error: `).
    Done(Result<Arc<str>, String>),
    /// The cluster decides; then call [`Hub::rename`] if granted.
    Wait(tokio::sync::oneshot::Receiver<crate::cluster::nicks::Claim>),
}

/// Why a private message was not delivered.
#[derive(Debug)]
pub enum PrivateError {
    /// The recipient is behind on reading; the sender should pause until it
    /// catches up, and may try again.
    Busy(Arc<Client>),
    /// The text follows `*** error: `.
    Failed(String),
}

/// What one fan-out did.
#[derive(Debug, Default)]
pub struct Fanout {
    pub reached: usize,
    /// A recipient that is behind but still reading (the most behind one).
    pub congested: Option<Arc<Client>>,
}

/// Pushes `batch` to every member but `from`. Never blocks: a member too far
/// behind is cut (its push overflows), one that is behind but reading is
/// reported so the sender can pause.
fn fan_out_to(
    members: &[Arc<Client>],
    from: ClientId,
    batch: &Bytes,
    lines: u64,
    limit: usize,
) -> Fanout {
    let mut fanout = Fanout::default();
    let mut worst = 0;
    for member in members.iter().filter(|m| m.id != from) {
        match member.outbox.push_lines(batch.clone(), lines, limit) {
            Push::Queued => fanout.reached += 1,
            Push::Congested => {
                fanout.reached += 1;
                let owed = member.outbox.owed();
                if owed > worst {
                    worst = owed;
                    fanout.congested = Some(member.clone());
                }
            }
            Push::Overflow => {
                tracing::warn!(client = member.id, peer = %member.peer, "slow consumer: outgoing queue full, disconnecting");
            }
            Push::Closed => {}
        }
    }
    fanout
}

/// The history replayed to a client joining `room`: the newest lines that
/// fit in a quarter of the client's queue (`limit`), so that a long history
/// or a small queue can never cut a newcomer before it has read a line.
fn history_block(history: &VecDeque<Bytes>, room: &str, limit: usize) -> Option<Bytes> {
    let budget = limit / 4;
    let mut size = 0;
    let kept = history
        .iter()
        .rev()
        .take_while(|line| {
            size += line.len();
            size <= budget
        })
        .count();
    if kept == 0 {
        return None;
    }
    let mut block = BytesMut::with_capacity(size + 64);
    push_server_line(
        &mut block,
        &format!(
            "Last {} in {room}:",
            protocol::count(kept as u64, "message", "messages")
        ),
    );
    for line in history.iter().skip(history.len() - kept) {
        block.extend_from_slice(line);
    }
    push_server_line(&mut block, "End of history.");
    Some(block.freeze())
}

/// `text\r\n`, for a line that starts with a prefix chatd wrote.
fn server_free_line(text: &str) -> Bytes {
    let mut b = BytesMut::with_capacity(text.len() + 2);
    b.extend_from_slice(text.as_bytes());
    b.extend_from_slice(b"\r\n");
    b.freeze()
}

/// `*** text\r\n`, the form of every server line.
pub fn server_line(text: &str) -> Bytes {
    let mut b = BytesMut::with_capacity(text.len() + 6);
    push_server_line(&mut b, text);
    b.freeze()
}

fn push_server_line(b: &mut BytesMut, text: &str) {
    b.extend_from_slice(b"*** ");
    b.extend_from_slice(text.as_bytes());
    b.extend_from_slice(b"\r\n");
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[path = "hub_handoff.rs"]
mod handoff;

#[cfg(test)]
#[path = "hub_tests.rs"]
mod tests;
