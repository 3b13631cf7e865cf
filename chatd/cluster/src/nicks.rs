//! Cluster-wide nicks: a nick belongs to whoever created its key first in
//! the JetStream key-value bucket `NAME_nicks`.
//!
//! The key is the nick's [`chatd_text::protocol::fold`] (so `Alice`, `alice` and
//! `a1ice` are one key, as on one node); the value says who holds it
//! (`NODE CLIENT NICK`). A claim is a KV *create*, which NATS grants to
//! exactly one of any number of concurrent callers; the others read "taken".
//!
//! A node keeps its nicks alive: the bucket's `max_age` is the expiry
//! (`cluster.nick_expiry_secs`, 20 s by default), and this task rewrites
//! every key it holds every `cluster.nick_rewrite_secs` (5 s; a
//! compare-and-set on the revision it wrote last). A node that dies stops
//! refreshing, so its nicks vanish from the bucket within the expiry and
//! are free again. The bucket is made by the first node that needs it, with
//! that node's expiry; a node that finds it with another one sets its own
//! (the expiry is cluster-wide: give every node the same).
//!
//! While NATS is away a nick is granted on this node alone (as with one
//! node) and written to the bucket once NATS is back. Then, and whenever a
//! refresh fails, each key is settled the same way: whoever the bucket
//! names holds it, that is, the earlier create wins. A client of this node
//! that lost its nick so is renamed to its guest nick and told
//! ([`Hub::nick_lost`]).
//!
//! One task does all of this, one request at a time, so a claim and a
//! release of the same key never overtake each other. Its queue holds at
//! most one claim per connection (a connection waiting for its claim reads
//! nothing more) and one release per nick change or disconnect.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use chatd_hub::cluster_state::Pause;
use chatd_hub::hub::{ClientId, Hub};

/// How long one KV operation may take before a claim says "try again".
const OP_TIMEOUT: Duration = Duration::from_secs(2);

pub use chatd_hub::cluster_state::Claim;

/// What the nick task is asked.
#[derive(Debug)]
pub enum Request {
    Claim {
        key: String,
        nick: Arc<str>,
        client: ClientId,
        reply: oneshot::Sender<Claim>,
    },
    Release {
        key: String,
        client: ClientId,
    },
    /// A nick the previous process of this node held for `client`, taken
    /// over with it by a seamless upgrade.
    Hold {
        key: String,
        nick: Arc<str>,
        client: ClientId,
    },
}

/// A nick this node holds.
#[derive(Debug)]
struct Held {
    nick: Arc<str>,
    client: ClientId,
    /// The revision this node wrote last; `None` while granted locally and
    /// not yet in the bucket.
    revision: Option<u64>,
}

/// How settling a key with the bucket ended.
#[derive(Debug, PartialEq, Eq)]
enum Settled {
    Kept(u64),
    Lost,
    /// The bucket could not be asked; try again later.
    Unknown,
}

/// The nick task.
pub struct Nicks {
    client: async_nats::Client,
    hub: Hub,
    /// A committed upgrade's new process holds this node's nicks.
    pause: Arc<dyn Pause>,
    node_id: Arc<str>,
    /// `NAME_nicks`.
    bucket: String,
    /// Replicas for the bucket's stream ([`super::stream::replicas`]).
    replicas: usize,
    /// How long a key outlives the last refresh of its node
    /// (`cluster.nick_expiry_secs`): the most a dead node's nicks stay
    /// taken. The bucket's max age.
    ttl: Duration,
    /// How often this node rewrites the keys of the nicks it holds
    /// (`cluster.nick_rewrite_secs`); at most a third of `ttl`, so that a
    /// refresh or two may fail without losing a nick.
    refresh: Duration,
    store: Option<kv::Store>,
    held: HashMap<String, Held>,
    /// Keys released while NATS was away, with the revision this node
    /// wrote and when: deleted once it is back. Only those younger than
    /// the expiry (`cluster.nick_expiry_secs`) are kept (older ones have expired by themselves), so
    /// this stays as small as the releases of that long.
    released: Vec<(String, u64, std::time::Instant)>,
}

impl Nicks {
    pub fn new(
        client: async_nats::Client,
        hub: Hub,
        node_id: Arc<str>,
        bucket: String,
        replicas: usize,
        timings: &chatd_config::ClusterTimings,
        pause: Arc<dyn Pause>,
    ) -> Self {
        Self {
            client,
            hub,
            pause,
            node_id,
            bucket,
            replicas,
            ttl: timings.nick_expiry,
            refresh: timings.nick_rewrite,
            store: None,
            held: HashMap::new(),
            released: Vec::new(),
        }
    }

    /// Serves requests and refreshes until `stop`; then deletes this
    /// node's keys, so that its nicks are free at once after a clean stop.
    pub async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Request>,
        mut state: watch::Receiver<bool>,
        stop: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(self.refresh);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                req = rx.recv() => match req {
                    Some(req) => self.handle(req).await,
                    None => break,
                },
                _ = tick.tick() => self.refresh().await,
                changed = state.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    if *state.borrow_and_update() {
                        // Back after an outage: every key is settled now,
                        // not at the next tick.
                        self.refresh().await;
                    }
                }
            }
        }
        if self.pause.committed() {
            // The new process of this node holds these nicks now.
            return;
        }
        let release = async {
            for (key, held) in std::mem::take(&mut self.held) {
                if let (Some(store), Some(rev)) = (&self.store, held.revision) {
                    let _ = store.delete_expect_revision(&key, Some(rev)).await;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), release).await;
    }

    fn connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    /// The bucket, made (or opened) on first use.
    async fn store(&mut self) -> Option<kv::Store> {
        if self.store.is_none() {
            let js = jetstream::new(self.client.clone());
            let made = tokio::time::timeout(
                OP_TIMEOUT,
                super::stream::open_bucket(&js, &self.bucket, self.ttl, self.replicas),
            )
            .await
            .unwrap_or_else(|_| Err("timed out".into()));
            let made = match made {
                Ok(store) => Some(store),
                Err(e) => {
                    debug!(error = %e, bucket = %self.bucket, "cluster: cannot open the nick bucket");
                    None
                }
            };
            if made.is_none() {
                warn!(bucket = %self.bucket, "cluster: the nick bucket is unavailable (is JetStream enabled, nats-server -js?); nick changes fail until it is");
            }
            self.store = made;
        }
        self.store.clone()
    }

    fn value(&self, held: &Held) -> Bytes {
        Bytes::from(format!("{} {} {}", self.node_id, held.client, held.nick))
    }

    async fn handle(&mut self, req: Request) {
        match req {
            Request::Claim {
                key,
                nick,
                client,
                reply,
            } => {
                let answer = self.claim(key, nick, client).await;
                let _ = reply.send(answer);
            }
            Request::Hold { key, nick, client } => {
                self.held.insert(
                    key,
                    Held {
                        nick,
                        client,
                        revision: None,
                    },
                );
            }
            Request::Release { key, client } => {
                if self.held.get(&key).is_none_or(|h| h.client != client) {
                    return;
                }
                let Some(held) = self.held.remove(&key) else {
                    return;
                };
                let Some(rev) = held.revision else {
                    return;
                };
                if !self.connected() {
                    let now = std::time::Instant::now();
                    self.released
                        .retain(|(_, _, at)| now.duration_since(*at) < self.ttl);
                    self.released.push((key, rev, now));
                    return;
                }
                if let Some(store) = self.store().await {
                    let deleted = tokio::time::timeout(
                        OP_TIMEOUT,
                        store.delete_expect_revision(&key, Some(rev)),
                    )
                    .await;
                    if !matches!(deleted, Ok(Ok(()))) {
                        debug!(key, "cluster: a released nick stays taken until it expires");
                    }
                }
            }
        }
    }

    async fn claim(&mut self, key: String, nick: Arc<str>, client: ClientId) -> Claim {
        if let Some(held) = self.held.get_mut(&key)
            && held.client == client
        {
            // Same key, other spelling (`alice` → `Alice`): still ours.
            held.nick = nick;
            return Claim::Granted;
        }
        let held = Held {
            nick,
            client,
            revision: None,
        };
        if !self.connected() {
            // Granted on this node alone; settled with the bucket once NATS
            // is back.
            self.held.insert(key, held);
            return Claim::Granted;
        }
        let Some(store) = self.store().await else {
            return Claim::Unavailable(
                "cannot check the nick with the other chat nodes right now; try again".into(),
            );
        };
        let value = self.value(&held);
        match tokio::time::timeout(OP_TIMEOUT, store.create(&key, value)).await {
            Ok(Ok(revision)) => {
                self.held.insert(
                    key,
                    Held {
                        revision: Some(revision),
                        ..held
                    },
                );
                Claim::Granted
            }
            Ok(Err(e)) if e.kind() == kv::CreateErrorKind::AlreadyExists => Claim::Taken,
            Ok(Err(e)) => {
                debug!(error = %e, key, "cluster: nick claim failed");
                Claim::Unavailable(
                    "cannot check the nick with the other chat nodes right now; try again".into(),
                )
            }
            Err(_) => {
                Claim::Unavailable("the other chat nodes did not answer in time; try again".into())
            }
        }
    }

    /// Rewrites every key this node holds (or writes it, if it was granted
    /// while NATS was away); renames the holders of the keys another node
    /// holds now.
    async fn refresh(&mut self) {
        if !self.connected() || (self.held.is_empty() && self.released.is_empty()) {
            return;
        }
        let Some(store) = self.store().await else {
            return;
        };
        // What was let go while NATS was away, unless someone else wrote it
        // since (then the revision differs and nothing is deleted).
        for (key, rev, at) in std::mem::take(&mut self.released) {
            if at.elapsed() < self.ttl {
                let _ =
                    tokio::time::timeout(OP_TIMEOUT, store.delete_expect_revision(&key, Some(rev)))
                        .await;
            }
        }
        let keys: Vec<String> = self.held.keys().cloned().collect();
        let mut lost = Vec::new();
        for key in keys {
            let Some(held) = self.held.get(&key) else {
                continue;
            };
            let value = self.value(held);
            let settled = settle(&store, &key, value, held.revision).await;
            match settled {
                Settled::Kept(rev) => {
                    if let Some(held) = self.held.get_mut(&key) {
                        held.revision = Some(rev);
                    }
                }
                Settled::Lost => {
                    if let Some(held) = self.held.remove(&key) {
                        lost.push((key, held));
                    }
                }
                Settled::Unknown => {}
            }
        }
        for (key, held) in lost {
            info!(nick = %held.nick, client = held.client, "cluster: another node holds this nick; its holder here is renamed");
            self.hub.nick_lost(held.client, &key);
        }
    }
}

/// Settles `key` with the bucket: rewrites it when this node wrote it last
/// (`revision`), else creates it; when another holder's value is there,
/// the key is lost.
async fn settle(store: &kv::Store, key: &str, value: Bytes, revision: Option<u64>) -> Settled {
    if let Some(rev) = revision
        && let Ok(Ok(new)) =
            tokio::time::timeout(OP_TIMEOUT, store.update(key, value.clone(), rev)).await
    {
        return Settled::Kept(new);
    }
    match tokio::time::timeout(OP_TIMEOUT, store.create(key, value.clone())).await {
        Ok(Ok(rev)) => Settled::Kept(rev),
        Ok(Err(e)) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
            match tokio::time::timeout(OP_TIMEOUT, store.entry(key)).await {
                Ok(Ok(Some(entry))) if entry.operation == kv::Operation::Put => {
                    if entry.value == value {
                        // Ours already (a rewrite whose answer was lost).
                        Settled::Kept(entry.revision)
                    } else {
                        Settled::Lost
                    }
                }
                _ => Settled::Unknown,
            }
        }
        _ => Settled::Unknown,
    }
}
