//! Cluster-wide bans that outlive outages: every ban and unban is also
//! written to the JetStream key-value bucket `NAME_bans` (an unban as a
//! tombstone: a value with the time it was lifted), and a node that
//! (re)connects to NATS settles its own list with the bucket's: for each
//! address or network, the latest change wins. So a node that was cut off
//! or down while a ban was made (or lifted) catches up, and a ban made on a
//! node while it was cut off reaches the others.
//!
//! Live, a ban still reaches every node at once through the admin
//! scatter (the admin API); the bucket is what a node missed.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::connection::State;
use async_nats::jetstream::{self, kv, stream};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use chatd_hub::bans::{Ban, format_target, parse_target};
use chatd_hub::hub::{Event, Hub};

use super::subjects;

const OP_TIMEOUT: Duration = Duration::from_secs(2);
/// Unbans made while NATS was away, remembered for the next settling; past
/// this many the oldest are forgotten (an operator lifting more bans than
/// this during one outage repeats the rest).
const MAX_PENDING_UNBANS: usize = 10_000;
/// When to settle after (re)connecting: at once, then again once the other
/// nodes that were cut off too have written what they did meanwhile.
const SETTLE_AFTER_CONNECT: [Duration; 3] = [
    Duration::ZERO,
    Duration::from_secs(3),
    Duration::from_secs(10),
];
/// Then this often, for whatever was missed otherwise (each settling reads
/// the whole bucket: one request per ban).
const SETTLE_EVERY: Duration = Duration::from_secs(120);

/// A ban, or its tombstone, as the bucket holds it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    pub target: String,
    #[serde(default)]
    pub reason: String,
    pub created_ms: u64,
    #[serde(default)]
    pub expires_ms: Option<u64>,
    /// Set when the ban was lifted, at this time.
    #[serde(default)]
    pub removed_ms: Option<u64>,
}

impl Entry {
    fn of(ban: &Ban) -> Entry {
        Entry {
            target: ban.target(),
            reason: ban.reason.clone(),
            created_ms: ms(ban.created_at),
            expires_ms: ban.expires_at.map(ms),
            removed_ms: None,
        }
    }

    /// When this entry was last changed.
    fn changed_ms(&self) -> u64 {
        self.removed_ms.unwrap_or(self.created_ms)
    }

    fn ban(&self) -> Option<Ban> {
        let at = |ms: u64| UNIX_EPOCH + Duration::from_millis(ms);
        Some(Ban {
            net: parse_target(&self.target).ok()?,
            reason: chatd_text::sanitize::clean(&self.reason),
            created_at: at(self.created_ms),
            expires_at: self.expires_ms.map(at),
        })
    }
}

fn ms(t: SystemTime) -> u64 {
    chatd_hub::hub::unix_ms(t)
}

/// The bucket key of a target: `:` (IPv6) is not allowed in keys.
fn key(target: &str) -> Option<String> {
    let net = parse_target(target).ok()?;
    Some(net.to_string().replace(':', "_"))
}

/// The bans task's state.
struct Task {
    client: async_nats::Client,
    hub: Hub,
    bucket: String,
    replicas: usize,
    store: Option<kv::Store>,
    /// Unbans not written to the bucket yet (NATS away).
    pending_unbans: Vec<(String, u64)>,
}

/// What a hub event asks of the bans task.
enum Step {
    /// Write this entry for this target.
    Write(String, Entry),
    /// Nothing to write.
    Skip,
    /// Events were missed: settle with the bucket now.
    Settle,
    /// The hub is gone.
    Stop,
}

/// The bans task: writes this node's bans and unbans to the bucket, and
/// settles with it whenever NATS (re)connects, until `stop`.
pub async fn run(
    client: async_nats::Client,
    hub: Hub,
    name: String,
    replicas: usize,
    mut state: watch::Receiver<bool>,
    stop: CancellationToken,
) {
    let mut events = hub.subscribe();
    let mut task = Task {
        client,
        hub,
        bucket: subjects::bans_bucket(&name),
        replicas,
        store: None,
        pending_unbans: Vec::new(),
    };
    let connected_at = tokio::time::Instant::now();
    let mut schedule: Vec<tokio::time::Instant> = if *state.borrow_and_update() {
        SETTLE_AFTER_CONNECT
            .iter()
            .map(|d| connected_at + *d)
            .collect()
    } else {
        Vec::new()
    };
    let mut settle_now = false;
    loop {
        task.settle_if_due(&mut schedule, &mut settle_now).await;
        let next = schedule
            .first()
            .copied()
            .unwrap_or_else(|| tokio::time::Instant::now() + SETTLE_EVERY);
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep_until(next) => {}
            changed = state.changed() => {
                if changed.is_err() {
                    break;
                }
                if *state.borrow_and_update() {
                    let now = tokio::time::Instant::now();
                    schedule = SETTLE_AFTER_CONNECT.iter().map(|d| now + *d).collect();
                }
            }
            event = events.recv() => match step(event) {
                Step::Write(target, entry) => task.record(target, entry).await,
                Step::Skip => {}
                Step::Settle => settle_now = true,
                Step::Stop => break,
            },
        }
    }
}

/// What `event` asks of the bans task.
fn step(event: Result<Event, broadcast::error::RecvError>) -> Step {
    match event {
        Ok(Event::Ban { ban, .. }) => Step::Write(ban.target(), Entry::of(&ban)),
        Ok(Event::Unban { target }) => {
            let now = ms(SystemTime::now());
            let entry = Entry {
                target: target.clone(),
                reason: String::new(),
                created_ms: now,
                expires_ms: None,
                removed_ms: Some(now),
            };
            Step::Write(target, entry)
        }
        Ok(_) => Step::Skip,
        // Missed events: settling catches up.
        Err(broadcast::error::RecvError::Lagged(_)) => Step::Settle,
        Err(broadcast::error::RecvError::Closed) => Step::Stop,
    }
}

impl Task {
    /// Settles with the bucket when the schedule says so (or `settle_now`),
    /// while NATS is there.
    async fn settle_if_due(
        &mut self,
        schedule: &mut Vec<tokio::time::Instant>,
        settle_now: &mut bool,
    ) {
        let due = schedule
            .first()
            .is_some_and(|t| *t <= tokio::time::Instant::now());
        if !(due || *settle_now) || self.client.connection_state() != State::Connected {
            return;
        }
        *settle_now = false;
        if due {
            schedule.remove(0);
            if schedule.is_empty() {
                schedule.push(tokio::time::Instant::now() + SETTLE_EVERY);
            }
        }
        if self.store.is_none() {
            self.store = open(&self.client, &self.bucket, self.replicas).await;
        }
        if let Some(store) = &self.store {
            settle(
                &self.client,
                &self.hub,
                store,
                &self.bucket,
                &mut self.pending_unbans,
            )
            .await;
        }
    }

    /// Writes a ban or unban of this node to the bucket; an unban that
    /// cannot be written is remembered.
    async fn record(&mut self, target: String, entry: Entry) {
        let connected = self.client.connection_state() == State::Connected;
        let written = match (&self.store, connected) {
            (Some(store), true) => write(store, &target, &entry).await,
            (None, true) => {
                self.store = open(&self.client, &self.bucket, self.replicas).await;
                match &self.store {
                    Some(store) => write(store, &target, &entry).await,
                    None => false,
                }
            }
            _ => false,
        };
        if !written && entry.removed_ms.is_some() {
            // A ban made meanwhile is found on this node at the
            // next settling; an unban is not, so it is remembered.
            if self.pending_unbans.len() >= MAX_PENDING_UNBANS {
                self.pending_unbans.remove(0);
            }
            self.pending_unbans.push((target, entry.changed_ms()));
        }
    }
}

async fn open(client: &async_nats::Client, bucket: &str, replicas: usize) -> Option<kv::Store> {
    let js = jetstream::new(client.clone());
    match tokio::time::timeout(
        OP_TIMEOUT,
        super::stream::open_bucket(&js, bucket, Duration::ZERO, replicas),
    )
    .await
    {
        Ok(Ok(store)) => Some(store),
        Ok(Err(e)) => {
            debug!(error = %e, bucket, "cluster: cannot open the bans bucket");
            None
        }
        Err(_) => None,
    }
}

async fn write(store: &kv::Store, target: &str, entry: &Entry) -> bool {
    let (Some(key), Ok(value)) = (key(target), serde_json::to_vec(entry)) else {
        return false;
    };
    matches!(
        tokio::time::timeout(OP_TIMEOUT, store.put(key, value.into())).await,
        Ok(Ok(_))
    )
}

/// Settles this node's bans with the bucket: the latest change of each
/// target wins, here or there.
async fn settle(
    client: &async_nats::Client,
    hub: &Hub,
    store: &kv::Store,
    bucket: &str,
    pending_unbans: &mut Vec<(String, u64)>,
) {
    let Some(remote) = read_all(client, bucket).await else {
        return;
    };
    let mut local: HashMap<String, Entry> = hub
        .bans()
        .iter()
        .map(|b| (b.target(), Entry::of(b)))
        .collect();
    for (target, at) in pending_unbans.drain(..) {
        let newer = local.get(&target).is_none_or(|e| e.changed_ms() < at);
        if newer {
            local.insert(
                target.clone(),
                Entry {
                    target,
                    reason: String::new(),
                    created_ms: at,
                    expires_ms: None,
                    removed_ms: Some(at),
                },
            );
        }
    }
    let (mut added, mut lifted, mut sent) = (0, 0, 0);
    let mut targets: Vec<&String> = local.keys().chain(remote.keys()).collect();
    targets.sort();
    targets.dedup();
    for target in targets {
        match (local.get(target), remote.get(target)) {
            (Some(here), Some(there)) if here.changed_ms() >= there.changed_ms() => {
                if here != there && write(store, target, here).await {
                    sent += 1;
                }
            }
            (Some(here), None) => {
                if write(store, target, here).await {
                    sent += 1;
                }
            }
            (here, Some(there)) => {
                let banned_here = here.is_some_and(|e| e.removed_ms.is_none());
                match (there.removed_ms, there.ban()) {
                    (Some(_), Some(ban)) if banned_here => {
                        let hub = hub.clone();
                        let net = ban.net;
                        let done = tokio::task::spawn_blocking(move || hub.unban(net)).await;
                        lifted += usize::from(matches!(done, Ok(Ok(()))));
                    }
                    (None, Some(ban)) if ban.is_active(SystemTime::now()) => {
                        let hub = hub.clone();
                        let done = tokio::task::spawn_blocking(move || hub.ban(ban)).await;
                        added += usize::from(matches!(done, Ok(Ok(_))));
                    }
                    _ => {}
                }
            }
            (None, None) => {}
        }
    }
    if added + lifted + sent > 0 {
        info!(
            added,
            lifted, sent, "cluster: bans settled with the other nodes"
        );
    }
}

/// Every entry of the bucket, by target; `None` when it cannot be read.
async fn read_all(client: &async_nats::Client, bucket: &str) -> Option<HashMap<String, Entry>> {
    let js = jetstream::new(client.clone());
    let stream = tokio::time::timeout(OP_TIMEOUT, js.get_stream(format!("KV_{bucket}")))
        .await
        .ok()?
        .ok()?;
    let subject = format!("$KV.{bucket}.>");
    let mut entries = HashMap::new();
    let mut next = 1;
    loop {
        let got = tokio::time::timeout(
            OP_TIMEOUT,
            stream.direct_get_next_for_subject(&subject, Some(next)),
        )
        .await
        .ok()?;
        let msg = match got {
            Ok(msg) => msg,
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => break,
            Err(e) => {
                debug!(error = %e, bucket, "cluster: cannot read the bans bucket");
                return None;
            }
        };
        next = msg.sequence + 1;
        if let Ok(entry) = serde_json::from_slice::<Entry>(&msg.payload)
            && parse_target(&entry.target).is_ok()
        {
            entries.insert(format_target(&parse_target(&entry.target).ok()?), entry);
        }
    }
    Some(entries)
}
