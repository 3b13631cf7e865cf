//! The node's cluster task ([`Node`]): publishes this node's batches with
//! their positions, keeps what it published for replays and reconnects,
//! follows the connection, and keeps one listener per room with local
//! members.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::connection::State;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::watch as tokio_watch;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::subjects::KindOnWire;
use crate::seq::{self, Backlog, Position, SEQ_HEADER};
use chatd_config::ClusterConfig;
use chatd_hub::cluster_state::Kind;
use chatd_hub::hub::Hub;

use super::history;
use super::link::{Link, Outgoing};
use super::receive::next_or_stop;
use super::room::{Listener, listen};
use super::stream::replicas;
use super::subjects::{self, KIND_HEADER, NODE_HEADER};

/// How long a lost connection may take to come back (to another server of
/// a NATS cluster, usually within milliseconds) before users are told that
/// other nodes are unreachable. Until then batches are held and published
/// once it is back; after it they are dropped, so nothing comes late.
pub(super) const HOLD: Duration = Duration::from_secs(2);

/// How long after a batch is published the node asks its server to
/// confirm it (one marker message covers every batch before it). Longer
/// costs more batches published again after a reconnect (receivers drop
/// them); shorter costs NATS messages: at most one per this per node.
pub(super) const MARK_AFTER: Duration = Duration::from_secs(1);

/// The most payload one replay answer carries (NATS's default maximum
/// message is 1 MiB).
pub(super) const REPLAY_MAX_BYTES: usize = 512 * 1024;

/// The cluster task's state.
pub(super) struct Node {
    pub(super) client: async_nats::Client,
    pub(super) hub: Hub,
    pub(super) link: Arc<Link>,
    pub(super) node_id: Arc<str>,
    /// `NAME.room.`
    pub(super) prefix: String,
    /// `NAME.replay.`
    pub(super) replay_prefix: String,
    /// `NAME.pm.`
    pub(super) pm_prefix: String,
    /// `cluster.name`.
    pub(super) name: String,
    /// One subscription task per room with local members.
    pub(super) rooms: HashMap<Arc<str>, RoomSub>,
    /// What this node published lately; shared with [`serve_replay`].
    pub(super) backlog: Arc<std::sync::Mutex<Backlog>>,
    pub(super) away: Away,
    /// The last sequence a confirmation marker was sent for.
    pub(super) marked: u64,
    /// When to send the next marker: set by a publish, cleared by a marker.
    pub(super) mark_at: Option<tokio::time::Instant>,
    /// The history stream, once opened (`chat.history` > 0 and JetStream
    /// there).
    pub(super) history: Option<async_nats::jetstream::stream::Stream>,
    /// `chat.history`: the batches the stream keeps per room.
    pub(super) per_room: usize,
    /// `cluster.history_load_ms`: how long a history load may take.
    pub(super) history_load: Duration,
    /// When opening the stream was last tried.
    pub(super) history_tried: Option<std::time::Instant>,
    /// Replicas for the history stream ([`replicas`]).
    pub(super) replicas: usize,
    pub(super) shutdown: CancellationToken,
}

/// The cluster task's view of the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Away {
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
pub(super) struct RoomSub {
    pub(super) stop: CancellationToken,
    pub(super) loads: mpsc::UnboundedSender<tokio::sync::oneshot::Sender<()>>,
}

impl Node {
    /// The cluster task of `config`'s node, with a fresh backlog whose
    /// replays it serves on `NAME.replay.NODE` from now on.
    pub(super) fn new(
        config: &ClusterConfig,
        client: async_nats::Client,
        hub: Hub,
        link: Arc<Link>,
        connected: bool,
        shutdown: CancellationToken,
    ) -> Node {
        let backlog = Arc::new(std::sync::Mutex::new(Backlog::new(
            epoch(),
            BACKLOG_CAPACITY,
        )));
        tokio::spawn(serve_replay(
            client.clone(),
            backlog.clone(),
            format!(
                "{}{}",
                subjects::replay_prefix(&config.name),
                config.node_id
            ),
            shutdown.clone(),
        ));
        Node {
            client,
            per_room: hub.config().chat.history,
            hub,
            link,
            node_id: config.node_id.clone().into(),
            prefix: subjects::room_prefix(&config.name),
            replay_prefix: subjects::replay_prefix(&config.name),
            pm_prefix: subjects::pm_prefix(&config.name),
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
            history_load: config.timings.history_load,
            history_tried: None,
            replicas: replicas(config),
            shutdown,
        }
    }

    pub(super) async fn run(
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
        let mut confirms = self.confirmations(&marks).await;
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
                () = sleep_until(hold_until) => self.abandon(),
                // Disabled once no sender is left (`chat.history` = 0).
                Some((room, reply)) = loads.recv() => self.load(room, reply, connected).await,
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

    /// The subscription confirmation markers come back on (`marks`).
    async fn confirmations(&self, marks: &str) -> Option<async_nats::Subscriber> {
        match self.client.subscribe(marks.to_string()).await {
            Ok(sub) => Some(sub),
            Err(e) => {
                warn!(error = %e, "cluster: cannot subscribe to confirmations; batches are published again after every reconnect");
                None
            }
        }
    }

    /// NATS has been away longer than [`HOLD`]: what was held is dropped,
    /// and the users in rooms are told.
    fn abandon(&mut self) {
        let given_up = self.lock_backlog().abandon() as u64;
        self.link.dropped.fetch_add(given_up, Relaxed);
        self.away = Away::Abandoned { told: true };
        let told = self
            .hub
            .notice_rooms("Other chat nodes are unreachable; chat on this node goes on.");
        warn!(
            told,
            "cluster: NATS lost; serving this node's users alone until it is back"
        );
    }

    /// Has `room`'s listener load its history and answer `reply`; at once
    /// without NATS or the stream, where the room's history is this node's
    /// and the joining client goes on.
    async fn load(&mut self, room: Arc<str>, reply: oneshot::Sender<()>, connected: bool) {
        if self.history.is_none() && connected {
            self.open_history().await;
        }
        if self.history.is_none() || !connected {
            let _ = reply.send(());
            return;
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

    /// NATS is (back) there: publishes what the old server had not
    /// confirmed and what was held meanwhile, in order (receivers drop what
    /// they already have), and says so as the outage deserves.
    pub(super) async fn back(&mut self, marks: &str, dropped_at_loss: u64) {
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

    pub(super) fn lock_backlog(&self) -> std::sync::MutexGuard<'_, Backlog> {
        chatd_hub::lock::lock(&self.backlog)
    }

    /// Asks the server to send back the last sequence given out: when it
    /// comes back, the server has every batch published before it.
    pub(super) async fn mark(&mut self, inbox: &str) {
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
    pub(super) async fn publish(&mut self, out: Outgoing) {
        let (key, payload, kind) = match out {
            Outgoing::Room {
                room,
                payload,
                kind,
            } => (room, payload, kind.as_byte()),
            Outgoing::Private { node, payload } => (
                Arc::from(seq::private_stream(&node)),
                payload,
                seq::PRIVATE_KIND,
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
    pub(super) async fn open_history(&mut self) {
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
    pub(super) async fn send_entry(&self, key: &str, pos: Position, kind: u8, payload: Bytes) {
        if kind != seq::PRIVATE_KIND {
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
    pub(super) async fn send(&self, room: &str, pos: Position, kind: Kind, payload: Bytes) {
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
    pub(super) fn reconcile(&mut self) {
        let wanted = self.hub.occupied_rooms();
        let mut backlog = chatd_hub::lock::lock(&self.backlog);
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

/// Answers other nodes' replay requests on `NAME.replay.NODE` from this
/// node's backlog until `stop`.
pub(super) async fn serve_replay(
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
        let Some((room, after)) = seq::parse_replay_request(&msg.payload) else {
            continue;
        };
        let answer = chatd_hub::lock::lock(&backlog).replay(room, after, REPLAY_MAX_BYTES);
        if let Err(e) = client.publish(reply, answer).await {
            debug!(error = %e, "cluster: cannot answer a replay request");
        }
    }
}

/// The next confirmation marker, or never when there is no subscription.
pub(super) async fn next_confirm(
    sub: Option<&mut async_nats::Subscriber>,
) -> Option<async_nats::Message> {
    match sub {
        Some(sub) => sub.next().await,
        None => std::future::pending().await,
    }
}

/// Sleeps until `at`, or forever when there is none.
pub(super) async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// This process's epoch for its positions ([`seq`]): random, so
/// that a restarted node's numbers never pass for its previous process's.
/// A clock-based epoch only if the system has no randomness at all: two
/// starts of a node within a nanosecond are not a concern.
fn epoch() -> u64 {
    let mut epoch = [0u8; 8];
    match getrandom::fill(&mut epoch) {
        Ok(()) => u64::from_le_bytes(epoch),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
    }
}

/// Published batches kept to publish again after a reconnect and to replay
/// to a node that missed some ([`seq`]).
const BACKLOG_CAPACITY: usize = 4096;
