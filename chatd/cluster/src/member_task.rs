//! The membership task: applies other nodes' tables ([`super::members`]),
//! answers snapshot requests, delivers private messages from other nodes,
//! and drops the tables of silent nodes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::link::Link;
use super::members::{MemberMsg, PmMsg, Wire, part_budget, plausible_nick};
use super::receive::{replay_raw, unless_frozen};
use super::subjects::{self, NODE_HEADER};
use crate::seq::{PRIVATE_KIND, Position, SEQ_HEADER, Seen, Verdict, private_stream};
use chatd_hub::hub::Hub;

/// How often tables of silent nodes are dropped (queries skip them at once).
const PRUNE_EVERY: Duration = Duration::from_secs(2);
/// At most one snapshot request per this long, however many gaps are seen.
const SYNC_EVERY: Duration = Duration::from_secs(1);

/// The membership task's state.
struct Task {
    client: async_nats::Client,
    hub: Hub,
    link: Arc<Link>,
    node_id: Arc<str>,
    /// `cluster.name`.
    name: String,
    /// `NAME.members`
    subject: String,
    /// `NAME.members.sync`
    sync_subject: String,
    /// This node's private messages' stream ([`private_stream`]).
    pm_stream: String,
    /// The last private message handed on per sending node, carried on
    /// from the previous process after a seamless upgrade.
    pm_seen: Arc<std::sync::Mutex<Seen>>,
    last_sync: Option<Instant>,
    stop: CancellationToken,
}

/// The membership task: applies other nodes' tables, answers snapshot
/// requests, delivers private messages from other nodes, and drops the
/// tables of silent nodes, until `stop`.
pub async fn run(
    client: async_nats::Client,
    hub: Hub,
    link: Arc<Link>,
    node_id: Arc<str>,
    name: String,
    mut state: watch::Receiver<bool>,
    stop: CancellationToken,
) {
    let subject = subjects::members(&name);
    let sync_subject = format!("{subject}.sync");
    let pm_subject = format!("{}{node_id}", subjects::pm_prefix(&name));
    let (Some(mut changes), Some(mut syncs), Some(mut pms)) = (
        subscribe(&client, subject.clone()).await,
        subscribe(&client, sync_subject.clone()).await,
        subscribe(&client, pm_subject).await,
    ) else {
        return;
    };
    let pm_stream = private_stream(&node_id);
    let mut task = Task {
        subject,
        sync_subject,
        pm_seen: link.receipts.open(&pm_stream),
        pm_stream,
        client,
        hub,
        link,
        node_id,
        name,
        last_sync: None,
        stop,
    };
    let mut prune = tokio::time::interval(PRUNE_EVERY);
    // Connected at start, or later: either way the first `changed` or the
    // initial state says when to introduce this node.
    let mut introduce = *state.borrow_and_update();
    loop {
        if introduce {
            introduce = false;
            task.introduce().await;
        }
        tokio::select! {
            () = task.stop.cancelled() => break,
            changed = state.changed() => {
                if changed.is_err() {
                    break;
                }
                introduce = *state.borrow_and_update();
            }
            _ = prune.tick() => task.prune().await,
            msg = changes.next() => {
                let Some(msg) = msg else { break };
                task.change(&msg.payload).await;
            }
            msg = syncs.next() => {
                let Some(msg) = msg else { break };
                if &msg.payload[..] != task.node_id.as_bytes() {
                    task.send_snapshot().await;
                }
            }
            msg = pms.next() => {
                let Some(msg) = msg else { break };
                if !task.private(msg).await {
                    return;
                }
            }
        }
    }
}

async fn subscribe(client: &async_nats::Client, subject: String) -> Option<async_nats::Subscriber> {
    client
        .subscribe(subject.clone())
        .await
        .map_err(|e| warn!(subject = %subject, error = %e, "cluster: cannot subscribe; other nodes' members are unknown"))
        .ok()
}

impl Task {
    /// Our whole table for the others, then theirs for us.
    async fn introduce(&mut self) {
        self.send_snapshot().await;
        self.publish_sync().await;
    }

    /// Asks every node for its table, at most once per [`SYNC_EVERY`].
    async fn ask_sync(&mut self) {
        if self.last_sync.is_none_or(|t| t.elapsed() >= SYNC_EVERY) {
            self.publish_sync().await;
        }
    }

    /// Asks every node for its table now.
    async fn publish_sync(&mut self) {
        self.last_sync = Some(Instant::now());
        let _ = self
            .client
            .publish(
                self.sync_subject.clone(),
                Bytes::from(self.node_id.to_string()),
            )
            .await;
    }

    /// This node's table, in parts small enough for the server it is on.
    fn snapshot(&self) -> Vec<Bytes> {
        let (seq, set) = self.hub.member_snapshot();
        let budget = part_budget(self.client.server_info().max_payload);
        let parts = MemberMsg::snapshot_parts(&self.node_id, seq, set, budget);
        debug!(
            members_seq = seq,
            parts = parts.len(),
            budget,
            "cluster: member snapshot sent"
        );
        parts
            .iter()
            .map(|m| Bytes::from(serde_json::to_vec(m).unwrap_or_default()))
            .collect::<Vec<_>>()
    }

    async fn send_snapshot(&self) {
        for part in self.snapshot() {
            if let Err(e) = self.client.publish(self.subject.clone(), part).await {
                debug!(error = %e, "cluster: cannot send a member snapshot");
                break;
            }
        }
    }

    /// Drops the tables of silent nodes; a node that is there but whose
    /// table this node lacks (its snapshot was lost, or it was silent a
    /// while) is asked again.
    async fn prune(&mut self) {
        let Some(live) = self.link.live_nodes() else {
            return;
        };
        self.link.members().retain(&live);
        let lacking = live.iter().any(|n| !self.link.members().knows(n));
        if lacking {
            self.ask_sync().await;
        }
    }

    /// Another node's change or snapshot part; a gap asks for a snapshot.
    async fn change(&mut self, payload: &[u8]) {
        let Ok(wire) = serde_json::from_slice::<Wire>(payload) else {
            debug!("cluster: ignored a malformed member message");
            return;
        };
        if wire.msg.node == *self.node_id {
            return;
        }
        if self.link.members().receive(wire) {
            self.ask_sync().await;
        }
    }

    /// A private message for a client here (or an error back for one):
    /// recovers what its sender's numbers say was missed, and hands them
    /// on. `false` when the task is to end (stopped, or an upgrade
    /// committed).
    async fn private(&mut self, msg: async_nats::Message) -> bool {
        // Errors coming back carry no position.
        let from_pos = msg.headers.as_ref().and_then(|h| {
            let from = h.get(NODE_HEADER)?.as_str().to_string();
            let pos = Position::parse(h.get(SEQ_HEADER)?.as_str())?;
            Some((from, pos))
        });
        let mut payloads = Vec::new();
        if let Some((from, pos)) = &from_pos {
            let verdict = chatd_hub::lock::lock(&self.pm_seen).check(from, *pos);
            match verdict {
                Verdict::Duplicate => return true,
                Verdict::Deliver => {}
                Verdict::Gap { after } => match self.missed(from, after, pos.seq).await {
                    Some(missed) => payloads = missed,
                    None => return false,
                },
            }
        }
        payloads.push(msg.payload);
        // As a room's listener does: handed on under the lock and
        // only while no upgrade has frozen the clients.
        let hub = &self.hub;
        let handed = unless_frozen(&*self.link.pause, &self.pm_seen, |seen| {
            if let Some((from, pos)) = &from_pos {
                seen.record(from, *pos);
            }
            payloads
                .into_iter()
                .filter_map(|payload| serde_json::from_slice::<PmMsg>(&payload).ok())
                .filter_map(|pm| deliver(hub, pm))
                .collect::<Vec<_>>()
        })
        .await;
        let Some(backs) = handed else { return false };
        for back in backs {
            let subject = format!("{}{}", subjects::pm_prefix(&self.name), back.from_node);
            if let Ok(payload) = serde_json::to_vec(&back) {
                let _ = self.client.publish(subject, payload.into()).await;
            }
        }
        true
    }

    /// The private messages of `from` after `after` and before `before`,
    /// asked of it again; `None` once the task stops.
    async fn missed(&self, from: &str, after: u64, before: u64) -> Option<Vec<Bytes>> {
        let subject = format!("{}{from}", subjects::replay_prefix(&self.name));
        let missed = tokio::select! {
            () = self.stop.cancelled() => return None,
            missed = replay_raw(&self.client, subject, &self.pm_stream, after, before) => missed,
        };
        debug!(node = %from, after, got = missed.len(), "cluster: replayed missed private messages");
        Some(
            missed
                .into_iter()
                .filter(|(kind, _, _)| *kind == PRIVATE_KIND)
                .map(|(_, _, payload)| payload)
                .collect(),
        )
    }
}

/// Hands a private message from another node to its recipient here, or
/// an error back to its sender here. Returns the error to send back, if the
/// message could not be delivered.
fn deliver(hub: &Hub, pm: PmMsg) -> Option<PmMsg> {
    if let Some(error) = &pm.error {
        hub.notify_client(
            pm.from_id,
            &format!("error: {}", chatd_text::sanitize::clean(error)),
        );
        return None;
    }
    if !plausible_nick(&pm.from_nick) || !plausible_node(&pm.from_node) {
        return None;
    }
    match hub.deliver_private(&pm.from_nick, &pm.to, &pm.text) {
        Ok(()) => None,
        Err(why) => Some(PmMsg {
            error: Some(why),
            text: String::new(),
            ..pm
        }),
    }
}

/// Whether `s` may be a node id (a subject token).
fn plausible_node(s: &str) -> bool {
    plausible_nick(s)
}
