//! `WatchEvents` across the cluster: every node's events, each with its
//! node, on a watch opened on any node.
//!
//! A node relays its events to NATS only while someone elsewhere in the
//! cluster watches, so a cluster nobody watches pays nothing:
//!
//! - a watch on node W asks for them with a *lease* on
//!   `NAME.admin.watch.want` ([`Want`]: a watcher id, and whether it wants
//!   chat messages too), renewed every [`RENEW_EVERY`] and withdrawn when the
//!   watch ends; every node answers the first ask once it relays, so the
//!   stream starts with the answered nodes' events in it (a node that starts
//!   later hears the next renewal);
//! - each node's [`relay`] holds the leases of other nodes' watchers (at
//!   most [`MAX_LEASES`], each expiring [`LEASE`] after its last renewal, so
//!   a watcher's node that died stops costing within it), and while it holds
//!   one it takes the hub's events (chat messages only while a lease asks for
//!   them) and publishes each, encoded by the admin API's [`WatchCodec`]
//!   (the cluster carries the bytes and reads only their node), on
//!   `NAME.admin.watch.ev` (messages on `.msg`), numbered per node in the
//!   [`EVENT_SEQ_HEADER`] (a relay that falls behind the hub's ring sends a
//!   `lagged` event of its own);
//! - the watch stream merges this node's own events (straight from the hub)
//!   with the other nodes' ([`Feed`]: one NATS subscription per node, however
//!   many watch there, subscribed before the lease is asked, handing each
//!   event to the watches through a ring). A gap in a node's numbers (NATS
//!   was away, the subscription was full and NATS dropped for it, or this
//!   watcher fell behind the ring) becomes a `lagged` event for that node.
//!
//! Bounded everywhere: the hub's event channel is a ring (a relay that falls
//! behind skips, and says so), a relay never publishes while NATS is away
//! (its numbers say what it skipped), the node's subscription holds at most
//! the connection's subscription capacity before NATS drops for it, and the
//! feed's ring is shared: a watcher that stops reading holds nothing of its
//! own, and NATS sends each event to a node once, not once per watcher.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::connection::State;
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, info, warn};

use super::bus::Bus;
use super::subjects::NODE_HEADER;
use chatd_hub::cluster_state::{
    AdminBus, Answer, BoxFuture, GatherError, Gathered, Relayed, RemoteEvents, WatchCodec,
    WatchItem, Watching,
};
use chatd_hub::hub::{Event, Hub, MessageWatch};

/// The admin API's encoding of this node's events for the other nodes.
pub type Codec = Arc<dyn WatchCodec<Event>>;

/// Cluster-wide admin as the admin API sees it: the bus's scatter-gather,
/// and the other nodes' events through this node's [`Feed`]. The wiring
/// hands it to the admin API only in cluster mode. The nodes that count as
/// there are those heard on `NAME.nodes` within
/// [`PRESENCE_TTL`](super::bus::PRESENCE_TTL).
#[derive(Debug, Clone)]
pub struct AdminLink {
    bus: Bus,
    feed: Feed,
}

impl AdminLink {
    pub fn new(bus: Bus, feed: Feed) -> AdminLink {
        AdminLink { bus, feed }
    }
}

impl AdminBus for AdminLink {
    fn node_id(&self) -> &str {
        self.bus.node_id()
    }

    fn gather<'a>(
        &'a self,
        op: &'a str,
        payload: Bytes,
        done: &'a (dyn Fn(&Answer) -> bool + Send + Sync),
    ) -> BoxFuture<'a, Result<Gathered, GatherError>> {
        Box::pin(self.bus.gather(op, payload, done))
    }

    fn watch<'a>(&'a self, messages: bool) -> BoxFuture<'a, Result<Watching, String>> {
        Box::pin(async move {
            let (remote, gathered) = Remote::open(&self.bus, &self.feed, messages).await?;
            Ok((Box::new(remote) as Box<dyn RemoteEvents>, gathered))
        })
    }
}

/// How long a lease lasts after its last renewal: a watcher whose node died
/// (and so never withdrew) costs the relays at most this long.
pub const LEASE: Duration = Duration::from_secs(10);
/// How often a watch renews its lease: three renewals per lease, so one or
/// two lost ones do not stop the events.
pub const RENEW_EVERY: Duration = Duration::from_secs(3);
/// Most leases a relay holds; past it new ones are refused (each watcher's
/// own node holds its lease, so this is the number of watchers cluster-wide).
pub const MAX_LEASES: usize = 1024;
/// Most nodes a watcher keeps numbers for; junk on the subject cannot grow
/// it past this.
const MAX_NODES: usize = 1024;
/// The header numbering a node's relayed events, per subject.
pub const EVENT_SEQ_HEADER: &str = "Chatd-Event-Seq";
/// `NAME.admin.` + this: leases.
const WANT: &str = "watch.want";
/// `NAME.admin.` + this: events.
const EVENTS: &str = "watch.ev";
/// `NAME.admin.` + this: chat messages.
const MESSAGES: &str = "watch.msg";

/// A lease request on `NAME.admin.watch.want`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Want {
    /// Unique per watch: `NODE/N`.
    pub watcher: String,
    /// The watcher's node: its own events it takes from its hub.
    pub node: String,
    #[serde(default)]
    pub messages: bool,
    /// The watch ended: drop the lease now.
    #[serde(default)]
    pub stop: bool,
}

/// Numbers the watches of this process.
static WATCHES: AtomicU64 = AtomicU64::new(0);

/// One relay's leases.
#[derive(Debug, Default)]
struct Leases {
    /// Watcher → (expiry, wants messages).
    by_watcher: HashMap<String, (Instant, bool)>,
}

impl Leases {
    /// Records `want`; `false` when refused (too many leases).
    fn apply(&mut self, want: &Want, now: Instant) -> bool {
        if want.stop {
            self.by_watcher.remove(&want.watcher);
            return true;
        }
        if self.by_watcher.len() >= MAX_LEASES && !self.by_watcher.contains_key(&want.watcher) {
            return false;
        }
        self.by_watcher
            .insert(want.watcher.clone(), (now + LEASE, want.messages));
        true
    }

    fn expire(&mut self, now: Instant) {
        self.by_watcher.retain(|_, (until, _)| *until > now);
    }

    fn any(&self) -> bool {
        !self.by_watcher.is_empty()
    }

    fn messages(&self) -> bool {
        self.by_watcher.values().any(|(_, m)| *m)
    }
}

/// A relay's hold on the hub's events while it has leases.
struct Taking {
    events: broadcast::Receiver<Event>,
    /// Held while a lease wants chat messages: the hub emits them only then.
    messages: Option<MessageWatch>,
}

/// A relay's way out: where and how it publishes this node's events.
struct Out {
    client: async_nats::Client,
    node: String,
    codec: Codec,
    /// `NAME.admin.watch.ev`, `NAME.admin.watch.msg`.
    ev_subject: String,
    msg_subject: String,
    /// Per subject: the number of the last event relayed (or skipped).
    ev_seq: u64,
    msg_seq: u64,
}

/// Relays this node's events to NATS while other nodes' watchers hold
/// leases, until `stop`. Answers every lease request that asks for an
/// answer, once it relays (its own node's too, so a watch there knows this
/// node is there, though it takes this node's events from the hub).
pub async fn relay(bus: Bus, hub: Hub, codec: Codec, stop: CancellationToken) {
    let client = bus.client().clone();
    let subject = bus.subject(WANT);
    let mut wants = match client.subscribe(subject.clone()).await {
        Ok(sub) => sub,
        Err(e) => {
            warn!(%subject, error = %e, "cluster: cannot subscribe; watchers on other nodes will miss this node's events");
            return;
        }
    };
    let mut out = Out {
        client,
        node: bus.node_id().to_string(),
        codec,
        ev_subject: bus.subject(EVENTS),
        msg_subject: bus.subject(MESSAGES),
        ev_seq: 0,
        msg_seq: 0,
    };
    let mut leases = Leases::default();
    let mut taking: Option<Taking> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let next = async {
            match taking.as_mut() {
                Some(t) => t.events.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {
                leases.expire(Instant::now());
                settle(&hub, &leases, &mut taking);
            }
            want = wants.next() => {
                let Some(msg) = want else { break };
                if out.lease(&msg, &mut leases) {
                    settle(&hub, &leases, &mut taking);
                    out.answer(msg.reply).await;
                }
            }
            event = next => {
                let (item, is_message) = match event {
                    Ok(event) => {
                        let is_message = matches!(event, Event::Message { .. });
                        (WatchItem::Event(event), is_message)
                    }
                    // This relay fell behind the hub: watchers are told how
                    // many events of this node they missed, on the subject
                    // every watcher follows.
                    Err(RecvError::Lagged(missed)) => (WatchItem::Lagged(missed), false),
                    Err(RecvError::Closed) => {
                        taking = None;
                        continue;
                    }
                };
                if is_message && !leases.messages() {
                    continue;
                }
                out.publish(item, is_message).await;
            }
        }
    }
}

impl Out {
    /// Records the lease `msg` asks for; `false` when it is malformed or
    /// refused (too many).
    fn lease(&self, msg: &async_nats::Message, leases: &mut Leases) -> bool {
        let Ok(want) = serde_json::from_slice::<Want>(&msg.payload) else {
            debug!("cluster: ignored a malformed watch lease");
            return false;
        };
        let accepted = want.node == self.node || leases.apply(&want, Instant::now());
        if !accepted {
            debug!(watcher = %want.watcher, "cluster: too many watch leases; refused one");
        }
        accepted
    }

    /// Tells a watcher that asked that this node relays.
    async fn answer(&self, reply: Option<async_nats::Subject>) {
        let Some(reply) = reply else {
            return;
        };
        let mut headers = HeaderMap::new();
        headers.insert(NODE_HEADER, self.node.as_str());
        if let Err(e) = self
            .client
            .publish_with_headers(reply, headers, Bytes::new())
            .await
        {
            debug!(error = %e, "cluster: cannot answer a watch lease");
        }
    }

    /// Numbers `item` on its subject and publishes it, unless NATS is away
    /// (not queued for a reconnect: the numbers tell watchers).
    async fn publish(&mut self, item: WatchItem<Event>, is_message: bool) {
        let (seq, subject) = if is_message {
            self.msg_seq += 1;
            (self.msg_seq, &self.msg_subject)
        } else {
            self.ev_seq += 1;
            (self.ev_seq, &self.ev_subject)
        };
        if self.client.connection_state() != State::Connected {
            return;
        }
        let encoded = self.codec.encode(item, &self.node);
        let mut headers = HeaderMap::new();
        headers.insert(EVENT_SEQ_HEADER, seq.to_string().as_str());
        if let Err(e) = self
            .client
            .publish_with_headers(subject.clone(), headers, encoded)
            .await
        {
            debug!(error = %e, "cluster: cannot relay an event");
        }
    }
}

/// Takes the hub's events while leases exist, messages while one wants
/// them, and lets go of what no lease wants.
fn settle(hub: &Hub, leases: &Leases, taking: &mut Option<Taking>) {
    if !leases.any() {
        if taking.take().is_some() {
            info!("admin: no watcher on another node; events stay on this node");
        }
        return;
    }
    let t = taking.get_or_insert_with(|| {
        info!("admin: relaying events to watchers on other nodes");
        Taking {
            events: hub.subscribe(),
            messages: None,
        }
    });
    match (leases.messages(), t.messages.is_some()) {
        (true, false) => t.messages = Some(hub.subscribe_messages().1),
        (false, true) => t.messages = None,
        _ => {}
    }
}

/// Other nodes' events as the ring holds them: their node read once, for
/// every watch of this node.
#[derive(Debug)]
struct Received {
    node: String,
    payload: Bytes,
    /// From `NAME.admin.watch.msg` (chat messages) rather than `.ev`.
    messages: bool,
    /// The origin's number for it on its subject, when it gave one.
    seq: Option<u64>,
}

/// Events the feed's ring holds for the watches that read slowest; past
/// it, a watch skips ahead and its numbers tell it what it missed (as the
/// hub's ring does for this node's own events).
const FEED_RING: usize = 1024;

/// This node's one subscription to the other nodes' relayed events, shared
/// by every watch here through a ring. It subscribes while a watch exists
/// (to chat messages while one wants them) and lets go when the last ends.
#[derive(Debug, Clone)]
pub struct Feed {
    inner: Arc<FeedInner>,
}

#[derive(Debug)]
struct FeedInner {
    ring: broadcast::Sender<Arc<Received>>,
    /// Watches of this node that want chat messages.
    message_watches: AtomicUsize,
    /// Which subscriptions run (events, messages); held while one is
    /// started or stops, so a watch that opens as the last one ends never
    /// finds a subscription on its way out.
    running: tokio::sync::Mutex<(bool, bool)>,
    /// Reads the node of each relayed event.
    codec: Codec,
}

impl Feed {
    pub fn new(codec: Codec) -> Self {
        Feed {
            inner: Arc::new(FeedInner {
                codec,
                ring: broadcast::channel(FEED_RING).0,
                message_watches: AtomicUsize::new(0),
                running: tokio::sync::Mutex::new((false, false)),
            }),
        }
    }
}

/// How often an idle subscription checks whether any watch still wants it.
const FEED_CHECK: Duration = Duration::from_secs(1);

impl Feed {
    /// A place in the ring for one watch, the subscriptions it needs
    /// running: events from the moment this returns are in it.
    async fn join(&self, bus: &Bus, messages: bool) -> Result<FeedSeat, String> {
        let mut running = self.inner.running.lock().await;
        let rx = self.inner.ring.subscribe();
        let seat = FeedSeat {
            rx,
            messages,
            feed: self.clone(),
        };
        if messages {
            self.inner.message_watches.fetch_add(1, Relaxed);
        }
        if !running.0 {
            self.spawn(bus, false).await?;
            running.0 = true;
        }
        if messages && !running.1 {
            self.spawn(bus, true).await?;
            running.1 = true;
        }
        Ok(seat)
    }

    /// Subscribes to `.ev` or `.msg` and hands what comes to the ring until
    /// no watch wants it.
    async fn spawn(&self, bus: &Bus, messages: bool) -> Result<(), String> {
        let subject = bus.subject(if messages { MESSAGES } else { EVENTS });
        let mut sub = bus
            .client()
            .subscribe(subject)
            .await
            .map_err(|e| e.to_string())?;
        let own = bus.node_id().to_string();
        let codec = self.inner.codec.clone();
        let feed = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(FEED_CHECK);
            loop {
                tokio::select! {
                    msg = sub.next() => {
                        let Some(msg) = msg else {
                            // The connection closed: the next watch subscribes anew.
                            let mut running = feed.inner.running.lock().await;
                            if messages {
                                running.1 = false;
                            } else {
                                running.0 = false;
                            }
                            break;
                        };
                        let Some(node) = codec.node(&msg.payload) else {
                            continue;
                        };
                        if node == own || node.is_empty() {
                            continue;
                        }
                        let seq = msg
                            .headers
                            .as_ref()
                            .and_then(|h| h.get(EVENT_SEQ_HEADER))
                            .and_then(|s| s.as_str().parse::<u64>().ok());
                        // No watch left: nobody to hand it to, and the
                        // tick below lets go.
                        let received = Received { node, payload: msg.payload, messages, seq };
                        let _ = feed.inner.ring.send(Arc::new(received));
                    }
                    _ = tick.tick() => {
                        let mut running = feed.inner.running.lock().await;
                        if !feed.wanted(messages) {
                            if messages {
                                running.1 = false;
                            } else {
                                running.0 = false;
                            }
                            break;
                        }
                    }
                }
            }
            debug!(
                messages,
                "admin: no watch wants other nodes' events; unsubscribed"
            );
        });
        Ok(())
    }

    fn wanted(&self, messages: bool) -> bool {
        if messages {
            self.inner.message_watches.load(Relaxed) > 0
        } else {
            self.inner.ring.receiver_count() > 0
        }
    }
}

/// One watch's place in the [`Feed`]'s ring.
struct FeedSeat {
    rx: broadcast::Receiver<Arc<Received>>,
    messages: bool,
    feed: Feed,
}

impl Drop for FeedSeat {
    fn drop(&mut self) {
        if self.messages {
            self.feed.inner.message_watches.fetch_sub(1, Relaxed);
        }
    }
}

/// The other nodes' events for one watch: its place in the node's feed,
/// the numbers seen per node, and its lease (renewed until this is
/// dropped).
pub struct Remote {
    seat: FeedSeat,
    /// (node, messages) → last number seen.
    last: HashMap<(String, bool), u64>,
    /// Items not yet handed out (a gap's `lagged` goes first).
    pending: VecDeque<Relayed>,
    _renew: DropGuard,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("messages", &self.seat.messages)
            .finish()
    }
}

impl Remote {
    /// Takes a place in the node's feed of other nodes' events, asks every
    /// node for them, and waits (at most [`chatd_hub::cluster_state::ADMIN_DEADLINE`])
    /// until the nodes known to be there relay. Returns the feed and who
    /// answered.
    pub async fn open(
        bus: &Bus,
        feed: &Feed,
        messages: bool,
    ) -> Result<(Remote, Gathered), String> {
        let client = bus.client().clone();
        if client.connection_state() != State::Connected {
            return Err("NATS is unreachable".into());
        }
        let seat = feed.join(bus, messages).await?;
        let n = WATCHES.fetch_add(1, Relaxed) + 1;
        let want = Want {
            watcher: format!("{}/{}/{n}", bus.node_id(), std::process::id()),
            node: bus.node_id().to_string(),
            messages,
            stop: false,
        };
        let encoded = |w: &Want| Bytes::from(serde_json::to_vec(w).unwrap_or_default());
        let gathered = bus
            .gather(WANT, encoded(&want), |_| false)
            .await
            .map_err(|e| e.to_string())?;
        let stop = CancellationToken::new();
        let renew_stop = stop.clone();
        let subject = bus.subject(WANT);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RENEW_EVERY);
            tick.tick().await;
            loop {
                tokio::select! {
                    () = renew_stop.cancelled() => break,
                    _ = tick.tick() => {
                        if client.connection_state() == State::Connected {
                            let _ = client.publish(subject.clone(), encoded(&want)).await;
                        }
                    }
                }
            }
            let ended = Want { stop: true, ..want };
            if client.connection_state() == State::Connected {
                let _ = client.publish(subject, encoded(&ended)).await;
            }
        });
        Ok((
            Remote {
                seat,
                last: HashMap::new(),
                pending: VecDeque::new(),
                _renew: stop.drop_guard(),
            },
            gathered,
        ))
    }

    /// The next event from another node (a `lagged` one for a gap); `None`
    /// once the feed ends.
    pub async fn next(&mut self) -> Option<Relayed> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(event);
            }
            let relayed = match self.seat.rx.recv().await {
                Ok(relayed) => relayed,
                // Skipped ahead: the numbers of what comes next say, per
                // node, what this watch missed.
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return None,
            };
            if relayed.messages && !self.seat.messages {
                continue;
            }
            if let Some(seq) = relayed.seq {
                if self.last.len() >= MAX_NODES {
                    self.last.clear();
                }
                let key = (relayed.node.clone(), relayed.messages);
                match self.last.insert(key, seq) {
                    Some(last) if seq <= last => continue,
                    Some(last) if seq > last + 1 => {
                        self.pending.push_back(Relayed::Lagged {
                            node: relayed.node.clone(),
                            missed: seq - last - 1,
                        });
                    }
                    _ => {}
                }
            }
            self.pending.push_back(Relayed::Event {
                node: relayed.node.clone(),
                payload: relayed.payload.clone(),
            });
        }
    }
}

impl RemoteEvents for Remote {
    fn next(&mut self) -> BoxFuture<'_, Option<Relayed>> {
        Box::pin(Remote::next(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want(watcher: &str, messages: bool, stop: bool) -> Want {
        Want {
            watcher: watcher.into(),
            node: "w".into(),
            messages,
            stop,
        }
    }

    #[test]
    fn leases_expire_stop_and_are_bounded() {
        let now = Instant::now();
        let mut l = Leases::default();
        assert!(!l.any());
        assert!(l.apply(&want("a", false, false), now));
        assert!(l.any() && !l.messages());
        assert!(l.apply(&want("b", true, false), now));
        assert!(l.messages());
        assert!(l.apply(&want("b", true, true), now));
        assert!(!l.messages(), "a stopped watch lets go at once");
        l.expire(now + LEASE);
        assert!(!l.any(), "an unrenewed lease expires");
        for i in 0..MAX_LEASES {
            assert!(l.apply(&want(&i.to_string(), false, false), now));
        }
        assert!(!l.apply(&want("one more", false, false), now));
        assert!(
            l.apply(&want("7", false, false), now),
            "a renewal still goes"
        );
    }
}
