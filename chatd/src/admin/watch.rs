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
//!   them) and publishes each, encoded as the `Event` it will be, on
//!   `NAME.admin.watch.ev` (messages on `.msg`), numbered per node in the
//!   [`EVENT_SEQ_HEADER`] (a relay that falls behind the hub's ring sends a
//!   `lagged` event of its own);
//! - the watch stream merges this node's own events (straight from the hub)
//!   with the other nodes' (one NATS subscription per watcher, subscribed
//!   before the lease is asked). A gap in a node's numbers (NATS was away,
//!   or this watcher's subscription was full and NATS dropped for it)
//!   becomes a `lagged` event for that node.
//!
//! Bounded everywhere: the hub's event channel is a ring (a relay that falls
//! behind skips, and says so), a relay never publishes while NATS is away
//! (its numbers say what it skipped), and a watcher's subscription holds at most the connection's
//! subscription capacity before NATS drops for it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::connection::State;
use bytes::Bytes;
use chatd_proto::admin::v1 as pb;
use futures_util::StreamExt;
use futures_util::stream::SelectAll;
use prost::Message;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, info, warn};

use super::convert;
use crate::cluster::{Bus, Gathered};
use crate::hub::{Event, Hub, MessageWatch};

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

/// Relays this node's events to NATS while other nodes' watchers hold
/// leases, until `stop`. Answers every lease request that asks for an
/// answer, once it relays (its own node's too, so a watch there knows this
/// node is there, though it takes this node's events from the hub).
pub async fn relay(bus: Bus, hub: Hub, stop: CancellationToken) {
    let client = bus.client().clone();
    let node = bus.node_id().to_string();
    let subject = bus.subject(WANT);
    let mut wants = match client.subscribe(subject.clone()).await {
        Ok(sub) => sub,
        Err(e) => {
            warn!(%subject, error = %e, "cluster: cannot subscribe; watchers on other nodes will miss this node's events");
            return;
        }
    };
    let (ev_subject, msg_subject) = (bus.subject(EVENTS), bus.subject(MESSAGES));
    let mut leases = Leases::default();
    let mut taking: Option<Taking> = None;
    // Per subject: the number of the last event relayed (or skipped).
    let (mut ev_seq, mut msg_seq) = (0u64, 0u64);
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
                let Ok(want) = serde_json::from_slice::<Want>(&msg.payload) else {
                    debug!("cluster: ignored a malformed watch lease");
                    continue;
                };
                let accepted = want.node == node || leases.apply(&want, Instant::now());
                if !accepted {
                    debug!(watcher = %want.watcher, "cluster: too many watch leases; refused one");
                    continue;
                }
                settle(&hub, &leases, &mut taking);
                if let Some(reply) = msg.reply {
                    let mut headers = HeaderMap::new();
                    headers.insert(crate::cluster::NODE_HEADER, node.as_str());
                    if let Err(e) = client.publish_with_headers(reply, headers, Bytes::new()).await {
                        debug!(error = %e, "cluster: cannot answer a watch lease");
                    }
                }
            }
            event = next => {
                let (event, is_message) = match event {
                    Ok(event) => {
                        let is_message = matches!(event, Event::Message { .. });
                        (convert::event(event), is_message)
                    }
                    // This relay fell behind the hub: watchers are told how
                    // many events of this node they missed, on the subject
                    // every watcher follows.
                    Err(RecvError::Lagged(missed)) => (convert::lagged(missed), false),
                    Err(RecvError::Closed) => {
                        taking = None;
                        continue;
                    }
                };
                if is_message && !leases.messages() {
                    continue;
                }
                let (seq, subject) = if is_message {
                    msg_seq += 1;
                    (msg_seq, &msg_subject)
                } else {
                    ev_seq += 1;
                    (ev_seq, &ev_subject)
                };
                if client.connection_state() != State::Connected {
                    // Not queued for a reconnect: the numbers tell watchers.
                    continue;
                }
                let encoded = pb::Event {
                    node: node.clone(),
                    ..event
                }
                .encode_to_vec();
                let mut headers = HeaderMap::new();
                headers.insert(EVENT_SEQ_HEADER, seq.to_string().as_str());
                if let Err(e) = client
                    .publish_with_headers(subject.clone(), headers, encoded.into())
                    .await
                {
                    debug!(error = %e, "cluster: cannot relay an event");
                }
            }
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

/// The other nodes' events for one watch: its subscriptions, the numbers
/// seen per node, and its lease (renewed until this is dropped).
pub struct Remote {
    subs: SelectAll<async_nats::Subscriber>,
    own: String,
    /// (node, messages) → last number seen.
    last: HashMap<(String, bool), u64>,
    /// Events decoded but not yet handed out (a gap's `lagged` goes first).
    pending: VecDeque<pb::Event>,
    _renew: DropGuard,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("own", &self.own).finish()
    }
}

impl Remote {
    /// Subscribes to the other nodes' events, asks every node for them, and
    /// waits (at most [`crate::cluster::ADMIN_DEADLINE`]) until the nodes
    /// known to be there relay. Returns the feed and who answered.
    pub async fn open(bus: &Bus, messages: bool) -> Result<(Remote, Gathered), String> {
        let client = bus.client().clone();
        if client.connection_state() != State::Connected {
            return Err("NATS is unreachable".into());
        }
        let mut subs = SelectAll::new();
        let mut subjects = vec![bus.subject(EVENTS)];
        if messages {
            subjects.push(bus.subject(MESSAGES));
        }
        for subject in subjects {
            subs.push(client.subscribe(subject).await.map_err(|e| e.to_string())?);
        }
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
                subs,
                own: bus.node_id().to_string(),
                last: HashMap::new(),
                pending: VecDeque::new(),
                _renew: stop.drop_guard(),
            },
            gathered,
        ))
    }

    /// The next event from another node (a `lagged` one for a gap); `None`
    /// once the subscriptions end.
    pub async fn next(&mut self) -> Option<pb::Event> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(event);
            }
            let msg = self.subs.next().await?;
            let messages = msg.subject.as_str().ends_with(MESSAGES);
            let Ok(event) = pb::Event::decode(msg.payload) else {
                continue;
            };
            if event.node == self.own || event.node.is_empty() {
                continue;
            }
            let seq = msg
                .headers
                .as_ref()
                .and_then(|h| h.get(EVENT_SEQ_HEADER))
                .and_then(|s| s.as_str().parse::<u64>().ok());
            if let Some(seq) = seq {
                if self.last.len() >= MAX_NODES {
                    self.last.clear();
                }
                let key = (event.node.clone(), messages);
                match self.last.insert(key, seq) {
                    Some(last) if seq <= last => continue,
                    Some(last) if seq > last + 1 => {
                        self.pending.push_back(pb::Event {
                            node: event.node.clone(),
                            ..convert::lagged(seq - last - 1)
                        });
                    }
                    _ => {}
                }
            }
            self.pending.push_back(event);
        }
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
